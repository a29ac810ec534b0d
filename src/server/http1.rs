//! An HTTP/1.1 connection, served on our codec ([`crate::http1`]): each request's head read
//! and checked where it is parsed, the request handed to the proxy with its body read from
//! the connection as the proxy forwards it, the response written with the framing its body
//! needs, pipelined requests in order; between requests the connection holds no buffer
//! (parked) until the client sends again. Then an upgrade's tunnel, or the close: a FIN after
//! the last answer, or a lingering close while the client may still be sending.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Request;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::http1::{HeadError, HeadReader, RequestHead};
use crate::proxy::body::ClientBody;
use crate::proxy::{ClientConn, Proxy, ProxyError};

use super::context::OpenConnection;
use super::http1_io::ClientIo;
use super::http1_response::{ResponsePlan, ResponseWriter};
use super::shutdown::before_shutdown;

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

/// An HTTP/1.1 client connection: all it keeps between requests.
pub(super) struct Http1Conn<S> {
    pub(super) io: Arc<ClientIo<S>>,
    pub(super) proxy: Arc<Proxy>,
    pub(super) client: Arc<ClientConn>,
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) open: OpenConnection,
}

/// How serving one request left the connection.
enum Served {
    KeepAlive,
    /// Closes after the answer.
    Close,
    /// Closes, but the client may still be sending (a body answered before it was read, a
    /// refused head): lingering close.
    Linger,
    /// The 101 is written: the tunnel takes the connection.
    Upgraded,
    /// The client is gone (a reset, a failed write): nothing more to do.
    Gone,
}

/// Serves an HTTP/1.1 connection to its end.
//
// A plain function handing back an `async move` block that uses `conn` as captured: an
// `async fn` would keep a second copy of its argument in the future, and this future is
// what every idle connection's memory is made of. The work of a request is boxed
// (`serve_request`): it exists only while a request is served.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of `conn`"
)]
pub(super) fn serve_http1<S>(conn: Http1Conn<S>) -> impl Future<Output = ()> + Send
where
    S: PollReadable + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async move {
        let ending = loop {
            match Box::pin(serve_request(&conn)).await {
                Served::KeepAlive => {}
                ending => break ending,
            }
            let buffered = {
                let mut state = conn.io.lock();
                state.read.release_if_empty();
                !state.read.bytes.is_empty()
            };
            // A pipelined request is served at once; otherwise the connection parks.
            if !buffered && !wait_parked(&conn).await {
                break Served::Close;
            }
        };
        finish(conn, ending).await;
    }
}

/// Serves the next request of the connection: its head, the proxy's answer, and the writing
/// of that answer.
async fn serve_request<S>(conn: &Http1Conn<S>) -> Served
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let head = match read_head(conn).await {
        Ok(Some(head)) => head,
        Ok(None) => return Served::Close,
        Err(error) => return refuse(conn, error).await,
    };
    let keep_alive = head.keep_alive;
    let head_request = head.method == hyper::Method::HEAD;
    let http10_client = head.version == hyper::Version::HTTP_10;
    let request = into_request(head, &conn.io);
    let Some(response) = answer_watching_client(conn, request).await else {
        return Served::Gone;
    };
    let (body_whole, nothing_more) = {
        let state = conn.io.lock();
        // A client that half-closed is still answered for the requests it sent before.
        let nothing_more = state.read_closed && state.read.bytes.is_empty();
        (state.body_is_whole(), nothing_more)
    };
    let plan = ResponsePlan {
        head_request,
        http10_client,
        // Shutdown: a busy connection closes after its exchange.
        close: !keep_alive || !body_whole || nothing_more || *conn.shutdown.borrow(),
    };
    let upgraded = response.status() == hyper::StatusCode::SWITCHING_PROTOCOLS;
    let (mut writer, close) = ResponseWriter::new(response, &plan);
    let written =
        std::future::poll_fn(|cx| writer.poll_write(&mut conn.io.lock().stream, cx)).await;
    drop(writer);
    match written {
        Err(e) => {
            tracing::debug!(client = %conn.client.peer, error = %e, "response not written whole");
            Served::Gone
        }
        Ok(()) if upgraded => Served::Upgraded,
        Ok(()) if !body_whole => Served::Linger,
        Ok(()) if close => Served::Close,
        Ok(()) => Served::KeepAlive,
    }
}

/// Reads the next request head. A head already whole in the buffer needs no timer; one
/// still arriving gets the header timeout, and is given up on shutdown. `None` when the
/// client closed (or sent nothing in time) between requests.
async fn read_head<S>(conn: &Http1Conn<S>) -> Result<Option<RequestHead>, HeadError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let settings = &conn.open.context.builders.http1;
    let mut reader = HeadReader::new(settings.max_head);
    if let Some(head) = reader.request(&mut conn.io.lock().read.bytes)? {
        return Ok(Some(head));
    }
    let arriving = std::future::poll_fn(|cx| loop {
        let mut state = conn.io.lock();
        let state = &mut *state;
        match state.read.poll_fill(&mut state.stream, cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Ok(None)),
            Poll::Ready(Ok(_)) => {}
        }
        match reader.request(&mut state.read.bytes) {
            Ok(None) => {}
            done => return Poll::Ready(done),
        }
    });
    match before_shutdown(settings.header_timeout, &conn.shutdown, arriving).await {
        Some(Ok(head)) => head,
        Some(Err(_)) => {
            tracing::debug!(client = %conn.client.peer, "no whole request head within the header timeout");
            Ok(None)
        }
        None => Ok(None),
    }
}

/// The request for the proxy; its body, if any, is read from the connection.
fn into_request<S>(head: RequestHead, io: &Arc<ClientIo<S>>) -> Request<ClientBody>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let body = if head.framing.is_empty() {
        io.lock().begin_body(head.framing, false);
        ClientBody::Empty
    } else {
        io.lock().begin_body(head.framing, head.expects_continue);
        ClientBody::Http1(io.clone())
    };
    let mut request = Request::new(body);
    *request.method_mut() = head.method;
    *request.uri_mut() = head.uri;
    *request.version_mut() = head.version;
    *request.headers_mut() = head.headers;
    request
}

/// The proxy's answer to `request`. While the proxy works, the client is watched once its
/// body is read: a FIN (a client that half-closed after its request) is noted and the answer
/// still written; a reset ends the request at once (`None`), cancelling it at the node.
async fn answer_watching_client<S>(
    conn: &Http1Conn<S>,
    request: Request<ClientBody>,
) -> Option<hyper::Response<crate::proxy::body::ResponseBody>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let max = conn.open.context.builders.http1.max_head;
    let mut answer = std::pin::pin!(conn.proxy.handle(request, &conn.client));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(response) = answer.as_mut().poll(cx) {
            return Poll::Ready(Some(response));
        }
        match conn.io.lock().poll_watch(cx, max) {
            Poll::Ready(Err(e)) => {
                tracing::debug!(client = %conn.client.peer, error = %e, "client gone before its answer");
                Poll::Ready(None)
            }
            _ => Poll::Pending,
        }
    })
    .await
}

/// Answers a head the codec refused (400, 431, 501) and closes: one log line, a short body.
async fn refuse<S>(conn: &Http1Conn<S>, error: HeadError) -> Served
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tracing::info!(client = %conn.client.peer, error = %error, "request refused by the HTTP parser");
    let response = ProxyError::BadHead(error).into_response();
    let plan = ResponsePlan {
        head_request: false,
        http10_client: false,
        close: true,
    };
    let (mut writer, _) = ResponseWriter::new(response, &plan);
    let written =
        std::future::poll_fn(|cx| writer.poll_write(&mut conn.io.lock().stream, cx)).await;
    match written {
        // The client may still be sending the rest of its head or body: let it, so it reads
        // the answer instead of a reset.
        Ok(()) => Served::Linger,
        Err(_) => Served::Gone,
    }
}

/// Waits, holding no buffer, for a parked connection's next bytes: false when the client
/// sent none within the keep-alive wait or the server is stopping. Every parked connection
/// holds this future, so it is kept lean: no locals beyond the two timers.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of `conn`"
)]
fn wait_parked<S>(conn: &Http1Conn<S>) -> impl Future<Output = bool> + Send + '_
where
    S: PollReadable + Send,
{
    async move {
        if *conn.shutdown.borrow() {
            return false;
        }
        let metrics = &conn.open.context.metrics;
        metrics.parked_connections.inc();
        let mut expiry = std::pin::pin!(tokio::time::sleep(
            conn.open.context.builders.http1.keepalive_idle
        ));
        let mut watcher = conn.shutdown.clone();
        // Any change is the shutdown (it is sent once), and so is the sender's end.
        let mut stop = std::pin::pin!(watcher.changed());
        let ready = std::future::poll_fn(|cx| {
            if let Poll::Ready(ready) = conn.io.lock().stream.poll_readable(cx) {
                return Poll::Ready(ready.is_ok());
            }
            if stop.as_mut().poll(cx).is_ready() || expiry.as_mut().poll(cx).is_ready() {
                return Poll::Ready(false);
            }
            Poll::Pending
        })
        .await;
        metrics.parked_connections.dec();
        ready
    }
}

/// Ends the connection as serving it decided: a tunnel, a close, a lingering close.
async fn finish<S>(conn: Http1Conn<S>, ending: Served)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let within = conn.open.context.builders.http1.keepalive_idle;
    let tunnel = conn.client.take_tunnel();
    let Some((stream, leftover)) = ClientIo::into_parts(conn.io) else {
        return;
    };
    match (ending, tunnel) {
        (Served::Upgraded, Some(tunnel)) => {
            Box::pin(tunnel.run(stream, leftover.freeze())).await;
        }
        (Served::Linger, _) => Box::pin(close_lingering(stream, within, &conn.shutdown)).await,
        (Served::Gone, _) => {}
        _ => {
            Box::pin(close(stream, within)).await;
        }
    }
    drop(conn.open);
}

/// Ends a connection: a FIN (and a TLS close_notify) after what was written, bounded in time
/// for a client that reads nothing. False when that bound passed.
async fn close<S: AsyncWrite + Unpin>(mut stream: S, within: Duration) -> bool {
    tokio::time::timeout(within, stream.shutdown())
        .await
        .is_ok()
}

/// How long a lingering close waits for the client's next bytes, and how long it lingers at
/// most: nginx's `lingering_timeout` and `lingering_time`.
const LINGER_QUIET: Duration = Duration::from_secs(5);
const LINGER_TOTAL: Duration = Duration::from_secs(30);

/// Ends a connection whose client may still be sending (a body the proxy answered early, a
/// refused head): the FIN after the answer, then what the client sends is read and dropped
/// until it closes, pauses [`LINGER_QUIET`], [`LINGER_TOTAL`] has passed or the server
/// stops. Closing a socket with unread bytes sends a reset instead of a FIN, which fails the
/// client's upload with "broken pipe" or "connection reset" (and on some systems drops the
/// answer unread) where it should read the 413: nginx's lingering close.
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
