//! Our HTTP/1.1 codec, shared by client connections and node connections: heads parsed with
//! `httparse` into the connection's read buffer, body framing decided in the same pass
//! (ambiguous framing refused where it is parsed), bodies read out of the buffer without a
//! copy, and heads and chunk framing written for each hop.
//!
//! Sans-IO but for [`ReadBuffer`] and [`WriteQueue`]: the functions here take and fill buffers; the connection
//! loops own the sockets.
//! hyper keeps serving HTTP/2. Written here rather than taken from hyper because an edge
//! needs what hyper hides: the raw framing fields (to refuse a request that carries both
//! lengths, which hyper resolves silently), the bytes left on the stream after a message,
//! and control over when buffers exist at all (an idle connection holds none).

mod body;
mod encode;
mod framing;
mod head;
mod queue;
mod read_buffer;

pub use body::{BodyDecoder, BodyError, Decoded};
pub use encode::{
    chunk_size_line, last_chunk_with_trailers, request_head, response_head, LAST_CHUNK,
};
pub use framing::{BodyFraming, FramingError};
pub use head::{HeadError, HeadReader, RequestHead, ResponseHead, MAX_FIELDS};
pub use queue::WriteQueue;
pub use read_buffer::ReadBuffer;

#[cfg(test)]
mod properties;

/// Whether a request with this method may be sent twice with the effect of once (RFC 9110
/// §9.2.2): what a request written to a node that then failed needs to go again.
pub fn is_idempotent(method: &hyper::Method) -> bool {
    use hyper::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}
