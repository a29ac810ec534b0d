//! An HTTP/2 connection, served: hyper's HTTP/2 server in the connection's own task until
//! the client ends it, or until shutdown asks it to finish its in-flight streams (a GOAWAY).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use hyper::body::{Body, Incoming};
use hyper::server::conn::http2;
use hyper::service::HttpService;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::framing::WatchedStream;

use super::accept::OpenConnection;
use super::connection::{log_connection_end, ProxyService};
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
    stream: WatchedStream<S>,
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
