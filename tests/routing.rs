//! Routing and header transparency through the real proxy to real upstreams.

mod support;

use hyper::{Method, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn each_route_reaches_its_port() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    for name in ["app", "files", "api"] {
        let (status, headers, body) = get(addr(&proxy), &format!("{name}.example.com"), "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-upstream"], name);
        assert_eq!(body, name);
    }
    assert_eq!(cluster.app.seen().len(), 1);
    assert_eq!(cluster.files.seen().len(), 1);
    assert_eq!(cluster.api.seen().len(), 1);
}

#[tokio::test]
async fn host_variants_match() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    for host in [
        "API.Example.COM",
        "api.example.com:8443",
        "api.example.com.",
        "Api.Example.Com.:443",
    ] {
        let (status, headers, _) = get(addr(&proxy), host, "/debug.ping").await;
        assert_eq!(status, StatusCode::OK, "{host}");
        assert_eq!(headers["x-upstream"], "api", "{host}");
        // The client's Host reaches the node unchanged.
        assert_eq!(cluster.api.last().headers["host"], host);
    }
}

#[tokio::test]
async fn absolute_form_target_routes_by_its_authority() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    let answer = raw(
        addr(&proxy),
        b"GET http://files.example.com/a?b=1 HTTP/1.1\r\nHost: app.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(answer.ends_with("files"), "{answer}");
    let seen = cluster.files.last();
    assert_eq!(seen.target, "/a?b=1");
    assert_eq!(seen.headers["host"], "files.example.com");
    assert!(cluster.app.seen().is_empty());
}

#[tokio::test]
async fn http2_authority_routes() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    let (status, headers, body) = h2_get(addr(&proxy), "http://APP.example.com:9443/h2?x=1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-upstream"], "app");
    assert_eq!(body, "app");
    let seen = cluster.app.last();
    assert_eq!(seen.headers["host"], "APP.example.com:9443");
    assert_eq!(seen.target, "/h2?x=1");
}

#[tokio::test]
async fn unknown_and_missing_host_are_refused_without_forwarding() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    let (status, _, body) = get(addr(&proxy), "foo.example.com", "/").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, "404 Not Found: no route for this host\n");

    let answer = raw(addr(&proxy), b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status_of(&answer), 400, "{answer}");
    assert!(answer.contains("missing Host"), "{answer}");

    let answer = raw(
        addr(&proxy),
        b"GET / HTTP/1.1\r\nHost: app.example.com\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 400, "{answer}");

    for upstream in [&cluster.app, &cluster.files, &cluster.api] {
        assert_eq!(
            upstream
                .connections
                .load(std::sync::atomic::Ordering::SeqCst),
            0
        );
    }
}

#[tokio::test]
async fn forwarded_and_hop_by_hop_headers_as_the_node_sees_them() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    let answer = raw(
        addr(&proxy),
        b"GET /x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nX-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\nAuthorization: Bearer t0k3n\r\nCookie: clearml_token_basic=abc\r\nX-ClearML-Worker: w1\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    let h = cluster.api.last().headers;
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "api.example.com");
    assert_eq!(h["authorization"], "Bearer t0k3n");
    assert_eq!(h["cookie"], "clearml_token_basic=abc");
    assert_eq!(h["x-clearml-worker"], "w1");
    for hop in ["x-hop", "keep-alive", "te", "proxy-connection", "upgrade"] {
        assert!(!h.contains_key(hop), "{hop} was forwarded");
    }
    // The node connection is the proxy's own keep-alive one, not the client's `close`.
    assert_ne!(
        h.get("connection").map(|v| v.as_bytes()),
        Some(&b"close, X-Hop"[..])
    );
}

#[tokio::test]
async fn response_headers_pass_through_and_hop_by_hop_is_stripped() {
    let upstream = Upstream::start("127.0.0.1:0", |_req| async {
        hyper::Response::builder()
            .header(
                "set-cookie",
                "a=1; Domain=.example.com; Secure; SameSite=None",
            )
            .header("set-cookie", "b=2; HttpOnly")
            .header("content-encoding", "gzip")
            .header("connection", "x-private")
            .header("x-private", "secret")
            .header("keep-alive", "timeout=3")
            .header("access-control-allow-origin", "*")
            .body(full(&b"\x1f\x8b\x08\x00compressed"[..]))
            .unwrap()
    })
    .await;
    let proxy = proxy(&config(
        &format!("[routes.api]\nport = {}\n", upstream.port()),
        &["127.0.0.1"],
        "",
    ))
    .await;
    let (status, headers, body) = get(addr(&proxy), "api.example.com", "/").await;
    assert_eq!(status, StatusCode::OK);
    let cookies: Vec<_> = headers.get_all("set-cookie").iter().collect();
    assert_eq!(
        cookies,
        [
            "a=1; Domain=.example.com; Secure; SameSite=None",
            "b=2; HttpOnly"
        ]
    );
    assert_eq!(headers["content-encoding"], "gzip");
    assert_eq!(headers["access-control-allow-origin"], "*");
    assert!(!headers.contains_key("x-private"));
    assert!(!headers.contains_key("keep-alive"));
    assert_eq!(&body[..], b"\x1f\x8b\x08\x00compressed");
}

#[tokio::test]
async fn odd_request_target_arrives_byte_for_byte() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    for target in [
        "/p/a%20b/c+d.png?download",
        "/v2.30/tasks.get_all?x=%2F%2e%2E/&y=a+b#",
        "//double//slash/../dots/./x?q=%zz",
        "/%E6%97%A5%E6%9C%AC?name=%C3%A9",
    ] {
        let target = target.trim_end_matches('#');
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: files.example.com\r\nConnection: close\r\n\r\n"
        );
        let answer = raw(addr(&proxy), request.as_bytes()).await;
        assert_eq!(status_of(&answer), 200, "{answer}");
        assert_eq!(cluster.files.last().target, target);
    }
}

#[tokio::test]
async fn options_and_every_method_reach_the_node() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    let client = client();
    for method in [
        Method::OPTIONS,
        Method::DELETE,
        Method::PUT,
        Method::PATCH,
        Method::HEAD,
    ] {
        let (status, _, _) = send(
            &client,
            addr(&proxy),
            method.clone(),
            "api.example.com",
            "/m",
            full(""),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{method}");
        assert_eq!(cluster.api.last().method, method);
    }
}

#[tokio::test]
async fn every_route_answers_on_every_listener() {
    let cluster = Cluster::echo().await;
    let text = format!(
        "domain = \"example.com\"\n[[listeners]]\naddress = \"127.0.0.1:0\"\n[[listeners]]\naddress = \"127.0.0.2:0\"\n[discovery.static]\nnodes = [\"127.0.0.1\"]\n{}",
        cluster.routes()
    );
    let proxy = proxy(&text).await;
    assert_eq!(proxy.local_addrs().len(), 2);
    for listener in proxy.local_addrs() {
        for name in ["app", "files", "api"] {
            let (status, _, body) = get(*listener, &format!("{name}.example.com"), "/").await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, name);
        }
    }
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    let client = client();
    for _ in 0..20 {
        let (status, _, _) = send(
            &client,
            addr(&proxy),
            Method::GET,
            "api.example.com",
            "/",
            full(""),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(cluster.api.seen().len(), 20);
    assert_eq!(
        cluster
            .api
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

/// A plain connection's first bytes decide HTTP/1.1 or HTTP/2; a head that trickles in byte
/// by byte (here starting with `P`, as the HTTP/2 preface does) is still HTTP/1.1, and its
/// body reaches the node whole.
#[tokio::test]
async fn request_arriving_byte_by_byte_is_routed() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    let mut stream = tokio::net::TcpStream::connect(addr(&proxy)).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let request = b"POST /up?x=1 HTTP/1.1\r\nHost: files.example.com\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
    for byte in request {
        stream.write_all(&[*byte]).await.unwrap();
        stream.flush().await.unwrap();
    }
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status_of(&answer), 200, "{answer}");
    let seen = cluster.files.last();
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.target, "/up?x=1");
    assert_eq!(seen.body, "hello");
}

/// An HTTP/2 prior-knowledge preface split over several writes is still recognised.
#[tokio::test]
async fn http2_preface_in_pieces_is_recognised() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "").await;
    let stream = tokio::net::TcpStream::connect(addr(&proxy)).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(SmallWrites(stream)),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri("http://api.example.com/split")
        .body(full(""))
        .unwrap();
    let resp = sender.send_request(req).await.expect("h2 answer");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-upstream"], "api");
    assert_eq!(cluster.api.last().target, "/split");
}

/// A client that connects and sends nothing is closed after the header timeout.
#[tokio::test]
async fn silent_connection_is_closed_after_the_header_timeout() {
    let cluster = Cluster::echo().await;
    let proxy = proxy_for(&cluster, "[timeouts]\nclient_header = \"1s\"\n").await;
    let mut stream = tokio::net::TcpStream::connect(addr(&proxy)).await.unwrap();
    let mut answer = Vec::new();
    // Returns once the proxy closes the connection; a proxy that kept it would hang here
    // until the test harness's own timeout.
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        stream.read_to_end(&mut answer),
    )
    .await;
    assert!(read.is_ok(), "the silent connection was kept open");
    assert!(answer.is_empty(), "{answer:?}");
}

/// Writes at most three bytes per call, flushing each, to split what a client sends.
struct SmallWrites(tokio::net::TcpStream);

impl tokio::io::AsyncRead for SmallWrites {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SmallWrites {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let n = buf.len().min(3);
        std::pin::Pin::new(&mut self.0).poll_write(cx, &buf[..n])
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
