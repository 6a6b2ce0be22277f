//! `storm`: what wsgate's handshake gate (a listener's `handshake_rate`) does
//! to a reconnect storm, and what its admission control costs a handshake.
//! wsgate only: nginx and HAProxy have no queue of handshakes to compare.
//!
//! 1. **The storm**, twice per run, each on a freshly started wsgate (as after
//!    a restart that dropped every client): N clients open a WebSocket at once
//!    (a task each, all spawned together; each holds one socket, so the bench
//!    process holds N client and N backend sockets, wsgate 2N). A client
//!    answered 503 or 429 comes back after its `Retry-After` plus a random
//!    jitter; any other failure (refused, reset, timed out) after
//!    [`FAILURE_PAUSE`] plus the jitter; at most `retries` times, and never
//!    past the storm's time bound. Every client holds its WebSocket until all
//!    have one (or gave up); then each echoes once and closes. The echo
//!    backends, two of the bench's own, note the moment of every 101 they
//!    answer, binned by 100 ms from the storm's start. Variants: `no_limit`
//!    (wsgate as the other scenarios run it) and `gate` (the listener's
//!    `handshake_rate = { rate, burst, max_wait }`), in alternating order.
//!    wsgate's admin `/metrics` is read every 100 ms for the depth of the
//!    gate's queue, and at the end for its refusals by reason.
//! 2. **The cost**: the `handshake` scenario's loops (connect, upgrade with an
//!    `Origin` header, one echo, close) against wsgate with no admission keys
//!    (`no_limits`) and with every one set so that none is ever hit
//!    (`limits`: the listener's gate at 1e6/s, per-client connection and
//!    tunnel limits of 1,000,000, a per-client handshake rate of 1e6/s, an
//!    Origin allow-list that holds the clients' Origin), alternating, each on
//!    a fresh process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::{Outcome, Scenario, new_hist};
use crate::backend::{self, Backend, UpgradeLog};
use crate::client::{self, ConnectError, Ws};
use crate::procstat::{self, Probe};
use crate::report::Record;
use crate::soak::gate::{Metrics, admin_get};
use crate::targets::{Admission, Gate, Spec, Target};

/// Width of a bin of the backends' accept times.
pub const BIN_MS: u64 = 100;
/// Pause after a failure that came with no `Retry-After` (connect refused,
/// reset, timeout), before the jitter.
pub const FAILURE_PAUSE: Duration = Duration::from_millis(250);
/// Longest one connect + upgrade may take beyond the gate's `max_wait`.
const ATTEMPT_SLACK: Duration = Duration::from_secs(10);
/// Longest the echo and the close of one client may take after the storm.
const STEP_LIMIT: Duration = Duration::from_secs(10);
/// The Origin the cost measurement's clients send, and `limits` allows.
pub const ORIGIN: &str = "http://bench.localhost";
/// The `handshake` scenario's loops.
const COST_LOOPS: usize = 20;
/// Per-client limits that no client of the bench reaches.
const NEVER: u32 = 1_000_000;

/// What the storm part is told to do.
#[derive(Clone, Debug)]
pub struct Plan {
    pub clients: usize,
    pub gate: Gate,
    /// Bound of one storm, from its start.
    pub timeout: Duration,
    /// Attempts after the first, at most, per client.
    pub retries: u32,
    /// Added to every pause before a retry: uniform in 0..=jitter.
    pub jitter: Duration,
    /// How long a client waits for its 101 before it hangs up and tries
    /// again; None: the gate's `max_wait` + [`ATTEMPT_SLACK`].
    pub attempt_timeout: Option<Duration>,
    /// Seconds per cost measurement.
    pub duration: Duration,
    /// Run the storm part.
    pub storm: bool,
    /// Run the cost part.
    pub cost: bool,
    pub runs: u32,
}

impl Plan {
    /// How long one connect + upgrade may take.
    pub fn attempt_limit(&self) -> Duration {
        self.attempt_timeout
            .unwrap_or(self.gate.max_wait + ATTEMPT_SLACK)
    }

    /// Rough seconds per run, for the tool's time estimate.
    pub fn seconds_per_run(&self) -> u64 {
        let gated = self.clients.saturating_sub(self.gate.burst as usize) as f64 / self.gate.rate;
        let storm = 2 * (gated.ceil() as u64 + 12);
        let cost = 2 * (self.duration.as_secs() + 2);
        u64::from(self.storm) * storm + u64::from(self.cost) * cost
    }
}

/// The storm's own figures, in the record beside the usual ones (`ops` is the
/// clients that got in, `duration_s` the time until the last did, the
/// latencies each client's time from the storm's start to its 101).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StormStats {
    pub clients: u64,
    pub connected: u64,
    /// Connect + upgrade attempts, all clients together.
    pub attempts: u64,
    pub refused_503: u64,
    pub refused_429: u64,
    /// Refusals with another status.
    pub refused_other: u64,
    /// Attempts that failed otherwise (connect refused or reset, timeout).
    pub failures: u64,
    /// Seconds a client waited for its 101 before hanging up.
    #[serde(default)]
    pub attempt_timeout_s: f64,
    pub first_failure: Option<String>,
    /// Clients whose echo or close failed after the storm.
    pub echo_failures: u64,
    /// The gate, for `gate`.
    pub gate_rate: Option<f64>,
    pub gate_burst: Option<u32>,
    pub gate_max_wait_s: Option<f64>,
    /// Seconds from the start until every client had its WebSocket; None when
    /// some never got one.
    pub all_connected_s: Option<f64>,
    /// 101s the backends answered during the storm.
    pub backend_accepts: u64,
    pub first_accept_s: Option<f64>,
    pub last_accept_s: Option<f64>,
    pub bin_ms: u64,
    /// Most 101s in any 1-second window (10 consecutive bins).
    pub peak_1s: u64,
    /// Most 101s in one bin.
    pub max_bin: u64,
    /// Median bin from the first accept's to the last's, empty ones included.
    pub p50_bin: u64,
    /// 101s per second from the first to the last.
    pub mean_rate: Option<f64>,
    /// Deepest `wsgate_admission_handshakes_queued` seen (read every 100 ms).
    pub max_queued: Option<i64>,
    /// `wsgate_admission_handshakes_queued` at each reading (every 100 ms
    /// from the start), -1 where a reading failed.
    #[serde(default)]
    pub queued: Vec<i64>,
    /// CPU seconds of the bench process itself (clients and backends) until
    /// every client was in.
    pub bench_cpu_s: Option<f64>,
    /// The kernel's counters over the storm (this network namespace, so any
    /// other loopback traffic too): accept queues that overflowed, SYNs
    /// dropped at a listener, SYNs sent again.
    pub listen_overflows: u64,
    pub listen_drops: u64,
    pub syn_retrans: u64,
    /// `wsgate_admission_rejections_total` by reason at the end.
    pub rejections: std::collections::BTreeMap<String, i64>,
    /// 101s per bin from the storm's start to the last accept.
    pub bins: Vec<u32>,
}

/// Bins of `offsets` (time since the start, sorted or not): the counts per
/// bin up to the last non-empty one, the most in one bin, the median bin from
/// the first non-empty to the last (empty ones included), and the most in any
/// `window` consecutive bins.
pub fn bin_stats(offsets: &[Duration], bin: Duration, window: usize) -> (Vec<u32>, u64, u64, u64) {
    let Some(last) = offsets.iter().max() else {
        return (Vec::new(), 0, 0, 0);
    };
    let idx = |d: &Duration| (d.as_nanos() / bin.as_nanos().max(1)) as usize;
    let mut bins = vec![0u32; idx(last) + 1];
    for d in offsets {
        bins[idx(d)] += 1;
    }
    let first = bins.iter().position(|&c| c > 0).unwrap_or(0);
    let max_bin = bins.iter().copied().max().unwrap_or(0) as u64;
    let mut active: Vec<u32> = bins[first..].to_vec();
    active.sort_unstable();
    let p50 = active.get(active.len() / 2).copied().unwrap_or(0) as u64;
    let window = window.max(1);
    let mut peak = 0u64;
    let mut sum = 0u64;
    for i in 0..bins.len() {
        sum += bins[i] as u64;
        if i >= window {
            sum -= bins[i - window] as u64;
        }
        peak = peak.max(sum);
    }
    (bins, max_bin, p50, peak)
}

/// How one client of the storm fared.
#[derive(Default)]
struct ClientEnd {
    ws: Option<Ws>,
    connected_after: Option<Duration>,
    attempts: u64,
    refused_503: u64,
    refused_429: u64,
    refused_other: u64,
    failures: u64,
    first_failure: Option<String>,
}

fn jitter(max: Duration) -> Duration {
    Duration::from_millis(fastrand::u64(0..=max.as_millis() as u64))
}

/// One client: connect and upgrade until it has a WebSocket, the attempts
/// are spent or the storm's time is up.
async fn storm_client(
    addr: SocketAddr,
    start: Instant,
    deadline: Instant,
    attempt_limit: Duration,
    retries: u32,
    max_jitter: Duration,
) -> ClientEnd {
    let cfg = client::ws_config(4096);
    let mut end = ClientEnd::default();
    loop {
        let now = Instant::now();
        if now >= deadline || end.attempts > u64::from(retries) {
            return end;
        }
        end.attempts += 1;
        let limit = attempt_limit.min(deadline - now);
        let pause =
            match client::ws_connect_origin(addr, client::next_source(), None, cfg, limit).await {
                Ok(ws) => {
                    end.connected_after = Some(start.elapsed());
                    end.ws = Some(ws);
                    return end;
                }
                Err(ConnectError::Refused {
                    status,
                    retry_after,
                }) => {
                    match status {
                        503 => end.refused_503 += 1,
                        429 => end.refused_429 += 1,
                        _ => {
                            end.refused_other += 1;
                            if end.first_failure.is_none() {
                                end.first_failure = Some(format!("upgrade answered {status}"));
                            }
                        }
                    }
                    retry_after.unwrap_or(Duration::from_secs(1))
                }
                Err(ConnectError::Failed(e)) => {
                    end.failures += 1;
                    if end.first_failure.is_none() {
                        end.first_failure = Some(e);
                    }
                    FAILURE_PAUSE
                }
            };
        let pause = pause + jitter(max_jitter);
        if Instant::now() + pause >= deadline {
            return end;
        }
        tokio::time::sleep(pause).await;
    }
}

/// Reads the gate's queue depth every [`BIN_MS`] until `stop` resolves;
/// each reading (-1 for a failed one).
async fn watch_queue(admin: SocketAddr, mut stop: tokio::sync::oneshot::Receiver<()>) -> Vec<i64> {
    let mut readings = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(BIN_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Bounded by the storm: its caller always sends `stop` (or drops it).
    loop {
        tokio::select! {
            _ = &mut stop => return readings,
            _ = tick.tick() => {}
        }
        let read = tokio::time::timeout(Duration::from_secs(2), admin_get(admin, "/metrics")).await;
        readings.push(match read {
            Ok(Ok(text)) => Metrics::parse(&text)
                .sum("wsgate_admission_handshakes_queued")
                .unwrap_or(-1),
            _ => -1,
        });
    }
}

/// The kernel counters a storm reports, in [`StormStats`]' order.
const TCP_COUNTERS: [&str; 3] = ["ListenOverflows", "ListenDrops", "TCPSynRetrans"];

/// One storm of `plan.clients` against `addr`; `log` is the backends' log of
/// 101s, `admin` wsgate's admin listener.
pub async fn storm(
    addr: SocketAddr,
    admin: Option<SocketAddr>,
    probe: Probe,
    log: &UpgradeLog,
    plan: &Plan,
    gate: Option<Gate>,
) -> Outcome {
    let _ = log.take();
    let attempt_limit = plan.attempt_limit();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let watcher = admin.map(|a| tokio::spawn(watch_queue(a, stop_rx)));
    let tcp0 = procstat::tcp_ext(&TCP_COUNTERS);
    let bench0 = procstat::self_cpu_seconds();
    let cpu0 = probe.cpu_s();
    let start = Instant::now();
    let deadline = start + plan.timeout;
    let tasks: Vec<JoinHandle<ClientEnd>> = (0..plan.clients)
        .map(|_| {
            tokio::spawn(storm_client(
                addr,
                start,
                deadline,
                attempt_limit,
                plan.retries,
                plan.jitter,
            ))
        })
        .collect();
    let mut stats = StormStats {
        clients: plan.clients as u64,
        bin_ms: BIN_MS,
        attempt_timeout_s: attempt_limit.as_secs_f64(),
        gate_rate: gate.map(|g| g.rate),
        gate_burst: gate.map(|g| g.burst),
        gate_max_wait_s: gate.map(|g| g.max_wait.as_secs_f64()),
        ..StormStats::default()
    };
    let mut hist = new_hist();
    let mut held: Vec<Ws> = Vec::with_capacity(plan.clients);
    // Every client ends by the deadline plus one attempt's limit.
    let join_limit = deadline + attempt_limit + Duration::from_secs(5);
    for t in tasks {
        let end = match tokio::time::timeout_at(join_limit.into(), t).await {
            Ok(Ok(end)) => end,
            Ok(Err(e)) => ClientEnd {
                first_failure: Some(format!("client task failed: {e}")),
                failures: 1,
                ..ClientEnd::default()
            },
            Err(_) => ClientEnd {
                first_failure: Some("client task did not end".into()),
                failures: 1,
                ..ClientEnd::default()
            },
        };
        stats.attempts += end.attempts;
        stats.refused_503 += end.refused_503;
        stats.refused_429 += end.refused_429;
        stats.refused_other += end.refused_other;
        stats.failures += end.failures;
        if stats.first_failure.is_none() {
            stats.first_failure = end.first_failure;
        }
        if let (Some(after), Some(ws)) = (end.connected_after, end.ws) {
            hist.saturating_record((after.as_micros() as u64).max(1));
            held.push(ws);
        }
    }
    let cpu1 = probe.cpu_s();
    stats.bench_cpu_s = Some(procstat::self_cpu_seconds() - bench0);
    let tcp1 = procstat::tcp_ext(&TCP_COUNTERS);
    let d = |i: usize| tcp1[i].saturating_sub(tcp0[i]);
    (
        stats.listen_overflows,
        stats.listen_drops,
        stats.syn_retrans,
    ) = (d(0), d(1), d(2));
    let _ = stop_tx.send(());
    if let Some(w) = watcher
        && let Ok(Ok(readings)) = tokio::time::timeout(Duration::from_secs(5), w).await
    {
        stats.max_queued = readings.iter().copied().filter(|&q| q >= 0).max();
        stats.queued = readings;
    }
    let accepts = log.take();
    stats.connected = held.len() as u64;
    let last_connect = (!hist.is_empty()).then(|| hist.max());
    if stats.connected == stats.clients {
        stats.all_connected_s = last_connect.map(|us| us as f64 / 1e6);
    }
    let offsets: Vec<Duration> = accepts
        .iter()
        .map(|t| t.saturating_duration_since(start))
        .collect();
    stats.backend_accepts = offsets.len() as u64;
    stats.first_accept_s = offsets.first().map(Duration::as_secs_f64);
    stats.last_accept_s = offsets.last().map(Duration::as_secs_f64);
    if let (Some(a), Some(b)) = (stats.first_accept_s, stats.last_accept_s)
        && b > a
    {
        stats.mean_rate = Some((offsets.len() - 1) as f64 / (b - a));
    }
    let window = (1000 / BIN_MS) as usize;
    let (bins, max_bin, p50_bin, peak) = bin_stats(&offsets, Duration::from_millis(BIN_MS), window);
    stats.bins = bins;
    stats.max_bin = max_bin;
    stats.p50_bin = p50_bin;
    stats.peak_1s = peak;
    if let Some(a) = admin
        && let Ok(Ok(text)) =
            tokio::time::timeout(Duration::from_secs(5), admin_get(a, "/metrics")).await
    {
        stats.rejections =
            Metrics::parse(&text).by_label("wsgate_admission_rejections_total", "reason");
    }

    // Every WebSocket must still echo; then all close.
    let payload = Bytes::from_static(&[0x5A; 64]);
    let closing: Vec<JoinHandle<Result<(), String>>> = held
        .into_iter()
        .map(|mut ws| {
            let payload = payload.clone();
            tokio::spawn(async move {
                client::echo_once(&mut ws, &payload, STEP_LIMIT).await?;
                client::close(ws, STEP_LIMIT).await
            })
        })
        .collect();
    for c in closing {
        let ok = matches!(
            tokio::time::timeout(STEP_LIMIT * 3, c).await,
            Ok(Ok(Ok(())))
        );
        if !ok {
            stats.echo_failures += 1;
        }
    }

    let mut out = Outcome {
        ops: stats.connected,
        duration_s: last_connect.map_or(plan.timeout.as_secs_f64(), |us| us as f64 / 1e6),
        errors: (stats.clients - stats.connected) + stats.echo_failures,
        connections: stats.clients,
        message_bytes: Some(64),
        proxy_cpu_s: cpu0.zip(cpu1).map(|(a, b)| b - a),
        variant: Some(if gate.is_some() { "gate" } else { "no_limit" }.into()),
        ..Outcome::default()
    };
    out.set_latency(&hist);
    if stats.connected < stats.clients {
        out.first_error = Some(format!(
            "{} of {} clients never connected (first failure: {})",
            stats.clients - stats.connected,
            stats.clients,
            stats.first_failure.as_deref().unwrap_or("none")
        ));
    } else if stats.echo_failures > 0 {
        out.first_error = Some(format!("{} echoes failed", stats.echo_failures));
    }
    out.storm = Some(stats);
    out
}

/// Admission keys that no bench client reaches, with the Origin allow-list
/// holding [`ORIGIN`].
pub fn limits_never_hit() -> Admission {
    Admission {
        gate: Some(Gate {
            rate: 1e6,
            burst: NEVER,
            max_wait: Duration::from_secs(5),
        }),
        max_connections_per_ip: Some(NEVER),
        max_tunnels_per_ip: Some(NEVER),
        rate_per_ip: Some((1e6, NEVER)),
        allowed_origins: vec![ORIGIN.into()],
        admin: None,
    }
}

/// Sockets the backends may keep after a storm: wsgate's pooled keep-alive
/// connections of its readiness checks (`GET /`).
const KEPT_ALIVE: usize = 2;

/// Waits (bounded) until the backends hold no socket but wsgate's keep-alive
/// connections.
async fn drained(backends: &[Backend], wait: Duration) {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if backends.iter().map(|b| b.live()).sum::<usize>() <= KEPT_ALIVE {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let live: usize = backends.iter().map(|b| b.live()).sum();
    eprintln!("    note: storm backends still hold {live} sockets after {wait:?}");
}

/// A tokio runtime with one worker thread of its own, for the storm's (and
/// `drain`'s) backends; shut down in the background when dropped (it may be
/// dropped inside the tool's runtime).
pub(super) struct BackendRuntime {
    rt: Option<tokio::runtime::Runtime>,
}

impl BackendRuntime {
    pub(super) fn start() -> Result<BackendRuntime, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("storm-backends")
            .enable_all()
            .build()
            .map_err(|e| format!("storm backends' runtime: {e}"))?;
        Ok(BackendRuntime { rt: Some(rt) })
    }

    /// A logging echo backend started on this runtime (its accept loop and
    /// connections run there).
    async fn backend(&self, log: Arc<UpgradeLog>) -> Result<Backend, String> {
        let rt = self.rt.as_ref().ok_or("storm backends' runtime is gone")?;
        rt.spawn(backend::start_logged(log))
            .await
            .map_err(|e| format!("storm backend: {e}"))?
            .map_err(|e| format!("storm backend: {e}"))
    }

    /// A backend started with `opts` on this runtime.
    pub(super) async fn backend_with(&self, opts: backend::Options) -> Result<Backend, String> {
        let rt = self.rt.as_ref().ok_or("backends' runtime is gone")?;
        rt.spawn(backend::start_with(opts))
            .await
            .map_err(|e| format!("backend: {e}"))?
            .map_err(|e| format!("backend: {e}"))
    }
}

impl Drop for BackendRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A port free on 127.0.0.1 now (for wsgate's admin listener).
pub(super) fn free_port() -> Result<SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))
}

fn storm_line(run: u32, runs: u32, r: &Record) -> String {
    let s = r.storm.clone().unwrap_or_default();
    format!(
        "[storm {run}/{runs}] {:<8} {}/{} in {}  p50 {:.0}ms p99 {:.0}ms  backend peak {}/s (max bin {}, p50 bin {} per {} ms)  503s {} 429s {} failures {}  queue max {}  cpu {} (bench {})  listen overflows {} SYN retrans {}  errors {}{}",
        r.variant.as_deref().unwrap_or("-"),
        s.connected,
        s.clients,
        s.all_connected_s
            .map_or("never (all)".into(), |v| format!("{v:.2}s")),
        r.p50_us.unwrap_or(0) as f64 / 1000.0,
        r.p99_us.unwrap_or(0) as f64 / 1000.0,
        s.peak_1s,
        s.max_bin,
        s.p50_bin,
        s.bin_ms,
        s.refused_503,
        s.refused_429,
        s.failures,
        s.max_queued.map_or("–".into(), |q| q.to_string()),
        r.proxy_cpu_s.map_or("–".into(), |c| format!("{c:.2}s")),
        s.bench_cpu_s.map_or("–".into(), |c| format!("{c:.2}s")),
        s.listen_overflows,
        s.syn_retrans,
        r.errors,
        r.first_error
            .as_ref()
            .map_or(String::new(), |e| format!(" (first: {e})")),
    )
}

fn cost_line(run: u32, runs: u32, r: &Record) -> String {
    format!(
        "[storm_cost {run}/{runs}] {:<9} {:>8.0} handshakes/s  p99 {:.2}ms  cpu {}  ({}/cpu-s)  errors {}{}",
        r.variant.as_deref().unwrap_or("-"),
        r.ops_per_s,
        r.p99_us.unwrap_or(0) as f64 / 1000.0,
        r.proxy_cpu_s.map_or("–".into(), |c| format!("{c:.2}s")),
        r.ops_per_cpu_s.map_or("–".into(), |o| format!("{o:.0}")),
        r.errors,
        r.first_error
            .as_ref()
            .map_or(String::new(), |e| format!(" (first: {e})")),
    )
}

/// Starts wsgate from `spec`; a record of the failure when it will not.
async fn start(spec: Spec, scenario: &str, run: u32, variant: &str) -> Result<Target, Record> {
    Target::start(spec).await.map_err(|e| {
        let mut o = Outcome {
            variant: Some(variant.into()),
            ..Outcome::default()
        };
        o.note_error(format!("wsgate did not start: {e}"));
        Record::new("wsgate", scenario, run, 0, o)
    })
}

/// Both parts, `plan.runs` times, variants alternating; every record is
/// handed to `emit` as soon as it is made. `base` is wsgate's spec as the
/// other scenarios run it (its backends are used for the cost part; the storm
/// has two backends of its own that log their 101s).
pub async fn run_all(
    base: &Spec,
    plan: &Plan,
    emit: &mut dyn FnMut(Record) -> Result<(), String>,
) -> Result<(), String> {
    // The storm's backends run on a runtime of their own, one thread, so that
    // the clients' work (thousands of connects at once, on the tool's main
    // runtime) does not hold up their 101s and the moments they note. Dropped
    // last (declared first), after the backends.
    let rt = BackendRuntime::start()?;
    let log = Arc::new(UpgradeLog::default());
    let b1 = rt.backend(log.clone()).await?;
    let b2 = rt.backend(log.clone()).await?;
    eprintln!(
        "storm: logging echo backends on {} and {} (a runtime of their own)",
        b1.addr, b2.addr
    );
    let storm_backends = [b1.addr, b2.addr];
    let backends = [b1, b2];
    let base = Spec {
        dir: base.dir.join("storm"),
        tls: None,
        h2: false,
        tls_backends: None,
        admission: None,
        ..base.clone()
    };
    let threads = base.threads;
    let g = plan.gate;
    eprintln!(
        "storm: {} clients; gate rate {}/s, burst {}, max_wait {:?}; storm bound {:?}, {} retries, jitter up to {:?}, a client hangs up after {:?}",
        plan.clients,
        g.rate,
        g.burst,
        g.max_wait,
        plan.timeout,
        plan.retries,
        plan.jitter,
        plan.attempt_limit()
    );
    for run in 1..=plan.runs {
        // The storm, both ways, alternating which goes first.
        let order = match (plan.storm, run % 2 == 1) {
            (false, _) => vec![],
            (true, true) => vec![None, Some(g)],
            (true, false) => vec![Some(g), None],
        };
        for gate in order {
            let variant = if gate.is_some() { "gate" } else { "no_limit" };
            let admin = free_port()?;
            let spec = Spec {
                backends: storm_backends,
                admission: Some(Admission {
                    gate,
                    admin: Some(admin),
                    ..Admission::default()
                }),
                ..base.clone()
            };
            eprintln!("[storm {run}/{}] {variant} ...", plan.runs);
            let mut target = match start(spec, Scenario::Storm.name(), run, variant).await {
                Ok(t) => t,
                Err(r) => {
                    eprintln!("[storm {run}/{}] {variant}: {:?}", plan.runs, r.first_error);
                    emit(r)?;
                    continue;
                }
            };
            let o = storm(target.addr, Some(admin), target.probe(), &log, plan, gate).await;
            let mut r = Record::new("wsgate", Scenario::Storm.name(), run, threads, o);
            if let Some(why) = target.check_alive() {
                r.errors += 1;
                r.note = Some(format!("wsgate exited during the storm: {why}"));
            }
            eprintln!("{}", storm_line(run, plan.runs, &r));
            emit(r)?;
            drained(&backends, Duration::from_secs(30)).await;
            target.stop();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // The cost of admission control per handshake, both ways.
        let order = match (plan.cost, run % 2 == 1) {
            (false, _) => vec![],
            (true, true) => vec![false, true],
            (true, false) => vec![true, false],
        };
        for limits in order {
            let variant = if limits { "limits" } else { "no_limits" };
            let spec = Spec {
                admission: limits.then(limits_never_hit),
                ..base.clone()
            };
            eprintln!("[storm_cost {run}/{}] {variant} ...", plan.runs);
            let mut target = match start(spec, "storm_cost", run, variant).await {
                Ok(t) => t,
                Err(r) => {
                    emit(r)?;
                    continue;
                }
            };
            let mut o = super::handshake::run_with(
                target.addr,
                COST_LOOPS,
                plan.duration,
                target.probe(),
                Some(ORIGIN),
            )
            .await;
            o.variant = Some(variant.into());
            let mut r = Record::new("wsgate", "storm_cost", run, threads, o);
            if let Some(why) = target.check_alive() {
                r.errors += 1;
                r.note = Some(format!("wsgate exited during the run: {why}"));
            }
            eprintln!("{}", cost_line(run, plan.runs, &r));
            emit(r)?;
            target.stop();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn bins_count_peak_and_median() {
        assert_eq!(bin_stats(&[], ms(100), 10), (Vec::new(), 0, 0, 0));
        // Nothing in the first 200 ms, then 3, 1, 0, 2 per 100 ms.
        let offs = [ms(210), ms(250), ms(299), ms(300), ms(500), ms(599)];
        let (bins, max, p50, peak) = bin_stats(&offs, ms(100), 2);
        assert_eq!(bins, vec![0, 0, 3, 1, 0, 2]);
        assert_eq!(max, 3);
        // Bins from the first accept's on: 3 1 0 2 → sorted 0 1 2 3 → index 2.
        assert_eq!(p50, 2);
        // Best 2 consecutive bins: 3 + 1.
        assert_eq!(peak, 4);
        // A window longer than the storm holds every accept.
        assert_eq!(bin_stats(&offs, ms(100), 10).3, 6);
    }

    #[test]
    fn a_steady_rate_shows_in_every_statistic() {
        // 1000 per second for 3 s after a burst of 200 at once.
        let mut offs: Vec<Duration> = vec![ms(0); 200];
        offs.extend((0..3000).map(|i| Duration::from_micros(1000 * i + 500)));
        let (bins, max, p50, peak) = bin_stats(&offs, ms(100), 10);
        assert_eq!(bins.len(), 30);
        assert_eq!(max, 300);
        assert_eq!(p50, 100);
        assert_eq!(peak, 1200);
    }

    #[test]
    fn never_hit_limits_are_high() {
        let a = limits_never_hit();
        let g = a.gate.unwrap();
        assert!(g.rate >= 1e6 && g.burst >= 1_000_000);
        assert_eq!(a.allowed_origins, vec![ORIGIN.to_string()]);
        assert!(a.admin.is_none());
    }

    #[test]
    fn the_estimate_counts_the_gated_storm() {
        let plan = Plan {
            clients: 5000,
            gate: Gate {
                rate: 1000.0,
                burst: 200,
                max_wait: Duration::from_secs(5),
            },
            timeout: Duration::from_secs(120),
            retries: 20,
            jitter: ms(250),
            attempt_timeout: None,
            duration: Duration::from_secs(10),
            storm: true,
            cost: true,
            runs: 2,
        };
        assert_eq!(plan.seconds_per_run(), 2 * (5 + 12) + 2 * 12);
        let cost_only = Plan {
            storm: false,
            ..plan.clone()
        };
        assert_eq!(cost_only.seconds_per_run(), 2 * 12);
    }
}
