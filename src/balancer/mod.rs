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
mod discovered;
mod drain;
mod least_conn;
pub mod probe;
pub mod sticky;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::HeaderValue;
use tokio_util::sync::CancellationToken;

pub use affinity::Affinity;
pub use discovered::{Discovered, Resolution};
pub use drain::{DrainCause, DrainStatus};

use crate::config::{
    BackendConfig, Config, HealthCheck, Policy, PoolConfig, ProxyProtocolOut, StickyKey,
};
use crate::upstream::{BackendTls, Reuse, TlsClients};
use drain::Drain;

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
    /// Found in DNS (a `dns` entry), not written in the config.
    pub discovered: bool,
    weight: AtomicU32,
    /// Mirrors `drain.is_draining()`, read on every pick without the lock.
    draining: AtomicBool,
    drain: Mutex<Drain>,
    /// The drain signal's epoch (`Drain::epoch`), read without the drain's lock.
    drain_epoch: Arc<AtomicU64>,
    /// Live tunnels (a part of `active`).
    tunnels: AtomicUsize,
    /// The objects of earlier generations this one took over from (the same address reached the same
    /// way, under another pool or id) that still hold connections: a drain of this backend drains
    /// them too, and `/status` counts their connections as this backend's.
    predecessors: Mutex<Vec<std::sync::Weak<Backend>>>,
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
    /// `drain_spread`: the pool's, for a `drain = true` in `config`. `stop`: the gateway's shutdown
    /// token, the parent of the backend's drain signal.
    fn new(
        pool: &str,
        config: &BackendConfig,
        (tls, proxy_protocol): (Option<BackendTls>, Option<ProxyProtocolOut>),
        (drain_spread, stop): (Option<Duration>, &CancellationToken),
    ) -> Backend {
        let drain = Drain::new(stop);
        let backend = Backend {
            addr: config.addr.clone(),
            id: config.id.clone(),
            pool: pool.to_string(),
            tls,
            proxy_protocol,
            token: sticky::cookie_token(&config.id),
            id_hash: sticky::id_hash(&config.id),
            discovered: false,
            weight: AtomicU32::new(config.weight.max(1)),
            draining: AtomicBool::new(false),
            drain_epoch: drain.epoch(),
            drain: Mutex::new(drain),
            tunnels: AtomicUsize::new(0),
            predecessors: Mutex::default(),
            healthy: AtomicBool::new(true),
            active: AtomicUsize::new(0),
            fails: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            passes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
        };
        backend.set_cause(DrainCause::Config, config.drain, drain_spread, None);
        backend
    }

    fn set_weight(&self, weight: u32) {
        self.weight.store(weight.max(1), Ordering::Relaxed);
    }

    fn drain_state(&self) -> std::sync::MutexGuard<'_, Drain> {
        self.drain.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts (`on`) or ends this cause of a drain; `spread` and `by` (an admin token's name) apply when
    /// it starts. Returns whether the backend drains now.
    pub fn set_cause(
        &self,
        cause: DrainCause,
        on: bool,
        spread: Option<Duration>,
        by: Option<&str>,
    ) -> bool {
        let draining = {
            let mut drain = self.drain_state();
            if on {
                drain.add(cause, spread, by);
                true
            } else {
                drain.remove(cause)
            }
        };
        self.draining.store(draining, Ordering::Relaxed);
        for earlier in self.predecessors() {
            earlier.set_cause(cause, on, spread, by);
        }
        draining
    }

    /// The live objects this one took over from (see `predecessors`); dead ones are forgotten.
    fn predecessors(&self) -> Vec<Arc<Backend>> {
        let mut list = self.predecessors.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|w| w.strong_count() > 0);
        list.iter().filter_map(std::sync::Weak::upgrade).collect()
    }

    /// Takes over from `earlier`, an object of the last generation for the same server that the new
    /// one does not keep (another pool or id): its drains follow this one's from now on.
    fn adopt(&self, earlier: &Arc<Backend>) {
        let inherited = earlier.predecessors();
        let snapshot = self.drain_state().snapshot();
        for old in std::iter::once(earlier).chain(&inherited) {
            let draining = {
                let mut drain = old.drain_state();
                drain.mirror(snapshot.clone());
                drain.is_draining()
            };
            old.draining.store(draining, Ordering::Relaxed);
        }
        let mut list = self.predecessors.lock().unwrap_or_else(|p| p.into_inner());
        list.push(Arc::downgrade(earlier));
        list.extend(inherited.iter().map(Arc::downgrade));
    }

    /// Whether `cause` is one of the reasons it drains.
    pub fn drained_for(&self, cause: DrainCause) -> bool {
        self.drain_state().has(cause)
    }

    /// What its tunnels listen to, and its epoch: cancelled whenever their verdict changes (see
    /// `drain.rs`).
    pub fn drain_signal(&self) -> (CancellationToken, u64) {
        self.drain_state().signal()
    }

    /// The current drain signal's epoch: it moves on before a signal is cancelled for a drain (not for
    /// shutdown, which cancels the parent). No lock taken.
    pub fn drain_epoch(&self) -> u64 {
        self.drain_epoch.load(Ordering::Acquire)
    }

    /// When a tunnel to it is to close for its drain, from now; `None`: not at all (not draining, or
    /// draining with tunnels left to finish).
    pub fn drain_delay(&self) -> Option<Duration> {
        self.drain_state().delay()
    }

    pub fn drain_status(&self) -> Option<DrainStatus> {
        self.drain_state().status()
    }

    /// A tunnel to it began: counted until `tunnel_ended`. The tunnel's own record calls both (from its
    /// constructor and its `Drop`), so the count follows the tunnel without a guard of its own: an idle
    /// tunnel carries nothing more for it.
    pub fn tunnel_started(&self) {
        self.tunnels.fetch_add(1, Ordering::Relaxed);
    }

    pub fn tunnel_ended(&self) {
        self.tunnels.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn tunnels(&self) -> usize {
        self.tunnels.load(Ordering::Relaxed)
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

/// A pooled HTTP connection goes back to the pool only while its backend is not draining: a drained
/// backend's keep-alive connections close once their response is done.
impl Reuse for BackendGuard {
    fn reusable(&self) -> bool {
        !self.0.is_draining()
    }
}

/// A named set of backends and the policy that picks among them.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub policy: Policy,
    pub health: Option<HealthCheck>,
    /// How a drained backend's tunnels close (`PoolConfig::drain_spread`).
    pub drain_spread: Option<Duration>,
    /// Its `dns` entries, each with the backends it has found.
    pub discovery: Vec<Arc<Discovered>>,
    /// The backends written in the config.
    written: Vec<Arc<Backend>>,
    /// Every backend: the written ones, then the discovered ones. Replaced (`refresh`) when discovery
    /// finds or drops backends, so a pick reads one list without a lock.
    backends: ArcSwap<Vec<Arc<Backend>>>,
    /// One rebuild of `backends` at a time: two entries' tasks (or a task and a reload) must not store
    /// lists built from different snapshots, the last one missing the other's news.
    refreshing: Mutex<()>,
    max_fails: u32,
    fail_timeout: Duration,
}

impl Pool {
    /// Every backend of the pool, written and discovered, draining ones included.
    pub fn backends(&self) -> arc_swap::Guard<Arc<Vec<Arc<Backend>>>> {
        self.backends.load()
    }

    /// Rebuilds the list of backends after discovery changed a set. An address found by DNS that is
    /// already a backend of the pool (written, or found by another entry) is left out: one server, one
    /// backend, whose drains and counts are its own.
    pub fn refresh(&self) {
        let _one_at_a_time = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = self.written.clone();
        for entry in &self.discovery {
            for backend in entry.backends() {
                if !all
                    .iter()
                    .any(|b| b.id == backend.id || b.addr == backend.addr)
                {
                    all.push(backend);
                }
            }
        }
        self.backends.store(Arc::new(all));
    }

    /// A backend by id.
    pub fn backend(&self, id: &str) -> Option<Arc<Backend>> {
        self.backends().iter().find(|b| b.id == id).cloned()
    }

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
        let backends = self.backends();
        let mut candidates = backends
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
        self.backends().iter().any(|b| b.is_available())
    }

    /// How many different backends one request may try before giving up.
    pub fn max_attempts(&self) -> usize {
        self.backends().len().clamp(1, 3)
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
    /// One word for the above: `draining`, `down`, `ejected` or `up`, the first that applies.
    pub state: &'static str,
    /// Live connections (tunnels and requests in flight).
    #[serde(rename = "active_connections")]
    pub active: usize,
    /// Live tunnels.
    pub tunnels: usize,
    pub discovered: bool,
    pub drain: Option<DrainStatus>,
}

impl BackendStatus {
    /// Its live counts include those of the objects it took over from (`Backend::adopt`).
    pub fn of(pool: &str, b: &Backend) -> BackendStatus {
        let (healthy, ejected, draining) = (b.is_healthy(), b.is_ejected(), b.is_draining());
        let earlier = b.predecessors();
        BackendStatus {
            pool: pool.to_string(),
            addr: b.addr.clone(),
            id: b.id.clone(),
            weight: b.weight(),
            available: b.is_available(),
            healthy,
            ejected,
            draining,
            state: if draining {
                "draining"
            } else if !healthy {
                "down"
            } else if ejected {
                "ejected"
            } else {
                "up"
            },
            active: b.active() + earlier.iter().map(|e| e.active()).sum::<usize>(),
            tunnels: b.tunnels() + earlier.iter().map(|e| e.tunnels()).sum::<usize>(),
            discovered: b.discovered,
            drain: b.drain_status(),
        }
    }
}

/// Every pool of one config generation, by name.
#[derive(Debug, Default)]
pub struct Pools(BTreeMap<String, Arc<Pool>>);

impl Pools {
    /// Builds the pools of `config`, with the TLS clients loaded from it, reusing the backends of
    /// `previous` whose pool, id, address and way of reaching them (TLS table and files, PROXY header)
    /// stay the same (their weight and drain flag follow the new config), and its `dns` entries reached
    /// the same way, with what they have found. A backend of `previous` left out drains (cause
    /// `Removed`), unless the new config still reaches its address the same way (in another pool, or
    /// under another id); so does every backend a dropped `dns` entry found (an entry under a renamed
    /// pool is a new one: its backends are found again). An operator's drain passes to the backend of
    /// the same pool and id that replaces one. `stop`: the gateway's shutdown token, the parent of every backend's drain signal.
    pub fn build(
        config: &Config,
        previous: Option<&Pools>,
        tls: &TlsClients,
        stop: &CancellationToken,
    ) -> Pools {
        let pools: BTreeMap<_, _> = config
            .pools
            .iter()
            .map(|(name, pool)| {
                let pool = Self::pool(name, pool, previous, tls, stop);
                (name.clone(), Arc::new(pool))
            })
            .collect();
        if let Some(previous) = previous {
            // A server the new config still reaches the same way (its address under a renamed pool,
            // or under a new id) is not being taken away: its object hands over to the new one.
            let successor = |gone: &Backend| {
                pools.values().find_map(|p| {
                    p.backends()
                        .iter()
                        .find(|b| b.addr == gone.addr && b.tls == gone.tls)
                        .cloned()
                })
            };
            let kept_anywhere = |backend: &Arc<Backend>| {
                pools
                    .values()
                    .any(|p| p.backends().iter().any(|b| Arc::ptr_eq(b, backend)))
            };
            for old in previous.iter() {
                let new = pools.get(&old.name);
                let spread = new.map_or(old.drain_spread, |p| p.drain_spread);
                for backend in old.written.iter() {
                    if kept_anywhere(backend) {
                        continue;
                    }
                    match successor(backend) {
                        Some(successor) => successor.adopt(backend),
                        None => {
                            backend.set_cause(DrainCause::Removed, true, spread, None);
                        }
                    }
                }
                for entry in &old.discovery {
                    let kept = pools
                        .values()
                        .any(|p| p.discovery.iter().any(|d| Arc::ptr_eq(d, entry)));
                    if !kept {
                        entry.retire(spread, kept_anywhere);
                    }
                }
            }
        }
        Pools(pools)
    }

    fn pool(
        name: &str,
        config: &PoolConfig,
        previous: Option<&Pools>,
        clients: &TlsClients,
        stop: &CancellationToken,
    ) -> Pool {
        let old = previous.and_then(|p| p.get(name)).map(Arc::as_ref);
        let spread = config.drain_spread;
        let written = config
            .backends
            .iter()
            .map(|b| {
                let tls = config.tls_of(b).map(|table| {
                    clients
                        .backend(table, &b.addr)
                        .expect("TLS clients are loaded from the config the pools are built from")
                });
                let previous = old.and_then(|p| p.written.iter().find(|o| o.id == b.id));
                let kept = previous.filter(|o| {
                    o.addr == b.addr && o.tls == tls && o.proxy_protocol == config.proxy_protocol
                });
                match kept {
                    Some(backend) => {
                        backend.set_cause(DrainCause::Config, b.drain, spread, None);
                        backend.set_weight(b.weight);
                        if config.health.is_none() {
                            // Without active checks nothing would ever bring it back up.
                            backend.set_healthy(true);
                        }
                        Arc::clone(backend)
                    }
                    None => {
                        let backend =
                            Backend::new(name, b, (tls, config.proxy_protocol), (spread, stop));
                        if let Some((spread, by)) = previous.and_then(|o| o.drain_state().admin()) {
                            backend.set_cause(DrainCause::Admin, true, spread, by.as_deref());
                        }
                        Arc::new(backend)
                    }
                }
            })
            .collect();
        let health = config.health.is_some();
        let discovery = config
            .discovery
            .iter()
            .map(|d| {
                let tls = d.tls.as_ref().or(config.tls.as_ref()).map(|table| {
                    clients
                        .backend(table, &d.name)
                        .expect("TLS clients are loaded from the config the pools are built from")
                });
                let kept = old.and_then(|p| {
                    p.discovery
                        .iter()
                        .find(|o| o.same_target(d, &tls, config.proxy_protocol))
                });
                // The same name reached the same way in a pool of another name: a renamed pool.
                let renamed = || {
                    previous.into_iter().flat_map(Pools::iter).find_map(|p| {
                        p.discovery
                            .iter()
                            .find(|o| o.same_target(d, &tls, config.proxy_protocol))
                    })
                };
                match kept {
                    Some(entry) => {
                        entry.update(d, spread, health);
                        Arc::clone(entry)
                    }
                    None if let Some(entry) = renamed() => {
                        Arc::new(entry.carry_to(name, d, (spread, health)))
                    }
                    None => Arc::new(Discovered::new(
                        name,
                        d,
                        (tls, config.proxy_protocol),
                        (spread, health),
                        stop,
                    )),
                }
            })
            .collect();
        let pool = Pool {
            name: name.to_string(),
            policy: config.policy.clone(),
            health: config.health.clone(),
            drain_spread: spread,
            discovery,
            written,
            backends: ArcSwap::default(),
            refreshing: Mutex::default(),
            max_fails: config.max_fails,
            fail_timeout: config.fail_timeout,
        };
        pool.refresh();
        pool
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
                let backends = pool.backends();
                backends
                    .iter()
                    .map(|b| BackendStatus::of(&pool.name, b))
                    .collect::<Vec<_>>()
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
        let pools = Pools::build(
            &config(text),
            None,
            &TlsClients::default(),
            &CancellationToken::new(),
        );
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
        let two = &p.backends()[1];
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
        let _held = [p.backends()[0].acquire(), p.backends()[2].acquire()];
        let guard = p.pick(&a, &[]).expect("a backend");
        assert_eq!(guard.backend().id, "two");
        let cookie = p.sticky_cookie(&a, guard.backend(), true).expect("issued");
        let text = cookie.to_str().expect("ascii");
        assert!(text.starts_with(&format!("wsg={}", p.backends()[1].cookie_token())));
        assert!(
            text.contains("HttpOnly") && text.contains("SameSite=Lax") && text.contains("Secure")
        );
        assert!(!text.contains("127.0.0.1"));
    }

    #[test]
    fn a_cookie_naming_a_down_or_draining_or_unknown_backend_is_replaced() {
        let p = pool(STICKY);
        let two = Arc::clone(&p.backends()[1]);
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
        let b = &p.backends()[0];
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
            (None, None),
            (None, &CancellationToken::new()),
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
        let b = &p.backends()[0];
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
        let stop = CancellationToken::new();
        let before = Pools::build(&config(STICKY), None, &TlsClients::default(), &stop);
        let guard = before.get("p").expect("p").backends()[0].acquire();
        let text = STICKY.replace(
            "{ addr = \"127.0.0.1:1\" }",
            "{ addr = \"127.0.0.1:1\", drain = true, weight = 5 }",
        );
        let after = Pools::build(&config(&text), Some(&before), &TlsClients::default(), &stop);
        let kept = &after.get("p").expect("p").backends()[0];
        assert!(Arc::ptr_eq(kept, guard.backend()));
        assert_eq!(kept.active(), 1);
        assert!(kept.is_draining() && !kept.is_available());
        assert_eq!(kept.weight(), 5);
        assert!(after.without_available_backend().is_empty());
    }

    fn one_pool(pool: &str, backend: &str) -> Config {
        config(&format!(
            "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n[[route]]\nname = \"r\"\npool = \"{pool}\"\n\
             [pool.{pool}]\ndrain_spread = \"10s\"\nbackends = [ {backend} ]\n"
        ))
    }

    /// A pool renamed, or a backend given another id: the server stays, so its tunnels do; the new object
    /// takes over the old one's drains and counts.
    #[test]
    fn the_same_server_under_another_pool_is_handed_over_not_drained() {
        let stop = CancellationToken::new();
        let tls = TlsClients::default();
        let before = Pools::build(
            &one_pool("a", "{ addr = \"127.0.0.1:7\" }"),
            None,
            &tls,
            &stop,
        );
        let old = Arc::clone(&before.get("a").expect("a").backends()[0]);
        let _guard = old.acquire();
        old.tunnel_started();
        let (signal, _) = old.drain_signal();
        let after = Pools::build(
            &one_pool("b", "{ addr = \"127.0.0.1:7\", id = \"seven\" }"),
            Some(&before),
            &tls,
            &stop,
        );
        let new = Arc::clone(&after.get("b").expect("b").backends()[0]);
        assert!(!Arc::ptr_eq(&old, &new));
        assert!(!old.is_draining() && !signal.is_cancelled(), "not removed");
        let status = BackendStatus::of("b", &new);
        assert_eq!(
            (status.active, status.tunnels),
            (1, 1),
            "the old object's counts"
        );
        new.set_cause(DrainCause::Admin, true, Some(Duration::ZERO), Some("ops"));
        assert!(
            old.is_draining() && signal.is_cancelled(),
            "a drain reaches the old tunnels"
        );
        assert_eq!(old.drain_delay(), Some(Duration::ZERO));
        // And a reload that removes the server drains both.
        new.set_cause(DrainCause::Admin, false, None, None);
        assert!(!old.is_draining());
        let gone = Pools::build(
            &one_pool("b", "{ addr = \"127.0.0.1:8\" }"),
            Some(&after),
            &tls,
            &stop,
        );
        assert!(gone.get("b").is_some());
        assert!(new.drained_for(DrainCause::Removed) && old.drained_for(DrainCause::Removed));
    }

    /// A pool renamed keeps what its DNS entry found: the same backend objects, nothing drained.
    #[test]
    fn a_dns_entry_under_a_renamed_pool_keeps_its_backends() {
        let stop = CancellationToken::new();
        let tls = TlsClients::default();
        let entry = "{ dns = \"chat.test:9000\" }";
        let before = Pools::build(&one_pool("a", entry), None, &tls, &stop);
        let pool = before.get("a").expect("a");
        let found = pool.discovery[0].answer(&["127.0.0.9".parse().expect("ip")], Instant::now());
        assert!(found.changed);
        pool.refresh();
        let old = Arc::clone(&pool.backends()[0]);
        let after = Pools::build(&one_pool("b", entry), Some(&before), &tls, &stop);
        let new = &after.get("b").expect("b").backends()[0];
        assert!(Arc::ptr_eq(&old, new));
        assert!(!old.is_draining());
        let dropped = Pools::build(
            &one_pool("b", "{ addr = \"127.0.0.1:1\" }"),
            Some(&after),
            &tls,
            &stop,
        );
        assert!(dropped.get("b").is_some());
        assert!(
            old.drained_for(DrainCause::Removed),
            "an entry a reload drops drains what it found"
        );
    }
}
