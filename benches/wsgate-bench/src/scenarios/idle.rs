//! Idle connections: open `conns` WebSocket connections (spread over source
//! addresses), measure the proxy's RSS before and after, hold them, check that
//! every one still echoes, close them. Ops are connections held; the rate is
//! the opening rate and the latency that of the upgrades (for `idle_tls`, TCP
//! connect + TLS handshake + upgrade).
//!
//! [`run`] does it over plain `ws://`, [`run_tls`] over `wss://` (the proxy
//! terminates TLS and talks plain ws to the backends); both are [`held`] with
//! another connect function.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;

use super::{Outcome, Tally};
use crate::client;
use crate::procstat::Probe;
use crate::tls::TlsSetup;

const CONNECT_LIMIT: Duration = Duration::from_secs(10);
const ECHO_LIMIT: Duration = Duration::from_secs(10);
const CLOSE_LIMIT: Duration = Duration::from_secs(3);
/// Longest the opening phase may take as a whole.
const OPEN_PHASE_LIMIT: Duration = Duration::from_secs(180);
const PARALLEL: usize = 200;
const SETTLE: Duration = Duration::from_secs(1);

/// Idle connections over plain `ws://` to `addr`.
pub async fn run(addr: SocketAddr, conns: usize, hold: Duration, probe: Probe) -> Outcome {
    let cfg = client::ws_config(4096);
    held(conns, hold, probe, move || {
        client::ws_connect(addr, client::next_source(), cfg, CONNECT_LIMIT)
    })
    .await
}

/// Idle connections over `wss://` to `addr`, a TLS listener with `tls`'s certificate.
pub async fn run_tls(
    addr: SocketAddr,
    tls: &TlsSetup,
    conns: usize,
    hold: Duration,
    probe: Probe,
) -> Outcome {
    let cfg = client::ws_config(4096);
    let connector = tls.connector();
    held(conns, hold, probe, move || {
        client::wss_connect(
            addr,
            client::next_source(),
            connector.clone(),
            cfg,
            CONNECT_LIMIT,
        )
    })
    .await
}

/// The measurement itself; `connect` opens one WebSocket connection (bounded
/// by its own timeout) each time it is called.
async fn held<S, C, F>(conns: usize, hold: Duration, probe: Probe, connect: C) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: Fn() -> F,
    F: Future<Output = Result<WebSocketStream<S>, String>>,
{
    let mut out = Outcome {
        connections: conns as u64,
        ..Default::default()
    };
    let rss_before = probe.rss();
    let connect = &connect;

    let cpu0 = probe.cpu_s();
    let start = Instant::now();
    let open_deadline = start + OPEN_PHASE_LIMIT;
    let results: Vec<Result<(WebSocketStream<S>, u64), String>> = stream::iter(0..conns)
        .map(|_| async move {
            if Instant::now() > open_deadline {
                return Err(format!("opening took over {OPEN_PHASE_LIMIT:?}; gave up"));
            }
            let t0 = Instant::now();
            let ws = connect().await?;
            Ok((ws, t0.elapsed().as_micros() as u64))
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let open_time = start.elapsed();
    let cpu1 = probe.cpu_s();

    let mut tally = Tally::new();
    let mut open = Vec::with_capacity(conns);
    for r in results {
        match r {
            Ok((ws, us)) => {
                tally.record_us(us);
                open.push(ws);
            }
            Err(e) => tally.error(e),
        }
    }
    let opened = open.len() as u64;
    eprintln!(
        "    idle: {opened}/{conns} open in {:.1}s, holding {}s",
        open_time.as_secs_f64(),
        hold.as_secs()
    );

    tokio::time::sleep(SETTLE.min(hold)).await;
    let rss_after = probe.rss();
    tokio::time::sleep(hold.saturating_sub(SETTLE)).await;

    // Every held connection must still echo.
    let payload = Bytes::from_static(b"still-there-0123");
    let checked: Vec<(WebSocketStream<S>, Result<(), String>)> = stream::iter(open)
        .map(|mut ws| {
            let payload = payload.clone();
            async move {
                let r = client::echo_once(&mut ws, &payload, ECHO_LIMIT).await;
                (ws, r)
            }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let mut echo_failures = 0u64;
    let mut alive = Vec::with_capacity(checked.len());
    for (ws, r) in checked {
        match r {
            Ok(()) => alive.push(ws),
            Err(e) => {
                echo_failures += 1;
                tally.error(format!("after hold: {e}"));
            }
        }
    }
    stream::iter(alive)
        .map(|ws| client::close(ws, CLOSE_LIMIT))
        .buffer_unordered(PARALLEL * 2)
        .for_each(|_| async {})
        .await;
    // Memory the proxy keeps once the connections are gone (leaks, allocator
    // retention): reported, not part of the per-connection figure.
    tokio::time::sleep(SETTLE).await;
    out.rss_after_close_bytes = probe.rss();

    out.ops = opened;
    out.duration_s = open_time.as_secs_f64();
    out.errors = tally.errors;
    out.first_error = tally.first_error.take();
    out.set_latency(&tally.hist);
    out.proxy_cpu_s = cpu0.zip(cpu1).map(|(a, b)| b - a);
    out.rss_before_bytes = rss_before;
    out.rss_after_bytes = rss_after;
    if let (Some(b), Some(a)) = (rss_before, rss_after)
        && opened > 0
    {
        out.rss_per_conn_bytes = Some((a as f64 - b as f64) / opened as f64);
    }
    out.note = Some(format!("echo_failures_after_hold={echo_failures}"));
    out
}
