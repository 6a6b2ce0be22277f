//! `wsgate demo`: two built-in WebSocket backends behind a gateway on 127.0.0.1:8080, and a page that
//! shows which backend answered. Nothing else needs to be installed or running.
//!
//! Each demo backend serves the page on `GET /` and a chat room on `/ws`: every text message is sent back to
//! everyone connected to the same backend, tagged with the backend's name.
//!
//! Part of the binary, not the library: it uses only what any embedding program could (`Config`,
//! `Gateway`), and hyper and tungstenite for its backends.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use wsgate::{Config, ConfigErrors};

const PAGE: &str = include_str!("demo.html");

/// A demo backend, serving as long as the process runs (its tasks are not the gateway's: they stay up
/// while the gateway drains, as real backends would).
pub struct DemoBackend {
    pub name: String,
    pub addr: SocketAddr,
}

/// Starts a demo backend on `127.0.0.1:0`.
pub async fn start_backend(name: &str) -> std::io::Result<DemoBackend> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let room = Arc::new(Room {
        name: name.to_string(),
        chat: broadcast::channel(256).0,
    });
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let room = Arc::clone(&room);
            tokio::spawn(async move {
                let service = service_fn(move |req| serve(req, Arc::clone(&room)));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Ok(DemoBackend {
        name: name.to_string(),
        addr,
    })
}

struct Room {
    name: String,
    chat: broadcast::Sender<String>,
}

type DemoResponse = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &'static str, body: &'static str) -> DemoResponse {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

async fn serve(mut req: Request<Incoming>, room: Arc<Room>) -> Result<DemoResponse, Infallible> {
    let text = "text/plain; charset=utf-8";
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if !upgrade {
        return Ok(match req.uri().path() {
            "/" => respond(StatusCode::OK, "text/html; charset=utf-8", PAGE),
            "/healthz" => respond(StatusCode::OK, text, "ok\n"),
            _ => respond(StatusCode::NOT_FOUND, text, "not found\n"),
        });
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return Ok(respond(StatusCode::BAD_REQUEST, text, "missing key\n"));
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            chat(ws, room).await;
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    headers.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(accept) = header::HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    Ok(response)
}

async fn chat<S>(ws: WebSocketStream<S>, room: Arc<Room>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let mut chat = room.chat.subscribe();
    let hello = format!("{{\"backend\":\"{}\",\"text\":\"connected\"}}", room.name);
    if sink.send(Message::text(hello)).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    let line = format!(
                        "{{\"backend\":\"{}\",\"text\":{}}}",
                        room.name,
                        json_string(text.as_str())
                    );
                    let _ = room.chat.send(line);
                }
                Some(Ok(Message::Binary(data))) => {
                    if sink.send(Message::Binary(data)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            line = chat.recv() => match line {
                Ok(line) => {
                    if sink.send(Message::text(line)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The demo's config: `listen` in front of the given backends, balanced by least-connections; the admin
/// listener (with its write API when a token file is given) if `admin` is.
pub fn config(
    listen: SocketAddr,
    admin: Option<(SocketAddr, Option<&std::path::Path>)>,
    backends: &[DemoBackend],
) -> Result<Config, ConfigErrors> {
    let backends: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ addr = \"{}\" }}", b.addr))
        .collect();
    let admin = admin.map_or(String::new(), |(addr, tokens)| {
        let tokens = tokens.map_or(String::new(), |path| {
            // A TOML literal string: the path is taken as it is.
            format!("token_file = '{}'\n", path.display())
        });
        format!("[admin]\nlisten = \"{addr}\"\n{tokens}")
    });
    let text = format!(
        r#"{admin}
[[listener]]
name = "demo"
listen = "{listen}"

[[route]]
name = "demo"
path_prefix = "/"
pool = "demo"
websocket = {{ ping_interval = "20s", idle_timeout = "10m" }}

[pool.demo]
policy = "least_conn"
drain_spread = "10s"
backends = [ {} ]
"#,
        backends.join(", ")
    );
    Config::from_toml(&text, "<demo>")
}
