//! A TLS session over a socket, a client's (`accept`) or toward a backend (`connect`), driven through
//! rustls' unbuffered API, so that wsgate owns every buffer the session uses and holds none while the
//! session is quiet.
//!
//! rustls' buffered connection keeps a receive buffer (at least 4 KiB) and its queues for the session's
//! whole life, and an idle `wss://` tunnel would carry them as long as it stays open. Here the ciphertext
//! read from the socket, the plaintext not yet read by the caller and the ciphertext not yet written are
//! held only while there is something in them: each is given up once it is empty (`Buffers`; an emptied
//! read buffer waits in a per-thread slot for the thread's next read, `SPARE_READ_BUFFER`). Whatever
//! turns records into plaintext and back (`Engine`) uses those buffers: rustls' connection for the
//! handshake, then, for TLS 1.3, wsgate's record layer (`establish`, `record_layer.rs`), so that what an
//! idle session keeps is its traffic keys and the secret that derives the next ones.
//!
//! A tunnel waits on the socket's readiness before it borrows a read buffer (`websocket::Transport`); a
//! session knows what it holds, so it can say when a read would find data without trying one.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, UnbufferedStatus, WriteTraffic,
};
use rustls::{ClientConfig, CommonState, ExtractedSecrets, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::record_layer::{RecordLayer, Role};
use crate::websocket::{ParkedStream, Transport, input_waiting};

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
    type Data: Role;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;

    /// The traffic keys and what derives the next ones, for a record layer of wsgate's own
    /// (`RecordLayer::takes` says when rustls gives them).
    fn into_kernel(self)
    -> Result<(ExtractedSecrets, KernelConnection<Self::Data>), rustls::Error>;
}

impl Side for UnbufferedServerConnection {
    type Data = ServerConnectionData;

    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.process_tls_records(incoming)
    }

    fn into_kernel(
        self,
    ) -> Result<(ExtractedSecrets, KernelConnection<ServerConnectionData>), rustls::Error> {
        self.dangerous_into_kernel_connection()
    }
}

impl Side for UnbufferedClientConnection {
    type Data = ClientConnectionData;

    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.process_tls_records(incoming)
    }

    fn into_kernel(
        self,
    ) -> Result<(ExtractedSecrets, KernelConnection<ClientConnectionData>), rustls::Error> {
        self.dangerous_into_kernel_connection()
    }
}

/// A client's TLS session, as wsgate's listeners accept it.
pub type ServerSession<IO> = TlsSession<UnbufferedServerConnection, IO>;

/// A TLS session toward a backend, as wsgate connects it.
pub type ClientSession<IO> = TlsSession<UnbufferedClientConnection, IO>;

/// Makes a TLS handshake as the server over `io` and returns the session once it is complete. With the
/// config's `enable_secret_extraction`, a TLS 1.3 session may later be handed to wsgate's own record layer
/// (`TlsSession::establish`).
pub async fn accept<IO>(io: IO, config: Arc<ServerConfig>) -> io::Result<ServerSession<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let may_hand_over = config.enable_secret_extraction;
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut session = TlsSession::new(conn, io);
    session.may_hand_over = may_hand_over;
    std::future::poll_fn(|cx| session.poll_handshake(cx)).await?;
    Ok(session)
}

/// Makes a TLS handshake as the client of `name` over `io` and returns the session once it is complete;
/// as `accept` for the config's `enable_secret_extraction`.
pub async fn connect<IO>(
    io: IO,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> io::Result<ClientSession<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let may_hand_over = config.enable_secret_extraction;
    let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    let mut session = TlsSession::new(conn, io);
    session.may_hand_over = may_hand_over;
    std::future::poll_fn(|cx| session.poll_handshake(cx)).await?;
    Ok(session)
}

/// Writes into `outgoing` once the session may send application data (`process_records`).
type Encrypt<'a, D> = dyn FnMut(&mut WriteTraffic<'_, D>, &mut Vec<u8>) -> io::Result<()> + 'a;

/// What processing the received records came to.
pub enum Step {
    /// Everything complete has been processed; more bytes are needed (also while the handshake runs).
    Blocked,
    /// Both sides have sent `close_notify`.
    Closed,
}

/// What turns a session's ciphertext into plaintext and back: rustls' unbuffered connection (any `Side`:
/// the handshake, then TLS 1.2 or 1.3 traffic), or wsgate's own record layer for an established TLS 1.3
/// session (`RecordLayer`), which keeps only what traffic needs.
pub trait Engine {
    /// Whether the handshake is still under way.
    fn handshaking(&self) -> bool;

    /// Processes the whole records in `bufs.incoming` until more bytes are needed: decrypted data goes to
    /// `out` while it has room, the rest to `bufs.plaintext`; what the peer is answered (handshake
    /// messages, a key update) is queued on `bufs.outgoing`. After an error, the alert telling the peer why
    /// is queued too (if there is one), and the session is over.
    fn process(&mut self, bufs: &mut Buffers, out: Option<&mut ReadBuf<'_>>) -> io::Result<Step>;

    /// Encrypts `data` onto `bufs.outgoing`; `false` if the session cannot send application data (yet).
    fn encrypt(&mut self, bufs: &mut Buffers, data: &[u8]) -> io::Result<bool>;

    /// Queues this side's `close_notify` on `bufs.outgoing`.
    fn close_notify(&mut self, bufs: &mut Buffers) -> io::Result<()>;
}

/// What a session holds between calls, whichever engine drives it.
#[derive(Default)]
pub struct Buffers {
    /// Ciphertext read and not yet processed: a partial record, usually nothing (and then no allocation).
    pub(super) incoming: Received,
    /// Plaintext decrypted and not yet read, from `plain_pos` on (a record larger than the caller's buffer).
    pub(super) plaintext: Vec<u8>,
    plain_pos: usize,
    /// Ciphertext to write, from `sent` on: records and handshake messages, in order. Freed once written,
    /// so empty with no capacity whenever nothing waits.
    pub(super) outgoing: Vec<u8>,
    sent: usize,
    /// The peer has sent `close_notify`: reads return EOF once `plaintext` is empty.
    pub(super) peer_closed: bool,
}

impl Buffers {
    fn has_plaintext(&self) -> bool {
        self.plain_pos < self.plaintext.len()
    }

    fn has_unsent(&self) -> bool {
        self.sent < self.outgoing.len()
    }
}

pub struct TlsSession<C, IO> {
    conn: C,
    io: IO,
    bufs: Buffers,
    /// The socket reached EOF.
    eof: bool,
    /// Our `close_notify` has been queued.
    close_queued: bool,
    /// The config the session was accepted with lets rustls hand its keys over (`establish`).
    may_hand_over: bool,
    /// Processing failed (the engine refused what the peer sent and queued its alert, or reached a state
    /// the session cannot handle): the session is over. The engine is not called again (rustls would
    /// refuse the same record again and queue a second fatal alert); reads return the plaintext decrypted
    /// before the failure, then this error every time, and writes fail with it.
    failed: Option<(io::ErrorKind, String)>,
}

impl<C, IO> TlsSession<C, IO> {
    fn new(conn: C, io: IO) -> TlsSession<C, IO> {
        TlsSession {
            conn,
            io,
            bufs: Buffers::default(),
            eof: false,
            close_queued: false,
            may_hand_over: false,
            failed: None,
        }
    }

    /// The socket underneath.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// The same session over another stream (the socket out of a wrapper that is no longer needed).
    pub fn map_io<T>(self, f: impl FnOnce(IO) -> T) -> TlsSession<C, T> {
        let Ok(session) = self.try_map_io(|io| Ok::<_, std::convert::Infallible>(f(io)));
        session
    }

    /// The same session over the stream `f` makes of this one, if it can (the socket in and out of the
    /// runtime's reactor, for the park).
    pub fn try_map_io<T, E>(
        self,
        f: impl FnOnce(IO) -> Result<T, E>,
    ) -> Result<TlsSession<C, T>, E> {
        let (conn, rest) = self.split();
        rest.join(conn, f)
    }

    /// The engine apart from the rest of the session.
    fn split(self) -> (C, TlsSession<(), IO>) {
        let TlsSession {
            conn,
            io,
            bufs,
            eof,
            close_queued,
            may_hand_over,
            failed,
        } = self;
        let rest = TlsSession {
            conn: (),
            io,
            bufs,
            eof,
            close_queued,
            may_hand_over,
            failed,
        };
        (conn, rest)
    }

    /// Bytes of buffer the session holds now (allocated capacity): zero while it is quiet. For tests and
    /// fuzzing (`wsgate::internals`), which check that a quiet session holds none and a busy one a bounded
    /// amount.
    pub fn buffered_capacity(&self) -> usize {
        self.bufs.incoming.capacity()
            + self.bufs.plaintext.capacity()
            + self.bufs.outgoing.capacity()
    }

    /// Whether processing `incoming` could make progress: it holds a whole record, or a record header
    /// the engine would refuse (a length no record may have), which is better refused at once than waited
    /// for.
    fn has_record(&self) -> bool {
        let held = self.bufs.incoming.bytes();
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
}

impl<C: Side, IO> TlsSession<C, IO> {
    /// rustls' view of the session: ALPN, protocol version, cipher suite.
    pub fn state(&self) -> &CommonState {
        &self.conn
    }

    /// The session for the rest of its life, its handshake over: wsgate's record layer takes it over
    /// where rustls can hand it over (TLS 1.3, the config allowing it, nothing left to send), so that what
    /// stays is the traffic keys rather than rustls' whole connection; else it stays rustls'. `Lost` only
    /// if rustls refused the hand-over after all (`RecordLayer::takes` asks first).
    pub fn establish(self) -> Established<C, IO> {
        if !self.may_hand_over || self.failed.is_some() || !RecordLayer::takes(&self.conn) {
            return Established::Rustls(Box::new(self));
        }
        let (conn, rest) = self.split();
        match RecordLayer::take(conn) {
            Ok(layer) => {
                let Ok(session) = rest.join(layer, Ok::<_, std::convert::Infallible>);
                Established::Own(Box::new(session))
            }
            Err(error) => {
                tracing::warn!(%error, "TLS session lost when handed to wsgate's record layer");
                Established::Lost(Box::new(rest.io))
            }
        }
    }
}

impl<IO> TlsSession<(), IO> {
    /// The session with `conn` as its engine, over the stream `io` makes of its own.
    fn join<C, T, E>(
        self,
        conn: C,
        io: impl FnOnce(IO) -> Result<T, E>,
    ) -> Result<TlsSession<C, T>, E> {
        Ok(TlsSession {
            conn,
            io: io(self.io)?,
            bufs: self.bufs,
            eof: self.eof,
            close_queued: self.close_queued,
            may_hand_over: self.may_hand_over,
            failed: self.failed,
        })
    }
}

/// A session after `establish`. Boxed either way: rustls' connection is most of a session kept by
/// rustls, and inline the session would move a tunnel's task into a size class twice that of a plain
/// tunnel's.
pub enum Established<C: Side, IO> {
    /// wsgate's own record layer.
    Own(Box<TlsSession<RecordLayer<C::Data>, IO>>),
    /// rustls' connection (TLS 1.2).
    Rustls(Box<TlsSession<C, IO>>),
    /// rustls refused to hand the session over: every read and write fails, and the connection ends.
    /// The stream is kept for what is asked of it (its socket's address).
    Lost(Box<IO>),
}

impl<C: Side, IO> Established<C, IO> {
    /// The stream underneath.
    pub fn get_ref(&self) -> &IO {
        match self {
            Established::Own(session) => session.get_ref(),
            Established::Rustls(session) => session.get_ref(),
            Established::Lost(io) => io,
        }
    }

    /// The same session over another stream (the socket out of a wrapper that is no longer needed).
    pub fn map_io<T>(self, f: impl FnOnce(IO) -> T) -> Established<C, T> {
        let Ok(session) = self.try_map_io(|io| Ok::<_, std::convert::Infallible>(f(io)));
        session
    }

    /// The same session over the stream `f` makes of this one, if it can (`TlsSession::try_map_io`).
    pub fn try_map_io<T, E>(
        self,
        f: impl FnOnce(IO) -> Result<T, E>,
    ) -> Result<Established<C, T>, E> {
        Ok(match self {
            Established::Own(session) => Established::Own(Box::new(session.try_map_io(f)?)),
            Established::Rustls(session) => Established::Rustls(Box::new(session.try_map_io(f)?)),
            Established::Lost(io) => Established::Lost(Box::new(f(*io)?)),
        })
    }
}

/// The same call on whichever engine the session kept; `lost` for a session that was lost.
macro_rules! established {
    ($session:expr, $s:ident => $call:expr, lost => $lost:expr) => {
        match $session {
            Established::Own($s) => $call,
            Established::Rustls($s) => $call,
            Established::Lost(_) => $lost,
        }
    };
}

impl<C: Side + Unpin, IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Established<C, IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        established!(
            self.get_mut(),
            s => Pin::new(&mut **s).poll_read(cx, buf),
            lost => Poll::Ready(Err(lost()))
        )
    }
}

impl<C: Side + Unpin, IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Established<C, IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        established!(
            self.get_mut(),
            s => Pin::new(&mut **s).poll_write(cx, buf),
            lost => Poll::Ready(Err(lost()))
        )
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        established!(
            self.get_mut(),
            s => Pin::new(&mut **s).poll_flush(cx),
            lost => Poll::Ready(Err(lost()))
        )
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        established!(
            self.get_mut(),
            s => Pin::new(&mut **s).poll_shutdown(cx),
            lost => Poll::Ready(Ok(()))
        )
    }
}

impl<C: Engine, IO> TlsSession<C, IO> {
    /// Runs `step` on the engine unless the session has failed; an error it returns is the session's
    /// failure from then on.
    fn guarded<T>(
        &mut self,
        step: impl FnOnce(&mut C, &mut Buffers) -> io::Result<T>,
    ) -> io::Result<T> {
        if let Some(error) = self.failure() {
            return Err(error);
        }
        let result = step(&mut self.conn, &mut self.bufs);
        if let Err(error) = &result {
            self.failed = Some((error.kind(), error.to_string()));
        }
        result
    }

    fn process(&mut self, out: Option<&mut ReadBuf<'_>>) -> io::Result<Step> {
        self.guarded(|conn, bufs| conn.process(bufs, out))
    }

    /// Encrypts as much of `data` as one write takes into `outgoing`; returns how much that is.
    fn encrypt(&mut self, data: &[u8]) -> io::Result<usize> {
        let take = data.len().min(WRITE_SIZE);
        if !self.guarded(|conn, bufs| conn.encrypt(bufs, &data[..take]))? {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the TLS session cannot send application data",
            ));
        }
        Ok(take)
    }

    /// Queues this side's `close_notify` (once; nothing if the session cannot send any more).
    fn queue_close_notify(&mut self) {
        if self.close_queued {
            return;
        }
        self.close_queued = true;
        // A session that already failed has nothing left to close properly.
        let _ = self.guarded(|conn, bufs| conn.close_notify(bufs));
    }
}

/// rustls drives the session: every record goes through its connection.
impl<C: Side> Engine for C {
    fn handshaking(&self) -> bool {
        let state: &CommonState = self;
        state.is_handshaking()
    }

    fn process(&mut self, bufs: &mut Buffers, out: Option<&mut ReadBuf<'_>>) -> io::Result<Step> {
        process_records(self, bufs, out, None)
    }

    fn encrypt(&mut self, bufs: &mut Buffers, data: &[u8]) -> io::Result<bool> {
        let mut done = false;
        let mut write = |traffic: &mut WriteTraffic<'_, C::Data>, outgoing: &mut Vec<u8>| {
            done = true;
            grow_into(
                outgoing,
                data.len() + overhead(data.len()),
                |buf| match traffic.encrypt(data, buf) {
                    Ok(n) => Ok(Ok(n)),
                    Err(EncryptError::InsufficientSize(e)) => Ok(Err(e.required_size)),
                    Err(e) => Err(io::Error::other(e.to_string())),
                },
            )
        };
        process_records(self, bufs, None, Some(&mut write))?;
        Ok(done)
    }

    fn close_notify(&mut self, bufs: &mut Buffers) -> io::Result<()> {
        let mut write = |traffic: &mut WriteTraffic<'_, C::Data>, outgoing: &mut Vec<u8>| {
            grow_into(outgoing, 64, |buf| match traffic.queue_close_notify(buf) {
                Ok(n) => Ok(Ok(n)),
                Err(EncryptError::InsufficientSize(e)) => Ok(Err(e.required_size)),
                Err(e) => Err(io::Error::other(e.to_string())),
            })
        };
        process_records(self, bufs, None, Some(&mut write)).map(drop)
    }
}

/// Processes every whole record received through rustls, until it wants more bytes. With `write`, also
/// encrypts into `outgoing` once the session may send.
fn process_records<C: Side>(
    conn: &mut C,
    bufs: &mut Buffers,
    mut out: Option<&mut ReadBuf<'_>>,
    mut write: Option<&mut Encrypt<'_, C::Data>>,
) -> io::Result<Step> {
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process(bufs.incoming.bytes_mut());
        let state = match state {
            Ok(state) => state,
            Err(error) => {
                bufs.incoming.consume(discard);
                queue_alerts(conn, &mut bufs.outgoing);
                return Err(tls_error(error));
            }
        };
        let step = match state {
            ConnectionState::ReadTraffic(mut records) => {
                while let Some(record) = records.next_record() {
                    let record = record.map_err(tls_error)?;
                    discard += record.discard;
                    deliver(record.payload, &mut out, &mut bufs.plaintext);
                }
                None
            }
            ConnectionState::EncodeTlsData(mut encode) => {
                encode_into(&mut bufs.outgoing, 512, &mut encode)?;
                None
            }
            // What was encoded sits in `outgoing`, which is written before the session waits on anything:
            // for rustls it is as good as sent.
            ConnectionState::TransmitTlsData(transmit) => {
                transmit.done();
                None
            }
            ConnectionState::PeerClosed => {
                bufs.peer_closed = true;
                None
            }
            ConnectionState::Closed => {
                bufs.peer_closed = true;
                Some(Step::Closed)
            }
            ConnectionState::WriteTraffic(mut traffic) => {
                if let Some(write) = write.take() {
                    write(&mut traffic, &mut bufs.outgoing)?;
                }
                Some(Step::Blocked)
            }
            ConnectionState::BlockedHandshake => Some(Step::Blocked),
            // Early data (0-RTT) is never enabled (`max_early_data_size` stays 0), and rustls adds states
            // only in new versions: neither can be handled here.
            other => {
                return Err(io::Error::other(format!("unexpected TLS state {other:?}")));
            }
        };
        bufs.incoming.consume(discard);
        if let Some(step) = step {
            return Ok(step);
        }
    }
}

/// After a fatal error rustls has the alert that tells the peer why: queue it, to be written if the socket
/// takes it at once. rustls is asked only while it has something to send (it hands that out before it
/// looks at any record): with nothing queued it would go back to the records, given none here, and a
/// handshake message it was joining in place in the real buffer would be looked for past the end of the
/// empty one (rustls panics). The session is over, so what was encoded needs no `TransmitTlsData::done`.
fn queue_alerts<C: Side>(conn: &mut C, outgoing: &mut Vec<u8>) {
    for _ in 0..4 {
        if !conn.wants_write() {
            return;
        }
        let status = conn.process(&mut []);
        let Ok(ConnectionState::EncodeTlsData(mut encode)) = status.state else {
            return;
        };
        if encode_into(outgoing, 64, &mut encode).is_err() {
            return;
        }
    }
}

impl<C: Engine, IO: AsyncRead + AsyncWrite + Unpin> TlsSession<C, IO> {
    /// Writes `outgoing` to the socket; ready once it is all written (and then freed).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.bufs.has_unsent() {
            let n = ready!(
                Pin::new(&mut self.io).poll_write(cx, &self.bufs.outgoing[self.bufs.sent..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.bufs.sent += n;
        }
        if self.bufs.outgoing.capacity() > 0 {
            self.bufs.outgoing = Vec::new();
            self.bufs.sent = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// Reads more ciphertext into `incoming`; the count read, 0 at EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.bufs.incoming.len() >= MAX_INCOMING {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS peer sent more than a record or handshake message can hold",
            )));
        }
        let room = self.bufs.incoming.room();
        let read = match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, room) {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(error)) => {
                self.bufs.incoming.release();
                return Poll::Ready(Err(error));
            }
            // Nothing came: a quiet session gives its read buffer back.
            Poll::Pending => {
                self.bufs.incoming.release();
                return Poll::Pending;
            }
        };
        if read == 0 {
            self.eof = true;
            self.bufs.incoming.release();
        }
        Poll::Ready(Ok(read))
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let step = match self.process(None) {
                Ok(step) => step,
                Err(error) => {
                    // Best effort: the alert goes out if the socket takes it now.
                    let _ = self.poll_send(cx);
                    return Poll::Ready(Err(error));
                }
            };
            ready!(self.poll_send(cx))?;
            if !self.conn.handshaking() {
                return Poll::Ready(Ok(()));
            }
            if matches!(step, Step::Closed) || self.bufs.peer_closed || self.eof {
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
            if self.bufs.has_plaintext() {
                let n = out
                    .remaining()
                    .min(self.bufs.plaintext.len() - self.bufs.plain_pos);
                out.put_slice(&self.bufs.plaintext[self.bufs.plain_pos..self.bufs.plain_pos + n]);
                self.bufs.plain_pos += n;
                if !self.bufs.has_plaintext() {
                    self.bufs.plaintext = Vec::new();
                    self.bufs.plain_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(error) = self.failure() {
                return Poll::Ready(Err(error));
            }
            if self.has_record() {
                let processed = self.process(Some(out));
                // Whatever processing queued (a key update's answer, an alert) goes out now if the socket
                // takes it, else with the next write or read.
                let sent = if self.bufs.has_unsent() {
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
                if self.bufs.has_plaintext() {
                    continue;
                }
            }
            if self.bufs.peer_closed {
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
        if !self.conn.handshaking() {
            self.queue_close_notify();
        }
        ready!(self.poll_send(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<C: Engine + Unpin, IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsSession<C, IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().poll_read_plain(cx, buf)
    }
}

impl<C: Engine + Unpin, IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsSession<C, IO> {
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
impl<C: Engine + Unpin + Send + 'static> Transport for TlsSession<C, TcpStream> {
    /// The session over its socket out of the reactor: keys, sequence numbers and state stay as they
    /// are, and no buffer goes along (`settled`).
    type Parked = TlsSession<C, std::net::TcpStream>;

    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A failure is ready too: the record that caused it may be gone (rustls consumed it).
        if self.bufs.has_plaintext()
            || self.has_record()
            || self.bufs.peer_closed
            || self.eof
            || self.failed.is_some()
        {
            return Poll::Ready(Ok(()));
        }
        // Anything still queued (session tickets, a key update's answer) is written while the tunnel waits.
        if self.bufs.has_unsent() {
            let _ = self.poll_send(cx)?;
        }
        let ready = self.io.poll_read_ready(cx);
        if ready.is_pending() {
            // The tunnel waits: a partial record is kept in a buffer of its own size.
            self.bufs.incoming.release();
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

    fn parkable(&self) -> bool {
        true
    }

    /// A read stops after a record that carried no data, and tokio may take the socket for empty after
    /// a short read: the kernel is asked.
    fn more_waiting(&self) -> bool {
        input_waiting(&self.io)
    }

    /// Quiet: no buffer held (no partial record, plaintext or unsent record), and nothing ending.
    fn settled(&self) -> bool {
        self.buffered_capacity() == 0
            && !self.eof
            && !self.bufs.peer_closed
            && !self.close_queued
            && self.failed.is_none()
    }

    fn into_parked(self) -> io::Result<Self::Parked> {
        self.try_map_io(TcpStream::into_std)
    }

    fn from_parked(parked: Self::Parked) -> io::Result<Self> {
        // `into_std` left the socket non-blocking, as the reactor needs it.
        parked.try_map_io(TcpStream::from_std)
    }
}

impl<C: Send + 'static> ParkedStream for TlsSession<C, std::net::TcpStream> {
    fn socket(&self) -> &std::net::TcpStream {
        &self.io
    }
}

/// A tunnel over an established session: whichever engine it kept.
impl<C: Side + Unpin + Send + 'static> Transport for Established<C, TcpStream>
where
    C::Data: Send + Sync,
{
    type Parked = Established<C, std::net::TcpStream>;

    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        established!(self, s => s.poll_read_ready(cx), lost => Poll::Ready(Ok(())))
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        established!(self, s => Transport::poll_read(s, cx, buf), lost => Poll::Ready(Err(lost())))
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        established!(self, s => Transport::poll_write(s, cx, buf), lost => Poll::Ready(Err(lost())))
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        established!(self, s => Transport::poll_flush(s, cx), lost => Poll::Ready(Err(lost())))
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        established!(self, s => Transport::poll_shutdown(s, cx), lost => Poll::Ready(Ok(())))
    }

    /// Either engine's session parks; a lost one ends.
    fn parkable(&self) -> bool {
        !matches!(self, Established::Lost(_))
    }

    fn more_waiting(&self) -> bool {
        established!(self, s => s.more_waiting(), lost => false)
    }

    fn settled(&self) -> bool {
        established!(self, s => s.settled(), lost => false)
    }

    fn into_parked(self) -> io::Result<Self::Parked> {
        self.try_map_io(TcpStream::into_std)
    }

    fn from_parked(parked: Self::Parked) -> io::Result<Self> {
        parked.try_map_io(TcpStream::from_std)
    }
}

impl<C: Side + Send + 'static> ParkedStream for Established<C, std::net::TcpStream>
where
    C::Data: Send + Sync,
{
    fn socket(&self) -> &std::net::TcpStream {
        self.get_ref()
    }
}

fn lost() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "TLS session lost at the hand-over",
    )
}

thread_local! {
    /// One empty read buffer per thread (`READ_SIZE`), for the next session on the thread that reads. A
    /// session gives its buffer up whenever it is emptied or the session waits, so that quiet sessions
    /// hold none; a busy connection empties and refills it several times per request (every read that
    /// finds nothing included), and without this slot each refill would allocate and free 32 KiB again.
    /// At most one per thread, whatever the number of sessions.
    static SPARE_READ_BUFFER: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Ciphertext read and not yet processed: `buf[start..]`. A `Vec` with a start rather than a `BytesMut`
/// split as records are consumed, so that `capacity` is the allocation held, which `release` compares
/// with what is left in it.
#[derive(Default)]
pub struct Received {
    buf: Vec<u8>,
    start: usize,
}

impl Received {
    pub(super) fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..]
    }

    pub(super) fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Drops the first `n` bytes (rustls' `discard`: processed records); an emptied buffer is given up.
    pub(super) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
        if self.start == self.buf.len() {
            self.give_up();
        }
    }

    /// Gives the (empty) buffer up: to the thread's spare slot if it is the usual size, else freed.
    fn give_up(&mut self) {
        self.start = 0;
        spare(std::mem::take(&mut self.buf));
    }

    /// The buffer to read into, with room for half a read at least: what is left is moved to the front
    /// first, then room for a whole read is added (exactly: the allocation stays under `MAX_INCOMING` plus
    /// a read).
    fn room(&mut self) -> &mut Vec<u8> {
        if self.buf.capacity() == 0 {
            // Empty if the thread is past its thread-locals (nothing reads then).
            self.buf = SPARE_READ_BUFFER.try_with(Cell::take).unwrap_or_default();
            self.buf.clear();
        }
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

    /// For a session about to wait: gives the buffer up if it is empty (`give_up`), and moves a partial
    /// record out of a buffer many times its size into one of its own.
    fn release(&mut self) {
        if self.len() == 0 {
            self.give_up();
        } else if self.buf.capacity() > SHRINK_FACTOR * self.len() {
            let own = self.bytes().to_vec();
            self.start = 0;
            spare(std::mem::replace(&mut self.buf, own));
        }
    }
}

/// Keeps an emptied read buffer of the usual size in the thread's slot (`SPARE_READ_BUFFER`); frees any
/// other.
fn spare(buf: Vec<u8>) {
    if buf.capacity() == READ_SIZE {
        // Past the thread's thread-locals the buffer is simply freed.
        let _ = SPARE_READ_BUFFER.try_with(|slot| slot.set(buf));
    }
}

/// Copies a decrypted record to the reader's buffer, and what does not fit to the session's own.
pub(super) fn deliver(payload: &[u8], out: &mut Option<&mut ReadBuf<'_>>, rest: &mut Vec<u8>) {
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
pub(super) fn overhead(len: usize) -> usize {
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

pub(super) fn tls_error(error: rustls::Error) -> io::Error {
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

    /// A server session handed to wsgate's record layer.
    type OwnServer = TlsSession<RecordLayer<ServerConnectionData>, TcpStream>;

    /// How a test has its server session driven: kept by rustls, or handed to wsgate's record layer.
    type Make<C> = fn(ServerSession<TcpStream>) -> TlsSession<C, TcpStream>;

    fn kept(session: ServerSession<TcpStream>) -> ServerSession<TcpStream> {
        session
    }

    fn own(session: ServerSession<TcpStream>) -> OwnServer {
        match session.establish() {
            Established::Own(session) => *session,
            Established::Rustls(_) => panic!("a TLS 1.3 session stayed with rustls"),
            Established::Lost(_) => panic!("the session was lost at the hand-over"),
        }
    }

    /// Runs each listed test twice: with the session kept by rustls, and handed to the record layer.
    macro_rules! with_both_engines {
        ($($test:ident),* $(,)?) => {$(
            mod $test {
                #[tokio::test]
                async fn rustls() {
                    super::$test(super::kept).await
                }

                #[tokio::test]
                async fn own_records() {
                    super::$test(super::own).await
                }
            }
        )*};
    }

    with_both_engines!(
        a_megabyte_each_way_arrives_whole_through_small_and_large_reads,
        an_idle_session_holds_no_buffer,
        a_partial_record_waits_in_a_buffer_of_its_size,
        a_record_trickled_byte_by_byte_is_read_whole,
        close_notify_ends_reads_cleanly_both_ways,
        a_socket_closed_without_close_notify_is_an_unexpected_eof,
        key_updates_are_followed,
        data_before_a_corrupt_record_is_read_then_reads_keep_failing,
        a_failed_session_sends_one_alert_and_stays_failed,
        a_tunnel_reads_the_data_then_the_failure_that_came_with_it,
        an_oversized_record_header_is_refused_at_once,
    );

    struct Pair {
        server: ServerSession<TcpStream>,
        client: tokio_rustls::client::TlsStream<TcpStream>,
    }

    fn configs() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        configs_with(rustls::DEFAULT_VERSIONS)
    }

    /// A server's config and one for a client that trusts it and offers `client_versions`.
    fn configs_with(
        client_versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
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
        server.enable_secret_extraction = true;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).expect("root");
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(client_versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        // For the tests that seal records of their own with the client's keys (`RawClient`).
        client.enable_secret_extraction = true;
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
    async fn tunnel_read<C: Engine + Unpin + Send + 'static>(
        session: &mut TlsSession<C, TcpStream>,
        buf: &mut [u8],
    ) -> io::Result<usize> {
        std::future::poll_fn(|cx| Transport::poll_read_ready(session, cx)).await?;
        std::future::poll_fn(|cx| Transport::poll_read(session, cx, buf)).await
    }

    async fn a_megabyte_each_way_arrives_whole_through_small_and_large_reads<
        C: Engine + Unpin + Send + 'static,
    >(
        make: Make<C>,
    ) {
        let Pair { server, mut client } = pair().await;
        let mut server = make(server);
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

    /// An emptied read buffer of the usual size waits in the thread's slot for the next read, and one of
    /// another size (grown for a large handshake message) is freed rather than kept.
    #[test]
    fn an_emptied_read_buffer_is_kept_for_the_next_read() {
        SPARE_READ_BUFFER.with(Cell::take);
        let mut first = Received::default();
        first.room().extend_from_slice(b"record");
        let held = first.buf.as_ptr();
        first.consume(6);
        assert_eq!(
            first.capacity(),
            0,
            "an emptied buffer stayed with its session"
        );
        let mut second = Received::default();
        let room = second.room();
        assert!(room.is_empty());
        assert_eq!(room.capacity(), READ_SIZE);
        assert_eq!(
            room.as_ptr(),
            held,
            "the next read allocated a buffer of its own"
        );
        // Taken: the slot is empty until the buffer is given up again.
        assert_eq!(SPARE_READ_BUFFER.with(Cell::take).capacity(), 0);
        second.room().resize(READ_SIZE, 0);
        second.room();
        assert!(second.capacity() > READ_SIZE);
        second.release();
        second.consume(READ_SIZE);
        assert_eq!(
            SPARE_READ_BUFFER.with(Cell::take).capacity(),
            0,
            "a grown buffer was kept"
        );
        // A partial record moved into a buffer of its own leaves the usual one to the slot.
        let mut third = Received::default();
        third.room().extend_from_slice(b"part of a record");
        let usual = third.buf.as_ptr();
        third.release();
        assert_eq!(third.bytes(), b"part of a record");
        assert!(third.capacity() < READ_SIZE);
        let kept = SPARE_READ_BUFFER.with(Cell::take);
        assert_eq!(
            (kept.capacity(), kept.as_ptr()),
            (READ_SIZE, usual),
            "the buffer the record left was not kept"
        );
    }

    async fn an_idle_session_holds_no_buffer<C: Engine + Unpin + Send + 'static>(make: Make<C>) {
        let Pair { server, mut client } = pair().await;
        let mut server = make(server);
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
        // Settled, so its tunnel may park it: out of the reactor and back, it is the same session.
        assert!(Transport::settled(&server));
        let parked = server.into_parked().expect("out of the reactor");
        let mut server = TlsSession::from_parked(parked).expect("back in the reactor");
        assert!(!Transport::more_waiting(&server), "nothing sent yet");
        client.write_all(b"after the park").await.expect("write");
        client.flush().await.expect("flush");
        // The kernel is asked, whatever the reactor (which has not reported the socket yet) says.
        tokio::time::timeout(LIMIT, async {
            while !Transport::more_waiting(&server) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the record seen waiting in the socket");
        let n = tokio::time::timeout(LIMIT, tunnel_read(&mut server, &mut buf))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(&buf[..n], b"after the park");
        assert!(!Transport::more_waiting(&server), "all of it was read");
        std::future::poll_fn(|cx| Transport::poll_write(&mut server, cx, b"and back"))
            .await
            .expect("write");
        std::future::poll_fn(|cx| Transport::poll_flush(&mut server, cx))
            .await
            .expect("flush");
        let mut back = [0u8; 8];
        client.read_exact(&mut back).await.expect("echo");
        assert_eq!(&back, b"and back");
    }

    /// A partial record at the end of a full read is kept, while the tunnel waits for the rest, in a
    /// buffer of its own size rather than in the read's. (Before, the buffer's size was read after the
    /// processed records were split off its front, which counts only what is left: a partial record at the
    /// end of the buffer looked small enough to keep it.)
    async fn a_partial_record_waits_in_a_buffer_of_its_size<C: Engine + Unpin + Send + 'static>(
        make: Make<C>,
    ) {
        let Pair { server, client } = pair().await;
        let mut server = make(server);
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
        assert!(
            !Transport::settled(&server),
            "a session holding part of a record may not park"
        );
        tcp.write_all(&last[partial..]).await.expect("send");
        let n = tokio::time::timeout(LIMIT, tunnel_read(&mut server, &mut buf))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(buf[..n], third);
    }

    /// A record that arrives a byte at a time is held until whole, then read.
    async fn a_record_trickled_byte_by_byte_is_read_whole<C: Engine + Unpin + Send + 'static>(
        make: Make<C>,
    ) {
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
        let server = tokio::time::timeout(LIMIT, accept(tcp, server_config))
            .await
            .expect("in time")
            .expect("handshake");
        let mut server = make(server);
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(LIMIT, tunnel_read(&mut server, &mut buf))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(&buf[..n], b"trickled");
        drop(client.await.expect("client"));
    }

    async fn close_notify_ends_reads_cleanly_both_ways<C: Engine + Unpin + Send + 'static>(
        make: Make<C>,
    ) {
        let Pair { server, mut client } = pair().await;
        let mut server = make(server);
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

    async fn a_socket_closed_without_close_notify_is_an_unexpected_eof<
        C: Engine + Unpin + Send + 'static,
    >(
        make: Make<C>,
    ) {
        let Pair { server, client } = pair().await;
        let mut server = make(server);
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
    async fn key_updates_are_followed<C: Engine + Unpin + Send + 'static>(make: Make<C>) {
        let Pair { server, mut client } = pair().await;
        let mut server = make(server);
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

    /// Everything the peer sends until it closes the connection.
    async fn read_until_closed(tcp: &mut TcpStream) -> Vec<u8> {
        let mut wire = Vec::new();
        tokio::time::timeout(LIMIT, tcp.read_to_end(&mut wire))
            .await
            .expect("closed in time")
            .expect("read");
        wire
    }

    /// How many records `wire` holds (a partial one at the end counts).
    fn count_records(wire: &[u8]) -> usize {
        let mut count = 0;
        let mut rest = wire;
        while rest.len() >= 5 {
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            rest = &rest[(5 + len).min(rest.len())..];
            count += 1;
        }
        count
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
    async fn data_before_a_corrupt_record_is_read_then_reads_keep_failing<
        C: Engine + Unpin + Send + 'static,
    >(
        make: Make<C>,
    ) {
        let Pair { server, client } = pair().await;
        let mut server = make(server);
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
    async fn a_failed_session_sends_one_alert_and_stays_failed<
        C: Engine + Unpin + Send + 'static,
    >(
        make: Make<C>,
    ) {
        let (server_config, client_config) = configs();
        // No tickets: after the handshake the server has nothing to send but the alert.
        let mut server_config = (*server_config).clone();
        server_config.send_tls13_tickets = 0;
        let Pair { server, client } = pair_with(Arc::new(server_config), client_config).await;
        let mut server = make(server);
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
        let answer = read_until_closed(&mut tcp).await;
        assert_eq!(
            count_records(&answer),
            1,
            "records after the failure: {answer:?}"
        );
    }

    /// A tunnel waiting for readiness after reading the data that came with a failure is woken for the
    /// failure, not left waiting on a socket with nothing more to come. The client's 33rd key update in a
    /// row is refused (rustls' limit) and consumed, so no record is left to make the session readable.
    async fn a_tunnel_reads_the_data_then_the_failure_that_came_with_it<
        C: Engine + Unpin + Send + 'static,
    >(
        make: Make<C>,
    ) {
        let Pair { server, client } = pair().await;
        let mut server = make(server);
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
    async fn an_oversized_record_header_is_refused_at_once<C: Engine + Unpin + Send + 'static>(
        make: Make<C>,
    ) {
        let Pair { server, client } = pair().await;
        let mut server = make(server);
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

    /// A server session with no tickets to send, handed to the record layer, and a client that seals
    /// records of its own making with its half of the keys.
    async fn raw_pair() -> (OwnServer, RawClient) {
        let (server, tcp, conn) = handed_over().await;
        let suite = match conn.negotiated_cipher_suite() {
            Some(rustls::SupportedCipherSuite::Tls13(suite)) => suite,
            other => panic!("not TLS 1.3: {other:?}"),
        };
        let secrets = conn.dangerous_extract_secrets().expect("client secrets");
        let (tx_key, tx_iv) = super::super::record_layer::keys(secrets.tx.1).expect("keys");
        let (rx_key, rx_iv) = super::super::record_layer::keys(secrets.rx.1).expect("keys");
        let client = RawClient {
            tcp,
            seal: suite.aead_alg.encrypter(tx_key, tx_iv),
            tx_seq: secrets.tx.0,
            open: suite.aead_alg.decrypter(rx_key, rx_iv),
            rx_seq: secrets.rx.0,
        };
        (server, client)
    }

    /// A server session with no tickets to send, handed to the record layer, and its client's socket and
    /// connection, apart.
    async fn handed_over() -> (OwnServer, TcpStream, rustls::ClientConnection) {
        let (server_config, client_config) = configs();
        let mut server_config = (*server_config).clone();
        server_config.send_tls13_tickets = 0;
        let Pair { server, client } = pair_with(Arc::new(server_config), client_config).await;
        let (tcp, conn) = client.into_inner();
        (own(server), tcp, conn)
    }

    struct RawClient {
        tcp: TcpStream,
        seal: Box<dyn rustls::crypto::cipher::MessageEncrypter>,
        tx_seq: u64,
        open: Box<dyn rustls::crypto::cipher::MessageDecrypter>,
        rx_seq: u64,
    }

    impl RawClient {
        /// A record of content type `typ` (inside the protection) carrying `payload`.
        fn record(&mut self, typ: rustls::ContentType, payload: &[u8]) -> Vec<u8> {
            let plain = rustls::crypto::cipher::OutboundPlainMessage {
                typ,
                version: rustls::ProtocolVersion::TLSv1_2,
                payload: rustls::crypto::cipher::OutboundChunks::Single(payload),
            };
            let sealed = self.seal.encrypt(plain, self.tx_seq).expect("seal");
            self.tx_seq += 1;
            sealed.encode()
        }

        /// Every record the server sends until it closes, opened: (content type, payload).
        async fn answers(&mut self) -> Vec<(rustls::ContentType, Vec<u8>)> {
            let mut wire = read_until_closed(&mut self.tcp).await;
            let mut answers = Vec::new();
            let mut rest = &mut wire[..];
            while rest.len() >= 5 {
                let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
                let (record, after) = rest.split_at_mut(5 + len);
                let sealed = rustls::crypto::cipher::InboundOpaqueMessage::new(
                    rustls::ContentType::ApplicationData,
                    rustls::ProtocolVersion::TLSv1_2,
                    &mut record[5..],
                );
                let plain = self.open.decrypt(sealed, self.rx_seq).expect("open");
                self.rx_seq += 1;
                answers.push((plain.typ, plain.payload.to_vec()));
                rest = after;
            }
            assert!(rest.is_empty(), "a partial record at the end");
            answers
        }
    }

    /// What a peer may not send after the handshake is refused with the alert RFC 8446 names, sealed
    /// under the session's keys; the session ends.
    #[tokio::test]
    async fn the_record_layer_refuses_what_a_peer_may_not_send_with_the_right_alert() {
        use rustls::AlertDescription as A;
        use rustls::ContentType as T;
        enum Wire {
            Sealed(T, Vec<u8>),
            Raw(Vec<u8>),
            Corrupt,
        }
        let cases = [
            (
                "an unprotected record",
                Wire::Raw(vec![22, 3, 3, 0, 5, 24, 0, 0, 1, 0]),
                A::UnexpectedMessage,
            ),
            (
                "a NewSessionTicket",
                Wire::Sealed(T::Handshake, vec![4, 0, 0, 0]),
                A::UnexpectedMessage,
            ),
            (
                "a KeyUpdate asking neither way",
                Wire::Sealed(T::Handshake, vec![24, 0, 0, 1, 2]),
                A::IllegalParameter,
            ),
            (
                "a KeyUpdate of the wrong length",
                Wire::Sealed(T::Handshake, vec![24, 0, 0, 2, 0, 0]),
                A::DecodeError,
            ),
            (
                "data after a KeyUpdate",
                Wire::Sealed(T::Handshake, vec![24, 0, 0, 1, 0, 24]),
                A::UnexpectedMessage,
            ),
            (
                "a split handshake message",
                Wire::Sealed(T::Handshake, vec![24, 0]),
                A::UnexpectedMessage,
            ),
            (
                "an empty handshake record",
                Wire::Sealed(T::Handshake, vec![]),
                A::UnexpectedMessage,
            ),
            (
                "an alert of the wrong length",
                Wire::Sealed(T::Alert, vec![1]),
                A::DecodeError,
            ),
            (
                "a protected ChangeCipherSpec",
                Wire::Sealed(T::ChangeCipherSpec, vec![1]),
                A::UnexpectedMessage,
            ),
            (
                "too much plaintext",
                Wire::Sealed(T::ApplicationData, vec![0; (16 << 10) + 1]),
                A::RecordOverflow,
            ),
            (
                "too much ciphertext",
                Wire::Raw([&[23, 3, 3, 0x41, 0x01][..], &[0; 0x4101]].concat()),
                A::RecordOverflow,
            ),
            (
                "a record that does not open",
                Wire::Corrupt,
                A::BadRecordMac,
            ),
        ];
        for (what, wire, alert) in cases {
            let (mut server, mut client) = raw_pair().await;
            let bytes = match wire {
                Wire::Sealed(typ, payload) => client.record(typ, &payload),
                Wire::Raw(bytes) => bytes,
                Wire::Corrupt => {
                    let mut bytes = client.record(T::ApplicationData, b"hello");
                    bytes[7] ^= 1;
                    bytes
                }
            };
            client.tcp.write_all(&bytes).await.expect("send");
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(LIMIT, tunnel_read(&mut server, &mut buf))
                .await
                .expect("in time");
            assert_eq!(
                read.expect_err(what).kind(),
                io::ErrorKind::InvalidData,
                "{what}"
            );
            drop(server);
            let answers = client.answers().await;
            assert_eq!(
                answers,
                [(T::Alert, vec![2, u8::from(alert)])],
                "{what}: the server's answer"
            );
        }
    }

    /// A peer's own fatal alert ends the session without an answer; `user_canceled` and empty records
    /// are passed over; what follows `close_notify` is ignored.
    #[tokio::test]
    async fn the_record_layer_takes_alerts_and_empty_records_as_rfc_8446_says() {
        use rustls::ContentType as T;
        let (mut server, mut client) = raw_pair().await;
        let wire = [
            client.record(T::Alert, &[1, 90]),
            client.record(T::ApplicationData, b""),
            client.record(T::ApplicationData, b"data"),
            client.record(T::Alert, &[1, 0]),
            client.record(T::ApplicationData, b"ignored"),
        ]
        .concat();
        client.tcp.write_all(&wire).await.expect("send");
        let mut got = Vec::new();
        tokio::time::timeout(LIMIT, server.read_to_end(&mut got))
            .await
            .expect("in time")
            .expect("a clean end");
        assert_eq!(got, b"data");

        let (mut server, mut client) = raw_pair().await;
        let fatal = client.record(T::Alert, &[2, 40]);
        client.tcp.write_all(&fatal).await.expect("send");
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(LIMIT, server.read(&mut buf))
            .await
            .expect("in time");
        assert_eq!(
            read.expect_err("a fatal alert").kind(),
            io::ErrorKind::InvalidData
        );
        drop(server);
        assert_eq!(client.answers().await, [], "an answer to a fatal alert");
    }

    /// A peer that asks for a key update with each of its messages, while the server sends nothing, gets
    /// one answer, before the server's next data: the peer (rustls, as a client) refuses more than 32
    /// `KeyUpdate`s in a row with no data between them. (Found by the `tls_session` fuzz target: the
    /// record layer answered each request at once, and the client refused the 33rd answer.)
    #[tokio::test]
    async fn key_update_requests_are_answered_once_before_the_next_data() {
        let (mut server, mut tcp, mut conn) = handed_over().await;
        for round in 0..40u8 {
            conn.refresh_traffic_keys().expect("key update");
            // Two asks in one flight, for good measure.
            if round % 10 == 0 {
                conn.refresh_traffic_keys().expect("key update");
            }
            std::io::Write::write_all(&mut conn.writer(), &[round; 4]).expect("plaintext");
            tcp.write_all(&records(&mut conn)).await.expect("send");
            let mut buf = [0u8; 4];
            tokio::time::timeout(LIMIT, server.read_exact(&mut buf))
                .await
                .expect("in time")
                .expect("read");
            assert_eq!(buf, [round; 4]);
        }
        server.write_all(b"pong").await.expect("write");
        server.shutdown().await.expect("close");
        let answers = read_as(&mut tcp, &mut conn).await;
        assert_eq!(answers.records, 3, "one answer, the data, close_notify");
        assert_eq!(answers.plaintext, b"pong");
    }

    /// Keys that have sealed as many records as the suite allows are updated, with a `KeyUpdate` to the
    /// peer, before the next record.
    #[tokio::test]
    async fn keys_are_updated_before_the_suites_limit() {
        let (mut server, mut tcp, mut conn) = handed_over().await;
        server.conn.update_keys_every(2);
        for part in [&b"one "[..], b"two ", b"three ", b"four ", b"five"] {
            server.write_all(part).await.expect("write");
        }
        server.shutdown().await.expect("close");
        let answers = read_as(&mut tcp, &mut conn).await;
        // Two records under each keys, then the KeyUpdate: one, two, KeyUpdate, three, four, KeyUpdate,
        // five, close_notify.
        assert_eq!(
            answers.records, 8,
            "five writes, two KeyUpdates, close_notify"
        );
        assert_eq!(answers.plaintext, b"one two three four five");
    }

    struct Read {
        records: usize,
        plaintext: Vec<u8>,
    }

    /// Everything the server sends until it closes, counted in records and read through `conn`.
    async fn read_as(tcp: &mut TcpStream, conn: &mut rustls::ClientConnection) -> Read {
        let wire = read_until_closed(tcp).await;
        let records = count_records(&wire);
        let mut fed = &wire[..];
        while !fed.is_empty() {
            conn.read_tls(&mut fed).expect("read_tls");
            conn.process_new_packets()
                .expect("the client takes every record");
        }
        let mut plaintext = Vec::new();
        let _ = std::io::Read::read_to_end(&mut conn.reader(), &mut plaintext);
        Read { records, plaintext }
    }

    /// Only TLS 1.3 sessions, accepted with a config that lets rustls hand them over, leave rustls.
    #[tokio::test]
    async fn tls_1_2_and_configs_without_extraction_stay_with_rustls() {
        let (server_config, tls12) = configs_with(&[&rustls::version::TLS12]);
        let Pair { server, .. } = pair_with(server_config, tls12).await;
        assert!(
            matches!(server.establish(), Established::Rustls(_)),
            "TLS 1.2"
        );
        let (server_config, client_config) = configs();
        let mut closed = (*server_config).clone();
        closed.enable_secret_extraction = false;
        let Pair { server, .. } = pair_with(Arc::new(closed), client_config).await;
        assert!(
            matches!(server.establish(), Established::Rustls(_)),
            "extraction not enabled"
        );
    }

    /// A session toward a backend (`connect`) handed over at once, before the backend's tickets have
    /// been read: the record layer takes them (rustls stores them in the client config), the data goes
    /// both ways, and the next connection with the same config resumes.
    #[tokio::test]
    async fn a_backend_session_handed_over_takes_its_tickets_for_the_next_connection() {
        let (server_config, client_config) = configs();
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let backend = tokio::spawn(async move {
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.expect("accept");
                let mut tls = acceptor.accept(tcp).await.expect("backend handshake");
                let mut buf = [0u8; 5];
                tls.read_exact(&mut buf).await.expect("read");
                tls.write_all(&buf).await.expect("echo");
                tls.shutdown().await.expect("close");
            }
        });
        let name = ServerName::try_from("localhost").expect("name");
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let session = tokio::time::timeout(
                LIMIT,
                connect(tcp, Arc::clone(&client_config), name.clone()),
            )
            .await
            .expect("in time")
            .expect("handshake");
            kinds.push(session.state().handshake_kind());
            let Established::Own(mut session) = session.establish() else {
                panic!("a TLS 1.3 session to a backend stayed with rustls");
            };
            session.write_all(b"hello").await.expect("write");
            let mut back = Vec::new();
            tokio::time::timeout(LIMIT, session.read_to_end(&mut back))
                .await
                .expect("in time")
                .expect("the backend's tickets, its echo, its close_notify");
            assert_eq!(back, b"hello");
        }
        backend.await.expect("backend");
        assert_eq!(
            kinds,
            [
                Some(rustls::HandshakeKind::Full),
                Some(rustls::HandshakeKind::Resumed)
            ]
        );
    }
}
