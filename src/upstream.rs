//! Keep-alive HTTP/1.1 connections to backends, pooled per backend address.
//!
//! wsgate keeps its own small pool (rather than a generic client) so that a request whose backend cannot be
//! reached is still whole and can go to the next backend, and so that a pooled connection the backend
//! closed meanwhile hands the unsent request back for a retry.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;

use crate::body::BoxError;
use crate::config::split_host_port;

/// Idle connections kept per backend; more are closed.
const MAX_IDLE_PER_BACKEND: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} timed out")]
    Timeout { addr: String },
    #[error("connect to {addr}: {source}")]
    Io {
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

/// Opens a TCP connection to a backend (`host:port`), bounded by `timeout`, with Nagle off.
pub async fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let target = split_host_port(addr).ok_or_else(|| ConnectError::Io {
        addr: addr.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not host:port"),
    })?;
    let stream = tokio::time::timeout(timeout, TcpStream::connect(target))
        .await
        .map_err(|_| ConnectError::Timeout {
            addr: addr.to_string(),
        })?
        .map_err(|source| ConnectError::Io {
            addr: addr.to_string(),
            source,
        })?;
    // Small frames (pings, chat messages) must not wait for Nagle's algorithm.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

type Sender = SendRequest<Incoming>;

pub struct Upstream {
    idle: Mutex<HashMap<String, Vec<Sender>>>,
    /// The gateway's task tracker: each backend connection's task is tracked, so shutdown waits for the
    /// ones still carrying a response (idle ones are dropped first, see `retain`).
    tasks: TaskTracker,
}

impl Upstream {
    pub fn new(tasks: TaskTracker) -> Upstream {
        Upstream {
            idle: Mutex::default(),
            tasks,
        }
    }

    /// A sender ready for one request to `addr`: a pooled connection if one is alive, else a new one.
    pub async fn checkout(
        &self,
        addr: &str,
        connect_timeout: Duration,
    ) -> Result<Sender, ConnectError> {
        while let Some(mut sender) = self.pop(addr) {
            if sender.is_closed() {
                continue;
            }
            // A connection checked in at the end of a body may need a moment to become ready again.
            if let Ok(Ok(())) = tokio::time::timeout(connect_timeout, sender.ready()).await {
                return Ok(sender);
            }
        }
        let stream = connect(addr, connect_timeout).await?;
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

    fn pop(&self, addr: &str) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.get_mut(addr).and_then(Vec::pop)
    }

    /// Returns a connection whose last response has been read completely.
    pub fn checkin(&self, addr: &str, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Once the gateway shuts down (its tracker closed), a connection is not kept for later: its
        // task would hold the shutdown up until the drain timeout. Asked under the lock, which shutdown
        // takes after closing the tracker to empty the pool: a connection is either seen closed here or
        // emptied there.
        if self.tasks.is_closed() {
            return;
        }
        let list = idle.entry(addr.to_string()).or_default();
        if list.len() < MAX_IDLE_PER_BACKEND {
            list.push(sender);
        }
    }

    /// Closes idle connections to backends not in `keep` (after a reload removed them).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|addr, _| keep(addr));
    }
}

/// A backend's response body on its way to the client. When it has been read to the end, its connection
/// goes back to the pool of `addr`; `held` (the backend's live-connection guard) is kept until the body is
/// done or dropped.
pub struct UpstreamBody<H> {
    inner: Incoming,
    reuse: Option<(Arc<Upstream>, String, Sender)>,
    _held: H,
}

impl<H> UpstreamBody<H> {
    pub fn new(
        inner: Incoming,
        upstream: Arc<Upstream>,
        addr: String,
        sender: Sender,
        held: H,
    ) -> UpstreamBody<H> {
        UpstreamBody {
            inner,
            reuse: Some((upstream, addr, sender)),
            _held: held,
        }
    }

    fn finish(&mut self) {
        if let Some((upstream, addr, sender)) = self.reuse.take() {
            upstream.checkin(&addr, sender);
        }
    }
}

impl<H> Drop for UpstreamBody<H> {
    fn drop(&mut self) {
        // hyper never polls a body that is empty from the start (204, 304, HEAD, `Content-Length: 0`):
        // such a response is complete all the same, and its connection reusable.
        if self.inner.is_end_stream() {
            self.finish();
        }
    }
}

impl<H: Unpin> Body for UpstreamBody<H> {
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
