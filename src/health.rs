//! Active health checks: one probe loop per backend (node × route port), started and stopped
//! as snapshots come and go.
//!
//! A probe is a fresh TCP connection, and for `http` checks a `GET` of the route's health
//! path with the route's host name and no credentials (ClearML's file server answers 401 to
//! a bad token, `OK` to none). `fall` consecutive failures take a node out, `rise` consecutive
//! successes bring it back; each change is one log line. The loop also closes idle pooled
//! connections that have outlived the idle timeout.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::{HeaderValue, CONNECTION, HOST, USER_AGENT};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::task::JoinHandle;

use crate::config::{HealthCheck, HealthConfig, HealthKind};
use crate::snapshot::{Backend, Publisher};

/// Runs until the publisher goes away: keeps one probe loop per live backend.
pub async fn run(publisher: Arc<Publisher>, config: HealthConfig) {
    let mut versions = publisher.subscribe();
    let mut probes: HashMap<(Arc<str>, u16), JoinHandle<()>> = HashMap::new();
    loop {
        let snapshot = publisher.current();
        let mut live: HashMap<(Arc<str>, u16), ()> = HashMap::new();
        for (route, pool) in snapshot.table.routes().iter().zip(&snapshot.pools) {
            for backend in &pool.backends {
                let key = (backend.node.clone(), backend.port);
                if live.insert(key.clone(), ()).is_some() {
                    continue; // two routes on one port share the backend and its probe
                }
                let running = probes.get(&key).is_some_and(|p| !p.is_finished());
                if !running {
                    let check = route.health.clone();
                    let host = route.hosts[0].clone();
                    let weak = Arc::downgrade(backend);
                    let config = config.clone();
                    probes.insert(key, tokio::spawn(probe_loop(weak, check, host, config)));
                }
            }
        }
        probes.retain(|key, task| {
            let keep = live.contains_key(key);
            if !keep {
                task.abort();
            }
            keep
        });
        drop(snapshot);
        if versions.changed().await.is_err() {
            return;
        }
    }
}

async fn probe_loop(
    backend: Weak<Backend>,
    check: HealthCheck,
    host: String,
    config: HealthConfig,
) {
    let mut successes = 0u32;
    let mut failures = 0u32;
    // Nodes start healthy; the first check comes one interval in.
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + config.interval,
        config.interval,
    );
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(backend) = backend.upgrade() else {
            return;
        };
        backend.pool.reap();
        if check.kind == HealthKind::None {
            continue;
        }
        match probe(&backend, &check, &host, config.timeout).await {
            Ok(()) => {
                failures = 0;
                successes = successes.saturating_add(1);
                if !backend.is_healthy() && successes >= config.rise && backend.set_healthy(true) {
                    tracing::info!(node = %backend.authority, route_host = %host, "node healthy again");
                }
            }
            Err(reason) => {
                successes = 0;
                failures = failures.saturating_add(1);
                if backend.is_healthy() && failures >= config.fall && backend.set_healthy(false) {
                    tracing::warn!(node = %backend.authority, route_host = %host, %reason, "node unhealthy: no new requests until it recovers");
                } else {
                    tracing::debug!(node = %backend.authority, %reason, "health check failed");
                }
            }
        }
    }
}

/// One check; `Err` carries a short reason for the log.
async fn probe(
    backend: &Backend,
    check: &HealthCheck,
    host: &str,
    timeout: Duration,
) -> Result<(), String> {
    let attempt = async {
        let stream = backend
            .target
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        if check.kind == HealthKind::Tcp {
            return Ok(());
        }
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(connection);
        let mut request = Request::new(Empty::new());
        *request.uri_mut() = check
            .path
            .parse()
            .map_err(|_| format!("bad health path {:?}", check.path))?;
        let headers = request.headers_mut();
        if let Ok(host) = HeaderValue::from_str(host) {
            headers.insert(HOST, host);
        }
        headers.insert(USER_AGENT, HeaderValue::from_static("clearml-edge-health"));
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}
