//! Checking a config file: from what the file says (`file.rs`) to the typed model (`model.rs`). Every
//! problem is collected with its file, line and key, so `wsgate check` lists them all at once.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::ServerName;
use toml::Spanned;

use super::file::{
    FileBackend, FileBackendTls, FileConfig, FileHealth, FilePool, FileRoute, FileSticky,
    FileWebSocket, Text,
};
use super::model::*;
use super::units;
use super::{file, key_path};

impl Config {
    /// Reads and checks a config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigErrors> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: name.clone(),
                line: 0,
                key: String::new(),
                message: format!("cannot read the file: {e}"),
            }])
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = Config::parse(&text, &name, base)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Checks config text; `file_name` is what error messages call it. Relative paths in it (certificates)
    /// are taken from the current folder.
    pub fn from_toml(text: &str, file_name: &str) -> Result<Config, ConfigErrors> {
        Config::parse(text, file_name, Path::new("."))
    }

    fn parse(text: &str, file_name: &str, base: &Path) -> Result<Config, ConfigErrors> {
        let mut check = Checker {
            file: file_name,
            text,
            base,
            errors: Vec::new(),
        };
        let parsed: FileConfig = match toml::from_str(text) {
            Ok(parsed) => parsed,
            Err(e) => {
                let line = e.span().map_or(0, |s| check.line_of(s.start));
                let key = e
                    .span()
                    .map_or_else(String::new, |s| key_path::key_path_at(text, s.start));
                check.errors.push(ConfigError {
                    file: file_name.to_string(),
                    line,
                    key,
                    message: e.message().trim().to_string(),
                });
                return Err(ConfigErrors(check.errors));
            }
        };
        let config = check.config(parsed);
        if check.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(check.errors))
        }
    }
}

/// Walks the parsed file, collecting every problem.
pub(super) struct Checker<'a> {
    file: &'a str,
    text: &'a str,
    /// The config file's folder: relative paths in the file are relative to it.
    base: &'a Path,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    pub(super) fn file_name(&self) -> &str {
        self.file
    }

    pub(super) fn line_at(&self, offset: usize) -> usize {
        self.line_of(offset)
    }

    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    pub(super) fn error(&mut self, at: usize, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line: self.line_of(at),
            key: key.into(),
            message: message.into(),
        });
    }

    fn config(&mut self, file: FileConfig) -> Config {
        let defaults = Timeouts::default();
        let workers = file.workers.and_then(|w| match *w.get_ref() {
            0 => None,
            n if (1..=1024).contains(&n) => Some(n as usize),
            _ => {
                self.error(
                    w.span().start,
                    "workers",
                    "must be between 0 (one per core) and 1024",
                );
                None
            }
        });
        let runtime = match file.runtime.as_ref().map(|r| (r.get_ref().as_str(), r)) {
            None | Some(("shared", _)) => RuntimeModel::Shared,
            Some(("per_worker", _)) => RuntimeModel::PerWorker,
            Some((other, text)) => {
                self.error(
                    text.span().start,
                    "runtime",
                    format!("unknown runtime `{other}` (expected \"shared\" or \"per_worker\")"),
                );
                RuntimeModel::default()
            }
        };
        let event_interval = file.event_interval.map_or(DEFAULT_EVENT_INTERVAL, |e| {
            match u32::try_from(*e.get_ref()) {
                Ok(n) if (1..=1000).contains(&n) => n,
                _ => {
                    self.error(
                        e.span().start,
                        "event_interval",
                        "must be between 1 and 1000",
                    );
                    DEFAULT_EVENT_INTERVAL
                }
            }
        });
        let admin = file.admin.as_ref().and_then(|a| self.admin(a));
        let dns = self.dns(file.dns.as_ref());
        let t = &file.timeouts;
        let timeouts = Timeouts {
            connect: self.timeout(&t.connect, "timeouts.connect", defaults.connect),
            handshake: self.timeout(&t.handshake, "timeouts.handshake", defaults.handshake),
            header: self.timeout(&t.header, "timeouts.header", defaults.header),
            http_idle: self.timeout(&t.http_idle, "timeouts.http_idle", defaults.http_idle),
            backend_response: self.timeout(
                &t.backend_response,
                "timeouts.backend_response",
                defaults.backend_response,
            ),
            client_body: self.timeout(&t.client_body, "timeouts.client_body", defaults.client_body),
            send: self.timeout(&t.send, "timeouts.send", defaults.send),
            drain: self.timeout(&t.drain, "timeouts.drain", defaults.drain),
            close_spread: match &t.close_spread {
                None => defaults.close_spread,
                Some(text) => match units::parse_duration(text.get_ref()) {
                    Ok(v) => v,
                    Err(e) => {
                        self.error(text.span().start, "timeouts.close_spread", e);
                        defaults.close_spread
                    }
                },
            },
        };
        let limits = self.limits(&file.limits);
        let http2 = self.http2(&file.http2);

        let mut listeners = Vec::new();
        let mut seen = HashSet::new();
        for (i, l) in file.listener.iter().enumerate() {
            let key = format!("listener[{i}]");
            if !seen.insert(l.name.get_ref().clone()) {
                self.error(
                    l.name.span().start,
                    format!("{key}.name"),
                    "duplicate listener name",
                );
            }
            self.label(&l.name, &format!("{key}.name"));
            let tls = l
                .tls
                .as_ref()
                .map(|tls| self.tls(tls, &format!("{key}.tls")));
            let http = self.listener_http(l, &key);
            let admission = self.listener_admission(l, &key);
            if let Some(listen) = self.socket_addr(&l.listen, &format!("{key}.listen")) {
                listeners.push(ListenerConfig {
                    name: l.name.get_ref().clone(),
                    listen,
                    tls,
                    http,
                    admission,
                });
            }
        }
        if file.listener.is_empty() {
            self.error(0, "listener", "at least one [[listener]] is needed");
        }

        let mut pools = BTreeMap::new();
        for (name, pool) in &file.pool {
            let key = format!("pool.{name}");
            let start = pool.span().start;
            if name.is_empty() || !is_label(name) {
                self.error(
                    start,
                    &key,
                    "pool names may use letters, digits, '-', '_' and '.'",
                );
            }
            let pool = self.pool(pool.get_ref(), &key, start);
            pools.insert(name.clone(), pool);
        }

        let mut routes = Vec::new();
        let mut seen = HashSet::new();
        for (i, r) in file.route.iter().enumerate() {
            if !seen.insert(r.name.get_ref().clone()) {
                self.error(
                    r.name.span().start,
                    format!("route[{i}].name"),
                    "duplicate route name",
                );
            }
            if let Some(route) = self.route(r, i, &file.pool, timeouts.send) {
                routes.push(route);
            }
        }
        if file.route.is_empty() {
            self.error(0, "route", "at least one [[route]] is needed");
        }

        Config {
            source: None,
            workers,
            runtime,
            event_interval,
            admin,
            dns,
            timeouts,
            limits,
            http2,
            listeners,
            routes,
            pools,
        }
    }

    fn tls(&mut self, tls: &file::FileTls, key: &str) -> TlsConfig {
        if tls.certs.get_ref().is_empty() {
            self.error(
                tls.certs.span().start,
                format!("{key}.certs"),
                "a TLS listener needs at least one certificate",
            );
        }
        let mut path = |text: &Text, key: String| {
            let value = text.get_ref().trim();
            if value.is_empty() {
                self.error(text.span().start, key, "empty path");
            }
            self.base.join(value)
        };
        let certs = tls
            .certs
            .get_ref()
            .iter()
            .enumerate()
            .map(|(i, c)| CertFiles {
                cert: path(&c.cert, format!("{key}.certs[{i}].cert")),
                key: path(&c.key, format!("{key}.certs[{i}].key")),
            })
            .collect();
        TlsConfig { certs }
    }

    /// The HTTP versions of listener `key`: ALPN ids only on TLS listeners, h2c only on plain ones.
    fn listener_http(&mut self, l: &file::FileListener, key: &str) -> ListenerHttp {
        let defaults = ListenerHttp::default();
        let alpn = match &l.alpn {
            None => defaults.alpn,
            Some(list) => {
                if l.tls.is_none() {
                    self.error(
                        list.span().start,
                        format!("{key}.alpn"),
                        "ALPN is for TLS listeners (a plain listener takes HTTP/2 with `h2c = true`)",
                    );
                }
                let mut alpn = Vec::new();
                for (i, id) in list.get_ref().iter().enumerate() {
                    let protocol = match id.get_ref().as_str() {
                        "h2" => Alpn::H2,
                        "http/1.1" => Alpn::Http11,
                        other => {
                            self.error(
                                id.span().start,
                                format!("{key}.alpn[{i}]"),
                                format!("`{other}` is not a protocol wsgate speaks: \"h2\" or \"http/1.1\""),
                            );
                            continue;
                        }
                    };
                    if alpn.contains(&protocol) {
                        self.error(id.span().start, format!("{key}.alpn[{i}]"), "listed twice");
                    }
                    alpn.push(protocol);
                }
                if list.get_ref().is_empty() {
                    self.error(
                        list.span().start,
                        format!("{key}.alpn"),
                        "name at least one protocol: \"h2\", \"http/1.1\"",
                    );
                }
                alpn
            }
        };
        let h2c = match &l.h2c {
            None => defaults.h2c,
            Some(h2c) => {
                if *h2c.get_ref() && l.tls.is_some() {
                    self.error(
                        h2c.span().start,
                        format!("{key}.h2c"),
                        "h2c is HTTP/2 without TLS: a TLS listener offers HTTP/2 by ALPN (`alpn`)",
                    );
                }
                *h2c.get_ref()
            }
        };
        ListenerHttp {
            alpn,
            h2c,
            websocket_over_h2: l.websocket_over_h2.unwrap_or(defaults.websocket_over_h2),
        }
    }

    fn http2(&mut self, h: &file::FileHttp2) -> Http2Settings {
        /// The most one HTTP/2 connection may be sent ahead of wsgate: its connection window.
        const MAX_HTTP2_CONNECTION_WINDOW: u64 = 256 << 20;
        let defaults = Http2Settings::default();
        let max_concurrent_streams = match &h.max_concurrent_streams {
            None => defaults.max_concurrent_streams,
            Some(n) if (1..=10_000).contains(n.get_ref()) => *n.get_ref() as u32,
            Some(n) => {
                self.error(
                    n.span().start,
                    "http2.max_concurrent_streams",
                    "must be between 1 and 10000",
                );
                defaults.max_concurrent_streams
            }
        };
        let stream_window = match &h.stream_window {
            None => defaults.stream_window,
            Some(text) => match units::parse_size(text.get_ref()) {
                Ok(n) if ((16 << 10)..=(16 << 20)).contains(&n) => n as u32,
                Ok(_) => {
                    self.error(
                        text.span().start,
                        "http2.stream_window",
                        "must be between 16KiB and 16MiB",
                    );
                    defaults.stream_window
                }
                Err(e) => {
                    self.error(text.span().start, "http2.stream_window", e);
                    defaults.stream_window
                }
            },
        };
        // What one connection may hold of its client's data is every stream's window: keep it sane.
        let most = u64::from(max_concurrent_streams) * u64::from(stream_window);
        if most > MAX_HTTP2_CONNECTION_WINDOW
            && let Some(at) = h
                .stream_window
                .as_ref()
                .map(|t| t.span().start)
                .or(h.max_concurrent_streams.as_ref().map(|n| n.span().start))
        {
            self.error(
                at,
                "http2",
                format!(
                    "max_concurrent_streams × stream_window is {} MiB, over the 256 MiB one connection may hold",
                    most >> 20
                ),
            );
        }
        Http2Settings {
            max_concurrent_streams,
            stream_window,
        }
    }

    fn limits(&mut self, l: &file::FileLimits) -> Limits {
        let defaults = Limits::default();
        let max_header_size = match &l.max_header_size {
            None => defaults.max_header_size,
            Some(text) => match units::parse_size(text.get_ref()) {
                Ok(n) if (1024..=(16 << 20)).contains(&n) => n as usize,
                Ok(_) => {
                    self.error(
                        text.span().start,
                        "limits.max_header_size",
                        "must be between 1KiB and 16MiB",
                    );
                    defaults.max_header_size
                }
                Err(e) => {
                    self.error(text.span().start, "limits.max_header_size", e);
                    defaults.max_header_size
                }
            },
        };
        let max_connections = match &l.max_connections {
            None => defaults.max_connections,
            Some(n) if (1..=MAX_CONNECTIONS as i64).contains(n.get_ref()) => *n.get_ref() as usize,
            Some(n) => {
                self.error(
                    n.span().start,
                    "limits.max_connections",
                    format!("must be between 1 and {MAX_CONNECTIONS}"),
                );
                defaults.max_connections
            }
        };
        let (max_tracked_clients, ipv6_prefix) =
            self.tracking(&l.max_tracked_clients, &l.ipv6_prefix);
        Limits {
            max_header_size,
            max_connections,
            max_tracked_clients,
            ipv6_prefix,
        }
    }

    fn route(
        &mut self,
        r: &FileRoute,
        index: usize,
        pools: &BTreeMap<String, Spanned<file::FilePool>>,
        send_timeout: Duration,
    ) -> Option<RouteConfig> {
        let key = format!("route[{index}]");
        self.label(&r.name, &format!("{key}.name"));
        let host = r.host.as_ref().and_then(|h| {
            let host = h.get_ref().trim().to_ascii_lowercase();
            if host.is_empty() || host.contains(['/', ' ', ':']) {
                self.error(
                    h.span().start,
                    format!("{key}.host"),
                    "expected a host name without port, e.g. \"chat.example.com\"",
                );
                None
            } else {
                Some(host)
            }
        });
        let path_prefix = match &r.path_prefix {
            None => "/".to_string(),
            Some(p) if p.get_ref().starts_with('/') => p.get_ref().clone(),
            Some(p) => {
                self.error(
                    p.span().start,
                    format!("{key}.path_prefix"),
                    "must start with '/'",
                );
                "/".to_string()
            }
        };
        if !pools.contains_key(r.pool.get_ref()) {
            self.error(
                r.pool.span().start,
                format!("{key}.pool"),
                format!(
                    "no pool named `{}` (add a [pool.{}] section)",
                    r.pool.get_ref(),
                    r.pool.get_ref()
                ),
            );
        }
        let websocket = self.websocket(&r.websocket, &format!("{key}.websocket"), send_timeout);
        let admission = self.route_admission(r, &key);
        Some(RouteConfig {
            name: r.name.get_ref().clone(),
            host,
            path_prefix,
            pool: r.pool.get_ref().clone(),
            websocket,
            admission,
        })
    }

    /// `send_timeout` is the default of the route's own `send_timeout`: the global `timeouts.send`.
    fn websocket(
        &mut self,
        w: &FileWebSocket,
        key: &str,
        send_timeout: Duration,
    ) -> WebSocketSettings {
        let d = WebSocketSettings::default();
        let ping_interval = self.optional_duration(
            &w.ping_interval,
            &format!("{key}.ping_interval"),
            d.ping_interval,
        );
        let max_lifetime =
            self.optional_duration(&w.max_lifetime, &format!("{key}.max_lifetime"), None);
        let park_after =
            self.optional_duration(&w.park_after, &format!("{key}.park_after"), d.park_after);
        let max_message_size = match &w.max_message_size {
            None => d.max_message_size,
            Some(text) => match units::parse_size(text.get_ref()) {
                Ok(0) => {
                    self.error(
                        text.span().start,
                        format!("{key}.max_message_size"),
                        "must be larger than zero",
                    );
                    d.max_message_size
                }
                Ok(v) => v,
                Err(e) => {
                    self.error(text.span().start, format!("{key}.max_message_size"), e);
                    d.max_message_size
                }
            },
        };
        WebSocketSettings {
            idle_timeout: self.timeout(
                &w.idle_timeout,
                &format!("{key}.idle_timeout"),
                d.idle_timeout,
            ),
            ping_interval,
            pong_timeout: self.timeout(
                &w.pong_timeout,
                &format!("{key}.pong_timeout"),
                d.pong_timeout,
            ),
            max_message_size,
            close_timeout: self.timeout(
                &w.close_timeout,
                &format!("{key}.close_timeout"),
                d.close_timeout,
            ),
            ping_backend: w.ping_backend.unwrap_or(d.ping_backend),
            max_lifetime,
            send_timeout: self.timeout(
                &w.send_timeout,
                &format!("{key}.send_timeout"),
                send_timeout,
            ),
            park_after,
        }
    }

    fn pool(&mut self, pool: &FilePool, key: &str, start: usize) -> PoolConfig {
        let policy = match pool.policy.as_ref().map(|p| (p.get_ref().as_str(), p)) {
            None | Some(("least_conn", _)) => {
                if let Some(sticky) = &pool.sticky {
                    self.error(
                        sticky.span().start,
                        format!("{key}.sticky"),
                        "only used with policy = \"sticky\"",
                    );
                }
                Policy::LeastConn
            }
            Some(("sticky", p)) => match &pool.sticky {
                Some(sticky) => self
                    .sticky(sticky, &format!("{key}.sticky"))
                    .map_or(Policy::LeastConn, Policy::Sticky),
                None => {
                    self.error(
                        p.span().start,
                        format!("{key}.policy"),
                        "policy \"sticky\" needs a `sticky` table saying where the key is, e.g. \
                         sticky = { cookie = \"wsgate\" }",
                    );
                    Policy::LeastConn
                }
            },
            Some((other, p)) => {
                self.error(
                    p.span().start,
                    format!("{key}.policy"),
                    format!("unknown policy `{other}` (expected \"least_conn\" or \"sticky\")"),
                );
                Policy::LeastConn
            }
        };
        let health = pool
            .health
            .as_ref()
            .map(|h| self.health(h.get_ref(), &format!("{key}.health")));
        let max_fails = self.count(
            &pool.max_fails,
            &format!("{key}.max_fails"),
            0..=1000,
            PoolConfig::DEFAULT_MAX_FAILS,
        );
        let fail_timeout = self.timeout(
            &pool.fail_timeout,
            &format!("{key}.fail_timeout"),
            PoolConfig::DEFAULT_FAIL_TIMEOUT,
        );
        let tls = pool
            .tls
            .as_ref()
            .map(|tls| self.backend_tls(tls, &format!("{key}.tls")));
        if pool.backends.get_ref().is_empty() {
            self.error(
                pool.backends.span().start.max(start),
                format!("{key}.backends"),
                "a pool needs at least one backend",
            );
        }
        let mut addrs = HashSet::new();
        let mut ids = HashSet::new();
        let mut backends = Vec::new();
        let mut discovery = Vec::new();
        for (i, b) in pool.backends.get_ref().iter().enumerate() {
            let key = format!("{key}.backends[{i}]");
            let (addr, dns) = match (&b.addr, &b.dns) {
                (Some(addr), None) => (addr, None),
                (None, Some(dns)) => (dns, Some(dns)),
                (Some(addr), Some(_)) => {
                    self.error(
                        addr.span().start,
                        &key,
                        "give either `addr` (one backend) or `dns` (a name whose addresses are the \
                         backends), not both",
                    );
                    continue;
                }
                (None, None) => {
                    self.error(
                        pool.backends.span().start,
                        &key,
                        "each backend needs `addr` (host:port) or `dns` (a name to resolve)",
                    );
                    continue;
                }
            };
            if !addrs.insert(addr.get_ref().trim().to_string()) {
                self.error(
                    addr.span().start,
                    format!("{key}.{}", if dns.is_some() { "dns" } else { "addr" }),
                    "the same backend is listed twice",
                );
            }
            if dns.is_none() {
                for field in [&b.resolve_every, &b.resolve_min, &b.remove_after]
                    .into_iter()
                    .flatten()
                {
                    self.error(
                        field.span().start,
                        &key,
                        "resolve_every, resolve_min and remove_after are for `dns` entries",
                    );
                }
            }
            let weight = self.weight(b, &key);
            let own_tls = b
                .tls
                .as_ref()
                .map(|tls| self.backend_tls(tls, &format!("{key}.tls")));
            if let Some(dns) = dns {
                let used = own_tls.as_ref().or(tls.as_ref()).cloned();
                self.server_name_of(dns, &key, "dns", used.as_ref());
                if let Some(entry) = self.discovery(b, dns, &key, (weight, own_tls)) {
                    discovery.push(entry);
                }
                continue;
            }
            let Some(backend) = self.backend(b, addr, &key, (weight, own_tls), tls.as_ref()) else {
                continue;
            };
            if !ids.insert(backend.id.clone()) {
                let at = b.id.as_ref().unwrap_or(addr).span().start;
                self.error(
                    at,
                    format!("{key}.id"),
                    format!(
                        "the id `{}` is used by another backend of this pool",
                        backend.id
                    ),
                );
            }
            backends.push(backend);
        }
        let drain_spread = self.drain_spread(&pool.drain_spread, &format!("{key}.drain_spread"));
        let proxy_protocol = self.pool_proxy_protocol(pool, key);
        PoolConfig {
            policy,
            health,
            max_fails,
            fail_timeout,
            tls,
            proxy_protocol,
            drain_spread,
            backends,
            discovery,
        }
    }

    /// A pool's or a backend's `tls` table.
    fn backend_tls(&mut self, tls: &Spanned<FileBackendTls>, key: &str) -> BackendTlsConfig {
        let table_line = self.line_of(tls.span().start);
        let t = tls.get_ref();
        let server_name = t.server_name.as_ref().and_then(|name| {
            let text = name.get_ref().trim();
            let problem = if text.is_empty() {
                "must not be empty (leave it out to use the host of each backend's address)"
                    .to_string()
            } else if ServerName::try_from(text).is_err() {
                format!("`{text}` is neither a DNS name nor an IP address")
            } else {
                return Some(text.to_string());
            };
            self.error(name.span().start, format!("{key}.server_name"), problem);
            None
        });
        let verify = t.verify.as_ref().is_none_or(|v| *v.get_ref());
        let mut ca = Vec::new();
        if let Some(paths) = &t.ca {
            let at = paths.span().start;
            if paths.get_ref().0.is_empty() {
                self.error(at, format!("{key}.ca"), "give at least one PEM file");
            }
            if !verify {
                self.error(at, format!("{key}.ca"), "only used with verify = true");
            }
            for path in &paths.get_ref().0 {
                ca.push(self.file_path_at(path, at, &format!("{key}.ca")));
            }
        }
        let client_cert = t.client_cert.as_ref().map(|files| {
            let files = files.get_ref();
            CertFiles {
                cert: self.file_path(&files.cert, &format!("{key}.client_cert.cert")),
                key: self.file_path(&files.key, &format!("{key}.client_cert.key")),
            }
        });
        let line = |value: Option<usize>| value.map_or(table_line, |at| self.line_of(at));
        BackendTlsConfig {
            server_name,
            ca,
            verify,
            client_cert,
            origin: TlsOrigin {
                file: self.file.to_string(),
                key: key.to_string(),
                line: table_line,
                ca_line: line(t.ca.as_ref().map(|c| c.span().start)),
                client_cert_line: line(t.client_cert.as_ref().map(|c| c.span().start)),
            },
        }
    }

    /// A file named in the config, resolved against the config file's folder.
    pub(super) fn file_path(&mut self, path: &Text, key: &str) -> PathBuf {
        self.file_path_at(path.get_ref(), path.span().start, key)
    }

    /// `file_path` for a path whose value is at `at`.
    fn file_path_at(&mut self, path: &str, at: usize, key: &str) -> PathBuf {
        let path = path.trim();
        if path.is_empty() {
            self.error(at, key, "empty path");
        }
        self.base.join(path)
    }

    /// Exactly one key source; `None` (after reporting) when the table is not usable.
    fn sticky(&mut self, sticky: &Spanned<FileSticky>, key: &str) -> Option<StickyKey> {
        let at = sticky.span().start;
        let s = sticky.get_ref();
        let source_ip = s.source_ip.as_ref().is_some_and(|v| *v.get_ref());
        let sources = [
            s.cookie.is_some(),
            s.header.is_some(),
            s.query.is_some(),
            source_ip,
        ];
        if sources.iter().filter(|&&set| set).count() != 1 {
            self.error(
                at,
                key,
                "give exactly one key source: cookie = \"NAME\", header = \"NAME\", query = \"NAME\" \
                 or source_ip = true",
            );
            return None;
        }
        if let Some(proxies) = &s.trusted_proxies
            && !source_ip
        {
            self.error(
                proxies.span().start,
                format!("{key}.trusted_proxies"),
                "only used with source_ip = true",
            );
        }
        if let Some(name) = &s.cookie {
            let text = name.get_ref().trim();
            if !is_cookie_name(text) {
                self.error(
                    name.span().start,
                    format!("{key}.cookie"),
                    format!(
                        "`{text}` is not a cookie name: use letters, digits and !#$%&'*+-.^_`|~"
                    ),
                );
                return None;
            }
            return Some(StickyKey::Cookie(text.to_string()));
        }
        if let Some(name) = &s.header {
            return match http::HeaderName::from_bytes(name.get_ref().trim().as_bytes()) {
                Ok(header) => Some(StickyKey::Header(header)),
                Err(_) => {
                    self.error(
                        name.span().start,
                        format!("{key}.header"),
                        format!("`{}` is not a header name", name.get_ref()),
                    );
                    None
                }
            };
        }
        if let Some(name) = &s.query {
            let text = name.get_ref().trim();
            if text.is_empty() || text.contains(['&', '=', '#', ' ']) {
                self.error(
                    name.span().start,
                    format!("{key}.query"),
                    format!("`{text}` is not a query parameter name"),
                );
                return None;
            }
            return Some(StickyKey::Query(text.to_string()));
        }
        let trusted_proxies = match &s.trusted_proxies {
            Some(proxies) => self.cidrs(proxies, &format!("{key}.trusted_proxies")),
            None => Vec::new(),
        };
        Some(StickyKey::SourceIp { trusted_proxies })
    }

    fn health(&mut self, h: &FileHealth, key: &str) -> HealthCheck {
        let d = HealthCheck::default();
        let path = match &h.path {
            None => d.path,
            Some(p) if p.get_ref().starts_with('/') && !p.get_ref().contains([' ', '\r', '\n']) => {
                p.get_ref().clone()
            }
            Some(p) => {
                self.error(
                    p.span().start,
                    format!("{key}.path"),
                    "must be a path starting with '/', e.g. \"/healthz\"",
                );
                d.path
            }
        };
        HealthCheck {
            path,
            interval: self.timeout(&h.interval, &format!("{key}.interval"), d.interval),
            timeout: self.timeout(&h.timeout, &format!("{key}.timeout"), d.timeout),
            rise: self.count(&h.rise, &format!("{key}.rise"), 1..=100, d.rise),
            fall: self.count(&h.fall, &format!("{key}.fall"), 1..=100, d.fall),
            websocket: h.websocket.unwrap_or(d.websocket),
        }
    }

    /// A whole number within `range`.
    fn count(
        &mut self,
        value: &Option<Spanned<i64>>,
        key: &str,
        range: std::ops::RangeInclusive<u32>,
        default: u32,
    ) -> u32 {
        let Some(n) = value else { return default };
        match u32::try_from(*n.get_ref()) {
            Ok(v) if range.contains(&v) => v,
            _ => {
                self.error(
                    n.span().start,
                    key,
                    format!("must be between {} and {}", range.start(), range.end()),
                );
                default
            }
        }
    }

    fn weight(&mut self, b: &FileBackend, key: &str) -> u32 {
        match &b.weight {
            None => 1,
            Some(w) if (1..=1000).contains(w.get_ref()) => *w.get_ref() as u32,
            Some(w) => {
                self.error(
                    w.span().start,
                    format!("{key}.weight"),
                    "must be between 1 and 1000",
                );
                1
            }
        }
    }

    /// Without a server_name the host of `addr` is the name the certificate must carry.
    fn server_name_of(
        &mut self,
        addr: &Text,
        key: &str,
        field: &str,
        tls: Option<&BackendTlsConfig>,
    ) {
        if let Some((host, _)) = split_host_port(addr.get_ref().trim())
            && let Some(used) = tls
            && used.server_name.is_none()
            && ServerName::try_from(host).is_err()
        {
            self.error(
                addr.span().start,
                format!("{key}.{field}"),
                format!("`{host}` cannot name a TLS server: give tls.server_name"),
            );
        }
    }

    /// A written backend (`addr`). `pool_tls`: the pool's `tls` table, which the backend uses unless it
    /// has its own (`tls`).
    fn backend(
        &mut self,
        b: &FileBackend,
        addr_text: &Text,
        key: &str,
        (weight, tls): (u32, Option<BackendTlsConfig>),
        pool_tls: Option<&BackendTlsConfig>,
    ) -> Option<BackendConfig> {
        let addr = addr_text.get_ref().trim();
        let id = match &b.id {
            None => addr.to_string(),
            Some(id) => {
                let text = id.get_ref().trim();
                if text.is_empty() || text.len() > 128 || text.chars().any(char::is_control) {
                    self.error(
                        id.span().start,
                        format!("{key}.id"),
                        "must be 1 to 128 printable characters",
                    );
                }
                text.to_string()
            }
        };
        if split_host_port(addr).is_none() {
            self.error(
                addr_text.span().start,
                format!("{key}.addr"),
                format!(
                    "`{addr}` is not a backend address: expected host:port, e.g. \"10.0.0.11:9000\""
                ),
            );
            return None;
        }
        self.server_name_of(addr_text, key, "addr", tls.as_ref().or(pool_tls));
        Some(BackendConfig {
            addr: addr.to_string(),
            id,
            weight,
            drain: b.drain,
            tls,
        })
    }

    /// A duration where `"0s"` means none; `default` when the key is absent or wrong.
    fn optional_duration(
        &mut self,
        value: &Option<Text>,
        key: &str,
        default: Option<Duration>,
    ) -> Option<Duration> {
        let Some(text) = value else { return default };
        match units::parse_duration(text.get_ref()) {
            Ok(Duration::ZERO) => None,
            Ok(v) => Some(v),
            Err(e) => {
                self.error(text.span().start, key, e);
                default
            }
        }
    }

    /// A timeout that must be larger than zero.
    fn timeout(&mut self, value: &Option<Text>, key: &str, default: Duration) -> Duration {
        let Some(text) = value else { return default };
        match units::parse_duration(text.get_ref()) {
            Ok(Duration::ZERO) => {
                self.error(text.span().start, key, "a timeout of zero is not allowed");
                default
            }
            Ok(v) => v,
            Err(e) => {
                self.error(text.span().start, key, e);
                default
            }
        }
    }

    pub(super) fn socket_addr(&mut self, text: &Text, key: &str) -> Option<SocketAddr> {
        match text.get_ref().trim().parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.error(
                    text.span().start,
                    key,
                    format!(
                        "`{}` is not an address: expected ip:port, e.g. \"127.0.0.1:8080\"",
                        text.get_ref()
                    ),
                );
                None
            }
        }
    }

    /// Names become metric labels and log fields: keep them plain.
    fn label(&mut self, name: &Text, key: &str) {
        if !is_label(name.get_ref()) {
            self.error(
                name.span().start,
                key,
                "names may use letters, digits, '-', '_' and '.' only",
            );
        }
    }
}

/// A cookie name is an RFC 6265 token: visible ASCII without separators.
fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Splits `host:port` (`[v6]:port` for IPv6); `None` when it is not of that form.
pub fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':'));
    valid.then_some((host, port))
}
