//! The request side of sticky balancing: which key a request carries (a cookie, a header, a query parameter
//! or the client's IP) and the `Set-Cookie` that pins a client to its backend.
//!
//! The client IP is read as admission control reads it (`admission::client_ip`), with the pool's own
//! trusted proxies.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::Uri;

use super::sticky;
use crate::admission::client_ip;
use crate::config::StickyKey;

/// What a request brings to the choice of its backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Affinity {
    /// Hash of the sticky key, when the pool is sticky and the request has a key.
    pub(super) key: Option<u64>,
    /// The sticky cookie's value as the client sent it (cookie pools only).
    pub(super) cookie: Option<String>,
}

impl Affinity {
    /// No key: the request is balanced by least-connections.
    pub fn none() -> Affinity {
        Affinity::default()
    }

    /// Reads the key of `source` from a request. Call it before the headers are rewritten for the backend
    /// (`X-Forwarded-For` must still be the client's).
    pub fn of_request(
        source: &StickyKey,
        headers: &HeaderMap,
        uri: &Uri,
        peer: IpAddr,
    ) -> Affinity {
        match source {
            StickyKey::Cookie(name) => match cookie_value(headers, name) {
                Some(value) => Affinity {
                    key: Some(sticky::key_hash(value.as_bytes())),
                    cookie: Some(value.to_string()),
                },
                None => Affinity::none(),
            },
            StickyKey::Header(name) => Affinity::keyed(
                headers
                    .get(name)
                    .map(|v| v.as_bytes().trim_ascii())
                    .filter(|v| !v.is_empty()),
            ),
            StickyKey::Query(name) => Affinity::keyed(query_value(uri, name).map(str::as_bytes)),
            StickyKey::SourceIp { trusted_proxies } => {
                let ip = client_ip(peer, headers, trusted_proxies);
                let bytes = match ip {
                    IpAddr::V4(v4) => v4.octets().to_vec(),
                    IpAddr::V6(v6) => v6.octets().to_vec(),
                };
                Affinity::keyed(Some(&bytes))
            }
        }
    }

    fn keyed(key: Option<&[u8]>) -> Affinity {
        Affinity {
            key: key.map(sticky::key_hash),
            cookie: None,
        }
    }

    /// Whether the request has a key (else it is balanced by least-connections).
    pub fn has_key(&self) -> bool {
        self.key.is_some()
    }
}

/// The value of cookie `name` in the request's `Cookie` headers (the first one, if several).
pub fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.split_once('='))
        .find(|(n, _)| n.trim() == name)
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|v| !v.is_empty())
}

/// The raw value of query parameter `name` (not percent-decoded: it is only hashed), if present and not empty.
fn query_value<'u>(uri: &'u Uri, name: &str) -> Option<&'u str> {
    uri.query()?
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// `Set-Cookie` pinning a client to the backend with cookie value `token`.
pub fn set_cookie(name: &str, token: &str, tls: bool) -> Option<HeaderValue> {
    let secure = if tls { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={token}; Path=/; HttpOnly; SameSite=Lax{secure}"
    ))
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn cookie_is_found_among_others() {
        let h = headers(&[("cookie", "a=1; wsg=abc ; b=2"), ("cookie", "wsg=later")]);
        assert_eq!(cookie_value(&h, "wsg"), Some("abc"));
        assert_eq!(cookie_value(&h, "a"), Some("1"));
        assert_eq!(cookie_value(&h, "ws"), None);
        assert_eq!(cookie_value(&headers(&[("cookie", "wsg=")]), "wsg"), None);
    }

    #[test]
    fn query_parameter_by_exact_name() {
        let uri: Uri = "/ws?x=1&room=42&roomy=7".parse().expect("uri");
        assert_eq!(query_value(&uri, "room"), Some("42"));
        assert_eq!(query_value(&uri, "roo"), None);
        let uri: Uri = "/ws?room=&x".parse().expect("uri");
        assert_eq!(query_value(&uri, "room"), None);
        assert_eq!(query_value(&"/ws".parse().expect("uri"), "room"), None);
    }

    #[test]
    fn keys_from_each_source() {
        let h = headers(&[("x-user-id", " alice "), ("cookie", "wsg=0123456789abcdef")]);
        let uri: Uri = "/ws?room=7".parse().expect("uri");
        let peer = ip("192.0.2.1");
        let header = Affinity::of_request(
            &StickyKey::Header(http::HeaderName::from_static("x-user-id")),
            &h,
            &uri,
            peer,
        );
        assert_eq!(header.key, Some(sticky::key_hash(b"alice")));
        let query = Affinity::of_request(&StickyKey::Query("room".into()), &h, &uri, peer);
        assert_eq!(query.key, Some(sticky::key_hash(b"7")));
        let cookie = Affinity::of_request(&StickyKey::Cookie("wsg".into()), &h, &uri, peer);
        assert_eq!(cookie.cookie.as_deref(), Some("0123456789abcdef"));
        let missing = Affinity::of_request(&StickyKey::Cookie("other".into()), &h, &uri, peer);
        assert!(!missing.has_key());
        let by_ip = Affinity::of_request(
            &StickyKey::SourceIp {
                trusted_proxies: vec![],
            },
            &h,
            &uri,
            peer,
        );
        assert_eq!(by_ip.key, Some(sticky::key_hash(&[192, 0, 2, 1])));
    }

    #[test]
    fn cookie_flags() {
        let plain = set_cookie("wsg", "0123456789abcdef", false).expect("valid");
        assert_eq!(
            plain,
            "wsg=0123456789abcdef; Path=/; HttpOnly; SameSite=Lax"
        );
        let tls = set_cookie("wsg", "0123456789abcdef", true).expect("valid");
        assert!(tls.to_str().expect("ascii").ends_with("; Secure"));
    }
}
