//! The client connection as the proxy sees it, and what the proxy tells the connection's
//! HTTP/1.1 loop back: whether the connection is between requests (so it may give up its
//! buffers until the next one), and a tunnel to run once an upgrade's 101 is written.
//!
//! hyper's HTTP/1.1 server keeps an 8 KiB read buffer, a write buffer and the last request's
//! header map for the whole life of a connection, idle or not. The server loop instead ends
//! hyper's connection after each exchange and waits for the next request's first byte with
//! no buffer at all (as nginx does), which is what this ledger makes safe: it ends hyper's
//! connection only after the response head is written (so hyper never adds `Connection:
//! close`) and after the request body was read to its end (so what comes next on the stream
//! is the next request, never the rest of a body).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hyper::body::{Body, Incoming};
use hyper::header::HeaderValue;
use hyper::{Request, Version};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::headers;
use crate::framing::FramingReport;
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
    /// What the raw-stream watcher saw of the request heads (HTTP/1.1).
    pub framing: Arc<FramingReport>,
    pub ledger: Ledger,
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
        framing: Arc<FramingReport>,
    ) -> Self {
        ClientConn {
            peer,
            peer_ip: ip_header_value(peer.ip()),
            tls,
            sni,
            redirect_https_port,
            hsts,
            framing,
            ledger: Ledger::default(),
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

    /// What a request body reports when it has been read to its end. It holds the
    /// connection rather than a counter of its own: one allocation fewer per connection.
    pub fn body_read_mark(self: &Arc<Self>, ordinal: u64) -> BodyReadMark {
        BodyReadMark {
            conn: self.clone(),
            ordinal,
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

/// The exchanges of one connection, counted as the handler sees them.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Request heads handed to the handler; also the next request's ordinal.
    started: AtomicU64,
    /// Responses the handler has returned. hyper writes a response's head in the same poll
    /// that receives it, so once the connection yields, every counted head is written.
    answered: AtomicU64,
    /// The count of requests (from the first) up to the latest one whose body has been read
    /// to its end: equal to `started` when the stream is past the latest request's body.
    bodies_read: AtomicU64,
    /// Whether the latest request lets the connection carry another one (HTTP/1.1 without
    /// `Connection: close`).
    reusable: AtomicBool,
}

impl Ledger {
    /// Records a request head; returns its ordinal on the connection (0 for the first).
    pub fn begin(&self, req: &Request<Incoming>) -> u64 {
        let reusable = req.version() == Version::HTTP_11 && !headers::asks_to_close(req.headers());
        self.record(reusable, req.body().is_end_stream())
    }

    fn record(&self, reusable: bool, bodyless: bool) -> u64 {
        let ordinal = self.started.fetch_add(1, Ordering::AcqRel);
        self.reusable.store(reusable, Ordering::Release);
        if bodyless {
            self.bodies_read.store(ordinal + 1, Ordering::Release);
        }
        ordinal
    }

    /// Records that the handler returned its response.
    pub fn answer(&self) {
        self.answered.fetch_add(1, Ordering::AcqRel);
    }

    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Acquire)
    }

    /// True when a request's body was not read to its end (it was answered early, as a
    /// refused upload is): the client may still be sending it.
    pub fn body_unread(&self) -> bool {
        self.bodies_read.load(Ordering::Acquire) < self.started.load(Ordering::Acquire)
    }

    /// Records that the body of request `ordinal` has been read to its end.
    fn body_read(&self, ordinal: u64) {
        self.bodies_read.store(ordinal + 1, Ordering::Release);
    }

    /// True when a response has been returned since `answered_before`, every request has
    /// its response, the latest body has been read whole, and the client may send another
    /// request: the stream is then at a message boundary with nothing owed either way.
    pub fn between_requests(&self, answered_before: u64) -> bool {
        let answered = self.answered();
        answered != answered_before
            && answered == self.started.load(Ordering::Acquire)
            && self.bodies_read.load(Ordering::Acquire) == answered
            && self.reusable.load(Ordering::Acquire)
    }
}

/// Marks one request's body as read to its end.
#[derive(Debug)]
pub struct BodyReadMark {
    conn: Arc<ClientConn>,
    ordinal: u64,
}

impl BodyReadMark {
    pub fn mark(&self) {
        self.conn.ledger.body_read(self.ordinal);
    }
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
    /// the node sent right after its 101 goes first.
    pub async fn run<C: AsyncRead + AsyncWrite + Unpin>(self, mut client: C) {
        let node = self.in_flight.backend().authority.clone();
        let (mut upstream, early) = self.upstream.into_upgraded();
        let copied = async {
            if !early.is_empty() {
                client.write_all(&early).await?;
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
    fn between_requests_only_when_nothing_is_owed_either_way() {
        let ledger = Ledger::default();
        let fresh = ledger.answered();
        assert!(!ledger.between_requests(fresh), "nothing served yet");

        // A bodyless request: owed a response until it is returned.
        assert_eq!(ledger.record(true, true), 0);
        assert!(!ledger.between_requests(fresh));
        ledger.answer();
        assert!(ledger.between_requests(fresh));
        // Only exchanges since the given count matter (a fresh hyper connection).
        assert!(!ledger.between_requests(ledger.answered()));

        // A body answered before it was read whole: the rest of it is still on the stream.
        let ordinal = ledger.record(true, false);
        ledger.answer();
        assert!(!ledger.between_requests(fresh));
        ledger.body_read(ordinal);
        assert!(ledger.between_requests(fresh));

        // An earlier body's mark does not count for a later one.
        ledger.record(true, false);
        ledger.answer();
        ledger.body_read(ordinal);
        assert!(!ledger.between_requests(fresh));
    }

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

    #[test]
    fn a_client_that_asked_to_close_is_never_between_requests() {
        let ledger = Ledger::default();
        ledger.record(false, true);
        ledger.answer();
        assert!(!ledger.between_requests(0));
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
