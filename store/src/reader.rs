//! Reads: each a redb read transaction, so readers never wait for the
//! writer and always see a committed state.

use redb::{Database, ReadableDatabase, ReadableTable};

use crate::tables::{CURSORS, DEAD_LETTERS, LOG, META, decode_dead_letter};
use crate::{DeadLetter, DecodeError, Record, Seq, StoreError};

fn read_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Read(e.into().to_string())
}

pub(crate) fn read(
    db: &Database,
    from: Seq,
    max_messages: usize,
    max_bytes: usize,
) -> Result<Vec<(Seq, Record)>, StoreError> {
    let txn = db.begin_read().map_err(read_err)?;
    let log = txn.open_table(LOG).map_err(read_err)?;
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
        let record = Record::decode(value).map_err(|source| StoreError::Decode { seq, source })?;
        out.push((seq, record));
    }
    Ok(out)
}

/// A cursor never set reads as the first seq in the log, or as `next_seq()`
/// (called after the snapshot was taken) when the log is empty.
pub(crate) fn cursor(
    db: &Database,
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
    db: &Database,
    from: Seq,
    max: usize,
) -> Result<Vec<DeadLetter>, StoreError> {
    let txn = db.begin_read().map_err(read_err)?;
    let table = txn.open_table(DEAD_LETTERS).map_err(read_err)?;
    let mut out = Vec::new();
    for entry in table.range(from..).map_err(read_err)?.take(max) {
        let (k, v) = entry.map_err(read_err)?;
        let seq = k.value();
        let (reason, bytes) = decode_dead_letter(v.value()).ok_or(StoreError::Decode {
            seq,
            source: DecodeError::Truncated,
        })?;
        let record = Record::decode(bytes).map_err(|source| StoreError::Decode { seq, source })?;
        out.push(DeadLetter {
            seq,
            reason,
            record,
        });
    }
    Ok(out)
}

/// A UTF-8 value of the `meta` table.
pub(crate) fn meta_string(db: &Database, key: &str) -> Result<Option<String>, StoreError> {
    let txn = db.begin_read().map_err(read_err)?;
    let meta = txn.open_table(META).map_err(read_err)?;
    let value = meta.get(key).map_err(read_err)?;
    Ok(value.map(|v| String::from_utf8_lossy(v.value()).into_owned()))
}
