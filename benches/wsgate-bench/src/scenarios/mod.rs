//! The scenarios. Each measures one target and returns an [`Outcome`]; the
//! caller turns it into a result record.

pub mod drain;
pub mod echo;
pub mod h2load;
pub mod handshake;
pub mod http;
pub mod idle;
pub mod storm;

use std::collections::BTreeMap;
use std::fmt;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::tls::Negotiated;

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
    /// `echo64` over TLS (client ↔ proxy `wss://`, proxy ↔ backend plain);
    /// this and the rest are the `tls` group ([`Scenario::TLS`]), not part of `all`.
    Wss64,
    /// `echo16k` over TLS.
    Wss16k,
    /// `echo1m` over TLS.
    Wss1m,
    /// `handshake` over TLS, every handshake full (no resumption), closed
    /// with close_notify.
    TlsHandshake,
    /// `tls_handshake` with a session cache per loop: resumed handshakes,
    /// counted.
    TlsResume,
    /// `http` over TLS (HTTP/1.1 keep-alive; wrk).
    Https,
    /// HTTPS GET over HTTP/2 with h2load, one stream at a time per connection.
    H2,
    /// As `h2`, ten streams at a time per connection; not in the `tls` group.
    H2M10,
    /// `wss16k` to the proxy's route to its TLS backends: the proxy
    /// decrypts and encrypts again.
    Wss16kTlsBackend,
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
    /// features of wsgate alone, with wsgate processes of their own. The TLS
    /// load scenarios (the `tls` group and `h2_m10`) need the TLS listener
    /// too (`h2` and `h2_m10` h2load, `wss16k_tls_backend` the TLS backends)
    /// and have no `direct` figure.
    pub const OPT_IN: [Scenario; 14] = [
        Scenario::IdleTls,
        Scenario::IdleH2,
        Scenario::IdleTlsBackend,
        Scenario::Storm,
        Scenario::Drain,
        Scenario::Wss64,
        Scenario::Wss16k,
        Scenario::Wss1m,
        Scenario::TlsHandshake,
        Scenario::TlsResume,
        Scenario::Https,
        Scenario::H2,
        Scenario::H2M10,
        Scenario::Wss16kTlsBackend,
    ];

    /// The group `tls` (`--scenario tls`): the proxies terminating TLS under
    /// load. Not part of `all`; `idle_tls` and `h2_m10` are named apart.
    pub const TLS: [Scenario; 8] = [
        Scenario::Wss64,
        Scenario::Wss16k,
        Scenario::Wss1m,
        Scenario::TlsHandshake,
        Scenario::TlsResume,
        Scenario::Https,
        Scenario::H2,
        Scenario::Wss16kTlsBackend,
    ];

    /// A `--scenario` list with the group name `tls` expanded to its
    /// scenarios' names (`all` is expanded by the list parser).
    pub fn expand_groups(list: &str) -> String {
        list.split(',')
            .map(|w| {
                if w.trim() == "tls" {
                    Scenario::TLS.map(Scenario::name).join(",")
                } else {
                    w.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }

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
            Scenario::Wss64 => "wss64",
            Scenario::Wss16k => "wss16k",
            Scenario::Wss1m => "wss1m",
            Scenario::TlsHandshake => "tls_handshake",
            Scenario::TlsResume => "tls_resume",
            Scenario::Https => "https",
            Scenario::H2 => "h2",
            Scenario::H2M10 => "h2_m10",
            Scenario::Wss16kTlsBackend => "wss16k_tls_backend",
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
        matches!(self, Scenario::IdleTls | Scenario::IdleH2) || self.is_tls_load()
    }

    /// One of the TLS load scenarios (the `tls` group and `h2_m10`): each
    /// record says what was negotiated (a probe, or h2load's own report).
    pub fn is_tls_load(self) -> bool {
        Scenario::TLS.contains(&self) || self == Scenario::H2M10
    }

    /// The proxy talks TLS to the backends (the TLS echo backends, reached
    /// through a pool of their own).
    pub fn uses_tls_backend(self) -> bool {
        matches!(self, Scenario::IdleTlsBackend | Scenario::Wss16kTlsBackend)
    }

    /// The proxies' TLS listener must offer `h2` by ALPN.
    pub fn offers_h2(self) -> bool {
        matches!(self, Scenario::IdleH2 | Scenario::H2 | Scenario::H2M10)
    }

    /// Load made by h2load, with this many streams at a time per connection (`-m`).
    pub fn h2load_streams(self) -> Option<u32> {
        match self {
            Scenario::H2 => Some(1),
            Scenario::H2M10 => Some(10),
            _ => None,
        }
    }

    /// Clients open WebSockets over HTTP/2 (ALPN `h2`, RFC 8441) on the
    /// proxy's TLS listener.
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
            Scenario::Echo64
            | Scenario::Echo16k
            | Scenario::Echo1m
            | Scenario::Wss64
            | Scenario::Wss16k
            | Scenario::Wss1m
            | Scenario::Wss16kTlsBackend => "msg",
            Scenario::Handshake | Scenario::TlsHandshake | Scenario::TlsResume => "handshake",
            Scenario::Idle | Scenario::IdleTls | Scenario::IdleTlsBackend => "conn",
            Scenario::IdleH2 => "tunnel",
            Scenario::Http | Scenario::Https | Scenario::H2 | Scenario::H2M10 => "req",
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
    /// Idle scenarios: the proxy's RSS at the end of the hold, just before the echo check, and the
    /// growth per connection then (after what the proxy does with connections that stay quiet, such
    /// as wsgate's park).
    pub rss_held_bytes: Option<u64>,
    pub rss_per_conn_held_bytes: Option<f64>,
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
    /// The TLS load scenarios: what was negotiated, handshake kinds, closes.
    pub tls: Option<TlsStats>,
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

/// What a TLS load scenario's record says about TLS (the certificate's key
/// type is the record's `tls_key`). Absent figures were not measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TlsStats {
    /// Who made the measured TLS sessions: `rustls` (this tool), `wrk
    /// (OpenSSL)`, `h2load (OpenSSL)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// What the client and the proxy negotiated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negotiated: Option<Negotiated>,
    /// Who saw `negotiated`: `rustls probe` (one connection with the load's
    /// rustls client config, made before the measurement) or `h2load` (its
    /// own report of the run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negotiated_by: Option<String>,
    /// `tls_handshake`, `tls_resume`: the counted ops' handshakes, full
    /// (with a HelloRetryRequest counted in `handshakes_hrr` too) and resumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshakes_full: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshakes_hrr: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshakes_resumed: Option<u64>,
    /// `tls_handshake`, `tls_resume`: after the client's close_notify, the
    /// proxy's close_notify came (`proxy_close_notify`) or the session ended
    /// otherwise (TCP closed without it, a reset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_close_notify: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_close_unclean: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_unclean_close: Option<String>,
    /// `wss16k_tls_backend`: the TLS sessions the TLS echo backends accepted
    /// from the proxy during the measurement, by what they negotiated
    /// (`TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519`), and how many were resumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_sessions: Option<BTreeMap<String, u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_resumed: Option<u64>,
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
