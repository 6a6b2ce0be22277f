//! `drain`: what draining a backend through wsgate's admin API does to the
//! backend that remains. wsgate only: nginx and HAProxy have no drain that
//! moves live WebSockets.
//!
//! Two echo backends of the bench's own, `a` and `b` (their `id`s in the
//! pool), run on a runtime with a thread of its own, as the storm's do; each
//! sends its name right after its 101 (so that a client knows where it
//! landed) and notes the moment of every 101 in a log of its own. N clients
//! open a WebSocket through a freshly started wsgate (`least_conn` spreads
//! them about evenly) and hold it. Then `POST
//! /pools/echo/backends/a/drain?spread=S` (with the bench's bearer token), and
//! wsgate closes each of `a`'s tunnels at a random moment within S. Every
//! client whose WebSocket ends (a Close, whatever its code; or none) notes
//! when and how, answers the Close in the background and reconnects at once
//! (no pause: what the clients see is what wsgate does; `--drain-jitter-ms`
//! may add one), reads the backend's name and checks one echo. The
//! measurement ends when no client is on `a` and none is between two
//! WebSockets, or at S + the grace. Then every client echoes once more and
//! closes: a client without a working WebSocket then was left without a
//! backend.
//!
//! Reported: `b`'s 101s after the drain per 100 ms and per second, the peak
//! and the median second, the time until the last client was back (its echo
//! done), clients that did not come back, the Close codes seen, reconnects
//! that landed on `a` (none should), and wsgate's CPU from the drain call
//! until the last client was back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

use super::storm::{BackendRuntime, bin_stats, free_port};
use super::{Outcome, Scenario, new_hist};
use crate::backend::{self, Backend, UpgradeLog};
use crate::client::{self, ConnectError, Ws};
use crate::procstat::{self, Probe};
use crate::report::Record;
use crate::soak::gate::{Metrics, admin_get};
use crate::targets::{Admission, Fleet, Spec, Target};

/// Width of a bin of the backends' 101s.
pub const BIN_MS: u64 = 100;
/// Longest one connect + upgrade + greeting may take.
const ATTEMPT_LIMIT: Duration = Duration::from_secs(10);
/// Longest an echo or a close may take.
const STEP_LIMIT: Duration = Duration::from_secs(10);
/// Pause after a failed attempt, before the jitter.
const FAILURE_PAUSE: Duration = Duration::from_millis(250);
/// Longest the clients may take to connect before the drain.
const SETUP_LIMIT: Duration = Duration::from_secs(60);
/// Pause between the last client's connect and the drain: a second to
/// settle, then wsgate's CPU with every tunnel idle is read over the rest.
const SETTLE: Duration = Duration::from_secs(1);
const IDLE_READING: Duration = Duration::from_secs(5);
/// The pool and the backends' ids in wsgate's config.
const POOL: &str = "echo";
const IDS: [&str; 2] = ["a", "b"];
/// The name of the bench's admin token.
const TOKEN_NAME: &str = "bench";
/// The pool's `drain_spread` (the default, written out; the drain call gives
/// its own).
const POOL_SPREAD: &str = "60s";
/// Sockets the backends may keep after a measurement: wsgate's pooled
/// keep-alive connections of its readiness checks.
const KEPT_ALIVE: usize = 2;

/// What the scenario is told to do.
#[derive(Clone, Debug)]
pub struct Plan {
    pub clients: usize,
    /// The spreads to measure, each once per run (order reversed every other run).
    pub spreads: Vec<Duration>,
    /// How long after the spread the measurement may go on.
    pub grace: Duration,
    /// Added before every reconnect: uniform in 0..=jitter (0: none).
    pub jitter: Duration,
    pub runs: u32,
}

impl Plan {
    /// Rough seconds per run, for the tool's time estimate.
    pub fn seconds_per_run(&self) -> u64 {
        self.spreads.iter().map(|s| s.as_secs() + 15).sum()
    }

    /// The spreads in the order run `run` measures them.
    pub fn order(&self, run: u32) -> Vec<Duration> {
        let mut v = self.spreads.clone();
        if run.is_multiple_of(2) {
            v.reverse();
        }
        v
    }
}

/// `30s`, or `500ms` for a spread that is not whole seconds.
pub fn spread_text(d: Duration) -> String {
    if d.as_millis().is_multiple_of(1000) {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The record's variant for a spread: `spread_30s`.
pub fn variant(d: Duration) -> String {
    format!("spread_{}", spread_text(d))
}

/// The drain's own figures, in the record beside the usual ones (`ops` is
/// the clients that came back, `duration_s` the time until the last did,
/// the latencies each one's time from the end of its WebSocket to the echo
/// on its next).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DrainStats {
    pub clients: u64,
    pub spread_s: f64,
    pub jitter_ms: u64,
    /// Clients with a WebSocket before the drain, and on which backend
    /// (by the greeting).
    pub connected: u64,
    pub on_a: u64,
    pub on_b: u64,
    /// Seconds the clients took to connect, all of them.
    pub setup_s: f64,
    /// `tunnels` of each backend in `/status` just before the drain, and
    /// `tunnels` and `state` once the measurement ended.
    pub status_before: BTreeMap<String, u64>,
    pub status_after: BTreeMap<String, (u64, String)>,
    /// The drain call's HTTP status and how long it took.
    pub drain_status: u16,
    pub drain_call_ms: f64,
    /// How the WebSockets on `a` ended: the Close code, or what came
    /// instead of one, and how many.
    pub closes: BTreeMap<String, u64>,
    /// WebSockets on `b` that ended (none should).
    pub ended_on_b: u64,
    /// Clients that came back (a WebSocket and an echo after their end).
    pub moved: u64,
    /// Reconnects that landed on `a` (none should).
    pub landed_on_a: u64,
    /// Clients whose WebSocket ended and who had none again by the end.
    pub not_back: u64,
    /// Clients still on `a` when the measurement ended.
    pub left_on_a: u64,
    /// Clients that never connected before the drain.
    pub setup_failures: u64,
    /// Clients whose final echo or close failed (no working WebSocket at
    /// the end, when `not_back` is 0).
    pub final_failures: u64,
    pub first_failure: Option<String>,
    /// Reconnect attempts, all clients, and those that failed (refused,
    /// reset, timed out, no echo), with refusals by status.
    pub reconnect_attempts: u64,
    pub reconnect_failures: u64,
    pub refusals: BTreeMap<String, u64>,
    /// Seconds from the drain call to the first and last Close a client
    /// got, and to the last client back (echo done).
    pub first_close_s: Option<f64>,
    pub last_close_s: Option<f64>,
    pub last_back_s: Option<f64>,
    /// Largest distance between the clients' Close moments (as fractions of
    /// the spread) and a uniform spread over it (Kolmogorov–Smirnov D);
    /// about 1.36 / √n at 5 % for n uniform moments.
    pub close_ks: Option<f64>,
    /// The measurement hit its bound (spread + grace).
    pub timed_out: bool,
    /// `b`'s 101s after the drain call; `a`'s (none should).
    pub b_upgrades: u64,
    pub a_upgrades: u64,
    pub bin_ms: u64,
    /// `b`'s 101s per bin from the drain call to the last.
    pub bins: Vec<u32>,
    /// `b`'s 101s per second (whole seconds from the drain call).
    pub per_s: Vec<u32>,
    /// The clients' Closes per second, from the drain call.
    pub closes_per_s: Vec<u32>,
    /// The busiest second of `per_s`, the busiest 1-s window (any 10
    /// consecutive bins), the busiest bin.
    pub peak_per_s: u64,
    pub peak_1s: u64,
    pub max_bin: u64,
    /// The median of `per_s` over the window (the spread's seconds; for an
    /// instant cut, until the last 101), empty seconds included; the
    /// window's seconds, and the 101s after it.
    pub median_per_s: f64,
    pub window_s: u64,
    #[serde(default)]
    pub after_window: u64,
    /// 101s per second from the first to the last.
    pub mean_rate: Option<f64>,
    /// CPU seconds of the bench process (clients and backends) over the same
    /// time as the record's `proxy_cpu_s` (from the drain call until the
    /// last client was back).
    pub bench_cpu_s: Option<f64>,
    /// wsgate's CPU seconds per second with every client's tunnel idle,
    /// read over 5 s before the drain: what the time of the drain costs
    /// without any drain (the tick of `/proc` is 10 ms: ±0.002 here).
    #[serde(default)]
    pub idle_cpu_per_s: Option<f64>,
    /// `wsgate_ws_closes_total` by reason at the end.
    pub closes_by_reason: BTreeMap<String, i64>,
    /// Where a returning client's time went, milliseconds p50 / p99 / max
    /// over the clients that came back: `close_to_tcp` from the end of its
    /// WebSocket to its new TCP connection (failed attempts included),
    /// `tcp_to_101` the upgrade through wsgate, `101_to_greeting` the
    /// backend's first message, `greeting_to_echo` the check.
    #[serde(default)]
    pub steps_ms: BTreeMap<String, [f64; 3]>,
    /// The kernel's TCP counters that moved from the drain call until the
    /// last client was back (this network namespace, so any other loopback
    /// traffic too): accept queues that overflowed, SYNs dropped or answered
    /// with a cookie, SYNs sent again, retransmission timeouts.
    #[serde(default)]
    pub tcp: BTreeMap<String, u64>,
}

/// The kernel counters a drain reports when they move.
const TCP_COUNTERS: [&str; 9] = [
    "ListenOverflows",
    "ListenDrops",
    "TCPSynRetrans",
    "TCPReqQFullDoCookies",
    "TCPReqQFullDrop",
    "SyncookiesSent",
    "TCPTimeouts",
    "TCPChallengeACK",
    "TCPAbortOnData",
];

/// Whole seconds of `bins` (`per` bins each), the last one partial.
pub fn per_second(bins: &[u32], per: usize) -> Vec<u32> {
    bins.chunks(per.max(1)).map(|c| c.iter().sum()).collect()
}

/// The median of the first `window` values of `v` (missing ones are 0).
pub fn median_of_window(v: &[u32], window: usize) -> f64 {
    if window == 0 {
        return 0.0;
    }
    let mut w: Vec<u32> = (0..window)
        .map(|i| v.get(i).copied().unwrap_or(0))
        .collect();
    w.sort_unstable();
    let n = w.len();
    if n % 2 == 1 {
        f64::from(w[n / 2])
    } else {
        (f64::from(w[n / 2 - 1]) + f64::from(w[n / 2])) / 2.0
    }
}

/// Kolmogorov–Smirnov distance between `fractions` (each in 0..=1) and the
/// uniform distribution on [0, 1].
pub fn ks_uniform(fractions: &[f64]) -> Option<f64> {
    if fractions.is_empty() {
        return None;
    }
    let mut f: Vec<f64> = fractions.iter().map(|x| x.clamp(0.0, 1.0)).collect();
    f.sort_by(f64::total_cmp);
    let n = f.len() as f64;
    let d = f
        .iter()
        .enumerate()
        .map(|(i, &x)| (x - i as f64 / n).max((i as f64 + 1.0) / n - x))
        .fold(0.0, f64::max);
    Some(d)
}

/// Shared between the clients and the measurement.
#[derive(Default)]
struct Counts {
    /// Clients with a WebSocket, and those that gave up, in the setup.
    connected: AtomicUsize,
    setup_failed: AtomicUsize,
    /// Clients whose WebSocket is on `a` now.
    on_a: AtomicI64,
    /// Clients between the end of a WebSocket and the echo on the next.
    away: AtomicI64,
}

/// A WebSocket that ended before the stop.
struct End {
    at: Instant,
    how: String,
    on: usize,
}

/// A client back: when its previous WebSocket ended, when the steps of its
/// last (successful) connect ended, when the echo on the new one came back,
/// and on which backend.
struct Back {
    ended_at: Instant,
    steps: Steps,
    at: Instant,
    on: usize,
}

#[derive(Default)]
struct ClientEnd {
    first: Option<usize>,
    setup_error: Option<String>,
    ends: Vec<End>,
    backs: Vec<Back>,
    reconnect_attempts: u64,
    reconnect_failures: u64,
    refusals: BTreeMap<String, u64>,
    first_failure: Option<String>,
    final_error: Option<String>,
}

impl ClientEnd {
    fn fail(&mut self, e: String) {
        self.reconnect_failures += 1;
        if self.first_failure.is_none() {
            self.first_failure = Some(e);
        }
    }
}

/// When one connect's steps ended: the TCP connect, the upgrade (101), the
/// greeting.
#[derive(Clone, Copy)]
struct Steps {
    tcp: Instant,
    upgraded: Instant,
    greeted: Instant,
}

/// Connect, upgrade and read the backend's name: the WebSocket, the
/// backend's index in [`IDS`], and when each step ended.
async fn join(addr: SocketAddr) -> Result<(Ws, usize, Steps), ConnectError> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let cfg = client::ws_config(4096);
    let fut = async {
        let stream = client::tcp_connect(addr, client::next_source())
            .await
            .map_err(|e| ConnectError::Failed(format!("connect {addr}: {e}")))?;
        let tcp = Instant::now();
        let url = format!("ws://{addr}/bench");
        let mut ws = match tokio_tungstenite::client_async_with_config(url, stream, Some(cfg)).await
        {
            Ok((ws, _)) => ws,
            Err(WsError::Http(resp)) => {
                return Err(ConnectError::Refused {
                    status: resp.status().as_u16(),
                    retry_after: resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(client::parse_retry_after),
                });
            }
            Err(e) => return Err(ConnectError::Failed(format!("upgrade {addr}: {e}"))),
        };
        let upgraded = Instant::now();
        let greeting = loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => break t.to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => {
                    return Err(ConnectError::Failed(format!("greeting: got {other:?}")));
                }
                Some(Err(e)) => return Err(ConnectError::Failed(format!("greeting: {e}"))),
                None => {
                    return Err(ConnectError::Failed(
                        "greeting: the connection ended".into(),
                    ));
                }
            }
        };
        let steps = Steps {
            tcp,
            upgraded,
            greeted: Instant::now(),
        };
        match IDS.iter().position(|id| *id == greeting) {
            Some(i) => Ok((ws, i, steps)),
            None => Err(ConnectError::Failed(format!(
                "greeting {greeting:?} names no backend"
            ))),
        }
    };
    match timeout(ATTEMPT_LIMIT, fut).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Failed(format!(
            "connect+upgrade+greeting {addr}: timed out after {ATTEMPT_LIMIT:?}"
        ))),
    }
}

/// Sleeps `d`; false if the stop came first.
async fn pause(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = stop.wait_for(|s| *s) => false,
        _ = tokio::time::sleep(d) => true,
    }
}

fn jitter(max: Duration) -> Duration {
    if max.is_zero() {
        Duration::ZERO
    } else {
        Duration::from_millis(fastrand::u64(0..=max.as_millis() as u64))
    }
}

/// How a WebSocket ended, from what its stream gave.
fn end_kind(m: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> Option<String> {
    match m {
        Some(Ok(Message::Close(Some(f)))) => Some(u16::from(f.code).to_string()),
        Some(Ok(Message::Close(None))) => Some("Close without a code".into()),
        // Anything but an end: the client holds on.
        Some(Ok(_)) => None,
        Some(Err(e)) => Some(format!("no Close: {e}")),
        None => Some("no Close: the connection ended".into()),
    }
}

/// One client: connect (in the setup), hold, and after every end of its
/// WebSocket reconnect at once until it has one that echoes; at the stop,
/// one echo and a close.
async fn drain_client(
    addr: SocketAddr,
    counts: Arc<Counts>,
    mut stop: watch::Receiver<bool>,
    setup_deadline: Instant,
    max_jitter: Duration,
) -> ClientEnd {
    let mut end = ClientEnd::default();
    let payload = Bytes::from_static(&[0x5A; 64]);
    let mut current = loop {
        if Instant::now() >= setup_deadline || *stop.borrow() {
            counts.setup_failed.fetch_add(1, Ordering::Relaxed);
            return end;
        }
        match join(addr).await {
            Ok((ws, on, _)) => {
                end.first = Some(on);
                if on == 0 {
                    counts.on_a.fetch_add(1, Ordering::Relaxed);
                }
                counts.connected.fetch_add(1, Ordering::Relaxed);
                break (ws, on);
            }
            Err(e) => {
                if end.setup_error.is_none() {
                    end.setup_error = Some(e.to_string());
                }
                if !pause(FAILURE_PAUSE, &mut stop).await {
                    counts.setup_failed.fetch_add(1, Ordering::Relaxed);
                    return end;
                }
            }
        }
    };
    loop {
        let (mut ws, on) = current;
        // Hold until the WebSocket ends or the stop.
        let how = loop {
            let m = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => None,
                m = ws.next() => Some(m),
            };
            match m {
                None => {
                    let r = async {
                        client::echo_once(&mut ws, &payload, STEP_LIMIT).await?;
                        client::close(ws, STEP_LIMIT).await
                    };
                    if let Err(e) = r.await {
                        end.final_error = Some(e);
                    }
                    return end;
                }
                Some(m) => {
                    if let Some(how) = end_kind(m) {
                        break how;
                    }
                }
            }
        };
        let ended_at = Instant::now();
        if on == 0 {
            counts.on_a.fetch_sub(1, Ordering::Relaxed);
        }
        counts.away.fetch_add(1, Ordering::Relaxed);
        end.ends.push(End {
            at: ended_at,
            how,
            on,
        });
        // tungstenite has queued the answer to the Close: it goes out, and
        // the connection ends, in the background, while the client is
        // already on its way back.
        tokio::spawn(async move {
            let _ = client::close(ws, STEP_LIMIT).await;
        });
        current = loop {
            let wait = jitter(max_jitter);
            if (!wait.is_zero() && !pause(wait, &mut stop).await) || *stop.borrow() {
                end.final_error = Some("no WebSocket at the end: still reconnecting".into());
                return end;
            }
            end.reconnect_attempts += 1;
            let failed = match join(addr).await {
                Ok((mut ws, on, steps)) => {
                    match client::echo_once(&mut ws, &payload, STEP_LIMIT).await {
                        Ok(()) => {
                            let at = Instant::now();
                            end.backs.push(Back {
                                ended_at,
                                steps,
                                at,
                                on,
                            });
                            if on == 0 {
                                counts.on_a.fetch_add(1, Ordering::Relaxed);
                            }
                            counts.away.fetch_sub(1, Ordering::Relaxed);
                            break (ws, on);
                        }
                        Err(e) => {
                            end.fail(format!("echo after reconnecting: {e}"));
                            FAILURE_PAUSE
                        }
                    }
                }
                Err(ConnectError::Refused {
                    status,
                    retry_after,
                }) => {
                    *end.refusals.entry(status.to_string()).or_default() += 1;
                    end.fail(format!("reconnect answered {status}"));
                    retry_after.unwrap_or(FAILURE_PAUSE)
                }
                Err(ConnectError::Failed(e)) => {
                    end.fail(e);
                    FAILURE_PAUSE
                }
            };
            if !pause(failed, &mut stop).await {
                end.final_error = Some("no WebSocket at the end: still reconnecting".into());
                return end;
            }
        };
    }
}

/// `POST path` on the admin listener with the bearer token: the status and
/// the body.
async fn admin_post(addr: SocketAddr, path: &str, token: &str) -> Result<(u16, String), String> {
    let fut = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("admin {addr}: {e}"))?;
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("admin write: {e}"))?;
        let mut raw = Vec::with_capacity(4096);
        // Bounded by the size check and the timeout around it.
        let mut chunk = [0u8; 4096];
        loop {
            let n = s
                .read(&mut chunk)
                .await
                .map_err(|e| format!("admin read: {e}"))?;
            if n == 0 || raw.len() > 1 << 20 {
                break;
            }
            raw.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| format!("admin {path}: no status line"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_string());
        Ok((status, body))
    };
    match timeout(Duration::from_secs(5), fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("admin {path}: timed out")),
    }
}

/// Each backend's `tunnels` and `state` in `/status`'s pool [`POOL`], by id.
async fn backend_status(admin: SocketAddr) -> BTreeMap<String, (u64, String)> {
    let mut out = BTreeMap::new();
    let Ok(Ok(text)) = timeout(Duration::from_secs(5), admin_get(admin, "/status")).await else {
        return out;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return out;
    };
    let pools = v["pools"].as_array().cloned().unwrap_or_default();
    for p in pools.iter().filter(|p| p["name"] == POOL) {
        for b in p["backends"].as_array().into_iter().flatten() {
            let id = b["id"].as_str().unwrap_or("?").to_string();
            let tunnels = b["tunnels"].as_u64().unwrap_or(0);
            let state = b["state"].as_str().unwrap_or("?").to_string();
            out.insert(id, (tunnels, state));
        }
    }
    out
}

/// Seconds from `t0` to `t` (0 for a moment before it).
fn since(t0: Instant, t: Instant) -> f64 {
    t.saturating_duration_since(t0).as_secs_f64()
}

/// One drain with `spread` on the running `target` (its admin listener
/// `admin`, the bench's `token`); `logs` are the backends' logs of 101s.
pub async fn measure(
    target: &Target,
    admin: SocketAddr,
    token: &str,
    logs: &[Arc<UpgradeLog>; 2],
    plan: &Plan,
    spread: Duration,
) -> Outcome {
    let probe: Probe = target.probe();
    let addr = target.addr;
    let counts = Arc::new(Counts::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let setup_start = Instant::now();
    let setup_deadline = setup_start + SETUP_LIMIT;
    let tasks: Vec<JoinHandle<ClientEnd>> = (0..plan.clients)
        .map(|_| {
            tokio::spawn(drain_client(
                addr,
                counts.clone(),
                stop_rx.clone(),
                setup_deadline,
                plan.jitter,
            ))
        })
        .collect();
    let mut stats = DrainStats {
        clients: plan.clients as u64,
        spread_s: spread.as_secs_f64(),
        jitter_ms: plan.jitter.as_millis() as u64,
        bin_ms: BIN_MS,
        ..DrainStats::default()
    };
    // Bounded by the setup deadline: every client has connected or given up by then.
    while counts.connected.load(Ordering::Relaxed) + counts.setup_failed.load(Ordering::Relaxed)
        < plan.clients
        && Instant::now() < setup_deadline + ATTEMPT_LIMIT
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stats.setup_s = setup_start.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    let idle0 = (probe.cpu_s(), Instant::now());
    tokio::time::sleep(IDLE_READING).await;
    if let (Some(a), Some(b)) = (idle0.0, probe.cpu_s()) {
        stats.idle_cpu_per_s = Some((b - a) / idle0.1.elapsed().as_secs_f64());
    }
    stats.status_before = backend_status(admin)
        .await
        .into_iter()
        .map(|(id, (t, _))| (id, t))
        .collect();
    for log in logs {
        let _ = log.take();
    }

    // The drain.
    let tcp0 = procstat::tcp_ext(&TCP_COUNTERS);
    let cpu0 = probe.cpu_s();
    let bench0 = procstat::self_cpu_seconds();
    let t0 = Instant::now();
    let path = format!(
        "/pools/{POOL}/backends/{}/drain?spread={}",
        IDS[0],
        spread_text(spread)
    );
    let mut out = Outcome {
        variant: Some(variant(spread)),
        connections: plan.clients as u64,
        message_bytes: Some(64),
        ..Outcome::default()
    };
    let call = admin_post(admin, &path, token).await;
    stats.drain_call_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let bound = t0 + spread + plan.grace;
    match call {
        Ok((status, body)) => {
            stats.drain_status = status;
            if status != 200 {
                out.note_error(format!("drain call answered {status}: {}", body.trim()));
            }
        }
        Err(e) => out.note_error(format!("drain call failed: {e}")),
    }
    // Until nobody is on `a` or between two WebSockets, or the bound.
    let mut cpu1 = None;
    let mut bench1 = None;
    if out.errors == 0 {
        loop {
            let on_a = counts.on_a.load(Ordering::Relaxed);
            let away = counts.away.load(Ordering::Relaxed);
            if on_a <= 0 && away <= 0 {
                cpu1 = probe.cpu_s();
                bench1 = Some(procstat::self_cpu_seconds());
                break;
            }
            if Instant::now() >= bound {
                stats.timed_out = true;
                cpu1 = probe.cpu_s();
                bench1 = Some(procstat::self_cpu_seconds());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let tcp1 = procstat::tcp_ext(&TCP_COUNTERS);
    for (i, name) in TCP_COUNTERS.iter().enumerate() {
        let d = tcp1[i].saturating_sub(tcp0[i]);
        if d > 0 {
            stats.tcp.insert((*name).to_string(), d);
        }
    }
    stats.left_on_a = counts.on_a.load(Ordering::Relaxed).max(0) as u64;
    stats.status_after = backend_status(admin).await;
    if let Ok(Ok(text)) = timeout(Duration::from_secs(5), admin_get(admin, "/metrics")).await {
        stats.closes_by_reason = Metrics::parse(&text).by_label("wsgate_ws_closes_total", "reason");
    }
    let b_log = logs[1].take();
    let a_log = logs[0].take();

    // The end: every client echoes once and closes.
    let _ = stop_tx.send(true);
    let join_limit = ATTEMPT_LIMIT + STEP_LIMIT * 3;
    let mut ends = Vec::with_capacity(plan.clients);
    for t in tasks {
        match tokio::time::timeout(join_limit, t).await {
            Ok(Ok(e)) => ends.push(e),
            Ok(Err(e)) => ends.push(ClientEnd {
                final_error: Some(format!("client task failed: {e}")),
                ..ClientEnd::default()
            }),
            Err(_) => ends.push(ClientEnd {
                final_error: Some("client task did not end".into()),
                ..ClientEnd::default()
            }),
        }
    }

    // What the clients saw.
    let mut hist = new_hist();
    let step_names = [
        "close_to_tcp",
        "tcp_to_101",
        "101_to_greeting",
        "greeting_to_echo",
    ];
    let mut step_hists: Vec<_> = step_names.iter().map(|_| new_hist()).collect();
    let mut close_offsets: Vec<Duration> = Vec::new();
    let mut last_back: Option<Instant> = None;
    for e in &ends {
        match e.first {
            Some(0) => stats.on_a += 1,
            Some(_) => stats.on_b += 1,
            None => {
                stats.setup_failures += 1;
                if stats.first_failure.is_none() {
                    stats.first_failure = e.setup_error.clone();
                }
                continue;
            }
        }
        stats.connected += 1;
        for end in &e.ends {
            if end.on == 0 {
                *stats.closes.entry(end.how.clone()).or_default() += 1;
                close_offsets.push(end.at.saturating_duration_since(t0));
            } else {
                stats.ended_on_b += 1;
            }
        }
        for b in &e.backs {
            if b.on == 0 {
                stats.landed_on_a += 1;
            }
            let took = b.at.saturating_duration_since(b.ended_at);
            hist.saturating_record((took.as_micros() as u64).max(1));
            let marks = [
                b.ended_at,
                b.steps.tcp,
                b.steps.upgraded,
                b.steps.greeted,
                b.at,
            ];
            for (i, h) in step_hists.iter_mut().enumerate() {
                let d = marks[i + 1].saturating_duration_since(marks[i]);
                h.saturating_record((d.as_micros() as u64).max(1));
            }
            last_back = last_back.max(Some(b.at));
        }
        if !e.backs.is_empty() {
            stats.moved += 1;
        }
        if e.ends.len() > e.backs.len() {
            stats.not_back += 1;
        } else if e.final_error.is_some() {
            stats.final_failures += 1;
        }
        stats.reconnect_attempts += e.reconnect_attempts;
        stats.reconnect_failures += e.reconnect_failures;
        for (k, v) in &e.refusals {
            *stats.refusals.entry(k.clone()).or_default() += v;
        }
        if stats.first_failure.is_none() {
            stats.first_failure = e.first_failure.clone().or(e.final_error.clone());
        }
    }
    for (name, h) in step_names.iter().zip(&step_hists) {
        if !h.is_empty() {
            let ms = |us: u64| us as f64 / 1000.0;
            stats.steps_ms.insert(
                (*name).to_string(),
                [
                    ms(h.value_at_quantile(0.5)),
                    ms(h.value_at_quantile(0.99)),
                    ms(h.max()),
                ],
            );
        }
    }
    close_offsets.sort_unstable();
    stats.first_close_s = close_offsets.first().map(Duration::as_secs_f64);
    stats.last_close_s = close_offsets.last().map(Duration::as_secs_f64);
    stats.last_back_s = last_back.map(|t| since(t0, t));
    if !spread.is_zero() {
        let fractions: Vec<f64> = close_offsets
            .iter()
            .map(|d| d.as_secs_f64() / spread.as_secs_f64())
            .collect();
        stats.close_ks = ks_uniform(&fractions);
    }
    let per = (1000 / BIN_MS) as usize;
    let (close_bins, _, _, _) = bin_stats(&close_offsets, Duration::from_millis(BIN_MS), per);
    stats.closes_per_s = per_second(&close_bins, per);

    // What `b` saw.
    let offsets: Vec<Duration> = b_log
        .iter()
        .map(|t| t.saturating_duration_since(t0))
        .collect();
    stats.a_upgrades = a_log.len() as u64;
    stats.b_upgrades = offsets.len() as u64;
    let (bins, max_bin, _, peak) = bin_stats(&offsets, Duration::from_millis(BIN_MS), per);
    stats.per_s = per_second(&bins, per);
    stats.bins = bins;
    stats.max_bin = max_bin;
    stats.peak_1s = peak;
    stats.peak_per_s = stats.per_s.iter().copied().max().unwrap_or(0) as u64;
    // The window: the spread; for an instant cut, until the last 101.
    let last = offsets.last().map_or(0.0, Duration::as_secs_f64);
    let window = if spread.is_zero() {
        last
    } else {
        spread.as_secs_f64()
    };
    stats.window_s = window.ceil().max(1.0) as u64;
    stats.after_window = offsets
        .iter()
        .filter(|d| d.as_secs_f64() >= stats.window_s as f64)
        .count() as u64;
    stats.median_per_s = median_of_window(&stats.per_s, stats.window_s as usize);
    if let (Some(a), Some(b)) = (offsets.first(), offsets.last())
        && b > a
    {
        stats.mean_rate = Some((offsets.len() - 1) as f64 / (*b - *a).as_secs_f64());
    }
    stats.bench_cpu_s = bench1.map(|b| b - bench0);

    out.ops = stats.moved;
    out.duration_s = stats
        .last_back_s
        .unwrap_or_else(|| (spread + plan.grace).as_secs_f64());
    out.proxy_cpu_s = cpu0.zip(cpu1).map(|(a, b)| b - a);
    out.set_latency(&hist);
    let not_1012: u64 = stats
        .closes
        .iter()
        .filter(|(k, _)| k.as_str() != "1012")
        .map(|(_, v)| v)
        .sum();
    let failures = stats.not_back
        + stats.left_on_a
        + stats.setup_failures
        + stats.final_failures
        + stats.landed_on_a
        + stats.ended_on_b
        + not_1012;
    if failures > 0 {
        out.errors += failures;
        if out.first_error.is_none() {
            out.first_error = Some(format!(
                "{} not back, {} left on a, {} never connected, {} final echoes failed, {} landed on a, {} ended on b, {} ends other than 1012 (first failure: {})",
                stats.not_back,
                stats.left_on_a,
                stats.setup_failures,
                stats.final_failures,
                stats.landed_on_a,
                stats.ended_on_b,
                not_1012,
                stats.first_failure.as_deref().unwrap_or("none")
            ));
        }
    }
    out.drain = Some(stats);
    out
}

fn drain_line(run: u32, runs: u32, r: &Record) -> String {
    let s = r.drain.clone().unwrap_or_default();
    let head: Vec<String> = s.per_s.iter().take(8).map(u32::to_string).collect();
    format!(
        "[drain {run}/{runs}] {:<11} {}/{} on a/b; moved {} in {}  b's 101s: peak second {} (1-s window {}, max bin {}), median {:.0}/s over {} s (+{} after), first seconds [{}]  back after its Close p50 {:.1}ms p99 {:.1}ms  closes {:?}  not back {} left on a {}  steps {:?}  tcp {:?}  cpu {} (idle {}/s; bench {})  errors {}{}",
        r.variant.as_deref().unwrap_or("-"),
        s.on_a,
        s.on_b,
        s.moved,
        s.last_back_s.map_or("–".into(), |v| format!("{v:.2}s")),
        s.peak_per_s,
        s.peak_1s,
        s.max_bin,
        s.median_per_s,
        s.window_s,
        s.after_window,
        head.join(" "),
        r.p50_us.unwrap_or(0) as f64 / 1000.0,
        r.p99_us.unwrap_or(0) as f64 / 1000.0,
        s.closes,
        s.not_back,
        s.left_on_a,
        s.steps_ms,
        s.tcp,
        r.proxy_cpu_s.map_or("–".into(), |c| format!("{c:.2}s")),
        s.idle_cpu_per_s.map_or("–".into(), |c| format!("{c:.3}s")),
        s.bench_cpu_s.map_or("–".into(), |c| format!("{c:.2}s")),
        r.errors,
        r.first_error
            .as_ref()
            .map_or(String::new(), |e| format!(" (first: {e})")),
    )
}

/// Writes the token file (`name:token`) and returns the token.
fn write_token(path: &Path) -> Result<String, String> {
    let token: String = (0..32)
        .map(|_| char::from_digit(fastrand::u32(0..16), 16).unwrap_or('0'))
        .collect();
    std::fs::write(path, format!("{TOKEN_NAME}:{token}\n"))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(token)
}

/// Waits (bounded) until the backends hold no socket but wsgate's keep-alive
/// connections.
async fn settled(backends: &[Backend], wait: Duration) {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if backends.iter().map(|b| b.live()).sum::<usize>() <= KEPT_ALIVE {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let live: usize = backends.iter().map(|b| b.live()).sum();
    eprintln!("    note: drain backends still hold {live} sockets after {wait:?}");
}

/// Every spread, `plan.runs` times, in alternating order, each on a freshly
/// started wsgate; every record is handed to `emit` as soon as it is made.
/// `base` is wsgate's spec as the other scenarios run it (binary, threads).
pub async fn run_all(
    base: &Spec,
    plan: &Plan,
    emit: &mut dyn FnMut(Record) -> Result<(), String>,
) -> Result<(), String> {
    // Dropped last (declared first), after the backends.
    let rt = BackendRuntime::start()?;
    let logs = [
        Arc::new(UpgradeLog::default()),
        Arc::new(UpgradeLog::default()),
    ];
    let mut backends = Vec::new();
    for (i, id) in IDS.iter().enumerate() {
        backends.push(
            rt.backend_with(backend::Options {
                greeting: Some((*id).to_string()),
                upgrade_log: Some(logs[i].clone()),
                ..backend::Options::default()
            })
            .await?,
        );
    }
    eprintln!(
        "drain: echo backends a on {} and b on {} (a runtime of their own)",
        backends[0].addr, backends[1].addr
    );
    let dir = base.dir.join("drain");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let token_file = dir.join("admin-tokens");
    let token = write_token(&token_file)?;
    let base = Spec {
        dir,
        backends: [backends[0].addr, backends[1].addr],
        tls: None,
        h2: false,
        tls_backends: None,
        admission: None,
        fleet: Some(Fleet {
            token_file: Some(token_file),
            drain_spread: Some(POOL_SPREAD.into()),
            ids: Some(IDS.map(String::from)),
        }),
        ..base.clone()
    };
    let threads = base.threads;
    let spreads: Vec<String> = plan.spreads.iter().map(|s| spread_text(*s)).collect();
    eprintln!(
        "drain: {} clients; spreads {}; bound spread + {:?}; reconnect jitter up to {:?}",
        plan.clients,
        spreads.join(", "),
        plan.grace,
        plan.jitter
    );
    for run in 1..=plan.runs {
        for spread in plan.order(run) {
            let v = variant(spread);
            let admin = free_port()?;
            let spec = Spec {
                admission: Some(Admission {
                    admin: Some(admin),
                    ..Admission::default()
                }),
                ..base.clone()
            };
            eprintln!("[drain {run}/{}] {v} ...", plan.runs);
            let mut target = match Target::start(spec).await {
                Ok(t) => t,
                Err(e) => {
                    let mut o = Outcome {
                        variant: Some(v.clone()),
                        ..Outcome::default()
                    };
                    o.note_error(format!("wsgate did not start: {e}"));
                    let r = Record::new("wsgate", Scenario::Drain.name(), run, threads, o);
                    eprintln!("[drain {run}/{}] {v}: {:?}", plan.runs, r.first_error);
                    emit(r)?;
                    continue;
                }
            };
            let o = measure(&target, admin, &token, &logs, plan, spread).await;
            let mut r = Record::new("wsgate", Scenario::Drain.name(), run, threads, o);
            if let Some(why) = target.check_alive() {
                r.errors += 1;
                r.note = Some(format!("wsgate exited during the drain: {why}"));
            }
            eprintln!("{}", drain_line(run, plan.runs, &r));
            emit(r)?;
            settled(&backends, Duration::from_secs(30)).await;
            target.stop();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_are_written_for_the_api_and_the_records() {
        assert_eq!(spread_text(Duration::from_secs(30)), "30s");
        assert_eq!(spread_text(Duration::ZERO), "0s");
        assert_eq!(spread_text(Duration::from_millis(1500)), "1500ms");
        assert_eq!(variant(Duration::from_secs(30)), "spread_30s");
    }

    #[test]
    fn runs_alternate_the_order() {
        let plan = Plan {
            clients: 10,
            spreads: vec![Duration::from_secs(30), Duration::ZERO],
            grace: Duration::from_secs(60),
            jitter: Duration::ZERO,
            runs: 2,
        };
        assert_eq!(plan.order(1), vec![Duration::from_secs(30), Duration::ZERO]);
        assert_eq!(plan.order(2), vec![Duration::ZERO, Duration::from_secs(30)]);
        assert_eq!(plan.seconds_per_run(), 45 + 15);
    }

    #[test]
    fn seconds_and_their_median() {
        let bins = [1, 2, 3, 0, 0, 0, 0, 0, 0, 4, 5, 0, 7];
        assert_eq!(per_second(&bins, 10), vec![10, 12]);
        assert_eq!(per_second(&[], 10), Vec::<u32>::new());
        // Seconds missing at the end count as empty.
        assert_eq!(median_of_window(&[80, 90, 85], 4), 82.5);
        assert_eq!(median_of_window(&[80, 90, 85], 3), 85.0);
        assert_eq!(median_of_window(&[2500], 1), 2500.0);
        assert_eq!(median_of_window(&[], 0), 0.0);
    }

    #[test]
    fn ks_tells_a_spread_from_a_burst() {
        let uniform: Vec<f64> = (0..1000).map(|i| (i as f64 + 0.5) / 1000.0).collect();
        assert!(ks_uniform(&uniform).unwrap() < 0.01);
        let burst = vec![0.0; 100];
        assert!((ks_uniform(&burst).unwrap() - 1.0).abs() < 1e-9);
        let first_half: Vec<f64> = (0..1000).map(|i| i as f64 / 2000.0).collect();
        assert!((ks_uniform(&first_half).unwrap() - 0.5).abs() < 0.01);
        assert_eq!(ks_uniform(&[]), None);
    }

    #[test]
    fn an_end_is_told_from_a_message() {
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
        let close = |code: u16| {
            Some(Ok(Message::Close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: "service restart".into(),
            }))))
        };
        assert_eq!(end_kind(close(1012)).as_deref(), Some("1012"));
        assert_eq!(end_kind(close(1001)).as_deref(), Some("1001"));
        assert_eq!(
            end_kind(Some(Ok(Message::Close(None)))).as_deref(),
            Some("Close without a code")
        );
        assert_eq!(end_kind(Some(Ok(Message::text("x")))), None);
        assert!(end_kind(None).unwrap().starts_with("no Close"));
    }
}
