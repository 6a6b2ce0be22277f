//! A connection to a backend: a raw `TcpStream`, or a TLS session over one. Everything that talks to a
//! backend goes through it: the keep-alive HTTP connections (as hyper's IO), the upgrade's handshake, the
//! tunnel after it (as a `websocket::Transport`) and the health probes.
//!
//! The plain variant costs what a bare `TcpStream` costs: no allocation, and the tunnel still waits on the
//! socket's readiness, holding no read buffer while idle. The TLS session is boxed (rustls' connection
//! state is large, and only TLS backends should pay for it); toward the tunnel it behaves like any
//! buffered stream (`websocket::Buffered`), since rustls may hold records a readiness check cannot see.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::websocket::{Buffered, Transport};

pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<Buffered<TlsStream<TcpStream>>>),
}

impl BackendStream {
    pub fn tls(stream: TlsStream<TcpStream>) -> BackendStream {
        BackendStream::Tls(Box::new(Buffered(stream)))
    }
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            BackendStream::Tls(tls) => Pin::new(&mut tls.0).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            BackendStream::Tls(tls) => Pin::new(&mut tls.0).poll_write(cx, buf),
        }
    }

    // hyper writes a head and a body chunk in one vectored write when the stream takes them.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            BackendStream::Tls(tls) => Pin::new(&mut tls.0).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            BackendStream::Plain(stream) => stream.is_write_vectored(),
            BackendStream::Tls(tls) => tls.0.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            BackendStream::Tls(tls) => Pin::new(&mut tls.0).poll_flush(cx),
        }
    }

    /// Plain: the socket's write side is shut (FIN). TLS: a `close_notify` alert is sent first, then the
    /// socket's write side is shut, as tokio-rustls does it.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            BackendStream::Tls(tls) => Pin::new(&mut tls.0).poll_shutdown(cx),
        }
    }
}

impl Transport for BackendStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            BackendStream::Plain(stream) => Transport::poll_read_ready(stream, cx),
            BackendStream::Tls(tls) => tls.poll_read_ready(cx),
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self {
            BackendStream::Plain(stream) => Transport::poll_read(stream, cx, buf),
            BackendStream::Tls(tls) => Transport::poll_read(&mut **tls, cx, buf),
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self {
            BackendStream::Plain(stream) => Transport::poll_write(stream, cx, buf),
            BackendStream::Tls(tls) => Transport::poll_write(&mut **tls, cx, buf),
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            BackendStream::Plain(stream) => Transport::poll_flush(stream, cx),
            BackendStream::Tls(tls) => Transport::poll_flush(&mut **tls, cx),
        }
    }

    /// A tunnel's end: `close_notify` toward a TLS backend; a plain one needs nothing beyond the close.
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            BackendStream::Plain(stream) => Transport::poll_shutdown(stream, cx),
            BackendStream::Tls(tls) => Transport::poll_shutdown(&mut **tls, cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_backend_stream_is_no_larger_than_its_socket() {
        // The TLS session lives behind a pointer, so a plain connection (and every tunnel over one)
        // carries nothing for TLS beyond the enum's tag, which fits in the socket's own spare bits.
        assert_eq!(
            std::mem::size_of::<BackendStream>(),
            std::mem::size_of::<TcpStream>()
        );
    }
}
