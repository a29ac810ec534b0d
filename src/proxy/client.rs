//! The client connection as the proxy sees it (address, TLS name, listener mode), and the
//! tunnel the proxy hands back to the connection's loop once an upgrade's 101 is written.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hyper::header::HeaderValue;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::snapshot::InFlightGuard;
use crate::upstream::NodeConnection;

/// What the handler needs to know about the client connection a request came on.
///
/// Held by every connection for its whole life, parked or not: kept within jemalloc's
/// 192-byte size class (the listener's HSTS value shared, not copied; the scheme a flag).
#[derive(Debug)]
pub struct ClientConn {
    pub peer: SocketAddr,
    /// The peer's IP, rendered once per connection for the forwarding headers.
    pub peer_ip: HeaderValue,
    /// Whether the connection came over TLS: `X-Forwarded-Proto` says `https`.
    tls: bool,
    /// The TLS server name the client asked for; a request for another host gets 421.
    pub sni: Option<Box<str>>,
    /// On a redirecting plain listener, the HTTPS port to send clients to.
    pub redirect_https_port: Option<u16>,
    /// `Strict-Transport-Security` for responses on this (TLS) connection.
    pub hsts: Option<Arc<HeaderValue>>,
    /// An upgrade the node accepted, waiting for the client side of the connection.
    tunnel: Mutex<Option<Box<PendingTunnel>>>,
}

impl ClientConn {
    pub fn new(
        peer: SocketAddr,
        tls: bool,
        sni: Option<Box<str>>,
        redirect_https_port: Option<u16>,
        hsts: Option<Arc<HeaderValue>>,
    ) -> Self {
        ClientConn {
            peer,
            peer_ip: ip_header_value(peer.ip()),
            tls,
            sni,
            redirect_https_port,
            hsts,
            tunnel: Mutex::new(None),
        }
    }

    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub fn proto(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// Leaves a tunnel for the connection's loop to run once the 101 is written.
    pub fn hand_over_tunnel(&self, tunnel: PendingTunnel) {
        // Boxed: rare, and the record is kept small for every connection.
        *self.tunnel.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(tunnel));
    }

    /// The tunnel left by the last request, if its node switched protocols.
    pub fn take_tunnel(&self) -> Option<Box<PendingTunnel>> {
        self.tunnel.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The peer's IP as a header value, written as `Display` writes it. An IPv4 address (nearly
/// every client) is written out here: `Display` goes through the formatting machinery, 1,500
/// instructions per connection (measured), 3 % of a request on a connection of its own.
fn ip_header_value(ip: IpAddr) -> HeaderValue {
    let IpAddr::V4(v4) = ip else {
        return HeaderValue::try_from(ip.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    };
    // At most 15 bytes ("255.255.255.255"), so every index below is in bounds.
    let mut text = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            text[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            text[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        text[len] = b'0' + octet % 10;
        len += 1;
    }
    HeaderValue::from_bytes(&text[..len]).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// The node's side of an accepted upgrade, and its in-flight count, until the client's side
/// is free.
#[derive(Debug)]
pub struct PendingTunnel {
    pub upstream: NodeConnection,
    pub in_flight: InFlightGuard,
}

impl PendingTunnel {
    /// Copies bytes both ways between the client and the node until either side closes; what
    /// each side sent right after the upgrade (`client_early`: the client's bytes read with
    /// its request) goes first.
    pub async fn run<C: AsyncRead + AsyncWrite + Unpin>(self, mut client: C, client_early: Bytes) {
        let node = self.in_flight.backend().authority.clone();
        let (mut upstream, early) = self.upstream.into_upgraded();
        let copied = async {
            if !early.is_empty() {
                client.write_all(&early).await?;
            }
            if !client_early.is_empty() {
                upstream.write_all(&client_early).await?;
            }
            tokio::io::copy_bidirectional(&mut client, &mut upstream).await
        };
        if let Err(e) = copied.await {
            tracing::debug!(%node, error = %e, "upgraded connection ended");
        }
        drop(self.in_flight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_ip_is_written_as_display_writes_it() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.0.100.9",
            "192.168.10.99",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:10.1.2.3",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_header_value(ip).to_str().unwrap(), ip.to_string());
        }
        for octet in 0..=255 {
            let ip = IpAddr::from([octet, 0, 255 - octet, octet]);
            assert_eq!(ip_header_value(ip).to_str().unwrap(), ip.to_string());
        }
    }
}

#[cfg(all(test, target_pointer_width = "64"))]
mod size {
    /// Every connection holds one for its life: with `Arc`'s two counters it must stay
    /// within jemalloc's 192-byte class (the next is 224, then 256).
    #[test]
    fn a_client_record_fits_the_192_byte_size_class() {
        let with_counts = std::mem::size_of::<super::ClientConn>() + 16;
        assert!(
            with_counts <= 192,
            "ClientConn with Arc's counts: {with_counts} bytes"
        );
    }
}
