//! WebSocket proxying: the upgrade handshake (`handshake.rs`; its backend side spoken directly on the
//! socket in `backend_http.rs`), then the frame-aware tunnel (`tunnel.rs`) over raw sockets or TLS
//! sessions (`transport.rs`), built on frame headers (`frame.rs`), an in-place stream scanner
//! (`scanner.rs`) and read buffers lent only while data moves (`buffers.rs`).

pub(crate) mod backend_http;
mod buffers;
pub mod frame;
mod handshake;
pub mod scanner;
mod transport;
pub mod tunnel;

pub use buffers::{BUFFER_SIZE, BufferPool};
pub use handshake::{
    ClientSide, Handshake, Splice, accept_key, accepts, handshake, is_upgrade_request, upgrade,
};
pub use transport::{Buffered, Transport};
