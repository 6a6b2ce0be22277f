//! The admin API's write endpoints, behind a bearer token from `admin.token_file` (without one they are
//! off):
//!
//! - `POST /pools/{pool}/backends/{id}/drain[?spread=30s|0s|none]`: the backend takes no new
//!   connections, its tunnels close spread over `spread` (default: the pool's `drain_spread`). Lasts
//!   until `undrain`, or until the backend leaves the config or DNS; a reload keeps it.
//! - `POST /pools/{pool}/backends/{id}/undrain`: ends an operator's drain (409 if the backend still
//!   drains for another cause: the config, DNS, a reload that removed it).
//! - `POST /reload`: re-reads the config file, as SIGHUP does, and answers with the result.
//!
//! Every write is logged (target `wsgate::admin`) with the token's name, the peer and what was done.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use tokio::sync::oneshot;

use crate::balancer::{Backend, BackendStatus, DrainCause, Pool};
use crate::body::{self, ProxyBody};
use crate::config::units;
use crate::state::Shared;

/// The longest spread an operator may ask for, as in the config (`drain_spread`).
const MAX_SPREAD: Duration = Duration::from_secs(24 * 3600);

/// Answers a `POST`.
pub(super) async fn write(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: &Shared,
) -> Response<ProxyBody> {
    let who = match authorize(&req, shared) {
        Ok(who) => who,
        Err(refusal) => {
            tracing::warn!(target: "wsgate::admin", %peer, path = req.uri().path(), status = refusal.status().as_u16(), "admin write refused");
            return refusal;
        }
    };
    let path = req.uri().path();
    if path == "/reload" {
        return reload(&who, peer, shared).await;
    }
    let segments: Vec<&str> = path.split('/').collect();
    let ["", "pools", pool, "backends", id, action] = segments.as_slice() else {
        return json_answer(
            StatusCode::NOT_FOUND,
            json!({ "error": "POST /reload, /pools/{pool}/backends/{id}/drain or .../undrain" }),
        );
    };
    let Ok(id) = percent_encoding::percent_decode_str(id).decode_utf8() else {
        return json_answer(
            StatusCode::BAD_REQUEST,
            json!({ "error": "the id is not UTF-8" }),
        );
    };
    let state = shared.state.load();
    let Some(pool) = state.pools.get(pool) else {
        return json_answer(
            StatusCode::NOT_FOUND,
            json!({ "error": format!("no pool `{pool}`") }),
        );
    };
    let Some(backend) = pool.backend(&id) else {
        return json_answer(
            StatusCode::NOT_FOUND,
            json!({ "error": format!("pool `{}` has no backend `{id}`", pool.name) }),
        );
    };
    match *action {
        "drain" => match spread(req.uri().query(), pool) {
            Ok(spread) => drain(pool, &backend, spread, (&who, peer), shared),
            Err(error) => json_answer(StatusCode::BAD_REQUEST, json!({ "error": error })),
        },
        "undrain" => undrain(pool, &backend, (&who, peer)),
        _ => json_answer(
            StatusCode::NOT_FOUND,
            json!({ "error": "the action is `drain` or `undrain`" }),
        ),
    }
}

/// The token's name, or the answer refusing the request: 403 while no token file is configured (the
/// write endpoints are off), 401 for a missing or wrong token.
#[allow(clippy::result_large_err)]
fn authorize(req: &Request<Incoming>, shared: &Shared) -> Result<String, Response<ProxyBody>> {
    let Some(tokens) = shared.state.load().admin_tokens.clone() else {
        return Err(json_answer(
            StatusCode::FORBIDDEN,
            json!({ "error": "the write endpoints are off: set admin.token_file" }),
        ));
    };
    // The scheme is case-insensitive (RFC 9110, 11.1).
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .filter(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "))
        .map(|v| v[7..].trim_ascii());
    match presented.and_then(|token| tokens.check(token)) {
        Some(name) => Ok(name.to_string()),
        None => {
            let mut refusal = json_answer(
                StatusCode::UNAUTHORIZED,
                json!({ "error": "a valid `Authorization: Bearer <token>` is needed" }),
            );
            refusal.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"wsgate\""),
            );
            Err(refusal)
        }
    }
}

/// `spread=` of the query: a duration, or `none`; absent: the pool's `drain_spread`.
fn spread(query: Option<&str>, pool: &Pool) -> Result<Option<Duration>, String> {
    let value = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == "spread").then_some(value)
        });
    match value {
        None => Ok(pool.drain_spread),
        Some("none") => Ok(None),
        Some(text) => match units::parse_duration(text) {
            Ok(spread) if spread <= MAX_SPREAD => Ok(Some(spread)),
            Ok(_) => Err("spread: at most 24h, or \"none\"".to_string()),
            Err(e) => Err(format!("spread: {e}, or \"none\"")),
        },
    }
}

fn drain(
    pool: &Pool,
    backend: &Arc<Backend>,
    spread: Option<Duration>,
    (who, peer): (&str, SocketAddr),
    shared: &Shared,
) -> Response<ProxyBody> {
    backend.set_cause(DrainCause::Admin, true, spread, Some(who));
    shared.close_idle_to(backend);
    tracing::info!(
        target: "wsgate::admin",
        by = who,
        %peer,
        pool = %pool.name,
        backend = %backend.id,
        spread_ms = spread.map(|s| s.as_millis() as u64),
        tunnels = backend.tunnels(),
        "backend drain asked"
    );
    json_answer(StatusCode::OK, backend_json(pool, backend))
}

fn undrain(
    pool: &Pool,
    backend: &Arc<Backend>,
    (who, peer): (&str, SocketAddr),
) -> Response<ProxyBody> {
    let still = backend.set_cause(DrainCause::Admin, false, None, None);
    tracing::info!(
        target: "wsgate::admin",
        by = who,
        %peer,
        pool = %pool.name,
        backend = %backend.id,
        still_draining = still,
        "backend undrain asked"
    );
    let status = if still {
        StatusCode::CONFLICT
    } else {
        StatusCode::OK
    };
    json_answer(status, backend_json(pool, backend))
}

async fn reload(who: &str, peer: SocketAddr, shared: &Shared) -> Response<ProxyBody> {
    tracing::info!(target: "wsgate::admin", by = who, %peer, "config reload asked");
    let (reply, answer) = oneshot::channel();
    if shared.reload_requests.send(reply).await.is_err() {
        return json_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "ok": false, "error": "the gateway is shutting down" }),
        );
    }
    match answer.await {
        Ok(Ok(generation)) => json_answer(
            StatusCode::OK,
            json!({ "ok": true, "generation": generation }),
        ),
        Ok(Err(error)) => json_answer(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({ "ok": false, "error": error }),
        ),
        Err(_) => json_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "ok": false, "error": "the gateway is shutting down" }),
        ),
    }
}

fn backend_json(pool: &Pool, backend: &Backend) -> serde_json::Value {
    json!(BackendStatus::of(&pool.name, backend))
}

fn json_answer(status: StatusCode, value: serde_json::Value) -> Response<ProxyBody> {
    body::with_type(status, "application/json", format!("{value}\n"))
}
