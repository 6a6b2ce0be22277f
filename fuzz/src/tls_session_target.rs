//! The `tls_session` target: a client's TLS session as wsgate drives it (`wsgate::internals::tls_accept`,
//! `ServerSession`, over rustls' unbuffered API with wsgate's own buffers), fed whatever a client sends,
//! in reads of the sizes the input picks.
//!
//! The session runs over an in-memory stream (`Io`): its reads hand out the client's bytes up to a limit
//! and in pieces the input sets, answer Pending when nothing more is let through, EOF or an error when the
//! input says so; its writes take what the input's write budget allows and record it. Futures are polled
//! by hand with a no-op waker: nothing here ever waits.
//!
//! Input layout: byte 0 picks the mode (bit 0), the client's protocol (bit 1: TLS 1.2, else 1.3), cipher
//! suite (bit 2: ChaCha20-Poly1305, else AES-128-GCM) and whether the session is handed over after the
//! handshake (bit 3: `TlsSession::establish`, as wsgate's listeners do, which gives a TLS 1.3 session to
//! wsgate's record layer, `src/tls/record_layer.rs`, and keeps a TLS 1.2 one with rustls); bytes 1 and 2
//! the read and write piece sizes during the handshake (`piece`: 0 is any size, 1–200 bytes, then steps of
//! 512). The rest is a script of operations, one byte (`% 16`) and its arguments each (`u16`s
//! little-endian), run in order:
//!
//! | op | arguments | what |
//! |---|---|---|
//! | 0 | len, record | the client sends `len` bytes of data in records of `record` bytes at most |
//! | 1 | | the client updates its keys and asks the server to (TLS 1.3) |
//! | 2 | | the client sends `close_notify` |
//! | 3 | n, times, n bytes | raw bytes into the client's stream (the stream itself in raw mode), repeated |
//! | 4 | at, mask | a byte of the stream not read yet is XORed with `mask` |
//! | 5 | n | reads may take `n` more bytes than they have (`0xffff`: all, from now on) |
//! | 6 | piece | each read hands out `piece(b)` bytes at most |
//! | 7 | | the stream ends where reads stop now |
//! | 8, 9 | size | one server read, or reads until one returns no data, with buffers of `size` (0: none) |
//! | 10 | half | one server write of 2 × `half` bytes |
//! | 11, 12 | | server flush, server shutdown |
//! | 13 | more, piece | writes take `more` bytes more (`0xffff`: any), `piece(b)` per write at most |
//! | 14 | bits | reads (bit 0), writes (bit 1) of the stream fail from now on; writes take nothing (bit 2) |
//! | 15 | | the client takes what the server wrote and reads its data |
//!
//! - Raw mode (bit 0 clear): there is no client. `Raw` operations are the whole stream (a real
//!   ClientHello in the seeds, or anything); the server operations poll `accept`.
//! - Client mode (bit 0 set): a real rustls client makes the handshake first, its records and the
//!   server's cut into the pieces of bytes 1 and 2. Then the script, then a final phase: everything let
//!   through and written, the server reads until it can go no further, the client reads what it wrote.
//!
//! Each input is kept cheap (libFuzzer needs many runs a second): at most `MAX_DATA` bytes of data each
//! way in `MAX_RECORDS` records, reads of the stream at least `LARGE_PIECE` bytes after `SMALL_READS` of
//! them, server reads at least `LARGE_BUFFER` after `SMALL_BUFFERS`.
//!
//! The harness knows where each record of the client's stream starts and ends, how much application data
//! each carries, and where the first corruption is (a raw byte or a flipped one makes the record it is in,
//! and everything after it, fail; so does the 33rd key update in a row, rustls' limit). Two things are
//! not generated: a corruption the session meets after its shutdown (rustls 0.23 then queues a fatal
//! alert after its `close_notify`, which its debug assertions refuse: `!self.sent_fatal_alert`, a rustls
//! matter; so no raw bytes or flips after a shutdown, and no shutdown while a corruption waits unless the
//! session already failed on it), and,
//! in TLS 1.3, a flip of a record's type or version bytes (rustls decrypts with the header RFC 8446 §5.2
//! prescribes, not the one received, so the record is still good; the length byte is flipped instead).
//! Checked, in client mode:
//!
//! - The handshake completes, whatever the piece sizes.
//! - What the server reads is, in order, exactly the client's application data, never more than the whole
//!   records let through so far carry, and never data from the first corrupted record on. A read that
//!   answers Pending has read every byte let through, has no whole record of data left unread, and no
//!   `close_notify` waiting.
//! - After the client's `close_notify` (whole and before any corruption), reads return EOF (`Ok(0)`),
//!   every time, and by then every byte of data sent before it has been read.
//! - A read fails only for a reason: a corruption let through, the stream's EOF without `close_notify`,
//!   an error of the stream, or 33 key updates in a row (rustls' limit). Never "unexpected TLS state".
//!   After a read failed (for anything but the stream's write error, met sending what was queued) or
//!   returned EOF, no read returns data; a failed session fails every read and write after.
//! - When the session is quiet (a read answered Pending, what was let through ends on a record boundary
//!   and holds no corruption), it holds no buffer once a flush has written what it had to send:
//!   `buffered_capacity() == 0`.
//! - Always: `buffered_capacity() <= BOUND` (see `BOUND` for how it follows from the code).
//! - Writes take 1..=`WRITE_SIZE` bytes of a non-empty buffer, answer Pending only while the stream
//!   refuses writes, and fail only after an error (of the session or the stream) or a shutdown. What the
//!   server wrote is whole, well-formed TLS records; the client decrypts exactly the bytes writes took, in
//!   order, and the server's `close_notify` after a shutdown, unless the server failed. (Data written
//!   after a shutdown that answered Pending goes out after the `close_notify`, and the client ignores it,
//!   as it must: only what was written before the first shutdown is expected.)
//! - At the end, with everything let through: with no corruption and no EOF, the last read is Pending
//!   with every byte of data read; with `close_notify`, EOF with every byte before it read; with an EOF
//!   cutting the stream, `UnexpectedEof` with every whole record before it read; with a corruption, an
//!   error (or Pending, when the corrupted record is not whole and rustls has not seen its header yet).
//!   Two more reads give the same answer. (A read also sends what is queued, and reports the stream's
//!   write error when that fails: such a read is not an answer about what the client sent.)
//!
//! In raw mode: `accept` fails only with `InvalidData`, `UnexpectedEof` (the stream's EOF) or the
//! stream's own errors, and what the server wrote is well-formed records.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future as _;
use std::io::{self, Read as _, Write as _};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ActiveKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, NamedGroup, ServerConfig,
    SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use wsgate::internals::{
    Engine, Established, MAX_INCOMING, READ_SIZE, TlsSession, WRITE_SIZE, tls_accept,
};

/// The most buffer a session may hold at any time (`buffered_capacity`), from `src/tls/session.rs`:
///
/// - `incoming`: a read is made only while it holds less than `MAX_INCOMING`, into room reserved
///   exactly `READ_SIZE` at a time behind what it holds, so its capacity stays under `MAX_INCOMING` +
///   `READ_SIZE`.
/// - `plaintext`: decrypted from what `incoming` held (a record's plaintext is shorter than the record),
///   and only when it was empty before (a read serves it first); `Vec` at most doubles an allocation it
///   grows: twice that.
/// - `outgoing`: one write's records (`WRITE_SIZE` plus their overhead) behind what is left of the
///   previous batch (a write waits for it), plus alerts and handshake messages (a key update's answer):
///   2 × (`WRITE_SIZE` + 16 KiB).
pub const BOUND: usize = 3 * (MAX_INCOMING + READ_SIZE) + 2 * (WRITE_SIZE + (16 << 10));

/// The most buffer a session held in this process (`most_held`).
static MOST_HELD: AtomicUsize = AtomicUsize::new(0);

/// The most buffer a session held in this process so far: how close inputs come to `BOUND`.
pub fn most_held() -> usize {
    MOST_HELD.load(Ordering::Relaxed)
}

/// The largest record a peer may send (TLS 1.2's limit, RFC 5246 §6.2.3): the session refuses a header
/// announcing more at once, and waits for the whole of a smaller one.
const MAX_RECORD: usize = (16 << 10) + 2048;

/// At most this much application data each way per input, so that every input runs fast: enough for
/// several full reads (`READ_SIZE`) and records cut across them.
const MAX_DATA: usize = 64 << 10;
/// Raw bytes an input puts in the stream at most (repeated): past `MAX_INCOMING`.
const MAX_RAW: usize = 2 * MAX_INCOMING;
/// Reads made by one `ReadAll` at most.
const MAX_READS: usize = 4096;
/// Records the client sends at most (the rest of the data goes in records of 16 KiB).
const MAX_RECORDS: usize = 1024;
/// Reads of the stream after which each hands out at least `LARGE_PIECE` bytes: the first reads may cut
/// the stream anywhere, but a whole input read a byte at a time would run too long.
const SMALL_READS: usize = 8192;
const LARGE_PIECE: usize = 4096;
/// The same for the server's reads: after this many, each has a buffer of at least `LARGE_BUFFER` bytes.
const SMALL_BUFFERS: usize = 4096;
const LARGE_BUFFER: usize = 1024;
/// The largest read buffer an input asks for (a `u16`).
const MAX_READ: usize = 1 << 16;

// ---------------------------------------------------------------------------------------------------------
// Setup, once per process

struct Configs {
    server: Arc<ServerConfig>,
    /// By protocol (TLS 1.3, 1.2), then cipher suite (AES-128-GCM, ChaCha20-Poly1305).
    clients: [[Arc<ClientConfig>; 2]; 2],
}

/// A server configured as wsgate's listeners are (`tls::acceptor`: TLS 1.3 and 1.2, ALPN, stateless
/// tickets, ring's cipher suites), with a self-signed certificate made once; clients that accept any
/// certificate and resume nothing (so that no input depends on the ones run before it).
///
/// Both sides' key exchange is `FixedKx`, not X25519: the session's code does not see the difference,
/// and a handshake takes a fraction of the time. For the same reason the clients offer only suites with
/// SHA-256 (cheaper key schedules); the server chooses among all of its own as it would.
fn configs() -> &'static Configs {
    static CONFIGS: OnceLock<Configs> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let provider = || rustls::crypto::CryptoProvider {
            kx_groups: vec![&FixedKx],
            ..rustls::crypto::ring::default_provider()
        };
        let mut server = ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).expect("key"),
            )
            .expect("server config");
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        server.ticketer = rustls::crypto::ring::Ticketer::new().expect("ticketer");
        server.enable_secret_extraction = true;
        let client = |tls12: bool, chacha: bool| {
            use rustls::crypto::ring::cipher_suite as suites;
            let suite = match (tls12, chacha) {
                (false, false) => suites::TLS13_AES_128_GCM_SHA256,
                (false, true) => suites::TLS13_CHACHA20_POLY1305_SHA256,
                (true, false) => suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                (true, true) => suites::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            };
            let provider = Arc::new(rustls::crypto::CryptoProvider {
                cipher_suites: vec![suite],
                ..provider()
            });
            let version = if tls12 {
                &rustls::version::TLS12
            } else {
                &rustls::version::TLS13
            };
            let mut config = ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_protocol_versions(&[version])
                .expect("versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            config.resumption = rustls::client::Resumption::disabled();
            Arc::new(config)
        };
        Configs {
            server: Arc::new(server),
            clients: [
                [client(false, false), client(false, true)],
                [client(true, false), client(true, true)],
            ],
        }
    })
}

/// A key exchange that costs nothing: every key share is the same 32 bytes, and so is every shared
/// secret. It says it is X25519, so that clients and servers pick it as they would pick X25519.
#[derive(Debug)]
struct FixedKx;

impl SupportedKxGroup for FixedKx {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        Ok(Box::new(FixedKx))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

impl ActiveKeyExchange for FixedKx {
    fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, rustls::Error> {
        // A share of another length is refused, as X25519 refuses it.
        if peer.len() != 32 {
            return Err(rustls::PeerMisbehaved::InvalidKeyShare.into());
        }
        Ok(SharedSecret::from(&[0x5a; 32][..]))
    }

    fn pub_key(&self) -> &[u8] {
        &[9; 32]
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------------------
// The stream under the session

/// Both directions of the connection, shared by the harness and the session's `Io`.
#[derive(Default)]
struct Wire {
    /// The client's bytes, in order; the server's reads take them from `consumed` on.
    input: Vec<u8>,
    consumed: usize,
    /// Reads stop (Pending) at this offset of `input`; `None`: everything is let through.
    limit: Option<usize>,
    /// Bytes one read hands out at most.
    read_piece: usize,
    /// Reads made.
    reads: usize,
    /// The stream ends here: a read at this offset is EOF.
    eof_at: Option<usize>,
    /// Every read from now on fails.
    read_error: bool,
    /// What the server wrote.
    output: Vec<u8>,
    /// Bytes writes take before they answer Pending; `None`: any.
    write_budget: Option<usize>,
    /// Bytes one write takes at most.
    write_piece: usize,
    /// Every write from now on fails.
    write_error: bool,
    /// Every write from now on takes nothing (`Ok(0)`, which the session must take for an error).
    write_zero: bool,
    /// The server shut the stream down (writes fail after it, as on a socket).
    shut: bool,
}

impl Wire {
    /// Where the reads stop now: the end of the input, the limit or the EOF, whichever is first.
    fn readable_end(&self) -> usize {
        let mut end = self.input.len();
        if let Some(limit) = self.limit {
            end = end.min(limit);
        }
        if let Some(eof) = self.eof_at {
            end = end.min(eof);
        }
        end
    }

    fn at_eof(&self) -> bool {
        self.eof_at.is_some_and(|eof| self.consumed >= eof)
    }
}

struct Io(Rc<RefCell<Wire>>);

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut wire = self.0.borrow_mut();
        if wire.read_error {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        let end = wire.readable_end();
        if wire.consumed >= end {
            return if wire.at_eof() {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            };
        }
        let piece = if wire.reads < SMALL_READS {
            wire.read_piece
        } else {
            wire.read_piece.max(LARGE_PIECE)
        };
        wire.reads += 1;
        let n = (end - wire.consumed).min(piece).min(buf.remaining());
        let start = wire.consumed;
        buf.put_slice(&wire.input[start..start + n]);
        wire.consumed += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut wire = self.0.borrow_mut();
        if wire.write_error || wire.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if wire.write_zero {
            return Poll::Ready(Ok(0));
        }
        let budget = wire.write_budget.unwrap_or(usize::MAX);
        if budget == 0 {
            return Poll::Pending;
        }
        let n = buf.len().min(budget).min(wire.write_piece);
        wire.output.extend_from_slice(&buf[..n]);
        if let Some(budget) = &mut wire.write_budget {
            *budget -= n;
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.0.borrow().write_error {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut wire = self.0.borrow_mut();
        if wire.write_error {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        wire.shut = true;
        Poll::Ready(Ok(()))
    }
}

// ---------------------------------------------------------------------------------------------------------
// The input

/// The bytes of a piece size: 0 is no limit, 1–200 that many bytes, 201–255 steps of 512 bytes (up to
/// 27.5 KiB, past a record and a half).
fn piece(b: u8) -> usize {
    match b {
        0 => usize::MAX,
        1..=200 => usize::from(b),
        _ => usize::from(b - 200) * 512,
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    /// Two bytes, little-endian; a lone last byte is read as the low one.
    fn u16(&mut self) -> Option<u16> {
        let lo = self.byte()?;
        Some(u16::from(lo) | u16::from(self.byte().unwrap_or(0)) << 8)
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        taken
    }
}

#[derive(Debug, Clone, Copy)]
enum Op<'a> {
    /// The client sends `len` bytes of data, in records of at most `record` bytes.
    ClientData {
        len: usize,
        record: usize,
    },
    /// The client updates its keys and asks the server to (TLS 1.3; nothing in 1.2).
    KeyUpdate,
    /// The client sends `close_notify`.
    CloseNotify,
    /// These bytes go into the client's stream as they are, `times` times over (so that an input of a few
    /// KiB can hold more than `MAX_INCOMING`: a handshake message in one-byte records).
    Raw {
        bytes: &'a [u8],
        times: usize,
    },
    /// A byte of the stream not read yet is flipped (XOR `mask`).
    Flip {
        at: u16,
        mask: u8,
    },
    /// Reads may take `n` more bytes than they have (`None`: everything, from now on).
    Let(Option<usize>),
    /// Reads hand out at most this many bytes each.
    ReadPiece(usize),
    /// The stream ends where reads stop now.
    Eof,
    /// One server read with a buffer of this size.
    Read(usize),
    /// Server reads with buffers of this size until one returns no data.
    ReadAll(usize),
    /// One server write of this many bytes.
    Write(usize),
    Flush,
    Shutdown,
    /// Writes take this many more bytes (`None`: any), each at most `piece`.
    WriteBudget {
        more: Option<usize>,
        piece: usize,
    },
    /// Reads (bit 0), writes (bit 1) fail from now on; writes take nothing (bit 2).
    Fail(u8),
    /// The client takes what the server wrote and reads its data.
    ClientRead,
}

impl<'a> Op<'a> {
    fn parse(c: &mut Cursor<'a>) -> Option<Op<'a>> {
        let code = c.byte()?;
        Some(match code % 16 {
            0 => {
                let len = usize::from(c.u16()?);
                let record = usize::from(c.u16()?).clamp(1, 16 << 10);
                Op::ClientData { len, record }
            }
            1 => Op::KeyUpdate,
            2 => Op::CloseNotify,
            3 => {
                let n = usize::from(c.u16()?);
                let times = usize::from(c.byte()?.max(1));
                Op::Raw {
                    bytes: c.bytes(n),
                    times,
                }
            }
            4 => Op::Flip {
                at: c.u16()?,
                mask: c.byte()?.max(1),
            },
            5 => match c.u16()? {
                u16::MAX => Op::Let(None),
                n => Op::Let(Some(usize::from(n))),
            },
            6 => Op::ReadPiece(piece(c.byte()?)),
            7 => Op::Eof,
            8 => Op::Read(usize::from(c.u16()?)),
            9 => Op::ReadAll(usize::from(c.u16()?).max(1)),
            10 => Op::Write(usize::from(c.u16()?) * 2),
            11 => Op::Flush,
            12 => Op::Shutdown,
            13 => {
                let more = match c.u16()? {
                    u16::MAX => None,
                    n => Some(usize::from(n)),
                };
                Op::WriteBudget {
                    more,
                    piece: piece(c.byte()?),
                }
            }
            14 => Op::Fail(c.byte()?),
            _ => Op::ClientRead,
        })
    }
}

/// Makes the stream's reads (bit 0), writes (bit 1) fail from now on, or its writes take nothing (bit 2).
fn fail(wire: &mut Wire, which: u8) {
    wire.read_error |= which & 1 != 0;
    wire.write_error |= which & 2 != 0;
    wire.write_zero |= which & 4 != 0;
}

/// Appends `bytes` `times` times to the client's stream, up to `MAX_RAW` raw bytes or so in all.
fn put_raw(input: &mut Vec<u8>, bytes: &[u8], times: usize) {
    for _ in 0..times {
        if input.len() + bytes.len() > MAX_RAW + (64 << 10) {
            return;
        }
        input.extend_from_slice(bytes);
    }
}

/// The client's application data, `MAX_DATA` bytes of it (so that a byte out of place shows).
fn client_data() -> &'static [u8] {
    static DATA: OnceLock<Vec<u8>> = OnceLock::new();
    DATA.get_or_init(|| (0..MAX_DATA).map(|i| (i * 7 + i / 251) as u8).collect())
}

/// The server's application data.
fn server_data() -> &'static [u8] {
    static DATA: OnceLock<Vec<u8>> = OnceLock::new();
    DATA.get_or_init(|| {
        (0..MAX_DATA)
            .map(|i| (i * 13 + i / 241 + 101) as u8)
            .collect()
    })
}

// ---------------------------------------------------------------------------------------------------------
// The client's stream, as the harness knows it

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Handshake,
    Data,
    KeyUpdate,
    Close,
    Raw,
}

/// A stretch of the client's stream: one record the client wrote (or its whole handshake), or raw bytes.
#[derive(Debug, Clone, Copy)]
struct Segment {
    start: usize,
    end: usize,
    kind: Kind,
    /// The client's data sent up to the end of this segment.
    data_end: usize,
}

/// How one server read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Data(usize),
    Eof,
    Error(io::ErrorKind),
    Pending,
}

/// The well-formed records at the start of what the server wrote; panics at one that is not. Returns the
/// length they cover (a last record still being written is left out).
fn check_records(out: &[u8]) -> usize {
    let mut at = 0;
    while out.len() - at >= 5 {
        let header = &out[at..at + 5];
        assert!(
            (20..=23).contains(&header[0]),
            "the server wrote a record of type {} at {at}: {:?}",
            header[0],
            &out[at..out.len().min(at + 16)]
        );
        assert!(
            header[1] == 3 && (1..=3).contains(&header[2]),
            "the server wrote a record of version {:?} at {at}",
            &header[1..3]
        );
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        assert!(
            len <= MAX_RECORD,
            "the server wrote a record of {len} bytes"
        );
        if out.len() - at < 5 + len {
            break;
        }
        at += 5 + len;
    }
    at
}

struct Run {
    wire: Rc<RefCell<Wire>>,
    segments: Vec<Segment>,
    /// Index of the first `close_notify` segment.
    first_close: Option<usize>,
    /// Offset of the first corrupted segment's start (raw bytes, a flipped byte, a key update past
    /// rustls' limit); everything from there on fails.
    corrupt_at: usize,
    /// The same for raw bytes and key updates only.
    corrupt_other: usize,
    /// Bytes flipped, by offset: what they were XORed with, net.
    flipped: BTreeMap<usize, u8>,
    data_sent: usize,
    /// Key updates since the last data record (rustls refuses the 33rd in a row).
    key_updates_in_a_row: usize,
    /// Data records sent.
    records: usize,
    client: ClientConnection,
    client_closed: bool,
    /// Bytes of `wire.output` the client has taken.
    client_taken: usize,
    client_data: usize,
    client_failed: bool,
    client_saw_close: bool,
    /// The server's reads.
    read: usize,
    last: Option<Outcome>,
    failed: bool,
    eof: bool,
    /// A read failed for what the client sent (rustls refused it).
    tls_failed: bool,
    /// The server's writes.
    written: usize,
    shutdown_called: bool,
    shutdown_done: bool,
    /// What the server's writes had taken when it first shut down: its close_notify follows, and the
    /// client ignores what comes after it (a write after a shutdown that was Pending is taken, and lost).
    written_at_shutdown: usize,
    /// A read answered Pending on a quiet session (see `quiet_now`); cleared by any other read.
    quiet: bool,
    /// Buffer size of the last read, for the final phase.
    read_size: usize,
    /// Reads made.
    reads: usize,
    /// The session is TLS 1.3 (else 1.2).
    tls13: bool,
    /// The reads' buffer (one allocation per input, not one per read).
    buf: Vec<u8>,
    /// How much of `wire.output` is known to be well-formed records.
    records_checked: usize,
}

impl Run {
    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    /// Appends what the client has to send as one segment of `kind`.
    fn client_flush(&mut self, kind: Kind) {
        let mut bytes = Vec::new();
        while self.client.wants_write() {
            self.client.write_tls(&mut bytes).expect("write_tls");
        }
        if bytes.is_empty() {
            return;
        }
        // Each is one record (16 KiB of data at most, a key update, an alert): the model counts on it.
        if kind != Kind::Handshake {
            assert_eq!(
                check_records(&bytes),
                bytes.len(),
                "the client wrote a cut record"
            );
            let len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
            assert_eq!(
                5 + len,
                bytes.len(),
                "the client wrote {kind:?} in two records"
            );
        }
        let mut wire = self.wire.borrow_mut();
        let start = wire.input.len();
        wire.input.extend_from_slice(&bytes);
        if kind == Kind::Close && self.first_close.is_none() {
            self.first_close = Some(self.segments.len());
        }
        self.segments.push(Segment {
            start,
            end: wire.input.len(),
            kind,
            data_end: self.data_sent,
        });
    }

    /// How many segments count: those before the first corrupted one, up to and with the first
    /// `close_notify` (what follows it is ignored, corrupted or not). Segments are appended in order, so
    /// their ends increase: this and what follows are binary searches, not walks (an input may make
    /// thousands of segments and reads).
    fn valid(&self) -> usize {
        let uncorrupted = self.segments.partition_point(|s| s.end <= self.corrupt_at);
        match self.first_close {
            Some(close) if close < uncorrupted => close + 1,
            _ => uncorrupted,
        }
    }

    /// The data the whole valid records among the first `upto` bytes carry.
    fn data_ready(&self, upto: usize) -> usize {
        let valid = &self.segments[..self.valid()];
        match valid.partition_point(|s| s.end <= upto) {
            0 => 0,
            n => valid[n - 1].data_end,
        }
    }

    /// The data the valid records carry (everything the server may ever read).
    fn data_valid(&self) -> usize {
        self.segments[..self.valid()]
            .last()
            .map_or(0, |s| s.data_end)
    }

    /// The client's valid `close_notify` is among the first `upto` bytes (it can only be the last valid
    /// segment).
    fn close_within(&self, upto: usize) -> bool {
        self.segments[..self.valid()]
            .last()
            .is_some_and(|s| s.kind == Kind::Close && s.end <= upto)
    }

    /// A corruption that counts (not after a `close_notify`) has been read by the server, in part.
    fn corruption_read(&self) -> bool {
        let consumed = self.wire.borrow().consumed;
        self.corrupt_at < consumed && !self.close_within(self.corrupt_at)
    }

    /// Among the first `upto` bytes, the first corrupted record can be judged: it is whole, or its header
    /// announces more than a record may hold. (Before that the session waits for the rest of it.)
    fn corruption_decidable(&self, upto: usize) -> bool {
        let wire = self.wire.borrow();
        let Some(bytes) = wire.input.get(self.corrupt_at..upto.min(wire.input.len())) else {
            return false;
        };
        if bytes.len() < 5 {
            return false;
        }
        let len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
        len > MAX_RECORD || bytes.len() >= 5 + len
    }

    /// What the server read so far ends at a segment's end, before any corruption.
    fn at_boundary(&self) -> bool {
        let consumed = self.wire.borrow().consumed;
        consumed <= self.corrupt_at
            && self
                .segments
                .binary_search_by_key(&consumed, |s| s.end)
                .is_ok()
    }

    fn check_bound<C: Engine + Unpin>(&self, session: &TlsSession<C, Io>) {
        let held = session.buffered_capacity();
        assert!(held <= BOUND, "the session holds {held} bytes of buffer");
        MOST_HELD.fetch_max(held, Ordering::Relaxed);
    }

    /// One server read; checks it against what the client sent.
    fn read_once<C: Engine + Unpin>(&mut self, session: &mut TlsSession<C, Io>, size: usize) -> Outcome {
        if size == 0 {
            // Nothing to read into: answered at once, and nothing changes.
            let mut read_buf = ReadBuf::new(&mut []);
            let poll = Pin::new(&mut *session).poll_read(&mut Self::cx(), &mut read_buf);
            assert!(
                matches!(poll, Poll::Ready(Ok(()))),
                "a read into no room answered {poll:?}"
            );
            return self.last.unwrap_or(Outcome::Pending);
        }
        self.reads += 1;
        let size = if self.reads > SMALL_BUFFERS {
            size.max(LARGE_BUFFER)
        } else {
            size
        };
        self.read_size = size;
        let mut buf = std::mem::take(&mut self.buf);
        let mut read_buf = ReadBuf::new(&mut buf[..size]);
        let poll = Pin::new(&mut *session).poll_read(&mut Self::cx(), &mut read_buf);
        let outcome = match poll {
            Poll::Ready(Ok(())) if read_buf.filled().is_empty() => Outcome::Eof,
            Poll::Ready(Ok(())) => Outcome::Data(read_buf.filled().len()),
            Poll::Ready(Err(error)) => Outcome::Error(error.kind()),
            Poll::Pending => Outcome::Pending,
        };
        let (consumed, readable_end, at_eof, read_error, write_error) = {
            let wire = self.wire.borrow();
            (
                wire.consumed,
                wire.readable_end(),
                wire.at_eof(),
                wire.read_error,
                // Writes fail after a shutdown too, and a read sends what is queued.
                wire.write_error || wire.write_zero || wire.shut,
            )
        };
        let ready = self.data_ready(consumed);
        // A session that failed on what the client sent (everything decrypted before it read) fails
        // every read after, with the same error.
        if self.tls_failed {
            assert_eq!(
                outcome,
                Outcome::Error(io::ErrorKind::InvalidData),
                "a read after the session failed"
            );
        }
        match outcome {
            Outcome::Data(n) => {
                assert!(
                    !self.failed && !self.eof,
                    "data after {:?}: {n} bytes",
                    self.last
                );
                assert!(
                    self.read + n <= ready,
                    "read {n} bytes at {} with only {ready} in whole valid records let through \
                     ({consumed} bytes, corruption at {})",
                    self.read,
                    self.corrupt_at
                );
                assert!(
                    buf[..n] == client_data()[self.read..self.read + n],
                    "the data read at {} is not what the client sent",
                    self.read
                );
                self.read += n;
            }
            Outcome::Eof => {
                assert!(
                    self.close_within(consumed),
                    "EOF without the client's close_notify ({consumed} bytes read)"
                );
                if !self.failed {
                    assert_eq!(
                        self.read,
                        self.data_valid(),
                        "EOF before every byte sent before close_notify was read"
                    );
                }
                self.eof = true;
            }
            Outcome::Error(kind) => {
                let corrupted = self.corruption_read();
                let cut = at_eof && !self.close_within(consumed);
                assert!(
                    corrupted || cut || read_error || write_error,
                    "a read failed ({kind:?}) with no corruption, EOF or stream error \
                     ({consumed} bytes read, corruption at {})",
                    self.corrupt_at
                );
                assert!(
                    matches!(
                        kind,
                        io::ErrorKind::InvalidData
                            | io::ErrorKind::UnexpectedEof
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::BrokenPipe
                            | io::ErrorKind::WriteZero
                    ),
                    "a read failed with {kind:?}"
                );
                if kind == io::ErrorKind::UnexpectedEof {
                    assert!(cut, "UnexpectedEof before the stream's EOF");
                }
                // A write error met by a read (sending what was queued) ends nothing: the next read may
                // find data. Every other error is final.
                if !matches!(kind, io::ErrorKind::BrokenPipe | io::ErrorKind::WriteZero) {
                    self.failed = true;
                }
                self.tls_failed |= kind == io::ErrorKind::InvalidData;
            }
            Outcome::Pending => {
                assert_eq!(
                    consumed, readable_end,
                    "Pending with bytes left to read in the stream"
                );
                assert!(!at_eof, "Pending at the stream's EOF");
                if !self.failed {
                    assert!(
                        self.read >= ready,
                        "Pending with whole records of data unread ({} read of {ready})",
                        self.read
                    );
                    assert!(
                        !self.close_within(consumed),
                        "Pending after the client's close_notify"
                    );
                    assert!(
                        !(self.corruption_read() && self.corruption_decidable(consumed)),
                        "Pending with a whole corrupted record read (at {})",
                        self.corrupt_at
                    );
                }
            }
        }
        self.buf = buf;
        self.quiet = outcome == Outcome::Pending && !self.failed && self.at_boundary();
        self.last = Some(outcome);
        self.check_bound(session);
        outcome
    }

    fn read_all<C: Engine + Unpin>(&mut self, session: &mut TlsSession<C, Io>, size: usize, reads: usize) -> Outcome {
        let mut outcome = Outcome::Pending;
        for _ in 0..reads {
            outcome = self.read_once(session, size);
            if !matches!(outcome, Outcome::Data(_)) {
                break;
            }
        }
        outcome
    }

    fn write<C: Engine + Unpin>(&mut self, session: &mut TlsSession<C, Io>, len: usize) {
        let len = len.min(MAX_DATA - self.written);
        let data = &server_data()[self.written..self.written + len];
        let poll = Pin::new(&mut *session).poll_write(&mut Self::cx(), data);
        match poll {
            Poll::Ready(Ok(n)) => {
                assert!(
                    !self.tls_failed || n == 0,
                    "a write after the session failed took {n} bytes"
                );
                if len == 0 {
                    assert_eq!(n, 0, "an empty write took {n} bytes");
                } else {
                    assert!(
                        (1..=len.min(WRITE_SIZE)).contains(&n),
                        "a write of {len} took {n}"
                    );
                }
                self.written += n;
            }
            Poll::Ready(Err(error)) => self.check_write_error("write", error),
            Poll::Pending => self.check_write_pending("write"),
        }
        self.check_bound(session);
    }

    fn check_write_error(&self, what: &str, error: io::Error) {
        let wire = self.wire.borrow();
        assert!(
            self.failed
                || self.corruption_read()
                || wire.write_error
                || wire.write_zero
                || wire.shut
                || self.shutdown_called,
            "a {what} failed with no reason: {error}"
        );
    }

    fn check_write_pending(&self, what: &str) {
        assert_eq!(
            self.wire.borrow().write_budget,
            Some(0),
            "a {what} is Pending while the stream takes writes"
        );
    }

    fn flush<C: Engine + Unpin>(&mut self, session: &mut TlsSession<C, Io>) -> bool {
        let poll = Pin::new(&mut *session).poll_flush(&mut Self::cx());
        let flushed = match poll {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(error)) => {
                self.check_write_error("flush", error);
                false
            }
            Poll::Pending => {
                self.check_write_pending("flush");
                false
            }
        };
        if flushed && self.quiet {
            assert_eq!(
                session.buffered_capacity(),
                0,
                "a quiet session holds a buffer after a flush"
            );
        }
        self.check_bound(session);
        flushed
    }

    fn shutdown<C: Engine + Unpin>(&mut self, session: &mut TlsSession<C, Io>) {
        if !self.shutdown_called {
            self.written_at_shutdown = self.written;
        }
        self.shutdown_called = true;
        match Pin::new(&mut *session).poll_shutdown(&mut Self::cx()) {
            Poll::Ready(Ok(())) => {
                assert!(self.wire.borrow().shut, "shutdown did not reach the stream");
                self.shutdown_done = true;
            }
            Poll::Ready(Err(error)) => self.check_write_error("shutdown", error),
            Poll::Pending => self.check_write_pending("shutdown"),
        }
        self.check_bound(session);
    }

    /// The client takes what the server wrote: well-formed records, its data in order.
    fn client_read(&mut self) {
        let output = std::mem::take(&mut self.wire.borrow_mut().output);
        self.records_checked += check_records(&output[self.records_checked..]);
        let mut rest = &output[self.client_taken..];
        // (`read_tls` on nothing would tell the client the stream ended.)
        let mut stuck = 0;
        while !self.client_failed && !rest.is_empty() {
            let n = match self.client.read_tls(&mut rest) {
                Ok(n) => n,
                Err(error) => panic!("the client cannot take the server's bytes: {error}"),
            };
            self.client_taken += n;
            // Nothing taken: the client has the server's close_notify (it ignores what follows), or
            // rustls' buffer is full of records it has not processed yet (its plaintext buffer was
            // full), and processing and reading the plaintext below makes room.
            if n == 0 && self.client_saw_close {
                break;
            }
            stuck = if n == 0 { stuck + 1 } else { 0 };
            assert!(stuck < 3, "the client takes nothing more");
            if let Err(error) = self.client.process_new_packets() {
                // The server sends a fatal alert when it fails.
                assert!(
                    self.failed || self.corruption_read(),
                    "the client refused what the server wrote: {error}"
                );
                self.client_failed = true;
            }
            self.client_drain();
        }
        self.wire.borrow_mut().output = output;
    }

    /// The client reads the data it has decrypted (rustls holds a bounded amount).
    fn client_drain(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        loop {
            match self.client.reader().read(&mut buf) {
                Ok(0) => {
                    self.client_saw_close = true;
                    break;
                }
                Ok(n) => {
                    assert!(
                        self.client_data + n <= self.written,
                        "the client received more than the server's writes took"
                    );
                    assert!(
                        buf[..n] == server_data()[self.client_data..self.client_data + n],
                        "the client received data changed at {}",
                        self.client_data
                    );
                    self.client_data += n;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => panic!("the client's reader failed: {error}"),
            }
        }
        self.buf = buf;
    }

    fn op<C: Engine + Unpin>(&mut self, session: &mut TlsSession<C, Io>, op: Op<'_>) {
        match op {
            // A client that closed, or got the server's fatal alert, sends nothing more.
            Op::ClientData { len, record } => {
                if self.client_closed || self.client_failed {
                    return;
                }
                let len = len.min(MAX_DATA - self.data_sent);
                let record = match MAX_RECORDS.saturating_sub(self.records) {
                    0 => 16 << 10,
                    records => record.max(len.div_ceil(records)).min(16 << 10),
                };
                let mut left = len;
                while left > 0 {
                    self.records += 1;
                    let n = left.min(record);
                    let data = &client_data()[self.data_sent..self.data_sent + n];
                    let taken = self.client.writer().write(data).expect("client write");
                    assert_eq!(taken, n, "the client's writer took part of a record");
                    self.data_sent += n;
                    left -= n;
                    self.key_updates_in_a_row = 0;
                    self.client_flush(Kind::Data);
                }
            }
            Op::KeyUpdate => {
                // The 33rd key update in a row is refused like a corruption: not after a shutdown.
                if self.client_closed
                    || self.client_failed
                    || (self.shutdown_called && self.key_updates_in_a_row >= 32)
                    || self.client.refresh_traffic_keys().is_err()
                {
                    return;
                }
                let start = self.wire.borrow().input.len();
                self.client_flush(Kind::KeyUpdate);
                self.key_updates_in_a_row += 1;
                if self.key_updates_in_a_row > 32 {
                    self.corrupt_other = self.corrupt_other.min(start);
                    self.corrupt_at = self.corrupt_at.min(start);
                }
            }
            Op::CloseNotify => {
                if self.client_closed || self.client_failed {
                    return;
                }
                self.client.send_close_notify();
                self.client_closed = true;
                self.client_flush(Kind::Close);
            }
            Op::Raw { bytes, times } => {
                if bytes.is_empty() || self.shutdown_called {
                    return;
                }
                let mut wire = self.wire.borrow_mut();
                let start = wire.input.len();
                put_raw(&mut wire.input, bytes, times);
                self.corrupt_other = self.corrupt_other.min(start);
                self.corrupt_at = self.corrupt_at.min(start);
                self.segments.push(Segment {
                    start,
                    end: wire.input.len(),
                    kind: Kind::Raw,
                    data_end: self.data_sent,
                });
            }
            Op::Flip { at, mask } => {
                if self.shutdown_called {
                    return;
                }
                let mut wire = self.wire.borrow_mut();
                let unread = wire.input.len() - wire.consumed;
                if unread == 0 {
                    return;
                }
                let mut at = wire.consumed + usize::from(at) % unread;
                let segment = self
                    .segments
                    .get(self.segments.partition_point(|s| s.end <= at))
                    .copied();
                if let Some(segment) = segment {
                    // In TLS 1.3 rustls decrypts with the header RFC 8446 §5.2 has records sent with
                    // (type 23, version 3.3), not the one received: a record whose type or version
                    // was changed (to one rustls still takes) decrypts. Those bytes are not flipped
                    // there; the length after them is.
                    if self.tls13 && segment.kind != Kind::Raw && at - segment.start < 3 {
                        at = segment.start + 3;
                        if at < wire.consumed {
                            return;
                        }
                    }
                }
                wire.input[at] ^= mask;
                drop(wire);
                // The same flip again puts the byte back.
                let net = self.flipped.entry(at).or_insert(0);
                *net ^= mask;
                if *net == 0 {
                    self.flipped.remove(&at);
                }
                self.corrupt_at = self.corrupt_other;
                if let Some(&first) = self.flipped.keys().next() {
                    let segment = self.segments.partition_point(|s| s.end <= first);
                    let start = self.segments.get(segment).map_or(first, |s| s.start);
                    self.corrupt_at = self.corrupt_at.min(start);
                }
            }
            Op::Let(n) => {
                let mut wire = self.wire.borrow_mut();
                wire.limit = n.map(|n| wire.consumed + n);
            }
            Op::ReadPiece(n) => self.wire.borrow_mut().read_piece = n,
            Op::Eof => {
                let mut wire = self.wire.borrow_mut();
                if wire.eof_at.is_none() {
                    wire.eof_at = Some(wire.readable_end());
                }
            }
            Op::Read(size) => {
                self.read_once(session, size);
            }
            Op::ReadAll(size) => {
                self.read_all(session, size, MAX_READS);
            }
            Op::Write(len) => self.write(session, len),
            Op::Flush => {
                self.flush(session);
            }
            // Not while a corruption waits in the stream (see the module's notes): before it, or once the
            // session failed on it (a failed session does not call rustls again).
            Op::Shutdown => {
                if self.corrupt_at == usize::MAX || self.tls_failed {
                    self.shutdown(session);
                }
            }
            Op::WriteBudget { more, piece } => {
                let mut wire = self.wire.borrow_mut();
                wire.write_budget = more.map(|n| wire.write_budget.unwrap_or(0) + n);
                wire.write_piece = piece;
            }
            Op::Fail(which) => fail(&mut self.wire.borrow_mut(), which),
            Op::ClientRead => self.client_read(),
        }
    }

    /// Everything let through and written; the server reads until it can go no further.
    fn finish<C: Engine + Unpin>(&mut self, session: &mut TlsSession<C, Io>) {
        let (read_error, write_error, input_len, eof_at) = {
            let mut wire = self.wire.borrow_mut();
            wire.limit = None;
            wire.write_budget = None;
            wire.write_piece = usize::MAX;
            (
                wire.read_error,
                wire.write_error || wire.write_zero,
                wire.input.len(),
                wire.eof_at,
            )
        };
        let flushed = self.flush(session);
        // Until the reads stop returning data: each returns at least a byte, the last one ends it.
        let size = self.read_size.max(LARGE_BUFFER);
        let end = self.read_all(session, size, MAX_DATA + 1);
        assert!(!matches!(end, Outcome::Data(_)), "data without end");
        // (A read that met the stream's write error answers differently once it has nothing to send.)
        if !matches!(
            end,
            Outcome::Data(_) | Outcome::Error(io::ErrorKind::BrokenPipe | io::ErrorKind::WriteZero)
        ) {
            for _ in 0..2 {
                let again = self.read_once(session, size);
                assert_eq!(again, end, "a read after {end:?} answered {again:?}");
            }
        }
        let flushed = self.flush(session) || flushed;
        let stream_end = eof_at.unwrap_or(input_len);
        // A read that sends what is queued reports the stream's write error (after a shutdown too)
        // instead of its own answer.
        let clean = !read_error
            && !write_error
            && !matches!(
                end,
                Outcome::Error(io::ErrorKind::BrokenPipe | io::ErrorKind::WriteZero)
            );
        if clean {
            let corrupted = self.corrupt_at < stream_end && !self.close_within(self.corrupt_at);
            if self.close_within(stream_end) && !self.failed {
                assert_eq!(end, Outcome::Eof, "no EOF after the client's close_notify");
            } else if corrupted && self.corruption_decidable(stream_end) {
                assert!(
                    matches!(end, Outcome::Error(_)),
                    "a corrupted stream ended with {end:?}"
                );
            } else if corrupted {
                // The corrupted record is not whole: the session waits for the rest of it, meets the EOF,
                // or rustls refused its header already (it reads the headers of whatever follows a record
                // it processes).
                assert!(
                    match end {
                        Outcome::Pending => eof_at.is_none(),
                        Outcome::Error(kind) =>
                            kind != io::ErrorKind::UnexpectedEof || eof_at.is_some(),
                        _ => false,
                    },
                    "a stream ending in a cut corrupted record ended with {end:?}"
                );
            } else if eof_at.is_some() {
                assert_eq!(
                    end,
                    Outcome::Error(io::ErrorKind::UnexpectedEof),
                    "a stream cut without close_notify"
                );
                assert_eq!(
                    self.read,
                    self.data_ready(stream_end),
                    "data lost before the stream's EOF"
                );
            } else {
                assert_eq!(end, Outcome::Pending, "an open, clean stream");
                assert_eq!(self.read, self.data_sent, "data lost");
                // (Unless the server shut the stream down and wrote after: that never leaves.)
                if !self.wire.borrow().shut {
                    assert!(flushed, "nothing blocks the flush");
                    assert_eq!(
                        session.buffered_capacity(),
                        0,
                        "a quiet session holds a buffer"
                    );
                }
            }
        }
        // What the server wrote reaches the client whole.
        self.client_read();
        let output_len = self.wire.borrow().output.len();
        if clean && !self.failed && !self.corruption_read() && flushed {
            assert_eq!(
                check_records(&self.wire.borrow().output),
                output_len,
                "the server's output ends in a cut record"
            );
            assert!(!self.client_failed);
            let sent = if self.shutdown_called {
                self.written_at_shutdown
            } else {
                self.written
            };
            assert_eq!(
                self.client_data, sent,
                "the client did not receive every byte the server's writes took"
            );
            if self.shutdown_called {
                assert!(
                    self.client_saw_close,
                    "no close_notify after the server's shutdown"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The two modes

pub fn run(data: &[u8]) {
    let mut c = Cursor(data);
    let (Some(flags), Some(read_piece), Some(write_piece)) = (c.byte(), c.byte(), c.byte()) else {
        return;
    };
    if flags & 1 == 0 {
        raw(c, piece(read_piece), piece(write_piece));
    } else {
        let client = &configs().clients[usize::from(flags & 2 != 0)][usize::from(flags & 4 != 0)];
        with_client(c, client, piece(read_piece), piece(write_piece), flags & 8 != 0);
    }
}

/// Raw mode: the script's `Raw` bytes are the stream; server operations poll `accept`.
fn raw(mut c: Cursor<'_>, read_piece: usize, write_piece: usize) {
    let wire = Rc::new(RefCell::new(Wire {
        read_piece,
        write_piece,
        ..Wire::default()
    }));
    let mut accept = Box::pin(tls_accept(
        Io(Rc::clone(&wire)),
        Arc::clone(&configs().server),
    ));
    let mut poll_accept = || match accept.as_mut().poll(&mut Run::cx()) {
        Poll::Pending => None,
        Poll::Ready(result) => Some(result.map(drop)),
    };
    let mut result = None;
    while result.is_none() {
        let Some(op) = Op::parse(&mut c) else { break };
        match op {
            Op::Raw { bytes, times } => put_raw(&mut wire.borrow_mut().input, bytes, times),
            Op::Let(n) => {
                let mut wire = wire.borrow_mut();
                wire.limit = n.map(|n| wire.consumed + n);
            }
            Op::ReadPiece(n) => wire.borrow_mut().read_piece = n,
            Op::Eof => {
                let mut wire = wire.borrow_mut();
                if wire.eof_at.is_none() {
                    wire.eof_at = Some(wire.readable_end());
                }
            }
            Op::WriteBudget { more, piece } => {
                let mut wire = wire.borrow_mut();
                wire.write_budget = more.map(|n| wire.write_budget.unwrap_or(0) + n);
                wire.write_piece = piece;
            }
            Op::Fail(which) => fail(&mut wire.borrow_mut(), which),
            Op::Read(_) | Op::ReadAll(_) | Op::Write(_) | Op::Flush | Op::Shutdown => {
                result = poll_accept();
            }
            _ => {}
        }
    }
    {
        let mut wire = wire.borrow_mut();
        wire.limit = None;
        wire.write_budget = None;
    }
    let result = result.or_else(poll_accept);
    let wire = wire.borrow();
    if let Some(Err(error)) = result {
        let kind = error.kind();
        let allowed = match kind {
            io::ErrorKind::InvalidData => true,
            io::ErrorKind::UnexpectedEof => wire.at_eof(),
            io::ErrorKind::ConnectionReset => wire.read_error,
            io::ErrorKind::BrokenPipe => wire.write_error,
            io::ErrorKind::WriteZero => wire.write_zero,
            _ => false,
        };
        assert!(allowed, "the handshake failed with {kind:?}: {error}");
    }
    check_records(&wire.output);
}

/// Client mode: a real client makes the handshake, then the script runs.
fn with_client(
    c: Cursor<'_>,
    config: &Arc<ClientConfig>,
    read_piece: usize,
    write_piece: usize,
    hand_over: bool,
) {
    let client = ClientConnection::new(
        Arc::clone(config),
        ServerName::try_from("localhost").expect("name"),
    )
    .expect("client");
    let wire = Rc::new(RefCell::new(Wire {
        read_piece,
        write_piece,
        ..Wire::default()
    }));
    let mut run = Run {
        wire: Rc::clone(&wire),
        segments: Vec::new(),
        first_close: None,
        corrupt_at: usize::MAX,
        corrupt_other: usize::MAX,
        flipped: BTreeMap::new(),
        data_sent: 0,
        key_updates_in_a_row: 0,
        records: 0,
        client,
        client_closed: false,
        client_taken: 0,
        client_data: 0,
        client_failed: false,
        client_saw_close: false,
        read: 0,
        last: None,
        failed: false,
        eof: false,
        tls_failed: false,
        written: 0,
        shutdown_called: false,
        shutdown_done: false,
        written_at_shutdown: 0,
        quiet: false,
        read_size: 1,
        reads: 0,
        tls13: false,
        buf: vec![0; MAX_READ],
        records_checked: 0,
    };
    let session = {
        let mut accept = Box::pin(tls_accept(
            Io(Rc::clone(&wire)),
            Arc::clone(&configs().server),
        ));
        let mut session = None;
        for _ in 0..64 {
            run.client_flush(Kind::Handshake);
            if session.is_none()
                && let Poll::Ready(result) = accept.as_mut().poll(&mut Run::cx())
            {
                session = Some(result.expect("the server's handshake with a real client"));
            }
            run.client_read();
            assert!(!run.client_failed, "the client's handshake failed");
            if session.is_some() && !run.client.is_handshaking() {
                break;
            }
        }
        session.expect("the handshake never completed")
    };
    // The handshake's segments are one: what the client sent before any data.
    let handshake_end = wire.borrow().input.len();
    run.segments = vec![Segment {
        start: 0,
        end: handshake_end,
        kind: Kind::Handshake,
        data_end: 0,
    }];
    assert_eq!(
        wire.borrow().consumed,
        handshake_end,
        "the handshake left client bytes unread"
    );
    run.tls13 = run.client.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
    run.check_bound(&session);
    if !hand_over {
        return script(run, session, c);
    }
    match session.establish() {
        Established::Own(session) => {
            assert!(run.tls13, "a TLS 1.2 session left rustls");
            script(run, *session, c);
        }
        Established::Rustls(session) => {
            assert!(!run.tls13, "a TLS 1.3 session stayed with rustls");
            script(run, *session, c);
        }
        Established::Lost(_) => panic!("the session was lost at the hand-over"),
    }
}

/// The script, then the final phase, on the session as the handshake left it or after its hand-over.
fn script<C: Engine + Unpin>(mut run: Run, mut session: TlsSession<C, Io>, mut c: Cursor<'_>) {
    while let Some(op) = Op::parse(&mut c) {
        run.op(&mut session, op);
    }
    run.finish(&mut session);
}

// ---------------------------------------------------------------------------------------------------------
// Writing inputs (the seeds)

/// Inputs written op by op, in the layout `Op::parse` reads.
pub mod script {
    /// The header: raw or client mode, TLS 1.2 or 1.3, AES-128-GCM or ChaCha20, the handshake's read and
    /// write piece bytes.
    pub fn start(
        client: bool,
        tls12: bool,
        chacha: bool,
        read_piece: u8,
        write_piece: u8,
    ) -> Vec<u8> {
        vec![
            u8::from(client) | u8::from(tls12) << 1 | u8::from(chacha) << 2,
            read_piece,
            write_piece,
        ]
    }

    fn u16(out: &mut Vec<u8>, code: u8, n: u16) {
        out.push(code);
        out.extend_from_slice(&n.to_le_bytes());
    }

    pub fn client_data(out: &mut Vec<u8>, len: u16, record: u16) {
        u16(out, 0, len);
        out.extend_from_slice(&record.to_le_bytes());
    }
    pub fn key_update(out: &mut Vec<u8>) {
        out.push(1);
    }
    pub fn close_notify(out: &mut Vec<u8>) {
        out.push(2);
    }
    pub fn raw(out: &mut Vec<u8>, bytes: &[u8]) {
        raw_times(out, bytes, 1);
    }
    pub fn raw_times(out: &mut Vec<u8>, bytes: &[u8], times: u8) {
        u16(out, 3, bytes.len() as u16);
        out.push(times);
        out.extend_from_slice(bytes);
    }
    pub fn flip(out: &mut Vec<u8>, at: u16, mask: u8) {
        u16(out, 4, at);
        out.push(mask);
    }
    /// `None`: let everything through from now on.
    pub fn let_through(out: &mut Vec<u8>, n: Option<u16>) {
        u16(out, 5, n.unwrap_or(u16::MAX));
    }
    pub fn read_piece(out: &mut Vec<u8>, piece: u8) {
        out.extend_from_slice(&[6, piece]);
    }
    pub fn eof(out: &mut Vec<u8>) {
        out.push(7);
    }
    pub fn read(out: &mut Vec<u8>, size: u16) {
        u16(out, 8, size);
    }
    pub fn read_all(out: &mut Vec<u8>, size: u16) {
        u16(out, 9, size);
    }
    /// Writes twice `half` bytes.
    pub fn write(out: &mut Vec<u8>, half: u16) {
        u16(out, 10, half);
    }
    pub fn flush(out: &mut Vec<u8>) {
        out.push(11);
    }
    pub fn shutdown(out: &mut Vec<u8>) {
        out.push(12);
    }
    /// `None`: writes take anything from now on.
    pub fn write_budget(out: &mut Vec<u8>, more: Option<u16>, piece: u8) {
        u16(out, 13, more.unwrap_or(u16::MAX));
        out.push(piece);
    }
    /// Bit 0: reads fail from now on; bit 1: writes.
    pub fn fail(out: &mut Vec<u8>, which: u8) {
        out.extend_from_slice(&[14, which]);
    }
    pub fn client_read(out: &mut Vec<u8>) {
        out.push(15);
    }
}

/// The first flight of a real client (its ClientHello), for the raw mode's seeds.
pub fn client_hello(tls12: bool) -> Vec<u8> {
    let config = &configs().clients[usize::from(tls12)][0];
    let mut client = ClientConnection::new(
        Arc::clone(config),
        ServerName::try_from("localhost").expect("name"),
    )
    .expect("client");
    let mut out = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut out).expect("write_tls");
    }
    out
}
/// The input as its operations, one a line: to read a crashing input (`run` replays it).
pub fn describe(data: &[u8]) -> String {
    let mut c = Cursor(data);
    let mut out = format!("header {:?}\n", c.bytes(3));
    while let Some(op) = Op::parse(&mut c) {
        match op {
            Op::Raw { bytes, times } => {
                out += &format!("Raw({} bytes × {times}: {bytes:02x?})\n", bytes.len())
            }
            op => out += &format!("{op:?}\n"),
        }
    }
    out
}
