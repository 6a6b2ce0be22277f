//! The first request on a plain client connection, read by wsgate itself before hyper is involved.
//!
//! Most WebSocket clients open a connection for the upgrade alone. For those, hyper's connection
//! machinery (its 8 KiB read buffer, a write buffer, an upgrade channel and a second task for the tunnel)
//! is set up only to be thrown away after one request, and its buffers, freed while the tunnel's state
//! stays, leave the heap fragmented: idle tunnels cost more memory than they hold. So the first request
//! head is read here into a small buffer; an upgrade (GET, HTTP/1.1) is checked, handshaken and
//! tunnelled in this same task. Anything else (other requests, malformed heads, bodies, refusals'
//! follow-ups) goes to hyper with the bytes already read replayed in front of the stream, so HTTP
//! behaviour, error answers included, stays hyper's.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::body::ProxyBody;
use crate::client_io::{ClientIo, Replay};
use crate::config::Config;
use crate::dispatch::{bad_request, find_route};
use crate::gateway::Shared;
use crate::headers::{check_request, has_token};
use crate::listener::{ClientConn, serve_http};
use crate::websocket::{self, ClientSide, Handshake};

/// Capacity of the first read: a browser's upgrade request is 400–800 bytes.
const FIRST_READ: usize = 2048;
/// Headers accepted in one request head; hyper's own limit, so both paths accept the same requests.
pub const MAX_HEADERS: usize = 100;

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

/// Serves a plain client connection: the first request here if it is an upgrade, the rest through hyper.
pub async fn serve(
    mut io: ClientIo,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
    config: Arc<Config>,
) {
    // hyper refuses a head that does not fit its buffer with 431; stop reading at the same size and let
    // it give that answer.
    let limit = config.limits.max_header_size.max(8192);
    let mut buf = Vec::with_capacity(FIRST_READ);
    let (parts, head_len) = loop {
        let read = tokio::select! {
            read = io.read_buf(&mut buf) => read,
            _ = shared.shutdown.cancelled() => return,
        };
        match read {
            // Gone before a whole head, or the header timeout (`ClientIo`): nothing to answer.
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        match parse(&buf) {
            First::Upgrade(parts, len) => break (parts, len),
            First::Partial if buf.len() < limit => continue,
            _ => {
                let io = Replay::new(io, Bytes::from(buf));
                return Box::pin(serve_http(io, conn, shared, &config)).await;
            }
        }
    };
    conn.phase.busy();
    let write_timeout = config.timeouts.handshake;
    if let Err(bad) = check_request(&parts.headers, true) {
        // Whatever follows the head (a body of unknown framing) is not read: the connection closes.
        let _ = send(&mut io, bad_request(&shared, bad), true, write_timeout).await;
        return;
    }
    // Usually nothing: a client waits for the 101 before it sends frames.
    let early = Bytes::copy_from_slice(&buf[head_len..]);
    drop(buf);
    let close_after = has_token(&parts.headers, header::CONNECTION, "close");

    let state = shared.state.load_full();
    let handshake = match find_route(&state, &shared, head_len, &parts.uri, &parts.headers) {
        Ok(route) => {
            let handshake = websocket::handshake(parts, route, &state.config, &conn, &shared);
            tokio::select! {
                handshake = handshake => handshake,
                () = hung_up(io.stream()) => {
                    // Nobody is left to answer: the backend connection is dropped now, not when the
                    // handshake timeout ends it, and the backend is not blamed.
                    tracing::debug!(client = %conn.peer, "client gone during the upgrade handshake");
                    return;
                }
            }
        }
        Err(refusal) => Handshake::Refused(refusal.response()),
    };
    // Held for the handshake only: a connection that goes on to hyper loads the state per request, and
    // must not keep an old configuration's pools alive while it stays open.
    drop(state);
    match handshake {
        Handshake::Switching(response, splice) => {
            if let Err(error) = send(&mut io, response, false, write_timeout).await {
                tracing::debug!(client = %conn.peer, %error, "client gone before its 101");
                return;
            }
            // The tunnel gets a task of its own, sized for the tunnel alone: this one also had to hold
            // the handshake's state, which an idle tunnel would otherwise carry for its whole life.
            let client = ClientSide::Plain(io.into_stream(), early);
            let shared2 = Arc::clone(&shared);
            if let Some(tunnel) = splice.run(client, conn, shared2) {
                shared.tasks.spawn(tunnel);
            }
        }
        Handshake::Refused(response) => {
            if send(&mut io, response, close_after, write_timeout)
                .await
                .is_err()
                || close_after
            {
                return;
            }
            conn.phase.idle();
            let io = Replay::new(io, early);
            Box::pin(serve_http(io, conn, shared, &config)).await;
        }
    }
}

/// Resolves when the client closes its side (EOF or error) while its upgrade waits on a backend. A
/// client that sends bytes meanwhile (frames behind its request) is not watched further: they stay
/// unread in the socket for the tunnel.
async fn hung_up(stream: &tokio::net::TcpStream) {
    let mut probe = [0u8; 1];
    match stream.peek(&mut probe).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Reads a request head from the start of `buf`; only upgrades are taken apart.
pub fn parse(buf: &[u8]) -> First {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
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

/// Writes a whole response: the 101, or a refusal whose body is already in memory.
async fn send(
    io: &mut ClientIo,
    response: Response<ProxyBody>,
    close: bool,
    timeout: Duration,
) -> std::io::Result<()> {
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let bytes = encode(parts.status, &parts.headers, &body, close);
    tokio::time::timeout(timeout, io.write_all(&bytes))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client write timed out"))?
}

/// A response head and body as HTTP/1.1 bytes, framed the way hyper frames them.
fn encode(status: StatusCode, headers: &HeaderMap, body: &[u8], close: bool) -> Vec<u8> {
    let size: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    let mut out = Vec::with_capacity(size + body.len() + 128);
    let reason = status.canonical_reason().unwrap_or("");
    let _ = write!(out, "HTTP/1.1 {} {reason}\r\n", status.as_str());
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
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
