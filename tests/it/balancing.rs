//! Balancing through real sockets (docs/ARCHITECTURE.md, "Balancing and health"): sticky keys agree across independent instances and move
//! minimally when backends come and go, weights split keys, least-connections lets a restarted backend
//! catch up, active and passive health take backends out and back, draining keeps live tunnels, and the
//! sticky cookie carries the right flags.
//!
//! Backends here are `Server`s: HTTP answers with the server's name (`/healthz` answers 200 or 503 at the
//! test's command), a WebSocket gets the server's name as its first message and then an echo, and `kill`
//! drops every connection at once, like a crashed process.
//!
//! Tests of the active checks' timing run in paused time, `#[tokio::test(start_paused = true)]`, as the
//! tunnel's timer tests do (`tunnel.rs`): the checks' rounds come exactly every `interval` from the
//! gateway's start, so when a backend goes down or comes back is checked to the millisecond (`assert_at`).
//! Passive ejection's `fail_timeout` runs on the real clock (`std::time::Instant`), which paused time does
//! not move.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::{self, TICK, WAIT, assert_at, within};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use wsgate::{BackendStatus, Config, Gateway};

// ---------------------------------------------------------------------------------------------------------
// Backends

/// A backend server on 127.0.0.1 that can fail its health check, count its live WebSockets, and crash.
struct Server {
    name: String,
    addr: SocketAddr,
    healthy: Arc<AtomicBool>,
    live: Arc<AtomicUsize>,
    stop: CancellationToken,
}

type ServerBody = BoxBody<Bytes, hyper::Error>;

impl Server {
    async fn start(name: &str) -> Server {
        Server::start_on(name, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Binds `addr` (address reuse on, so a restarted server gets its old port back).
    async fn start_on(name: &str, addr: SocketAddr) -> Server {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("reuseaddr");
        socket.bind(addr).expect("bind backend");
        let listener = socket.listen(1024).expect("listen");
        let addr = listener.local_addr().expect("backend addr");
        let server = Server {
            name: name.to_string(),
            addr,
            healthy: Arc::new(AtomicBool::new(true)),
            live: Arc::new(AtomicUsize::new(0)),
            stop: CancellationToken::new(),
        };
        let (name, healthy, live, stop) = (
            server.name.clone(),
            Arc::clone(&server.healthy),
            Arc::clone(&server.live),
            server.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        // Nagle off, as on every test socket (`common::tcp_connect`).
                        Ok((stream, _)) => {
                            let _ = stream.set_nodelay(true);
                            stream
                        }
                        Err(_) => return,
                    },
                    _ = stop.cancelled() => return,
                };
                let (name, healthy, live, stop) = (
                    name.clone(),
                    Arc::clone(&healthy),
                    Arc::clone(&live),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    let stop2 = stop.clone();
                    let service = service_fn(move |req| {
                        serve(
                            req,
                            name.clone(),
                            Arc::clone(&healthy),
                            Arc::clone(&live),
                            stop2.clone(),
                        )
                    });
                    let connection = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    tokio::select! {
                        _ = connection => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        server
    }

    /// Drops the listener and every connection, like a crash.
    fn kill(&self) {
        self.stop.cancel();
    }

    fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// `{ addr = "..." }` plus `extra` fields.
    fn entry(&self, extra: &str) -> String {
        if extra.is_empty() {
            format!("{{ addr = \"{}\" }}", self.addr)
        } else {
            format!("{{ addr = \"{}\", {extra} }}", self.addr)
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn full(text: impl Into<Bytes>) -> ServerBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

async fn serve(
    mut req: Request<Incoming>,
    name: String,
    healthy: Arc<AtomicBool>,
    live: Arc<AtomicUsize>,
    stop: CancellationToken,
) -> Result<Response<ServerBody>, std::convert::Infallible> {
    if let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            live.fetch_add(1, Ordering::Relaxed);
            let mut ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            let echo = async {
                ws.send(Message::text(name)).await?;
                while let Some(message) = ws.next().await {
                    let message = message?;
                    if message.is_text() || message.is_binary() {
                        ws.send(message).await?;
                    }
                }
                Ok::<(), tungstenite::Error>(())
            };
            tokio::select! {
                _ = echo => {}
                _ = stop.cancelled() => {}
            }
            live.fetch_sub(1, Ordering::Relaxed);
        });
        return Ok(common::switching_protocols(&key));
    }
    if req.uri().path() == "/healthz" {
        let mut response = Response::new(full("health"));
        if !healthy.load(Ordering::Relaxed) {
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        }
        return Ok(response);
    }
    Ok(Response::new(full(name)))
}

/// An address on which nothing listens: connecting is refused.
fn refusing_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

// ---------------------------------------------------------------------------------------------------------
// Gateways

/// Config text: listener `main` on port 0, an admin listener, one route per `(path_prefix, pool)`, and the
/// pool tables as given.
fn config_text(routes: &[(&str, &str)], pools: &str) -> String {
    let mut text = String::from(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n\n",
    );
    for (i, (prefix, pool)) in routes.iter().enumerate() {
        text.push_str(&format!(
            "[[route]]\nname = \"r{i}\"\npath_prefix = \"{prefix}\"\npool = \"{pool}\"\n\n"
        ));
    }
    text.push_str(pools);
    text
}

fn parse(text: &str) -> Config {
    Config::from_toml(text, "test.toml").unwrap_or_else(|e| panic!("config:\n{e}\n---\n{text}"))
}

async fn start(text: &str) -> (Gateway, SocketAddr) {
    let gateway = within("gateway start", Gateway::start(parse(text)))
        .await
        .expect("gateway starts");
    let addr = gateway.listener_addr("main").expect("listener main");
    (gateway, addr)
}

fn backend_status(gateway: &Gateway, addr: SocketAddr) -> BackendStatus {
    let addr = addr.to_string();
    gateway
        .backends()
        .into_iter()
        .find(|b| b.addr == addr)
        .unwrap_or_else(|| panic!("no backend {addr} in the gateway"))
}

/// Polls `condition` every millisecond (`TICK`) until it holds; panics after `WAIT`. Returns when it held
/// (in paused time: within a tick of the moment it came true).
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) -> Instant {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < WAIT, "timed out waiting until {what}");
        tokio::time::sleep(TICK).await;
    }
    Instant::now()
}

// ---------------------------------------------------------------------------------------------------------
// Clients

/// One keep-alive HTTP/1.1 connection.
struct HttpClient(SendRequest<Empty<Bytes>>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    status: StatusCode,
    /// The body: the backend's name for a proxied request.
    body: String,
    set_cookie: Option<String>,
}

impl HttpClient {
    async fn connect(addr: SocketAddr) -> HttpClient {
        let stream = common::tcp_connect(addr).await;
        let (sender, connection) = within(
            "client handshake",
            hyper::client::conn::http1::handshake(TokioIo::new(stream)),
        )
        .await
        .expect("client handshake");
        tokio::spawn(connection);
        HttpClient(sender)
    }

    async fn get(&mut self, path: &str, headers: &[(String, String)]) -> Reply {
        let mut request = Request::get(path)
            .header(header::HOST, "gateway.test")
            .body(Empty::new())
            .expect("request");
        for (name, value) in headers {
            request.headers_mut().append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                value.parse().expect("value"),
            );
        }
        within("ready", self.0.ready())
            .await
            .expect("connection ready");
        let response = within("response", self.0.send_request(request))
            .await
            .expect("response");
        let status = response.status();
        let set_cookie = response
            .headers()
            .get(header::SET_COOKIE)
            .map(|v| v.to_str().expect("ascii cookie").to_string());
        let body = within("body", response.into_body().collect())
            .await
            .expect("body")
            .to_bytes();
        Reply {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
            set_cookie,
        }
    }
}

/// Sends one GET per entry of `requests` (its extra headers) over 8 keep-alive connections at once and
/// returns the replies in order.
async fn get_all(addr: SocketAddr, path: &str, requests: &[Vec<(String, String)>]) -> Vec<Reply> {
    const LANES: usize = 8;
    let requests = Arc::new(requests.to_vec());
    let mut lanes = Vec::new();
    for lane in 0..LANES {
        let (requests, path) = (Arc::clone(&requests), path.to_string());
        lanes.push(tokio::spawn(async move {
            let mut client = HttpClient::connect(addr).await;
            let mut out = Vec::new();
            for i in (lane..requests.len()).step_by(LANES) {
                out.push((i, client.get(&path, &requests[i]).await));
            }
            out
        }));
    }
    let mut replies: Vec<Option<Reply>> = vec![None; requests.len()];
    for lane in lanes {
        for (i, reply) in lane.await.expect("lane") {
            replies[i] = Some(reply);
        }
    }
    replies
        .into_iter()
        .map(|r| r.expect("every request answered"))
        .collect()
}

fn header_keys(name: &str, keys: &[String]) -> Vec<Vec<(String, String)>> {
    keys.iter()
        .map(|k| vec![(name.to_string(), k.clone())])
        .collect()
}

fn cookie_keys(cookie: &str, values: &[String]) -> Vec<Vec<(String, String)>> {
    values
        .iter()
        .map(|v| vec![("cookie".to_string(), format!("{cookie}={v}"))])
        .collect()
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user-{i:05}")).collect()
}

/// Which backend answered each request (asserting each got a 200).
fn served_by(replies: &[Reply]) -> Vec<String> {
    replies
        .iter()
        .map(|r| {
            assert_eq!(r.status, StatusCode::OK, "a request failed: {r:?}");
            r.body.clone()
        })
        .collect()
}

/// The value of a `Set-Cookie` (`name=value; ...`).
fn cookie_value(set_cookie: &str) -> String {
    set_cookie
        .split(';')
        .next()
        .and_then(|pair| pair.split_once('='))
        .map(|(_, v)| v.to_string())
        .expect("name=value")
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket through the gateway; returns it, the serving backend's name (its first message) and
/// the 101's `Set-Cookie`.
async fn ws_open(addr: SocketAddr, headers: &[(&str, &str)]) -> (Ws, String, Option<String>) {
    let mut request = format!("ws://{addr}/ws")
        .into_client_request()
        .expect("request");
    for (name, value) in headers {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            value.parse().expect("value"),
        );
    }
    let (mut ws, response) = within(
        "websocket handshake",
        tokio_tungstenite::connect_async_with_config(request, None, true),
    )
    .await
    .expect("websocket handshake");
    let set_cookie = response
        .headers()
        .get(header::SET_COOKIE)
        .map(|v| v.to_str().expect("ascii").to_string());
    let name = match within("greeting", ws.next()).await {
        Some(Ok(Message::Text(name))) => name.to_string(),
        other => panic!("expected the backend's name, got {other:?}"),
    };
    (ws, name, set_cookie)
}

async fn echo_works(ws: &mut Ws) {
    within("send", ws.send(Message::text("ping?")))
        .await
        .expect("send");
    loop {
        match within("echo", ws.next()).await {
            Some(Ok(Message::Text(t))) => {
                assert_eq!(t.as_str(), "ping?");
                return;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected the echo, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Sticky

fn sticky_pools(servers: &[&Server]) -> String {
    let list: Vec<String> = servers.iter().map(|s| s.entry("")).collect();
    let list = list.join(", ");
    format!(
        "[pool.h]\npolicy = \"sticky\"\nsticky = {{ header = \"x-user-id\" }}\nbackends = [ {list} ]\n\n\
         [pool.c]\npolicy = \"sticky\"\nsticky = {{ cookie = \"wsg\" }}\nbackends = [ {list} ]\n"
    )
}

const STICKY_ROUTES: &[(&str, &str)] = &[("/h", "h"), ("/c", "c")];

#[tokio::test]
async fn every_key_lands_on_the_same_backend_through_two_independent_instances() {
    let servers = [
        Server::start("s0").await,
        Server::start("s1").await,
        Server::start("s2").await,
        Server::start("s3").await,
    ];
    let text = config_text(
        STICKY_ROUTES,
        &sticky_pools(&servers.iter().collect::<Vec<_>>()),
    );
    let (_one, addr_one) = start(&text).await;
    let (_two, addr_two) = start(&text).await;
    let keys = keys(1000);

    // Header keys.
    let requests = header_keys("x-user-id", &keys);
    let via_one = served_by(&get_all(addr_one, "/h", &requests).await);
    let via_two = served_by(&get_all(addr_two, "/h", &requests).await);
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(via_one[i], via_two[i], "key {key} went to two backends");
    }
    for s in &servers {
        let n = via_one.iter().filter(|b| **b == s.name).count();
        assert!((150..=350).contains(&n), "{} got {n} of 1000 keys", s.name);
    }
    // The same key again, through the first instance: still the same backend.
    let again = served_by(&get_all(addr_one, "/h", &requests).await);
    assert_eq!(again, via_one);

    // Cookies wsgate did not issue (say, from before a config change): both instances agree on the
    // backend and on the replacement cookie.
    let requests = cookie_keys("wsg", &keys);
    let replies_one = get_all(addr_one, "/c", &requests).await;
    let replies_two = get_all(addr_two, "/c", &requests).await;
    assert_eq!(served_by(&replies_one), served_by(&replies_two));
    for (a, b) in replies_one.iter().zip(&replies_two) {
        assert!(a.set_cookie.is_some(), "an unknown cookie must be replaced");
        assert_eq!(a.set_cookie, b.set_cookie);
    }

    // Real clients: no cookie at first, a cookie from one instance, then the other instance follows it.
    let fresh: Vec<Vec<(String, String)>> = vec![Vec::new(); 1000];
    let first = get_all(addr_one, "/c", &fresh).await;
    let tokens: Vec<String> = first
        .iter()
        .map(|r| {
            cookie_value(
                r.set_cookie
                    .as_deref()
                    .expect("a first visit gets a cookie"),
            )
        })
        .collect();
    let second = get_all(addr_two, "/c", &cookie_keys("wsg", &tokens)).await;
    assert_eq!(served_by(&first), served_by(&second));
    assert!(
        second.iter().all(|r| r.set_cookie.is_none()),
        "a cookie naming an available backend is not re-issued"
    );
}

#[tokio::test]
async fn removing_one_of_four_backends_remaps_only_the_keys_it_had() {
    let servers = [
        Server::start("s0").await,
        Server::start("s1").await,
        Server::start("s2").await,
        Server::start("s3").await,
    ];
    let all: Vec<&Server> = servers.iter().collect();
    let (gateway, addr) = start(&config_text(STICKY_ROUTES, &sticky_pools(&all))).await;
    let requests = header_keys("x-user-id", &keys(1000));
    let before = served_by(&get_all(addr, "/h", &requests).await);

    let without: Vec<&Server> = servers.iter().filter(|s| s.name != "s2").collect();
    within(
        "reload",
        gateway.reload(parse(&config_text(STICKY_ROUTES, &sticky_pools(&without)))),
    )
    .await
    .expect("reload");
    let after = served_by(&get_all(addr, "/h", &requests).await);

    let mut moved = 0;
    for (b, a) in before.iter().zip(&after) {
        if b == "s2" {
            assert_ne!(a, "s2");
            moved += 1;
        } else {
            assert_eq!(b, a, "a key moved although its backend stayed");
        }
    }
    assert!(moved > 150, "s2 had only {moved} keys");
}

#[tokio::test]
async fn adding_a_fifth_backend_moves_about_a_fifth_of_keys() {
    let servers = [
        Server::start("s0").await,
        Server::start("s1").await,
        Server::start("s2").await,
        Server::start("s3").await,
        Server::start("s4").await,
    ];
    let four: Vec<&Server> = servers.iter().take(4).collect();
    let five: Vec<&Server> = servers.iter().collect();
    let (_four_gw, four_addr) = start(&config_text(STICKY_ROUTES, &sticky_pools(&four))).await;
    let (_five_gw, five_addr) = start(&config_text(STICKY_ROUTES, &sticky_pools(&five))).await;
    let requests = header_keys("x-user-id", &keys(1000));
    let before = served_by(&get_all(four_addr, "/h", &requests).await);
    let after = served_by(&get_all(five_addr, "/h", &requests).await);
    let mut moved = 0;
    for (b, a) in before.iter().zip(&after) {
        if b != a {
            assert_eq!(a, "s4", "a key moved between two of the old backends");
            moved += 1;
        }
    }
    assert!(
        (150..=250).contains(&moved),
        "{moved} of 1000 keys moved (expected 15-25%)"
    );
}

#[tokio::test]
async fn weights_one_to_three_split_keys_25_to_75() {
    let light = Server::start("light").await;
    let heavy = Server::start("heavy").await;
    let pools = format!(
        "[pool.h]\npolicy = \"sticky\"\nsticky = {{ header = \"x-user-id\" }}\nbackends = [ {}, {} ]\n",
        light.entry("weight = 1"),
        heavy.entry("weight = 3")
    );
    let (_gateway, addr) = start(&config_text(&[("/h", "h")], &pools)).await;
    let served = served_by(&get_all(addr, "/h", &header_keys("x-user-id", &keys(4000))).await);
    let light_share = served.iter().filter(|b| *b == "light").count() as f64 / 4000.0;
    assert!(
        (0.20..=0.30).contains(&light_share),
        "weight 1 of 4 got {:.1}% of keys",
        light_share * 100.0
    );
}

#[tokio::test]
async fn query_and_client_ip_keys_are_sticky_and_trusted_forwarded_for_is_honoured() {
    let servers = [
        Server::start("s0").await,
        Server::start("s1").await,
        Server::start("s2").await,
    ];
    let list: Vec<String> = servers.iter().map(|s| s.entry("")).collect();
    let list = list.join(", ");
    let pools = format!(
        "[pool.q]\npolicy = \"sticky\"\nsticky = {{ query = \"room\" }}\nbackends = [ {list} ]\n\n\
         [pool.ip]\npolicy = \"sticky\"\nsticky = {{ source_ip = true, trusted_proxies = [\"127.0.0.1/32\"] }}\nbackends = [ {list} ]\n\n\
         [pool.untrusted]\npolicy = \"sticky\"\nsticky = {{ source_ip = true }}\nbackends = [ {list} ]\n"
    );
    let text = config_text(
        &[("/q", "q"), ("/ip", "ip"), ("/untrusted", "untrusted")],
        &pools,
    );
    let (_one, one) = start(&text).await;
    let (_two, two) = start(&text).await;
    let mut client_one = HttpClient::connect(one).await;
    let mut client_two = HttpClient::connect(two).await;

    let mut rooms = std::collections::HashSet::new();
    for room in 0..60 {
        let path = format!("/q?x=1&room={room}");
        let a = client_one.get(&path, &[]).await;
        let b = client_two.get(&path, &[]).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.body, b.body, "room {room} went to two backends");
        rooms.insert(a.body);
    }
    assert_eq!(rooms.len(), 3, "60 rooms should use every backend");

    let mut by_ip = std::collections::HashSet::new();
    let mut untrusted = std::collections::HashSet::new();
    for n in 0..60 {
        let xff = vec![("x-forwarded-for".to_string(), format!("203.0.113.{n}"))];
        let a = client_one.get("/ip", &xff).await;
        let b = client_two.get("/ip", &xff).await;
        assert_eq!(a.body, b.body, "client 203.0.113.{n} went to two backends");
        by_ip.insert(a.body);
        untrusted.insert(client_one.get("/untrusted", &xff).await.body);
    }
    assert_eq!(
        by_ip.len(),
        3,
        "X-Forwarded-For from a trusted proxy is the key"
    );
    assert_eq!(
        untrusted.len(),
        1,
        "without trusted proxies the key is the peer (127.0.0.1) whatever X-Forwarded-For says"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Sticky cookies

#[tokio::test]
async fn sticky_cookie_is_issued_with_the_right_flags_on_http_and_upgrades() {
    let servers = [Server::start("s0").await, Server::start("s1").await];
    let all: Vec<&Server> = servers.iter().collect();
    let (_gateway, addr) = start(&config_text(&[("/", "c")], &sticky_pools(&all))).await;

    let mut client = HttpClient::connect(addr).await;
    let reply = client.get("/page", &[]).await;
    let cookie = reply.set_cookie.expect("a first visit gets a cookie");
    let token = cookie_value(&cookie);
    assert_eq!(
        cookie,
        format!("wsg={token}; Path=/; HttpOnly; SameSite=Lax")
    );
    assert_eq!(token.len(), 16);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    for s in &servers {
        assert!(!cookie.contains(&s.addr.port().to_string()) && !cookie.contains("127.0.0.1"));
    }
    // With the cookie: the same backend every time, and no new cookie.
    let with = vec![("cookie".to_string(), format!("other=1; wsg={token}"))];
    for _ in 0..10 {
        let again = client.get("/page", &with).await;
        assert_eq!(again.body, reply.body);
        assert_eq!(again.set_cookie, None);
    }

    // WebSocket: the 101 carries the cookie, and the cookie steers the upgrade.
    let (_ws, name, set_cookie) = ws_open(addr, &[]).await;
    let set_cookie = set_cookie.expect("the 101 carries the cookie");
    assert!(set_cookie.ends_with("; Path=/; HttpOnly; SameSite=Lax"));
    let ws_token = cookie_value(&set_cookie);
    for _ in 0..5 {
        let header = format!("wsg={ws_token}");
        let (_ws, again, set_cookie) = ws_open(addr, &[("cookie", &header)]).await;
        assert_eq!(again, name);
        assert_eq!(set_cookie, None);
    }
}

#[tokio::test]
async fn a_cookie_naming_an_unknown_or_down_or_draining_backend_is_replaced() {
    let servers = [
        Server::start("s0").await,
        Server::start("s1").await,
        Server::start("s2").await,
    ];
    let list: Vec<String> = servers.iter().map(|s| s.entry("")).collect();
    let pools = |list: &str| {
        format!(
            "[pool.c]\npolicy = \"sticky\"\nsticky = {{ cookie = \"wsg\" }}\n\
             health = {{ path = \"/healthz\", interval = \"50ms\", timeout = \"500ms\", rise = 1, fall = 1 }}\n\
             backends = [ {list} ]\n"
        )
    };
    let (gateway, addr) = start(&config_text(&[("/", "c")], &pools(&list.join(", ")))).await;
    let mut client = HttpClient::connect(addr).await;

    // Find each backend's token.
    let mut tokens = std::collections::HashMap::new();
    while tokens.len() < 3 {
        let reply = client.get("/", &[]).await;
        let cookie = reply.set_cookie.expect("cookie");
        tokens.insert(reply.body, cookie_value(&cookie));
    }
    let cookie_for = |name: &str| vec![("cookie".to_string(), format!("wsg={}", tokens[name]))];

    // Unknown cookie: replaced by one naming the backend that served.
    let unknown = vec![("cookie".to_string(), "wsg=0123456789abcdef".to_string())];
    let reply = client.get("/", &unknown).await;
    assert_eq!(reply.status, StatusCode::OK);
    let replacement = cookie_value(&reply.set_cookie.expect("replaced"));
    assert_eq!(replacement, tokens[&reply.body]);

    // Down: s1 fails its check; its clients move, and get a cookie for where they went.
    servers[1].set_healthy(false);
    wait_until("s1 is down", || {
        !backend_status(&gateway, servers[1].addr).available
    })
    .await;
    let reply = client.get("/", &cookie_for("s1")).await;
    assert_ne!(reply.body, "s1");
    assert_eq!(
        cookie_value(&reply.set_cookie.expect("re-issued")),
        tokens[&reply.body]
    );
    let header = format!("wsg={}", tokens["s1"]);
    let (_ws, name, set_cookie) = ws_open(addr, &[("cookie", &header)]).await;
    assert_ne!(name, "s1");
    assert_eq!(
        cookie_value(&set_cookie.expect("the 101 re-issues the cookie")),
        tokens[&name]
    );

    // Draining: s2 takes no new clients, even with its cookie.
    let drained = [
        servers[0].entry(""),
        servers[1].entry(""),
        servers[2].entry("drain = true"),
    ];
    within(
        "reload",
        gateway.reload(parse(&config_text(
            &[("/", "c")],
            &pools(&drained.join(", ")),
        ))),
    )
    .await
    .expect("reload");
    let reply = client.get("/", &cookie_for("s2")).await;
    assert_eq!(reply.body, "s0", "s1 is down and s2 draining");
    assert_eq!(
        cookie_value(&reply.set_cookie.expect("re-issued")),
        tokens["s0"]
    );

    // s1 recovers: its cookie works again, without a new one.
    servers[1].set_healthy(true);
    wait_until("s1 is up", || {
        backend_status(&gateway, servers[1].addr).available
    })
    .await;
    let reply = client.get("/", &cookie_for("s1")).await;
    assert_eq!(reply.body, "s1");
    assert_eq!(reply.set_cookie, None);
}

#[tokio::test]
async fn the_sticky_cookie_is_secure_on_a_tls_listener() {
    let backend = Server::start("s0").await;
    let dir = std::env::temp_dir().join(format!("wsgate-balancing-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    let text = format!(
        "[[listener]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n\
         tls = {{ certs = [ {{ cert = {:?}, key = {:?} }} ] }}\n\n\
         [[route]]\nname = \"r\"\npool = \"c\"\n\n\
         [pool.c]\npolicy = \"sticky\"\nsticky = {{ cookie = \"wsg\" }}\nbackends = [ {} ]\n",
        cert_path.display().to_string(),
        key_path.display().to_string(),
        backend.entry("")
    );
    let (_gateway, addr) = start(&text).await;

    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).expect("root");
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let tls = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let stream = within("tls handshake", connector.connect(name, tcp))
        .await
        .expect("tls handshake");
    let (mut sender, connection) = within(
        "client handshake",
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)),
    )
    .await
    .expect("http handshake");
    tokio::spawn(connection);
    let request = Request::get("/")
        .header(header::HOST, "localhost")
        .body(Empty::new())
        .expect("request");
    let response = within("response", sender.send_request(request))
        .await
        .expect("response");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(response.status(), StatusCode::OK);
    let cookie = response.headers()[header::SET_COOKIE]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(
        cookie.ends_with("; Path=/; HttpOnly; SameSite=Lax; Secure"),
        "{cookie}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Least-connections

#[tokio::test]
async fn least_conn_sends_new_connections_to_a_restarted_backend_until_it_catches_up() {
    let a = Server::start("a").await;
    let b = Server::start("b").await;
    let pools = format!(
        "[pool.p]\npolicy = \"least_conn\"\nbackends = [ {}, {} ]\n",
        a.entry(""),
        b.entry("")
    );
    let (gateway, addr) = start(&config_text(&[("/", "p")], &pools)).await;

    let mut clients = Vec::new();
    for _ in 0..100 {
        clients.push(ws_open(addr, &[]).await.0);
    }
    wait_until("100 tunnels", || a.live() + b.live() == 100).await;
    assert!(
        a.live().abs_diff(b.live()) <= 2,
        "{} / {}",
        a.live(),
        b.live()
    );
    let on_a = a.live();

    // b crashes: its tunnels end, and the gateway's count for it drops to zero.
    b.kill();
    wait_until("b's tunnels end", || {
        backend_status(&gateway, b.addr).active == 0
    })
    .await;
    let b = Server::start_on("b", b.addr).await;

    for _ in 0..100 {
        clients.push(ws_open(addr, &[]).await.0);
    }
    wait_until("the new tunnels", || a.live() + b.live() == on_a + 100).await;
    assert!(
        a.live().abs_diff(b.live()) <= 10,
        "after the restart: a has {}, b has {}",
        a.live(),
        b.live()
    );
    // The gateway's own counts agree with the backends'.
    assert_eq!(backend_status(&gateway, a.addr).active, a.live());
    assert_eq!(backend_status(&gateway, b.addr).active, b.live());
}

// ---------------------------------------------------------------------------------------------------------
// Health

#[tokio::test(start_paused = true)]
async fn a_backend_failing_its_active_check_stops_getting_connections_and_returns_after_rise_passes()
 {
    const INTERVAL: Duration = Duration::from_millis(100);
    const FALL: u32 = 2;
    const RISE: u32 = 2;
    let a = Server::start("a").await;
    let b = Server::start("b").await;
    let pools = format!(
        "[pool.p]\npolicy = \"least_conn\"\n\
         health = {{ path = \"/healthz\", interval = \"100ms\", timeout = \"500ms\", rise = {RISE}, fall = {FALL} }}\n\
         backends = [ {}, {} ]\n",
        a.entry(""),
        b.entry("")
    );
    let (gateway, addr) = start(&config_text(&[("/", "p")], &pools)).await;
    // The rounds of checks: at once, then every INTERVAL (paused time: nothing else takes any).
    let rounds = Instant::now();
    let mut client = HttpClient::connect(addr).await;

    // b fails between two rounds; the FALL rounds after it take b down.
    tokio::time::sleep_until(rounds + INTERVAL / 2).await;
    b.set_healthy(false);
    let down = wait_until("b is down", || !backend_status(&gateway, b.addr).available).await;
    assert_at("b going down", down - rounds, INTERVAL * FALL);
    for _ in 0..40 {
        assert_eq!(client.get("/", &[]).await.body, "a");
    }
    let mut tunnels = Vec::new();
    for _ in 0..10 {
        let (ws, name, _) = ws_open(addr, &[]).await;
        assert_eq!(name, "a");
        tunnels.push(ws);
    }
    let metrics = gateway.metrics_text();
    let b_up = format!("wsgate_backend_up{{backend=\"{}\",pool=\"p\"}} 0", b.addr);
    assert!(metrics.contains(&b_up), "metrics lack `{b_up}`");

    // b passes again between two rounds; the RISE rounds after it bring b back.
    let recovers = rounds + INTERVAL * FALL + INTERVAL / 2;
    assert!(Instant::now() < recovers, "the traffic above took time");
    tokio::time::sleep_until(recovers).await;
    b.set_healthy(true);
    let up = wait_until("b is up", || backend_status(&gateway, b.addr).available).await;
    assert_at("b coming back", up - rounds, INTERVAL * (FALL + RISE));
    // b has fewer live connections (none): least-connections sends it the next ones.
    let mut saw_b = false;
    for _ in 0..20 {
        saw_b |= client.get("/", &[]).await.body == "b";
    }
    assert!(saw_b, "b gets requests again");
    let (_ws, name, _) = ws_open(addr, &[]).await;
    assert_eq!(name, "b", "a holds 10 tunnels, b none");
}

#[tokio::test]
async fn a_backend_refusing_connections_is_ejected_passively_and_clients_never_see_it() {
    let a = Server::start("a").await;
    let b = Server::start("b").await;
    let dead = refusing_addr();
    let list = format!("{}, {}, {{ addr = \"{dead}\" }}", a.entry(""), b.entry(""));
    let pools = format!(
        "[pool.p]\npolicy = \"least_conn\"\nmax_fails = 2\nfail_timeout = \"1h\"\nbackends = [ {list} ]\n\n\
         [pool.ws]\npolicy = \"least_conn\"\nmax_fails = 2\nfail_timeout = \"1h\"\nbackends = [ {list} ]\n\n\
         [pool.h]\npolicy = \"sticky\"\nsticky = {{ header = \"x-user-id\" }}\nmax_fails = 2\nfail_timeout = \"1h\"\n\
         backends = [ {list} ]\n"
    );
    let text = config_text(&[("/p", "p"), ("/ws", "ws"), ("/h", "h")], &pools);

    // HTTP, least_conn.
    let (gateway, addr) = start(&text).await;
    let mut client = HttpClient::connect(addr).await;
    for _ in 0..50 {
        let reply = client.get("/p", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }
    let status = |pool: &str| {
        gateway
            .backends()
            .into_iter()
            .find(|s| s.pool == pool && s.addr == dead.to_string())
            .expect("dead backend listed")
    };
    assert!(status("p").ejected && !status("p").available);

    // WebSocket upgrades.
    for _ in 0..20 {
        let (mut ws, name, _) = ws_open(addr, &[]).await;
        assert!(name == "a" || name == "b");
        echo_works(&mut ws).await;
    }
    assert!(status("ws").ejected);

    // Sticky keys whose backend refuses: the next in hash order serves them.
    let served = served_by(&get_all(addr, "/h", &header_keys("x-user-id", &keys(200))).await);
    assert!(served.iter().all(|s| s == "a" || s == "b"));
    assert!(status("h").ejected);
    // ...and once it is ejected, they still go to the same fallback.
    let again = served_by(&get_all(addr, "/h", &header_keys("x-user-id", &keys(200))).await);
    assert_eq!(served, again);
}

#[tokio::test(start_paused = true)]
async fn a_pool_with_no_healthy_backend_answers_503_at_once_and_is_not_ready() {
    const INTERVAL: Duration = Duration::from_millis(50);
    let only = Server::start("only").await;
    only.set_healthy(false);
    let pools = format!(
        "[pool.p]\npolicy = \"least_conn\"\n\
         health = {{ path = \"/healthz\", interval = \"50ms\", timeout = \"500ms\", rise = 2, fall = 2 }}\n\
         backends = [ {} ]\n",
        only.entry("")
    );
    let (gateway, addr) = start(&config_text(&[("/", "p")], &pools)).await;
    let rounds = Instant::now();
    // A backend starts up; the rounds at once and one INTERVAL later fail (fall = 2).
    let down = wait_until("the only backend is down", || {
        !backend_status(&gateway, only.addr).available
    })
    .await;
    assert_at("the backend going down", down - rounds, INTERVAL);

    // No backend to try: the answers come before any timer (connect, backend response) could run.
    let mut client = HttpClient::connect(addr).await;
    let asked = Instant::now();
    let reply = client.get("/", &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_at("the 503", asked.elapsed(), Duration::ZERO);

    let request = format!("ws://{addr}/ws")
        .into_client_request()
        .expect("request");
    let asked = Instant::now();
    match within(
        "upgrade",
        tokio_tungstenite::connect_async_with_config(request, None, true),
    )
    .await
    {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE)
        }
        other => panic!("expected 503, got {:?}", other.map(|(_, r)| r.status())),
    }
    assert_at("the upgrade's 503", asked.elapsed(), Duration::ZERO);

    // The admin listener closes its connections after each answer.
    let admin = gateway.admin_addr().expect("admin listener");
    let ready = HttpClient::connect(admin).await.get("/readyz", &[]).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "{ready:?}");

    // Healthy again between two rounds (at 75 ms): the rounds at 100 and 150 ms pass (rise = 2).
    let recovers = rounds + INTERVAL + INTERVAL / 2;
    assert!(Instant::now() < recovers, "the requests above took time");
    tokio::time::sleep_until(recovers).await;
    only.set_healthy(true);
    let up = wait_until("the backend is back", || {
        backend_status(&gateway, only.addr).available
    })
    .await;
    assert_at("the backend coming back", up - rounds, INTERVAL * 3);
    assert_eq!(client.get("/", &[]).await.body, "only");
    let ready = HttpClient::connect(admin).await.get("/readyz", &[]).await;
    assert_eq!(ready.status, StatusCode::OK, "{ready:?}");
}

// ---------------------------------------------------------------------------------------------------------
// Draining

#[tokio::test]
async fn draining_or_removing_a_backend_stops_new_connections_but_keeps_its_tunnels() {
    let a = Server::start("a").await;
    let b = Server::start("b").await;
    let pools = |b_entry: Option<String>| {
        let mut list = vec![a.entry("")];
        list.extend(b_entry);
        format!(
            "[pool.p]\npolicy = \"least_conn\"\nbackends = [ {} ]\n",
            list.join(", ")
        )
    };
    let (gateway, addr) = start(&config_text(&[("/", "p")], &pools(Some(b.entry(""))))).await;

    // One tunnel on each backend.
    let (mut first, first_name, _) = ws_open(addr, &[]).await;
    let (mut second, second_name, _) = ws_open(addr, &[]).await;
    assert_ne!(first_name, second_name);
    let on_b = if first_name == "b" {
        &mut first
    } else {
        &mut second
    };

    within(
        "reload",
        gateway.reload(parse(&config_text(
            &[("/", "p")],
            &pools(Some(b.entry("drain = true"))),
        ))),
    )
    .await
    .expect("reload with drain");
    for _ in 0..10 {
        assert_eq!(ws_open(addr, &[]).await.1, "a");
    }
    echo_works(on_b).await;

    within(
        "reload",
        gateway.reload(parse(&config_text(&[("/", "p")], &pools(None)))),
    )
    .await
    .expect("reload without b");
    for _ in 0..10 {
        assert_eq!(ws_open(addr, &[]).await.1, "a");
    }
    echo_works(on_b).await;
    assert_eq!(b.live(), 1, "b's tunnel lives on after b left the config");
}
