//! HTTP/1.1 messages between wsgate and a backend, without I/O: request heads written, answer heads
//! parsed, and bodies framed (RFC 9112 §6), decoded as they arrive and encoded in chunks (§7.1). The
//! upgrade's handshake (`backend.rs`) and the HTTP forwarding path (`upstream/exchange.rs`) both use it.
//!
//! Decoding holds nothing of the framing: a chunk-size line is taken apart byte by byte as it arrives
//! (its extensions bounded by `MAX_CHUNK_LINE`), and data is split off the read buffer, not copied. Only
//! a trailer section is buffered, up to `MAX_HEAD`.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

use super::{MAX_CHUNK_LINE, MAX_HEAD, MAX_HEADERS};
use crate::headers::only_chunked;

/// Data pieces shorter than this are copied out of the read buffer rather than split off it: a piece split
/// off keeps the whole buffer's allocation alive while it waits to be written, and a backend that pads
/// one-byte chunks with long size lines could otherwise pin a read buffer per byte.
const COPY_BELOW: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BackendHttpError {
    #[error("backend connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("backend closed the connection before answering in full")]
    Closed,
    #[error("backend answer is not valid HTTP/1.1: {0}")]
    Invalid(&'static str),
}

/// An answer head as parsed.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    /// Bytes the head took, its blank line included.
    pub len: usize,
}

/// Parses a complete answer head at the start of `buf`; `None` while it is incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, BackendHttpError> {
    parse_head_with(buf, |_, _| false)
}

/// `parse_head`, with each field offered to `take` first: the fields it takes stay out of the map.
pub fn parse_head_with(
    buf: &[u8],
    take: impl FnMut(&HeaderName, &HeaderValue) -> bool,
) -> Result<Option<Head>, BackendHttpError> {
    // Uninitialised slots: filling a hundred empty ones writes 3 KiB before every answer is parsed.
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut slots,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(BackendHttpError::Invalid("malformed head")),
    };
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(BackendHttpError::Invalid("bad status code"))?;
    let version = match response.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let headers = header_map(response.headers, take)?;
    Ok(Some(Head {
        status,
        version,
        headers,
        len,
    }))
}

fn header_map(
    fields: &[httparse::Header<'_>],
    mut take: impl FnMut(&HeaderName, &HeaderValue) -> bool,
) -> Result<HeaderMap, BackendHttpError> {
    let mut headers = HeaderMap::with_capacity(fields.len());
    for h in fields {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| BackendHttpError::Invalid("bad header name"))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| BackendHttpError::Invalid("bad header value"))?;
        if !take(&name, &value) {
            headers.append(name, value);
        }
    }
    Ok(headers)
}

/// How many line ends (CR, LF) `buf` starts with: empty lines before a head, which httparse would skip on
/// every parse. Removed before the search for the head's end, so that a backend sending nothing but line
/// ends one at a time cannot make each read parse everything again.
pub fn leading_line_ends(buf: &[u8]) -> usize {
    buf.iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count()
}

/// Whether a head's end (an empty line, CRLF or bare LF as httparse accepts) may be in `buf`, given that
/// `buf[..searched]` held none: searching the new bytes alone keeps a trickled head linear.
pub fn head_ends_in(buf: &[u8], searched: usize) -> bool {
    let from = searched.saturating_sub(3).min(buf.len());
    let tail = &buf[from..];
    // Line feeds are found a word at a time (every answer head goes through here); each is looked at
    // for the empty line that may follow it.
    memchr::memchr_iter(b'\n', tail).any(|at| match tail.get(at + 1) {
        Some(b'\n') => true,
        Some(b'\r') => tail.get(at + 2) == Some(&b'\n'),
        _ => false,
    })
}

/// Appends a request head: `method target HTTP/1.1`, the `headers` whose names `skip` does not take, the
/// lines `more` writes (each `name: value` CRLF), and the blank line.
pub fn encode_request_head(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    skip: impl Fn(&HeaderName) -> bool,
    more: impl FnOnce(&mut Vec<u8>),
    out: &mut Vec<u8>,
) {
    let size = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>();
    // Room for what `more` adds in the usual case too (the forwarding fields, about 150 bytes).
    out.reserve(method.as_str().len() + target.len() + size + 256);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if !skip(name) {
            encode_field(name, value, out);
        }
    }
    more(out);
    out.extend_from_slice(b"\r\n");
}

fn encode_field(name: &HeaderName, value: &HeaderValue, out: &mut Vec<u8>) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn encode_fields(headers: &HeaderMap, out: &mut Vec<u8>) {
    for (name, value) in headers {
        encode_field(name, value, out);
    }
}

/// Appends one chunk of a chunked body: its size line, `data`, CRLF. Empty data writes nothing (an
/// empty chunk would end the body).
pub fn encode_chunk(data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    out.reserve(data.len() + 20);
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Appends the end of a chunked body: the last chunk, `trailers` (if any), the blank line.
pub fn encode_last_chunk(trailers: Option<&HeaderMap>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n");
    if let Some(trailers) = trailers {
        encode_fields(trailers, out);
    }
    out.extend_from_slice(b"\r\n");
}

/// How a message body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// There is none.
    Empty,
    /// Exactly this many bytes.
    Exact(u64),
    /// Chunks, up to the last one and its trailer section.
    Chunked,
    /// Whatever comes until the sender closes the connection.
    UntilClose,
}

/// How the body of an answer with `status` and `headers` is framed (RFC 9112 §6.3), for a request with
/// `method`: none for HEAD, 1xx, 204 and 304; chunked when `Transfer-Encoding` says `chunked` and nothing
/// else (another coding is refused, as nginx refuses it: wsgate would pass coded bytes on as if they were
/// plain, the header naming the coding being hop-by-hop); else `Content-Length` (repeated only with one
/// value), else until the close.
pub fn response_length(
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<BodyLength, BackendHttpError> {
    let coding = headers
        .contains_key(header::TRANSFER_ENCODING)
        .then(|| only_chunked(headers));
    framing(method, status, coding, headers)
}

/// `response_length` from what was read of `Transfer-Encoding` (`None`: absent; `Some(true)`: `chunked`
/// alone) and the other fields: for a head whose hop-by-hop fields were taken out as it was read
/// (`HopByHop`).
pub fn framing(
    method: &Method,
    status: StatusCode,
    coding: Option<bool>,
    headers: &HeaderMap,
) -> Result<BodyLength, BackendHttpError> {
    if *method == Method::HEAD || status.is_informational() || matches!(status.as_u16(), 204 | 304)
    {
        return Ok(BodyLength::Empty);
    }
    match coding {
        Some(true) => return Ok(BodyLength::Chunked),
        Some(false) => {
            return Err(BackendHttpError::Invalid(
                "transfer coding other than chunked",
            ));
        }
        None => {}
    }
    Ok(match content_length(headers)? {
        Some(0) => BodyLength::Empty,
        Some(n) => BodyLength::Exact(n),
        None => BodyLength::UntilClose,
    })
}

/// The `Content-Length` of a head: every value (lines, comma-separated lists) must be the same plain
/// decimal number (RFC 9110 §8.6).
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, BackendHttpError> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for item in value.as_bytes().split(|&b| b == b',') {
            let item = item.trim_ascii();
            let n = (!item.is_empty() && item.len() <= 19 && item.iter().all(u8::is_ascii_digit))
                .then(|| item.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
                .ok_or(BackendHttpError::Invalid("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(BackendHttpError::Invalid("conflicting content-length"));
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// Where a chunked body's decoder is, outside chunk data and the trailer section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    /// Reading the hex size; `digits` so far.
    Size { size: u64, digits: usize },
    /// Past the size, in whitespace or extensions, `len` bytes of them so far, until CR.
    Extension { size: u64, len: usize },
    /// CR of the size line seen; LF expected.
    SizeLf { size: u64 },
    /// In a chunk's data, this much left.
    Data { left: u64 },
    /// Data done; CR expected.
    DataCr,
    /// CR after data seen; LF expected.
    DataLf,
}

impl ChunkState {
    pub const START: ChunkState = ChunkState::Size { size: 0, digits: 0 };
}

/// What one byte outside chunk data leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkStep {
    Next(ChunkState),
    /// The last chunk's size line has ended: the trailer section follows.
    LastChunk,
}

/// One byte of a chunked body outside chunk data.
pub fn chunk_byte(state: ChunkState, byte: u8) -> Result<ChunkStep, BackendHttpError> {
    let bad = |what| Err(BackendHttpError::Invalid(what));
    let next = match (state, byte) {
        (ChunkState::Size { size, digits }, _) if byte.is_ascii_hexdigit() => {
            // Leading zeros are allowed, within the line's bound; a size past u64 is refused, not wrapped.
            if digits >= MAX_CHUNK_LINE {
                return bad("chunk-size line too long");
            }
            let digit = (byte as char).to_digit(16).unwrap_or(0);
            let size = size
                .checked_mul(16)
                .ok_or(BackendHttpError::Invalid("chunk size too large"))?;
            ChunkState::Size {
                size: size | u64::from(digit),
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
        (ChunkState::SizeLf { size: 0 }, b'\n') => return Ok(ChunkStep::LastChunk),
        (ChunkState::SizeLf { size }, b'\n') => ChunkState::Data { left: size },
        (ChunkState::SizeLf { .. }, _) => return bad("chunk-size line not ended by CRLF"),
        (ChunkState::DataCr, b'\r') => ChunkState::DataLf,
        (ChunkState::DataLf, b'\n') => ChunkState::START,
        (ChunkState::DataCr | ChunkState::DataLf, _) => return bad("chunk not followed by CRLF"),
        // Data is taken in runs by the decoder, never a byte at a time.
        (ChunkState::Data { .. }, _) => return bad("chunk data out of place"),
    };
    Ok(ChunkStep::Next(next))
}

/// Where a body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    Exact(u64),
    Chunked(ChunkState),
    /// After the last chunk; the trailer section's first `searched` bytes hold no blank line.
    Trailers {
        searched: usize,
    },
    UntilClose,
    Done,
}

/// What the decoder found in the bytes it was given.
#[derive(Debug)]
pub enum Piece {
    /// Body data, split off the buffer.
    Data(Bytes),
    /// The trailer section of a chunked body: the body is done.
    Trailers(HeaderMap),
    /// The body is done.
    Done,
    /// The buffer holds no more of the body: read more.
    More,
}

/// The first `n` bytes of `buf`, taken off it: split off when large, copied when small (`COPY_BELOW`).
fn take_data(buf: &mut BytesMut, n: usize) -> Bytes {
    if n < COPY_BELOW {
        let data = Bytes::copy_from_slice(&buf[..n]);
        buf.advance(n);
        data
    } else {
        buf.split_to(n).freeze()
    }
}

/// Decodes a body from a read buffer, one piece at a time.
#[derive(Debug, Clone)]
pub struct BodyReader {
    reading: Reading,
}

impl BodyReader {
    pub fn new(length: BodyLength) -> BodyReader {
        let reading = match length {
            BodyLength::Empty | BodyLength::Exact(0) => Reading::Done,
            BodyLength::Exact(n) => Reading::Exact(n),
            BodyLength::Chunked => Reading::Chunked(ChunkState::START),
            BodyLength::UntilClose => Reading::UntilClose,
        };
        BodyReader { reading }
    }

    /// The body is complete.
    pub fn is_done(&self) -> bool {
        self.reading == Reading::Done
    }

    /// All of the body's data has been decoded (a chunked body's trailers may still follow).
    pub fn data_done(&self) -> bool {
        matches!(self.reading, Reading::Done | Reading::Trailers { .. })
    }

    /// Data bytes the framing has announced and not yet delivered (the rest of a length, or of the
    /// current chunk).
    pub fn announced(&self) -> u64 {
        match self.reading {
            Reading::Exact(left) | Reading::Chunked(ChunkState::Data { left }) => left,
            _ => 0,
        }
    }

    /// The length of the rest of the body, when the framing says it.
    pub fn remaining(&self) -> Option<u64> {
        match self.reading {
            Reading::Exact(left) => Some(left),
            Reading::Done => Some(0),
            _ => None,
        }
    }

    /// The next piece of the body from `buf`, whose bytes it consumes (bytes after the body's end stay).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Piece, BackendHttpError> {
        loop {
            match self.reading {
                Reading::Done => return Ok(Piece::Done),
                Reading::Exact(left) | Reading::Chunked(ChunkState::Data { left }) => {
                    if buf.is_empty() {
                        return Ok(Piece::More);
                    }
                    let n = left.min(buf.len() as u64);
                    let left = left - n;
                    self.reading = match self.reading {
                        Reading::Exact(_) if left == 0 => Reading::Done,
                        Reading::Exact(_) => Reading::Exact(left),
                        _ if left == 0 => Reading::Chunked(ChunkState::DataCr),
                        _ => Reading::Chunked(ChunkState::Data { left }),
                    };
                    return Ok(Piece::Data(take_data(buf, n as usize)));
                }
                Reading::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Piece::More);
                    }
                    return Ok(Piece::Data(take_data(buf, buf.len())));
                }
                Reading::Chunked(mut state) => {
                    let mut used = 0;
                    let mut next = None;
                    for &byte in buf.iter() {
                        used += 1;
                        match chunk_byte(state, byte)? {
                            ChunkStep::LastChunk => {
                                next = Some(Reading::Trailers { searched: 0 });
                                break;
                            }
                            ChunkStep::Next(s @ ChunkState::Data { .. }) => {
                                next = Some(Reading::Chunked(s));
                                break;
                            }
                            ChunkStep::Next(s) => state = s,
                        }
                    }
                    buf.advance(used);
                    match next {
                        Some(reading) => self.reading = reading,
                        None => {
                            self.reading = Reading::Chunked(state);
                            return Ok(Piece::More);
                        }
                    }
                }
                Reading::Trailers { searched } => return self.trailers(buf, searched),
            }
        }
    }

    /// The trailer section: nothing but its blank line, or fields and the blank line.
    fn trailers(&mut self, buf: &mut BytesMut, searched: usize) -> Result<Piece, BackendHttpError> {
        if buf.starts_with(b"\r\n") {
            buf.advance(2);
            self.reading = Reading::Done;
            return Ok(Piece::Done);
        }
        let from = searched.saturating_sub(3);
        let end = buf[from..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|at| from + at + 4);
        let Some(end) = end else {
            if buf.len() > MAX_HEAD {
                return Err(BackendHttpError::Invalid("trailer section too large"));
            }
            self.reading = Reading::Trailers {
                searched: buf.len(),
            };
            return Ok(Piece::More);
        };
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let fields = match httparse::parse_headers(&buf[..end], &mut slots) {
            Ok(httparse::Status::Complete((used, fields))) if used == end => {
                header_map(fields, |_, _| false)?
            }
            _ => return Err(BackendHttpError::Invalid("malformed trailer section")),
        };
        buf.advance(end);
        self.reading = Reading::Done;
        Ok(Piece::Trailers(fields))
    }

    /// The connection has ended: the body is complete if it runs until the close, else cut short.
    pub fn at_eof(&mut self) -> Result<Piece, BackendHttpError> {
        match self.reading {
            Reading::UntilClose | Reading::Done => {
                self.reading = Reading::Done;
                Ok(Piece::Done)
            }
            _ => Err(BackendHttpError::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(fields: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in fields {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    /// A decoded body: its data, its trailers, and the bytes left after it.
    type Decoded = (Vec<u8>, Option<HeaderMap>, Vec<u8>);

    /// Decodes `raw` arriving in pieces of `step` bytes.
    fn decode_all(
        length: BodyLength,
        raw: &[u8],
        step: usize,
    ) -> Result<Decoded, BackendHttpError> {
        let mut reader = BodyReader::new(length);
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut trailers = None;
        let mut pieces = raw.chunks(step.max(1));
        loop {
            match reader.decode(&mut buf)? {
                Piece::Data(bytes) => data.extend_from_slice(&bytes),
                Piece::Trailers(map) => trailers = Some(map),
                Piece::Done => {
                    let rest = pieces.fold(buf.to_vec(), |rest, piece| [&rest, piece].concat());
                    return Ok((data, trailers, rest));
                }
                Piece::More => match pieces.next() {
                    Some(piece) => buf.extend_from_slice(piece),
                    None => {
                        reader.at_eof()?;
                        return Ok((data, trailers, buf.to_vec()));
                    }
                },
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_in_pieces_of_any_size_with_their_trailers() {
        let raw =
            b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nEtag: x\r\nServer-Timing: a\r\n\r\nNEXT";
        for step in 1..=raw.len() {
            let (data, trailers, rest) = decode_all(BodyLength::Chunked, raw, step).unwrap();
            assert_eq!(data, b"hello, world", "step {step}");
            let trailers = trailers.expect("trailers");
            assert_eq!(trailers["etag"], "x");
            assert_eq!(trailers["server-timing"], "a");
            assert_eq!(rest, b"NEXT", "step {step}");
        }
        let (data, trailers, rest) =
            decode_all(BodyLength::Chunked, b"1\r\nx\r\n0\r\n\r\nGET", 1).unwrap();
        assert_eq!(
            (data.as_slice(), trailers, rest.as_slice()),
            (&b"x"[..], None, &b"GET"[..])
        );
    }

    #[test]
    fn encoded_chunks_decode_to_what_was_encoded() {
        let mut out = Vec::new();
        for part in [&b"a"[..], b"", &[7u8; 300], b"end"] {
            encode_chunk(part, &mut out);
        }
        encode_last_chunk(Some(&headers(&[("x-sum", "1")])), &mut out);
        let (data, trailers, rest) = decode_all(BodyLength::Chunked, &out, 7).unwrap();
        assert_eq!(data, [&b"a"[..], &[7u8; 300], b"end"].concat());
        assert_eq!(trailers.unwrap()["x-sum"], "1");
        assert!(rest.is_empty());
    }

    #[test]
    fn malformed_or_cut_chunked_bodies_are_errors() {
        for raw in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"2\r\nabXY",
            b"2\nab\r\n0\r\n\r\n",
            b"2;a\nb\r\n",
            b"5\r\nhel",
            b"0\r\nbad trailer\r\n\r\n",
            b"0\r\nX",
            b"11111111111111111\r\n",
            b"1\r\nxy\r\n",
        ] {
            assert!(
                decode_all(BodyLength::Chunked, raw, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        // Leading zeros are a size like any other.
        let zeros = [&[b'0'; 40][..], b"1\r\nx\r\n0\r\n\r\n"].concat();
        assert_eq!(decode_all(BodyLength::Chunked, &zeros, 3).unwrap().0, b"x");
        let mut long = b"0\r\n".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        assert!(decode_all(BodyLength::Chunked, &long, 4096).is_err());
    }

    #[test]
    fn lengths_and_closes_end_bodies() {
        let (data, _, rest) = decode_all(BodyLength::Exact(3), b"abcdef", 2).unwrap();
        assert_eq!(
            (data.as_slice(), rest.as_slice()),
            (&b"abc"[..], &b"def"[..])
        );
        assert!(decode_all(BodyLength::Exact(3), b"ab", 1).is_err());
        let (data, _, _) = decode_all(BodyLength::UntilClose, b"bye", 1).unwrap();
        assert_eq!(data, b"bye");
        let (data, _, rest) = decode_all(BodyLength::Empty, b"next", 1).unwrap();
        assert!(data.is_empty());
        assert_eq!(rest, b"next");
    }

    #[test]
    fn framing_follows_rfc_9112_section_6_3() {
        let ok = StatusCode::OK;
        let get = Method::GET;
        let of = |m: &Method, s, h: &[(&str, &str)]| response_length(m, s, &headers(h));
        assert_eq!(
            of(&Method::HEAD, ok, &[("content-length", "9")]).unwrap(),
            BodyLength::Empty
        );
        for status in [204, 304, 103] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(
                of(&get, status, &[("content-length", "9")]).unwrap(),
                BodyLength::Empty
            );
        }
        let chunked = [("transfer-encoding", " Chunked ")];
        assert_eq!(of(&get, ok, &chunked).unwrap(), BodyLength::Chunked);
        let both = [("content-length", "100"), ("transfer-encoding", "chunked")];
        assert_eq!(of(&get, ok, &both).unwrap(), BodyLength::Chunked);
        let other_codings: [&[&str]; 5] = [
            &["gzip", "chunked"],
            &["chunked, gzip"],
            &["gzip"],
            &["chunked", "chunked"],
            &[""],
        ];
        for codings in other_codings {
            let fields: Vec<_> = codings.iter().map(|c| ("transfer-encoding", *c)).collect();
            assert!(of(&get, ok, &fields).is_err(), "{codings:?}");
        }
        assert_eq!(of(&get, ok, &[]).unwrap(), BodyLength::UntilClose);
        assert_eq!(
            of(&get, ok, &[("content-length", "0")]).unwrap(),
            BodyLength::Empty
        );
        let same = [("content-length", "7, 7"), ("content-length", "7")];
        assert_eq!(of(&get, ok, &same).unwrap(), BodyLength::Exact(7));
        for bad in ["7, 8", "+7", "", "0x7", "99999999999999999999"] {
            assert!(of(&get, ok, &[("content-length", bad)]).is_err(), "{bad}");
        }
    }

    #[test]
    fn request_heads_are_written_as_given() {
        let mut out = Vec::new();
        let fields = headers(&[("host", "a"), ("x-two", "1"), ("x-two", "2")]);
        encode_request_head(
            &Method::POST,
            "/p?q=1",
            &fields,
            |_| false,
            |_| {},
            &mut out,
        );
        assert_eq!(
            out,
            b"POST /p?q=1 HTTP/1.1\r\nhost: a\r\nx-two: 1\r\nx-two: 2\r\n\r\n"
        );
    }

    #[test]
    fn heads_parse_with_their_version_and_length() {
        let text = b"HTTP/1.0 200 OK\r\nA: b\r\n\r\nbody";
        let head = parse_head(text).unwrap().unwrap();
        assert_eq!(
            (head.status, head.version, &text[head.len..]),
            (StatusCode::OK, Version::HTTP_10, &b"body"[..])
        );
        assert!(parse_head(&text[..10]).unwrap().is_none());
        assert!(parse_head(b"NOT HTTP\r\n\r\n").is_err());
    }

    /// The forwarding path's read of an answer head (its hop-by-hop fields taken as they are parsed) comes
    /// to what reading it whole and stripping it does: the fields passed on, the framing, the verdict on
    /// the connection.
    #[test]
    fn an_answer_read_with_its_hop_by_hop_fields_taken_matches_one_stripped_whole() {
        use crate::headers::{HopByHop, has_token, strip_hop_by_hop};
        let heads: [&[u8]; 6] = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: X-Secret, close\r\nX-Secret: 1\r\nX-Kept: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: , Chunked ,\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nConnection: content-length, upgrade\r\nContent-Length: 0\r\nUpgrade: h2c\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: Close\r\nProxy-Authenticate: Basic\r\nTrailer: x\r\nTE: trailers\r\n\r\n",
        ];
        for text in heads {
            let whole = parse_head(text).unwrap().unwrap();
            let mut hop = HopByHop::default();
            let read = parse_head_with(text, |n, v| hop.take(n, v))
                .unwrap()
                .unwrap();
            let mut expected = whole.headers.clone();
            strip_hop_by_hop(&mut expected);
            let mut kept = read.headers.clone();
            hop.strip_listed(&mut kept);
            let shown = String::from_utf8_lossy(text);
            assert_eq!(kept, expected, "{shown}");
            assert_eq!(
                hop.close,
                has_token(&whole.headers, header::CONNECTION, "close"),
                "{shown}"
            );
            let coding = hop.coded.then(|| hop.only_chunked());
            assert_eq!(
                framing(&Method::GET, whole.status, coding, &read.headers).ok(),
                response_length(&Method::GET, whole.status, &whole.headers).ok(),
                "{shown}"
            );
        }
        // What each came to, spelled out for two of them.
        let mut hop = HopByHop::default();
        let read = parse_head_with(heads[1], |n, v| hop.take(n, v))
            .unwrap()
            .unwrap();
        assert!(hop.close && !hop.coded);
        let mut kept = read.headers;
        assert!(
            kept.contains_key("x-secret"),
            "removed once the head is read"
        );
        hop.strip_listed(&mut kept);
        assert!(!kept.contains_key("x-secret") && kept.contains_key("x-kept"));
        let mut hop = HopByHop::default();
        let read = parse_head_with(heads[3], |n, v| hop.take(n, v))
            .unwrap()
            .unwrap();
        assert!(hop.coded && hop.only_chunked() && !read.headers.contains_key("transfer-encoding"));
    }

    #[test]
    fn small_pieces_are_copied_and_large_ones_split_off() {
        let mut buf = BytesMut::with_capacity(64 << 10);
        buf.extend_from_slice(&[7u8; 20_000]);
        let mut reader = BodyReader::new(BodyLength::Exact(20_003));
        let Piece::Data(large) = reader.decode(&mut buf).unwrap() else {
            panic!("no data");
        };
        assert_eq!(large.len(), 20_000);
        buf.extend_from_slice(b"abc");
        let before = buf.as_ptr();
        let Piece::Data(small) = reader.decode(&mut buf).unwrap() else {
            panic!("no data");
        };
        assert_eq!(small, &b"abc"[..]);
        // Copied: the piece does not point into the read buffer.
        assert_ne!(small.as_ptr(), before);
        assert!(reader.is_done());
    }

    #[test]
    fn leading_line_ends_are_counted() {
        assert_eq!(leading_line_ends(b"\r\n\n\rHTTP/1.1"), 4);
        assert_eq!(leading_line_ends(b"HTTP/1.1\r\n"), 0);
    }

    #[test]
    fn a_head_end_is_found_in_new_bytes_only() {
        assert!(head_ends_in(b"HTTP/1.1 200 OK\r\n\r\n", 0));
        assert!(head_ends_in(b"HTTP/1.1 200 OK\n\n", 10));
        assert!(head_ends_in(b"HTTP/1.1 200 OK\r\n\r\n", 17));
        assert!(!head_ends_in(b"HTTP/1.1 200 OK\r\nA: b\r\n", 0));
    }
}
