//! The server layer: from a listening socket to requests for the proxy layer. `listener.rs` binds and
//! accepts within the connection limit; `connection.rs` serves one client connection over any transport
//! (TLS handshake, then the first request read by wsgate itself); `h1.rs` is hyper's HTTP/1.1 server for
//! everything after it, `h2.rs` hyper's HTTP/2 server for connections that chose HTTP/2 (ALPN or h2c);
//! `client_io.rs` keeps the header, keep-alive and send timeouts on the socket.

mod client_io;
mod connection;
mod h1;
mod h2;
mod h2_streams;
mod listener;
mod quiet;

pub use listener::ListenerHandle;
