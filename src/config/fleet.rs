//! Checking the fleet-operations keys (README, "Rolling updates of backends"): the admin listener's
//! access (`allow`, `token_file`), the `[dns]` table, a pool's `drain_spread`, and backend entries that
//! name a DNS name (`dns`, `resolve_every`, `resolve_min`, `remove_after`).

use std::time::Duration;

use super::check::{Checker, split_host_port};
use super::file::{FileAdmin, FileBackend, FileDns, Text};
use super::model::*;
use super::units;

/// The longest `resolve_every` and `remove_after`: a longer one is a typo more often than a wish.
const MAX_DISCOVERY_INTERVAL: Duration = Duration::from_secs(24 * 3600);

impl Checker<'_> {
    pub(super) fn admin(&mut self, admin: &FileAdmin) -> Option<AdminConfig> {
        let listen = self.socket_addr(&admin.listen, "admin.listen");
        let allow = admin
            .allow
            .as_ref()
            .map(|list| {
                if list.get_ref().is_empty() {
                    self.error(
                        list.span().start,
                        "admin.allow",
                        "an empty list would refuse everyone: leave `allow` out to let anyone \
                         who can reach the address in",
                    );
                }
                self.cidrs(list, "admin.allow")
            })
            .unwrap_or_default();
        let token_file = admin.token_file.as_ref().map(|path| TokenFile {
            path: self.file_path(path, "admin.token_file"),
            config_file: self.file_name().to_string(),
            line: self.line_at(path.span().start),
        });
        listen.map(|listen| AdminConfig {
            listen,
            allow,
            token_file,
        })
    }

    pub(super) fn dns(&mut self, dns: Option<&FileDns>) -> DnsConfig {
        let Some(servers) = dns.and_then(|d| d.servers.as_ref()) else {
            return DnsConfig::default();
        };
        if servers.get_ref().is_empty() {
            self.error(
                servers.span().start,
                "dns.servers",
                "an empty list: leave `servers` out to use the system's nameservers",
            );
        }
        let servers = servers
            .get_ref()
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.socket_addr(s, &format!("dns.servers[{i}]")))
            .collect();
        DnsConfig { servers }
    }

    /// `drain_spread`: a duration (zero closes at once) or `"none"` (tunnels finish on their own).
    pub(super) fn drain_spread(&mut self, value: &Option<Text>, key: &str) -> Option<Duration> {
        let Some(text) = value else {
            return Some(PoolConfig::DEFAULT_DRAIN_SPREAD);
        };
        if text.get_ref().trim() == "none" {
            return None;
        }
        match units::parse_duration(text.get_ref()) {
            Ok(spread) if spread <= MAX_DISCOVERY_INTERVAL => Some(spread),
            Ok(_) => {
                self.error(text.span().start, key, "at most 24h");
                Some(PoolConfig::DEFAULT_DRAIN_SPREAD)
            }
            Err(e) => {
                self.error(
                    text.span().start,
                    key,
                    format!("{e}, or \"none\" to let tunnels finish on their own"),
                );
                Some(PoolConfig::DEFAULT_DRAIN_SPREAD)
            }
        }
    }

    /// A backend entry with `dns` (the caller checked it has no `addr`). `weight` and `tls` are the
    /// entry's, checked by the caller like a written backend's.
    pub(super) fn discovery(
        &mut self,
        b: &FileBackend,
        dns: &Text,
        key: &str,
        (weight, tls): (u32, Option<BackendTlsConfig>),
    ) -> Option<DiscoveryConfig> {
        if let Some(id) = &b.id {
            self.error(
                id.span().start,
                format!("{key}.id"),
                "a discovered backend's id is its address: leave `id` out",
            );
        }
        let name = dns.get_ref().trim();
        let Some((host, port)) = split_host_port(name) else {
            self.error(
                dns.span().start,
                format!("{key}.dns"),
                format!(
                    "`{name}` is not a name to resolve: expected host:port, e.g. \
                     \"chat.default.svc.cluster.local:9000\""
                ),
            );
            return None;
        };
        let mut interval = |value: &Option<Text>, field: &str, default: Duration| {
            let key = format!("{key}.{field}");
            let Some(text) = value else { return default };
            match units::parse_duration(text.get_ref()) {
                Ok(v) if v > MAX_DISCOVERY_INTERVAL => {
                    self.error(text.span().start, key, "at most 24h");
                    default
                }
                Ok(v) => v,
                Err(e) => {
                    self.error(text.span().start, key, e);
                    default
                }
            }
        };
        let resolve_every = interval(
            &b.resolve_every,
            "resolve_every",
            DiscoveryConfig::DEFAULT_RESOLVE_EVERY,
        );
        let resolve_min = interval(
            &b.resolve_min,
            "resolve_min",
            DiscoveryConfig::DEFAULT_RESOLVE_MIN,
        );
        let remove_after = interval(
            &b.remove_after,
            "remove_after",
            DiscoveryConfig::DEFAULT_REMOVE_AFTER,
        );
        let at = b.resolve_every.as_ref().unwrap_or(dns).span().start;
        if resolve_every < Duration::from_millis(100) {
            self.error(
                at,
                format!("{key}.resolve_every"),
                "at least 100ms: every resolution is a query to the nameservers",
            );
        }
        if resolve_min < Duration::from_millis(100) {
            let at = b.resolve_min.as_ref().unwrap_or(dns).span().start;
            self.error(
                at,
                format!("{key}.resolve_min"),
                "at least 100ms: a record with a TTL of 0 would otherwise make wsgate ask without pause",
            );
        }
        if resolve_min > resolve_every {
            let at = b.resolve_min.as_ref().unwrap_or(dns).span().start;
            self.error(
                at,
                format!("{key}.resolve_min"),
                format!(
                    "larger than resolve_every ({}ms): resolve_min bounds how often a short TTL \
                     makes wsgate ask again",
                    resolve_every.as_millis()
                ),
            );
        }
        Some(DiscoveryConfig {
            name: name.to_string(),
            host: host.to_string(),
            port,
            weight,
            drain: b.drain,
            // Within bounds even when an error was reported (the config is then refused anyway).
            resolve_every: resolve_every.max(Duration::from_millis(100)),
            resolve_min: resolve_min
                .max(Duration::from_millis(100))
                .min(resolve_every.max(Duration::from_millis(100))),
            remove_after,
            tls,
        })
    }
}
