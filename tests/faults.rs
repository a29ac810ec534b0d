//! Errors and lifecycle: dead and stalled nodes, oversize and smuggling-shaped requests, an
//! empty pool, graceful shutdown, and node lists swapped under load.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::{Method, Response, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

#[tokio::test]
async fn upstream_down_is_502() {
    let port = closed_port().await;
    let proxy = proxy(&config(
        &format!("[routes.api]\nport = {port}\n"),
        &["127.0.0.1"],
        "",
    ))
    .await;
    let (status, _, body) = get(addr(&proxy), "api.example.com", "/debug.ping").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body, "502 Bad Gateway: could not connect to a node\n");
}

#[tokio::test]
async fn upstream_stalled_is_504() {
    let (stalled, _task) = stalled_upstream().await;
    let proxy = proxy(&config(
        &format!("[routes.api]\nport = {}\n", stalled.port()),
        &["127.0.0.1"],
        "[timeouts]\nupstream_response_header = \"300ms\"\n",
    ))
    .await;
    let (status, _, body) = get(addr(&proxy), "api.example.com", "/tasks.get_all").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(body.starts_with(b"504 Gateway Timeout"));
}

#[tokio::test]
async fn empty_pool_is_503_with_retry_after() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    proxy.publisher().publish_nodes(&[]);
    let (status, headers, _) = get(addr(&proxy), "app.example.com", "/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "5");
    proxy.publisher().publish_nodes(&["127.0.0.1".into()]);
    let (status, _, _) = get(addr(&proxy), "app.example.com", "/").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn oversize_headers_are_431() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "[limits]\nmax_request_header_bytes = 8192\n").await;
    let request = format!(
        "GET / HTTP/1.1\r\nHost: app.example.com\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let answer = raw(addr(&proxy), request.as_bytes()).await;
    assert_eq!(status_of(&answer), 431, "{answer}");
    assert_eq!(cluster.app.connections.load(Ordering::SeqCst), 0);
    // Under the limit passes.
    let request = format!(
        "GET / HTTP/1.1\r\nHost: app.example.com\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(7000)
    );
    assert_eq!(status_of(&raw(addr(&proxy), request.as_bytes()).await), 200);
}

#[tokio::test]
async fn smuggling_shapes_are_400_and_never_reach_a_node() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    let shapes: [&[u8]; 7] = [
        // (Content-Length with Transfer-Encoding: see the test below.)
        // Conflicting Content-Lengths.
        b"POST / HTTP/1.1\r\nHost: files.example.com\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST / HTTP/1.1\r\nHost: files.example.com\r\nContent-Length: 5, 6\r\n\r\nhello!",
        // Bad chunk sizes.
        b"POST / HTTP/1.1\r\nHost: files.example.com\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: files.example.com\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
        // A transfer coding that does not end in chunked.
        b"POST / HTTP/1.1\r\nHost: files.example.com\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        // Whitespace before the colon, and a signed length.
        b"POST / HTTP/1.1\r\nHost: files.example.com\r\nContent-Length : 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: files.example.com\r\nContent-Length: +5\r\n\r\nhello",
    ];
    for shape in shapes {
        let answer = raw(addr(&proxy), shape).await;
        assert_eq!(
            status_of(&answer),
            400,
            "{}\n=> {answer}",
            String::from_utf8_lossy(shape)
        );
    }
    assert_eq!(cluster.files.connections.load(Ordering::SeqCst), 0);
    assert!(cluster.files.seen().is_empty());
}

/// A head with both Content-Length and Transfer-Encoding is refused, first on a connection
/// or after keep-alive requests with sized and chunked bodies, and nothing reaches the node.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_400() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    let both_orders: [&[u8]; 2] = [
        b"POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    ];
    for shape in both_orders {
        let answer = raw(addr(&proxy), shape).await;
        assert_eq!(status_of(&answer), 400, "{answer}");
        assert!(answer.contains("both Content-Length and Transfer-Encoding"));
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    }
    assert!(cluster.api.seen().is_empty());

    // Third request on a keep-alive connection, after a sized and a chunked body that
    // themselves contain framing words.
    let stream = [
        b"POST /1 HTTP/1.1\r\nHost: files.example.com\r\nContent-Length: 30\r\n\r\nTransfer-Encoding: chunked\r\n\r\n".as_slice(),
        b"POST /2 HTTP/1.1\r\nHost: files.example.com\r\nTransfer-Encoding: chunked\r\n\r\n13\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        both_orders[0],
    ]
    .concat();
    let answer = raw(addr(&proxy), &stream).await;
    assert_eq!(statuses_of(&answer), ["200", "200", "400"], "{answer}");
    let targets: Vec<String> = cluster.files.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/1", "/2"]);
}

/// A request refused before reaching a node (no route for its host) still counts on the
/// connection, so the raw-stream watcher's verdict on the next head is matched to the
/// right request.
#[tokio::test]
async fn an_ambiguous_head_after_a_refused_request_is_still_400() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    let stream = [
        b"GET / HTTP/1.1\r\nHost: nowhere.example.org\r\n\r\n".as_slice(),
        b"POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ]
    .concat();
    let answer = raw(addr(&proxy), &stream).await;
    assert_eq!(statuses_of(&answer), ["404", "400"], "{answer}");
    assert!(cluster.api.seen().is_empty());
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    let release = Arc::new(Notify::new());
    let arrived = Arc::new(Notify::new());
    let (r, a) = (release.clone(), arrived.clone());
    let upstream = Upstream::start("127.0.0.1:0", move |_req| {
        let (r, a) = (r.clone(), a.clone());
        async move {
            a.notify_one();
            r.notified().await;
            Response::new(full("finished"))
        }
    })
    .await;
    let proxy = proxy(&config(
        &format!("[routes.files]\nport = {}\n", upstream.port()),
        &["127.0.0.1"],
        "",
    ))
    .await;
    let proxy_addr = addr(&proxy);
    let in_flight =
        tokio::spawn(async move { get(proxy_addr, "files.example.com", "/slow").await });
    arrived.notified().await;
    let shutdown = tokio::spawn(proxy.shutdown());
    // New connections are refused once the listener is closed.
    loop {
        if tokio::net::TcpStream::connect(proxy_addr).await.is_err() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(!shutdown.is_finished());
    release.notify_one();
    let (status, _, body) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "finished");
    shutdown.await.unwrap();
}

/// Connections with nothing in flight do not hold up a shutdown: one that has not sent a
/// byte and one idle after a request are both closed at once, though the header timeout
/// and the drain are a minute. (On a listener that defers accepting, the default, a client
/// that has sent nothing is still the kernel's, not the proxy's: it is dropped with the
/// listener and learns so from a reset when it sends.)
#[tokio::test]
async fn shutdown_closes_silent_and_idle_connections_at_once() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_accepting_at_once(
        &cluster,
        "[timeouts]\nclient_header = \"60s\"\nshutdown_drain = \"60s\"\n",
    )
    .await;
    let proxy_addr = addr(&proxy);
    let mut silent = tokio::net::TcpStream::connect(proxy_addr).await.unwrap();
    let mut idle = tokio::net::TcpStream::connect(proxy_addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 512];
    let n = idle.read(&mut answer).await.unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"));
    // Bounded only so a regression fails instead of hanging; a proxy that waited for these
    // connections would take the full minute.
    let done = tokio::time::timeout(std::time::Duration::from_secs(30), proxy.shutdown()).await;
    assert!(
        done.is_ok(),
        "shutdown waited for connections with nothing in flight"
    );
    let mut rest = Vec::new();
    assert_eq!(silent.read_to_end(&mut rest).await.unwrap(), 0);
    let _ = idle.read_to_end(&mut rest).await;
}

#[tokio::test]
async fn node_list_swapped_under_load_loses_no_request() {
    // Two nodes on the same port: 127.0.0.1 and 127.0.0.2 (both loopback).
    let first = Upstream::echo("127.0.0.1:0", "node-1").await;
    let second = match Upstream::try_echo_at(&format!("127.0.0.2:{}", first.port()), "node-2").await
    {
        Some(u) => u,
        None => return, // port taken on the second address: nothing to test against
    };
    let proxy = proxy(&config(
        &format!("[routes.api]\nport = {}\n", first.port()),
        &["127.0.0.1"],
        "",
    ))
    .await;
    let proxy_addr = addr(&proxy);
    let mut workers = Vec::new();
    for _ in 0..4 {
        workers.push(tokio::spawn(async move {
            let client = client();
            let mut bodies = Vec::new();
            for _ in 0..100 {
                let (status, _, body) = send(
                    &client,
                    proxy_addr,
                    Method::POST,
                    "api.example.com",
                    "/",
                    full("x"),
                )
                .await;
                assert_eq!(status, StatusCode::OK);
                bodies.push(body);
            }
            bodies
        }));
    }
    let lists: [&[&str]; 3] = [&["127.0.0.2"], &["127.0.0.1", "127.0.0.2"], &["127.0.0.1"]];
    for round in 0..60 {
        let nodes: Vec<String> = lists[round % 3].iter().map(|s| s.to_string()).collect();
        proxy.publisher().publish_nodes(&nodes);
        tokio::task::yield_now().await;
    }
    let mut total = 0;
    for worker in workers {
        total += worker.await.expect("no request failed").len();
    }
    assert_eq!(total, 400);
    assert_eq!(first.seen().len() + second.seen().len(), 400);
}
