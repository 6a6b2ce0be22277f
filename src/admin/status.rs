//! `/status`: the running gateway as JSON, for operators, scripts and the operator's page: readiness,
//! the config generation and the last reload, routes with their tunnels, upgrades, closes and ping round
//! trips, pools with their drain spread, DNS entries and backends (state, drain, live counts), and
//! admission control.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::UNIX_EPOCH;

use prometheus::core::Collector;
use prometheus::proto::MetricType;
use serde_json::json;

use crate::admission::ScopeKind;
use crate::balancer::{BackendStatus, Pool};
use crate::config::{Config, Rate};
use crate::proxy_protocol::Versions;
use crate::state::Shared;

/// Why the gateway is not ready, if it is not: starting or draining, or a pool has no backend to send
/// to (with what its DNS entries last said, when it has any).
pub(super) fn not_ready(shared: &Shared) -> Option<String> {
    if !shared.ready.load(Ordering::Relaxed) {
        return Some("starting or draining".to_string());
    }
    let state = shared.state.load();
    let pool = state.pools.iter().find(|pool| !pool.has_available())?;
    let mut why = if pool.backends().is_empty() {
        format!("pool `{}` has no backend", pool.name)
    } else {
        format!("pool `{}` has no healthy backend", pool.name)
    };
    for entry in &pool.discovery {
        let status = entry.status();
        match (&status.last_error, status.last_success_unix) {
            (Some(error), _) => why.push_str(&format!("; DNS `{}`: {error}", status.dns)),
            (None, None) => why.push_str(&format!("; DNS `{}` not resolved yet", status.dns)),
            (None, Some(_)) => {}
        }
    }
    Some(why)
}

pub(super) fn status(shared: &Shared) -> serde_json::Value {
    let state = shared.state.load();
    let loaded_at = shared
        .loaded_at
        .lock()
        .map(|t| *t)
        .unwrap_or_else(|p| *p.into_inner())
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let pools: Vec<_> = state.pools.iter().map(|pool| pool_status(pool)).collect();
    let tunnels = by_label(&shared.metrics.ws_tunnels_active, "route", None);
    let upgrades = by_label(&shared.metrics.ws_upgrades, "route", Some("result"));
    let closes = by_label(&shared.metrics.ws_closes, "route", Some("reason"));
    let rtt = rtt_by_route(shared);
    let routes: Vec<_> = state
        .router
        .routes()
        .iter()
        .map(|r| {
            let name = r.config.name.as_str();
            let total = |counts: &BTreeMap<(String, String), u64>| -> u64 {
                counts
                    .iter()
                    .filter(|((route, _), _)| route == name)
                    .map(|(_, n)| n)
                    .sum()
            };
            let by_key = |counts: &BTreeMap<(String, String), u64>| {
                let mut out = serde_json::Map::new();
                for ((route, key), n) in counts {
                    if route == name {
                        out.insert(key.clone(), json!(n));
                    }
                }
                out
            };
            let (count, sum) = rtt.get(name).copied().unwrap_or((0, 0.0));
            json!({
                "name": name,
                "host": r.config.host,
                "path_prefix": r.config.path_prefix,
                "pool": r.config.pool,
                "tunnels_active": total(&tunnels),
                "upgrades": by_key(&upgrades),
                "closes": by_key(&closes),
                "ping_rtt": { "count": count, "sum_seconds": sum },
            })
        })
        .collect();
    let last_reload = shared
        .last_reload
        .lock()
        .map(|r| r.clone())
        .unwrap_or_else(|p| p.into_inner().clone());
    json!({
        "ready": not_ready(shared).is_none(),
        "generation": shared.generation.load(Ordering::Relaxed),
        "config_file": state.config.source.as_ref().map(|p| p.display().to_string()),
        "config_loaded_unix": loaded_at,
        "last_reload": last_reload,
        "write_api": state.admin_tokens.is_some(),
        "read_buffers_in_use": shared.buffers.lent(),
        "routes": routes,
        "pools": pools,
        "admission": admission_status(shared, &state.config),
    })
}

/// A pool: its policy, drain spread, DNS entries and every backend with its state.
fn pool_status(pool: &Pool) -> serde_json::Value {
    let backends: Vec<_> = pool
        .backends()
        .iter()
        .map(|b| BackendStatus::of(&pool.name, b))
        .collect();
    let discovery: Vec<_> = pool.discovery.iter().map(|d| d.status()).collect();
    json!({
        "name": pool.name,
        "policy": format!("{:?}", pool.policy),
        "drain_spread_ms": pool.drain_spread.map(|s| s.as_millis() as u64),
        "discovery": discovery,
        "backends": backends,
    })
}

/// A metric's values summed by (its `group` label, its `key` label, or "" without one).
fn by_label(
    metric: &dyn Collector,
    group: &str,
    key: Option<&str>,
) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    for family in metric.collect() {
        for m in family.get_metric() {
            let label = |name: &str| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == name)
                    .map(|l| l.value().to_string())
                    .unwrap_or_default()
            };
            let value = match family.get_field_type() {
                MetricType::COUNTER => m.get_counter().get_value(),
                _ => m.get_gauge().get_value(),
            };
            let k = key.map(label).unwrap_or_default();
            *out.entry((label(group), k)).or_insert(0) += value.max(0.0) as u64;
        }
    }
    out
}

/// The ping round trips observed per route: (count, sum in seconds).
fn rtt_by_route(shared: &Shared) -> BTreeMap<String, (u64, f64)> {
    let mut out = BTreeMap::new();
    for family in shared.metrics.ws_ping_rtt.collect() {
        for m in family.get_metric() {
            let route = m
                .get_label()
                .iter()
                .find(|l| l.name() == "route")
                .map(|l| l.value().to_string())
                .unwrap_or_default();
            let h = m.get_histogram();
            out.insert(route, (h.get_sample_count(), h.get_sample_sum()));
        }
    }
    out
}

/// Admission control as it stands: each listener's and route's limits in force, the clients it tracks,
/// the handshakes queued at a listener's gate, and the refusals so far by reason (a listener's are its
/// connections refused; a route's, its upgrades refused on every listener).
fn admission_status(shared: &Shared, config: &Config) -> serde_json::Value {
    let rejections = rejections(shared);
    let scopes = shared.scopes.all();
    let scope = |kind: ScopeKind, name: &str| {
        scopes
            .iter()
            .find(|(k, n, _)| *k == kind && n == name)
            .map(|(_, _, scope)| Arc::clone(scope))
    };
    let by_reason = |matches: &dyn Fn(&str, &str) -> bool| {
        let mut reasons = serde_json::Map::new();
        for ((listener, route, reason), count) in &rejections {
            if matches(listener, route) {
                let total = reasons.get(reason).and_then(|v| v.as_u64()).unwrap_or(0);
                reasons.insert(reason.clone(), json!(total + count));
            }
        }
        reasons
    };
    let rate = |rate: &Rate| json!({ "per_second": rate.per_second, "burst": rate.burst });
    let listeners: Vec<_> = config
        .listeners
        .iter()
        .map(|l| {
            let a = &l.admission;
            let scope = scope(ScopeKind::Listener, &l.name);
            json!({
                "name": l.name,
                "proxy_protocol": a.proxy_protocol.as_ref().map(|p| match p.versions {
                    Versions::V1 => "v1",
                    Versions::V2 => "v2",
                    Versions::Any => "any",
                }),
                "proxy_protocol_from": a.proxy_protocol.as_ref()
                    .map(|p| p.from.iter().map(ToString::to_string).collect::<Vec<_>>()),
                "trusted_proxies": a.trusted_proxies.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "max_connections_per_ip": a.max_connections_per_ip,
                "handshake_rate": a.handshake_rate.as_ref().map(|g| {
                    let mut gate = rate(&g.rate);
                    gate["max_wait_ms"] = json!(g.max_wait.as_millis() as u64);
                    gate
                }),
                "tracked_clients": scope.as_ref().map_or(0, |s| s.clients.tracked()),
                "handshakes_queued": scope.as_ref().map_or(0, |s| s.gate.queued()),
                "rejections": by_reason(&|listener, route| listener == l.name && route.is_empty()),
            })
        })
        .collect();
    let routes: Vec<_> = config
        .routes
        .iter()
        .map(|r| {
            let a = &r.admission;
            let scope = scope(ScopeKind::Route, &r.name);
            json!({
                "name": r.name,
                "allowed_origins": a.origins.as_ref()
                    .map(|o| o.patterns().iter().map(ToString::to_string).collect::<Vec<_>>()),
                "allow_missing_origin": a.origins.as_ref().map(|o| o.allow_missing()),
                "max_tunnels_per_ip": a.max_tunnels_per_ip,
                "handshake_rate_per_ip": a.handshake_rate_per_ip.as_ref().map(rate),
                "tracked_clients": scope.as_ref().map_or(0, |s| s.clients.tracked()),
                "rejections": by_reason(&|_, route| route == r.name),
            })
        })
        .collect();
    json!({ "listeners": listeners, "routes": routes })
}

/// `wsgate_admission_rejections_total` as it stands: by (listener, route, reason).
fn rejections(shared: &Shared) -> Vec<((String, String, String), u64)> {
    let families = shared.metrics.admission_rejections.collect();
    let mut out = Vec::new();
    for family in &families {
        for metric in family.get_metric() {
            let label = |name: &str| {
                metric
                    .get_label()
                    .iter()
                    .find(|l| l.name() == name)
                    .map(|l| l.value().to_string())
                    .unwrap_or_default()
            };
            let count = metric.get_counter().get_value() as u64;
            out.push(((label("listener"), label("route"), label("reason")), count));
        }
    }
    out
}
