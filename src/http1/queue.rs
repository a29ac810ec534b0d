//! The bytes of a message waiting to be written: a few segments (a head, a chunk's size line,
//! its data, its end) handed to the writer together in one vectored write, so a head and a
//! small body go out in one system call. The one part of the codec that touches a writer.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use hyper::body::Frame;
use tokio::io::AsyncWrite;

use super::encode::{chunk_size_line, last_chunk_with_trailers, LAST_CHUNK};

/// Segments a queue holds at most: one frame's framing and data, after a head.
const SEGMENTS: usize = 5;

/// Segments waiting to be written, in order.
#[derive(Debug, Default)]
pub struct WriteQueue {
    parts: [Bytes; SEGMENTS],
    len: usize,
}

impl WriteQueue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Room for one more frame (its size line, data and end).
    pub fn has_room_for_a_frame(&self) -> bool {
        self.len + 3 <= SEGMENTS
    }

    /// Appends a segment; callers check [`WriteQueue::has_room_for_a_frame`] first, and an
    /// empty segment takes no room.
    pub fn push(&mut self, part: Bytes) {
        if part.is_empty() {
            return;
        }
        if let Some(slot) = self.parts.get_mut(self.len) {
            *slot = part;
            self.len += 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues one frame of a body (`None`: its end) with the framing of this hop: a chunk's
    /// size line and end around its data when `chunked`, trailers only in the chunked
    /// coding. True once the body has ended.
    pub fn push_frame(&mut self, frame: Option<Frame<Bytes>>, chunked: bool) -> bool {
        let Some(frame) = frame else {
            if chunked {
                self.push(Bytes::from_static(LAST_CHUNK));
            }
            return true;
        };
        match frame.into_data() {
            Ok(data) if chunked && !data.is_empty() => {
                let (line, len) = chunk_size_line(data.len());
                self.push(Bytes::copy_from_slice(&line[..len]));
                self.push(data);
                self.push(Bytes::from_static(b"\r\n"));
                false
            }
            Ok(data) => {
                self.push(data);
                false
            }
            Err(frame) => {
                // Trailers end the body; only the chunked coding can carry them.
                if let (true, Some(trailers)) = (chunked, frame.trailers_ref()) {
                    let mut end = Vec::new();
                    last_chunk_with_trailers(&mut end, trailers);
                    self.push(Bytes::from(end));
                } else if chunked {
                    self.push(Bytes::from_static(LAST_CHUNK));
                }
                true
            }
        }
    }

    fn advance(&mut self, mut written: usize) {
        while written > 0 && self.len > 0 {
            let first = &mut self.parts[0];
            if written < first.len() {
                first.advance(written);
                return;
            }
            written -= first.len();
            self.parts.rotate_left(1);
            self.len -= 1;
            self.parts[self.len] = Bytes::new();
        }
    }

    /// Writes everything queued; ready once the queue is empty.
    pub fn poll_write<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        writer: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while !self.is_empty() {
            let slices: [IoSlice<'_>; SEGMENTS] =
                std::array::from_fn(|i| IoSlice::new(&self.parts[i]));
            let written =
                ready!(Pin::new(&mut *writer).poll_write_vectored(cx, &slices[..self.len]))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(written);
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn segments_are_written_in_order_across_short_writes() {
        let mut queue = WriteQueue::new();
        queue.push(Bytes::from_static(b"head\r\n\r\n"));
        queue.push(Bytes::new());
        queue.push(Bytes::from_static(b"5\r\n"));
        queue.push(Bytes::from_static(b"hello"));
        queue.push(Bytes::from_static(b"\r\n"));
        assert!(!queue.has_room_for_a_frame());
        // A writer that takes 3 bytes at a time.
        let (mut writer, mut reader) = tokio::io::duplex(3);
        let read = tokio::spawn(async move {
            let mut all = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut all)
                .await
                .unwrap();
            all
        });
        std::future::poll_fn(|cx| queue.poll_write(&mut writer, cx))
            .await
            .unwrap();
        drop(writer);
        assert_eq!(read.await.unwrap(), b"head\r\n\r\n5\r\nhello\r\n");
        assert!(queue.is_empty() && queue.has_room_for_a_frame());
    }
}
