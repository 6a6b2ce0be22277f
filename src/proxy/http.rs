//! Forwarding ordinary HTTP requests to a backend of the route's pool, bodies streamed both ways.
//!
//! A backend that cannot be reached is skipped for the next one (the request is still whole then:
//! `attempt.rs`); a backend that does not start answering within `backend_response` gets the client a 504.

use std::sync::Arc;
use std::time::Instant;

use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::ProxyError;
use super::attempt::{Attempts, preamble};
use crate::body::ProxyBody;
use crate::config::Config;
use crate::conn::ClientConn;
use crate::headers::{add_forwarded, strip_hop_by_hop};
use crate::metrics::status_class;
use crate::router::Route;
use crate::state::Shared;
use crate::upstream::{PoolKey, UpstreamBody};

pub async fn forward(
    req: Request<Incoming>,
    route: &Route,
    config: &Config,
    conn: &ClientConn,
    shared: &Shared,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let route_name = route.config.name.as_str();
    let (result, backend) = proxy(req, route, config, conn, shared).await;
    let response = result.unwrap_or_else(|error| {
        error.log(conn, route_name, backend.as_deref());
        error.response()
    });
    let status = response.status().as_u16();
    let metrics = &shared.metrics;
    metrics
        .http_requests
        .with_label_values(&[route_name, status_class(status), conn.protocol()])
        .inc();
    metrics
        .http_request_duration
        .with_label_values(&[route_name])
        .observe(started.elapsed().as_secs_f64());
    tracing::info!(
        target: "wsgate::access",
        client = %conn.peer,
        protocol = conn.protocol(),
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

/// The backend's response, or why there is none; and the backend that was last tried, if any.
async fn proxy(
    req: Request<Incoming>,
    route: &Route,
    config: &Config,
    conn: &ClientConn,
    shared: &Shared,
) -> (Result<Response<ProxyBody>, ProxyError>, Option<String>) {
    let (mut parts, body) = req.into_parts();
    let pool = &route.pool;
    // The sticky key is read before the headers are rewritten (X-Forwarded-For must be the client's).
    let affinity = pool.affinity(&parts.headers, &parts.uri, conn.peer.ip());
    strip_hop_by_hop(&mut parts.headers);
    add_forwarded(&mut parts.headers, conn.peer.ip(), conn.tls);
    parts.uri = origin_form(&parts.uri);
    parts.version = Version::HTTP_11;
    let mut request = Request::from_parts(parts, body);

    let mut attempts = Attempts::new(pool, &affinity);
    let mut stale_retries = 0;
    let mut last_tried = None;
    loop {
        let guard = match attempts.next() {
            Ok(guard) => guard,
            Err(error) => return (Err(error), last_tried),
        };
        let backend = Arc::clone(guard.backend());
        last_tried = Some(backend.addr.clone());
        // A connection that begins with a PROXY header names one client: it is pooled for that client
        // connection alone.
        let client = backend.proxy_protocol.map(|_| conn.peer);
        let worker = conn.listener.worker;
        let key = PoolKey::new(&backend.addr, backend.tls.as_ref(), client, worker);
        let preamble = preamble(&backend, conn);
        let connect_timeout = config.timeouts.connect;
        let checkout =
            shared
                .upstream
                .checkout(&key, backend.tls.as_ref(), &preamble, connect_timeout);
        let mut sender = match checkout.await {
            Ok(sender) => {
                attempts.answered(&guard);
                sender
            }
            Err(error) => match attempts.unreachable(&guard, &error) {
                Ok(()) => continue,
                Err(error) => return (Err(error), last_tried),
            },
        };
        let timeout = config.timeouts.backend_response;
        let sent = tokio::time::timeout(timeout, sender.try_send_request(request)).await;
        let error = match sent {
            Err(_) => ProxyError::Timeout(timeout),
            Ok(Ok(response)) => {
                let (mut parts, incoming) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                if let Some(cookie) = pool.sticky_cookie(&affinity, &backend, conn.tls) {
                    parts.headers.append(http::header::SET_COOKIE, cookie);
                }
                let upstream = Arc::clone(&shared.upstream);
                let body = UpstreamBody::new(incoming, upstream, key, sender, guard);
                return (Ok(Response::from_parts(parts, body.boxed())), last_tried);
            }
            Ok(Err(mut error)) => match error.take_message() {
                // The pooled connection was closed by the backend before our request went out: the
                // request is intact, so it may go again (on a fresh connection, since stale ones are
                // skipped), and the backend is not to blame.
                Some(unsent) => {
                    tracing::debug!(backend = %backend.addr, error = %error.error(), "retrying on a fresh connection");
                    request = unsent;
                    stale_retries += 1;
                    if stale_retries <= MAX_STALE_RETRIES {
                        continue;
                    }
                    ProxyError::Unreachable
                }
                None => ProxyError::Http(error.into_error()),
            },
        };
        return (Err(error), last_tried);
    }
}

/// Requests returned unsent by pooled connections that turned out closed, before giving up.
const MAX_STALE_RETRIES: u32 = 2;

/// The request target as sent to a backend: path and query only.
pub fn origin_form(uri: &Uri) -> Uri {
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::from(path)
}
