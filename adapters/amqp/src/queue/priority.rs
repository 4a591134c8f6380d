//! `x-max-priority`: the order of `ready`, and the spill.
//!
//! A priority queue's durable entries that do not fit in memory are kept
//! as their priority and seq only (the spill, at most `MAX_SPILLED`), so
//! the whole backlog is delivered in priority order without reading it
//! again per delivery: each entry is read once to learn its priority and
//! once more when its turn comes.
//!
//! Invariant: every spilled entry comes after every ready message (lower
//! priority, or the same priority and a later arrival). So `ready` is the
//! head of the queue, a new entry behind the best spilled one is spilled
//! too, and the best spilled entry is read back when there is room, or
//! swapped for a worse ready one (`evict_below`).

use std::cmp::Reverse;
use std::sync::Arc;

use edge_core::{Backlogged, Message};
use edge_store::Seq;

use super::delivered::{entry_state, read_state};
use super::{MAX_SPILLED, Queued, ReadyKey, State};

/// A spilled entry: its priority (highest first), then its arrival.
pub(super) type SpillKey = (Reverse<u8>, Seq);

impl State {
    /// A message's priority in this queue: 0 without `x-max-priority` or
    /// without the property, the maximum above it.
    fn priority(&self, message: &Message) -> u8 {
        self.max_priority
            .map_or(0, |max| message.properties.priority.unwrap_or(0).min(max))
    }

    /// A message's place in `ready`: its priority, then its arrival.
    pub(super) fn ready_key(&self, q: &Queued) -> ReadyKey {
        (Reverse(self.priority(&q.message)), q.id)
    }

    /// Puts a message into `ready` at its place.
    pub(super) fn put_ready(&mut self, q: Queued) {
        self.ready_bytes += q.message.payload.len();
        self.ready.insert(self.ready_key(&q), q);
    }

    /// The next message to deliver (the head), out of `ready`.
    pub(super) fn pop_ready(&mut self) -> Option<Queued> {
        let key = *self.ready.first_key_value()?.0;
        self.remove_ready(&key)
    }

    /// A ready message leaves `ready` (delivered, or dying).
    pub(super) fn remove_ready(&mut self, key: &ReadyKey) -> Option<Queued> {
        let q = self.ready.remove(key)?;
        let len = q.message.payload.len();
        self.ready_bytes = self.ready_bytes.saturating_sub(len);
        if let Some(a) = &self.admission {
            a.left(len);
        }
        Some(q)
    }

    /// Whether another stored entry can be taken in: room in memory, or in
    /// a priority queue's spill.
    pub(super) fn can_admit(&self) -> bool {
        self.has_room() || self.max_priority.is_some() && self.spilled.len() < MAX_SPILLED
    }

    /// A stored entry read (from the store or live) with its entry state
    /// (`delivered.rs`): into `ready`, or into the spill when it is behind
    /// the spill or there is no room.
    pub(super) fn admit(&mut self, message: Arc<Message>, seq: Seq, state: u32) {
        if self.max_priority.is_none() {
            let (redelivered, returns) = read_state(state);
            self.push(message, Some(seq), redelivered, returns);
            return;
        }
        let p = self.priority(&message);
        let behind = self
            .spilled
            .first_key_value()
            .is_some_and(|((Reverse(best), _), _)| p <= *best);
        if !behind && self.make_room_below(p) {
            let (redelivered, returns) = read_state(state);
            self.push(message, Some(seq), redelivered, returns);
        } else {
            self.spilled.insert((Reverse(p), seq), state);
        }
    }

    /// Room in memory, made if needed by spilling ready messages of a
    /// lower priority than `p`.
    fn make_room_below(&mut self, p: u8) -> bool {
        while !self.has_room() {
            if !self.evict_below(p) {
                return false;
            }
        }
        true
    }

    /// Spills the last ready message if it is durable and of a lower
    /// priority than `p`.
    fn evict_below(&mut self, p: u8) -> bool {
        let Some((&key, last)) = self.ready.last_key_value() else {
            return false;
        };
        let (Some(seq), true) = (last.seq, key.0.0 < p) else {
            return false;
        };
        let Some(q) = self.ready.remove(&key) else {
            return false;
        };
        // Still ready (for the limits and admission), only not in memory.
        self.ready_bytes = self.ready_bytes.saturating_sub(q.message.payload.len());
        self.release(&q);
        self.spilled
            .insert((key.0, seq), entry_state(q.redelivered, q.returns));
        true
    }

    /// The spilled entry to read back now, when there is room for it
    /// (made by spilling worse ready ones).
    pub(super) fn next_to_load(&mut self) -> Option<SpillKey> {
        let (&key, _) = self.spilled.first_key_value()?;
        self.make_room_below(key.0.0).then_some(key)
    }

    /// A `drop-head` queue over its limit with nothing ready: its head is
    /// the best spilled entry, to be read back (room or not) and dropped,
    /// unless unread store entries may come first (then the pump reads on).
    pub(super) fn spilled_head(&self) -> Option<SpillKey> {
        if self.catching_up && self.can_admit() {
            return None;
        }
        self.spilled.first_key_value().map(|(key, _)| *key)
    }

    /// Whether consumers wait for the best spilled entry: it is better
    /// than the best ready message and the pump can read it back.
    pub(super) fn spill_first(&self) -> bool {
        let Some((&(Reverse(p), _), _)) = self.spilled.first_key_value() else {
            return false;
        };
        let better = self.ready.first_key_value().is_none_or(|(k, _)| k.0.0 < p);
        let loadable = self.has_room()
            || self
                .ready
                .last_key_value()
                .is_some_and(|(k, q)| q.seq.is_some() && k.0.0 < p);
        better && loadable
    }

    /// A spilled entry read back (`None`, or another seq: it is gone).
    pub(super) fn loaded(&mut self, key: SpillKey, entry: Option<Backlogged>) {
        let Some(state) = self.spilled.remove(&key) else {
            // Purged or deleted meanwhile.
            return;
        };
        if let Some(e) = entry.filter(|e| e.seq == key.1)
            && !self.held.contains(&e.seq)
        {
            let (spilled_redelivered, spilled_returns) = read_state(state);
            let (redelivered, returns) = read_state(e.state);
            self.push(
                e.message,
                Some(e.seq),
                spilled_redelivered || redelivered,
                spilled_returns.max(returns),
            );
        } else if let Some(a) = &self.admission {
            // Gone from the store meanwhile: no longer ready.
            a.left(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{Flags, MAX_HELD};
    use edge_core::QoS;

    fn state(max_priority: u8) -> State {
        let flags = Flags {
            durable: true,
            exclusive: false,
            auto_delete: false,
            args: Arc::new(crate::args::QueueArgs {
                max_priority: Some(max_priority),
                ..Default::default()
            }),
        };
        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        State::new(&flags, false, rx)
    }

    fn message(priority: Option<u8>) -> Arc<Message> {
        let mut m = Message::new(
            "t",
            bytes::Bytes::from_static(b"x"),
            QoS::AtLeastOnce,
            "p".into(),
        );
        m.properties.priority = priority;
        Arc::new(m)
    }

    fn order(s: &mut State) -> Vec<(u8, Option<Seq>)> {
        std::iter::from_fn(|| s.pop_ready())
            .map(|q| (q.message.properties.priority.unwrap_or(0), q.seq))
            .collect()
    }

    #[test]
    fn ready_is_by_priority_capped_then_arrival() {
        let mut s = state(5);
        for (seq, p) in [
            (1, Some(1)),
            (2, None),
            (3, Some(9)),
            (4, Some(5)),
            (5, Some(1)),
        ] {
            s.admit(message(p), seq, 0);
        }
        let seqs: Vec<_> = order(&mut s).into_iter().map(|(_, seq)| seq).collect();
        assert_eq!(seqs, [Some(3), Some(4), Some(1), Some(5), Some(2)]);
    }

    #[test]
    fn beyond_memory_a_higher_priority_takes_the_place_of_the_worst() {
        let mut s = state(9);
        let full = MAX_HELD as Seq;
        for seq in 1..=full {
            s.admit(message(Some(0)), seq, 0);
        }
        assert!(!s.has_room());
        // Better than what is held: the newest p0 is spilled for it.
        s.admit(message(Some(9)), full + 1, 0);
        // Not better than the spill's best: spilled, behind it.
        s.admit(message(Some(0)), full + 2, entry_state(true, 0));
        assert_eq!(
            s.spilled.iter().collect::<Vec<_>>(),
            [
                (&(Reverse(0), full), &0),
                (&(Reverse(0), full + 2), &entry_state(true, 0))
            ]
        );
        assert!(!s.spill_first(), "the held head comes first");
        let got = order(&mut s);
        assert_eq!(got[0], (9, Some(full + 1)));
        assert_eq!(got[1..].len(), MAX_HELD - 1);
        assert!(
            got[1..].windows(2).all(|w| w[0].1 < w[1].1),
            "FIFO within p0"
        );
        // Memory is free: the spill's entries are read back in turn.
        assert!(s.spill_first());
        assert_eq!(s.next_to_load(), Some((Reverse(0), full)));
    }

    #[test]
    fn a_spilled_entry_read_back_keeps_its_redelivered_flag() {
        let mut s = state(9);
        s.spilled.insert((Reverse(3), 7), entry_state(true, 2));
        let key = s.next_to_load();
        assert_eq!(key, Some((Reverse(3), 7)));
        let entry = Backlogged {
            seq: 7,
            state: 0,
            message: message(Some(3)),
        };
        s.loaded((Reverse(3), 7), Some(entry));
        let q = s.pop_ready().map(|q| (q.seq, q.redelivered, q.returns));
        assert_eq!(q, Some((Some(7), true, 2)));
        // Gone from the store meanwhile: nothing.
        s.spilled.insert((Reverse(3), 8), 0);
        s.loaded((Reverse(3), 8), None);
        assert!(s.spilled.is_empty() && s.ready.is_empty());
    }
}
