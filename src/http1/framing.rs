//! Body framing: how long a message's body is, decided from its head's fields in the pass
//! that parses them (RFC 9112 §6), and refused where two readings are possible.
//!
//! The rules are those of an edge that must never let a node read a message differently from
//! the way the proxy did: a request with both `Content-Length` and `Transfer-Encoding`, a
//! repeated or malformed length, or a transfer coding other than `chunked` is refused, not
//! resolved, and so is a node's response that could be framed two ways.

use hyper::{Method, StatusCode};

/// How a message's body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body at all (no length field on a request; HEAD, 1xx, 204 and 304 responses).
    Empty,
    /// Exactly this many bytes follow the head.
    Length(u64),
    /// The chunked transfer coding.
    Chunked,
    /// A response without a length: the body runs until the node closes the connection.
    UntilClose,
}

impl BodyFraming {
    /// True when no body follows the head.
    pub fn is_empty(self) -> bool {
        matches!(self, BodyFraming::Empty | BodyFraming::Length(0))
    }
}

/// Why a head's framing fields were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("both Content-Length and Transfer-Encoding")]
    LengthAndCoding,
    #[error("more than one Content-Length")]
    RepeatedLength,
    #[error("malformed Content-Length")]
    BadLength,
    #[error("Transfer-Encoding does not end in chunked")]
    NotChunked,
    #[error("a transfer coding other than chunked")]
    UnsupportedCoding,
    #[error("Transfer-Encoding in an HTTP/1.0 message")]
    CodingInHttp10,
}

/// What the fields of one head say about framing and the connection, gathered while the
/// head is parsed (each field is looked at once).
#[derive(Debug, Default)]
pub(crate) struct FieldScan {
    lengths: u32,
    length: Option<u64>,
    length_malformed: bool,
    /// Transfer codings seen, over every `Transfer-Encoding` field.
    codings: u32,
    /// Whether the last coding seen was `chunked`, and whether any earlier one was.
    last_chunked: bool,
    earlier_chunked: bool,
    pub(crate) close: bool,
    pub(crate) keep_alive: bool,
    pub(crate) connection_upgrade: bool,
    pub(crate) upgrade: bool,
    pub(crate) expects_continue: bool,
}

impl FieldScan {
    /// Notes what one field says, if it is one of the fields framing or the connection
    /// depends on.
    pub(crate) fn field(&mut self, name: &[u8], value: &[u8]) {
        // Dispatched on length first: most fields are none of these and cost one compare.
        match name.len() {
            14 if name.eq_ignore_ascii_case(b"content-length") => self.content_length(value),
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => self.transfer_encoding(value),
            10 if name.eq_ignore_ascii_case(b"connection") => {
                for token in tokens(value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        self.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        self.keep_alive = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        self.connection_upgrade = true;
                    }
                }
            }
            7 if name.eq_ignore_ascii_case(b"upgrade") => self.upgrade = true,
            6 if name.eq_ignore_ascii_case(b"expect") => {
                self.expects_continue |= value.eq_ignore_ascii_case(b"100-continue")
            }
            _ => {}
        }
    }

    fn content_length(&mut self, value: &[u8]) {
        self.lengths += 1;
        match parse_length(value) {
            Some(length) => self.length = Some(length),
            None => self.length_malformed = true,
        }
    }

    fn transfer_encoding(&mut self, value: &[u8]) {
        // Every element counts, an empty one too: a list a node could read differently
        // (`chunked,` or `, chunked`) is not taken for `chunked`.
        for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            self.earlier_chunked |= self.last_chunked;
            self.last_chunked = token.eq_ignore_ascii_case(b"chunked");
            self.codings += 1;
        }
    }

    /// A request's framing (RFC 9112 §6.3, with the ambiguous cases refused).
    pub(crate) fn request_framing(&self, http10: bool) -> Result<BodyFraming, FramingError> {
        if self.codings > 0 {
            if self.lengths > 0 {
                return Err(FramingError::LengthAndCoding);
            }
            if http10 {
                return Err(FramingError::CodingInHttp10);
            }
            return self.chunked_only();
        }
        Ok(match self.length()? {
            Some(0) | None => BodyFraming::Empty,
            Some(length) => BodyFraming::Length(length),
        })
    }

    /// A response's framing, given the request it answers.
    pub(crate) fn response_framing(
        &self,
        method: &Method,
        status: StatusCode,
    ) -> Result<BodyFraming, FramingError> {
        // Bodyless whatever the fields say (RFC 9112 §6.3 items 1 and 2).
        if status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || method == Method::HEAD
        {
            return Ok(BodyFraming::Empty);
        }
        if self.codings > 0 {
            if self.lengths > 0 {
                return Err(FramingError::LengthAndCoding);
            }
            return self.chunked_only();
        }
        Ok(match self.length()? {
            Some(0) => BodyFraming::Empty,
            Some(length) => BodyFraming::Length(length),
            None => BodyFraming::UntilClose,
        })
    }

    /// `chunked` alone. Transfer-Encoding is a hop's field: the proxy frames each hop itself,
    /// so another coding before `chunked` could not be passed on, and is refused (nginx
    /// answers 501 too).
    fn chunked_only(&self) -> Result<BodyFraming, FramingError> {
        if !self.last_chunked {
            Err(FramingError::NotChunked)
        } else if self.codings > 1 || self.earlier_chunked {
            Err(FramingError::UnsupportedCoding)
        } else {
            Ok(BodyFraming::Chunked)
        }
    }

    fn length(&self) -> Result<Option<u64>, FramingError> {
        if self.length_malformed {
            Err(FramingError::BadLength)
        } else if self.lengths > 1 {
            Err(FramingError::RepeatedLength)
        } else {
            Ok(self.length)
        }
    }
}

/// A `Content-Length` value: decimal digits only (no sign, no list, no spaces), at most 19 of
/// them so it fits a u64.
fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 {
        return None;
    }
    value.iter().try_fold(0u64, |length, &b| {
        b.is_ascii_digit()
            .then(|| length * 10 + u64::from(b - b'0'))
    })
}

/// The comma-separated tokens of a list field, trimmed, empty ones skipped.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(fields: &[(&str, &str)]) -> FieldScan {
        let mut scan = FieldScan::default();
        for (name, value) in fields {
            scan.field(name.as_bytes(), value.as_bytes());
        }
        scan
    }

    fn request(fields: &[(&str, &str)]) -> Result<BodyFraming, FramingError> {
        scan(fields).request_framing(false)
    }

    #[test]
    fn a_request_without_length_fields_has_no_body() {
        assert_eq!(request(&[("Host", "a")]), Ok(BodyFraming::Empty));
        assert_eq!(request(&[("Content-Length", "0")]), Ok(BodyFraming::Empty));
    }

    #[test]
    fn content_length_is_digits_only_and_once() {
        assert_eq!(
            request(&[("content-length", "42")]),
            Ok(BodyFraming::Length(42))
        );
        for bad in [
            "",
            "+1",
            "-1",
            "1 2",
            "0x10",
            "1,1",
            "12a",
            "99999999999999999999",
        ] {
            assert_eq!(
                request(&[("Content-Length", bad)]),
                Err(FramingError::BadLength),
                "{bad:?}"
            );
        }
        assert_eq!(
            request(&[("Content-Length", "5"), ("Content-Length", "5")]),
            Err(FramingError::RepeatedLength)
        );
        assert_eq!(
            request(&[("Content-Length", "18446744073709551615")]),
            Err(FramingError::BadLength),
            "20 digits"
        );
        assert_eq!(
            request(&[("Content-Length", "9999999999999999999")]),
            Ok(BodyFraming::Length(9_999_999_999_999_999_999))
        );
    }

    #[test]
    fn length_and_coding_together_are_refused_in_either_order() {
        let both = [("Content-Length", "5"), ("Transfer-Encoding", "chunked")];
        assert_eq!(request(&both), Err(FramingError::LengthAndCoding));
        let reversed = [both[1], both[0]];
        assert_eq!(request(&reversed), Err(FramingError::LengthAndCoding));
    }

    #[test]
    fn only_chunked_alone_is_a_coding_the_proxy_takes() {
        assert_eq!(
            request(&[("Transfer-Encoding", "Chunked")]),
            Ok(BodyFraming::Chunked)
        );
        assert_eq!(
            request(&[("Transfer-Encoding", "gzip")]),
            Err(FramingError::NotChunked)
        );
        assert_eq!(
            request(&[("Transfer-Encoding", "chunked, gzip")]),
            Err(FramingError::NotChunked)
        );
        assert_eq!(
            request(&[("Transfer-Encoding", "gzip, chunked")]),
            Err(FramingError::UnsupportedCoding)
        );
        assert_eq!(
            request(&[
                ("Transfer-Encoding", "chunked"),
                ("Transfer-Encoding", "chunked")
            ]),
            Err(FramingError::UnsupportedCoding)
        );
        for odd in ["", "chunked,", ", chunked"] {
            assert!(request(&[("Transfer-Encoding", odd)]).is_err(), "{odd:?}");
        }
        assert_eq!(
            scan(&[("Transfer-Encoding", "chunked")]).request_framing(true),
            Err(FramingError::CodingInHttp10)
        );
    }

    #[test]
    fn responses_to_head_and_bodyless_statuses_have_no_body() {
        let fields = scan(&[("Content-Length", "10")]);
        for (method, status) in [
            (Method::HEAD, StatusCode::OK),
            (Method::GET, StatusCode::NO_CONTENT),
            (Method::GET, StatusCode::NOT_MODIFIED),
            (Method::GET, StatusCode::CONTINUE),
            (Method::GET, StatusCode::SWITCHING_PROTOCOLS),
        ] {
            assert_eq!(
                fields.response_framing(&method, status),
                Ok(BodyFraming::Empty)
            );
        }
        assert_eq!(
            fields.response_framing(&Method::GET, StatusCode::OK),
            Ok(BodyFraming::Length(10))
        );
    }

    #[test]
    fn a_response_without_length_runs_until_close() {
        assert_eq!(
            scan(&[]).response_framing(&Method::GET, StatusCode::OK),
            Ok(BodyFraming::UntilClose)
        );
        assert_eq!(
            scan(&[("Transfer-Encoding", "chunked"), ("Content-Length", "3")])
                .response_framing(&Method::GET, StatusCode::OK),
            Err(FramingError::LengthAndCoding)
        );
    }

    #[test]
    fn connection_tokens_and_expect_are_noted() {
        let fields = scan(&[
            ("Connection", "keep-alive, Upgrade"),
            ("Upgrade", "websocket"),
            ("Expect", "100-Continue"),
        ]);
        assert!(fields.keep_alive && fields.connection_upgrade && fields.upgrade);
        assert!(fields.expects_continue && !fields.close);
        assert!(scan(&[("connection", "CLOSE")]).close);
    }
}
