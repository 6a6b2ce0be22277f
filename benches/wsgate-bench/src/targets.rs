//! The proxies under test: config generation, spawning as child processes in
//! their own process group, readiness checks and guaranteed teardown.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::timeout;

use crate::procstat::Probe;
use crate::tls::{self, TlsSetup};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Wsgate,
    Nginx,
    Haproxy,
    Direct,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Wsgate, Kind::Nginx, Kind::Haproxy, Kind::Direct];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Wsgate => "wsgate",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
            Kind::Direct => "direct",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a proxy needs to be started.
#[derive(Clone, Debug)]
pub struct Spec {
    pub kind: Kind,
    /// Executable (unused for direct).
    pub bin: PathBuf,
    pub threads: u32,
    pub backends: [SocketAddr; 2],
    pub nofile_hard: u64,
    pub dir: PathBuf,
    /// Extra environment for the process (wsgate's log filter).
    pub env: Vec<(String, String)>,
    /// When set, the proxy gets a second listener, TLS with this certificate,
    /// proxying to the same plain-ws backends (ignored for direct).
    pub tls: Option<TlsSetup>,
    /// The TLS listener also offers HTTP/2 by ALPN (`idle_h2`, `h2`,
    /// `h2_m10`): HAProxy's `bind` gets `alpn h2,http/1.1` instead of `alpn
    /// http/1.1`, nginx's `listen` gets `http2` (nginx 1.22's syntax; it
    /// serves HTTP/2 requests, not WebSockets over HTTP/2). wsgate's TLS
    /// listener always says `alpn = ["h2", "http/1.1"]` (its default).
    pub h2: bool,
    /// When set, the proxy also routes [`TLS_BACKEND_PATH`] to these TLS echo
    /// backends, verifying their certificate (`idle_tls_backend`).
    pub tls_backends: Option<TlsBackends>,
    /// wsgate's admission-control keys (`storm`); ignored for the others.
    pub admission: Option<Admission>,
    /// wsgate's fleet-operation keys (`drain`); ignored for the others.
    pub fleet: Option<Fleet>,
}

/// wsgate's fleet-operation keys, as `drain` sets them: the admin API's
/// token file (beside an admin listener from [`Admission::admin`]), the
/// pool's `drain_spread` and ids for the two backends, so that the admin API
/// can name them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fleet {
    /// `admin.token_file`.
    pub token_file: Option<PathBuf>,
    /// The pool's `drain_spread`, as written (`"60s"`).
    pub drain_spread: Option<String>,
    /// The backends' `id`s, in the order of [`Spec::backends`].
    pub ids: Option<[String; 2]>,
}

impl Fleet {
    /// Lines for the `[admin]` section.
    fn admin_keys(&self) -> String {
        match &self.token_file {
            Some(f) => format!("token_file = {}\n", quoted(f)),
            None => String::new(),
        }
    }

    /// Lines for the pool.
    fn pool_keys(&self) -> String {
        match &self.drain_spread {
            Some(s) => format!("drain_spread = {s:?}\n"),
            None => String::new(),
        }
    }

    /// `, id = "..."` for backend `i`, if ids are set.
    fn id_key(&self, i: usize) -> String {
        match &self.ids {
            Some(ids) => format!(", id = {:?}", ids[i]),
            None => String::new(),
        }
    }
}

/// wsgate's admission-control keys, as `storm` sets them: the listener's
/// handshake gate and per-client connection limit, the route's per-client
/// tunnel limit and handshake rate and its Origin allow-list.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Admission {
    /// `handshake_rate = { rate, burst, max_wait }` on the listener.
    pub gate: Option<Gate>,
    pub max_connections_per_ip: Option<u32>,
    pub max_tunnels_per_ip: Option<u32>,
    /// `handshake_rate_per_ip = { rate, burst }` on the route.
    pub rate_per_ip: Option<(f64, u32)>,
    pub allowed_origins: Vec<String>,
    /// An admin listener (`/metrics`) here.
    pub admin: Option<SocketAddr>,
}

/// A listener's handshake gate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gate {
    pub rate: f64,
    pub burst: u32,
    pub max_wait: Duration,
}

impl Admission {
    /// The admin section, if any.
    fn admin_section(&self) -> String {
        match self.admin {
            Some(a) => format!("\n[admin]\nlisten = \"{a}\"\n"),
            None => String::new(),
        }
    }

    /// The listener's lines.
    fn listener_keys(&self) -> String {
        let mut s = String::new();
        if let Some(g) = &self.gate {
            s.push_str(&format!(
                "handshake_rate = {{ rate = {}, burst = {}, max_wait = \"{}ms\" }}\n",
                g.rate,
                g.burst,
                g.max_wait.as_millis()
            ));
        }
        if let Some(n) = self.max_connections_per_ip {
            s.push_str(&format!("max_connections_per_ip = {n}\n"));
        }
        s
    }

    /// The route's lines.
    fn route_keys(&self) -> String {
        let mut s = String::new();
        if let Some(n) = self.max_tunnels_per_ip {
            s.push_str(&format!("max_tunnels_per_ip = {n}\n"));
        }
        if let Some((rate, burst)) = self.rate_per_ip {
            s.push_str(&format!(
                "handshake_rate_per_ip = {{ rate = {rate}, burst = {burst} }}\n"
            ));
        }
        if !self.allowed_origins.is_empty() {
            let list: Vec<String> = self
                .allowed_origins
                .iter()
                .map(|o| format!("{o:?}"))
                .collect();
            s.push_str(&format!("allowed_origins = [{}]\n", list.join(", ")));
        }
        s
    }
}

/// The path the proxies route to their TLS backends; everything else goes to
/// the plain ones.
pub const TLS_BACKEND_PATH: &str = "/tls-backend";

/// TLS echo backends and what a proxy needs to verify them: the CA file (the
/// bench's self-signed certificate) and the name in it, [`tls::SERVER_NAME`].
#[derive(Clone, Debug)]
pub struct TlsBackends {
    pub addrs: [SocketAddr; 2],
    pub ca: PathBuf,
}

/// A running target. For direct, `addr` is the first backend and there is no process.
pub struct Target {
    pub spec: Spec,
    pub addr: SocketAddr,
    /// The TLS listener, when the spec asks for one.
    pub tls_addr: Option<SocketAddr>,
    proc: Option<ProcGuard>,
}

impl Target {
    pub fn kind(&self) -> Kind {
        self.spec.kind
    }

    pub fn probe(&self) -> Probe {
        Probe {
            pid: self.proc.as_ref().and_then(|p| p.child.id()),
        }
    }

    /// None while running (or for direct); otherwise why it is not.
    pub fn check_alive(&mut self) -> Option<String> {
        self.proc.as_mut()?.check_alive()
    }

    /// Starts (or for direct, just describes) the target and waits until it proxies.
    pub async fn start(spec: Spec) -> Result<Target, String> {
        if spec.kind == Kind::Direct {
            return Ok(Target {
                addr: spec.backends[0],
                tls_addr: None,
                spec,
                proc: None,
            });
        }
        // Both ports are held at once so that they differ, then released for the proxy.
        let plain = bind_free()?;
        let tls_sock = match spec.tls {
            Some(_) => Some(bind_free()?),
            None => None,
        };
        let local =
            |l: &std::net::TcpListener| l.local_addr().map_err(|e| format!("no free port: {e}"));
        let addr = local(&plain)?;
        let tls_addr = tls_sock.as_ref().map(local).transpose()?;
        drop((plain, tls_sock));
        let listen = Listen { addr, tls_addr };
        let name = spec.kind.name();
        let conf_dir = spec.dir.join(name);
        std::fs::create_dir_all(&conf_dir).map_err(|e| format!("{}: {e}", conf_dir.display()))?;
        let (conf_file, text, args) = match spec.kind {
            Kind::Wsgate => {
                let f = conf_dir.join("wsgate.toml");
                let args = vec![
                    "run".into(),
                    "--config".into(),
                    f.display().to_string(),
                    "--threads".into(),
                    spec.threads.to_string(),
                ];
                (f.clone(), wsgate_config(&spec, listen), args)
            }
            Kind::Nginx => {
                let f = conf_dir.join("nginx.conf");
                let args = vec![
                    "-c".into(),
                    f.display().to_string(),
                    "-p".into(),
                    conf_dir.display().to_string(),
                    "-e".into(),
                    conf_dir.join("error.log").display().to_string(),
                ];
                (f.clone(), nginx_config(&spec, listen, &conf_dir), args)
            }
            Kind::Haproxy => {
                let f = conf_dir.join("haproxy.cfg");
                let args = vec!["-f".into(), f.display().to_string(), "-db".into()];
                (f.clone(), haproxy_config(&spec, listen), args)
            }
            Kind::Direct => unreachable!(),
        };
        std::fs::write(&conf_file, text).map_err(|e| format!("{}: {e}", conf_file.display()))?;
        let log = conf_dir.join("output.log");
        let proc = ProcGuard::spawn(name, &spec.bin, &args, &spec.env, &log)?;
        let mut t = Target {
            spec,
            addr,
            tls_addr,
            proc: Some(proc),
        };
        t.wait_ready(Duration::from_secs(15)).await?;
        Ok(t)
    }

    /// Waits until `GET /` through the target answers 200 (on the TLS
    /// listener too, when there is one).
    async fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let mut last = String::from("not tried");
        let mut plain_ok = false;
        while Instant::now() < deadline {
            if let Some(dead) = self.check_alive() {
                return Err(dead);
            }
            if !plain_ok {
                match http_get_status(self.addr, Duration::from_secs(2)).await {
                    Ok(200) => plain_ok = true,
                    Ok(s) => last = format!("GET / answered {s}"),
                    Err(e) => last = e,
                }
            }
            if plain_ok {
                match (self.tls_addr, &self.spec.tls) {
                    (Some(a), Some(t)) => {
                        match https_get_status(a, t, Duration::from_secs(2)).await {
                            Ok(200) => return Ok(()),
                            Ok(s) => last = format!("GET / over TLS answered {s}"),
                            Err(e) => last = e,
                        }
                    }
                    _ => return Ok(()),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let tail = self.proc.as_ref().map(|p| p.log_tail()).unwrap_or_default();
        Err(format!(
            "{} not ready after {limit:?}: {last}; log: {tail}",
            self.kind()
        ))
    }

    /// Stops the process now (also done on drop).
    pub fn stop(&mut self) {
        self.proc.take();
    }
}

/// A socket on a port free on 127.0.0.1 right now; its port is free again once it is dropped.
fn bind_free() -> Result<std::net::TcpListener, String> {
    std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))
}

/// Where a proxy listens: plain, and TLS when its spec has a certificate.
#[derive(Clone, Copy, Debug)]
pub struct Listen {
    pub addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
}

impl From<SocketAddr> for Listen {
    fn from(addr: SocketAddr) -> Listen {
        Listen {
            addr,
            tls_addr: None,
        }
    }
}

/// Minimal `GET /` with `Connection: close`; returns the status code.
pub async fn http_get_status(addr: SocketAddr, limit: Duration) -> Result<u16, String> {
    let fut = async {
        let s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        get_status(s).await
    };
    match timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("GET / to {addr} timed out")),
    }
}

/// As [`http_get_status`], over TLS with `tls`'s client config.
pub async fn https_get_status(
    addr: SocketAddr,
    tls: &TlsSetup,
    limit: Duration,
) -> Result<u16, String> {
    let fut = async {
        let s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let s = tls
            .connector()
            .connect(tls::server_name(), s)
            .await
            .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
        get_status(s).await
    };
    match timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("GET / over TLS to {addr} timed out")),
    }
}

async fn get_status<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> Result<u16, String> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 || buf.len() > 64 * 1024 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("bad response: {:?}", head.lines().next().unwrap_or("")))
}

/// The TLS listener's address and certificate, when the proxy gets one.
fn tls_of(spec: &Spec, listen: Listen) -> Option<(SocketAddr, &TlsSetup)> {
    listen.tls_addr.zip(spec.tls.as_ref())
}

/// A path as a quoted string for a config file (TOML, nginx and HAProxy all
/// accept a double-quoted string with backslash escapes).
fn quoted(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

pub fn wsgate_config(spec: &Spec, listen: impl Into<Listen>) -> String {
    let listen = listen.into();
    let tls_listener = match tls_of(spec, listen) {
        None => String::new(),
        Some((a, t)) => format!(
            "\n[[listener]]\nname = \"bench-tls\"\nlisten = \"{a}\"\n\
             tls = {{ certs = [ {{ cert = {}, key = {} }} ] }}\n\
             alpn = [\"h2\", \"http/1.1\"]\n",
            quoted(&t.cert),
            quoted(&t.key)
        ),
    };
    let admission = spec.admission.clone().unwrap_or_default();
    let fleet = spec.fleet.clone().unwrap_or_default();
    let mut admin_section = admission.admin_section();
    if !admin_section.is_empty() {
        admin_section.push_str(&fleet.admin_keys());
    }
    format!(
        r#"# generated by wsgate-bench
workers = {threads}
{admin_section}
[[listener]]
name = "bench"
listen = "{addr}"
{listener_admission}{tls_listener}
[[route]]
name = "all"
path_prefix = "/"
pool = "echo"
{route_admission}websocket = {{ ping_interval = "0s", idle_timeout = "3600s", max_message_size = "64MiB" }}

[pool.echo]
policy = "least_conn"
{pool_fleet}backends = [ {{ addr = "{b1}"{id1} }}, {{ addr = "{b2}"{id2} }} ]
{tls_pool}"#,
        threads = spec.threads,
        addr = listen.addr,
        b1 = spec.backends[0],
        b2 = spec.backends[1],
        id1 = fleet.id_key(0),
        id2 = fleet.id_key(1),
        pool_fleet = fleet.pool_keys(),
        tls_pool = wsgate_tls_pool(spec),
        listener_admission = admission.listener_keys(),
        route_admission = admission.route_keys(),
    )
}

/// The route and pool to the TLS backends, when the spec has them.
fn wsgate_tls_pool(spec: &Spec) -> String {
    let Some(t) = &spec.tls_backends else {
        return String::new();
    };
    format!(
        r#"
[[route]]
name = "tls-backend"
path_prefix = "{TLS_BACKEND_PATH}"
pool = "echo_tls"
websocket = {{ ping_interval = "0s", idle_timeout = "3600s", max_message_size = "64MiB" }}

[pool.echo_tls]
policy = "least_conn"
backends = [ {{ addr = "{b1}" }}, {{ addr = "{b2}" }} ]
tls = {{ ca = {ca}, server_name = "{name}" }}
"#,
        b1 = t.addrs[0],
        b2 = t.addrs[1],
        ca = quoted(&t.ca),
        name = tls::SERVER_NAME,
    )
}

pub fn nginx_config(spec: &Spec, listen: impl Into<Listen>, dir: &Path) -> String {
    // As root the workers would drop to "nobody"; keep them as the caller.
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root;\n"
    } else {
        ""
    };
    let listen = listen.into();
    let d = dir.display();
    // Toward the TLS backends TLS 1.3 as well: nginx 1.22's default
    // `proxy_ssl_protocols` stops at TLSv1.2 (1.3 joined it in 1.23.4), while
    // HAProxy and wsgate offer 1.3 to backends by default.
    let (tls_upstream, tls_location) = match &spec.tls_backends {
        None => (String::new(), String::new()),
        Some(t) => (
            format!(
                "\n    upstream echo_tls {{\n        least_conn;\n        server {};\n        server {};\n    }}\n",
                t.addrs[0], t.addrs[1]
            ),
            format!(
                "\n        location {TLS_BACKEND_PATH} {{\n            proxy_pass https://echo_tls;\n\
                 {NGINX_WS_PROXY}\
                 \x20           proxy_ssl_verify on;\n\
                 \x20           proxy_ssl_protocols TLSv1.3;\n\
                 \x20           proxy_ssl_trusted_certificate {};\n\
                 \x20           proxy_ssl_name {};\n\
                 \x20           proxy_ssl_server_name on;\n        }}",
                quoted(&t.ca),
                tls::SERVER_NAME
            ),
        ),
    };
    let locations = format!(
        "        location / {{\n            proxy_pass http://echo;\n{NGINX_WS_PROXY}        }}{tls_location}"
    );
    // The TLS listener is a server of its own, with the same locations: TLS
    // 1.3 only, as the other proxies; session tickets (nginx's default, said
    // out loud) let TLS 1.3 clients resume; and no end to a connection after
    // 1000 requests (nginx's default `keepalive_requests`: neither HAProxy
    // nor wsgate has such a limit, wrk then reconnects with a new TLS
    // handshake, and h2load does not reconnect after the GOAWAY at all, which
    // caps nginx at 1000 requests per connection per run). The plain
    // listener keeps the default, as the plaintext suite always ran it.
    let tls_server = match tls_of(spec, listen) {
        None => String::new(),
        Some((a, t)) => format!(
            "
    server {{
        listen {a} ssl{} backlog=4096;
        ssl_certificate {};
        ssl_certificate_key {};
        ssl_protocols TLSv1.3;
        ssl_session_tickets on;
        keepalive_requests 1000000;
{locations}
    }}
",
            if spec.h2 { " http2" } else { "" },
            quoted(&t.cert),
            quoted(&t.key)
        ),
    };
    format!(
        r#"# generated by wsgate-bench
{user}worker_processes {threads};
daemon off;
master_process on;
worker_rlimit_nofile {nofile};
error_log {d}/error.log warn;
pid {d}/nginx.pid;

events {{
    worker_connections 20000;
}}

http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;

    # The usual WebSocket map; '' maps to no Connection header so plain HTTP
    # keeps its upstream keepalive connections.
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      '';
    }}

    upstream echo {{
        least_conn;
        server {b1};
        server {b2};
        keepalive 64;
    }}
{tls_upstream}
    server {{
        listen {addr} backlog=4096;
{locations}
    }}
{tls_server}}}
"#,
        threads = spec.threads,
        addr = listen.addr,
        nofile = spec.nofile_hard,
        b1 = spec.backends[0],
        b2 = spec.backends[1],
    )
}

/// What every nginx `location` proxying WebSockets says after `proxy_pass`.
const NGINX_WS_PROXY: &str = "            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffer_size 16k;
            proxy_busy_buffers_size 16k;
";

/// HAProxy wants about 2 fds per connection and refuses to start when
/// `maxconn` needs more than RLIMIT_NOFILE allows: 40000, or what fits.
pub fn haproxy_maxconn(nofile_hard: u64) -> u64 {
    (nofile_hard.saturating_sub(200) / 2).clamp(100, 40_000)
}

pub fn haproxy_config(spec: &Spec, listen: impl Into<Listen>) -> String {
    let listen = listen.into();
    let tls_bind = match tls_of(spec, listen) {
        None => String::new(),
        Some((a, t)) => format!(
            "\n    bind {a} ssl crt {} alpn {} ssl-min-ver TLSv1.3",
            quoted(&t.bundle),
            if spec.h2 { "h2,http/1.1" } else { "http/1.1" }
        ),
    };
    let (tls_use, tls_backend) = match &spec.tls_backends {
        None => (String::new(), String::new()),
        Some(t) => {
            let server = |name: &str, a: SocketAddr| {
                format!(
                    "    server {name} {a} ssl verify required ca-file {} sni str({n}) verifyhost {n}\n",
                    quoted(&t.ca),
                    n = tls::SERVER_NAME
                )
            };
            (
                format!("\n    use_backend echo_tls if {{ path_beg {TLS_BACKEND_PATH} }}"),
                format!(
                    "\nbackend echo_tls\n    balance leastconn\n{}{}",
                    server("t1", t.addrs[0]),
                    server("t2", t.addrs[1])
                ),
            )
        }
    };
    format!(
        r#"# generated by wsgate-bench
global
    nbthread {threads}
    maxconn {maxconn}

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s
    timeout client-fin 5s
    timeout tunnel 3600s
    http-reuse safe

frontend bench
    bind {addr}{tls_bind}{tls_use}
    default_backend echo

backend echo
    balance leastconn
    server b1 {b1}
    server b2 {b2}
{tls_backend}"#,
        threads = spec.threads,
        addr = listen.addr,
        maxconn = haproxy_maxconn(spec.nofile_hard),
        b1 = spec.backends[0],
        b2 = spec.backends[1],
    )
}

/// A child process in its own process group; the whole group is terminated
/// (SIGTERM, then SIGKILL) when the guard is dropped.
pub struct ProcGuard {
    name: &'static str,
    child: Child,
    pgid: i32,
    log: PathBuf,
}

impl ProcGuard {
    pub fn spawn(
        name: &'static str,
        bin: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
    ) -> Result<ProcGuard, String> {
        let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; if this tool dies the child is
        // told to terminate (and an nginx master then stops its workers).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({}): {e}", bin.display()))?;
        let pgid = child.id().map(|p| p as i32).unwrap_or(0);
        Ok(ProcGuard {
            name,
            child,
            pgid,
            log: log.to_path_buf(),
        })
    }

    /// The child's pid while it has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// None while running; otherwise how it ended and the end of its log.
    pub fn check_alive(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(None) => None,
            Ok(Some(st)) => Some(format!(
                "{} exited ({st}); log: {}",
                self.name,
                self.log_tail()
            )),
            Err(e) => Some(format!("{}: wait failed: {e}", self.name)),
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(8);
        let mut tail = lines[start..].join(" | ");
        // nginx writes to its error.log rather than stderr.
        let elog = self.log.with_file_name("error.log");
        if let Ok(e) = std::fs::read_to_string(elog) {
            let el: Vec<&str> = e.lines().collect();
            let s = el.len().saturating_sub(5);
            if !el.is_empty() {
                tail.push_str(" | error.log: ");
                tail.push_str(&el[s..].join(" | "));
            }
        }
        tail
    }
}

fn group_exists(pgid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    unsafe { libc::kill(-pgid, 0) == 0 }
}

impl Drop for ProcGuard {
    fn drop(&mut self) {
        if self.pgid <= 1 {
            let _ = self.child.start_kill();
            return;
        }
        // SAFETY: signalling our own child's process group.
        unsafe {
            libc::kill(-self.pgid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < deadline {
            let _ = self.child.try_wait();
            if !group_exists(self.pgid) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe {
            libc::kill(-self.pgid, libc::SIGKILL);
        }
        let _ = self.child.start_kill();
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: Kind) -> Spec {
        Spec {
            kind,
            bin: PathBuf::from("x"),
            threads: 2,
            backends: [
                "127.0.0.1:1001".parse().unwrap(),
                "127.0.0.1:1002".parse().unwrap(),
            ],
            nofile_hard: 20000,
            dir: PathBuf::from("/tmp/x"),
            env: Vec::new(),
            tls: None,
            h2: false,
            tls_backends: None,
            admission: None,
            fleet: None,
        }
    }

    #[test]
    fn fleet_keys_go_to_the_admin_section_and_the_pool() {
        let addr: SocketAddr = "127.0.0.1:9999".parse().unwrap();
        let plain = wsgate_config(&spec(Kind::Wsgate), addr);
        assert!(!plain.contains("drain_spread") && !plain.contains("id = "));
        let mut s = spec(Kind::Wsgate);
        s.admission = Some(Admission {
            admin: Some("127.0.0.1:9997".parse().unwrap()),
            ..Admission::default()
        });
        s.fleet = Some(Fleet {
            token_file: Some(PathBuf::from("drain/admin-tokens")),
            drain_spread: Some("60s".into()),
            ids: Some(["a".into(), "b".into()]),
        });
        let w = wsgate_config(&s, addr);
        assert!(
            w.contains(
                "[admin]\nlisten = \"127.0.0.1:9997\"\ntoken_file = \"drain/admin-tokens\"\n"
            ),
            "{w}"
        );
        assert!(
            w.contains(
                "policy = \"least_conn\"\ndrain_spread = \"60s\"\n\
                 backends = [ { addr = \"127.0.0.1:1001\", id = \"a\" }, { addr = \"127.0.0.1:1002\", id = \"b\" } ]"
            ),
            "{w}"
        );
    }

    #[test]
    fn admission_keys_go_to_the_listener_and_the_route() {
        let addr: SocketAddr = "127.0.0.1:9999".parse().unwrap();
        let plain = wsgate_config(&spec(Kind::Wsgate), addr);
        assert!(!plain.contains("handshake_rate") && !plain.contains("per_ip"));
        let mut s = spec(Kind::Wsgate);
        s.admission = Some(Admission {
            gate: Some(Gate {
                rate: 1000.0,
                burst: 200,
                max_wait: Duration::from_secs(5),
            }),
            max_connections_per_ip: Some(100000),
            max_tunnels_per_ip: Some(100000),
            rate_per_ip: Some((1e6, 1_000_000)),
            allowed_origins: vec!["http://bench.localhost".into()],
            admin: Some("127.0.0.1:9997".parse().unwrap()),
        });
        let w = wsgate_config(&s, addr);
        assert!(
            w.contains("workers = 2\n\n[admin]\nlisten = \"127.0.0.1:9997\"\n\n[[listener]]"),
            "{w}"
        );
        assert!(
            w.contains(
                "listen = \"127.0.0.1:9999\"\n\
                 handshake_rate = { rate = 1000, burst = 200, max_wait = \"5000ms\" }\n\
                 max_connections_per_ip = 100000\n"
            ),
            "{w}"
        );
        assert!(
            w.contains(
                "pool = \"echo\"\nmax_tunnels_per_ip = 100000\n\
                 handshake_rate_per_ip = { rate = 1000000, burst = 1000000 }\n\
                 allowed_origins = [\"http://bench.localhost\"]\nwebsocket = "
            ),
            "{w}"
        );
        // Only the gate: nothing on the route.
        s.admission = Some(Admission {
            gate: Some(Gate {
                rate: 2.5,
                burst: 1,
                max_wait: Duration::from_millis(1500),
            }),
            ..Admission::default()
        });
        let w = wsgate_config(&s, addr);
        assert!(
            w.contains("rate = 2.5, burst = 1, max_wait = \"1500ms\""),
            "{w}"
        );
        assert!(w.contains("pool = \"echo\"\nwebsocket = "), "{w}");
        assert!(!w.contains("[admin]"), "{w}");
    }

    #[test]
    fn configs_name_backends_and_threads() {
        let addr: SocketAddr = "127.0.0.1:9999".parse().unwrap();
        let w = wsgate_config(&spec(Kind::Wsgate), addr);
        assert!(w.contains("workers = 2") && w.contains("127.0.0.1:1002"));
        assert!(w.contains("ping_interval = \"0s\""));
        let n = nginx_config(&spec(Kind::Nginx), addr, Path::new("/tmp/x"));
        assert!(n.contains("worker_processes 2;") && n.contains("least_conn;"));
        let h = haproxy_config(&spec(Kind::Haproxy), addr);
        assert!(h.contains("nbthread 2") && h.contains("balance leastconn"));
    }

    #[test]
    fn a_tls_listener_is_added_only_with_a_certificate() {
        let dir = std::env::temp_dir().join(format!("wsgate-bench-cfg-{}", std::process::id()));
        let tls = TlsSetup::generate(&dir).unwrap();
        let listen = Listen {
            addr: "127.0.0.1:9999".parse().unwrap(),
            tls_addr: Some("127.0.0.1:9998".parse().unwrap()),
        };
        let plain = Listen::from(listen.addr);
        let mut with = spec(Kind::Wsgate);
        with.tls = Some(tls.clone());
        let without = spec(Kind::Wsgate);

        let w = wsgate_config(&with, listen);
        assert!(
            w.contains("listen = \"127.0.0.1:9998\"\ntls = { certs = [ { cert = "),
            "{w}"
        );
        assert!(w.contains(&tls.key.display().to_string()));
        // A spec without a certificate gets no TLS listener, and neither does a
        // plain-only address.
        assert!(!wsgate_config(&without, listen).contains("9998"));
        assert!(!wsgate_config(&with, plain).contains("tls"));

        let n = nginx_config(&with, listen, Path::new("/tmp/x"));
        assert!(n.contains("listen 127.0.0.1:9998 ssl backlog=4096;"), "{n}");
        assert!(n.contains("ssl_certificate_key \""), "{n}");
        let h = haproxy_config(&with, listen);
        assert!(h.contains("bind 127.0.0.1:9998 ssl crt \""), "{h}");
        assert!(h.contains("bundle.pem\" alpn http/1.1"), "{h}");
        // HTTP/2 by ALPN only when asked for (idle_h2).
        with.h2 = true;
        let h = haproxy_config(&with, listen);
        assert!(h.contains("bundle.pem\" alpn h2,http/1.1"), "{h}");
        assert!(!haproxy_config(&with, plain).contains("alpn"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tls_listeners_speak_only_tls13_and_offer_h2_when_asked() {
        let dir =
            std::env::temp_dir().join(format!("wsgate-bench-tls13-cfg-{}", std::process::id()));
        let tls = TlsSetup::generate(&dir).unwrap();
        let listen = Listen {
            addr: "127.0.0.1:9999".parse().unwrap(),
            tls_addr: Some("127.0.0.1:9998".parse().unwrap()),
        };
        let plain = Listen::from(listen.addr);
        for h2 in [false, true] {
            let spec_of = |k| {
                let mut s = spec(k);
                s.tls = Some(tls.clone());
                s.h2 = h2;
                s
            };
            // wsgate: h2 and http/1.1 by ALPN either way (its default, said
            // out loud); it has no key for TLS versions (1.2 and 1.3): the
            // clients offer only 1.3.
            let w = wsgate_config(&spec_of(Kind::Wsgate), listen);
            assert!(
                w.contains("key = \"") && w.contains("\" } ] }\nalpn = [\"h2\", \"http/1.1\"]\n"),
                "{w}"
            );
            assert_eq!(w.matches("alpn").count(), 1, "{w}");
            // nginx: TLSv1.3 only, tickets on, `http2` on the TLS listen only with h2.
            let n = nginx_config(&spec_of(Kind::Nginx), listen, Path::new("nginx"));
            let want = if h2 {
                "listen 127.0.0.1:9998 ssl http2 backlog=4096;"
            } else {
                "listen 127.0.0.1:9998 ssl backlog=4096;"
            };
            assert!(n.contains(want), "{n}");
            assert!(n.contains("listen 127.0.0.1:9999 backlog=4096;"), "{n}");
            assert!(
                n.contains(
                    "        ssl_protocols TLSv1.3;\n        ssl_session_tickets on;\n        \
                     keepalive_requests 1000000;\n        location / {\n"
                ),
                "{n}"
            );
            // The TLS server is one of its own; the plain one is as before.
            assert_eq!(n.matches("    server {").count(), 2, "{n}");
            assert_eq!(n.matches("keepalive_requests").count(), 1, "{n}");
            assert_eq!(n.matches("http2").count(), usize::from(h2), "{n}");
            // HAProxy: ssl-min-ver on the TLS bind, h2 by ALPN only with h2.
            let h = haproxy_config(&spec_of(Kind::Haproxy), listen);
            let alpn = if h2 { "h2,http/1.1" } else { "http/1.1" };
            assert!(
                h.contains(&format!("bundle.pem\" alpn {alpn} ssl-min-ver TLSv1.3\n")),
                "{h}"
            );
            assert!(h.contains("    bind 127.0.0.1:9999\n"), "{h}");
            // No TLS listener, no TLS keys.
            assert!(!wsgate_config(&spec_of(Kind::Wsgate), plain).contains("alpn"));
            let n = nginx_config(&spec_of(Kind::Nginx), plain, Path::new("nginx"));
            assert!(!n.contains("ssl") && !n.contains("http2"), "{n}");
            assert!(!haproxy_config(&spec_of(Kind::Haproxy), plain).contains("ssl-min-ver"));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tls_backends_get_a_route_and_a_verified_pool_only_when_asked() {
        let addr: SocketAddr = "127.0.0.1:9999".parse().unwrap();
        let mut with = spec(Kind::Wsgate);
        with.tls_backends = Some(TlsBackends {
            addrs: [
                "127.0.0.1:2001".parse().unwrap(),
                "127.0.0.1:2002".parse().unwrap(),
            ],
            ca: PathBuf::from("tls/cert.pem"),
        });
        let w = wsgate_config(&with, addr);
        assert!(
            w.contains("path_prefix = \"/tls-backend\"\npool = \"echo_tls\""),
            "{w}"
        );
        assert!(
            w.contains("tls = { ca = \"tls/cert.pem\", server_name = \"localhost\" }"),
            "{w}"
        );
        assert!(w.contains("127.0.0.1:2002"), "{w}");
        for k in [Kind::Wsgate, Kind::Nginx, Kind::Haproxy] {
            let s = spec(k);
            assert!(!wsgate_config(&s, addr).contains("tls"));
            assert!(!nginx_config(&s, addr, Path::new("nginx")).contains("ssl"));
            assert!(!haproxy_config(&s, addr).contains("ssl"));
        }
        let n = nginx_config(&with, addr, Path::new("nginx"));
        assert!(n.contains("location /tls-backend {\n            proxy_pass https://echo_tls;\n            proxy_http_version 1.1;"), "{n}");
        assert!(n.contains("            proxy_ssl_verify on;\n"), "{n}");
        assert!(
            n.contains("            proxy_ssl_protocols TLSv1.3;\n"),
            "{n}"
        );
        assert!(n.contains("server 127.0.0.1:2001;"), "{n}");
        let h = haproxy_config(&with, addr);
        assert!(
            h.contains("use_backend echo_tls if { path_beg /tls-backend }"),
            "{h}"
        );
        assert!(
            h.contains("server t2 127.0.0.1:2002 ssl verify required ca-file \"tls/cert.pem\" sni str(localhost) verifyhost localhost\n"),
            "{h}"
        );
    }
}
