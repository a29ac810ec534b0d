//! Balancing, health checks, retries and draining with real nodes on 127.0.0.1-3 under a
//! bounded load from the test.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, Request, Response, StatusCode};
use support::*;

/// Safety net so a bug fails instead of hanging; never an assertion on speed.
const LIMIT: Duration = Duration::from_secs(30);

/// Echo upstreams named node-1..n on 127.0.0.1..n, one shared port.
async fn echo_nodes(n: usize) -> Vec<Upstream> {
    const NAMES: [&str; 3] = ["node-1", "node-2", "node-3"];
    'retry: loop {
        let first = Upstream::echo("127.0.0.1:0", NAMES[0]).await;
        let port = first.port();
        let mut nodes = vec![first];
        for (i, name) in NAMES.iter().enumerate().take(n).skip(1) {
            match Upstream::try_echo_at(&format!("127.0.0.{}:{port}", i + 1), name).await {
                Some(u) => nodes.push(u),
                None => continue 'retry,
            }
        }
        return nodes;
    }
}

fn config_for(port: u16, nodes: &[&str], extra: &str) -> String {
    let nodes: Vec<String> = nodes.iter().map(|n| format!("{n:?}")).collect();
    format!(
        "domain = \"example.com\"\n[[listeners]]\naddress = \"127.0.0.1:0\"\n[discovery.static]\nnodes = [{}]\n{extra}\n[routes.api]\nport = {port}\n[routes.app]\nenabled = false\n[routes.files]\nenabled = false\n",
        nodes.join(", ")
    )
}

/// Runs `workers` loops of GETs until `stop`; returns (succeeded, failed statuses).
fn load(
    proxy: std::net::SocketAddr,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<StatusCode>)> {
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let client = client();
                let (mut ok, mut failed) = (0, Vec::new());
                // Bounded: at most 5000 requests per worker.
                for _ in 0..5000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let (status, _, _) = send(
                        &client,
                        proxy,
                        Method::GET,
                        "api.example.com",
                        "/x",
                        full(""),
                    )
                    .await;
                    if status == StatusCode::OK {
                        ok += 1;
                    } else {
                        failed.push(status);
                    }
                }
                (ok, failed)
            }));
        }
        let (mut ok, mut failed) = (0, Vec::new());
        for t in tasks {
            let (o, f) = t.await.expect("worker");
            ok += o;
            failed.extend(f);
        }
        (ok, failed)
    })
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    tokio::time::timeout(LIMIT, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

fn backend_healthy(proxy: &clearml_edge::RunningServer, node: &str) -> bool {
    let snapshot = proxy.publisher().current();
    let api = snapshot.table.lookup("api.example.com").expect("api route");
    snapshot
        .pool(api)
        .backends
        .iter()
        .find(|b| &*b.node == node)
        .is_some_and(|b| b.is_healthy())
}

#[tokio::test]
async fn a_node_killed_under_load_fails_no_get() {
    let nodes = echo_nodes(3).await;
    let proxy = proxy(&config_for(
        nodes[0].port(),
        &["127.0.0.1", "127.0.0.2", "127.0.0.3"],
        "[health]\ninterval = \"1h\"\n",
    ))
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(addr(&proxy), 8, stop.clone());
    // Let the load reach every node, then crash one mid-flight.
    wait_until("traffic on every node", || {
        nodes.iter().all(|n| n.seen().len() >= 20)
    })
    .await;
    nodes[1].kill();
    let after_kill: Vec<usize> = nodes.iter().map(|n| n.seen().len()).collect();
    wait_until("more traffic after the kill", || {
        nodes[0].seen().len() + nodes[2].seen().len() >= after_kill[0] + after_kill[2] + 400
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = running.await.unwrap();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(ok > 400);
}

#[tokio::test]
async fn a_stalled_node_is_taken_out_by_the_health_check() {
    let healthy = Upstream::echo("127.0.0.1:0", "node-1").await;
    let port = healthy.port();
    let Ok(stalled) = tokio::net::TcpListener::bind(format!("127.0.0.2:{port}")).await else {
        return; // port taken on the second address
    };
    let _held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = stalled.accept().await {
            held.push(s);
        }
    });
    let proxy = proxy(&config_for(
        port,
        &["127.0.0.1", "127.0.0.2"],
        "[admin]\naddress = \"127.0.0.1:0\"\n[health]\ninterval = \"50ms\"\ntimeout = \"100ms\"\nfall = 2\n[timeouts]\nupstream_response_header = \"500ms\"\n",
    ))
    .await;
    wait_until("the stalled node marked unhealthy", || {
        !backend_healthy(&proxy, "127.0.0.2")
    })
    .await;
    assert!(backend_healthy(&proxy, "127.0.0.1"));
    // The admin view says the same.
    let (status, _, body) = send(
        &client(),
        proxy.admin_addr().expect("admin"),
        Method::GET,
        "localhost",
        "/backends",
        full(""),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let view: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    let nodes = &view["routes"][0]["nodes"];
    assert_eq!(view["routes"][0]["route"], "api");
    assert_eq!(nodes[0]["node"], "127.0.0.1");
    assert_eq!(nodes[0]["healthy"], true);
    assert_eq!(nodes[1]["node"], "127.0.0.2");
    assert_eq!(nodes[1]["healthy"], false);
    assert_eq!(nodes[1]["source"], "static");
    assert_eq!(nodes[0]["in_flight"], 0);
    for _ in 0..50 {
        let (status, _, body) = get(addr(&proxy), "api.example.com", "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "node-1");
    }
}

#[tokio::test]
async fn a_restarted_node_gets_traffic_after_the_rise_threshold() {
    let nodes = echo_nodes(2).await;
    let port = nodes[0].port();
    let proxy = proxy(&config_for(
        port,
        &["127.0.0.1", "127.0.0.2"],
        "[health]\ninterval = \"50ms\"\ntimeout = \"500ms\"\nfall = 2\nrise = 2\n[balancing]\nalgorithm = \"round_robin\"\n",
    ))
    .await;
    nodes[1].kill();
    wait_until("the dead node marked unhealthy", || {
        !backend_healthy(&proxy, "127.0.0.2")
    })
    .await;
    for _ in 0..6 {
        let (status, _, body) = get(addr(&proxy), "api.example.com", "/").await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"node-1"[..]));
    }
    let restarted = Upstream::echo(&format!("127.0.0.2:{port}"), "node-2").await;
    wait_until("the restarted node healthy", || {
        backend_healthy(&proxy, "127.0.0.2")
    })
    .await;
    let mut answered = Vec::new();
    for _ in 0..6 {
        let (_, _, body) = get(addr(&proxy), "api.example.com", "/").await;
        answered.push(String::from_utf8_lossy(&body).into_owned());
    }
    assert!(answered.iter().any(|a| a == "node-2"), "{answered:?}");
    drop(restarted);
}

#[tokio::test]
async fn every_node_down_is_a_quick_502_with_a_clear_body() {
    let port = closed_port().await;
    let proxy = proxy(&config_for(
        port,
        &["127.0.0.1", "127.0.0.2", "127.0.0.3"],
        "",
    ))
    .await;
    for _ in 0..5 {
        let (status, _, body) = get(addr(&proxy), "api.example.com", "/").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(body, "502 Bad Gateway: could not connect to a node\n");
    }
}

#[tokio::test]
async fn an_upload_is_never_replayed() {
    // Both nodes read part of the body, then reset.
    let Some((first, attempts_1)) = resetting_upstream("127.0.0.1:0", 1000).await else {
        panic!("bind");
    };
    let Some((_, attempts_2)) =
        resetting_upstream(&format!("127.0.0.2:{}", first.port()), 1000).await
    else {
        return;
    };
    let proxy = proxy(&config_for(first.port(), &["127.0.0.1", "127.0.0.2"], "")).await;
    for method in [Method::POST, Method::PUT] {
        let (status, _, body) = send(
            &client(),
            addr(&proxy),
            method,
            "api.example.com",
            "/upload",
            full(vec![b'x'; 1 << 20]),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(body, "502 Bad Gateway: the node failed to answer\n");
    }
    // Exactly one attempt per request reached a node.
    assert_eq!(
        attempts_1.load(Ordering::SeqCst) + attempts_2.load(Ordering::SeqCst),
        2
    );
}

#[tokio::test]
async fn a_reset_get_is_retried_once_and_the_budget_caps_retries() {
    let Some((first, resets)) = resetting_upstream("127.0.0.1:0", 0).await else {
        panic!("bind");
    };
    let Some((_, resets_2)) = resetting_upstream(&format!("127.0.0.2:{}", first.port()), 0).await
    else {
        return;
    };
    let proxy = proxy(&config_for(
        first.port(),
        &["127.0.0.1", "127.0.0.2"],
        "[balancing]\nretry_budget_percent = 0\n",
    ))
    .await;
    for _ in 0..30 {
        let (status, _, _) = get(addr(&proxy), "api.example.com", "/").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
    }
    // 30 first attempts, and retries only while the reserve of 10 tokens lasts.
    assert_eq!(
        resets.load(Ordering::SeqCst) + resets_2.load(Ordering::SeqCst),
        40
    );
}

#[tokio::test]
async fn p2c_sends_less_to_the_slower_node() {
    let fast_count = Arc::new(AtomicUsize::new(0));
    let slow_count = Arc::new(AtomicUsize::new(0));
    let f = fast_count.clone();
    let fast = Upstream::start(
        "127.0.0.1:0",
        move |_req: Request<hyper::body::Incoming>| {
            f.fetch_add(1, Ordering::SeqCst);
            async { Response::new(full("fast")) }
        },
    )
    .await;
    let s = slow_count.clone();
    let Some(_slow) = Upstream::try_start(
        &format!("127.0.0.2:{}", fast.port()),
        move |_req: Request<hyper::body::Incoming>| {
            s.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Response::new(full("slow"))
            }
        },
    )
    .await
    else {
        return;
    };
    let proxy = proxy(&config_for(
        fast.port(),
        &["127.0.0.1", "127.0.0.2"],
        "[health]\ninterval = \"1h\"\n",
    ))
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(addr(&proxy), 8, stop.clone());
    wait_until("600 requests", || {
        fast_count.load(Ordering::SeqCst) + slow_count.load(Ordering::SeqCst) >= 600
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let (_, failed) = running.await.unwrap();
    assert!(failed.is_empty());
    let (fast_n, slow_n) = (
        fast_count.load(Ordering::SeqCst),
        slow_count.load(Ordering::SeqCst),
    );
    assert!(slow_n * 2 < fast_n, "fast {fast_n}, slow {slow_n}");
}
