//! wsgate-bench: wsgate against nginx, HAProxy and a direct connection, on
//! loopback, with in-process echo backends; and `wsgate-bench soak`, a
//! leak-and-fault soak of wsgate alone (`soak/`). See README.md beside
//! Cargo.toml.

mod backend;
mod client;
mod procstat;
mod report;
mod scenarios;
mod soak;
mod targets;
mod tls;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use crate::backend::{Backend, TlsLog};
use crate::report::{Record, Sink};
use crate::scenarios::{Outcome, Scenario, TlsStats};
use crate::targets::{Kind, Spec, Target, TlsBackends};
use crate::tls::{KeyType, TlsSetup};

#[derive(Parser, Debug)]
#[command(
    name = "wsgate-bench",
    about = "Benchmark wsgate against nginx, HAProxy and direct connections on loopback",
    args_conflicts_with_subcommands = true
)]
struct Args {
    /// Without a subcommand: the benchmark, with the options below.
    #[command(subcommand)]
    command: Option<Command>,
    /// Scenarios: all, or a comma list of echo64, echo16k, echo1m, handshake, idle, http,
    /// idle_tls (idle over TLS), idle_h2 (idle WebSockets over HTTP/2 over TLS),
    /// idle_tls_backend (idle ws:// to TLS backends) and storm (a reconnect storm with and
    /// without wsgate's handshake gate, and what admission control costs a handshake;
    /// wsgate only) and drain (a backend drained through wsgate's admin API, its
    /// tunnels' Close 1012 spread over a window or all at once; wsgate only); the last
    /// five are not part of all, name them: `all,idle_tls`. The group `tls` stands for the
    /// proxies terminating TLS under load: wss64, wss16k, wss1m (echo over TLS),
    /// tls_handshake, tls_resume (handshake loops over TLS, full or resumed), https (wrk),
    /// h2 (h2load, one stream at a time per connection) and wss16k_tls_backend (wss16k,
    /// the proxy talking TLS to the backends too); h2_m10 (h2load, 10 streams at a time)
    /// is named apart. None of them is part of all.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Targets, in the order they are interleaved within a run.
    #[arg(long, default_value = "wsgate,nginx,haproxy,direct")]
    targets: String,
    /// Worker threads/processes given to each proxy.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Runs per scenario (targets interleaved in each run).
    #[arg(long, default_value_t = 2)]
    runs: u32,
    /// Idle connections per target [default: from the fd hard limit, at most 9000].
    #[arg(long)]
    idle_conns: Option<usize>,
    /// Seconds to hold the idle connections.
    #[arg(long, default_value_t = 20)]
    idle_hold: u64,
    /// idle_h2: WebSockets (streams) per HTTP/2 connection; --idle-conns is the
    /// number of WebSockets. At most 100, wsgate's and HAProxy's default limit
    /// of concurrent streams.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100))]
    h2_streams: u32,
    /// wsgate binary; when absent the tool runs `cargo build --release --bin wsgate`
    /// and uses target/release/wsgate.
    #[arg(long)]
    wsgate: Option<PathBuf>,
    /// Log filter (RUST_LOG) for wsgate. The default turns its per-request
    /// access log off, as nginx (`access_log off`) and HAProxy (no `log`) are run.
    #[arg(long, default_value = "info,wsgate::access=off")]
    wsgate_log: String,
    /// Do not build wsgate; use target/release/wsgate as it is.
    #[arg(long)]
    no_build: bool,
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
    #[arg(long, default_value = "/usr/sbin/haproxy")]
    haproxy: PathBuf,
    /// wrk binary for the http scenario [default: `wrk` on PATH].
    #[arg(long)]
    wrk: Option<PathBuf>,
    /// Use the built-in HTTP client even if wrk is installed.
    #[arg(long)]
    no_wrk: bool,
    /// h2load binary for the h2 and h2_m10 scenarios [default: `h2load` on PATH;
    /// Debian package nghttp2-client]. Without it they are skipped.
    #[arg(long)]
    h2load: Option<PathBuf>,
    /// The TLS certificate's key: ECDSA P-256 (rcgen) or RSA 2048 bits (made with the
    /// openssl command line).
    #[arg(long, value_enum, default_value_t = KeyType::Ecdsa)]
    tls_key: KeyType,
    /// Results file [default: results/bench-<UTC timestamp>.jsonl in the repository].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep the generated configs and proxy logs.
    #[arg(long)]
    keep_tmp: bool,
    /// Tokio worker threads for the load generator and echo backends.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// storm: clients that connect at once (each holds a client and a backend
    /// socket in this process, two in wsgate).
    #[arg(long, default_value_t = 5000)]
    storm_clients: usize,
    /// storm: the gate's rate, handshakes per second (`handshake_rate.rate`).
    #[arg(long, default_value_t = 1000.0)]
    storm_rate: f64,
    /// storm: the gate's burst (`handshake_rate.burst`).
    #[arg(long, default_value_t = 200)]
    storm_burst: u32,
    /// storm: seconds a handshake may wait at the gate before 503 (`handshake_rate.max_wait`,
    /// 0.001–60).
    #[arg(long, default_value_t = 5.0)]
    storm_max_wait: f64,
    /// storm: seconds until a storm gives up on the clients still out.
    #[arg(long, default_value_t = 120)]
    storm_timeout: u64,
    /// storm: retries per client at most (after a 503/429, once its Retry-After has passed).
    #[arg(long, default_value_t = 20)]
    storm_retries: u32,
    /// storm: random jitter added to every pause before a retry, 0 to this many ms.
    #[arg(long, default_value_t = 250)]
    storm_jitter_ms: u64,
    /// storm: seconds a client waits for its 101 before it hangs up and tries again
    /// [default: --storm-max-wait + 10, so that no client gives up while queued].
    #[arg(long)]
    storm_attempt_timeout: Option<f64>,
    /// storm: which parts to run, `storm` (the reconnect storm with and without the gate)
    /// and `cost` (handshakes with admission limits never hit against none).
    #[arg(long, default_value = "storm,cost")]
    storm_parts: String,
    /// drain: clients on the two backends (each holds a client and a backend socket
    /// in this process, two in wsgate).
    #[arg(long, default_value_t = 5000)]
    drain_clients: usize,
    /// drain: the spreads to compare, seconds, a comma list (0 = an instant cut); each
    /// run measures each, on a fresh wsgate, in alternating order.
    #[arg(long, default_value = "30,0")]
    drain_spreads: String,
    /// drain: seconds the measurement may go on after the spread before it gives up
    /// on the clients still out.
    #[arg(long, default_value_t = 60)]
    drain_grace: u64,
    /// drain: random pause before every reconnect, 0 to this many ms (0: the
    /// clients come back at once, so that what the backend sees is what wsgate does).
    #[arg(long, default_value_t = 0)]
    drain_jitter_ms: u64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Leak-and-fault soak of wsgate alone: long-lived tunnels with traffic,
    /// backend kills, vanishing clients, SIGHUP reloads and short handshakes,
    /// then a check that wsgate returns to its post-warm-up state.
    Soak(soak::SoakArgs),
}

/// Largest idle-connection default: the nginx config allows 20000 connections
/// per worker and each proxied connection takes two.
const IDLE_CAP: usize = 9000;
/// File descriptors kept free for everything else.
const FD_MARGIN: u64 = 2000;

fn main() {
    let mut args = Args::parse();
    let command = args.command.take();
    let client_threads = match &command {
        Some(Command::Soak(s)) => s.client_threads,
        None => args.client_threads,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(client_threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsgate-bench: cannot start runtime: {e}");
            std::process::exit(2);
        }
    };
    let code = rt.block_on(async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("wsgate-bench: cannot watch SIGTERM: {e}");
                    return 2;
                }
            };
        let work = async move {
            match command {
                // The soak decides its own exit code: 1 when a check fails,
                // 2 when it could not run.
                Some(Command::Soak(soak_args)) => match soak::run(soak_args).await {
                    Ok(code) => code,
                    Err(e) => {
                        eprintln!("wsgate-bench soak: {e}");
                        2
                    }
                },
                None => match run(args).await {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("wsgate-bench: {e}");
                        1
                    }
                },
            }
        };
        tokio::select! {
            code = work => code,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("wsgate-bench: interrupted; stopping proxies");
                130
            }
            _ = term.recv() => {
                eprintln!("wsgate-bench: terminated; stopping proxies");
                143
            }
        }
    });
    // Dropping the runtime cancels every remaining task; the proxies were
    // already stopped when `run`'s targets were dropped.
    rt.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}

fn workspace_root() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    p.canonicalize().unwrap_or(p)
}

/// Removes the temp dir on drop unless kept.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept configs and logs in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A comma list of names; `all` (alone or in the list) stands for every name
/// of `all`.
fn parse_list<T>(s: &str, all: &[T], parse: fn(&str) -> Option<T>) -> Result<Vec<T>, String>
where
    T: Copy + PartialEq,
{
    let mut out: Vec<T> = Vec::new();
    for w in s.split(',') {
        let w = w.trim();
        let add: Vec<T> = if w == "all" {
            all.to_vec()
        } else {
            vec![parse(w).ok_or_else(|| format!("unknown name {w:?}"))?]
        };
        for x in add {
            if !out.contains(&x) {
                out.push(x);
            }
        }
    }
    Ok(out)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() { d } else { root.join(d) }
        }
        None => root.join("target"),
    }
}

/// Builds wsgate (release) unless told not to; returns its path.
async fn wsgate_binary(
    wsgate: Option<&Path>,
    no_build: bool,
    root: &Path,
) -> Result<PathBuf, String> {
    if let Some(p) = wsgate {
        return if is_executable(p) {
            Ok(p.to_path_buf())
        } else {
            Err(format!("{} is not an executable", p.display()))
        };
    }
    let bin = target_dir(root).join("release/wsgate");
    if !no_build {
        eprintln!("building wsgate: cargo build --release --bin wsgate");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = tokio::process::Command::new(cargo)
            .args(["build", "--release", "--bin", "wsgate"])
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .status();
        match tokio::time::timeout(Duration::from_secs(1800), status).await {
            Ok(Ok(s)) if s.success() => {}
            Ok(Ok(s)) => return Err(format!("cargo build --release --bin wsgate failed ({s})")),
            Ok(Err(e)) => return Err(format!("cannot run cargo: {e}")),
            Err(_) => return Err("cargo build --release --bin wsgate took over 30 min".into()),
        }
    }
    if is_executable(&bin) {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found (build it with `cargo build --release --bin wsgate`)",
            bin.display()
        ))
    }
}

/// "20260101-120000" (UTC) without a date crate.
fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    )
}

fn fmt_us(v: Option<u64>) -> String {
    match v {
        None => "–".into(),
        Some(us) if us >= 10_000 => format!("{:.1}ms", us as f64 / 1000.0),
        Some(us) if us >= 1000 => format!("{:.2}ms", us as f64 / 1000.0),
        Some(us) => format!("{us}µs"),
    }
}

fn progress_line(sc: Scenario, run: u32, runs: u32, r: &Record) -> String {
    let mut s = format!(
        "[{sc} {run}/{runs}] {:<8} {:>10.0} {}/s  p50 {} p99 {} max {}",
        r.target,
        r.ops_per_s,
        sc.unit(),
        fmt_us(r.p50_us),
        fmt_us(r.p99_us),
        fmt_us(r.max_us),
    );
    if let Some(c) = r.proxy_cpu_s {
        s.push_str(&format!("  cpu {c:.2}s"));
    }
    if let Some(o) = r.ops_per_cpu_s {
        s.push_str(&format!(" ({o:.0}/cpu-s)"));
    }
    if let Some(m) = r.rss_per_conn_bytes {
        s.push_str(&format!("  rss/conn {m:.0} B"));
    }
    if let Some(m) = r.rss_per_conn_held_bytes {
        s.push_str(&format!(" ({m:.0} B at the end of the hold)"));
    }
    if let Some(t) = &r.tls {
        s.push_str(&tls_progress(t));
    }
    s.push_str(&format!("  errors {}", r.errors));
    if let Some(e) = &r.first_error {
        s.push_str(&format!(" (first: {e})"));
    }
    s
}

/// The TLS part of a progress line: what was negotiated, resumed handshakes,
/// what the TLS backends saw.
fn tls_progress(t: &TlsStats) -> String {
    let mut s = String::new();
    if let Some(n) = &t.negotiated {
        s.push_str(&format!("  tls {}", n.summary()));
    }
    if let (Some(full), Some(resumed)) = (t.handshakes_full, t.handshakes_resumed) {
        s.push_str(&format!(" resumed {resumed}/{}", full + resumed));
    }
    if let Some(b) = &t.backend_sessions {
        let each: Vec<String> = b.iter().map(|(k, v)| format!("{k} ×{v}")).collect();
        s.push_str(&format!("  backend tls {}", each.join(", ")));
    }
    s
}

/// Waits (bounded) until the backends hold at most `limit` sockets, so one
/// target's closing connections do not eat the next one's descriptors.
async fn settle(backends: &[Backend], limit: usize, wait: Duration) {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        let live: usize = backends.iter().map(|b| b.live()).sum();
        if live <= limit {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let live: usize = backends.iter().map(|b| b.live()).sum();
    eprintln!("    note: backends still hold {live} sockets after {wait:?}");
}

/// What a measurement may need besides the target and the flags.
struct Tools<'a> {
    wrk: Option<&'a Path>,
    h2load: Option<&'a Path>,
    /// The run's temp dir (h2load's request log).
    tmp: &'a Path,
    /// What the TLS echo backends accepted, when they run.
    tls_log: Option<&'a TlsLog>,
}

async fn measure(
    sc: Scenario,
    target: &Target,
    args: &Args,
    idle_conns: usize,
    tools: &Tools<'_>,
) -> Outcome {
    let d = Duration::from_secs(args.duration.max(1));
    let addr = target.addr;
    let probe = target.probe();
    let tls = target.tls_addr.zip(target.spec.tls.as_ref());
    if sc.is_tls_load() {
        // The caller skips targets without a TLS listener.
        let Some((tls_addr, tls)) = tls else {
            let mut o = Outcome::default();
            o.note_error(format!("{} has no TLS listener", target.kind()));
            return o;
        };
        return measure_tls(sc, tls_addr, tls, probe, d, tools).await;
    }
    match sc {
        Scenario::Echo64 => scenarios::echo::run(addr, 50, 64, d, probe).await,
        Scenario::Echo16k => scenarios::echo::run(addr, 50, 16 * 1024, d, probe).await,
        Scenario::Echo1m => scenarios::echo::run(addr, 4, 1 << 20, d, probe).await,
        Scenario::Handshake => scenarios::handshake::run(addr, 20, d, probe).await,
        Scenario::Idle => {
            let hold = Duration::from_secs(args.idle_hold);
            scenarios::idle::run(addr, idle_conns, hold, probe).await
        }
        Scenario::IdleTls | Scenario::IdleH2 => {
            let hold = Duration::from_secs(args.idle_hold);
            match tls {
                Some((tls_addr, tls)) if sc == Scenario::IdleH2 => {
                    let streams = args.h2_streams as usize;
                    scenarios::idle::run_h2(tls_addr, tls, idle_conns, streams, hold, probe).await
                }
                Some((tls_addr, tls)) => {
                    scenarios::idle::run_tls(tls_addr, tls, idle_conns, hold, probe).await
                }
                // The caller skips targets without a TLS listener.
                None => {
                    let mut o = Outcome::default();
                    o.note_error(format!("{} has no TLS listener", target.kind()));
                    o
                }
            }
        }
        Scenario::IdleTlsBackend => {
            let hold = Duration::from_secs(args.idle_hold);
            scenarios::idle::run_tls_backend(addr, idle_conns, hold, probe).await
        }
        Scenario::Http => scenarios::http::run(addr, 50, d, probe, tools.wrk, None).await,
        // Run apart, with wsgate processes of their own (`storm::run_all`,
        // `drain::run_all`).
        Scenario::Storm | Scenario::Drain => {
            let mut o = Outcome::default();
            o.note_error(format!("{sc} is not measured on a shared target"));
            o
        }
        _ => {
            let mut o = Outcome::default();
            o.note_error(format!("{sc} is not measured here"));
            o
        }
    }
}

/// A TLS load scenario on the proxy's TLS listener `addr`. Unless h2load
/// makes the load (it reports what it negotiated), a probe connection with
/// the load's rustls client config first notes what the proxy negotiates;
/// for `wss16k_tls_backend`, what the TLS echo backends accepted during the
/// measurement is noted too.
async fn measure_tls(
    sc: Scenario,
    addr: std::net::SocketAddr,
    tls: &TlsSetup,
    probe: procstat::Probe,
    d: Duration,
    tools: &Tools<'_>,
) -> Outcome {
    use scenarios::{echo, handshake, http};
    let probed = match sc.h2load_streams() {
        Some(_) => None,
        None => Some(client::tls_probe(addr, tls.connector(), Duration::from_secs(5)).await),
    };
    if let Some(log) = tools.tls_log {
        log.take();
    }
    let path = if sc.uses_tls_backend() {
        targets::TLS_BACKEND_PATH
    } else {
        "/bench"
    };
    let wss = |size| echo::run_tls(addr, tls.connector(), path, 50, size, d, probe);
    let mut o = match sc {
        Scenario::Wss64 => wss(64).await,
        Scenario::Wss16k | Scenario::Wss16kTlsBackend => wss(16 * 1024).await,
        Scenario::Wss1m => echo::run_tls(addr, tls.connector(), path, 4, 1 << 20, d, probe).await,
        Scenario::TlsHandshake => handshake::run_tls(addr, tls, false, 20, d, probe).await,
        Scenario::TlsResume => handshake::run_tls(addr, tls, true, 20, d, probe).await,
        Scenario::Https => http::run(addr, 50, d, probe, tools.wrk, Some(tls)).await,
        Scenario::H2 | Scenario::H2M10 => match tools.h2load {
            Some(h2load) => {
                let m = sc.h2load_streams().unwrap_or(1);
                scenarios::h2load::run(h2load, addr, 50, m, d, probe, tools.tmp).await
            }
            // The caller skips h2 without h2load.
            None => {
                let mut o = Outcome::default();
                o.note_error("h2load not found".into());
                o
            }
        },
        _ => {
            let mut o = Outcome::default();
            o.note_error(format!("{sc} is not a TLS load scenario"));
            o
        }
    };
    let mut stats = o.tls.take().unwrap_or_default();
    stats.client.get_or_insert_with(|| "rustls".into());
    match probed {
        Some(Ok(n)) => {
            stats.negotiated = Some(n);
            stats.negotiated_by = Some("rustls probe".into());
        }
        Some(Err(e)) => o.note_error(format!("TLS probe: {e}")),
        None => {}
    }
    if let (Some(log), true) = (tools.tls_log, sc.uses_tls_backend()) {
        let (sessions, resumed) = log.take();
        stats.backend_sessions = Some(sessions);
        stats.backend_resumed = Some(resumed);
    }
    o.tls = Some(stats);
    o
}

/// The storm's plan from the flags; `fd_room` is how many clients this
/// process has descriptors for (each holds a client and a backend socket).
fn storm_plan(args: &Args, fd_room: usize) -> Result<scenarios::storm::Plan, String> {
    if args.storm_clients == 0 {
        return Err("--storm-clients must be at least 1".into());
    }
    if args.storm_clients > fd_room {
        return Err(format!(
            "--storm-clients {} needs ~{} descriptors in this process (a client and a backend \
             socket each) and as many in wsgate; RLIMIT_NOFILE allows {fd_room} clients",
            args.storm_clients,
            2 * args.storm_clients
        ));
    }
    // wsgate takes a rate in (0, 1e6] and a wait of at most 60 s.
    if !(args.storm_rate > 0.0 && args.storm_rate <= 1e6) {
        return Err("--storm-rate must be more than 0 and at most 1000000".into());
    }
    if !(1..=1_000_000).contains(&args.storm_burst) {
        return Err("--storm-burst must be between 1 and 1000000".into());
    }
    if !(args.storm_max_wait >= 0.001 && args.storm_max_wait <= 60.0) {
        return Err("--storm-max-wait must be between 0.001 and 60 (seconds)".into());
    }
    if args.storm_timeout == 0 {
        return Err("--storm-timeout must be at least 1".into());
    }
    let attempt_timeout = match args.storm_attempt_timeout {
        None => None,
        Some(s) if s >= 0.1 && s <= args.storm_timeout as f64 => {
            Some(Duration::from_millis((s * 1000.0).round() as u64))
        }
        Some(_) => {
            return Err("--storm-attempt-timeout must be between 0.1 and --storm-timeout".into());
        }
    };
    let parts: Vec<&str> = args.storm_parts.split(',').map(str::trim).collect();
    if parts.is_empty() || parts.iter().any(|p| !["storm", "cost"].contains(p)) {
        return Err("--storm-parts is a comma list of storm and cost".into());
    }
    Ok(scenarios::storm::Plan {
        clients: args.storm_clients,
        gate: targets::Gate {
            rate: args.storm_rate,
            burst: args.storm_burst,
            max_wait: Duration::from_millis((args.storm_max_wait * 1000.0).round() as u64),
        },
        timeout: Duration::from_secs(args.storm_timeout),
        retries: args.storm_retries,
        jitter: Duration::from_millis(args.storm_jitter_ms),
        attempt_timeout,
        storm: parts.contains(&"storm"),
        cost: parts.contains(&"cost"),
        duration: Duration::from_secs(args.duration.max(1)),
        runs: args.runs,
    })
}

/// The drain's plan from the flags; `fd_room` is how many clients this
/// process has descriptors for (each holds a client and a backend socket).
fn drain_plan(args: &Args, fd_room: usize) -> Result<scenarios::drain::Plan, String> {
    if args.drain_clients == 0 {
        return Err("--drain-clients must be at least 1".into());
    }
    // Reconnecting clients hold their old and new sockets for a moment.
    if args.drain_clients > fd_room {
        return Err(format!(
            "--drain-clients {} needs ~{} descriptors in this process (a client and a backend \
             socket each, more while clients reconnect) and as many in wsgate; RLIMIT_NOFILE \
             allows {fd_room} clients",
            args.drain_clients,
            2 * args.drain_clients
        ));
    }
    let mut spreads = Vec::new();
    for w in args.drain_spreads.split(',') {
        let secs: f64 = w
            .trim()
            .parse()
            .map_err(|_| format!("--drain-spreads: {w:?} is not a number of seconds"))?;
        if !(0.0..=600.0).contains(&secs) {
            return Err("--drain-spreads: each between 0 and 600 seconds".into());
        }
        let d = Duration::from_millis((secs * 1000.0).round() as u64);
        if !spreads.contains(&d) {
            spreads.push(d);
        }
    }
    if args.drain_grace == 0 || args.drain_grace > 600 {
        return Err("--drain-grace must be between 1 and 600 (seconds)".into());
    }
    Ok(scenarios::drain::Plan {
        clients: args.drain_clients,
        spreads,
        grace: Duration::from_secs(args.drain_grace),
        jitter: Duration::from_millis(args.drain_jitter_ms),
        runs: args.runs,
    })
}

/// Why `target` cannot run `sc`, if it cannot: a TLS scenario needs a TLS
/// listener, which direct (plain-ws backends) never has; WebSockets over
/// HTTP/2 need RFC 8441, which nginx does not implement. (Whether a proxy
/// that should take them does is asked of it: [`h2_refusal`].)
fn not_applicable(sc: Scenario, target: &Target) -> Option<String> {
    if sc.uses_h2() && target.kind() == Kind::Nginx {
        return Some(
            "not applicable (nginx does not take WebSockets over HTTP/2: no RFC 8441 extended CONNECT)"
                .to_string(),
        );
    }
    if sc.uses_tls_backend() {
        match target.kind() {
            Kind::Direct => {
                return Some(
                    "not applicable (direct has no proxy to hold a TLS session toward a backend)"
                        .into(),
                );
            }
            _ if target.spec.tls_backends.is_none() => {
                return Some(format!(
                    "skipped ({} could not start with TLS backends)",
                    target.kind()
                ));
            }
            _ => {}
        }
    }
    if !sc.uses_tls() || target.tls_addr.is_some() {
        return None;
    }
    Some(match target.kind() {
        Kind::Direct => "not applicable (the backends speak plain ws; no TLS)".to_string(),
        k => format!("skipped ({k} could not start with a TLS listener)"),
    })
}

/// Why `target` cannot run a WebSocket over HTTP/2 on its TLS listener, if it
/// cannot: one is opened (ALPN `h2`, extended CONNECT, one echo) and closed.
/// Asked once, of the process running before the idle run restarts it, so
/// the measured process has served nothing.
async fn h2_refusal(target: &Target) -> Option<String> {
    let (Some(addr), Some(tls)) = (target.tls_addr, &target.spec.tls) else {
        return Some("no TLS listener".into());
    };
    scenarios::idle::probe_h2(addr, tls).await.err()
}

async fn run(args: Args) -> Result<(), String> {
    let mut scenario_list = parse_list(
        &Scenario::expand_groups(&args.scenario),
        &Scenario::ALL,
        Scenario::parse,
    )?;
    let kinds = parse_list(&args.targets, &Kind::ALL, Kind::parse)?;
    if args.threads == 0 || args.runs == 0 {
        return Err("--threads and --runs must be at least 1".into());
    }
    // The storm runs after the others, with wsgate processes of its own.
    let storm_wanted = scenario_list.contains(&Scenario::Storm);
    scenario_list.retain(|&s| s != Scenario::Storm);
    if storm_wanted && !kinds.contains(&Kind::Wsgate) {
        return Err("the storm scenario measures wsgate: add wsgate to --targets".into());
    }
    // So does the drain.
    let drain_wanted = scenario_list.contains(&Scenario::Drain);
    scenario_list.retain(|&s| s != Scenario::Drain);
    if drain_wanted && !kinds.contains(&Kind::Wsgate) {
        return Err("the drain scenario measures wsgate: add wsgate to --targets".into());
    }

    let (soft, hard) = procstat::raise_nofile();
    let fd_room = (soft.saturating_sub(FD_MARGIN) / 2) as usize;
    let idle_conns = match args.idle_conns {
        Some(n) => {
            if n > fd_room {
                eprintln!(
                    "warning: --idle-conns {n} needs ~{} fds in this process; RLIMIT_NOFILE is {soft}",
                    2 * n
                );
            }
            n
        }
        None => fd_room.min(IDLE_CAP),
    };
    eprintln!("RLIMIT_NOFILE soft {soft} hard {hard}; idle scenario uses {idle_conns} connections");
    let storm = if storm_wanted {
        Some(storm_plan(&args, fd_room)?)
    } else {
        None
    };
    let drain = if drain_wanted {
        Some(drain_plan(&args, fd_room)?)
    } else {
        None
    };

    let root = workspace_root();
    let out_path = args.out.clone().unwrap_or_else(|| {
        root.join("results")
            .join(format!("bench-{}.jsonl", utc_stamp()))
    });
    let mut sink = Sink::create(&out_path).map_err(|e| format!("{}: {e}", out_path.display()))?;

    let tmp = TempDir {
        path: std::env::temp_dir().join(format!(
            "wsgate-bench-{}-{}",
            std::process::id(),
            utc_stamp()
        )),
        keep: args.keep_tmp,
    };
    std::fs::create_dir_all(&tmp.path).map_err(|e| format!("{}: {e}", tmp.path.display()))?;

    let wrk = if args.no_wrk {
        None
    } else {
        match &args.wrk {
            Some(p) => Some(p.clone()),
            None => find_on_path("wrk"),
        }
    };
    if scenario_list.contains(&Scenario::Http) || scenario_list.contains(&Scenario::Https) {
        match &wrk {
            Some(w) => eprintln!("http/https scenarios use {}", w.display()),
            None => eprintln!("http/https scenarios use the built-in client (wrk not found)"),
        }
    }
    // h2load for h2 and h2_m10; without it they are skipped with a note.
    let h2load = match &args.h2load {
        Some(p) => Some(p.clone()),
        None => find_on_path("h2load"),
    };
    let mut skipped: Vec<String> = Vec::new();
    if scenario_list.iter().any(|s| s.h2load_streams().is_some()) {
        match &h2load {
            Some(p) if is_executable(p) => eprintln!("h2/h2_m10 scenarios use {}", p.display()),
            _ => {
                for sc in scenario_list
                    .iter()
                    .filter(|s| s.h2load_streams().is_some())
                {
                    skipped.push(format!(
                        "{sc} skipped: h2load not found (Debian package nghttp2-client; bash \
                         benches/install-peers.sh)"
                    ));
                }
                scenario_list.retain(|s| s.h2load_streams().is_none());
            }
        }
    }

    // A self-signed certificate, only when a scenario needs TLS, so that
    // plain-only runs start the proxies exactly as before.
    let tls = if scenario_list
        .iter()
        .any(|s| s.uses_tls() || s.uses_tls_backend())
    {
        let t = TlsSetup::generate_with(&tmp.path.join("tls"), args.tls_key)
            .map_err(|e| format!("TLS certificate: {e}"))?;
        eprintln!(
            "TLS: self-signed {} certificate for {} in {}",
            args.tls_key.name(),
            crate::tls::SERVER_NAME,
            t.cert.display()
        );
        Some(t)
    } else {
        None
    };

    let b1 = backend::start()
        .await
        .map_err(|e| format!("backend: {e}"))?;
    let b2 = backend::start()
        .await
        .map_err(|e| format!("backend: {e}"))?;
    eprintln!("echo backends on {} and {}", b1.addr, b2.addr);
    let backend_addrs = [b1.addr, b2.addr];
    let mut backends = vec![b1, b2];
    // Two more behind TLS, only when a scenario talks TLS to the backends, so
    // that other runs start the proxies exactly as before.
    let tls_log = Arc::new(TlsLog::default());
    let tls_backends = match &tls {
        Some(t) if scenario_list.iter().any(|s| s.uses_tls_backend()) => {
            let t1 = backend::start_tls(t.server.clone(), tls_log.clone())
                .await
                .map_err(|e| format!("TLS backend: {e}"))?;
            let t2 = backend::start_tls(t.server.clone(), tls_log.clone())
                .await
                .map_err(|e| format!("TLS backend: {e}"))?;
            eprintln!("TLS echo backends on {} and {}", t1.addr, t2.addr);
            let tb = TlsBackends {
                addrs: [t1.addr, t2.addr],
                ca: t.cert.clone(),
            };
            backends.extend([t1, t2]);
            Some(tb)
        }
        _ => None,
    };

    // Start every available target once; they stay up for the whole run.
    let mut running: Vec<Target> = Vec::new();
    for kind in &kinds {
        let bin = match kind {
            Kind::Direct => PathBuf::new(),
            Kind::Wsgate => match wsgate_binary(args.wsgate.as_deref(), args.no_build, &root).await
            {
                Ok(p) => p,
                Err(e) => {
                    skipped.push(format!("wsgate skipped: {e}"));
                    continue;
                }
            },
            Kind::Nginx | Kind::Haproxy => {
                let p = if *kind == Kind::Nginx {
                    &args.nginx
                } else {
                    &args.haproxy
                };
                if !is_executable(p) {
                    skipped.push(format!(
                        "{kind} skipped: {} not installed (bash benches/install-peers.sh)",
                        p.display()
                    ));
                    continue;
                }
                p.clone()
            }
        };
        let spec = Spec {
            kind: *kind,
            bin,
            threads: args.threads,
            backends: backend_addrs,
            nofile_hard: hard,
            dir: tmp.path.clone(),
            env: match kind {
                Kind::Wsgate => vec![("RUST_LOG".into(), args.wsgate_log.clone())],
                _ => Vec::new(),
            },
            tls: match kind {
                Kind::Direct => None,
                _ if !scenario_list.iter().any(|s| s.uses_tls()) => None,
                _ => tls.clone(),
            },
            h2: scenario_list.iter().any(|s| s.offers_h2()),
            tls_backends: match kind {
                Kind::Direct => None,
                _ => tls_backends.clone(),
            },
            admission: None,
            fleet: None,
        };
        let mut started = Target::start(spec.clone()).await;
        let mut spec = spec;
        if let (Err(e), Some(_)) = (&started, &spec.tls_backends) {
            // Keep the other scenarios: try again without the TLS backends.
            skipped.push(format!(
                "{kind}: no route to TLS backends, idle_tls_backend skipped: {e}"
            ));
            spec.tls_backends = None;
            started = Target::start(spec.clone()).await;
        }
        if let (Err(e), Some(_)) = (&started, &spec.tls) {
            // Keep the plain scenarios: try again without the TLS listener.
            skipped.push(format!(
                "{kind}: no TLS listener, TLS scenarios skipped: {e}"
            ));
            started = Target::start(Spec { tls: None, ..spec }).await;
        }
        match started {
            Ok(t) => {
                match t.tls_addr {
                    Some(a) => eprintln!("{kind} listening on {} and {a} (TLS)", t.addr),
                    None => eprintln!("{kind} listening on {}", t.addr),
                }
                running.push(t);
            }
            Err(e) => skipped.push(format!("{kind} skipped: {e}")),
        }
    }
    for s in &skipped {
        eprintln!("note: {s}");
    }
    if running.is_empty() {
        return Err("no target could be started".into());
    }

    // Seconds per run: every scenario on every target it applies to.
    let per_run: u64 = scenario_list
        .iter()
        .map(|&sc| {
            let secs = if sc.is_idle() {
                args.idle_hold + 5
            } else {
                args.duration + 1
            };
            let n = running
                .iter()
                .filter(|t| not_applicable(sc, t).is_none())
                .count();
            secs * n as u64
        })
        .sum();
    let per_run = per_run
        + storm.as_ref().map_or(0, |p| p.seconds_per_run())
        + drain.as_ref().map_or(0, |p| p.seconds_per_run());
    eprintln!(
        "{} target(s) × {} scenario(s) × {} run(s): about {} min",
        running.len(),
        scenario_list.len() + usize::from(storm.is_some()) + usize::from(drain.is_some()),
        args.runs,
        (per_run * args.runs as u64).div_ceil(60)
    );

    // The certificate's key type, for every record of a TLS scenario.
    let tls_key = |sc: Scenario| {
        (sc.uses_tls() || sc.uses_tls_backend())
            .then(|| tls.as_ref().map(|t| t.key_type.name().to_string()))
            .flatten()
    };
    let mut records: Vec<Record> = Vec::new();
    let mut not_run: Vec<String> = Vec::new();
    // Targets that did not take a WebSocket over HTTP/2 when asked.
    let mut h2_refused: Vec<Kind> = Vec::new();
    for &sc in &scenario_list {
        for run in 1..=args.runs {
            for target in running.iter_mut() {
                if let Some(why) = not_applicable(sc, target) {
                    if run == 1 {
                        eprintln!("[{sc}] {}: {why}", target.kind());
                        not_run.push(format!("{}: {sc} {why}", target.kind()));
                    }
                    continue;
                }
                if sc.uses_h2()
                    && run == 1
                    && target.check_alive().is_none()
                    && let Some(why) = h2_refusal(target).await
                {
                    let why = format!(
                        "skipped ({} does not take a WebSocket over HTTP/2: {why})",
                        target.kind()
                    );
                    eprintln!("[{sc}] {}: {why}", target.kind());
                    not_run.push(format!("{}: {sc} {why}", target.kind()));
                    h2_refused.push(target.kind());
                }
                if sc.uses_h2() && h2_refused.contains(&target.kind()) {
                    continue;
                }
                let down = target.check_alive();
                if let Some(why) = &down {
                    eprintln!(
                        "[{sc} {run}/{}] {} is down: {why}; restarting",
                        args.runs,
                        target.kind()
                    );
                }
                // Memory per connection means something only from a fresh process: a proxy that already
                // held thousands of connections keeps that memory for reuse, and a second idle run would
                // measure next to nothing. So idle always starts from a restarted proxy.
                if down.is_some() || sc.is_idle() {
                    let spec = target.spec.clone();
                    target.stop();
                    match Target::start(spec).await {
                        Ok(t) => *target = t,
                        Err(e) => {
                            let mut o = Outcome::default();
                            o.note_error(format!("restart failed: {e}"));
                            let mut r =
                                Record::new(target.kind().name(), sc.name(), run, args.threads, o);
                            r.tls_key = tls_key(sc);
                            eprintln!("{}", progress_line(sc, run, args.runs, &r));
                            sink.write(&r)
                                .map_err(|e| format!("{}: {e}", out_path.display()))?;
                            records.push(r);
                            continue;
                        }
                    }
                }
                eprintln!("[{sc} {run}/{}] {} ...", args.runs, target.kind());
                let tools = Tools {
                    wrk: wrk.as_deref(),
                    h2load: h2load.as_deref(),
                    tmp: &tmp.path,
                    tls_log: tls_backends.as_ref().map(|_| &*tls_log),
                };
                let o = measure(sc, target, &args, idle_conns, &tools).await;
                let mut r = Record::new(target.kind().name(), sc.name(), run, args.threads, o);
                r.tls_key = tls_key(sc);
                if let Some(why) = target.check_alive() {
                    r.errors += 1;
                    r.note = Some(format!("{} exited during the run: {why}", target.kind()));
                }
                eprintln!("{}", progress_line(sc, run, args.runs, &r));
                sink.write(&r)
                    .map_err(|e| format!("{}: {e}", out_path.display()))?;
                records.push(r);
                if sc.is_idle() {
                    settle(&backends, 200, Duration::from_secs(15)).await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    // The storm's wsgate processes are its own; it needs the spec (binary,
    // threads, backends) of the one the other scenarios ran.
    let wsgate_spec = running
        .iter()
        .find(|t| t.kind() == Kind::Wsgate)
        .map(|t| t.spec.clone());
    if storm.is_some() {
        for t in running.iter().filter(|t| t.kind() != Kind::Wsgate) {
            let why = format!(
                "{}: storm not applicable (it measures wsgate's handshake gate; {} has no queue of \
                 handshakes to compare)",
                t.kind(),
                t.kind()
            );
            eprintln!("[storm] {why}");
            not_run.push(why);
        }
    }
    if drain.is_some() {
        for t in running.iter().filter(|t| t.kind() != Kind::Wsgate) {
            let why = format!(
                "{}: drain not applicable (it measures wsgate's admin drain; {} has no drain that \
                 moves live WebSockets)",
                t.kind(),
                t.kind()
            );
            eprintln!("[drain] {why}");
            not_run.push(why);
        }
    }
    // Stop the proxies before the storm and before printing.
    drop(running);
    let mut emit = |r: Record| -> Result<(), String> {
        sink.write(&r)
            .map_err(|e| format!("{}: {e}", out_path.display()))?;
        records.push(r);
        Ok(())
    };
    match (&storm, &wsgate_spec) {
        (Some(plan), Some(spec)) => scenarios::storm::run_all(spec, plan, &mut emit).await?,
        (Some(_), None) => not_run.push("wsgate: storm skipped (wsgate did not start)".into()),
        (None, _) => {}
    }
    match (&drain, &wsgate_spec) {
        (Some(plan), Some(spec)) => scenarios::drain::run_all(spec, plan, &mut emit).await?,
        (Some(_), None) => not_run.push("wsgate: drain skipped (wsgate did not start)".into()),
        (None, _) => {}
    }

    let sc_names: Vec<&str> = scenario_list.iter().map(|s| s.name()).collect();
    let t_names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
    if !scenario_list.is_empty() {
        println!("{}", report::markdown(&records, &sc_names, &t_names));
    }
    if storm.is_some() {
        println!("{}", report::storm_markdown(&records));
    }
    if drain.is_some() {
        println!("{}", report::drain_markdown(&records));
    }
    for s in skipped.iter().chain(&not_run) {
        println!("- {s}");
    }
    eprintln!("results: {}", out_path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_has_fixed_shape() {
        let s = utc_stamp();
        assert_eq!(s.len(), 15);
        assert_eq!(&s[8..9], "-");
    }

    #[test]
    fn bench_flags_and_the_soak_subcommand_parse() {
        let a =
            Args::try_parse_from(["wsgate-bench", "--threads", "2", "--scenario", "idle"]).unwrap();
        assert!(a.command.is_none() && a.threads == 2);
        let a = Args::try_parse_from(["wsgate-bench", "soak", "--tunnels", "5"]).unwrap();
        assert!(matches!(a.command, Some(Command::Soak(_))));
        // The benchmark's flags do not mix with the soak.
        assert!(Args::try_parse_from(["wsgate-bench", "--runs", "1", "soak"]).is_err());
    }

    #[test]
    fn lists_parse() {
        assert_eq!(
            parse_list("all", &Scenario::ALL, Scenario::parse)
                .unwrap()
                .len(),
            6
        );
        assert_eq!(
            parse_list("idle,http", &Scenario::ALL, Scenario::parse).unwrap(),
            vec![Scenario::Idle, Scenario::Http]
        );
        assert!(parse_list("nope", &Kind::ALL, Kind::parse).is_err());
    }

    #[test]
    fn idle_h2_is_named_not_part_of_all_and_streams_are_bounded() {
        let p = |s| parse_list(s, &Scenario::ALL, Scenario::parse).unwrap();
        assert!(!p("all").contains(&Scenario::IdleH2));
        assert_eq!(
            p("idle_tls,idle_h2"),
            vec![Scenario::IdleTls, Scenario::IdleH2]
        );
        assert!(Scenario::IdleH2.is_idle() && Scenario::IdleH2.uses_tls());
        assert!(Scenario::IdleH2.uses_h2() && !Scenario::IdleTls.uses_h2());
        let a = Args::try_parse_from(["wsgate-bench", "--scenario", "idle_h2"]).unwrap();
        assert_eq!(a.h2_streams, 100);
        let a = Args::try_parse_from(["wsgate-bench", "--h2-streams", "1"]).unwrap();
        assert_eq!(a.h2_streams, 1);
        for bad in ["0", "101"] {
            assert!(Args::try_parse_from(["wsgate-bench", "--h2-streams", bad]).is_err());
        }
    }

    #[test]
    fn idle_tls_backend_is_named_not_part_of_all() {
        let p = |s| parse_list(s, &Scenario::ALL, Scenario::parse).unwrap();
        assert!(!p("all").contains(&Scenario::IdleTlsBackend));
        assert_eq!(
            p("idle,idle_tls_backend"),
            vec![Scenario::Idle, Scenario::IdleTlsBackend]
        );
        let s = Scenario::IdleTlsBackend;
        assert!(s.is_idle() && s.uses_tls_backend() && !s.uses_tls() && !s.uses_h2());
        assert!(!Scenario::IdleTls.uses_tls_backend());
    }

    #[test]
    fn storm_is_named_not_part_of_all_and_its_flags_parse() {
        let p = |s| parse_list(s, &Scenario::ALL, Scenario::parse).unwrap();
        assert!(!p("all").contains(&Scenario::Storm));
        assert_eq!(p("storm"), vec![Scenario::Storm]);
        assert!(!Scenario::Storm.is_idle() && !Scenario::Storm.uses_tls());
        let a = Args::try_parse_from(["wsgate-bench", "--scenario", "storm"]).unwrap();
        let plan = storm_plan(&a, 9000).unwrap();
        assert_eq!(plan.clients, 5000);
        assert_eq!(plan.gate.rate, 1000.0);
        assert_eq!(plan.gate.burst, 200);
        assert_eq!(plan.gate.max_wait, Duration::from_secs(5));
        assert_eq!(plan.timeout, Duration::from_secs(120));
        assert_eq!(
            (plan.retries, plan.jitter),
            (20, Duration::from_millis(250))
        );
        assert_eq!((plan.duration, plan.runs), (Duration::from_secs(10), 2));
        let a = Args::try_parse_from([
            "wsgate-bench",
            "--scenario",
            "storm",
            "--storm-clients",
            "3000",
            "--storm-rate",
            "500",
            "--storm-burst",
            "50",
            "--storm-max-wait",
            "1.5",
            "--storm-timeout",
            "60",
            "--storm-retries",
            "5",
            "--storm-jitter-ms",
            "100",
            "--duration",
            "4",
        ])
        .unwrap();
        let plan = storm_plan(&a, 9000).unwrap();
        assert_eq!(plan.clients, 3000);
        assert_eq!((plan.gate.rate, plan.gate.burst), (500.0, 50));
        assert_eq!(plan.gate.max_wait, Duration::from_millis(1500));
        assert_eq!(plan.timeout, Duration::from_secs(60));
        assert_eq!((plan.retries, plan.jitter), (5, Duration::from_millis(100)));
        assert_eq!(plan.duration, Duration::from_secs(4));
        assert_eq!(plan.attempt_timeout, None);
        assert_eq!(plan.attempt_limit(), Duration::from_millis(11_500));
        let a = Args::try_parse_from(["wsgate-bench", "--storm-attempt-timeout", "2"]).unwrap();
        let plan = storm_plan(&a, 9000).unwrap();
        assert_eq!(plan.attempt_limit(), Duration::from_secs(2));
        assert!(plan.storm && plan.cost);
        let a = Args::try_parse_from(["wsgate-bench", "--storm-parts", "cost"]).unwrap();
        let plan = storm_plan(&a, 9000).unwrap();
        assert!(!plan.storm && plan.cost);
        // More clients than descriptors, and values wsgate would refuse.
        assert!(storm_plan(&a, 2999).is_err());
        for (flag, bad) in [
            ("--storm-rate", "0"),
            ("--storm-rate", "2000000"),
            ("--storm-burst", "0"),
            ("--storm-max-wait", "61"),
            ("--storm-max-wait", "0"),
            ("--storm-clients", "0"),
            ("--storm-timeout", "0"),
            ("--storm-attempt-timeout", "0"),
            ("--storm-attempt-timeout", "121"),
            ("--storm-parts", "storm,nope"),
            ("--storm-parts", ""),
        ] {
            let a = Args::try_parse_from(["wsgate-bench", flag, bad]).unwrap();
            assert!(storm_plan(&a, 9000).is_err(), "{flag} {bad}");
        }
    }

    #[test]
    fn drain_is_named_not_part_of_all_and_its_flags_parse() {
        let p = |s| parse_list(s, &Scenario::ALL, Scenario::parse).unwrap();
        assert!(!p("all").contains(&Scenario::Drain));
        assert_eq!(p("drain"), vec![Scenario::Drain]);
        let a = Args::try_parse_from(["wsgate-bench", "--scenario", "drain"]).unwrap();
        let plan = drain_plan(&a, 9000).unwrap();
        assert_eq!(plan.clients, 5000);
        assert_eq!(plan.spreads, vec![Duration::from_secs(30), Duration::ZERO]);
        assert_eq!(plan.grace, Duration::from_secs(60));
        assert_eq!((plan.jitter, plan.runs), (Duration::ZERO, 2));
        let a = Args::try_parse_from([
            "wsgate-bench",
            "--drain-clients",
            "200",
            "--drain-spreads",
            "5, 0.5,5",
            "--drain-grace",
            "10",
            "--drain-jitter-ms",
            "100",
        ])
        .unwrap();
        let plan = drain_plan(&a, 9000).unwrap();
        assert_eq!(plan.clients, 200);
        assert_eq!(
            plan.spreads,
            vec![Duration::from_secs(5), Duration::from_millis(500)]
        );
        assert_eq!(plan.grace, Duration::from_secs(10));
        assert_eq!(plan.jitter, Duration::from_millis(100));
        assert!(drain_plan(&a, 199).is_err());
        for (flag, bad) in [
            ("--drain-clients", "0"),
            ("--drain-spreads", "x"),
            ("--drain-spreads", "30,-1"),
            ("--drain-spreads", "601"),
            ("--drain-spreads", ""),
            ("--drain-grace", "0"),
        ] {
            let a = Args::try_parse_from(["wsgate-bench", &format!("{flag}={bad}")]).unwrap();
            assert!(drain_plan(&a, 9000).is_err(), "{flag} {bad}");
        }
    }

    #[test]
    fn the_tls_group_names_the_tls_load_scenarios_none_in_all() {
        let p = |s: &str| {
            parse_list(&Scenario::expand_groups(s), &Scenario::ALL, Scenario::parse).unwrap()
        };
        let tls = p("tls");
        let names: Vec<&str> = tls.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "wss64",
                "wss16k",
                "wss1m",
                "tls_handshake",
                "tls_resume",
                "https",
                "h2",
                "wss16k_tls_backend"
            ]
        );
        let all = p("all");
        assert_eq!(all, Scenario::ALL.to_vec());
        assert!(
            tls.iter()
                .all(|s| !all.contains(s) && s.uses_tls() && !s.is_idle())
        );
        assert!(!tls.contains(&Scenario::IdleTls) && !tls.contains(&Scenario::H2M10));
        // Groups mix with names, without repeats.
        let mixed = p("echo64,tls,wss64,h2_m10");
        assert_eq!(mixed.len(), 1 + 8 + 1);
        assert_eq!(mixed[0], Scenario::Echo64);
        assert_eq!(mixed.last(), Some(&Scenario::H2M10));
        assert_eq!(p("all,tls").len(), 6 + 8);
        // What each needs of the proxies.
        assert!(Scenario::Wss16kTlsBackend.uses_tls_backend());
        assert!(Scenario::Wss16kTlsBackend.uses_tls());
        assert!(Scenario::H2.offers_h2() && !Scenario::H2.uses_h2());
        assert!(Scenario::IdleH2.offers_h2() && !Scenario::Https.offers_h2());
        assert_eq!(Scenario::H2.h2load_streams(), Some(1));
        assert_eq!(Scenario::H2M10.h2load_streams(), Some(10));
        assert!(Scenario::H2M10.is_tls_load() && !Scenario::IdleTls.is_tls_load());
    }

    #[test]
    fn tls_key_defaults_to_ecdsa_and_takes_rsa2048() {
        let a = Args::try_parse_from(["wsgate-bench"]).unwrap();
        assert_eq!(a.tls_key, KeyType::Ecdsa);
        let a = Args::try_parse_from(["wsgate-bench", "--tls-key", "rsa2048"]).unwrap();
        assert_eq!(a.tls_key, KeyType::Rsa2048);
        assert!(Args::try_parse_from(["wsgate-bench", "--tls-key", "rsa4096"]).is_err());
    }

    #[test]
    fn idle_tls_is_named_not_part_of_all() {
        let p = |s| parse_list(s, &Scenario::ALL, Scenario::parse).unwrap();
        assert!(!p("all").contains(&Scenario::IdleTls));
        assert_eq!(p("idle,idle_tls"), vec![Scenario::Idle, Scenario::IdleTls]);
        let all_tls = p("all,idle_tls");
        assert_eq!(all_tls.len(), Scenario::ALL.len() + 1);
        assert_eq!(all_tls.last(), Some(&Scenario::IdleTls));
        assert!(Scenario::IdleTls.is_idle() && Scenario::IdleTls.uses_tls());
        assert!(!Scenario::Idle.uses_tls());
    }
}
