//! End-to-end requests through an in-process proxy to a loopback upstream, over keep-alive
//! client connections: HTTP/1.1 and cleartext HTTP/2 from the client, HTTP/1.1 to the node.
//! Reported in elements (requests) per second.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

async fn proxy(upstream: SocketAddr) -> clearml_edge::RunningServer {
    let text = format!(
        "domain = \"example.com\"\n[[listeners]]\naddress = \"127.0.0.1:0\"\n[discovery.static]\nnodes = [\"127.0.0.1\"]\n[health]\ninterval = \"1h\"\n[routes.app]\nenabled = false\n[routes.files]\nenabled = false\n[routes.api]\nport = {}\n",
        upstream.port()
    );
    let settings =
        clearml_edge::Config::parse(Path::new("bench.toml"), &text).expect("bench config");
    clearml_edge::start(settings).await.expect("proxy starts")
}

fn request(uri: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .uri(uri)
        .header("host", "api.example.com")
        .body(Empty::new())
        .expect("request")
}

fn end_to_end(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let proxy_addr = rt.block_on(async {
        let upstream = upstream().await;
        let server = proxy(upstream).await;
        let addr = server.local_addrs()[0];
        // The server lives as long as the runtime.
        std::mem::forget(server);
        addr
    });

    let mut group = c.benchmark_group("proxy");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));

    let mut h1 = rt.block_on(async {
        let stream = TcpStream::connect(proxy_addr).await.expect("connect");
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        sender
    });
    group.bench_function("http1_keepalive_get", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    h1.ready().await.expect("ready");
                    let resp = h1.send_request(request("/x")).await.expect("answer");
                    let _ = resp.into_body().collect().await.expect("body");
                }
                started.elapsed()
            })
        })
    });

    let h2 = rt.block_on(async {
        let stream = TcpStream::connect(proxy_addr).await.expect("connect");
        let _ = stream.set_nodelay(true);
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        sender
    });
    // Eight streams in flight on one HTTP/2 connection.
    group.bench_function("http2_8_streams_get", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                let per_stream = iters.div_ceil(8);
                let mut tasks = Vec::with_capacity(8);
                for _ in 0..8 {
                    let mut sender = h2.clone();
                    tasks.push(tokio::spawn(async move {
                        for _ in 0..per_stream {
                            let resp = sender
                                .send_request(request("http://api.example.com/x"))
                                .await
                                .expect("answer");
                            let _ = resp.into_body().collect().await.expect("body");
                        }
                    }));
                }
                for task in tasks {
                    task.await.expect("stream");
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, end_to_end);
criterion_main!(benches);
