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
    pub runtime: Option<Text>,
    pub event_interval: Option<Spanned<i64>>,
    pub admin: Option<FileAdmin>,
    pub dns: Option<FileDns>,
    #[serde(default)]
    pub timeouts: FileTimeouts,
    #[serde(default)]
    pub limits: FileLimits,
    #[serde(default)]
    pub http2: FileHttp2,
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
    pub allow: Option<Spanned<Vec<Text>>>,
    pub token_file: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDns {
    pub servers: Option<Spanned<Vec<Text>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTimeouts {
    pub close_spread: Option<Text>,
    pub connect: Option<Text>,
    pub handshake: Option<Text>,
    pub header: Option<Text>,
    pub http_idle: Option<Text>,
    pub backend_response: Option<Text>,
    pub client_body: Option<Text>,
    pub send: Option<Text>,
    pub drain: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    pub max_header_size: Option<Text>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_tracked_clients: Option<Spanned<i64>>,
    pub ipv6_prefix: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHttp2 {
    pub max_concurrent_streams: Option<Spanned<i64>>,
    pub stream_window: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListener {
    pub name: Text,
    pub listen: Text,
    pub tls: Option<FileTls>,
    pub alpn: Option<Spanned<Vec<Text>>>,
    pub h2c: Option<Spanned<bool>>,
    pub websocket_over_h2: Option<bool>,
    pub proxy_protocol: Option<Text>,
    pub proxy_protocol_from: Option<Spanned<Vec<Text>>>,
    pub trusted_proxies: Option<Spanned<Vec<Text>>>,
    pub max_connections_per_ip: Option<Spanned<i64>>,
    pub handshake_rate: Option<Spanned<FileRate>>,
}

/// A rate limit: `{ rate = 100, burst = 200 }` (per second), with `max_wait` for a listener's queue.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRate {
    pub rate: Spanned<f64>,
    pub burst: Option<Spanned<i64>>,
    pub max_wait: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    pub certs: Spanned<Vec<FileCert>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCert {
    pub cert: Text,
    pub key: Text,
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
    pub allowed_origins: Option<Spanned<Vec<Text>>>,
    pub allow_missing_origin: Option<Spanned<bool>>,
    pub max_tunnels_per_ip: Option<Spanned<i64>>,
    pub handshake_rate_per_ip: Option<Spanned<FileRate>>,
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
    pub send_timeout: Option<Text>,
    pub park_after: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePool {
    pub policy: Option<Text>,
    pub sticky: Option<Spanned<FileSticky>>,
    pub health: Option<Spanned<FileHealth>>,
    pub max_fails: Option<Spanned<i64>>,
    pub fail_timeout: Option<Text>,
    pub tls: Option<Spanned<FileBackendTls>>,
    pub proxy_protocol: Option<Text>,
    pub proxy_protocol_health: Option<Spanned<bool>>,
    pub drain_spread: Option<Text>,
    pub backends: Spanned<Vec<FileBackend>>,
}

/// TLS toward backends, for a whole pool or one backend (which then ignores its pool's table).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBackendTls {
    pub server_name: Option<Text>,
    pub ca: Option<Spanned<Paths>>,
    pub verify: Option<Spanned<bool>>,
    pub client_cert: Option<Spanned<FileCert>>,
}

/// One path or a list of them: `ca = "ca.pem"` or `ca = ["a.pem", "b.pem"]`.
#[derive(Debug)]
pub struct Paths(pub Vec<String>);

impl<'de> Deserialize<'de> for Paths {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Paths, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Paths;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a path or a list of paths")
            }

            fn visit_str<E: serde::de::Error>(self, path: &str) -> Result<Paths, E> {
                Ok(Paths(vec![path.to_string()]))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Paths, A::Error> {
                let mut paths = Vec::new();
                while let Some(path) = seq.next_element::<String>()? {
                    paths.push(path);
                }
                Ok(Paths(paths))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Where a sticky pool finds a request's key: exactly one of the sources.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSticky {
    pub cookie: Option<Text>,
    pub header: Option<Text>,
    pub query: Option<Text>,
    pub source_ip: Option<Spanned<bool>>,
    pub trusted_proxies: Option<Spanned<Vec<Text>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHealth {
    pub path: Option<Text>,
    pub interval: Option<Text>,
    pub timeout: Option<Text>,
    pub rise: Option<Spanned<i64>>,
    pub fall: Option<Spanned<i64>>,
    pub websocket: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBackend {
    /// Exactly one of `addr` and `dns`.
    pub addr: Option<Text>,
    pub dns: Option<Text>,
    pub resolve_every: Option<Text>,
    pub resolve_min: Option<Text>,
    pub remove_after: Option<Text>,
    pub id: Option<Text>,
    pub weight: Option<Spanned<i64>>,
    #[serde(default)]
    pub drain: bool,
    pub tls: Option<Spanned<FileBackendTls>>,
}
