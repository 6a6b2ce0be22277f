//! One HTTP/1.1 request on a backend connection, and its response, driven by the client connection's own
//! task: the request head and body are written and the answer head read in one future (`Exchange`), and
//! the response body is decoded as the client's side asks for the next piece (`UpstreamBody`), which
//! puts the connection back in the pool once the response has been read whole.
//!
//! A general client would run each backend connection in a task of its own, reached through a channel
//! per request and a second one per body: two tasks woken, and a hop each way, for every request. Here
//! the backend's socket is read and written from the task that serves the client, and nothing runs while
//! a pooled connection is idle (its buffer is freed; a closed one is found when it is next taken out).
//!
//! What is held is bounded: the answer head by `MAX_HEAD`, one read buffer while a body streams (large
//! pieces of data split off it, small ones copied: `http1::message`), a trailer section by `MAX_HEAD`.
//! Request bodies are streamed as the client sends them: with their `Content-Length`, else chunked, their
//! trailers dropped.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::io::poll_read_buf;

use super::{BackendStream, PoolKey, Upstream};
use crate::body::BoxError;
use crate::headers::{HopByHop, strip_hop_by_hop};
use crate::http1::MAX_HEAD;
use crate::http1::message::{
    BackendHttpError, BodyReader, Head, Piece, encode_chunk, head_ends_in, leading_line_ends,
    parse_head_with,
};

/// Room made in the read buffer when it runs low: a response's data is split off it in pieces of up to
/// this size.
const READ_SIZE: usize = 16 * 1024;

/// A connection to a backend that carries HTTP/1.1 requests one at a time.
pub struct BackendConn {
    stream: BackendStream,
    /// Bytes read from the backend and not consumed yet; no allocation while the connection is idle.
    buf: BytesMut,
    /// The connection has carried a request before: a failure before any answer may be the backend's
    /// keep-alive timeout, not a fault.
    reused: bool,
}

impl BackendConn {
    pub fn new(stream: BackendStream) -> BackendConn {
        BackendConn {
            stream,
            buf: BytesMut::new(),
            reused: false,
        }
    }

    /// Whether an idle connection can carry a request: the backend has neither closed it nor sent anything
    /// unasked. Looked at without waiting: one read attempt whose wakeup is thrown away.
    pub fn is_usable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        Pin::new(&mut self.stream)
            .poll_read(&mut cx, &mut probe)
            .is_pending()
    }

    /// The local address of a plain connection (tests tell connections apart by it).
    #[cfg(test)]
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match &self.stream {
            BackendStream::Plain(stream) => stream.local_addr().ok(),
            BackendStream::Tls(_) | BackendStream::Own(_) => None,
        }
    }

    /// Made ready for the pool: marked reused, its read buffer freed.
    fn recycle(mut self) -> BackendConn {
        self.reused = true;
        self.buf = BytesMut::new();
        self
    }

    /// Reads into the buffer, making room first when it runs low.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 4 {
            self.buf.reserve(READ_SIZE);
        }
        poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.buf)
    }
}

impl Drop for BackendConn {
    fn drop(&mut self) {
        // A TLS backend is told the connection ends (`close_notify`), in one attempt that cannot wait:
        // the alert is small and the socket has room for it unless the backend stopped reading.
        if self.stream.is_tls() {
            let mut cx = Context::from_waker(Waker::noop());
            let _ = Pin::new(&mut self.stream).poll_shutdown(&mut cx);
        }
    }
}

/// The request going out: its encoded head, then the client's body as it comes.
struct Upload {
    body: Incoming,
    /// The body's end has been taken from the client (and its last chunk encoded, if chunked).
    ended: bool,
    chunked: bool,
    /// Encoded bytes not written yet: the head, then each piece of the body.
    out: Bytes,
    /// Written since the last flush (a TLS session may hold what it was given until then).
    unflushed: bool,
    /// Some of the client's body was taken: the request cannot be sent again.
    took_body: bool,
    /// Some of the request reached the socket.
    wrote: bool,
    /// Writing failed: the backend may still answer (it may have stopped reading on purpose).
    failed: bool,
    /// Bytes were written or a piece of the body taken since this was last cleared: what restarts the
    /// clock of a side that keeps the upload waiting.
    moved: bool,
}

enum UploadError {
    Client(hyper::Error),
    Backend(io::Error),
}

impl Upload {
    /// The request has been written whole and flushed.
    fn is_complete(&self) -> bool {
        self.ended && self.out.is_empty() && !self.unflushed && !self.failed
    }

    /// Writes what there is, and takes more of the client's body; ready once all of it is written.
    fn poll(
        &mut self,
        stream: &mut BackendStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), UploadError>> {
        loop {
            while !self.out.is_empty() {
                let n = ready!(Pin::new(&mut *stream).poll_write(cx, &self.out))
                    .map_err(UploadError::Backend)?;
                if n == 0 {
                    return Poll::Ready(Err(UploadError::Backend(io::ErrorKind::WriteZero.into())));
                }
                self.out.advance(n);
                self.wrote = true;
                self.unflushed = true;
                self.moved = true;
            }
            if self.ended {
                break;
            }
            let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) else {
                break;
            };
            self.moved = true;
            match frame {
                None => {
                    self.ended = true;
                    if self.chunked {
                        self.out = Bytes::from_static(b"0\r\n\r\n");
                    }
                }
                Some(Err(error)) => return Poll::Ready(Err(UploadError::Client(error))),
                Some(Ok(frame)) => {
                    self.took_body = true;
                    self.out = match frame.into_data() {
                        Ok(data) if self.chunked => {
                            let mut out = Vec::new();
                            encode_chunk(&data, &mut out);
                            out.into()
                        }
                        Ok(data) => data,
                        Err(_) => {
                            // Trailers are the body's last frame. They are not passed on: a backend
                            // that merges them into the head would take a client's `X-Real-IP` or
                            // `Host` for wsgate's (RFC 9110 §6.5.1 lets a proxy drop them).
                            self.ended = true;
                            if self.chunked {
                                Bytes::from_static(b"0\r\n\r\n")
                            } else {
                                Bytes::new()
                            }
                        }
                    };
                }
            }
        }
        if self.unflushed {
            ready!(Pin::new(&mut *stream).poll_flush(cx)).map_err(UploadError::Backend)?;
            self.unflushed = false;
        }
        if self.ended {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

/// Why an exchange ended without an answer head.
#[derive(Debug)]
pub enum ExchangeError {
    /// A reused connection ended before any answer, and the request may go again on another one: it is
    /// idempotent or none of it was written, and none of the client's body was taken
    /// (`Exchange::into_request_body` gives it back).
    Stale,
    /// The client's body failed (the client left, or sent less than its head announced).
    Client(hyper::Error),
    /// The backend failed: the connection broke or closed, or its answer was not HTTP.
    Backend(BackendHttpError),
    /// The client paused its body longer than `Patience::client_body`: its fault, not the backend's.
    ClientTimeout,
    /// The backend took none of the request for `Patience::backend`, or did not begin its answer within
    /// that time of the request being written whole.
    BackendTimeout,
}

/// The final answer head, its hop-by-hop fields taken out as it was read (`HopByHop`). The map still holds
/// the fields `Connection` named and, if the body is in a transfer coding, `Content-Length`: both are
/// removed when the client's response is made (`proxy::http`).
#[derive(Debug)]
pub struct Answer {
    pub head: Head,
    pub hop: HopByHop,
}

/// How long each side may keep an exchange waiting before the answer head, each clock counting from
/// the moment that side was last waited on and made progress.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    /// The longest pause in the client's body while the backend waits for it (nginx's
    /// `client_body_timeout`).
    pub client_body: Duration,
    /// The longest the backend may leave a write of the request pending (nginx's `proxy_send_timeout`),
    /// and the time it has to begin its answer once the request is written whole (`proxy_read_timeout`).
    pub backend: Duration,
}

/// What an exchange is waiting on, before its answer head: whose clock runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// More of the client's body.
    Client,
    /// The backend to take what has been written (its socket is full).
    BackendWrite,
    /// The backend's answer head, the request being written whole (or its writing having failed).
    Answer,
}

/// One request on a backend connection, until the answer head.
pub struct Exchange {
    conn: BackendConn,
    upload: Upload,
    /// The request may be sent again after a stale connection even if written (RFC 9110 §9.2.2).
    idempotent: bool,
    /// Some of the answer has arrived.
    answered: bool,
    /// The answer head came before the request was written whole: the backend answered without reading
    /// all of it (a 413, or a backend that ignores bodies), so what it makes of the rest is unknown and
    /// the connection is not reused.
    answered_early: bool,
    /// The first bytes of `conn.buf` that hold no head end.
    searched: usize,
    /// What the exchange waited on when its clock was last started.
    waiting: Option<Waiting>,
}

impl Exchange {
    /// `head` is the encoded request head; `body` goes behind it with its `Content-Length` (the head
    /// carries it) or, if `chunked`, in chunks (the head says `Transfer-Encoding: chunked`).
    pub fn new(
        conn: BackendConn,
        head: Bytes,
        body: Incoming,
        chunked: bool,
        idempotent: bool,
    ) -> Exchange {
        Exchange {
            conn,
            upload: Upload {
                body,
                ended: false,
                chunked,
                out: head,
                unflushed: false,
                took_body: false,
                wrote: false,
                failed: false,
                moved: false,
            },
            idempotent,
            answered: false,
            answered_early: false,
            searched: 0,
            waiting: None,
        }
    }

    /// Writes the request and reads until the answer head, skipping interim (1xx) answers, within the
    /// `patience` of each side.
    ///
    /// Whose clock runs is what the exchange waits on whenever it has to wait: a slow upload is the
    /// client's (a 200 MB body at a modem's pace is no backend's fault, and may take as long as it keeps
    /// moving), a full socket toward the backend is the backend's, and the answer's clock starts once
    /// the request is written whole. The clock is read only when the exchange has to wait and something
    /// moved since it last did.
    pub async fn head(&mut self, patience: Patience) -> Result<Answer, ExchangeError> {
        let mut timer = pin!(None::<Sleep>);
        poll_fn(|cx| {
            if let Poll::Ready(result) = self.poll_head(cx) {
                return Poll::Ready(result);
            }
            let waiting = self.waiting_on();
            // Head bytes arriving do not restart the answer's clock: the head must be whole in time.
            let moved = std::mem::take(&mut self.upload.moved) && waiting != Waiting::Answer;
            if self.waiting != Some(waiting) || moved || timer.is_none() {
                self.waiting = Some(waiting);
                let allowed = match waiting {
                    Waiting::Client => patience.client_body,
                    Waiting::BackendWrite | Waiting::Answer => patience.backend,
                };
                let deadline = Instant::now() + allowed;
                match timer.as_mut().as_pin_mut() {
                    Some(timer) => timer.reset(deadline),
                    None => timer.set(Some(tokio::time::sleep_until(deadline))),
                }
            }
            if let Some(timer) = timer.as_mut().as_pin_mut() {
                ready!(timer.poll(cx));
            }
            Poll::Ready(Err(match waiting {
                Waiting::Client => ExchangeError::ClientTimeout,
                Waiting::BackendWrite | Waiting::Answer => ExchangeError::BackendTimeout,
            }))
        })
        .await
    }

    /// What the exchange is waiting on, when `poll_head` is pending.
    fn waiting_on(&self) -> Waiting {
        let upload = &self.upload;
        if upload.failed || upload.is_complete() {
            Waiting::Answer
        } else if !upload.out.is_empty() || upload.unflushed {
            Waiting::BackendWrite
        } else {
            Waiting::Client
        }
    }

    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Answer, ExchangeError>> {
        if let Poll::Ready(Err(UploadError::Client(error))) = self.poll_upload(cx) {
            return Poll::Ready(Err(ExchangeError::Client(error)));
        }
        loop {
            let buf = &mut self.conn.buf;
            let blank = leading_line_ends(buf);
            if blank > 0 {
                buf.advance(blank);
                self.searched = self.searched.saturating_sub(blank);
            }
            if head_ends_in(buf, self.searched) {
                let mut hop = HopByHop::default();
                let parsed = parse_head_with(buf, |name, value| hop.take(name, value))
                    .map_err(ExchangeError::Backend)?;
                if let Some(head) = parsed {
                    buf.advance(head.len);
                    self.searched = 0;
                    if head.status == http::StatusCode::SWITCHING_PROTOCOLS {
                        return Poll::Ready(Err(ExchangeError::Backend(
                            BackendHttpError::Invalid("101 to a request that asked for no upgrade"),
                        )));
                    }
                    if head.status.is_informational() {
                        continue;
                    }
                    self.answered_early = !self.upload.is_complete();
                    return Poll::Ready(Ok(Answer { head, hop }));
                }
            }
            if buf.len() >= MAX_HEAD {
                return Poll::Ready(Err(ExchangeError::Backend(BackendHttpError::Invalid(
                    "answer head too large",
                ))));
            }
            self.searched = buf.len();
            match ready!(self.conn.poll_fill(cx)) {
                Ok(0) => return Poll::Ready(Err(self.ended(BackendHttpError::Closed))),
                Ok(_) => self.answered = true,
                Err(error) => return Poll::Ready(Err(self.ended(error.into()))),
            }
        }
    }

    /// Moves the request along. A failed write is kept quiet: the backend may answer all the same (a 413
    /// for a body it will not take), and the connection is not reused after it.
    fn poll_upload(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), UploadError>> {
        if self.upload.failed || self.upload.is_complete() {
            return Poll::Ready(Ok(()));
        }
        match ready!(self.upload.poll(&mut self.conn.stream, cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(UploadError::Backend(error)) => {
                tracing::debug!(%error, "writing the request to the backend failed");
                self.upload.failed = true;
                Poll::Ready(Ok(()))
            }
            Err(client) => {
                self.upload.failed = true;
                Poll::Ready(Err(client))
            }
        }
    }

    /// The connection ended before an answer head: stale (the request goes again), or the backend's fault.
    fn ended(&self, error: BackendHttpError) -> ExchangeError {
        let replayable = self.idempotent || !self.upload.wrote;
        if self.conn.reused && !self.answered && !self.upload.took_body && replayable {
            ExchangeError::Stale
        } else {
            ExchangeError::Backend(error)
        }
    }

    /// The client's body, for another attempt after `ExchangeError::Stale` (none of it was taken).
    pub fn into_request_body(self) -> Incoming {
        self.upload.body
    }
}

/// What a response body holds for its backend says whether the connection may be pooled again once the
/// response is done (not when the backend drains).
pub trait Reuse {
    fn reusable(&self) -> bool;
}

/// Where a finished exchange's connection goes.
pub struct Recycle {
    pub upstream: Arc<Upstream>,
    pub key: PoolKey,
    /// The answer allows another request on the connection (HTTP/1.1 without `Connection: close`, a
    /// body that does not end with the connection).
    pub keep_alive: bool,
}

/// A backend's response body on its way to the client, read from the connection as the client's side
/// asks for it. Once it has been read whole (and the request written whole), the connection goes back to
/// the pool; `held` (the backend's live-connection guard) is kept until then, or until it is dropped.
pub struct UpstreamBody<H: Reuse> {
    /// `None` once the body is done (the connection pooled or closed).
    exchange: Option<Exchange>,
    reader: BodyReader,
    recycle: Option<Recycle>,
    held: H,
    /// The longest pause allowed in the body, and since when the backend has been quiet: set by the
    /// first read that has to wait after data came (the clock is read only when one waits), cleared by
    /// data.
    idle: Duration,
    quiet_since: Option<Instant>,
    /// Made the first time a read has to wait.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<H: Reuse> UpstreamBody<H> {
    pub fn new(
        exchange: Exchange,
        reader: BodyReader,
        recycle: Recycle,
        held: H,
        idle: Duration,
    ) -> UpstreamBody<H> {
        let mut body = UpstreamBody {
            exchange: Some(exchange),
            reader,
            recycle: Some(recycle),
            held,
            idle,
            quiet_since: None,
            timer: None,
        };
        // A body that is empty from the start (204, 304, HEAD, `Content-Length: 0`) is never polled:
        // the connection is free already.
        if body.reader.is_done() {
            body.finish();
        }
        body
    }

    /// The response has been read whole: the connection goes back to the pool if nothing else is left on
    /// it, else it is closed.
    fn finish(&mut self) {
        let (Some(exchange), Some(recycle)) = (self.exchange.take(), self.recycle.take()) else {
            return;
        };
        let clean = exchange.upload.is_complete()
            && !exchange.answered_early
            && exchange.conn.buf.is_empty();
        if recycle.keep_alive && clean && self.held.reusable() {
            recycle
                .upstream
                .checkin(&recycle.key, exchange.conn.recycle());
        }
    }

    /// Ends the body with an error: the connection is closed, and the client's response cut (hyper
    /// aborts it), which an operator sees here: the access log has the status already sent.
    fn fail(&mut self, error: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let error = error.into();
        let backend = self.recycle.as_ref().map_or("-", |r| r.key.addr.as_str());
        tracing::warn!(backend, %error, "backend response body failed; the client's response is cut");
        self.exchange = None;
        Poll::Ready(Some(Err(error)))
    }

    /// Waits for the pause allowed since the backend went quiet; ready (an error) when it is over.
    fn poll_pause(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let deadline = *self.quiet_since.get_or_insert_with(Instant::now) + self.idle;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            "the backend paused its response body longer than timeouts.backend_response",
        ))
    }
}

impl<H: Reuse> Drop for UpstreamBody<H> {
    fn drop(&mut self) {
        if self.reader.is_done() {
            self.finish();
        }
    }
}

impl<H: Reuse + Unpin> Body for UpstreamBody<H> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(exchange) = this.exchange.as_mut() else {
                return Poll::Ready(None);
            };
            // A request body still going out keeps going while the answer comes back. The client's
            // side failing now only means the connection is not reused.
            let _ = exchange.poll_upload(cx);
            let piece = match this.reader.decode(&mut exchange.conn.buf) {
                Ok(piece) => piece,
                Err(error) => return this.fail(error),
            };
            match piece {
                Piece::Data(data) => {
                    if this.reader.is_done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Piece::Trailers(mut trailers) => {
                    this.finish();
                    // Hop-by-hop fields mean nothing past this hop (and HTTP/2 refuses them).
                    strip_hop_by_hop(&mut trailers);
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Piece::Done => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Piece::More => {}
            }
            match exchange.conn.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    if let Err(error) = this.reader.at_eof() {
                        return this.fail(error);
                    }
                    // A body that ends with the connection: the connection is not reused.
                    this.exchange = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(_)) => this.quiet_since = None,
                Poll::Ready(Err(error)) => return this.fail(error),
                Poll::Pending => {
                    let error = ready!(this.poll_pause(cx));
                    return this.fail(error);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reader.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.reader.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
