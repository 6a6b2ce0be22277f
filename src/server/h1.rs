//! hyper's HTTP/1.1 server, for every request on a client connection but a first-request upgrade
//! (`connection.rs`): requests go to the proxy layer, responses come back with the keep-alive idle timer
//! armed once they are sent, and an upgrade that follows other requests on the connection is taken over
//! from hyper after its 101.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::client_io::Replay;
use super::connection::{ClientStream, start_tunnel};
use super::quiet::Quiet;
use crate::body::{BoxError, ProxyBody};
use crate::config::Config;
use crate::conn::ClientConn;
use crate::http1::client_head_limit;
use crate::proxy::{self, Answer, Splice};
use crate::state::Shared;

/// Serves HTTP/1.1 on a connection through hyper until it closes or is upgraded. `io` replays the bytes
/// `connection.rs` already read.
pub async fn serve_http<S: ClientStream>(
    io: Replay<S>,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
    config: &Config,
) {
    let mut builder = http1::Builder::new();
    // hyper answers a head larger than its buffer with 431.
    builder.max_buf_size(client_head_limit(config.limits.max_header_size));
    let service_conn = Arc::clone(&conn);
    let service_shared = Arc::clone(&shared);
    let service = service_fn(move |req| {
        handle::<S>(req, Arc::clone(&service_conn), Arc::clone(&service_shared))
    });
    let connection = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = Quiet::new(shared.shutdown.cancelled()) => {
            // Finish the request in flight, then close; idle keep-alive connections close at once.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(peer = %conn.peer, %error, "client connection ended with an error");
    }
}

async fn handle<S: ClientStream>(
    mut req: Request<Incoming>,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
) -> Result<Response<ResponseBody>, Infallible> {
    conn.phase.busy();
    let client_upgrade = hyper::upgrade::on(&mut req);
    let response = match proxy::handle(req, &conn, &shared).await {
        Answer::Response(response) => response,
        Answer::Switching(response, splice) => {
            let timeout = shared.state.load().config.timeouts.handshake;
            let takeover = take_over::<S>(
                client_upgrade,
                splice,
                timeout,
                Arc::clone(&conn),
                Arc::clone(&shared),
            );
            shared.tasks.spawn(takeover);
            response
        }
    };
    Ok(response.map(|inner| ResponseBody {
        inner,
        conn: Arc::clone(&conn),
    }))
}

/// Waits for hyper to hand over the client connection it answered with the 101, takes the stream back
/// out of hyper's wrappers, and starts the tunnel on it (a task of its own, sized for the tunnel alone).
async fn take_over<S: ClientStream>(
    client_upgrade: OnUpgrade,
    splice: Splice,
    timeout: Duration,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
) {
    let upgraded = match tokio::time::timeout(timeout, client_upgrade).await {
        Ok(Ok(upgraded)) => upgraded,
        Ok(Err(error)) => {
            tracing::debug!(client = %conn.peer, %error, "client upgrade did not complete");
            return;
        }
        Err(_) => return,
    };
    // The stream hyper was given is always a `Replay<S>` (`serve_http`): the downcast fails only if that
    // changed, which the tests would show at once.
    let Ok(parts) = upgraded.downcast::<TokioIo<Replay<S>>>() else {
        tracing::error!(client = %conn.peer, "client connection could not be taken over after 101");
        return;
    };
    let (io, unread) = parts.io.into_inner().into_parts();
    // What the client sent behind its request: what hyper read past the head, then the bytes of the
    // replay hyper did not read (the replay is read first, so anything hyper read came before them).
    let early = if unread.is_empty() {
        parts.read_buf
    } else {
        [parts.read_buf, unread].concat().into()
    };
    start_tunnel(io, splice, early, conn, shared);
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
