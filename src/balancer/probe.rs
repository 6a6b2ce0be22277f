//! One active health-check probe of a backend: an HTTP GET of the check's `path` (2xx or 3xx passes), or
//! with `websocket = true` an upgrade to `path` (a 101 with the right `Sec-WebSocket-Accept` passes, and the
//! probe then closes with 1001). The tasks that run probes on a schedule and record their verdicts are the
//! gateway's (`health_checks.rs`); `fall` and `rise` are counted on the backend (`Backend::record_check`).
//!
//! Passive health (ejection after `max_fails` consecutive backend faults) lives on the backends
//! themselves: see `Pool::connect_failed`.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use super::Backend;
use crate::config::HealthCheck;
use crate::proxy_protocol;
use crate::upstream::{self, ConnectError};
use crate::websocket::frame::{ControlFrame, Role};
use crate::websocket::{accepts, new_key};

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("answered {0}")]
    Status(StatusCode),
    #[error("answered 101 with a wrong Sec-WebSocket-Accept")]
    BadAccept,
}

/// One probe of `backend` (over TLS for a TLS backend, as its traffic goes), bounded by `check.timeout`
/// as a whole.
pub async fn probe(backend: &Backend, check: &HealthCheck) -> Result<(), ProbeError> {
    tokio::time::timeout(check.timeout, probe_inner(backend, check))
        .await
        .map_err(|_| ProbeError::Timeout(check.timeout))?
}

async fn probe_inner(backend: &Backend, check: &HealthCheck) -> Result<(), ProbeError> {
    let addr = backend.addr.as_str();
    // A backend that requires the PROXY protocol refuses a connection without the header: a check says
    // it comes from wsgate itself (LOCAL), with no client's address in it.
    let preamble = backend
        .proxy_protocol
        .filter(|p| p.health)
        .map(|p| proxy_protocol::encode_local(p.version))
        .unwrap_or_default();
    let stream = upstream::connect(addr, backend.tls.as_ref(), check.timeout, &preamble).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection is driven beside the exchange, inside the probe, not as a task of its own: the
    // probe's timeout bounds both and nothing outlives it. It ends when the exchange drops its sender, or
    // hands the connection over after a 101.
    let driven = async {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "health check connection ended with an error");
        }
    };
    let (result, ()) = tokio::join!(exchange(sender, addr, check), driven);
    result
}

/// The probe's request and the verdict on its answer.
async fn exchange(
    mut sender: SendRequest<Empty<Bytes>>,
    addr: &str,
    check: &HealthCheck,
) -> Result<(), ProbeError> {
    let mut request = Request::new(Empty::<Bytes>::new());
    *request.uri_mut() = check
        .path
        .parse()
        .unwrap_or_else(|_| http::Uri::from_static("/"));
    let headers = request.headers_mut();
    if let Ok(host) = HeaderValue::from_str(addr) {
        headers.insert(header::HOST, host);
    }
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static("wsgate-health-check"),
    );
    let key = if check.websocket {
        let key = new_key();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        headers.insert(header::SEC_WEBSOCKET_KEY, key.clone());
        Some(key)
    } else {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        None
    };
    let response = sender.send_request(request).await?;
    let status = response.status();
    let Some(key) = key else {
        return if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(ProbeError::Status(status))
        };
    };
    if status != StatusCode::SWITCHING_PROTOCOLS {
        return Err(ProbeError::Status(status));
    }
    if !accepts(response.headers(), key.as_bytes()) {
        return Err(ProbeError::BadAccept);
    }
    // Say goodbye properly; whether the backend hears it does not change the verdict.
    if let Ok(upgraded) = hyper::upgrade::on(response).await {
        let mut io = TokioIo::new(upgraded);
        let close = ControlFrame::close(1001, "health check", Role::Client);
        let _ = io.write_all(close.as_bytes()).await;
        let _ = io.shutdown().await;
    }
    Ok(())
}
