//! Listening sockets: bind, accept within the connection limit, and hand each connection to
//! `connection.rs` as a task of its own. A listener's certificates, HTTP versions and limit can change on
//! reload without touching its socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::tls::TlsAcceptor;
use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

use super::connection::{self, Front};
use crate::admission::ScopeKind;
use crate::config::ListenerConfig;
use crate::conn::{ConnLimit, Listener};
use crate::state::Shared;

/// A bound listener. Dropping the handle does not stop it; `stop` does (on reload or shutdown).
pub struct ListenerHandle {
    pub config: ListenerConfig,
    pub addr: SocketAddr,
    /// How new connections are served (certificates, HTTP versions): swapped on reload without touching
    /// the socket.
    front: Arc<ArcSwap<Front>>,
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
    ) -> std::io::Result<ListenerHandle> {
        let listener = listen(config.listen)?;
        let addr = listener.local_addr()?;
        let handle = ListenerHandle {
            config: config.clone(),
            addr,
            front: Arc::new(ArcSwap::from_pointee(front(tls, config, shared))),
            limit: Arc::new(ConnLimit::new(max_connections)),
            stop: shared.shutdown.child_token(),
        };
        tracing::info!(listener = %config.name, %addr, tls = config.tls.is_some(), max_connections, "listening");
        let accepting = shared.tasks.spawn(accept_loop(
            listener,
            config.name.clone(),
            Arc::clone(&handle.front),
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

    /// Uses new certificates, HTTP and admission settings for connections accepted from now on.
    pub fn set_front(&self, tls: Option<TlsAcceptor>, config: &ListenerConfig, shared: &Shared) {
        self.front.store(Arc::new(front(tls, config, shared)));
    }

    /// Closes the listening socket; connections already accepted go on.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// How listener `config` serves its connections, its admission state taken from `shared` (the same across
/// reloads).
fn front(tls: Option<TlsAcceptor>, config: &ListenerConfig, shared: &Shared) -> Front {
    let max_tracked = shared.state.load().config.limits.max_tracked_clients;
    Front {
        tls,
        http: config.http.clone(),
        listener: Arc::new(Listener {
            name: config.name.clone(),
            admission: config.admission.clone(),
            scope: shared
                .scopes
                .get(ScopeKind::Listener, &config.name, max_tracked),
        }),
    }
}

/// Cancels `fatal` if the accept loop of `listener` panics. The watcher's own handle is returned for
/// tests; the gateway lets it run detached (it ends with the accept loop). Not tracked: it must outlive
/// the loop it watches, and ends with it.
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
    front: Arc<ArcSwap<Front>>,
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
        let front = front.load_full();
        let shared2 = Arc::clone(&shared);
        shared.tasks.spawn(connection::admit(
            stream,
            peer,
            front,
            (slot, active.clone()),
            shared2,
        ));
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
}
