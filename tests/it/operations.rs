//! Operating wsgate: Prometheus metrics and the admin endpoints, reload without dropping a connection,
//! graceful shutdown, and the `wsgate` binary's signals.
//!
//! Tests that wait on wsgate's timers (idle tunnels, the spread of the shutdown's Closes, the drain) run in
//! paused time, `#[tokio::test(start_paused = true)]`, as the tunnel's timer tests do (`tunnel.rs`), and
//! check when things happen to the millisecond (`assert_at`). The reload test needs real threads and the
//! binary's test a child process (whose own clock paused time cannot hold): both run in real time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsgate::{Config, Gateway};

/// The value of one sample line of a Prometheus text exposition, e.g. `name{a="b"}`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn with_admin(config: &str) -> String {
    format!("[admin]\nlisten = \"127.0.0.1:0\"\n{config}")
}

/// Polls `check` every millisecond (`TICK`) until it holds, failing after `WAIT`. Returns when it held (in
/// paused time: within a tick of the moment it came true).
async fn eventually(what: &str, mut check: impl FnMut() -> bool) -> Instant {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(TICK).await;
    }
    Instant::now()
}

#[tokio::test(start_paused = true)]
async fn metrics_count_known_traffic_exactly() {
    let backend = TestBackend::start("b1").await;
    let (idle_timeout, close_timeout) = (Duration::from_millis(300), Duration::from_secs(2));
    let text = with_admin(&config_text(
        &[backend.addr],
        "idle_timeout = \"300ms\", close_timeout = \"2s\", ping_interval = \"0s\"",
    ));
    let (gateway, addr) = gateway(&text).await;
    let admin = gateway.admin_addr().expect("admin listener");

    // One tunnel with known traffic, closed by the client; two left idle until their timeout.
    let mut talker = ws_connect(addr, "/ws").await;
    let _idle_a = ws_connect(addr, "/ws").await;
    let _idle_b = ws_connect(addr, "/ws").await;
    let opened = Instant::now();
    for _ in 0..5 {
        within("send", talker.send(Message::text("x".repeat(100))))
            .await
            .expect("send");
        assert_eq!(
            next_message(&mut talker).await,
            Message::text("x".repeat(100))
        );
    }
    let close = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    within("close", talker.close(Some(close)))
        .await
        .expect("close");
    match within("the backend's Close answer", talker.next()).await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected the backend's Close answer, got {other:?}"),
    }
    // One rejected upgrade.
    let rejected = raw_exchange(
        addr,
        upgrade_request(addr, "/ws", "")
            .replace("Version: 13", "Version: 12")
            .as_bytes(),
    )
    .await;
    assert_eq!(rejected.status, 426);

    // The idle tunnels end idle_timeout after they opened, and close_timeout later still: their clients,
    // never read, do not answer wsgate's Close. (Polled from just before, a tick apart.)
    let idle_end = idle_timeout + close_timeout;
    tokio::time::sleep_until(opened + idle_end - TICK).await;
    let ended = eventually("three tunnels have ended", || {
        let text = gateway.metrics_text();
        text.contains(
            "wsgate_ws_closes_total{protocol=\"h1\",reason=\"idle_timeout\",route=\"main\"} 2",
        ) && text.contains(
            "wsgate_ws_closes_total{protocol=\"h1\",reason=\"client_close\",route=\"main\"} 1",
        )
    })
    .await;
    assert_at("the idle tunnels' end", ended - opened, idle_end);
    let (status, _, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    let metrics = String::from_utf8_lossy(&body).into_owned();
    let value = |series: &str| {
        sample(&metrics, series).unwrap_or_else(|| panic!("no sample {series} in\n{metrics}"))
    };
    assert_eq!(
        value("wsgate_ws_upgrades_total{protocol=\"h1\",result=\"ok\",route=\"main\"}"),
        3.0
    );
    assert_eq!(
        value("wsgate_ws_upgrades_total{protocol=\"h1\",result=\"rejected\",route=\"main\"}"),
        1.0
    );
    assert_eq!(
        value("wsgate_ws_closes_total{protocol=\"h1\",reason=\"idle_timeout\",route=\"main\"}"),
        2.0
    );
    assert_eq!(
        value("wsgate_ws_closes_total{protocol=\"h1\",reason=\"client_close\",route=\"main\"}"),
        1.0
    );
    // Client to backend: 5 masked text frames (6 + 100 bytes) and a masked Close with a code (6 + 2).
    assert_eq!(
        value("wsgate_ws_bytes_total{direction=\"client_to_backend\",route=\"main\"}"),
        538.0
    );
    // Backend to client: 5 unmasked echoes (2 + 100) and the backend's Close answer (2 + 2).
    assert_eq!(
        value("wsgate_ws_bytes_total{direction=\"backend_to_client\",route=\"main\"}"),
        514.0
    );
    assert_eq!(
        value("wsgate_ws_frames_total{direction=\"client_to_backend\",route=\"main\"}"),
        6.0
    );
    assert_eq!(
        value(&format!(
            "wsgate_backend_connections_active{{backend=\"{}\",pool=\"p\"}}",
            backend.addr
        )),
        0.0
    );
    assert_eq!(
        value(&format!(
            "wsgate_backend_up{{backend=\"{}\",pool=\"p\"}}",
            backend.addr
        )),
        1.0
    );
    assert_eq!(value("wsgate_connections_active{listener=\"main\"}"), 0.0);
    assert_eq!(value("wsgate_config_reloads_total{result=\"ok\"}"), 0.0);
    assert!(
        metrics.contains("process_resident_memory_bytes"),
        "process metrics missing"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn admin_endpoints_answer() {
    let backend = TestBackend::start("b1").await;
    let text = with_admin(&config_text(&[backend.addr], ""));
    let (gateway, _addr) = gateway(&text).await;
    let admin = gateway.admin_addr().expect("admin listener");
    let (status, _, body) = http_get(admin, "/healthz").await;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"ok\n"[..]));
    let (status, _, _) = http_get(admin, "/readyz").await;
    assert_eq!(status, 200);
    let (status, headers, body) = http_get(admin, "/status").await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/json");
    let json: serde_json::Value = serde_json::from_slice(&body).expect("status is JSON");
    assert_eq!(json["pools"][0]["name"], "p");
    assert_eq!(
        json["pools"][0]["backends"][0]["addr"],
        backend.addr.to_string()
    );
    assert_eq!(json["ready"], true);
    let (status, _, _) = http_get(admin, "/nope").await;
    assert_eq!(status, 404);
    gateway.shutdown().await;
}

#[tokio::test]
async fn readyz_fails_when_a_pool_has_no_backend_to_send_to() {
    let backend = TestBackend::start("b1").await;
    let text = with_admin(&config_text(&[backend.addr], "")).replace(
        &format!("{{ addr = \"{}\" }}", backend.addr),
        &format!("{{ addr = \"{}\", drain = true }}", backend.addr),
    );
    let (gateway, _) = gateway(&text).await;
    let admin = gateway.admin_addr().expect("admin listener");
    let (status, _, body) = http_get(admin, "/readyz").await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("pool `p`"));
    gateway.shutdown().await;
}

/// A config for the reload test: generation `i` changes routes and pools, swaps b1 for b3 halfway, and
/// adds a listener.
fn generation(i: usize, b1: SocketAddr, b2: SocketAddr, b3: SocketAddr) -> String {
    let backends = if i < 10 { [b1, b2] } else { [b2, b3] };
    let extra_listener = if i >= 5 {
        "[[listener]]\nname = \"extra\"\nlisten = \"127.0.0.1:0\"\n"
    } else {
        ""
    };
    format!(
        r#"
[[listener]]
name = "main"
listen = "127.0.0.1:0"
{extra_listener}
[[route]]
name = "main"
path_prefix = "/"
pool = "p{i}"
websocket = {{ idle_timeout = "{idle}s" }}

[[route]]
name = "r{i}"
path_prefix = "/gen{i}"
pool = "p{i}"

[pool.p{i}]
{spread}
backends = [ {{ addr = "{a}" }}, {{ addr = "{b}" }} ]
"#,
        idle = 60 + i,
        // Each generation renames the pool but keeps its addresses, which must not drain them. Generation
        // 10 leaves b1 out: a removed backend drains with its old pool's spread, "none" for generation 9,
        // so its tunnels finish on their own (the spread drain has tests of its own, tests/it/drain.rs).
        spread = if i == 9 {
            "drain_spread = \"none\""
        } else {
            ""
        },
        a = backends[0],
        b = backends[1],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_never_drop_a_live_connection() {
    const CONNECTIONS: usize = 500;
    const RELOADS: usize = 20;
    let (b1, b2, b3) = (
        TestBackend::start("b1").await,
        TestBackend::start("b2").await,
        TestBackend::start("b3").await,
    );
    let config =
        Config::from_toml(&generation(0, b1.addr, b2.addr, b3.addr), "gen0.toml").expect("config");
    let gateway = Arc::new(Gateway::start(config).await.expect("start"));
    let addr = gateway.listener_addr("main").expect("main");

    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(ws_connect(addr, "/ws").await);
    }
    // Every client keeps exchanging numbered messages through all the reloads; each echo must be the next one.
    let stop = Arc::new(tokio::sync::Notify::new());
    let exchanged = Arc::new(AtomicUsize::new(0));
    let mut talkers = Vec::new();
    for (id, mut ws) in clients.into_iter().enumerate() {
        let (stop, exchanged) = (Arc::clone(&stop), Arc::clone(&exchanged));
        talkers.push(tokio::spawn(async move {
            let stopped = stop.notified();
            tokio::pin!(stopped);
            for n in 0u64.. {
                let text = format!("{id}:{n}");
                within("send", ws.send(Message::text(text.clone())))
                    .await
                    .expect("connection dropped on send");
                assert_eq!(
                    next_message(&mut ws).await,
                    Message::text(text),
                    "lost or duplicated message"
                );
                exchanged.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
            ws
        }));
    }
    // New connections keep being opened during the reloads, and must all succeed.
    let opener = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let stopped = stop.notified();
            tokio::pin!(stopped);
            let mut opened = 0;
            loop {
                let mut ws = ws_connect(addr, "/ws").await;
                within("send", ws.send(Message::text("new")))
                    .await
                    .expect("send");
                assert_eq!(next_message(&mut ws).await, Message::text("new"));
                opened += 1;
                tokio::select! {
                    _ = &mut stopped => return opened,
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
            }
        })
    };
    for i in 1..=RELOADS {
        let config = Config::from_toml(&generation(i, b1.addr, b2.addr, b3.addr), "gen.toml")
            .expect("config");
        within("reload", gateway.reload(config))
            .await
            .expect("reload accepted");
        // A broken config in between is refused and changes nothing.
        let broken = Config::from_toml(
            "[[listener]]\nname = \"main\"\nlisten = \"nope\"\n",
            "broken.toml",
        );
        assert!(broken.is_err());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = exchanged.load(Ordering::Relaxed);
    eventually("messages keep flowing after the reloads", || {
        exchanged.load(Ordering::Relaxed) > before + CONNECTIONS
    })
    .await;
    stop.notify_waiters();
    let opened = within("opener", opener)
        .await
        .expect("new connections never failed");
    assert!(opened > 0);
    let mut survivors = Vec::new();
    for talker in talkers {
        survivors.push(
            within("talker", talker)
                .await
                .expect("a live connection failed"),
        );
    }
    assert_eq!(survivors.len(), CONNECTIONS);
    assert!(
        gateway.listener_addr("extra").is_some(),
        "the added listener is bound"
    );
    assert_eq!(
        gateway.listener_addr("main"),
        Some(addr),
        "the unchanged listener kept its socket"
    );

    // After the last reload, new connections follow the new config: b1 was removed.
    let b1_before = b1.seen().len();
    for _ in 0..20 {
        let mut ws = ws_connect(addr, "/gen20").await;
        within("send", ws.send(Message::text("after")))
            .await
            .expect("send");
        assert_eq!(next_message(&mut ws).await, Message::text("after"));
    }
    assert_eq!(
        b1.seen().len(),
        b1_before,
        "a removed backend got new connections"
    );
    assert!(b3.seen().len() >= 5, "the added backend got no connections");
    let text = gateway.metrics_text();
    assert!(
        text.contains(&format!(
            "wsgate_config_reloads_total{{result=\"ok\"}} {RELOADS}"
        )),
        "{text}"
    );
}

#[tokio::test]
async fn a_broken_reload_leaves_everything_serving() {
    let backend = TestBackend::start("b1").await;
    let dir = tempdir();
    let path = dir.join("wsgate.toml");
    std::fs::write(&path, config_text(&[backend.addr], "")).expect("write config");
    let gateway = Gateway::start(Config::from_file(&path).expect("config"))
        .await
        .expect("start");
    let addr = gateway.listener_addr("main").expect("main");
    let mut ws = ws_connect(addr, "/ws").await;
    std::fs::write(&path, "[[route]]\nname = \"r\"\npool = \"missing\"\n")
        .expect("write broken config");
    let error = gateway
        .reload_from_file()
        .await
        .expect_err("broken config refused");
    assert!(
        error.to_string().contains("wsgate.toml:3"),
        "error names file and line: {error}"
    );
    within("send", ws.send(Message::text("still here")))
        .await
        .expect("send");
    assert_eq!(next_message(&mut ws).await, Message::text("still here"));
    let mut fresh = ws_connect(addr, "/ws").await;
    within("send", fresh.send(Message::text("new")))
        .await
        .expect("send");
    assert_eq!(next_message(&mut fresh).await, Message::text("new"));
    assert!(
        gateway
            .metrics_text()
            .contains("wsgate_config_reloads_total{result=\"error\"} 1")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(start_paused = true)]
async fn shutdown_sends_going_away_to_every_tunnel_and_finishes() {
    let close_spread = Duration::from_millis(300);
    let backend = TestBackend::start("b1").await;
    let text = config_text(&[backend.addr], "").replace(
        "[[listener]]",
        "[timeouts]\ndrain = \"5s\"\nclose_spread = \"300ms\"\n\n[[listener]]",
    );
    let (gateway, addr) = gateway(&text).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(ws_connect(addr, "/ws").await);
    }
    let started = Instant::now();
    let shutdown = tokio::spawn(async move {
        gateway.shutdown().await;
        Instant::now()
    });
    // Each client waits for its Close on its own, so the arrival times are the true ones.
    let waiters: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let close = loop {
                    match within("the Close frame", ws.next()).await {
                        Some(Ok(Message::Close(frame))) => break frame,
                        Some(Ok(_)) => continue,
                        other => panic!("expected a Close frame, got {other:?}"),
                    }
                };
                (Instant::now(), close.expect("a close code"))
            })
        })
        .collect();
    let mut arrivals = Vec::new();
    for waiter in waiters {
        let (at, close) = within("a client", waiter).await.expect("client task");
        assert_eq!(u16::from(close.code), 1001);
        assert_eq!(close.reason.as_str(), "going away");
        arrivals.push(at - started);
    }
    arrivals.sort();
    // Each Close at a random moment within close_spread (paused time: exactly then)...
    let last = *arrivals.last().expect("arrivals");
    assert!(
        last <= close_spread + TICK,
        "a Close came after the spread: {arrivals:?}"
    );
    // ...uniform over 300 ms: 20 closes all within 100 ms of each other would be a (1/3)^19 fluke.
    assert!(
        last - arrivals[0] > Duration::from_millis(100),
        "closes were not spread: {arrivals:?}"
    );
    // Every client answers its Close at once, so shutdown is over with the last one, long before the drain
    // timeout.
    let finished = within("shutdown", shutdown).await.expect("shutdown task");
    assert_at("the end of the shutdown", finished - started, last);
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// A fresh folder under the system's temp folder.
fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "wsgate-test-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[cfg(unix)]
#[tokio::test]
async fn the_binary_reloads_on_sighup_and_drains_on_sigterm() {
    use std::process::Stdio;
    let backend = TestBackend::start("b1").await;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        probe.local_addr().expect("addr").port()
    };
    let dir = tempdir();
    let path = dir.join("wsgate.toml");
    let config =
        config_text(&[backend.addr], "").replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let only_api = config.replace("path_prefix = \"/\"", "path_prefix = \"/api\"");
    std::fs::write(&path, &only_api).expect("write config");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["run", "--config"])
        .arg(&path)
        .args(["--threads", "1", "--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start wsgate");
    let pid = child.id().expect("pid").to_string();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "wsgate did not start listening");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        http_get(addr, "/ws").await.0,
        404,
        "before the reload only /api is routed"
    );

    std::fs::write(&path, &config).expect("write new config");
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + WAIT;
    while http_get(addr, "/ws").await.0 == 404 {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ws = ws_connect(addr, "/ws").await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let close = loop {
        match within("the Close frame", ws.next()).await {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a Close frame, got {other:?}"),
        }
    };
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1001));
    let exit = within("wsgate to exit", child.wait()).await.expect("wait");
    assert!(exit.success(), "exit status {exit:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every task the gateway starts is tracked and shutdown waits for them, so none may linger: not a pooled
/// backend connection left by a finished request, not a scraper's idle connection to the admin listener.
/// The drain timeout is long; shutdown must not need it, nor any other timer (paused time: it takes no
/// time at all).
#[tokio::test(start_paused = true)]
async fn shutdown_does_not_wait_for_pooled_backend_connections_or_idle_admin_clients() {
    let backend = TestBackend::start("b1").await;
    let text = config_text(&[backend.addr], "")
        + "\n[admin]\nlisten = \"127.0.0.1:0\"\n[timeouts]\ndrain = \"600s\"\n";
    let (gateway, addr) = gateway(&text).await;
    let admin = gateway.admin_addr().expect("admin listener");
    for _ in 0..3 {
        let (status, _, body) = http_get(addr, "/x").await;
        assert_eq!(status, 200);
        assert_eq!(body, "hello from b1");
    }
    let _idle_scraper = tcp_connect(admin).await;
    let started = Instant::now();
    within("shutdown", gateway.shutdown()).await;
    assert_at("the end of the shutdown", started.elapsed(), Duration::ZERO);
}
