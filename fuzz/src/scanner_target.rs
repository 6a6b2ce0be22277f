//! The scanner targets: one direction of a WebSocket stream fed to `wsgate::internals::scanner::Scanner`
//! the way the tunnel feeds it, checked against the reference decoder.
//!
//! Input layout (short inputs are ignored):
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | bits 0–2: allowed RSV bits; bit 3: a pong token is expected; bit 4: scan buffers get 64 bytes of slack |
//! | 1, 2 | the message size limit: byte 1 picks the form (`% 4`: byte 2 itself, byte 2 × 257, `u64::MAX`, `u64::MAX - byte 2`) |
//! | 3..11 | the pong token |
//! | 11 | how many reads are described (`% 32`) |
//! | next that many | the length of each read: 0–239 bytes, 240–255 → (n − 239) × 1000 bytes |
//! | the rest | the stream; what the reads above do not cover is one last read |
//!
//! Three runs of the same stream, each on a fresh scanner: the reads described (checked scan by scan
//! against the reference decoding of the stream up to that read), the whole stream in one read, and one
//! byte per read. All three must end exactly where the reference does.

use wsgate::internals::frame::{ClosePayload, MAX_CONTROL_FRAME};
use wsgate::internals::scanner::{Scanner, Violation};

use crate::reference::{self, Close, Decoded, Kind, Rules};

const HEADER: usize = 12;
/// What a scan buffer holds before the carried bytes and the read go in: a recycled buffer is not clean.
const JUNK: u8 = 0xA5;
const SLACK: usize = 64;

struct Input<'a> {
    rules: Rules,
    slack: bool,
    reads: Vec<usize>,
    stream: &'a [u8],
}

fn parse(data: &[u8]) -> Option<Input<'_>> {
    if data.len() < HEADER {
        return None;
    }
    let flags = data[0];
    let max_message = match data[1] % 4 {
        0 => u64::from(data[2]),
        1 => u64::from(data[2]) * 257,
        2 => u64::MAX,
        _ => u64::MAX - u64::from(data[2]),
    };
    let mut token = [0u8; 8];
    token.copy_from_slice(&data[3..11]);
    let count = usize::from(data[11] % 32);
    let lengths = data.get(HEADER..HEADER + count)?;
    let stream = &data[HEADER + count..];
    let mut reads = Vec::with_capacity(count + 1);
    let mut left = stream.len();
    for &l in lengths {
        let l = if l >= 240 {
            usize::from(l - 239) * 1000
        } else {
            usize::from(l)
        };
        let l = l.min(left);
        reads.push(l);
        left -= l;
    }
    if left > 0 {
        reads.push(left);
    }
    Some(Input {
        rules: Rules {
            from_client: false, // set by the target
            allowed_rsv: flags & 0b111,
            max_message,
            pong_token: (flags & 0b1000 != 0).then_some(token),
        },
        slack: flags & 0b1_0000 != 0,
        reads,
        stream,
    })
}

/// A scanner violation, by its documented message.
fn kind(violation: Violation) -> Kind {
    match violation {
        Violation::MessageTooBig => Kind::MessageTooBig,
        Violation::Protocol(message) => match message {
            "unmasked frame from the client" => Kind::UnmaskedFromClient,
            "masked frame from the server" => Kind::MaskedFromServer,
            "reserved bits set without an extension" => Kind::ReservedBits,
            "control frame over 125 bytes" => Kind::ControlTooLong,
            "fragmented control frame" => Kind::ControlFragmented,
            "control frame length not in minimal form" => Kind::ControlNotMinimal,
            "unknown opcode" => Kind::UnknownOpcode,
            "continuation frame outside a message" => Kind::ContinuationOutsideMessage,
            "new message inside a fragmented one" => Kind::NewMessageInsideMessage,
            "invalid payload length" => Kind::LengthTopBit,
            other => Kind::Other(other),
        },
    }
}

fn close(payload: ClosePayload) -> Close {
    match payload {
        ClosePayload::Empty => Close::Empty,
        ClosePayload::Code(code) => Close::Code(code),
        ClosePayload::Invalid => Close::Invalid,
    }
}

/// Everything the scans of one run produced, added up.
#[derive(Debug, Default, PartialEq, Eq)]
struct Run {
    out: Vec<u8>,
    frames: u32,
    /// Scans that reported the pong to wsgate's ping.
    pong_scans: u32,
    /// Some scan reported data activity.
    data: bool,
    closes: Vec<Close>,
    /// The violation, with the bytes forwarded before it.
    violation: Option<(Kind, usize)>,
    /// The scanner's state at the end.
    carried: usize,
    at_boundary: bool,
    closed: bool,
}

/// One read the tunnel's way: the carried bytes first, then the read, in a buffer no larger than the
/// carry cap plus the read (plus optional slack), which starts out full of junk.
fn scan_once(
    scanner: &mut Scanner,
    buf: &mut Vec<u8>,
    chunk: &[u8],
    slack: bool,
    run: &mut Run,
) -> (wsgate::internals::scanner::Scan, usize) {
    let before = scanner.carried();
    assert!(
        before <= MAX_CONTROL_FRAME,
        "carried {before} > MAX_CONTROL_FRAME"
    );
    buf.clear();
    buf.resize(before + chunk.len() + if slack { SLACK } else { 0 }, JUNK);
    let carried = scanner.prepare(buf);
    assert_eq!(carried, before, "prepare() returned other than carried()");
    buf[carried..carried + chunk.len()].copy_from_slice(chunk);
    let filled = carried + chunk.len();
    let scan = scanner.scan(buf, filled);
    assert!(
        scan.out_len <= filled,
        "out_len {} > filled {filled}",
        scan.out_len
    );
    let after = scanner.carried();
    assert!(
        after <= MAX_CONTROL_FRAME,
        "carried {after} > MAX_CONTROL_FRAME after a scan"
    );
    if scan.violation.is_none() {
        assert!(
            after <= filled - scan.out_len,
            "carries {after} bytes, but only {} were not forwarded",
            filled - scan.out_len
        );
    }
    if let Some(violation) = scan.violation {
        run.violation = Some((kind(violation), run.out.len() + scan.out_len));
    }
    run.out.extend_from_slice(&buf[..scan.out_len]);
    run.frames += scan.frames;
    run.pong_scans += u32::from(scan.pong_matched);
    run.data |= scan.data;
    run.closes.extend(scan.close.map(close));
    (scan, filled)
}

fn finish(run: &mut Run, scanner: &Scanner) {
    run.carried = scanner.carried();
    run.at_boundary = scanner.at_boundary();
    run.closed = scanner.closed();
}

fn new_scanner(rules: &Rules) -> Scanner {
    let mut scanner = Scanner::new(rules.from_client, rules.allowed_rsv, rules.max_message);
    if let Some(token) = rules.pong_token {
        scanner.expect_pong(token);
    }
    scanner
}

/// What a run must add up to, from the reference decoding of the whole stream.
fn expected(d: &Decoded, pong_scans: u32) -> Run {
    Run {
        out: d.out.clone(),
        frames: d.frames,
        pong_scans,
        data: d.activity > 0,
        closes: d.close.into_iter().collect(),
        violation: d.violation,
        carried: d.pending,
        at_boundary: d.remaining == 0,
        closed: d.closed,
    }
}

/// The reads the input describes, each scan checked against the reference decoding of the stream up to
/// the end of its read. After a Close the tunnel reads no more; the rest of the reads are scanned anyway
/// here, to check that they are dropped.
fn run_described(input: &Input, whole: &Decoded) -> Run {
    let rules = &input.rules;
    let mut scanner = new_scanner(rules);
    let mut run = Run::default();
    let mut buf = Vec::new();
    let mut prev = reference::decode(rules, &[]);
    // Reads whose scan must report the pong (one scan may consume several).
    let mut pong_reads = 0;
    let mut end = 0;
    for (i, &len) in input.reads.iter().enumerate() {
        let chunk = &input.stream[end..end + len];
        end += len;
        if scanner.closed() {
            let (scan, _) = scan_once(&mut scanner, &mut buf, chunk, input.slack, &mut run);
            assert_eq!(
                (scan.out_len, scan.frames, scan.violation, scan.close),
                (0, 0, None, None),
                "read {i}: bytes after a Close were not dropped"
            );
            assert!(scanner.closed() && scanner.carried() == 0);
            continue;
        }
        let out_before = run.out.len();
        let (scan, _) = scan_once(&mut scanner, &mut buf, chunk, input.slack, &mut run);
        let now = reference::decode(rules, &input.stream[..end]);
        let ctx = format!("read {i} (stream bytes ..{end})");
        assert_eq!(
            &run.out[out_before..],
            &now.out[prev.out.len()..],
            "{ctx}: forwarded bytes"
        );
        assert_eq!(scan.frames, now.frames - prev.frames, "{ctx}: frames");
        assert_eq!(
            scan.pong_matched,
            now.pongs > prev.pongs,
            "{ctx}: pong_matched"
        );
        assert_eq!(scan.data, now.activity > prev.activity, "{ctx}: data");
        assert_eq!(scan.close.map(close), now.close, "{ctx}: close");
        assert_eq!(run.violation, now.violation, "{ctx}: violation");
        assert_eq!(scanner.carried(), now.pending, "{ctx}: carried()");
        assert_eq!(
            scanner.at_boundary(),
            now.remaining == 0,
            "{ctx}: at_boundary()"
        );
        assert_eq!(scanner.closed(), now.closed, "{ctx}: closed()");
        pong_reads += u32::from(now.pongs > prev.pongs);
        prev = now;
        if scan.violation.is_some() {
            // The tunnel stops reading a side that broke the protocol.
            break;
        }
    }
    finish(&mut run, &scanner);
    assert_eq!(run, expected(whole, pong_reads), "described reads");
    run
}

/// The stream in reads of the given lengths (the last one takes what is left), totals only.
fn run_chunks(input: &Input, mut lengths: impl FnMut(usize) -> usize) -> Run {
    let mut scanner = new_scanner(&input.rules);
    let mut run = Run::default();
    let mut buf = Vec::new();
    let mut rest = input.stream;
    loop {
        let n = lengths(rest.len()).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let (scan, _) = scan_once(&mut scanner, &mut buf, chunk, input.slack, &mut run);
        if scan.violation.is_some() || scan.close.is_some() || rest.is_empty() {
            break;
        }
    }
    finish(&mut run, &scanner);
    run
}

pub fn run(from_client: bool, data: &[u8]) {
    let Some(mut input) = parse(data) else {
        return;
    };
    input.rules.from_client = from_client;
    let whole = reference::decode(&input.rules, input.stream);

    let described = run_described(&input, &whole);

    let one_read = run_chunks(&input, |left| left);
    assert_eq!(
        one_read,
        expected(&whole, u32::from(whole.pongs > 0)),
        "the whole stream in one read"
    );

    let bytewise = run_chunks(&input, |_| 1);
    assert_eq!(bytewise, expected(&whole, whole.pongs), "one byte per read");

    // Every split agrees with the one-read run (on everything but how many scans saw a pong).
    let same = |run: &Run| Run {
        out: run.out.clone(),
        pong_scans: u32::from(run.pong_scans > 0),
        closes: run.closes.clone(),
        ..*run
    };
    assert_eq!(same(&described), one_read, "described reads vs one read");
    assert_eq!(same(&bytewise), one_read, "one byte per read vs one read");
}
