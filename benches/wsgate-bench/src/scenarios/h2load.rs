//! HTTPS `GET /` over HTTP/2 (`h2`, `h2_m10`), driven by h2load (nghttp2):
//! `conns` connections to the proxy's TLS listener (SNI `localhost`; ALPN
//! `h2` only, with `--npn-list`, which h2load 1.52 uses for ALPN too; the TLS
//! 1.3 suites in rustls' order, so that every proxy can settle on the same
//! one), `streams` requests at a time on each, for the duration. Requests/s
//! and errors come from h2load's summary, the latency percentiles from its
//! per-request log (`--log-file`), what TLS negotiated from its report.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tokio::time::timeout;

use super::{Outcome, TlsStats, new_hist};
use crate::procstat::Probe;
use crate::tls::Negotiated;

/// TLS 1.3 suites offered by h2load, in the order the tool's rustls clients
/// offer them (h2load's default puts AES-128 first).
const TLS13_CIPHERS: &str =
    "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";

/// h2load's arguments; the log file gets one line per request.
pub fn args(
    addr: SocketAddr,
    conns: usize,
    streams: u32,
    duration: Duration,
    log: &Path,
) -> Vec<String> {
    vec![
        format!("--clients={conns}"),
        format!("--max-concurrent-streams={streams}"),
        "--threads=1".into(),
        format!("--duration={}", duration.as_secs().max(1)),
        format!("--log-file={}", log.display()),
        format!("--tls13-ciphers={TLS13_CIPHERS}"),
        "--npn-list=h2".into(),
        // SNI and :authority localhost, the connection to the proxy's address.
        format!("--connect-to={addr}"),
        format!("https://{}:{}/", crate::tls::SERVER_NAME, addr.port()),
    ]
}

pub async fn run(
    h2load: &Path,
    addr: SocketAddr,
    conns: usize,
    streams: u32,
    duration: Duration,
    probe: Probe,
    dir: &Path,
) -> Outcome {
    let mut out = Outcome {
        connections: conns as u64,
        note: Some(format!("h2load -m {streams}")),
        ..Default::default()
    };
    let log = dir.join(format!("h2load-{}-{}.log", addr.port(), std::process::id()));
    let _ = std::fs::remove_file(&log);
    let child = Command::new(h2load)
        .args(args(addr, conns, streams, duration, &log))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            out.note_error(format!("cannot run h2load: {e}"));
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
            out.note_error(format!("h2load: {e}"));
            return out;
        }
        Err(_) => {
            out.note_error("h2load did not finish in time".into());
            return out;
        }
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let parsed = parse(&text);
    let Some(r) = parsed else {
        out.note_error(format!(
            "could not parse h2load output: {} {}",
            text.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
        return out;
    };
    out.ops = r.ok_2xx;
    out.duration_s = r.duration_s;
    out.errors = r.failed;
    if r.failed > 0 {
        out.first_error = Some(format!(
            "h2load: {} failed ({} errored, {} timed out, {} non-2xx)",
            r.failed,
            r.errored,
            r.timeout,
            r.failed - r.errored
        ));
    }
    if r.negotiated.alpn.as_deref() != Some("h2") {
        out.note_error(format!(
            "h2load did not get h2 by ALPN (got {:?})",
            r.negotiated.alpn
        ));
    }
    match std::fs::read_to_string(&log) {
        Ok(l) => {
            let h = log_histogram(&l);
            if h.is_empty() {
                out.max_us = r.max_us;
            } else {
                out.set_latency(&h);
            }
        }
        Err(e) => {
            out.max_us = r.max_us;
            out.note_error(format!("h2load log {}: {e}", log.display()));
        }
    }
    let _ = std::fs::remove_file(&log);
    out.tls = Some(TlsStats {
        client: Some("h2load (OpenSSL)".into()),
        negotiated: Some(r.negotiated),
        negotiated_by: Some("h2load".into()),
        ..TlsStats::default()
    });
    out
}

/// h2load's summary.
#[derive(Debug, Default, PartialEq)]
pub struct H2loadResult {
    pub duration_s: f64,
    pub done: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub timeout: u64,
    pub ok_2xx: u64,
    pub max_us: Option<u64>,
    /// In rustls' names (`TLSv1_3`, `TLS13_AES_256_GCM_SHA384`, `X25519`)
    /// so that they compare with the rustls probes'.
    pub negotiated: Negotiated,
}

/// "210us", "13.33ms", "1.50s" → microseconds.
fn parse_time_us(s: &str) -> Option<u64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let mult = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        _ => return None,
    };
    Some((v * mult).round() as u64)
}

/// `N word` pairs after a `label:` → the N before `word`.
fn count_before(words: &[&str], word: &str) -> Option<u64> {
    words
        .windows(2)
        .find(|w| w[1].trim_end_matches(',') == word)
        .and_then(|w| w[0].parse().ok())
}

/// OpenSSL's names → rustls' (`TLSv1.3` → `TLSv1_3`,
/// `TLS_AES_256_GCM_SHA384` → `TLS13_AES_256_GCM_SHA384`, `X25519`).
fn rustls_version(v: &str) -> String {
    v.replace('.', "_")
}

fn rustls_suite(s: &str) -> String {
    match s.strip_prefix("TLS_") {
        Some(rest) => format!("TLS13_{rest}"),
        None => s.to_string(),
    }
}

fn rustls_group(g: &str) -> String {
    match g {
        "P-256" | "prime256v1" => "secp256r1".into(),
        "P-384" | "secp384r1" => "secp384r1".into(),
        "P-521" | "secp521r1" => "secp521r1".into(),
        other => other.to_string(),
    }
}

/// Parses h2load's output (nghttp2 1.52); None without its summary.
pub fn parse(text: &str) -> Option<H2loadResult> {
    let mut r = H2loadResult::default();
    let mut have_total = false;
    let mut have_requests = false;
    for line in text.lines() {
        let t = line.trim();
        let words: Vec<&str> = t.split_whitespace().collect();
        match words.as_slice() {
            ["finished", "in", d, ..] => {
                r.duration_s = parse_time_us(d.trim_end_matches(','))? as f64 / 1e6;
                have_total = true;
            }
            ["requests:", rest @ ..] => {
                r.done = count_before(rest, "done")?;
                r.succeeded = count_before(rest, "succeeded")?;
                r.failed = count_before(rest, "failed")?;
                r.errored = count_before(rest, "errored")?;
                r.timeout = count_before(rest, "timeout")?;
                have_requests = true;
            }
            ["status", "codes:", rest @ ..] => r.ok_2xx = count_before(rest, "2xx")?,
            ["time", "for", "request:", _min, max, ..] => r.max_us = parse_time_us(max),
            ["TLS", "Protocol:", v] => r.negotiated.version = Some(rustls_version(v)),
            ["Cipher:", c] => r.negotiated.cipher = Some(rustls_suite(c)),
            ["Server", "Temp", "Key:", g, ..] => {
                r.negotiated.group = Some(rustls_group(g.trim_end_matches(',')))
            }
            ["Application", "protocol:", p] => r.negotiated.alpn = Some(p.to_string()),
            _ => {}
        }
    }
    (have_total && have_requests).then_some(r)
}

/// The per-request log (start µs, status, duration µs, tab-separated): a
/// histogram of the 2xx requests' durations.
pub fn log_histogram(log: &str) -> hdrhistogram::Histogram<u64> {
    let mut h = new_hist();
    for line in log.lines() {
        let mut cols = line.split('\t');
        let (_start, status, dur) = (cols.next(), cols.next(), cols.next());
        let ok = status
            .and_then(|s| s.trim().parse::<i32>().ok())
            .is_some_and(|s| (200..300).contains(&s));
        if let (true, Some(us)) = (ok, dur.and_then(|d| d.trim().parse::<u64>().ok())) {
            h.saturating_record(us.max(1));
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "starting benchmark...
spawning thread #0: 50 total client(s). Timing-based test with 0s of warm-up time and 3s of main duration for measurements.
TLS Protocol: TLSv1.3
Cipher: TLS_AES_256_GCM_SHA384
Server Temp Key: X25519 253 bits
Application protocol: h2
Warm-up started for thread #0.
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 3.00s, 32620.33 req/s, 1.07MB/s
requests: 97861 total, 97911 started, 97861 done, 97858 succeeded, 3 failed, 2 errored, 1 timeout
status codes: 97858 2xx, 0 3xx, 0 4xx, 1 5xx
traffic: 3.22MB (3378003) total, 1.21MB (1272193) headers (space savings 95.39%), 293.58KB (300627) data
                     min         max         mean         sd        +/- sd
time for request:      210us     13.33ms      1.50ms       541us    82.60%
time for connect:    10.00ms     62.15ms     38.53ms     13.90ms    60.00%
time to 1st byte:    53.73ms     66.35ms     60.53ms      3.37ms    62.00%
req/s           :     651.20      654.12      652.41        0.77    62.00%
";

    #[test]
    fn parses_the_summary_and_tls_report() {
        let r = parse(SAMPLE).unwrap();
        assert_eq!(r.duration_s, 3.0);
        assert_eq!((r.done, r.succeeded, r.ok_2xx), (97861, 97858, 97858));
        assert_eq!((r.failed, r.errored, r.timeout), (3, 2, 1));
        assert_eq!(r.max_us, Some(13_330));
        assert_eq!(r.negotiated.version.as_deref(), Some("TLSv1_3"));
        assert_eq!(
            r.negotiated.cipher.as_deref(),
            Some("TLS13_AES_256_GCM_SHA384")
        );
        assert_eq!(r.negotiated.group.as_deref(), Some("X25519"));
        assert_eq!(r.negotiated.alpn.as_deref(), Some("h2"));
        assert!(parse("connect: Connection refused").is_none());
    }

    #[test]
    fn percentiles_come_from_the_log_of_2xx_requests() {
        let mut log = String::new();
        for i in 1..=100u64 {
            log.push_str(&format!("1700000000{i:06}\t200\t{}\n", i * 10));
        }
        log.push_str("1700000000999999\t-1\t999999\n");
        log.push_str("1700000000999999\t503\t888888\n");
        let h = log_histogram(&log);
        assert_eq!(h.len(), 100);
        assert_eq!(h.value_at_quantile(0.5), 500);
        assert_eq!(h.value_at_quantile(0.99), 990);
        assert_eq!(h.max(), 1000);
    }

    #[test]
    fn args_ask_for_h2_at_the_proxy_with_sni_localhost() {
        let a: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let v = args(a, 50, 1, Duration::from_secs(3), Path::new("l.log"));
        for want in [
            "--clients=50",
            "--max-concurrent-streams=1",
            "--threads=1",
            "--duration=3",
            "--log-file=l.log",
            "--npn-list=h2",
            "--connect-to=127.0.0.1:8443",
            "https://localhost:8443/",
        ] {
            assert!(v.iter().any(|x| x == want), "{want} in {v:?}");
        }
        assert!(
            v.iter()
                .any(|x| x.starts_with("--tls13-ciphers=TLS_AES_256_GCM_SHA384:"))
        );
    }
}
