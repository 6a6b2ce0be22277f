//! The tunnel over real sockets (docs/ARCHITECTURE.md, "The tunnel"): keepalive, pass-through of control frames, every row of
//! "How a tunnel ends", backpressure, and no buffer while idle. Most tests put byte-level peers on both
//! sides (`tunnel_support`), so they can check each byte wsgate forwards, drops or adds.
//!
//! Tests of timers (keepalive, pong, idle, close and send timeouts, max lifetime, and "at once" meaning
//! before any timer) run in paused time, `#[tokio::test(start_paused = true)]`: one thread and a virtual
//! clock that jumps to the next timer whenever every task is waiting, over the same real loopback sockets
//! and in-process gateway. A timer then fires exactly at its deadline however loaded the machine is, so
//! these tests check *when* to the millisecond (`assert_at`, `expect_close_at`, `expect_eof_at`) and cost
//! no real time. Tests that need real threads or real time (CPU use, bulk transfers) stay multi-threaded.

use std::time::Duration;

use crate::common::*;
use crate::tunnel_support::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// No wsgate pings: the byte-exact tests must see only what the peers wrote.
const NO_PINGS: &str = r#"ping_interval = "0s""#;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A gateway in front of a raw backend with these websocket settings.
async fn raw_setup(settings: &str) -> (wsgate::Gateway, std::net::SocketAddr, WsBackend) {
    let backend = WsBackend::bind().await;
    let (gateway, addr) = gateway(&config_text(&[backend.addr], settings)).await;
    (gateway, addr, backend)
}

/// The value of a metric line that starts with `prefix` (0 when absent).
fn metric_value(gateway: &wsgate::Gateway, prefix: &str) -> f64 {
    gateway
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------------------------
// Keepalive

#[tokio::test(start_paused = true)]
async fn a_client_that_answers_pings_stays_connected_and_its_pongs_are_not_forwarded() {
    let (gateway, addr, backend) =
        raw_setup(r#"ping_interval = "200ms", pong_timeout = "200ms", idle_timeout = "30s""#).await;
    let (mut client, mut server) = tokio::join!(ws_connect(addr, "/ws"), backend.accept());
    let started = Instant::now();
    let hold = ms(1500);
    // tungstenite answers each ping while it is polled; the backend must see none of it.
    let client_side = async {
        let end = started + hold;
        let mut pings = Vec::new();
        loop {
            match timeout_at(end, client.next()).await {
                Err(_) => return pings,
                Ok(Some(Ok(Message::Ping(token)))) => {
                    assert_eq!(token.len(), 8, "wsgate's ping carries its 8-byte token");
                    pings.push(started.elapsed());
                }
                Ok(other) => panic!("unexpected {other:?}"),
            }
        }
    };
    let (pings, ()) = tokio::join!(client_side, server.expect_silence(hold));
    // Each pong is back at once (paused time), so a ping comes every ping_interval: 7 in 1.5 s.
    assert_eq!(pings.len(), 7, "pings at {pings:?}");
    for (i, &at) in pings.iter().enumerate() {
        assert_at(&format!("ping {i}"), at, ms(200) * (i as u32 + 1));
    }
    let pings = pings.len() as u32;

    // Still connected, both ways.
    within("send", client.send(Message::text("still here")))
        .await
        .expect("send");
    let frame = server.next_frame().await;
    assert_eq!(
        (frame.opcode, frame.payload),
        (OP_TEXT, b"still here".to_vec())
    );
    server.write_frame(true, OP_TEXT, b"so am I").await;
    assert_eq!(next_message(&mut client).await, Message::text("so am I"));
    // Every answered ping was matched (the last pong may still be on its way).
    let rtts = metric_value(&gateway, "wsgate_ws_ping_rtt_seconds_count{route=\"main\"}");
    assert!(
        rtts >= f64::from(pings - 1),
        "{rtts} round trips for {pings} pings"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_neither_reads_nor_answers_is_disconnected_after_the_pong_timeout() {
    let (gateway, addr, backend) =
        raw_setup(r#"ping_interval = "200ms", pong_timeout = "200ms", idle_timeout = "30s""#).await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    let started = Instant::now();
    let deadline = started + WAIT;
    // A ping after ping_interval, then pong_timeout without an answer.
    server
        .expect_close_at(started, ms(200 + 200), 1001, "client not responding")
        .await;
    // The backend answers at once, so the tunnel ends: the client's TCP is closed behind the Close that
    // wsgate attempted. Its bytes were sitting in the client's socket all along.
    server.send_close(1001, "").await;
    server.expect_eof_at(started, ms(400)).await;
    let ping = client.next_frame().await;
    assert_eq!((ping.opcode, ping.payload.len()), (OP_PING, 8));
    client
        .expect_close_before(deadline, 1001, "pong timeout")
        .await;
    client.expect_eof_before(deadline).await;
    wait_metric(&gateway, &closes("pong_timeout", 1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_dead_client_is_dropped_after_close_timeout_when_the_backend_does_not_answer() {
    let (_gateway, addr, backend) = raw_setup(
        r#"ping_interval = "200ms", pong_timeout = "200ms", idle_timeout = "30s", close_timeout = "300ms""#,
    )
    .await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    let started = Instant::now();
    let deadline = started + WAIT;
    server
        .expect_close_at(started, ms(200 + 200), 1001, "client not responding")
        .await;
    server.expect_eof_at(started, ms(400 + 300)).await;
    client.next_frame().await;
    client
        .expect_close_before(deadline, 1001, "pong timeout")
        .await;
    client.expect_eof_before(deadline).await;
}

#[tokio::test(start_paused = true)]
async fn any_frame_from_the_client_answers_a_ping() {
    let (gateway, addr, backend) =
        raw_setup(r#"ping_interval = "150ms", pong_timeout = "150ms", idle_timeout = "30s""#).await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    // A client that talks but never answers pings is alive: each message proves it. 200 ms apart, so a
    // ping is out (150 ms after the last message) and unanswered when the next message comes, 150 ms
    // before the pong timeout would end the tunnel.
    for i in 0..12u8 {
        let sent = client.write_frame(true, OP_BINARY, &[i]).await;
        assert_eq!(server.read_bytes(sent.len()).await, sent);
        tokio::time::sleep(ms(200)).await;
    }
    assert!(!gateway.metrics_text().contains("wsgate_ws_closes_total{"));
    // The client got a ping in every pause, and answered none.
    let mut pings = 0;
    loop {
        match client.frame_before(Instant::now() + TICK).await {
            Ok(frame) => assert_eq!(frame.opcode, OP_PING, "{frame:?}"),
            Err(NoFrame::TimedOut) => break,
            Err(e) => panic!("the client's connection ended: {e:?}"),
        }
        pings += 1;
    }
    assert_eq!(pings, 12, "pings sent to the client");
}

#[tokio::test(start_paused = true)]
async fn a_ping_held_back_by_a_long_frame_does_not_time_the_client_out() {
    // wsgate's ping can only go between frames. While a long frame trickles to the client for several
    // ping intervals, the client is reading (and cannot answer a ping it has not seen): it is not dead.
    let (gateway, addr, backend) =
        raw_setup(r#"ping_interval = "200ms", pong_timeout = "200ms", idle_timeout = "30s""#).await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    const PIECE: usize = 16 * 1024;
    const PIECES: usize = 25;
    let frame = server.frame_bytes(true, OP_BINARY, &[3; PIECE * PIECES]);
    let header_len = frame.len() - PIECE * PIECES;
    let writer = async {
        server.write_raw(&frame[..header_len]).await;
        // 25 pieces, 60 ms apart: 1.5 s inside one frame.
        for piece in frame[header_len..].chunks(PIECE) {
            tokio::time::sleep(ms(60)).await;
            server.write_raw(piece).await;
        }
    };
    let (_, received) = tokio::join!(writer, client.read_bytes(frame.len()));
    assert!(received == frame, "the frame arrived changed");
    // The ping comes right behind the frame; answering it keeps the tunnel.
    let ping = client.next_frame().await;
    assert_eq!((ping.opcode, ping.payload.len()), (OP_PING, 8), "{ping:?}");
    client.write_frame(true, OP_PONG, &ping.payload).await;
    let sent = client.write_frame(true, OP_TEXT, b"alive").await;
    assert_eq!(
        server.read_bytes(sent.len()).await,
        sent,
        "pong not consumed"
    );
    assert!(!gateway.metrics_text().contains("wsgate_ws_closes_total{"));
}

/// A runtime whose threads are recorded, so a test can read the CPU time of exactly the threads that run
/// its gateway (other tests run in the same process at the same time).
#[cfg(target_os = "linux")]
struct CountedRuntime {
    runtime: tokio::runtime::Runtime,
    /// `/proc/<pid>/task/<tid>` of each thread the runtime started.
    threads: std::sync::Arc<std::sync::Mutex<Vec<std::path::PathBuf>>>,
}

#[cfg(target_os = "linux")]
impl CountedRuntime {
    fn new() -> CountedRuntime {
        let threads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = std::sync::Arc::clone(&threads);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                let task = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
                record.lock().expect("threads").push(task);
            })
            .build()
            .expect("runtime");
        CountedRuntime { runtime, threads }
    }

    /// CPU time (user + system) the runtime's threads have used.
    fn cpu_time(&self) -> Duration {
        let threads = self.threads.lock().expect("threads").clone();
        let ticks: u64 = threads
            .iter()
            .filter_map(|task| {
                std::fs::read_to_string(format!("/proc/{}/stat", task.display())).ok()
            })
            .map(|stat| {
                // After the command name (in parentheses): utime and stime are the 12th and 13th fields.
                let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
                    .split(' ')
                    .collect();
                fields[11].parse::<u64>().expect("utime")
                    + fields[12].parse::<u64>().expect("stime")
            })
            .sum();
        // USER_HZ is 100 on every Linux platform Rust supports.
        Duration::from_millis(ticks * 10)
    }
}

#[cfg(target_os = "linux")]
#[test]
fn a_ping_waiting_behind_a_stalled_frame_does_not_spin() {
    let runtime = CountedRuntime::new();
    runtime
        .runtime
        .block_on(ping_waiting_behind_a_stalled_frame(&runtime));
}

#[cfg(target_os = "linux")]
async fn ping_waiting_behind_a_stalled_frame(runtime: &CountedRuntime) {
    let (_gateway, addr, backend) =
        raw_setup(r#"ping_interval = "300ms", pong_timeout = "5s", idle_timeout = "30s""#).await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    // Answer the first ping: the next one is due 300 ms after the answer.
    let ping = client.next_frame().await;
    assert_eq!(ping.opcode, OP_PING);
    client.write_frame(true, OP_PONG, &ping.payload).await;
    // The backend starts a frame and stalls inside it, so the next ping to the client has to wait...
    let frame = server.frame_bytes(true, OP_BINARY, &[4; 1000]);
    server.write_raw(&frame[..500]).await;
    assert_eq!(client.read_bytes(500).await, frame[..500]);
    tokio::time::sleep(ms(450)).await;
    // ...while the client speaks, which proves it alive with the ping still queued.
    let sent = client.write_frame(true, OP_TEXT, b"hi").await;
    assert_eq!(server.read_bytes(sent.len()).await, sent);
    // Nothing moves for a second: the tunnel must sleep, not busy-loop on a ping it cannot send.
    let before = runtime.cpu_time();
    tokio::time::sleep(ms(1000)).await;
    let used = runtime.cpu_time() - before;
    assert!(used < ms(300), "{used:?} of CPU in a quiet second");
    // The frame ends, and the ping follows it.
    server.write_raw(&frame[500..]).await;
    assert_eq!(client.read_bytes(frame.len() - 500).await, frame[500..]);
    let ping = client.next_frame().await;
    assert_eq!(ping.opcode, OP_PING);
}

#[tokio::test(start_paused = true)]
async fn a_partial_header_does_not_hold_back_wsgates_close() {
    // The client sent one byte of a frame header and went quiet: nothing of that frame was forwarded, so
    // the backend's stream is between frames and wsgate's Close can go in.
    let (gateway, addr, backend) =
        raw_setup(r#"ping_interval = "0s", idle_timeout = "300ms", close_timeout = "5s""#).await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    let frame = client.frame_bytes(true, OP_TEXT, b"never finished");
    client.write_raw(&frame[..1]).await;
    let started = Instant::now();
    tokio::join!(
        server.expect_close_at(started, ms(300), 1001, "idle timeout"),
        client.expect_close_at(started, ms(300), 1001, "idle timeout"),
    );
    server.send_close(1001, "").await;
    client.send_close(1001, "").await;
    wait_metric(&gateway, &closes("idle_timeout", 1)).await;
}

// ---------------------------------------------------------------------------------------------------------
// Control frames pass through

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_and_pongs_of_the_peers_pass_through_untouched() {
    let (_gateway, addr, backend) = raw_setup(NO_PINGS).await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;

    let from_client = [
        client.frame_bytes(true, OP_PING, b"client ping"),
        client.frame_bytes(true, OP_PONG, b"client pong"),
        client.frame_bytes(true, OP_PING, b""),
        client.frame_bytes(true, OP_PONG, &[7u8; 125]),
    ]
    .concat();
    client.write_raw(&from_client).await;
    assert_eq!(server.read_bytes(from_client.len()).await, from_client);

    let from_backend = [
        server.frame_bytes(true, OP_PING, b"backend ping"),
        server.frame_bytes(true, OP_PONG, b"backend pong"),
        server.frame_bytes(true, OP_PONG, &[9u8; 125]),
    ]
    .concat();
    server.write_raw(&from_backend).await;
    assert_eq!(client.read_bytes(from_backend.len()).await, from_backend);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_between_two_fragments_passes_through_in_place() {
    let (_gateway, addr, backend) = raw_setup(NO_PINGS).await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    let from_client = [
        client.frame_bytes(false, OP_TEXT, b"hel"),
        client.frame_bytes(true, OP_PING, b"between"),
        client.frame_bytes(false, OP_CONTINUATION, b""),
        client.frame_bytes(true, OP_PONG, b"again"),
        client.frame_bytes(true, OP_CONTINUATION, b"lo"),
    ];
    // Frame by frame, so each crosses wsgate in its own read.
    for frame in &from_client {
        client.write_raw(frame).await;
        assert_eq!(&server.read_bytes(frame.len()).await, frame);
    }
    let from_backend = [
        server.frame_bytes(false, OP_BINARY, &[1; 300]),
        server.frame_bytes(true, OP_PING, b"between"),
        server.frame_bytes(true, OP_CONTINUATION, &[2; 70_000]),
    ]
    .concat();
    server.write_raw(&from_backend).await;
    assert_eq!(client.read_bytes(from_backend.len()).await, from_backend);
}

// ---------------------------------------------------------------------------------------------------------
// Idle timeout

#[tokio::test(start_paused = true)]
async fn idle_timeout_closes_both_sides_with_1001() {
    let (gateway, addr, backend) =
        raw_setup(r#"ping_interval = "0s", idle_timeout = "300ms""#).await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    let started = Instant::now();
    tokio::join!(
        client.expect_close_at(started, ms(300), 1001, "idle timeout"),
        server.expect_close_at(started, ms(300), 1001, "idle timeout"),
    );
    // Both answer; the tunnel ends at once, without waiting for close_timeout.
    client.send_close(1001, "").await;
    server.send_close(1001, "").await;
    let answered = Instant::now();
    tokio::join!(
        client.expect_eof_at(answered, Duration::ZERO),
        server.expect_eof_at(answered, Duration::ZERO)
    );
    wait_metric(&gateway, &closes("idle_timeout", 1)).await;
}

#[tokio::test(start_paused = true)]
async fn data_in_either_direction_resets_the_idle_clock() {
    let (gateway, addr, backend) =
        raw_setup(r#"ping_interval = "0s", idle_timeout = "400ms""#).await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    // 1.5 s of traffic, alternating directions, 150 ms apart: never 400 ms without data.
    let mut last = Instant::now();
    for i in 0..10u8 {
        if i % 2 == 0 {
            let sent = client.write_frame(true, OP_TEXT, b"up").await;
            assert_eq!(server.read_bytes(sent.len()).await, sent);
        } else {
            let sent = server.write_frame(true, OP_TEXT, b"down").await;
            assert_eq!(client.read_bytes(sent.len()).await, sent);
        }
        last = Instant::now();
        tokio::time::sleep(ms(150)).await;
    }
    // The idle timeout counts from the last message.
    client
        .expect_close_at(last, ms(400), 1001, "idle timeout")
        .await;
    wait_metric(&gateway, &closes("idle_timeout", 1)).await;
}

/// Only data is activity: the peers' own pings and pongs pass through, and do not keep an otherwise
/// silent tunnel open past its idle timeout.
#[tokio::test(start_paused = true)]
async fn the_peers_pings_and_pongs_do_not_reset_the_idle_clock() {
    let (gateway, addr, backend) =
        raw_setup(r#"ping_interval = "0s", idle_timeout = "400ms""#).await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    let started = Instant::now();
    // A ping from the client and a pong from the backend every 100 ms: forwarded, never data.
    for _ in 0..3 {
        let sent = client.write_frame(true, OP_PING, b"app ping").await;
        assert_eq!(server.read_bytes(sent.len()).await, sent);
        let sent = server.write_frame(true, OP_PONG, b"app pong").await;
        assert_eq!(client.read_bytes(sent.len()).await, sent);
        tokio::time::sleep(ms(100)).await;
    }
    tokio::join!(
        client.expect_close_at(started, ms(400), 1001, "idle timeout"),
        server.expect_close_at(started, ms(400), 1001, "idle timeout"),
    );
    wait_metric(&gateway, &closes("idle_timeout", 1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_backend_stalled_inside_a_frame_still_times_out_idle() {
    // The ping to the client waits behind the unfinished frame and the client cannot be blamed for not
    // answering it; the idle timeout still ends the tunnel. The client's stream cannot take a Close in the
    // middle of a frame, so it gets the end of the connection after close_timeout.
    let (gateway, addr, backend) = raw_setup(
        r#"ping_interval = "100ms", pong_timeout = "200ms", idle_timeout = "500ms", close_timeout = "300ms""#,
    )
    .await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    let frame = server.frame_bytes(true, OP_BINARY, &[6; 1000]);
    server.write_raw(&frame[..300]).await;
    let stalled = Instant::now();
    server
        .expect_close_at(stalled, ms(500), 1001, "idle timeout")
        .await;
    let end = stalled + WAIT;
    // Pings may come before the frame starts; after it, nothing but the end.
    loop {
        match client.frame_before(end).await {
            Ok(frame) => assert_eq!(frame.opcode, OP_PING, "{frame:?}"),
            Err(NoFrame::TimedOut) => panic!("the client's connection is still open"),
            Err(_) => break,
        }
    }
    assert_at(
        "the end of the client's connection",
        stalled.elapsed(),
        ms(500 + 300),
    );
    assert_eq!(
        client.take_pending(),
        frame[..300],
        "the client got the frame's start, then the end"
    );
    wait_metric(&gateway, &closes("idle_timeout", 1)).await;
}

#[tokio::test(start_paused = true)]
async fn wsgates_own_pings_do_not_reset_the_idle_clock() {
    let (gateway, addr, backend) =
        raw_setup(r#"ping_interval = "100ms", pong_timeout = "1s", idle_timeout = "700ms""#).await;
    let (mut client, mut server) = tokio::join!(ws_connect(addr, "/ws"), backend.accept());
    let started = Instant::now();
    let deadline = started + WAIT;
    let client_side = async {
        let mut pings = 0;
        loop {
            match timeout_at(deadline, client.next()).await {
                Err(_) => panic!("no Close after {pings} pings"),
                Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
                Ok(Some(Ok(Message::Close(Some(close))))) => {
                    assert_eq!(close.code, CloseCode::Away);
                    assert_eq!(close.reason.as_str(), "idle timeout");
                    assert_at("the client's Close", started.elapsed(), ms(700));
                    return pings;
                }
                Ok(other) => panic!("unexpected {other:?}"),
            }
        }
    };
    let (pings, ()) = tokio::join!(
        client_side,
        server.expect_close_at(started, ms(700), 1001, "idle timeout")
    );
    assert!(pings >= 3, "only {pings} pings: the keepalive did not run");
    wait_metric(&gateway, &closes("idle_timeout", 1)).await;
}

// ---------------------------------------------------------------------------------------------------------
// Message size

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_max_message_size_gets_1009_and_the_backend_1001() {
    let (gateway, addr, backend) =
        raw_setup(r#"ping_interval = "0s", max_message_size = "1KiB""#).await;
    // Exactly at the limit passes, in one frame and in fragments.
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    let fits = [
        client.frame_bytes(true, OP_BINARY, &[1; 1024]),
        client.frame_bytes(false, OP_TEXT, &[b'a'; 1000]),
        client.frame_bytes(true, OP_CONTINUATION, &[b'b'; 24]),
    ]
    .concat();
    client.write_raw(&fits).await;
    assert_eq!(server.read_bytes(fits.len()).await, fits);

    // One byte over, in one frame.
    client.write_frame(true, OP_BINARY, &[2; 1025]).await;
    client.expect_close(1009, "message too big").await;
    server
        .expect_close(1001, "client sent a message too big")
        .await;
    server.send_close(1001, "").await;
    client.expect_eof().await;

    // One byte over across fragments: the first fragment, a whole frame, was forwarded before.
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    let first = client.write_frame(false, OP_TEXT, &[b'x'; 600]).await;
    assert_eq!(server.read_bytes(first.len()).await, first);
    client
        .write_frame(true, OP_CONTINUATION, &[b'y'; 425])
        .await;
    client.expect_close(1009, "message too big").await;
    server
        .expect_close(1001, "client sent a message too big")
        .await;
    wait_metric(&gateway, &closes("message_too_big", 2)).await;
}

// ---------------------------------------------------------------------------------------------------------
// Protocol violations

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_protocol_violations_get_1002_and_the_backend_1001() {
    let (gateway, addr, backend) = raw_setup(NO_PINGS).await;
    let key = Some([1, 2, 3, 4]);
    let cases: [(&str, Vec<u8>); 7] = [
        ("unmasked frame", encode(true, 0, OP_TEXT, None, b"plain")),
        ("opcode 3", encode(true, 0, 3, key, b"x")),
        ("opcode 13", encode(true, 0, 13, key, b"")),
        (
            "ping over 125 bytes",
            encode(true, 0, OP_PING, key, &[0; 126]),
        ),
        ("fragmented ping", encode(false, 0, OP_PING, key, b"half")),
        (
            "RSV1 without extension",
            encode(true, 0b100, OP_TEXT, key, b"z"),
        ),
        (
            "continuation without start",
            encode(true, 0, OP_CONTINUATION, key, b"c"),
        ),
    ];
    for (what, bad) in &cases {
        let (mut client, mut server) = raw_pair(addr, &backend).await;
        // A good frame first, and the bad one in the same write: only the good one reaches the backend.
        let good = client.frame_bytes(true, OP_TEXT, b"fine");
        client.write_raw(&[&good[..], bad].concat()).await;
        assert_eq!(server.read_bytes(good.len()).await, good, "{what}");
        client.expect_close(1002, "protocol error").await;
        server.expect_close(1001, "client protocol error").await;
        server.send_close(1001, "").await;
        tokio::join!(client.expect_eof(), server.expect_eof());
    }
    wait_metric(&gateway, &closes("protocol_error", cases.len() as u64)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_protocol_violation_gets_the_client_1014_and_the_backend_1002() {
    let (gateway, addr, backend) = raw_setup(NO_PINGS).await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    // Servers must not mask.
    server
        .write_raw(&encode(true, 0, OP_TEXT, Some([9, 9, 9, 9]), b"masked"))
        .await;
    client.expect_close(1014, "backend protocol error").await;
    server.expect_close(1002, "protocol error").await;
    wait_metric(&gateway, &closes("backend_protocol_error", 1)).await;
}

// ---------------------------------------------------------------------------------------------------------
// A side vanishes

#[tokio::test(start_paused = true)]
async fn a_backend_that_vanishes_gets_the_client_a_1014() {
    let (gateway, addr, backend) = raw_setup(NO_PINGS).await;
    // A FIN, then a reset; the Close follows at once (paused time: no timer fires in between).
    let (mut client, server) = raw_pair(addr, &backend).await;
    let gone = Instant::now();
    drop(server);
    client
        .expect_close_at(gone, Duration::ZERO, 1014, "backend gone")
        .await;
    let (mut client, server) = raw_pair(addr, &backend).await;
    let gone = Instant::now();
    server.reset();
    client
        .expect_close_at(gone, Duration::ZERO, 1014, "backend gone")
        .await;
    client.send_close(1000, "").await;
    client.expect_eof().await;
    wait_metric(&gateway, &closes("backend_gone", 2)).await;
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_vanishes_gets_a_tungstenite_client_a_close_at_once() {
    let (_gateway, addr, backend) = raw_setup(NO_PINGS).await;
    let (mut client, server) = tokio::join!(ws_connect(addr, "/ws"), backend.accept());
    let gone = Instant::now();
    drop(server);
    let message = within("a Close", client.next()).await;
    assert_at("the Close", gone.elapsed(), Duration::ZERO);
    // tungstenite 0.30 does not know 1014 (registered after RFC 6455): it reports any code it does not
    // know as 1002 "Protocol violation". The raw test above checks the code on the wire.
    assert!(
        matches!(&message, Some(Ok(Message::Close(Some(_))))),
        "expected a Close, got {message:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_vanishes_gets_the_backend_a_1001() {
    let (gateway, addr, backend) = raw_setup(NO_PINGS).await;
    let (client, mut server) = raw_pair(addr, &backend).await;
    let gone = Instant::now();
    drop(client);
    server
        .expect_close_at(gone, Duration::ZERO, 1001, "client gone")
        .await;
    server.send_close(1001, "").await;
    server.expect_eof().await;
    let (client, mut server) = raw_pair(addr, &backend).await;
    let gone = Instant::now();
    client.reset();
    server
        .expect_close_at(gone, Duration::ZERO, 1001, "client gone")
        .await;
    wait_metric(&gateway, &closes("client_gone", 2)).await;
}

#[tokio::test(start_paused = true)]
async fn a_client_that_vanishes_in_the_middle_of_a_frame_drops_the_backend_at_once() {
    // The backend's stream cannot be finished, so no Close can follow it: wsgate closes TCP at once.
    let (gateway, addr, backend) = raw_setup(r#"ping_interval = "0s", close_timeout = "5s""#).await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    let frame = client.frame_bytes(true, OP_BINARY, &[5; 1000]);
    client.write_raw(&frame[..500]).await;
    assert_eq!(server.read_bytes(500).await, frame[..500]);
    let gone = Instant::now();
    drop(client);
    server.expect_eof_at(gone, Duration::ZERO).await;
    wait_metric(&gateway, &closes("client_gone", 1)).await;
}

// ---------------------------------------------------------------------------------------------------------
// Close handshakes

#[tokio::test(start_paused = true)]
async fn a_close_from_the_client_is_forwarded_and_answered() {
    let (gateway, addr, backend) = raw_setup(NO_PINGS).await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    let close = client.send_close(1000, "bye").await;
    assert_eq!(server.read_bytes(close.len()).await, close);
    let answer = server.send_close(1000, "bye too").await;
    assert_eq!(client.read_bytes(answer.len()).await, answer);
    // The handshake is complete: both connections end at once, not after close_timeout.
    let answered = Instant::now();
    tokio::join!(
        client.expect_eof_at(answered, Duration::ZERO),
        server.expect_eof_at(answered, Duration::ZERO)
    );
    wait_metric(&gateway, &closes("client_close", 1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_close_from_the_backend_is_forwarded_and_answered() {
    let (gateway, addr, backend) = raw_setup(NO_PINGS).await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    // Data before the Close still arrives, in order.
    let sent = [
        server.frame_bytes(true, OP_TEXT, b"last words"),
        server.frame_bytes(true, OP_CLOSE, &close_payload(4000, "done")),
    ]
    .concat();
    server.write_raw(&sent).await;
    assert_eq!(client.read_bytes(sent.len()).await, sent);
    let answer = client.send_close(4000, "ok").await;
    assert_eq!(server.read_bytes(answer.len()).await, answer);
    let answered = Instant::now();
    tokio::join!(
        client.expect_eof_at(answered, Duration::ZERO),
        server.expect_eof_at(answered, Duration::ZERO)
    );
    wait_metric(&gateway, &closes("backend_close", 1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_between_tungstenite_peers_completes() {
    let backend = TestBackend::start("echo").await;
    let (gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let mut client = ws_connect(addr, "/ws").await;
    within("send", client.send(Message::text("hi")))
        .await
        .expect("send");
    assert_eq!(next_message(&mut client).await, Message::text("hi"));
    let close = CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    };
    within("close", client.close(Some(close)))
        .await
        .expect("close");
    // The echo backend answers; tungstenite sees the answer and then the end of the stream.
    let answer = within("the answer", client.next()).await;
    assert!(
        matches!(&answer, Some(Ok(Message::Close(Some(c)))) if c.code == CloseCode::Normal),
        "{answer:?}"
    );
    assert!(within("the end", client.next()).await.is_none());
    wait_metric(&gateway, &closes("client_close", 1)).await;
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_forwarded_close_drops_the_connection_after_close_timeout() {
    let (_gateway, addr, backend) =
        raw_setup(r#"ping_interval = "0s", close_timeout = "300ms""#).await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    let close = server.send_close(1000, "bye").await;
    let sent_at = Instant::now();
    assert_eq!(client.read_bytes(close.len()).await, close);
    // The client never answers.
    client.expect_eof_at(sent_at, ms(300)).await;
    server.expect_eof_at(sent_at, ms(300)).await;
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_close_of_wsgates_own_drops_the_connection_after_close_timeout() {
    let (_gateway, addr, backend) =
        raw_setup(r#"ping_interval = "0s", idle_timeout = "200ms", close_timeout = "300ms""#).await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    let started = Instant::now();
    tokio::join!(
        client.expect_close_at(started, ms(200), 1001, "idle timeout"),
        server.expect_close_at(started, ms(200), 1001, "idle timeout"),
    );
    let closed_at = Instant::now();
    tokio::join!(
        client.expect_eof_at(closed_at, ms(300)),
        server.expect_eof_at(closed_at, ms(300))
    );
}

// ---------------------------------------------------------------------------------------------------------
// Shutdown and lifetime

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_both_sides_with_1001_going_away() {
    let backend = WsBackend::bind().await;
    // No spreading of the Closes over time: this one tunnel closes at once.
    let text = config_text(&[backend.addr], NO_PINGS) + "\n[timeouts]\nclose_spread = \"0s\"\n";
    let (gateway, addr) = gateway(&text).await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    let metrics = shut_down_in_order(gateway, &mut client, &mut server).await;
    assert!(metrics.contains(&closes("shutdown", 1)), "{metrics}");
}

/// Shuts `gateway` down while the tunnel between `client` and `server` is open: both get Close 1001
/// "going away" and answer it, and shutdown completes. The metrics as they are then.
async fn shut_down_in_order(
    gateway: wsgate::Gateway,
    client: &mut RawPeer,
    server: &mut RawPeer,
) -> String {
    let monitor = gateway.monitor();
    let shutdown = tokio::spawn(gateway.shutdown());
    tokio::join!(
        client.expect_close(1001, "going away"),
        server.expect_close(1001, "going away"),
    );
    client.send_close(1001, "").await;
    server.send_close(1001, "").await;
    within("shutdown", shutdown).await.expect("shutdown task");
    monitor.metrics_text()
}

/// Quiet tunnels leave their tasks for the park (`wsgate_ws_tunnels_parked`), come back for what either
/// side sends, which goes through unchanged, and are closed in order from there by shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_tunnels_relay_both_ways_and_close_in_order_at_shutdown() {
    let backend = WsBackend::bind().await;
    let websocket = format!(r#"{NO_PINGS}, park_after = "50ms""#);
    let text = config_text(&[backend.addr], &websocket) + "\n[timeouts]\nclose_spread = \"0s\"\n";
    let (gateway, addr) = gateway(&text).await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    wait_metric(&gateway, "wsgate_ws_tunnels_parked 1").await;
    let sent = client.write_frame(true, OP_TEXT, b"out of the park").await;
    assert_eq!(server.read_bytes(sent.len()).await, sent);
    // Back in the park once quiet again, and out of it for the backend's message.
    wait_metric(&gateway, "wsgate_ws_tunnels_parked 1").await;
    let sent = server.write_frame(true, OP_BINARY, &[7; 300]).await;
    assert_eq!(client.read_bytes(sent.len()).await, sent);
    wait_metric(&gateway, "wsgate_ws_tunnels_parked 1").await;

    let metrics = shut_down_in_order(gateway, &mut client, &mut server).await;
    assert!(metrics.contains(&closes("shutdown", 1)), "{metrics}");
    assert!(metrics.contains("wsgate_ws_tunnels_parked 0"), "{metrics}");
}

#[tokio::test(start_paused = true)]
async fn max_lifetime_closes_both_sides_with_1001() {
    let (gateway, addr, backend) =
        raw_setup(r#"ping_interval = "0s", max_lifetime = "300ms""#).await;
    let (mut client, mut server) = raw_pair(addr, &backend).await;
    let started = Instant::now();
    // Traffic does not extend a lifetime.
    tokio::time::sleep(ms(200)).await;
    let sent = client.write_frame(true, OP_TEXT, b"busy").await;
    assert_eq!(server.read_bytes(sent.len()).await, sent);
    tokio::join!(
        client.expect_close_at(started, ms(300), 1001, "max lifetime"),
        server.expect_close_at(started, ms(300), 1001, "max lifetime"),
    );
    wait_metric(&gateway, &closes("max_lifetime", 1)).await;
}

// ---------------------------------------------------------------------------------------------------------
// Backpressure and memory

/// Binary frames of 64 KiB, each filled with its index.
fn big_frame(server: &RawPeer, i: usize) -> Vec<u8> {
    server.frame_bytes(true, OP_BINARY, &[i as u8; 64 * 1024])
}

#[tokio::test(start_paused = true)]
async fn a_slow_reader_that_keeps_reading_is_not_idle() {
    let (gateway, addr, backend) = raw_setup(r#"ping_interval = "0s", idle_timeout = "1s""#).await;
    let (mut client, server) = tokio::join!(
        RawPeer::connect_small_window(addr, 16 * 1024),
        backend.accept()
    );
    // 16 MiB: far more than the sockets on the way can hold, so wsgate is left holding data it cannot write.
    const FRAMES: usize = 256;
    let mut server = server;
    let writer = tokio::spawn(async move {
        for i in 0..FRAMES {
            let frame = big_frame(&server, i);
            server.write_raw(&frame).await;
        }
        server
    });
    // The client reads in bursts with pauses shorter than the idle timeout, over several idle timeouts:
    // each burst is progress (bytes written on, more read from the backend), so the tunnel is not idle.
    // Waiting bytes alone would not be (see `hostile.rs` for a reader that stops).
    for i in 0..FRAMES {
        if i % 24 == 0 {
            tokio::time::sleep(ms(300)).await;
        }
        let frame = client.next_frame().await;
        assert_eq!(frame.opcode, OP_BINARY, "frame {i}");
        assert_eq!(frame.payload.len(), 64 * 1024, "frame {i}");
        assert!(frame.payload.iter().all(|&b| b == i as u8), "frame {i}");
    }
    let mut server = within("the writer", writer).await.expect("writer");
    // The tunnel is alive: a message goes through right away.
    let sent = client.write_frame(true, OP_TEXT, b"all here").await;
    assert_eq!(server.read_bytes(sent.len()).await, sent);
    assert!(!gateway.metrics_text().contains("wsgate_ws_closes_total{"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_stops_wsgate_reading_from_the_backend() {
    let (gateway, addr, backend) = raw_setup(NO_PINGS).await;
    let (_client, mut server) = tokio::join!(
        RawPeer::connect_small_window(addr, 16 * 1024),
        backend.accept()
    );
    let sampler = {
        let monitor = gateway.monitor();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = std::sync::Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut most = 0;
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                most = most.max(monitor.buffers_in_use());
                tokio::time::sleep(ms(2)).await;
            }
            most
        });
        (stop, task)
    };
    // The backend writes up to 64 MiB for up to 3 s; the client reads nothing.
    let limit = 64usize << 20;
    let give_up = Instant::now() + ms(3000);
    let mut written = 0;
    let mut stuck = false;
    while written < limit && Instant::now() < give_up {
        let frame = big_frame(&server, written);
        let wait = Instant::now() + ms(500);
        match timeout_at(wait, server.stream.write_all(&frame)).await {
            Ok(result) => result.expect("write"),
            Err(_) => {
                stuck = true;
                break;
            }
        }
        written += frame.len();
    }
    sampler.0.store(true, std::sync::atomic::Ordering::SeqCst);
    let most = within("sampler", sampler.1).await.expect("sampler");
    assert!(
        stuck,
        "the backend wrote {written} bytes without being held back"
    );
    assert!(written < limit, "the backend wrote everything");
    assert!(most <= 2, "{most} buffers in use");
    assert!(gateway.buffers_in_use() <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnels_hold_no_buffer() {
    const TUNNELS: usize = 1000;
    let backend = TestBackend::start("echo").await;
    let (gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let mut clients = Vec::with_capacity(TUNNELS);
    // In batches, so the accept queues never overflow.
    for _ in 0..TUNNELS / 50 {
        let batch = (0..50).map(|_| ws_connect(addr, "/ws"));
        clients.extend(futures_util::future::join_all(batch).await);
    }
    // A tunnel counts itself once its task has taken the client's stream over, just after the 101.
    let deadline = Instant::now() + WAIT;
    loop {
        let tunnels: f64 = gateway
            .metrics_text()
            .lines()
            .filter(|l| l.starts_with("wsgate_ws_tunnels_active{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if tunnels == TUNNELS as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "{tunnels} tunnels active");
        tokio::time::sleep(ms(10)).await;
    }
    // Handshakes are done and nothing moves: no tunnel holds a buffer.
    while gateway.buffers_in_use() != 0 {
        assert!(
            Instant::now() < deadline,
            "{} buffers held by idle tunnels",
            gateway.buffers_in_use()
        );
        tokio::time::sleep(ms(10)).await;
    }
    for _ in 0..20 {
        assert_eq!(gateway.buffers_in_use(), 0);
        tokio::time::sleep(ms(10)).await;
    }
    // And every tunnel still works.
    for (i, client) in clients.iter_mut().enumerate() {
        within("send", client.send(Message::text(format!("echo {i}"))))
            .await
            .expect("send");
    }
    for (i, client) in clients.iter_mut().enumerate() {
        assert_eq!(
            next_message(client).await,
            Message::text(format!("echo {i}"))
        );
    }
}
