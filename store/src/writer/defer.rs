//! Deferred cursor moves: a batch that would hold nothing but lazy cursor
//! moves ([`Store::advance_cursor_lazily`](crate::Store::advance_cursor_lazily))
//! is not committed on its own. Its ops wait for the next batch that
//! commits anyway (an append, any other op, a retirement, a close), and go
//! first in it; at the latest they commit [`CURSOR_DELAY`] after the first
//! of them arrived, woken by an [`Op::Tick`] from the alarm thread. While
//! the store refuses appends (full) nothing is deferred: the move is what
//! makes room.
//!
//! Why: with the upstream up, every message costs an append and, a moment
//! later, the move of its cursor past it (and of each priority lane's
//! cursor: with two lanes, three group commits, three journal blocks synced
//! for one message). A cursor's durability only saves
//! re-forwarding after a crash (the same message ids again, never a loss),
//! so the move can ride in the next message's commit: one commit per
//! message for a trickle. What a crash can cost is a few seconds of
//! confirmed messages forwarded again (a forwarder's next move waits for
//! its previous one: `adapters/upstream/src/cursor.rs`).

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{Op, Writer};

/// Longest a lazy cursor move waits for a batch to ride in. Above the
/// interval of a trickle of one message a second, so that its cursor moves
/// always find the next message's commit.
pub(crate) const CURSOR_DELAY: Duration = Duration::from_secs(2);

/// Wakes the writer with an [`Op::Tick`] at a deadline; one thread per
/// store, asleep unless armed.
#[derive(Debug, Default)]
pub(crate) struct Alarm {
    state: Mutex<AlarmState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct AlarmState {
    at: Option<Instant>,
    stopped: bool,
}

impl Alarm {
    /// Starts its thread, which holds the inbox weakly and returns once
    /// [`Alarm::stop`] is called or the inbox is gone. `None` if the thread
    /// cannot be started: then nothing is deferred.
    pub(crate) fn start(tx: mpsc::WeakSender<Op>) -> Option<Arc<Alarm>> {
        let alarm = Arc::new(Alarm::default());
        let own = Arc::clone(&alarm);
        let spawned = std::thread::Builder::new()
            .name("edge-store-alarm".into())
            .spawn(move || own.run(&tx));
        match spawned {
            Ok(_) => Some(alarm),
            Err(error) => {
                tracing::warn!(%error, "Cannot start the store's alarm thread: every cursor move is committed at once.");
                None
            }
        }
    }

    /// A tick at `at`, instead of any deadline set before.
    pub(crate) fn arm(&self, at: Instant) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.at != Some(at) {
            state.at = Some(at);
            self.changed.notify_one();
        }
    }

    pub(crate) fn stop(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.stopped = true;
        self.changed.notify_one();
    }

    fn run(&self, tx: &mpsc::WeakSender<Op>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if state.stopped {
                return;
            }
            match state.at {
                None => {
                    state = self
                        .changed
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                Some(at) => {
                    let now = Instant::now();
                    if now < at {
                        state = self
                            .changed
                            .wait_timeout(state, at - now)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                        continue;
                    }
                    state.at = None;
                    drop(state);
                    let Some(tx) = tx.upgrade() else { return };
                    // A full inbox needs no tick: the writer has a batch.
                    let _ = tx.try_send(Op::Tick);
                    drop(tx);
                    state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }
}

/// Whether `op` may wait for another batch.
fn deferrable(op: &Op) -> bool {
    matches!(op, Op::AdvanceCursor { lazy: true, .. } | Op::Tick)
}

impl Writer {
    /// Holds back the lazy cursor moves of a batch that has nothing else
    /// to commit, or puts every held one at the head of a batch that
    /// commits. Returns the batch to commit now (empty: nothing).
    pub(super) fn defer(&mut self, batch: Vec<Op>) -> Vec<Op> {
        let due = self
            .deferred_since
            .is_some_and(|since| since.elapsed() >= CURSOR_DELAY);
        let hold = self.alarm.is_some()
            && !due
            && !self.closing
            && self.shared.full.borrow().is_none()
            && batch.iter().all(deferrable)
            && !(batch.iter().any(|op| matches!(op, Op::Tick)) && self.ticks_commit());
        if !hold {
            return self.with_deferred(batch);
        }
        let (ticks, moves): (Vec<Op>, Vec<Op>) =
            batch.into_iter().partition(|op| matches!(op, Op::Tick));
        self.deferred.extend(moves);
        if !self.deferred.is_empty() {
            let since = *self.deferred_since.get_or_insert_with(Instant::now);
            // Again with every batch held: a tick armed for moves that
            // have committed since (with another batch) may have been the
            // one that woke the writer.
            if let Some(alarm) = &self.alarm {
                alarm.arm(since + CURSOR_DELAY);
            }
        }
        // Ticks still go to the writer: an age sweep may be due.
        ticks
    }

    /// Whether a batch of ticks alone commits (retirement, a checkpoint
    /// or an age sweep is due): then held moves go with it.
    fn ticks_commit(&self) -> bool {
        self.must_retire(&self.state)
            || self.checkpoint_due
            || self.expired_below(&self.state).is_some()
    }

    /// `batch` with every held cursor move in front of it.
    pub(super) fn with_deferred(&mut self, batch: Vec<Op>) -> Vec<Op> {
        if self.deferred.is_empty() {
            return batch;
        }
        self.deferred_since = None;
        let mut all = std::mem::take(&mut self.deferred);
        all.extend(batch);
        all
    }
}
