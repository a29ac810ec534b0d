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
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Body;
use hyper::header::{HeaderValue, EXPECT, HOST, TRANSFER_ENCODING};
use hyper::http::request::Parts;
use hyper::http::uri::{Authority, PathAndQuery};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};

use crate::balance::{self, RetryBudget};
use crate::config::Config;
use crate::http1::{self, BodyFraming};
use crate::metrics::{AccessEntry, Metrics, RequestRecord, RouteMetrics};
use crate::routing::{normalize_host, RouteId};
use crate::snapshot::{now_ms, Backend, InFlightGuard, RoutePool, Snapshot};
use crate::upstream::{ConnectError, ExchangeError, Exchanged};
use body::{BoxError, ClientBody, ClientBodyError, RequestBody, ResponseBody};
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
        req: Request<ClientBody>,
        conn: &Arc<ClientConn>,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
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
        let mut response = match self.proxy(req, conn, snapshot, &mut outcome).await {
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
        response
    }

    /// The phases, in order; each returns what the next needs, or the error that ends the
    /// request.
    async fn proxy(
        &self,
        req: Request<ClientBody>,
        conn: &Arc<ClientConn>,
        snapshot: Arc<Snapshot>,
        outcome: &mut Outcome,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let (route_id, host) = route(&req, conn, &snapshot)?;
        let pool = snapshot.pool(route_id);
        outcome.route = Some(pool.metrics.clone());
        if let Some(port) = conn.redirect_https_port {
            return Ok(redirect_to_https(&host, port, req.uri()));
        }
        let route = snapshot.table.route(route_id);
        let (mut parts, mut body, framing) = check(req, route.max_body_bytes).await?;
        body = body.count_into(pool.metrics.bytes_in.clone());
        let outbound = prepare(&mut parts, framing, host, conn, pool.backends.len());
        self.budget.deposit();
        let target = Target {
            snapshot: &snapshot,
            pool,
            route: &route.name,
        };
        let (exchanged, in_flight) = self.send(&outbound, &mut body, &target, outcome).await?;
        // An answer before the body ended (a refused upload): the rest of the body is not
        // taken from the client (on HTTP/2 the stream is reset once the answer is sent).
        drop(body);
        drop(snapshot);
        answer(exchanged, in_flight, outbound.upgrade, conn)
    }

    /// Phases select and send: a node is chosen and connected, then the request is sent to
    /// it; after a failure [`Proxy::after_failure`] says whether and where it goes again.
    async fn send(
        &self,
        outbound: &Outbound,
        body: &mut RequestBody,
        target: &Target<'_>,
        outcome: &mut Outcome,
    ) -> Result<(Exchanged, InFlightGuard), ProxyError> {
        let settings = &target.snapshot.settings;
        let mut failed: Vec<Arc<Backend>> = Vec::new();
        let mut last_error = None;
        // A failure recorded in `failed` that the retry budget has not paid for yet.
        let mut unpaid = false;
        for _ in 0..MAX_ATTEMPTS {
            let Some(choice) = balance::choose(target.pool, settings.algorithm, &failed, now_ms())
            else {
                break;
            };
            // A retry spends budget only once there is a node to retry on.
            if unpaid {
                if !self.budget.try_withdraw() {
                    break;
                }
                unpaid = false;
                outcome.retries += 1;
                if let Some(previous) = failed.last() {
                    self.count(&self.metrics.retries, target.route, previous);
                }
            }
            if choice.fail_open {
                log_fail_open(target.pool, target.route);
            }
            let backend = choice.backend.clone();
            let in_flight = backend.start_request();
            match attempt(&backend, outbound, body, settings.response_header_timeout).await {
                Ok(exchanged) => {
                    backend.record_success();
                    outcome.node = Some(backend.authority.clone());
                    return Ok((exchanged, in_flight));
                }
                Err(failure) => match self.after_failure(failure, &backend, outbound, target.route)
                {
                    Next::SameRequestAgain => {}
                    Next::Elsewhere(error) => {
                        last_error = Some(error);
                        failed.push(backend);
                        unpaid = true;
                    }
                    Next::GiveUp(error) => return Err(error),
                },
            }
        }
        Err(last_error.unwrap_or_else(|| no_node(target)))
    }

    /// The retry decision, with its reasons: what a failed attempt means for the request.
    fn after_failure(
        &self,
        failure: Failure,
        backend: &Backend,
        outbound: &Outbound,
        route: &str,
    ) -> Next {
        let node = backend.authority.as_str();
        let error = match failure {
            // Nothing was sent: any other node can take the request as it is.
            Failure::Connect(e) => {
                let ejected = backend.record_failure();
                self.count(&self.metrics.connect_errors, route, backend);
                tracing::warn!(%node, error = %e, ejected_secs = ejected.as_secs(), "connect failed; node ejected");
                return Next::Elsewhere(ProxyError::ConnectFailed {
                    node: node.to_string(),
                    reason: e.to_string(),
                });
            }
            // A pooled connection the node had closed: it read nothing, so nothing is lost
            // and the node is not to blame.
            Failure::Exchange(ExchangeError::Stale) => return Next::SameRequestAgain,
            Failure::Exchange(ExchangeError::RequestBody(e)) => {
                return Next::GiveUp(client_body_error(e))
            }
            // Not retried: the node may still be working on it (and the SDK does not retry
            // a 504 either).
            Failure::Exchange(ExchangeError::Timeout(timeout)) => {
                return Next::GiveUp(ProxyError::UpstreamTimeout {
                    node: node.to_string(),
                    secs: timeout.as_secs(),
                })
            }
            Failure::Exchange(error) => error,
        };
        // Written, and the node failed before answering.
        let ejected = backend.record_failure();
        self.count(&self.metrics.connect_errors, route, backend);
        tracing::warn!(%node, error = %error, ejected_secs = ejected.as_secs(), "node failed before answering; node ejected");
        let error = ProxyError::UpstreamFailed {
            node: node.to_string(),
            source: error,
        };
        if outbound.replayable {
            Next::Elsewhere(error)
        } else {
            Next::GiveUp(error)
        }
    }

    /// A failure or retry, counted per route and node (a rare path: the labelled family's
    /// lock is fine here).
    fn count(
        &self,
        family: &prometheus_client::metrics::family::Family<
            crate::metrics::NodeLabels,
            prometheus_client::metrics::counter::Counter,
        >,
        route: &str,
        backend: &Backend,
    ) {
        family
            .get_or_create(&Metrics::node_labels(route, backend.authority.as_str()))
            .inc();
    }
}

/// Where a request may go: its route's nodes in the snapshot it was routed with.
struct Target<'a> {
    snapshot: &'a Snapshot,
    pool: &'a RoutePool,
    route: &'a str,
}

/// A request ready for the nodes: its head written out once for every attempt, and what
/// the retry decision needs to know of it.
struct Outbound {
    head: Bytes,
    method: Method,
    framing: BodyFraming,
    upgrade: bool,
    /// Written to a node that failed before answering, it may go to another node: no body
    /// (never an upload: ClearML's are not idempotent and its SDK retries on its own), not
    /// an upgrade, an idempotent method, and another node to go to.
    replayable: bool,
}

/// How one attempt failed.
enum Failure {
    Connect(ConnectError),
    Exchange(ExchangeError),
}

/// What follows a failed attempt.
enum Next {
    SameRequestAgain,
    Elsewhere(ProxyError),
    GiveUp(ProxyError),
}

/// Phase route: the host, its route, and the TLS name it must match.
fn route(
    req: &Request<ClientBody>,
    conn: &ClientConn,
    snapshot: &Snapshot,
) -> Result<(RouteId, HeaderValue), ProxyError> {
    let host = request_host(req)?;
    let route_id = host
        .to_str()
        .ok()
        .and_then(|h| snapshot.table.lookup(h))
        .ok_or(ProxyError::UnknownHost)?;
    if let Some(sni) = &conn.sni {
        let requested = host.to_str().map(normalize_host).unwrap_or_default();
        if !requested.eq_ignore_ascii_case(sni) {
            return Err(ProxyError::Misdirected);
        }
    }
    Ok((route_id, host))
}

/// Phase check: framing and limits, before anything is sent to a node. Returns the head, the
/// body to forward and how the node's hop frames it.
async fn check(
    req: Request<ClientBody>,
    limit: Option<u64>,
) -> Result<(Parts, RequestBody, BodyFraming), ProxyError> {
    // Ambiguous framing was refused where the head was parsed (HTTP/1.1, `crate::http1`) or
    // by the HTTP/2 layer.
    let chunked = req.headers().contains_key(TRANSFER_ENCODING);
    let exact = req.body().size_hint().exact();
    if let (Some(limit), Some(len)) = (limit, exact) {
        if len > limit {
            return Err(ProxyError::BodyTooLarge(limit));
        }
    }
    let (parts, mut body) = req.into_parts();
    // A malformed chunked body must be refused before the node sees the request, so its
    // first frame is read here; a sized body needs no look.
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
    if let Some(limit) = limit.filter(|l| first_len as u64 > *l) {
        return Err(ProxyError::BodyTooLarge(limit));
    }
    let framing = match exact {
        _ if first.is_none() && body.is_end_stream() => BodyFraming::Empty,
        Some(len) if !chunked => BodyFraming::Length(len),
        _ => BodyFraming::Chunked,
    };
    let body = RequestBody::new(body, first, limit);
    Ok((parts, body, framing))
}

/// Phase prepare: the node-independent request head, written out once.
fn prepare(
    parts: &mut Parts,
    framing: BodyFraming,
    host: HeaderValue,
    conn: &ClientConn,
    nodes: usize,
) -> Outbound {
    let upgrade = parts.version == Version::HTTP_11 && headers::wants_upgrade(&parts.headers);
    // Origin form, byte for byte: the node gets the client's path and query untouched. An
    // absolute-form or HTTP/2 target names the host itself, which then goes in `Host`;
    // otherwise `Host` is where the host came from, and stays as it is.
    let target_names_host = parts.uri.authority().is_some();
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    // The Expect handshake is answered by the edge when the body is first read.
    parts.headers.remove(EXPECT);
    if target_names_host {
        parts.headers.insert(HOST, host.clone());
    }
    headers::add_forwarded(&mut parts.headers, &conn.peer_ip, conn.proto(), host);
    let target = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
    let mut head = Vec::new();
    http1::request_head(&mut head, &parts.method, target, &parts.headers, framing);
    let replayable =
        framing.is_empty() && !upgrade && nodes > 1 && http1::is_idempotent(&parts.method);
    Outbound {
        head: Bytes::from(head),
        method: parts.method.clone(),
        framing,
        upgrade,
        replayable,
    }
}

/// One attempt: a connection to `backend` (pooled or new), then the exchange on it.
async fn attempt(
    backend: &Backend,
    outbound: &Outbound,
    body: &mut RequestBody,
    timeout: std::time::Duration,
) -> Result<Exchanged, Failure> {
    let conn = backend
        .pool
        .checkout(&backend.target)
        .await
        .map_err(Failure::Connect)?;
    conn.exchange(
        outbound.head.clone(),
        body,
        outbound.framing,
        &outbound.method,
        timeout,
    )
    .await
    .map_err(Failure::Exchange)
}

/// Phase answer: the node's response for the client, or the tunnel of an upgrade.
fn answer(
    exchanged: Exchanged,
    in_flight: InFlightGuard,
    upgrade: bool,
    conn: &ClientConn,
) -> Result<Response<ResponseBody>, ProxyError> {
    let Exchanged { head, body, .. } = exchanged;
    let mut response = Response::new(());
    *response.status_mut() = head.status;
    *response.headers_mut() = head.headers;
    let (mut parts, ()) = response.into_parts();
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        if !upgrade {
            return Err(ProxyError::UnexpectedUpgrade {
                node: in_flight.backend().authority.as_str().to_string(),
            });
        }
        headers::strip_hop_by_hop(&mut parts.headers, true);
        // The client's side is free once the 101 is written: the connection's loop takes
        // the tunnel from there.
        if let Some(upstream) = body.into_connection() {
            conn.hand_over_tunnel(PendingTunnel {
                upstream,
                in_flight,
            });
        }
        return Ok(Response::from_parts(parts, ResponseBody::empty()));
    }
    headers::strip_hop_by_hop(&mut parts.headers, false);
    Ok(Response::from_parts(
        parts,
        ResponseBody::upstream(body, in_flight),
    ))
}

/// Why a request found no node to go to.
fn no_node(target: &Target<'_>) -> ProxyError {
    if target.snapshot.synced {
        ProxyError::NoBackend {
            route: target.route.to_string(),
        }
    } else {
        ProxyError::NotReady
    }
}

/// Logs that a route has no healthy node and is trying them anyway, at most once per
/// [`FAIL_OPEN_LOG_INTERVAL_MS`].
fn log_fail_open(pool: &RoutePool, route: &str) {
    let now = now_ms();
    let last = pool.fail_open_logged.load(Ordering::Relaxed);
    if fail_open_is_due(last, now)
        && pool
            .fail_open_logged
            .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(%route, "no healthy node: trying them anyway (fail open)");
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

/// The host a request is for: the absolute-form target's or HTTP/2 `:authority`, else `Host`.
fn request_host(req: &Request<ClientBody>) -> Result<HeaderValue, ProxyError> {
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

/// The client's fault behind a failed send: its body broke or went over the limit.
fn client_body_error(error: BoxError) -> ProxyError {
    match error.downcast::<ClientBodyError>().map(|e| *e) {
        Ok(ClientBodyError::TooLarge(limit)) => ProxyError::BodyTooLarge(limit),
        Ok(ClientBodyError::Read(_)) | Err(_) => ProxyError::ClientGone,
    }
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
