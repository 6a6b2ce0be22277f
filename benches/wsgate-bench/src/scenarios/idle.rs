//! Idle connections: open `conns` WebSocket connections (spread over source
//! addresses), measure the proxy's RSS before and after, hold them, check that
//! every one still echoes, close them. Ops are connections held; the rate is
//! the opening rate and the latency that of the upgrades (for `idle_tls`, TCP
//! connect + TLS handshake + upgrade).
//!
//! [`run`] does it over plain `ws://`, [`run_tls`] over `wss://` (the proxy
//! terminates TLS and talks plain ws to the backends), [`run_tls_backend`]
//! over plain `ws://` to the proxy's route to its TLS backends (the proxy
//! holds a TLS session toward a backend per tunnel), [`run_h2`] as
//! WebSockets over HTTP/2 over TLS (RFC 8441 extended CONNECT, several streams
//! per connection; ops are WebSockets, the latency that of the extended
//! CONNECTs); all are [`held`] with another opening phase.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;

use super::{Outcome, Tally};
use crate::client::{self, H2Conn};
use crate::procstat::Probe;
use crate::tls::TlsSetup;

const CONNECT_LIMIT: Duration = Duration::from_secs(10);
const ECHO_LIMIT: Duration = Duration::from_secs(10);
const CLOSE_LIMIT: Duration = Duration::from_secs(3);
/// Longest the opening phase may take as a whole.
const OPEN_PHASE_LIMIT: Duration = Duration::from_secs(180);
/// WebSockets being opened at once (for `idle_h2`, over as many HTTP/2
/// connections as that takes).
const PARALLEL: usize = 200;
const SETTLE: Duration = Duration::from_secs(1);

/// One opened WebSocket and how long its opening took (µs), or why it failed.
type Opened<S> = Result<(WebSocketStream<S>, u64), String>;

/// What carries the WebSockets besides their own sockets: nothing for `ws://`
/// and `wss://` (one connection each), the HTTP/2 connections for `idle_h2`.
trait Carriers {
    /// Connections carrying the WebSockets, when they are not one each.
    fn count(&self) -> Option<u64>;
    /// Closes them once their WebSockets are closed (bounded in time).
    async fn close(self);
}

impl Carriers for () {
    fn count(&self) -> Option<u64> {
        None
    }

    async fn close(self) {}
}

/// Idle connections over plain `ws://` to `addr`.
pub async fn run(addr: SocketAddr, conns: usize, hold: Duration, probe: Probe) -> Outcome {
    let cfg = client::ws_config(4096);
    let open = open_each(conns, move || {
        client::ws_connect(addr, client::next_source(), cfg, CONNECT_LIMIT)
    });
    held(conns, hold, probe, open).await
}

/// Idle connections over plain `ws://` to `addr`, on the path the proxy routes
/// to its TLS backends ([`crate::targets::TLS_BACKEND_PATH`]).
pub async fn run_tls_backend(
    addr: SocketAddr,
    conns: usize,
    hold: Duration,
    probe: Probe,
) -> Outcome {
    let cfg = client::ws_config(4096);
    let open = open_each(conns, move || {
        client::ws_connect_path(
            addr,
            client::next_source(),
            crate::targets::TLS_BACKEND_PATH,
            cfg,
            CONNECT_LIMIT,
        )
    });
    held(conns, hold, probe, open).await
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
    let open = open_each(conns, move || {
        client::wss_connect(
            addr,
            client::next_source(),
            connector.clone(),
            cfg,
            CONNECT_LIMIT,
        )
    });
    held(conns, hold, probe, open).await
}

/// `tunnels` idle WebSockets over HTTP/2 over TLS to `addr` (ALPN `h2`),
/// `streams` per connection (the last connection takes the remainder).
pub async fn run_h2(
    addr: SocketAddr,
    tls: &TlsSetup,
    tunnels: usize,
    streams: usize,
    hold: Duration,
    probe: Probe,
) -> Outcome {
    let streams = streams.max(1);
    let connector = tls.h2_connector();
    let open = async move {
        let deadline = Instant::now() + OPEN_PHASE_LIMIT;
        let conns = tunnels.div_ceil(streams);
        let per_conn: Vec<(Option<H2Conn>, Vec<Opened<_>>)> = stream::iter(0..conns)
            .map(|i| {
                let n = streams.min(tunnels - i * streams);
                open_h2_conn(addr, connector.clone(), n, deadline)
            })
            .buffer_unordered((PARALLEL / streams).max(1))
            .collect()
            .await;
        let mut carriers = H2Carriers(Vec::with_capacity(conns));
        let mut opened = Vec::with_capacity(tunnels);
        for (conn, ws) in per_conn {
            carriers.0.extend(conn);
            opened.extend(ws);
        }
        (opened, carriers)
    };
    let mut out = held(tunnels, hold, probe, open).await;
    out.h2_streams = Some(streams as u64);
    out
}

/// Whether `addr` takes a WebSocket over HTTP/2 (ALPN `h2`, then an extended
/// CONNECT answered 200 that echoes); the error says why not.
pub async fn probe_h2(addr: SocketAddr, tls: &TlsSetup) -> Result<(), String> {
    let conn = client::h2_connect(
        addr,
        client::next_source(),
        tls.h2_connector(),
        CONNECT_LIMIT,
    )
    .await?;
    let mut sender = conn.sender.clone();
    let result = async {
        let opened = client::h2_websocket(
            &mut sender,
            addr.port(),
            client::ws_config(4096),
            CONNECT_LIMIT,
        )
        .await;
        let mut ws = match opened {
            Ok(ws) => ws,
            // A server's SETTINGS come before any answer.
            Err(e) if !conn.connect_protocol.load(Ordering::Relaxed) => {
                return Err(format!(
                    "{e}; its SETTINGS do not enable extended CONNECT (RFC 8441)"
                ));
            }
            Err(e) => return Err(e),
        };
        client::echo_once(&mut ws, &Bytes::from_static(b"probe"), ECHO_LIMIT).await?;
        let _ = client::close(ws, CLOSE_LIMIT).await;
        Ok(())
    }
    .await;
    drop(sender);
    H2Carriers(vec![conn]).close().await;
    result
}

/// One HTTP/2 connection with `n` WebSockets opened on it at once; when the
/// connection cannot be made, `n` errors.
async fn open_h2_conn(
    addr: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    n: usize,
    deadline: Instant,
) -> (Option<H2Conn>, Vec<Opened<client::H2Io>>) {
    if Instant::now() > deadline {
        let e = format!("opening took over {OPEN_PHASE_LIMIT:?}; gave up");
        return (None, failed(&e, n));
    }
    let conn = match client::h2_connect(addr, client::next_source(), tls, CONNECT_LIMIT).await {
        Ok(c) => c,
        Err(e) => return (None, failed(&e, n)),
    };
    let cfg = client::ws_config(4096);
    let sender = &conn.sender;
    let opened: Vec<Opened<client::H2Io>> = stream::iter(0..n)
        .map(|_| {
            let mut sender = sender.clone();
            async move {
                let t0 = Instant::now();
                let ws = client::h2_websocket(&mut sender, addr.port(), cfg, CONNECT_LIMIT).await?;
                Ok((ws, t0.elapsed().as_micros() as u64))
            }
        })
        .buffer_unordered(n.max(1))
        .collect()
        .await;
    (Some(conn), opened)
}

/// `n` WebSockets that could not be opened for the same reason.
fn failed<S>(e: &str, n: usize) -> Vec<Opened<S>> {
    (0..n).map(|_| Err(e.to_string())).collect()
}

/// The HTTP/2 connections of `idle_h2`.
struct H2Carriers(Vec<H2Conn>);

impl Carriers for H2Carriers {
    fn count(&self) -> Option<u64> {
        Some(self.0.len() as u64)
    }

    /// Drops every sender: with its streams closed, a connection then ends
    /// (GOAWAY, close_notify); drivers still running after [`CLOSE_LIMIT`] are
    /// aborted, which drops their sockets.
    async fn close(self) {
        let drivers: Vec<_> = self.0.into_iter().map(|c| c.driver).collect();
        let deadline = tokio::time::Instant::now() + CLOSE_LIMIT;
        for mut d in drivers {
            if tokio::time::timeout_at(deadline, &mut d).await.is_err() {
                d.abort();
            }
        }
    }
}

/// Opens `conns` connections, [`PARALLEL`] at a time, each by one call of
/// `connect` (bounded by its own timeout), within [`OPEN_PHASE_LIMIT`].
async fn open_each<S, C, F>(conns: usize, connect: C) -> (Vec<Opened<S>>, ())
where
    C: Fn() -> F,
    F: Future<Output = Result<WebSocketStream<S>, String>>,
{
    let connect = &connect;
    let deadline = Instant::now() + OPEN_PHASE_LIMIT;
    let opened = stream::iter(0..conns)
        .map(|_| async move {
            if Instant::now() > deadline {
                return Err(format!("opening took over {OPEN_PHASE_LIMIT:?}; gave up"));
            }
            let t0 = Instant::now();
            let ws = connect().await?;
            Ok((ws, t0.elapsed().as_micros() as u64))
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    (opened, ())
}

/// The measurement itself; `open` is the opening phase: it opens the
/// WebSockets (each bounded by its own timeout, the whole within
/// [`OPEN_PHASE_LIMIT`]) and hands them over with what carries them.
async fn held<S, G, F>(conns: usize, hold: Duration, probe: Probe, open: F) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
    G: Carriers,
    F: Future<Output = (Vec<Opened<S>>, G)>,
{
    let mut out = Outcome {
        connections: conns as u64,
        ..Default::default()
    };
    let rss_before = probe.rss();

    let cpu0 = probe.cpu_s();
    let start = Instant::now();
    let (results, carriers) = open.await;
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
    let rss_held = probe.rss();

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
    let carrier_count = carriers.count();
    carriers.close().await;
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
    out.rss_held_bytes = rss_held;
    if let (Some(b), Some(h)) = (rss_before, rss_held)
        && opened > 0
    {
        out.rss_per_conn_held_bytes = Some((h as f64 - b as f64) / opened as f64);
    }
    if let (Some(b), Some(a)) = (rss_before, rss_after)
        && opened > 0
    {
        out.rss_per_conn_bytes = Some((a as f64 - b as f64) / opened as f64);
        out.rss_per_h2_conn_bytes = carrier_count
            .filter(|&c| c > 0)
            .map(|c| (a as f64 - b as f64) / c as f64);
    }
    out.h2_conns = carrier_count;
    out.note = Some(format!("echo_failures_after_hold={echo_failures}"));
    out
}
