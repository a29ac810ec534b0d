//! An HTTP/2 connection, served: hyper's HTTP/2 server in the connection's own task until
//! the client ends it, or until shutdown asks it to finish its in-flight streams (a GOAWAY);
//! the service that hands each stream's request to the proxy; the stream with the bytes read
//! to tell the protocol served again first.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Incoming};
use hyper::server::conn::http2;
use hyper::service::HttpService;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use crate::proxy::body::{ClientBody, ResponseBody};
use crate::proxy::{ClientConn, Proxy};

use super::context::OpenConnection;
use super::shutdown::{until_shutdown, GracefulConnection};

/// Serves an HTTP/2 connection to its end, holding its permit until then.
//
// A plain function handing back an `async move` block, as the HTTP/1.1 one is: the task's
// future is then that block alone, with no second copy of the arguments.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of the arguments"
)]
pub(super) fn serve_http2<S>(
    stream: Prefixed<S>,
    service: ProxyService,
    shutdown: watch::Receiver<bool>,
    open: OpenConnection,
    peer: SocketAddr,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async move {
        let connection = open
            .context
            .builders
            .http2
            .serve_connection(TokioIo::new(stream), service);
        // Boxed: hyper's connection state is a few KiB and moves as the future is
        // polled first; in a box it is written once.
        log_connection_end(peer, until_shutdown(Box::pin(connection), shutdown).await);
        drop(open);
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A client stream with the bytes read from it to tell its protocol served first.
pub(super) struct Prefixed<S> {
    first: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(super) fn new(inner: S, first: Vec<u8>) -> Self {
        Prefixed {
            first: Bytes::from(first),
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.first.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let take = this.first.len().min(buf.remaining());
        buf.put_slice(&this.first.split_to(take));
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<I, B, S, E> GracefulConnection for http2::Connection<I, S, E>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: Body + 'static,
    B::Error: Into<BoxError>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn begin_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

fn log_connection_end(peer: SocketAddr, result: hyper::Result<()>) {
    if let Err(e) = result {
        // hyper's HTTP/2 server refuses malformed streams itself; this is that one log line.
        if e.is_parse() || e.is_parse_too_large() {
            tracing::info!(client = %peer, error = %e, "request refused by the HTTP parser")
        } else {
            tracing::debug!(client = %peer, error = %e, "connection ended with an error")
        }
    }
}

/// Hands each HTTP/2 request to the proxy, in a future of its own (hyper's HTTP/2 server
/// runs each stream as a task).
#[derive(Clone)]
pub(super) struct ProxyService {
    pub(super) proxy: Arc<Proxy>,
    pub(super) client: Arc<ClientConn>,
}

type Answer = Result<Response<ResponseBody>, Infallible>;

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let proxy = self.proxy.clone();
        let client = self.client.clone();
        let req = req.map(ClientBody::Http2);
        Box::pin(async move { Ok(proxy.handle(req, &client).await) })
    }
}
