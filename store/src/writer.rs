//! The writer thread: the only owner of redb write transactions.
//!
//! It takes one op from the inbox, drains whatever else is pending (up to the
//! batch limits), applies all of it in one write transaction, commits with
//! `Durability::Immediate` (one fsync per batch), and only then completes the
//! replies. Seqs are assigned here, in inbox order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redb::{Durability, ReadableTable, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use crate::tables::{
    self, CURSORS, DEAD_LETTERS, GATEWAY_ID_KEY, LOG, Loaded, META, RETIRED_BELOW_KEY,
};
use crate::{AppendError, FullReason, Seq, Shared, StoreError, StoreStats, WhenFull, space};

/// Most log records deleted in one transaction, so one commit stays short;
/// the rest is retired by the following transactions.
pub(crate) const RETIRE_PER_TXN: usize = 10_000;
/// Longest wait for stragglers when a batch came out much smaller than the
/// one before (see [`Writer::linger`]).
const LINGER: Duration = Duration::from_micros(500);
const LINGER_STEP: Duration = Duration::from_micros(50);
/// How long a reopen waits for readers still holding the old database.
const REOPEN_WAIT: Duration = Duration::from_secs(5);

static REFUSED: edge_log::Summary = edge_log::Summary::new(
    "Store full: refusing appends (nothing stored is touched; space comes back as upstreams confirm)",
    edge_log::Level::Warn,
);
static DROPPED: edge_log::Summary = edge_log::Summary::new(
    "Store full: dropped the oldest messages (when_full = drop-oldest); they will not be forwarded",
    edge_log::Level::Error,
);
static DISK: edge_log::Summary = edge_log::Summary::new(
    "Filesystem short of space: the store takes no more than it holds (store.min_free)",
    edge_log::Level::Warn,
);

pub(crate) enum Op {
    Append {
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<Seq, AppendError>>,
    },
    AdvanceCursor {
        name: String,
        next: Seq,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Park {
        seq: Seq,
        value: Vec<u8>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Purges or replays up to `max` dead letters, oldest first.
    DeadLetters {
        action: DeadLetterAction,
        max: usize,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    /// Records the gateway's identity in `meta`.
    SetGatewayId {
        id: String,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

impl Op {
    fn bytes(&self) -> usize {
        match self {
            Op::Append { bytes, .. } => bytes.len(),
            Op::Park { value, .. } => value.len(),
            Op::SetGatewayId { id, .. } => id.len(),
            Op::DeadLetters { .. } => 0,
            Op::AdvanceCursor { .. } | Op::Close { .. } => 0,
        }
    }
}

/// A reply held until its batch is durable.
enum Pending {
    /// Reply, seq, encoded length.
    Append(oneshot::Sender<Result<Seq, AppendError>>, Seq, u64),
    Done(oneshot::Sender<Result<(), StoreError>>),
    Count(oneshot::Sender<Result<u64, StoreError>>, u64),
}

/// What [`Op::DeadLetters`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeadLetterAction {
    /// Delete them.
    Purge,
    /// Append their records to the log again (new seqs), byte for byte as
    /// parked, headers included; then delete them.
    Replay,
}

/// The figures a batch changes, applied only once it committed.
#[derive(Debug, Clone)]
struct State {
    first_seq: Seq,
    next_seq: Seq,
    live_messages: u64,
    live_bytes: u64,
    dead_letters: u64,
    dead_bytes: u64,
    cursors: BTreeMap<String, Seq>,
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Op>,
    state: State,
    retire_pending: bool,
    /// Ops in the previous batch.
    last_batch: usize,
    /// Size of the largest record refused at the quota that could fit once
    /// the log is retired. Until it would fit, every append is refused, so a
    /// small message cannot slip in after a refused larger one of the same
    /// publisher (which would reorder that publisher once it retries).
    /// Records that could never fit (larger than the quota less the dead
    /// letters) do not count, or the store would refuse everything for ever.
    waiting_for: Option<u64>,
    disk: Disk,
    /// Appends refused in the current batch, and whether one was taken.
    refused_in_batch: Option<FullReason>,
}

/// The filesystem as the writer last saw it (see `space.rs`).
#[derive(Debug, Default)]
struct Disk {
    /// While less than `min_free` is available: the bytes the store held
    /// when that began, which it does not grow past.
    cap: Option<u64>,
    /// Less than half of `min_free` is available: refuse every append.
    critical: bool,
    /// The database is closed after a commit ran out of space and could not
    /// be reopened yet.
    closed: bool,
}

impl Writer {
    pub(crate) fn new(shared: Arc<Shared>, rx: mpsc::Receiver<Op>, loaded: Loaded) -> Writer {
        Writer {
            shared,
            rx,
            state: State {
                first_seq: loaded.first_seq,
                next_seq: loaded.next_seq,
                live_messages: loaded.live_messages,
                live_bytes: loaded.live_bytes,
                dead_letters: loaded.dead_letters,
                dead_bytes: loaded.dead_bytes,
                cursors: loaded.cursors,
            },
            // Retirement may have been cut short before a restart.
            retire_pending: true,
            last_batch: 0,
            waiting_for: None,
            disk: Disk::default(),
            refused_in_batch: None,
        }
    }

    pub(crate) fn run(mut self) {
        // The gauges show the store as opened, before any traffic.
        self.publish_stats();
        let mut close_reply = None;
        loop {
            let first = if self.retire_pending {
                match self.rx.try_recv() {
                    Ok(op) => op,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        self.commit_batch(Vec::new());
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            } else {
                match self.rx.blocking_recv() {
                    Some(op) => op,
                    None => break,
                }
            };
            let mut batch = vec![first];
            let mut bytes = batch[0].bytes();
            self.drain(&mut batch, &mut bytes);
            self.linger(&mut batch, &mut bytes);
            self.last_batch = batch.len();
            close_reply = self.commit_batch(batch);
            if close_reply.is_some() {
                break;
            }
        }
        // Ops still queued behind a close resolve as `Closed` when dropped.
        self.rx.close();
        tracing::debug!(next_seq = self.state.next_seq, "Store writer stopped.");
        if let Some(reply) = close_reply {
            let _ = reply.send(());
        }
    }

    fn has_room(&self, batch: &[Op], bytes: usize) -> bool {
        let limits = &self.shared.options;
        batch.len() < limits.batch_max_messages.get()
            && bytes < limits.batch_max_bytes.get()
            && !matches!(batch.last(), Some(Op::Close { .. }))
    }

    /// Takes whatever is pending, up to the batch limits.
    fn drain(&mut self, batch: &mut Vec<Op>, bytes: &mut usize) {
        while self.has_room(batch, *bytes) {
            match self.rx.try_recv() {
                Ok(op) => {
                    *bytes += op.bytes();
                    batch.push(op);
                }
                Err(_) => break,
            }
        }
    }

    /// Callers woken by the previous batch's replies take a moment to queue
    /// their next op; a writer that commits at once catches only the fastest
    /// and batches alternate big and small. When this batch is under half the
    /// last one, wait up to [`LINGER`] for it to fill to that size. Costs
    /// nothing at low load (batches of one) and little next to an fsync.
    fn linger(&mut self, batch: &mut Vec<Op>, bytes: &mut usize) {
        let target = self.last_batch;
        if batch.len() * 2 >= target {
            return;
        }
        let deadline = Instant::now() + LINGER;
        while batch.len() < target && self.has_room(batch, *bytes) && Instant::now() < deadline {
            let before = batch.len();
            self.drain(batch, bytes);
            if batch.len() == before {
                std::thread::sleep(LINGER_STEP);
            }
        }
    }

    /// Applies `ops` in one transaction; returns the close reply if the batch
    /// held a close.
    fn commit_batch(&mut self, ops: Vec<Op>) -> Option<oneshot::Sender<()>> {
        if ops.is_empty() && !self.must_retire(&self.state) {
            self.retire_pending = false;
            return None;
        }
        let started = Instant::now();
        let mut next = self.state.clone();
        let mut pending = Vec::with_capacity(ops.len());
        let mut close = None;
        let mut appended = 0u64;
        self.refused_in_batch = None;
        if ops.iter().any(|op| matches!(op, Op::Append { .. })) {
            self.check_space();
        }
        if self.disk.closed && !self.reopen() {
            self.refuse_closed(ops, &mut close);
            return close;
        }
        let mut ops = ops.into_iter();
        let result = self.apply(&mut ops, &mut next, &mut pending, &mut close, &mut appended);
        match result {
            Ok(retire_more) => {
                let elapsed = started.elapsed();
                self.retire_pending = retire_more;
                self.state = next;
                self.publish_stats();
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                if appended > 0 {
                    metrics::histogram!("edge_store_batch_size").record(appended as f64);
                }
                metrics::histogram!("edge_store_commit_seconds").record(elapsed.as_secs_f64());
                self.report_full(appended);
                for p in pending {
                    match p {
                        Pending::Append(reply, seq, _) => {
                            let _ = reply.send(Ok(seq));
                        }
                        Pending::Done(reply) => {
                            let _ = reply.send(Ok(()));
                        }
                        Pending::Count(reply, n) => {
                            let _ = reply.send(Ok(n));
                        }
                    }
                }
                if appended > 0 {
                    self.shared.committed.send_replace(self.state.next_seq - 1);
                }
            }
            Err(e) if space::is_no_space(&e) && self.shared.reopen.is_some() => {
                self.out_of_space(&e, ops, pending, &mut close);
            }
            Err(e) => {
                self.retire_pending = false;
                // Ops the failure cut off fail the same way.
                for op in ops {
                    match op {
                        Op::Append { bytes, reply } => {
                            pending.push(Pending::Append(reply, 0, bytes.len() as u64));
                        }
                        Op::AdvanceCursor { reply, .. }
                        | Op::Park { reply, .. }
                        | Op::SetGatewayId { reply, .. } => {
                            pending.push(Pending::Done(reply));
                        }
                        Op::DeadLetters { reply, .. } => pending.push(Pending::Count(reply, 0)),
                        Op::Close { reply } => close = Some(reply),
                    }
                }
                let msg = e.to_string();
                metrics::counter!("edge_store_commit_failures_total").increment(1);
                if self.shared.failure.borrow().is_none() {
                    tracing::error!(error = %e, ops = pending.len(),
                        "Store commit failed: nothing in the batch was acknowledged, and the store takes no more writes until it is reopened.");
                }
                self.shared.failure.send_replace(Some(msg.clone()));
                for p in pending {
                    match p {
                        Pending::Append(reply, ..) => {
                            let _ = reply.send(Err(AppendError::Io(msg.clone())));
                        }
                        Pending::Done(reply) => {
                            let _ = reply.send(Err(StoreError::Write(msg.clone())));
                        }
                        Pending::Count(reply, _) => {
                            let _ = reply.send(Err(StoreError::Write(msg.clone())));
                        }
                    }
                }
            }
        }
        close
    }

    /// Writes the batch and commits. Returns whether retirement was cut short.
    fn apply(
        &mut self,
        ops: &mut std::vec::IntoIter<Op>,
        next: &mut State,
        pending: &mut Vec<Pending>,
        close: &mut Option<oneshot::Sender<()>>,
        appended: &mut u64,
    ) -> Result<bool, redb::Error> {
        let db = self
            .shared
            .db()
            .map_err(|e| redb::Error::Io(std::io::Error::other(e.to_string())))?;
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let mut refused = false;
        {
            let mut log = txn.open_table(LOG)?;
            let mut cursors = txn.open_table(CURSORS)?;
            let mut dead = txn.open_table(DEAD_LETTERS)?;
            for op in ops {
                match op {
                    Op::Append { bytes, reply } => {
                        let len = bytes.len() as u64;
                        let (max, reason) = self.limit();
                        let used = next.live_bytes.saturating_add(next.dead_bytes);
                        let fits = |n: u64| used.saturating_add(n) <= max;
                        // Retiring the log can only ever make room for a
                        // record that fits beside the dead letters.
                        let dead = next.dead_bytes;
                        let can_fit = move |n: u64| dead.saturating_add(n) <= max;
                        if self.waiting_for.is_some_and(|w| fits(w) || !can_fit(w)) {
                            self.waiting_for = None;
                        }
                        if self.shared.options.when_full == WhenFull::DropOldest
                            && !refused
                            && !fits(len)
                            && can_fit(len)
                        {
                            self.drop_oldest(&txn, &mut log, &mut cursors, next, len, max)?;
                        }
                        let used = next.live_bytes.saturating_add(next.dead_bytes);
                        let fits = |n: u64| used.saturating_add(n) <= max;
                        if refused || self.waiting_for.is_some() || !fits(len) {
                            refused = true;
                            if can_fit(len) && !fits(len) {
                                self.waiting_for = self.waiting_for.max(Some(len));
                            }
                            self.refuse_full(reason, used, max, len);
                            let _ = reply.send(Err(AppendError::Full {
                                reason,
                                live_bytes: used,
                                max_bytes: max,
                                record_bytes: len,
                            }));
                            continue;
                        }
                        let seq = next.next_seq;
                        log.insert(seq, bytes.as_slice())?;
                        next.next_seq += 1;
                        next.live_bytes += len;
                        next.live_messages += 1;
                        if next.first_seq == 0 {
                            next.first_seq = seq;
                        }
                        *appended += 1;
                        pending.push(Pending::Append(reply, seq, len));
                    }
                    Op::AdvanceCursor {
                        name,
                        next: to,
                        reply,
                    } => {
                        let old = next.cursors.get(&name).copied().unwrap_or(0);
                        // Never backwards, never past the next seq to be assigned.
                        let to = to.min(next.next_seq).max(old);
                        if to != old {
                            cursors.insert(name.as_str(), to)?;
                            next.cursors.insert(name, to);
                        }
                        pending.push(Pending::Done(reply));
                    }
                    Op::Park { seq, value, reply } => {
                        // Parked twice (by two upstreams): keep both names.
                        let existing: Option<Vec<u8>> =
                            dead.get(seq)?.map(|old| old.value().to_vec());
                        let value = match existing {
                            Some(old) => tables::merge_dead_letters(&old, &value).unwrap_or(value),
                            None => value,
                        };
                        match dead.insert(seq, value.as_slice())? {
                            Some(old) => {
                                next.dead_bytes =
                                    next.dead_bytes.saturating_sub(old.value().len() as u64);
                            }
                            None => next.dead_letters += 1,
                        }
                        next.dead_bytes += value.len() as u64;
                        pending.push(Pending::Done(reply));
                    }
                    Op::DeadLetters { action, max, reply } => {
                        let mut done = 0u64;
                        while (done as usize) < max {
                            let Some((_, value)) = dead.pop_first()? else {
                                break;
                            };
                            let value = value.value().to_vec();
                            next.dead_letters = next.dead_letters.saturating_sub(1);
                            next.dead_bytes = next.dead_bytes.saturating_sub(value.len() as u64);
                            done += 1;
                            if action == DeadLetterAction::Replay {
                                // A value that does not decode was never
                                // written by this store: nothing to replay.
                                let Some((_, record)) = tables::decode_dead_letter(&value) else {
                                    continue;
                                };
                                let seq = next.next_seq;
                                log.insert(seq, record)?;
                                next.next_seq += 1;
                                next.live_bytes += record.len() as u64;
                                next.live_messages += 1;
                                if next.first_seq == 0 {
                                    next.first_seq = seq;
                                }
                                *appended += 1;
                            }
                        }
                        pending.push(Pending::Count(reply, done));
                    }
                    Op::SetGatewayId { id, reply } => {
                        let mut meta = txn.open_table(META)?;
                        meta.insert(GATEWAY_ID_KEY, id.as_bytes())?;
                        pending.push(Pending::Done(reply));
                    }
                    Op::Close { reply } => *close = Some(reply),
                }
            }
        }
        let more = self.retire(&txn, next)?;
        txn.commit()?;
        Ok(more)
    }

    /// The seq below which no cursor needs records (0: none configured).
    fn retire_below(&self, state: &State) -> Seq {
        let configured = &self.shared.options.cursors;
        if configured.is_empty() {
            return 0;
        }
        configured
            .iter()
            // An unset cursor needs everything from the first record on.
            .map(|name| state.cursors.get(name).copied().unwrap_or(0))
            .min()
            .unwrap_or(0)
    }

    fn must_retire(&self, state: &State) -> bool {
        state.first_seq != 0 && state.first_seq < self.retire_below(state)
    }

    /// Deletes records below the smallest cursor, at most [`RETIRE_PER_TXN`].
    fn retire(&self, txn: &WriteTransaction, next: &mut State) -> Result<bool, redb::Error> {
        if !self.must_retire(next) {
            return Ok(false);
        }
        let below = self.retire_below(next);
        let mut log = txn.open_table(LOG)?;
        let mut retired = 0usize;
        let mut last = None;
        while retired < RETIRE_PER_TXN {
            let Some((k, v)) = log.first()? else { break };
            let seq = k.value();
            if seq >= below {
                break;
            }
            let len = v.value().len() as u64;
            drop((k, v));
            log.remove(seq)?;
            next.live_bytes = next.live_bytes.saturating_sub(len);
            next.live_messages = next.live_messages.saturating_sub(1);
            retired += 1;
            last = Some(seq);
        }
        next.first_seq = log.first()?.map_or(0, |(k, _)| k.value());
        if let Some(last) = last {
            let mut meta = txn.open_table(META)?;
            meta.insert(RETIRED_BELOW_KEY, (last + 1).to_le_bytes().as_slice())?;
        }
        Ok(self.must_retire(next))
    }

    /// `when_full = drop-oldest`: deletes the oldest log records until `len`
    /// more bytes fit, and moves every cursor below the new first record up
    /// to it. Counted and logged (rate-limited) at ERROR: this is data loss
    /// the operator chose.
    fn drop_oldest(
        &mut self,
        txn: &redb::WriteTransaction,
        log: &mut redb::Table<u64, &[u8]>,
        cursors: &mut redb::Table<&str, u64>,
        next: &mut State,
        len: u64,
        max: u64,
    ) -> Result<(), redb::Error> {
        let mut dropped = 0u64;
        while next.live_bytes + next.dead_bytes + len > max {
            let Some((_, value)) = log.pop_first()? else {
                break;
            };
            next.live_bytes = next.live_bytes.saturating_sub(value.value().len() as u64);
            next.live_messages = next.live_messages.saturating_sub(1);
            dropped += 1;
        }
        next.first_seq = log.first()?.map_or(0, |(k, _)| k.value());
        let floor = if next.first_seq == 0 {
            next.next_seq
        } else {
            next.first_seq
        };
        // Like retirement: seqs below the floor are never handed out again.
        txn.open_table(META)?
            .insert(RETIRED_BELOW_KEY, floor.to_le_bytes().as_slice())?;
        for (name, at) in next.cursors.iter_mut() {
            if *at < floor {
                *at = floor;
                cursors.insert(name.as_str(), floor)?;
            }
        }
        for name in &self.shared.options.cursors {
            if !next.cursors.contains_key(name) {
                next.cursors.insert(name.clone(), floor);
                cursors.insert(name.as_str(), floor)?;
            }
        }
        metrics::counter!("edge_messages_dropped_total", "reason" => "drop_oldest")
            .increment(dropped);
        let first_seq = next.first_seq;
        DROPPED.record_n("drop_oldest", dropped, || {
            format!("first_seq={first_seq} max_bytes={max}")
        });
        Ok(())
    }

    /// One refused append: one count in both counters, one summarised line.
    fn refuse_full(&mut self, reason: FullReason, used: u64, max: u64, len: u64) {
        metrics::counter!("edge_store_rejected_total", "reason" => reason.label()).increment(1);
        metrics::counter!("edge_messages_dropped_total", "reason" => "store_full").increment(1);
        REFUSED.record(reason.label(), || {
            format!("used_bytes={used} max_bytes={max} record_bytes={len} ({reason})")
        });
        self.refused_in_batch = Some(reason);
    }

    /// The bytes the store may hold now, and what sets that bound.
    fn limit(&self) -> (u64, FullReason) {
        let quota = self.shared.options.max_bytes;
        if self.disk.critical || self.disk.closed {
            return (0, FullReason::Disk);
        }
        match self.disk.cap {
            Some(cap) if cap < quota => (cap, FullReason::Disk),
            _ => (quota, FullReason::Quota),
        }
    }

    /// Reads the filesystem's free space before a batch of appends.
    fn check_space(&mut self) {
        let min_free = self.shared.options.min_free;
        let Some(dir) = self.shared.data_dir.as_deref() else {
            return;
        };
        if min_free == 0 && self.disk.cap.is_none() {
            return;
        }
        let available = match space::available(dir) {
            Ok(a) => a,
            // Unknown: rely on out-of-space errors.
            Err(_) => return,
        };
        if available >= min_free.max(space::ROOM_AGAIN) {
            if self.disk.cap.take().is_some() {
                tracing::info!(
                    available,
                    min_free,
                    "Filesystem has room again: the store.max_bytes quota applies."
                );
            }
            self.disk.critical = false;
            return;
        }
        if available >= min_free {
            // Only a cap left by an out-of-space commit, not yet lifted.
            return;
        }
        let used = self.state.live_bytes.saturating_add(self.state.dead_bytes);
        let cap = *self.disk.cap.get_or_insert(used);
        self.disk.critical = available < min_free / 2;
        let critical = self.disk.critical;
        DISK.record(if critical { "critical" } else { "low" }, || {
            format!(
                "available={available} min_free={min_free} held_bytes={cap} refuse_all={critical}"
            )
        });
    }

    /// A commit ran out of space: refuse its appends like a full quota
    /// (nothing of the batch is stored; what was stored is untouched), fail
    /// its other ops (their callers retry), and reopen the database, which
    /// redb requires after an I/O error. The store stays up.
    fn out_of_space(
        &mut self,
        error: &redb::Error,
        ops: std::vec::IntoIter<Op>,
        pending: Vec<Pending>,
        close: &mut Option<oneshot::Sender<()>>,
    ) {
        let used = self.state.live_bytes.saturating_add(self.state.dead_bytes);
        let cap = self.disk.cap.map_or(used, |c| c.min(used));
        self.disk.cap = Some(cap);
        tracing::warn!(%error, used_bytes = used, "A commit ran out of disk space: its messages are refused as store full, and the store is reopened.");
        let msg = format!("no space left on the store's filesystem: {error}");
        let refuse =
            |me: &mut Writer, reply: oneshot::Sender<Result<Seq, AppendError>>, len: u64| {
                me.refuse_full(FullReason::Disk, used, cap, len);
                if me.state.dead_bytes.saturating_add(len) <= cap {
                    me.waiting_for = me.waiting_for.max(Some(len));
                }
                let _ = reply.send(Err(AppendError::Full {
                    reason: FullReason::Disk,
                    live_bytes: used,
                    max_bytes: cap,
                    record_bytes: len,
                }));
            };
        for p in pending {
            match p {
                Pending::Append(reply, _, len) => refuse(self, reply, len),
                Pending::Done(reply) => {
                    let _ = reply.send(Err(StoreError::Write(msg.clone())));
                }
                Pending::Count(reply, _) => {
                    let _ = reply.send(Err(StoreError::Write(msg.clone())));
                }
            }
        }
        for op in ops {
            match op {
                Op::Append { bytes, reply } => refuse(self, reply, bytes.len() as u64),
                other => fail_op(other, &msg, close),
            }
        }
        self.report_full(0);
        self.disk.closed = true;
        self.reopen();
    }

    /// The database is closed (out of space, not yet reopened): refuse
    /// appends as full, fail the rest.
    fn refuse_closed(&mut self, ops: Vec<Op>, close: &mut Option<oneshot::Sender<()>>) {
        let used = self.state.live_bytes.saturating_add(self.state.dead_bytes);
        let msg = "the store is being reopened after running out of disk space".to_string();
        for op in ops {
            match op {
                Op::Append { bytes, reply } => {
                    let len = bytes.len() as u64;
                    self.refuse_full(FullReason::Disk, used, 0, len);
                    let _ = reply.send(Err(AppendError::Full {
                        reason: FullReason::Disk,
                        live_bytes: used,
                        max_bytes: 0,
                        record_bytes: len,
                    }));
                }
                other => fail_op(other, &msg, close),
            }
        }
        self.report_full(0);
    }

    /// Drops the database and opens it again (redb's recovery runs on
    /// open). Waits up to [`REOPEN_WAIT`] for readers that still hold the
    /// old one. Returns whether the store is open; if not, the next batch
    /// tries again, and a failure that is not lack of space stops the store.
    fn reopen(&mut self) -> bool {
        let Some(reopen) = self.shared.reopen.as_ref() else {
            return false;
        };
        let mut slot = self
            .shared
            .db
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        drop(slot.take());
        let deadline = Instant::now() + REOPEN_WAIT;
        loop {
            match reopen() {
                Ok(db) => {
                    *slot = Some(Arc::new(db));
                    self.disk.closed = false;
                    self.retire_pending = true;
                    tracing::info!("Store reopened after running out of disk space.");
                    return true;
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    let e = redb::Error::from(e);
                    if space::is_no_space(&e) || matches!(e, redb::Error::DatabaseAlreadyOpen) {
                        self.disk.closed = true;
                        return false;
                    }
                    let msg = format!("cannot reopen the store after running out of space: {e}");
                    tracing::error!(error = %e, "Cannot reopen the store after running out of space; it takes no more writes.");
                    metrics::counter!("edge_store_commit_failures_total").increment(1);
                    self.shared.failure.send_replace(Some(msg));
                    self.disk.closed = true;
                    return false;
                }
            }
        }
    }

    /// Keeps the `full` watch true to what this batch did.
    fn report_full(&mut self, appended: u64) {
        match self.refused_in_batch {
            Some(reason) => {
                let text = reason.to_string();
                if self.shared.full.borrow().as_deref() != Some(text.as_str()) {
                    self.shared.full.send_replace(Some(text));
                }
            }
            None if appended > 0 && self.shared.full.borrow().is_some() => {
                self.shared.full.send_replace(None);
            }
            None => {}
        }
    }

    fn publish_stats(&self) {
        let s = &self.state;
        let stats = StoreStats {
            first_seq: s.first_seq,
            next_seq: s.next_seq,
            live_messages: s.live_messages,
            live_bytes: s.live_bytes,
            dead_letters: s.dead_letters,
            dead_letter_bytes: s.dead_bytes,
            max_bytes: self.shared.options.max_bytes,
        };
        metrics::gauge!("edge_store_dead_letters").set(s.dead_letters as f64);
        metrics::gauge!("edge_store_dead_letter_bytes").set(s.dead_bytes as f64);
        metrics::gauge!("edge_store_live_bytes").set(s.live_bytes as f64);
        metrics::gauge!("edge_store_live_messages").set(s.live_messages as f64);
        match self.shared.stats.lock() {
            Ok(mut g) => *g = stats,
            Err(poisoned) => *poisoned.into_inner() = stats,
        }
    }
}

/// Fails an op that is not an append with `msg` (a close is kept).
fn fail_op(op: Op, msg: &str, close: &mut Option<oneshot::Sender<()>>) {
    match op {
        Op::Append { reply, .. } => {
            let _ = reply.send(Err(AppendError::Io(msg.to_string())));
        }
        Op::AdvanceCursor { reply, .. }
        | Op::Park { reply, .. }
        | Op::SetGatewayId { reply, .. } => {
            let _ = reply.send(Err(StoreError::Write(msg.to_string())));
        }
        Op::DeadLetters { reply, .. } => {
            let _ = reply.send(Err(StoreError::Write(msg.to_string())));
        }
        Op::Close { reply } => *close = Some(reply),
    }
}
