//! One client connection, over any transport: the TLS handshake if the listener has certificates, then
//! HTTP/2 (`h2.rs`) if ALPN or the h2c preface chose it, else the first request, read by wsgate itself,
//! then hyper (`h1.rs`) for whatever follows.
//!
//! Most WebSocket clients open a connection for the upgrade alone. For those, hyper's connection
//! machinery (its read buffer, a write buffer, an upgrade channel and a second task for the tunnel) is set
//! up only to be thrown away after one request, and its buffers, freed while the tunnel's state stays,
//! leave the heap fragmented: idle tunnels cost more memory than they hold. So the first request head is
//! read here into a small buffer; an upgrade (GET, HTTP/1.1) is checked and handshaken in this same task,
//! over a plain socket and a TLS session alike, and its tunnel started on a task of its own. Anything
//! else (other requests, malformed heads, bodies, refusals' follow-ups) goes to hyper with the bytes
//! already read replayed in front of the stream, so HTTP behaviour, error answers included, stays hyper's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http::header;
use http_body_util::BodyExt;
use prometheus::IntGauge;
use rustls::server::UnbufferedServerConnection;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::client_io::{ClientIo, Replay};
use super::h1::serve_http;
use super::h2::serve_h2;
use crate::admission::ClientKey;
use crate::body::ProxyBody;
use crate::config::{Alpn, Config, ListenerHttp};
use crate::conn::{Admitted, ClientConn, ConnSlot, Listener};
use crate::headers::has_token;
use crate::http1::request::{First, parse};
use crate::http1::response::encode;
use crate::http1::{FIRST_READ, client_head_limit};
use crate::proxy::{self, Answer, Splice};
use crate::proxy_protocol;
use crate::state::Shared;
use crate::tls::TlsAcceptor;
use crate::tls::session::Established;
use crate::websocket::Transport;

/// How a listener serves the connections it accepts (swapped whole on reload).
pub struct Front {
    /// The listener's certificates and ALPN ids; `None` for a plain listener.
    pub tls: Option<TlsAcceptor>,
    pub http: ListenerHttp,
    /// The listener as its connections see it: name, admission settings and state.
    pub listener: Arc<Listener>,
}

/// The HTTP/2 connection preface (RFC 9113 §3.4): how an h2c client with prior knowledge begins.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Admits a connection just accepted (its place under the listener's `max_connections` taken, with the
/// gauge that counts it), then serves it. First the listener's own admission: the PROXY protocol header
/// if the listener reads one (only from the load balancers it names), which gives the client's address,
/// then the client's place under `max_connections_per_ip`. A connection refused here is closed at once,
/// before any byte is answered, and counted.
pub async fn admit(
    stream: TcpStream,
    tcp_peer: SocketAddr,
    front: Arc<Front>,
    (slot, active): (ConnSlot, IntGauge),
    shared: Arc<Shared>,
) {
    let config = Arc::clone(&shared.state.load().config);
    let listener = &front.listener;
    let refuse = |reason: &str| {
        tracing::debug!(listener = %listener.name, peer = %tcp_peer, reason, "connection refused");
        shared
            .metrics
            .admission_rejections
            .with_label_values(&[&listener.name, "", reason])
            .inc();
    };
    let local = stream.local_addr().unwrap_or(tcp_peer);
    let (peer, local) = match &listener.admission.proxy_protocol {
        None => (tcp_peer, local),
        Some(proxy) => {
            if !proxy.from.iter().any(|net| net.contains(tcp_peer.ip())) {
                return refuse("proxy_untrusted");
            }
            let header = proxy_protocol::read_header(&stream, proxy.versions);
            let header = tokio::select! {
                header = tokio::time::timeout(config.timeouts.header, header) => header,
                // Nothing has been read for HTTP yet: nothing to answer on shutdown.
                () = shared.shutdown.cancelled() => return,
            };
            match header {
                Ok(Ok(Some(source))) => (source, local),
                // LOCAL (the balancer's own health check) or UNKNOWN: the peer is who it is.
                Ok(Ok(None)) => (tcp_peer, local),
                Ok(Err(error)) => {
                    tracing::debug!(listener = %listener.name, peer = %tcp_peer, %error, "bad PROXY protocol header");
                    return refuse(error.label());
                }
                Err(_) => return refuse("proxy_header_timeout"),
            }
        }
    };
    let per_client = match listener.admission.max_connections_per_ip {
        None => None,
        Some(max) => {
            let key = ClientKey::new(peer.ip(), config.limits.ipv6_prefix);
            match listener.scope.clients.acquire(key, max) {
                Some(place) => Some(place),
                None => return refuse("connections_per_ip"),
            }
        }
    };
    let admitted = Admitted {
        slot,
        per_client,
        active,
    };
    let tls = front.tls.is_some();
    let conn = Arc::new(ClientConn::new(
        (peer, local),
        tls,
        Arc::clone(listener),
        admitted,
    ));
    serve(stream, front, conn, shared, config).await;
}

/// Serves an admitted connection until it closes or is upgraded, as its listener's `front` says.
async fn serve(
    stream: TcpStream,
    front: Arc<Front>,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
    config: Arc<Config>,
) {
    let _ = stream.set_nodelay(true);
    let io = ClientIo::new(
        stream,
        Arc::clone(&conn),
        config.timeouts.header,
        config.timeouts.http_idle,
        config.timeouts.send,
    );
    match &front.tls {
        None => first_request(io, conn, shared, config, &front.http).await,
        // Boxed: a TLS session is several KiB, and a plain connection's task (an idle tunnel's, too)
        // would otherwise be sized for it.
        Some(acceptor) => {
            Box::pin(serve_tls(io, acceptor, &front.http, conn, shared, config)).await
        }
    }
}

async fn serve_tls(
    io: ClientIo,
    acceptor: &TlsAcceptor,
    http: &ListenerHttp,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
    config: Arc<Config>,
) {
    // The TLS handshake counts against the header timeout, like the request head that follows it. A
    // shutdown lets it finish (within that timeout), so that the session can be closed properly, with a
    // `close_notify`, rather than cut mid-handshake.
    let session = match tokio::time::timeout(config.timeouts.header, acceptor.accept(io)).await {
        Ok(Ok(session)) => session,
        Ok(Err(error)) => {
            return tracing::debug!(peer = %conn.peer, %error, "TLS handshake failed");
        }
        Err(_) => return tracing::debug!(peer = %conn.peer, "TLS handshake timed out"),
    };
    let h2 = session.state().alpn_protocol() == Some(Alpn::H2.id());
    // From here on the session only carries traffic: a TLS 1.3 one keeps its keys, not rustls'
    // connection (`tls/record_layer.rs`), for requests and tunnels alike.
    let stream = session.establish();
    if h2 {
        let websockets = http.websocket_over_h2;
        Box::pin(serve_h2(stream, conn, shared, &config, websockets)).await;
    } else {
        first_request(stream, conn, shared, config, http).await;
    }
}

/// A client stream wsgate can serve: a plain socket (`ClientIo`) or a TLS session over one.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    /// What the tunnel relays on once the stream has been sent its 101.
    type Tunnelled: Transport + 'static;

    /// The TCP socket underneath.
    fn socket(&self) -> &TcpStream;

    fn into_tunnelled(self) -> Self::Tunnelled;
}

impl ClientStream for ClientIo {
    /// The raw socket: readiness tells the tunnel when data is there, so an idle tunnel holds no read
    /// buffer (`websocket::transport`).
    type Tunnelled = TcpStream;

    fn socket(&self) -> &TcpStream {
        self.stream()
    }

    fn into_tunnelled(self) -> TcpStream {
        self.into_stream()
    }
}

impl ClientStream for Established<UnbufferedServerConnection, ClientIo> {
    /// The TLS session over the raw socket, with wsgate's record layer for TLS 1.3
    /// (`TlsSession::establish`): `ClientIo`'s timers are off once upgraded, and the session tells the
    /// tunnel when data is there, so an idle TLS tunnel holds no read buffer either.
    type Tunnelled = Established<UnbufferedServerConnection, TcpStream>;

    fn socket(&self) -> &TcpStream {
        self.get_ref().stream()
    }

    fn into_tunnelled(self) -> Self::Tunnelled {
        self.map_io(ClientIo::into_stream)
    }
}

/// Starts the tunnel between `io`, which has been sent its 101, and the backend of `splice`, as a task
/// of its own, sized for the tunnel alone. `early`: what the client sent behind its upgrade request.
pub fn start_tunnel<S: ClientStream>(
    io: S,
    splice: Splice,
    early: Bytes,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
) {
    // The connection leaves the HTTP layer: its timers are off from now on.
    conn.phase.upgraded();
    let tunnel = splice.run(io.into_tunnelled(), early, conn, Arc::clone(&shared));
    shared.tasks.spawn(tunnel);
}

/// Serves a connection's first request here if it is an upgrade, an h2c connection (if the listener
/// takes them) through hyper's HTTP/2 server, and everything else through hyper's HTTP/1.1 one.
async fn first_request<S: ClientStream>(
    mut io: S,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
    config: Arc<Config>,
    http: &ListenerHttp,
) {
    // hyper refuses a head that does not fit its buffer with 431; stop reading at the same size and let
    // it give that answer.
    let limit = client_head_limit(config.limits.max_header_size);
    let mut buf = Vec::with_capacity(FIRST_READ);
    let (parts, head_len) = loop {
        let read = tokio::select! {
            read = io.read_buf(&mut buf) => Some(read),
            _ = shared.shutdown.cancelled() => None,
        };
        let Some(read) = read else {
            return close(&mut io, config.timeouts.handshake).await;
        };
        match read {
            // Gone before a whole head, or the header timeout (`ClientIo`): nothing to answer.
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if http.h2c && H2_PREFACE.starts_with(&buf[..buf.len().min(H2_PREFACE.len())]) {
            if buf.len() < H2_PREFACE.len() {
                continue;
            }
            let io = Replay::new(io, Bytes::from(buf));
            let websockets = http.websocket_over_h2;
            return Box::pin(serve_h2(io, conn, shared, &config, websockets)).await;
        }
        match parse(&buf) {
            First::Upgrade(parts, len) => break (parts, len),
            First::Partial if buf.len() < limit => continue,
            _ => {
                let io = Replay::new(io, Bytes::from(buf));
                return Box::pin(serve_http(io, conn, shared, &config)).await;
            }
        }
    };
    conn.phase.busy();
    // Usually nothing: a client waits for the 101 before it sends frames.
    let early = Bytes::copy_from_slice(&buf[head_len..]);
    drop(buf);
    let close_after = has_token(&parts.headers, header::CONNECTION, "close");
    let write_timeout = config.timeouts.handshake;

    let answer = tokio::select! {
        answer = proxy::handle_upgrade(parts, head_len, &conn, &shared) => answer,
        () = hung_up(io.socket()) => {
            // Nobody is left to answer: the backend connection is dropped now, not when the handshake
            // timeout ends it, and the backend is not blamed.
            tracing::debug!(client = %conn.peer, "client gone during the upgrade handshake");
            return;
        }
    };
    match answer {
        Answer::Switching(response, splice) => {
            if let Err(error) = send(&mut io, response, false, write_timeout).await {
                tracing::debug!(client = %conn.peer, %error, "client gone before its 101");
                return;
            }
            // The tunnel gets a task of its own, sized for the tunnel alone: this one also had to hold
            // the handshake's state, which an idle tunnel would otherwise carry for its whole life.
            start_tunnel(io, splice, early, conn, shared);
        }
        Answer::Response(response) => {
            // A refusal wsgate made before routing closes the connection (`ProxyError::BadRequest`):
            // whatever follows the head is not read.
            let closing = close_after || has_token(response.headers(), header::CONNECTION, "close");
            if send(&mut io, response, closing, write_timeout)
                .await
                .is_err()
            {
                return;
            }
            if closing {
                return close(&mut io, write_timeout).await;
            }
            conn.phase.idle();
            let io = Replay::new(io, early);
            Box::pin(serve_http(io, conn, shared, &config)).await;
        }
    }
}

/// Resolves when the client closes its side (EOF or error) while its upgrade waits on a backend. A
/// client that sends bytes meanwhile (frames behind its request) is not watched further: they stay
/// unread in the socket for the tunnel. Under TLS the bytes peeked are records: a client's `close_notify`
/// counts as bytes, so a TLS client that hangs up is noticed only by the handshake timeout.
async fn hung_up(stream: &TcpStream) {
    let mut probe = [0u8; 1];
    match stream.peek(&mut probe).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Ends a connection wsgate closes itself, in order: a TLS session sends its `close_notify` alert (RFC
/// 8446 §6.1: without it a client cannot tell a complete response from a cut one), then the socket's
/// write side closes. Bounded by `timeout`: a client that reads nothing does not hold it.
async fn close<S: AsyncWrite + Unpin>(io: &mut S, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, io.shutdown()).await;
}

/// Writes a whole response: the 101, or a refusal whose body is already in memory.
async fn send<S: AsyncWrite + Unpin>(
    io: &mut S,
    response: Response<ProxyBody>,
    close: bool,
    timeout: Duration,
) -> std::io::Result<()> {
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let bytes = encode(parts.status, &parts.headers, &body, close);
    let written = async {
        io.write_all(&bytes).await?;
        // A TLS session holds what was written until flushed.
        io.flush().await
    };
    tokio::time::timeout(timeout, written)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client write timed out"))?
}
