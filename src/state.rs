//! The shared runtime state of a gateway: the config generation new connections follow (`State`) and
//! what every connection task needs and every reload keeps (`Shared`: metrics, the backend connection
//! pool, read buffers, the shutdown signal, the task tracker).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use prometheus::core::Collector;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{ScopeKind, Scopes};
use crate::balancer::{Backend, Pools};
use crate::config::{AdminTokens, Config};
use crate::metrics::Metrics;
use crate::router::Router;
use crate::upstream::{TlsClients, Upstream};
use crate::websocket::BufferPool;

/// One config generation: what new connections are routed by. Live tunnels keep the `Arc` of the route
/// they started with, so a reload never changes them.
pub struct State {
    pub config: Arc<Config>,
    pub router: Router,
    pub pools: Pools,
    /// The TLS clients toward backends, kept for the next generation to reuse the unchanged ones.
    pub backend_tls: TlsClients,
    /// The admin API's bearer tokens (`admin.token_file`); `None`: its write endpoints are off.
    pub admin_tokens: Option<Arc<AdminTokens>>,
}

/// What a generation is built from besides its config: the files it names, loaded before anything
/// changes (loading them may fail; building the state must not).
pub struct Loaded {
    pub backend_tls: TlsClients,
    pub admin_tokens: Option<AdminTokens>,
}

/// The gateway's shutdown: the token its tasks wait on, and a flag raised before the token is cancelled,
/// which can be read without the token's lock (tunnels read it at every wake-up, see
/// `TunnelContext::stop_epoch`).
#[derive(Default)]
pub struct Shutdown {
    token: CancellationToken,
    begun: AtomicBool,
}

impl Shutdown {
    /// Raises the flag, then cancels the token: whoever the token wakes sees the flag raised.
    pub fn cancel(&self) {
        self.begun.store(true, Ordering::Release);
        self.token.cancel();
    }

    /// Whether shutdown has begun; no lock taken.
    pub fn is_cancelled(&self) -> bool {
        self.begun.load(Ordering::Acquire)
    }

    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// The token itself, to make children of (listeners' stops, backends' drain signals). Cancel the
    /// gateway through `cancel`, never through this: the flag would not be raised.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl State {
    /// `loaded`: the files `config` names (`TlsClients::load`, `AdminTokens::load`). `stop`: the
    /// gateway's shutdown token, the parent of the backends' drain signals.
    pub fn new(
        config: Config,
        previous: Option<&State>,
        loaded: Loaded,
        (scopes, stop): (&Scopes, &CancellationToken),
    ) -> State {
        let backend_tls = loaded.backend_tls;
        let pools = Pools::build(&config, previous.map(|p| &p.pools), &backend_tls, stop);
        let router = Router::build(&config, &pools, scopes);
        State {
            config: Arc::new(config),
            router,
            pools,
            backend_tls,
            admin_tokens: loaded.admin_tokens.map(Arc::new),
        }
    }
}

/// How the last reload went, for `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadRecord {
    pub at_unix: u64,
    pub ok: bool,
    pub error: Option<String>,
    /// `start`, `signal` (SIGHUP), `admin` (`POST /reload`) or `api` (`Gateway::reload`).
    pub trigger: &'static str,
}

impl ReloadRecord {
    pub fn now(trigger: &'static str, result: Result<(), String>) -> ReloadRecord {
        ReloadRecord {
            at_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            ok: result.is_ok(),
            error: result.err(),
            trigger,
        }
    }
}

/// A request to reload the config file, from the admin API, answered with the new generation or the
/// reason the reload was refused.
pub type ReloadRequest = oneshot::Sender<Result<u64, String>>;

/// Everything a connection task needs, shared by all of them.
pub struct Shared {
    pub state: ArcSwap<State>,
    /// Admission control's per-client state of every listener and route, kept across reloads.
    pub scopes: Scopes,
    pub metrics: Metrics,
    pub buffers: BufferPool,
    pub upstream: Arc<Upstream>,
    /// Cancelled when the gateway shuts down.
    pub shutdown: Shutdown,
    /// Every task the gateway starts (connections, tunnels, listeners, admin, health checks, backend
    /// connections), so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// When the running config was loaded.
    pub loaded_at: Mutex<SystemTime>,
    /// Notified after every successful reload: HTTP/2 connections send GOAWAY then, so that clients
    /// move to new connections with the new settings while open streams finish.
    pub reloaded: Notify,
    /// Listeners bound and not shutting down (for `/readyz`).
    pub ready: AtomicBool,
    /// Cancelled when a part the gateway cannot run without has died (a listener's accept loop): the
    /// process must end rather than stay up half-working. See `Gateway::failed`.
    pub fatal: CancellationToken,
    /// The config generation: 1 at start, one more at every successful reload.
    pub generation: AtomicU64,
    pub last_reload: Mutex<ReloadRecord>,
    /// Reloads asked for through the admin API, carried out by the gateway (which owns the listeners).
    pub reload_requests: mpsc::Sender<ReloadRequest>,
}

impl Shared {
    /// `workers`: the worker runtimes client connections are served on (0: the caller's runtime alone),
    /// each of which gets a backend connection pool of its own.
    pub fn new(
        config: Config,
        loaded: Loaded,
        metrics: Metrics,
        reload_requests: mpsc::Sender<ReloadRequest>,
        workers: usize,
    ) -> Shared {
        let tasks = TaskTracker::new();
        let scopes = Scopes::default();
        let shutdown = Shutdown::default();
        let state = State::new(config, None, loaded, (&scopes, shutdown.token()));
        Shared {
            state: ArcSwap::from_pointee(state),
            scopes,
            metrics,
            buffers: BufferPool::default(),
            upstream: Arc::new(Upstream::new(tasks.clone(), workers)),
            shutdown,
            tasks,
            loaded_at: Mutex::new(SystemTime::now()),
            reloaded: Notify::new(),
            ready: AtomicBool::new(false),
            fatal: CancellationToken::new(),
            generation: AtomicU64::new(1),
            last_reload: Mutex::new(ReloadRecord::now("start", Ok(()))),
            reload_requests,
        }
    }

    /// Closes the idle pooled HTTP connections to `backend`, which drains: those in use close when
    /// their response is done (`upstream::Reuse`).
    pub fn close_idle_to(&self, backend: &Backend) {
        let tls = backend.tls.as_ref().map(|t| t.id());
        self.upstream
            .retain(|addr, client| !(addr == backend.addr && client == tls));
    }

    /// The Prometheus text exposition, with the per-backend and admission gauges brought up to date
    /// first.
    pub fn render_metrics(&self) -> String {
        let state = self.state.load();
        self.admission_gauges(&state.config);
        let metrics = &self.metrics;
        metrics
            .config_generation
            .set(self.generation.load(Ordering::Relaxed) as i64);
        // Set afresh at every render, so backends that left (a reload, DNS) leave the metrics too.
        metrics.backend_up.reset();
        metrics.backend_connections_active.reset();
        metrics.backend_draining.reset();
        let mut current = HashSet::new();
        for pool in state.pools.iter() {
            for backend in pool.backends().iter() {
                let labels = [pool.name.as_str(), backend.addr.as_str()];
                metrics
                    .backend_up
                    .with_label_values(&labels)
                    .set(i64::from(backend.is_available()));
                metrics
                    .backend_connections_active
                    .with_label_values(&labels)
                    .set(backend.active() as i64);
                metrics
                    .backend_draining
                    .with_label_values(&labels)
                    .set(i64::from(backend.is_draining()));
                current.insert(backend.addr.clone());
            }
        }
        self.prune_tunnel_series(&current);
        self.metrics.render()
    }

    /// Drops the live-tunnel series of backends that are in no pool any more and hold no tunnel:
    /// discovered backends come and go with their addresses, and their series must not pile up. A
    /// series dropped here comes back if a tunnel still starts to such a backend (its upgrade began
    /// before the backend left).
    fn prune_tunnel_series(&self, current: &HashSet<String>) {
        let gauge = &self.metrics.ws_tunnels_active;
        let mut stale = Vec::new();
        for family in gauge.collect() {
            for metric in family.get_metric() {
                let labels: Vec<(String, String)> = metric
                    .get_label()
                    .iter()
                    .map(|l| (l.name().to_string(), l.value().to_string()))
                    .collect();
                let gone = labels
                    .iter()
                    .any(|(name, value)| name == "backend" && !current.contains(value));
                if gone && metric.get_gauge().get_value() == 0.0 {
                    stale.push(labels);
                }
            }
        }
        for labels in &stale {
            let labels: std::collections::HashMap<&str, &str> = labels
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            let _ = gauge.remove(&labels);
        }
    }

    /// The limits in force (reset first, so a limit a reload removed disappears), the clients tracked
    /// per scope and the handshakes queued per listener.
    fn admission_gauges(&self, config: &Config) {
        let metrics = &self.metrics;
        metrics.admission_limit.reset();
        let limit = |scope: &str, name: &str, limit: &str, value: f64| {
            metrics
                .admission_limit
                .with_label_values(&[scope, name, limit])
                .set(value);
        };
        for listener in &config.listeners {
            let (name, admission) = (listener.name.as_str(), &listener.admission);
            if let Some(max) = admission.max_connections_per_ip {
                limit("listener", name, "max_connections_per_ip", f64::from(max));
            }
            if let Some(gate) = &admission.handshake_rate {
                limit("listener", name, "handshake_rate", gate.rate.per_second);
                limit(
                    "listener",
                    name,
                    "handshake_burst",
                    f64::from(gate.rate.burst),
                );
                let max_wait = gate.max_wait.as_secs_f64();
                limit("listener", name, "handshake_max_wait_seconds", max_wait);
            }
        }
        for route in &config.routes {
            let (name, admission) = (route.name.as_str(), &route.admission);
            if let Some(max) = admission.max_tunnels_per_ip {
                limit("route", name, "max_tunnels_per_ip", f64::from(max));
            }
            if let Some(rate) = &admission.handshake_rate_per_ip {
                limit("route", name, "handshake_rate_per_ip", rate.per_second);
                limit(
                    "route",
                    name,
                    "handshake_burst_per_ip",
                    f64::from(rate.burst),
                );
            }
        }
        metrics.admission_tracked_clients.reset();
        metrics.admission_queued.reset();
        for (kind, name, scope) in self.scopes.all() {
            let kind = match kind {
                ScopeKind::Listener => "listener",
                ScopeKind::Route => "route",
            };
            let tracked = scope.clients.tracked() as i64;
            metrics
                .admission_tracked_clients
                .with_label_values(&[kind, &name])
                .set(tracked);
            if kind == "listener" {
                let queued = scope.gate.queued() as i64;
                metrics
                    .admission_queued
                    .with_label_values(&[&name])
                    .set(queued);
            }
        }
    }
}
