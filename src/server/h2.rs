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
//! Timers: the header timer of `client_io.rs` bounds the connection until its first request; then
//! HTTP/1.1's timers are off, and the send timeout stays on. The connection's own idle timer closes it
//! with a GOAWAY after `timeouts.http_idle` without an open stream; a shutdown sends GOAWAY at once and
//! lets open streams finish (tunnels get their Close 1001 like any other), and so does a reload (the
//! tunnels go on). After a GOAWAY the client gets `timeouts.header`, once no stream of wsgate's is open,
//! to close the connection; then it is dropped. Response bodies a client stops taking are released by
//! `h2_streams.rs`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::rt::Executor;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::task::TaskTracker;

use super::h2_streams::{OpenStream, StreamBody, Streams};
use super::quiet::Quiet;
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
/// SETTINGS_ENABLE_CONNECT_PROTOCOL and take WebSockets over HTTP/2. `config` is the generation the
/// connection was accepted under.
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
    // `client_io.rs`'s header timer, running since the accept, stays on until the first request: a
    // client that says nothing (or only HTTP/2's preface and settings) is closed by it, as over
    // HTTP/1.1. The first request moves the connection past it for good (`handle`).
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
    let streams = Streams::new();
    let service = {
        let (conn, shared, streams) =
            (Arc::clone(&conn), Arc::clone(&shared), Arc::clone(&streams));
        // Boxed: hyper spawns each request's future as a task of its own, moving it several times on
        // the way; a pointer moves for nothing where the whole exchange's state would be copied each time.
        service_fn(move |req| {
            Box::pin(handle(
                req,
                Arc::clone(&conn),
                Arc::clone(&shared),
                Arc::clone(&streams),
            ))
        })
    };
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    // The connection's timers are `Quiet`: a task polls every branch of its `select!` each time it wakes,
    // which for a busy connection is a few times per request, and a timer need not be asked again
    // before it fires.
    let watchdog = Quiet::new(streams.release_stalled(config.timeouts.send));
    tokio::pin!(watchdog);
    let timeouts = &config.timeouts;
    let mut draining = false;
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            // Runs for the connection's life (it never returns): releases the backends of responses
            // whose client stopped taking them (`h2_streams.rs`).
            () = watchdog.as_mut() => {}
            () = Quiet::new(streams.idle_for(timeouts.http_idle)), if !draining => {
                tracing::debug!(peer = %conn.peer, "HTTP/2 connection idle; closing");
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = Quiet::new(shared.shutdown.cancelled()), if !draining => {
                // GOAWAY: no new streams; open ones finish (tunnels close on their own shutdown
                // schedule).
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
            () = Quiet::new(reloaded_since(&shared, config)), if !draining => {
                // GOAWAY too: the client opens its next streams on a new connection, with the new
                // config's listener and HTTP/2 settings; open streams (tunnels too) go on here.
                tracing::debug!(peer = %conn.peer, "config reloaded; HTTP/2 connection draining");
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
            // After GOAWAY hyper waits for the client to answer its ping and for every stream to end,
            // the client's own included. Once none of wsgate's is left, the client gets the header
            // timeout to close, then the connection is dropped: a client that never answers, or a
            // stream that never ends on its side, does not hold it.
            () = Quiet::new(streams.idle_for(timeouts.header)), if draining => {
                tracing::debug!(peer = %conn.peer, "HTTP/2 connection did not close after GOAWAY; dropped");
                return;
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(peer = %conn.peer, %error, "HTTP/2 connection ended with an error");
    }
}

/// Resolves once the config has been reloaded since `config` was current: at once if it already was
/// (a reload while this connection's TLS handshake or preface was still arriving), else at the next.
async fn reloaded_since(shared: &Shared, config: &Config) {
    let reloaded = shared.reloaded.notified();
    tokio::pin!(reloaded);
    // Registered before the current generation is looked at, so a reload in between is not missed.
    reloaded.as_mut().enable();
    if std::ptr::eq(&*shared.state.load().config, config) {
        reloaded.await;
    }
}

async fn handle(
    mut req: Request<Incoming>,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
    streams: Arc<Streams>,
) -> Result<Response<StreamBody>, Infallible> {
    let stream = streams.open();
    // Past the header timer for good (`serve_h2`); `client_io.rs` keeps only its send timeout.
    conn.phase.busy();
    // Only a CONNECT's answer upgrades; for any other request this is an upgrade that never comes.
    let client_upgrade = hyper::upgrade::on(&mut req);
    let response = match proxy::handle_h2(req, &conn, &shared).await {
        Answer::Response(response) => response.map(|body| streams.body(body, Some(stream))),
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
            response.map(|body| streams.body(body, None))
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
    // buffer for a read attempt, like a TLS session's (`websocket::transport`). What the client sent
    // early is still in the stream, for the tunnel's first read.
    let client = Buffered(TokioIo::new(upgraded));
    let tunnel = splice.run(client, Bytes::new(), conn, Arc::clone(&shared));
    // A task of its own, sized for the tunnel alone (as `connection::start_tunnel` does). `map`, not an
    // `async` block awaiting the tunnel: that would hold the tunnel future twice (a captured copy beside
    // the one it awaits).
    shared.tasks.spawn(tunnel.map(move |()| drop(stream)));
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
