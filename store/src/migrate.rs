//! Schema migrations, run by `tables::init` inside the opening transaction
//! (so a migration is atomic: a crash during it leaves the old schema).
//!
//! v1 → v2: version 1 kept dead-letter bookkeeping inside the records, as
//! the headers `x-edge-upstream` (the upstreams that parked it,
//! comma-separated) and `x-edge-seq` (its original seq), and had no stored
//! live figures. The migration moves those headers into the typed
//! dead-letter and replay columns (`dead.rs`), strips them from the records,
//! creates the new tables and records the live figures. This module is the
//! only place that knows the v1 layouts.

use redb::{ReadableTable, WriteTransaction};

use crate::dead::{self, Meta, Replay};
use crate::tables::{
    DEAD_LETTERS, InitError, LOG, META, QUEUE_ENTRIES, QUEUES, REFS, REPLAYS, RETAINED, SCHEMA_KEY,
    SCHEMA_VERSION, SESSIONS, STATS_KEY, redb_err, scan_stats,
};

mod v1;

use v1::Record;

const V1_UPSTREAM_HEADER: &str = "x-edge-upstream";
const V1_SEQ_HEADER: &str = "x-edge-seq";

/// The v1 bookkeeping headers of a record, removed from it: the upstreams
/// named and the original seq.
fn take_marks(record: &mut Record) -> (Vec<String>, Option<u64>) {
    let mut upstreams = Vec::new();
    let mut original = None;
    record.headers.retain(|(key, value)| match key.as_str() {
        V1_UPSTREAM_HEADER => {
            for name in String::from_utf8_lossy(value).split(',') {
                if !name.is_empty() && !upstreams.iter().any(|u| u == name) {
                    upstreams.push(name.to_string());
                }
            }
            false
        }
        V1_SEQ_HEADER => {
            original = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok());
            false
        }
        _ => true,
    });
    (upstreams, original)
}

/// v1 dead-letter value: u32 LE reason length, reason, record.
fn split_v1_dead_letter(value: &[u8]) -> Option<(String, &[u8])> {
    let len = u32::from_le_bytes(value.get(..4)?.try_into().ok()?) as usize;
    let end = len.checked_add(4)?;
    let reason = std::str::from_utf8(value.get(4..end)?).ok()?.to_string();
    Some((reason, value.get(end..)?))
}

pub(crate) fn v1_to_v2(txn: &WriteTransaction) -> Result<(), InitError> {
    let mut dead_moved = 0u64;
    {
        let mut dead = txn.open_table(DEAD_LETTERS).map_err(redb_err)?;
        let mut rewritten = Vec::new();
        for entry in dead.iter().map_err(redb_err)? {
            let (k, v) = entry.map_err(redb_err)?;
            let seq = k.value();
            let Some((reason, bytes)) = split_v1_dead_letter(v.value()) else {
                continue;
            };
            let Ok(mut record) = Record::decode(bytes) else {
                continue;
            };
            let (upstreams, original) = take_marks(&mut record);
            let Ok(bytes) = record.encode() else { continue };
            let meta = Meta {
                original_seq: original.unwrap_or(seq),
                upstreams,
                reason,
            };
            rewritten.push((seq, dead::encode(&meta, &bytes)));
        }
        for (seq, value) in rewritten {
            dead.insert(seq, value.as_slice()).map_err(redb_err)?;
            dead_moved += 1;
        }
    }
    let mut replays_found = 0u64;
    {
        let mut log = txn.open_table(LOG).map_err(redb_err)?;
        let mut replays = txn.open_table(REPLAYS).map_err(redb_err)?;
        let mut rewritten = Vec::new();
        for entry in log.iter().map_err(redb_err)? {
            let (k, v) = entry.map_err(redb_err)?;
            let Ok(mut record) = Record::decode(v.value()) else {
                continue;
            };
            if !record
                .headers
                .iter()
                .any(|(key, _)| key.starts_with("x-edge-"))
            {
                continue;
            }
            let seq = k.value();
            let (upstreams, original) = take_marks(&mut record);
            let Ok(bytes) = record.encode() else { continue };
            let replay = (!upstreams.is_empty()).then(|| Replay {
                original_seq: original.unwrap_or(seq),
                upstreams,
            });
            rewritten.push((seq, bytes, replay));
        }
        for (seq, bytes, replay) in rewritten {
            log.insert(seq, bytes.as_slice()).map_err(redb_err)?;
            if let Some(replay) = replay {
                replays
                    .insert(seq, dead::encode_replay(&replay).as_slice())
                    .map_err(redb_err)?;
                replays_found += 1;
            }
        }
    }
    txn.open_table(RETAINED).map_err(redb_err)?;
    txn.open_table(SESSIONS).map_err(redb_err)?;
    txn.open_table(QUEUES).map_err(redb_err)?;
    txn.open_table(QUEUE_ENTRIES).map_err(redb_err)?;
    txn.open_table(REFS).map_err(redb_err)?;
    let stats = scan_stats(txn)?;
    let mut meta = txn.open_table(META).map_err(redb_err)?;
    meta.insert(STATS_KEY, stats.encode().as_slice())
        .map_err(redb_err)?;
    meta.insert(SCHEMA_KEY, SCHEMA_VERSION.to_le_bytes().as_slice())
        .map_err(redb_err)?;
    tracing::info!(
        dead_letters = dead_moved,
        replays = replays_found,
        live_messages = stats.live_messages,
        "Store migrated from schema 1 to 2: dead-letter marks moved out of message headers."
    );
    Ok(())
}
