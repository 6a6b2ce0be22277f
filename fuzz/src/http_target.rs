//! The hand-written HTTP/1 parsers: the first request head a client sends (`http1/request.rs`), and a
//! backend's answer to an upgrade (its head, then a refusal's body), each fed the way wsgate feeds it.
//!
//! Input layout for both: byte 0 gives how many read lengths follow (`% 16`), each one byte (0 means one
//! byte, 255 a large read); the rest is the stream. What the reads do not cover is one last read.

use wsgate::internals::{
    BodyDecoder, First, MAX_CHUNK_LINE, MAX_HEAD, MAX_HEADERS, MAX_RELAYED_BODY,
    leading_line_ends, parse_first_request, parse_head,
};
use wsgate::internals::{BadRequest, check_request, has_token};

/// Splits the input into read lengths and the stream.
pub(crate) fn reads(data: &[u8]) -> Option<(Vec<usize>, &[u8])> {
    let (&count, rest) = data.split_first()?;
    let count = usize::from(count % 16);
    let lengths = rest.get(..count)?;
    let stream = &rest[count..];
    let mut left = stream.len();
    let mut reads = Vec::with_capacity(count + 1);
    for &l in lengths {
        let l = match l {
            0 => 1,
            255 => 16 * 1024,
            n => usize::from(n),
        }
        .min(left);
        reads.push(l);
        left -= l;
    }
    if left > 0 {
        reads.push(left);
    }
    Some((reads, stream))
}

// ---------------------------------------------------------------------------------------------------------
// The first request

/// How an independent reading of a complete head classifies it: an upgrade for wsgate's fast path or not.
/// Whether the head's `Transfer-Encoding` lines name `chunked` and no other coding (empty list items
/// aside), worked out here rather than with wsgate's own helper.
fn chunked_alone(headers: &http::HeaderMap) -> bool {
    let codings: Vec<&[u8]> = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty())
        .collect();
    matches!(codings[..], [only] if only.eq_ignore_ascii_case(b"chunked"))
}

fn reference_is_upgrade(head: &[u8]) -> Option<bool> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = request.parse(head) else {
        return None;
    };
    let token = |name: &str, token: &str| {
        request
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            // As `HeaderValue::to_str` reads values: visible ASCII and tabs only.
            .filter(|h| {
                h.value
                    .iter()
                    .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
            })
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    Some(
        request.method == Some("GET")
            && request.version == Some(1)
            && token("upgrade", "websocket")
            && token("connection", "upgrade"),
    )
}

/// The first-request target. Invariants:
/// - the verdict depends on the bytes, not on how they were read: reading the stream piece by piece the
///   way `server::connection` does (parse after every read, stop at the first non-`Partial`) reaches
///   the same verdict and head length as parsing it whole;
/// - an `Upgrade` is a GET over HTTP/1.1 asking for `websocket` with `Connection: upgrade`, of at most
///   `MAX_HEADERS` headers, whose head length is within the bytes read and ends in an empty line; its
///   head alone parses to the same request, and every shorter prefix is `Partial`;
/// - a complete head is an upgrade for the fast path exactly when an independent reading says so (heads
///   with values `http` cannot hold are left to hyper, `Other`);
/// - `check_request` refuses an upgrade with two `Host` (or key, or version) lines, or with a body.
pub fn first_request(data: &[u8]) {
    let Some((reads, stream)) = reads(data) else {
        return;
    };
    let whole = parse_first_request(stream);
    let mut filled = 0;
    let mut verdict = None;
    for read in reads {
        filled += read;
        match parse_first_request(&stream[..filled]) {
            First::Partial => continue,
            other => {
                verdict = Some(other);
                break;
            }
        }
    }
    match (&whole, &verdict) {
        (First::Partial, None) => {}
        (First::Upgrade(_, len), Some(First::Upgrade(_, piece_len))) => {
            assert_eq!(len, piece_len, "head length depends on the reads")
        }
        (First::Other, Some(First::Other)) => {}
        // A stream read in pieces may be judged on a prefix: that prefix's verdict must be the whole
        // stream's, since the head ends inside it.
        _ => panic!(
            "verdict depends on the reads: whole {:?}, in pieces {:?}",
            name(&whole),
            verdict.as_ref().map(name)
        ),
    }
    match whole {
        First::Partial => {
            assert!(
                reference_is_upgrade(stream).is_none(),
                "a complete head reported as partial"
            );
        }
        First::Upgrade(parts, len) => {
            assert!(len <= stream.len());
            let head = &stream[..len];
            assert!(
                head.ends_with(b"\n\n") || head.ends_with(b"\n\r\n"),
                "head end"
            );
            assert_eq!(parts.method, http::Method::GET);
            assert_eq!(parts.version, http::Version::HTTP_11);
            assert!(has_token(
                &parts.headers,
                http::header::UPGRADE,
                "websocket"
            ));
            assert!(has_token(
                &parts.headers,
                http::header::CONNECTION,
                "upgrade"
            ));
            assert!(parts.headers.len() <= MAX_HEADERS);
            assert_eq!(reference_is_upgrade(head), Some(true));
            match parse_first_request(head) {
                First::Upgrade(again, again_len) => {
                    assert_eq!(again_len, len);
                    assert_eq!(again.headers, parts.headers);
                    assert_eq!(again.uri, parts.uri);
                }
                other => panic!("the head alone is {:?}", name(&other)),
            }
            for cut in [0, 1, len / 2, len.saturating_sub(2), len - 1] {
                assert!(
                    matches!(parse_first_request(&head[..cut]), First::Partial),
                    "prefix of {cut} bytes is not partial"
                );
            }
            let repeated = |name: &http::HeaderName| parts.headers.get_all(name).iter().count() > 1;
            let body = parts.headers.contains_key(http::header::TRANSFER_ENCODING)
                || parts
                    .headers
                    .get(http::header::CONTENT_LENGTH)
                    .is_some_and(|v| v.as_bytes().trim_ascii() != b"0");
            let verdict = check_request(&parts.headers, true);
            if repeated(&http::header::HOST)
                || repeated(&http::header::SEC_WEBSOCKET_KEY)
                || repeated(&http::header::SEC_WEBSOCKET_VERSION)
                || repeated(&http::header::CONTENT_LENGTH)
            {
                assert!(
                    matches!(verdict, Err(BadRequest::Repeated(_))),
                    "{verdict:?}"
                );
            } else if parts.headers.contains_key(http::header::TRANSFER_ENCODING)
                && !chunked_alone(&parts.headers)
            {
                // A coding wsgate cannot take off is refused as such, before the body is.
                assert_eq!(verdict, Err(BadRequest::TransferCoding));
            } else if body {
                assert_eq!(verdict, Err(BadRequest::UpgradeWithBody));
            } else {
                assert_eq!(verdict, Ok(()));
            }
        }
        First::Other => {
            // Either not a complete valid head at all, or one the fast path leaves to hyper.
            // Only values `http` cannot hold (a URI or header it refuses) send an upgrade to hyper.
            if reference_is_upgrade(stream) == Some(true) {
                assert!(
                    !representable(stream),
                    "a representable upgrade head was left to hyper"
                );
            }
        }
    }
}

/// Whether every header name, value and the target of a complete head fit `http`'s types.
fn representable(head: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(head), Ok(httparse::Status::Complete(_))) {
        return false;
    }
    request.path.is_some_and(|p| p.parse::<http::Uri>().is_ok())
        && request.headers.iter().all(|h| {
            http::HeaderName::from_bytes(h.name.as_bytes()).is_ok()
                && http::HeaderValue::from_bytes(h.value).is_ok()
        })
}

fn name(first: &First) -> &'static str {
    match first {
        First::Partial => "Partial",
        First::Upgrade(..) => "Upgrade",
        First::Other => "Other",
    }
}

// ---------------------------------------------------------------------------------------------------------
// A backend's answer

/// What one way of reading an answer came to.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Not a whole head before the bytes ran out.
    NoHead,
    /// The head was refused (malformed, too large).
    BadHead,
    /// The head's status, then the body: decoded, or refused (framing, limits), or cut by the end of the
    /// stream where its framing says it cannot end.
    Answer {
        status: u16,
        body: Result<Vec<u8>, ()>,
    },
}

/// Hands out a stream in reads of the sizes asked for, each cut to the room the reader has.
pub(crate) struct Reader<'a> {
    pub(crate) stream: &'a [u8],
    pub(crate) at: usize,
    pub(crate) sizes: std::slice::Iter<'a, usize>,
}

impl<'a> Reader<'a> {
    pub(crate) fn read(&mut self, room: usize) -> Option<&'a [u8]> {
        let left = self.stream.len() - self.at;
        if left == 0 {
            return None;
        }
        let want = self.sizes.next().copied().unwrap_or(left).max(1);
        let n = want.min(room).min(left);
        let piece = &self.stream[self.at..self.at + n];
        self.at += n;
        Some(piece)
    }
}

/// Whether `buf` may hold a head's end: the reader parses only then (a blank line, CRLF or bare LF).
pub(crate) fn has_head_end(buf: &[u8]) -> bool {
    buf.windows(2).any(|w| w == b"\n\n") || buf.windows(3).any(|w| w == b"\n\r\n")
}

/// Reads an answer the way `http1/backend.rs` does: the head from reads cut to the room left under
/// `MAX_HEAD`, parsed once a blank line is there, informational answers other than 101 skipped; then
/// the body of a non-101 through `BodyDecoder`, checked against its cap after every read.
fn read_answer(stream: &[u8], reads: &[usize]) -> Outcome {
    let mut reader = Reader {
        stream,
        at: 0,
        sizes: reads.iter(),
    };
    let mut buf: Vec<u8> = Vec::new();
    let (status, mut headers, rest) = loop {
        let blank = leading_line_ends(&buf);
        buf.drain(..blank);
        if has_head_end(&buf) {
            match parse_head(&buf) {
                Err(_) => return Outcome::BadHead,
                Ok(Some(head)) => {
                    let (status, headers) = (head.status, head.headers);
                    let rest = buf.split_off(head.len);
                    if status.is_informational() && status != http::StatusCode::SWITCHING_PROTOCOLS
                    {
                        buf = rest;
                        continue;
                    }
                    break (status, headers, rest);
                }
                Ok(None) => {}
            }
        }
        if buf.len() >= MAX_HEAD {
            return Outcome::BadHead;
        }
        match reader.read(MAX_HEAD - buf.len()) {
            Some(piece) => buf.extend_from_slice(piece),
            None => return Outcome::NoHead,
        }
    };
    if status == http::StatusCode::SWITCHING_PROTOCOLS {
        return Outcome::Answer {
            status: 101,
            body: Ok(Vec::new()),
        };
    }
    let mut pieces: Vec<&[u8]> = vec![&rest[..]];
    while let Some(piece) = reader.read(usize::MAX) {
        pieces.push(piece);
    }
    Outcome::Answer {
        status: status.as_u16(),
        body: decode_body(status, &mut headers, &pieces),
    }
}

fn decode_body(
    status: http::StatusCode,
    headers: &mut http::HeaderMap,
    pieces: &[&[u8]],
) -> Result<Vec<u8>, ()> {
    let mut decoder = BodyDecoder::new(status, headers).map_err(|_| ())?;
    assert!(!headers.contains_key(http::header::TRANSFER_ENCODING));
    assert!(!headers.contains_key(http::header::CONTENT_LENGTH));
    let mut was_done = decoder.is_done();
    for piece in pieces {
        if decoder.is_done() {
            break;
        }
        decoder.feed(piece).map_err(|_| ())?;
        assert!(
            decoder.held() <= MAX_RELAYED_BODY,
            "holds {} bytes",
            decoder.held()
        );
        assert!(!was_done || decoder.is_done(), "done, then not done");
        was_done = decoder.is_done();
    }
    if decoder.is_done() {
        Ok(decoder.into_body().to_vec())
    } else {
        decoder.finish_at_eof().map(|b| b.to_vec()).map_err(|_| ())
    }
}

/// An independent whole-buffer chunked decoder (RFC 9112 §7.1, as strict as wsgate's: CRLF line ends,
/// hex sizes of at most `MAX_CHUNK_LINE` digits and within a u64, extensions of at most `MAX_CHUNK_LINE`
/// bytes after the size), for a refusal's body: at most `MAX_RELAYED_BODY`, no trailers waited for.
/// `None`: malformed, over the limit, or incomplete.
fn reference_chunked(body: &[u8]) -> Option<Vec<u8>> {
    reference_chunks(body, MAX_RELAYED_BODY as u64).map(|(data, _)| data)
}

/// The same decoder with any `limit` on the data: the data, and where the last chunk's size line ends.
pub(crate) fn reference_chunks(mut body: &[u8], limit: u64) -> Option<(Vec<u8>, usize)> {
    let whole = body.len();
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let line = &body[..line_end];
        if line.contains(&b'\n') {
            return None;
        }
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        if digits == 0 || digits > MAX_CHUNK_LINE {
            return None;
        }
        let extension = &line[digits..];
        if !extension.is_empty() && !matches!(extension[0], b';' | b' ' | b'\t') {
            return None;
        }
        if extension.len() > MAX_CHUNK_LINE {
            return None;
        }
        let mut size: u64 = 0;
        for &d in &line[..digits] {
            size = size.checked_mul(16)? + u64::from((d as char).to_digit(16)?);
            if out.len() as u64 + size > limit {
                return None;
            }
        }
        body = &body[line_end + 2..];
        if size == 0 {
            return Some((out, whole - body.len()));
        }
        let size = usize::try_from(size).ok()?;
        let data = body.get(..size)?;
        out.extend_from_slice(data);
        if body.get(size..size.checked_add(2)?)? != b"\r\n" {
            return None;
        }
        body = &body[size + 2..];
    }
}

/// The backend-answer target. Invariants:
/// - the outcome does not depend on how the bytes were read: pieces as described, one read, one byte
///   per read all give the same status and body (or the same refusal);
/// - what the body decoder holds never exceeds `MAX_RELAYED_BODY`, and a body it hands over is within it;
/// - a chunked refusal decodes to exactly what an independent decoder of the same bytes gives (or both
///   refuse it), and a `Content-Length` body is exactly that many bytes.
pub fn backend_answer(data: &[u8]) {
    let Some((reads, stream)) = reads(data) else {
        return;
    };
    let pieces = read_answer(stream, &reads);
    let whole = read_answer(stream, &[stream.len()]);
    assert_eq!(pieces, whole, "the answer depends on the reads");
    if stream.len() <= 4096 {
        let bytes = vec![1; stream.len()];
        assert_eq!(read_answer(stream, &bytes), whole, "byte by byte");
    }
    let Outcome::Answer {
        status,
        body: Ok(body),
    } = &whole
    else {
        return;
    };
    assert!(body.len() <= MAX_RELAYED_BODY);
    // Compare with the reference where the framing is plainly chunked or a length.
    let Ok(Some(head)) = parse_head(stream) else {
        return;
    };
    let (headers, used) = (head.headers, head.len);
    if *status == 101 || (100..200).contains(status) || [204, 304].contains(status) {
        return;
    }
    let rest = &stream[used..];
    let encodings: Vec<String> = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
        .collect();
    if headers.contains_key(http::header::TRANSFER_ENCODING) {
        if encodings.last().is_some_and(|e| e == "chunked") {
            assert_eq!(
                Some(body.clone()),
                reference_chunked(rest),
                "chunked body differs from the reference"
            );
        }
    } else if let Some(length) = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        assert_eq!(body.len(), length);
        assert_eq!(&body[..], &rest[..length]);
    }
}

/// Starting points for the first-request target: upgrades clean and hostile, plain requests.
pub fn first_request_seeds() -> Vec<Vec<u8>> {
    let upgrade = |extra: &str| {
        format!(
            "GET /chat?room=1 HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\
             Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
        .into_bytes()
    };
    let mut seeds = Vec::new();
    for stream in [
        upgrade(""),
        upgrade("Host: other.example\r\n"),
        upgrade("Content-Length: 14\r\n"),
        upgrade("Content-Length: 0\r\n"),
        upgrade("Transfer-Encoding: chunked\r\n"),
        upgrade("Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\n"),
        upgrade("Connection: Host\r\n"),
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
        b"POST / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n".to_vec(),
        b"GET / HTTP/1.0\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\nUpgrade: websocket\nConnection: upgrade\n\n".to_vec(),
    ] {
        seeds.push([&[0u8][..], &stream].concat());
        seeds.push([&[3u8, 5, 0, 40][..], &stream].concat());
    }
    seeds
}

/// Starting points for the backend-answer target: a 101, refusals in every framing, hostile framing.
pub fn backend_answer_seeds() -> Vec<Vec<u8>> {
    let mut chunk_ext =
        b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n1;".to_vec();
    chunk_ext.extend(std::iter::repeat_n(b'a', 300));
    chunk_ext.extend_from_slice(b"\r\nX\r\n0\r\n\r\n");
    let streams: Vec<Vec<u8>> = vec![
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi"
            .to_vec(),
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\n\r\nnope!"
            .to_vec(),
        b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n\
          4;name=value\r\ndown\r\n0\r\n\r\n"
            .to_vec(),
        b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\nuntil the end".to_vec(),
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc".to_vec(),
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n\
          1\r\nz\r\n0\r\n\r\n"
            .to_vec(),
        b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
        chunk_ext,
    ];
    let mut seeds = Vec::new();
    for stream in streams {
        seeds.push([&[0u8][..], &stream].concat());
        seeds.push([&[4u8, 7, 0, 30, 255][..], &stream].concat());
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_pass() {
        for seed in first_request_seeds() {
            first_request(&seed);
        }
        for seed in backend_answer_seeds() {
            backend_answer(&seed);
        }
    }

    #[test]
    fn the_reference_decodes_chunks() {
        assert_eq!(
            reference_chunked(b"5;x\r\nhello\r\n0\r\n\r\n"),
            Some(b"hello".to_vec())
        );
        assert_eq!(reference_chunked(b"5\r\nhel"), None);
        assert_eq!(reference_chunked(b"g\r\n"), None);
    }

    #[test]
    #[ignore = "writes the seed files into corpus/"]
    fn write_seeds() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        for (dir, seeds) in [
            ("first_request", first_request_seeds()),
            ("backend_answer", backend_answer_seeds()),
        ] {
            let dir = root.join(dir);
            std::fs::create_dir_all(&dir).unwrap();
            for (i, seed) in seeds.iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i}")), seed).unwrap();
            }
        }
    }
}
