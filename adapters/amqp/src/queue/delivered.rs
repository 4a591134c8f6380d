//! The redelivered flag across restarts, for a durable queue.
//!
//! Before its first delivery of a run the queue writes its
//! `DELIVERED_ROW` (once). A clean stop records the stored entries that
//! may have been delivered (entry state `DELIVERED`) and removes the row.
//! So a start that finds the row knows the gateway stopped without
//! recording (kill -9, power loss): every entry stored then may have been
//! delivered (`State::suspect_up_to`). Without the row, exactly the
//! entries with the `DELIVERED` bit were. Nothing is written per delivery.
//!
//! The store entry's state is shared with the delivery limit: its low bits
//! count the entry's returns to the queue (`x-delivery-count`, written at
//! each requeue of a durable queue with `x-delivery-limit`, see
//! `dying.rs`), its top bit is `DELIVERED`. Either one set means the
//! message may have been delivered; a write always carries both (the
//! returns known in memory, and the bit), so neither use clears the other.

use std::sync::atomic::Ordering;

use edge_store::Seq;

use super::{DELIVERED_ROW, Queue};

/// The bit of a store entry's state set once its message may have been
/// delivered.
const DELIVERED: u32 = 1 << 31;

/// The entry state of a message: its returns, and whether it may have been
/// delivered (a returned one was).
pub(super) fn entry_state(redelivered: bool, returns: u32) -> u32 {
    (returns & !DELIVERED) | mark_if(redelivered || returns > 0)
}

/// `DELIVERED` when `delivered`, else nothing.
pub(super) fn mark_if(delivered: bool) -> u32 {
    if delivered { DELIVERED } else { 0 }
}

/// What an entry state says: whether the message may have been delivered,
/// and its returns. (A state written by a version that counted returns
/// only reads the same.)
pub(super) fn read_state(state: u32) -> (bool, u32) {
    (state != 0, state & !DELIVERED)
}

impl Queue {
    /// Before a durable queue's first delivery of a run, writes its
    /// `DELIVERED_ROW`, so that after a crash its entries come back
    /// redelivered; false if that write failed (then nothing durable is
    /// sent).
    pub(super) async fn mark_delivered(&self) -> bool {
        let Some(store) = &self.store else {
            return true;
        };
        let row = format!("{DELIVERED_ROW}{}", self.name);
        match store.put_definition(&row, vec![1]).await {
            Ok(()) => {
                self.delivered_mark.store(true, Ordering::Release);
                true
            }
            Err(error) => {
                tracing::warn!(queue = %self.name, %error, "cannot record that the queue delivers; not delivering");
                false
            }
        }
    }

    /// At a clean stop: records which stored entries may have been
    /// delivered (their state), then removes the `DELIVERED_ROW`, so the
    /// next start knows the others never were. Left as it is while some
    /// entries the last crash made suspect were not read yet.
    pub(super) async fn record_delivered(&self) {
        let Some(store) = &self.store else { return };
        if !self.delivered_mark.load(Ordering::Acquire) {
            return;
        }
        if let Some(acker) = &self.acker {
            // Acknowledgements under way land first.
            acker.settled().await;
        }
        let seqs: Vec<(Seq, u32)> = {
            let s = self.state();
            if s.suspect_up_to.is_some() {
                return;
            }
            let delivered = s.ready.values().filter(|q| q.redelivered);
            let held = delivered
                .chain(s.unacked.values())
                .filter_map(|q| Some((q.seq?, entry_state(true, q.returns))));
            let spilled = s.spilled.iter().filter(|(_, state)| **state != 0);
            held.chain(spilled.map(|((_, seq), state)| (*seq, *state | DELIVERED)))
                .collect()
        };
        if let Some(acker) = &self.acker {
            let writes = seqs
                .iter()
                .map(|(seq, state)| acker.set_state(*seq, *state));
            // Concurrent, so the store commits them together.
            for result in futures::future::join_all(writes).await {
                if let Err(error) = result {
                    tracing::warn!(queue = %self.name, %error, "cannot record a delivered message; the queue's messages count as delivered");
                    return;
                }
            }
        }
        let row = format!("{DELIVERED_ROW}{}", self.name);
        if let Err(error) = store.delete_definition(&row).await {
            tracing::warn!(queue = %self.name, %error, "cannot clear the queue's delivered mark");
        }
    }
}
