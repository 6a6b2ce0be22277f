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
use serde_json::json;
use tokio::net::TcpListener;

use crate::body::{self, ProxyBody};
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
    })
}
