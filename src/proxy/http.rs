//! Forwarding ordinary HTTP requests to a backend of the route's pool, bodies streamed both ways.
//!
//! A backend that cannot be reached is skipped for the next one (the request is still whole then:
//! `attempt.rs`); a backend that does not start answering within `backend_response` of the request being
//! written whole, or leaves a write of it pending that long, gets the client a 504, and one whose body
//! pauses longer than that is cut off. A client that pauses its request body longer than `client_body`
//! gets a 408, and the backend is not blamed. The exchange itself (`upstream::Exchange`) runs
//! in this task: the request is written and the answer read on the backend's socket from here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header;
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, Version};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::ProxyError;
use super::attempt::{Attempts, preamble};
use crate::balancer::{Backend, BackendGuard};
use crate::body::ProxyBody;
use crate::config::Config;
use crate::conn::ClientConn;
use crate::headers::{is_forwarding, strip_hop_by_hop, write_forwarded};
use crate::http1::message::{
    BodyLength, BodyReader, Head, content_length, encode_request_head, framing,
};
use crate::router::Route;
use crate::state::Shared;
use crate::upstream::{Answer, Exchange, ExchangeError, Patience, PoolKey, Recycle, UpstreamBody};

pub async fn forward(
    req: Request<Incoming>,
    route: &Route,
    config: &Config,
    conn: &ClientConn,
    shared: &Shared,
) -> Response<ProxyBody> {
    let started = Instant::now();
    // The access event's fields are taken before the request goes, and only when the event is on.
    let access = tracing::enabled!(target: "wsgate::access", tracing::Level::INFO)
        .then(|| (req.method().clone(), req.uri().path().to_string()));
    let route_name = route.config.name.as_str();
    let (result, backend) = proxy(req, route, config, conn, shared).await;
    let backend = backend.as_ref().map(|b| b.addr.as_str());
    let response = result.unwrap_or_else(|error| {
        error.log(conn, route_name, backend);
        error.response()
    });
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    route.http_metrics.record(
        &shared.metrics,
        route_name,
        status,
        conn.protocol(),
        elapsed,
    );
    if let Some((method, path)) = access {
        tracing::info!(
            target: "wsgate::access",
            client = %conn.peer,
            protocol = conn.protocol(),
            %method,
            %path,
            status,
            route = route_name,
            backend = backend.unwrap_or("-"),
            duration_ms = elapsed.as_millis() as u64,
            "http request"
        );
    }
    response
}

/// The backend's response, or why there is none; and the backend that was last tried, if any (its own
/// reference, moved out rather than its address copied: only the logs read it).
async fn proxy(
    req: Request<Incoming>,
    route: &Route,
    config: &Config,
    conn: &ClientConn,
    shared: &Shared,
) -> (
    Result<Response<ProxyBody>, ProxyError>,
    Option<Arc<Backend>>,
) {
    let (mut parts, mut body) = req.into_parts();
    let pool = &route.pool;
    // The sticky key is read before the headers are rewritten (X-Forwarded-For must be the client's).
    let affinity = pool.affinity(&parts.headers, &parts.uri, conn.peer.ip());
    strip_hop_by_hop(&mut parts.headers);
    // A body goes with the length the client gave (hyper holds the client to it), else in chunks.
    let chunked = !body.is_end_stream() && !parts.headers.contains_key(header::CONTENT_LENGTH);
    // The head is encoded once, whatever backend it goes to: the client's fields but the forwarding
    // ones, which are written from the client's address instead.
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut head = Vec::new();
    let more = |out: &mut Vec<u8>| {
        write_forwarded(&parts.headers, conn.peer.ip(), conn.tls, out);
        if chunked {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
    };
    encode_request_head(
        &parts.method,
        target,
        &parts.headers,
        is_forwarding,
        more,
        &mut head,
    );
    let head = Bytes::from(head);
    let method = parts.method;
    drop(parts.headers);

    let mut attempts = Attempts::new(pool, &affinity);
    let mut stale_retries = 0;
    let mut last_tried = None;
    loop {
        let guard = match attempts.next() {
            Ok(guard) => guard,
            Err(error) => return (Err(error), last_tried),
        };
        let backend = Arc::clone(guard.backend());
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
        let backend_conn = match checkout.await {
            Ok(backend_conn) => {
                attempts.answered(&guard);
                backend_conn
            }
            Err(error) => {
                let verdict = attempts.unreachable(&guard, &error);
                last_tried = Some(backend);
                match verdict {
                    Ok(()) => continue,
                    Err(error) => return (Err(error), last_tried),
                }
            }
        };
        let mut exchange = Exchange::new(
            backend_conn,
            head.clone(),
            body,
            chunked,
            method.is_idempotent(),
        );
        let timeout = config.timeouts.backend_response;
        let patience = Patience {
            client_body: config.timeouts.client_body,
            backend: timeout,
        };
        let error = match exchange.head(patience).await {
            Ok(answer) => {
                let recycle = |keep_alive| Recycle {
                    upstream: Arc::clone(&shared.upstream),
                    key,
                    keep_alive,
                };
                let response = response(answer, &method, exchange, recycle, guard, timeout).map(
                    |mut response| {
                        if let Some(cookie) = pool.sticky_cookie(&affinity, &backend, conn.tls) {
                            response.headers_mut().append(header::SET_COOKIE, cookie);
                        }
                        response
                    },
                );
                return (response, Some(backend));
            }
            // The pooled connection had been closed by the backend before it answered, and the request
            // may go again (on a fresh connection, since closed ones are skipped); the backend is not
            // to blame.
            Err(ExchangeError::Stale) => {
                tracing::debug!(backend = %backend.addr, "pooled connection was closed; retrying on another");
                body = exchange.into_request_body();
                stale_retries += 1;
                if stale_retries <= MAX_STALE_RETRIES {
                    last_tried = Some(backend);
                    continue;
                }
                ProxyError::Unreachable
            }
            Err(ExchangeError::Client(error)) => ProxyError::RequestBody(error),
            Err(ExchangeError::ClientTimeout) => {
                ProxyError::RequestBodyTimeout(config.timeouts.client_body)
            }
            Err(ExchangeError::Backend(error)) => ProxyError::Backend(error),
            Err(ExchangeError::BackendTimeout) => ProxyError::Timeout(timeout),
        };
        return (Err(error), Some(backend));
    }
}

/// The client's response from the backend's answer head: its body framed as the answer says (read from
/// the connection as the client takes it), hop-by-hop headers removed.
fn response(
    answer: Answer,
    method: &Method,
    exchange: Exchange,
    recycle: impl FnOnce(bool) -> Recycle,
    guard: BackendGuard,
    pause: Duration,
) -> Result<Response<ProxyBody>, ProxyError> {
    let Answer {
        head:
            Head {
                status,
                version,
                mut headers,
                ..
            },
        hop,
    } = answer;
    let chunked = hop.coded;
    let length = framing(
        method,
        status,
        chunked.then(|| hop.only_chunked()),
        &headers,
    )?;
    // An answer framed two ways (RFC 9112 §6.3 calls it an error), or a body announced where none may
    // be (204, 304), leaves it unsure where the backend thinks the answer ends: its connection ends
    // with it.
    let ambiguous = (chunked && headers.contains_key(header::CONTENT_LENGTH))
        || (matches!(status.as_u16(), 204 | 304)
            && (chunked || !matches!(content_length(&headers), Ok(None | Some(0)))));
    let keep_alive =
        version == Version::HTTP_11 && length != BodyLength::UntilClose && !ambiguous && !hop.close;
    // A length beside a transfer coding is not the body's (RFC 9112 §6.3): the client must not see it.
    if chunked {
        headers.remove(header::CONTENT_LENGTH);
    }
    hop.strip_listed(&mut headers);
    let reader = BodyReader::new(length);
    let body = UpstreamBody::new(exchange, reader, recycle(keep_alive), guard, pause);
    let mut response = Response::new(body.boxed());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
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
