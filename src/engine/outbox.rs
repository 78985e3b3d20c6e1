//! A one-slot handoff from a call's session to its response stream.
//!
//! It holds at most one message, so results waiting for a slow reader coalesce in the session rather
//! than queue here, and it costs a few dozen bytes per call where a general channel costs a block.
//! The session's last word (the status that ends the call) has a place of its own, so it is never
//! lost to a full slot; a session that goes without saying it shows as [`Abandoned`].

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

struct Shared<T> {
    state: Mutex<State<T>>,
}

struct State<T> {
    slot: Option<T>,
    /// The item that ends the stream, delivered after the slot.
    last: Option<T>,
    /// The sender said its last word ([`Sender::close`]).
    closed: bool,
    sender_alive: bool,
    receiver_alive: bool,
    sender_waker: Option<Waker>,
    receiver_waker: Option<Waker>,
}

/// The session's end: waits for the slot to be free, then fills it.
pub(super) struct Sender<T>(Arc<Shared<T>>);

/// The response stream's end: takes what is in the slot.
pub(super) struct Receiver<T>(Arc<Shared<T>>);

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

/// The receiver is gone: nobody will read.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Closed;

/// The sender went away without closing: the stream ended abnormally (a bug, e.g. a panic).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Abandoned;

/// A connected sender and receiver.
pub(super) fn outbox<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            slot: None,
            last: None,
            closed: false,
            sender_alive: true,
            receiver_alive: true,
            sender_waker: None,
            receiver_waker: None,
        }),
    });
    (Sender(Arc::clone(&shared)), Receiver(shared))
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Every critical section leaves the state consistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn park(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

impl<T> Sender<T> {
    /// Ready when the slot is empty; `Err` when the receiver is gone.
    pub(super) fn poll_ready(&self, cx: &Context<'_>) -> Poll<Result<(), Closed>> {
        let mut s = self.0.lock();
        if !s.receiver_alive {
            return Poll::Ready(Err(Closed));
        }
        if s.slot.is_none() {
            return Poll::Ready(Ok(()));
        }
        park(&mut s.sender_waker, cx);
        Poll::Pending
    }

    /// Waits until the slot is empty.
    pub(super) async fn ready(&self) -> Result<(), Closed> {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await
    }

    /// Fills the slot; call only after `poll_ready` returned `Ok` (else the item replaces the last).
    pub(super) fn send(&self, item: T) {
        let waker = {
            let mut s = self.0.lock();
            s.slot = Some(item);
            s.receiver_waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Ends the stream after what the slot holds, with `last` as its final item if given; never
    /// waits (the final item has a place of its own).
    pub(super) fn close(&self, last: Option<T>) {
        let waker = {
            let mut s = self.0.lock();
            s.last = last;
            s.closed = true;
            s.receiver_waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut s = self.0.lock();
            s.sender_alive = false;
            s.receiver_waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Receiver<T> {
    /// The next item; then the last one; `None` once the sender closed and both are taken, or
    /// `Abandoned` (once) if the sender went away without closing.
    pub(super) fn poll_recv(&self, cx: &Context<'_>) -> Poll<Option<Result<T, Abandoned>>> {
        let (item, waker) = {
            let mut s = self.0.lock();
            match s.slot.take() {
                Some(item) => (item, s.sender_waker.take()),
                None if s.closed => return Poll::Ready(s.last.take().map(Ok)),
                None if !s.sender_alive => {
                    s.closed = true;
                    return Poll::Ready(Some(Err(Abandoned)));
                }
                None => {
                    park(&mut s.receiver_waker, cx);
                    return Poll::Pending;
                }
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
        Poll::Ready(Some(Ok(item)))
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let (waker, item) = {
            let mut s = self.0.lock();
            s.receiver_alive = false;
            (s.sender_waker.take(), (s.slot.take(), s.last.take()))
        };
        drop(item);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    #[test]
    fn holds_one_item_at_a_time() {
        let (tx, rx) = outbox();
        assert_eq!(tx.poll_ready(&cx()), Poll::Ready(Ok(())));
        tx.send(1);
        assert_eq!(tx.poll_ready(&cx()), Poll::Pending, "the slot is full");
        assert_eq!(rx.poll_recv(&cx()), Poll::Ready(Some(Ok(1))));
        assert_eq!(rx.poll_recv(&cx()), Poll::Pending);
        assert_eq!(tx.poll_ready(&cx()), Poll::Ready(Ok(())));
    }

    #[test]
    fn the_last_item_comes_after_a_full_slot() {
        let (tx, rx) = outbox();
        tx.send("results");
        tx.close(Some("status"));
        drop(tx);
        assert_eq!(rx.poll_recv(&cx()), Poll::Ready(Some(Ok("results"))));
        assert_eq!(rx.poll_recv(&cx()), Poll::Ready(Some(Ok("status"))));
        assert_eq!(rx.poll_recv(&cx()), Poll::Ready(None));

        let (tx, rx) = outbox::<u8>();
        tx.close(None);
        assert_eq!(
            rx.poll_recv(&cx()),
            Poll::Ready(None),
            "closed without a word"
        );
    }

    #[test]
    fn a_sender_gone_without_closing_is_abandoned() {
        let (tx, rx) = outbox();
        tx.send("kept");
        drop(tx);
        assert_eq!(
            rx.poll_recv(&cx()),
            Poll::Ready(Some(Ok("kept"))),
            "an item sent before the end is kept"
        );
        assert_eq!(rx.poll_recv(&cx()), Poll::Ready(Some(Err(Abandoned))));
        assert_eq!(rx.poll_recv(&cx()), Poll::Ready(None));

        let (tx, rx) = outbox::<u8>();
        drop(rx);
        assert_eq!(tx.poll_ready(&cx()), Poll::Ready(Err(Closed)));
    }
}
