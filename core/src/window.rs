//! The log consumer's window: records taken from the log in seq order and
//! not yet done. The upstream replicator forwards through it (done = the
//! broker confirmed, or skipped, or parked); any consumer that reads the log
//! from a cursor and must advance it only over what is finished uses it.
//!
//! Records enter in seq order. Each is either published (pending until its
//! confirm arrives) or done at once (no route, expired). Confirms arrive in
//! any order; the cursor moves only over the contiguous prefix of done
//! records, so an ack for seq 7 while 5 is pending leaves the cursor at 5.
//!
//! Records done without an item (no route, expired, unreadable) behind a
//! pending one are kept as one slot per run, so the window does not grow
//! with a backlog of records this upstream skips; the forwarder bounds the
//! other slots (see [`Window::slots`]).
//!
//! Invariant: every seq below [`Window::next`] is done, and the slots hold
//! strictly increasing, non-overlapping seq ranges, all >= `next`.

use std::collections::VecDeque;

use edge_store::Seq;

#[derive(Debug)]
struct Slot<T> {
    seq: Seq,
    /// Last seq of the slot: `seq` itself, except for a run of skipped
    /// records (no item), which covers `seq..=last`.
    last: Seq,
    /// `None` for records that were done without being published.
    item: Option<T>,
    done: bool,
}

#[derive(Debug)]
pub struct Window<T> {
    slots: VecDeque<Slot<T>>,
    next: Seq,
    in_flight: usize,
}

impl<T> Window<T> {
    /// An empty window whose cursor is `next` (the next seq to forward).
    pub fn new(next: Seq) -> Window<T> {
        Window {
            slots: VecDeque::new(),
            next,
            in_flight: 0,
        }
    }

    /// The cursor: every seq below it is done.
    pub fn next(&self) -> Seq {
        self.next
    }

    /// Published records still waiting for their confirm.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Slots held: pending and parked records one each, a run of skipped
    /// records one in all. What the window costs in memory.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    fn accepts(&self, seq: Seq) -> bool {
        seq >= self.next && self.slots.back().is_none_or(|s| s.last < seq)
    }

    /// Adds a published record waiting for its confirm. Seqs must increase;
    /// a seq at or below the last one is ignored (returns false).
    pub fn push(&mut self, seq: Seq, item: T) -> bool {
        if !self.accepts(seq) {
            return false;
        }
        self.slots.push_back(Slot {
            seq,
            last: seq,
            item: Some(item),
            done: false,
        });
        self.in_flight += 1;
        true
    }

    /// Adds a record that is done without a confirm but still has to be
    /// handled when the prefix reaches it (e.g. parked).
    pub fn push_done(&mut self, seq: Seq, item: T) -> bool {
        if !self.accepts(seq) {
            return false;
        }
        self.slots.push_back(Slot {
            seq,
            last: seq,
            item: Some(item),
            done: true,
        });
        true
    }

    /// Marks a record done that needs no further handling (no route,
    /// expired). With nothing pending the cursor moves at once; otherwise
    /// it joins the run of skipped records at the back, if there is one.
    pub fn skip(&mut self, seq: Seq) {
        if !self.accepts(seq) {
            return;
        }
        match self.slots.back_mut() {
            None => self.next = seq + 1,
            // Seqs between the run and `seq` are not in the log: the run
            // may cover them.
            Some(run) if run.item.is_none() => run.last = seq,
            Some(_) => self.slots.push_back(Slot {
                seq,
                last: seq,
                item: None,
                done: true,
            }),
        }
    }

    fn slot_mut(&mut self, seq: Seq) -> Option<&mut Slot<T>> {
        let i = self.slots.binary_search_by_key(&seq, |s| s.seq).ok()?;
        self.slots.get_mut(i)
    }

    /// The item of a record still in the window.
    pub fn get_mut(&mut self, seq: Seq) -> Option<&mut T> {
        self.slot_mut(seq)?.item.as_mut()
    }

    /// Records the confirm of `seq`; returns its item, or `None` when the
    /// seq is unknown or was already confirmed.
    pub fn confirm(&mut self, seq: Seq) -> Option<&mut T> {
        let i = self.slots.binary_search_by_key(&seq, |s| s.seq).ok()?;
        let slot = self.slots.get_mut(i)?;
        if slot.done {
            return None;
        }
        slot.done = true;
        self.in_flight -= 1;
        slot.item.as_mut()
    }

    /// Removes the first slot if it is done and moves the cursor past it:
    /// its seq and item, or for a run of skipped records the last seq of
    /// the run and `None`.
    pub fn pop_done(&mut self) -> Option<(Seq, Option<T>)> {
        if !self.slots.front().is_some_and(|s| s.done) {
            return None;
        }
        let slot = self.slots.pop_front()?;
        self.next = slot.last + 1;
        Some((slot.last, slot.item))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(w: &mut Window<&'static str>) -> Vec<Seq> {
        let mut out = Vec::new();
        while let Some((seq, _)) = w.pop_done() {
            out.push(seq);
        }
        out
    }

    #[test]
    fn out_of_order_confirms_move_the_cursor_over_the_contiguous_prefix_only() {
        let mut w = Window::new(5);
        for seq in 5..=8 {
            assert!(w.push(seq, "r"));
        }
        assert_eq!(w.in_flight(), 4);
        assert!(w.confirm(7).is_some());
        assert!(drain(&mut w).is_empty());
        assert_eq!(w.next(), 5, "an ack for 7 while 5 is pending moves nothing");
        assert!(w.confirm(6).is_some());
        assert!(drain(&mut w).is_empty());
        assert!(w.confirm(5).is_some());
        assert_eq!(drain(&mut w), vec![5, 6, 7]);
        assert_eq!(w.next(), 8);
        assert_eq!(w.in_flight(), 1);
        assert!(w.confirm(8).is_some());
        assert_eq!(drain(&mut w), vec![8]);
        assert_eq!(w.next(), 9);
        assert_eq!(w.pop_done().map(|(s, _)| s), None);
    }

    #[test]
    fn skipped_records_wait_behind_pending_ones() {
        let mut w = Window::new(1);
        w.skip(1);
        assert_eq!(w.next(), 2, "nothing pending: the cursor moves at once");
        assert!(w.push(2, "a"));
        w.skip(3);
        w.skip(4);
        assert_eq!(w.next(), 2);
        assert_eq!(w.in_flight(), 1);
        w.confirm(2);
        assert_eq!(drain(&mut w), vec![2, 4], "3 and 4 are one run");
        assert_eq!(w.next(), 5);
    }

    #[test]
    fn skipped_backlog_behind_a_pending_record_takes_one_slot() {
        let mut w = Window::new(1);
        assert!(w.push(1, "pending"));
        for seq in 2..=100_000 {
            w.skip(seq);
        }
        assert_eq!(w.slots(), 2, "one pending slot and one run");
        assert!(w.push(100_001, "b"));
        w.skip(100_003); // 100_002 is a gap in the log
        assert!(w.push_done(100_004, "parked"));
        w.skip(100_005);
        w.skip(100_006);
        assert_eq!(w.slots(), 6);
        assert!(!w.push(100_006, "inside the last run"));
        assert!(w.confirm(50).is_none(), "a seq inside a run is not pending");
        w.confirm(1);
        assert_eq!(drain(&mut w), vec![1, 100_000]);
        assert_eq!(w.next(), 100_001);
        w.confirm(100_001);
        assert_eq!(drain(&mut w), vec![100_001, 100_003, 100_004, 100_006]);
        assert_eq!(w.next(), 100_007);
        assert_eq!(w.slots(), 0);
    }

    #[test]
    fn gaps_in_the_log_are_jumped() {
        let mut w = Window::new(1);
        assert!(w.push(10, "a"));
        w.confirm(10);
        assert_eq!(drain(&mut w), vec![10]);
        assert_eq!(w.next(), 11);
        w.skip(20);
        assert_eq!(w.next(), 21);
    }

    #[test]
    fn duplicate_and_unknown_confirms_are_ignored() {
        let mut w = Window::new(1);
        assert!(w.push(1, "a"));
        assert!(w.confirm(2).is_none());
        assert!(w.confirm(1).is_some());
        assert!(w.confirm(1).is_none());
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn seqs_must_increase() {
        let mut w = Window::new(3);
        assert!(!w.push(2, "below the cursor"));
        assert!(w.push(3, "a"));
        assert!(!w.push(3, "again"));
        assert!(w.push_done(4, "parked"));
        assert_eq!(w.in_flight(), 1);
        assert!(w.pop_done().is_none(), "3 is pending, 4 waits behind it");
        w.confirm(3);
        assert_eq!(drain(&mut w), vec![3, 4]);
    }

    #[test]
    fn returned_marks_can_reach_any_slot_in_the_window() {
        let mut w: Window<(u32, bool)> = Window::new(1);
        w.push(1, (1, false));
        w.push(2, (2, false));
        if let Some(item) = w.get_mut(2) {
            item.1 = true;
        }
        w.confirm(1);
        w.confirm(2);
        let popped: Vec<_> = std::iter::from_fn(|| w.pop_done()).collect();
        assert_eq!(popped, vec![(1, Some((1, false))), (2, Some((2, true)))]);
    }
}
