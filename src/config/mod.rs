//! The configuration the gateway runs on, and the step that builds it from a TOML file.
//!
//! `file.rs` holds what the file says; `check.rs` checks it and turns it into the typed values of
//! `model.rs`. Every problem is reported as `file:line: key: message`, and all of them are collected, so
//! `wsgate check` can list them at once.

mod admission;
mod check;
pub mod cidr;
mod file;
mod fleet;
mod key_path;
mod model;
mod tokens;
pub mod units;

pub use check::split_host_port;
pub use model::*;
pub use tokens::AdminTokens;

#[cfg(test)]
mod admission_tests;
#[cfg(test)]
mod fleet_tests;
#[cfg(test)]
mod pool_tests;
#[cfg(test)]
mod tests;
