//! DNS service discovery, against a DNS server the test runs on loopback (`dns_server.rs`) and whose
//! answers it changes: every address of the name becomes a backend (all on one port, on 127.0.0.x), a
//! missing one drains only after `remove_after` (a short absence changes nothing), a failed resolution
//! keeps the last known set, a name that never resolves leaves the gateway not ready, and a discovered
//! backend takes traffic only once its health checks pass.
//!
//! Real time, with short intervals: the resolver's own I/O does not run on paused time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;
use crate::dns_server::{Failure, TestDns};
use wsgate::Gateway;

const NAME: &str = "chat.wsgate.test";

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// Listeners on 127.0.0.1 … 127.0.0.n, all on one port.
async fn listeners(n: u8) -> (u16, Vec<TcpListener>) {
    'again: for _ in 0..50 {
        let first = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = first.local_addr().expect("addr").port();
        let mut all = vec![first];
        for last in 2..=n {
            match TcpListener::bind(SocketAddr::new(loopback(last), port)).await {
                Ok(listener) => all.push(listener),
                Err(_) => continue 'again,
            }
        }
        return (port, all);
    }
    panic!("no port free on every loopback address");
}

/// A gateway whose pool `p` is the name `NAME` on `port`, asking `dns`; `pool_extra` goes in the pool.
async fn discovering_gateway(
    dns: &TestDns,
    port: u16,
    entry_extra: &str,
    pool_extra: &str,
) -> Gateway {
    let text = format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[dns]
servers = ["{dns}"]

[[listener]]
name = "main"
listen = "127.0.0.1:0"

[[route]]
name = "main"
path_prefix = "/"
pool = "p"

[pool.p]
drain_spread = "0s"
{pool_extra}
backends = [ {{ dns = "{NAME}:{port}", resolve_every = "200ms", resolve_min = "100ms", {entry_extra} }} ]
"#,
        dns = dns.addr()
    );
    gateway(&text).await.0
}

async fn status(gateway: &Gateway) -> serde_json::Value {
    let admin = gateway.admin_addr().expect("admin");
    let (code, _, body) = http_get(admin, "/status").await;
    assert_eq!(code, 200);
    serde_json::from_slice(&body).expect("status JSON")
}

/// The backends of pool `p` as (id, state), sorted.
async fn backends(gateway: &Gateway) -> Vec<(String, String)> {
    let status = status(gateway).await;
    let mut out: Vec<_> = status["pools"][0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| {
            assert_eq!(b["discovered"], true);
            (
                b["id"].as_str().expect("id").to_string(),
                b["state"].as_str().expect("state").to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

fn up(port: u16, lasts: &[u8]) -> Vec<(String, String)> {
    lasts
        .iter()
        .map(|l| (format!("127.0.0.{l}:{port}"), "up".to_string()))
        .collect()
}

/// Polls `/status` until the backends are `expected`, failing after `WAIT`.
async fn until_backends(gateway: &Gateway, expected: &[(String, String)]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = backends(gateway).await;
        if now == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backends are {now:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn tunnels_on(gateway: &Gateway, addr: &str) -> usize {
    gateway
        .backends()
        .iter()
        .find(|b| b.addr == addr)
        .map_or(0, |b| b.tunnels)
}

#[tokio::test]
async fn addresses_become_backends_and_one_that_stays_missing_drains() {
    let dns = TestDns::start().await;
    dns.set(NAME, &[(loopback(1), 1), (loopback(2), 1)]);
    let (port, listeners) = listeners(3).await;
    let _backends: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| TestBackend::serve(&format!("b{}", i + 1), l))
        .collect();
    let gateway = discovering_gateway(&dns, port, "remove_after = \"1500ms\"", "").await;
    let addr = gateway.listener_addr("main").expect("listener");
    until_backends(&gateway, &up(port, &[1, 2])).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(ws_connect(addr, "/ws").await);
    }
    let two = format!("127.0.0.2:{port}");
    assert_eq!(tunnels_on(&gateway, &two), 2, "least_conn shares them");

    // .3 appears, .2 leaves the answer.
    let changed = Instant::now();
    dns.set(NAME, &[(loopback(1), 1), (loopback(3), 1)]);
    until_backends(&gateway, &up(port, &[1, 2, 3])).await;
    assert!(
        changed.elapsed() < Duration::from_millis(1500),
        "a new address is a backend at once"
    );
    let now = status(&gateway).await;
    let entry = &now["pools"][0]["discovery"][0];
    assert_eq!(entry["dns"], format!("{NAME}:{port}"));
    assert_eq!(
        entry["addresses"],
        serde_json::json!([format!("127.0.0.1:{port}"), format!("127.0.0.3:{port}")])
    );
    // Missing, not yet for `remove_after`: .2 still serves its clients.
    assert_eq!(tunnels_on(&gateway, &two), 2);
    // Then it drains (spread 0s): its two clients get 1012 and come back on the others. Each client
    // waits on its own task (answering its Close at once); the two on .1 never hear anything.
    let (closes, mut heard) = tokio::sync::mpsc::unbounded_channel();
    let waiters: Vec<_> = clients
        .drain(..)
        .map(|mut ws| {
            let closes = closes.clone();
            tokio::spawn(async move {
                while let Some(Ok(message)) = ws.next().await {
                    if let Message::Close(frame) = message {
                        let _ = closes.send(frame.map(|f| u16::from(f.code)));
                        return;
                    }
                }
            })
        })
        .collect();
    for _ in 0..2 {
        let code = within("a Close", heard.recv()).await.expect("a Close");
        assert_eq!(code, Some(1012));
    }
    assert!(
        changed.elapsed() >= Duration::from_millis(1500),
        "not before remove_after"
    );
    let deadline = Instant::now() + WAIT;
    while tunnels_on(&gateway, &two) > 0 {
        assert!(Instant::now() < deadline, "the tunnels to .2 did not end");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        heard.try_recv().is_err(),
        "only the clients of .2 were closed"
    );
    for waiter in waiters {
        waiter.abort();
    }
    for _ in 0..2 {
        let mut again = ws_connect(addr, "/ws").await;
        again.send(Message::text("hi")).await.expect("send");
        assert_eq!(next_message(&mut again).await, Message::text("hi"));
        clients.push(again);
    }
    assert_eq!(tunnels_on(&gateway, &two), 0);
    // Drained and without connections, .2 leaves the pool.
    until_backends(&gateway, &up(port, &[1, 3])).await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_short_absence_and_failed_resolutions_change_nothing() {
    let dns = TestDns::start().await;
    dns.set(NAME, &[(loopback(1), 1), (loopback(2), 1)]);
    let (port, listeners) = listeners(2).await;
    let _backends: Vec<_> = listeners
        .into_iter()
        .map(|l| TestBackend::serve("b", l))
        .collect();
    let gateway = discovering_gateway(&dns, port, "remove_after = \"3s\"", "").await;
    until_backends(&gateway, &up(port, &[1, 2])).await;
    // A tunnel on each backend, held through all of it.
    let addr = gateway.listener_addr("main").expect("listener");
    let mut clients = vec![ws_connect(addr, "/ws").await, ws_connect(addr, "/ws").await];
    let two = format!("127.0.0.2:{port}");
    assert_eq!(tunnels_on(&gateway, &two), 1);
    // Flapping: .2 is missing for a while, shorter than remove_after, then back.
    dns.set(NAME, &[(loopback(1), 1)]);
    let queries = dns.queries(NAME);
    let deadline = Instant::now() + WAIT;
    while dns.queries(NAME) < queries + 4 {
        assert!(Instant::now() < deadline, "no new resolutions");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dns.set(NAME, &[(loopback(1), 1), (loopback(2), 1)]);
    // Failures of every kind keep the set as it is.
    for (failure, label) in [(Failure::ServFail, "failed"), (Failure::NxDomain, "empty")] {
        dns.fail(NAME, failure);
        let deadline = Instant::now() + WAIT;
        loop {
            let now = status(&gateway).await;
            let entry = &now["pools"][0]["discovery"][0];
            if entry["resolutions"][label].as_u64().unwrap_or(0) >= 2 {
                assert!(entry["last_error"].is_string(), "{entry}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no {label} resolution counted: {entry}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(backends(&gateway).await, up(port, &[1, 2]));
        let metrics = gateway.metrics_text();
        let series = format!(
            "wsgate_discovery_resolutions_total{{dns=\"{NAME}:{port}\",pool=\"p\",result=\"{label}\"}}"
        );
        assert!(metrics.contains(&series), "{metrics}");
    }
    // Never drained: nothing was moved, and both tunnels still echo.
    assert_eq!(tunnels_on(&gateway, &two), 1);
    for ws in &mut clients {
        ws.send(Message::text("still")).await.expect("send");
        assert_eq!(next_message(ws).await, Message::text("still"));
    }
    let metrics = gateway.metrics_text();
    assert!(!metrics.contains("reason=\"backend_drain\""));
    assert!(
        status(&gateway).await["pools"][0]["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .all(|b| b["drain"].is_null())
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_name_that_never_resolves_leaves_the_gateway_not_ready() {
    let dns = TestDns::start().await;
    dns.fail(NAME, Failure::ServFail);
    let gateway = discovering_gateway(&dns, 9, "", "").await;
    let admin = gateway.admin_addr().expect("admin");
    let addr = gateway.listener_addr("main").expect("listener");
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, _, body) = http_get(admin, "/readyz").await;
        assert_eq!(code, 503);
        let text = String::from_utf8_lossy(&body);
        if text.contains(&format!("DNS `{NAME}:9`")) && text.contains("failed") {
            assert!(text.contains("pool `p` has no backend"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "readyz says {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = raw_exchange(addr, upgrade_request(addr, "/ws", "").as_bytes()).await;
    assert_eq!(refused.status, 503);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_discovered_backend_takes_traffic_once_its_health_checks_pass() {
    let dns = TestDns::start().await;
    dns.set(NAME, &[(loopback(1), 1)]);
    let healthy = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&healthy);
    let backend = http_backend(move |req| {
        let flag = Arc::clone(&flag);
        async move {
            let ok = req.uri().path() != "/health" || flag.load(Ordering::SeqCst);
            let mut response = http::Response::new(backend_body(if ok { "ok" } else { "no" }));
            if !ok {
                *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            }
            response
        }
    })
    .await;
    let health = "health = { path = \"/health\", interval = \"100ms\", timeout = \"1s\", rise = 2, fall = 2 }";
    let gateway = discovering_gateway(&dns, backend.addr.port(), "", health).await;
    let addr = gateway.listener_addr("main").expect("listener");
    let id = format!("127.0.0.1:{}", backend.addr.port());
    until_backends(&gateway, &[(id.clone(), "down".to_string())]).await;
    let (code, _, _) = http_get(addr, "/").await;
    assert_eq!(code, 503, "no backend before the checks pass");
    healthy.store(true, Ordering::SeqCst);
    until_backends(&gateway, &[(id, "up".to_string())]).await;
    let (code, _, body) = http_get(addr, "/").await;
    assert_eq!((code.as_u16(), &body[..]), (200, &b"ok"[..]));
    gateway.shutdown().await;
}
