//! Node discovery: the publishers of the backend set. A source turns what it knows about the
//! cluster's nodes into a list of node addresses and hands it to the
//! [`Publisher`](crate::snapshot::Publisher); the request path never waits on discovery.

pub mod kubernetes;
pub mod static_nodes;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::config::NodeSource;
use crate::snapshot::Publisher;

/// What discovery reports about itself, read by the admin endpoints.
#[derive(Debug, Default)]
pub struct DiscoveryStatus {
    /// True while the source cannot be reached: the backends are the last known ones.
    stale: AtomicBool,
    /// Node list changes published so far.
    publishes: AtomicU64,
}

impl DiscoveryStatus {
    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }

    pub fn publishes(&self) -> u64 {
        self.publishes.load(Ordering::Relaxed)
    }

    fn set_stale(&self, stale: bool) {
        self.stale.store(stale, Ordering::Relaxed);
    }

    fn published(&self) {
        self.publishes.fetch_add(1, Ordering::Relaxed);
    }
}

/// Starts the configured source. Returns the task that keeps it running, if any.
pub async fn start(
    source: &NodeSource,
    publisher: Arc<Publisher>,
    status: Arc<DiscoveryStatus>,
) -> Result<Option<JoinHandle<()>>, kubernetes::DiscoveryError> {
    match source {
        NodeSource::Static(nodes) => {
            static_nodes::publish(nodes, &publisher, &status);
            Ok(None)
        }
        NodeSource::Kubernetes(settings) => {
            let client = kubernetes::client(settings).await?;
            Ok(Some(tokio::spawn(kubernetes::watch_nodes(
                client,
                settings.clone(),
                publisher,
                status,
            ))))
        }
    }
}
