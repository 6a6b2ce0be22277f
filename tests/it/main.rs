//! wsgate's integration tests, all in one binary: `common` (real backends, the in-process gateway,
//! clients), `dns_server` (a DNS server whose answers the test sets) and `tunnel_support` (byte-level
//! WebSocket peers) are shared by the test modules below, which drive the gateway through the library's
//! public API and over real loopback sockets; `layers` reads `src/` and checks the module layers
//! (docs/ARCHITECTURE.md).
//!
//! One binary rather than one per file: the tests and their dependencies are linked once instead of eight
//! times (one per former `tests/*.rs`), and the shared modules are compiled once instead of in each.
//! Run one part with a filter, e.g. `cargo test --test it tunnel::`.

mod common;
mod dns_server;
mod tunnel_support;

mod admin_page;
mod admission;
mod answers;
mod backend_tls;
mod balancing;
mod browser;
mod config_errors;
mod discovery;
mod drain;
mod h2;
mod h2_hostile;
mod hostile;
mod http_exchange;
mod http_proxy;
mod layers;
mod operations;
mod per_worker;
mod proxy_protocol;
mod resolver;
mod tls;
mod tunnel;
mod websocket_proxy;
