//! `wsgate::resolver` (DNS lookups for service discovery) against the test's own DNS server
//! (`dns_server`), through `Resolver::with_servers`: what a lookup returns (both families, deduplicated,
//! sorted, capped, the smallest TTL), that nothing is cached, and how each failure is reported and how
//! long it takes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use wsgate::resolver::{LOOKUP_TIMEOUT, MAX_ADDRESSES, QUERY_TIMEOUT, ResolveError, Resolver};

use crate::common::within;
use crate::dns_server::{Failure, TestDns};

fn ip(text: &str) -> IpAddr {
    text.parse().expect("an IP address")
}

async fn start() -> (TestDns, Resolver) {
    let dns = TestDns::start().await;
    let resolver = Resolver::with_servers(&[dns.addr()]).expect("a resolver for the test's server");
    (dns, resolver)
}

#[tokio::test]
async fn a_and_aaaa_records_are_returned_deduplicated_and_sorted_with_the_smallest_ttl() {
    let (dns, resolver) = start().await;
    dns.set(
        "svc.test",
        &[
            (ip("10.0.0.3"), 60),
            (ip("2001:db8::2"), 45),
            (ip("10.0.0.1"), 60),
            (ip("10.0.0.3"), 60),
            // The smallest TTL is on an AAAA record: both families count.
            (ip("2001:db8::1"), 7),
            (ip("10.0.0.2"), 30),
            (ip("2001:db8::2"), 45),
        ],
    );
    let lookup = within("lookup", resolver.lookup("svc.test"))
        .await
        .expect("svc.test resolves");
    assert_eq!(
        lookup.addrs,
        [
            ip("10.0.0.1"),
            ip("10.0.0.2"),
            ip("10.0.0.3"),
            ip("2001:db8::1"),
            ip("2001:db8::2"),
        ]
    );
    assert_eq!(lookup.ttl, Some(Duration::from_secs(7)));
    // One A and one AAAA query, nothing more.
    assert_eq!(dns.queries("svc.test"), 2);

    // The name in another case and with its trailing dot is the same name.
    let again = within("lookup", resolver.lookup("SVC.Test."))
        .await
        .expect("SVC.Test. resolves");
    assert_eq!(again.addrs, lookup.addrs);
}

#[tokio::test]
async fn a_name_with_addresses_of_one_family_only_resolves() {
    let (dns, resolver) = start().await;
    dns.set("v4.test", &[(ip("10.0.0.1"), 30)]);
    dns.set("v6.test", &[(ip("2001:db8::1"), 40)]);
    let v4 = within("lookup", resolver.lookup("v4.test")).await.unwrap();
    assert_eq!(v4.addrs, [ip("10.0.0.1")]);
    assert_eq!(v4.ttl, Some(Duration::from_secs(30)));
    let v6 = within("lookup", resolver.lookup("v6.test")).await.unwrap();
    assert_eq!(v6.addrs, [ip("2001:db8::1")]);
    assert_eq!(v6.ttl, Some(Duration::from_secs(40)));
}

#[tokio::test]
async fn a_changed_answer_is_seen_at_the_next_lookup() {
    let (dns, resolver) = start().await;
    // A long TTL: a resolver that cached the answer would return the old one.
    dns.set(
        "svc.test",
        &[(ip("10.0.0.1"), 3600), (ip("10.0.0.2"), 3600)],
    );
    let first = within("lookup", resolver.lookup("svc.test")).await.unwrap();
    assert_eq!(first.addrs, [ip("10.0.0.1"), ip("10.0.0.2")]);

    dns.set(
        "svc.test",
        &[(ip("10.0.0.2"), 3600), (ip("10.0.0.3"), 3600)],
    );
    let second = within("lookup", resolver.lookup("svc.test")).await.unwrap();
    assert_eq!(second.addrs, [ip("10.0.0.2"), ip("10.0.0.3")]);
    assert_eq!(dns.queries("svc.test"), 4, "each lookup asks the server");

    // Nor is a failure cached: the name gone, then back.
    dns.fail("svc.test", Failure::NxDomain);
    let gone = within("lookup", resolver.lookup("svc.test")).await;
    assert!(matches!(gone, Err(ResolveError::Empty { .. })), "{gone:?}");
    dns.set("svc.test", &[(ip("10.0.0.4"), 3600)]);
    let back = within("lookup", resolver.lookup("svc.test")).await.unwrap();
    assert_eq!(back.addrs, [ip("10.0.0.4")]);
}

#[tokio::test]
async fn nxdomain_and_no_address_records_are_empty() {
    let (dns, resolver) = start().await;
    // Not in the server's table: NXDOMAIN.
    let unknown = within("lookup", resolver.lookup("unknown.test")).await;
    match unknown {
        Err(ResolveError::Empty { host }) => assert_eq!(host, "unknown.test"),
        other => panic!("expected Empty, got {other:?}"),
    }
    dns.fail("gone.test", Failure::NxDomain);
    let gone = within("lookup", resolver.lookup("gone.test")).await;
    let error = gone.expect_err("gone.test has no records");
    assert!(error.is_empty(), "{error:?}");
    assert!(error.to_string().contains("gone.test"), "{error}");
    // The name exists, with no A or AAAA records (NODATA).
    dns.set("nodata.test", &[]);
    let nodata = within("lookup", resolver.lookup("nodata.test")).await;
    assert!(
        matches!(nodata, Err(ResolveError::Empty { .. })),
        "{nodata:?}"
    );
    // Only addresses that cannot be backends: dropped, so nothing is left.
    dns.set("zero.test", &[(ip("0.0.0.0"), 30), (ip("::"), 30)]);
    let zero = within("lookup", resolver.lookup("zero.test")).await;
    assert!(matches!(zero, Err(ResolveError::Empty { .. })), "{zero:?}");
}

#[tokio::test]
async fn addresses_that_cannot_be_backends_are_dropped() {
    let (dns, resolver) = start().await;
    dns.set(
        "mixed.test",
        &[
            (ip("0.0.0.0"), 30),
            (ip("10.0.0.1"), 30),
            (ip("224.0.0.1"), 30),
            (ip("255.255.255.255"), 30),
            (ip("::"), 30),
            (ip("ff02::1"), 30),
        ],
    );
    let lookup = within("lookup", resolver.lookup("mixed.test"))
        .await
        .unwrap();
    assert_eq!(lookup.addrs, [ip("10.0.0.1")]);
}

#[tokio::test]
async fn servfail_and_refused_are_failures_not_empty_answers() {
    let (dns, resolver) = start().await;
    for (name, how) in [
        ("servfail.test", Failure::ServFail),
        ("refused.test", Failure::Refused),
    ] {
        dns.fail(name, how);
        let started = Instant::now();
        let result = within("lookup", resolver.lookup(name)).await;
        match &result {
            Err(error @ ResolveError::Failed { host, .. }) => {
                assert_eq!(host, name);
                assert!(!error.is_empty());
                assert!(error.to_string().contains(name), "{error}");
            }
            other => panic!("{how:?}: expected Failed, got {other:?}"),
        }
        // An answer, even a failing one, ends the lookup without waiting for a query's timeout.
        assert!(
            started.elapsed() < QUERY_TIMEOUT,
            "{how:?} took {:?}",
            started.elapsed()
        );
        // Tried again, but a bounded number of times: A and AAAA, at most twice each.
        let queries = dns.queries(name);
        assert!((2..=4).contains(&queries), "{how:?}: {queries} queries");
    }
}

#[tokio::test]
async fn a_silent_server_gives_a_timeout_in_bounded_time() {
    let (dns, resolver) = start().await;
    dns.fail("silent.test", Failure::Silent);
    let started = Instant::now();
    let result = tokio::time::timeout(
        LOOKUP_TIMEOUT + Duration::from_secs(2),
        resolver.lookup("silent.test"),
    )
    .await
    .expect("the lookup ends by itself, within LOOKUP_TIMEOUT");
    let elapsed = started.elapsed();
    match &result {
        Err(error @ ResolveError::Timeout { host }) => {
            assert_eq!(host, "silent.test");
            assert!(!error.is_empty());
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(
        elapsed <= LOOKUP_TIMEOUT + Duration::from_millis(500),
        "took {elapsed:?}"
    );
    assert!(dns.queries("silent.test") >= 2, "both families were asked");
}

#[tokio::test]
async fn ip_literals_need_no_query() {
    let (dns, resolver) = start().await;
    for (literal, expected) in [
        ("10.0.0.1", ip("10.0.0.1")),
        ("::1", ip("::1")),
        ("[::1]", ip("::1")),
        ("[2001:db8::7]", ip("2001:db8::7")),
    ] {
        let lookup = within("lookup", resolver.lookup(literal))
            .await
            .unwrap_or_else(|e| panic!("{literal}: {e}"));
        assert_eq!(lookup.addrs, [expected], "{literal}");
        assert_eq!(
            lookup.ttl, None,
            "{literal}: an IP literal is not re-resolved"
        );
        assert_eq!(dns.queries(literal), 0, "{literal}");
    }
    // A resolver whose only nameserver is silent still answers IP literals at once.
    dns.fail("anything.test", Failure::Silent);
    let started = Instant::now();
    let lookup = within("lookup", resolver.lookup("192.0.2.1"))
        .await
        .unwrap();
    assert_eq!(lookup.addrs, [ip("192.0.2.1")]);
    assert!(started.elapsed() < QUERY_TIMEOUT);
    assert_eq!(dns.queries("192.0.2.1"), 0);
}

#[tokio::test]
async fn an_answer_with_more_addresses_than_the_cap_is_capped_to_the_lowest() {
    let (dns, resolver) = start().await;
    // More than MAX_ADDRESSES in all, in both families, in an order that is not sorted: the answer is
    // too large for UDP, so this also goes through the truncated answer and the retry over TCP.
    let v4 =
        (0..700u32).map(|i| IpAddr::from(Ipv4Addr::from(u32::from_be_bytes([10, 1, 0, 0]) + i)));
    let v6 = (0..700u128).map(|i| IpAddr::from(Ipv6Addr::from((0x2001_0db8_u128 << 96) | i)));
    let mut records: Vec<(IpAddr, u32)> = v4.chain(v6).map(|ip| (ip, 120)).collect();
    records.reverse();
    records.swap(0, 900);
    records[1000].1 = 9;
    let mut expected: Vec<IpAddr> = records.iter().map(|(ip, _)| *ip).collect();
    expected.sort();
    expected.truncate(MAX_ADDRESSES);
    assert!(records.len() > MAX_ADDRESSES);
    dns.set("big.test", &records);

    let lookup = within("lookup", resolver.lookup("big.test")).await.unwrap();
    assert_eq!(lookup.addrs.len(), MAX_ADDRESSES);
    assert_eq!(lookup.addrs, expected);
    assert_eq!(lookup.ttl, Some(Duration::from_secs(9)));
    // Each query was asked over UDP, answered truncated, and asked again over TCP.
    assert_eq!(dns.queries("big.test"), 4);
}

#[tokio::test]
async fn invalid_names_are_refused_without_a_query() {
    let (_dns, resolver) = start().await;
    for bad in ["", "[backend]", "a..b"] {
        let result = within("lookup", resolver.lookup(bad)).await;
        assert!(
            matches!(result, Err(ResolveError::InvalidName { .. })),
            "{bad:?}: {result:?}"
        );
    }
}
