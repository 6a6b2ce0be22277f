//! Test support shared by the integration tests: real backends on loopback, a gateway started through the
//! library API, and clients. Every wait has a timeout (`WAIT`).
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsgate::{Config, Gateway};

/// The longest any single step of a test may wait.
pub const WAIT: Duration = Duration::from_secs(10);

/// The resolution of tokio's timers: a deadline fires at the first millisecond tick at or after it.
pub const TICK: Duration = Duration::from_millis(1);

/// For tests under paused time (`#[tokio::test(start_paused = true)]`), where the clock is virtual and
/// jumps from timer to timer: asserts that `what` came `expected` after the start, no earlier and no later
/// than one tick.
#[track_caller]
pub fn assert_at(what: &str, elapsed: Duration, expected: Duration) {
    assert!(
        elapsed >= expected && elapsed <= expected + TICK,
        "{what} after {elapsed:?}, expected after {expected:?}"
    );
}

/// Awaits `future`, failing the test if it takes longer than `WAIT`.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// The `Sec-WebSocket-Accept` answer to a `Sec-WebSocket-Key` (RFC 6455 §4.2.2): SHA-1 of the key and the
/// protocol's GUID, in standard base64. Written here, independently of wsgate's own.
pub fn accept_key(key: &str) -> String {
    use base64::Engine;
    use sha1::{Digest, Sha1};
    let mut sha1 = Sha1::new();
    sha1.update(key.as_bytes());
    sha1.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha1.finalize())
}

#[test]
fn accept_key_matches_the_rfc_example() {
    // RFC 6455 §1.3.
    assert_eq!(
        accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
}

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query as received.
    pub target: String,
    pub headers: http::HeaderMap,
}

/// A real backend on 127.0.0.1: HTTP (`GET /...` answers with its name, `POST` echoes the body as it
/// streams) and WebSocket (echoes every message; picks the last subprotocol the client offers). Nagle is
/// off on its connections, as on every test socket (see `tcp_connect`).
pub struct TestBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestBackend {
    pub async fn start(name: &str) -> TestBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        TestBackend::serve(name, listener)
    }

    /// Serves on an already bound listener (a given address: DNS discovery tests put backends on
    /// several loopback addresses with one port).
    pub fn serve(name: &str, listener: TcpListener) -> TestBackend {
        let addr = listener.local_addr().expect("backend addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (name2, seen2) = (name.to_string(), Arc::clone(&seen));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let _ = stream.set_nodelay(true);
                let served = serve_test_backend(stream, name2.clone(), Arc::clone(&seen2));
                tokio::spawn(async move {
                    let _ = served.await;
                });
            }
        });
        TestBackend {
            name: name.to_string(),
            addr,
            seen,
            task,
        }
    }

    /// Stops accepting; live connections of this backend keep running in their own tasks.
    pub fn stop(&self) {
        self.task.abort();
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen lock").clone()
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves one connection as a `TestBackend` does (over a TLS session too): `name` in its answers, each
/// request recorded in `seen`. An error is how the connection ended badly (over TLS: without a
/// `close_notify` from the peer, among others).
pub async fn serve_test_backend<S>(
    stream: S,
    name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> hyper::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| backend_service(req, name.clone(), Arc::clone(&seen)));
    http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await
}

type TestBody = BoxBody<Bytes, hyper::Error>;

/// A backend's 101 answer to an upgrade request carrying `key`.
pub fn switching_protocols(key: &http::HeaderValue) -> Response<TestBody> {
    let mut response = Response::new(full(""));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::UPGRADE, "websocket".parse().expect("static"));
    h.insert(header::CONNECTION, "Upgrade".parse().expect("static"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        accept_key(key.to_str().expect("an ASCII key"))
            .parse()
            .expect("base64"),
    );
    response
}

fn full(text: impl Into<Bytes>) -> TestBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

async fn backend_service(
    mut req: Request<Incoming>,
    name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<TestBody>, Infallible> {
    let target = req
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());
    seen.lock().expect("seen lock").push(Seen {
        method: req.method().to_string(),
        target,
        headers: req.headers().clone(),
    });
    if req.headers().contains_key(header::SEC_WEBSOCKET_KEY) {
        let key = req.headers()[header::SEC_WEBSOCKET_KEY].clone();
        let protocol = req
            .headers()
            .get(header::SEC_WEBSOCKET_PROTOCOL)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next_back())
            .map(|p| p.trim().to_string());
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                echo(ws).await;
            }
        });
        let mut response = switching_protocols(&key);
        let h = response.headers_mut();
        if let Some(p) = protocol {
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, p.parse().expect("token"));
        }
        return Ok(response);
    }
    if req.method() == http::Method::POST {
        // Stream the body straight back: no buffering on the backend side either.
        let body = req.into_body().boxed();
        return Ok(Response::new(body));
    }
    Ok(Response::new(full(format!("hello from {name}"))))
}

async fn echo<S>(mut ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(Ok(message)) = ws.next().await {
        match message {
            Message::Text(_) | Message::Binary(_) => {
                let sent = ws.send(message).await;
                if sent.is_err() {
                    return;
                }
            }
            // tungstenite has queued its Close answer; the next read flushes it and ends the stream.
            _ => {}
        }
    }
}

/// Config text for one listener on 127.0.0.1:0, one route `/` to pool `p` with `backends`, and `extra`
/// appended inside the route's `websocket = { ... }` table.
pub fn config_text(backends: &[SocketAddr], websocket: &str) -> String {
    let backends: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ addr = \"{a}\" }}"))
        .collect();
    format!(
        r#"
[[listener]]
name = "main"
listen = "127.0.0.1:0"

[[route]]
name = "main"
path_prefix = "/"
pool = "p"
websocket = {{ {websocket} }}

[pool.p]
policy = "least_conn"
backends = [ {} ]
"#,
        backends.join(", ")
    )
}

/// `config_text` with a `[timeouts]` section in front.
pub fn config_with_timeouts(backends: &[SocketAddr], timeouts: &str) -> String {
    format!("[timeouts]\n{timeouts}\n{}", config_text(backends, ""))
}

/// Starts a gateway from config text (checked first: a bad text fails the test with its errors).
pub async fn gateway(text: &str) -> (Gateway, SocketAddr) {
    let config = Config::from_toml(text, "test.toml").unwrap_or_else(|e| panic!("config:\n{e}"));
    let gateway = Gateway::start(config).await.expect("gateway starts");
    let addr = gateway.listener_addr("main").expect("listener `main`");
    (gateway, addr)
}

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket through the gateway.
pub async fn ws_connect(addr: SocketAddr, path: &str) -> Client {
    let request = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("request");
    ws_connect_with(request).await
}

pub async fn ws_connect_with(request: http::Request<()>) -> Client {
    // TCP_NODELAY: each message goes out at once, not after a delayed ACK (a kernel timer, which paused
    // time does not see).
    let (ws, _response) = within(
        "websocket connect",
        tokio_tungstenite::connect_async_with_config(request, None, true),
    )
    .await
    .expect("websocket handshake");
    ws
}

/// The next data message, skipping pings and pongs.
pub async fn next_message<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let message = within("a message", ws.next())
            .await
            .expect("stream ended")
            .expect("websocket error");
        if !matches!(message, Message::Ping(_) | Message::Pong(_)) {
            return message;
        }
    }
}

/// A TCP connection to `addr`, with Nagle off: each write goes out at once, not after a delayed ACK (a
/// kernel timer, which paused time does not see).
pub async fn tcp_connect(addr: SocketAddr) -> TcpStream {
    let stream = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    stream
}

/// Sends a raw HTTP/1.1 request over a fresh TCP connection and returns the whole response text
/// (read until the server closes or `WAIT` passes).
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tcp_connect(addr).await;
    within("write", stream.write_all(request))
        .await
        .expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_millis(1500), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---- Raw and scripted backends, plain HTTP clients (HTTP proxy and handshake tests) ----

/// The body type of scripted HTTP backends.
pub type BackendBody = BoxBody<Bytes, hyper::Error>;

/// A whole body for a scripted backend's response.
pub fn backend_body(data: impl Into<Bytes>) -> BackendBody {
    full(data)
}

/// A backend on 127.0.0.1 that hands each accepted TCP connection (Nagle off) to `handler` and counts
/// accepts: for backends that must misbehave at the byte level.
pub struct RawBackend {
    pub addr: SocketAddr,
    accepts: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RawBackend {
    pub async fn start<F, Fut>(handler: F) -> RawBackend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("backend addr");
        let accepts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&accepts);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(handler(stream));
            }
        });
        RawBackend {
            addr,
            accepts,
            task,
        }
    }

    /// TCP connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.accepts.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A hyper HTTP/1.1 backend answering every request with `handler` (accepts counted as for `RawBackend`).
pub async fn http_backend<F, Fut>(handler: F) -> RawBackend
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<BackendBody>> + Send + 'static,
{
    RawBackend::start(move |stream| {
        let handler = handler.clone();
        async move {
            let service = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        }
    })
    .await
}

/// An address on 127.0.0.1 where nothing listens and nothing else may bind while the tests run.
pub fn dead_addr() -> SocketAddr {
    // Bound and never listening, and kept so for the test process's life: a connection is refused, and
    // no other test's listener (tests run in parallel) can be given the port, as it could if the socket
    // were closed again (the port handed back, and a backend of another test answering here).
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    let addr = socket
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("an IP address");
    std::mem::forget(socket);
    addr
}

/// Reads a request or response head (through the blank line); returns it and the bytes read past it.
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = data.split_off(end + 4);
            return (String::from_utf8_lossy(&data).into_owned(), rest);
        }
        let n = within("a message head", stream.read(&mut buf))
            .await
            .expect("read head");
        assert!(
            n > 0,
            "connection closed inside a head: {:?}",
            String::from_utf8_lossy(&data)
        );
        data.extend_from_slice(&buf[..n]);
    }
}

/// One HTTP response as read off a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Lower-cased header names with their values, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response (head, then a Content-Length, chunked, or read-to-close body; none for 1xx/204/304).
pub async fn read_response<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> RawResponse {
    use tokio::io::AsyncReadExt;
    let (head, mut rest) = read_head(stream).await;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let mut buf = [0u8; 16384];
    let body = if status < 200 || status == 204 || status == 304 {
        rest
    } else if let Some(len) = get("content-length") {
        let len: usize = len.parse().expect("content-length");
        while rest.len() < len {
            let n = within("a response body", stream.read(&mut buf))
                .await
                .expect("read body");
            assert!(n > 0, "connection closed inside a body");
            rest.extend_from_slice(&buf[..n]);
        }
        rest.truncate(len);
        rest
    } else if get("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            // Enough bytes for the size line?
            let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                let n = within("a chunk", stream.read(&mut buf))
                    .await
                    .expect("read chunk");
                assert!(n > 0, "connection closed inside a chunked body");
                rest.extend_from_slice(&buf[..n]);
                continue;
            };
            let size_text = String::from_utf8_lossy(&rest[..eol]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
            // size line, data, CRLF (for the last chunk: the final CRLF, no trailers expected)
            let needed = eol + 2 + size + 2;
            while rest.len() < needed {
                let n = within("a chunk", stream.read(&mut buf))
                    .await
                    .expect("read chunk");
                assert!(n > 0, "connection closed inside a chunked body");
                rest.extend_from_slice(&buf[..n]);
            }
            body.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest.drain(..needed);
            if size == 0 {
                break body;
            }
        }
    } else {
        loop {
            match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break rest,
                Ok(Ok(n)) => rest.extend_from_slice(&buf[..n]),
            }
        }
    };
    RawResponse {
        status,
        headers,
        body,
    }
}

/// Writes `request` on `stream`, within the tests' wait.
pub async fn raw_write<S: tokio::io::AsyncWrite + Unpin>(stream: &mut S, request: &[u8]) {
    use tokio::io::AsyncWriteExt;
    within("write", stream.write_all(request))
        .await
        .expect("write");
}

/// Opens a fresh connection and sends `request` on it.
pub async fn raw_send(addr: SocketAddr, request: &[u8]) -> TcpStream {
    let mut stream = tcp_connect(addr).await;
    raw_write(&mut stream, request).await;
    stream
}

/// Sends `request` on a fresh connection and reads one response.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = raw_send(addr, request).await;
    read_response(&mut stream).await
}

/// A WebSocket upgrade request's text, with `extra` header lines (each ending in "\r\n").
pub fn upgrade_request(addr: SocketAddr, path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Sends `request` over a fresh hyper client connection and returns the response (body still streaming).
pub async fn http_send<B>(addr: SocketAddr, request: Request<B>) -> Response<Incoming>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tcp_connect(addr).await;
    let (mut sender, conn) = within(
        "client handshake",
        hyper::client::conn::http1::handshake(TokioIo::new(stream)),
    )
    .await
    .expect("client handshake");
    tokio::spawn(conn);
    within("a response head", sender.send_request(request))
        .await
        .expect("response")
}

/// `GET path` through a fresh connection: status, headers, whole body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (StatusCode, http::HeaderMap, Bytes) {
    let request = Request::get(path)
        .header(header::HOST, addr.to_string())
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let response = http_send(addr, request).await;
    let (parts, body) = response.into_parts();
    let body = within("a response body", body.collect())
        .await
        .expect("body")
        .to_bytes();
    (parts.status, parts.headers, body)
}
