//! A live tunnel as the gateway sees it (`RouteTunnel`): the tunnel's context of route settings, shared
//! buffers and metrics, and the access event written when it ends.

use std::sync::Arc;
use std::time::Duration;

use crate::admission::Counted;
use crate::balancer::BackendGuard;
use crate::config::WebSocketSettings;
use crate::conn::ClientConn;
use crate::router::Route;
use crate::state::Shared;
use crate::websocket::tunnel::{StopSignal, Traffic, TunnelContext, TunnelOutcome};
use crate::websocket::{BufferPool, EndReason};
use tokio_util::task::task_tracker::TaskTrackerToken;

/// A live tunnel as the gateway sees it: its route (settings, metrics), the backend it holds, the client
/// connection it came on. Counted in `wsgate_ws_tunnels_active` from creation to drop.
///
/// Metric handles are looked up when used (at most once a second per busy tunnel, see `tunnel.rs`), not
/// held: every idle tunnel would carry them.
pub struct RouteTunnel {
    route: Arc<Route>,
    /// Also counts the tunnel in its backend's live tunnels, from `new` to `drop`.
    guard: BackendGuard,
    /// The client's place under the route's `max_tunnels_per_ip`, given back when the tunnel ends.
    _place: Option<Counted>,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
}

impl RouteTunnel {
    pub fn new(
        route: Arc<Route>,
        (guard, place): (BackendGuard, Option<Counted>),
        conn: Arc<ClientConn>,
        shared: Arc<Shared>,
    ) -> RouteTunnel {
        let tunnel = RouteTunnel {
            route,
            guard,
            _place: place,
            conn,
            shared,
        };
        tunnel.active().inc();
        tunnel.guard.backend().tunnel_started();
        tunnel
    }

    fn route_name(&self) -> &str {
        &self.route.config.name
    }

    fn active(&self) -> prometheus::IntGauge {
        self.shared.metrics.ws_tunnels_active.with_label_values(&[
            self.route_name(),
            &self.guard.backend().addr,
            self.conn.protocol(),
        ])
    }
}

impl Drop for RouteTunnel {
    fn drop(&mut self) {
        self.guard.backend().tunnel_ended();
        self.active().dec();
    }
}

/// A tunnel's stop epoch: its backend's drain epoch, and whether shutdown has begun (which cancels the
/// drain signals through their parent, without moving their epoch).
fn stop_epoch(drain: u64, shutdown: bool) -> u64 {
    drain << 1 | u64::from(shutdown)
}

impl TunnelContext for RouteTunnel {
    fn settings(&self) -> &WebSocketSettings {
        &self.route.config.websocket
    }

    fn buffers(&self) -> &BufferPool {
        &self.shared.buffers
    }

    fn traffic(&self, up: Traffic, down: Traffic) {
        self.route.ws_metrics.traffic(
            &self.shared.metrics,
            self.route_name(),
            [(up.bytes, up.frames), (down.bytes, down.frames)],
        );
    }

    /// The backend's drain signal: a child of the shutdown token, so it hears both. The shutdown flag
    /// is read first: a shutdown that comes after it moves `stop_epoch` on.
    fn stop_signal(&self) -> StopSignal {
        let shutdown = self.shared.shutdown.is_cancelled();
        let (token, drain) = self.guard.backend().drain_signal();
        StopSignal {
            token,
            epoch: stop_epoch(drain, shutdown),
            // The backend's drain state hands out the token: one per backend (and epoch).
            source: Arc::as_ptr(self.guard.backend()) as usize,
        }
    }

    fn stop_epoch(&self) -> u64 {
        let shutdown = self.shared.shutdown.is_cancelled();
        stop_epoch(self.guard.backend().drain_epoch(), shutdown)
    }

    /// Shutdown first: a uniformly random moment within the close spread in force (never past the
    /// drain deadline). Else the backend's drain, at its moment within the pool's drain spread.
    fn stop(&self) -> Option<(EndReason, Duration)> {
        if self.shared.shutdown.is_cancelled() {
            let timeouts = &self.shared.state.load().config.timeouts;
            let spread = timeouts.close_spread.min(timeouts.drain / 2);
            return Some((EndReason::Shutdown, spread.mul_f64(fastrand::f64())));
        }
        self.guard
            .backend()
            .drain_delay()
            .map(|delay| (EndReason::BackendDrain, delay))
    }

    fn tracked(&self) -> TaskTrackerToken {
        self.shared.tasks.token()
    }

    fn parked(&self, parked: bool) {
        if parked {
            self.shared.metrics.ws_tunnels_parked.inc();
        } else {
            self.shared.metrics.ws_tunnels_parked.dec();
        }
    }

    /// Counts the ending and writes the tunnel's access event.
    fn ended(self, outcome: &TunnelOutcome) {
        let route_name = self.route_name();
        let metrics = &self.shared.metrics;
        metrics
            .ws_closes
            .with_label_values(&[route_name, outcome.reason.label(), self.conn.protocol()])
            .inc();
        self.route
            .ws_metrics
            .tunnel_duration(metrics, route_name)
            .observe(outcome.duration.as_secs_f64());
        tracing::info!(
            target: "wsgate::access",
            client = %self.conn.peer,
            protocol = self.conn.protocol(),
            route = route_name,
            backend = self.guard.backend().addr.as_str(),
            duration_ms = outcome.duration.as_millis() as u64,
            bytes_client_to_backend = outcome.client_to_backend.bytes,
            bytes_backend_to_client = outcome.backend_to_client.bytes,
            close_code = outcome.close_code,
            reason = outcome.reason.label(),
            "tunnel ended"
        );
    }

    fn ping_rtt(&self, rtt: Duration) {
        self.shared
            .metrics
            .ws_ping_rtt
            .with_label_values(&[self.route_name()])
            .observe(rtt.as_secs_f64());
    }
}
