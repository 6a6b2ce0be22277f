//! The record of one accepted client connection (`ClientConn`): who it is, which listener it came on
//! (`Listener`), where it is between requests (`Phase`), and its place under the listener's connection
//! limit (`ConnLimit`). Shared by the server layer, which reads and times the socket, and the proxy layer,
//! which serves its requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::task::Waker;

use futures_util::task::AtomicWaker;
use prometheus::IntGauge;
use tokio::sync::Notify;

use crate::admission::{Counted, Scope};
use crate::config::ListenerAdmission;

/// The listener a connection came in on, as configured when the connection was accepted (a reload makes a
/// new one; the scope stays).
pub struct Listener {
    pub name: String,
    /// The worker runtime whose socket accepted the connection (0 when the gateway has one runtime). Its
    /// HTTP requests use that worker's backend connections (`upstream::Upstream`), whose tasks run on
    /// the same thread.
    pub worker: usize,
    pub admission: ListenerAdmission,
    /// Per-client connection counts and the handshake gate, kept across reloads.
    pub scope: Arc<Scope>,
}

/// One accepted client connection, shared by its HTTP requests and, after an upgrade, by its tunnel.
/// Dropping the last reference marks the connection closed in the metrics and frees its place under the
/// listener's limits.
pub struct ClientConn {
    /// The client's address: the TCP peer's, or the one its PROXY protocol header gave.
    pub peer: SocketAddr,
    /// wsgate's own address the connection came to (behind a load balancer, the balancer's connection):
    /// what a PROXY header toward a backend names as destination. A PROXY header's own destination (the
    /// balancer's address) is not kept.
    pub local: SocketAddr,
    pub tls: bool,
    pub listener: Arc<Listener>,
    /// Set once the connection speaks HTTP/2 (ALPN or h2c), before its first request is served.
    h2: AtomicBool,
    /// Inline, not an `Arc` of its own: one allocation less for every connection (an idle tunnel's too).
    pub phase: Phase,
    active: IntGauge,
    _slot: ConnSlot,
    /// The client's place under `max_connections_per_ip`, if the listener has one.
    _per_client: Option<Counted>,
}

/// What a connection was given when it was admitted: its places under the listener's limits and the
/// gauge counting it.
pub struct Admitted {
    pub slot: ConnSlot,
    pub per_client: Option<Counted>,
    /// The listener's open-connections gauge, counted up by `ClientConn::new` and down on drop.
    pub active: IntGauge,
}

impl ClientConn {
    /// The record of a connection just admitted.
    pub fn new(
        (peer, local): (SocketAddr, SocketAddr),
        tls: bool,
        listener: Arc<Listener>,
        admitted: Admitted,
    ) -> ClientConn {
        admitted.active.inc();
        ClientConn {
            peer,
            local,
            tls,
            listener,
            h2: AtomicBool::new(false),
            phase: Phase::default(),
            active: admitted.active,
            _slot: admitted.slot,
            _per_client: admitted.per_client,
        }
    }
}

impl ClientConn {
    /// The connection speaks HTTP/2 from now on.
    pub fn set_h2(&self) {
        self.h2.store(true, Ordering::Relaxed);
    }

    pub fn is_h2(&self) -> bool {
        self.h2.load(Ordering::Relaxed)
    }

    /// The client's HTTP version as a metric label and log field: `h1` or `h2`.
    pub fn protocol(&self) -> &'static str {
        if self.is_h2() { "h2" } else { "h1" }
    }
}

impl Drop for ClientConn {
    fn drop(&mut self) {
        self.active.dec();
    }
}

/// Where a client connection is between requests; shared by the stream (`server::client_io`, which arms
/// the header and keep-alive timers by it) and the request handler (which moves it on).
#[derive(Debug, Default)]
pub struct Phase {
    state: AtomicU8,
    /// The task last left waiting in a read. hyper may already be waiting on the socket when a response
    /// ends (it watches for the client hanging up meanwhile), and will not read again until woken: `idle`
    /// wakes it so that the idle timer gets armed and polled.
    reader: AtomicWaker,
}

/// The values of `Phase`, in the order a connection goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Stage {
    /// Accepted; its first request has not begun.
    WaitingFirst = 0,
    /// A response has just been sent: the keep-alive idle timer is to be armed.
    IdleStarted = 1,
    /// Waiting for the next request on a keep-alive connection.
    Idle = 2,
    /// A request head is arriving.
    Headers = 3,
    /// A request is being served: backend timeouts govern.
    Busy = 4,
    /// Left to a tunnel, which keeps its own timers.
    Upgraded = 5,
}

impl Phase {
    pub fn get(&self) -> Stage {
        match self.state.load(Ordering::Acquire) {
            0 => Stage::WaitingFirst,
            1 => Stage::IdleStarted,
            2 => Stage::Idle,
            3 => Stage::Headers,
            4 => Stage::Busy,
            _ => Stage::Upgraded,
        }
    }

    /// Moves to `stage` (the stream's own transitions: idle armed, head begun).
    pub fn set(&self, stage: Stage) {
        self.state.store(stage as u8, Ordering::Release);
    }

    /// A request head has arrived and is being served.
    pub fn busy(&self) {
        self.set(Stage::Busy);
    }

    /// The response has been sent completely: the connection waits for its next request.
    pub fn idle(&self) {
        self.set(Stage::IdleStarted);
        self.reader.wake();
    }

    /// The connection has left the HTTP layer (upgraded): the waker of the task that read it is dropped,
    /// since a waker keeps its whole task allocated, and that task is done once the tunnel has its own.
    pub fn upgraded(&self) {
        self.set(Stage::Upgraded);
        drop(self.reader.take());
    }

    /// Registers the task about to wait in a read, so that `idle` can wake it. Called before the stage is
    /// read, so an `idle` from another thread cannot slip in between.
    pub fn register_reader(&self, waker: &Waker) {
        self.reader.register(waker);
    }
}

/// How many client connections a listener holds, and how many it may (`limits.max_connections`, which a
/// reload may change for a listener that stays bound).
pub struct ConnLimit {
    active: AtomicUsize,
    max: AtomicUsize,
    /// Signalled when a connection closes or the maximum changes.
    changed: Notify,
}

impl ConnLimit {
    pub fn new(max: usize) -> ConnLimit {
        ConnLimit {
            active: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            changed: Notify::new(),
        }
    }

    /// Waits for room under the maximum and takes one place. The listener's accept loops call it (one
    /// per worker runtime when the listener has a socket per worker, sharing the one limit), each for a
    /// client it has just accepted: a place seen free is taken with a compare-and-swap, so two loops
    /// never both take the last one.
    pub async fn acquire(self: &Arc<Self>) -> ConnSlot {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the count is read, so a connection closing in between is not missed.
            changed.as_mut().enable();
            let mut active = self.active.load(Ordering::Acquire);
            while active < self.max.load(Ordering::Acquire) {
                match self.active.compare_exchange_weak(
                    active,
                    active + 1,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return ConnSlot(Arc::clone(self)),
                    Err(now) => active = now,
                }
            }
            changed.await;
        }
    }

    /// A lower maximum takes effect as connections close; open ones are not cut.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
        self.changed.notify_waiters();
    }
}

/// One place under a listener's connection limit, given back on drop.
pub struct ConnSlot(Arc<ConnLimit>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    // Paused time: a wait that must not end is decided by the clock jumping ahead, not by sleeping.
    #[tokio::test(start_paused = true)]
    async fn the_connection_limit_follows_its_maximum() {
        let limit = Arc::new(ConnLimit::new(1));
        let first = limit.acquire().await;
        let wait = Duration::from_millis(50);
        assert!(
            tokio::time::timeout(wait, limit.acquire()).await.is_err(),
            "a second place under a maximum of one"
        );
        limit.set_max(2);
        let second = tokio::time::timeout(Duration::from_secs(10), limit.acquire())
            .await
            .expect("a raised maximum makes room at once");
        limit.set_max(1);
        drop(first);
        assert!(
            tokio::time::timeout(wait, limit.acquire()).await.is_err(),
            "a lowered maximum is kept as connections close"
        );
        drop(second);
        let _third = tokio::time::timeout(Duration::from_secs(10), limit.acquire())
            .await
            .expect("room once under the lowered maximum");
    }

    #[test]
    fn stages_read_back_as_set() {
        let phase = Phase::default();
        assert_eq!(phase.get(), Stage::WaitingFirst);
        for stage in [
            Stage::IdleStarted,
            Stage::Idle,
            Stage::Headers,
            Stage::Busy,
            Stage::Upgraded,
        ] {
            phase.set(stage);
            assert_eq!(phase.get(), stage);
        }
    }
}
