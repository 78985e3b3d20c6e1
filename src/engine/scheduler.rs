//! The global worker pool: a fixed number of slots handed to calls in round-robin order.
//!
//! Each call owns a [`Lane`]. A lane asks for as many slots as it has queued jobs; when a slot frees,
//! the scheduler gives it to the next lane in the ring, so a call with 100,000 queued jobs gets one slot
//! per turn like a call with 20. Dropping a lane returns every slot it held or was granted.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Shared state of the worker pool.
#[derive(Debug)]
pub(crate) struct Scheduler {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Slots nobody asked for. Invariant: `free > 0` only when no lane wants a slot.
    free: usize,
    /// Lanes waiting for a slot, in turn order; each lane appears at most once.
    ring: VecDeque<u64>,
    /// Entries of `ring` whose lane was dropped: skipped when their turn comes, swept out when they
    /// are the larger part, so calls that come and go while every slot is busy cannot grow it.
    dead: usize,
    lanes: HashMap<u64, LaneState>,
    next_id: u64,
}

#[derive(Debug, Default)]
struct LaneState {
    /// Slots asked for and not granted yet.
    wants: usize,
    /// Slots granted and not taken by the lane's owner yet.
    granted: usize,
    /// Since when `granted` has been above zero: a healthy owner takes its grants at once.
    granted_at: Option<Instant>,
    in_ring: bool,
    waker: Option<Waker>,
}

/// How the pool fails to make progress, as [`Scheduler::stall`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PoolStall {
    /// A lane has left a granted slot untaken this long: its owner is not being polled.
    GrantUntaken(Duration),
    /// Slots are free while lanes wait for one: a grant was lost.
    IdleSlots {
        /// Free slots.
        free: usize,
        /// Slots lanes wait for.
        wanted: usize,
    },
}

/// One call's claim on the worker pool; dropping it gives every slot back.
#[derive(Debug)]
pub(crate) struct Lane {
    scheduler: Arc<Scheduler>,
    id: u64,
    /// Slots taken by the owner and not released yet.
    held: usize,
}

// === impl Scheduler ===

impl Scheduler {
    /// A pool of `slots` workers.
    pub(crate) fn new(slots: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                free: slots,
                ring: VecDeque::new(),
                dead: 0,
                lanes: HashMap::new(),
                next_id: 0,
            }),
        })
    }

    /// A new lane with no claim yet.
    pub(crate) fn lane(self: &Arc<Self>) -> Lane {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.lanes.insert(id, LaneState::default());
        Lane {
            scheduler: Arc::clone(self),
            id,
            held: 0,
        }
    }

    /// Slots currently free (for tests and stats).
    pub(crate) fn free(&self) -> usize {
        self.lock().free
    }

    /// Whether the pool is stuck at `now`: a grant left untaken for longer than `after`, or free
    /// slots while lanes wait. A busy pool (every slot taken, lanes waiting) is not stuck.
    pub(crate) fn stall(&self, now: Instant, after: Duration) -> Option<PoolStall> {
        let state = self.lock();
        let mut oldest: Option<Instant> = None;
        let mut wanted = 0usize;
        for lane in state.lanes.values() {
            wanted = wanted.saturating_add(lane.wants);
            if let Some(at) = lane.granted_at {
                oldest = Some(oldest.map_or(at, |o| o.min(at)));
            }
        }
        if let Some(age) = oldest.map(|at| now.saturating_duration_since(at)) {
            if age > after {
                return Some(PoolStall::GrantUntaken(age));
            }
        }
        (state.free > 0 && wanted > 0).then_some(PoolStall::IdleSlots {
            free: state.free,
            wanted,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between statements, so a panic elsewhere cannot corrupt it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Forgets the lane `id`; returns the slots it had been granted.
    fn remove(&mut self, id: u64) -> usize {
        let Some(lane) = self.lanes.remove(&id) else {
            return 0;
        };
        if lane.in_ring {
            self.dead += 1;
            if self.dead > 64 && self.dead * 2 > self.ring.len() {
                let lanes = &self.lanes;
                self.ring.retain(|id| lanes.contains_key(id));
                self.dead = 0;
            }
        }
        lane.granted
    }

    /// Hands `n` freed slots to waiting lanes in turn; returns the wakers to call after unlocking.
    fn give(&mut self, mut n: usize, wake: &mut Vec<Waker>) {
        while n > 0 {
            let Some(id) = self.ring.pop_front() else {
                self.free += n;
                return;
            };
            let Some(lane) = self.lanes.get_mut(&id) else {
                self.dead = self.dead.saturating_sub(1);
                continue;
            };
            if lane.wants == 0 {
                lane.in_ring = false;
                continue;
            }
            lane.wants -= 1;
            lane.granted += 1;
            lane.granted_at.get_or_insert_with(Instant::now);
            n -= 1;
            if let Some(w) = lane.waker.take() {
                wake.push(w);
            }
            if lane.wants > 0 {
                self.ring.push_back(id);
            } else {
                lane.in_ring = false;
            }
        }
    }
}

// === impl Lane ===

impl Lane {
    /// Asks for `n` more slots.
    pub(crate) fn want(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let mut state = self.scheduler.lock();
        let state = &mut *state;
        let now = n.min(state.free);
        state.free -= now;
        if let Some(lane) = state.lanes.get_mut(&self.id) {
            lane.granted += now;
            if now > 0 {
                lane.granted_at.get_or_insert_with(Instant::now);
            }
            lane.wants += n - now;
            if lane.wants > 0 && !lane.in_ring {
                lane.in_ring = true;
                state.ring.push_back(self.id);
            }
        }
    }

    /// Withdraws up to `n` slots asked for and not granted yet (their jobs were cancelled).
    pub(crate) fn unwant(&mut self, n: usize) {
        let mut state = self.scheduler.lock();
        if let Some(lane) = state.lanes.get_mut(&self.id) {
            lane.wants -= n.min(lane.wants);
        }
    }

    /// Takes the slots granted so far, or registers to be woken when one is.
    pub(crate) fn poll_take(&mut self, cx: &mut Context<'_>) -> Poll<usize> {
        let mut state = self.scheduler.lock();
        let Some(lane) = state.lanes.get_mut(&self.id) else {
            return Poll::Pending;
        };
        if lane.granted > 0 {
            let n = std::mem::take(&mut lane.granted);
            lane.granted_at = None;
            self.held += n;
            return Poll::Ready(n);
        }
        match &lane.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => lane.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Takes the slots granted so far without waiting.
    #[cfg(test)]
    pub(crate) fn take(&mut self) -> usize {
        let mut state = self.scheduler.lock();
        let n = state.lanes.get_mut(&self.id).map_or(0, |lane| {
            lane.granted_at = None;
            std::mem::take(&mut lane.granted)
        });
        self.held += n;
        n
    }

    /// Gives back `n` slots taken earlier.
    pub(crate) fn release(&mut self, n: usize) {
        let n = n.min(self.held);
        if n == 0 {
            return;
        }
        self.held -= n;
        let mut wake = Vec::new();
        self.scheduler.lock().give(n, &mut wake);
        wake.into_iter().for_each(Waker::wake);
    }

    /// Gives back every slot taken or granted and withdraws every claim.
    pub(crate) fn release_all(&mut self) {
        let mut wake = Vec::new();
        {
            let mut state = self.scheduler.lock();
            let granted = state.lanes.get_mut(&self.id).map_or(0, |l| {
                l.wants = 0;
                l.granted_at = None;
                std::mem::take(&mut l.granted)
            });
            state.give(std::mem::take(&mut self.held) + granted, &mut wake);
        }
        wake.into_iter().for_each(Waker::wake);
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        let mut wake = Vec::new();
        {
            let mut state = self.scheduler.lock();
            let granted = state.remove(self.id);
            state.give(self.held + granted, &mut wake);
        }
        wake.into_iter().for_each(Waker::wake);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noop() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    #[test]
    fn grants_up_to_the_free_slots_then_queues() {
        let s = Scheduler::new(2);
        let mut a = s.lane();
        a.want(5);
        assert_eq!(a.take(), 2);
        assert_eq!(s.free(), 0);
        a.release(1);
        assert_eq!(a.take(), 1, "a freed slot goes to the lane still waiting");
    }

    #[test]
    fn calls_that_come_and_go_while_every_slot_is_busy_do_not_grow_the_ring() {
        let s = Scheduler::new(1);
        let mut busy = s.lane();
        busy.want(1);
        assert_eq!(busy.take(), 1);
        for _ in 0..10_000 {
            let mut gone = s.lane();
            gone.want(3);
        }
        let ring = s.lock().ring.len();
        assert!(
            ring <= 130,
            "the ring holds {ring} entries of dropped lanes"
        );
        let mut waiting = s.lane();
        waiting.want(1);
        busy.release(1);
        assert_eq!(waiting.take(), 1, "a live lane still gets its turn");
    }

    #[test]
    fn freed_slots_go_round_robin() {
        let s = Scheduler::new(1);
        let mut greedy = s.lane();
        let mut small = s.lane();
        greedy.want(100);
        assert_eq!(greedy.take(), 1);
        small.want(3);
        // The ring is [greedy, small]: turns alternate, whoever frees the slot.
        let mut order = Vec::new();
        for _ in 0..6 {
            if greedy.held > 0 {
                greedy.release(1);
            } else {
                small.release(1);
            }
            match (greedy.take(), small.take()) {
                (1, 0) => order.push("greedy"),
                (0, 1) => order.push("small"),
                other => panic!("one slot, one grant: {other:?}"),
            }
        }
        assert_eq!(
            order,
            ["greedy", "small", "greedy", "small", "greedy", "small"]
        );
        small.release(small.held);
        assert_eq!(
            greedy.take(),
            1,
            "small wants no more: the slot goes back to greedy"
        );
    }

    #[test]
    fn dropping_a_lane_returns_held_and_granted_slots() {
        let s = Scheduler::new(3);
        let mut a = s.lane();
        a.want(3);
        assert_eq!(a.poll_take(&mut noop()), Poll::Ready(3));
        let mut b = s.lane();
        b.want(1);
        a.release(1); // granted to b, not taken yet
        drop(b);
        assert_eq!(s.free(), 1, "b's untaken grant came back");
        drop(a);
        assert_eq!(s.free(), 3);
    }

    #[test]
    fn a_grant_left_untaken_is_a_stall_and_a_busy_pool_is_not() {
        let s = Scheduler::new(1);
        let after = Duration::from_secs(5);
        let mut busy = s.lane();
        let mut waiting = s.lane();
        busy.want(1);
        assert_eq!(busy.take(), 1);
        waiting.want(1);
        let t0 = Instant::now();
        assert_eq!(
            s.stall(t0 + 2 * after, after),
            None,
            "every slot taken, one lane waits"
        );
        busy.release(1);
        let granted = Instant::now();
        assert_eq!(s.stall(granted, after), None, "just granted");
        assert!(matches!(
            s.stall(granted + 2 * after, after),
            Some(PoolStall::GrantUntaken(age)) if age > after
        ));
        assert_eq!(waiting.take(), 1);
        assert_eq!(s.stall(granted + 2 * after, after), None, "taken");
    }

    #[test]
    fn free_slots_while_a_lane_waits_are_a_stall() {
        let s = Scheduler::new(1);
        let mut a = s.lane();
        a.want(2);
        assert_eq!(s.stall(Instant::now(), Duration::from_secs(5)), None);
        // A slot given back behind the scheduler's back (a bug such a check exists for).
        s.lock().free += 1;
        assert_eq!(
            s.stall(Instant::now(), Duration::from_secs(5)),
            Some(PoolStall::IdleSlots { free: 1, wanted: 1 })
        );
    }

    #[test]
    fn unwant_withdraws_queued_claims() {
        let s = Scheduler::new(1);
        let mut a = s.lane();
        let mut b = s.lane();
        a.want(1);
        assert_eq!(a.take(), 1);
        b.want(1);
        b.unwant(1);
        a.release(1);
        assert_eq!(b.take(), 0);
        assert_eq!(s.free(), 1, "nobody wanted the slot, so it is free again");
    }
}
