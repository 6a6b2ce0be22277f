//! Accepting client connections and serving HTTP/1.1 on them, upgrades included.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus::IntGauge;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::client_io::{ClientIo, Phase};
use crate::config::{Config, ListenerConfig};
use crate::gateway::{Shared, StartError};
use crate::{dispatch, first_request};

/// One accepted client connection, shared by its HTTP requests and, after an upgrade, by its tunnel.
/// Dropping the last reference marks the connection closed in the metrics.
pub struct ClientConn {
    pub peer: SocketAddr,
    pub tls: bool,
    /// Inline, not an `Arc` of its own: one allocation less for every connection (an idle tunnel's too).
    pub phase: Phase,
    active: IntGauge,
    _slot: ConnSlot,
}

impl Drop for ClientConn {
    fn drop(&mut self) {
        self.active.dec();
    }
}

/// How many client connections a listener holds, and how many it may (`limits.max_connections`, which a
/// reload may change for a listener that stays bound).
struct ConnLimit {
    active: AtomicUsize,
    max: AtomicUsize,
    /// Signalled when a connection closes or the maximum changes.
    changed: Notify,
}

impl ConnLimit {
    fn new(max: usize) -> ConnLimit {
        ConnLimit {
            active: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            changed: Notify::new(),
        }
    }

    /// Waits for room under the maximum and takes one place. Only the listener's accept loop calls it,
    /// so a place seen free cannot be taken by someone else before it is counted.
    async fn acquire(self: &Arc<Self>) -> ConnSlot {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the count is read, so a connection closing in between is not missed.
            changed.as_mut().enable();
            if self.active.load(Ordering::Acquire) < self.max.load(Ordering::Acquire) {
                self.active.fetch_add(1, Ordering::AcqRel);
                return ConnSlot(Arc::clone(self));
            }
            changed.await;
        }
    }

    /// A lower maximum takes effect as connections close; open ones are not cut.
    fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
        self.changed.notify_waiters();
    }
}

/// One place under a listener's connection limit, given back on drop.
struct ConnSlot(Arc<ConnLimit>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_one();
    }
}

/// A bound listener. Dropping the handle does not stop it; `stop` does (on reload or shutdown).
pub struct ListenerHandle {
    pub config: ListenerConfig,
    pub addr: SocketAddr,
    /// The certificates in use: swapped on reload without touching the socket.
    tls: Arc<ArcSwapOption<TlsAcceptor>>,
    limit: Arc<ConnLimit>,
    stop: CancellationToken,
}

impl ListenerHandle {
    /// Binds `config.listen` and starts accepting, at most `max_connections` at once. `tls` must be the
    /// acceptor for `config.tls`.
    ///
    /// The accept loop is watched: if it ever panics, `Shared::fatal` is cancelled, so the process ends
    /// with an error instead of staying up with a port that accepts nothing.
    pub async fn bind(
        config: &ListenerConfig,
        tls: Option<TlsAcceptor>,
        max_connections: usize,
        shared: &Arc<Shared>,
    ) -> Result<ListenerHandle, StartError> {
        let bind_error = |source| StartError::Bind {
            name: config.name.clone(),
            addr: config.listen,
            source,
        };
        let listener = listen(config.listen).map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        let handle = ListenerHandle {
            config: config.clone(),
            addr,
            tls: Arc::new(ArcSwapOption::from_pointee(tls)),
            limit: Arc::new(ConnLimit::new(max_connections)),
            stop: shared.shutdown.child_token(),
        };
        tracing::info!(listener = %config.name, %addr, tls = config.tls.is_some(), max_connections, "listening");
        let accepting = tokio::spawn(accept_loop(
            listener,
            config.name.clone(),
            Arc::clone(&handle.tls),
            Arc::clone(&handle.limit),
            handle.stop.clone(),
            Arc::clone(shared),
        ));
        let _watcher = watch(accepting, config.name.clone(), shared.fatal.clone());
        Ok(handle)
    }

    /// Applies a reloaded `limits.max_connections`.
    pub fn set_max_connections(&self, max: usize) {
        self.limit.set_max(max);
    }

    /// Uses new certificates for connections accepted from now on.
    pub fn set_tls(&self, tls: Option<TlsAcceptor>) {
        self.tls.store(tls.map(Arc::new));
    }

    /// Closes the listening socket; connections already accepted go on.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// Cancels `fatal` if the accept loop of `listener` panics. The watcher's own handle is returned for
/// tests; the gateway lets it run detached (it ends with the accept loop).
fn watch(
    accepting: tokio::task::JoinHandle<()>,
    listener: String,
    fatal: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(error) = accepting.await
            && error.is_panic()
        {
            tracing::error!(%listener, %error, "listener died; stopping the gateway");
            fatal.cancel();
        }
    })
}

/// Kernel queue of connections not yet accepted. The default (128) overflows when a few hundred clients
/// connect at once (reconnect storms), costing them a SYN retransmit; nginx and HAProxy use larger ones.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // A restarted gateway must be able to bind while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn accept_loop(
    listener: TcpListener,
    name: String,
    tls: Arc<ArcSwapOption<TlsAcceptor>>,
    limit: Arc<ConnLimit>,
    stop: CancellationToken,
    shared: Arc<Shared>,
) {
    let accepted = shared
        .metrics
        .connections_accepted
        .with_label_values(&[&name]);
    let active = shared
        .metrics
        .connections_active
        .with_label_values(&[&name]);
    loop {
        // At the connection limit, stop accepting: the kernel's backlog holds new clients meanwhile.
        let slot = tokio::select! {
            slot = limit.acquire() => slot,
            _ = stop.cancelled() => return,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(listener = %name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        accepted.inc();
        active.inc();
        let acceptor = tls.load_full();
        let conn = Arc::new(ClientConn {
            peer,
            tls: acceptor.is_some(),
            phase: Phase::default(),
            active: active.clone(),
            _slot: slot,
        });
        let shared2 = Arc::clone(&shared);
        shared.tasks.spawn(serve(stream, acceptor, conn, shared2));
    }
}

async fn serve(
    stream: TcpStream,
    tls: Option<Arc<TlsAcceptor>>,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
) {
    let _ = stream.set_nodelay(true);
    let config = Arc::clone(&shared.state.load().config);
    let io = ClientIo::new(
        stream,
        Arc::clone(&conn),
        config.timeouts.header,
        config.timeouts.http_idle,
        config.timeouts.send,
    );
    match tls {
        None => first_request::serve(io, conn, shared, config).await,
        // Boxed: a TLS session is several KiB, and a plain connection's task (an idle tunnel's, too)
        // would otherwise be sized for it.
        Some(acceptor) => Box::pin(serve_tls(io, &acceptor, conn, shared, config)).await,
    }
}

async fn serve_tls(
    io: ClientIo,
    acceptor: &TlsAcceptor,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
    config: Arc<Config>,
) {
    // The TLS handshake counts against the header timeout, like the request head that follows it.
    match tokio::time::timeout(config.timeouts.header, acceptor.accept(io)).await {
        Ok(Ok(stream)) => serve_http(stream, conn, shared, &config).await,
        Ok(Err(error)) => tracing::debug!(peer = %conn.peer, %error, "TLS handshake failed"),
        Err(_) => tracing::debug!(peer = %conn.peer, "TLS handshake timed out"),
    }
}

/// Serves HTTP/1.1 on a connection through hyper until it closes or is upgraded.
pub async fn serve_http<I>(io: I, conn: Arc<ClientConn>, shared: Arc<Shared>, config: &Config)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = http1::Builder::new();
    // hyper answers a head larger than its buffer with 431; its buffer cannot be under 8 KiB.
    builder.max_buf_size(config.limits.max_header_size.max(8192));
    let service_conn = Arc::clone(&conn);
    let service_shared = Arc::clone(&shared);
    let service = service_fn(move |req| {
        dispatch::handle(req, Arc::clone(&service_conn), Arc::clone(&service_shared))
    });
    let connection = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shared.shutdown.cancelled() => {
            // Finish the request in flight, then close; idle keep-alive connections close at once.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(peer = %conn.peer, %error, "client connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_listener_that_dies_is_fatal_and_one_that_stops_is_not() {
        let fatal = CancellationToken::new();
        let stopped = watch(tokio::spawn(async {}), "stopped".into(), fatal.clone());
        let within = |what| async move {
            tokio::time::timeout(Duration::from_secs(10), what)
                .await
                .expect("watcher ends")
        };
        within(stopped).await.expect("watcher runs");
        assert!(
            !fatal.is_cancelled(),
            "a listener that returned is not fatal"
        );
        let dying = tokio::spawn(async { panic!("accept loop bug") });
        within(watch(dying, "dying".into(), fatal.clone()))
            .await
            .expect("watcher runs");
        assert!(fatal.is_cancelled(), "a listener that panicked is fatal");
    }

    // Paused time: a wait that must not end is decided by the clock jumping ahead, not by sleeping.
    #[tokio::test(start_paused = true)]
    async fn the_connection_limit_follows_its_maximum() {
        let limit = Arc::new(ConnLimit::new(1));
        let first = limit.acquire().await;
        let wait = Duration::from_millis(50);
        assert!(
            tokio::time::timeout(wait, limit.acquire()).await.is_err(),
            "a second place under a maximum of one"
        );
        limit.set_max(2);
        let second = tokio::time::timeout(Duration::from_secs(10), limit.acquire())
            .await
            .expect("a raised maximum makes room at once");
        limit.set_max(1);
        drop(first);
        assert!(
            tokio::time::timeout(wait, limit.acquire()).await.is_err(),
            "a lowered maximum is kept as connections close"
        );
        drop(second);
        let _third = tokio::time::timeout(Duration::from_secs(10), limit.acquire())
            .await
            .expect("room once under the lowered maximum");
    }
}
