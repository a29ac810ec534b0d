//! The two bodies of an exchange: the client's request body on its way to a node (read by
//! the node connection as it writes), and the response body on its way back (read by the
//! client's connection). Both stream frame by frame: the next frame is read only when the
//! other side has taken the last one, which is the back-pressure.

use std::pin::Pin;
use std::task::{Context, Poll};

use std::sync::Arc;

use crate::metrics::RequestRecord;
use crate::snapshot::InFlightGuard;
use crate::upstream::NodeResponseBody;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the client's body could not be forwarded; found again in the upstream error's
/// source chain to choose the status.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error("request body exceeds the route's limit of {0} bytes")]
    TooLarge(u64),
    #[error("client request body failed: {0}")]
    Read(#[source] BoxError),
}

/// Where an HTTP/1.1 request's body is read from: the client connection itself, which the
/// connection's loop shares with the request while it is served (both run in the
/// connection's task).
pub trait Http1BodySource: Send + Sync {
    fn poll_body(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>;
    fn body_is_end(&self) -> bool;
    fn body_size_hint(&self) -> SizeHint;
}

/// A request body as a client sent it: none, on an HTTP/1.1 connection, or an HTTP/2
/// stream's.
pub enum ClientBody {
    Empty,
    Http1(Arc<dyn Http1BodySource>),
    Http2(Incoming),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::Http1(source) => source.poll_body(cx),
            ClientBody::Http2(incoming) => Pin::new(incoming).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::Http1(source) => source.body_is_end(),
            ClientBody::Http2(incoming) => incoming.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Http1(source) => source.body_size_hint(),
            ClientBody::Http2(incoming) => incoming.size_hint(),
        }
    }
}

/// The client's request body, forwarded to a node: counted, held to the route's limit, and
/// with a first frame that may have been read ahead.
pub struct RequestBody {
    inner: ClientBody,
    /// A frame read before the upstream was contacted (the first of a chunked body). Boxed:
    /// a frame is 100 bytes and rarely there.
    first: Option<Box<Frame<Bytes>>>,
    limit: Option<u64>,
    seen: u64,
    /// The route's request-bytes counter.
    bytes_in: Option<prometheus_client::metrics::counter::Counter>,
}

impl RequestBody {
    pub fn new(inner: ClientBody, first: Option<Frame<Bytes>>, limit: Option<u64>) -> Self {
        let seen = first
            .as_ref()
            .and_then(Frame::data_ref)
            .map_or(0, |d| d.len() as u64);
        RequestBody {
            inner,
            first: first.map(Box::new),
            limit,
            seen,
            bytes_in: None,
        }
    }

    /// Counts forwarded body bytes into the route's counter.
    pub fn count_into(mut self, counter: prometheus_client::metrics::counter::Counter) -> Self {
        if self.seen > 0 {
            counter.inc_by(self.seen);
        }
        self.bytes_in = Some(counter);
        self
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(frame) = this.first.take() {
            return Poll::Ready(Some(Ok(*frame)));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(ClientBodyError::Read(e).into()))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if let Some(counter) = &this.bytes_in {
                        counter.inc_by(data.len() as u64);
                    }
                    if let Some(limit) = this.limit.filter(|l| this.seen > *l) {
                        return Poll::Ready(Some(Err(ClientBodyError::TooLarge(limit).into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // Only chunked bodies are read ahead, and those have no exact size to keep.
        match &self.first {
            Some(_) => SizeHint::default(),
            None => self.inner.size_hint(),
        }
    }
}

/// What the proxy answers with: a node's streamed body, or a short body of its own, plus
/// the request's record, completed (metrics, access log) when the body is dropped.
pub struct ResponseBody {
    kind: Kind,
    record: Option<RequestRecord>,
}

enum Kind {
    /// Streams from the node; the guard counts the request as in flight until the last byte,
    /// and the connection goes back to the node's idle pool after it.
    Upstream {
        body: NodeResponseBody,
        in_flight: InFlightGuard,
    },
    Synthetic(Option<Bytes>),
}

impl ResponseBody {
    pub fn upstream(body: NodeResponseBody, in_flight: InFlightGuard) -> Self {
        let mut body = ResponseBody {
            kind: Kind::Upstream { body, in_flight },
            record: None,
        };
        // A response with no body (204, 304, HEAD) is done already.
        body.release_if_done();
        body
    }

    pub fn text(text: &'static str) -> Self {
        ResponseBody {
            kind: Kind::Synthetic(Some(Bytes::from_static(text.as_bytes()))),
            record: None,
        }
    }

    pub fn empty() -> Self {
        ResponseBody {
            kind: Kind::Synthetic(None),
            record: None,
        }
    }

    /// Attaches the request's record, to be completed when this body is dropped.
    pub fn set_record(&mut self, record: RequestRecord) {
        self.record = Some(record);
    }

    fn release_if_done(&mut self) {
        if let Kind::Upstream { body, in_flight } = &mut self.kind {
            if let Some(conn) = body.finished_connection() {
                in_flight.backend().pool.put_back(conn);
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Upstream { body, .. } => {
                let polled = Pin::new(body).poll_frame(cx);
                if let Poll::Ready(None) | Poll::Ready(Some(Ok(_))) = &polled {
                    this.release_if_done();
                }
                polled.map_err(BoxError::from)
            }
            Kind::Synthetic(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        };
        if let (Poll::Ready(Some(Ok(frame))), Some(record)) = (&polled, &mut this.record) {
            if let Some(data) = frame.data_ref() {
                record.bytes_out += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream { body, .. } => body.is_end_stream(),
            Kind::Synthetic(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream { body, .. } => body.size_hint(),
            Kind::Synthetic(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
