//! Ordinary HTTP requests through wsgate: round trips, streamed bodies, header rewriting, routing misses,
//! malformed and oversized requests, the client-side timeouts, backend failures, and backend keep-alive.
//!
//! Tests of timers (the header, keep-alive idle and backend-response timeouts, slow backends) run in
//! paused time, `#[tokio::test(start_paused = true)]`, as the tunnel's do (`tunnel.rs`): a virtual clock
//! that jumps to the next timer whenever every task waits, over the same loopback sockets and in-process
//! gateway, so each timeout is checked to the millisecond (`assert_at`) and costs no real time.

use std::convert::Infallible;
use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Waits until the server closes `stream` (EOF or reset); returns false if it is still open after `WAIT`.
/// Any bytes that arrive meanwhile are ignored.
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn plain_get_round_trip() {
    let backend = TestBackend::start("b1").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let (status, _headers, body) = http_get(addr, "/hello/world?q=1&r=%20").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello from b1");
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].target, "/hello/world?q=1&r=%20");
}

#[tokio::test]
async fn streamed_post_body_round_trip_is_not_buffered() {
    const CHUNK: usize = 64 << 10;
    const CHUNKS: usize = 128; // 8 MiB
    let chunk = |i: usize| Bytes::from(vec![(i % 251) as u8; CHUNK]);
    let backend = TestBackend::start("b1").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;

    // The request body is fed through a small channel, one chunk at a time.
    let (upload, chunks) = tokio::sync::mpsc::channel::<Bytes>(2);
    let body = StreamBody::new(Box::pin(futures_util::stream::unfold(
        chunks,
        |mut chunks| async move {
            let chunk = chunks.recv().await?;
            Some((Ok::<_, Infallible>(Frame::data(chunk)), chunks))
        },
    )));
    within("first chunk", upload.send(chunk(0)))
        .await
        .expect("send chunk");
    let request = Request::post("/upload")
        .header(http::header::HOST, addr.to_string())
        .body(body)
        .expect("request");
    let response = http_send(addr, request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut echoed = response.into_body();

    // Only the first chunk has been sent: its echo must come back before anything more goes up.
    // A proxy that buffered the whole upload would stall here.
    let mut received = Vec::with_capacity(CHUNK * CHUNKS);
    while received.len() < CHUNK {
        let frame = within("the first echoed bytes", echoed.frame())
            .await
            .expect("body ended early")
            .expect("body error");
        if let Ok(data) = frame.into_data() {
            received.extend_from_slice(&data);
        }
    }

    let uploader = tokio::spawn(async move {
        for i in 1..CHUNKS {
            upload.send(chunk(i)).await.expect("send chunk");
        }
        // Dropping the sender ends the request body.
    });
    while let Some(frame) = within("the echoed body", echoed.frame()).await {
        if let Ok(data) = frame.expect("body error").into_data() {
            received.extend_from_slice(&data);
        }
    }
    within("the upload", uploader).await.expect("uploader");
    assert_eq!(received.len(), CHUNK * CHUNKS);
    for (i, got) in received.chunks(CHUNK).enumerate() {
        assert!(
            got.iter().all(|&b| b == (i % 251) as u8),
            "chunk {i} came back altered"
        );
    }
}

#[tokio::test]
async fn hop_by_hop_request_headers_are_removed_and_forwarded_headers_set() {
    let backend = TestBackend::start("b1").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let request = format!(
        "GET /hop HTTP/1.1\r\nHost: {addr}\r\n\
         Connection: keep-alive, Upgrade, X-Custom-Hop\r\n\
         X-Custom-Hop: secret\r\n\
         Keep-Alive: timeout=5\r\n\
         TE: trailers\r\n\
         Upgrade: h2c\r\n\
         Proxy-Connection: keep-alive\r\n\
         X-Kept: yes\r\n\
         Cookie: a=1\r\n\
         X-Forwarded-For: 198.51.100.1\r\n\r\n"
    );
    let response = raw_exchange(addr, request.as_bytes()).await;
    assert_eq!(response.status, 200, "{}", response.body_text());
    assert_eq!(response.body_text(), "hello from b1");
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    for gone in [
        "connection",
        "x-custom-hop",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-connection",
    ] {
        assert!(!h.contains_key(gone), "`{gone}` reached the backend: {h:?}");
    }
    assert_eq!(h["x-kept"], "yes");
    assert_eq!(h["cookie"], "a=1");
    assert_eq!(h["x-forwarded-for"], "198.51.100.1, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], addr.to_string().as_str());
    assert_eq!(h["host"], addr.to_string().as_str());
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_removed() {
    let backend = http_backend(|_req| async {
        Response::builder()
            .header("connection", "X-Resp-Hop")
            .header("x-resp-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("x-resp-kept", "yes")
            .body(backend_body("done"))
            .expect("response")
    })
    .await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let response = raw_exchange(addr, request.as_bytes()).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body_text(), "done");
    assert_eq!(response.header("x-resp-kept"), Some("yes"));
    for gone in ["x-resp-hop", "keep-alive", "proxy-connection"] {
        assert_eq!(response.header(gone), None, "`{gone}` reached the client");
    }
    assert!(
        response
            .header("connection")
            .is_none_or(|c| !c.to_ascii_lowercase().contains("x-resp-hop")),
        "{:?}",
        response.headers
    );
}

#[tokio::test]
async fn request_matching_no_route_gets_404() {
    let backend = TestBackend::start("b1").await;
    let text = format!(
        r#"
[[listener]]
name = "main"
listen = "127.0.0.1:0"

[[route]]
name = "api"
path_prefix = "/api"
pool = "p"

[pool.p]
backends = [ {{ addr = "{}" }} ]
"#,
        backend.addr
    );
    let (_gateway, addr) = gateway(&text).await;
    let (status, _, _) = http_get(addr, "/other").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = http_get(addr, "/apix").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(backend.seen().is_empty());
    let (status, _, body) = http_get(addr, "/api/items").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello from b1");
}

#[tokio::test]
async fn malformed_request_gets_400_and_the_gateway_keeps_serving() {
    let backend = TestBackend::start("b1").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    for garbage in [
        &b"THIS IS NOT HTTP\r\n\r\n"[..],
        b"GET / HTTP/1.1 trailing\r\n\r\n",
        b"GET /\x01path HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let response = raw_exchange(addr, garbage).await;
        assert_eq!(
            response.status,
            400,
            "for {:?}",
            String::from_utf8_lossy(garbage)
        );
    }
    assert!(backend.seen().is_empty());
    let (status, _, body) = http_get(addr, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello from b1");
}

#[tokio::test]
async fn oversized_request_head_gets_431() {
    let backend = TestBackend::start("b1").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let mut stream = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 << 10)
    );
    let (mut read_half, mut write_half) = stream.split();
    // The gateway may answer and close before the whole head is written: a write error is fine.
    let write = async {
        let _ = write_half.write_all(request.as_bytes()).await;
    };
    let read = async {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n)) = tokio::time::timeout(WAIT, read_half.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if out.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    let ((), head) = within("the 431", async { tokio::join!(write, read) }).await;
    assert!(head.starts_with("HTTP/1.1 431"), "got {head:?}");
    assert!(backend.seen().is_empty());
    // Heads under the limit (64 KiB by default) still pass, in one write or in pieces.
    let (status, _, _) = http_get(addr, &format!("/{}", "p".repeat(8 << 10))).await;
    assert_eq!(status, StatusCode::OK);
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(60 << 10)
    );
    let response = raw_exchange(addr, request.as_bytes()).await;
    assert_eq!(response.status, 200);
    // Just over the limit is refused as well, not only far over it.
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(65 << 10)
    );
    let response = raw_exchange(addr, request.as_bytes()).await;
    assert_eq!(response.status, 431);
}

#[tokio::test(start_paused = true)]
async fn slowloris_client_is_cut_off_after_the_header_timeout() {
    // The header timer of a new connection runs from its accept (here: the client's connect, at the same
    // virtual instant).
    let header = ms(500);
    let backend = TestBackend::start("b1").await;
    let (_gateway, addr) =
        gateway(&config_with_timeouts(&[backend.addr], "header = \"500ms\"")).await;

    // Half a head, then silence.
    let started = Instant::now();
    let mut stream = tcp_connect(addr).await;
    raw_write(
        &mut stream,
        format!("GET / HTTP/1.1\r\nHost: {addr}\r\n").as_bytes(),
    )
    .await;
    assert!(closed_by_server(&mut stream).await, "half a head kept open");
    assert_at("half a head cut off", started.elapsed(), header);

    // A head dripped one byte every 100 ms: each byte is progress, yet the whole head is late.
    let started = Instant::now();
    let mut stream = tcp_connect(addr).await;
    let head = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nX-Slow: {}",
        "a".repeat(100)
    );
    let mut cut = false;
    for byte in head.as_bytes() {
        if stream.write_all(&[*byte]).await.is_err() {
            cut = true;
            break;
        }
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut = true;
                break;
            }
            _ => {}
        }
    }
    let elapsed = started.elapsed();
    assert!(cut, "a dripped head was never cut off ({elapsed:?})");
    assert_at("the dripped head cut off", elapsed, header);

    // A connection that sends nothing at all is closed too.
    let started = Instant::now();
    let mut stream = tcp_connect(addr).await;
    assert!(
        closed_by_server(&mut stream).await,
        "silent client kept open"
    );
    assert_at("the silent client cut off", started.elapsed(), header);
    assert!(backend.seen().is_empty());

    // A prompt client is served as usual.
    let (status, _, _) = http_get(addr, "/").await;
    assert_eq!(status, StatusCode::OK);
}

/// On a keep-alive connection the head of each request is held to the header timeout from its first
/// byte, whether it comes at once after the last response or after an idle pause longer than that
/// timeout, and however long the idle timeout is: the header deadline comes sooner than the idle one.
#[tokio::test(start_paused = true)]
async fn a_later_request_head_is_held_to_the_header_timeout() {
    let header = ms(500);
    let backend = TestBackend::start("b1").await;
    let (_gateway, addr) = gateway(&config_with_timeouts(
        &[backend.addr],
        "header = \"500ms\"\nhttp_idle = \"5s\"",
    ))
    .await;
    let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let half = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n");
    for pause in [Duration::ZERO, ms(1_200)] {
        let mut stream = tcp_connect(addr).await;
        raw_write(&mut stream, request.as_bytes()).await;
        assert_eq!(read_response(&mut stream).await.status, 200);
        tokio::time::sleep(pause).await;
        let started = Instant::now();
        raw_write(&mut stream, half.as_bytes()).await;
        assert!(closed_by_server(&mut stream).await, "half a head kept open");
        assert_at(
            &format!("half a second head, {pause:?} after the first answer"),
            started.elapsed(),
            header,
        );
    }
}

/// Streams a chunked body: `chunks` chunks, `gap` apart.
async fn slow_backend(chunks: usize, gap: Duration) -> RawBackend {
    RawBackend::start(move |mut stream| async move {
        loop {
            let (_head, _) = read_head(&mut stream).await;
            if stream
                .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            for i in 0..chunks {
                tokio::time::sleep(gap).await;
                let chunk = format!("chunk {i}\n");
                let data = format!("{:x}\r\n{chunk}\r\n", chunk.len());
                if stream.write_all(data.as_bytes()).await.is_err() {
                    return;
                }
            }
            if stream.write_all(b"0\r\n\r\n").await.is_err() {
                return;
            }
        }
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn idle_keep_alive_client_is_closed_but_not_while_a_slow_response_streams() {
    let (chunks, gap, http_idle) = (7, ms(300), ms(700));
    let backend = slow_backend(chunks, gap).await;
    let (_gateway, addr) = gateway(&config_with_timeouts(
        &[backend.addr],
        "header = \"500ms\"\nhttp_idle = \"700ms\"",
    ))
    .await;
    let mut stream = tcp_connect(addr).await;
    let request = format!("GET /slow HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let expected: String = (0..chunks).map(|i| format!("chunk {i}\n")).collect();

    // The response takes 2.1 s, three times the idle timeout and four times the header timeout, and
    // comes whole, as fast as the backend sends it.
    let started = Instant::now();
    raw_write(&mut stream, request.as_bytes()).await;
    let response = read_response(&mut stream).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body_text(), expected);
    assert_at("the slow response", started.elapsed(), gap * chunks as u32);

    // A second request well within the idle time is served on the same connection.
    tokio::time::sleep(ms(300)).await;
    let started = Instant::now();
    raw_write(&mut stream, request.as_bytes()).await;
    let response = read_response(&mut stream).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body_text(), expected);
    assert_at(
        "the second slow response",
        started.elapsed(),
        gap * chunks as u32,
    );
    assert_eq!(
        backend.accepts(),
        1,
        "the backend connection was not reused"
    );

    // Then nothing: the idle timeout closes it, counted from the end of the response.
    let idle_from = Instant::now();
    assert!(closed_by_server(&mut stream).await, "idle client kept open");
    assert_at("the idle close", idle_from.elapsed(), http_idle);
}

#[tokio::test]
async fn connect_failure_moves_on_to_the_next_backend() {
    let live = TestBackend::start("live").await;
    let (_gateway, addr) = gateway(&config_text(&[dead_addr(), live.addr], "")).await;
    // Ties are broken at random: over 20 requests the dead backend comes first many times.
    for _ in 0..20 {
        let (status, _, body) = http_get(addr, "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "hello from live");
    }
    assert_eq!(live.seen().len(), 20);
    // With only dead backends: 502.
    let (_gateway, addr) = gateway(&config_text(&[dead_addr(), dead_addr()], "")).await;
    let (status, _, _) = http_get(addr, "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
}

#[tokio::test(start_paused = true)]
async fn silent_backend_gives_504_after_the_backend_response_timeout() {
    let backend = RawBackend::start(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        // Never answer; keep the connection until the gateway drops it.
        let mut buf = [0u8; 1024];
        while let Ok(Ok(n)) = tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            if n == 0 {
                return;
            }
        }
    })
    .await;
    let (_gateway, addr) = gateway(&config_with_timeouts(
        &[backend.addr],
        "backend_response = \"500ms\"",
    ))
    .await;
    let started = Instant::now();
    let (status, _, _) = http_get(addr, "/").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_at("the 504", started.elapsed(), ms(500));
}

#[tokio::test]
async fn backend_connections_are_kept_alive_and_reused() {
    let backend = http_backend(|req: Request<hyper::body::Incoming>| async move {
        Response::new(backend_body(format!("path {}", req.uri().path())))
    })
    .await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    // Sequential requests on fresh client connections...
    for i in 0..25 {
        let (status, _, body) = http_get(addr, &format!("/fresh/{i}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, format!("path /fresh/{i}"));
    }
    // ...and on one keep-alive client connection.
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    for i in 0..25 {
        let request = Request::get(format!("/kept/{i}"))
            .header(http::header::HOST, addr.to_string())
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request");
        within("ready", sender.ready()).await.expect("ready");
        let response = within("response", sender.send_request(request))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        let body = within("body", response.into_body().collect())
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body, format!("path /kept/{i}"));
    }
    assert!(
        backend.accepts() <= 2,
        "50 sequential requests opened {} backend connections",
        backend.accepts()
    );
}

#[tokio::test]
async fn bodiless_responses_keep_the_backend_connection() {
    let backend = http_backend(|req: Request<hyper::body::Incoming>| async move {
        let mut response = Response::new(backend_body(""));
        if req.uri().path() == "/no-content" {
            *response.status_mut() = StatusCode::NO_CONTENT;
        } else {
            response
                .headers_mut()
                .insert(http::header::CONTENT_LENGTH, "0".parse().expect("header"));
        }
        response
    })
    .await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    for i in 0..10 {
        let (status, _, body) = http_get(addr, "/no-content").await;
        assert_eq!(status, StatusCode::NO_CONTENT, "request {i}");
        assert!(body.is_empty());
        let (status, _, body) = http_get(addr, "/empty").await;
        assert_eq!(status, StatusCode::OK, "request {i}");
        assert!(body.is_empty());
        let request = Request::head("/empty")
            .header(http::header::HOST, addr.to_string())
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request");
        let response = http_send(addr, request).await;
        assert_eq!(response.status(), StatusCode::OK, "request {i}");
    }
    assert!(
        backend.accepts() <= 2,
        "30 sequential bodiless responses opened {} backend connections",
        backend.accepts()
    );
}

#[tokio::test]
async fn backend_closing_after_each_response_is_handled() {
    let backend = http_backend(|req: Request<hyper::body::Incoming>| async move {
        Response::builder()
            .header(http::header::CONNECTION, "close")
            .body(backend_body(format!("closing after {}", req.uri().path())))
            .expect("response")
    })
    .await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    for i in 0..20 {
        let (status, headers, body) = http_get(addr, &format!("/{i}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, format!("closing after /{i}"));
        // The backend's `Connection: close` is about its own hop, not the client's.
        assert!(!headers.contains_key(http::header::CONNECTION));
    }
    assert_eq!(backend.accepts(), 20);
}

#[tokio::test]
async fn several_forwarded_for_lines_are_kept_in_order() {
    let backend = TestBackend::start("b1").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nX-Forwarded-For: 192.0.2.1\r\n\
         X-Forwarded-For: 198.51.100.2, 198.51.100.3\r\n\r\n"
    );
    let response = raw_exchange(addr, request.as_bytes()).await;
    assert_eq!(response.status, 200);
    let seen = backend.seen();
    let values: Vec<_> = seen[0].headers.get_all("x-forwarded-for").iter().collect();
    assert_eq!(
        values,
        ["192.0.2.1, 198.51.100.2, 198.51.100.3, 127.0.0.1"],
        "{values:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn slow_backend_answer_is_not_cut_by_client_timeouts() {
    // The answer head comes 1.5 s after the request: three times `header`, twice `http_idle`.
    let delay = ms(1500);
    let backend = RawBackend::start(move |mut stream| async move {
        let _ = read_head(&mut stream).await;
        tokio::time::sleep(delay).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
            .await;
        let mut buf = [0u8; 64];
        while let Ok(Ok(n)) = tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            if n == 0 {
                return;
            }
        }
    })
    .await;
    let (_gateway, addr) = gateway(&config_with_timeouts(
        &[backend.addr],
        "header = \"500ms\"\nhttp_idle = \"700ms\"",
    ))
    .await;
    let started = Instant::now();
    let (status, _, body) = http_get(addr, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "slow");
    assert_at("the slow answer", started.elapsed(), delay);
}
