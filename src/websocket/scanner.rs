//! Walks one direction of a WebSocket stream frame by frame, in place, without copying payloads.
//!
//! The tunnel reads a chunk into a buffer and hands it to [`Scanner::scan`], which checks each frame header
//! (RFC 6455 §5.2–5.5), counts frames and message sizes, looks into control frames (at most 125 bytes) and
//! compacts the buffer when it drops one of them (the pong to wsgate's own ping, bytes after a Close).
//! Payload bytes of data frames are left where they are and stay masked. A header or control frame cut by
//! the end of a chunk is carried and put back in front of the next chunk: a cut header (the usual case)
//! in a small inline array, a cut control frame (rare: a ping or Close straddling two reads) on the heap
//! until the next read, so an idle tunnel does not carry 131 bytes per direction for it.

use super::frame::{
    self, ClosePayload, Header, MAX_CONTROL_FRAME, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, OP_BINARY,
    OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT,
};

/// Why a stream cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("message larger than the limit")]
    MessageTooBig,
}

/// What one call to [`Scanner::scan`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// `buf[..out_len]` is to be forwarded.
    pub out_len: usize,
    /// Frame headers parsed (wsgate's own pong included).
    pub frames: u32,
    /// Some data-frame byte (header or payload) passed: the tunnel is not idle.
    pub data: bool,
    /// The pong to wsgate's own ping arrived, and was dropped.
    pub pong_matched: bool,
    /// A Close frame passed, with what it said.
    pub close: Option<ClosePayload>,
    /// The stream broke a rule at `buf[out_len]`: what came before is whole frames and may be forwarded,
    /// nothing after it is.
    pub violation: Option<Violation>,
}

/// The state of one direction between reads.
#[derive(Debug, Clone)]
pub struct Scanner {
    /// Frames from a client must be masked; frames from a server must not be (§5.1).
    from_client: bool,
    /// RSV bits an extension negotiated in the handshake allows (e.g. RSV1 for permessage-deflate).
    allowed_rsv: u8,
    max_message: u64,
    /// Payload bytes of the current data frame still to pass.
    remaining: u64,
    /// Inside a fragmented message (a non-final data frame passed).
    in_message: bool,
    message_len: u64,
    /// A Close passed: the sender may send nothing more (§5.5.1), so later bytes are dropped.
    closed: bool,
    /// Token of wsgate's own pings: every pong carrying it is consumed, not forwarded (a late answer to an
    /// earlier ping included, so the peer behind never sees a pong it did not ask for).
    expected_pong: Option<[u8; 8]>,
    /// A cut header (always shorter than `MAX_HEADER_LEN`), or the start of a longer cut control frame,
    /// whose whole cut part is then in `carry_long`.
    carry: [u8; MAX_HEADER_LEN],
    carry_long: Option<Box<[u8; MAX_CONTROL_FRAME]>>,
    carry_len: u8,
}

impl Scanner {
    pub fn new(from_client: bool, allowed_rsv: u8, max_message: u64) -> Scanner {
        Scanner {
            from_client,
            allowed_rsv,
            max_message,
            remaining: 0,
            in_message: false,
            message_len: 0,
            closed: false,
            expected_pong: None,
            carry: [0; MAX_HEADER_LEN],
            carry_long: None,
            carry_len: 0,
        }
    }

    /// Whether what has been forwarded ends between frames, where wsgate may insert a frame of its own.
    /// A partial header or control frame in `carry` has not been forwarded, so it does not stand in the way.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Bytes carried to the next read (a cut header or control frame); never over `MAX_CONTROL_FRAME`.
    pub fn carried(&self) -> usize {
        usize::from(self.carry_len)
    }

    /// Whether a Close has passed in this direction.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Sets the token wsgate's pings carry; pongs carrying it are consumed from now on.
    pub fn expect_pong(&mut self, token: [u8; 8]) {
        self.expected_pong = Some(token);
    }

    /// Copies the bytes carried from the previous chunk to the front of `buf` and returns how many:
    /// the next read goes into `buf[returned..]`.
    pub fn prepare(&self, buf: &mut [u8]) -> usize {
        let n = usize::from(self.carry_len);
        match &self.carry_long {
            Some(long) => buf[..n].copy_from_slice(&long[..n]),
            None => buf[..n].copy_from_slice(&self.carry[..n]),
        }
        n
    }

    /// Scans `buf[..filled]` (carried bytes first, as placed by [`prepare`](Self::prepare)).
    pub fn scan(&mut self, buf: &mut [u8], filled: usize) -> Scan {
        let mut scan = Scan::default();
        // What was carried is at the front of `buf` now (`prepare`).
        self.carry_len = 0;
        self.carry_long = None;
        let (mut r, mut w) = (0usize, 0usize);
        while r < filled {
            if self.closed {
                break;
            }
            if self.remaining > 0 {
                let n = self.remaining.min((filled - r) as u64) as usize;
                if w != r {
                    buf.copy_within(r..r + n, w);
                }
                r += n;
                w += n;
                self.remaining -= n as u64;
                scan.data = true;
                continue;
            }
            let header = match frame::parse_header(&buf[r..filled]) {
                Err(_) => {
                    scan.violation = Some(Violation::Protocol("invalid payload length"));
                    break;
                }
                Ok(None) => {
                    scan.violation = self.keep(&buf[r..filled]).err();
                    break;
                }
                Ok(Some(header)) => header,
            };
            if let Err(violation) = self.check(&header) {
                scan.violation = Some(violation);
                break;
            }
            if header.is_control() {
                let total = header.frame_len() as usize;
                if filled - r < total {
                    scan.violation = self.keep(&buf[r..filled]).err();
                    break;
                }
                scan.frames += 1;
                let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
                let payload = &mut payload[..header.payload_len as usize];
                payload.copy_from_slice(&buf[r + header.header_len..r + total]);
                if let Some(key) = header.mask {
                    frame::apply_mask(payload, key, 0);
                }
                if header.opcode == OP_PONG && self.expected_pong.is_some_and(|t| t[..] == *payload)
                {
                    scan.pong_matched = true;
                    r += total;
                    continue;
                }
                if header.opcode == OP_CLOSE {
                    scan.close = Some(frame::parse_close(payload));
                    self.closed = true;
                }
                if w != r {
                    buf.copy_within(r..r + total, w);
                }
                r += total;
                w += total;
            } else {
                if let Err(violation) = self.start_data_frame(&header) {
                    scan.violation = Some(violation);
                    break;
                }
                scan.frames += 1;
                let n = header.header_len;
                if w != r {
                    buf.copy_within(r..r + n, w);
                }
                r += n;
                w += n;
                // An empty fragment that ends nothing moves no data: an endless stream of them must not
                // keep a tunnel out of its idle timeout.
                scan.data |= header.payload_len > 0 || header.fin;
            }
        }
        scan.out_len = w;
        scan
    }

    /// Carries a cut header or control frame to the next read. A cut header is under `MAX_HEADER_LEN`
    /// bytes and a control frame that passed `check` at most `MAX_CONTROL_FRAME`: both always fit whole.
    /// Anything longer would be a bug of the scanner's: it is refused as a violation rather than cut.
    fn keep(&mut self, partial: &[u8]) -> Result<(), Violation> {
        let n = partial.len();
        if n > MAX_CONTROL_FRAME {
            return Err(Violation::Protocol("frame too large to carry"));
        }
        if n <= MAX_HEADER_LEN {
            self.carry[..n].copy_from_slice(&partial[..n]);
        } else {
            let mut long = Box::new([0; MAX_CONTROL_FRAME]);
            long[..n].copy_from_slice(&partial[..n]);
            self.carry_long = Some(long);
        }
        self.carry_len = n as u8;
        Ok(())
    }

    fn check(&self, header: &Header) -> Result<(), Violation> {
        match (self.from_client, header.mask.is_some()) {
            (true, false) => return Err(Violation::Protocol("unmasked frame from the client")),
            (false, true) => return Err(Violation::Protocol("masked frame from the server")),
            _ => {}
        }
        if header.rsv & !self.allowed_rsv != 0 {
            return Err(Violation::Protocol(
                "reserved bits set without an extension",
            ));
        }
        match header.opcode {
            OP_CONTINUATION | OP_TEXT | OP_BINARY => Ok(()),
            OP_CLOSE | OP_PING | OP_PONG if header.payload_len as usize > MAX_CONTROL_PAYLOAD => {
                Err(Violation::Protocol("control frame over 125 bytes"))
            }
            OP_CLOSE | OP_PING | OP_PONG if !header.fin => {
                Err(Violation::Protocol("fragmented control frame"))
            }
            // §5.2: a length must use the minimal form. Enforced for control frames, whose whole frame the
            // scanner may have to carry between reads: the carry is sized for the 7-bit form. Data frames
            // are not carried, and some clients pad their lengths, so they are let through.
            OP_CLOSE | OP_PING | OP_PONG
                if header.header_len != 2 + if header.mask.is_some() { 4 } else { 0 } =>
            {
                Err(Violation::Protocol(
                    "control frame length not in minimal form",
                ))
            }
            OP_CLOSE | OP_PING | OP_PONG => Ok(()),
            _ => Err(Violation::Protocol("unknown opcode")),
        }
    }

    fn start_data_frame(&mut self, header: &Header) -> Result<(), Violation> {
        match (header.opcode, self.in_message) {
            (OP_CONTINUATION, false) => {
                return Err(Violation::Protocol("continuation frame outside a message"));
            }
            (OP_CONTINUATION, true) => {}
            (_, true) => return Err(Violation::Protocol("new message inside a fragmented one")),
            (_, false) => self.message_len = 0,
        }
        self.message_len = self.message_len.saturating_add(header.payload_len);
        if self.message_len > self.max_message {
            return Err(Violation::MessageTooBig);
        }
        self.in_message = !header.fin;
        self.remaining = header.payload_len;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
