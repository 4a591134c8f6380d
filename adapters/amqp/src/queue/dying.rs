//! Messages that leave a queue without being delivered: requeued past the
//! delivery limit, rejected, expired, or over a `drop-head` limit. Each
//! goes to the queue's dead-letter task (`dead_letter.rs`), its seq held
//! until its store entry is acknowledged.
//!
//! The head is the next message to deliver (`priority.rs`): of a priority
//! queue the oldest of the highest priority, so `drop-head` drops that one,
//! as RabbitMQ does; a head spilled to the store is read back to drop it
//! (`State::spilled_head`), and entries not read yet (on their way, or in
//! the store) are read before any is dropped, since they may come first.
//! Expiry looks at the head of each priority, so a
//! lower priority's expired messages die on time behind live higher ones.

use std::cmp::Reverse;
use std::sync::Arc;

use edge_core::Message;
use edge_store::Seq;
use tokio::sync::mpsc;

use super::delivered::entry_state;
use super::{Flags, Queue, QueueArgs, Queued, ReadyKey, State};
use crate::args::Overflow;
use crate::dead_letter::{Dead, Reason};

impl State {
    /// A delivered message back in `ready` at its place, unless it came
    /// back more than `limit` times (then it dies).
    pub(super) fn put_back(&mut self, mut q: Queued, limit: Option<u64>) {
        q.redelivered = true;
        q.returns = q.returns.saturating_add(1);
        if limit.is_some_and(|limit| u64::from(q.returns) > limit) {
            self.bury(q, Reason::DeliveryLimit);
            return;
        }
        if let Some(a) = &self.admission {
            a.back(q.message.payload.len());
        }
        self.put_ready(q);
    }

    /// Hands a message (out of `ready` and `unacked`) to the dead-letter
    /// task; its seq stays held until its entry is acknowledged.
    pub(super) fn bury(&mut self, q: Queued, reason: Reason) {
        self.held_bytes = self.held_bytes.saturating_sub(q.message.payload.len());
        let dead = Dead {
            message: q.message,
            seq: q.seq,
            reason,
        };
        if let Some(Err(mpsc::error::SendError(dead))) = self.dead.as_ref().map(|tx| tx.send(dead))
        {
            // The queue is going away: its entry stays for a restart.
            if let Some(seq) = dead.seq {
                self.held.remove(&seq);
            }
        }
    }

    /// `drop-head`: the head dies while the queue is over a limit; `beyond`
    /// counts durable entries not in memory (in the store, spilled, or on
    /// their way). True when it is still over (the head is not in memory).
    fn drop_head(&mut self, args: &QueueArgs, beyond: u64) -> bool {
        let over = |s: &State| {
            args.max_length
                .is_some_and(|max| s.ready.len() as u64 + beyond > max)
                || args
                    .max_length_bytes
                    .is_some_and(|max| s.ready_bytes as u64 > max)
        };
        // A priority queue's entries not read yet (neither ready nor
        // spilled) may come before its ready head: they are read first.
        let unread = beyond.saturating_sub(self.spilled.len() as u64);
        while over(self) {
            if self.max_priority.is_some() && unread > 0 {
                self.catching_up = true;
                return true;
            }
            let Some(q) = self.pop_ready() else {
                return true;
            };
            self.bury(q, Reason::Maxlen);
        }
        false
    }

    /// Expired messages at the head of each priority die; returns when the
    /// next of those heads expires.
    pub(super) fn expire_heads(&mut self, flags: &Flags, now: u64) -> Option<u64> {
        let mut next: Option<u64> = None;
        let mut from: ReadyKey = (Reverse(u8::MAX), 0);
        loop {
            let Some((&key, head)) = self.ready.range(from..).next() else {
                return next;
            };
            match flags.expires_at(&head.message) {
                Some(at) if at <= now => {
                    if let Some(q) = self.remove_ready(&key) {
                        crate::telemetry::expired(&q.message);
                        self.bury(q, Reason::Expired);
                    }
                    continue;
                }
                Some(at) => next = Some(next.map_or(at, |n| n.min(at))),
                None => {}
            }
            let Reverse(p) = key.0;
            if p == 0 {
                return next;
            }
            from = (Reverse(p - 1), 0);
        }
    }
}

impl Queue {
    /// The delivery limit in force (`x-delivery-limit`).
    fn delivery_limit(&self) -> Option<u64> {
        self.flags.args.effective_delivery_limit()
    }

    /// Whether deliveries carry `x-delivery-count` (queues with a
    /// delivery limit, as RabbitMQ 4's quorum queues).
    pub(crate) fn counts_deliveries(&self) -> bool {
        self.delivery_limit().is_some()
    }

    /// `drop-head` after arrivals, counting a durable queue's entries not
    /// in memory (in the store, a priority queue's spill, or on their way
    /// in the session's channel); true when the queue is still over its
    /// limit: its head is not in memory.
    pub(super) fn arrived(&self, s: &mut State) -> bool {
        if !self.flags.drops_head() {
            return false;
        }
        // Read before the store's count, which goes down first: an ack
        // finishing in between makes `beyond` smaller, never larger.
        let acking = self.acking.load(std::sync::atomic::Ordering::SeqCst);
        let beyond = self.subscriber.queued_messages().map_or(0, |stored| {
            stored
                .saturating_sub(s.held.len() as u64)
                .saturating_sub(acking)
        });
        s.drop_head(&self.flags.args, beyond)
    }

    /// Back to `ready` at their place, marked redelivered (of a
    /// single-active-consumer queue, for the consumer active next).
    /// A durable queue with a delivery limit records each entry's returns
    /// in the store (the entry's state, with its delivered bit), so the
    /// limit holds across restarts.
    pub(crate) fn requeue(&self, ids: &[u64]) {
        let limit = self.delivery_limit();
        let mut returned = Vec::new();
        let mut s = self.state();
        for id in ids {
            if let Some(q) = s.unacked.remove(id) {
                if let (Some(seq), Some(_)) = (q.seq, limit) {
                    returned.push((seq, entry_state(true, q.returns.saturating_add(1))));
                }
                s.put_back(q, limit);
            }
        }
        s.wake();
        drop(s);
        if let (Some(acker), false) = (&self.acker, returned.is_empty()) {
            let acker = acker.clone();
            // A state set after the entry went (dead, acked) is a no-op.
            tokio::spawn(async move {
                for (seq, state) in returned {
                    if let Err(error) = acker.set_state(seq, state).await {
                        tracing::debug!(%error, "cannot record a delivery's returns");
                    }
                }
            });
        }
    }

    /// Rejected without requeue: they die.
    pub(crate) fn reject(&self, ids: &[u64]) {
        let mut s = self.state();
        for id in ids {
            if let Some(q) = s.unacked.remove(id) {
                s.bury(q, Reason::Rejected);
            }
        }
        drop(s);
        self.room.notify_one();
    }

    /// The dead-letter task is done with these entries (their copy is
    /// committed, or they were dropped): they are acknowledged, and held
    /// until the store's count no longer has them. Entries whose copy the
    /// store refused stay held, for the task to try again.
    pub(crate) async fn buried(&self, done: Vec<Seq>) {
        if done.is_empty() {
            return;
        }
        if let Some(acker) = &self.acker {
            // Awaited: until the entries are gone from the store's count,
            // `held` keeps them out of the ready count.
            if let Err(error) = acker.ack(done.clone()).await {
                tracing::warn!(queue = %self.name, %error, "cannot acknowledge dead-lettered entries; they come back at the next start");
            }
        }
        let mut s = self.state();
        for seq in &done {
            s.held.remove(seq);
        }
        drop(s);
        self.room.notify_one();
    }

    /// Cancelled when the queue is deleted or closed.
    pub(crate) fn stopping(&self) -> tokio_util::sync::CancellationToken {
        self.stop.clone()
    }

    /// A message this queue refused at publish (`reject-publish-dlx`).
    pub(crate) fn refused(&self, message: Arc<Message>) {
        if self.flags.args.overflow == Overflow::RejectPublishDlx
            && let Some(tx) = &self.state().dead
        {
            let _ = tx.send(Dead {
                message,
                seq: None,
                reason: Reason::Maxlen,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_core::QoS;

    fn state() -> (State, mpsc::UnboundedReceiver<Dead>) {
        let flags = Flags {
            durable: false,
            exclusive: false,
            auto_delete: false,
            args: Arc::new(QueueArgs {
                max_priority: Some(9),
                ..Default::default()
            }),
        };
        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        let mut s = State::new(&flags, false, rx);
        let (dead, graves) = mpsc::unbounded_channel();
        s.dead = Some(dead);
        (s, graves)
    }

    fn message(body: &'static str, priority: u8, expires_at: Option<u64>) -> Arc<Message> {
        let mut m = Message::new(
            "t",
            bytes::Bytes::from_static(body.as_bytes()),
            QoS::AtMostOnce,
            "p".into(),
        );
        m.properties.priority = Some(priority);
        m.properties.expires_at_ms = expires_at;
        Arc::new(m)
    }

    #[test]
    fn each_prioritys_head_expires_and_the_earliest_next_one_is_returned() {
        let (mut s, mut graves) = state();
        let flags = Flags {
            durable: false,
            exclusive: false,
            auto_delete: false,
            args: Arc::new(QueueArgs::default()),
        };
        s.push(message("high", 9, None), None, false, 0);
        s.push(message("late", 1, Some(400)), None, false, 0);
        s.push(message("mid", 4, Some(60_000)), None, false, 0);
        s.push(message("soon", 1, Some(100)), None, false, 0);
        s.push(message("lowest", 0, Some(200)), None, false, 0);
        assert_eq!(s.expire_heads(&flags, 50), Some(200));
        assert_eq!(s.expire_heads(&flags, 250), Some(400));
        assert_eq!(s.expire_heads(&flags, 450), Some(60_000));
        let dead: Vec<_> = std::iter::from_fn(|| graves.try_recv().ok())
            .map(|d| d.message.payload.clone())
            .collect();
        assert_eq!(dead, ["lowest", "late", "soon"]);
        let left: Vec<_> = s
            .ready
            .values()
            .map(|q| q.message.payload.clone())
            .collect();
        assert_eq!(left, ["high", "mid"]);
    }

    #[test]
    fn drop_head_of_a_priority_queue_drops_the_highest_but_waits_for_unread_entries() {
        let (mut s, mut graves) = state();
        let args = QueueArgs {
            max_priority: Some(9),
            max_length: Some(2),
            ..Default::default()
        };
        s.push(message("p1", 1, None), None, false, 0);
        // One more on its way: its priority is not known yet.
        assert!(s.drop_head(&args, 2));
        assert!(s.catching_up && graves.try_recv().is_err());
        s.catching_up = false;
        s.push(message("p5", 5, None), None, false, 0);
        s.push(message("p3", 3, None), None, false, 0);
        assert!(!s.drop_head(&args, 0));
        let dead = graves.try_recv().map(|d| d.message.payload.clone());
        assert_eq!(dead.ok().as_deref(), Some(&b"p5"[..]));
    }
}
