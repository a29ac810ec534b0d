//! Request and response heads: parsed with `httparse` straight out of the connection's read
//! buffer, checked where `httparse` is lenient, and turned into `http` types whose values
//! share the buffer's memory (no copy of a field value).

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, StatusCode, Uri, Version};

use super::framing::{BodyFraming, FieldScan, FramingError};

/// Fields a head may carry; more is answered 431, as a head over the size limit is.
pub const MAX_FIELDS: usize = 128;

/// A request head, with what its fields say about the body and the connection.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: BodyFraming,
    /// The client lets the connection carry another request after this one.
    pub keep_alive: bool,
    /// `Connection: upgrade` with an `Upgrade` field.
    pub upgrade: bool,
    /// `Expect: 100-continue`.
    pub expects_continue: bool,
}

/// A response head from a node.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: BodyFraming,
    /// The node lets the connection carry another request after this response.
    pub keep_alive: bool,
}

/// Why a head was refused. Each maps to one status ([`HeadError::status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("head larger than the limit")]
    TooLarge,
    #[error("more than {MAX_FIELDS} header fields")]
    TooManyFields,
    #[error("malformed head: {0}")]
    Malformed(&'static str),
    #[error("{0}")]
    Framing(#[from] FramingError),
}

impl HeadError {
    /// The status a client gets for a request head refused this way.
    pub fn status(&self) -> StatusCode {
        match self {
            HeadError::TooLarge | HeadError::TooManyFields => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            HeadError::Framing(FramingError::UnsupportedCoding) => StatusCode::NOT_IMPLEMENTED,
            HeadError::Malformed(_) | HeadError::Framing(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// Reads heads out of a connection's read buffer as its bytes arrive. `httparse` parses a
/// head whole, so it is called only once the bytes that end a head may be there: a client
/// sending its head a byte at a time costs a scan of each new byte, not a parse of the whole
/// head per read.
#[derive(Debug)]
pub struct HeadReader {
    max_head: usize,
    /// Bytes of the buffer already searched for the end of the head.
    searched: usize,
}

impl HeadReader {
    pub fn new(max_head: usize) -> Self {
        HeadReader {
            max_head,
            searched: 0,
        }
    }

    /// The request head at the start of `buf`, taken out of it; `None` while incomplete.
    pub fn request(&mut self, buf: &mut BytesMut) -> Result<Option<RequestHead>, HeadError> {
        let Some(head) = self.take_head(buf)? else {
            return Ok(None);
        };
        // Uninitialised slots: the parser writes only those it fills (no array of empty slots to clear first).
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
        let mut parsed = httparse::Request::new(&mut []);
        whole_parse(parsed.parse_with_uninit_headers(&head, &mut fields), &head)?;
        let http10 = parsed.version == Some(0);
        let method = parsed
            .method
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
            .ok_or(HeadError::Malformed("invalid method"))?;
        let uri = parsed
            .path
            .and_then(|p| Uri::from_maybe_shared(head.slice_ref(p.as_bytes())).ok())
            .ok_or(HeadError::Malformed("invalid request target"))?;
        let (headers, scan) = field_map(&head, parsed.headers, FORWARDING_FIELDS)?;
        let framing = scan.request_framing(http10)?;
        Ok(Some(RequestHead {
            method,
            uri,
            version: version(http10),
            headers,
            framing,
            keep_alive: keeps_alive(http10, &scan),
            upgrade: scan.upgrade && scan.connection_upgrade,
            expects_continue: scan.expects_continue && !http10,
        }))
    }

    /// The response head at the start of `buf`, taken out of it; `None` while incomplete.
    /// `method` is the request's: a response to HEAD has no body whatever it says.
    pub fn response(
        &mut self,
        buf: &mut BytesMut,
        method: &Method,
    ) -> Result<Option<ResponseHead>, HeadError> {
        let Some(head) = self.take_head(buf)? else {
            return Ok(None);
        };
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
        let mut parsed = httparse::Response::new(&mut []);
        let verdict = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            &head,
            &mut fields,
        );
        whole_parse(verdict, &head)?;
        let http10 = parsed.version == Some(0);
        let status = parsed
            .code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or(HeadError::Malformed("invalid status"))?;
        let (headers, scan) = field_map(&head, parsed.headers, 1)?;
        let framing = scan.response_framing(method, status)?;
        Ok(Some(ResponseHead {
            status,
            version: version(http10),
            headers,
            framing,
            keep_alive: keeps_alive(http10, &scan) && framing != BodyFraming::UntilClose,
        }))
    }

    /// The head at the start of `buf`, taken out of it once its empty line is there
    /// (searching only bytes not searched before); an error once it is over the limit.
    fn take_head(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, HeadError> {
        // Empty lines before a request line are ignored (RFC 9112 §2.2).
        while buf.starts_with(b"\r\n") {
            buf.advance(2);
            self.searched = self.searched.saturating_sub(2);
        }
        // Every line ends in CR LF; the head ends with the first empty line. `httparse` takes
        // a lone LF as a line end, which RFC 9112 §2.2 lets a recipient do, but a node behind
        // the proxy might not, and a line end read two ways is how requests are smuggled: it
        // is refused here, in the one pass that finds the head's end. (A lone CR is refused by
        // `httparse` itself.)
        let window = &buf[..buf.len().min(self.max_head)];
        let from = self.searched.saturating_sub(2).min(window.len());
        let mut end = None;
        for at in memchr::memchr_iter(b'\n', &window[from..]).map(|lf| from + lf) {
            if at == 0 || window[at - 1] != b'\r' {
                return Err(HeadError::Malformed("line end without CR"));
            }
            if at >= 2 && window[at - 2] == b'\n' {
                end = Some(at);
                break;
            }
        }
        let Some(end) = end else {
            self.searched = buf.len();
            if buf.len() >= self.max_head {
                return Err(HeadError::TooLarge);
            }
            return Ok(None);
        };
        self.searched = 0;
        Ok(Some(buf.split_to(end + 1).freeze()))
    }
}

/// `httparse`'s verdict on a head that ends with its empty line: it must take all of it.
fn whole_parse(parsed: httparse::Result<usize>, head: &[u8]) -> Result<(), HeadError> {
    match parsed {
        Ok(httparse::Status::Complete(len)) if len == head.len() => Ok(()),
        Ok(_) => Err(HeadError::Malformed("no request line")),
        Err(e) => Err(refusal(e)),
    }
}

fn refusal(error: httparse::Error) -> HeadError {
    use httparse::Error as E;
    match error {
        E::TooManyHeaders => HeadError::TooManyFields,
        E::HeaderName => HeadError::Malformed("invalid header name"),
        E::HeaderValue => HeadError::Malformed("invalid header value"),
        E::NewLine => HeadError::Malformed("invalid line end"),
        E::Status => HeadError::Malformed("invalid status line"),
        E::Token => HeadError::Malformed("invalid token"),
        E::Version => HeadError::Malformed("invalid HTTP version"),
    }
}

/// Room a request's map keeps for the fields the proxy adds (the forwarding fields, `Host`),
/// so adding them does not grow it.
const FORWARDING_FIELDS: usize = 5;

/// The head's fields as a map whose values point into `head`, with room for `more`, and what
/// they say about framing and the connection.
fn field_map(
    head: &Bytes,
    fields: &[httparse::Header<'_>],
    more: usize,
) -> Result<(HeaderMap, FieldScan), HeadError> {
    let mut map = HeaderMap::with_capacity(fields.len() + more);
    let mut scan = FieldScan::default();
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| HeadError::Malformed("invalid header name"))?;
        // httparse has checked every byte of the value (no CTL but HTAB, no CR or LF).
        let value = HeaderValue::from_maybe_shared(head.slice_ref(field.value))
            .map_err(|_| HeadError::Malformed("invalid header value"))?;
        scan.field(field.name.as_bytes(), field.value);
        map.append(name, value);
    }
    Ok((map, scan))
}

fn version(http10: bool) -> Version {
    if http10 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    }
}

/// HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 only when asked to keep it.
fn keeps_alive(http10: bool, scan: &FieldScan) -> bool {
    !scan.close && (!http10 || scan.keep_alive)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(bytes: &[u8]) -> Result<Option<RequestHead>, HeadError> {
        HeadReader::new(64 * 1024).request(&mut BytesMut::from(bytes))
    }

    fn refused(bytes: &[u8]) -> HeadError {
        match request(bytes) {
            Err(e) => e,
            Ok(head) => panic!("accepted {:?}: {head:?}", String::from_utf8_lossy(bytes)),
        }
    }

    #[test]
    fn a_request_head_is_taken_out_of_the_buffer() {
        let mut buf =
            BytesMut::from(&b"GET /a?b HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-A: 2\r\n\r\nrest"[..]);
        let head = HeadReader::new(1024).request(&mut buf).unwrap().unwrap();
        assert_eq!(head.method, Method::GET);
        assert_eq!(head.uri, "/a?b");
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.headers["host"], "x");
        assert_eq!(head.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(head.framing, BodyFraming::Empty);
        assert!(head.keep_alive && !head.upgrade && !head.expects_continue);
        assert_eq!(&buf[..], b"rest");
    }

    #[test]
    fn an_incomplete_head_waits_for_more() {
        assert!(request(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        assert!(request(b"GET / HTTP/1.1\r\nHost: x\r\n\r")
            .unwrap()
            .is_none());
        assert!(
            request(b"\r\n\r\n").unwrap().is_none(),
            "leading empty lines"
        );
    }

    #[test]
    fn http10_keeps_alive_only_when_asked() {
        let head = request(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert_eq!(head.version, Version::HTTP_10);
        assert!(!head.keep_alive);
        let head = request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(head.keep_alive);
        let head = request(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!head.keep_alive);
    }

    #[test]
    fn malformed_heads_are_refused_with_400() {
        for bad in [
            &b"GET / HTTP/1.1\nHost: x\n\n"[..],
            b"GET / HTTP/1.1\r\nHost: x\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\rY: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHo(st: x\r\n\r\n",
            b"G@T / HTTP/1.1\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.2\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        ] {
            assert_eq!(
                refused(bad).status(),
                StatusCode::BAD_REQUEST,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn oversize_heads_and_too_many_fields_get_431() {
        let mut reader = HeadReader::new(64);
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nX-Long: "[..]);
        assert!(reader.request(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&[b'a'; 64]);
        assert_eq!(reader.request(&mut buf).unwrap_err(), HeadError::TooLarge);

        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_FIELDS {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(refused(&many).status(), 431);
        // A complete head past the limit is refused too, even when it arrives in one read.
        let mut whole = BytesMut::from(&many[..]);
        assert_eq!(
            HeadReader::new(100).request(&mut whole).unwrap_err(),
            HeadError::TooLarge
        );
    }

    #[test]
    fn a_head_sent_a_byte_at_a_time_is_found() {
        let bytes = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc";
        let mut reader = HeadReader::new(1024);
        let mut buf = BytesMut::new();
        let mut found = None;
        for &b in bytes.iter() {
            buf.extend_from_slice(&[b]);
            if let Some(head) = reader.request(&mut buf).unwrap() {
                found = Some(head);
                break;
            }
        }
        let head = found.unwrap();
        assert_eq!(head.framing, BodyFraming::Length(3));
    }

    #[test]
    fn upgrade_and_expect_are_reported() {
        let head = request(
            b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nExpect: 100-continue\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(head.upgrade && head.expects_continue);
        let head = request(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!head.upgrade, "Upgrade without Connection: upgrade");
    }

    #[test]
    fn a_response_head_is_framed_by_its_request() {
        let mut reader = HeadReader::new(1024);
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"[..]);
        let head = reader.response(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.framing, BodyFraming::Length(5));
        assert!(head.keep_alive);
        assert_eq!(&buf[..], b"hello");

        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"[..]);
        let head = reader.response(&mut buf, &Method::HEAD).unwrap().unwrap();
        assert_eq!(head.framing, BodyFraming::Empty);

        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\n\r\n"[..]);
        let head = reader.response(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(head.framing, BodyFraming::UntilClose);
        assert!(!head.keep_alive, "a body delimited by the close");

        let mut buf = BytesMut::from(&b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"[..]);
        let head = reader.response(&mut buf, &Method::GET).unwrap().unwrap();
        assert!(!head.keep_alive);
    }
}
