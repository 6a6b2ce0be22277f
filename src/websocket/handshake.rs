//! The WebSocket opening handshake through the proxy (RFC 6455 §4), in the order a request lives:
//! validate → pick a backend → connect → send the upgrade → read the answer → relay it → splice.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures_util::future::Either;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::backend_http;
use super::transport::Buffered;
use super::tunnel::{self, Traffic, TunnelObserver, TunnelOutcome, TunnelParams};
use crate::balancer::{Affinity, Backend, BackendGuard};
use crate::body::{self, ProxyBody};
use crate::client_io::ClientIo;
use crate::config::Config;
use crate::gateway::Shared;
use crate::headers::{add_forwarded, has_token, strip_hop_by_hop};
use crate::http_proxy::origin_form;
use crate::listener::ClientConn;
use crate::router::Route;
use crate::upstream;

const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (§4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key);
    sha1.update(WEBSOCKET_GUID.as_bytes());
    BASE64.encode(sha1.finalize())
}

/// Whether a backend's 101 carries the right `Sec-WebSocket-Accept` for the key that was sent.
pub fn accepts(headers: &HeaderMap, key: &[u8]) -> bool {
    let expected = accept_key(key);
    headers
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .is_some_and(|v| v.as_bytes() == expected.as_bytes())
}

/// A WebSocket upgrade: GET over HTTP/1.1 with `Upgrade: websocket` and `Connection: upgrade` (§4.2.1).
pub fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    req.method() == Method::GET
        && req.version() == Version::HTTP_11
        && has_token(req.headers(), header::UPGRADE, "websocket")
        && has_token(req.headers(), header::CONNECTION, "upgrade")
}

/// Why an upgrade request is refused before any backend is involved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum Rejection {
    #[error("missing or malformed Sec-WebSocket-Key")]
    BadKey,
    #[error("unsupported Sec-WebSocket-Version")]
    BadVersion,
}

/// Checks the client's key and version; returns the key.
fn validate(headers: &HeaderMap) -> Result<HeaderValue, Rejection> {
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes().trim_ascii() == b"13");
    if !version_ok {
        return Err(Rejection::BadVersion);
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or(Rejection::BadKey)?;
    match BASE64.decode(key.as_bytes().trim_ascii()) {
        Ok(nonce) if nonce.len() == 16 => Ok(key.clone()),
        _ => Err(Rejection::BadKey),
    }
}

/// How a failed upgrade is answered and counted.
#[derive(Debug, thiserror::Error)]
enum UpgradeError {
    #[error("no backend available")]
    NoBackend,
    #[error(transparent)]
    Connect(#[from] upstream::ConnectError),
    #[error("backend did not answer the upgrade within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Backend(#[from] backend_http::BackendHttpError),
    #[error("backend answered 101 with a wrong Sec-WebSocket-Accept")]
    BadAccept,
}

impl UpgradeError {
    fn status(&self) -> StatusCode {
        match self {
            UpgradeError::NoBackend => StatusCode::SERVICE_UNAVAILABLE,
            UpgradeError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    fn result_label(&self) -> &'static str {
        match self {
            UpgradeError::NoBackend => "no_backend",
            _ => "backend_error",
        }
    }
}

/// Proxies a WebSocket upgrade request: on success the client gets the backend's 101 and a tunnel task
/// is started; otherwise the client gets an error or the backend's own non-101 answer.
pub async fn upgrade(
    mut req: Request<Incoming>,
    route: Arc<Route>,
    config: &Config,
    conn: &Arc<ClientConn>,
    shared: &Arc<Shared>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let route_name = route.config.name.clone();
    let count = |result: &str| {
        shared
            .metrics
            .ws_upgrades
            .with_label_values(&[&route_name, result])
            .inc();
    };
    let key = match validate(req.headers()) {
        Ok(key) => key,
        Err(rejection) => {
            count("rejected");
            tracing::info!(client = %conn.peer, route = %route_name, %rejection, "upgrade rejected");
            return reject(rejection);
        }
    };
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, _) = req.into_parts();
    // The sticky key is read before the headers are rewritten (X-Forwarded-For must be the client's).
    let affinity = route
        .pool
        .affinity(&parts.headers, &parts.uri, conn.peer.ip());
    strip_hop_by_hop(&mut parts.headers);
    add_forwarded(&mut parts.headers, conn.peer.ip(), conn.tls);
    parts
        .headers
        .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    let target = origin_form(&parts.uri);

    let (guard, answer) =
        match connect_and_send(&route, &affinity, config, &target, &parts.headers, &key).await {
            Ok(done) => done,
            Err(error) => {
                count(error.result_label());
                tracing::warn!(client = %conn.peer, route = %route_name, %error, "upgrade failed");
                return body::text(error.status(), format!("{error}\n"));
            }
        };
    match answer {
        BackendAnswer::Other(response) => {
            let status = response.status();
            count(if status.is_client_error() {
                "rejected"
            } else {
                "backend_error"
            });
            tracing::info!(route = %route_name, backend = %guard.backend().addr, status = status.as_u16(), "backend refused the upgrade");
            let mut response = response;
            strip_hop_by_hop(response.headers_mut());
            response
        }
        BackendAnswer::Switching {
            headers,
            stream,
            early,
        } => {
            count("ok");
            shared
                .metrics
                .ws_handshake_duration
                .with_label_values(&[&route_name])
                .observe(started.elapsed().as_secs_f64());
            let allowed_rsv = if headers.contains_key(header::SEC_WEBSOCKET_EXTENSIONS) {
                0b111
            } else {
                0
            };
            let mut response = switching_protocols(headers, &key);
            if let Some(cookie) = route
                .pool
                .sticky_cookie(&affinity, guard.backend(), conn.tls)
            {
                response.headers_mut().append(header::SET_COOKIE, cookie);
            }
            let splice = Splice {
                route,
                guard,
                backend: stream,
                backend_early: early,
                allowed_rsv,
                handshake_timeout: config.timeouts.handshake,
            };
            let conn = Arc::clone(conn);
            let shared2 = Arc::clone(shared);
            shared
                .tasks
                .spawn(splice.run(client_upgrade, conn, shared2));
            response
        }
    }
}

fn reject(rejection: Rejection) -> Response<ProxyBody> {
    match rejection {
        Rejection::BadKey => body::text(
            StatusCode::BAD_REQUEST,
            "missing or malformed Sec-WebSocket-Key\n",
        ),
        Rejection::BadVersion => {
            let mut response = body::text(
                StatusCode::UPGRADE_REQUIRED,
                "only WebSocket version 13 is supported\n",
            );
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            response
        }
    }
}

enum BackendAnswer {
    /// 101 with a correct accept key: the backend's headers and its raw stream.
    Switching {
        headers: HeaderMap,
        stream: TcpStream,
        early: Bytes,
    },
    /// Any other answer, relayed to the client as it is.
    Other(Response<ProxyBody>),
}

/// Picks a backend, connects (moving on to the next backend when a connect fails) and performs the
/// backend side of the handshake.
async fn connect_and_send(
    route: &Route,
    affinity: &Affinity,
    config: &Config,
    target: &http::Uri,
    headers: &HeaderMap,
    key: &HeaderValue,
) -> Result<(BackendGuard, BackendAnswer), UpgradeError> {
    let pool = &route.pool;
    let mut tried: Vec<Arc<Backend>> = Vec::new();
    loop {
        let guard = pool.pick(affinity, &tried).ok_or(UpgradeError::NoBackend)?;
        let stream = match upstream::connect(&guard.backend().addr, config.timeouts.connect).await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(pool = %pool.name, backend = %guard.backend().addr, %error, "backend connect failed");
                pool.connect_failed(guard.backend());
                tried.push(Arc::clone(guard.backend()));
                if tried.len() >= pool.max_attempts() {
                    return Err(error.into());
                }
                continue;
            }
        };
        let timeout = config.timeouts.handshake;
        let answer = tokio::time::timeout(timeout, send_upgrade(stream, target, headers, key))
            .await
            .map_err(|_| UpgradeError::Timeout(timeout))
            .and_then(|answer| answer);
        // Passive health counts handshake failures too (not a takeover failure, which is ours).
        match &answer {
            Ok(_) => pool.connect_succeeded(guard.backend()),
            Err(_) => pool.connect_failed(guard.backend()),
        }
        // DESIGN.md §1: a 5xx before the 101 sends the upgrade on to the next backend while attempts remain;
        // the last one's answer is relayed as it is.
        if let Ok(BackendAnswer::Other(response)) = &answer
            && response.status().is_server_error()
            && tried.len() + 1 < pool.max_attempts()
        {
            tracing::warn!(pool = %pool.name, backend = %guard.backend().addr, status = response.status().as_u16(), "backend answered the upgrade with a server error; trying the next one");
            tried.push(Arc::clone(guard.backend()));
            continue;
        }
        return Ok((guard, answer?));
    }
}

async fn send_upgrade(
    mut stream: TcpStream,
    target: &http::Uri,
    headers: &HeaderMap,
    key: &HeaderValue,
) -> Result<BackendAnswer, UpgradeError> {
    backend_http::send_request(&mut stream, target, headers).await?;
    let mut answer = backend_http::read_answer(&mut stream).await?;
    if answer.status != StatusCode::SWITCHING_PROTOCOLS {
        let body = backend_http::read_body(&mut stream, &mut answer).await?;
        let mut response = Response::new(body::full(body));
        *response.status_mut() = answer.status;
        *response.headers_mut() = answer.headers;
        return Ok(BackendAnswer::Other(response));
    }
    if !accepts(&answer.headers, key.as_bytes()) {
        return Err(UpgradeError::BadAccept);
    }
    Ok(BackendAnswer::Switching {
        headers: answer.headers,
        stream,
        early: Bytes::from(answer.rest),
    })
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

/// A backend that has switched protocols, waiting for the client side to do the same.
struct Splice {
    route: Arc<Route>,
    guard: BackendGuard,
    backend: TcpStream,
    backend_early: Bytes,
    allowed_rsv: u8,
    handshake_timeout: Duration,
}

impl Splice {
    /// A uniformly random moment within the configured close spread (never past the drain deadline).
    fn shutdown_delay(&self, shared: &Shared) -> Duration {
        let timeouts = &shared.state.load().config.timeouts;
        let spread = timeouts.close_spread.min(timeouts.drain / 2);
        spread.mul_f64(fastrand::f64())
    }

    async fn run(self, client_upgrade: OnUpgrade, conn: Arc<ClientConn>, shared: Arc<Shared>) {
        let route_name = self.route.config.name.as_str();
        let backend_addr = self.guard.backend().addr.as_str();
        let upgraded: Upgraded =
            match tokio::time::timeout(self.handshake_timeout, client_upgrade).await {
                Ok(Ok(upgraded)) => upgraded,
                Ok(Err(error)) => {
                    tracing::debug!(client = %conn.peer, %error, "client upgrade did not complete");
                    return;
                }
                Err(_) => return,
            };
        let metrics = &shared.metrics;
        let active = metrics
            .ws_tunnels_active
            .with_label_values(&[route_name, backend_addr]);
        active.inc();
        let observer = RouteTraffic::new(&shared, route_name);
        let params = TunnelParams {
            settings: &self.route.config.websocket,
            allowed_rsv: self.allowed_rsv,
            buffers: &shared.buffers,
            shutdown: &shared.shutdown,
            shutdown_delay: self.shutdown_delay(&shared),
            observer: &observer,
        };
        let backend_early = detach(self.backend_early);
        let Some(tunnel) = start_tunnel(upgraded, self.backend, backend_early, params) else {
            active.dec();
            tracing::error!("client connection could not be taken over after 101");
            return;
        };
        let outcome = tunnel.await;
        active.dec();
        metrics
            .ws_closes
            .with_label_values(&[route_name, outcome.reason.label()])
            .inc();
        metrics
            .ws_tunnel_duration
            .with_label_values(&[route_name])
            .observe(outcome.duration.as_secs_f64());
        tracing::info!(
            target: "wsgate::access",
            client = %conn.peer,
            route = route_name,
            backend = backend_addr,
            duration_ms = outcome.duration.as_millis() as u64,
            bytes_client_to_backend = outcome.client_to_backend.bytes,
            bytes_backend_to_client = outcome.backend_to_client.bytes,
            close_code = outcome.close_code,
            reason = outcome.reason.label(),
            "tunnel ended"
        );
    }
}

/// The tunnel for an upgraded client stream: a plain socket, or a TLS session over one.
///
/// Not `async`: the TLS stream taken out of `upgraded` is several KiB, and a local of that type in the
/// spawned task's state machine would make every tunnel, plain ones too, that much larger. The TLS tunnel
/// is boxed for the same reason.
fn start_tunnel<'a>(
    upgraded: Upgraded,
    backend: TcpStream,
    backend_early: Bytes,
    params: TunnelParams<'a>,
) -> Option<
    Either<
        impl Future<Output = TunnelOutcome> + 'a,
        Pin<Box<impl Future<Output = TunnelOutcome> + 'a>>,
    >,
> {
    match upgraded.downcast::<TokioIo<ClientIo>>() {
        Ok(parts) => {
            let client = parts.io.into_inner().into_stream();
            let early = detach(parts.read_buf);
            Some(Either::Left(tunnel::run(
                client,
                early,
                backend,
                backend_early,
                params,
            )))
        }
        Err(upgraded) => {
            let parts = upgraded.downcast::<TokioIo<TlsStream<ClientIo>>>().ok()?;
            let client = Buffered(parts.io.into_inner());
            let early = detach(parts.read_buf);
            Some(Either::Right(Box::pin(tunnel::run(
                client,
                early,
                backend,
                backend_early,
                params,
            ))))
        }
    }
}

/// Bytes read past a handshake are a slice of the HTTP layer's whole read buffer (8 KiB or more); keeping
/// the slice would keep that buffer alive for the tunnel's life. Copy the few bytes out, or drop it.
fn detach(early: Bytes) -> Bytes {
    if early.is_empty() {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(&early)
    }
}

/// Hands a tunnel's counters to the route's metrics.
struct RouteTraffic {
    bytes_up: prometheus::IntCounter,
    bytes_down: prometheus::IntCounter,
    frames_up: prometheus::IntCounter,
    frames_down: prometheus::IntCounter,
    rtt: prometheus::Histogram,
}

impl RouteTraffic {
    fn new(shared: &Shared, route: &str) -> RouteTraffic {
        let m = &shared.metrics;
        RouteTraffic {
            bytes_up: m.ws_bytes.with_label_values(&[route, "client_to_backend"]),
            bytes_down: m.ws_bytes.with_label_values(&[route, "backend_to_client"]),
            frames_up: m.ws_frames.with_label_values(&[route, "client_to_backend"]),
            frames_down: m.ws_frames.with_label_values(&[route, "backend_to_client"]),
            rtt: m.ws_ping_rtt.with_label_values(&[route]),
        }
    }
}

impl TunnelObserver for RouteTraffic {
    fn traffic(&self, up: Traffic, down: Traffic) {
        self.bytes_up.inc_by(up.bytes);
        self.bytes_down.inc_by(down.bytes);
        self.frames_up.inc_by(up.frames);
        self.frames_down.inc_by(down.frames);
    }

    fn ping_rtt(&self, rtt: Duration) {
        self.rtt.observe(rtt.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn key_and_version_are_checked() {
        let mut h = HeaderMap::new();
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        assert_eq!(validate(&h), Err(Rejection::BadKey));
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("c2hvcnQ="),
        );
        assert_eq!(validate(&h), Err(Rejection::BadKey));
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert!(validate(&h).is_ok());
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("12"),
        );
        assert_eq!(validate(&h), Err(Rejection::BadVersion));
    }
}
