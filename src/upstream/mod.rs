//! Connections to the nodes: HTTP/1.1 only (ClearML's nginx and werkzeug speak no h2c) on our
//! own codec ([`crate::http1`]), kept alive in a small idle pool per backend.
//!
//! A connection is obtained *before* the request is handed over ([`IdlePool::checkout`]), so
//! a failed connect gives the request back untouched and it can go to another node; an
//! exchange ([`NodeConnection::exchange`]) tells a pooled connection the node had already
//! closed (nothing of the request read, nothing answered) from a node that failed while
//! serving it, so the proxy can decide what may be sent again.

mod exchange;
mod pool;

pub use exchange::{ExchangeError, Exchanged, NodeConnection, NodeResponseBody};
pub use pool::{ConnectError, ConnectTarget, IdlePool, PoolSettings};
