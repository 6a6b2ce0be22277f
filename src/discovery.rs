//! DNS service discovery of a running gateway: for every `dns` entry of every pool, a task resolves the
//! name (over `resolver`) and hands each answer to the entry's set of backends (`balancer::Discovered`),
//! which adds, drains and brings back backends; the pool's list is then rebuilt.
//!
//! When: the smallest TTL of the answer, bounded by the entry's `resolve_min` and `resolve_every`; after a
//! failure, `resolve_min` (at least a second), so a nameserver that is down is asked again soon without
//! being hammered. A failure (timeout, SERVFAIL, an empty answer) keeps the last known set, is logged and
//! counted, and shows in `/status`.
//!
//! A supervisor follows reloads, as the health checks' does: every [`SUPERVISE_EVERY`] it starts a task
//! for each entry of the current generation that has none and stops the tasks of entries a reload
//! dropped. Entries are kept across reloads while reached the same way, so their tasks and what they
//! found go on. A change of the `[dns]` table restarts every task with the new resolver.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::balancer::{Discovered, Resolution};
use crate::config::DnsConfig;
use crate::resolver::{ResolveError, Resolver};
use crate::state::Shared;

/// How often the supervisor looks for entries whose tasks must start or stop.
pub const SUPERVISE_EVERY: Duration = Duration::from_millis(250);

/// The longest one resolution may take, whatever the resolver's own timeouts and retries.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long after a failure to set up the resolver (no usable `/etc/resolv.conf`) it is tried again.
const SETUP_RETRY: Duration = Duration::from_secs(10);

/// Starts the discovery supervisor of a gateway; it ends when `shared.shutdown` is cancelled.
pub fn start(shared: &Arc<Shared>) {
    shared.tasks.spawn(supervise(Arc::clone(shared)));
}

/// A running entry task, aborted when dropped.
struct Task {
    entry: Arc<Discovered>,
    task: JoinHandle<()>,
}

impl Drop for Task {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn supervise(shared: Arc<Shared>) {
    let mut tasks: HashMap<usize, Task> = HashMap::new();
    let mut resolver: Option<(DnsConfig, Resolver)> = None;
    // After a failed setup: when to try again, and for which `[dns]` table (a new one is tried at once).
    let mut failed_setup: Option<(DnsConfig, tokio::time::Instant)> = None;
    loop {
        let state = shared.state.load_full();
        let entries: Vec<Arc<Discovered>> = state
            .pools
            .iter()
            .flat_map(|p| p.discovery.iter().cloned())
            .collect();
        if !entries.is_empty() {
            let dns = &state.config.dns;
            let waiting = failed_setup
                .as_ref()
                .is_some_and(|(config, at)| config == dns && tokio::time::Instant::now() < *at);
            if resolver.as_ref().is_none_or(|(config, _)| config != dns) && !waiting {
                match build_resolver(dns) {
                    Ok(built) => {
                        tasks.clear();
                        resolver = Some((dns.clone(), built));
                        failed_setup = None;
                    }
                    Err(error) => {
                        if failed_setup.is_none() {
                            tracing::error!(%error, retry_s = SETUP_RETRY.as_secs(), "cannot set up DNS resolution: discovered backends are not followed");
                        }
                        failed_setup =
                            Some((dns.clone(), tokio::time::Instant::now() + SETUP_RETRY));
                        for entry in &entries {
                            entry.failed(Resolution::Failed, error.to_string());
                            shared
                                .metrics
                                .discovery_resolutions
                                .with_label_values(&[
                                    entry.pool.as_str(),
                                    entry.name.as_str(),
                                    "failed",
                                ])
                                .inc();
                        }
                    }
                }
            }
        }
        tasks.retain(|_, t| entries.iter().any(|e| Arc::ptr_eq(e, &t.entry)));
        if let Some((_, resolver)) = &resolver {
            for entry in entries {
                let key = Arc::as_ptr(&entry) as usize;
                if tasks.contains_key(&key) {
                    continue;
                }
                let task = shared.tasks.spawn(follow(
                    Arc::clone(&shared),
                    Arc::clone(&entry),
                    resolver.clone(),
                ));
                tasks.insert(key, Task { entry, task });
            }
        }
        drop(state);
        tokio::select! {
            _ = tokio::time::sleep(SUPERVISE_EVERY) => {}
            // Shutdown: dropping the tasks aborts them.
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

fn build_resolver(dns: &DnsConfig) -> Result<Resolver, ResolveError> {
    if dns.servers.is_empty() {
        Resolver::system()
    } else {
        Resolver::with_servers(&dns.servers)
    }
}

/// Resolves one entry's name again and again, applying each answer, until aborted or shutdown.
async fn follow(shared: Arc<Shared>, entry: Arc<Discovered>, resolver: Resolver) {
    loop {
        let settings = entry.config();
        let lookup = tokio::time::timeout(LOOKUP_TIMEOUT, resolver.lookup(&entry.host)).await;
        let (outcome, next) = match lookup {
            Ok(Ok(found)) if !found.addrs.is_empty() => {
                let now = Instant::now();
                let applied = entry.answer(&found.addrs, now);
                for backend in &applied.drained {
                    shared.close_idle_to(backend);
                }
                if applied.changed {
                    tracing::debug!(pool = %entry.pool, dns = %entry.name, "discovered set changed");
                }
                let ttl = found.ttl.unwrap_or(settings.resolve_every);
                let mut next = ttl.clamp(settings.resolve_min, settings.resolve_every);
                // `resolve_min` is at least 100 ms (config check): a TTL of 0 never makes this spin.
                if let Some(due) = applied.next_removal {
                    // Ask again when a missing address is due to drain (it may be back by then).
                    next = next.min(due.saturating_duration_since(now).max(settings.resolve_min));
                }
                (Resolution::Ok, next)
            }
            failed => {
                let (outcome, error) = match failed {
                    Ok(Ok(_)) => (Resolution::Empty, "no address in the answer".to_string()),
                    Ok(Err(error)) if error.is_empty() => (Resolution::Empty, error.to_string()),
                    Ok(Err(error)) => (Resolution::Failed, error.to_string()),
                    Err(_) => (
                        Resolution::Failed,
                        format!("no answer within {}s", LOOKUP_TIMEOUT.as_secs()),
                    ),
                };
                tracing::warn!(
                    pool = %entry.pool,
                    dns = %entry.name,
                    result = outcome.label(),
                    %error,
                    "DNS resolution failed; the last known backends stay"
                );
                entry.failed(outcome, error);
                let retry = settings
                    .resolve_min
                    .max(Duration::from_secs(1))
                    .min(settings.resolve_every);
                (outcome, retry)
            }
        };
        shared
            .metrics
            .discovery_resolutions
            .with_label_values(&[entry.pool.as_str(), entry.name.as_str(), outcome.label()])
            .inc();
        entry.prune();
        refresh(&shared, &entry);
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

/// Rebuilds the current generation's pool of `entry` (every round: a reload may have built it while
/// this entry's answer was being applied).
fn refresh(shared: &Shared, entry: &Arc<Discovered>) {
    let state = shared.state.load();
    if let Some(pool) = state.pools.get(&entry.pool)
        && pool.discovery.iter().any(|d| Arc::ptr_eq(d, entry))
    {
        pool.refresh();
        let found = entry.backends().len() as i64;
        shared
            .metrics
            .discovery_backends
            .with_label_values(&[entry.pool.as_str(), entry.name.as_str()])
            .set(found);
    }
}
