//! Per-client state, bounded: how many connections or tunnels each client holds, and each client's rate
//! bucket, in one table per scope (a listener or a route).
//!
//! Counts exist only while non-zero: an entry is removed when its last connection ends, so counted
//! entries are bounded by the live connections, themselves bounded by `limits.max_connections`. Buckets
//! outlive the requests that spent them, so they are the part an attacker with many addresses could grow:
//! they are kept in two generations per shard, the older one dropped whole when the newer one is full,
//! which bounds them at `limits.max_tracked_clients` per table and forgets the least recently used first.
//! A forgotten bucket is a full one: the client's next handshake is judged as if it were its first
//! (lenient, never wrong the other way). A bucket that is full again is worth nothing and is dropped at
//! the next generation change.
//!
//! Cost per entry: a key (16 bytes) and a count (4, padded to 8) or a TAT (8), plus hashbrown's control
//! byte, in a table of at most twice the entries: under 64 bytes per tracked client. Shards have their own locks,
//! held for a few hash-table operations, never across an await.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::client::ClientKey;
use super::rate::{Cell, nanos_since};
use crate::config::Rate;

/// Independent locks, so that handshakes from different clients rarely wait for each other.
const SHARDS: usize = 16;

/// One scope's per-client state.
pub struct ClientTable {
    shards: Box<[Mutex<Shard>]>,
    /// Which shard a key lives in. Keyed (SipHash with a random key), like the shards' own maps: the
    /// keys are the clients' addresses, which an attacker chooses.
    hasher: RandomState,
    /// Most buckets per shard and generation: `max_tracked / SHARDS / 2`.
    generation: AtomicUsize,
    epoch: Instant,
}

#[derive(Default)]
struct Shard {
    counts: HashMap<ClientKey, u32>,
    recent: HashMap<ClientKey, u64>,
    older: HashMap<ClientKey, u64>,
}

impl ClientTable {
    /// A table keeping at most about `max_tracked` rate buckets.
    pub fn new(max_tracked: usize) -> ClientTable {
        let table = ClientTable {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            generation: AtomicUsize::new(1),
            epoch: Instant::now(),
        };
        table.set_max_tracked(max_tracked);
        table
    }

    /// Applies a reloaded `limits.max_tracked_clients` (a smaller one takes effect as generations turn).
    pub fn set_max_tracked(&self, max_tracked: usize) {
        self.generation
            .store((max_tracked / SHARDS / 2).max(1), Ordering::Relaxed);
    }

    fn shard(&self, key: &ClientKey) -> MutexGuard<'_, Shard> {
        let index = (self.hasher.hash_one(key) as usize) % SHARDS;
        // A panic while a shard is held leaves plain counters behind, still meaningful: carry on.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes one of `key`'s places if it holds fewer than `max`: the guard gives it back on drop.
    pub fn acquire(self: &Arc<Self>, key: ClientKey, max: u32) -> Option<Counted> {
        let mut shard = self.shard(&key);
        let count = shard.counts.entry(key).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Counted {
            table: Arc::clone(self),
            key,
        })
    }

    fn release(&self, key: &ClientKey) {
        let mut shard = self.shard(key);
        if let Some(count) = shard.counts.get_mut(key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                shard.counts.remove(key);
            }
        }
    }

    /// Spends one of `key`'s tokens at `rate`: refused with the time until one is back.
    pub fn take_token(&self, key: ClientKey, rate: &Rate) -> Result<(), Duration> {
        let cell = Cell::new(rate);
        let now = nanos_since(self.epoch, Instant::now());
        let generation = self.generation.load(Ordering::Relaxed);
        let mut shard = self.shard(&key);
        let tat = match shard.recent.get(&key) {
            Some(&tat) => tat,
            None => shard.older.remove(&key).unwrap_or(0),
        };
        let result = cell.check(tat, now);
        let tat = *result.as_ref().unwrap_or(&tat);
        if Cell::is_spent(tat, now) {
            shard.recent.remove(&key);
        } else {
            if shard.recent.len() >= generation && !shard.recent.contains_key(&key) {
                shard.older = std::mem::take(&mut shard.recent);
            }
            shard.recent.insert(key, tat);
        }
        result.map(|_| ())
    }

    /// Clients with state in this table: holding places, or with a bucket not yet forgotten.
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
                let buckets = shard.recent.len() + shard.older.len();
                let counted_only = shard
                    .counts
                    .keys()
                    .filter(|k| !shard.recent.contains_key(k) && !shard.older.contains_key(k))
                    .count();
                buckets + counted_only
            })
            .sum()
    }
}

/// One place a client holds in a table (a connection, a tunnel), given back on drop.
pub struct Counted {
    table: Arc<ClientTable>,
    key: ClientKey,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.table.release(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn key(n: u32) -> ClientKey {
        ClientKey::new(IpAddr::V4(Ipv4Addr::from(n)), 64)
    }

    #[test]
    fn places_are_counted_per_client_and_given_back() {
        let table = Arc::new(ClientTable::new(1000));
        let a1 = table.acquire(key(1), 2).expect("first");
        let a2 = table.acquire(key(1), 2).expect("second");
        assert!(
            table.acquire(key(1), 2).is_none(),
            "third over a maximum of two"
        );
        let b = table
            .acquire(key(2), 2)
            .expect("another client is counted apart");
        assert_eq!(table.tracked(), 2);
        drop(a1);
        let a3 = table.acquire(key(1), 2).expect("a place given back");
        drop((a2, a3, b));
        assert_eq!(table.tracked(), 0, "no entry outlives its places");
    }

    #[tokio::test(start_paused = true)]
    async fn buckets_limit_each_client_and_full_ones_are_forgotten() {
        let table = ClientTable::new(1000);
        let rate = Rate {
            per_second: 1.0,
            burst: 2,
        };
        assert!(table.take_token(key(1), &rate).is_ok());
        assert!(table.take_token(key(1), &rate).is_ok());
        let retry = table.take_token(key(1), &rate).expect_err("burst spent");
        assert_eq!(retry, Duration::from_secs(1));
        assert!(table.take_token(key(2), &rate).is_ok(), "others unaffected");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(table.take_token(key(1), &rate).is_ok(), "a token came back");
        assert_eq!(table.tracked(), 2);
        // Once refilled, a bucket is dropped the next time it is looked at.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(table.take_token(key(2), &rate).is_ok());
        assert_eq!(
            table.tracked(),
            2,
            "key 2 spent a token again; key 1 not looked at"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_million_addresses_do_not_grow_the_table_past_its_cap() {
        let cap = 4096;
        let table = ClientTable::new(cap);
        let rate = Rate {
            per_second: 0.001,
            burst: 1,
        };
        for n in 0..1_000_000u32 {
            let _ = table.take_token(key(n), &rate);
        }
        let tracked = table.tracked();
        assert!(tracked <= cap, "{tracked} buckets kept, cap {cap}");
        assert!(
            tracked >= cap / 2,
            "the recent generations are kept: {tracked}"
        );
        // The most recent clients are still limited; the oldest were forgotten.
        assert!(table.take_token(key(999_999), &rate).is_err());
        assert!(table.take_token(key(0), &rate).is_ok());
    }
}
