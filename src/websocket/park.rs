//! The park: where quiet tunnels wait without a task of their own (docs/ARCHITECTURE.md, "The
//! tunnel").
//!
//! Most WebSocket connections are quiet most of the time, and a quiet tunnel's task (its future, with
//! tokio's task header, timer entry and cache-line padding) and tokio's registrations of its two sockets
//! are most of what it costs. A tunnel over sockets (plain, or TLS sessions over them) with nothing moving
//! for its route's `park_after` gives them up (`tunnel.rs`): its sockets leave the runtime's reactor for
//! the park's own epoll set (`mio`), a TLS session going along with its socket, and the tunnel itself waits
//! boxed in the park's table, with its next deadline in the park's one timer. The
//! park gives it a task again (`Parked::resume`) as soon as either socket is readable (data, a Close, a
//! hang-up), its deadline comes (a keepalive ping, a pong's timeout, the idle timeout), or the stop
//! signal it was listening to fires (its backend draining, shutdown). Nothing can be missed in between:
//! a socket added to an epoll set while data waits in it is reported at once.
//!
//! One park per worker thread, started by the first tunnel that parks there, so a tunnel resumes on the
//! runtime whose reactor its sockets go back to. Its table is behind a mutex that only parking, resuming
//! and the park's own wake-ups take: never on a busy tunnel's path.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Socket events taken from the park's epoll set per system call.
const EVENTS: usize = 256;
/// Tunnels resumed per wake-up of the park's task before it yields: a drain or shutdown that wakes a
/// hundred thousand tunnels at once does not hold the worker thread (or the table's lock) meanwhile.
const RESUMES_PER_POLL: usize = 1024;

/// A tunnel in the park.
pub(super) trait Parked: Send + 'static {
    /// Its two sockets, watched for readability.
    fn sockets(&self) -> [RawFd; 2];
    /// Back to a task of its own, on the current runtime.
    fn resume(self: Box<Self>);
    /// Ended where it is: the runtime is going away (shutdown did not finish within its drain timeout).
    fn abandon(self: Box<Self>);
}

/// Tunnels handed the same stop signal (every tunnel to a backend, until its next drain change): the
/// park waits once per signal, not once per tunnel. The signal's source and epoch (`tunnel::StopSignal`).
pub(super) type GroupKey = (usize, u64);

struct Entry {
    tunnel: Box<dyn Parked>,
    deadline: Instant,
    group: GroupKey,
}

struct Group {
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
    members: usize,
}

#[derive(Default)]
struct Table {
    entries: Slab<Entry>,
    /// Every entry's deadline, earliest first.
    timers: BTreeSet<(Instant, usize)>,
    groups: HashMap<GroupKey, Group>,
    /// The park's task, to wake when a tunnel comes in that it must look at: one due before its timer,
    /// or the first of a new group (whose signal it must start listening to).
    waker: Option<Waker>,
    /// The deadline the park's timer is set for.
    armed: Option<Instant>,
}

impl Table {
    /// Takes an entry out (its sockets out of the epoll set), if it is still there: an event may name an
    /// entry that an earlier event of the same batch took.
    fn take(&mut self, registry: &mio::Registry, key: usize) -> Option<Box<dyn Parked>> {
        let entry = self.entries.try_remove(key)?;
        self.timers.remove(&(entry.deadline, key));
        if let Some(group) = self.groups.get_mut(&entry.group) {
            group.members -= 1;
            if group.members == 0 {
                self.groups.remove(&entry.group);
            }
        }
        for fd in entry.tunnel.sockets() {
            // Fails only for a socket that is not registered: nothing to undo then.
            let _ = registry.deregister(&mut SourceFd(&fd));
        }
        Some(entry.tunnel)
    }
}

/// The park of one worker thread.
pub(super) struct Park {
    /// The park's epoll set, shared with its task (which waits on it).
    registry: mio::Registry,
    table: Mutex<Table>,
    /// Cleared, under the table's lock, when the park's task is dropped (its runtime shut down): the
    /// park takes no tunnel in after that, and the thread's next tunnel to park starts a new park.
    alive: AtomicBool,
}

thread_local! {
    static HERE: RefCell<Option<Arc<Park>>> = const { RefCell::new(None) };
}

impl Park {
    /// This worker thread's park, started if there is none (or its runtime is gone). `None` if it could
    /// not be started: the tunnel keeps its task.
    pub(super) fn here() -> Option<Arc<Park>> {
        HERE.try_with(|here| {
            let mut here = here.borrow_mut();
            if let Some(park) = here.as_ref().filter(|p| p.alive.load(Ordering::Acquire)) {
                return Some(Arc::clone(park));
            }
            match Park::start() {
                Ok(park) => {
                    *here = Some(Arc::clone(&park));
                    Some(park)
                }
                Err(error) => {
                    tracing::warn!(%error, "the tunnel park could not be started: quiet tunnels keep their tasks");
                    None
                }
            }
        })
        .ok()
        .flatten()
    }

    fn start() -> io::Result<Arc<Park>> {
        let poll = mio::Poll::new()?;
        let registry = poll.registry().try_clone()?;
        // SAFETY: the epoll set's descriptor is `poll`'s own, open until `poll` is dropped, and the
        // `AsyncFd` owns `poll` from here on.
        let ready = unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        let park = Arc::new(Park {
            registry,
            table: Mutex::default(),
            alive: AtomicBool::new(true),
        });
        tokio::spawn(Watch {
            park: Arc::clone(&park),
            ready,
            events: Events::with_capacity(EVENTS),
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            due: Vec::new(),
        });
        Ok(park)
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // The table is left consistent at every step: a panic elsewhere while it was held breaks nothing.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `tunnel` in until its sockets are readable, `deadline` comes, or `stop` (the signal of
    /// `group`) fires. On failure (its sockets could not join the epoll set, or the park is closing) it
    /// is handed back, its sockets as they were.
    pub(super) fn admit<P: Parked>(
        &self,
        tunnel: Box<P>,
        deadline: Instant,
        (group, stop): (GroupKey, CancellationToken),
    ) -> Result<(), Box<P>> {
        let mut table = self.table();
        if !self.alive.load(Ordering::Acquire) {
            return Err(tunnel);
        }
        let slot = table.entries.vacant_entry();
        let key = slot.key();
        let [a, b] = tunnel.sockets();
        if let Err(error) =
            self.registry
                .register(&mut SourceFd(&a), Token(key), Interest::READABLE)
        {
            tracing::warn!(%error, "a quiet tunnel could not be parked");
            return Err(tunnel);
        }
        if let Err(error) =
            self.registry
                .register(&mut SourceFd(&b), Token(key), Interest::READABLE)
        {
            tracing::warn!(%error, "a quiet tunnel could not be parked");
            let _ = self.registry.deregister(&mut SourceFd(&a));
            return Err(tunnel);
        }
        slot.insert(Entry {
            tunnel: tunnel as Box<dyn Parked>,
            deadline,
            group,
        });
        table.timers.insert((deadline, key));
        let mut wake = table.armed.is_none_or(|armed| deadline < armed);
        table
            .groups
            .entry(group)
            .or_insert_with(|| {
                wake = true;
                Group {
                    stop: Box::pin(stop.cancelled_owned()),
                    members: 0,
                }
            })
            .members += 1;
        if wake && let Some(waker) = table.waker.take() {
            waker.wake();
        }
        Ok(())
    }
}

/// The park's task: waits on the epoll set, the timer and the groups' stop signals, and resumes the
/// tunnels they name.
struct Watch {
    park: Arc<Park>,
    ready: AsyncFd<mio::Poll>,
    events: Events,
    timer: Pin<Box<Sleep>>,
    /// Tunnels to resume, gathered under the table's lock and resumed after it.
    due: Vec<Box<dyn Parked>>,
}

impl Future for Watch {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let mut more = this.readable(cx);
        let next = {
            let mut table = this.park.table();
            let registry = &this.park.registry;
            let now = Instant::now();
            while this.due.len() < RESUMES_PER_POLL
                && table.timers.first().is_some_and(|&(at, _)| at <= now)
                && let Some((_, key)) = table.timers.pop_first()
            {
                if let Some(tunnel) = table.take(registry, key) {
                    this.due.push(tunnel);
                }
            }
            more |= table.timers.first().is_some_and(|&(at, _)| at <= now);
            let fired: HashSet<GroupKey> = table
                .groups
                .iter_mut()
                .filter_map(|(key, group)| group.stop.as_mut().poll(cx).is_ready().then_some(*key))
                .collect();
            if !fired.is_empty() {
                // Rare (a drain changing, shutdown): one pass over the table for all of them. A group
                // stays fired (its signal is cancelled for good) until its last member is taken.
                let room = RESUMES_PER_POLL.saturating_sub(this.due.len());
                let members: Vec<usize> = table
                    .entries
                    .iter()
                    .filter(|(_, e)| fired.contains(&e.group))
                    .map(|(key, _)| key)
                    .take(room + 1)
                    .collect();
                more |= members.len() > room;
                for &key in members.iter().take(room) {
                    if let Some(tunnel) = table.take(registry, key) {
                        this.due.push(tunnel);
                    }
                }
            }
            if !table
                .waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                table.waker = Some(cx.waker().clone());
            }
            let next = table.timers.first().map(|&(at, _)| at);
            table.armed = next;
            next
        };
        for tunnel in this.due.drain(..) {
            tunnel.resume();
        }
        if more {
            // Work left for the next wake-up, after the worker's other tasks have had theirs.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if let Some(at) = next {
            if this.timer.deadline() != at {
                this.timer.as_mut().reset(at);
            }
            if this.timer.as_mut().poll(cx).is_ready() {
                // Due already: another round.
                cx.waker().wake_by_ref();
            }
        }
        Poll::Pending
    }
}

impl Watch {
    /// Gathers the tunnels whose sockets have something to read (or hung up); true if it stopped for
    /// the budget with events perhaps left.
    fn readable(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.due.len() >= RESUMES_PER_POLL {
                // The set stays marked readable: the next wake-up goes on from here.
                return true;
            }
            let mut guard = match self.ready.poll_read_ready_mut(cx) {
                Poll::Pending => return false,
                Poll::Ready(Ok(guard)) => guard,
                Poll::Ready(Err(error)) => {
                    tracing::warn!(%error, "the tunnel park's epoll set failed");
                    return false;
                }
            };
            match guard
                .get_inner_mut()
                .poll(&mut self.events, Some(Duration::ZERO))
            {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    tracing::warn!(%error, "the tunnel park's epoll set failed");
                    guard.clear_ready();
                    return false;
                }
            }
            let mut count = 0;
            let mut table = self.park.table();
            // The whole batch, whatever the budget: these events are not reported again.
            for event in &self.events {
                count += 1;
                if let Some(tunnel) = table.take(&self.park.registry, event.token().0) {
                    self.due.push(tunnel);
                }
            }
            drop(table);
            if count < EVENTS {
                // Drained: the next event makes the set readable again.
                guard.clear_ready();
            }
        }
    }
}

impl Drop for Watch {
    /// The runtime is going away: the tunnels still parked end with it, as their tasks would have.
    fn drop(&mut self) {
        let table = {
            let mut table = self.park.table();
            self.park.alive.store(false, Ordering::Release);
            std::mem::take(&mut *table)
        };
        for (_, entry) in table.entries {
            entry.tunnel.abandon();
        }
    }
}
