//! What the config file says: serde structs that mirror the TOML text one to one.
//!
//! Values that need checking (durations, sizes, addresses, references between sections) are kept as
//! `Spanned` strings here so that `config/mod.rs` can report every problem with the line it is on, rather
//! than stopping at the first.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

pub type Text = Spanned<String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub workers: Option<Spanned<i64>>,
    pub admin: Option<FileAdmin>,
    #[serde(default)]
    pub timeouts: FileTimeouts,
    #[serde(default)]
    pub limits: FileLimits,
    #[serde(default)]
    pub listener: Vec<FileListener>,
    #[serde(default)]
    pub route: Vec<FileRoute>,
    #[serde(default)]
    pub pool: BTreeMap<String, Spanned<FilePool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    pub listen: Text,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTimeouts {
    pub connect: Option<Text>,
    pub handshake: Option<Text>,
    pub header: Option<Text>,
    pub http_idle: Option<Text>,
    pub backend_response: Option<Text>,
    pub drain: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    pub max_header_size: Option<Text>,
    pub max_connections: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListener {
    pub name: Text,
    pub listen: Text,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    pub name: Text,
    pub host: Option<Text>,
    pub path_prefix: Option<Text>,
    pub pool: Text,
    #[serde(default)]
    pub websocket: FileWebSocket,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileWebSocket {
    pub idle_timeout: Option<Text>,
    pub ping_interval: Option<Text>,
    pub pong_timeout: Option<Text>,
    pub max_message_size: Option<Text>,
    pub close_timeout: Option<Text>,
    pub ping_backend: Option<bool>,
    pub max_lifetime: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePool {
    pub policy: Option<Text>,
    pub backends: Spanned<Vec<FileBackend>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBackend {
    pub addr: Text,
    pub weight: Option<Spanned<i64>>,
    #[serde(default)]
    pub drain: bool,
}
