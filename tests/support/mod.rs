//! Test parts: real upstream servers on 127.0.0.1 (hyper), a proxy started in-process from a
//! config text, and clients (hyper, raw TCP, WebSocket). No mocks: every byte crosses a socket.

#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use clearml_edge::{Config, RunningServer};

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

/// What an upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    /// The request target exactly as it arrived.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A real HTTP/1.1 server on 127.0.0.x whose handler the test chooses.
pub struct Upstream {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    /// Open connection tasks, so `kill` can drop them like a crashed node would.
    live: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub arrived: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Starts an upstream on `addr` (port 0 for any) with `handler`.
    pub async fn start<H, F>(addr: &str, handler: H) -> Upstream
    where
        H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        Self::try_start(addr, handler).await.expect("bind upstream")
    }

    /// Like `start`, but `None` when the address cannot be bound.
    pub async fn try_start<H, F>(addr: &str, handler: H) -> Option<Upstream>
    where
        H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind(addr).await.ok()?;
        let addr = listener.local_addr().expect("upstream addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let counter = connections.clone();
        let live: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let live_conns = live.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                let conn = tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(handler(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
                live_conns.lock().unwrap().push(conn.abort_handle());
            }
        });
        Some(Upstream {
            addr,
            connections,
            live,
            seen: Arc::new(Mutex::new(Vec::new())),
            arrived: Arc::new(Notify::new()),
            task,
        })
    }

    /// An upstream that records every request (with its whole body) and answers 200 with
    /// its `name` as body and in `x-upstream`.
    pub async fn echo(addr: &str, name: &'static str) -> Upstream {
        Self::try_echo_at(addr, name).await.expect("bind upstream")
    }

    /// Like `echo`, but `None` when the address cannot be bound.
    pub async fn try_echo_at(addr: &str, name: &'static str) -> Option<Upstream> {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(Notify::new());
        let (s, a) = (seen.clone(), arrived.clone());
        let mut upstream = Upstream::try_start(addr, move |req: Request<Incoming>| {
            let (s, a) = (s.clone(), a.clone());
            async move {
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                s.lock().unwrap().push(Seen {
                    method: parts.method,
                    target: parts.uri.to_string(),
                    headers: parts.headers,
                    body,
                });
                a.notify_waiters();
                Response::builder()
                    .header("x-upstream", name)
                    .body(full(name))
                    .unwrap()
            }
        })
        .await?;
        upstream.seen = seen;
        upstream.arrived = arrived;
        Some(upstream)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.seen().pop().expect("upstream saw a request")
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn stop(&self) {
        self.task.abort();
    }

    /// Crashes the node: stops accepting and drops every open connection mid-flight.
    pub fn kill(&self) {
        self.task.abort();
        for conn in self.live.lock().unwrap().drain(..) {
            conn.abort();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The three ClearML routes on `example.com`, each to its own upstream port.
pub struct Cluster {
    pub app: Upstream,
    pub files: Upstream,
    pub api: Upstream,
}

impl Cluster {
    pub async fn echo() -> Cluster {
        Cluster {
            app: Upstream::echo("127.0.0.1:0", "app").await,
            files: Upstream::echo("127.0.0.1:0", "files").await,
            api: Upstream::echo("127.0.0.1:0", "api").await,
        }
    }

    /// Route tables pointing at this cluster's ports, for a config text.
    pub fn routes(&self) -> String {
        format!(
            "[routes.app]\nport = {}\n[routes.files]\nport = {}\n[routes.api]\nport = {}\n",
            self.app.port(),
            self.files.port(),
            self.api.port()
        )
    }
}

/// Starts the proxy from config text; the listener binds 127.0.0.1:0.
pub async fn proxy(config: &str) -> RunningServer {
    let settings = Config::parse(Path::new("test.toml"), config).expect("test config is valid");
    clearml_edge::start(settings).await.expect("proxy starts")
}

/// Health checks far apart, so probes never mix with what a test counts; the health tests
/// set their own.
pub const HEALTH: &str = "[health]\ninterval = \"1h\"\n";

/// A config with one local listener, the given routes and nodes, and `extra` appended.
pub fn config(routes: &str, nodes: &[&str], extra: &str) -> String {
    let nodes: Vec<String> = nodes.iter().map(|n| format!("{n:?}")).collect();
    format!(
        "domain = \"example.com\"\n[[listeners]]\naddress = \"127.0.0.1:0\"\n[discovery.static]\nnodes = [{}]\n{HEALTH}{routes}{extra}",
        nodes.join(", ")
    )
}

/// The proxy for `cluster`'s routes, its listener taking connections as soon as they open
/// (`defer_accept = false`): for tests of clients that connect and send nothing, which a
/// deferring listener does not see until the kernel hands them over, about a second later.
pub async fn proxy_accepting_at_once(cluster: &Cluster, extra: &str) -> RunningServer {
    let config = cluster_config(cluster, extra);
    let listener = "address = \"127.0.0.1:0\"\n";
    assert!(config.contains(listener), "no local listener in {config}");
    proxy(&config.replacen(
        listener,
        "address = \"127.0.0.1:0\"\ndefer_accept = false\n",
        1,
    ))
    .await
}

pub async fn proxy_for(cluster: &Cluster, extra: &str) -> RunningServer {
    proxy(&cluster_config(cluster, extra)).await
}

/// A config for `cluster`'s routes on one local node, with `extra` appended.
fn cluster_config(cluster: &Cluster, extra: &str) -> String {
    config(&cluster.routes(), &["127.0.0.1"], extra)
}

pub fn addr(server: &RunningServer) -> SocketAddr {
    server.local_addrs()[0]
}

pub type TestClient = Client<HttpConnector, Body>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// Sends a GET over cleartext HTTP/2 (prior knowledge) with `uri` as `:scheme`/`:authority`.
pub async fn h2_get(proxy: SocketAddr, uri: &str) -> (StatusCode, HeaderMap, Bytes) {
    let stream = TcpStream::connect(proxy).await.expect("connect proxy");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::builder().uri(uri).body(full("")).unwrap();
    let resp = sender.send_request(req).await.expect("h2 answer");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("whole body").to_bytes();
    (parts.status, parts.headers, body)
}

/// Sends `method path` with `Host: host` to the proxy and returns status, headers and body.
pub async fn send(
    client: &TestClient,
    proxy: SocketAddr,
    method: Method,
    host: &str,
    path: &str,
    body: Body,
) -> (StatusCode, HeaderMap, Bytes) {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{proxy}{path}"))
        .header("host", host)
        .body(body)
        .unwrap();
    let resp = client.request(req).await.expect("proxy answers");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("whole body").to_bytes();
    (parts.status, parts.headers, body)
}

pub async fn get(proxy: SocketAddr, host: &str, path: &str) -> (StatusCode, HeaderMap, Bytes) {
    send(&client(), proxy, Method::GET, host, path, full("")).await
}

/// The proxy's `/metrics` text, from its admin listener.
pub async fn scrape(proxy: &RunningServer) -> String {
    let admin = proxy.admin_addr().expect("admin listener");
    let (status, headers, body) = send(
        &client(),
        admin,
        Method::GET,
        "localhost",
        "/metrics",
        full(""),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    String::from_utf8(body.to_vec()).unwrap()
}

/// The value of one series in a metrics text.
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Reads one HTTP/1.1 response with a `Content-Length` body from a raw stream: its head
/// (lower-cased) and its body.
pub async fn read_response(stream: &mut TcpStream) -> (String, String) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = stream.read(&mut byte).await.expect("read response head");
        assert_eq!(n, 1, "connection closed in a response head: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().expect("content-length"));
    let mut body = vec![0u8; length];
    stream
        .read_exact(&mut body)
        .await
        .expect("read response body");
    (head, String::from_utf8_lossy(&body).into_owned())
}

/// Writes raw bytes to the proxy and reads the answer until the proxy closes.
pub async fn raw(proxy: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(proxy).await.expect("connect proxy");
    stream.write_all(request).await.expect("write request");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status code of a raw HTTP/1.1 answer.
pub fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

/// Waits until the proxy reports `n` parked connections (HTTP/1.1 connections idle between
/// requests, which park after 100–200 ms). Bounded so a regression fails instead of
/// hanging; needs the proxy's admin listener.
pub async fn until_parked(proxy: &RunningServer, n: f64) {
    let parked = async {
        while value(&scrape(proxy).await, "clearml_edge_parked_connections").expect("parked gauge")
            != n
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), parked)
        .await
        .unwrap_or_else(|_| panic!("never {n} parked connections"));
}

/// The status codes of every response in a raw HTTP/1.1 answer, in order.
pub fn statuses_of(answer: &str) -> Vec<&str> {
    answer
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &answer[i + 9..i + 12])
        .collect()
}

/// A listener that accepts connections and never answers.
pub async fn stalled_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (addr, task)
}

/// A port on 127.0.0.1 that nothing listens on.
pub async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A node that reads each request head (and up to `body_bytes` of body), counts it, then
/// drops the connection without answering: a reset before any response byte.
pub async fn resetting_upstream(
    addr: &str,
    body_bytes: usize,
) -> Option<(SocketAddr, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind(addr).await.ok()?;
    let addr = listener.local_addr().ok()?;
    let heads = Arc::new(AtomicUsize::new(0));
    let counter = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                    if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        if seen.len() >= end + 4 + body_bytes {
                            counter.fetch_add(1, Ordering::SeqCst);
                            return; // drop: the connection closes unanswered
                        }
                    }
                }
            });
        }
    });
    Some((addr, heads))
}

/// A real WebSocket echo server (tokio-tungstenite) on 127.0.0.1; returns its port.
pub async fn websocket_echo() -> u16 {
    use futures_util::{SinkExt, StreamExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}
