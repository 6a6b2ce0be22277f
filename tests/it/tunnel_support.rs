//! Byte-level WebSocket peers for the tunnel tests: a raw client and a raw backend that do the opening
//! handshake by hand, then write and read frames exactly as given, so a test can check every byte wsgate
//! forwards, drops or adds. Frames are encoded and parsed here, independently of wsgate's own code.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::{Instant, timeout, timeout_at};
use wsgate::Gateway;

use crate::common::{WAIT, accept_key, assert_at, read_head, within};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

const CLIENT_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Encodes one frame; `mask` masks the payload (client frames).
pub fn encode(fin: bool, rsv: u8, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | ((rsv & 7) << 4) | (opcode & 0xF)];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.push(mask_bit | n as u8),
        n @ 126..=65535 => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A Close payload: code and reason.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    payload
}

/// One frame as read off the wire, payload unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl Frame {
    /// Code and reason of a Close frame.
    pub fn close(&self) -> (u16, String) {
        assert_eq!(self.opcode, OP_CLOSE, "expected a Close, got {self:?}");
        assert!(self.payload.len() >= 2, "Close without a code: {self:?}");
        let code = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        let reason = String::from_utf8(self.payload[2..].to_vec()).expect("UTF-8 reason");
        (code, reason)
    }
}

/// Why no frame came.
#[derive(Debug, PartialEq, Eq)]
pub enum NoFrame {
    TimedOut,
    /// The peer closed the connection (EOF), maybe in the middle of a frame.
    Eof,
    /// The connection failed (reset).
    Error(std::io::ErrorKind),
}

/// Splits a whole frame off the front of `buf`, if there is one.
pub fn parse_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    let [b0, b1, ..] = *buf else { return None };
    let (len, mut at) = match b1 & 0x7F {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let mask: Option<[u8; 4]> = if b1 & 0x80 != 0 {
        let key = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(key)
    } else {
        None
    };
    let body = buf.get(at..at + len)?;
    let payload = match mask {
        Some(key) => body
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect(),
        None => body.to_vec(),
    };
    let frame = Frame {
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 7,
        opcode: b0 & 0xF,
        masked: mask.is_some(),
        payload,
    };
    Some((frame, at + len))
}

/// One end of a WebSocket connection, spoken byte by byte.
pub struct RawPeer {
    pub stream: TcpStream,
    /// Read and not consumed yet.
    pending: Vec<u8>,
    /// This peer is a client: what it writes is masked.
    is_client: bool,
    /// The key masking this peer's frames (fixed, so tests can predict the bytes).
    pub key: [u8; 4],
}

impl RawPeer {
    /// A raw client: connects through wsgate at `addr` and completes the handshake.
    pub async fn connect(addr: SocketAddr) -> RawPeer {
        let stream = within("connect", TcpStream::connect(addr))
            .await
            .expect("connect");
        RawPeer::handshake(stream, addr).await
    }

    /// A raw client whose socket receive buffer is `rcvbuf` bytes: a slow reader fills up quickly.
    pub async fn connect_small_window(addr: SocketAddr, rcvbuf: u32) -> RawPeer {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
        let stream = within("connect", socket.connect(addr))
            .await
            .expect("connect");
        RawPeer::handshake(stream, addr).await
    }

    /// Sends the upgrade request on `stream` and checks the 101.
    pub async fn handshake(mut stream: TcpStream, addr: SocketAddr) -> RawPeer {
        // Each write goes out at once (no Nagle delay waiting on a delayed ACK, a kernel timer that paused
        // time does not see).
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {CLIENT_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        within("upgrade request", stream.write_all(request.as_bytes()))
            .await
            .expect("write upgrade request");
        let (head, rest) = read_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused:\n{head}");
        let accept = accept_key(CLIENT_KEY);
        assert!(
            head.to_ascii_lowercase().contains(&format!(
                "sec-websocket-accept: {}",
                accept.to_ascii_lowercase()
            )),
            "wrong accept key:\n{head}"
        );
        RawPeer {
            stream,
            pending: rest,
            is_client: true,
            key: [0x11, 0x22, 0x33, 0x44],
        }
    }

    /// Frame bytes as this peer writes them (masked with `key` for a client).
    pub fn frame_bytes(&self, fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        encode(fin, 0, opcode, self.is_client.then_some(self.key), payload)
    }

    pub async fn write_raw(&mut self, bytes: &[u8]) {
        within("a write", self.stream.write_all(bytes))
            .await
            .expect("write");
    }

    /// Writes a frame and returns its bytes.
    pub async fn write_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let bytes = self.frame_bytes(fin, opcode, payload);
        self.write_raw(&bytes).await;
        bytes
    }

    pub async fn send_close(&mut self, code: u16, reason: &str) -> Vec<u8> {
        self.write_frame(true, OP_CLOSE, &close_payload(code, reason))
            .await
    }

    /// Reads until `n` more bytes are there and returns exactly those.
    pub async fn read_bytes(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; 64 * 1024];
        while self.pending.len() < n {
            let read = within("bytes", self.stream.read(&mut buf))
                .await
                .expect("read");
            assert!(read > 0, "EOF after {} of {n} bytes", self.pending.len());
            self.pending.extend_from_slice(&buf[..read]);
        }
        self.pending.drain(..n).collect()
    }

    /// The next frame, or why there is none before `deadline`.
    pub async fn frame_before(&mut self, deadline: Instant) -> Result<Frame, NoFrame> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some((frame, used)) = parse_frame(&self.pending) {
                self.pending.drain(..used);
                return Ok(frame);
            }
            match timeout_at(deadline, self.stream.read(&mut buf)).await {
                Err(_) => return Err(NoFrame::TimedOut),
                Ok(Ok(0)) => return Err(NoFrame::Eof),
                Ok(Ok(n)) => self.pending.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => return Err(NoFrame::Error(e.kind())),
            }
        }
    }

    /// Bytes read and not consumed (e.g. the start of a frame cut by the end of the connection).
    pub fn take_pending(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }

    /// The next frame within `WAIT`.
    pub async fn next_frame(&mut self) -> Frame {
        match self.frame_before(Instant::now() + WAIT).await {
            Ok(frame) => frame,
            Err(e) => panic!("no frame: {e:?}"),
        }
    }

    /// Skips wsgate's keepalive pings up to the next other frame, which must come before `deadline`.
    pub async fn frame_skipping_pings(&mut self, deadline: Instant) -> Frame {
        loop {
            match self.frame_before(deadline).await {
                Ok(frame) if frame.opcode == OP_PING => continue,
                Ok(frame) => return frame,
                Err(e) => panic!("no frame before the deadline: {e:?}"),
            }
        }
    }

    /// Expects a Close with `code` and `reason` (pings before it are skipped) before `deadline`.
    pub async fn expect_close_before(&mut self, deadline: Instant, code: u16, reason: &str) {
        let frame = self.frame_skipping_pings(deadline).await;
        assert_eq!(frame.close(), (code, reason.to_string()), "{frame:?}");
        assert_eq!(frame.masked, self.is_server(), "masking of {frame:?}");
    }

    /// Expects a Close with `code` and `reason` within `WAIT`.
    pub async fn expect_close(&mut self, code: u16, reason: &str) {
        self.expect_close_before(Instant::now() + WAIT, code, reason)
            .await;
    }

    /// Under paused time: expects a Close with `code` and `reason` (pings before it are skipped) exactly
    /// `after` past `start` (`assert_at`).
    pub async fn expect_close_at(
        &mut self,
        start: Instant,
        after: Duration,
        code: u16,
        reason: &str,
    ) {
        self.expect_close_before(start + after + WAIT, code, reason)
            .await;
        assert_at(
            &format!("the Close {code} {reason:?}"),
            start.elapsed(),
            after,
        );
    }

    /// Expects the connection to end (EOF or reset) with no further frame before `deadline`.
    pub async fn expect_eof_before(&mut self, deadline: Instant) {
        match self.frame_before(deadline).await {
            Err(NoFrame::Eof | NoFrame::Error(_)) => {}
            Err(NoFrame::TimedOut) => panic!("the connection is still open"),
            Ok(frame) => panic!("expected the end of the connection, got {frame:?}"),
        }
    }

    pub async fn expect_eof(&mut self) {
        self.expect_eof_before(Instant::now() + WAIT).await;
    }

    /// Under paused time: expects the connection to end, with no further frame, exactly `after` past
    /// `start` (`assert_at`).
    pub async fn expect_eof_at(&mut self, start: Instant, after: Duration) {
        self.expect_eof_before(start + after + WAIT).await;
        assert_at("the end of the connection", start.elapsed(), after);
    }

    /// Expects not a single byte for `period`.
    pub async fn expect_silence(&mut self, period: Duration) {
        assert!(self.pending.is_empty(), "unread bytes: {:?}", self.pending);
        let mut byte = [0u8; 1];
        match timeout(period, self.stream.read(&mut byte)).await {
            Err(_) => {}
            Ok(Ok(0)) => panic!("the connection closed during the silence"),
            Ok(Ok(_)) => panic!("a byte arrived during the silence: {byte:?}"),
            Ok(Err(e)) => panic!("the connection failed during the silence: {e}"),
        }
    }

    fn is_server(&self) -> bool {
        !self.is_client
    }

    /// Closes the connection with a reset instead of a FIN (SO_LINGER 0).
    pub fn reset(self) {
        let socket = socket2::SockRef::from(&self.stream);
        socket.set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
        drop(self);
    }
}

/// A backend that accepts one connection at a time and answers its upgrade with a correct 101.
pub struct WsBackend {
    listener: TcpListener,
    pub addr: SocketAddr,
}

impl WsBackend {
    pub async fn bind() -> WsBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        WsBackend { listener, addr }
    }

    /// Accepts wsgate's connection and completes the backend side of the handshake.
    pub async fn accept(&self) -> RawPeer {
        let (mut stream, _) = within("wsgate connecting", self.listener.accept())
            .await
            .expect("accept");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let (head, rest) = read_head(&mut stream).await;
        let answer = switching_protocols_for(&head);
        within("101", stream.write_all(answer.as_bytes()))
            .await
            .expect("write 101");
        RawPeer {
            stream,
            pending: rest,
            is_client: false,
            key: [0; 4],
        }
    }
}

/// A backend's 101 head for the upgrade request `head` (its key answered).
pub fn switching_protocols_for(head: &str) -> String {
    let key = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no key in\n{head}"));
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(&key)
    )
}

/// A raw client and the raw backend end of its tunnel.
pub async fn raw_pair(addr: SocketAddr, backend: &WsBackend) -> (RawPeer, RawPeer) {
    tokio::join!(RawPeer::connect(addr), backend.accept())
}

/// Waits until the gateway's metrics contain `line` (metrics are counted just after a tunnel ends).
pub async fn wait_metric(gateway: &Gateway, line: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = gateway.metrics_text();
        if text.lines().any(|l| l == line) {
            return;
        }
        if Instant::now() >= deadline {
            let ours: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("wsgate_ws"))
                .collect();
            panic!("metric line `{line}` not found in:\n{}", ours.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `wsgate_ws_closes_total` line for `reason` on the test route.
pub fn closes(reason: &str, count: u64) -> String {
    format!("wsgate_ws_closes_total{{protocol=\"h1\",reason=\"{reason}\",route=\"main\"}} {count}")
}
