//! Every metric wsgate exports, defined in one place (names and labels are part of the interface:
//! docs/ARCHITECTURE.md, "Metrics"). Label values come only from the config (route, pool, backend, listener names) or from
//! fixed sets (status class, result, reason, direction, the client's protocol), never from client input.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub connections_accepted: IntCounterVec,
    pub worker_connections_accepted: IntCounterVec,
    pub connections_active: IntGaugeVec,
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    pub ws_upgrades: IntCounterVec,
    pub ws_handshake_duration: HistogramVec,
    pub ws_tunnels_active: IntGaugeVec,
    pub ws_tunnels_parked: IntGauge,
    pub ws_tunnel_duration: HistogramVec,
    pub ws_closes: IntCounterVec,
    pub ws_bytes: IntCounterVec,
    pub ws_frames: IntCounterVec,
    pub ws_ping_rtt: HistogramVec,
    pub backend_up: IntGaugeVec,
    pub backend_connections_active: IntGaugeVec,
    pub config_reloads: IntCounterVec,
    pub config_last_reload_success: Gauge,
    pub admission_rejections: IntCounterVec,
    pub admission_tracked_clients: IntGaugeVec,
    pub admission_queued: IntGaugeVec,
    pub admission_limit: GaugeVec,
    pub backend_draining: IntGaugeVec,
    pub discovery_resolutions: IntCounterVec,
    pub discovery_backends: IntGaugeVec,
    pub config_generation: IntGauge,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const LIFETIME_BUCKETS: &[f64] = &[
    1.0,
    10.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4.0 * 3600.0,
    12.0 * 3600.0,
    86400.0,
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("static metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g =
                IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition");
            registry
                .register(Box::new(g.clone()))
                .expect("metric registered once");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .expect("static metric definition");
            registry
                .register(Box::new(h.clone()))
                .expect("metric registered once");
            h
        };
        let float_gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(Opts::new(name, help), labels).expect("static metric definition");
            registry
                .register(Box::new(g.clone()))
                .expect("metric registered once");
            g
        };
        let last_reload = Gauge::new(
            "wsgate_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load",
        )
        .expect("static metric definition");
        registry
            .register(Box::new(last_reload.clone()))
            .expect("metric registered once");
        let parked = IntGauge::new(
            "wsgate_ws_tunnels_parked",
            "Live WebSocket tunnels parked: quiet, waiting without a task of their own (counted in wsgate_ws_tunnels_active too)",
        )
        .expect("static metric definition");
        registry
            .register(Box::new(parked.clone()))
            .expect("metric registered once");
        let generation = IntGauge::new(
            "wsgate_config_generation",
            "The config generation: 1 at start, one more at every successful reload",
        )
        .expect("static metric definition");
        registry
            .register(Box::new(generation.clone()))
            .expect("metric registered once");
        #[cfg(target_os = "linux")]
        {
            // Process metrics (CPU, memory, fds) are best effort: a failure here must not stop the gateway.
            let _ = registry.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }
        Metrics {
            connections_accepted: counter(
                "wsgate_connections_accepted_total",
                "Client connections accepted",
                &["listener"],
            ),
            worker_connections_accepted: counter(
                "wsgate_worker_connections_accepted_total",
                "Client connections accepted by each worker runtime's socket of a listener (per-worker runtimes only)",
                &["listener", "worker"],
            ),
            connections_active: gauge(
                "wsgate_connections_active",
                "Client connections open, upgraded ones included",
                &["listener"],
            ),
            http_requests: counter(
                "wsgate_http_requests_total",
                "HTTP requests answered (upgrades excluded)",
                &["route", "status_class", "protocol"],
            ),
            http_request_duration: histogram(
                "wsgate_http_request_duration_seconds",
                "Time to the response head of proxied HTTP requests",
                &["route"],
                LATENCY_BUCKETS,
            ),
            ws_upgrades: counter(
                "wsgate_ws_upgrades_total",
                "WebSocket upgrade attempts by result",
                &["route", "result", "protocol"],
            ),
            ws_handshake_duration: histogram(
                "wsgate_ws_handshake_duration_seconds",
                "From the client's upgrade request routed to the backend's checked 101",
                &["route"],
                LATENCY_BUCKETS,
            ),
            ws_tunnels_active: gauge(
                "wsgate_ws_tunnels_active",
                "Live WebSocket tunnels",
                &["route", "backend", "protocol"],
            ),
            ws_tunnels_parked: parked,
            ws_tunnel_duration: histogram(
                "wsgate_ws_tunnel_duration_seconds",
                "Lifetime of ended tunnels",
                &["route"],
                LIFETIME_BUCKETS,
            ),
            ws_closes: counter(
                "wsgate_ws_closes_total",
                "Ended tunnels by reason",
                &["route", "reason", "protocol"],
            ),
            ws_bytes: counter(
                "wsgate_ws_bytes_total",
                "Bytes relayed by tunnels",
                &["route", "direction"],
            ),
            ws_frames: counter(
                "wsgate_ws_frames_total",
                "Frames relayed by tunnels",
                &["route", "direction"],
            ),
            ws_ping_rtt: histogram(
                "wsgate_ws_ping_rtt_seconds",
                "Round trip of wsgate's own pings",
                &["route"],
                LATENCY_BUCKETS,
            ),
            backend_up: gauge(
                "wsgate_backend_up",
                "1 when the backend takes new connections",
                &["pool", "backend"],
            ),
            backend_connections_active: gauge(
                "wsgate_backend_connections_active",
                "Live connections to the backend",
                &["pool", "backend"],
            ),
            config_reloads: counter(
                "wsgate_config_reloads_total",
                "Config reloads by result",
                &["result"],
            ),
            config_last_reload_success: last_reload,
            admission_rejections: counter(
                "wsgate_admission_rejections_total",
                "Connections and upgrades refused by admission control, by reason (route empty for connections)",
                &["listener", "route", "reason"],
            ),
            admission_tracked_clients: gauge(
                "wsgate_admission_tracked_clients",
                "Clients with per-client state (counts, rate buckets) in a listener's or route's table",
                &["scope", "name"],
            ),
            admission_queued: gauge(
                "wsgate_admission_handshakes_queued",
                "WebSocket handshakes waiting their turn at a listener's handshake gate",
                &["listener"],
            ),
            admission_limit: float_gauge(
                "wsgate_admission_limit",
                "Admission limits in force, by listener or route and limit",
                &["scope", "name", "limit"],
            ),
            backend_draining: gauge(
                "wsgate_backend_draining",
                "1 while the backend drains (config, admin API, gone from DNS, removed by a reload)",
                &["pool", "backend"],
            ),
            discovery_resolutions: counter(
                "wsgate_discovery_resolutions_total",
                "DNS resolutions of discovered backends, by pool, name and result (ok, empty, failed)",
                &["pool", "dns", "result"],
            ),
            discovery_backends: gauge(
                "wsgate_discovery_backends",
                "Backends a pool's DNS entry has found (draining ones included)",
                &["pool", "dns"],
            ),
            config_generation: generation,
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One route's series of the HTTP request metrics, looked up the first time each is needed and kept
/// with the route: `with_label_values` hashes the labels and takes the vector's lock, which every worker
/// shares, and a proxied request would otherwise do that twice.
#[derive(Default)]
pub struct RouteHttpMetrics {
    /// By protocol (h1, h2), then status class (1xx to 5xx).
    requests: [[OnceLock<IntCounter>; 5]; 2],
    duration: OnceLock<Histogram>,
}

impl RouteHttpMetrics {
    /// Counts a request of `route` answered with `status` after `elapsed` (to its response head).
    pub fn record(
        &self,
        metrics: &Metrics,
        route: &str,
        status: u16,
        protocol: &'static str,
        elapsed: Duration,
    ) {
        let class = status_class(status);
        let row = protocol_row(protocol).and_then(|i| self.requests.get(i));
        let by_class = match class {
            "1xx" => 0,
            "2xx" => 1,
            "3xx" => 2,
            "4xx" => 3,
            _ => 4,
        };
        let counter = row.and_then(|row| row.get(by_class));
        inc_cached(counter, || {
            metrics
                .http_requests
                .with_label_values(&[route, class, protocol])
        });
        self.duration
            .get_or_init(|| metrics.http_request_duration.with_label_values(&[route]))
            .observe(elapsed.as_secs_f64());
    }
}

impl std::fmt::Debug for RouteHttpMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteHttpMetrics").finish_non_exhaustive()
    }
}

/// The row of a route's cached series for `protocol`. A protocol without a row of its own is looked up
/// each time, never cached under another's.
fn protocol_row(protocol: &str) -> Option<usize> {
    match protocol {
        "h1" => Some(0),
        "h2" => Some(1),
        _ => None,
    }
}

/// Counts one on the counter `cell` holds, looked up the first time; looked up every time where there is
/// no cell. (Not a handle handed out: cloning one would add a shared reference count to every count.)
fn inc_cached(cell: Option<&OnceLock<IntCounter>>, lookup: impl FnOnce() -> IntCounter) {
    match cell {
        Some(cell) => cell.get_or_init(lookup).inc(),
        None => lookup().inc(),
    }
}

/// One route's series of the WebSocket metrics a handshake and a tunnel update, where the route (with a
/// direction, or a protocol for successful upgrades) is the only label: looked up the first time each is
/// needed and kept with the route, as `RouteHttpMetrics` (a handshake would otherwise look up seven).
#[derive(Default)]
pub struct RouteWsMetrics {
    /// Successful upgrades by protocol (h1, h2).
    upgrades_ok: [OnceLock<IntCounter>; 2],
    handshake_duration: OnceLock<Histogram>,
    tunnel_duration: OnceLock<Histogram>,
    /// Client to backend, backend to client.
    bytes: [OnceLock<IntCounter>; 2],
    frames: [OnceLock<IntCounter>; 2],
}

/// The `direction` label of `ws_bytes` and `ws_frames`, in `RouteWsMetrics`' order.
const DIRECTIONS: [&str; 2] = ["client_to_backend", "backend_to_client"];

impl RouteWsMetrics {
    /// Counts an upgrade of `route` with `result` over `protocol`.
    pub fn upgrade(&self, metrics: &Metrics, route: &str, result: &str, protocol: &'static str) {
        let cell = protocol_row(protocol)
            .filter(|_| result == "ok")
            .and_then(|i| self.upgrades_ok.get(i));
        inc_cached(cell, || {
            metrics
                .ws_upgrades
                .with_label_values(&[route, result, protocol])
        });
    }

    pub fn handshake_duration(&self, metrics: &Metrics, route: &str) -> &Histogram {
        self.handshake_duration
            .get_or_init(|| metrics.ws_handshake_duration.with_label_values(&[route]))
    }

    pub fn tunnel_duration(&self, metrics: &Metrics, route: &str) -> &Histogram {
        self.tunnel_duration
            .get_or_init(|| metrics.ws_tunnel_duration.with_label_values(&[route]))
    }

    /// Adds a tunnel's traffic since its last report: client to backend, backend to client.
    pub fn traffic(&self, metrics: &Metrics, route: &str, traffic: [(u64, u64); 2]) {
        for (((bytes, frames), direction), (b, f)) in self
            .bytes
            .iter()
            .zip(&self.frames)
            .zip(DIRECTIONS)
            .zip(traffic)
        {
            bytes
                .get_or_init(|| metrics.ws_bytes.with_label_values(&[route, direction]))
                .inc_by(b);
            frames
                .get_or_init(|| metrics.ws_frames.with_label_values(&[route, direction]))
                .inc_by(f);
        }
    }
}

impl std::fmt::Debug for RouteWsMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteWsMetrics").finish_non_exhaustive()
    }
}

/// "2xx", "4xx", ...: the status label.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_routes_series_are_those_the_labels_name() {
        let metrics = Metrics::new();
        let route = RouteHttpMetrics::default();
        let ms = Duration::from_millis(1);
        route.record(&metrics, "r", 200, "h1", ms);
        route.record(&metrics, "r", 204, "h1", ms);
        route.record(&metrics, "r", 503, "h2", ms);
        route.record(&metrics, "r", 404, "h3", ms);
        let count = |class: &str, protocol: &str| {
            metrics
                .http_requests
                .with_label_values(&["r", class, protocol])
                .get()
        };
        assert_eq!(count("2xx", "h1"), 2);
        assert_eq!(count("5xx", "h2"), 1);
        assert_eq!(count("4xx", "h3"), 1);
        assert_eq!(count("2xx", "h2"), 0);
        assert_eq!(count("4xx", "h1"), 0);
        let observed = metrics
            .http_request_duration
            .with_label_values(&["r"])
            .get_sample_count();
        assert_eq!(observed, 4);
    }

    #[test]
    fn a_routes_websocket_series_are_those_the_labels_name() {
        let metrics = Metrics::new();
        let route = RouteWsMetrics::default();
        route.upgrade(&metrics, "r", "ok", "h1");
        route.upgrade(&metrics, "r", "ok", "h1");
        route.upgrade(&metrics, "r", "ok", "h2");
        route.upgrade(&metrics, "r", "rejected", "h1");
        route.upgrade(&metrics, "r", "ok", "h3");
        let upgrades = |result: &str, protocol: &str| {
            metrics
                .ws_upgrades
                .with_label_values(&["r", result, protocol])
                .get()
        };
        assert_eq!(upgrades("ok", "h1"), 2);
        assert_eq!(upgrades("ok", "h2"), 1);
        assert_eq!(upgrades("rejected", "h1"), 1);
        assert_eq!(upgrades("ok", "h3"), 1);
        route.traffic(&metrics, "r", [(10, 1), (200, 3)]);
        route.traffic(&metrics, "r", [(5, 1), (0, 0)]);
        let traffic = |direction: &str| {
            (
                metrics.ws_bytes.with_label_values(&["r", direction]).get(),
                metrics.ws_frames.with_label_values(&["r", direction]).get(),
            )
        };
        assert_eq!(traffic("client_to_backend"), (15, 2));
        assert_eq!(traffic("backend_to_client"), (200, 3));
        route.handshake_duration(&metrics, "r").observe(0.5);
        route.tunnel_duration(&metrics, "r").observe(2.0);
        let observed = |vec: &HistogramVec| vec.with_label_values(&["r"]).get_sample_count();
        assert_eq!(observed(&metrics.ws_handshake_duration), 1);
        assert_eq!(observed(&metrics.ws_tunnel_duration), 1);
    }
}
