//! Responses wsgate writes to a client itself, without hyper: the 101 of an upgrade it read itself, and
//! its own short refusals, framed the way hyper frames them.

use std::io::Write;
use std::time::SystemTime;

use http::StatusCode;
use http::header::{self, HeaderMap};

/// A response head and body as HTTP/1.1 bytes, framed the way hyper frames them.
pub fn encode(status: StatusCode, headers: &HeaderMap, body: &[u8], close: bool) -> Vec<u8> {
    let size: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    let mut out = Vec::with_capacity(size + body.len() + 128);
    let reason = status.canonical_reason().unwrap_or("");
    let _ = write!(out, "HTTP/1.1 {} {reason}\r\n", status.as_str());
    for (name, value) in headers {
        // Framing is this function's own; so is `Connection` when it closes the connection.
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || (close && name == header::CONNECTION)
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if status != StatusCode::SWITCHING_PROTOCOLS {
        let _ = write!(out, "content-length: {}\r\n", body.len());
        if !headers.contains_key(header::DATE) {
            let date = httpdate::fmt_http_date(SystemTime::now());
            let _ = write!(out, "date: {date}\r\n");
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;

    #[test]
    fn refusals_are_framed_and_101_is_not() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let bytes = encode(StatusCode::BAD_GATEWAY, &headers, b"no\n", true);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{text}");
        assert!(text.contains("content-length: 3\r\n"), "{text}");
        assert!(!text.contains("99"), "{text}");
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert!(text.contains("date: "), "{text}");
        assert!(text.ends_with("\r\n\r\nno\n"), "{text}");

        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let bytes = encode(StatusCode::SWITCHING_PROTOCOLS, &headers, b"", false);
        assert_eq!(
            bytes,
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"
        );
    }
}
