//! A backend's drain: why it drains (several causes may hold at once: the config, an operator, DNS, a
//! reload that removed it), over which spread its live tunnels are to close, and the signal its tunnels
//! listen to.
//!
//! The signal is a `CancellationToken`, a child of the gateway's shutdown token. It is cancelled, and a
//! fresh one put in its place, whenever what the backend's tunnels must do changes (a drain with a spread
//! begins or is given a new spread, the drain ends, or the gateway shuts down): a tunnel that hears it
//! asks for the verdict again (`Backend::drain_delay`) and listens to the fresh one. A tunnel holds no
//! state of the drain but its own close moment.
//!
//! Each signal has an epoch, which moves on before the signal is replaced and cancelled: a tunnel reads
//! it (an atomic, without the drain's lock) at every wake-up, and polls its signal, which takes the
//! token's locks, only when the epoch is no longer its signal's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

/// Why a backend drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainCause {
    /// `drain = true` in the config.
    Config,
    /// An operator, through the admin API.
    Admin,
    /// Its record has been missing from DNS for `remove_after`.
    Dns,
    /// A reload removed it from the config (or its DNS entry).
    Removed,
}

impl DrainCause {
    const ALL: [DrainCause; 4] = [
        DrainCause::Config,
        DrainCause::Admin,
        DrainCause::Dns,
        DrainCause::Removed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DrainCause::Config => "config",
            DrainCause::Admin => "admin",
            DrainCause::Dns => "dns",
            DrainCause::Removed => "removed",
        }
    }
}

/// A drain as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DrainStatus {
    pub causes: Vec<&'static str>,
    /// `None`: tunnels finish on their own.
    pub spread_ms: Option<u64>,
    pub since_unix_ms: u64,
    /// The admin token's name, for a drain an operator asked for.
    pub by: Option<String>,
}

/// One cause of a drain: since when, and over which spread its tunnels close (`None`: they finish on
/// their own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Held {
    since: (Instant, SystemTime),
    spread: Option<Duration>,
}

#[derive(Debug)]
pub(super) struct Drain {
    /// Each cause by `DrainCause as usize`: a drain lasts while any holds.
    held: [Option<Held>; 4],
    by: Option<String>,
    signal: CancellationToken,
    /// The current signal's epoch; shared with the backend, which reads it without this lock.
    epoch: Arc<AtomicU64>,
    parent: CancellationToken,
}

impl Drain {
    pub(super) fn new(parent: &CancellationToken) -> Drain {
        Drain {
            held: [None; 4],
            by: None,
            signal: parent.child_token(),
            epoch: Arc::default(),
            parent: parent.clone(),
        }
    }

    pub(super) fn is_draining(&self) -> bool {
        self.held.iter().any(Option::is_some)
    }

    pub(super) fn has(&self, cause: DrainCause) -> bool {
        self.held[cause as usize].is_some()
    }

    /// The current signal and its epoch.
    pub(super) fn signal(&self) -> (CancellationToken, u64) {
        (self.signal.clone(), self.epoch.load(Ordering::Acquire))
    }

    /// The epoch counter, for the backend to read without this lock.
    pub(super) fn epoch(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.epoch)
    }

    /// The drain in force: an operator's if there is one (their word wins, a spread of `none`
    /// included), else the cause whose window ends first (one with a spread before those without).
    fn effective(&self) -> Option<Held> {
        if let Some(admin) = self.held[DrainCause::Admin as usize] {
            return Some(admin);
        }
        let held = self.held.iter().flatten();
        held.clone()
            .filter_map(|h| h.spread.map(|spread| (h.since.0 + spread, h)))
            .min_by_key(|(end, _)| *end)
            .map(|(_, h)| h)
            .or_else(|| held.min_by_key(|h| h.since.0))
            .copied()
    }

    /// Starts `cause` with `spread` (an operator's drain restarts its own: their latest word; another
    /// cause already held keeps its start). Tunnels are told when the drain in force changes.
    pub(super) fn add(&mut self, cause: DrainCause, spread: Option<Duration>, by: Option<&str>) {
        let before = self.effective();
        let slot = &mut self.held[cause as usize];
        if cause == DrainCause::Admin || slot.is_none() {
            *slot = Some(Held {
                since: (Instant::now(), SystemTime::now()),
                spread,
            });
        }
        if cause == DrainCause::Admin {
            self.by = by.map(str::to_string);
        }
        self.tell_if_changed(before);
    }

    /// Ends `cause`; the drain ends when no cause is left. Returns whether it still drains.
    pub(super) fn remove(&mut self, cause: DrainCause) -> bool {
        let before = self.effective();
        self.held[cause as usize] = None;
        if cause == DrainCause::Admin {
            self.by = None;
        }
        self.tell_if_changed(before);
        self.is_draining()
    }

    /// How long until a tunnel is to close: a uniformly random moment within the spread in force,
    /// counted from its start (a tunnel that hears late closes at once if its moment has passed).
    /// `None` while not draining, or draining with tunnels left to finish.
    pub(super) fn delay(&self) -> Option<Duration> {
        let held = self.effective()?;
        let at = held.since.0 + held.spread?.mul_f64(fastrand::f64());
        Some(at.saturating_duration_since(Instant::now()))
    }

    pub(super) fn status(&self) -> Option<DrainStatus> {
        let held = self.effective()?;
        Some(DrainStatus {
            causes: DrainCause::ALL
                .iter()
                .filter(|c| self.has(**c))
                .map(|c| c.label())
                .collect(),
            spread_ms: held.spread.map(|s| s.as_millis() as u64),
            since_unix_ms: held
                .since
                .1
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            by: self.by.clone(),
        })
    }

    /// What this drain holds, for another object of the same server to take (`mirror`).
    pub(super) fn snapshot(&self) -> ([Option<Held>; 4], Option<String>) {
        (self.held, self.by.clone())
    }

    /// Takes the causes of another object's drain (`snapshot`), telling tunnels if that changes what
    /// they must do.
    pub(super) fn mirror(&mut self, (held, by): ([Option<Held>; 4], Option<String>)) {
        let before = self.effective();
        self.held = held;
        self.by = by;
        self.tell_if_changed(before);
    }

    /// The operator's drain, to carry over to the backend that replaces this one on a reload.
    pub(super) fn admin(&self) -> Option<(Option<Duration>, Option<String>)> {
        self.held[DrainCause::Admin as usize].map(|h| (h.spread, self.by.clone()))
    }

    /// Tells the tunnels when the drain in force is not what it was: a drain with a spread began or
    /// changed, or the drain ended. A drain without a spread that begins or ends changes nothing for
    /// them.
    fn tell_if_changed(&mut self, before: Option<Held>) {
        let closes = |h: Option<Held>| h.and_then(|h| h.spread.map(|s| (h.since.0, s)));
        if closes(before) != closes(self.effective()) {
            // The epoch first: a tunnel that sees it unchanged may skip its signal, so the signal must
            // not be cancelled before the epoch has moved.
            self.epoch.fetch_add(1, Ordering::Release);
            let old = std::mem::replace(&mut self.signal, self.parent.child_token());
            old.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `signal` has been cancelled, checking that its epoch has moved on exactly then (a tunnel
    /// skips a signal whose epoch is still the current one).
    fn told(d: &Drain, signal: &(CancellationToken, u64)) -> bool {
        let cancelled = signal.0.is_cancelled();
        let moved = d.epoch.load(Ordering::Acquire) != signal.1;
        assert_eq!(
            cancelled, moved,
            "the epoch moves when, and only when, tunnels are told"
        );
        cancelled
    }

    #[test]
    fn causes_add_up_and_the_drain_ends_with_the_last() {
        let parent = CancellationToken::new();
        let mut d = Drain::new(&parent);
        let first = d.signal();
        d.add(DrainCause::Config, None, None);
        assert!(d.is_draining());
        assert!(
            !told(&d, &first),
            "a drain without spread leaves tunnels be"
        );
        assert_eq!(d.delay(), None);
        d.add(DrainCause::Dns, Some(Duration::from_secs(10)), None);
        assert!(told(&d, &first), "a spread is given: tunnels are told");
        let delay = d.delay().expect("a moment");
        assert!(delay <= Duration::from_secs(10));
        let second = d.signal();
        assert!(!told(&d, &second));
        assert!(d.remove(DrainCause::Config));
        assert!(
            !told(&d, &second),
            "still draining for DNS: nothing changes"
        );
        assert!(!d.remove(DrainCause::Dns));
        assert!(told(&d, &second), "the drain ended: tunnels are told");
        assert_eq!(d.status(), None);
    }

    #[test]
    fn an_operator_restarts_the_spread_and_is_named() {
        let parent = CancellationToken::new();
        let mut d = Drain::new(&parent);
        d.add(DrainCause::Config, Some(Duration::from_secs(600)), None);
        let before = d.signal();
        d.add(DrainCause::Admin, Some(Duration::ZERO), Some("ops"));
        assert!(told(&d, &before));
        assert_eq!(d.delay(), Some(Duration::ZERO));
        let status = d.status().expect("draining");
        assert_eq!(status.causes, ["config", "admin"]);
        assert_eq!(status.spread_ms, Some(0));
        assert_eq!(status.by.as_deref(), Some("ops"));
        assert_eq!(d.admin(), Some((Some(Duration::ZERO), Some("ops".into()))));
    }

    /// An operator's drain without a spread, over a drain of DNS's with one, holds the tunnels; its
    /// undrain gives them back to DNS's window.
    #[test]
    fn each_cause_keeps_its_own_spread() {
        let parent = CancellationToken::new();
        let mut d = Drain::new(&parent);
        d.add(DrainCause::Dns, Some(Duration::from_secs(60)), None);
        assert!(d.delay().is_some());
        let dns = d.signal();
        d.add(DrainCause::Admin, None, Some("ops"));
        assert!(
            told(&d, &dns),
            "the operator's `none` is news to the tunnels"
        );
        assert_eq!(d.delay(), None);
        let admin = d.signal();
        assert!(d.remove(DrainCause::Admin));
        assert!(told(&d, &admin), "back to DNS's window: tunnels are told");
        let delay = d.delay().expect("DNS's window again");
        assert!(delay <= Duration::from_secs(60));
        let status = d.status().expect("draining");
        assert_eq!(
            (status.causes, status.spread_ms),
            (vec!["dns"], Some(60_000))
        );
    }

    #[test]
    fn shutdown_reaches_every_signal() {
        let parent = CancellationToken::new();
        let mut d = Drain::new(&parent);
        d.add(DrainCause::Admin, Some(Duration::from_secs(1)), None);
        let (signal, _) = d.signal();
        parent.cancel();
        assert!(signal.is_cancelled());
    }
}
