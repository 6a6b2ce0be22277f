//! The faults the soak injects, each on its own schedule bounded by the
//! phase: backend kills and restarts on the same port, vanishing clients (by
//! vanish rounds the tunnels watch), and SIGHUP reloads of a rewritten config.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::gate::Reloader;
use super::state::{F_SETUP, Shared, bump};
use crate::backend::{self, Backend, Kill};

/// How long a restart keeps trying to bind its port.
const REBIND_LIMIT: Duration = Duration::from_secs(5);
/// A kill is scheduled only if its backend is back this long before the
/// phase ends, so that the drain finds every backend up.
const KILL_MARGIN: Duration = Duration::from_secs(2);

/// The echo backends, each on a fixed port for the whole run.
pub struct Backends {
    slots: Mutex<Vec<Option<Backend>>>,
    ports: Vec<u16>,
}

fn options(i: usize, port: u16) -> backend::Options {
    backend::Options {
        port,
        greeting: Some(format!("backend={i}")),
        killable: true,
        tls: None,
        upgrade_log: None,
        tls_log: None,
    }
}

impl Backends {
    pub async fn start(ports: &[u16]) -> Result<Backends, String> {
        let mut slots = Vec::with_capacity(ports.len());
        for (i, &port) in ports.iter().enumerate() {
            let b = backend::start_with(options(i, port))
                .await
                .map_err(|e| format!("backend {i} on port {port}: {e}"))?;
            slots.push(Some(b));
        }
        Ok(Backends {
            slots: Mutex::new(slots),
            ports: ports.to_vec(),
        })
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.ports
            .iter()
            .map(|&p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.ports.len()
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Option<Backend>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sockets the backends hold now.
    pub fn live(&self) -> usize {
        self.slots().iter().flatten().map(|b| b.live()).sum()
    }

    /// Backends down now.
    pub fn down(&self) -> Vec<usize> {
        self.slots()
            .iter()
            .enumerate()
            .filter(|(_, b)| b.is_none())
            .map(|(i, _)| i)
            .collect()
    }

    /// Marks backend `i` killed (so tunnels on it expect their Close 1014),
    /// then kills it.
    pub fn kill(&self, i: usize, how: Kill, shared: &Shared) {
        let Some(b) = self.slots()[i].take() else {
            return;
        };
        shared.mark_killed(i);
        b.kill(how);
    }

    /// Starts backend `i` again on its port, then marks it up.
    pub async fn restart(&self, i: usize, shared: &Shared) -> Result<(), String> {
        let deadline = Instant::now() + REBIND_LIMIT;
        // Bounded by the deadline: the killed listener is dropped when its
        // task is next polled, which may take a moment.
        let b = loop {
            match backend::start_with(options(i, self.ports[i])).await {
                Ok(b) => break b,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("backend {i} on port {}: {e}", self.ports[i]));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        self.slots()[i] = Some(b);
        shared.mark_restarted(i);
        Ok(())
    }
}

/// How many kills fit in a phase of `duration`: one every `every`, each
/// restarted `restart_after` later, the last back `KILL_MARGIN` before the end.
pub fn planned_kills(duration: Duration, every: Duration, restart_after: Duration) -> u64 {
    if every.is_zero() {
        return 0;
    }
    let mut k = 0u64;
    // Bounded: `every` is not zero and the duration is finite.
    while every * (k as u32 + 1) + restart_after + KILL_MARGIN <= duration {
        k += 1;
    }
    k
}

/// Kills backend (k mod n) at every `every`, alternately with FINs and with
/// resets, and restarts it `restart_after` later.
pub async fn killer(
    backends: Arc<Backends>,
    shared: Arc<Shared>,
    every: Duration,
    restart_after: Duration,
    count: u64,
) {
    for k in 1..=count {
        tokio::time::sleep_until(shared.t0 + every * k as u32).await;
        let i = (k as usize - 1) % backends.len();
        let how = if k % 2 == 1 { Kill::Fin } else { Kill::Rst };
        let live = backends.live();
        backends.kill(i, how, &shared);
        bump(if how == Kill::Fin {
            &shared.stats.kills_fin
        } else {
            &shared.stats.kills_rst
        });
        eprintln!(
            "  [{:>5.1}s] killed backend {i} ({}; backends held {live} sockets)",
            shared.at(),
            if how == Kill::Fin { "FIN" } else { "RST" }
        );
        tokio::time::sleep(restart_after).await;
        match backends.restart(i, &shared).await {
            Ok(()) => eprintln!("  [{:>5.1}s] restarted backend {i}", shared.at()),
            Err(e) => shared
                .stats
                .fail(F_SETUP, "a backend could not be restarted", || e),
        }
    }
}

/// Raises the vanish round every `every` until `deadline`.
pub async fn vanisher(shared: Arc<Shared>, every: Duration, deadline: Instant) {
    if every.is_zero() {
        return;
    }
    // Bounded: at most deadline / every rounds.
    for k in 1u32.. {
        let at = shared.t0 + every * k;
        if at >= deadline {
            return;
        }
        tokio::time::sleep_until(at).await;
        shared.chaos.send_modify(|c| c.vanish_round += 1);
    }
}

/// Rewrites the config and sends SIGHUP every `every` until `deadline`.
pub async fn reloader(reloader: Reloader, shared: Arc<Shared>, every: Duration, deadline: Instant) {
    if every.is_zero() {
        return;
    }
    // Bounded: at most deadline / every reloads.
    for k in 1u32.. {
        let at = shared.t0 + every * k;
        if at >= deadline {
            return;
        }
        tokio::time::sleep_until(at).await;
        match reloader.reload() {
            Ok(()) => bump(&shared.stats.reloads_sent),
            Err(e) => shared.stats.fail(F_SETUP, "reload not sent", || e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kills_fit_the_phase() {
        let s = Duration::from_secs;
        assert_eq!(planned_kills(s(300), s(30), s(5)), 9);
        assert_eq!(planned_kills(s(60), s(30), s(5)), 1);
        assert_eq!(planned_kills(s(60), s(0), s(5)), 0);
    }
}
