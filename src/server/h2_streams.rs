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
use tokio::time::Instant;

use crate::body::{BoxError, ProxyBody};

/// `waiting_since` of a body that is not waiting for the client.
const NOT_WAITING: u64 = u64::MAX;

/// The streams of one connection.
pub struct Streams {
    /// The clock bodies note their waits on (milliseconds since this), and the idle time is dated by
    /// (nanoseconds since this).
    epoch: Instant,
    open: AtomicUsize,
    /// When the count of open streams last fell to zero (at first: the connection's start), in
    /// nanoseconds since `epoch`. Streams opening and closing wake no one: the idle wait looks at the
    /// count when its timer fires, so a request pays one clock read, not a wakeup and a timer.
    idle_since: AtomicU64,
    /// The response bodies being sent, for the watchdog; dead ones are pruned as it looks, and when the
    /// list has doubled since the last pruning (so it holds at most about twice the live ones).
    bodies: Mutex<Bodies>,
}

#[derive(Default)]
struct Bodies {
    slots: Vec<Weak<BodySlot>>,
    /// The length at which dead slots are pruned next.
    prune_at: usize,
}

/// The shortest wait before `idle_for` looks again at a connection with a stream open; the shortest
/// `send` the watchdog counts with.
const MIN_RECHECK: Duration = Duration::from_millis(100);

/// The fewest slots `Bodies` prunes at.
const PRUNE_AT_LEAST: usize = 32;

impl Streams {
    pub fn new() -> Arc<Streams> {
        Arc::new(Streams {
            epoch: Instant::now(),
            open: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            bodies: Mutex::default(),
        })
    }

    /// Counts a stream open until the guard is dropped.
    pub fn open(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::AcqRel);
        OpenStream(Arc::clone(self))
    }

    /// Resolves once no stream has been open for `idle`, counted from this call at the earliest.
    pub async fn idle_for(&self, idle: Duration) {
        let called = Instant::now();
        loop {
            // A stream open now cannot close sooner than now, so the connection cannot be idle before
            // `idle` from now; with none open, it is idle from when the last one closed. Either way
            // the deadline is never early, and at the last one the count is zero and has stayed so.
            let deadline = if self.open.load(Ordering::Acquire) == 0 {
                let since = self.idle_since.load(Ordering::Acquire);
                (self.epoch + Duration::from_nanos(since)).max(called) + idle
            } else {
                // Looked at again no sooner than `MIN_RECHECK`: a long stream (a tunnel) under a tiny
                // timeout must not keep waking the connection.
                Instant::now() + idle.max(MIN_RECHECK)
            };
            if deadline <= Instant::now() && self.open.load(Ordering::Acquire) == 0 {
                return;
            }
            tokio::time::sleep_until(deadline).await;
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
        let mut bodies = lock(&self.bodies);
        if bodies.slots.len() >= bodies.prune_at {
            bodies.slots.retain(|slot| slot.strong_count() > 0);
            bodies.prune_at = (bodies.slots.len() * 2).max(PRUNE_AT_LEAST);
        }
        bodies.slots.push(Arc::downgrade(&slot));
        drop(bodies);
        StreamBody {
            slot,
            streams: Arc::clone(self),
        }
    }

    /// Runs for the connection's life, never returning: drops every body that has waited for its client
    /// for `send`.
    ///
    /// Bodies starting to wait wake no one (every response would pay for it): the watchdog looks at
    /// them at least every `send`, and sooner when the oldest wait runs out. A body that starts waiting
    /// after a look is due no sooner than `send` after that look, so it is never found late.
    pub async fn release_stalled(&self, send: Duration) {
        let limit = u64::try_from(send.as_millis()).unwrap_or(u64::MAX);
        loop {
            let now = self.now();
            let oldest = self.release_waited(now, limit);
            let next = oldest.min(now);
            // A timeout shorter than `MIN_RECHECK` counts as that long here: a tiny one must not keep an
            // idle connection waking.
            let deadline = self.epoch + Duration::from_millis(next) + send.max(MIN_RECHECK);
            tokio::time::sleep_until(deadline).await;
        }
    }

    /// Drops every body that has waited for its client `limit` ms at `now`, and prunes dead ones;
    /// returns when the longest wait left began (`NOT_WAITING` if none waits).
    fn release_waited(&self, now: u64, limit: u64) -> u64 {
        let mut oldest = NOT_WAITING;
        let mut bodies = lock(&self.bodies);
        bodies.slots.retain(|slot| {
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
        bodies.prune_at = (bodies.slots.len() * 2).max(PRUNE_AT_LEAST);
        oldest
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(NOT_WAITING - 1)
    }
}

/// One open stream, counted from its request until its response is sent (or its tunnel ends).
pub struct OpenStream(Arc<Streams>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        let streams = &self.0;
        // The last stream dates the idle time before the count says zero: `idle_for`, seeing zero,
        // must never read the date of an older idle time.
        let mut open = streams.open.load(Ordering::Acquire);
        loop {
            if open == 1 {
                let since = u64::try_from(streams.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
                streams.idle_since.store(since, Ordering::Release);
            }
            match streams.open.compare_exchange_weak(
                open,
                open.saturating_sub(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => open = now,
            }
        }
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
                waiting_since.store(self.streams.now(), Ordering::Release);
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
        // Of two streams, the first to close leaves the connection busy; the idle time runs from the
        // second.
        let (first, second) = (streams.open(), streams.open());
        let start = Instant::now();
        let closing = async {
            tokio::time::sleep(idle / 4).await;
            drop(first);
            tokio::time::sleep(idle).await;
            drop(second);
        };
        tokio::join!(closing, async {
            tokio::time::timeout(idle * 5, streams.idle_for(idle))
                .await
                .expect("idle after both streams");
        });
        assert_eq!(start.elapsed(), idle / 4 + idle + idle);
        // Idle since long before the wait began: the wait still lasts `idle` (after a GOAWAY, a client
        // gets the whole header timeout to close).
        tokio::time::sleep(idle * 2).await;
        let start = Instant::now();
        tokio::time::timeout(idle * 3, streams.idle_for(idle))
            .await
            .expect("idle");
        assert_eq!(start.elapsed(), idle);
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

    #[tokio::test(start_paused = true)]
    async fn a_body_that_starts_waiting_between_looks_is_released_on_time() {
        let streams = Streams::new();
        let send = Duration::from_secs(60);
        let watchdog = tokio::spawn({
            let streams = Arc::clone(&streams);
            async move { streams.release_stalled(send).await }
        });
        // The watchdog has looked (no body yet) and sleeps until `send`; the body comes a third of the
        // way and is never asked for a frame: it is due `send` after it came, not at the next look.
        tokio::time::sleep(send / 3).await;
        let _stalled = streams.body(body::full("never taken"), Some(streams.open()));
        tokio::time::sleep(send - Duration::from_millis(1)).await;
        assert_eq!(streams.open.load(Ordering::Acquire), 1, "not yet");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(streams.open.load(Ordering::Acquire), 0, "released");
        watchdog.abort();
    }

    #[tokio::test]
    async fn the_list_of_bodies_holds_about_the_live_ones() {
        let streams = Streams::new();
        let live: Vec<StreamBody> = (0..10)
            .map(|_| streams.body(body::full("live"), None))
            .collect();
        for _ in 0..10_000 {
            drop(streams.body(body::full("done"), None));
        }
        let held = lock(&streams.bodies).slots.len();
        assert!(
            held <= 2 * live.len() + PRUNE_AT_LEAST,
            "{held} slots for {} live bodies",
            live.len()
        );
    }
}
