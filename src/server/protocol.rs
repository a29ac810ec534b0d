//! Telling a connection's protocol by its first bytes: HTTP/2 with prior knowledge opens with
//! its preface, anything else is HTTP/1.1; and waiting for those bytes, bounded by the header
//! timeout and ended by shutdown.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;

use super::shutdown::before_shutdown;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    Http1,
    Http2,
}

/// HTTP/2 with prior knowledge (RFC 9113 §3.3) opens with this preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The first read of a plain connection takes up to this much; most request heads fit, so
/// the first request is parsed without reading again.
pub(super) const FIRST_READ_BYTES: usize = 4096;

/// Reads a connection's first bytes to tell HTTP/2 prior knowledge from HTTP/1.1, in one
/// read for any HTTP/1.1 request (hyper-util's auto builder reads the 24-byte preface length
/// first, then hyper reads again: a system call more per connection), after the bytes in
/// `first` that were read already. `None` when the client closed before sending a byte.
async fn read_first_bytes<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut first: Vec<u8>,
) -> io::Result<Option<(Protocol, Vec<u8>)>> {
    first.reserve(FIRST_READ_BYTES.saturating_sub(first.len()));
    loop {
        if stream.read_buf(&mut first).await? == 0 {
            return Ok(None);
        }
        if let Some(protocol) = protocol_of(&first) {
            return Ok(Some((protocol, first)));
        }
    }
}

/// The protocol a connection's first bytes announce; `None` while they could still be the
/// start of the HTTP/2 preface.
pub(super) fn protocol_of(first: &[u8]) -> Option<Protocol> {
    let seen = first.len().min(H2_PREFACE.len());
    if first[..seen] != H2_PREFACE[..seen] {
        Some(Protocol::Http1)
    } else if seen == H2_PREFACE.len() {
        Some(Protocol::Http2)
    } else {
        None
    }
}

/// Waits for a connection's first bytes, at most the header timeout, and ends at once on
/// shutdown: a client that has sent nothing has nothing in flight (hyper itself would wait
/// for a new connection's first request until the header timeout, holding up the drain).
/// `None` when the connection is to be closed.
pub(super) async fn first_bytes<S: AsyncRead + Unpin>(
    stream: &mut S,
    read_already: Vec<u8>,
    peer: SocketAddr,
    timeout: Duration,
    shutdown: &watch::Receiver<bool>,
) -> Option<(Protocol, Vec<u8>)> {
    match before_shutdown(timeout, shutdown, read_first_bytes(stream, read_already)).await? {
        Ok(Ok(first)) => first,
        Ok(Err(e)) => {
            tracing::debug!(client = %peer, error = %e, "connection ended before a request");
            None
        }
        Err(_) => {
            tracing::debug!(client = %peer, "no request within the header timeout");
            None
        }
    }
}
