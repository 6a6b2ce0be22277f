//! Listening sockets: bind, accept within the connection limit, and hand each connection to
//! `connection.rs` as a task of its own. A listener's certificates, HTTP versions and limit can change on
//! reload without touching its sockets.
//!
//! A listener is one socket served by one accept loop on the caller's runtime, or, when the gateway has
//! worker runtimes (`gateway::Workers`), one socket per worker on the same address (SO_REUSEPORT), each
//! registered with and accepted on its own worker's runtime: a connection then lives on the thread that
//! accepted it, start to end, and the kernel spreads new connections over the sockets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::IntCounter;
use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::connection::{self, Front};
use crate::admission::ScopeKind;
use crate::config::ListenerConfig;
use crate::conn::{ConnLimit, Listener};
use crate::state::Shared;
use crate::tls::TlsAcceptor;

/// A bound listener. Dropping the handle does not stop it; `stop` does (on reload or shutdown).
pub struct ListenerHandle {
    pub config: ListenerConfig,
    pub addr: SocketAddr,
    /// How new connections are served (certificates, HTTP versions): one per accept loop, each naming
    /// its worker, all swapped on reload without touching the sockets.
    fronts: Vec<Arc<ArcSwap<Front>>>,
    /// One limit for all the listener's sockets: to the operator it is one listener.
    limit: Arc<ConnLimit>,
    stop: CancellationToken,
    /// The accept loops (closed once they are all started), so that `stop` can wait for their sockets
    /// to be closed.
    loops: TaskTracker,
}

impl ListenerHandle {
    /// Binds `config.listen` and starts accepting, at most `max_connections` at once: once on the
    /// caller's runtime if `workers` is empty, else once on each worker runtime. `tls` must be the
    /// acceptor for `config.tls`.
    ///
    /// Each accept loop is watched: if one ever panics, `Shared::fatal` is cancelled, so the process ends
    /// with an error instead of staying up with a socket that accepts nothing.
    pub async fn bind(
        config: &ListenerConfig,
        tls: Option<TlsAcceptor>,
        max_connections: usize,
        workers: &[Handle],
        shared: &Arc<Shared>,
    ) -> std::io::Result<ListenerHandle> {
        let sockets = listen_all(config.listen, workers)?;
        let addr = sockets[0].local_addr()?;
        let fronts: Vec<_> = (0..sockets.len())
            .map(|worker| {
                let front = front(tls.clone(), config, worker, shared);
                Arc::new(ArcSwap::from_pointee(front))
            })
            .collect();
        let handle = ListenerHandle {
            config: config.clone(),
            addr,
            fronts,
            limit: Arc::new(ConnLimit::new(max_connections)),
            stop: shared.shutdown.token().child_token(),
            loops: TaskTracker::new(),
        };
        tracing::info!(listener = %config.name, %addr, tls = config.tls.is_some(), max_connections, sockets = sockets.len(), "listening");
        for (worker, socket) in sockets.into_iter().enumerate() {
            // Counted by worker only when there are workers: with one runtime there is nothing to tell
            // apart.
            let by_worker = (!workers.is_empty()).then(|| {
                shared
                    .metrics
                    .worker_connections_accepted
                    .with_label_values(&[&config.name, &worker.to_string()])
            });
            let accepting = handle.loops.track_future(accept_loop(
                socket,
                config.name.clone(),
                Arc::clone(&handle.fronts[worker]),
                Arc::clone(&handle.limit),
                handle.stop.clone(),
                by_worker,
                Arc::clone(shared),
            ));
            let accepting = match workers.get(worker) {
                Some(runtime) => shared.tasks.spawn_on(accepting, runtime),
                None => shared.tasks.spawn(accepting),
            };
            let _watcher = watch(accepting, config.name.clone(), shared.fatal.clone());
        }
        handle.loops.close();
        Ok(handle)
    }

    /// Applies a reloaded `limits.max_connections`.
    pub fn set_max_connections(&self, max: usize) {
        self.limit.set_max(max);
    }

    /// Uses new certificates, HTTP and admission settings for connections accepted from now on, on every
    /// socket of the listener.
    pub fn set_front(&self, tls: Option<TlsAcceptor>, config: &ListenerConfig, shared: &Shared) {
        for (worker, front) in self.fronts.iter().enumerate() {
            front.store(Arc::new(self::front(tls.clone(), config, worker, shared)));
        }
    }

    /// Closes the listening sockets, all of them, and returns once they are closed (the port then
    /// refuses new connections); connections already accepted go on.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.loops.wait().await;
    }
}

/// How listener `config` serves the connections of `worker`'s socket (0 for the only one), its admission
/// state taken from `shared` (the same across reloads and for every socket). Each socket has a front of
/// its own, so the references every connection takes to it are counted on its worker's thread alone.
fn front(
    tls: Option<TlsAcceptor>,
    config: &ListenerConfig,
    worker: usize,
    shared: &Shared,
) -> Front {
    let max_tracked = shared.state.load().config.limits.max_tracked_clients;
    Front {
        tls,
        http: config.http.clone(),
        listener: Arc::new(Listener {
            name: config.name.clone(),
            worker,
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

/// The sockets of a listener on `addr`: one, registered with the caller's runtime, if `workers` is
/// empty; else one per worker runtime, each registered with it (its readiness events then wake that
/// runtime alone). Several sockets share the address with SO_REUSEPORT; for port 0 the first picks the
/// port and the others bind to it. All are bound before any accepts, so a failure leaves nothing bound.
fn listen_all(addr: SocketAddr, workers: &[Handle]) -> std::io::Result<Vec<TcpListener>> {
    if workers.is_empty() {
        return Ok(vec![listen(addr, false)?]);
    }
    let share = workers.len() > 1;
    let mut sockets = Vec::with_capacity(workers.len());
    let mut addr = addr;
    for runtime in workers {
        let _entered = runtime.enter();
        let socket = listen(addr, share)?;
        addr = socket.local_addr()?;
        sockets.push(socket);
    }
    Ok(sockets)
}

/// Binds `addr` and listens, registered with the runtime of the current context. `share`: the socket is
/// one of several on the address (SO_REUSEPORT), among which the kernel spreads new connections.
fn listen(addr: SocketAddr, share: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // A restarted gateway must be able to bind while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    if share {
        reuse_port(&socket)?;
    }
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Where tokio offers SO_REUSEPORT.
#[cfg(all(
    unix,
    not(any(
        target_os = "solaris",
        target_os = "illumos",
        target_os = "cygwin",
        target_os = "nuttx"
    ))
))]
fn reuse_port(socket: &TcpSocket) -> std::io::Result<()> {
    socket.set_reuseport(true)
}

#[cfg(not(all(
    unix,
    not(any(
        target_os = "solaris",
        target_os = "illumos",
        target_os = "cygwin",
        target_os = "nuttx"
    ))
)))]
fn reuse_port(_: &TcpSocket) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "a socket per worker needs SO_REUSEPORT, which this system lacks",
    ))
}

/// Accepts on one socket of listener `name` until `stop`; `by_worker` counts the connections of this
/// socket's worker, when the listener has a socket per worker.
async fn accept_loop(
    listener: TcpListener,
    name: String,
    front: Arc<ArcSwap<Front>>,
    limit: Arc<ConnLimit>,
    stop: CancellationToken,
    by_worker: Option<IntCounter>,
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
        // A place under the connection limit is taken after the accept, not before: the listener's
        // other accept loops share the limit, and a place held by a loop whose socket gets no client
        // would keep the clients queued on another socket out. At the limit, this loop holds its one
        // client (not yet read) and accepts nothing more until a place is free; the kernel's backlog
        // holds the others meanwhile.
        let slot = tokio::select! {
            slot = limit.acquire() => slot,
            _ = stop.cancelled() => return,
        };
        accepted.inc();
        if let Some(by_worker) = &by_worker {
            by_worker.inc();
        }
        let front = front.load_full();
        let shared2 = Arc::clone(&shared);
        // Boxed: the connection's future is a few KB (its first request is read in it), and spawning
        // moves a future several times (into the task, and its whole size again when the task ends).
        shared.tasks.spawn(Box::pin(connection::admit(
            stream,
            peer,
            front,
            (slot, active.clone()),
            shared2,
        )));
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
