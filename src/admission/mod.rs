//! Admission control: who a client is (`client.rs`), per-client counts and rate buckets in bounded tables
//! (`table.rs`), the rate algorithm and the listener's handshake gate (`rate.rs`), and the `Scopes` that
//! keep a listener's or a route's state across reloads. The decisions (which limit applies where, what
//! the client is answered) belong to the layers above: `server` refuses connections, `proxy` refuses
//! upgrades.

mod client;
mod rate;
mod table;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use client::{ClientKey, client_ip};
pub use rate::HandshakeGate;
pub use table::{ClientTable, Counted};

/// The admission state of one listener or route: its clients' counts and buckets, and (listeners) the
/// handshake gate. Lives as long as the listener or route keeps its name across reloads, so that a
/// reload neither forgets who holds what nor opens the gate.
pub struct Scope {
    pub clients: Arc<ClientTable>,
    pub gate: HandshakeGate,
}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scope")
            .field("tracked", &self.clients.tracked())
            .field("queued", &self.gate.queued())
            .finish()
    }
}

/// Whose state a `Scope` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScopeKind {
    Listener,
    Route,
}

/// Every scope of the gateway, by kind and name.
#[derive(Default)]
pub struct Scopes {
    map: Mutex<HashMap<(ScopeKind, String), Arc<Scope>>>,
}

impl Scopes {
    /// The scope of listener or route `name`, made on first use; `max_tracked` applies to it from now on.
    pub fn get(&self, kind: ScopeKind, name: &str, max_tracked: usize) -> Arc<Scope> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let scope = map.entry((kind, name.to_string())).or_insert_with(|| {
            Arc::new(Scope {
                clients: Arc::new(ClientTable::new(max_tracked)),
                gate: HandshakeGate::default(),
            })
        });
        scope.clients.set_max_tracked(max_tracked);
        Arc::clone(scope)
    }

    /// Forgets the scopes `keep` says no more; connections and tunnels still counted in one keep it alive
    /// until they end.
    pub fn retain(&self, mut keep: impl FnMut(ScopeKind, &str) -> bool) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|(kind, name), _| keep(*kind, name));
    }

    /// Every scope, sorted by kind and name (for the metrics and `/status`).
    pub fn all(&self) -> Vec<(ScopeKind, String, Arc<Scope>)> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = map
            .iter()
            .map(|((kind, name), scope)| (*kind, name.clone(), Arc::clone(scope)))
            .collect();
        all.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        all
    }
}
