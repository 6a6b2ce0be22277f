//! The backends one `dns` entry of a pool has found: one per address of the name, its id the address.
//!
//! The resolution itself runs elsewhere (the gateway's `discovery` task, over `resolver`); this holds
//! what it found and applies each answer: an address that appears becomes a backend at once (down until
//! its health checks pass, if the pool has them); one that is missing from the answers for
//! `remove_after` drains (hysteresis: a flapping answer does not churn backends); one that comes back
//! stops draining; a drained one leaves the set when its last connection has ended. A failed resolution
//! changes nothing. Kept across reloads while the entry is reached the same way (name, TLS, PROXY
//! protocol), so its backends keep their live counts, health and drains.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::{Backend, DrainCause};
use crate::config::{BackendConfig, DiscoveryConfig, ProxyProtocolOut};
use crate::upstream::BackendTls;

/// The most backends one entry keeps: a hostile or broken answer cannot grow the pool without bound.
pub const MAX_DISCOVERED: usize = 1024;

/// What may change on a reload without making the entry a new one.
#[derive(Debug, Clone)]
struct Settings {
    config: DiscoveryConfig,
    drain_spread: Option<Duration>,
    health: bool,
}

#[derive(Debug)]
struct Member {
    addr: SocketAddr,
    backend: Arc<Backend>,
    /// Since when the address has been missing from the answers.
    missing_since: Option<Instant>,
}

#[derive(Debug, Default)]
struct Found {
    members: Vec<Member>,
    last_success: Option<SystemTime>,
    last_error: Option<String>,
    ok: u64,
    failed: u64,
    empty: u64,
}

/// How a resolution went, for the counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Ok,
    /// The name has no address (NXDOMAIN, no records): the last known set stays, since draining every
    /// backend would move clients nowhere.
    Empty,
    Failed,
}

impl Resolution {
    pub fn label(self) -> &'static str {
        match self {
            Resolution::Ok => "ok",
            Resolution::Empty => "empty",
            Resolution::Failed => "failed",
        }
    }
}

/// What an answer did.
#[derive(Debug)]
#[must_use]
pub struct Applied {
    /// Backends were added.
    pub changed: bool,
    /// The backends that began to drain (their idle pooled connections are to be closed).
    pub drained: Vec<Arc<Backend>>,
    /// When a missing address will have been missing for `remove_after`: the next resolution should
    /// come by then, so the drain is not late by up to `resolve_every`.
    pub next_removal: Option<Instant>,
}

/// One `dns` entry's backends.
#[derive(Debug)]
pub struct Discovered {
    pub pool: String,
    /// `host:port` as written.
    pub name: String,
    pub host: String,
    pub port: u16,
    pub tls: Option<BackendTls>,
    pub proxy_protocol: Option<ProxyProtocolOut>,
    settings: Mutex<Settings>,
    found: Mutex<Found>,
    /// The gateway's shutdown token: the parent of every backend's drain signal.
    stop: CancellationToken,
}

/// One entry as `/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiscoveryStatus {
    pub dns: String,
    pub resolve_every_ms: u64,
    pub remove_after_ms: u64,
    /// The addresses in the last good answer (backends draining because they left it are not listed).
    pub addresses: Vec<String>,
    pub last_success_unix: Option<u64>,
    pub last_error: Option<String>,
    pub resolutions: serde_json::Value,
}

impl Discovered {
    pub(super) fn new(
        pool: &str,
        config: &DiscoveryConfig,
        (tls, proxy_protocol): (Option<BackendTls>, Option<ProxyProtocolOut>),
        (drain_spread, health): (Option<Duration>, bool),
        stop: &CancellationToken,
    ) -> Discovered {
        Discovered {
            pool: pool.to_string(),
            name: config.name.clone(),
            host: config.host.clone(),
            port: config.port,
            tls,
            proxy_protocol,
            settings: Mutex::new(Settings {
                config: config.clone(),
                drain_spread,
                health,
            }),
            found: Mutex::default(),
            stop: stop.clone(),
        }
    }

    /// Whether this entry can stand for `config` in a new generation (reached the same way).
    pub(super) fn same_target(
        &self,
        config: &DiscoveryConfig,
        tls: &Option<BackendTls>,
        proxy_protocol: Option<ProxyProtocolOut>,
    ) -> bool {
        self.name == config.name && self.tls == *tls && self.proxy_protocol == proxy_protocol
    }

    /// Takes a reload's settings; the weight and drain flag apply to the backends found so far too.
    pub(super) fn update(
        &self,
        config: &DiscoveryConfig,
        drain_spread: Option<Duration>,
        health: bool,
    ) {
        *lock(&self.settings) = Settings {
            config: config.clone(),
            drain_spread,
            health,
        };
        for member in &lock(&self.found).members {
            member.backend.set_weight(config.weight);
            member
                .backend
                .set_cause(DrainCause::Config, config.drain, drain_spread, None);
            if !health {
                member.backend.set_healthy(true);
            }
        }
    }

    pub fn config(&self) -> DiscoveryConfig {
        lock(&self.settings).config.clone()
    }

    /// Applies an answer (`addrs`, at most `MAX_DISCOVERED` are taken).
    pub fn answer(&self, addrs: &[IpAddr], now: Instant) -> Applied {
        let settings = lock(&self.settings).clone();
        let mut found = lock(&self.found);
        found.ok += 1;
        found.last_success = Some(SystemTime::now());
        found.last_error = None;
        let mut changed = false;
        let mut drained = Vec::new();
        let mut next_removal: Option<Instant> = None;
        let wanted: Vec<SocketAddr> = addrs
            .iter()
            .take(MAX_DISCOVERED)
            .map(|ip| SocketAddr::new(*ip, self.port))
            .collect();
        let listed_now: HashSet<SocketAddr> = wanted.iter().copied().collect();
        let known: HashSet<SocketAddr> = found.members.iter().map(|m| m.addr).collect();
        for member in &mut found.members {
            let listed = listed_now.contains(&member.addr);
            if listed {
                if member.missing_since.take().is_some() {
                    tracing::info!(pool = %self.pool, dns = %self.name, backend = %member.backend.addr, "discovered backend is back in DNS");
                }
                member.backend.set_cause(DrainCause::Dns, false, None, None);
                continue;
            }
            let since = *member.missing_since.get_or_insert(now);
            let due = since + settings.config.remove_after;
            if now < due {
                next_removal = Some(next_removal.map_or(due, |n| n.min(due)));
            } else if !member.backend.drained_for(DrainCause::Dns) {
                tracing::info!(
                    pool = %self.pool,
                    dns = %self.name,
                    backend = %member.backend.addr,
                    missing_ms = now.duration_since(since).as_millis() as u64,
                    "discovered backend left DNS: draining"
                );
                member
                    .backend
                    .set_cause(DrainCause::Dns, true, settings.drain_spread, None);
                drained.push(Arc::clone(&member.backend));
            }
        }
        for addr in wanted {
            if known.contains(&addr) {
                continue;
            }
            if found.members.len() >= MAX_DISCOVERED {
                tracing::warn!(pool = %self.pool, dns = %self.name, max = MAX_DISCOVERED, "discovered backends at their cap: further addresses are left out");
                break;
            }
            let id = addr.to_string();
            let config = BackendConfig {
                addr: id.clone(),
                id,
                weight: settings.config.weight,
                drain: settings.config.drain,
                tls: None,
            };
            let mut backend = Backend::new(
                &self.pool,
                &config,
                (self.tls.clone(), self.proxy_protocol),
                (settings.drain_spread, &self.stop),
            );
            backend.discovered = true;
            // With active checks a new backend takes traffic only once they pass.
            backend.set_healthy(!settings.health);
            tracing::info!(pool = %self.pool, dns = %self.name, backend = %config.addr, "backend discovered");
            found.members.push(Member {
                addr,
                backend: Arc::new(backend),
                missing_since: None,
            });
            changed = true;
        }
        Applied {
            changed,
            drained,
            next_removal,
        }
    }

    /// Counts a resolution that gave nothing to apply; the last known set stays.
    pub fn failed(&self, outcome: Resolution, error: String) {
        let mut found = lock(&self.found);
        match outcome {
            Resolution::Empty => found.empty += 1,
            _ => found.failed += 1,
        }
        found.last_error = Some(error);
    }

    /// Drops the backends drained for leaving DNS once they hold no connection; returns whether any left.
    pub fn prune(&self) -> bool {
        let mut found = lock(&self.found);
        let before = found.members.len();
        found.members.retain(|m| {
            !(m.missing_since.is_some()
                && m.backend.drained_for(DrainCause::Dns)
                && m.backend.active() == 0)
        });
        found.members.len() != before
    }

    /// Every backend found, draining ones included.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        lock(&self.found)
            .members
            .iter()
            .map(|m| Arc::clone(&m.backend))
            .collect()
    }

    /// A reload dropped this entry: every backend it found that the new generation does not keep
    /// (`kept`) drains.
    pub(super) fn retire(&self, spread: Option<Duration>, kept: impl Fn(&Arc<Backend>) -> bool) {
        for member in &lock(&self.found).members {
            if !kept(&member.backend) {
                member
                    .backend
                    .set_cause(DrainCause::Removed, true, spread, None);
            }
        }
    }

    /// The same entry under another pool (a reload renamed its pool): what this one found, the same
    /// backend objects with their live counts, health and drains, starts the new one.
    pub(super) fn carry_to(
        &self,
        pool: &str,
        config: &DiscoveryConfig,
        (drain_spread, health): (Option<Duration>, bool),
    ) -> Discovered {
        let carried = Discovered::new(
            pool,
            config,
            (self.tls.clone(), self.proxy_protocol),
            (drain_spread, health),
            &self.stop,
        );
        {
            let found = lock(&self.found);
            let mut into = lock(&carried.found);
            into.members = found
                .members
                .iter()
                .map(|m| Member {
                    addr: m.addr,
                    backend: Arc::clone(&m.backend),
                    missing_since: m.missing_since,
                })
                .collect();
            into.last_success = found.last_success;
        }
        carried.update(config, drain_spread, health);
        carried
    }

    pub fn status(&self) -> DiscoveryStatus {
        let settings = lock(&self.settings).config.clone();
        let found = lock(&self.found);
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        };
        DiscoveryStatus {
            dns: self.name.clone(),
            resolve_every_ms: settings.resolve_every.as_millis() as u64,
            remove_after_ms: settings.remove_after.as_millis() as u64,
            addresses: found
                .members
                .iter()
                .filter(|m| m.missing_since.is_none())
                .map(|m| m.backend.addr.clone())
                .collect(),
            last_success_unix: found.last_success.map(unix),
            last_error: found.last_error.clone(),
            resolutions: serde_json::json!({ "ok": found.ok, "failed": found.failed, "empty": found.empty }),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
