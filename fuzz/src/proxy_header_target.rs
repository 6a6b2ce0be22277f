//! The PROXY protocol header a trusted load balancer puts at the start of a connection
//! (`wsgate::internals::proxy_protocol`, on top of the `proxy-header` crate).
//!
//! Input layout: the bytes at the start of a connection, as they are. Each input is parsed for every
//! `Versions` a listener can take, and at many of its prefixes (all the short ones, a sample of the
//! longer ones), which stands for every way the bytes can be cut into reads. Checked:
//!
//! - No panic.
//! - Verdicts are final: along the prefixes of an input, `Incomplete` until one verdict, then that same
//!   verdict for every longer prefix. So a `Complete` header's strict prefixes are all `Incomplete`, an
//!   `Incomplete` input extended is never `Complete` with a shorter length, and bytes after a header (or
//!   after the byte that made it invalid) never change the answer.
//! - `Complete { source, len }`: `len` is within the input and within `MAX_HEADER`; the header alone parses
//!   to the same; a v1 header is at most 107 bytes and ends in its first CR LF; a v2 header's length is its
//!   16 fixed bytes plus its length field. `source` is what an independent reading of the header gives
//!   (v1: the line split at spaces, ports in decimal digits only; v2: the address bytes by family; `None`
//!   for UNKNOWN, LOCAL, UNSPEC and AF_UNIX; IPv4 mapped into IPv6 given as IPv4).
//! - The versions agree: `V1` and `Any` give the same answer on input starting with `P`, `V2` and `Any` on
//!   input starting with CR; the other one says `WrongVersion` once the whole signature is in, and agrees
//!   before it; any other first byte is `Missing` for all three.
//! - Each error is the one its bytes call for: `Missing` only when the input is no prefix of either
//!   signature (nor starts with one), `WrongVersion` only with the other version's whole signature,
//!   `Oversized` only for a v2 length over `MAX_HEADER`, `Datagram` only for a v2 PROXY header over UDP;
//!   never `Closed` or `Io` (no socket here).
//! - A source address re-encoded with `encode` (v1 and v2, with a destination of the same family and of
//!   the other one) parses back to the same address, and the encoded v1 line is within 107 bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use wsgate::internals::proxy_protocol::{
    MAX_HEADER, Parsed, ProxyHeaderError, V1_MAX, Version, Versions, encode, parse,
};

const V1_SIGNATURE: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// The prefix lengths looked at: all up to 256 (every v1 header and a v2 fixed part, each cut in every
/// place), a stride through the rest, both ends of a complete header, the whole input.
fn prefix_lengths(n: usize, len: Option<usize>) -> Vec<usize> {
    let mut out: Vec<usize> = (0..=n.min(256)).collect();
    out.extend((257..n).step_by(61));
    if let Some(len) = len {
        out.extend(
            [len.saturating_sub(1), len, len + 1]
                .into_iter()
                .filter(|&i| i <= n),
        );
    }
    out.push(n);
    out.sort_unstable();
    out.dedup();
    out
}

/// Whether the shorter of `a` and `b` is a prefix of the other.
fn compatible(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().min(b.len());
    a[..n] == b[..n]
}

pub fn run(data: &[u8]) {
    let any = parse(data, Versions::Any);
    let v1 = parse(data, Versions::V1);
    let v2 = parse(data, Versions::V2);
    match data.first() {
        None => {
            for verdict in [&any, &v1, &v2] {
                assert_eq!(verdict, &Parsed::Incomplete);
            }
        }
        Some(b'P') => {
            assert_eq!(v1, any, "V1 and Any disagree");
            if data.starts_with(V1_SIGNATURE) {
                assert_eq!(v2, Parsed::Invalid(ProxyHeaderError::WrongVersion));
            } else {
                assert_eq!(
                    v2, any,
                    "V2 and Any disagree before the v1 signature is whole"
                );
            }
        }
        Some(b'\r') => {
            assert_eq!(v2, any, "V2 and Any disagree");
            if data.starts_with(V2_SIGNATURE) {
                assert_eq!(v1, Parsed::Invalid(ProxyHeaderError::WrongVersion));
            } else {
                assert_eq!(
                    v1, any,
                    "V1 and Any disagree before the v2 signature is whole"
                );
            }
        }
        Some(_) => {
            for verdict in [&any, &v1, &v2] {
                assert_eq!(verdict, &Parsed::Invalid(ProxyHeaderError::Missing));
            }
        }
    }
    for (versions, verdict) in [
        (Versions::Any, &any),
        (Versions::V1, &v1),
        (Versions::V2, &v2),
    ] {
        check(data, versions, verdict);
    }
}

fn check(data: &[u8], versions: Versions, verdict: &Parsed) {
    let len = match verdict {
        Parsed::Complete { len, .. } => Some(*len),
        _ => None,
    };
    // Final verdicts, along the prefixes.
    let mut seen = Parsed::Incomplete;
    for i in prefix_lengths(data.len(), len) {
        let now = parse(&data[..i], versions);
        if seen != Parsed::Incomplete {
            assert_eq!(now, seen, "the verdict changed at a prefix of {i} bytes");
        }
        if let Some(len) = len {
            if i < len {
                assert_eq!(
                    now,
                    Parsed::Incomplete,
                    "prefix of {i} of a {len}-byte header"
                );
            }
        }
        seen = now;
    }
    assert_eq!(&seen, verdict);
    match verdict {
        Parsed::Complete { source, len } => complete(data, versions, *source, *len),
        Parsed::Incomplete => {
            assert!(data.len() < MAX_HEADER, "incomplete past MAX_HEADER");
            assert!(
                compatible(data, V1_SIGNATURE) || compatible(data, V2_SIGNATURE),
                "incomplete without a signature"
            );
        }
        Parsed::Invalid(error) => invalid(data, versions, error),
    }
}

fn complete(data: &[u8], versions: Versions, source: Option<SocketAddr>, len: usize) {
    assert!(len <= data.len(), "a header longer than the input");
    assert!(len <= MAX_HEADER);
    let header = &data[..len];
    assert_eq!(
        parse(header, versions),
        Parsed::Complete { source, len },
        "the header alone"
    );
    if header.starts_with(V1_SIGNATURE) {
        assert!(len <= V1_MAX, "a v1 header of {len} bytes");
        assert!(header.ends_with(b"\r\n"));
        assert_eq!(
            header.iter().position(|&b| b == b'\r'),
            Some(len - 2),
            "a v1 header that does not end at its first CR"
        );
        assert_eq!(source, reference_v1(header), "v1 source");
    } else {
        assert!(
            header.starts_with(V2_SIGNATURE),
            "a header without a signature"
        );
        assert_eq!(
            len,
            16 + usize::from(u16::from_be_bytes([header[14], header[15]]))
        );
        assert_eq!(source, reference_v2(header), "v2 source");
    }
    if let Some(source) = source {
        reencode(source);
    }
}

fn invalid(data: &[u8], versions: Versions, error: &ProxyHeaderError) {
    match error {
        ProxyHeaderError::Missing => assert!(
            !compatible(data, V1_SIGNATURE) && !compatible(data, V2_SIGNATURE),
            "missing, but the input is a header's start"
        ),
        ProxyHeaderError::WrongVersion => assert!(
            (versions == Versions::V2 && data.starts_with(V1_SIGNATURE))
                || (versions == Versions::V1 && data.starts_with(V2_SIGNATURE))
        ),
        ProxyHeaderError::Oversized => {
            assert!(data.starts_with(V2_SIGNATURE) && data.len() >= 16);
            assert!(16 + usize::from(u16::from_be_bytes([data[14], data[15]])) > MAX_HEADER);
        }
        ProxyHeaderError::Datagram => {
            assert!(data.starts_with(V2_SIGNATURE) && data.len() >= 16);
            assert_eq!(data[12], 0x21, "datagram on a LOCAL header");
            assert!(matches!(data[13], 0x12 | 0x22 | 0x32));
        }
        ProxyHeaderError::Malformed => assert!(
            data.starts_with(V1_SIGNATURE) || data.starts_with(V2_SIGNATURE),
            "malformed before the signature is whole"
        ),
        ProxyHeaderError::Closed | ProxyHeaderError::Io(_) => {
            panic!("{error:?} from parse")
        }
    }
}

fn canonical(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.to_canonical(), port)
}

/// The source of a complete v1 line, read independently: six fields split at single spaces, the
/// addresses of the family named, decimal ports.
fn reference_v1(line: &[u8]) -> Option<SocketAddr> {
    if line.starts_with(b"PROXY UNKNOWN") {
        return None;
    }
    let text = std::str::from_utf8(&line[..line.len() - 2]).expect("a complete TCP line in ASCII");
    let fields: Vec<&str> = text.split(' ').collect();
    let [proxy, protocol, src, dst, sport, dport] = fields[..] else {
        panic!("a complete TCP line without six fields: {line:?}");
    };
    assert_eq!(proxy, "PROXY");
    let port = |p: &str| {
        assert!(
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()),
            "port {p:?}"
        );
        p.parse::<u16>().expect("port within 0..=65535")
    };
    let (source, _destination) = match protocol {
        "TCP4" => (
            IpAddr::V4(src.parse::<Ipv4Addr>().expect("TCP4 source")),
            dst.parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .expect("TCP4 destination"),
        ),
        "TCP6" => (
            IpAddr::V6(src.parse::<Ipv6Addr>().expect("TCP6 source")),
            dst.parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .expect("TCP6 destination"),
        ),
        other => panic!("a complete line of protocol {other:?}"),
    };
    port(dport);
    Some(canonical(source, port(sport)))
}

/// The source of a complete v2 header, read independently from its address bytes. For a PROXY header
/// with addresses, the TLVs after them must be whole to the header's last byte.
fn reference_v2(header: &[u8]) -> Option<SocketAddr> {
    let port = |at: usize| u16::from_be_bytes([header[at], header[at + 1]]);
    let addresses = match (header[12], header[13]) {
        (0x21, 0x11) => Some(12),
        (0x21, 0x21) => Some(36),
        (0x21, 0x31) => Some(216),
        _ => None,
    };
    if let Some(addresses) = addresses {
        let mut at = 16 + addresses;
        while at < header.len() {
            assert!(at + 3 <= header.len(), "a TLV cut in its type and length");
            at += 3 + usize::from(u16::from_be_bytes([header[at + 1], header[at + 2]]));
        }
        assert_eq!(at, header.len(), "a TLV running past the header");
    }
    match (header[12], header[13]) {
        (0x20, _) => None,
        (0x21, 0x00 | 0x31) => None,
        (0x21, 0x11) => {
            let ip: [u8; 4] = header[16..20].try_into().unwrap();
            Some(canonical(IpAddr::V4(ip.into()), port(24)))
        }
        (0x21, 0x21) => {
            let ip: [u8; 16] = header[16..32].try_into().unwrap();
            Some(canonical(IpAddr::V6(ip.into()), port(48)))
        }
        (command, family) => {
            panic!("a complete header of command {command:#x}, family {family:#x}")
        }
    }
}

/// `source` written by `encode` in both versions, with destinations of both families, parses back.
fn reencode(source: SocketAddr) {
    let destinations = [
        SocketAddr::from((Ipv4Addr::new(198, 51, 100, 1), 443)),
        SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 8443)),
    ];
    for version in [Version::V1, Version::V2] {
        for destination in destinations {
            let header = encode(version, source, destination);
            if version == Version::V1 {
                assert!(
                    header.len() <= V1_MAX,
                    "encoded v1 of {} bytes",
                    header.len()
                );
            }
            let expected = Parsed::Complete {
                source: Some(source),
                len: header.len(),
            };
            assert_eq!(
                parse(&header, Versions::Any),
                expected,
                "{version:?} {source} {destination}"
            );
            let followed = [&header[..], b"GET / HTTP/1.1\r\n"].concat();
            assert_eq!(parse(&followed, Versions::Any), expected);
        }
    }
}
