//! Bodies through the proxy: every method carries one, streams both ways without waiting for
//! the end, ranges and 100-continue work, limits answer 413 up front, WebSockets tunnel.

mod support;

use bytes::Bytes;
use clearml_edge::RunningServer;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};
use support::*;
use tokio::sync::mpsc;

fn channel_body() -> (mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let stream = tokio_stream_from(rx);
    (tx, BodyExt::boxed(StreamBody::new(stream)))
}

fn tokio_stream_from(
    rx: mpsc::Receiver<Bytes>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>>
{
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (Ok(Frame::data(chunk)), rx))
    })
}

#[tokio::test]
async fn get_with_a_1mib_json_body_arrives_intact() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    let mut json = String::from("{\"ids\":[");
    while json.len() < 1 << 20 {
        json.push_str("\"0123456789abcdef\",");
    }
    json.push_str("\"end\"]}");
    let (status, _, _) = send(
        &client(),
        addr(&proxy),
        Method::GET,
        "api.example.com",
        "/v2.30/tasks.get_all",
        full(json.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let seen = cluster.api.last();
    assert_eq!(seen.method, Method::GET);
    assert_eq!(seen.body, json.as_bytes());
    assert_eq!(seen.headers["content-length"], json.len().to_string());
    assert!(!seen.headers.contains_key("content-encoding"));
}

#[tokio::test]
async fn chunked_delete_and_expect_continue_bodies_arrive() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    let answer = raw(
        addr(&proxy),
        b"DELETE /a HTTP/1.1\r\nHost: files.example.com\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert_eq!(cluster.files.last().body, "hello world");

    // curl's upload handshake: the proxy answers 100 Continue, then the body flows.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr(&proxy)).await.unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: files.example.com\r\nContent-Length: 7\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).await.unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"payload").await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert_eq!(status_of(&String::from_utf8_lossy(&rest)), 200);
    assert_eq!(cluster.files.last().body, "payload");
}

#[tokio::test]
async fn range_request_gets_its_206() {
    let upstream = Upstream::start(
        "127.0.0.1:0",
        |req: Request<hyper::body::Incoming>| async move {
            let data = b"0123456789abcdefghij";
            match req.headers().get("range").and_then(|r| r.to_str().ok()) {
                Some("bytes=0-9") => Response::builder()
                    .status(StatusCode::PARTIAL_CONTENT)
                    .header("content-range", "bytes 0-9/20")
                    .header("accept-ranges", "bytes")
                    .body(full(&data[..10]))
                    .unwrap(),
                _ => Response::new(full(&data[..])),
            }
        },
    )
    .await;
    let proxy = proxy(&config(
        &format!("[routes.files]\nport = {}\n", upstream.port()),
        &["127.0.0.1"],
        "",
    ))
    .await;
    let answer = raw(
        addr(&proxy),
        b"GET /f.bin HTTP/1.1\r\nHost: files.example.com\r\nRange: bytes=0-9\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 206, "{answer}");
    assert!(answer
        .to_ascii_lowercase()
        .contains("content-range: bytes 0-9/20"));
    assert!(answer.to_ascii_lowercase().contains("content-length: 10"));
    assert!(answer.ends_with("\r\n\r\n0123456789"), "{answer}");
}

/// A node that reports how many body bytes it has received after each chunk and answers
/// with the total, behind a proxy routing `files.` to it with `extra` configuration.
async fn counting_node_behind_proxy(
    extra: &str,
) -> (Upstream, RunningServer, mpsc::UnboundedReceiver<usize>) {
    let (seen_tx, seen_rx) = mpsc::unbounded_channel::<usize>();
    let upstream = Upstream::start("127.0.0.1:0", move |req: Request<hyper::body::Incoming>| {
        let seen_tx = seen_tx.clone();
        async move {
            let mut body = req.into_body();
            let mut total = 0usize;
            while let Some(frame) = body.frame().await {
                if let Ok(Ok(data)) = frame.map(|f| f.into_data()) {
                    total += data.len();
                    let _ = seen_tx.send(total);
                }
            }
            Response::new(full(total.to_string()))
        }
    })
    .await;
    let proxy = proxy(&config(
        &format!("[routes.files]\nport = {}\n", upstream.port()),
        &["127.0.0.1"],
        extra,
    ))
    .await;
    (upstream, proxy, seen_rx)
}

/// Starts an upload to `files.` through the proxy whose body is what the returned sender
/// sends, until it is dropped.
fn streamed_upload(
    proxy: &RunningServer,
    method: Method,
) -> (
    mpsc::Sender<Bytes>,
    tokio::task::JoinHandle<(StatusCode, hyper::HeaderMap, Bytes)>,
) {
    let (tx, body) = channel_body();
    let proxy_addr = addr(proxy);
    let request = tokio::spawn(async move {
        send(
            &client(),
            proxy_addr,
            method,
            "files.example.com",
            "/",
            body,
        )
        .await
    });
    (tx, request)
}

#[tokio::test]
async fn upload_streams_before_the_client_has_sent_the_last_byte() {
    // The node reports each chunk as it arrives; the client sends the next only after the
    // node has seen the previous one, so the test can only pass if nothing is buffered.
    let (_node, proxy, mut seen_rx) = counting_node_behind_proxy("").await;
    let (tx, request) = streamed_upload(&proxy, Method::POST);
    let chunk = Bytes::from(vec![7u8; 256 * 1024]);
    let chunks = 64; // 16 MiB in all
    for i in 1..=chunks {
        tx.send(chunk.clone()).await.unwrap();
        // Wait until the node has this chunk before sending the next.
        loop {
            let total = seen_rx.recv().await.expect("node reports progress");
            if total >= i * chunk.len() {
                break;
            }
        }
    }
    drop(tx);
    let (status, _, body) = request.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, (chunks * chunk.len()).to_string());
}

#[tokio::test]
async fn an_upload_pausing_longer_than_the_response_header_timeout_is_not_cut() {
    // The response-header timer must start only once the body is fully sent: the client
    // pauses mid-upload for three times the timeout, and the node still answers.
    let (_node, proxy, mut seen_rx) =
        counting_node_behind_proxy("[timeouts]\nupstream_response_header = \"200ms\"\n").await;
    let (tx, request) = streamed_upload(&proxy, Method::PUT);
    tx.send(Bytes::from_static(b"first half ")).await.unwrap();
    assert_eq!(
        seen_rx.recv().await,
        Some(11),
        "the node has the first half"
    );
    // The pause is the scenario under test, not a wait for an event.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    tx.send(Bytes::from_static(b"second half")).await.unwrap();
    drop(tx);
    let (status, _, body) = request.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "22");
}

#[tokio::test]
async fn download_streams_before_the_node_has_sent_the_last_byte() {
    let (release_tx, release_rx) = mpsc::channel::<Bytes>(1);
    let release_rx = std::sync::Arc::new(tokio::sync::Mutex::new(Some(release_rx)));
    let upstream = Upstream::start("127.0.0.1:0", move |_req| {
        let release_rx = release_rx.clone();
        async move {
            let rx = release_rx.lock().await.take().expect("one download");
            Response::new(BodyExt::boxed(StreamBody::new(tokio_stream_from(rx))))
        }
    })
    .await;
    let proxy = proxy(&config(
        &format!("[routes.files]\nport = {}\n", upstream.port()),
        &["127.0.0.1"],
        "",
    ))
    .await;
    let req = Request::builder()
        .uri(format!("http://{}/big.bin", addr(&proxy)))
        .header("host", "files.example.com")
        .body(full(""))
        .unwrap();
    let client = client();
    let response_fut = client.request(req);
    release_tx
        .send(Bytes::from_static(b"first-"))
        .await
        .unwrap();
    let response = response_fut.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    // The first bytes reach the client while the node still holds the rest.
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first-");
    // Read while the node sends: back-pressure would otherwise stall both ends.
    let rest = tokio::spawn(body.collect());
    for _ in 0..8 {
        release_tx
            .send(Bytes::from(vec![1u8; 1 << 20]))
            .await
            .unwrap();
    }
    drop(release_tx);
    let rest = rest.await.unwrap().unwrap().to_bytes();
    assert_eq!(rest.len(), 8 << 20);
}

#[tokio::test]
async fn body_limit_answers_413_before_the_node_sees_anything() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "max_body_bytes = 1000\n").await;
    let (status, _, body) = send(
        &client(),
        addr(&proxy),
        Method::POST,
        "api.example.com",
        "/",
        full(vec![0u8; 1001]),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(body.starts_with(b"413"));
    // A chunked body whose first chunk is already over the limit never reaches the node.
    let answer = raw(
        addr(&proxy),
        format!(
            "POST / HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n7d0\r\n{}\r\n0\r\n\r\n",
            "c".repeat(2000)
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&answer), 413, "{answer}");
    assert_eq!(
        cluster
            .api
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );

    // A body of exactly the limit passes; other routes have no limit.
    let (status, _, _) = send(
        &client(),
        addr(&proxy),
        Method::POST,
        "api.example.com",
        "/",
        full(vec![0u8; 1000]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = send(
        &client(),
        addr(&proxy),
        Method::POST,
        "files.example.com",
        "/",
        full(vec![0u8; 5000]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    // A chunked body over the limit is cut and answered 413.
    let answer = raw(
        addr(&proxy),
        format!(
            "POST / HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3e8\r\n{}\r\n3e8\r\n{}\r\n0\r\n\r\n",
            "a".repeat(1000),
            "b".repeat(1000)
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&answer), 413, "{answer}");
}

#[tokio::test]
async fn a_client_still_sending_a_refused_body_finishes_and_reads_the_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "max_body_bytes = 1000\n").await;
    let mut stream = tokio::net::TcpStream::connect(addr(&proxy)).await.unwrap();
    // Like Python's requests (the ClearML SDK's uploads): the whole body first, then the
    // answer. Far more than the sockets' buffers hold, so the proxy must read it to take it.
    let size = 32 << 20;
    let head =
        format!("POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: {size}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'x'; 64 << 10];
    for sent in (0..size).step_by(chunk.len()) {
        stream.write_all(&chunk).await.unwrap_or_else(|e| {
            panic!("the upload failed after {sent} bytes instead of being read and dropped: {e}")
        });
    }
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    assert_eq!(status_of(&String::from_utf8_lossy(&answer)), 413);
    assert_eq!(
        cluster
            .api
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    let port = websocket_echo().await;
    let proxy = proxy(&config(
        &format!("[routes.app]\nport = {port}\n"),
        &["127.0.0.1"],
        "",
    ))
    .await;
    let stream = tokio::net::TcpStream::connect(addr(&proxy)).await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async("ws://app.example.com/ws", stream)
        .await
        .expect("websocket handshake through the proxy");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    for text in ["hello", "clearml", &"x".repeat(100_000)] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    ws.close(None).await.unwrap();
}

/// An open WebSocket counts as a live connection through the shutdown drain: it keeps
/// working after the listeners closed, and the shutdown ends once it is closed.
#[tokio::test]
async fn shutdown_drains_an_open_websocket() {
    let port = websocket_echo().await;
    let proxy = proxy(&config(
        &format!("[routes.app]\nport = {port}\n"),
        &["127.0.0.1"],
        "[timeouts]\nshutdown_drain = \"60s\"\n",
    ))
    .await;
    let proxy_addr = addr(&proxy);
    let stream = tokio::net::TcpStream::connect(proxy_addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("ws://app.example.com/ws", stream)
        .await
        .expect("websocket handshake through the proxy");
    let shutdown = tokio::spawn(proxy.shutdown());
    while tokio::net::TcpStream::connect(proxy_addr).await.is_ok() {
        tokio::task::yield_now().await;
    }
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        "during the drain",
    ))
    .await
    .unwrap();
    let echoed = ws.next().await.unwrap().unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "during the drain");
    assert!(
        !shutdown.is_finished(),
        "the drain did not wait for the tunnel"
    );
    ws.close(None).await.unwrap();
    drop(ws);
    let done = tokio::time::timeout(std::time::Duration::from_secs(30), shutdown).await;
    assert!(done.is_ok(), "shutdown did not end after the tunnel closed");
}
