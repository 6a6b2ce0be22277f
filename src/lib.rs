//! wsgate: a WebSocket-aware reverse proxy and load balancer.
//!
//! # Layout
//!
//! The path of one connection, in the order it runs (DESIGN.md §1):
//!
//! - `listener`: accepts client connections and serves HTTP/1.1 on them (hyper), with the header and
//!   keep-alive timeouts of `client_io`.
//! - `first_request`: on plain connections, reads the first request head itself; an upgrade is handshaken
//!   and tunnelled without hyper, anything else is replayed to hyper.
//! - `dispatch`: finds a request's route (`router`) and sends it on as HTTP or as an upgrade.
//! - `http_proxy`: forwards ordinary requests over pooled backend connections (`upstream`).
//! - `websocket`: the upgrade handshake, then the frame-aware tunnel between client and backend.
//! - `balancer`: pools and backends, live-connection guards, the policy that picks a backend
//!   (least-connections, or sticky by rendezvous hashing), active and passive health, draining.
//!
//! Around it: `config` (the TOML file, checked with file:line:key errors), `gateway` (the running state:
//! start, reload, shutdown), `tls` (certificates, SNI), `admin` (`/metrics`, `/healthz`, `/readyz`,
//! `/status`), `metrics` (every Prometheus metric), `headers` and `body` (helpers shared by the two proxy
//! paths), `demo` (built-in backends and a page for `wsgate demo`).

mod admin;
pub mod balancer;
pub mod body;
mod client_io;
pub mod config;
pub mod demo;
mod dispatch;
mod first_request;
pub mod gateway;
pub mod headers;
mod http_proxy;
mod listener;
pub mod metrics;
pub mod router;
pub mod tls;
pub mod upstream;
pub mod websocket;

/// Entry points for the fuzz targets in `fuzz/`: wsgate's hand-written parsers of untrusted bytes,
/// reachable without a socket. Not part of the supported API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::first_request::{First, MAX_HEADERS, parse as parse_first_request};
    pub use crate::websocket::backend_http::{
        BackendHttpError, BodyDecoder, MAX_CHUNK_LINE, MAX_HEAD, MAX_RELAYED_BODY, parse_head,
    };
}

pub use balancer::BackendStatus;
pub use config::{Config, ConfigError, ConfigErrors};
pub use gateway::{Gateway, Monitor, ReloadError, StartError};
