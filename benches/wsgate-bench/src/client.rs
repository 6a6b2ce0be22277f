//! Client-side helpers: TCP connects from spread loopback source addresses,
//! WebSocket upgrades (plain, or inside TLS) and single echo round trips, all
//! under timeouts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub type Ws = WebSocketStream<TcpStream>;
/// A WebSocket inside a TLS session (`wss://`).
pub type Wss = WebSocketStream<TlsStream<TcpStream>>;

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
    let fut = async {
        let stream = tcp_connect(dst, src)
            .await
            .map_err(|e| format!("connect {dst}: {e}"))?;
        let url = format!("ws://{dst}/bench");
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

/// TCP connect, TLS handshake (SNI [`crate::tls::SERVER_NAME`]) and WebSocket
/// upgrade inside it, to `wss://localhost:PORT/bench`, within `limit` as a whole.
pub async fn wss_connect(
    dst: SocketAddr,
    src: IpAddr,
    tls: TlsConnector,
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
        let url = format!("wss://{}:{}/bench", crate::tls::SERVER_NAME, dst.port());
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
