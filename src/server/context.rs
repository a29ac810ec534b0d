//! What a listener's connections are served with: the listener's context (mode, TLS
//! acceptor, timeouts, the HTTP/1.1 and HTTP/2 settings), the connection permit every
//! connection holds, and the client's details handed to the proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::HeaderValue;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio_rustls::TlsAcceptor;

use crate::config::{ListenerMode, Settings};
use crate::metrics::Metrics;
use crate::proxy::Proxy;

/// How a listener treats its connections.
pub(super) struct ListenerContext {
    pub(super) mode: ListenerMode,
    pub(super) acceptor: Option<TlsAcceptor>,
    pub(super) handshake_timeout: Duration,
    /// The kernel hands over connections with their first bytes (see `accept::defer_accept`).
    pub(super) defers_accept: bool,
    pub(super) hsts: Option<Arc<HeaderValue>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) builders: Arc<ConnectionBuilders>,
}

impl ListenerContext {
    pub(super) fn setup(&self, peer: SocketAddr, sni: Option<Box<str>>) -> ConnSetup {
        ConnSetup {
            peer,
            mode: self.mode,
            sni,
            hsts: self.hsts.clone(),
        }
    }
}

/// One accepted connection: counted open while it lives, holding one permit of the
/// connection limit (which is also how the drain knows when the last one ended).
pub(super) struct OpenConnection {
    pub(super) context: Arc<ListenerContext>,
    _permit: OwnedSemaphorePermit,
}

impl OpenConnection {
    pub(super) fn new(context: Arc<ListenerContext>, permit: OwnedSemaphorePermit) -> Self {
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
