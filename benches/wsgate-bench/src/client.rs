//! Client-side helpers: TCP connects from spread loopback source addresses,
//! WebSocket upgrades (plain, inside TLS, or over HTTP/2 inside TLS with an
//! extended CONNECT) and single echo round trips, all under timeouts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Empty;
use hyper::client::conn::http2::{self, SendRequest};
use hyper::ext::Protocol;
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

pub type Ws = WebSocketStream<TcpStream>;
/// A WebSocket inside a TLS session (`wss://`).
pub type Wss = WebSocketStream<TlsStream<TcpStream>>;
/// One stream of an HTTP/2 connection, handed over after a 200 to an extended CONNECT.
pub type H2Io = TokioIo<Upgraded>;
/// A WebSocket over one stream of an HTTP/2 connection (RFC 8441).
pub type H2Ws = WebSocketStream<H2Io>;

/// Source addresses 127.0.0.2 ..= 127.0.0.20.
const SOURCE_IPS: u8 = 19;
static NEXT_SOURCE: AtomicUsize = AtomicUsize::new(0);

/// The next client source address, round robin over 127.0.0.2–127.0.0.20, so
/// that many connections to one proxy port never run out of 4-tuples.
pub fn next_source() -> IpAddr {
    let i = NEXT_SOURCE.fetch_add(1, Ordering::Relaxed) % SOURCE_IPS as usize;
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8))
}

/// Connects to `dst` from `src` (port chosen by the kernel at connect time).
pub async fn tcp_connect(dst: SocketAddr, src: IpAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    // Let connect() pick the source port knowing the destination, so the
    // ephemeral range is shared per 4-tuple rather than per source address.
    let one: libc::c_int = 1;
    // SAFETY: valid fd, option value points to a c_int of the given size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    sock.bind(SocketAddr::new(src, 0))?;
    let stream = sock.connect(dst).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Config for benchmark clients: large messages allowed, small buffers for the
/// idle scenario's many connections.
pub fn ws_config(read_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

/// TCP connect plus WebSocket upgrade to `ws://dst/bench`, within `limit`.
pub async fn ws_connect(
    dst: SocketAddr,
    src: IpAddr,
    cfg: WebSocketConfig,
    limit: Duration,
) -> Result<Ws, String> {
    ws_connect_path(dst, src, "/bench", cfg, limit).await
}

/// As [`ws_connect`], to `ws://ADDR{path}` (`idle_tls_backend` asks for the
/// path the proxies route to their TLS backends).
pub async fn ws_connect_path(
    dst: SocketAddr,
    src: IpAddr,
    path: &str,
    cfg: WebSocketConfig,
    limit: Duration,
) -> Result<Ws, String> {
    let fut = async {
        let stream = tcp_connect(dst, src)
            .await
            .map_err(|e| format!("connect {dst}: {e}"))?;
        let url = format!("ws://{dst}{path}");
        let (ws, _resp) = tokio_tungstenite::client_async_with_config(url, stream, Some(cfg))
            .await
            .map_err(|e| format!("upgrade {dst}: {e}"))?;
        Ok::<_, String>(ws)
    };
    match timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("connect+upgrade {dst}: timed out after {limit:?}")),
    }
}

/// Why [`ws_connect_origin`] got no WebSocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// The server answered the upgrade with this status instead of 101, and
    /// the `Retry-After` it gave (whole seconds), if any.
    Refused {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// Anything else: connect refused or reset, a malformed answer, a timeout.
    Failed(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Refused {
                status,
                retry_after,
            } => write!(f, "upgrade answered {status} (Retry-After {retry_after:?})"),
            ConnectError::Failed(e) => f.write_str(e),
        }
    }
}

/// A `Retry-After` in whole seconds (the HTTP-date form is not used by wsgate).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// As [`ws_connect`], optionally with an `Origin` header, telling a refusal
/// (a status other than 101, with its `Retry-After`) from other failures.
pub async fn ws_connect_origin(
    dst: SocketAddr,
    src: IpAddr,
    origin: Option<&'static str>,
    cfg: WebSocketConfig,
    limit: Duration,
) -> Result<Ws, ConnectError> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    let fut = async {
        let stream = tcp_connect(dst, src)
            .await
            .map_err(|e| ConnectError::Failed(format!("connect {dst}: {e}")))?;
        let mut request = format!("ws://{dst}/bench")
            .into_client_request()
            .map_err(|e| ConnectError::Failed(format!("request: {e}")))?;
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("origin", HeaderValue::from_static(origin));
        }
        match tokio_tungstenite::client_async_with_config(request, stream, Some(cfg)).await {
            Ok((ws, _resp)) => Ok(ws),
            Err(WsError::Http(resp)) => Err(ConnectError::Refused {
                status: resp.status().as_u16(),
                retry_after: resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after),
            }),
            Err(e) => Err(ConnectError::Failed(format!("upgrade {dst}: {e}"))),
        }
    };
    match timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Failed(format!(
            "connect+upgrade {dst}: timed out after {limit:?}"
        ))),
    }
}

/// TCP connect, TLS handshake (SNI [`crate::tls::SERVER_NAME`]) and WebSocket
/// upgrade inside it, to `wss://localhost:PORT/bench`, within `limit` as a whole.
pub async fn wss_connect(
    dst: SocketAddr,
    src: IpAddr,
    tls: TlsConnector,
    cfg: WebSocketConfig,
    limit: Duration,
) -> Result<Wss, String> {
    wss_connect_path(dst, src, tls, "/bench", cfg, limit).await
}

/// As [`wss_connect`], to `wss://localhost:PORT{path}` (`wss16k_tls_backend`
/// asks for the path the proxies route to their TLS backends).
pub async fn wss_connect_path(
    dst: SocketAddr,
    src: IpAddr,
    tls: TlsConnector,
    path: &str,
    cfg: WebSocketConfig,
    limit: Duration,
) -> Result<Wss, String> {
    let fut = async {
        let stream = tcp_connect(dst, src)
            .await
            .map_err(|e| format!("connect {dst}: {e}"))?;
        let stream = tls
            .connect(crate::tls::server_name(), stream)
            .await
            .map_err(|e| format!("TLS handshake {dst}: {e}"))?;
        let url = format!("wss://{}:{}{path}", crate::tls::SERVER_NAME, dst.port());
        let (ws, _resp) = tokio_tungstenite::client_async_with_config(url, stream, Some(cfg))
            .await
            .map_err(|e| format!("upgrade {dst} (TLS): {e}"))?;
        Ok::<_, String>(ws)
    };
    match timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "connect+TLS+upgrade {dst}: timed out after {limit:?}"
        )),
    }
}

/// TCP connect and a TLS handshake (SNI [`crate::tls::SERVER_NAME`]), then
/// an orderly close (close_notify): what the session negotiated.
pub async fn tls_probe(
    dst: SocketAddr,
    tls: TlsConnector,
    limit: Duration,
) -> Result<crate::tls::Negotiated, String> {
    let fut = async {
        let stream = tcp_connect(dst, next_source())
            .await
            .map_err(|e| format!("connect {dst}: {e}"))?;
        let mut stream = tls
            .connect(crate::tls::server_name(), stream)
            .await
            .map_err(|e| format!("TLS handshake {dst}: {e}"))?;
        let seen = crate::tls::Negotiated::of_client(stream.get_ref().1);
        let _ = stream.shutdown().await;
        Ok::<_, String>(seen)
    };
    match timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("connect+TLS {dst}: timed out after {limit:?}")),
    }
}

/// How a `wss://` connection ended after [`close_tls`] sent its close_notify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsEnd {
    /// The peer's close_notify came (before or after ours).
    Notified,
    /// The peer ended otherwise: TCP closed without close_notify, a reset,
    /// or ours could not be sent.
    Unclean(String),
}

/// Closes a `wss://` WebSocket in order, within `limit`: the WebSocket Close
/// handshake, then the client's close_notify (TLS shutdown, then TCP FIN),
/// then waits for the peer's end of the TLS session. An error is a failure
/// before the client's close_notify; how the peer ended is the [`TlsEnd`].
pub async fn close_tls(mut ws: Wss, limit: Duration) -> Result<TlsEnd, String> {
    let fut = async {
        ws.close(None).await.map_err(|e| format!("close: {e}"))?;
        // Until the peer's Close: tungstenite then ends the stream.
        while let Some(m) = ws.next().await {
            if m.is_err() {
                break;
            }
        }
        let tls = ws.get_mut();
        if let Err(e) = tls.shutdown().await {
            return Ok(TlsEnd::Unclean(format!("close_notify not sent: {e}")));
        }
        let mut buf = [0u8; 1024];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) => return Ok(TlsEnd::Notified),
                Ok(_) => continue,
                Err(e) => return Ok(TlsEnd::Unclean(format!("after close_notify: {e}"))),
            }
        }
    };
    match timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("TLS close timed out after {limit:?}")),
    }
}

/// An HTTP/2 connection over TLS: requests go through `sender`; `driver` is
/// the task running the connection (it ends once every sender and stream is
/// gone, or when the server closes the connection).
pub struct H2Conn {
    pub sender: SendRequest<Empty<Bytes>>,
    pub driver: JoinHandle<()>,
    /// Whether the server's SETTINGS allow extended CONNECT
    /// (SETTINGS_ENABLE_CONNECT_PROTOCOL), as last seen by the driver.
    pub connect_protocol: Arc<AtomicBool>,
}

/// TCP connect, TLS handshake offering only `h2` by ALPN (SNI
/// [`crate::tls::SERVER_NAME`]) and the HTTP/2 handshake, within `limit`.
/// `tls` must offer `h2` ([`crate::tls::TlsSetup::h2_connector`]); a server
/// that does not choose it is an error.
pub async fn h2_connect(
    dst: SocketAddr,
    src: IpAddr,
    tls: TlsConnector,
    limit: Duration,
) -> Result<H2Conn, String> {
    let fut = async {
        let stream = tcp_connect(dst, src)
            .await
            .map_err(|e| format!("connect {dst}: {e}"))?;
        let stream = tls
            .connect(crate::tls::server_name(), stream)
            .await
            .map_err(|e| format!("TLS handshake {dst}: {e}"))?;
        let alpn = stream.get_ref().1.alpn_protocol();
        if alpn != Some(b"h2") {
            return Err(format!(
                "{dst} did not choose h2 by ALPN (chose {:?})",
                alpn.map(String::from_utf8_lossy)
            ));
        }
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/2 handshake {dst}: {e}"))?;
        let connect_protocol = Arc::new(AtomicBool::new(false));
        let seen = Arc::clone(&connect_protocol);
        let driver = tokio::spawn(async move {
            tokio::pin!(conn);
            let _ = std::future::poll_fn(|cx| {
                let r = conn.as_mut().poll(cx);
                seen.store(
                    conn.is_extended_connect_protocol_enabled(),
                    Ordering::Relaxed,
                );
                r
            })
            .await;
        });
        Ok::<_, String>(H2Conn {
            sender,
            driver,
            connect_protocol,
        })
    };
    match timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "connect+TLS+HTTP/2 handshake {dst}: timed out after {limit:?}"
        )),
    }
}

/// A WebSocket on a new stream of `sender`'s connection: an extended CONNECT
/// (`:protocol websocket`, RFC 8441 §4) to `https://localhost:PORT/bench`,
/// answered 200, within `limit`.
pub async fn h2_websocket(
    sender: &mut SendRequest<Empty<Bytes>>,
    port: u16,
    cfg: WebSocketConfig,
    limit: Duration,
) -> Result<H2Ws, String> {
    let fut = async {
        sender
            .ready()
            .await
            .map_err(|e| format!("HTTP/2 connection: {e}"))?;
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("https://{}:{port}/bench", crate::tls::SERVER_NAME))
            .header("sec-websocket-version", "13")
            .body(Empty::new())
            .map_err(|e| format!("request: {e}"))?;
        request
            .extensions_mut()
            .insert(Protocol::from_static("websocket"));
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("extended CONNECT: {e}"))?;
        if response.status() != StatusCode::OK {
            return Err(format!("extended CONNECT answered {}", response.status()));
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|e| format!("stream after the 200: {e}"))?;
        Ok::<_, String>(
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, Some(cfg)).await,
        )
    };
    match timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "extended CONNECT on port {port}: timed out after {limit:?}"
        )),
    }
}

/// Sends one binary message and waits for its echo (same length), within `limit`.
pub async fn echo_once<S>(
    ws: &mut WebSocketStream<S>,
    payload: &Bytes,
    limit: Duration,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let fut = async {
        ws.send(Message::Binary(payload.clone()))
            .await
            .map_err(|e| format!("send: {e}"))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => {
                    return if b.len() == payload.len() {
                        Ok(())
                    } else {
                        Err(format!(
                            "echo of {} bytes came back as {}",
                            payload.len(),
                            b.len()
                        ))
                    };
                }
                Some(Ok(Message::Text(t))) => {
                    return Err(format!("binary message echoed as text ({} bytes)", t.len()));
                }
                Some(Ok(Message::Close(f))) => return Err(format!("closed by peer: {f:?}")),
                Some(Ok(_)) => continue, // ping/pong
                Some(Err(e)) => return Err(format!("recv: {e}")),
                None => return Err("connection ended".into()),
            }
        }
    };
    match timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("echo timed out after {limit:?}")),
    }
}

/// Sends Close and waits (bounded) for the peer's Close and end of stream.
pub async fn close<S>(mut ws: WebSocketStream<S>, limit: Duration) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let fut = async {
        ws.close(None).await.map_err(|e| format!("close: {e}"))?;
        while let Some(m) = ws.next().await {
            if m.is_err() {
                break;
            }
        }
        Ok::<_, String>(())
    };
    match timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("close timed out after {limit:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 1 "), Some(Duration::from_secs(1)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }
}
