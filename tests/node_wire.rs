//! What nodes send, byte for byte, and how the proxy reads it: response framings (chunked
//! with trailers, delimited by the close, HEAD, an interim 100), heads arriving in pieces,
//! ambiguous responses, a pooled connection the node closed, and a node that answers an
//! upload before it ends.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How a scripted node answers the `n`th request (from 0) on a connection: the bytes to
/// write, each written on its own with a flush between, and whether to close afterwards.
/// `None`: drop the connection without answering.
type Script = fn(n: usize, request: &[u8]) -> Option<(Vec<&'static [u8]>, bool)>;

/// A node that reads each request head (and a `Content-Length` body) and answers as
/// `script` says; counts the request heads it read.
async fn scripted_node(script: Script) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let heads = Arc::new(AtomicUsize::new(0));
    let counter = heads.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer_as_scripted(stream, script, counter.clone()));
        }
    });
    (port, heads)
}

async fn answer_as_scripted(mut stream: TcpStream, script: Script, heads: Arc<AtomicUsize>) {
    let mut seen = Vec::new();
    for n in 0.. {
        let Some(request) = read_request(&mut stream, &mut seen).await else {
            return;
        };
        heads.fetch_add(1, Ordering::SeqCst);
        let Some((pieces, close)) = script(n, &request) else {
            return;
        };
        for piece in pieces {
            if stream.write_all(piece).await.is_err() || stream.flush().await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
        if close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// One request head and its `Content-Length` body off `stream`; `None` once it closes.
async fn read_request(stream: &mut TcpStream, seen: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&seen[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap_or(0));
            if seen.len() >= end + 4 + length {
                return Some(seen.drain(..end + 4 + length).collect());
            }
        }
        let mut buf = [0u8; 16 * 1024];
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

async fn proxy_to(port: u16) -> clearml_edge::RunningServer {
    proxy(&config(
        &format!("[routes.api]\nport = {port}\n"),
        &["127.0.0.1"],
        "",
    ))
    .await
}

#[tokio::test]
async fn a_chunked_response_sent_in_pieces_arrives_whole_with_its_trailers() {
    let (port, _) = scripted_node(|_, _| {
        Some((
            vec![
                b"HTTP/1.1 200 OK\r\nTrans",
                b"fer-Encoding: chunked\r\nX-Node: 1\r",
                b"\n\r\n5\r\nhel",
                b"lo\r\n6;ext=1\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n",
            ],
            false,
        ))
    })
    .await;
    let proxy = proxy_to(port).await;
    // HTTP/2 carries trailers to the client; HTTP/1.1 the data.
    let mut sender = h2_sender(addr(&proxy)).await;
    let request = Request::get("http://api.example.com/x")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-node"], "1");
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["x-checksum"], "abc");
    assert_eq!(collected.to_bytes(), "hello world");

    let (status, _, body) = get(addr(&proxy), "api.example.com", "/x").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello world"[..]));
}

async fn h2_sender(
    proxy: std::net::SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>> {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

#[tokio::test]
async fn a_response_delimited_by_the_close_is_forwarded_whole() {
    let (port, _) = scripted_node(|_, _| {
        Some((
            vec![
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n",
                b"all of ",
                b"it",
            ],
            true,
        ))
    })
    .await;
    let proxy = proxy_to(port).await;
    let (status, _, body) = get(addr(&proxy), "api.example.com", "/x").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"all of it"[..]));
}

#[tokio::test]
async fn an_interim_100_is_not_forwarded_and_head_keeps_its_length() {
    let (port, heads) = scripted_node(|_, request| {
        if request.starts_with(b"HEAD") {
            return Some((
                vec![b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"],
                false,
            ));
        }
        Some((
            vec![
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
            ],
            false,
        ))
    })
    .await;
    let proxy = proxy_to(port).await;
    let answer = raw(
        addr(&proxy),
        b"HEAD /a HTTP/1.1\r\nHost: api.example.com\r\n\r\nPOST /b HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    .await;
    assert_eq!(statuses_of(&answer), ["200", "201"], "{answer}");
    assert!(
        answer.to_lowercase().contains("content-length: 1000\r\n"),
        "{answer}"
    );
    assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
    assert_eq!(heads.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_response_framed_two_ways_is_502() {
    let (port, _) = scripted_node(|_, _| {
        Some((
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"],
            false,
        ))
    })
    .await;
    let proxy = proxy_to(port).await;
    let (status, _, body) = get(addr(&proxy), "api.example.com", "/x").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body, "502 Bad Gateway: the node failed to answer\n");
}

/// Answers the first request on each connection and drops it on the second, unanswered.
fn answer_first_drop_second(n: usize, _: &[u8]) -> Option<(Vec<&'static [u8]>, bool)> {
    (n == 0).then(|| {
        (
            vec![&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"[..]],
            false,
        )
    })
}

#[tokio::test]
async fn a_pooled_connection_the_node_closed_is_replaced_without_an_error() {
    // Each connection answers its first request and drops on the second unanswered: what
    // a node closing an idle keep-alive connection looks like when a request crosses it.
    let (port, heads) = scripted_node(answer_first_drop_second).await;
    let proxy = proxy_to(port).await;
    for _ in 0..3 {
        let (status, _, body) = get(addr(&proxy), "api.example.com", "/x").await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    }
    // Requests after the first crossed a closed connection once each, then went again.
    assert_eq!(heads.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn a_node_answering_an_http2_upload_early_stops_the_upload() {
    let (port, _) = scripted_node(|_, _| {
        Some((
            vec![b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nnope"],
            false,
        ))
    })
    .await;
    let proxy = proxy_to(port).await;
    let stream = TcpStream::connect(addr(&proxy)).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let body = StreamBody::new(tokio_stream_of(rx));
    // The node reads heads only (no Content-Length here: the body is chunked to it).
    let request = Request::builder()
        .method(Method::POST)
        .uri("http://api.example.com/upload")
        .body(body)
        .unwrap();
    let response = tokio::spawn(async move { sender.send_request(request).await });
    tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 64 * 1024]))))
        .await
        .unwrap();
    let response = response.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "nope"
    );
    // The proxy resets the stream after its answer: the client is soon told to stop,
    // long before 64 MiB have gone.
    let sent = tokio::time::timeout(Duration::from_secs(30), async {
        let mut sent = 0usize;
        while sent < 1024
            && tx
                .send(Ok(Frame::data(Bytes::from(vec![b'x'; 64 * 1024]))))
                .await
                .is_ok()
        {
            sent += 1;
        }
        sent
    })
    .await
    .expect("the upload was neither taken nor stopped");
    assert!(sent < 1024, "the whole upload was taken after the answer");
}

fn tokio_stream_of<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn a_post_the_node_closed_on_is_not_sent_again() {
    // As above, but the request crossing the close is a POST: the node may have acted on it
    // before it went away, so it is not repeated (the SDK retries the 502 itself).
    let (port, heads) = scripted_node(answer_first_drop_second).await;
    let proxy = proxy_to(port).await;
    let (status, _, _) = get(addr(&proxy), "api.example.com", "/warm").await;
    assert_eq!(status, StatusCode::OK);
    let answer = raw(
        addr(&proxy),
        b"POST /tasks.create HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 502, "{answer}");
    assert_eq!(
        heads.load(Ordering::SeqCst),
        2,
        "the POST reached the node once"
    );
}

#[tokio::test]
async fn a_pooled_connection_times_out_like_a_new_one() {
    // The response-header timer is the connection's own, set again for each exchange: on
    // the second request of a kept connection it still fires.
    let (port, heads) = scripted_node(|n, _| {
        let answer: Vec<&'static [u8]> = if n == 0 {
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
        } else {
            vec![] // never answers
        };
        Some((answer, false))
    })
    .await;
    let proxy = proxy(&config(
        &format!("[routes.api]\nport = {port}\n"),
        &["127.0.0.1"],
        "[timeouts]\nupstream_response_header = \"300ms\"\n",
    ))
    .await;
    let (status, _, _) = get(addr(&proxy), "api.example.com", "/first").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = get(addr(&proxy), "api.example.com", "/second").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(body.starts_with(b"504 Gateway Timeout"));
    assert_eq!(
        heads.load(Ordering::SeqCst),
        2,
        "each reached the node once"
    );
}
