//! DNS lookups for service discovery: every A and AAAA address of a backend's name, and how long the
//! answer may be trusted (its smallest TTL), so that the balancer can expand a `dns = "name:port"` backend
//! entry into one backend per address and re-resolve it on its own schedule.
//!
//! Built on `hickory-resolver`, with settings chosen for that use rather than for a stub resolver's:
//!
//! - No answer cache: wsgate decides when to ask again (`resolve_every`, the TTL), and a changed answer
//!   must be seen at the next lookup. Concurrent identical queries are still shared by hickory.
//! - Each query is bounded: [`QUERY_TIMEOUT`] per try and [`QUERY_TRIES`] tries (lower values in
//!   `/etc/resolv.conf` are kept), the whole lookup by [`LOOKUP_TIMEOUT`], so a dead nameserver cannot
//!   hold a re-resolution for long.
//! - A and AAAA are asked separately, and the lookup fails if either query fails for another reason than
//!   "no such records": a half answer (A answered, AAAA timed out) would look like the other family's
//!   backends had left. The caller keeps its last known set on any error.
//! - Answers are untrusted input: at most [`MAX_ADDRESSES`] addresses are kept (the lowest ones in sort
//!   order, so a server rotating its answer's order does not change which ones), and addresses that
//!   cannot be a backend (unspecified, multicast, broadcast) are dropped: connecting to `0.0.0.0` would
//!   reach the proxy's own host.
//!
//! Knows nothing of wsgate's other modules.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::rdata::{A, AAAA};
use hickory_resolver::proto::rr::{Name, RData, RecordType};

/// The most addresses one lookup keeps. A name with more records than this (a hostile or broken answer)
/// yields the lowest `MAX_ADDRESSES` of them in sort order, and a warning is logged.
pub const MAX_ADDRESSES: usize = 1024;

/// How long one try of one query (A or AAAA, to the configured nameservers) may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// How many times one query is sent before the lookup gives up on it (a timeout, SERVFAIL, REFUSED or
/// an I/O error is tried again; NXDOMAIN and an empty answer are not).
pub const QUERY_TRIES: usize = 2;

/// How long a whole lookup may take, search domains included: past it, [`ResolveError::Timeout`].
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// A DNS resolver for service discovery. Cheap to clone: clones share the nameserver connections.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<TokioResolver>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

/// The answer to one lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// Every A and AAAA address of the name, deduplicated and sorted (IPv4 before IPv6), at most
    /// [`MAX_ADDRESSES`] of them. Never empty: no address is [`ResolveError::Empty`].
    pub addrs: Vec<IpAddr>,
    /// The smallest TTL among the records of the answer (the CNAMEs that led to them included): when to
    /// ask again at the latest. `None` for an IP literal, which needs no re-resolution.
    pub ttl: Option<Duration>,
}

/// Why a lookup gave no addresses. Every message names the host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The system's resolver configuration could not be read (no `/etc/resolv.conf`, or no nameserver
    /// in it).
    #[error("reading the system's DNS configuration (/etc/resolv.conf): {reason}")]
    SystemConfig {
        /// What went wrong, as hickory said it.
        reason: String,
    },
    /// A resolver for the configured nameservers (`[dns] servers`) could not be built.
    #[error("setting up DNS resolution with the configured nameservers: {reason}")]
    Setup {
        /// What went wrong, as hickory said it.
        reason: String,
    },
    /// `host` is neither an IP address nor a valid DNS name.
    #[error("{host}: not a DNS name or IP address: {reason}")]
    InvalidName {
        /// The name as given.
        host: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The name has no A or AAAA records (NXDOMAIN, or the name exists with no address records).
    #[error("{host}: no A or AAAA records")]
    Empty {
        /// The name as given.
        host: String,
    },
    /// No answer in time: the nameservers did not answer, or not before [`LOOKUP_TIMEOUT`].
    #[error("{host}: DNS lookup timed out")]
    Timeout {
        /// The name as given.
        host: String,
    },
    /// Any other failure: SERVFAIL, REFUSED, an I/O error, an answer that could not be parsed.
    #[error("{host}: DNS lookup failed: {reason}")]
    Failed {
        /// The name as given.
        host: String,
        /// What failed, with the record type asked (`A` or `AAAA`).
        reason: String,
    },
}

impl ResolveError {
    /// Whether the name was answered with no addresses (as opposed to not answered at all).
    pub fn is_empty(&self) -> bool {
        matches!(self, ResolveError::Empty { .. })
    }
}

impl Resolver {
    /// The system's resolver: nameservers, search domains and options from /etc/resolv.conf.
    ///
    /// `/etc/hosts` is consulted first, as the C library's resolver does. The query timeout and tries of
    /// `/etc/resolv.conf` are used when lower than [`QUERY_TIMEOUT`] and [`QUERY_TRIES`].
    pub fn system() -> Result<Resolver, ResolveError> {
        let mut builder =
            TokioResolver::builder_tokio().map_err(|error| ResolveError::SystemConfig {
                reason: error.to_string(),
            })?;
        let options = builder.options_mut();
        // hickory's `attempts` counts the tries after the first one.
        let system_tries = options.attempts.saturating_add(1).max(1);
        let system_timeout = options.timeout;
        options.timeout = if system_timeout.is_zero() {
            QUERY_TIMEOUT
        } else {
            system_timeout.min(QUERY_TIMEOUT)
        };
        options.attempts = system_tries.min(QUERY_TRIES) - 1;
        options.cache_size = 0;
        let inner = builder
            .build()
            .map_err(|error| ResolveError::SystemConfig {
                reason: error.to_string(),
            })?;
        Ok(Resolver {
            inner: Arc::new(inner),
        })
    }

    /// Only these nameservers (ip:port, UDP then TCP for truncated answers), no search domains.
    ///
    /// Neither `/etc/resolv.conf` nor `/etc/hosts` is read. With more than one server, hickory asks two
    /// at a time and prefers the ones that answer fastest.
    pub fn with_servers(servers: &[SocketAddr]) -> Result<Resolver, ResolveError> {
        let name_servers = servers
            .iter()
            .map(|server| {
                let mut config = NameServerConfig::udp_and_tcp(server.ip());
                for connection in &mut config.connections {
                    connection.port = server.port();
                }
                config
            })
            .collect();
        let config = ResolverConfig::from_parts(None, Vec::new(), name_servers);
        let mut options = ResolverOpts::default();
        options.timeout = QUERY_TIMEOUT;
        options.attempts = QUERY_TRIES - 1;
        options.cache_size = 0;
        options.use_hosts_file = ResolveHosts::Never;
        let inner = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(options)
            .build()
            // Without TLS, DNSSEC or opportunistic encryption (none is enabled) building should not
            // fail; the servers come from the config, so a failure is reported, not a panic.
            .map_err(|error| ResolveError::Setup {
                reason: error.to_string(),
            })?;
        Ok(Resolver {
            inner: Arc::new(inner),
        })
    }

    /// Every A and AAAA address of `host` (both families asked), deduplicated and sorted, and the
    /// smallest TTL among the records (None when the host is an IP literal: it needs no re-resolution).
    ///
    /// `host` is a DNS name (a name without a trailing dot goes through the search domains of
    /// [`Resolver::system`]; `name.` does not) or an IP literal (`10.0.0.1`, `::1`, `[::1]`), which is
    /// returned at once, without a query.
    pub async fn lookup(&self, host: &str) -> Result<Lookup, ResolveError> {
        if let Some(ip) = ip_literal(host) {
            return Ok(Lookup {
                addrs: vec![ip],
                ttl: None,
            });
        }
        let name = parse_name(host)?;
        let queries = futures_util::future::join(
            self.inner.lookup(name.clone(), RecordType::A),
            self.inner.lookup(name, RecordType::AAAA),
        );
        let (a, aaaa) = tokio::time::timeout(LOOKUP_TIMEOUT, queries)
            .await
            .map_err(|_| ResolveError::Timeout {
                host: host.to_string(),
            })?;

        let mut addrs = BTreeSet::new();
        let mut ttl: Option<u32> = None;
        let mut capped = false;
        for (record_type, result) in [(RecordType::A, a), (RecordType::AAAA, aaaa)] {
            let lookup = match result {
                Ok(lookup) => lookup,
                Err(error) if error.is_no_records_found() => continue,
                Err(NetError::Timeout) => {
                    return Err(ResolveError::Timeout {
                        host: host.to_string(),
                    });
                }
                Err(error) => {
                    return Err(ResolveError::Failed {
                        host: host.to_string(),
                        reason: format!("{record_type} query: {error}"),
                    });
                }
            };
            for record in lookup.answers() {
                let ip = match &record.data {
                    RData::A(A(ip)) => IpAddr::V4(*ip),
                    RData::AAAA(AAAA(ip)) => IpAddr::V6(*ip),
                    RData::CNAME(_) => {
                        ttl = Some(ttl.map_or(record.ttl, |t| t.min(record.ttl)));
                        continue;
                    }
                    _ => continue,
                };
                if !usable(ip) {
                    continue;
                }
                ttl = Some(ttl.map_or(record.ttl, |t| t.min(record.ttl)));
                addrs.insert(ip);
                if addrs.len() > MAX_ADDRESSES {
                    addrs.pop_last();
                    capped = true;
                }
            }
        }
        if addrs.is_empty() {
            return Err(ResolveError::Empty {
                host: host.to_string(),
            });
        }
        if capped {
            tracing::warn!(
                host,
                kept = MAX_ADDRESSES,
                "DNS answer has more addresses than are kept; the lowest ones are used"
            );
        }
        Ok(Lookup {
            addrs: addrs.into_iter().collect(),
            ttl: ttl.map(|secs| Duration::from_secs(secs.into())),
        })
    }
}

/// `host` as an IP address, if it is one: `10.0.0.1`, `::1`, `[::1]`.
fn ip_literal(host: &str) -> Option<IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().ok()
}

fn parse_name(host: &str) -> Result<Name, ResolveError> {
    let invalid = |reason: String| ResolveError::InvalidName {
        host: host.to_string(),
        reason,
    };
    if host.is_empty() || host == "." {
        return Err(invalid("empty".into()));
    }
    if host.starts_with('[') {
        return Err(invalid("brackets hold an IPv6 address".into()));
    }
    Name::from_utf8(host).map_err(|error| invalid(error.to_string()))
}

/// Whether an answered address can be a backend: not unspecified (which reaches the local host), not
/// multicast, not the IPv4 broadcast address.
fn usable(ip: IpAddr) -> bool {
    !(ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_resolver_builds_where_the_system_has_one() {
        // hickory reads /etc/resolv.conf and needs at least one `nameserver` line in it. Where there is
        // none (a minimal container), building must fail with an error saying so, not panic.
        let conf = std::fs::read_to_string("/etc/resolv.conf").ok();
        let has_nameserver = conf.as_deref().is_some_and(|text| {
            text.lines()
                .any(|line| line.trim_start().starts_with("nameserver"))
        });
        match Resolver::system() {
            Ok(_) => assert!(
                has_nameserver,
                "built without a nameserver in /etc/resolv.conf"
            ),
            Err(error) => {
                assert!(
                    !has_nameserver,
                    "/etc/resolv.conf names a nameserver, yet: {error}"
                );
                assert!(matches!(error, ResolveError::SystemConfig { .. }));
                assert!(error.to_string().contains("/etc/resolv.conf"), "{error}");
            }
        }
    }

    #[test]
    fn ip_literals_are_recognised_with_and_without_brackets() {
        assert_eq!(ip_literal("10.0.0.1"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(ip_literal("::1"), Some("::1".parse().unwrap()));
        assert_eq!(ip_literal("[::1]"), Some("::1".parse().unwrap()));
        assert_eq!(ip_literal("[10.0.0.1"), None);
        assert_eq!(ip_literal("backend.example"), None);
        assert!(matches!(
            parse_name("[backend]"),
            Err(ResolveError::InvalidName { .. })
        ));
        assert!(matches!(
            parse_name(""),
            Err(ResolveError::InvalidName { .. })
        ));
    }

    #[test]
    fn addresses_that_cannot_be_backends_are_not_usable() {
        for bad in ["0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255"] {
            assert!(!usable(bad.parse().unwrap()), "{bad}");
        }
        for good in ["10.0.0.1", "127.0.0.1", "::1", "2001:db8::1"] {
            assert!(usable(good.parse().unwrap()), "{good}");
        }
    }
}
