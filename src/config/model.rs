//! The configuration the gateway runs on: typed, checked values (durations, sizes, addresses, resolved
//! references), and the errors a config file can have. `check.rs` builds these from the file's text.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::cidr;
use crate::origin::OriginList;
use crate::proxy_protocol::{Version, Versions};

/// One problem in a config file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        } else {
            write!(
                f,
                "{}:{}: {}: {}",
                self.file, self.line, self.key, self.message
            )
        }
    }
}

/// Every problem found in one config file (never empty).
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this config was read from, if any (used in logs, `/status` and reloads).
    pub source: Option<PathBuf>,
    /// Runtime worker threads; `None` means one per core.
    pub workers: Option<usize>,
    /// How the worker threads share the work (read by the binary, like `workers`).
    pub runtime: RuntimeModel,
    /// Tasks a worker runs between two looks at its sockets and timers (tokio's `event_interval`; read by
    /// the binary, like `workers`): lower answers new events sooner, at the cost of more system calls.
    pub event_interval: u32,
    pub admin: Option<AdminConfig>,
    /// How DNS names of discovered backends are resolved.
    pub dns: DnsConfig,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub http2: Http2Settings,
    pub listeners: Vec<ListenerConfig>,
    pub routes: Vec<RouteConfig>,
    pub pools: BTreeMap<String, PoolConfig>,
}

/// tokio's own default `event_interval`, kept unless the config says otherwise.
pub const DEFAULT_EVENT_INTERVAL: u32 = 61;

/// How the binary runs its worker threads (`runtime` in the file). With one worker both models are the
/// same current-thread runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RuntimeModel {
    /// One multi-thread runtime whose threads steal work from each other; each listener is one socket.
    #[default]
    Shared,
    /// One current-thread runtime per worker thread, each with its own socket of every listener
    /// (SO_REUSEPORT): a connection lives on the thread that accepted it, start to end.
    PerWorker,
}

impl RuntimeModel {
    /// The value as the config file spells it.
    pub fn name(self) -> &'static str {
        match self {
            RuntimeModel::Shared => "shared",
            RuntimeModel::PerWorker => "per_worker",
        }
    }
}

/// Timeouts of the HTTP side. None of them applies to an upgraded connection: tunnels have their own
/// settings in [`WebSocketSettings`].
#[derive(Debug, Clone, PartialEq)]
pub struct Timeouts {
    /// TCP connect to a backend, and for a TLS backend its TLS handshake: one bound for both.
    pub connect: Duration,
    /// From sending the upgrade request to a backend until its full answer head has arrived.
    pub handshake: Duration,
    /// A client must send a complete request head within this time of its first byte (slowloris guard).
    pub header: Duration,
    /// A keep-alive client connection with no request in flight is closed after this long.
    pub http_idle: Duration,
    /// A backend must start its HTTP response within this time of the request being written whole, may
    /// not leave a write of the request pending longer (else 504), and may not pause its body longer (the
    /// response is cut).
    pub backend_response: Duration,
    /// A client sending a request body may not pause it longer than this while a backend waits for it
    /// (408; the backend is not blamed).
    pub client_body: Duration,
    /// A write to a client that makes no progress for this long (the client stopped reading) ends its
    /// connection and the backend request behind it. The default for tunnels' `send_timeout` too.
    pub send: Duration,
    /// On shutdown, how long live connections get to finish.
    pub drain: Duration,
    /// On shutdown, tunnels are sent their Close 1001 at random moments spread over this window (bounded
    /// by `drain`), so that thousands of clients do not all reconnect in the same instant.
    pub close_spread: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            handshake: Duration::from_secs(10),
            header: Duration::from_secs(10),
            http_idle: Duration::from_secs(60),
            backend_response: Duration::from_secs(60),
            client_body: Duration::from_secs(60),
            send: Duration::from_secs(60),
            drain: Duration::from_secs(30),
            close_spread: Duration::from_secs(5),
        }
    }
}

/// The largest `limits.max_connections`: far above what one process can hold open (each connection is a
/// file descriptor, two once upgraded), and small enough for every counter it feeds.
pub const MAX_CONNECTIONS: usize = 1 << 24;

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest request head a client may send; larger gets 431.
    pub max_header_size: usize,
    /// Most client connections open at once per listener; further accepts wait.
    pub max_connections: usize,
    /// Most clients whose rate buckets one listener or route remembers (`admission::ClientTable`).
    pub max_tracked_clients: usize,
    /// IPv6 clients are counted and rate-limited per network of this many leading bits.
    pub ipv6_prefix: u8,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_size: 64 << 10,
            max_connections: 100_000,
            max_tracked_clients: 100_000,
            ipv6_prefix: 64,
        }
    }
}

/// A rate limit: `per_second` events sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

/// A listener's admission control (README, "Protecting backends"); everything off by default.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ListenerAdmission {
    /// Connections begin with a PROXY protocol header carrying the client's address.
    pub proxy_protocol: Option<ProxyProtocolIn>,
    /// Peers whose `X-Forwarded-For` is believed for the client's address in per-client limits.
    pub trusted_proxies: Vec<cidr::Cidr>,
    /// Most connections one client holds open on this listener; more are closed at once.
    pub max_connections_per_ip: Option<u32>,
    /// WebSocket handshakes this listener lets through to the backends, all clients together; the excess
    /// waits its turn for at most `max_wait`, then gets 503.
    pub handshake_rate: Option<HandshakeRate>,
}

/// The PROXY protocol header a listener reads first on every connection.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyProtocolIn {
    pub versions: Versions,
    /// Only these peers may send one: a connection from elsewhere is closed.
    pub from: Vec<cidr::Cidr>,
}

/// A listener's handshake gate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HandshakeRate {
    pub rate: Rate,
    pub max_wait: Duration,
}

/// A route's admission control; everything off by default.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RouteAdmission {
    /// Upgrades must come from these origins (cross-site WebSocket hijacking); `None` checks nothing.
    pub origins: Option<OriginList>,
    /// Most tunnels one client holds open on this route; more get 429.
    pub max_tunnels_per_ip: Option<u32>,
    /// WebSocket handshakes one client may make on this route; more get 429.
    pub handshake_rate_per_ip: Option<Rate>,
}

/// The PROXY protocol header a pool sends to its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyProtocolOut {
    pub version: Version,
    /// Health checks send one too (with no client address in it), for backends that require it.
    pub health: bool,
}

/// Per-connection limits of HTTP/2 client connections (docs/ARCHITECTURE.md, "HTTP/2"). The header list
/// limit is `limits.max_header_size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http2Settings {
    /// Streams (requests and WebSockets) open at once on one connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// Flow-control window of one stream: what a client may send on it before wsgate has passed it on. It
    /// bounds what a stalled stream (a WebSocket whose backend does not read) holds.
    pub stream_window: u32,
}

impl Http2Settings {
    /// The connection's window: room for every stream's whole window, so that streams that stall (and
    /// keep their share of the connection's window until they are read) never leave the others without.
    pub fn connection_window(&self) -> u32 {
        let sum = u64::from(self.max_concurrent_streams) * u64::from(self.stream_window);
        // 2^31 - 1: the largest window HTTP/2 allows (RFC 9113 §6.9.1).
        sum.clamp(65_535, (1 << 31) - 1) as u32
    }
}

impl Default for Http2Settings {
    fn default() -> Self {
        Http2Settings {
            max_concurrent_streams: 100,
            stream_window: 64 << 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// TLS termination; `None` for plain TCP.
    pub tls: Option<TlsConfig>,
    pub http: ListenerHttp,
    pub admission: ListenerAdmission,
}

/// Which HTTP versions a listener speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerHttp {
    /// What a TLS listener offers in ALPN, in order of preference: `h2` and/or `http/1.1`. A client that
    /// offers neither (or no ALPN at all) gets HTTP/1.1.
    pub alpn: Vec<Alpn>,
    /// A plain listener also takes HTTP/2 with prior knowledge (RFC 9113 §3.3).
    pub h2c: bool,
    /// HTTP/2 connections advertise SETTINGS_ENABLE_CONNECT_PROTOCOL and take WebSockets over HTTP/2
    /// (RFC 8441).
    pub websocket_over_h2: bool,
}

impl Default for ListenerHttp {
    fn default() -> Self {
        ListenerHttp {
            alpn: vec![Alpn::H2, Alpn::Http11],
            h2c: false,
            websocket_over_h2: true,
        }
    }
}

/// An ALPN protocol id wsgate speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    H2,
    Http11,
}

impl Alpn {
    pub fn id(self) -> &'static [u8] {
        match self {
            Alpn::H2 => b"h2",
            Alpn::Http11 => b"http/1.1",
        }
    }
}

/// Certificates of a TLS listener: the client's SNI picks one, else the first is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub certs: Vec<CertFiles>,
}

/// A PEM certificate chain and its private key (PKCS#8, PKCS#1 or SEC1), as paths resolved against the
/// config file's folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub name: String,
    /// Lower-cased host without port; `None` matches every host.
    pub host: Option<String>,
    pub path_prefix: String,
    pub pool: String,
    pub websocket: WebSocketSettings,
    pub admission: RouteAdmission,
}

/// Per-route settings of upgraded connections (docs/ARCHITECTURE.md, "The tunnel").
#[derive(Debug, Clone, PartialEq)]
pub struct WebSocketSettings {
    /// No data frame in either direction for this long ends the tunnel.
    pub idle_timeout: Duration,
    /// wsgate pings the client after this much silence from it; `None` disables pings.
    pub ping_interval: Option<Duration>,
    /// After a ping, some frame must arrive within this time or the peer is dead.
    pub pong_timeout: Duration,
    /// Largest message, summed over its fragments.
    pub max_message_size: u64,
    /// After wsgate sends or forwards a Close, how long it waits for the answer before dropping TCP.
    pub close_timeout: Duration,
    /// Ping the backend too, the same way as the client.
    pub ping_backend: bool,
    /// Upper bound on a tunnel's whole life; `None` is unbounded.
    pub max_lifetime: Option<Duration>,
    /// Bytes for a peer that makes no progress taking them for this long (it stopped reading) end the
    /// tunnel: a peer that does not read is not kept alive by what it sends.
    pub send_timeout: Duration,
    /// A plain tunnel with nothing moving either way for this long leaves its task for the worker's park
    /// (`websocket::park`), which watches its sockets and timers until it has work again; `None`: never.
    pub park_after: Option<Duration>,
}

impl Default for WebSocketSettings {
    fn default() -> Self {
        WebSocketSettings {
            idle_timeout: Duration::from_secs(300),
            ping_interval: Some(Duration::from_secs(30)),
            pong_timeout: Duration::from_secs(10),
            max_message_size: 16 << 20,
            close_timeout: Duration::from_secs(2),
            ping_backend: false,
            max_lifetime: None,
            send_timeout: Timeouts::default().send,
            park_after: Some(Duration::from_secs(5)),
        }
    }
}

/// How a pool chooses the backend of a new connection (docs/ARCHITECTURE.md, "Balancing and health").
#[derive(Debug, Clone, PartialEq)]
pub enum Policy {
    /// Fewest live connections per unit of weight; ties broken at random.
    LeastConn,
    /// The same key always goes to the same backend (rendezvous hashing over backend ids, so every
    /// instance agrees); a request without a key falls back to least-connections.
    Sticky(StickyKey),
}

/// Where a sticky pool reads a request's key.
#[derive(Debug, Clone, PartialEq)]
pub enum StickyKey {
    /// A cookie of this name, set by wsgate itself; its value names a backend by a hash of its id.
    Cookie(String),
    /// A request header.
    Header(http::HeaderName),
    /// A query parameter.
    Query(String),
    /// The client's IP: the peer's, or taken from `X-Forwarded-For` when the peer is a trusted proxy.
    SourceIp { trusted_proxies: Vec<cidr::Cidr> },
}

/// Active health checks of a pool's backends: a GET (or a WebSocket upgrade) every `interval`.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    /// The whole check (connect, request, answer head) must finish within this.
    pub timeout: Duration,
    /// Consecutive passed checks that bring a down backend up.
    pub rise: u32,
    /// Consecutive failed checks that take an up backend down.
    pub fall: u32,
    /// Probe with a WebSocket upgrade (101 with a correct accept key passes) instead of a GET (2xx/3xx passes).
    pub websocket: bool,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            path: "/".to_string(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            websocket: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub policy: Policy,
    /// `None`: no active checks, backends are up unless passively ejected.
    pub health: Option<HealthCheck>,
    /// Consecutive connect or handshake failures that eject a backend (passive health); 0 never ejects.
    pub max_fails: u32,
    /// How long an ejected backend gets no new connections.
    pub fail_timeout: Duration,
    /// TLS toward the pool's backends; `None`: plain TCP (a backend's own table replaces it).
    pub tls: Option<BackendTlsConfig>,
    /// A PROXY protocol header sent first on every backend connection.
    pub proxy_protocol: Option<ProxyProtocolOut>,
    /// When a backend of this pool drains, its live tunnels are sent Close 1012 at random moments spread
    /// over this window; `Duration::ZERO` closes them at once; `None` lets them finish on their own.
    pub drain_spread: Option<Duration>,
    /// Backends as written (`addr`).
    pub backends: Vec<BackendConfig>,
    /// Backends found in DNS (`dns`): every address of the name is one.
    pub discovery: Vec<DiscoveryConfig>,
}

impl PoolConfig {
    pub const DEFAULT_MAX_FAILS: u32 = 3;
    pub const DEFAULT_FAIL_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_DRAIN_SPREAD: Duration = Duration::from_secs(60);

    /// How wsgate speaks TLS to `backend` of this pool: its own `tls` table, else the pool's; `None` is
    /// plain TCP.
    pub fn tls_of<'a>(&'a self, backend: &'a BackendConfig) -> Option<&'a BackendTlsConfig> {
        backend.tls.as_ref().or(self.tls.as_ref())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendConfig {
    /// `host:port` as written.
    pub addr: String,
    /// Stable identity (defaults to `addr`): what sticky hashing and cookies are computed from, so moving a
    /// backend to a new address keeps its keys when the id stays.
    pub id: String,
    pub weight: u32,
    /// A draining backend takes no new connections; its live ones finish.
    pub drain: bool,
    /// This backend's own `tls` table, used instead of its pool's (see `PoolConfig::tls_of`).
    pub tls: Option<BackendTlsConfig>,
}

/// A backend entry that names a DNS name: every A and AAAA record of it is a backend, whose id and
/// address are the record's `ip:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DiscoveryConfig {
    /// `host:port` as written.
    pub name: String,
    pub host: String,
    pub port: u16,
    /// The weight of each backend found.
    pub weight: u32,
    /// Every backend found drains (as `drain = true` does for one written backend).
    pub drain: bool,
    /// The longest time between two resolutions; a shorter record TTL is followed.
    pub resolve_every: Duration,
    /// The shortest time between two resolutions, whatever the TTL.
    pub resolve_min: Duration,
    /// How long a record must be missing from the answers before its backend drains.
    pub remove_after: Duration,
    /// This entry's own `tls` table, used instead of its pool's; the name checked is the DNS name's host.
    pub tls: Option<BackendTlsConfig>,
}

impl DiscoveryConfig {
    pub const DEFAULT_RESOLVE_EVERY: Duration = Duration::from_secs(10);
    pub const DEFAULT_RESOLVE_MIN: Duration = Duration::from_secs(1);
    pub const DEFAULT_REMOVE_AFTER: Duration = Duration::from_secs(30);
}

/// The admin listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Peers allowed to use it at all; empty: anyone who can reach the address.
    pub allow: Vec<cidr::Cidr>,
    /// The file of bearer tokens for the write endpoints (`POST`); `None`: they are off.
    pub token_file: Option<TokenFile>,
}

/// Where the admin tokens are, and where the config names the file (for its load errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFile {
    pub path: PathBuf,
    pub config_file: String,
    pub line: usize,
}

impl TokenFile {
    pub fn error(&self, message: impl fmt::Display) -> ConfigError {
        ConfigError {
            file: self.config_file.clone(),
            line: self.line,
            key: "admin.token_file".to_string(),
            message: message.to_string(),
        }
    }
}

/// DNS resolution for discovered backends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsConfig {
    /// Nameservers to ask; empty: the system's (`/etc/resolv.conf`).
    pub servers: Vec<SocketAddr>,
}

/// TLS toward backends: one pool's or one backend's `tls` table. Its files are loaded when a config
/// generation is built (`upstream::TlsClients`), so a reload re-reads them.
///
/// Two tables that say the same thing are equal wherever they are written (`origin` is left out of
/// `==` and of the hash): they share one client configuration, and with it its TLS session cache.
#[derive(Debug, Clone)]
pub struct BackendTlsConfig {
    /// The name the backend's certificate must be valid for, also sent as SNI; `None`: the host of the
    /// backend's address (see `server_name`).
    pub server_name: Option<String>,
    /// PEM files of the roots to trust (paths resolved against the config file's folder); empty: the
    /// Mozilla roots of the `webpki-roots` crate.
    pub ca: Vec<PathBuf>,
    /// `false` accepts any certificate (the handshake's signatures are still checked): for test setups
    /// only, and logged at every load.
    pub verify: bool,
    /// wsgate's own certificate and key, for backends that require mutual TLS.
    pub client_cert: Option<CertFiles>,
    pub origin: TlsOrigin,
}

impl BackendTlsConfig {
    /// The name a backend at `addr` must prove: `server_name`, else the host of `addr` (an IP address
    /// is then checked against the certificate's IP addresses).
    pub fn server_name<'a>(&'a self, addr: &'a str) -> &'a str {
        match &self.server_name {
            Some(name) => name,
            None => super::split_host_port(addr).map_or(addr, |(host, _)| host),
        }
    }

    fn identity(&self) -> TlsIdentity<'_> {
        TlsIdentity {
            server_name: self.server_name.as_deref(),
            ca: &self.ca,
            verify: self.verify,
            client_cert: self.client_cert.as_ref().map(|c| (&*c.cert, &*c.key)),
        }
    }
}

/// What a backend `tls` table says, without where it says it.
#[derive(PartialEq, Eq, Hash)]
struct TlsIdentity<'a> {
    server_name: Option<&'a str>,
    ca: &'a [PathBuf],
    verify: bool,
    client_cert: Option<(&'a Path, &'a Path)>,
}

impl PartialEq for BackendTlsConfig {
    fn eq(&self, other: &Self) -> bool {
        self.identity() == other.identity()
    }
}

impl Eq for BackendTlsConfig {}

impl std::hash::Hash for BackendTlsConfig {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.identity().hash(state);
    }
}

/// Where a backend `tls` table is written, so a problem with one of its files, found only when they are
/// loaded (at start, on reload, by `wsgate check`), is reported like the file's other mistakes.
#[derive(Debug, Clone, Default)]
pub struct TlsOrigin {
    pub file: String,
    /// The table's key, e.g. `pool.chat.tls` or `pool.chat.backends[1].tls`.
    pub key: String,
    /// The line of the table, and of its `ca` and `client_cert` values (the table's when not given).
    pub line: usize,
    pub ca_line: usize,
    pub client_cert_line: usize,
}

impl TlsOrigin {
    /// A problem with the table as a whole.
    pub fn table_error(&self, message: impl fmt::Display) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: self.line,
            key: self.key.clone(),
            message: message.to_string(),
        }
    }

    /// A problem with the `ca` files.
    pub fn ca_error(&self, message: impl fmt::Display) -> ConfigError {
        self.error(self.ca_line, "ca", message)
    }

    /// A problem with the `client_cert` files.
    pub fn client_cert_error(&self, message: impl fmt::Display) -> ConfigError {
        self.error(self.client_cert_line, "client_cert", message)
    }

    fn error(&self, line: usize, field: &str, message: impl fmt::Display) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line,
            key: format!("{}.{field}", self.key),
            message: message.to_string(),
        }
    }
}
