//! Host → route lookups, including normalisation of case, port and trailing dot.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;

use clearml_edge::config::Route;
use clearml_edge::routing::RouteTable;

fn table() -> RouteTable {
    let route = |name: &str, port| Route {
        name: name.into(),
        hosts: vec![format!("{name}.clearml.example.com")],
        port,
        max_body_bytes: None,
        health: Default::default(),
    };
    RouteTable::new(vec![
        route("app", 30080),
        route("files", 30081),
        route("api", 30008),
    ])
}

fn lookups(c: &mut Criterion) {
    let table = table();
    let hosts = [
        "app.clearml.example.com",
        "FILES.ClearML.Example.com:8443",
        "api.clearml.example.com.",
        "unknown.clearml.example.com",
    ];
    let mut group = c.benchmark_group("routing");
    group.throughput(Throughput::Elements(hosts.len() as u64));
    group.bench_function("lookup_mixed_hosts", |b| {
        b.iter(|| {
            for host in hosts {
                black_box(table.lookup(black_box(host)));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
