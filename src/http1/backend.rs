//! wsgate as the client of a backend for the WebSocket opening handshake, spoken directly on the socket:
//! one write for the request head, `httparse` for the answer.
//!
//! A general HTTP client would cost a connection task, a channel and two buffers per handshake, all
//! thrown away once the answer is a 101 — a handshake's whole job. Here the answer head is read into one
//! small buffer; bytes the backend sent behind its 101 stay with the tunnel. A refusal (any other status)
//! is read whole, up to `MAX_RELAYED_BODY`, and relayed as it is.
//!
//! Everything here is bounded by what it holds, not by what it reads: the head by `MAX_HEAD`, a body by
//! `MAX_RELAYED_BODY` of decoded bytes (a chunked body's framing is decoded as it arrives and never kept).

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{MAX_CHUNK_LINE, MAX_HEAD, MAX_HEADERS, MAX_RELAYED_BODY};

/// Bytes asked of the socket per read.
const READ_SIZE: usize = 8192;

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

/// Writes a GET request head for `target` with `headers`, and flushes it (a TLS session may hold what
/// it was given until then).
pub async fn send_request<S: AsyncWrite + Unpin>(
    stream: &mut S,
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
    stream.flush().await?;
    Ok(())
}

/// Reads the answer head, skipping informational answers other than 101.
///
/// What is held never exceeds `MAX_HEAD` bytes: reads are cut to the room left, and the head is parsed
/// only once its blank line has arrived (searched for in the new bytes alone), so a backend that trickles
/// a large head byte by byte costs linear time, not quadratic.
pub async fn read_answer<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Answer, BackendHttpError> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut searched = 0;
    loop {
        if head_ends_in(&buf, searched)
            && let Some((status, headers, used)) = parse_head(&buf)?
        {
            buf.drain(..used);
            searched = 0;
            if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                continue;
            }
            return Ok(Answer {
                status,
                headers,
                rest: buf,
            });
        }
        searched = buf.len();
        let room = MAX_HEAD - buf.len();
        if room == 0 {
            return Err(BackendHttpError::Invalid("answer head too large"));
        }
        let read = (&mut *stream)
            .take(room.min(READ_SIZE) as u64)
            .read_buf(&mut buf)
            .await?;
        if read == 0 {
            return Err(BackendHttpError::Closed);
        }
    }
}

/// Whether a head's end (an empty line, CRLF or bare LF as httparse accepts) may be in `buf`, given that
/// `buf[..searched]` held none.
fn head_ends_in(buf: &[u8], searched: usize) -> bool {
    let from = searched.saturating_sub(3);
    let tail = &buf[from..];
    tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n")
}

/// Parses a complete head at the start of `buf`: status, headers, and the bytes it took.
pub fn parse_head(buf: &[u8]) -> Result<Option<(StatusCode, HeaderMap, usize)>, BackendHttpError> {
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
pub async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    answer: &mut Answer,
) -> Result<Bytes, BackendHttpError> {
    let mut decoder = BodyDecoder::new(answer.status, &mut answer.headers)?;
    decoder.feed(&std::mem::take(&mut answer.rest))?;
    // On the heap: a refusal is rare, and the handshake's future is part of every connection's task.
    let mut buf = vec![0u8; READ_SIZE];
    while !decoder.is_done() {
        let read = stream.read(&mut buf).await?;
        if read == 0 {
            return decoder.finish_at_eof();
        }
        decoder.feed(&buf[..read])?;
    }
    Ok(decoder.into_body())
}

/// How a refusal's body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Exactly this many more bytes.
    Length(usize),
    Chunked(ChunkState),
    /// Whatever comes until the backend closes the connection.
    UntilClose,
    Done,
}

/// Where a chunked body's decoder is (RFC 9112 §7.1). It holds no undecoded bytes: a chunk-size line
/// is taken apart byte by byte as it arrives, so extensions and line noise cost nothing held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hex size; `digits` so far.
    Size { size: usize, digits: usize },
    /// Past the size, in whitespace or extensions, `len` bytes of them so far, until CR.
    Extension { size: usize, len: usize },
    /// CR of the size line seen; LF expected.
    SizeLf { size: usize },
    /// In a chunk's data, this much left.
    Data { left: usize },
    /// Data done; CR expected.
    DataCr,
    /// CR after data seen; LF expected.
    DataLf,
}

/// Decodes a refusal's body from bytes fed to it in pieces of any size.
///
/// What it holds is the decoded body alone, never over `MAX_RELAYED_BODY`: raw bytes are consumed as
/// fed. Trailers after the last chunk are not waited for (the connection is not reused).
#[derive(Debug)]
pub struct BodyDecoder {
    framing: Framing,
    body: Vec<u8>,
}

impl BodyDecoder {
    /// Takes the framing from `headers` and removes the framing headers from them.
    pub fn new(
        status: StatusCode,
        headers: &mut HeaderMap,
    ) -> Result<BodyDecoder, BackendHttpError> {
        let encodings: Vec<String> = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| !v.is_empty())
            .collect();
        let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
        let length = match (lengths.next(), lengths.next()) {
            (None, _) => None,
            (Some(value), None) => Some(
                std::str::from_utf8(value.as_bytes())
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or(BackendHttpError::Invalid("bad content-length"))?,
            ),
            (Some(_), Some(_)) => return Err(BackendHttpError::Invalid("repeated content-length")),
        };
        let has_encoding = headers.contains_key(header::TRANSFER_ENCODING);
        headers.remove(header::TRANSFER_ENCODING);
        headers.remove(header::CONTENT_LENGTH);
        let framing = if matches!(status.as_u16(), 204 | 304) || status.is_informational() {
            Framing::Done
        } else if has_encoding {
            // Transfer-Encoding overrides Content-Length (§6.3); an encoding other than chunked last
            // means the body runs until the connection closes.
            if encodings.last().is_some_and(|e| e == "chunked") {
                Framing::Chunked(ChunkState::Size { size: 0, digits: 0 })
            } else {
                Framing::UntilClose
            }
        } else {
            match length {
                Some(n) if n > MAX_RELAYED_BODY as u64 => {
                    return Err(BackendHttpError::Invalid("body too large to relay"));
                }
                Some(0) => Framing::Done,
                Some(n) => Framing::Length(n as usize),
                None => Framing::UntilClose,
            }
        };
        Ok(BodyDecoder {
            framing,
            body: Vec::new(),
        })
    }

    /// The body is complete: nothing more is to be read.
    pub fn is_done(&self) -> bool {
        self.framing == Framing::Done
    }

    /// Bytes held: the decoded body so far.
    pub fn held(&self) -> usize {
        self.body.len()
    }

    pub fn into_body(self) -> Bytes {
        Bytes::from(self.body)
    }

    /// The backend closed its connection: the body is complete if its framing says it ends so.
    pub fn finish_at_eof(self) -> Result<Bytes, BackendHttpError> {
        match self.framing {
            Framing::UntilClose | Framing::Done => Ok(self.into_body()),
            _ => Err(BackendHttpError::Closed),
        }
    }

    /// Decodes `input`; bytes after the body's end are ignored.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<(), BackendHttpError> {
        while !input.is_empty() {
            match &mut self.framing {
                Framing::Done => return Ok(()),
                Framing::UntilClose => {
                    self.take(input)?;
                    return Ok(());
                }
                Framing::Length(left) => {
                    let n = (*left).min(input.len());
                    *left -= n;
                    if *left == 0 {
                        self.framing = Framing::Done;
                    }
                    self.take(&input[..n])?;
                    input = &input[n..];
                }
                Framing::Chunked(ChunkState::Data { left }) => {
                    let n = (*left).min(input.len());
                    *left -= n;
                    if *left == 0 {
                        self.framing = Framing::Chunked(ChunkState::DataCr);
                    }
                    self.take(&input[..n])?;
                    input = &input[n..];
                }
                Framing::Chunked(state) => {
                    let next = chunk_byte(*state, input[0], self.body.len())?;
                    self.framing = next;
                    input = &input[1..];
                }
            }
        }
        Ok(())
    }

    fn take(&mut self, bytes: &[u8]) -> Result<(), BackendHttpError> {
        if self.body.len() + bytes.len() > MAX_RELAYED_BODY {
            return Err(BackendHttpError::Invalid("body too large to relay"));
        }
        self.body.extend_from_slice(bytes);
        Ok(())
    }
}

/// One byte of a chunked body outside chunk data; `decoded` is the body's length so far.
fn chunk_byte(state: ChunkState, byte: u8, decoded: usize) -> Result<Framing, BackendHttpError> {
    let bad = |what| Err(BackendHttpError::Invalid(what));
    let next = match (state, byte) {
        (ChunkState::Size { size, digits }, _) if byte.is_ascii_hexdigit() => {
            let digit = (byte as char).to_digit(16).unwrap_or(0) as usize;
            let size = size * 16 + digit;
            if decoded + size > MAX_RELAYED_BODY {
                return bad("body too large to relay");
            }
            ChunkState::Size {
                size,
                digits: digits + 1,
            }
        }
        (ChunkState::Size { digits: 0, .. }, _) => return bad("bad chunk size"),
        (ChunkState::Size { size, .. }, b'\r') => ChunkState::SizeLf { size },
        (ChunkState::Size { size, .. }, b';' | b' ' | b'\t') => {
            ChunkState::Extension { size, len: 1 }
        }
        (ChunkState::Size { .. }, _) => return bad("bad chunk size"),
        (ChunkState::Extension { size, .. }, b'\r') => ChunkState::SizeLf { size },
        (ChunkState::Extension { .. }, b'\n') => return bad("bare LF in a chunk-size line"),
        (ChunkState::Extension { len, .. }, _) if len >= MAX_CHUNK_LINE => {
            return bad("chunk extension too long");
        }
        (ChunkState::Extension { size, len }, _) => ChunkState::Extension { size, len: len + 1 },
        (ChunkState::SizeLf { size: 0 }, b'\n') => return Ok(Framing::Done),
        (ChunkState::SizeLf { size }, b'\n') => ChunkState::Data { left: size },
        (ChunkState::SizeLf { .. }, _) => return bad("chunk-size line not ended by CRLF"),
        (ChunkState::DataCr, b'\r') => ChunkState::DataLf,
        (ChunkState::DataLf, b'\n') => ChunkState::Size { size: 0, digits: 0 },
        (ChunkState::DataCr | ChunkState::DataLf, _) => return bad("chunk not followed by CRLF"),
        // Data is consumed by `feed`, never a byte at a time.
        (ChunkState::Data { .. }, _) => return bad("chunk data out of place"),
    };
    Ok(Framing::Chunked(next))
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

    /// Decodes `raw` fed in pieces of `step` bytes; the decoder's hold is checked after every piece.
    fn decode(
        headers: &[(&str, &str)],
        raw: &[u8],
        step: usize,
    ) -> Result<Bytes, BackendHttpError> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let mut decoder = BodyDecoder::new(StatusCode::BAD_REQUEST, &mut map)?;
        assert!(!map.contains_key(header::TRANSFER_ENCODING));
        assert!(!map.contains_key(header::CONTENT_LENGTH));
        for piece in raw.chunks(step.max(1)) {
            decoder.feed(piece)?;
            assert!(decoder.held() <= MAX_RELAYED_BODY);
            if decoder.is_done() {
                return Ok(decoder.into_body());
            }
        }
        decoder.finish_at_eof()
    }

    const CHUNKED: &[(&str, &str)] = &[("transfer-encoding", "chunked")];

    #[test]
    fn chunked_bodies_decode_in_pieces_of_any_size() {
        let raw = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n";
        for step in 1..=raw.len() {
            assert_eq!(
                decode(CHUNKED, raw, step).unwrap(),
                "hello, world",
                "step {step}"
            );
        }
        // Bytes behind the last chunk (trailers, pipelined junk) are not waited for or kept.
        let raw = b"1\r\nx\r\n0\r\nTrailer: 1\r\n";
        assert_eq!(decode(CHUNKED, raw, 3).unwrap(), "x");
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for raw in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"2\r\nabXY",
            b"2\nab\r\n0\r\n\r\n",
            b"2;a\nb\r\n",
            b"5\r\nhel",
        ] {
            assert!(
                decode(CHUNKED, raw, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn chunk_extensions_cost_nothing_held_and_are_bounded() {
        // A one-byte chunk behind a long extension, many times over: the decoded body stays one byte a
        // chunk, and nothing of the extensions is kept.
        let mut raw = Vec::new();
        for _ in 0..100 {
            raw.extend_from_slice(b"1;");
            raw.extend(std::iter::repeat_n(b'a', MAX_CHUNK_LINE - 2));
            raw.extend_from_slice(b"\r\nX\r\n");
        }
        raw.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(decode(CHUNKED, &raw, 8192).unwrap().len(), 100);
        let mut long = b"1;".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_CHUNK_LINE));
        assert!(decode(CHUNKED, &long, 8192).is_err());
    }

    #[test]
    fn bodies_over_the_relay_limit_are_errors_whatever_their_framing() {
        let big = format!("{:x}\r\n", MAX_RELAYED_BODY + 1);
        assert!(decode(CHUNKED, big.as_bytes(), 1).is_err());
        let many = "100000\r\n".to_string() + &"a".repeat(1 << 20) + "\r\n1\r\n";
        assert!(decode(CHUNKED, many.as_bytes(), 4096).is_err());
        let length = (MAX_RELAYED_BODY + 1).to_string();
        assert!(decode(&[("content-length", &length)], b"", 1).is_err());
        let until_close = vec![b'a'; MAX_RELAYED_BODY + 1];
        assert!(decode(&[], &until_close, 65536).is_err());
        assert_eq!(decode(&[], b"bye", 1).unwrap(), "bye");
    }

    #[test]
    fn lengths_are_exact_and_must_be_one_plain_number() {
        assert_eq!(
            decode(&[("content-length", "3")], b"abcdef", 2).unwrap(),
            "abc"
        );
        assert!(decode(&[("content-length", "3")], b"ab", 1).is_err());
        assert!(decode(&[("content-length", "+3")], b"abc", 1).is_err());
        assert!(
            decode(
                &[("content-length", "3"), ("content-length", "3")],
                b"abc",
                1
            )
            .is_err()
        );
        // Transfer-Encoding wins over Content-Length; an encoding other than chunked runs to the close.
        let both = [("content-length", "100"), ("transfer-encoding", "chunked")];
        assert_eq!(decode(&both, b"1\r\nz\r\n0\r\n\r\n", 1).unwrap(), "z");
        assert_eq!(
            decode(&[("transfer-encoding", "gzip")], b"zip", 1).unwrap(),
            "zip"
        );
    }

    #[test]
    fn a_head_end_is_found_in_new_bytes_only() {
        assert!(head_ends_in(b"HTTP/1.1 200 OK\r\n\r\n", 0));
        assert!(head_ends_in(b"HTTP/1.1 200 OK\n\n", 10));
        assert!(head_ends_in(b"HTTP/1.1 200 OK\r\n\r\n", 17));
        assert!(!head_ends_in(b"HTTP/1.1 200 OK\r\nA: b\r\n", 0));
    }
}
