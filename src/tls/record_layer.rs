//! An established TLS 1.3 session's records, sealed and opened by wsgate rather than by rustls'
//! connection, so that a long-lived session (a client's, from its handshake on; a TLS backend's, from its
//! tunnel's start) keeps the two directions' keys and the secret that derives the next ones, and not
//! rustls' whole connection (its handshake state, queues and settings).
//!
//! rustls still does every cryptographic step. Its connection hands over the traffic keys and a
//! `KernelConnection` (rustls' API for kTLS), which derives each direction's next keys on a key update;
//! records are sealed and opened by the suite's own AEAD (`Tls13AeadAlgorithm`: the nonce from the
//! sequence number, the record header as additional data, the inner content type and its padding, the
//! limit on a record's plaintext). What this file adds is the framing around them (RFC 8446 §5):
//! - records carry at most 2^14 bytes of plaintext, each sealed under the next sequence number, and a
//!   direction's keys are updated (with a `KeyUpdate` to the peer) before its sequence number reaches the
//!   suite's confidentiality limit;
//! - what may come in after the handshake: application data; alerts (`close_notify` ends reads,
//!   `user_canceled` is ignored, any other ends the session, RFC 8446 §6); `KeyUpdate`; and, to a client
//!   (toward a TLS backend), `NewSessionTicket`, whose ticket rustls stores for the next connection to
//!   resume. A `KeyUpdate` is followed, and no more than 32 are taken in a row without application data
//!   between them (rustls' limit). One that asks for ours is answered, as rustls does, right before the
//!   next record of application data (RFC 8446 §4.6.3: "prior to sending its next Application Data
//!   record"): requests that come while wsgate has nothing to send are answered once, and a peer that
//!   asks with each of its messages never receives more `KeyUpdate`s in a row than it sent data records;
//! - anything else is refused with the alert RFC 8446 names, sealed under the current keys: an
//!   unprotected record or another message (`unexpected_message`), a record that does not open
//!   (`bad_record_mac`), one too long (`record_overflow`), a malformed alert or `KeyUpdate`
//!   (`decode_error`, `illegal_parameter`). A handshake message may not span records here (RFC 8446 lets
//!   it; a `KeyUpdate` is five bytes long, and peers send each ticket whole), nor follow a `KeyUpdate` in
//!   its record (§5.1: handshake messages must not span a key change).
//!
//! Only sessions rustls can hand over are taken (`RecordLayer::takes`); the rest (TLS 1.2) stay rustls'.

use std::io;

use rustls::client::ClientConnectionData;
use rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, Iv, MessageDecrypter, MessageEncrypter, OutboundChunks,
    OutboundPlainMessage,
};
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{
    AlertDescription, ConnectionTrafficSecrets, ContentType, HandshakeType, ProtocolVersion,
    SupportedCipherSuite, Tls13CipherSuite,
};
use tokio::io::ReadBuf;

use super::session::{Buffers, Engine, Side, Step, deliver, overhead, tls_error};

/// The most ciphertext a TLS 1.3 record may carry: 2^14 bytes of plaintext, its content type, padding
/// and tag (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = (16 << 10) + 256;
/// The most plaintext a record carries.
const MAX_FRAGMENT: usize = 16 << 10;
/// A direction's keys are updated before its sequence number passes this, whatever the suite's limit:
/// rustls' own margin below 2^64.
const SEQ_SOFT_LIMIT: u64 = 0xffff_ffff_ffff_0000;
/// `KeyUpdate`s taken in a row, with no application data between them: each costs key derivations, and
/// a peer has no use for more (rustls' own limit).
const MAX_UPDATES_IN_A_ROW: u8 = 32;
/// `KeyUpdate`'s `request_update` values (RFC 8446 §4.6.3).
const UPDATE_NOT_REQUESTED: u8 = 0;
const UPDATE_REQUESTED: u8 = 1;
/// An alert's level byte: TLS 1.3 ignores it on receipt, and rustls sends `close_notify` as a warning.
const LEVEL_WARNING: u8 = 1;
const LEVEL_FATAL: u8 = 2;

/// What differs between the two ends after the handshake: the handshake messages a peer may send besides
/// `KeyUpdate`.
pub trait Role: Sized {
    /// Takes a `NewSessionTicket` (its body); `None` where the peer may not send one (to a server).
    fn ticket(
        secrets: &mut KernelConnection<Self>,
        body: &[u8],
    ) -> Option<Result<(), rustls::Error>>;
}

impl Role for ServerConnectionData {
    fn ticket(_: &mut KernelConnection<Self>, _: &[u8]) -> Option<Result<(), rustls::Error>> {
        None
    }
}

/// A backend's tickets go to the client config's session store, for the next connection to resume.
impl Role for ClientConnectionData {
    fn ticket(
        secrets: &mut KernelConnection<Self>,
        body: &[u8],
    ) -> Option<Result<(), rustls::Error>> {
        Some(secrets.handle_new_session_ticket(body))
    }
}

/// A TLS 1.3 session after the handshake, the server's (`D` = `ServerConnectionData`) or the client's
/// (see the file's comment).
pub struct RecordLayer<D> {
    /// rustls' key schedule after the handshake: derives each direction's next keys.
    secrets: Box<KernelConnection<D>>,
    suite: &'static Tls13CipherSuite,
    /// Seals records to the peer under `tx_seq`, the next sequence number.
    seal: Box<dyn MessageEncrypter>,
    tx_seq: u64,
    /// The sequence number from which keys are updated before the next record is sealed: the suite's
    /// confidentiality limit.
    update_at: u64,
    /// Opens the peer's records under `rx_seq`.
    open: Box<dyn MessageDecrypter>,
    rx_seq: u64,
    /// The peer asked for a `KeyUpdate` of ours, owed before the next record of application data.
    answer_owed: bool,
    /// `KeyUpdate`s received since the last record of application data.
    updates_in_a_row: u8,
}

impl<D: Role> RecordLayer<D> {
    /// Whether rustls can hand `conn` over: a TLS 1.3 session whose handshake is over, with nothing left
    /// to send, under a suite whose keys rustls gives out. (The hand-over consumes the connection even
    /// when it fails, so it is asked first; the config must also allow it, which the caller knows.)
    pub fn takes<C: Side<Data = D>>(conn: &C) -> bool {
        let Some(SupportedCipherSuite::Tls13(suite)) = conn.negotiated_cipher_suite() else {
            return false;
        };
        let probe = suite
            .aead_alg
            .extract_keys(AeadKey::from([0; 32]), Iv::new([0; 12]));
        !conn.is_handshaking()
            && conn.protocol_version() == Some(ProtocolVersion::TLSv1_3)
            && !conn.wants_write()
            && probe.is_ok()
    }

    /// Takes `conn` over (see `takes`).
    pub fn take<C: Side<Data = D>>(conn: C) -> io::Result<RecordLayer<D>> {
        let (secrets, kernel) = conn.into_kernel().map_err(tls_error)?;
        let SupportedCipherSuite::Tls13(suite) = kernel.negotiated_cipher_suite() else {
            return Err(io::Error::other("TLS session handed over is not TLS 1.3"));
        };
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        Ok(RecordLayer {
            secrets: Box::new(kernel),
            suite,
            seal: encrypter(suite, tx)?,
            tx_seq,
            update_at: suite.common.confidentiality_limit.min(SEQ_SOFT_LIMIT),
            open: decrypter(suite, rx)?,
            rx_seq,
            answer_owed: false,
            updates_in_a_row: 0,
        })
    }

    /// Seals `payload` as one record of content type `typ` onto `outgoing`, updating the keys first if
    /// they have sealed as many records as they may, or if the peer asked and this is application data.
    fn seal(&mut self, outgoing: &mut Vec<u8>, typ: ContentType, payload: &[u8]) -> io::Result<()> {
        if self.tx_seq >= self.update_at
            || (self.answer_owed && typ == ContentType::ApplicationData)
        {
            self.update_tx(outgoing)?;
        }
        self.seal_one(outgoing, typ, payload)
    }

    fn seal_one(
        &mut self,
        outgoing: &mut Vec<u8>,
        typ: ContentType,
        payload: &[u8],
    ) -> io::Result<()> {
        let plain = OutboundPlainMessage {
            typ,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(payload),
        };
        let record = self.seal.encrypt(plain, self.tx_seq).map_err(tls_error)?;
        // No overflow: keys are updated (and the count restarted) at `update_at`, below `u64::MAX`.
        self.tx_seq += 1;
        let record = record.encode();
        // The record's own allocation becomes the write buffer when there is none: no copy.
        if outgoing.capacity() == 0 {
            *outgoing = record;
        } else {
            outgoing.extend_from_slice(&record);
        }
        Ok(())
    }

    /// Sends a `KeyUpdate` under the current keys, then seals under the next ones.
    fn update_tx(&mut self, outgoing: &mut Vec<u8>) -> io::Result<()> {
        let message = [
            u8::from(HandshakeType::KeyUpdate),
            0,
            0,
            1,
            UPDATE_NOT_REQUESTED,
        ];
        self.seal_one(outgoing, ContentType::Handshake, &message)?;
        let (seq, secrets) = self.secrets.update_tx_secret().map_err(tls_error)?;
        self.seal = encrypter(self.suite, secrets)?;
        self.tx_seq = seq;
        self.answer_owed = false;
        Ok(())
    }

    /// Follows the peer's `KeyUpdate`; if it asks for ours, one is owed (see the file's comment).
    fn update_rx(&mut self, requested: bool, outgoing: &mut Vec<u8>) -> io::Result<()> {
        if self.updates_in_a_row >= MAX_UPDATES_IN_A_ROW {
            return Err(self.refuse(
                outgoing,
                AlertDescription::UnexpectedMessage,
                "too many KeyUpdates in a row",
            ));
        }
        self.updates_in_a_row += 1;
        let (seq, secrets) = self.secrets.update_rx_secret().map_err(tls_error)?;
        self.open = decrypter(self.suite, secrets)?;
        self.rx_seq = seq;
        self.answer_owed |= requested;
        Ok(())
    }

    /// Queues the fatal alert `alert` (best effort: the session is over) and returns the error that ends
    /// the session.
    fn refuse(&mut self, outgoing: &mut Vec<u8>, alert: AlertDescription, why: &str) -> io::Error {
        let _ = self.seal(
            outgoing,
            ContentType::Alert,
            &[LEVEL_FATAL, u8::from(alert)],
        );
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("TLS peer misbehaved ({alert:?}): {why}"),
        )
    }

    /// An alert the peer sent.
    fn alert(
        &mut self,
        payload: &[u8],
        outgoing: &mut Vec<u8>,
        peer_closed: &mut bool,
    ) -> io::Result<()> {
        let &[_level, description] = payload else {
            return Err(self.refuse(
                outgoing,
                AlertDescription::DecodeError,
                "an alert of the wrong length",
            ));
        };
        match AlertDescription::from(description) {
            AlertDescription::CloseNotify => *peer_closed = true,
            AlertDescription::UserCanceled => {}
            other => return Err(tls_error(rustls::Error::AlertReceived(other))),
        }
        Ok(())
    }

    /// The handshake messages of one record the peer sent.
    fn handshake(&mut self, mut messages: &[u8], outgoing: &mut Vec<u8>) -> io::Result<()> {
        if messages.is_empty() {
            return Err(self.refuse(
                outgoing,
                AlertDescription::UnexpectedMessage,
                "an empty handshake record",
            ));
        }
        while !messages.is_empty() {
            let &[typ, a, b, c, ref rest @ ..] = messages else {
                return Err(self.split(outgoing));
            };
            let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
            let Some((body, after)) = rest.split_at_checked(len) else {
                return Err(self.split(outgoing));
            };
            match HandshakeType::from(typ) {
                HandshakeType::KeyUpdate => {}
                HandshakeType::NewSessionTicket => {
                    match D::ticket(&mut self.secrets, body) {
                        Some(Ok(())) => {}
                        Some(Err(error)) => {
                            return Err(self.refuse(
                                outgoing,
                                AlertDescription::DecodeError,
                                &error.to_string(),
                            ));
                        }
                        None => return Err(self.unexpected(outgoing)),
                    }
                    messages = after;
                    continue;
                }
                _ => return Err(self.unexpected(outgoing)),
            }
            let requested = match body {
                [UPDATE_NOT_REQUESTED] => false,
                [UPDATE_REQUESTED] => true,
                [_] => {
                    return Err(self.refuse(
                        outgoing,
                        AlertDescription::IllegalParameter,
                        "a KeyUpdate asking neither way",
                    ));
                }
                _ => {
                    return Err(self.refuse(
                        outgoing,
                        AlertDescription::DecodeError,
                        "a KeyUpdate of the wrong length",
                    ));
                }
            };
            if !after.is_empty() {
                return Err(self.refuse(
                    outgoing,
                    AlertDescription::UnexpectedMessage,
                    "data after a KeyUpdate in its record",
                ));
            }
            self.update_rx(requested, outgoing)?;
            messages = after;
        }
        Ok(())
    }

    /// Keys seal `records` records (and then the `KeyUpdate`) before they are updated; the session must not
    /// have sealed more under its current keys.
    #[cfg(test)]
    pub(super) fn update_keys_every(&mut self, records: u64) {
        self.update_at = records;
    }

    fn unexpected(&mut self, outgoing: &mut Vec<u8>) -> io::Error {
        self.refuse(
            outgoing,
            AlertDescription::UnexpectedMessage,
            "a handshake message this end may not receive after the handshake",
        )
    }

    fn split(&mut self, outgoing: &mut Vec<u8>) -> io::Error {
        self.refuse(
            outgoing,
            AlertDescription::UnexpectedMessage,
            "a handshake message split across records",
        )
    }
}

impl<D: Role> Engine for RecordLayer<D> {
    fn handshaking(&self) -> bool {
        false
    }

    fn process(
        &mut self,
        bufs: &mut Buffers,
        mut out: Option<&mut ReadBuf<'_>>,
    ) -> io::Result<Step> {
        let Buffers {
            incoming,
            plaintext,
            outgoing,
            peer_closed,
            ..
        } = bufs;
        loop {
            // Whatever follows `close_notify` is ignored (RFC 8446 §6.1).
            if *peer_closed {
                incoming.consume(incoming.len());
                return Ok(Step::Blocked);
            }
            let held = incoming.bytes_mut();
            let Some(&[typ, _, _, high, low]) = held.get(..5) else {
                return Ok(Step::Blocked);
            };
            let len = usize::from(u16::from_be_bytes([high, low]));
            if len > MAX_CIPHERTEXT {
                return Err(self.refuse(
                    outgoing,
                    AlertDescription::RecordOverflow,
                    "a record longer than TLS 1.3 allows",
                ));
            }
            // The record header's version is ignored (RFC 8446 §5.1); every record is protected now.
            if ContentType::from(typ) != ContentType::ApplicationData {
                return Err(self.refuse(
                    outgoing,
                    AlertDescription::UnexpectedMessage,
                    "an unprotected record after the handshake",
                ));
            }
            let Some(body) = held.get_mut(5..5 + len) else {
                return Ok(Step::Blocked);
            };
            let Some(next_seq) = self.rx_seq.checked_add(1) else {
                return Err(self.refuse(
                    outgoing,
                    AlertDescription::UnexpectedMessage,
                    "the peer's sequence numbers are exhausted",
                ));
            };
            let sealed = InboundOpaqueMessage::new(
                ContentType::ApplicationData,
                ProtocolVersion::TLSv1_2,
                body,
            );
            let record = match self.open.decrypt(sealed, self.rx_seq) {
                Ok(record) => record,
                Err(error) => {
                    let alert = match error {
                        rustls::Error::DecryptError => AlertDescription::BadRecordMac,
                        rustls::Error::PeerSentOversizedRecord => AlertDescription::RecordOverflow,
                        _ => AlertDescription::UnexpectedMessage,
                    };
                    return Err(self.refuse(outgoing, alert, &error.to_string()));
                }
            };
            self.rx_seq = next_seq;
            match record.typ {
                ContentType::ApplicationData => {
                    self.updates_in_a_row = 0;
                    deliver(record.payload, &mut out, plaintext);
                }
                ContentType::Alert => self.alert(record.payload, outgoing, peer_closed)?,
                ContentType::Handshake => self.handshake(record.payload, outgoing)?,
                _ => {
                    return Err(self.refuse(
                        outgoing,
                        AlertDescription::UnexpectedMessage,
                        "a record of an unknown content type",
                    ));
                }
            }
            incoming.consume(5 + len);
        }
    }

    fn encrypt(&mut self, bufs: &mut Buffers, data: &[u8]) -> io::Result<bool> {
        if data.len() > MAX_FRAGMENT {
            bufs.outgoing.reserve(data.len() + overhead(data.len()));
        }
        for fragment in data.chunks(MAX_FRAGMENT) {
            self.seal(&mut bufs.outgoing, ContentType::ApplicationData, fragment)?;
        }
        Ok(true)
    }

    fn close_notify(&mut self, bufs: &mut Buffers) -> io::Result<()> {
        let alert = [LEVEL_WARNING, u8::from(AlertDescription::CloseNotify)];
        self.seal(&mut bufs.outgoing, ContentType::Alert, &alert)
    }
}

/// The key and IV of a direction (every kind of TLS 1.3 keys rustls gives out has both).
pub(super) fn keys(secrets: ConnectionTrafficSecrets) -> io::Result<(AeadKey, Iv)> {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Ok((key, iv)),
        _ => Err(io::Error::other("TLS traffic keys of an unknown kind")),
    }
}

fn encrypter(
    suite: &Tls13CipherSuite,
    secrets: ConnectionTrafficSecrets,
) -> io::Result<Box<dyn MessageEncrypter>> {
    let (key, iv) = keys(secrets)?;
    Ok(suite.aead_alg.encrypter(key, iv))
}

fn decrypter(
    suite: &Tls13CipherSuite,
    secrets: ConnectionTrafficSecrets,
) -> io::Result<Box<dyn MessageDecrypter>> {
    let (key, iv) = keys(secrets)?;
    Ok(suite.aead_alg.decrypter(key, iv))
}
