//! The origin target: `allowed_origins` patterns parsed the way the config parses them, and a request's
//! `Origin` fields checked against them the way an upgrade is (`wsgate::internals::OriginList::check`).
//!
//! Input layout:
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | bit 0: `allow_missing`; bits 1–2: how many `Origin` fields the request carries (0 → 1, 1 → none, 2 → 1, 3 → 2) |
//! | the rest | split at `\n`: every piece but the last is a pattern's text (bytes that are not UTF-8 replaced; at most `MAX_PATTERNS`), the last is the `Origin` value |
//!
//! Besides "no panic", every invariant is checked against what an origin is (RFC 6454) rather than against
//! the module's code; `reference_allows` is an independent, string-based matcher.

use std::net::Ipv6Addr;

use http::HeaderValue;
use wsgate::internals::{OriginList, OriginPattern, OriginRefusal};

pub const MAX_PATTERNS: usize = 8;

/// The target. Invariants:
/// 1. parsing a pattern and checking a request never panic; a refused pattern has a message;
/// 2. a pattern's `Display` is canonical (lower-case, `scheme://host[:port]`, nothing after) and parses
///    back to an equal pattern; ASCII case changes of a pattern's text change neither the pattern nor
///    the error;
/// 3. ASCII case changes of the `Origin` value, and whitespace around it, never change the outcome;
/// 4. for an `http`/`https` origin without a port, appending the default port (and, for a name, one
///    trailing dot) never changes the outcome;
/// 5. an allowed value is an origin: not `null`, no `/`, `@`, `?`, `#`, space or `*` after the `://`;
///    no field is `Missing` (or allowed, with `allow_missing`), two fields are `Repeated`; a value is
///    well-formed (allowed or not allowed) exactly when it parses as a pattern without a wildcard, and
///    then it is allowed exactly when the independent reference matcher says a pattern matches it;
/// 6. a non-wildcard pattern's own `Display`, as the value, is allowed by a list holding that pattern
///    (in any case);
/// 7. a wildcard pattern `*.X` allows `scheme://a.X` and never `scheme://X` itself nor `scheme://aX`.
pub fn run(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let allow_missing = flags & 1 == 1;
    let fields = [1, 0, 1, 2][usize::from((flags >> 1) & 3)];
    let mut pieces: Vec<&[u8]> = rest.split(|&b| b == b'\n').collect();
    let value = pieces.pop().unwrap_or_default();
    let mut patterns = Vec::new();
    for text in pieces.into_iter().take(MAX_PATTERNS) {
        if let Some(pattern) = check_pattern(&String::from_utf8_lossy(text)) {
            patterns.push(pattern);
        }
    }
    let list = OriginList::new(patterns.clone(), allow_missing);
    for pattern in &patterns {
        check_own_display(pattern);
    }

    // No field, two fields: the value does not matter.
    let none: [&HeaderValue; 0] = [];
    assert_eq!(
        list.check(none),
        if allow_missing {
            Ok(())
        } else {
            Err(OriginRefusal::Missing)
        }
    );
    let Ok(header) = HeaderValue::from_bytes(value) else {
        return;
    };
    assert_eq!(list.check([&header, &header]), Err(OriginRefusal::Repeated));
    let outcome = list.check([&header]);
    if fields != 1 {
        let shown: Vec<&HeaderValue> = std::iter::repeat_n(&header, fields).collect();
        let expected = match fields {
            0 => list.check(none),
            _ => Err(OriginRefusal::Repeated),
        };
        assert_eq!(list.check(shown), expected);
    }
    // `allow_missing` is about requests without the field, nothing else.
    let other = OriginList::new(patterns.clone(), !allow_missing);
    assert_eq!(
        other.check([&header]),
        outcome,
        "allow_missing changed the outcome"
    );

    check_value(&list, value, outcome);
}

/// Invariants 1 and 2 on one pattern's text; the pattern, if it parses.
fn check_pattern(text: &str) -> Option<OriginPattern> {
    let parsed = OriginPattern::parse(text);
    // Case: `HTTPS://A.COM` is `https://a.com`, and a refusal does not depend on it either.
    assert_eq!(
        OriginPattern::parse(&text.to_ascii_uppercase()),
        parsed,
        "{text:?} uppercased"
    );
    assert_eq!(
        OriginPattern::parse(&text.to_ascii_lowercase()),
        parsed,
        "{text:?} lowercased"
    );
    let pattern = match parsed {
        Ok(pattern) => pattern,
        Err(error) => {
            assert!(
                !error.to_string().trim().is_empty(),
                "{error:?}: no message"
            );
            return None;
        }
    };
    let shown = pattern.to_string();
    assert_eq!(
        OriginPattern::parse(&shown).as_ref(),
        Ok(&pattern),
        "{text:?} shows as {shown:?}, which does not parse back"
    );
    assert_eq!(shown.parse::<OriginPattern>().as_ref(), Ok(&pattern));
    assert!(
        shown
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()),
        "{shown:?} is not canonical"
    );
    assert!(shown.starts_with(&format!("{}://", pattern.scheme())));
    let authority = &shown[pattern.scheme().len() + 3..];
    assert!(
        !authority.contains(['/', '?', '#', '@']),
        "{shown:?}: more than an origin"
    );
    assert_eq!(authority.starts_with("*."), pattern.is_wildcard());
    assert!(!authority.ends_with('.'), "{shown:?}: a trailing dot");
    assert!(
        !matches!(
            (pattern.scheme(), pattern.port()),
            ("http" | "ws", Some(80)) | ("https" | "wss", Some(443))
        ),
        "{shown:?}: a default port kept"
    );
    if let Some(port) = pattern.port() {
        assert!(shown.ends_with(&format!(":{port}")));
    }
    Some(pattern)
}

/// Invariants 6 and 7: what a pattern must allow and refuse, on its own.
fn check_own_display(pattern: &OriginPattern) {
    let alone = OriginList::new(vec![pattern.clone()], false);
    let check = |value: &str| HeaderValue::from_str(value).map(|v| alone.check([&v]));
    let shown = pattern.to_string();
    if !pattern.is_wildcard() {
        assert_eq!(check(&shown).ok(), Some(Ok(())), "{shown} refuses itself");
        assert_eq!(
            check(&shown.to_ascii_uppercase()).ok(),
            Some(Ok(())),
            "{shown} refuses itself uppercased"
        );
        return;
    }
    let apex = shown.replacen("*.", "", 1);
    let outcome = check(&apex).expect("a valid header value");
    assert_ne!(outcome, Ok(()), "{shown} allows {apex}");
    // `badexample.com` for `*.example.com`.
    let glued = shown.replacen("*.", "a", 1);
    let outcome = check(&glued).expect("a valid header value");
    assert_ne!(outcome, Ok(()), "{shown} allows {glued}");
    // One label in front: allowed, unless the name gets longer than DNS allows.
    let sub = shown.replacen("*.", "a.", 1);
    let outcome = check(&sub).expect("a valid header value");
    let name_len = host_of(&sub).len();
    if name_len <= 253 {
        assert_eq!(outcome, Ok(()), "{shown} refuses {sub}");
    } else {
        assert_eq!(outcome, Err(OriginRefusal::Malformed), "{sub}");
    }
}

/// The host of a canonical origin, without the port (an IPv6 address with its brackets).
fn host_of(origin: &str) -> &str {
    let rest = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    if rest.starts_with('[') {
        return rest.split_inclusive(']').next().unwrap_or(rest);
    }
    rest.split(':').next().unwrap_or(rest)
}

/// Invariants 3, 4 and 5 on the one-field outcome of `value`.
fn check_value(list: &OriginList, value: &[u8], outcome: Result<(), OriginRefusal>) {
    let one = |bytes: &[u8]| HeaderValue::from_bytes(bytes).map(|v| list.check([&v]));
    // 3: case and surrounding whitespace.
    let mut toggled = value.to_vec();
    for (i, b) in toggled.iter_mut().enumerate() {
        if i % 2 == 0 {
            b.make_ascii_uppercase();
        } else {
            b.make_ascii_lowercase();
        }
    }
    for variant in [
        value.to_ascii_uppercase(),
        value.to_ascii_lowercase(),
        toggled,
        [&b" \t"[..], value, b"  "].concat(),
    ] {
        assert_eq!(
            one(&variant).ok(),
            Some(outcome),
            "{:?} and {:?} differ",
            String::from_utf8_lossy(value),
            String::from_utf8_lossy(&variant)
        );
    }
    let trimmed = value.trim_ascii();
    let well_formed = matches!(outcome, Ok(()) | Err(OriginRefusal::NotAllowed));
    if trimmed.eq_ignore_ascii_case(b"null") {
        assert_eq!(outcome, Err(OriginRefusal::Opaque));
        return;
    }
    assert!(
        matches!(
            outcome,
            Ok(()) | Err(OriginRefusal::NotAllowed | OriginRefusal::Malformed)
        ),
        "one field: {outcome:?}"
    );

    // 5: well-formed exactly when the value parses as a pattern without a wildcard; the same origin then.
    let as_pattern = std::str::from_utf8(trimmed)
        .ok()
        .and_then(|t| OriginPattern::parse(t).ok())
        .filter(|p| !p.is_wildcard());
    assert_eq!(
        well_formed,
        as_pattern.is_some(),
        "{:?}: {outcome:?}, as a pattern {as_pattern:?}",
        String::from_utf8_lossy(value)
    );
    let Some(as_pattern) = as_pattern else {
        return;
    };
    // Only ASCII here (it parsed as a pattern).
    let text = std::str::from_utf8(trimmed).expect("parsed as a pattern");
    let after = &text[text.find("://").expect("an origin") + 3..];
    if outcome.is_ok() {
        assert!(!list.patterns().is_empty());
        assert!(
            !after.contains(['/', '@', '?', '#', ' ', '\t', '*']),
            "allowed: {text:?}"
        );
    }
    let reference = list
        .patterns()
        .iter()
        .any(|p| reference_allows(&p.to_string(), text));
    assert_eq!(
        outcome.is_ok(),
        reference,
        "{text:?}: {outcome:?}, the reference says {reference} for {:?}",
        list.patterns()
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
    );
    // An exact pattern matches exactly its own origin.
    let exact = list
        .patterns()
        .iter()
        .any(|p| !p.is_wildcard() && *p == as_pattern);
    assert!(!exact || outcome.is_ok(), "{text:?} is listed but refused");

    // 4: the default port written out, a trailing dot on a name.
    let lower = text.to_ascii_lowercase();
    let default = if lower.starts_with("https://") {
        ":443"
    } else if lower.starts_with("http://") {
        ":80"
    } else {
        return;
    };
    let has_port = if after.starts_with('[') {
        !after.ends_with(']')
    } else {
        after.contains(':')
    };
    if has_port {
        return;
    }
    let with_port = format!("{text}{default}");
    assert_eq!(
        one(with_port.as_bytes()).ok(),
        Some(outcome),
        "{text:?} and {with_port:?} differ"
    );
    if !after.starts_with('[') && !after.ends_with('.') {
        for dotted in [format!("{text}."), format!("{text}.{default}")] {
            assert_eq!(
                one(dotted.as_bytes()).ok(),
                Some(outcome),
                "{text:?} and {dotted:?} differ"
            );
        }
    }
}

/// Scheme, host and port of an origin or a canonical pattern, lower-cased, the trailing dot and a default
/// port dropped.
fn reference_parts(text: &str) -> (String, String, Option<u16>) {
    let text = text.trim_matches([' ', '\t']).to_ascii_lowercase();
    let (scheme, rest) = text.split_once("://").expect("an origin");
    let (host, port) = match rest.strip_prefix('[') {
        Some(v6) => {
            let (address, after) = v6.split_once(']').expect("a bracketed address");
            (format!("[{address}]"), after.strip_prefix(':'))
        }
        None => match rest.split_once(':') {
            Some((host, port)) => (host.to_string(), Some(port)),
            None => (rest.to_string(), None),
        },
    };
    let host = host.strip_suffix('.').unwrap_or(&host).to_string();
    let port = port.map(|p| p.parse::<u16>().expect("a port"));
    let default = match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    };
    (
        scheme.to_string(),
        host,
        port.filter(|&p| Some(p) != default),
    )
}

/// Whether the canonical pattern `pattern` matches `origin` (which parsed as an origin): by strings.
fn reference_allows(pattern: &str, origin: &str) -> bool {
    let (p_scheme, p_host, p_port) = reference_parts(pattern);
    let (o_scheme, o_host, o_port) = reference_parts(origin);
    if p_scheme != o_scheme || p_port != o_port {
        return false;
    }
    if let Some(suffix) = p_host.strip_prefix('*') {
        // ".example.com": a longer host ending in it.
        return o_host.len() > suffix.len() && o_host.ends_with(suffix);
    }
    let v6 = |h: &str| {
        h.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .and_then(|h| h.parse::<Ipv6Addr>().ok())
    };
    match (v6(&p_host), v6(&o_host)) {
        (Some(a), Some(b)) => a == b,
        _ => p_host == o_host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_matches_like_origins() {
        assert!(reference_allows("https://a.com", "HTTPS://A.COM.:443"));
        assert!(reference_allows("https://*.a.com", "https://b.a.com"));
        assert!(!reference_allows("https://*.a.com", "https://a.com"));
        assert!(!reference_allows("https://*.a.com", "https://ba.com"));
        assert!(reference_allows("http://[::1]:80", "http://[0::1]"));
        assert!(!reference_allows("http://a.com", "https://a.com"));
        assert!(!reference_allows("foo://a.com", "foo://a.com:80"));
    }
}
