//! Table definitions, the schema check and the open-time scan.

use std::collections::{BTreeMap, HashSet};

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::Seq;

/// seq -> encoded [`crate::Record`].
pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// cursor name -> next seq its owner has to forward.
pub(crate) const CURSORS: TableDefinition<&str, u64> = TableDefinition::new("cursors");
/// seq -> dead letter (see [`encode_dead_letter`]).
pub(crate) const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// key -> value; holds [`SCHEMA_KEY`].
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

pub(crate) const SCHEMA_KEY: &str = "schema_version";
/// Every seq below this value was retired (u64 LE); keeps seqs unique when
/// retirement empties the log.
pub(crate) const RETIRED_BELOW_KEY: &str = "retired_below";
/// The gateway identity this store's message ids were made with (UTF-8).
pub(crate) const GATEWAY_ID_KEY: &str = "gateway_id";
pub(crate) const SCHEMA_VERSION: u32 = 1;

/// What the writer and the handles start from, as found on disk.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub first_seq: Seq,
    pub next_seq: Seq,
    pub live_messages: u64,
    pub live_bytes: u64,
    pub dead_letters: u64,
    pub dead_bytes: u64,
    /// Value of every configured cursor that is set.
    pub cursors: BTreeMap<String, Seq>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum InitError {
    #[error("unknown schema version {found} (this build reads version {SCHEMA_VERSION})")]
    UnknownSchema { found: String },
    #[error("{0}")]
    Redb(#[from] redb::Error),
}

fn redb_err(e: impl Into<redb::Error>) -> InitError {
    InitError::Redb(e.into())
}

/// Creates missing tables, checks the schema version, drops cursors that are
/// not configured, and scans the log for its live figures. One write
/// transaction: opening is recovery.
///
/// A store created by this call starts its seqs at `first_seq` (recorded as
/// `retired_below`), so a store that replaces a lost one does not hand out
/// the seqs — and message ids — of its predecessor again.
pub(crate) fn init(
    db: &Database,
    configured: &[String],
    first_seq: Seq,
) -> Result<Loaded, InitError> {
    let txn = db.begin_write().map_err(redb_err)?;
    let loaded = {
        let mut meta = txn.open_table(META).map_err(redb_err)?;
        let found = meta
            .get(SCHEMA_KEY)
            .map_err(redb_err)?
            .map(|v| v.value().to_vec());
        match found {
            None => {
                meta.insert(SCHEMA_KEY, SCHEMA_VERSION.to_le_bytes().as_slice())
                    .map_err(redb_err)?;
                meta.insert(RETIRED_BELOW_KEY, first_seq.max(1).to_le_bytes().as_slice())
                    .map_err(redb_err)?;
            }
            Some(v) if v.as_slice() == SCHEMA_VERSION.to_le_bytes().as_slice() => {}
            Some(v) => {
                let found = match <[u8; 4]>::try_from(v.as_slice()) {
                    Ok(b) => u32::from_le_bytes(b).to_string(),
                    Err(_) => format!("{v:02x?}"),
                };
                return Err(InitError::UnknownSchema { found });
            }
        }

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

        let log = txn.open_table(LOG).map_err(redb_err)?;
        let dead = txn.open_table(DEAD_LETTERS).map_err(redb_err)?;
        let dead_letters = dead.len().map_err(redb_err)?;
        let mut dead_bytes = 0u64;
        for entry in dead.iter().map_err(redb_err)? {
            let (_, v) = entry.map_err(redb_err)?;
            dead_bytes += v.value().len() as u64;
        }
        let live_messages = log.len().map_err(redb_err)?;
        let mut live_bytes = 0u64;
        for entry in log.iter().map_err(redb_err)? {
            let (_, v) = entry.map_err(redb_err)?;
            live_bytes += v.value().len() as u64;
        }
        let first = log.first().map_err(redb_err)?.map(|(k, _)| k.value());
        let last = log.last().map_err(redb_err)?.map(|(k, _)| k.value());
        // The log may be empty because everything was retired: the next seq
        // never goes below a retired seq or a cursor, so no seq is reused.
        let retired_below = meta
            .get(RETIRED_BELOW_KEY)
            .map_err(redb_err)?
            .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
            .map_or(1, u64::from_le_bytes);
        let highest_cursor = kept.values().copied().max().unwrap_or(1);
        let next_seq = last
            .map_or(1, |l| l + 1)
            .max(highest_cursor)
            .max(retired_below);
        Loaded {
            first_seq: first.unwrap_or(0),
            next_seq,
            live_messages,
            live_bytes,
            dead_letters,
            dead_bytes,
            cursors: kept,
        }
    };
    txn.commit().map_err(redb_err)?;
    Ok(loaded)
}

/// Dead-letter value: `u32` reason length (LE), reason (UTF-8), then the
/// encoded record.
pub(crate) fn encode_dead_letter(reason: &str, record: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + reason.len() + record.len());
    out.extend_from_slice(&(reason.len() as u32).to_le_bytes());
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(record);
    out
}

/// Splits a dead-letter value into (reason, encoded record).
pub(crate) fn decode_dead_letter(value: &[u8]) -> Option<(String, &[u8])> {
    let len = u32::from_le_bytes(value.get(..4)?.try_into().ok()?) as usize;
    let end = len.checked_add(4)?;
    let reason = value.get(4..end)?;
    let reason = std::str::from_utf8(reason).ok()?.to_string();
    Some((reason, value.get(end..)?))
}

/// Header of a parked record naming the cursor(s) (upstreams) that parked
/// it, comma-separated; a replay is forwarded only by them.
pub const PARKED_BY_HEADER: &str = "x-edge-upstream";

/// The dead letter for a seq parked again: reasons joined, and the
/// [`PARKED_BY_HEADER`] names of both copies kept. `None` if either value
/// does not decode (the newer value then simply replaces the older).
pub(crate) fn merge_dead_letters(old: &[u8], new: &[u8]) -> Option<Vec<u8>> {
    let (old_reason, old_record) = decode_dead_letter(old)?;
    let (new_reason, new_record) = decode_dead_letter(new)?;
    let old_record = crate::Record::decode(old_record).ok()?;
    let mut record = crate::Record::decode(new_record).ok()?;
    let names = |r: &crate::Record| -> Vec<String> {
        r.headers
            .iter()
            .filter(|(k, _)| k == PARKED_BY_HEADER)
            .flat_map(|(_, v)| {
                String::from_utf8_lossy(v)
                    .split(',')
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .filter(|n| !n.is_empty())
            .collect()
    };
    let mut parked_by = names(&old_record);
    for name in names(&record) {
        if !parked_by.contains(&name) {
            parked_by.push(name);
        }
    }
    if !parked_by.is_empty() {
        record.headers.retain(|(k, _)| k != PARKED_BY_HEADER);
        record.headers.push((
            PARKED_BY_HEADER.to_string(),
            bytes::Bytes::from(parked_by.join(",")),
        ));
    }
    let reason = if old_reason == new_reason {
        new_reason
    } else {
        format!("{old_reason} | {new_reason}")
    };
    Some(encode_dead_letter(&reason, &record.encode().ok()?))
}
