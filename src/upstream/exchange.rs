//! One request and its response on a node connection: the head and body written while the
//! response is read (a node may answer before the body ends), then the response body read
//! out of the connection's buffer as the client takes it.
//!
//! Reads and writes go straight to the socket from the request's own task (vectored
//! writes): no task per connection and no channel between the request and the connection,
//! which is what hyper's client connection costs per exchange.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::Method;
use tokio::net::TcpStream;

use crate::http1::{
    is_idempotent, BodyDecoder, BodyError, BodyFraming, Decoded, HeadError, HeadReader, ReadBuffer,
    ResponseHead, WriteQueue,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response head longer than this is refused (502).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// A connection to one node, between exchanges or in one.
#[derive(Debug)]
pub struct NodeConnection {
    stream: TcpStream,
    read: ReadBuffer,
    /// The response-header timer, kept for the connection's next exchange.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// It has carried an exchange before (it came from the idle pool).
    reused: bool,
}

/// Why an exchange did not get a response head.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// A pooled connection the node had closed: it refused the request's first write, or
    /// (for a method that may be repeated) closed with nothing sent back; no body byte was
    /// taken from the client, so the same request can go again as it is.
    #[error("the pooled connection was closed by the node")]
    Stale,
    #[error("the node closed the connection before answering")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed response head: {0}")]
    Head(#[from] HeadError),
    #[error("malformed response body: {0}")]
    Body(#[from] BodyError),
    /// The client's body failed (or went over its limit) while it was being sent.
    #[error("request body: {0}")]
    RequestBody(BoxError),
    #[error("no response within {0:?} of the request being sent")]
    Timeout(Duration),
}

/// A response head, with the connection its body is to be read from.
#[derive(Debug)]
pub struct Exchanged {
    pub head: ResponseHead,
    pub body: NodeResponseBody,
    /// The whole request body was written (false when the node answered before it ended).
    pub request_sent: bool,
}

impl NodeConnection {
    pub fn new(stream: TcpStream) -> Self {
        NodeConnection {
            stream,
            read: ReadBuffer::default(),
            timer: None,
            reused: false,
        }
    }

    /// False when the node has closed the connection (or sent something unasked) while it
    /// was idle: a look at what the runtime already knows, and a read only if it is readable.
    pub fn is_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Sends a request (its head already written out) and its body, and reads the node's
    /// response head. The body is written while the response is awaited, so a node that
    /// answers early (a refused upload) is heard at once and the rest of the body is not
    /// sent. `timeout` runs from the moment the whole request is written.
    pub async fn exchange<B>(
        mut self,
        head: Bytes,
        body: &mut B,
        framing: BodyFraming,
        method: &Method,
        timeout: Duration,
    ) -> Result<Exchanged, ExchangeError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let repeatable = is_idempotent(method);
        let mut sending = Sending {
            out: WriteQueue::new(),
            body,
            framing,
            body_done: framing.is_empty(),
            body_touched: false,
        };
        sending.out.push(head);
        let mut heads = HeadReader::new(MAX_RESPONSE_HEAD);
        // The connection's timer, set again for each exchange rather than made anew.
        let mut timer = self.timer.take();
        let mut armed = false;
        let head = poll_fn(|cx| loop {
            match sending.poll_send(&mut self.stream, cx) {
                Ok(()) => {}
                // A node that closed a pooled connection refuses the write: it read nothing,
                // whatever the method.
                Err(ExchangeError::Io(e)) => {
                    return Poll::Ready(Err(self.failure(e, sending.body_touched)))
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
            if !armed && sending.is_done() {
                armed = true;
                let deadline = tokio::time::Instant::now() + timeout;
                match timer.as_mut() {
                    Some(timer) => timer.as_mut().reset(deadline),
                    None => timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                }
            }
            // The response, whether or not the request is all written.
            if let Some(head) = heads.response(&mut self.read.bytes, method)? {
                if head.status.is_informational() && head.status != 101 {
                    // An interim answer (100 Continue): the final one follows.
                    continue;
                }
                return Poll::Ready(Ok(head));
            }
            match self.poll_fill(cx) {
                // The node closed after the request was written: it may have acted on it, so
                // only a request that may be repeated goes again as it is.
                Poll::Ready(Ok(0)) => {
                    let stale = repeatable && self.stale(sending.body_touched);
                    return Poll::Ready(Err(if stale {
                        ExchangeError::Stale
                    } else {
                        ExchangeError::Closed
                    }));
                }
                Poll::Ready(Ok(_)) => continue,
                Poll::Ready(Err(e)) => {
                    let touched = sending.body_touched || !repeatable;
                    return Poll::Ready(Err(self.failure(e, touched)));
                }
                Poll::Pending => {}
            }
            if let Some(timer) = timer.as_mut().filter(|_| armed) {
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(ExchangeError::Timeout(timeout)));
                }
            }
            return Poll::Pending;
        })
        .await;
        self.timer = timer;
        let head = head?;
        let request_sent = sending.is_done();
        let reusable = head.keep_alive && request_sent;
        let decoder = BodyDecoder::new(head.framing);
        Ok(Exchanged {
            head,
            body: NodeResponseBody {
                conn: Some(self),
                decoder,
                reusable,
            },
            request_sent,
        })
    }

    /// Nothing came back on a pooled connection and nothing of the client's body was taken:
    /// the node closed it before reading the request.
    fn stale(&self, body_touched: bool) -> bool {
        self.reused && !body_touched && self.read.bytes.is_empty()
    }

    fn failure(&self, error: io::Error, body_touched: bool) -> ExchangeError {
        let closed = matches!(
            error.kind(),
            io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
        );
        if closed && self.stale(body_touched) {
            ExchangeError::Stale
        } else {
            ExchangeError::Io(error)
        }
    }

    /// Reads what the node sent into the read buffer; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.read.poll_fill(&mut self.stream, cx)
    }

    /// The socket and whatever the node sent after its 101, for a tunnel.
    pub fn into_upgraded(self) -> (TcpStream, Bytes) {
        (self.stream, self.read.bytes.freeze())
    }
}

/// The request's side of an exchange: what is left to write, and where the body stands.
struct Sending<'b, B> {
    out: WriteQueue,
    body: &'b mut B,
    framing: BodyFraming,
    body_done: bool,
    /// A frame of the client's body has been taken: the request cannot go again as it is.
    body_touched: bool,
}

impl<B> Sending<'_, B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn is_done(&self) -> bool {
        self.out.is_empty() && self.body_done
    }

    /// Writes what can be written now, taking the body's next frame whenever the last is
    /// written; `Ok` when it has to wait (the socket or the client) or all is written.
    fn poll_send(
        &mut self,
        stream: &mut TcpStream,
        cx: &mut Context<'_>,
    ) -> Result<(), ExchangeError> {
        while !self.is_done() {
            match self.out.poll_write(stream, cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Err(ExchangeError::Io(e)),
                Poll::Pending => return Ok(()),
            }
            if self.body_done {
                break;
            }
            match Pin::new(&mut *self.body).poll_frame(cx) {
                Poll::Ready(frame) => {
                    self.body_touched = true;
                    let frame = frame
                        .transpose()
                        .map_err(|e| ExchangeError::RequestBody(e.into()))?;
                    let chunked = self.framing == BodyFraming::Chunked;
                    self.body_done = self.out.push_frame(frame, chunked);
                }
                Poll::Pending => return Ok(()),
            }
        }
        Ok(())
    }
}

/// A response body read from a node connection as the client takes it. Once read to its
/// end, a connection the node keeps open can go back to the pool
/// ([`NodeResponseBody::finished_connection`]).
#[derive(Debug)]
pub struct NodeResponseBody {
    conn: Option<NodeConnection>,
    decoder: BodyDecoder,
    reusable: bool,
}

impl NodeResponseBody {
    /// The connection, once the body was read whole and the node may take another request
    /// on it.
    pub fn finished_connection(&mut self) -> Option<NodeConnection> {
        let clean = self.conn.as_ref().is_some_and(|c| c.read.bytes.is_empty());
        if !(self.decoder.is_done() && self.reusable && clean) {
            return None;
        }
        let mut conn = self.conn.take()?;
        // An idle connection holds no buffer.
        conn.read.release_if_empty();
        conn.reused = true;
        Some(conn)
    }

    /// The connection itself, for a 101's tunnel.
    pub fn into_connection(mut self) -> Option<NodeConnection> {
        self.conn.take()
    }
}

impl Body for NodeResponseBody {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let this = self.get_mut();
        loop {
            if this.decoder.is_done() {
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(&mut conn.read.bytes) {
                Ok(Some(Decoded::Data(data))) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Some(Decoded::Trailers(trailers))) => {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                }
                Ok(Some(Decoded::End)) => return Poll::Ready(None),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) => match this.decoder.at_eof() {
                    Ok(_) => return Poll::Ready(None),
                    Err(e) => return Poll::Ready(Some(Err(e.into()))),
                },
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(exact) => SizeHint::with_exact(exact),
            None => SizeHint::default(),
        }
    }
}
