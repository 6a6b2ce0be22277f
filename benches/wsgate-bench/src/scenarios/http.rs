//! Plain HTTP: `GET /` with keep-alive over `conns` connections. Uses wrk
//! (`--latency`) when available, else a hyper client loop in this process.
//! With a TLS setup (`https`), the same over TLS to the proxy's TLS listener:
//! wrk gets `https://localhost:PORT/` (OpenSSL, SNI `localhost`, no
//! verification), the built-in client rustls (SNI `localhost`, ALPN
//! `http/1.1`, TLS 1.3, the certificate verified).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::process::Command;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use super::{Outcome, Tally, TlsStats};
use crate::client;
use crate::procstat::Probe;
use crate::tls::TlsSetup;

const STEP_LIMIT: Duration = Duration::from_secs(5);

pub async fn run(
    addr: SocketAddr,
    conns: usize,
    duration: Duration,
    probe: Probe,
    wrk: Option<&Path>,
    tls: Option<&TlsSetup>,
) -> Outcome {
    let mut out = match wrk {
        Some(w) => run_wrk(w, addr, conns, duration, probe, tls.is_some()).await,
        None => run_own(addr, conns, duration, probe, tls).await,
    };
    if tls.is_some() {
        out.tls = Some(TlsStats {
            client: Some(
                if wrk.is_some() {
                    "wrk (OpenSSL)"
                } else {
                    "rustls"
                }
                .into(),
            ),
            ..TlsStats::default()
        });
    }
    out
}

/// wrk's URL: `http://ADDR/`, or over TLS `https://localhost:PORT/` (SNI
/// `localhost`; wrk connects to the first address of the name that takes a
/// connection, so it must resolve to 127.0.0.1 among others, as in
/// /etc/hosts: `localhost_ok`), else `https://ADDR/`.
fn wrk_url(addr: SocketAddr, tls: bool, localhost_ok: bool) -> String {
    match (tls, localhost_ok) {
        (true, true) => format!("https://{}:{}/", crate::tls::SERVER_NAME, addr.port()),
        (true, false) => format!("https://{addr}/"),
        (false, _) => format!("http://{addr}/"),
    }
}

/// Whether `localhost` resolves to `addr`'s IP address among others.
fn localhost_resolves_to(addr: SocketAddr) -> bool {
    use std::net::ToSocketAddrs;
    (crate::tls::SERVER_NAME, addr.port())
        .to_socket_addrs()
        .map(|mut a| a.any(|a| a.ip() == addr.ip()))
        .unwrap_or(false)
}

async fn run_wrk(
    wrk: &Path,
    addr: SocketAddr,
    conns: usize,
    duration: Duration,
    probe: Probe,
    tls: bool,
) -> Outcome {
    let mut out = Outcome {
        connections: conns as u64,
        note: Some("wrk".into()),
        ..Default::default()
    };
    let secs = duration.as_secs().max(1);
    let child = Command::new(wrk)
        .args([
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
            "--timeout",
            "5s",
            &wrk_url(addr, tls, tls && localhost_resolves_to(addr)),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            out.note_error(format!("cannot run wrk: {e}"));
            return out;
        }
    };
    let cpu0 = probe.cpu_s();
    let waited = timeout(duration + Duration::from_secs(30), child.wait_with_output()).await;
    let cpu1 = probe.cpu_s();
    out.proxy_cpu_s = cpu0.zip(cpu1).map(|(a, b)| b - a);
    let output = match waited {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            out.note_error(format!("wrk: {e}"));
            return out;
        }
        Err(_) => {
            out.note_error("wrk did not finish in time".into());
            return out;
        }
    };
    let text = String::from_utf8_lossy(&output.stdout);
    match parse_wrk(&text) {
        Some(w) => {
            out.ops = w.requests;
            out.duration_s = w.duration_s;
            out.p50_us = w.p50_us;
            out.p99_us = w.p99_us;
            out.max_us = w.max_us;
            out.errors = w.errors;
            if w.errors > 0 {
                out.first_error = Some(format!("wrk reported {} errors", w.errors));
            }
        }
        None => out.note_error(format!(
            "could not parse wrk output: {} {}",
            text.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        )),
    }
    out
}

#[derive(Debug, Default, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub duration_s: f64,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub max_us: Option<u64>,
    pub errors: u64,
}

/// "480.00us", "1.20ms", "2.00s", "1.00m" → microseconds.
fn parse_time_us(s: &str) -> Option<u64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let mult = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some((v * mult).round() as u64)
}

/// Parses wrk 4's `--latency` output.
pub fn parse_wrk(text: &str) -> Option<WrkResult> {
    let mut r = WrkResult::default();
    let mut have_total = false;
    for line in text.lines() {
        let t = line.trim();
        let words: Vec<&str> = t.split_whitespace().collect();
        match words.as_slice() {
            ["Latency", _avg, _stdev, max, ..] => r.max_us = parse_time_us(max),
            ["50%", v] => r.p50_us = parse_time_us(v),
            ["99%", v] => r.p99_us = parse_time_us(v),
            [n, "requests", "in", d, ..] => {
                r.requests = n.parse().ok()?;
                r.duration_s = parse_time_us(d.trim_end_matches(','))? as f64 / 1e6;
                have_total = true;
            }
            ["Socket", "errors:", rest @ ..] => {
                // connect 0, read 0, write 0, timeout 0
                r.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>().ok()?,
            _ => {}
        }
    }
    have_total.then_some(r)
}

async fn run_own(
    addr: SocketAddr,
    conns: usize,
    duration: Duration,
    probe: Probe,
    tls: Option<&TlsSetup>,
) -> Outcome {
    let mut out = Outcome {
        connections: conns as u64,
        note: Some("built-in client".into()),
        ..Default::default()
    };
    let cpu0 = probe.cpu_s();
    let start = Instant::now();
    let deadline = start + duration;
    let connector = tls.map(TlsSetup::connector);
    let tasks: Vec<_> = (0..conns)
        .map(|_| tokio::spawn(conn_loop(addr, connector.clone(), deadline)))
        .collect();
    tokio::time::sleep_until(deadline.into()).await;
    let cpu1 = probe.cpu_s();
    out.duration_s = duration.as_secs_f64();
    let mut total = Tally::new();
    for t in tasks {
        match timeout(STEP_LIMIT * 3, t).await {
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

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// A keep-alive HTTP/1.1 connection, over TLS with `tls`.
async fn connect(addr: SocketAddr, tls: Option<&TlsConnector>) -> Result<Sender, String> {
    let fut = async {
        let stream = client::tcp_connect(addr, client::next_source())
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let Some(tls) = tls else {
            return handshake(stream).await;
        };
        let stream = tls
            .connect(crate::tls::server_name(), stream)
            .await
            .map_err(|e| format!("TLS handshake {addr}: {e}"))?;
        handshake(stream).await
    };
    timeout(STEP_LIMIT, fut)
        .await
        .unwrap_or_else(|_| Err("connect timed out".into()))
}

async fn handshake<S>(stream: S) -> Result<Sender, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn get(sender: &mut Sender, addr: SocketAddr) -> Result<(), String> {
    let fut = async {
        sender
            .ready()
            .await
            .map_err(|e| format!("not ready: {e}"))?;
        let req = Request::get("/")
            .header("host", addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status();
        resp.into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    };
    timeout(STEP_LIMIT, fut)
        .await
        .unwrap_or_else(|_| Err("request timed out".into()))
}

async fn conn_loop(addr: SocketAddr, tls: Option<TlsConnector>, deadline: Instant) -> Tally {
    let mut tally = Tally::new();
    let mut sender: Option<Sender> = None;
    while Instant::now() < deadline {
        let Some(s) = sender.as_mut() else {
            match connect(addr, tls.as_ref()).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    tally.error(e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            continue;
        };
        let t0 = Instant::now();
        match get(s, addr).await {
            Ok(()) => {
                if Instant::now() <= deadline {
                    tally.record_us(t0.elapsed().as_micros() as u64);
                }
            }
            Err(e) => {
                tally.error(e);
                sender = None;
            }
        }
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Running 3s test @ http://127.0.0.1:8080/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   510.12us  100.00us   5.02ms   90.00%
    Req/Sec    40.00k     1.00k   42.00k    80.00%
  Latency Distribution
     50%  480.00us
     75%  600.00us
     90%  700.00us
     99%    1.20ms
  120345 requests in 3.00s, 12.30MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  40115.00
Transfer/sec:      4.10MB
";

    #[test]
    fn parses_wrk_latency_output() {
        let r = parse_wrk(SAMPLE).unwrap();
        assert_eq!(r.requests, 120345);
        assert_eq!(r.duration_s, 3.0);
        assert_eq!(r.p50_us, Some(480));
        assert_eq!(r.p99_us, Some(1200));
        assert_eq!(r.max_us, Some(5020));
        assert_eq!(r.errors, 8);
    }

    #[test]
    fn wrk_gets_the_certificate_name_over_tls() {
        let a: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        assert_eq!(wrk_url(a, false, true), "http://127.0.0.1:8443/");
        assert_eq!(wrk_url(a, true, true), "https://localhost:8443/");
        assert_eq!(wrk_url(a, true, false), "https://127.0.0.1:8443/");
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_wrk("unable to connect").is_none());
    }
}
