//! The write-ahead journal in front of redb (see "Recovery" in `lib.rs`).
//!
//! A redb commit with `Durability::Immediate` rewrites every page on the
//! path to what changed (the log's leaf and branches, the table tree, the
//! freed-page tree, the header): ~9 pages, 36 KiB for one 100-byte
//! message. Instead, each group commit is committed to redb with
//! `Durability::None` (redb keeps it in its write buffer: readers see it,
//! nothing is written to the file) and the batch's changes — every key
//! inserted or removed, in order — are appended to this journal as one
//! frame and `fdatasync`ed. The batch is acknowledged after that sync.
//! Every [`CAPACITY`] bytes of journal (and at close) a batch is committed
//! with `Durability::Immediate` instead: a *checkpoint*, which folds
//! everything since the last one into the database file, and starts a new
//! journal *epoch* recorded in the same commit.
//!
//! The file is written full of zeros once, when it is created, and then
//! only overwritten in place from its start, epoch after epoch: a sync
//! then writes the data pages and no file metadata (size, extents). Every
//! write is of whole [`BLOCK`]s (the block holding the end of the last
//! frame is written again with the next one), and on Linux the file is
//! opened with `O_DIRECT` ([`DirectFile`]): through the page cache, a
//! kernel with large folios (ext4 on 6.x) writes back the whole folio a
//! small write dirtied — up to 2 MiB for 300 bytes — where the journal
//! means to write one 4 KiB block.
//!
//! # Frame
//!
//! `magic u32 | journal id u64 | epoch u64 | index u64 | len u32 | crc u32 | changes[len]`,
//! little-endian; `index` counts the frames of the epoch from 0 and `crc`
//! (CRC-32C) covers the fields before it and the changes. The journal id
//! is drawn when the database first gets a journal and kept in its `meta`,
//! so frames left in the file by another database (one moved aside as
//! damaged) never match.
//!
//! # Changes
//!
//! `table u8 | kind u8 (1 insert, 2 remove) | key_len u32 | key | [value_len u32 | value]`:
//! redb's own encoding of keys and values. Every change is a blind write
//! (a key gets a value, or no value), so replaying frames `0..m` of an
//! epoch onto the database as of any of its commits in that epoch gives
//! the state after frame `m - 1`, whichever of them redb had made durable.

use std::cell::RefCell;
use std::io;
use std::rc::Rc;

use redb::{
    AccessGuard, Database, Key, ReadableTable, StorageBackend, Table, Value, WriteTransaction,
};

use crate::tables::{
    AGES, CLOSED_KEY, CURSORS, DEAD_LETTERS, DEDUP, DEFINITIONS, JOURNAL_KEY, LOG, META,
    QUEUE_ENTRIES, QUEUES, REFS, REPLAYS, RETAINED, SESSIONS,
};

/// Bytes of the journal file. A batch whose frame does not fit in what is
/// left of the epoch is a checkpoint instead of a frame.
pub(crate) const CAPACITY: u64 = 1 << 20;
/// Unit of the journal's writes (offsets and lengths), and their memory
/// alignment for `O_DIRECT`.
pub(crate) const BLOCK: usize = 4096;
/// Name of the journal file inside the data directory.
pub const JOURNAL_FILE: &str = "edge.journal";

const MAGIC: u32 = 0x4a47_4445;
const HEADER: usize = 4 + 8 + 8 + 8 + 4 + 4;
const INSERT: u8 = 1;
const REMOVE: u8 = 2;

/// The journal of an open store, owned by the writer.
pub(crate) struct Journal {
    io: Box<dyn StorageBackend>,
    capacity: u64,
    id: u64,
    epoch: u64,
    /// Where the next frame goes.
    offset: u64,
    /// The bytes of the block holding `offset`, before it: written again,
    /// with the next frame after them.
    tail: Vec<u8>,
    /// Index of the next frame in this epoch.
    index: u64,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("capacity", &self.capacity)
            .field("epoch", &self.epoch)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// A journal on `io`, `capacity` bytes long: zero-filled (and synced)
    /// up to that length if it is shorter. Its epoch is set by [`recover`].
    pub(crate) fn new(io: Box<dyn StorageBackend>, capacity: u64) -> io::Result<Journal> {
        let capacity = capacity.div_ceil(BLOCK as u64).max(1) * BLOCK as u64;
        let len = io.len()?;
        if len < capacity {
            let zeros = vec![0u8; 64 << 10];
            // Whole blocks from the start of the one the file ends in.
            let mut at = len / BLOCK as u64 * BLOCK as u64;
            while at < capacity {
                let n = (capacity - at).min(zeros.len() as u64);
                io.write(at, &zeros[..n as usize])?;
                at += n;
            }
            io.sync_data()?;
        }
        Ok(Journal {
            io,
            capacity,
            id: 0,
            epoch: 0,
            offset: 0,
            tail: Vec::new(),
            index: 0,
        })
    }

    /// Bytes a frame of `changes` takes.
    pub(crate) fn frame_len(changes: usize) -> u64 {
        (HEADER + changes) as u64
    }

    /// Whether a frame of `changes` fits in what is left of this epoch.
    pub(crate) fn fits(&self, changes: usize) -> bool {
        self.offset + Self::frame_len(changes) <= self.capacity
    }

    /// The `meta` value a checkpoint records: this journal's id and the
    /// epoch that starts with it.
    pub(crate) fn next_epoch_value(&self) -> [u8; 16] {
        epoch_value(self.id, self.epoch + 1)
    }

    /// Writes one frame and syncs it: once this returns, the batch is
    /// durable. On error nothing is acknowledged and the frame may be torn
    /// (replay stops at it).
    pub(crate) fn append(&mut self, changes: &[u8]) -> io::Result<()> {
        let frame = encode_frame(self.id, self.epoch, self.index, changes);
        let start = self.offset - self.tail.len() as u64;
        let mut blocks =
            Vec::with_capacity((self.tail.len() + frame.len()).next_multiple_of(BLOCK));
        blocks.extend_from_slice(&self.tail);
        blocks.extend_from_slice(&frame);
        let tail = blocks[blocks.len() / BLOCK * BLOCK..].to_vec();
        blocks.resize(blocks.len().next_multiple_of(BLOCK), 0);
        self.io.write(start, &blocks)?;
        self.io.sync_data()?;
        self.offset += frame.len() as u64;
        self.tail = tail;
        self.index += 1;
        Ok(())
    }

    /// A checkpoint committed: the next epoch starts at the file's start.
    pub(crate) fn start_next_epoch(&mut self) {
        self.epoch += 1;
        self.offset = 0;
        self.tail.clear();
        self.index = 0;
    }

    /// The frames of `id` / `epoch` from the start of the file, up to the
    /// first that is missing, torn or of another epoch.
    fn frames(&self, id: u64, epoch: u64) -> io::Result<Vec<Vec<u8>>> {
        let len = self.io.len()?.min(self.capacity);
        let mut all = vec![0u8; len as usize];
        self.io.read(0, &mut all)?;
        let mut out = Vec::new();
        let mut at = 0usize;
        while let Some(changes) = decode_frame(&all[at..], id, epoch, out.len() as u64) {
            at += HEADER + changes.len();
            out.push(changes.to_vec());
        }
        Ok(out)
    }
}

/// The journal file on Linux: opened with `O_DIRECT` (see the module
/// documentation), so that a sync writes the blocks written and nothing
/// else. Writes must be whole, aligned [`BLOCK`]s, as the journal makes
/// them; they are copied into an aligned buffer first. Where `O_DIRECT` is
/// refused (a filesystem without it), the file is opened plainly.
#[derive(Debug)]
pub(crate) struct DirectFile {
    file: std::fs::File,
}

impl DirectFile {
    pub(crate) fn open(path: &std::path::Path) -> io::Result<DirectFile> {
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::OpenOptionsExt;
            let direct = rustix::fs::OFlags::DIRECT.bits() as i32;
            match options.clone().custom_flags(direct).open(path) {
                Ok(file) => return Ok(DirectFile { file }),
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(DirectFile {
            file: options.open(path)?,
        })
    }
}

/// A zeroed buffer of `len` bytes starting at a [`BLOCK`] boundary in
/// memory: the vector and where the aligned bytes start in it.
fn aligned(len: usize) -> (Vec<u8>, usize) {
    let buf = vec![0u8; len + BLOCK];
    let misalign = buf.as_ptr() as usize % BLOCK;
    let start = (BLOCK - misalign) % BLOCK;
    (buf, start)
}

impl StorageBackend for DirectFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let first = offset / BLOCK as u64 * BLOCK as u64;
        let skip = (offset - first) as usize;
        let len = (skip + out.len()).next_multiple_of(BLOCK);
        let (mut buf, start) = aligned(len);
        self.file
            .read_exact_at(&mut buf[start..start + len], first)?;
        out.copy_from_slice(&buf[start + skip..start + skip + out.len()]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if !offset.is_multiple_of(BLOCK as u64) || !data.len().is_multiple_of(BLOCK) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "journal writes are whole blocks",
            ));
        }
        let (mut buf, start) = aligned(data.len());
        buf[start..start + data.len()].copy_from_slice(data);
        self.file
            .write_all_at(&buf[start..start + data.len()], offset)
    }
}

fn epoch_value(id: u64, epoch: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&id.to_le_bytes());
    v[8..].copy_from_slice(&epoch.to_le_bytes());
    v
}

fn encode_frame(id: u64, epoch: u64, index: u64, changes: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER + changes.len());
    frame.extend_from_slice(&MAGIC.to_le_bytes());
    frame.extend_from_slice(&id.to_le_bytes());
    frame.extend_from_slice(&epoch.to_le_bytes());
    frame.extend_from_slice(&index.to_le_bytes());
    frame.extend_from_slice(&(changes.len() as u32).to_le_bytes());
    let crc = crc32c(crc32c(0, &frame), changes);
    frame.extend_from_slice(&crc.to_le_bytes());
    frame.extend_from_slice(changes);
    frame
}

/// The changes of the frame at the start of `bytes`, if it is whole and is
/// frame `index` of `id` / `epoch`.
fn decode_frame(bytes: &[u8], id: u64, epoch: u64, index: u64) -> Option<&[u8]> {
    let u32_at = |i: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(i..i + 4)?.try_into().ok()?))
    };
    let u64_at = |i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(bytes.get(i..i + 8)?.try_into().ok()?))
    };
    if u32_at(0)? != MAGIC || u64_at(4)? != id || u64_at(12)? != epoch || u64_at(20)? != index {
        return None;
    }
    let len = u32_at(28)? as usize;
    let crc = u32_at(32)?;
    let changes = bytes.get(HEADER..HEADER.checked_add(len)?)?;
    (crc32c(crc32c(0, &bytes[..32]), changes) == crc).then_some(changes)
}

/// CRC-32C (Castagnoli), bit by bit through a 256-entry table built on
/// first use; `crc` is the value so far (0 to start).
fn crc32c(crc: u32, bytes: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    let mut c = !crc;
    for &b in bytes {
        c = table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Replays the journal's current epoch onto `db` and commits a checkpoint
/// (`Durability::Immediate`) that starts the next one; `journal` then
/// writes that epoch from the file's start. Returns the frames replayed.
/// Run at open, and after the database was reopened (out of space).
pub(crate) fn recover(db: &Database, journal: &mut Journal) -> Result<usize, redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_quick_repair(true);
    let found = {
        let meta = txn.open_table(META)?;
        meta.get(JOURNAL_KEY)?.and_then(|v| {
            let v = v.value();
            let id = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
            let epoch = u64::from_le_bytes(v.get(8..16)?.try_into().ok()?);
            Some((id, epoch))
        })
    };
    let (id, epoch) = found.unwrap_or_else(|| (new_id(), 0));
    let frames = journal.frames(id, epoch)?;
    {
        let mut tables = Tables::open(&txn, &Changes::default())?;
        for changes in &frames {
            tables.apply(changes)?;
        }
        tables
            .meta
            .table
            .insert(JOURNAL_KEY, epoch_value(id, epoch + 1).as_slice())?;
        // Running: a crash from now on is found at the next open.
        tables.meta.table.remove(CLOSED_KEY)?;
    }
    txn.commit()?;
    journal.id = id;
    journal.epoch = epoch + 1;
    journal.offset = 0;
    journal.tail.clear();
    journal.index = 0;
    if !frames.is_empty() {
        tracing::info!(
            frames = frames.len(),
            epoch,
            "Store journal replayed: batches acknowledged after the last checkpoint are back."
        );
    }
    Ok(frames.len())
}

/// Whether the last run ended without its closing checkpoint (a crash):
/// the store is not marked closed (`meta["closed"]`, set by a clean close's
/// checkpoint, removed at open), or the journal holds frames of the epoch
/// `db` names. A store never opened (no `meta`) did not crash.
pub(crate) fn pending(db: &Database, journal: &Journal) -> Result<bool, redb::Error> {
    use redb::ReadableDatabase;
    let txn = db.begin_read()?;
    let meta = match txn.open_table(META) {
        Ok(meta) => meta,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let found = meta.get(JOURNAL_KEY)?.and_then(|v| {
        let v = v.value();
        let id = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
        let epoch = u64::from_le_bytes(v.get(8..16)?.try_into().ok()?);
        Some((id, epoch))
    });
    if meta.get(CLOSED_KEY)?.is_none() {
        return Ok(true);
    }
    match found {
        Some((id, epoch)) => Ok(!journal.frames(id, epoch)?.is_empty()),
        None => Ok(false),
    }
}

/// A journal id unlikely to be any other database's: the clock's
/// nanoseconds mixed with the process id.
fn new_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut z = nanos ^ (u64::from(std::process::id()) << 32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).max(1)
}

/// The ids of the tables in a frame (the numbers `Tables::apply` matches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum TableId {
    Log = 1,
    Cursors = 2,
    Dead = 3,
    Replays = 4,
    Retained = 5,
    Entries = 6,
    Refs = 7,
    Dedup = 8,
    Meta = 9,
    Queues = 10,
    Sessions = 11,
    Definitions = 12,
    Ages = 13,
}

/// An entry removed by [`Recorded::pop_first`].
type Popped<'a, K, V> = (AccessGuard<'a, K>, AccessGuard<'a, V>);

/// The changes of the batch being applied, shared by its tables.
pub(crate) type Changes = Rc<RefCell<Vec<u8>>>;

/// A redb table of the writer's transaction that records every change it
/// makes into the batch's [`Changes`]. Reads go to the table itself
/// (`Deref`).
pub(crate) struct Recorded<'t, K: Key + 'static, V: Value + 'static> {
    table: Table<'t, K, V>,
    id: TableId,
    changes: Changes,
}

impl<'t, K: Key + 'static, V: Value + 'static> Recorded<'t, K, V> {
    pub(crate) fn new(table: Table<'t, K, V>, id: TableId, changes: &Changes) -> Self {
        Recorded {
            table,
            id,
            changes: Rc::clone(changes),
        }
    }

    pub(crate) fn insert<'k, 'v>(
        &mut self,
        key: impl std::borrow::Borrow<K::SelfType<'k>>,
        value: impl std::borrow::Borrow<V::SelfType<'v>>,
    ) -> Result<Option<AccessGuard<'_, V>>, redb::StorageError> {
        record(
            &self.changes,
            self.id,
            INSERT,
            K::as_bytes(key.borrow()).as_ref(),
            Some(V::as_bytes(value.borrow()).as_ref()),
        );
        self.table.insert(key, value)
    }

    /// Removes `key`; a key that was absent records nothing.
    pub(crate) fn remove<'k>(
        &mut self,
        key: impl std::borrow::Borrow<K::SelfType<'k>>,
    ) -> Result<Option<AccessGuard<'_, V>>, redb::StorageError> {
        let old = self.table.remove(key.borrow())?;
        if old.is_some() {
            record(
                &self.changes,
                self.id,
                REMOVE,
                K::as_bytes(key.borrow()).as_ref(),
                None,
            );
        }
        Ok(old)
    }

    /// Removes and returns the first entry.
    pub(crate) fn pop_first(&mut self) -> Result<Option<Popped<'_, K, V>>, redb::StorageError> {
        let popped = self.table.pop_first()?;
        if let Some((k, _)) = &popped {
            record(
                &self.changes,
                self.id,
                REMOVE,
                K::as_bytes(&k.value()).as_ref(),
                None,
            );
        }
        Ok(popped)
    }
}

/// Appends one change to `changes`.
fn record(changes: &Changes, table: TableId, kind: u8, key: &[u8], value: Option<&[u8]>) {
    let mut c = changes.borrow_mut();
    c.push(table as u8);
    c.push(kind);
    c.extend_from_slice(&(key.len() as u32).to_le_bytes());
    c.extend_from_slice(key);
    if let Some(value) = value {
        c.extend_from_slice(&(value.len() as u32).to_le_bytes());
        c.extend_from_slice(value);
    }
}

impl<'t, K: Key + 'static, V: Value + 'static> std::ops::Deref for Recorded<'t, K, V> {
    type Target = Table<'t, K, V>;
    fn deref(&self) -> &Self::Target {
        &self.table
    }
}

/// The tables a batch writes, opened once per transaction; each records
/// its changes for the journal. A replay opens them too and applies frames
/// to the tables underneath (recording nothing).
pub(crate) struct Tables<'t> {
    pub(crate) log: Recorded<'t, u64, &'static [u8]>,
    pub(crate) cursors: Recorded<'t, &'static str, u64>,
    pub(crate) dead: Recorded<'t, u64, &'static [u8]>,
    pub(crate) replays: Recorded<'t, u64, &'static [u8]>,
    pub(crate) retained: Recorded<'t, &'static str, &'static [u8]>,
    pub(crate) entries: Recorded<'t, (u64, u64), u32>,
    pub(crate) refs: Recorded<'t, u64, u32>,
    pub(crate) dedup: Recorded<'t, &'static str, u64>,
    pub(crate) meta: Recorded<'t, &'static str, &'static [u8]>,
    pub(crate) queues: Recorded<'t, &'static str, u64>,
    pub(crate) sessions: Recorded<'t, &'static str, &'static [u8]>,
    pub(crate) definitions: Recorded<'t, &'static str, &'static [u8]>,
    pub(crate) ages: Recorded<'t, u64, u64>,
}

impl<'t> Tables<'t> {
    pub(crate) fn open(txn: &'t WriteTransaction, c: &Changes) -> Result<Tables<'t>, redb::Error> {
        use TableId as T;
        Ok(Tables {
            log: Recorded::new(txn.open_table(LOG)?, T::Log, c),
            cursors: Recorded::new(txn.open_table(CURSORS)?, T::Cursors, c),
            dead: Recorded::new(txn.open_table(DEAD_LETTERS)?, T::Dead, c),
            replays: Recorded::new(txn.open_table(REPLAYS)?, T::Replays, c),
            retained: Recorded::new(txn.open_table(RETAINED)?, T::Retained, c),
            entries: Recorded::new(txn.open_table(QUEUE_ENTRIES)?, T::Entries, c),
            refs: Recorded::new(txn.open_table(REFS)?, T::Refs, c),
            dedup: Recorded::new(txn.open_table(DEDUP)?, T::Dedup, c),
            meta: Recorded::new(txn.open_table(META)?, T::Meta, c),
            queues: Recorded::new(txn.open_table(QUEUES)?, T::Queues, c),
            sessions: Recorded::new(txn.open_table(SESSIONS)?, T::Sessions, c),
            definitions: Recorded::new(txn.open_table(DEFINITIONS)?, T::Definitions, c),
            ages: Recorded::new(txn.open_table(AGES)?, T::Ages, c),
        })
    }

    /// Applies one frame's changes. A frame that does not parse was not
    /// written by this store (its CRC matched): refused as corruption.
    fn apply(&mut self, mut changes: &[u8]) -> Result<(), redb::Error> {
        let damaged = || redb::Error::Corrupted("store journal frame does not parse".into());
        while !changes.is_empty() {
            let (change, rest) = parse(changes).ok_or_else(damaged)?;
            changes = rest;
            match change.table {
                1 => put(&mut self.log.table, &change)?,
                2 => put(&mut self.cursors.table, &change)?,
                3 => put(&mut self.dead.table, &change)?,
                4 => put(&mut self.replays.table, &change)?,
                5 => put(&mut self.retained.table, &change)?,
                6 => put(&mut self.entries.table, &change)?,
                7 => put(&mut self.refs.table, &change)?,
                8 => put(&mut self.dedup.table, &change)?,
                9 => put(&mut self.meta.table, &change)?,
                10 => put(&mut self.queues.table, &change)?,
                11 => put(&mut self.sessions.table, &change)?,
                12 => put(&mut self.definitions.table, &change)?,
                13 => put(&mut self.ages.table, &change)?,
                _ => return Err(damaged()),
            }
        }
        Ok(())
    }
}

struct Change<'a> {
    table: u8,
    key: &'a [u8],
    /// `None`: the key is removed.
    value: Option<&'a [u8]>,
}

fn parse(bytes: &[u8]) -> Option<(Change<'_>, &[u8])> {
    let table = *bytes.first()?;
    let kind = *bytes.get(1)?;
    let take = |at: usize| -> Option<(&[u8], usize)> {
        let len = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
        let start = at + 4;
        Some((bytes.get(start..start.checked_add(len)?)?, start + len))
    };
    let (key, end) = take(2)?;
    match kind {
        INSERT => {
            let (value, end) = take(end)?;
            Some((
                Change {
                    table,
                    key,
                    value: Some(value),
                },
                &bytes[end..],
            ))
        }
        REMOVE => Some((
            Change {
                table,
                key,
                value: None,
            },
            &bytes[end..],
        )),
        _ => None,
    }
}

fn put<K: Key + 'static, V: Value + 'static>(
    table: &mut Table<'_, K, V>,
    change: &Change<'_>,
) -> Result<(), redb::Error> {
    let key = K::from_bytes(change.key);
    match change.value {
        Some(value) => {
            table.insert(key, V::from_bytes(value))?;
        }
        None => {
            table.remove(key)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(0, b"123456789"), 0xe306_9283);
        let split = crc32c(crc32c(0, b"1234"), b"56789");
        assert_eq!(split, 0xe306_9283);
    }

    #[test]
    fn a_frame_decodes_only_whole_and_with_its_id_epoch_and_index() {
        let frame = encode_frame(7, 3, 2, b"changes");
        assert_eq!(decode_frame(&frame, 7, 3, 2), Some(&b"changes"[..]));
        assert_eq!(decode_frame(&frame, 8, 3, 2), None, "another database");
        assert_eq!(decode_frame(&frame, 7, 4, 2), None, "another epoch");
        assert_eq!(decode_frame(&frame, 7, 3, 1), None, "out of order");
        assert_eq!(
            decode_frame(&frame[..frame.len() - 1], 7, 3, 2),
            None,
            "cut"
        );
        let mut torn = frame.clone();
        let last = torn.len() - 1;
        torn[last] ^= 1;
        assert_eq!(decode_frame(&torn, 7, 3, 2), None, "torn");
    }
}
