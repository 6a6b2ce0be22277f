//! The admin listener: `/metrics` (Prometheus text format), `/healthz` (the process answers), `/readyz`
//! (listeners bound, not draining, and every pool has a backend to send to) and `/status` (JSON).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, UNIX_EPOCH};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus::core::Collector;
use serde_json::json;
use tokio::net::TcpListener;

use crate::admission::ScopeKind;
use crate::body::{self, ProxyBody};
use crate::config::{Config, Rate};
use crate::proxy_protocol::Versions;
use crate::state::Shared;

/// How long an admin connection may last (one request: keep-alive is off).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Binds the admin listener and serves it until shutdown; returns the bound address.
pub async fn start(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "admin listening");
    let tasks = shared.tasks.clone();
    tasks.spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(%error, "admin accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
                _ = shared.shutdown.cancelled() => return,
            };
            let shared2 = Arc::clone(&shared);
            shared.tasks.spawn(async move {
                let service = service_fn(|req| answer(req, Arc::clone(&shared2)));
                let connection = http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                // A scraper's connection must not hold a shutdown up: it is dropped when one starts.
                tokio::select! {
                    _ = tokio::time::timeout(ADMIN_TIMEOUT, connection) => {}
                    _ = shared2.shutdown.cancelled() => {}
                }
            });
        }
    });
    Ok(bound)
}

async fn answer(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<ProxyBody>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(body::text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n"));
    }
    Ok(match req.uri().path() {
        "/metrics" => body::with_type(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            shared.render_metrics(),
        ),
        "/healthz" => body::text(StatusCode::OK, "ok\n"),
        "/readyz" => match not_ready(&shared) {
            None => body::text(StatusCode::OK, "ready\n"),
            Some(why) => body::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/status" => body::with_type(
            StatusCode::OK,
            "application/json",
            status(&shared).to_string(),
        ),
        _ => body::text(
            StatusCode::NOT_FOUND,
            "try /metrics, /healthz, /readyz or /status\n",
        ),
    })
}

fn not_ready(shared: &Shared) -> Option<String> {
    if !shared.ready.load(Ordering::Relaxed) {
        return Some("starting or draining".to_string());
    }
    let state = shared.state.load();
    state
        .pools
        .iter()
        .find(|pool| !pool.backends.iter().any(|b| b.is_available()))
        .map(|pool| format!("pool `{}` has no healthy backend", pool.name))
}

fn status(shared: &Shared) -> serde_json::Value {
    let state = shared.state.load();
    let loaded_at = shared
        .loaded_at
        .lock()
        .map(|t| *t)
        .unwrap_or_else(|p| *p.into_inner())
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let backends = state.pools.status();
    let pools: Vec<_> = state
        .pools
        .iter()
        .map(|pool| {
            let backends: Vec<_> = backends
                .iter()
                .filter(|b| b.pool == pool.name)
                .collect();
            json!({ "name": pool.name, "policy": format!("{:?}", pool.policy), "backends": backends })
        })
        .collect();
    let routes: Vec<_> = state
        .router
        .routes()
        .iter()
        .map(|r| json!({ "name": r.config.name, "host": r.config.host, "path_prefix": r.config.path_prefix, "pool": r.config.pool }))
        .collect();
    json!({
        "ready": not_ready(shared).is_none(),
        "config_file": state.config.source.as_ref().map(|p| p.display().to_string()),
        "config_loaded_unix": loaded_at,
        "read_buffers_in_use": shared.buffers.lent(),
        "routes": routes,
        "pools": pools,
        "admission": admission_status(shared, &state.config),
    })
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
