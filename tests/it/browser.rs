//! A real browser through wsgate: Debian's Chromium, headless, loads a page over `https://` (ALPN h2) and
//! opens a WebSocket to the same origin, which it must send over that HTTP/2 connection as an extended
//! CONNECT (RFC 8441). The page reports the echo (or the error) back to its server; wsgate's metrics must
//! show the upgrade arrived over h2.
//!
//! Needs `chromium`: without it the test is skipped, unless `WSGATE_BROWSER_TESTS=1` (as in CI), which
//! makes a missing browser a failure. `WSGATE_BROWSER_NETLOG=FILE` has Chromium write its net log there
//! (every HTTP/2 frame it sends and gets), for when the test fails; the browser is killed at the end, so
//! the file's JSON is cut short (close its `events` array to read it).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::common::*;
use crate::tls::{Pki, tls_config};

/// How long the browser gets to start, load the page and report: a cold start on a busy machine takes
/// seconds.
const BROWSER_WAIT: Duration = Duration::from_secs(60);

/// What the browser sends over the WebSocket and must get back.
const MESSAGE: &str = "hello from chromium over h2";

/// The page: opens a WebSocket to its own origin, sends `MESSAGE`, and POSTs what came of it to
/// `/result` as JSON: `{"echo": ...}` or `{"error": ...}` (an error or a close before the echo).
const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<title>wsgate browser test</title>
<script>
let reported = false;
function report(result) {
  if (reported) return;
  reported = true;
  fetch("/result", { method: "POST", body: JSON.stringify(result) });
}
const ws = new WebSocket("wss://" + location.host + "/ws/browser");
ws.onopen = () => ws.send("MESSAGE");
ws.onmessage = (event) => {
  report({ echo: event.data, extensions: ws.extensions, protocol: ws.protocol });
  ws.close(1000, "done");
};
ws.onerror = () => report({ error: "error event" });
ws.onclose = (event) => report({ error: "closed " + event.code + " " + event.reason });
</script>
"#;

#[tokio::test]
async fn chromium_opens_a_websocket_over_h2_through_wsgate() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };

    // The page and its report on one backend, the WebSocket (`/ws`) on TestBackend, which echoes.
    let (reports, mut reported) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let site = http_backend(move |req: Request<Incoming>| {
        let reports = reports.clone();
        async move {
            match (req.method(), req.uri().path()) {
                (&Method::GET, "/") => {
                    let mut response =
                        Response::new(backend_body(PAGE.replace("MESSAGE", MESSAGE)));
                    let h = response.headers_mut();
                    h.insert(
                        header::CONTENT_TYPE,
                        "text/html; charset=utf-8".parse().expect("static"),
                    );
                    h.insert(header::CACHE_CONTROL, "no-store".parse().expect("static"));
                    response
                }
                (&Method::POST, "/result") => {
                    if let Ok(body) = req.into_body().collect().await {
                        let _ = reports.send(body.to_bytes());
                    }
                    let mut response = Response::new(backend_body(""));
                    *response.status_mut() = StatusCode::NO_CONTENT;
                    response
                }
                _ => {
                    let mut response = Response::new(backend_body("not found"));
                    *response.status_mut() = StatusCode::NOT_FOUND;
                    response
                }
            }
        }
    })
    .await;
    let echo = TestBackend::start("echo").await;

    let pki = Pki::new();
    let (cert, key, _) = pki.leaf("localhost", &["localhost", "127.0.0.1"]);
    // The default TLS listener: ALPN h2 and http/1.1, WebSockets over HTTP/2 on.
    let text = tls_config(site.addr, &[(&cert, &key)])
        + &format!(
            r#"
[[route]]
name = "ws"
path_prefix = "/ws"
pool = "ws"

[pool.ws]
backends = [ {{ addr = "{}" }} ]
"#,
            echo.addr
        );
    let (gateway, addr) = gateway(&text).await;

    // `localhost`, the name the certificate is for (Chromium resolves it to loopback itself).
    let url = format!("https://localhost:{}/", addr.port());
    let browser = Browser::launch(&chromium, &url);
    let started = Instant::now();
    let report = match tokio::time::timeout(BROWSER_WAIT, reported.recv()).await {
        Ok(Some(report)) => report,
        _ => panic!(
            "no report from the page within {BROWSER_WAIT:?}\nmetrics:\n{}\nchromium's stderr:\n{}",
            traffic(&gateway.metrics_text()),
            browser.stderr_tail(40)
        ),
    };
    eprintln!(
        "the page reported after {:?}: {}",
        started.elapsed(),
        String::from_utf8_lossy(&report)
    );
    let report: serde_json::Value = serde_json::from_slice(&report).expect("a JSON report");
    assert_eq!(
        report["echo"],
        MESSAGE,
        "the page got no echo: {report}\nchromium's stderr:\n{}",
        browser.stderr_tail(40)
    );

    // What the backend got: wsgate's HTTP/1.1 upgrade, made from the browser's extended CONNECT.
    let seen = echo.seen().pop().expect("the echo backend saw the upgrade");
    eprintln!(
        "the backend's view of the upgrade: {} {}",
        seen.method, seen.target
    );
    for (name, value) in &seen.headers {
        eprintln!("  {name}: {}", String::from_utf8_lossy(value.as_bytes()));
    }
    assert_eq!(seen.target, "/ws/browser");
    assert_eq!(
        seen.headers[header::ORIGIN],
        format!("https://localhost:{}", addr.port())
    );
    assert_eq!(seen.headers["x-forwarded-proto"], "https");

    // The upgrade came over HTTP/2, and so did the page; nothing came over HTTP/1.1.
    let metrics = gateway.metrics_text();
    assert!(
        metrics.contains("wsgate_ws_upgrades_total{protocol=\"h2\",result=\"ok\",route=\"ws\"} 1"),
        "the WebSocket did not come over HTTP/2:\n{}",
        traffic(&metrics)
    );
    assert!(
        metrics.contains(
            "wsgate_http_requests_total{protocol=\"h2\",route=\"main\",status_class=\"2xx\"} "
        ),
        "the page did not come over HTTP/2:\n{}",
        traffic(&metrics)
    );
    let over_h1: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("wsgate_") && l.contains("protocol=\"h1\""))
        .collect();
    assert!(over_h1.is_empty(), "requests over HTTP/1.1: {over_h1:?}");
    // The page closes the WebSocket after the echo. Chromium sends its Close in a DATA frame that also
    // ends its side of the stream (END_STREAM): wsgate still answers it, and counts a client close.
    within("the browser's Close", async {
        while !gateway.metrics_text().contains(
            "wsgate_ws_closes_total{protocol=\"h2\",reason=\"client_close\",route=\"ws\"} 1",
        ) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    drop(browser);
    gateway.shutdown().await;
}

/// The metrics' lines about requests and WebSockets, for a failure's message.
fn traffic(metrics: &str) -> String {
    let lines: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("wsgate_http_requests_total") || l.starts_with("wsgate_ws_"))
        .collect();
    lines.join("\n")
}

/// Chromium's launcher: Debian's, or `chromium` on the `PATH`.
pub(crate) fn find_chromium() -> Option<PathBuf> {
    let debian = Path::new("/usr/bin/chromium");
    if debian.is_file() {
        return Some(debian.to_path_buf());
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join("chromium"))
        .find(|path| path.is_file())
}

/// A headless Chromium with a fresh profile, killed (and its profile removed) when dropped.
struct Browser {
    child: Child,
    /// The profile's directory.
    dir: PathBuf,
    /// Everything the browser has written to its stderr so far.
    stderr: Arc<Mutex<Vec<u8>>>,
    /// Ready once the stderr pipe has been closed by every process holding it: the browser and all its
    /// helpers (zygotes, renderers, the network service), which inherit it.
    stderr_closed: mpsc::Receiver<()>,
}

impl Browser {
    fn launch(chromium: &Path, url: &str) -> Browser {
        let dir = std::env::temp_dir().join(format!(
            "wsgate-browser-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        // No feature flag: Chromium sends a WebSocket as an extended CONNECT by itself, over an HTTP/2
        // connection it already has to the origin (here the page's) whose server announced
        // SETTINGS_ENABLE_CONNECT_PROTOCOL. Without that setting it opens an HTTP/1.1 connection for the
        // WebSocket instead, which the test's metrics catch.
        let mut command = Command::new(chromium);
        command
            .args([
                "--headless",
                // Needed as root (containers, CI): Chromium refuses to start its sandbox there.
                "--no-sandbox",
                // Needed: the test CA is not in Chromium's store (else ERR_CERT_AUTHORITY_INVALID).
                "--ignore-certificate-errors",
                // The rest keeps the run quiet and alone: no GPU process, no HTTP/3 attempt, no
                // first-run pages, no requests of Chromium's own.
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", dir.display()));
        if let Some(netlog) = std::env::var_os("WSGATE_BROWSER_NETLOG") {
            let mut flag = std::ffi::OsString::from("--log-net-log=");
            flag.push(netlog);
            command.arg(flag).arg("--net-log-capture-mode=Everything");
        }
        let mut child = command
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        let mut pipe = child.stderr.take().expect("stderr pipe");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (closed, stderr_closed) = mpsc::channel();
        let buffer = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                buffer
                    .lock()
                    .expect("stderr lock")
                    .extend_from_slice(&chunk[..n]);
            }
            let _ = closed.send(());
        });
        Browser {
            child,
            dir,
            stderr,
            stderr_closed,
        }
    }

    /// The last `lines` lines of the browser's stderr, without its complaints about a missing D-Bus.
    fn stderr_tail(&self, lines: usize) -> String {
        let stderr = self.stderr.lock().expect("stderr lock");
        let text = String::from_utf8_lossy(&stderr);
        let kept: Vec<&str> = text.lines().filter(|l| !l.contains("dbus")).collect();
        kept[kept.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The launcher execs the browser, so this is the browser process itself. Its helpers end soon
        // after it (within about 200 ms), still writing to the profile meanwhile: the profile is removed
        // once they are all gone, which the end of the stderr they share tells.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.stderr_closed.recv_timeout(Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Chromium, or `None` when a browser test is to be skipped: without chromium, unless
/// `WSGATE_BROWSER_TESTS=1` (as in CI), which makes a missing browser a failure.
pub(crate) fn chromium_or_skip() -> Option<std::path::PathBuf> {
    let chromium = find_chromium();
    if chromium.is_none() {
        assert!(
            std::env::var("WSGATE_BROWSER_TESTS").as_deref() != Ok("1"),
            "WSGATE_BROWSER_TESTS=1 but chromium is not installed"
        );
        // Written to stderr itself, not through `eprintln!`, which the test harness captures: a skip
        // shows in an ordinary `cargo test` run.
        let _ = writeln!(
            std::io::stderr(),
            "skipped: chromium not installed (set WSGATE_BROWSER_TESTS=1 to require it)"
        );
    }
    chromium
}
