//! Weighted rendezvous (highest random weight) hashing: maps a sticky key to a backend so that every wsgate
//! instance with the same config agrees without talking to the others (docs/ARCHITECTURE.md, "Balancing
//! and health" and "Scaling past one machine").
//!
//! Each (key, backend) pair gets a score from a hash of the two; the key goes to the backend with the highest
//! score among those available, and when that one is down, to the next in score order. Removing a backend
//! therefore moves only the keys it had, and adding one takes about `weight / total weight` of the keys,
//! all from the others in proportion. Weights use the standard weighted HRW score `-w / ln(u)`, with `u` in
//! (0, 1) taken from the hash: a backend of weight 3 wins three times as many keys as one of weight 1.
//!
//! The hash is XXH3 with fixed seeds: the same on every machine, in every process, across restarts and
//! versions (a golden-value test pins it). Never a randomly seeded hasher here.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seeds that separate the uses of one hash function (arbitrary constants; changing one remaps every key).
const KEY_SEED: u64 = 0x7773_6761_7465_6b31; // "wsgatek1"
const ID_SEED: u64 = 0x7773_6761_7465_6931; // "wsgatei1"
const TOKEN_SEED: u64 = 0x7773_6761_7465_6331; // "wsgatec1"

/// The hash of a request's key (a header value, a query parameter, an IP address, a cookie value).
pub fn key_hash(key: &[u8]) -> u64 {
    xxh3_64_with_seed(key, KEY_SEED)
}

/// The hash of a backend's stable id, computed once per backend.
pub fn id_hash(id: &str) -> u64 {
    xxh3_64_with_seed(id.as_bytes(), ID_SEED)
}

/// The value of a sticky cookie naming the backend with this id: 16 hex digits of a hash of the id, so the
/// cookie tells a client nothing about the backend's address.
pub fn cookie_token(id: &str) -> String {
    format!("{:016x}", xxh3_64_with_seed(id.as_bytes(), TOKEN_SEED))
}

/// The weighted rendezvous score of a key on a backend: higher wins.
pub fn score(key: u64, id: u64, weight: u32) -> f64 {
    let h = xxh3_64_with_seed(&key.to_le_bytes(), id);
    // 53 random bits, shifted half a step off zero: u is in (0, 1), never 0 or 1, so ln(u) is finite and < 0.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(weight.max(1)) / u.ln()
}

/// The item with the highest score for `key` among `items` (each with its id hash and weight), or `None`
/// when there is none. Exact score ties, vanishingly rare, go to the larger id hash so every instance agrees.
pub fn pick<T>(key: u64, items: impl IntoIterator<Item = (T, u64, u32)>) -> Option<T> {
    let mut best: Option<(T, f64, u64)> = None;
    for (item, id, weight) in items {
        let s = score(key, id, weight);
        let better = match &best {
            None => true,
            Some((_, best_score, best_id)) => {
                s > *best_score || (s == *best_score && id > *best_id)
            }
        };
        if better {
            best = Some((item, s, id));
        }
    }
    best.map(|(item, _, _)| item)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, id hash, weight) for backends named b0, b1, ...
    fn backends(weights: &[u32]) -> Vec<(String, u64, u32)> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let name = format!("10.0.0.{i}:9000");
                let id = id_hash(&name);
                (name, id, w)
            })
            .collect()
    }

    fn assign(key: &str, set: &[(String, u64, u32)]) -> String {
        pick(
            key_hash(key.as_bytes()),
            set.iter().map(|(n, id, w)| (n.clone(), *id, *w)),
        )
        .expect("a backend")
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("user-{i}")).collect()
    }

    #[test]
    fn hashes_are_pinned_across_builds_and_machines() {
        // If these change, every sticky key in every deployment moves at the upgrade: do not change them.
        assert_eq!(key_hash(b"user-1"), 0x43b5_3d0e_05a0_0af5);
        assert_eq!(id_hash("10.0.0.11:9000"), 0xf4f3_e895_b4bd_5299);
        assert_eq!(cookie_token("10.0.0.11:9000"), "db73b7cd457d3a3d");
    }

    #[test]
    fn same_key_same_backend_whatever_the_order_of_backends() {
        let set = backends(&[1, 1, 1, 1]);
        let mut reversed = set.clone();
        reversed.reverse();
        for key in keys(500) {
            assert_eq!(assign(&key, &set), assign(&key, &reversed));
            assert_eq!(assign(&key, &set), assign(&key, &set));
        }
    }

    #[test]
    fn keys_spread_evenly_over_equal_backends() {
        let set = backends(&[1, 1, 1, 1]);
        let mut counts = std::collections::HashMap::new();
        for key in keys(8000) {
            *counts.entry(assign(&key, &set)).or_insert(0u32) += 1;
        }
        for (name, n) in &counts {
            assert!((1700..=2300).contains(n), "{name} got {n} of 8000 keys");
        }
    }

    #[test]
    fn removing_a_backend_moves_only_its_own_keys() {
        let four = backends(&[1, 1, 1, 1]);
        let three: Vec<_> = four.iter().filter(|b| b.0 != four[2].0).cloned().collect();
        let mut moved = 0;
        for key in keys(4000) {
            let before = assign(&key, &four);
            let after = assign(&key, &three);
            if before == four[2].0 {
                moved += 1;
            } else {
                assert_eq!(before, after, "key {key} moved although its backend stayed");
            }
        }
        assert!(moved > 800, "the removed backend had only {moved} keys");
    }

    #[test]
    fn the_fallback_is_the_next_in_score_order() {
        let set = backends(&[1, 2, 1, 3]);
        for key in keys(300) {
            let k = key_hash(key.as_bytes());
            let mut ranked: Vec<_> = set.iter().map(|b| (score(k, b.1, b.2), &b.0)).collect();
            ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
            let without_first: Vec<_> = set
                .iter()
                .filter(|b| &b.0 != ranked[0].1)
                .cloned()
                .collect();
            assert_eq!(&assign(&key, &set), ranked[0].1);
            assert_eq!(&assign(&key, &without_first), ranked[1].1);
        }
    }

    #[test]
    fn adding_a_fifth_backend_moves_about_a_fifth_of_keys_all_to_it() {
        let four = backends(&[1, 1, 1, 1]);
        let five = backends(&[1, 1, 1, 1, 1]);
        let total = 5000;
        let mut moved = 0;
        for key in keys(total) {
            let before = assign(&key, &four);
            let after = assign(&key, &five);
            if before != after {
                assert_eq!(after, five[4].0, "a key moved between two old backends");
                moved += 1;
            }
        }
        let share = moved as f64 / total as f64;
        assert!((0.17..=0.23).contains(&share), "moved {share:.3}");
    }

    #[test]
    fn weights_split_keys_in_proportion() {
        let set = backends(&[1, 3]);
        let total = 8000;
        let light = keys(total)
            .iter()
            .filter(|k| assign(k, &set) == set[0].0)
            .count();
        let share = light as f64 / total as f64;
        assert!(
            (0.22..=0.28).contains(&share),
            "weight 1 of 4 got {share:.3}"
        );
    }

    #[test]
    fn cookie_tokens_hide_the_address() {
        let token = cookie_token("10.0.0.11:9000");
        assert_eq!(token.len(), 16);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(!token.contains("10.0"));
        assert_ne!(token, cookie_token("10.0.0.12:9000"));
    }

    #[test]
    fn no_items_no_pick() {
        assert_eq!(pick::<u8>(1, []), None);
    }
}
