//! Header rules shared by HTTP proxying and WebSocket upgrades: the checks a request head must pass
//! before it is routed, an HTTP/2 head made into the HTTP/1.1 one backends get, hop-by-hop headers out
//! (RFC 9110 §7.6.1), the client's address in (`X-Forwarded-*`, `X-Real-IP`, `Forwarded`).

use std::fmt::Write;
use std::net::IpAddr;

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Headers that describe one hop and must not be forwarded, besides those that `Connection` names.
/// Typed names, not strings: every request and response goes through this list.
static HOP_BY_HOP: [&HeaderName; 8] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
    &header::PROXY_AUTHENTICATE,
];

/// End-to-end headers that `Connection` may not remove: routing, message framing and the WebSocket
/// handshake depend on them, so a peer naming them there (`Connection: Host`) must not change what the
/// next hop sees.
static PROTECTED: [&HeaderName; 8] = [
    &header::HOST,
    &header::CONTENT_LENGTH,
    &header::COOKIE,
    &header::SEC_WEBSOCKET_KEY,
    &header::SEC_WEBSOCKET_VERSION,
    &header::SEC_WEBSOCKET_ACCEPT,
    &header::SEC_WEBSOCKET_PROTOCOL,
    &header::SEC_WEBSOCKET_EXTENSIONS,
];

/// Headers a request may carry once at most: a second `Host` would let wsgate route by one value while
/// the backend reads the other; a second WebSocket key or version would let wsgate check one while the
/// backend answers the other; a second `Content-Length` makes the body's end ambiguous.
static SINGLETONS: [&HeaderName; 4] = [
    &header::HOST,
    &header::CONTENT_LENGTH,
    &header::SEC_WEBSOCKET_KEY,
    &header::SEC_WEBSOCKET_VERSION,
];

/// Why a request head is refused before it is routed. Always the client's doing: answered 400, the
/// connection closed, no backend involved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    #[error("more than one {0} header")]
    Repeated(&'static str),
    /// A body on an upgrade: backends disagree on whether to read it (some do, some parse frames right
    /// after the head), so any body would let wsgate's view of the stream and the backend's drift apart.
    #[error("an upgrade request may not carry a body")]
    UpgradeWithBody,
    /// An HTTP/2 request whose `Host` names another authority than its `:authority`, or whose
    /// `:authority` carries userinfo (RFC 9113 §8.3.1): wsgate would route by one name while the backend
    /// reads another.
    #[error("Host differs from :authority, or :authority has userinfo")]
    AuthorityMismatch,
    /// An extended CONNECT (RFC 8441 §4) without the pseudo-headers a WebSocket needs.
    #[error("extended CONNECT needs {0}")]
    ExtendedConnect(&'static str),
    /// A body with a transfer coding other than `chunked` alone (`gzip, chunked`): wsgate would pass the
    /// coded bytes on as plain ones.
    #[error("transfer coding other than chunked")]
    TransferCoding,
}

/// Makes an HTTP/2 request head (`parts`) the HTTP/1.1 one a backend gets: `Host` from `:authority`
/// (which a client must send instead of `Host`), and the `Cookie` fields HTTP/2 may split joined into one
/// (RFC 9113 §8.2.3). The request target is made origin-form where it is sent.
pub fn h2_to_h1(parts: &mut http::request::Parts) -> Result<(), BadRequest> {
    if let Some(authority) = parts.uri.authority() {
        // No userinfo in `:authority` (RFC 9113 §8.3.1): `user@host` would route by one name while a
        // backend might read another.
        if authority.as_str().contains('@') {
            return Err(BadRequest::AuthorityMismatch);
        }
        match parts.headers.get(header::HOST) {
            Some(host)
                if !host
                    .as_bytes()
                    .eq_ignore_ascii_case(authority.as_str().as_bytes()) =>
            {
                return Err(BadRequest::AuthorityMismatch);
            }
            Some(_) => {}
            None => {
                let host = HeaderValue::from_str(authority.as_str())
                    .map_err(|_| BadRequest::AuthorityMismatch)?;
                parts.headers.insert(header::HOST, host);
            }
        }
    }
    let mut cookies = parts.headers.get_all(header::COOKIE).iter();
    if let (Some(first), Some(_)) = (cookies.next(), cookies.next()) {
        let mut joined = first.as_bytes().to_vec();
        for cookie in parts.headers.get_all(header::COOKIE).iter().skip(1) {
            joined.extend_from_slice(b"; ");
            joined.extend_from_slice(cookie.as_bytes());
        }
        if let Ok(joined) = HeaderValue::from_bytes(&joined) {
            parts.headers.insert(header::COOKIE, joined);
        }
    }
    parts.version = http::Version::HTTP_11;
    Ok(())
}

/// Checks a request head before routing; `upgrade` says whether it asks for a WebSocket upgrade.
pub fn check_request(headers: &HeaderMap, upgrade: bool) -> Result<(), BadRequest> {
    // A head with no name twice (the usual one) repeats no singleton: one comparison of counts instead
    // of a lookup per name.
    if headers.len() != headers.keys_len() {
        for name in SINGLETONS {
            let mut values = headers.get_all(name).iter();
            if values.next().is_some() && values.next().is_some() {
                return Err(BadRequest::Repeated(name.as_str()));
            }
        }
    }
    let coded = headers.contains_key(header::TRANSFER_ENCODING);
    if coded && !only_chunked(headers) {
        return Err(BadRequest::TransferCoding);
    }
    if upgrade
        && (coded
            || headers
                .get(header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes().trim_ascii() != b"0"))
    {
        return Err(BadRequest::UpgradeWithBody);
    }
    Ok(())
}

/// Whether a head's `Transfer-Encoding` (over all its lines) names `chunked` and nothing else: the one
/// transfer coding wsgate takes off and puts on. Another (`gzip, chunked`) would pass coded bytes on as
/// plain ones, the header that names the coding being hop-by-hop.
pub fn only_chunked(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(codings);
    codings
        .next()
        .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
        && codings.next().is_none()
}

/// What the hop-by-hop fields of an answer head say, gathered as the head is read so that those fields
/// never enter the map passed on to the client (`HopByHop::take`): whether the body is in a transfer
/// coding, whether the backend closes the connection, and which other fields `Connection` names. The
/// result is the map `strip_hop_by_hop` would leave, without building the fields only to remove them.
#[derive(Debug, Default)]
pub struct HopByHop {
    /// `Transfer-Encoding` was sent.
    pub coded: bool,
    /// How many transfer codings its lines name.
    codings: usize,
    /// The first of them was `chunked`.
    first_chunked: bool,
    /// `Connection` lists `close`.
    pub close: bool,
    /// The other fields `Connection` names (`PROTECTED` ones left out): removed once the head is read.
    listed: Vec<HeaderName>,
}

impl HopByHop {
    /// Takes a field of the head if it is hop-by-hop (it is then not passed on); false if it is not.
    pub fn take(&mut self, name: &HeaderName, value: &HeaderValue) -> bool {
        if !is_hop_by_hop(name) {
            return false;
        }
        if *name == header::CONNECTION {
            let tokens = value.to_str().ok().into_iter().flat_map(|v| v.split(','));
            for token in tokens.map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    self.close = true;
                } else if let Some(name) = listed_name(token) {
                    self.listed.push(name);
                }
            }
        } else if *name == header::TRANSFER_ENCODING {
            self.coded = true;
            for coding in codings(value) {
                if self.codings == 0 {
                    self.first_chunked = coding.eq_ignore_ascii_case(b"chunked");
                }
                self.codings += 1;
            }
        }
        true
    }

    /// Whether the transfer codings are `chunked` alone (as `only_chunked` says of a map).
    pub fn only_chunked(&self) -> bool {
        self.codings == 1 && self.first_chunked
    }

    /// Removes from the head's other fields those `Connection` named.
    pub fn strip_listed(&self, headers: &mut HeaderMap) {
        for name in &self.listed {
            headers.remove(name);
        }
    }
}

/// The transfer codings a `Transfer-Encoding` value names (empty list items skipped).
fn codings(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty())
}

/// The field a token of `Connection` names, to be removed, if any: not `close` (an option, no field's
/// name), not a hop-by-hop field (removed anyway), not one of the `PROTECTED` ones.
fn listed_name(token: &str) -> Option<HeaderName> {
    // `keep-alive`, the token nearly every answer's `Connection` carries, first.
    if token.eq_ignore_ascii_case("keep-alive")
        || token.eq_ignore_ascii_case("close")
        || HOP_BY_HOP
            .iter()
            .any(|h| h.as_str().eq_ignore_ascii_case(token))
    {
        return None;
    }
    HeaderName::from_bytes(token.as_bytes())
        .ok()
        .filter(|name| !PROTECTED.contains(&name))
}

/// Whether `name` is on the `HOP_BY_HOP` list: matched as text (one comparison by length, then the
/// bytes), since a list of `HeaderName`s is compared one by one, for every field of every head.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authenticate"
    )
}

/// Removes hop-by-hop headers, including every header the `Connection` header lists (except the
/// `PROTECTED` ones).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Every request and response goes through here, and most carry none of these or only `Connection:
    // keep-alive`: the names present are found in one pass over the head (compared, not hashed), and
    // only those are removed. The tokens `Connection` lists are mostly `close` (no header's name) or
    // names of the list (found already); any other is parsed as a name to remove.
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if is_hop_by_hop(name) {
            doomed.push(name.clone());
        }
    }
    if doomed.is_empty() {
        return;
    }
    let listed = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| listed_name(token.trim()));
    doomed.extend(listed);
    for name in doomed {
        headers.remove(name);
    }
}

/// The fields `write_forwarded` writes: a head encoded from a client's header map leaves these out
/// (whatever the client sent under them) and ends with `write_forwarded`'s lines instead.
pub fn is_forwarding(name: &HeaderName) -> bool {
    *name == X_FORWARDED_FOR
        || *name == X_FORWARDED_PROTO
        || *name == X_FORWARDED_HOST
        || *name == header::FORWARDED
        || *name == X_REAL_IP
}

/// Writes the forwarding fields of a request with `headers` from client `client`, as head lines
/// (`name: value` CRLF), straight into a head being encoded (a head is written once: building these as
/// header values in the client's map first, each hashed, validated and allocated, only to copy them out
/// again would be work for nothing). The head leaves the client's own fields of these names out
/// (`is_forwarding`).
///
/// Appends the client to `X-Forwarded-For`, sets `X-Forwarded-Proto`, `X-Forwarded-Host` (from `Host`
/// alone: without one, a client's own value is not passed on either), `X-Real-IP` and `Forwarded`.
/// Several `X-Forwarded-For` lines are one list (RFC 9110 §5.3): they are joined in order, none dropped.
/// `X-Real-IP` and `Forwarded` (RFC 7239) are replaced, not appended to: both are set from the real peer
/// alone, so a client cannot put an address of its choosing where a backend looks for the client's.
/// (`X-Forwarded-For` keeps what came before wsgate, as proxies chain it; its last entry is wsgate's.)
pub fn write_forwarded(headers: &HeaderMap, client: IpAddr, tls: bool, out: &mut Vec<u8>) {
    let ip = IpText::new(client);
    let ip = ip.as_bytes();
    // Every value written here is valid in a header: the client's values were checked when its head
    // was parsed (no CR, LF or NUL), the address is ASCII.
    out.extend_from_slice(b"x-forwarded-for: ");
    write_forwarded_for(headers, ip, out);
    out.extend_from_slice(b"\r\nx-forwarded-proto: ");
    out.extend_from_slice(proto(tls).as_bytes());
    let host = headers.get(header::HOST);
    if let Some(host) = host {
        out.extend_from_slice(b"\r\nx-forwarded-host: ");
        out.extend_from_slice(host.as_bytes());
    }
    out.extend_from_slice(b"\r\nforwarded: ");
    write_forwarded_value(client, ip, tls, host, out);
    out.extend_from_slice(b"\r\nx-real-ip: ");
    out.extend_from_slice(ip);
    out.extend_from_slice(b"\r\n");
}

fn proto(tls: bool) -> &'static str {
    if tls { "https" } else { "http" }
}

/// The `X-Forwarded-For` list: what the client's lines hold, in order, then the client.
fn write_forwarded_for(headers: &HeaderMap, ip: &[u8], out: &mut Vec<u8>) {
    for value in headers.get_all(&X_FORWARDED_FOR) {
        let Ok(text) = value.to_str() else { continue };
        let text = text.trim();
        if !text.is_empty() {
            out.extend_from_slice(text.as_bytes());
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(ip);
}

/// The `Forwarded` value (RFC 7239): the client, the protocol, and the host if it can be quoted.
fn write_forwarded_value(
    client: IpAddr,
    ip: &[u8],
    tls: bool,
    host: Option<&HeaderValue>,
    out: &mut Vec<u8>,
) {
    match client {
        IpAddr::V4(_) => {
            out.extend_from_slice(b"for=");
            out.extend_from_slice(ip);
        }
        IpAddr::V6(_) => {
            out.extend_from_slice(b"for=\"[");
            out.extend_from_slice(ip);
            out.extend_from_slice(b"]\"");
        }
    }
    out.extend_from_slice(b";proto=");
    out.extend_from_slice(proto(tls).as_bytes());
    if let Some(host) = host {
        // Quoted-string rules (RFC 7239 §4): a host with a quote, a backslash or a byte outside ASCII is
        // left out, not escaped. (A header value holds no control character but tab, which a quoted
        // string may hold.)
        let text = host.as_bytes();
        if !text.iter().any(|b| matches!(b, b'"' | b'\\') || *b >= 0x80) {
            out.extend_from_slice(b";host=\"");
            out.extend_from_slice(text);
            out.push(b'"');
        }
    }
}

/// An IP address as text, on the stack.
struct IpText {
    buf: [u8; 45],
    len: usize,
}

impl IpText {
    fn new(ip: IpAddr) -> IpText {
        let mut text = IpText {
            buf: [0; 45],
            len: 0,
        };
        match ip {
            IpAddr::V4(ip) => {
                for (i, octet) in ip.octets().into_iter().enumerate() {
                    if i > 0 {
                        text.push(b'.');
                    }
                    if octet >= 100 {
                        text.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        text.push(b'0' + octet / 10 % 10);
                    }
                    text.push(b'0' + octet % 10);
                }
            }
            // The longest IPv6 text (an IPv4-mapped address in full) is 45 bytes: it fits.
            IpAddr::V6(ip) => {
                let _ = write!(text, "{ip}");
            }
        }
        text
    }

    fn push(&mut self, byte: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = byte;
            self.len += 1;
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::fmt::Write for IpText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let slot = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        slot.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Whether a comma-separated header contains `token` (case-insensitive), in any of its lines.
pub fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h2_parts(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut builder = http::Request::get(uri).version(http::Version::HTTP_2);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn an_h2_head_becomes_the_h1_head_backends_get() {
        let mut parts = h2_parts(
            "https://chat.example.com/ws?room=1",
            &[("cookie", "a=1"), ("cookie", "b=2"), ("x-other", "1")],
        );
        h2_to_h1(&mut parts).unwrap();
        assert_eq!(parts.headers[header::HOST], "chat.example.com");
        assert_eq!(parts.headers[header::COOKIE], "a=1; b=2");
        assert_eq!(parts.headers.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(parts.version, http::Version::HTTP_11);

        // A Host that agrees (any case) stays; one that does not is refused.
        let mut agrees = h2_parts(
            "https://Chat.example.com:8443/",
            &[("host", "chat.EXAMPLE.com:8443")],
        );
        assert_eq!(h2_to_h1(&mut agrees), Ok(()));
        let mut differs = h2_parts("https://chat.example.com/", &[("host", "evil.example.com")]);
        assert_eq!(h2_to_h1(&mut differs), Err(BadRequest::AuthorityMismatch));
        let mut userinfo = h2_parts("https://evil.example@chat.example.com/", &[]);
        assert_eq!(h2_to_h1(&mut userinfo), Err(BadRequest::AuthorityMismatch));
        // Without :authority the Host field (if any) is the authority, as over HTTP/1.1.
        let mut host_only = h2_parts("/path", &[("host", "a.example")]);
        h2_to_h1(&mut host_only).unwrap();
        assert_eq!(host_only.headers[header::HOST], "a.example");
    }

    #[test]
    fn connection_named_headers_and_fixed_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn connection_lists_over_several_lines_and_repeats_are_followed() {
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("close"));
        h.append("connection", HeaderValue::from_static("x-a, X-A ,, x-b"));
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-b", HeaderValue::from_static("2"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
        // Nothing to strip: the head stays as it was.
        let mut h = HeaderMap::new();
        h.insert("x-kept", HeaderValue::from_static("yes"));
        h.insert("host", HeaderValue::from_static("example.com"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn connection_cannot_remove_end_to_end_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("Host, content-length, Sec-WebSocket-Key, x-gone"),
        );
        h.insert("host", HeaderValue::from_static("example.com"));
        h.insert("content-length", HeaderValue::from_static("0"));
        h.insert("sec-websocket-key", HeaderValue::from_static("k"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 3, "{h:?}");
        assert!(!h.contains_key("x-gone"));
    }

    #[test]
    fn repeated_singletons_and_upgrade_bodies_are_refused() {
        let mut h = HeaderMap::new();
        h.append("host", HeaderValue::from_static("a"));
        assert_eq!(check_request(&h, true), Ok(()));
        h.append("host", HeaderValue::from_static("a"));
        assert_eq!(check_request(&h, false), Err(BadRequest::Repeated("host")));
        let mut h = HeaderMap::new();
        h.append("sec-websocket-key", HeaderValue::from_static("a"));
        h.append("sec-websocket-key", HeaderValue::from_static("b"));
        assert_eq!(
            check_request(&h, true),
            Err(BadRequest::Repeated("sec-websocket-key"))
        );
        let mut h = HeaderMap::new();
        h.insert("content-length", HeaderValue::from_static("0"));
        assert_eq!(check_request(&h, true), Ok(()));
        h.insert("content-length", HeaderValue::from_static("14"));
        assert_eq!(check_request(&h, false), Ok(()));
        assert_eq!(check_request(&h, true), Err(BadRequest::UpgradeWithBody));
        let mut h = HeaderMap::new();
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        assert_eq!(check_request(&h, true), Err(BadRequest::UpgradeWithBody));
        assert_eq!(check_request(&h, false), Ok(()));
        // A coding other than chunked alone would be passed on as plain bytes.
        for codings in [
            &["gzip, chunked"][..],
            &["gzip", "chunked"],
            &["chunked, chunked"],
        ] {
            let mut h = HeaderMap::new();
            for coding in codings {
                h.append("transfer-encoding", HeaderValue::from_static(coding));
            }
            assert_eq!(check_request(&h, false), Err(BadRequest::TransferCoding));
        }
    }

    #[test]
    fn real_ip_and_forwarded_come_from_the_peer_alone() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("example.com:8080"));
        h.insert("x-real-ip", HeaderValue::from_static("6.6.6.6"));
        h.insert("forwarded", HeaderValue::from_static("for=6.6.6.6"));
        h = forwarded(&h, "10.0.0.7".parse().unwrap(), true);
        assert_eq!(h["x-real-ip"], "10.0.0.7");
        assert_eq!(
            h["forwarded"],
            "for=10.0.0.7;proto=https;host=\"example.com:8080\""
        );
        h = forwarded(&h, "::1".parse().unwrap(), false);
        assert_eq!(h.get_all("forwarded").iter().count(), 1);
        assert!(
            h["forwarded"]
                .to_str()
                .unwrap()
                .starts_with("for=\"[::1]\";proto=http")
        );
    }

    #[test]
    fn addresses_are_written_as_the_standard_library_writes_them() {
        let mut addresses: Vec<IpAddr> = [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.100.9",
            "1.20.199.200",
            "::",
            "::1",
            "2001:db8::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        addresses.extend((0..=255u8).map(|o| IpAddr::from([o, 255 - o, o / 3, o / 10])));
        for ip in addresses {
            assert_eq!(IpText::new(ip).as_bytes(), ip.to_string().as_bytes());
        }
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("example.com"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.1.1.1"));
        h = forwarded(&h, "127.0.0.1".parse().unwrap(), false);
        assert_eq!(h["x-forwarded-for"], "10.1.1.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
    }

    #[test]
    fn several_forwarded_for_lines_become_one_list() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("10.1.1.1"));
        h.append("x-forwarded-for", HeaderValue::from_static(" "));
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("10.2.2.2, 10.3.3.3"),
        );
        h = forwarded(&h, "127.0.0.1".parse().unwrap(), true);
        let all: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
        assert_eq!(all, ["10.1.1.1, 10.2.2.2, 10.3.3.3, 127.0.0.1"]);
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    /// The fields a backend gets for a client's `h` from `client`: the client's own but the forwarding
    /// ones (`is_forwarding`), then `write_forwarded`'s lines, read back into a map.
    fn forwarded(h: &HeaderMap, client: IpAddr, tls: bool) -> HeaderMap {
        let mut out = HeaderMap::new();
        for (name, value) in h {
            if !is_forwarding(name) {
                out.append(name.clone(), value.clone());
            }
        }
        let mut lines = Vec::new();
        write_forwarded(h, client, tls, &mut lines);
        let lines = String::from_utf8(lines).unwrap();
        assert!(lines.ends_with("\r\n"), "{lines:?}");
        for line in lines.trim_end_matches("\r\n").split("\r\n") {
            let (name, value) = line.split_once(": ").unwrap();
            out.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        out
    }

    /// Whatever the client sent under the forwarding names, each forwarding field reaches the backend
    /// once, from the client's address (`X-Forwarded-Host` only from a `Host`), and its other fields
    /// as they were.
    #[test]
    fn each_forwarding_field_is_written_once_whatever_the_client_sent() {
        let client_fields: [&[(&str, &str)]; 4] = [
            &[("host", "example.com"), ("accept", "*/*")],
            &[
                ("host", "a.test:8443"),
                ("x-forwarded-for", "10.1.1.1"),
                ("x-forwarded-for", "10.2.2.2, 10.3.3.3"),
                ("x-real-ip", "6.6.6.6"),
                ("forwarded", "for=6.6.6.6"),
                ("x-forwarded-proto", "gopher"),
                ("x-forwarded-host", "evil.test"),
            ],
            // No Host: a client's X-Forwarded-Host does not pass.
            &[("x-forwarded-host", "evil.test"), ("cookie", "a=b")],
            &[("host", "quote\"d"), ("x-forwarded-for", " ")],
        ];
        let clients: [IpAddr; 2] = ["192.0.2.7".parse().unwrap(), "2001:db8::1".parse().unwrap()];
        for fields in client_fields {
            for client in clients {
                for tls in [false, true] {
                    let mut map = HeaderMap::new();
                    for (name, value) in fields {
                        map.append(
                            HeaderName::from_static(name),
                            HeaderValue::from_static(value),
                        );
                    }
                    let sent = forwarded(&map, client, tls);
                    let case = format!("{fields:?} from {client}, tls {tls}");
                    let once = |name: &str| {
                        let all: Vec<_> = sent.get_all(name).iter().collect();
                        assert_eq!(all.len(), 1, "{name}: {case}");
                        all[0].to_str().unwrap().to_string()
                    };
                    assert_eq!(once("x-real-ip"), client.to_string(), "{case}");
                    assert_eq!(once("x-forwarded-proto"), proto(tls), "{case}");
                    assert!(
                        once("x-forwarded-for").ends_with(&client.to_string()),
                        "{case}"
                    );
                    assert!(
                        once("forwarded").contains(&format!("proto={}", proto(tls))),
                        "{case}"
                    );
                    match map.get("host") {
                        Some(host) => assert_eq!(once("x-forwarded-host"), host.to_str().unwrap()),
                        None => assert!(!sent.contains_key("x-forwarded-host"), "{case}"),
                    }
                    for (name, value) in &map {
                        if !is_forwarding(name) {
                            let all: Vec<_> = sent.get_all(name).iter().collect();
                            assert_eq!(all, [value], "{name}: {case}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_hop_by_hop_match_is_the_list() {
        for name in HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in [
            header::HOST,
            header::CONTENT_LENGTH,
            header::SEC_WEBSOCKET_KEY,
            header::PROXY_AUTHORIZATION,
            HeaderName::from_static("connection-x"),
            HeaderName::from_static("t"),
            HeaderName::from_static("tee"),
        ] {
            assert!(!is_hop_by_hop(&name), "{name}");
        }
    }

    #[test]
    fn tokens_in_comma_lists() {
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("keep-alive"));
        h.append("connection", HeaderValue::from_static("foo, Upgrade"));
        assert!(has_token(&h, header::CONNECTION, "upgrade"));
        assert!(!has_token(&h, header::CONNECTION, "close"));
    }
}
