//! A set-up connection, served: the HTTP/1.1 and HTTP/2 settings, the client's details
//! for the proxy ([`ClientConn`]), the task that serves it with the protocol its set-up
//! chose, and the service that hands each HTTP/2 request to the proxy.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::server::conn::http2;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::config::{ListenerMode, Settings};
use crate::proxy::body::{ClientBody, ResponseBody};
use crate::proxy::{ClientConn, Proxy};

use super::accept::{OpenConnection, Protocol};
use super::http1::{serve_http1, Http1Conn, PollReadable};
use super::http1_io::ClientIo;
use super::http2::{serve_http2, Prefixed};

/// The HTTP/1.1 and HTTP/2 server settings; a connection takes one or the other (ALPN on
/// TLS, the first bytes on a plain listener).
pub(super) struct ConnectionBuilders {
    pub(super) http1: Http1Settings,
    pub(super) http2: http2::Builder<TokioExecutor>,
}

/// How the HTTP/1.1 loop bounds a connection.
pub(super) struct Http1Settings {
    /// A request head larger than this is answered 431.
    pub(super) max_head: usize,
    /// How long a request head may take to arrive once it has started.
    pub(super) header_timeout: Duration,
    /// How long a connection may wait for its next request.
    pub(super) keepalive_idle: Duration,
}

impl ConnectionBuilders {
    pub(super) fn new(settings: &Settings) -> Self {
        let config = &settings.config;
        // The header timeout bounds both a head on its way and the wait for the next one.
        let http1 = Http1Settings {
            max_head: config.limits.max_request_header_bytes,
            header_timeout: config.timeouts.client_header,
            keepalive_idle: config.timeouts.client_header,
        };
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(
                u32::try_from(config.limits.max_request_header_bytes).unwrap_or(u32::MAX),
            )
            .keep_alive_interval(Some(config.timeouts.idle_keepalive / 2))
            .keep_alive_timeout(Duration::from_secs(20));
        ConnectionBuilders { http1, http2 }
    }
}

/// What every connection is served with.
pub(super) struct ServedBy {
    pub(super) proxy: Arc<Proxy>,
    pub(super) shutdown: watch::Receiver<bool>,
}

/// Everything about a client connection the proxy needs to know.
pub(super) struct ConnSetup {
    pub(super) peer: SocketAddr,
    pub(super) mode: ListenerMode,
    pub(super) sni: Option<Box<str>>,
    pub(super) hsts: Option<Arc<HeaderValue>>,
}

/// Wraps a set-up connection and serves it, in a task of its own, with the protocol its first
/// bytes chose. A task of its own because a task is as large as its largest state for its
/// whole life: the set-up task (handshake, first read) ends here, and an HTTP/1.1
/// connection, which spends most of its life parked between requests, lives in a task sized
/// for that (every idle client holds one of these).
pub(super) fn serve_connection<S>(
    stream: S,
    first: Vec<u8>,
    protocol: Protocol,
    client: ConnSetup,
    served: ServedBy,
    open: OpenConnection,
) where
    S: PollReadable + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
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
    ));
    let ServedBy { proxy, shutdown } = served;
    match protocol {
        Protocol::Http1 => tokio::spawn(serve_http1(Http1Conn {
            io: ClientIo::new(stream, first),
            proxy,
            client,
            shutdown,
            open,
        })),
        Protocol::Http2 => {
            let stream = Prefixed::new(stream, first);
            let service = ProxyService { proxy, client };
            tokio::spawn(serve_http2(stream, service, shutdown, open, peer))
        }
    };
}

pub(super) fn log_connection_end(peer: SocketAddr, result: hyper::Result<()>) {
    if let Err(e) = result {
        // hyper's HTTP/2 server refuses malformed streams itself; this is that one log line.
        if e.is_parse() || e.is_parse_too_large() {
            tracing::info!(client = %peer, error = %e, "request refused by the HTTP parser")
        } else {
            tracing::debug!(client = %peer, error = %e, "connection ended with an error")
        }
    }
}

/// Hands each HTTP/2 request to the proxy, in a future of its own (hyper's HTTP/2 server
/// runs each stream as a task).
#[derive(Clone)]
pub(super) struct ProxyService {
    pub(super) proxy: Arc<Proxy>,
    pub(super) client: Arc<ClientConn>,
}

type Answer = Result<Response<ResponseBody>, Infallible>;

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let proxy = self.proxy.clone();
        let client = self.client.clone();
        let req = req.map(ClientBody::Http2);
        Box::pin(async move { Ok(proxy.handle(req, &client).await) })
    }
}
