//! Fuzz harnesses for wsgate's parsers of untrusted bytes (see README.md in this folder).
//!
//! The targets in `fuzz_targets/` are thin: the checks live here, so that `cargo test` can run the
//! reference decoder's own tests and a crash can be replayed from a debugger without libFuzzer.

pub mod admin_tokens_target;
pub mod config_target;
#[cfg(test)]
mod corpus;
pub mod http_target;
pub mod known;
pub mod origin_target;
pub mod proxy_header_target;
pub mod reference;
pub mod response_target;
pub mod scanner_target;
pub mod seeds;
pub mod tls_session_target;
