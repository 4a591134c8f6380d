//! One batch inside one write transaction.

use std::collections::BTreeSet;

use redb::{Durability, ReadableTable};
use tokio::sync::oneshot;

use super::{AppendOp, DROPPED, DeadLetterAction, Op, Pending, RETIRE_PER_TXN, State, Writer};
use crate::dead::{self, Replay};
use crate::journal::{Changes, Tables};
use crate::tables::{
    CLOSED_KEY, GATEWAY_ID_KEY, JOURNAL_KEY, NEXT_QUEUE_KEY, RETIRED_BELOW_KEY, STATS_KEY,
};
use crate::{AppendError, Retain, Seq, StoreError, WhenFull};

/// An error that must not be taken for "out of space" (which makes the
/// writer refuse the batch and reopen redb): the batch is in the journal
/// already, so it will be back after a restart.
fn after_journal(e: impl Into<redb::Error>) -> redb::Error {
    match e.into() {
        redb::Error::Io(io) => redb::Error::Io(std::io::Error::other(io.to_string())),
        other => other,
    }
}

impl Writer {
    /// Writes the batch and commits. Returns whether retirement was cut short.
    ///
    /// With a journal, the transaction commits with `Durability::None` once
    /// its changes are synced in the journal; a batch whose changes do not
    /// fit in the journal's epoch, one that closes the store, or one after
    /// [`Writer::checkpoint_due`] is a checkpoint instead: committed with
    /// `Durability::Immediate` and starting the next epoch in the same
    /// commit.
    pub(super) fn apply(
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
        let changes = Changes::default();
        let more;
        let checkpoint;
        {
            let c = &changes;
            let mut t = Tables::open(&txn, c)?;
            let mut refused = false;
            let mut moved = false;
            let mut retired_early = false;
            for op in ops.by_ref() {
                if moved && !retired_early && matches!(op, Op::Append(_)) {
                    // The room the cursor moves ahead of this append make
                    // (held ones lead the batch) counts for it and the
                    // appends after it: retire first, or it would be refused
                    // (or, with drop-oldest, drop what was just confirmed).
                    // Once per batch: a transaction retires at most two
                    // passes of RETIRE_PER_TXN.
                    self.retire(&mut t, next)?;
                    retired_early = true;
                }
                moved |= matches!(op, Op::AdvanceCursor { .. });
                self.apply_op(&mut t, op, next, pending, close, appended, &mut refused)?;
            }
            let aged_more = self.age_out(&mut t, next)?;
            more = self.retire(&mut t, next)? || aged_more;
            t.meta.insert(STATS_KEY, next.stats.encode().as_slice())?;
            checkpoint = match &self.journal {
                None => None,
                Some(j) if self.checkpoint_due || close.is_some() || !j.fits(c.borrow().len()) => {
                    Some(j.next_epoch_value())
                }
                Some(_) => None,
            };
            if let Some(epoch) = &checkpoint {
                t.meta.insert(JOURNAL_KEY, epoch.as_slice())?;
                if close.is_some() || self.closing {
                    t.meta.insert(CLOSED_KEY, [1u8].as_slice())?;
                }
            }
        }
        match self.journal.as_mut() {
            Some(journal) if checkpoint.is_none() => {
                txn.set_durability(Durability::None)?;
                if let Err(e) = journal.append(changes.borrow().as_bytes()) {
                    // Dropping the transaction rolls it back.
                    return Err(redb::Error::Io(std::io::Error::other(format!(
                        "store journal: {e}"
                    ))));
                }
                txn.commit().map_err(after_journal)?;
            }
            journal => {
                txn.set_durability(Durability::Immediate)?;
                if journal.is_some() {
                    txn.set_quick_repair(true);
                }
                txn.commit()?;
                if let Some(journal) = journal {
                    journal.start_next_epoch();
                    self.checkpoint_due = false;
                }
            }
        }
        Ok(more)
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_op(
        &mut self,
        t: &mut Tables<'_>,
        op: Op,
        next: &mut State,
        pending: &mut Vec<Pending>,
        close: &mut Option<oneshot::Sender<()>>,
        appended: &mut u64,
        refused: &mut bool,
    ) -> Result<(), redb::Error> {
        match op {
            Op::Append(a) => self.append(t, a, next, pending, appended, refused)?,
            Op::AdvanceCursor {
                name,
                next: to,
                reply,
                ..
            } => {
                let Some(old) = next.cursors.get(&name).copied() else {
                    let _ = reply.send(Err(StoreError::UnknownCursor { name }));
                    return Ok(());
                };
                // Never backwards, never past the next seq to be assigned.
                let to = to.min(next.next_seq).max(old);
                if to != old {
                    t.cursors.insert(name.as_str(), to)?;
                    next.cursors.insert(name, to);
                }
                pending.push(Pending::Done(reply));
            }
            Op::CreateCursor { name, reply } => {
                if !next.cursors.contains_key(&name) {
                    t.cursors.insert(name.as_str(), next.next_seq)?;
                    next.cursors.insert(name, next.next_seq);
                }
                pending.push(Pending::Done(reply));
            }
            Op::DropCursor { name, reply } => {
                if next.cursors.remove(&name).is_some() {
                    t.cursors.remove(name.as_str())?;
                }
                pending.push(Pending::Done(reply));
            }
            Op::Park {
                seq,
                meta,
                record,
                reply,
            } => {
                // Parked twice (by two upstreams): keep both names.
                let old = t
                    .dead
                    .get(seq)?
                    .and_then(|v| dead::decode(v.value()).map(|(m, _)| m));
                let meta = match old {
                    Some(old) => dead::merge(&old, &meta),
                    None => meta,
                };
                let value = dead::encode(&meta, &record);
                match t.dead.insert(seq, value.as_slice())? {
                    Some(old) => {
                        next.stats.dead_bytes = next
                            .stats
                            .dead_bytes
                            .saturating_sub(old.value().len() as u64);
                    }
                    None => next.stats.dead_letters += 1,
                }
                next.stats.dead_bytes += value.len() as u64;
                pending.push(Pending::Done(reply));
            }
            Op::DeadLetters {
                action,
                max,
                only,
                reply,
            } => {
                let mut done = 0u64;
                let mut only = only.map(Vec::into_iter);
                while (done as usize) < max {
                    let taken = match only.as_mut() {
                        None => t.dead.pop_first()?.map(|(_, v)| v.value().to_vec()),
                        Some(seqs) => match seqs.next() {
                            None => break,
                            Some(seq) => match t.dead.remove(seq)? {
                                Some(v) => Some(v.value().to_vec()),
                                None => continue,
                            },
                        },
                    };
                    let Some(value) = taken else { break };
                    next.stats.dead_letters = next.stats.dead_letters.saturating_sub(1);
                    next.stats.dead_bytes =
                        next.stats.dead_bytes.saturating_sub(value.len() as u64);
                    done += 1;
                    if action == DeadLetterAction::Replay {
                        // A value that does not decode was never written
                        // by this store: nothing to replay.
                        let Some((meta, record)) = dead::decode(&value) else {
                            continue;
                        };
                        let record = record.to_vec();
                        let seq = self.log_insert(t, next, &record)?;
                        let replay = Replay {
                            original_seq: meta.original_seq,
                            upstreams: meta.upstreams,
                        };
                        t.replays
                            .insert(seq, dead::encode_replay(&replay).as_slice())?;
                        *appended += 1;
                    }
                }
                pending.push(Pending::Count(reply, done));
            }
            Op::SetGatewayId { id, reply } => {
                t.meta.insert(GATEWAY_ID_KEY, id.as_bytes())?;
                pending.push(Pending::Done(reply));
            }
            Op::CreateQueue { name, reply } => {
                let id = match next.queues.get(&name) {
                    Some(id) => *id,
                    None => {
                        let id = next.next_queue_id;
                        next.next_queue_id += 1;
                        t.queues.insert(name.as_str(), id)?;
                        t.meta
                            .insert(NEXT_QUEUE_KEY, next.next_queue_id.to_le_bytes().as_slice())?;
                        next.queues.insert(name, id);
                        next.queue_ids.insert(id);
                        id
                    }
                };
                pending.push(Pending::Count(reply, id));
            }
            Op::DeleteQueue { name, reply } => {
                if let Some(id) = next.queues.remove(&name) {
                    next.queue_ids.remove(&id);
                    t.queues.remove(name.as_str())?;
                    let seqs: Vec<Seq> = t
                        .entries
                        .range((id, 0)..=(id, u64::MAX))?
                        .map(|e| e.map(|(k, _)| k.value().1))
                        .collect::<Result<_, _>>()?;
                    self.remove_entries(t, next, id, &seqs)?;
                }
                pending.push(Pending::Done(reply));
            }
            Op::QueueAck { queue, seqs, reply } => {
                self.remove_entries(t, next, queue, &seqs)?;
                pending.push(Pending::Done(reply));
            }
            Op::QueueSet {
                queue,
                seq,
                state,
                reply,
            } => {
                if t.entries.get((queue, seq))?.is_some() {
                    t.entries.insert((queue, seq), state)?;
                }
                pending.push(Pending::Done(reply));
            }
            Op::PutSession { id, value, reply } => {
                t.sessions.insert(id.as_str(), value.as_slice())?;
                pending.push(Pending::Done(reply));
            }
            Op::DeleteSession { id, reply } => {
                t.sessions.remove(id.as_str())?;
                pending.push(Pending::Done(reply));
            }
            Op::PutDefinition { key, value, reply } => {
                t.definitions.insert(key.as_str(), value.as_slice())?;
                pending.push(Pending::Done(reply));
            }
            Op::DeleteDefinition { key, reply } => {
                t.definitions.remove(key.as_str())?;
                pending.push(Pending::Done(reply));
            }
            Op::ReleaseDedup { key, prefix, reply } => {
                let dedup = &mut t.dedup;
                if prefix {
                    let keys: Vec<String> = dedup
                        .range(key.as_str()..)?
                        .map(|e| e.map(|(k, _)| k.value().to_string()))
                        .take_while(|k| k.as_ref().map_or(true, |k| k.starts_with(&key)))
                        .collect::<Result<_, _>>()?;
                    for k in keys {
                        dedup.remove(k.as_str())?;
                    }
                } else {
                    dedup.remove(key.as_str())?;
                }
                pending.push(Pending::Done(reply));
            }
            Op::Close { reply } => *close = Some(reply),
            Op::Tick => {}
        }
        Ok(())
    }

    fn append(
        &mut self,
        t: &mut Tables<'_>,
        a: AppendOp,
        next: &mut State,
        pending: &mut Vec<Pending>,
        appended: &mut u64,
        refused: &mut bool,
    ) -> Result<(), redb::Error> {
        let len = a.bytes.len() as u64;
        let adds = quota_bytes(t, &a)?;
        let (max, reason) = self.limit();
        let used = next.used();
        let fits = |n: u64| used.saturating_add(n) <= max;
        // Retiring the log can only ever make room for a record that fits
        // beside what retirement cannot free.
        let pinned = next.pinned();
        let can_fit = move |n: u64| pinned.saturating_add(n) <= max;
        if self.waiting_for.is_some_and(|w| fits(w) || !can_fit(w)) {
            self.waiting_for = None;
        }
        if self.shared.options.when_full == WhenFull::DropOldest
            && !*refused
            && !fits(adds)
            && can_fit(adds)
        {
            self.drop_oldest(t, next, adds, max)?;
        }
        let used = next.used();
        let fits = |n: u64| used.saturating_add(n) <= max;
        if *refused || self.waiting_for.is_some() || !fits(adds) {
            *refused = true;
            if can_fit(adds) && !fits(adds) {
                self.waiting_for = self.waiting_for.max(Some(adds));
            }
            self.refuse_full(reason, used, max, len);
            let _ = a.reply.send(Err(AppendError::Full {
                reason,
                live_bytes: used,
                max_bytes: max,
                record_bytes: len,
            }));
            return Ok(());
        }
        match &a.retain {
            Some(Retain::Set(topic)) => {
                let added = (topic.len() + a.bytes.len()) as u64;
                match t.retained.insert(topic.as_str(), a.bytes.as_ref())? {
                    Some(old) => {
                        let gone = (topic.len() + old.value().len()) as u64;
                        next.stats.retained_bytes = next.stats.retained_bytes.saturating_sub(gone);
                    }
                    None => next.stats.retained += 1,
                }
                next.stats.retained_bytes += added;
            }
            Some(Retain::Clear(topic)) => {
                if let Some(old) = t.retained.remove(topic.as_str())? {
                    let gone = (topic.len() + old.value().len()) as u64;
                    next.stats.retained_bytes = next.stats.retained_bytes.saturating_sub(gone);
                    next.stats.retained = next.stats.retained.saturating_sub(1);
                }
            }
            None => {}
        }
        if !a.log {
            pending.push(Pending::Append(a.reply, 0, len));
            return Ok(());
        }
        let seq = self.log_insert(t, next, &a.bytes)?;
        if let Some(key) = &a.dedup {
            t.dedup.insert(key.as_str(), seq)?;
        }
        // One entry per named queue that exists: a queue deleted while the
        // append waited in the inbox, or one named twice, must not leave a
        // reference no ack removes (the record would be held for ever).
        let queues: BTreeSet<u64> = a
            .queues
            .iter()
            .copied()
            .filter(|q| next.queue_ids.contains(q))
            .collect();
        if !queues.is_empty() {
            for q in &queues {
                t.entries.insert((*q, seq), 0)?;
            }
            t.refs.insert(seq, queues.len() as u32)?;
            next.held.insert(seq);
        }
        *appended += 1;
        pending.push(Pending::Append(a.reply, seq, len));
        Ok(())
    }

    fn log_insert(
        &self,
        t: &mut Tables<'_>,
        next: &mut State,
        bytes: &[u8],
    ) -> Result<Seq, redb::Error> {
        let seq = next.next_seq;
        t.log.insert(seq, bytes)?;
        self.mark_append(t, next, seq)?;
        next.next_seq += 1;
        next.stats.live_bytes += bytes.len() as u64;
        next.stats.live_messages += 1;
        if next.first_seq == 0 {
            next.first_seq = seq;
        }
        Ok(seq)
    }

    /// Removes queue entries; a record no entry references any more and that
    /// retirement has passed is deleted now.
    fn remove_entries(
        &self,
        t: &mut Tables<'_>,
        next: &mut State,
        queue: u64,
        seqs: &[Seq],
    ) -> Result<(), redb::Error> {
        for &seq in seqs {
            if t.entries.remove((queue, seq))?.is_none() {
                continue;
            }
            let refs = t.refs.get(seq)?.map_or(0, |v| v.value());
            if refs > 1 {
                t.refs.insert(seq, refs - 1)?;
                continue;
            }
            t.refs.remove(seq)?;
            next.held.remove(&seq);
            if seq < next.retired_upto {
                self.log_remove(t, next, seq)?;
            }
        }
        if next.first_seq != 0 {
            next.first_seq = t.log.first()?.map_or(0, |(k, _)| k.value());
        }
        Ok(())
    }

    pub(super) fn log_remove(
        &self,
        t: &mut Tables<'_>,
        next: &mut State,
        seq: Seq,
    ) -> Result<(), redb::Error> {
        if let Some(old) = t.log.remove(seq)? {
            let len = old.value().len() as u64;
            next.stats.live_bytes = next.stats.live_bytes.saturating_sub(len);
            next.stats.live_messages = next.stats.live_messages.saturating_sub(1);
        }
        t.replays.remove(seq)?;
        Ok(())
    }

    /// The seq below which no cursor needs records; with no cursor, 0
    /// (nothing retired) or, with `retire_without_cursors`, the next seq.
    pub(super) fn retire_below(&self, state: &State) -> Seq {
        let none = if self.shared.options.retire_without_cursors {
            state.next_seq
        } else {
            0
        };
        state.cursors.values().copied().min().unwrap_or(none)
    }

    pub(super) fn must_retire(&self, state: &State) -> bool {
        state.first_seq != 0 && state.retired_upto < self.retire_below(state)
    }

    /// Deletes records below the smallest cursor that no queue references,
    /// at most [`RETIRE_PER_TXN`].
    fn retire(&self, t: &mut Tables<'_>, next: &mut State) -> Result<bool, redb::Error> {
        if !self.must_retire(next) {
            return Ok(false);
        }
        let below = self.retire_below(next);
        let (upto, doomed) = self.delete_unheld(t, next, next.retired_upto, below)?;
        next.retired_upto = upto;
        next.first_seq = t.log.first()?.map_or(0, |(k, _)| k.value());
        if let Some(last) = doomed.last() {
            raise_retired_below(t, last + 1)?;
        }
        Ok(self.must_retire(next))
    }

    /// Deletes the log records in `from..below` that no queue entry holds,
    /// examining at most [`RETIRE_PER_TXN`]. Returns where it stopped
    /// (`below` when it got there) and the seqs deleted.
    pub(super) fn delete_unheld(
        &self,
        t: &mut Tables<'_>,
        next: &mut State,
        from: Seq,
        below: Seq,
    ) -> Result<(Seq, Vec<Seq>), redb::Error> {
        let mut upto = below;
        let mut doomed = Vec::new();
        for (examined, entry) in t.log.range(from..below)?.enumerate() {
            let (k, _) = entry?;
            let seq = k.value();
            if examined >= RETIRE_PER_TXN {
                upto = seq;
                break;
            }
            if !next.held.contains(&seq) {
                doomed.push(seq);
            }
        }
        for &seq in &doomed {
            self.log_remove(t, next, seq)?;
        }
        Ok((upto, doomed))
    }

    /// `when_full = drop-oldest`: deletes the oldest log records until `len`
    /// more bytes fit, and moves every cursor below the new first record up
    /// to it. A dropped record that queues referenced is dropped for them
    /// too (their entries then find no record and are skipped). Counted and
    /// logged (summarised) at ERROR: this is data loss the operator chose.
    fn drop_oldest(
        &mut self,
        t: &mut Tables<'_>,
        next: &mut State,
        len: u64,
        max: u64,
    ) -> Result<(), redb::Error> {
        let mut dropped = 0u64;
        while next.used().saturating_add(len) > max {
            let Some((key, value)) = t.log.pop_first()? else {
                break;
            };
            let seq = key.value();
            next.stats.live_bytes = next
                .stats
                .live_bytes
                .saturating_sub(value.value().len() as u64);
            next.stats.live_messages = next.stats.live_messages.saturating_sub(1);
            drop((key, value));
            t.replays.remove(seq)?;
            if next.held.remove(&seq) {
                t.refs.remove(seq)?;
            }
            dropped += 1;
        }
        next.first_seq = t.log.first()?.map_or(0, |(k, _)| k.value());
        let floor = if next.first_seq == 0 {
            next.next_seq
        } else {
            next.first_seq
        };
        next.retired_upto = next.retired_upto.max(floor);
        // Like retirement: seqs below the floor are never handed out again.
        t.meta
            .insert(RETIRED_BELOW_KEY, floor.to_le_bytes().as_slice())?;
        for (name, at) in next.cursors.iter_mut() {
            if *at < floor {
                *at = floor;
                t.cursors.insert(name.as_str(), floor)?;
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
}

/// Raises `retired_below` in `meta` to `floor` (never lowers it): seqs
/// below it are never handed out again.
pub(super) fn raise_retired_below(t: &mut Tables<'_>, floor: Seq) -> Result<(), redb::Error> {
    let old = t
        .meta
        .get(RETIRED_BELOW_KEY)?
        .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
        .map_or(0, u64::from_le_bytes);
    if floor > old {
        t.meta
            .insert(RETIRED_BELOW_KEY, floor.to_le_bytes().as_slice())?;
    }
    Ok(())
}

/// What an append adds to the bytes counted toward the quota: its record in
/// the log, and the retained message it sets (topic and record) less the
/// one it replaces or clears.
fn quota_bytes(t: &Tables<'_>, a: &AppendOp) -> Result<u64, redb::Error> {
    let len = a.bytes.len() as u64;
    let logged = if a.log { len } else { 0 };
    let Some(retain) = &a.retain else {
        return Ok(logged);
    };
    let topic = retain.topic();
    let replaced = t
        .retained
        .get(topic)?
        .map_or(0, |old| (topic.len() + old.value().len()) as u64);
    let set = match retain {
        Retain::Set(_) => topic.len() as u64 + len,
        Retain::Clear(_) => 0,
    };
    Ok((logged + set).saturating_sub(replaced))
}

impl Retain {
    /// The topic whose retained message this sets or clears.
    pub fn topic(&self) -> &str {
        match self {
            Retain::Set(t) | Retain::Clear(t) => t,
        }
    }
}
