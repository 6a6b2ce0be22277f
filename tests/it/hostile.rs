//! Hostile clients and misbehaving backends, over real sockets: each test is one attack that once
//! worked against wsgate (request smuggling into a tunnel, getting healthy backends ejected, growing
//! wsgate's memory from a backend, holding connections by not reading, desyncing the frame stream,
//! header spoofing, configs that pass `check` but break `run`), and checks it no longer does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::*;
use crate::tunnel_support::*;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Reads until the peer closes the connection (EOF or reset), discarding what arrives; fails the test
/// if it is still open after `WAIT`.
async fn read_to_end(stream: &mut TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match within("the connection to close", stream.read(&mut buf)).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// A backend that counts every TCP connection and answers nothing: for requests that must never
/// reach a backend.
async fn untouched_backend() -> RawBackend {
    RawBackend::start(|_stream| async {}).await
}

// ---------------------------------------------------------------------------------------------------------
// 1. An upgrade with a body

#[tokio::test]
async fn an_upgrade_with_a_body_is_refused_on_the_first_request_path() {
    let backend = untouched_backend().await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    // The body would be read by some backends and taken for frames by others: either way not the
    // stream wsgate checks. 400, nothing forwarded, the connection closed.
    for (extra, body) in [
        (
            "Content-Length: 14\r\n",
            &b"\x81\x8c\0\0\0\0smuggled!!!!"[..14],
        ),
        (
            "Transfer-Encoding: chunked\r\n",
            &b"e\r\n\x81\x8c\0\0\0\0smuggled\r\n0\r\n\r\n"[..],
        ),
    ] {
        let mut request = upgrade_request(addr, "/ws", extra).into_bytes();
        request.extend_from_slice(body);
        let mut stream = raw_send(addr, &request).await;
        let response = read_response(&mut stream).await;
        assert_eq!(response.status, 400, "{extra}: {}", response.body_text());
        assert_eq!(response.header("connection"), Some("close"), "{extra}");
        read_to_end(&mut stream).await;
    }
    assert_eq!(
        backend.accepts(),
        0,
        "an upgrade with a body reached a backend"
    );
}

#[tokio::test]
async fn an_upgrade_with_a_body_is_refused_after_other_requests_too() {
    let backend = TestBackend::start("b").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    // A plain request first: the upgrade behind it is read by hyper, not by wsgate's first-request path.
    let mut stream = raw_send(
        addr,
        format!("GET /plain HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(read_response(&mut stream).await.status, 200);
    let mut request = upgrade_request(addr, "/ws", "Content-Length: 14\r\n").into_bytes();
    request.extend_from_slice(b"\x81\x8c\0\0\0\0smuggled!!!!");
    raw_write(&mut stream, &request).await;
    let response = read_response(&mut stream).await;
    assert_eq!(response.status, 400, "{}", response.body_text());
    assert_eq!(response.header("connection"), Some("close"));
    read_to_end(&mut stream).await;
    let upgrades = backend
        .seen()
        .iter()
        .filter(|s| s.headers.contains_key("upgrade"))
        .count();
    assert_eq!(upgrades, 0, "an upgrade with a body reached the backend");
}

#[tokio::test]
async fn an_upgrade_with_content_length_zero_passes_without_it() {
    let backend = TestBackend::start("b").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let request = upgrade_request(addr, "/ws", "Content-Length: 0\r\n");
    let mut stream = raw_send(addr, request.as_bytes()).await;
    let (head, _) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    assert!(
        !seen[0].headers.contains_key("content-length"),
        "Content-Length forwarded on an upgrade: {:?}",
        seen[0].headers
    );
}

// ---------------------------------------------------------------------------------------------------------
// 2. Repeated singleton headers, and what counts against a backend

/// A WebSocket backend that answers with the accept key of the LAST `Sec-WebSocket-Key` it got, as
/// some servers do, and counts the upgrades it saw.
async fn last_key_backend() -> (RawBackend, Arc<AtomicUsize>) {
    let upgrades = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&upgrades);
    let backend = RawBackend::start(move |mut stream| {
        let seen = Arc::clone(&seen);
        async move {
            let (head, _) = read_head(&mut stream).await;
            seen.fetch_add(1, Ordering::SeqCst);
            let key = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-key"))
                .map(|(_, v)| v.trim().to_string())
                .next_back()
                .unwrap_or_default();
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\n\r\n",
                accept_key(&key)
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            let mut sink = [0u8; 1024];
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        }
    })
    .await;
    (backend, upgrades)
}

#[tokio::test]
async fn repeated_singleton_headers_get_400_and_cannot_get_a_backend_ejected() {
    let (backend, upgrades) = last_key_backend().await;
    let text = config_text(&[backend.addr], "").replace(
        "policy = \"least_conn\"",
        "policy = \"least_conn\"\nmax_fails = 1\nfail_timeout = \"60s\"",
    );
    let (gateway, addr) = gateway(&text).await;
    let second_key = "Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\n";
    let attacks = [
        upgrade_request(addr, "/ws", second_key),
        upgrade_request(addr, "/ws", "Sec-WebSocket-Version: 8\r\n"),
        upgrade_request(addr, "/ws", "Host: other.example\r\n"),
        format!("GET / HTTP/1.1\r\nHost: {addr}\r\nHost: other.example\r\n\r\n"),
        upgrade_request(addr, "/ws", "Content-Length: 0\r\nContent-Length: 0\r\n"),
        // hyper reads plain requests: it refuses differing lengths itself, and takes identical repeated
        // ones as one (RFC 9110 §8.6), which leaves no doubt about where the body ends.
        format!(
            "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx"
        ),
    ];
    // Every attack several times over: with max_fails = 1, one failure counted would eject the backend.
    for _ in 0..3 {
        for attack in &attacks {
            let response = raw_exchange(addr, attack.as_bytes()).await;
            assert_eq!(response.status, 400, "{attack:?}: {}", response.body_text());
        }
    }
    assert_eq!(
        backend.accepts(),
        0,
        "a refused request reached the backend"
    );
    // The backend is still in service: an honest upgrade gets its 101.
    let honest = raw_exchange(addr, upgrade_request(addr, "/ws", "").as_bytes()).await;
    assert_eq!(honest.status, 101, "{}", honest.body_text());
    assert_eq!(upgrades.load(Ordering::SeqCst), 1);
    let up = format!(
        "wsgate_backend_up{{backend=\"{}\",pool=\"p\"}} 1",
        backend.addr
    );
    assert!(gateway.metrics_text().lines().any(|l| l == up), "{up}");
}

/// What makes an application answer 5xx may be the request itself (a path it fails on, a limiter): such
/// answers are relayed, and passed on to the next backend, but a client sending them cannot eject the
/// backends. Passive health counts only what a backend did wrong on its own.
#[tokio::test]
async fn a_client_that_makes_backends_answer_5xx_cannot_eject_them() {
    let handler = |req: http::Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/ws/boom" {
            let mut response = Response::new(backend_body("down\n"));
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            return response;
        }
        let key = req
            .headers()
            .get(http::header::SEC_WEBSOCKET_KEY)
            .and_then(|k| k.to_str().ok())
            .unwrap_or_default();
        let mut response = Response::new(backend_body(""));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(http::header::UPGRADE, "websocket".parse().expect("static"));
        headers.insert(http::header::CONNECTION, "Upgrade".parse().expect("static"));
        let accept = accept_key(key).parse().expect("base64");
        headers.insert(http::header::SEC_WEBSOCKET_ACCEPT, accept);
        response
    };
    let (one, two) = (http_backend(handler).await, http_backend(handler).await);
    let text = config_text(&[one.addr, two.addr], "").replace(
        "policy = \"least_conn\"",
        "policy = \"least_conn\"\nmax_fails = 1\nfail_timeout = \"60s\"",
    );
    let (gateway, addr) = gateway(&text).await;
    let boom = upgrade_request(addr, "/ws/boom", "");
    for _ in 0..3 {
        let response = raw_exchange(addr, boom.as_bytes()).await;
        assert_eq!(response.status, 503, "the backend's own answer is relayed");
        assert_eq!(response.body_text(), "down\n");
    }
    // Each 5xx went on to the other backend before it was relayed: both backends answered every time.
    assert_eq!(one.accepts() + two.accepts(), 6);
    assert!(
        gateway.backends().iter().all(|b| b.available && !b.ejected),
        "{:?}",
        gateway.backends()
    );
    let honest = raw_exchange(addr, upgrade_request(addr, "/ws", "").as_bytes()).await;
    assert_eq!(honest.status, 101, "{}", honest.body_text());
}

// ---------------------------------------------------------------------------------------------------------
// 3. A backend's refusal cannot grow wsgate's memory

#[tokio::test]
async fn a_chunked_refusal_with_huge_chunk_extensions_is_cut_off() {
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&sent);
    // One-byte chunks each behind a 1 MB extension: tiny decoded, huge raw. wsgate used to keep every raw
    // byte until the body ended.
    let backend = RawBackend::start(move |mut stream| {
        let counter = Arc::clone(&counter);
        async move {
            let _ = read_head(&mut stream).await;
            let head = b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n";
            if stream.write_all(head).await.is_err() {
                return;
            }
            let mut chunk = b"1;".to_vec();
            chunk.extend(std::iter::repeat_n(b'a', 1 << 20));
            chunk.extend_from_slice(b"\r\nX\r\n");
            for _ in 0..64 {
                if stream.write_all(&chunk).await.is_err() {
                    return;
                }
                counter.fetch_add(1, Ordering::SeqCst);
            }
            let _ = stream.write_all(b"0\r\n\r\n").await;
        }
    })
    .await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let response = raw_exchange(addr, upgrade_request(addr, "/ws", "").as_bytes()).await;
    assert_eq!(response.status, 502, "{}", response.body_text());
    assert!(
        sent.load(Ordering::SeqCst) < 8,
        "wsgate read {} MB of chunk extensions before giving up",
        sent.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn a_chunked_refusal_of_ordinary_size_is_relayed() {
    let backend = RawBackend::start(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let answer = b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n\
                       4;name=value\r\nnot \r\n7\r\nallowed\r\n0\r\n\r\n";
        let _ = stream.write_all(answer).await;
    })
    .await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let response = raw_exchange(addr, upgrade_request(addr, "/ws", "").as_bytes()).await;
    assert_eq!(response.status, 403);
    assert_eq!(response.body_text(), "not allowed");
}

// ---------------------------------------------------------------------------------------------------------
// 4. A client that stops reading an HTTP response

/// Sets its flag when dropped: tells a test that a backend's response body was abandoned.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

// Paused time (as for the two tunnel write stalls below): the clock moves only when every task waits, so
// the stall is timed exactly, however loaded the machine.
#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_a_response_loses_it_and_frees_the_backend() {
    let abandoned = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&abandoned);
    // An endless download (bounded: 1 GiB), streamed as fast as wsgate takes it.
    let backend = http_backend(move |_req| {
        let flag = Arc::clone(&flag);
        async move {
            let guard = DropFlag(flag);
            let chunks = futures_util::stream::unfold((guard, 0u32), |(guard, n)| async move {
                (n < 16_384).then(|| {
                    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                    (
                        Ok::<_, hyper::Error>(hyper::body::Frame::data(chunk)),
                        (guard, n + 1),
                    )
                })
            });
            Response::new(StreamBody::new(chunks).boxed())
        }
    })
    .await;
    let text = config_text(&[backend.addr], "")
        .replace("[[route]]", "[timeouts]\nsend = \"300ms\"\n\n[[route]]");
    let (_gateway, addr) = gateway(&text).await;
    let mut stream = raw_send(
        addr,
        format!("GET /big HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes(),
    )
    .await;
    let mut first = [0u8; 100];
    within("the first bytes", stream.read_exact(&mut first))
        .await
        .expect("read");
    assert!(first.starts_with(b"HTTP/1.1 200"));
    // Then nothing more is read. wsgate's writes stall; after `send` it drops the client connection and
    // the backend request behind it.
    let stalled = Instant::now();
    let deadline = stalled + WAIT;
    let poll = Duration::from_millis(20);
    while !abandoned.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the backend response is still being sent"
        );
        tokio::time::sleep(poll).await;
    }
    // The client's buffers were full at once (the download is as fast as wsgate takes it): dropped `send`
    // later, as seen by this loop.
    let send = Duration::from_millis(300);
    let elapsed = stalled.elapsed();
    assert!(
        elapsed >= send && elapsed <= send + poll + TICK,
        "the response was dropped {elapsed:?} after the client stopped reading"
    );
    read_to_end(&mut stream).await;
}

// ---------------------------------------------------------------------------------------------------------
// 5. A tunnel whose client does not read

/// Reads frames off `stream` (skipping the others) until a Close, within `WAIT`.
async fn next_close(stream: &mut (impl AsyncReadExt + Unpin), what: &str) -> Frame {
    let mut received = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let n = within(what, stream.read(&mut buf)).await.expect("read");
        assert!(n > 0, "the connection closed without a Close");
        received.extend_from_slice(&buf[..n]);
        let mut offset = 0;
        while let Some((frame, used)) = parse_frame(&received[offset..]) {
            offset += used;
            if frame.opcode == OP_CLOSE {
                return frame;
            }
        }
        received.drain(..offset);
    }
}

#[tokio::test(start_paused = true)]
async fn a_tunnel_whose_client_reads_nothing_ends_even_while_it_sends_pongs() {
    let backend = WsBackend::bind().await;
    let settings = r#"send_timeout = "500ms", ping_interval = "200ms", pong_timeout = "10s", idle_timeout = "60s""#;
    let (gateway, addr) = gateway(&config_text(&[backend.addr], settings)).await;
    let (mut client, server) =
        tokio::join!(RawPeer::connect_small_window(addr, 4096), backend.accept());
    // The backend floods the client, which reads nothing, but sends a pong every 100 ms (a frame from it
    // used to count as a sign of life, and waiting bytes as activity: the tunnel lived forever).
    let pong = client.frame_bytes(true, OP_PONG, b"alive");
    let (mut server_read, mut server_write) = server.stream.into_split();
    let started = Instant::now();
    let flood = tokio::spawn(async move {
        let frame = encode(true, 0, OP_BINARY, None, &vec![b'd'; 16 * 1024]);
        for _ in 0..65_536 {
            if server_write.write_all(&frame).await.is_err() {
                return;
            }
        }
    });
    let ponging = tokio::spawn(async move {
        for _ in 0..200 {
            if client.stream.write_all(&pong).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        client
    });
    // What wsgate sends the backend: the client's pongs, then its Close 1001.
    let close = next_close(&mut server_read, "wsgate's Close to the backend").await;
    assert_eq!(close.close(), (1001, "client not reading".to_string()));
    // The client's window was full at once (paused time: the flood takes no time), and wsgate gave up on
    // it send_timeout later, pongs or not.
    assert_at(
        "wsgate's Close to the backend",
        started.elapsed(),
        Duration::from_millis(500),
    );
    flood.abort();
    ponging.abort();
    wait_metric(&gateway, &closes("client_stalled", 1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_tunnel_whose_backend_reads_nothing_ends() {
    let backend = WsBackend::bind().await;
    let settings = r#"send_timeout = "500ms", ping_interval = "0s", idle_timeout = "60s""#;
    let (gateway, addr) = gateway(&config_text(&[backend.addr], settings)).await;
    let (client, _server) = raw_pair(addr, &backend).await;
    // The backend reads nothing: the client's frames pile up until wsgate gives up on the backend.
    let frame = client.frame_bytes(true, OP_BINARY, &vec![b'u'; 16 * 1024]);
    let (mut client_read, mut client_write) = client.stream.into_split();
    let started = Instant::now();
    let flood = tokio::spawn(async move {
        for _ in 0..65_536 {
            if client_write.write_all(&frame).await.is_err() {
                return;
            }
        }
    });
    let close = next_close(&mut client_read, "wsgate's Close to the client").await;
    assert_eq!(close.close(), (1001, "backend not reading".to_string()));
    assert_at(
        "wsgate's Close to the client",
        started.elapsed(),
        Duration::from_millis(500),
    );
    flood.abort();
    wait_metric(&gateway, &closes("backend_stalled", 1)).await;
}

// ---------------------------------------------------------------------------------------------------------
// 6. Control frames with a padded length

#[tokio::test]
async fn a_ping_with_a_padded_length_is_a_protocol_error_however_it_is_cut() {
    let backend = WsBackend::bind().await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], r#"ping_interval = "0s""#)).await;
    // A 125-byte ping in the 64-bit length form: 139 bytes, more than any valid control frame.
    let mut ping = vec![0x89, 0x80 | 127];
    ping.extend_from_slice(&125u64.to_be_bytes());
    ping.extend_from_slice(&[0, 0, 0, 0]);
    ping.extend_from_slice(&[b'p'; 125]);
    for cut in [1, 9, 14, 100, ping.len()] {
        let (mut client, mut server) = raw_pair(addr, &backend).await;
        client.write_raw(&ping[..cut]).await;
        if cut < ping.len() {
            // A pause so that wsgate usually reads the two parts apart; the verdict is the same either way.
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.write_raw(&ping[cut..]).await;
        }
        client.expect_close(1002, "protocol error").await;
        server.expect_close(1001, "client protocol error").await;
    }
}

// ---------------------------------------------------------------------------------------------------------
// 7. Host and the client's address

#[tokio::test]
async fn connection_cannot_strip_host_and_the_client_cannot_choose_its_address() {
    let backend = TestBackend::start("b").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let request = "GET /h HTTP/1.1\r\nHost: example.com\r\nConnection: Host, X-Drop\r\nX-Drop: 1\r\n\
                   X-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6;proto=https\r\n\r\n";
    let response = raw_exchange(addr, request.as_bytes()).await;
    assert_eq!(response.status, 200);
    let upgrade = upgrade_request(
        addr,
        "/ws",
        "X-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n",
    );
    let response = raw_exchange(addr, upgrade.as_bytes()).await;
    assert_eq!(response.status, 101);
    let seen = backend.seen();
    assert_eq!(seen.len(), 2);
    let plain = &seen[0].headers;
    assert_eq!(plain["host"], "example.com", "Host removed by Connection");
    assert!(
        !plain.contains_key("x-drop"),
        "a header Connection names was forwarded"
    );
    for headers in [plain, &seen[1].headers] {
        assert_eq!(headers["x-real-ip"], "127.0.0.1");
        let forwarded = headers["forwarded"].to_str().unwrap();
        assert!(
            forwarded.starts_with("for=127.0.0.1;proto=http"),
            "{forwarded}"
        );
        assert_eq!(headers.get_all("forwarded").iter().count(), 1);
    }
}

// ---------------------------------------------------------------------------------------------------------
// 8. Limits that `check` accepts must be ones `run` can honour

#[tokio::test]
async fn a_max_connections_change_applies_on_reload() {
    let backend = TestBackend::start("b").await;
    let text = config_text(&[backend.addr], "")
        .replace("[[route]]", "[limits]\nmax_connections = 1\n\n[[route]]");
    let (gateway, addr) = gateway(&text).await;
    let get = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    // The one place is held by a keep-alive connection.
    let mut first = raw_send(addr, get.as_bytes()).await;
    assert_eq!(read_response(&mut first).await.status, 200);
    let mut second = raw_send(addr, get.as_bytes()).await;
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(200), second.read(&mut byte))
            .await
            .is_err(),
        "a second connection was served under max_connections = 1"
    );
    let raised = text.replace("max_connections = 1", "max_connections = 2");
    let config = wsgate::Config::from_toml(&raised, "test.toml").expect("config");
    within("reload", gateway.reload(config))
        .await
        .expect("reload");
    assert_eq!(read_response(&mut second).await.status, 200);
}

#[test]
fn limits_run_cannot_honour_are_refused_by_check() {
    let text = config_text(&["127.0.0.1:1".parse().unwrap()], "").replace(
        "[[route]]",
        "[limits]\nmax_connections = 9223372036854775807\n\n[[route]]",
    );
    let errors = wsgate::Config::from_toml(&text, "big.toml").expect_err("accepted");
    let error = &errors.0[0];
    assert_eq!(error.key, "limits.max_connections");
    assert_eq!(
        error.line,
        text.lines()
            .position(|l| l.starts_with("max_connections"))
            .unwrap()
            + 1
    );
    assert!(error.to_string().starts_with("big.toml:"), "{error}");
}

// ---------------------------------------------------------------------------------------------------------
// Also seen: a client that leaves during the backend handshake

#[tokio::test]
async fn a_client_that_leaves_during_the_handshake_frees_the_backend_connection() {
    let closed = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&closed);
    // A backend that reads the upgrade and never answers; it notes when wsgate hangs up on it.
    let backend = RawBackend::start(move |mut stream| {
        let flag = Arc::clone(&flag);
        async move {
            let _ = read_head(&mut stream).await;
            let mut byte = [0u8; 1];
            let _ = stream.read(&mut byte).await;
            flag.store(true, Ordering::SeqCst);
        }
    })
    .await;
    let text = config_text(&[backend.addr], "")
        .replace("[[route]]", "[timeouts]\nhandshake = \"60s\"\n\n[[route]]");
    let (_gateway, addr) = gateway(&text).await;
    let stream = raw_send(addr, upgrade_request(addr, "/ws", "").as_bytes()).await;
    let deadline = Instant::now() + WAIT;
    while backend.accepts() == 0 {
        assert!(
            Instant::now() < deadline,
            "the upgrade never reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(stream);
    while !closed.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the backend connection is held after the client left"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
