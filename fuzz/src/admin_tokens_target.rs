//! The admin token file target: `AdminTokens::parse` (what `admin.token_file` holds: `name:token` lines,
//! `#` comments) on any text. Checked, besides "no panic":
//!
//! - a refusal says something, names no token of 16 characters or more from the text (the secret is
//!   never echoed into a log), and an accepted file has at least one token;
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
        Err(message) => {
            assert!(!message.trim().is_empty(), "a refusal without a message");
            for (name, token) in &lines {
                if token.len() >= 16 && !name.contains(token) {
                    assert!(!message.contains(token), "the refusal shows a token: {message}");
                }
            }
        }
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
