//! Writing heads and chunk framing. The proxy frames each hop itself: the framing fields a
//! head arrived with are never copied, the one its body needs is written from the framing.

use hyper::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use hyper::{HeaderMap, Method, StatusCode};

use super::framing::BodyFraming;

/// The empty chunk that ends a chunked body without trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// A request head for a node: `method target HTTP/1.1`, the fields, the framing field.
pub fn request_head(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    framing: BodyFraming,
) {
    out.reserve(64 + target.len() + headers.len() * 32);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    fields(out, headers);
    framing_field(out, framing, true);
    out.extend_from_slice(b"\r\n");
}

/// A response head for a client. `framing` is the body's; `None` for a response that has
/// no body but describes one (to HEAD, a 304), whose `Content-Length` is kept as it came.
pub fn response_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    framing: Option<BodyFraming>,
) {
    out.reserve(64 + headers.len() * 32);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let Some(framing) = framing else {
        for (name, value) in headers {
            if name != TRANSFER_ENCODING {
                field(out, name.as_str(), value.as_bytes());
            }
        }
        out.extend_from_slice(b"\r\n");
        return;
    };
    fields(out, headers);
    // 1xx and 204 carry no framing field (RFC 9110 §8.6).
    if !(status.is_informational() || status == StatusCode::NO_CONTENT) {
        framing_field(out, framing, false);
    }
    out.extend_from_slice(b"\r\n");
}

fn field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn fields(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        if name != CONTENT_LENGTH && name != TRANSFER_ENCODING {
            field(out, name.as_str(), value.as_bytes());
        }
    }
}

/// `Content-Length` or `Transfer-Encoding: chunked`; a request without a body gets none, a
/// response without a length gets `Content-Length: 0` only when it has no body at all.
fn framing_field(out: &mut Vec<u8>, framing: BodyFraming, request: bool) {
    match framing {
        BodyFraming::Length(length) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        BodyFraming::Empty if !request => out.extend_from_slice(b"content-length: 0\r\n"),
        BodyFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        BodyFraming::Empty | BodyFraming::UntilClose => {}
    }
}

/// The size line that opens a chunk of `len` bytes: at most 16 hex digits and CRLF.
pub fn chunk_size_line(len: usize) -> ([u8; 18], usize) {
    let mut line = [0u8; 18];
    let digits = if len == 0 {
        1
    } else {
        (usize::BITS - len.leading_zeros()).div_ceil(4) as usize
    };
    for (i, slot) in line[..digits].iter_mut().enumerate() {
        let shift = 4 * (digits - 1 - i);
        *slot = b"0123456789abcdef"[(len >> shift) & 0xf];
    }
    line[digits] = b'\r';
    line[digits + 1] = b'\n';
    (line, digits + 2)
}

/// The end of a chunked body with trailer fields.
pub fn last_chunk_with_trailers(out: &mut Vec<u8>, trailers: &HeaderMap) {
    out.extend_from_slice(b"0\r\n");
    fields(out, trailers);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn a_request_head_gets_the_framing_field_of_its_body_only() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("api.example.com"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("999"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        let mut out = Vec::new();
        request_head(
            &mut out,
            &Method::POST,
            "/up?x=1",
            &headers,
            BodyFraming::Length(5),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /up?x=1 HTTP/1.1\r\nhost: api.example.com\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 5\r\n\r\n"
        );
        let mut out = Vec::new();
        request_head(&mut out, &Method::GET, "/", &headers, BodyFraming::Empty);
        assert!(!String::from_utf8(out).unwrap().contains("content-length"));
    }

    #[test]
    fn response_heads() {
        let headers = HeaderMap::new();
        let head = |status, framing| {
            let mut out = Vec::new();
            response_head(&mut out, status, &headers, framing);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            head(StatusCode::NOT_FOUND, Some(BodyFraming::Length(3))),
            "HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\n\r\n"
        );
        assert_eq!(
            head(StatusCode::NO_CONTENT, Some(BodyFraming::Empty)),
            "HTTP/1.1 204 No Content\r\n\r\n"
        );
        assert_eq!(
            head(StatusCode::OK, Some(BodyFraming::Chunked)),
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        // A HEAD's answer keeps the length of the body it describes.
        let mut described = HeaderMap::new();
        described.insert(CONTENT_LENGTH, HeaderValue::from_static("1000"));
        let mut out = Vec::new();
        response_head(&mut out, StatusCode::OK, &described, None);
        assert_eq!(out, b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n");
    }

    #[test]
    fn chunk_size_lines_are_lowercase_hex() {
        for (len, line) in [
            (0, "0\r\n"),
            (1, "1\r\n"),
            (15, "f\r\n"),
            (16, "10\r\n"),
            (0x1234abcd, "1234abcd\r\n"),
        ] {
            let (bytes, n) = chunk_size_line(len);
            assert_eq!(&bytes[..n], line.as_bytes());
        }
        let (bytes, n) = chunk_size_line(usize::MAX);
        assert_eq!(n, 2 + usize::BITS as usize / 4);
        assert!(bytes[..n - 2].iter().all(|&b| b == b'f'));
    }
}
