//! Writing a response to an HTTP/1.1 client: the head with the framing its body needs (a
//! length when the size is known, else chunked, or until the close for an HTTP/1.0
//! client), `Date` when the node sent none, then the body frame by frame as the node sends
//! it. The head and the first frame go out in one write when the frame is there already.

use std::cell::RefCell;
use std::io;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use hyper::body::{Body, Frame};
use hyper::header::{HeaderValue, CONNECTION, DATE};
use hyper::{Response, StatusCode};

use crate::http1::{response_head, BodyFraming, WriteQueue};
use crate::proxy::body::ResponseBody;

/// What the connection decided about a response before writing it.
pub(super) struct ResponsePlan {
    /// The request was HEAD: the head describes a body that is not sent.
    pub(super) head_request: bool,
    pub(super) http10_client: bool,
    /// The connection closes after this response.
    pub(super) close: bool,
}

/// A response being written, polled by the connection's loop.
pub(super) struct ResponseWriter {
    body: ResponseBody,
    framing: Option<BodyFraming>,
    queue: WriteQueue,
    body_done: bool,
}

impl ResponseWriter {
    /// Writes the head into the queue. The second value is whether the connection must
    /// close after it (a body delimited by the close).
    pub(super) fn new(response: Response<ResponseBody>, plan: &ResponsePlan) -> (Self, bool) {
        let (mut parts, body) = response.into_parts();
        let status = parts.status;
        let describes_only = plan.head_request || status == StatusCode::NOT_MODIFIED;
        let bodyless =
            describes_only || status.is_informational() || status == StatusCode::NO_CONTENT;
        let framing = if describes_only {
            None
        } else if bodyless {
            Some(BodyFraming::Empty)
        } else if let Some(exact) = body.size_hint().exact() {
            Some(BodyFraming::Length(exact))
        } else if plan.http10_client {
            Some(BodyFraming::UntilClose)
        } else {
            Some(BodyFraming::Chunked)
        };
        let close = plan.close || framing == Some(BodyFraming::UntilClose);
        if close && status != StatusCode::SWITCHING_PROTOCOLS {
            parts
                .headers
                .insert(CONNECTION, HeaderValue::from_static("close"));
        } else if plan.http10_client {
            parts
                .headers
                .insert(CONNECTION, HeaderValue::from_static("keep-alive"));
        }
        if !parts.headers.contains_key(DATE) {
            parts.headers.insert(DATE, date_now());
        }
        let mut head = Vec::new();
        response_head(&mut head, status, &parts.headers, framing);
        let mut queue = WriteQueue::new();
        queue.push(Bytes::from(head));
        let writer = ResponseWriter {
            body,
            framing,
            queue,
            body_done: bodyless,
        };
        (writer, close)
    }

    /// Writes the head and the body to `stream`; ready once all of it is written (an error
    /// when the client went away or the node's body failed).
    pub(super) fn poll_write<S: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            // Frames are queued behind the head while there is room, so a head and a body
            // already at hand go out in one write.
            if !self.body_done && self.queue.has_room_for_a_frame() {
                match std::pin::Pin::new(&mut self.body).poll_frame(cx) {
                    Poll::Ready(frame) => {
                        self.queue_frame(frame)?;
                        continue;
                    }
                    Poll::Pending if self.queue.is_empty() => {
                        // What was written must reach the client while the node is slow
                        // (TLS holds records until flushed).
                        std::task::ready!(std::pin::Pin::new(&mut *stream).poll_flush(cx))?;
                        return Poll::Pending;
                    }
                    Poll::Pending => {}
                }
            }
            std::task::ready!(self.queue.poll_write(stream, cx))?;
            if self.body_done {
                return std::pin::Pin::new(&mut *stream).poll_flush(cx);
            }
        }
    }

    fn queue_frame(
        &mut self,
        frame: Option<Result<Frame<Bytes>, crate::proxy::body::BoxError>>,
    ) -> io::Result<()> {
        let frame = frame.transpose().map_err(io::Error::other)?;
        let chunked = self.framing == Some(BodyFraming::Chunked);
        if self.queue.push_frame(frame, chunked) {
            self.body_done = true;
        }
        Ok(())
    }
}

thread_local! {
    /// The `Date` value for the current second, made once a second per worker thread.
    static DATE_NOW: RefCell<(u64, HeaderValue)> =
        const { RefCell::new((u64::MAX, HeaderValue::from_static(""))) };
}

fn date_now() -> HeaderValue {
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE_NOW.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            let text = httpdate::fmt_http_date(now);
            if let Ok(value) = HeaderValue::from_str(&text) {
                *cached = (second, value);
            }
        }
        cached.1.clone()
    })
}
