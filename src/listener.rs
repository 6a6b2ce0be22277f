//! Accepting client connections and serving HTTP/1.1 on them, upgrades included.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus::IntGauge;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
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
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for ClientConn {
    fn drop(&mut self) {
        self.active.dec();
    }
}

/// A bound listener. Dropping the handle does not stop it; `stop` does (on reload or shutdown).
pub struct ListenerHandle {
    pub config: ListenerConfig,
    pub addr: SocketAddr,
    /// The certificates in use: swapped on reload without touching the socket.
    tls: Arc<ArcSwapOption<TlsAcceptor>>,
    stop: CancellationToken,
}

impl ListenerHandle {
    /// Binds `config.listen` and starts accepting. `tls` must be the acceptor for `config.tls`.
    pub async fn bind(
        config: &ListenerConfig,
        tls: Option<TlsAcceptor>,
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
            stop: shared.shutdown.child_token(),
        };
        tracing::info!(listener = %config.name, %addr, tls = config.tls.is_some(), "listening");
        tokio::spawn(accept_loop(
            listener,
            config.name.clone(),
            Arc::clone(&handle.tls),
            handle.stop.clone(),
            Arc::clone(shared),
        ));
        Ok(handle)
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
    stop: CancellationToken,
    shared: Arc<Shared>,
) {
    let max = shared.state.load().config.limits.max_connections;
    let permits = Arc::new(Semaphore::new(max));
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
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
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
            _permit: permit,
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
