//! The splice: a backend that has switched protocols, joined to the client connection once the client
//! has been sent its 101 and taken over by the server layer, by a frame-aware tunnel
//! (`websocket::tunnel`) whose endings and traffic are counted per route (`tunnel_metrics.rs`).

use std::sync::Arc;

use bytes::Bytes;

use super::tunnel_metrics::RouteTunnel;
use crate::admission::Counted;
use crate::balancer::BackendGuard;
use crate::conn::ClientConn;
use crate::router::Route;
use crate::state::Shared;
use crate::upstream::BackendStream;
use crate::websocket::Transport;
use crate::websocket::tunnel::{self, TunnelParams};

/// A backend that has switched protocols, waiting for the client side to do the same.
pub struct Splice {
    route: Arc<Route>,
    guard: BackendGuard,
    /// The client's place under the route's `max_tunnels_per_ip`, held as long as the tunnel lives.
    place: Option<Counted>,
    backend: BackendStream,
    backend_early: Bytes,
    allowed_rsv: u8,
}

impl Splice {
    /// `held`: the backend's guard and the client's place on the route. `backend_early`: what the
    /// backend sent behind its 101. `allowed_rsv`: the RSV bits frames may carry (an extension was
    /// negotiated).
    pub fn new(
        route: Arc<Route>,
        (guard, place): (BackendGuard, Option<Counted>),
        backend: BackendStream,
        backend_early: Bytes,
        allowed_rsv: u8,
    ) -> Splice {
        Splice {
            route,
            guard,
            place,
            backend,
            backend_early,
            allowed_rsv,
        }
    }

    /// The tunnel between `client`, which has been sent the 101, and the backend: a future to spawn.
    /// `early` is what the client sent behind its upgrade request.
    ///
    /// Not `async`: everything the tunnel needs moves into it, and the future is the tunnel's own (see
    /// `tunnel::run`); an `async fn` would hold this `Splice` beside it for the tunnel's whole life.
    pub fn run<C: Transport + 'static>(
        self,
        client: C,
        early: Bytes,
        conn: Arc<ClientConn>,
        shared: Arc<Shared>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let params = TunnelParams {
            allowed_rsv: self.allowed_rsv,
            context: RouteTunnel::new(self.route, (self.guard, self.place), conn, shared),
        };
        let backend_early = detach(self.backend_early);
        tunnel::run(client, detach(early), self.backend, backend_early, params)
    }
}

/// Bytes read past a handshake are a slice of the HTTP layer's whole read buffer (8 KiB or more); keeping
/// the slice would keep that buffer alive for the tunnel's life. Copy the few bytes out, or drop it.
fn detach(early: Bytes) -> Bytes {
    if early.is_empty() {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(&early)
    }
}
