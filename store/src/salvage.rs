//! Salvage: what can still be read out of a damaged database, copied into
//! a fresh one before the damaged file is moved aside (issue 9).
//!
//! The damaged file is opened read-only (redb's read-only open; a file
//! that was not closed cleanly, which that open refuses, is opened through
//! a copy-on-write [`overlay`] that keeps whatever redb writes in memory),
//! so it is kept byte for byte for forensics. After a crash such a file
//! opens without a repair, since checkpoints record the allocator state
//! (see "Recovery" in `lib.rs`); one whose last commit did not (written by
//! an older build) is repaired in memory, and redb's repair refuses a file
//! with a damaged page: that one cannot be salvaged
//! ([`SalvageError::Unreadable`]). Each table is copied range by
//! range around the pages that cannot be read (`scan.rs`), into a new
//! database `edge.redb.salvage` beside it. Then:
//!
//! 1. **Journal.** When the damaged `meta` names its journal epoch, the
//!    frames of that epoch that replay cleanly (the same rule as at open)
//!    are applied to what was salvaged: they are blind writes, so each
//!    restores the keys it wrote, damaged page or not. Without that `meta`
//!    entry the journal is not replayed (the epoch is unknown, and frames
//!    of an older epoch would write back older values); it is kept with
//!    the damaged file.
//! 2. **Consistency.** Queue entries whose queue is gone are dropped, and
//!    `refs` is rebuilt from the entries (never copied: a count that does
//!    not match its entries would keep a record for ever, or retire one a
//!    queue still needs). The live figures in `meta` are counted again
//!    from the tables.
//! 3. **Seqs.** `retired_below` becomes the highest of: the damaged
//!    store's `retired_below`, one past every salvaged seq (log, dead
//!    letters, replays, queue entries, dedup keys), every cursor, and the
//!    caller's seed (the gateway's clock seed, above any seq the damaged
//!    store could have handed out, since its last seqs may be on a lost
//!    page). So no seq, and no message id, is ever reused.
//!
//! Only then is the damaged file (and its journal) moved aside and the
//! salvaged one renamed into its place, so a crash at any step leaves
//! either the damaged file in place (the next start salvages again) or,
//! between the two renames, `edge.redb.salvage` without `edge.redb`,
//! which [`crate::Store::open`] takes as the store.
//!
//! What is reported ([`Salvage`]), per table: entries salvaged and entries
//! lost. Lost is exact for `log`, `dead_letters` and `retained` when the
//! damaged store's own figures (`meta["stats"]`, as of its last journal
//! frame) were readable: those figures minus what is there now. Otherwise,
//! and for `replays`, it is the seqs skipped over in damaged stretches (an
//! upper bound: a seq may never have been in the table; a stretch that runs
//! to the end of the table, whose size is unknowable, is not counted: see
//! `damaged`, and only the seed is then known to be above the lost seqs);
//! for the other
//! tables it is the number of damaged stretches (each lost at least one
//! key; a name-keyed table loses everything between its first and last
//! damaged page), plus, for `queue_entries`, the entries dropped for want
//! of their queue.

mod overlay;
mod report;
mod scan;
mod source;

use std::collections::{BTreeMap, BTreeSet};

use redb::{Database, Key, ReadableDatabase, ReadableTable, TableDefinition, Value};

use crate::tables::{
    self, AGES, CURSORS, DEAD_LETTERS, DEDUP, DEFINITIONS, JOURNAL_KEY, LOG, META, NEXT_QUEUE_KEY,
    QUEUE_ENTRIES, QUEUES, REFS, REPLAYS, RETAINED, RETIRED_BELOW_KEY, SCHEMA_KEY, SCHEMA_VERSION,
    SESSIONS, STATS_KEY, Stats,
};
use crate::{Seq, journal};
use scan::{Raw, Scanned};

pub(crate) use overlay::Overlay;
pub use report::{Salvage, SalvageError, TableSalvage};
use source::Reader;
pub(crate) use source::{Damaged, quietly};

/// Name of the database being salvaged into, beside the damaged one.
pub const SALVAGE_FILE: &str = "edge.redb.salvage";

/// The tables salvage copies, in the order it copies them (`meta` first:
/// a store of another schema is not salvaged). `refs` is rebuilt instead.
pub const TABLES: [&str; 12] = [
    "meta",
    "log",
    "cursors",
    "dead_letters",
    "replays",
    "retained",
    "sessions",
    "definitions",
    "queues",
    "queue_entries",
    "dedup",
    "ages",
];

/// Copies what can be read of `damaged` into `target` (a new, empty
/// database), replays its journal onto it and makes it consistent (see
/// the module documentation). `seed`: no seq below it is handed out.
pub(crate) fn salvage(
    damaged: &mut Damaged,
    target: &Database,
    seed: Seq,
) -> Result<Salvage, SalvageError> {
    let label = damaged.label.clone();
    let target_err = |source: redb::Error| SalvageError::Target {
        path: label.clone(),
        source,
    };
    let mut reader = Reader {
        open: &damaged.open,
        db: None,
        suspect: false,
    };
    reader.reopen().map_err(|source| SalvageError::Unreadable {
        path: damaged.label.clone(),
        source,
    })?;

    let mut scanned = BTreeMap::new();
    let meta = named(&mut reader, target, META).map_err(target_err)?;
    scanned.insert("meta", meta);
    if let Some(found) = schema_of(target).map_err(target_err)?
        && found != SCHEMA_VERSION.to_le_bytes()
    {
        return Err(SalvageError::Schema {
            path: damaged.label.clone(),
            found: format!("{found:02x?}"),
        });
    }
    let r = &mut reader;
    scanned.insert("log", seqs(r, target, LOG).map_err(target_err)?);
    scanned.insert("cursors", named(r, target, CURSORS).map_err(target_err)?);
    let dead = seqs(r, target, DEAD_LETTERS).map_err(target_err)?;
    scanned.insert("dead_letters", dead);
    scanned.insert("replays", seqs(r, target, REPLAYS).map_err(target_err)?);
    scanned.insert("retained", named(r, target, RETAINED).map_err(target_err)?);
    scanned.insert("sessions", named(r, target, SESSIONS).map_err(target_err)?);
    let definitions = named(r, target, DEFINITIONS).map_err(target_err)?;
    scanned.insert("definitions", definitions);
    scanned.insert("queues", named(r, target, QUEUES).map_err(target_err)?);
    let entries = seqs(r, target, QUEUE_ENTRIES).map_err(target_err)?;
    scanned.insert("queue_entries", entries);
    scanned.insert("dedup", named(r, target, DEDUP).map_err(target_err)?);
    scanned.insert("ages", seqs(r, target, AGES).map_err(target_err)?);
    drop(reader);

    let journal_frames = replay_journal(damaged, target);
    let finished = finish(target, seed).map_err(target_err)?;

    let mut report = Salvage {
        journal_frames,
        next_seq: finished.floor,
        ..Salvage::default()
    };
    for name in TABLES {
        let s = scanned.get(name).copied().unwrap_or_default();
        report.panics += s.panics;
        let skipped = u64::try_from(s.skipped).unwrap_or(u64::MAX);
        let by_figures = |expected: Option<u64>, now: u64| match expected {
            Some(expected) => expected.saturating_sub(now),
            None => skipped,
        };
        let figures = finished.figures;
        let lost = match name {
            "log" => by_figures(figures.map(|f| f.live_messages), finished.log),
            "dead_letters" => by_figures(figures.map(|f| f.dead_letters), finished.dead),
            "retained" => match figures {
                Some(f) => f.retained.saturating_sub(finished.retained),
                None => s.stretches,
            },
            "replays" => skipped,
            "queue_entries" => s.stretches + finished.orphans,
            _ => s.stretches,
        };
        report.tables.push(TableSalvage {
            table: name,
            salvaged: s.entries,
            lost,
            damaged: s.stretches,
        });
    }
    for t in &report.tables {
        metrics::counter!("edge_store_salvaged_total", "table" => t.table).increment(t.salvaged);
        metrics::counter!("edge_store_salvage_lost_total", "table" => t.table).increment(t.lost);
    }
    Ok(report)
}

/// Writes raw entries (as `scan.rs` read them) into `def` of `target`, in
/// one durable commit.
fn put_raw<K: Key + 'static, V: Value + 'static>(
    target: &Database,
    def: TableDefinition<K, V>,
    entries: Vec<Raw>,
) -> Result<(), redb::Error> {
    let txn = target.begin_write()?;
    {
        let mut table = txn.open_table(def)?;
        for (k, v) in &entries {
            table.insert(K::from_bytes(k), V::from_bytes(v))?;
        }
    }
    txn.commit()?;
    Ok(())
}

fn seqs<K: scan::NumKey, V: Value + 'static>(
    reader: &mut Reader<'_>,
    target: &Database,
    def: TableDefinition<K, V>,
) -> Result<Scanned, redb::Error> {
    scan::seq_table(reader, def, &mut |entries| put_raw(target, def, entries))
}

fn named<K: Key + 'static, V: Value + 'static>(
    reader: &mut Reader<'_>,
    target: &Database,
    def: TableDefinition<K, V>,
) -> Result<Scanned, redb::Error> {
    scan::named_table(reader, def, &mut |entries| put_raw(target, def, entries))
}

fn schema_of(target: &Database) -> Result<Option<Vec<u8>>, redb::Error> {
    let txn = target.begin_read()?;
    let meta = match txn.open_table(META) {
        Ok(meta) => meta,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(meta.get(SCHEMA_KEY)?.map(|v| v.value().to_vec()))
}

/// Applies the damaged store's journal to the salvaged tables, when the
/// salvaged `meta` names its epoch; returns the frames applied. A journal
/// that cannot be replayed is logged and left out (the replay is one
/// transaction: all its frames or none).
fn replay_journal(damaged: &mut Damaged, target: &Database) -> usize {
    let Some((backend, len)) = damaged.journal.take() else {
        return 0;
    };
    let named = (|| -> Result<bool, redb::Error> {
        let txn = target.begin_read()?;
        let meta = match txn.open_table(META) {
            Ok(meta) => meta,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        Ok(meta.get(JOURNAL_KEY)?.is_some())
    })();
    if !matches!(named, Ok(true)) {
        tracing::warn!(store = %damaged.label.display(),
            "The damaged store's journal epoch is unreadable: its journal is not replayed (it is kept with the damaged file).");
        return 0;
    }
    let replayed = journal::Journal::new(backend, len)
        .map_err(redb::Error::from)
        .and_then(|mut j| journal::recover(target, &mut j));
    match replayed {
        Ok(frames) => frames,
        Err(error) => {
            tracing::warn!(store = %damaged.label.display(), %error,
                "The damaged store's journal does not replay onto what was salvaged: left out (it is kept with the damaged file).");
            0
        }
    }
}

/// What [`finish`] found.
struct Finished {
    floor: Seq,
    /// The damaged store's own figures, if they were readable.
    figures: Option<Stats>,
    log: u64,
    dead: u64,
    retained: u64,
    /// Queue entries dropped because their queue is gone.
    orphans: u64,
}

fn max_key<K: Key + 'static, V: Value + 'static>(
    txn: &redb::WriteTransaction,
    def: TableDefinition<K, V>,
    seq_of: impl Fn(K::SelfType<'_>) -> Seq,
) -> Result<Option<Seq>, redb::Error> {
    let table = txn.open_table(def)?;
    let last = table.last()?;
    Ok(last.map(|(k, _)| seq_of(k.value())))
}

/// Step 2 and 3 of the module documentation, in one durable commit.
fn finish(target: &Database, seed: Seq) -> Result<Finished, redb::Error> {
    let txn = target.begin_write()?;
    let finished = {
        let mut meta = txn.open_table(META)?;
        let meta_u64 =
            |meta: &redb::Table<&str, &[u8]>, key: &str| -> Result<Option<u64>, redb::Error> {
                Ok(meta
                    .get(key)?
                    .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
                    .map(u64::from_le_bytes))
            };
        let figures = meta.get(STATS_KEY)?.and_then(|v| Stats::decode(v.value()));
        let retired_below = meta_u64(&meta, RETIRED_BELOW_KEY)?.unwrap_or(1);
        let stored_next_queue = meta_u64(&meta, NEXT_QUEUE_KEY)?.unwrap_or(1);

        let queues: BTreeMap<String, u64> = {
            let table = txn.open_table(QUEUES)?;
            let mut out = BTreeMap::new();
            for entry in table.iter()? {
                let (k, v) = entry?;
                out.insert(k.value().to_string(), v.value());
            }
            out
        };
        let ids: BTreeSet<u64> = queues.values().copied().collect();
        let mut orphans = Vec::new();
        let mut refs: BTreeMap<Seq, u32> = BTreeMap::new();
        let mut highest_entry = 0;
        {
            let entries = txn.open_table(QUEUE_ENTRIES)?;
            for entry in entries.iter()? {
                let (k, _) = entry?;
                let (queue, seq) = k.value();
                highest_entry = highest_entry.max(seq);
                if ids.contains(&queue) {
                    *refs.entry(seq).or_default() += 1;
                } else {
                    orphans.push((queue, seq));
                }
            }
        }
        {
            let mut entries = txn.open_table(QUEUE_ENTRIES)?;
            for key in &orphans {
                entries.remove(key)?;
            }
            let mut table = txn.open_table(REFS)?;
            table.retain(|_, _| false)?;
            for (seq, n) in &refs {
                table.insert(seq, n)?;
            }
        }

        let mut floor = retired_below.max(seed).max(highest_entry.saturating_add(1));
        for last in [
            max_key(&txn, LOG, |k| k)?,
            max_key(&txn, DEAD_LETTERS, |k| k)?,
            max_key(&txn, REPLAYS, |k| k)?,
        ]
        .into_iter()
        .flatten()
        {
            floor = floor.max(last.saturating_add(1));
        }
        {
            let cursors = txn.open_table(CURSORS)?;
            for entry in cursors.iter()? {
                floor = floor.max(entry?.1.value());
            }
            let dedup = txn.open_table(DEDUP)?;
            for entry in dedup.iter()? {
                floor = floor.max(entry?.1.value().saturating_add(1));
            }
        }
        let next_queue = queues
            .values()
            .map(|id| id.saturating_add(1))
            .fold(stored_next_queue, u64::max);

        meta.insert(SCHEMA_KEY, SCHEMA_VERSION.to_le_bytes().as_slice())?;
        meta.insert(RETIRED_BELOW_KEY, floor.to_le_bytes().as_slice())?;
        meta.insert(NEXT_QUEUE_KEY, next_queue.to_le_bytes().as_slice())?;
        // A new database: the next open draws a new journal id.
        meta.remove(JOURNAL_KEY)?;
        drop(meta);
        let now = tables::scan_stats(&txn).map_err(|e| match e {
            tables::InitError::Redb(e) => e,
            other => redb::Error::Corrupted(other.to_string()),
        })?;
        txn.open_table(META)?
            .insert(STATS_KEY, now.encode().as_slice())?;
        Finished {
            floor,
            figures,
            log: now.live_messages,
            dead: now.dead_letters,
            retained: now.retained,
            orphans: orphans.len() as u64,
        }
    };
    txn.commit()?;
    Ok(finished)
}
