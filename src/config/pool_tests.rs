//! The pool part of the config: policies, sticky key sources, health checks, passive health, backend ids.

use super::*;
use std::time::Duration;

const HEAD: &str = r#"[[listener]]
name = "l"
listen = "127.0.0.1:0"
[[route]]
name = "r"
pool = "p"
[pool.p]
"#;

fn parse(pool: &str) -> Result<Config, ConfigErrors> {
    Config::from_toml(&format!("{HEAD}{pool}"), "t.toml")
}

fn pool(pool: &str) -> PoolConfig {
    let config = parse(pool).unwrap_or_else(|e| panic!("{e}"));
    config.pools["p"].clone()
}

/// The single error of a bad pool, as `line: key: message`.
fn error(pool: &str) -> String {
    let errors = parse(pool).expect_err("should be refused").0;
    assert_eq!(errors.len(), 1, "{errors:?}");
    let e = &errors[0];
    format!("{}: {}: {}", e.line, e.key, e.message)
}

/// Lines of the pool snippet start after HEAD's 7 lines.
const FIRST: usize = 8;

#[test]
fn defaults_least_conn_no_checks_and_passive_ejection() {
    let p = pool(r#"backends = [ { addr = "10.0.0.1:80" } ]"#);
    assert_eq!(p.policy, Policy::LeastConn);
    assert_eq!(p.health, None);
    assert_eq!(p.max_fails, 3);
    assert_eq!(p.fail_timeout, Duration::from_secs(10));
    assert_eq!(
        p.backends[0].id, "10.0.0.1:80",
        "the id defaults to the address"
    );
}

#[test]
fn every_pool_option() {
    let p = pool(
        r#"policy = "sticky"
sticky = { source_ip = true, trusted_proxies = ["10.0.0.0/8", "127.0.0.1"] }
health = { path = "/healthz", interval = "100ms", timeout = "50ms", rise = 1, fall = 4, websocket = true }
max_fails = 0
fail_timeout = "30s"
backends = [ { addr = "a.internal:9000", id = "a", weight = 3, drain = true } ]"#,
    );
    let StickyKey::SourceIp { trusted_proxies } = &p.policy_key() else {
        panic!("source_ip expected, got {:?}", p.policy);
    };
    assert_eq!(trusted_proxies.len(), 2);
    assert!(trusted_proxies[1].contains("127.0.0.1".parse().expect("ip")));
    assert_eq!(
        p.health,
        Some(HealthCheck {
            path: "/healthz".into(),
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(50),
            rise: 1,
            fall: 4,
            websocket: true,
        })
    );
    assert_eq!(p.max_fails, 0);
    assert_eq!(p.fail_timeout, Duration::from_secs(30));
    let b = &p.backends[0];
    assert_eq!((b.id.as_str(), b.weight, b.drain), ("a", 3, true));
}

#[test]
fn each_sticky_source() {
    let key = |table: &str| {
        pool(&format!(
            "policy = \"sticky\"\nsticky = {table}\nbackends = [ {{ addr = \"h:1\" }} ]"
        ))
        .policy_key()
    };
    assert_eq!(
        key(r#"{ cookie = "wsg" }"#),
        StickyKey::Cookie("wsg".into())
    );
    assert_eq!(
        key(r#"{ header = "X-User-Id" }"#),
        StickyKey::Header(http::HeaderName::from_static("x-user-id"))
    );
    assert_eq!(
        key(r#"{ query = "room" }"#),
        StickyKey::Query("room".into())
    );
    assert_eq!(
        key("{ source_ip = true }"),
        StickyKey::SourceIp {
            trusted_proxies: vec![]
        }
    );
}

#[test]
fn sticky_needs_exactly_one_source() {
    let e = error("policy = \"sticky\"\nbackends = [ { addr = \"h:1\" } ]");
    assert!(
        e.starts_with(&format!(
            "{FIRST}: pool.p.policy: policy \"sticky\" needs a `sticky` table"
        )),
        "{e}"
    );
    let e = error(
        "policy = \"sticky\"\nsticky = { cookie = \"a\", header = \"b\" }\nbackends = [ { addr = \"h:1\" } ]",
    );
    assert!(
        e.starts_with(&format!(
            "{}: pool.p.sticky: give exactly one key source",
            FIRST + 1
        )),
        "{e}"
    );
    let e = error(
        "policy = \"sticky\"\nsticky = { source_ip = false }\nbackends = [ { addr = \"h:1\" } ]",
    );
    assert!(e.contains("exactly one key source"), "{e}");
    let e = error("sticky = { cookie = \"a\" }\nbackends = [ { addr = \"h:1\" } ]");
    assert!(
        e.contains("pool.p.sticky: only used with policy = \"sticky\""),
        "{e}"
    );
    let e = error("policy = \"round_robin\"\nbackends = [ { addr = \"h:1\" } ]");
    assert!(e.contains("expected \"least_conn\" or \"sticky\""), "{e}");
}

#[test]
fn sticky_names_and_networks_are_checked() {
    let e = error(
        "policy = \"sticky\"\nsticky = { cookie = \"a b\" }\nbackends = [ { addr = \"h:1\" } ]",
    );
    assert!(
        e.contains("pool.p.sticky.cookie: `a b` is not a cookie name"),
        "{e}"
    );
    let e = error(
        "policy = \"sticky\"\nsticky = { header = \"x user\" }\nbackends = [ { addr = \"h:1\" } ]",
    );
    assert!(e.contains("pool.p.sticky.header"), "{e}");
    let e = error(
        "policy = \"sticky\"\nsticky = { query = \"a=b\" }\nbackends = [ { addr = \"h:1\" } ]",
    );
    assert!(e.contains("pool.p.sticky.query"), "{e}");
    let e = error(
        "policy = \"sticky\"\nsticky = { source_ip = true, trusted_proxies = [\"10.0.0.0/8\", \"10.0.0.0/40\"] }\n\
         backends = [ { addr = \"h:1\" } ]",
    );
    assert!(
        e.starts_with(&format!("{}: pool.p.sticky.trusted_proxies[1]:", FIRST + 1)),
        "{e}"
    );
    let e = error(
        "policy = \"sticky\"\nsticky = { header = \"x\", trusted_proxies = [\"10.0.0.0/8\"] }\n\
         backends = [ { addr = \"h:1\" } ]",
    );
    assert!(
        e.contains("trusted_proxies: only used with source_ip = true"),
        "{e}"
    );
}

#[test]
fn health_values_are_checked() {
    let bad = |health: &str| {
        error(&format!(
            "health = {health}\nbackends = [ {{ addr = \"h:1\" }} ]"
        ))
    };
    assert!(bad("{ rise = 0 }").contains("pool.p.health.rise: must be between 1 and 100"));
    assert!(bad("{ fall = 101 }").contains("pool.p.health.fall"));
    assert!(bad("{ interval = \"0s\" }").contains("pool.p.health.interval"));
    assert!(bad("{ timeout = \"1\" }").contains("pool.p.health.timeout"));
    assert!(bad("{ path = \"healthz\" }").contains("pool.p.health.path: must be a path"));
    assert!(bad("{ pth = \"/\" }").contains("unknown field `pth`"));
    assert_eq!(
        pool("health = {}\nbackends = [ { addr = \"h:1\" } ]").health,
        Some(HealthCheck::default())
    );
}

#[test]
fn passive_health_values_are_checked() {
    let e = error("max_fails = -1\nbackends = [ { addr = \"h:1\" } ]");
    assert_eq!(
        e,
        format!("{FIRST}: pool.p.max_fails: must be between 0 and 1000")
    );
    let e = error("fail_timeout = \"soon\"\nbackends = [ { addr = \"h:1\" } ]");
    assert!(
        e.starts_with(&format!("{FIRST}: pool.p.fail_timeout:")),
        "{e}"
    );
}

#[test]
fn backend_ids_are_unique_within_a_pool() {
    let e =
        error("backends = [ { addr = \"h:1\", id = \"x\" },\n  { addr = \"h:2\", id = \"x\" } ]");
    assert_eq!(
        e,
        format!(
            "{}: pool.p.backends[1].id: the id `x` is used by another backend of this pool",
            FIRST + 1
        )
    );
    // An id equal to another backend's address is a clash too (that backend's id defaults to it).
    let e = error("backends = [ { addr = \"h:1\" }, { addr = \"h:2\", id = \"h:1\" } ]");
    assert!(e.contains("pool.p.backends[1].id"), "{e}");
    let e = error("backends = [ { addr = \"h:1\", id = \"\" } ]");
    assert!(e.contains("pool.p.backends[0].id: must be 1 to 128"), "{e}");
}

impl PoolConfig {
    fn policy_key(&self) -> StickyKey {
        match &self.policy {
            Policy::Sticky(key) => key.clone(),
            Policy::LeastConn => panic!("not a sticky pool"),
        }
    }
}
