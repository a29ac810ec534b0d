//! Connections to the nodes: HTTP/1.1 only (ClearML's nginx and werkzeug speak no h2c), kept
//! alive in a small idle pool per backend.
//!
//! A lean pool of our own rather than hyper-util's client, for one reason the design rests
//! on: the connection is obtained *before* the request is handed over, so a failed connect
//! (or a pooled connection found dead before anything was written) gives the request back
//! untouched and it can go to another node. hyper's `try_send_request` returns the request
//! when it was never serialised, which is exactly the "nothing lost" boundary.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::proxy::body::RequestBody;

pub type Sender = http1::SendRequest<RequestBody>;

/// How many idle connections a backend keeps, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub max_idle: usize,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_idle: 64,
            idle_timeout: Duration::from_secs(75),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP/1.1 handshake failed: {0}")]
    Handshake(#[from] hyper::Error),
}

/// The idle connections of one backend.
#[derive(Debug)]
pub struct IdlePool {
    settings: PoolSettings,
    idle: Mutex<Vec<(Sender, Instant)>>,
}

impl IdlePool {
    pub fn new(settings: PoolSettings) -> Self {
        IdlePool {
            settings,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Sender, Instant)>> {
        // The list is always valid between operations; recover it after a panic elsewhere.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection that is still open, newest first (warm, and least likely to have
    /// been closed by the node's keep-alive timeout). It may still be finishing its last
    /// exchange: the caller waits for `ready()`.
    pub fn take_idle(&self) -> Option<Sender> {
        let mut idle = self.lock();
        let now = Instant::now();
        while let Some((sender, since)) = idle.pop() {
            if !sender.is_closed() && now.duration_since(since) < self.settings.idle_timeout {
                return Some(sender);
            }
        }
        None
    }

    /// A pooled connection ready for a request, or a new one.
    pub async fn checkout(&self, target: &ConnectTarget) -> Result<Sender, ConnectError> {
        while let Some(mut sender) = self.take_idle() {
            // Resolves at once for an idle connection, or as soon as the previous response
            // has been wound up; errors when the node closed it meanwhile.
            if sender.ready().await.is_ok() {
                return Ok(sender);
            }
        }
        self.connect(target).await
    }

    /// Returns a connection whose exchange has finished.
    pub fn put_back(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < self.settings.max_idle {
            idle.push((sender, Instant::now()));
        }
    }

    /// Closes every idle connection (the node was marked unhealthy or removed).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Drops idle connections past the idle timeout or closed by the node.
    pub fn reap(&self) {
        let now = Instant::now();
        let timeout = self.settings.idle_timeout;
        self.lock()
            .retain(|(s, since)| !s.is_closed() && now.duration_since(*since) < timeout);
    }

    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }

    /// Opens a new connection to `target`.
    pub async fn connect(&self, target: &ConnectTarget) -> Result<Sender, ConnectError> {
        let timeout = self.settings.connect_timeout;
        let stream = match tokio::time::timeout(timeout, target.connect()).await {
            Ok(stream) => stream?,
            Err(_) => return Err(ConnectError::Timeout(timeout)),
        };
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// Where a backend's connections go: a socket address, or a name resolved at connect time.
#[derive(Debug, Clone)]
pub enum ConnectTarget {
    Addr(SocketAddr),
    Name(String, u16),
}

impl ConnectTarget {
    pub fn new(node: &str, port: u16) -> Self {
        match node.parse::<std::net::IpAddr>() {
            Ok(ip) => ConnectTarget::Addr(SocketAddr::new(ip, port)),
            Err(_) => ConnectTarget::Name(node.to_string(), port),
        }
    }

    /// Opens a TCP connection (no timeout: callers bound it).
    pub async fn connect(&self) -> std::io::Result<TcpStream> {
        match self {
            ConnectTarget::Addr(addr) => TcpStream::connect(addr).await,
            ConnectTarget::Name(host, port) => TcpStream::connect((host.as_str(), *port)).await,
        }
    }
}
