//! The admin token file target: `AdminTokens::parse` (what `admin.token_file` holds: `name:token` lines,
//! `#` comments) on any text. Checked, besides "no panic":
//!
//! - a refusal is one of the parser's messages, with nothing of the text in it but a line number and a
//!   plain name (so never a token: the secret is not echoed into a log), and an accepted file has at
//!   least one token;
//! - an accepted file, read independently here (trimmed lines, comments and blank lines skipped, split at
//!   the first ':'), has only `name:token` lines with plain names and tokens of 16 visible ASCII
//!   characters or more, and names used once;
//! - every token of it is recognised under a name that holds that token; a token with one byte changed,
//!   or cut by one byte, is not recognised unless another line holds exactly that.

use std::collections::BTreeMap;

use wsgate::internals::AdminTokens;

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<(&str, &str)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(name, token)| (name.trim(), token.trim()))
        .collect();
    match AdminTokens::parse(&text) {
        Err(message) => assert!(is_known_refusal(&message), "an unexpected refusal: {message:?}"),
        Ok(tokens) => {
            let content = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .count();
            assert_eq!(content, lines.len(), "an accepted line without ':'");
            assert!(!lines.is_empty(), "an accepted file without a token");
            let mut by_token: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            let mut names = std::collections::BTreeSet::new();
            for (name, token) in &lines {
                assert!(names.insert(*name), "the name {name:?} accepted twice");
                assert!(!name.is_empty() && name.len() <= 64);
                assert!(token.len() >= 16 && token.bytes().all(|b| b.is_ascii_graphic()));
                by_token.entry(token).or_default().push(name);
            }
            for (token, holders) in &by_token {
                let found = tokens.check(token.as_bytes());
                assert!(
                    found.is_some_and(|n| holders.contains(&n)),
                    "a token of {holders:?} is recognised as {found:?}"
                );
                let mut changed = token.as_bytes().to_vec();
                changed[0] ^= 0x01;
                let cut = &token.as_bytes()[..token.len() - 1];
                for other in [changed.as_slice(), cut] {
                    let listed = by_token.keys().any(|t| t.as_bytes() == other);
                    assert_eq!(
                        tokens.check(other).is_some(),
                        listed,
                        "a token one byte away from {holders:?}'s is taken"
                    );
                }
            }
        }
    }
}

/// Whether `message` is one of `AdminTokens::parse`'s refusals: fixed text around a line number and, in
/// two of them, a plain name (letters, digits, '-', '_', '.', '@').
fn is_known_refusal(message: &str) -> bool {
    if message == "no `name:token` line" {
        return true;
    }
    let Some(rest) = message.strip_prefix("line ") else {
        return false;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return false;
    }
    let Some(rest) = rest[digits..].strip_prefix(": ") else {
        return false;
    };
    let plain = |name: &str| {
        !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
    };
    let named = |prefix: &str, suffix: &str| {
        rest.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(suffix))
            .is_some_and(plain)
    };
    rest == "expected `name:token`"
        || rest == "the name must be 1 to 64 letters, digits, '-', '_', '.' or '@'"
        || named(
            "the token of `",
            "` must be at least 16 visible ASCII characters, e.g. from `openssl rand -hex 32`",
        )
        || named("the name `", "` is used twice")
}
