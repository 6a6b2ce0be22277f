//! The active health checks of a running gateway: for every pool with a `health` table, one task probes
//! each of its backends every `interval` (the probe itself: `balancer::probe`); `fall` failures in a row
//! take a backend down, `rise` passes in a row bring it back.
//!
//! A supervisor task follows reloads: every [`SUPERVISE_EVERY`] it looks at the current config generation,
//! starts a checker for each pool that gained (or changed) its `health` table and stops the checkers of
//! pools that lost it or are gone. A checker looks the pool up in the current generation on every round,
//! so backends added or removed by a reload are followed. Everything stops when the gateway shuts down.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::balancer::probe::{ProbeError, probe};
use crate::balancer::{Backend, Pool};
use crate::config::HealthCheck;
use crate::state::Shared;

/// How often the supervisor looks for pools whose checks must start or stop.
pub const SUPERVISE_EVERY: Duration = Duration::from_millis(250);

/// Starts the health-check supervisor of a gateway; it ends when `shared.shutdown` is cancelled.
pub fn start(shared: &Arc<Shared>) {
    shared.tasks.spawn(supervise(Arc::clone(shared)));
}

/// A running checker task, aborted when dropped.
struct Checker {
    check: HealthCheck,
    task: JoinHandle<()>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn supervise(shared: Arc<Shared>) {
    let mut checkers: HashMap<String, Checker> = HashMap::new();
    loop {
        let state = shared.state.load_full();
        checkers.retain(|name, checker| {
            state
                .pools
                .get(name)
                .and_then(|p| p.health.as_ref())
                .is_some_and(|check| *check == checker.check)
        });
        for pool in state.pools.iter() {
            let Some(check) = &pool.health else { continue };
            if checkers.contains_key(&pool.name) {
                continue;
            }
            tracing::debug!(pool = %pool.name, interval_ms = check.interval.as_millis() as u64, "health checks start");
            let task = shared.tasks.spawn(check_pool(
                Arc::clone(&shared),
                pool.name.clone(),
                check.clone(),
            ));
            checkers.insert(
                pool.name.clone(),
                Checker {
                    check: check.clone(),
                    task,
                },
            );
        }
        drop(state);
        tokio::select! {
            _ = tokio::time::sleep(SUPERVISE_EVERY) => {}
            // Shutdown: dropping the checkers aborts them.
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

/// Probes every backend of pool `name` each `check.interval`, all backends at once.
async fn check_pool(shared: Arc<Shared>, name: String, check: HealthCheck) {
    let mut ticker = tokio::time::interval(check.interval);
    // A round longer than the interval (slow timeouts) delays the next rather than bunching rounds up.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shared.shutdown.cancelled() => return,
        }
        let Some(pool) = shared.state.load().pools.get(&name).cloned() else {
            return;
        };
        let backends = pool.backends();
        let probes = backends.iter().map(|b| probe(b, &check));
        let results = futures_util::future::join_all(probes).await;
        for (backend, result) in backends.iter().zip(results) {
            record(&shared, &pool, backend, &check, result);
        }
    }
}

fn record(
    shared: &Shared,
    pool: &Pool,
    backend: &Backend,
    check: &HealthCheck,
    result: Result<(), ProbeError>,
) {
    if let Err(error) = &result {
        tracing::debug!(pool = %pool.name, backend = %backend.addr, %error, "health check failed");
    }
    let Some(up) = backend.record_check(result.is_ok(), check.rise, check.fall) else {
        return;
    };
    shared
        .metrics
        .backend_up
        .with_label_values(&[pool.name.as_str(), backend.addr.as_str()])
        .set(i64::from(backend.is_available()));
    match result {
        Ok(()) => tracing::info!(
            pool = %pool.name,
            backend = %backend.addr,
            rise = check.rise,
            "backend up: health checks pass"
        ),
        Err(error) => tracing::warn!(
            pool = %pool.name,
            backend = %backend.addr,
            fall = check.fall,
            %error,
            up,
            "backend down: health checks fail"
        ),
    }
}
