//! HTTP/2 on the client side, over h2c with prior knowledge (the same server as behind ALPN `h2`, which
//! `tls.rs` covers): requests routed and forwarded to HTTP/1.1 backends with the HTTP/1.1 header rules,
//! independent streams, WebSockets over HTTP/2 (RFC 8441) through the same tunnel, refusals with the
//! statuses an HTTP/1.1 upgrade gets, GOAWAY on shutdown, and the protocol label in the metrics.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http2::{self, SendRequest};
use hyper::ext::Protocol;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::common::*;

pub type H2Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;
pub type H2Ws = WebSocketStream<TokioIo<Upgraded>>;

/// Config text with the listener taking h2c (and `listener_extra` lines, e.g. switches).
pub fn h2c_config(backends: &[SocketAddr], listener_extra: &str) -> String {
    config_text(backends, "").replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:0\"\nh2c = true\n{listener_extra}"),
    )
}

/// An HTTP/2 client connection over `io`; the connection's task ends when the server closes it, and
/// its handle tells how it ended.
pub async fn h2_handshake<I>(
    io: I,
) -> (
    SendRequest<H2Body>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = within(
        "HTTP/2 handshake",
        http2::Builder::new(TokioExecutor::new()).handshake(TokioIo::new(io)),
    )
    .await
    .expect("HTTP/2 handshake");
    (sender, tokio::spawn(conn))
}

pub async fn h2c_connect(
    addr: SocketAddr,
) -> (
    SendRequest<H2Body>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    h2_handshake(tcp_connect(addr).await).await
}

pub fn empty() -> H2Body {
    Empty::new().boxed()
}

/// Sends a request on an HTTP/2 connection; returns the status, headers and whole body.
pub async fn h2_send(
    sender: &mut SendRequest<H2Body>,
    request: Request<H2Body>,
) -> (StatusCode, http::HeaderMap, Bytes) {
    within("ready", sender.ready()).await.expect("ready");
    let response = within("response", sender.send_request(request))
        .await
        .expect("response");
    let (parts, body) = response.into_parts();
    let body = within("body", body.collect())
        .await
        .expect("body")
        .to_bytes();
    (parts.status, parts.headers, body)
}

/// An extended CONNECT for a WebSocket at `path` (RFC 8441 §4), with `headers` added.
pub fn extended_connect(scheme: &str, path: &str, headers: &[(&str, &str)]) -> Request<H2Body> {
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("{scheme}://localhost{path}"))
        .header("sec-websocket-version", "13");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut request = request.body(empty()).expect("request");
    request
        .extensions_mut()
        .insert(Protocol::from_static("websocket"));
    request
}

/// Opens a WebSocket over HTTP/2: the 200's headers and the stream, or the refusal's status and body.
pub async fn h2_websocket(
    sender: &mut SendRequest<H2Body>,
    request: Request<H2Body>,
) -> Result<(http::HeaderMap, H2Ws), (StatusCode, Bytes)> {
    within("ready", sender.ready()).await.expect("ready");
    let response = within("CONNECT answer", sender.send_request(request))
        .await
        .expect("CONNECT answer");
    if response.status() != StatusCode::OK {
        let status = response.status();
        let body = within("body", response.into_body().collect())
            .await
            .expect("body")
            .to_bytes();
        return Err((status, body));
    }
    let headers = response.headers().clone();
    let upgraded = within("stream", hyper::upgrade::on(response))
        .await
        .expect("the stream opens");
    let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    Ok((headers, ws))
}

fn get(path: &str) -> Request<H2Body> {
    Request::get(format!("http://localhost{path}"))
        .body(empty())
        .expect("request")
}

#[tokio::test]
async fn h2c_requests_are_forwarded_with_the_http1_header_rules() {
    let backend = TestBackend::start("a").await;
    let (gateway, addr) = gateway(&h2c_config(&[backend.addr], "")).await;
    let (mut sender, _conn) = h2c_connect(addr).await;

    let request = Request::get("http://chat.example.com/hello?x=1")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("x-forwarded-for", "203.0.113.9")
        .body(empty())
        .expect("request");
    let (status, _, body) = h2_send(&mut sender, request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello from a");
    let seen = backend.seen().pop().expect("the backend saw the request");
    assert_eq!(seen.target, "/hello?x=1");
    assert_eq!(seen.headers[header::HOST], "chat.example.com");
    assert_eq!(
        seen.headers[header::COOKIE],
        "a=1; b=2",
        "split cookies joined"
    );
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");

    // Bodies stream both ways.
    let post = Request::post("http://localhost/echo")
        .body(Full::new(Bytes::from_static(b"ping over h2")).boxed())
        .expect("request");
    let (status, _, body) = h2_send(&mut sender, post).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ping over h2"[..]));

    // Refusals have the HTTP/1.1 statuses.
    let differs = Request::get("http://localhost/")
        .header("host", "other.example")
        .body(empty())
        .expect("request");
    assert_eq!(
        h2_send(&mut sender, differs).await.0,
        StatusCode::BAD_REQUEST
    );

    let metrics = gateway.metrics_text();
    assert!(
        metrics.contains(
            "wsgate_http_requests_total{protocol=\"h2\",route=\"main\",status_class=\"2xx\"} 2"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "wsgate_http_requests_total{protocol=\"h2\",route=\"\",status_class=\"4xx\"} 1"
        ),
        "{metrics}"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_slow_stream_does_not_stall_the_others() {
    let (release, released) = tokio::sync::watch::channel(false);
    let backend = http_backend(move |req: Request<hyper::body::Incoming>| {
        let mut released = released.clone();
        async move {
            if req.uri().path() == "/slow" {
                let _ = released.wait_for(|r| *r).await;
            }
            http::Response::new(backend_body(req.uri().path().to_string()))
        }
    })
    .await;
    let (gateway, addr) = gateway(&h2c_config(&[backend.addr], "")).await;
    let (sender, _conn) = h2c_connect(addr).await;

    let mut slow_sender = sender.clone();
    let slow = tokio::spawn(async move { h2_send(&mut slow_sender, get("/slow")).await });
    for i in 0..5 {
        let mut sender = sender.clone();
        let (status, _, body) = h2_send(&mut sender, get(&format!("/fast{i}"))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, format!("/fast{i}"));
    }
    assert!(!slow.is_finished(), "the slow stream is still waiting");
    release.send(true).expect("release");
    let (status, _, body) = within("slow stream", slow).await.expect("task");
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"/slow"[..]));
    gateway.shutdown().await;
}

#[tokio::test]
async fn websockets_over_h2_run_through_the_tunnel() {
    let backend = TestBackend::start("a").await;
    let (gateway, addr) = gateway(&h2c_config(&[backend.addr], "")).await;
    let (mut sender, _conn) = h2c_connect(addr).await;

    let request = extended_connect(
        "http",
        "/chat?room=1",
        &[("sec-websocket-protocol", "v1, v2")],
    );
    let (headers, mut ws) = h2_websocket(&mut sender, request)
        .await
        .expect("200 for the CONNECT");
    assert_eq!(
        headers["sec-websocket-protocol"], "v2",
        "subprotocol relayed"
    );
    assert!(!headers.contains_key("sec-websocket-accept"));
    assert!(!headers.contains_key("upgrade"));

    // The backend got an ordinary HTTP/1.1 upgrade.
    let seen = backend.seen().pop().expect("the backend saw the upgrade");
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.target, "/chat?room=1");
    assert_eq!(seen.headers[header::UPGRADE], "websocket");
    assert_eq!(seen.headers[header::HOST], "localhost");
    assert_eq!(seen.headers[header::SEC_WEBSOCKET_VERSION], "13");
    assert_eq!(seen.headers[header::SEC_WEBSOCKET_KEY].len(), 24);

    // Several tunnels share the connection; each echoes its own.
    let (_, mut second) = h2_websocket(&mut sender, extended_connect("http", "/other", &[]))
        .await
        .expect("a second WebSocket on the same connection");
    for (ws, text) in [(&mut ws, "first"), (&mut second, "second")] {
        within("send", ws.send(Message::text(text)))
            .await
            .expect("send");
    }
    assert_eq!(next_message(&mut ws).await, Message::text("first"));
    assert_eq!(next_message(&mut second).await, Message::text("second"));
    // A large message crosses many HTTP/2 DATA frames and windows.
    let big = vec![7u8; 1 << 20];
    within("send", ws.send(Message::binary(big.clone())))
        .await
        .expect("send");
    assert_eq!(next_message(&mut ws).await, Message::binary(big));

    // A client Close goes through and ends the tunnel like any other.
    within("close", ws.close(None)).await.expect("close");
    while let Some(Ok(_)) = within("close answer", ws.next()).await {}
    let metrics = gateway.metrics_text();
    assert!(
        metrics
            .contains("wsgate_ws_upgrades_total{protocol=\"h2\",result=\"ok\",route=\"main\"} 2"),
        "{metrics}"
    );
    within("the first tunnel's end is counted", async {
        while !gateway.metrics_text().contains(
            "wsgate_ws_closes_total{protocol=\"h2\",reason=\"client_close\",route=\"main\"} 1",
        ) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // The other tunnel is still there, and still works.
    within("send", second.send(Message::text("still here")))
        .await
        .expect("send");
    assert_eq!(next_message(&mut second).await, Message::text("still here"));
    drop(second);
    gateway.shutdown().await;
}

#[tokio::test]
async fn extended_connect_refusals_match_http1_upgrades() {
    let refusing = http_backend(|_req| async {
        let mut response = http::Response::new(backend_body("go away\n"));
        *response.status_mut() = StatusCode::FORBIDDEN;
        response
    })
    .await;
    let backend = TestBackend::start("a").await;
    let text = h2c_config(&[backend.addr], "")
        + &format!(
            r#"
[[route]]
name = "refusing"
path_prefix = "/refusing"
pool = "refusing"

[[route]]
name = "dead"
path_prefix = "/dead"
pool = "dead"

[[route]]
name = "drained"
path_prefix = "/drained"
pool = "drained"

[[route]]
name = "elsewhere"
host = "elsewhere.example"
path_prefix = "/only-there"
pool = "p"

[pool.refusing]
backends = [ {{ addr = "{}" }} ]

[pool.dead]
backends = [ {{ addr = "{}" }} ]

[pool.drained]
backends = [ {{ addr = "{}", drain = true }} ]
"#,
            refusing.addr,
            dead_addr(),
            backend.addr
        );
    let text = text.replace(
        "path_prefix = \"/\"\npool = \"p\"",
        "path_prefix = \"/ws\"\npool = \"p\"",
    );
    let (gateway, addr) = gateway(&text).await;
    let (mut sender, _conn) = h2c_connect(addr).await;

    let cases = [
        ("/refusing", StatusCode::FORBIDDEN),
        ("/dead", StatusCode::BAD_GATEWAY),
        ("/drained", StatusCode::SERVICE_UNAVAILABLE),
        ("/nowhere", StatusCode::NOT_FOUND),
    ];
    for (path, expected) in cases {
        let over_h2 = h2_websocket(&mut sender, extended_connect("http", path, &[]))
            .await
            .err()
            .map(|(status, _)| status);
        let over_h1 = raw_exchange(addr, upgrade_request(addr, path, "").as_bytes())
            .await
            .status;
        assert_eq!(over_h2, Some(expected), "{path} over HTTP/2");
        assert_eq!(over_h1, expected, "{path} over HTTP/1.1");
    }

    // A wrong version: the same 426 and supported version as over HTTP/1.1.
    let mut request = extended_connect("http", "/ws", &[]);
    request
        .headers_mut()
        .insert("sec-websocket-version", "8".parse().expect("value"));
    within("ready", sender.ready()).await.expect("ready");
    let response = within("answer", sender.send_request(request))
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::UPGRADE_REQUIRED);
    assert_eq!(response.headers()["sec-websocket-version"], "13");

    // Another protocol is not implemented; a wrong scheme is a bad request.
    let mut other = extended_connect("http", "/ws", &[]);
    other
        .extensions_mut()
        .insert(Protocol::from_static("webtransport"));
    let refused = h2_websocket(&mut sender, other).await.err().map(|e| e.0);
    assert_eq!(refused, Some(StatusCode::NOT_IMPLEMENTED));
    let refused = h2_websocket(&mut sender, extended_connect("ftp", "/ws", &[]))
        .await
        .err()
        .map(|e| e.0);
    assert_eq!(refused, Some(StatusCode::BAD_REQUEST));

    // None of it disturbed the connection.
    let (_, mut ws) = h2_websocket(&mut sender, extended_connect("http", "/ws", &[]))
        .await
        .expect("a good CONNECT still works");
    within("send", ws.send(Message::text("ok")))
        .await
        .expect("send");
    assert_eq!(next_message(&mut ws).await, Message::text("ok"));
    let metrics = gateway.metrics_text();
    for line in [
        "wsgate_ws_upgrades_total{protocol=\"h2\",result=\"rejected\",route=\"refusing\"} 1",
        "wsgate_ws_upgrades_total{protocol=\"h2\",result=\"backend_error\",route=\"dead\"} 1",
        "wsgate_ws_upgrades_total{protocol=\"h2\",result=\"no_backend\",route=\"drained\"} 1",
        "wsgate_ws_upgrades_total{protocol=\"h1\",result=\"rejected\",route=\"refusing\"} 1",
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
    drop(ws);
    gateway.shutdown().await;
}

#[tokio::test]
async fn the_connect_protocol_is_advertised_only_when_enabled() {
    let backend = TestBackend::start("a").await;
    let (gateway, addr) = gateway(&h2c_config(&[backend.addr], "websocket_over_h2 = false")).await;
    let (mut sender, _conn) = h2c_connect(addr).await;
    // Plain requests still work.
    assert_eq!(h2_send(&mut sender, get("/")).await.0, StatusCode::OK);
    within("ready", sender.ready()).await.expect("ready");
    // The client's stack refuses to send an extended CONNECT the server did not advertise.
    let sent = within(
        "refused CONNECT",
        sender.send_request(extended_connect("http", "/", &[])),
    )
    .await;
    assert!(sent.is_err(), "extended CONNECT without the setting");
    gateway.shutdown().await;

    // Without h2c the preface is no HTTP/2: the connection closes, with no SETTINGS frame (nor any
    // HTTP/1.1 answer: hyper recognises the preface and just closes).
    let (gateway, addr) = crate::common::gateway(&config_text(&[backend.addr], "")).await;
    let mut stream = raw_send(addr, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut answer = Vec::new();
    within(
        "close",
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut answer),
    )
    .await
    .expect("read");
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 4"),
        "{answer:?}"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn shutdown_sends_goaway_and_closes_h2_tunnels_with_1001() {
    let backend = TestBackend::start("a").await;
    let text =
        h2c_config(&[backend.addr], "") + "\n[timeouts]\nclose_spread = \"0s\"\ndrain = \"5s\"\n";
    let (gateway, addr) = gateway(&text).await;
    let (mut sender, conn) = h2c_connect(addr).await;
    let (_, mut ws) = h2_websocket(&mut sender, extended_connect("http", "/", &[]))
        .await
        .expect("WebSocket");
    within("send", ws.send(Message::text("hi")))
        .await
        .expect("send");
    assert_eq!(next_message(&mut ws).await, Message::text("hi"));

    let shutdown = tokio::spawn(gateway.shutdown());
    let close = loop {
        match within("Close 1001", ws.next()).await {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a Close frame, got {other:?}"),
        }
    };
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Away));
    drop(ws);
    // GOAWAY: the client's connection ends cleanly once its streams are done.
    within("connection closed", conn)
        .await
        .expect("task")
        .expect("a clean end, not an error");
    let started = std::time::Instant::now();
    within("shutdown", shutdown).await.expect("shutdown");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "shutdown waited for the drain: {:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_h2_connection_is_closed_after_http_idle() {
    let backend = TestBackend::start("a").await;
    let text = h2c_config(&[backend.addr], "") + "\n[timeouts]\nhttp_idle = \"5s\"\n";
    let (gateway, addr) = gateway(&text).await;
    let (mut sender, conn) = h2c_connect(addr).await;
    assert_eq!(h2_send(&mut sender, get("/")).await.0, StatusCode::OK);
    let start = tokio::time::Instant::now();
    within("idle close", conn)
        .await
        .expect("task")
        .expect("a clean end (GOAWAY)");
    assert_at("idle close", start.elapsed(), Duration::from_secs(5));
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_reload_sends_goaway_and_open_tunnels_go_on() {
    let backend = TestBackend::start("a").await;
    let text = h2c_config(&[backend.addr], "");
    let (gateway, addr) = gateway(&text).await;
    let (mut sender, conn) = h2c_connect(addr).await;
    let (_, mut ws) = h2_websocket(&mut sender, extended_connect("http", "/", &[]))
        .await
        .expect("WebSocket");

    let config = wsgate::Config::from_toml(&text, "test.toml").expect("config");
    within("reload", gateway.reload(config))
        .await
        .expect("reload");
    // GOAWAY: the client's stack refuses new streams on this connection (requests sent before it
    // arrived are still answered)...
    within("GOAWAY seen", async {
        while sender.send_request(get("/")).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // ...while the open tunnel goes on.
    within("send", ws.send(Message::text("after reload")))
        .await
        .expect("send");
    assert_eq!(next_message(&mut ws).await, Message::text("after reload"));
    // A new connection is served.
    let (mut fresh, _fresh_conn) = h2c_connect(addr).await;
    assert_eq!(h2_send(&mut fresh, get("/")).await.0, StatusCode::OK);
    // Once its last stream ends, the old connection closes cleanly.
    drop(ws);
    within("old connection closed", conn)
        .await
        .expect("task")
        .expect("a clean end");
    gateway.shutdown().await;
}

/// A backend that answers a WebSocket path with a page (2xx) has refused the upgrade: over HTTP/1.1 the
/// client sees the page and fails its handshake; over HTTP/2 a 2xx would open the tunnel, so the client
/// gets 502, and a browser its failed WebSocket either way.
#[tokio::test]
async fn a_backend_page_on_a_websocket_path_is_a_502_over_h2() {
    let page = http_backend(|_req| async { http::Response::new(backend_body("a page\n")) }).await;
    let (gateway, addr) = gateway(&h2c_config(&[page.addr], "")).await;
    let (mut sender, _conn) = h2c_connect(addr).await;
    let refused = h2_websocket(&mut sender, extended_connect("http", "/ws", &[]))
        .await
        .err()
        .map(|(status, _)| status);
    assert_eq!(refused, Some(StatusCode::BAD_GATEWAY));
    let over_h1 = raw_exchange(addr, upgrade_request(addr, "/ws", "").as_bytes()).await;
    assert_eq!(over_h1.status, 200, "HTTP/1.1 relays the page");
    let metrics = gateway.metrics_text();
    assert!(
        metrics.contains(
            "wsgate_ws_upgrades_total{protocol=\"h2\",result=\"backend_error\",route=\"main\"} 1"
        ),
        "{metrics}"
    );
    gateway.shutdown().await;
}
