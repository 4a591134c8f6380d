//! `store.max_age`: log records appended longer ago than it are dropped,
//! forwarded or not (see "Age" in `lib.rs`).
//!
//! The store keeps append times coarsely: the `ages` table maps a time to
//! the first seq appended then, with one entry per [`step`] of appends at
//! most. So the records from one entry's seq to the next one's were all
//! appended within a step after that entry's time, and they are all older
//! than `max_age` once that time plus a step is more than `max_age` ago.

use std::time::Duration;

use redb::ReadableTable;
use tokio::sync::mpsc;

use super::apply::raise_retired_below;
use super::{Op, State, Writer};
use crate::Seq;
use crate::journal::Tables;

static AGED: edge_log::Summary = edge_log::Summary::new(
    "Store: dropped messages older than store.max_age; they will not be forwarded",
    edge_log::Level::Warn,
);

/// Milliseconds between two `ages` entries: `max_age / 1000`, at least a
/// second (so the table holds about a thousand live entries).
pub(crate) fn step(max_age: Duration) -> u64 {
    (u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX) / 1000).max(1000)
}

/// Starts the thread that queues a [`Op::Tick`] every [`step`], so that
/// records age out while no batch comes. It holds the inbox weakly and
/// returns once the store is gone; a full inbox skips a tick (a busy
/// writer sweeps with every batch anyway).
pub(crate) fn start_ticker(tx: mpsc::WeakSender<Op>, max_age: Duration) {
    let every = Duration::from_millis(step(max_age));
    let spawned = std::thread::Builder::new()
        .name("edge-store-ager".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                let Some(tx) = tx.upgrade() else { return };
                let _ = tx.try_send(Op::Tick);
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "Cannot start the store.max_age ticker: records age out only when a batch commits.");
    }
}

impl Writer {
    /// `max_age` and the step of the `ages` table, in milliseconds.
    fn age_limits(&self) -> Option<(u64, u64)> {
        let max_age = self.shared.options.max_age?;
        let ms = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
        Some((ms, step(max_age)))
    }

    /// Records the append time of `seq` when a step has passed since the
    /// last entry.
    pub(super) fn mark_append(
        &self,
        t: &mut Tables<'_>,
        next: &mut State,
        seq: Seq,
    ) -> Result<(), redb::Error> {
        let Some((_, step)) = self.age_limits() else {
            return Ok(());
        };
        if next
            .marks
            .back()
            .is_none_or(|&(at, _)| self.now >= at.saturating_add(step))
        {
            t.ages.insert(self.now, seq)?;
            next.marks.push_back((self.now, seq));
        }
        Ok(())
    }

    /// The seq below which every record is older than `max_age`, when
    /// there are such records not swept yet.
    pub(super) fn expired_below(&self, state: &State) -> Option<Seq> {
        let (max_age, step) = self.age_limits()?;
        let cutoff = self.now.checked_sub(max_age)?;
        if state.first_seq == 0 {
            return None;
        }
        let mut below = None;
        for (i, &(at, _)) in state.marks.iter().enumerate() {
            if at.saturating_add(step) > cutoff {
                break;
            }
            below = Some(state.marks.get(i + 1).map_or(state.next_seq, |m| m.1));
        }
        below.filter(|&b| b > state.aged_below.max(state.first_seq))
    }

    /// Drops the unreferenced log records older than `max_age` (at most
    /// [`super::RETIRE_PER_TXN`]; returns whether more remain), moves cursors over
    /// them, and forgets `ages` entries no live record needs.
    pub(super) fn age_out(
        &self,
        t: &mut Tables<'_>,
        next: &mut State,
    ) -> Result<bool, redb::Error> {
        if self.age_limits().is_none() {
            return Ok(false);
        }
        // Entries whose records are all gone (retired or dropped); the last
        // one stays, for what is appended within its step.
        while next.marks.len() > 1
            && (next.first_seq == 0 || next.marks[1].1 <= next.first_seq.max(next.aged_below))
        {
            if let Some((at, _)) = next.marks.pop_front() {
                t.ages.remove(at)?;
            }
        }
        let Some(below) = self.expired_below(next) else {
            return Ok(false);
        };
        let from = next.aged_below.max(next.first_seq);
        let (upto, doomed) = self.delete_unheld(t, next, from, below)?;
        next.aged_below = upto;
        // Every unreferenced record below `upto` is gone now.
        next.retired_upto = next.retired_upto.max(upto);
        next.first_seq = t.log.first()?.map_or(0, |(k, _)| k.value());
        raise_retired_below(t, upto)?;
        for (name, at) in next.cursors.iter_mut() {
            if *at < upto {
                *at = upto;
                t.cursors.insert(name.as_str(), upto)?;
            }
        }
        let dropped = doomed.len() as u64;
        metrics::counter!("edge_messages_dropped_total", "reason" => "max_age").increment(dropped);
        let first_seq = next.first_seq;
        AGED.record_n("max_age", dropped, || {
            format!("dropped={dropped} first_seq={first_seq}")
        });
        Ok(upto < below)
    }
}
