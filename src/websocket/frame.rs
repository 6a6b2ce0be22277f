//! WebSocket frame headers (RFC 6455 §5.2): parsing, and building the few control frames wsgate writes itself.
//!
//! Only headers are parsed here; payloads stay where they are (see `scanner.rs`). wsgate's own control
//! frames are smaller still than the 125 payload bytes §5.5 allows, and are built inline.

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest payload of a control frame (§5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// Largest header: 2 bytes, 8 of extended length, 4 of mask.
pub const MAX_HEADER_LEN: usize = 14;
/// Largest whole control frame: a masked header with a 7-bit length, and 125 bytes of payload.
pub const MAX_CONTROL_FRAME: usize = 2 + 4 + MAX_CONTROL_PAYLOAD;
/// Largest payload of a control frame wsgate writes: an 8-byte ping token, or a Close code and a reason
/// of up to 38 bytes (wsgate's longest is 29). A tunnel holds one such frame per direction while it
/// waits to be written, so the bound is part of every tunnel's size.
pub const MAX_OWN_PAYLOAD: usize = 40;
const MAX_OWN_FRAME: usize = 2 + 4 + MAX_OWN_PAYLOAD;

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    /// RSV1..RSV3 as the three low bits (RSV1 = 0b100).
    pub rsv: u8,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// Bytes the header itself takes (2 to 14).
    pub header_len: usize,
}

impl Header {
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }

    /// Header and payload together.
    pub fn frame_len(&self) -> u64 {
        self.header_len as u64 + self.payload_len
    }
}

/// A header that no valid stream can contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("64-bit payload length with the most significant bit set")]
    LengthOverflow,
}

/// Parses the header at the start of `buf`. `Ok(None)` means the header is not complete yet.
#[inline]
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, HeaderError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    let masked = b1 & 0x80 != 0;
    let (payload_len, mut header_len) = match b1 & 0x7F {
        126 => {
            let Some(bytes) = buf.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4)
        }
        127 => {
            let Some(bytes) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut be = [0u8; 8];
            be.copy_from_slice(bytes);
            let len = u64::from_be_bytes(be);
            if len >> 63 != 0 {
                return Err(HeaderError::LengthOverflow);
            }
            (len, 10)
        }
        short => (u64::from(short), 2),
    };
    let mask = if masked {
        let Some(key) = buf.get(header_len..header_len + 4) else {
            return Ok(None);
        };
        header_len += 4;
        Some([key[0], key[1], key[2], key[3]])
    } else {
        None
    };
    Ok(Some(Header {
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 0x7,
        opcode: b0 & 0x0F,
        mask,
        payload_len,
        header_len,
    }))
}

/// XORs `data` with `key`, where `data` starts `offset` bytes into the payload (§5.3).
pub fn apply_mask(data: &mut [u8], key: [u8; 4], offset: usize) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte ^= key[(offset + i) & 3];
    }
}

/// Writes a header for `payload_len` bytes into `out`, returning its length.
pub fn write_header(
    out: &mut [u8; MAX_HEADER_LEN],
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    payload_len: u64,
) -> usize {
    out[0] = (if fin { 0x80 } else { 0 }) | (opcode & 0x0F);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut len = if payload_len < 126 {
        out[1] = mask_bit | payload_len as u8;
        2
    } else if payload_len <= u64::from(u16::MAX) {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
        4
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&payload_len.to_be_bytes());
        10
    };
    if let Some(key) = mask {
        out[len..len + 4].copy_from_slice(&key);
        len += 4;
    }
    len
}

/// A complete control frame built by wsgate: a ping, a pong or a Close.
#[derive(Clone, Copy)]
pub struct ControlFrame {
    bytes: [u8; MAX_OWN_FRAME],
    len: u8,
}

impl std::fmt::Debug for ControlFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlFrame")
            .field("bytes", &self.as_bytes())
            .finish()
    }
}

/// Who writes a frame decides its masking: clients mask every frame, servers never do (§5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Toward the client: unmasked.
    Server,
    /// Toward the backend: masked with a fresh random key.
    Client,
}

impl ControlFrame {
    /// Builds a control frame; a payload longer than `MAX_OWN_PAYLOAD` bytes is cut to it.
    pub fn new(opcode: u8, payload: &[u8], role: Role) -> ControlFrame {
        let payload = &payload[..payload.len().min(MAX_OWN_PAYLOAD)];
        let mask = match role {
            Role::Server => None,
            Role::Client => Some(fastrand::u32(..).to_be_bytes()),
        };
        let mut header = [0u8; MAX_HEADER_LEN];
        let header_len = write_header(&mut header, true, opcode, mask, payload.len() as u64);
        let mut bytes = [0u8; MAX_OWN_FRAME];
        bytes[..header_len].copy_from_slice(&header[..header_len]);
        let body = &mut bytes[header_len..header_len + payload.len()];
        body.copy_from_slice(payload);
        if let Some(key) = mask {
            apply_mask(body, key, 0);
        }
        ControlFrame {
            bytes,
            len: (header_len + payload.len()) as u8,
        }
    }

    /// A Close frame with a status code and a reason (cut to fit, on a character boundary).
    pub fn close(code: u16, reason: &str, role: Role) -> ControlFrame {
        let mut payload = [0u8; MAX_OWN_PAYLOAD];
        payload[..2].copy_from_slice(&code.to_be_bytes());
        let mut end = reason.len().min(MAX_OWN_PAYLOAD - 2);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        payload[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
        ControlFrame::new(OP_CLOSE, &payload[..2 + end], role)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// What a Close frame's payload says (§5.5.1, §7.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosePayload {
    /// No status code at all.
    Empty,
    Code(u16),
    /// A payload that no valid peer sends: one byte, a code that must not be sent, or a reason that is not UTF-8.
    Invalid,
}

/// Reads an (unmasked) Close payload.
pub fn parse_close(payload: &[u8]) -> ClosePayload {
    match payload {
        [] => ClosePayload::Empty,
        [_] => ClosePayload::Invalid,
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            let code_ok = matches!(code, 1000..=1003 | 1007..=1011 | 1012..=1014 | 3000..=4999);
            if code_ok && std::str::from_utf8(reason).is_ok() {
                ClosePayload::Code(code)
            } else {
                ClosePayload::Invalid
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(opcode: u8, len: u64, mask: Option<[u8; 4]>) {
        let mut out = [0u8; MAX_HEADER_LEN];
        let n = write_header(&mut out, true, opcode, mask, len);
        let header = parse_header(&out[..n]).expect("valid").expect("complete");
        assert_eq!(header.payload_len, len);
        assert_eq!(header.header_len, n);
        assert_eq!(header.mask, mask);
        assert_eq!(header.opcode, opcode);
        assert!(header.fin);
        // Every shorter prefix is incomplete, never an error or a wrong header.
        for cut in 0..n {
            assert_eq!(
                parse_header(&out[..cut]),
                Ok(None),
                "len {len} cut at {cut}"
            );
        }
    }

    #[test]
    fn every_length_form_at_its_boundaries() {
        for len in [
            0,
            1,
            125,
            126,
            127,
            65535,
            65536,
            u32::MAX as u64 + 1,
            (1 << 63) - 1,
        ] {
            roundtrip(OP_BINARY, len, None);
            roundtrip(OP_TEXT, len, Some([1, 2, 3, 4]));
        }
        let mut out = [0u8; MAX_HEADER_LEN];
        assert_eq!(write_header(&mut out, true, OP_TEXT, None, 125), 2);
        assert_eq!(write_header(&mut out, true, OP_TEXT, None, 126), 4);
        assert_eq!(write_header(&mut out, true, OP_TEXT, None, 65535), 4);
        assert_eq!(write_header(&mut out, true, OP_TEXT, None, 65536), 10);
        assert_eq!(
            write_header(&mut out, true, OP_TEXT, Some([0; 4]), 65536),
            14
        );
    }

    #[test]
    fn flags_and_rsv_bits_are_read() {
        let header = parse_header(&[0b0111_0010, 0]).unwrap().unwrap();
        assert!(!header.fin);
        assert_eq!(header.rsv, 0b111);
        assert_eq!(header.opcode, OP_BINARY);
        let header = parse_header(&[0b1100_0001, 0]).unwrap().unwrap();
        assert_eq!(header.rsv, 0b100);
    }

    #[test]
    fn length_with_top_bit_is_an_error() {
        let mut buf = [0u8; 10];
        buf[0] = 0x82;
        buf[1] = 127;
        buf[2] = 0x80;
        assert_eq!(parse_header(&buf), Err(HeaderError::LengthOverflow));
    }

    #[test]
    fn masking_is_its_own_inverse_at_any_offset() {
        let key = [0xde, 0xad, 0xbe, 0xef];
        let original: Vec<u8> = (0..=255).collect();
        let mut whole = original.clone();
        apply_mask(&mut whole, key, 0);
        let mut pieces = original.clone();
        let (a, b) = pieces.split_at_mut(7);
        apply_mask(a, key, 0);
        apply_mask(b, key, 7);
        assert_eq!(whole, pieces);
        apply_mask(&mut whole, key, 0);
        assert_eq!(whole, original);
    }

    #[test]
    fn server_frames_are_unmasked_and_client_frames_masked() {
        let ping = ControlFrame::new(OP_PING, b"hello", Role::Server);
        assert_eq!(ping.as_bytes(), b"\x89\x05hello");
        let ping = ControlFrame::new(OP_PING, b"hello", Role::Client);
        let header = parse_header(ping.as_bytes()).unwrap().unwrap();
        let key = header.mask.expect("masked");
        let mut payload = ping.as_bytes()[header.header_len..].to_vec();
        apply_mask(&mut payload, key, 0);
        assert_eq!(payload, b"hello");
    }

    #[test]
    fn close_frames_carry_code_and_reason_cut_to_fit() {
        let close = ControlFrame::close(1001, "idle timeout", Role::Server);
        assert_eq!(&close.as_bytes()[..4], b"\x88\x0e\x03\xe9");
        assert_eq!(&close.as_bytes()[4..], b"idle timeout");
        let long = "é".repeat(100);
        let close = ControlFrame::close(1000, &long, Role::Server);
        let header = parse_header(close.as_bytes()).unwrap().unwrap();
        assert_eq!(header.payload_len, MAX_OWN_PAYLOAD as u64);
        assert_eq!(
            parse_close(&close.as_bytes()[2..]),
            ClosePayload::Code(1000)
        );
    }

    #[test]
    fn close_payloads_are_checked() {
        assert_eq!(parse_close(b""), ClosePayload::Empty);
        assert_eq!(parse_close(b"\x03"), ClosePayload::Invalid);
        assert_eq!(parse_close(b"\x03\xe8bye"), ClosePayload::Code(1000));
        assert_eq!(parse_close(b"\x03\xed"), ClosePayload::Invalid); // 1005 must not be sent
        assert_eq!(parse_close(b"\x03\xe8\xff"), ClosePayload::Invalid); // reason not UTF-8
        assert_eq!(parse_close(b"\x0f\xa0"), ClosePayload::Code(4000));
    }
}
