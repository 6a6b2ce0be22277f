//! The WebSocket opening handshake through the proxy (RFC 6455 §4), in the order a request lives:
//! validate → pick a backend → connect → send the upgrade → read the answer → relay it → splice.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::Either;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::BufferPool;
use super::backend_http;
use super::transport::Buffered;
use super::tunnel::{self, Traffic, TunnelContext, TunnelOutcome, TunnelParams};
use crate::balancer::{Affinity, Backend, BackendGuard};
use crate::body::{self, ProxyBody};
use crate::client_io::{ClientIo, Replay};
use crate::config::{Config, WebSocketSettings};
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

/// Proxies a WebSocket upgrade request that hyper parsed: on success the client gets the backend's 101 and
/// a tunnel task is started once hyper hands the connection over; otherwise the client gets an error or
/// the backend's own non-101 answer.
pub async fn upgrade(
    mut req: Request<Incoming>,
    route: Arc<Route>,
    config: &Config,
    conn: &Arc<ClientConn>,
    shared: &Arc<Shared>,
) -> Response<ProxyBody> {
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (parts, _) = req.into_parts();
    match handshake(parts, route, config, conn, shared).await {
        Handshake::Refused(response) => response,
        Handshake::Switching(response, splice) => {
            let conn = Arc::clone(conn);
            let shared2 = Arc::clone(shared);
            shared
                .tasks
                .spawn(splice.run_upgraded(client_upgrade, conn, shared2));
            response
        }
    }
}

/// What an upgrade request came to, before the client side has switched protocols.
pub enum Handshake {
    /// The answer for the client: an error of wsgate's, or the backend's own refusal.
    Refused(Response<ProxyBody>),
    /// The 101 for the client, and the backend that switched behind it.
    Switching(Response<ProxyBody>, Splice),
}

/// Validates an upgrade request routed to `route`, picks a backend and performs the backend side of the
/// handshake. The client side is the caller's: it sends the answer, then runs the `Splice`.
pub async fn handshake(
    mut parts: http::request::Parts,
    route: Arc<Route>,
    config: &Config,
    conn: &ClientConn,
    shared: &Shared,
) -> Handshake {
    let started = Instant::now();
    let route_name = route.config.name.as_str();
    let count = |result: &str| {
        shared
            .metrics
            .ws_upgrades
            .with_label_values(&[route_name, result])
            .inc();
    };
    let key = match validate(&parts.headers) {
        Ok(key) => key,
        Err(rejection) => {
            count("rejected");
            tracing::info!(client = %conn.peer, route = route_name, %rejection, "upgrade rejected");
            return Handshake::Refused(reject(rejection));
        }
    };
    // The sticky key is read before the headers are rewritten (X-Forwarded-For must be the client's).
    let affinity = route
        .pool
        .affinity(&parts.headers, &parts.uri, conn.peer.ip());
    strip_hop_by_hop(&mut parts.headers);
    // `Content-Length: 0` is the only length an upgrade may have (`headers::check_request`): it says
    // nothing the backend needs, and a backend must see no framing it could read a body by.
    parts.headers.remove(header::CONTENT_LENGTH);
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
                tracing::warn!(client = %conn.peer, route = route_name, %error, "upgrade failed");
                return Handshake::Refused(body::text(error.status(), format!("{error}\n")));
            }
        };
    match answer {
        BackendAnswer::Other(mut response) => {
            let status = response.status();
            count(if status.is_client_error() {
                "rejected"
            } else {
                "backend_error"
            });
            tracing::info!(route = route_name, backend = %guard.backend().addr, status = status.as_u16(), "backend refused the upgrade");
            strip_hop_by_hop(response.headers_mut());
            Handshake::Refused(response)
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
                .with_label_values(&[route_name])
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
            Handshake::Switching(response, splice)
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
        // Passive health counts what the backend did, and only that: the request it got was checked by
        // wsgate (one key, one version, no body, `headers::check_request`), so a timeout, garbage, a
        // wrong accept key or a 5xx is the backend's. A 4xx is a live backend's answer to the client.
        match &answer {
            Ok(BackendAnswer::Other(response)) if response.status().is_server_error() => {
                pool.connect_failed(guard.backend())
            }
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
pub struct Splice {
    route: Arc<Route>,
    guard: BackendGuard,
    backend: TcpStream,
    backend_early: Bytes,
    allowed_rsv: u8,
    handshake_timeout: Duration,
}

impl Splice {
    /// Waits for hyper to hand over the client connection it answered with the 101, then relays.
    async fn run_upgraded(
        self,
        client_upgrade: OnUpgrade,
        conn: Arc<ClientConn>,
        shared: Arc<Shared>,
    ) {
        match tokio::time::timeout(self.handshake_timeout, client_upgrade).await {
            Ok(Ok(upgraded)) => {
                if let Some(tunnel) = self.run(ClientSide::Upgraded(upgraded), conn, shared) {
                    tunnel.await;
                }
            }
            Ok(Err(error)) => {
                tracing::debug!(client = %conn.peer, %error, "client upgrade did not complete");
            }
            Err(_) => {}
        }
    }

    /// The tunnel between the client, which has been sent the 101, and the backend: a future to spawn.
    /// `None` when the client connection cannot be taken over (a stream type wsgate does not know).
    ///
    /// Not `async`: everything the tunnel needs moves into it, and the future is the tunnel's own (see
    /// `tunnel::run`); an `async fn` would hold this `Splice` beside it for the tunnel's whole life.
    pub fn run(
        self,
        client: ClientSide,
        conn: Arc<ClientConn>,
        shared: Arc<Shared>,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        conn.phase.upgraded();
        let params = TunnelParams {
            allowed_rsv: self.allowed_rsv,
            shutdown: shared.shutdown.clone(),
            context: RouteTunnel::new(self.route, self.guard, conn, shared),
        };
        let backend_early = detach(self.backend_early);
        let Some(tunnel) = start_tunnel(client, self.backend, backend_early, params) else {
            tracing::error!("client connection could not be taken over after 101");
            return None;
        };
        Some(tunnel.map(|(outcome, context)| context.ended(&outcome)))
    }
}

/// A live tunnel as the gateway sees it: its route (settings, metrics), the backend it holds, the client
/// connection it came on. Counted in `wsgate_ws_tunnels_active` from creation to drop.
///
/// Metric handles are looked up when used (at most once a second per busy tunnel, see `tunnel.rs`), not
/// held: every idle tunnel would carry them.
struct RouteTunnel {
    route: Arc<Route>,
    guard: BackendGuard,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
}

impl RouteTunnel {
    fn new(
        route: Arc<Route>,
        guard: BackendGuard,
        conn: Arc<ClientConn>,
        shared: Arc<Shared>,
    ) -> RouteTunnel {
        let tunnel = RouteTunnel {
            route,
            guard,
            conn,
            shared,
        };
        tunnel.active().inc();
        tunnel
    }

    fn route_name(&self) -> &str {
        &self.route.config.name
    }

    fn active(&self) -> prometheus::IntGauge {
        self.shared
            .metrics
            .ws_tunnels_active
            .with_label_values(&[self.route_name(), &self.guard.backend().addr])
    }

    /// Counts the ending and writes the tunnel's access event.
    fn ended(self, outcome: &TunnelOutcome) {
        let route_name = self.route_name();
        let metrics = &self.shared.metrics;
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
            client = %self.conn.peer,
            route = route_name,
            backend = self.guard.backend().addr.as_str(),
            duration_ms = outcome.duration.as_millis() as u64,
            bytes_client_to_backend = outcome.client_to_backend.bytes,
            bytes_backend_to_client = outcome.backend_to_client.bytes,
            close_code = outcome.close_code,
            reason = outcome.reason.label(),
            "tunnel ended"
        );
    }
}

impl Drop for RouteTunnel {
    fn drop(&mut self) {
        self.active().dec();
    }
}

impl TunnelContext for RouteTunnel {
    fn settings(&self) -> &WebSocketSettings {
        &self.route.config.websocket
    }

    fn buffers(&self) -> &BufferPool {
        &self.shared.buffers
    }

    fn traffic(&self, up: Traffic, down: Traffic) {
        let (m, route) = (&self.shared.metrics, self.route_name());
        for (direction, traffic) in [("client_to_backend", up), ("backend_to_client", down)] {
            m.ws_bytes
                .with_label_values(&[route, direction])
                .inc_by(traffic.bytes);
            m.ws_frames
                .with_label_values(&[route, direction])
                .inc_by(traffic.frames);
        }
    }

    /// A uniformly random moment within the close spread in force (never past the drain deadline).
    fn shutdown_delay(&self) -> Duration {
        let timeouts = &self.shared.state.load().config.timeouts;
        let spread = timeouts.close_spread.min(timeouts.drain / 2);
        spread.mul_f64(fastrand::f64())
    }

    fn ping_rtt(&self, rtt: Duration) {
        self.shared
            .metrics
            .ws_ping_rtt
            .with_label_values(&[self.route_name()])
            .observe(rtt.as_secs_f64());
    }
}

/// The client side of a tunnel, once it has been sent the 101.
pub enum ClientSide {
    /// A plain connection whose upgrade request wsgate read itself (`first_request.rs`), with the bytes
    /// the client sent behind it.
    Plain(TcpStream, Bytes),
    /// A connection hyper served and upgraded: a TLS session, or a plain connection whose upgrade came
    /// after other requests.
    Upgraded(Upgraded),
}

/// The tunnel for a client stream: a plain socket, or a TLS session over one.
///
/// Not `async`: the TLS stream taken out of `upgraded` is several KiB, and a local of that type in the
/// task's state machine would make every tunnel, plain ones too, that much larger. The TLS tunnel is
/// boxed for the same reason.
// The type spells out the two tunnel futures; boxing them behind one `dyn` would cost every tunnel an
// allocation of its own besides its task.
#[allow(clippy::type_complexity)]
fn start_tunnel<X: TunnelContext + 'static>(
    client: ClientSide,
    backend: TcpStream,
    backend_early: Bytes,
    params: TunnelParams<X>,
) -> Option<
    Either<
        impl Future<Output = (TunnelOutcome, X)> + Send + 'static,
        Pin<Box<impl Future<Output = (TunnelOutcome, X)> + Send + 'static>>,
    >,
> {
    let (client, early) = match client {
        ClientSide::Plain(stream, early) => (stream, early),
        ClientSide::Upgraded(upgraded) => match upgraded.downcast::<TokioIo<Replay<ClientIo>>>() {
            Ok(parts) => {
                let (io, unread) = parts.io.into_inner().into_parts();
                let early = if unread.is_empty() {
                    detach(parts.read_buf)
                } else {
                    [unread, parts.read_buf].concat().into()
                };
                (io.into_stream(), early)
            }
            Err(upgraded) => {
                let parts = upgraded.downcast::<TokioIo<TlsStream<ClientIo>>>().ok()?;
                let client = Buffered(parts.io.into_inner());
                let early = detach(parts.read_buf);
                return Some(Either::Right(Box::pin(tunnel::run(
                    client,
                    early,
                    backend,
                    backend_early,
                    params,
                ))));
            }
        },
    };
    Some(Either::Left(tunnel::run(
        client,
        early,
        backend,
        backend_early,
        params,
    )))
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
