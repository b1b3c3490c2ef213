//! The bounded hand-off between the async front and the pool threads.
//!
//! Admission rule: a request is admitted when
//! `waiting < capacity + idle_threads`, where `waiting` is the number of requests
//! already in the queue and `idle_threads` the number of threads blocked waiting for
//! work, or done with their request and on their way back for the next one (a
//! thread announces that with [`BoundedQueue::finishing`] *before* it sends its
//! answer, so a proxy that sends the next request as soon as it has the answer
//! never finds the thread "busy"). So `capacity` counts requests that must *wait* for a thread: a burst that
//! arrives before idle threads wake up is not rejected, and `capacity = 0` means
//! "only take a request when a thread is free".
//!
//! This is a `Mutex<VecDeque>` plus a `Condvar` rather than
//! `std::sync::mpsc::sync_channel` because the admission rule needs to see the idle
//! thread count, and the queue depth must be exact for the load report.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

/// Why [`BoundedQueue::push`] gave the item back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PushError<T> {
    /// The queue holds `capacity` waiting items beyond the idle threads.
    Full(T),
    /// [`BoundedQueue::close`] was called.
    Closed(T),
}

#[derive(Debug)]
struct State<T> {
    items: VecDeque<T>,
    idle: usize,
    /// Threads between [`BoundedQueue::finishing`] and their next `pop`.
    returning: usize,
    closed: bool,
}

#[derive(Debug)]
pub(crate) struct BoundedQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    capacity: usize,
    // Mirrors `items.len()`, written under the lock, so readers need no lock.
    depth: AtomicUsize,
}

impl<T> BoundedQueue<T> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State {
                items: VecDeque::new(),
                idle: 0,
                returning: 0,
                closed: false,
            }),
            ready: Condvar::new(),
            capacity,
            depth: AtomicUsize::new(0),
        }
    }

    // A panic never happens while the lock is held (no user code runs under it), so a
    // poisoned lock still guards consistent data.
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an item without blocking.
    pub(crate) fn push(&self, item: T) -> Result<(), PushError<T>> {
        let mut s = self.lock();
        if s.closed {
            return Err(PushError::Closed(item));
        }
        if s.items.len() >= self.capacity + s.idle + s.returning {
            return Err(PushError::Full(item));
        }
        s.items.push_back(item);
        self.depth.store(s.items.len(), Ordering::SeqCst);
        drop(s);
        self.ready.notify_one();
        Ok(())
    }

    /// A thread is done with its item and will call `pop(true)` next: from now
    /// on it counts as free for admission.
    pub(crate) fn finishing(&self) {
        self.lock().returning += 1;
    }

    /// Takes the oldest item, blocking while the queue is empty. Returns `None` once
    /// the queue is closed and drained. `returning` says the caller announced
    /// itself with [`BoundedQueue::finishing`].
    pub(crate) fn pop(&self, returning: bool) -> Option<T> {
        let mut s = self.lock();
        if returning {
            s.returning -= 1;
        }
        loop {
            if let Some(item) = s.items.pop_front() {
                self.depth.store(s.items.len(), Ordering::SeqCst);
                return Some(item);
            }
            if s.closed {
                return None;
            }
            s.idle += 1;
            s = self.ready.wait(s).unwrap_or_else(|e| e.into_inner());
            s.idle -= 1;
        }
    }

    /// Refuses new items; items already queued are still handed out.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Items waiting for a thread.
    pub(crate) fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn full_at_capacity_without_idle_threads() {
        let q = BoundedQueue::new(2);
        assert_eq!(q.push(1), Ok(()));
        assert_eq!(q.push(2), Ok(()));
        assert_eq!(q.push(3), Err(PushError::Full(3)));
        assert_eq!(q.depth(), 2);
        assert_eq!(q.pop(false), Some(1));
        assert_eq!(q.depth(), 1);
        assert_eq!(q.push(4), Ok(()));
    }

    #[test]
    fn zero_capacity_admits_only_for_idle_threads() {
        let q = Arc::new(BoundedQueue::new(0));
        assert_eq!(q.push(1), Err(PushError::Full(1)));
        let taker = {
            let q = q.clone();
            std::thread::spawn(move || q.pop(false))
        };
        // Retry until the thread is parked in pop() and so counts as idle.
        let deadline = Instant::now() + Duration::from_secs(10);
        while q.push(7).is_err() {
            assert!(
                Instant::now() < deadline,
                "idle thread never admitted an item"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(taker.join().unwrap(), Some(7));
    }

    #[test]
    fn a_finishing_thread_counts_as_free() {
        let q = BoundedQueue::new(0);
        assert_eq!(q.push(1), Err(PushError::Full(1)));
        q.finishing();
        assert_eq!(q.push(2), Ok(()));
        assert_eq!(q.push(3), Err(PushError::Full(3)));
        assert_eq!(q.pop(true), Some(2));
        assert_eq!(q.push(4), Err(PushError::Full(4)));
    }

    #[test]
    fn close_drains_then_ends() {
        let q = BoundedQueue::new(4);
        q.push(1).unwrap();
        q.close();
        assert_eq!(q.push(2), Err(PushError::Closed(2)));
        assert_eq!(q.pop(false), Some(1));
        assert_eq!(q.pop(false), None);
    }

    #[test]
    fn close_wakes_blocked_threads() {
        let q = Arc::new(BoundedQueue::<u8>::new(1));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let q = q.clone();
                std::thread::spawn(move || q.pop(false))
            })
            .collect();
        q.close();
        for t in threads {
            assert_eq!(t.join().unwrap(), None);
        }
    }
}
