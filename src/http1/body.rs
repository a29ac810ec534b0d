//! Reading a body out of a connection's read buffer, by its framing: a length, the chunked
//! coding (extensions skipped, trailers kept), or the rest of the connection.
//!
//! Data is handed on as slices of the read buffer (no copy); the decoder never holds more
//! than the few bytes of a chunk's size line and a bounded trailer section.

use bytes::{Buf, Bytes, BytesMut};
use hyper::HeaderMap;

use super::framing::BodyFraming;

/// A trailer section larger than this is refused (the body is then malformed).
const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// A chunk's size line (with its extensions) longer than this is refused.
const MAX_SIZE_LINE_BYTES: usize = 4 * 1024;

/// What the decoder took out of the buffer.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body is complete; the bytes after it belong to the next message.
    End,
}

/// Why a body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
    #[error("body ended early")]
    Truncated,
}

/// Takes one message's body out of a read buffer.
#[derive(Debug)]
pub struct BodyDecoder {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Done,
}

impl BodyDecoder {
    pub fn new(framing: BodyFraming) -> Self {
        let kind = match framing {
            BodyFraming::Empty | BodyFraming::Length(0) => Kind::Done,
            BodyFraming::Length(length) => Kind::Length(length),
            BodyFraming::Chunked => Kind::Chunked(Chunked::default()),
            BodyFraming::UntilClose => Kind::UntilClose,
        };
        BodyDecoder { kind }
    }

    /// True once the whole body has been taken.
    pub fn is_done(&self) -> bool {
        matches!(self.kind, Kind::Done)
    }

    /// Bytes still owed by a sized body (for a size hint).
    pub fn remaining(&self) -> Option<u64> {
        match self.kind {
            Kind::Length(left) => Some(left),
            Kind::Done => Some(0),
            _ => None,
        }
    }

    /// The next piece of the body in `buf`, taken out of it; `None` when more bytes must be
    /// read first.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, BodyError> {
        match &mut self.kind {
            Kind::Done => Ok(Some(Decoded::End)),
            Kind::Length(left) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let take = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= take as u64;
                if *left == 0 {
                    self.kind = Kind::Done;
                }
                Ok(Some(Decoded::Data(buf.split_to(take).freeze())))
            }
            Kind::UntilClose => {
                if buf.is_empty() {
                    return Ok(None);
                }
                Ok(Some(Decoded::Data(buf.split().freeze())))
            }
            Kind::Chunked(chunked) => {
                let decoded = chunked.decode(buf)?;
                // Trailers are the last of a body: nothing is read after them.
                if let Some(Decoded::End | Decoded::Trailers(_)) = decoded {
                    self.kind = Kind::Done;
                }
                Ok(decoded)
            }
        }
    }

    /// The connection ended (no more bytes will come): the end of a body that runs until
    /// the close; for any other unfinished body, an error.
    pub fn at_eof(&mut self) -> Result<Decoded, BodyError> {
        match self.kind {
            Kind::UntilClose | Kind::Done => {
                self.kind = Kind::Done;
                Ok(Decoded::End)
            }
            _ => Err(BodyError::Truncated),
        }
    }
}

/// Where the chunked decoder is in the coding (RFC 9112 §7.1).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// Whitespace after the size, before an extension or the line end.
    AfterSize,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line, or of the empty line that ends the body.
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Ended,
}

#[derive(Debug, Default)]
struct Chunked {
    state: ChunkState,
    /// The size of the chunk being read, then what is left of it.
    size: u64,
    digits: u8,
    line_bytes: usize,
    /// The trailer section as sent, once there is one.
    trailers: Vec<u8>,
}

impl Chunked {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, BodyError> {
        use ChunkState as S;
        loop {
            if self.state == S::Ended {
                return Ok(Some(Decoded::End));
            }
            if self.state == S::Data {
                if buf.is_empty() {
                    return Ok(None);
                }
                let take = usize::try_from(self.size)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                self.size -= take as u64;
                if self.size == 0 {
                    self.state = S::DataCr;
                }
                return Ok(Some(Decoded::Data(buf.split_to(take).freeze())));
            }
            let Some(&byte) = buf.first() else {
                return Ok(None);
            };
            buf.advance(1);
            if let Some(decoded) = self.control_byte(byte)? {
                return Ok(Some(decoded));
            }
        }
    }

    /// One byte of the coding outside chunk data.
    fn control_byte(&mut self, byte: u8) -> Result<Option<Decoded>, BodyError> {
        use ChunkState as S;
        let bad = |why| Err(BodyError::Chunked(why));
        match self.state {
            S::Size | S::AfterSize | S::Extension => {
                self.line_bytes += 1;
                if self.line_bytes > MAX_SIZE_LINE_BYTES {
                    return bad("chunk size line too long");
                }
            }
            _ => {}
        }
        match (self.state, byte) {
            (S::Size, _) if byte.is_ascii_hexdigit() => {
                if self.digits == 16 {
                    return bad("chunk size too large");
                }
                self.digits += 1;
                self.size = self.size << 4 | u64::from(hex_value(byte));
            }
            (S::Size | S::AfterSize, _) if self.digits == 0 => return bad("missing chunk size"),
            (S::Size | S::AfterSize, b' ' | b'\t') => self.state = S::AfterSize,
            (S::Size | S::AfterSize, b';') => self.state = S::Extension,
            (S::Size | S::AfterSize | S::Extension, b'\r') => self.state = S::SizeLf,
            (S::Size | S::AfterSize, _) => return bad("invalid chunk size"),
            (S::Extension, b'\t') => {}
            (S::Extension, _) if byte < 0x20 || byte == 0x7f => {
                return bad("control byte in chunk extension")
            }
            (S::Extension, _) => {}
            (S::SizeLf, b'\n') => {
                self.line_bytes = 0;
                self.digits = 0;
                self.state = if self.size == 0 {
                    S::TrailerStart
                } else {
                    S::Data
                };
            }
            (S::DataCr, b'\r') => self.state = S::DataLf,
            (S::DataLf, b'\n') => self.state = S::Size,
            (S::DataCr | S::DataLf, _) => return bad("chunk data not followed by CRLF"),
            (S::TrailerStart, b'\r') => self.state = S::EndLf,
            (S::TrailerStart | S::TrailerLine, b'\n') => return bad("line end without CR"),
            (S::TrailerStart | S::TrailerLine, _) => {
                self.trailer_byte(byte)?;
                self.state = if byte == b'\r' {
                    S::TrailerLf
                } else {
                    S::TrailerLine
                };
            }
            (S::TrailerLf, b'\n') => {
                self.trailer_byte(byte)?;
                self.state = S::TrailerStart;
            }
            (S::EndLf, b'\n') => {
                self.state = S::Ended;
                if !self.trailers.is_empty() {
                    return self.parse_trailers().map(Some);
                }
                return Ok(Some(Decoded::End));
            }
            (S::SizeLf | S::TrailerLf | S::EndLf, _) => return bad("CR not followed by LF"),
            // Never reached: data is taken in bulk, and nothing is read past the end.
            (S::Data | S::Ended, _) => return bad("read past a state that takes no bytes"),
        }
        Ok(None)
    }

    fn trailer_byte(&mut self, byte: u8) -> Result<(), BodyError> {
        if self.trailers.len() >= MAX_TRAILER_BYTES {
            return Err(BodyError::Chunked("trailer section too large"));
        }
        self.trailers.push(byte);
        Ok(())
    }

    fn parse_trailers(&mut self) -> Result<Decoded, BodyError> {
        let mut section = std::mem::take(&mut self.trailers);
        section.extend_from_slice(b"\r\n");
        let section = Bytes::from(section);
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let parsed = match httparse::parse_headers(&section, &mut fields) {
            Ok(httparse::Status::Complete((_, parsed))) => parsed,
            _ => return Err(BodyError::Chunked("malformed trailer section")),
        };
        let mut map = HeaderMap::with_capacity(parsed.len());
        for field in parsed {
            let name = hyper::header::HeaderName::from_bytes(field.name.as_bytes());
            let value =
                hyper::header::HeaderValue::from_maybe_shared(section.slice_ref(field.value));
            match (name, value) {
                (Ok(name), Ok(value)) => {
                    map.append(name, value);
                }
                _ => return Err(BodyError::Chunked("malformed trailer field")),
            }
        }
        Ok(Decoded::Trailers(map))
    }
}

fn hex_value(byte: u8) -> u8 {
    match byte {
        b'0'..=b'9' => byte - b'0',
        b'a'..=b'f' => byte - b'a' + 10,
        _ => byte - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The data joined, the trailers, and the bytes left after the body.
    type Read = (Vec<u8>, Option<HeaderMap>, Vec<u8>);

    /// Decodes `bytes` fed in one piece.
    fn decode_all(framing: BodyFraming, bytes: &[u8]) -> Result<Read, BodyError> {
        let mut decoder = BodyDecoder::new(framing);
        let mut buf = BytesMut::from(bytes);
        let mut data = Vec::new();
        let mut trailers = None;
        loop {
            match decoder.decode(&mut buf)? {
                Some(Decoded::Data(d)) => data.extend_from_slice(&d),
                Some(Decoded::Trailers(t)) => trailers = Some(t),
                Some(Decoded::End) => return Ok((data, trailers, buf.to_vec())),
                None => return Err(BodyError::Truncated),
            }
        }
    }

    #[test]
    fn a_sized_body_stops_at_its_length() {
        let (data, _, rest) = decode_all(BodyFraming::Length(5), b"helloGET").unwrap();
        assert_eq!((&data[..], &rest[..]), (&b"hello"[..], &b"GET"[..]));
        assert_eq!(
            decode_all(BodyFraming::Length(5), b"hel"),
            Err(BodyError::Truncated)
        );
    }

    #[test]
    fn chunks_with_extensions_and_trailers() {
        let (data, trailers, rest) = decode_all(
            BodyFraming::Chunked,
            b"5;name=value\r\nhello\r\nA \t; x\r\n0123456789\r\n0\r\nChecksum: abc\r\nX-B: 1\r\n\r\nnext",
        )
        .unwrap();
        assert_eq!(data, b"hello0123456789");
        let trailers = trailers.unwrap();
        assert_eq!(trailers["checksum"], "abc");
        assert_eq!(trailers["x-b"], "1");
        assert_eq!(rest, b"next");
        let (data, trailers, _) = decode_all(BodyFraming::Chunked, b"0\r\n\r\n").unwrap();
        assert!(data.is_empty() && trailers.is_none());
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for bad in [
            &b"\r\nhello\r\n0\r\n\r\n"[..],
            b"x\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"5;a\x00b\r\nhello\r\n",
            b"0\r\nX: 1\n\r\n",
            b"0\r\n\n",
            b"0\r\nbad field\r\n\r\n",
            b" 5\r\nhello\r\n",
        ] {
            assert!(
                matches!(
                    decode_all(BodyFraming::Chunked, bad),
                    Err(BodyError::Chunked(_))
                ),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long_line = [b"5;".as_slice(), &[b'a'; MAX_SIZE_LINE_BYTES], b"\r\n"].concat();
        assert!(decode_all(BodyFraming::Chunked, &long_line).is_err());
    }

    #[test]
    fn a_body_until_close_ends_at_eof_and_others_are_truncated() {
        let mut decoder = BodyDecoder::new(BodyFraming::UntilClose);
        let mut buf = BytesMut::from(&b"abc"[..]);
        assert_eq!(
            decoder.decode(&mut buf).unwrap(),
            Some(Decoded::Data(Bytes::from_static(b"abc")))
        );
        assert_eq!(decoder.decode(&mut buf).unwrap(), None);
        assert_eq!(decoder.at_eof(), Ok(Decoded::End));
        let mut sized = BodyDecoder::new(BodyFraming::Length(2));
        assert_eq!(sized.at_eof(), Err(BodyError::Truncated));
        let mut chunked = BodyDecoder::new(BodyFraming::Chunked);
        assert_eq!(chunked.at_eof(), Err(BodyError::Truncated));
    }

    #[test]
    fn a_body_is_done_once_its_trailers_are_taken() {
        let mut decoder = BodyDecoder::new(BodyFraming::Chunked);
        let mut buf = BytesMut::from(&b"0\r\nX-Sum: 1\r\n\r\nGET"[..]);
        assert!(matches!(
            decoder.decode(&mut buf),
            Ok(Some(Decoded::Trailers(_)))
        ));
        assert!(decoder.is_done());
        assert_eq!(&buf[..], b"GET");
    }

    #[test]
    fn the_largest_16_digit_size_is_taken() {
        let mut decoder = BodyDecoder::new(BodyFraming::Chunked);
        let mut buf = BytesMut::from(&b"ffffffffffffffff\r\nab"[..]);
        assert_eq!(
            decoder.decode(&mut buf).unwrap(),
            Some(Decoded::Data(Bytes::from_static(b"ab")))
        );
    }
}
