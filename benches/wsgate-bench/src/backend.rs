//! In-process echo backends: one port answers a plain `GET /` with 200 and
//! echoes every text/binary message of a WebSocket upgraded on it.
//!
//! HTTP is served by hyper; an upgrade request is answered with 101 here and
//! the raw stream (taken back with `Upgraded::downcast`) is handed to
//! tungstenite, so the echo path has no extra adapter layer.
//!
//! The soak (`soak/`) starts them with [`Options`]: a fixed port, a greeting
//! sent right after each 101 (so a client knows which backend it got), and
//! [`Backend::kill`], which stops accepting and drops every live connection at
//! once, as a crashed server would. [`start`] (the benchmark's backends) has
//! none of that and takes the same code path as before: no kill watch is
//! polled per message.
//!
//! [`start_tls`] starts one that speaks TLS (`idle_tls_backend`,
//! `wss16k_tls_backend`): each connection is accepted by rustls first, noted
//! in a [`TlsLog`] (what the proxy negotiated toward the backend), then
//! served as above over the TLS stream.
//!
//! The `storm` scenario's backends ([`start_logged`]) note the moment of every
//! 101 they answer in an [`UpgradeLog`], to show how a reconnect storm reaches
//! them; the other backends log nothing.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// Longest a backend WebSocket waits for the next message before giving up.
const WS_IDLE_LIMIT: Duration = Duration::from_secs(3600);
/// Longest an echo reply may take to be written.
const SEND_LIMIT: Duration = Duration::from_secs(60);
/// Longest an upgrade waits for hyper to hand over the connection.
const UPGRADE_LIMIT: Duration = Duration::from_secs(10);
const HTTP_BODY: &[u8] = b"ok\n";

/// How a backend is started; the default is what [`start`] does.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Port on 127.0.0.1; 0 = any free port.
    pub port: u16,
    /// Text message sent on every WebSocket right after its 101.
    pub greeting: Option<String>,
    /// Connections watch for [`Backend::kill`]. Off for the benchmark, whose
    /// echo loop then polls nothing else.
    pub killable: bool,
    /// TLS in front of everything (a rustls acceptor with this config).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Every 101 answered is noted here (`storm`).
    pub upgrade_log: Option<Arc<UpgradeLog>>,
    /// Every TLS session accepted is noted here (`wss16k_tls_backend`).
    pub tls_log: Option<Arc<TlsLog>>,
}

/// What the TLS sessions a TLS backend accepted negotiated, shared by the
/// TLS backends of a run: counts by `TLSv1_3 TLS13_AES_256_GCM_SHA384
/// X25519`, and how many were resumed.
#[derive(Debug, Default)]
pub struct TlsLog {
    seen: Mutex<(BTreeMap<String, u64>, u64)>,
}

impl TlsLog {
    fn note(&self, c: &rustls::ServerConnection) {
        let mut g = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        *g.0.entry(crate::tls::Negotiated::of_server(c).summary())
            .or_default() += 1;
        if c.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            g.1 += 1;
        }
    }

    /// The sessions noted so far and how many were resumed; the log is empty afterwards.
    pub fn take(&self) -> (BTreeMap<String, u64>, u64) {
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// When a backend answered its upgrades with 101, shared by the backends of
/// one storm.
#[derive(Debug, Default)]
pub struct UpgradeLog {
    times: Mutex<Vec<Instant>>,
}

impl UpgradeLog {
    fn note(&self, at: Instant) {
        self.times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(at);
    }

    /// The moments noted so far, sorted; the log is empty afterwards.
    pub fn take(&self) -> Vec<Instant> {
        let mut v = std::mem::take(&mut *self.times.lock().unwrap_or_else(|p| p.into_inner()));
        v.sort_unstable();
        v
    }
}

/// How [`Backend::kill`] drops the live connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kill {
    /// close(): the peer reads a FIN.
    Fin,
    /// SO_LINGER 0, then close(): the peer gets a TCP reset.
    Rst,
}

/// A running echo backend; stops accepting when dropped (live connections
/// then go on until they end).
pub struct Backend {
    pub addr: SocketAddr,
    live: Arc<AtomicUsize>,
    accept_task: JoinHandle<()>,
    /// Set once by `kill`; every connection task of a killable backend waits on it.
    kill_tx: watch::Sender<Option<Kill>>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl Backend {
    /// Sockets (HTTP connections and WebSocket sessions) the backend holds now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Stops accepting and drops every live connection (HTTP or WebSocket)
    /// the way `how` says. Only connections of a backend started with
    /// `killable` see it; the tasks end as soon as they are next polled.
    pub fn kill(self, how: Kill) {
        self.accept_task.abort();
        let _ = self.kill_tx.send(Some(how));
    }
}

/// Resolves once the backend is killed; never if it is dropped instead.
async fn killed(rx: &mut watch::Receiver<Option<Kill>>) -> Kill {
    let how = match rx.wait_for(Option::is_some).await {
        Ok(v) => *v,
        Err(_) => None,
    };
    match how {
        Some(how) => how,
        None => std::future::pending().await,
    }
}

/// Sets SO_LINGER 0 so that the coming close() sends a reset.
fn linger_zero(fd: RawFd) {
    // SAFETY: the caller still owns the socket behind `fd` (it is closed only
    // after this returns), so the borrowed descriptor is valid here.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
}

/// Counts a live socket while held.
struct LiveGuard(Arc<AtomicUsize>);

impl LiveGuard {
    fn new(c: &Arc<AtomicUsize>) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        LiveGuard(c.clone())
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

/// Binds 127.0.0.1:0 and serves until dropped.
pub async fn start() -> std::io::Result<Backend> {
    start_with(Options::default()).await
}

/// Binds 127.0.0.1:0 and serves over TLS with `tls` until dropped, noting
/// every TLS session in `log`.
pub async fn start_tls(
    tls: Arc<rustls::ServerConfig>,
    log: Arc<TlsLog>,
) -> std::io::Result<Backend> {
    start_with(Options {
        tls: Some(tls),
        tls_log: Some(log),
        ..Options::default()
    })
    .await
}

/// Binds 127.0.0.1:0 and serves until dropped, noting every 101 in `log`.
pub async fn start_logged(log: Arc<UpgradeLog>) -> std::io::Result<Backend> {
    start_with(Options {
        upgrade_log: Some(log),
        ..Options::default()
    })
    .await
}

/// Binds 127.0.0.1:`opts.port` and serves until dropped or killed.
pub async fn start_with(opts: Options) -> std::io::Result<Backend> {
    // A deep backlog: the idle scenario opens hundreds of connections at once.
    // SO_REUSEADDR also lets a killed soak backend bind its port again while
    // its old connections sit in TIME_WAIT.
    let sock = TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind(SocketAddr::from(([127, 0, 0, 1], opts.port)))?;
    let listener: TcpListener = sock.listen(4096)?;
    let addr = listener.local_addr()?;
    let live = Arc::new(AtomicUsize::new(0));
    let live2 = live.clone();
    let (kill_tx, kill_rx) = watch::channel(None);
    let conn_opts = ConnOpts {
        greeting: opts.greeting.map(Arc::from),
        kill: opts.killable.then_some(kill_rx),
        upgrade_log: opts.upgrade_log,
    };
    let acceptor = opts.tls.map(tokio_rustls::TlsAcceptor::from);
    let tls_log = opts.tls_log;
    let accept_task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    eprintln!("backend {addr}: accept error: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let live = live2.clone();
            match &acceptor {
                None => {
                    tokio::spawn(serve_conn(stream, live, conn_opts.clone()));
                }
                Some(acceptor) => {
                    let accept = acceptor.accept(stream);
                    let conn_opts = conn_opts.clone();
                    let tls_log = tls_log.clone();
                    tokio::spawn(async move {
                        // A failed or stalled TLS handshake just ends the connection.
                        if let Ok(Ok(tls)) = timeout(UPGRADE_LIMIT, accept).await {
                            if let Some(log) = &tls_log {
                                log.note(tls.get_ref().1);
                            }
                            serve_conn(tls, live, conn_opts).await;
                        }
                    });
                }
            }
        }
    });
    Ok(Backend {
        addr,
        live,
        accept_task,
        kill_tx,
    })
}

/// What every connection of one backend shares.
#[derive(Clone)]
struct ConnOpts {
    greeting: Option<Arc<str>>,
    kill: Option<watch::Receiver<Option<Kill>>>,
    upgrade_log: Option<Arc<UpgradeLog>>,
}

/// Serves one connection: a `TcpStream`, or a TLS stream over one.
async fn serve_conn<I>(stream: I, live: Arc<AtomicUsize>, opts: ConnOpts)
where
    I: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + 'static,
{
    let _guard = LiveGuard::new(&live);
    let fd = stream.as_raw_fd();
    let mut kill = opts.kill.clone();
    let svc = service_fn(move |req| handle::<I>(req, live.clone(), opts.clone()));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(120))
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    // Errors here are client resets and timeouts: nothing to report.
    match &mut kill {
        None => {
            let _ = conn.await;
        }
        Some(rx) => {
            // Pinned here, so the socket is still open when the reset is armed.
            tokio::pin!(conn);
            tokio::select! {
                _ = &mut conn => {}
                how = killed(rx) => {
                    if how == Kill::Rst {
                        linger_zero(fd);
                    }
                }
            }
        }
    }
}

fn is_ws_upgrade(req: &Request<Incoming>) -> bool {
    let has_token = |name, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    has_token(UPGRADE, "websocket") && has_token(CONNECTION, "upgrade")
}

async fn handle<I>(
    mut req: Request<Incoming>,
    live: Arc<AtomicUsize>,
    opts: ConnOpts,
) -> Result<Response<Full<Bytes>>, Infallible>
where
    I: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + 'static,
{
    if !is_ws_upgrade(&req) {
        let mut resp = Response::new(Full::new(Bytes::from_static(HTTP_BODY)));
        resp.headers_mut()
            .insert("content-type", HeaderValue::from_static("text/plain"));
        return Ok(resp);
    }
    let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY) else {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"missing key\n")));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(resp);
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let guard = LiveGuard::new(&live);
    let upgrade_log = opts.upgrade_log.clone();
    tokio::spawn(async move {
        let _guard = guard;
        let upgraded = match timeout(UPGRADE_LIMIT, on_upgrade).await {
            Ok(Ok(u)) => u,
            _ => return,
        };
        match upgraded.downcast::<TokioIo<I>>() {
            Ok(parts) => {
                let mut ws = WebSocketStream::from_partially_read(
                    parts.io.into_inner(),
                    parts.read_buf.to_vec(),
                    Role::Server,
                    Some(ws_config()),
                )
                .await;
                if !greet(&mut ws, opts.greeting.as_deref()).await {
                    return;
                }
                match opts.kill {
                    None => echo(ws).await,
                    Some(mut rx) => {
                        if echo_until_killed(&mut ws, &mut rx).await == Some(Kill::Rst) {
                            // The socket closes when `ws` drops, right after.
                            linger_zero(ws.get_ref().as_raw_fd());
                        }
                    }
                }
            }
            Err(upgraded) => {
                // Not reached with hyper's plain TCP server; kept so that an
                // unexpected wrapper still echoes (a kill then sends a FIN).
                let mut ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(ws_config()),
                )
                .await;
                if !greet(&mut ws, opts.greeting.as_deref()).await {
                    return;
                }
                match opts.kill {
                    None => echo(ws).await,
                    Some(mut rx) => {
                        echo_until_killed(&mut ws, &mut rx).await;
                    }
                }
            }
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(log) = &upgrade_log {
        log.note(Instant::now());
    }
    Ok(resp)
}

/// Sends the greeting, if any; false when the client is already gone.
async fn greet<S>(ws: &mut WebSocketStream<S>, greeting: Option<&str>) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match greeting {
        None => true,
        Some(g) => matches!(
            timeout(SEND_LIMIT, ws.send(Message::text(g))).await,
            Ok(Ok(()))
        ),
    }
}

/// The echo loop of a killable backend: returns `Some(how)` when the backend
/// is killed (the caller then drops the socket), `None` when the session ends.
async fn echo_until_killed<S>(
    ws: &mut WebSocketStream<S>,
    rx: &mut watch::Receiver<Option<Kill>>,
) -> Option<Kill>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let kill = killed(rx);
    tokio::pin!(kill);
    loop {
        let msg = tokio::select! {
            how = &mut kill => return Some(how),
            m = timeout(WS_IDLE_LIMIT, ws.next()) => match m {
                Ok(Some(Ok(m))) => m,
                _ => return None,
            },
        };
        if matches!(msg, Message::Binary(_) | Message::Text(_)) {
            tokio::select! {
                how = &mut kill => return Some(how),
                r = timeout(SEND_LIMIT, ws.send(msg)) => {
                    if !matches!(r, Ok(Ok(()))) {
                        return None;
                    }
                }
            }
        }
    }
}

async fn echo<S>(mut ws: WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let msg = match timeout(WS_IDLE_LIMIT, ws.next()).await {
            Ok(Some(Ok(m))) => m,
            // Closed, errored or idle for an hour.
            _ => return,
        };
        // tungstenite answers pings and close frames itself; the next read
        // flushes the reply and then reports the end.
        if matches!(msg, Message::Binary(_) | Message::Text(_))
            && !matches!(timeout(SEND_LIMIT, ws.send(msg)).await, Ok(Ok(())))
        {
            return;
        }
    }
}
