//! The pool part of the config: policies, sticky key sources, health checks, passive health, backend ids,
//! TLS toward backends.

use super::*;
use std::path::Path;
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

#[test]
fn a_pool_tls_table_and_a_backend_of_its_own() {
    let p = pool(
        r#"tls = { server_name = "chat.internal", ca = "certs/ca.pem", client_cert = { cert = "me.pem", key = "me.key" } }
backends = [ { addr = "10.0.0.1:443" },
  { addr = "10.0.0.2:443", tls = { verify = false } } ]"#,
    );
    let tls = p.tls.as_ref().expect("the pool's table");
    assert_eq!(tls.server_name.as_deref(), Some("chat.internal"));
    assert_eq!(tls.ca, [Path::new(".").join("certs/ca.pem")]);
    assert!(tls.verify);
    let client = tls.client_cert.as_ref().expect("client_cert");
    assert_eq!(
        (client.cert.as_path(), client.key.as_path()),
        (Path::new("./me.pem"), Path::new("./me.key"))
    );
    assert_eq!(
        (tls.origin.key.as_str(), tls.origin.line),
        ("pool.p.tls", FIRST)
    );
    // The first backend uses the pool's table; the second its own, whole: nothing of the pool's is merged.
    assert_eq!(p.tls_of(&p.backends[0]), Some(tls));
    let own = p.tls_of(&p.backends[1]).expect("its own table");
    assert!(!own.verify && own.ca.is_empty() && own.client_cert.is_none());
    assert_eq!(own.server_name, None);
    assert_eq!(own.origin.key, "pool.p.backends[1].tls");
    assert_eq!(own.origin.line, FIRST + 2);
}

#[test]
fn without_a_tls_table_backends_are_plain() {
    let p = pool(r#"backends = [ { addr = "10.0.0.1:80" } ]"#);
    assert_eq!(p.tls, None);
    assert_eq!(p.tls_of(&p.backends[0]), None);
}

#[test]
fn an_empty_tls_table_trusts_the_default_roots_and_names_each_backend_by_its_host() {
    let p = pool(
        r#"tls = {}
backends = [ { addr = "10.0.0.1:443" }, { addr = "[::1]:8443" }, { addr = "api.internal:9443" } ]"#,
    );
    let tls = p.tls.as_ref().expect("tls");
    assert!(tls.verify && tls.ca.is_empty() && tls.client_cert.is_none());
    let names: Vec<&str> = p
        .backends
        .iter()
        .map(|b| tls.server_name(&b.addr))
        .collect();
    assert_eq!(names, ["10.0.0.1", "::1", "api.internal"]);
    let named = pool(
        r#"tls = { server_name = "svc.internal" }
backends = [ { addr = "10.0.0.1:443" } ]"#,
    );
    let tls = named.tls.as_ref().expect("tls");
    assert_eq!(tls.server_name("10.0.0.1:443"), "svc.internal");
}

#[test]
fn ca_takes_one_file_or_a_list() {
    let one = pool("tls = { ca = \"a.pem\" }\nbackends = [ { addr = \"h:1\" } ]");
    assert_eq!(one.tls.expect("tls").ca, [Path::new("./a.pem")]);
    let two = pool("tls = { ca = [\"a.pem\", \"b.pem\"] }\nbackends = [ { addr = \"h:1\" } ]");
    assert_eq!(
        two.tls.expect("tls").ca,
        [Path::new("./a.pem"), Path::new("./b.pem")]
    );
}

#[test]
fn tables_that_say_the_same_are_equal_wherever_they_are_written() {
    let p = pool(
        r#"tls = { ca = "ca.pem" }
backends = [ { addr = "h:1", tls = { ca = "ca.pem" } }, { addr = "h:2", tls = { ca = "other.pem" } } ]"#,
    );
    let pool_table = p.tls.as_ref().expect("tls");
    assert_eq!(p.tls_of(&p.backends[0]), Some(pool_table));
    assert_ne!(p.tls_of(&p.backends[1]), Some(pool_table));
}

#[test]
fn tls_values_are_checked() {
    let bad = |tls: &str| error(&format!("tls = {tls}\nbackends = [ {{ addr = \"h:1\" }} ]"));
    assert_eq!(
        bad("{ server_name = \" \" }"),
        format!(
            "{FIRST}: pool.p.tls.server_name: must not be empty (leave it out to use the host of each \
             backend's address)"
        )
    );
    assert!(
        bad("{ server_name = \"a b\" }")
            .contains("pool.p.tls.server_name: `a b` is neither a DNS name nor an IP address")
    );
    assert_eq!(
        bad("{ verify = false, ca = \"ca.pem\" }"),
        format!("{FIRST}: pool.p.tls.ca: only used with verify = true")
    );
    assert!(bad("{ ca = [] }").contains("pool.p.tls.ca: give at least one PEM file"));
    assert!(bad("{ ca = \"\" }").contains("pool.p.tls.ca: empty path"));
    assert!(
        bad("{ client_cert = { cert = \"c.pem\", key = \" \" } }")
            .contains("pool.p.tls.client_cert.key: empty path")
    );
    let e = bad("{ cafile = \"ca.pem\" }");
    assert!(
        e.starts_with(&format!("{FIRST}: pool.p.tls: unknown field `cafile`")),
        "{e}"
    );
    assert!(bad("{ ca = 1 }").contains("a path or a list of paths"));
    assert!(bad("{ client_cert = { cert = \"c.pem\" } }").contains("missing field `key`"));
    let e =
        error("backends = [ { addr = \"h:1\" },\n  { addr = \"h:2\", tls = { verfy = false } } ]");
    assert!(
        e.starts_with(&format!(
            "{}: pool.p.backends[1].tls: unknown field `verfy`",
            FIRST + 1
        )),
        "{e}"
    );
}

#[test]
fn a_tls_backend_needs_a_host_that_can_name_a_server() {
    // `a..b` is a host wsgate can connect to but no certificate can be checked against.
    let e = error("tls = {}\nbackends = [ { addr = \"a..b:443\" } ]");
    assert_eq!(
        e,
        format!(
            "{}: pool.p.backends[0].addr: `a..b` cannot name a TLS server: give tls.server_name",
            FIRST + 1
        )
    );
    let p = pool("tls = { server_name = \"b.internal\" }\nbackends = [ { addr = \"a..b:443\" } ]");
    assert_eq!(p.tls.expect("tls").server_name("a..b:443"), "b.internal");
    // A plain backend does not need one.
    pool("backends = [ { addr = \"a..b:80\" } ]");
}
