//! A minimal WebSocket client spoken directly on a `TcpStream`, for the soak.
//!
//! The soak must see exactly what wsgate sends: a Close 1014 (tungstenite 0.30
//! rewrites that code to 1002 before the caller sees it), a FIN or a reset
//! without any Close, a 502/503 instead of a 101. So the handshake and the
//! framing are written out here (RFC 6455, client side: frames out are masked,
//! frames in must not be), with every read bounded in size and every wait
//! bounded in time by the caller.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::client;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest message accepted from wsgate: the soak's messages are 64 bytes.
const MAX_MESSAGE: usize = 1 << 20;
/// Largest response head read during the handshake.
const MAX_HEAD: usize = 16 * 1024;

/// One complete message or control frame from the server.
#[derive(Debug)]
pub enum Frame {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    /// Code (None when the Close had no payload) and reason.
    Close(Option<u16>, String),
}

impl Frame {
    /// What kind of frame, for failure descriptions.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Text(_) => "a text message",
            Frame::Binary(_) => "a binary message",
            Frame::Ping(_) => "a ping",
            Frame::Pong => "a pong",
            Frame::Close(..) => "a Close",
        }
    }
}

/// A Close code for descriptions.
pub fn close_code(code: Option<u16>) -> String {
    code.map_or_else(|| "without a code".into(), |c| c.to_string())
}

/// How the connection ended without a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gone {
    /// Orderly TCP end (FIN) with no Close before it.
    Fin,
    /// TCP reset (or aborted).
    Rst,
    /// Another socket error.
    Io(ErrorKind),
    /// A write did not finish within its limit.
    Stalled,
    /// The server broke the framing rules.
    Protocol(&'static str),
}

impl Gone {
    /// A short, low-cardinality label for counters.
    pub fn label(&self) -> String {
        match self {
            Gone::Fin => "FIN without Close".into(),
            Gone::Rst => "TCP reset".into(),
            Gone::Io(k) => format!("socket error {k:?}"),
            Gone::Stalled => "write stalled".into(),
            Gone::Protocol(p) => format!("protocol: {p}"),
        }
    }
}

fn gone_from(e: &std::io::Error) -> Gone {
    match e.kind() {
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => Gone::Rst,
        ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof => Gone::Fin,
        k => Gone::Io(k),
    }
}

/// Why an upgrade did not give a WebSocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HsError {
    /// TCP connect failed.
    Connect(ErrorKind),
    /// An HTTP answer other than 101.
    Status(u16),
    /// The connection ended before the 101 was complete.
    Gone(Gone),
    /// A 101 with a wrong or missing Sec-WebSocket-Accept, or an unreadable head.
    Bad(&'static str),
    /// Nothing complete within the limit.
    Timeout,
}

impl HsError {
    pub fn label(&self) -> String {
        match self {
            HsError::Connect(k) => format!("connect: {k:?}"),
            HsError::Status(s) => format!("HTTP {s} instead of 101"),
            HsError::Gone(g) => format!("before 101: {}", g.label()),
            HsError::Bad(b) => format!("bad 101: {b}"),
            HsError::Timeout => "upgrade timed out".into(),
        }
    }

    /// A 502 or 503: what wsgate answers when no backend can take the connection.
    pub fn is_refusal(&self) -> bool {
        matches!(self, HsError::Status(502 | 503))
    }
}

/// An upgraded connection.
pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    /// Opcode and bytes of a fragmented message being assembled.
    partial: Option<(u8, Vec<u8>)>,
}

/// TCP connect (from a spread loopback source) and upgrade to `ws://dst/soak`,
/// within `limit`. Bytes after the 101 (the backend's greeting may come in the
/// same segment) stay buffered for `read_frame`.
pub async fn connect(dst: SocketAddr, limit: Duration) -> Result<Conn, HsError> {
    match timeout(limit, connect_inner(dst)).await {
        Ok(r) => r,
        Err(_) => Err(HsError::Timeout),
    }
}

async fn connect_inner(dst: SocketAddr) -> Result<Conn, HsError> {
    let mut stream = client::tcp_connect(dst, client::next_source())
        .await
        .map_err(|e| HsError::Connect(e.kind()))?;
    let key = generate_key();
    let req = format!(
        "GET /soak HTTP/1.1\r\nHost: soak\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| HsError::Gone(gone_from(&e)))?;
    let mut buf = BytesMut::with_capacity(1024);
    // Bounded: every turn reads at least one byte and the head is capped.
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(HsError::Bad("response head over 16 KiB"));
        }
        buf.reserve(1024);
        match stream.read_buf(&mut buf).await {
            Ok(0) => return Err(HsError::Gone(Gone::Fin)),
            Ok(_) => {}
            Err(e) => return Err(HsError::Gone(gone_from(&e))),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.advance(head_end);
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or(HsError::Bad("no status line"))?;
    if status != 101 {
        return Err(HsError::Status(status));
    }
    let accept = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-accept")
            .then(|| value.trim().to_string())
    });
    if accept.as_deref() != Some(derive_accept_key(key.as_bytes()).as_str()) {
        return Err(HsError::Bad("Sec-WebSocket-Accept missing or wrong"));
    }
    Ok(Conn {
        stream,
        buf,
        partial: None,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A masked client frame.
fn encode(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    let mask = fastrand::u32(..).to_be_bytes();
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Takes one whole frame off `buf`, if there is one, and returns it when it
/// completes a message (or is a control frame); fragments of a message wait
/// in `partial`.
fn parse(buf: &mut BytesMut, partial: &mut Option<(u8, Vec<u8>)>) -> Result<Option<Frame>, Gone> {
    // Bounded: each turn consumes one whole frame from the buffer.
    loop {
        let b = &buf[..];
        if b.len() < 2 {
            return Ok(None);
        }
        let fin = b[0] & 0x80 != 0;
        if b[0] & 0x70 != 0 {
            return Err(Gone::Protocol("RSV bits set"));
        }
        let opcode = b[0] & 0x0F;
        if b[1] & 0x80 != 0 {
            return Err(Gone::Protocol("masked frame from the server"));
        }
        let (len, hdr) = match b[1] & 0x7F {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as u64, 4),
            127 if b.len() >= 10 => {
                let mut l = [0u8; 8];
                l.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(l), 10)
            }
            126 | 127 => return Ok(None),
            n => (n as u64, 2),
        };
        if len > MAX_MESSAGE as u64 {
            return Err(Gone::Protocol("frame over 1 MiB"));
        }
        let len = len as usize;
        if b.len() < hdr + len {
            return Ok(None);
        }
        buf.advance(hdr);
        let payload = buf.split_to(len).to_vec();
        if opcode >= 0x8 {
            if !fin || len > 125 {
                return Err(Gone::Protocol("fragmented or long control frame"));
            }
            return match opcode {
                OP_CLOSE => match payload.len() {
                    0 => Ok(Some(Frame::Close(None, String::new()))),
                    1 => Err(Gone::Protocol("one-byte Close payload")),
                    _ => Ok(Some(Frame::Close(
                        Some(u16::from_be_bytes([payload[0], payload[1]])),
                        String::from_utf8_lossy(&payload[2..]).into_owned(),
                    ))),
                },
                OP_PING => Ok(Some(Frame::Ping(payload))),
                OP_PONG => Ok(Some(Frame::Pong)),
                _ => Err(Gone::Protocol("unknown control opcode")),
            };
        }
        let (op, data) = match (opcode, partial.take()) {
            (OP_TEXT | OP_BINARY, None) => (opcode, payload),
            (OP_CONT, Some((op, mut data))) => {
                data.extend_from_slice(&payload);
                if data.len() > MAX_MESSAGE {
                    return Err(Gone::Protocol("message over 1 MiB"));
                }
                (op, data)
            }
            (OP_CONT, None) => return Err(Gone::Protocol("continuation without a start")),
            (OP_TEXT | OP_BINARY, Some(_)) => {
                return Err(Gone::Protocol("new message inside a fragmented one"));
            }
            _ => return Err(Gone::Protocol("unknown data opcode")),
        };
        if !fin {
            *partial = Some((op, data));
            continue;
        }
        return Ok(Some(if op == OP_TEXT {
            Frame::Text(data)
        } else {
            Frame::Binary(data)
        }));
    }
}

impl Conn {
    /// The next complete message or control frame. Cancel-safe: bytes read
    /// stay in the buffer, so it can be raced against timers in `select!`.
    /// Pings are returned, not answered: the caller answers them outside the
    /// race, so no write is ever cut in half.
    pub async fn read_frame(&mut self) -> Result<Frame, Gone> {
        // Bounded: every turn either returns or reads at least one byte, and
        // a frame is at most MAX_MESSAGE long.
        loop {
            if let Some(f) = parse(&mut self.buf, &mut self.partial)? {
                return Ok(f);
            }
            self.buf.reserve(2048);
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Err(Gone::Fin),
                Ok(_) => {}
                Err(e) => return Err(gone_from(&e)),
            }
        }
    }

    /// Writes one frame within `limit`. Not for use inside `select!`: a
    /// write cut in the middle would break the framing.
    pub async fn send(&mut self, opcode: u8, payload: &[u8], limit: Duration) -> Result<(), Gone> {
        let frame = encode(opcode, payload);
        match timeout(limit, self.stream.write_all(&frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(gone_from(&e)),
            Err(_) => Err(Gone::Stalled),
        }
    }

    /// Sends a Close with `code` (and no reason) within `limit`.
    pub async fn send_close(&mut self, code: u16, limit: Duration) -> Result<(), Gone> {
        self.send(OP_CLOSE, &code.to_be_bytes(), limit).await
    }

    /// After the Close exchange: waits (within `limit`) for the server to end
    /// the TCP connection, as it should once Closes have gone both ways.
    /// True when it did.
    pub async fn await_tcp_end(mut self, limit: Duration) -> bool {
        let drain = async {
            let mut sink = [0u8; 1024];
            // Bounded by the timeout around it.
            loop {
                match self.stream.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        timeout(limit, drain).await.is_ok()
    }

    /// Vanishes with a reset: SO_LINGER 0, then close().
    pub fn abort_rst(self) {
        let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
        drop(self.stream);
    }

    /// Vanishes with a plain FIN: shutdown(SHUT_WR) with no Close frame, then
    /// waits (within `limit`) for the server's side to end, so the close
    /// stays a FIN (closing with unread bytes would send a reset).
    pub async fn abort_fin(mut self, limit: Duration) {
        let _ = timeout(limit, self.stream.shutdown()).await;
        let _ = self.await_tcp_end(limit).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_masks_and_sizes() {
        let f = encode(OP_BINARY, &[1, 2, 3]);
        assert_eq!(f[0], 0x82);
        assert_eq!(f[1], 0x83);
        let mask = [f[2], f[3], f[4], f[5]];
        let clear: Vec<u8> = f[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert_eq!(clear, vec![1, 2, 3]);
        let big = encode(OP_TEXT, &[0u8; 300]);
        assert_eq!(big[1], 0x80 | 126);
        assert_eq!(u16::from_be_bytes([big[2], big[3]]), 300);
    }

    #[test]
    fn parses_split_fragmented_and_close_frames() {
        let mut partial = None;
        // A text message in two fragments with a ping between, then a Close 1014.
        let mut bytes = vec![0x01, 2, b'h', b'e', 0x89, 1, 7, 0x80, 1, b'y'];
        bytes.extend_from_slice(&[0x88, 4, 0x03, 0xF6, b'g', b'o']);
        let mut buf = BytesMut::new();
        // Fed one byte at a time: nothing is returned before a frame is whole.
        let mut got = Vec::new();
        for b in bytes {
            buf.extend_from_slice(&[b]);
            while let Some(f) = parse(&mut buf, &mut partial).unwrap() {
                got.push(f);
            }
        }
        assert!(matches!(&got[0], Frame::Ping(p) if p == &[7]));
        assert!(matches!(&got[1], Frame::Text(t) if t == b"hey"));
        assert!(matches!(&got[2], Frame::Close(Some(1014), r) if r == "go"));
        assert_eq!(got.len(), 3);
        let mut masked = BytesMut::from(&[0x82u8, 0x81, 0, 0, 0, 0, 1][..]);
        assert!(parse(&mut masked, &mut None).is_err());
    }
}
