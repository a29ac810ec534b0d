//! Graceful shutdown: the signal, how each stage of a connection hears it (a set-up step
//! ends at once, a served connection finishes its in-flight requests), and the drain that
//! waits for the last connection.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

use super::RunningServer;

impl RunningServer {
    /// Stops accepting, lets in-flight requests finish within the drain timeout, and returns
    /// when every connection has ended (or the timeout passed).
    pub async fn shutdown(self) {
        if let Some(discovery) = &self.discovery_task {
            discovery.abort();
        }
        self.health_task.abort();
        if let Some(tls_watch) = &self.tls_watch {
            tls_watch.abort();
        }
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// Resolves once shutdown has been signalled (or the server is gone).
pub(super) async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Runs a connection's set-up step (TLS handshake, first read) for at most `timeout`;
/// `None` when shutdown comes first, since a connection still setting up has no request in
/// flight to wait for.
pub(super) async fn before_shutdown<F: Future>(
    timeout: Duration,
    shutdown: &watch::Receiver<bool>,
    step: F,
) -> Option<Result<F::Output, tokio::time::error::Elapsed>> {
    let mut shutdown = shutdown.clone();
    tokio::select! {
        done = tokio::time::timeout(timeout, step) => Some(done),
        _ = shutdown_requested(&mut shutdown) => None,
    }
}

/// A served connection that can be asked to finish its in-flight requests and close.
pub(super) trait GracefulConnection: Future<Output = hyper::Result<()>> {
    fn begin_shutdown(self: Pin<&mut Self>);
}

/// Serves `connection` to its end; on shutdown, idle connections close at once and busy ones
/// after their in-flight requests (the mini-redis shape: a signal, then run to completion).
pub(super) async fn until_shutdown<C: GracefulConnection>(
    mut connection: Pin<Box<C>>,
    mut shutdown: watch::Receiver<bool>,
) -> hyper::Result<()> {
    tokio::select! {
        // The connection first: it is what wakes this task, for every request.
        biased;
        result = connection.as_mut() => return result,
        _ = shutdown_requested(&mut shutdown) => {}
    }
    connection.as_mut().begin_shutdown();
    connection.await
}

/// Waits for every connection to end (each holds a permit of the connection limit), at most
/// the drain timeout.
pub(super) async fn drain_connections(limit: &Semaphore, max_connections: usize, drain: Duration) {
    tracing::info!(drain_secs = drain.as_secs(), "draining in-flight requests");
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain, limit.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("drain timeout passed with requests still in flight; closing them");
    }
}
