//! The seed inputs the corpora started from, and a test that every seed passes its target.
//!
//! `cargo test --manifest-path fuzz/Cargo.toml -- --ignored write_seeds` writes them into `corpus/`
//! (named `seed-*`, so a later `cargo fuzz cmin` may drop the ones that add no coverage).

/// The token of the seeds that expect a pong.
pub const TOKEN: [u8; 8] = *b"wsgate!!";
const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// One frame: `len_form` forces the 16-bit (126) or 64-bit (127) length form.
fn frame(first: u8, masked: bool, payload: &[u8], len_form: Option<u8>) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut out = vec![first];
    let len = payload.len();
    match len_form {
        Some(126) => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        Some(_) => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        None if len < 126 => out.push(mask_bit | len as u8),
        None if len <= 0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        None => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&KEY);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// An input for the scanner targets (layout in `scanner_target.rs`).
fn input(flags: u8, limit: (u8, u8), reads: &[u8], stream: &[u8]) -> Vec<u8> {
    let mut out = vec![flags, limit.0, limit.1];
    out.extend_from_slice(&TOKEN);
    out.push(reads.len() as u8);
    out.extend_from_slice(reads);
    out.extend_from_slice(stream);
    out
}

/// Seeds for one direction: (name, input).
pub fn scanner(from_client: bool) -> Vec<(String, Vec<u8>)> {
    let m = from_client;
    let f = |first: u8, payload: &[u8]| frame(first, m, payload, None);
    let unlimited = (2, 0);
    let text: Vec<u8> = (0..300u32).map(|i| b'a' + (i % 26) as u8).collect();
    let cat = |parts: &[Vec<u8>]| parts.concat();
    let mut seeds = vec![
        ("text", input(0, unlimited, &[], &f(0x81, b"hello"))),
        (
            "fragmented-with-ping",
            input(
                0,
                unlimited,
                &[3, 1, 7],
                &cat(&[
                    f(0x01, b"frag"),
                    f(0x89, b"ping"),
                    f(0x00, b"ment"),
                    f(0x80, b"ed"),
                ]),
            ),
        ),
        (
            "binary-16bit",
            input(0, unlimited, &[5, 200], &f(0x82, &text[..200])),
        ),
        (
            "binary-64bit-padded",
            input(0, unlimited, &[12], &frame(0x82, m, &text, Some(127))),
        ),
        (
            "pong-token-and-close",
            input(
                0b1000,
                unlimited,
                &[9, 9, 9],
                &cat(&[
                    f(0x8A, &TOKEN),
                    f(0x8A, b"other"),
                    f(0x89, b""),
                    f(0x88, b"\x03\xe8bye"),
                    f(0x81, b"after the close"),
                ]),
            ),
        ),
        (
            "close-invalid",
            input(0, unlimited, &[], &cat(&[f(0x88, b"\x03"), f(0x81, b"x")])),
        ),
        (
            "close-1005",
            input(0, unlimited, &[], &f(0x88, b"\x03\xed")),
        ),
        (
            "close-empty-split",
            input(0, unlimited, &[1], &f(0x88, b"")),
        ),
        (
            "rsv1-allowed",
            input(0b100, unlimited, &[], &f(0xC1, b"deflated")),
        ),
        ("rsv-refused", input(0, unlimited, &[], &f(0xF1, b"x"))),
        ("unknown-opcode", input(0, unlimited, &[], &f(0x83, b"x"))),
        (
            "control-fragmented",
            input(0, unlimited, &[], &f(0x09, b"x")),
        ),
        (
            "control-not-minimal",
            input(0, unlimited, &[], &frame(0x89, m, b"x", Some(126))),
        ),
        (
            "control-too-long",
            input(0, unlimited, &[], &f(0x89, &text[..126])),
        ),
        (
            "length-top-bit",
            input(
                0,
                unlimited,
                &[],
                &[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4],
            ),
        ),
        (
            "continuation-outside",
            input(0, unlimited, &[], &f(0x80, b"x")),
        ),
        (
            "new-message-inside",
            input(0, unlimited, &[], &cat(&[f(0x01, b"a"), f(0x81, b"b")])),
        ),
        (
            "message-too-big",
            input(
                0,
                (0, 6),
                &[2, 2, 2],
                &cat(&[f(0x01, b"abc"), f(0x00, b"def"), f(0x80, b"g")]),
            ),
        ),
        (
            "wrong-masking",
            input(0, unlimited, &[], &frame(0x81, !m, b"x", None)),
        ),
        (
            "ping-split-everywhere",
            input(
                0,
                unlimited,
                &[1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                &cat(&[f(0x89, b"are you there"), f(0x81, b"yes")]),
            ),
        ),
    ];
    seeds.push((
        "large-read",
        input(0, (1, 255), &[240], &f(0x82, &text[..250])),
    ));
    seeds
        .into_iter()
        .map(|(name, bytes)| (name.to_string(), bytes))
        .collect()
}

/// A valid config from tests/it/config_errors.rs.
const BASE: &str = r#"[[listener]]
name = "main"
listen = "127.0.0.1:0"

[[route]]
name = "r"
pool = "p"
websocket = { idle_timeout = "60s" }

[pool.p]
backends = [ { addr = "127.0.0.1:9000" } ]
"#;

const EVERY_ERROR: &str = r#"[timeouts]
connect = "0s"
drain = "forever"

[[listener]]
name = "main"
listen = "localhost:80"

[[route]]
name = "r"
pool = "missing"
websocket = { max_message_size = "12 parsecs" }

[[route]]
name = "s"
path_prefix = "ws"
pool = "p"

[pool.p]
backends = [ { addr = "nohost" } ]

[pool.q]
backends = []
"#;

const STICKY: &str = r#"workers = 2
[limits]
max_connections = 1000
max_header_size = "16KiB"

[[listener]]
name = "tls"
listen = "[::1]:8443"
tls = { certs = [ { cert = "a.pem", key = "a.key" } ] }

[[route]]
name = "ws"
host = "Chat.Example.com"
path_prefix = "/ws"
pool = "chat"
websocket = { ping_interval = "0s", max_lifetime = "1h", ping_backend = true, close_timeout = "500ms" }

[pool.chat]
policy = "sticky"
sticky = { source_ip = true, trusted_proxies = ["10.0.0.0/8", "::1/128", "127.0.0.1"] }
max_fails = 0
fail_timeout = "1d"
health = { path = "/healthz", interval = "5s", timeout = "1s", rise = 1, fall = 100, websocket = true }
backends = [ { addr = "b1:9000", id = "one", weight = 1000 }, { addr = "[::1]:9001", drain = true } ]
"#;

/// Seeds for the config target: (name, text).
pub fn config() -> Vec<(String, String)> {
    let mut seeds = vec![
        (
            "example",
            include_str!("../../config/wsgate.toml").to_string(),
        ),
        ("deploy", include_str!("../../deploy/wsgate.toml").to_string()),
        ("base", BASE.to_string()),
        ("every-error", EVERY_ERROR.to_string()),
        ("sticky", STICKY.to_string()),
        (
            "unknown-key",
            format!("workers = 2\ncolour = \"blue\"\n{BASE}"),
        ),
        (
            "syntax-error",
            BASE.replace("name = \"r\"", "name = \"r"),
        ),
        (
            "wrong-type",
            BASE.replace(
                "{ addr = \"127.0.0.1:9000\" }",
                "{ addr = \"127.0.0.1:9000\", weight = \"2\" }",
            ),
        ),
        (
            "bad-units",
            format!("[timeouts]\nhandshake = \"5 sec\"\n\n[limits]\nmax_header_size = \"1B\"\n\n{BASE}"),
        ),
        (
            "huge-values",
            format!(
                "[timeouts]\nconnect = \"18446744073709551615ms\"\ndrain = \"213503982334601d\"\n\
                 [limits]\nmax_connections = 9223372036854775807\n\n{}",
                BASE.replace("\"60s\"", "\"5124095576030431h\"")
            ),
        ),
        (
            "sticky-cookie",
            BASE.replace(
                "[pool.p]\n",
                "[pool.p]\npolicy = \"sticky\"\nsticky = { cookie = \"wsgate\" }\n",
            ),
        ),
        (
            "sticky-header-query",
            BASE.replace(
                "[pool.p]\n",
                "[pool.p]\npolicy = \"sticky\"\nsticky = { header = \"x-user\", query = \"room\" }\n",
            ),
        ),
    ];
    seeds.push(("empty", String::new()));
    seeds
        .into_iter()
        .map(|(name, text)| (name.to_string(), text))
        .collect()
}

/// Seeds for the admin token file target: (name, file text).
pub fn admin_tokens() -> Vec<(String, String)> {
    [
        ("one", "ops:0123456789abcdef0123456789abcdef\n"),
        (
            "comments-and-two",
            "# deploy tooling\ndeploy:zzzzzzzzzzzzzzzzzzzz\n\n  oncall : 0123456789abcdef \n",
        ),
        ("same-token-twice", "a:0123456789abcdef\nb:0123456789abcdef\n"),
        ("short", "ops:short\n"),
        ("no-colon", "0123456789abcdef0123\n"),
        ("bad-name", "a b:0123456789abcdef\n"),
        ("name-twice", "a:0123456789abcdef\na:0123456789abcdeg\n"),
        ("empty", ""),
        ("crlf", "ops:0123456789abcdef\r\n"),
        ("colon-in-token", "ops:0123:456789abcdef\n"),
    ]
    .into_iter()
    .map(|(name, text)| (name.to_string(), text.to_string()))
    .collect()
}

/// Seeds for the origin target (layout in `origin_target.rs`): (name, input).
pub fn origin() -> Vec<(String, Vec<u8>)> {
    let input = |flags: u8, patterns: &[&str], value: &[u8]| {
        let mut out = vec![flags];
        for p in patterns {
            out.extend_from_slice(p.as_bytes());
            out.push(b'\n');
        }
        out.extend_from_slice(value);
        out
    };
    let usual = [
        "https://app.example.com",
        "https://*.example.com",
        "http://localhost:8080",
    ];
    let seeds = [
        ("exact", input(0, &usual, b"https://app.example.com")),
        ("upper", input(0, &usual, b"HTTPS://APP.EXAMPLE.COM:443")),
        (
            "wildcard-deep",
            input(0, &usual, b"https://a.b.example.com"),
        ),
        ("wildcard-apex", input(0, &usual, b"https://example.com")),
        (
            "wildcard-glued",
            input(0, &usual, b"https://badexample.com"),
        ),
        ("port", input(0, &usual, b"http://localhost:8081")),
        (
            "trailing-dot",
            input(0, &usual, b"https://app.example.com."),
        ),
        ("null", input(0, &usual, b"null")),
        ("path", input(0, &usual, b"https://app.example.com/")),
        ("userinfo", input(0, &usual, b"https://u@app.example.com")),
        ("list", input(0, &usual, b"https://a.com https://b.com")),
        (
            "non-ascii",
            input(0, &usual, b"https://b\xc3\xbccher.example"),
        ),
        ("missing", input(0b010, &usual, b"")),
        ("missing-allowed", input(0b011, &usual, b"https://a.com")),
        ("repeated", input(0b110, &usual, b"https://app.example.com")),
        (
            "ip",
            input(
                0,
                &[
                    "http://[::1]:8080",
                    "https://127.0.0.1",
                    "wss://[::ffff:1.2.3.4]",
                ],
                b" http://[0:0::1]:8080\t",
            ),
        ),
        (
            "bad-patterns",
            input(
                0,
                &[
                    "*",
                    "null",
                    "https://a..com",
                    "https://*example.com",
                    "https://a.com:0",
                    "https://a.com/",
                    "https://bücher.example",
                    "HTTPS://A.COM.:443",
                ],
                b"https://a.com",
            ),
        ),
        (
            "other-scheme",
            input(
                0,
                &["chrome-extension://abcdefgh", "foo+bar://x.y:1"],
                b"FOO+BAR://X.Y:00001",
            ),
        ),
    ];
    seeds
        .into_iter()
        .map(|(name, bytes)| (name.to_string(), bytes))
        .collect()
}

/// Seeds for the `proxy_header` target: (name, bytes at the start of a connection). Headers of each
/// kind, most followed by what a client sends next, and the near misses around them.
pub fn proxy_header() -> Vec<(String, Vec<u8>)> {
    let v2 = |command: u8, family: u8, block: &[u8]| {
        let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        out.extend_from_slice(&[command, family]);
        out.extend_from_slice(&(block.len() as u16).to_be_bytes());
        out.extend_from_slice(block);
        out
    };
    let inet = [192, 0, 2, 7, 198, 51, 100, 1, 0xc8, 0x22, 0x01, 0xbb];
    let mut inet6 = vec![0x20, 0x01, 0x0d, 0xb8];
    inet6.resize(15, 0);
    inet6.push(7);
    inet6.resize(31, 0);
    inet6.push(1);
    inet6.extend_from_slice(&[0xc8, 0x22, 0x01, 0xbb]);
    let mut unix = b"/run/lb.sock".to_vec();
    unix.resize(216, 0);
    // AWS NLB's VPC endpoint TLV, an authority, a unique ID, SSL with a version, a NOOP.
    let tlvs: &[u8] = b"\xea\x00\x17\x01vpce-0123456789abcdef0\
        \x02\x00\x10chat.example.com\x05\x00\x04abcd\
        \x20\x00\x0f\x01\x00\x00\x00\x00\x21\x00\x07TLSv1.3\x04\x00\x02\x00\x00";
    let request: &[u8] = b"GET /chat HTTP/1.1\r\nHost: example.com\r\n\r\n";
    let hello: &[u8] = b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03";
    let cat = |parts: &[&[u8]]| parts.concat();
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "v1-tcp4",
            cat(&[b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 443\r\n", request]),
        ),
        (
            "v1-tcp6",
            cat(&[b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n", hello]),
        ),
        (
            "v1-tcp6-mapped",
            b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1 2\r\n".to_vec(),
        ),
        (
            "v1-longest",
            b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n".to_vec(),
        ),
        ("v1-unknown", cat(&[b"PROXY UNKNOWN\r\n", request])),
        (
            "v1-unknown-addresses",
            b"PROXY UNKNOWN 192.0.2.7 198.51.100.1 51234 443\r\n".to_vec(),
        ),
        (
            "v1-too-long",
            cat(&[b"PROXY UNKNOWN ", &[b'x'; 120], b"\r\n"]),
        ),
        (
            "v1-missing-fields",
            b"PROXY TCP4 192.0.2.7\r\nGET / HTTP/1.1\r\n".to_vec(),
        ),
        (
            "v1-plus-port",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 +80 443\r\n".to_vec(),
        ),
        ("v1-cut", b"PROXY TCP4 192.0.2.7 198.5".to_vec()),
        ("v2-inet", cat(&[&v2(0x21, 0x11, &inet), request])),
        ("v2-inet6", cat(&[&v2(0x21, 0x21, &inet6), hello])),
        ("v2-inet-tlvs", v2(0x21, 0x11, &cat(&[&inet, tlvs]))),
        ("v2-inet6-tlvs", v2(0x21, 0x21, &cat(&[&inet6, tlvs]))),
        ("v2-local", cat(&[&v2(0x20, 0x00, &[]), request])),
        ("v2-local-inet", v2(0x20, 0x11, &inet)),
        ("v2-unspec", v2(0x21, 0x00, &[])),
        ("v2-unix", v2(0x21, 0x31, &cat(&[&unix, tlvs]))),
        ("v2-dgram", v2(0x21, 0x12, &inet)),
        ("v2-short-length", v2(0x21, 0x11, &inet[..4])),
        ("v2-cut-tlv", v2(0x21, 0x11, &cat(&[&inet, b"\x04\x00\x09\x00"]))),
        (
            "v2-oversized",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".to_vec(),
        ),
        ("http", request.to_vec()),
        ("tls", hello.to_vec()),
        ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()),
    ];
    seeds
        .into_iter()
        .map(|(name, bytes)| (name.to_string(), bytes))
        .collect()
}

/// Seeds for the `tls_session` target (layout in `tls_session_target.rs`): raw streams starting with a
/// real ClientHello (or not TLS at all), and scripts over a real client's session that touch each thing
/// the session does: records cut into small reads, data larger than the reader's buffer, key updates,
/// `close_notify` both ways, writes held back, corruptions, EOF, stream errors.
pub fn tls_session() -> Vec<(String, Vec<u8>)> {
    use crate::tls_session_target::client_hello;
    use crate::tls_session_target::script::*;
    let raw_mode = |hello: &[u8], read_piece: u8, eof_after: bool| {
        let mut out = start(false, false, false, read_piece, 0);
        for chunk in hello.chunks(700) {
            raw(&mut out, chunk);
        }
        if eof_after {
            eof(&mut out);
        }
        read(&mut out, 1);
        out
    };
    let hello13 = client_hello(false);
    let hello12 = client_hello(true);
    let raw_seeds: Vec<(&str, Vec<u8>)> = vec![
        ("raw-hello13", raw_mode(&hello13, 0, false)),
        ("raw-hello12", raw_mode(&hello12, 0, false)),
        ("raw-hello13-bytewise", raw_mode(&hello13, 1, false)),
        (
            "raw-hello12-cut",
            raw_mode(&hello12[..hello12.len() / 2], 0, true),
        ),
        ("raw-hello13-eof", raw_mode(&hello13, 0, true)),
        (
            "raw-http",
            raw_mode(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0, false),
        ),
        (
            "raw-hello-in-one-byte-records",
            // A ClientHello announcing 60000 bytes, then its bytes one per record: more than
            // `MAX_INCOMING` before it is whole.
            {
                let mut out = start(false, false, false, 0, 0);
                raw(&mut out, &[22, 3, 1, 0, 4, 1, 0, 0xea, 0x60]);
                let records: Vec<u8> = (0..60u8).flat_map(|i| [22, 3, 1, 0, 1, i]).collect();
                for _ in 0..2 {
                    raw_times(&mut out, &records, 255);
                }
                read(&mut out, 1);
                out
            },
        ),
        (
            "raw-oversized",
            raw_mode(&[22, 3, 1, 0xff, 0xff, 1, 0, 0xff, 0xfb], 0, false),
        ),
    ];
    let mut seeds: Vec<(String, Vec<u8>)> = raw_seeds
        .into_iter()
        .map(|(name, bytes)| (name.to_string(), bytes))
        .collect();
    for tls12 in [false, true] {
        let v = if tls12 { "12" } else { "13" };
        let name = |s: &str| format!("{s}-{v}");
        // ChaCha20 for TLS 1.2 (no explicit nonce in its records), AES-128-GCM for 1.3.
        let new = |read_piece: u8, write_piece: u8| start(true, tls12, tls12, read_piece, write_piece);

        let mut s = new(0, 0);
        client_data(&mut s, 100, 16 << 10);
        read(&mut s, 4096);
        write(&mut s, 50);
        client_read(&mut s);
        seeds.push((name("echo"), s));

        let mut s = new(1, 7);
        client_data(&mut s, 40_000, 16 << 10);
        for _ in 0..5 {
            read(&mut s, 100);
        }
        read_all(&mut s, 1000);
        seeds.push((name("small-reads-bytewise-handshake"), s));

        let mut s = new(0, 0);
        read_piece(&mut s, 1);
        client_data(&mut s, 300, 100);
        read_all(&mut s, 64);
        read_piece(&mut s, 210);
        client_data(&mut s, 30_000, 1000);
        read_all(&mut s, 16 << 10);
        seeds.push((name("trickle"), s));

        let mut s = new(0, 0);
        let_through(&mut s, Some(0));
        client_data(&mut s, 2000, 500);
        for n in [3, 2, 500, 7, 1000] {
            let_through(&mut s, Some(n));
            read(&mut s, 300);
        }
        let_through(&mut s, None);
        read_all(&mut s, 300);
        seeds.push((name("let-through-in-pieces"), s));

        let mut s = new(0, 0);
        key_update(&mut s);
        client_data(&mut s, 100, 100);
        key_update(&mut s);
        key_update(&mut s);
        read_all(&mut s, 50);
        write(&mut s, 100);
        flush(&mut s);
        client_read(&mut s);
        client_data(&mut s, 100, 100);
        read_all(&mut s, 50);
        seeds.push((name("key-updates"), s));

        let mut s = new(0, 0);
        for _ in 0..34 {
            key_update(&mut s);
        }
        read_all(&mut s, 50);
        seeds.push((name("too-many-key-updates"), s));

        let mut s = new(0, 0);
        client_data(&mut s, 5000, 16 << 10);
        close_notify(&mut s);
        read_all(&mut s, 1000);
        read(&mut s, 10);
        write(&mut s, 10);
        shutdown(&mut s);
        client_read(&mut s);
        seeds.push((name("close-both-ways"), s));

        let mut s = new(0, 0);
        client_data(&mut s, 20_000, 16 << 10);
        flip(&mut s, 17_000, 0x40);
        read_all(&mut s, 100);
        read(&mut s, 100);
        seeds.push((name("flipped"), s));

        let mut s = new(0, 0);
        client_data(&mut s, 3000, 1000);
        raw(
            &mut s,
            &[
                23, 3, 3, 0, 20, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
                20,
            ],
        );
        client_data(&mut s, 100, 100);
        read_all(&mut s, 10);
        seeds.push((name("raw-record-after-data"), s));

        let mut s = new(0, 0);
        raw(&mut s, &[23, 3, 3, 0xff, 0xff, 1, 2, 3]);
        read(&mut s, 10);
        seeds.push((name("oversized-header"), s));

        let mut s = new(0, 0);
        client_data(&mut s, 1000, 300);
        let_through(&mut s, Some(700));
        eof(&mut s);
        read_all(&mut s, 100);
        seeds.push((name("eof-mid-record"), s));

        let mut s = new(0, 0);
        write_budget(&mut s, Some(0), 0);
        write(&mut s, 50_000);
        key_update(&mut s);
        client_data(&mut s, 500, 100);
        read_all(&mut s, 100);
        write(&mut s, 10);
        write_budget(&mut s, Some(3000), 100);
        flush(&mut s);
        write_budget(&mut s, None, 0);
        flush(&mut s);
        client_read(&mut s);
        seeds.push((name("writes-held-back"), s));

        let mut s = new(0, 0);
        client_data(&mut s, 100, 100);
        read_all(&mut s, 100);
        fail(&mut s, 1);
        read(&mut s, 100);
        write(&mut s, 10);
        fail(&mut s, 2);
        write(&mut s, 10);
        seeds.push((name("stream-errors"), s));
    }
    // The same client scripts with the session handed over after the handshake (byte 0, bit 3): TLS 1.3
    // sessions to wsgate's record layer, TLS 1.2 ones staying with rustls.
    let handed_over: Vec<(String, Vec<u8>)> = seeds
        .iter()
        .filter(|(_, bytes)| bytes[0] & 1 == 1)
        .map(|(name, bytes)| {
            let mut bytes = bytes.clone();
            bytes[0] |= 8;
            (format!("{name}-own"), bytes)
        })
        .collect();
    seeds.extend(handed_over);
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_passes_its_target() {
        for (name, bytes) in scanner(true) {
            crate::scanner_target::run(true, &bytes);
            assert!(
                bytes.len() < 4096,
                "{name}: over libFuzzer's default max_len"
            );
        }
        for (_, bytes) in scanner(false) {
            crate::scanner_target::run(false, &bytes);
        }
        for (_, text) in config() {
            crate::config_target::run(text.as_bytes());
        }
        for (_, bytes) in origin() {
            crate::origin_target::run(&bytes);
        }
        for (_, text) in admin_tokens() {
            crate::admin_tokens_target::run(text.as_bytes());
        }
        for (name, bytes) in tls_session() {
            crate::tls_session_target::run(&bytes);
            assert!(
                bytes.len() < 4096,
                "{name}: over libFuzzer's default max_len"
            );
        }
        for (name, bytes) in proxy_header() {
            crate::proxy_header_target::run(&bytes);
            assert!(
                bytes.len() < 4096,
                "{name}: over libFuzzer's default max_len"
            );
        }
    }

    /// Each PROXY header seed is what its name says (a seed that went wrong would start the corpus off
    /// somewhere else).
    #[test]
    fn proxy_header_seeds_are_what_they_are_named() {
        use wsgate::internals::proxy_protocol::{Parsed, Versions, parse};
        for (name, bytes) in proxy_header() {
            let verdict = match parse(&bytes, Versions::Any) {
                Parsed::Complete { .. } => "complete",
                Parsed::Incomplete => "incomplete",
                Parsed::Invalid(error) => error.label(),
            };
            let expected = match name.as_str() {
                "v1-too-long" | "v1-missing-fields" | "v1-plus-port" | "v2-short-length"
                | "v2-cut-tlv" => "proxy_malformed",
                "v1-cut" => "incomplete",
                "v2-dgram" => "proxy_datagram",
                "v2-oversized" => "proxy_oversized",
                "http" | "tls" | "h2-preface" => "proxy_missing",
                _ => "complete",
            };
            assert_eq!(verdict, expected, "{name}");
        }
    }

    #[test]
    #[ignore = "writes the seed files into corpus/"]
    fn write_seeds() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        let write = |dir: &str, name: &str, bytes: &[u8]| {
            let dir = root.join(dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        };
        for (name, bytes) in scanner(true) {
            write("scanner_client", &name, &bytes);
        }
        for (name, bytes) in scanner(false) {
            write("scanner_server", &name, &bytes);
        }
        for (name, text) in config() {
            write("config", &name, text.as_bytes());
        }
        for (name, bytes) in origin() {
            write("origin", &name, &bytes);
        }
        for (name, bytes) in proxy_header() {
            write("proxy_header", &name, &bytes);
        }
        for (name, text) in admin_tokens() {
            write("admin_tokens", &name, text.as_bytes());
        }
        for (name, bytes) in tls_session() {
            write("tls_session", &name, &bytes);
        }
    }
}
