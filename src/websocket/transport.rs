//! The streams a tunnel relays between: a raw `TcpStream`, or any async stream (a TLS session, an HTTP/2
//! stream).
//!
//! A raw socket tells when it is readable without being read, so a tunnel borrows a read buffer only once
//! data is there; so does a TLS session (`tls::session`, a client's or toward a backend), which knows what
//! it holds. A buffered stream (an HTTP/2 stream) cannot: its readiness depends on what it has buffered,
//! so for it the tunnel borrows a buffer, tries a read, and gives the buffer back at once when nothing
//! came. Either way an idle tunnel holds no buffer of wsgate's.
//!
//! A stream over a socket also has a parked form (`Transport::Parked`), which a quiet tunnel takes into
//! the park (`park.rs`): the socket out of the runtime's reactor, with what the stream keeps beside it.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use socket2::SockRef;
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

    /// What the stream becomes in the park (`park.rs`): its socket out of the runtime's reactor, with
    /// whatever state the stream keeps beside it (a TLS session's keys and sequence numbers). Streams
    /// that never park name `Unparkable`.
    type Parked: ParkedStream;

    /// Whether a quiet tunnel over this stream may ever go to the park: a raw socket or a TLS session
    /// over one, which the park can watch through the socket. Other streams keep their task.
    fn parkable(&self) -> bool {
        false
    }

    /// After a read that found no data (`Pending` once readiness said ready): whether the socket still
    /// holds bytes the read left there. A raw socket's read ends only when the socket is empty; a TLS
    /// session may stop after a record that carried no data (a `KeyUpdate`) with more already arrived,
    /// which a tunnel back from the park must read before it judges a deadline.
    fn more_waiting(&self) -> bool {
        false
    }

    /// Whether the stream holds nothing in flight now (no record half read or unsent, no buffer): only
    /// then may its tunnel park. A raw socket always; a TLS session when quiet.
    fn settled(&self) -> bool {
        true
    }

    /// The parked form, out of the runtime's reactor. Only called when `parkable` and `settled`. An error
    /// loses the stream (the reactor would not let the socket go).
    fn into_parked(self) -> io::Result<Self::Parked>
    where
        Self: Sized;

    /// The stream again, registered with the current runtime's reactor, from what `into_parked` gave.
    fn from_parked(parked: Self::Parked) -> io::Result<Self>
    where
        Self: Sized;
}

/// Whether a read of `socket` would return something now (bytes, the peer's FIN or an error), asked of
/// the kernel (`MSG_PEEK`) whatever the runtime's reactor last said of it.
pub fn input_waiting(socket: &impl AsFd) -> bool {
    match SockRef::from(socket).peek(&mut [MaybeUninit::uninit(); 1]) {
        Ok(_) => true,
        Err(error) => !matches!(
            error.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        ),
    }
}

/// A stream in the park: the socket the park watches for readability, with what the stream keeps.
pub trait ParkedStream: Send + 'static {
    fn socket(&self) -> &std::net::TcpStream;
}

impl ParkedStream for std::net::TcpStream {
    fn socket(&self) -> &std::net::TcpStream {
        self
    }
}

/// The parked form of a stream that never parks: there is none.
pub enum Unparkable {}

impl ParkedStream for Unparkable {
    fn socket(&self) -> &std::net::TcpStream {
        match *self {}
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

    type Parked = std::net::TcpStream;

    fn parkable(&self) -> bool {
        true
    }

    fn into_parked(self) -> io::Result<std::net::TcpStream> {
        self.into_std()
    }

    fn from_parked(socket: std::net::TcpStream) -> io::Result<Self> {
        // `into_std` left it non-blocking, as the reactor needs it.
        TcpStream::from_std(socket)
    }
}

/// Any tokio stream that cannot tell readiness without a read (an HTTP/2 stream's upgraded body).
pub struct Buffered<S>(pub S);

/// A stream kept on the heap (a TLS session toward a backend).
impl<T: Transport> Transport for Box<T> {
    type Parked = T::Parked;

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

    fn parkable(&self) -> bool {
        (**self).parkable()
    }

    fn more_waiting(&self) -> bool {
        (**self).more_waiting()
    }

    fn settled(&self) -> bool {
        (**self).settled()
    }

    fn into_parked(self) -> io::Result<T::Parked> {
        (*self).into_parked()
    }

    fn from_parked(parked: T::Parked) -> io::Result<Self> {
        T::from_parked(parked).map(Box::new)
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin> Transport for Buffered<S> {
    type Parked = Unparkable;

    // Never called: `parkable` is false.
    fn into_parked(self) -> io::Result<Unparkable> {
        Err(io::Error::other("this stream cannot be parked"))
    }

    fn from_parked(parked: Unparkable) -> io::Result<Self> {
        match parked {}
    }

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
