//! One long-lived tunnel slot of the soak. Each life: connect through wsgate,
//! learn the backend from its greeting (`backend=<i>`), send a numbered
//! message about once a second and check that every echo comes back once, in
//! order and unchanged. A life ends the way the chaos says — its backend is
//! killed (a Close 1014 must come), or the client vanishes with a reset or a
//! FIN — and the slot reconnects, until the phase drains (Close handshake).
//! Anything else that ends a life is a failure, counted by what it was.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior, timeout, timeout_at};

use super::state::{Chaos, F_CONNECT, F_DRAIN, F_END, F_KILL, F_MSG, Shared, Stats, bump, bump_by};
use super::wire::{self, Frame, Gone, OP_BINARY, OP_PONG, close_code};

const CONNECT_LIMIT: Duration = Duration::from_secs(5);
const GREETING_LIMIT: Duration = Duration::from_secs(5);
const SEND_LIMIT: Duration = Duration::from_secs(5);
/// An echo not back within this, on a tunnel nobody disturbed, is a failure.
const STALL_LIMIT: Duration = Duration::from_secs(10);
/// Once its backend is killed, a tunnel must get its Close within this.
const DOOM_LIMIT: Duration = Duration::from_secs(10);
/// Drain: outstanding echoes, then the answer to the client's Close, each within this.
const DRAIN_STEP_LIMIT: Duration = Duration::from_secs(5);
/// After Closes went both ways wsgate must end TCP: its close_timeout (2 s) and a margin.
const TCP_END_LIMIT: Duration = Duration::from_secs(3);
/// Lives per slot, far above what a run needs: the phase's end is the real bound.
const MAX_LIVES: u32 = 100_000;
/// Bytes per message: tunnel id, life, sequence number, then a pattern.
pub const MSG_LEN: usize = 64;

/// What every slot of a phase shares.
pub struct TunnelPlan {
    pub addr: SocketAddr,
    /// Between two messages of one tunnel.
    pub interval: Duration,
    /// Out of 10,000 tunnels, how many vanish with a reset each vanish round
    /// (as many again vanish with a FIN).
    pub vanish_per_10k: u64,
}

enum Next {
    Reconnect,
    Stop,
}

/// The slot's whole run: lives one after another until the phase drains.
pub async fn run(id: u32, start_delay: Duration, plan: Arc<TunnelPlan>, shared: Arc<Shared>) {
    let mut chaos = shared.chaos.subscribe();
    tokio::time::sleep(start_delay).await;
    for life in 0..MAX_LIVES {
        if chaos.borrow_and_update().draining {
            return;
        }
        match one_life(id, life, &plan, &shared, &mut chaos).await {
            Next::Stop => return,
            Next::Reconnect => {
                // A short random pause, as real clients back off.
                let pause = Duration::from_millis(100 + fastrand::u64(..500));
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// Counts a tunnel as open while held.
struct OpenGuard<'a>(&'a AtomicI64);

impl<'a> OpenGuard<'a> {
    fn new(c: &'a AtomicI64) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        OpenGuard(c)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn one_life(
    id: u32,
    life: u32,
    plan: &TunnelPlan,
    shared: &Shared,
    chaos: &mut watch::Receiver<Chaos>,
) -> Next {
    let st = &shared.stats;
    let at_start = shared.epochs();
    let outage_at_start = shared.in_outage();
    // A connect or greeting that fails is legitimate only if a backend kill
    // touched it: a refusal during an outage, or any end while epochs moved.
    let excused = |refusal: bool| {
        (refusal && (outage_at_start || shared.in_outage())) || shared.epochs() != at_start
    };
    let mut conn = match wire::connect(plan.addr, CONNECT_LIMIT).await {
        Ok(c) => c,
        Err(e) => {
            if excused(e.is_refusal()) {
                bump(if e.is_refusal() {
                    &st.connect_refused_outage
                } else {
                    &st.connect_cut_by_kill
                });
            } else {
                st.fail(F_CONNECT, &e.label(), || {
                    format!("tunnel {id} life {life} at {:.1}s", shared.at())
                });
            }
            return Next::Reconnect;
        }
    };
    let backend = match timeout(GREETING_LIMIT, conn.read_frame()).await {
        Ok(Ok(Frame::Text(t))) => std::str::from_utf8(&t)
            .ok()
            .and_then(|s| s.strip_prefix("backend="))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&b| b < at_start.len())
            .ok_or_else(|| format!("bad greeting {:?}", String::from_utf8_lossy(&t))),
        Ok(Ok(Frame::Close(code, _))) => {
            Err(format!("Close {} before the greeting", close_code(code)))
        }
        Ok(Ok(f)) => Err(format!("{} before the greeting", f.kind())),
        Ok(Err(g)) => Err(format!("{} before the greeting", g.label())),
        Err(_) => Err("no greeting within 5 s".into()),
    };
    let b = match backend {
        Ok(b) => b,
        Err(what) => {
            if excused(false) {
                bump(&st.connect_cut_by_kill);
            } else {
                st.fail(F_CONNECT, &what, || {
                    format!("tunnel {id} life {life} at {:.1}s", shared.at())
                });
            }
            conn.abort_rst();
            return Next::Reconnect;
        }
    };
    bump(&st.lives);
    let _open = OpenGuard::new(&st.open);
    // The backend's epoch when its greeting was read, rounded down to "up":
    // if it is odd (killed) now, this tunnel is on the dying incarnation.
    let base = {
        let e = shared.epochs()[b];
        e - e % 2
    };
    let mut doom: Option<Instant> = None;
    // Marks the tunnel as doomed (once) as soon as its backend's epoch moved.
    let check_doom = |doom: &mut Option<Instant>| {
        if doom.is_none() && shared.chaos.borrow().epochs[b] != base {
            *doom = Some(Instant::now() + DOOM_LIMIT);
            bump(&st.expected_1014);
        }
    };
    check_doom(&mut doom);
    let mut seen_round = chaos.borrow_and_update().vanish_round;
    let mut drain_after = false;
    let mut track = Track::new(id, life);
    let first = Instant::now() + plan.interval.mul_f64(fastrand::f64());
    let mut tick = tokio::time::interval_at(first, plan.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let far = Instant::now() + Duration::from_secs(86_400);
    let who = |b: usize| {
        format!(
            "tunnel {id} life {life} on backend {b} at {:.1}s",
            shared.at()
        )
    };

    // Bounded: the phase's drain ends it; every other wait is under a limit.
    loop {
        let stall_at = track.oldest().map(|t| t + STALL_LIMIT);
        let doom_at = doom;
        tokio::select! {
            r = chaos.changed() => {
                let c = match r {
                    Ok(()) => chaos.borrow_and_update().clone(),
                    // The phase is gone: treat as a drain.
                    Err(_) => Chaos { epochs: Vec::new(), vanish_round: 0, draining: true },
                };
                check_doom(&mut doom);
                if c.draining {
                    if doom.is_some() {
                        // The Close 1014 comes first; then the slot stops.
                        drain_after = true;
                        continue;
                    }
                    return drain(conn, track, shared).await;
                }
                if doom.is_none() && c.vanish_round > seen_round {
                    seen_round = c.vanish_round;
                    match vanish_pick(id, seen_round, plan.vanish_per_10k) {
                        Some(Vanish::Rst) => {
                            bump(&st.vanished_rst);
                            track.finish(false, st);
                            conn.abort_rst();
                            return Next::Reconnect;
                        }
                        Some(Vanish::Fin) => {
                            bump(&st.vanished_fin);
                            track.finish(false, st);
                            conn.abort_fin(TCP_END_LIMIT).await;
                            return Next::Reconnect;
                        }
                        None => {}
                    }
                }
            }
            f = conn.read_frame() => {
                let end = match f {
                    Ok(Frame::Binary(p)) => {
                        track.on_echo(&p, shared);
                        continue;
                    }
                    Ok(Frame::Ping(p)) => match conn.send(OP_PONG, &p, SEND_LIMIT).await {
                        Ok(()) => continue,
                        Err(g) => End::Gone(g),
                    },
                    Ok(Frame::Pong) => continue,
                    Ok(Frame::Text(t)) => {
                        track.text(&t, st);
                        continue;
                    }
                    Ok(Frame::Close(code, reason)) => End::Close(code, reason),
                    Err(g) => End::Gone(g),
                };
                check_doom(&mut doom);
                return ended(end, doom.is_some(), drain_after, conn, track, st, || who(b)).await;
            }
            _ = tick.tick(), if doom.is_none() && !drain_after => {
                let p = track.next_payload();
                match conn.send(OP_BINARY, &p, SEND_LIMIT).await {
                    Ok(()) => bump(&st.msgs_sent),
                    Err(g) => {
                        // Sent or not, it is outstanding: a surviving tunnel counts it lost.
                        check_doom(&mut doom);
                        return ended(End::Gone(g), doom.is_some(), drain_after, conn, track, st, || who(b)).await;
                    }
                }
            }
            _ = tokio::time::sleep_until(doom_at.unwrap_or(far)), if doom_at.is_some() => {
                st.fail(F_KILL, "no Close 1014 (nor anything) within 10 s of the kill", || who(b));
                track.finish(false, st);
                conn.abort_rst();
                return if drain_after { Next::Stop } else { Next::Reconnect };
            }
            _ = tokio::time::sleep_until(stall_at.unwrap_or(far)), if stall_at.is_some() && doom.is_none() => {
                check_doom(&mut doom);
                if doom.is_some() {
                    continue;
                }
                st.fail(F_END, "echo not back within 10 s (tunnel given up)", || who(b));
                track.finish(true, st);
                conn.abort_rst();
                return Next::Reconnect;
            }
        }
    }
}

/// How a life ended without the soak ending it.
enum End {
    Close(Option<u16>, String),
    Gone(Gone),
}

/// Counts the end of a life that wsgate (or the network) ended: on a killed
/// backend only a Close 1014 is right; on any other tunnel every end is a failure.
async fn ended(
    end: End,
    doomed: bool,
    drain_after: bool,
    mut conn: wire::Conn,
    track: Track,
    st: &Stats,
    who: impl Fn() -> String,
) -> Next {
    let what = match &end {
        End::Close(code, reason) => format!("Close {} {reason:?}", close_code(*code)),
        End::Gone(g) => g.label(),
    };
    if doomed {
        if matches!(end, End::Close(Some(1014), _)) {
            bump(&st.got_1014);
        } else {
            st.fail(F_KILL, &format!("got {what} instead of Close 1014"), &who);
        }
    } else {
        st.fail(F_END, &format!("by wsgate: {what}"), &who);
    }
    track.finish(!doomed, st);
    if let End::Close(code, _) = end {
        // Answer the Close as a client should; wsgate must then end TCP.
        let _ = conn.send_close(code.unwrap_or(1000), SEND_LIMIT).await;
        if !conn.await_tcp_end(TCP_END_LIMIT).await {
            let kind = if doomed { F_KILL } else { F_END };
            st.fail(kind, "TCP left open after the Close exchange", &who);
        }
    }
    if drain_after {
        Next::Stop
    } else {
        Next::Reconnect
    }
}

/// The end of a phase: no more messages, wait for the outstanding echoes,
/// then a Close handshake that wsgate must complete and follow with a TCP end.
async fn drain(mut conn: wire::Conn, mut track: Track, shared: &Shared) -> Next {
    let st = &shared.stats;
    let (id, life) = (track.id, track.life);
    let who = move || format!("tunnel {id} life {life} at {:.1}s", shared.at());
    let deadline = Instant::now() + DRAIN_STEP_LIMIT;
    // Bounded: each turn takes a frame, or the deadline ends it.
    while track.oldest().is_some() {
        let Ok(f) = timeout_at(deadline, conn.read_frame()).await else {
            break;
        };
        match f {
            Ok(Frame::Binary(p)) => track.on_echo(&p, shared),
            Ok(Frame::Ping(p)) => {
                let _ = conn.send(OP_PONG, &p, SEND_LIMIT).await;
            }
            Ok(Frame::Pong) => {}
            Ok(Frame::Text(t)) => track.text(&t, st),
            Ok(Frame::Close(code, reason)) => {
                let what = format!("by wsgate: Close {} {reason:?}", close_code(code));
                st.fail(F_END, &what, who);
                track.finish(true, st);
                return Next::Stop;
            }
            Err(g) => {
                st.fail(F_END, &format!("by wsgate: {}", g.label()), who);
                track.finish(true, st);
                return Next::Stop;
            }
        }
    }
    if let Err(g) = conn.send_close(1000, SEND_LIMIT).await {
        st.fail(F_DRAIN, &format!("sending the Close: {}", g.label()), who);
        track.finish(true, st);
        return Next::Stop;
    }
    let deadline = Instant::now() + DRAIN_STEP_LIMIT;
    // Bounded as above. Echoes still in flight may come before the answer.
    let answered = loop {
        match timeout_at(deadline, conn.read_frame()).await {
            Err(_) => {
                st.fail(F_DRAIN, "no answer to the client's Close within 5 s", who);
                break false;
            }
            Ok(Ok(Frame::Binary(p))) => track.on_echo(&p, shared),
            Ok(Ok(Frame::Text(t))) => track.text(&t, st),
            Ok(Ok(Frame::Ping(_) | Frame::Pong)) => {}
            Ok(Ok(Frame::Close(code, _))) => {
                if code != Some(1000) {
                    let what = format!("Close answered with {}", close_code(code));
                    st.fail(F_DRAIN, &what, who);
                }
                break true;
            }
            Ok(Err(g)) => {
                let what = format!("{} instead of an answer to the Close", g.label());
                st.fail(F_DRAIN, &what, who);
                break false;
            }
        }
    };
    track.finish(true, st);
    if answered {
        if conn.await_tcp_end(TCP_END_LIMIT).await {
            bump(&st.drained_clean);
        } else {
            st.fail(F_DRAIN, "TCP left open after the Close exchange", who);
        }
    }
    Next::Stop
}

#[derive(Debug, PartialEq, Eq)]
enum Vanish {
    Rst,
    Fin,
}

/// Whether tunnel `id` vanishes in `round`: a fixed hash, so each round picks
/// a fresh ~per_10k/10,000 of the tunnels for each kind.
fn vanish_pick(id: u32, round: u64, per_10k: u64) -> Option<Vanish> {
    // splitmix64 of (id, round).
    let mut z = (u64::from(id) << 32 ^ round).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let h = z % 10_000;
    if h < per_10k {
        Some(Vanish::Rst)
    } else if h < 2 * per_10k {
        Some(Vanish::Fin)
    } else {
        None
    }
}

/// The message with sequence number `seq` of one life: who sent it, and a
/// pattern that any corruption would break.
fn payload(id: u32, life: u32, seq: u64) -> [u8; MSG_LEN] {
    let mut p = [0u8; MSG_LEN];
    p[..4].copy_from_slice(&id.to_be_bytes());
    p[4..8].copy_from_slice(&life.to_be_bytes());
    p[8..16].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in p[16..].iter_mut().enumerate() {
        *b = (seq as u8).wrapping_mul(31).wrapping_add(i as u8);
    }
    p
}

/// (tunnel id, life, seq) of a well-formed message.
fn decode(p: &[u8]) -> Option<(u32, u32, u64)> {
    if p.len() != MSG_LEN {
        return None;
    }
    let id = u32::from_be_bytes(p[..4].try_into().ok()?);
    let life = u32::from_be_bytes(p[4..8].try_into().ok()?);
    let seq = u64::from_be_bytes(p[8..16].try_into().ok()?);
    (p == payload(id, life, seq)).then_some((id, life, seq))
}

/// One life's messages: sent and not yet echoed, and what came back.
struct Track {
    id: u32,
    life: u32,
    next: u64,
    outstanding: BTreeMap<u64, Instant>,
    max_seen: Option<u64>,
}

impl Track {
    fn new(id: u32, life: u32) -> Track {
        Track {
            id,
            life,
            next: 0,
            outstanding: BTreeMap::new(),
            max_seen: None,
        }
    }

    /// The next message, now outstanding.
    fn next_payload(&mut self) -> [u8; MSG_LEN] {
        let p = payload(self.id, self.life, self.next);
        self.outstanding.insert(self.next, Instant::now());
        self.next += 1;
        p
    }

    /// When the oldest outstanding message was sent.
    fn oldest(&self) -> Option<Instant> {
        self.outstanding.first_key_value().map(|(_, t)| *t)
    }

    fn on_echo(&mut self, p: &[u8], shared: &Shared) {
        let st = &shared.stats;
        let Some((pid, plife, seq)) = decode(p) else {
            bump(&st.corrupt);
            st.sample(format!(
                "{F_MSG}: tunnel {} life {} received {} bytes that match no message sent, at {:.1}s",
                self.id,
                self.life,
                p.len(),
                shared.at()
            ));
            return;
        };
        if (pid, plife) != (self.id, self.life) {
            bump(&st.corrupt);
            st.sample(format!(
                "{F_MSG}: tunnel {} life {} received message {seq} of tunnel {pid} life {plife}, at {:.1}s",
                self.id,
                self.life,
                shared.at()
            ));
            return;
        }
        match self.outstanding.remove(&seq) {
            Some(sent) => {
                bump(&st.msgs_echoed);
                st.record_rtt(sent.elapsed());
                match self.max_seen {
                    Some(m) if seq < m => {
                        bump(&st.reordered);
                        st.sample(format!(
                            "{F_MSG}: tunnel {} life {}: echo {seq} after echo {m}, at {:.1}s",
                            self.id,
                            self.life,
                            shared.at()
                        ));
                    }
                    _ => self.max_seen = Some(seq),
                }
            }
            None if seq < self.next => {
                bump(&st.duplicated);
                st.sample(format!(
                    "{F_MSG}: tunnel {} life {}: echo {seq} came twice, at {:.1}s",
                    self.id,
                    self.life,
                    shared.at()
                ));
            }
            None => {
                bump(&st.corrupt);
                st.sample(format!(
                    "{F_MSG}: tunnel {} life {}: echo of message {seq}, never sent, at {:.1}s",
                    self.id,
                    self.life,
                    shared.at()
                ));
            }
        }
    }

    /// A text message: the backend sends one only as its greeting.
    fn text(&self, t: &[u8], st: &Stats) {
        bump(&st.corrupt);
        st.sample(format!(
            "{F_MSG}: tunnel {} life {}: unexpected text message {:?}",
            self.id,
            self.life,
            String::from_utf8_lossy(&t[..t.len().min(40)])
        ));
    }

    /// Counts what was never echoed: lost on a surviving tunnel, expected
    /// on one whose backend was killed or whose client vanished.
    fn finish(self, surviving: bool, st: &Stats) {
        let n = self.outstanding.len() as u64;
        if !surviving {
            bump_by(&st.unechoed_cut, n);
            return;
        }
        bump_by(&st.lost_surviving, n);
        if n > 0 {
            st.sample(format!(
                "{F_MSG}: tunnel {} life {}: {n} message(s) never echoed (first seq {})",
                self.id,
                self.life,
                self.outstanding.keys().next().copied().unwrap_or(0)
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_detect_damage() {
        let p = payload(7, 2, 12345);
        assert_eq!(decode(&p), Some((7, 2, 12345)));
        let mut bad = p;
        bad[40] ^= 1;
        assert_eq!(decode(&bad), None);
        assert_eq!(decode(&p[..10]), None);
    }

    #[test]
    fn vanish_rate_is_about_what_was_asked() {
        let (mut rst, mut fin) = (0, 0);
        for id in 0..10_000 {
            match vanish_pick(id, 3, 100) {
                Some(Vanish::Rst) => rst += 1,
                Some(Vanish::Fin) => fin += 1,
                None => {}
            }
        }
        assert!(
            (50..200).contains(&rst) && (50..200).contains(&fin),
            "{rst} {fin}"
        );
        assert_eq!(vanish_pick(1, 1, 0), None);
    }

    #[test]
    fn echoes_are_checked_for_loss_order_and_duplicates() {
        let shared = Shared::new(1, Duration::ZERO);
        let st = &shared.stats;
        let mut t = Track::new(1, 0);
        let m: Vec<_> = (0..4).map(|_| t.next_payload()).collect();
        t.on_echo(&m[0], &shared);
        t.on_echo(&m[2], &shared);
        t.on_echo(&m[1], &shared); // late: reordered
        t.on_echo(&m[1], &shared); // again: duplicate
        t.on_echo(&payload(2, 0, 3), &shared); // another tunnel's
        t.finish(true, st); // m[3] never came back
        let c = st.counts();
        assert_eq!(
            (
                c.msgs_echoed,
                c.reordered,
                c.duplicated,
                c.corrupt,
                c.lost_on_surviving
            ),
            (3, 1, 1, 1, 1)
        );
    }
}
