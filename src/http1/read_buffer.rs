//! A connection's read buffer: filled from the socket as the parser needs bytes, handed on
//! in slices (heads and body data point into it), and given back when the connection is
//! idle. Reads that fill it grow the next one, so a large body moves in few system calls
//! while a small exchange reserves little.

use std::io;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::AsyncRead;

/// The first read of an exchange reserves this much.
const FIRST_READ: usize = 8 * 1024;
/// Reads grow up to this.
const LARGEST_READ: usize = 256 * 1024;

#[derive(Debug)]
pub struct ReadBuffer {
    pub bytes: BytesMut,
    next_read: usize,
}

impl Default for ReadBuffer {
    fn default() -> Self {
        ReadBuffer {
            bytes: BytesMut::new(),
            next_read: FIRST_READ,
        }
    }
}

impl ReadBuffer {
    /// A buffer holding bytes already read.
    pub fn with(bytes: BytesMut) -> Self {
        ReadBuffer {
            bytes,
            next_read: FIRST_READ,
        }
    }

    /// Reads what `reader` has into the buffer; `Ok(0)` at the end of its stream.
    pub fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if self.bytes.capacity() - self.bytes.len() < self.next_read / 2 {
            self.bytes.reserve(self.next_read);
        }
        let room = self.bytes.capacity() - self.bytes.len();
        let read = std::task::ready!(tokio_util::io::poll_read_buf(
            std::pin::Pin::new(reader),
            cx,
            &mut self.bytes
        ))?;
        if read == room && self.next_read < LARGEST_READ {
            self.next_read *= 2;
        }
        Poll::Ready(Ok(read))
    }

    /// Gives the memory back once everything read has been taken (an idle connection holds
    /// no buffer).
    pub fn release_if_empty(&mut self) {
        if self.bytes.is_empty() {
            *self = ReadBuffer::default();
        }
    }
}
