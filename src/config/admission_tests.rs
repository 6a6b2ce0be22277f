//! The admission-control part of the config: a listener's PROXY protocol, trusted proxies, per-client
//! connection limit and handshake gate; a route's origins, tunnel limit and handshake rate; a pool's PROXY
//! protocol; the tracking limits. Every mistake is reported with its line and key.

use super::*;
use crate::proxy_protocol::{Version, Versions};
use std::time::Duration;

/// A file with `listener`, `route` and `pool` lines added to its three sections.
fn file(listener: &str, route: &str, pool: &str) -> String {
    format!(
        "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n{listener}\n\
         [[route]]\nname = \"r\"\npool = \"p\"\n{route}\n\
         [pool.p]\nbackends = [ {{ addr = \"10.0.0.1:80\" }} ]\n{pool}\n"
    )
}

fn parse(listener: &str, route: &str, pool: &str) -> Config {
    Config::from_toml(&file(listener, route, pool), "t.toml").unwrap_or_else(|e| panic!("{e}"))
}

/// Every error of a bad file, as `line: key: message`.
fn errors(listener: &str, route: &str, pool: &str) -> Vec<String> {
    let errors = Config::from_toml(&file(listener, route, pool), "t.toml")
        .expect_err("should be refused")
        .0;
    errors
        .iter()
        .map(|e| format!("{}: {}: {}", e.line, e.key, e.message))
        .collect()
}

#[test]
fn everything_is_off_by_default() {
    let c = parse("", "", "");
    assert_eq!(c.listeners[0].admission, ListenerAdmission::default());
    assert_eq!(c.routes[0].admission, RouteAdmission::default());
    assert_eq!(c.pools["p"].proxy_protocol, None);
    assert_eq!(c.limits.max_tracked_clients, 100_000);
    assert_eq!(c.limits.ipv6_prefix, 64);
}

#[test]
fn every_listener_key() {
    let c = parse(
        "proxy_protocol = \"any\"\nproxy_protocol_from = [\"10.0.0.0/8\", \"fd00::/8\"]\n\
         trusted_proxies = [\"192.168.0.0/16\"]\nmax_connections_per_ip = 50\n\
         handshake_rate = { rate = 200, burst = 400, max_wait = \"2s\" }",
        "",
        "",
    );
    let a = &c.listeners[0].admission;
    let proxy = a.proxy_protocol.as_ref().expect("proxy protocol on");
    assert_eq!(proxy.versions, Versions::Any);
    assert!(proxy.from[1].contains("fd00::1".parse().unwrap()));
    assert!(a.trusted_proxies[0].contains("192.168.3.4".parse().unwrap()));
    assert_eq!(a.max_connections_per_ip, Some(50));
    let gate = a.handshake_rate.expect("gate");
    assert_eq!(
        gate.rate,
        Rate {
            per_second: 200.0,
            burst: 400
        }
    );
    assert_eq!(gate.max_wait, Duration::from_secs(2));
}

#[test]
fn a_rate_alone_gets_a_second_of_burst_and_a_queue_of_five_seconds() {
    let c = parse("handshake_rate = { rate = 0.5 }", "", "");
    let gate = c.listeners[0].admission.handshake_rate.expect("gate");
    assert_eq!(gate.rate.burst, 1, "at least one");
    assert_eq!(gate.max_wait, Duration::from_secs(5));
    let c = parse("handshake_rate = { rate = 300, max_wait = \"0s\" }", "", "");
    let gate = c.listeners[0].admission.handshake_rate.expect("gate");
    assert_eq!(gate.rate.burst, 300);
    assert_eq!(gate.max_wait, Duration::ZERO, "no queue: refused at once");
}

#[test]
fn every_route_and_pool_key() {
    let c = parse(
        "",
        "allowed_origins = [\"https://app.example.com\", \"https://*.example.com\"]\n\
         allow_missing_origin = true\nmax_tunnels_per_ip = 20\n\
         handshake_rate_per_ip = { rate = 2, burst = 10 }",
        "proxy_protocol = \"v1\"\nproxy_protocol_health = false",
    );
    let a = &c.routes[0].admission;
    let origins = a.origins.as_ref().expect("origins");
    assert_eq!(origins.patterns().len(), 2);
    assert!(origins.allow_missing());
    assert_eq!(a.max_tunnels_per_ip, Some(20));
    assert_eq!(
        a.handshake_rate_per_ip,
        Some(Rate {
            per_second: 2.0,
            burst: 10
        })
    );
    assert_eq!(
        c.pools["p"].proxy_protocol,
        Some(ProxyProtocolOut {
            version: Version::V1,
            health: false
        })
    );
    let c = parse("", "", "proxy_protocol = \"v2\"");
    assert_eq!(
        c.pools["p"].proxy_protocol.map(|p| (p.version, p.health)),
        Some((Version::V2, true)),
        "health checks send a LOCAL header unless told not to"
    );
}

#[test]
fn tracking_limits() {
    let text = file("", "", "").replace(
        "[[listener]]",
        "[limits]\nmax_tracked_clients = 5000\nipv6_prefix = 56\n[[listener]]",
    );
    let c = Config::from_toml(&text, "t.toml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.limits.max_tracked_clients, 5000);
    assert_eq!(c.limits.ipv6_prefix, 56);
    let text = file("", "", "").replace(
        "[[listener]]",
        "[limits]\nmax_tracked_clients = 10\nipv6_prefix = 0\n[[listener]]",
    );
    let errors = Config::from_toml(&text, "t.toml").expect_err("refused").0;
    let keys: Vec<_> = errors.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(
        keys,
        [(2, "limits.max_tracked_clients"), (3, "limits.ipv6_prefix")]
    );
}

#[test]
fn listener_mistakes_are_reported_where_they_are() {
    assert_eq!(
        errors(
            "proxy_protocol = \"v3\"\nproxy_protocol_from = [\"10.0.0.0/8\"]",
            "",
            ""
        ),
        ["4: listener[0].proxy_protocol: `v3`: expected \"v1\", \"v2\" or \"any\""]
    );
    let missing = errors("proxy_protocol = \"v2\"", "", "");
    assert_eq!(missing.len(), 1);
    assert!(
        missing[0].starts_with("4: listener[0].proxy_protocol_from: name the load balancers"),
        "{missing:?}"
    );
    assert_eq!(
        errors("proxy_protocol_from = [\"10.0.0.0/8\"]", "", ""),
        [
            "4: listener[0].proxy_protocol_from: only used with proxy_protocol = \"v1\", \"v2\" or \"any\""
        ]
    );
    let bad_net = errors(
        "proxy_protocol = \"v1\"\nproxy_protocol_from = [\"10.0.0.0/8\", \"nope\"]",
        "",
        "",
    );
    assert!(
        bad_net[0].starts_with("5: listener[0].proxy_protocol_from[1]:"),
        "{bad_net:?}"
    );
    assert_eq!(
        errors("max_connections_per_ip = 0", "", ""),
        ["4: listener[0].max_connections_per_ip: must be between 1 and 16777216"]
    );
    assert_eq!(
        errors("handshake_rate = { rate = 0 }", "", ""),
        ["4: listener[0].handshake_rate.rate: handshakes per second: more than 0, at most 1000000"]
    );
    assert_eq!(
        errors("handshake_rate = { rate = 10, max_wait = \"2m\" }", "", ""),
        ["4: listener[0].handshake_rate.max_wait: at most 60s: clients give up long before"]
    );
    assert_eq!(
        errors("handshake_rate = { rate = 10, burst = -1 }", "", ""),
        ["4: listener[0].handshake_rate.burst: must be between 1 and 1000000"]
    );
}

#[test]
fn route_and_pool_mistakes_are_reported_where_they_are() {
    let origin = errors(
        "",
        "allowed_origins = [\"https://a.example\", \"https://a.example/\"]",
        "",
    );
    assert_eq!(origin.len(), 1, "{origin:?}");
    assert!(
        origin[0].starts_with("8: route[0].allowed_origins[1]:"),
        "{origin:?}"
    );
    assert_eq!(
        errors("", "allow_missing_origin = true", ""),
        ["8: route[0].allow_missing_origin: only used with allowed_origins"]
    );
    assert_eq!(
        errors("", "allowed_origins = []", ""),
        [
            "8: route[0].allowed_origins: an empty list refuses every upgrade: name the origins of your pages"
        ]
    );
    let wait = errors(
        "",
        "handshake_rate_per_ip = { rate = 1, max_wait = \"1s\" }",
        "",
    );
    assert_eq!(wait.len(), 1);
    assert!(
        wait[0]
            .starts_with("8: route[0].handshake_rate_per_ip.max_wait: a client over its own rate"),
        "{wait:?}"
    );
    assert_eq!(
        errors("", "max_tunnels_per_ip = -3", ""),
        ["8: route[0].max_tunnels_per_ip: must be between 1 and 16777216"]
    );
    assert_eq!(
        errors("", "", "proxy_protocol = \"any\""),
        ["11: pool.p.proxy_protocol: `any`: expected \"v1\" or \"v2\""]
    );
    assert_eq!(
        errors("", "", "proxy_protocol_health = true"),
        ["11: pool.p.proxy_protocol_health: only used with proxy_protocol = \"v1\" or \"v2\""]
    );
}
