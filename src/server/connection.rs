//! A set-up connection, served: the client's details for the proxy ([`ClientConn`]) and the
//! task that serves it with the protocol its set-up chose.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::ListenerMode;
use crate::proxy::ClientConn;

use super::context::{ConnSetup, OpenConnection, ServedBy};
use super::http1::{serve_http1, Http1Conn, PollReadable};
use super::http1_io::ClientIo;
use super::http2::{serve_http2, Prefixed, ProxyService};
use super::protocol::Protocol;

/// Wraps a set-up connection and serves it, in a task of its own, with the protocol its first
/// bytes chose. A task of its own because a task is as large as its largest state for its
/// whole life: the set-up task (handshake, first read) ends here, and an HTTP/1.1
/// connection, which spends most of its life parked between requests, lives in a task sized
/// for that (every idle client holds one of these).
pub(super) fn serve_connection<S>(
    stream: S,
    first: Vec<u8>,
    protocol: Protocol,
    client: ConnSetup,
    served: ServedBy,
    open: OpenConnection,
) where
    S: PollReadable + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = client.peer;
    let tls = client.mode == ListenerMode::Tls;
    let client = Arc::new(ClientConn::new(
        peer,
        tls,
        client.sni,
        match client.mode {
            ListenerMode::RedirectToHttps { https_port } => Some(https_port),
            _ => None,
        },
        if tls { client.hsts } else { None },
    ));
    let ServedBy { proxy, shutdown } = served;
    match protocol {
        Protocol::Http1 => tokio::spawn(serve_http1(Http1Conn {
            io: ClientIo::new(stream, first),
            proxy,
            client,
            shutdown,
            open,
        })),
        Protocol::Http2 => {
            let stream = Prefixed::new(stream, first);
            let service = ProxyService { proxy, client };
            tokio::spawn(serve_http2(stream, service, shutdown, open, peer))
        }
    };
}
