//! Backends, pools and the choice of a backend for each new connection (DESIGN.md §3).
//!
//! A backend's live-connection count is held by [`BackendGuard`]s: whoever proxies to a backend holds one,
//! and dropping it (however the connection ends) releases the count, so the count cannot drift.

mod least_conn;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::config::{BackendConfig, Config, Policy, PoolConfig};

/// One backend server. Shared by every pool generation that lists its address, so that its live count
/// survives a reload.
#[derive(Debug)]
pub struct Backend {
    /// Stable identity: the address as written in the config.
    pub addr: String,
    pub pool: String,
    weight: u32,
    draining: AtomicBool,
    healthy: AtomicBool,
    active: AtomicUsize,
}

impl Backend {
    fn new(pool: &str, config: &BackendConfig) -> Backend {
        Backend {
            addr: config.addr.clone(),
            pool: pool.to_string(),
            weight: config.weight.max(1),
            draining: AtomicBool::new(config.drain),
            healthy: AtomicBool::new(true),
            active: AtomicUsize::new(0),
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// Whether new connections may go to this backend.
    pub fn is_available(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.draining.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Counts one more live connection to this backend until the guard is dropped.
    pub fn acquire(self: &Arc<Self>) -> BackendGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        BackendGuard(Arc::clone(self))
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
}

impl Pool {
    /// Picks a backend for a new connection, skipping those in `tried` (earlier attempts of the same request).
    pub fn pick(&self, tried: &[Arc<Backend>]) -> Option<BackendGuard> {
        let candidates = self
            .backends
            .iter()
            .filter(|b| b.is_available() && !tried.iter().any(|t| Arc::ptr_eq(t, b)));
        match self.policy {
            Policy::LeastConn => least_conn::pick(candidates).map(|b| b.acquire()),
        }
    }

    /// How many different backends one request may try before giving up.
    pub fn max_attempts(&self) -> usize {
        self.backends.len().clamp(1, 3)
    }
}

/// Every pool of one config generation, by name.
#[derive(Debug, Default)]
pub struct Pools(BTreeMap<String, Arc<Pool>>);

impl Pools {
    /// Builds the pools of `config`, reusing the backends of `previous` whose pool and address stay the same.
    pub fn build(config: &Config, previous: Option<&Pools>) -> Pools {
        let pools = config
            .pools
            .iter()
            .map(|(name, pool)| (name.clone(), Arc::new(Self::pool(name, pool, previous))))
            .collect();
        Pools(pools)
    }

    fn pool(name: &str, config: &PoolConfig, previous: Option<&Pools>) -> Pool {
        let old = previous.and_then(|p| p.get(name));
        let backends = config
            .backends
            .iter()
            .map(|b| {
                let kept = old.and_then(|p| {
                    p.backends
                        .iter()
                        .find(|o| o.addr == b.addr && o.weight == b.weight.max(1))
                });
                match kept {
                    Some(backend) => {
                        backend.draining.store(b.drain, Ordering::Relaxed);
                        Arc::clone(backend)
                    }
                    None => Arc::new(Backend::new(name, b)),
                }
            })
            .collect();
        Pool {
            name: name.to_string(),
            policy: config.policy,
            backends,
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.0.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.0.values()
    }
}
