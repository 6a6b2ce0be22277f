//! Rate limits as the generic cell rate algorithm (GCRA): a token bucket kept as one number, the
//! theoretical arrival time (TAT) of the next event. An event at `now` conforms when the TAT is at most
//! `tolerance` (the burst) ahead of `now`, and moves the TAT on by one `interval`. Per client this is one
//! `u64` in a table (`table.rs`); per listener it is the handshake gate, whose excess events are not
//! refused but queued in arrival order, and refused only if their wait would be longer than the queue
//! allows.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::Rate;

/// A rate in the units the algorithm works in: nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct Cell {
    /// Time between two events at the sustained rate.
    pub interval: u64,
    /// How far ahead of now the TAT may run: `burst - 1` intervals.
    tolerance: u64,
}

impl Cell {
    pub fn new(rate: &Rate) -> Cell {
        // The checker keeps the rate within (0, 1e6] events per second: the interval is at least 1000 ns.
        let interval = (1e9 / rate.per_second).round().max(1.0) as u64;
        Cell {
            interval,
            tolerance: interval.saturating_mul(u64::from(rate.burst.saturating_sub(1))),
        }
    }

    /// Decides an event at `now` (ns) against the TAT `tat`: the new TAT, or how long until the event
    /// would conform.
    pub fn check(&self, tat: u64, now: u64) -> Result<u64, Duration> {
        let tat = tat.max(now);
        let ahead = tat - now;
        if ahead > self.tolerance {
            Err(Duration::from_nanos(ahead - self.tolerance))
        } else {
            Ok(tat.saturating_add(self.interval))
        }
    }

    /// Schedules an event at `now`: how long it must wait to conform and the TAT after it.
    fn schedule(&self, tat: u64, now: u64) -> (Duration, u64) {
        let tat = tat.max(now);
        let wait = (tat - now).saturating_sub(self.tolerance);
        (
            Duration::from_nanos(wait),
            tat.saturating_add(self.interval),
        )
    }

    /// Whether a TAT of `tat` says nothing at `now`: the bucket is full again, as if never used.
    pub fn is_spent(tat: u64, now: u64) -> bool {
        tat <= now
    }
}

/// Nanoseconds since `epoch`, the clock the TATs are kept in.
pub fn nanos_since(epoch: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

/// How late a queued handshake may take its turn without the schedule slipping: timers fire on a
/// millisecond tick, so the head of the queue wakes a little after its turn, and the turns after it keep
/// their places rather than move by that much each time.
const LATENESS: u64 = 10_000_000;

impl Cell {
    /// Decides the turn of the queue's head at `now`, as `check`, but counting from the turn before it
    /// when that was due at most `LATENESS` (beyond the burst) ago: the queue has kept the bucket busy, so
    /// turns follow each other one interval apart whenever their handshakes are let through.
    fn grant(&self, tat: u64, now: u64) -> Result<u64, Duration> {
        let base = tat.max(now.saturating_sub(self.tolerance.saturating_add(LATENESS)));
        let ahead = base.saturating_sub(now);
        if ahead > self.tolerance {
            Err(Duration::from_nanos(ahead - self.tolerance))
        } else {
            Ok(base.saturating_add(self.interval))
        }
    }
}

/// A listener's handshake gate: at most `rate` WebSocket handshakes go on to the backends, the excess
/// waiting in arrival order (a FIFO queue) for at most `max_wait`, then refused.
///
/// The head of the queue waits for the next turn; when it comes, every waiter whose turn has come is let
/// through, and the next in line becomes the head. A waiter that leaves (its client hung up, or its turn
/// cannot come within `max_wait`) leaves the queue, and a head that leaves hands its place to the next: a
/// turn is never spent on a handshake that is gone. (Giving each arrival a fixed time slot instead would
/// be one atomic, but a storm of clients that give up and retry would fill the schedule with turns nobody
/// takes, and starve the backends while clients wait.)
#[derive(Debug)]
pub struct HandshakeGate {
    epoch: Instant,
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    /// The bucket's theoretical arrival time, ns since `epoch`.
    tat: u64,
    next_ticket: u64,
    /// Waiters in arrival order.
    queue: VecDeque<Arc<Waiter>>,
}

/// One handshake in the queue.
#[derive(Debug)]
struct Waiter {
    id: u64,
    /// Given when it becomes the head, or when it is let through.
    signal: Notify,
    /// Let through (and out of the queue); set under the gate's lock.
    passed: AtomicBool,
}

impl Default for HandshakeGate {
    fn default() -> Self {
        HandshakeGate {
            epoch: Instant::now(),
            state: Mutex::default(),
        }
    }
}

impl GateState {
    /// Lets through every waiter at the front whose turn has come at `now`, and wakes the new head.
    fn grant(&mut self, cell: &Cell, now: u64) {
        while let Some(front) = self.queue.front() {
            match cell.grant(self.tat, now) {
                Ok(tat) => {
                    self.tat = tat;
                    front.passed.store(true, Ordering::Relaxed);
                    front.signal.notify_one();
                    self.queue.pop_front();
                }
                Err(_) => break,
            }
        }
        if let Some(head) = self.queue.front() {
            head.signal.notify_one();
        }
    }
}

impl HandshakeGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        // Plain numbers and a queue of signals: still consistent after a panic elsewhere.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> u64 {
        nanos_since(self.epoch, Instant::now())
    }

    /// Lets a handshake through at `rate`: at once within the burst, else after the handshakes queued
    /// before it. Refused with how long until the queue is short enough to join (the wait it would face
    /// is over `max_wait`), or, in the queue, as soon as its turn cannot come within `max_wait` of its
    /// arrival (handshakes ahead of it were admitted at a slower rate, before a reload). Dropping the
    /// future leaves the queue.
    pub async fn pass(&self, rate: &Rate, max_wait: Duration) -> Result<(), Duration> {
        let cell = Cell::new(rate);
        let ticket = {
            let mut state = self.lock();
            let now = self.now();
            if state.queue.is_empty()
                && let Ok(tat) = cell.check(state.tat, now)
            {
                state.tat = tat;
                return Ok(());
            }
            // The wait if every handshake queued ahead takes its turn (those that leave only shorten it).
            let ahead = cell.interval.saturating_mul(state.queue.len() as u64);
            let (wait, _) = cell.schedule(state.tat.saturating_add(ahead), now);
            if wait > max_wait {
                return Err(wait - max_wait);
            }
            let waiter = Arc::new(Waiter {
                id: state.next_ticket,
                signal: Notify::new(),
                passed: AtomicBool::new(false),
            });
            state.next_ticket += 1;
            if state.queue.is_empty() {
                // The head: its signal is already given (a stored permit), so it starts pacing at once.
                waiter.signal.notify_one();
            }
            state.queue.push_back(Arc::clone(&waiter));
            Ticket { gate: self, waiter }
        };
        let deadline = Instant::now() + max_wait;
        let gave_up = || Err(Duration::from_secs(1));
        loop {
            tokio::select! {
                biased;
                () = ticket.waiter.signal.notified() => {}
                () = tokio::time::sleep_until(deadline) => return gave_up(),
            }
            // Let through, or the head: wait for the next turn, let through whoever's turn has come.
            loop {
                let wait = {
                    let mut state = self.lock();
                    if !ticket.waiter.passed.load(Ordering::Relaxed) {
                        state.grant(&cell, self.now());
                    }
                    if ticket.waiter.passed.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    let head = state
                        .queue
                        .front()
                        .is_some_and(|h| h.id == ticket.waiter.id);
                    if !head {
                        break;
                    }
                    match cell.grant(state.tat, self.now()) {
                        Err(wait) => wait,
                        // Came due between the two looks: take it on the next round.
                        Ok(_) => Duration::ZERO,
                    }
                };
                // A turn past the deadline will not come in time: leave now, so the next one is the head.
                // (A turn due at the deadline itself is still taken.)
                if Instant::now() + wait > deadline {
                    return gave_up();
                }
                tokio::time::sleep(wait).await;
            }
        }
    }

    /// Handshakes waiting their turn now.
    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }
}

/// A place in a gate's queue, left on drop: by a handshake whose client is gone, or that cannot be let
/// through in time (one let through has left it already).
struct Ticket<'a> {
    gate: &'a HandshakeGate,
    waiter: Arc<Waiter>,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut state = self.gate.lock();
        let Some(at) = state.queue.iter().position(|w| w.id == self.waiter.id) else {
            return;
        };
        state.queue.remove(at);
        if at == 0
            && let Some(next) = state.queue.front()
        {
            next.signal.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn rate(per_second: f64, burst: u32) -> Rate {
        Rate { per_second, burst }
    }

    #[test]
    fn a_burst_conforms_then_the_sustained_rate() {
        let cell = Cell::new(&rate(10.0, 5));
        let mut tat = 0;
        for _ in 0..5 {
            tat = cell.check(tat, SECOND).expect("within the burst");
        }
        let retry = cell.check(tat, SECOND).expect_err("the burst is spent");
        assert_eq!(
            retry,
            Duration::from_millis(100),
            "one interval until the next token"
        );
        // A tenth of a second later, one more.
        tat = cell
            .check(tat, SECOND + SECOND / 10)
            .expect("a token came back");
        assert!(cell.check(tat, SECOND + SECOND / 10).is_err());
        // After a long pause the whole burst is back and the old TAT says nothing.
        assert!(Cell::is_spent(tat, 3 * SECOND));
        for _ in 0..5 {
            tat = cell.check(tat, 3 * SECOND).expect("burst refilled");
        }
    }

    #[test]
    fn fractional_rates_and_a_burst_of_one() {
        let cell = Cell::new(&rate(0.5, 1));
        let tat = cell.check(0, 10 * SECOND).expect("first");
        assert_eq!(
            cell.check(tat, 10 * SECOND).expect_err("second at once"),
            Duration::from_secs(2)
        );
        assert!(cell.check(tat, 12 * SECOND).is_ok());
    }

    /// Starts a handshake at the gate now; its result comes with the time (since `start`) it passed.
    fn arrive(
        gate: &Arc<HandshakeGate>,
        limit: Rate,
        max_wait: Duration,
        start: Instant,
    ) -> tokio::task::JoinHandle<Result<Duration, Duration>> {
        let gate = Arc::clone(gate);
        tokio::spawn(async move { gate.pass(&limit, max_wait).await.map(|()| start.elapsed()) })
    }

    // Paused time: every turn comes at its exact virtual millisecond.
    #[tokio::test(start_paused = true)]
    async fn the_gate_passes_a_burst_then_the_rest_in_order_and_refuses_past_the_wait() {
        let gate = Arc::new(HandshakeGate::default());
        let limit = rate(100.0, 10);
        let max_wait = Duration::from_secs(1);
        let start = Instant::now();
        for _ in 0..10 {
            assert_eq!(
                gate.pass(&limit, max_wait).await,
                Ok(()),
                "within the burst"
            );
        }
        let mut waiting = Vec::new();
        for _ in 0..100 {
            waiting.push(arrive(&gate, limit, max_wait, start));
            // Each reaches the gate before the next is started: arrival order is queue order.
            while gate.queued() < waiting.len() {
                tokio::task::yield_now().await;
            }
        }
        // The next would wait 1.01 s: refused at once, told when the queue will be short enough.
        assert_eq!(
            gate.pass(&limit, max_wait).await,
            Err(Duration::from_millis(10))
        );
        for (n, handshake) in waiting.into_iter().enumerate() {
            let passed = handshake.await.expect("task").expect("passed");
            assert_eq!(passed, Duration::from_millis(10 * (n as u64 + 1)), "#{n}");
        }
        assert_eq!(gate.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_handshake_that_leaves_the_queue_gives_its_turn_to_the_next() {
        let gate = Arc::new(HandshakeGate::default());
        let limit = rate(10.0, 1);
        let max_wait = Duration::from_secs(5);
        let start = Instant::now();
        assert_eq!(gate.pass(&limit, max_wait).await, Ok(()));
        let mut queued = Vec::new();
        for _ in 0..4 {
            queued.push(arrive(&gate, limit, max_wait, start));
            while gate.queued() < queued.len() {
                tokio::task::yield_now().await;
            }
        }
        let [head, second, third, fourth] = <[_; 4]>::try_from(queued).expect("four");
        // The head and a waiter behind it hang up: their turns go to those still waiting.
        head.abort();
        third.abort();
        tokio::task::yield_now().await;
        assert_eq!(gate.queued(), 2);
        assert_eq!(second.await.expect("task"), Ok(Duration::from_millis(100)));
        assert_eq!(fourth.await.expect("task"), Ok(Duration::from_millis(200)));
        // Clients that keep leaving do not push the schedule away from those that stay.
        for _ in 0..50 {
            let gone = arrive(&gate, limit, max_wait, start);
            while gate.queued() == 0 {
                tokio::task::yield_now().await;
            }
            gone.abort();
        }
        tokio::task::yield_now().await;
        assert_eq!(gate.queued(), 0);
        let stays = arrive(&gate, limit, max_wait, start);
        assert_eq!(stays.await.expect("task"), Ok(Duration::from_millis(300)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_whose_turn_cannot_come_in_time_leaves_the_queue() {
        let gate = Arc::new(HandshakeGate::default());
        let start = Instant::now();
        let fast = rate(10.0, 1);
        assert_eq!(gate.pass(&fast, Duration::from_secs(5)).await, Ok(()));
        // Ahead: a handshake admitted under an older, slower config (a reload lowered... then raised the
        // rate); it takes its turn at 100 ms and moves the next one a whole second away.
        let slow = arrive(&gate, rate(1.0, 1), Duration::from_secs(5), start);
        while gate.queued() < 1 {
            tokio::task::yield_now().await;
        }
        // Joined when its turn looked 200 ms away; at the head, its turn is 1.1 s away: past its 500 ms,
        // so it leaves at once rather than hold the head.
        let behind = arrive(&gate, fast, Duration::from_millis(500), start);
        assert_eq!(slow.await.expect("task"), Ok(Duration::from_millis(100)));
        assert_eq!(behind.await.expect("task"), Err(Duration::from_secs(1)));
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        assert_eq!(gate.queued(), 0);
    }
}
