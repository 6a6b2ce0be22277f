//! Admission control through real sockets (README, "Protecting backends"): a client over its connection
//! limit is closed at once; over its tunnel limit or handshake rate on a route it gets 429 with
//! `Retry-After`; the listener's handshake gate queues a burst and sheds what would wait too long with 503;
//! the client is the one trusted proxies name; every refusal is counted and the limits show in
//! `/metrics` and `/status`. Origins and the PROXY protocol have their own tests below.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::{
    self, TestBackend, WAIT, gateway, http_get, raw_exchange, tcp_connect, upgrade_request, within,
    ws_connect,
};
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

/// One listener `main` with `listener` lines, one route `main` with `route` lines, to `backend`; an
/// admin listener; `top` lines before the listener.
fn config(backend: SocketAddr, top: &str, listener: &str, route: &str) -> String {
    format!(
        "{top}\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n{listener}\n\n\
         [[route]]\nname = \"main\"\npool = \"p\"\n{route}\n\n\
         [pool.p]\nbackends = [ {{ addr = \"{backend}\" }} ]\n"
    )
}

/// The value of the sample of `metric` whose labels contain every one of `labels`.
fn sample(metrics: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| line.starts_with(metric) && labels.iter().all(|l| line.contains(l)))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

fn rejections(gateway: &wsgate::Gateway, route: &str, reason: &str) -> f64 {
    let text = gateway.monitor().metrics_text();
    let labels = [
        "listener=\"main\"".to_string(),
        format!("route=\"{route}\""),
        format!("reason=\"{reason}\""),
    ];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    sample(&text, "wsgate_admission_rejections_total", &labels).unwrap_or(0.0)
}

/// Reads until the peer closes (EOF or reset), within the tests' wait; what was read must be nothing.
async fn closed_without_a_word(stream: &mut tokio::net::TcpStream) {
    let mut buf = [0u8; 64];
    let read = within("the refused connection to close", stream.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "a refused connection is closed, not answered: {read:?}"
    );
}

#[tokio::test]
async fn a_client_over_its_connection_limit_is_closed_at_once() {
    let backend = TestBackend::start("b").await;
    let text = config(backend.addr, "", "max_connections_per_ip = 2", "");
    let (gateway, addr) = gateway(&text).await;
    // Two connections held open without a word: each holds its place.
    let _first = tcp_connect(addr).await;
    let second = tcp_connect(addr).await;
    let mut third = tcp_connect(addr).await;
    closed_without_a_word(&mut third).await;
    assert_eq!(rejections(&gateway, "", "connections_per_ip"), 1.0);
    // A place given back is taken by the next connection.
    drop(second);
    within("a place to come back", async {
        loop {
            let (status, _, _) = http_get(addr, "/").await;
            if status == 200 {
                return;
            }
        }
    })
    .await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn tunnels_over_the_per_client_limit_get_429_and_a_place_comes_back_when_one_ends() {
    let backend = TestBackend::start("b").await;
    let text = config(backend.addr, "", "", "max_tunnels_per_ip = 2");
    let (gateway, addr) = gateway(&text).await;
    let first = ws_connect(addr, "/").await;
    let _second = ws_connect(addr, "/").await;
    let refused = raw_exchange(addr, upgrade_request(addr, "/", "").as_bytes()).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("retry-after"), Some("5"));
    assert_eq!(rejections(&gateway, "main", "tunnels_per_ip"), 1.0);
    let metrics = gateway.monitor().metrics_text();
    assert_eq!(
        sample(
            &metrics,
            "wsgate_ws_upgrades_total",
            &["route=\"main\"", "result=\"limited\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    drop(first);
    within("a place to come back", async {
        loop {
            let answer = raw_exchange(addr, upgrade_request(addr, "/", "").as_bytes()).await;
            if answer.status == 101 {
                return;
            }
            assert_eq!(answer.status, 429);
        }
    })
    .await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn the_client_is_who_trusted_proxies_say_and_nobody_else() {
    let backend = TestBackend::start("b").await;
    let route = "max_tunnels_per_ip = 1";
    let from = |ip: &str| format!("X-Forwarded-For: 198.51.100.1, {ip}\r\n");
    let upgrade = |addr, ip: &str| upgrade_request(addr, "/", &from(ip));

    // 127.0.0.1 is a trusted proxy: the client is the address it appended.
    let text = config(backend.addr, "", "trusted_proxies = [\"127.0.0.1\"]", route);
    let (trusting, addr) = gateway(&text).await;
    let mut held = Vec::new();
    for ip in ["203.0.113.1", "203.0.113.2"] {
        let mut stream = common::raw_send(addr, upgrade(addr, ip).as_bytes()).await;
        let answer = common::read_response(&mut stream).await;
        assert_eq!(answer.status, 101, "{ip}: a client of its own");
        held.push(stream);
    }
    let again = raw_exchange(addr, upgrade(addr, "203.0.113.1").as_bytes()).await;
    assert_eq!(again.status, 429, "the same client twice");
    trusting.shutdown().await;

    // Without trusted proxies the header is the client's own say: every request is 127.0.0.1.
    let text = config(backend.addr, "", "", route);
    let (gateway, addr) = gateway(&text).await;
    let mut stream = common::raw_send(addr, upgrade(addr, "203.0.113.1").as_bytes()).await;
    assert_eq!(common::read_response(&mut stream).await.status, 101);
    let other = raw_exchange(addr, upgrade(addr, "203.0.113.2").as_bytes()).await;
    assert_eq!(
        other.status, 429,
        "X-Forwarded-For from an untrusted peer is ignored"
    );
    drop((held, stream));
    gateway.shutdown().await;
}

// Paused time: the handshake buckets run on tokio's clock, so a second passes when the test says so.
#[tokio::test(start_paused = true)]
async fn a_client_over_its_handshake_rate_gets_429_until_a_token_is_back() {
    let backend = TestBackend::start("b").await;
    let text = config(
        backend.addr,
        "",
        "",
        "handshake_rate_per_ip = { rate = 1, burst = 2 }",
    );
    let (gateway, addr) = gateway(&text).await;
    let upgrade = upgrade_request(addr, "/", "");
    for n in 0..2 {
        let mut stream = common::raw_send(addr, upgrade.as_bytes()).await;
        assert_eq!(common::read_response(&mut stream).await.status, 101, "#{n}");
    }
    let refused = raw_exchange(addr, upgrade.as_bytes()).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(rejections(&gateway, "main", "handshake_rate_per_ip"), 1.0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut stream = common::raw_send(addr, upgrade.as_bytes()).await;
    assert_eq!(
        common::read_response(&mut stream).await.status,
        101,
        "a token is back after a second"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn the_handshake_gate_queues_a_burst_in_order_and_sheds_what_would_wait_too_long() {
    let backend = TestBackend::start("b").await;
    // Two handshakes a second, one at once, a queue of one second: of four arriving together, the first
    // goes at once, the second after half a second, the third after a second, the fourth is shed.
    let text = config(
        backend.addr,
        "",
        "handshake_rate = { rate = 2, burst = 1, max_wait = \"1s\" }",
        "",
    );
    let (gateway, addr) = gateway(&text).await;
    let upgrade = upgrade_request(addr, "/", "");
    let started = Instant::now();
    let mut attempts = Vec::new();
    for _ in 0..4 {
        let mut stream = common::raw_send(addr, upgrade.as_bytes()).await;
        attempts.push(tokio::spawn(async move {
            let answer = common::read_response(&mut stream).await;
            (answer, started.elapsed(), stream)
        }));
    }
    let mut switched = Vec::new();
    let mut shed = Vec::new();
    for attempt in attempts {
        let (answer, elapsed, stream) = within("an answer", attempt).await.expect("task");
        match answer.status {
            101 => switched.push((elapsed, stream)),
            503 => shed.push((answer, elapsed)),
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(switched.len(), 3, "three within the queue's wait");
    assert_eq!(shed.len(), 1, "one shed");
    let (answer, elapsed) = &shed[0];
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert!(
        *elapsed < Duration::from_millis(500),
        "shed at once, not after waiting: {elapsed:?}"
    );
    let mut times: Vec<Duration> = switched.iter().map(|(t, _)| *t).collect();
    times.sort();
    assert!(
        times[1] >= Duration::from_millis(450),
        "second waited its turn: {times:?}"
    );
    assert!(
        times[2] >= Duration::from_millis(950),
        "third waited two turns: {times:?}"
    );
    assert!(times[2] < WAIT);
    assert_eq!(rejections(&gateway, "main", "handshake_queue"), 1.0);
    gateway.shutdown().await;
}

#[tokio::test]
async fn limits_in_force_and_refusals_show_in_metrics_and_status() {
    let backend = TestBackend::start("b").await;
    let text = config(
        backend.addr,
        "",
        "max_connections_per_ip = 100\nhandshake_rate = { rate = 1000, burst = 50, max_wait = \"3s\" }",
        "max_tunnels_per_ip = 1\nhandshake_rate_per_ip = { rate = 5, burst = 10 }",
    );
    let (gateway, addr) = gateway(&text).await;
    let _held = ws_connect(addr, "/").await;
    let refused = raw_exchange(addr, upgrade_request(addr, "/", "").as_bytes()).await;
    assert_eq!(refused.status, 429);

    let metrics = gateway.monitor().metrics_text();
    let limit = |scope: &str, limit: &str| {
        let labels = [
            format!("scope=\"{scope}\""),
            "name=\"main\"".to_string(),
            format!("limit=\"{limit}\""),
        ];
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        sample(&metrics, "wsgate_admission_limit", &labels)
    };
    assert_eq!(limit("listener", "max_connections_per_ip"), Some(100.0));
    assert_eq!(limit("listener", "handshake_rate"), Some(1000.0));
    assert_eq!(limit("listener", "handshake_max_wait_seconds"), Some(3.0));
    assert_eq!(limit("route", "max_tunnels_per_ip"), Some(1.0));
    assert_eq!(limit("route", "handshake_burst_per_ip"), Some(10.0));
    assert_eq!(
        sample(
            &metrics,
            "wsgate_admission_tracked_clients",
            &["scope=\"route\"", "name=\"main\""]
        ),
        Some(1.0),
        "one client (127.0.0.1) tracked on the route"
    );

    let admin = gateway.admin_addr().expect("admin listener");
    let (status, _, body) = http_get(admin, "/status").await;
    assert_eq!(status, 200);
    let status: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    let listener = &status["admission"]["listeners"][0];
    assert_eq!(listener["name"], "main");
    assert_eq!(listener["max_connections_per_ip"], 100);
    assert_eq!(listener["handshake_rate"]["per_second"], 1000.0);
    assert_eq!(listener["handshake_rate"]["max_wait_ms"], 3000);
    let route = &status["admission"]["routes"][0];
    assert_eq!(route["max_tunnels_per_ip"], 1);
    assert_eq!(route["handshake_rate_per_ip"]["burst"], 10);
    assert_eq!(route["rejections"]["tunnels_per_ip"], 1);
    assert_eq!(route["tracked_clients"], 1);
    gateway.shutdown().await;
}

#[tokio::test]
async fn upgrades_from_origins_not_listed_get_403() {
    let backend = TestBackend::start("b").await;
    let route = "allowed_origins = [\"https://app.example.com\", \"https://*.example.net\"]";
    let (gateway, addr) = gateway(&config(backend.addr, "", "", route)).await;
    let status = |origin: &str| {
        let extra = if origin.is_empty() {
            String::new()
        } else {
            format!("Origin: {origin}\r\n")
        };
        async move {
            raw_exchange(addr, upgrade_request(addr, "/", &extra).as_bytes())
                .await
                .status
        }
    };
    for allowed in [
        "https://app.example.com",
        "HTTPS://APP.EXAMPLE.COM",
        "https://app.example.com:443",
        "https://app.example.com.",
        "https://chat.example.net",
        "https://a.b.example.net",
    ] {
        assert_eq!(status(allowed).await, 101, "{allowed}");
    }
    for refused in [
        "",
        "null",
        "http://app.example.com",
        "https://app.example.com:8443",
        "https://evil.example.com",
        "https://example.net",
        "https://badexample.net",
        "https://app.example.com/",
        "https://app.example.com.evil.test",
    ] {
        assert_eq!(status(refused).await, 403, "{refused:?}");
    }
    let twice = upgrade_request(
        addr,
        "/",
        "Origin: https://app.example.com\r\nOrigin: https://app.example.com\r\n",
    );
    assert_eq!(raw_exchange(addr, twice.as_bytes()).await.status, 403);
    let refused: f64 = gateway
        .monitor()
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with("wsgate_admission_rejections_total") && l.contains("origin"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(refused, 10.0, "every refusal counted by its reason");
    // No backend saw a refused upgrade.
    assert_eq!(backend.seen().len(), 6);
    gateway.shutdown().await;

    // Non-browser clients without an Origin may be let through; a wrong one still is not.
    let route = format!("{route}\nallow_missing_origin = true");
    let (gateway, addr) = common::gateway(&config(backend.addr, "", "", &route)).await;
    let bare = raw_exchange(addr, upgrade_request(addr, "/", "").as_bytes()).await;
    assert_eq!(bare.status, 101);
    let wrong = upgrade_request(addr, "/", "Origin: https://evil.test\r\n");
    assert_eq!(raw_exchange(addr, wrong.as_bytes()).await.status, 403);
    gateway.shutdown().await;
}
