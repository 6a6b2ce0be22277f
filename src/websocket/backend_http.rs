//! The backend side of the opening handshake, spoken directly on the socket: one write for the request
//! head, `httparse` for the answer.
//!
//! A general HTTP client would cost a connection task, a channel and two 8 KiB buffers per handshake, all
//! thrown away once the answer is a 101 — a handshake's whole job. Here the answer head is read into one
//! small buffer; bytes the backend sent behind its 101 stay with the tunnel. A refusal (any other status)
//! is read whole, up to `MAX_RELAYED_BODY`, and relayed as it is.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest answer head accepted from a backend.
const MAX_HEAD: usize = 64 << 10;
/// Largest body of a refusal relayed to the client (error pages are small).
const MAX_RELAYED_BODY: usize = 1 << 20;
/// Headers accepted in one answer head.
const MAX_HEADERS: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum BackendHttpError {
    #[error("backend connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("backend closed the connection before answering in full")]
    Closed,
    #[error("backend answer is not valid HTTP/1.1: {0}")]
    Invalid(&'static str),
}

/// A backend's answer head, and the bytes read past it.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub rest: Vec<u8>,
}

/// Writes a GET request head for `target` with `headers`.
pub async fn send_request(
    stream: &mut TcpStream,
    target: &Uri,
    headers: &HeaderMap,
) -> Result<(), BackendHttpError> {
    let path = target.path_and_query().map_or("/", |p| p.as_str());
    let size = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>();
    let mut head = Vec::with_capacity(path.len() + size + 32);
    head.extend_from_slice(b"GET ");
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    stream.write_all(&head).await?;
    Ok(())
}

/// Reads the answer head, skipping informational answers other than 101.
pub async fn read_answer(stream: &mut TcpStream) -> Result<Answer, BackendHttpError> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        if let Some((status, headers, used)) = parse_head(&buf)? {
            buf.drain(..used);
            if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                continue;
            }
            return Ok(Answer {
                status,
                headers,
                rest: buf,
            });
        }
        if buf.len() > MAX_HEAD {
            return Err(BackendHttpError::Invalid("answer head too large"));
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(BackendHttpError::Closed);
        }
    }
}

/// Parses a complete head at the start of `buf`: status, headers, and the bytes it took.
fn parse_head(buf: &[u8]) -> Result<Option<(StatusCode, HeaderMap, usize)>, BackendHttpError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut slots);
    let used = match response.parse(buf) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(BackendHttpError::Invalid("malformed head")),
    };
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(BackendHttpError::Invalid("bad status code"))?;
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    for h in response.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| BackendHttpError::Invalid("bad header name"))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| BackendHttpError::Invalid("bad header value"))?;
        headers.append(name, value);
    }
    Ok(Some((status, headers, used)))
}

/// Reads the body of a refusal (`answer` is not a 101), whole. The framing headers are removed from
/// `answer.headers`: the client's connection frames the relayed body itself.
pub async fn read_body(
    stream: &mut TcpStream,
    answer: &mut Answer,
) -> Result<Bytes, BackendHttpError> {
    let headers = &mut answer.headers;
    let chunked = headers.get_all(header::TRANSFER_ENCODING).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.to_ascii_lowercase().contains("chunked"))
    });
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::CONTENT_LENGTH);
    let mut buf = std::mem::take(&mut answer.rest);
    if matches!(answer.status.as_u16(), 204 | 304) {
        return Ok(Bytes::new());
    }
    if chunked {
        return read_chunked(stream, buf).await;
    }
    match length {
        Some(length) if length > MAX_RELAYED_BODY => {
            Err(BackendHttpError::Invalid("body too large to relay"))
        }
        Some(length) => {
            while buf.len() < length {
                if stream.read_buf(&mut buf).await? == 0 {
                    return Err(BackendHttpError::Closed);
                }
            }
            buf.truncate(length);
            Ok(Bytes::from(buf))
        }
        // No framing: the body ends when the backend closes the connection.
        None => loop {
            if buf.len() > MAX_RELAYED_BODY {
                return Err(BackendHttpError::Invalid("body too large to relay"));
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Ok(Bytes::from(buf));
            }
        },
    }
}

/// Decodes a chunked body (RFC 9112 §7.1); extensions and trailers are dropped.
async fn read_chunked(stream: &mut TcpStream, mut buf: Vec<u8>) -> Result<Bytes, BackendHttpError> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        match decode_chunk(&buf[pos..])? {
            Chunk::Incomplete => {
                if buf.len() - pos > MAX_RELAYED_BODY + MAX_HEAD {
                    return Err(BackendHttpError::Invalid("body too large to relay"));
                }
                if stream.read_buf(&mut buf).await? == 0 {
                    return Err(BackendHttpError::Closed);
                }
            }
            Chunk::Data { start, len, next } => {
                if body.len() + len > MAX_RELAYED_BODY {
                    return Err(BackendHttpError::Invalid("body too large to relay"));
                }
                body.extend_from_slice(&buf[pos + start..pos + start + len]);
                pos += next;
            }
            Chunk::Last => return Ok(Bytes::from(body)),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    Incomplete,
    /// Data at `start..start + len`; the next chunk begins at `next`.
    Data {
        start: usize,
        len: usize,
        next: usize,
    },
    /// The zero-size chunk: the body is complete (trailers are not waited for).
    Last,
}

fn decode_chunk(buf: &[u8]) -> Result<Chunk, BackendHttpError> {
    let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(Chunk::Incomplete);
    };
    let line = std::str::from_utf8(&buf[..line_end])
        .map_err(|_| BackendHttpError::Invalid("bad chunk size"))?;
    let size_text = line.split(';').next().unwrap_or_default().trim();
    let len = usize::from_str_radix(size_text, 16)
        .map_err(|_| BackendHttpError::Invalid("bad chunk size"))?;
    if len == 0 {
        return Ok(Chunk::Last);
    }
    let start = line_end + 2;
    let next = start
        .checked_add(len)
        .and_then(|end| end.checked_add(2))
        .ok_or(BackendHttpError::Invalid("bad chunk size"))?;
    if buf.len() < next {
        return Ok(Chunk::Incomplete);
    }
    if &buf[next - 2..next] != b"\r\n" {
        return Err(BackendHttpError::Invalid("chunk not followed by CRLF"));
    }
    Ok(Chunk::Data { start, len, next })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_with_their_length() {
        let text = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: x\r\n\r\n\x81\x02hi";
        let (status, headers, used) = parse_head(text).unwrap().unwrap();
        assert_eq!(status, StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(headers["upgrade"], "websocket");
        assert_eq!(&text[used..], b"\x81\x02hi");
        assert!(parse_head(&text[..20]).unwrap().is_none());
        assert!(parse_head(b"NOT HTTP\r\n\r\n").is_err());
    }

    #[test]
    fn chunks_decode_in_pieces() {
        let body = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n";
        let mut pos = 0;
        let mut out = Vec::new();
        loop {
            match decode_chunk(&body[pos..]).unwrap() {
                Chunk::Data { start, len, next } => {
                    out.extend_from_slice(&body[pos + start..pos + start + len]);
                    pos += next;
                }
                Chunk::Last => break,
                Chunk::Incomplete => panic!("complete input"),
            }
        }
        assert_eq!(out, b"hello, world");
        assert_eq!(decode_chunk(b"5\r\nhel").unwrap(), Chunk::Incomplete);
        assert_eq!(decode_chunk(b"5").unwrap(), Chunk::Incomplete);
        assert!(decode_chunk(b"zz\r\n").is_err());
        assert!(decode_chunk(b"2\r\nabXY").is_err());
    }
}
