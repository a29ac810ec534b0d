//! The admin listener: `/healthz` (the process serves), `/readyz` (discovery has synced and
//! every route has a node), `/metrics` (Prometheus) and `/backends` (each route's nodes as
//! the balancer sees them). Kept off the proxy listeners so probes and operators reach it on
//! its own, private address.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::discovery::DiscoveryStatus;
use crate::metrics::{CertLabel, Metrics, RouteLabel};
use crate::snapshot::{now_ms, Snapshot};
use crate::tls::Tls;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub snapshots: Arc<ArcSwap<Snapshot>>,
    pub discovery: Arc<DiscoveryStatus>,
    pub metrics: Arc<Metrics>,
    pub tls: Option<Arc<Tls>>,
    /// Where the nodes come from: `static` or `kubernetes`.
    pub source: &'static str,
}

/// Sets the gauges that describe state rather than count events, then renders everything.
pub fn metrics_text(state: &AdminState) -> String {
    let m = &state.metrics;
    let snapshot = state.snapshots.load();
    let now = now_ms();
    for (route, pool) in snapshot.table.routes().iter().zip(&snapshot.pools) {
        let label = RouteLabel {
            route: route.name.clone(),
        };
        let usable = pool.backends.iter().filter(|b| b.is_usable(now)).count();
        m.healthy_nodes.get_or_create(&label).set(usable as i64);
        m.nodes
            .get_or_create(&label)
            .set(pool.backends.len() as i64);
    }
    m.discovery_stale.set(i64::from(state.discovery.is_stale()));
    m.discovery_publishes
        .set(state.discovery.publishes() as i64);
    if let Some(tls) = &state.tls {
        for cert in &tls.store.load().certs {
            let label = CertLabel {
                cert: cert.files.cert.display().to_string(),
            };
            m.cert_expiry.get_or_create(&label).set(cert.not_after);
        }
    }
    m.render()
}

/// Readiness and the reasons when not ready.
pub fn readiness(state: &AdminState) -> (bool, String) {
    let snapshot = state.snapshots.load();
    let mut text = String::new();
    let mut ready = true;
    if !snapshot.synced {
        ready = false;
        text.push_str("not ready: waiting for the first node list\n");
    }
    for (route, pool) in snapshot.table.routes().iter().zip(&snapshot.pools) {
        let nodes = pool.backends.len();
        if nodes == 0 {
            ready = false;
        }
        let _ = writeln!(text, "route {}: {nodes} node(s)", route.name);
    }
    if state.discovery.is_stale() {
        text.push_str("discovery: stale (source unreachable; serving the last known nodes)\n");
    }
    if ready {
        text.insert_str(0, "ready\n");
    }
    (ready, text)
}

pub async fn serve(listener: TcpListener, state: AdminState, mut shutdown: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&req, &state)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Each route's nodes as JSON: address, health verdict, in-flight requests, passive
/// ejection (milliseconds left), idle pooled connections.
pub fn backends_json(state: &AdminState) -> serde_json::Value {
    let snapshot = state.snapshots.load();
    let now = now_ms();
    let routes: Vec<serde_json::Value> = snapshot
        .table
        .routes()
        .iter()
        .zip(&snapshot.pools)
        .map(|(route, pool)| {
            let nodes: Vec<serde_json::Value> = pool
                .backends
                .iter()
                .map(|b| {
                    serde_json::json!({
                        "node": &*b.node,
                        "address": b.authority.as_str(),
                        "healthy": b.is_healthy(),
                        "usable": b.is_usable(now),
                        "in_flight": b.in_flight(),
                        "ejected_for_ms": b.ejected_until(now).map(|until| until - now),
                        "idle_connections": b.pool.idle_count(),
                        "source": state.source,
                    })
                })
                .collect();
            serde_json::json!({
                "route": route.name,
                "hosts": route.hosts,
                "port": route.port,
                "nodes": nodes,
            })
        })
        .collect();
    serde_json::json!({
        "snapshot_version": snapshot.version,
        "synced": snapshot.synced,
        "discovery_stale": state.discovery.is_stale(),
        "routes": routes,
    })
}

fn route(req: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let (status, content_type, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, TEXT, "ok\n".to_string()),
        "/readyz" => match readiness(state) {
            (true, text) => (StatusCode::OK, TEXT, text),
            (false, text) => (StatusCode::SERVICE_UNAVAILABLE, TEXT, text),
        },
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics_text(state),
        ),
        "/backends" => (
            StatusCode::OK,
            "application/json",
            backends_json(state).to_string() + "\n",
        ),
        _ => (
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /healthz, /readyz, /metrics or /backends\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} (admin): {e}")))
}
