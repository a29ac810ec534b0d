//! Kubernetes discovery end to end: the real proxy, its real kube-rs watcher, the fake API
//! server speaking the list/watch protocol, and real upstreams on 127.0.0.x as the nodes.

#[path = "support/kube.rs"]
mod kube_fake;
mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use kube_fake::{node, FakeKube};
use support::*;
use tokio::sync::mpsc;

/// Safety net so a bug fails instead of hanging; never an assertion on speed.
const LIMIT: Duration = Duration::from_secs(30);

/// Three nodes on one port: 127.0.0.1, .2 and .3 (all loopback), each answering its name.
struct Nodes {
    _upstreams: Vec<Upstream>,
    port: u16,
}

async fn nodes() -> Nodes {
    // 127.0.0.2 and .3 are loopback on Linux; a port may be taken there, so try a few.
    for _ in 0..20 {
        let first = Upstream::echo("127.0.0.1:0", "node-1").await;
        let port = first.port();
        let second = Upstream::try_echo_at(&format!("127.0.0.2:{port}"), "node-2").await;
        let third = Upstream::try_echo_at(&format!("127.0.0.3:{port}"), "node-3").await;
        if let (Some(second), Some(third)) = (second, third) {
            return Nodes {
                _upstreams: vec![first, second, third],
                port,
            };
        }
    }
    panic!("cannot bind one port on 127.0.0.1, .2 and .3 (these tests need Linux loopback)");
}

async fn proxy_watching(kube: &FakeKube, port: u16) -> clearml_edge::RunningServer {
    let text = format!(
        "domain = \"example.com\"\n[[listeners]]\naddress = \"127.0.0.1:0\"\n[admin]\naddress = \"127.0.0.1:0\"\n[balancing]\nalgorithm = \"round_robin\"\n[routes.api]\nport = {port}\n[discovery.kubernetes]\nkubeconfig = {:?}\n",
        kube.kubeconfig().display().to_string()
    );
    proxy(&text).await
}

/// Waits until the published snapshot's api pool holds exactly `expected` node addresses.
async fn wait_for_nodes(proxy: &clearml_edge::RunningServer, expected: &[&str]) {
    let mut versions = proxy.publisher().subscribe();
    let wanted: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    let check = async {
        loop {
            let snapshot = proxy.publisher().current();
            let route = snapshot.table.lookup("api.example.com").expect("api route");
            let mut have: Vec<String> = snapshot
                .pool(route)
                .backends
                .iter()
                .map(|b| b.node.to_string())
                .collect();
            have.sort();
            if snapshot.synced && have == wanted {
                return;
            }
            versions.changed().await.expect("publisher alive");
        }
    };
    tokio::time::timeout(LIMIT, check)
        .await
        .unwrap_or_else(|_| panic!("backends never became {expected:?}"));
}

async fn readyz(proxy: &clearml_edge::RunningServer) -> (StatusCode, String) {
    let admin = proxy.admin_addr().expect("admin listener");
    let (status, _, body) = send(
        &client(),
        admin,
        hyper::Method::GET,
        "localhost",
        "/readyz",
        full(""),
    )
    .await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Which upstreams answer `n` requests (round robin visits each node in turn).
async fn answering(proxy: &clearml_edge::RunningServer, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    for _ in 0..n {
        let (status, _, body) = get(addr(proxy), "api.example.com", "/debug.ping").await;
        assert_eq!(status, StatusCode::OK);
        names.push(String::from_utf8_lossy(&body).into_owned());
    }
    names.sort();
    names.dedup();
    names
}

#[tokio::test]
async fn not_ready_until_the_first_list_then_follows_node_changes() {
    let nodes = nodes().await;
    let kube = FakeKube::start().await;
    kube.apply(node("n1").internal_ip("127.0.0.1").build());
    kube.apply(
        node("other")
            .internal_ip("127.0.0.3")
            .without_label("app")
            .build(),
    );
    kube.set_down(true).await;

    let proxy = proxy_watching(&kube, nodes.port).await;
    // No list yet: not ready, and data requests say why.
    let (status, text) = readyz(&proxy).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(text.contains("waiting for the first node list"), "{text}");
    let (status, headers, body) = get(addr(&proxy), "api.example.com", "/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));
    assert!(body.starts_with(b"503 Service Unavailable: waiting"));

    kube.set_down(false).await;
    wait_for_nodes(&proxy, &["127.0.0.1"]).await;
    assert_eq!(readyz(&proxy).await.0, StatusCode::OK);
    assert_eq!(answering(&proxy, 3).await, ["node-1"]);

    // Added → gets traffic.
    kube.apply(node("n2").internal_ip("127.0.0.2").build());
    wait_for_nodes(&proxy, &["127.0.0.1", "127.0.0.2"]).await;
    assert_eq!(answering(&proxy, 4).await, ["node-1", "node-2"]);

    // NotReady → no new requests.
    kube.apply(node("n2").internal_ip("127.0.0.2").ready(false).build());
    wait_for_nodes(&proxy, &["127.0.0.1"]).await;
    assert_eq!(answering(&proxy, 4).await, ["node-1"]);

    // Ready again, then the label removed → out.
    kube.apply(node("n2").internal_ip("127.0.0.2").build());
    wait_for_nodes(&proxy, &["127.0.0.1", "127.0.0.2"]).await;
    kube.apply(
        node("n2")
            .internal_ip("127.0.0.2")
            .without_label("app")
            .build(),
    );
    wait_for_nodes(&proxy, &["127.0.0.1"]).await;

    // Address changed → traffic follows it.
    kube.apply(node("n1").internal_ip("127.0.0.3").build());
    wait_for_nodes(&proxy, &["127.0.0.3"]).await;
    assert_eq!(answering(&proxy, 3).await, ["node-3"]);

    // Excluded by label, autoscaler taint, being deleted: out; cordoned stays.
    kube.apply(
        node("n4")
            .internal_ip("127.0.0.2")
            .unschedulable(true)
            .build(),
    );
    wait_for_nodes(&proxy, &["127.0.0.2", "127.0.0.3"]).await;
    kube.apply(
        node("n4")
            .internal_ip("127.0.0.2")
            .label(
                "node.kubernetes.io/exclude-from-external-load-balancers",
                "",
            )
            .build(),
    );
    wait_for_nodes(&proxy, &["127.0.0.3"]).await;
    kube.apply(
        node("n4")
            .internal_ip("127.0.0.2")
            .taint("ToBeDeletedByClusterAutoscaler", "NoSchedule")
            .build(),
    );
    kube.apply(node("n5").internal_ip("127.0.0.1").deleting().build());
    kube.apply(node("n6").internal_ip("127.0.0.1").build());
    wait_for_nodes(&proxy, &["127.0.0.1", "127.0.0.3"]).await;

    // Deleted.
    kube.delete("n6");
    wait_for_nodes(&proxy, &["127.0.0.3"]).await;
    drop(nodes);
}

#[tokio::test]
async fn dropped_watch_and_410_relist_catch_up_without_an_empty_set() {
    let nodes = nodes().await;
    let kube = FakeKube::start().await;
    kube.apply(node("n1").internal_ip("127.0.0.1").build());
    kube.apply(node("n2").internal_ip("127.0.0.2").build());
    let proxy = proxy_watching(&kube, nodes.port).await;
    wait_for_nodes(&proxy, &["127.0.0.1", "127.0.0.2"]).await;

    // Record every published snapshot from here on: none may be empty.
    let mut versions = proxy.publisher().subscribe();
    let publisher = proxy.publisher().clone();
    let sizes = tokio::spawn(async move {
        let mut sizes = Vec::new();
        while versions.changed().await.is_ok() {
            let snapshot = publisher.current();
            sizes.push(
                snapshot
                    .pools
                    .iter()
                    .map(|p| p.backends.len())
                    .min()
                    .unwrap_or(0),
            );
            if sizes.len() >= 3 {
                break;
            }
        }
        sizes
    });

    // Dropped watch: the watcher resumes and sees what happened after.
    kube.wait_for_watchers(1).await;
    kube.drop_watches();
    kube.apply(node("n3").internal_ip("127.0.0.3").build());
    wait_for_nodes(&proxy, &["127.0.0.1", "127.0.0.2", "127.0.0.3"]).await;

    // History expired while the watch was away: 410 Gone, relist, the right set at once.
    kube.wait_for_watchers(1).await;
    let lists_before = kube.list_requests();
    kube.expire_history();
    kube.drop_watches();
    kube.delete("n1");
    kube.expire_history();
    wait_for_nodes(&proxy, &["127.0.0.2", "127.0.0.3"]).await;
    assert!(kube.list_requests() > lists_before, "a relist happened");
    kube.apply(node("n1").internal_ip("127.0.0.1").build());
    wait_for_nodes(&proxy, &["127.0.0.1", "127.0.0.2", "127.0.0.3"]).await;

    let sizes = tokio::time::timeout(LIMIT, sizes).await.unwrap().unwrap();
    assert!(
        sizes.iter().all(|&n| n > 0),
        "a published set was empty: {sizes:?}"
    );
    drop(nodes);
}

#[tokio::test]
async fn api_down_keeps_the_last_known_nodes_serving() {
    let nodes = nodes().await;
    let kube = FakeKube::start().await;
    kube.apply(node("n1").internal_ip("127.0.0.1").build());
    kube.apply(node("n2").internal_ip("127.0.0.2").build());
    let proxy = proxy_watching(&kube, nodes.port).await;
    wait_for_nodes(&proxy, &["127.0.0.1", "127.0.0.2"]).await;
    kube.wait_for_watchers(1).await;

    kube.set_down(true).await;
    // The watcher notices and marks the view stale; the nodes stay.
    tokio::time::timeout(LIMIT, async {
        while !proxy.discovery().is_stale() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("discovery reports stale");
    assert_eq!(answering(&proxy, 4).await, ["node-1", "node-2"]);
    let (status, text) = readyz(&proxy).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(text.contains("stale"), "{text}");

    // Back up: changes flow again.
    kube.delete("n2");
    kube.set_down(false).await;
    wait_for_nodes(&proxy, &["127.0.0.1"]).await;
    drop(nodes);
}

#[tokio::test]
async fn a_node_removed_mid_download_finishes_it() {
    let kube = FakeKube::start().await;
    let (chunks_tx, chunks_rx) = mpsc::channel::<Bytes>(1);
    let chunks_rx = Arc::new(tokio::sync::Mutex::new(Some(chunks_rx)));
    let slow = Upstream::start(
        "127.0.0.2:0",
        move |_req: Request<hyper::body::Incoming>| {
            let chunks_rx = chunks_rx.clone();
            async move {
                let rx = chunks_rx.lock().await.take().expect("one download");
                let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|c| (Ok(Frame::data(c)), rx))
                });
                Response::new(BodyExt::boxed(StreamBody::new(stream)))
            }
        },
    )
    .await;
    let Some(other) = Upstream::try_echo_at(&format!("127.0.0.1:{}", slow.port()), "node-1").await
    else {
        return; // port taken on 127.0.0.1: nothing to test against
    };
    kube.apply(node("n2").internal_ip("127.0.0.2").build());
    let proxy = proxy_watching(&kube, slow.port()).await;
    wait_for_nodes(&proxy, &["127.0.0.2"]).await;

    let req = Request::builder()
        .uri(format!("http://{}/big", addr(&proxy)))
        .header("host", "api.example.com")
        .body(full(""))
        .unwrap();
    let client = client();
    let response = client.request(req);
    chunks_tx
        .send(Bytes::from(vec![1u8; 1 << 20]))
        .await
        .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // The node goes away while the download runs; new requests go to the other node.
    kube.apply(node("n1").internal_ip("127.0.0.1").build());
    kube.delete("n2");
    wait_for_nodes(&proxy, &["127.0.0.1"]).await;
    assert_eq!(answering(&proxy, 2).await, ["node-1"]);

    // Read while the node sends: back-pressure would otherwise stall both ends.
    let body = tokio::spawn(response.into_body().collect());
    for _ in 0..15 {
        chunks_tx
            .send(Bytes::from(vec![2u8; 1 << 20]))
            .await
            .unwrap();
    }
    drop(chunks_tx);
    let body = body.await.unwrap().unwrap().to_bytes();
    assert_eq!(body.len(), 16 << 20);
    drop(other);
}
