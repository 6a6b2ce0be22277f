//! The HTTP/1.1 wsgate speaks by hand, where a general HTTP stack would cost more than the job: the first
//! request head of a client connection (`request.rs`), responses wsgate writes itself (`response.rs`),
//! messages toward and from backends without I/O (`message.rs`: heads, body framing, chunked coding),
//! and the backend side of the WebSocket opening handshake (`backend.rs`). hyper serves clients
//! otherwise; requests to backends go through `upstream::Exchange`, on `message.rs`.
//!
//! One set of limits for all of it, below; each parser holds at most what its limit says, whatever the
//! peer sends.

pub mod backend;
pub mod message;
pub mod request;
pub mod response;

/// Headers accepted in one head, request or answer: hyper's own limit, so wsgate's parsers and hyper's
/// accept the same messages.
pub const MAX_HEADERS: usize = 100;
/// Capacity of the first read of a client connection: a browser's upgrade request is well under it, and
/// a longer head grows the buffer.
pub const FIRST_READ: usize = 2048;
/// hyper's smallest read buffer: a client head limit (`limits.max_header_size`) below it still lets hyper
/// buffer this much, and wsgate reads as far before handing a head to hyper.
pub const MIN_HEAD_BUFFER: usize = 8192;
/// Largest answer head accepted from a backend: the most a handshake ever holds of a backend's bytes
/// before its body.
pub const MAX_HEAD: usize = 64 << 10;
/// Largest body of a backend's refusal relayed to the client (error pages are small).
pub const MAX_RELAYED_BODY: usize = 1 << 20;
/// Longest run of whitespace and extensions in one chunk-size line.
pub const MAX_CHUNK_LINE: usize = 4096;

/// How much of a client's head is buffered before it is refused (hyper answers 431 past it).
pub fn client_head_limit(max_header_size: usize) -> usize {
    max_header_size.max(MIN_HEAD_BUFFER)
}
