//! The engine's own health: is it still making progress, or is it wedged?
//!
//! "Busy" is not "wedged": every worker slot may rightly be held by hour-long jobs. The engine is
//! wedged when work that could go on does not: a slot the scheduler granted is not taken by its
//! call (the call's task is no longer polled: a handler blocked its thread, or a wake-up was lost),
//! slots stay free while calls wait for one, a runtime thread is stuck inside one poll (blocked in
//! a system call or on a lock: whatever tasks wait on that thread, the accept loop or calls, are
//! stuck with it), or the probe below stops taking its turns (no runtime thread runs tasks at all).
//! [`Engine::health`] checks them on demand; the systemd watchdog and `/healthz` ask it.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::scheduler::{PoolStall, PROBE_GROUP};
use super::Engine;

/// Shortest and longest pause between two turns of the probe.
const PROBE_EVERY: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// Why the engine counts as wedged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stall {
    /// The probe has not completed a turn for this long: the runtime does not run engine tasks.
    #[error("the engine's probe has not run for {}", human(*.0))]
    ProbeLate(Duration),
    /// A call has left a worker slot granted to it untaken for this long: its task is stuck.
    #[error("a call has not taken the worker slot granted to it {} ago", human(*.0))]
    GrantUntaken(Duration),
    /// A runtime thread has been inside one poll this long: the tasks that wait on it are stuck.
    #[error("a runtime thread has been stuck in one task for {}", human(*.0))]
    ThreadBlocked(Duration),
    /// Worker slots are free while calls wait for slots: the scheduler lost a grant.
    #[error("{free} worker slots are free while calls wait for {wanted}")]
    IdleSlots {
        /// Free slots.
        free: usize,
        /// Slots waited for.
        wanted: usize,
    },
}

/// The probe's heartbeat, read by [`Engine::health`].
#[derive(Debug)]
pub(super) struct Heartbeat {
    born: Instant,
    /// Microseconds after `born` of the probe's last turn, plus one; 0 while no probe runs.
    last: AtomicU64,
    /// Microseconds after `born`, plus one, since when a runtime thread is stuck; 0: none is.
    blocked_since: AtomicU64,
    /// How long progress may be missing before the engine counts as wedged.
    stall_timeout: Duration,
}

impl Heartbeat {
    pub(super) fn new(stall_timeout: Duration) -> Self {
        Self {
            born: Instant::now(),
            last: AtomicU64::new(0),
            blocked_since: AtomicU64::new(0),
            stall_timeout,
        }
    }

    /// `at` as stored: microseconds after `born`, plus one (0 stands for "never").
    fn stamp(&self, at: Instant) -> u64 {
        let micros = at.saturating_duration_since(self.born).as_micros();
        u64::try_from(micros).unwrap_or(u64::MAX - 1) + 1
    }

    /// How long before `now` the stamp in `cell` was; `None` for "never".
    fn since(&self, cell: &AtomicU64, now: Instant) -> Option<Duration> {
        let stamp = cell.load(Ordering::Relaxed).checked_sub(1)?;
        let at = self.born + Duration::from_micros(stamp);
        Some(now.saturating_duration_since(at))
    }

    fn beat(&self) {
        self.last
            .store(self.stamp(Instant::now()), Ordering::Relaxed);
    }

    /// How long ago the probe's last turn was; `None` while no probe runs.
    fn age(&self, now: Instant) -> Option<Duration> {
        self.since(&self.last, now)
    }
}

/// Watches the runtime's threads for one stuck inside a poll: busy (not parked) and neither its
/// busy time nor its park count moving. Tokio publishes both every 61 polls and at every park, so
/// a thread that polls on, however busy, keeps moving them; only polls averaging over a 61st of
/// `stall_timeout` (160 ms by default), themselves blocking bugs, could look stuck.
struct Threads {
    /// Per worker: its busy time and park/unpark count at the last change, and when that was.
    seen: Vec<(Duration, u64, Instant)>,
}

impl Threads {
    fn new() -> Self {
        Self { seen: Vec::new() }
    }

    /// Since when the longest-stuck worker has been stuck, if one is.
    fn stuck_since(&mut self, now: Instant) -> Option<Instant> {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return None;
        };
        let metrics = handle.metrics();
        let workers = metrics.num_workers();
        self.seen.resize(workers, (Duration::ZERO, u64::MAX, now));
        let mut oldest: Option<Instant> = None;
        for (i, seen) in self.seen.iter_mut().enumerate() {
            let busy = metrics.worker_total_busy_duration(i);
            let park = metrics.worker_park_unpark_count(i);
            if (busy, park) != (seen.0, seen.1) {
                *seen = (busy, park, now);
            } else if park % 2 == 0 {
                // An even count: the worker is not parked, and has not moved since `seen.2`.
                oldest = Some(oldest.map_or(seen.2, |o| o.min(seen.2)));
            }
        }
        oldest
    }
}

fn human(d: Duration) -> humantime::FormattedDuration {
    // Whole milliseconds: enough to read, short enough for a status line.
    humantime::format_duration(Duration::from_millis(
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
    ))
}

impl Engine {
    /// Whether the engine makes progress: `Err` names the stall once one has lasted longer than
    /// `stall_timeout`. Cheap enough to call every second.
    pub fn health(&self) -> Result<(), Stall> {
        self.health_at(Instant::now())
    }

    fn health_at(&self, now: Instant) -> Result<(), Stall> {
        let beat = &self.inner.heartbeat;
        if let Some(age) = beat.age(now) {
            if age > beat.stall_timeout {
                return Err(Stall::ProbeLate(age));
            }
        }
        if let Some(age) = beat.since(&beat.blocked_since, now) {
            if age > beat.stall_timeout {
                return Err(Stall::ThreadBlocked(age));
            }
        }
        match self.inner.scheduler.stall(now, beat.stall_timeout) {
            None => Ok(()),
            Some(PoolStall::GrantUntaken(age)) => Err(Stall::GrantUntaken(age)),
            Some(PoolStall::IdleSlots { free, wanted }) => Err(Stall::IdleSlots { free, wanted }),
        }
    }

    /// Whether the probe has completed a turn (the engine's tasks run); see [`Engine::probe`].
    pub fn probed(&self) -> bool {
        self.inner.heartbeat.age(Instant::now()).is_some()
    }

    /// The health probe; runs until dropped. Each turn asks the worker pool for a slot like a call
    /// does and gives it back at once: granted at once while a slot is free; while every slot is
    /// busy the request waits its turn in the ring, and a grant it then leaves untaken is a stall
    /// like any call's. A turn that completes proves the runtime still runs engine tasks.
    pub async fn probe(self) {
        let every = (self.inner.heartbeat.stall_timeout / 4).clamp(PROBE_EVERY.0, PROBE_EVERY.1);
        let mut lane = self.inner.scheduler.lane(PROBE_GROUP);
        let mut threads = Threads::new();
        let mut waiting = false;
        loop {
            if !waiting {
                lane.want(1);
                waiting = true;
            }
            tokio::select! {
                n = poll_fn(|cx| lane.poll_take(cx)) => {
                    lane.release(n);
                    waiting = false;
                }
                // Every slot is busy: the request keeps its place in the ring.
                () = tokio::time::sleep(every) => {}
            }
            let beat = &self.inner.heartbeat;
            let stuck = threads
                .stuck_since(Instant::now())
                .map_or(0, |at| beat.stamp(at));
            beat.blocked_since.store(stuck, Ordering::Relaxed);
            beat.beat();
            if !waiting {
                tokio::time::sleep(every).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::Config;
    use crate::engine::Limits;
    use crate::handlers::Registry;

    const STALL: Duration = Duration::from_secs(1);

    fn engine() -> Engine {
        let mut limits = Limits::from(&Config::default());
        limits.workers = 1;
        limits.stall_timeout = STALL;
        Engine::new(limits, Registry::builtin())
    }

    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn healthy_before_any_probe_and_without_calls() {
        let e = engine();
        assert!(!e.probed());
        assert_eq!(e.health(), Ok(()));
        assert_eq!(e.health_at(Instant::now() + 10 * STALL), Ok(()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_probe_that_stops_running_is_a_stall() {
        let e = engine();
        let probe = tokio::spawn(e.clone().probe());
        until("the probe took a turn", || e.probed()).await;
        assert_eq!(e.health(), Ok(()));
        probe.abort();
        assert!(probe.await.unwrap_err().is_cancelled());
        assert!(matches!(
            e.health_at(Instant::now() + 2 * STALL),
            Err(Stall::ProbeLate(age)) if age > STALL
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_pool_keeps_the_probe_waiting_but_healthy() {
        let e = engine();
        let mut busy = e.inner.scheduler.lane(PROBE_GROUP);
        busy.want(1);
        assert_eq!(busy.take(), 1, "the one slot is held by a long job");
        let probe = tokio::spawn(e.clone().probe());
        until("the probe took a turn", || e.probed()).await;
        // Longer than the stall timeout without a free slot: busy, not wedged.
        tokio::time::sleep(STALL + STALL / 2).await;
        assert_eq!(e.health(), Ok(()));
        // The slot frees: the probe, waiting in the ring, gets it, takes it and gives it back.
        busy.release(1);
        until("the probe gave the slot back", || {
            e.inner.scheduler.free() == 1
        })
        .await;
        assert_eq!(e.health(), Ok(()));
        probe.abort();
    }
}
