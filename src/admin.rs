//! The admin listener: `/healthz` (the process serves) and `/readyz` (discovery has synced and
//! every route has a node). Kept off the proxy listeners so probes and operators reach it on
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
use crate::snapshot::Snapshot;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub snapshots: Arc<ArcSwap<Snapshot>>,
    pub discovery: Arc<DiscoveryStatus>,
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

fn route(req: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    let (status, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "ok\n".to_string()),
        "/readyz" => match readiness(state) {
            (true, text) => (StatusCode::OK, text),
            (false, text) => (StatusCode::SERVICE_UNAVAILABLE, text),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "not found: try /healthz or /readyz\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} (admin): {e}")))
}
