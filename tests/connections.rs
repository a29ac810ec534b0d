//! Client connections: how they are accepted (deferred until the client sends, or at once),
//! and between requests: an idle HTTP/1.1 keep-alive connection is parked (hyper's buffers
//! given up, the next request awaited with none) and serves its next requests as before,
//! pipelined ones and upgrades with early bytes included.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bounds each wait so a regression fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(30);

fn get_request(path: &str, host: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")
}

/// Sends one GET on `stream` and reads its response, which must be a 200.
async fn get_ok(stream: &mut TcpStream, path: &str, host: &str) -> (String, String) {
    stream
        .write_all(get_request(path, host).as_bytes())
        .await
        .unwrap();
    let (head, body) = read_response(stream).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    (head, body)
}

#[tokio::test]
async fn an_idle_connection_parks_and_serves_its_next_requests() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "[admin]\naddress = \"127.0.0.1:0\"\n").await;
    let mut stream = TcpStream::connect(addr(&proxy)).await.unwrap();
    let (head, body) = get_ok(&mut stream, "/one", "api.example.com").await;
    assert!(!head.contains("connection: close"), "{head}");
    assert_eq!(body, "api");
    until_parked(&proxy, 1.0).await;

    // The next request on the parked connection, then two pipelined in one write (the
    // second is read ahead with the first and must be served from what was read).
    get_ok(&mut stream, "/two", "api.example.com").await;
    let pipelined = [
        get_request("/three", "api.example.com"),
        get_request("/four", "files.example.com"),
    ]
    .concat();
    stream.write_all(pipelined.as_bytes()).await.unwrap();
    let (_, first) = read_response(&mut stream).await;
    let (head, second) = read_response(&mut stream).await;
    assert_eq!((first.as_str(), second.as_str()), ("api", "files"));
    assert!(!head.contains("connection: close"), "{head}");
    until_parked(&proxy, 1.0).await;

    // Half a head arrives while parked, the rest later: one request all the same.
    stream.write_all(b"GET /five HTTP/1.1\r\nHo").await.unwrap();
    until_parked(&proxy, 0.0).await;
    stream
        .write_all(b"st: api.example.com\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut stream).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let targets: Vec<String> = cluster.api.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/one", "/two", "/three", "/five"]);
    assert_eq!(cluster.files.seen()[0].target, "/four");

    // A client that closes a parked connection ends it.
    until_parked(&proxy, 1.0).await;
    drop(stream);
    until_parked(&proxy, 0.0).await;
}

/// A WebSocket handshake on a connection that was parked, with the client's first frame in
/// the same write: the frame was read ahead with the head and must reach the node.
#[tokio::test]
async fn an_upgrade_after_parking_carries_the_bytes_read_ahead() {
    let ws_port = websocket_echo().await;
    let api = Upstream::echo("127.0.0.1:0", "api").await;
    let proxy = proxy(&config(
        &format!(
            "[routes.app]\nport = {ws_port}\n[routes.api]\nport = {}\n",
            api.port()
        ),
        &["127.0.0.1"],
        "[admin]\naddress = \"127.0.0.1:0\"\n",
    ))
    .await;
    let mut stream = TcpStream::connect(addr(&proxy)).await.unwrap();
    get_ok(&mut stream, "/", "api.example.com").await;
    until_parked(&proxy, 1.0).await;

    // A masked text frame "hi" (mask key zero) right behind the handshake.
    let frame = [0x81, 0x82, 0, 0, 0, 0, b'h', b'i'];
    let handshake = "GET /ws HTTP/1.1\r\nHost: app.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    stream
        .write_all(&[handshake.as_bytes(), &frame].concat())
        .await
        .unwrap();
    let (head, _) = read_response(&mut stream).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
    let mut echoed = [0u8; 4];
    tokio::time::timeout(LIMIT, stream.read_exact(&mut echoed))
        .await
        .expect("echo within the limit")
        .unwrap();
    assert_eq!(echoed, [0x81, 0x02, b'h', b'i']);
}

/// A parked connection has nothing in flight: a shutdown closes it at once (with a FIN),
/// though the keep-alive wait and the drain are a minute.
#[tokio::test]
async fn shutdown_closes_a_parked_connection_at_once() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(
        &cluster,
        "[admin]\naddress = \"127.0.0.1:0\"\n\
         [timeouts]\nclient_header = \"60s\"\nshutdown_drain = \"60s\"\n",
    )
    .await;
    let mut stream = TcpStream::connect(addr(&proxy)).await.unwrap();
    get_ok(&mut stream, "/", "api.example.com").await;
    until_parked(&proxy, 1.0).await;
    // Bounded only so a regression fails instead of hanging: a proxy that waited for the
    // parked connection would take the full minute.
    let done = tokio::time::timeout(LIMIT, proxy.shutdown()).await;
    assert!(done.is_ok(), "shutdown waited for a parked connection");
    let mut rest = Vec::new();
    assert_eq!(stream.read_to_end(&mut rest).await.unwrap(), 0);
}

/// A listener with `defer_accept = false` takes connections as soon as they open: HTTP/1.1,
/// HTTP/2 with prior knowledge and a silent client all behave as on a deferring listener
/// (the default, which the other tests use).
#[tokio::test]
async fn a_listener_that_accepts_at_once_serves_as_a_deferring_one_does() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_accepting_at_once(&cluster, "[timeouts]\nclient_header = \"1s\"\n").await;
    let mut stream = TcpStream::connect(addr(&proxy)).await.unwrap();
    let (head, _) = get_ok(&mut stream, "/first", "api.example.com").await;
    assert!(head.contains("x-upstream: api"), "{head}");
    get_ok(&mut stream, "/second", "files.example.com").await;
    assert_eq!(cluster.files.last().target, "/second");

    let (status, headers, _) = h2_get(addr(&proxy), "http://app.example.com/h2").await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-upstream"], "app");

    // Accepted at once, it meets the header timeout and is closed without an answer.
    let mut silent = TcpStream::connect(addr(&proxy)).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(LIMIT, silent.read_to_end(&mut answer))
        .await
        .expect("the silent connection was kept open")
        .unwrap();
    assert!(answer.is_empty(), "{answer:?}");
}
