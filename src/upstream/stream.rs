//! A connection to a backend: a raw `TcpStream`, or a TLS session over one. Everything that talks to a
//! backend goes through it: the keep-alive HTTP connections, the upgrade's handshake, the tunnel after it
//! (as a `websocket::Transport`) and the health probes.
//!
//! The plain variant costs what a bare `TcpStream` costs: no allocation, and the tunnel still waits on the
//! socket's readiness, holding no read buffer while idle. The TLS session is wsgate's (`tls/session.rs`,
//! as for clients): it holds no buffer while quiet and tells readiness from what it holds, so an idle
//! tunnel to a TLS backend holds no read buffer either. It is boxed (only TLS backends pay for it), and
//! when a tunnel starts a TLS 1.3 session is handed to wsgate's record layer (`establish`), which keeps
//! its keys rather than rustls' connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use rustls::client::ClientConnectionData;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::record_layer::RecordLayer;
use crate::tls::session::{ClientSession, Established, TlsSession};
use crate::websocket::{ParkedStream, Transport};

pub enum BackendStream {
    Plain(TcpStream),
    /// Driven by rustls' connection: while pooled for HTTP, and for TLS 1.2.
    Tls(Box<ClientSession<TcpStream>>),
    /// Handed to wsgate's record layer (`establish`).
    Own(Box<TlsSession<RecordLayer<ClientConnectionData>, TcpStream>>),
}

/// The same call on whichever stream it is.
macro_rules! each {
    ($stream:expr, $s:ident => $call:expr) => {
        match $stream {
            BackendStream::Plain($s) => $call,
            BackendStream::Tls($s) => $call,
            BackendStream::Own($s) => $call,
        }
    };
}

impl BackendStream {
    pub fn tls(session: ClientSession<TcpStream>) -> BackendStream {
        BackendStream::Tls(Box::new(session))
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self, BackendStream::Plain(_))
    }

    /// The stream for the rest of its life (a tunnel's): a TLS 1.3 session is handed to wsgate's record
    /// layer where rustls can hand it over (`TlsSession::establish`). An error only if rustls refused
    /// the hand-over after all, and then the session is gone.
    pub fn establish(self) -> io::Result<BackendStream> {
        let BackendStream::Tls(session) = self else {
            return Ok(self);
        };
        match session.establish() {
            Established::Own(session) => Ok(BackendStream::Own(session)),
            Established::Rustls(session) => Ok(BackendStream::Tls(session)),
            Established::Lost(_) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "TLS session to the backend lost at the hand-over",
            )),
        }
    }
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        each!(self, s => s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    /// Plain: the socket's write side is shut (FIN). TLS: a `close_notify` alert is sent first, then the
    /// socket's write side is shut.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

impl Transport for BackendStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Transport::poll_read_ready(s, cx))
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        each!(self, s => Transport::poll_read(s, cx, buf))
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        each!(self, s => Transport::poll_write(s, cx, buf))
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Transport::poll_flush(s, cx))
    }

    /// A tunnel's end: `close_notify` toward a TLS backend; a plain one needs nothing beyond the close.
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Transport::poll_shutdown(s, cx))
    }

    type Parked = ParkedBackend;

    fn parkable(&self) -> bool {
        each!(self, s => s.parkable())
    }

    fn more_waiting(&self) -> bool {
        each!(self, s => s.more_waiting())
    }

    fn settled(&self) -> bool {
        each!(self, s => s.settled())
    }

    fn into_parked(self) -> io::Result<ParkedBackend> {
        Ok(match self {
            BackendStream::Plain(s) => ParkedBackend::Plain(s.into_std()?),
            BackendStream::Tls(s) => ParkedBackend::Tls(Box::new(s.into_parked()?)),
            BackendStream::Own(s) => ParkedBackend::Own(Box::new(s.into_parked()?)),
        })
    }

    fn from_parked(parked: ParkedBackend) -> io::Result<Self> {
        Ok(match parked {
            ParkedBackend::Plain(s) => BackendStream::Plain(TcpStream::from_std(s)?),
            ParkedBackend::Tls(s) => BackendStream::Tls(Box::new(TlsSession::from_parked(*s)?)),
            ParkedBackend::Own(s) => BackendStream::Own(Box::new(TlsSession::from_parked(*s)?)),
        })
    }
}

/// A backend stream in the park (`websocket::Transport::into_parked`): the socket out of the reactor,
/// with the TLS session's state beside it.
pub enum ParkedBackend {
    Plain(std::net::TcpStream),
    Tls(Box<ClientSession<std::net::TcpStream>>),
    Own(Box<TlsSession<RecordLayer<ClientConnectionData>, std::net::TcpStream>>),
}

impl ParkedStream for ParkedBackend {
    fn socket(&self) -> &std::net::TcpStream {
        match self {
            ParkedBackend::Plain(s) => s,
            ParkedBackend::Tls(s) => s.socket(),
            ParkedBackend::Own(s) => s.socket(),
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
