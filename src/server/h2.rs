//! hyper's HTTP/2 server, for client connections that chose HTTP/2: ALPN `h2` on a TLS listener, or the
//! h2c preface on a plain listener with `h2c = true`. Requests go to the proxy layer like HTTP/1.1 ones
//! (`proxy::handle_h2`); an extended CONNECT (RFC 8441) becomes a WebSocket tunnel over its stream, the
//! same tunnel an HTTP/1.1 client gets.
//!
//! Limits, per connection (docs/ARCHITECTURE.md, "HTTP/2"): concurrent streams, flow-control windows and
//! the header list size from the config; the resets a client may provoke are capped (rapid reset,
//! CVE-2023-44487) and so is what wsgate queues for a stream the client does not read. A header block
//! split over CONTINUATION frames counts against the header list limit as it arrives.
//!
//! Timers: HTTP/1.1's header and keep-alive timers (`client_io.rs`) are off once a connection speaks
//! HTTP/2, and the send timeout stays on. The connection's own idle timer closes it with a GOAWAY after
//! `timeouts.http_idle` without an open stream; a shutdown sends GOAWAY at once and lets open streams
//! finish (tunnels get their Close 1001 like any other), and so does a reload (the tunnels go on).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::rt::Executor;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

use crate::body::{BoxError, ProxyBody};
use crate::config::Config;
use crate::conn::ClientConn;
use crate::proxy::{self, Answer, Splice};
use crate::state::Shared;
use crate::websocket::Buffered;

/// Streams a client may reset before wsgate has taken them up, at one time, before the connection gets
/// GOAWAY ENHANCE_YOUR_CALM: the rapid-reset attack opens and cancels streams faster than any server can
/// serve them.
const MAX_PENDING_RESETS: usize = 20;
/// Streams wsgate may reset over a connection's life for the client's protocol errors before closing it:
/// a client that provokes resets without end is closed instead of served.
const MAX_LOCAL_RESETS: usize = 256;
/// What wsgate queues per stream for a client that has not opened its window: bounds the send side of a
/// stalled stream (a WebSocket whose client reads nothing), as the stream window bounds the receive side.
const MAX_SEND_BUFFER: usize = 64 << 10;

/// Serves HTTP/2 on `io` until the connection closes. `websockets`: advertise
/// SETTINGS_ENABLE_CONNECT_PROTOCOL and take WebSockets over HTTP/2.
pub async fn serve_h2<I>(
    io: I,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
    config: &Config,
    websockets: bool,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    conn.set_h2();
    // Past the HTTP/1.1 stages: `client_io.rs` keeps only its send timeout.
    conn.phase.busy();
    let settings = &config.http2;
    let mut builder = http2::Builder::new(Tracked(shared.tasks.clone()));
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_concurrent_streams)
        .initial_stream_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window())
        .max_header_list_size(u32::try_from(config.limits.max_header_size).unwrap_or(u32::MAX))
        .max_send_buf_size(MAX_SEND_BUFFER)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(MAX_LOCAL_RESETS);
    if websockets {
        builder.enable_connect_protocol();
    }
    let streams = Arc::new(OpenStreams::default());
    let service = {
        let (conn, shared, streams) =
            (Arc::clone(&conn), Arc::clone(&shared), Arc::clone(&streams));
        service_fn(move |req| {
            let stream = OpenStream::new(Arc::clone(&streams));
            handle(req, Arc::clone(&conn), Arc::clone(&shared), stream)
        })
    };
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let idle = config.timeouts.http_idle;
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = streams.idle_for(idle) => {
            tracing::debug!(peer = %conn.peer, "HTTP/2 connection idle; closing");
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        _ = shared.shutdown.cancelled() => {
            // GOAWAY: no new streams; open ones finish (tunnels close on their own shutdown schedule).
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        () = shared.reloaded.notified() => {
            // GOAWAY too: the client opens its next streams on a new connection, with the new config's
            // listener and HTTP/2 settings; open streams (tunnels too) go on here until they end.
            tracing::debug!(peer = %conn.peer, "config reloaded; HTTP/2 connection draining");
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(peer = %conn.peer, %error, "HTTP/2 connection ended with an error");
    }
}

async fn handle(
    mut req: Request<Incoming>,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
    stream: OpenStream,
) -> Result<Response<StreamBody>, Infallible> {
    // Only a CONNECT's answer upgrades; for any other request this is an upgrade that never comes.
    let client_upgrade = hyper::upgrade::on(&mut req);
    let response = match proxy::handle_h2(req, &conn, &shared).await {
        Answer::Response(response) => response.map(|inner| StreamBody {
            inner,
            _stream: Some(stream),
        }),
        Answer::Switching(response, splice) => {
            let timeout = shared.state.load().config.timeouts.handshake;
            let takeover = take_over(
                client_upgrade,
                splice,
                timeout,
                stream,
                conn,
                Arc::clone(&shared),
            );
            shared.tasks.spawn(takeover);
            response.map(|inner| StreamBody {
                inner,
                _stream: None,
            })
        }
    };
    Ok(response)
}

/// Waits for hyper to hand over the stream it answered with the 200, and runs the tunnel on it. The
/// stream counts as open (`stream`) until the tunnel ends.
async fn take_over(
    client_upgrade: OnUpgrade,
    splice: Splice,
    timeout: Duration,
    stream: OpenStream,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
) {
    let upgraded = match tokio::time::timeout(timeout, client_upgrade).await {
        Ok(Ok(upgraded)) => upgraded,
        Ok(Err(error)) => {
            tracing::debug!(client = %conn.peer, %error, "HTTP/2 WebSocket stream did not open");
            return;
        }
        Err(_) => return,
    };
    // An HTTP/2 stream cannot tell when it is readable without being read: the tunnel borrows its
    // buffer for a read attempt, like a TLS session's (`websocket::transport`). Nothing came before the
    // 200: a client sends frames only after it.
    let client = Buffered(TokioIo::new(upgraded));
    let tunnel = splice.run(client, Bytes::new(), conn, Arc::clone(&shared));
    // A task of its own, sized for the tunnel alone (as `connection::start_tunnel` does).
    shared.tasks.spawn(async move {
        tunnel.await;
        drop(stream);
    });
}

/// hyper's executor for a connection's streams (each request is a task of its own): the gateway's
/// tracker, so shutdown waits for them.
#[derive(Clone)]
struct Tracked(TaskTracker);

impl<F> Executor<F> for Tracked
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        self.0.spawn(future);
    }
}

/// The streams open on one connection, for its idle timer.
#[derive(Default)]
struct OpenStreams {
    count: AtomicUsize,
    changed: Notify,
}

impl OpenStreams {
    /// Resolves once no stream has been open for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the count is read, so a stream closing in between is not missed.
            changed.as_mut().enable();
            if self.count.load(Ordering::Acquire) == 0 {
                tokio::select! {
                    () = tokio::time::sleep(idle) => return,
                    () = changed => {}
                }
            } else {
                changed.await;
            }
        }
    }
}

/// One open stream, counted from its request until its response body is sent (or its tunnel ends).
struct OpenStream(Arc<OpenStreams>);

impl OpenStream {
    fn new(streams: Arc<OpenStreams>) -> OpenStream {
        streams.count.fetch_add(1, Ordering::AcqRel);
        streams.changed.notify_waiters();
        OpenStream(streams)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// A response body that holds its stream open until it is sent (or abandoned).
struct StreamBody {
    inner: ProxyBody,
    _stream: Option<OpenStream>,
}

impl Body for StreamBody {
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

#[cfg(test)]
mod tests {
    use super::*;

    // Paused time: the idle timer is decided by the clock jumping ahead.
    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_without_open_streams() {
        let streams = Arc::new(OpenStreams::default());
        let idle = Duration::from_secs(60);
        let open = OpenStream::new(Arc::clone(&streams));
        let waited = tokio::time::timeout(idle * 3, streams.idle_for(idle)).await;
        assert!(waited.is_err(), "idle while a stream is open");
        let start = tokio::time::Instant::now();
        drop(open);
        tokio::time::timeout(idle * 3, streams.idle_for(idle))
            .await
            .expect("idle once the stream closed");
        assert_eq!(start.elapsed(), idle);
        // A stream opened during the wait restarts it once it closes.
        let start = tokio::time::Instant::now();
        let reopen = {
            let streams = Arc::clone(&streams);
            async move {
                tokio::time::sleep(idle / 2).await;
                let open = OpenStream::new(streams);
                tokio::time::sleep(idle).await;
                drop(open);
            }
        };
        tokio::join!(reopen, async {
            tokio::time::timeout(idle * 5, streams.idle_for(idle))
                .await
                .expect("idle after the second stream");
        });
        assert_eq!(start.elapsed(), idle / 2 + idle + idle);
    }
}
