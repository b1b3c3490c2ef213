//! When the central queue is overloaded, and what to do then: CoDel's
//! detector with Facebook's adaptive LIFO ("Fail at Scale", 2015).
//!
//! A queue that absorbs a burst and drains is doing its job. A queue whose
//! *shortest* wait stays above `target` for a whole `interval`, while new
//! requests keep coming, is a standing queue. That is CoDel's signal
//! (Nichols & Jacobson, "Controlling Queue Delay", 2012): the minimum
//! sojourn over an interval, not the mean, so one long wait in a burst does
//! not trip it. Near capacity a fleet with long views stands that long now
//! and then and still keeps up (4×4 threads, 10% of 200 ms views, 96% load:
//! one 200 ms window shed ~0.5% of requests), so overload is
//! [`STANDING_WINDOWS`] standing intervals in a row: the fleet is past
//! capacity, and every request would pay the full wait (up to
//! `queue.timeout`) for nothing.
//!
//! While overloaded, the newest waiter is served first (a retry at the head
//! keeps its place), so the requests that are admitted have barely waited,
//! and waiters older than `target` are shed with a 503: they are the excess.
//! Shedding never empties the queue below one waiter per slot of the fleet
//! (the *reserve*), and never happens while a slot is free, so each freed
//! slot still finds a fresh waiter and goodput stays at capacity. Overload
//! ends when the queue drains. (The minimum wait is no signal to leave on:
//! under LIFO the admitted waits are short by construction.)
//!
//! This is pure policy over the queue's arrival times; the dispatcher calls
//! it under its lock, and its waker sleeps until [`Codel::next_shed`].

use std::collections::VecDeque;
use std::ops::Range;
use std::time::Duration;

use tokio::time::Instant;

/// Standing intervals in a row that make an overload: 1 s at the default
/// 200 ms interval. Past capacity the queue grows without end, so waiting a
/// few intervals more costs a few hundred ms once; below it, a burst of long
/// views seldom keeps even the shortest wait above the target that long.
pub const STANDING_WINDOWS: u32 = 5;

/// An overload that ended (the queue drained) less than this many intervals
/// ago returns after one standing interval: a fleet past capacity whose
/// queue shedding emptied for a moment (a closed set of clients, all shed at
/// once) is still past capacity.
pub const REENTER_WITHIN: u32 = 10;

/// `queue.overload_target` and `queue.overload_interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub target: Duration,
    pub interval: Duration,
}

/// What the policy reads of one waiter.
pub trait Queued {
    /// When it joined the queue.
    fn since(&self) -> Instant;
    /// A retry (at the front of the queue): never shed, served first.
    fn retry(&self) -> bool;
}

/// The overload state of one queue.
#[derive(Debug)]
pub struct Codel {
    /// `None`: `overload: off`, never overloaded.
    settings: Option<Settings>,
    /// When this window closes: `interval` after it opened. Kept as its
    /// end, so that the check on every arrival and admission is a
    /// comparison, not a subtraction. Never read while `settings` is `None`.
    window_end: Instant,
    /// The shortest wait of a request admitted in this window; zero for one
    /// that found a free slot at once.
    window_min: Option<Duration>,
    /// Whether a new request asked for a slot in this window.
    window_arrivals: bool,
    /// Standing windows in a row, up to [`STANDING_WINDOWS`].
    standing: u32,
    overloaded: bool,
    /// When the last overload ended.
    ended: Option<Instant>,
}

impl Codel {
    pub fn new(settings: Option<Settings>, now: Instant) -> Self {
        Codel {
            settings,
            window_end: now + settings.map_or(Duration::ZERO, |s| s.interval),
            window_min: None,
            window_arrivals: false,
            standing: 0,
            overloaded: false,
            ended: None,
        }
    }

    /// New settings (reload). An unchanged one keeps its state.
    pub fn set(&mut self, settings: Option<Settings>, now: Instant) {
        if settings != self.settings {
            *self = Codel::new(settings, now);
        }
    }

    /// A new request (not a retry) asks for a slot.
    pub fn arrived(&mut self, now: Instant) {
        self.roll(now);
        self.window_arrivals = true;
    }

    /// A request (not a retry) got a slot after waiting `waited` (zero: it
    /// found one free). Retries jump the queue, so their waits say nothing
    /// about it.
    pub fn admitted(&mut self, waited: Duration, now: Instant) {
        self.roll(now);
        self.window_min = Some(self.window_min.map_or(waited, |m| m.min(waited)));
    }

    /// The queue is empty: whatever the overload was, it is over, and so is
    /// any run of standing windows.
    pub fn drained(&mut self, now: Instant) {
        if self.overloaded {
            self.ended = Some(now);
        }
        self.overloaded = false;
        self.standing = 0;
    }

    /// Whether the queue is overloaded now.
    pub fn overloaded(&mut self, now: Instant) -> bool {
        self.roll(now);
        self.overloaded
    }

    /// Closes the window if `interval` has passed: it was a standing queue
    /// if requests kept arriving and every admitted one waited longer than
    /// `target`; [`STANDING_WINDOWS`] of them in a row are an overload (one,
    /// within [`REENTER_WITHIN`] intervals of the last overload's end). A
    /// window without arrivals (a burst draining) or without admissions
    /// (every slot held) decides nothing either way; one in which a request
    /// waited less than the target ends the run.
    fn roll(&mut self, now: Instant) {
        let Some(s) = self.settings else { return };
        if now < self.window_end {
            return;
        }
        match self.window_min {
            Some(m) if m <= s.target => self.standing = 0,
            Some(_) if self.window_arrivals => {
                self.standing = (self.standing + 1).min(STANDING_WINDOWS);
            }
            // No admissions, or no new arrivals: decides nothing.
            _ => {}
        }
        let recently = self
            .ended
            .is_some_and(|e| now.saturating_duration_since(e) < s.interval * REENTER_WITHIN);
        let needed = if recently { 1 } else { STANDING_WINDOWS };
        if self.standing >= needed {
            self.overloaded = true;
        }
        self.window_end = now + s.interval;
        self.window_min = None;
        self.window_arrivals = false;
    }

    /// While overloaded, the waiter to serve next: a retry at the head,
    /// else the newest. `None` means "use the configured discipline".
    pub fn pick<Q: Queued>(&mut self, queue: &VecDeque<Q>, now: Instant) -> Option<usize> {
        if queue.is_empty() || !self.overloaded(now) {
            return None;
        }
        if queue[0].retry() {
            return Some(0);
        }
        Some(queue.len() - 1)
    }

    /// The queue positions to shed now: while overloaded and no slot is
    /// free, the waiters (not retries) that have waited longer than
    /// `target`, oldest first, keeping the newest `reserve` waiters whatever
    /// their age. `queue` holds the retries at the front, then the rest in
    /// arrival order, so the positions are one range.
    pub fn shed<Q: Queued>(
        &mut self,
        queue: &VecDeque<Q>,
        reserve: usize,
        slot_free: bool,
        now: Instant,
    ) -> Range<usize> {
        let Some(s) = self.settings else {
            return 0..0;
        };
        if slot_free || !self.overloaded(now) {
            return 0..0;
        }
        let first = queue.iter().take_while(|w| w.retry()).count();
        let sheddable = (queue.len() - first).saturating_sub(reserve);
        let old = queue
            .iter()
            .skip(first)
            .take(sheddable)
            .take_while(|w| now.saturating_duration_since(w.since()) > s.target)
            .count();
        first..first + old
    }

    /// When [`Codel::shed`] next has something to shed (the oldest waiter
    /// outside the reserve turns `target` old), if the queue stays as it is.
    /// None while a slot is free: the grant or release that follows decides
    /// again (and a timer in the past would spin).
    pub fn next_shed<Q: Queued>(
        &mut self,
        queue: &VecDeque<Q>,
        reserve: usize,
        slot_free: bool,
        now: Instant,
    ) -> Option<Instant> {
        let s = self.settings?;
        if slot_free || !self.overloaded(now) {
            return None;
        }
        let first = queue.iter().take_while(|w| w.retry()).count();
        if queue.len() - first <= reserve {
            return None;
        }
        let oldest = &queue[first];
        // Strictly older than the target.
        Some(oldest.since() + s.target + Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    struct W(Instant, bool);

    impl Queued for W {
        fn since(&self) -> Instant {
            self.0
        }
        fn retry(&self) -> bool {
            self.1
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn codel() -> Codel {
        Codel::new(
            Some(Settings {
                target: ms(50),
                interval: ms(100),
            }),
            Instant::now(),
        )
    }

    /// One interval in which requests arrive and are admitted after `waits`.
    async fn window(c: &mut Codel, waits: &[u64]) {
        for &w in waits {
            c.arrived(Instant::now());
            c.admitted(ms(w), Instant::now());
            advance(ms(100) / waits.len() as u32).await;
        }
    }

    /// Enough standing windows in a row for an overload.
    async fn overload(c: &mut Codel) {
        for _ in 0..STANDING_WINDOWS {
            window(c, &[80, 90]).await;
        }
        assert!(c.overloaded(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn overloaded_only_when_the_shortest_wait_stays_above_target_for_windows_in_a_row() {
        let mut c = codel();
        // Long waits, but one request found a free slot: a burst, not a
        // standing queue.
        window(&mut c, &[300, 0, 400, 200]).await;
        assert!(!c.overloaded(Instant::now()));
        // Everyone waited at least 60 ms for a whole interval, then one
        // fewer than it takes: still no overload.
        for _ in 1..STANDING_WINDOWS {
            window(&mut c, &[300, 60, 400, 200]).await;
        }
        assert!(!c.overloaded(Instant::now()));
        // A short wait ends the run: it starts over.
        window(&mut c, &[300, 10]).await;
        for _ in 1..STANDING_WINDOWS {
            window(&mut c, &[300, 60]).await;
        }
        assert!(!c.overloaded(Instant::now()));
        window(&mut c, &[300, 60]).await;
        assert!(c.overloaded(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_without_new_arrivals_neither_counts_nor_ends_the_run() {
        let mut c = codel();
        for _ in 1..STANDING_WINDOWS {
            window(&mut c, &[300, 60]).await;
        }
        // Long waits admitted, nothing new came in (a slow, sparse stream).
        c.admitted(ms(400), Instant::now());
        advance(ms(100)).await;
        assert!(!c.overloaded(Instant::now()));
        window(&mut c, &[300, 60]).await;
        assert!(c.overloaded(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_verdict_comes_only_at_the_end_of_the_last_interval() {
        let mut c = codel();
        for _ in 1..STANDING_WINDOWS {
            window(&mut c, &[500]).await;
        }
        c.arrived(Instant::now());
        c.admitted(ms(500), Instant::now());
        advance(ms(99)).await;
        assert!(!c.overloaded(Instant::now()));
        advance(ms(1)).await;
        assert!(c.overloaded(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_draining_burst_is_not_overload() {
        let mut c = codel();
        // Everything arrived at once and took the free slots...
        c.arrived(Instant::now());
        c.admitted(Duration::ZERO, Instant::now());
        advance(ms(200)).await;
        // ...then the queued rest is served with long waits, but nothing new
        // arrives: the queue is draining.
        for _ in 0..5 {
            c.admitted(ms(200), Instant::now());
            advance(ms(100)).await;
        }
        assert!(!c.overloaded(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn overload_ends_when_the_queue_drains_and_needs_new_standing_intervals_to_return() {
        let mut c = codel();
        overload(&mut c).await;
        // Under LIFO admitted waits are short; that alone does not end it.
        window(&mut c, &[1, 2]).await;
        assert!(c.overloaded(Instant::now()));
        c.drained(Instant::now());
        assert!(!c.overloaded(Instant::now()));
        // Soon after, one standing interval brings it back (shedding emptied
        // the queue for a moment, the fleet is still past capacity)...
        advance(ms(30)).await;
        window(&mut c, &[80, 90]).await;
        assert!(c.overloaded(Instant::now()), "back at once");
        // ...but long after, it takes a new run of standing intervals.
        c.drained(Instant::now());
        advance(ms(100) * REENTER_WITHIN).await;
        window(&mut c, &[80, 90]).await;
        assert!(!c.overloaded(Instant::now()), "a new run of windows");
        overload(&mut c).await;
    }

    #[tokio::test(start_paused = true)]
    async fn off_is_never_overloaded() {
        let mut c = Codel::new(None, Instant::now());
        for _ in 0..5 {
            window(&mut c, &[4000]).await;
        }
        assert!(!c.overloaded(Instant::now()));
        advance(ms(4000)).await;
        let t = Instant::now() - ms(4000);
        let q: VecDeque<W> = (0..10).map(|_| W(t, false)).collect();
        assert_eq!(c.shed(&q, 0, false, Instant::now()), 0..0);
        assert_eq!(c.next_shed(&q, 0, false, Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn newest_first_while_overloaded_but_a_retry_at_the_head_keeps_priority() {
        let mut c = codel();
        let t = Instant::now();
        let mut q: VecDeque<W> = (0..4).map(|i| W(t + ms(i), false)).collect();
        assert_eq!(
            c.pick(&q, Instant::now()),
            None,
            "not overloaded: the discipline decides"
        );
        overload(&mut c).await;
        assert_eq!(c.pick(&q, Instant::now()), Some(3));
        q.push_front(W(Instant::now(), true));
        assert_eq!(c.pick(&q, Instant::now()), Some(0));
        c.drained(Instant::now());
        assert_eq!(c.pick(&q, Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn sheds_only_waiters_older_than_target_outside_the_reserve() {
        // Room on the clock for the ages below.
        advance(ms(1000)).await;
        let mut c = codel();
        overload(&mut c).await;
        let now = Instant::now();
        // A retry, then waiters aged 300, 200, 100, 50, 10 and 0 ms.
        let mut q: VecDeque<W> = [300, 200, 100, 50, 10, 0]
            .into_iter()
            .map(|age| W(now - ms(age), false))
            .collect();
        q.push_front(W(now - ms(900), true));
        // 50 ms is not *older* than the 50 ms target; the retry is never shed.
        assert_eq!(c.shed(&q, 0, false, now), 1..4);
        // Three slots' worth of newest waiters stay, whatever their age.
        assert_eq!(c.shed(&q, 3, false, now), 1..4);
        assert_eq!(c.shed(&q, 4, false, now), 1..3);
        assert_eq!(c.shed(&q, 6, false, now), 1..1);
        // A free slot: nothing is shed (the dispatcher serves first).
        assert_eq!(c.shed(&q, 0, true, now), 0..0);
        // Not overloaded: nothing is shed.
        c.drained(Instant::now());
        assert_eq!(c.shed(&q, 0, false, now), 0..0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_shed_is_when_the_oldest_outside_the_reserve_turns_target_old() {
        // Room on the clock for the ages below.
        advance(ms(1000)).await;
        let mut c = codel();
        let q0: VecDeque<W> = [W(Instant::now(), false)].into_iter().collect();
        assert_eq!(
            c.next_shed(&q0, 0, false, Instant::now()),
            None,
            "not overloaded"
        );
        overload(&mut c).await;
        let now = Instant::now();
        let mut q: VecDeque<W> = [W(now, false), W(now + ms(5), false)].into_iter().collect();
        assert_eq!(c.next_shed(&q, 2, false, now), None, "all in the reserve");
        assert_eq!(c.next_shed(&q, 1, true, now), None, "a slot is free");
        let at = c.next_shed(&q, 1, false, now).unwrap();
        assert_eq!(at, now + ms(51));
        q.push_front(W(now - ms(900), true));
        assert_eq!(
            c.next_shed(&q, 1, false, now),
            Some(at),
            "retries do not count"
        );
        tokio::time::advance(at - now).await;
        assert_eq!(c.shed(&q, 1, false, Instant::now()), 1..2);
    }
}
