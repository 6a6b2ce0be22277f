//! HTTP/2 clients that attack: the rapid-reset flood (streams opened and cancelled faster than any
//! server serves them), the CONTINUATION flood (a header block that never ends), a header list over the
//! limit, and a WebSocket over HTTP/2 whose client stops reading. Written with raw frames where a client
//! library would refuse to misbehave.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::SinkExt;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;
use crate::h2::*;
use crate::tunnel_support::*;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK block for `GET http://localhost/` from the static table, `:authority` as a literal that is
/// not indexed (so every copy is the same bytes).
fn get_block() -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x84, 0x01, 9];
    block.extend_from_slice(b"localhost");
    block
}

/// A connection that has sent the preface and an empty SETTINGS.
async fn raw_h2(addr: SocketAddr) -> TcpStream {
    let mut stream = tcp_connect(addr).await;
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    within("preface", stream.write_all(&hello))
        .await
        .expect("write preface");
    stream
}

/// Reads frames until a GOAWAY (returning its error code) or the end of the connection (`None`).
async fn goaway(stream: &mut TcpStream) -> Option<u32> {
    let mut data = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        while data.len() >= 9 {
            let len = u32::from_be_bytes([0, data[0], data[1], data[2]]) as usize;
            if data.len() < 9 + len {
                break;
            }
            let (kind, payload) = (data[3], &data[9..9 + len]);
            if kind == GOAWAY && payload.len() >= 8 {
                return Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]));
            }
            data.drain(..9 + len);
        }
        match within("frames", stream.read(&mut buf)).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    }
}

/// A new connection gets its answer as if nothing had happened.
async fn others_are_served(addr: SocketAddr) {
    let (mut sender, _conn) = h2c_connect(addr).await;
    let get = http::Request::get("http://localhost/")
        .body(empty())
        .expect("request");
    assert_eq!(h2_send(&mut sender, get).await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_rapid_reset_flood_gets_goaway_and_spares_the_backend() {
    let backend = TestBackend::start("a").await;
    let (gateway, addr) = gateway(&h2c_config(&[backend.addr], "")).await;
    let mut attacker = raw_h2(addr).await;
    // Thousands of streams, each cancelled right after it is opened, in one burst.
    let streams = 5_000u32;
    let mut burst = Vec::new();
    for i in 0..streams {
        let id = 2 * i + 1;
        burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &get_block()));
        burst.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    // The server may close before it has read all of it.
    let _ = within("burst", attacker.write_all(&burst)).await;
    assert_eq!(
        goaway(&mut attacker).await,
        Some(ENHANCE_YOUR_CALM),
        "GOAWAY ENHANCE_YOUR_CALM"
    );
    let reached = backend.seen().len();
    assert!(
        reached < streams as usize / 10,
        "{reached} of {streams} cancelled requests reached the backend"
    );
    others_are_served(addr).await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_continuation_flood_is_cut_at_the_header_limit() {
    let backend = TestBackend::start("a").await;
    let text = h2c_config(&[backend.addr], "") + "\n[limits]\nmax_header_size = \"16KiB\"\n";
    let (gateway, addr) = gateway(&text).await;
    let mut attacker = raw_h2(addr).await;
    // A header block that never ends: HEADERS without END_HEADERS, then CONTINUATION after
    // CONTINUATION, each full of literal header fields.
    let mut field = vec![0x00, 0x05];
    field.extend_from_slice(b"x-pad");
    field.push(0x7f); // a value of 127 + (what follows) bytes
    field.push(100);
    field.extend(std::iter::repeat_n(b'a', 227));
    let fragment: Vec<u8> = field
        .iter()
        .copied()
        .cycle()
        .take(field.len() * 60)
        .collect();
    let mut head = frame(HEADERS, END_STREAM, 1, &get_block());
    head.extend(frame(CONTINUATION, 0, 1, &fragment));
    within("headers", attacker.write_all(&head))
        .await
        .expect("write");
    let mut sent = head.len();
    let continuation = frame(CONTINUATION, 0, 1, &fragment);
    // Up to 64 MiB: far past any limit. The server must stop it long before.
    while sent < 64 << 20 {
        match tokio::time::timeout(WAIT, attacker.write_all(&continuation)).await {
            Ok(Ok(())) => sent += continuation.len(),
            Ok(Err(_)) => break,
            Err(_) => panic!("the server stopped reading but did not close, after {sent} bytes"),
        }
    }
    // What was taken includes the kernel's socket buffers on both sides of loopback (a few MiB): the
    // point is that it ends, far below what the loop would send.
    assert!(
        sent < 8 << 20,
        "{sent} bytes of one header block were taken"
    );
    others_are_served(addr).await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_header_list_over_the_limit_is_refused() {
    let backend = TestBackend::start("a").await;
    let text = h2c_config(&[backend.addr], "") + "\n[limits]\nmax_header_size = \"4KiB\"\n";
    let (gateway, addr) = gateway(&text).await;
    let (mut sender, _conn) = h2c_connect(addr).await;
    let big = http::Request::get("http://localhost/")
        .header("x-big", "a".repeat(8 << 10))
        .body(empty())
        .expect("request");
    within("ready", sender.ready()).await.expect("ready");
    let answer = within("answer", sender.send_request(big)).await;
    match answer {
        Ok(response) => assert_eq!(
            response.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        ),
        // Refused at the HTTP/2 layer (stream reset) before it became a request.
        Err(error) => assert!(!error.is_closed(), "{error}"),
    }
    assert!(backend.seen().is_empty(), "the backend saw it");
    // The connection goes on.
    let small = http::Request::get("http://localhost/")
        .body(empty())
        .expect("request");
    assert_eq!(h2_send(&mut sender, small).await.0, StatusCode::OK);
    gateway.shutdown().await;
}

/// A client that stops reading its WebSocket over HTTP/2 while the backend sends: the other streams of
/// its connection go on, and the tunnel ends by `send_timeout` as over HTTP/1.1 (the backend gets 1001
/// "client not reading").
#[tokio::test(start_paused = true)]
async fn a_stalled_h2_websocket_does_not_stall_its_connection() {
    let ws_backend = WsBackend::bind().await;
    let http_backend = TestBackend::start("http").await;
    let text = h2c_config(&[ws_backend.addr], "").replace(
        "websocket = {  }",
        "websocket = { send_timeout = \"5s\", ping_interval = \"0s\" }",
    ) + &format!(
        r#"
[[route]]
name = "http"
path_prefix = "/http"
pool = "http"

[pool.http]
backends = [ {{ addr = "{}" }} ]
"#,
        http_backend.addr
    );
    assert!(text.contains("send_timeout = \"5s\""), "{text}");
    let (gateway, addr) = gateway(&text).await;
    let (mut sender, _conn) = h2c_connect(addr).await;
    let start = tokio::time::Instant::now();
    let (opened, mut backend) = tokio::join!(
        h2_websocket(&mut sender, extended_connect("http", "/ws", &[])),
        ws_backend.accept()
    );
    let (_, mut ws) = opened.expect("WebSocket");
    within("send", ws.send(Message::text("hello")))
        .await
        .expect("send");
    assert_eq!(backend.next_frame().await.payload, b"hello");

    // The backend sends far more than the stream's window and every buffer on the way; the client
    // reads none of it.
    let chunk = backend.frame_bytes(true, 0x2, &vec![1u8; 64 << 10]);
    let flood = async {
        let mut sent = 0usize;
        loop {
            match tokio::time::timeout(Duration::from_secs(1), backend.stream.write_all(&chunk))
                .await
            {
                Ok(Ok(())) => sent += chunk.len(),
                // Blocked: everything between the backend and the client is full.
                Err(_) => return sent,
                Ok(Err(_)) => return sent,
            }
        }
    };
    let sent = flood.await;
    assert!(sent > 0);
    // Meanwhile, other streams on the same connection are served.
    for _ in 0..3 {
        let get = http::Request::get("http://localhost/http")
            .body(empty())
            .expect("request");
        let (status, _, body) = h2_send(&mut sender, get).await;
        assert_eq!(
            (status, &body[..]),
            (StatusCode::OK, &b"hello from http"[..])
        );
    }
    // The stalled tunnel ends by its send timeout: the backend gets 1001 "client not reading".
    let close = loop {
        let frame = backend.next_frame().await;
        if frame.opcode == 0x8 {
            break frame.close();
        }
    };
    assert_eq!(close, (1001, "client not reading".to_string()));
    // Blocked for the send timeout (5 s) after the flood's last second of trying.
    assert!(
        start.elapsed() >= Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    wait_metric(
        &gateway,
        "wsgate_ws_closes_total{protocol=\"h2\",reason=\"client_stalled\",route=\"main\"} 1",
    )
    .await;
    // hyper's stream for the tunnel is still stuck behind the closed window; it does not hold the
    // connection, nor the shutdown: after GOAWAY, with no stream of wsgate's left, the connection is
    // dropped within the header timeout, long before the drain ends.
    let start = tokio::time::Instant::now();
    gateway.shutdown().await;
    assert!(
        start.elapsed() <= Duration::from_secs(10) + TICK,
        "shutdown took {:?}",
        start.elapsed()
    );
    drop(ws);
}

const PING: u8 = 0x6;
const WINDOW_SIZE_SETTING: u16 = 0x4;

/// Reads until the server closes the connection; returns the frame types seen on the way.
async fn frames_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut kinds = Vec::new();
    let mut data = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match within("the server closing", stream.read(&mut buf)).await {
            Ok(0) | Err(_) => return kinds,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
        while data.len() >= 9 {
            let len = u32::from_be_bytes([0, data[0], data[1], data[2]]) as usize;
            if data.len() < 9 + len {
                break;
            }
            kinds.push(data[3]);
            data.drain(..9 + len);
        }
    }
}

/// An h2c client that sends the preface and its settings and then nothing is closed by the header
/// timeout, as an HTTP/1.1 client that sends no request is; so is one that sends nothing at all.
#[tokio::test(start_paused = true)]
async fn a_silent_h2c_client_is_closed_by_the_header_timeout() {
    let backend = TestBackend::start("a").await;
    let text = h2c_config(&[backend.addr], "") + "\n[timeouts]\nheader = \"3s\"\n";
    let (gateway, addr) = gateway(&text).await;
    let start = tokio::time::Instant::now();
    let mut silent = raw_h2(addr).await;
    frames_until_closed(&mut silent).await;
    assert_at("closed", start.elapsed(), Duration::from_secs(3));
    gateway.shutdown().await;
}

/// After its GOAWAY (here for being idle) wsgate waits for the client to close; a client that never
/// answers (no ping acknowledgement, no close) is dropped `timeouts.header` after wsgate's last stream.
#[tokio::test(start_paused = true)]
async fn a_client_that_ignores_goaway_is_dropped() {
    let backend = TestBackend::start("a").await;
    let text =
        h2c_config(&[backend.addr], "") + "\n[timeouts]\nheader = \"3s\"\nhttp_idle = \"5s\"\n";
    let (gateway, addr) = gateway(&text).await;
    let mut client = raw_h2(addr).await;
    within(
        "request",
        client.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &get_block())),
    )
    .await
    .expect("write");
    let start = tokio::time::Instant::now();
    let kinds = frames_until_closed(&mut client).await;
    assert!(kinds.contains(&HEADERS), "the response: {kinds:?}");
    assert!(kinds.contains(&GOAWAY), "GOAWAY: {kinds:?}");
    assert!(kinds.contains(&PING), "the shutdown ping: {kinds:?}");
    // Idle after the response (5 s), then 3 s for the client to close.
    assert_at("dropped", start.elapsed(), Duration::from_secs(8));
    let metrics = gateway.metrics_text();
    assert!(
        metrics.contains("wsgate_connections_active{listener=\"main\"} 0"),
        "{metrics}"
    );
    gateway.shutdown().await;
}

/// A client that never opens its stream's window never takes the response, so hyper never asks the
/// body for more: after `timeouts.send` the backend connection behind it is released.
#[tokio::test(start_paused = true)]
async fn a_client_that_keeps_its_window_shut_releases_the_backend() {
    let (released, mut backend_closed) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(move |mut stream| {
        let released = released.clone();
        async move {
            let _ = read_head(&mut stream).await;
            // A large response, as fast as wsgate takes it; then wait for wsgate to let go.
            let head = "HTTP/1.1 200 OK\r\nContent-Length: 67108864\r\n\r\n";
            let _ = stream.write_all(head.as_bytes()).await;
            let chunk = vec![b'x'; 64 << 10];
            let start = tokio::time::Instant::now();
            let (mut read_half, mut write_half) = stream.split();
            loop {
                tokio::select! {
                    written = write_half.write_all(&chunk) => if written.is_err() { break },
                    read = read_half.read_u8() => if read.is_err() { break },
                }
            }
            let _ = released.send(start.elapsed());
        }
    })
    .await;
    let text = h2c_config(&[backend.addr], "") + "\n[timeouts]\nsend = \"5s\"\n";
    let (gateway, addr) = gateway(&text).await;
    let mut client = tcp_connect(addr).await;
    // SETTINGS_INITIAL_WINDOW_SIZE = 0: not one byte of any response may be sent.
    let mut window = WINDOW_SIZE_SETTING.to_be_bytes().to_vec();
    window.extend(0u32.to_be_bytes());
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &window));
    hello.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &get_block()));
    within("request", client.write_all(&hello))
        .await
        .expect("write");
    let reading = tokio::spawn(async move {
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n @ 1..) = client.read(&mut buf).await {
            let _ = n;
        }
    });
    let held = within("the backend released", backend_closed.recv())
        .await
        .expect("the backend saw its connection end");
    // The body waited from its response head on; the watchdog's clock counts whole milliseconds.
    assert!(
        held >= Duration::from_secs(5) && held <= Duration::from_secs(5) + 4 * TICK,
        "released after {held:?}"
    );
    reading.abort();
    gateway.shutdown().await;
}
