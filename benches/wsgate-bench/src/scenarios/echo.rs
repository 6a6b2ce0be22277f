//! Echo throughput: `conns` WebSocket connections, each with one binary
//! message of `size` bytes in flight; messages/s and round-trip latency.
//! [`run`] over plain `ws://`, [`run_tls`] over `wss://` (the `wss*`
//! scenarios: the proxy terminates TLS).

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::WebSocketStream;

use super::{Outcome, Tally};
use crate::client::{self, Wss};
use crate::procstat::Probe;

const CONNECT_LIMIT: Duration = Duration::from_secs(10);
const CLOSE_LIMIT: Duration = Duration::from_secs(2);

fn op_limit(size: usize) -> Duration {
    if size >= 256 * 1024 {
        Duration::from_secs(30)
    } else {
        Duration::from_secs(10)
    }
}

fn read_buffer(size: usize) -> usize {
    size.clamp(4096, 128 * 1024)
}

/// How the connections are opened and closed: `ws://` or `wss://`.
trait Dial: Clone + Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn connect(
        &self,
        size: usize,
    ) -> impl Future<Output = Result<WebSocketStream<Self::Io>, String>> + Send;
    fn close(ws: WebSocketStream<Self::Io>) -> impl Future<Output = ()> + Send;
}

#[derive(Clone)]
struct Plain(SocketAddr);

impl Dial for Plain {
    type Io = tokio::net::TcpStream;

    async fn connect(&self, size: usize) -> Result<client::Ws, String> {
        let cfg = client::ws_config(read_buffer(size));
        client::ws_connect(self.0, client::next_source(), cfg, CONNECT_LIMIT).await
    }

    async fn close(ws: client::Ws) {
        let _ = client::close(ws, CLOSE_LIMIT).await;
    }
}

#[derive(Clone)]
struct Tls {
    addr: SocketAddr,
    connector: TlsConnector,
    path: &'static str,
}

impl Dial for Tls {
    type Io = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

    async fn connect(&self, size: usize) -> Result<Wss, String> {
        let cfg = client::ws_config(read_buffer(size));
        client::wss_connect_path(
            self.addr,
            client::next_source(),
            self.connector.clone(),
            self.path,
            cfg,
            CONNECT_LIMIT,
        )
        .await
    }

    async fn close(ws: Wss) {
        let _ = client::close_tls(ws, CLOSE_LIMIT).await;
    }
}

pub async fn run(
    addr: SocketAddr,
    conns: usize,
    size: usize,
    duration: Duration,
    probe: Probe,
) -> Outcome {
    measure(Plain(addr), conns, size, duration, probe).await
}

/// As [`run`], over TLS to `addr` (the proxy's TLS listener) with
/// `connector`, to `path` (`/bench`, or the route to the TLS backends).
pub async fn run_tls(
    addr: SocketAddr,
    connector: TlsConnector,
    path: &'static str,
    conns: usize,
    size: usize,
    duration: Duration,
    probe: Probe,
) -> Outcome {
    let dial = Tls {
        addr,
        connector,
        path,
    };
    measure(dial, conns, size, duration, probe).await
}

async fn measure<D: Dial>(
    dial: D,
    conns: usize,
    size: usize,
    duration: Duration,
    probe: Probe,
) -> Outcome {
    let mut out = Outcome {
        connections: conns as u64,
        message_bytes: Some(size as u64),
        ..Default::default()
    };
    let payload = Bytes::from(vec![0xA5u8; size]);

    // Connect everything and warm each connection with one echo, outside
    // the measured window.
    let connected = join_all((0..conns).map(|_| {
        let payload = payload.clone();
        let dial = dial.clone();
        async move {
            let mut ws = dial.connect(size).await?;
            client::echo_once(&mut ws, &payload, op_limit(size)).await?;
            Ok::<_, String>(ws)
        }
    }))
    .await;
    let mut sockets = Vec::with_capacity(conns);
    for c in connected {
        match c {
            Ok(ws) => sockets.push(Some(ws)),
            Err(e) => {
                out.note_error(e);
                sockets.push(None);
            }
        }
    }

    let cpu0 = probe.cpu_s();
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|ws| tokio::spawn(conn_loop(dial.clone(), ws, payload.clone(), deadline)))
        .collect();
    tokio::time::sleep_until(deadline.into()).await;
    let cpu1 = probe.cpu_s();
    out.duration_s = start.elapsed().as_secs_f64().min(duration.as_secs_f64());

    let mut total = Tally::new();
    for t in tasks {
        match tokio::time::timeout(op_limit(size) + CONNECT_LIMIT + CLOSE_LIMIT, t).await {
            Ok(Ok(tally)) => tally.merge_into(&mut total),
            Ok(Err(e)) => total.error(format!("task failed: {e}")),
            Err(_) => total.error("task did not finish".into()),
        }
    }
    out.ops = total.ops;
    out.errors += total.errors;
    if out.first_error.is_none() {
        out.first_error = total.first_error;
    }
    out.set_latency(&total.hist);
    out.proxy_cpu_s = cpu0.zip(cpu1).map(|(a, b)| b - a);
    out
}

/// One connection's loop until `deadline`; reconnects (bounded by the
/// deadline) after an error. Ops finishing after the deadline are not counted.
async fn conn_loop<D: Dial>(
    dial: D,
    mut ws: Option<WebSocketStream<D::Io>>,
    payload: Bytes,
    deadline: Instant,
) -> Tally {
    let size = payload.len();
    let mut tally = Tally::new();
    while Instant::now() < deadline {
        let Some(sock) = ws.as_mut() else {
            match dial.connect(size).await {
                Ok(s) => ws = Some(s),
                Err(e) => {
                    tally.error(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            continue;
        };
        let t0 = Instant::now();
        match client::echo_once(sock, &payload, op_limit(size)).await {
            Ok(()) => {
                let done = Instant::now();
                if done <= deadline {
                    tally.record_us(done.duration_since(t0).as_micros() as u64);
                }
            }
            Err(e) => {
                tally.error(e);
                ws = None;
            }
        }
    }
    if let Some(s) = ws {
        D::close(s).await;
    }
    tally
}
