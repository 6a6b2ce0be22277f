//! A backend's response to a forwarded HTTP request, read the way `src/upstream/exchange.rs` reads it on
//! `src/http1/message.rs`: the head parsed once a blank line is there (interim answers skipped, a 101
//! refused), the body framed by `response_length` and decoded piece by piece by `BodyReader`; and the
//! chunked encoding a request body is sent in (`encode_chunk`, `encode_last_chunk`), decoded back.
//!
//! Input layout: byte 0, bit 0: the request was a HEAD; the rest as the HTTP targets
//! (`http_target::reads`): how many read lengths follow, the lengths, the stream.

use bytes::{Buf, BytesMut};
use http::{HeaderMap, HeaderValue, Method, header};
use wsgate::internals::{
    BodyLength, BodyReader, Head, HopByHop, MAX_HEAD, Piece, encode_chunk, encode_last_chunk,
    framing, has_token, leading_line_ends, parse_head, parse_head_with, response_length,
    strip_hop_by_hop,
};

use crate::http_target::{Reader, has_head_end, reads, reference_chunks};

/// What one way of reading a response came to.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Not a whole head before the bytes ran out.
    NoHead,
    /// The head was refused: malformed, too large, a 101, or framing headers that cannot be read.
    BadHead,
    /// The final head, its body's framing, then the body: data, trailers, and how it ended.
    Response {
        status: u16,
        length: BodyLength,
        /// Where the body starts in the stream.
        body_at: usize,
        data: Vec<u8>,
        trailers: Option<HeaderMap>,
        /// Where the body ended in the stream, or why it did not end well (`None`: refused or cut).
        end: Option<usize>,
    },
}

/// The forwarding path reads an answer head with its hop-by-hop fields taken out as they are parsed
/// (`HopByHop`, in `src/upstream/exchange.rs`): it must come to the fields, framing and connection
/// verdict that reading the whole head and then stripping it (`strip_hop_by_hop`) gives.
fn check_hop_by_hop(buf: &[u8], reference: &Head, method: &Method) {
    let mut hop = HopByHop::default();
    let read = parse_head_with(buf, |name, value| hop.take(name, value));
    let Ok(Some(read)) = read else {
        panic!("a head parsed whole fails when its hop-by-hop fields are taken: {read:?}");
    };
    assert_eq!(read.len, reference.len);
    let mut expected = reference.headers.clone();
    strip_hop_by_hop(&mut expected);
    let mut kept = read.headers.clone();
    hop.strip_listed(&mut kept);
    assert_eq!(kept, expected, "fields passed on differ");
    assert_eq!(
        hop.coded,
        reference.headers.contains_key(header::TRANSFER_ENCODING)
    );
    assert_eq!(
        hop.close,
        has_token(&reference.headers, header::CONNECTION, "close")
    );
    let coding = hop.coded.then(|| hop.only_chunked());
    let fused = framing(method, reference.status, coding, &read.headers);
    let whole = response_length(method, reference.status, &reference.headers);
    match (fused, whole) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "framing differs"),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("framing differs: {a:?} read as it comes, {b:?} from the whole head"),
    }
}

/// Reads the response in the given reads. After every read the decoder asks more for, what the buffer
/// still holds is checked: nothing outside a trailer section (a chunk-size line is taken apart as it
/// comes), and a trailer section within `MAX_HEAD`.
fn read_response(stream: &[u8], reads: &[usize], method: &Method) -> Outcome {
    let mut reader = Reader {
        stream,
        at: 0,
        sizes: reads.iter(),
    };
    let mut buf = BytesMut::new();
    let (head, body_at) = loop {
        let blank = leading_line_ends(&buf);
        buf.advance(blank);
        if has_head_end(&buf) {
            match parse_head(&buf) {
                Err(_) => return Outcome::BadHead,
                Ok(Some(head)) => {
                    check_hop_by_hop(&buf, &head, method);
                    let _ = buf.split_to(head.len);
                    if head.status == http::StatusCode::SWITCHING_PROTOCOLS {
                        return Outcome::BadHead;
                    }
                    if head.status.is_informational() {
                        continue;
                    }
                    break (head, reader.at - buf.len());
                }
                Ok(None) => {}
            }
        }
        if buf.len() >= MAX_HEAD {
            return Outcome::BadHead;
        }
        match reader.read(usize::MAX) {
            Some(piece) => buf.extend_from_slice(piece),
            None => return Outcome::NoHead,
        }
    };
    let Ok(length) = response_length(method, head.status, &head.headers) else {
        return Outcome::BadHead;
    };
    let mut body = BodyReader::new(length);
    let mut data = Vec::new();
    let mut trailers = None;
    let end = loop {
        let piece = match body.decode(&mut buf) {
            Ok(piece) => piece,
            Err(_) => break None,
        };
        match piece {
            Piece::Data(bytes) => {
                assert!(!bytes.is_empty(), "empty data piece");
                data.extend_from_slice(&bytes);
            }
            Piece::Trailers(map) => {
                assert!(body.is_done(), "trailers before the end");
                trailers = Some(map);
            }
            Piece::Done => break Some(reader.at - buf.len()),
            Piece::More => {
                assert!(
                    buf.is_empty() || (body.data_done() && buf.len() <= MAX_HEAD),
                    "holds {} bytes outside a trailer section",
                    buf.len()
                );
                match reader.read(usize::MAX) {
                    Some(piece) => buf.extend_from_slice(piece),
                    None => match body.at_eof() {
                        Ok(_) => break Some(reader.at - buf.len()),
                        Err(_) => break None,
                    },
                }
            }
        }
    };
    Outcome::Response {
        status: head.status.as_u16(),
        length,
        body_at,
        data,
        trailers,
        end,
    }
}

/// The backend-response target. Invariants:
/// - the outcome (head, framing, data, trailers, where the body ended) does not depend on how the bytes
///   were read: the reads described, one read, one byte per read;
/// - the buffer holds nothing outside a trailer section between reads, and a trailer section within
///   `MAX_HEAD`;
/// - a body that ends well is exactly its framing's bytes: `Content-Length` bytes; all that follows the
///   head when it runs to the close; an independent decoder's data for a chunked body, ending where that
///   decoder's last chunk and the trailer section end; nothing for HEAD, 1xx, 204 and 304;
/// - chunks encoded by `encode_chunk` and `encode_last_chunk` (the stream cut as the reads say, a
///   trailer naming the count) decode to the same data and trailer, with nothing left over.
pub fn backend_response(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let method = if flags & 1 == 1 {
        Method::HEAD
    } else {
        Method::GET
    };
    let Some((reads, stream)) = reads(rest) else {
        return;
    };
    let whole = read_response(stream, &[stream.len()], &method);
    assert_eq!(
        read_response(stream, &reads, &method),
        whole,
        "the response depends on the reads"
    );
    if stream.len() <= 4096 {
        let bytes = vec![1; stream.len()];
        assert_eq!(
            read_response(stream, &bytes, &method),
            whole,
            "byte by byte"
        );
    }
    if let Outcome::Response {
        length,
        body_at,
        data,
        trailers,
        end: Some(end),
        ..
    } = &whole
    {
        let body = &stream[*body_at..*end];
        match length {
            BodyLength::Empty => assert!(data.is_empty() && body.is_empty()),
            BodyLength::Exact(n) => {
                assert_eq!(data.len() as u64, *n);
                assert_eq!(data, body);
            }
            BodyLength::UntilClose => {
                assert_eq!(data, body);
                assert_eq!(*end, stream.len());
            }
            BodyLength::Chunked => {
                let (reference, last) = reference_chunks(body, u64::MAX)
                    .expect("a chunked body the reference refuses");
                assert_eq!(*data, reference, "chunked data differs from the reference");
                let section = &body[last..];
                assert!(section.ends_with(b"\r\n"));
                assert_eq!(
                    trailers.is_some(),
                    section.len() > 2,
                    "trailers found or missed"
                );
            }
        }
    }
    round_trip(stream, &reads);
}

/// Encodes `stream` in chunks cut as `reads` says, with a trailer, and decodes it back in pieces of the
/// same sizes.
fn round_trip(stream: &[u8], reads: &[usize]) {
    let mut encoded = Vec::new();
    let mut at = 0;
    for &len in reads {
        encode_chunk(&stream[at..at + len], &mut encoded);
        at += len;
    }
    let mut sent = HeaderMap::new();
    sent.insert("x-chunks", HeaderValue::from(reads.len()));
    encode_last_chunk(Some(&sent), &mut encoded);
    let mut body = BodyReader::new(BodyLength::Chunked);
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    let mut pieces = encoded.chunks(reads.first().copied().unwrap_or(1).max(1));
    loop {
        match body.decode(&mut buf).expect("wsgate's own chunks refused") {
            Piece::Data(bytes) => data.extend_from_slice(&bytes),
            Piece::Trailers(received) => assert_eq!(received, sent),
            Piece::Done => break,
            Piece::More => buf.extend_from_slice(pieces.next().expect("chunks cut short")),
        }
    }
    assert_eq!(data, stream);
    assert!(buf.is_empty() && pieces.next().is_none(), "bytes left over");
}

/// Starting points: every framing, interim answers, trailers, hostile framing.
pub fn backend_response_seeds() -> Vec<Vec<u8>> {
    let streams: Vec<&[u8]> = vec![
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n\
          HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\n\
          Server-Timing: db;dur=53\r\nEtag: \"x\"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n\
          1\r\nz\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nto the close",
        b"HTTP/1.0 200 OK\r\n\r\nuntil the close",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
          00000000000000000000001\r\nx\r\nffffffffffffffffff\r\n",
    ];
    let mut seeds = Vec::new();
    for stream in streams {
        seeds.push([&[0u8, 0][..], stream].concat());
        seeds.push([&[1u8, 4, 7, 0, 30, 255][..], stream].concat());
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_pass() {
        for seed in backend_response_seeds() {
            backend_response(&seed);
        }
    }

    #[test]
    fn the_reference_finds_where_the_last_chunk_ends() {
        assert_eq!(
            reference_chunks(b"2\r\nab\r\n0\r\nX: y\r\n\r\n", u64::MAX),
            Some((b"ab".to_vec(), 10))
        );
        assert_eq!(reference_chunks(b"2\r\nab\r\n", u64::MAX), None);
    }

    #[test]
    #[ignore = "writes the seed files into corpus/"]
    fn write_seeds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/backend_response");
        std::fs::create_dir_all(&dir).unwrap();
        for (i, seed) in backend_response_seeds().iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), seed).unwrap();
        }
    }
}
