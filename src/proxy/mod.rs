//! The proxy layer: one client request, whatever transport it came on. It is checked (`headers`), routed
//! (`router`), then forwarded as HTTP (`http.rs`) or upgraded to a WebSocket (`upgrade.rs`), both through
//! one backend-attempt loop (`attempt.rs`) and one table of wsgate's own answers (`error.rs`). What comes
//! back is an `Answer` for the server layer to send: a response, or a 101 with the `Splice` that joins
//! the client to the backend once the server layer has taken the client connection over (`splice.rs`).

mod admission;
mod attempt;
mod error;
mod http;
mod splice;
mod tunnel_metrics;
mod upgrade;

use std::sync::Arc;

use ::http::{HeaderMap, Method, Request, Response, Uri, header};
use hyper::body::Incoming;

use crate::body::ProxyBody;
use crate::conn::ClientConn;
use crate::headers::{BadRequest, check_request, h2_to_h1};
use crate::http1::request::head_size;
use crate::metrics::status_class;
use crate::router::Route;
use crate::state::{Shared, State};
use crate::websocket::is_upgrade_request;

pub use error::ProxyError;
pub use splice::Splice;

/// What a request comes to.
pub enum Answer {
    /// The response for the client: a backend's, or one of wsgate's own.
    Response(Response<ProxyBody>),
    /// The 101 for the client (a 200 over HTTP/2), and the backend that switched behind it: the server
    /// layer sends it, takes the client connection (or HTTP/2 stream) over and runs the `Splice`.
    Switching(Response<ProxyBody>, Splice),
}

/// An HTTP/1.1 request hyper parsed: every request but a connection's first upgrade.
pub async fn handle(req: Request<Incoming>, conn: &ClientConn, shared: &Shared) -> Answer {
    // wsgate is no forward proxy: a CONNECT would have a backend open a tunnel wsgate does not frame.
    if req.method() == Method::CONNECT {
        return refused(shared, conn, ProxyError::UnsupportedProtocol);
    }
    let upgrade = is_upgrade_request(&req);
    let size = head_size(&req);
    let (state, route) = match admit(shared, req.headers(), req.uri(), size, upgrade) {
        Ok(admitted) => admitted,
        Err(error) => return refused(shared, conn, error),
    };
    if upgrade {
        let (parts, _) = req.into_parts();
        return upgrade::handshake(parts, route, &state.config, conn, shared).await;
    }
    Answer::Response(http::forward(req, &route, &state.config, conn, shared).await)
}

/// An upgrade request whose head (`head_len` bytes) wsgate read itself (`server::connection`).
pub async fn handle_upgrade(
    parts: ::http::request::Parts,
    head_len: usize,
    conn: &ClientConn,
    shared: &Shared,
) -> Answer {
    let (state, route) = match admit(shared, &parts.headers, &parts.uri, head_len, true) {
        Ok(admitted) => admitted,
        Err(error) => return refused(shared, conn, error),
    };
    // The state is held for the handshake only, and dropped with this future: a connection that goes on
    // to other requests loads it per request, and must not keep an old generation's pools alive.
    upgrade::handshake(parts, route, &state.config, conn, shared).await
}

/// A request on an HTTP/2 stream: forwarded to the HTTP/1.1 backends like any other, with the same
/// header rules once its head is made an HTTP/1.1 one; a CONNECT is a WebSocket (`extended_connect`).
pub async fn handle_h2(req: Request<Incoming>, conn: &ClientConn, shared: &Shared) -> Answer {
    if req.method() == Method::CONNECT {
        // Boxed: the upgrade's future is the larger, and every stream's task (which hyper spawns and
        // moves) would otherwise be sized for it.
        return Box::pin(handle_extended_connect(req, conn, shared)).await;
    }
    let size = head_size(&req);
    let (mut parts, body) = req.into_parts();
    if let Err(bad) = h2_to_h1(&mut parts) {
        return refused(shared, conn, bad.into());
    }
    let (state, route) = match admit(shared, &parts.headers, &parts.uri, size, false) {
        Ok(admitted) => admitted,
        Err(error) => return refused(shared, conn, error),
    };
    let req = Request::from_parts(parts, body);
    Answer::Response(http::forward(req, &route, &state.config, conn, shared).await)
}

/// An HTTP/2 CONNECT: a WebSocket over HTTP/2 (RFC 8441) when its `:protocol` is `websocket`. It is
/// checked (§4, §5), made the HTTP/1.1 upgrade backends know, and routed and handshaken like one; the
/// client's answer is a 200 instead of a 101 (`upgrade::handshake`). A refusal gets the status an
/// HTTP/1.1 upgrade would: browsers do not fall back to HTTP/1.1 when an extended CONNECT fails, so the
/// application must see the same errors either way.
async fn handle_extended_connect(
    req: Request<Incoming>,
    conn: &ClientConn,
    shared: &Shared,
) -> Answer {
    let size = head_size(&req);
    let (mut parts, _) = req.into_parts();
    if let Err(error) = extended_connect(&mut parts) {
        return refused(shared, conn, error);
    }
    let (state, route) = match admit(shared, &parts.headers, &parts.uri, size, true) {
        Ok(admitted) => admitted,
        Err(error) => return refused(shared, conn, error),
    };
    upgrade::handshake(parts, route, &state.config, conn, shared).await
}

/// Checks an extended CONNECT's pseudo-headers and makes its head an HTTP/1.1 GET, `Host` from
/// `:authority` (the target is made origin-form where it is sent). The WebSocket headers (`Upgrade`,
/// `Connection`, a key) are the handshake's to add.
fn extended_connect(parts: &mut ::http::request::Parts) -> Result<(), ProxyError> {
    let websocket = parts
        .extensions
        .get::<hyper::ext::Protocol>()
        .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    if !websocket {
        return Err(ProxyError::UnsupportedProtocol);
    }
    if !matches!(parts.uri.scheme_str(), Some("https" | "http")) {
        return Err(BadRequest::ExtendedConnect(":scheme https or http").into());
    }
    if parts.uri.authority().is_none() {
        return Err(BadRequest::ExtendedConnect(":authority").into());
    }
    if !parts.uri.path().starts_with('/') {
        return Err(BadRequest::ExtendedConnect(":path").into());
    }
    h2_to_h1(parts)?;
    parts.method = Method::GET;
    Ok(())
}

/// Checks a request head and finds its route in the current config generation.
fn admit(
    shared: &Shared,
    headers: &HeaderMap,
    uri: &Uri,
    head_size: usize,
    upgrade: bool,
) -> Result<(Arc<State>, Arc<Route>), ProxyError> {
    check_request(headers, upgrade)?;
    let state = shared.state.load_full();
    let route = route(&state, head_size, uri, headers)?;
    Ok((state, route))
}

/// A request refused before it has a route (400, 431, 404): logged, counted without a route, answered.
fn refused(shared: &Shared, conn: &ClientConn, error: ProxyError) -> Answer {
    error.log(conn, "", None);
    shared
        .metrics
        .http_requests
        .with_label_values(&["", status_class(error.status().as_u16()), conn.protocol()])
        .inc();
    Answer::Response(error.response())
}

/// The route for a request head of `head_size` bytes.
///
/// hyper enforces its buffer limit only when the buffer fills up with the head still incomplete, so a
/// head that ends within one large read passes it at up to about twice the limit; checking the head's
/// size here makes `limits.max_header_size` exact on both paths.
fn route(
    state: &State,
    head_size: usize,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Arc<Route>, ProxyError> {
    if head_size > state.config.limits.max_header_size {
        return Err(ProxyError::HeadTooLarge);
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.host());
    state
        .router
        .route(host, uri.path())
        .cloned()
        .ok_or(ProxyError::NoRoute)
}
