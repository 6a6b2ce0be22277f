//! Result records (one JSON line per target × scenario × run) and the final
//! markdown summary.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::scenarios::drain::DrainStats;
use crate::scenarios::storm::StormStats;
use crate::scenarios::{Outcome, Scenario, TlsStats};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub target: String,
    pub scenario: String,
    pub run: u32,
    pub threads: u32,
    pub duration_s: f64,
    pub ops: u64,
    pub ops_per_s: f64,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub max_us: Option<u64>,
    pub proxy_cpu_s: Option<f64>,
    pub ops_per_cpu_s: Option<f64>,
    pub rss_per_conn_bytes: Option<f64>,
    pub errors: u64,
    pub connections: u64,
    pub message_bytes: Option<u64>,
    pub rss_before_bytes: Option<u64>,
    pub rss_after_bytes: Option<u64>,
    pub rss_after_close_bytes: Option<u64>,
    /// Idle scenarios: RSS at the end of the hold, and the growth per connection then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_held_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_per_conn_held_bytes: Option<f64>,
    /// `idle_h2`: WebSockets asked for per HTTP/2 connection (`--h2-streams`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2_streams: Option<u64>,
    /// `idle_h2`: HTTP/2 connections that carried the held WebSockets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2_conns: Option<u64>,
    /// `idle_h2`: proxy RSS growth per HTTP/2 connection, its streams included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_per_h2_conn_bytes: Option<f64>,
    /// `storm`, `storm_cost`: the configuration measured (`no_limit` or
    /// `gate`; `no_limits` or `limits`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// `storm`: the storm's own figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storm: Option<StormStats>,
    /// `drain`: the drain's own figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainStats>,
    /// The TLS scenarios: the certificate's key type (`ecdsa`, `rsa2048`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<String>,
    /// The TLS load scenarios: what was negotiated, handshake kinds, closes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsStats>,
    pub first_error: Option<String>,
    pub note: Option<String>,
    pub unix_time: u64,
    /// 1-minute load average when the measurement ended: other work on the
    /// machine shows up here.
    pub loadavg_1m: Option<f64>,
}

impl Record {
    pub fn new(target: &str, scenario: &str, run: u32, threads: u32, o: Outcome) -> Record {
        let ops_per_s = if o.duration_s > 0.0 {
            o.ops as f64 / o.duration_s
        } else {
            0.0
        };
        // Below 10 ms of CPU the tick resolution makes a ratio meaningless.
        let ops_per_cpu_s = o
            .proxy_cpu_s
            .filter(|c| *c >= 0.01)
            .map(|c| o.ops as f64 / c);
        Record {
            target: target.into(),
            scenario: scenario.into(),
            run,
            threads,
            duration_s: o.duration_s,
            ops: o.ops,
            ops_per_s,
            p50_us: o.p50_us,
            p99_us: o.p99_us,
            max_us: o.max_us,
            proxy_cpu_s: o.proxy_cpu_s,
            ops_per_cpu_s,
            rss_per_conn_bytes: o.rss_per_conn_bytes,
            errors: o.errors,
            connections: o.connections,
            message_bytes: o.message_bytes,
            rss_before_bytes: o.rss_before_bytes,
            rss_after_bytes: o.rss_after_bytes,
            rss_after_close_bytes: o.rss_after_close_bytes,
            rss_held_bytes: o.rss_held_bytes,
            rss_per_conn_held_bytes: o.rss_per_conn_held_bytes,
            h2_streams: o.h2_streams,
            h2_conns: o.h2_conns,
            rss_per_h2_conn_bytes: o.rss_per_h2_conn_bytes,
            variant: o.variant,
            storm: o.storm,
            drain: o.drain,
            tls_key: None,
            tls: o.tls,
            first_error: o.first_error,
            note: o.note,
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            loadavg_1m: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok())),
        }
    }
}

/// Appends records to a .jsonl file, flushing each line.
pub struct Sink {
    w: BufWriter<File>,
}

impl Sink {
    pub fn create(path: &Path) -> std::io::Result<Sink> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        Ok(Sink {
            w: BufWriter::new(File::create(path)?),
        })
    }

    pub fn write(&mut self, r: &Record) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.w, r)?;
        self.w.write_all(b"\n")?;
        self.w.flush()
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn fmt_num(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn fmt_ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

struct Summary {
    rss_per_h2_conn: Option<f64>,
    ops_per_s: Option<f64>,
    p99_us: Option<f64>,
    ops_per_cpu_s: Option<f64>,
    rss_per_conn: Option<f64>,
    errors: u64,
    runs: usize,
}

fn summarize(rs: &[&Record]) -> Summary {
    let opt = |f: &dyn Fn(&Record) -> Option<f64>| median(rs.iter().filter_map(|r| f(r)).collect());
    Summary {
        rss_per_h2_conn: opt(&|r| r.rss_per_h2_conn_bytes),
        ops_per_s: opt(&|r| Some(r.ops_per_s)),
        p99_us: opt(&|r| r.p99_us.map(|v| v as f64)),
        ops_per_cpu_s: opt(&|r| r.ops_per_cpu_s),
        rss_per_conn: opt(&|r| r.rss_per_conn_bytes),
        errors: rs.iter().map(|r| r.errors).sum(),
        runs: rs.len(),
    }
}

/// `idle_h2 S=100` for idle_h2's records (S: WebSockets per HTTP/2
/// connection), the scenario's name otherwise.
fn label(sc: &str, rs: &[&Record]) -> String {
    match rs.iter().find_map(|r| r.h2_streams) {
        Some(s) => format!("{sc} S={s}"),
        None => sc.to_string(),
    }
}

/// Markdown: per scenario, medians over runs per target, and wsgate's ratio
/// to each other target (ops/s and ops per CPU-second; for the idle
/// scenarios, memory). For idle_h2, a line per target with the RSS per HTTP/2
/// connection follows the table.
pub fn markdown(records: &[Record], scenarios: &[&str], targets: &[&str]) -> String {
    let mut by: BTreeMap<(&str, &str), Vec<&Record>> = BTreeMap::new();
    for r in records {
        by.entry((r.scenario.as_str(), r.target.as_str()))
            .or_default()
            .push(r);
    }
    let threads = records.first().map(|r| r.threads).unwrap_or(0);
    let mut s = format!(
        "### wsgate-bench: medians over runs, proxies with {threads} thread(s)\n\n\
         | scenario | target | runs | ops/s | p99 µs | ops per proxy CPU-s | RSS/conn B | errors | wsgate ÷ target ops/s | wsgate ÷ target ops/CPU-s |\n\
         |---|---|---|---|---|---|---|---|---|---|\n"
    );
    let mut per_h2_conn: Vec<String> = Vec::new();
    for sc in scenarios {
        let ws = by.get(&(*sc, "wsgate")).map(|v| summarize(v));
        for t in targets {
            let Some(rs) = by.get(&(*sc, *t)) else {
                continue;
            };
            let m = summarize(rs);
            let name = label(sc, rs);
            if let Some(per_conn) = m.rss_per_h2_conn {
                let conns = median(
                    rs.iter()
                        .filter_map(|r| r.h2_conns.map(|c| c as f64))
                        .collect(),
                );
                per_h2_conn.push(format!(
                    "- {name}, {t}: {} B of RSS per HTTP/2 connection ({} connections)",
                    fmt_num(Some(per_conn)),
                    conns.map_or("–".into(), |c| format!("{c:.0}")),
                ));
            }
            let (r_ops, r_cpu) = match &ws {
                Some(w) if *t != "wsgate" => {
                    if Scenario::is_idle_name(sc) {
                        // Memory: wsgate's bytes per connection ÷ the target's
                        // (below 1 means wsgate holds less).
                        (
                            match (w.rss_per_conn, m.rss_per_conn) {
                                (Some(a), Some(b)) if b > 0.0 => format!("RSS {:.2}×", a / b),
                                _ => "–".into(),
                            },
                            fmt_ratio(w.ops_per_cpu_s, m.ops_per_cpu_s),
                        )
                    } else {
                        (
                            fmt_ratio(w.ops_per_s, m.ops_per_s),
                            fmt_ratio(w.ops_per_cpu_s, m.ops_per_cpu_s),
                        )
                    }
                }
                _ => ("–".into(), "–".into()),
            };
            s.push_str(&format!(
                "| {name} | {t} | {} | {} | {} | {} | {} | {} | {r_ops} | {r_cpu} |\n",
                m.runs,
                fmt_num(m.ops_per_s),
                fmt_num(m.p99_us),
                fmt_num(m.ops_per_cpu_s),
                if *t == "direct" && Scenario::is_idle_name(sc) {
                    "na".into()
                } else {
                    fmt_num(m.rss_per_conn)
                },
                m.errors,
            ));
        }
    }
    s.push_str(
        "\nRatios above 1 favour wsgate, except the idle scenarios' `RSS` (wsgate's proxy \
         memory per connection ÷ the target's: below 1 favours wsgate). Their ops/s is the \
         rate of opening connections (for idle_tls with a full TLS handshake each; for \
         idle_h2 of opening WebSockets, S per HTTP/2 connection, whose RSS/conn is per \
         WebSocket).\n",
    );
    if !per_h2_conn.is_empty() {
        s.push('\n');
        s.push_str(&per_h2_conn.join("\n"));
        s.push('\n');
    }
    s.push_str(&tls_markdown(records, scenarios, targets));
    s
}

/// Lines about the TLS load scenarios' records: what each target negotiated
/// with the client (one line per scenario when all agree; "differ" when they
/// do not), handshakes resumed, the proxies' close_notify, and what the TLS
/// backends negotiated with each proxy. Empty without such records.
pub fn tls_markdown(records: &[Record], scenarios: &[&str], targets: &[&str]) -> String {
    let tls_records: Vec<&Record> = records.iter().filter(|r| r.tls.is_some()).collect();
    if tls_records.is_empty() {
        return String::new();
    }
    let mut keys: Vec<&str> = tls_records
        .iter()
        .filter_map(|r| r.tls_key.as_deref())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut lines = vec![format!(
        "\nTLS, client ↔ proxy (certificate key: {}):",
        if keys.is_empty() {
            "?".to_string()
        } else {
            keys.join(", ")
        }
    )];
    for sc in scenarios {
        let of = |t: &str| -> Vec<&Record> {
            tls_records
                .iter()
                .copied()
                .filter(|r| r.scenario == *sc && r.target == t)
                .collect()
        };
        // What each target negotiated (distinct over runs), and who saw it.
        let mut seen: Vec<(&str, String)> = Vec::new();
        for t in targets {
            let mut v: Vec<String> = of(t)
                .iter()
                .filter_map(|r| {
                    let tls = r.tls.as_ref()?;
                    let n = tls.negotiated.as_ref()?;
                    let mut line = n.summary();
                    if let Some(a) = &n.alpn {
                        line.push_str(&format!(" ALPN {a}"));
                    }
                    if let Some(by) = &tls.negotiated_by {
                        line.push_str(&format!(" ({by})"));
                    }
                    Some(line)
                })
                .collect();
            v.sort();
            v.dedup();
            if !v.is_empty() {
                seen.push((t, v.join("; ")));
            }
        }
        if let Some((_, first)) = seen.first() {
            if seen.iter().all(|(_, v)| v == first) {
                lines.push(format!("- {sc}: {first}, every target"));
            } else {
                let each: Vec<String> = seen.iter().map(|(t, v)| format!("{t} {v}")).collect();
                lines.push(format!(
                    "- {sc}: **targets negotiated differently**: {}",
                    each.join(" | ")
                ));
            }
        }
        for t in targets {
            let rs = of(t);
            let sum = |f: &dyn Fn(&TlsStats) -> Option<u64>| -> Option<u64> {
                rs.iter()
                    .filter_map(|r| r.tls.as_ref().and_then(f))
                    .reduce(|a, b| a + b)
            };
            if let (Some(full), Some(resumed)) =
                (sum(&|x| x.handshakes_full), sum(&|x| x.handshakes_resumed))
            {
                let n = full + resumed;
                let pct = if n > 0 {
                    100.0 * resumed as f64 / n as f64
                } else {
                    0.0
                };
                let mut line =
                    format!("- {sc}, {t}: {resumed} of {n} handshakes resumed ({pct:.1}%)");
                if let Some(h) = sum(&|x| x.handshakes_hrr).filter(|&h| h > 0) {
                    line.push_str(&format!(", {h} full ones with a HelloRetryRequest"));
                }
                if let (Some(ok), Some(bad)) = (
                    sum(&|x| x.proxy_close_notify),
                    sum(&|x| x.proxy_close_unclean),
                ) {
                    line.push_str(&format!(
                        "; the proxy answered the client's close_notify with its own in {ok} of {}",
                        ok + bad
                    ));
                    if let Some(e) = rs
                        .iter()
                        .find_map(|r| r.tls.as_ref()?.first_unclean_close.clone())
                    {
                        line.push_str(&format!(" (else: {e})"));
                    }
                }
                lines.push(line);
            }
            let mut backend: BTreeMap<String, u64> = BTreeMap::new();
            let mut backend_resumed = 0;
            for r in &rs {
                let Some(tls) = &r.tls else { continue };
                for (k, v) in tls.backend_sessions.iter().flatten() {
                    *backend.entry(k.clone()).or_default() += v;
                }
                backend_resumed += tls.backend_resumed.unwrap_or(0);
            }
            if !backend.is_empty() {
                let each: Vec<String> = backend.iter().map(|(k, v)| format!("{k} ×{v}")).collect();
                lines.push(format!(
                    "- {sc}, {t} → TLS backends: {} ({backend_resumed} resumed)",
                    each.join(", ")
                ));
            }
        }
    }
    lines.join("\n") + "\n"
}

/// The values of `f` over `rs`, each run's, joined by " / ".
fn per_run(rs: &[&Record], f: &dyn Fn(&Record) -> String) -> String {
    rs.iter().map(|r| f(r)).collect::<Vec<_>>().join(" / ")
}

/// Markdown for `storm` and `storm_cost`: per variant, each run's figures
/// (" / " between runs), and for the cost the medians and their ratio.
pub fn storm_markdown(records: &[Record]) -> String {
    let of = |sc: &str, v: &str| -> Vec<&Record> {
        records
            .iter()
            .filter(|r| r.scenario == sc && r.variant.as_deref() == Some(v))
            .collect()
    };
    let mut s = String::new();
    let storms: Vec<(&str, Vec<&Record>)> = ["no_limit", "gate"]
        .into_iter()
        .map(|v| (v, of("storm", v)))
        .filter(|(_, rs)| !rs.is_empty())
        .collect();
    if !storms.is_empty() {
        let clients = storms[0].1[0].connections;
        s.push_str(&format!(
            "### storm: {clients} clients at once, each run's figures (run 1 / run 2 / …)\n\n\
             | variant | connected | all connected after s | connect p50 / p99 ms | backend 101s: peak 1-s window | max 100-ms bin | median 100-ms bin | 503s | other failures | queue max | wsgate CPU s |\n\
             |---|---|---|---|---|---|---|---|---|---|---|\n"
        ));
        for (v, rs) in &storms {
            let st = |r: &Record| r.storm.clone().unwrap_or_default();
            let name = match rs.iter().find_map(|r| r.storm.as_ref()?.gate_rate) {
                Some(rate) => {
                    let r0 = st(rs[0]);
                    format!(
                        "{v} (rate {rate}/s, burst {}, max_wait {}s)",
                        r0.gate_burst.unwrap_or(0),
                        r0.gate_max_wait_s.unwrap_or(0.0)
                    )
                }
                None => v.to_string(),
            };
            s.push_str(&format!(
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                per_run(rs, &|r| format!("{}", st(r).connected)),
                per_run(rs, &|r| st(r)
                    .all_connected_s
                    .map_or("–".into(), |v| format!("{v:.2}"))),
                per_run(rs, &|r| format!(
                    "{:.0} / {:.0}",
                    r.p50_us.unwrap_or(0) as f64 / 1000.0,
                    r.p99_us.unwrap_or(0) as f64 / 1000.0
                )),
                per_run(rs, &|r| format!("{}", st(r).peak_1s)),
                per_run(rs, &|r| format!("{}", st(r).max_bin)),
                per_run(rs, &|r| format!("{}", st(r).p50_bin)),
                per_run(rs, &|r| format!("{}", st(r).refused_503)),
                per_run(rs, &|r| format!("{}", st(r).failures + st(r).refused_other)),
                per_run(rs, &|r| st(r)
                    .max_queued
                    .map_or("–".into(), |q| q.to_string())),
                per_run(rs, &|r| fmt_num(r.proxy_cpu_s)),
            ));
        }
        s.push_str(
            "\nBins are 100 ms of the backends' 101s, counted from the storm's start; the median bin \
             is taken from the first 101's bin to the last's. \"other failures\" are attempts that \
             failed without an HTTP answer (refused, reset, timed out) and answers other than 503/429; \
             clients retried after them.\n",
        );
    }
    let off = of("storm_cost", "no_limits");
    let on = of("storm_cost", "limits");
    if !off.is_empty() || !on.is_empty() {
        s.push_str(
            "\n### storm_cost: handshakes (20 loops) with admission limits never hit vs none, medians over runs\n\n\
             | variant | runs | handshakes/s | p99 µs | per wsgate CPU-s | errors |\n|---|---|---|---|---|---|\n",
        );
        let mut meds = Vec::new();
        for (v, rs) in [("no_limits", &off), ("limits", &on)] {
            if rs.is_empty() {
                meds.push(None);
                continue;
            }
            let m = summarize(rs);
            s.push_str(&format!(
                "| {v} | {} | {} | {} | {} | {} |\n",
                m.runs,
                fmt_num(m.ops_per_s),
                fmt_num(m.p99_us),
                fmt_num(m.ops_per_cpu_s),
                m.errors
            ));
            meds.push(Some(m));
        }
        if let [Some(a), Some(b)] = &meds[..] {
            s.push_str(&format!(
                "\nlimits ÷ no_limits: handshakes/s {}, per wsgate CPU-s {}\n",
                fmt_ratio(b.ops_per_s, a.ops_per_s),
                fmt_ratio(b.ops_per_cpu_s, a.ops_per_cpu_s)
            ));
        }
    }
    s
}

/// Markdown for `drain`: per spread, each run's figures (" / " between
/// runs), then `b`'s 101s per second in each spread's first run.
pub fn drain_markdown(records: &[Record]) -> String {
    let drains: Vec<&Record> = records
        .iter()
        .filter(|r| r.scenario == "drain" && r.drain.is_some())
        .collect();
    if drains.is_empty() {
        return String::new();
    }
    let mut variants: Vec<(f64, String)> = Vec::new();
    for r in &drains {
        let v = r.variant.clone().unwrap_or_default();
        let spread = r.drain.as_ref().map_or(0.0, |d| d.spread_s);
        if !variants.iter().any(|(_, x)| *x == v) {
            variants.push((spread, v));
        }
    }
    // The widest spread first, the instant cut last.
    variants.sort_by(|a, b| b.0.total_cmp(&a.0));
    let clients = drains[0].connections;
    let mut s = format!(
        "### drain: {clients} clients on two backends, backend a drained; each run's figures (run 1 / run 2 / …)\n\n\
         | spread | on a+b before | moved | Close codes | b's 101s: peak second | busiest 1-s window | busiest 100 ms | median per second (window) | last client back after s | not back, left on a, landed on a | wsgate CPU s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    let st = |r: &Record| r.drain.clone().unwrap_or_default();
    for (_, v) in &variants {
        let rs: Vec<&Record> = drains
            .iter()
            .copied()
            .filter(|r| r.variant.as_deref() == Some(v.as_str()))
            .collect();
        s.push_str(&format!(
            "| {v} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            per_run(&rs, &|r| format!("{}+{}", st(r).on_a, st(r).on_b)),
            per_run(&rs, &|r| format!("{}", st(r).moved)),
            per_run(&rs, &|r| {
                let c: Vec<String> = st(r)
                    .closes
                    .iter()
                    .map(|(k, n)| format!("{k}: {n}"))
                    .collect();
                c.join(", ")
            }),
            per_run(&rs, &|r| format!("{}", st(r).peak_per_s)),
            per_run(&rs, &|r| format!("{}", st(r).peak_1s)),
            per_run(&rs, &|r| format!("{}", st(r).max_bin)),
            per_run(&rs, &|r| format!(
                "{:.0} ({} s)",
                st(r).median_per_s,
                st(r).window_s
            )),
            per_run(&rs, &|r| st(r)
                .last_back_s
                .map_or("–".into(), |v| format!("{v:.2}"))),
            per_run(&rs, &|r| format!(
                "{}, {}, {}",
                st(r).not_back,
                st(r).left_on_a,
                st(r).landed_on_a
            )),
            per_run(&rs, &|r| fmt_num(r.proxy_cpu_s)),
        ));
    }
    s.push_str(
        "\nSeconds and bins are counted from the drain call; the median second is taken over the \
         spread's seconds (for an instant cut, until b's last 101), empty seconds included. \
         \"moved\": clients whose WebSocket ended and who had a new one that echoed.\n",
    );
    for (_, v) in &variants {
        if let Some(r) = drains
            .iter()
            .find(|r| r.variant.as_deref() == Some(v.as_str()))
        {
            let per: Vec<String> = st(r).per_s.iter().map(u32::to_string).collect();
            s.push_str(&format!(
                "\n{v}, run {}: b's 101s per second: {}\n",
                r.run,
                per.join(" ")
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(target: &str, ops_per_s: f64) -> Record {
        let o = Outcome {
            ops: (ops_per_s * 2.0) as u64,
            duration_s: 2.0,
            proxy_cpu_s: Some(1.0),
            ..Default::default()
        };
        Record::new(target, "echo64", 1, 1, o)
    }

    #[test]
    fn drain_tables_show_each_run_widest_spread_first() {
        let drain = |run: u32, spread: f64, per_s: Vec<u32>| {
            let o = Outcome {
                ops: 2500,
                duration_s: spread.max(0.5),
                connections: 5000,
                proxy_cpu_s: Some(1.0),
                variant: Some(format!("spread_{spread}s")),
                drain: Some(DrainStats {
                    clients: 5000,
                    spread_s: spread,
                    on_a: 2500,
                    on_b: 2500,
                    moved: 2500,
                    closes: [("1012".to_string(), 2500)].into_iter().collect(),
                    peak_per_s: per_s.iter().copied().max().unwrap_or(0) as u64,
                    median_per_s: 83.0,
                    window_s: per_s.len() as u64,
                    last_back_s: Some(spread.max(0.5)),
                    per_s,
                    ..DrainStats::default()
                }),
                ..Default::default()
            };
            Record::new("wsgate", "drain", run, 1, o)
        };
        let rs = vec![
            drain(1, 0.0, vec![2500]),
            drain(1, 30.0, vec![90, 80, 85]),
            drain(2, 30.0, vec![70, 97, 85]),
        ];
        let md = drain_markdown(&rs);
        let wide = md.find("| spread_30s | 2500+2500 / 2500+2500 | 2500 / 2500 | 1012: 2500 / 1012: 2500 | 90 / 97 |");
        let cut = md.find("| spread_0s | 2500+2500 | 2500 | 1012: 2500 | 2500 |");
        assert!(wide.is_some() && cut.is_some() && wide < cut, "{md}");
        assert!(
            md.contains("spread_30s, run 1: b's 101s per second: 90 80 85"),
            "{md}"
        );
        assert!(drain_markdown(&[]).is_empty());
        // The drain's fields survive a round trip through JSON.
        let line = serde_json::to_string(&rs[1]).unwrap();
        let back: Record = serde_json::from_str(&line).unwrap();
        assert_eq!(back.drain, rs[1].drain);
    }

    #[test]
    fn storm_tables_show_each_run_and_the_cost_ratio() {
        let storm = |variant: &str, peak: u64, rate: Option<f64>| {
            let o = Outcome {
                ops: 100,
                duration_s: 2.0,
                connections: 100,
                variant: Some(variant.into()),
                storm: Some(StormStats {
                    clients: 100,
                    connected: 100,
                    all_connected_s: Some(2.0),
                    peak_1s: peak,
                    gate_rate: rate,
                    gate_burst: rate.map(|_| 20),
                    gate_max_wait_s: rate.map(|_| 5.0),
                    ..StormStats::default()
                }),
                ..Default::default()
            };
            Record::new("wsgate", "storm", 1, 1, o)
        };
        let cost = |variant: &str, ops: u64| {
            let o = Outcome {
                ops,
                duration_s: 1.0,
                proxy_cpu_s: Some(1.0),
                variant: Some(variant.into()),
                ..Default::default()
            };
            Record::new("wsgate", "storm_cost", 1, 1, o)
        };
        let rs = vec![
            storm("no_limit", 900, None),
            storm("gate", 120, Some(100.0)),
            storm("gate", 110, Some(100.0)),
            cost("no_limits", 1000),
            cost("limits", 950),
        ];
        let md = storm_markdown(&rs);
        assert!(md.contains("| no_limit | 100 | 2.00 |"), "{md}");
        assert!(
            md.contains("| gate (rate 100/s, burst 20, max_wait 5s) | 100 / 100 |"),
            "{md}"
        );
        assert!(md.contains("| 120 / 110 |"), "{md}");
        assert!(
            md.contains("handshakes/s 0.95×, per wsgate CPU-s 0.95×"),
            "{md}"
        );
        // The storm's fields survive a round trip through JSON.
        let line = serde_json::to_string(&rs[1]).unwrap();
        let back: Record = serde_json::from_str(&line).unwrap();
        assert_eq!(back.storm, rs[1].storm);
        assert_eq!(back.variant.as_deref(), Some("gate"));
        // And records of other scenarios carry neither.
        assert!(
            !serde_json::to_string(&rec("wsgate", 1.0))
                .unwrap()
                .contains("variant")
        );
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn table_has_ratio() {
        let rs = vec![rec("wsgate", 200.0), rec("nginx", 100.0)];
        let md = markdown(&rs, &["echo64"], &["wsgate", "nginx"]);
        assert!(md.contains("| echo64 | nginx |"), "{md}");
        assert!(md.contains("2.00×"), "{md}");
    }

    #[test]
    fn idle_tls_compares_memory() {
        let idle = |target: &str, rss: f64| {
            let o = Outcome {
                ops: 100,
                duration_s: 1.0,
                rss_per_conn_bytes: Some(rss),
                ..Default::default()
            };
            Record::new(target, "idle_tls", 1, 1, o)
        };
        let rs = vec![idle("wsgate", 16_000.0), idle("nginx", 40_000.0)];
        let md = markdown(&rs, &["idle_tls"], &["wsgate", "nginx"]);
        assert!(md.contains("RSS 0.40×"), "{md}");
    }

    #[test]
    fn idle_h2_shows_streams_and_memory_per_connection() {
        let idle = |target: &str, rss: f64| {
            let o = Outcome {
                ops: 300,
                duration_s: 1.0,
                rss_per_conn_bytes: Some(rss),
                h2_streams: Some(100),
                h2_conns: Some(3),
                rss_per_h2_conn_bytes: Some(rss * 100.0),
                ..Default::default()
            };
            Record::new(target, "idle_h2", 1, 1, o)
        };
        let rs = vec![idle("wsgate", 5_000.0), idle("haproxy", 10_000.0)];
        let md = markdown(&rs, &["idle_h2"], &["wsgate", "haproxy"]);
        assert!(md.contains("| idle_h2 S=100 | haproxy |"), "{md}");
        assert!(md.contains("RSS 0.50×"), "{md}");
        assert!(
            md.contains(
                "- idle_h2 S=100, wsgate: 500000 B of RSS per HTTP/2 connection (3 connections)"
            ),
            "{md}"
        );
        // Older records without the HTTP/2 fields still read.
        let line = serde_json::to_string(&rs[0]).unwrap();
        let old: serde_json::Value = serde_json::from_str(&line).unwrap();
        let mut old = old.as_object().unwrap().clone();
        old.remove("h2_streams");
        old.remove("h2_conns");
        old.remove("rss_per_h2_conn_bytes");
        let back: Record = serde_json::from_value(serde_json::Value::Object(old)).unwrap();
        assert_eq!(back.h2_streams, None);
    }
}
