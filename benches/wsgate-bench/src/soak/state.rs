//! What the soak's tasks share within one phase: the chaos state every tunnel
//! watches (backend epochs, vanish rounds, drain) and the counters they all
//! report into. Failures are counted by kind, with the first few described in
//! full, so that a report says precisely what went wrong and where.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

/// Failure kinds, by what they break; the checks select by these prefixes.
pub const F_MSG: &str = "message";
pub const F_KILL: &str = "killed-backend tunnel";
pub const F_END: &str = "tunnel ended";
pub const F_CONNECT: &str = "tunnel connect";
pub const F_HS: &str = "short handshake";
pub const F_DRAIN: &str = "drain";
pub const F_SETUP: &str = "soak";

/// Failure descriptions kept in full.
const SAMPLES: usize = 25;

#[derive(Clone, Debug)]
pub struct Chaos {
    /// Per backend: even while up, odd while killed. Raised before a kill
    /// takes effect and again once the backend listens anew, so a tunnel
    /// that sees its backend's epoch move knows it was on the dying one.
    pub epochs: Vec<u64>,
    /// Raised every few seconds; each tunnel decides from (its id, round)
    /// whether it vanishes now.
    pub vanish_round: u64,
    /// The phase is over: tunnels close (Close handshake) and stop.
    pub draining: bool,
}

pub struct Shared {
    pub chaos: watch::Sender<Chaos>,
    pub stats: Stats,
    pub t0: Instant,
    /// Milliseconds after `t0` of the last backend restart (u64::MAX: none).
    last_restart_ms: AtomicU64,
    /// After a restart, wsgate may keep the backend ejected this long.
    outage_grace: Duration,
}

impl Shared {
    pub fn new(backends: usize, outage_grace: Duration) -> Shared {
        let (chaos, _) = watch::channel(Chaos {
            epochs: vec![0; backends],
            vanish_round: 0,
            draining: false,
        });
        Shared {
            chaos,
            stats: Stats::new(),
            t0: Instant::now(),
            last_restart_ms: AtomicU64::new(u64::MAX),
            outage_grace,
        }
    }

    pub fn epochs(&self) -> Vec<u64> {
        self.chaos.borrow().epochs.clone()
    }

    /// Marks backend `i` killed (before the kill takes effect).
    pub fn mark_killed(&self, i: usize) {
        self.chaos.send_modify(|c| {
            if c.epochs[i] % 2 == 0 {
                c.epochs[i] += 1;
            }
        });
    }

    /// Marks backend `i` up again (after it listens).
    pub fn mark_restarted(&self, i: usize) {
        self.last_restart_ms
            .store(self.t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.chaos.send_modify(|c| {
            if c.epochs[i] % 2 == 1 {
                c.epochs[i] += 1;
            }
        });
    }

    /// A backend is down now, or came back so recently that wsgate may still
    /// hold it ejected: a 502/503 is then a legitimate answer.
    pub fn in_outage(&self) -> bool {
        if self.chaos.borrow().epochs.iter().any(|e| e % 2 == 1) {
            return true;
        }
        let last = self.last_restart_ms.load(Ordering::Relaxed);
        last != u64::MAX
            && self.t0.elapsed().as_millis() as u64
                <= last.saturating_add(self.outage_grace.as_millis() as u64)
    }

    /// Seconds since the phase began, for failure descriptions.
    pub fn at(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
}

/// Adds one to a counter.
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub fn bump_by(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Counters of one phase. Atomics: the load is a few thousand events a second.
pub struct Stats {
    // Long-lived tunnels.
    pub lives: AtomicU64,
    pub open: AtomicI64,
    pub msgs_sent: AtomicU64,
    pub msgs_echoed: AtomicU64,
    pub lost_surviving: AtomicU64,
    pub duplicated: AtomicU64,
    pub reordered: AtomicU64,
    pub corrupt: AtomicU64,
    pub unechoed_cut: AtomicU64,
    pub expected_1014: AtomicU64,
    pub got_1014: AtomicU64,
    pub vanished_rst: AtomicU64,
    pub vanished_fin: AtomicU64,
    pub drained_clean: AtomicU64,
    pub connect_refused_outage: AtomicU64,
    pub connect_cut_by_kill: AtomicU64,
    // Short handshakes.
    pub hs_attempted: AtomicU64,
    pub hs_ok: AtomicU64,
    pub hs_refused_outage: AtomicU64,
    pub hs_cut_by_kill: AtomicU64,
    // Chaos.
    pub kills_fin: AtomicU64,
    pub kills_rst: AtomicU64,
    pub reloads_sent: AtomicU64,
    failures: Mutex<BTreeMap<String, u64>>,
    samples: Mutex<Vec<String>>,
    rtt_us: Mutex<Histogram<u64>>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            lives: AtomicU64::new(0),
            open: AtomicI64::new(0),
            msgs_sent: AtomicU64::new(0),
            msgs_echoed: AtomicU64::new(0),
            lost_surviving: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            reordered: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            unechoed_cut: AtomicU64::new(0),
            expected_1014: AtomicU64::new(0),
            got_1014: AtomicU64::new(0),
            vanished_rst: AtomicU64::new(0),
            vanished_fin: AtomicU64::new(0),
            drained_clean: AtomicU64::new(0),
            connect_refused_outage: AtomicU64::new(0),
            connect_cut_by_kill: AtomicU64::new(0),
            hs_attempted: AtomicU64::new(0),
            hs_ok: AtomicU64::new(0),
            hs_refused_outage: AtomicU64::new(0),
            hs_cut_by_kill: AtomicU64::new(0),
            kills_fin: AtomicU64::new(0),
            kills_rst: AtomicU64::new(0),
            reloads_sent: AtomicU64::new(0),
            failures: Mutex::new(BTreeMap::new()),
            samples: Mutex::new(Vec::new()),
            // 1 µs .. 10 min, 2 significant digits: one shared histogram.
            rtt_us: Mutex::new(
                Histogram::new_with_bounds(1, 600_000_000, 2)
                    .expect("static histogram bounds are valid"),
            ),
        }
    }

    /// Counts one failure of kind `kind: what`, and keeps the first few
    /// descriptions (`detail` is only built for those).
    pub fn fail(&self, kind: &str, what: &str, detail: impl FnOnce() -> String) {
        let key = format!("{kind}: {what}");
        let first = {
            let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            let n = f.entry(key.clone()).or_insert(0);
            *n += 1;
            *n == 1
        };
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if s.len() < SAMPLES || first {
            s.push(format!("{key} ({})", detail()));
        }
    }

    /// Describes a message-level failure (counted in its own counter).
    pub fn sample(&self, what: String) {
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if s.len() < SAMPLES {
            s.push(what);
        }
    }

    pub fn record_rtt(&self, d: Duration) {
        let mut h = self.rtt_us.lock().unwrap_or_else(|p| p.into_inner());
        h.saturating_record((d.as_micros() as u64).max(1));
    }

    pub fn failures(&self) -> BTreeMap<String, u64> {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn samples(&self) -> Vec<String> {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// (p50, p99, max) echo round trip in µs.
    pub fn rtt(&self) -> (Option<u64>, Option<u64>, Option<u64>) {
        let h = self.rtt_us.lock().unwrap_or_else(|p| p.into_inner());
        if h.is_empty() {
            return (None, None, None);
        }
        (
            Some(h.value_at_quantile(0.5)),
            Some(h.value_at_quantile(0.99)),
            Some(h.max()),
        )
    }

    pub fn counts(&self) -> Counts {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (rtt_p50_us, rtt_p99_us, rtt_max_us) = self.rtt();
        Counts {
            tunnel_lives: g(&self.lives),
            msgs_sent: g(&self.msgs_sent),
            msgs_echoed: g(&self.msgs_echoed),
            lost_on_surviving: g(&self.lost_surviving),
            duplicated: g(&self.duplicated),
            reordered: g(&self.reordered),
            corrupt: g(&self.corrupt),
            unechoed_on_cut_tunnels: g(&self.unechoed_cut),
            expected_1014: g(&self.expected_1014),
            received_1014: g(&self.got_1014),
            vanished_rst: g(&self.vanished_rst),
            vanished_fin: g(&self.vanished_fin),
            drained_clean: g(&self.drained_clean),
            connect_refused_in_outage: g(&self.connect_refused_outage),
            connect_cut_by_kill: g(&self.connect_cut_by_kill),
            hs_attempted: g(&self.hs_attempted),
            hs_ok: g(&self.hs_ok),
            hs_refused_in_outage: g(&self.hs_refused_outage),
            hs_cut_by_kill: g(&self.hs_cut_by_kill),
            kills_fin: g(&self.kills_fin),
            kills_rst: g(&self.kills_rst),
            reloads_sent: g(&self.reloads_sent),
            rtt_p50_us,
            rtt_p99_us,
            rtt_max_us,
        }
    }
}

/// A phase's counters, as reported.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counts {
    pub tunnel_lives: u64,
    pub msgs_sent: u64,
    pub msgs_echoed: u64,
    pub lost_on_surviving: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub corrupt: u64,
    pub unechoed_on_cut_tunnels: u64,
    pub expected_1014: u64,
    pub received_1014: u64,
    pub vanished_rst: u64,
    pub vanished_fin: u64,
    pub drained_clean: u64,
    pub connect_refused_in_outage: u64,
    pub connect_cut_by_kill: u64,
    pub hs_attempted: u64,
    pub hs_ok: u64,
    pub hs_refused_in_outage: u64,
    pub hs_cut_by_kill: u64,
    pub kills_fin: u64,
    pub kills_rst: u64,
    pub reloads_sent: u64,
    pub rtt_p50_us: Option<u64>,
    pub rtt_p99_us: Option<u64>,
    pub rtt_max_us: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outage_follows_epochs_and_grace() {
        let s = Shared::new(3, Duration::from_millis(200));
        assert!(!s.in_outage());
        s.mark_killed(1);
        assert!(s.in_outage());
        assert_eq!(s.epochs(), vec![0, 1, 0]);
        s.mark_restarted(1);
        assert_eq!(s.epochs(), vec![0, 2, 0]);
        assert!(s.in_outage(), "within the grace after a restart");
        std::thread::sleep(Duration::from_millis(300));
        assert!(!s.in_outage());
    }

    #[test]
    fn failures_are_counted_by_kind() {
        let s = Stats::new();
        s.fail(F_END, "Close 1001", || "a".into());
        s.fail(F_END, "Close 1001", || "b".into());
        s.fail(F_HS, "timeout", || "c".into());
        let f = s.failures();
        assert_eq!(f.get("tunnel ended: Close 1001"), Some(&2));
        assert_eq!(s.samples().len(), 3);
    }
}
