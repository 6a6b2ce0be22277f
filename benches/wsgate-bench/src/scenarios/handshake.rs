//! Handshake rate: `loops` concurrent loops of TCP connect → WebSocket
//! upgrade → one 64-byte echo → close. Latency is connect start to echo
//! received; an op counts once the close has completed too. `storm` runs the
//! same loops with an `Origin` header ([`run_with`]).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Outcome, Tally};
use crate::client;
use crate::procstat::Probe;

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
