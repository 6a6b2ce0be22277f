//! The server layer: from a listening socket to requests for the proxy layer. `listener.rs` binds and
//! accepts within the connection limit; `connection.rs` serves one client connection over any transport
//! (TLS handshake, then the first request read by wsgate itself); `h1.rs` is hyper's server for
//! everything after it; `client_io.rs` keeps the header, keep-alive and send timeouts on the socket.

mod client_io;
mod connection;
mod h1;
mod listener;

pub use listener::ListenerHandle;
