//! HTTP/1.1 clients as the proxy's own codec serves them: an oversize head answered with a
//! 431 the client can read, a client that half-closes after its request, a client that
//! resets while its request is at the node, pipelined requests in order, HTTP/1.0, refused
//! heads named in their body, and the fields every answer carries.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Bounds each wait so a regression fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(30);

async fn read_all(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(LIMIT, stream.read_to_end(&mut answer))
        .await
        .expect("the proxy closed the connection")
        .expect("read the answer");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn an_oversize_head_gets_a_431_the_client_can_read() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    let mut stream = TcpStream::connect(addr(&proxy)).await.unwrap();
    // Twice the default limit: the client is still writing when the proxy refuses it.
    let request = format!(
        "GET / HTTP/1.1\r\nHost: api.example.com\r\nX-Big: {}\r\n\r\n",
        "a".repeat(128 * 1024)
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("the whole head is taken");
    let answer = read_all(&mut stream).await;
    assert_eq!(status_of(&answer), 431, "{answer}");
    assert!(
        answer.ends_with("the request head is over the limit\n"),
        "{answer}"
    );
    assert!(cluster.api.seen().is_empty());
}

#[tokio::test]
async fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    let mut stream = TcpStream::connect(addr(&proxy)).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        .await
        .unwrap();
    // As `printf ... | nc -N` and some health checkers do.
    stream.shutdown().await.unwrap();
    let answer = read_all(&mut stream).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(answer.ends_with("\r\n\r\napi"), "{answer}");
}

#[tokio::test]
async fn a_client_that_half_closes_after_pipelined_requests_gets_every_answer() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    let mut stream = TcpStream::connect(addr(&proxy)).await.unwrap();
    stream
        .write_all(
            b"GET /1 HTTP/1.1\r\nHost: api.example.com\r\n\r\n\
              GET /2 HTTP/1.1\r\nHost: app.example.com\r\n\r\n\
              POST /3 HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let answer = read_all(&mut stream).await;
    // The one framed two ways is refused even behind the others.
    assert_eq!(statuses_of(&answer), ["200", "200", "400"], "{answer}");
    let targets: Vec<String> = cluster.api.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/1"]);
}

#[tokio::test]
async fn a_client_that_resets_cancels_its_request_at_the_node() {
    // A node that takes the request, never answers, and reports when the proxy lets go of
    // the connection.
    let node = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = node.local_addr().unwrap().port();
    let (got_request, request_arrived) = oneshot::channel();
    let (closed, connection_closed) = oneshot::channel();
    tokio::spawn(async move {
        let (mut conn, _) = node.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let _ = conn.read(&mut buf).await;
        let _ = got_request.send(());
        while let Ok(1..) = conn.read(&mut buf).await {}
        let _ = closed.send(());
    });
    let proxy = proxy(&config(
        &format!("[routes.api]\nport = {port}\n"),
        &["127.0.0.1"],
        "",
    ))
    .await;
    let stream = TcpStream::connect(addr(&proxy)).await.unwrap();
    let mut stream = stream;
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, request_arrived)
        .await
        .unwrap()
        .unwrap();
    // Closed for good: a reset, not a FIN.
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
    tokio::time::timeout(LIMIT, connection_closed)
        .await
        .expect("the node's connection was not closed")
        .unwrap();
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    let mut stream = TcpStream::connect(addr(&proxy)).await.unwrap();
    stream
        .write_all(
            b"GET /1 HTTP/1.1\r\nHost: api.example.com\r\n\r\n\
              POST /2 HTTP/1.1\r\nHost: files.example.com\r\nContent-Length: 3\r\n\r\nabc\
              GET /3 HTTP/1.1\r\nHost: app.example.com\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let answer = read_all(&mut stream).await;
    assert_eq!(statuses_of(&answer), ["200", "200", "200"], "{answer}");
    let bodies: Vec<&str> = answer
        .split("\r\n\r\n")
        .skip(1)
        .map(|b| &b[..b.find("HTTP").unwrap_or(b.len())])
        .collect();
    assert_eq!(bodies, ["api", "files", "app"], "{answer}");
    assert_eq!(cluster.files.last().body, "abc");
    assert!(
        answer.contains("connection: close\r\n"),
        "the last one closes: {answer}"
    );
}

#[tokio::test]
async fn an_http10_client_gets_its_answer_and_the_close() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    let mut stream = TcpStream::connect(addr(&proxy)).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: api.example.com\r\n\r\n")
        .await
        .unwrap();
    let answer = read_all(&mut stream).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(answer.contains("content-length: 3\r\n"), "{answer}");
    assert!(answer.contains("connection: close\r\n"), "{answer}");
    // Asking to keep it: the answer says it is kept, and a second request is served.
    let mut stream = TcpStream::connect(addr(&proxy)).await.unwrap();
    let keep = b"GET / HTTP/1.0\r\nHost: api.example.com\r\nConnection: keep-alive\r\n\r\n";
    stream.write_all(keep).await.unwrap();
    let (head, body) = read_response(&mut stream).await;
    assert!(head.contains("connection: keep-alive\r\n"), "{head}");
    assert_eq!(body, "api");
    stream.write_all(keep).await.unwrap();
    let (_, body) = read_response(&mut stream).await;
    assert_eq!(body, "api");
}

#[tokio::test]
async fn refused_heads_say_why_and_answers_carry_a_date() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    let answer = raw(
        addr(&proxy),
        b"POST / HTTP/1.1\r\nHost: files.example.com\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 501, "{answer}");
    assert!(
        answer.ends_with("a transfer coding other than chunked\n"),
        "{answer}"
    );
    let answer = raw(
        addr(&proxy),
        b"GET / HTTP/1.1\r\nHost: api.example.com\nX: 1\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 400, "{answer}");
    assert!(answer.ends_with("malformed request head\n"), "{answer}");
    let answer = raw(
        addr(&proxy),
        b"GET / HTTP/1.1\r\nHost: nowhere.example.org\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 404, "{answer}");
    assert!(answer.contains("\r\ndate: "), "{answer}");
    assert!(cluster.files.seen().is_empty());
}
