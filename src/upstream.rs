//! Connections to backends: the connect (TCP, then TLS for a TLS backend: `tls_client.rs`), the stream
//! both give (`stream.rs`), and keep-alive HTTP/1.1 connections, pooled per backend address and TLS
//! client, and per worker runtime when the gateway has several.
//!
//! wsgate keeps its own small pool (rather than a generic client) so that a request whose backend cannot be
//! reached is still whole and can go to the next backend, and so that a pooled connection the backend
//! closed meanwhile hands the unsent request back for a retry.

mod stream;
mod tls_client;

pub use stream::BackendStream;
pub use tls_client::{BackendTls, ClientId, TlsClients};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;

use crate::body::BoxError;
use crate::config::split_host_port;

/// Idle connections kept per backend address and TLS client, in each worker runtime's pool; more are
/// closed.
const MAX_IDLE_PER_BACKEND: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connect and the TLS handshake (for a TLS backend) did not both finish in time.
    #[error("connect to {addr} timed out")]
    Timeout { addr: String },
    #[error("connect to {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed: the backend's certificate was refused (rustls says which check failed,
    /// e.g. "invalid peer certificate: UnknownIssuer"), the backend refused wsgate's, or it does not
    /// speak TLS.
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        addr: String,
        #[source]
        source: hyper::Error,
    },
}

/// Connects to a backend (`host:port`) with Nagle off, sends `preamble` (a PROXY protocol header, or
/// nothing), and for a TLS backend (`tls`) performs the TLS handshake; `timeout` bounds it all.
pub async fn connect(
    addr: &str,
    tls: Option<&BackendTls>,
    timeout: Duration,
    preamble: &[u8],
) -> Result<BackendStream, ConnectError> {
    let target = split_host_port(addr).ok_or_else(|| ConnectError::Io {
        addr: addr.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not host:port"),
    })?;
    let connecting = async {
        let mut stream = TcpStream::connect(target)
            .await
            .map_err(|source| ConnectError::Io {
                addr: addr.to_string(),
                source,
            })?;
        // Small frames (pings, chat messages) must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        if !preamble.is_empty() {
            // The PROXY header goes before anything else, TLS included: the backend reads it first.
            stream
                .write_all(preamble)
                .await
                .map_err(|source| ConnectError::Io {
                    addr: addr.to_string(),
                    source,
                })?;
        }
        match tls {
            None => Ok(BackendStream::Plain(stream)),
            Some(tls) => match tls.handshake(stream).await {
                Ok(stream) => Ok(BackendStream::tls(stream)),
                Err(source) => Err(ConnectError::Tls {
                    addr: addr.to_string(),
                    source,
                }),
            },
        }
    };
    tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| ConnectError::Timeout {
            addr: addr.to_string(),
        })?
}

type Sender = SendRequest<Incoming>;

/// Where a pooled connection goes: a backend address, reached plainly or with one TLS client.
/// Connections are shared only between backends reached the same way (two pools may name one address,
/// one plainly and one over TLS, or with different TLS settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolKey {
    pub addr: String,
    pub tls: Option<ClientId>,
    /// The client a connection was opened for, when it began with a PROXY header naming that client:
    /// such a connection serves no one else.
    pub client: Option<SocketAddr>,
    /// The worker runtime whose idle connections are used (0 with one runtime): the client
    /// connection's. A backend connection's task runs on the runtime that opened it, so a request served
    /// on another worker's thread would wake that thread for every read and write.
    pub worker: usize,
}

impl PoolKey {
    pub fn new(
        addr: &str,
        tls: Option<&BackendTls>,
        client: Option<SocketAddr>,
        worker: usize,
    ) -> PoolKey {
        PoolKey {
            addr: addr.to_string(),
            tls: tls.map(BackendTls::id),
            client,
            worker,
        }
    }
}

/// An idle connection, and how it was made (TLS client, PROXY header's client).
struct Idle {
    tls: Option<ClientId>,
    client: Option<SocketAddr>,
    sender: Sender,
}

/// Idle connections by address; the few TLS clients an address may be reached with share its list.
type IdleLists = HashMap<String, Vec<Idle>>;

pub struct Upstream {
    /// One pool per worker runtime (one in all with one runtime), each only ever locked from its own
    /// worker's thread on the request path. By address first, so a checkout looks up a borrowed `&str`.
    idle: Vec<Mutex<IdleLists>>,
    /// The gateway's task tracker: each backend connection's task is tracked, so shutdown waits for the
    /// ones still carrying a response (idle ones are dropped first, see `retain`).
    tasks: TaskTracker,
}

impl Upstream {
    /// A pool for each of `workers` runtimes (at least one).
    pub fn new(tasks: TaskTracker, workers: usize) -> Upstream {
        Upstream {
            idle: (0..workers.max(1)).map(|_| Mutex::default()).collect(),
            tasks,
        }
    }

    /// The idle connections of `worker`.
    fn idle(&self, worker: usize) -> &Mutex<IdleLists> {
        &self.idle[worker % self.idle.len()]
    }

    /// A sender ready for one request to `key.addr` (over TLS with `tls`, beginning with `preamble` for
    /// `key.client`): a pooled connection made the same way if one is alive, else a new one.
    pub async fn checkout(
        &self,
        key: &PoolKey,
        tls: Option<&BackendTls>,
        preamble: &[u8],
        connect_timeout: Duration,
    ) -> Result<Sender, ConnectError> {
        let addr = key.addr.as_str();
        while let Some(mut sender) = self.pop(key) {
            if sender.is_closed() {
                continue;
            }
            // A connection checked in at the end of a body may need a moment to become ready again.
            if let Ok(Ok(())) = tokio::time::timeout(connect_timeout, sender.ready()).await {
                return Ok(sender);
            }
        }
        let stream = connect(addr, tls, connect_timeout, preamble).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ConnectError::Handshake {
                addr: addr.to_string(),
                source,
            })?;
        self.tasks.spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%error, "backend connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn pop(&self, key: &PoolKey) -> Option<Sender> {
        let mut idle = self
            .idle(key.worker)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key.addr.as_str())?;
        // The most recently used first; with one way of reaching the address, the last entry.
        let at = list
            .iter()
            .rposition(|i| i.tls == key.tls && i.client == key.client)?;
        Some(list.remove(at).sender)
    }

    /// Returns a connection whose last response has been read completely.
    pub fn checkin(&self, key: &PoolKey, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self
            .idle(key.worker)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Once the gateway shuts down (its tracker closed), a connection is not kept for later: its
        // task would hold the shutdown up until the drain timeout. Asked under the lock, which shutdown
        // takes after closing the tracker to empty the pool: a connection is either seen closed here or
        // emptied there.
        if self.tasks.is_closed() {
            return;
        }
        let list = idle.entry(key.addr.clone()).or_default();
        // Connections made for one client each (PROXY protocol) count against the same bound: the
        // address's idle connections stay few however many clients it serves.
        if list.iter().filter(|i| i.tls == key.tls).count() < MAX_IDLE_PER_BACKEND {
            list.push(Idle {
                tls: key.tls,
                client: key.client,
                sender,
            });
        }
    }

    /// Closes idle connections `keep` (given the address and the TLS client) refuses, every worker's:
    /// those to backends a reload removed, or made with a TLS client it replaced.
    pub fn retain(&self, keep: impl Fn(&str, Option<ClientId>) -> bool) {
        for idle in &self.idle {
            let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|addr, list| {
                list.retain(|i| keep(addr, i.tls));
                !list.is_empty()
            });
        }
    }
}

/// What a response body holds for its backend says whether the connection may be pooled again once the
/// response is done (not when the backend drains).
pub trait Reuse {
    fn reusable(&self) -> bool;
}

/// A backend's response body on its way to the client. When it has been read to the end, its connection
/// goes back to the pool under `key`; `held` (the backend's live-connection guard) is kept until the body
/// is done or dropped.
pub struct UpstreamBody<H: Reuse> {
    inner: Incoming,
    reuse: Option<(Arc<Upstream>, PoolKey, Sender)>,
    held: H,
}

impl<H: Reuse> UpstreamBody<H> {
    pub fn new(
        inner: Incoming,
        upstream: Arc<Upstream>,
        key: PoolKey,
        sender: Sender,
        held: H,
    ) -> UpstreamBody<H> {
        UpstreamBody {
            inner,
            reuse: Some((upstream, key, sender)),
            held,
        }
    }
}

impl<H: Reuse> UpstreamBody<H> {
    fn finish(&mut self) {
        if let Some((upstream, key, sender)) = self.reuse.take()
            && self.held.reusable()
        {
            upstream.checkin(&key, sender);
        }
    }
}

impl<H: Reuse> Drop for UpstreamBody<H> {
    fn drop(&mut self) {
        // hyper never polls a body that is empty from the start (204, 304, HEAD, `Content-Length: 0`):
        // such a response is complete all the same, and its connection reusable.
        if self.inner.is_end_stream() {
            self.finish();
        }
    }
}

impl<H: Reuse + Unpin> Body for UpstreamBody<H> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            None => self.finish(),
            Some(Ok(_)) if self.inner.is_end_stream() => self.finish(),
            Some(Ok(_)) => {}
            Some(Err(_)) => self.reuse = None,
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
