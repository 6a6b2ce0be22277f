//! What one HTTP/2 connection keeps of its streams (`h2.rs`): how many are open, for the connection's
//! idle timer and for its end after a GOAWAY; and the response bodies hyper is sending, so that one whose
//! client stops taking it releases its backend after `timeouts.send`, as an HTTP/1.1 client that stops
//! reading does.
//!
//! Over HTTP/2 a client that stops reading a response does not stop the socket: it leaves the stream's
//! flow-control window closed, and hyper simply stops asking the body for more. Nothing blocks, so no
//! write timeout can see it. The body is asked for its next frame only while the client takes them, so
//! a body that has handed over a frame and not been asked again for `timeouts.send` belongs to a client
//! that stopped reading: the connection's watchdog (`release_stalled`) then drops it, with the backend
//! connection behind it; when hyper asks again, the body fails and the stream is reset.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::body::{BoxError, ProxyBody};

/// `waiting_since` of a body that is not waiting for the client.
const NOT_WAITING: u64 = u64::MAX;

/// The streams of one connection.
pub struct Streams {
    /// The clock bodies note their waits on (milliseconds since this).
    epoch: Instant,
    open: AtomicUsize,
    /// Signalled when a stream opens or closes.
    changed: Notify,
    /// The response bodies being sent, for the watchdog; dead ones are pruned as it looks.
    bodies: Mutex<Vec<Weak<BodySlot>>>,
    /// Signalled when a body starts waiting for the client.
    waiting: Notify,
}

impl Streams {
    pub fn new() -> Arc<Streams> {
        Arc::new(Streams {
            epoch: Instant::now(),
            open: AtomicUsize::new(0),
            changed: Notify::new(),
            bodies: Mutex::default(),
            waiting: Notify::new(),
        })
    }

    /// Counts a stream open until the guard is dropped.
    pub fn open(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
        OpenStream(Arc::clone(self))
    }

    /// Resolves once no stream has been open for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the count is read, so a stream closing in between is not missed.
            changed.as_mut().enable();
            if self.open.load(Ordering::Acquire) == 0 {
                tokio::select! {
                    () = tokio::time::sleep(idle) => return,
                    () = changed => {}
                }
            } else {
                changed.await;
            }
        }
    }

    /// A response body for hyper to send on `stream` (`None`: the stream is held elsewhere), watched by
    /// `release_stalled`.
    pub fn body(self: &Arc<Self>, body: ProxyBody, stream: Option<OpenStream>) -> StreamBody {
        let slot = Arc::new(BodySlot {
            held: Mutex::new(Some(Held {
                body,
                _stream: stream,
            })),
            // hyper asks for the first frame as soon as the stream has a window: until then the body
            // waits for the client like any other.
            waiting_since: AtomicU64::new(self.now()),
        });
        lock(&self.bodies).push(Arc::downgrade(&slot));
        self.waiting.notify_one();
        StreamBody {
            slot,
            streams: Arc::clone(self),
        }
    }

    /// Runs for the connection's life, never returning: drops every body that has waited for its client
    /// for `send`.
    pub async fn release_stalled(&self, send: Duration) {
        loop {
            let waiting = self.waiting.notified();
            tokio::pin!(waiting);
            // Registered before the bodies are looked at, so a body that starts waiting meanwhile wakes
            // this up.
            waiting.as_mut().enable();
            let now = self.now();
            let limit = u64::try_from(send.as_millis()).unwrap_or(u64::MAX);
            let mut oldest = NOT_WAITING;
            lock(&self.bodies).retain(|slot| {
                let Some(slot) = slot.upgrade() else {
                    return false;
                };
                let since = slot.waiting_since.load(Ordering::Acquire);
                if since != NOT_WAITING && now.saturating_sub(since) >= limit {
                    if lock(&slot.held).take().is_some() {
                        tracing::debug!(
                            waited_ms = now - since,
                            "HTTP/2 client stopped taking a response; its backend is released"
                        );
                    }
                    return false;
                }
                oldest = oldest.min(since);
                true
            });
            if oldest == NOT_WAITING {
                waiting.await;
            } else {
                let deadline = self.epoch + Duration::from_millis(oldest) + send;
                tokio::time::sleep_until(deadline).await;
            }
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(NOT_WAITING - 1)
    }
}

/// One open stream, counted from its request until its response is sent (or its tunnel ends).
pub struct OpenStream(Arc<Streams>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// A response body being sent, and the stream it holds open.
struct BodySlot {
    /// Taken by the watchdog from a client that stopped taking it.
    held: Mutex<Option<Held>>,
    /// When the body last handed hyper a frame (or its head was sent) without being asked for the next,
    /// on the connection's clock; `NOT_WAITING` while it waits for its backend instead.
    waiting_since: AtomicU64,
}

struct Held {
    body: ProxyBody,
    _stream: Option<OpenStream>,
}

/// The body hyper sends on a stream.
pub struct StreamBody {
    slot: Arc<BodySlot>,
    streams: Arc<Streams>,
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut held = lock(&self.slot.held);
        let Some(held) = held.as_mut() else {
            return Poll::Ready(Some(Err("the client stopped taking this response".into())));
        };
        let polled = Pin::new(&mut held.body).poll_frame(cx);
        let waiting_since = &self.slot.waiting_since;
        match &polled {
            Poll::Ready(Some(Ok(_))) => {
                // Waiting for the client from now on (until hyper asks again, which it does at once
                // while the client's window is open).
                if waiting_since.swap(self.streams.now(), Ordering::AcqRel) == NOT_WAITING {
                    self.streams.waiting.notify_one();
                }
            }
            _ => waiting_since.store(NOT_WAITING, Ordering::Release),
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        lock(&self.slot.held)
            .as_ref()
            .is_none_or(|held| held.body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        lock(&self.slot.held)
            .as_ref()
            .map_or_else(SizeHint::default, |held| held.body.size_hint())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;

    // Paused time: the timers are decided by the clock jumping ahead.
    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_without_open_streams() {
        let streams = Streams::new();
        let idle = Duration::from_secs(60);
        let open = streams.open();
        let waited = tokio::time::timeout(idle * 3, streams.idle_for(idle)).await;
        assert!(waited.is_err(), "idle while a stream is open");
        let start = Instant::now();
        drop(open);
        tokio::time::timeout(idle * 3, streams.idle_for(idle))
            .await
            .expect("idle once the stream closed");
        assert_eq!(start.elapsed(), idle);
        // A stream opened during the wait restarts it once it closes.
        let start = Instant::now();
        let reopen = async {
            tokio::time::sleep(idle / 2).await;
            let open = streams.open();
            tokio::time::sleep(idle).await;
            drop(open);
        };
        tokio::join!(reopen, async {
            tokio::time::timeout(idle * 5, streams.idle_for(idle))
                .await
                .expect("idle after the second stream");
        });
        assert_eq!(start.elapsed(), idle / 2 + idle + idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_its_client_stops_taking_is_released_after_the_send_timeout() {
        let streams = Streams::new();
        let send = Duration::from_secs(60);
        let taken = streams.body(body::full("taken"), Some(streams.open()));
        let mut stalled = streams.body(body::full("never taken"), Some(streams.open()));
        let watchdog = tokio::spawn({
            let streams = Arc::clone(&streams);
            async move { streams.release_stalled(send).await }
        });
        // One body is read to its end at once; the other is never asked for a frame.
        let mut taken = taken;
        let frame = std::future::poll_fn(|cx| Pin::new(&mut taken).poll_frame(cx)).await;
        assert!(frame.is_some_and(|f| f.is_ok()));
        let end = std::future::poll_fn(|cx| Pin::new(&mut taken).poll_frame(cx)).await;
        assert!(end.is_none());
        tokio::time::sleep(send - Duration::from_millis(1)).await;
        assert_eq!(streams.open.load(Ordering::Acquire), 2, "not yet");
        tokio::time::sleep(Duration::from_millis(2)).await;
        // Released: its stream no longer counts, and hyper's next ask fails (a stream reset).
        assert_eq!(streams.open.load(Ordering::Acquire), 1);
        let next = std::future::poll_fn(|cx| Pin::new(&mut stalled).poll_frame(cx)).await;
        assert!(next.is_some_and(|f| f.is_err()));
        drop(taken);
        assert_eq!(streams.open.load(Ordering::Acquire), 0);
        watchdog.abort();
    }
}
