//! The static source: the node list from the configuration file, published once.

use super::DiscoveryStatus;
use crate::snapshot::Publisher;

pub fn publish(nodes: &[String], publisher: &Publisher, status: &DiscoveryStatus) {
    publisher.publish_nodes(nodes);
    status.published();
    tracing::info!(nodes = ?nodes, "static node list published");
}
