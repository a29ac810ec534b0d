//! Prometheus metrics (prometheus-client) and the per-request record that feeds them and the
//! access log.
//!
//! The request path touches only atomics: each route's counters and histogram are looked up
//! once, when a snapshot is built, and handed to requests as an `Arc<RouteMetrics>`. The
//! crate's histogram takes a mutex per observation, so request durations use
//! [`AtomicHistogram`], a fixed-bucket histogram of atomics encoded through the crate's own
//! encoder. Labelled families are touched only on rare paths (failures, reloads, scrapes).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// Upper bounds (seconds) of the request-duration buckets: from a fast API call to an
/// artifact transfer of many minutes.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0,
];

/// A histogram of atomics: observing is a few relaxed atomic adds, no lock. Clones share
/// the counts, like the crate's own metric types.
#[derive(Debug, Clone, Default)]
pub struct AtomicHistogram(Arc<HistogramCounts>);

#[derive(Debug)]
pub struct HistogramCounts {
    /// One count per bucket of `DURATION_BUCKETS`, plus +Inf.
    counts: [AtomicU64; DURATION_BUCKETS.len() + 1],
    count: AtomicU64,
    /// Sum in microseconds, to stay in an integer atomic.
    sum_micros: AtomicU64,
}

impl Default for HistogramCounts {
    fn default() -> Self {
        HistogramCounts {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl std::ops::Deref for AtomicHistogram {
    type Target = HistogramCounts;
    fn deref(&self) -> &HistogramCounts {
        &self.0
    }
}

impl HistogramCounts {
    pub fn observe_secs(&self, secs: f64) {
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|upper| secs <= *upper)
            .unwrap_or(DURATION_BUCKETS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = DURATION_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        encoder.encode_histogram::<NoLabelSet>(
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            self.count(),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteClassLabels {
    pub route: String,
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub route: String,
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

impl ResultLabel {
    pub fn ok() -> Self {
        ResultLabel {
            result: "ok".into(),
        }
    }

    pub fn failed() -> Self {
        ResultLabel {
            result: "failed".into(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabel {
    pub cert: String,
}

/// A route's request-path metrics, resolved once per snapshot.
#[derive(Debug, Default)]
pub struct RouteMetrics {
    pub name: String,
    /// Responses by status class: 1xx..5xx.
    by_class: [Counter; 5],
    pub duration: AtomicHistogram,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
}

impl RouteMetrics {
    pub fn record(&self, status: u16, secs: f64, bytes_out: u64) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class].inc();
        self.duration.observe_secs(secs);
        self.bytes_out.inc_by(bytes_out);
    }
}

/// Every metric the proxy exports, and the registry that renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteClassLabels, Counter>,
    durations: Family<RouteLabel, AtomicHistogram>,
    bytes_in: Family<RouteLabel, Counter>,
    bytes_out: Family<RouteLabel, Counter>,
    pub open_connections: Gauge,
    pub parked_connections: Gauge,
    pub connect_errors: Family<NodeLabels, Counter>,
    pub retries: Family<NodeLabels, Counter>,
    pub healthy_nodes: Family<RouteLabel, Gauge>,
    pub nodes: Family<RouteLabel, Gauge>,
    pub discovery_publishes: Gauge,
    pub discovery_stale: Gauge,
    pub tls_handshakes: Family<ResultLabel, Counter>,
    pub cert_expiry: Family<CertLabel, Gauge>,
    pub config_reloads: Family<ResultLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("clearml_edge");
        let m = Metrics {
            requests: Family::default(),
            durations: Family::default(),
            bytes_in: Family::default(),
            bytes_out: Family::default(),
            open_connections: Gauge::default(),
            parked_connections: Gauge::default(),
            connect_errors: Family::default(),
            retries: Family::default(),
            healthy_nodes: Family::default(),
            nodes: Family::default(),
            discovery_publishes: Gauge::default(),
            discovery_stale: Gauge::default(),
            tls_handshakes: Family::default(),
            cert_expiry: Family::default(),
            config_reloads: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Responses sent, by route and status class",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to the last response byte, by route",
            m.durations.clone(),
        );
        registry.register(
            "request_bytes",
            "Request body bytes forwarded to nodes, by route",
            m.bytes_in.clone(),
        );
        registry.register(
            "response_bytes",
            "Response body bytes sent to clients, by route",
            m.bytes_out.clone(),
        );
        registry.register(
            "open_connections",
            "Client connections open now",
            m.open_connections.clone(),
        );
        registry.register(
            "parked_connections",
            "HTTP/1.1 client connections idle between requests, holding no buffers",
            m.parked_connections.clone(),
        );
        registry.register(
            "upstream_connect_errors",
            "Failed connects and resets before a response, by route and node",
            m.connect_errors.clone(),
        );
        registry.register(
            "upstream_retries",
            "Requests sent again to another node, by route and the node that failed",
            m.retries.clone(),
        );
        registry.register(
            "healthy_nodes",
            "Nodes of a route that pass their health check and are not ejected",
            m.healthy_nodes.clone(),
        );
        registry.register("nodes", "Nodes of a route", m.nodes.clone());
        registry.register(
            "discovery_publishes",
            "Node lists published by discovery",
            m.discovery_publishes.clone(),
        );
        registry.register(
            "discovery_stale",
            "1 while the node source is unreachable and the last known nodes serve",
            m.discovery_stale.clone(),
        );
        registry.register(
            "tls_handshakes",
            "TLS handshakes by result",
            m.tls_handshakes.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When each served certificate expires (Unix time)",
            m.cert_expiry.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads by result",
            m.config_reloads.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The lock-free handles of one route.
    pub fn route(&self, name: &str) -> Arc<RouteMetrics> {
        let label = |class: &str| RouteClassLabels {
            route: name.to_string(),
            class: class.to_string(),
        };
        let route = RouteLabel {
            route: name.to_string(),
        };
        Arc::new(RouteMetrics {
            name: name.to_string(),
            by_class: ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .map(|class| self.requests.get_or_create(&label(class)).clone()),
            duration: self.durations.get_or_create(&route).clone(),
            bytes_in: self.bytes_in.get_or_create(&route).clone(),
            bytes_out: self.bytes_out.get_or_create(&route).clone(),
        })
    }

    pub fn node_labels(route: &str, node: &str) -> NodeLabels {
        NodeLabels {
            route: route.to_string(),
            node: node.to_string(),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// One request's account, completed when its response body ends (or is dropped): the
/// route's metrics and, when enabled, one access-log line.
#[derive(Debug)]
pub struct RequestRecord {
    pub started: Instant,
    pub route: Option<Arc<RouteMetrics>>,
    pub status: u16,
    pub bytes_out: u64,
    pub access: Option<Box<AccessEntry>>,
}

/// The fields of an access-log line that are known before the response ends.
#[derive(Debug)]
pub struct AccessEntry {
    pub json: bool,
    pub client: std::net::SocketAddr,
    pub host: String,
    pub method: String,
    pub path: String,
    pub node: Option<String>,
    pub retries: u32,
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let secs = self.started.elapsed().as_secs_f64();
        if let Some(route) = &self.route {
            route.record(self.status, secs, self.bytes_out);
        }
        if let Some(entry) = &self.access {
            let route = self.route.as_ref().map_or("-", |r| r.name.as_str());
            let node = entry.node.as_deref().unwrap_or("-");
            let ms = secs * 1000.0;
            if entry.json {
                let line = serde_json::json!({
                    "client": entry.client.to_string(),
                    "host": entry.host,
                    "method": entry.method,
                    "path": entry.path,
                    "status": self.status,
                    "bytes": self.bytes_out,
                    "duration_ms": (ms * 1000.0).round() / 1000.0,
                    "route": route,
                    "upstream": node,
                    "retries": entry.retries,
                });
                tracing::info!(target: "access", "{line}");
            } else {
                tracing::info!(
                    target: "access",
                    "{} {} \"{} {}\" {} {} {:.3}ms route={} upstream={} retries={}",
                    entry.client.ip(),
                    entry.host,
                    entry.method,
                    entry.path,
                    self.status,
                    self.bytes_out,
                    ms,
                    route,
                    node,
                    entry.retries
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_metrics_render_with_labels() {
        let m = Metrics::new();
        let api = m.route("api");
        api.record(200, 0.003, 10);
        api.record(502, 0.5, 5);
        api.bytes_in.inc_by(7);
        let text = m.render();
        assert!(
            text.contains("clearml_edge_requests_total{route=\"api\",class=\"2xx\"} 1"),
            "{text}"
        );
        assert!(text.contains("clearml_edge_requests_total{route=\"api\",class=\"5xx\"} 1"));
        assert!(text.contains("clearml_edge_request_duration_seconds_count{route=\"api\"} 2"));
        assert!(
            text.contains(
                "clearml_edge_request_duration_seconds_bucket{le=\"0.005\",route=\"api\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("clearml_edge_response_bytes_total{route=\"api\"} 15"));
        assert!(
            text.contains(
                "clearml_edge_request_duration_seconds_bucket{le=\"+Inf\",route=\"api\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("clearml_edge_request_bytes_total{route=\"api\"} 7"));
    }
}
