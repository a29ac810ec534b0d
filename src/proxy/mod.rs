//! The request handler: one request's life as named phases.
//!
//! route (host → route) → check (framing, limits) → select (backend) → prepare (URI,
//! headers) → send (with the response-header timeout) → answer (strip hop-by-hop, stream the
//! body back, or tunnel an upgrade). Every failure is a [`ProxyError`] decided at a phase
//! boundary and rendered in one place.

pub mod body;
pub mod client;
pub mod error;
pub mod headers;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use hyper::header::{HeaderValue, EXPECT, HOST, TRANSFER_ENCODING};
use hyper::http::uri::{Authority, PathAndQuery};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use tokio::sync::oneshot;

use crate::balance::{self, RetryBudget};
use crate::config::Config;
use crate::metrics::{AccessEntry, Metrics, RequestRecord, RouteMetrics};
use crate::routing::normalize_host;
use crate::snapshot::{now_ms, Backend, Snapshot};
use body::{ClientBodyError, RequestBody, ResponseBody};
pub use client::ClientConn;
use client::PendingTunnel;
pub use error::ProxyError;

/// The proxy service shared by every connection.
pub struct Proxy {
    snapshots: Arc<ArcSwap<Snapshot>>,
    budget: RetryBudget,
    metrics: Arc<Metrics>,
}

/// What the phases learned that the request's record needs.
#[derive(Default)]
struct Outcome {
    route: Option<Arc<RouteMetrics>>,
    node: Option<Authority>,
    retries: u32,
}

impl Proxy {
    pub fn new(snapshots: Arc<ArcSwap<Snapshot>>, config: &Config, metrics: Arc<Metrics>) -> Self {
        Proxy {
            snapshots,
            budget: RetryBudget::new(config.balancing.retry_budget_percent),
            metrics,
        }
    }

    /// Handles one request; never fails: errors become their response here.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        conn: &Arc<ClientConn>,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        // Counted before anything can refuse the request, so ordinals match the raw stream's
        // heads whatever the answer.
        let ordinal = conn.ledger.begin(&req);
        // The one snapshot load of this request: routes, backends and settings together.
        let snapshot = self.snapshots.load_full();
        let access_log = snapshot.settings.access_log;
        let method = req.method().clone();
        let target = req.uri().clone();
        let host = access_log.map(|_| {
            req.uri()
                .authority()
                .map(|a| a.as_str().to_string())
                .or_else(|| {
                    req.headers()
                        .get(HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "-".into())
        });
        let mut outcome = Outcome::default();
        let mut response = match self.proxy(req, ordinal, conn, snapshot, &mut outcome).await {
            Ok(response) => response,
            Err(e) => {
                let status = e.status();
                if e.is_client_fault() {
                    tracing::info!(client = %conn.peer, %method, %target, status = status.as_u16(), error = %e, "request refused");
                } else {
                    tracing::warn!(client = %conn.peer, %method, %target, status = status.as_u16(), error = %e, elapsed_ms = started.elapsed().as_millis() as u64, "request failed");
                }
                e.into_response()
            }
        };
        if let Some(hsts) = &conn.hsts {
            response.headers_mut().insert(
                hyper::header::STRICT_TRANSPORT_SECURITY,
                HeaderValue::clone(hsts),
            );
        }
        let access = access_log.map(|json| {
            Box::new(AccessEntry {
                json,
                client: conn.peer,
                host: host.unwrap_or_default(),
                method: method.to_string(),
                path: target
                    .path_and_query()
                    .map_or_else(|| target.to_string(), |p| p.as_str().to_string()),
                node: outcome.node.as_ref().map(|n| n.as_str().to_string()),
                retries: outcome.retries,
            })
        });
        let status = response.status().as_u16();
        response.body_mut().set_record(RequestRecord {
            started,
            route: outcome.route,
            status,
            bytes_out: 0,
            access,
        });
        conn.ledger.answer();
        response
    }

    async fn proxy(
        &self,
        req: Request<Incoming>,
        ordinal: u64,
        conn: &Arc<ClientConn>,
        snapshot: Arc<Snapshot>,
        outcome: &mut Outcome,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        // Phase: route.
        let settings = snapshot.settings.clone();
        let host = request_host(&req)?;
        let route_id = host
            .to_str()
            .ok()
            .and_then(|h| snapshot.table.lookup(h))
            .ok_or(ProxyError::UnknownHost)?;
        let route = snapshot.table.route(route_id);
        let pool = snapshot.pool(route_id);
        outcome.route = Some(pool.metrics.clone());
        if let Some(sni) = &conn.sni {
            let requested = host.to_str().map(normalize_host).unwrap_or_default();
            if !requested.eq_ignore_ascii_case(sni) {
                return Err(ProxyError::Misdirected);
            }
        }
        if let Some(port) = conn.redirect_https_port {
            return Ok(redirect_to_https(&host, port, req.uri()));
        }

        // Phase: check framing and limits before anything is sent upstream. hyper has refused
        // conflicting lengths and non-chunked codings; a head with both length fields is
        // only visible to the raw-stream watcher (hyper drops Content-Length from it).
        if conn.framing.is_ambiguous(ordinal) {
            return Err(ProxyError::AmbiguousLength);
        }
        let chunked = req.headers().contains_key(TRANSFER_ENCODING);
        if let (Some(limit), Some(len)) = (route.max_body_bytes, req.body().size_hint().exact()) {
            if len > limit {
                return Err(ProxyError::BodyTooLarge(limit));
            }
        }
        let body_limit = route.max_body_bytes;

        // Phase: prepare the node-independent part of the upstream request.
        let upgrade = req.version() == Version::HTTP_11 && headers::wants_upgrade(req.headers());
        let (mut parts, mut body) = req.into_parts();
        // Origin form, byte for byte: the node gets the client's path and query untouched.
        // An absolute-form or HTTP/2 target names the host itself, which then goes in `Host`;
        // otherwise `Host` is where the host came from, and stays as it is.
        let target_names_host = parts.uri.authority().is_some();
        if target_names_host || parts.uri.scheme().is_some() {
            parts.uri = Uri::from(
                parts
                    .uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            );
        }
        parts.version = Version::HTTP_11;
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        // The Expect handshake is answered by the edge when the body is first read.
        parts.headers.remove(EXPECT);
        if target_names_host {
            parts.headers.insert(HOST, host.clone());
        }
        headers::add_forwarded(&mut parts.headers, &conn.peer_ip, conn.proto(), host);

        // A malformed chunked body must be refused before the node sees the request, so its
        // first frame is read here; a sized body is framed by hyper and needs no look.
        let first = if chunked && !body.is_end_stream() {
            match body.frame().await {
                Some(Ok(frame)) => Some(frame),
                Some(Err(e)) => return Err(ProxyError::BadBody(e)),
                None => None,
            }
        } else {
            None
        };
        let first_len = first
            .as_ref()
            .and_then(|f| f.data_ref())
            .map_or(0, |d| d.len());
        if let Some(limit) = body_limit.filter(|l| first_len as u64 > *l) {
            return Err(ProxyError::BodyTooLarge(limit));
        }
        let has_body = first.is_some() || !body.is_end_stream();
        // Once written, only a bodyless idempotent request may go again (never an upload:
        // ClearML's are not idempotent and its SDK retries on its own), and only to another
        // node: with one node there is nowhere to send it, and no copy of the head to make.
        let replay =
            (!has_body && !upgrade && pool.backends.len() > 1 && is_idempotent(&parts.method))
                .then(|| Replay {
                    method: parts.method.clone(),
                    uri: parts.uri.clone(),
                    headers: parts.headers.clone(),
                });
        // Only a request with a body needs to say when it is sent; without one the
        // response-header timer starts at once (saving a channel and a wake-up per request).
        let (sent_tx, mut sent_rx) = if has_body {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let mut request = Request::from_parts(
            parts,
            RequestBody::new(Some(body), first, body_limit, sent_tx)
                .count_into(pool.metrics.bytes_in.clone())
                .marks_read(conn.body_read_mark(ordinal)),
        );
        self.budget.deposit();

        // Phases: select, connect, send. The node is chosen and connected before the request
        // is handed over, so a failed connect moves on to another node with nothing lost.
        let mut failed: Vec<Arc<Backend>> = Vec::new();
        let mut last_error: Option<ProxyError> = None;
        let mut attempts = 0;
        // Whether the budget has paid for the failure just recorded in `failed`.
        let mut retry_paid = true;
        let (response, in_flight, sender) = loop {
            attempts += 1;
            let give_up = |last_error: Option<ProxyError>| {
                last_error.unwrap_or_else(|| {
                    if snapshot.synced {
                        ProxyError::NoBackend {
                            route: route.name.clone(),
                        }
                    } else {
                        ProxyError::NotReady
                    }
                })
            };
            if attempts > MAX_ATTEMPTS {
                return Err(give_up(last_error));
            }
            let Some(choice) = balance::choose(pool, settings.algorithm, &failed, now_ms()) else {
                return Err(give_up(last_error));
            };
            // A retry after a failure spends budget only once there is a node to retry on.
            if !failed.is_empty() && !retry_paid {
                if !self.budget.try_withdraw() {
                    return Err(give_up(last_error));
                }
                retry_paid = true;
                outcome.retries += 1;
                if let Some(previous) = failed.last() {
                    self.metrics
                        .retries
                        .get_or_create(&Metrics::node_labels(
                            &route.name,
                            previous.authority.as_str(),
                        ))
                        .inc();
                }
            }
            if choice.fail_open {
                let now = now_ms();
                let last = pool
                    .fail_open_logged
                    .load(std::sync::atomic::Ordering::Relaxed);
                if fail_open_is_due(last, now)
                    && pool
                        .fail_open_logged
                        .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(route = %route.name, "no healthy node: trying them anyway (fail open)");
                }
            }
            let backend = choice.backend.clone();
            let in_flight = backend.start_request();
            let node = backend.authority.as_str();
            let mut sender = match backend.pool.checkout(&backend.target).await {
                Ok(sender) => sender,
                Err(e) => {
                    let ejected = backend.record_failure();
                    self.count_failure(&route.name, node);
                    tracing::warn!(%node, error = %e, ejected_secs = ejected.as_secs(), "connect failed; node ejected");
                    last_error = Some(ProxyError::ConnectFailed {
                        node: node.to_string(),
                        reason: e.to_string(),
                    });
                    failed.push(backend);
                    retry_paid = false;
                    continue;
                }
            };
            // The response-header timer starts once the body is fully sent (at once for a
            // request without one), so a long upload is never cut by it.
            let exchange = sender.try_send_request(request);
            tokio::pin!(exchange);
            let answered_while_sending = match sent_rx.as_mut() {
                Some(sent) => tokio::select! {
                    result = &mut exchange => Some(result),
                    _ = sent => None,
                },
                None => None,
            };
            let result = match answered_while_sending {
                Some(result) => result,
                None => {
                    // The body is sent (or there was none): nothing is left to wait for.
                    sent_rx = None;
                    match tokio::time::timeout(settings.response_header_timeout, &mut exchange)
                        .await
                    {
                        Ok(result) => result,
                        Err(_) => {
                            return Err(ProxyError::UpstreamTimeout {
                                node: node.to_string(),
                                secs: settings.response_header_timeout.as_secs(),
                            })
                        }
                    }
                }
            };
            match result {
                Ok(response) => {
                    backend.record_success();
                    outcome.node = Some(backend.authority.clone());
                    break (response, in_flight, sender);
                }
                Err(mut e) => {
                    if let Some(unsent) = e.take_message() {
                        // Never written (a pooled connection the node had closed): the same
                        // request goes again, as it is.
                        request = unsent;
                        continue;
                    }
                    let error = e.into_error();
                    if let Some(client_fault) = client_body_error(&error) {
                        return Err(client_fault);
                    }
                    let ejected = backend.record_failure();
                    self.count_failure(&route.name, node);
                    tracing::warn!(%node, error = %error, ejected_secs = ejected.as_secs(), "node failed before answering; node ejected");
                    last_error = Some(ProxyError::UpstreamFailed {
                        node: node.to_string(),
                        source: error,
                    });
                    failed.push(backend);
                    retry_paid = false;
                    match &replay {
                        Some(replay) => {
                            request = replay.request(RequestBody::new(None, None, None, None));
                        }
                        None => return Err(give_up(last_error)),
                    }
                }
            }
        };
        drop(snapshot);

        // Phase: answer.
        let node = in_flight.backend().authority.as_str();
        let (mut parts, upstream_body) = response.into_parts();
        // The client's hop speaks HTTP/1.1 (or h2) whatever version the node answered in.
        parts.version = Version::HTTP_11;
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            if !upgrade {
                return Err(ProxyError::UnexpectedUpgrade {
                    node: node.to_string(),
                });
            }
            headers::strip_hop_by_hop(&mut parts.headers, true);
            let upstream_upgrade =
                hyper::upgrade::on(Response::from_parts(parts.clone(), upstream_body));
            // The client's side is free once the 101 is written: the connection's loop
            // takes the tunnel from there.
            conn.hand_over_tunnel(PendingTunnel {
                upstream: upstream_upgrade,
                in_flight,
            });
            return Ok(Response::from_parts(parts, ResponseBody::empty()));
        }
        headers::strip_hop_by_hop(&mut parts.headers, false);
        Ok(Response::from_parts(
            parts,
            ResponseBody::upstream(upstream_body, in_flight, sender),
        ))
    }
}

impl Proxy {
    /// A connect failure or reset, counted per route and node (a rare path: the labelled
    /// family's lock is fine here).
    fn count_failure(&self, route: &str, node: &str) {
        self.metrics
            .connect_errors
            .get_or_create(&Metrics::node_labels(route, node))
            .inc();
    }
}

/// 308 to the same host, path and query over HTTPS: 308 keeps the method and body, so an
/// upload POST is not turned into a GET as 301/302 would allow.
fn redirect_to_https(host: &HeaderValue, port: u16, uri: &Uri) -> Response<ResponseBody> {
    let name = host.to_str().map(normalize_host).unwrap_or_default();
    let path = uri.path_and_query().map_or("/", PathAndQuery::as_str);
    let location = if port == 443 {
        format!("https://{name}{path}")
    } else {
        format!("https://{name}:{port}{path}")
    };
    let mut response = Response::new(ResponseBody::text("308 Permanent Redirect: use HTTPS\n"));
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(location) = HeaderValue::from_str(&location) {
        response
            .headers_mut()
            .insert(hyper::header::LOCATION, location);
    }
    response
}

/// Failing open is logged at most this often per route.
const FAIL_OPEN_LOG_INTERVAL_MS: u64 = 10_000;

/// Whether failing open at `now` is to be logged, the last log having been at `last` (0:
/// never, whatever `now` is; the clock starts near 0 when the process does, and the first
/// fail-open of a route is the one an operator most needs to see).
fn fail_open_is_due(last: u64, now: u64) -> bool {
    last == 0 || now.saturating_sub(last) >= FAIL_OPEN_LOG_INTERVAL_MS
}

/// Attempts per request, counting connects and sends that never left the edge.
const MAX_ATTEMPTS: usize = 4;

/// RFC 9110 §9.2.2.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The head of a bodyless idempotent request, kept to send it again to another node.
struct Replay {
    method: Method,
    uri: Uri,
    headers: hyper::HeaderMap,
}

impl Replay {
    fn request(&self, body: RequestBody) -> Request<RequestBody> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// The host a request is for: the absolute-form target's or HTTP/2 `:authority`, else `Host`.
fn request_host(req: &Request<Incoming>) -> Result<HeaderValue, ProxyError> {
    if let Some(authority) = req.uri().authority() {
        // Userinfo is never part of the host that is routed or forwarded.
        let host = authority.as_str().rsplit('@').next().unwrap_or_default();
        return HeaderValue::from_str(host).map_err(|_| ProxyError::MissingHost);
    }
    let mut hosts = req.headers().get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(host), None) => Ok(host.clone()),
        (Some(_), Some(_)) => Err(ProxyError::DuplicateHost),
        (None, _) => Err(ProxyError::MissingHost),
    }
}

/// The client's fault hidden in a failed exchange: its body broke or went over the limit.
fn client_body_error(error: &hyper::Error) -> Option<ProxyError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(err) = source {
        if let Some(body_err) = err.downcast_ref::<ClientBodyError>() {
            return Some(match body_err {
                ClientBodyError::TooLarge(limit) => ProxyError::BodyTooLarge(*limit),
                ClientBodyError::Read(_) => ProxyError::ClientGone,
            });
        }
        source = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_fail_open_is_logged_then_one_per_interval() {
        assert!(
            fail_open_is_due(0, 5),
            "first, right after the process started"
        );
        assert!(!fail_open_is_due(5, 5 + FAIL_OPEN_LOG_INTERVAL_MS - 1));
        assert!(fail_open_is_due(5, 5 + FAIL_OPEN_LOG_INTERVAL_MS));
    }
}
