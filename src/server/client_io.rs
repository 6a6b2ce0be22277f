//! The client's TCP stream as the HTTP layer sees it, with the two HTTP timeouts hyper does not keep the
//! way a proxy needs them:
//!
//! - `header`: a request head must be complete within this time of its first byte (slowloris guard); a new
//!   connection must also send its first request within it;
//! - `http_idle`: a keep-alive connection with no request in flight is closed after this long.
//!
//! While a request is being served (`Stage::Busy`) neither applies: backend timeouts govern then, and an
//! upgraded connection leaves this wrapper (a plain tunnel takes the inner `TcpStream`; a TLS tunnel keeps
//! it under the TLS session, with every timer here off).
//!
//! One more applies to writes, in every phase but upgraded: `send`, a write that makes no progress for
//! this long fails (the client stopped reading), so a client cannot hold its connection, and the backend
//! request behind it, by not reading a response.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::conn::{ClientConn, Stage};

pub struct ClientIo {
    stream: TcpStream,
    conn: Arc<ClientConn>,
    header_timeout: Duration,
    idle_timeout: Duration,
    send_timeout: Duration,
    /// When the phase's time is up (`header` or `http_idle`); read while the client sends nothing.
    deadline: Instant,
    /// Fires at `deadline` or before it (`set_deadline`).
    timer: Pin<Box<Sleep>>,
    /// Runs while a write is blocked; made at the first blocked write (most connections never have one).
    write_timer: Option<Pin<Box<Sleep>>>,
    /// The last write attempt did not complete: `write_timer` runs from when it first blocked.
    write_blocked: bool,
}

impl ClientIo {
    pub fn new(
        stream: TcpStream,
        conn: Arc<ClientConn>,
        header_timeout: Duration,
        idle_timeout: Duration,
        send_timeout: Duration,
    ) -> ClientIo {
        let deadline = Instant::now() + header_timeout;
        ClientIo {
            stream,
            conn,
            header_timeout,
            idle_timeout,
            send_timeout,
            deadline,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            write_timer: None,
            write_blocked: false,
        }
    }

    /// Passes a write's result on, failing it once writes have been blocked for `send_timeout`.
    fn watch_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if result.is_ready() {
            self.write_blocked = false;
            return result;
        }
        if self.conn.phase.get() == Stage::Upgraded {
            return result;
        }
        // The clock starts at the first blocked write; later ones only poll it.
        if !self.write_blocked {
            self.write_blocked = true;
            let deadline = Instant::now() + self.send_timeout;
            match &mut self.write_timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.write_timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        if let Some(timer) = &mut self.write_timer
            && timer.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "send timeout: the client stopped reading",
            )));
        }
        Poll::Pending
    }

    /// Moves the read deadline. The timer is reset only when the deadline comes sooner than it is set
    /// for: a busy keep-alive connection moves the deadline later twice per request (idle, then a head
    /// arriving), and resetting a timer takes it out of the runtime's wheel and puts it back. A timer
    /// that fires before the deadline is set for it then (`deadline_passed`), once per timeout at most.
    fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = deadline;
        if deadline < self.timer.deadline() {
            self.timer.as_mut().reset(deadline);
        }
    }

    /// Whether the read deadline has passed; otherwise the timer is registered to wake the task at it.
    fn deadline_passed(&mut self, cx: &mut Context<'_>) -> bool {
        while self.timer.as_mut().poll(cx).is_ready() {
            if self.timer.deadline() >= self.deadline {
                return true;
            }
            // Fired early: the deadline moved later since the timer was set.
            let deadline = self.deadline;
            self.timer.as_mut().reset(deadline);
        }
        false
    }

    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Registered before the phase is read, so an `idle` from another thread cannot slip in between.
        this.conn.phase.register_reader(cx.waker());
        let mut phase = this.conn.phase.get();
        if phase == Stage::IdleStarted {
            this.set_deadline(Instant::now() + this.idle_timeout);
            this.conn.phase.set(Stage::Idle);
            phase = Stage::Idle;
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && phase == Stage::Idle {
                    this.set_deadline(Instant::now() + this.header_timeout);
                    this.conn.phase.set(Stage::Headers);
                } else if buf.filled().len() > before && phase == Stage::WaitingFirst {
                    // The header timer of a new connection runs from the accept; it keeps running.
                    this.conn.phase.set(Stage::Headers);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if phase < Stage::Busy && this.deadline_passed(cx) {
                    let what = if phase == Stage::Idle {
                        "keep-alive idle timeout"
                    } else {
                        "request header timeout"
                    };
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.watch_write(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.watch_write(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A stream whose first bytes were already read by wsgate (`connection.rs`): they are read again
/// from here before the stream itself, so hyper parses the request as if it had read it.
pub struct Replay<I> {
    unread: Bytes,
    inner: I,
}

impl<I> Replay<I> {
    pub fn new(inner: I, unread: Bytes) -> Replay<I> {
        Replay { unread, inner }
    }

    /// The stream and whatever of the replayed bytes was not read yet.
    pub fn into_parts(self) -> (I, Bytes) {
        (self.inner, self.unread)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Replay<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.unread.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread.split_to(n));
        if self.unread.is_empty() {
            // Release the buffer now, not when the connection ends.
            self.unread = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Replay<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
