//! Config checking as an operator meets it: every problem is reported as `file:line: key: message`, all of
//! them at once, by the library and by `wsgate check`.

use std::path::{Path, PathBuf};
use std::process::Command;

use wsgate::{Config, ConfigError};

/// A valid config; the tests below break one line of it at a time. Line numbers:
/// 1 `[[listener]]`, 3 `listen`, 5 `[[route]]`, 7 `pool`, 8 `websocket`, 10 `[pool.p]`, 11 `backends`.
const BASE: &str = r#"[[listener]]
name = "main"
listen = "127.0.0.1:0"

[[route]]
name = "r"
pool = "p"
websocket = { idle_timeout = "60s" }

[pool.p]
backends = [ { addr = "127.0.0.1:9000" } ]
"#;

/// Every error `text` gives (the test fails if it is accepted).
fn errors(text: &str) -> Vec<ConfigError> {
    match Config::from_toml(text, "gw.toml") {
        Ok(config) => panic!("accepted:\n{text}\n{config:?}"),
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an empty error list");
            errors.0
        }
    }
}

/// `text` gives exactly one error, at `line`, under `key`, whose message contains `message`; its
/// display form is `gw.toml:LINE: KEY: MESSAGE` (no key part when the key is empty).
fn assert_one_error(text: &str, line: usize, key: &str, message: &str) {
    let errors = errors(text);
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    let error = &errors[0];
    assert_eq!(error.file, "gw.toml");
    assert_eq!((error.line, error.key.as_str()), (line, key), "{error}");
    assert!(
        error.message.contains(message),
        "`{}` does not mention `{message}`",
        error.message
    );
    let shown = error.to_string();
    let prefix = if key.is_empty() {
        format!("gw.toml:{line}: ")
    } else {
        format!("gw.toml:{line}: {key}: ")
    };
    assert!(shown.starts_with(&prefix), "{shown:?} lacks {prefix:?}");
}

#[test]
fn the_base_config_is_valid() {
    let config = Config::from_toml(BASE, "gw.toml").expect("valid");
    assert_eq!(config.routes.len(), 1);
    assert_eq!(config.pools["p"].backends[0].addr, "127.0.0.1:9000");
}

#[test]
fn unknown_top_level_key_is_named_with_its_line() {
    let text = format!("workers = 2\ncolour = \"blue\"\n{BASE}");
    // The key names the table the unknown one sits in (none at the top); the message names the key.
    assert_one_error(&text, 2, "", "unknown field `colour`");
    // Appended after `[pool.p]`, the same line belongs to the pool.
    let text = format!("{BASE}\ncolour = \"blue\"\n");
    assert_one_error(&text, 13, "pool.p", "unknown field `colour`");
}

#[test]
fn an_unknown_runtime_model_is_named_with_its_line() {
    let text = format!("workers = 2\nruntime = \"threads\"\n{BASE}");
    assert_one_error(
        &text,
        2,
        "runtime",
        "unknown runtime `threads` (expected \"shared\" or \"per_worker\")",
    );
}

#[test]
fn unknown_key_inside_a_route_is_named_with_its_line() {
    let text = BASE.replace("name = \"r\"\n", "name = \"r\"\npaht_prefix = \"/ws\"\n");
    assert_one_error(&text, 7, "route[0]", "unknown field `paht_prefix`");
    // And inside an inline table.
    let text = BASE.replace("idle_timeout = \"60s\"", "idle_timeot = \"60s\"");
    assert_one_error(
        &text,
        8,
        "route[0].websocket",
        "unknown field `idle_timeot`",
    );
}

#[test]
fn route_naming_a_missing_pool() {
    let text = BASE.replace("pool = \"p\"", "pool = \"chat\"");
    assert_one_error(&text, 7, "route[0].pool", "no pool named `chat`");
}

#[test]
fn empty_pool() {
    let text = BASE.replace("[ { addr = \"127.0.0.1:9000\" } ]", "[]");
    assert_one_error(
        &text,
        11,
        "pool.p.backends",
        "a pool needs at least one backend",
    );
}

#[test]
fn bad_backend_addresses() {
    for bad in [
        "nohost",
        "127.0.0.1",
        "127.0.0.1:0",
        "127.0.0.1:99999",
        "a b:80",
        ":80",
    ] {
        let text = BASE.replace("127.0.0.1:9000", bad);
        assert_one_error(
            &text,
            11,
            "pool.p.backends[0].addr",
            &format!("`{}` is not a backend address", bad.trim()),
        );
    }
}

#[test]
fn bad_listen_addresses() {
    for bad in ["localhost:8080", "127.0.0.1", "0.0.0.0:http", "[::1]"] {
        let text = BASE.replace("127.0.0.1:0", bad);
        assert_one_error(
            &text,
            3,
            "listener[0].listen",
            &format!("`{bad}` is not an address"),
        );
    }
}

#[test]
fn zero_timeouts_are_refused() {
    let text = format!("[timeouts]\nconnect = \"0s\"\n\n{BASE}");
    assert_one_error(
        &text,
        2,
        "timeouts.connect",
        "a timeout of zero is not allowed",
    );
    let text = BASE.replace("idle_timeout = \"60s\"", "idle_timeout = \"0s\"");
    assert_one_error(
        &text,
        8,
        "route[0].websocket.idle_timeout",
        "a timeout of zero is not allowed",
    );
    let text = BASE.replace("idle_timeout = \"60s\"", "pong_timeout = \"0ms\"");
    assert_one_error(
        &text,
        8,
        "route[0].websocket.pong_timeout",
        "a timeout of zero is not allowed",
    );
}

#[test]
fn bad_duration_units() {
    let text = format!("[timeouts]\nhandshake = \"5 sec\"\n\n{BASE}");
    assert_one_error(&text, 2, "timeouts.handshake", "unknown unit `sec`");
    let text = BASE.replace("\"60s\"", "\"60\"");
    assert_one_error(&text, 8, "route[0].websocket.idle_timeout", "no unit");
    let text = BASE.replace("\"60s\"", "\"1.5m\"");
    assert_one_error(&text, 8, "route[0].websocket.idle_timeout", "1.5m");
}

#[test]
fn bad_sizes() {
    let text = BASE.replace(
        "idle_timeout = \"60s\"",
        "max_message_size = \"12 parsecs\"",
    );
    assert_one_error(
        &text,
        8,
        "route[0].websocket.max_message_size",
        "unknown unit `parsecs`",
    );
    let text = format!("[limits]\nmax_header_size = \"lots\"\n\n{BASE}");
    assert_one_error(&text, 2, "limits.max_header_size", "is not a size");
    let text = format!("[limits]\nmax_header_size = \"1B\"\n\n{BASE}");
    assert_one_error(
        &text,
        2,
        "limits.max_header_size",
        "must be between 1KiB and 16MiB",
    );
}

#[test]
fn toml_syntax_error_has_its_line() {
    let text = BASE.replace("name = \"r\"", "name = \"r");
    let errors = errors(&text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].line, 6, "{}", errors[0]);
    assert!(errors[0].to_string().starts_with("gw.toml:6: "));
}

#[test]
fn every_error_of_a_file_is_reported() {
    let text = r#"[timeouts]
connect = "0s"
drain = "forever"

[[listener]]
name = "main"
listen = "localhost:80"

[[route]]
name = "r"
pool = "missing"
websocket = { max_message_size = "12 parsecs" }

[[route]]
name = "s"
path_prefix = "ws"
pool = "p"

[pool.p]
backends = [ { addr = "nohost" } ]

[pool.q]
backends = []
"#;
    let errors = errors(text);
    let got: Vec<(usize, &str)> = errors.iter().map(|e| (e.line, e.key.as_str())).collect();
    let want = [
        (2, "timeouts.connect"),
        (3, "timeouts.drain"),
        (7, "listener[0].listen"),
        (11, "route[0].pool"),
        (12, "route[0].websocket.max_message_size"),
        (16, "route[1].path_prefix"),
        (20, "pool.p.backends[0].addr"),
        (23, "pool.q.backends"),
    ];
    for expected in want {
        assert!(
            got.contains(&expected),
            "{expected:?} not reported; got:\n{}",
            wsgate::ConfigErrors(errors.clone())
        );
    }
    assert_eq!(got.len(), want.len(), "unexpected extra errors: {got:?}");
    // The display lists them one per line.
    let shown = wsgate::ConfigErrors(errors).to_string();
    assert_eq!(shown.lines().count(), want.len());
    assert!(shown.lines().all(|l| l.starts_with("gw.toml:")), "{shown}");
}

/// A file in the temp folder, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("wsgate-{}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("write temp file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn errors_from_a_file_name_the_file() {
    let file = TempFile::new("named.toml", &BASE.replace("pool = \"p\"", "pool = \"x\""));
    let errors = Config::from_file(&file.0).expect_err("invalid").0;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].file, file.0.display().to_string());
    assert!(
        errors[0]
            .to_string()
            .starts_with(&format!("{}:7: route[0].pool: ", file.0.display()))
    );
    let good = TempFile::new("good.toml", BASE);
    let config = Config::from_file(&good.0).expect("valid");
    assert_eq!(config.source.as_deref(), Some(good.0.as_path()));
}

#[test]
fn missing_file_is_named() {
    let path = Path::new("no/such/dir/wsgate-missing.toml");
    let errors = Config::from_file(path).expect_err("missing file").0;
    assert_eq!(errors.len(), 1);
    let shown = errors[0].to_string();
    assert!(
        shown.starts_with("no/such/dir/wsgate-missing.toml:"),
        "{shown}"
    );
    assert!(shown.contains("cannot read"), "{shown}");
}

#[test]
fn shipped_example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/wsgate.toml");
    if !path.exists() {
        eprintln!("no config/wsgate.toml yet: nothing to check");
        return;
    }
    if let Err(errors) = Config::from_file(&path) {
        panic!("config/wsgate.toml does not pass its own checker:\n{errors}");
    }
}

fn wsgate_check(file: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["check", "--config"])
        .arg(file)
        .output()
        .expect("run wsgate check")
}

#[test]
fn check_command_exit_status_and_messages() {
    let good = TempFile::new("check-good.toml", BASE);
    let output = wsgate_check(&good.0);
    assert!(
        output.status.success(),
        "good config refused: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("ok"), "{stdout}");

    let bad_text = BASE
        .replace("pool = \"p\"", "pool = \"x\"")
        .replace("\"60s\"", "\"0s\"");
    let bad = TempFile::new("check-bad.toml", &bad_text);
    let output = wsgate_check(&bad.0);
    assert!(!output.status.success(), "bad config accepted");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let name = bad.0.display().to_string();
    for expected in [
        format!("{name}:7: route[0].pool: no pool named `x`"),
        format!("{name}:8: route[0].websocket.idle_timeout: a timeout of zero is not allowed"),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }

    let output = wsgate_check(Path::new("no/such/wsgate.toml"));
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no/such/wsgate.toml"));
}

// Known gaps: an error found while deserializing (unknown key, wrong type, missing field) stops the check
// before the checker walks the file, and carries no key. Fixing them belongs to `Config::parse` in
// src/config/mod.rs (e.g. deserialize leniently, record unknown keys with their paths, then check).

#[test]
#[ignore = "Config::parse stops at the first serde error (unknown key, wrong type): the other errors of the file are not reported"]
fn an_unknown_key_does_not_hide_the_other_errors() {
    let text = format!("colour = \"blue\"\n[timeouts]\nconnect = \"0s\"\n\n{BASE}");
    let errors = errors(&text);
    let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
    assert!(
        lines.contains(&1) && lines.contains(&3),
        "{}",
        wsgate::ConfigErrors(errors.clone())
    );
}

#[test]
fn a_value_of_the_wrong_type_names_its_key() {
    let text = BASE.replace(
        "{ addr = \"127.0.0.1:9000\" }",
        "{ addr = \"127.0.0.1:9000\", weight = \"2\" }",
    );
    assert_one_error(&text, 11, "pool.p.backends[0].weight", "expected");
}

#[test]
fn backend_tls_keys_are_checked() {
    let text = BASE.replace(
        "{ addr = \"127.0.0.1:9000\" }",
        "{ addr = \"127.0.0.1:9000\", tls = { server_name = \"\" } }",
    );
    assert_one_error(
        &text,
        11,
        "pool.p.backends[0].tls.server_name",
        "must not be empty",
    );
    let text = BASE.replace(
        "[pool.p]\n",
        "[pool.p]\ntls = { ca = \"ca.pem\", verfy = true }\n",
    );
    assert_one_error(&text, 11, "pool.p.tls", "unknown field `verfy`");
    let text = BASE.replace(
        "[pool.p]\n",
        "[pool.p]\ntls = { verify = false, ca = \"ca.pem\" }\n",
    );
    assert_one_error(&text, 11, "pool.p.tls.ca", "only used with verify = true");
}

#[test]
fn backend_tls_files_are_checked_with_file_line_and_key() {
    // Relative to the config file's folder, like listener certificates.
    let text = BASE.replace(
        "[pool.p]\n",
        "[pool.p]\ntls = { ca = \"no-such-dir/ca.pem\" }\n",
    );
    let file = TempFile::new("backend-tls.toml", &text);
    let folder = file.0.parent().expect("a folder");
    let expected = format!(
        "{}:11: pool.p.tls.ca: {}: cannot read",
        file.0.display(),
        folder.join("no-such-dir/ca.pem").display()
    );
    let config = Config::from_file(&file.0).expect("the file itself checks out");
    let errors = wsgate::check_backend_tls(&config);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].to_string().starts_with(&expected),
        "{}",
        errors[0]
    );

    let output = wsgate_check(&file.0);
    assert!(!output.status.success(), "a missing CA file accepted");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&expected),
        "missing {expected:?} in:\n{stderr}"
    );
}
