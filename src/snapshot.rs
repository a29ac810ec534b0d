//! Backends and the hot swap: the immutable [`Snapshot`] the request path reads, and the
//! [`Publisher`] that builds and swaps it.
//!
//! Discovery (static list today, Kubernetes next) calls [`Publisher::publish_nodes`]; the
//! request path does one `ArcSwap::load` per request and never locks. A backend's state (its
//! in-flight count, health, ejection and idle connections) lives in an `Arc<Backend>` shared
//! by every snapshot that holds the node, so it survives swaps; a removed node's `Arc` stays
//! alive exactly as long as requests on it, and its idle connections close when it goes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::http::uri::Authority;

use crate::metrics::{Metrics, RouteMetrics};
use crate::routing::{RouteId, RouteTable};
use crate::upstream::{ConnectTarget, IdlePool, PoolSettings};

/// Longest passive ejection, however often a node fails.
const MAX_EJECTION: Duration = Duration::from_secs(30);
/// First passive ejection; doubles with each consecutive failure.
const BASE_EJECTION: Duration = Duration::from_secs(1);

/// Milliseconds since the process's first call: a cheap clock for atomics.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// One node on one route port.
#[derive(Debug)]
pub struct Backend {
    pub node: Arc<str>,
    pub port: u16,
    /// `node:port`, IPv6 bracketed, ready for the upstream URI.
    pub authority: Authority,
    pub target: ConnectTarget,
    pub pool: IdlePool,
    in_flight: AtomicUsize,
    /// Verdict of the active health check (healthy until it says otherwise).
    healthy: AtomicBool,
    /// Consecutive connect failures or resets; drives the ejection backoff.
    failures: AtomicU32,
    /// Passively ejected until this [`now_ms`] instant.
    ejected_until: AtomicU64,
}

impl Backend {
    fn new(node: Arc<str>, port: u16, pool: PoolSettings) -> Option<Self> {
        let text = if node.contains(':') {
            format!("[{node}]:{port}")
        } else {
            format!("{node}:{port}")
        };
        let authority = Authority::try_from(text).ok()?;
        Some(Backend {
            target: ConnectTarget::new(&node, port),
            node,
            port,
            authority,
            pool: IdlePool::new(pool),
            in_flight: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
        })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// `Some(ms)` while passively ejected, with the [`now_ms`] instant it ends.
    pub fn ejected_until(&self, now: u64) -> Option<u64> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until > now).then_some(until)
    }

    /// Healthy by the active check and not passively ejected.
    pub fn is_usable(&self, now: u64) -> bool {
        self.is_healthy() && self.ejected_until(now).is_none()
    }

    /// Sets the active-check verdict; returns true when it changed. Going unhealthy closes
    /// the idle connections, so nothing reuses a connection to a node in trouble.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        let changed = self.healthy.swap(healthy, Ordering::Relaxed) != healthy;
        if changed && !healthy {
            self.pool.clear();
        }
        changed
    }

    /// A connect failure or reset: eject for a backoff that doubles with each consecutive
    /// failure (1 s up to 30 s). Returns the ejection length.
    pub fn record_failure(&self) -> Duration {
        let now = now_ms();
        if let Some(until) = self.ejected_until(now) {
            // Requests that were already on the node fail together when it dies; they are
            // one failure, not a reason to lengthen the ejection.
            return Duration::from_millis(until - now);
        }
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let factor = 1u32 << failures.saturating_sub(1).min(5);
        let ejection = (BASE_EJECTION * factor).min(MAX_EJECTION);
        self.ejected_until
            .store(now + ejection.as_millis() as u64, Ordering::Relaxed);
        self.pool.clear();
        ejection
    }

    /// A successful exchange resets the backoff.
    pub fn record_success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.ejected_until.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a request on this backend until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(self.clone())
    }
}

/// Holds one in-flight count on a backend (and keeps it alive while a removed node drains).
#[derive(Debug)]
pub struct InFlightGuard(Arc<Backend>);

impl InFlightGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The backends of one route.
#[derive(Debug, Default)]
pub struct RoutePool {
    pub backends: Vec<Arc<Backend>>,
    /// The route's request-path metrics.
    pub metrics: Arc<RouteMetrics>,
    /// Round-robin position.
    pub(crate) next: AtomicUsize,
    /// When (in [`now_ms`]) failing open was last logged, to log it once per interval.
    pub(crate) fail_open_logged: AtomicU64,
}

/// Request-path settings that a configuration reload may change.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub response_header_timeout: Duration,
    pub algorithm: crate::config::Algorithm,
    /// `Some(json)` when the access log is on.
    pub access_log: Option<bool>,
}

impl ProxySettings {
    pub fn from_config(config: &crate::config::Config) -> Self {
        ProxySettings {
            response_header_timeout: config.timeouts.upstream_response_header,
            algorithm: config.balancing.algorithm,
            access_log: config
                .access_log
                .enabled
                .then_some(config.access_log.format == crate::config::AccessLogFormat::Json),
        }
    }
}

/// Everything the request path needs, immutable once published.
#[derive(Debug)]
pub struct Snapshot {
    pub version: u64,
    pub settings: Arc<ProxySettings>,
    /// False until discovery has published its first node list.
    pub synced: bool,
    pub table: Arc<RouteTable>,
    /// Indexed by [`RouteId`].
    pub pools: Vec<RoutePool>,
}

impl Snapshot {
    pub fn pool(&self, route: RouteId) -> &RoutePool {
        &self.pools[route]
    }
}

/// Builds snapshots off the request path and swaps them in.
pub struct Publisher {
    current: Arc<ArcSwap<Snapshot>>,
    pool_settings: PoolSettings,
    metrics: Arc<Metrics>,
    state: Mutex<PublisherState>,
    versions: AtomicU64,
    /// Tells watchers (admin, tests) that a new snapshot is out; the request path never
    /// touches it.
    published: tokio::sync::watch::Sender<u64>,
}

struct PublisherState {
    table: Arc<RouteTable>,
    settings: Arc<ProxySettings>,
    synced: bool,
    nodes: Vec<Arc<str>>,
    /// Backends that any live snapshot or request still holds, by (node, port).
    registry: HashMap<(Arc<str>, u16), Weak<Backend>>,
}

impl Publisher {
    pub fn new(
        table: RouteTable,
        settings: ProxySettings,
        pool_settings: PoolSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let settings = Arc::new(settings);
        let table = Arc::new(table);
        let empty = Snapshot {
            version: 0,
            settings: settings.clone(),
            synced: false,
            pools: table
                .routes()
                .iter()
                .map(|_| RoutePool::default())
                .collect(),
            table: table.clone(),
        };
        Publisher {
            current: Arc::new(ArcSwap::from_pointee(empty)),
            pool_settings,
            metrics,
            state: Mutex::new(PublisherState {
                table,
                settings,
                synced: false,
                nodes: Vec::new(),
                registry: HashMap::new(),
            }),
            versions: AtomicU64::new(0),
            published: tokio::sync::watch::Sender::new(0),
        }
    }

    /// A receiver that sees the version of every snapshot published from now on.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// The handle the request path loads from.
    pub fn snapshots(&self) -> Arc<ArcSwap<Snapshot>> {
        self.current.clone()
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Publishes a new node list (addresses without port). Nodes that stay keep their state.
    pub fn publish_nodes(&self, nodes: &[String]) {
        let mut state = self.lock();
        state.nodes = nodes.iter().map(|n| Arc::<str>::from(n.as_str())).collect();
        state.synced = true;
        self.rebuild(&mut state);
    }

    /// Publishes a new route table and request-path settings with the current nodes, in one
    /// swap (a configuration reload).
    pub fn publish_config(&self, table: RouteTable, settings: ProxySettings) {
        let mut state = self.lock();
        state.table = Arc::new(table);
        state.settings = Arc::new(settings);
        self.rebuild(&mut state);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PublisherState> {
        // A panic while holding this lock cannot leave the state half-written in a way that
        // matters: every rebuild starts from scratch, so recover the guard.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rebuild(&self, state: &mut PublisherState) {
        let PublisherState {
            table,
            settings,
            synced,
            nodes,
            registry,
        } = state;
        registry.retain(|_, weak| weak.strong_count() > 0);
        let pools = table
            .routes()
            .iter()
            .map(|route| RoutePool {
                metrics: self.metrics.route(&route.name),
                backends: nodes
                    .iter()
                    .filter_map(|node| {
                        let key = (node.clone(), route.port);
                        if let Some(live) = registry.get(&key).and_then(Weak::upgrade) {
                            return Some(live);
                        }
                        let backend =
                            Arc::new(Backend::new(node.clone(), route.port, self.pool_settings)?);
                        registry.insert(key, Arc::downgrade(&backend));
                        Some(backend)
                    })
                    .collect(),
                next: AtomicUsize::new(0),
                fail_open_logged: AtomicU64::new(0),
            })
            .collect();
        let version = self.versions.fetch_add(1, Ordering::Relaxed) + 1;
        self.current.store(Arc::new(Snapshot {
            version,
            settings: settings.clone(),
            synced: *synced,
            table: table.clone(),
            pools,
        }));
        self.published.send_replace(version);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Route;

    /// A publisher with one `api` route on 30008, for unit tests here and in `balance`.
    pub(crate) fn publisher() -> Publisher {
        Publisher::new(
            RouteTable::new(vec![Route {
                name: "api".into(),
                hosts: vec!["api.x".into()],
                port: 30008,
                max_body_bytes: None,
                health: Default::default(),
            }]),
            test_settings(),
            PoolSettings::default(),
            Arc::new(Metrics::new()),
        )
    }

    pub(crate) fn test_settings() -> ProxySettings {
        ProxySettings {
            response_header_timeout: Duration::from_secs(300),
            algorithm: crate::config::Algorithm::P2c,
            access_log: None,
        }
    }

    #[test]
    fn state_survives_a_swap_for_nodes_that_stay() {
        let p = publisher();
        p.publish_nodes(&["10.0.0.1".into(), "10.0.0.2".into()]);
        let first = p.current();
        let guard = first.pool(0).backends[1].start_request();
        p.publish_nodes(&["10.0.0.2".into(), "fd00::3".into()]);
        let second = p.current();
        let pool = second.pool(0);
        assert_eq!(pool.backends.len(), 2);
        assert!(Arc::ptr_eq(&pool.backends[0], guard.backend()));
        assert_eq!(pool.backends[0].in_flight(), 1);
        assert_eq!(pool.backends[1].authority.as_str(), "[fd00::3]:30008");
        drop(guard);
        assert_eq!(pool.backends[0].in_flight(), 0);
        assert!(second.version > first.version);
    }

    #[test]
    fn failures_eject_with_growing_backoff_and_success_resets() {
        let p = publisher();
        p.publish_nodes(&["10.0.0.1".into()]);
        let snap = p.current();
        let b = &snap.pool(0).backends[0];
        assert!(b.is_usable(now_ms()));
        assert_eq!(b.record_failure(), Duration::from_secs(1));
        assert!(!b.is_usable(now_ms()));
        // Failures of requests already on the node while it is ejected do not escalate.
        assert!(b.record_failure() <= Duration::from_secs(1));
        let expire = |b: &Backend| b.ejected_until.store(0, Ordering::Relaxed);
        expire(b);
        assert_eq!(b.record_failure(), Duration::from_secs(2));
        for _ in 0..10 {
            expire(b);
            b.record_failure();
        }
        expire(b);
        assert_eq!(b.record_failure(), MAX_EJECTION);
        b.record_success();
        assert!(b.is_usable(now_ms()));
        assert!(b.set_healthy(false));
        assert!(!b.is_usable(now_ms()));
        assert!(!b.set_healthy(false));
    }
}
