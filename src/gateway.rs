//! The running gateway, the top of the library: `start` binds the listeners (`server`), the admin
//! listener (`admin`) and starts the health checks (`health_checks`) and DNS discovery (`discovery`) over
//! one shared state (`state`); `reload` swaps the config generation and diffs the listeners, one reload at
//! a time (SIGHUP, the admin API's `POST /reload` through a task of its own, the library); `shutdown`
//! stops accepting, tells every tunnel to close, and waits for every task.
//!
//! `Gateway::start` returns at once with a handle; tests bind port 0 and ask the handle for the
//! addresses. It serves everything on the caller's runtime; `Gateway::start_on` serves client
//! connections on worker runtimes the caller runs (`Workers`: the binary's per-worker model), and keeps
//! the rest (reloads, the admin listener, health checks, DNS discovery) on the caller's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::admission::ScopeKind;
use crate::balancer::BackendStatus;
use crate::config::{AdminTokens, Config, ConfigError, ConfigErrors, ListenerConfig};
use crate::metrics::Metrics;
use crate::server::ListenerHandle;
use crate::state::{Loaded, ReloadRecord, ReloadRequest, Shared, State};
use crate::tls::{self, TlsAcceptor, TlsError};
use crate::upstream::TlsClients;
use crate::{admin, discovery, health_checks};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listener `{name}` cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin listener cannot bind {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A file the config names cannot be used: a CA or client certificate file of a backend `tls`
    /// table, the admin token file.
    #[error("{0}")]
    Files(ConfigErrors),
}

/// Why a reload was refused; the running config stays in place.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("the gateway was not started from a file, so there is nothing to re-read")]
    NoSource,
}

/// A running gateway.
pub struct Gateway {
    inner: Arc<Inner>,
}

/// The runtimes a gateway serves client connections on, in the per-worker model: every listener gets a
/// socket on each (SO_REUSEPORT when there are several), accepted on that runtime, so a connection, its
/// tunnel, its timers and its backend connections all live on the runtime that accepted it. Each should
/// be a current-thread runtime on a thread of its own, kept running (`block_on`) until
/// `Gateway::shutdown` has returned; the caller builds and runs them (the gateway only holds handles).
/// None (`Workers::default()`): everything runs on the caller's runtime, as `Gateway::start` does.
#[derive(Clone, Debug, Default)]
pub struct Workers(Vec<Handle>);

impl Workers {
    pub fn new(runtimes: impl IntoIterator<Item = Handle>) -> Workers {
        Workers(runtimes.into_iter().collect())
    }

    /// How many worker runtimes there are (0: the caller's runtime serves the connections).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The gateway's own part, shared with the task that carries out the admin API's reloads.
struct Inner {
    shared: Arc<Shared>,
    listeners: Mutex<HashMap<String, ListenerHandle>>,
    admin: Option<SocketAddr>,
    /// The runtimes new listeners are bound on (reloads bind there too).
    workers: Workers,
    /// One reload at a time (SIGHUP, the admin API and the library may ask at once).
    reloading: tokio::sync::Mutex<()>,
}

/// Where a reload comes from, for `/status`.
#[derive(Clone, Copy)]
enum Trigger {
    Signal,
    Admin,
    Api,
}

impl Trigger {
    fn label(self) -> &'static str {
        match self {
            Trigger::Signal => "signal",
            Trigger::Admin => "admin",
            Trigger::Api => "api",
        }
    }
}

/// Loads the files `config` names besides listener certificates: backend TLS files and admin tokens.
fn load_files(config: &Config, previous: Option<&TlsClients>) -> Result<Loaded, StartError> {
    let backend_tls = TlsClients::load(config, previous);
    let admin_tokens = config
        .admin
        .as_ref()
        .and_then(|a| a.token_file.as_ref())
        .map(AdminTokens::load)
        .transpose();
    match (backend_tls, admin_tokens) {
        (Ok(backend_tls), Ok(admin_tokens)) => Ok(Loaded {
            backend_tls,
            admin_tokens,
        }),
        (tls, tokens) => {
            let mut errors = tls.err().map_or_else(Vec::new, |e| e.0);
            errors.extend(tokens.err());
            Err(StartError::Files(ConfigErrors(errors)))
        }
    }
}

impl Gateway {
    /// Binds every listener of `config` (and the admin listener) and starts serving, all on the caller's
    /// runtime.
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        Self::start_on(config, Workers::default()).await
    }

    /// Binds every listener of `config` once on each of `workers` and serves its connections there; the
    /// admin listener, the health checks, DNS discovery and reloads run on the caller's runtime. With no
    /// workers, the same as `start`.
    pub async fn start_on(config: Config, workers: Workers) -> Result<Gateway, StartError> {
        let acceptors = load_tls(&config)?;
        let loaded = load_files(&config, None)?;
        let metrics = Metrics::new();
        metrics.config_reloads.with_label_values(&["ok"]).inc_by(0);
        metrics
            .config_reloads
            .with_label_values(&["error"])
            .inc_by(0);
        metrics.config_last_reload_success.set(unix_now());
        let (requests, reload_requests) = mpsc::channel(4);
        let shared = Arc::new(Shared::new(
            config,
            loaded,
            metrics,
            requests,
            workers.len(),
        ));
        match Self::serve(&shared, acceptors, &workers).await {
            Ok((listeners, admin)) => {
                shared.ready.store(true, Ordering::Relaxed);
                let inner = Arc::new(Inner {
                    shared,
                    listeners: Mutex::new(listeners),
                    admin,
                    workers,
                    reloading: tokio::sync::Mutex::new(()),
                });
                inner
                    .shared
                    .tasks
                    .spawn(serve_reloads(Arc::clone(&inner), reload_requests));
                Ok(Gateway { inner })
            }
            Err(error) => {
                // Whatever was started (health checks, listeners already bound) stops with the token.
                shared.shutdown.cancel();
                Err(error)
            }
        }
    }

    /// Starts the health checks and binds the listeners and the admin listener of the running config.
    async fn serve(
        shared: &Arc<Shared>,
        acceptors: Vec<Option<TlsAcceptor>>,
        workers: &Workers,
    ) -> Result<(HashMap<String, ListenerHandle>, Option<SocketAddr>), StartError> {
        health_checks::start(shared);
        discovery::start(shared);
        let config = Arc::clone(&shared.state.load().config);
        let mut listeners = HashMap::new();
        for (listener, tls) in config.listeners.iter().zip(acceptors) {
            let max = config.limits.max_connections;
            let handle = bind(listener, tls, max, workers, shared).await?;
            listeners.insert(listener.name.clone(), handle);
        }
        let admin = match &config.admin {
            Some(admin) => Some(
                admin::start(admin.listen, Arc::clone(shared))
                    .await
                    .map_err(|source| StartError::Admin {
                        addr: admin.listen,
                        source,
                    })?,
            ),
            None => None,
        };
        Ok((listeners, admin))
    }

    /// The bound address of a listener (the real port when the config said port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.inner
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map(|l| l.addr)
    }

    /// Resolves if a part the gateway cannot run without has died (a listener's accept loop panicked):
    /// the caller should shut down and exit with an error. Never resolves otherwise.
    pub async fn failed(&self) {
        self.inner.shared.fatal.cancelled().await;
    }

    /// The bound address of the admin listener.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.inner.admin
    }

    /// A read-only view of this gateway's metrics and backends that stays usable after `shutdown`.
    pub fn monitor(&self) -> Monitor {
        Monitor(Arc::clone(&self.inner.shared))
    }

    /// Read buffers currently lent to tunnels: zero when every tunnel is idle.
    pub fn buffers_in_use(&self) -> usize {
        self.monitor().buffers_in_use()
    }

    /// The Prometheus text exposition of the gateway's metrics.
    pub fn metrics_text(&self) -> String {
        self.monitor().metrics_text()
    }

    /// Every backend of the running configuration, with its state and live connection count.
    pub fn backends(&self) -> Vec<BackendStatus> {
        self.monitor().backends()
    }

    /// Re-reads the file the running config came from and applies it, as SIGHUP does.
    pub async fn reload_from_file(&self) -> Result<(), ReloadError> {
        self.inner.reload_from_file(Trigger::Signal).await.map(drop)
    }

    /// Applies a new config: new connections follow it at once; live tunnels keep the settings, route and
    /// backend they started with (a backend the new config leaves out drains: see `Pools::build`);
    /// listeners are diffed (unchanged ones keep their socket); certificates are re-read. On any error
    /// nothing changes.
    pub async fn reload(&self, config: Config) -> Result<(), ReloadError> {
        self.inner.reload(config, Trigger::Api).await.map(drop)
    }

    /// Stops accepting, closes every tunnel with 1001 "going away" (spread over `close_spread`), lets
    /// in-flight requests finish, and waits for all of it, at most the config's drain timeout: on every
    /// worker runtime too, which must keep running until this returns.
    pub async fn shutdown(self) {
        let drain = self.inner.shared.state.load().config.timeouts.drain;
        self.inner.shared.ready.store(false, Ordering::Relaxed);
        self.inner.shared.shutdown.cancel();
        // Closed first, so no backend connection is pooled from now on (`Upstream::checkin`); then the
        // idle pooled ones are closed: their tasks are tracked too.
        self.inner.shared.tasks.close();
        self.inner.shared.upstream.retain(|_, _| false);
        if tokio::time::timeout(drain, self.inner.shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.inner.shared.tasks.len(),
                "drain timeout reached with connections still open"
            );
        }
    }
}

impl Inner {
    /// Re-reads the file the running config came from and applies it; returns the new generation.
    async fn reload_from_file(&self, trigger: Trigger) -> Result<u64, ReloadError> {
        let path = self
            .shared
            .state
            .load()
            .config
            .source
            .clone()
            .ok_or(ReloadError::NoSource)?;
        let result = match Config::from_file(&path) {
            Ok(config) => self.reload(config, trigger).await,
            Err(errors) => Err(errors.into()),
        };
        // `reload` counts and logs everything else; a file that does not check out stops before it.
        if let Err(ReloadError::Config(errors)) = &result {
            tracing::error!(file = %path.display(), %errors, "reload refused; the running config stays");
            self.shared
                .metrics
                .config_reloads
                .with_label_values(&["error"])
                .inc();
            self.record(trigger, Err(errors.to_string()));
        }
        result
    }

    /// Applies `config`; returns the new generation (counted under the reload lock, so it is this
    /// reload's even when another follows at once).
    async fn reload(&self, config: Config, trigger: Trigger) -> Result<u64, ReloadError> {
        let _one_at_a_time = self.reloading.lock().await;
        let result = self.apply(config).await;
        let label = if result.is_ok() { "ok" } else { "error" };
        self.shared
            .metrics
            .config_reloads
            .with_label_values(&[label])
            .inc();
        match result {
            Ok(()) => {
                self.shared
                    .metrics
                    .config_last_reload_success
                    .set(unix_now());
                let generation = self.shared.generation.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::info!(generation, trigger = trigger.label(), "config reloaded");
                self.record(trigger, Ok(()));
                Ok(generation)
            }
            Err(error) => {
                tracing::error!(%error, trigger = trigger.label(), "reload refused; the running config stays");
                self.record(trigger, Err(error.to_string()));
                Err(error)
            }
        }
    }

    fn record(&self, trigger: Trigger, result: Result<(), String>) {
        *self
            .shared
            .last_reload
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = ReloadRecord::now(trigger.label(), result);
    }

    async fn apply(&self, config: Config) -> Result<(), ReloadError> {
        let old = self.shared.state.load_full();
        if config.admin.as_ref().map(|a| a.listen) != old.config.admin.as_ref().map(|a| a.listen) {
            tracing::warn!("the admin address changes only on restart");
        }
        if config.workers != old.config.workers {
            tracing::warn!("the number of workers changes only on restart");
        }
        if config.runtime != old.config.runtime {
            tracing::warn!(
                runtime = config.runtime.name(),
                "the runtime model changes only on restart"
            );
        }
        let acceptors = load_tls(&config).map_err(StartError::from)?;
        let loaded = load_files(&config, Some(&old.backend_tls))?;
        // Bind what is new before changing anything, so a failed bind leaves the old setup whole.
        let mut fresh = HashMap::new();
        {
            let current: HashMap<String, SocketAddr> = self
                .listeners
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(name, l)| (name.clone(), l.config.listen))
                .collect();
            for (listener, tls) in config.listeners.iter().zip(acceptors) {
                if current.get(&listener.name) == Some(&listener.listen) {
                    fresh.insert(listener.name.clone(), (None, tls, listener.clone()));
                } else {
                    let max = config.limits.max_connections;
                    let handle = bind(listener, tls.clone(), max, &self.workers, &self.shared);
                    match handle.await {
                        Ok(handle) => fresh
                            .insert(listener.name.clone(), (Some(handle), tls, listener.clone())),
                        Err(error) => {
                            for (handle, _, _) in fresh.into_values() {
                                if let Some(handle) = handle {
                                    handle.stop().await;
                                }
                            }
                            return Err(error.into());
                        }
                    };
                }
            }
        }
        let max_connections = config.limits.max_connections;
        let max_tracked = config.limits.max_tracked_clients;
        self.shared.scopes.retain(|kind, name| match kind {
            ScopeKind::Listener => config.listeners.iter().any(|l| l.name == name),
            ScopeKind::Route => config.routes.iter().any(|r| r.name == name),
        });
        let stop = self.shared.shutdown.token();
        let state = State::new(config, Some(&old), loaded, (&self.shared.scopes, stop));
        self.shared.state.store(Arc::new(state));
        *self
            .shared
            .loaded_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = SystemTime::now();
        let removed: Vec<(String, ListenerHandle)> = {
            let mut listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
            let removed = listeners
                .extract_if(|name, _| !matches!(fresh.get(name), Some((None, _, _))))
                .collect();
            for (name, (handle, tls, config)) in fresh {
                match handle {
                    Some(handle) => {
                        listeners.insert(name, handle);
                    }
                    None => {
                        if let Some(kept) = listeners.get(&name) {
                            kept.set_front(tls, &config, &self.shared);
                            kept.set_max_connections(max_connections);
                        }
                    }
                }
            }
            removed
        };
        // Stopped once out of the map (the lock is not held across the wait): when the reload returns,
        // their ports refuse new connections.
        for (name, handle) in removed {
            handle.stop().await;
            tracing::info!(listener = %name, "listener closed");
        }
        // Listeners bound by this reload took their scopes before the new limits were stored.
        for (_, _, scope) in self.shared.scopes.all() {
            scope.clients.set_max_tracked(max_tracked);
        }
        // Last, so that clients moving to new connections meet the new listeners' settings.
        self.shared.reloaded.notify_waiters();
        // Idle pooled connections go with backends removed, draining, or reached with a replaced TLS
        // client.
        let state = self.shared.state.load();
        self.shared.upstream.retain(|addr, tls| {
            state.pools.iter().any(|p| {
                p.backends().iter().any(|b| {
                    b.addr == addr && b.tls.as_ref().map(|t| t.id()) == tls && !b.is_draining()
                })
            })
        });
        Ok(())
    }
}

/// Carries out the admin API's reloads (`POST /reload`), one at a time, until shutdown.
async fn serve_reloads(inner: Arc<Inner>, mut requests: mpsc::Receiver<ReloadRequest>) {
    loop {
        let reply = tokio::select! {
            reply = requests.recv() => match reply {
                Some(reply) => reply,
                None => return,
            },
            _ = inner.shared.shutdown.cancelled() => return,
        };
        let result = inner.reload_from_file(Trigger::Admin).await;
        let _ = reply.send(result.map_err(|e| e.to_string()));
    }
}

/// A read-only view of a gateway: its metrics, read buffers and backends. Cheap to clone; it keeps the
/// gateway's shared state alive, so it can be read after `Gateway::shutdown` (by tests, by an embedding
/// program's final report).
#[derive(Clone)]
pub struct Monitor(Arc<Shared>);

impl Monitor {
    /// The config generation: 1 at start, one more at every successful reload.
    pub fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::Relaxed)
    }

    /// Read buffers currently lent to tunnels: zero when every tunnel is idle.
    pub fn buffers_in_use(&self) -> usize {
        self.0.buffers.lent()
    }

    /// The Prometheus text exposition of the gateway's metrics.
    pub fn metrics_text(&self) -> String {
        self.0.render_metrics()
    }

    /// Every backend of the running configuration, with its state and live connection count.
    pub fn backends(&self) -> Vec<BackendStatus> {
        self.0.state.load().pools.status()
    }
}

/// Binds one listener (once on each worker runtime, if there are any), naming it in the error.
async fn bind(
    listener: &ListenerConfig,
    tls: Option<TlsAcceptor>,
    max_connections: usize,
    workers: &Workers,
    shared: &Arc<Shared>,
) -> Result<ListenerHandle, StartError> {
    ListenerHandle::bind(listener, tls, max_connections, &workers.0, shared)
        .await
        .map_err(|source| StartError::Bind {
            name: listener.name.clone(),
            addr: listener.listen,
            source,
        })
}

/// Loads the certificates of every TLS listener of `config`, as `Gateway::start` would: the problems
/// with each (a file missing or unreadable, a key that does not match), for `wsgate check`.
pub fn check_certificates(config: &Config) -> Vec<TlsError> {
    config
        .listeners
        .iter()
        .filter_map(|l| l.tls.as_ref())
        .filter_map(|tls| tls::acceptor(tls, &[]).err())
        .collect()
}

/// Loads the CA and client certificate files of every backend `tls` table of `config`, and the admin
/// token file, as `Gateway::start` would: the problems with each, as `file:line: key: message`, for
/// `wsgate check`.
pub fn check_backend_tls(config: &Config) -> Vec<ConfigError> {
    match load_files(config, None) {
        Err(StartError::Files(errors)) => errors.0,
        _ => Vec::new(),
    }
}

/// Loads the certificates of every TLS listener, in listener order.
fn load_tls(config: &Config) -> Result<Vec<Option<TlsAcceptor>>, TlsError> {
    config
        .listeners
        .iter()
        .map(|l| {
            l.tls
                .as_ref()
                .map(|tls| tls::acceptor(tls, &l.http.alpn))
                .transpose()
        })
        .collect()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
