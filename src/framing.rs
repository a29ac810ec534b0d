//! Watching the raw HTTP/1.1 byte stream of a client connection for request heads that carry
//! both `Content-Length` and `Transfer-Encoding`.
//!
//! hyper resolves such a request the way RFC 9112 §6.1 allows (the chunked coding wins, the
//! length is dropped, the connection closes after it), so it is never unsafe; but it drops
//! the evidence, and an edge should refuse the request outright (400), as nginx does, so a
//! smuggling attempt never reaches a node at all. hyper offers no hook on the raw head, and
//! no crate does this job, so this module follows the request framing itself: it reads each
//! head's framing fields, skips sized and chunked bodies, and records the ordinal of the
//! first ambiguous head. It never changes a byte; when it cannot follow the stream (HTTP/2,
//! an upgrade, input hyper will reject anyway) it stops watching.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the watcher found, shared with the request handler of the same connection.
#[derive(Debug)]
pub struct FramingReport {
    /// Ordinal (0-based) of the first head with both length fields; `u64::MAX` when none.
    first_ambiguous: AtomicU64,
}

impl FramingReport {
    fn new() -> Self {
        FramingReport {
            first_ambiguous: AtomicU64::new(u64::MAX),
        }
    }

    /// True when request number `ordinal` on this connection carried both length fields.
    pub fn is_ambiguous(&self, ordinal: u64) -> bool {
        self.first_ambiguous.load(Ordering::Acquire) == ordinal
    }
}

/// A client stream whose reads are followed by a [`Scanner`]; bytes already taken from the
/// stream (to tell the protocol, or left over by a finished HTTP/1.1 connection) are served
/// first.
pub struct WatchedStream<T> {
    inner: T,
    scanner: Scanner,
    first: Bytes,
    /// Bytes of `first` from this index on have not been through the scanner yet.
    unscanned_from: usize,
}

impl<T> WatchedStream<T> {
    pub fn new(inner: T, first: Vec<u8>) -> (Self, Arc<FramingReport>) {
        let report = Arc::new(FramingReport::new());
        let stream = WatchedStream {
            inner,
            scanner: Scanner::new(report.clone()),
            first: Bytes::from(first),
            unscanned_from: 0,
        };
        (stream, report)
    }

    /// Puts back bytes read from this stream but not consumed (a finished connection's read
    /// buffer): they are served again, ahead of anything not yet served, and not scanned
    /// twice.
    pub fn unread(&mut self, leftover: Bytes) {
        if leftover.is_empty() {
            return;
        }
        if self.first.is_empty() {
            self.first = leftover;
            self.unscanned_from = usize::MAX;
            return;
        }
        let mut joined = Vec::with_capacity(leftover.len() + self.first.len());
        joined.extend_from_slice(&leftover);
        joined.extend_from_slice(&self.first);
        self.unscanned_from = leftover.len() + self.unscanned_from.min(self.first.len());
        self.first = Bytes::from(joined);
    }

    /// True when bytes put back or read ahead are waiting to be served.
    pub fn has_buffered(&self) -> bool {
        !self.first.is_empty()
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The stream itself, without the watch; bytes put back are dropped.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WatchedStream<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        if !this.first.is_empty() {
            let take = this.first.len().min(buf.remaining());
            let served = this.first.split_to(take);
            buf.put_slice(&served);
            let scan_from = this.unscanned_from.min(take);
            this.scanner.feed(&served[scan_from..]);
            this.unscanned_from = this.unscanned_from.saturating_sub(take);
            if this.first.is_empty() {
                // Served whole: give the memory back for the connection's idle life.
                this.first = Bytes::new();
                this.unscanned_from = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.scanner.feed(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WatchedStream<T> {
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

/// Header lines longer than this are not kept whole; the framing fields are short.
const MAX_KEPT_LINE: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    SizedBody(u64),
    ChunkSize,
    ChunkExtension,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
    /// The stream is no longer HTTP/1.1 requests this scanner can follow.
    Off,
}

#[derive(Debug, Default)]
struct Head {
    started: bool,
    content_length: Option<u64>,
    has_content_length: bool,
    has_transfer_encoding: bool,
    chunked: bool,
    upgrade: bool,
    connection_upgrade: bool,
    connect: bool,
}

/// Follows HTTP/1.1 request framing over the bytes a connection reads.
pub struct Scanner {
    state: State,
    line: Vec<u8>,
    line_truncated: bool,
    head: Head,
    heads_seen: u64,
    chunk_size: u64,
    report: Arc<FramingReport>,
}

impl Scanner {
    fn new(report: Arc<FramingReport>) -> Self {
        Scanner {
            state: State::Head,
            line: Vec::new(),
            line_truncated: false,
            head: Head::default(),
            heads_seen: 0,
            chunk_size: 0,
            report,
        }
    }

    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.state {
                State::Off => return,
                State::SizedBody(left) => {
                    let take = left.min(bytes.len() as u64);
                    bytes = &bytes[take as usize..];
                    self.state = if left == take {
                        State::Head
                    } else {
                        State::SizedBody(left - take)
                    };
                }
                State::ChunkData(left) => {
                    let take = left.min(bytes.len() as u64);
                    bytes = &bytes[take as usize..];
                    self.state = if left == take {
                        State::ChunkDataEnd
                    } else {
                        State::ChunkData(left - take)
                    };
                }
                State::Head | State::Trailers | State::ChunkDataEnd | State::ChunkExtension => {
                    let lf = memchr::memchr(b'\n', bytes);
                    match lf {
                        // No line begun in an earlier read and this one is whole here: it
                        // is looked at where it lies instead of being copied first.
                        Some(lf) if self.line.is_empty() && !self.line_truncated => {
                            let line = &bytes[..lf];
                            let kept = &line[..line.len().min(MAX_KEPT_LINE)];
                            self.end_of_line(kept, kept.len() < line.len());
                            bytes = &bytes[lf + 1..];
                        }
                        _ => {
                            let used = self.take_line(bytes, lf);
                            bytes = &bytes[used..];
                            if lf.is_some() {
                                let line = std::mem::take(&mut self.line);
                                self.end_of_line(&line, self.line_truncated);
                                self.line = line;
                                self.line.clear();
                                self.line_truncated = false;
                            }
                        }
                    }
                }
                State::ChunkSize => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    self.chunk_size_byte(b);
                }
            }
        }
    }

    /// Appends the bytes up to the line's LF (at `lf`, when in `bytes`) to the kept line;
    /// returns how many bytes it used, the LF included.
    fn take_line(&mut self, bytes: &[u8], lf: Option<usize>) -> usize {
        let part = &bytes[..lf.unwrap_or(bytes.len())];
        let room = MAX_KEPT_LINE.saturating_sub(self.line.len());
        if part.len() > room {
            self.line_truncated = true;
        }
        self.line.extend_from_slice(&part[..part.len().min(room)]);
        part.len() + usize::from(lf.is_some())
    }

    /// A line has ended: `line` is its kept part (without the LF), `truncated` whether more
    /// of it was cut off.
    fn end_of_line(&mut self, line: &[u8], truncated: bool) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match self.state {
            State::Head => {
                if line.is_empty() {
                    if self.head.started {
                        self.end_of_head();
                    }
                    // Empty lines before a request line are allowed (RFC 9112 §2.2).
                    return;
                }
                if !self.head.started {
                    self.head.started = true;
                    if line.starts_with(b"PRI * HTTP/2.0") {
                        self.state = State::Off;
                    }
                    self.head.connect = line.starts_with(b"CONNECT ");
                    return;
                }
                self.header_line(line, truncated);
            }
            State::Trailers if line.is_empty() => self.state = State::Head,
            State::ChunkDataEnd => {
                self.state = if line.is_empty() {
                    State::ChunkSize
                } else {
                    State::Off
                };
            }
            State::ChunkExtension => self.after_chunk_size(),
            _ => {}
        }
    }

    fn header_line(&mut self, line: &[u8], truncated: bool) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return;
        };
        let name = &line[..colon];
        let value = trim(&line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            self.head.has_content_length = true;
            self.head.content_length = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
            if truncated {
                self.head.content_length = None;
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.head.has_transfer_encoding = true;
            self.head.chunked = !truncated
                && value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|last| trim(last).eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            self.head.upgrade = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            self.head.connection_upgrade |= value
                .split(|&b| b == b',')
                .any(|t| trim(t).eq_ignore_ascii_case(b"upgrade"));
        }
    }

    fn end_of_head(&mut self) {
        let head = std::mem::take(&mut self.head);
        let ordinal = self.heads_seen;
        self.heads_seen += 1;
        if head.has_content_length && head.has_transfer_encoding {
            let _ = self.report.first_ambiguous.compare_exchange(
                u64::MAX,
                ordinal,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        self.state = if head.connect || (head.upgrade && head.connection_upgrade) {
            // What follows may be another protocol.
            State::Off
        } else if head.has_transfer_encoding {
            if head.chunked {
                self.chunk_size = 0;
                State::ChunkSize
            } else {
                State::Off
            }
        } else if head.has_content_length {
            match head.content_length {
                Some(0) => State::Head,
                Some(n) => State::SizedBody(n),
                None => State::Off,
            }
        } else {
            State::Head
        };
    }

    fn chunk_size_byte(&mut self, b: u8) {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            b';' | b' ' | b'\t' | b'\r' => {
                self.state = State::ChunkExtension;
                return;
            }
            b'\n' => {
                self.after_chunk_size();
                return;
            }
            _ => {
                self.state = State::Off;
                return;
            }
        };
        match self
            .chunk_size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(digit)))
        {
            Some(size) => self.chunk_size = size,
            None => self.state = State::Off,
        }
    }

    fn after_chunk_size(&mut self) {
        let size = std::mem::take(&mut self.chunk_size);
        self.state = if size == 0 {
            State::Trailers
        } else {
            State::ChunkData(size)
        };
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &bytes[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const CLEAN: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    const AMBIGUOUS: &[u8] =
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

    #[tokio::test]
    async fn bytes_put_back_are_served_again_but_not_scanned_again() {
        let (mut stream, report) = WatchedStream::new(&b""[..], CLEAN.to_vec());
        let mut head = vec![0u8; CLEAN.len()];
        stream.read_exact(&mut head).await.unwrap();
        // Stands for bytes the scanner saw when they were first read.
        stream.unread(Bytes::from_static(AMBIGUOUS));
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, AMBIGUOUS);
        assert!(!report.is_ambiguous(1), "put-back bytes were scanned");
    }

    #[tokio::test]
    async fn bytes_put_back_go_before_what_was_never_served() {
        let first = [CLEAN, AMBIGUOUS].concat();
        let (mut stream, report) = WatchedStream::new(&b""[..], first.clone());
        let mut start = [0u8; 10];
        stream.read_exact(&mut start).await.unwrap();
        stream.unread(Bytes::copy_from_slice(&start));
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, first);
        // The part never served was scanned, once: the second head is the ambiguous one.
        assert!(report.is_ambiguous(1));
    }

    fn ambiguous_ordinal(stream: &[u8], split: usize) -> Option<u64> {
        let report = Arc::new(FramingReport::new());
        let mut scanner = Scanner::new(report.clone());
        // Feed in pieces to exercise every state across read boundaries.
        for piece in stream.chunks(split.max(1)) {
            scanner.feed(piece);
        }
        let v = report.first_ambiguous.load(Ordering::Acquire);
        (v != u64::MAX).then_some(v)
    }

    const PLAIN: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    const SIZED: &[u8] =
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 30\r\n\r\nTransfer-Encoding: chunked\r\n\r\n";
    const CHUNKED: &[u8] = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4;ext=1\r\nab\r\n\r\n1A\r\nContent-Length: 5\r\n\r\nxxxxx\r\n0\r\nX-Trailer: 1\r\n\r\n";
    const BOTH: &[u8] =
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

    #[test]
    fn follows_keep_alive_requests_and_finds_the_ambiguous_one() {
        let stream = [PLAIN, SIZED, CHUNKED, BOTH, PLAIN].concat();
        for split in [1, 2, 3, 7, 64, 4096] {
            assert_eq!(ambiguous_ordinal(&stream, split), Some(3), "split {split}");
        }
    }

    #[test]
    fn framing_words_inside_bodies_are_not_heads() {
        let stream = [PLAIN, SIZED, CHUNKED, PLAIN].concat();
        for split in [1, 5, 4096] {
            assert_eq!(ambiguous_ordinal(&stream, split), None);
        }
    }

    #[test]
    fn long_lines_are_followed_whether_whole_in_one_read_or_split() {
        let long = format!("X-Long: {}\r\n", "a".repeat(3 * MAX_KEPT_LINE));
        let both = format!(
            "POST / HTTP/1.1\r\nHost: a\r\n{long}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        );
        let stream = [PLAIN, both.as_bytes()].concat();
        for split in [1, 100, 4096] {
            assert_eq!(ambiguous_ordinal(&stream, split), Some(1), "split {split}");
        }
    }

    #[test]
    fn a_framing_field_too_long_to_keep_stops_the_scanner_whether_whole_or_split() {
        // A Content-Length cut at the kept length cannot be trusted: the scanner stops
        // following the stream rather than guess where the next head starts (hyper refuses
        // such a length anyway).
        let head = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}5\r\n\r\nxxxxx",
            "0".repeat(2 * MAX_KEPT_LINE)
        );
        let stream = [head.as_bytes(), BOTH].concat();
        for split in [1, 100, 4096] {
            assert_eq!(ambiguous_ordinal(&stream, split), None, "split {split}");
        }
    }

    #[test]
    fn stops_at_http2_and_upgrades() {
        let h2 = [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".as_slice(), BOTH].concat();
        assert_eq!(ambiguous_ordinal(&h2, 4096), None);
        let ws = [
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                .as_slice(),
            BOTH,
        ]
        .concat();
        assert_eq!(ambiguous_ordinal(&ws, 4096), None);
    }
}
