//! In-process echo backends: one port answers a plain `GET /` with 200 and
//! echoes every text/binary message of a WebSocket upgraded on it.
//!
//! HTTP is served by hyper; an upgrade request is answered with 101 here and
//! the raw `TcpStream` (taken back with `Upgraded::downcast`) is handed to
//! tungstenite, so the echo path has no extra adapter layer.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// Longest a backend WebSocket waits for the next message before giving up.
const WS_IDLE_LIMIT: Duration = Duration::from_secs(3600);
/// Longest an echo reply may take to be written.
const SEND_LIMIT: Duration = Duration::from_secs(60);
/// Longest an upgrade waits for hyper to hand over the connection.
const UPGRADE_LIMIT: Duration = Duration::from_secs(10);
const HTTP_BODY: &[u8] = b"ok\n";

/// A running echo backend; stops accepting when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    live: Arc<AtomicUsize>,
    accept_task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl Backend {
    /// Sockets (HTTP connections and WebSocket sessions) the backend holds now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}

/// Counts a live socket while held.
struct LiveGuard(Arc<AtomicUsize>);

impl LiveGuard {
    fn new(c: &Arc<AtomicUsize>) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        LiveGuard(c.clone())
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

/// Binds 127.0.0.1:0 and serves until dropped.
pub async fn start() -> std::io::Result<Backend> {
    // A deep backlog: the idle scenario opens hundreds of connections at once.
    let sock = TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let listener: TcpListener = sock.listen(4096)?;
    let addr = listener.local_addr()?;
    let live = Arc::new(AtomicUsize::new(0));
    let live2 = live.clone();
    let accept_task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    eprintln!("backend {addr}: accept error: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let live = live2.clone();
            tokio::spawn(serve_conn(stream, live));
        }
    });
    Ok(Backend {
        addr,
        live,
        accept_task,
    })
}

async fn serve_conn(stream: TcpStream, live: Arc<AtomicUsize>) {
    let _guard = LiveGuard::new(&live);
    let svc = service_fn(move |req| handle(req, live.clone()));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(120))
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    // Errors here are client resets and timeouts: nothing to report.
    let _ = conn.await;
}

fn is_ws_upgrade(req: &Request<Incoming>) -> bool {
    let has_token = |name, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    has_token(UPGRADE, "websocket") && has_token(CONNECTION, "upgrade")
}

async fn handle(
    mut req: Request<Incoming>,
    live: Arc<AtomicUsize>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if !is_ws_upgrade(&req) {
        let mut resp = Response::new(Full::new(Bytes::from_static(HTTP_BODY)));
        resp.headers_mut()
            .insert("content-type", HeaderValue::from_static("text/plain"));
        return Ok(resp);
    }
    let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY) else {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"missing key\n")));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(resp);
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let guard = LiveGuard::new(&live);
    tokio::spawn(async move {
        let _guard = guard;
        let upgraded = match timeout(UPGRADE_LIMIT, on_upgrade).await {
            Ok(Ok(u)) => u,
            _ => return,
        };
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                let ws = WebSocketStream::from_partially_read(
                    parts.io.into_inner(),
                    parts.read_buf.to_vec(),
                    Role::Server,
                    Some(ws_config()),
                )
                .await;
                echo(ws).await;
            }
            Err(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(ws_config()),
                )
                .await;
                echo(ws).await;
            }
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    Ok(resp)
}

async fn echo<S>(mut ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let msg = match timeout(WS_IDLE_LIMIT, ws.next()).await {
            Ok(Some(Ok(m))) => m,
            // Closed, errored or idle for an hour.
            _ => return,
        };
        // tungstenite answers pings and close frames itself; the next read
        // flushes the reply and then reports the end.
        if matches!(msg, Message::Binary(_) | Message::Text(_))
            && !matches!(timeout(SEND_LIMIT, ws.send(msg)).await, Ok(Ok(())))
        {
            return;
        }
    }
}
