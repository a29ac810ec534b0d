//! Configuration: the TOML schema, ClearML's defaults, and validation.
//!
//! The file is parsed once into [`Config`]; [`Config::load`] rejects unknown keys and every
//! semantic mistake with a [`ConfigError`] that names the file, the key, what is wrong and how
//! to fix it. Nothing downstream re-checks what is validated here.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

// Defined in `tls`, which loads the files, so that the dependency goes one way: this module
// validates certificates with `tls`, and `tls` needs nothing from here.
pub use crate::tls::CertificateFiles;

/// The ClearML Server NodePort services, as its Kubernetes install guide publishes them:
/// (route name = host label, node port).
pub const CLEARML_ROUTES: [(&str, u16); 3] = [("app", 30080), ("files", 30081), ("api", 30008)];

/// Upper bound of `limits.max_connections` (the drain counts connections in a `u32`; far
/// beyond any open-file limit anyway).
pub const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The DNS domain the routes hang under: `app.<domain>`, `files.<domain>`, `api.<domain>`.
    /// Default `localhost`, so `app.localhost` works on a laptop.
    #[serde(default = "default_domain")]
    pub domain: String,
    /// Client-facing listeners. Default: one plain-HTTP listener on `0.0.0.0:8080`.
    #[serde(default = "default_listeners")]
    pub listeners: Vec<ListenerConfig>,
    /// Routes by name. The ClearML routes `app`, `files` and `api` always exist with their
    /// node ports; a `[routes.<name>]` table overrides their fields or adds a new route.
    #[serde(default)]
    pub routes: BTreeMap<String, RouteOverride>,
    /// Where the node list comes from: `[discovery.static]` or `[discovery.kubernetes]`.
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    /// The admin listener (`/healthz`, `/readyz`). Absent: no admin listener.
    pub admin: Option<AdminConfig>,
    /// Certificates for TLS listeners.
    pub tls: Option<TlsConfig>,
    /// One line per request, like nginx's access log.
    #[serde(default)]
    pub access_log: AccessLogConfig,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Active health checks (timing; the check itself is per route).
    #[serde(default)]
    pub health: HealthConfig,
    /// How requests are spread and retried.
    #[serde(default)]
    pub balancing: BalancingConfig,
    #[serde(default)]
    pub limits: Limits,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `ip:port` to bind, e.g. `0.0.0.0:8080` or `[::]:8080`.
    pub address: String,
    /// Serve HTTPS with the `[tls]` certificates. Default false.
    #[serde(default)]
    pub tls: bool,
    /// On a plain listener: `serve` (default) or `redirect` every request to HTTPS with 308,
    /// which keeps method, path and query (an upload POST stays a POST).
    #[serde(default)]
    pub plain_http: PlainHttp,
    /// Port in the redirect's `Location`. Default 443 (the public HTTPS port, e.g. of the
    /// Kubernetes Service in front of a TLS listener on 8443).
    pub https_port: Option<u16>,
    /// Hand a connection over only once the client has sent something (Linux
    /// `TCP_DEFER_ACCEPT`). Default true.
    #[serde(default = "default_true")]
    pub defer_accept: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlainHttp {
    #[default]
    Serve,
    Redirect,
}

/// What a listener does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerMode {
    Plain,
    Tls,
    /// Plain HTTP answered with 308 to `https://host[:port]`.
    RedirectToHttps {
        https_port: u16,
    },
}

/// A validated listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    pub mode: ListenerMode,
    pub defer_accept: bool,
}

/// `[access_log]`: one line per request (client, host, method, path, status, bytes,
/// duration, route, upstream node, retries), logged through tracing with target `access`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    /// Default false: with it on, a request costs about 10% more proxy CPU in the loopback
    /// measurement in README.md, so it is a choice rather than a default.
    pub enabled: bool,
    /// `text` (default) or `json`.
    pub format: AccessLogFormat,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            enabled: false,
            format: AccessLogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    #[default]
    Text,
    Json,
}

/// `[tls]`: certificates for the TLS listeners.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chains and keys (PEM). SNI picks by the names in each certificate (exact
    /// before wildcard); the first is the default for clients without SNI.
    pub certificates: Vec<CertificateFiles>,
    /// How often the files are checked for changes (a renewed Secret). Default 10s.
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
    /// `Strict-Transport-Security` value added to HTTPS responses, e.g.
    /// "max-age=31536000; includeSubDomains". Default: none.
    pub hsts: Option<String>,
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(10)
}

/// One `[routes.<name>]` table as written; missing fields take the route's defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteOverride {
    /// Full host name. Default: `<host_prefix>.<domain>`.
    pub host: Option<String>,
    /// First DNS label. Default: the route's name.
    pub host_prefix: Option<String>,
    /// Node port the route's traffic goes to. Required for routes other than app/files/api.
    pub port: Option<u16>,
    /// More host names answered by this route (full names).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Largest request body accepted, in bytes; larger ones get 413 before anything reaches
    /// a node. Default: no limit (ClearML uploads are single multi-GB requests).
    pub max_body_bytes: Option<u64>,
    /// `false` removes a default route.
    pub enabled: Option<bool>,
    /// Active check of each node on this route's port: `http` (GET `health_path`, healthy on
    /// 2xx/3xx), `tcp` (connect only) or `none`. Default `http`.
    pub health_check: Option<HealthKind>,
    /// Path of the HTTP check. Default `/debug.ping` for api, `/` for the others (the file
    /// server answers `GET /` with `OK`; no credentials are sent).
    pub health_path: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    #[default]
    Http,
    Tcp,
    None,
}

/// A route's active check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: HealthKind,
    pub path: String,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            kind: HealthKind::Http,
            path: "/".into(),
        }
    }
}

/// `[health]`: timing of the active checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Time between checks of one node. Default 5s.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Time one check may take. Default 2s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive successes that bring an unhealthy node back. Default 2.
    pub rise: u32,
    /// Consecutive failures that take a node out. Default 3.
    pub fall: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            rise: 2,
            fall: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Power of two choices on in-flight requests.
    #[default]
    P2c,
    RoundRobin,
}

/// `[balancing]`: spreading and retrying.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalancingConfig {
    /// `p2c` (default: the less busy of two random nodes) or `round_robin`.
    pub algorithm: Algorithm,
    /// Retries allowed, as a percentage of requests (a token bucket with a small reserve),
    /// so a failing cluster is not hit by a retry storm. Default 20.
    pub retry_budget_percent: u32,
    /// Idle keep-alive connections kept per node and port. Default 64.
    pub max_idle_per_node: usize,
}

impl Default for BalancingConfig {
    fn default() -> Self {
        BalancingConfig {
            algorithm: Algorithm::P2c,
            retry_budget_percent: 20,
            max_idle_per_node: 64,
        }
    }
}

/// An effective route, after defaults and overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    /// Host names, lower case, without trailing dot; the first is the canonical one.
    pub hosts: Vec<String>,
    pub port: u16,
    pub max_body_bytes: Option<u64>,
    pub health: HealthCheck,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `ip:port` of the admin listener; keep it on loopback or a private network.
    pub address: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// A fixed list of node addresses.
    #[serde(rename = "static")]
    pub static_nodes: Option<StaticDiscovery>,
    /// Watch the cluster's Node objects.
    pub kubernetes: Option<KubernetesDiscovery>,
}

/// `[discovery.kubernetes]`: which Node objects are backends and how to reach them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesDiscovery {
    /// Server-side label selector for the nodes. Default `app=clearml`, the label ClearML's
    /// guide puts on its node. An empty string selects every node.
    #[serde(default = "default_label_selector")]
    pub label_selector: String,
    /// Node address types to use, in order of preference. Default
    /// `["InternalIP", "ExternalIP", "Hostname"]`.
    #[serde(default = "default_address_types")]
    pub address_types: Vec<AddressType>,
    /// Whether cordoned nodes (`spec.unschedulable`) stay backends. Default true: cordoning
    /// only stops new pods; the node still serves its NodePorts.
    #[serde(default = "default_true")]
    pub include_unschedulable: bool,
    /// Kubeconfig file. Default: `KUBECONFIG` or `~/.kube/config`, else the in-cluster
    /// service account.
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context. Default: the file's current context.
    pub context: Option<String>,
}

/// A `status.addresses[].type` of a Node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AddressType {
    InternalIP,
    ExternalIP,
    Hostname,
}

impl AddressType {
    pub fn as_str(self) -> &'static str {
        match self {
            AddressType::InternalIP => "InternalIP",
            AddressType::ExternalIP => "ExternalIP",
            AddressType::Hostname => "Hostname",
        }
    }
}

/// Where the backends' node list comes from, after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeSource {
    Static(Vec<String>),
    Kubernetes(KubernetesDiscovery),
}

fn default_label_selector() -> String {
    "app=clearml".to_string()
}

fn default_address_types() -> Vec<AddressType> {
    vec![
        AddressType::InternalIP,
        AddressType::ExternalIP,
        AddressType::Hostname,
    ]
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticDiscovery {
    /// Node addresses (IPv4, IPv6 or DNS names), without port: the route supplies the port.
    pub nodes: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP connect to a node. Default 5s.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// Time a client has to send a whole request head (anti-slowloris); it does not limit
    /// bodies. Default 30s.
    #[serde(with = "humantime_serde")]
    pub client_header: Duration,
    /// Time a node has to start answering once the request is fully sent. Default 300s, the
    /// ClearML SDK's own read timeout.
    #[serde(with = "humantime_serde")]
    pub upstream_response_header: Duration,
    /// How long an idle pooled connection to a node stays open, and the HTTP/2 client ping
    /// interval (half of it). Idle HTTP/1.1 client connections are bounded by `client_header`,
    /// as hyper arms that timer while it waits for the next request. Default 75s.
    #[serde(with = "humantime_serde")]
    pub idle_keepalive: Duration,
    /// On SIGTERM/SIGINT, how long in-flight requests may run before the process exits.
    /// Default 30s.
    #[serde(with = "humantime_serde")]
    pub shutdown_drain: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            client_header: Duration::from_secs(30),
            upstream_response_header: Duration::from_secs(300),
            idle_keepalive: Duration::from_secs(75),
            shutdown_drain: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request head (request line + headers) in bytes; larger gets 431. Default 65536,
    /// minimum 8192.
    pub max_request_header_bytes: usize,
    /// Most client connections open at once; further clients wait in the accept queue.
    /// Default 10000.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_header_bytes: 64 * 1024,
            max_connections: 10_000,
        }
    }
}

/// The smallest read buffer hyper's HTTP/1 server accepts.
pub const MIN_HEADER_BYTES: usize = 8192;

fn default_domain() -> String {
    "localhost".to_string()
}

fn default_listeners() -> Vec<ListenerConfig> {
    vec![ListenerConfig {
        address: "0.0.0.0:8080".to_string(),
        tls: false,
        plain_http: PlainHttp::Serve,
        https_port: None,
        defer_accept: true,
    }]
}

/// A configuration mistake: where it is and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: `{}`: {}\n  fix: {}",
            self.file.display(),
            self.key,
            self.problem,
            self.fix
        )
    }
}

impl std::error::Error for ConfigError {}

/// The validated configuration with its effective routes.
#[derive(Debug, Clone)]
pub struct Settings {
    pub source: PathBuf,
    pub config: Config,
    pub listeners: Vec<Listener>,
    pub routes: Vec<Route>,
    pub nodes: NodeSource,
    pub admin: Option<SocketAddr>,
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            key: "(file)".into(),
            problem: format!("cannot read the file: {e}"),
            fix: "pass an existing, readable TOML file with --config".into(),
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates configuration text; `path` is only used in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Settings, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let key = toml_error_key(text, &e);
            ConfigError {
                file: path.to_path_buf(),
                key,
                problem: e.message().to_string(),
                fix: "correct the key or value; the configuration reference in README.md lists every key".into(),
            }
        })?;
        config.validate(path)
    }

    fn validate(self, path: &Path) -> Result<Settings, ConfigError> {
        let err = |key: &str, problem: String, fix: &str| ConfigError {
            file: path.to_path_buf(),
            key: key.to_string(),
            problem,
            fix: fix.to_string(),
        };

        let domain = self.domain.trim_end_matches('.').to_ascii_lowercase();
        if !is_host_name(&domain) {
            return Err(err(
                "domain",
                format!("{:?} is not a DNS name", self.domain),
                "set domain to the name your ClearML records hang under, e.g. domain = \"clearml.example.com\"",
            ));
        }

        if self.listeners.is_empty() {
            return Err(err(
                "listeners",
                "no listener is configured".into(),
                "add one, e.g. [[listeners]] address = \"0.0.0.0:8080\"",
            ));
        }
        let mut listeners: Vec<Listener> = Vec::with_capacity(self.listeners.len());
        for (i, listener) in self.listeners.iter().enumerate() {
            let key = format!("listeners[{i}].address");
            let addr: SocketAddr = listener.address.parse().map_err(|_| {
                err(
                    &key,
                    format!("{:?} is not an ip:port address", listener.address),
                    "write it as \"0.0.0.0:8080\" or \"[::]:8080\"",
                )
            })?;
            if addr.port() != 0 && listeners.iter().any(|l| l.addr == addr) {
                return Err(err(
                    &key,
                    format!("{addr} is listed twice"),
                    "remove the duplicate listener",
                ));
            }
            let mode = match (listener.tls, listener.plain_http) {
                (true, PlainHttp::Redirect) => {
                    return Err(err(
                        &format!("listeners[{i}].plain_http"),
                        "a TLS listener cannot redirect to HTTPS".into(),
                        "set plain_http = \"redirect\" on a plain listener only",
                    ))
                }
                (true, PlainHttp::Serve) => {
                    if self.tls.as_ref().is_none_or(|t| t.certificates.is_empty()) {
                        return Err(err(
                            &format!("listeners[{i}].tls"),
                            "a TLS listener needs certificates, and [tls] lists none".into(),
                            "add [[tls.certificates]] cert = \"tls.crt\" key = \"tls.key\"",
                        ));
                    }
                    ListenerMode::Tls
                }
                (false, PlainHttp::Serve) => ListenerMode::Plain,
                (false, PlainHttp::Redirect) => ListenerMode::RedirectToHttps {
                    https_port: match listener.https_port {
                        Some(0) => {
                            return Err(err(
                                &format!("listeners[{i}].https_port"),
                                "0 is not a port clients can be sent to".into(),
                                "give the public HTTPS port, 1-65535 (default 443)",
                            ))
                        }
                        port => port.unwrap_or(443),
                    },
                },
            };
            listeners.push(Listener {
                addr,
                mode,
                defer_accept: listener.defer_accept,
            });
        }

        let routes = self.effective_routes(&domain, path)?;

        let nodes = match (&self.discovery.static_nodes, &self.discovery.kubernetes) {
            (None, None) => {
                return Err(err(
                    "discovery",
                    "no node source is configured".into(),
                    "add [discovery.static] nodes = [\"10.0.0.5\", ...] with your cluster nodes' addresses, or [discovery.kubernetes] to watch the cluster's nodes",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(err(
                    "discovery",
                    "both [discovery.static] and [discovery.kubernetes] are set".into(),
                    "keep one node source",
                ))
            }
            (None, Some(k)) => NodeSource::Kubernetes(validate_kubernetes(k, path)?),
            (Some(s), None) => {
                if s.nodes.is_empty() {
                    return Err(err(
                        "discovery.static.nodes",
                        "the node list is empty".into(),
                        "list at least one node address, e.g. nodes = [\"127.0.0.1\"]",
                    ));
                }
                let mut nodes: Vec<String> = Vec::with_capacity(s.nodes.len());
                for (i, node) in s.nodes.iter().enumerate() {
                    let key = format!("discovery.static.nodes[{i}]");
                    let normalized = normalize_node(node).ok_or_else(|| {
                        err(
                            &key,
                            format!("{node:?} is not an IP address or DNS name"),
                            "write the node's address without a port, e.g. \"10.0.0.5\", \"fd00::5\" or \"node-1.internal\"; the route gives the port",
                        )
                    })?;
                    if nodes.contains(&normalized) {
                        return Err(err(
                            &key,
                            format!("{node:?} is listed twice"),
                            "remove the duplicate node",
                        ));
                    }
                    nodes.push(normalized);
                }
                NodeSource::Static(nodes)
            }
        };

        let admin = match &self.admin {
            None => None,
            Some(a) => {
                let addr: SocketAddr = a.address.parse().map_err(|_| {
                    err(
                        "admin.address",
                        format!("{:?} is not an ip:port address", a.address),
                        "write it as \"127.0.0.1:9901\"",
                    )
                })?;
                if addr.port() != 0 && listeners.iter().any(|l| l.addr == addr) {
                    return Err(err(
                        "admin.address",
                        format!("{addr} is also a proxy listener"),
                        "give the admin listener its own port",
                    ));
                }
                Some(addr)
            }
        };

        let t = &self.timeouts;
        for (key, value) in [
            ("timeouts.connect", t.connect),
            ("timeouts.client_header", t.client_header),
            (
                "timeouts.upstream_response_header",
                t.upstream_response_header,
            ),
            ("timeouts.idle_keepalive", t.idle_keepalive),
        ] {
            if value.is_zero() {
                return Err(err(
                    key,
                    "a zero timeout would fail every request".into(),
                    "give a positive duration, e.g. \"30s\"",
                ));
            }
        }

        let h = &self.health;
        if h.interval.is_zero() || h.timeout.is_zero() {
            return Err(err(
                if h.interval.is_zero() {
                    "health.interval"
                } else {
                    "health.timeout"
                },
                "a zero duration cannot pace or bound a check".into(),
                "give a positive duration, e.g. \"5s\"",
            ));
        }
        if h.rise == 0 || h.fall == 0 {
            return Err(err(
                if h.rise == 0 {
                    "health.rise"
                } else {
                    "health.fall"
                },
                "0 checks cannot decide anything".into(),
                "use 1 or more (defaults: rise 2, fall 3)",
            ));
        }
        if self.balancing.retry_budget_percent > 100 {
            return Err(err(
                "balancing.retry_budget_percent",
                format!("{} is over 100", self.balancing.retry_budget_percent),
                "give a percentage of requests, 0-100 (default 20)",
            ));
        }

        if self.limits.max_request_header_bytes < MIN_HEADER_BYTES {
            return Err(err(
                "limits.max_request_header_bytes",
                format!(
                    "{} is below the minimum of {MIN_HEADER_BYTES}",
                    self.limits.max_request_header_bytes
                ),
                "set it to 8192 or more (default 65536)",
            ));
        }
        if self.limits.max_connections == 0 {
            return Err(err(
                "limits.max_connections",
                "0 would refuse every client".into(),
                "set a positive number (default 10000)",
            ));
        }
        if self.limits.max_connections > MAX_CONNECTIONS_LIMIT {
            return Err(err(
                "limits.max_connections",
                format!(
                    "{} is more than the proxy can count",
                    self.limits.max_connections
                ),
                "set it to 1000000 or less (default 10000)",
            ));
        }

        if let Some(tls) = &self.tls {
            if let Some(hsts) = &tls.hsts {
                if hyper::header::HeaderValue::from_str(hsts).is_err() || !hsts.contains("max-age=")
                {
                    return Err(err(
                        "tls.hsts",
                        format!("{hsts:?} is not a Strict-Transport-Security value"),
                        "write it as \"max-age=31536000\" (optionally \"; includeSubDomains\")",
                    ));
                }
            }
            check_certificates(tls, &routes, path)?;
        }

        Ok(Settings {
            source: path.to_path_buf(),
            listeners,
            routes,
            nodes,
            admin,
            config: self,
        })
    }

    fn effective_routes(&self, domain: &str, path: &Path) -> Result<Vec<Route>, ConfigError> {
        let err = |key: String, problem: String, fix: String| ConfigError {
            file: path.to_path_buf(),
            key,
            problem,
            fix,
        };
        let mut names: Vec<&str> = CLEARML_ROUTES.iter().map(|(n, _)| *n).collect();
        for name in self.routes.keys() {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }

        let mut routes: Vec<Route> = Vec::new();
        for name in names {
            let over = self.routes.get(name).cloned().unwrap_or_default();
            if over.enabled == Some(false) {
                continue;
            }
            let default_port = CLEARML_ROUTES
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, p)| *p);
            let port = match over.port.or(default_port) {
                Some(0) => {
                    return Err(err(
                        format!("routes.{name}.port"),
                        "0 is not a usable port".into(),
                        "give the node port of the service, 1-65535".into(),
                    ))
                }
                Some(p) => p,
                None => {
                    return Err(err(
                        format!("routes.{name}.port"),
                        "the route has no port".into(),
                        format!("add port = <node port> under [routes.{name}]"),
                    ))
                }
            };
            let prefix = over
                .host_prefix
                .clone()
                .unwrap_or_else(|| name.to_string())
                .to_ascii_lowercase();
            let main_host = match &over.host {
                Some(h) => h.trim_end_matches('.').to_ascii_lowercase(),
                None => format!("{prefix}.{domain}"),
            };
            let mut hosts = vec![main_host];
            hosts.extend(
                over.aliases
                    .iter()
                    .map(|a| a.trim_end_matches('.').to_ascii_lowercase()),
            );
            for (i, host) in hosts.iter().enumerate() {
                let key = match i {
                    0 if over.host.is_some() => format!("routes.{name}.host"),
                    0 => format!("routes.{name}.host_prefix"),
                    _ => format!("routes.{name}.aliases[{}]", i - 1),
                };
                if !is_host_name(host) {
                    return Err(err(
                        key,
                        format!("{host:?} is not a DNS name"),
                        "use a host name without scheme, port or path, e.g. \"app.example.com\""
                            .into(),
                    ));
                }
                if let Some(other) = routes.iter().find(|r| r.hosts.contains(host)) {
                    return Err(err(
                        key,
                        format!("host {host:?} is already served by route {:?}", other.name),
                        "give each host name to one route only".into(),
                    ));
                }
            }
            if let Some(dup) = hosts
                .iter()
                .enumerate()
                .find(|(i, h)| hosts[..*i].contains(h))
            {
                return Err(err(
                    format!("routes.{name}.aliases"),
                    format!("host {:?} appears twice in the route", dup.1),
                    "remove the duplicate alias".into(),
                ));
            }
            if over.max_body_bytes == Some(0) {
                return Err(err(
                    format!("routes.{name}.max_body_bytes"),
                    "0 would refuse every request with a body".into(),
                    "remove the key for no limit, or give a size in bytes".into(),
                ));
            }
            let health_path = over
                .health_path
                .clone()
                .unwrap_or_else(|| if name == "api" { "/debug.ping" } else { "/" }.to_string());
            if !health_path.starts_with('/') || health_path.contains(char::is_whitespace) {
                return Err(err(
                    format!("routes.{name}.health_path"),
                    format!("{health_path:?} is not a request path"),
                    "write a path starting with /, e.g. \"/debug.ping\"".into(),
                ));
            }
            routes.push(Route {
                name: name.to_string(),
                hosts,
                port,
                max_body_bytes: over.max_body_bytes,
                health: HealthCheck {
                    kind: over.health_check.unwrap_or_default(),
                    path: health_path,
                },
            });
        }
        if routes.is_empty() {
            return Err(err(
                "routes".into(),
                "every route is disabled".into(),
                "enable at least one route".into(),
            ));
        }
        Ok(routes)
    }
}

/// Loads the certificates once to report problems at `check` and at start, and checks that
/// every route host is covered.
fn check_certificates(tls: &TlsConfig, routes: &[Route], path: &Path) -> Result<(), ConfigError> {
    if tls.certificates.is_empty() {
        return Err(ConfigError {
            file: path.to_path_buf(),
            key: "tls.certificates".into(),
            problem: "no certificate is listed".into(),
            fix: "add [[tls.certificates]] cert = \"tls.crt\" key = \"tls.key\", or remove [tls]"
                .into(),
        });
    }
    let store = crate::tls::CertStore::load(&tls.certificates).map_err(|e| {
        let index = tls
            .certificates
            .iter()
            .position(|c| c.cert == e.file || c.key == e.file)
            .unwrap_or(0);
        let field = if tls.certificates.get(index).is_some_and(|c| c.key == e.file) {
            "key"
        } else {
            "cert"
        };
        ConfigError {
            file: path.to_path_buf(),
            key: format!("tls.certificates[{index}].{field}"),
            problem: format!("{}: {}", e.file.display(), e.problem),
            fix: e.fix,
        }
    })?;
    for route in routes {
        for host in &route.hosts {
            if !store.certs.iter().any(|c| c.covers(host)) {
                return Err(ConfigError {
                    file: path.to_path_buf(),
                    key: "tls.certificates".into(),
                    problem: format!("no certificate covers {host} (route {})", route.name),
                    fix: format!(
                        "add a certificate for {host} or a wildcard for its domain, or remove the host from the route"
                    ),
                });
            }
        }
    }
    Ok(())
}

fn validate_kubernetes(
    k: &KubernetesDiscovery,
    path: &Path,
) -> Result<KubernetesDiscovery, ConfigError> {
    let err = |key: &str, problem: String, fix: &str| ConfigError {
        file: path.to_path_buf(),
        key: format!("discovery.kubernetes.{key}"),
        problem,
        fix: fix.to_string(),
    };
    if k.address_types.is_empty() {
        return Err(err(
            "address_types",
            "no address type is allowed".into(),
            "list at least one of \"InternalIP\", \"ExternalIP\", \"Hostname\"",
        ));
    }
    if let Some(dup) = k
        .address_types
        .iter()
        .enumerate()
        .find(|(i, t)| k.address_types[..*i].contains(t))
    {
        return Err(err(
            "address_types",
            format!("{} is listed twice", dup.1.as_str()),
            "list each address type once, in order of preference",
        ));
    }
    if k.label_selector.contains(char::is_whitespace)
        && !k.label_selector.contains(" in ")
        && !k.label_selector.contains(" notin ")
    {
        return Err(err(
            "label_selector",
            format!("{:?} contains spaces", k.label_selector),
            "write it as Kubernetes does, e.g. \"app=clearml\" or \"app=clearml,tier!=gpu\"",
        ));
    }
    if let Some(file) = &k.kubeconfig {
        if !file.is_file() {
            return Err(err(
                "kubeconfig",
                format!("{} does not exist or is not a file", file.display()),
                "give the path of a kubeconfig file, or remove the key to use KUBECONFIG, ~/.kube/config or the in-cluster service account",
            ));
        }
    }
    Ok(k.clone())
}

/// Turns a toml error's byte span into a `line N` locator, as the dotted key is not exposed.
fn toml_error_key(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let snippet: String = text
                .get(span.clone())
                .unwrap_or("")
                .chars()
                .take(60)
                .collect();
            format!("line {line}: {}", snippet.trim())
        }
        None => "(document)".into(),
    }
}

/// Accepts RFC 1123 host names (letters, digits, hyphens, dots), lower case expected.
pub fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Normalises a node address for use in an authority: IPs canonical, IPv6 without brackets
/// (they are added when the authority is built), DNS names lower case.
pub fn normalize_node(node: &str) -> Option<String> {
    let trimmed = node.trim();
    let unbracketed = trimmed
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(trimmed);
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return Some(ip.to_string());
    }
    let name = trimmed.trim_end_matches('.').to_ascii_lowercase();
    is_host_name(&name).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        Config::parse(Path::new("edge.toml"), text)
    }

    const NODES: &str = "[discovery.static]\nnodes = [\"127.0.0.1\"]\n";

    #[test]
    fn defaults_are_the_clearml_routes() {
        let s = parse(NODES).expect("valid");
        let got: Vec<(&str, &str, u16)> = s
            .routes
            .iter()
            .map(|r| (r.name.as_str(), r.hosts[0].as_str(), r.port))
            .collect();
        assert_eq!(
            got,
            vec![
                ("app", "app.localhost", 30080),
                ("files", "files.localhost", 30081),
                ("api", "api.localhost", 30008)
            ]
        );
        assert_eq!(
            s.listeners,
            vec![Listener {
                addr: "0.0.0.0:8080".parse().unwrap(),
                mode: ListenerMode::Plain,
                defer_accept: true,
            }]
        );
    }

    #[test]
    fn overrides_merge_with_defaults() {
        let s = parse(&format!(
            "domain = \"Example.COM.\"\n[routes.files]\nmax_body_bytes = 10\naliases = [\"dl.example.com\"]\n[routes.api]\nenabled = false\n[routes.grafana]\nport = 30300\n{NODES}"
        ))
        .expect("valid");
        let files = s.routes.iter().find(|r| r.name == "files").unwrap();
        assert_eq!(files.hosts, vec!["files.example.com", "dl.example.com"]);
        assert_eq!(files.max_body_bytes, Some(10));
        assert!(!s.routes.iter().any(|r| r.name == "api"));
        let g = s.routes.iter().find(|r| r.name == "grafana").unwrap();
        assert_eq!(
            (g.hosts[0].as_str(), g.port),
            ("grafana.example.com", 30300)
        );
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let e = parse(&format!("{NODES}[timeouts]\nconect = \"5s\"\n")).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("edge.toml: `line 4: conect`"), "{text}");
        assert!(text.contains("unknown field `conect`"), "{text}");
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let cases = [
            ("[routes.x]\nhost = \"x.example.com\"\n", "routes.x.port"),
            ("[routes.app]\nport = 0\n", "routes.app.port"),
            (
                "[[listeners]]\naddress = \"8080\"\n",
                "listeners[0].address",
            ),
            (
                "[limits]\nmax_request_header_bytes = 100\n",
                "limits.max_request_header_bytes",
            ),
            ("[timeouts]\nconnect = \"0s\"\n", "timeouts.connect"),
            ("[limits]\nmax_connections = 0\n", "limits.max_connections"),
            (
                "[limits]\nmax_connections = 5000000000\n",
                "limits.max_connections",
            ),
            (
                "[routes.files]\naliases = [\"app.localhost\"]\n",
                "routes.files.aliases[0]",
            ),
        ];
        for (text, key) in cases {
            let e = parse(&format!("{NODES}{text}")).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(!e.fix.is_empty());
        }
        let e = parse("[discovery.static]\nnodes = [\"http://x:1\"]\n").unwrap_err();
        assert_eq!(e.key, "discovery.static.nodes[0]");
        let e = parse("").unwrap_err();
        assert_eq!(e.key, "discovery");
    }

    #[test]
    fn nodes_are_normalised() {
        assert_eq!(normalize_node("[::1]").as_deref(), Some("::1"));
        assert_eq!(
            normalize_node("Node-1.Internal.").as_deref(),
            Some("node-1.internal")
        );
        assert_eq!(normalize_node("10.0.0.5").as_deref(), Some("10.0.0.5"));
        assert_eq!(normalize_node("10.0.0.5:80"), None);
    }
}
