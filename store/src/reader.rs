//! Reads: each a redb read transaction, so readers never wait for the
//! writer and always see a committed state.

use redb::{Database, ReadableDatabase, ReadableTable};

use crate::dead;
use crate::tables::{
    CURSORS, DEAD_LETTERS, DEDUP, DEFINITIONS, LOG, META, QUEUE_ENTRIES, QUEUES, REPLAYS, RETAINED,
    SESSIONS,
};
use crate::{DeadLetter, Entry, QueueEntry, Record, Seq, StoreError};

pub(crate) fn read_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Read(e.into().to_string())
}

pub(crate) fn read(
    db: &impl ReadableDatabase,
    from: Seq,
    max_messages: usize,
    max_bytes: usize,
) -> Result<Vec<Entry>, StoreError> {
    let txn = db.begin_read().map_err(read_err)?;
    let log = txn.open_table(LOG).map_err(read_err)?;
    let replays = txn.open_table(REPLAYS).map_err(read_err)?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for entry in log.range(from..).map_err(read_err)? {
        if out.len() >= max_messages || (bytes >= max_bytes && !out.is_empty()) {
            break;
        }
        let (k, v) = entry.map_err(read_err)?;
        let seq = k.value();
        let value = v.value();
        bytes += value.len();
        let record = Record::from_stored(value);
        let replay = replays
            .get(seq)
            .map_err(read_err)?
            .and_then(|v| dead::decode_replay(v.value()));
        out.push(Entry {
            seq,
            record,
            replay,
        });
    }
    Ok(out)
}

/// A cursor never set reads as the first seq in the log, or as `next_seq()`
/// (called after the snapshot was taken) when the log is empty.
pub(crate) fn cursor(
    db: &impl ReadableDatabase,
    name: &str,
    next_seq: impl FnOnce() -> Seq,
) -> Result<Seq, StoreError> {
    let txn = db.begin_read().map_err(read_err)?;
    let cursors = txn.open_table(CURSORS).map_err(read_err)?;
    if let Some(v) = cursors.get(name).map_err(read_err)? {
        return Ok(v.value());
    }
    let log = txn.open_table(LOG).map_err(read_err)?;
    let first = log.first().map_err(read_err)?.map(|(k, _)| k.value());
    Ok(first.unwrap_or_else(next_seq))
}

pub(crate) fn dead_letters(
    db: &impl ReadableDatabase,
    from: Seq,
    max: usize,
) -> Result<Vec<DeadLetter>, StoreError> {
    let txn = db.begin_read().map_err(read_err)?;
    let table = txn.open_table(DEAD_LETTERS).map_err(read_err)?;
    let mut out = Vec::new();
    for entry in table.range(from..).map_err(read_err)?.take(max) {
        let (k, v) = entry.map_err(read_err)?;
        let seq = k.value();
        let (meta, bytes) = dead::decode(v.value()).ok_or(StoreError::Damaged {
            seq,
            what: "dead-letter marks truncated",
        })?;
        let record = Record::from_stored(bytes);
        out.push(DeadLetter {
            seq,
            original_seq: meta.original_seq,
            upstreams: meta.upstreams,
            reason: meta.reason,
            record,
        });
    }
    Ok(out)
}

/// A UTF-8 value of the `meta` table.
pub(crate) fn meta_string(
    db: &impl ReadableDatabase,
    key: &str,
) -> Result<Option<String>, StoreError> {
    let txn = db.begin_read().map_err(read_err)?;
    let meta = txn.open_table(META).map_err(read_err)?;
    let value = meta.get(key).map_err(read_err)?;
    Ok(value.map(|v| String::from_utf8_lossy(v.value()).into_owned()))
}

pub(crate) fn queue_entries(
    db: &Database,
    queue: u64,
    from: Seq,
    max: usize,
) -> Result<Vec<QueueEntry>, StoreError> {
    let txn = db.begin_read().map_err(read_err)?;
    let entries = txn.open_table(QUEUE_ENTRIES).map_err(read_err)?;
    let log = txn.open_table(LOG).map_err(read_err)?;
    let mut out = Vec::new();
    for entry in entries
        .range((queue, from)..=(queue, u64::MAX))
        .map_err(read_err)?
        .take(max)
    {
        let (k, v) = entry.map_err(read_err)?;
        let seq = k.value().1;
        let record = log
            .get(seq)
            .map_err(read_err)?
            .map(|bytes| Record::from_stored(bytes.value()));
        out.push(QueueEntry {
            seq,
            state: v.value(),
            record,
        });
    }
    Ok(out)
}

pub(crate) fn queues(db: &Database) -> Result<Vec<(String, u64)>, StoreError> {
    let txn = db.begin_read().map_err(read_err)?;
    let table = txn.open_table(QUEUES).map_err(read_err)?;
    let mut out = Vec::new();
    for entry in table.iter().map_err(read_err)? {
        let (k, v) = entry.map_err(read_err)?;
        out.push((k.value().to_string(), v.value()));
    }
    Ok(out)
}

pub(crate) fn sessions(db: &Database) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let txn = db.begin_read().map_err(read_err)?;
    let table = txn.open_table(SESSIONS).map_err(read_err)?;
    let mut out = Vec::new();
    for entry in table.iter().map_err(read_err)? {
        let (k, v) = entry.map_err(read_err)?;
        out.push((k.value().to_string(), v.value().to_vec()));
    }
    Ok(out)
}

pub(crate) fn definitions(
    db: &Database,
    prefix: &str,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let txn = db.begin_read().map_err(read_err)?;
    let table = txn.open_table(DEFINITIONS).map_err(read_err)?;
    let mut out = Vec::new();
    for entry in table.range(prefix..).map_err(read_err)? {
        let (k, v) = entry.map_err(read_err)?;
        if !k.value().starts_with(prefix) {
            break;
        }
        out.push((k.value().to_string(), v.value().to_vec()));
    }
    Ok(out)
}

pub(crate) fn retained(db: &Database) -> Result<Vec<(String, Record)>, StoreError> {
    let txn = db.begin_read().map_err(read_err)?;
    let table = txn.open_table(RETAINED).map_err(read_err)?;
    let mut out = Vec::new();
    for entry in table.iter().map_err(read_err)? {
        let (k, v) = entry.map_err(read_err)?;
        // The seq of a retained record is not a log seq: report 0.
        let record = Record::from_stored(v.value());
        out.push((k.value().to_string(), record));
    }
    Ok(out)
}

pub(crate) fn dedup_keys(db: &Database, prefix: &str) -> Result<Vec<(String, Seq)>, StoreError> {
    let txn = db.begin_read().map_err(read_err)?;
    let table = txn.open_table(DEDUP).map_err(read_err)?;
    let mut out = Vec::new();
    for entry in table.range(prefix..).map_err(read_err)? {
        let (k, v) = entry.map_err(read_err)?;
        if !k.value().starts_with(prefix) {
            break;
        }
        out.push((k.value().to_string(), v.value()));
    }
    Ok(out)
}
