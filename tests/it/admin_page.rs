//! The operator's page (`GET /` on the admin listener, `src/admin/page.html`) in a real browser: Debian's
//! Chromium, headless, loads it, lets it poll `/status`, and dumps the DOM (`--dump-dom` after a
//! `--virtual-time-budget`: the page's timers and fetches run, then the document is printed). Every value
//! the page shows straight from `/status` sits in an element whose `data-field` names its path there
//! (the page's header comment has the rules); the test reads those elements out of the dumped HTML and
//! compares each with the value at its path in a `/status` read just before and just after the browser
//! ran (the two must be equal: the test keeps the gateway quiet), and checks that every value the page
//! must show is there.
//!
//! Two tests: one against a fixture `/status` written by the contract (every state, discovery, drain
//! causes, text that would be markup if the page parsed it), served by a test backend; one against a
//! real gateway with an admin listener, a token file, live tunnels and a backend drained through the API.
//!
//! Needs `chromium`, skipped without it as `browser.rs`'s test is (unless `WSGATE_BROWSER_TESTS=1`).

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Empty;
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::browser::chromium_or_skip;
use crate::common::*;

/// How long the browser gets to start, run the page and print its DOM: a cold start on a busy machine
/// takes seconds.
const BROWSER_WAIT: Duration = Duration::from_secs(60);

/// The page's virtual time before its DOM is printed: two or three polls (one every 2 s).
const VIRTUAL_TIME_MS: u32 = 5000;

/// The page, as the admin listener must serve it.
const PAGE: &str = include_str!("../../src/admin/page.html");

/// The token file's one token.
const TOKEN_NAME: &str = "ops";

#[tokio::test]
async fn the_operators_page_shows_what_status_says() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let (a, b, c, d) = (
        TestBackend::start("a").await,
        TestBackend::start("b").await,
        TestBackend::start("c").await,
        TestBackend::start("d").await,
    );
    let tokens = TokenFile::new();
    // No pings (`ping_interval = "0s"`) and no drain spread: nothing changes by itself while the browser
    // runs. Backend c is drained by the config, a by the API below.
    let text = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
allow = ["127.0.0.1/32"]
token_file = "{tokens}"

[[listener]]
name = "main"
listen = "127.0.0.1:0"

[[route]]
name = "chat"
path_prefix = "/chat"
pool = "chat"
websocket = {{ ping_interval = "0s" }}

[[route]]
name = "rest"
path_prefix = "/"
pool = "rest"
websocket = {{ ping_interval = "0s" }}

[pool.chat]
policy = "least_conn"
drain_spread = "none"
backends = [ {{ addr = "{a}" }}, {{ addr = "{b}" }}, {{ addr = "{c}", drain = true }} ]

[pool.rest]
backends = [ {{ addr = "{d}", weight = 3 }} ]
"#,
        tokens = tokens.path.display(),
        a = a.addr,
        b = b.addr,
        c = c.addr,
        d = d.addr,
    );
    let (gateway, addr) = gateway(&text).await;
    let admin = gateway.admin_addr().expect("admin listener");

    // Tunnels: four on `chat` (spread over a and b), one on `rest`; each carries an echo, so it is up
    // end to end. The last `chat` one is closed by its client.
    let mut clients = Vec::new();
    for path in ["/chat/1", "/chat/2", "/chat/3", "/chat/4", "/rest/1"] {
        let mut client = ws_connect(addr, path).await;
        within("send", client.send(Message::text(path)))
            .await
            .expect("send");
        assert_eq!(next_message(&mut client).await, Message::text(path));
        clients.push(client);
    }
    let mut closing = clients.remove(3);
    within("close", closing.close(None)).await.expect("close");
    within("the close's answer", async {
        while let Some(Ok(_)) = closing.next().await {}
    })
    .await;
    within("the close counted", async {
        loop {
            let status = get_status(admin).await;
            if status["routes"][0]["closes"]["client_close"] == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // Drain a through the API (the id percent-encoded, as the page sends it): no token is refused.
    let drain_path = format!(
        "/pools/chat/backends/{}/drain?spread=none",
        a.addr.to_string().replace(':', "%3A")
    );
    let (status, _) = post(admin, &drain_path, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a drain without a token");
    let (status, body) = post(admin, &drain_path, Some(&tokens.token)).await;
    assert_eq!(status, StatusCode::OK, "the drain: {body}");
    let drained: Value = serde_json::from_str(&body).expect("the drained backend's status");
    assert_eq!(drained["id"], a.addr.to_string(), "{drained}");
    assert_eq!(drained["state"], "draining", "{drained}");

    // The page as served.
    let (status, headers, body) = http_get(admin, "/").await;
    assert_eq!(status, StatusCode::OK);
    let content_type = headers[header::CONTENT_TYPE].to_str().expect("ASCII");
    assert!(
        content_type.starts_with("text/html"),
        "Content-Type {content_type:?}"
    );
    let served = String::from_utf8(body.to_vec()).expect("UTF-8");
    assert!(served == PAGE, "the admin listener serves another page");
    assert_eq!(external_references(&served), Vec::<String>::new());

    // What the gateway says, then the page, then what it says again: the same, so the page must show it.
    let before = quiet_status(admin).await;
    assert_eq!(before["write_api"], true, "{before}");
    let backend = |id: &SocketAddr| {
        before["pools"][0]["backends"]
            .as_array()
            .and_then(|list| list.iter().find(|b| b["id"] == id.to_string()))
            .cloned()
            .unwrap_or_else(|| panic!("no backend {id} in /status: {before}"))
    };
    assert_eq!(backend(&a.addr)["drain"]["causes"], json!(["admin"]));
    assert_eq!(backend(&a.addr)["drain"]["by"], TOKEN_NAME);
    assert_eq!(backend(&c.addr)["drain"]["causes"], json!(["config"]));
    assert_eq!(before["routes"][0]["tunnels_active"], 3, "{before}");
    let dom = dump_dom(&chromium, &format!("http://{admin}/")).await;
    let after = get_status(admin).await;
    assert_eq!(
        before, after,
        "/status changed while the browser ran: the test is not quiet"
    );
    check_page(&dom, &before);

    drop(clients);
    gateway.shutdown().await;
}

/// A `/status` by the contract, with every backend state, DNS discovery, drain causes, a failed reload,
/// and operator- and DNS-controlled text that is markup if parsed as HTML.
const FIXTURE: &str = r#"{
  "ready": false,
  "generation": 7,
  "config_file": "config/wsgate.toml",
  "config_loaded_unix": 1790000000,
  "last_reload": { "at_unix": 1790000300, "ok": false, "trigger": "admin",
                   "error": "wsgate.toml:14: route[0].pool: no pool named `chats` <script>alert(1)</script>" },
  "write_api": true,
  "read_buffers_in_use": 2,
  "routes": [
    { "name": "chat", "host": "chat.example.com", "path_prefix": "/ws", "pool": "chat", "tunnels_active": 12,
      "upgrades": { "ok": 10, "rejected": 1 }, "closes": { "client_close": 3, "backend_drain": 2 },
      "ping_rtt": { "count": 40, "sum_seconds": 0.12 } },
    { "name": "rest.v2", "host": null, "path_prefix": "/", "pool": "rest", "tunnels_active": 0,
      "upgrades": {}, "closes": {}, "ping_rtt": { "count": 0, "sum_seconds": 0 } }
  ],
  "pools": [
    { "name": "chat", "policy": "LeastConn", "drain_spread_ms": 60000,
      "discovery": [ { "dns": "chat-headless.default.svc.cluster.local:9000", "resolve_every_ms": 10000,
                       "remove_after_ms": 30000, "addresses": ["10.0.0.1:9000", "10.0.0.2:9000"],
                       "last_success_unix": 1790000290, "last_error": "SERVFAIL <i>from</i> 10.96.0.10:53",
                       "resolutions": { "ok": 5, "failed": 1, "empty": 0 } } ],
      "backends": [
        { "addr": "10.0.0.1:9000", "id": "10.0.0.1:9000", "weight": 1, "state": "up", "available": true,
          "healthy": true, "ejected": false, "draining": false, "active_connections": 3, "tunnels": 2,
          "discovered": true, "drain": null },
        { "addr": "10.0.0.2:9000", "id": "10.0.0.2:9000", "weight": 1, "state": "draining", "available": false,
          "healthy": true, "ejected": false, "draining": true, "active_connections": 7, "tunnels": 6,
          "discovered": true,
          "drain": { "causes": ["admin", "dns"], "spread_ms": 1500, "since_unix_ms": 1790000250123, "by": "deploy" } },
        { "addr": "10.0.0.5:9000", "id": "<img src=x onerror=alert(1)>", "weight": 2, "state": "draining",
          "available": false, "healthy": true, "ejected": false, "draining": true, "active_connections": 0,
          "tunnels": 0, "discovered": false,
          "drain": { "causes": ["config"], "spread_ms": null, "since_unix_ms": 1790000000000, "by": null } },
        { "addr": "10.0.0.6:9000", "id": "10.0.0.6:9000", "weight": 1, "state": "ejected", "available": false,
          "healthy": true, "ejected": true, "draining": false, "active_connections": 1, "tunnels": 0,
          "discovered": false, "drain": null }
      ] },
    { "name": "rest", "policy": "RoundRobin", "drain_spread_ms": null, "discovery": [],
      "backends": [
        { "addr": "[::1]:8080", "id": "[::1]:8080", "weight": 5, "state": "down", "available": false,
          "healthy": false, "ejected": false, "draining": false, "active_connections": 0, "tunnels": 0,
          "discovered": false, "drain": null }
      ] }
  ],
  "admission": { "listeners": [], "routes": [] }
}"#;

#[tokio::test]
async fn the_operators_page_shows_a_status_by_the_contract() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let site = http_backend(|req: Request<Incoming>| async move {
        let (status, content_type, body) = match (req.method(), req.uri().path()) {
            (&Method::GET, "/") => (StatusCode::OK, "text/html; charset=utf-8", PAGE),
            (&Method::GET, "/status") => (StatusCode::OK, "application/json", FIXTURE),
            _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        };
        let mut response = Response::new(backend_body(body));
        *response.status_mut() = status;
        let h = response.headers_mut();
        h.insert(header::CONTENT_TYPE, content_type.parse().expect("static"));
        h.insert(header::CACHE_CONTROL, "no-store".parse().expect("static"));
        response
    })
    .await;
    let status: Value = serde_json::from_str(FIXTURE).expect("the fixture is JSON");
    let dom = dump_dom(&chromium, &format!("http://{}/", site.addr)).await;
    check_page(&dom, &status);

    // Text from /status stays text: nothing of it became an element.
    let main = dom.find("<main").expect("<main> in the DOM");
    let body = &dom[main..main + dom[main..].find("</main>").expect("</main> in the DOM")];
    for markup in ["<img", "<script", "<i>"] {
        assert!(!body.contains(markup), "{markup} in the page's DOM");
    }
    // The write API's controls: a drain button per backend, an undrain button per draining backend.
    assert_eq!(body.matches(">drain</button>").count(), 5);
    assert_eq!(body.matches(">undrain</button>").count(), 2);
    assert_eq!(external_references(PAGE), Vec::<String>::new());
}

/// Checks the dumped DOM against `status`: the page has polled, every `data-field` element shows the
/// value at its path, and every value the page must show has an element.
fn check_page(dom: &str, status: &Value) {
    let polls = attribute_of(dom, "body", "data-polls")
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    assert!(
        polls >= 1,
        "the page has not shown /status (poll line: {:?})\n{dom}",
        element_text(dom, "id=\"poll\"")
    );
    let fields = fields(dom);
    let mut wrong = Vec::new();
    for field in &fields {
        if let Err(why) = field.check(status) {
            wrong.push(format!("{}: {why}", field.path));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} values on the page differ from /status:\n  {}\n/status: {status}",
        wrong.len(),
        fields.len(),
        wrong.join("\n  ")
    );
    let shown: std::collections::HashSet<&str> = fields.iter().map(|f| f.path.as_str()).collect();
    let missing: Vec<String> = expected_paths(status)
        .into_iter()
        .filter(|p| !shown.contains(p.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "values of /status the page does not show: {missing:?}"
    );
    eprintln!(
        "the page shows {} values from /status, all as /status says, after {polls} polls",
        fields.len()
    );
}

/// The paths the page must show (by the contract's fields present in `status`).
fn expected_paths(status: &Value) -> Vec<String> {
    let mut paths: Vec<String> = [
        "ready",
        "generation",
        "config_file",
        "config_loaded_unix",
        "read_buffers_in_use",
        "write_api",
        "last_reload.at_unix",
        "last_reload.ok",
        "last_reload.trigger",
    ]
    .map(String::from)
    .to_vec();
    if !status["last_reload"]["error"].is_null() {
        paths.push("last_reload.error".into());
    }
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    for pool in list(&status["pools"]) {
        let p = format!("pools.{}", pool["name"].as_str().unwrap_or_default());
        for key in ["name", "policy", "drain_spread_ms"] {
            paths.push(format!("{p}.{key}"));
        }
        for d in list(&pool["discovery"]) {
            let q = format!("{p}.discovery.{}", d["dns"].as_str().unwrap_or_default());
            for key in [
                "dns",
                "resolve_every_ms",
                "remove_after_ms",
                "last_success_unix",
                "resolutions.ok",
                "resolutions.failed",
                "resolutions.empty",
            ] {
                paths.push(format!("{q}.{key}"));
            }
            for i in 0..list(&d["addresses"]).len() {
                paths.push(format!("{q}.addresses.{i}"));
            }
            if !d["last_error"].is_null() {
                paths.push(format!("{q}.last_error"));
            }
        }
        for b in list(&pool["backends"]) {
            let q = format!("{p}.backends.{}", b["id"].as_str().unwrap_or_default());
            for key in ["id", "state", "weight", "tunnels", "active_connections"] {
                paths.push(format!("{q}.{key}"));
            }
            if b["addr"] != b["id"] {
                paths.push(format!("{q}.addr"));
            }
            if b["discovered"] == true {
                paths.push(format!("{q}.discovered"));
            }
            if b["drain"].is_object() {
                for i in 0..list(&b["drain"]["causes"]).len() {
                    paths.push(format!("{q}.drain.causes.{i}"));
                }
                paths.push(format!("{q}.drain.spread_ms"));
                paths.push(format!("{q}.drain.since_unix_ms"));
                if !b["drain"]["by"].is_null() {
                    paths.push(format!("{q}.drain.by"));
                }
            }
        }
    }
    for route in list(&status["routes"]) {
        let q = format!("routes.{}", route["name"].as_str().unwrap_or_default());
        for key in [
            "name",
            "path_prefix",
            "pool",
            "tunnels_active",
            "ping_rtt.count",
        ] {
            paths.push(format!("{q}.{key}"));
        }
        if !route["host"].is_null() {
            paths.push(format!("{q}.host"));
        }
        for kind in ["upgrades", "closes"] {
            if let Some(counts) = route[kind].as_object() {
                paths.extend(counts.keys().map(|k| format!("{q}.{kind}.{k}")));
            }
        }
    }
    paths
}

/// One element of the page naming a value of /status.
#[derive(Debug)]
struct Field {
    path: String,
    /// The element's text, entities decoded.
    text: String,
    /// `data-raw`: the value as JSON text, where the text is a rendering of it.
    raw: Option<String>,
    /// `data-scale`: the text is the value times this.
    scale: Option<f64>,
}

impl Field {
    fn check(&self, status: &Value) -> Result<(), String> {
        let value = resolve(status, &self.path).ok_or("no such value in /status")?;
        if let Some(raw) = &self.raw {
            let shown: Value = serde_json::from_str(raw)
                .map_err(|_| format!("data-raw {raw:?} is not JSON (/status: {value})"))?;
            return if shown == *value {
                Ok(())
            } else {
                Err(format!("the page has {raw}, /status {value}"))
            };
        }
        match value {
            Value::String(s) if self.scale.is_none() => {
                if *s == self.text {
                    Ok(())
                } else {
                    Err(format!("the page shows {:?}, /status has {s:?}", self.text))
                }
            }
            Value::Number(n) => {
                let expected = n.as_f64().ok_or("not a number")? * self.scale.unwrap_or(1.0);
                let shown: f64 = self
                    .text
                    .trim()
                    .parse()
                    .map_err(|_| format!("the page shows {:?}, /status has {n}", self.text))?;
                if (shown - expected).abs() <= 1e-9 * expected.abs().max(1.0) {
                    Ok(())
                } else {
                    Err(format!(
                        "the page shows {shown}, /status has {n} (expected {expected})"
                    ))
                }
            }
            other => Err(format!(
                "/status has {other}, which the page shows as {:?} without data-raw",
                self.text
            )),
        }
    }
}

/// The value at a `data-field` path: keys joined by dots, a list of objects keyed by its elements'
/// `name`, `id` or `dns` (which may hold dots themselves: every way to split the path is tried), a list
/// of anything else by index.
fn resolve<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    if path.is_empty() {
        return Some(value);
    }
    let rest_after = |key: &str| -> Option<&str> {
        if path == key {
            Some("")
        } else {
            path.strip_prefix(key)?.strip_prefix('.')
        }
    };
    match value {
        Value::Object(map) => map
            .iter()
            .filter_map(|(k, v)| Some((v, rest_after(k)?)))
            .find_map(|(v, rest)| resolve(v, rest)),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| {
                let key = ["name", "id", "dns"]
                    .iter()
                    .find_map(|k| item.get(k).and_then(Value::as_str))
                    .map_or_else(|| i.to_string(), str::to_string);
                Some((item, rest_after(&key)?))
            })
            .find_map(|(item, rest)| resolve(item, rest)),
        _ => None,
    }
}

#[test]
fn paths_resolve_through_keyed_lists_with_dots_in_their_keys() {
    let status = json!({
        "generation": 3,
        "pools": [ { "name": "chat", "backends": [
            { "id": "10.0.0.1:9000", "tunnels": 2 },
            { "id": "10.0.0.1:9000.b", "tunnels": 5 } ] } ],
        "routes": [ { "name": "a.b", "closes": { "client_close": 1 } } ],
        "x": { "addresses": ["p", "q"] }
    });
    let at = |path| resolve(&status, path).cloned();
    assert_eq!(at("generation"), Some(json!(3)));
    assert_eq!(
        at("pools.chat.backends.10.0.0.1:9000.tunnels"),
        Some(json!(2))
    );
    assert_eq!(
        at("pools.chat.backends.10.0.0.1:9000.b.tunnels"),
        Some(json!(5))
    );
    assert_eq!(at("routes.a.b.closes.client_close"), Some(json!(1)));
    assert_eq!(at("x.addresses.1"), Some(json!("q")));
    assert_eq!(at("pools.chat.backends.10.0.0.2:9000.tunnels"), None);
    assert_eq!(at("generation.x"), None);
}

/// Every element with a `data-field` in `dom` (serialized HTML; such elements hold text only).
fn fields(dom: &str) -> Vec<Field> {
    let dom = without_raw_text(dom);
    let mut fields = Vec::new();
    let mut at = 0;
    while let Some(offset) = dom[at..].find('<') {
        let start = at + offset;
        at = start + 1;
        let Some((attributes, end)) = tag(&dom, start) else {
            continue;
        };
        at = end;
        let get = |name: &str| {
            attributes
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        if let Some(path) = get("data-field") {
            let text_end = dom[end..].find('<').map_or(dom.len(), |i| end + i);
            fields.push(Field {
                path,
                text: unescape(&dom[end..text_end]),
                raw: get("data-raw"),
                scale: get("data-scale").and_then(|s| s.parse().ok()),
            });
        }
    }
    fields
}

/// The document without the contents of `<script>` and `<style>` and without comments, which are not
/// markup (and hold `<` of their own).
fn without_raw_text(dom: &str) -> String {
    let mut out = String::with_capacity(dom.len());
    let mut rest = dom;
    loop {
        let next = ["<script", "<style", "<!--"]
            .iter()
            .filter_map(|open| rest.find(open).map(|i| (i, *open)))
            .min();
        let Some((i, open)) = next else {
            out.push_str(rest);
            return out;
        };
        out.push_str(&rest[..i]);
        let close = match open {
            "<script" => "</script>",
            "<style" => "</style>",
            _ => "-->",
        };
        rest = match rest[i..].find(close) {
            Some(j) => &rest[i + j + close.len()..],
            None => "",
        };
    }
}

/// The start tag at `start` (a `<` followed by a letter): its attributes (values decoded) and where the
/// tag ends (past its `>`).
fn tag(dom: &str, start: usize) -> Option<(Vec<(String, String)>, usize)> {
    let bytes = dom.as_bytes();
    let mut i = start + 1;
    if !bytes.get(i)?.is_ascii_alphabetic() {
        return None;
    }
    while i < bytes.len() && !bytes[i].is_ascii_whitespace() && bytes[i] != b'>' {
        i += 1;
    }
    let mut attributes = Vec::new();
    loop {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        match bytes.get(i)? {
            b'>' => return Some((attributes, i + 1)),
            b'/' => {
                i += 1;
                continue;
            }
            _ => {}
        }
        let name_start = i;
        while i < bytes.len() && !b" \t\n\r=>/".contains(&bytes[i]) {
            i += 1;
        }
        let name = dom[name_start..i].to_ascii_lowercase();
        let mut value = String::new();
        if bytes.get(i) == Some(&b'=') {
            i += 1;
            // Chromium's serializer always quotes with `"` (and escapes `"` inside as `&quot;`).
            if bytes.get(i) != Some(&b'"') {
                return None;
            }
            let end = i + 1 + dom[i + 1..].find('"')?;
            value = unescape(&dom[i + 1..end]);
            i = end + 1;
        }
        attributes.push((name, value));
    }
}

/// Decodes the character references Chromium's serializer writes (and numeric ones).
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';').filter(|&e| e <= 10) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..end];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "nbsp" => Some('\u{a0}'),
            _ => entity
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The value of `attribute` on the first `<element` start tag of `dom`.
fn attribute_of(dom: &str, element: &str, attribute: &str) -> Option<String> {
    let start = without_raw_text(dom);
    let i = start.find(&format!("<{element}"))?;
    let (attributes, _) = tag(&start, i)?;
    attributes
        .into_iter()
        .find(|(n, _)| n == attribute)
        .map(|(_, v)| v)
}

/// The text right after the start tag holding `marker` (for failure messages).
fn element_text(dom: &str, marker: &str) -> Option<String> {
    let i = dom.find(marker)?;
    let start = i + dom[i..].find('>')? + 1;
    let end = start + dom[start..].find('<')?;
    Some(unescape(&dom[start..end]))
}

/// The page's references to anything not on its own origin: `src`, `href` (and the like) attributes
/// that name a scheme or a network path (`//host`), CSS `url(...)` and `@import`, and any URL with a
/// scheme anywhere in the text but SVG's namespace name (which is a name, not fetched).
fn external_references(page: &str) -> Vec<String> {
    let mut found = Vec::new();
    let markup = without_raw_text(page);
    let mut at = 0;
    while let Some(offset) = markup[at..].find('<') {
        let start = at + offset;
        at = start + 1;
        let Some((attributes, end)) = tag(&markup, start) else {
            continue;
        };
        at = end;
        for (name, value) in attributes {
            let value = value.trim().to_ascii_lowercase();
            let refers = matches!(
                name.as_str(),
                "src"
                    | "href"
                    | "xlink:href"
                    | "action"
                    | "formaction"
                    | "srcset"
                    | "poster"
                    | "data"
            );
            if refers
                && (value.starts_with("//") || value.contains("://") || value.starts_with("http"))
            {
                found.push(format!("{name}={value}"));
            }
        }
    }
    let lower = page.to_ascii_lowercase();
    for css in ["url(", "@import"] {
        if lower.contains(css) {
            found.push(css.to_string());
        }
    }
    let mut rest = lower.as_str();
    while let Some(i) = rest.find("://") {
        let before = &rest[..i];
        let scheme_start = before
            .rfind(|c: char| !c.is_ascii_alphanumeric() && c != '+' && c != '-' && c != '.')
            .map_or(0, |j| j + 1);
        let url: String = rest[scheme_start..]
            .chars()
            .take_while(|c| !c.is_whitespace() && !matches!(c, '"' | '\'' | '<' | '>' | ')'))
            .collect();
        if url != "http://www.w3.org/2000/svg" {
            found.push(url);
        }
        rest = &rest[i + 3..];
    }
    found.sort();
    found.dedup();
    found
}

/// `GET /status` on the admin listener, parsed.
async fn get_status(admin: SocketAddr) -> Value {
    let (status, headers, body) = http_get(admin, "/status").await;
    assert_eq!(status, StatusCode::OK, "/status");
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .is_ok_and(|t| t.starts_with("application/json")),
        "/status's Content-Type"
    );
    serde_json::from_slice(&body).expect("/status is JSON")
}

/// `/status` once two reads 200 ms apart agree (what the last actions changed has settled).
async fn quiet_status(admin: SocketAddr) -> Value {
    within("a quiet /status", async {
        let mut last = get_status(admin).await;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = get_status(admin).await;
            if now == last {
                return now;
            }
            last = now;
        }
    })
    .await
}

/// `POST path` on the admin listener, with `Authorization: Bearer token` if given: status and body.
async fn post(admin: SocketAddr, path: &str, token: Option<&str>) -> (StatusCode, String) {
    use http_body_util::BodyExt;
    let mut request = Request::post(path).header(header::HOST, admin.to_string());
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request.body(Empty::<Bytes>::new()).expect("request");
    let response = http_send(admin, request).await;
    let status = response.status();
    let body = within("a response body", response.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A token file (`name:token`) in the temp directory, removed when dropped.
struct TokenFile {
    path: PathBuf,
    token: String,
}

impl TokenFile {
    fn new() -> TokenFile {
        let token: String = (0..32)
            .map(|_| char::from_digit(fastrand::u32(..16), 16).expect("a hex digit"))
            .collect();
        let path = std::env::temp_dir().join(format!(
            "wsgate-admin-tokens-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::write(
            &path,
            format!("# the admin page test's token\n{TOKEN_NAME}:{token}\n"),
        )
        .expect("write the token file");
        TokenFile { path, token }
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Loads `url` in a headless Chromium with a fresh profile, lets the page run for `VIRTUAL_TIME_MS` of
/// virtual time (its fetches are waited for), and returns the DOM it prints. Runs on a blocking thread:
/// the gateway keeps serving meanwhile.
async fn dump_dom(chromium: &Path, url: &str) -> String {
    let (chromium, url) = (chromium.to_path_buf(), url.to_string());
    let run = tokio::task::spawn_blocking(move || dump_dom_blocking(&chromium, &url));
    match tokio::time::timeout(BROWSER_WAIT + Duration::from_secs(10), run).await {
        Ok(Ok(Ok(dom))) => dom,
        Ok(Ok(Err(why))) => panic!("{why}"),
        Ok(Err(panic)) => panic!("the browser's thread: {panic}"),
        Err(_) => panic!("the browser did not finish within {BROWSER_WAIT:?}"),
    }
}

fn dump_dom_blocking(chromium: &Path, url: &str) -> Result<String, String> {
    let dir = std::env::temp_dir().join(format!(
        "wsgate-admin-page-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            // Needed as root (containers, CI): Chromium refuses to start its sandbox there.
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
            "--dump-dom",
        ])
        .arg(format!("--virtual-time-budget={VIRTUAL_TIME_MS}"))
        .arg(format!("--user-data-dir={}", dir.display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("chromium does not start: {e}"))?;
    // Both pipes are read to their end, which comes once the browser and every helper it started (which
    // inherit them) are gone.
    let mut stdout = child.stdout.take().expect("stdout pipe");
    let mut stderr = child.stderr.take().expect("stderr pipe");
    let (out_done, out_read) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        let _ = out_done.send(out);
    });
    let (err_done, err_read) = mpsc::channel();
    std::thread::spawn(move || {
        let mut err = Vec::new();
        let _ = stderr.read_to_end(&mut err);
        let _ = err_done.send(err);
    });
    let out = out_read.recv_timeout(BROWSER_WAIT);
    let _ = child.kill();
    let _ = child.wait();
    let err = err_read
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr_tail = || {
        let text = String::from_utf8_lossy(&err);
        let kept: Vec<&str> = text.lines().filter(|l| !l.contains("dbus")).collect();
        kept[kept.len().saturating_sub(40)..].join("\n")
    };
    match out {
        Ok(out) if !out.is_empty() => {
            String::from_utf8(out).map_err(|_| "the DOM is not UTF-8".to_string())
        }
        Ok(_) => Err(format!(
            "chromium printed no DOM; its stderr:\n{}",
            stderr_tail()
        )),
        Err(_) => Err(format!(
            "chromium printed no DOM within {BROWSER_WAIT:?}; its stderr:\n{}",
            stderr_tail()
        )),
    }
}
