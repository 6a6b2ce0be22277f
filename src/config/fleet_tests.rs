//! The fleet-operations part of the config: the admin listener's `allow` and `token_file`, the `[dns]`
//! table, a pool's `drain_spread`, and backend entries that name a DNS name. Every mistake is reported
//! with its line and key.

use super::*;
use std::time::Duration;

/// A file whose admin table has `admin` lines, with `top` before the listener and `pool` lines and
/// `backends` in pool `p`.
fn file(admin: &str, top: &str, pool: &str, backends: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:9090\"\n{admin}\n{top}\n\
         [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n\
         [[route]]\nname = \"r\"\npool = \"p\"\n\
         [pool.p]\n{pool}\nbackends = [ {backends} ]\n"
    )
}

fn parse(admin: &str, top: &str, pool: &str, backends: &str) -> Config {
    Config::from_toml(&file(admin, top, pool, backends), "t.toml").unwrap_or_else(|e| panic!("{e}"))
}

/// Every error of a bad file, as `line: key: message`.
fn errors(admin: &str, top: &str, pool: &str, backends: &str) -> Vec<String> {
    Config::from_toml(&file(admin, top, pool, backends), "t.toml")
        .expect_err("should be refused")
        .0
        .iter()
        .map(|e| format!("{}: {}: {}", e.line, e.key, e.message))
        .collect()
}

const ONE: &str = "{ addr = \"10.0.0.1:80\" }";

#[test]
fn defaults() {
    let c = parse("", "", "", ONE);
    let admin = c.admin.expect("admin");
    assert!(admin.allow.is_empty() && admin.token_file.is_none());
    assert!(c.dns.servers.is_empty());
    let p = &c.pools["p"];
    assert_eq!(p.drain_spread, Some(Duration::from_secs(60)));
    assert!(p.discovery.is_empty());
}

#[test]
fn every_key() {
    let c = parse(
        "allow = [\"10.0.0.0/8\", \"127.0.0.1\"]\ntoken_file = \"tokens\"",
        "[dns]\nservers = [\"127.0.0.1:5353\"]",
        "drain_spread = \"none\"",
        "{ dns = \"chat.svc:9000\", resolve_every = \"5s\", resolve_min = \"200ms\", \
         remove_after = \"2m\", weight = 3, drain = true }, { addr = \"10.0.0.1:80\" }",
    );
    let admin = c.admin.expect("admin");
    assert!(admin.allow[1].contains("127.0.0.1".parse().unwrap()));
    let tokens = admin.token_file.expect("token file");
    assert!(tokens.path.ends_with("tokens"));
    assert_eq!((tokens.line, tokens.config_file.as_str()), (4, "t.toml"));
    assert_eq!(c.dns.servers, ["127.0.0.1:5353".parse().unwrap()]);
    let p = &c.pools["p"];
    assert_eq!(p.drain_spread, None);
    assert_eq!(p.backends.len(), 1);
    let d = &p.discovery[0];
    assert_eq!(
        (d.name.as_str(), d.host.as_str(), d.port),
        ("chat.svc:9000", "chat.svc", 9000)
    );
    assert_eq!(
        (d.resolve_every, d.resolve_min, d.remove_after),
        (
            Duration::from_secs(5),
            Duration::from_millis(200),
            Duration::from_secs(120)
        )
    );
    assert_eq!((d.weight, d.drain), (3, true));
    let c = parse(
        "",
        "",
        "drain_spread = \"0s\"",
        "{ dns = \"chat.svc:9000\" }",
    );
    let d = &c.pools["p"].discovery[0];
    assert_eq!(c.pools["p"].drain_spread, Some(Duration::ZERO));
    assert_eq!(
        (d.resolve_every, d.resolve_min, d.remove_after),
        (
            Duration::from_secs(10),
            Duration::from_secs(1),
            Duration::from_secs(30)
        )
    );
}

#[test]
fn mistakes_are_reported_at_their_line_and_key() {
    assert_eq!(
        errors("allow = []", "", "", ONE),
        [
            "3: admin.allow: an empty list would refuse everyone: leave `allow` out to let anyone \
          who can reach the address in"
        ]
    );
    assert_eq!(
        errors("allow = [\"10.0.0.0/33\"]", "", "", ONE),
        ["3: admin.allow[0]: `10.0.0.0/33`: the prefix length must be at most 32"]
    );
    assert_eq!(
        errors("token_file = \"\"", "", "", ONE),
        ["3: admin.token_file: empty path"]
    );
    assert_eq!(
        errors("", "[dns]\nservers = [\"resolver\"]", "", ONE),
        [
            "5: dns.servers[0]: `resolver` is not an address: expected ip:port, e.g. \"127.0.0.1:8080\""
        ]
    );
    assert_eq!(
        errors("", "", "drain_spread = \"soon\"", ONE),
        [
            "12: pool.p.drain_spread: `soon` is not a duration: expected a number and a unit, e.g. \
          \"30s\", or \"none\" to let tunnels finish on their own"
        ]
    );
    assert_eq!(
        errors("", "", "drain_spread = \"2d\"", ONE),
        ["12: pool.p.drain_spread: at most 24h"]
    );
    let both = errors("", "", "", "{ addr = \"10.0.0.1:80\", dns = \"a.svc:80\" }");
    assert!(
        both[0].starts_with("13: pool.p.backends[0]: give either `addr`"),
        "{both:?}"
    );
    let neither = errors("", "", "", "{ weight = 2 }");
    assert!(
        neither[0].starts_with("13: pool.p.backends[0]: each backend needs"),
        "{neither:?}"
    );
    assert_eq!(
        errors("", "", "", "{ dns = \"a.svc:80\", id = \"x\" }"),
        ["13: pool.p.backends[0].id: a discovered backend's id is its address: leave `id` out"]
    );
    assert!(
        errors("", "", "", "{ dns = \"a.svc\" }")[0]
            .starts_with("13: pool.p.backends[0].dns: `a.svc` is not a name to resolve")
    );
    assert_eq!(
        errors(
            "",
            "",
            "",
            "{ addr = \"10.0.0.1:80\", remove_after = \"1s\" }"
        ),
        [
            "13: pool.p.backends[0]: resolve_every, resolve_min and remove_after are for `dns` entries"
        ]
    );
    assert_eq!(
        errors("", "", "", "{ dns = \"a.svc:80\", resolve_min = \"0ms\" }"),
        [
            "13: pool.p.backends[0].resolve_min: at least 100ms: a record with a TTL of 0 would \
          otherwise make wsgate ask without pause"
        ]
    );
    let slow = errors(
        "",
        "",
        "",
        "{ dns = \"a.svc:80\", resolve_every = \"1s\", resolve_min = \"2s\" }",
    );
    assert!(
        slow[0].starts_with("13: pool.p.backends[0].resolve_min: larger than resolve_every"),
        "{slow:?}"
    );
    assert_eq!(
        errors(
            "",
            "",
            "",
            "{ dns = \"a.svc:80\", resolve_every = \"50ms\", resolve_min = \"100ms\" }"
        )[0],
        "13: pool.p.backends[0].resolve_every: at least 100ms: every resolution is a query to the nameservers"
    );
    assert_eq!(
        errors(
            "",
            "",
            "",
            "{ dns = \"a.svc:80\" }, { dns = \" a.svc:80\" }"
        ),
        ["13: pool.p.backends[1].dns: the same backend is listed twice"]
    );
}
