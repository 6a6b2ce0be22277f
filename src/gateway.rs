//! The running gateway: its listeners, its current config generation, and what outlives a reload
//! (metrics, backend connection pool, read buffers, the shutdown signal).
//!
//! `Gateway::start` binds everything and returns at once with a handle; tests bind port 0 and ask the
//! handle for the addresses. `shutdown` stops accepting, tells every tunnel to close, and waits.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balancer::Pools;
use crate::config::Config;
use crate::listener;
use crate::metrics::Metrics;
use crate::router::Router;
use crate::upstream::Upstream;
use crate::websocket::BufferPool;

/// One config generation: what new connections are routed by. Live tunnels keep the `Arc` of the route
/// they started with, so a reload never changes them.
pub struct State {
    pub config: Arc<Config>,
    pub router: Router,
    pub pools: Pools,
}

impl State {
    pub fn new(config: Config, previous: Option<&State>) -> State {
        let pools = Pools::build(&config, previous.map(|p| &p.pools));
        let router = Router::build(&config, &pools);
        State {
            config: Arc::new(config),
            router,
            pools,
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
    /// Every connection and tunnel task, so shutdown can wait for them.
    pub tasks: TaskTracker,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listener `{name}` cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    addrs: HashMap<String, SocketAddr>,
}

impl Gateway {
    /// Binds every listener of `config` and starts serving.
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        let mut bound = Vec::new();
        for l in &config.listeners {
            let listener =
                TcpListener::bind(l.listen)
                    .await
                    .map_err(|source| StartError::Bind {
                        name: l.name.clone(),
                        addr: l.listen,
                        source,
                    })?;
            let addr = listener.local_addr().map_err(|source| StartError::Bind {
                name: l.name.clone(),
                addr: l.listen,
                source,
            })?;
            bound.push((l.name.clone(), addr, listener));
        }
        let metrics = Metrics::new();
        metrics.config_reloads.with_label_values(&["ok"]).inc_by(0);
        metrics.config_last_reload_success.set(unix_now());
        let shared = Arc::new(Shared {
            state: ArcSwap::from_pointee(State::new(config, None)),
            metrics,
            buffers: BufferPool::default(),
            upstream: Arc::new(Upstream::default()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        let mut addrs = HashMap::new();
        for (name, addr, listener) in bound {
            tracing::info!(listener = %name, %addr, "listening");
            addrs.insert(name.clone(), addr);
            tokio::spawn(listener::accept_loop(listener, name, Arc::clone(&shared)));
        }
        Ok(Gateway { shared, addrs })
    }

    /// The bound address of a listener (the real port when the config said port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.addrs.get(name).copied()
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Read buffers currently lent to tunnels: zero when every tunnel is idle.
    pub fn buffers_in_use(&self) -> usize {
        self.shared.buffers.lent()
    }

    /// The Prometheus text exposition of the gateway's metrics.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render()
    }

    /// Stops accepting, closes every tunnel with 1001 "going away", lets in-flight requests finish, and
    /// waits for all of it, at most the config's drain timeout.
    pub async fn shutdown(self) {
        let drain = self.shared.state.load().config.timeouts.drain;
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        if tokio::time::timeout(drain, self.shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.shared.tasks.len(),
                "drain timeout reached with connections still open"
            );
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
