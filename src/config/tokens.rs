//! The admin API's bearer tokens (`admin.token_file`): one `name:token` per line, `#` comments and
//! blank lines ignored. The name says who made a change in the log; the token is the secret. Loaded at
//! start and on every reload (a file that cannot be used fails them, reported at the config's
//! `admin.token_file` line), compared in constant time, and never printed.

use std::fmt;

use super::model::{ConfigError, TokenFile};

/// The shortest token taken: a guessable secret would make the write endpoints anyone's.
pub const MIN_TOKEN_LEN: usize = 16;
/// The largest token file read: it holds a few lines.
const MAX_FILE_SIZE: u64 = 64 << 10;

/// The tokens of one config generation.
pub struct AdminTokens(Vec<(String, [u8; 20])>);

/// A token as it is kept and compared: its SHA-1 (a fixed length to compare; the tokens themselves are
/// random, so no weakness of SHA-1 matters here).
fn digest(token: &[u8]) -> [u8; 20] {
    use sha1::Digest;
    sha1::Sha1::digest(token).into()
}

impl fmt::Debug for AdminTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.0.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("AdminTokens")
            .field("names", &names)
            .finish()
    }
}

impl AdminTokens {
    pub fn load(file: &TokenFile) -> Result<AdminTokens, ConfigError> {
        use std::io::Read;
        let path = file.path.display();
        let cannot = |e: std::io::Error| file.error(format!("cannot read `{path}`: {e}"));
        let opened = std::fs::File::open(&file.path).map_err(cannot)?;
        // Only a regular file: a FIFO or a device would block the reload, or never end.
        if !opened.metadata().map_err(cannot)?.is_file() {
            return Err(file.error(format!("`{path}` is not a regular file")));
        }
        let mut text = String::new();
        opened
            .take(MAX_FILE_SIZE + 1)
            .read_to_string(&mut text)
            .map_err(cannot)?;
        if text.len() as u64 > MAX_FILE_SIZE {
            return Err(file.error(format!(
                "`{path}` is over {MAX_FILE_SIZE} bytes: a token file holds a few `name:token` lines"
            )));
        }
        AdminTokens::parse(&text).map_err(|e| file.error(format!("`{path}`: {e}")))
    }

    /// Parses the file's text; the error names the line (never the token).
    pub fn parse(text: &str) -> Result<AdminTokens, String> {
        let mut tokens: Vec<(String, [u8; 20])> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let n = i + 1;
            let Some((name, token)) = line.split_once(':') else {
                return Err(format!("line {n}: expected `name:token`"));
            };
            let (name, token) = (name.trim(), token.trim());
            let plain_name = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
            if !plain_name {
                return Err(format!(
                    "line {n}: the name must be 1 to 64 letters, digits, '-', '_', '.' or '@'"
                ));
            }
            if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "line {n}: the token of `{name}` must be at least {MIN_TOKEN_LEN} visible ASCII \
                     characters, e.g. from `openssl rand -hex 32`"
                ));
            }
            if tokens.iter().any(|(other, _)| other == name) {
                return Err(format!("line {n}: the name `{name}` is used twice"));
            }
            tokens.push((name.to_string(), digest(token.as_bytes())));
        }
        if tokens.is_empty() {
            return Err("no `name:token` line".to_string());
        }
        Ok(AdminTokens(tokens))
    }

    /// The name of the token `presented` is, if any. Digests of fixed length are compared, every one
    /// and each in constant time, so the time taken says nothing about which token came close, nor
    /// about their lengths.
    pub fn check(&self, presented: &[u8]) -> Option<&str> {
        let presented = digest(presented);
        let mut found = None;
        for (name, token) in &self.0 {
            if constant_time_eq::constant_time_eq_n(token, &presented) {
                found = Some(name.as_str());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_tokens_are_read_and_checked() {
        let tokens = AdminTokens::parse(
            "# deploy tooling\ndeploy:0123456789abcdef0123\n\n ops : zzzzzzzzzzzzzzzzz \n",
        )
        .expect("valid");
        assert_eq!(tokens.check(b"0123456789abcdef0123"), Some("deploy"));
        assert_eq!(tokens.check(b"zzzzzzzzzzzzzzzzz"), Some("ops"));
        assert_eq!(tokens.check(b"0123456789abcdef012"), None);
        assert_eq!(tokens.check(b""), None);
        let debug = format!("{tokens:?}");
        assert!(debug.contains("deploy") && !debug.contains("0123456789"));
    }

    #[test]
    fn bad_files_are_refused_without_showing_the_secret() {
        for (text, expected) in [
            ("", "no `name:token`"),
            ("deploy\n", "line 1: expected"),
            ("x:short\n", "at least 16"),
            (":0123456789abcdef\n", "the name"),
            ("a b:0123456789abcdef\n", "the name"),
            (
                "a:0123456789abcdef\na:0123456789abcdeg\n",
                "line 2: the name `a` is used twice",
            ),
            ("a:0123456789 abcdef\n", "visible ASCII"),
        ] {
            let error = AdminTokens::parse(text).expect_err(text);
            assert!(error.contains(expected), "{text:?}: {error}");
            assert!(!error.contains("0123456789"), "{error}");
        }
    }
}
