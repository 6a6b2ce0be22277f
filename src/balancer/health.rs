//! Active health checks (DESIGN.md §3): for every pool with a `health` table, one task probes each of its
//! backends every `interval` — an HTTP GET of `path` (2xx or 3xx passes), or with `websocket = true` an
//! upgrade to `path` (a 101 with the right `Sec-WebSocket-Accept` passes, and the probe then closes with
//! 1001). `fall` failures in a row take a backend down, `rise` passes in a row bring it back.
//!
//! A supervisor task follows reloads: every [`SUPERVISE_EVERY`] it looks at the current config generation,
//! starts a checker for each pool that gained (or changed) its `health` table and stops the checkers of
//! pools that lost it or are gone. A checker looks the pool up in the current generation on every round,
//! so backends added or removed by a reload are followed. Everything stops when the gateway shuts down.
//!
//! Passive health (ejection after `max_fails` consecutive connect/handshake failures) lives on the
//! backends themselves: see `Pool::connect_failed`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;

use super::{Backend, Pool};
use crate::config::HealthCheck;
use crate::gateway::Shared;
use crate::upstream::{self, ConnectError};
use crate::websocket::accepts;
use crate::websocket::frame::{ControlFrame, Role};

/// How often the supervisor looks for pools whose checks must start or stop.
pub const SUPERVISE_EVERY: Duration = Duration::from_millis(250);

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("answered {0}")]
    Status(StatusCode),
    #[error("answered 101 with a wrong Sec-WebSocket-Accept")]
    BadAccept,
}

/// Starts the health-check supervisor of a gateway; it ends when `shared.shutdown` is cancelled.
pub fn start_health_checks(shared: &Arc<Shared>) {
    let shared = Arc::clone(shared);
    tokio::spawn(supervise(shared));
}

/// A running checker task, aborted when dropped.
struct Checker {
    check: HealthCheck,
    task: JoinHandle<()>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn supervise(shared: Arc<Shared>) {
    let mut checkers: HashMap<String, Checker> = HashMap::new();
    loop {
        let state = shared.state.load_full();
        checkers.retain(|name, checker| {
            state
                .pools
                .get(name)
                .and_then(|p| p.health.as_ref())
                .is_some_and(|check| *check == checker.check)
        });
        for pool in state.pools.iter() {
            let Some(check) = &pool.health else { continue };
            if checkers.contains_key(&pool.name) {
                continue;
            }
            tracing::debug!(pool = %pool.name, interval_ms = check.interval.as_millis() as u64, "health checks start");
            let task = tokio::spawn(check_pool(
                Arc::clone(&shared),
                pool.name.clone(),
                check.clone(),
            ));
            checkers.insert(
                pool.name.clone(),
                Checker {
                    check: check.clone(),
                    task,
                },
            );
        }
        drop(state);
        tokio::select! {
            _ = tokio::time::sleep(SUPERVISE_EVERY) => {}
            // Shutdown: dropping the checkers aborts them.
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

/// Probes every backend of pool `name` each `check.interval`, all backends at once.
async fn check_pool(shared: Arc<Shared>, name: String, check: HealthCheck) {
    let mut ticker = tokio::time::interval(check.interval);
    // A round longer than the interval (slow timeouts) delays the next rather than bunching rounds up.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shared.shutdown.cancelled() => return,
        }
        let Some(pool) = shared.state.load().pools.get(&name).cloned() else {
            return;
        };
        let probes = pool.backends.iter().map(|b| probe(&b.addr, &check));
        let results = futures_util::future::join_all(probes).await;
        for (backend, result) in pool.backends.iter().zip(results) {
            record(&shared, &pool, backend, &check, result);
        }
    }
}

fn record(
    shared: &Shared,
    pool: &Pool,
    backend: &Backend,
    check: &HealthCheck,
    result: Result<(), ProbeError>,
) {
    if let Err(error) = &result {
        tracing::debug!(pool = %pool.name, backend = %backend.addr, %error, "health check failed");
    }
    let Some(up) = backend.record_check(result.is_ok(), check.rise, check.fall) else {
        return;
    };
    shared
        .metrics
        .backend_up
        .with_label_values(&[pool.name.as_str(), backend.addr.as_str()])
        .set(i64::from(backend.is_available()));
    match result {
        Ok(()) => tracing::info!(
            pool = %pool.name,
            backend = %backend.addr,
            rise = check.rise,
            "backend up: health checks pass"
        ),
        Err(error) => tracing::warn!(
            pool = %pool.name,
            backend = %backend.addr,
            fall = check.fall,
            %error,
            up,
            "backend down: health checks fail"
        ),
    }
}

/// One probe of `addr`, bounded by `check.timeout` as a whole.
pub async fn probe(addr: &str, check: &HealthCheck) -> Result<(), ProbeError> {
    tokio::time::timeout(check.timeout, probe_inner(addr, check))
        .await
        .map_err(|_| ProbeError::Timeout(check.timeout))?
}

async fn probe_inner(addr: &str, check: &HealthCheck) -> Result<(), ProbeError> {
    let stream = upstream::connect(addr, check.timeout).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "health check connection ended with an error");
        }
    });
    let mut request = Request::new(Empty::<Bytes>::new());
    *request.uri_mut() = check
        .path
        .parse()
        .unwrap_or_else(|_| http::Uri::from_static("/"));
    let headers = request.headers_mut();
    if let Ok(host) = HeaderValue::from_str(addr) {
        headers.insert(header::HOST, host);
    }
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static("wsgate-health-check"),
    );
    let key = if check.websocket {
        let nonce: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
        let key = BASE64.encode(nonce);
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        if let Ok(value) = HeaderValue::from_str(&key) {
            headers.insert(header::SEC_WEBSOCKET_KEY, value);
        }
        Some(key)
    } else {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        None
    };
    let response = sender.send_request(request).await?;
    let status = response.status();
    let Some(key) = key else {
        return if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(ProbeError::Status(status))
        };
    };
    if status != StatusCode::SWITCHING_PROTOCOLS {
        return Err(ProbeError::Status(status));
    }
    if !accepts(response.headers(), key.as_bytes()) {
        return Err(ProbeError::BadAccept);
    }
    // Say goodbye properly; whether the backend hears it does not change the verdict.
    if let Ok(upgraded) = hyper::upgrade::on(response).await {
        let mut io = TokioIo::new(upgraded);
        let close = ControlFrame::close(1001, "health check", Role::Client);
        let _ = io.write_all(close.as_bytes()).await;
        let _ = io.shutdown().await;
    }
    Ok(())
}
