//! Process accounting from `/proc`: CPU time and resident memory of a process
//! tree (a proxy's master and its workers), and the file-descriptor limit.

use std::collections::HashMap;
use std::fs;

/// One process's parent and CPU ticks (utime + stime), from `/proc/PID/stat`.
fn read_stat(pid: u32) -> Option<(u32, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself hold spaces or ')':
    // the fields we want come after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); ppid is field 4, utime 14, stime 15.
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// `root` and every process descended from it.
pub fn tree_pids(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some((ppid, _)) = read_stat(pid) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() && out.len() < 100_000 {
        if let Some(kids) = children.get(&out[i]) {
            out.extend(kids.iter().copied());
        }
        i += 1;
    }
    out
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// CPU seconds (user + system) used so far by the tree rooted at `root`.
pub fn tree_cpu_seconds(root: u32) -> f64 {
    let ticks: u64 = tree_pids(root)
        .into_iter()
        .filter_map(read_stat)
        .map(|(_, t)| t)
        .sum();
    ticks as f64 / clock_ticks_per_s()
}

/// Resident set size of one process in bytes (`VmRSS` in `/proc/PID/status`).
fn rss_bytes(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Summed RSS of the tree rooted at `root`, in bytes.
pub fn tree_rss_bytes(root: u32) -> u64 {
    tree_pids(root).into_iter().filter_map(rss_bytes).sum()
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) after.
pub fn raise_nofile() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return (1024, 1024);
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: want is a valid rlimit; failure leaves the old limit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    (lim.rlim_cur, lim.rlim_max)
}

/// CPU seconds (user + system) used so far by this process, all its threads
/// (not its children).
pub fn self_cpu_seconds() -> f64 {
    // SAFETY: rusage is plain data; getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: ru is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// The kernel's `TcpExt` counters named in `names` (`/proc/net/netstat`, this
/// network namespace), in that order; 0 for one not found.
pub fn tcp_ext(names: &[&str]) -> Vec<u64> {
    let text = fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    parse_tcp_ext(&text, names)
}

fn parse_tcp_ext(text: &str, names: &[&str]) -> Vec<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(head), Some(values)) = (lines.next(), lines.next()) else {
        return vec![0; names.len()];
    };
    let head: Vec<&str> = head.split_whitespace().collect();
    let values: Vec<&str> = values.split_whitespace().collect();
    names
        .iter()
        .map(|n| {
            head.iter()
                .position(|h| h == n)
                .and_then(|i| values.get(i))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

/// Probe of the proxy under test; `None` for the direct baseline.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub pid: Option<u32>,
}

impl Probe {
    pub fn cpu_s(&self) -> Option<f64> {
        self.pid.map(tree_cpu_seconds)
    }
    pub fn rss(&self) -> Option<u64> {
        self.pid.map(tree_rss_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_measured() {
        let me = std::process::id();
        assert!(tree_pids(me).contains(&me));
        assert!(tree_rss_bytes(me) > 0);
        assert!(tree_cpu_seconds(me) >= 0.0);
        assert!(self_cpu_seconds() > 0.0);
    }

    #[test]
    fn tcp_ext_counters_by_name() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n\
                    TcpExt: 1 22 333\n\
                    IpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(
            parse_tcp_ext(text, &["ListenDrops", "ListenOverflows", "Nope"]),
            vec![333, 22, 0]
        );
        assert_eq!(parse_tcp_ext("", &["ListenDrops"]), vec![0]);
    }
}
