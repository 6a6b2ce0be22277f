//! The frame-aware splice between a client and a backend after a successful upgrade (docs/ARCHITECTURE.md, "The tunnel").
//!
//! One task drives both directions over the two streams (raw `TcpStream`s, TLS sessions, or an HTTP/2
//! stream on the client side: see `transport.rs`): it waits for readiness, borrows a buffer,
//! reads, lets the direction's [`Scanner`] walk the frames in place, writes the result, and gives the buffer
//! back. A direction reads nothing more until its last chunk is written, so a slow reader slows its writer
//! and memory stays bounded. wsgate's own frames (keepalive pings, Close) go in only at frame boundaries.
//! Timers (keepalive, pong, idle, lifetime, close) share one `Sleep`, re-armed lazily. A tunnel over
//! sockets (plain or TLS) quiet for its route's `park_after` leaves its task for the worker's park
//! (`park.rs`) and gets a new one when there is work again.

use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::num::NonZeroU64;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::buffers::{Buffer, BufferPool};
use super::end::EndReason;
use super::end::OwnClose;
use super::frame::{ClosePayload, ControlFrame, OP_PING, Role};
use super::park::{Park, Parked};
use super::scanner::{Scanner, Violation};
use super::transport::{ParkedStream, Transport, input_waiting};
use crate::config::WebSocketSettings;

/// Reads per direction before the task yields, so one busy tunnel cannot hold a worker thread.
const READS_PER_POLL: usize = 16;
/// Counters are copied to the shared metrics at most this often while a tunnel is busy.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Bytes and frames relayed in one direction, handed to the metrics as they accumulate.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    pub bytes: u64,
    pub frames: u64,
}

/// What a tunnel needs from the gateway around it. The tunnel owns it for its whole life and hands it
/// back when it ends (`ended`), so the task running a tunnel holds nothing beside the tunnel.
pub trait TunnelContext: Send + 'static {
    fn settings(&self) -> &WebSocketSettings;
    fn buffers(&self) -> &BufferPool;
    /// Counters since the last call; called at most every `FLUSH_EVERY` while busy, and at the end.
    fn traffic(&self, client_to_backend: Traffic, backend_to_client: Traffic);
    fn ping_rtt(&self, rtt: Duration);
    /// What the tunnel listens to for the gateway's own reasons to end it (shutdown, its backend
    /// draining). Cancelled whenever the verdict of `stop` may have changed: the tunnel then asks `stop`
    /// again and listens to the signal this gives then.
    fn stop_signal(&self) -> StopSignal;
    /// Where the stop signals are now, read at every wake-up (so without a lock): it moves on before a
    /// signal handed out is cancelled, never after. While it is still the epoch of the tunnel's signal,
    /// that signal has not fired, and the tunnel does not poll it: polling a `CancellationToken` takes
    /// two locks, and the token is shared by every tunnel to the same backend.
    fn stop_epoch(&self) -> u64;
    /// Whether, why and after how long the gateway wants this tunnel to close (`None`: it does not, or
    /// no longer). The moment is drawn at random within a spread, so that thousands of clients do not
    /// reconnect in the same instant; drawn at each ask, not stored: every tunnel would carry it.
    fn stop(&self) -> Option<(EndReason, Duration)>;
    /// What keeps the gateway's shutdown waiting for the tunnel while it is parked (`park.rs`), when no
    /// task of the gateway's tracks it; its tracker runs the tunnel's next task.
    fn tracked(&self) -> TaskTrackerToken;
    /// The tunnel went into the park (`true`) or came out of it.
    fn parked(&self, parked: bool);
    /// The tunnel is over: how it ended.
    fn ended(self, outcome: &TunnelOutcome);
}

/// A stop signal and the epoch it belongs to (`TunnelContext::stop_epoch`).
pub struct StopSignal {
    pub token: CancellationToken,
    pub epoch: u64,
    /// The same for every tunnel handed the same token (those to one backend): the park waits once per
    /// source and epoch, not once per tunnel.
    pub source: usize,
}

/// What a tunnel needs besides its two streams.
pub struct TunnelParams<X> {
    /// RSV bits the negotiated extensions allow (RSV1 for permessage-deflate); 0 without extensions.
    pub allowed_rsv: u8,
    pub context: X,
}

/// How a tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelOutcome {
    pub reason: EndReason,
    /// The Close code that reached the client (forwarded or wsgate's own), if any.
    pub close_code: Option<u16>,
    pub client_to_backend: Traffic,
    pub backend_to_client: Traffic,
    pub duration: Duration,
}

/// Relays frames between `client` and `backend` until the connection ends, then tells the context how it
/// ended (`TunnelContext::ended`). `client_early` and `backend_early` are bytes each side sent right
/// behind its handshake, already read by the HTTP layer. The future may return earlier, the tunnel parked
/// (`park.rs`): it goes on in a task of its own when there is work again, and ends the same way.
///
/// Not an `async fn`: the state is built here and moved whole into the future, which then holds nothing
/// twice (an `async fn` keeps its arguments' slots next to the state built from them).
pub fn run<C: Transport + 'static, B: Transport + 'static, X: TunnelContext>(
    client: C,
    client_early: Bytes,
    backend: B,
    backend_early: Bytes,
    params: TunnelParams<X>,
) -> TunnelFuture<C, B, X> {
    let now = Instant::now();
    let TunnelParams {
        allowed_rsv,
        context,
    } = params;
    let StopSignal {
        token: signal,
        epoch,
        ..
    } = context.stop_signal();
    let stop_at = context
        .stop()
        .map(|(reason, delay)| (Mark::START.after(delay), reason));
    let max_message_size = context.settings().max_message_size;
    let (client_ping, backend_ping) = ping_intervals(context.settings());
    // One token for the tunnel's whole life: a late pong to an earlier ping is recognised too.
    let token = fastrand::u64(..).to_be_bytes();
    let may_park = client.parkable() && backend.parkable();
    let mut tunnel = Tunnel {
        client,
        backend,
        up: Half::new(
            Scanner::new(true, allowed_rsv, max_message_size),
            Role::Client,
            client_early,
        ),
        // Limits protect backends from clients; what a backend sends is its own business.
        down: Half::new(
            Scanner::new(false, allowed_rsv, u64::MAX),
            Role::Server,
            backend_early,
        ),
        client_alive: Keepalive::new(),
        backend_alive: Keepalive::new(),
        started: now,
        last_data: Mark::START,
        last_flush: Mark::START,
        flushed: (Traffic::default(), Traffic::default()),
        ending: None,
        cut: false,
        client_close_code: None,
        queued: false,
        token,
        // Only shutdown is final. A signal cancelled by a change racing this start is heard at the
        // first poll, and the verdict asked again.
        listening: !matches!(stop_at, Some((_, EndReason::Shutdown))),
        stop_watch: StopWatch { epoch, waker: None },
        stop_at,
        closed: (false, false),
        may_park,
        resumed: Mark::START,
        context,
    };
    if client_ping.is_some() {
        tunnel.up.scanner.expect_pong(token);
    }
    if backend_ping.is_some() {
        tunnel.down.scanner.expect_pong(token);
    }
    let first_deadline = tunnel.timer_deadline(tunnel.due(), Mark::START);
    TunnelFuture {
        tunnel: Some(tunnel),
        sleep: tokio::time::sleep_until(first_deadline),
        stop: signal.cancelled_owned(),
        closing: false,
    }
}

pin_project_lite::pin_project! {
    /// A tunnel's life in one task (`run`): relaying, then ending both streams within the close timeout,
    /// unless it is parked first. Written out rather than as an `async` block, which would keep the
    /// values it captures and references to its pinned locals beside them, in every idle tunnel.
    pub struct TunnelFuture<C, B, X> {
        // `None` once it has returned.
        tunnel: Option<Tunnel<C, B, X>>,
        // The one timer of the tunnel's deadlines (`Tunnel::next_deadline`), then of the close timeout.
        #[pin]
        sleep: Sleep,
        // Registered with the stop signal from the first poll on (`StopWatch`).
        #[pin]
        stop: WaitForCancellationFutureOwned,
        closing: bool,
    }
}

impl<C: Transport + 'static, B: Transport + 'static, X: TunnelContext> TunnelFuture<C, B, X> {
    /// A tunnel back from the park, in a new task: its timer set for its next deadline, listening to
    /// the stop signal in force (asking the verdict again at once if the signal moved on meanwhile).
    fn resumed(mut tunnel: Tunnel<C, B, X>) -> Self {
        let signal = tunnel.context.stop_signal();
        let stop = if signal.epoch == tunnel.stop_watch.epoch {
            signal.token
        } else {
            let moved = CancellationToken::new();
            moved.cancel();
            moved
        };
        tunnel.stop_watch.waker = None;
        let now = Mark::at(tunnel.started, Instant::now());
        tunnel.resumed = now;
        let deadline = tunnel.timer_deadline(tunnel.due(), now);
        TunnelFuture {
            tunnel: Some(tunnel),
            sleep: tokio::time::sleep_until(deadline),
            stop: stop.cancelled_owned(),
            closing: false,
        }
    }
}

impl<C: Transport + 'static, B: Transport + 'static, X: TunnelContext> Future
    for TunnelFuture<C, B, X>
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let Some(mut tunnel) = this.tunnel.as_mut() else {
            // Polled again after it returned (nothing here does that): it stays pending, as a fused
            // future would.
            return Poll::Pending;
        };
        if !*this.closing {
            loop {
                match std::task::ready!(tunnel.poll(cx, this.sleep.as_mut(), this.stop.as_mut())) {
                    Turn::Over => break,
                    Turn::Park => {}
                }
                // There since the start of this call.
                let Some(quiet) = this.tunnel.take() else {
                    return Poll::Pending;
                };
                match park(quiet) {
                    Parking::Parked => return Poll::Ready(()),
                    Parking::Lost(outcome, context) => {
                        context.ended(&outcome);
                        return Poll::Ready(());
                    }
                    Parking::NotNow(back) => {
                        // Its stop signal is moving: the change wakes the task, and it asks again then.
                        *this.tunnel = Some(back);
                        return Poll::Pending;
                    }
                    Parking::Failed(mut back) => {
                        back.may_park = false;
                        tunnel = this.tunnel.insert(back);
                    }
                }
            }
            // Both streams end in order where they can (`Transport::poll_shutdown`), within the close
            // timeout: a peer that reads nothing does not hold the tunnel.
            let close_timeout = tunnel.context.settings().close_timeout;
            this.sleep.as_mut().reset(Instant::now() + close_timeout);
            *this.closing = true;
        }
        std::task::ready!(tunnel.poll_close(cx, this.sleep.as_mut()));
        // There since the start of this call.
        let Some(tunnel) = this.tunnel.take() else {
            return Poll::Pending;
        };
        let (outcome, context) = tunnel.outcome(None);
        context.ended(&outcome);
        Poll::Ready(())
    }
}

/// How parking a quiet tunnel went.
enum Parking<C, B, X> {
    Parked,
    /// Its stop signal moved under it: it stays in its task, which the change wakes.
    NotNow(Tunnel<C, B, X>),
    /// No park could take it: it keeps its task for good.
    Failed(Tunnel<C, B, X>),
    /// A socket was lost on the way (the reactor would not let it go or take it back): it is over.
    Lost(TunnelOutcome, X),
}

/// Hands a quiet tunnel (`Tunnel::park_at`) to this worker's park: its sockets out of the runtime's
/// reactor, the tunnel boxed without its task, its timers and stop signal watched by the park.
fn park<C: Transport + 'static, B: Transport + 'static, X: TunnelContext>(
    mut tunnel: Tunnel<C, B, X>,
) -> Parking<C, B, X> {
    let signal = tunnel.context.stop_signal();
    if signal.epoch != tunnel.stop_watch.epoch || signal.token.is_cancelled() {
        return Parking::NotNow(tunnel);
    }
    let Some(park) = Park::here() else {
        return Parking::Failed(tunnel);
    };
    let now = Mark::at(tunnel.started, Instant::now());
    let deadline = tunnel.timer_deadline(tunnel.next_deadline(), now);
    let held = tunnel.context.tracked();
    // The waker of the task it leaves: kept, it would keep that whole task allocated.
    tunnel.stop_watch.waker = None;
    tunnel.flush_traffic();
    let (tunnel, client, backend) = tunnel.swap_streams((), ());
    let client = match client.into_parked() {
        Ok(parked) => parked,
        Err(error) => {
            let (outcome, context) = tunnel.lost(Side::Client, &error);
            return Parking::Lost(outcome, context);
        }
    };
    let backend = match backend.into_parked() {
        Ok(parked) => parked,
        Err(error) => {
            let (outcome, context) = tunnel.lost(Side::Backend, &error);
            return Parking::Lost(outcome, context);
        }
    };
    let (tunnel, (), ()) = tunnel.swap_streams(client, backend);
    tunnel.context.parked(true);
    let parked: Box<ParkedTunnel<C, B, X>> = Box::new(ParkedTunnel {
        tunnel,
        held,
        streams: PhantomData,
    });
    let stop = ((signal.source, signal.epoch), signal.token);
    match park.admit(parked, deadline, stop) {
        Ok(()) => Parking::Parked,
        Err(refused) => {
            let ParkedTunnel { tunnel, .. } = *refused;
            tunnel.context.parked(false);
            match tunnel.restore::<C, B>() {
                Ok(tunnel) => Parking::Failed(tunnel),
                Err((outcome, context)) => Parking::Lost(outcome, context),
            }
        }
    }
}

/// A parked tunnel: its sockets out of the reactor, its task gone.
struct ParkedTunnel<C: Transport, B: Transport, X> {
    tunnel: Tunnel<C::Parked, B::Parked, X>,
    /// Keeps shutdown waiting for the tunnel, and runs its next task.
    held: TaskTrackerToken,
    /// The stream types it goes back to.
    streams: PhantomData<fn() -> (C, B)>,
}

impl<C: Transport + 'static, B: Transport + 'static, X: TunnelContext> Parked
    for ParkedTunnel<C, B, X>
{
    fn sockets(&self) -> [RawFd; 2] {
        [
            self.tunnel.client.socket().as_raw_fd(),
            self.tunnel.backend.socket().as_raw_fd(),
        ]
    }

    fn resume(self: Box<Self>) {
        let ParkedTunnel {
            mut tunnel, held, ..
        } = *self;
        tunnel.context.parked(false);
        // What woke it may be bytes that the reactor, which gets the sockets back only now, reports a
        // turn later: the tunnel must read them before it judges a deadline (`Half::input_pending`).
        tunnel.up.input_pending = input_waiting(tunnel.client.socket());
        tunnel.down.input_pending = input_waiting(tunnel.backend.socket());
        match tunnel.restore::<C, B>() {
            // Spawned before `held` goes: the tracker never sees the tunnel untracked.
            Ok(tunnel) => drop(held.task_tracker().spawn(TunnelFuture::resumed(tunnel))),
            Err((outcome, context)) => context.ended(&outcome),
        }
    }

    fn abandon(self: Box<Self>) {
        let ParkedTunnel { tunnel, .. } = *self;
        tunnel.context.parked(false);
        let (outcome, context) = tunnel.outcome(Some(EndReason::Shutdown));
        context.ended(&outcome);
    }
}

impl<PC: ParkedStream, PB: ParkedStream, X: TunnelContext> Tunnel<PC, PB, X> {
    /// The sockets back in the current runtime's reactor, as the streams they were.
    fn restore<C, B>(self) -> Result<Tunnel<C, B, X>, (TunnelOutcome, X)>
    where
        C: Transport<Parked = PC>,
        B: Transport<Parked = PB>,
    {
        let (tunnel, client, backend) = self.swap_streams((), ());
        let client = match C::from_parked(client) {
            Ok(stream) => stream,
            Err(error) => return Err(tunnel.lost(Side::Client, &error)),
        };
        let backend = match B::from_parked(backend) {
            Ok(stream) => stream,
            Err(error) => return Err(tunnel.lost(Side::Backend, &error)),
        };
        Ok(tunnel.swap_streams(client, backend).0)
    }
}

impl<X: TunnelContext> Tunnel<(), (), X> {
    /// A stream that could not leave the reactor or go back to it is gone, and the tunnel with it.
    fn lost(self, side: Side, error: &io::Error) -> (TunnelOutcome, X) {
        tracing::warn!(?side, %error, "a tunnel's socket was lost moving it in or out of the park");
        let reason = match side {
            Side::Client => EndReason::ClientGone,
            Side::Backend => EndReason::BackendGone,
        };
        self.outcome(Some(reason))
    }
}

/// How often wsgate pings (client, backend), if at all.
fn ping_intervals(settings: &WebSocketSettings) -> (Option<Duration>, Option<Duration>) {
    let client = settings.ping_interval;
    (client, client.filter(|_| settings.ping_backend))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Backend,
}

/// One direction: bytes from `src` to `dst`.
struct Half {
    scanner: Scanner,
    /// How wsgate's own frames into `dst` are masked.
    role: Role,
    /// Scanned bytes not yet written to `dst`; `None` while the direction is idle, so idle holds no buffer.
    out: Option<Pending>,
    /// A frame of wsgate's own waiting for a frame boundary. Boxed: a tunnel has one only now and then
    /// (a ping per keepalive interval, a Close at the end), and inline it would cost every idle tunnel
    /// its size twice over.
    inject: Option<Box<Inject>>,
    /// wsgate's own Close for `dst`, waiting for the injection slot (a ping may be half written in it).
    close: OwnClose,
    /// Read `src` at all (false after its EOF, its Close, or a violation).
    reading: bool,
    /// `src` had nothing to read at this wake-up of the task: its waker is registered, and asking again
    /// before the next wake-up would only take the socket's lock to register it again.
    read_pending: bool,
    /// Write what `src` sends to `dst` (false once wsgate has sent its own Close to `dst`).
    forwarding: bool,
    /// `src` sent a Close.
    close_received: bool,
    /// `src` hung up (EOF or error).
    gone: bool,
    /// `dst` is dead: what is queued for it does not hold the tunnel open.
    abandoned: bool,
    /// Bytes were written to `dst` since its last flush.
    unflushed: bool,
    /// The chunk in `out` carries data-frame payload: writing it on is activity (control frames and
    /// empty fragments are not, as reading them is not).
    out_has_data: bool,
    /// Since when writes to `dst` have been blocked with bytes waiting (peer bytes or wsgate's own frame),
    /// with no progress: `send_timeout` after it, `dst` is taken to have stopped reading.
    blocked_since: Option<Mark>,
    /// Bytes `src` sent behind its handshake, read by the HTTP layer: scanned before the socket is read.
    /// Boxed: usually there are none, and an empty `Bytes` inline would cost every tunnel its size twice
    /// over (one per direction).
    early: Option<Box<Bytes>>,
    /// Back from the park for bytes (or a hang-up) waiting in `src` that the reactor has not reported
    /// yet: until they are read, the tunnel judges no deadline (they may be what keeps it alive) and
    /// does not park again.
    input_pending: bool,
    traffic: Traffic,
}

/// A frame of wsgate's own on its way into a stream.
struct Inject {
    frame: ControlFrame,
    /// How much of it is written.
    written: u8,
    /// It is a Close: once it is out, nothing else may follow it.
    is_close: bool,
}

/// Positions in a buffer are under `BUFFER_SIZE`: `u32` keeps every tunnel's two `Pending` slots small.
struct Pending {
    buf: Buffer,
    start: u32,
    end: u32,
}

/// A moment of a tunnel's life, as microseconds since it started, plus one: eight bytes where an
/// `Instant` takes sixteen, for the clocks a tunnel carries (every idle tunnel holds them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Mark(NonZeroU64);

impl Mark {
    /// The tunnel's start.
    const START: Mark = Mark(NonZeroU64::MIN);

    fn at(started: Instant, now: Instant) -> Mark {
        Mark::START.after(now.saturating_duration_since(started))
    }

    /// `d` later (the end of time, rather than past it).
    fn after(self, d: Duration) -> Mark {
        // In `u64` arithmetic: `Duration::as_micros` is `u128`, and a tunnel asks this at every wake-up.
        let micros = d
            .as_secs()
            .saturating_mul(1_000_000)
            .saturating_add(u64::from(d.subsec_micros()));
        Mark(self.0.saturating_add(micros))
    }

    /// Converted back, for the tunnel's timer. `None` past what an `Instant` holds.
    fn instant(self, started: Instant) -> Option<Instant> {
        started.checked_add(Duration::from_micros(self.0.get() - 1))
    }

    /// How long after `earlier` this is (zero if it is not after it).
    fn since(self, earlier: Mark) -> Duration {
        Duration::from_micros(self.0.get().saturating_sub(earlier.0.get()))
    }
}

/// What happened in one direction during one poll.
#[derive(Default, PartialEq)]
struct Step {
    progressed: bool,
    /// Bytes went out to `dst`.
    wrote: bool,
    /// Data-frame bytes `src` sent went out to `dst` (activity, unlike control frames and wsgate's own
    /// frames).
    forwarded: bool,
    /// A write or flush to `dst` could not complete: `dst` is not taking bytes right now.
    blocked: bool,
    /// wsgate's own ping is now wholly written to `dst`.
    ping_out: bool,
    data: bool,
    frames: bool,
    pong_matched: bool,
    close: Option<ClosePayload>,
    violation: Option<Violation>,
    src_gone: bool,
    dst_gone: bool,
    /// The budget ran out with work left: the task woke itself.
    yielded: bool,
}

impl Half {
    fn new(scanner: Scanner, role: Role, early: Bytes) -> Half {
        Half {
            abandoned: false,
            close: None,
            unflushed: false,
            out_has_data: false,
            blocked_since: None,
            early: (!early.is_empty()).then(|| Box::new(early)),
            scanner,
            role,
            out: None,
            inject: None,
            reading: true,
            read_pending: false,
            forwarding: true,
            close_received: false,
            gone: false,
            input_pending: false,
            traffic: Traffic::default(),
        }
    }

    /// Writes pending bytes and injected frames, then reads and scans more, until something would block.
    fn pump(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut impl Transport,
        dst: &mut impl Transport,
        buffers: &BufferPool,
    ) -> Step {
        let mut step = Step::default();
        let mut reads = 0;
        loop {
            if self.unflushed {
                // A TLS session may hold written records back until flushed; a socket never does.
                match dst.poll_flush(cx) {
                    Poll::Pending => {
                        step.blocked = true;
                        return step;
                    }
                    Poll::Ready(Err(_)) => {
                        step.dst_gone = true;
                        return step;
                    }
                    Poll::Ready(Ok(())) => self.unflushed = false,
                }
            }
            if let Some(out) = &mut self.out {
                match dst.poll_write(cx, &out.buf[out.start as usize..out.end as usize]) {
                    Poll::Pending => {
                        step.blocked = true;
                        return step;
                    }
                    Poll::Ready(Err(_)) => {
                        self.out = None;
                        step.dst_gone = true;
                        return step;
                    }
                    Poll::Ready(Ok(n)) => {
                        // At most what was asked: `end - start`, which fits.
                        out.start += n as u32;
                        step.progressed = true;
                        step.wrote = true;
                        step.forwarded |= self.out_has_data;
                        if out.start == out.end {
                            self.out = None;
                            self.unflushed = true;
                        }
                    }
                }
                continue;
            }
            if self.inject.is_none()
                && let Some(&(code, text)) = self.close.take()
            {
                self.inject = Some(Box::new(Inject {
                    frame: ControlFrame::close(code, text, self.role),
                    written: 0,
                    is_close: true,
                }));
            }
            if let Some(inject) = &mut self.inject
                && self.scanner.at_boundary()
            {
                let bytes = inject.frame.as_bytes();
                match dst.poll_write(cx, &bytes[usize::from(inject.written)..]) {
                    Poll::Pending => {
                        step.blocked = true;
                        return step;
                    }
                    Poll::Ready(Err(_)) => {
                        self.inject = None;
                        step.dst_gone = true;
                        return step;
                    }
                    Poll::Ready(Ok(n)) => {
                        // At most the frame's remaining bytes, under 50.
                        inject.written += n as u8;
                        step.progressed = true;
                        step.wrote = true;
                        if usize::from(inject.written) == bytes.len() {
                            let is_close = inject.is_close;
                            self.inject = None;
                            self.unflushed = true;
                            if is_close {
                                self.forwarding = false;
                            } else {
                                step.ping_out = true;
                            }
                        }
                    }
                }
                continue;
            }
            if !self.reading || self.read_pending {
                return step;
            }
            if reads == READS_PER_POLL {
                cx.waker().wake_by_ref();
                step.yielded = true;
                return step;
            }
            if let Some(early) = &mut self.early {
                let mut buf = buffers.take();
                let carried = self.scanner.prepare(&mut buf);
                let n = early.len().min(buf.len() - carried);
                buf[carried..carried + n].copy_from_slice(&early.split_to(n));
                if early.is_empty() {
                    self.early = None;
                }
                reads += 1;
                step.progressed = true;
                self.accept(buf, carried + n, &mut step);
                if step.violation.is_some() || step.close.is_some() {
                    self.reading = false;
                }
                continue;
            }
            match src.poll_read_ready(cx) {
                Poll::Pending => {
                    self.read_pending = true;
                    return step;
                }
                Poll::Ready(Err(_)) => {
                    self.src_gone(&mut step);
                    return step;
                }
                Poll::Ready(Ok(())) => {}
            }
            let mut buf = buffers.take();
            let carried = self.scanner.prepare(&mut buf);
            match src.poll_read(cx, &mut buf[carried..]) {
                // Nothing after all (a stream that cannot tell readiness, a TLS record that carried no
                // data): the buffer goes straight back. What the park saw waiting has been read, unless
                // the stream stopped short of bytes the socket still holds.
                Poll::Pending => {
                    self.read_pending = true;
                    if self.input_pending {
                        self.input_pending = src.more_waiting();
                    }
                    return step;
                }
                Poll::Ready(Ok(0)) => {
                    self.src_gone(&mut step);
                    return step;
                }
                Poll::Ready(Ok(n)) => {
                    reads += 1;
                    step.progressed = true;
                    self.accept(buf, carried + n, &mut step);
                    if step.violation.is_some() || step.close.is_some() {
                        // Nothing more is read from a side that broke the protocol or said goodbye.
                        self.reading = false;
                    }
                }
                Poll::Ready(Err(_)) => {
                    self.src_gone(&mut step);
                    return step;
                }
            }
        }
    }

    /// Follows whether writes to `dst` are getting anywhere: the clock starts at a blocked write and
    /// restarts at every write that moved bytes.
    fn track_blocking(&mut self, step: &Step, now: Mark) {
        if step.blocked {
            if step.wrote || self.blocked_since.is_none() {
                self.blocked_since = Some(now);
            }
        } else if self.idle() || step.wrote {
            self.blocked_since = None;
        }
    }

    fn src_gone(&mut self, step: &mut Step) {
        self.reading = false;
        self.gone = true;
        self.input_pending = false;
        step.src_gone = true;
    }

    /// Scans a freshly read chunk and queues what is to be forwarded.
    fn accept(&mut self, mut buf: Buffer, filled: usize, step: &mut Step) {
        self.input_pending = false;
        let scan = self.scanner.scan(&mut buf, filled);
        step.data |= scan.data;
        step.frames |= scan.frames > 0;
        step.pong_matched |= scan.pong_matched;
        if scan.close.is_some() {
            self.close_received = true;
            step.close = scan.close;
        }
        step.violation = scan.violation;
        self.traffic.frames += u64::from(scan.frames);
        if self.forwarding && scan.out_len > 0 {
            self.traffic.bytes += scan.out_len as u64;
            self.out_has_data = scan.data;
            self.out = Some(Pending {
                buf,
                start: 0,
                end: scan.out_len as u32,
            });
        }
    }

    /// Queues a ping of wsgate's own for the next frame boundary.
    fn inject_ping(&mut self, frame: ControlFrame) {
        debug_assert!(self.inject.is_none());
        self.inject = Some(Box::new(Inject {
            frame,
            written: 0,
            is_close: false,
        }));
    }

    /// Queues a Close of wsgate's own for the next frame boundary. A ping not started yet gives way to it;
    /// one already partly written is finished first, or the stream would break.
    fn inject_close(&mut self, close: &'static (u16, &'static str)) {
        if self.inject.as_ref().is_some_and(|i| i.written == 0) {
            self.inject = None;
        }
        self.close = Some(close);
    }

    fn idle(&self) -> bool {
        self.out.is_none() && self.inject.is_none() && self.close.is_none()
    }

    /// Nothing more of wsgate's will be written to `dst`.
    fn nothing_queued(&self) -> bool {
        self.inject.is_none() && self.close.is_none()
    }

    /// Bytes the park saw are still to be read from `src`. Only while `src` is read at all: a side the
    /// tunnel stopped reading (it hung up on the other direction, an ending) never clears the mark.
    fn awaiting_input(&self) -> bool {
        self.input_pending && self.reading
    }

    /// Nothing in flight either way and nothing unusual: all it holds is its scanner's state.
    fn parkable(&self) -> bool {
        self.idle()
            && self.reading
            && self.forwarding
            && !self.close_received
            && !self.gone
            && !self.unflushed
            && self.early.is_none()
            && self.blocked_since.is_none()
            && !self.input_pending
    }
}

/// wsgate's own pings to one side. The interval is the tunnel's setting (`ping_intervals`).
struct Keepalive {
    /// Last frame of any kind from this side.
    last_frame: Mark,
    /// A ping is queued and not wholly written yet (it waits for a frame boundary or for the side to read).
    queued: bool,
    /// The pong clock: since when wsgate has been waiting on the side, for the pong to its ping or for it to
    /// take the bytes in front of the ping. Cleared by any frame from the side.
    waiting_since: Option<Mark>,
    /// When the last ping went out, for the round trip of its pong.
    sent_at: Option<Mark>,
}

impl Keepalive {
    fn new() -> Keepalive {
        Keepalive {
            last_frame: Mark::START,
            queued: false,
            waiting_since: None,
            sent_at: None,
        }
    }

    fn next_ping(&self, interval: Option<Duration>) -> Option<Mark> {
        match (interval, self.waiting_since, self.queued) {
            (Some(interval), None, false) => Some(self.last_frame.after(interval)),
            _ => None,
        }
    }

    /// Follows the ping toward this side through one step of the direction writing to it.
    fn track_ping(&mut self, toward: &Half, step: &Step, now: Mark) {
        if step.ping_out {
            // The clock for the pong starts when the ping is out.
            self.queued = false;
            self.waiting_since = Some(now);
            self.sent_at = Some(now);
        } else if self.queued
            && (step.wrote || (toward.out.is_none() && !toward.scanner.at_boundary()))
        {
            // The ping is still held back. The side is not to blame while its bytes are moving, or while
            // the ping waits for the other side to finish a frame: the clock only runs while the side does
            // not take what is written to it.
            self.waiting_since = Some(now);
        }
    }
}

struct Ending {
    reason: EndReason,
    /// After this, TCP is dropped whatever the peers are doing.
    deadline: Mark,
}

struct Tunnel<C, B, X> {
    client: C,
    backend: B,
    /// Client to backend.
    up: Half,
    /// Backend to client.
    down: Half,
    client_alive: Keepalive,
    backend_alive: Keepalive,
    started: Instant,
    /// Last data frame in either direction, or a poll with peer bytes still to write.
    last_data: Mark,
    last_flush: Mark,
    flushed: (Traffic, Traffic),
    ending: Option<Ending>,
    /// A side vanished in the middle of a frame: the other side's stream cannot be finished, so no Close
    /// can follow it, and the tunnel ends at once.
    cut: bool,
    client_close_code: Option<u16>,
    /// A frame of wsgate's own was queued during this poll.
    queued: bool,
    /// Payload of wsgate's pings.
    token: [u8; 8],
    /// The stop signal is still worth listening to: false once the verdict is shutdown (its signal then
    /// stays cancelled for good).
    listening: bool,
    stop_watch: StopWatch,
    /// When and why this tunnel closes on the gateway's initiative (shutdown, its backend draining).
    stop_at: Option<(Mark, EndReason)>,
    /// The streams that have been ended in order (`poll_close`): client, backend.
    closed: (bool, bool),
    /// Whether it may go to the park when quiet: both streams can (`Transport::parkable`: sockets, or TLS
    /// sessions over them), and no park has failed to take it.
    may_park: bool,
    /// When it last came back from the park: it stays in its task at least `park_after` from then,
    /// which gives the reactor time to report what woke it.
    resumed: Mark,
    context: X,
}

/// What a tunnel's relaying came to, for the task running it.
enum Turn {
    /// It is ending: the streams are to be closed.
    Over,
    /// It has been quiet for its `park_after`: it is to leave its task for the park.
    Park,
}

/// Whether a tunnel must poll its stop signal at a wake-up. The signal's future is registered with the
/// token once and stays so: it need not be polled again until its signal may have fired (the epoch has
/// moved on) or until the task's waker is not the one it holds.
struct StopWatch {
    /// The epoch of the signal listened to.
    epoch: u64,
    /// The waker the signal's future was last polled with: the one its cancellation wakes.
    waker: Option<Waker>,
}

impl StopWatch {
    fn must_poll(&self, epoch_now: u64, waker: &Waker) -> bool {
        epoch_now != self.epoch || !self.waker.as_ref().is_some_and(|w| w.will_wake(waker))
    }

    /// The signal's future has been polled with `waker`.
    fn polled(&mut self, waker: &Waker) {
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            self.waker = Some(waker.clone());
        }
    }
}

impl<C, B, X: TunnelContext> Tunnel<C, B, X> {
    /// The same tunnel over other streams, and the streams it had (the park's sockets in and out).
    fn swap_streams<C2, B2>(self, client: C2, backend: B2) -> (Tunnel<C2, B2, X>, C, B) {
        let Tunnel {
            client: old_client,
            backend: old_backend,
            up,
            down,
            client_alive,
            backend_alive,
            started,
            last_data,
            last_flush,
            flushed,
            ending,
            cut,
            client_close_code,
            queued,
            token,
            listening,
            stop_watch,
            stop_at,
            closed,
            may_park,
            resumed,
            context,
        } = self;
        let tunnel = Tunnel {
            client,
            backend,
            up,
            down,
            client_alive,
            backend_alive,
            started,
            last_data,
            last_flush,
            flushed,
            ending,
            cut,
            client_close_code,
            queued,
            token,
            listening,
            stop_watch,
            stop_at,
            closed,
            may_park,
            resumed,
            context,
        };
        (tunnel, old_client, old_backend)
    }

    /// Hands the traffic counted since the last flush to the context.
    fn flush_traffic(&mut self) {
        let (up, down) = (self.up.traffic, self.down.traffic);
        let delta = |now: Traffic, before: Traffic| Traffic {
            bytes: now.bytes - before.bytes,
            frames: now.frames - before.frames,
        };
        let (up_delta, down_delta) = (delta(up, self.flushed.0), delta(down, self.flushed.1));
        if up_delta != Traffic::default() || down_delta != Traffic::default() {
            self.context.traffic(up_delta, down_delta);
        }
        self.flushed = (up, down);
    }

    /// How it ended (`reason` if given, else its ending's), its last traffic handed over, and its
    /// context back.
    fn outcome(mut self, reason: Option<EndReason>) -> (TunnelOutcome, X) {
        self.flush_traffic();
        let outcome = TunnelOutcome {
            reason: reason
                .or(self.ending.map(|e| e.reason))
                .unwrap_or(EndReason::ClientGone),
            close_code: self.client_close_code,
            client_to_backend: self.up.traffic,
            backend_to_client: self.down.traffic,
            duration: self.started.elapsed(),
        };
        (outcome, self.context)
    }
}

impl<C: Transport, B: Transport, X: TunnelContext> Tunnel<C, B, X> {
    /// Ends both streams in order (a failure counts as ended: there is nothing more to do for that
    /// stream), or gives up when `sleep` fires.
    fn poll_close(&mut self, cx: &mut Context<'_>, sleep: Pin<&mut Sleep>) -> Poll<()> {
        let (client, backend) = &mut self.closed;
        *client = *client || self.client.poll_shutdown(cx).is_ready();
        *backend = *backend || self.backend.poll_shutdown(cx).is_ready();
        if (*client && *backend) || sleep.poll(cx).is_ready() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        mut sleep: Pin<&mut Sleep>,
        mut stop: Pin<&mut WaitForCancellationFutureOwned>,
    ) -> Poll<Turn> {
        // A new wake-up: whatever had nothing to read may have now.
        self.up.read_pending = false;
        self.down.read_pending = false;
        // Whether this round must look at the clocks whatever the streams do: the first (a timer may be
        // what woke the task), one after the timer fired, one after the stop verdict changed.
        let mut look = true;
        loop {
            // The stop future stays registered between polls, so a quiet tunnel hears it too. The fresh
            // signal is taken before the verdict: a change in between cancels it, and it is heard at
            // once (the loop polls it again), so no change is missed. Only shutdown is final.
            if self.listening
                && self
                    .stop_watch
                    .must_poll(self.context.stop_epoch(), cx.waker())
            {
                while self.listening && stop.as_mut().poll(cx).is_ready() {
                    let signal = self.context.stop_signal();
                    self.stop_watch.epoch = signal.epoch;
                    stop.set(signal.token.cancelled_owned());
                    let at = Mark::at(self.started, Instant::now());
                    self.stop_at = self
                        .context
                        .stop()
                        .map(|(reason, delay)| (at.after(delay), reason));
                    self.listening = !matches!(self.stop_at, Some((_, EndReason::Shutdown)));
                    look = true;
                }
                self.stop_watch.polled(cx.waker());
            }
            self.queued = false;
            let buffers = self.context.buffers();
            let up = self
                .up
                .pump(cx, &mut self.client, &mut self.backend, buffers);
            let down = self
                .down
                .pump(cx, &mut self.backend, &mut self.client, buffers);
            // A later round in which nothing happened changes nothing the rest looks at: the round
            // before settled the clocks, the end and the deadline, and registered the timer.
            if !look && up == Step::default() && down == Step::default() {
                return Poll::Pending;
            }
            look = false;
            let now = Mark::at(self.started, Instant::now());
            self.client_alive.track_ping(&self.down, &down, now);
            self.backend_alive.track_ping(&self.up, &up, now);
            self.up.track_blocking(&up, now);
            self.down.track_blocking(&down, now);
            let progressed = up.progressed || down.progressed;
            let yielded = up.yielded || down.yielded;
            self.after_step(Side::Client, up, now);
            self.after_step(Side::Backend, down, now);
            let awaiting_input = self.up.awaiting_input() || self.down.awaiting_input();
            if !awaiting_input {
                self.check_timers(now);
            }
            if now.since(self.last_flush) >= FLUSH_EVERY {
                self.flush_traffic();
                self.last_flush = now;
            }
            if self.finished(now) {
                return Poll::Ready(Turn::Over);
            }
            if awaiting_input {
                // The reactor's report of those bytes wakes the task; the timer waits until they are read.
                if yielded || !(progressed || self.queued) {
                    return Poll::Pending;
                }
                continue;
            }
            // The moment to park is worked out only in a round where nothing moved, so a busy tunnel does
            // not pay for it. After a round that moved something the tunnel cannot be quiet enough
            // before `park_after` from now: the timer is set no later than that, and looks again then.
            let mut due = self.next_deadline();
            if self.may_park
                && let Some(after) = self.context.settings().park_after
            {
                if progressed {
                    due = due.min(now.after(after));
                } else if let Some(at) = self.park_at() {
                    if now >= at {
                        // Its timer set for its own next deadline, should it stay in its task after all.
                        sleep.as_mut().reset(self.timer_deadline(due, now));
                        if sleep.as_mut().poll(cx).is_pending() {
                            return Poll::Ready(Turn::Park);
                        }
                        look = true;
                        continue;
                    }
                    due = due.min(at);
                }
            }
            // Re-arming a timer costs more than a spurious wake-up: move it only when it must fire sooner.
            let deadline = self.timer_deadline(due, now);
            if deadline < sleep.deadline() {
                sleep.as_mut().reset(deadline);
            }
            if sleep.as_mut().poll(cx).is_ready() {
                sleep.as_mut().reset(self.timer_deadline(self.due(), now));
                look = true;
                continue;
            }
            if yielded {
                return Poll::Pending;
            }
            // Progress or newly queued frames may have unblocked work; stop once everything would block.
            if !(progressed || self.queued) {
                return Poll::Pending;
            }
        }
    }

    /// Reacts to what one direction (read from `side`) did.
    fn after_step(&mut self, side: Side, step: Step, now: Mark) {
        if step.data || step.forwarded {
            self.last_data = now;
        }
        let alive = match side {
            Side::Client => &mut self.client_alive,
            Side::Backend => &mut self.backend_alive,
        };
        if step.frames || step.pong_matched {
            alive.last_frame = now;
            alive.waiting_since = None;
        }
        if step.pong_matched
            && let Some(sent) = alive.sent_at.take()
        {
            self.context.ping_rtt(now.since(sent));
        }
        if let Some(close) = step.close {
            if side == Side::Backend && self.down.forwarding {
                self.client_close_code = match close {
                    ClosePayload::Code(code) => Some(code),
                    _ => Some(1005),
                };
            }
            let reason = match side {
                Side::Client => EndReason::ClientClose,
                Side::Backend => EndReason::BackendClose,
            };
            self.end(reason, now);
        }
        if let Some(violation) = step.violation {
            let reason = match (side, violation) {
                (Side::Client, Violation::MessageTooBig) => EndReason::MessageTooBig,
                (Side::Client, Violation::Protocol(_)) => EndReason::ProtocolError,
                (Side::Backend, _) => EndReason::BackendProtocolError,
            };
            tracing::debug!(side = ?side, %violation, "websocket stream violation");
            self.end(reason, now);
        }
        if step.src_gone {
            self.side_gone(side, now);
        }
        if step.dst_gone {
            let other = match side {
                Side::Client => Side::Backend,
                Side::Backend => Side::Client,
            };
            self.side_gone(other, now);
        }
    }

    fn side_gone(&mut self, side: Side, now: Mark) {
        // Nothing more can be written to a side that hung up.
        let (gone, towards) = match side {
            Side::Client => (&mut self.up, &mut self.down),
            Side::Backend => (&mut self.down, &mut self.up),
        };
        gone.reading = false;
        gone.gone = true;
        towards.out = None;
        towards.inject = None;
        towards.close = None;
        towards.forwarding = false;
        if !gone.scanner.at_boundary() {
            self.cut = true;
        }
        let said_goodbye = gone.close_received;
        if !said_goodbye {
            let reason = match side {
                Side::Client => EndReason::ClientGone,
                Side::Backend => EndReason::BackendGone,
            };
            self.end(reason, now);
        }
    }

    fn check_timers(&mut self, now: Mark) {
        if self.ending.is_some() {
            return;
        }
        if let Some((at, reason)) = self.stop_at
            && now >= at
        {
            return self.end(reason, now);
        }
        let settings = self.context.settings();
        if let Some(lifetime) = settings.max_lifetime
            && now >= Mark::START.after(lifetime)
        {
            return self.end(EndReason::MaxLifetime, now);
        }
        for side in [Side::Client, Side::Backend] {
            let alive = match side {
                Side::Client => &self.client_alive,
                Side::Backend => &self.backend_alive,
            };
            if let Some(since) = alive.waiting_since
                && now >= since.after(settings.pong_timeout)
            {
                let reason = match side {
                    Side::Client => EndReason::PongTimeout,
                    Side::Backend => EndReason::BackendPongTimeout,
                };
                return self.end(reason, now);
            }
        }
        // A peer that takes nothing written to it is not kept alive by what it sends (its pongs, say).
        if let Some(since) = self.down.blocked_since
            && now >= since.after(settings.send_timeout)
        {
            return self.end(EndReason::ClientStalled, now);
        }
        if let Some(since) = self.up.blocked_since
            && now >= since.after(settings.send_timeout)
        {
            return self.end(EndReason::BackendStalled, now);
        }
        // Activity is progress: data read from a peer, or a peer's data-frame bytes written on
        // (`after_step`). Bytes waiting to be written are not, nor are control frames (the peers' pings
        // and pongs pass through without keeping a tunnel open), nor a ping of wsgate's own.
        if now >= self.last_data.after(settings.idle_timeout) {
            return self.end(EndReason::IdleTimeout, now);
        }
        self.send_pings(now);
    }

    fn send_pings(&mut self, now: Mark) {
        // Only the keepalive injects outside an ending, so a due ping finds its slot free.
        let (client_ping, backend_ping) = ping_intervals(self.context.settings());
        if self
            .client_alive
            .next_ping(client_ping)
            .is_some_and(|at| now >= at)
        {
            let ping = ControlFrame::new(OP_PING, &self.token, Role::Server);
            self.down.inject_ping(ping);
            self.queued = true;
            self.client_alive.queued = true;
            self.client_alive.waiting_since = Some(now);
        }
        if self
            .backend_alive
            .next_ping(backend_ping)
            .is_some_and(|at| now >= at)
        {
            let ping = ControlFrame::new(OP_PING, &self.token, Role::Client);
            self.up.inject_ping(ping);
            self.queued = true;
            self.backend_alive.queued = true;
            self.backend_alive.waiting_since = Some(now);
        }
    }

    /// Starts the ending of the tunnel: queues wsgate's own Close frames and stops reading from sides that
    /// have nothing more to say. The first cause wins.
    fn end(&mut self, reason: EndReason, now: Mark) {
        if self.ending.is_some() {
            return;
        }
        self.ending = Some(Ending {
            reason,
            deadline: now.after(self.context.settings().close_timeout),
        });
        self.queued = true;
        let (to_client, to_backend) = reason.own_closes();
        if let Some(close) = to_client
            && !self.up.gone
            && !self.cut
        {
            self.down.inject_close(close);
            self.client_close_code = Some(close.0);
        }
        if let Some(close) = to_backend
            && !self.down.gone
            && !self.cut
        {
            self.up.inject_close(close);
        }
        if matches!(
            reason,
            EndReason::PongTimeout
                | EndReason::ProtocolError
                | EndReason::MessageTooBig
                | EndReason::ClientStalled
        ) {
            // The client is dead or broke the protocol: its answer is not awaited.
            self.up.reading = false;
        }
        if matches!(
            reason,
            EndReason::BackendPongTimeout
                | EndReason::BackendProtocolError
                | EndReason::BackendStalled
        ) {
            self.down.reading = false;
        }
        // A dead peer gets one attempt at a Close; it does not hold the tunnel open until the deadline.
        match reason {
            EndReason::PongTimeout | EndReason::ClientStalled => self.down.abandoned = true,
            EndReason::BackendPongTimeout | EndReason::BackendStalled => self.up.abandoned = true,
            _ => {}
        }
    }

    /// Whether there is nothing left to wait for.
    fn finished(&self, now: Mark) -> bool {
        if self.cut {
            return true;
        }
        let Some(ending) = &self.ending else {
            return false;
        };
        if now >= ending.deadline {
            return true;
        }
        // Done when every side is either silent for good or has answered, and everything is written.
        let settled = |h: &Half| !h.reading || h.close_received || h.gone;
        let flushed = |h: &Half| h.abandoned || h.idle() || (!h.forwarding && h.nothing_queued());
        settled(&self.up) && settled(&self.down) && flushed(&self.up) && flushed(&self.down)
    }

    /// `due` (`next_deadline`, or the moment to park), at most a day from `now`, as the tunnel's timer
    /// takes it.
    fn timer_deadline(&self, due: Mark, now: Mark) -> Instant {
        let far = now.after(Duration::from_secs(86_400));
        let deadline = due.min(far);
        // A day from now is within what an `Instant` holds; the fallback is for the type's sake.
        deadline
            .instant(self.started)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400))
    }

    /// The earliest moment a timer of the tunnel's fires (at the end of time if none would).
    fn next_deadline(&self) -> Mark {
        let settings = self.context.settings();
        if let Some(ending) = &self.ending {
            return ending.deadline;
        }
        let mut deadline = self.last_data.after(settings.idle_timeout);
        if let Some((at, _)) = self.stop_at {
            deadline = deadline.min(at);
        }
        if let Some(lifetime) = settings.max_lifetime {
            deadline = deadline.min(Mark::START.after(lifetime));
        }
        let (client_ping, backend_ping) = ping_intervals(settings);
        for (alive, interval) in [
            (&self.client_alive, client_ping),
            (&self.backend_alive, backend_ping),
        ] {
            if let Some(at) = alive.next_ping(interval) {
                deadline = deadline.min(at);
            }
            if let Some(since) = alive.waiting_since {
                deadline = deadline.min(since.after(settings.pong_timeout));
            }
        }
        for half in [&self.up, &self.down] {
            if let Some(since) = half.blocked_since {
                deadline = deadline.min(since.after(settings.send_timeout));
            }
        }
        deadline
    }

    /// What the tunnel's timer is set for: its next deadline, or the moment to park if that comes first.
    fn due(&self) -> Mark {
        let deadline = self.next_deadline();
        self.park_at().map_or(deadline, |at| deadline.min(at))
    }

    /// When the tunnel is to leave its task for the park: `park_after` after the last thing that moved
    /// either way, if it is quiet (nothing queued or half-written either way, no ending under way, the
    /// stop verdict not final), both streams can park and hold nothing in flight (`Transport::settled`).
    /// `None`: not while it is as it is.
    fn park_at(&self) -> Option<Mark> {
        let after = self.context.settings().park_after?;
        let quiet = self.may_park
            && self.listening
            && self.ending.is_none()
            && !self.cut
            && self.up.parkable()
            && self.down.parkable()
            && self.client.settled()
            && self.backend.settled()
            && !self.client_alive.queued
            && !self.backend_alive.queued;
        if !quiet {
            return None;
        }
        let moved = [
            self.resumed,
            self.last_data,
            self.client_alive.last_frame,
            self.backend_alive.last_frame,
            self.client_alive.sent_at.unwrap_or(Mark::START),
            self.backend_alive.sent_at.unwrap_or(Mark::START),
        ];
        moved.into_iter().max().map(|last| last.after(after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::net::TcpStream;

    /// A context of two references, as small as one can be: the bound below is the tunnel's own size.
    struct Quiet {
        settings: &'static WebSocketSettings,
        buffers: &'static BufferPool,
    }

    impl TunnelContext for Quiet {
        fn settings(&self) -> &WebSocketSettings {
            self.settings
        }
        fn buffers(&self) -> &BufferPool {
            self.buffers
        }
        fn traffic(&self, _: Traffic, _: Traffic) {}
        fn ping_rtt(&self, _: Duration) {}
        fn stop_signal(&self) -> StopSignal {
            StopSignal {
                token: CancellationToken::new(),
                epoch: 0,
                source: 0,
            }
        }
        fn stop_epoch(&self) -> u64 {
            0
        }
        fn stop(&self) -> Option<(EndReason, Duration)> {
            None
        }
        fn tracked(&self) -> TaskTrackerToken {
            tokio_util::task::TaskTracker::new().token()
        }
        fn parked(&self, _: bool) {}
        fn ended(self, _: &TunnelOutcome) {}
    }

    /// A context whose stop signal is handed out already cancelled, as when a drain's change (another
    /// thread's `tell`) races the moment a tunnel takes its signal; later signals are `later`.
    struct Racy {
        settings: WebSocketSettings,
        buffers: BufferPool,
        handed: std::sync::atomic::AtomicUsize,
        later: CancellationToken,
        shutdown: std::sync::atomic::AtomicBool,
        ended: std::sync::Mutex<Option<EndReason>>,
    }

    impl TunnelContext for Arc<Racy> {
        fn settings(&self) -> &WebSocketSettings {
            &self.settings
        }
        fn buffers(&self) -> &BufferPool {
            &self.buffers
        }
        fn traffic(&self, _: Traffic, _: Traffic) {}
        fn ping_rtt(&self, _: Duration) {}
        /// The two raced signals have epochs 0 and 1, `later` has 2, shutdown moves the epoch to 3.
        fn stop_signal(&self) -> StopSignal {
            use std::sync::atomic::Ordering;
            let handed = self.handed.fetch_add(1, Ordering::SeqCst);
            if handed < 2 {
                let raced = CancellationToken::new();
                raced.cancel();
                StopSignal {
                    token: raced,
                    epoch: handed as u64,
                    source: 0,
                }
            } else {
                StopSignal {
                    token: self.later.clone(),
                    epoch: 2,
                    source: 0,
                }
            }
        }
        fn stop_epoch(&self) -> u64 {
            use std::sync::atomic::Ordering;
            let shutdown = self.shutdown.load(Ordering::SeqCst);
            (self.handed.load(Ordering::SeqCst) as u64).min(2) + u64::from(shutdown)
        }
        fn stop(&self) -> Option<(EndReason, Duration)> {
            self.shutdown
                .load(std::sync::atomic::Ordering::SeqCst)
                .then_some((EndReason::Shutdown, Duration::ZERO))
        }
        fn tracked(&self) -> TaskTrackerToken {
            tokio_util::task::TaskTracker::new().token()
        }
        fn parked(&self, _: bool) {}
        fn ended(self, outcome: &TunnelOutcome) {
            *self.ended.lock().unwrap() = Some(outcome.reason);
        }
    }

    /// A waker of its own (two `Arc`s: `will_wake` tells them apart).
    fn waker() -> Waker {
        struct Nothing;
        impl std::task::Wake for Nothing {
            fn wake(self: std::sync::Arc<Self>) {}
        }
        Waker::from(std::sync::Arc::new(Nothing))
    }

    #[test]
    fn the_stop_signal_is_polled_only_when_it_may_have_fired() {
        let (one, other) = (waker(), waker());
        let mut watch = StopWatch {
            epoch: 4,
            waker: None,
        };
        assert!(watch.must_poll(4, &one), "never polled: not registered");
        watch.polled(&one);
        assert!(!watch.must_poll(4, &one), "registered, and nothing moved");
        assert!(
            watch.must_poll(5, &one),
            "the epoch moved: it may have fired"
        );
        assert!(watch.must_poll(4, &other), "registered with another waker");
        watch.polled(&other);
        assert!(!watch.must_poll(4, &other));
        assert!(watch.must_poll(4, &one));
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// A signal that was cancelled under the tunnel's feet (at its start, and again at its first ask)
    /// does not make it deaf: the shutdown that comes later is heard, and ends it.
    #[tokio::test(start_paused = true)]
    async fn a_signal_cancelled_by_a_racing_change_is_not_the_last_one_heard() {
        use std::sync::atomic::Ordering;
        let context = Arc::new(Racy {
            settings: WebSocketSettings {
                ping_interval: None,
                park_after: None,
                ..WebSocketSettings::default()
            },
            buffers: BufferPool::default(),
            handed: Default::default(),
            later: CancellationToken::new(),
            shutdown: Default::default(),
            ended: Default::default(),
        });
        let ((client, _client_peer), (backend, _backend_peer)) = (pair().await, pair().await);
        let params = TunnelParams {
            allowed_rsv: 0,
            context: Arc::clone(&context),
        };
        let tunnel = run(client, Bytes::new(), backend, Bytes::new(), params);
        let mut tunnel = std::pin::pin!(tunnel);
        // Long enough for the tunnel to settle on its signal; it must still be running.
        let settled = tokio::time::timeout(Duration::from_secs(60), tunnel.as_mut()).await;
        assert!(settled.is_err(), "the tunnel ended on its own");
        assert!(
            context.handed.load(Ordering::SeqCst) >= 3,
            "the raced signals were asked again"
        );
        context.shutdown.store(true, Ordering::SeqCst);
        context.later.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(60), tunnel).await;
        ended.expect("the shutdown was heard");
        assert_eq!(*context.ended.lock().unwrap(), Some(EndReason::Shutdown));
    }

    /// Records what a tunnel tells its context, for the park's tests.
    struct Recorder {
        settings: WebSocketSettings,
        buffers: BufferPool,
        stop: CancellationToken,
        shutdown: std::sync::atomic::AtomicBool,
        tasks: tokio_util::task::TaskTracker,
        parked: std::sync::atomic::AtomicIsize,
        parks: std::sync::atomic::AtomicUsize,
        changed: tokio::sync::Notify,
        ended: std::sync::Mutex<Option<TunnelOutcome>>,
    }

    impl Recorder {
        fn new(settings: WebSocketSettings) -> Arc<Recorder> {
            Arc::new(Recorder {
                settings,
                buffers: BufferPool::default(),
                stop: CancellationToken::new(),
                shutdown: Default::default(),
                tasks: tokio_util::task::TaskTracker::new(),
                parked: Default::default(),
                parks: Default::default(),
                changed: tokio::sync::Notify::new(),
                ended: Default::default(),
            })
        }

        /// (parked now, times parked)
        fn parking(&self) -> (isize, usize) {
            use std::sync::atomic::Ordering::SeqCst;
            (self.parked.load(SeqCst), self.parks.load(SeqCst))
        }

        async fn until(&self, what: &str, done: impl Fn(&Recorder) -> bool) {
            let waited = tokio::time::timeout(Duration::from_secs(600), async {
                while !done(self) {
                    self.changed.notified().await;
                }
            });
            waited
                .await
                .unwrap_or_else(|_| panic!("never came: {what}"));
        }
    }

    impl TunnelContext for Arc<Recorder> {
        fn settings(&self) -> &WebSocketSettings {
            &self.settings
        }
        fn buffers(&self) -> &BufferPool {
            &self.buffers
        }
        fn traffic(&self, _: Traffic, _: Traffic) {}
        fn ping_rtt(&self, _: Duration) {}
        fn stop_signal(&self) -> StopSignal {
            StopSignal {
                token: self.stop.clone(),
                epoch: self.stop_epoch(),
                source: 1,
            }
        }
        fn stop_epoch(&self) -> u64 {
            u64::from(self.shutdown.load(std::sync::atomic::Ordering::SeqCst))
        }
        fn stop(&self) -> Option<(EndReason, Duration)> {
            self.shutdown
                .load(std::sync::atomic::Ordering::SeqCst)
                .then_some((EndReason::Shutdown, Duration::ZERO))
        }
        fn tracked(&self) -> TaskTrackerToken {
            self.tasks.token()
        }
        fn parked(&self, parked: bool) {
            use std::sync::atomic::Ordering::SeqCst;
            if parked {
                self.parked.fetch_add(1, SeqCst);
                self.parks.fetch_add(1, SeqCst);
            } else {
                self.parked.fetch_sub(1, SeqCst);
            }
            self.changed.notify_one();
        }
        fn ended(self, outcome: &TunnelOutcome) {
            *self.ended.lock().unwrap() = Some(outcome.clone());
            self.changed.notify_one();
        }
    }

    /// Reads exactly `n` bytes, within a time bound.
    async fn read_n(stream: &mut TcpStream, n: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0; n];
        tokio::time::timeout(Duration::from_secs(60), stream.read_exact(&mut buf))
            .await
            .expect("bytes in time")
            .expect("bytes");
        buf
    }

    /// A client frame (masked with `key`).
    fn masked(opcode: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&key);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        frame
    }

    fn start_recorded(
        client: TcpStream,
        backend: TcpStream,
        settings: WebSocketSettings,
    ) -> Arc<Recorder> {
        let recorder = Recorder::new(settings);
        let params = TunnelParams {
            allowed_rsv: 0,
            context: Arc::clone(&recorder),
        };
        recorder
            .tasks
            .spawn(run(client, Bytes::new(), backend, Bytes::new(), params));
        recorder
    }

    /// A quiet tunnel leaves its task for the park, and comes back for what either side sends, which
    /// goes through unchanged; a hang-up reaches it in the park too.
    #[tokio::test(start_paused = true)]
    async fn a_quiet_tunnel_parks_and_comes_back_when_either_side_sends() {
        use tokio::io::AsyncWriteExt;
        let ((client, mut client_peer), (backend, mut backend_peer)) = (pair().await, pair().await);
        let settings = WebSocketSettings {
            ping_interval: None,
            park_after: Some(Duration::from_secs(1)),
            ..WebSocketSettings::default()
        };
        let recorder = start_recorded(client, backend, settings);
        recorder.until("parked", |r| r.parking() == (1, 1)).await;

        let frame = masked(0x1, b"hi", [1, 2, 3, 4]);
        client_peer.write_all(&frame).await.unwrap();
        assert_eq!(read_n(&mut backend_peer, frame.len()).await, frame);
        recorder
            .until("parked again", |r| r.parking() == (1, 2))
            .await;

        backend_peer
            .write_all(&[0x81, 0x02, b'o', b'k'])
            .await
            .unwrap();
        assert_eq!(read_n(&mut client_peer, 4).await, [0x81, 0x02, b'o', b'k']);
        recorder
            .until("parked a third time", |r| r.parking() == (1, 3))
            .await;

        drop(client_peer);
        recorder
            .until("ended", |r| r.ended.lock().unwrap().is_some())
            .await;
        let outcome = recorder.ended.lock().unwrap().clone().unwrap();
        assert_eq!(outcome.reason, EndReason::ClientGone);
        assert_eq!(outcome.client_to_backend.bytes, frame.len() as u64);
        assert_eq!(outcome.backend_to_client.bytes, 4);
        // The backend is told, with wsgate's own Close.
        assert_eq!(read_n(&mut backend_peer, 1).await, [0x88]);
        assert_eq!(recorder.parking().0, 0, "nothing left in the park");
    }

    /// A tunnel that comes back from the park for bytes sent just before its idle deadline reads them
    /// before it judges the deadline, as it would have in its task: they keep it alive.
    #[tokio::test(start_paused = true)]
    async fn a_tunnel_back_from_the_park_reads_before_it_judges_its_deadlines() {
        use tokio::io::AsyncWriteExt;
        let ((client, mut client_peer), (backend, mut backend_peer)) = (pair().await, pair().await);
        let settings = WebSocketSettings {
            ping_interval: None,
            idle_timeout: Duration::from_secs(60),
            park_after: Some(Duration::from_secs(1)),
            ..WebSocketSettings::default()
        };
        let started = Instant::now();
        let recorder = start_recorded(client, backend, settings);
        recorder.until("parked", |r| r.parking() == (1, 1)).await;

        tokio::time::sleep_until(started + Duration::from_millis(59_500)).await;
        let frame = masked(0x1, b"just in time", [5, 6, 7, 8]);
        client_peer.write_all(&frame).await.unwrap();
        // The clock passes the deadline before the park or the tunnel sees the bytes.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(read_n(&mut backend_peer, frame.len()).await, frame);
        recorder
            .until("parked again", |r| r.parking() == (1, 2))
            .await;
        assert!(
            recorder.ended.lock().unwrap().is_none(),
            "ended: {:?}",
            recorder.ended.lock().unwrap()
        );
    }

    /// A parked tunnel's timers run (its keepalive ping goes out on time) and its stop signal is
    /// heard: shutdown ends it with a Close.
    #[tokio::test(start_paused = true)]
    async fn a_parked_tunnel_keeps_its_timers_and_hears_its_stop_signal() {
        use tokio::io::AsyncWriteExt;
        let ((client, mut client_peer), (backend, _backend_peer)) = (pair().await, pair().await);
        let settings = WebSocketSettings {
            ping_interval: Some(Duration::from_secs(10)),
            park_after: Some(Duration::from_secs(1)),
            ..WebSocketSettings::default()
        };
        let started = Instant::now();
        let recorder = start_recorded(client, backend, settings);
        recorder.until("parked", |r| r.parking() == (1, 1)).await;

        let ping = read_n(&mut client_peer, 10).await;
        assert_eq!(ping[..2], [0x89, 0x08], "wsgate's keepalive ping");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
            "the ping went out at its interval, not {waited:?}"
        );
        client_peer
            .write_all(&masked(0xA, &ping[2..], [9, 8, 7, 6]))
            .await
            .unwrap();
        recorder
            .until("parked again", |r| r.parking() == (1, 2))
            .await;

        recorder
            .shutdown
            .store(true, std::sync::atomic::Ordering::SeqCst);
        recorder.stop.cancel();
        recorder
            .until("ended", |r| r.ended.lock().unwrap().is_some())
            .await;
        let outcome = recorder.ended.lock().unwrap().clone().unwrap();
        assert_eq!(outcome.reason, EndReason::Shutdown);
        assert_eq!(
            read_n(&mut client_peer, 1).await,
            [0x88],
            "a Close to the client"
        );
    }

    /// Memory per idle tunnel is a figure wsgate competes on (BENCHMARKS.md): the whole state of a tunnel is
    /// its future, so its size is held to a bound.
    #[tokio::test]
    async fn the_tunnel_future_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let backend = TcpStream::connect(addr).await.unwrap();
        let params = TunnelParams {
            allowed_rsv: 0,
            context: Quiet {
                settings: Box::leak(Box::default()),
                buffers: Box::leak(Box::default()),
            },
        };
        let future = run(client, Bytes::new(), backend, Bytes::new(), params);
        let size = std::mem::size_of_val(&future);
        println!("tunnel future: {size} bytes");
        // What it holds: the two streams, two scanners (a 14-byte inline carry each), the keepalive,
        // idle and write-stall clocks (eight bytes each, `Mark`), the timer and the stop signal's
        // registration. With the gateway's context (40 bytes more) and tokio's task header and trailer
        // this is the tunnel's task, a 1,024-byte allocation (BENCHMARKS.md); past this bound it would
        // take the next size class, 1,280 bytes. (An unoptimised build lays it out a little larger.)
        assert!(size <= 850, "the tunnel future grew to {size} bytes");
    }
}
