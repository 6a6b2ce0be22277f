//! The scanner against hand-built streams: every length form, every split point, the keepalive pong,
//! each rule of RFC 6455 §5 it enforces, the message-size limit, and random valid streams (proptest).

use proptest::prelude::*;

use super::*;
use crate::websocket::frame::{MAX_HEADER_LEN, write_header};

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const TOKEN: [u8; 8] = *b"wsgate!!";

/// One frame on the wire: header, then the payload masked with `mask`.
fn frame(fin: bool, rsv: u8, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut header = [0u8; MAX_HEADER_LEN];
    let n = write_header(&mut header, fin, opcode, mask, payload.len() as u64);
    header[0] |= (rsv & 0x7) << 4;
    let mut out = header[..n].to_vec();
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        frame::apply_mask(&mut out[start..], key, 0);
    }
    out
}

/// A client frame (masked with `KEY`).
fn cf(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(fin, 0, opcode, Some(KEY), payload)
}

/// A server frame (unmasked).
fn sf(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(fin, 0, opcode, None, payload)
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn client() -> Scanner {
    Scanner::new(true, 0, u64::MAX)
}

fn server() -> Scanner {
    Scanner::new(false, 0, u64::MAX)
}

/// Everything the scans of one stream produced, summed.
#[derive(Debug, Default, PartialEq)]
struct Run {
    out: Vec<u8>,
    frames: u32,
    pongs_matched: u32,
    data: bool,
    closes: Vec<ClosePayload>,
    violation: Option<Violation>,
    /// `out_len` of the scan that reported the violation, counted from the start of the stream.
    violation_at: Option<usize>,
    /// Scans made after the violation (the tunnel stops reading; the tests check nothing is lost before it).
    scans: usize,
}

/// Feeds `chunks` to `scanner` exactly the way the tunnel does: carried bytes first, then the chunk, in a
/// buffer just large enough for both.
fn feed<'a>(scanner: &mut Scanner, chunks: impl IntoIterator<Item = &'a [u8]>) -> Run {
    let mut run = Run::default();
    for chunk in chunks {
        if run.violation.is_some() {
            break;
        }
        let mut buf = vec![0u8; MAX_CONTROL_FRAME + chunk.len()];
        let carried = scanner.prepare(&mut buf);
        buf[carried..carried + chunk.len()].copy_from_slice(chunk);
        let scan = scanner.scan(&mut buf, carried + chunk.len());
        assert!(scan.out_len <= carried + chunk.len());
        run.scans += 1;
        if scan.violation.is_some() {
            run.violation = scan.violation;
            run.violation_at = Some(run.out.len() + scan.out_len);
        }
        run.out.extend_from_slice(&buf[..scan.out_len]);
        run.frames += scan.frames;
        run.pongs_matched += u32::from(scan.pong_matched);
        run.data |= scan.data;
        run.closes.extend(scan.close);
    }
    run
}

/// `stream` cut at each of `cuts` (sorted, deduplicated, inside the stream).
fn split_at<'a>(stream: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    for &cut in cuts {
        chunks.push(&stream[start..cut]);
        start = cut;
    }
    chunks.push(&stream[start..]);
    chunks
}

fn whole(scanner: &mut Scanner, stream: &[u8]) -> Run {
    feed(scanner, [stream])
}

/// The run of `stream` in one piece, and the same stream cut at every single offset, one cut at a time, must
/// agree on everything but the number of scans.
fn assert_every_split_agrees(make: impl Fn() -> Scanner, stream: &[u8]) -> Run {
    let reference = whole(&mut make(), stream);
    for cut in 0..=stream.len() {
        let mut run = feed(&mut make(), split_at(stream, &[cut]));
        run.scans = reference.scans;
        // The split may move where the violation is reported inside the stream, never what came before it.
        assert_eq!(run, reference, "stream split at {cut}");
    }
    reference
}

// ---------------------------------------------------------------------------------------------------------
// Lengths

#[test]
fn every_length_form_passes_unchanged_masked_and_unmasked() {
    for len in [0usize, 1, 125, 126, 127, 65535, 65536, 65537, 100_000] {
        let data = payload(len);
        for (from_client, stream) in [
            (true, cf(true, OP_BINARY, &data)),
            (false, sf(true, OP_BINARY, &data)),
        ] {
            let expected_header = match (len, from_client) {
                (0..=125, false) => 2,
                (126..=65535, false) => 4,
                (_, false) => 10,
                (0..=125, true) => 6,
                (126..=65535, true) => 8,
                (_, true) => 14,
            };
            assert_eq!(stream.len(), expected_header + len, "len {len}");
            let mut scanner = Scanner::new(from_client, 0, u64::MAX);
            let run = whole(&mut scanner, &stream);
            assert_eq!(run.out, stream, "len {len} from_client {from_client}");
            assert_eq!(run.frames, 1);
            assert!(run.data);
            assert_eq!(run.violation, None);
            assert!(scanner.at_boundary());
            // Cut into reads of 4 KiB, the frame still passes whole and the scanner ends between frames.
            let mut scanner = Scanner::new(from_client, 0, u64::MAX);
            let run = feed(&mut scanner, stream.chunks(4096));
            assert_eq!(run.out, stream);
            assert_eq!(run.frames, 1);
            assert!(scanner.at_boundary());
        }
    }
}

#[test]
fn headers_at_the_length_boundaries_split_at_every_offset() {
    for len in [125usize, 126, 65535, 65536] {
        let data = payload(len);
        for (make, stream) in [
            (client as fn() -> Scanner, cf(true, OP_TEXT, &data)),
            (server as fn() -> Scanner, sf(true, OP_TEXT, &data)),
        ] {
            // Cut once inside and around the header (the payload cut is covered by the small streams below).
            for cut in 0..=MAX_HEADER_LEN + 2 {
                let run = feed(&mut make(), split_at(&stream, &[cut]));
                assert_eq!(run.out, stream, "len {len} cut {cut}");
                assert_eq!(run.frames, 1);
                assert_eq!(run.violation, None);
            }
            let run = feed(&mut make(), split_at(&stream, &[stream.len() - 1]));
            assert_eq!(run.out, stream);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Split streams

/// A client stream with every kind of frame: 16-bit length, control frames between fragments, a 125-byte
/// pong, empty frames, and a Close at the end.
fn mixed_client_stream() -> (Vec<u8>, u32) {
    let parts = [
        cf(true, OP_TEXT, &payload(130)),
        cf(true, OP_PING, b"hello"),
        cf(false, OP_BINARY, &payload(3)),
        cf(true, OP_PONG, &payload(125)),
        cf(false, OP_CONTINUATION, &[]),
        cf(true, OP_PING, &[]),
        cf(true, OP_CONTINUATION, &payload(10)),
        cf(true, OP_TEXT, &[]),
        cf(true, OP_CLOSE, b"\x03\xe8bye"),
    ];
    (parts.concat(), parts.len() as u32)
}

#[test]
fn a_stream_cut_at_any_offset_gives_the_same_bytes_and_frames() {
    let (stream, frames) = mixed_client_stream();
    let reference = assert_every_split_agrees(client, &stream);
    assert_eq!(reference.out, stream);
    assert_eq!(reference.frames, frames);
    assert_eq!(reference.closes, [ClosePayload::Code(1000)]);

    let server_stream = [
        sf(false, OP_TEXT, &payload(200)),
        sf(true, OP_PING, &payload(125)),
        sf(true, OP_CONTINUATION, &payload(1)),
        sf(true, OP_BINARY, &payload(300)),
    ]
    .concat();
    let reference = assert_every_split_agrees(server, &server_stream);
    assert_eq!(reference.out, server_stream);
    assert_eq!(reference.frames, 4);
}

#[test]
fn a_stream_cut_at_any_two_offsets_gives_the_same_bytes_and_frames() {
    let (stream, frames) = mixed_client_stream();
    for a in 0..=stream.len() {
        for b in a..=stream.len() {
            let run = feed(&mut client(), split_at(&stream, &[a, b]));
            assert_eq!(run.out, stream, "cut at {a} and {b}");
            assert_eq!(run.frames, frames, "cut at {a} and {b}");
            assert_eq!(run.violation, None);
        }
    }
}

#[test]
fn a_stream_in_one_byte_reads_gives_the_same_bytes_and_frames() {
    let (stream, frames) = mixed_client_stream();
    let mut scanner = client();
    let run = feed(&mut scanner, stream.chunks(1));
    assert_eq!(run.out, stream);
    assert_eq!(run.frames, frames);
    assert!(scanner.closed());
}

#[test]
fn a_partial_header_or_control_frame_is_carried_not_forwarded() {
    let ping = cf(true, OP_PING, b"abc");
    for cut in 1..ping.len() {
        let mut scanner = client();
        let mut buf = vec![0u8; 256];
        buf[..cut].copy_from_slice(&ping[..cut]);
        let scan = scanner.scan(&mut buf, cut);
        assert_eq!(scan.out_len, 0, "cut {cut}");
        assert_eq!(scan.frames, 0);
        // Nothing of the frame went out: wsgate may still put a frame of its own in front of it.
        assert!(scanner.at_boundary(), "cut {cut}");
        let mut buf = vec![0u8; 256];
        let carried = scanner.prepare(&mut buf);
        assert_eq!(carried, cut);
        buf[carried..ping.len()].copy_from_slice(&ping[cut..]);
        let scan = scanner.scan(&mut buf, ping.len());
        assert_eq!(&buf[..scan.out_len], &ping[..]);
        assert_eq!(scan.frames, 1);
    }
}

#[test]
fn the_scanner_is_between_frames_only_after_a_whole_payload() {
    let text = cf(true, OP_TEXT, &payload(50));
    let mut scanner = client();
    feed(&mut scanner, [&text[..20]]);
    assert!(!scanner.at_boundary(), "in the middle of a payload");
    feed(&mut scanner, [&text[20..]]);
    assert!(scanner.at_boundary());
}

// ---------------------------------------------------------------------------------------------------------
// Control frames

#[test]
fn the_pong_to_wsgates_ping_is_consumed_and_other_pongs_and_pings_pass() {
    let ours = cf(true, OP_PONG, &TOKEN);
    let others = [
        cf(true, OP_PONG, b"wsgate!?"),
        cf(true, OP_PONG, b""),
        cf(true, OP_PING, &TOKEN),
        cf(true, OP_TEXT, &TOKEN),
    ];
    let stream = [&others[..2], std::slice::from_ref(&ours), &others[2..]]
        .concat()
        .concat();
    let expected = others.concat();
    let make = || {
        let mut scanner = client();
        scanner.expect_pong(TOKEN);
        scanner
    };
    let run = assert_every_split_agrees(make, &stream);
    assert_eq!(run.out, expected);
    assert_eq!(run.frames, 5, "the consumed pong is counted as a frame");
    assert_eq!(run.pongs_matched, 1);
    // Without an outstanding ping, the same pong passes.
    let run = whole(&mut client(), &stream);
    assert_eq!(run.out, stream);
    assert_eq!(run.pongs_matched, 0);
}

#[test]
fn every_pong_carrying_the_tunnels_token_is_consumed() {
    // The tunnel pings with one token for its whole life: a late answer to an earlier ping is wsgate's too.
    let mut scanner = server();
    scanner.expect_pong(TOKEN);
    let stream = [
        sf(true, OP_PONG, &TOKEN),
        sf(true, OP_BINARY, b"x"),
        sf(true, OP_PONG, &TOKEN),
    ]
    .concat();
    let run = whole(&mut scanner, &stream);
    assert_eq!(run.out, sf(true, OP_BINARY, b"x"));
    assert_eq!(run.pongs_matched, 1, "one scan reports a match once");
    assert_eq!(run.frames, 3);
}

#[test]
fn control_frames_are_not_data() {
    let stream = [cf(true, OP_PING, b"a"), cf(true, OP_PONG, b"b")].concat();
    let run = whole(&mut client(), &stream);
    assert!(!run.data);
    assert_eq!(run.frames, 2);
    let run = whole(&mut client(), &cf(true, OP_TEXT, b""));
    assert!(run.data, "an empty data frame is data");
}

#[test]
fn a_ping_between_two_fragments_passes() {
    let stream = [
        cf(false, OP_TEXT, b"hel"),
        cf(true, OP_PING, b"mid"),
        cf(true, OP_PONG, b"mid"),
        cf(true, OP_CONTINUATION, b"lo"),
    ]
    .concat();
    let run = assert_every_split_agrees(client, &stream);
    assert_eq!(run.out, stream);
    assert_eq!(run.frames, 4);
    assert_eq!(run.violation, None);
}

#[test]
fn a_close_reports_its_payload_and_later_bytes_are_dropped() {
    let close = cf(true, OP_CLOSE, b"\x0f\xa0going");
    let stream = [
        cf(true, OP_TEXT, b"before"),
        close.clone(),
        cf(true, OP_TEXT, b"after"),
        b"\xff\xff garbage, not even frames".to_vec(),
    ]
    .concat();
    let expected = [cf(true, OP_TEXT, b"before"), close].concat();
    let mut scanner = client();
    let run = assert_every_split_agrees(client, &stream);
    assert_eq!(run.out, expected);
    assert_eq!(run.closes, [ClosePayload::Code(4000)]);
    assert_eq!(run.frames, 2);
    whole(&mut scanner, &expected);
    assert!(scanner.closed());
    // A later read adds nothing.
    let run = whole(&mut scanner, &cf(true, OP_TEXT, b"late"));
    assert_eq!(run.out, b"");
    assert_eq!(run.frames, 0);
    for (payload, parsed) in [
        (&b""[..], ClosePayload::Empty),
        (b"\x03", ClosePayload::Invalid),
        (b"\x03\xe9", ClosePayload::Code(1001)),
    ] {
        let run = whole(&mut server(), &sf(true, OP_CLOSE, payload));
        assert_eq!(run.closes, [parsed]);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Violations

/// Whole, valid frames put in front of each violation: all of them must still be forwarded.
fn prefix(from_client: bool) -> Vec<u8> {
    let f = if from_client { cf } else { sf };
    [f(true, OP_TEXT, b"fine"), f(true, OP_PING, b"p")].concat()
}

fn assert_violation(
    make: impl Fn() -> Scanner,
    from_client: bool,
    bad: &[u8],
    what: &str,
    expected: Violation,
) {
    let good = prefix(from_client);
    let stream = [&good[..], bad, &prefix(from_client)].concat();
    for cut in 0..=stream.len() {
        let run = feed(&mut make(), split_at(&stream, &[cut]));
        assert_eq!(run.violation, Some(expected), "{what}: cut at {cut}");
        assert_eq!(run.violation_at, Some(good.len()), "{what}: cut at {cut}");
        assert_eq!(run.out, good, "{what}: cut at {cut}");
        assert_eq!(run.frames, 2, "{what}: cut at {cut}");
    }
}

fn protocol(what: &'static str) -> Violation {
    Violation::Protocol(what)
}

#[test]
fn an_unmasked_frame_from_the_client_is_a_violation() {
    let bad = sf(true, OP_TEXT, b"plain");
    let expected = protocol("unmasked frame from the client");
    assert_violation(client, true, &bad, "unmasked", expected);
    assert_violation(client, true, &sf(true, OP_PING, b""), "unmasked", expected);
}

#[test]
fn a_masked_frame_from_the_server_is_a_violation() {
    let bad = cf(true, OP_BINARY, b"hidden");
    assert_violation(
        server,
        false,
        &bad,
        "masked",
        protocol("masked frame from the server"),
    );
}

#[test]
fn reserved_opcodes_are_violations() {
    for opcode in (3..=7).chain(11..=15) {
        let bad = cf(true, opcode, b"?");
        assert_violation(client, true, &bad, "opcode", protocol("unknown opcode"));
        let bad = sf(true, opcode, b"");
        assert_violation(server, false, &bad, "opcode", protocol("unknown opcode"));
    }
}

#[test]
fn a_control_frame_over_125_bytes_is_a_violation() {
    for opcode in [OP_PING, OP_PONG, OP_CLOSE] {
        let bad = cf(true, opcode, &payload(126));
        let expected = protocol("control frame over 125 bytes");
        assert_violation(client, true, &bad, "long control", expected);
        let bad = sf(true, opcode, &payload(70_000));
        assert_violation(server, false, &bad, "long control", expected);
    }
}

#[test]
fn a_fragmented_control_frame_is_a_violation() {
    for opcode in [OP_PING, OP_PONG, OP_CLOSE] {
        let bad = cf(false, opcode, b"part");
        let expected = protocol("fragmented control frame");
        assert_violation(client, true, &bad, "fragmented control", expected);
    }
}

#[test]
fn reserved_bits_without_an_extension_are_violations() {
    let expected = protocol("reserved bits set without an extension");
    for rsv in [0b100, 0b010, 0b001, 0b111] {
        let bad = frame(true, rsv, OP_TEXT, Some(KEY), b"zip");
        assert_violation(client, true, &bad, "rsv", expected);
        let bad = frame(true, rsv, OP_PING, None, b"");
        assert_violation(server, false, &bad, "rsv", expected);
    }
    // With permessage-deflate, RSV1 passes and the others still do not.
    let deflate = || Scanner::new(true, 0b100, u64::MAX);
    let compressed = frame(true, 0b100, OP_TEXT, Some(KEY), b"zip");
    assert_eq!(whole(&mut deflate(), &compressed).out, compressed);
    let bad = frame(true, 0b010, OP_TEXT, Some(KEY), b"zip");
    assert_violation(deflate, true, &bad, "rsv2 with deflate", expected);
}

#[test]
fn a_continuation_without_a_start_is_a_violation() {
    let bad = cf(true, OP_CONTINUATION, b"orphan");
    let expected = protocol("continuation frame outside a message");
    assert_violation(client, true, &bad, "orphan continuation", expected);
    // Also right after a finished message.
    let stream = [cf(false, OP_TEXT, b"a"), cf(true, OP_CONTINUATION, b"b")].concat();
    let bad = [&stream[..], &cf(false, OP_CONTINUATION, b"c")].concat();
    let run = whole(&mut client(), &bad);
    assert_eq!(run.violation, Some(expected));
    assert_eq!(run.violation_at, Some(stream.len()));
}

#[test]
fn a_new_message_inside_a_fragmented_one_is_a_violation() {
    let expected = protocol("new message inside a fragmented one");
    let started = cf(false, OP_BINARY, b"first half");
    for opcode in [OP_TEXT, OP_BINARY] {
        let bad = cf(true, opcode, b"intruder");
        let stream = [&prefix(true)[..], &started, &bad].concat();
        let good = stream.len() - bad.len();
        for cut in 0..=stream.len() {
            let run = feed(&mut client(), split_at(&stream, &[cut]));
            assert_eq!(run.violation, Some(expected), "cut {cut}");
            assert_eq!(run.violation_at, Some(good), "cut {cut}");
            assert_eq!(run.out, stream[..good]);
        }
    }
}

#[test]
fn a_payload_length_with_the_top_bit_set_is_a_violation() {
    let mut bad = vec![0x82, 0x80 | 127];
    bad.extend_from_slice(&(1u64 << 63).to_be_bytes());
    bad.extend_from_slice(&KEY);
    assert_violation(
        client,
        true,
        &bad,
        "length",
        protocol("invalid payload length"),
    );
}

// ---------------------------------------------------------------------------------------------------------
// Message size

#[test]
fn a_message_exactly_at_the_limit_passes_and_one_byte_more_fails() {
    let limited = || Scanner::new(true, 0, 1000);
    let at_limit = cf(true, OP_BINARY, &payload(1000));
    let run = whole(&mut limited(), &at_limit);
    assert_eq!(run.out, at_limit);
    assert_eq!(run.violation, None);

    let over = cf(true, OP_BINARY, &payload(1001));
    assert_violation(limited, true, &over, "too big", Violation::MessageTooBig);
}

#[test]
fn the_message_size_limit_counts_all_fragments() {
    let limited = || Scanner::new(true, 0, 1000);
    // 400 + ping + 0 + 600 = 1000: passes; control frames do not count.
    let at_limit = [
        cf(false, OP_TEXT, &payload(400)),
        cf(true, OP_PING, &payload(125)),
        cf(false, OP_CONTINUATION, &[]),
        cf(true, OP_CONTINUATION, &payload(600)),
    ]
    .concat();
    let run = assert_every_split_agrees(limited, &at_limit);
    assert_eq!(run.out, at_limit);
    assert_eq!(run.violation, None);

    // The next message starts from zero again.
    let two = [at_limit.clone(), cf(true, OP_BINARY, &payload(1000))].concat();
    assert_eq!(whole(&mut limited(), &two).violation, None);

    // 400 + 601 fails at the second fragment; the first one, a whole frame, was already forwarded.
    let first = [&prefix(true)[..], &cf(false, OP_TEXT, &payload(400))].concat();
    let stream = [first.clone(), cf(true, OP_CONTINUATION, &payload(601))].concat();
    for cut in 0..=stream.len() {
        let run = feed(&mut limited(), split_at(&stream, &[cut]));
        assert_eq!(run.violation, Some(Violation::MessageTooBig), "cut {cut}");
        assert_eq!(run.violation_at, Some(first.len()), "cut {cut}");
        assert_eq!(run.out, first);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Random valid streams

/// One frame of a generated stream.
#[derive(Debug, Clone)]
struct Spec {
    fin: bool,
    opcode: u8,
    len: usize,
    mask: [u8; 4],
}

fn length() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 0..16usize,
        3 => 120..132usize,
        1 => 1000..5000usize,
        1 => 65530..65542usize,
        1 => Just(100_000usize),
    ]
}

fn control() -> impl Strategy<Value = Spec> {
    (
        prop_oneof![Just(OP_PING), Just(OP_PONG)],
        0..=125usize,
        any::<[u8; 4]>(),
    )
        .prop_map(|(opcode, len, mask)| Spec {
            fin: true,
            opcode,
            len,
            mask,
        })
}

/// A message of 1–4 fragments with control frames between them.
fn message() -> impl Strategy<Value = Vec<Spec>> {
    (
        prop_oneof![Just(OP_TEXT), Just(OP_BINARY)],
        prop::collection::vec(
            (
                length(),
                any::<[u8; 4]>(),
                prop::option::weighted(0.3, control()),
            ),
            1..5,
        ),
    )
        .prop_map(|(opcode, fragments)| {
            let last = fragments.len() - 1;
            let mut specs = Vec::new();
            for (i, (len, mask, between)) in fragments.into_iter().enumerate() {
                specs.push(Spec {
                    fin: i == last,
                    opcode: if i == 0 { opcode } else { OP_CONTINUATION },
                    len,
                    mask,
                });
                if i != last {
                    specs.extend(between);
                }
            }
            specs
        })
}

fn stream_specs() -> impl Strategy<Value = Vec<Spec>> {
    prop::collection::vec(
        prop_oneof![3 => message(), 1 => control().prop_map(|c| vec![c])],
        1..12,
    )
    .prop_map(|messages| messages.concat())
}

fn build(specs: &[Spec], masked: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let data: Vec<u8> = (0..spec.len).map(|j| (i * 31 + j) as u8).collect();
        out.extend(frame(
            spec.fin,
            0,
            spec.opcode,
            masked.then_some(spec.mask),
            &data,
        ));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_valid_streams_cut_at_random_points_pass_unchanged(
        specs in stream_specs(),
        masked in any::<bool>(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..24),
    ) {
        let stream = build(&specs, masked);
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut scanner = Scanner::new(masked, 0, u64::MAX);
        let run = feed(&mut scanner, split_at(&stream, &cuts));
        prop_assert_eq!(run.violation, None);
        prop_assert_eq!(run.frames as usize, specs.len());
        prop_assert!(run.out == stream, "output differs from the input");
        prop_assert!(scanner.at_boundary());
        prop_assert_eq!(scanner.carry_len, 0);
    }
}

#[test]
fn a_control_frame_with_a_padded_length_is_a_violation_at_every_split() {
    // The 16- and 64-bit length forms for a payload that fits the 7-bit one (§5.2): up to 139 bytes for a
    // 125-byte ping, more than the scanner carries. Refused whole, whatever the reads cut.
    let expected = protocol("control frame length not in minimal form");
    for opcode in [OP_PING, OP_PONG, OP_CLOSE] {
        for (len, form) in [(0usize, 126u8), (4, 126), (125, 126), (0, 127), (125, 127)] {
            for (make, from_client, mask) in [
                (client as fn() -> Scanner, true, Some(KEY)),
                (server as fn() -> Scanner, false, None),
            ] {
                let mut data = if opcode == OP_CLOSE && len >= 2 {
                    let mut p = b"\x03\xe8".to_vec();
                    p.resize(len, b'a');
                    p
                } else {
                    payload(len)
                };
                let mut bad = vec![0x80 | opcode, form | if mask.is_some() { 0x80 } else { 0 }];
                if form == 126 {
                    bad.extend_from_slice(&(len as u16).to_be_bytes());
                } else {
                    bad.extend_from_slice(&(len as u64).to_be_bytes());
                }
                if let Some(key) = mask {
                    bad.extend_from_slice(&key);
                    frame::apply_mask(&mut data, key, 0);
                }
                bad.extend_from_slice(&data);
                assert_violation(make, from_client, &bad, "padded control length", expected);
            }
        }
    }
}

#[test]
fn empty_fragments_that_end_nothing_are_not_data() {
    let stream = [cf(false, OP_TEXT, &[]), cf(false, OP_CONTINUATION, &[])].concat();
    let run = whole(&mut client(), &stream);
    assert_eq!(run.frames, 2);
    assert!(!run.data, "empty non-final fragments counted as activity");
    let run = whole(&mut client(), &cf(true, OP_CONTINUATION, &[]));
    assert_eq!(
        run.violation,
        Some(protocol("continuation frame outside a message"))
    );
    let stream = [cf(false, OP_TEXT, &[]), cf(true, OP_CONTINUATION, &[])].concat();
    assert!(
        whole(&mut client(), &stream).data,
        "a message's end is data"
    );
}
