//! Configuration reload: what a new configuration changes in place (routes, timeouts,
//! balancing, access log, a static node list, all in one snapshot) and which changed
//! settings are read only at start and need a restart.

use crate::config::{NodeSource, Settings};
use crate::routing::RouteTable;
use crate::snapshot::ProxySettings;

use super::RunningServer;
use crate::metrics::ResultLabel;

impl RunningServer {
    /// Applies a new, already validated configuration without dropping a connection: routes,
    /// timeouts, balancing and access-log settings swap in one snapshot; a static node list
    /// is republished. Returns the changed settings that need a restart to take effect.
    pub fn reload(&self, new: Settings) -> Vec<&'static str> {
        let mut current = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        let mut needs_restart = Vec::new();
        if current.listeners != new.listeners {
            needs_restart.push("listeners");
        }
        if current.admin != new.admin {
            needs_restart.push("admin");
        }
        match (&current.nodes, &new.nodes) {
            (NodeSource::Static(_), NodeSource::Static(nodes)) => {
                self.publisher.publish_nodes(nodes)
            }
            (old, new) if old != new => needs_restart.push("discovery"),
            _ => {}
        }
        // Everything else is read once at start; say which of those changed.
        let (old_t, new_t) = (&current.config.timeouts, &new.config.timeouts);
        let fixed_at_start = [
            ("timeouts.connect", old_t.connect != new_t.connect),
            (
                "timeouts.client_header",
                old_t.client_header != new_t.client_header,
            ),
            (
                "timeouts.idle_keepalive",
                old_t.idle_keepalive != new_t.idle_keepalive,
            ),
            (
                "timeouts.shutdown_drain",
                old_t.shutdown_drain != new_t.shutdown_drain,
            ),
            (
                "balancing.retry_budget_percent",
                current.config.balancing.retry_budget_percent
                    != new.config.balancing.retry_budget_percent,
            ),
            (
                "balancing.max_idle_per_node",
                current.config.balancing.max_idle_per_node
                    != new.config.balancing.max_idle_per_node,
            ),
            (
                "health",
                format!("{:?}", current.config.health) != format!("{:?}", new.config.health)
                    || current
                        .routes
                        .iter()
                        .zip(&new.routes)
                        .any(|(a, b)| a.name == b.name && a.health != b.health),
            ),
            (
                "limits",
                format!("{:?}", current.config.limits) != format!("{:?}", new.config.limits),
            ),
            (
                "tls",
                format!("{:?}", current.config.tls) != format!("{:?}", new.config.tls),
            ),
        ];
        needs_restart.extend(
            fixed_at_start
                .iter()
                .filter(|(_, changed)| *changed)
                .map(|(name, _)| *name),
        );
        self.publisher.publish_config(
            RouteTable::new(new.routes.clone()),
            ProxySettings::from_config(&new.config),
        );
        self.metrics
            .config_reloads
            .get_or_create(&ResultLabel::ok())
            .inc();
        *current = new;
        needs_restart
    }

    /// Counts a reload that was refused (the file did not validate).
    pub fn reload_refused(&self) {
        self.metrics
            .config_reloads
            .get_or_create(&ResultLabel::failed())
            .inc();
    }
}
