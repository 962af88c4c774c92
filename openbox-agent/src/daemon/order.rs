//! Hook requests handled in arrival order, an `activity_end` only once the ring buffer
//! has been read past everything the worker did before sending it.
//!
//! Draining the ring when the request arrives is not enough: the reader stops at a slot
//! another CPU has reserved and not yet committed (a program preempted between the two,
//! a vCPU the host descheduled), and the records committed behind it — the activity's
//! last operation among them — would be read after the activity ended and counted
//! `after_activity_end`. So the request takes the ring's producer position when it
//! arrives ([`RingOrder::mark`]), and waits until the reader has passed it. The wait is
//! bounded: past [`END_WAIT_BOUND`] the activity ends anyway, counted
//! (`activity_ends_unproven`), and a record still behind then is unattributed with its
//! reason, never put on another activity.
//!
//! Requests after a waiting one wait behind it, so every request is still handled in the
//! order it arrived.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::pipeline::{Mark, RingOrder};

/// Longest an `activity_end` waits for the ring to be read past its mark. A slot stays
/// reserved for the few microseconds its program runs, longer only when the program is
/// preempted (fentry under preempt=full) or its vCPU is descheduled by the host.
pub const END_WAIT_BOUND: Duration = Duration::from_millis(50);

/// How often the ring is read again while a request waits: the kernel does not wake
/// the reader for a commit below 64 KiB waiting.
pub const END_WAIT_POLL: Duration = Duration::from_millis(1);

/// What waiting for the ring cost, for the summary and `/metrics`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct OrderStats {
    /// Activity ends handled once the ring was read past their mark.
    pub activity_ends_proven: u64,
    /// Of those, the ones that had to wait (a slot before their mark, or before the mark
    /// of an end ahead of them, was still reserved when they arrived).
    pub activity_ends_waited: u64,
    /// Activity ends handled at the bound without that proof: a record the activity made
    /// may still be read after its end (then unattributed, `after_activity_end`).
    pub activity_ends_unproven: u64,
    /// Longest wait so far, in microseconds.
    pub activity_end_wait_max_us: u64,
}

struct Waiting<M> {
    msg: M,
    /// `None`: nothing to wait for (it only keeps its place in the queue).
    mark: Option<Mark>,
    since: Instant,
    /// Not handled on arrival: it, or a request ahead of it, waited for the ring.
    waited: bool,
}

/// Requests in arrival order, each released once its mark is read past.
pub struct Ordered<M> {
    queue: VecDeque<Waiting<M>>,
    bound: Duration,
    pub stats: OrderStats,
}

impl<M> Ordered<M> {
    pub fn new(bound: Duration) -> Self {
        Self {
            queue: VecDeque::new(),
            bound,
            stats: OrderStats::default(),
        }
    }

    /// A request arrived at `now`; `mark` is the ring's producer position taken after it
    /// arrived (before the drain that follows), for a request that must wait for it.
    pub fn push(&mut self, msg: M, mark: Option<Mark>, now: Instant) {
        self.queue.push_back(Waiting {
            msg,
            mark,
            since: now,
            waited: false,
        });
    }

    pub fn is_waiting(&self) -> bool {
        !self.queue.is_empty()
    }

    /// The next request whose turn has come: the oldest, once the ring has been read
    /// past its mark or its wait reached the bound. Call after draining the ring.
    pub fn pop_ready(&mut self, ring: &impl RingOrder, now: Instant) -> Option<M> {
        let head = self.queue.front_mut()?;
        if let Some(mark) = head.mark {
            let waited = now.saturating_duration_since(head.since);
            if ring.read_past(mark) {
                self.stats.activity_ends_proven += 1;
                if head.waited {
                    self.stats.activity_ends_waited += 1;
                    let us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
                    self.stats.activity_end_wait_max_us =
                        self.stats.activity_end_wait_max_us.max(us);
                }
            } else if waited >= self.bound {
                self.stats.activity_ends_unproven += 1;
                tracing::warn!(
                    waited_ms = waited.as_millis() as u64,
                    "an activity ends before the ring buffer was read past its last operations (a slot reserved by another CPU stayed uncommitted): a late record is unattributed (after_activity_end)"
                );
            } else {
                // Those behind it wait too (counted as waiting when their turn comes).
                for w in &mut self.queue {
                    w.waited = true;
                }
                return None;
            }
        }
        self.queue.pop_front().map(|w| w.msg)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::{
        daemon::registry::{self, tests::info as start, Registry, Unattributed},
        span::Span,
    };

    /// A ring buffer as the kernel lays it out, by position: records reserved in order,
    /// each committed or still reserved; the reader stops at the first reserved one.
    #[derive(Default)]
    struct FakeRing {
        slots: RefCell<Vec<(Span, bool)>>,
        read: RefCell<usize>,
    }

    impl FakeRing {
        /// A CPU reserves the next slot: its position.
        fn reserve(&self, span: Span) -> usize {
            let mut slots = self.slots.borrow_mut();
            slots.push((span, false));
            slots.len() - 1
        }

        fn commit(&self, slot: usize) {
            self.slots.borrow_mut()[slot].1 = true;
        }

        /// What the reader gets: committed records up to the first reserved one.
        fn drain(&self) -> Vec<Span> {
            let slots = self.slots.borrow();
            let mut read = self.read.borrow_mut();
            let mut out = Vec::new();
            while let Some((span, true)) = slots.get(*read) {
                out.push(span.clone());
                *read += 1;
            }
            out
        }
    }

    impl RingOrder for FakeRing {
        fn mark(&self) -> Mark {
            Mark(self.slots.borrow().len())
        }

        fn read_past(&self, mark: Mark) -> bool {
            *self.read.borrow() >= mark.0
        }
    }

    fn op(owner: u32, activity: u64, name: &str) -> Span {
        Span {
            name: name.into(),
            ..registry::tests::span(owner, activity)
        }
    }

    /// The daemon loop's steps, as `run` takes them: a request arrives (the mark is
    /// taken, the ring drained, its spans routed, the request queued), then whatever
    /// request's turn has come is handled; later, the ring is read again on the poll.
    struct Replay {
        ring: FakeRing,
        registry: Registry,
        order: Ordered<u64>,
        ended: Vec<Vec<String>>,
        refused: Vec<(Unattributed, String)>,
    }

    impl Replay {
        fn new(bound: Duration) -> Replay {
            Replay {
                ring: FakeRing::default(),
                registry: Registry::new(100),
                order: Ordered::new(bound),
                ended: Vec::new(),
                refused: Vec::new(),
            }
        }

        fn read_ring(&mut self, now: Instant) {
            for span in self.ring.drain() {
                if let Err(refused) = self.registry.route(span) {
                    let (why, span) = *refused;
                    self.refused.push((why, span.name));
                }
            }
            while let Some(token) = self.order.pop_ready(&self.ring, now) {
                let a = self.registry.end(7, token).expect("a running activity");
                self.ended
                    .push(a.spans.into_iter().map(|s| s.name).collect::<Vec<_>>());
            }
        }

        fn activity_end_arrives(&mut self, token: u64, now: Instant) {
            let mark = self.ring.mark();
            self.order.push(token, Some(mark), now);
            self.read_ring(now);
        }
    }

    /// CPU 1 reserves a slot (another process's record) and is preempted before it
    /// commits; the activity's thread on CPU 0 then does its last operation (committed
    /// behind that slot) and sends `activity_end`. Handled when it arrives, the activity
    /// ended without its last operation, which came later as `after_activity_end`.
    fn racy_end(bound: Duration) -> Replay {
        let mut r = Replay::new(bound);
        let t0 = Instant::now();
        let token = r.registry.start(7, start("a"));
        let first = r.ring.reserve(op(7, token, "first"));
        r.ring.commit(first);
        r.read_ring(t0);
        let other = r.ring.reserve(op(9, 0, "other CPU"));
        let last = r.ring.reserve(op(7, token, "last"));
        r.ring.commit(last);
        r.activity_end_arrives(token, t0);
        // The other CPU commits a moment later; the poll reads the ring again.
        r.ring.commit(other);
        r.read_ring(t0 + END_WAIT_POLL);
        r
    }

    #[test]
    fn an_activity_ends_only_once_the_ring_is_read_past_its_last_operation() {
        let r = racy_end(END_WAIT_BOUND);
        assert_eq!(r.ended, vec![vec!["first".to_string(), "last".into()]]);
        assert_eq!(
            r.refused,
            vec![(Unattributed::NoActivity, "other CPU".into())]
        );
        assert_eq!(r.order.stats.activity_ends_proven, 1);
        assert_eq!(r.order.stats.activity_ends_waited, 1);
        assert_eq!(r.order.stats.activity_ends_unproven, 0);
        assert_eq!(r.order.stats.activity_end_wait_max_us, 1000);
    }

    /// The daemon before this order (an end handled as soon as it arrived and the ring
    /// was drained) is a bound of zero: the race loses the activity's last operation.
    /// With a bound, the same happens only when the slot stays reserved past it, and
    /// then it is counted, and the late record stays unattributed with its reason.
    #[test]
    fn an_end_past_the_bound_is_counted_and_its_late_operation_stays_unattributed() {
        let r = racy_end(Duration::ZERO);
        assert_eq!(r.ended, vec![vec!["first".to_string()]]);
        assert_eq!(
            r.refused,
            vec![
                (Unattributed::NoActivity, "other CPU".into()),
                (Unattributed::AfterActivityEnd, "last".into()),
            ]
        );
        assert_eq!(r.order.stats.activity_ends_unproven, 1);
        assert_eq!(r.order.stats.activity_ends_proven, 0);
    }

    #[test]
    fn requests_behind_a_waiting_end_keep_their_order() {
        let mut r = Replay::new(END_WAIT_BOUND);
        let t0 = Instant::now();
        let a = r.registry.start(7, start("a"));
        let b = r.registry.start(7, start("b"));
        let held = r.ring.reserve(op(9, 0, "other CPU"));
        let last = r.ring.reserve(op(7, a, "a's last"));
        r.ring.commit(last);
        r.activity_end_arrives(a, t0);
        // b's end arrives meanwhile: its own mark is past the reserved slot too, and it
        // must not overtake a's.
        let b_last = r.ring.reserve(op(7, b, "b's last"));
        r.ring.commit(b_last);
        r.activity_end_arrives(b, t0);
        assert!(r.ended.is_empty(), "{:?}", r.ended);
        r.ring.commit(held);
        r.read_ring(t0 + END_WAIT_POLL);
        assert_eq!(
            r.ended,
            vec![vec!["a's last".to_string()], vec!["b's last".to_string()]]
        );
        assert_eq!(r.order.stats.activity_ends_waited, 2);
        assert!(!r.order.is_waiting());
    }

    #[test]
    fn the_wait_ends_at_the_bound() {
        let mut r = Replay::new(END_WAIT_BOUND);
        let t0 = Instant::now();
        let a = r.registry.start(7, start("a"));
        r.ring.reserve(op(9, 0, "never committed"));
        r.activity_end_arrives(a, t0);
        r.read_ring(t0 + END_WAIT_BOUND - END_WAIT_POLL);
        assert!(r.ended.is_empty());
        r.read_ring(t0 + END_WAIT_BOUND);
        assert_eq!(r.ended.len(), 1);
        assert_eq!(r.order.stats.activity_ends_unproven, 1);
    }
}
