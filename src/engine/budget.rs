//! The daemon-wide memory budget: bytes held in jobs read and results not sent, across all calls.
//!
//! Each call adds its own figure (the jobs it has read, queued or running, and its unsent results)
//! once per turn of its session, with one atomic add, and takes it back when it ends. A call reads
//! its next request message only while the total is under the budget, or when it holds nothing at
//! all; waiting calls are woken one after the other (FIFO) once the total falls under it again.
//! The exact bound is in the README ("Memory budget").

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

/// A call's place in the queue of calls waiting for the budget.
pub(crate) type Wait = Option<Pin<Box<OwnedNotified>>>;

/// The budget and what is held against it.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    used: AtomicUsize,
    /// The highest `used` seen since start.
    peak: AtomicUsize,
    /// Times a call began waiting for the budget.
    waits: AtomicU64,
    room: Arc<Notify>,
}

impl Budget {
    /// A budget of `limit` bytes, none of them used.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            waits: AtomicU64::new(0),
            room: Arc::new(Notify::new()),
        }
    }

    /// The budget in bytes.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The most bytes held at once since start.
    pub(crate) fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Times a call began waiting for room.
    pub(crate) fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    fn has_room(&self) -> bool {
        self.used() < self.limit
    }

    /// A call that held `from` bytes now holds `to`.
    pub(crate) fn update(&self, from: usize, to: usize) {
        if to > from {
            let now = self.used.fetch_add(to - from, Ordering::Relaxed) + (to - from);
            if now > self.peak.load(Ordering::Relaxed) {
                self.peak.fetch_max(now, Ordering::Relaxed);
            }
        } else if from > to {
            let before = self.used.fetch_sub(from - to, Ordering::Relaxed);
            // Only the release that brings the total under the budget wakes a waiter; each woken
            // one passes the turn on while room is left.
            if before >= self.limit && before - (from - to) < self.limit {
                self.room.notify_one();
            }
        }
    }

    /// Ready when the call may read: the total is under the budget. Otherwise the call joins the
    /// queue of waiting calls (`wait` is its place; dropping it gives a turn it was handed on).
    pub(crate) fn poll_room(&self, wait: &mut Wait, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.has_room() {
                if wait.take().is_some() {
                    // Left the queue with room to spare: the next waiter may read too.
                    self.room.notify_one();
                }
                return Poll::Ready(());
            }
            let w = wait.get_or_insert_with(|| {
                self.waits.fetch_add(1, Ordering::Relaxed);
                Box::pin(Arc::clone(&self.room).notified_owned())
            });
            // Polling puts the call in the queue before the check is repeated, so a release in
            // between is not missed.
            match w.as_mut().poll(cx) {
                Poll::Pending if !self.has_room() => return Poll::Pending,
                Poll::Pending => {}
                // Our turn came; take a new place if the room is gone again.
                Poll::Ready(()) => *wait = None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx() -> Context<'static> {
        Context::from_waker(std::task::Waker::noop())
    }

    #[test]
    fn calls_wait_while_the_budget_is_used_and_go_in_turn_when_it_frees() {
        let b = Budget::new(100);
        let (mut w1, mut w2, mut w3) = (None, None, None);
        assert_eq!(b.poll_room(&mut w1, &mut cx()), Poll::Ready(()));
        b.update(0, 120);
        assert_eq!((b.used(), b.peak()), (120, 120));
        assert_eq!(b.poll_room(&mut w1, &mut cx()), Poll::Pending);
        assert_eq!(b.poll_room(&mut w2, &mut cx()), Poll::Pending);
        assert_eq!(b.waits(), 2);
        b.update(120, 110);
        assert_eq!(b.poll_room(&mut w1, &mut cx()), Poll::Pending, "still over");
        b.update(110, 30);
        // The first in the queue reads and hands the turn on; a newcomer goes too (room is left).
        assert_eq!(b.poll_room(&mut w1, &mut cx()), Poll::Ready(()));
        assert!(w1.is_none());
        assert_eq!(b.poll_room(&mut w2, &mut cx()), Poll::Ready(()));
        assert_eq!(b.poll_room(&mut w3, &mut cx()), Poll::Ready(()));
        b.update(30, 0);
        assert_eq!((b.used(), b.peak()), (0, 120));
    }

    #[test]
    fn a_waiter_that_leaves_hands_its_turn_on() {
        let b = Budget::new(10);
        b.update(0, 10);
        let (mut w1, mut w2) = (None, None);
        assert_eq!(b.poll_room(&mut w1, &mut cx()), Poll::Pending);
        assert_eq!(b.poll_room(&mut w2, &mut cx()), Poll::Pending);
        b.update(10, 5);
        // w1 was handed the turn but its call stopped reading (e.g. its window filled up).
        drop(w1);
        let w = w2.as_mut().unwrap();
        assert_eq!(
            w.as_mut().poll(&mut cx()),
            Poll::Ready(()),
            "w2 got the turn"
        );
    }
}
