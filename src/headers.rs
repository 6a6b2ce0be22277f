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
    for name in SINGLETONS {
        let mut values = headers.get_all(name).iter();
        if values.next().is_some() && values.next().is_some() {
            return Err(BadRequest::Repeated(name.as_str()));
        }
    }
    if upgrade
        && (headers.contains_key(header::TRANSFER_ENCODING)
            || headers
                .get(header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes().trim_ascii() != b"0"))
    {
        return Err(BadRequest::UpgradeWithBody);
    }
    Ok(())
}

/// Removes hop-by-hop headers, including every header the `Connection` header lists (except the
/// `PROTECTED` ones).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .filter(|name| !PROTECTED.contains(&name))
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Appends the client to `X-Forwarded-For`, sets `X-Forwarded-Proto`, `X-Forwarded-Host`, `X-Real-IP`
/// and `Forwarded`.
/// Several `X-Forwarded-For` lines are one list (RFC 9110 §5.3): they are joined in order, none dropped.
///
/// `X-Real-IP` and `Forwarded` (RFC 7239) are replaced, not appended to: both are set from the real peer
/// alone, so a client cannot put an address of its choosing where a backend looks for the client's.
/// (`X-Forwarded-For` keeps what came before wsgate, as proxies chain it; its last entry is wsgate's.)
pub fn add_forwarded(headers: &mut HeaderMap, client: IpAddr, tls: bool) {
    let mut forwarded_for: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let client_text = client.to_string();
    forwarded_for.push(&client_text);
    let forwarded_for = forwarded_for.join(", ");
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    let proto = if tls { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    let mut forwarded = match client {
        IpAddr::V4(ip) => format!("for={ip};proto={proto}"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\";proto={proto}"),
    };
    if let Some(host) = headers.get(header::HOST).cloned() {
        // Quoted-string rules (RFC 7239 §4): a host with a quote or backslash is left out, not escaped.
        if let Ok(text) = host.to_str()
            && !text.contains(['"', '\\'])
        {
            let _ = write!(forwarded, ";host=\"{text}\"");
        }
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
    if let Ok(value) = HeaderValue::from_str(&forwarded) {
        headers.insert(header::FORWARDED, value);
    }
    if let Ok(value) = HeaderValue::from_str(&client_text) {
        headers.insert(X_REAL_IP.clone(), value);
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
    }

    #[test]
    fn real_ip_and_forwarded_come_from_the_peer_alone() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("example.com:8080"));
        h.insert("x-real-ip", HeaderValue::from_static("6.6.6.6"));
        h.insert("forwarded", HeaderValue::from_static("for=6.6.6.6"));
        add_forwarded(&mut h, "10.0.0.7".parse().unwrap(), true);
        assert_eq!(h["x-real-ip"], "10.0.0.7");
        assert_eq!(
            h["forwarded"],
            "for=10.0.0.7;proto=https;host=\"example.com:8080\""
        );
        add_forwarded(&mut h, "::1".parse().unwrap(), false);
        assert_eq!(h.get_all("forwarded").iter().count(), 1);
        assert!(
            h["forwarded"]
                .to_str()
                .unwrap()
                .starts_with("for=\"[::1]\";proto=http")
        );
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("example.com"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.1.1.1"));
        add_forwarded(&mut h, "127.0.0.1".parse().unwrap(), false);
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
        add_forwarded(&mut h, "127.0.0.1".parse().unwrap(), true);
        let all: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
        assert_eq!(all, ["10.1.1.1, 10.2.2.2, 10.3.3.3, 127.0.0.1"]);
        assert_eq!(h["x-forwarded-proto"], "https");
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
