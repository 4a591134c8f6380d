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
        self.ready.insert(self.ready_key(&q), q);
    }

    /// The next message to deliver.
    pub(super) fn pop_ready(&mut self) -> Option<Queued> {
        self.ready.pop_first().map(|(_, q)| q)
    }

    /// Whether another stored entry can be taken in: room in memory, or in
    /// a priority queue's spill.
    pub(super) fn can_admit(&self) -> bool {
        self.has_room() || self.max_priority.is_some() && self.spilled.len() < MAX_SPILLED
    }

    /// A stored entry read (from the store or live): into `ready`, or
    /// into the spill when it is behind the spill or there is no room.
    pub(super) fn admit(&mut self, message: Arc<Message>, seq: Seq, redelivered: bool) {
        if self.max_priority.is_none() {
            self.push(message, Some(seq), redelivered);
            return;
        }
        let p = self.priority(&message);
        let behind = self
            .spilled
            .first_key_value()
            .is_some_and(|((Reverse(best), _), _)| p <= *best);
        if !behind && self.make_room_below(p) {
            self.push(message, Some(seq), redelivered);
        } else {
            self.spilled.insert((Reverse(p), seq), redelivered);
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
        self.release(&q);
        self.spilled.insert((key.0, seq), q.redelivered);
        true
    }

    /// The spilled entry to read back now, when there is room for it
    /// (made by spilling worse ready ones).
    pub(super) fn next_to_load(&mut self) -> Option<SpillKey> {
        let (&key, _) = self.spilled.first_key_value()?;
        self.make_room_below(key.0.0).then_some(key)
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
        let Some(redelivered) = self.spilled.remove(&key) else {
            // Purged or deleted meanwhile.
            return;
        };
        if let Some(e) = entry.filter(|e| e.seq == key.1)
            && !self.held.contains(&e.seq)
        {
            self.push(e.message, Some(e.seq), redelivered || e.state != 0);
        }
    }
}
