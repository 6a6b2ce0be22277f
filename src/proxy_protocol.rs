//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, version 1 text and version 2 binary): reading the
//! header a trusted L4 load balancer puts at the start of a connection to carry the real client's address
//! (`parse`, `read_header`), and writing the header a pool sends to its backends (`encode`).
//!
//! The wire formats are the `proxy-header` crate's. This module adds what a server needs around it and what
//! the crate leaves out: a verdict as early as the bytes allow (a client speaking TLS or HTTP directly is
//! told apart at its first byte, at its second or third for POST, PUT, PATCH and HTTP/2's PRI), a bound on the header's size, the LOCAL and DGRAM rules, a check of the
//! TLVs' framing, and a socket reader that takes exactly the header's bytes and nothing after them. Each
//! place where the crate's own answer is not taken as it is says why (see also the tests named
//! `crate_quirk_*`).
//!
//! Config and wiring (which listeners expect a header, from which sources; which pools send one) live
//! above this module: it knows nothing of wsgate.

use std::io;
use std::net::{IpAddr, SocketAddr};

use proxy_header::{ParseConfig, ProxiedAddress, ProxyHeader};
use tokio::net::TcpStream;

/// Which header versions a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versions {
    V1,
    V2,
    Any,
}

impl Versions {
    fn accepts(self, version: Version) -> bool {
        matches!(
            (self, version),
            (Versions::Any, _) | (Versions::V1, Version::V1) | (Versions::V2, Version::V2)
        )
    }
}

/// Which version a pool sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The largest header accepted, in bytes, whatever its version (a v1 header is at most [`V1_MAX`]).
///
/// A v2 header is 16 fixed bytes and a length field of up to 65,535 more. What balancers really send is far
/// less: the addresses (12 bytes for IPv4, 36 for IPv6) and a few TLVs. AWS NLB adds its VPC endpoint TLV
/// (tens of bytes), GCP Private Service Connect and Azure Private Link an ID of 4 to 8 bytes; HAProxy with
/// every TLV it can send (ALPN, authority i.e. SNI up to 255, unique ID up to 128, CRC32C, SSL with version,
/// CN, cipher, signature and key algorithms) stays under about 800. 4 KiB leaves room for custom TLVs
/// (HAProxy's `set-proxy-v2-tlv-fmt`) and is nginx's own limit (`NGX_PROXY_PROTOCOL_MAX_HEADER`), so a
/// header nginx takes is taken here too. A larger length is refused as soon as the 16 fixed bytes are in,
/// before any of the rest is waited for.
pub const MAX_HEADER: usize = 4096;

/// The longest v1 header, CR LF included (the specification's own bound: "PROXY TCP6", two full-length
/// IPv6 addresses, two 5-digit ports).
pub const V1_MAX: usize = 107;

/// What starts a v1 header.
const V1_SIGNATURE: &[u8] = b"PROXY ";
/// What starts a v2 header; 16 bytes in all with the version and command, family and transport, and length.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const V2_FIXED: usize = 16;
/// v2 version and command bytes: version 2 in the high nibble, LOCAL (0) or PROXY (1) in the low one.
const V2_LOCAL: u8 = 0x20;
const V2_PROXY: u8 = 0x21;

/// What the bytes at the start of a connection are.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header of `len` bytes. `source`: the client address it carries; `None` for LOCAL (v2 health
    /// checks from the balancer itself), UNKNOWN (v1) and address families without an IP (AF_UNIX,
    /// unspecified): the caller then uses the TCP peer. An IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`,
    /// what `encode` writes for a mixed pair) is given as IPv4.
    Complete {
        source: Option<SocketAddr>,
        len: usize,
    },
    /// More bytes are needed: everything so far is the start of a header (or, while the 6 or 12 signature
    /// bytes are not all in, the start of the other version's signature, so that a header of the version
    /// the listener does not take is told from no header at all).
    Incomplete,
    /// Not a header of an accepted version, malformed, or longer than `MAX_HEADER`.
    Invalid(ProxyHeaderError),
}

/// Why a connection's PROXY header was refused. Each one closes the connection.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The bytes are not a PROXY header at all: the client spoke HTTP or TLS directly (or the listener
    /// expects a header that the balancer in front of it does not send).
    #[error("the connection does not start with a PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header")]
    Malformed,
    #[error("PROXY protocol header over {MAX_HEADER} bytes")]
    Oversized,
    /// A v1 header on a v2-only listener, or the other way round.
    #[error("PROXY protocol header of a version this listener does not accept")]
    WrongVersion,
    /// A v2 header for a datagram (UDP) connection, on a stream.
    #[error("PROXY protocol header for a datagram connection")]
    Datagram,
    /// The client closed the connection before a whole header.
    #[error("connection closed before a whole PROXY protocol header")]
    Closed,
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] io::Error),
}

impl ProxyHeaderError {
    /// The error as a snake_case metric label (the `reason` of a refused connection).
    pub fn label(&self) -> &'static str {
        match self {
            ProxyHeaderError::Missing => "proxy_missing",
            ProxyHeaderError::Malformed => "proxy_malformed",
            ProxyHeaderError::Oversized => "proxy_oversized",
            ProxyHeaderError::WrongVersion => "proxy_wrong_version",
            ProxyHeaderError::Datagram => "proxy_datagram",
            ProxyHeaderError::Closed => "proxy_closed",
            ProxyHeaderError::Io(_) => "proxy_io",
        }
    }
}

/// Equal variants; two I/O errors are equal when their kinds are (`io::Error` itself has no equality).
impl PartialEq for ProxyHeaderError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ProxyHeaderError::Io(a), ProxyHeaderError::Io(b)) => a.kind() == b.kind(),
            _ => std::mem::discriminant(self) == std::mem::discriminant(other),
        }
    }
}

impl Eq for ProxyHeaderError {}

/// Reads the header at the start of `buf` (a whole header, a prefix of one, or more than one: the bytes
/// after a header are the client's and do not matter).
///
/// Every verdict is final: once `Complete` or `Invalid`, any bytes added after `buf` give the same answer,
/// and a `Complete` header's every strict prefix is `Incomplete`. The fuzz target `proxy_header` checks it.
pub fn parse(buf: &[u8], versions: Versions) -> Parsed {
    let (version, signature) = match buf.first() {
        None => return Parsed::Incomplete,
        Some(b'P') => (Version::V1, V1_SIGNATURE),
        Some(b'\r') => (Version::V2, V2_SIGNATURE),
        // A TLS record (0x16), an HTTP method not starting with P, SSH: told apart at the first byte.
        Some(_) => return Parsed::Invalid(ProxyHeaderError::Missing),
    };
    let seen = buf.len().min(signature.len());
    if buf[..seen] != signature[..seen] {
        // "POST", "PRI * HTTP/2.0", an HTTP request after blank lines ("\r\n\r\nGET"): no header.
        return Parsed::Invalid(ProxyHeaderError::Missing);
    }
    if seen < signature.len() {
        return Parsed::Incomplete;
    }
    if !versions.accepts(version) {
        return Parsed::Invalid(ProxyHeaderError::WrongVersion);
    }
    match version {
        Version::V1 => parse_v1(buf),
        Version::V2 => parse_v2(buf),
    }
}

/// `buf` starts with "PROXY ".
fn parse_v1(buf: &[u8]) -> Parsed {
    // The line ends at its first CR, which must come early enough for CR LF to end by byte V1_MAX.
    let window = &buf[..buf.len().min(V1_MAX - 1)];
    let cr = window.iter().position(|&b| b == b'\r');
    let body = &window[V1_SIGNATURE.len()..cr.unwrap_or(window.len())];
    if !plausible_v1(body) {
        // Decided here, not at byte 107 as the crate would (it waits for a delimiter before it looks).
        return Parsed::Invalid(ProxyHeaderError::Malformed);
    }
    // The crate is shown the line and no more: it may search past a CR for a space, and it takes an
    // UNKNOWN line of any length (or a TCP6 line of 116 bytes) when it is all in one buffer, while the
    // same bytes arriving one by one are refused at byte 107.
    let line = match cr {
        Some(cr) => &buf[..buf.len().min(cr + 2)],
        None => window,
    };
    let config = ParseConfig {
        include_tlvs: false,
        allow_v1: true,
        allow_v2: false,
    };
    match ProxyHeader::parse(line, config) {
        Ok((header, len)) if Some(len) == cr.map(|cr| cr + 2) => Parsed::Complete {
            source: header.proxied_address().map(source),
            len,
        },
        Ok(_) => Parsed::Invalid(ProxyHeaderError::Malformed),
        Err(proxy_header::Error::BufferTooShort) => match cr {
            // No CR yet, and room left for one.
            None if window.len() < V1_MAX - 1 => Parsed::Incomplete,
            // The LF is still to come.
            Some(cr) if line.len() == cr + 1 => Parsed::Incomplete,
            // No CR LF by byte 107, or the whole line is there and the crate asks for more: fields are
            // missing ("PROXY TCP4 1.2.3.4\r\n").
            _ => Parsed::Invalid(ProxyHeaderError::Malformed),
        },
        Err(_) => Parsed::Invalid(ProxyHeaderError::Malformed),
    }
}

/// Whether `body`, what follows "PROXY " up to the first CR (or as much as has come), can start a valid
/// line: the protocol word, then, for TCP4 and TCP6, addresses and ports only. Stricter than the crate,
/// which reads ports with `u16::from_str` ("+80" passes) and does not look at what follows "UNKNOWN".
fn plausible_v1(body: &[u8]) -> bool {
    let starts = |word: &[u8]| {
        let n = body.len().min(word.len());
        body[..n] == word[..n]
    };
    if starts(b"TCP4 ") || starts(b"TCP6 ") {
        return body
            .get(5..)
            .unwrap_or_default()
            .iter()
            .all(|&b| b.is_ascii_hexdigit() || b == b'.' || b == b':' || b == b' ');
    }
    if starts(b"UNKNOWN") {
        // "UNKNOWN" alone or followed by a space and anything (the specification lets a sender put the
        // addresses, or anything else, there); a bare LF cannot be inside a line that ends in CR LF.
        return body.get(7).is_none_or(|&b| b == b' ') && !body.contains(&b'\n');
    }
    false
}

/// The whole length of the v2 header starting `buf`, once its 16 fixed bytes are in.
fn v2_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < V2_FIXED || !buf.starts_with(V2_SIGNATURE) {
        return None;
    }
    Some(V2_FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]])))
}

/// `buf` starts with the 12-byte v2 signature.
fn parse_v2(buf: &[u8]) -> Parsed {
    let Some(len) = v2_len(buf) else {
        return Parsed::Incomplete;
    };
    let (command, family) = (buf[12], buf[13]);
    if command != V2_LOCAL && command != V2_PROXY {
        return Parsed::Invalid(ProxyHeaderError::Malformed);
    }
    if len > MAX_HEADER {
        return Parsed::Invalid(ProxyHeaderError::Oversized);
    }
    let local = command == V2_LOCAL;
    // UDP over IPv4, IPv6 or a UNIX socket: the addresses are not this TCP connection's.
    if !local && matches!(family, 0x12 | 0x22 | 0x32) {
        return Parsed::Invalid(ProxyHeaderError::Datagram);
    }
    if buf.len() < len {
        return Parsed::Incomplete;
    }
    let header = &buf[..len];
    if local {
        // A LOCAL header: "the receiver must [...] use the real connection endpoints and discard the
        // protocol block including the family". HAProxy takes it whatever the family and length; the
        // crate would refuse one whose length is short of its family's addresses.
        return Parsed::Complete { source: None, len };
    }
    let config = ParseConfig {
        include_tlvs: false,
        allow_v1: false,
        allow_v2: true,
    };
    // The crate sees exactly the header: given fewer bytes than the family's addresses it answers "too
    // short" before looking at the length field, so a header whose length is too small for its
    // addresses would wait for bytes that are the client's. Here it is whole, and "too short" is malformed.
    match ProxyHeader::parse(header, config) {
        Ok((parsed, used)) if used == len && tlvs_framed(header, family) => Parsed::Complete {
            source: parsed.proxied_address().map(source),
            len,
        },
        _ => Parsed::Invalid(ProxyHeaderError::Malformed),
    }
}

/// Whether the TLVs after the addresses are whole (type, 16-bit length, value), to the last byte. The
/// crate reads them lazily and not at all with `include_tlvs: false`; wsgate uses none, but a header whose
/// TLVs overrun its length is corrupt (HAProxy refuses it too). Not checked for UNSPEC, whose block is
/// the sender's own business.
fn tlvs_framed(header: &[u8], family: u8) -> bool {
    let addresses = match family {
        0x11 => 12,
        0x21 => 36,
        0x31 => 216,
        _ => return true,
    };
    let mut tlvs = &header[V2_FIXED + addresses..];
    while !tlvs.is_empty() {
        let Some(&[_, high, low]) = tlvs.get(..3) else {
            return false;
        };
        let Some(rest) = tlvs.get(3 + usize::from(u16::from_be_bytes([high, low]))..) else {
            return false;
        };
        tlvs = rest;
    }
    true
}

/// The client's address, an IPv4 address mapped into IPv6 given as IPv4 (as `config::Cidr` matches it).
fn source(address: &ProxiedAddress) -> SocketAddr {
    SocketAddr::new(address.source.ip().to_canonical(), address.source.port())
}

/// How many bytes to peek next, `prefix` (the header's bytes already taken) included: the rest of a v2
/// header once its length is known, else enough for a whole v1 header (and a v2 header's fixed part).
fn peek_size(prefix: &[u8]) -> usize {
    v2_len(prefix)
        .unwrap_or(V1_MAX)
        .min(MAX_HEADER)
        // Progress whatever happens: at least one byte more than already taken.
        .max(prefix.len() + 1)
}

/// Reads the header at the start of `stream` and consumes exactly its bytes (what follows — a TLS
/// ClientHello, an HTTP request — stays unread in the socket for whoever reads next). No timeout inside:
/// the caller wraps it in one. After an error, some of the stream may have been consumed; the connection
/// is to be closed.
///
/// How: peek, parse what was taken plus what was peeked; when the header is complete, read the rest of it;
/// when not, every byte peeked is the header's, so read them all (the socket is then empty and the next
/// peek waits for new bytes: no loop without an await that consumes at least one byte, and at most
/// `MAX_HEADER` bytes are ever held).
pub async fn read_header(
    stream: &TcpStream,
    versions: Versions,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    // header[..taken]: bytes read off the socket, all of them a prefix of the header.
    let mut header = Vec::new();
    let mut taken = 0;
    loop {
        if taken >= MAX_HEADER {
            // Unreachable (parse refuses longer headers first); a bound all the same.
            return Err(ProxyHeaderError::Oversized);
        }
        header.resize(peek_size(&header[..taken]), 0);
        let peeked = stream.peek(&mut header[taken..]).await?;
        if peeked == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        let seen = taken + peeked;
        match parse(&header[..seen], versions) {
            Parsed::Complete { source, len } if len > taken => {
                read_exact(stream, &mut header[taken..len]).await?;
                return Ok(source);
            }
            // A header shorter than what was already taken as part of it: parse's verdicts are final,
            // so this cannot be; refused rather than trusted.
            Parsed::Complete { .. } => return Err(ProxyHeaderError::Malformed),
            Parsed::Incomplete => {
                read_exact(stream, &mut header[taken..seen]).await?;
                taken = seen;
            }
            Parsed::Invalid(error) => return Err(error),
        }
    }
}

/// Reads exactly `buf.len()` bytes (already peeked, so already in the socket).
async fn read_exact(stream: &TcpStream, mut buf: &mut [u8]) -> Result<(), ProxyHeaderError> {
    while !buf.is_empty() {
        stream.readable().await?;
        match stream.try_read(buf) {
            Ok(0) => return Err(ProxyHeaderError::Closed),
            Ok(n) => buf = &mut buf[n..],
            // A stale readiness: `try_read` cleared it, `readable` waits again.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The header a pool sends to a backend for a client at `source`, connected to wsgate at `destination`:
/// v1 `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\r\n`, or v2 PROXY, STREAM, INET or INET6, no TLVs.
///
/// Both addresses of a header are of one family. When they differ (an IPv4 client on a listener bound to
/// IPv6, or the other way round), the IPv4 one is written mapped into IPv6 (`::ffff:a.b.c.d`), which
/// keeps the client's address exact; `parse` gives it back as IPv4. IPv6 flow info and scope IDs are not
/// carried (neither version has room for them).
pub fn encode(version: Version, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V6(_)) => (mapped(s), destination),
        (SocketAddr::V6(_), SocketAddr::V4(d)) => (source, mapped(d)),
        _ => (source, destination),
    };
    let header = ProxyHeader::with_address(ProxiedAddress::stream(source, destination));
    let mut out = Vec::with_capacity(64);
    let written = match version {
        Version::V1 => header.encode_v1(&mut out),
        Version::V2 => header.encode_v2(&mut out),
    };
    // The crate's errors: families that differ, TLVs or a datagram in v1, a header over 64 KiB, a full
    // buffer. None of them can arise here (one family, a stream, no TLVs, a Vec).
    written.expect("a stream header of one address family, without TLVs, always encodes");
    out
}

/// The header of a connection wsgate makes on its own behalf (a health check): v1 `PROXY UNKNOWN`, v2
/// LOCAL with no addresses. A backend that requires the protocol takes it, and uses the connection's own
/// addresses.
pub fn encode_local(version: Version) -> Vec<u8> {
    match version {
        Version::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        Version::V2 => {
            let mut out = V2_SIGNATURE.to_vec();
            out.extend([V2_LOCAL, 0x00, 0x00, 0x00]);
            out
        }
    }
}

fn mapped(address: std::net::SocketAddrV4) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(address.ip().to_ipv6_mapped()), address.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};
    use std::time::Duration;

    use proxy_header::Tlv;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::time::timeout;

    use ProxyHeaderError::*;

    const ALL: [Versions; 3] = [Versions::V1, Versions::V2, Versions::Any];

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn complete(source: Option<&str>, len: usize) -> Parsed {
        Parsed::Complete {
            source: source.map(addr),
            len,
        }
    }

    /// The v2 fixed part: signature, version and command, family and transport, length.
    fn v2(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.extend_from_slice(&[command, family]);
        out.extend_from_slice(&(block.len() as u16).to_be_bytes());
        out.extend_from_slice(block);
        out
    }

    fn inet_block() -> Vec<u8> {
        let mut block = vec![192, 0, 2, 7, 198, 51, 100, 1];
        block.extend_from_slice(&51234u16.to_be_bytes());
        block.extend_from_slice(&443u16.to_be_bytes());
        block
    }

    fn inet6_block() -> Vec<u8> {
        let mut block = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7)
            .octets()
            .to_vec();
        block.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        block.extend_from_slice(&51234u16.to_be_bytes());
        block.extend_from_slice(&443u16.to_be_bytes());
        block
    }

    /// TLVs as AWS NLB and HAProxy send them (VPC endpoint, authority, unique ID, SSL, NOOP).
    fn tlvs() -> Vec<u8> {
        let mut out = Vec::new();
        for tlv in [
            Tlv::Custom(0xEA, b"\x01vpce-0123456789abcdef0"[..].into()),
            Tlv::Authority("chat.example.com".into()),
            Tlv::UniqueId(b"0123456789"[..].into()),
            Tlv::Ssl(proxy_header::SslInfo::new(true, false, false, 0)),
            Tlv::Noop(5),
        ] {
            tlv.encode(&mut out);
        }
        out
    }

    /// Valid headers of every kind, with what parse gives for each.
    fn valid() -> Vec<(&'static str, Vec<u8>, Option<&'static str>)> {
        let mut unix = vec![0u8; 216];
        unix[..9].copy_from_slice(b"/tmp/sock");
        vec![
            (
                "v1 tcp4",
                b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 443\r\n".to_vec(),
                Some("192.0.2.7:51234"),
            ),
            (
                "v1 tcp6",
                b"PROXY TCP6 2001:db8::7 ::1 51234 443\r\n".to_vec(),
                Some("[2001:db8::7]:51234"),
            ),
            (
                "v1 tcp6 mapped",
                b"PROXY TCP6 ::ffff:192.0.2.7 ::1 51234 443\r\n".to_vec(),
                Some("192.0.2.7:51234"),
            ),
            (
                "v1 tcp6 longest",
                b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n".to_vec(),
                Some("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
            ),
            ("v1 unknown", b"PROXY UNKNOWN\r\n".to_vec(), None),
            (
                "v1 unknown with addresses",
                b"PROXY UNKNOWN 192.0.2.7 198.51.100.1 51234 443\r\n".to_vec(),
                None,
            ),
            ("v2 inet", v2(0x21, 0x11, &inet_block()), Some("192.0.2.7:51234")),
            (
                "v2 inet6",
                v2(0x21, 0x21, &inet6_block()),
                Some("[2001:db8::7]:51234"),
            ),
            (
                "v2 inet tlvs",
                v2(0x21, 0x11, &[inet_block(), tlvs()].concat()),
                Some("192.0.2.7:51234"),
            ),
            (
                "v2 inet6 tlvs",
                v2(0x21, 0x21, &[inet6_block(), tlvs()].concat()),
                Some("[2001:db8::7]:51234"),
            ),
            ("v2 local", v2(0x20, 0x00, &[]), None),
            ("v2 local tlvs", v2(0x20, 0x00, &tlvs()), None),
            ("v2 local inet", v2(0x20, 0x11, &inet_block()), None),
            // LOCAL discards the block, family and transport included.
            ("v2 local dgram", v2(0x20, 0x12, &inet_block()), None),
            ("v2 local short", v2(0x20, 0x21, &[]), None),
            ("v2 unspec", v2(0x21, 0x00, &[]), None),
            ("v2 unspec block", v2(0x21, 0x00, b"anything"), None),
            ("v2 unix", v2(0x21, 0x31, &unix), None),
            ("v2 unix tlvs", v2(0x21, 0x31, &[unix.clone(), tlvs()].concat()), None),
        ]
    }

    /// The version of a header, and the length of its signature.
    fn version_of(header: &[u8]) -> (Version, usize) {
        if header[0] == b'P' {
            (Version::V1, V1_SIGNATURE.len())
        } else {
            (Version::V2, V2_SIGNATURE.len())
        }
    }

    fn only(version: Version) -> Versions {
        match version {
            Version::V1 => Versions::V1,
            Version::V2 => Versions::V2,
        }
    }

    #[test]
    fn parses_every_kind_of_header() {
        for (name, header, source) in valid() {
            for versions in [only(version_of(&header).0), Versions::Any] {
                assert_eq!(
                    parse(&header, versions),
                    complete(source, header.len()),
                    "{name}"
                );
                // What follows the header is the client's.
                for after in [
                    &b"GET / HTTP/1.1\r\n\r\n"[..],
                    b"\x16\x03\x01\x02\x00",
                    b"\r\n",
                ] {
                    let buf = [&header[..], after].concat();
                    assert_eq!(
                        parse(&buf, versions),
                        complete(source, header.len()),
                        "{name}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_strict_prefix_is_incomplete() {
        for (name, header, _) in valid() {
            for versions in ALL {
                let (version, signature) = version_of(&header);
                for i in 0..header.len() {
                    let got = parse(&header[..i], versions);
                    if versions.accepts(version) || i < signature {
                        assert_eq!(got, Parsed::Incomplete, "{name} {versions:?} [..{i}]");
                    } else {
                        assert_eq!(
                            got,
                            Parsed::Invalid(WrongVersion),
                            "{name} {versions:?} [..{i}]"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_header_of_the_other_version_is_wrong_version() {
        let v1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 443\r\n";
        let v2 = v2(0x21, 0x11, &inet_block());
        assert_eq!(parse(v1, Versions::V2), Parsed::Invalid(WrongVersion));
        assert_eq!(parse(&v2, Versions::V1), Parsed::Invalid(WrongVersion));
        // As soon as the signature is whole, not before.
        assert_eq!(parse(b"PROXY", Versions::V2), Parsed::Incomplete);
        assert_eq!(
            parse(b"PROXY ", Versions::V2),
            Parsed::Invalid(WrongVersion)
        );
        assert_eq!(parse(&v2[..11], Versions::V1), Parsed::Incomplete);
        assert_eq!(
            parse(&v2[..12], Versions::V1),
            Parsed::Invalid(WrongVersion)
        );
        // A v2-only listener tells a POST from a v1 header at the second byte.
        assert_eq!(parse(b"PO", Versions::V2), Parsed::Invalid(Missing));
    }

    /// The shortest prefix of `bytes` that gets a verdict, and the verdict.
    fn decided(bytes: &[u8], versions: Versions) -> (usize, Parsed) {
        for i in 1..=bytes.len() {
            match parse(&bytes[..i], versions) {
                Parsed::Incomplete => continue,
                verdict => return (i, verdict),
            }
        }
        (bytes.len(), Parsed::Incomplete)
    }

    #[test]
    fn no_header_is_missing_as_early_as_possible() {
        let cases: &[(&[u8], usize)] = &[
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 1),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 1),
            (b"POST / HTTP/1.1\r\n", 2),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 3),
            (b"PUT / HTTP/1.1\r\n", 2),
            (b"\r\n\r\nGET / HTTP/1.1\r\n", 5),
            (b"\r\nGET / HTTP/1.1\r\n", 3),
            (b"SSH-2.0-OpenSSH_9.6\r\n", 1),
            (b"\0\0\0\0", 1),
            (b"PROXY", 5),
        ];
        for &(bytes, at) in cases {
            for versions in ALL {
                if bytes == b"PROXY" {
                    assert_eq!(parse(bytes, versions), Parsed::Incomplete);
                    continue;
                }
                assert_eq!(
                    decided(bytes, versions),
                    (at, Parsed::Invalid(Missing)),
                    "{:?} {versions:?}",
                    String::from_utf8_lossy(bytes)
                );
            }
        }
        assert_eq!(parse(b"PROXYTCP4", Versions::Any), Parsed::Invalid(Missing));
    }

    #[test]
    fn malformed_v1_is_refused_early() {
        let cases: &[(&[u8], usize)] = &[
            (b"PROXY HELLO 1.2.3.4\r\n", 7),
            (b"PROXY TCP5 1.2.3.4\r\n", 10),
            (b"PROXY TCP4 localhost 10.0.0.1 1 2\r\n", 12),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 443\r\n", 28),
            (b"PROXY UNKNOWNX\r\n", 14),
            (b"PROXY UNKNOWN \n\r\n", 15),
            // The fields end at the CR: the line is whole and fields are missing.
            (b"PROXY TCP4 1.2.3.4\r\n", 20),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\r\r\n", 35),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\rX", 35),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 65536\r\n", 36),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 80  443\r\n", 35),
            (b"PROXY TCP4 ::1 ::1 80 443\r\n", 15),
            (b"PROXY TCP6 1.2.3.4 5.6.7.8 80 443\r\n", 19),
        ];
        for &(bytes, at) in cases {
            for versions in [Versions::V1, Versions::Any] {
                assert_eq!(
                    decided(bytes, versions),
                    (at, Parsed::Invalid(Malformed)),
                    "{:?}",
                    String::from_utf8_lossy(bytes)
                );
            }
        }
    }

    #[test]
    fn v1_over_107_bytes_is_malformed() {
        // No CR LF by byte 107: refused once byte 106 is in (a CR there would end the line at 108).
        let long = [&b"PROXY UNKNOWN "[..], &[b'a'; 200]].concat();
        assert_eq!(
            decided(&long, Versions::Any),
            (106, Parsed::Invalid(Malformed))
        );
        let mut line = long.clone();
        line.extend_from_slice(b"\r\n");
        assert_eq!(parse(&line, Versions::Any), Parsed::Invalid(Malformed));
        // Exactly 107 is fine (the longest TCP6 line, in `valid`); a CR at index 106 is one byte too far.
        let mut at_107 = b"PROXY UNKNOWN ".to_vec();
        at_107.resize(105, b'x');
        at_107.extend_from_slice(b"\r\n");
        assert_eq!(parse(&at_107, Versions::Any), complete(None, 107));
        let mut at_108 = b"PROXY UNKNOWN ".to_vec();
        at_108.resize(106, b'x');
        at_108.extend_from_slice(b"\r\n");
        assert_eq!(parse(&at_108, Versions::Any), Parsed::Invalid(Malformed));
    }

    #[test]
    fn crate_quirk_long_v1_in_one_buffer() {
        // The crate takes a 116-byte TCP6 line when it is all there, and refuses it at byte 107 when it
        // arrives piece by piece; here it is refused either way.
        let line = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255 ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255 65535 65535\r\n";
        assert_eq!(line.len(), 116);
        assert!(ProxyHeader::parse(line, ParseConfig::default()).is_ok());
        assert_eq!(parse(line, Versions::Any), Parsed::Invalid(Malformed));
    }

    #[test]
    fn crate_quirk_no_space_after_proxy() {
        // The crate skips the byte after "PROXY" without looking at it.
        let line = b"PROXY_TCP4 1.2.3.4 5.6.7.8 80 443\r\n";
        assert!(ProxyHeader::parse(line, ParseConfig::default()).is_ok());
        assert_eq!(parse(line, Versions::Any), Parsed::Invalid(Missing));
    }

    #[test]
    fn crate_quirk_v2_length_short_of_its_addresses() {
        // PROXY, INET, length 0: the crate answers "too short" while the header is whole, and would
        // have a reader wait for the client's own bytes. Malformed here, whatever follows.
        let header = v2(0x21, 0x11, &[]);
        assert_eq!(
            ProxyHeader::parse(&header, ParseConfig::default()).unwrap_err(),
            proxy_header::Error::BufferTooShort
        );
        assert_eq!(parse(&header, Versions::Any), Parsed::Invalid(Malformed));
        let followed = [&header[..], b"GET / HTTP/1.1\r\n"].concat();
        assert_eq!(parse(&followed, Versions::Any), Parsed::Invalid(Malformed));
        let short6 = v2(0x21, 0x21, &inet_block());
        assert_eq!(parse(&short6, Versions::Any), Parsed::Invalid(Malformed));
    }

    #[test]
    fn malformed_v2() {
        let unknown_family = v2(0x21, 0x41, &inet_block());
        let unspec_stream = v2(0x21, 0x01, &[]);
        let version_1 = v2(0x11, 0x11, &inet_block());
        let command_2 = v2(0x22, 0x11, &inet_block());
        let cut_tlv = v2(
            0x21,
            0x11,
            &[inet_block(), vec![0x04, 0x00, 0x05, 0, 0]].concat(),
        );
        let stray_bytes = v2(0x21, 0x11, &[inet_block(), vec![0x04, 0x00]].concat());
        let unix_short = v2(0x21, 0x31, &[0; 100]);
        for header in [
            &unknown_family,
            &unspec_stream,
            &version_1,
            &command_2,
            &cut_tlv,
            &stray_bytes,
            &unix_short,
        ] {
            for versions in [Versions::V2, Versions::Any] {
                assert_eq!(
                    parse(header, versions),
                    Parsed::Invalid(Malformed),
                    "{header:?}"
                );
            }
        }
        // The version and command are looked at as soon as the 16 fixed bytes are in.
        assert_eq!(
            parse(&version_1[..16], Versions::Any),
            Parsed::Invalid(Malformed)
        );
    }

    #[test]
    fn datagram_is_refused() {
        for (family, block) in [
            (0x12, inet_block()),
            (0x22, inet6_block()),
            (0x32, vec![0; 216]),
        ] {
            let header = v2(0x21, family, &block);
            assert_eq!(parse(&header, Versions::Any), Parsed::Invalid(Datagram));
            // As soon as the family is in.
            assert_eq!(
                parse(&header[..16], Versions::V2),
                Parsed::Invalid(Datagram)
            );
        }
    }

    #[test]
    fn v2_over_max_header_is_oversized_at_16_bytes() {
        let fixed = |len: usize| {
            let mut out = V2_SIGNATURE.to_vec();
            out.extend_from_slice(&[0x21, 0x11]);
            out.extend_from_slice(&(len as u16).to_be_bytes());
            out
        };
        for len in [MAX_HEADER - V2_FIXED + 1, 0xFFFF] {
            assert_eq!(parse(&fixed(len)[..15], Versions::Any), Parsed::Incomplete);
            assert_eq!(
                parse(&fixed(len), Versions::Any),
                Parsed::Invalid(Oversized)
            );
        }
        // Exactly MAX_HEADER: fine.
        let block = [inet_block(), {
            let mut noop = Vec::new();
            Tlv::Noop(MAX_HEADER - V2_FIXED - 12 - 3).encode(&mut noop);
            noop
        }]
        .concat();
        let header = v2(0x21, 0x11, &block);
        assert_eq!(header.len(), MAX_HEADER);
        assert_eq!(parse(&header[..16], Versions::Any), Parsed::Incomplete);
        assert_eq!(
            parse(&header, Versions::Any),
            complete(Some("192.0.2.7:51234"), MAX_HEADER)
        );
    }

    #[test]
    fn a_local_header_parses_as_one_without_a_client() {
        for (version, versions) in [(Version::V1, Versions::V1), (Version::V2, Versions::V2)] {
            let header = encode_local(version);
            assert_eq!(
                parse(&header, versions),
                Parsed::Complete {
                    source: None,
                    len: header.len()
                },
                "{version:?}"
            );
        }
    }

    #[test]
    fn encode_then_parse_gives_the_source_back() {
        let v4 = addr("192.0.2.7:51234");
        let v4_dest = addr("198.51.100.1:443");
        let v6 = addr("[2001:db8::7]:51234");
        let v6_dest = addr("[2001:db8::1]:443");
        let longest = addr("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535");
        for version in [Version::V1, Version::V2] {
            for (source, destination) in [
                (v4, v4_dest),
                (v6, v6_dest),
                (v4, v6_dest),
                (v6, v4_dest),
                (longest, longest),
                (addr("[::ffff:192.0.2.7]:1"), v4_dest),
            ] {
                let header = encode(version, source, destination);
                let versions = only(version);
                let expected = SocketAddr::new(source.ip().to_canonical(), source.port());
                assert_eq!(
                    parse(&header, versions),
                    Parsed::Complete {
                        source: Some(expected),
                        len: header.len()
                    },
                    "{version:?} {source} {destination}"
                );
                assert!(header.len() <= V1_MAX || version == Version::V2);
            }
        }
        assert_eq!(
            encode(Version::V1, v4, v4_dest),
            b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 443\r\n"
        );
        assert_eq!(
            encode(Version::V1, v4, v6_dest),
            b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::1 51234 443\r\n"
        );
        assert_eq!(
            encode(Version::V2, v4, v4_dest),
            v2(0x21, 0x11, &inet_block())
        );
        let mut block6 = Ipv4Addr::new(192, 0, 2, 7)
            .to_ipv6_mapped()
            .octets()
            .to_vec();
        block6.extend_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).octets());
        block6.extend_from_slice(&[0xc8, 0x22, 0x01, 0xbb]);
        assert_eq!(encode(Version::V2, v4, v6_dest), v2(0x21, 0x21, &block6));
    }

    #[test]
    fn labels_are_distinct_snake_case() {
        let all = [
            Missing,
            Malformed,
            Oversized,
            WrongVersion,
            Datagram,
            Closed,
            Io(io::ErrorKind::ConnectionReset.into()),
        ];
        let labels: std::collections::BTreeSet<_> = all.iter().map(|e| e.label()).collect();
        assert_eq!(labels.len(), all.len());
        assert!(
            labels
                .iter()
                .all(|l| l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        );
        assert_eq!(
            Io(io::ErrorKind::ConnectionReset.into()),
            Io(io::ErrorKind::ConnectionReset.into())
        );
        assert_ne!(Io(io::ErrorKind::ConnectionReset.into()), Closed);
    }

    proptest::proptest! {
        /// Whatever follows a header, and however the bytes are cut, the verdict is the same.
        #[test]
        fn verdicts_are_final(case in 0usize..100, tail in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let (_, header, _) = &valid()[case % valid().len()];
            let whole = [&header[..], &tail].concat();
            let expected = parse(header, Versions::Any);
            for i in header.len()..=whole.len() {
                proptest::prop_assert_eq!(parse(&whole[..i], Versions::Any), complete_like(&expected));
            }
        }

        /// Any bytes: no panic, and once a prefix has a verdict, every longer prefix has the same one.
        #[test]
        fn any_bytes(prefix in 0usize..3, bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let start: &[u8] = [&b"PROXY "[..], V2_SIGNATURE, b""][prefix];
            let buf = [start, &bytes].concat();
            for versions in ALL {
                let mut verdict = Parsed::Incomplete;
                for i in 0..=buf.len() {
                    let now = parse(&buf[..i], versions);
                    if verdict != Parsed::Incomplete {
                        proptest::prop_assert_eq!(&now, &verdict);
                    }
                    verdict = now;
                }
            }
        }
    }

    fn complete_like(parsed: &Parsed) -> Parsed {
        match parsed {
            Parsed::Complete { source, len } => Parsed::Complete {
                source: *source,
                len: *len,
            },
            other => panic!("not complete: {other:?}"),
        }
    }

    // -----------------------------------------------------------------------------------------------------
    // read_header on real sockets

    const WAIT: Duration = Duration::from_secs(10);

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let client = client.unwrap();
        client.set_nodelay(true).unwrap();
        (client, accepted.unwrap().0)
    }

    /// Everything left on `server` once the client has closed.
    async fn rest(server: &mut TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        timeout(WAIT, server.read_to_end(&mut out))
            .await
            .expect("reading the rest timed out")
            .unwrap();
        out
    }

    const REQUEST: &[u8] = b"GET /chat HTTP/1.1\r\nHost: example.com\r\n\r\n";

    #[tokio::test]
    async fn header_then_request_leaves_the_request_unread() {
        for (name, header, source) in valid() {
            let (mut client, mut server) = pair().await;
            client
                .write_all(&[&header[..], REQUEST].concat())
                .await
                .unwrap();
            client.shutdown().await.unwrap();
            let got = timeout(WAIT, read_header(&server, Versions::Any))
                .await
                .expect("read_header timed out");
            assert_eq!(got.unwrap(), source.map(addr), "{name}");
            assert_eq!(rest(&mut server).await, REQUEST, "{name}");
        }
    }

    #[tokio::test]
    async fn long_v2_header_in_two_writes() {
        let mut block = inet6_block();
        Tlv::Custom(0xE0, vec![7; 2000].into()).encode(&mut block);
        let header = v2(0x21, 0x21, &block);
        let (mut client, mut server) = pair().await;
        let reader = tokio::spawn(async move {
            let source = read_header(&server, Versions::V2).await;
            (source, rest(&mut server).await)
        });
        client.write_all(&header[..1000]).await.unwrap();
        client.write_all(&header[1000..]).await.unwrap();
        client.write_all(REQUEST).await.unwrap();
        client.shutdown().await.unwrap();
        let (source, after) = timeout(WAIT, reader).await.expect("timed out").unwrap();
        assert_eq!(source.unwrap(), Some(addr("[2001:db8::7]:51234")));
        assert_eq!(after, REQUEST);
    }

    /// Counts how often the future inside is polled.
    struct Counted<F> {
        inner: Pin<Box<F>>,
        polls: Arc<AtomicUsize>,
    }

    impl<F: Future> Future for Counted<F> {
        type Output = F::Output;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            self.inner.as_mut().poll(cx)
        }
    }

    /// Yields to the runtime (so the I/O driver runs and wakes the reader) until `polls` passes `than`.
    async fn polled_more(polls: &AtomicUsize, than: usize) {
        timeout(WAIT, async {
            while polls.load(Ordering::SeqCst) <= than {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the reader was never woken");
    }

    /// The reader waits while the header trickles in a byte at a time: between bytes it is not polled
    /// (a reader that woke itself, or peeked in a loop without consuming, would be polled on every yield).
    #[tokio::test]
    async fn byte_by_byte_waits_without_spinning() {
        let v1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 443\r\n".to_vec();
        let v2 = v2(0x21, 0x11, &[inet_block(), tlvs()].concat());
        for header in [v1, v2] {
            let (mut client, mut server) = pair().await;
            let polls = Arc::new(AtomicUsize::new(0));
            let reader = tokio::spawn(Counted {
                inner: Box::pin(async move {
                    let source = read_header(&server, Versions::Any).await;
                    (source, rest(&mut server).await)
                }),
                polls: polls.clone(),
            });
            polled_more(&polls, 0).await;
            for byte in &header {
                let before = polls.load(Ordering::SeqCst);
                client.write_all(&[*byte]).await.unwrap();
                polled_more(&polls, before).await;
                // Quiet: no new byte, so no poll (the last byte completes the header and the reader
                // moves on to wait for the rest, which has not come either).
                let woken = polls.load(Ordering::SeqCst);
                for _ in 0..50 {
                    tokio::task::yield_now().await;
                }
                assert!(
                    polls.load(Ordering::SeqCst) <= woken + 2,
                    "the reader was polled {} times without new bytes",
                    polls.load(Ordering::SeqCst) - woken
                );
            }
            assert!(polls.load(Ordering::SeqCst) <= 3 * header.len() + 3);
            client.write_all(REQUEST).await.unwrap();
            client.shutdown().await.unwrap();
            let (source, after) = timeout(WAIT, reader).await.expect("timed out").unwrap();
            assert_eq!(source.unwrap(), Some(addr("192.0.2.7:51234")));
            assert_eq!(after, REQUEST);
        }
    }

    #[tokio::test]
    async fn oversized_v2_is_refused_without_waiting_for_it() {
        let (mut client, server) = pair().await;
        let mut fixed = V2_SIGNATURE.to_vec();
        fixed.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        client.write_all(&fixed).await.unwrap();
        // The client stays connected and sends nothing more.
        let got = timeout(WAIT, read_header(&server, Versions::Any))
            .await
            .expect("read_header waited for the oversized header");
        assert_eq!(got.unwrap_err(), Oversized);
        drop(client);
    }

    #[tokio::test]
    async fn eof_mid_header_is_closed() {
        for cut in [
            b"PROXY TCP4 192.0.2".to_vec(),
            v2(0x21, 0x11, &inet_block())[..20].to_vec(),
            b"PRO".to_vec(),
        ] {
            let (mut client, server) = pair().await;
            client.write_all(&cut).await.unwrap();
            client.shutdown().await.unwrap();
            let got = timeout(WAIT, read_header(&server, Versions::Any))
                .await
                .expect("read_header timed out");
            assert_eq!(got.unwrap_err(), Closed);
        }
        let (client, server) = pair().await;
        drop(client);
        let got = timeout(WAIT, read_header(&server, Versions::Any))
            .await
            .unwrap();
        assert_eq!(got.unwrap_err(), Closed);
    }

    #[tokio::test]
    async fn plain_http_is_missing_and_left_unread() {
        let (mut client, mut server) = pair().await;
        client.write_all(REQUEST).await.unwrap();
        client.shutdown().await.unwrap();
        let got = timeout(WAIT, read_header(&server, Versions::Any))
            .await
            .expect("read_header timed out");
        assert_eq!(got.unwrap_err(), Missing);
        // Decided on the first byte, peeked, never taken.
        assert_eq!(rest(&mut server).await, REQUEST);
    }

    #[tokio::test]
    async fn wrong_version_and_datagram_on_a_socket() {
        let (mut client, server) = pair().await;
        client
            .write_all(b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 443\r\n")
            .await
            .unwrap();
        let got = timeout(WAIT, read_header(&server, Versions::V2))
            .await
            .unwrap();
        assert_eq!(got.unwrap_err(), WrongVersion);
        let (mut client, server) = pair().await;
        client
            .write_all(&v2(0x21, 0x12, &inet_block()))
            .await
            .unwrap();
        let got = timeout(WAIT, read_header(&server, Versions::Any))
            .await
            .unwrap();
        assert_eq!(got.unwrap_err(), Datagram);
    }
}
