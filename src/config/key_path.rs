//! The key path (`pool.p.backends[0].weight`) at a byte offset of a TOML text.
//!
//! serde reports where in the text a value was wrong, not which key it belonged to; this walks the text up
//! to that offset, following table headers, arrays of tables, inline tables and arrays, so the error can
//! name the key the way `config/mod.rs` names it for every other problem.

enum Frame {
    Key(String),
    /// An inline table `{ ... }` is open.
    Inline,
    /// An array is open, at this element.
    Array(usize),
}

/// The key path at `offset`; empty when the offset is outside any key (e.g. in a header).
pub fn key_path_at(text: &str, offset: usize) -> String {
    let bytes = text.as_bytes();
    let end = offset.min(bytes.len());
    let mut frames: Vec<Frame> = Vec::new();
    // Arrays of tables seen so far, by name, for their index.
    let mut table_arrays: Vec<(String, usize)> = Vec::new();
    let mut base = 0;
    let mut i = 0;
    let mut line_start = true;
    // `base` is where the current table's own keys start; a stray closing bracket may pop below it.
    let nested = |frames: &[Frame], base: usize| {
        frames
            .get(base..)
            .is_some_and(|own| own.iter().any(|f| !matches!(f, Frame::Key(_))))
    };
    while i < end {
        let b = bytes[i];
        match b {
            b'\n' => {
                if !nested(&frames, base) {
                    frames.truncate(base);
                }
                line_start = true;
                i += 1;
            }
            b' ' | b'\t' | b'\r' => i += 1,
            b'#' => {
                while i < end && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'[' if line_start && !nested(&frames, base) => {
                let array = bytes.get(i + 1) == Some(&b'[');
                let start = i + if array { 2 } else { 1 };
                let Some(close) = text[start..].find(']') else {
                    break;
                };
                let name = text[start..start + close].trim().to_string();
                frames.clear();
                frames.extend(
                    name.split('.')
                        .map(|s| Frame::Key(s.trim().trim_matches('"').to_string())),
                );
                if array {
                    let count = match table_arrays.iter_mut().find(|(n, _)| *n == name) {
                        Some((_, count)) => {
                            *count += 1;
                            *count
                        }
                        None => {
                            table_arrays.push((name, 0));
                            0
                        }
                    };
                    frames.push(Frame::Array(count));
                }
                base = frames.len();
                i = start + close + if array { 2 } else { 1 };
                line_start = false;
            }
            b'"' | b'\'' => {
                // A string value, skipped whole (with escapes in basic strings).
                let quote = b;
                i += 1;
                while i < end && bytes[i] != quote {
                    i += if bytes[i] == b'\\' && quote == b'"' {
                        2
                    } else {
                        1
                    };
                }
                i += 1;
                line_start = false;
            }
            b'{' => {
                frames.push(Frame::Inline);
                i += 1;
            }
            b'[' => {
                frames.push(Frame::Array(0));
                i += 1;
            }
            b',' => {
                while let Some(Frame::Key(_)) = frames.last() {
                    frames.pop();
                }
                if let Some(Frame::Array(n)) = frames.last_mut() {
                    *n += 1;
                }
                i += 1;
            }
            b'}' | b']' => {
                while let Some(Frame::Key(_)) = frames.last() {
                    frames.pop();
                }
                frames.pop();
                // Text that closes more than it opened (invalid, but this runs on invalid text too) may
                // reach into the table header's frames.
                base = base.min(frames.len());
                // The inline table or array was the value of a key: that key is done.
                if frames.len() > base
                    && let Some(Frame::Key(_)) = frames.last()
                {
                    frames.pop();
                }
                i += 1;
            }
            _ if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' => {
                let start = i;
                while i < end
                    && (bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'_' | b'-' | b'.'))
                {
                    i += 1;
                }
                let word = &text[start..i];
                // A key is followed by `=`; anything else (a number, `true`) is a value.
                let rest = text[i..].trim_start_matches([' ', '\t']);
                if rest.starts_with('=') && i < end {
                    frames.extend(word.split('.').map(|s| Frame::Key(s.to_string())));
                    i += text[i..].len() - rest.len() + 1;
                }
                line_start = false;
            }
            _ => {
                i += 1;
                line_start = false;
            }
        }
    }
    render(&frames)
}

fn render(frames: &[Frame]) -> String {
    let mut out = String::new();
    for frame in frames {
        match frame {
            Frame::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Frame::Array(index) => out.push_str(&format!("[{index}]")),
            Frame::Inline => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str, needle: &str) -> String {
        let offset = text.find(needle).expect("needle in text");
        key_path_at(text, offset)
    }

    #[test]
    fn paths_through_headers_arrays_and_inline_tables() {
        let text = r#"workers = 1
[timeouts]
connect = "5s" # comment, with "quotes"
[[route]]
name = "a"
[[route]]
name = "b"
websocket = { idle_timeout = "1s", ping_interval = "X" }
[pool.p]
backends = [ { addr = "h:1" }, { addr = "h:2", weight = "W" } ]
"#;
        assert_eq!(at(text, "1\n"), "workers");
        assert_eq!(at(text, "\"5s\""), "timeouts.connect");
        assert_eq!(at(text, "\"b\""), "route[1].name");
        assert_eq!(at(text, "\"X\""), "route[1].websocket.ping_interval");
        assert_eq!(at(text, "\"W\""), "pool.p.backends[1].weight");
        assert_eq!(at(text, "\"h:1\""), "pool.p.backends[0].addr");
    }

    #[test]
    fn stray_closing_brackets_never_panic() {
        // Found by the `config` fuzz target: `]` and `}` closing more than was opened.
        for text in [
            "[{]].&",
            "[a]\n}}}]]\nx = 1",
            "]",
            "[[a]]\n]]]\n[b]\nc = {]",
        ] {
            for offset in 0..=text.len() {
                let _ = key_path_at(text, offset);
            }
        }
    }

    #[test]
    fn an_unknown_key_gets_its_table() {
        let text = "[[route]]\nname = \"a\"\npaht = \"/\"\n";
        assert_eq!(at(text, "paht"), "route[0]");
    }
}
