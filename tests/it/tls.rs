//! TLS termination: `wss://` end to end, SNI picking the certificate, certificate errors naming the file,
//! and certificates re-read on reload. Certificates are made by the test with rcgen.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use crate::tunnel_support::{OP_BINARY, OP_TEXT, RawPeer, WsBackend, wait_metric};
use futures_util::SinkExt;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wsgate::{Config, Gateway};

pub(crate) struct Pki {
    dir: PathBuf,
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_der: CertificateDer<'static>,
}

impl Pki {
    pub(crate) fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "wsgate-tls-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "wsgate test CA");
        let cert = params.self_signed(&key).expect("CA cert");
        let ca_der = cert.der().clone();
        Pki {
            dir,
            ca: rcgen::Issuer::new(params, key),
            ca_der,
        }
    }

    /// Writes a leaf certificate for `names` signed by the CA; returns (cert path, key path, DER).
    pub(crate) fn leaf(
        &self,
        file: &str,
        names: &[&str],
    ) -> (PathBuf, PathBuf, CertificateDer<'static>) {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        let cert = params.signed_by(&key, &self.ca).expect("leaf cert");
        let cert_path = self.dir.join(format!("{file}.pem"));
        let key_path = self.dir.join(format!("{file}.key"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path, cert.der().clone())
    }

    /// A client trusting this CA and offering ALPN `http/1.1`.
    pub(crate) fn connector(&self) -> TlsConnector {
        self.connector_offering(&[b"http/1.1"])
    }

    /// A client trusting this CA and offering `alpn`.
    fn connector_offering(&self, alpn: &[&[u8]]) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("CA into store");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|id| id.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn tls_config(backend: SocketAddr, certs: &[(&Path, &Path)]) -> String {
    let certs: Vec<String> = certs
        .iter()
        .map(|(c, k)| {
            format!(
                "{{ cert = {:?}, key = {:?} }}",
                c.display().to_string(),
                k.display().to_string()
            )
        })
        .collect();
    config_text(&[backend], "").replace(
        "listen = \"127.0.0.1:0\"",
        &format!(
            "listen = \"127.0.0.1:0\"\ntls = {{ certs = [ {} ] }}",
            certs.join(", ")
        ),
    )
}

async fn tls_connect(pki: &Pki, addr: SocketAddr, sni: &str) -> TlsStream<TcpStream> {
    let tcp = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    within("TLS handshake", pki.connector().connect(name, tcp))
        .await
        .expect("TLS handshake")
}

#[tokio::test]
async fn wss_works_end_to_end() {
    let pki = Pki::new();
    let (cert, key, _) = pki.leaf("site", &["site.test"]);
    let backend = TestBackend::start("b1").await;
    let (gateway, addr) = gateway(&tls_config(backend.addr, &[(&cert, &key)])).await;
    let tls = tls_connect(&pki, addr, "site.test").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let request = format!("wss://site.test:{}/chat?room=1", addr.port())
        .into_client_request()
        .expect("request");
    let (mut ws, _) = within("upgrade", tokio_tungstenite::client_async(request, tls))
        .await
        .expect("upgrade over TLS");
    for len in [10usize, 70_000, 1 << 20] {
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        within("send", ws.send(Message::binary(data.clone())))
            .await
            .expect("send");
        assert_eq!(next_message(&mut ws).await, Message::binary(data));
    }
    let seen = backend.seen();
    assert_eq!(seen[0].target, "/chat?room=1");
    assert_eq!(seen[0].headers["x-forwarded-proto"], "https");
    assert_eq!(
        gateway.buffers_in_use(),
        0,
        "an idle TLS tunnel holds no read buffer"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn sni_picks_exact_then_wildcard_then_first() {
    let pki = Pki::new();
    let (first, first_key, first_der) = pki.leaf("first", &["first.test"]);
    let (wild, wild_key, wild_der) = pki.leaf("wild", &["*.wild.test"]);
    let (exact, exact_key, exact_der) = pki.leaf("exact", &["a.wild.test"]);
    let backend = TestBackend::start("b1").await;
    let text = tls_config(
        backend.addr,
        &[
            (&first, &first_key),
            (&wild, &wild_key),
            (&exact, &exact_key),
        ],
    );
    let (gateway, addr) = gateway(&text).await;
    let presented =
        |tls: &TlsStream<TcpStream>| tls.get_ref().1.peer_certificates().map(|c| c[0].clone());
    assert_eq!(
        presented(&tls_connect(&pki, addr, "a.wild.test").await),
        Some(exact_der)
    );
    assert_eq!(
        presented(&tls_connect(&pki, addr, "b.wild.test").await),
        Some(wild_der)
    );
    assert_eq!(
        presented(&tls_connect(&pki, addr, "first.test").await),
        Some(first_der.clone())
    );
    // An unknown name gets the first certificate, which the client then rejects as not matching.
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("unknown.test".to_string()).expect("name");
    assert!(
        within("handshake", pki.connector().connect(name, tcp))
            .await
            .is_err()
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn certificate_errors_name_the_file() {
    let pki = Pki::new();
    let (cert, key, _) = pki.leaf("good", &["good.test"]);
    let (_, other_key, _) = pki.leaf("other", &["other.test"]);
    let backend = TestBackend::start("b1").await;
    let missing = pki.dir.join("missing.pem");
    let start = |text: String| async move {
        Gateway::start(Config::from_toml(&text, "tls.toml").expect("config")).await
    };

    let error = start(tls_config(backend.addr, &[(&missing, &key)]))
        .await
        .err()
        .expect("missing cert refused");
    assert!(error.to_string().contains("missing.pem"), "{error}");
    let error = start(tls_config(backend.addr, &[(&cert, &other_key)]))
        .await
        .err()
        .expect("wrong key refused");
    assert!(error.to_string().contains("other.key"), "{error}");
    let error = start(tls_config(backend.addr, &[(&key, &key)]))
        .await
        .err()
        .expect("a key is not a certificate");
    assert!(error.to_string().contains("good.key"), "{error}");
    assert!(
        start(tls_config(backend.addr, &[(&cert, &key)]))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn reload_rereads_certificates_and_refuses_broken_ones() {
    let pki = Pki::new();
    let (cert, key, old_der) = pki.leaf("site", &["site.test"]);
    let backend = TestBackend::start("b1").await;
    let text = tls_config(backend.addr, &[(&cert, &key)]);
    let (gateway, addr) = gateway(&text).await;
    let presented =
        |tls: &TlsStream<TcpStream>| tls.get_ref().1.peer_certificates().map(|c| c[0].clone());
    assert_eq!(
        presented(&tls_connect(&pki, addr, "site.test").await),
        Some(old_der)
    );

    // Renewed certificate at the same path: new connections get it, on the same socket.
    let (_, _, new_der) = pki.leaf("site", &["site.test"]);
    gateway
        .reload(Config::from_toml(&text, "tls.toml").expect("config"))
        .await
        .expect("reload");
    assert_eq!(gateway.listener_addr("main"), Some(addr));
    assert_eq!(
        presented(&tls_connect(&pki, addr, "site.test").await),
        Some(new_der.clone())
    );

    // A broken certificate is refused; the running one stays.
    std::fs::write(&cert, "not a certificate").expect("write");
    let error = gateway
        .reload(Config::from_toml(&text, "tls.toml").expect("config"))
        .await
        .expect_err("refused");
    assert!(error.to_string().contains("site.pem"), "{error}");
    assert_eq!(
        presented(&tls_connect(&pki, addr, "site.test").await),
        Some(new_der)
    );
    gateway.shutdown().await;
}

/// Over TLS too, wsgate reads a connection's first request itself (`wss_works_end_to_end`), and an
/// upgrade that follows other requests on the connection goes through hyper and is taken over from it.
#[tokio::test]
async fn a_wss_upgrade_after_a_request_on_the_same_connection_is_tunnelled() {
    let pki = Pki::new();
    let (cert, key, _) = pki.leaf("site", &["site.test"]);
    let backend = TestBackend::start("b1").await;
    let (gateway, addr) = gateway(&tls_config(backend.addr, &[(&cert, &key)])).await;
    let mut tls = tls_connect(&pki, addr, "site.test").await;
    raw_write(
        &mut tls,
        b"GET /ws/plain HTTP/1.1\r\nHost: site.test\r\n\r\n",
    )
    .await;
    let response = read_response(&mut tls).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body_text(), "hello from b1");
    let request = format!("wss://site.test:{}/ws/after", addr.port())
        .into_client_request()
        .expect("request");
    let (mut ws, _) = within("upgrade", tokio_tungstenite::client_async(request, tls))
        .await
        .expect("upgrade after a request");
    within("send", ws.send(Message::text("after a GET")))
        .await
        .expect("send");
    assert_eq!(next_message(&mut ws).await, Message::text("after a GET"));
    let targets: Vec<String> = backend.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/ws/plain", "/ws/after"]);
    assert_eq!(
        gateway.buffers_in_use(),
        0,
        "an idle TLS tunnel holds no read buffer"
    );
    gateway.shutdown().await;
}

/// Reads to the end of a TLS stream: `Ok` only if the server closed with a `close_notify` alert (RFC 8446
/// §6.1); a bare TCP FIN is an `UnexpectedEof` error, as a client sees a truncated response.
async fn read_to_clean_end(tls: &mut TlsStream<TcpStream>) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    within("the end of the connection", tls.read_to_end(&mut rest))
        .await
        .map(|_| rest)
}

/// wsgate ends a TLS connection it closes itself with `close_notify`: after a response with
/// `Connection: close` (hyper's path), after a refused first upgrade that asked to close (wsgate's), and
/// at shutdown for a connection that has not sent a request yet.
#[tokio::test]
async fn tls_connections_wsgate_closes_end_with_close_notify() {
    let pki = Pki::new();
    let (cert, key, _) = pki.leaf("site", &["site.test"]);
    let backend = TestBackend::start("b1").await;
    let (gateway, addr) = gateway(&tls_config(backend.addr, &[(&cert, &key)])).await;

    let mut tls = tls_connect(&pki, addr, "site.test").await;
    let get = b"GET /x HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n";
    raw_write(&mut tls, get).await;
    let response = read_response(&mut tls).await;
    assert_eq!(response.status, 200);
    read_to_clean_end(&mut tls)
        .await
        .expect("close_notify after Connection: close");

    let mut tls = tls_connect(&pki, addr, "site.test").await;
    let refused = upgrade_request(addr, "/ws", "")
        .replace("Connection: Upgrade", "Connection: Upgrade, close")
        .replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 12");
    raw_write(&mut tls, refused.as_bytes()).await;
    let response = read_response(&mut tls).await;
    assert_eq!(response.status, 426);
    read_to_clean_end(&mut tls)
        .await
        .expect("close_notify after a refused upgrade that asked to close");

    // A connection still waiting for its first request when the gateway shuts down.
    let mut idle = tls_connect(&pki, addr, "site.test").await;
    let shutdown = tokio::spawn(gateway.shutdown());
    read_to_clean_end(&mut idle)
        .await
        .expect("close_notify at shutdown");
    within("shutdown", shutdown).await.expect("shutdown task");
}

/// A `wss://` tunnel ends its TLS session with `close_notify` too: after the WebSocket closing handshake
/// (the client's Close answered by the backend), and when wsgate closes the tunnel itself at shutdown.
#[tokio::test]
async fn tls_tunnels_end_with_close_notify() {
    let pki = Pki::new();
    let (cert, key, _) = pki.leaf("site", &["site.test"]);
    let backend = TestBackend::start("b1").await;
    let text = tls_config(backend.addr, &[(&cert, &key)]) + "\n[timeouts]\nclose_spread = \"0s\"\n";
    let (gateway, addr) = gateway(&text).await;

    // Both ends of the closing handshake are relayed, then the session is closed in order. The client
    // reads on past its Close, as a browser does, to see how the connection ends.
    let mut tls = tls_connect(&pki, addr, "site.test").await;
    raw_write(&mut tls, upgrade_request(addr, "/ws", "").as_bytes()).await;
    let response = read_response(&mut tls).await;
    assert_eq!(response.status, 101);
    let mut close = vec![0x88, 0x82, 1, 2, 3, 4];
    close.extend([0x03 ^ 1, 0xe8 ^ 2]);
    raw_write(&mut tls, &close).await;
    let rest = read_to_clean_end(&mut tls)
        .await
        .expect("close_notify after the closing handshake");
    assert_eq!(rest, [0x88, 0x02, 0x03, 0xe8], "the backend's Close answer");

    // At shutdown: wsgate's Close 1001, then close_notify.
    let tcp = tcp_connect(addr).await;
    let name = rustls::pki_types::ServerName::try_from("site.test").expect("name");
    let tls = within("TLS", pki.connector().connect(name, tcp))
        .await
        .expect("TLS");
    let request = format!("wss://site.test:{}/ws", addr.port())
        .into_client_request()
        .expect("request");
    let (mut ws, _) = within("handshake", tokio_tungstenite::client_async(request, tls))
        .await
        .expect("handshake");
    within("send", ws.send(Message::text("hi")))
        .await
        .expect("send");
    assert_eq!(next_message(&mut ws).await, Message::text("hi"));
    let shutdown = tokio::spawn(gateway.shutdown());
    // tungstenite answers the Close; the stream then ends, cleanly only with close_notify.
    let mut tls = {
        let close = loop {
            match within("Close", futures_util::StreamExt::next(&mut ws)).await {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected Close, got {other:?}"),
            }
        };
        assert_eq!(close.map(|f| u16::from(f.code)), Some(1001));
        let _ = within("flush", ws.flush()).await;
        ws.into_inner()
    };
    read_to_clean_end(&mut tls)
        .await
        .expect("close_notify after wsgate's own Close");
    within("shutdown", shutdown).await.expect("shutdown task");
}

/// A gateway terminating TLS for `site.test` in front of `backend`, whose quiet tunnels park after
/// 200 ms (no keepalive pings) and whose shutdown closes them all at once.
async fn parking_gateway(pki: &Pki, backend: &WsBackend) -> (Gateway, SocketAddr) {
    let (cert, key, _) = pki.leaf("site", &["site.test"]);
    let text = tls_config(backend.addr, &[(&cert, &key)]);
    assert!(text.contains("websocket = {  }"), "{text}");
    let text = text.replace(
        "websocket = {  }",
        r#"websocket = { ping_interval = "0s", park_after = "200ms" }"#,
    ) + "\n[timeouts]\nclose_spread = \"0s\"\n";
    gateway(&text).await
}

/// A WebSocket over `tls` through the gateway at `addr`, and the backend's raw end of it.
async fn wss_pair(
    tls: TlsStream<TcpStream>,
    addr: SocketAddr,
    backend: &WsBackend,
) -> (WebSocketStream<TlsStream<TcpStream>>, RawPeer) {
    let request = format!("wss://site.test:{}/ws", addr.port())
        .into_client_request()
        .expect("request");
    let (connected, server) = tokio::join!(
        within("upgrade", tokio_tungstenite::client_async(request, tls)),
        backend.accept()
    );
    let (ws, _) = connected.expect("upgrade over TLS");
    (ws, server)
}

/// Quiet `wss://` tunnels go to the park too, their TLS session (keys, sequence numbers) with them: they
/// come back for what either side sends, and for a key update that carries no data (read, then parked
/// again), and are closed from there at shutdown with a Close and `close_notify`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_wss_tunnels_keep_their_session() {
    let pki = Pki::new();
    let backend = WsBackend::bind().await;
    let (gateway, addr) = parking_gateway(&pki, &backend).await;
    let tls = tls_connect(&pki, addr, "site.test").await;
    let (mut ws, mut server) = wss_pair(tls, addr, &backend).await;
    wait_metric(&gateway, "wsgate_ws_tunnels_parked 1").await;

    within("send", ws.send(Message::text("out of the park")))
        .await
        .expect("send");
    let frame = server.next_frame().await;
    assert_eq!(
        (frame.opcode, &frame.payload[..]),
        (OP_TEXT, &b"out of the park"[..])
    );
    wait_metric(&gateway, "wsgate_ws_tunnels_parked 1").await;
    server.write_frame(true, OP_BINARY, &[7; 300]).await;
    assert_eq!(next_message(&mut ws).await, Message::binary(vec![7; 300]));
    wait_metric(&gateway, "wsgate_ws_tunnels_parked 1").await;

    // A key update alone wakes the tunnel; it reads the record, finds no data, and parks again.
    ws.get_mut()
        .get_mut()
        .1
        .refresh_traffic_keys()
        .expect("key update");
    within("flush", ws.flush()).await.expect("flush");
    wait_metric(&gateway, "wsgate_ws_tunnels_parked 0").await;
    wait_metric(&gateway, "wsgate_ws_tunnels_parked 1").await;
    // Both directions under the new keys.
    within("send", ws.send(Message::text("new keys")))
        .await
        .expect("send");
    let frame = server.next_frame().await;
    assert_eq!(frame.payload, b"new keys");
    server.write_frame(true, OP_TEXT, b"heard").await;
    assert_eq!(next_message(&mut ws).await, Message::text("heard"));
    wait_metric(&gateway, "wsgate_ws_tunnels_parked 1").await;

    // Shutdown closes the parked tunnel in order: Close 1001 both ways, then `close_notify`.
    let monitor = gateway.monitor();
    let shutdown = tokio::spawn(gateway.shutdown());
    let (close, ()) = tokio::join!(
        async {
            loop {
                match within("Close", futures_util::StreamExt::next(&mut ws)).await {
                    Some(Ok(Message::Close(frame))) => break frame,
                    Some(Ok(_)) => continue,
                    other => panic!("expected Close, got {other:?}"),
                }
            }
        },
        server.expect_close(1001, "going away"),
    );
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1001));
    server.send_close(1001, "").await;
    let _ = within("flush", ws.flush()).await;
    let mut tls = ws.into_inner();
    read_to_clean_end(&mut tls)
        .await
        .expect("close_notify after wsgate's own Close");
    within("shutdown", shutdown).await.expect("shutdown task");
    let metrics = monitor.metrics_text();
    assert!(metrics.contains("wsgate_ws_tunnels_parked 0"), "{metrics}");
}

/// The same over TLS 1.2, whose sessions stay rustls' own (`Established::Rustls`): a parked tunnel comes
/// back for each message, both ways, more than once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_tls12_tunnels_keep_their_session() {
    let pki = Pki::new();
    let backend = WsBackend::bind().await;
    let (gateway, addr) = parking_gateway(&pki, &backend).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).expect("CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tcp_connect(addr).await;
    let name = ServerName::try_from("site.test").expect("name");
    let tls = within(
        "TLS 1.2 handshake",
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("handshake");
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let (mut ws, mut server) = wss_pair(tls, addr, &backend).await;
    for round in 0..3u8 {
        wait_metric(&gateway, "wsgate_ws_tunnels_parked 1").await;
        let text = format!("round {round}");
        within("send", ws.send(Message::text(text.clone())))
            .await
            .expect("send");
        assert_eq!(server.next_frame().await.payload, text.as_bytes());
        wait_metric(&gateway, "wsgate_ws_tunnels_parked 1").await;
        server.write_frame(true, OP_BINARY, &[round; 70_000]).await;
        assert_eq!(
            next_message(&mut ws).await,
            Message::binary(vec![round; 70_000])
        );
    }
    wait_metric(&gateway, "wsgate_ws_tunnels_parked 1").await;
    gateway.shutdown().await;
}

/// A TLS connection to `site.test` at `addr`, offering `alpn`.
async fn tls_connect_alpn(pki: &Pki, addr: SocketAddr, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let name = ServerName::try_from("site.test").expect("name");
    let tcp = tcp_connect(addr).await;
    within(
        "TLS handshake",
        pki.connector_offering(alpn).connect(name, tcp),
    )
    .await
    .expect("TLS handshake")
}

/// ALPN picks HTTP/2 on a TLS listener (by default it offers `h2` first): requests and WebSockets over
/// HTTP/2 work over TLS; a listener limited to `http/1.1` does not offer `h2`.
#[tokio::test]
async fn alpn_h2_serves_requests_and_websockets_over_http2() {
    use crate::h2::*;
    let pki = Pki::new();
    let (cert, key, _) = pki.leaf("site", &["site.test"]);
    let backend = TestBackend::start("b1").await;
    let text = tls_config(backend.addr, &[(&cert, &key)]) + "\n[timeouts]\nclose_spread = \"0s\"\n";
    let (gateway, addr) = gateway(&text).await;

    let tls = tls_connect_alpn(&pki, addr, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, _conn) = h2_handshake(tls).await;
    let get = http::Request::get("https://site.test/x")
        .body(empty())
        .expect("request");
    let (status, _, body) = h2_send(&mut sender, get).await;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"hello from b1"[..]));
    let seen = backend.seen().pop().expect("seen");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");

    let (_, mut ws) = h2_websocket(&mut sender, extended_connect("https", "/ws", &[]))
        .await
        .expect("WebSocket over HTTP/2 over TLS");
    within("send", ws.send(Message::text("over h2")))
        .await
        .expect("send");
    assert_eq!(next_message(&mut ws).await, Message::text("over h2"));
    let metrics = gateway.metrics_text();
    assert!(
        metrics
            .contains("wsgate_ws_upgrades_total{protocol=\"h2\",result=\"ok\",route=\"main\"} 1"),
        "{metrics}"
    );
    drop(ws);
    gateway.shutdown().await;

    // Without `h2` in the listener's ALPN, a client offering it gets HTTP/1.1.
    let text = text.replace("tls = {", "alpn = [\"http/1.1\"]\ntls = {");
    let (gateway, addr) = crate::common::gateway(&text).await;
    let tls = tls_connect_alpn(&pki, addr, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    gateway.shutdown().await;
}

/// A client that picks HTTP/2 by ALPN and then sends nothing (not even the preface) is closed by the
/// header timeout, as one that sends no HTTP/1.1 request is.
#[tokio::test(start_paused = true)]
async fn a_silent_alpn_h2_client_is_closed_by_the_header_timeout() {
    let pki = Pki::new();
    let (cert, key, _) = pki.leaf("site", &["site.test"]);
    let backend = TestBackend::start("b1").await;
    let text = tls_config(backend.addr, &[(&cert, &key)]) + "\n[timeouts]\nheader = \"3s\"\n";
    let (gateway, addr) = gateway(&text).await;
    let start = tokio::time::Instant::now();
    let mut tls = tls_connect_alpn(&pki, addr, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut rest = Vec::new();
    let _ = within(
        "closed",
        tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut rest),
    )
    .await;
    assert_at("closed", start.elapsed(), Duration::from_secs(3));
    gateway.shutdown().await;
}
