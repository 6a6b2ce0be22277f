//! The per-worker runtime model: a gateway started with `Gateway::start_on` and two worker runtimes, each
//! a current-thread runtime on a thread the test starts (as the binary's `--runtime per-worker` does),
//! every listener bound once on each with SO_REUSEPORT. Which worker took a connection is read from
//! `wsgate_worker_connections_accepted_total{listener, worker}`: the kernel spreads connections over the
//! sockets by a hash of their source ports, so a few dozen connections reach both workers (all of them
//! landing on one is a 2^-(n-1) fluke), and the tests assert it rather than assume it.
//!
//! Also here: `max_connections` as one limit over the sockets, reloads (sockets kept, added and stopped),
//! shutdown across the workers, and the binary's `--runtime` flag over the config's `runtime`.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use http::Response;
use tokio::io::AsyncReadExt;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use wsgate::{Config, Gateway, Workers};

/// Worker runtimes as the binary runs them: a current-thread runtime on a thread of its own each, kept
/// running until `stop`. Dropped without `stop` (a failing test), the threads end on their own.
struct WorkerThreads {
    handles: Vec<Handle>,
    threads: Vec<(oneshot::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl WorkerThreads {
    fn start(count: usize) -> WorkerThreads {
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for i in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("worker runtime");
            handles.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("test-worker-{i}"))
                .spawn(move || {
                    let _ = runtime.block_on(stopped);
                    // Dropped here, on its own thread and outside any async context.
                    drop(runtime);
                })
                .expect("worker thread");
            threads.push((stop, thread));
        }
        WorkerThreads { handles, threads }
    }

    fn workers(&self) -> Workers {
        Workers::new(self.handles.iter().cloned())
    }

    /// Ends every worker's runtime and joins its thread, within the tests' wait.
    async fn stop(self) {
        let joined = tokio::task::spawn_blocking(move || {
            for (stop, thread) in self.threads {
                drop(stop);
                thread.join().expect("a worker thread panicked");
            }
        });
        within("the worker threads to end", joined)
            .await
            .expect("join task");
    }
}

/// A listener `main` on port 0, `/ws` to the echo backend `ws`, everything else to the HTTP backend `http`;
/// `top` goes before the listener (top-level keys, `[timeouts]`, `[limits]`), `listeners` after it.
fn config(ws: SocketAddr, http: SocketAddr, top: &str, listeners: &str) -> Config {
    parse(&config_text_of(ws, http, top, listeners))
}

fn parse(text: &str) -> Config {
    Config::from_toml(text, "per-worker.toml").unwrap_or_else(|e| panic!("config:\n{e}\n{text}"))
}

fn config_text_of(ws: SocketAddr, http: SocketAddr, top: &str, listeners: &str) -> String {
    format!(
        r#"{top}
[[listener]]
name = "main"
listen = "127.0.0.1:0"
{listeners}
[[route]]
name = "ws"
path_prefix = "/ws"
pool = "ws"

[[route]]
name = "http"
path_prefix = "/"
pool = "http"

[pool.ws]
backends = [ {{ addr = "{ws}" }} ]

[pool.http]
backends = [ {{ addr = "{http}" }} ]
"#
    )
}

/// A backend answering every HTTP request with 200 "ok", counting the connections it accepts.
async fn ok_backend() -> RawBackend {
    http_backend(|_| async { Response::new(backend_body("ok")) }).await
}

/// Connections accepted by each worker's socket of `listener`, worker 0 first.
fn by_worker(gateway: &Gateway, listener: &str) -> [u64; 2] {
    let text = gateway.metrics_text();
    [0, 1].map(|worker| {
        let series = format!(
            "wsgate_worker_connections_accepted_total{{listener=\"{listener}\",worker=\"{worker}\"}} "
        );
        text.lines()
            .find_map(|line| line.strip_prefix(&series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series}in\n{text}"))
    })
}

/// Connections accepted by `listener`, all sockets together.
fn accepted(gateway: &Gateway, listener: &str) -> u64 {
    let series = format!("wsgate_connections_accepted_total{{listener=\"{listener}\"}} ");
    let text = gateway.metrics_text();
    text.lines()
        .find_map(|line| line.strip_prefix(&series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series}in\n{text}"))
}

/// Opens `count` WebSockets to `addr`, each checked with one echo.
async fn tunnels(addr: SocketAddr, count: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    for i in 0..count {
        let mut ws = ws_connect(addr, "/ws").await;
        echo(&mut ws, &format!("hello {i}")).await;
        clients.push(ws);
    }
    clients
}

async fn echo(ws: &mut Client, text: &str) {
    within("send", ws.send(Message::text(text)))
        .await
        .expect("send");
    assert_eq!(next_message(ws).await, Message::text(text));
}

/// Waits for the gateway's Close on `ws`, answering nothing else: its code and reason.
async fn close_of(ws: &mut Client) -> (u16, String) {
    loop {
        match within("the Close frame", ws.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Some(Ok(Message::Close(None))) => panic!("a Close frame without a code"),
            Some(Ok(_)) => continue,
            other => panic!("expected a Close frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn connections_are_spread_over_both_workers_and_all_served() {
    let (ws_backend, http_backend) = (TestBackend::start("b1").await, ok_backend().await);
    let threads = WorkerThreads::start(2);
    let config = config(ws_backend.addr, http_backend.addr, "", "");
    let gateway = Gateway::start_on(config, threads.workers())
        .await
        .expect("gateway starts");
    let addr = gateway.listener_addr("main").expect("listener `main`");
    assert_eq!(
        by_worker(&gateway, "main"),
        [0, 0],
        "counted from the start"
    );

    // WebSockets, each echoing through its worker, all open at once.
    let mut clients = tunnels(addr, 60).await;
    for (i, ws) in clients.iter_mut().enumerate() {
        echo(ws, &format!("again {i}")).await;
    }
    let after_tunnels = by_worker(&gateway, "main");
    assert!(
        after_tunnels.iter().all(|&n| n > 0),
        "60 connections all on one worker: {after_tunnels:?}"
    );
    assert_eq!(after_tunnels.iter().sum::<u64>(), 60);

    // Plain HTTP, one request per connection, one after the other.
    for _ in 0..60 {
        let (status, _, body) = http_get(addr, "/x").await;
        assert_eq!((status.as_u16(), &body[..]), (200, &b"ok"[..]));
    }
    let after_http = by_worker(&gateway, "main");
    let served_http = (0..2).filter(|&w| after_http[w] > after_tunnels[w]).count();
    assert_eq!(
        served_http, 2,
        "60 requests all on one worker: {after_http:?}"
    );
    assert_eq!(
        after_http.iter().sum::<u64>(),
        accepted(&gateway, "main"),
        "every accepted connection is counted by one worker"
    );
    // Each worker keeps its own keep-alive connections to backends (their tasks run on its thread): the
    // requests, one at a time, opened one backend connection per worker that served them.
    assert_eq!(http_backend.accepts(), served_http);

    drop(clients);
    within("shutdown", gateway.shutdown()).await;
    threads.stop().await;
}

/// `limits.max_connections` bounds the listener, all its sockets together: with two tunnels open under a
/// limit of two, neither worker accepts; one closing lets exactly one more in.
#[tokio::test]
async fn max_connections_is_one_limit_over_the_sockets() {
    let (ws_backend, http_backend) = (TestBackend::start("b1").await, ok_backend().await);
    let threads = WorkerThreads::start(2);
    let config = config(
        ws_backend.addr,
        http_backend.addr,
        "[limits]\nmax_connections = 2\n",
        "",
    );
    let gateway = Gateway::start_on(config, threads.workers())
        .await
        .expect("gateway starts");
    let addr = gateway.listener_addr("main").expect("listener `main`");
    let mut open = tunnels(addr, 2).await;

    // Waiting clients: the kernel completes their connects into the sockets' backlogs, spread over both.
    let (answered, mut answers) = tokio::sync::mpsc::unbounded_channel();
    let request = upgrade_request(addr, "/ws", "");
    let mut waiting = Vec::new();
    for i in 0..30 {
        let mut stream = raw_send(addr, request.as_bytes()).await;
        let answered = answered.clone();
        waiting.push(tokio::spawn(async move {
            let mut first = [0u8; 1];
            if matches!(stream.read(&mut first).await, Ok(1)) {
                let _ = answered.send(i);
            }
            stream
        }));
    }
    assert_eq!(accepted(&gateway, "main"), 2);

    drop(open.pop());
    let first = within("a waiting client to be answered", answers.recv())
        .await
        .expect("answer");
    // The closed tunnel's place went to one waiting client, on whichever worker took it; the other
    // worker, and this one after it, wait for a place again.
    assert_eq!(
        accepted(&gateway, "main"),
        3,
        "client {first} answered, and only it"
    );
    let text = gateway.metrics_text();
    assert!(
        text.contains("wsgate_connections_active{listener=\"main\"} 2"),
        "{text}"
    );

    for task in waiting {
        task.abort();
    }
    drop(open);
    within("shutdown", gateway.shutdown()).await;
    threads.stop().await;
}

/// A reload keeps every socket of a listener it keeps (its tunnels go on, on both workers, and both still
/// accept), binds a listener it adds on both workers, and closes every socket of one it removes.
#[tokio::test]
async fn reloads_keep_add_and_close_every_socket_of_a_listener() {
    let (ws_backend, http_backend) = (TestBackend::start("b1").await, ok_backend().await);
    let threads = WorkerThreads::start(2);
    let extra = "[[listener]]\nname = \"extra\"\nlisten = \"127.0.0.1:0\"\n";
    let config = config(ws_backend.addr, http_backend.addr, "", extra);
    let gateway = Gateway::start_on(config, threads.workers())
        .await
        .expect("gateway starts");
    let addr = gateway.listener_addr("main").expect("listener `main`");
    let extra_addr = gateway.listener_addr("extra").expect("listener `extra`");
    let mut clients = tunnels(addr, 40).await;
    let before = by_worker(&gateway, "main");
    assert!(
        before.iter().all(|&n| n > 0),
        "live tunnels on one worker only: {before:?}"
    );

    // Generation 2: `extra` removed, `added` bound, a route changed.
    let added = "[[listener]]\nname = \"added\"\nlisten = \"127.0.0.1:0\"\n";
    let next = config_text_of(ws_backend.addr, http_backend.addr, "", added)
        .replace("path_prefix = \"/\"", "path_prefix = \"/api\"");
    within("reload", gateway.reload(parse(&next)))
        .await
        .expect("reload accepted");

    // The removed listener's sockets are closed once the reload returns, on both workers.
    for _ in 0..20 {
        assert!(
            tokio::net::TcpStream::connect(extra_addr).await.is_err(),
            "the removed listener still accepts"
        );
    }
    assert_eq!(gateway.listener_addr("extra"), None);
    // No tunnel was dropped.
    for (i, ws) in clients.iter_mut().enumerate() {
        echo(ws, &format!("after the reload {i}")).await;
    }
    // The kept listener kept its sockets and still accepts on both workers, under the new config.
    assert_eq!(gateway.listener_addr("main"), Some(addr));
    let mut fresh = tunnels(addr, 40).await;
    let after = by_worker(&gateway, "main");
    assert!(
        (0..2).all(|w| after[w] > before[w]),
        "after the reload a worker accepts nothing: {before:?} then {after:?}"
    );
    assert_eq!(http_get(addr, "/x").await.0, 404, "the new routes apply");
    // The added listener is bound on both workers.
    let added_addr = gateway.listener_addr("added").expect("listener `added`");
    fresh.extend(tunnels(added_addr, 40).await);
    let on_added = by_worker(&gateway, "added");
    assert!(
        on_added.iter().all(|&n| n > 0),
        "the added listener: {on_added:?}"
    );

    drop((clients, fresh));
    within("shutdown", gateway.shutdown()).await;
    threads.stop().await;
}

/// Shutdown stops every accept loop, sends every tunnel on every worker its Close 1001, waits for them
/// all, and returns; the worker threads then end.
#[tokio::test]
async fn shutdown_closes_every_tunnel_on_every_worker() {
    let (ws_backend, http_backend) = (TestBackend::start("b1").await, ok_backend().await);
    let threads = WorkerThreads::start(2);
    let top = "[timeouts]\ndrain = \"20s\"\nclose_spread = \"200ms\"\n";
    let config = config(ws_backend.addr, http_backend.addr, top, "");
    let gateway = Gateway::start_on(config, threads.workers())
        .await
        .expect("gateway starts");
    let addr = gateway.listener_addr("main").expect("listener `main`");
    let clients = tunnels(addr, 40).await;
    let spread = by_worker(&gateway, "main");
    assert!(
        spread.iter().all(|&n| n > 0),
        "tunnels on one worker only: {spread:?}"
    );

    let started = Instant::now();
    shut_down_closing_all(gateway, clients).await;
    // Every tunnel was answered at once: the shutdown did not need its drain timeout.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "shutdown waited for the drain timeout"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "a socket still accepts after shutdown"
    );
    threads.stop().await;
}

/// Shuts `gateway` down: every one of `clients` gets Close 1001 "going away", and shutdown returns.
async fn shut_down_closing_all(gateway: Gateway, clients: Vec<Client>) {
    let shutdown = tokio::spawn(gateway.shutdown());
    let waiters: Vec<_> = clients
        .into_iter()
        .map(|mut ws| tokio::spawn(async move { close_of(&mut ws).await }))
        .collect();
    for waiter in waiters {
        let (code, reason) = within("a client", waiter).await.expect("client task");
        assert_eq!((code, reason.as_str()), (1001, "going away"));
    }
    within("shutdown", shutdown).await.expect("shutdown task");
}

/// The binary: `--runtime` overrides the config's `runtime`, as `--threads` overrides `workers`. Which
/// model runs shows in `/metrics` (per-worker runtimes count connections by worker), and either exits
/// cleanly on SIGTERM, worker threads joined.
#[cfg(unix)]
#[tokio::test]
async fn the_command_line_chooses_the_runtime_model() {
    use std::process::Stdio;
    let backend = TestBackend::start("b1").await;
    let free_port = || {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        probe.local_addr().expect("addr")
    };
    let dir = std::env::temp_dir().join(format!(
        "wsgate-test-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for (model, flags, per_worker) in [
        ("per_worker", &[][..], true),
        ("per_worker", &["--runtime", "shared"][..], false),
        ("shared", &["--runtime", "per-worker"][..], true),
    ] {
        let (listen, admin) = (free_port(), free_port());
        let text = config_text(&[backend.addr], "")
            .replace("127.0.0.1:0", &listen.to_string())
            .replace(
                "[[listener]]",
                &format!(
                    "workers = 2\nruntime = \"{model}\"\n[admin]\nlisten = \"{admin}\"\n\n[[listener]]"
                ),
            );
        let path = dir.join("wsgate.toml");
        std::fs::write(&path, &text).expect("write config");
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(["run", "--config"])
            .arg(&path)
            .args(flags)
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start wsgate");
        let deadline = Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(admin).await.is_err() {
            assert!(Instant::now() < deadline, "wsgate did not start listening");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut ws = ws_connect(listen, "/ws").await;
        echo(&mut ws, "through the binary").await;
        let (status, _, metrics) = http_get(admin, "/metrics").await;
        assert_eq!(status, 200);
        let metrics = String::from_utf8_lossy(&metrics);
        let counted = |worker: u32| {
            metrics.contains(&format!(
                "wsgate_worker_connections_accepted_total{{listener=\"main\",worker=\"{worker}\"}}"
            ))
        };
        let what = format!("runtime = {model:?}, flags {flags:?}");
        assert_eq!(counted(0) && counted(1), per_worker, "{what}:\n{metrics}");
        assert_eq!(
            metrics.contains("wsgate_worker_connections_accepted_total{"),
            per_worker,
            "{what}"
        );
        let pid = child.id().expect("pid").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
        assert_eq!(close_of(&mut ws).await.0, 1001, "{what}");
        let exit = within("wsgate to exit", child.wait()).await.expect("wait");
        assert!(exit.success(), "{what}: exit status {exit:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Quiet tunnels park on whichever worker runtime runs them (each worker has a park of its own), come
/// back to echo from there, and shutdown still closes every one of them in order.
#[tokio::test]
async fn tunnels_park_on_every_worker_and_come_back() {
    let (ws_backend, http_backend) = (TestBackend::start("b1").await, ok_backend().await);
    let threads = WorkerThreads::start(2);
    let top = "[timeouts]\ndrain = \"20s\"\nclose_spread = \"200ms\"\n";
    let text = config_text_of(ws_backend.addr, http_backend.addr, top, "").replace(
        "pool = \"ws\"\n",
        "pool = \"ws\"\nwebsocket = { park_after = \"50ms\" }\n",
    );
    let gateway = Gateway::start_on(parse(&text), threads.workers())
        .await
        .expect("gateway starts");
    let addr = gateway.listener_addr("main").expect("listener `main`");
    let mut clients = tunnels(addr, 20).await;
    let spread = by_worker(&gateway, "main");
    assert!(
        spread.iter().all(|&n| n > 0),
        "tunnels on one worker only: {spread:?}"
    );
    let all_parked = async {
        while !gateway
            .metrics_text()
            .lines()
            .any(|l| l == "wsgate_ws_tunnels_parked 20")
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    within("every tunnel parked", all_parked).await;
    for (i, ws) in clients.iter_mut().enumerate() {
        echo(ws, &format!("back from the park {i}")).await;
    }

    shut_down_closing_all(gateway, clients).await;
    threads.stop().await;
}
