//! The one response body type of the gateway, and the short responses wsgate writes itself.

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every response wsgate sends: streamed from a backend, or written by wsgate.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A plain-text response of wsgate's own (errors, the demo page, admin answers).
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    with_type(status, "text/plain; charset=utf-8", body)
}

/// A response of wsgate's own with a given content type.
pub fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ProxyBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

pub fn full(body: impl Into<Bytes>) -> ProxyBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> ProxyBody {
    full(Bytes::new())
}
