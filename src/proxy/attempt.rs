//! The backend-attempt loop shared by HTTP forwarding and the WebSocket upgrade: pick a backend of the
//! route's pool (never one already tried), account each attempt in the backend's passive health, and
//! decide when to give up and with which answer. What one attempt does (a request on a pooled
//! connection, a handshake on a fresh socket) is the caller's loop body:
//!
//! ```text
//! let mut attempts = Attempts::new(pool, &affinity);
//! loop {
//!     let guard = attempts.next()?;            // 503 if nothing was up, 502 once tried ones ran out
//!     match connect(..).await {
//!         Err(error) => { attempts.unreachable(&guard, &error)?; continue }  // next backend, or 502
//!         Ok(stream) => ...                     // attempts.answered / attempts.faulted
//!     }
//! }
//! ```

use std::sync::Arc;

use crate::balancer::{Affinity, Backend, BackendGuard, Pool};
use crate::conn::ClientConn;
use crate::proxy_protocol;
use crate::upstream::ConnectError;

use super::ProxyError;

pub struct Attempts<'a> {
    pool: &'a Pool,
    affinity: &'a Affinity,
    tried: Vec<Arc<Backend>>,
}

impl<'a> Attempts<'a> {
    pub fn new(pool: &'a Pool, affinity: &'a Affinity) -> Attempts<'a> {
        Attempts {
            pool,
            affinity,
            tried: Vec::new(),
        }
    }

    /// The backend for the next attempt, counted live while the guard is held. When the pool has none
    /// left: `NoBackend` (503) if no backend could be tried at all, `Unreachable` (502) once every one
    /// that could has failed.
    pub fn next(&mut self) -> Result<BackendGuard, ProxyError> {
        self.pool
            .pick(self.affinity, &self.tried)
            .ok_or(if self.tried.is_empty() {
                ProxyError::NoBackend
            } else {
                ProxyError::Unreachable
            })
    }

    /// The backend could not be connected to: counted against it, and `Ok` when another backend may be
    /// tried (the request is still whole: nothing was sent), else `Unreachable`.
    pub fn unreachable(
        &mut self,
        guard: &BackendGuard,
        error: &ConnectError,
    ) -> Result<(), ProxyError> {
        let backend = guard.backend();
        tracing::warn!(pool = %self.pool.name, backend = %backend.addr, %error, "backend connect failed");
        self.faulted(guard);
        self.tried.push(Arc::clone(backend));
        if self.tried.len() >= self.pool.max_attempts() {
            Err(ProxyError::Unreachable)
        } else {
            Ok(())
        }
    }

    /// Whether a backend whose answer is a server error may be passed over for another one: attempts
    /// remain after this one. If so, the backend is marked tried.
    pub fn pass_over(&mut self, guard: &BackendGuard) -> bool {
        if self.tried.len() + 1 >= self.pool.max_attempts() {
            return false;
        }
        self.tried.push(Arc::clone(guard.backend()));
        true
    }

    /// The backend did its part (it connected, or answered): a live backend in passive health.
    pub fn answered(&self, guard: &BackendGuard) {
        self.pool.connect_succeeded(guard.backend());
    }

    /// The backend is at fault (no answer in time, garbage, a wrong accept key): counted
    /// against it in passive health. A client's fault never comes here.
    pub fn faulted(&self, guard: &BackendGuard) {
        self.pool.connect_failed(guard.backend());
    }
}

/// The PROXY protocol header `backend`'s connections for `conn` begin with: empty unless its pool sends
/// one (`proxy_protocol`), else naming the client's address (the one wsgate believes: a PROXY header's
/// from its own load balancer included) and the address the client connected to.
pub fn preamble(backend: &Backend, conn: &ClientConn) -> Vec<u8> {
    backend.proxy_protocol.map_or_else(Vec::new, |p| {
        proxy_protocol::encode(p.version, conn.peer, conn.local)
    })
}
