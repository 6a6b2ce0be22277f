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
    pub fn new(config: Config, previous: Option<&State>, backend_tls: TlsClients) -> State {
        let pools = Pools::build(&config, previous.map(|p| &p.pools), &backend_tls);
        let router = Router::build(&config, &pools);
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
        Shared {
            state: ArcSwap::from_pointee(State::new(config, None, backend_tls)),
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

    /// The Prometheus text exposition, with the per-backend gauges brought up to date first.
    pub fn render_metrics(&self) -> String {
        let state = self.state.load();
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
}
