//! A reference decoder for one direction of a WebSocket stream, written from RFC 6455 §5.2–5.5 and the
//! rules wsgate's scanner documents, independently of `wsgate::internals::scanner`.
//!
//! It reads the whole stream (or a prefix of it) at once, frame by frame, and says what a correct scanner
//! fed the same bytes must have done: which bytes it forwarded, how many frames it counted, which pong it
//! consumed, which Close passed, where it stopped and why, and what it still holds back at the end.
//!
//! The rules, in the order they are applied to each frame (the order decides which violation is reported
//! when a header breaks several rules at once):
//!
//! 1. The header: 2 bytes, then 2 or 8 bytes of extended length (7-bit value 126 or 127), then 4 bytes of
//!    masking key if the mask bit is set. A 64-bit length with its most significant bit set is an error as
//!    soon as its 8 bytes are there (before the masking key). A header cut by the end of the stream is held
//!    back (not forwarded, no error).
//! 2. Masking (§5.1): frames from a client must be masked, frames from a server must not be.
//! 3. RSV1..RSV3 may only be set within the bits an extension allowed.
//! 4. Opcodes: 0, 1, 2 (data) and 8, 9, 10 (control) only. A control frame: payload of at most 125 bytes,
//!    then FIN set, then its length in the 7-bit form (a control frame whose length uses the 16- or 64-bit
//!    form is refused even if the value is small, so that a scanner never has to hold more than one
//!    minimal control frame between reads).
//! 5. A control frame is handled once it is complete (cut by the end: held back whole). A pong whose
//!    unmasked payload equals the expected token is consumed: counted, not forwarded. Any other control
//!    frame is forwarded whole; a Close ends the stream: everything after it is dropped silently.
//! 6. A data frame: a continuation (opcode 0) only inside a fragmented message, a text or binary frame only
//!    outside one; the message size, summed over its fragments (counted in u64, saturating, so
//!    `u64::MAX` means no limit), must not exceed the limit. Then its header is forwarded and its payload
//!    bytes as they come (a payload cut by the end of the stream is forwarded as far as it goes). A data
//!    frame counts as activity if it has a payload or ends a message; every payload byte counts too.
//!
//! After a violation nothing more is forwarded; what came before it is whole frames.

/// Why a stream cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    UnmaskedFromClient,
    MaskedFromServer,
    ReservedBits,
    ControlTooLong,
    ControlFragmented,
    ControlNotMinimal,
    UnknownOpcode,
    ContinuationOutsideMessage,
    NewMessageInsideMessage,
    LengthTopBit,
    MessageTooBig,
    /// A violation the reference never produces (the scanner's own "frame too large to carry", or a
    /// message this harness does not know): always a finding.
    Other(&'static str),
}

/// What a Close frame's payload says (§5.5.1, §7.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    Empty,
    Code(u16),
    Invalid,
}

/// The direction's settings, as the tunnel gives them to its scanner.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub from_client: bool,
    pub allowed_rsv: u8,
    pub max_message: u64,
    pub pong_token: Option<[u8; 8]>,
}

/// What a stream (or a prefix of it) amounts to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Every byte to be forwarded, in order.
    pub out: Vec<u8>,
    /// Frame headers accepted (consumed pongs included; a frame with a violation not).
    pub frames: u32,
    /// Pongs consumed.
    pub pongs: u32,
    /// Data-frame activity: +1 per data header with a payload or FIN, +1 per payload byte.
    pub activity: u64,
    /// The Close that ended the stream, if one did.
    pub close: Option<Close>,
    /// The violation, with the number of bytes forwarded before it.
    pub violation: Option<(Kind, usize)>,
    /// Bytes held back at the end: a cut header or a cut control frame.
    pub pending: usize,
    /// Payload bytes of the last data frame still to come.
    pub remaining: u64,
    /// A Close passed.
    pub closed: bool,
}

const MAX_CONTROL_PAYLOAD: u64 = 125;

/// Decodes `stream` from its start.
pub fn decode(rules: &Rules, stream: &[u8]) -> Decoded {
    let mut d = Decoded::default();
    let mut in_message = false;
    let mut message_len: u64 = 0;
    let mut pos = 0usize;
    while pos < stream.len() {
        let rest = &stream[pos..];
        match frame(rules, rest, &mut in_message, &mut message_len, &mut d) {
            Step::Advance(n) => pos += n,
            Step::Stop => break,
        }
    }
    d
}

enum Step {
    Advance(usize),
    Stop,
}

fn frame(
    rules: &Rules,
    rest: &[u8],
    in_message: &mut bool,
    message_len: &mut u64,
    d: &mut Decoded,
) -> Step {
    let violation = |d: &mut Decoded, kind: Kind| {
        d.violation = Some((kind, d.out.len()));
        Step::Stop
    };
    let hold = |d: &mut Decoded| {
        d.pending = rest.len();
        Step::Stop
    };
    // 1. The header.
    if rest.len() < 2 {
        return hold(d);
    }
    let fin = rest[0] & 0x80 != 0;
    let rsv = (rest[0] >> 4) & 0b111;
    let opcode = rest[0] & 0x0F;
    let masked = rest[1] & 0x80 != 0;
    let len7 = rest[1] & 0x7F;
    let (len, mut header_len) = match len7 {
        126 => {
            if rest.len() < 4 {
                return hold(d);
            }
            (u64::from(rest[2]) << 8 | u64::from(rest[3]), 4usize)
        }
        127 => {
            if rest.len() < 10 {
                return hold(d);
            }
            let len = rest[2..10]
                .iter()
                .fold(0u64, |acc, &b| acc << 8 | u64::from(b));
            if len & (1 << 63) != 0 {
                return violation(d, Kind::LengthTopBit);
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    let key = if masked {
        if rest.len() < header_len + 4 {
            return hold(d);
        }
        let key = [
            rest[header_len],
            rest[header_len + 1],
            rest[header_len + 2],
            rest[header_len + 3],
        ];
        header_len += 4;
        Some(key)
    } else {
        None
    };
    // 2. Masking.
    if rules.from_client && !masked {
        return violation(d, Kind::UnmaskedFromClient);
    }
    if !rules.from_client && masked {
        return violation(d, Kind::MaskedFromServer);
    }
    // 3. Reserved bits.
    if rsv & !rules.allowed_rsv != 0 {
        return violation(d, Kind::ReservedBits);
    }
    // 4. Opcodes, and the rules of control frames.
    let control = match opcode {
        0..=2 => false,
        8..=10 => {
            if len > MAX_CONTROL_PAYLOAD {
                return violation(d, Kind::ControlTooLong);
            }
            if !fin {
                return violation(d, Kind::ControlFragmented);
            }
            if len7 >= 126 {
                return violation(d, Kind::ControlNotMinimal);
            }
            true
        }
        _ => return violation(d, Kind::UnknownOpcode),
    };
    if control {
        // 5. A control frame, once whole.
        let total = header_len + len as usize;
        if rest.len() < total {
            return hold(d);
        }
        let mut payload = rest[header_len..total].to_vec();
        if let Some(key) = key {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= key[i % 4];
            }
        }
        d.frames += 1;
        if opcode == 10 && rules.pong_token.is_some_and(|t| payload == t) {
            d.pongs += 1;
            return Step::Advance(total);
        }
        d.out.extend_from_slice(&rest[..total]);
        if opcode == 8 {
            d.close = Some(close_payload(&payload));
            d.closed = true;
            return Step::Stop;
        }
        return Step::Advance(total);
    }
    // 6. A data frame.
    match (opcode, *in_message) {
        (0, false) => return violation(d, Kind::ContinuationOutsideMessage),
        (0, true) => {}
        (_, true) => return violation(d, Kind::NewMessageInsideMessage),
        (_, false) => *message_len = 0,
    }
    *message_len = message_len.saturating_add(len);
    if *message_len > rules.max_message {
        return violation(d, Kind::MessageTooBig);
    }
    *in_message = !fin;
    d.frames += 1;
    d.out.extend_from_slice(&rest[..header_len]);
    if len > 0 || fin {
        d.activity += 1;
    }
    let available = (rest.len() - header_len) as u64;
    let n = len.min(available) as usize;
    d.out.extend_from_slice(&rest[header_len..header_len + n]);
    d.activity += n as u64;
    d.remaining = len - n as u64;
    Step::Advance(header_len + n)
}

/// §5.5.1 and §7.4: no payload, or a 2-byte status code that may be sent (1000–1003, 1007–1014 as
/// registered with IANA, 3000–4999) followed by a UTF-8 reason. Anything else is invalid.
pub fn close_payload(payload: &[u8]) -> Close {
    if payload.is_empty() {
        return Close::Empty;
    }
    if payload.len() < 2 {
        return Close::Invalid;
    }
    let code = u16::from(payload[0]) << 8 | u16::from(payload[1]);
    let sendable = (1000..=1003).contains(&code)
        || (1007..=1014).contains(&code)
        || (3000..=4999).contains(&code);
    if sendable && std::str::from_utf8(&payload[2..]).is_ok() {
        Close::Code(code)
    } else {
        Close::Invalid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: Rules = Rules {
        from_client: true,
        allowed_rsv: 0,
        max_message: u64::MAX,
        pong_token: None,
    };
    const SERVER: Rules = Rules {
        from_client: false,
        ..CLIENT
    };

    #[test]
    fn unmasked_text_from_a_server_passes_whole() {
        let stream = b"\x81\x05hello";
        let d = decode(&SERVER, stream);
        assert_eq!(d.out, stream);
        assert_eq!((d.frames, d.activity, d.pending, d.remaining), (1, 6, 0, 0));
        assert_eq!(d.violation, None);
    }

    #[test]
    fn masking_rules_by_direction() {
        assert_eq!(
            decode(&CLIENT, b"\x81\x00").violation,
            Some((Kind::UnmaskedFromClient, 0))
        );
        assert_eq!(
            decode(&SERVER, b"\x81\x80abcd").violation,
            Some((Kind::MaskedFromServer, 0))
        );
    }

    #[test]
    fn cut_header_and_cut_control_frame_are_held_back() {
        let d = decode(&SERVER, b"\x82\x7e\x01");
        assert_eq!((d.out.len(), d.pending), (0, 3));
        let d = decode(&SERVER, b"\x89\x05hel");
        assert_eq!((d.out.len(), d.pending, d.frames), (0, 5, 0));
        // A cut data payload is forwarded as far as it goes.
        let d = decode(&SERVER, b"\x82\x05he");
        assert_eq!((d.out.len(), d.pending, d.remaining), (4, 0, 3));
    }

    #[test]
    fn control_frame_rules_in_order() {
        // Over 125 bytes (16-bit form) and not final: the length is reported.
        assert_eq!(
            decode(&SERVER, b"\x09\x7e\x00\x7e").violation,
            Some((Kind::ControlTooLong, 0))
        );
        assert_eq!(
            decode(&SERVER, b"\x09\x01x").violation,
            Some((Kind::ControlFragmented, 0))
        );
        assert_eq!(
            decode(&SERVER, b"\x89\x7e\x00\x01x").violation,
            Some((Kind::ControlNotMinimal, 0))
        );
        assert_eq!(
            decode(&SERVER, b"\x83\x00").violation,
            Some((Kind::UnknownOpcode, 0))
        );
    }

    #[test]
    fn length_with_top_bit_is_an_error_before_the_mask() {
        let d = decode(&CLIENT, b"\x82\xff\x80\x00\x00\x00\x00\x00\x00\x00");
        assert_eq!(d.violation, Some((Kind::LengthTopBit, 0)));
    }

    #[test]
    fn fragments_and_the_size_limit() {
        let rules = Rules {
            max_message: 4,
            ..SERVER
        };
        let d = decode(&rules, b"\x01\x02ab\x89\x00\x00\x02cd\x80\x01e");
        assert_eq!(d.violation, Some((Kind::MessageTooBig, 10)));
        assert_eq!(d.frames, 3);
        let d = decode(&SERVER, b"\x80\x00");
        assert_eq!(d.violation, Some((Kind::ContinuationOutsideMessage, 0)));
        let d = decode(&SERVER, b"\x01\x00\x81\x00");
        assert_eq!(d.violation, Some((Kind::NewMessageInsideMessage, 2)));
        // An empty non-final fragment is no activity.
        assert_eq!(decode(&SERVER, b"\x01\x00").activity, 0);
    }

    #[test]
    fn the_pong_with_the_token_is_consumed_and_a_close_ends_the_stream() {
        let rules = Rules {
            pong_token: Some(*b"wsgate!!"),
            ..SERVER
        };
        let d = decode(&rules, b"\x8a\x08wsgate!!\x8a\x01x\x88\x02\x03\xe8\xff\xff");
        assert_eq!(d.pongs, 1);
        assert_eq!(d.out, b"\x8a\x01x\x88\x02\x03\xe8");
        assert_eq!(d.close, Some(Close::Code(1000)));
        assert!(d.closed);
        assert_eq!((d.violation, d.pending, d.frames), (None, 0, 3));
    }

    #[test]
    fn close_payloads() {
        assert_eq!(close_payload(b""), Close::Empty);
        assert_eq!(close_payload(b"\x03"), Close::Invalid);
        assert_eq!(close_payload(b"\x03\xedx"), Close::Invalid);
        assert_eq!(close_payload(b"\x03\xf6"), Close::Code(1014));
        assert_eq!(close_payload(b"\x03\xe8\xc3"), Close::Invalid);
        assert_eq!(close_payload(b"\x13\x87"), Close::Code(4999));
        assert_eq!(close_payload(b"\x13\x88"), Close::Invalid);
    }
}
