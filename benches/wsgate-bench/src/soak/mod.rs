//! `wsgate-bench soak`: a leak-and-fault soak of wsgate alone (README.md
//! beside Cargo.toml, "Soak").
//!
//! In-process echo backends that greet each WebSocket with `backend=<i>` and
//! can be killed and restarted on their port; wsgate as a child process in
//! front of them (least_conn); then three phases:
//!
//! 1. warm-up: the tunnels open, carry traffic for a while, short handshakes
//!    and reloads run, everything closes; once wsgate is quiet its open fds,
//!    connection/tunnel gauges, lent read buffers and RSS are the baseline;
//! 2. load: the tunnels stay open with numbered messages checked end to end,
//!    while backends are killed and restarted, clients vanish (reset or FIN),
//!    the config is reloaded and short handshakes come and go;
//! 3. drain: every client closes; wsgate must come back to the baseline.
//!
//! Every check is printed PASS/FAIL, one JSON line goes to the results file,
//! and the exit code is 1 when a check failed (2 when the soak could not run).

mod chaos;
/// Also used by `storm` (the admin endpoints).
pub(crate) mod gate;
mod handshake;
mod state;
mod tunnel;
mod wire;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout_at};

use self::chaos::Backends;
use self::gate::{Gate, GateConfig, Snapshot};
use self::state::{Counts, F_CONNECT, F_DRAIN, F_END, F_HS, F_KILL, F_SETUP, Shared};
use self::tunnel::TunnelPlan;
use crate::procstat;

#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// Long-lived tunnels kept open (warm-up and load phase).
    #[arg(long, default_value_t = 2000)]
    tunnels: u32,
    /// Seconds of the load phase.
    #[arg(long, default_value_t = 300)]
    duration: u64,
    /// Short handshakes spread evenly over the load phase.
    #[arg(long, default_value_t = 50_000)]
    handshakes: u64,
    /// Short handshakes in flight at most.
    #[arg(long, default_value_t = 16)]
    handshake_concurrency: usize,
    /// Echo backends behind wsgate (one is killed at a time).
    #[arg(long, default_value_t = 3)]
    backends: usize,
    /// Seconds between backend kills; 0 = none.
    #[arg(long, default_value_t = 30)]
    kill_every: u64,
    /// Seconds a killed backend stays down.
    #[arg(long, default_value_t = 5)]
    restart_after: u64,
    /// Seconds between vanish rounds; 0 = none.
    #[arg(long, default_value_t = 5)]
    vanish_every: u64,
    /// Percent of the tunnels that vanish with a TCP reset in each round (as
    /// many again vanish with a plain FIN).
    #[arg(long, default_value_t = 1.0)]
    vanish_percent: f64,
    /// Seconds between SIGHUP reloads; 0 = none.
    #[arg(long, default_value_t = 3)]
    reload_every: u64,
    /// Milliseconds between two messages of one tunnel.
    #[arg(long, default_value_t = 1000)]
    msg_interval_ms: u64,
    /// Seconds of traffic in the warm-up (tunnels, handshakes at the load
    /// rate and reloads; no kills, no vanishing).
    #[arg(long, default_value_t = 15)]
    warmup: u64,
    /// Tunnels opened per second when a phase starts.
    #[arg(long, default_value_t = 500)]
    ramp_rate: u32,
    /// wsgate's `fail_timeout` in seconds: how long a killed backend stays ejected.
    #[arg(long, default_value_t = 2)]
    fail_timeout: u64,
    /// Seconds to wait after the drain for wsgate's counts to return to the baseline.
    #[arg(long, default_value_t = 30)]
    drain_wait: u64,
    /// Seconds RSS is given to settle before it is read, for the baseline and at the end alike.
    #[arg(long, default_value_t = 12)]
    rss_settle: u64,
    /// Allowed RSS growth at the end over the post-warm-up baseline, in percent.
    #[arg(long, default_value_t = 10.0)]
    rss_tolerance: f64,
    /// wsgate worker threads (`--threads` and `workers`).
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// wsgate binary; when absent the tool runs `cargo build --release --bin wsgate`
    /// and uses target/release/wsgate.
    #[arg(long)]
    wsgate: Option<PathBuf>,
    /// Do not build wsgate; use target/release/wsgate as it is.
    #[arg(long)]
    no_build: bool,
    /// Log filter (RUST_LOG) for wsgate.
    #[arg(long, default_value = "info,wsgate::access=off")]
    wsgate_log: String,
    /// Results file, appended to [default: results/soak-<UTC timestamp>.jsonl in the repository].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep the generated config and wsgate's log.
    #[arg(long)]
    keep_tmp: bool,
    /// Tokio worker threads for the clients and echo backends.
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
}

/// Longest the killer may run past the phase (it plans to end before it).
const CHAOS_FINISH_LIMIT: Duration = Duration::from_secs(30);
/// Longest the tunnels may take to drain: the echo wait, the Close answer and
/// the TCP end (5 + 5 + 3 s) or a doomed tunnel's 10 s, with a margin.
const TUNNEL_FINISH_LIMIT: Duration = Duration::from_secs(60);
const HANDSHAKE_FINISH_LIMIT: Duration = Duration::from_secs(45);
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
const QUIET_LIMIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(500);

/// What one phase asks for.
struct PhasePlan {
    name: &'static str,
    duration: Duration,
    handshakes: u64,
    kills: u64,
    vanish_every: Duration,
}

/// What one phase did.
#[derive(Debug, Default, Serialize)]
struct PhaseResult {
    name: &'static str,
    seconds: f64,
    counts: Counts,
    failures: BTreeMap<String, u64>,
    samples: Vec<String>,
    handshakes_target: u64,
    kills_planned: u64,
    wsgate_cpu_s: Option<f64>,
    reloads_ok: Option<i64>,
    reloads_error: Option<i64>,
    closes_by_reason: BTreeMap<String, i64>,
    peak_fds: Option<u64>,
    peak_rss_bytes: Option<u64>,
    /// Open tunnels at the progress samples after the ramp.
    open_min: Option<i64>,
    open_mean: Option<f64>,
    wsgate_exit: Option<String>,
}

impl PhaseResult {
    fn failures_of(&self, kind: &str) -> u64 {
        let prefix = format!("{kind}: ");
        self.failures
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, n)| n)
            .sum()
    }
}

#[derive(Debug, Serialize)]
struct Check {
    name: &'static str,
    pass: bool,
    detail: String,
}

/// The JSON line appended to the results file.
#[derive(Debug, Serialize)]
struct SoakRecord {
    scenario: &'static str,
    target: &'static str,
    unix_time: u64,
    loadavg_1m: Option<f64>,
    threads: u32,
    tunnels: u32,
    backends: usize,
    duration_s: u64,
    warmup: PhaseResult,
    load: PhaseResult,
    baseline: Snapshot,
    #[serde(rename = "final")]
    final_: Snapshot,
    drain_back_s: Option<f64>,
    rss_ratio: Option<f64>,
    wsgate_cpu_s_total: Option<f64>,
    wsgate_exit: Option<String>,
    wsgate_panics: Vec<String>,
    checks: Vec<Check>,
    pass: bool,
}

pub async fn run(args: SoakArgs) -> Result<i32, String> {
    validate(&args)?;
    let (soft, hard) = procstat::raise_nofile();
    // This process holds the client and the backend side of every tunnel and
    // of every handshake in flight.
    let need = 2 * (u64::from(args.tunnels) + 2 * args.handshake_concurrency as u64) + 1000;
    if need > soft {
        return Err(format!(
            "{} tunnels need about {need} descriptors here; RLIMIT_NOFILE is {soft} (hard {hard})",
            args.tunnels
        ));
    }
    let root = crate::workspace_root();
    let out_path = args.out.clone().unwrap_or_else(|| {
        root.join("results")
            .join(format!("soak-{}.jsonl", crate::utc_stamp()))
    });
    let tmp = crate::TempDir {
        path: std::env::temp_dir().join(format!(
            "wsgate-soak-{}-{}",
            std::process::id(),
            crate::utc_stamp()
        )),
        keep: args.keep_tmp,
    };
    std::fs::create_dir_all(&tmp.path).map_err(|e| format!("{}: {e}", tmp.path.display()))?;
    let bin = crate::wsgate_binary(args.wsgate.as_deref(), args.no_build, &root).await?;

    let ports = fixed_ports(args.backends + 2)?;
    let backends = Arc::new(Backends::start(&ports[..args.backends]).await?);
    let loopback = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
    let cfg = GateConfig {
        threads: args.threads,
        listen: loopback(ports[args.backends]),
        admin: loopback(ports[args.backends + 1]),
        backends: backends.addrs(),
        fail_timeout_s: args.fail_timeout,
    };
    let mut gate = Gate::start(&bin, cfg, &tmp.path, &args.wsgate_log).await?;
    let cpu_start = gate.cpu_s();
    let ports_text: Vec<String> = ports[..args.backends]
        .iter()
        .map(|p| p.to_string())
        .collect();
    eprintln!(
        "wsgate {} (pid {}, {} threads) on {}, admin {}; backends on ports {}",
        bin.display(),
        gate.pid,
        args.threads,
        gate.cfg.listen,
        gate.cfg.admin,
        ports_text.join(", ")
    );

    // 1. Warm-up: the same tunnels and handshake rate, no faults.
    let warm_hs = args.handshakes * args.warmup / args.duration.max(1);
    let warm_plan = PhasePlan {
        name: "warm-up",
        duration: Duration::from_secs(args.warmup),
        handshakes: warm_hs,
        kills: 0,
        vanish_every: Duration::ZERO,
    };
    eprintln!(
        "warm-up: {} tunnels, {warm_hs} handshakes, {} s",
        args.tunnels, args.warmup
    );
    let warmup = run_phase(&args, &warm_plan, &mut gate, &backends).await;
    eprintln!("{}", phase_line(&warmup));
    let (quiet, quiet_ok) = wait_counts(&gate, QUIET_LIMIT, |s| {
        s.connections_active == Some(0)
            && s.tunnels_active == Some(0)
            && s.read_buffers_in_use == Some(0)
    })
    .await;
    if !quiet_ok {
        eprintln!(
            "note: wsgate not quiet {} s after the warm-up: {quiet:?}",
            QUIET_LIMIT.as_secs()
        );
    }
    let baseline = settle(&gate, args.rss_settle).await;
    eprintln!("baseline (post-warm-up): {}", snapshot_line(&baseline));

    // 2. Load.
    let duration = Duration::from_secs(args.duration);
    let kills = chaos::planned_kills(
        duration,
        Duration::from_secs(args.kill_every),
        Duration::from_secs(args.restart_after),
    );
    let load_plan = PhasePlan {
        name: "load",
        duration,
        handshakes: args.handshakes,
        kills,
        vanish_every: Duration::from_secs(args.vanish_every),
    };
    eprintln!(
        "load: {} tunnels, {} handshakes, {kills} backend kills, {} s",
        args.tunnels, args.handshakes, args.duration
    );
    let load = run_phase(&args, &load_plan, &mut gate, &backends).await;
    eprintln!("{}", phase_line(&load));

    // 3. Drain: back to the baseline counts, then RSS after the same settling.
    let started = Instant::now();
    let (_, back) = wait_counts(&gate, Duration::from_secs(args.drain_wait), |s| {
        at_or_below(s, &baseline)
    })
    .await;
    let drain_back_s = back.then(|| started.elapsed().as_secs_f64());
    let final_ = settle(&gate, args.rss_settle).await;
    eprintln!("after the drain: {}", snapshot_line(&final_));
    let wsgate_exit = gate.check_alive();
    let panics = gate.panics_in_log();
    let cpu_total = wsgate_exit.is_none().then(|| gate.cpu_s() - cpu_start);
    if let Some(e) = &wsgate_exit {
        eprintln!("wsgate is not running: {e}");
    }

    let checks = checks(
        &args,
        &warmup,
        &load,
        &baseline,
        &final_,
        &wsgate_exit,
        &panics,
    );
    let pass = checks.iter().all(|c| c.pass);
    let record = SoakRecord {
        scenario: "soak",
        target: "wsgate",
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        loadavg_1m: std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok())),
        threads: args.threads,
        tunnels: args.tunnels,
        backends: args.backends,
        duration_s: args.duration,
        rss_ratio: ratio(final_.rss_bytes, baseline.rss_bytes),
        warmup,
        load,
        baseline,
        final_,
        drain_back_s,
        wsgate_cpu_s_total: cpu_total,
        wsgate_exit,
        wsgate_panics: panics,
        checks,
        pass,
    };
    println!("{}", report(&args, &record));
    append_record(&out_path, &record)?;
    println!("record appended to {}", out_path.display());
    if !pass {
        eprintln!("end of wsgate's log: {}", gate.log_tail());
    }
    Ok(if pass { 0 } else { 1 })
}

fn validate(a: &SoakArgs) -> Result<(), String> {
    let bad = |what: &str| Err(format!("soak: {what}"));
    if a.tunnels == 0 {
        return bad("--tunnels must be at least 1");
    }
    if !(2..=16).contains(&a.backends) {
        return bad("--backends must be 2..=16 (one is killed at a time)");
    }
    if a.duration < 10 {
        return bad("--duration must be at least 10 s");
    }
    if a.msg_interval_ms < 10 {
        return bad("--msg-interval-ms must be at least 10");
    }
    if !(0.0..=25.0).contains(&a.vanish_percent) {
        return bad("--vanish-percent must be 0..=25");
    }
    if a.threads == 0 || a.ramp_rate == 0 || a.handshake_concurrency == 0 {
        return bad("--threads, --ramp-rate and --handshake-concurrency must be at least 1");
    }
    if a.kill_every > 0 && a.restart_after >= a.kill_every {
        return bad("--restart-after must be shorter than --kill-every");
    }
    Ok(())
}

/// `n` free loopback ports below the kernel's ephemeral range, so that no
/// outgoing connection (wsgate's own to the other backends among them) can
/// take a killed backend's port before it is restarted.
fn fixed_ports(n: usize) -> Result<Vec<u16>, String> {
    let lo: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768);
    let floor = lo.saturating_sub(10_000).max(1024);
    if lo <= floor {
        return Err(format!(
            "no room below the ephemeral port range (starts at {lo})"
        ));
    }
    let start = floor + fastrand::u16(..lo - floor);
    let mut out = Vec::with_capacity(n);
    // Bounded: one pass over at most 10,000 ports.
    for p in (start..lo).chain(floor..start) {
        if out.len() == n {
            break;
        }
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            out.push(p);
        }
    }
    if out.len() < n {
        return Err(format!("only {} free ports in {floor}..{lo}", out.len()));
    }
    Ok(out)
}

/// Runs one phase: tunnels, handshakes and the planned faults for
/// `plan.duration`, progress every 10 s, then the drain of every task.
async fn run_phase(
    args: &SoakArgs,
    plan: &PhasePlan,
    gate: &mut Gate,
    backends: &Arc<Backends>,
) -> PhaseResult {
    let grace = Duration::from_secs(args.fail_timeout + 2);
    let shared = Arc::new(Shared::new(backends.len(), grace));
    let t0 = shared.t0;
    let deadline = t0 + plan.duration;
    let before = gate.metrics().await.ok();
    let cpu0 = gate.cpu_s();

    let tplan = Arc::new(TunnelPlan {
        addr: gate.cfg.listen,
        interval: Duration::from_millis(args.msg_interval_ms),
        vanish_per_10k: (args.vanish_percent * 100.0).round() as u64,
    });
    let mut tunnels = JoinSet::new();
    for id in 0..args.tunnels {
        let delay = Duration::from_secs_f64(f64::from(id) / f64::from(args.ramp_rate));
        tunnels.spawn(tunnel::run(id, delay, tplan.clone(), shared.clone()));
    }
    let hs_task = tokio::spawn(handshake::run(
        gate.cfg.listen,
        plan.handshakes,
        args.handshake_concurrency,
        deadline,
        shared.clone(),
    ));
    let killer = tokio::spawn(chaos::killer(
        backends.clone(),
        shared.clone(),
        Duration::from_secs(args.kill_every),
        Duration::from_secs(args.restart_after),
        plan.kills,
    ));
    let vanisher = tokio::spawn(chaos::vanisher(shared.clone(), plan.vanish_every, deadline));
    let reloader = tokio::spawn(chaos::reloader(
        gate.reloader(),
        shared.clone(),
        Duration::from_secs(args.reload_every),
        deadline,
    ));

    let st = &shared.stats;
    let ramp_done = t0
        + Duration::from_secs_f64(f64::from(args.tunnels) / f64::from(args.ramp_rate))
        + Duration::from_secs(5);
    let mut result = PhaseResult {
        name: plan.name,
        handshakes_target: plan.handshakes,
        kills_planned: plan.kills,
        ..Default::default()
    };
    let mut open_samples: Vec<i64> = Vec::new();
    // Offset from the kill schedule (whole multiples of seconds from t0), so
    // that samples of open tunnels do not all land on the instant of a kill.
    let mut next_progress = t0 + PROGRESS_EVERY - Duration::from_secs(3);
    // Bounded by the deadline (or wsgate's death).
    while Instant::now() < deadline {
        tokio::time::sleep_until(next_progress.min(deadline)).await;
        if let Some(dead) = gate.check_alive() {
            eprintln!("  wsgate exited during the {}: {dead}", plan.name);
            result.wsgate_exit = Some(dead);
            break;
        }
        if Instant::now() < next_progress {
            continue;
        }
        next_progress += PROGRESS_EVERY;
        let snap = gate.snapshot().await;
        result.peak_fds = result.peak_fds.max(snap.fds);
        result.peak_rss_bytes = result.peak_rss_bytes.max(snap.rss_bytes);
        let open = st.open.load(Ordering::Relaxed);
        if Instant::now() >= ramp_done {
            open_samples.push(open);
        }
        let c = st.counts();
        eprintln!(
            "  [{:>5.1}s] open {open}  msgs {}/{}  1014 {}/{}  vanished {}+{}  reloads {}  \
             handshakes {}/{}  failures {}  | wsgate {}",
            shared.at(),
            c.msgs_echoed,
            c.msgs_sent,
            c.received_1014,
            c.expected_1014,
            c.vanished_rst,
            c.vanished_fin,
            c.reloads_sent,
            c.hs_ok,
            c.hs_attempted,
            st.failures().values().sum::<u64>()
                + c.lost_on_surviving
                + c.duplicated
                + c.reordered
                + c.corrupt,
            snapshot_line(&snap),
        );
    }

    // Drain: the tunnels close, the faults stop, every backend is up again.
    shared.chaos.send_modify(|c| c.draining = true);
    let chaos_end = Instant::now() + CHAOS_FINISH_LIMIT;
    for task in [killer, vanisher, reloader] {
        let abort = task.abort_handle();
        if timeout_at(chaos_end, task).await.is_err() {
            abort.abort();
        }
    }
    for i in backends.down() {
        if let Err(e) = backends.restart(i, &shared).await {
            st.fail(F_SETUP, "a backend could not be restarted", || e);
        }
    }
    let tunnels_end = Instant::now() + TUNNEL_FINISH_LIMIT;
    // Bounded: one turn per task, under the deadline.
    while !tunnels.is_empty() {
        match timeout_at(tunnels_end, tunnels.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                let left = tunnels.len();
                st.fail(F_SETUP, "tunnel tasks did not finish the drain", || {
                    format!("{left} still running after {TUNNEL_FINISH_LIMIT:?}")
                });
                tunnels.abort_all();
                break;
            }
        }
    }
    let abort = hs_task.abort_handle();
    if timeout_at(deadline + HANDSHAKE_FINISH_LIMIT, hs_task)
        .await
        .is_err()
    {
        abort.abort();
        st.fail(F_SETUP, "handshake tasks did not finish", || {
            format!("{HANDSHAKE_FINISH_LIMIT:?} after the phase")
        });
    }

    result.seconds = t0.elapsed().as_secs_f64();
    result.counts = st.counts();
    result.failures = st.failures();
    result.samples = st.samples();
    if result.wsgate_exit.is_none() {
        result.wsgate_exit = gate.check_alive();
    }
    if result.wsgate_exit.is_none() {
        result.wsgate_cpu_s = Some(gate.cpu_s() - cpu0);
    }
    if let (Some(b), Ok(a)) = (before, gate.metrics().await) {
        let delta = |name: &str, label: &str| {
            let b = b.by_label(name, label);
            let mut a = a.by_label(name, label);
            for (k, v) in a.iter_mut() {
                *v -= b.get(k).copied().unwrap_or(0);
            }
            a.retain(|_, v| *v != 0);
            a
        };
        let reloads = delta("wsgate_config_reloads_total", "result");
        result.reloads_ok = Some(reloads.get("ok").copied().unwrap_or(0));
        result.reloads_error = Some(reloads.get("error").copied().unwrap_or(0));
        result.closes_by_reason = delta("wsgate_ws_closes_total", "reason");
    }
    if !open_samples.is_empty() {
        result.open_min = open_samples.iter().min().copied();
        result.open_mean =
            Some(open_samples.iter().sum::<i64>() as f64 / open_samples.len() as f64);
    }
    result
}

/// Polls wsgate until `done` holds for its snapshot (and its fd count is the
/// same three polls running), or `limit` passes; the last snapshot, and
/// whether it got there.
async fn wait_counts(
    gate: &Gate,
    limit: Duration,
    done: impl Fn(&Snapshot) -> bool,
) -> (Snapshot, bool) {
    let deadline = Instant::now() + limit;
    let mut same_fds = 0;
    let mut last = gate.snapshot().await;
    // Bounded by the deadline.
    loop {
        if done(&last) && same_fds >= 2 {
            return (last, true);
        }
        if Instant::now() >= deadline {
            return (last, false);
        }
        tokio::time::sleep(POLL).await;
        let s = gate.snapshot().await;
        same_fds = if s.fds.is_some() && s.fds == last.fds {
            same_fds + 1
        } else {
            0
        };
        last = s;
    }
}

/// A snapshot taken after `secs` seconds of light admin polling, which gives
/// wsgate's allocator the activity it needs to hand back freed memory; with
/// the descriptors listed by kind.
async fn settle(gate: &Gate, secs: u64) -> Snapshot {
    // Bounded: `secs` polls.
    for _ in 0..secs {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = gate.snapshot().await;
    }
    let kinds = gate.fd_kinds();
    let mut s = gate.snapshot().await;
    s.fd_kinds = kinds;
    s
}

/// Every count present and at or below the baseline's.
fn at_or_below(s: &Snapshot, base: &Snapshot) -> bool {
    s.counts()
        .iter()
        .zip(base.counts().iter())
        .all(|((_, v), (_, b))| matches!((v, b), (Some(v), Some(b)) if v <= b))
}

fn ratio(a: Option<u64>, b: Option<u64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0 => Some(a as f64 / b as f64),
        _ => None,
    }
}

fn checks(
    args: &SoakArgs,
    warmup: &PhaseResult,
    load: &PhaseResult,
    baseline: &Snapshot,
    final_: &Snapshot,
    wsgate_exit: &Option<String>,
    panics: &[String],
) -> Vec<Check> {
    let mut out = Vec::new();
    let mut check = |name: &'static str, pass: bool, detail: String| {
        out.push(Check { name, pass, detail });
    };
    let c = &load.counts;

    let exit = wsgate_exit
        .clone()
        .or_else(|| warmup.wsgate_exit.clone())
        .or_else(|| load.wsgate_exit.clone());
    check(
        "wsgate stayed up, no panic in its log",
        exit.is_none() && panics.is_empty(),
        match (&exit, panics.first()) {
            (Some(e), _) => e.clone(),
            (None, Some(p)) => format!("{} panic line(s), first: {p}", panics.len()),
            (None, None) => "running".into(),
        },
    );

    let w = &warmup.counts;
    let warm_bad = warmup.failures.values().sum::<u64>()
        + w.lost_on_surviving
        + w.duplicated
        + w.reordered
        + w.corrupt;
    check(
        "warm-up without a failure",
        warm_bad == 0 && w.msgs_echoed > 0,
        format!(
            "{} messages echoed, {} handshakes ok, {warm_bad} failure(s)",
            w.msgs_echoed, w.hs_ok
        ),
    );

    check(
        "surviving tunnels: no message lost, duplicated, reordered or corrupted",
        c.lost_on_surviving + c.duplicated + c.reordered + c.corrupt == 0 && c.msgs_echoed > 0,
        format!(
            "sent {} echoed {} lost {} duplicated {} reordered {} corrupt/misrouted {}",
            c.msgs_sent, c.msgs_echoed, c.lost_on_surviving, c.duplicated, c.reordered, c.corrupt
        ),
    );

    let kills = c.kills_fin + c.kills_rst;
    let kill_fail = load.failures_of(F_KILL);
    check(
        "every tunnel on a killed backend got Close 1014",
        c.received_1014 == c.expected_1014
            && kill_fail == 0
            && (kills == 0 || c.expected_1014 > 0 || args.tunnels < args.backends as u32),
        format!(
            "{kills} kills; 1014 expected {} received {}; anything else: {kill_fail}",
            c.expected_1014, c.received_1014
        ),
    );

    check(
        "no other tunnel ended (only kills, vanishing clients and the drain end tunnels)",
        load.failures_of(F_END) == 0,
        format!("{} unexpected end(s)", load.failures_of(F_END)),
    );

    check(
        "tunnel (re)connects fail only during backend outages",
        load.failures_of(F_CONNECT) == 0,
        format!(
            "{} lives; refused during an outage {}, cut by a kill {}, other failures {}",
            c.tunnel_lives,
            c.connect_refused_in_outage,
            c.connect_cut_by_kill,
            load.failures_of(F_CONNECT)
        ),
    );

    let hs_fail = load.failures_of(F_HS);
    check(
        "short handshakes: all attempted, none failed",
        c.hs_attempted >= load.handshakes_target && hs_fail == 0,
        format!(
            "target {} attempted {} ok {} refused (502/503) during an outage {} cut by a kill {} failed {hs_fail}",
            load.handshakes_target,
            c.hs_attempted,
            c.hs_ok,
            c.hs_refused_in_outage,
            c.hs_cut_by_kill
        ),
    );

    let sent = warmup.counts.reloads_sent + c.reloads_sent;
    let ok = warmup.reloads_ok.unwrap_or(0) + load.reloads_ok.unwrap_or(0);
    let err = warmup.reloads_error.unwrap_or(0) + load.reloads_error.unwrap_or(0);
    check(
        "every SIGHUP reloaded (wsgate_config_reloads_total)",
        load.reloads_ok.is_some()
            && ok == sent as i64
            && err == 0
            && (args.reload_every == 0 || sent > 0),
        format!("sent {sent}, result=\"ok\" +{ok}, result=\"error\" +{err}"),
    );

    check(
        "drain: every client Close answered with 1000, then TCP closed by wsgate",
        load.failures_of(F_DRAIN) == 0,
        format!(
            "{} clean, {} failure(s)",
            c.drained_clean,
            load.failures_of(F_DRAIN)
        ),
    );

    let vanish_expected = args.vanish_every > 0 && args.vanish_percent > 0.0 && args.tunnels >= 100;
    let setup_fail = load.failures_of(F_SETUP) + warmup.failures_of(F_SETUP);
    check(
        "faults injected as planned",
        kills == load.kills_planned
            && setup_fail == 0
            && (!vanish_expected || c.vanished_rst > 0 && c.vanished_fin > 0),
        format!(
            "kills {kills}/{} (FIN {}, RST {}), vanished RST {} FIN {}, soak errors {setup_fail}",
            load.kills_planned, c.kills_fin, c.kills_rst, c.vanished_rst, c.vanished_fin
        ),
    );

    for ((name, f), (_, b)) in final_.counts().into_iter().zip(baseline.counts()) {
        let pass = matches!((f, b), (Some(f), Some(b)) if f <= b);
        let n: &'static str = match name {
            "fds" => "open fds back to the baseline",
            "connections_active" => "wsgate_connections_active back to the baseline",
            "tunnels_active" => "wsgate_ws_tunnels_active back to the baseline",
            _ => "read_buffers_in_use back to the baseline",
        };
        check(n, pass, format!("baseline {} final {}", opt(b), opt(f)));
    }

    let r = ratio(final_.rss_bytes, baseline.rss_bytes);
    check(
        "RSS within the tolerance of the post-warm-up baseline",
        r.is_some_and(|r| r <= 1.0 + args.rss_tolerance / 100.0),
        format!(
            "baseline {} final {} ratio {} (limit {:.2})",
            mib(baseline.rss_bytes),
            mib(final_.rss_bytes),
            r.map_or("–".into(), |r| format!("{r:.3}")),
            1.0 + args.rss_tolerance / 100.0
        ),
    );
    out
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "–".into(), |v| v.to_string())
}

fn mib(b: Option<u64>) -> String {
    b.map_or_else(
        || "–".into(),
        |b| format!("{:.1} MiB", b as f64 / 1048576.0),
    )
}

fn us(v: Option<u64>) -> String {
    match v {
        None => "–".into(),
        Some(us) if us >= 1000 => format!("{:.1}ms", us as f64 / 1000.0),
        Some(us) => format!("{us}µs"),
    }
}

fn snapshot_line(s: &Snapshot) -> String {
    format!(
        "fds {} rss {} connections_active {} tunnels_active {} read_buffers_in_use {}",
        opt(s.fds),
        mib(s.rss_bytes),
        opt(s.connections_active),
        opt(s.tunnels_active),
        opt(s.read_buffers_in_use)
    )
}

fn kinds_line(s: &Snapshot) -> String {
    let k: Vec<String> = s
        .fd_kinds
        .iter()
        .map(|(kind, n)| format!("{n} {kind}"))
        .collect();
    if k.is_empty() {
        "–".into()
    } else {
        k.join(", ")
    }
}

fn phase_line(p: &PhaseResult) -> String {
    let c = &p.counts;
    format!(
        "{} done in {:.0} s: {} lives, {} messages echoed, {} handshakes ok of {}, {} failure kind(s)",
        p.name,
        p.seconds,
        c.tunnel_lives,
        c.msgs_echoed,
        c.hs_ok,
        c.hs_attempted,
        p.failures.len()
    )
}

/// The human-readable report (stdout).
fn report(args: &SoakArgs, r: &SoakRecord) -> String {
    let l = &r.load;
    let c = &l.counts;
    let mut s = String::new();
    let mut line = |t: String| {
        s.push_str(&t);
        s.push('\n');
    };
    line(format!(
        "\n== wsgate soak: {} s load, {} tunnels, {} backends, wsgate {} thread(s) ==",
        args.duration, args.tunnels, args.backends, args.threads
    ));
    line(format!(
        "duration     warm-up {:.0} s, load {:.0} s, drain back to baseline in {}",
        r.warmup.seconds,
        l.seconds,
        r.drain_back_s
            .map_or("– (not within the wait)".into(), |s| format!("{s:.1} s"))
    ));
    line(format!(
        "messages     sent {} echoed {} | lost on surviving tunnels {} duplicated {} reordered {} corrupt {} | unechoed on killed/vanished tunnels {}",
        c.msgs_sent,
        c.msgs_echoed,
        c.lost_on_surviving,
        c.duplicated,
        c.reordered,
        c.corrupt,
        c.unechoed_on_cut_tunnels
    ));
    line(format!(
        "echo rtt     p50 {} p99 {} max {}",
        us(c.rtt_p50_us),
        us(c.rtt_p99_us),
        us(c.rtt_max_us)
    ));
    line(format!(
        "tunnels      lives {} | open after the ramp: min {} mean {} | vanished: RST {} FIN {}",
        c.tunnel_lives,
        opt(l.open_min),
        l.open_mean.map_or("–".into(), |m| format!("{m:.0}")),
        c.vanished_rst,
        c.vanished_fin
    ));
    line(format!(
        "kills        {} of {} planned (FIN {}, RST {}) | Close 1014 expected {} received {}",
        c.kills_fin + c.kills_rst,
        l.kills_planned,
        c.kills_fin,
        c.kills_rst,
        c.expected_1014,
        c.received_1014
    ));
    line(format!(
        "reloads      sent {} (warm-up {}) | wsgate ok {} error {} (load phase)",
        c.reloads_sent + r.warmup.counts.reloads_sent,
        r.warmup.counts.reloads_sent,
        opt(l.reloads_ok),
        opt(l.reloads_error)
    ));
    line(format!(
        "handshakes   target {} attempted {} ok {} | refused 502/503 during an outage {} | cut by a kill {} | failed {}",
        l.handshakes_target,
        c.hs_attempted,
        c.hs_ok,
        c.hs_refused_in_outage,
        c.hs_cut_by_kill,
        l.failures_of(F_HS)
    ));
    let closes: Vec<String> = l
        .closes_by_reason
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    line(format!(
        "wsgate       cpu {} s in the load phase, {} s in all | closes by reason: {}",
        l.wsgate_cpu_s.map_or("–".into(), |v| format!("{v:.1}")),
        r.wsgate_cpu_s_total
            .map_or("–".into(), |v| format!("{v:.1}")),
        if closes.is_empty() {
            "–".into()
        } else {
            closes.join(", ")
        }
    ));
    line(format!(
        "peak         fds {} rss {}",
        opt(l.peak_fds),
        mib(l.peak_rss_bytes)
    ));
    line(format!("baseline     {}", snapshot_line(&r.baseline)));
    line(format!(
        "final        {} | rss ratio {}",
        snapshot_line(&r.final_),
        r.rss_ratio.map_or("–".into(), |v| format!("{v:.3}"))
    ));
    line(format!(
        "fds          baseline: {}",
        kinds_line(&r.baseline)
    ));
    line(format!("             final:    {}", kinds_line(&r.final_)));
    let failures: Vec<(&String, &u64)> =
        r.warmup.failures.iter().chain(l.failures.iter()).collect();
    if !failures.is_empty() {
        line("failures (by kind, warm-up and load):".into());
        for (k, n) in failures {
            line(format!("  {n:>7}  {k}"));
        }
    }
    let samples: Vec<&String> = r.warmup.samples.iter().chain(l.samples.iter()).collect();
    if !samples.is_empty() {
        line("first failures in full:".into());
        for x in samples.iter().take(25) {
            line(format!("  - {x}"));
        }
    }
    line("checks:".into());
    for ch in &r.checks {
        line(format!(
            "  {}  {} — {}",
            if ch.pass { "PASS" } else { "FAIL" },
            ch.name,
            ch.detail
        ));
    }
    let failed = r.checks.iter().filter(|c| !c.pass).count();
    line(format!(
        "result: {} ({} of {} checks passed)",
        if r.pass { "PASS" } else { "FAIL" },
        r.checks.len() - failed,
        r.checks.len()
    ));
    s
}

fn append_record(path: &std::path::Path, r: &SoakRecord) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut line = serde_json::to_vec(r).map_err(|e| e.to_string())?;
    line.push(b'\n');
    f.write_all(&line)
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_ports_are_below_the_ephemeral_range() {
        let ports = fixed_ports(3).unwrap();
        assert_eq!(ports.len(), 3);
        let lo: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
            .unwrap_or(32768);
        assert!(ports.iter().all(|&p| p < lo));
    }

    #[test]
    fn counts_compare_with_the_baseline() {
        let base = Snapshot {
            fds: Some(20),
            rss_bytes: Some(1),
            connections_active: Some(0),
            tunnels_active: Some(0),
            read_buffers_in_use: Some(0),
            fd_kinds: BTreeMap::new(),
        };
        let mut now = base.clone();
        assert!(at_or_below(&now, &base));
        now.fds = Some(21);
        assert!(!at_or_below(&now, &base));
        now.fds = None;
        assert!(!at_or_below(&now, &base));
    }
}
