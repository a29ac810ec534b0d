//! The Kubernetes source: a kube-rs watcher on Node objects, turned into backend addresses.
//!
//! The watcher lists the selected nodes, then watches them, resuming from the last
//! resourceVersion after a dropped connection and relisting after `410 Gone`. A relist's
//! nodes are buffered until it is complete and swapped in whole, so the backend set is never
//! empty or partial in the middle of one. Errors never touch the backend set: the last known
//! nodes keep serving, marked stale, while the watcher reconnects with backoff. A burst of
//! events already waiting is applied as one change.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};

use super::DiscoveryStatus;
use crate::config::{normalize_node, KubernetesDiscovery};
use crate::snapshot::Publisher;

/// Nodes carrying this label are kept out of load balancers (kubernetes#53146).
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
/// The cluster autoscaler's taint on a node it is about to remove.
pub const AUTOSCALER_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes credentials found (KUBECONFIG, ~/.kube/config or in-cluster service account): {0}")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// Builds the API client: the configured kubeconfig, else `Config::infer` (kubeconfig from
/// `KUBECONFIG`/`~/.kube/config` first, then the in-cluster service account).
pub async fn client(settings: &KubernetesDiscovery) -> Result<Client, DiscoveryError> {
    // kube's rustls needs a process-wide crypto provider; a second install (another client
    // in the same process) is refused harmlessly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let options = KubeConfigOptions {
        context: settings.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &settings.kubeconfig {
        Some(path) => {
            let as_error = |source| DiscoveryError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kubeconfig = Kubeconfig::read_from(path).map_err(as_error)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(as_error)?
        }
        None if settings.context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|source| DiscoveryError::Kubeconfig {
                path: "KUBECONFIG or ~/.kube/config".into(),
                source,
            })?,
        None => kube::Config::infer().await.map_err(DiscoveryError::Infer)?,
    };
    Client::try_from(config).map_err(DiscoveryError::Client)
}

/// Watches the nodes and publishes every change until the task is aborted.
pub async fn watch_nodes(
    client: Client,
    settings: KubernetesDiscovery,
    publisher: Arc<Publisher>,
    status: Arc<DiscoveryStatus>,
) {
    let api: Api<Node> = Api::all(client);
    let mut config = watcher::Config::default();
    if !settings.label_selector.is_empty() {
        config = config.labels(&settings.label_selector);
    }
    tracing::info!(selector = %settings.label_selector, "watching Kubernetes nodes");
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    let mut view = NodeView::new(settings);
    while let Some(first) = events.next().await {
        let mut changed = view.apply(first, &status);
        // Apply whatever else has already arrived before publishing once.
        while let Some(Some(next)) = events.next().now_or_never() {
            changed |= view.apply(next, &status);
        }
        if changed {
            if let Some(nodes) = view.publishable() {
                publisher.publish_nodes(&nodes);
                status.published();
            }
        }
    }
}

/// Why a node is not a backend, or how to reach it.
type Candidate = Result<String, String>;

/// The watcher's view of the nodes, and what was last published from it.
struct NodeView {
    settings: KubernetesDiscovery,
    nodes: BTreeMap<String, Candidate>,
    /// Nodes of a relist in progress.
    relist: Option<BTreeMap<String, Candidate>>,
    synced: bool,
    published: BTreeMap<String, String>,
}

impl NodeView {
    fn new(settings: KubernetesDiscovery) -> Self {
        NodeView {
            settings,
            nodes: BTreeMap::new(),
            relist: None,
            synced: false,
            published: BTreeMap::new(),
        }
    }

    /// Applies one watcher item; true when the view may have changed.
    fn apply(
        &mut self,
        item: Result<Event<Node>, watcher::Error>,
        status: &DiscoveryStatus,
    ) -> bool {
        let event = match item {
            Ok(event) => event,
            Err(e) => {
                if !status.is_stale() {
                    tracing::warn!(error = %e, nodes = self.published.len(), "Kubernetes watch failed; keeping the last known nodes (view is stale) and retrying");
                } else {
                    tracing::debug!(error = %e, "Kubernetes watch still failing");
                }
                status.set_stale(true);
                return false;
            }
        };
        // `Init` only announces a list attempt: recovery is an answer from the API server.
        if status.is_stale() && !matches!(event, Event::Init) {
            tracing::info!("Kubernetes watch recovered");
            status.set_stale(false);
        }
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(node) => {
                let name = node_name(&node);
                let candidate = evaluate(&node, &self.settings);
                self.relist
                    .get_or_insert_with(BTreeMap::new)
                    .insert(name, candidate);
                false
            }
            Event::InitDone => {
                let mut relisted = self.relist.take().unwrap_or_default();
                // Published nodes missing from the relist were deleted while the watch was away.
                for name in self.published.keys() {
                    if !relisted.contains_key(name) {
                        relisted.insert(name.clone(), Err("deleted (gone at relist)".into()));
                    }
                }
                self.nodes = relisted;
                self.synced = true;
                true
            }
            Event::Apply(node) => {
                self.nodes
                    .insert(node_name(&node), evaluate(&node, &self.settings));
                self.synced
            }
            Event::Delete(node) => {
                let reason = if selector_matches(&self.settings.label_selector, &node) {
                    "deleted"
                } else {
                    "label no longer matches the selector"
                };
                self.nodes.insert(node_name(&node), Err(reason.into()));
                self.synced
            }
        }
    }

    /// The node addresses to publish if the eligible set changed, logging each change.
    fn publishable(&mut self) -> Option<Vec<String>> {
        if !self.synced {
            return None;
        }
        let eligible: BTreeMap<String, String> = self
            .nodes
            .iter()
            .filter_map(|(name, c)| c.as_ref().ok().map(|addr| (name.clone(), addr.clone())))
            .collect();
        let first = self.published.is_empty() && eligible.is_empty();
        for (name, old) in &self.published {
            match (eligible.get(name), self.nodes.get(name)) {
                (Some(new), _) if new != old => {
                    tracing::info!(node = %name, from = %old, to = %new, "node address changed")
                }
                (Some(_), _) => {}
                (None, Some(Err(reason))) => {
                    tracing::info!(node = %name, address = %old, %reason, "node removed")
                }
                (None, _) => {
                    tracing::info!(node = %name, address = %old, reason = "deleted", "node removed")
                }
            }
        }
        for (name, addr) in &eligible {
            if !self.published.contains_key(name) {
                tracing::info!(node = %name, address = %addr, "node added");
            }
        }
        for (name, candidate) in &self.nodes {
            if let Err(reason) = candidate {
                if !self.published.contains_key(name) {
                    tracing::debug!(node = %name, %reason, "node is not a backend");
                }
            }
        }
        // Forget nodes that are gone for good; keep excluded ones so their return is seen.
        self.nodes.retain(|_, c| match c {
            Err(reason) => !reason.starts_with("deleted") && !reason.starts_with("label"),
            Ok(_) => true,
        });
        if eligible == self.published && !first {
            return None;
        }
        self.published = eligible;
        let mut addresses: Vec<String> = self.published.values().cloned().collect();
        addresses.sort();
        addresses.dedup();
        if addresses.is_empty() {
            tracing::warn!("no Kubernetes node is eligible: every route answers 503");
        }
        Some(addresses)
    }
}

fn node_name(node: &Node) -> String {
    node.metadata.name.clone().unwrap_or_default()
}

/// Decides whether a node is a backend (CLEARML.md §4.2) and at which address.
pub fn evaluate(node: &Node, settings: &KubernetesDiscovery) -> Result<String, String> {
    let meta = &node.metadata;
    if meta.deletion_timestamp.is_some() {
        return Err("being deleted".into());
    }
    if meta
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(EXCLUDE_LABEL))
    {
        return Err(format!("carries the {EXCLUDE_LABEL} label"));
    }
    let spec = node.spec.as_ref();
    if spec
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == AUTOSCALER_TAINT))
    {
        return Err("being removed by the cluster autoscaler".into());
    }
    if !settings.include_unschedulable && spec.and_then(|s| s.unschedulable) == Some(true) {
        return Err("cordoned".into());
    }
    let status = node.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.as_str());
    match ready {
        Some("True") => {}
        Some(other) => return Err(format!("NotReady (Ready={other})")),
        None => return Err("NotReady (no Ready condition)".into()),
    }
    let addresses = status.and_then(|s| s.addresses.as_deref()).unwrap_or(&[]);
    settings
        .address_types
        .iter()
        .find_map(|wanted| {
            addresses
                .iter()
                .filter(|a| a.type_ == wanted.as_str())
                .find_map(|a| normalize_node(&a.address))
        })
        .ok_or_else(|| {
            let allowed: Vec<&str> = settings.address_types.iter().map(|t| t.as_str()).collect();
            format!("no address of type {}", allowed.join("/"))
        })
}

/// Matches equality and existence terms of a label selector (`k=v`, `k==v`, `k!=v`, `k`,
/// `!k`); set-based terms are taken as matching. Only used to name why a node went away:
/// the API server does the real selection.
pub fn selector_matches(selector: &str, node: &Node) -> bool {
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            if term.contains(" in ") || term.contains(" notin ") {
                true
            } else if let Some((k, v)) = term.split_once("!=") {
                labels.get(k.trim()).map(String::as_str) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                labels.get(k.trim()).map(String::as_str) == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                !labels.contains_key(k.trim())
            } else {
                labels.contains_key(term)
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AddressType;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeCondition, NodeSpec, NodeStatus, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn settings() -> KubernetesDiscovery {
        KubernetesDiscovery {
            label_selector: "app=clearml".into(),
            address_types: vec![
                AddressType::InternalIP,
                AddressType::ExternalIP,
                AddressType::Hostname,
            ],
            include_unschedulable: true,
            kubeconfig: None,
            context: None,
        }
    }

    fn node(addresses: &[(&str, &str)], ready: &str) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some("n1".into());
        n.metadata.labels = Some([("app".to_string(), "clearml".to_string())].into());
        n.status = Some(NodeStatus {
            addresses: Some(
                addresses
                    .iter()
                    .map(|(t, a)| NodeAddress {
                        type_: t.to_string(),
                        address: a.to_string(),
                    })
                    .collect(),
            ),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: ready.into(),
                ..NodeCondition::default()
            }]),
            ..NodeStatus::default()
        });
        n
    }

    #[test]
    fn eligibility_table() {
        let s = settings();
        let ok = node(&[("InternalIP", "10.0.0.1")], "True");
        assert_eq!(evaluate(&ok, &s), Ok("10.0.0.1".into()));
        assert!(evaluate(&node(&[("InternalIP", "10.0.0.1")], "False"), &s).is_err());
        assert!(evaluate(&node(&[("InternalIP", "10.0.0.1")], "Unknown"), &s).is_err());
        assert!(evaluate(&node(&[], "True"), &s).is_err());

        let mut deleting = ok.clone();
        deleting.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert_eq!(evaluate(&deleting, &s), Err("being deleted".into()));

        let mut excluded = ok.clone();
        excluded
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(EXCLUDE_LABEL.into(), "".into());
        assert!(evaluate(&excluded, &s).is_err());

        let mut scaling_down = ok.clone();
        scaling_down.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: AUTOSCALER_TAINT.into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            }]),
            ..NodeSpec::default()
        });
        assert!(evaluate(&scaling_down, &s).is_err());

        let mut cordoned = ok.clone();
        cordoned.spec = Some(NodeSpec {
            unschedulable: Some(true),
            ..NodeSpec::default()
        });
        assert_eq!(evaluate(&cordoned, &s), Ok("10.0.0.1".into()));
        let strict = KubernetesDiscovery {
            include_unschedulable: false,
            ..settings()
        };
        assert_eq!(evaluate(&cordoned, &strict), Err("cordoned".into()));
    }

    #[test]
    fn address_preference_ipv6_and_hostname() {
        let s = settings();
        let n = node(
            &[
                ("Hostname", "node-1"),
                ("ExternalIP", "203.0.113.5"),
                ("InternalIP", "fd00::5"),
            ],
            "True",
        );
        assert_eq!(evaluate(&n, &s), Ok("fd00::5".into()));
        let n = node(&[("Hostname", "Node-1.Internal")], "True");
        assert_eq!(evaluate(&n, &s), Ok("node-1.internal".into()));
        let internal_only = KubernetesDiscovery {
            address_types: vec![AddressType::InternalIP],
            ..settings()
        };
        assert!(evaluate(&n, &internal_only).is_err());
    }

    #[test]
    fn selector_terms() {
        let n = node(&[], "True");
        assert!(selector_matches("app=clearml", &n));
        assert!(selector_matches("app==clearml,!gpu", &n));
        assert!(!selector_matches("app=other", &n));
        assert!(!selector_matches("app!=clearml", &n));
        assert!(selector_matches("app", &n));
        assert!(!selector_matches("!app", &n));
        assert!(selector_matches("", &n));
    }
}
