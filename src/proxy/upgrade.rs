//! The backend side of a WebSocket upgrade (RFC 6455 §4), in the order a request lives: validate → pick
//! a backend → connect → send the upgrade → read the answer → the 101 for the client, with the `Splice`
//! that will join the two once the client side has switched too (`splice.rs`).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use tokio::io::AsyncWriteExt;

use super::admission::admit_upgrade;
use super::attempt::{Attempts, preamble};
use super::http::origin_form;
use super::splice::Splice;
use super::{Answer, ProxyError};
use crate::balancer::{Affinity, BackendGuard};
use crate::body::{self, ProxyBody};
use crate::config::Config;
use crate::conn::ClientConn;
use crate::headers::{is_forwarding, strip_hop_by_hop, write_forwarded};
use crate::http1::backend;
use crate::http1::message::{BackendHttpError, encode_request_head};
use crate::router::Route;
use crate::state::Shared;
use crate::upstream::{self, BackendStream};
use crate::websocket::{accept_key, accepts, new_key, validate, validate_version};

/// Validates an upgrade request routed to `route`, picks a backend and performs the backend side of the
/// handshake. The client side is the caller's: it sends the answer, then runs the `Splice`.
pub async fn handshake(
    mut parts: http::request::Parts,
    route: Arc<Route>,
    config: &Config,
    conn: &ClientConn,
    shared: &Shared,
) -> Answer {
    let started = Instant::now();
    let route_name = route.config.name.as_str();
    let count = |result: &str| {
        route
            .ws_metrics
            .upgrade(&shared.metrics, route_name, result, conn.protocol());
    };
    let refuse = |error: ProxyError, backend: Option<&str>| {
        count(error.upgrade_result());
        error.log(conn, route_name, backend);
        Answer::Response(error.response())
    };
    // Over HTTP/2 (RFC 8441 §5) the client sends no key: the stream it opened is its proof of intent.
    // The backend gets an HTTP/1.1 upgrade with a key of wsgate's own, whose accept wsgate checks.
    let key = if conn.is_h2() {
        validate_version(&parts.headers).map(|()| {
            let key = new_key();
            parts.headers.insert(header::SEC_WEBSOCKET_KEY, key.clone());
            key
        })
    } else {
        validate(&parts.headers)
    };
    let key = match key {
        Ok(key) => key,
        Err(rejection) => return refuse(rejection.into(), None),
    };
    // Admission before anything is done for the request: a refused upgrade costs no backend anything.
    let place = match admit_upgrade(&parts.headers, &route, config, conn, shared).await {
        Ok(place) => place,
        Err(error) => return refuse(error, None),
    };
    // The sticky key is read before the headers are rewritten (X-Forwarded-For must be the client's).
    let affinity = route
        .pool
        .affinity(&parts.headers, &parts.uri, conn.peer.ip());
    strip_hop_by_hop(&mut parts.headers);
    // The head is encoded once, whatever backend it goes to, as for a proxied request: the client's
    // fields but the forwarding ones, written from the client's address instead, and the upgrade's own.
    // `Content-Length: 0` is the only length an upgrade may have (`headers::check_request`): it says
    // nothing the backend needs, and a backend must see no framing it could read a body by.
    let target = origin_form(&parts.uri);
    let target = target.path_and_query().map_or("/", |p| p.as_str());
    let mut head = Vec::new();
    encode_request_head(
        &http::Method::GET,
        target,
        &parts.headers,
        |name| is_forwarding(name) || name == header::CONTENT_LENGTH,
        |out| {
            write_forwarded(&parts.headers, conn.peer.ip(), conn.tls, out);
            out.extend_from_slice(b"upgrade: websocket\r\nconnection: Upgrade\r\n");
        },
        &mut head,
    );
    let request = BackendRequest { head, key: &key };
    let outcome = match connect_and_send(&route, &affinity, config, conn, &request).await {
        Ok(outcome) => outcome,
        Err((error, backend)) => return refuse(error, backend.as_deref()),
    };
    match outcome {
        Outcome::Refused(backend, mut response) => {
            let status = response.status();
            // Over HTTP/2 any 2xx answer to a CONNECT opens the tunnel (RFC 9113 §8.5): relayed, a
            // backend's page would look like an open WebSocket that closes at once. It is what it is
            // over HTTP/1.1 too, a failed upgrade, and gets the answer for one.
            if conn.is_h2() && (status.is_success() || status.is_informational()) {
                return refuse(ProxyError::NotSwitched(status), Some(&backend));
            }
            count(if status.is_client_error() {
                "rejected"
            } else {
                "backend_error"
            });
            tracing::info!(route = route_name, %backend, status = status.as_u16(), "backend refused the upgrade");
            strip_hop_by_hop(response.headers_mut());
            Answer::Response(response)
        }
        Outcome::Switching(guard, switched) => {
            count("ok");
            route
                .ws_metrics
                .handshake_duration(&shared.metrics, route_name)
                .observe(started.elapsed().as_secs_f64());
            let allowed_rsv = if switched
                .headers
                .contains_key(header::SEC_WEBSOCKET_EXTENSIONS)
            {
                0b111
            } else {
                0
            };
            let mut response = if conn.is_h2() {
                connect_established(switched.headers)
            } else {
                switching_protocols(switched.headers, &key)
            };
            if let Some(cookie) = route
                .pool
                .sticky_cookie(&affinity, guard.backend(), conn.tls)
            {
                response.headers_mut().append(header::SET_COOKIE, cookie);
            }
            let splice = Splice::new(
                route,
                (guard, place),
                switched.stream,
                switched.early,
                allowed_rsv,
            );
            Answer::Switching(response, splice)
        }
    }
}

/// The upgrade request as it goes to a backend.
struct BackendRequest<'a> {
    /// The encoded head.
    head: Vec<u8>,
    /// The key it carries, for the backend's accept.
    key: &'a HeaderValue,
}

/// A backend's 101 with a correct accept key: its headers, its raw stream, and what it sent behind the
/// 101.
struct Switched {
    headers: HeaderMap,
    stream: BackendStream,
    early: Bytes,
}

/// One backend's answer to the upgrade.
enum BackendAnswer {
    Switching(Switched),
    /// Any other answer, relayed to the client as it is.
    Other(Response<ProxyBody>),
}

/// What the attempts came to, short of an error of wsgate's own.
enum Outcome {
    /// The backend behind the guard switched protocols.
    Switching(BackendGuard, Switched),
    /// A backend (named) refused; its answer goes to the client.
    Refused(String, Response<ProxyBody>),
}

/// Picks a backend, connects (moving on to the next backend when a connect fails or the answer is a
/// server error) and performs the backend side of the handshake. An error comes with the backend last
/// tried, if any, for the log.
async fn connect_and_send(
    route: &Route,
    affinity: &Affinity,
    config: &Config,
    conn: &ClientConn,
    request: &BackendRequest<'_>,
) -> Result<Outcome, (ProxyError, Option<String>)> {
    let pool = &route.pool;
    let mut attempts = Attempts::new(pool, affinity);
    // The last server error passed over for another backend: relayed if no other backend answers.
    let mut passed_over: Option<Outcome> = None;
    let mut last_tried: Option<String> = None;
    loop {
        let guard = match attempts.next() {
            Ok(guard) => guard,
            Err(error) => return passed_over.ok_or((error, last_tried)),
        };
        let backend = guard.backend();
        let addr = &backend.addr;
        last_tried = Some(addr.clone());
        let preamble = preamble(backend, conn);
        let connect_timeout = config.timeouts.connect;
        let connected = upstream::connect(addr, backend.tls.as_ref(), connect_timeout, &preamble);
        let stream = match connected.await {
            Ok(stream) => stream,
            Err(error) => match attempts.unreachable(&guard, &error) {
                Ok(()) => continue,
                Err(error) => return passed_over.ok_or((error, last_tried)),
            },
        };
        let timeout = config.timeouts.handshake;
        let answer = tokio::time::timeout(timeout, send_upgrade(stream, request))
            .await
            .map_err(|_| ProxyError::Timeout(timeout))
            .and_then(|answer| answer);
        // Passive health counts what the backend did wrong, and only that: no answer in time, garbage,
        // a wrong accept key. Any status is a live backend's answer, a 5xx included: what makes an
        // application answer 5xx may be the request itself, and a client must not be able to eject
        // backends by sending one. (Active checks take out a backend that fails every upgrade.)
        let answer = match answer {
            Ok(answer) => {
                attempts.answered(&guard);
                answer
            }
            Err(error) => {
                attempts.faulted(&guard);
                return Err((error, last_tried));
            }
        };
        match answer {
            BackendAnswer::Switching(switched) => return Ok(Outcome::Switching(guard, switched)),
            BackendAnswer::Other(response) => {
                let status = response.status();
                let refused = Outcome::Refused(addr.clone(), response);
                // A server error before the 101 sends the upgrade on to the next backend while attempts
                // remain (the backend is not held meanwhile); the last one is relayed as it is.
                if status.is_server_error() && attempts.pass_over(&guard) {
                    tracing::warn!(pool = %pool.name, backend = %addr, status = status.as_u16(), "backend answered the upgrade with a server error; trying the next one");
                    passed_over = Some(refused);
                    continue;
                }
                return Ok(refused);
            }
        }
    }
}

async fn send_upgrade(
    mut stream: BackendStream,
    request: &BackendRequest<'_>,
) -> Result<BackendAnswer, ProxyError> {
    backend::send_head(&mut stream, &request.head).await?;
    let mut answer = backend::read_answer(&mut stream).await?;
    if answer.status != StatusCode::SWITCHING_PROTOCOLS {
        let body = backend::read_body(&mut stream, &mut answer).await?;
        // The connection ends here (it is not pooled): a TLS backend gets its `close_notify`. One
        // attempt that cannot wait (a refusal's answer must not), which a fresh socket always has room
        // for; a plain socket is closed by the drop.
        let _ = stream.shutdown().now_or_never();
        let mut response = Response::new(body::full(body));
        *response.status_mut() = answer.status;
        *response.headers_mut() = answer.headers;
        return Ok(BackendAnswer::Other(response));
    }
    if !accepts(&answer.headers, request.key.as_bytes()) {
        return Err(ProxyError::BadAccept);
    }
    // The stream now carries a tunnel: a TLS 1.3 session keeps only its keys from here on. (The hand-over
    // cannot fail once `RecordLayer::takes` said yes; if rustls refused it all the same, the backend's
    // session is gone and the upgrade fails like a broken backend connection.)
    let stream = stream.establish().map_err(BackendHttpError::Io)?;
    Ok(BackendAnswer::Switching(Switched {
        headers: answer.headers,
        stream,
        early: Bytes::from(answer.rest),
    }))
}

/// The 200 that opens a WebSocket over HTTP/2 (RFC 8441 §5): the backend's headers (subprotocol,
/// extensions, cookies) without the HTTP/1.1 handshake's own, which mean nothing on an HTTP/2 stream.
fn connect_established(mut headers: HeaderMap) -> Response<ProxyBody> {
    strip_hop_by_hop(&mut headers);
    headers.remove(header::SEC_WEBSOCKET_ACCEPT);
    headers.remove(header::CONTENT_LENGTH);
    let mut response = Response::new(body::empty());
    *response.headers_mut() = headers;
    response
}

/// The 101 for the client: the backend's headers (subprotocol, extensions, cookies), hop-by-hop ones
/// replaced by the upgrade's own.
fn switching_protocols(mut headers: HeaderMap, key: &HeaderValue) -> Response<ProxyBody> {
    strip_hop_by_hop(&mut headers);
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *response.headers_mut() = headers;
    response
}
