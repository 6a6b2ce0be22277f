//! Every way the proxy layer answers a request itself instead of relaying a backend's answer, in one
//! table: the status and body the client gets, the label the metrics count it under, and whether it is
//! the client's fault (logged at `info`) or the backends' (logged at `warn`). HTTP forwarding and the
//! WebSocket upgrade both answer through it, so the same failure gets the same answer on either path.

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::body::{self, ProxyBody};
use crate::conn::ClientConn;
use crate::headers::BadRequest;
use crate::http1::backend::BackendHttpError;
use crate::origin::OriginRefusal;
use crate::websocket::Rejection;

/// What a client over its tunnel limit is told to wait: a tunnel's end cannot be foreseen, and a client
/// retrying at once would only be refused again.
const TUNNEL_LIMIT_RETRY_AFTER: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A head wsgate will not forward (ambiguous framing, repeated singletons): the connection closes,
    /// since what follows the head cannot be trusted to be framed the way the head says.
    #[error(transparent)]
    BadRequest(#[from] BadRequest),
    #[error("request head larger than limits.max_header_size")]
    HeadTooLarge,
    #[error("no route for this request")]
    NoRoute,
    /// An extended CONNECT for a protocol other than `websocket` (RFC 8441 §4), or a plain CONNECT:
    /// wsgate is no forward proxy.
    #[error("CONNECT is supported for the websocket protocol only")]
    UnsupportedProtocol,
    /// An upgrade whose key or version wsgate refuses before any backend sees it.
    #[error(transparent)]
    BadUpgrade(#[from] Rejection),
    /// The route's pool has no backend taking connections (all down, ejected or draining).
    #[error("no backend available")]
    NoBackend,
    /// Every backend tried could not be connected to (or the attempts allowed ran out).
    #[error("no backend could be reached")]
    Unreachable,
    #[error("backend did not answer within {0:?}")]
    Timeout(Duration),
    /// The backend's answer to a request or an upgrade was not valid HTTP, or the connection broke or
    /// closed before the answer head was whole.
    #[error(transparent)]
    Backend(#[from] BackendHttpError),
    /// The client's request body failed before the backend answered: the client left, or sent less than
    /// its head announced. The backend is not to blame.
    #[error("request body failed: {0}")]
    RequestBody(#[source] hyper::Error),
    /// The client paused its request body longer than `timeouts.client_body` while the backend waited
    /// for it. The backend is not to blame.
    #[error("request body paused longer than {0:?}")]
    RequestBodyTimeout(Duration),
    #[error("backend answered 101 with a wrong Sec-WebSocket-Accept")]
    BadAccept,
    /// A backend answered a WebSocket over HTTP/2 with this success status instead of switching
    /// protocols, which the client could only take for an open tunnel.
    #[error("backend answered the upgrade with {0} instead of switching protocols")]
    NotSwitched(StatusCode),
    /// An upgrade whose `Origin` the route's `allowed_origins` does not take.
    #[error("origin refused: {0}")]
    Origin(OriginRefusal),
    /// The client is over its handshake rate on the route; a token is back after this long.
    #[error("handshake rate exceeded; retry in {0:?}")]
    RateLimited(Duration),
    /// The client holds as many tunnels on the route as `max_tunnels_per_ip` allows.
    #[error("too many tunnels from this client")]
    TooManyTunnels,
    /// The listener's handshake gate would make this upgrade wait longer than its queue allows: load
    /// shed, no one's fault. The queue is short enough to join again after this long.
    #[error("handshake queue full; retry in {0:?}")]
    Overloaded(Duration),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) | ProxyError::RequestBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::RequestBodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::UnsupportedProtocol => StatusCode::NOT_IMPLEMENTED,
            ProxyError::BadUpgrade(Rejection::BadKey) => StatusCode::BAD_REQUEST,
            ProxyError::BadUpgrade(Rejection::BadVersion) => StatusCode::UPGRADE_REQUIRED,
            ProxyError::NoBackend | ProxyError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Origin(_) => StatusCode::FORBIDDEN,
            ProxyError::RateLimited(_) | ProxyError::TooManyTunnels => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Unreachable
            | ProxyError::Backend(_)
            | ProxyError::BadAccept
            | ProxyError::NotSwitched(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The error's name: the `error` field of the event `log` writes.
    pub fn label(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::RequestBody(_) => "request_body",
            ProxyError::RequestBodyTimeout(_) => "request_body_timeout",
            ProxyError::HeadTooLarge => "head_too_large",
            ProxyError::NoRoute => "no_route",
            ProxyError::UnsupportedProtocol => "unsupported_protocol",
            ProxyError::BadUpgrade(_) => "bad_upgrade",
            ProxyError::NoBackend => "no_backend",
            ProxyError::Origin(_) => "origin_refused",
            ProxyError::RateLimited(_) | ProxyError::TooManyTunnels | ProxyError::Overloaded(_) => {
                "limited"
            }
            ProxyError::Unreachable => "backend_unreachable",
            ProxyError::Timeout(_) => "backend_timeout",
            ProxyError::Backend(_) | ProxyError::BadAccept | ProxyError::NotSwitched(_) => {
                "backend_error"
            }
        }
    }

    /// The `result` label of `wsgate_ws_upgrades_total` for an upgrade that ended in this error.
    pub fn upgrade_result(&self) -> &'static str {
        match self {
            ProxyError::RateLimited(_) | ProxyError::TooManyTunnels | ProxyError::Overloaded(_) => {
                "limited"
            }
            _ if self.is_client_fault() => "rejected",
            ProxyError::NoBackend => "no_backend",
            _ => "backend_error",
        }
    }

    /// The request itself was refused; no backend was at fault.
    pub fn is_client_fault(&self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::RequestBody(_)
                | ProxyError::RequestBodyTimeout(_)
                | ProxyError::HeadTooLarge
                | ProxyError::NoRoute
                | ProxyError::UnsupportedProtocol
                | ProxyError::BadUpgrade(_)
                | ProxyError::Origin(_)
                | ProxyError::RateLimited(_)
                | ProxyError::TooManyTunnels
        )
    }

    /// Load shed by wsgate's own admission control: neither the client's fault nor a backend's.
    fn is_shed(&self) -> bool {
        matches!(self, ProxyError::Overloaded(_))
    }

    /// The `reason` label of `wsgate_admission_rejections_total` (admission control's refusals only).
    pub fn admission_reason(&self) -> &'static str {
        match self {
            ProxyError::Origin(refusal) => refusal.label(),
            ProxyError::RateLimited(_) => "handshake_rate_per_ip",
            ProxyError::TooManyTunnels => "tunnels_per_ip",
            ProxyError::Overloaded(_) => "handshake_queue",
            _ => "other",
        }
    }

    /// Logs the error with the request's client (address and protocol), route (empty before routing) and the backend last tried
    /// (if any). A client's fault is one line per request, like an access event, and goes with them
    /// (target `wsgate::access`, `info`), so the two can be turned off together; a backend's fault is a
    /// `warn` of wsgate's own.
    pub fn log(&self, conn: &ClientConn, route: &str, backend: Option<&str>) {
        let (status, error) = (self.status().as_u16(), self.label());
        let (client, protocol) = (conn.peer, conn.protocol());
        let backend = backend.unwrap_or("-");
        if self.is_client_fault() || self.is_shed() {
            tracing::info!(target: "wsgate::access", %client, protocol, route, status, error, detail = %self, "request refused");
        } else {
            tracing::warn!(%client, protocol, route, backend, status, error, detail = %self, "request failed");
        }
    }

    /// The client's answer: the status and a one-line text body, which names the problem without
    /// revealing anything about the backends.
    pub fn response(&self) -> Response<ProxyBody> {
        let text = match self {
            ProxyError::BadRequest(bad) => return bad_request(bad),
            ProxyError::RequestBody(_) => return bad_request("request body incomplete"),
            ProxyError::RequestBodyTimeout(_) => {
                return closing(self.status(), "request body not received in time");
            }
            ProxyError::HeadTooLarge => "request head too large\n",
            ProxyError::NoRoute => "no route for this request\n",
            ProxyError::UnsupportedProtocol => "only WebSocket CONNECT is supported\n",
            ProxyError::BadUpgrade(Rejection::BadKey) => "missing or malformed Sec-WebSocket-Key\n",
            ProxyError::BadUpgrade(Rejection::BadVersion) => {
                let mut response =
                    body::text(self.status(), "only WebSocket version 13 is supported\n");
                response.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
                return response;
            }
            ProxyError::NoBackend => "no backend available\n",
            ProxyError::Origin(_) => "origin not allowed\n",
            ProxyError::RateLimited(retry) | ProxyError::Overloaded(retry) => {
                return retry_after(self.status(), *retry);
            }
            ProxyError::TooManyTunnels => {
                return retry_after(self.status(), TUNNEL_LIMIT_RETRY_AFTER);
            }
            ProxyError::Unreachable => "backend unreachable\n",
            ProxyError::Timeout(_) => "backend did not answer in time\n",
            ProxyError::Backend(_) | ProxyError::BadAccept | ProxyError::NotSwitched(_) => {
                "backend error\n"
            }
        };
        body::text(self.status(), text)
    }
}

/// A refusal that tells the client when to come back (`Retry-After` in whole seconds, rounded up: a
/// client that comes back on time must find room).
fn retry_after(status: StatusCode, after: Duration) -> Response<ProxyBody> {
    let text = if status == StatusCode::TOO_MANY_REQUESTS {
        "too many requests\n"
    } else {
        "overloaded, retry later\n"
    };
    let mut response = body::text(status, text);
    let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    response
}

/// 400 with the reason, and `Connection: close`.
fn bad_request(bad: impl std::fmt::Display) -> Response<ProxyBody> {
    closing(StatusCode::BAD_REQUEST, bad)
}

/// An answer after which the connection closes: what follows on it (the rest of a body) is not read.
fn closing(status: StatusCode, text: impl std::fmt::Display) -> Response<ProxyBody> {
    let mut response = body::text(status, format!("{text}\n"));
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<ProxyError> {
        vec![
            ProxyError::BadRequest(BadRequest::UpgradeWithBody),
            ProxyError::HeadTooLarge,
            ProxyError::NoRoute,
            ProxyError::UnsupportedProtocol,
            ProxyError::BadUpgrade(Rejection::BadKey),
            ProxyError::BadUpgrade(Rejection::BadVersion),
            ProxyError::NoBackend,
            ProxyError::Unreachable,
            ProxyError::Timeout(Duration::from_secs(1)),
            ProxyError::Backend(BackendHttpError::Closed),
            ProxyError::RequestBodyTimeout(Duration::from_secs(1)),
            ProxyError::BadAccept,
            ProxyError::NotSwitched(StatusCode::OK),
            ProxyError::Origin(OriginRefusal::Missing),
            ProxyError::RateLimited(Duration::from_millis(1500)),
            ProxyError::TooManyTunnels,
            ProxyError::Overloaded(Duration::from_millis(10)),
        ]
    }

    #[test]
    fn client_faults_are_4xx_and_backend_faults_5xx() {
        for error in all() {
            let status = error.status();
            // 501: the client asked for what wsgate does not do (RFC 8441 §4), no backend's fault.
            let client_status = status.is_client_error() || status == StatusCode::NOT_IMPLEMENTED;
            assert_eq!(
                error.is_client_fault(),
                client_status,
                "{error:?} answers {status}"
            );
            assert!(status.is_client_error() || status.is_server_error());
            assert_eq!(error.response().status(), status, "{error:?}");
        }
    }

    #[test]
    fn the_answers_operators_rely_on() {
        // Nothing was up to try: 503. Backends were tried and all failed: 502 (as nginx answers).
        assert_eq!(ProxyError::NoBackend.status(), 503);
        assert_eq!(ProxyError::Unreachable.status(), 502);
        assert_eq!(ProxyError::Timeout(Duration::ZERO).status(), 504);
        let version = ProxyError::BadUpgrade(Rejection::BadVersion).response();
        assert_eq!(version.status(), 426);
        assert_eq!(version.headers()[header::SEC_WEBSOCKET_VERSION], "13");
        let bad = ProxyError::BadRequest(BadRequest::UpgradeWithBody).response();
        assert_eq!(bad.headers()[header::CONNECTION], "close");
        assert_eq!(ProxyError::NoBackend.upgrade_result(), "no_backend");
        assert_eq!(ProxyError::Unreachable.upgrade_result(), "backend_error");
        assert_eq!(ProxyError::NoRoute.upgrade_result(), "rejected");
        // Admission control: 403 for an origin, 429 for a client over its limits, 503 for load shed,
        // each saying when to come back (rounded up, at least a second).
        assert_eq!(ProxyError::Origin(OriginRefusal::Missing).status(), 403);
        let rate = ProxyError::RateLimited(Duration::from_millis(1500)).response();
        assert_eq!(rate.status(), 429);
        assert_eq!(rate.headers()[header::RETRY_AFTER], "2");
        assert_eq!(
            ProxyError::TooManyTunnels.response().headers()[header::RETRY_AFTER],
            "5"
        );
        let shed = ProxyError::Overloaded(Duration::from_millis(10)).response();
        assert_eq!(shed.status(), 503);
        assert_eq!(shed.headers()[header::RETRY_AFTER], "1");
        assert_eq!(ProxyError::TooManyTunnels.upgrade_result(), "limited");
        assert_eq!(
            ProxyError::Origin(OriginRefusal::Missing).upgrade_result(),
            "rejected"
        );
    }
}
