//! TLS toward backends: HTTP (one pooled TLS connection for many requests), WebSockets and health checks
//! over TLS; a refused certificate (unknown CA, another name, a missing client certificate) as a connect
//! failure of that backend; `verify = false`; the keep-alive pool keyed by address and TLS client; CA
//! files re-read on reload; session resumption. Certificates are made by the test with rcgen; the TLS
//! backends are `TestBackend`'s service behind a rustls acceptor.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use crate::common::*;
use crate::tunnel_support::wait_metric;
use futures_util::SinkExt;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use wsgate::{BackendStatus, Config, Gateway};

/// A test certificate authority.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new() -> Ca {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // A name of its own: a certificate is matched to its issuer by name before its signature is.
        let name = format!("wsgate backend test CA {}", fastrand::u64(..));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("CA cert");
        Ca {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate for `names` (DNS names or IP addresses) signed by this CA.
    fn issue(&self, names: &[&str]) -> Leaf {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params(names)
            .signed_by(&key, &self.issuer)
            .expect("leaf cert");
        Leaf::new(cert, key)
    }
}

fn params(names: &[&str]) -> rcgen::CertificateParams {
    rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("leaf params")
}

/// A certificate and its key, as PEM text and as rustls takes them.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Leaf {
    fn new(cert: rcgen::Certificate, key: rcgen::KeyPair) -> Leaf {
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    /// A certificate for `names` that signs itself.
    fn self_signed(names: &[&str]) -> Leaf {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params(names).self_signed(&key).expect("cert");
        Leaf::new(cert, key)
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::try_from(self.key_der.clone()).expect("a PKCS#8 key")
    }
}

/// Test files in a temp folder of their own, removed when dropped.
struct Files(PathBuf);

impl Files {
    fn new() -> Files {
        let dir = std::env::temp_dir().join(format!(
            "wsgate-backend-tls-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Files(dir)
    }

    /// Writes `text` to `name`; returns the path as a TOML string.
    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write");
        format!("{:?}", path.display().to_string())
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a TLS backend saw of one handshake.
#[derive(Debug, Clone)]
struct Handshake {
    sni: Option<String>,
    alpn: Option<Vec<u8>>,
    resumed: bool,
    client_cert: bool,
}

/// A backend on 127.0.0.1 speaking TLS with `leaf`, serving `TestBackend`'s service (HTTP answers with
/// its name, WebSockets echo). With `client_ca`, it requires a client certificate signed by it.
struct TlsBackend {
    addr: SocketAddr,
    /// TCP connections accepted, whether their handshake succeeds or not.
    accepts: Arc<AtomicUsize>,
    handshakes: Arc<Mutex<Vec<Handshake>>>,
    /// How each served connection ended: whether wsgate sent a `close_notify`.
    ends: Arc<Mutex<Vec<bool>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsBackend {
    async fn start(name: &str, leaf: &Leaf, client_ca: Option<&Ca>) -> TlsBackend {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("versions");
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.der.clone()).expect("client CA");
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(vec![leaf.der.clone()], leaf.key())
            .expect("server config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepts = Arc::new(AtomicUsize::new(0));
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let ends = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (counter, log, ended, requests) = (
            Arc::clone(&accepts),
            Arc::clone(&handshakes),
            Arc::clone(&ends),
            Arc::clone(&seen),
        );
        let name = name.to_string();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                counter.fetch_add(1, Ordering::SeqCst);
                let (acceptor, log, ended, requests, name) = (
                    acceptor.clone(),
                    Arc::clone(&log),
                    Arc::clone(&ended),
                    Arc::clone(&requests),
                    name.clone(),
                );
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let session = tls.get_ref().1;
                    log.lock().expect("lock").push(Handshake {
                        sni: session.server_name().map(str::to_string),
                        alpn: session.alpn_protocol().map(<[u8]>::to_vec),
                        resumed: session.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
                        client_cert: session.peer_certificates().is_some(),
                    });
                    let close_notify = Arc::new(AtomicBool::new(false));
                    let watched = Watched {
                        inner: tls,
                        close_notify: Arc::clone(&close_notify),
                    };
                    let _ = serve_test_backend(watched, name, requests).await;
                    ended
                        .lock()
                        .expect("lock")
                        .push(close_notify.load(Ordering::SeqCst));
                });
            }
        });
        TlsBackend {
            addr,
            accepts,
            handshakes,
            ends,
            seen,
            task,
        }
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    fn handshakes(&self) -> Vec<Handshake> {
        self.handshakes.lock().expect("lock").clone()
    }

    fn ends(&self) -> Vec<bool> {
        self.ends.lock().expect("lock").clone()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TLS backend's session, noting whether the peer ended it with a `close_notify`: only then does a
/// read give a clean end of stream (a bare TCP FIN is an `UnexpectedEof` error).
struct Watched<S> {
    inner: S,
    close_notify: Arc<AtomicBool>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = ready!(Pin::new(&mut self.inner).poll_read(cx, buf));
        if read.is_ok() && buf.filled().len() == before && buf.remaining() > 0 {
            self.close_notify.store(true, Ordering::SeqCst);
        }
        Poll::Ready(read)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A config of one listener `main` and one route `/` to pool `p`, then `pools` (the `[pool.p]` section
/// and any other).
fn config(pools: &str) -> String {
    format!(
        "[[listener]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n\n[[route]]\nname = \"main\"\n\
         pool = \"p\"\n\n{pools}"
    )
}

/// A CA in a file wsgate is told to trust, for backends that prove the name `localhost`.
struct Trust {
    files: Files,
    ca: Ca,
    /// The CA file's path, as a TOML string.
    ca_file: String,
}

impl Trust {
    fn new() -> Trust {
        let (files, ca) = (Files::new(), Ca::new());
        let ca_file = files.write("ca.pem", &ca.pem);
        Trust { files, ca, ca_file }
    }

    /// A TLS backend with a certificate for `localhost` from this CA.
    async fn backend(&self, name: &str) -> TlsBackend {
        TlsBackend::start(name, &self.ca.issue(&["localhost"]), None).await
    }

    /// The config of pool `p` of `backends` over TLS, trusting this CA and checking the name
    /// `localhost`; `extra`: more lines of the pool.
    fn config(&self, backends: &[SocketAddr], extra: &str) -> String {
        let backends: Vec<String> = backends
            .iter()
            .map(|a| format!("{{ addr = \"{a}\" }}"))
            .collect();
        config(&format!(
            "[pool.p]\ntls = {{ ca = {}, server_name = \"localhost\" }}\n{extra}backends = [ {} ]\n",
            self.ca_file,
            backends.join(", ")
        ))
    }
}

/// `GET /` through the gateway: the status and the body.
async fn get(addr: SocketAddr) -> (u16, String) {
    let (status, _, body) = http_get(addr, "/").await;
    (status.as_u16(), String::from_utf8_lossy(&body).into_owned())
}

/// Sends a binary message of each length on `ws` and checks that it comes back.
async fn echoes(ws: &mut Client, lens: &[usize]) {
    for &len in lens {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        within("send", ws.send(Message::binary(data.clone())))
            .await
            .expect("send");
        assert_eq!(next_message(ws).await, Message::binary(data));
    }
}

/// Opens a WebSocket through the gateway and checks that a small and a large message come back.
async fn echo_works(addr: SocketAddr) {
    let mut ws = ws_connect(addr, "/ws").await;
    echoes(&mut ws, &[5, 1 << 20]).await;
    within("close", ws.close(None)).await.expect("close");
}

/// The answer to a WebSocket upgrade through the gateway.
async fn upgrade_status(addr: SocketAddr) -> u16 {
    raw_exchange(addr, upgrade_request(addr, "/ws", "").as_bytes())
        .await
        .status
}

fn status_of(gateway: &Gateway, addr: SocketAddr) -> BackendStatus {
    let addr = addr.to_string();
    gateway
        .backends()
        .into_iter()
        .find(|b| b.addr == addr)
        .expect("a backend with that address")
}

/// Waits (within the tests' bound) until `condition` holds.
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn http_through_a_tls_pool_reuses_one_tls_connection() {
    let trust = Trust::new();
    let backend = trust.backend("tls1").await;
    let (gw, addr) = gateway(&trust.config(&[backend.addr], "")).await;
    for _ in 0..3 {
        assert_eq!(get(addr).await, (200, "hello from tls1".to_string()));
    }
    assert_eq!(backend.seen().len(), 3);
    assert_eq!(
        backend.accepts(),
        1,
        "three requests, one after the other, on one pooled TLS connection"
    );
    let handshakes = backend.handshakes();
    assert_eq!(handshakes.len(), 1);
    assert_eq!(handshakes[0].sni.as_deref(), Some("localhost"));
    assert_eq!(handshakes[0].alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert!(!handshakes[0].client_cert);
    // Shutdown closes the idle pooled connection, with a `close_notify`.
    gw.shutdown().await;
    until("the backend to see its connection end", || {
        !backend.ends().is_empty()
    })
    .await;
    assert_eq!(backend.ends(), [true], "closed with a close_notify");
}

#[tokio::test]
async fn without_server_name_the_address_host_is_checked_and_an_ip_against_ip_addresses() {
    let Trust { ca, ca_file, .. } = &Trust::new();
    let pool = |backend: SocketAddr| {
        config(&format!(
            "[pool.p]\ntls = {{ ca = {ca_file} }}\nbackends = [ {{ addr = \"{backend}\" }} ]\n"
        ))
    };
    // The address is 127.0.0.1: a certificate holding that IP address passes, and no SNI is sent.
    let by_ip = TlsBackend::start("by-ip", &ca.issue(&["127.0.0.1"]), None).await;
    let (gw, addr) = gateway(&pool(by_ip.addr)).await;
    assert_eq!(get(addr).await, (200, "hello from by-ip".to_string()));
    assert_eq!(by_ip.handshakes()[0].sni, None);
    gw.shutdown().await;
    // A certificate for `localhost` alone does not.
    let by_name = TlsBackend::start("by-name", &ca.issue(&["localhost"]), None).await;
    let (gw, addr) = gateway(&pool(by_name.addr)).await;
    assert_eq!(get(addr).await.0, 502);
    assert!(by_name.seen().is_empty());
    gw.shutdown().await;
}

#[tokio::test]
async fn websocket_echo_over_a_tls_backend() {
    let trust = Trust::new();
    let backend = trust.backend("tls1").await;
    let (gw, addr) = gateway(&trust.config(&[backend.addr], "")).await;
    let mut ws = ws_connect(addr, "/chat?room=1").await;
    echoes(&mut ws, &[10, 70_000, 1 << 20]).await;
    within("send", ws.send(Message::text("over TLS")))
        .await
        .expect("send");
    assert_eq!(next_message(&mut ws).await, Message::text("over TLS"));
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target, "/chat?room=1");
    assert_eq!(
        gw.buffers_in_use(),
        0,
        "an idle tunnel to a TLS backend holds no read buffer"
    );
    assert_eq!(
        backend.handshakes()[0].alpn.as_deref(),
        Some(&b"http/1.1"[..])
    );
    within("close", ws.close(None)).await.expect("close");
    gw.shutdown().await;
}

/// A quiet tunnel to a TLS backend parks with its session (wsgate's record layer over the socket) and
/// comes back for each message, both ways, and for the closing handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_to_a_tls_backend_parks_with_its_session() {
    let trust = Trust::new();
    let backend = trust.backend("tls1").await;
    let text = trust.config(&[backend.addr], "").replace(
        "pool = \"p\"\n",
        "pool = \"p\"\nwebsocket = { ping_interval = \"0s\", park_after = \"200ms\" }\n",
    );
    let (gw, addr) = gateway(&text).await;
    let mut ws = ws_connect(addr, "/ws").await;
    for lens in [&[10][..], &[70_000, 5], &[1 << 20]] {
        wait_metric(&gw, "wsgate_ws_tunnels_parked 1").await;
        echoes(&mut ws, lens).await;
    }
    wait_metric(&gw, "wsgate_ws_tunnels_parked 1").await;
    // The closing handshake from the park: the backend's answer comes back.
    within("close", ws.close(None)).await.expect("close");
    while let Some(Ok(message)) = within(
        "the backend's Close",
        futures_util::StreamExt::next(&mut ws),
    )
    .await
    {
        assert!(matches!(message, Message::Close(_)), "{message:?}");
    }
    wait_metric(&gw, "wsgate_ws_tunnels_parked 0").await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_pools_connections_resume_its_tls_session() {
    let trust = Trust::new();
    let backend = trust.backend("tls1").await;
    let (gw, addr) = gateway(&trust.config(&[backend.addr], "")).await;
    // Every upgrade opens a connection of its own: the second resumes the first one's session.
    echo_works(addr).await;
    echo_works(addr).await;
    let resumed: Vec<bool> = backend.handshakes().iter().map(|h| h.resumed).collect();
    assert_eq!(resumed, [false, true]);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_backend_with_an_unknown_ca_is_a_connect_failure_counted_against_it() {
    let trust = Trust::new();
    let good = trust.backend("good").await;
    let bad = TlsBackend::start("bad", &Ca::new().issue(&["localhost"]), None).await;
    let extra = "max_fails = 2\nfail_timeout = \"1h\"\n";
    let (gw, addr) = gateway(&trust.config(&[good.addr, bad.addr], extra)).await;
    // A live tunnel on the good backend: least-connections then tries the bad one first, every time,
    // until it is ejected.
    let mut ws = ws_connect(addr, "/ws").await;
    assert!(
        !good.seen().is_empty(),
        "the tunnel went to the good backend"
    );
    for _ in 0..2 {
        assert_eq!(get(addr).await, (200, "hello from good".to_string()));
    }
    let status = status_of(&gw, bad.addr);
    assert!(
        status.ejected && !status.available,
        "after max_fails refused handshakes: {status:?}"
    );
    assert!(status_of(&gw, good.addr).available);
    let tried = bad.accepts();
    assert!(tried >= 2, "the bad backend was tried {tried} times");
    assert!(bad.seen().is_empty(), "no request reached it");
    for _ in 0..3 {
        assert_eq!(get(addr).await, (200, "hello from good".to_string()));
    }
    assert_eq!(bad.accepts(), tried, "an ejected backend is not tried");
    within("send", ws.send(Message::text("still here")))
        .await
        .expect("send");
    assert_eq!(next_message(&mut ws).await, Message::text("still here"));
    gw.shutdown().await;
}

#[tokio::test]
async fn with_only_an_untrusted_backend_the_client_gets_502() {
    let trust = Trust::new();
    let bad = TlsBackend::start("bad", &Ca::new().issue(&["localhost"]), None).await;
    let (gw, addr) = gateway(&trust.config(&[bad.addr], "max_fails = 0\n")).await;
    let (status, body) = get(addr).await;
    assert_eq!((status, body.as_str()), (502, "backend unreachable\n"));
    assert_eq!(upgrade_status(addr).await, 502);
    assert_eq!(bad.accepts(), 2);
    assert!(bad.seen().is_empty());
    gw.shutdown().await;
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused() {
    let files = Files::new();
    let ca = Ca::new();
    let backend = TlsBackend::start("other", &ca.issue(&["other.test"]), None).await;
    let ca_file = files.write("ca.pem", &ca.pem);
    let text = |name: &str| {
        config(&format!(
            "[pool.p]\ntls = {{ ca = {ca_file}, server_name = \"{name}\" }}\n\
             backends = [ {{ addr = \"{}\" }} ]\n",
            backend.addr
        ))
    };
    let (gw, addr) = gateway(&text("localhost")).await;
    assert_eq!(get(addr).await.0, 502);
    assert_eq!(upgrade_status(addr).await, 502);
    gw.shutdown().await;
    assert!(backend.seen().is_empty());
    // The name the certificate holds passes, and is what is sent as SNI.
    let (gw, addr) = gateway(&text("other.test")).await;
    assert_eq!(get(addr).await, (200, "hello from other".to_string()));
    let last = backend.handshakes().pop().expect("a handshake");
    assert_eq!(last.sni.as_deref(), Some("other.test"));
    gw.shutdown().await;
}

#[tokio::test]
async fn mutual_tls_works_with_a_client_certificate_and_is_refused_without() {
    let files = Files::new();
    let (ca, clients_ca, stranger) = (Ca::new(), Ca::new(), Ca::new());
    let backend = TlsBackend::start("mtls", &ca.issue(&["localhost"]), Some(&clients_ca)).await;
    let ca_file = files.write("ca.pem", &ca.pem);
    let own = clients_ca.issue(&["wsgate.test"]);
    let foreign = stranger.issue(&["wsgate.test"]);
    let (own_cert, own_key) = (
        files.write("own.pem", &own.cert_pem),
        files.write("own.key", &own.key_pem),
    );
    let (foreign_cert, foreign_key) = (
        files.write("foreign.pem", &foreign.cert_pem),
        files.write("foreign.key", &foreign.key_pem),
    );
    let text = |client_cert: &str| {
        config(&format!(
            "[pool.p]\ntls = {{ ca = {ca_file}, server_name = \"localhost\"{client_cert} }}\n\
             max_fails = 0\nbackends = [ {{ addr = \"{}\" }} ]\n",
            backend.addr
        ))
    };

    let with = format!(", client_cert = {{ cert = {own_cert}, key = {own_key} }}");
    let (gw, addr) = gateway(&text(&with)).await;
    assert_eq!(get(addr).await, (200, "hello from mtls".to_string()));
    echo_works(addr).await;
    assert!(backend.handshakes().iter().all(|h| h.client_cert));
    gw.shutdown().await;
    let served = backend.seen().len();

    // Under TLS 1.3 the backend refuses a missing or foreign certificate after the client's side of the
    // handshake is done: the refusal reaches wsgate with its request, still a 502.
    let (gw, addr) = gateway(&text("")).await;
    assert_eq!(get(addr).await.0, 502);
    assert_eq!(upgrade_status(addr).await, 502);
    gw.shutdown().await;
    let with = format!(", client_cert = {{ cert = {foreign_cert}, key = {foreign_key} }}");
    let (gw, addr) = gateway(&text(&with)).await;
    assert_eq!(get(addr).await.0, 502);
    assert_eq!(upgrade_status(addr).await, 502);
    gw.shutdown().await;
    assert_eq!(
        backend.seen().len(),
        served,
        "no refused request was served"
    );
}

#[tokio::test]
async fn verify_false_accepts_a_self_signed_certificate() {
    let backend = TlsBackend::start("self", &Leaf::self_signed(&["self.test"]), None).await;
    let text = |tls: &str| {
        config(&format!(
            "[pool.p]\ntls = {tls}\nmax_fails = 0\nbackends = [ {{ addr = \"{}\" }} ]\n",
            backend.addr
        ))
    };
    let (gw, addr) = gateway(&text("{ verify = false }")).await;
    assert_eq!(get(addr).await, (200, "hello from self".to_string()));
    echo_works(addr).await;
    gw.shutdown().await;
    // With the default trust (the webpki roots) the same certificate is refused.
    let (gw, addr) = gateway(&text("{ server_name = \"self.test\" }")).await;
    assert_eq!(get(addr).await.0, 502);
    gw.shutdown().await;
}

#[tokio::test]
async fn health_checks_over_tls_keep_trusted_backends_up_and_take_untrusted_ones_down() {
    let trust = Trust::new();
    let stranger = Ca::new();
    let good = trust.backend("good").await;
    let bad = TlsBackend::start("bad", &stranger.issue(&["localhost"]), None).await;
    let ws_good = trust.backend("ws-good").await;
    let ws_bad = TlsBackend::start("ws-bad", &stranger.issue(&["localhost"]), None).await;
    let tls = format!(
        "tls = {{ ca = {}, server_name = \"localhost\" }}",
        trust.ca_file
    );
    let health = "interval = \"50ms\", timeout = \"2s\", rise = 1, fall = 2";
    let text = config(&format!(
        "[pool.p]\n{tls}\nhealth = {{ path = \"/healthz\", {health} }}\n\
         backends = [ {{ addr = \"{}\" }}, {{ addr = \"{}\" }} ]\n\n\
         [pool.w]\n{tls}\nhealth = {{ path = \"/ws-health\", websocket = true, {health} }}\n\
         backends = [ {{ addr = \"{}\" }}, {{ addr = \"{}\" }} ]\n",
        good.addr, bad.addr, ws_good.addr, ws_bad.addr
    ));
    let (gw, _) = gateway(&text).await;
    until("the untrusted backends to go down", || {
        !status_of(&gw, bad.addr).healthy && !status_of(&gw, ws_bad.addr).healthy
    })
    .await;
    // By then each trusted backend has passed checks over TLS (a GET, an upgrade), and is up.
    until("checks to reach the trusted backends", || {
        good.seen().len() >= 2 && ws_good.seen().len() >= 2
    })
    .await;
    assert!(status_of(&gw, good.addr).healthy);
    assert!(status_of(&gw, ws_good.addr).healthy);
    let check = &good.seen()[0];
    assert_eq!(
        (check.method.as_str(), check.target.as_str()),
        ("GET", "/healthz")
    );
    assert_eq!(check.headers["user-agent"], "wsgate-health-check");
    let probe = &ws_good.seen()[0];
    assert_eq!(probe.target, "/ws-health");
    assert_eq!(probe.headers["upgrade"], "websocket");
    assert!(bad.seen().is_empty() && ws_bad.seen().is_empty());
    gw.shutdown().await;
}

#[tokio::test]
async fn the_keep_alive_pool_keys_connections_by_address_and_tls_client() {
    let files = Files::new();
    let ca = Ca::new();
    let backend = TlsBackend::start("tls1", &ca.issue(&["localhost", "127.0.0.1"]), None).await;
    let ca_file = files.write("ca.pem", &ca.pem);
    // Three pools name the same address: over TLS checked as `localhost`, over TLS checked as its IP
    // address (another TLS client), and plainly.
    let at = backend.addr;
    let text = format!(
        "[[listener]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n\n\
         [[route]]\nname = \"by-name\"\npath_prefix = \"/name\"\npool = \"by-name\"\n\n\
         [[route]]\nname = \"by-ip\"\npath_prefix = \"/ip\"\npool = \"by-ip\"\n\n\
         [[route]]\nname = \"plain\"\npath_prefix = \"/plain\"\npool = \"plain\"\n\n\
         [pool.by-name]\ntls = {{ ca = {ca_file}, server_name = \"localhost\" }}\nbackends = [ {{ addr = \"{at}\" }} ]\n\n\
         [pool.by-ip]\ntls = {{ ca = {ca_file} }}\nbackends = [ {{ addr = \"{at}\" }} ]\n\n\
         [pool.plain]\nbackends = [ {{ addr = \"{at}\" }} ]\n"
    );
    let (gw, addr) = gateway(&text).await;
    let status = |path: &'static str| async move { http_get(addr, path).await.0.as_u16() };
    assert_eq!(status("/name").await, 200);
    assert_eq!(backend.accepts(), 1);
    // Plain HTTP on the TLS backend's port fails: it did not get the pooled TLS connection.
    assert_eq!(status("/plain").await, 502);
    assert_eq!(backend.accepts(), 2);
    assert_eq!(status("/ip").await, 200);
    assert_eq!(
        backend.accepts(),
        3,
        "another TLS client, another connection"
    );
    assert_eq!(status("/name").await, 200);
    assert_eq!(status("/ip").await, 200);
    assert_eq!(
        backend.accepts(),
        3,
        "each TLS client reuses its own connection"
    );
    let names: Vec<Option<String>> = backend.handshakes().into_iter().map(|h| h.sni).collect();
    assert_eq!(names, [Some("localhost".to_string()), None]);
    gw.shutdown().await;
}

#[tokio::test]
async fn reload_rereads_the_ca_file() {
    let trust = Trust::new();
    let Trust { files, ca, .. } = &trust;
    let other = Ca::new();
    let backend = trust.backend("tls1").await;
    let text = trust.config(&[backend.addr], "max_fails = 0\n");
    let (gw, addr) = gateway(&text).await;
    let reload = || async {
        gw.reload(Config::from_toml(&text, "test.toml").expect("config"))
            .await
    };
    assert_eq!(get(addr).await.0, 200);
    echo_works(addr).await;

    // The CA file now holds another CA: new connections refuse the backend, the pooled one is not used.
    files.write("ca.pem", &other.pem);
    reload().await.expect("reload");
    let accepts = backend.accepts();
    assert_eq!(get(addr).await.0, 502);
    assert_eq!(upgrade_status(addr).await, 502);
    assert_eq!(
        backend.accepts(),
        accepts + 2,
        "each tried a new connection"
    );

    // The right CA again.
    files.write("ca.pem", &ca.pem);
    reload().await.expect("reload");
    assert_eq!(get(addr).await.0, 200);
    echo_works(addr).await;

    // A file that is no CA is refused with its place; the running config stays.
    files.write("ca.pem", "not a certificate");
    let error = reload().await.expect_err("refused").to_string();
    assert!(
        error.starts_with("test.toml:10: pool.p.tls.ca: ") && error.contains("ca.pem"),
        "{error}"
    );
    assert_eq!(get(addr).await.0, 200);
    echo_works(addr).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_missing_ca_or_client_certificate_stops_the_start_with_its_place() {
    let files = Files::new();
    let ca = Ca::new();
    let ca_file = files.write("ca.pem", &ca.pem);
    let missing = format!("{:?}", files.0.join("missing.pem").display().to_string());
    let start = |pool: String| async move {
        Gateway::start(Config::from_toml(&config(&pool), "test.toml").expect("config")).await
    };
    let error = start(format!(
        "[pool.p]\ntls = {{ ca = {missing} }}\nbackends = [ {{ addr = \"127.0.0.1:1\" }} ]\n"
    ))
    .await
    .err()
    .expect("refused")
    .to_string();
    assert!(
        error.starts_with("test.toml:10: pool.p.tls.ca: ")
            && error.contains("missing.pem: cannot read"),
        "{error}"
    );
    let error = start(format!(
        "[pool.p]\nbackends = [ {{ addr = \"127.0.0.1:1\",\n  \
         tls = {{ ca = {ca_file}, client_cert = {{ cert = {ca_file}, key = {missing} }} }} }} ]\n"
    ))
    .await
    .err()
    .expect("refused")
    .to_string();
    assert!(
        error.starts_with("test.toml:11: pool.p.backends[0].tls.client_cert: ")
            && error.contains("missing.pem: cannot read"),
        "{error}"
    );
}

/// What wsgate logs at `warn` and above on the test's thread: a `#[tokio::test]` runs the gateway's tasks
/// on that one thread, so its events go to the subscriber set there.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn lines(&self) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned();
        text.lines().map(str::to_string).collect()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

#[tokio::test]
async fn unverified_backends_are_logged_at_start_and_every_reload_and_refusals_say_why() {
    let logs = Logs::default();
    let _capture = logs.capture();
    let backend = TlsBackend::start("self", &Leaf::self_signed(&["self.test"]), None).await;
    let text = config(&format!(
        "[pool.p]\ntls = {{ verify = false }}\nbackends = [ {{ addr = \"{}\" }} ]\n",
        backend.addr
    ));
    let unverified = || {
        logs.lines()
            .into_iter()
            .filter(|l| l.contains("verification toward this backend is OFF"))
            .collect::<Vec<_>>()
    };
    let (gw, addr) = gateway(&text).await;
    let warned = unverified();
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(warned[0].contains("WARN"), "{}", warned[0]);
    assert!(
        warned[0].contains("pool=p") && warned[0].contains(&format!("backend={}", backend.addr)),
        "{}",
        warned[0]
    );
    gw.reload(Config::from_toml(&text, "test.toml").expect("config"))
        .await
        .expect("reload");
    assert_eq!(unverified().len(), 2, "logged again on reload");
    assert_eq!(get(addr).await.0, 200);
    gw.shutdown().await;

    // A refused certificate: the log names the backend and the check that failed.
    let text = config(&format!(
        "[pool.p]\ntls = {{ server_name = \"self.test\" }}\nbackends = [ {{ addr = \"{}\" }} ]\n",
        backend.addr
    ));
    let (gw, addr) = gateway(&text).await;
    assert_eq!(get(addr).await.0, 502);
    let refused: Vec<String> = logs
        .lines()
        .into_iter()
        .filter(|l| l.contains("backend connect failed"))
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains(&format!("backend={}", backend.addr))
            && refused[0].contains("invalid peer certificate: UnknownIssuer"),
        "{}",
        refused[0]
    );
    gw.shutdown().await;
}

/// A raw TLS backend at the byte level: `answer` is written to each upgrade request; then it reads on,
/// and reports whether its peer (wsgate) ended the session with a `close_notify` (a clean end of stream)
/// or a bare FIN (an `UnexpectedEof` error).
async fn raw_tls_backend(
    leaf: &Leaf,
    answer: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<bool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der.clone()], leaf.key())
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (ended, ends) = tokio::sync::mpsc::unbounded_channel();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, ended, answer) = (acceptor.clone(), ended.clone(), Arc::clone(&answer));
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (head, _) = read_head(&mut tls).await;
                let _ = tls.write_all(&answer(&head)).await;
                let _ = tls.flush().await;
                let mut rest = Vec::new();
                let clean = tls.read_to_end(&mut rest).await.is_ok();
                let _ = ended.send(clean);
            });
        }
    });
    (addr, ends)
}

/// wsgate ends its TLS sessions with backends in order too: after a refused upgrade (the connection is
/// not pooled), and at a tunnel's end.
#[tokio::test]
async fn tls_backends_get_close_notify_after_a_refusal_and_a_tunnels_end() {
    let trust = Trust::new();
    let leaf = trust.ca.issue(&["localhost"]);
    let (refusing, mut refusing_ends) = raw_tls_backend(&leaf, |_| {
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n".to_vec()
    })
    .await;
    let (gw, addr) = gateway(&trust.config(&[refusing], "")).await;
    assert_eq!(upgrade_status(addr).await, 403);
    let clean = within("the refusing backend's end", refusing_ends.recv()).await;
    assert_eq!(clean, Some(true), "close_notify after a refused upgrade");
    gw.shutdown().await;

    // A backend that switches, then sends its Close when the client's comes: after the closing
    // handshake, wsgate ends the session with the backend with a close_notify.
    let (switching, mut switching_ends) = raw_tls_backend(&leaf, |head| {
        let mut answer = crate::tunnel_support::switching_protocols_for(head).into_bytes();
        answer.extend([0x88, 0x02, 0x03, 0xe8]);
        answer
    })
    .await;
    let (gw, addr) = gateway(&trust.config(&[switching], "")).await;
    // The backend's Close (1000) came right behind its 101: the client answers it, and the tunnel ends.
    let mut ws = ws_connect(addr, "/ws").await;
    while let Some(Ok(_)) = within(
        "the backend's Close",
        futures_util::StreamExt::next(&mut ws),
    )
    .await
    {}
    let clean = within("the switching backend's end", switching_ends.recv()).await;
    assert_eq!(clean, Some(true), "close_notify at the tunnel's end");
    gw.shutdown().await;
}
