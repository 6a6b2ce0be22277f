//! The PROXY protocol through real sockets, both ways (README, "Protecting backends"). In: a listener
//! reads the header its load balancer sends (v1 text, v2 binary, in front of TLS too), only from the
//! networks it names; the header's source is the client for `X-Forwarded-For` and the per-client limits;
//! a connection from elsewhere, with a bad header or none in time, is closed and counted and never reaches
//! a backend. Out: a pool's backends get a header naming the client, on HTTP and WebSocket connections,
//! and health checks a LOCAL one. Headers are written and read here by hand, independently of wsgate's
//! codec.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{
    self, RawBackend, TestBackend, WAIT, gateway, read_response, tcp_connect, within,
};
use crate::tls::Pki;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// A v2 header: PROXY (or LOCAL when `addresses` is `None`) over TCP, with `tlv` appended.
fn v2(addresses: Option<(SocketAddr, SocketAddr)>, tlv: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    let mut body = Vec::new();
    match addresses {
        None => out.extend([0x20, 0x00]),
        Some((src, dst)) => {
            out.push(0x21);
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.push(0x11);
                    body.extend(s.octets());
                    body.extend(d.octets());
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    out.push(0x21);
                    body.extend(s.octets());
                    body.extend(d.octets());
                }
                _ => panic!("one family"),
            }
            body.extend(src.port().to_be_bytes());
            body.extend(dst.port().to_be_bytes());
        }
    }
    body.extend(tlv);
    out.extend((body.len() as u16).to_be_bytes());
    out.extend(body);
    out
}

fn v1(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    let family = if src.contains(':') { "TCP6" } else { "TCP4" };
    format!("PROXY {family} {src} {dst} {sport} {dport}\r\n").into_bytes()
}

/// One listener `main` with `listener` lines, to `backend`, with `top` lines first.
fn config(backend: SocketAddr, top: &str, listener: &str, pool: &str) -> String {
    format!(
        "{top}\n[[listener]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n{listener}\n\n\
         [[route]]\nname = \"main\"\npool = \"p\"\n\n\
         [pool.p]\nbackends = [ {{ addr = \"{backend}\" }} ]\n{pool}\n"
    )
}

fn get(addr: SocketAddr) -> Vec<u8> {
    format!("GET /who HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes()
}

/// What the backend saw as the client of its last request.
fn forwarded_for(backend: &TestBackend) -> String {
    let seen = backend.seen();
    let last = seen.last().expect("the backend saw a request");
    last.headers["x-forwarded-for"]
        .to_str()
        .expect("ascii")
        .to_string()
}

fn rejections(gateway: &wsgate::Gateway, reason: &str) -> f64 {
    let text = gateway.monitor().metrics_text();
    let wanted = format!("reason=\"{reason}\"");
    text.lines()
        .filter(|l| l.starts_with("wsgate_admission_rejections_total") && l.contains(&wanted))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Reads until the peer closes (EOF or reset); nothing may have been answered.
async fn closed_without_a_word<S: AsyncRead + Unpin>(stream: &mut S) {
    let mut buf = [0u8; 64];
    let read = within("the connection to be closed", stream.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "closed, not answered: {read:?}"
    );
}

#[tokio::test]
async fn a_v1_header_names_the_client_for_forwarding_and_limits() {
    let backend = TestBackend::start("b").await;
    let listener = "proxy_protocol = \"v1\"\nproxy_protocol_from = [\"127.0.0.1\"]\nmax_connections_per_ip = 1";
    let (gateway, addr) = gateway(&config(backend.addr, "", listener, "")).await;

    let mut first = tcp_connect(addr).await;
    let mut request = v1("203.0.113.7", "192.0.2.1", 40000, 443);
    request.extend(get(addr));
    common::raw_write(&mut first, &request).await;
    assert_eq!(read_response(&mut first).await.status, 200);
    assert_eq!(forwarded_for(&backend), "203.0.113.7");
    assert_eq!(
        backend.seen().last().unwrap().headers["x-real-ip"],
        "203.0.113.7"
    );

    // `first` is still open: the same client may hold one connection only; another client may.
    let mut again = tcp_connect(addr).await;
    common::raw_write(&mut again, &v1("203.0.113.7", "192.0.2.1", 40001, 443)).await;
    closed_without_a_word(&mut again).await;
    assert_eq!(rejections(&gateway, "connections_per_ip"), 1.0);
    let mut other = tcp_connect(addr).await;
    let mut request = v1("2001:db8::5", "2001:db8::1", 40002, 443);
    request.extend(get(addr));
    common::raw_write(&mut other, &request).await;
    assert_eq!(read_response(&mut other).await.status, 200);
    assert_eq!(forwarded_for(&backend), "2001:db8::5");
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_v2_header_in_front_of_tls_and_a_local_one() {
    let pki = Pki::new();
    let (cert, key, _) = pki.leaf("site", &["site.test"]);
    let backend = TestBackend::start("b").await;
    let listener = format!(
        "proxy_protocol = \"any\"\nproxy_protocol_from = [\"127.0.0.0/8\"]\n\
         tls = {{ certs = [ {{ cert = {:?}, key = {:?} }} ] }}\nalpn = [\"http/1.1\"]",
        cert.display().to_string(),
        key.display().to_string()
    );
    let (gateway, addr) = gateway(&config(backend.addr, "", &listener, "")).await;

    let tls_get = |header: Vec<u8>| {
        let connector = pki.connector();
        async move {
            let mut tcp = tcp_connect(addr).await;
            common::raw_write(&mut tcp, &header).await;
            let name = ServerName::try_from("site.test").expect("name");
            let mut tls = within("TLS handshake", connector.connect(name, tcp))
                .await
                .expect("TLS after the PROXY header");
            common::raw_write(&mut tls, &get(addr)).await;
            read_response(&mut tls).await.status
        }
    };
    // A TLV (the balancer's TLS details, say) is read past.
    let src: SocketAddr = "[2001:db8::7]:50000".parse().unwrap();
    let dst: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
    let header = v2(
        Some((src, dst)),
        &[0x20, 0x00, 0x05, 0x01, 0x00, 0x00, 0x00, 0x00],
    );
    assert_eq!(tls_get(header).await, 200);
    assert_eq!(forwarded_for(&backend), "2001:db8::7");
    // LOCAL: the balancer's own check; the peer is the client.
    assert_eq!(tls_get(v2(None, &[])).await, 200);
    assert_eq!(forwarded_for(&backend), "127.0.0.1");
    // "any" takes v1 too.
    assert_eq!(tls_get(v1("198.51.100.9", "192.0.2.1", 1, 443)).await, 200);
    assert_eq!(forwarded_for(&backend), "198.51.100.9");
    gateway.shutdown().await;
}

#[tokio::test]
async fn untrusted_peers_and_bad_headers_are_closed_and_never_reach_a_backend() {
    let backend = RawBackend::start(|_stream| async {}).await;
    // 127.0.0.1 is not a load balancer of this listener.
    let untrusted = "proxy_protocol = \"v2\"\nproxy_protocol_from = [\"10.0.0.0/8\"]";
    let (gateway, addr) = gateway(&config(backend.addr, "", untrusted, "")).await;
    let mut stream = tcp_connect(addr).await;
    let src: SocketAddr = "203.0.113.7:1000".parse().unwrap();
    let mut request = v2(Some((src, "192.0.2.1:80".parse().unwrap())), &[]);
    request.extend(get(addr));
    common::raw_write(&mut stream, &request).await;
    closed_without_a_word(&mut stream).await;
    assert_eq!(rejections(&gateway, "proxy_untrusted"), 1.0);
    gateway.shutdown().await;

    let trusted = "proxy_protocol = \"v2\"\nproxy_protocol_from = [\"127.0.0.1\"]";
    let (gateway, addr) = common::gateway(&config(backend.addr, "", trusted, "")).await;
    let mut oversized = v2(Some((src, "192.0.2.1:80".parse().unwrap())), &[]);
    oversized[14..16].copy_from_slice(&60_000u16.to_be_bytes());
    let bad: [(&str, Vec<u8>); 4] = [
        ("no header at all", get(addr)),
        ("v1 on a v2 listener", v1("203.0.113.7", "192.0.2.1", 1, 80)),
        ("a v2 header that says it is 60000 bytes long", oversized),
        (
            "a broken signature",
            b"\r\n\r\n\0\r\nQUIX\n\x21\x11\x00\x0c".to_vec(),
        ),
    ];
    for (what, bytes) in &bad {
        let mut stream = tcp_connect(addr).await;
        common::raw_write(&mut stream, bytes).await;
        let mut buf = [0u8; 64];
        let read = within(what, stream.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "{what}: closed, not answered: {read:?}"
        );
    }
    let refused: f64 = gateway
        .monitor()
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with("wsgate_admission_rejections_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(refused, 4.0, "each bad header counted");
    assert_eq!(backend.accepts(), 0, "no backend saw any of them");
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_header_that_does_not_come_is_closed_at_the_header_timeout() {
    let backend = TestBackend::start("b").await;
    let listener = "proxy_protocol = \"v1\"\nproxy_protocol_from = [\"127.0.0.1\"]";
    let text = config(backend.addr, "[timeouts]\nheader = \"1s\"", listener, "");
    let (gateway, addr) = gateway(&text).await;
    let started = Instant::now();
    let mut stream = tcp_connect(addr).await;
    // Half a header, then nothing.
    common::raw_write(&mut stream, b"PROXY TCP4 203.0.113.7 ").await;
    closed_without_a_word(&mut stream).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}"
    );
    assert!(waited < WAIT);
    assert_eq!(rejections(&gateway, "proxy_header_timeout"), 1.0);
    gateway.shutdown().await;
}

// ---------------------------------------------------------------------------------------------------------
// Toward backends

/// What a backend of a PROXY-protocol pool read first on each connection.
type Headers = Arc<Mutex<Vec<Vec<u8>>>>;

/// Reads one PROXY header (v1 line or v2 block) off `stream`, byte-exact.
async fn read_proxy_header(stream: &mut TcpStream) -> Vec<u8> {
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).await.expect("a header");
    let mut header = first.to_vec();
    if first[0] == b'P' {
        while !header.ends_with(b"\r\n") {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.expect("v1 line");
            header.push(byte[0]);
            assert!(header.len() <= 107, "v1 header too long");
        }
    } else {
        let mut fixed = [0u8; 15];
        stream.read_exact(&mut fixed).await.expect("v2 fixed part");
        header.extend(fixed);
        let len = u16::from_be_bytes([header[14], header[15]]) as usize;
        let mut rest = vec![0u8; len];
        stream.read_exact(&mut rest).await.expect("v2 addresses");
        header.extend(rest);
    }
    header
}

/// The next request head on `stream` (these requests have no bodies), or `None` once the peer closes.
async fn next_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// A backend that records each connection's PROXY header, then answers HTTP (200 "ok", or a 101 and an
/// echo of one message for an upgrade) on what follows.
async fn proxied_backend() -> (RawBackend, Headers) {
    let headers: Headers = Arc::default();
    let seen = Arc::clone(&headers);
    let backend = RawBackend::start(move |mut stream| {
        let seen = Arc::clone(&seen);
        async move {
            let header = within("the PROXY header", read_proxy_header(&mut stream)).await;
            seen.lock().unwrap().push(header);
            while let Some(head) = next_head(&mut stream).await {
                if head.to_ascii_lowercase().contains("upgrade: websocket") {
                    let key = head
                        .lines()
                        .find_map(|l| {
                            let (name, value) = l.split_once(':')?;
                            name.eq_ignore_ascii_case("sec-websocket-key").then_some(value)
                        })
                        .expect("key")
                        .trim()
                        .to_string();
                    let answer = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                        common::accept_key(&key)
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                    // Hold the tunnel until the client goes.
                    let mut sink = [0u8; 1024];
                    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                    return;
                }
                let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                if stream.write_all(ok).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (backend, headers)
}

#[tokio::test]
async fn a_pool_sends_the_client_in_a_header_on_http_and_websocket_connections() {
    let (backend, headers) = proxied_backend().await;
    let (gateway, addr) = gateway(&config(backend.addr, "", "", "proxy_protocol = \"v1\"")).await;

    // HTTP: the header names the client's socket and the address it connected to.
    let mut client = tcp_connect(addr).await;
    let local = client.local_addr().expect("local");
    common::raw_write(&mut client, &get(addr)).await;
    assert_eq!(read_response(&mut client).await.status, 200);
    let expected = format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        local.ip(),
        addr.ip(),
        local.port(),
        addr.port()
    );
    assert_eq!(
        String::from_utf8_lossy(&headers.lock().unwrap()[0]),
        expected
    );

    // Another client does not get the first one's keep-alive connection: it would be named wrongly.
    let mut second = tcp_connect(addr).await;
    let second_local = second.local_addr().expect("local");
    common::raw_write(&mut second, &get(addr)).await;
    assert_eq!(read_response(&mut second).await.status, 200);
    assert_eq!(
        backend.accepts(),
        2,
        "one backend connection per client connection"
    );
    let seen = String::from_utf8_lossy(&headers.lock().unwrap()[1]).to_string();
    assert!(
        seen.contains(&format!(" {} ", second_local.port())),
        "{seen}"
    );
    // The first client's next request reuses its own connection.
    common::raw_write(&mut client, &get(addr)).await;
    assert_eq!(read_response(&mut client).await.status, 200);
    assert_eq!(backend.accepts(), 2, "kept alive for its client");

    // A WebSocket upgrade's connection too.
    let mut ws = tcp_connect(addr).await;
    let ws_local = ws.local_addr().expect("local");
    common::raw_write(&mut ws, common::upgrade_request(addr, "/", "").as_bytes()).await;
    assert_eq!(read_response(&mut ws).await.status, 101);
    let seen = String::from_utf8_lossy(&headers.lock().unwrap()[2]).to_string();
    assert!(seen.starts_with("PROXY TCP4 127.0.0.1 "), "{seen}");
    assert!(seen.contains(&format!(" {} ", ws_local.port())), "{seen}");
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_header_from_the_balancer_is_passed_on_and_health_checks_send_local() {
    let (backend, headers) = proxied_backend().await;
    let listener = "proxy_protocol = \"v1\"\nproxy_protocol_from = [\"127.0.0.1\"]";
    let pool = "proxy_protocol = \"v2\"\nhealth = { path = \"/healthz\", interval = \"100ms\" }";
    let (gateway, addr) = gateway(&config(backend.addr, "", listener, pool)).await;
    // The first health check's header: LOCAL, no addresses.
    within("a health check", async {
        while headers.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let local = headers.lock().unwrap()[0].clone();
    assert_eq!(&local[..12], V2_SIGNATURE);
    assert_eq!(local[12], 0x20, "LOCAL command");
    assert_eq!(local[13] >> 4, 0, "no address family");

    let mut client = tcp_connect(addr).await;
    let mut request = v1("203.0.113.7", "192.0.2.1", 40000, 443);
    request.extend(get(addr));
    common::raw_write(&mut client, &request).await;
    assert_eq!(read_response(&mut client).await.status, 200);
    let proxied = within("the request's header", async {
        loop {
            let found = headers
                .lock()
                .unwrap()
                .iter()
                .find(|h| h[12] == 0x21)
                .cloned();
            match found {
                Some(header) => return header,
                None => tokio::task::yield_now().await,
            }
        }
    })
    .await;
    assert_eq!(proxied[13], 0x11, "TCP over IPv4");
    assert_eq!(&proxied[16..20], &[203, 0, 113, 7], "the balancer's client");
    assert_eq!(&proxied[24..26], &40000u16.to_be_bytes());
    gateway.shutdown().await;
}
