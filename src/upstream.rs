//! Connections to backends: the connect (TCP, then TLS for a TLS backend: `tls_client.rs`), the stream
//! both give (`stream.rs`), one HTTP/1.1 request and its response on a connection (`exchange.rs`), and
//! keep-alive connections, pooled per backend address and TLS client, and per worker runtime when the
//! gateway has several.
//!
//! wsgate keeps its own small pool (rather than a generic client) so that a request whose backend cannot be
//! reached is still whole and can go to the next backend, and so that a pooled connection the backend
//! closed meanwhile hands the unsent request back for a retry.

mod exchange;
mod stream;
mod tls_client;

pub use exchange::{
    Answer, BackendConn, Exchange, ExchangeError, Patience, Recycle, Reuse, UpstreamBody,
};
pub use stream::BackendStream;
pub use tls_client::{BackendTls, ClientId, TlsClients};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::config::split_host_port;

/// Idle connections kept per backend address and TLS client, in each worker runtime's pool; more are
/// closed.
const MAX_IDLE_PER_BACKEND: usize = 64;
/// An idle connection older than this is closed rather than used (nginx's upstream `keepalive_timeout`):
/// a NAT or firewall between wsgate and a backend may have forgotten it without a word, and a request
/// written into such a connection waits for `timeouts.backend_response`.
const MAX_IDLE_TIME: Duration = Duration::from_secs(60);

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
    /// connection's. A backend socket is registered with the runtime that opened it, so a request served
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
    conn: BackendConn,
    /// When it was returned to the pool.
    since: Instant,
}

/// Idle connections by address; the few TLS clients an address may be reached with share its list.
type IdleLists = HashMap<String, Vec<Idle>>;

pub struct Upstream {
    /// One pool per worker runtime (one in all with one runtime), each only ever locked from its own
    /// worker's thread on the request path. By address first, so a checkout looks up a borrowed `&str`.
    idle: Vec<Mutex<IdleLists>>,
    /// The gateway's task tracker: once it is closed (shutdown), no connection is pooled again.
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

    /// A connection for one request to `key.addr` (over TLS with `tls`, beginning with `preamble` for
    /// `key.client`): a pooled connection made the same way if one is still open, else a new one.
    pub async fn checkout(
        &self,
        key: &PoolKey,
        tls: Option<&BackendTls>,
        preamble: &[u8],
        connect_timeout: Duration,
    ) -> Result<BackendConn, ConnectError> {
        while let Some(idle) = self.pop(key) {
            let mut conn = idle.conn;
            if idle.since.elapsed() < MAX_IDLE_TIME && conn.is_usable() {
                return Ok(conn);
            }
        }
        let stream = connect(&key.addr, tls, connect_timeout, preamble).await?;
        Ok(BackendConn::new(stream))
    }

    fn pop(&self, key: &PoolKey) -> Option<Idle> {
        let mut idle = self
            .idle(key.worker)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key.addr.as_str())?;
        // The most recently used first; with one way of reaching the address, the last entry.
        let at = list
            .iter()
            .rposition(|i| i.tls == key.tls && i.client == key.client)?;
        Some(list.remove(at))
    }

    /// Returns a connection whose last response has been read completely.
    pub fn checkin(&self, key: &PoolKey, conn: BackendConn) {
        let mut idle = self
            .idle(key.worker)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Once the gateway shuts down (its tracker closed), a connection is not kept for later. Asked
        // under the lock, which shutdown takes after closing the tracker to empty the pool: a connection
        // is either seen closed here or emptied there.
        if self.tasks.is_closed() {
            return;
        }
        // The address's list is there but for its first connection: looked up by `&str` first, so the
        // key is not copied for every return.
        let list = match idle.get_mut(key.addr.as_str()) {
            Some(list) => list,
            None => idle.entry(key.addr.clone()).or_default(),
        };
        // Nothing watches an idle connection: the oldest one is looked at on each return, so those the
        // backend closed (its keep-alive timeout) do not linger while the address is in use.
        let now = Instant::now();
        if list.first_mut().is_some_and(|oldest| {
            now.duration_since(oldest.since) >= MAX_IDLE_TIME || !oldest.conn.is_usable()
        }) {
            list.remove(0);
        }
        // Connections made for one client each (PROXY protocol) count against the same bound: the
        // address's idle connections stay few however many clients it serves.
        if list.iter().filter(|i| i.tls == key.tls).count() < MAX_IDLE_PER_BACKEND {
            list.push(Idle {
                tls: key.tls,
                client: key.client,
                conn,
                since: now,
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// The local address of the connection `upstream` hands out for `key` (a pooled one, or a new one).
    async fn checkout_port(upstream: &Upstream, key: &PoolKey) -> (BackendConn, SocketAddr) {
        let conn = upstream
            .checkout(key, None, &[], Duration::from_secs(5))
            .await
            .expect("checkout");
        let local = conn.local_addr().expect("a plain socket");
        (conn, local)
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_used_for_a_minute_and_then_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepting = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let upstream = Upstream::new(TaskTracker::new(), 1);
        let key = PoolKey::new(&addr, None, None, 0);
        let (conn, first) = checkout_port(&upstream, &key).await;
        upstream.checkin(&key, conn);
        tokio::time::advance(MAX_IDLE_TIME - Duration::from_secs(1)).await;
        let (conn, again) = checkout_port(&upstream, &key).await;
        assert_eq!(
            again, first,
            "the pooled connection, idle for less than a minute"
        );
        upstream.checkin(&key, conn);
        tokio::time::advance(MAX_IDLE_TIME).await;
        let (_conn, fresh) = checkout_port(&upstream, &key).await;
        assert_ne!(fresh, first, "a new connection after a minute idle");
        accepting.abort();
    }
}
