//! A set-up connection, served: hyper's HTTP/1.1 and HTTP/2 settings, the client's details
//! wrapped for the proxy ([`ClientConn`] with the framing check on the stream), the task
//! that serves it with the protocol its set-up chose, and the service that hands each
//! request to the proxy.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::server::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::config::{ListenerMode, Settings};
use crate::framing::WatchedStream;
use crate::proxy::body::ResponseBody;
use crate::proxy::{ClientConn, Proxy};

use super::accept::{OpenConnection, Protocol};
use super::http1::{serve_http1, Http1Conn, PollReadable};
use super::http2::serve_http2;

/// hyper's HTTP/1.1 and HTTP/2 server settings; a connection takes one or the other (ALPN
/// on TLS, the first bytes on a plain listener).
pub(super) struct ConnectionBuilders {
    pub(super) http1: http1::Builder,
    pub(super) http2: http2::Builder<TokioExecutor>,
    /// How long an HTTP/1.1 connection may wait for its next request.
    pub(super) keepalive_idle: Duration,
}

impl ConnectionBuilders {
    pub(super) fn new(settings: &Settings) -> Self {
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

/// What every connection is served with.
pub(super) struct ServedBy {
    pub(super) proxy: Arc<Proxy>,
    pub(super) shutdown: watch::Receiver<bool>,
}

/// Everything about a client connection except the framing report, which exists only once
/// the stream is wrapped.
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
        Protocol::Http2 => tokio::spawn(serve_http2(stream, service, shutdown, open, peer)),
    };
}

pub(super) fn log_connection_end(peer: SocketAddr, result: hyper::Result<()>) {
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
        Box::pin(async move { Ok(proxy.handle(req, &client).await) })
    }
}
