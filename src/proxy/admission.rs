//! Admission of a WebSocket upgrade once it has a route, cheapest refusal first: the route's Origin
//! allow-list (403), the client's handshake rate on the route and its tunnels on the route (429 with
//! `Retry-After`), then the listener's handshake gate, where the excess of a reconnect storm waits its
//! turn and is refused (503 with `Retry-After`) only past the queue's wait. Every refusal is counted by
//! listener, route and reason; none is any backend's fault.
//!
//! The client is the one trusted proxies say it is (`admission::client_ip`, the listener's
//! `trusted_proxies`), starting from the connection's peer, which a PROXY protocol header may have given.

use std::time::Duration;

use http::HeaderMap;
use http::header::ORIGIN;

use super::ProxyError;
use crate::admission::{ClientKey, Counted, client_ip};
use crate::config::Config;
use crate::conn::ClientConn;
use crate::router::Route;
use crate::state::Shared;

/// Decides whether the upgrade in `headers` may go on to `route`'s backends, waiting at the listener's
/// gate if it has one. Admitted, it holds the client's place under the route's `max_tunnels_per_ip` (if
/// any), to be kept as long as the tunnel lives.
pub(super) async fn admit_upgrade(
    headers: &HeaderMap,
    route: &Route,
    config: &Config,
    conn: &ClientConn,
    shared: &Shared,
) -> Result<Option<Counted>, ProxyError> {
    let refused = |error: ProxyError| {
        shared
            .metrics
            .admission_rejections
            .with_label_values(&[
                &conn.listener.name,
                &route.config.name,
                error.admission_reason(),
            ])
            .inc();
        error
    };
    let limits = &route.config.admission;
    if let Some(origins) = &limits.origins {
        origins
            .check(headers.get_all(ORIGIN))
            .map_err(|refusal| refused(ProxyError::Origin(refusal)))?;
    }
    let listener = &conn.listener.admission;
    let per_client = limits.handshake_rate_per_ip.is_some() || limits.max_tunnels_per_ip.is_some();
    let mut place = None;
    if per_client {
        let ip = client_ip(conn.peer.ip(), headers, &listener.trusted_proxies);
        let key = ClientKey::new(ip, config.limits.ipv6_prefix);
        let clients = &route.scope.clients;
        if let Some(rate) = &limits.handshake_rate_per_ip {
            clients
                .take_token(key, rate)
                .map_err(|retry| refused(ProxyError::RateLimited(retry)))?;
        }
        if let Some(max) = limits.max_tunnels_per_ip {
            place = Some(
                clients
                    .acquire(key, max)
                    .ok_or_else(|| refused(ProxyError::TooManyTunnels))?,
            );
        }
    }
    if let Some(gate) = &listener.handshake_rate {
        let turn = conn.listener.scope.gate.pass(&gate.rate, gate.max_wait);
        // A shutdown does not wait for the queue (its `max_wait` may be longer than the drain): the
        // client is told to come back, to another instance.
        let passed = tokio::select! {
            passed = turn => passed,
            () = shared.shutdown.cancelled() => Err(Duration::from_secs(1)),
        };
        passed.map_err(|retry| refused(ProxyError::Overloaded(retry)))?;
    }
    Ok(place)
}
