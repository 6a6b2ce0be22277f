//! One client request: find its route, then proxy it as HTTP or as a WebSocket upgrade.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::body::{self, BoxError, ProxyBody};
use crate::gateway::{Shared, State};
use crate::headers::{BadRequest, check_request};
use crate::listener::ClientConn;
use crate::metrics::status_class;
use crate::router::Route;
use crate::{http_proxy, websocket};

pub async fn handle(
    req: Request<Incoming>,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
) -> Result<Response<ResponseBody>, Infallible> {
    conn.phase.busy();
    let response = route_and_proxy(req, &conn, &shared).await;
    Ok(response.map(|inner| ResponseBody {
        inner,
        conn: Arc::clone(&conn),
    }))
}

async fn route_and_proxy(
    req: Request<Incoming>,
    conn: &Arc<ClientConn>,
    shared: &Arc<Shared>,
) -> Response<ProxyBody> {
    let upgrade = websocket::is_upgrade_request(&req);
    if let Err(bad) = check_request(req.headers(), upgrade) {
        return bad_request(shared, bad);
    }
    let state = shared.state.load_full();
    let route = match find_route(&state, shared, head_size(&req), req.uri(), req.headers()) {
        Ok(route) => route,
        Err(refusal) => return refusal.response(),
    };
    if upgrade {
        return websocket::upgrade(req, route, &state.config, conn, shared).await;
    }
    http_proxy::forward(req, &route, &state.config, conn, shared).await
}

/// The answer to a request head refused before routing: 400, and the connection closes (what follows
/// the head cannot be trusted to be framed the way the head says). Counted without a route.
pub fn bad_request(shared: &Shared, bad: BadRequest) -> Response<ProxyBody> {
    tracing::info!(%bad, "request refused");
    shared
        .metrics
        .http_requests
        .with_label_values(&["", status_class(400)])
        .inc();
    let mut response = body::text(StatusCode::BAD_REQUEST, format!("{bad}\n"));
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Why a request has no route to go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoute {
    HeadTooLarge,
    NotFound,
}

impl NoRoute {
    pub fn response(self) -> Response<ProxyBody> {
        match self {
            NoRoute::HeadTooLarge => body::text(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request head too large\n",
            ),
            NoRoute::NotFound => body::text(StatusCode::NOT_FOUND, "no route for this request\n"),
        }
    }
}

/// The route for a request head of `head_size` bytes. A request without one is counted here (431, 404).
pub fn find_route(
    state: &State,
    shared: &Shared,
    head_size: usize,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Arc<Route>, NoRoute> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.host());
    let found = if head_size > state.config.limits.max_header_size {
        Err(NoRoute::HeadTooLarge)
    } else {
        state
            .router
            .route(host, uri.path())
            .cloned()
            .ok_or(NoRoute::NotFound)
    };
    if let Err(refusal) = found {
        let status = match refusal {
            NoRoute::HeadTooLarge => 431,
            NoRoute::NotFound => 404,
        };
        shared
            .metrics
            .http_requests
            .with_label_values(&["", status_class(status)])
            .inc();
    }
    found
}

/// The size of a request head as sent: request line, header lines, blank line.
///
/// hyper enforces its buffer limit (`max_buf_size`) only when the buffer fills up with the head still
/// incomplete, so a head that ends within one large read passes it at up to about twice the limit; this
/// check makes `limits.max_header_size` exact.
fn head_size<B>(req: &Request<B>) -> usize {
    let target = req.uri().authority().map_or(0, |a| a.as_str().len() + 7)
        + req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    let request_line = req.method().as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let headers: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    request_line + headers + 2
}

/// A response body that marks the connection idle once the response is fully sent (or abandoned), so the
/// keep-alive idle timer starts only then: a long download or event stream is not idle.
pub struct ResponseBody {
    inner: ProxyBody,
    conn: Arc<ClientConn>,
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.conn.phase.idle();
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
