//! Table definitions, the schema check and the open-time scan.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use redb::{Database, ReadableTable, TableDefinition};

use crate::Seq;

/// seq -> encoded [`crate::Record`].
pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// cursor name -> next seq its owner has to forward.
pub(crate) const CURSORS: TableDefinition<&str, u64> = TableDefinition::new("cursors");
/// seq it was parked at -> typed dead letter (see `dead.rs`).
pub(crate) const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// seq of a replayed dead letter in the log -> its replay mark (`dead.rs`).
pub(crate) const REPLAYS: TableDefinition<u64, &[u8]> = TableDefinition::new("replays");
/// topic -> encoded record: the retained message of that topic.
pub(crate) const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");
/// client id -> the session as its owner encoded it (opaque to the store).
pub(crate) const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
/// key -> value: definitions an adapter keeps for itself (AMQP exchanges,
/// queues and bindings), opaque to the store.
pub(crate) const DEFINITIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("definitions");
/// queue name -> queue id.
pub(crate) const QUEUES: TableDefinition<&str, u64> = TableDefinition::new("queues");
/// (queue id, seq) -> entry state (owner-defined `u32`; 0 when queued).
pub(crate) const QUEUE_ENTRIES: TableDefinition<(u64, u64), u32> =
    TableDefinition::new("queue_entries");
/// dedup key -> seq: a publish already taken, until its publisher releases
/// the key (MQTT QoS 2 packet ids awaiting PUBREL).
pub(crate) const DEDUP: TableDefinition<&str, u64> = TableDefinition::new("dedup");
/// seq -> number of queue entries referencing it (absent: none).
pub(crate) const REFS: TableDefinition<u64, u32> = TableDefinition::new("refs");
/// append time (unix ms) -> first seq appended then: where `store.max_age`
/// finds the records old enough to drop (see `writer/age.rs`).
pub(crate) const AGES: TableDefinition<u64, u64> = TableDefinition::new("ages");
/// key -> value; holds [`SCHEMA_KEY`].
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

pub(crate) const SCHEMA_KEY: &str = "schema_version";
/// Every seq below this value was retired (u64 LE); keeps seqs unique when
/// retirement empties the log.
pub(crate) const RETIRED_BELOW_KEY: &str = "retired_below";
/// The gateway identity this store's message ids were made with (UTF-8).
pub(crate) const GATEWAY_ID_KEY: &str = "gateway_id";
/// The live figures ([`Stats`]), kept with every commit so that opening a
/// large store does not scan it.
pub(crate) const STATS_KEY: &str = "stats";
/// The journal's id and the epoch it writes now (two u64 LE; `journal.rs`):
/// the frames of earlier epochs are in the database.
pub(crate) const JOURNAL_KEY: &str = "journal";
/// Present (one byte, 1) from a clean close's checkpoint until the next
/// open: its absence at open means the last run crashed.
pub(crate) const CLOSED_KEY: &str = "closed";
/// The id the next new queue gets (u64 LE).
pub(crate) const NEXT_QUEUE_KEY: &str = "next_queue_id";
pub(crate) const SCHEMA_VERSION: u32 = 2;

/// Figures persisted in `meta` under [`STATS_KEY`]: six u64 LE.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Stats {
    pub live_messages: u64,
    pub live_bytes: u64,
    pub dead_letters: u64,
    pub dead_bytes: u64,
    pub retained: u64,
    pub retained_bytes: u64,
}

impl Stats {
    pub(crate) fn encode(&self) -> [u8; 48] {
        let mut out = [0u8; 48];
        let fields = [
            self.live_messages,
            self.live_bytes,
            self.dead_letters,
            self.dead_bytes,
            self.retained,
            self.retained_bytes,
        ];
        for (i, f) in fields.iter().enumerate() {
            out[i * 8..(i + 1) * 8].copy_from_slice(&f.to_le_bytes());
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Stats> {
        let f = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(
                bytes.get(i * 8..(i + 1) * 8)?.try_into().ok()?,
            ))
        };
        Some(Stats {
            live_messages: f(0)?,
            live_bytes: f(1)?,
            dead_letters: f(2)?,
            dead_bytes: f(3)?,
            retained: f(4)?,
            retained_bytes: f(5)?,
        })
    }
}

/// What the writer and the handles start from, as found on disk.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub first_seq: Seq,
    pub next_seq: Seq,
    pub stats: Stats,
    /// Every cursor (configured ones created at open).
    pub cursors: BTreeMap<String, Seq>,
    /// Seqs referenced by queue entries: retirement keeps them.
    pub held: BTreeSet<Seq>,
    pub queues: BTreeMap<String, u64>,
    pub next_queue_id: u64,
    /// Every record below this seq that no queue references was retired.
    pub retired_upto: Seq,
    /// The `ages` table, oldest first.
    pub marks: std::collections::VecDeque<(u64, Seq)>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum InitError {
    #[error("unknown schema version {found} (this build reads version {SCHEMA_VERSION})")]
    UnknownSchema { found: String },
    #[error("{0}")]
    Redb(#[from] redb::Error),
}

pub(crate) fn redb_err(e: impl Into<redb::Error>) -> InitError {
    InitError::Redb(e.into())
}

fn meta_u64(meta: &redb::Table<&str, &[u8]>, key: &str) -> Result<Option<u64>, InitError> {
    Ok(meta
        .get(key)
        .map_err(redb_err)?
        .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
        .map(u64::from_le_bytes))
}

/// Creates missing tables, checks the schema version (migrating a v1 store),
/// drops cursors that are not configured and creates those that are, and
/// loads the live figures from `meta`. One write transaction: opening is
/// recovery.
///
/// A store created by this call starts its seqs at `first_seq` (recorded as
/// `retired_below`), so a store that replaces a lost one does not hand out
/// the seqs — and message ids — of its predecessor again.
///
/// `age_now` is the clock when `max_age` is set: records older than the
/// first `ages` entry (appended while it was not set) count as appended
/// now. Without it the `ages` table is emptied, since appends will not be
/// timed.
pub(crate) fn init(
    db: &Database,
    configured: &[String],
    first_seq: Seq,
    age_now: Option<u64>,
    journaled: bool,
) -> Result<Loaded, InitError> {
    let mut txn = db.begin_write().map_err(redb_err)?;
    // With a journal, like a checkpoint (`writer/apply.rs`): the allocator
    // state recorded, so a crash right after opening leaves a file that a
    // salvage can read.
    txn.set_quick_repair(journaled);
    let loaded = {
        let found = {
            let meta = txn.open_table(META).map_err(redb_err)?;
            meta.get(SCHEMA_KEY)
                .map_err(redb_err)?
                .map(|v| v.value().to_vec())
        };
        let version = match found {
            None => None,
            Some(v) => match <[u8; 4]>::try_from(v.as_slice()) {
                Ok(b) => Some(u32::from_le_bytes(b)),
                Err(_) => {
                    return Err(InitError::UnknownSchema {
                        found: format!("{v:02x?}"),
                    });
                }
            },
        };
        match version {
            None => {
                let mut meta = txn.open_table(META).map_err(redb_err)?;
                meta.insert(SCHEMA_KEY, SCHEMA_VERSION.to_le_bytes().as_slice())
                    .map_err(redb_err)?;
                meta.insert(RETIRED_BELOW_KEY, first_seq.max(1).to_le_bytes().as_slice())
                    .map_err(redb_err)?;
                meta.insert(STATS_KEY, Stats::default().encode().as_slice())
                    .map_err(redb_err)?;
            }
            Some(1) => crate::migrate::v1_to_v2(&txn)?,
            Some(SCHEMA_VERSION) => {}
            Some(other) => {
                return Err(InitError::UnknownSchema {
                    found: other.to_string(),
                });
            }
        }
        // Every table exists from here on.
        for table in [LOG, DEAD_LETTERS, REPLAYS] {
            txn.open_table(table).map_err(redb_err)?;
        }
        txn.open_table(RETAINED).map_err(redb_err)?;
        txn.open_table(SESSIONS).map_err(redb_err)?;
        txn.open_table(DEFINITIONS).map_err(redb_err)?;
        txn.open_table(QUEUE_ENTRIES).map_err(redb_err)?;
        txn.open_table(DEDUP).map_err(redb_err)?;
        let mut ages = txn.open_table(AGES).map_err(redb_err)?;
        let mut marks = std::collections::VecDeque::new();
        for entry in ages.iter().map_err(redb_err)? {
            let (k, v) = entry.map_err(redb_err)?;
            marks.push_back((k.value(), v.value()));
        }

        let log = txn.open_table(LOG).map_err(redb_err)?;
        let first = log.first().map_err(redb_err)?.map(|(k, _)| k.value());
        let last = log.last().map_err(redb_err)?.map(|(k, _)| k.value());

        let keep: HashSet<&str> = configured.iter().map(String::as_str).collect();
        let mut cursors = txn.open_table(CURSORS).map_err(redb_err)?;
        let mut stale = Vec::new();
        let mut kept = BTreeMap::new();
        for entry in cursors.iter().map_err(redb_err)? {
            let (k, v) = entry.map_err(redb_err)?;
            if keep.contains(k.value()) {
                kept.insert(k.value().to_string(), v.value());
            } else {
                stale.push((k.value().to_string(), v.value()));
            }
        }
        for (name, at) in stale {
            cursors.remove(name.as_str()).map_err(redb_err)?;
            tracing::info!(cursor = %name, at, "Removed a stored cursor that is no longer configured.");
        }

        let mut meta = txn.open_table(META).map_err(redb_err)?;
        // The log may be empty because everything was retired: the next seq
        // never goes below a retired seq or a cursor, so no seq is reused.
        let retired_below = meta_u64(&meta, RETIRED_BELOW_KEY)?.unwrap_or(1);
        let highest_cursor = kept.values().copied().max().unwrap_or(1);
        let next_seq = last
            .map_or(1, |l| l + 1)
            .max(highest_cursor)
            .max(retired_below);
        // A configured cursor that was never set starts at the first record.
        for name in configured {
            if !kept.contains_key(name) {
                let at = first.unwrap_or(next_seq);
                cursors.insert(name.as_str(), at).map_err(redb_err)?;
                kept.insert(name.clone(), at);
            }
        }
        let stats = match meta.get(STATS_KEY).map_err(redb_err)? {
            Some(v) => Stats::decode(v.value()),
            None => None,
        };
        let stats = match stats {
            Some(s) => s,
            None => {
                let s = scan_stats(&txn)?;
                meta.insert(STATS_KEY, s.encode().as_slice())
                    .map_err(redb_err)?;
                s
            }
        };
        let next_queue_id = meta_u64(&meta, NEXT_QUEUE_KEY)?.unwrap_or(1);

        let refs = txn.open_table(REFS).map_err(redb_err)?;
        let mut held = BTreeSet::new();
        for entry in refs.iter().map_err(redb_err)? {
            let (k, _) = entry.map_err(redb_err)?;
            held.insert(k.value());
        }
        let queues_table = txn.open_table(QUEUES).map_err(redb_err)?;
        let mut queues = BTreeMap::new();
        for entry in queues_table.iter().map_err(redb_err)? {
            let (k, v) = entry.map_err(redb_err)?;
            queues.insert(k.value().to_string(), v.value());
        }
        // Retirement resumes at the first record no queue holds, and never
        // above a cursor (a released record below it is deleted at once).
        let mut retired_upto = next_seq;
        for entry in log.iter().map_err(redb_err)? {
            let (k, _) = entry.map_err(redb_err)?;
            if !held.contains(&k.value()) {
                retired_upto = k.value();
                break;
            }
        }
        let retired_upto = retired_upto.min(kept.values().copied().min().unwrap_or(0));
        match (age_now, first) {
            (None, _) => {
                while ages.pop_first().map_err(redb_err)?.is_some() {}
                marks.clear();
            }
            (Some(now), Some(first)) if marks.front().is_none_or(|m| m.1 > first) => {
                let at = marks
                    .front()
                    .map_or(now, |m| m.0.saturating_sub(1).min(now));
                ages.insert(at, first).map_err(redb_err)?;
                marks.push_front((at, first));
            }
            _ => {}
        }
        Loaded {
            first_seq: first.unwrap_or(0),
            next_seq,
            stats,
            cursors: kept,
            held,
            queues,
            next_queue_id,
            retired_upto,
            marks,
        }
    };
    txn.commit().map_err(redb_err)?;
    Ok(loaded)
}

/// The live figures by scanning the tables (a store without them recorded).
pub(crate) fn scan_stats(txn: &redb::WriteTransaction) -> Result<Stats, InitError> {
    let mut s = Stats::default();
    let log = txn.open_table(LOG).map_err(redb_err)?;
    for entry in log.iter().map_err(redb_err)? {
        let (_, v) = entry.map_err(redb_err)?;
        s.live_messages += 1;
        s.live_bytes += v.value().len() as u64;
    }
    let dead = txn.open_table(DEAD_LETTERS).map_err(redb_err)?;
    for entry in dead.iter().map_err(redb_err)? {
        let (_, v) = entry.map_err(redb_err)?;
        s.dead_letters += 1;
        s.dead_bytes += v.value().len() as u64;
    }
    let retained = txn.open_table(RETAINED).map_err(redb_err)?;
    for entry in retained.iter().map_err(redb_err)? {
        let (k, v) = entry.map_err(redb_err)?;
        s.retained += 1;
        s.retained_bytes += (k.value().len() + v.value().len()) as u64;
    }
    Ok(s)
}
