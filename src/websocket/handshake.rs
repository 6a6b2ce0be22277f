//! The WebSocket opening handshake's rules (RFC 6455 §4), as pure functions: what an upgrade request is,
//! whether its key and version are acceptable, and the `Sec-WebSocket-Accept` that answers a key. The
//! proxy's handshake with a backend (`proxy::upgrade`) and the health probe use them.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Version};
use sha1::{Digest, Sha1};

use crate::headers::has_token;

const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (§4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key);
    sha1.update(WEBSOCKET_GUID.as_bytes());
    BASE64.encode(sha1.finalize())
}

/// Whether a backend's 101 carries the right `Sec-WebSocket-Accept` for the key that was sent.
pub fn accepts(headers: &HeaderMap, key: &[u8]) -> bool {
    let expected = accept_key(key);
    headers
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .is_some_and(|v| v.as_bytes() == expected.as_bytes())
}

/// A WebSocket upgrade: GET over HTTP/1.1 with `Upgrade: websocket` and `Connection: upgrade` (§4.2.1).
pub fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    req.method() == Method::GET
        && req.version() == Version::HTTP_11
        && has_token(req.headers(), header::UPGRADE, "websocket")
        && has_token(req.headers(), header::CONNECTION, "upgrade")
}

/// Why an upgrade request is refused before any backend is involved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("missing or malformed Sec-WebSocket-Key")]
    BadKey,
    #[error("unsupported Sec-WebSocket-Version")]
    BadVersion,
}

/// Checks the client's key and version; returns the key.
pub fn validate(headers: &HeaderMap) -> Result<HeaderValue, Rejection> {
    validate_version(headers)?;
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or(Rejection::BadKey)?;
    match BASE64.decode(key.as_bytes().trim_ascii()) {
        Ok(nonce) if nonce.len() == 16 => Ok(key.clone()),
        _ => Err(Rejection::BadKey),
    }
}

/// Checks the client's `Sec-WebSocket-Version`: 13 is the only one there is. A WebSocket over HTTP/2
/// (RFC 8441 §5) has no key to check, only this.
pub fn validate_version(headers: &HeaderMap) -> Result<(), Rejection> {
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes().trim_ascii() == b"13");
    if version_ok {
        Ok(())
    } else {
        Err(Rejection::BadVersion)
    }
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes in base64 (§4.1), for a handshake wsgate starts itself
/// (toward a backend, for an HTTP/2 client that sends none).
pub fn new_key() -> HeaderValue {
    let nonce: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
    HeaderValue::from_str(&BASE64.encode(nonce)).expect("base64 is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn key_and_version_are_checked() {
        let mut h = HeaderMap::new();
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        assert_eq!(validate(&h), Err(Rejection::BadKey));
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("c2hvcnQ="),
        );
        assert_eq!(validate(&h), Err(Rejection::BadKey));
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert!(validate(&h).is_ok());
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("12"),
        );
        assert_eq!(validate(&h), Err(Rejection::BadVersion));
    }

    #[test]
    fn fresh_keys_are_valid_and_differ() {
        let (a, b) = (new_key(), new_key());
        assert_ne!(a, b);
        let mut h = HeaderMap::new();
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        h.insert(header::SEC_WEBSOCKET_KEY, a);
        assert!(validate(&h).is_ok());
    }
}
