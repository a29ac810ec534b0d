//! Connections to the nodes: HTTP/1.1 only (ClearML's nginx and werkzeug speak no h2c), pooled
//! with keep-alive per node, TCP_NODELAY, and a connect timeout.

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Timeouts;
use crate::proxy::body::RequestBody;

pub type UpstreamClient = Client<HttpConnector, RequestBody>;

/// Idle connections kept per node and port; more are opened under load and closed when idle.
const MAX_IDLE_PER_NODE: usize = 512;

pub fn client(timeouts: &Timeouts) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(timeouts.connect));
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(timeouts.idle_keepalive)
        .pool_max_idle_per_host(MAX_IDLE_PER_NODE)
        // The client's Host is forwarded as is; never derive one from the node address.
        .set_host(false)
        .build(connector)
}
