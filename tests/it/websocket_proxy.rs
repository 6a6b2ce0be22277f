//! WebSocket proxying through wsgate with real tokio-tungstenite peers: messages of every size class,
//! fragmentation, pings, subprotocols, close codes, concurrency, balancing, and handshake errors.
//!
//! The handshake's timing (an unreachable backend answered before any timer, the handshake timeout) is
//! checked in paused time, `#[tokio::test(start_paused = true)]`, to the millisecond (`assert_at`), as in
//! `tunnel.rs`.

use std::time::Duration;

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use http::header;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};

#[tokio::test]
async fn text_and_binary_messages_round_trip() {
    let backend = TestBackend::start("b1").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let mut ws = ws_connect(addr, "/ws").await;
    for len in [0usize, 125, 126, 65535, 65536, 1 << 20] {
        let text = "x".repeat(len);
        within("send", ws.send(Message::text(text.clone())))
            .await
            .expect("send text");
        assert_eq!(next_message(&mut ws).await, Message::text(text));
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        within("send", ws.send(Message::binary(data.clone())))
            .await
            .expect("send binary");
        assert_eq!(next_message(&mut ws).await, Message::binary(data));
    }
}

fn fragment(data: &str, opcode: Data, is_final: bool) -> Message {
    Message::Frame(Frame::message(
        data.as_bytes().to_vec(),
        OpCode::Data(opcode),
        is_final,
    ))
}

#[tokio::test]
async fn fragmented_message_is_reassembled_by_the_backend() {
    let backend = TestBackend::start("b1").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let mut ws = ws_connect(addr, "/ws").await;
    // Three fragments with a ping between them (control frames may go between fragments, RFC 6455 §5.4).
    for message in [
        fragment("hello ", Data::Text, false),
        fragment("fragmented ", Data::Continue, false),
        Message::Ping("between".into()),
        fragment("world", Data::Continue, true),
    ] {
        within("send a fragment", ws.send(message))
            .await
            .expect("send fragment");
    }
    let mut pong = None;
    let text = loop {
        match within("the echo", ws.next())
            .await
            .expect("stream ended")
            .expect("websocket error")
        {
            Message::Pong(payload) => pong = Some(payload),
            Message::Ping(_) => {}
            other => break other,
        }
    };
    assert_eq!(text, Message::text("hello fragmented world"));
    // The backend answered the ping when it read it, before the message's last fragment.
    assert_eq!(pong.as_deref(), Some(&b"between"[..]));

    // A binary message in many small fragments, the first one empty.
    let mut parts = vec![Message::Frame(Frame::message(
        Vec::new(),
        OpCode::Data(Data::Binary),
        false,
    ))];
    let mut expected = Vec::new();
    for i in 0..20u8 {
        let chunk = vec![i; 1000 + usize::from(i)];
        expected.extend_from_slice(&chunk);
        parts.push(Message::Frame(Frame::message(
            chunk,
            OpCode::Data(Data::Continue),
            i == 19,
        )));
    }
    for message in parts {
        within("send a fragment", ws.send(message))
            .await
            .expect("send fragment");
    }
    assert_eq!(next_message(&mut ws).await, Message::binary(expected));
}

#[tokio::test]
async fn client_ping_is_answered_with_the_same_payload() {
    let backend = TestBackend::start("b1").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let mut ws = ws_connect(addr, "/ws").await;
    for payload in [&b""[..], b"ping-42", &[7u8; 125]] {
        within("send ping", ws.send(Message::Ping(payload.to_vec().into())))
            .await
            .expect("send ping");
        let pong = loop {
            match within("the pong", ws.next())
                .await
                .expect("stream ended")
                .expect("websocket error")
            {
                Message::Pong(p) => break p,
                Message::Ping(_) => {}
                other => panic!("expected a pong, got {other:?}"),
            }
        };
        assert_eq!(&pong[..], payload);
    }
    // The connection still carries data afterwards.
    within("send", ws.send(Message::text("after pings")))
        .await
        .expect("send");
    assert_eq!(next_message(&mut ws).await, Message::text("after pings"));
}

#[tokio::test]
async fn subprotocol_chosen_by_the_backend_reaches_the_client() {
    let backend = TestBackend::start("b1").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let mut request = format!("ws://{addr}/chat")
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        "chat, superchat".parse().expect("header"),
    );
    let (mut ws, response) = within(
        "websocket connect",
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("handshake");
    assert_eq!(response.status(), 101);
    assert_eq!(
        response.headers().get(header::SEC_WEBSOCKET_PROTOCOL),
        Some(&"superchat".parse().expect("header"))
    );
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].headers[header::SEC_WEBSOCKET_PROTOCOL],
        "chat, superchat"
    );
    within("send", ws.send(Message::text("hi")))
        .await
        .expect("send");
    assert_eq!(next_message(&mut ws).await, Message::text("hi"));
}

/// A WebSocket backend that reports the Close frame it receives, then answers it the usual way
/// (tungstenite echoes the code and reason).
async fn close_recording_backend() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<CloseFrame>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    match message {
                        Message::Close(Some(frame)) => {
                            let _ = tx.send(frame);
                        }
                        Message::Text(_) | Message::Binary(_) => {
                            let sent = ws.send(message).await;
                            if sent.is_err() {
                                return;
                            }
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn close_code_and_reason_reach_the_backend_and_come_back() {
    let (backend, mut closes) = close_recording_backend().await;
    let (_gateway, addr) = gateway(&config_text(&[backend], "")).await;
    let mut ws = ws_connect(addr, "/ws").await;
    within("send", ws.send(Message::text("before close")))
        .await
        .expect("send");
    assert_eq!(next_message(&mut ws).await, Message::text("before close"));
    let frame = CloseFrame {
        code: CloseCode::from(4000),
        reason: "bye for now".into(),
    };
    within("close", ws.close(Some(frame)))
        .await
        .expect("send close");
    let got = within("the backend's Close", closes.recv())
        .await
        .expect("backend saw a Close");
    assert_eq!(u16::from(got.code), 4000);
    assert_eq!(got.reason.as_str(), "bye for now");
    // The backend's answering Close comes back to the client with the same code and reason.
    let reply = loop {
        match within("the Close reply", ws.next()).await {
            Some(Ok(Message::Close(reply))) => break reply,
            Some(Ok(_)) => {}
            other => panic!("expected a Close reply, got {other:?}"),
        }
    };
    let reply = reply.expect("the reply carries a code");
    assert_eq!(u16::from(reply.code), 4000);
    assert_eq!(reply.reason.as_str(), "bye for now");
}

#[tokio::test]
async fn path_and_query_reach_the_backend_unchanged() {
    let backend = TestBackend::start("b1").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let target = "/chat/room%201/x?user=a%20b&empty=&x=1%2F2&x=3";
    let mut ws = ws_connect(addr, target).await;
    within("send", ws.send(Message::text("hi")))
        .await
        .expect("send");
    assert_eq!(next_message(&mut ws).await, Message::text("hi"));
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].target, target);
}

#[tokio::test]
async fn forwarded_headers_are_added_and_origin_and_cookie_kept() {
    let backend = TestBackend::start("b1").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let mut request = format!("ws://{addr}/ws")
        .into_client_request()
        .expect("request");
    let h = request.headers_mut();
    h.insert(
        header::ORIGIN,
        "https://app.example".parse().expect("header"),
    );
    h.insert(
        header::COOKIE,
        "session=abc123; theme=dark".parse().expect("header"),
    );
    h.insert("x-forwarded-for", "203.0.113.7".parse().expect("header"));
    h.insert("x-custom", "kept".parse().expect("header"));
    let mut ws = ws_connect_with(request).await;
    within("send", ws.send(Message::text("hi")))
        .await
        .expect("send");
    assert_eq!(next_message(&mut ws).await, Message::text("hi"));
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    assert_eq!(h["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], addr.to_string().as_str());
    assert_eq!(h[header::HOST], addr.to_string().as_str());
    assert_eq!(h[header::ORIGIN], "https://app.example");
    assert_eq!(h[header::COOKIE], "session=abc123; theme=dark");
    assert_eq!(h["x-custom"], "kept");
    assert_eq!(h[header::UPGRADE], "websocket");
    assert!(
        h[header::CONNECTION]
            .to_str()
            .is_ok_and(|c| c.eq_ignore_ascii_case("upgrade"))
    );
    assert_eq!(h[header::SEC_WEBSOCKET_VERSION], "13");
}

#[tokio::test]
async fn hundred_concurrent_connections_do_not_cross_talk() {
    let backend = TestBackend::start("b1").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..100 {
        clients.spawn(async move {
            let mut ws = ws_connect(addr, &format!("/ws/{i}")).await;
            for j in 0..20 {
                // Sizes vary so that messages cross read-buffer boundaries differently per connection.
                let text =
                    format!("conn {i} message {j} ") + &"z".repeat((i * 37 + j * 101) % 3000);
                ws.send(Message::text(text.clone())).await.expect("send");
                assert_eq!(next_message(&mut ws).await, Message::text(text));
                let data: Vec<u8> = format!("{i}:{j}").into_bytes();
                ws.send(Message::binary(data.clone())).await.expect("send");
                assert_eq!(next_message(&mut ws).await, Message::binary(data));
            }
            ws.close(None).await.expect("close");
        });
    }
    let results = within("100 clients", clients.join_all()).await;
    assert_eq!(results.len(), 100);
    assert_eq!(backend.seen().len(), 100);
}

#[tokio::test]
async fn least_connections_spreads_long_lived_connections_evenly() {
    let b1 = TestBackend::start("b1").await;
    let b2 = TestBackend::start("b2").await;
    let (_gateway, addr) = gateway(&config_text(&[b1.addr, b2.addr], "")).await;
    let mut opening = tokio::task::JoinSet::new();
    for i in 0..100 {
        opening.spawn(async move { ws_connect(addr, &format!("/ws/{i}")).await });
    }
    // Every connection stays open until the counts are taken.
    let open = within("100 connections", opening.join_all()).await;
    assert_eq!(open.len(), 100);
    let (n1, n2) = (b1.seen().len(), b2.seen().len());
    assert_eq!(n1 + n2, 100);
    assert!(
        (45..=55).contains(&n1) && (45..=55).contains(&n2),
        "uneven spread: b1 {n1}, b2 {n2}"
    );
}

#[tokio::test(start_paused = true)]
async fn unreachable_backend_gives_502_at_once() {
    let (_gateway, addr) = gateway(&config_text(&[dead_addr()], "")).await;
    let started = Instant::now();
    let response = raw_exchange(addr, upgrade_request(addr, "/ws", "").as_bytes()).await;
    assert_eq!(response.status, 502, "{}", response.body_text());
    // A refused connect is a fault at once: no timer (the connect or handshake timeout) is waited out.
    assert_at("the 502", started.elapsed(), Duration::ZERO);
}

#[tokio::test]
async fn upgrade_skips_an_unreachable_backend() {
    let live = TestBackend::start("live").await;
    let (_gateway, addr) = gateway(&config_text(&[dead_addr(), live.addr], "")).await;
    // Ties are broken at random, so the dead backend is picked first about half the time.
    for i in 0..16 {
        let mut ws = ws_connect(addr, &format!("/ws/{i}")).await;
        within("send", ws.send(Message::text("alive?")))
            .await
            .expect("send");
        assert_eq!(next_message(&mut ws).await, Message::text("alive?"));
    }
    assert_eq!(live.seen().len(), 16);
}

#[tokio::test]
async fn missing_key_is_400_and_wrong_version_is_426() {
    let backend = TestBackend::start("b1").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;

    let no_key = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    let response = raw_exchange(addr, no_key.as_bytes()).await;
    assert_eq!(response.status, 400, "{}", response.body_text());

    let bad_key = upgrade_request(addr, "/ws", "").replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ=");
    let response = raw_exchange(addr, bad_key.as_bytes()).await;
    assert_eq!(response.status, 400, "{}", response.body_text());

    let old_version = upgrade_request(addr, "/ws", "")
        .replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 12");
    let response = raw_exchange(addr, old_version.as_bytes()).await;
    assert_eq!(response.status, 426, "{}", response.body_text());
    assert_eq!(response.header("sec-websocket-version"), Some("13"));

    // None of them reached the backend.
    assert!(backend.seen().is_empty(), "{:?}", backend.seen());
}

/// The `Sec-WebSocket-Key` of a request head.
fn key_of(head: &str) -> String {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("sec-websocket-key"))
        .map(|(_, v)| v.trim().to_string())
        .expect("request has a key")
}

/// Keeps a raw backend's connection open until the other side closes it.
async fn hold(mut stream: tokio::net::TcpStream) {
    let mut buf = [0u8; 1024];
    while let Ok(Ok(n)) = tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
        if n == 0 {
            return;
        }
    }
}

#[tokio::test]
async fn wrong_accept_from_the_backend_gives_502() {
    let backend = RawBackend::start(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let answer = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                      Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n";
        let _ = stream.write_all(answer.as_bytes()).await;
        hold(stream).await;
    })
    .await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let response = raw_exchange(addr, upgrade_request(addr, "/ws", "").as_bytes()).await;
    assert_eq!(response.status, 502, "{}", response.body_text());
    assert_eq!(backend.accepts(), 1);
}

#[tokio::test]
async fn backend_refusal_reaches_the_client_with_its_body() {
    let backend = RawBackend::start(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let body = "not allowed here";
        let answer = format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nX-Backend-Reason: policy\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(answer.as_bytes()).await;
        hold(stream).await;
    })
    .await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let response = raw_exchange(addr, upgrade_request(addr, "/ws", "").as_bytes()).await;
    assert_eq!(response.status, 403);
    assert_eq!(response.body_text(), "not allowed here");
    assert_eq!(response.header("x-backend-reason"), Some("policy"));
    assert_eq!(response.header("content-type"), Some("text/plain"));
}

#[tokio::test]
async fn bytes_right_behind_the_backend_101_reach_the_client() {
    let backend = RawBackend::start(|mut stream| async move {
        let (head, _) = read_head(&mut stream).await;
        let accept = accept_key(&key_of(&head));
        let mut answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .into_bytes();
        // Two unmasked server frames in the same write as the 101.
        for text in ["early hello", "and a second one"] {
            answer.push(0x81);
            answer.push(text.len() as u8);
            answer.extend_from_slice(text.as_bytes());
        }
        let _ = stream.write_all(&answer).await;
        hold(stream).await;
    })
    .await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let mut ws = ws_connect(addr, "/ws").await;
    assert_eq!(next_message(&mut ws).await, Message::text("early hello"));
    assert_eq!(
        next_message(&mut ws).await,
        Message::text("and a second one")
    );
}

#[tokio::test]
async fn upgrade_moves_on_after_a_5xx_from_a_backend() {
    let failing = RawBackend::start(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let answer = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 8\r\n\r\nstarting";
        let _ = stream.write_all(answer.as_bytes()).await;
        hold(stream).await;
    })
    .await;
    let live = TestBackend::start("live").await;
    let (_gateway, addr) = gateway(&config_text(&[failing.addr, live.addr], "")).await;
    // docs/ARCHITECTURE.md, "Backend attempts": a 5xx before the 101 sends the upgrade to the next backend.
    for i in 0..16 {
        let mut ws = ws_connect(addr, &format!("/ws/{i}")).await;
        within("send", ws.send(Message::text("alive?")))
            .await
            .expect("send");
        assert_eq!(next_message(&mut ws).await, Message::text("alive?"));
    }
    assert_eq!(live.seen().len(), 16);
    assert!(failing.accepts() > 0, "the failing backend was never tried");
    // When every backend answers 5xx, the client gets the answer itself.
    let (_gateway, addr) = gateway(&config_text(&[failing.addr], "")).await;
    let response = raw_exchange(addr, upgrade_request(addr, "/ws", "").as_bytes()).await;
    assert_eq!(response.status, 503);
    assert_eq!(response.body_text(), "starting");
}

#[tokio::test]
async fn bytes_right_behind_the_client_upgrade_reach_the_backend() {
    let backend = TestBackend::start("b1").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let mut stream = within("connect", tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect");
    // The upgrade request and a masked text frame in one write.
    let mut bytes = upgrade_request(addr, "/ws", "").into_bytes();
    let payload = b"sent with the upgrade";
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    bytes.push(0x81);
    bytes.push(0x80 | payload.len() as u8);
    bytes.extend_from_slice(&mask);
    bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    within("write", stream.write_all(&bytes))
        .await
        .expect("write");
    let (head, mut rest) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // The echo: an unmasked text frame with the same payload.
    let want = 2 + payload.len();
    let mut buf = [0u8; 256];
    while rest.len() < want {
        let n = within("the echo", stream.read(&mut buf))
            .await
            .expect("read");
        assert!(n > 0, "closed before the echo");
        rest.extend_from_slice(&buf[..n]);
    }
    assert_eq!(rest[0], 0x81);
    assert_eq!(usize::from(rest[1]), payload.len());
    assert_eq!(&rest[2..want], payload);
}

#[tokio::test(start_paused = true)]
async fn silent_backend_during_the_upgrade_gives_504_after_the_handshake_timeout() {
    let backend = RawBackend::start(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        hold(stream).await;
    })
    .await;
    let text = format!(
        "[timeouts]\nhandshake = \"500ms\"\n{}",
        config_text(&[backend.addr], "")
    );
    let (_gateway, addr) = gateway(&text).await;
    let started = Instant::now();
    let response = raw_exchange(addr, upgrade_request(addr, "/ws", "").as_bytes()).await;
    assert_eq!(response.status, 504, "{}", response.body_text());
    assert_at("the 504", started.elapsed(), Duration::from_millis(500));
}

#[tokio::test]
async fn negotiated_extension_reaches_the_client_and_rsv1_frames_pass_both_ways() {
    // A backend that accepts permessage-deflate, sends one RSV1 frame, and reports the first frame it gets.
    let (got_tx, mut got_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let backend = RawBackend::start(move |mut stream| {
        let got_tx = got_tx.clone();
        async move {
            let (head, mut rest) = read_head(&mut stream).await;
            assert!(
                head.to_ascii_lowercase()
                    .contains("sec-websocket-extensions: permessage-deflate"),
                "{head}"
            );
            let accept = accept_key(&key_of(&head));
            let mut answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
            )
            .into_bytes();
            // FIN + RSV1 + text; the payload is opaque to the proxy (it would be compressed data).
            answer.extend_from_slice(&[0xC1, 3, 1, 2, 3]);
            let _ = stream.write_all(&answer).await;
            // The client's frame: 2 header bytes, 4 mask bytes, 3 payload bytes.
            let mut buf = [0u8; 64];
            while rest.len() < 9 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => rest.extend_from_slice(&buf[..n]),
                }
            }
            let _ = got_tx.send(rest[..9].to_vec());
            hold(stream).await;
        }
    })
    .await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let mut stream = within("connect", tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect");
    let request = upgrade_request(
        addr,
        "/ws",
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    );
    within("write", stream.write_all(request.as_bytes()))
        .await
        .expect("write");
    let (head, mut rest) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-extensions: permessage-deflate"),
        "{head}"
    );
    let mut buf = [0u8; 64];
    while rest.len() < 5 {
        let n = within("the RSV1 frame", stream.read(&mut buf))
            .await
            .expect("read");
        assert!(n > 0, "closed before the RSV1 frame");
        rest.extend_from_slice(&buf[..n]);
    }
    assert_eq!(&rest[..5], &[0xC1, 3, 1, 2, 3]);
    // A masked RSV1 frame from the client reaches the backend unchanged.
    let frame = [0xC1, 0x83, 9, 8, 7, 6, 1 ^ 9, 2 ^ 8, 3 ^ 7];
    within("write", stream.write_all(&frame))
        .await
        .expect("write");
    let got = within("the backend's frame", got_rx.recv())
        .await
        .expect("backend got a frame");
    assert_eq!(got, frame);
}

/// wsgate reads a connection's first request itself and takes an upgrade straight to the tunnel; an
/// upgrade that comes after other requests on the connection goes through hyper. Both must tunnel alike.
#[tokio::test]
async fn an_upgrade_after_a_plain_request_on_the_same_connection_is_tunnelled() {
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
    let backend = TestBackend::start("b1").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let get = format!("GET /ws/plain HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let mut stream = raw_send(addr, get.as_bytes()).await;
    let response = read_response(&mut stream).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body_text(), "hello from b1");

    raw_write(&mut stream, upgrade_request(addr, "/ws", "").as_bytes()).await;
    let (head, rest) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(rest.is_empty(), "bytes behind the 101: {rest:?}");
    let stream = MaybeTlsStream::Plain(stream);
    let mut ws = WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
    within("send", ws.send(Message::text("after a GET")))
        .await
        .expect("send");
    assert_eq!(next_message(&mut ws).await, Message::text("after a GET"));
    let targets: Vec<String> = backend.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/ws/plain", "/ws"]);
}

/// A refused upgrade, read by wsgate itself, leaves the connection to hyper for the requests that follow,
/// unless the client asked for it to close.
#[tokio::test]
async fn a_refused_first_upgrade_leaves_the_connection_serving_http() {
    let backend = TestBackend::start("b1").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let old_version = upgrade_request(addr, "/ws", "")
        .replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 12");
    let get = format!("GET /ws/next HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    // Both at once: the GET behind the refused upgrade must not be lost.
    let both = format!("{old_version}{get}");
    let mut stream = raw_send(addr, both.as_bytes()).await;
    let response = read_response(&mut stream).await;
    assert_eq!(response.status, 426, "{}", response.body_text());
    assert!(response.header("date").is_some());
    let response = read_response(&mut stream).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body_text(), "hello from b1");

    let closing = upgrade_request(addr, "/ws", "")
        .replace("Connection: Upgrade", "Connection: Upgrade, close")
        .replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 12");
    let mut stream = raw_send(addr, closing.as_bytes()).await;
    let response = read_response(&mut stream).await;
    assert_eq!(response.status, 426);
    assert_eq!(response.header("connection"), Some("close"));
    let mut buf = [0u8; 64];
    let n = within("the close", stream.read(&mut buf))
        .await
        .expect("read");
    assert_eq!(n, 0, "the connection stays open after Connection: close");
}
