//! The requests of one connection in arrival order, from its reader to its writer.
//!
//! Both ends run in the connection's one task (the reader and the writer are joined futures),
//! so the queue is plain shard-local state: a `VecDeque` that keeps its capacity and one stored
//! waker. A wait for the next request allocates nothing and touches no atomic, where a channel
//! allocated a listener for every wait on an empty queue — once per request of a client that
//! waits for each answer before sending the next request.
//!
//! The queue needs no bound of its own: the reader admits a request only with a permit of the
//! connection's request budget, held until the answer is written.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// Requests a connection usually has in flight at once; the queue grows past it if a client
/// pipelines more (bounded by the connection's request budget) and keeps what it grew to.
const QUEUED_INITIAL: usize = 16;

pub(super) struct Queue<T> {
    state: RefCell<State<T>>,
}

struct State<T> {
    items: VecDeque<T>,
    /// The sender is gone: once `items` is empty, the receiver sees the end.
    sender_gone: bool,
    /// The receiver is gone: a push fails, so the reader stops.
    receiver_gone: bool,
    /// The receiver waits for an item or the end.
    waiter: Option<Waker>,
}

impl<T> Queue<T> {
    pub fn new() -> Self {
        Queue {
            state: RefCell::new(State {
                items: VecDeque::with_capacity(QUEUED_INITIAL),
                sender_gone: false,
                receiver_gone: false,
                waiter: None,
            }),
        }
    }

    /// The two ends: dropping the sender ends the queue for the receiver (after what it holds),
    /// dropping the receiver makes every later push fail.
    pub fn split(&self) -> (Sender<'_, T>, Receiver<'_, T>) {
        (Sender { queue: self }, Receiver { queue: self })
    }
}

pub(super) struct Sender<'a, T> {
    queue: &'a Queue<T>,
}

impl<T> Sender<'_, T> {
    /// Queues `item` behind the others, or gives it back if the receiver is gone.
    pub fn push(&self, item: T) -> Result<(), T> {
        let mut s = self.queue.state.borrow_mut();
        if s.receiver_gone {
            return Err(item);
        }
        s.items.push_back(item);
        if let Some(w) = s.waiter.take() {
            w.wake();
        }
        Ok(())
    }
}

impl<T> Drop for Sender<'_, T> {
    fn drop(&mut self) {
        let mut s = self.queue.state.borrow_mut();
        s.sender_gone = true;
        if let Some(w) = s.waiter.take() {
            w.wake();
        }
    }
}

pub(super) struct Receiver<'a, T> {
    queue: &'a Queue<T>,
}

impl<T> Receiver<'_, T> {
    /// The oldest item; `None` once the sender is gone and every item was taken.
    pub async fn recv(&self) -> Option<T> {
        poll_fn(|cx| {
            let mut s = self.queue.state.borrow_mut();
            if let Some(item) = s.items.pop_front() {
                return Poll::Ready(Some(item));
            }
            if s.sender_gone {
                return Poll::Ready(None);
            }
            match &mut s.waiter {
                Some(w) => w.clone_from(cx.waker()),
                None => s.waiter = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// The oldest item if one is queued, without waiting.
    pub fn try_recv(&self) -> Option<T> {
        self.queue.state.borrow_mut().items.pop_front()
    }
}

impl<T> Drop for Receiver<'_, T> {
    fn drop(&mut self) {
        let mut s = self.queue.state.borrow_mut();
        s.receiver_gone = true;
        // What is still queued is dropped with the receiver, as a channel's would be.
        s.items.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::sync::Arc;
    use std::task::{Context, Wake};

    struct Count(std::sync::atomic::AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    fn wakes(c: &Arc<Count>) -> usize {
        c.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[test]
    fn items_come_out_in_order_and_the_end_follows_the_last() {
        let q = Queue::new();
        let (tx, rx) = q.split();
        for i in 0..40 {
            tx.push(i).expect("receiver alive");
        }
        drop(tx);
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        for i in 0..40 {
            let mut f = pin!(rx.recv());
            assert_eq!(f.as_mut().poll(&mut cx), Poll::Ready(Some(i)));
        }
        let mut f = pin!(rx.recv());
        assert_eq!(f.as_mut().poll(&mut cx), Poll::Ready(None));
    }

    #[test]
    fn a_waiting_receiver_is_woken_by_a_push_and_by_the_senders_end() {
        let q = Queue::new();
        let (tx, rx) = q.split();
        let count = Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        {
            let mut f = pin!(rx.recv());
            assert_eq!(f.as_mut().poll(&mut cx), Poll::Pending);
            assert_eq!(rx.try_recv(), None);
            tx.push(7).expect("receiver alive");
            assert_eq!(wakes(&count), 1);
            assert_eq!(f.as_mut().poll(&mut cx), Poll::Ready(Some(7)));
        }
        let mut f = pin!(rx.recv());
        assert_eq!(f.as_mut().poll(&mut cx), Poll::Pending);
        drop(tx);
        assert_eq!(wakes(&count), 2);
        assert_eq!(f.as_mut().poll(&mut cx), Poll::Ready(None));
    }

    #[test]
    fn a_push_after_the_receiver_is_gone_gives_the_item_back() {
        let q = Queue::new();
        let (tx, rx) = q.split();
        tx.push(1).expect("receiver alive");
        drop(rx);
        assert_eq!(tx.push(2), Err(2));
    }
}
