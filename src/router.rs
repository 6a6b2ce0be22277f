//! Picks the route of a request: routes naming the request's host first, then host-less routes; within
//! each group the longest matching path prefix wins. A prefix matches on whole path segments
//! (`/ws` matches `/ws` and `/ws/room`, not `/wsx`), unless it ends with `/`.

use std::sync::Arc;

use crate::admission::{Scope, ScopeKind, Scopes};
use crate::balancer::{Pool, Pools};
use crate::config::{Config, RouteConfig};
use crate::metrics::{RouteHttpMetrics, RouteWsMetrics};

#[derive(Debug)]
pub struct Route {
    pub config: RouteConfig,
    pub pool: Arc<Pool>,
    /// The route's per-client tunnel counts and handshake buckets, kept across reloads by name.
    pub scope: Arc<Scope>,
    /// The route's HTTP request series.
    pub http_metrics: RouteHttpMetrics,
    /// The route's WebSocket series.
    pub ws_metrics: RouteWsMetrics,
}

#[derive(Debug, Default)]
pub struct Router {
    /// Sorted: host routes before host-less ones, longer prefixes first, so the first match is the best.
    routes: Vec<Arc<Route>>,
}

impl Router {
    pub fn build(config: &Config, pools: &Pools, scopes: &Scopes) -> Router {
        let mut routes: Vec<Arc<Route>> = config
            .routes
            .iter()
            .filter_map(|r| {
                let pool = pools.get(&r.pool)?;
                let max_tracked = config.limits.max_tracked_clients;
                Some(Arc::new(Route {
                    config: r.clone(),
                    pool: Arc::clone(pool),
                    scope: scopes.get(ScopeKind::Route, &r.name, max_tracked),
                    http_metrics: RouteHttpMetrics::default(),
                    ws_metrics: RouteWsMetrics::default(),
                }))
            })
            .collect();
        routes.sort_by_key(|r| {
            (
                r.config.host.is_none(),
                std::cmp::Reverse(r.config.path_prefix.len()),
            )
        });
        Router { routes }
    }

    /// `host` is the request's Host (or authority), with or without port, any case.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        let host = host.map(strip_port);
        self.routes.iter().find(|r| {
            let host_ok = match (&r.config.host, host) {
                (None, _) => true,
                (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                (Some(_), None) => false,
            };
            host_ok && prefix_matches(&r.config.path_prefix, path)
        })
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(text: &str) -> Router {
        let config = Config::from_toml(text, "test.toml").expect("valid config");
        Router::build(
            &config,
            &Pools::build(
                &config,
                None,
                &crate::upstream::TlsClients::default(),
                &tokio_util::sync::CancellationToken::new(),
            ),
            &Scopes::default(),
        )
    }

    const CONFIG: &str = r#"
        [[listener]]
        name = "l"
        listen = "127.0.0.1:0"
        [[route]]
        name = "root"
        pool = "p"
        [[route]]
        name = "ws"
        path_prefix = "/ws"
        pool = "p"
        [[route]]
        name = "ws-room"
        path_prefix = "/ws/room"
        pool = "p"
        [[route]]
        name = "chat-host"
        host = "Chat.Example.com"
        path_prefix = "/ws"
        pool = "p"
        [pool.p]
        backends = [ { addr = "127.0.0.1:1" } ]
    "#;

    fn name<'a>(r: &'a Router, host: Option<&str>, path: &str) -> Option<&'a str> {
        r.route(host, path).map(|r| r.config.name.as_str())
    }

    #[test]
    fn longest_prefix_wins_on_segment_boundaries() {
        let r = router(CONFIG);
        assert_eq!(name(&r, None, "/ws"), Some("ws"));
        assert_eq!(name(&r, None, "/ws/x"), Some("ws"));
        assert_eq!(name(&r, None, "/ws/room/7"), Some("ws-room"));
        assert_eq!(name(&r, None, "/wsx"), Some("root"));
        assert_eq!(name(&r, None, "/"), Some("root"));
    }

    #[test]
    fn host_routes_come_first_and_ignore_case_and_port() {
        let r = router(CONFIG);
        assert_eq!(
            name(&r, Some("chat.example.com:8080"), "/ws/room"),
            Some("chat-host")
        );
        assert_eq!(name(&r, Some("CHAT.EXAMPLE.COM"), "/other"), Some("root"));
        assert_eq!(name(&r, Some("other.example.com"), "/ws"), Some("ws"));
    }

    #[test]
    fn no_route_matches() {
        let r = router(&CONFIG.replace(
            "name = \"root\"\n        pool = \"p\"",
            "name = \"root\"\n        path_prefix = \"/api\"\n        pool = \"p\"",
        ));
        assert_eq!(name(&r, None, "/nothing"), None);
    }
}
