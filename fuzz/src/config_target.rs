//! The config target: `wsgate::Config::from_toml` on any text, and what `wsgate run` does with an accepted
//! config.

use std::time::{Duration, Instant};

use wsgate::Config;
use wsgate::internals::{CancellationToken, Loaded, State, TlsClients};

/// The name errors are reported under.
pub const FILE: &str = "fuzz.toml";
/// The bound on `limits.max_connections` (`wsgate::config::MAX_CONNECTIONS`).
pub const MAX_CONNECTIONS: usize = 16_777_216;

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match Config::from_toml(&text, FILE) {
        Err(errors) => check_errors(&text, &errors),
        Ok(config) => check_accepted(config),
    }
}

fn check_errors(text: &str, errors: &wsgate::ConfigErrors) {
    assert!(!errors.0.is_empty(), "an empty error list");
    // `lines()` does not count a last empty line; an error may point just past the last newline.
    let lines = text.lines().count();
    for error in &errors.0 {
        assert_eq!(error.file, FILE);
        assert!(
            !error.message.trim().is_empty(),
            "an error without a message: {error:?}"
        );
        assert!(
            error.line <= lines + 1,
            "line {} of a {lines}-line text: {error:?}",
            error.line
        );
        let shown = error.to_string();
        let prefix = if error.key.is_empty() {
            format!("{FILE}:{}: ", error.line)
        } else {
            format!("{FILE}:{}: {}: ", error.line, error.key)
        };
        assert!(shown.starts_with(&prefix), "{shown:?} lacks {prefix:?}");
    }
    let shown = errors.to_string();
    assert!(shown.starts_with(&format!("{FILE}:")), "{shown:?}");
}

/// Every duration `wsgate run` adds to a clock.
fn durations(config: &Config) -> Vec<(String, Duration)> {
    let t = &config.timeouts;
    let mut all = vec![
        ("timeouts.connect".to_string(), t.connect),
        ("timeouts.handshake".to_string(), t.handshake),
        ("timeouts.header".to_string(), t.header),
        ("timeouts.http_idle".to_string(), t.http_idle),
        ("timeouts.backend_response".to_string(), t.backend_response),
        ("timeouts.client_body".to_string(), t.client_body),
        ("timeouts.send".to_string(), t.send),
        ("timeouts.drain".to_string(), t.drain),
        ("timeouts.close_spread".to_string(), t.close_spread),
    ];
    for (i, route) in config.routes.iter().enumerate() {
        let w = &route.websocket;
        let key = format!("route[{i}].websocket");
        all.push((format!("{key}.idle_timeout"), w.idle_timeout));
        all.push((format!("{key}.pong_timeout"), w.pong_timeout));
        all.push((format!("{key}.close_timeout"), w.close_timeout));
        if let Some(d) = w.ping_interval {
            all.push((format!("{key}.ping_interval"), d));
        }
        if let Some(d) = w.max_lifetime {
            all.push((format!("{key}.max_lifetime"), d));
        }
    }
    for (name, pool) in &config.pools {
        all.push((format!("pool.{name}.fail_timeout"), pool.fail_timeout));
        if let Some(spread) = pool.drain_spread {
            all.push((format!("pool.{name}.drain_spread"), spread));
        }
        for (i, d) in pool.discovery.iter().enumerate() {
            let key = format!("pool.{name}.backends(dns {i})");
            all.push((format!("{key}.resolve_every"), d.resolve_every));
            all.push((format!("{key}.resolve_min"), d.resolve_min));
            all.push((format!("{key}.remove_after"), d.remove_after));
        }
        if let Some(health) = &pool.health {
            all.push((format!("pool.{name}.health.interval"), health.interval));
            all.push((format!("pool.{name}.health.timeout"), health.timeout));
        }
    }
    all
}

fn check_accepted(config: Config) {
    let std_now = Instant::now();
    let tokio_now = tokio::time::Instant::now();
    for (key, d) in durations(&config) {
        assert!(
            std_now.checked_add(d).is_some(),
            "{key} = {d:?} accepted, but std::time::Instant::now() + it overflows"
        );
        assert!(
            tokio_now.checked_add(d).is_some(),
            "{key} = {d:?} accepted, but tokio::time::Instant::now() + it overflows"
        );
    }
    // What tokio would panic on: a zero period (`interval`), a zero timeout where one is required.
    let t = &config.timeouts;
    for (key, d) in [
        ("connect", t.connect),
        ("handshake", t.handshake),
        ("header", t.header),
        ("http_idle", t.http_idle),
        ("backend_response", t.backend_response),
        ("drain", t.drain),
    ] {
        assert!(!d.is_zero(), "timeouts.{key} = 0 accepted");
    }
    for route in &config.routes {
        let w = &route.websocket;
        assert!(
            !w.idle_timeout.is_zero() && !w.pong_timeout.is_zero() && !w.close_timeout.is_zero()
        );
        assert!(w.ping_interval.is_none_or(|d| !d.is_zero()));
        assert!(w.max_lifetime.is_none_or(|d| !d.is_zero()));
        assert!(w.max_message_size > 0);
        assert!(
            config.pools.contains_key(&route.pool),
            "route `{}` names a missing pool `{}`",
            route.name,
            route.pool
        );
    }
    for (name, pool) in &config.pools {
        assert!(
            !pool.backends.is_empty() || !pool.discovery.is_empty(),
            "pool `{name}` without backends"
        );
        for d in &pool.discovery {
            // A zero period would make the resolution loop spin; resolve_min bounds how often it asks.
            assert!(!d.resolve_min.is_zero() || d.resolve_every >= Duration::from_millis(100));
            assert!(d.resolve_min <= d.resolve_every && d.resolve_every >= Duration::from_millis(100));
            assert!(d.port != 0 && !d.host.is_empty());
        }
        if let Some(health) = &pool.health {
            assert!(!health.interval.is_zero() && !health.timeout.is_zero());
        }
    }
    assert!(!config.listeners.is_empty() && !config.routes.is_empty());
    let max = config.limits.max_connections;
    assert!(
        (1..=MAX_CONNECTIONS).contains(&max),
        "limits.max_connections = {max} accepted (bound: 1..={MAX_CONNECTIONS})"
    );
    if let Some(workers) = config.workers {
        assert!((1..=1024).contains(&workers), "workers = {workers}");
    }

    // The runtime state, then a reload onto the same config (which keeps every backend). A backend `tls`
    // table may name files that are not there: then there is no state to build.
    let routes = config.routes.len();
    let Ok(tls) = TlsClients::load(&config, None) else {
        return;
    };
    let scopes = wsgate::internals::Scopes::default();
    let stop = CancellationToken::new();
    let loaded = |backend_tls| Loaded {
        backend_tls,
        admin_tokens: None,
    };
    let first = State::new(config.clone(), None, loaded(tls), (&scopes, &stop));
    assert_eq!(
        first.router.routes().len(),
        routes,
        "a route was dropped by the router"
    );
    let draining = |state: &State| -> Vec<bool> {
        state
            .pools
            .iter()
            .flat_map(|p| p.backends().iter().map(|b| b.is_draining()).collect::<Vec<_>>())
            .collect()
    };
    let draining_before = draining(&first);
    let tls = TlsClients::load(&config, Some(&first.backend_tls)).expect("loaded once already");
    let second = State::new(config, Some(&first), loaded(tls), (&scopes, &stop));
    assert_eq!(second.router.routes().len(), routes);
    assert_eq!(
        draining(&second),
        draining_before,
        "a reload of the same config changed which backends drain"
    );
    for (old, new) in first.pools.iter().zip(second.pools.iter()) {
        let (old_backends, new_backends) = (old.backends(), new.backends());
        assert_eq!(old_backends.len(), new_backends.len());
        for (a, b) in old_backends.iter().zip(new_backends.iter()) {
            assert!(
                std::sync::Arc::ptr_eq(a, b),
                "a reload of the same config replaced backend {}",
                a.addr
            );
        }
        assert_eq!(old.discovery.len(), new.discovery.len());
        for (a, b) in old.discovery.iter().zip(&new.discovery) {
            assert!(
                std::sync::Arc::ptr_eq(a, b),
                "a reload of the same config replaced the DNS entry {}",
                a.name
            );
        }
    }
}
