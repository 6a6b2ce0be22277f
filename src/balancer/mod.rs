//! Backends, pools and the choice of a backend for each new connection (docs/ARCHITECTURE.md, "Balancing and health").
//!
//! A backend's live-connection count is held by [`BackendGuard`]s: whoever proxies to a backend holds one,
//! and dropping it (however the connection ends) releases the count, so the count cannot drift.
//!
//! Policies: `least_conn` (weighted least-connections, random tie-break) and `sticky` (weighted rendezvous
//! hashing of a request key over stable backend ids, `sticky.rs`; the key comes from `affinity.rs`).
//! A backend takes new connections only while it is up by its active checks (`probe.rs`, run on a schedule
//! by the gateway), not ejected by passive failure counting, and not draining.

mod affinity;
mod least_conn;
pub mod probe;
pub mod sticky;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::header::HeaderValue;

pub use affinity::Affinity;

use crate::config::{
    BackendConfig, Config, HealthCheck, Policy, PoolConfig, ProxyProtocolOut, StickyKey,
};
use crate::upstream::{BackendTls, TlsClients};

/// One backend server. Shared by every pool generation that lists it (same id and address, reached the
/// same way), so that its live count and health survive a reload.
#[derive(Debug)]
pub struct Backend {
    /// `host:port` as written in the config.
    pub addr: String,
    /// Stable identity (the address unless the config names one).
    pub id: String,
    pub pool: String,
    /// TLS toward it (its own `tls` table or its pool's); `None`: plain TCP.
    pub tls: Option<BackendTls>,
    /// The PROXY protocol header its connections begin with (its pool's `proxy_protocol`).
    pub proxy_protocol: Option<ProxyProtocolOut>,
    /// The value of a sticky cookie naming this backend (a hash of the id: no address in it).
    token: String,
    id_hash: u64,
    weight: AtomicU32,
    draining: AtomicBool,
    /// Up by the active checks (always up without them).
    healthy: AtomicBool,
    active: AtomicUsize,
    /// Consecutive connect/handshake failures (passive health).
    fails: AtomicU32,
    /// Ejected until this many milliseconds after [`epoch`]; 0 when not ejected.
    ejected_until: AtomicU64,
    /// Consecutive passed and failed active checks.
    passes: AtomicU32,
    failures: AtomicU32,
}

/// A process-wide time origin, so an `Instant` fits in an atomic as milliseconds.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_millis() -> u64 {
    // +1 so that a real deadline is never 0 (0 means "not ejected").
    epoch().elapsed().as_millis() as u64 + 1
}

impl Backend {
    fn new(
        pool: &str,
        config: &BackendConfig,
        tls: Option<BackendTls>,
        proxy_protocol: Option<ProxyProtocolOut>,
    ) -> Backend {
        Backend {
            addr: config.addr.clone(),
            id: config.id.clone(),
            pool: pool.to_string(),
            tls,
            proxy_protocol,
            token: sticky::cookie_token(&config.id),
            id_hash: sticky::id_hash(&config.id),
            weight: AtomicU32::new(config.weight.max(1)),
            draining: AtomicBool::new(config.drain),
            healthy: AtomicBool::new(true),
            active: AtomicUsize::new(0),
            fails: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            passes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// The sticky cookie value that names this backend.
    pub fn cookie_token(&self) -> &str {
        &self.token
    }

    /// Whether new connections may go to this backend.
    pub fn is_available(&self) -> bool {
        self.is_healthy() && !self.is_draining() && !self.is_ejected()
    }

    /// Up by the active checks.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Ejected by passive health (consecutive connect or handshake failures), for a while.
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now_millis() < until
    }

    /// Counts one more live connection to this backend until the guard is dropped.
    pub fn acquire(self: &Arc<Self>) -> BackendGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        BackendGuard(Arc::clone(self))
    }

    /// A connect or handshake failed. Ejects the backend for `fail_timeout` once `max_fails` failures are
    /// consecutive (0 never ejects); after the cool-down one more failure ejects it again. Returns whether
    /// this failure ejected it.
    fn record_failure(&self, max_fails: u32, fail_timeout: Duration) -> bool {
        let fails = self.fails.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if max_fails == 0 || fails < max_fails || self.is_ejected() {
            return false;
        }
        let until = now_millis().saturating_add(fail_timeout.as_millis() as u64);
        self.ejected_until.store(until, Ordering::Relaxed);
        true
    }

    /// A connect and handshake succeeded: the failure streak is over.
    fn record_success(&self) {
        // Read first: the common case (no streak) then writes nothing to a shared cache line.
        if self.fails.load(Ordering::Relaxed) != 0 {
            self.fails.store(0, Ordering::Relaxed);
        }
        if self.ejected_until.load(Ordering::Relaxed) != 0 {
            self.ejected_until.store(0, Ordering::Relaxed);
        }
    }

    /// Counts one active check; returns the new health when this check changed it (`rise` passes in a row
    /// bring a down backend up, `fall` failures in a row take an up one down).
    pub fn record_check(&self, passed: bool, rise: u32, fall: u32) -> Option<bool> {
        if passed {
            self.failures.store(0, Ordering::Relaxed);
            let passes = self
                .passes
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            if !self.is_healthy() && passes >= rise {
                self.set_healthy(true);
                return Some(true);
            }
        } else {
            self.passes.store(0, Ordering::Relaxed);
            let failures = self
                .failures
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            if self.is_healthy() && failures >= fall {
                self.set_healthy(false);
                return Some(false);
            }
        }
        None
    }
}

/// One live connection to a backend. Dropping it releases the backend's count.
#[derive(Debug)]
pub struct BackendGuard(Arc<Backend>);

impl BackendGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for BackendGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A named set of backends and the policy that picks among them.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub policy: Policy,
    pub backends: Vec<Arc<Backend>>,
    pub health: Option<HealthCheck>,
    max_fails: u32,
    fail_timeout: Duration,
}

impl Pool {
    /// What a request brings to the choice of its backend (its sticky key, if the pool has one). Call it
    /// before the request's headers are rewritten for the backend.
    pub fn affinity(
        &self,
        headers: &http::HeaderMap,
        uri: &http::Uri,
        peer: std::net::IpAddr,
    ) -> Affinity {
        match &self.policy {
            Policy::LeastConn => Affinity::none(),
            Policy::Sticky(source) => Affinity::of_request(source, headers, uri, peer),
        }
    }

    /// Picks a backend for a new connection, skipping those in `tried` (earlier attempts of the same
    /// request). Sticky pools send a keyed request to the backend its key hashes to (or its cookie names),
    /// or when that one is unavailable to the next in hash order; requests without a key, and least_conn
    /// pools, get the backend with the fewest live connections per weight.
    pub fn pick(&self, affinity: &Affinity, tried: &[Arc<Backend>]) -> Option<BackendGuard> {
        let mut candidates = self
            .backends
            .iter()
            .filter(|b| b.is_available() && !tried.iter().any(|t| Arc::ptr_eq(t, b)));
        let chosen = match (&self.policy, affinity.key) {
            (Policy::Sticky(_), Some(key)) => {
                let named = affinity
                    .cookie
                    .as_deref()
                    .and_then(|cookie| candidates.clone().find(|b| b.token == cookie));
                named.or_else(|| sticky::pick(key, candidates.map(|b| (b, b.id_hash, b.weight()))))
            }
            _ => least_conn::pick(&mut candidates),
        };
        chosen.map(|b| b.acquire())
    }

    /// The `Set-Cookie` to send with the response when the client's sticky cookie does not name the backend
    /// that served it (no cookie yet, an unknown one, or one naming a backend that is down or draining).
    pub fn sticky_cookie(
        &self,
        affinity: &Affinity,
        backend: &Backend,
        tls: bool,
    ) -> Option<HeaderValue> {
        let Policy::Sticky(StickyKey::Cookie(name)) = &self.policy else {
            return None;
        };
        if affinity.cookie.as_deref() == Some(backend.token.as_str()) {
            return None;
        }
        affinity::set_cookie(name, &backend.token, tls)
    }

    /// A connect or handshake to `backend` failed (passive health); may eject it for `fail_timeout`.
    pub fn connect_failed(&self, backend: &Backend) {
        if backend.record_failure(self.max_fails, self.fail_timeout) {
            tracing::warn!(
                pool = %self.name,
                backend = %backend.addr,
                max_fails = self.max_fails,
                fail_timeout_ms = self.fail_timeout.as_millis() as u64,
                "backend ejected after consecutive failures"
            );
        }
    }

    /// A connect and handshake to `backend` succeeded (passive health).
    pub fn connect_succeeded(&self, backend: &Backend) {
        backend.record_success();
    }

    /// Whether some backend takes new connections (else requests get 503 at once; readiness uses it).
    pub fn has_available(&self) -> bool {
        self.backends.iter().any(|b| b.is_available())
    }

    /// How many different backends one request may try before giving up.
    pub fn max_attempts(&self) -> usize {
        self.backends.len().clamp(1, 3)
    }
}

/// A backend as `/status` and the metrics show it (serialized as it is in `/status`, under its pool).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackendStatus {
    #[serde(skip)]
    pub pool: String,
    pub addr: String,
    pub id: String,
    pub weight: u32,
    /// Takes new connections.
    pub available: bool,
    pub healthy: bool,
    pub ejected: bool,
    pub draining: bool,
    /// Live connections (tunnels and requests in flight).
    #[serde(rename = "active_connections")]
    pub active: usize,
}

/// Every pool of one config generation, by name.
#[derive(Debug, Default)]
pub struct Pools(BTreeMap<String, Arc<Pool>>);

impl Pools {
    /// Builds the pools of `config`, with the TLS clients loaded from it, reusing the backends of
    /// `previous` whose pool, id, address and TLS (table and files) stay the same (their weight and drain
    /// flag follow the new config).
    pub fn build(config: &Config, previous: Option<&Pools>, tls: &TlsClients) -> Pools {
        let pools = config
            .pools
            .iter()
            .map(|(name, pool)| {
                (
                    name.clone(),
                    Arc::new(Self::pool(name, pool, previous, tls)),
                )
            })
            .collect();
        Pools(pools)
    }

    fn pool(
        name: &str,
        config: &PoolConfig,
        previous: Option<&Pools>,
        clients: &TlsClients,
    ) -> Pool {
        let old = previous.and_then(|p| p.get(name));
        let backends = config
            .backends
            .iter()
            .map(|b| {
                let tls = config.tls_of(b).map(|table| {
                    clients
                        .backend(table, &b.addr)
                        .expect("TLS clients are loaded from the config the pools are built from")
                });
                let kept = old.and_then(|p| {
                    p.backends.iter().find(|o| {
                        o.id == b.id
                            && o.addr == b.addr
                            && o.tls == tls
                            && o.proxy_protocol == config.proxy_protocol
                    })
                });
                match kept {
                    Some(backend) => {
                        backend.draining.store(b.drain, Ordering::Relaxed);
                        backend.weight.store(b.weight.max(1), Ordering::Relaxed);
                        if config.health.is_none() {
                            // Without active checks nothing would ever bring it back up.
                            backend.set_healthy(true);
                        }
                        Arc::clone(backend)
                    }
                    None => Arc::new(Backend::new(name, b, tls, config.proxy_protocol)),
                }
            })
            .collect();
        Pool {
            name: name.to_string(),
            policy: config.policy.clone(),
            backends,
            health: config.health.clone(),
            max_fails: config.max_fails,
            fail_timeout: config.fail_timeout,
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.0.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.0.values()
    }

    /// Names of the pools with no backend taking new connections (readiness fails while there is one).
    pub fn without_available_backend(&self) -> Vec<&str> {
        self.iter()
            .filter(|p| !p.has_available())
            .map(|p| p.name.as_str())
            .collect()
    }

    /// Every backend of every pool, with its state and live count.
    pub fn status(&self) -> Vec<BackendStatus> {
        self.iter()
            .flat_map(|pool| {
                pool.backends.iter().map(|b| BackendStatus {
                    pool: pool.name.clone(),
                    addr: b.addr.clone(),
                    id: b.id.clone(),
                    weight: b.weight(),
                    available: b.is_available(),
                    healthy: b.is_healthy(),
                    ejected: b.is_ejected(),
                    draining: b.is_draining(),
                    active: b.active(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_toml(text, "test.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    const STICKY: &str = r#"
        [[listener]]
        name = "l"
        listen = "127.0.0.1:0"
        [[route]]
        name = "r"
        pool = "p"
        [pool.p]
        policy = "sticky"
        sticky = { cookie = "wsg" }
        max_fails = 2
        fail_timeout = "1h"
        backends = [ { addr = "127.0.0.1:1" }, { addr = "127.0.0.1:2", id = "two" }, { addr = "127.0.0.1:3" } ]
    "#;

    fn pool(text: &str) -> Arc<Pool> {
        let pools = Pools::build(&config(text), None, &TlsClients::default());
        Arc::clone(pools.get("p").expect("pool p"))
    }

    fn cookie_request(value: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(v) = value {
            h.insert(
                http::header::COOKIE,
                HeaderValue::from_str(&format!("wsg={v}")).expect("value"),
            );
        }
        h
    }

    fn affinity(pool: &Pool, cookie: Option<&str>) -> Affinity {
        pool.affinity(
            &cookie_request(cookie),
            &"/".parse().expect("uri"),
            "127.0.0.1".parse().expect("ip"),
        )
    }

    #[test]
    fn a_cookie_naming_an_available_backend_is_followed_and_not_reissued() {
        let p = pool(STICKY);
        let two = &p.backends[1];
        let a = affinity(&p, Some(two.cookie_token()));
        for _ in 0..20 {
            let guard = p.pick(&a, &[]).expect("a backend");
            assert_eq!(guard.backend().id, "two");
            assert_eq!(p.sticky_cookie(&a, guard.backend(), false), None);
        }
    }

    #[test]
    fn no_cookie_gets_least_conn_and_a_cookie() {
        let p = pool(STICKY);
        let a = affinity(&p, None);
        let _held = [p.backends[0].acquire(), p.backends[2].acquire()];
        let guard = p.pick(&a, &[]).expect("a backend");
        assert_eq!(guard.backend().id, "two");
        let cookie = p.sticky_cookie(&a, guard.backend(), true).expect("issued");
        let text = cookie.to_str().expect("ascii");
        assert!(text.starts_with(&format!("wsg={}", p.backends[1].cookie_token())));
        assert!(
            text.contains("HttpOnly") && text.contains("SameSite=Lax") && text.contains("Secure")
        );
        assert!(!text.contains("127.0.0.1"));
    }

    #[test]
    fn a_cookie_naming_a_down_or_draining_or_unknown_backend_is_replaced() {
        let p = pool(STICKY);
        let two = Arc::clone(&p.backends[1]);
        two.set_healthy(false);
        let a = affinity(&p, Some(two.cookie_token()));
        let guard = p.pick(&a, &[]).expect("a backend");
        assert_ne!(guard.backend().id, "two");
        assert!(p.sticky_cookie(&a, guard.backend(), false).is_some());
        // The replacement is the same every time (next in hash order), so instances agree.
        for _ in 0..10 {
            assert_eq!(p.pick(&a, &[]).expect("b").backend().id, guard.backend().id);
        }
        let unknown = affinity(&p, Some("0000000000000000"));
        let guard = p.pick(&unknown, &[]).expect("a backend");
        assert!(p.sticky_cookie(&unknown, guard.backend(), false).is_some());
    }

    #[test]
    fn passive_failures_eject_until_a_success() {
        let p = pool(STICKY);
        let b = &p.backends[0];
        p.connect_failed(b);
        assert!(b.is_available(), "one failure is below max_fails = 2");
        p.connect_failed(b);
        assert!(b.is_ejected() && !b.is_available());
        p.connect_succeeded(b);
        assert!(b.is_available());
    }

    #[test]
    fn ejection_ends_after_fail_timeout() {
        let b = Backend::new(
            "p",
            &BackendConfig {
                addr: "127.0.0.1:1".into(),
                id: "127.0.0.1:1".into(),
                weight: 1,
                drain: false,
                tls: None,
            },
            None,
            None,
        );
        assert!(b.record_failure(1, Duration::from_millis(30)));
        assert!(b.is_ejected());
        std::thread::sleep(Duration::from_millis(60));
        assert!(!b.is_ejected() && b.is_available());
        // Still on a failure streak: the next failure ejects again at once.
        assert!(b.record_failure(1, Duration::from_millis(30)));
    }

    #[test]
    fn rise_and_fall_count_consecutive_checks() {
        let p = pool(STICKY);
        let b = &p.backends[0];
        assert_eq!(b.record_check(false, 2, 3), None);
        assert_eq!(b.record_check(false, 2, 3), None);
        assert_eq!(b.record_check(true, 2, 3), None, "a pass breaks the streak");
        assert_eq!(b.record_check(false, 2, 3), None);
        assert_eq!(b.record_check(false, 2, 3), None);
        assert_eq!(b.record_check(false, 2, 3), Some(false));
        assert!(!b.is_available());
        assert_eq!(b.record_check(true, 2, 3), None);
        assert_eq!(b.record_check(true, 2, 3), Some(true));
        assert!(b.is_available());
    }

    #[test]
    fn reload_keeps_backends_by_id_and_address_and_follows_drain_and_weight() {
        let before = Pools::build(&config(STICKY), None, &TlsClients::default());
        let guard = before.get("p").expect("p").backends[0].acquire();
        let text = STICKY.replace(
            "{ addr = \"127.0.0.1:1\" }",
            "{ addr = \"127.0.0.1:1\", drain = true, weight = 5 }",
        );
        let after = Pools::build(&config(&text), Some(&before), &TlsClients::default());
        let kept = &after.get("p").expect("p").backends[0];
        assert!(Arc::ptr_eq(kept, guard.backend()));
        assert_eq!(kept.active(), 1);
        assert!(kept.is_draining() && !kept.is_available());
        assert_eq!(kept.weight(), 5);
        assert!(after.without_available_backend().is_empty());
    }
}
