//! Draining a backend: its tunnels get Close 1012 at random moments spread over `drain_spread` (the
//! backend 1001), clients that reconnect land on other backends, `"0s"` closes at once and `"none"` lets
//! tunnels be; an undrain cancels the closes still to come; a reload that removes a backend drains it;
//! idle keep-alive connections to it close. And the admin API that drives it: bearer tokens, the allow
//! list, drain and undrain, reload.
//!
//! Spread tests run in paused time (`#[tokio::test(start_paused = true)]`): the moments are exact.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;
use crate::tunnel_support::*;
use wsgate::{Config, Gateway};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// A fresh folder with a token file `ops:TOKEN`; returns the folder and the file.
fn token_file() -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "wsgate-drain-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("tokens");
    std::fs::write(&file, format!("# test\nops:{TOKEN}\n")).expect("token file");
    (dir, file)
}

/// One listener and route `main` (no keepalive pings, a long idle timeout: silence is silence) to pool
/// `p` with `backends` (TOML entries) and `pool_extra`, an admin listener with `admin_extra`.
fn config(backends: &[String], pool_extra: &str, admin_extra: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"
{admin_extra}

[[listener]]
name = "main"
listen = "127.0.0.1:0"

[[route]]
name = "main"
path_prefix = "/"
pool = "p"
websocket = {{ ping_interval = "0s", idle_timeout = "3h" }}

[pool.p]
{pool_extra}
backends = [ {} ]
"#,
        backends.join(", ")
    )
}

fn entry(addr: SocketAddr) -> String {
    format!("{{ addr = \"{addr}\" }}")
}

fn with_token(file: &std::path::Path) -> String {
    format!("token_file = \"{}\"", file.display())
}

/// `POST path` to the admin listener with `token` (if any): the status and the JSON body.
async fn post(
    admin: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> (StatusCode, serde_json::Value) {
    let mut request = Request::post(path).header(header::HOST, admin.to_string());
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let response = http_send(admin, request).await;
    let status = response.status();
    let body = within("the admin answer", response.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, json)
}

async fn status(admin: SocketAddr) -> serde_json::Value {
    let (code, _, body) = http_get(admin, "/status").await;
    assert_eq!(code, 200);
    serde_json::from_slice(&body).expect("status JSON")
}

/// The live tunnels of the backend at `addr`.
fn tunnels(gateway: &Gateway, addr: SocketAddr) -> usize {
    gateway
        .backends()
        .iter()
        .find(|b| b.addr == addr.to_string())
        .map_or(0, |b| b.tunnels)
}

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(TICK).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_drained_backend_moves_its_clients_to_the_others_spread_over_the_window() {
    const CLIENTS: usize = 20;
    let spread = Duration::from_secs(10);
    let (b1, b2) = (
        TestBackend::start("b1").await,
        TestBackend::start("b2").await,
    );
    let (dir, tokens) = token_file();
    let text =
        |backends: &[String]| config(backends, "drain_spread = \"10s\"", &with_token(&tokens));
    let (gateway, addr) = gateway(&text(&[entry(b1.addr)])).await;
    let admin = gateway.admin_addr().expect("admin");
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(ws_connect(addr, "/ws").await);
    }
    assert_eq!(tunnels(&gateway, b1.addr), CLIENTS);
    // A second backend comes; the first keeps its tunnels over the reload.
    let config =
        Config::from_toml(&text(&[entry(b1.addr), entry(b2.addr)]), "t.toml").expect("config");
    gateway.reload(config).await.expect("reload");

    let id = b1.addr.to_string().replace(':', "%3A");
    let started = Instant::now();
    let (code, answer) = post(admin, &format!("/pools/p/backends/{id}/drain"), Some(TOKEN)).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["state"], "draining");
    assert_eq!(answer["drain"]["causes"], serde_json::json!(["admin"]));
    assert_eq!(answer["drain"]["by"], "ops");
    assert_eq!(answer["drain"]["spread_ms"], 10_000);
    // Each client waits for its Close on its own, so the arrival times are the true ones, then comes back.
    let waiters: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let close = loop {
                    match within("the Close frame", ws.next()).await {
                        Some(Ok(Message::Close(frame))) => break frame.expect("a close code"),
                        Some(Ok(_)) => continue,
                        other => panic!("expected a Close frame, got {other:?}"),
                    }
                };
                let at = Instant::now();
                let mut again = ws_connect(addr, "/ws").await;
                again.send(Message::text("back")).await.expect("send");
                assert_eq!(next_message(&mut again).await, Message::text("back"));
                (at, close, again)
            })
        })
        .collect();
    let mut arrivals = Vec::new();
    let mut reconnected = Vec::new();
    for waiter in waiters {
        let (at, close, again) = within("a client", waiter).await.expect("client task");
        assert_eq!(u16::from(close.code), 1012);
        assert_eq!(close.reason.as_str(), "service restart");
        arrivals.push(at - started);
        reconnected.push(again);
    }
    arrivals.sort();
    let last = *arrivals.last().expect("arrivals");
    assert!(
        last <= spread + TICK,
        "a Close came after the window: {arrivals:?}"
    );
    // Uniform over 10 s: more than half of 20 in the first second would be a fluke far below 1e-6.
    let first_second = arrivals
        .iter()
        .filter(|a| **a <= Duration::from_secs(1))
        .count();
    assert!(first_second <= CLIENTS / 2, "not spread: {arrivals:?}");
    assert!(
        last - arrivals[0] >= Duration::from_secs(3),
        "not spread: {arrivals:?}"
    );
    // Every reconnect landed on the other backend.
    until("the tunnels to move", || {
        tunnels(&gateway, b2.addr) == CLIENTS
    })
    .await;
    // The old tunnels end once their close handshakes are done (within close_timeout).
    until("the drained backend's tunnels to end", || {
        tunnels(&gateway, b1.addr) == 0
    })
    .await;
    let metrics = gateway.metrics_text();
    assert!(
        metrics.contains(&format!(
            "wsgate_ws_closes_total{{protocol=\"h1\",reason=\"backend_drain\",route=\"main\"}} {CLIENTS}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "wsgate_backend_draining{{backend=\"{}\",pool=\"p\"}} 1",
        b1.addr
    )));
    drop(reconnected);
    gateway.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(start_paused = true)]
async fn the_backend_gets_going_away_and_zero_spread_closes_at_once() {
    let backend = WsBackend::bind().await;
    let other = TestBackend::start("other").await;
    let (dir, tokens) = token_file();
    let text = config(
        &[
            entry(backend.addr),
            format!("{{ addr = \"{}\", drain = true }}", other.addr),
        ],
        "drain_spread = \"0s\"",
        &with_token(&tokens),
    );
    let (gateway, addr) = gateway(&text).await;
    let admin = gateway.admin_addr().expect("admin");
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    let started = Instant::now();
    let path = format!("/pools/p/backends/{}/drain", backend.addr);
    let (code, answer) = post(admin, &path, Some(TOKEN)).await;
    assert_eq!(code, 200, "{answer}");
    let to_client = client.next_frame().await;
    assert_eq!(to_client.close(), (1012, "service restart".to_string()));
    assert_at("the Close", started.elapsed(), Duration::ZERO);
    let to_backend = server.next_frame().await;
    assert_eq!(to_backend.close(), (1001, "going away".to_string()));
    gateway.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(start_paused = true)]
async fn spread_none_lets_tunnels_be_and_a_later_drain_or_undrain_changes_their_fate() {
    let backend = WsBackend::bind().await;
    let (dir, tokens) = token_file();
    let text = config(
        &[entry(backend.addr)],
        "drain_spread = \"none\"",
        &with_token(&tokens),
    );
    let (gateway, addr) = gateway(&text).await;
    let admin = gateway.admin_addr().expect("admin");
    let path = |action: &str| format!("/pools/p/backends/{}/{action}", backend.addr);
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    // The pool's spread: none. The tunnel stays; new connections are refused (no other backend).
    assert_eq!(post(admin, &path("drain"), Some(TOKEN)).await.0, 200);
    client.expect_silence(Duration::from_secs(120)).await;
    let refused = raw_exchange(addr, upgrade_request(addr, "/ws", "").as_bytes()).await;
    assert_eq!(refused.status, 503);
    // An operator's drain with a spread: the tunnel now closes within it (an hour: its moment is, but
    // for a one-in-a-million draw, past the next steps)...
    let spread = format!("{}?spread=1h", path("drain"));
    assert_eq!(post(admin, &spread, Some(TOKEN)).await.0, 200);
    // ...and an undrain before that moment cancels the close.
    let (code, answer) = post(admin, &path("undrain"), Some(TOKEN)).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["state"], "up");
    assert_eq!(answer["drain"], serde_json::Value::Null);
    client.expect_silence(Duration::from_secs(7200)).await;
    server.expect_silence(Duration::from_millis(1)).await;
    // Draining again at once closes at once.
    assert_eq!(
        post(admin, &format!("{}?spread=0s", path("drain")), Some(TOKEN))
            .await
            .0,
        200
    );
    assert_eq!(client.next_frame().await.close().0, 1012);
    gateway.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(start_paused = true)]
async fn a_backend_a_reload_removes_drains_and_a_config_drain_follows_the_pool_spread() {
    let (gone, kept) = (WsBackend::bind().await, TestBackend::start("kept").await);
    let text = |backends: &[String]| config(backends, "drain_spread = \"2s\"", "");
    let (gateway, addr) = gateway(&text(&[
        entry(gone.addr),
        format!("{{ addr = \"{}\", drain = true }}", kept.addr),
    ]))
    .await;
    let (mut client, mut server) = raw_pair(addr, &gone).await;
    let started = Instant::now();
    let config = Config::from_toml(&text(&[entry(kept.addr)]), "t.toml").expect("config");
    gateway.reload(config).await.expect("reload");
    let close = client
        .frame_before(started + Duration::from_secs(2) + TICK)
        .await;
    assert_eq!(close.expect("a Close within the spread").close().0, 1012);
    assert_eq!(server.next_frame().await.close().0, 1001);
    // `drain = true` for a backend without tunnels: no new ones go to it... and its removal from the
    // config ends that cause: `kept` is back in service.
    let fresh = ws_connect(addr, "/ws").await;
    assert_eq!(tunnels(&gateway, kept.addr), 1);
    drop(fresh);
    gateway.shutdown().await;
}

#[tokio::test]
async fn idle_keep_alive_connections_to_a_drained_backend_are_closed() {
    let closed = Arc::new(AtomicUsize::new(0));
    let seen_closed = Arc::clone(&closed);
    let drained = RawBackend::start(move |stream| {
        let closed = Arc::clone(&seen_closed);
        async move {
            let service = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(backend_body("drained")))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            closed.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    let (dir, tokens) = token_file();
    let text = config(&[entry(drained.addr)], "", &with_token(&tokens));
    let (gateway, addr) = gateway(&text).await;
    let admin = gateway.admin_addr().expect("admin");
    let (code, _, body) = http_get(addr, "/").await;
    assert_eq!((code, &body[..]), (StatusCode::OK, &b"drained"[..]));
    assert_eq!(drained.accepts(), 1);
    assert_eq!(closed.load(Ordering::SeqCst), 0, "pooled, idle");
    let path = format!("/pools/p/backends/{}/drain", drained.addr);
    assert_eq!(post(admin, &path, Some(TOKEN)).await.0, 200);
    until("the idle connection to close", || {
        closed.load(Ordering::SeqCst) == 1
    })
    .await;
    gateway.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_admin_api_needs_a_token_and_an_allowed_peer() {
    let (b1, b2) = (
        TestBackend::start("b1").await,
        TestBackend::start("b2").await,
    );
    let backends = [
        entry(b1.addr),
        format!("{{ addr = \"{}\", drain = true }}", b2.addr),
    ];
    // Without a token file the write endpoints are off.
    let (gw, _) = gateway(&config(&backends, "", "")).await;
    let admin = gw.admin_addr().expect("admin");
    let (code, answer) = post(admin, "/reload", Some(TOKEN)).await;
    assert_eq!(code, 403, "{answer}");
    assert_eq!(status(admin).await["write_api"], false);
    gw.shutdown().await;

    let (dir, tokens) = token_file();
    let (gw, _) = gateway(&config(&backends, "", &with_token(&tokens))).await;
    let admin = gw.admin_addr().expect("admin");
    let drain = format!("/pools/p/backends/{}/drain", b1.addr);
    for token in [
        None,
        Some(""),
        Some("wrong-token-wrong-token"),
        Some(&TOKEN[1..]),
    ] {
        let mut request = Request::post(&drain).header(header::HOST, admin.to_string());
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request");
        let response = http_send(admin, request).await;
        assert_eq!(response.status(), 401, "{token:?}");
        assert_eq!(
            response.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"wsgate\""
        );
    }
    assert_eq!(
        status(admin).await["pools"][0]["backends"][0]["state"],
        "up"
    );
    assert_eq!(
        post(admin, "/pools/nope/backends/x/drain", Some(TOKEN))
            .await
            .0,
        404
    );
    assert_eq!(
        post(admin, "/pools/p/backends/nope/drain", Some(TOKEN))
            .await
            .0,
        404
    );
    assert_eq!(
        post(admin, &format!("{drain}?spread=soon"), Some(TOKEN))
            .await
            .0,
        400
    );
    assert_eq!(
        post(admin, "/pools/p/backends/x/explode", Some(TOKEN))
            .await
            .0,
        404
    );
    // A backend drained by the config stays drained whatever an operator undoes.
    let undrain_b2 = format!("/pools/p/backends/{}/undrain", b2.addr);
    let (code, answer) = post(admin, &undrain_b2, Some(TOKEN)).await;
    assert_eq!(code, 409, "{answer}");
    assert_eq!(answer["drain"]["causes"], serde_json::json!(["config"]));
    // An admin drain survives a reload of the same file, until undrain.
    let (code, answer) = post(admin, &format!("{drain}?spread=none"), Some(TOKEN)).await;
    assert_eq!(
        (code, &answer["drain"]["spread_ms"]),
        (StatusCode::OK, &serde_json::Value::Null)
    );
    gw.reload(
        Config::from_toml(&config(&backends, "", &with_token(&tokens)), "t.toml").expect("config"),
    )
    .await
    .expect("reload");
    let after = status(admin).await;
    assert_eq!(
        after["pools"][0]["backends"][0]["drain"]["causes"],
        serde_json::json!(["admin"])
    );
    assert_eq!(after["generation"], 2);
    assert_eq!(after["last_reload"]["trigger"], "api");
    let undrain = format!("/pools/p/backends/{}/undrain", b1.addr);
    assert_eq!(post(admin, &undrain, Some(TOKEN)).await.0, 200);
    gw.shutdown().await;

    // Peers in `admin.allow` are served (the scheme's case does not matter)...
    let allow = |nets: &str| {
        let admin_keys = format!("{}\nallow = [\"{nets}\"]", with_token(&tokens));
        config(&backends, "", &admin_keys)
    };
    let (gw, _) = gateway(&allow("127.0.0.0/8")).await;
    let admin = gw.admin_addr().expect("admin");
    assert_eq!(http_get(admin, "/status").await.0, 200);
    let request = Request::post(&drain)
        .header(header::HOST, admin.to_string())
        .header(header::AUTHORIZATION, format!("bEaReR {TOKEN}"))
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    assert_eq!(http_send(admin, request).await.status(), 200);
    gw.shutdown().await;
    // ...peers outside it get nothing but the probes.
    let (gw, _) = gateway(&allow("10.0.0.0/8")).await;
    let admin = gw.admin_addr().expect("admin");
    for path in ["/status", "/metrics", "/"] {
        assert_eq!(http_get(admin, path).await.0, 403, "{path}");
    }
    assert_eq!(post(admin, &drain, Some(TOKEN)).await.0, 403);
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn post_reload_rereads_the_file_and_answers_with_the_check() {
    let backend = TestBackend::start("b1").await;
    let (dir, tokens) = token_file();
    let file = dir.join("wsgate.toml");
    let good = config(&[entry(backend.addr)], "", &with_token(&tokens));
    std::fs::write(&file, &good).expect("config file");
    let gateway = Gateway::start(Config::from_file(&file).expect("config"))
        .await
        .expect("start");
    let admin = gateway.admin_addr().expect("admin");
    let (code, answer) = post(admin, "/reload", Some(TOKEN)).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer, serde_json::json!({ "ok": true, "generation": 2 }));
    std::fs::write(
        &file,
        good.replace("drain_spread", "x")
            .replace("[pool.p]", "[pool.p]\nweight = 3"),
    )
    .expect("write");
    let (code, answer) = post(admin, "/reload", Some(TOKEN)).await;
    assert_eq!(code, 422, "{answer}");
    let error = answer["error"].as_str().expect("error text");
    assert!(
        error.contains("wsgate.toml:") && error.contains("weight"),
        "{error}"
    );
    let now = status(admin).await;
    assert_eq!(now["generation"], 2);
    assert_eq!(now["last_reload"]["ok"], false);
    assert_eq!(now["last_reload"]["trigger"], "admin");
    // A token file gone bad fails the reload too; the running tokens stay.
    std::fs::write(&file, &good).expect("write");
    std::fs::write(&tokens, "ops:short\n").expect("write");
    let (code, answer) = post(admin, "/reload", Some(TOKEN)).await;
    assert_eq!(code, 422, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .expect("error")
            .contains("admin.token_file"),
        "{answer}"
    );
    gateway.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}
