//! The server: listeners, connections, configuration reload and graceful shutdown.
//!
//! [`start`] binds the listeners (and the admin listener), starts discovery, the health
//! checks and the certificate watch, and hands back a [`RunningServer`]: the bound addresses,
//! and the way to reload the configuration and to stop.
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
//!
//! A connection's way through the files here:
//!
//! 1. `accept`: the accept loop takes a permit of the connection limit, accepts, and on a
//!    deferring listener reads a plain connection's first bytes at once.
//! 2. Set-up, in a task of its own when there is something to wait for: the TLS handshake
//!    (`tls`), or the first read that tells HTTP/2 prior knowledge from HTTP/1.1
//!    (`accept`).
//! 3. `connection`: the set-up connection is wrapped for the proxy and spawned into the
//!    task that serves it, `http1` (hyper's HTTP/1.1 in a loop that parks idle
//!    connections, and lingering close) or `http2`.
//!
//! `reload` applies a new configuration and names what needs a restart; `shutdown` holds
//! how each stage hears the shutdown, and the drain.

mod accept;
mod connection;
mod context;
mod http1;
mod http1_io;
mod http1_response;
mod http2;
mod protocol;
mod reload;
mod shutdown;
mod tls;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::header::HeaderValue;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::admin::AdminState;
use crate::config::{ListenerMode, NodeSource, Settings};
use crate::discovery::DiscoveryStatus;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::routing::RouteTable;
use crate::snapshot::{ProxySettings, Publisher};
use crate::tls::Tls;
use crate::upstream::PoolSettings;

use accept::{accept_loop, defer_accept};
use context::{ConnectionBuilders, ListenerContext};
use shutdown::drain_connections;

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
