//! The writer's side of disk space (see `space.rs`): the free-space check
//! before a batch, a commit that ran out of space, and reopening redb.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{DISK, Disk, Op, Pending, REOPEN_WAIT, Writer, fail_op};
use crate::{AppendError, FullReason, Seq, Shared, space};

impl Writer {
    /// Reads the filesystem's free space before a batch of appends.
    pub(super) fn check_space(&mut self) {
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
        let used = self.state.used();
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
    pub(super) fn out_of_space(
        &mut self,
        error: &redb::Error,
        ops: std::vec::IntoIter<Op>,
        pending: Vec<Pending>,
        close: &mut Option<oneshot::Sender<()>>,
    ) {
        let used = self.state.used();
        let cap = self.disk.cap.map_or(used, |c| c.min(used));
        self.disk.cap = Some(cap);
        tracing::warn!(%error, used_bytes = used, "A commit ran out of disk space: its messages are refused as store full, and the store is reopened.");
        let msg = format!("no space left on the store's filesystem: {error}");
        let refuse =
            |me: &mut Writer, reply: oneshot::Sender<Result<Seq, AppendError>>, len: u64| {
                me.refuse_full(FullReason::Disk, used, cap, len);
                if me.state.pinned().saturating_add(len) <= cap {
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
                other => other.fail(&msg),
            }
        }
        for op in ops {
            match op {
                Op::Append(a) => refuse(self, a.reply, a.bytes.len() as u64),
                other => fail_op(other, &msg, close),
            }
        }
        self.report_full(0);
        self.disk.closed = true;
        self.reopen();
    }

    /// The database is closed (out of space, not yet reopened): refuse
    /// appends as full, fail the rest.
    pub(super) fn refuse_closed(&mut self, ops: Vec<Op>, close: &mut Option<oneshot::Sender<()>>) {
        let used = self.state.used();
        let msg = "the store is being reopened after running out of disk space".to_string();
        for op in ops {
            match op {
                Op::Append(a) => {
                    let len = a.bytes.len() as u64;
                    self.refuse_full(FullReason::Disk, used, 0, len);
                    let _ = a.reply.send(Err(AppendError::Full {
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
    pub(super) fn reopen(&mut self) -> bool {
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
                    // The reopened database is at its last checkpoint: the
                    // journal brings back what was acknowledged since.
                    if let Some(journal) = self.journal.as_mut()
                        && let Err(e) = crate::journal::recover(&db, journal)
                    {
                        let what = "cannot replay the store journal after reopening";
                        return reopen_failed(&mut self.disk, &self.shared, &e, what);
                    }
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
                    let what = "cannot reopen the store after running out of space";
                    return reopen_failed(&mut self.disk, &self.shared, &e, what);
                }
            }
        }
    }
}

/// The database stays closed: for now when the disk is still full (the
/// next batch tries again), for good otherwise (the store failed). Returns
/// false, what [`Writer::reopen`] returns then.
fn reopen_failed(disk: &mut Disk, shared: &Shared, e: &redb::Error, what: &str) -> bool {
    disk.closed = true;
    if space::is_no_space(e) || matches!(e, redb::Error::DatabaseAlreadyOpen) {
        return false;
    }
    tracing::error!(error = %e, "{what}; the store takes no more writes.");
    metrics::counter!("edge_store_commit_failures_total").increment(1);
    shared.failure.send_replace(Some(format!("{what}: {e}")));
    false
}
