//! The idle connections of each backend, and opening new ones. The connection is obtained
//! *before* the request is handed over, so a failed connect gives the request back untouched
//! and it can go to another node.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::NodeConnection;

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
}

/// The idle connections of one backend.
#[derive(Debug)]
pub struct IdlePool {
    settings: PoolSettings,
    idle: Mutex<Vec<(NodeConnection, Instant)>>,
}

impl IdlePool {
    pub fn new(settings: PoolSettings) -> Self {
        IdlePool {
            settings,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(NodeConnection, Instant)>> {
        // The list is always valid between operations; recover it after a panic elsewhere.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection that is still open, newest first (warm, and least likely to have
    /// been closed by the node's keep-alive timeout).
    pub fn take_idle(&self) -> Option<NodeConnection> {
        let mut idle = self.lock();
        let now = Instant::now();
        while let Some((conn, since)) = idle.pop() {
            if now.duration_since(since) < self.settings.idle_timeout && conn.is_open() {
                return Some(conn);
            }
        }
        None
    }

    /// A pooled connection ready for a request, or a new one.
    pub async fn checkout(&self, target: &ConnectTarget) -> Result<NodeConnection, ConnectError> {
        match self.take_idle() {
            Some(conn) => Ok(conn),
            None => self.connect(target).await,
        }
    }

    /// Returns a connection whose exchange has finished.
    pub fn put_back(&self, conn: NodeConnection) {
        let mut idle = self.lock();
        if idle.len() < self.settings.max_idle {
            idle.push((conn, Instant::now()));
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
            .retain(|(conn, since)| now.duration_since(*since) < timeout && conn.is_open());
    }

    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }

    /// Opens a new connection to `target`.
    pub async fn connect(&self, target: &ConnectTarget) -> Result<NodeConnection, ConnectError> {
        let timeout = self.settings.connect_timeout;
        let stream = match tokio::time::timeout(timeout, target.connect()).await {
            Ok(stream) => stream?,
            Err(_) => return Err(ConnectError::Timeout(timeout)),
        };
        let _ = stream.set_nodelay(true);
        Ok(NodeConnection::new(stream))
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
