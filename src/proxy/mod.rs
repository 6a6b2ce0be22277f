//! The proxy layer: one client request, whatever transport it came on. It is checked (`headers`), routed
//! (`router`), then forwarded as HTTP (`http.rs`) or upgraded to a WebSocket (`upgrade.rs`), both through
//! one backend-attempt loop (`attempt.rs`) and one table of wsgate's own answers (`error.rs`). What comes
//! back is an `Answer` for the server layer to send: a response, or a 101 with the `Splice` that joins
//! the client to the backend once the server layer has taken the client connection over (`splice.rs`).

mod attempt;
mod error;
mod http;
mod splice;
mod tunnel_metrics;
mod upgrade;

use std::sync::Arc;

use ::http::{HeaderMap, Request, Response, Uri, header};
use hyper::body::Incoming;

use crate::body::ProxyBody;
use crate::conn::ClientConn;
use crate::headers::check_request;
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
    /// The 101 for the client, and the backend that switched behind it: the server layer sends the 101,
    /// takes the client connection over and runs the `Splice`.
    Switching(Response<ProxyBody>, Splice),
}

/// A request hyper parsed: every request but a connection's first upgrade.
pub async fn handle(req: Request<Incoming>, conn: &ClientConn, shared: &Shared) -> Answer {
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
    error.log(conn.peer, "", None);
    shared
        .metrics
        .http_requests
        .with_label_values(&["", status_class(error.status().as_u16())])
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
