//! wsgate: a WebSocket-aware reverse proxy and load balancer.
//!
//! The library is what the `wsgate` binary runs, and what an embedding program or the integration tests
//! start in-process: [`Gateway::start`] with a [`Config`] (from a TOML file or text), or
//! [`Gateway::start_on`] with [`Workers`] (runtimes of the caller's own that serve the connections),
//! then `reload`, `shutdown`, and a [`Monitor`] for metrics and backend states.
//!
//! # Layout
//!
//! Modules form layers, each using only the layers below it; `docs/ARCHITECTURE.md` draws the data path.
//!
//! - `gateway`: start, reload, shutdown; starts the listeners, the admin listener, the health checks and
//!   DNS discovery.
//! - `server`: listening sockets and client connections (TLS, the first request read by wsgate itself,
//!   hyper's HTTP/1.1 server after it); `admin` (the operator's page, `/metrics`, `/healthz`, `/readyz`,
//!   `/status`, the write API: drain, undrain, reload); `health_checks` (the active checks' tasks);
//!   `discovery` (the tasks that resolve the pools' DNS entries).
//! - `proxy`: one request, whatever transport it came on: routing, HTTP forwarding, the WebSocket upgrade
//!   and its splice, one backend-attempt loop and one table of wsgate's own answers.
//! - `state` (the config generation and what every connection shares) and `conn` (one client
//!   connection's record).
//! - At the bottom, knowing nothing above them: `websocket` (handshake rules, frames, scanner, the tunnel),
//!   `http1` (the HTTP/1.1 wsgate writes and parses by hand), `balancer`, `upstream` (backend connections),
//!   `router`, `tls`, `metrics`, `headers`, `body`, `config`, `admission` (who a client is, per-client
//!   counts and rate buckets, the handshake gate), `origin` (a route's `Origin` allow-list),
//!   `proxy_protocol` (the PROXY protocol header a load balancer puts before a connection, read and
//!   written), `resolver` (DNS lookups for service discovery: a name's A and AAAA addresses and TTL).

mod admin;
mod admission;
mod balancer;
mod body;
mod config;
mod conn;
mod discovery;
mod gateway;
mod headers;
mod health_checks;
mod http1;
mod metrics;
mod origin;
mod proxy;
mod proxy_protocol;
// Public: the integration tests drive it against a DNS server of their own.
pub mod resolver;
mod router;
mod server;
mod state;
mod tls;
mod upstream;
mod websocket;

pub use balancer::BackendStatus;
pub use config::{Config, ConfigError, ConfigErrors, DEFAULT_EVENT_INTERVAL, RuntimeModel};
pub use gateway::{
    Gateway, Monitor, ReloadError, StartError, Workers, check_backend_tls, check_certificates,
};
pub use tls::TlsError;

/// wsgate's internals that its benchmarks and fuzz targets (`benches/`, `fuzz/`) drive directly: the
/// hand-written parsers of untrusted bytes, the frame scanner, and the TLS session wsgate drives itself,
/// reachable without a socket. Not part of the supported API.
#[doc(hidden)]
pub mod internals {
    pub use crate::admission::Scopes;
    pub use crate::config::AdminTokens;
    pub use crate::headers::{
        BadRequest, HopByHop, check_request, has_token, only_chunked, strip_hop_by_hop,
    };
    pub use crate::http1::backend::{BackendHttpError, BodyDecoder};
    pub use crate::http1::message::{
        BodyLength, BodyReader, Head, Piece, content_length, encode_chunk, encode_last_chunk,
        framing, leading_line_ends, parse_head, parse_head_with, response_length,
    };
    pub use crate::http1::request::{First, parse as parse_first_request};
    pub use crate::http1::{MAX_CHUNK_LINE, MAX_HEAD, MAX_HEADERS, MAX_RELAYED_BODY};
    pub use crate::origin::{OriginList, OriginPattern, OriginPatternError, OriginRefusal};
    pub use crate::state::{Loaded, State};
    /// A client's TLS session over any stream, kept by rustls or handed to wsgate's record layer, and
    /// the sizes its buffers are bounded by: for the `tls_session` fuzz target.
    pub use crate::tls::session::{
        Engine, Established, MAX_INCOMING, READ_SIZE, ServerSession, TlsSession, WRITE_SIZE,
        accept as tls_accept,
    };
    pub use crate::upstream::TlsClients;
    pub use crate::websocket::{BUFFER_SIZE, frame, scanner};
    pub use tokio_util::sync::CancellationToken;

    /// The PROXY protocol codec (`parse`, `encode`, the limits), for the `proxy_header` fuzz target.
    pub mod proxy_protocol {
        pub use crate::proxy_protocol::*;
    }
}
