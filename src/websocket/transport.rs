//! The streams a tunnel relays between: a raw `TcpStream`, or any async stream (a TLS session, an HTTP/2
//! stream).
//!
//! A raw socket tells when it is readable without being read, so a tunnel borrows a read buffer only once
//! data is there; so does a client's TLS session (`tls::session`), which knows what it holds. A buffered
//! stream (a TLS session toward a backend, an HTTP/2 stream) cannot: its readiness depends on what it has
//! buffered, so for it the tunnel borrows a buffer, tries a read, and gives the buffer back at once when
//! nothing came. Either way an idle tunnel holds no buffer of wsgate's.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub trait Transport: Send + Unpin {
    /// Ready when a read may return data (or EOF). Streams that cannot tell answer `Ready` at once.
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Reads into `buf`; `Ok(0)` is EOF.
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>>;
    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>>;
    /// Pushes out anything the stream buffered itself (TLS records).
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Ends the stream in order, once the tunnel is over: a TLS session's `close_notify` (RFC 8446 §6.1),
    /// an HTTP/2 stream's END_STREAM. A raw socket needs nothing beyond the close that dropping it does.
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Whether the stream is a bare socket that a quiet tunnel may hand to the park (`park.rs`): one that
    /// holds nothing but the socket, which the park can watch. Other streams keep their task.
    fn parkable(&self) -> bool {
        false
    }

    /// The socket alone, out of the runtime's reactor, for the park. Only called when `parkable`.
    fn into_socket(self) -> io::Result<std::net::TcpStream>
    where
        Self: Sized,
    {
        Err(io::Error::other("this stream cannot be parked"))
    }

    /// The stream again, registered with the current runtime's reactor, from what `into_socket` gave.
    fn from_socket(socket: std::net::TcpStream) -> io::Result<Self>
    where
        Self: Sized,
    {
        drop(socket);
        Err(io::Error::other("this stream cannot be parked"))
    }
}

impl Transport for TcpStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        // tokio's own read clears the socket's readiness after a short read, sparing the read that would
        // only return EAGAIN (one system call per message saved on small-message traffic).
        let mut read = ReadBuf::new(buf);
        std::task::ready!(AsyncRead::poll_read(Pin::new(self), cx, &mut read))?;
        Poll::Ready(Ok(read.filled().len()))
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(self), cx, buf)
    }

    fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn parkable(&self) -> bool {
        true
    }

    fn into_socket(self) -> io::Result<std::net::TcpStream> {
        self.into_std()
    }

    fn from_socket(socket: std::net::TcpStream) -> io::Result<Self> {
        // `into_std` left it non-blocking, as the reactor needs it.
        TcpStream::from_std(socket)
    }
}

/// Any tokio stream that cannot tell readiness without a read (an HTTP/2 stream's upgraded body).
pub struct Buffered<S>(pub S);

/// A stream kept on the heap (a TLS session).
impl<T: Transport + ?Sized> Transport for Box<T> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_read_ready(cx)
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        (**self).poll_read(cx, buf)
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        (**self).poll_write(cx, buf)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_flush(cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin> Transport for Buffered<S> {
    fn poll_read_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut read = ReadBuf::new(buf);
        std::task::ready!(Pin::new(&mut self.0).poll_read(cx, &mut read))?;
        Poll::Ready(Ok(read.filled().len()))
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
