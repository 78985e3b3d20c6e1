//! Memory freed by a burst of calls or connections goes back to the OS once the daemon is idle.
//!
//! mimalloc keeps a thread's emptied pages for reuse and purges freed arena memory only during a
//! later allocation; a daemon that goes idle after a burst allocates nothing, so its RSS stays at
//! the burst's high-water mark (BENCHMARKS.md, issue 15). Here a task checks every `CHECK_EVERY`:
//! when no call was open and hardly any CPU was used at two checks in a row, and since the last
//! hand-back RSS grew by more than `MIN_GROWTH_KIB` or the process worked more than `MIN_WORK` of
//! CPU (calls or connections came and went: closed connections free memory without RSS growing),
//! every runtime worker collects its own heap (`mi_collect(true)`: emptied pages freed, arenas
//! purged) the next time it parks. A busy daemon is never interrupted, an idle one costs a /proc
//! read per check, and the allocator keeps its speed: nothing changes on the allocation path.

use std::cell::Cell;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use batchd::Engine;
use tokio::task::JoinSet;

/// How often the task looks at the engine and the process' RSS.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// RSS growth since the last hand-back (or start) that makes an idle daemon hand memory back.
const MIN_GROWTH_KIB: u64 = 1024;
/// CPU time used since the last hand-back (or start) that makes an idle daemon hand memory back:
/// closing a few dozen connections is enough (their buffers are freed without RSS growing).
const MIN_WORK: Duration = Duration::from_millis(2);
/// CPU time a check interval may use and still count as quiet (an idle daemon's check takes tens
/// of microseconds).
const QUIET_CPU: Duration = Duration::from_millis(1);
/// Rounds of wake-ups that get every worker to park (and collect) after a hand-back is asked.
const NUDGES: usize = 20;
/// Pause between two rounds of wake-ups.
const NUDGE_PAUSE: Duration = Duration::from_millis(5);

/// Hand-backs asked so far; a worker collects when it parks and has not seen the last one.
static ASKED: AtomicU64 = AtomicU64::new(0);
/// Workers that collected for the last hand-back asked.
static COLLECTED: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The last hand-back this thread collected for.
    static SEEN: Cell<u64> = const { Cell::new(0) };
}

/// The runtime's `on_thread_park` hook: collects this worker's heap once per hand-back asked.
pub fn on_park() {
    let asked = ASKED.load(Ordering::Acquire);
    if SEEN.get() == asked {
        return;
    }
    SEEN.set(asked);
    collect();
    COLLECTED.fetch_add(1, Ordering::AcqRel);
}

/// Frees this thread's emptied pages and purges the arenas' freed memory now.
#[allow(unsafe_code)]
fn collect() {
    // SAFETY: `mi_collect` takes no pointer and acts only on the calling thread's heap and the
    // process' arenas, under mimalloc's own locks; mimalloc is the global allocator, so it is
    // initialised before any Rust code runs.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Watches for an idle daemon after a burst and hands memory back; runs until dropped.
pub async fn run(engine: Engine) -> Infallible {
    let Some(rss) = rss_kib() else {
        tracing::debug!("no /proc/self/status: memory is not handed back when idle");
        return std::future::pending().await;
    };
    let mut since = Since {
        rss_kib: rss,
        work: Duration::ZERO,
    };
    let workers = tokio::runtime::Handle::current().metrics().num_workers() as u64;
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut idle_before = false;
    let mut last_cpu = cpu_time();
    loop {
        tick.tick().await;
        let cpu = cpu_time();
        let used = cpu.saturating_sub(last_cpu);
        last_cpu = cpu;
        // Idle: no call open and hardly any CPU used since the last check, so that a hand-back
        // comes after, not during, the close of many connections. Only busy intervals count as
        // work: the checks of an idle daemon never add up to a hand-back.
        let quiet = used <= QUIET_CPU;
        if !quiet {
            since.work = since.work.saturating_add(used);
        }
        let idle = quiet && engine.stats().calls_open == 0;
        let rss = rss_kib().unwrap_or(since.rss_kib);
        let due = idle_before && idle && since.burst(rss);
        idle_before = idle;
        if !due {
            // Memory handed back by the allocator on its own lowers the mark to grow from.
            since.rss_kib = since.rss_kib.min(rss);
            continue;
        }
        let nudges = hand_back(workers).await;
        since = Since {
            rss_kib: rss_kib().unwrap_or(rss),
            work: Duration::ZERO,
        };
        // The hand-back's own work is not a burst.
        last_cpu = cpu_time();
        tracing::debug!(
            rss_before_kib = rss,
            rss_after_kib = since.rss_kib,
            nudges,
            "idle after a burst: memory handed back"
        );
    }
}

/// What happened since the last hand-back (or start).
#[derive(Debug, Clone, Copy)]
struct Since {
    /// RSS right after it (lowered when the allocator hands memory back on its own).
    rss_kib: u64,
    /// CPU time used in the checks' intervals that were not quiet.
    work: Duration,
}

impl Since {
    /// Whether a burst happened: RSS is more than `MIN_GROWTH_KIB` above the mark, or more than
    /// `MIN_WORK` of CPU was used.
    fn burst(&self, rss_kib: u64) -> bool {
        rss_kib > self.rss_kib.saturating_add(MIN_GROWTH_KIB) || self.work > MIN_WORK
    }
}

/// Asks every worker to collect when it next parks, and wakes them until all have (or `NUDGES`
/// rounds passed). Returns the rounds it took.
async fn hand_back(workers: u64) -> usize {
    COLLECTED.store(0, Ordering::Release);
    ASKED.fetch_add(1, Ordering::AcqRel);
    for round in 0..NUDGES {
        if COLLECTED.load(Ordering::Acquire) >= workers {
            return round;
        }
        // Tasks spawned from a worker wake a parked one to steal them; each worker that runs out
        // of work parks again, and collects.
        let mut wake = JoinSet::new();
        for _ in 0..workers {
            wake.spawn(std::future::ready(()));
        }
        while wake.join_next().await.is_some() {}
        tokio::time::sleep(NUDGE_PAUSE).await;
    }
    NUDGES
}

/// The process' resident set in KiB (`VmRSS`), if /proc says.
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The CPU time the process has used (all threads, user and system, to the nanosecond).
fn cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let nanos = u32::try_from(t.tv_nsec).unwrap_or(0);
    Duration::new(secs, nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_growth_or_work() {
        let since = |work_ms| Since {
            rss_kib: 8_000,
            work: Duration::from_millis(work_ms),
        };
        assert!(since(0).burst(10_000), "grew");
        assert!(since(3).burst(8_000), "worked");
        assert!(!since(1).burst(8_900), "a little of both");
        assert!(!since(0).burst(7_000), "shrank");
        let top = Since {
            rss_kib: u64::MAX,
            work: Duration::ZERO,
        };
        assert!(!top.burst(5), "no overflow");
    }

    #[test]
    fn reads_its_own_rss_and_cpu_time() {
        assert!(rss_kib().unwrap() > 0);
        let before = cpu_time();
        // Spins until the CPU time moves, on a busy machine too.
        let t0 = std::time::Instant::now();
        while cpu_time() <= before {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "CPU time never moved"
            );
            std::hint::black_box((0..10_000u64).sum::<u64>());
        }
    }

    #[test]
    fn every_worker_collects_after_a_hand_back() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .on_thread_park(on_park)
            .enable_all()
            .build()
            .unwrap();
        // From a worker, as in the daemon (`block_on` runs on this thread, not a worker).
        let rounds = rt.block_on(async { tokio::spawn(hand_back(2)).await.unwrap() });
        assert!(rounds < NUDGES, "some worker never parked again");
        assert!(COLLECTED.load(Ordering::Acquire) >= 2);
        let asked = ASKED.load(Ordering::Acquire);
        let collected = COLLECTED.load(Ordering::Acquire);
        SEEN.set(asked);
        on_park();
        assert_eq!(
            COLLECTED.load(Ordering::Acquire),
            collected,
            "a thread collects once per hand-back"
        );
    }
}
