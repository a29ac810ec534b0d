//! clearml-edge: the load balancer ClearML Server's Kubernetes guide asks for.
//!
//! ClearML publishes three NodePort services (web app 30080, file server 30081, API 30008);
//! DNS records `app.`, `files.` and `api.<domain>` point at this proxy, which sends each name
//! to the cluster nodes on the matching port.
//!
//! Data flows one way: [`config`] and discovery publish immutable [`snapshot::Snapshot`]s
//! through [`snapshot::Publisher`]; the request path in [`proxy`] loads the current one once
//! per request and never locks. [`server`] owns listeners, connections and shutdown;
//! HTTP/1.1 is read and written on both sides by our codec in [`http1`] (hyper serves
//! HTTP/2), and [`upstream`] holds the node connections.

// One exception, allowed where it stands with its proof: a setsockopt call the safe
// crates do not offer (`server::accept::defer_accept`).
#![deny(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod config;
pub mod discovery;
pub mod health;
pub mod http1;
pub mod metrics;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod snapshot;
pub mod tls;
pub mod upstream;

pub use config::{Config, ConfigError, Settings};
pub use server::{start, RunningServer};
