//! One client request: find its route, then proxy it as HTTP or as a WebSocket upgrade.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::body::{self, BoxError, ProxyBody};
use crate::client_io::Phase;
use crate::gateway::Shared;
use crate::listener::ClientConn;
use crate::metrics::status_class;
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
        phase: Arc::clone(&conn.phase),
    }))
}

async fn route_and_proxy(
    req: Request<Incoming>,
    conn: &Arc<ClientConn>,
    shared: &Arc<Shared>,
) -> Response<ProxyBody> {
    let state = shared.state.load_full();
    if head_size(&req) > state.config.limits.max_header_size {
        shared
            .metrics
            .http_requests
            .with_label_values(&["", status_class(431)])
            .inc();
        return body::text(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request head too large\n",
        );
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host());
    let Some(route) = state.router.route(host, req.uri().path()).cloned() else {
        shared
            .metrics
            .http_requests
            .with_label_values(&["", status_class(404)])
            .inc();
        return body::text(StatusCode::NOT_FOUND, "no route for this request\n");
    };
    if websocket::is_upgrade_request(&req) {
        return websocket::upgrade(req, route, &state.config, conn, shared).await;
    }
    http_proxy::forward(req, &route, &state.config, conn, shared).await
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
    phase: Arc<Phase>,
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.phase.idle();
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
