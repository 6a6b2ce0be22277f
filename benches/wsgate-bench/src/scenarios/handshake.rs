//! Handshake rate: `loops` concurrent loops of TCP connect → WebSocket
//! upgrade → one 64-byte echo → close. Latency is connect start to echo
//! received; an op counts once the close has completed too. `storm` runs the
//! same loops with an `Origin` header ([`run_with`]); `tls_handshake` and
//! `tls_resume` run them over TLS ([`run_tls`]).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Outcome, Tally, TlsStats};
use crate::client::{self, TlsEnd};
use crate::procstat::Probe;
use crate::tls::TlsSetup;

const STEP_LIMIT: Duration = Duration::from_secs(5);

pub async fn run(addr: SocketAddr, loops: usize, duration: Duration, probe: Probe) -> Outcome {
    run_with(addr, loops, duration, probe, None).await
}

/// As [`run`], each upgrade request with `Origin: origin` when given.
pub async fn run_with(
    addr: SocketAddr,
    loops: usize,
    duration: Duration,
    probe: Probe,
    origin: Option<&'static str>,
) -> Outcome {
    let mut out = Outcome {
        connections: loops as u64,
        message_bytes: Some(64),
        ..Default::default()
    };
    let cpu0 = probe.cpu_s();
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = (0..loops)
        .map(|_| tokio::spawn(one_loop(addr, deadline, origin)))
        .collect();
    tokio::time::sleep_until(deadline.into()).await;
    let cpu1 = probe.cpu_s();
    out.duration_s = duration.as_secs_f64();
    let mut total = Tally::new();
    for t in tasks {
        match tokio::time::timeout(STEP_LIMIT * 3, t).await {
            Ok(Ok(tally)) => tally.merge_into(&mut total),
            Ok(Err(e)) => total.error(format!("task failed: {e}")),
            Err(_) => total.error("task did not finish".into()),
        }
    }
    out.ops = total.ops;
    out.errors = total.errors;
    out.first_error = total.first_error;
    out.set_latency(&total.hist);
    out.proxy_cpu_s = cpu0.zip(cpu1).map(|(a, b)| b - a);
    out
}

async fn one_loop(addr: SocketAddr, deadline: Instant, origin: Option<&'static str>) -> Tally {
    let payload = Bytes::from(vec![0x5Au8; 64]);
    let cfg = client::ws_config(4096);
    let mut tally = Tally::new();
    while Instant::now() < deadline {
        let t0 = Instant::now();
        let connected = match origin {
            None => client::ws_connect(addr, client::next_source(), cfg, STEP_LIMIT).await,
            Some(o) => {
                client::ws_connect_origin(addr, client::next_source(), Some(o), cfg, STEP_LIMIT)
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        let mut ws = match connected {
            Ok(ws) => ws,
            Err(e) => {
                tally.error(e);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if let Err(e) = client::echo_once(&mut ws, &payload, STEP_LIMIT).await {
            tally.error(e);
            continue;
        }
        let latency = t0.elapsed();
        if let Err(e) = client::close(ws, STEP_LIMIT).await {
            tally.error(e);
            continue;
        }
        if Instant::now() <= deadline {
            tally.record_us(latency.as_micros() as u64);
        }
    }
    tally
}

/// What one TLS loop saw besides its tally: the kinds of handshake, and how
/// the proxy ended the TLS sessions after the client's close_notify.
#[derive(Default)]
struct TlsLoop {
    full: u64,
    full_hrr: u64,
    resumed: u64,
    peer_notified: u64,
    peer_unclean: u64,
    first_unclean: Option<String>,
}

/// As [`run`], over TLS to `addr` (the proxy's TLS listener): each loop is
/// TCP connect → TLS handshake → upgrade → one echo → WebSocket close →
/// close_notify (the client's, then the wait for the proxy's end). Without
/// `resume` every handshake is full (no session cache); with it each loop
/// keeps a session cache of its own, so after its first connection every
/// handshake offers resumption: how many were resumed is counted.
pub async fn run_tls(
    addr: SocketAddr,
    tls: &TlsSetup,
    resume: bool,
    loops: usize,
    duration: Duration,
    probe: Probe,
) -> Outcome {
    let mut out = Outcome {
        connections: loops as u64,
        message_bytes: Some(64),
        ..Default::default()
    };
    let cpu0 = probe.cpu_s();
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = (0..loops)
        .map(|_| {
            let connector = if resume {
                tls.resuming_connector()
            } else {
                tls.connector()
            };
            tokio::spawn(one_tls_loop(addr, connector, deadline))
        })
        .collect();
    tokio::time::sleep_until(deadline.into()).await;
    let cpu1 = probe.cpu_s();
    out.duration_s = duration.as_secs_f64();
    let mut total = Tally::new();
    let mut seen = TlsLoop::default();
    for t in tasks {
        match tokio::time::timeout(STEP_LIMIT * 4, t).await {
            Ok(Ok((tally, l))) => {
                tally.merge_into(&mut total);
                seen.full += l.full;
                seen.full_hrr += l.full_hrr;
                seen.resumed += l.resumed;
                seen.peer_notified += l.peer_notified;
                seen.peer_unclean += l.peer_unclean;
                if seen.first_unclean.is_none() {
                    seen.first_unclean = l.first_unclean;
                }
            }
            Ok(Err(e)) => total.error(format!("task failed: {e}")),
            Err(_) => total.error("task did not finish".into()),
        }
    }
    out.ops = total.ops;
    out.errors = total.errors;
    out.first_error = total.first_error;
    out.set_latency(&total.hist);
    out.proxy_cpu_s = cpu0.zip(cpu1).map(|(a, b)| b - a);
    out.tls = Some(TlsStats {
        handshakes_full: Some(seen.full + seen.full_hrr),
        handshakes_hrr: Some(seen.full_hrr),
        handshakes_resumed: Some(seen.resumed),
        proxy_close_notify: Some(seen.peer_notified),
        proxy_close_unclean: Some(seen.peer_unclean),
        first_unclean_close: seen.first_unclean,
        ..TlsStats::default()
    });
    out
}

async fn one_tls_loop(
    addr: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    deadline: Instant,
) -> (Tally, TlsLoop) {
    let payload = Bytes::from(vec![0x5Au8; 64]);
    let cfg = client::ws_config(4096);
    let mut tally = Tally::new();
    let mut seen = TlsLoop::default();
    while Instant::now() < deadline {
        let t0 = Instant::now();
        let connected = client::wss_connect(
            addr,
            client::next_source(),
            connector.clone(),
            cfg,
            STEP_LIMIT,
        )
        .await;
        let mut ws = match connected {
            Ok(ws) => ws,
            Err(e) => {
                tally.error(e);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let kind = ws.get_ref().get_ref().1.handshake_kind();
        if let Err(e) = client::echo_once(&mut ws, &payload, STEP_LIMIT).await {
            tally.error(e);
            continue;
        }
        let latency = t0.elapsed();
        match client::close_tls(ws, STEP_LIMIT).await {
            Ok(end) => {
                if Instant::now() > deadline {
                    continue;
                }
                match end {
                    TlsEnd::Notified => seen.peer_notified += 1,
                    TlsEnd::Unclean(e) => {
                        seen.peer_unclean += 1;
                        seen.first_unclean.get_or_insert(e);
                    }
                }
            }
            Err(e) => {
                tally.error(e);
                continue;
            }
        }
        // Counted with the op, so that the kinds add up to the ops.
        tally.record_us(latency.as_micros() as u64);
        match kind {
            Some(rustls::HandshakeKind::Resumed) => seen.resumed += 1,
            Some(rustls::HandshakeKind::FullWithHelloRetryRequest) => seen.full_hrr += 1,
            _ => seen.full += 1,
        }
    }
    (tally, seen)
}
