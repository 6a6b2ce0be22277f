//! Echo throughput: `conns` WebSocket connections, each with one binary
//! message of `size` bytes in flight; messages/s and round-trip latency.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;

use super::{Outcome, Tally};
use crate::client::{self, Ws};
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

pub async fn run(
    addr: SocketAddr,
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
    let cfg = client::ws_config(read_buffer(size));

    // Connect everything and warm each connection with one echo, outside
    // the measured window.
    let connected = join_all((0..conns).map(|_| {
        let payload = payload.clone();
        async move {
            let mut ws =
                client::ws_connect(addr, client::next_source(), cfg, CONNECT_LIMIT).await?;
            client::echo_once(&mut ws, &payload, op_limit(size)).await?;
            Ok::<Ws, String>(ws)
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
        .map(|ws| tokio::spawn(conn_loop(addr, ws, payload.clone(), deadline)))
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
async fn conn_loop(
    addr: SocketAddr,
    mut ws: Option<Ws>,
    payload: Bytes,
    deadline: Instant,
) -> Tally {
    let size = payload.len();
    let cfg = client::ws_config(read_buffer(size));
    let mut tally = Tally::new();
    while Instant::now() < deadline {
        let Some(sock) = ws.as_mut() else {
            match client::ws_connect(addr, client::next_source(), cfg, CONNECT_LIMIT).await {
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
        let _ = client::close(s, CLOSE_LIMIT).await;
    }
    tally
}
