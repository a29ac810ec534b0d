//! An HTTP/1.1 client connection's stream and read buffer, shared by the connection's loop
//! and the body of the request being served: the loop reads heads and writes responses, the
//! proxy reads the body through [`Http1BodySource`] as it forwards it. Both run in the
//! connection's task, so the lock is never contended; it is taken for one poll at a time,
//! never across one.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::http1::{BodyDecoder, BodyError, BodyFraming, Decoded, ReadBuffer};
use crate::proxy::body::{BoxError, Http1BodySource};

/// The stream, what has been read from it, and where the current request's body stands.
pub(super) struct IoState<S> {
    pub(super) stream: S,
    pub(super) read: ReadBuffer,
    pub(super) body: BodyProgress,
    /// Bytes of `100 Continue` still owed to a client that asked for it, written when the
    /// body is first read.
    continue_owed: u8,
    /// The client has sent its FIN (it may still read the answer).
    pub(super) read_closed: bool,
}

/// Where the body of the request being served stands.
pub(super) enum BodyProgress {
    Reading(BodyDecoder),
    /// Read to its end: what follows on the stream is the next request.
    Whole,
    /// Malformed, cut short, or not read to its end: the connection cannot carry another
    /// request.
    Abandoned,
}

pub(super) struct ClientIo<S> {
    state: Mutex<IoState<S>>,
}

/// Short enough for its unsent length to fit the byte that counts it.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl<S> ClientIo<S> {
    pub(super) fn new(stream: S, first: Vec<u8>) -> Arc<Self> {
        Arc::new(ClientIo {
            state: Mutex::new(IoState {
                stream,
                read: ReadBuffer::with(BytesMut::from(&first[..])),
                body: BodyProgress::Whole,
                continue_owed: 0,
                read_closed: false,
            }),
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, IoState<S>> {
        // The state is consistent between polls; recover it after a panic elsewhere.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stream and the bytes read past the last request, once the request being served
    /// has let go of its body (for a tunnel or a close).
    pub(super) fn into_parts(io: Arc<Self>) -> Option<(S, BytesMut)> {
        let state = Arc::into_inner(io)?
            .state
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        Some((state.stream, state.read.bytes))
    }
}

impl<S> IoState<S> {
    /// Starts reading a new request's body.
    pub(super) fn begin_body(&mut self, framing: BodyFraming, expects_continue: bool) {
        self.body = if framing.is_empty() {
            BodyProgress::Whole
        } else {
            BodyProgress::Reading(BodyDecoder::new(framing))
        };
        if expects_continue && !framing.is_empty() {
            self.continue_owed = CONTINUE.len() as u8;
        }
    }

    /// True when the request's body has been read to its end.
    pub(super) fn body_is_whole(&self) -> bool {
        match &self.body {
            BodyProgress::Whole => true,
            BodyProgress::Reading(decoder) => decoder.is_done(),
            BodyProgress::Abandoned => false,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> IoState<S> {
    fn abandon(&mut self, error: io::Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.body = BodyProgress::Abandoned;
        Poll::Ready(Some(Err(error.into())))
    }

    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        while self.continue_owed > 0 {
            let unsent = &CONTINUE[CONTINUE.len() - usize::from(self.continue_owed)..];
            match ready!(Pin::new(&mut self.stream).poll_write(cx, unsent)) {
                Ok(written @ 1..) => self.continue_owed -= written.min(unsent.len()) as u8,
                Ok(0) => return self.abandon(io::ErrorKind::WriteZero.into()),
                Err(e) => return self.abandon(e),
            }
            if self.continue_owed == 0 {
                if let Err(e) = ready!(Pin::new(&mut self.stream).poll_flush(cx)) {
                    return self.abandon(e);
                }
            }
        }
        loop {
            let decoder = match &mut self.body {
                BodyProgress::Reading(decoder) => decoder,
                BodyProgress::Whole => return Poll::Ready(None),
                // Never a clean end: a body that failed stays failed.
                BodyProgress::Abandoned => {
                    return Poll::Ready(Some(Err(BodyError::Truncated.into())))
                }
            };
            let decoded = match decoder.decode(&mut self.read.bytes) {
                Ok(Some(decoded)) => decoded,
                Ok(None) => match ready!(self.read.poll_fill(&mut self.stream, cx)) {
                    Ok(0) => {
                        self.read_closed = true;
                        return self.abandon(io::Error::other(BodyError::Truncated));
                    }
                    Ok(_) => continue,
                    Err(e) => return self.abandon(e),
                },
                Err(e) => return self.abandon(io::Error::other(e)),
            };
            return Poll::Ready(match decoded {
                Decoded::Data(data) => Some(Ok(Frame::data(data))),
                Decoded::Trailers(trailers) => Some(Ok(Frame::trailers(trailers))),
                Decoded::End => {
                    self.body = BodyProgress::Whole;
                    None
                }
            });
        }
    }

    /// Reads what the client sends while its request is served, once the body is whole:
    /// bytes of a pipelined request are kept (up to `max` buffered), the FIN is noted. An
    /// error (a reset) is returned: the client is gone.
    pub(super) fn poll_watch(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<io::Result<()>> {
        while !self.read_closed && self.body_is_whole() && self.read.bytes.len() < max {
            if ready!(self.read.poll_fill(&mut self.stream, cx))? == 0 {
                self.read_closed = true;
            }
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Http1BodySource for ClientIo<S> {
    fn poll_body(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.lock().poll_body(cx)
    }

    fn body_is_end(&self) -> bool {
        self.lock().body_is_whole()
    }

    fn body_size_hint(&self) -> SizeHint {
        match &self.lock().body {
            BodyProgress::Reading(decoder) => match decoder.remaining() {
                Some(exact) => SizeHint::with_exact(exact),
                None => SizeHint::default(),
            },
            BodyProgress::Whole | BodyProgress::Abandoned => SizeHint::with_exact(0),
        }
    }
}
