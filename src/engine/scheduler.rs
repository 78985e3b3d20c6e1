//! The global worker pool, shared by principals by weight, then among each principal's calls in turn.
//!
//! Each principal (with none configured, the one implicit principal) is a group, and each call a
//! [`Lane`] of its group. A lane asks for as many slots as it has queued jobs. A free slot goes to a
//! group that wants one and is under its `max_running`:
//! - first to the groups whose running jobs are below their share of the pool (`workers` × weight ÷
//!   the weights of the groups that want slots), so slots held by long jobs end up shared by weight;
//! - among those, weighted round robin (stride scheduling): each grant moves the group's pass on by
//!   1/weight and the lowest pass goes next, so starts, and with jobs of one length throughput, follow
//!   the weights. A group that comes back from idle starts at the current pass: no burst for the time
//!   it wanted nothing, whose share went to the others.
//!
//! Within the group the slot goes to the next lane in the group's ring. So one principal's 1,000 calls
//! get that principal's share, not 1,000 shares, and a call with 100,000 queued jobs gets one slot per
//! turn like a call of the same principal with 20. Dropping a lane returns every slot it held or was
//! granted.
//!
//! The last `reserve` free slots go only to lanes that hold none (calls running nothing, the health
//! probe), first come first served: a small call starts its job at once while a bulk call holds
//! every other slot, instead of waiting for one of the bulk call's jobs to end.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Shared state of the worker pool.
#[derive(Debug)]
pub(crate) struct Scheduler {
    state: Mutex<State>,
}

/// The health probe's group: no principal's, so no quota holds the probe back.
pub(crate) const PROBE_GROUP: usize = 0;

/// One grant moves a group of weight `w` on by `STRIDE / w` (exact for the weights up to 16).
const STRIDE: u128 = 720_720;

#[derive(Debug)]
struct State {
    /// The pool's size.
    slots: usize,
    /// Of the free slots, how many only lanes holding none may take.
    reserve: usize,
    /// Slots nobody holds. Invariant: `free > reserve` only when no group under its cap wants a
    /// slot, and `free > 0` only when no lane that holds none (and whose group is under its cap)
    /// wants one.
    free: usize,
    /// Lanes that wanted a slot while they held none, each at most once, oldest first: who may
    /// take the reserve. An entry whose lane holds slots by its turn is skipped.
    fresh: VecDeque<u64>,
    /// Entries of `fresh` whose lane was dropped: swept out when they are the larger part, so
    /// calls that come and go while the reserve is taken cannot grow it.
    dead_fresh: usize,
    /// Groups by index (a principal's metrics row); never removed, so an index stays valid.
    groups: Vec<Group>,
    /// Groups that want slots, each once, in no order.
    active: Vec<usize>,
    /// Lanes by id; foldhash, as every grant, take and release looks its lane up (SipHash was
    /// ~80 instructions per echo job).
    lanes: HashMap<u64, LaneState, foldhash::fast::RandomState>,
    next_id: u64,
    /// Counts grants; stamps the group served, for turns among groups with equal passes.
    clock: u64,
    /// The pass of the latest grant: where a group coming back from idle starts.
    vtime: u128,
}

/// One principal's claim on the pool.
#[derive(Debug)]
struct Group {
    /// Its share of the slots relative to the other groups'.
    weight: u64,
    /// `STRIDE / weight`: what one grant moves its pass on by (computed once, not per grant).
    stride: u128,
    /// Most slots its lanes may hold at once (`max_running`).
    cap: usize,
    /// Slots granted to its lanes and not given back (taken by their owners or not).
    held: usize,
    /// Of those, the slots taken by their owners: running jobs.
    running: usize,
    /// Slots its lanes asked for and were not granted yet.
    wants: usize,
    /// Its lanes waiting for a slot, in turn order; each lane appears at most once.
    ring: VecDeque<u64>,
    /// Entries of `ring` whose lane was dropped: skipped when their turn comes, swept out when they
    /// are the larger part, so calls that come and go while every slot is busy cannot grow it.
    dead: usize,
    /// Its place in the weighted round robin: grows by `STRIDE / weight` per grant.
    pass: u128,
    /// `State::clock` when it was last granted a slot.
    served: u64,
    active: bool,
}

#[derive(Debug)]
struct LaneState {
    group: usize,
    /// Slots asked for and not granted yet.
    wants: usize,
    /// Slots granted and not taken by the lane's owner yet.
    granted: usize,
    /// Since when `granted` has been above zero: a healthy owner takes its grants at once.
    granted_at: Option<Instant>,
    /// Slots its owner took and has not released: its running jobs.
    taken: usize,
    in_ring: bool,
    /// Whether it is in `State::fresh`.
    in_fresh: bool,
    waker: Option<Waker>,
}

/// How the pool fails to make progress, as [`Scheduler::stall`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PoolStall {
    /// A lane has left a granted slot untaken this long: its owner is not being polled.
    GrantUntaken(Duration),
    /// Slots are free while groups under their cap wait for one: a grant was lost.
    IdleSlots {
        /// Free slots.
        free: usize,
        /// Slots wanted by groups that may take one.
        wanted: usize,
    },
}

/// One call's claim on the worker pool; dropping it gives every slot back.
#[derive(Debug)]
pub(crate) struct Lane {
    scheduler: Arc<Scheduler>,
    id: u64,
}

// === impl Scheduler ===

impl Scheduler {
    /// A pool of `slots` workers, with one group (index 0, [`PROBE_GROUP`]) of weight 1 and no cap;
    /// other groups are added as lanes or [`Scheduler::configure`] name them. `reserve` of them (at
    /// most `slots - 1`) go only to lanes that hold none.
    pub(crate) fn new(slots: usize, reserve: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                slots,
                reserve: reserve.min(slots.saturating_sub(1)),
                free: slots,
                fresh: VecDeque::new(),
                dead_fresh: 0,
                groups: vec![Group::new()],
                active: Vec::new(),
                lanes: HashMap::default(),
                next_id: 0,
                // From 1: a group never served (0) comes before any that was.
                clock: 1,
                vtime: 0,
            }),
        })
    }

    /// Sets the weight and the cap (`None`: none) of group `group`, adding groups up to it.
    pub(crate) fn configure(&self, group: usize, weight: u32, cap: Option<usize>) {
        let mut wake = Vec::new();
        {
            let mut state = self.lock();
            let g = state.group_mut(group);
            g.weight = u64::from(weight.max(1));
            g.stride = STRIDE / u128::from(g.weight);
            g.cap = cap.unwrap_or(usize::MAX);
            // A raised cap may let the group take free slots now.
            state.dispatch(&mut wake);
        }
        wake.into_iter().for_each(Waker::wake);
    }

    /// A new lane of group `group` with no claim yet.
    pub(crate) fn lane(self: &Arc<Self>, group: usize) -> Lane {
        let mut state = self.lock();
        state.group_mut(group);
        let id = state.next_id;
        state.next_id += 1;
        state.lanes.insert(
            id,
            LaneState {
                group,
                wants: 0,
                granted: 0,
                granted_at: None,
                taken: 0,
                in_ring: false,
                in_fresh: false,
                waker: None,
            },
        );
        Lane {
            scheduler: Arc::clone(self),
            id,
        }
    }

    /// Slots currently free (for tests and stats).
    pub(crate) fn free(&self) -> usize {
        self.lock().free
    }

    /// Whether the pool is stuck at `now`: a grant left untaken for longer than `after`, or free
    /// slots while groups that may take one wait. A busy pool (every slot taken, or every waiting
    /// group at its `max_running`) is not stuck.
    pub(crate) fn stall(&self, now: Instant, after: Duration) -> Option<PoolStall> {
        let state = self.lock();
        let oldest = state.lanes.values().filter_map(|l| l.granted_at).min();
        if let Some(age) = oldest.map(|at| now.saturating_duration_since(at)) {
            if age > after {
                return Some(PoolStall::GrantUntaken(age));
            }
        }
        let wanted: usize = state
            .groups
            .iter()
            .filter(|g| g.held < g.cap)
            .map(|g| g.wants)
            .sum();
        (state.free > state.reserve && wanted > 0).then_some(PoolStall::IdleSlots {
            free: state.free,
            wanted,
        })
    }

    /// Slots held by the lanes of group `group` (granted, taken or not).
    pub(crate) fn held(&self, group: usize) -> usize {
        self.lock().groups.get(group).map_or(0, |g| g.held)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between statements, so a panic elsewhere cannot corrupt it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Group {
    fn new() -> Self {
        Self {
            weight: 1,
            stride: STRIDE,
            cap: usize::MAX,
            held: 0,
            running: 0,
            wants: 0,
            ring: VecDeque::new(),
            dead: 0,
            pass: 0,
            served: 0,
            active: false,
        }
    }

    /// Notes an entry of the ring whose lane is gone; sweeps them out once they are most of it.
    fn dead_entry(&mut self, lanes: &HashMap<u64, LaneState, foldhash::fast::RandomState>) {
        self.dead += 1;
        if self.dead > 64 && self.dead * 2 > self.ring.len() {
            self.ring.retain(|id| lanes.contains_key(id));
            self.dead = 0;
        }
    }
}

impl State {
    /// Group `i`, added (with defaults) if it does not exist yet.
    fn group_mut(&mut self, i: usize) -> &mut Group {
        if i >= self.groups.len() {
            self.groups.resize_with(i + 1, Group::new);
        }
        &mut self.groups[i]
    }

    /// Adds `n` to the wants of group `g`, marking it active.
    fn add_wants(&mut self, g: usize, n: usize) {
        let group = &mut self.groups[g];
        group.wants += n;
        if group.wants > 0 && !group.active {
            group.active = true;
            group.pass = group.pass.max(self.vtime);
            self.active.push(g);
        }
    }

    /// Takes `n` from the wants of group `g`; a group that wants nothing leaves the active set.
    fn sub_wants(&mut self, g: usize, n: usize) {
        let group = &mut self.groups[g];
        group.wants -= n.min(group.wants);
        if group.wants == 0 && group.active {
            group.active = false;
            if let Some(pos) = self.active.iter().position(|&a| a == g) {
                self.active.swap_remove(pos);
            }
        }
    }

    /// Gives back to the pool `n` slots held by group `g`, `taken` of them taken by their owners.
    fn give_back(&mut self, g: usize, n: usize, taken: usize) {
        let group = &mut self.groups[g];
        group.held -= n.min(group.held);
        group.running -= taken.min(group.running);
        self.free += n;
    }

    /// The group a free slot goes to, among those that want one and are under their cap: one below
    /// its share of the pool if any, the lowest pass first (ties: the one served longest ago).
    fn pick(&self) -> Option<usize> {
        if let [only] = self.active[..] {
            let g = &self.groups[only];
            return (g.held < g.cap).then_some(only);
        }
        let weights: u128 = self
            .active
            .iter()
            .map(|&i| self.groups[i].weight as u128)
            .sum();
        // running < slots × weight ÷ weights, exactly. Running jobs, not grants: jobs that end as soon
        // as they start (echo) leave their slots granted only until their call's next turn.
        let below =
            |g: &Group| (g.running as u128) * weights < (self.slots as u128) * g.weight as u128;
        self.active
            .iter()
            .map(|&i| (i, &self.groups[i]))
            .filter(|(_, g)| g.held < g.cap)
            .min_by_key(|(_, g)| (!below(g), g.pass, g.served))
            .map(|(i, _)| i)
    }

    /// Hands free slots to waiting lanes while a group may take one (the last `reserve` only to
    /// lanes that hold none); returns, through `wake`, the wakers to call after unlocking.
    fn dispatch(&mut self, wake: &mut Vec<Waker>) {
        while self.free > 0 {
            if self.free <= self.reserve {
                if self.grant_fresh(wake) {
                    continue;
                }
                return;
            }
            let Some(g) = self.pick() else {
                return;
            };
            let group = &mut self.groups[g];
            let Some(id) = group.ring.pop_front() else {
                // Wants without a lane in the ring: cannot happen; forget them rather than spin.
                let wants = group.wants;
                self.sub_wants(g, wants);
                continue;
            };
            let Some(lane) = self.lanes.get_mut(&id) else {
                group.dead = group.dead.saturating_sub(1);
                continue;
            };
            if lane.wants == 0 {
                lane.in_ring = false;
                continue;
            }
            grant(lane, group, &mut self.clock, &mut self.vtime, wake);
            if lane.wants > 0 {
                group.ring.push_back(id);
            } else {
                lane.in_ring = false;
            }
            self.free -= 1;
            self.sub_wants(g, 1);
        }
    }

    /// Grants a slot to the oldest lane of `fresh` that still holds none, wants one and whose group
    /// is under its cap; returns whether it did. Entries it passes over leave `fresh`.
    fn grant_fresh(&mut self, wake: &mut Vec<Waker>) -> bool {
        while let Some(id) = self.fresh.pop_front() {
            let Some(lane) = self.lanes.get_mut(&id) else {
                self.dead_fresh = self.dead_fresh.saturating_sub(1);
                continue;
            };
            lane.in_fresh = false;
            let g = lane.group;
            let group = &mut self.groups[g];
            if lane.wants == 0 || lane.taken + lane.granted > 0 || group.held >= group.cap {
                continue;
            }
            // Its entry in the group's ring stays: it is skipped there once the lane wants none.
            grant(lane, group, &mut self.clock, &mut self.vtime, wake);
            self.free -= 1;
            self.sub_wants(g, 1);
            return true;
        }
        false
    }

    /// Puts lane `id` in `fresh` if the reserve is on, it holds no slot, wants one and is not there.
    fn note_fresh(&mut self, id: u64) {
        if self.reserve == 0 {
            return;
        }
        if let Some(lane) = self.lanes.get_mut(&id) {
            if lane.wants > 0 && lane.taken + lane.granted == 0 && !lane.in_fresh {
                lane.in_fresh = true;
                self.fresh.push_back(id);
            }
        }
    }

    /// Forgets the lane `id`; gives back the slots its owner took and its grants.
    fn remove(&mut self, id: u64) {
        let Some(lane) = self.lanes.remove(&id) else {
            return;
        };
        if lane.in_ring {
            let lanes = &self.lanes;
            self.groups[lane.group].dead_entry(lanes);
        }
        if lane.in_fresh {
            self.dead_fresh += 1;
            if self.dead_fresh > 64 && self.dead_fresh * 2 > self.fresh.len() {
                let lanes = &self.lanes;
                self.fresh.retain(|id| lanes.contains_key(id));
                self.dead_fresh = 0;
            }
        }
        self.sub_wants(lane.group, lane.wants);
        self.give_back(lane.group, lane.taken + lane.granted, lane.taken);
    }
}

/// The bookkeeping of one grant to `lane` of `group` (the caller takes the slot from the free
/// ones and the want from the group's): the lane is woken through `wake`.
#[inline]
fn grant(
    lane: &mut LaneState,
    group: &mut Group,
    clock: &mut u64,
    vtime: &mut u128,
    wake: &mut Vec<Waker>,
) {
    lane.wants -= 1;
    lane.granted += 1;
    lane.granted_at.get_or_insert_with(Instant::now);
    group.held += 1;
    group.served = *clock;
    *clock += 1;
    *vtime = (*vtime).max(group.pass);
    group.pass += group.stride;
    if let Some(w) = lane.waker.take() {
        wake.push(w);
    }
}

// === impl Lane ===

impl Lane {
    /// Asks for `n` more slots.
    pub(crate) fn want(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let mut wake = Vec::new();
        {
            let mut state = self.scheduler.lock();
            let state = &mut *state;
            let Some(lane) = state.lanes.get_mut(&self.id) else {
                return;
            };
            lane.wants += n;
            let g = lane.group;
            if !lane.in_ring {
                lane.in_ring = true;
                state.groups[g].ring.push_back(self.id);
            }
            state.add_wants(g, n);
            state.note_fresh(self.id);
            state.dispatch(&mut wake);
        }
        wake.into_iter().for_each(Waker::wake);
    }

    /// Withdraws up to `n` slots asked for and not granted yet (their jobs were cancelled).
    pub(crate) fn unwant(&mut self, n: usize) {
        let mut state = self.scheduler.lock();
        if let Some(lane) = state.lanes.get_mut(&self.id) {
            let n = n.min(lane.wants);
            lane.wants -= n;
            let g = lane.group;
            state.sub_wants(g, n);
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
            lane.taken += n;
            let g = lane.group;
            state.groups[g].running += n;
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
        let Some(lane) = state.lanes.get_mut(&self.id) else {
            return 0;
        };
        lane.granted_at = None;
        let (n, g) = (std::mem::take(&mut lane.granted), lane.group);
        lane.taken += n;
        state.groups[g].running += n;
        n
    }

    /// Slots taken and not released yet.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.scheduler
            .lock()
            .lanes
            .get(&self.id)
            .map_or(0, |l| l.taken)
    }

    /// Gives back `n` slots taken earlier (at most all of them).
    pub(crate) fn release(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let mut wake = Vec::new();
        {
            let mut state = self.scheduler.lock();
            if let Some(lane) = state.lanes.get_mut(&self.id) {
                let n = n.min(lane.taken);
                if n == 0 {
                    return;
                }
                lane.taken -= n;
                let g = lane.group;
                state.give_back(g, n, n);
                state.note_fresh(self.id);
                state.dispatch(&mut wake);
            }
        }
        wake.into_iter().for_each(Waker::wake);
    }

    /// Gives back every slot taken or granted and withdraws every claim.
    pub(crate) fn release_all(&mut self) {
        let mut wake = Vec::new();
        {
            let mut state = self.scheduler.lock();
            let state = &mut *state;
            if let Some(lane) = state.lanes.get_mut(&self.id) {
                let (g, wants) = (lane.group, std::mem::take(&mut lane.wants));
                let granted = std::mem::take(&mut lane.granted);
                lane.granted_at = None;
                let held = std::mem::take(&mut lane.taken);
                state.sub_wants(g, wants);
                state.give_back(g, held + granted, held);
                state.dispatch(&mut wake);
            }
        }
        wake.into_iter().for_each(Waker::wake);
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        let mut wake = Vec::new();
        {
            let mut state = self.scheduler.lock();
            state.remove(self.id);
            state.dispatch(&mut wake);
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
        let s = Scheduler::new(2, 0);
        let mut a = s.lane(0);
        a.want(5);
        assert_eq!(a.take(), 2);
        assert_eq!(s.free(), 0);
        a.release(1);
        assert_eq!(a.take(), 1, "a freed slot goes to the lane still waiting");
    }

    #[test]
    fn calls_that_come_and_go_while_every_slot_is_busy_do_not_grow_the_ring() {
        let s = Scheduler::new(1, 0);
        let mut busy = s.lane(0);
        busy.want(1);
        assert_eq!(busy.take(), 1);
        for _ in 0..10_000 {
            let mut gone = s.lane(0);
            gone.want(3);
        }
        let ring = s.lock().groups[0].ring.len();
        assert!(
            ring <= 130,
            "the ring holds {ring} entries of dropped lanes"
        );
        let mut waiting = s.lane(0);
        waiting.want(1);
        busy.release(1);
        assert_eq!(waiting.take(), 1, "a live lane still gets its turn");
    }

    #[test]
    fn freed_slots_go_round_robin() {
        let s = Scheduler::new(1, 0);
        let mut greedy = s.lane(0);
        let mut small = s.lane(0);
        greedy.want(100);
        assert_eq!(greedy.take(), 1);
        small.want(3);
        // The ring is [greedy, small]: turns alternate, whoever frees the slot.
        let mut order = Vec::new();
        for _ in 0..6 {
            if greedy.held() > 0 {
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
        small.release(small.held());
        assert_eq!(
            greedy.take(),
            1,
            "small wants no more: the slot goes back to greedy"
        );
    }

    #[test]
    fn dropping_a_lane_returns_held_and_granted_slots() {
        let s = Scheduler::new(3, 0);
        let mut a = s.lane(0);
        a.want(3);
        assert_eq!(a.poll_take(&mut noop()), Poll::Ready(3));
        let mut b = s.lane(0);
        b.want(1);
        a.release(1); // granted to b, not taken yet
        drop(b);
        assert_eq!(s.free(), 1, "b's untaken grant came back");
        drop(a);
        assert_eq!(s.free(), 3);
    }

    #[test]
    fn a_grant_left_untaken_is_a_stall_and_a_busy_pool_is_not() {
        let s = Scheduler::new(1, 0);
        let after = Duration::from_secs(5);
        let mut busy = s.lane(0);
        let mut waiting = s.lane(0);
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
    fn free_slots_while_a_lane_waits_are_a_stall_unless_its_group_is_capped() {
        let s = Scheduler::new(2, 0);
        let mut a = s.lane(0);
        a.want(3);
        assert_eq!(a.take(), 2);
        assert_eq!(s.stall(Instant::now(), Duration::from_secs(5)), None);
        // A slot given back behind the scheduler's back (a bug such a check exists for).
        s.lock().free += 1;
        assert_eq!(
            s.stall(Instant::now(), Duration::from_secs(5)),
            Some(PoolStall::IdleSlots { free: 1, wanted: 1 })
        );
        // A principal at its max_running waits while slots are free: that is the quota, not a stall.
        let s = Scheduler::new(2, 0);
        s.configure(1, 1, Some(1));
        let mut capped = s.lane(1);
        capped.want(2);
        assert_eq!(capped.take(), 1);
        assert_eq!(s.free(), 1);
        assert_eq!(s.stall(Instant::now(), Duration::from_secs(5)), None);
    }

    #[test]
    fn unwant_withdraws_queued_claims() {
        let s = Scheduler::new(1, 0);
        let mut a = s.lane(0);
        let mut b = s.lane(0);
        a.want(1);
        assert_eq!(a.take(), 1);
        b.want(1);
        b.unwant(1);
        a.release(1);
        assert_eq!(b.take(), 0);
        assert_eq!(s.free(), 1, "nobody wanted the slot, so it is free again");
    }

    /// Lanes of group `g` that each want `n` slots.
    fn lanes(s: &Arc<Scheduler>, g: usize, count: usize, n: usize) -> Vec<Lane> {
        (0..count)
            .map(|_| {
                let mut l = s.lane(g);
                l.want(n);
                l
            })
            .collect()
    }

    /// Takes every grant of `lanes`; returns how many.
    fn take_all(lanes: &mut [Lane]) -> usize {
        lanes.iter_mut().map(Lane::take).sum()
    }

    /// Runs `rounds` rounds in which every lane gives back what it holds; returns the slots each
    /// group was granted over them.
    fn grants_over(rounds: usize, groups: &mut [Vec<Lane>]) -> Vec<usize> {
        let mut got = vec![0; groups.len()];
        for _ in 0..rounds {
            for lanes in groups.iter_mut() {
                for l in lanes.iter_mut() {
                    let held = l.held();
                    l.release(held);
                    l.want(held);
                }
            }
            for (g, lanes) in groups.iter_mut().enumerate() {
                got[g] += take_all(lanes);
            }
        }
        got
    }

    #[test]
    fn the_pool_is_shared_by_weight_not_by_calls() {
        let s = Scheduler::new(70, 0);
        s.configure(1, 1, None);
        s.configure(2, 2, None);
        s.configure(3, 4, None);
        // Weight 1 opens 100 calls, weight 2 one call, weight 4 ten calls; all want far more.
        let mut groups = vec![
            lanes(&s, 1, 100, 1000),
            lanes(&s, 2, 1, 1000),
            lanes(&s, 3, 10, 1000),
        ];
        // The first calls took the whole pool; as slots free, they go where the share is short.
        for l in &mut groups {
            take_all(l);
        }
        grants_over(3, &mut groups);
        assert_eq!(
            [s.held(1), s.held(2), s.held(3)],
            [10, 20, 40],
            "slots held at once follow the weights"
        );
        assert_eq!(s.free(), 0);
        let got = grants_over(50, &mut groups);
        assert_eq!(got, [500, 1000, 2000], "and so do the grants as slots free");
        assert_eq!([s.held(1), s.held(2), s.held(3)], [10, 20, 40]);
    }

    #[test]
    fn an_idle_principal_s_share_goes_to_the_others() {
        let s = Scheduler::new(12, 0);
        s.configure(1, 1, None);
        s.configure(2, 3, None);
        let mut a = lanes(&s, 1, 2, 100);
        assert_eq!(take_all(&mut a), 12, "alone, weight 1 takes the whole pool");
        let mut b = lanes(&s, 2, 1, 100);
        assert_eq!(
            take_all(&mut b),
            0,
            "nothing is taken back from running jobs"
        );
        // As a's jobs end, freed slots go to b until the shares are 3:9.
        for l in &mut a {
            let held = l.held();
            l.release(held);
            l.want(held);
        }
        assert_eq!((take_all(&mut a), take_all(&mut b)), (3, 9));
        // b goes idle: its slots go back to a.
        drop(b);
        assert_eq!(take_all(&mut a), 9);
        assert_eq!(s.free(), 0);
    }

    #[test]
    fn max_running_caps_a_principal_and_its_jobs_wait() {
        let s = Scheduler::new(10, 0);
        s.configure(1, 1, Some(3));
        let mut capped = lanes(&s, 1, 4, 10);
        assert_eq!(
            take_all(&mut capped),
            3,
            "at most max_running slots at once"
        );
        assert_eq!(s.free(), 7, "the rest stay free for others");
        let mut other = lanes(&s, 0, 1, 20);
        assert_eq!(take_all(&mut other), 7);
        // A slot the capped group gives back goes back to it (it is under its cap again and
        // furthest below its share); the others' freed slots do not.
        let holder = capped.iter_mut().find(|l| l.held() > 0).unwrap();
        holder.release(1);
        assert_eq!(take_all(&mut capped), 1);
        other[0].release(2);
        assert_eq!(take_all(&mut capped), 0);
        assert_eq!(take_all(&mut other), 2);
        // A reload that raises the cap hands it free slots at once.
        other[0].unwant(100);
        other[0].release(4);
        assert_eq!(s.free(), 4);
        s.configure(1, 1, Some(5));
        assert_eq!(take_all(&mut capped), 2);
        assert_eq!(s.free(), 2);
    }

    #[test]
    fn equal_shares_alternate_between_principals() {
        let s = Scheduler::new(1, 0);
        s.configure(1, 1, None);
        let mut a = s.lane(0);
        let mut b = s.lane(1);
        a.want(10);
        b.want(10);
        assert_eq!((a.take(), b.take()), (1, 0));
        let mut order = Vec::new();
        for _ in 0..6 {
            if a.held() > 0 {
                a.release(1);
            } else {
                b.release(1);
            }
            order.push(match (a.take(), b.take()) {
                (1, 0) => 'a',
                (0, 1) => 'b',
                other => panic!("one slot, one grant: {other:?}"),
            });
        }
        assert_eq!(order, ['b', 'a', 'b', 'a', 'b', 'a']);
    }

    #[test]
    fn dropping_lanes_keeps_the_group_counts_exact() {
        let s = Scheduler::new(4, 0);
        s.configure(1, 1, Some(2));
        let mut a = lanes(&s, 1, 3, 5);
        assert_eq!(take_all(&mut a), 2);
        let mut other = lanes(&s, 0, 1, 5);
        assert_eq!(take_all(&mut other), 2);
        drop(a);
        assert_eq!(s.held(1), 0);
        assert_eq!(
            take_all(&mut other),
            2,
            "the capped group's slots went to the other"
        );
        let s_state = s.lock();
        assert_eq!(s_state.groups[1].wants, 0);
        assert!(!s_state.groups[1].active);
        assert_eq!(s_state.active, [0]);
    }

    /// Jobs of one length that end as soon as they start (echo): the slots held say little, the
    /// starts follow the weights exactly.
    #[test]
    fn starts_follow_the_weights_when_jobs_end_at_once() {
        let s = Scheduler::new(1, 0);
        for (g, w) in [(1, 1), (2, 2), (3, 4)] {
            s.configure(g, w, None);
        }
        let mut lanes: Vec<Lane> = (1..=3)
            .map(|g| {
                let mut l = s.lane(g);
                l.want(10_000);
                l
            })
            .collect();
        let mut starts = [0; 3];
        while starts.iter().sum::<usize>() < 700 {
            for (i, l) in lanes.iter_mut().enumerate() {
                if l.take() == 1 {
                    starts[i] += 1;
                    l.release(1);
                }
            }
        }
        assert_eq!(starts, [100, 200, 400]);
    }

    #[test]
    fn the_reserve_goes_only_to_lanes_that_hold_none() {
        let s = Scheduler::new(4, 1);
        let mut bulk = s.lane(0);
        bulk.want(100);
        assert_eq!(bulk.take(), 3, "the last slot is the reserve");
        bulk.release(1);
        assert_eq!(
            bulk.take(),
            1,
            "a freed slot goes back to the bulk lane, not the reserve"
        );
        assert_eq!(s.free(), 1);
        let mut small = s.lane(0);
        small.want(2);
        assert_eq!(
            small.take(),
            1,
            "a lane holding none takes the reserve at once"
        );
        assert_eq!(s.free(), 0);
        small.release(1);
        assert_eq!(
            small.take(),
            1,
            "holding none again, it takes the reserve again before the bulk lane"
        );
        small.release(1);
        assert_eq!(
            (bulk.take(), s.free()),
            (0, 1),
            "the bulk lane never takes it"
        );
        assert_eq!(
            s.stall(Instant::now(), Duration::from_secs(1)),
            None,
            "a free reserve while the bulk lane waits is no stall"
        );
    }

    #[test]
    fn a_lane_holding_a_slot_waits_for_its_turn_however_empty_the_reserve() {
        let s = Scheduler::new(4, 2);
        let mut bulk = s.lane(0);
        bulk.want(100);
        assert_eq!(bulk.take(), 2);
        let mut small = s.lane(0);
        small.want(3);
        assert_eq!(
            small.take(),
            1,
            "one slot of the reserve, while it holds none"
        );
        assert_eq!(s.free(), 1, "the rest stays for the next call holding none");
        let mut other = s.lane(0);
        other.want(1);
        assert_eq!(other.take(), 1);
        // All of the pool but the reserve is held (bulk 2, small 1 of the reserve, other 1):
        // the bulk lane's two freed slots would make the reserve whole. Holding none now, the bulk
        // lane takes one of them, like any lane holding none; the small one, holding one, waits.
        bulk.release(2);
        assert_eq!(bulk.take(), 1);
        assert_eq!((small.take(), s.free()), (0, 1));
    }

    #[test]
    fn the_reserve_keeps_to_the_caps() {
        let s = Scheduler::new(4, 2);
        s.configure(1, 1, Some(1));
        let mut capped = s.lane(1);
        capped.want(1);
        assert_eq!(capped.take(), 1);
        let mut second = s.lane(1);
        second.want(1);
        assert_eq!(second.take(), 0, "its principal is at max_running");
        assert_eq!(s.free(), 3);
        capped.release(1);
        assert_eq!(second.take(), 1, "the principal's freed slot");
    }

    #[test]
    fn calls_that_come_and_go_while_the_reserve_is_taken_do_not_grow_its_queue() {
        let s = Scheduler::new(2, 1);
        let mut bulk = s.lane(0);
        bulk.want(10);
        assert_eq!(bulk.take(), 1);
        let mut small = s.lane(0);
        small.want(1);
        assert_eq!(small.take(), 1, "the reserve");
        for _ in 0..10_000 {
            let mut gone = s.lane(0);
            gone.want(1);
        }
        let fresh = s.lock().fresh.len();
        assert!(
            fresh <= 130,
            "the reserve's queue holds {fresh} entries of dropped lanes"
        );
        let mut waiting = s.lane(0);
        waiting.want(1);
        small.release(1);
        assert_eq!(
            waiting.take(),
            1,
            "a live lane holding none still gets the reserve"
        );
    }
}
