//! A backend's drain: why it drains (several causes may hold at once: the config, an operator, DNS, a
//! reload that removed it), over which spread its live tunnels are to close, and the signal its tunnels
//! listen to.
//!
//! The signal is a `CancellationToken`, a child of the gateway's shutdown token. It is cancelled, and a
//! fresh one put in its place, whenever what the backend's tunnels must do changes (a drain with a spread
//! begins or is given a new spread, the drain ends, or the gateway shuts down): a tunnel that hears it
//! asks for the verdict again (`Backend::drain_delay`) and listens to the fresh one. A tunnel holds no
//! state of the drain but its own close moment.

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

    fn bit(self) -> u8 {
        1 << self as u8
    }

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

#[derive(Debug)]
pub(super) struct Drain {
    causes: u8,
    /// When the drain began (its spread restarts when an operator drains again).
    since: Option<(Instant, SystemTime)>,
    spread: Option<Duration>,
    by: Option<String>,
    signal: CancellationToken,
    parent: CancellationToken,
}

impl Drain {
    pub(super) fn new(parent: &CancellationToken) -> Drain {
        Drain {
            causes: 0,
            since: None,
            spread: None,
            by: None,
            signal: parent.child_token(),
            parent: parent.clone(),
        }
    }

    pub(super) fn is_draining(&self) -> bool {
        self.causes != 0
    }

    pub(super) fn has(&self, cause: DrainCause) -> bool {
        self.causes & cause.bit() != 0
    }

    pub(super) fn signal(&self) -> CancellationToken {
        self.signal.clone()
    }

    /// Adds `cause`. An operator's drain sets the spread and restarts it (their latest word); another
    /// cause gives a spread only to a drain that had none. Tunnels are told when their verdict changes.
    pub(super) fn add(&mut self, cause: DrainCause, spread: Option<Duration>, by: Option<&str>) {
        let was = self.is_draining();
        self.causes |= cause.bit();
        let now = (Instant::now(), SystemTime::now());
        let changed = if cause == DrainCause::Admin {
            self.by = by.map(str::to_string);
            self.since = Some(now);
            self.spread = spread;
            spread.is_some() || was
        } else if !was || (self.spread.is_none() && spread.is_some()) {
            self.since = Some(now);
            self.spread = spread;
            spread.is_some() || was
        } else {
            false
        };
        if changed {
            self.tell();
        }
    }

    /// Removes `cause`; the drain ends when no cause is left. Returns whether it still drains.
    pub(super) fn remove(&mut self, cause: DrainCause) -> bool {
        if !self.has(cause) {
            return self.is_draining();
        }
        self.causes &= !cause.bit();
        if cause == DrainCause::Admin {
            self.by = None;
        }
        if !self.is_draining() {
            self.since = None;
            self.spread = None;
            self.tell();
        }
        self.is_draining()
    }

    /// How long until a tunnel is to close: a uniformly random moment within the spread, counted from
    /// the drain's start (a tunnel that hears late closes at once if its moment has passed). `None`
    /// while not draining, or draining without a spread.
    pub(super) fn delay(&self) -> Option<Duration> {
        let ((since, _), spread) = (self.since?, self.spread?);
        let at = since + spread.mul_f64(fastrand::f64());
        Some(at.saturating_duration_since(Instant::now()))
    }

    pub(super) fn status(&self) -> Option<DrainStatus> {
        let (_, wall) = self.since?;
        Some(DrainStatus {
            causes: DrainCause::ALL
                .iter()
                .filter(|c| self.has(**c))
                .map(|c| c.label())
                .collect(),
            spread_ms: self.spread.map(|s| s.as_millis() as u64),
            since_unix_ms: wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            by: self.by.clone(),
        })
    }

    /// The operator's drain, to carry over to the backend that replaces this one on a reload.
    pub(super) fn admin(&self) -> Option<(Option<Duration>, Option<String>)> {
        self.has(DrainCause::Admin)
            .then(|| (self.spread, self.by.clone()))
    }

    fn tell(&mut self) {
        let old = std::mem::replace(&mut self.signal, self.parent.child_token());
        old.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_add_up_and_the_drain_ends_with_the_last() {
        let parent = CancellationToken::new();
        let mut d = Drain::new(&parent);
        let first = d.signal();
        d.add(DrainCause::Config, None, None);
        assert!(d.is_draining());
        assert!(
            !first.is_cancelled(),
            "a drain without spread leaves tunnels be"
        );
        assert_eq!(d.delay(), None);
        d.add(DrainCause::Dns, Some(Duration::from_secs(10)), None);
        assert!(first.is_cancelled(), "a spread is given: tunnels are told");
        let delay = d.delay().expect("a moment");
        assert!(delay <= Duration::from_secs(10));
        let second = d.signal();
        assert!(!second.is_cancelled());
        assert!(d.remove(DrainCause::Config));
        assert!(
            !second.is_cancelled(),
            "still draining for DNS: nothing changes"
        );
        assert!(!d.remove(DrainCause::Dns));
        assert!(second.is_cancelled(), "the drain ended: tunnels are told");
        assert_eq!(d.status(), None);
    }

    #[test]
    fn an_operator_restarts_the_spread_and_is_named() {
        let parent = CancellationToken::new();
        let mut d = Drain::new(&parent);
        d.add(DrainCause::Config, Some(Duration::from_secs(600)), None);
        let before = d.signal();
        d.add(DrainCause::Admin, Some(Duration::ZERO), Some("ops"));
        assert!(before.is_cancelled());
        assert_eq!(d.delay(), Some(Duration::ZERO));
        let status = d.status().expect("draining");
        assert_eq!(status.causes, ["config", "admin"]);
        assert_eq!(status.spread_ms, Some(0));
        assert_eq!(status.by.as_deref(), Some("ops"));
        assert_eq!(d.admin(), Some((Some(Duration::ZERO), Some("ops".into()))));
    }

    #[test]
    fn shutdown_reaches_every_signal() {
        let parent = CancellationToken::new();
        let mut d = Drain::new(&parent);
        d.add(DrainCause::Admin, Some(Duration::from_secs(1)), None);
        let signal = d.signal();
        parent.cancel();
        assert!(signal.is_cancelled());
    }
}
