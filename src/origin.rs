//! A route's `Origin` allow-list: which web pages may open a WebSocket through it. Browsers send any
//! page's cookies with a WebSocket handshake to any site and do not apply CORS to it, so a backend that
//! trusts the cookies would talk to a hostile page in the user's name (cross-site WebSocket hijacking).
//! The handshake's `Origin` (RFC 6454) says which page asked; an upgrade whose origin is missing or not
//! listed is refused.
//!
//! Here: the patterns as configured (`allowed_origins`, parsed and normalised once, with errors an
//! operator can act on), and the check of a request's `Origin` fields against them, strict, without
//! allocating. Knows nothing of wsgate's other modules; the config and the 403 are done by their callers.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use http::HeaderValue;

/// RFC 1035 §2.3.4: a label and a whole name (without its trailing dot) can be no longer in DNS, so no
/// page can be served from a longer host.
const MAX_LABEL: usize = 63;
const MAX_NAME: usize = 253;

/// One entry of `allowed_origins`, parsed from the config text: `scheme://host[:port]`, the host maybe
/// starting with a wildcard label (`*.example.com`). Stored normalised: scheme and host lower-case, the
/// host without its trailing dot, a scheme's default port as no port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    scheme: String,
    /// `*.` before `host`: any name with at least one more label in front of it.
    wildcard: bool,
    host: Host,
    /// `None`: no port, or the scheme's default one (RFC 6454 §4 serialises neither).
    port: Option<u16>,
}

/// A pattern's host. Addresses are kept as addresses so that every way of writing one (`[0:0::1]`,
/// `[::1]`) is the same host.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    /// Lower-case, without a trailing dot.
    Name(String),
    V4(Ipv4Addr),
    V6(Ipv6Addr),
}

/// Why an `allowed_origins` entry is refused. Each message follows `allowed_origins[i]: ` in a config
/// error and says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OriginPatternError {
    #[error("empty: write an origin such as \"https://example.com\"")]
    Empty,
    #[error(
        "\"*\" would let every site's pages open WebSockets here: list the origins that may, \
         such as \"https://example.com\" or \"https://*.example.com\""
    )]
    AnyOrigin,
    #[error(
        "\"null\" is the origin of sandboxed frames and local files, which any site can make: it \
         cannot be allowed"
    )]
    Null,
    #[error(
        "not ASCII: write an internationalised host name as its punycode A-label (\"xn--…\"), the \
         form browsers send"
    )]
    NonAscii,
    #[error("a space or control character: write one origin per string, without spaces")]
    Whitespace,
    #[error("expected scheme://host[:port], such as \"https://example.com\"")]
    NoScheme,
    #[error("a scheme starts with a letter and holds only letters, digits, '+', '-' and '.'")]
    Scheme,
    #[error("user information (\"user@\") is not part of an origin: write scheme://host[:port]")]
    Userinfo,
    #[error("no host after \"://\"")]
    EmptyHost,
    #[error("an empty label in the host: \"..\", a leading dot, or more than one trailing dot")]
    EmptyLabel,
    #[error(
        "{0:?} cannot be in a host name: letters, digits, '-' and '_' only (an IPv6 address goes \
         between [ ])"
    )]
    HostCharacter(char),
    #[error("a label of the host is longer than 63 characters")]
    LabelTooLong,
    #[error("the host is longer than 253 characters")]
    NameTooLong,
    #[error("'*' may only be a whole leading label, as in \"https://*.example.com\"")]
    Wildcard,
    #[error("a wildcard cannot stand before an IP address")]
    WildcardAddress,
    #[error(
        "the host ends in a number but is not an IPv4 address: write four decimal numbers from 0 to \
         255 without leading zeros, as browsers send it"
    )]
    Ipv4,
    #[error("not an IPv6 address between [ ] (zone identifiers cannot be in an origin)")]
    Ipv6,
    #[error("the port must be a number from 1 to 65535, after a ':'")]
    Port,
    #[error("a path is not part of an origin (not even \"/\"): write {0:?}")]
    Path(String),
    #[error("a query is not part of an origin: write {0:?}")]
    Query(String),
    #[error("a fragment is not part of an origin: write {0:?}")]
    Fragment(String),
}

/// Why an upgrade's `Origin` is refused (answered 403 by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OriginRefusal {
    /// No `Origin` field, and the route does not let clients without one through.
    #[error("no Origin header")]
    Missing,
    /// A well-formed origin that no pattern matches.
    #[error("the Origin is not allowed")]
    NotAllowed,
    /// Not a serialized origin: a path, userinfo, a wildcard, a list of origins, bytes outside visible
    /// ASCII, an empty value…
    #[error("malformed Origin header")]
    Malformed,
    /// More than one `Origin` field: which one the backend would read is anyone's guess.
    #[error("more than one Origin header")]
    Repeated,
    /// `null`: sandboxed frames, `file://` pages, some redirects. Any site can make a page whose origin
    /// is `null`, so allowing it would allow every site.
    #[error("opaque Origin \"null\"")]
    Opaque,
}

impl OriginRefusal {
    /// The refusal as a metric or log label.
    pub fn label(self) -> &'static str {
        match self {
            OriginRefusal::Missing => "origin_missing",
            OriginRefusal::NotAllowed => "origin_not_allowed",
            OriginRefusal::Malformed => "origin_malformed",
            OriginRefusal::Repeated => "origin_repeated",
            OriginRefusal::Opaque => "origin_opaque",
        }
    }
}

/// A route's allowed origins, and whether a request without `Origin` may pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginList {
    patterns: Vec<OriginPattern>,
    /// Browsers always send `Origin` with a WebSocket handshake; only other clients (which could send any
    /// origin they like anyway) leave it out. Letting them through is the operator's choice.
    allow_missing: bool,
}

impl OriginList {
    pub fn new(patterns: Vec<OriginPattern>, allow_missing: bool) -> OriginList {
        OriginList {
            patterns,
            allow_missing,
        }
    }

    pub fn patterns(&self) -> &[OriginPattern] {
        &self.patterns
    }

    pub fn allow_missing(&self) -> bool {
        self.allow_missing
    }

    /// `origin`: every value of the request's Origin header fields (the request's
    /// `headers.get_all(ORIGIN)`), decide whether the upgrade may go on.
    ///
    /// An empty list with `allow_missing` false refuses every request; with `allow_missing` true it lets
    /// through only requests without `Origin`.
    pub fn check<'a>(
        &self,
        origin: impl IntoIterator<Item = &'a HeaderValue>,
    ) -> Result<(), OriginRefusal> {
        let mut fields = origin.into_iter();
        let Some(value) = fields.next() else {
            return if self.allow_missing {
                Ok(())
            } else {
                Err(OriginRefusal::Missing)
            };
        };
        if fields.next().is_some() {
            return Err(OriginRefusal::Repeated);
        }
        // Optional whitespace around a field value is not part of it (RFC 9110 §5.5). An empty value is
        // malformed, not missing: the field is there, and `allow_missing` is about clients that send none.
        let text = value.as_bytes().trim_ascii();
        if text.eq_ignore_ascii_case(b"null") {
            return Err(OriginRefusal::Opaque);
        }
        // Any flaw at all (a space inside, as in a list of origins, is one) makes it malformed.
        let origin = parse(text).map_err(|_| OriginRefusal::Malformed)?;
        if origin.wildcard {
            return Err(OriginRefusal::Malformed);
        }
        if self.patterns.iter().any(|p| p.matches(&origin)) {
            Ok(())
        } else {
            Err(OriginRefusal::NotAllowed)
        }
    }
}

impl OriginPattern {
    /// Parses one `allowed_origins` entry. Uppercase is accepted (and lower-cased), one trailing dot on
    /// the host dropped, a default port dropped.
    pub fn parse(text: &str) -> Result<OriginPattern, OriginPatternError> {
        let parsed = parse(text.as_bytes()).map_err(|flaw| flaw.explain(text))?;
        let host = match parsed.host {
            HostRef::Name(name) => Host::Name(ascii_lowercase(name)),
            HostRef::V4(a) => Host::V4(a),
            HostRef::V6(a) => Host::V6(a),
        };
        Ok(OriginPattern {
            scheme: ascii_lowercase(parsed.scheme),
            wildcard: parsed.wildcard,
            host,
            port: parsed.port,
        })
    }

    /// Lower-case.
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// Whether the host starts with `*.`.
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// The port, `None` when there is none or it is the scheme's default.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    fn matches(&self, origin: &Parsed<'_>) -> bool {
        // Cheapest first: the port, then the scheme, then the host.
        if self.port != origin.port || !origin.scheme.eq_ignore_ascii_case(self.scheme.as_bytes()) {
            return false;
        }
        match (&self.host, origin.host) {
            (Host::Name(pattern), HostRef::Name(host)) => {
                let pattern = pattern.as_bytes();
                if !self.wildcard {
                    return host.eq_ignore_ascii_case(pattern);
                }
                // `*.example.com`: at least one whole label, then a dot, then the name. Not the name
                // itself (the operator wrote the apex separately if it is meant), and never
                // `badexample.com`: the byte before the suffix must be a dot.
                host.len() >= pattern.len() + 2
                    && host[host.len() - pattern.len() - 1] == b'.'
                    && host[host.len() - pattern.len()..].eq_ignore_ascii_case(pattern)
            }
            (Host::V4(pattern), HostRef::V4(host)) => *pattern == host,
            (Host::V6(pattern), HostRef::V6(host)) => *pattern == host,
            _ => false,
        }
    }
}

impl FromStr for OriginPattern {
    type Err = OriginPatternError;

    fn from_str(text: &str) -> Result<OriginPattern, OriginPatternError> {
        OriginPattern::parse(text)
    }
}

/// The canonical form, which parses back to the same pattern: `https://*.example.com`,
/// `http://[::1]:8080` (no default port, lower-case, no trailing dot).
impl fmt::Display for OriginPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme)?;
        if self.wildcard {
            f.write_str("*.")?;
        }
        match &self.host {
            Host::Name(name) => f.write_str(name)?,
            Host::V4(a) => write!(f, "{a}")?,
            Host::V6(a) => write!(f, "[{a}]")?,
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

fn ascii_lowercase(bytes: &[u8]) -> String {
    // Only called on text `parse` checked to be ASCII.
    String::from_utf8_lossy(bytes).to_ascii_lowercase()
}

/// An origin or a pattern as written, borrowed from the text: what `check` compares without allocating.
struct Parsed<'a> {
    /// As written (any case).
    scheme: &'a [u8],
    wildcard: bool,
    host: HostRef<'a>,
    /// After default-port normalisation.
    port: Option<u16>,
}

#[derive(Clone, Copy)]
enum HostRef<'a> {
    /// As written (any case), without the trailing dot and the `*.`.
    Name(&'a [u8]),
    V4(Ipv4Addr),
    V6(Ipv6Addr),
}

/// What is wrong with a text, without allocating; `explain` makes it an operator's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flaw {
    Empty,
    Star,
    Null,
    NonAscii,
    Whitespace,
    NoScheme,
    Scheme,
    Userinfo,
    EmptyHost,
    EmptyLabel,
    HostCharacter(u8),
    LabelTooLong,
    NameTooLong,
    Wildcard,
    WildcardAddress,
    Ipv4,
    Ipv6,
    Port,
    /// Where the path, query or fragment starts: the text before it is the origin to suggest.
    Path(usize),
    Query(usize),
    Fragment(usize),
}

impl Flaw {
    fn explain(self, text: &str) -> OriginPatternError {
        // The suggestion is the canonical form of what precedes the path: `parse` reports a path only once
        // everything before it is a valid origin.
        let suggest = |end: usize| match OriginPattern::parse(&text[..end]) {
            Ok(origin) => origin.to_string(),
            Err(_) => text[..end].to_string(),
        };
        match self {
            Flaw::Empty => OriginPatternError::Empty,
            Flaw::Star => OriginPatternError::AnyOrigin,
            Flaw::Null => OriginPatternError::Null,
            Flaw::NonAscii => OriginPatternError::NonAscii,
            Flaw::Whitespace => OriginPatternError::Whitespace,
            Flaw::NoScheme => OriginPatternError::NoScheme,
            Flaw::Scheme => OriginPatternError::Scheme,
            Flaw::Userinfo => OriginPatternError::Userinfo,
            Flaw::EmptyHost => OriginPatternError::EmptyHost,
            Flaw::EmptyLabel => OriginPatternError::EmptyLabel,
            Flaw::HostCharacter(c) => OriginPatternError::HostCharacter(char::from(c)),
            Flaw::LabelTooLong => OriginPatternError::LabelTooLong,
            Flaw::NameTooLong => OriginPatternError::NameTooLong,
            Flaw::Wildcard => OriginPatternError::Wildcard,
            Flaw::WildcardAddress => OriginPatternError::WildcardAddress,
            Flaw::Ipv4 => OriginPatternError::Ipv4,
            Flaw::Ipv6 => OriginPatternError::Ipv6,
            Flaw::Port => OriginPatternError::Port,
            Flaw::Path(end) => OriginPatternError::Path(suggest(end)),
            Flaw::Query(end) => OriginPatternError::Query(suggest(end)),
            Flaw::Fragment(end) => OriginPatternError::Fragment(suggest(end)),
        }
    }
}

/// The grammar of patterns and of request origins alike (a request origin with a wildcard is refused by
/// the caller): `scheme "://" host [ ":" port ]`, RFC 6454 §6.2's serialization read leniently only in
/// case, in a default port, and in one trailing dot on the host, which name the same origin.
fn parse(text: &[u8]) -> Result<Parsed<'_>, Flaw> {
    if text.is_empty() {
        return Err(Flaw::Empty);
    }
    if !text.is_ascii() {
        return Err(Flaw::NonAscii);
    }
    // Space, tab, controls, DEL: nothing of an origin, and a space separates the list of origins RFC 6454
    // §7 allows in theory (no browser sends one; which of them would count?).
    if text.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err(Flaw::Whitespace);
    }
    if text == b"*" {
        return Err(Flaw::Star);
    }
    if text.eq_ignore_ascii_case(b"null") {
        return Err(Flaw::Null);
    }
    let Some(colon) = text.windows(3).position(|w| w == b"://") else {
        return Err(Flaw::NoScheme);
    };
    let scheme = &text[..colon];
    // RFC 3986 §3.1: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ).
    let scheme_ok = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !scheme_ok {
        return Err(Flaw::Scheme);
    }
    let start = colon + 3;
    let rest = &text[start..];
    let cut = rest.iter().position(|b| matches!(b, b'/' | b'?' | b'#'));
    let authority = &rest[..cut.unwrap_or(rest.len())];
    // `https://app.example.com@evil.example` is evil.example's origin to a URL parser, and only a
    // careless reader's app.example.com: no `@` at all.
    if authority.contains(&b'@') {
        return Err(Flaw::Userinfo);
    }
    let (host_text, port_text) = if authority.first() == Some(&b'[') {
        let Some(close) = authority.iter().position(|&b| b == b']') else {
            return Err(Flaw::Ipv6);
        };
        let port = match &authority[close + 1..] {
            [] => None,
            [b':', port @ ..] => Some(port),
            _ => return Err(Flaw::Port),
        };
        (&authority[..=close], port)
    } else {
        match authority.iter().position(|&b| b == b':') {
            Some(i) => (&authority[..i], Some(&authority[i + 1..])),
            None => (authority, None),
        }
    };
    let (wildcard, host) = parse_host(host_text)?;
    let port = match port_text {
        Some(port) => Some(parse_port(port)?),
        None => None,
    };
    let port = port.filter(|&p| Some(p) != default_port(scheme));
    if let Some(i) = cut {
        return Err(match rest[i] {
            b'/' => Flaw::Path(start + i),
            b'?' => Flaw::Query(start + i),
            _ => Flaw::Fragment(start + i),
        });
    }
    Ok(Parsed {
        scheme,
        wildcard,
        host,
        port,
    })
}

/// A host: `[IPv6]`, an IPv4 address, or a DNS name, maybe after `*.`. One trailing dot is dropped:
/// `example.com.` is the fully qualified spelling of the same DNS name, so a page at
/// `https://example.com./` is served by whoever controls `example.com` (and its certificate is
/// `example.com`'s), and the browser sends the origin as the page's URL spells it.
fn parse_host(text: &[u8]) -> Result<(bool, HostRef<'_>), Flaw> {
    if text.is_empty() {
        return Err(Flaw::EmptyHost);
    }
    if let [b'[', inner @ .., b']'] = text {
        // std's parser: the RFC 4291 text forms, any hex case, an embedded IPv4, no zone (`%eth0`, which
        // browsers do not put in URLs).
        let address = std::str::from_utf8(inner)
            .ok()
            .and_then(|s| s.parse::<Ipv6Addr>().ok())
            .ok_or(Flaw::Ipv6)?;
        return Ok((false, HostRef::V6(address)));
    }
    let name = text.strip_suffix(b".").unwrap_or(text);
    let (wildcard, name) = match name.strip_prefix(b"*.") {
        Some(name) => (true, name),
        None => (false, name),
    };
    if wildcard && name.first() == Some(&b'[') {
        return Err(Flaw::WildcardAddress);
    }
    if name.contains(&b'*') || (wildcard && name.is_empty()) {
        return Err(Flaw::Wildcard);
    }
    if name.is_empty() {
        // The host was ".".
        return Err(Flaw::EmptyLabel);
    }
    let mut last: &[u8] = name;
    for label in name.split(|&b| b == b'.') {
        if label.is_empty() {
            return Err(Flaw::EmptyLabel);
        }
        if label.len() > MAX_LABEL {
            return Err(Flaw::LabelTooLong);
        }
        // Letters, digits, hyphens (RFC 1123), and underscores, which real names carry and browsers
        // accept. Anything else (`%`, `!`, `\`…) is not in a serialized origin of a page that DNS can
        // name.
        if let Some(&c) = label
            .iter()
            .find(|&&b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            return Err(Flaw::HostCharacter(c));
        }
        last = label;
    }
    if name.len() > MAX_NAME {
        return Err(Flaw::NameTooLong);
    }
    // The URL standard (host parsing, "ends in a number") reads a host whose last label is a number as
    // an IPv4 address, and serialises it as four decimals: `127.1` arrives as `127.0.0.1`. So such a host
    // must be an address in exactly that form, or it could never match.
    if is_number(last) {
        if wildcard {
            return Err(Flaw::WildcardAddress);
        }
        let address = std::str::from_utf8(name)
            .ok()
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
            .ok_or(Flaw::Ipv4)?;
        return Ok((false, HostRef::V4(address)));
    }
    Ok((wildcard, HostRef::Name(name)))
}

/// The URL standard's IPv4 number: decimal digits, or `0x` and hex digits (none is 0).
fn is_number(label: &[u8]) -> bool {
    match label {
        [b'0', b'x' | b'X', hex @ ..] => hex.iter().all(u8::is_ascii_hexdigit),
        _ => label.iter().all(u8::is_ascii_digit),
    }
}

/// 1 to 65535; at most five digits (leading zeros read as the URL standard reads them).
fn parse_port(text: &[u8]) -> Result<u16, Flaw> {
    if text.is_empty() || text.len() > 5 || !text.iter().all(u8::is_ascii_digit) {
        return Err(Flaw::Port);
    }
    let value = text.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(Flaw::Port),
    }
}

/// The ports RFC 6454 §6.2 leaves out of a serialized origin. Other schemes have no default: a port
/// written is a port required, and no port matches only no port.
fn default_port(scheme: &[u8]) -> Option<u16> {
    if scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"ws") {
        Some(80)
    } else if scheme.eq_ignore_ascii_case(b"https") || scheme.eq_ignore_ascii_case(b"wss") {
        Some(443)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> OriginPattern {
        OriginPattern::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    fn list(patterns: &[&str], allow_missing: bool) -> OriginList {
        OriginList::new(patterns.iter().map(|p| pattern(p)).collect(), allow_missing)
    }

    /// `fields`: the values of the request's Origin fields.
    fn check(list: &OriginList, fields: &[&[u8]]) -> Result<(), OriginRefusal> {
        let values: Vec<HeaderValue> = fields
            .iter()
            .map(|f| HeaderValue::from_bytes(f).expect("a valid header value"))
            .collect();
        list.check(&values)
    }

    fn one(list: &OriginList, value: &str) -> Result<(), OriginRefusal> {
        check(list, &[value.as_bytes()])
    }

    fn error(text: &str) -> OriginPatternError {
        match OriginPattern::parse(text) {
            Ok(p) => panic!("{text:?} accepted as {p}"),
            Err(e) => e,
        }
    }

    const NOT: Result<(), OriginRefusal> = Err(OriginRefusal::NotAllowed);
    const BAD: Result<(), OriginRefusal> = Err(OriginRefusal::Malformed);

    #[test]
    fn exact_origins_match_in_any_case() {
        let l = list(&["https://app.example.com"], false);
        assert_eq!(one(&l, "https://app.example.com"), Ok(()));
        assert_eq!(one(&l, "HTTPS://APP.EXAMPLE.COM"), Ok(()));
        assert_eq!(one(&l, "hTTps://App.Example.Com"), Ok(()));
        assert_eq!(one(&l, "https://other.example.com"), NOT);
        assert_eq!(one(&l, "https://app.example.co"), NOT);
        assert_eq!(one(&l, "https://app.example.comm"), NOT);
        assert_eq!(one(&l, "https://xapp.example.com"), NOT);
        // An uppercase pattern is the same pattern.
        assert_eq!(
            pattern("HTTPS://App.Example.COM"),
            pattern("https://app.example.com")
        );
        let l = list(&["HTTPS://App.Example.COM"], false);
        assert_eq!(one(&l, "https://app.example.com"), Ok(()));
    }

    #[test]
    fn schemes_must_match() {
        let l = list(&["https://a.com"], false);
        assert_eq!(one(&l, "http://a.com"), NOT);
        assert_eq!(one(&l, "wss://a.com"), NOT);
        assert_eq!(one(&l, "ws://a.com"), NOT);
        let l = list(&["http://a.com"], false);
        assert_eq!(one(&l, "https://a.com"), NOT);
        assert_eq!(one(&l, "http://a.com"), Ok(()));
        let l = list(&["wss://a.com"], false);
        assert_eq!(one(&l, "wss://a.com:443"), Ok(()));
        assert_eq!(one(&l, "https://a.com"), NOT);
        // Any RFC 3986 scheme: browser extensions have origins too.
        let l = list(&["chrome-extension://abcdefghijklmnop"], false);
        assert_eq!(one(&l, "chrome-extension://abcdefghijklmnop"), Ok(()));
        assert_eq!(one(&l, "Chrome-Extension://ABCDEFGHIJKLMNOP"), Ok(()));
    }

    #[test]
    fn default_ports_are_no_port() {
        assert_eq!(pattern("https://a.com:443"), pattern("https://a.com"));
        assert_eq!(pattern("wss://a.com:443"), pattern("wss://a.com"));
        assert_eq!(pattern("http://a.com:80"), pattern("http://a.com"));
        assert_eq!(pattern("ws://a.com:80"), pattern("ws://a.com"));
        assert_eq!(pattern("https://a.com:443").to_string(), "https://a.com");
        assert_eq!(pattern("https://a.com:443").port(), None);
        // Pattern without the port, request with it, and the other way round.
        let l = list(&["https://a.com", "http://b.com:80"], false);
        assert_eq!(one(&l, "https://a.com:443"), Ok(()));
        assert_eq!(one(&l, "https://a.com:00443"), Ok(()));
        assert_eq!(one(&l, "http://b.com"), Ok(()));
        assert_eq!(one(&l, "http://b.com:80"), Ok(()));
        // The other scheme's default is a port like any other.
        assert_eq!(one(&l, "https://a.com:80"), NOT);
        assert_eq!(one(&l, "http://b.com:443"), NOT);
        assert_eq!(pattern("https://a.com:80").port(), Some(80));
    }

    #[test]
    fn explicit_ports_must_match() {
        let l = list(&["http://localhost:8080"], false);
        assert_eq!(one(&l, "http://localhost:8080"), Ok(()));
        assert_eq!(one(&l, "http://LOCALHOST:8080"), Ok(()));
        assert_eq!(one(&l, "http://localhost:8081"), NOT);
        assert_eq!(one(&l, "http://localhost"), NOT);
        assert_eq!(one(&l, "http://localhost:80"), NOT);
        let l = list(&["https://a.com"], false);
        assert_eq!(one(&l, "https://a.com:8443"), NOT);
        // Schemes without a default port: no port matches only no port.
        let l = list(&["foo://a.com"], false);
        assert_eq!(one(&l, "foo://a.com"), Ok(()));
        assert_eq!(one(&l, "foo://a.com:80"), NOT);
        assert_eq!(one(&l, "foo://a.com:443"), NOT);
        let l = list(&["foo://a.com:443"], false);
        assert_eq!(one(&l, "foo://a.com"), NOT);
        assert_eq!(pattern("foo://a.com:443").to_string(), "foo://a.com:443");
    }

    #[test]
    fn request_ports_are_checked() {
        let l = list(&["http://a.com:8080"], false);
        for bad in [
            "http://a.com:",
            "http://a.com:0",
            "http://a.com:65536",
            "http://a.com:99999",
            "http://a.com:008080",
            "http://a.com:80a",
            "http://a.com:-1",
            "http://a.com:+80",
            "http://a.com:8080:8080",
        ] {
            assert_eq!(one(&l, bad), BAD, "{bad}");
        }
        assert_eq!(one(&l, "http://a.com:08080"), Ok(()));
        assert_eq!(one(&l, "http://a.com:65535"), NOT);
    }

    #[test]
    fn one_trailing_dot_is_the_same_name() {
        let l = list(&["https://example.com", "https://*.example.org"], false);
        assert_eq!(one(&l, "https://example.com."), Ok(()));
        assert_eq!(one(&l, "https://example.com.:443"), Ok(()));
        assert_eq!(one(&l, "https://a.example.org."), Ok(()));
        assert_eq!(one(&l, "https://example.com.."), BAD);
        assert_eq!(one(&l, "https://."), BAD);
        assert_eq!(
            pattern("https://example.com."),
            pattern("https://example.com")
        );
        assert_eq!(
            pattern("https://example.com.").to_string(),
            "https://example.com"
        );
        assert_eq!(
            pattern("https://*.example.org."),
            pattern("https://*.example.org")
        );
        let l = list(&["https://example.com."], false);
        assert_eq!(one(&l, "https://example.com"), Ok(()));
        assert_eq!(
            error("https://example.com.."),
            OriginPatternError::EmptyLabel
        );
        // IPv4 too: the URL standard drops the dot.
        let l = list(&["http://127.0.0.1:8080"], false);
        assert_eq!(one(&l, "http://127.0.0.1.:8080"), Ok(()));
    }

    #[test]
    fn null_is_never_allowed() {
        for allow_missing in [false, true] {
            let l = list(&["https://a.com"], allow_missing);
            for null in ["null", "NULL", "Null", " null ", "null\t"] {
                assert_eq!(one(&l, null), Err(OriginRefusal::Opaque), "{null:?}");
            }
        }
        assert_eq!(error("null"), OriginPatternError::Null);
        assert_eq!(error("NULL"), OriginPatternError::Null);
        // Not an origin list either.
        let l = list(&["https://a.com"], false);
        assert_eq!(one(&l, "null null"), BAD);
        assert_eq!(one(&l, "nul"), BAD);
    }

    #[test]
    fn wildcards_match_subdomains_only() {
        let l = list(&["https://*.example.com"], false);
        assert_eq!(one(&l, "https://a.example.com"), Ok(()));
        assert_eq!(one(&l, "https://a.b.example.com"), Ok(()));
        assert_eq!(one(&l, "https://x-1.y_2.example.com"), Ok(()));
        assert_eq!(one(&l, "https://A.EXAMPLE.COM"), Ok(()));
        assert_eq!(one(&l, "https://a.example.com:443"), Ok(()));
        // Not the apex, not a name that merely ends the same way, not another scheme or port.
        assert_eq!(one(&l, "https://example.com"), NOT);
        assert_eq!(one(&l, "https://example.com."), NOT);
        assert_eq!(one(&l, "https://badexample.com"), NOT);
        assert_eq!(one(&l, "https://a.badexample.com"), NOT);
        assert_eq!(one(&l, "https://a.example.com.evil.net"), NOT);
        assert_eq!(one(&l, "https://a.example.co"), NOT);
        assert_eq!(one(&l, "http://a.example.com"), NOT);
        assert_eq!(one(&l, "https://a.example.com:8443"), NOT);
        assert_eq!(one(&l, "https://.example.com"), BAD);
        // A request origin cannot itself be a pattern.
        assert_eq!(one(&l, "https://*.example.com"), BAD);
        assert_eq!(one(&l, "*"), BAD);
        // With the apex listed too.
        let l = list(&["https://*.example.com", "https://example.com"], false);
        assert_eq!(one(&l, "https://example.com"), Ok(()));
        // With a port.
        let l = list(&["http://*.test:3000"], false);
        assert_eq!(one(&l, "http://a.test:3000"), Ok(()));
        assert_eq!(one(&l, "http://a.test"), NOT);
        assert!(pattern("http://*.test:3000").is_wildcard());
        assert_eq!(
            pattern("HTTP://*.Test:3000").to_string(),
            "http://*.test:3000"
        );
    }

    #[test]
    fn wildcard_must_be_a_whole_leading_label() {
        for text in [
            "https://*example.com",
            "https://a.*.com",
            "https://*.",
            "https://*",
            "https://*.*.example.com",
            "https://**.example.com",
            "https://a*.example.com",
            "https://example.*",
            "*://example.com",
            "https://*..",
        ] {
            let e = OriginPattern::parse(text);
            assert!(
                matches!(
                    e,
                    Err(OriginPatternError::Wildcard | OriginPatternError::Scheme)
                ),
                "{text}: {e:?}"
            );
        }
        assert_eq!(
            error("https://*.1.2.3.4"),
            OriginPatternError::WildcardAddress
        );
        assert_eq!(
            error("https://*.[::1]"),
            OriginPatternError::WildcardAddress
        );
        assert_eq!(error("*"), OriginPatternError::AnyOrigin);
        assert_eq!(error("*.example.com"), OriginPatternError::NoScheme);
    }

    #[test]
    fn ip_literals() {
        let l = list(
            &[
                "http://[::1]:8080",
                "https://127.0.0.1",
                "https://[2001:db8::1]",
            ],
            false,
        );
        assert_eq!(one(&l, "http://[::1]:8080"), Ok(()));
        assert_eq!(one(&l, "http://[0:0:0:0:0:0:0:1]:8080"), Ok(()));
        assert_eq!(one(&l, "http://[::1]"), NOT);
        assert_eq!(one(&l, "http://[::2]:8080"), NOT);
        assert_eq!(one(&l, "https://127.0.0.1"), Ok(()));
        assert_eq!(one(&l, "https://127.0.0.1:443"), Ok(()));
        assert_eq!(one(&l, "https://127.0.0.2"), NOT);
        assert_eq!(one(&l, "https://[2001:DB8::1]"), Ok(()));
        // IPv4 only in the four-decimal form browsers send.
        assert_eq!(one(&l, "https://127.1"), BAD);
        assert_eq!(one(&l, "https://0x7f.0.0.1"), BAD);
        assert_eq!(one(&l, "https://127.000.0.1"), BAD);
        assert_eq!(one(&l, "https://2130706433"), BAD);
        assert_eq!(one(&l, "https://256.0.0.1"), BAD);
        assert_eq!(one(&l, "https://a.0x"), BAD);
        // Not an IPv6 address, or with a zone, or with junk after it.
        assert_eq!(one(&l, "http://[::1"), BAD);
        assert_eq!(one(&l, "http://[::g]:8080"), BAD);
        assert_eq!(one(&l, "http://[fe80::1%25eth0]:8080"), BAD);
        assert_eq!(one(&l, "http://[::1].:8080"), BAD);
        assert_eq!(one(&l, "http://[::1]8080"), BAD);
        assert_eq!(one(&l, "http://::1:8080"), BAD);
        // A name that only starts with digits is a name.
        let l = list(&["https://1password.com", "https://0x.example"], false);
        assert_eq!(one(&l, "https://1password.com"), Ok(()));
        assert_eq!(one(&l, "https://0x.example"), Ok(()));

        assert_eq!(
            pattern("http://[0:0::1]:8080").to_string(),
            "http://[::1]:8080"
        );
        assert_eq!(
            pattern("HTTP://[::FFFF:1.2.3.4]").to_string(),
            "http://[::ffff:1.2.3.4]"
        );
        assert_eq!(pattern("http://1.2.3.4.").to_string(), "http://1.2.3.4");
        assert_eq!(error("http://127.1"), OriginPatternError::Ipv4);
        assert_eq!(error("http://01.2.3.4"), OriginPatternError::Ipv4);
        assert_eq!(error("http://a.123"), OriginPatternError::Ipv4);
        assert_eq!(error("http://[::1"), OriginPatternError::Ipv6);
        assert_eq!(error("http://[fe80::1%eth0]"), OriginPatternError::Ipv6);
        assert_eq!(error("http://[]"), OriginPatternError::Ipv6);
        assert_eq!(error("http://[::1]x"), OriginPatternError::Port);
    }

    #[test]
    fn userinfo_path_query_fragment_are_not_origins() {
        let l = list(&["https://a.com"], false);
        for bad in [
            "https://user@a.com",
            "https://user:pass@a.com",
            "https://a.com@evil.com",
            "https://@a.com",
            "https://a.com/",
            "https://a.com/path",
            "https://a.com:443/",
            "https://a.com?",
            "https://a.com?q=1",
            "https://a.com#",
            "https://a.com#frag",
            "https://a.com\\",
            "https:/a.com",
            "https:a.com",
            "a.com",
            "//a.com",
            "://a.com",
            "https://",
            "https://:443",
        ] {
            assert_eq!(one(&l, bad), BAD, "{bad}");
        }
    }

    #[test]
    fn repeated_and_missing_fields() {
        let strict = list(&["https://a.com"], false);
        let lenient = list(&["https://a.com"], true);
        assert_eq!(check(&strict, &[]), Err(OriginRefusal::Missing));
        assert_eq!(check(&lenient, &[]), Ok(()));
        for l in [&strict, &lenient] {
            assert_eq!(
                check(l, &[b"https://a.com", b"https://a.com"]),
                Err(OriginRefusal::Repeated)
            );
            assert_eq!(
                check(l, &[b"https://a.com", b"https://evil.com"]),
                Err(OriginRefusal::Repeated)
            );
            assert_eq!(
                check(l, &[b"https://a.com", b"https://a.com", b"x"]),
                Err(OriginRefusal::Repeated)
            );
        }
        // Through a header map, the way the caller calls it.
        let mut headers = http::HeaderMap::new();
        assert_eq!(
            strict.check(headers.get_all(http::header::ORIGIN)),
            Err(OriginRefusal::Missing)
        );
        headers.append(
            http::header::ORIGIN,
            HeaderValue::from_static("https://a.com"),
        );
        assert_eq!(strict.check(headers.get_all(http::header::ORIGIN)), Ok(()));
        headers.append(
            http::header::ORIGIN,
            HeaderValue::from_static("https://a.com"),
        );
        assert_eq!(
            strict.check(headers.get_all(http::header::ORIGIN)),
            Err(OriginRefusal::Repeated)
        );
    }

    #[test]
    fn empty_values_and_lists_are_malformed() {
        // Present but empty is not missing, even where missing is allowed.
        let l = list(&["https://a.com", "https://b.com"], true);
        assert_eq!(one(&l, ""), BAD);
        assert_eq!(one(&l, "   "), BAD);
        assert_eq!(one(&l, "\t"), BAD);
        assert_eq!(one(&l, "https://a.com https://b.com"), BAD);
        assert_eq!(one(&l, "https://a.com,https://b.com"), BAD);
        assert_eq!(one(&l, "https://a.com\thttps://b.com"), BAD);
    }

    #[test]
    fn whitespace_around_is_trimmed() {
        let l = list(&["https://a.com"], false);
        assert_eq!(one(&l, " https://a.com"), Ok(()));
        assert_eq!(one(&l, "https://a.com  "), Ok(()));
        assert_eq!(one(&l, "\thttps://a.com\t"), Ok(()));
        assert_eq!(one(&l, "https:// a.com"), BAD);
        assert_eq!(one(&l, "https://a .com"), BAD);
    }

    #[test]
    fn bytes_outside_visible_ascii_are_malformed() {
        let l = list(&["https://a.com", "https://xn--bcher-kva.example"], false);
        for bad in [
            &b"https://b\xc3\xbccher.example"[..],
            b"https://a.com\x80",
            b"https://a.com\xff",
            b"\xffhttps://a.com",
        ] {
            assert_eq!(check(&l, &[bad]), BAD, "{bad:?}");
        }
        // `HeaderValue` holds no DEL or control bytes; the grammar refuses them anyway.
        for bad in [
            &b"https://a\x7f.com"[..],
            b"https://a\0.com",
            b"https://a.com\r",
        ] {
            assert_eq!(parse(bad).err(), Some(Flaw::Whitespace), "{bad:?}");
        }
        assert_eq!(one(&l, "https://xn--bcher-kva.example"), Ok(()));
        assert_eq!(one(&l, "https://XN--BCHER-KVA.EXAMPLE"), Ok(()));
        // Characters that are ASCII but not of a host.
        for bad in [
            "https://a%2e.com",
            "https://a!.com",
            "https://a<b>.com",
            "https://a'.com",
        ] {
            assert_eq!(one(&l, bad), BAD, "{bad}");
        }
    }

    #[test]
    fn lengths_are_dns_lengths() {
        let label = "a".repeat(63);
        let l = list(&[&format!("https://{label}.com"), "https://*.com"], false);
        assert_eq!(one(&l, &format!("https://{label}.com")), Ok(()));
        assert_eq!(one(&l, &format!("https://{label}a.com")), BAD);
        let long = [label.as_str(); 4].join(".");
        assert_eq!(long.len(), 255);
        assert_eq!(one(&l, &format!("https://{long}")), BAD);
        assert_eq!(
            error(&format!("https://{label}a.com")),
            OriginPatternError::LabelTooLong
        );
        assert_eq!(
            error(&format!("https://{long}")),
            OriginPatternError::NameTooLong
        );
        // 253 with one trailing dot is fine.
        let name = format!("{}.{}", [label.as_str(); 3].join("."), "a".repeat(61));
        assert_eq!(name.len(), 253);
        assert_eq!(
            pattern(&format!("https://{name}.")).to_string(),
            format!("https://{name}")
        );
    }

    #[test]
    fn empty_list() {
        let l = OriginList::new(Vec::new(), false);
        assert_eq!(one(&l, "https://a.com"), NOT);
        assert_eq!(check(&l, &[]), Err(OriginRefusal::Missing));
        let l = OriginList::new(Vec::new(), true);
        assert_eq!(one(&l, "https://a.com"), NOT);
        assert_eq!(check(&l, &[]), Ok(()));
        assert_eq!(one(&l, "null"), Err(OriginRefusal::Opaque));
    }

    #[test]
    fn config_errors() {
        use OriginPatternError as E;
        assert_eq!(error(""), E::Empty);
        assert_eq!(error("*"), E::AnyOrigin);
        assert_eq!(error("null"), E::Null);
        assert_eq!(error("https://bücher.example"), E::NonAscii);
        assert_eq!(error(" https://a.com"), E::Whitespace);
        assert_eq!(error("https://a.com "), E::Whitespace);
        assert_eq!(error("https://a.com https://b.com"), E::Whitespace);
        assert_eq!(error("https://a.com\n"), E::Whitespace);
        assert_eq!(error("example.com"), E::NoScheme);
        assert_eq!(error("https:/example.com"), E::NoScheme);
        assert_eq!(error("://example.com"), E::Scheme);
        assert_eq!(error("1http://example.com"), E::Scheme);
        assert_eq!(error("ht_tp://example.com"), E::Scheme);
        assert_eq!(error("https://user@a.com"), E::Userinfo);
        assert_eq!(error("https://user:pw@a.com/"), E::Userinfo);
        assert_eq!(error("https://"), E::EmptyHost);
        assert_eq!(error("https://:8080"), E::EmptyHost);
        assert_eq!(error("https://a..com"), E::EmptyLabel);
        assert_eq!(error("https://.a.com"), E::EmptyLabel);
        assert_eq!(error("https://."), E::EmptyLabel);
        assert_eq!(error("https://a%2ecom"), E::HostCharacter('%'));
        assert_eq!(error("https://a\\b.com"), E::HostCharacter('\\'));
        assert_eq!(error("https://a]b.com"), E::HostCharacter(']'));
        assert_eq!(error("https://a.com:0"), E::Port);
        assert_eq!(error("https://a.com:65536"), E::Port);
        assert_eq!(error("https://a.com:123456"), E::Port);
        assert_eq!(error("https://a.com:http"), E::Port);
        assert_eq!(error("https://a.com:"), E::Port);
        assert_eq!(error("https://a.com:-1"), E::Port);
        assert_eq!(error("https://a.com/"), E::Path("https://a.com".into()));
        assert_eq!(
            error("HTTPS://App.Example.com:443/chat"),
            E::Path("https://app.example.com".into())
        );
        assert_eq!(error("https://a.com?x"), E::Query("https://a.com".into()));
        assert_eq!(
            error("https://a.com#x"),
            E::Fragment("https://a.com".into())
        );
        assert_eq!(
            error("https://a.com:8080/?#"),
            E::Path("https://a.com:8080".into())
        );
        // The authority's own flaw comes first: the suggestion would not parse.
        assert_eq!(error("https://a..com/"), E::EmptyLabel);

        // The messages read after "allowed_origins[i]: ".
        assert_eq!(
            error("https://example.com/").to_string(),
            "a path is not part of an origin (not even \"/\"): write \"https://example.com\""
        );
        assert_eq!(
            error("https://a%b.com").to_string(),
            "'%' cannot be in a host name: letters, digits, '-' and '_' only (an IPv6 address goes \
             between [ ])"
        );
        assert!(
            error("https://bücher.example")
                .to_string()
                .contains("punycode")
        );
        // FromStr is parse.
        assert_eq!(
            "https://a.com".parse::<OriginPattern>(),
            OriginPattern::parse("https://a.com")
        );
    }

    #[test]
    fn display_is_canonical_and_parses_back() {
        for (text, shown) in [
            ("https://app.example.com", "https://app.example.com"),
            ("HTTPS://*.EXAMPLE.COM:443", "https://*.example.com"),
            ("http://localhost:8080", "http://localhost:8080"),
            ("WS://a.b:80", "ws://a.b"),
            ("wss://a.b:80", "wss://a.b:80"),
            ("http://[::1]:8080", "http://[::1]:8080"),
            ("git+ssh://host.name:22", "git+ssh://host.name:22"),
        ] {
            let p = pattern(text);
            assert_eq!(p.to_string(), shown);
            assert_eq!(pattern(shown), p);
        }
        assert_eq!(pattern("WSS://a.b").scheme(), "wss");
    }

    #[test]
    fn labels() {
        use OriginRefusal as R;
        assert_eq!(
            [
                R::Missing,
                R::NotAllowed,
                R::Malformed,
                R::Repeated,
                R::Opaque
            ]
            .map(R::label),
            [
                "origin_missing",
                "origin_not_allowed",
                "origin_malformed",
                "origin_repeated",
                "origin_opaque"
            ]
        );
    }
}
