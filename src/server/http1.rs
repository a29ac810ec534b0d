//! An HTTP/1.1 connection, served: hyper's HTTP/1.1 server in spells, with the connection
//! parked between them (no hyper connection, no buffer: [`IdleWatch`] says when,
//! [`wait_parked`] waits for the next request), an upgrade's tunnel, and the close: a FIN
//! after the last answer, or a lingering close while the client may still be sending a body.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http1::Parts;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::framing::WatchedStream;
use crate::proxy::client::Ledger;

use super::accept::OpenConnection;
use super::connection::{log_connection_end, ProxyService};
use super::shutdown::{before_shutdown, shutdown_requested};

/// A client stream whose readiness can be awaited without a read buffer, so a connection
/// between requests holds none. Polled, not a future: a parked connection then keeps no
/// waiter state of its own (the socket's registration keeps the waker).
pub(super) trait PollReadable {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl PollReadable for TcpStream {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }
}

impl PollReadable for tokio_rustls::server::TlsStream<TcpStream> {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (tcp, session) = self.get_ref();
        // Plaintext rustls has already decrypted (or a close it has seen) is there to read
        // now; otherwise the next bytes must come from the socket.
        if session.wants_read() {
            tcp.poll_read_ready(cx)
        } else {
            Poll::Ready(Ok(()))
        }
    }
}

/// An HTTP/1.1 client connection between exchanges: all it keeps while parked.
pub(super) struct Http1Conn<S> {
    pub(super) stream: WatchedStream<S>,
    pub(super) service: ProxyService,
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) open: OpenConnection,
}

/// How a spell of hyper serving a connection ended.
enum Served {
    /// Idle between requests: hyper has let go of the stream; wait for the next request.
    Parked,
    /// The client closed or asked to, hyper ended the connection, or the server is stopping.
    Close,
}

/// Serves an HTTP/1.1 connection. Once it has been idle between requests for
/// [`PARK_AFTER`], it is parked: hyper's connection is asked to finish (the ledger in
/// [`crate::proxy::client`] says when that is safe), handing back the stream and any bytes
/// it read ahead; the next request's first bytes are then awaited with no buffer at all, and
/// a fresh hyper connection serves it. An upgrade's tunnel runs here too, on the stream
/// hyper hands back after the 101.
//
// A plain function handing back an `async move` block that uses `conn` as captured: an
// `async fn` would keep a second copy of its argument in the future, which is what a parked
// connection's memory is made of.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of `conn`"
)]
pub(super) fn serve_http1<S>(mut conn: Http1Conn<S>) -> impl Future<Output = ()> + Send
where
    S: PollReadable + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async move {
        loop {
            // Boxed: hyper's connection and the idle watch exist only while hyper serves.
            let (back, served) = Box::pin(serve_until_parked(conn)).await;
            conn = back;
            if let Some(tunnel) = conn.service.client.take_tunnel() {
                Box::pin(tunnel.run(conn.stream)).await;
                return;
            }
            match served {
                Ok(Served::Parked) => {}
                Ok(Served::Close) => break,
                Err(e) => {
                    // Dropped, not closed gracefully: as when hyper ends a connection on an
                    // error.
                    log_connection_end(conn.service.client.peer, Err(e));
                    return;
                }
            }
            if !conn.stream.has_buffered() && !wait_parked(&mut conn).await {
                break;
            }
        }
        let within = conn.open.context.builders.keepalive_idle;
        if conn.service.client.ledger.body_unread() {
            let stream = conn.stream.into_inner();
            Box::pin(close_lingering(stream, within, &conn.shutdown)).await;
        } else {
            Box::pin(close(conn.stream, within)).await;
        }
    }
}

/// Waits, holding no buffer, for a parked connection's next bytes: false when the client
/// sent none within the keep-alive wait or the server is stopping. Every parked connection
/// holds this future, so it is kept lean: a plain function around an `async move` (no second
/// copy of the argument), and no locals beyond the two timers.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of `conn`"
)]
fn wait_parked<S>(conn: &mut Http1Conn<S>) -> impl Future<Output = bool> + Send + '_
where
    S: PollReadable + Send,
{
    async move {
        if *conn.shutdown.borrow() {
            return false;
        }
        conn.open.context.metrics.parked_connections.inc();
        let idle = conn.open.context.builders.keepalive_idle;
        let mut expiry = std::pin::pin!(tokio::time::sleep(idle));
        // Any change is the shutdown (it is sent once), and so is the sender's end;
        // `changed` rather than `shutdown_requested`, whose future is larger.
        let mut stop = std::pin::pin!(conn.shutdown.changed());
        let ready = std::future::poll_fn(|cx| {
            // Taken `&mut` so the future is `Send` without asking the stream to be `Sync`.
            let stream: &mut WatchedStream<S> = &mut conn.stream;
            if let Poll::Ready(ready) = stream.get_ref().poll_readable(cx) {
                return Poll::Ready(ready.is_ok());
            }
            if stop.as_mut().poll(cx).is_ready() || expiry.as_mut().poll(cx).is_ready() {
                return Poll::Ready(false);
            }
            Poll::Pending
        })
        .await;
        conn.open.context.metrics.parked_connections.dec();
        ready
    }
}

/// Lets hyper serve the connection until it ends, or until it has been idle between
/// requests long enough to park; hands the connection back with the stream and hyper's
/// read-ahead in it.
async fn serve_until_parked<S>(mut conn: Http1Conn<S>) -> (Http1Conn<S>, hyper::Result<Served>)
where
    S: PollReadable + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The stream moves into hyper for the spell and back into `conn` after it.
    let mut connection = conn
        .open
        .context
        .builders
        .http1
        .serve_connection(TokioIo::new(conn.stream), conn.service.clone());
    let ledger = &conn.service.client.ledger;
    let mut stopping = false;
    let mut parking = false;
    let result = {
        // The waiter is polled once, which registers this task for the shutdown's wake-up,
        // and after that only when the signal has changed: this loop runs at least twice per
        // request, and each poll of the waiter takes its lock. Unconstrained by tokio's
        // task budget, or a first poll at the end of a busy turn could return without having
        // registered, and this spell would never hear the shutdown.
        let mut watcher = conn.shutdown.clone();
        let mut stop = std::pin::pin!(tokio::task::unconstrained(shutdown_requested(&mut watcher)));
        let mut stop_registered = false;
        let shutdown = &conn.shutdown;
        let mut idle = IdleWatch::new(ledger.answered());
        std::future::poll_fn(|cx| loop {
            // The connection first: it is what wakes this task, for every request.
            if let Poll::Ready(done) = connection.poll_without_shutdown(cx) {
                return Poll::Ready(done);
            }
            let look_at_stop =
                !stopping && (!stop_registered || !matches!(shutdown.has_changed(), Ok(false)));
            stop_registered = true;
            if look_at_stop && stop.as_mut().poll(cx).is_ready() {
                // Shutdown: an idle connection closes now, a busy one after its exchange.
                stopping = true;
            } else if !stopping && !parking && idle.poll_idle(cx, ledger) {
                parking = true;
            } else {
                return Poll::Pending;
            }
            Pin::new(&mut connection).graceful_shutdown();
        })
        .await
    };
    let Parts { io, read_buf, .. } = connection.into_parts();
    conn.stream = io.into_inner();
    conn.stream.unread(read_buf);
    let served = result.map(|()| {
        if parking && !stopping {
            Served::Parked
        } else {
            Served::Close
        }
    });
    (conn, served)
}

/// How long an HTTP/1.1 connection stays idle between requests before it gives up hyper's
/// buffers; it is parked within two of these. Not at once: a busy keep-alive client sends
/// its next request within milliseconds, and building hyper's connection again for each
/// request would cost markedly more CPU per request, which a client pausing
/// longer than this pays only on requests that are rare. Not longer: until then a
/// connection holds hyper's buffers, and when many connections arrive together (many
/// clients sending one request each) they all hold them at once; that peak leaves
/// jemalloc's metadata and slabs grown for good, so the longer this wait, the more memory
/// each idle connection keeps resident afterwards.
const PARK_AFTER: Duration = Duration::from_millis(100);

/// Tells when a connection has been between requests for a whole tick of [`PARK_AFTER`]:
/// no response since the last tick, and the ledger says nothing is owed either way. One
/// timer per connection while hyper serves it, re-armed once a tick (never per request).
///
/// The timer is made only once the spell has answered a request: a connection can park only
/// after an answer, and a client that sends one request and closes (`Connection: close`)
/// then costs no timer at all.
struct IdleWatch {
    tick: Option<Pin<Box<tokio::time::Sleep>>>,
    answered_at_start: u64,
    answered_at_tick: u64,
}

impl IdleWatch {
    fn new(answered: u64) -> Self {
        IdleWatch {
            tick: None,
            answered_at_start: answered,
            answered_at_tick: answered,
        }
    }

    fn poll_idle(&mut self, cx: &mut std::task::Context<'_>, ledger: &Ledger) -> bool {
        let answered = ledger.answered();
        let tick = match &mut self.tick {
            Some(tick) => {
                // A look at the timer's state, not a poll: polling it on every wake-up of a
                // busy connection would register the waker again each time.
                if !tick.is_elapsed() {
                    return false;
                }
                if answered == self.answered_at_tick
                    && ledger.between_requests(self.answered_at_start)
                {
                    return true;
                }
                tick.as_mut()
                    .reset(tokio::time::Instant::now() + PARK_AFTER);
                tick
            }
            None if answered == self.answered_at_start => return false,
            None => self.tick.insert(Box::pin(tokio::time::sleep(PARK_AFTER))),
        };
        self.answered_at_tick = answered;
        // Registers this task's waker with the timer; the deadline is ahead, so it is pending.
        let _ = tick.as_mut().poll(cx);
        false
    }
}

/// Ends a connection the way hyper would: a FIN (and a TLS close_notify) after what was
/// written, bounded in time for a client that reads nothing. False when that bound passed.
async fn close<S: AsyncWrite + Unpin>(mut stream: S, within: Duration) -> bool {
    tokio::time::timeout(within, stream.shutdown())
        .await
        .is_ok()
}

/// How long a lingering close waits for the client's next bytes, and how long it lingers at
/// most: nginx's `lingering_timeout` and `lingering_time`.
const LINGER_QUIET: Duration = Duration::from_secs(5);
const LINGER_TOTAL: Duration = Duration::from_secs(30);

/// Ends a connection whose client may still be sending a body the proxy answered early (a
/// refused upload): the FIN after the answer, then what the client sends is read and
/// dropped until it closes, pauses [`LINGER_QUIET`], [`LINGER_TOTAL`] has passed or the
/// server stops. Closing a socket with unread bytes sends a reset instead of a FIN, which
/// fails the client's upload with "broken pipe" or "connection reset" (and on some systems
/// drops the answer unread) where it should read the 413: nginx's lingering close.
async fn close_lingering<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    within: Duration,
    shutdown: &watch::Receiver<bool>,
) {
    if !close(&mut stream, within).await {
        return;
    }
    let discard = async {
        // On the heap, and only for lingering connections.
        let mut sink = vec![0u8; 16 * 1024];
        while let Ok(Ok(1..)) = tokio::time::timeout(LINGER_QUIET, stream.read(&mut sink)).await {}
    };
    let _ = before_shutdown(LINGER_TOTAL, shutdown, discard).await;
}
