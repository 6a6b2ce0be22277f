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

/// Awaits `future`, failing the test if it takes longer than `WAIT`.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out waiting for {what}"),
    }
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
/// streams) and WebSocket (echoes every message; picks the last subprotocol the client offers).
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
        let addr = listener.local_addr().expect("backend addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (name2, seen2) = (name.to_string(), Arc::clone(&seen));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (name, seen) = (name2.clone(), Arc::clone(&seen2));
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        backend_service(req, name.clone(), Arc::clone(&seen))
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
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

type TestBody = BoxBody<Bytes, hyper::Error>;

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
        let mut response = Response::new(full(""));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = response.headers_mut();
        h.insert(header::UPGRADE, "websocket".parse().expect("static"));
        h.insert(header::CONNECTION, "Upgrade".parse().expect("static"));
        h.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            wsgate::websocket::accept_key(key.as_bytes())
                .parse()
                .expect("base64"),
        );
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
                if ws.send(message).await.is_err() {
                    return;
                }
            }
            Message::Close(_) => {
                let _ = ws.close(None).await;
                return;
            }
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
    let (ws, _response) = within(
        "websocket connect",
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("websocket handshake");
    ws
}

/// The next data message, skipping pings and pongs.
pub async fn next_message(ws: &mut Client) -> Message {
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

/// Sends a raw HTTP/1.1 request over a fresh TCP connection and returns the whole response text
/// (read until the server closes or `WAIT` passes).
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
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
