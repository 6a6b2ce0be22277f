//! Who a client is, for admission control and sticky balancing: its real IP (the peer's, or what trusted
//! proxies reported in `X-Forwarded-For`) and the key its per-client state is kept under (`ClientKey`:
//! an IPv6 client is its network of `limits.ipv6_prefix` bits, since one subscriber usually holds a whole
//! /64 and could otherwise take a new address for every connection).

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;

use crate::config::cidr::Cidr;

/// The key a client's state is kept under: an IPv4 address (as its IPv4-mapped IPv6 form,
/// `::ffff:a.b.c.d`, which is also what a dual-stack socket reports for it), or an IPv6 address cut to
/// its prefix. Two halves rather than a `u128`, whose 16-byte alignment would double what a connection's
/// place (`table::Counted`) costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey([u64; 2]);

impl ClientKey {
    /// The key of `ip`, with IPv6 addresses cut to their leading `ipv6_prefix` bits (0..=128).
    pub fn new(ip: IpAddr, ipv6_prefix: u8) -> ClientKey {
        let bits = match ip {
            IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => u128::from(v6),
            IpAddr::V6(v6) => {
                let keep = match ipv6_prefix.min(128) {
                    0 => 0,
                    n => u128::MAX << (128 - u32::from(n)),
                };
                u128::from(v6) & keep
            }
        };
        ClientKey([(bits >> 64) as u64, bits as u64])
    }
}

/// The client's IP: the peer's, or the one trusted proxies reported in `X-Forwarded-For`.
///
/// The header is walked from its right end, each entry believed only while the hop that added it is
/// trusted, and the first address not trusted is the client: an attacker can prepend anything, but cannot
/// forge what our own proxies appended.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    let mut client = peer;
    if !is_trusted(client) {
        return client;
    }
    // The last header line holds the entries added last; within a line, the rightmost entry is the newest.
    let lines: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    for entry in lines.iter().rev().flat_map(|line| line.rsplit(',')) {
        if !is_trusted(client) {
            break;
        }
        match parse_forwarded_ip(entry) {
            Some(ip) => client = ip,
            // Garbage from a trusted hop: keep the last address we could believe.
            None => break,
        }
    }
    client
}

/// An `X-Forwarded-For` entry: an IP, possibly with a port (`1.2.3.4:5678`, `[::1]:5678`).
fn parse_forwarded_ip(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse().ok())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        h
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    fn nets(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|n| n.parse().expect("net")).collect()
    }

    #[test]
    fn ipv6_clients_are_grouped_by_prefix_and_mapped_ipv4_is_ipv4() {
        let key = |text, prefix| ClientKey::new(ip(text), prefix);
        assert_eq!(key("2001:db8:1:2::1", 64), key("2001:db8:1:2:ffff::9", 64));
        assert_ne!(key("2001:db8:1:2::1", 64), key("2001:db8:1:3::1", 64));
        assert_eq!(key("2001:db8:1:2::1", 48), key("2001:db8:1:3::1", 48));
        assert_ne!(key("2001:db8::1", 128), key("2001:db8::2", 128));
        assert_eq!(key("2001:db8::1", 0), key("fe80::1", 0));
        assert_eq!(key("::ffff:192.0.2.7", 64), key("192.0.2.7", 64));
        assert_ne!(key("192.0.2.7", 64), key("192.0.2.8", 64));
        // An IPv4 address and the IPv6 network with the same low bits are different clients.
        assert_ne!(key("0.0.0.1", 128), key("::1", 128));
        assert_ne!(
            key("192.0.2.7", 64),
            key("::", 64),
            "no /64 holds a mapped address"
        );
        assert!(std::mem::size_of::<ClientKey>() == 16 && std::mem::align_of::<ClientKey>() == 8);
    }

    #[test]
    fn forwarded_for_is_ignored_from_untrusted_peers() {
        let h = headers(&[("x-forwarded-for", "203.0.113.9")]);
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(client_ip(ip("192.0.2.1"), &h, &trusted), ip("192.0.2.1"));
        assert_eq!(client_ip(ip("10.1.1.1"), &h, &[]), ip("10.1.1.1"));
    }

    #[test]
    fn forwarded_for_is_walked_while_hops_are_trusted() {
        let trusted = nets(&["10.0.0.0/8", "127.0.0.1/32"]);
        // The client forged 1.1.1.1; our proxy 10.0.0.5 appended the real client 203.0.113.9.
        let h = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.9, 10.0.0.5")]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &trusted), ip("203.0.113.9"));
        // Split over two header lines.
        let h = headers(&[
            ("x-forwarded-for", "1.1.1.1, 203.0.113.9"),
            ("x-forwarded-for", "10.0.0.5"),
        ]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &trusted), ip("203.0.113.9"));
        // Only trusted hops: the leftmost is the best we know.
        let h = headers(&[("x-forwarded-for", "10.9.9.9")]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &trusted), ip("10.9.9.9"));
        // Garbage stops the walk at the last believable address.
        let h = headers(&[("x-forwarded-for", "203.0.113.9, nonsense")]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &trusted), ip("127.0.0.1"));
        // Ports and brackets.
        let h = headers(&[("x-forwarded-for", "[2001:db8::1]:443")]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &trusted), ip("2001:db8::1"));
    }
}
