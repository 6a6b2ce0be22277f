//! A TLS session over a socket, driven through rustls' unbuffered API, so that wsgate owns every buffer the
//! session uses and holds none while the session is quiet.
//!
//! rustls' buffered connection keeps a receive buffer (at least 4 KiB) and its queues for the session's
//! whole life, and an idle `wss://` tunnel would carry them as long as it stays open. Here the ciphertext
//! read from the socket, the plaintext not yet read by the caller and the ciphertext not yet written are
//! held only while there is something in them: each is freed once it is empty. What an idle session keeps
//! is rustls' state and traffic keys.
//!
//! A tunnel waits on the socket's readiness before it borrows a read buffer (`websocket::Transport`); a
//! session knows what it holds, so it can say when a read would find data without trying one.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, UnbufferedStatus, WriteTraffic,
};
use rustls::{CommonState, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::websocket::Transport;

/// Ciphertext asked of the socket per read: two full records, so that a bulk transfer is read in few
/// system calls.
pub const READ_SIZE: usize = 32 << 10;
/// Plaintext encrypted per write at most; the rest of a larger write is taken by the next call.
pub const WRITE_SIZE: usize = 64 << 10;
/// The most ciphertext held before it makes sense: rustls refuses a handshake message over 64 KiB and a
/// record over 16 KiB plus its overhead, so a buffer this full that still cannot be processed is a peer's
/// fault.
pub const MAX_INCOMING: usize = (64 << 10) + READ_SIZE;
/// A partial record left in a buffer this many times its size is copied into one of its own size.
const SHRINK_FACTOR: usize = 4;
/// The largest record payload a peer may send (TLS 1.2's limit, above TLS 1.3's; RFC 5246 §6.2.3).
const MAX_RECORD: usize = (16 << 10) + 2048;

/// One side of a connection: what the session needs of rustls' unbuffered client or server.
pub trait Side:
    std::ops::Deref<Target = rustls::unbuffered::UnbufferedConnectionCommon<Self::Data>>
{
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Side for UnbufferedServerConnection {
    type Data = ServerConnectionData;

    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.process_tls_records(incoming)
    }
}

/// A client's TLS session, as wsgate's listeners accept it.
pub type ServerSession<IO> = TlsSession<UnbufferedServerConnection, IO>;

/// Makes a TLS handshake as the server over `io` and returns the session once it is complete.
pub async fn accept<IO>(io: IO, config: Arc<ServerConfig>) -> io::Result<ServerSession<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut session = TlsSession::new(conn, io);
    std::future::poll_fn(|cx| session.poll_handshake(cx)).await?;
    Ok(session)
}

/// Writes into `outgoing` once the session may send application data (`TlsSession::process`).
type Encrypt<'a, D> = dyn FnMut(&mut WriteTraffic<'_, D>, &mut Vec<u8>) -> io::Result<()> + 'a;

/// What processing the received records came to.
enum Step {
    /// Everything complete has been processed; more bytes are needed (also while the handshake runs).
    Blocked,
    /// Both sides have sent `close_notify`.
    Closed,
}

pub struct TlsSession<C, IO> {
    conn: C,
    io: IO,
    /// Ciphertext read and not yet processed: a partial record, usually nothing (and then no allocation).
    incoming: Received,
    /// Plaintext decrypted and not yet read, from `plain_pos` on (a record larger than the caller's buffer).
    plaintext: Vec<u8>,
    plain_pos: usize,
    /// Ciphertext to write, from `sent` on: records and handshake messages, in order.
    outgoing: Vec<u8>,
    sent: usize,
    /// The peer has sent `close_notify`: reads return EOF once `plaintext` is empty.
    peer_closed: bool,
    /// The socket reached EOF.
    eof: bool,
    /// Our `close_notify` has been queued.
    close_queued: bool,
    /// Processing failed (rustls refused what the peer sent and queued its alert, or reached a state the
    /// session cannot handle): the session is over. rustls is not called again (it would refuse the same
    /// record again and queue a second fatal alert); reads return the plaintext decrypted before the
    /// failure, then this error every time, and writes fail with it.
    failed: Option<(io::ErrorKind, String)>,
}

impl<C: Side, IO> TlsSession<C, IO> {
    fn new(conn: C, io: IO) -> TlsSession<C, IO> {
        TlsSession {
            conn,
            io,
            incoming: Received::default(),
            plaintext: Vec::new(),
            plain_pos: 0,
            outgoing: Vec::new(),
            sent: 0,
            peer_closed: false,
            eof: false,
            close_queued: false,
            failed: None,
        }
    }

    /// The socket underneath.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// rustls' view of the session: ALPN, protocol version, cipher suite.
    pub fn state(&self) -> &CommonState {
        &self.conn
    }

    /// The same session over another stream (the socket out of a wrapper that is no longer needed).
    pub fn map_io<T>(self, f: impl FnOnce(IO) -> T) -> TlsSession<C, T> {
        TlsSession {
            conn: self.conn,
            io: f(self.io),
            incoming: self.incoming,
            plaintext: self.plaintext,
            plain_pos: self.plain_pos,
            outgoing: self.outgoing,
            sent: self.sent,
            peer_closed: self.peer_closed,
            eof: self.eof,
            close_queued: self.close_queued,
            failed: self.failed,
        }
    }

    /// Bytes of buffer the session holds now (allocated capacity): zero while it is quiet. For tests and
    /// fuzzing (`wsgate::internals`), which check that a quiet session holds none and a busy one a bounded
    /// amount.
    pub fn buffered_capacity(&self) -> usize {
        self.incoming.capacity() + self.plaintext.capacity() + self.outgoing.capacity()
    }

    fn has_plaintext(&self) -> bool {
        self.plain_pos < self.plaintext.len()
    }

    /// Whether processing `incoming` could make progress: it holds a whole record, or a record header
    /// rustls would refuse (a length no record may have), which is better refused at once than waited for.
    fn has_record(&self) -> bool {
        let held = self.incoming.bytes();
        if held.len() < 5 {
            return false;
        }
        let len = usize::from(u16::from_be_bytes([held[3], held[4]]));
        held.len() >= 5 + len || len > MAX_RECORD
    }

    /// The error processing failed with, again (`failed`).
    fn failure(&self) -> Option<io::Error> {
        let (kind, message) = self.failed.as_ref()?;
        Some(io::Error::new(*kind, message.clone()))
    }

    /// Processes every whole record received, until rustls wants more bytes: decrypted data goes to `out`
    /// while it has room, the rest to `plaintext`; handshake messages and alerts rustls answers with are
    /// queued on `outgoing`. With `write`, also encrypts into `outgoing` once the session may send. Once
    /// this failed, it fails again without processing anything (`failed`).
    fn process(
        &mut self,
        out: Option<&mut ReadBuf<'_>>,
        write: Option<&mut Encrypt<'_, C::Data>>,
    ) -> io::Result<Step> {
        if let Some(error) = self.failure() {
            return Err(error);
        }
        let step = self.process_records(out, write);
        if let Err(error) = &step {
            self.failed = Some((error.kind(), error.to_string()));
        }
        step
    }

    fn process_records(
        &mut self,
        mut out: Option<&mut ReadBuf<'_>>,
        mut write: Option<&mut Encrypt<'_, C::Data>>,
    ) -> io::Result<Step> {
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process(self.incoming.bytes_mut());
            let state = match state {
                Ok(state) => state,
                Err(error) => {
                    self.incoming.consume(discard);
                    self.queue_alerts();
                    return Err(tls_error(error));
                }
            };
            let step = match state {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        deliver(record.payload, &mut out, &mut self.plaintext);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    encode_into(&mut self.outgoing, 512, &mut encode)?;
                    None
                }
                // What was encoded sits in `outgoing`, which is written before the session waits on
                // anything: for rustls it is as good as sent.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                ConnectionState::Closed => {
                    self.peer_closed = true;
                    Some(Step::Closed)
                }
                ConnectionState::WriteTraffic(mut traffic) => {
                    if let Some(write) = write.take() {
                        write(&mut traffic, &mut self.outgoing)?;
                    }
                    Some(Step::Blocked)
                }
                ConnectionState::BlockedHandshake => Some(Step::Blocked),
                // Early data (0-RTT) is never enabled (`max_early_data_size` stays 0), and rustls adds
                // states only in new versions: neither can be handled here.
                other => {
                    return Err(io::Error::other(format!("unexpected TLS state {other:?}")));
                }
            };
            self.incoming.consume(discard);
            if let Some(step) = step {
                return Ok(step);
            }
        }
    }

    /// After a fatal error rustls has the alert that tells the peer why: queue it, to be written if the
    /// socket takes it at once. rustls is asked only while it has something to send (it hands that out
    /// before it looks at any record): with nothing queued it would go back to the records, given none
    /// here, and a handshake message it was joining in place in the real buffer would be looked for past
    /// the end of the empty one (rustls panics). The session is over, so what was encoded needs no
    /// `TransmitTlsData::done`.
    fn queue_alerts(&mut self) {
        for _ in 0..4 {
            if !self.conn.wants_write() {
                return;
            }
            let status = self.conn.process(&mut []);
            let Ok(ConnectionState::EncodeTlsData(mut encode)) = status.state else {
                return;
            };
            if encode_into(&mut self.outgoing, 64, &mut encode).is_err() {
                return;
            }
        }
    }

    /// Encrypts as much of `data` as one write takes into `outgoing`; returns how much that is.
    fn encrypt(&mut self, data: &[u8]) -> io::Result<usize> {
        let take = data.len().min(WRITE_SIZE);
        let mut done = false;
        let mut write = |traffic: &mut WriteTraffic<'_, C::Data>, outgoing: &mut Vec<u8>| {
            done = true;
            grow_into(outgoing, take + overhead(take), |buf| {
                match traffic.encrypt(&data[..take], buf) {
                    Ok(n) => Ok(Ok(n)),
                    Err(EncryptError::InsufficientSize(e)) => Ok(Err(e.required_size)),
                    Err(e) => Err(io::Error::other(e.to_string())),
                }
            })
        };
        self.process(None, Some(&mut write))?;
        if !done {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the TLS session cannot send application data",
            ));
        }
        Ok(take)
    }

    /// Queues this side's `close_notify` (once; nothing if the session cannot send any more).
    fn queue_close_notify(&mut self) -> io::Result<()> {
        if self.close_queued {
            return Ok(());
        }
        self.close_queued = true;
        let mut write = |traffic: &mut WriteTraffic<'_, C::Data>, outgoing: &mut Vec<u8>| {
            grow_into(outgoing, 64, |buf| match traffic.queue_close_notify(buf) {
                Ok(n) => Ok(Ok(n)),
                Err(EncryptError::InsufficientSize(e)) => Ok(Err(e.required_size)),
                Err(e) => Err(io::Error::other(e.to_string())),
            })
        };
        match self.process(None, Some(&mut write)) {
            Ok(_) => Ok(()),
            // A session that already failed has nothing left to close properly.
            Err(_) => Ok(()),
        }
    }
}

impl<C: Side, IO: AsyncRead + AsyncWrite + Unpin> TlsSession<C, IO> {
    /// Writes `outgoing` to the socket; ready once it is all written (and then freed).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        if self.outgoing.capacity() > 0 {
            self.outgoing = Vec::new();
            self.sent = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// Reads more ciphertext into `incoming`; the count read, 0 at EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.incoming.len() >= MAX_INCOMING {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS peer sent more than a record or handshake message can hold",
            )));
        }
        let room = self.incoming.room();
        let read = match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, room) {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(error)) => {
                self.incoming.release();
                return Poll::Ready(Err(error));
            }
            // Nothing came: a quiet session gives its read buffer back.
            Poll::Pending => {
                self.incoming.release();
                return Poll::Pending;
            }
        };
        if read == 0 {
            self.eof = true;
            self.incoming.release();
        }
        Poll::Ready(Ok(read))
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let step = match self.process(None, None) {
                Ok(step) => step,
                Err(error) => {
                    // Best effort: the alert goes out if the socket takes it now.
                    let _ = self.poll_send(cx);
                    return Poll::Ready(Err(error));
                }
            };
            ready!(self.poll_send(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if matches!(step, Step::Closed) || self.peer_closed || self.eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "TLS handshake ended early",
                )));
            }
            ready!(self.poll_fill(cx))?;
        }
    }

    /// The read behind `AsyncRead` and `Transport`.
    fn poll_read_plain(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let before = out.filled().len();
        loop {
            if self.has_plaintext() {
                let n = out.remaining().min(self.plaintext.len() - self.plain_pos);
                out.put_slice(&self.plaintext[self.plain_pos..self.plain_pos + n]);
                self.plain_pos += n;
                if !self.has_plaintext() {
                    self.plaintext = Vec::new();
                    self.plain_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(error) = self.failure() {
                return Poll::Ready(Err(error));
            }
            if self.has_record() {
                let processed = self.process(Some(out), None);
                // Whatever processing queued (a key update's answer, an alert) goes out now if the socket
                // takes it, else with the next write or read.
                let sent = if self.sent < self.outgoing.len() {
                    self.poll_send(cx)
                } else {
                    Poll::Ready(Ok(()))
                };
                // Data decrypted before a failure is returned first: an error with it would lose it (the
                // caller does not look at its buffer), and the rest would come after the error. The
                // session's failure is returned by the next read, once `plaintext` is read; the socket's is
                // met again by the next write or flush.
                if out.filled().len() > before {
                    return Poll::Ready(Ok(()));
                }
                processed?;
                if let Poll::Ready(Err(error)) = sent {
                    return Poll::Ready(Err(error));
                }
                if self.has_plaintext() {
                    continue;
                }
            }
            if self.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
            ready!(self.poll_fill(cx))?;
        }
    }

    fn poll_write_plain(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        // One batch in flight: a peer that stops reading stops the writer here.
        ready!(self.poll_send(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let taken = self.encrypt(data)?;
        // Started now; what the socket does not take yet is written by the next call or a flush.
        if let Poll::Ready(Err(error)) = self.poll_send(cx) {
            return Poll::Ready(Err(error));
        }
        Poll::Ready(Ok(taken))
    }

    fn poll_shutdown_plain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.conn.is_handshaking() {
            self.queue_close_notify()?;
        }
        ready!(self.poll_send(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<C: Side + Unpin, IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsSession<C, IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().poll_read_plain(cx, buf)
    }
}

impl<C: Side + Unpin, IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsSession<C, IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_plain(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_shutdown_plain(cx)
    }
}

/// A tunnel over a session on a raw socket: readiness comes from what the session holds, else from the
/// socket, so an idle tunnel neither reads nor holds a buffer.
impl<C: Side + Unpin + Send> Transport for TlsSession<C, TcpStream> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A failure is ready too: the record that caused it may be gone (rustls consumed it).
        if self.has_plaintext()
            || self.has_record()
            || self.peer_closed
            || self.eof
            || self.failed.is_some()
        {
            return Poll::Ready(Ok(()));
        }
        // Anything still queued (session tickets, a key update's answer) is written while the tunnel waits.
        if self.sent < self.outgoing.len() {
            let _ = self.poll_send(cx)?;
        }
        let ready = self.io.poll_read_ready(cx);
        if ready.is_pending() {
            // The tunnel waits: a partial record is kept in a buffer of its own size.
            self.incoming.release();
        }
        ready
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut read = ReadBuf::new(buf);
        ready!(self.poll_read_plain(cx, &mut read))?;
        Poll::Ready(Ok(read.filled().len()))
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_plain(cx, buf)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_send(cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_shutdown_plain(cx)
    }
}

/// Ciphertext read and not yet processed: `buf[start..]`. A `Vec` with a start rather than a `BytesMut`
/// split as records are consumed, so that `capacity` is the allocation held, which `release` compares
/// with what is left in it.
#[derive(Default)]
struct Received {
    buf: Vec<u8>,
    start: usize,
}

impl Received {
    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..]
    }

    fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Drops the first `n` bytes (rustls' `discard`: processed records); an emptied buffer is freed.
    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
        if self.start == self.buf.len() {
            self.buf = Vec::new();
            self.start = 0;
        }
    }

    /// The buffer to read into, with room for half a read at least: what is left is moved to the front
    /// first, then room for a whole read is added (exactly: the allocation stays under `MAX_INCOMING` plus
    /// a read).
    fn room(&mut self) -> &mut Vec<u8> {
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 2 {
            if self.start > 0 {
                self.buf.copy_within(self.start.., 0);
                self.buf.truncate(self.buf.len() - self.start);
                self.start = 0;
            }
            if self.buf.capacity() - self.buf.len() < READ_SIZE / 2 {
                self.buf.reserve_exact(READ_SIZE);
            }
        }
        &mut self.buf
    }

    /// For a session about to wait: frees the buffer if it is empty, and moves a partial record out of a
    /// buffer many times its size into one of its own.
    fn release(&mut self) {
        if self.len() == 0 {
            self.buf = Vec::new();
            self.start = 0;
        } else if self.buf.capacity() > SHRINK_FACTOR * self.len() {
            self.buf = self.bytes().to_vec();
            self.start = 0;
        }
    }
}

/// Copies a decrypted record to the reader's buffer, and what does not fit to the session's own.
fn deliver(payload: &[u8], out: &mut Option<&mut ReadBuf<'_>>, rest: &mut Vec<u8>) {
    let mut payload = payload;
    if rest.is_empty()
        && let Some(out) = out
    {
        let n = out.remaining().min(payload.len());
        out.put_slice(&payload[..n]);
        payload = &payload[n..];
    }
    rest.extend_from_slice(payload);
}

/// Room for the records `len` bytes of plaintext become: a header, a content type and a tag per record of
/// at most 16 KiB, with room to spare for TLS 1.2's explicit nonce.
fn overhead(len: usize) -> usize {
    (len / (16 << 10) + 1) * 64
}

/// Appends a handshake message or alert rustls has for the peer to `out`.
fn encode_into<D>(
    out: &mut Vec<u8>,
    guess: usize,
    encode: &mut EncodeTlsData<'_, D>,
) -> io::Result<()> {
    grow_into(out, guess, |buf| match encode.encode(buf) {
        Ok(n) => Ok(Ok(n)),
        Err(EncodeError::InsufficientSize(e)) => Ok(Err(e.required_size)),
        Err(e) => Err(io::Error::other(e.to_string())),
    })
}

/// Appends what `fill` writes to `out`, giving it `guess` bytes first and what it asks for if that is too
/// few. `fill` answers `Ok(n)` written, or `Err(required)`.
fn grow_into(
    out: &mut Vec<u8>,
    guess: usize,
    mut fill: impl FnMut(&mut [u8]) -> io::Result<Result<usize, usize>>,
) -> io::Result<()> {
    let start = out.len();
    let mut room = guess;
    for _ in 0..3 {
        out.resize(start + room, 0);
        match fill(&mut out[start..]) {
            Ok(Ok(n)) => {
                out.truncate(start + n);
                return Ok(());
            }
            Ok(Err(required)) => room = required,
            Err(error) => {
                out.truncate(start);
                return Err(error);
            }
        }
    }
    out.truncate(start);
    Err(io::Error::other(
        "TLS record does not fit the size rustls asked for",
    ))
}

fn tls_error(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsConnector;

    use super::*;

    const LIMIT: Duration = Duration::from_secs(10);

    struct Pair {
        server: ServerSession<TcpStream>,
        client: tokio_rustls::client::TlsStream<TcpStream>,
    }

    fn configs() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).expect("key"),
            )
            .expect("server config");
        server.ticketer = rustls::crypto::ring::Ticketer::new().expect("ticketer");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    async fn pair_with(server: Arc<ServerConfig>, client: Arc<rustls::ClientConfig>) -> Pair {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connecting = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let name = ServerName::try_from("localhost").expect("name");
            TlsConnector::from(client).connect(name, tcp).await
        });
        let (tcp, _) = listener.accept().await.expect("accept");
        let server = tokio::time::timeout(LIMIT, accept(tcp, server))
            .await
            .expect("handshake in time")
            .expect("server handshake");
        let client = connecting.await.expect("task").expect("client handshake");
        Pair { server, client }
    }

    async fn pair() -> Pair {
        let (server, client) = configs();
        pair_with(server, client).await
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Reads through `Transport` as a tunnel does: waits for readiness, then reads into a fresh buffer.
    async fn tunnel_read(
        session: &mut ServerSession<TcpStream>,
        buf: &mut [u8],
    ) -> io::Result<usize> {
        std::future::poll_fn(|cx| Transport::poll_read_ready(session, cx)).await?;
        std::future::poll_fn(|cx| Transport::poll_read(session, cx, buf)).await
    }

    #[tokio::test]
    async fn a_megabyte_each_way_arrives_whole_through_small_and_large_reads() {
        let Pair {
            mut server,
            mut client,
        } = pair().await;
        let data = pattern(1 << 20);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.expect("client write");
            client.flush().await.expect("flush");
            let mut back = vec![0u8; sent.len()];
            client.read_exact(&mut back).await.expect("client read");
            back
        });
        // Small reads: most records do not fit and wait in the session.
        let mut got = Vec::new();
        let mut small = [0u8; 100];
        while got.len() < data.len() {
            let n = tokio::time::timeout(LIMIT, server.read(&mut small))
                .await
                .expect("read in time")
                .expect("server read");
            assert!(n > 0, "early EOF at {}", got.len());
            got.extend_from_slice(&small[..n]);
        }
        assert!(got == data, "the client's bytes arrived changed");
        tokio::time::timeout(LIMIT, server.write_all(&data))
            .await
            .expect("write in time")
            .expect("server write");
        server.flush().await.expect("flush");
        let back = tokio::time::timeout(LIMIT, writer)
            .await
            .expect("in time")
            .expect("task");
        assert!(back == data, "the server's bytes arrived changed");
    }

    #[tokio::test]
    async fn an_idle_session_holds_no_buffer() {
        let Pair {
            mut server,
            mut client,
        } = pair().await;
        // Session tickets went out with the handshake: nothing is left queued.
        assert_eq!(server.buffered_capacity(), 0);
        let message = pattern(40_000);
        client.write_all(&message).await.expect("write");
        client.flush().await.expect("flush");
        let mut buf = vec![0u8; 32 << 10];
        let mut got = 0;
        while got < message.len() {
            let n = tokio::time::timeout(LIMIT, tunnel_read(&mut server, &mut buf))
                .await
                .expect("in time")
                .expect("read");
            assert_eq!(buf[..n], message[got..got + n]);
            got += n;
        }
        std::future::poll_fn(|cx| Transport::poll_write(&mut server, cx, &message))
            .await
            .expect("write");
        std::future::poll_fn(|cx| Transport::poll_flush(&mut server, cx))
            .await
            .expect("flush");
        let mut back = vec![0u8; 40_000];
        client.read_exact(&mut back).await.expect("echo");
        // Quiet again: a read finds nothing and gives every buffer back.
        let pending = std::future::poll_fn(|cx| {
            Poll::Ready(Transport::poll_read(&mut server, cx, &mut buf).is_pending())
        })
        .await;
        assert!(pending, "nothing was sent, yet a read completed");
        assert_eq!(
            server.buffered_capacity(),
            0,
            "an idle session kept a buffer"
        );
    }

    /// A partial record at the end of a full read is kept, while the tunnel waits for the rest, in a
    /// buffer of its own size rather than in the read's. (Before, the buffer's size was read after the
    /// processed records were split off its front, which counts only what is left: a partial record at the
    /// end of the buffer looked small enough to keep it.)
    #[tokio::test]
    async fn a_partial_record_waits_in_a_buffer_of_its_size() {
        let Pair { mut server, client } = pair().await;
        let (mut tcp, mut conn) = client.into_inner();
        let first = pattern(16 << 10);
        std::io::Write::write_all(&mut conn.writer(), &first).expect("plaintext");
        let mut wire = records(&mut conn);
        let overhead = wire.len() - first.len();
        // A second record sized so that the two whole records and `partial` bytes of a third fill one read.
        let partial = 100;
        let second = pattern(READ_SIZE - wire.len() - partial - overhead);
        std::io::Write::write_all(&mut conn.writer(), &second).expect("plaintext");
        wire.extend_from_slice(&records(&mut conn));
        let third = pattern(1000);
        std::io::Write::write_all(&mut conn.writer(), &third).expect("plaintext");
        let last = records(&mut conn);
        wire.extend_from_slice(&last[..partial]);
        assert_eq!(wire.len(), READ_SIZE);
        tcp.write_all(&wire).await.expect("send");
        let mut buf = vec![0u8; 64 << 10];
        let mut got = Vec::new();
        while got.len() < first.len() + second.len() {
            let n = tokio::time::timeout(LIMIT, tunnel_read(&mut server, &mut buf))
                .await
                .expect("in time")
                .expect("read");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, [first, second].concat());
        // The tunnel waits for more (the socket may still look readable after a full read: the read
        // that finds it empty says so): the partial record is all the session holds.
        let waiting = std::future::poll_fn(|cx| {
            let waiting = Transport::poll_read_ready(&mut server, cx).is_pending()
                || Transport::poll_read(&mut server, cx, &mut buf).is_pending();
            Poll::Ready(waiting)
        })
        .await;
        assert!(waiting, "data read from part of a record");
        let held = server.buffered_capacity();
        assert!(
            held <= SHRINK_FACTOR * partial,
            "{held} bytes held for a {partial}-byte partial record"
        );
        tcp.write_all(&last[partial..]).await.expect("send");
        let n = tokio::time::timeout(LIMIT, tunnel_read(&mut server, &mut buf))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(buf[..n], third);
    }

    /// A record that arrives a byte at a time is held until whole, then read.
    #[tokio::test]
    async fn a_record_trickled_byte_by_byte_is_read_whole() {
        let (server_config, client_config) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.expect("connect");
            let name = ServerName::try_from("localhost").expect("name");
            let mut tls = rustls::ClientConnection::new(client_config, name).expect("client");
            // The handshake, driven by hand over the socket.
            let mut wire = Vec::new();
            let mut buf = vec![0u8; 64 << 10];
            while tls.is_handshaking() {
                wire.clear();
                while tls.wants_write() {
                    tls.write_tls(&mut wire).expect("write_tls");
                }
                tcp.write_all(&wire).await.expect("send");
                if tls.is_handshaking() && tls.wants_read() {
                    let n = tcp.read(&mut buf).await.expect("recv");
                    tls.read_tls(&mut &buf[..n]).expect("read_tls");
                    tls.process_new_packets().expect("process");
                }
            }
            wire.clear();
            while tls.wants_write() {
                tls.write_tls(&mut wire).expect("write_tls");
            }
            tcp.write_all(&wire).await.expect("send");
            std::io::Write::write_all(&mut tls.writer(), b"trickled").expect("plaintext");
            wire.clear();
            tls.write_tls(&mut wire).expect("record");
            for byte in wire.iter() {
                tcp.write_all(std::slice::from_ref(byte))
                    .await
                    .expect("byte");
                tcp.flush().await.expect("flush");
                tokio::task::yield_now().await;
            }
            tcp
        });
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut server = tokio::time::timeout(LIMIT, accept(tcp, server_config))
            .await
            .expect("in time")
            .expect("handshake");
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(LIMIT, tunnel_read(&mut server, &mut buf))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(&buf[..n], b"trickled");
        drop(client.await.expect("client"));
    }

    #[tokio::test]
    async fn close_notify_ends_reads_cleanly_both_ways() {
        let Pair {
            mut server,
            mut client,
        } = pair().await;
        client.write_all(b"last words").await.expect("write");
        client.shutdown().await.expect("client close_notify");
        let mut got = Vec::new();
        tokio::time::timeout(LIMIT, server.read_to_end(&mut got))
            .await
            .expect("in time")
            .expect("a clean end, not an error");
        assert_eq!(got, b"last words");
        // The peer's close_notify does not stop this side from sending, then closing in order.
        server
            .write_all(b"goodbye")
            .await
            .expect("write after the peer closed");
        server.shutdown().await.expect("server close_notify");
        let mut got = Vec::new();
        tokio::time::timeout(LIMIT, client.read_to_end(&mut got))
            .await
            .expect("in time")
            .expect("the client saw close_notify before EOF");
        assert_eq!(got, b"goodbye");
    }

    #[tokio::test]
    async fn a_socket_closed_without_close_notify_is_an_unexpected_eof() {
        let Pair { mut server, client } = pair().await;
        let (mut tcp, _) = client.into_inner();
        tcp.shutdown().await.expect("FIN");
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(LIMIT, server.read(&mut buf))
            .await
            .expect("in time");
        assert_eq!(
            read.expect_err("a truncation is not a clean end").kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    /// A client that updates its keys (and asks the server to update its own) is followed both ways.
    #[tokio::test]
    async fn key_updates_are_followed() {
        let Pair {
            mut server,
            mut client,
        } = pair().await;
        for round in 0..3u8 {
            client
                .get_mut()
                .1
                .refresh_traffic_keys()
                .expect("key update");
            client.write_all(&[round; 100]).await.expect("write");
            client.flush().await.expect("flush");
            let mut buf = [0u8; 100];
            tokio::time::timeout(LIMIT, server.read_exact(&mut buf))
                .await
                .expect("in time")
                .expect("read after the key update");
            assert_eq!(buf, [round; 100]);
            server.write_all(&[round + 10; 100]).await.expect("write");
            server.flush().await.expect("flush");
            tokio::time::timeout(LIMIT, client.read_exact(&mut buf))
                .await
                .expect("in time")
                .expect("the server's answer under its new keys");
            assert_eq!(buf, [round + 10; 100]);
        }
    }

    #[tokio::test]
    async fn a_returning_client_resumes_from_its_ticket() {
        let (server, client) = configs();
        let Pair { client: first, .. } = pair_with(Arc::clone(&server), Arc::clone(&client)).await;
        assert_eq!(
            first.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
        // The tickets arrive after the handshake: read until they have.
        let mut first = first;
        let mut buf = [0u8; 1];
        let _ = tokio::time::timeout(Duration::from_millis(200), first.read(&mut buf)).await;
        let Pair {
            client: second,
            server: session,
        } = pair_with(server, client).await;
        assert_eq!(
            second.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
        assert_eq!(
            session.state().handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
    }

    /// The records a client connection has queued, as bytes for the wire.
    fn records(conn: &mut rustls::ClientConnection) -> Vec<u8> {
        let mut wire = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut wire).expect("write_tls");
        }
        wire
    }

    /// A record that does not decrypt, after one that does, arriving together: the good record's data
    /// is read whole (the reader's buffer is smaller than it), then every read fails. (Found by the
    /// `tls_session` fuzz target: the failing read dropped what it had put in the caller's buffer, and the
    /// next read returned the rest of the record, after the error.)
    #[tokio::test]
    async fn data_before_a_corrupt_record_is_read_then_reads_keep_failing() {
        let Pair { mut server, client } = pair().await;
        let (mut tcp, mut conn) = client.into_inner();
        let data = pattern(100);
        std::io::Write::write_all(&mut conn.writer(), &data).expect("plaintext");
        let mut wire = records(&mut conn);
        std::io::Write::write_all(&mut conn.writer(), &[7; 50]).expect("plaintext");
        let mut bad = records(&mut conn);
        bad[10] ^= 1;
        wire.extend_from_slice(&bad);
        tcp.write_all(&wire).await.expect("send");
        let mut got = Vec::new();
        let mut buf = [0u8; 10];
        let error = loop {
            let read = tokio::time::timeout(LIMIT, server.read(&mut buf))
                .await
                .expect("in time");
            match read {
                Ok(0) => panic!("EOF instead of an error"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(error) => break error,
            }
        };
        assert_eq!(got, data, "the data before the corrupt record");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        for _ in 0..2 {
            let again = tokio::time::timeout(LIMIT, server.read(&mut buf))
                .await
                .expect("in time");
            assert!(again.is_err(), "a read after the error: {again:?}");
        }
    }

    /// A session that failed does not call rustls again: the client gets one fatal alert however often
    /// the session is read and written after it. (Found by the `tls_session` fuzz target: each read
    /// processed the record that had failed once more, and rustls queued another alert; in a debug build
    /// rustls panics on the second, `assertion failed: !self.sent_fatal_alert`.)
    #[tokio::test]
    async fn a_failed_session_sends_one_alert_and_stays_failed() {
        let (server_config, client_config) = configs();
        // No tickets: after the handshake the server has nothing to send but the alert.
        let mut server_config = (*server_config).clone();
        server_config.send_tls13_tickets = 0;
        let Pair { mut server, client } = pair_with(Arc::new(server_config), client_config).await;
        let (mut tcp, mut conn) = client.into_inner();
        std::io::Write::write_all(&mut conn.writer(), b"corrupted").expect("plaintext");
        let mut wire = records(&mut conn);
        wire[8] ^= 1;
        tcp.write_all(&wire).await.expect("send");
        let mut buf = [0u8; 16];
        for _ in 0..3 {
            let read = tokio::time::timeout(LIMIT, server.read(&mut buf))
                .await
                .expect("in time");
            assert_eq!(
                read.expect_err("refused").kind(),
                io::ErrorKind::InvalidData
            );
        }
        assert!(
            server.write(b"more").await.is_err(),
            "a write after the error"
        );
        let _ = server.flush().await;
        drop(server);
        let mut answer = Vec::new();
        tokio::time::timeout(LIMIT, tcp.read_to_end(&mut answer))
            .await
            .expect("in time")
            .expect("the server's bytes");
        let mut count = 0;
        let mut rest = &answer[..];
        while rest.len() >= 5 {
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            rest = &rest[(5 + len).min(rest.len())..];
            count += 1;
        }
        assert_eq!(count, 1, "records after the failure: {answer:?}");
    }

    /// A tunnel waiting for readiness after reading the data that came with a failure is woken for the
    /// failure, not left waiting on a socket with nothing more to come. The client's 33rd key update in a
    /// row is refused (rustls' limit) and consumed, so no record is left to make the session readable.
    #[tokio::test]
    async fn a_tunnel_reads_the_data_then_the_failure_that_came_with_it() {
        let Pair { mut server, client } = pair().await;
        let (mut tcp, mut conn) = client.into_inner();
        let data = pattern(100);
        std::io::Write::write_all(&mut conn.writer(), &data).expect("plaintext");
        for _ in 0..33 {
            conn.refresh_traffic_keys().expect("key update");
        }
        tcp.write_all(&records(&mut conn)).await.expect("send");
        let mut got = Vec::new();
        let mut buf = [0u8; 10];
        let error = loop {
            let read = tokio::time::timeout(LIMIT, tunnel_read(&mut server, &mut buf))
                .await
                .expect("in time: readiness came");
            match read {
                Ok(0) => panic!("EOF instead of an error"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(error) => break error,
            }
        };
        assert_eq!(got, data, "the data before the refused key update");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        drop(tcp);
    }

    /// A record header announcing more than any record may hold is refused at once, with an alert, not
    /// waited for.
    #[tokio::test]
    async fn an_oversized_record_header_is_refused_at_once() {
        let Pair { mut server, client } = pair().await;
        let (mut tcp, _) = client.into_inner();
        tcp.write_all(&[23, 3, 3, 0xff, 0xff, 1, 2, 3])
            .await
            .expect("send");
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(LIMIT, server.read(&mut buf))
            .await
            .expect("refused without waiting for 64 KiB");
        assert_eq!(
            read.expect_err("refused").kind(),
            io::ErrorKind::InvalidData
        );
    }

    /// A handshake record holding the start of a ClientHello longer than rustls takes fails the handshake,
    /// and nothing panics. (Found by the `tls_session` fuzz target: rustls queues no alert for this
    /// error, so the session, asking for one with an empty buffer, made rustls look again for the message
    /// it was joining in place in the real buffer, and rustls panicked slicing past the end of the empty
    /// one.)
    #[tokio::test]
    async fn an_oversized_client_hello_is_refused_without_a_panic() {
        let (server_config, _) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (tcp, _) = listener.accept().await.expect("accept");
        // A handshake record of 8 bytes: a ClientHello announcing 0x046dec bytes (rustls takes 64 KiB at
        // most), and the first 4 of them.
        client
            .write_all(&[22, 3, 1, 0, 8, 1, 4, 0x6d, 0xec, 3, 3, 0, 0])
            .await
            .expect("send");
        let result = tokio::time::timeout(LIMIT, accept(tcp, server_config))
            .await
            .expect("in time");
        assert_eq!(
            result.err().expect("refused").kind(),
            io::ErrorKind::InvalidData
        );
        // The connection ends (rustls has no alert to send for this one).
        let mut answer = Vec::new();
        tokio::time::timeout(LIMIT, client.read_to_end(&mut answer))
            .await
            .expect("closed in time")
            .expect("read");
    }

    /// Bytes that are not TLS fail the handshake, and the peer hears why.
    #[tokio::test]
    async fn a_non_tls_client_gets_an_alert() {
        let (server_config, _) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (tcp, _) = listener.accept().await.expect("accept");
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        let result = tokio::time::timeout(LIMIT, accept(tcp, server_config))
            .await
            .expect("in time");
        assert!(result.is_err(), "plain HTTP was taken as TLS");
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(LIMIT, client.read_to_end(&mut answer)).await;
        assert_eq!(answer.first(), Some(&21), "no alert record: {answer:?}");
    }
}
