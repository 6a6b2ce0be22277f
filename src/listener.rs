//! Accepting client connections and serving HTTP/1.1 on them, upgrades included.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus::IntGauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::client_io::{ClientIo, Phase};
use crate::dispatch;
use crate::gateway::Shared;

/// One accepted client connection, shared by its HTTP requests and, after an upgrade, by its tunnel.
/// Dropping the last reference marks the connection closed in the metrics.
pub struct ClientConn {
    pub peer: SocketAddr,
    pub listener: String,
    pub tls: bool,
    pub phase: Arc<Phase>,
    active: IntGauge,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for ClientConn {
    fn drop(&mut self) {
        self.active.dec();
    }
}

pub async fn accept_loop(listener: TcpListener, name: String, shared: Arc<Shared>) {
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
            _ = shared.shutdown.cancelled() => return,
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
            _ = shared.shutdown.cancelled() => return,
        };
        accepted.inc();
        active.inc();
        let conn = Arc::new(ClientConn {
            peer,
            listener: name.clone(),
            tls: false,
            phase: Arc::new(Phase::default()),
            active: active.clone(),
            _permit: permit,
        });
        let shared2 = Arc::clone(&shared);
        shared.tasks.spawn(serve(stream, conn, shared2));
    }
}

async fn serve(stream: TcpStream, conn: Arc<ClientConn>, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let config = Arc::clone(&shared.state.load().config);
    let io = ClientIo::new(
        stream,
        Arc::clone(&conn.phase),
        config.timeouts.header,
        config.timeouts.http_idle,
    );
    let mut builder = http1::Builder::new();
    // hyper answers a head larger than its buffer with 431; its buffer cannot be under 8 KiB.
    builder.max_buf_size(config.limits.max_header_size.max(8192));
    let service_conn = Arc::clone(&conn);
    let service_shared = Arc::clone(&shared);
    let service = service_fn(move |req| {
        dispatch::handle(req, Arc::clone(&service_conn), Arc::clone(&service_shared))
    });
    drop(config);
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
