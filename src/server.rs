//! Listeners, the accept loop, the connection limit and graceful shutdown.
//!
//! Listeners defer accepting until a client has sent something, so a plain connection's
//! first bytes are read in the accept loop and it goes straight to the task that serves it;
//! a TLS connection (or a plain one whose bytes are not there yet) first gets a set-up task
//! for the handshake and the first read. Each is served by hyper's HTTP/1.1 or HTTP/2
//! server, chosen by ALPN on TLS and by the first bytes on a plain listener (HTTP/2 with
//! prior knowledge). An
//! HTTP/1.1 connection idle between requests is parked: hyper's connection and its buffers
//! are dropped and the next request's first byte is awaited with none (an upgrade's tunnel
//! also runs in the connection's own task). Each holds one permit of the connection limit.
//! On shutdown the listeners close, idle connections close, and in-flight requests get up to
//! the drain timeout to finish: the drain waits until every permit is back (the mini-redis
//! shape: a signal, then wait for the last connection to end).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::header::HeaderValue;
use hyper::server::conn::http1::Parts;
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::admin::AdminState;
use crate::config::{ListenerMode, NodeSource, Settings};
use crate::discovery::DiscoveryStatus;
use crate::framing::WatchedStream;
use crate::metrics::{Metrics, ResultLabel};
use crate::proxy::body::ResponseBody;
use crate::proxy::client::Ledger;
use crate::proxy::{ClientConn, Proxy};
use crate::routing::RouteTable;
use crate::snapshot::{ProxySettings, Publisher};
use crate::tls::Tls;
use crate::upstream::PoolSettings;

/// A running proxy: its bound addresses, its publisher, and the way to stop it.
pub struct RunningServer {
    local_addrs: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    publisher: Arc<Publisher>,
    discovery: Arc<DiscoveryStatus>,
    discovery_task: Option<JoinHandle<()>>,
    health_task: JoinHandle<()>,
    tls_watch: Option<JoinHandle<()>>,
    tls: Option<Arc<Tls>>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    metrics: Arc<Metrics>,
    /// The configuration in force, to tell what a reload can apply.
    settings: std::sync::Mutex<Settings>,
}

impl RunningServer {
    /// The addresses actually bound (port 0 in the config becomes a real port here).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// The admin listener's bound address, when one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn publisher(&self) -> &Arc<Publisher> {
        &self.publisher
    }

    /// The TLS certificates in force, when a TLS listener is configured.
    pub fn tls(&self) -> Option<&Arc<Tls>> {
        self.tls.as_ref()
    }

    pub fn discovery(&self) -> &Arc<DiscoveryStatus> {
        &self.discovery
    }

    /// Applies a new, already validated configuration without dropping a connection: routes,
    /// timeouts, balancing and access-log settings swap in one snapshot; a static node list
    /// is republished. Returns the changed settings that need a restart to take effect.
    pub fn reload(&self, new: Settings) -> Vec<&'static str> {
        let mut current = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        let mut needs_restart = Vec::new();
        if current.listeners != new.listeners {
            needs_restart.push("listeners");
        }
        if current.admin != new.admin {
            needs_restart.push("admin");
        }
        match (&current.nodes, &new.nodes) {
            (NodeSource::Static(_), NodeSource::Static(nodes)) => {
                self.publisher.publish_nodes(nodes)
            }
            (old, new) if old != new => needs_restart.push("discovery"),
            _ => {}
        }
        // Everything else is read once at start; say which of those changed.
        let (old_t, new_t) = (&current.config.timeouts, &new.config.timeouts);
        let fixed_at_start = [
            ("timeouts.connect", old_t.connect != new_t.connect),
            (
                "timeouts.client_header",
                old_t.client_header != new_t.client_header,
            ),
            (
                "timeouts.idle_keepalive",
                old_t.idle_keepalive != new_t.idle_keepalive,
            ),
            (
                "timeouts.shutdown_drain",
                old_t.shutdown_drain != new_t.shutdown_drain,
            ),
            (
                "balancing.retry_budget_percent",
                current.config.balancing.retry_budget_percent
                    != new.config.balancing.retry_budget_percent,
            ),
            (
                "balancing.max_idle_per_node",
                current.config.balancing.max_idle_per_node
                    != new.config.balancing.max_idle_per_node,
            ),
            (
                "health",
                format!("{:?}", current.config.health) != format!("{:?}", new.config.health)
                    || current
                        .routes
                        .iter()
                        .zip(&new.routes)
                        .any(|(a, b)| a.name == b.name && a.health != b.health),
            ),
            (
                "limits",
                format!("{:?}", current.config.limits) != format!("{:?}", new.config.limits),
            ),
            (
                "tls",
                format!("{:?}", current.config.tls) != format!("{:?}", new.config.tls),
            ),
        ];
        needs_restart.extend(
            fixed_at_start
                .iter()
                .filter(|(_, changed)| *changed)
                .map(|(name, _)| *name),
        );
        self.publisher.publish_config(
            RouteTable::new(new.routes.clone()),
            ProxySettings::from_config(&new.config),
        );
        self.metrics.config_reloads.get_or_create(&ok_label()).inc();
        *current = new;
        needs_restart
    }

    /// Counts a reload that was refused (the file did not validate).
    pub fn reload_refused(&self) {
        self.metrics
            .config_reloads
            .get_or_create(&failed_label())
            .inc();
    }

    /// Stops accepting, lets in-flight requests finish within the drain timeout, and returns
    /// when every connection has ended (or the timeout passed).
    pub async fn shutdown(self) {
        if let Some(discovery) = &self.discovery_task {
            discovery.abort();
        }
        self.health_task.abort();
        if let Some(tls_watch) = &self.tls_watch {
            tls_watch.abort();
        }
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// Binds the listeners, starts discovery and starts serving.
pub async fn start(settings: Settings) -> io::Result<RunningServer> {
    let config = &settings.config;
    let pool_settings = PoolSettings {
        max_idle: config.balancing.max_idle_per_node,
        idle_timeout: config.timeouts.idle_keepalive,
        connect_timeout: config.timeouts.connect,
    };
    let metrics = Arc::new(Metrics::new());
    let publisher = Arc::new(Publisher::new(
        RouteTable::new(settings.routes.clone()),
        ProxySettings::from_config(&settings.config),
        pool_settings,
        metrics.clone(),
    ));
    let discovery = Arc::new(DiscoveryStatus::default());
    let discovery_task =
        crate::discovery::start(&settings.nodes, publisher.clone(), discovery.clone())
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
    let proxy = Arc::new(Proxy::new(
        publisher.snapshots(),
        &settings.config,
        metrics.clone(),
    ));
    let health_task = tokio::spawn(crate::health::run(
        publisher.clone(),
        settings.config.health.clone(),
    ));

    let tls = match &settings.config.tls {
        Some(tls_config)
            if settings
                .listeners
                .iter()
                .any(|l| l.mode == ListenerMode::Tls) =>
        {
            let tls = Arc::new(
                Tls::new(&tls_config.certificates).map_err(|e| io::Error::other(e.to_string()))?,
            );
            Some((tls, tls_config.reload_interval))
        }
        _ => None,
    };
    let tls_watch = tls
        .as_ref()
        .map(|(tls, interval)| tokio::spawn(tls.clone().watch(*interval)));
    let hsts = settings
        .config
        .tls
        .as_ref()
        .and_then(|t| t.hsts.as_deref())
        .and_then(|v| HeaderValue::from_str(v).ok())
        .map(Arc::new);

    let builders = Arc::new(ConnectionBuilders::new(&settings));
    let mut listeners = Vec::with_capacity(settings.listeners.len());
    for spec in &settings.listeners {
        let addr = spec.addr;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        let defers_accept = spec.defer_accept
            && match defer_accept(&listener) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::Unsupported => false,
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "cannot defer accepting connections until they send; accepting them at once");
                    false
                }
            };
        let context = Arc::new(ListenerContext {
            mode: spec.mode,
            acceptor: match (&tls, spec.mode) {
                (Some((tls, _)), ListenerMode::Tls) => Some(TlsAcceptor::from(tls.config.clone())),
                _ => None,
            },
            handshake_timeout: settings.config.timeouts.client_header,
            defers_accept,
            hsts: hsts.clone(),
            metrics: metrics.clone(),
            builders: builders.clone(),
        });
        listeners.push((listener, context));
    }
    let local_addrs = listeners
        .iter()
        .map(|(l, _)| l.local_addr())
        .collect::<io::Result<Vec<_>>>()?;

    let (admin_listener, admin_addr) = match settings.admin {
        Some(addr) => {
            let listener = crate::admin::bind(addr).await?;
            let bound = listener.local_addr()?;
            (Some(listener), Some(bound))
        }
        None => (None, None),
    };

    let max_connections = settings.config.limits.max_connections;
    let limit = Arc::new(Semaphore::new(max_connections));
    let drain = settings.config.timeouts.shutdown_drain;
    let (shutdown, shutdown_rx) = watch::channel(false);
    if let Some(listener) = admin_listener {
        let state = AdminState {
            snapshots: publisher.snapshots(),
            discovery: discovery.clone(),
            metrics: metrics.clone(),
            tls: tls.as_ref().map(|(tls, _)| tls.clone()),
            source: match settings.nodes {
                NodeSource::Static(_) => "static",
                NodeSource::Kubernetes(_) => "kubernetes",
            },
        };
        tokio::spawn(crate::admin::serve(listener, state, shutdown_rx.clone()));
    }

    let task = tokio::spawn(async move {
        let accept_loops: Vec<_> = listeners
            .into_iter()
            .map(|(listener, context)| {
                tokio::spawn(accept_loop(
                    listener,
                    context,
                    proxy.clone(),
                    limit.clone(),
                    shutdown_rx.clone(),
                ))
            })
            .collect();
        for accept in accept_loops {
            let _ = accept.await;
        }
        drain_connections(&limit, max_connections, drain).await;
    });

    Ok(RunningServer {
        local_addrs,
        admin_addr,
        publisher,
        discovery,
        discovery_task,
        health_task,
        tls_watch,
        tls: tls.map(|(tls, _)| tls),
        metrics,
        settings: std::sync::Mutex::new(settings),
        shutdown,
        task,
    })
}

/// hyper's HTTP/1.1 and HTTP/2 server settings; a connection takes one or the other (ALPN
/// on TLS, the first bytes on a plain listener).
struct ConnectionBuilders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    /// How long an HTTP/1.1 connection may wait for its next request.
    keepalive_idle: Duration,
}

impl ConnectionBuilders {
    fn new(settings: &Settings) -> Self {
        let config = &settings.config;
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            // hyper arms this both for the first request head and while a keep-alive
            // connection waits for the next one, so it bounds slow heads and idle clients.
            .header_read_timeout(config.timeouts.client_header)
            .max_buf_size(config.limits.max_request_header_bytes)
            .keep_alive(true);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(
                u32::try_from(config.limits.max_request_header_bytes).unwrap_or(u32::MAX),
            )
            .keep_alive_interval(Some(config.timeouts.idle_keepalive / 2))
            .keep_alive_timeout(Duration::from_secs(20));
        ConnectionBuilders {
            http1,
            http2,
            keepalive_idle: config.timeouts.client_header,
        }
    }
}

/// How a listener treats its connections.
struct ListenerContext {
    mode: ListenerMode,
    acceptor: Option<TlsAcceptor>,
    handshake_timeout: Duration,
    /// The kernel hands over connections with their first bytes (see [`defer_accept`]).
    defers_accept: bool,
    hsts: Option<Arc<HeaderValue>>,
    metrics: Arc<Metrics>,
    builders: Arc<ConnectionBuilders>,
}

fn ok_label() -> ResultLabel {
    ResultLabel {
        result: "ok".into(),
    }
}

fn failed_label() -> ResultLabel {
    ResultLabel {
        result: "failed".into(),
    }
}

impl ListenerContext {
    fn setup(&self, peer: SocketAddr, sni: Option<Box<str>>) -> ConnSetup {
        ConnSetup {
            peer,
            mode: self.mode,
            sni,
            hsts: self.hsts.clone(),
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    context: Arc<ListenerContext>,
    proxy: Arc<Proxy>,
    limit: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Where a new connection's first bytes are read; each connection keeps a copy of just
    // what it sent.
    let mut scratch = [0; FIRST_READ_BYTES];
    loop {
        // Waiting for a permit before accepting leaves excess clients in the kernel's
        // backlog instead of accepting and dropping them. The permit first, as the accept
        // below: the shutdown's waiter is polled only when there is a wait.
        let permit = tokio::select! {
            biased;
            permit = limit.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.changed() => return,
        };
        // A queue of clients is accepted without polling the shutdown's waiter each time;
        // `has_changed` below notices a shutdown that came meanwhile.
        let (stream, peer) = tokio::select! {
            biased;
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        if shutdown.has_changed().unwrap_or(true) {
            // Dropped unanswered, as the connections still in the kernel's queue are when
            // the listener closes.
            return;
        }
        let _ = stream.set_nodelay(true);
        let open = OpenConnection::new(context.clone(), permit);
        let served = ServedBy {
            proxy: proxy.clone(),
            shutdown: shutdown.clone(),
        };
        // Plain and TLS connections are separate tasks so a plain connection's task does not
        // carry the (large) state of a TLS handshake.
        if context.acceptor.is_some() {
            tokio::spawn(serve_tls(stream, peer, open, served));
            continue;
        }
        // A plain connection on a deferring listener has its request there already: read
        // here, it goes straight to its serving task. Otherwise (or with too few bytes to
        // tell the protocol) a set-up task waits for them.
        let first = if context.defers_accept {
            match read_now(&stream, &mut scratch) {
                Ok(0) => continue, // closed before sending a byte
                Ok(read) => scratch[..read].to_vec(),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    Vec::new()
                }
                Err(e) => {
                    tracing::debug!(client = %peer, error = %e, "connection ended before a request");
                    continue;
                }
            }
        } else {
            Vec::new()
        };
        match protocol_of(&first) {
            Some(protocol) => {
                let client = context.setup(peer, None);
                serve_connection(stream, first, protocol, client, served, open);
            }
            None => {
                tokio::spawn(serve_plain(stream, peer, open, served, first));
            }
        }
    }
}

/// Asks the kernel to hand over a listener's connections only once the client has sent its
/// first bytes (Linux `TCP_DEFER_ACCEPT`, nginx's `listen ... deferred`, HAProxy's
/// `defer-accept`). A connection then arrives with its request already readable: one
/// wake-up per connection instead of two, and [`read_now`] finds the bytes, so the
/// connection needs no set-up task (proxy CPU per new connection about 15 % lower,
/// measured). A client that connects and stays silent is handed over anyway after about a
/// second, when the kernel's retransmitted SYN-ACK is answered, and then meets the header
/// timeout as before.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn defer_accept(listener: &TcpListener) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let seconds: libc::c_int = 1;
    let length = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: setsockopt reads `length` bytes at the option pointer, which points at
    // `seconds`, a live and aligned c_int of exactly that size that outlives the call; the
    // descriptor is the listener's own open socket, borrowed for the call. Nothing is written
    // through the pointer and nothing is kept after the call returns.
    let status = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&seconds).cast::<libc::c_void>(),
            length,
        )
    };
    if status == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn defer_accept(_listener: &TcpListener) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "deferred accept is a Linux feature",
    ))
}

/// Reads what a just-accepted client has already sent, straight from the socket. A client
/// sends its request as soon as it has connected, so under load it is usually there by the
/// time the connection is accepted; read here, the connection skips the set-up task with its
/// timer and shutdown waiter, and goes straight to the task that serves it. (tokio's own
/// reads would first wait for the socket's first readiness event, which comes only with the
/// driver's next turn.) `WouldBlock` when nothing has arrived yet.
fn read_now(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::io::Read;
    (&*socket2::SockRef::from(stream)).read(buf)
}

/// One accepted connection: counted open while it lives, holding one permit of the
/// connection limit (which is also how the drain knows when the last one ended).
struct OpenConnection {
    context: Arc<ListenerContext>,
    _permit: OwnedSemaphorePermit,
}

impl OpenConnection {
    fn new(context: Arc<ListenerContext>, permit: OwnedSemaphorePermit) -> Self {
        context.metrics.open_connections.inc();
        OpenConnection {
            context,
            _permit: permit,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.context.metrics.open_connections.dec();
    }
}

/// What every connection is served with.
struct ServedBy {
    proxy: Arc<Proxy>,
    shutdown: watch::Receiver<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// HTTP/2 with prior knowledge (RFC 9113 §3.3) opens with this preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The first read of a plain connection takes up to this much; most request heads fit, so
/// hyper parses the first request without reading again. Freed once hyper has consumed it.
const FIRST_READ_BYTES: usize = 4096;

/// Reads a connection's first bytes to tell HTTP/2 prior knowledge from HTTP/1.1, in one
/// read for any HTTP/1.1 request (hyper-util's auto builder reads the 24-byte preface length
/// first, then hyper reads again: a system call more per connection), after the bytes in
/// `first` that were read already. `None` when the client closed before sending a byte.
async fn read_first_bytes<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut first: Vec<u8>,
) -> io::Result<Option<(Protocol, Vec<u8>)>> {
    first.reserve(FIRST_READ_BYTES.saturating_sub(first.len()));
    loop {
        if stream.read_buf(&mut first).await? == 0 {
            return Ok(None);
        }
        if let Some(protocol) = protocol_of(&first) {
            return Ok(Some((protocol, first)));
        }
    }
}

/// The protocol a connection's first bytes announce; `None` while they could still be the
/// start of the HTTP/2 preface.
fn protocol_of(first: &[u8]) -> Option<Protocol> {
    let seen = first.len().min(H2_PREFACE.len());
    if first[..seen] != H2_PREFACE[..seen] {
        Some(Protocol::Http1)
    } else if seen == H2_PREFACE.len() {
        Some(Protocol::Http2)
    } else {
        None
    }
}

/// Waits for a connection's first bytes, at most the header timeout, and ends at once on
/// shutdown: a client that has sent nothing has nothing in flight (hyper itself would wait
/// for a new connection's first request until the header timeout, holding up the drain).
/// `None` when the connection is to be closed.
async fn first_bytes<S: AsyncRead + Unpin>(
    stream: &mut S,
    read_already: Vec<u8>,
    peer: SocketAddr,
    timeout: Duration,
    shutdown: &watch::Receiver<bool>,
) -> Option<(Protocol, Vec<u8>)> {
    match before_shutdown(timeout, shutdown, read_first_bytes(stream, read_already)).await? {
        Ok(Ok(first)) => first,
        Ok(Err(e)) => {
            tracing::debug!(client = %peer, error = %e, "connection ended before a request");
            None
        }
        Err(_) => {
            tracing::debug!(client = %peer, "no request within the header timeout");
            None
        }
    }
}

/// Runs a connection's set-up step (TLS handshake, first read) for at most `timeout`;
/// `None` when shutdown comes first, since a connection still setting up has no request in
/// flight to wait for.
async fn before_shutdown<F: Future>(
    timeout: Duration,
    shutdown: &watch::Receiver<bool>,
    step: F,
) -> Option<Result<F::Output, tokio::time::error::Elapsed>> {
    let mut shutdown = shutdown.clone();
    tokio::select! {
        done = tokio::time::timeout(timeout, step) => Some(done),
        _ = shutdown_requested(&mut shutdown) => None,
    }
}

// The set-up steps below are boxed: the set-up task is a few hundred bytes while a
// handshake or a first read is awaited (as with idle clients that have sent nothing yet).
async fn serve_plain(
    mut stream: TcpStream,
    peer: SocketAddr,
    open: OpenConnection,
    served: ServedBy,
    read_already: Vec<u8>,
) {
    let timeout = open.context.handshake_timeout;
    let Some((protocol, first)) = Box::pin(first_bytes(
        &mut stream,
        read_already,
        peer,
        timeout,
        &served.shutdown,
    ))
    .await
    else {
        return;
    };
    let client = open.context.setup(peer, None);
    serve_connection(stream, first, protocol, client, served, open);
}

async fn serve_tls(stream: TcpStream, peer: SocketAddr, open: OpenConnection, served: ServedBy) {
    let context = &open.context;
    let Some(acceptor) = &context.acceptor else {
        return;
    };
    let timeout = context.handshake_timeout;
    let Some(handshake) = Box::pin(before_shutdown(
        timeout,
        &served.shutdown,
        acceptor.accept(stream),
    ))
    .await
    else {
        return;
    };
    let handshake = handshake.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
    let label = if handshake.is_ok() {
        ok_label()
    } else {
        failed_label()
    };
    context.metrics.tls_handshakes.get_or_create(&label).inc();
    let mut tls_stream = match handshake {
        Ok(tls_stream) => tls_stream,
        Err(e) => {
            tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
            return;
        }
    };
    let (_, session) = tls_stream.get_ref();
    let sni = session.server_name().map(Box::from);
    // ALPN h2 needs no look at the bytes; otherwise the first bytes decide, as on a plain
    // listener (and a client that sends the HTTP/2 preface without ALPN is still served).
    let (protocol, first) = if session.alpn_protocol() == Some(b"h2") {
        (Protocol::Http2, Vec::new())
    } else {
        match Box::pin(first_bytes(
            &mut tls_stream,
            Vec::new(),
            peer,
            timeout,
            &served.shutdown,
        ))
        .await
        {
            Some(first) => first,
            None => return,
        }
    };
    let client = context.setup(peer, sni);
    serve_connection(tls_stream, first, protocol, client, served, open);
}

/// Everything about a client connection except the framing report, which exists only once
/// the stream is wrapped.
struct ConnSetup {
    peer: SocketAddr,
    mode: ListenerMode,
    sni: Option<Box<str>>,
    hsts: Option<Arc<HeaderValue>>,
}

/// Wraps a set-up connection and serves it, in a task of its own, with the protocol its first
/// bytes chose. A task of its own because a task is as large as its largest state for its
/// whole life: the set-up task (handshake, first read) ends here, and an HTTP/1.1
/// connection, which spends most of its life parked between requests, lives in a task sized
/// for that (10 000 idle clients are 10 000 of these).
fn serve_connection<S>(
    stream: S,
    first: Vec<u8>,
    protocol: Protocol,
    client: ConnSetup,
    served: ServedBy,
    open: OpenConnection,
) where
    S: PollReadable + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (stream, framing) = WatchedStream::new(stream, first);
    let peer = client.peer;
    let tls = client.mode == ListenerMode::Tls;
    let client = Arc::new(ClientConn::new(
        peer,
        tls,
        client.sni,
        match client.mode {
            ListenerMode::RedirectToHttps { https_port } => Some(https_port),
            _ => None,
        },
        if tls { client.hsts } else { None },
        framing,
    ));
    let ServedBy { proxy, shutdown } = served;
    let service = ProxyService { proxy, client };
    match protocol {
        Protocol::Http1 => tokio::spawn(serve_http1(Http1Conn {
            stream,
            service,
            shutdown,
            open,
        })),
        Protocol::Http2 => tokio::spawn(async move {
            let connection = open
                .context
                .builders
                .http2
                .serve_connection(TokioIo::new(stream), service);
            // Boxed: hyper's connection state is a few KiB and moves as the future is
            // polled first; in a box it is written once.
            log_connection_end(peer, until_shutdown(Box::pin(connection), shutdown).await);
            drop(open);
        }),
    };
}

fn log_connection_end(peer: SocketAddr, result: hyper::Result<()>) {
    if let Err(e) = result {
        // hyper answers malformed and oversize request heads itself (400, 431) and ends the
        // connection; this is that request's one log line.
        if e.is_parse() || e.is_parse_too_large() {
            tracing::info!(client = %peer, error = %e, "request refused by the HTTP parser")
        } else {
            tracing::debug!(client = %peer, error = %e, "connection ended with an error")
        }
    }
}

/// Hands each request of a connection to the proxy. The future is boxed so the HTTP/1.1
/// loop can poll hyper's connection by hand (`poll_without_shutdown` wants it `Unpin`); the
/// box also keeps a request's state out of the connection while none is in flight.
#[derive(Clone)]
struct ProxyService {
    proxy: Arc<Proxy>,
    client: Arc<ClientConn>,
}

type Answer = Result<Response<ResponseBody>, Infallible>;

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let proxy = self.proxy.clone();
        let client = self.client.clone();
        Box::pin(async move { Ok(proxy.handle(req, &client).await) })
    }
}

/// A client stream whose readiness can be awaited without a read buffer, so a connection
/// between requests holds none. Polled, not a future: a parked connection then keeps no
/// waiter state of its own (the socket's registration keeps the waker).
trait PollReadable {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl PollReadable for TcpStream {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }
}

impl PollReadable for tokio_rustls::server::TlsStream<TcpStream> {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (tcp, session) = self.get_ref();
        // Plaintext rustls has already decrypted (or a close it has seen) is there to read
        // now; otherwise the next bytes must come from the socket.
        if session.wants_read() {
            tcp.poll_read_ready(cx)
        } else {
            Poll::Ready(Ok(()))
        }
    }
}

/// An HTTP/1.1 client connection between exchanges: all it keeps while parked.
struct Http1Conn<S> {
    stream: WatchedStream<S>,
    service: ProxyService,
    shutdown: watch::Receiver<bool>,
    open: OpenConnection,
}

/// How a spell of hyper serving a connection ended.
enum Served {
    /// Idle between requests: hyper has let go of the stream; wait for the next request.
    Parked,
    /// The client closed or asked to, hyper ended the connection, or the server is stopping.
    Close,
}

/// Serves an HTTP/1.1 connection. Once it has been idle between requests for
/// [`PARK_AFTER`], it is parked: hyper's connection is asked to finish (the ledger in
/// [`crate::proxy::client`] says when that is safe), handing back the stream and any bytes
/// it read ahead; the next request's first bytes are then awaited with no buffer at all, and
/// a fresh hyper connection serves it. An upgrade's tunnel runs here too, on the stream
/// hyper hands back after the 101.
//
// A plain function handing back an `async move` block that uses `conn` as captured: an
// `async fn` would keep a second copy of its argument in the future, which is what a parked
// connection's memory is made of.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of `conn`"
)]
fn serve_http1<S>(mut conn: Http1Conn<S>) -> impl Future<Output = ()> + Send
where
    S: PollReadable + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async move {
        loop {
            // Boxed: hyper's connection and the idle watch exist only while hyper serves.
            let (back, served) = Box::pin(serve_until_parked(conn)).await;
            conn = back;
            if let Some(tunnel) = conn.service.client.take_tunnel() {
                Box::pin(tunnel.run(conn.stream)).await;
                return;
            }
            match served {
                Ok(Served::Parked) => {}
                Ok(Served::Close) => break,
                Err(e) => {
                    // Dropped, not closed gracefully: as when hyper ends a connection on an
                    // error.
                    log_connection_end(conn.service.client.peer, Err(e));
                    return;
                }
            }
            if !conn.stream.has_buffered() && !wait_parked(&mut conn).await {
                break;
            }
        }
        let within = conn.open.context.builders.keepalive_idle;
        if conn.service.client.ledger.body_unread() {
            let stream = conn.stream.into_inner();
            Box::pin(close_lingering(stream, within, &conn.shutdown)).await;
        } else {
            Box::pin(close(conn.stream, within)).await;
        }
    }
}

/// Waits, holding no buffer, for a parked connection's next bytes: false when the client
/// sent none within the keep-alive wait or the server is stopping. Every parked connection
/// holds this future, so it is kept lean: a plain function around an `async move` (no second
/// copy of the argument), and no locals beyond the two timers.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of `conn`"
)]
fn wait_parked<S>(conn: &mut Http1Conn<S>) -> impl Future<Output = bool> + Send + '_
where
    S: PollReadable + Send,
{
    async move {
        if *conn.shutdown.borrow() {
            return false;
        }
        conn.open.context.metrics.parked_connections.inc();
        let idle = conn.open.context.builders.keepalive_idle;
        let mut expiry = std::pin::pin!(tokio::time::sleep(idle));
        // Any change is the shutdown (it is sent once), and so is the sender's end;
        // `changed` rather than `shutdown_requested`, whose future is larger.
        let mut stop = std::pin::pin!(conn.shutdown.changed());
        let ready = std::future::poll_fn(|cx| {
            // Taken `&mut` so the future is `Send` without asking the stream to be `Sync`.
            let stream: &mut WatchedStream<S> = &mut conn.stream;
            if let Poll::Ready(ready) = stream.get_ref().poll_readable(cx) {
                return Poll::Ready(ready.is_ok());
            }
            if stop.as_mut().poll(cx).is_ready() || expiry.as_mut().poll(cx).is_ready() {
                return Poll::Ready(false);
            }
            Poll::Pending
        })
        .await;
        conn.open.context.metrics.parked_connections.dec();
        ready
    }
}

/// Lets hyper serve the connection until it ends, or until it has been idle between
/// requests long enough to park; hands the connection back with the stream and hyper's
/// read-ahead in it.
async fn serve_until_parked<S>(mut conn: Http1Conn<S>) -> (Http1Conn<S>, hyper::Result<Served>)
where
    S: PollReadable + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The stream moves into hyper for the spell and back into `conn` after it.
    let mut connection = conn
        .open
        .context
        .builders
        .http1
        .serve_connection(TokioIo::new(conn.stream), conn.service.clone());
    let ledger = &conn.service.client.ledger;
    let mut stopping = false;
    let mut parking = false;
    let result = {
        // The waiter is polled once, which registers this task for the shutdown's wake-up,
        // and after that only when the signal has changed: this loop runs at least twice per
        // request, and each poll of the waiter takes its lock. Unconstrained by tokio's
        // task budget, or a first poll at the end of a busy turn could return without having
        // registered, and this spell would never hear the shutdown.
        let mut watcher = conn.shutdown.clone();
        let mut stop = std::pin::pin!(tokio::task::unconstrained(shutdown_requested(&mut watcher)));
        let mut stop_registered = false;
        let shutdown = &conn.shutdown;
        let mut idle = IdleWatch::new(ledger.answered());
        std::future::poll_fn(|cx| loop {
            // The connection first: it is what wakes this task, for every request.
            if let Poll::Ready(done) = connection.poll_without_shutdown(cx) {
                return Poll::Ready(done);
            }
            let look_at_stop =
                !stopping && (!stop_registered || !matches!(shutdown.has_changed(), Ok(false)));
            stop_registered = true;
            if look_at_stop && stop.as_mut().poll(cx).is_ready() {
                // Shutdown: an idle connection closes now, a busy one after its exchange.
                stopping = true;
            } else if !stopping && !parking && idle.poll_idle(cx, ledger) {
                parking = true;
            } else {
                return Poll::Pending;
            }
            Pin::new(&mut connection).graceful_shutdown();
        })
        .await
    };
    let Parts { io, read_buf, .. } = connection.into_parts();
    conn.stream = io.into_inner();
    conn.stream.unread(read_buf);
    let served = result.map(|()| {
        if parking && !stopping {
            Served::Parked
        } else {
            Served::Close
        }
    });
    (conn, served)
}

/// How long an HTTP/1.1 connection stays idle between requests before it gives up hyper's
/// buffers; it is parked within two of these. Not at once: a busy keep-alive client sends
/// its next request within milliseconds, and building hyper's connection again for each
/// request would cost about a fifth more CPU per request (measured), which a client pausing
/// longer than this pays only on requests that are rare. Not longer: until then a
/// connection holds hyper's buffers, and when many connections arrive together (10 000
/// clients sending one request each) they all hold them at once; that peak leaves
/// jemalloc's metadata and slabs grown for good. With one second here, 2.3 KiB per idle
/// connection stayed resident afterwards; with 100 ms, 1.6 (measured).
const PARK_AFTER: Duration = Duration::from_millis(100);

/// Tells when a connection has been between requests for a whole tick of [`PARK_AFTER`]:
/// no response since the last tick, and the ledger says nothing is owed either way. One
/// timer per connection while hyper serves it, re-armed once a tick (never per request).
///
/// The timer is made only once the spell has answered a request: a connection can park only
/// after an answer, and a client that sends one request and closes (`Connection: close`)
/// then costs no timer at all.
struct IdleWatch {
    tick: Option<Pin<Box<tokio::time::Sleep>>>,
    answered_at_start: u64,
    answered_at_tick: u64,
}

impl IdleWatch {
    fn new(answered: u64) -> Self {
        IdleWatch {
            tick: None,
            answered_at_start: answered,
            answered_at_tick: answered,
        }
    }

    fn poll_idle(&mut self, cx: &mut std::task::Context<'_>, ledger: &Ledger) -> bool {
        let answered = ledger.answered();
        let tick = match &mut self.tick {
            Some(tick) => {
                // A look at the timer's state, not a poll: polling it on every wake-up of a
                // busy connection would register the waker again each time.
                if !tick.is_elapsed() {
                    return false;
                }
                if answered == self.answered_at_tick
                    && ledger.between_requests(self.answered_at_start)
                {
                    return true;
                }
                tick.as_mut()
                    .reset(tokio::time::Instant::now() + PARK_AFTER);
                tick
            }
            None if answered == self.answered_at_start => return false,
            None => self.tick.insert(Box::pin(tokio::time::sleep(PARK_AFTER))),
        };
        self.answered_at_tick = answered;
        // Registers this task's waker with the timer; the deadline is ahead, so it is pending.
        let _ = tick.as_mut().poll(cx);
        false
    }
}

/// Ends a connection the way hyper would: a FIN (and a TLS close_notify) after what was
/// written, bounded in time for a client that reads nothing. False when that bound passed.
async fn close<S: AsyncWrite + Unpin>(mut stream: S, within: Duration) -> bool {
    tokio::time::timeout(within, stream.shutdown())
        .await
        .is_ok()
}

/// How long a lingering close waits for the client's next bytes, and how long it lingers at
/// most: nginx's `lingering_timeout` and `lingering_time`.
const LINGER_QUIET: Duration = Duration::from_secs(5);
const LINGER_TOTAL: Duration = Duration::from_secs(30);

/// Ends a connection whose client may still be sending a body the proxy answered early (a
/// refused upload): the FIN after the answer, then what the client sends is read and
/// dropped until it closes, pauses [`LINGER_QUIET`], [`LINGER_TOTAL`] has passed or the
/// server stops. Closing a socket with unread bytes sends a reset instead of a FIN, which
/// fails the client's upload with "broken pipe" or "connection reset" (and on some systems
/// drops the answer unread) where it should read the 413: nginx's lingering close.
async fn close_lingering<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    within: Duration,
    shutdown: &watch::Receiver<bool>,
) {
    if !close(&mut stream, within).await {
        return;
    }
    let discard = async {
        // On the heap, and only for lingering connections.
        let mut sink = vec![0u8; 16 * 1024];
        while let Ok(Ok(1..)) = tokio::time::timeout(LINGER_QUIET, stream.read(&mut sink)).await {}
    };
    let _ = before_shutdown(LINGER_TOTAL, shutdown, discard).await;
}

/// A served connection that can be asked to finish its in-flight requests and close.
trait GracefulConnection: Future<Output = hyper::Result<()>> {
    fn begin_shutdown(self: Pin<&mut Self>);
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<I, B, S, E> GracefulConnection for http2::Connection<I, S, E>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: Body + 'static,
    B::Error: Into<BoxError>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn begin_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Serves `connection` to its end; on shutdown, idle connections close at once and busy ones
/// after their in-flight requests (the mini-redis shape: a signal, then run to completion).
async fn until_shutdown<C: GracefulConnection>(
    mut connection: Pin<Box<C>>,
    mut shutdown: watch::Receiver<bool>,
) -> hyper::Result<()> {
    tokio::select! {
        // The connection first: it is what wakes this task, for every request.
        biased;
        result = connection.as_mut() => return result,
        _ = shutdown_requested(&mut shutdown) => {}
    }
    connection.as_mut().begin_shutdown();
    connection.await
}

/// Resolves once shutdown has been signalled (or the server is gone).
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Waits for every connection to end (each holds a permit of the connection limit), at most
/// the drain timeout.
async fn drain_connections(limit: &Semaphore, max_connections: usize, drain: Duration) {
    tracing::info!(drain_secs = drain.as_secs(), "draining in-flight requests");
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain, limit.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("drain timeout passed with requests still in flight; closing them");
    }
}
