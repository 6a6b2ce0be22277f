//! The scenarios. Each measures one target and returns an [`Outcome`]; the
//! caller turns it into a result record.

pub mod drain;
pub mod echo;
pub mod handshake;
pub mod http;
pub mod idle;
pub mod storm;

use std::fmt;

use hdrhistogram::Histogram;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Echo64,
    Echo16k,
    Echo1m,
    Handshake,
    Idle,
    Http,
    /// `idle` over TLS; not part of `all` (see [`Scenario::OPT_IN`]).
    IdleTls,
    /// `idle` as WebSockets over HTTP/2 over TLS (RFC 8441), several per
    /// connection; not part of `all`.
    IdleH2,
    /// `idle` over plain `ws://` to the proxy, which talks TLS to the backends;
    /// not part of `all`.
    IdleTlsBackend,
    /// A reconnect storm through wsgate with and without a listener's
    /// `handshake_rate`, and the handshake rate with admission limits that
    /// are never hit against none (`storm.rs`); wsgate only, not part of `all`.
    Storm,
    /// A backend drained through wsgate's admin API with its tunnels' Close
    /// 1012 spread over a window, against an instant cut: the reconnects the
    /// remaining backend sees (`drain.rs`); wsgate only, not part of `all`.
    Drain,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::Echo64,
        Scenario::Echo16k,
        Scenario::Echo1m,
        Scenario::Handshake,
        Scenario::Idle,
        Scenario::Http,
    ];

    /// Scenarios run only when named: `idle_tls` and `idle_h2` need a TLS
    /// listener on every proxy, `idle_tls_backend` TLS backends and a second
    /// pool, and none has a `direct` figure (`idle_h2` has no nginx one
    /// either), so the default suite (`all`, whose results BENCHMARKS.md and
    /// chart.py compare) stays as it was. `storm` and `drain` measure
    /// features of wsgate alone, with wsgate processes of their own.
    pub const OPT_IN: [Scenario; 5] = [
        Scenario::IdleTls,
        Scenario::IdleH2,
        Scenario::IdleTlsBackend,
        Scenario::Storm,
        Scenario::Drain,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Echo64 => "echo64",
            Scenario::Echo16k => "echo16k",
            Scenario::Echo1m => "echo1m",
            Scenario::Handshake => "handshake",
            Scenario::Idle => "idle",
            Scenario::Http => "http",
            Scenario::IdleTls => "idle_tls",
            Scenario::IdleH2 => "idle_h2",
            Scenario::IdleTlsBackend => "idle_tls_backend",
            Scenario::Storm => "storm",
            Scenario::Drain => "drain",
        }
    }

    pub fn parse(s: &str) -> Option<Scenario> {
        Scenario::ALL
            .into_iter()
            .chain(Scenario::OPT_IN)
            .find(|k| k.name() == s)
    }

    /// Idle connections held from a freshly started proxy, measured in memory
    /// per connection.
    pub fn is_idle(self) -> bool {
        matches!(
            self,
            Scenario::Idle | Scenario::IdleTls | Scenario::IdleH2 | Scenario::IdleTlsBackend
        )
    }

    /// Clients connect to the proxy's TLS listener.
    pub fn uses_tls(self) -> bool {
        matches!(self, Scenario::IdleTls | Scenario::IdleH2)
    }

    /// The proxy talks TLS to the backends (the TLS echo backends, reached
    /// through a pool of their own).
    pub fn uses_tls_backend(self) -> bool {
        self == Scenario::IdleTlsBackend
    }

    /// Clients speak HTTP/2 (ALPN `h2`) on the proxy's TLS listener.
    pub fn uses_h2(self) -> bool {
        self == Scenario::IdleH2
    }

    /// Whether a scenario named `name` (as in a record) is an idle one.
    pub fn is_idle_name(name: &str) -> bool {
        Scenario::parse(name).is_some_and(Scenario::is_idle)
    }

    /// What one op is, for progress lines.
    pub fn unit(self) -> &'static str {
        match self {
            Scenario::Echo64 | Scenario::Echo16k | Scenario::Echo1m => "msg",
            Scenario::Handshake => "handshake",
            Scenario::Idle | Scenario::IdleTls | Scenario::IdleTlsBackend => "conn",
            Scenario::IdleH2 => "tunnel",
            Scenario::Http => "req",
            Scenario::Storm | Scenario::Drain => "client",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Latency histogram in microseconds, 1 µs .. 10 min, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds are valid")
}

/// What one measurement of one target produced.
#[derive(Debug, Default)]
pub struct Outcome {
    pub ops: u64,
    pub duration_s: f64,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub max_us: Option<u64>,
    pub errors: u64,
    pub proxy_cpu_s: Option<f64>,
    pub connections: u64,
    pub message_bytes: Option<u64>,
    pub rss_before_bytes: Option<u64>,
    pub rss_after_bytes: Option<u64>,
    pub rss_after_close_bytes: Option<u64>,
    pub rss_per_conn_bytes: Option<f64>,
    /// `idle_h2`: WebSockets asked for per HTTP/2 connection.
    pub h2_streams: Option<u64>,
    /// `idle_h2`: HTTP/2 connections that carried the held WebSockets.
    pub h2_conns: Option<u64>,
    /// `idle_h2`: RSS growth per HTTP/2 connection (all its streams included).
    pub rss_per_h2_conn_bytes: Option<f64>,
    /// `storm`, `drain`: which configuration of the target was measured
    /// (`no_limit`, `gate`, `no_limits`, `limits`; `spread_30s`, `spread_0s`).
    pub variant: Option<String>,
    /// `storm`: the reconnect storm's own figures.
    pub storm: Option<storm::StormStats>,
    /// `drain`: the drain's own figures.
    pub drain: Option<drain::DrainStats>,
    /// The first error seen, for the progress line.
    pub first_error: Option<String>,
    pub note: Option<String>,
}

impl Outcome {
    pub fn set_latency(&mut self, h: &Histogram<u64>) {
        if h.is_empty() {
            return;
        }
        self.p50_us = Some(h.value_at_quantile(0.50));
        self.p99_us = Some(h.value_at_quantile(0.99));
        self.max_us = Some(h.max());
    }

    pub fn note_error(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }
}

/// Per-task tallies merged at the end (no shared locks on the hot path).
pub struct Tally {
    pub ops: u64,
    pub hist: Histogram<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl Tally {
    pub fn new() -> Self {
        Tally {
            ops: 0,
            hist: new_hist(),
            errors: 0,
            first_error: None,
        }
    }

    pub fn error(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }

    pub fn record_us(&mut self, us: u64) {
        self.ops += 1;
        self.hist.saturating_record(us.max(1));
    }

    pub fn merge_into(self, total: &mut Tally) {
        total.ops += self.ops;
        total.errors += self.errors;
        let _ = total.hist.add(&self.hist);
        if total.first_error.is_none() {
            total.first_error = self.first_error;
        }
    }
}
