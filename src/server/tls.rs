//! A TLS connection's set-up: the handshake (bounded by the header timeout, ended by
//! shutdown, counted), then the protocol by ALPN (or by the first bytes when the client
//! offered none) and the SNI name the connection is served with.

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpStream;

use crate::metrics::ResultLabel;

use super::connection::serve_connection;
use super::context::{OpenConnection, ServedBy};
use super::protocol::{first_bytes, Protocol};
use super::shutdown::before_shutdown;

/// A TLS connection's set-up task, spawned by the accept loop.
//
// The set-up steps are boxed: the set-up task is a few hundred bytes while a handshake or a
// first read is awaited (as with idle clients that have sent nothing yet).
pub(super) async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    open: OpenConnection,
    served: ServedBy,
) {
    let context = &open.context;
    let Some(acceptor) = &context.acceptor else {
        return;
    };
    let timeout = context.handshake_timeout;
    let Some(handshake) = Box::pin(before_shutdown(
        timeout,
        &served.shutdown,
        acceptor.accept(stream),
    ))
    .await
    else {
        return;
    };
    let handshake = handshake.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
    let label = if handshake.is_ok() {
        ResultLabel::ok()
    } else {
        ResultLabel::failed()
    };
    context.metrics.tls_handshakes.get_or_create(&label).inc();
    let mut tls_stream = match handshake {
        Ok(tls_stream) => tls_stream,
        Err(e) => {
            tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
            return;
        }
    };
    let (_, session) = tls_stream.get_ref();
    let sni = session.server_name().map(Box::from);
    // ALPN h2 needs no look at the bytes; otherwise the first bytes decide, as on a plain
    // listener (and a client that sends the HTTP/2 preface without ALPN is still served).
    let (protocol, first) = if session.alpn_protocol() == Some(b"h2") {
        (Protocol::Http2, Vec::new())
    } else {
        match Box::pin(first_bytes(
            &mut tls_stream,
            Vec::new(),
            peer,
            timeout,
            &served.shutdown,
        ))
        .await
        {
            Some(first) => first,
            None => return,
        }
    };
    let client = context.setup(peer, sni);
    serve_connection(tls_stream, first, protocol, client, served, open);
}
