//! Client request heads: the first request of a connection, read by wsgate itself (`parse`, used by
//! `server::connection`), and the size of a head as sent (for `limits.max_header_size`).

use std::mem::MaybeUninit;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Version};

use super::MAX_HEADERS;
use crate::headers::has_token;

/// How the bytes read so far begin.
// A short-lived local of one parse: its size does not matter, an allocation per upgrade would.
#[allow(clippy::large_enum_variant)]
pub enum First {
    /// The head is not complete yet.
    Partial,
    /// A WebSocket upgrade wsgate handles itself: the request and the length of its head.
    Upgrade(http::request::Parts, usize),
    /// Anything else: hyper's to serve.
    Other,
}

/// Reads a request head from the start of `buf`; only upgrades are taken apart.
pub fn parse(buf: &[u8]) -> First {
    // Uninitialised slots: filling a hundred empty ones writes 3 KiB before every first request is parsed.
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return First::Partial,
        Err(_) => return First::Other,
    };
    if request.method != Some("GET") || request.version != Some(1) {
        return First::Other;
    }
    let mut map = HeaderMap::with_capacity(request.headers.len());
    for h in request.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return First::Other;
        };
        map.append(name, value);
    }
    if !has_token(&map, header::UPGRADE, "websocket")
        || !has_token(&map, header::CONNECTION, "upgrade")
    {
        return First::Other;
    }
    let Some(Ok(uri)) = request.path.map(str::parse::<http::Uri>) else {
        return First::Other;
    };
    let mut req = Request::new(());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = map;
    First::Upgrade(req.into_parts().0, len)
}

/// The size of a request head as sent: request line, header lines, blank line.
///
/// Rebuilt from the parsed request, for heads hyper read (its parser does not say how long they were).
pub fn head_size<B>(req: &Request<B>) -> usize {
    let target = req.uri().authority().map_or(0, |a| a.as_str().len() + 7)
        + req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    let request_line = req.method().as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let headers: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    request_line + headers + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &[u8] =
        b"GET /chat?room=1 HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn a_clean_upgrade_is_taken_apart() {
        let mut bytes = UPGRADE.to_vec();
        bytes.extend_from_slice(b"\x81\x80early");
        let First::Upgrade(parts, len) = parse(&bytes) else {
            panic!("not recognised as an upgrade");
        };
        assert_eq!(len, UPGRADE.len());
        assert_eq!(parts.uri, "/chat?room=1");
        assert_eq!(parts.headers[header::HOST], "example.com");
        assert_eq!(parts.headers.len(), 5);
    }

    #[test]
    fn an_incomplete_head_asks_for_more() {
        assert!(matches!(parse(&UPGRADE[..40]), First::Partial));
        assert!(matches!(parse(b""), First::Partial));
    }

    #[test]
    fn everything_else_is_left_to_hyper() {
        let other = |bytes: &[u8]| matches!(parse(bytes), First::Other);
        assert!(other(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(other(
            b"POST / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
        ));
        assert!(other(
            b"GET / HTTP/1.0\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
        ));
        assert!(other(
            b"GET / HTTP/1.1\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"
        ));
        assert!(other(b"GET /\x01 HTTP/1.1\r\n\r\n"));
        let mut many = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(other(&many));
    }
}
