//! The WebSocket protocol as the tunnel needs it, knowing neither hyper nor the gateway: the opening
//! handshake's rules (`handshake.rs`), frame headers and wsgate's own control frames (`frame.rs`), an
//! in-place stream scanner (`scanner.rs`), the frame-aware tunnel (`tunnel.rs`) over raw sockets or TLS
//! sessions (`transport.rs`), where quiet tunnels wait without a task (`park.rs`), how a tunnel ends
//! (`end.rs`), and read buffers lent only while data moves (`buffers.rs`).

mod buffers;
mod end;
pub mod frame;
mod handshake;
mod park;
pub mod scanner;
mod transport;
pub mod tunnel;

pub use buffers::{BUFFER_SIZE, BufferPool};
pub use end::EndReason;
pub use handshake::{
    Rejection, accept_key, accepts, is_upgrade_request, new_key, validate, validate_version,
};
pub use transport::{Buffered, ParkedStream, Transport, input_waiting};
