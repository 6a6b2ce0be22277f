//! Weighted least-connections: the backend with the fewest live connections per unit of weight wins;
//! ties are broken at random so that equal backends share new connections instead of the first taking all.

use std::sync::Arc;

use super::Backend;

pub fn pick<'a>(candidates: impl Iterator<Item = &'a Arc<Backend>>) -> Option<&'a Arc<Backend>> {
    let mut best: Option<&Arc<Backend>> = None;
    let mut ties = 0u32;
    for backend in candidates {
        let Some(current) = best else {
            best = Some(backend);
            ties = 1;
            continue;
        };
        // Compare active/weight without division: a.active * b.weight vs b.active * a.weight.
        let lhs = backend.active() as u64 * u64::from(current.weight());
        let rhs = current.active() as u64 * u64::from(backend.weight());
        if lhs < rhs {
            best = Some(backend);
            ties = 1;
        } else if lhs == rhs {
            // Reservoir sampling over the tied backends: each of them ends up chosen with equal chance.
            ties += 1;
            if fastrand::u32(0..ties) == 0 {
                best = Some(backend);
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;

    fn backend(addr: &str, weight: u32) -> Arc<Backend> {
        Arc::new(Backend::new(
            "p",
            &BackendConfig {
                addr: addr.to_string(),
                id: addr.to_string(),
                weight,
                drain: false,
                tls: None,
            },
            (None, None),
            (None, &tokio_util::sync::CancellationToken::new()),
        ))
    }

    #[test]
    fn fewest_connections_wins() {
        let a = backend("a:1", 1);
        let b = backend("b:1", 1);
        let _held = [a.acquire(), a.acquire()];
        for _ in 0..20 {
            assert_eq!(
                pick([&a, &b].into_iter()).map(|x| x.addr.as_str()),
                Some("b:1")
            );
        }
    }

    #[test]
    fn ties_are_shared_not_always_the_first() {
        let backends: Vec<_> = (0..4).map(|i| backend(&format!("h{i}:1"), 1)).collect();
        let mut seen = [0u32; 4];
        for _ in 0..400 {
            let chosen = pick(backends.iter()).map(|b| b.addr.clone());
            let index = backends
                .iter()
                .position(|b| Some(&b.addr) == chosen.as_ref());
            seen[index.unwrap_or(0)] += 1;
        }
        assert!(
            seen.iter().all(|&n| n > 50),
            "tie-break is not random: {seen:?}"
        );
    }

    #[test]
    fn weights_scale_the_share() {
        let light = backend("l:1", 1);
        let heavy = backend("h:1", 3);
        let mut guards = Vec::new();
        for _ in 0..400 {
            if let Some(b) = pick([&light, &heavy].into_iter()) {
                guards.push(b.acquire());
            }
        }
        assert_eq!(light.active(), 100);
        assert_eq!(heavy.active(), 300);
        drop(guards);
        assert_eq!(light.active() + heavy.active(), 0);
    }
}
