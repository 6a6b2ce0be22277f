//! The admin listener: `/` (the operator's page, `page.html`), `/metrics` (Prometheus text format),
//! `/healthz` (the process answers), `/readyz` (listeners bound, not draining, and every pool has a
//! backend to send to), `/status` (JSON, `status.rs`), and the write endpoints (`api.rs`: drain and undrain
//! a backend, reload the config) behind a bearer token.
//!
//! Access: a peer outside `admin.allow` gets 403 for everything but `/healthz` and `/readyz`, which an
//! orchestrator's probes (often from the node's own address) need; `/readyz` then says only whether,
//! not why. One request
//! per connection, each bounded in time.

mod api;
mod status;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::body::{self, ProxyBody};
use crate::state::Shared;

/// How long an admin connection may last (one request: keep-alive is off). A reload is answered within
/// it: loading certificates and binding listeners takes far less.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The operator's page: one self-contained file, refreshed from `/status` by its own script.
const PAGE: &str = include_str!("page.html");
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
            let (stream, peer) = tokio::select! {
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
                let service = service_fn(|req| answer(req, peer, Arc::clone(&shared2)));
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
    peer: SocketAddr,
    shared: Arc<Shared>,
) -> Result<Response<ProxyBody>, Infallible> {
    let probe = matches!(req.uri().path(), "/healthz" | "/readyz") && req.method() == Method::GET;
    let allowed_peer = {
        let state = shared.state.load();
        let allow = state.config.admin.as_ref().map(|a| a.allow.as_slice());
        allow.is_none_or(|nets| nets.is_empty() || nets.iter().any(|n| n.contains(peer.ip())))
    };
    if !(allowed_peer || probe) {
        tracing::warn!(target: "wsgate::admin", %peer, path = req.uri().path(), "admin request refused: peer outside admin.allow");
        return Ok(body::text(StatusCode::FORBIDDEN, "forbidden\n"));
    }
    if req.method() == Method::POST {
        return Ok(api::write(req, peer, &shared).await);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = body::text(StatusCode::METHOD_NOT_ALLOWED, "GET, HEAD or POST\n");
        response.headers_mut().insert(
            http::header::ALLOW,
            http::HeaderValue::from_static("GET, HEAD, POST"),
        );
        return Ok(response);
    }
    Ok(match req.uri().path() {
        "/" => page(),
        "/metrics" => body::with_type(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            shared.render_metrics(),
        ),
        "/healthz" => body::text(StatusCode::OK, "ok\n"),
        "/readyz" => match status::not_ready(&shared) {
            None => body::text(StatusCode::OK, "ready\n"),
            // Why (pool and DNS names, resolver errors) only to peers in `allow`.
            Some(why) if allowed_peer => body::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
            Some(_) => body::text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        },
        "/status" => body::with_type(
            StatusCode::OK,
            "application/json",
            status::status(&shared).to_string(),
        ),
        _ => body::text(
            StatusCode::NOT_FOUND,
            "try /, /metrics, /healthz, /readyz or /status\n",
        ),
    })
}

/// The page, with headers that keep it to itself: no framing by other sites, nothing loaded from
/// elsewhere (its script and style are inline).
fn page() -> Response<ProxyBody> {
    let mut response = body::with_type(StatusCode::OK, "text/html; charset=utf-8", PAGE);
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    headers.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        http::HeaderValue::from_static("nosniff"),
    );
    response
}
