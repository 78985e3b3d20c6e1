//! A one-slot handoff from a call's session to its response stream.
//!
//! It holds at most one message, so results waiting for a slow reader coalesce in the session rather
//! than queue here, and it costs a few dozen bytes per call where a general channel costs a block.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

struct Shared<T> {
    state: Mutex<State<T>>,
}

struct State<T> {
    slot: Option<T>,
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

/// A connected sender and receiver.
pub(super) fn outbox<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            slot: None,
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
    /// The next item; `None` once the sender is gone and the slot is empty.
    pub(super) fn poll_recv(&self, cx: &Context<'_>) -> Poll<Option<T>> {
        let (item, waker) = {
            let mut s = self.0.lock();
            match s.slot.take() {
                Some(item) => (item, s.sender_waker.take()),
                None if !s.sender_alive => return Poll::Ready(None),
                None => {
                    park(&mut s.receiver_waker, cx);
                    return Poll::Pending;
                }
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
        Poll::Ready(Some(item))
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let (waker, item) = {
            let mut s = self.0.lock();
            s.receiver_alive = false;
            (s.sender_waker.take(), s.slot.take())
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
        assert_eq!(rx.poll_recv(&cx()), Poll::Ready(Some(1)));
        assert_eq!(rx.poll_recv(&cx()), Poll::Pending);
        assert_eq!(tx.poll_ready(&cx()), Poll::Ready(Ok(())));
    }

    #[test]
    fn ends_when_either_side_goes() {
        let (tx, rx) = outbox();
        tx.send("last");
        drop(tx);
        assert_eq!(
            rx.poll_recv(&cx()),
            Poll::Ready(Some("last")),
            "an item sent before the end is kept"
        );
        assert_eq!(rx.poll_recv(&cx()), Poll::Ready(None));

        let (tx, rx) = outbox::<u8>();
        drop(rx);
        assert_eq!(tx.poll_ready(&cx()), Poll::Ready(Err(Closed)));
    }
}
