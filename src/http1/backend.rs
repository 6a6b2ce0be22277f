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

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::message::{
    BodyReader, Piece, head_ends_in, leading_line_ends, parse_head, response_length,
};
use super::{MAX_HEAD, MAX_RELAYED_BODY};

pub use super::message::BackendHttpError;

/// Bytes asked of the socket per read.
const READ_SIZE: usize = 8192;

/// A backend's answer head, and the bytes read past it.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub rest: Vec<u8>,
}

/// Writes an encoded request head (`message::encode_request_head`) and flushes it (a TLS session may
/// hold what it was given until then).
pub async fn send_head<S: AsyncWrite + Unpin>(
    stream: &mut S,
    head: &[u8],
) -> Result<(), BackendHttpError> {
    stream.write_all(head).await?;
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
    let mut searched: usize = 0;
    loop {
        let blank = leading_line_ends(&buf);
        if blank > 0 {
            buf.drain(..blank);
            searched = searched.saturating_sub(blank);
        }
        if head_ends_in(&buf, searched)
            && let Some(head) = parse_head(&buf)?
        {
            buf.drain(..head.len);
            searched = 0;
            if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS {
                continue;
            }
            return Ok(Answer {
                status: head.status,
                headers: head.headers,
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

/// Decodes a refusal's body from bytes fed to it in pieces of any size.
///
/// What it holds is the decoded body, never over `MAX_RELAYED_BODY`, and at most a read's worth of raw
/// bytes while it decodes them. Trailers after the last chunk are not waited for (the connection is not
/// reused).
#[derive(Debug)]
pub struct BodyDecoder {
    reader: BodyReader,
    raw: BytesMut,
    body: Vec<u8>,
}

impl BodyDecoder {
    /// Takes the framing from `headers` and removes the framing headers from them.
    pub fn new(
        status: StatusCode,
        headers: &mut HeaderMap,
    ) -> Result<BodyDecoder, BackendHttpError> {
        let length = response_length(&Method::GET, status, headers)?;
        headers.remove(header::TRANSFER_ENCODING);
        headers.remove(header::CONTENT_LENGTH);
        let decoder = BodyDecoder {
            reader: BodyReader::new(length),
            raw: BytesMut::new(),
            body: Vec::new(),
        };
        decoder.check_limit()?;
        Ok(decoder)
    }

    /// The body is complete: nothing more is to be read.
    pub fn is_done(&self) -> bool {
        self.reader.data_done()
    }

    /// Bytes held: the decoded body so far, and raw bytes not decoded yet.
    pub fn held(&self) -> usize {
        self.body.len() + self.raw.len()
    }

    pub fn into_body(self) -> Bytes {
        Bytes::from(self.body)
    }

    /// The backend closed its connection: the body is complete if its framing says it ends so.
    pub fn finish_at_eof(mut self) -> Result<Bytes, BackendHttpError> {
        if !self.is_done() {
            self.reader.at_eof()?;
        }
        Ok(self.into_body())
    }

    /// Decodes `input`; bytes after the body's end are ignored.
    pub fn feed(&mut self, input: &[u8]) -> Result<(), BackendHttpError> {
        if self.is_done() {
            return Ok(());
        }
        self.raw.extend_from_slice(input);
        while !self.is_done() {
            match self.reader.decode(&mut self.raw) {
                Ok(Piece::Data(data)) => {
                    self.body.extend_from_slice(&data);
                    self.check_limit()?;
                }
                Ok(Piece::Trailers(_) | Piece::Done | Piece::More) => break,
                // What follows the last chunk is not waited for, so it cannot be wrong either: whether
                // it arrived with the last chunk must not change the answer.
                Err(_) if self.reader.data_done() => break,
                Err(error) => return Err(error),
            }
        }
        self.check_limit()?;
        // What is left is after the body's end, or nothing: a chunk-size line is taken apart as it comes.
        self.raw.clear();
        Ok(())
    }

    /// The body so far and what its framing has announced must fit the relay limit.
    fn check_limit(&self) -> Result<(), BackendHttpError> {
        let promised = (self.body.len() as u64).saturating_add(self.reader.announced());
        if promised > MAX_RELAYED_BODY as u64 {
            return Err(BackendHttpError::Invalid("body too large to relay"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::MAX_CHUNK_LINE;
    use http::header::{HeaderName, HeaderValue};

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
        let raw = b"1\r\nx\r\n0\r\nnot a field\r\n\r\n";
        for step in [1, raw.len()] {
            assert_eq!(decode(CHUNKED, raw, step).unwrap(), "x");
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
    fn lengths_are_exact_and_must_be_one_plain_number_however_repeated() {
        assert_eq!(
            decode(&[("content-length", "3")], b"abcdef", 2).unwrap(),
            "abc"
        );
        assert!(decode(&[("content-length", "3")], b"ab", 1).is_err());
        assert!(decode(&[("content-length", "+3")], b"abc", 1).is_err());
        let twice = [("content-length", "3"), ("content-length", "3")];
        assert_eq!(decode(&twice, b"abc", 1).unwrap(), "abc");
        let conflicting = [("content-length", "3"), ("content-length", "4")];
        assert!(decode(&conflicting, b"abcd", 1).is_err());
        // Transfer-Encoding wins over Content-Length.
        let both = [("content-length", "100"), ("transfer-encoding", "chunked")];
        assert_eq!(decode(&both, b"1\r\nz\r\n0\r\n\r\n", 1).unwrap(), "z");
        // A coding other than chunked is refused: its bytes would be relayed as if plain.
        assert!(decode(&[("transfer-encoding", "gzip")], b"zip", 1).is_err());
    }
}
