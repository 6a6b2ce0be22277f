//! The shared runtime state of a gateway: the config generation new connections follow (`State`) and
//! what every connection task needs and every reload keeps (`Shared`: metrics, the backend connection
//! pool, read buffers, the shutdown signal, the task tracker).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{ScopeKind, Scopes};
use crate::balancer::Pools;
use crate::config::Config;
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
}

impl State {
    /// `backend_tls`: loaded from `config` (`TlsClients::load`), before anything else changes, since
    /// loading its files may fail and building the state must not.
    pub fn new(
        config: Config,
        previous: Option<&State>,
        backend_tls: TlsClients,
        scopes: &Scopes,
    ) -> State {
        let pools = Pools::build(&config, previous.map(|p| &p.pools), &backend_tls);
        let router = Router::build(&config, &pools, scopes);
        State {
            config: Arc::new(config),
            router,
            pools,
            backend_tls,
        }
    }
}

/// Everything a connection task needs, shared by all of them.
pub struct Shared {
    pub state: ArcSwap<State>,
    /// Admission control's per-client state of every listener and route, kept across reloads.
    pub scopes: Scopes,
    pub metrics: Metrics,
    pub buffers: BufferPool,
    pub upstream: Arc<Upstream>,
    /// Cancelled when the gateway shuts down.
    pub shutdown: CancellationToken,
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
}

impl Shared {
    pub fn new(config: Config, backend_tls: TlsClients, metrics: Metrics) -> Shared {
        let tasks = TaskTracker::new();
        let scopes = Scopes::default();
        Shared {
            state: ArcSwap::from_pointee(State::new(config, None, backend_tls, &scopes)),
            scopes,
            metrics,
            buffers: BufferPool::default(),
            upstream: Arc::new(Upstream::new(tasks.clone())),
            shutdown: CancellationToken::new(),
            tasks,
            loaded_at: Mutex::new(SystemTime::now()),
            reloaded: Notify::new(),
            ready: AtomicBool::new(false),
            fatal: CancellationToken::new(),
        }
    }

    /// The Prometheus text exposition, with the per-backend and admission gauges brought up to date
    /// first.
    pub fn render_metrics(&self) -> String {
        let state = self.state.load();
        self.admission_gauges(&state.config);
        for pool in state.pools.iter() {
            for backend in &pool.backends {
                let labels = [pool.name.as_str(), backend.addr.as_str()];
                self.metrics
                    .backend_up
                    .with_label_values(&labels)
                    .set(i64::from(backend.is_available()));
                self.metrics
                    .backend_connections_active
                    .with_label_values(&labels)
                    .set(backend.active() as i64);
            }
        }
        self.metrics.render()
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
