//! Forwarding ordinary HTTP requests to a backend of the route's pool, bodies streamed both ways.
//!
//! A backend that cannot be reached is skipped for the next one (the request is still whole then); a
//! backend that does not start answering within `backend_response` gets the client a 504.

use std::sync::Arc;
use std::time::Instant;

use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::balancer::Backend;
use crate::body::{self, ProxyBody};
use crate::config::Config;
use crate::gateway::Shared;
use crate::headers::{add_forwarded, strip_hop_by_hop};
use crate::listener::ClientConn;
use crate::metrics::status_class;
use crate::router::Route;
use crate::upstream::UpstreamBody;

pub async fn forward(
    req: Request<Incoming>,
    route: &Arc<Route>,
    config: &Config,
    conn: &ClientConn,
    shared: &Shared,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let (response, backend) = proxy(req, route, config, conn, shared).await;
    let status = response.status().as_u16();
    let route_name = route.config.name.as_str();
    let metrics = &shared.metrics;
    metrics
        .http_requests
        .with_label_values(&[route_name, status_class(status)])
        .inc();
    metrics
        .http_request_duration
        .with_label_values(&[route_name])
        .observe(started.elapsed().as_secs_f64());
    tracing::info!(
        target: "wsgate::access",
        client = %conn.peer,
        %method,
        %path,
        status,
        route = route_name,
        backend = backend.as_deref().unwrap_or("-"),
        duration_ms = started.elapsed().as_millis() as u64,
        "http request"
    );
    response
}

/// Returns the response and the backend that produced it, if any.
async fn proxy(
    req: Request<Incoming>,
    route: &Route,
    config: &Config,
    conn: &ClientConn,
    shared: &Shared,
) -> (Response<ProxyBody>, Option<String>) {
    let (mut parts, body) = req.into_parts();
    let pool = &route.pool;
    // The sticky key is read before the headers are rewritten (X-Forwarded-For must be the client's).
    let affinity = pool.affinity(&parts.headers, &parts.uri, conn.peer.ip());
    strip_hop_by_hop(&mut parts.headers);
    add_forwarded(&mut parts.headers, conn.peer.ip(), conn.tls);
    parts.uri = origin_form(&parts.uri);
    parts.version = Version::HTTP_11;
    let mut request = Request::from_parts(parts, body);

    let mut tried: Vec<Arc<Backend>> = Vec::new();
    let mut stale_retries = 0;
    loop {
        let Some(guard) = pool.pick(&affinity, &tried) else {
            return if tried.is_empty() {
                (
                    body::text(StatusCode::SERVICE_UNAVAILABLE, "no backend available\n"),
                    None,
                )
            } else {
                (
                    body::text(StatusCode::BAD_GATEWAY, "backend unreachable\n"),
                    None,
                )
            };
        };
        let backend = Arc::clone(guard.backend());
        let mut sender = match shared
            .upstream
            .checkout(&backend.addr, config.timeouts.connect)
            .await
        {
            Ok(sender) => {
                pool.connect_succeeded(&backend);
                sender
            }
            Err(error) => {
                tracing::warn!(pool = %pool.name, backend = %backend.addr, %error, "backend connect failed");
                pool.connect_failed(&backend);
                tried.push(backend);
                if tried.len() >= pool.max_attempts() {
                    return (
                        body::text(StatusCode::BAD_GATEWAY, "backend unreachable\n"),
                        None,
                    );
                }
                continue;
            }
        };
        let sent = tokio::time::timeout(
            config.timeouts.backend_response,
            sender.try_send_request(request),
        )
        .await;
        match sent {
            Err(_) => {
                return (
                    body::text(
                        StatusCode::GATEWAY_TIMEOUT,
                        "backend did not answer in time\n",
                    ),
                    Some(backend.addr.clone()),
                );
            }
            Ok(Ok(response)) => {
                let (mut parts, incoming) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                if let Some(cookie) = pool.sticky_cookie(&affinity, &backend, conn.tls) {
                    parts.headers.append(http::header::SET_COOKIE, cookie);
                }
                let body = UpstreamBody::new(incoming, Arc::clone(&shared.upstream), sender, guard);
                return (
                    Response::from_parts(parts, body.boxed()),
                    Some(backend.addr.clone()),
                );
            }
            Ok(Err(mut error)) => match error.take_message() {
                // The pooled connection was closed by the backend before our request went out: the request
                // is intact, so it may go again (on a fresh connection, since stale ones were skipped).
                Some(unsent) => {
                    tracing::debug!(backend = %backend.addr, error = %error.error(), "retrying on a fresh connection");
                    request = unsent;
                    stale_retries += 1;
                    if stale_retries > 2 {
                        return (
                            body::text(StatusCode::BAD_GATEWAY, "backend unreachable\n"),
                            None,
                        );
                    }
                }
                None => {
                    tracing::warn!(backend = %backend.addr, error = %error.error(), "backend request failed");
                    return (
                        body::text(StatusCode::BAD_GATEWAY, "backend error\n"),
                        Some(backend.addr.clone()),
                    );
                }
            },
        }
    }
}

/// The request target as sent to a backend: path and query only.
pub fn origin_form(uri: &Uri) -> Uri {
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::from(path)
}
