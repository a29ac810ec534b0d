//! From a listener to a connection's first bytes: the accept loop (each connection taking a
//! permit of the connection limit), deferred accepting and the read at accept, and a plain
//! connection's set-up task when its first bytes are not there yet. A TLS connection leaves
//! here for its handshake (`super::tls`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::proxy::Proxy;

use super::connection::serve_connection;
use super::context::{ListenerContext, OpenConnection, ServedBy};
use super::protocol::{first_bytes, protocol_of, FIRST_READ_BYTES};
use super::tls::serve_tls;

pub(super) async fn accept_loop(
    listener: TcpListener,
    context: Arc<ListenerContext>,
    proxy: Arc<Proxy>,
    limit: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Where a new connection's first bytes are read; each connection keeps a copy of just
    // what it sent.
    let mut scratch = [0; FIRST_READ_BYTES];
    loop {
        // Waiting for a permit before accepting leaves excess clients in the kernel's
        // backlog instead of accepting and dropping them. The permit first, as the accept
        // below: the shutdown's waiter is polled only when there is a wait.
        let permit = tokio::select! {
            biased;
            permit = limit.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.changed() => return,
        };
        // A queue of clients is accepted without polling the shutdown's waiter each time;
        // `has_changed` below notices a shutdown that came meanwhile.
        let (stream, peer) = tokio::select! {
            biased;
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        if shutdown.has_changed().unwrap_or(true) {
            // Dropped unanswered, as the connections still in the kernel's queue are when
            // the listener closes.
            return;
        }
        let _ = stream.set_nodelay(true);
        let open = OpenConnection::new(context.clone(), permit);
        let served = ServedBy {
            proxy: proxy.clone(),
            shutdown: shutdown.clone(),
        };
        // Plain and TLS connections are separate tasks so a plain connection's task does not
        // carry the (large) state of a TLS handshake.
        if context.acceptor.is_some() {
            tokio::spawn(serve_tls(stream, peer, open, served));
            continue;
        }
        // A plain connection on a deferring listener has its request there already: read
        // here, it goes straight to its serving task. Otherwise (or with too few bytes to
        // tell the protocol) a set-up task waits for them.
        let first = if context.defers_accept {
            match read_now(&stream, &mut scratch) {
                Ok(0) => continue, // closed before sending a byte
                Ok(read) => scratch[..read].to_vec(),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    Vec::new()
                }
                Err(e) => {
                    tracing::debug!(client = %peer, error = %e, "connection ended before a request");
                    continue;
                }
            }
        } else {
            Vec::new()
        };
        match protocol_of(&first) {
            Some(protocol) => {
                let client = context.setup(peer, None);
                serve_connection(stream, first, protocol, client, served, open);
            }
            None => {
                tokio::spawn(serve_plain(stream, peer, open, served, first));
            }
        }
    }
}

/// Asks the kernel to hand over a listener's connections only once the client has sent its
/// first bytes (Linux `TCP_DEFER_ACCEPT`, nginx's `listen ... deferred`, HAProxy's
/// `defer-accept`). A connection then arrives with its request already readable: one
/// wake-up per connection instead of two, and [`read_now`] finds the bytes, so the
/// connection needs no set-up task (and the proxy spends less CPU per new connection). A
/// client that connects and stays silent is handed over anyway after about a
/// second, when the kernel's retransmitted SYN-ACK is answered, and then meets the header
/// timeout as before.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(super) fn defer_accept(listener: &TcpListener) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let seconds: libc::c_int = 1;
    let length = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: setsockopt reads `length` bytes at the option pointer, which points at
    // `seconds`, a live and aligned c_int of exactly that size that outlives the call; the
    // descriptor is the listener's own open socket, borrowed for the call. Nothing is written
    // through the pointer and nothing is kept after the call returns.
    let status = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&seconds).cast::<libc::c_void>(),
            length,
        )
    };
    if status == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
pub(super) fn defer_accept(_listener: &TcpListener) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "deferred accept is a Linux feature",
    ))
}

/// Reads what a just-accepted client has already sent, straight from the socket. A client
/// sends its request as soon as it has connected, so under load it is usually there by the
/// time the connection is accepted; read here, the connection skips the set-up task with its
/// timer and shutdown waiter, and goes straight to the task that serves it. (tokio's own
/// reads would first wait for the socket's first readiness event, which comes only with the
/// driver's next turn.) `WouldBlock` when nothing has arrived yet.
fn read_now(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::io::Read;
    (&*socket2::SockRef::from(stream)).read(buf)
}

/// A plain connection's set-up task: waits for the first bytes that tell its protocol.
//
// The set-up step is boxed (as the TLS one is): the set-up task is a few hundred bytes while
// a handshake or a first read is awaited (as with idle clients that have sent nothing yet).
async fn serve_plain(
    mut stream: TcpStream,
    peer: SocketAddr,
    open: OpenConnection,
    served: ServedBy,
    read_already: Vec<u8>,
) {
    let timeout = open.context.handshake_timeout;
    let Some((protocol, first)) = Box::pin(first_bytes(
        &mut stream,
        read_already,
        peer,
        timeout,
        &served.shutdown,
    ))
    .await
    else {
        return;
    };
    let client = open.context.setup(peer, None);
    serve_connection(stream, first, protocol, client, served, open);
}
