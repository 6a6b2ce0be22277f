//! The checker's defaults: a minimal file gets every value documented in `config/mod.rs`, and the
//! "zero means off" settings read as documented.

use super::*;
use std::time::Duration;

/// The smallest valid file: one listener, one route, one pool of one backend.
const MINIMAL: &str = r#"
[[listener]]
name = "main"
listen = "127.0.0.1:8080"

[[route]]
name = "r"
pool = "p"

[pool.p]
backends = [ { addr = "10.0.0.1:9000" } ]
"#;

fn parse(text: &str) -> Config {
    Config::from_toml(text, "t.toml").unwrap_or_else(|e| panic!("{e}"))
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn top_level_defaults() {
    let c = parse(MINIMAL);
    assert_eq!(c.source, None);
    assert_eq!(c.workers, None, "one worker per core");
    assert_eq!(c.runtime, RuntimeModel::Shared, "one shared runtime");
    assert_eq!(c.event_interval, 61, "tokio's own");
    assert_eq!(c.admin, None, "no admin listener unless asked");
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.listeners[0].name, "main");
    assert_eq!(c.listeners[0].listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.listeners[0].tls, None, "plain TCP unless `tls` is given");
}

#[test]
fn timeout_defaults() {
    let t = parse(MINIMAL).timeouts;
    assert_eq!(t.connect, secs(5));
    assert_eq!(t.handshake, secs(10));
    assert_eq!(t.header, secs(10));
    assert_eq!(t.http_idle, secs(60));
    assert_eq!(t.backend_response, secs(60));
    assert_eq!(t.client_body, secs(60));
    assert_eq!(t.drain, secs(30));
    assert_eq!(t.close_spread, secs(5));
    assert_eq!(t, Timeouts::default());
}

#[test]
fn limit_defaults() {
    let l = parse(MINIMAL).limits;
    assert_eq!(l.max_header_size, 64 * 1024);
    assert_eq!(l.max_connections, 100_000);
    assert_eq!(l, Limits::default());
}

#[test]
fn route_defaults() {
    let c = parse(MINIMAL);
    let r = &c.routes[0];
    assert_eq!(r.name, "r");
    assert_eq!(r.host, None, "every host");
    assert_eq!(r.path_prefix, "/", "every path");
    assert_eq!(r.pool, "p");
}

#[test]
fn websocket_defaults() {
    let w = &parse(MINIMAL).routes[0].websocket;
    assert_eq!(w.idle_timeout, secs(300));
    assert_eq!(w.ping_interval, Some(secs(30)));
    assert_eq!(w.pong_timeout, secs(10));
    assert_eq!(w.max_message_size, 16 * 1024 * 1024);
    assert_eq!(w.close_timeout, secs(2));
    assert!(!w.ping_backend);
    assert_eq!(w.max_lifetime, None, "unbounded");
    assert_eq!(w.park_after, Some(secs(5)));
    assert_eq!(*w, WebSocketSettings::default());
}

#[test]
fn pool_and_backend_defaults() {
    let c = parse(MINIMAL);
    let p = &c.pools["p"];
    assert_eq!(p.policy, Policy::LeastConn);
    assert_eq!(p.health, None, "no active checks unless asked");
    assert_eq!(p.max_fails, 3);
    assert_eq!(p.max_fails, PoolConfig::DEFAULT_MAX_FAILS);
    assert_eq!(p.fail_timeout, secs(10));
    assert_eq!(p.fail_timeout, PoolConfig::DEFAULT_FAIL_TIMEOUT);
    let b = &p.backends[0];
    assert_eq!(b.addr, "10.0.0.1:9000");
    assert_eq!(b.id, b.addr, "the id defaults to the address");
    assert_eq!(b.weight, 1);
    assert!(!b.drain);
}

#[test]
fn health_check_defaults() {
    let c = parse(&MINIMAL.replace("[pool.p]\n", "[pool.p]\nhealth = {}\n"));
    let h = c.pools["p"].health.as_ref().expect("health table given");
    assert_eq!(h.path, "/");
    assert_eq!(h.interval, secs(5));
    assert_eq!(h.timeout, secs(1));
    assert_eq!(h.rise, 2);
    assert_eq!(h.fall, 3);
    assert!(!h.websocket, "a GET, not an upgrade");
    assert_eq!(*h, HealthCheck::default());
}

#[test]
fn zero_means_off_where_documented() {
    let text = MINIMAL.replace(
        "pool = \"p\"\n",
        "pool = \"p\"\nwebsocket = { ping_interval = \"0s\", max_lifetime = \"0s\", park_after = \"0s\" }\n",
    );
    let text = format!("workers = 0\n{text}");
    let c = parse(&text);
    assert_eq!(c.workers, None, "0 workers: one per core");
    assert_eq!(
        c.routes[0].websocket.ping_interval, None,
        "0s disables pings"
    );
    assert_eq!(c.routes[0].websocket.max_lifetime, None, "0s: unbounded");
    assert_eq!(c.routes[0].websocket.park_after, None, "0s: never parked");
    // close_spread is a window, not a timeout: zero is allowed and means "all at once".
    let c = parse(&format!("[timeouts]\nclose_spread = \"0s\"\n{MINIMAL}"));
    assert_eq!(c.timeouts.close_spread, Duration::ZERO);
}

#[test]
fn given_values_replace_the_defaults() {
    let text = format!(
        "workers = 4\nruntime = \"per_worker\"\n[admin]\nlisten = \"127.0.0.1:9090\"\n[timeouts]\nconnect = \"250ms\"\nhttp_idle = \"2m\"\nclient_body = \"90s\"\n\
         [limits]\nmax_header_size = \"16KiB\"\nmax_connections = 10\n{}",
        MINIMAL.replace(
            "backends = [ { addr = \"10.0.0.1:9000\" } ]",
            "max_fails = 0\nbackends = [ { addr = \"10.0.0.1:9000\", weight = 5, drain = true, id = \"a\" } ]",
        )
    );
    let c = parse(&text);
    assert_eq!(c.workers, Some(4));
    assert_eq!(c.runtime, RuntimeModel::PerWorker);
    assert_eq!(
        c.admin.map(|a| a.listen),
        Some("127.0.0.1:9090".parse().unwrap())
    );
    assert_eq!(c.timeouts.connect, Duration::from_millis(250));
    assert_eq!(c.timeouts.http_idle, secs(120));
    assert_eq!(c.timeouts.client_body, secs(90));
    // Those not given keep their defaults.
    assert_eq!(c.timeouts.handshake, secs(10));
    assert_eq!(c.limits.max_header_size, 16 * 1024);
    assert_eq!(c.limits.max_connections, 10);
    let p = &c.pools["p"];
    assert_eq!(p.max_fails, 0, "0: never eject");
    let b = &p.backends[0];
    assert_eq!((b.weight, b.drain, b.id.as_str()), (5, true, "a"));
}

#[test]
fn http2_defaults_and_values() {
    let c = parse(MINIMAL);
    assert_eq!(c.http2, Http2Settings::default());
    assert_eq!(c.http2.max_concurrent_streams, 100);
    assert_eq!(c.http2.stream_window, 64 * 1024);
    // Room for every stream's window: a stalled stream never takes another's share.
    assert_eq!(c.http2.connection_window(), 100 * 64 * 1024);
    let l = &c.listeners[0].http;
    assert_eq!(l.alpn, [Alpn::H2, Alpn::Http11], "h2 preferred");
    assert!(!l.h2c, "h2c only when asked");
    assert!(l.websocket_over_h2, "RFC 8441 on by default");

    let c = parse(&format!(
        "[http2]\nmax_concurrent_streams = 10\nstream_window = \"1MiB\"\n{}",
        MINIMAL.replace(
            "listen = \"127.0.0.1:8080\"\n",
            "listen = \"127.0.0.1:8080\"\nh2c = true\nwebsocket_over_h2 = false\n"
        )
    ));
    assert_eq!(c.http2.max_concurrent_streams, 10);
    assert_eq!(c.http2.stream_window, 1 << 20);
    assert_eq!(c.http2.connection_window(), 10 << 20);
    assert!(c.listeners[0].http.h2c);
    assert!(!c.listeners[0].http.websocket_over_h2);
    // The sum never passes HTTP/2's largest window (the checker keeps it far below).
    let big = Http2Settings {
        max_concurrent_streams: 10_000,
        stream_window: 16 << 20,
    };
    assert_eq!(big.connection_window(), (1 << 31) - 1);
}

#[test]
fn http_version_errors_name_the_key() {
    let errors = |text: &str| match Config::from_toml(text, "t.toml") {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(errors) => errors.to_string(),
    };
    let plain_alpn = MINIMAL.replace(
        "listen = \"127.0.0.1:8080\"\n",
        "listen = \"127.0.0.1:8080\"\nalpn = [\"h2\"]\n",
    );
    assert!(
        errors(&plain_alpn).contains("t.toml:5: listener[0].alpn: ALPN is for TLS listeners"),
        "{}",
        errors(&plain_alpn)
    );
    let tls = "tls = { certs = [ { cert = \"c.pem\", key = \"k.pem\" } ] }\n";
    let bad_id = MINIMAL.replace(
        "listen = \"127.0.0.1:8080\"\n",
        &format!("listen = \"127.0.0.1:8080\"\n{tls}alpn = [\"h2\", \"spdy/3\", \"h2\"]\n"),
    );
    let text = errors(&bad_id);
    assert!(
        text.contains("listener[0].alpn[1]: `spdy/3` is not a protocol"),
        "{text}"
    );
    assert!(text.contains("listener[0].alpn[2]: listed twice"), "{text}");
    let empty = MINIMAL.replace(
        "listen = \"127.0.0.1:8080\"\n",
        &format!("listen = \"127.0.0.1:8080\"\n{tls}alpn = []\n"),
    );
    assert!(errors(&empty).contains("listener[0].alpn: name at least one"));
    let tls_h2c = MINIMAL.replace(
        "listen = \"127.0.0.1:8080\"\n",
        &format!("listen = \"127.0.0.1:8080\"\n{tls}h2c = true\n"),
    );
    assert!(errors(&tls_h2c).contains("t.toml:6: listener[0].h2c: h2c is HTTP/2 without TLS"));
    let streams = format!("[http2]\nmax_concurrent_streams = 0\n{MINIMAL}");
    assert!(errors(&streams).contains("t.toml:2: http2.max_concurrent_streams: must be between 1"));
    let window = format!("[http2]\nstream_window = \"1KiB\"\n{MINIMAL}");
    assert!(errors(&window).contains("t.toml:2: http2.stream_window: must be between 16KiB"));
    let product =
        format!("[http2]\nmax_concurrent_streams = 1000\nstream_window = \"1MiB\"\n{MINIMAL}");
    assert!(
        errors(&product)
            .contains("t.toml:3: http2: max_concurrent_streams × stream_window is 1000 MiB"),
        "{}",
        errors(&product)
    );
    let unknown = format!("[http2]\nconnection_window = \"1MiB\"\n{MINIMAL}");
    assert!(errors(&unknown).contains("t.toml:2: http2: unknown field `connection_window`"));
}

#[test]
fn the_event_interval_is_a_small_positive_number() {
    for n in [1, 8, 1000] {
        assert_eq!(
            parse(&format!("event_interval = {n}\n{MINIMAL}")).event_interval,
            n
        );
    }
    for bad in ["0", "-3", "1001", "4294967297"] {
        let text = format!("workers = 2\nevent_interval = {bad}\n{MINIMAL}");
        let errors = Config::from_toml(&text, "t.toml").expect_err(bad).0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = &errors[0];
        assert_eq!(
            (e.file.as_str(), e.line, e.key.as_str(), e.message.as_str()),
            ("t.toml", 2, "event_interval", "must be between 1 and 1000")
        );
    }
}

#[test]
fn the_runtime_model_is_one_of_two_names() {
    for (text, model) in [
        ("shared", RuntimeModel::Shared),
        ("per_worker", RuntimeModel::PerWorker),
    ] {
        let c = parse(&format!("runtime = \"{text}\"\n{MINIMAL}"));
        assert_eq!(c.runtime, model);
        assert_eq!(model.name(), text, "named as the file spells it");
    }
    // The command line's spelling (`per-worker`), another case or an empty value are not the file's.
    for bad in ["per-worker", "Shared", "", "threads"] {
        let text = format!("workers = 2\nruntime = \"{bad}\"\n{MINIMAL}");
        let errors = Config::from_toml(&text, "t.toml").expect_err(bad).0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = &errors[0];
        assert_eq!(
            (e.file.as_str(), e.line, e.key.as_str()),
            ("t.toml", 2, "runtime")
        );
        assert_eq!(
            e.message,
            format!("unknown runtime `{bad}` (expected \"shared\" or \"per_worker\")")
        );
    }
    // A value of another type is serde's to refuse, with its line and key.
    let text = format!("runtime = 2\n{MINIMAL}");
    let errors = Config::from_toml(&text, "t.toml").expect_err("a number").0;
    assert_eq!((errors[0].line, errors[0].key.as_str()), (1, "runtime"));
}

#[test]
fn a_wrong_park_after_names_its_key_and_keeps_the_default() {
    let text = MINIMAL.replace(
        "pool = \"p\"\n",
        "pool = \"p\"\nwebsocket = { park_after = \"soon\" }\n",
    );
    let errors = Config::from_toml(&text, "t.toml")
        .expect_err("not a duration")
        .0;
    assert_eq!(errors.len(), 1, "{errors:?}");
    let e = &errors[0];
    assert_eq!(e.file, "t.toml");
    assert_eq!(e.key, "route[0].websocket.park_after");
    assert_eq!(
        text.lines()
            .nth(e.line - 1)
            .map(|l| l.contains("park_after")),
        Some(true),
        "line {} names it",
        e.line
    );
    let c = parse(&MINIMAL.replace(
        "pool = \"p\"\n",
        "pool = \"p\"\nwebsocket = { park_after = \"250ms\" }\n",
    ));
    assert_eq!(
        c.routes[0].websocket.park_after,
        Some(Duration::from_millis(250))
    );
}
