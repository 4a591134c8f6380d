//! The writer thread: the only owner of redb write transactions.
//!
//! It takes one op from the inbox, drains whatever else is pending (up to the
//! batch limits), applies all of it in one write transaction (`apply.rs`),
//! makes it durable — one frame appended to the journal and synced, then a
//! `Durability::None` redb commit; or, without a journal and at each
//! checkpoint, a `Durability::Immediate` commit (`journal.rs`) — and only
//! then completes the replies. Seqs are assigned here, in inbox order. Disk space
//! is `disk.rs`.

pub(crate) mod age;
mod apply;
pub(crate) mod defer;
mod disk;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::dead::Meta;
use crate::journal::Journal;
use crate::tables::{Loaded, Stats};
use crate::{AppendError, FullReason, Retain, Seq, Shared, StoreError, StoreStats, space};

/// Most log records one retirement pass deletes (a transaction makes at
/// most two: one before its first append behind cursor moves, one at its
/// end), so one commit stays short; the rest is retired by the following
/// transactions.
pub(crate) const RETIRE_PER_TXN: usize = 10_000;
/// Longest wait for stragglers when a batch came out much smaller than the
/// one before (see [`Writer::linger`]).
const LINGER: Duration = Duration::from_micros(500);
const LINGER_STEP: Duration = Duration::from_micros(50);
/// How long a reopen waits for readers still holding the old database.
const REOPEN_WAIT: Duration = Duration::from_secs(5);
/// While refusing with an empty inbox: how often the writer looks at its
/// inbox, and how often it reads the free space again (room can come back
/// from outside, another process freeing the disk, with no op to commit).
const FULL_POLL: Duration = Duration::from_millis(20);
const ROOM_RECHECK: Duration = Duration::from_secs(1);

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

type Done = oneshot::Sender<Result<(), StoreError>>;

/// One append: a message for the log and/or the retained table, and the
/// queues that reference it.
pub(crate) struct AppendOp {
    pub bytes: bytes::Bytes,
    /// Append to the log (false: only the retained table is written).
    pub log: bool,
    pub queues: Vec<u64>,
    pub retain: Option<Retain>,
    pub dedup: Option<String>,
    pub reply: oneshot::Sender<Result<Seq, AppendError>>,
}

pub(crate) enum Op {
    Append(AppendOp),
    AdvanceCursor {
        name: String,
        next: Seq,
        /// May wait for another batch to commit with (`defer.rs`).
        lazy: bool,
        reply: Done,
    },
    /// Creates a cursor at the next seq (no-op if it exists).
    CreateCursor {
        name: String,
        reply: Done,
    },
    DropCursor {
        name: String,
        reply: Done,
    },
    Park {
        seq: Seq,
        meta: Meta,
        record: bytes::Bytes,
        reply: Done,
    },
    /// Purges or replays up to `max` dead letters, oldest first; with
    /// `only`, just those seqs (in the order given; absent ones skipped).
    DeadLetters {
        action: DeadLetterAction,
        max: usize,
        only: Option<Vec<Seq>>,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    /// Records the gateway's identity in `meta`.
    SetGatewayId {
        id: String,
        reply: Done,
    },
    /// Returns the id of the queue `name`, creating it if needed.
    CreateQueue {
        name: String,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    /// Deletes a queue and every entry in it.
    DeleteQueue {
        name: String,
        reply: Done,
    },
    /// Removes entries (acknowledged, or given up).
    QueueAck {
        queue: u64,
        seqs: Vec<Seq>,
        reply: Done,
    },
    /// Sets the owner's state of an entry (e.g. sent, packet id).
    QueueSet {
        queue: u64,
        seq: Seq,
        state: u32,
        reply: Done,
    },
    PutSession {
        id: String,
        value: Vec<u8>,
        reply: Done,
    },
    DeleteSession {
        id: String,
        reply: Done,
    },
    PutDefinition {
        key: String,
        value: Vec<u8>,
        reply: Done,
    },
    DeleteDefinition {
        key: String,
        reply: Done,
    },
    ReleaseDedup {
        key: String,
        prefix: bool,
        reply: Done,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
    /// From the `max_age` ticker: sweep if anything is due.
    Tick,
}

impl Op {
    fn bytes(&self) -> usize {
        match self {
            Op::Append(a) => a.bytes.len(),
            Op::Park { record, .. } => record.len(),
            Op::SetGatewayId { id, .. } => id.len(),
            Op::PutSession { value, .. } | Op::PutDefinition { value, .. } => value.len(),
            Op::QueueAck { seqs, .. } => seqs.len() * 16,
            _ => 0,
        }
    }
}

/// A reply held until its batch is durable.
enum Pending {
    /// Reply, seq, encoded length.
    Append(oneshot::Sender<Result<Seq, AppendError>>, Seq, u64),
    Done(Done),
    Count(oneshot::Sender<Result<u64, StoreError>>, u64),
}

impl Pending {
    fn complete(self) {
        match self {
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

    fn fail(self, msg: &str) {
        match self {
            Pending::Append(reply, ..) => {
                let _ = reply.send(Err(AppendError::Io(msg.to_string())));
            }
            Pending::Done(reply) => {
                let _ = reply.send(Err(StoreError::Write(msg.to_string())));
            }
            Pending::Count(reply, _) => {
                let _ = reply.send(Err(StoreError::Write(msg.to_string())));
            }
        }
    }
}

/// What [`Op::DeadLetters`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeadLetterAction {
    /// Delete them.
    Purge,
    /// Append their records to the log again (new seqs, marked as replays
    /// of their original seq for the upstreams that parked them); then
    /// delete them.
    Replay,
}

/// The figures a batch changes, applied only once it committed.
#[derive(Debug, Clone)]
struct State {
    first_seq: Seq,
    next_seq: Seq,
    stats: Stats,
    cursors: BTreeMap<String, Seq>,
    /// Seqs that queue entries reference: retirement keeps them.
    held: BTreeSet<Seq>,
    /// Every record below it that no queue references is retired.
    retired_upto: Seq,
    queues: BTreeMap<String, u64>,
    /// The ids in `queues`: an append makes entries in these only.
    queue_ids: BTreeSet<u64>,
    next_queue_id: u64,
    /// The `ages` table (`age.rs`), oldest first.
    marks: VecDeque<(u64, Seq)>,
    /// Records below it were swept for age (those queues hold stay).
    aged_below: Seq,
}

impl State {
    /// Bytes counted toward the quota: log, dead letters, retained.
    fn used(&self) -> u64 {
        self.stats
            .live_bytes
            .saturating_add(self.stats.dead_bytes)
            .saturating_add(self.stats.retained_bytes)
    }

    /// Bytes that retiring the log cannot free.
    fn pinned(&self) -> u64 {
        self.stats
            .dead_bytes
            .saturating_add(self.stats.retained_bytes)
    }
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Op>,
    state: State,
    retire_pending: bool,
    /// Ops in the previous batch.
    last_batch: usize,
    /// What the largest append refused at the quota would have added
    /// (`apply.rs`, `quota_bytes`), if that could fit once the log is
    /// retired. Until it would fit, every append is refused, so a small
    /// message cannot slip in after a refused larger one of the same
    /// publisher (which would reorder that publisher once it retries).
    /// Appends that could never fit (more than the quota less the dead
    /// letters and retained messages) do not count, or the store would
    /// refuse everything for ever.
    waiting_for: Option<u64>,
    disk: Disk,
    /// Set when an append of the current batch was refused.
    refused_in_batch: Option<FullReason>,
    /// When the free space was last read while idle and refusing.
    room_checked: Instant,
    /// The write-ahead journal; `None`: every batch is a durable redb commit.
    journal: Option<Journal>,
    /// The next batch is a checkpoint (the writer is stopping).
    checkpoint_due: bool,
    /// The last batch of the writer's run: its checkpoint marks the store
    /// closed cleanly (`meta["closed"]`).
    closing: bool,
    /// The clock when the current batch began (unix ms).
    now: u64,
    /// Lazy cursor moves held for the next batch (`defer.rs`), and since
    /// when.
    deferred: Vec<Op>,
    deferred_since: Option<Instant>,
    /// Wakes the writer when held moves are due; `None`: nothing is held.
    alarm: Option<Arc<defer::Alarm>>,
}

impl Drop for Writer {
    /// The alarm thread goes with the writer, however the writer ends (a
    /// panic, or a writer thread that never started).
    fn drop(&mut self) {
        if let Some(alarm) = &self.alarm {
            alarm.stop();
        }
    }
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
    pub(crate) fn new(
        shared: Arc<Shared>,
        rx: mpsc::Receiver<Op>,
        loaded: Loaded,
        journal: Option<Journal>,
        alarm: Option<Arc<defer::Alarm>>,
    ) -> Writer {
        Writer {
            shared,
            rx,
            state: State {
                first_seq: loaded.first_seq,
                next_seq: loaded.next_seq,
                stats: loaded.stats,
                cursors: loaded.cursors,
                held: loaded.held,
                retired_upto: loaded.retired_upto,
                queue_ids: loaded.queues.values().copied().collect(),
                queues: loaded.queues,
                next_queue_id: loaded.next_queue_id,
                marks: loaded.marks,
                aged_below: 0,
            },
            // Retirement may have been cut short before a restart.
            retire_pending: true,
            last_batch: 0,
            waiting_for: None,
            disk: Disk::default(),
            refused_in_batch: None,
            room_checked: Instant::now(),
            journal,
            checkpoint_due: false,
            closing: false,
            now: 0,
            deferred: Vec::new(),
            deferred_since: None,
            alarm,
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
                        let batch = self.with_deferred(Vec::new());
                        self.commit_batch(batch);
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            } else if self.shared.full.borrow().is_some() {
                match self.rx.try_recv() {
                    Ok(op) => op,
                    Err(mpsc::error::TryRecvError::Empty) if !self.deferred.is_empty() => {
                        // Held moves make the room.
                        let batch = self.with_deferred(Vec::new());
                        self.commit_batch(batch);
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => {
                        self.recheck_room();
                        std::thread::sleep(FULL_POLL);
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
            // The clock `defer` weighs an age sweep by.
            self.now = (self.shared.clock)();
            let batch = self.defer(batch);
            if batch.is_empty() {
                continue;
            }
            close_reply = self.commit_batch(batch);
            if close_reply.is_some() {
                break;
            }
        }
        // Ops still queued behind a close resolve as `Closed` when dropped.
        self.rx.close();
        // The last handle went without a close: fold the journal now, so
        // the next open has nothing to replay.
        // Always, with a journal: that checkpoint marks the close clean.
        if close_reply.is_none() && (self.journal.is_some() || !self.deferred.is_empty()) {
            self.checkpoint_due = true;
            self.closing = true;
            let batch = self.with_deferred(Vec::new());
            self.commit_batch(batch);
        }
        tracing::debug!(next_seq = self.state.next_seq, "Store writer stopped.");
        if let Some(reply) = close_reply {
            // The database goes with the close, not with the last handle
            // of the store: a handle some task still holds (a background
            // ack finishing) must not keep the file locked for the next
            // opener (an in-process restart).
            drop(
                self.shared
                    .db
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take(),
            );
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
        self.now = (self.shared.clock)();
        let ticks_only = ops.iter().all(|op| matches!(op, Op::Tick));
        if ticks_only
            && !self.must_retire(&self.state)
            && !self.checkpoint_due
            && self.expired_below(&self.state).is_none()
        {
            if ops.is_empty() {
                self.retire_pending = false;
            }
            return None;
        }
        let started = Instant::now();
        let mut next = self.state.clone();
        let mut pending = Vec::with_capacity(ops.len());
        let mut close = None;
        let mut appended = 0u64;
        self.refused_in_batch = None;
        // While refusing, every commit re-reads the free space: room can come
        // back with a retirement, not only with the next append.
        if self.shared.full.borrow().is_some() || ops.iter().any(|op| matches!(op, Op::Append(_))) {
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
                // The watch moves before the replies go out, so whoever
                // holds an acknowledged seq finds the watch at or past it.
                if appended > 0 {
                    self.shared.committed.send_replace(self.state.next_seq - 1);
                }
                for p in pending {
                    p.complete();
                }
            }
            Err(e) if space::is_no_space(&e) && self.shared.reopen.is_some() => {
                self.out_of_space(&e, ops, pending, &mut close);
            }
            Err(e) => {
                self.retire_pending = false;
                let msg = e.to_string();
                metrics::counter!("edge_store_commit_failures_total").increment(1);
                if self.shared.failure.borrow().is_none() {
                    tracing::error!(error = %e, ops = pending.len(),
                        "Store commit failed: nothing in the batch was acknowledged, and the store takes no more writes until it is reopened.");
                }
                self.shared.failure.send_replace(Some(msg.clone()));
                for p in pending {
                    p.fail(&msg);
                }
                // Ops the failure cut off fail the same way.
                for op in ops {
                    fail_op(op, &msg, &mut close);
                }
            }
        }
        close
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

    /// Keeps the `full` watch true to what this batch did: set by a
    /// refusal, cleared by an accepted append or as soon as retirement (a
    /// cursor moved, a queue entry acknowledged) or the filesystem made room
    /// for what the refused append would add, so that watchers (AMQP's
    /// `connection.unblocked`, `/healthz`) learn it without waiting for a
    /// publisher to try again.
    fn report_full(&mut self, appended: u64) {
        match self.refused_in_batch {
            Some(reason) if *self.shared.full.borrow() != Some(reason) => {
                self.shared.full.send_replace(Some(reason));
            }
            Some(_) => {}
            None if self.shared.full.borrow().is_some()
                && (appended > 0 || self.room_for_refused()) =>
            {
                self.shared.full.send_replace(None);
            }
            None => {}
        }
    }

    /// Idle while refusing: reads the free space (at most every
    /// [`ROOM_RECHECK`]) and clears the `full` watch once there is room.
    fn recheck_room(&mut self) {
        if self.room_checked.elapsed() < ROOM_RECHECK {
            return;
        }
        self.room_checked = Instant::now();
        self.check_space();
        if self.room_for_refused() {
            self.shared.full.send_replace(None);
        }
    }

    /// Whether the next append would be taken: room for the largest refused
    /// one (see `waiting_for`), else for at least a byte.
    fn room_for_refused(&self) -> bool {
        let (max, _) = self.limit();
        let need = self.waiting_for.unwrap_or(1);
        self.state.used().saturating_add(need) <= max
    }

    fn publish_stats(&self) {
        let s = &self.state;
        let stats = StoreStats {
            first_seq: s.first_seq,
            next_seq: s.next_seq,
            live_messages: s.stats.live_messages,
            live_bytes: s.stats.live_bytes,
            dead_letters: s.stats.dead_letters,
            dead_letter_bytes: s.stats.dead_bytes,
            retained: s.stats.retained,
            retained_bytes: s.stats.retained_bytes,
            max_bytes: self.shared.options.max_bytes,
        };
        metrics::gauge!("edge_store_dead_letters").set(s.stats.dead_letters as f64);
        metrics::gauge!("edge_store_dead_letter_bytes").set(s.stats.dead_bytes as f64);
        metrics::gauge!("edge_store_live_bytes").set(s.stats.live_bytes as f64);
        metrics::gauge!("edge_store_live_messages").set(s.stats.live_messages as f64);
        metrics::gauge!("edge_store_retained_messages").set(s.stats.retained as f64);
        match self.shared.stats.lock() {
            Ok(mut g) => *g = stats,
            Err(poisoned) => *poisoned.into_inner() = stats,
        }
    }
}

/// Fails an op with `msg` (a close is kept).
fn fail_op(op: Op, msg: &str, close: &mut Option<oneshot::Sender<()>>) {
    let err = || StoreError::Write(msg.to_string());
    match op {
        Op::Append(a) => {
            let _ = a.reply.send(Err(AppendError::Io(msg.to_string())));
        }
        Op::AdvanceCursor { reply, .. }
        | Op::CreateCursor { reply, .. }
        | Op::DropCursor { reply, .. }
        | Op::Park { reply, .. }
        | Op::SetGatewayId { reply, .. }
        | Op::DeleteQueue { reply, .. }
        | Op::QueueAck { reply, .. }
        | Op::QueueSet { reply, .. }
        | Op::PutSession { reply, .. }
        | Op::DeleteSession { reply, .. }
        | Op::PutDefinition { reply, .. }
        | Op::DeleteDefinition { reply, .. }
        | Op::ReleaseDedup { reply, .. } => {
            let _ = reply.send(Err(err()));
        }
        Op::DeadLetters { reply, .. } => {
            let _ = reply.send(Err(err()));
        }
        Op::CreateQueue { reply, .. } => {
            let _ = reply.send(Err(err()));
        }
        Op::Close { reply } => *close = Some(reply),
        Op::Tick => {}
    }
}
