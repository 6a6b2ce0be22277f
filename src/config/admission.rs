//! Checking the admission-control keys (README, "Protecting backends"): a listener's PROXY protocol,
//! trusted proxies, per-client connection limit and handshake gate; a route's Origin allow-list,
//! per-client tunnel limit and handshake rate; a pool's PROXY protocol toward its backends.

use std::time::Duration;

use toml::Spanned;

use super::check::Checker;
use super::file::{FileListener, FilePool, FileRate, FileRoute, Text};
use super::model::*;
use super::{cidr, units};
use crate::origin::{OriginList, OriginPattern};
use crate::proxy_protocol::{Version, Versions};

/// The largest rate wsgate takes, per second: far above what one process handshakes, and small enough
/// that the rate's interval stays a whole number of nanoseconds.
const MAX_RATE: f64 = 1e6;

/// How long a listener's queued handshakes wait by default before 503.
const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(5);

/// The longest a queued handshake may be made to wait: clients and their libraries give up long before.
const MAX_MAX_WAIT: Duration = Duration::from_secs(60);

impl Checker<'_> {
    pub(super) fn listener_admission(&mut self, l: &FileListener, key: &str) -> ListenerAdmission {
        let proxy_protocol = match (&l.proxy_protocol, &l.proxy_protocol_from) {
            (None, None) => None,
            (None, Some(from)) => {
                self.error(
                    from.span().start,
                    format!("{key}.proxy_protocol_from"),
                    "only used with proxy_protocol = \"v1\", \"v2\" or \"any\"",
                );
                None
            }
            (Some(version), from) => {
                let versions = match version.get_ref().as_str() {
                    "v1" => Some(Versions::V1),
                    "v2" => Some(Versions::V2),
                    "any" => Some(Versions::Any),
                    other => {
                        self.error(
                            version.span().start,
                            format!("{key}.proxy_protocol"),
                            format!("`{other}`: expected \"v1\", \"v2\" or \"any\""),
                        );
                        None
                    }
                };
                let from = match from {
                    Some(list) => self.cidrs(list, &format!("{key}.proxy_protocol_from")),
                    None => {
                        self.error(
                            version.span().start,
                            format!("{key}.proxy_protocol_from"),
                            "name the load balancers that send the PROXY header, e.g. \
                             [\"10.0.0.0/8\"] ([\"0.0.0.0/0\", \"::/0\"] believes any peer)",
                        );
                        Vec::new()
                    }
                };
                versions.map(|versions| ProxyProtocolIn { versions, from })
            }
        };
        let trusted_proxies = match &l.trusted_proxies {
            Some(list) => self.cidrs(list, &format!("{key}.trusted_proxies")),
            None => Vec::new(),
        };
        let max_connections_per_ip = l
            .max_connections_per_ip
            .as_ref()
            .and_then(|n| self.per_client(n, &format!("{key}.max_connections_per_ip")));
        let handshake_rate = l.handshake_rate.as_ref().and_then(|r| {
            let rate_key = format!("{key}.handshake_rate");
            let rate = self.rate(r, &rate_key)?;
            let max_wait = match &r.get_ref().max_wait {
                None => DEFAULT_MAX_WAIT,
                Some(text) => match units::parse_duration(text.get_ref()) {
                    Ok(wait) if wait <= MAX_MAX_WAIT => wait,
                    Ok(_) => {
                        self.error(
                            text.span().start,
                            format!("{rate_key}.max_wait"),
                            "at most 60s: clients give up long before",
                        );
                        DEFAULT_MAX_WAIT
                    }
                    Err(e) => {
                        self.error(text.span().start, format!("{rate_key}.max_wait"), e);
                        DEFAULT_MAX_WAIT
                    }
                },
            };
            Some(HandshakeRate { rate, max_wait })
        });
        ListenerAdmission {
            proxy_protocol,
            trusted_proxies,
            max_connections_per_ip,
            handshake_rate,
        }
    }

    pub(super) fn route_admission(&mut self, r: &FileRoute, key: &str) -> RouteAdmission {
        let origins = match (&r.allowed_origins, &r.allow_missing_origin) {
            (None, None) => None,
            (None, Some(allow)) => {
                self.error(
                    allow.span().start,
                    format!("{key}.allow_missing_origin"),
                    "only used with allowed_origins",
                );
                None
            }
            (Some(list), allow_missing) => {
                let mut patterns = Vec::new();
                for (i, text) in list.get_ref().iter().enumerate() {
                    match OriginPattern::parse(text.get_ref()) {
                        Ok(pattern) => patterns.push(pattern),
                        Err(e) => self.error(
                            text.span().start,
                            format!("{key}.allowed_origins[{i}]"),
                            e.to_string(),
                        ),
                    }
                }
                let allow_missing = allow_missing.as_ref().is_some_and(|a| *a.get_ref());
                if list.get_ref().is_empty() && !allow_missing {
                    self.error(
                        list.span().start,
                        format!("{key}.allowed_origins"),
                        "an empty list refuses every upgrade: name the origins of your pages",
                    );
                }
                Some(OriginList::new(patterns, allow_missing))
            }
        };
        let max_tunnels_per_ip = r
            .max_tunnels_per_ip
            .as_ref()
            .and_then(|n| self.per_client(n, &format!("{key}.max_tunnels_per_ip")));
        let handshake_rate_per_ip = r.handshake_rate_per_ip.as_ref().and_then(|rate| {
            let rate_key = format!("{key}.handshake_rate_per_ip");
            if let Some(wait) = &rate.get_ref().max_wait {
                self.error(
                    wait.span().start,
                    format!("{rate_key}.max_wait"),
                    "a client over its own rate is refused at once (429): max_wait is for a \
                     listener's handshake_rate",
                );
            }
            self.rate(rate, &rate_key)
        });
        RouteAdmission {
            origins,
            max_tunnels_per_ip,
            handshake_rate_per_ip,
        }
    }

    pub(super) fn pool_proxy_protocol(
        &mut self,
        pool: &FilePool,
        key: &str,
    ) -> Option<ProxyProtocolOut> {
        let health = pool.proxy_protocol_health.as_ref();
        let Some(version) = &pool.proxy_protocol else {
            if let Some(health) = health {
                self.error(
                    health.span().start,
                    format!("{key}.proxy_protocol_health"),
                    "only used with proxy_protocol = \"v1\" or \"v2\"",
                );
            }
            return None;
        };
        let version = match version.get_ref().as_str() {
            "v1" => Version::V1,
            "v2" => Version::V2,
            other => {
                self.error(
                    version.span().start,
                    format!("{key}.proxy_protocol"),
                    format!("`{other}`: expected \"v1\" or \"v2\""),
                );
                return None;
            }
        };
        Some(ProxyProtocolOut {
            version,
            health: health.is_none_or(|h| *h.get_ref()),
        })
    }

    /// `limits.max_tracked_clients` and `limits.ipv6_prefix`.
    pub(super) fn tracking(
        &mut self,
        max_tracked: &Option<Spanned<i64>>,
        prefix: &Option<Spanned<i64>>,
    ) -> (usize, u8) {
        let defaults = Limits::default();
        let max_tracked = match max_tracked {
            None => defaults.max_tracked_clients,
            Some(n) if (1024..=10_000_000).contains(n.get_ref()) => *n.get_ref() as usize,
            Some(n) => {
                self.error(
                    n.span().start,
                    "limits.max_tracked_clients",
                    "must be between 1024 and 10000000",
                );
                defaults.max_tracked_clients
            }
        };
        let prefix = match prefix {
            None => defaults.ipv6_prefix,
            Some(n) if (1..=128).contains(n.get_ref()) => *n.get_ref() as u8,
            Some(n) => {
                self.error(
                    n.span().start,
                    "limits.ipv6_prefix",
                    "must be between 1 and 128 (a /64 is one subscriber's network)",
                );
                defaults.ipv6_prefix
            }
        };
        (max_tracked, prefix)
    }

    /// A list of networks.
    pub(super) fn cidrs(&mut self, list: &Spanned<Vec<Text>>, key: &str) -> Vec<cidr::Cidr> {
        let mut nets = Vec::new();
        for (i, net) in list.get_ref().iter().enumerate() {
            match net.get_ref().parse::<cidr::Cidr>() {
                Ok(net) => nets.push(net),
                Err(e) => self.error(net.span().start, format!("{key}[{i}]"), e.to_string()),
            }
        }
        nets
    }

    /// A per-client count limit: at least 1.
    fn per_client(&mut self, n: &Spanned<i64>, key: &str) -> Option<u32> {
        if (1..=MAX_CONNECTIONS as i64).contains(n.get_ref()) {
            Some(*n.get_ref() as u32)
        } else {
            self.error(
                n.span().start,
                key,
                format!("must be between 1 and {MAX_CONNECTIONS}"),
            );
            None
        }
    }

    /// `{ rate, burst }`: a rate per second in (0, 1e6]; the burst defaults to the rate (one second's
    /// worth, at least 1).
    fn rate(&mut self, r: &Spanned<FileRate>, key: &str) -> Option<Rate> {
        let r = r.get_ref();
        let per_second = *r.rate.get_ref();
        if !(per_second > 0.0 && per_second <= MAX_RATE) {
            self.error(
                r.rate.span().start,
                format!("{key}.rate"),
                "handshakes per second: more than 0, at most 1000000",
            );
            return None;
        }
        let burst = match &r.burst {
            None => per_second.ceil() as u32,
            Some(n) if (1..=MAX_RATE as i64).contains(n.get_ref()) => *n.get_ref() as u32,
            Some(n) => {
                self.error(
                    n.span().start,
                    format!("{key}.burst"),
                    "must be between 1 and 1000000",
                );
                return None;
            }
        };
        Some(Rate { per_second, burst })
    }
}
