//! Short handshakes through wsgate during a phase: TCP connect → upgrade →
//! greeting → one echo → Close handshake → TCP end, paced evenly so that the
//! requested number is spread over the phase. A 502/503 while a backend is
//! down (or just back and maybe still ejected) and an attempt cut by a kill of
//! its own backend are legitimate and counted apart; anything else is a failure.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::{Instant, timeout_at};

use super::state::{F_HS, Shared, bump};
use super::wire::{self, Frame, HsError, OP_BINARY, close_code};

/// Each step (upgrade, greeting, echo, Close answer) within this.
const STEP_LIMIT: Duration = Duration::from_secs(5);
/// After the Close exchange wsgate must end TCP: its close_timeout (2 s) and a margin.
const TCP_END_LIMIT: Duration = Duration::from_secs(3);
/// Longest the loops may run past the phase's end (their last attempts).
const FINISH_LIMIT: Duration = Duration::from_secs(30);

/// Runs `total` handshakes, at most `concurrency` at a time, evenly spread
/// until `deadline`; returns when all are done (or the phase's end passed).
pub async fn run(
    addr: SocketAddr,
    total: u64,
    concurrency: usize,
    deadline: Instant,
    shared: Arc<Shared>,
) {
    if total == 0 {
        return;
    }
    let start = Instant::now();
    let spacing = deadline.saturating_duration_since(start).as_secs_f64() / total as f64;
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let next = next.clone();
            let shared = shared.clone();
            tokio::spawn(async move {
                // Bounded by `total` and by the deadline.
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return;
                    }
                    let at = start + Duration::from_secs_f64(spacing * i as f64);
                    if at >= deadline {
                        return;
                    }
                    tokio::time::sleep_until(at).await;
                    one(addr, &shared).await;
                }
            })
        })
        .collect();
    for t in tasks {
        let abort = t.abort_handle();
        if timeout_at(deadline + FINISH_LIMIT, t).await.is_err() {
            abort.abort();
        }
    }
}

/// Where an attempt failed.
enum Fail {
    Upgrade(HsError),
    Step(String),
}

async fn one(addr: SocketAddr, shared: &Shared) {
    let st = &shared.stats;
    bump(&st.hs_attempted);
    let epochs0 = shared.epochs();
    let outage0 = shared.in_outage();
    let mut backend = None;
    let result = attempt(addr, &mut backend).await;
    // A kill excuses a failure only if it hit this attempt's own backend
    // (any backend, before the greeting said which).
    let cut_by_kill = || {
        let now = shared.epochs();
        match backend {
            Some(b) => now[b] != epochs0[b],
            None => now != epochs0,
        }
    };
    let at = shared.at();
    match result {
        Ok(()) => bump(&st.hs_ok),
        Err(Fail::Upgrade(e)) if e.is_refusal() => {
            if outage0 || shared.in_outage() {
                bump(&st.hs_refused_outage);
            } else {
                st.fail(
                    F_HS,
                    &format!("{} with every backend up", e.label()),
                    || format!("at {at:.1}s"),
                );
            }
        }
        Err(_) if cut_by_kill() => bump(&st.hs_cut_by_kill),
        Err(Fail::Upgrade(e)) => st.fail(F_HS, &e.label(), || format!("at {at:.1}s")),
        Err(Fail::Step(what)) => {
            st.fail(F_HS, &what, || format!("backend {backend:?} at {at:.1}s"))
        }
    }
}

async fn attempt(addr: SocketAddr, backend: &mut Option<usize>) -> Result<(), Fail> {
    let mut conn = wire::connect(addr, STEP_LIMIT)
        .await
        .map_err(Fail::Upgrade)?;
    let step = |what: &str, f: Result<Frame, wire::Gone>| -> String {
        match f {
            Ok(Frame::Close(code, reason)) => {
                format!("{what}: Close {} {reason:?}", close_code(code))
            }
            Ok(f) => format!("{what}: unexpected {}", f.kind()),
            Err(g) => format!("{what}: {}", g.label()),
        }
    };
    let deadline = Instant::now() + STEP_LIMIT;
    match timeout_at(deadline, conn.read_frame()).await {
        Ok(Ok(Frame::Text(t))) => {
            *backend = std::str::from_utf8(&t)
                .ok()
                .and_then(|s| s.strip_prefix("backend="))
                .and_then(|n| n.parse().ok());
            if backend.is_none() {
                return Err(Fail::Step(format!(
                    "bad greeting {:?}",
                    String::from_utf8_lossy(&t)
                )));
            }
        }
        Ok(f) => return Err(Fail::Step(step("greeting", f))),
        Err(_) => return Err(Fail::Step("no greeting within 5 s".into())),
    }
    let mut payload = [0u8; 32];
    fastrand::fill(&mut payload);
    conn.send(OP_BINARY, &payload, STEP_LIMIT)
        .await
        .map_err(|g| Fail::Step(format!("sending the message: {}", g.label())))?;
    let deadline = Instant::now() + STEP_LIMIT;
    // Bounded: each turn takes a frame, or the deadline ends it.
    loop {
        match timeout_at(deadline, conn.read_frame()).await {
            Ok(Ok(Frame::Binary(b))) if b == payload => break,
            Ok(Ok(Frame::Binary(_))) => {
                return Err(Fail::Step("echo differs from the message".into()));
            }
            Ok(Ok(Frame::Ping(_) | Frame::Pong)) => {}
            Ok(f) => return Err(Fail::Step(step("echo", f))),
            Err(_) => return Err(Fail::Step("no echo within 5 s".into())),
        }
    }
    conn.send_close(1000, STEP_LIMIT)
        .await
        .map_err(|g| Fail::Step(format!("sending the Close: {}", g.label())))?;
    let deadline = Instant::now() + STEP_LIMIT;
    // Bounded as above.
    loop {
        match timeout_at(deadline, conn.read_frame()).await {
            Ok(Ok(Frame::Close(Some(1000), _))) => break,
            Ok(Ok(Frame::Ping(_) | Frame::Pong)) => {}
            Ok(f) => return Err(Fail::Step(step("Close answer", f))),
            Err(_) => return Err(Fail::Step("no Close answer within 5 s".into())),
        }
    }
    if !conn.await_tcp_end(TCP_END_LIMIT).await {
        return Err(Fail::Step("TCP left open after the Close exchange".into()));
    }
    Ok(())
}
