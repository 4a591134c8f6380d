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
//! frame starts at a [`BLOCK`] boundary and is written as whole blocks,
//! padded with zeros, so that no write ever touches a block holding an
//! acknowledged frame: a write torn by a power cut can lose only the
//! batch it was writing. On Linux the file is opened with `O_DIRECT`
//! ([`DirectFile`]): through the page cache, a kernel with large folios
//! (ext4 on 6.x) writes back the whole folio a small write dirtied — up to
//! 2 MiB for 300 bytes — where the journal means to write one 4 KiB block.
//!
//! # Frame
//!
//! `magic u32 | journal id u64 | epoch u64 | index u64 | len u32 | crc u32 | changes[len]`,
//! little-endian, then zeros up to the next block boundary, where the next
//! frame starts (frames of the first format, [`MAGIC_V1`], follow each
//! other unpadded); `index` counts the frames of the epoch from 0 and `crc`
//! (CRC-32C) covers the fields before it and the changes. The journal id
//! is drawn when the database first gets a journal and kept in its `meta`,
//! so frames left in the file by another database (one moved aside as
//! damaged) never match.
//!
//! # Changes
//!
//! `table u8 | kind u8 | ...`, in redb's own encoding of keys and values,
//! lengths as LEB128 varints:
//!
//! - 1, insert: `key_len | key | value_len | value`;
//! - 2, remove: `key_len | key`;
//! - 3, insert next: `value_len | value`, under the key after the previous
//!   change's (an insert into the same table of an 8-byte key, read as a
//!   little-endian `u64`, plus one): the log's appends in a batch;
//! - 4, remove run: `count u32` (little-endian, fixed so that the writer
//!   extends it in place), the `count` keys after the previous change's
//!   (a remove in the same table of an 8-byte key): a retirement's
//!   deletes.
//!
//! Kinds 3 and 4 only abbreviate kinds 1 and 2: a key is never inferred
//! from a table's contents. Every change is a blind write (a key gets a
//! value, or no value), so replaying frames `0..m` of an epoch onto the
//! database as of any of its commits in that epoch gives the state after
//! frame `m - 1`, whichever of them redb had made durable.
//!
//! Frames of the first format (magic [`MAGIC_V1`]: kinds 1 and 2 only,
//! lengths as `u32`, unpadded) are still replayed, so that a journal left
//! by an older gateway is not lost to an upgrade; new frames are always of
//! the second. (An older gateway stops its replay at a frame of the
//! second format: downgrade only after a clean stop.)

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
pub(crate) const CAPACITY: u64 = 4 << 20;
/// Unit of the journal's writes (offsets and lengths), and their memory
/// alignment for `O_DIRECT`.
pub(crate) const BLOCK: usize = 4096;
/// Name of the journal file inside the data directory.
pub const JOURNAL_FILE: &str = "edge.journal";

/// Magic of a frame whose changes are in the first format (fixed `u32`
/// lengths, no runs): replayed, never written.
const MAGIC_V1: u32 = 0x4a47_4445;
const MAGIC: u32 = 0x4a47_4446;
const HEADER: usize = 4 + 8 + 8 + 8 + 4 + 4;
const INSERT: u8 = 1;
const REMOVE: u8 = 2;
const INSERT_NEXT: u8 = 3;
const REMOVE_RUN: u8 = 4;

/// The journal of an open store, owned by the writer.
pub(crate) struct Journal {
    io: Box<dyn StorageBackend>,
    capacity: u64,
    id: u64,
    epoch: u64,
    /// Where the next frame goes: a block boundary.
    offset: u64,
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
    /// up to that length if it is shorter. A file that already holds a
    /// journal (a smaller one, an older gateway's) and has no room to grow
    /// keeps its length: its frames must still be replayed, and it works
    /// on at that size. Its epoch is set by [`recover`].
    pub(crate) fn new(io: Box<dyn StorageBackend>, capacity: u64) -> io::Result<Journal> {
        let mut capacity = capacity.div_ceil(BLOCK as u64).max(1) * BLOCK as u64;
        let len = io.len()?;
        if len < capacity {
            // Whole blocks from the start of the one the file ends in.
            let kept = len / BLOCK as u64 * BLOCK as u64;
            let grown = (|| {
                let zeros = vec![0u8; 64 << 10];
                let mut at = kept;
                while at < capacity {
                    let n = (capacity - at).min(zeros.len() as u64);
                    io.write(at, &zeros[..n as usize])?;
                    at += n;
                }
                io.sync_data()
            })();
            if let Err(e) = grown {
                // Give back what the partial fill took (best effort): the
                // database may need it, and the next open must see the
                // journal's own length again.
                let _ = io.set_len(len);
                if kept == 0 || !crate::space::is_io_no_space(&e) {
                    return Err(e);
                }
                tracing::warn!(
                    bytes = kept,
                    error = %e,
                    "No room to grow the store journal: it keeps its present size (checkpoints come sooner)."
                );
                capacity = kept;
            }
        }
        Ok(Journal {
            io,
            capacity,
            id: 0,
            epoch: 0,
            offset: 0,
            index: 0,
        })
    }

    /// Bytes a frame of `changes` takes in the file, padding included.
    pub(crate) fn frame_len(changes: usize) -> u64 {
        (HEADER + changes).next_multiple_of(BLOCK) as u64
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
        let mut frame = encode_frame(self.id, self.epoch, self.index, changes);
        frame.resize(frame.len().next_multiple_of(BLOCK), 0);
        self.io.write(self.offset, &frame)?;
        self.io.sync_data()?;
        self.offset += frame.len() as u64;
        self.index += 1;
        Ok(())
    }

    /// A checkpoint committed: the next epoch starts at the file's start.
    pub(crate) fn start_next_epoch(&mut self) {
        self.epoch += 1;
        self.offset = 0;
        self.index = 0;
    }

    /// The frames of `id` / `epoch` from the start of the file, up to the
    /// first that is missing, torn or of another epoch.
    fn frames(&self, id: u64, epoch: u64) -> io::Result<Vec<Frame>> {
        let len = self.io.len()?.min(self.capacity);
        let mut all = vec![0u8; len as usize];
        self.io.read(0, &mut all)?;
        let mut out = Vec::new();
        let mut at = 0usize;
        while let Some((format, changes)) = all
            .get(at..)
            .and_then(|rest| decode_frame(rest, id, epoch, out.len() as u64))
        {
            at += HEADER + changes.len();
            if format == Format::V2 {
                at = at.next_multiple_of(BLOCK);
            }
            out.push(Frame {
                format,
                changes: changes.to_vec(),
            });
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

/// The format of a frame's changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// [`MAGIC_V1`]: kinds 1 and 2, `u32` lengths.
    V1,
    /// [`MAGIC`]: the four kinds, varint lengths.
    V2,
}

/// A frame read back from the journal.
struct Frame {
    format: Format,
    changes: Vec<u8>,
}

/// The format and changes of the frame at the start of `bytes`, if it is
/// whole and is frame `index` of `id` / `epoch`.
fn decode_frame(bytes: &[u8], id: u64, epoch: u64, index: u64) -> Option<(Format, &[u8])> {
    let u32_at = |i: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(i..i + 4)?.try_into().ok()?))
    };
    let u64_at = |i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(bytes.get(i..i + 8)?.try_into().ok()?))
    };
    let format = match u32_at(0)? {
        MAGIC => Format::V2,
        MAGIC_V1 => Format::V1,
        _ => return None,
    };
    if u64_at(4)? != id || u64_at(12)? != epoch || u64_at(20)? != index {
        return None;
    }
    let len = u32_at(28)? as usize;
    let crc = u32_at(32)?;
    let changes = bytes.get(HEADER..HEADER.checked_add(len)?)?;
    (crc32c(crc32c(0, &bytes[..32]), changes) == crc).then_some((format, changes))
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
        for frame in &frames {
            tables.apply(frame)?;
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
pub(crate) type Changes = Rc<RefCell<ChangeLog>>;

/// A batch's changes, encoded as a frame holds them (see "Changes").
#[derive(Debug, Default)]
pub(crate) struct ChangeLog {
    bytes: Vec<u8>,
    /// The last change, when a run can continue it.
    run: Option<Run>,
}

/// The last change of a [`ChangeLog`], of an 8-byte key.
#[derive(Debug, Clone, Copy)]
struct Run {
    table: u8,
    /// [`INSERT`] or [`REMOVE`].
    kind: u8,
    /// The last key of the run, as a little-endian `u64`.
    key: u64,
    /// The keys a [`REMOVE_RUN`] after the first remove covers, and where
    /// its count is written, once there is one.
    count: u32,
    count_at: Option<usize>,
}

impl ChangeLog {
    /// The encoded changes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Appends one change (`value`: `None` for a remove).
    fn push(&mut self, table: TableId, key: &[u8], value: Option<&[u8]>) {
        let table = table as u8;
        let key8 = <[u8; 8]>::try_from(key).ok().map(u64::from_le_bytes);
        let kind = if value.is_some() { INSERT } else { REMOVE };
        if let (Some(run), Some(k)) = (self.run.as_mut(), key8)
            && run.table == table
            && run.kind == kind
            && run.key.checked_add(1) == Some(k)
        {
            match value {
                Some(value) => {
                    self.bytes.extend_from_slice(&[table, INSERT_NEXT]);
                    put_varint(&mut self.bytes, value.len());
                    self.bytes.extend_from_slice(value);
                    run.key = k;
                    return;
                }
                None if run.count < u32::MAX => {
                    let at = *run.count_at.get_or_insert_with(|| {
                        self.bytes
                            .extend_from_slice(&[table, REMOVE_RUN, 0, 0, 0, 0]);
                        self.bytes.len() - 4
                    });
                    run.count += 1;
                    self.bytes[at..at + 4].copy_from_slice(&run.count.to_le_bytes());
                    run.key = k;
                    return;
                }
                // A full run: a plain remove starts the next.
                None => {}
            }
        }
        self.bytes.extend_from_slice(&[table, kind]);
        put_varint(&mut self.bytes, key.len());
        self.bytes.extend_from_slice(key);
        if let Some(value) = value {
            put_varint(&mut self.bytes, value.len());
            self.bytes.extend_from_slice(value);
        }
        self.run = key8.map(|key| Run {
            table,
            kind,
            key,
            count: 0,
            count_at: None,
        });
    }
}

/// Appends `n` as an unsigned LEB128 varint.
fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Reads an unsigned LEB128 varint (at most 10 bytes) from the start of
/// `bytes`: its value and the bytes after it.
fn take_varint(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let mut n: u64 = 0;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        n |= u64::from(b & 0x7f).checked_shl(7 * i as u32)?;
        if b & 0x80 == 0 {
            return Some((usize::try_from(n).ok()?, &bytes[i + 1..]));
        }
    }
    None
}

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
                K::as_bytes(&k.value()).as_ref(),
                None,
            );
        }
        Ok(popped)
    }
}

/// Appends one change to `changes`.
fn record(changes: &Changes, table: TableId, key: &[u8], value: Option<&[u8]>) {
    changes.borrow_mut().push(table, key, value);
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
    fn apply(&mut self, frame: &Frame) -> Result<(), redb::Error> {
        for_each_change(frame.format, &frame.changes, |change| match change.table {
            1 => put(&mut self.log.table, &change),
            2 => put(&mut self.cursors.table, &change),
            3 => put(&mut self.dead.table, &change),
            4 => put(&mut self.replays.table, &change),
            5 => put(&mut self.retained.table, &change),
            6 => put(&mut self.entries.table, &change),
            7 => put(&mut self.refs.table, &change),
            8 => put(&mut self.dedup.table, &change),
            9 => put(&mut self.meta.table, &change),
            10 => put(&mut self.queues.table, &change),
            11 => put(&mut self.sessions.table, &change),
            12 => put(&mut self.definitions.table, &change),
            13 => put(&mut self.ages.table, &change),
            _ => Err(damaged()),
        })
    }
}

fn damaged() -> redb::Error {
    redb::Error::Corrupted("store journal frame does not parse".into())
}

struct Change<'a> {
    table: u8,
    key: &'a [u8],
    /// `None`: the key is removed.
    value: Option<&'a [u8]>,
}

/// The field at the start of `bytes` (a length, then that many bytes):
/// the field and the bytes after it.
fn take_field(format: Format, bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (n, rest) = match format {
        Format::V1 => (
            u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize,
            bytes.get(4..)?,
        ),
        Format::V2 => take_varint(bytes)?,
    };
    (n <= rest.len()).then(|| rest.split_at(n))
}

/// Calls `f` with every change of a frame's `changes`, in order, runs
/// spelled out key by key.
fn for_each_change(
    format: Format,
    mut bytes: &[u8],
    mut f: impl FnMut(Change<'_>) -> Result<(), redb::Error>,
) -> Result<(), redb::Error> {
    let take = |bytes| take_field(format, bytes).ok_or_else(damaged);
    let runs = format == Format::V2;
    // The last change, when it has an 8-byte key: (table, kind, key).
    let mut last: Option<(u8, u8, u64)> = None;
    while !bytes.is_empty() {
        let (&table, rest) = bytes.split_first().ok_or_else(damaged)?;
        let (&kind, rest) = rest.split_first().ok_or_else(damaged)?;
        match kind {
            INSERT | REMOVE => {
                let (key, mut rest) = take(rest)?;
                let value = if kind == INSERT {
                    let (value, after) = take(rest)?;
                    rest = after;
                    Some(value)
                } else {
                    None
                };
                f(Change { table, key, value })?;
                last = <[u8; 8]>::try_from(key)
                    .ok()
                    .map(|k| (table, kind, u64::from_le_bytes(k)));
                bytes = rest;
            }
            INSERT_NEXT if runs => {
                let key = match last {
                    Some((t, INSERT, k)) if t == table => k.checked_add(1).ok_or_else(damaged)?,
                    _ => return Err(damaged()),
                };
                let (value, rest) = take(rest)?;
                f(Change {
                    table,
                    key: &key.to_le_bytes(),
                    value: Some(value),
                })?;
                last = Some((table, INSERT, key));
                bytes = rest;
            }
            REMOVE_RUN if runs => {
                let first = match last {
                    Some((t, REMOVE, k)) if t == table => k,
                    _ => return Err(damaged()),
                };
                let count = rest
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_le_bytes)
                    .ok_or_else(damaged)?;
                let end = first.checked_add(u64::from(count)).ok_or_else(damaged)?;
                for key in (first..end).map(|k| k + 1) {
                    f(Change {
                        table,
                        key: &key.to_le_bytes(),
                        value: None,
                    })?;
                }
                last = Some((table, REMOVE, end));
                bytes = &rest[4..];
            }
            _ => return Err(damaged()),
        }
    }
    Ok(())
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
        assert_eq!(
            decode_frame(&frame, 7, 3, 2),
            Some((Format::V2, &b"changes"[..]))
        );
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

    /// Every change of `log`, spelled out.
    fn spelled(format: Format, bytes: &[u8]) -> Vec<(u8, Vec<u8>, Option<Vec<u8>>)> {
        let mut out = Vec::new();
        for_each_change(format, bytes, |c| {
            out.push((c.table, c.key.to_vec(), c.value.map(<[u8]>::to_vec)));
            Ok(())
        })
        .expect("parses");
        out
    }

    #[test]
    fn runs_abbreviate_consecutive_keys_and_spell_out_as_written() {
        let seq = |n: u64| n.to_le_bytes().to_vec();
        let mut written: Vec<(TableId, Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        // Appends 10..20 to the log, a cursor between, removes 10..15 and
        // 17, a remove of 18 in another table, a string key of 8 bytes,
        // a gap, and a run at u64::MAX (no key after it).
        for k in 10..20 {
            written.push((TableId::Log, seq(k), Some(vec![k as u8; 3])));
        }
        written.push((TableId::Cursors, b"up".to_vec(), Some(seq(15))));
        for k in 10..15 {
            written.push((TableId::Log, seq(k), None));
        }
        written.push((TableId::Log, seq(17), None));
        written.push((TableId::Refs, seq(18), None));
        written.push((TableId::Log, seq(19), None));
        written.push((TableId::Sessions, b"client-1".to_vec(), Some(b"s".to_vec())));
        written.push((TableId::Sessions, b"client-2".to_vec(), None));
        written.push((TableId::Log, seq(u64::MAX - 1), Some(vec![])));
        written.push((TableId::Log, seq(u64::MAX), Some(vec![1])));
        written.push((TableId::Log, seq(u64::MAX - 1), None));
        written.push((TableId::Log, seq(u64::MAX), None));
        let mut log = ChangeLog::default();
        for (table, key, value) in &written {
            log.push(*table, key, value.as_deref());
        }
        let expected: Vec<_> = written
            .iter()
            .map(|(t, k, v)| (*t as u8, k.clone(), v.clone()))
            .collect();
        assert_eq!(spelled(Format::V2, log.as_bytes()), expected);
        // A run costs a follow-on append 2 bytes and its value's length,
        // a follow-on remove nothing.
        let mut appends = ChangeLog::default();
        for k in 10..20 {
            appends.push(TableId::Log, &seq(k), Some(&[0; 3]));
        }
        assert_eq!(appends.len(), (2 + 1 + 8 + 1 + 3) + 9 * (2 + 1 + 3));
        let mut removes = ChangeLog::default();
        for k in 10..1000 {
            removes.push(TableId::Log, &seq(k), None);
        }
        assert_eq!(removes.len(), (2 + 1 + 8) + (2 + 4));
    }

    #[test]
    fn a_frame_of_the_first_format_is_still_read() {
        // table 1, insert, u32 key length, key, u32 value length, value;
        // then a remove of the same key.
        let mut v1 = vec![1u8, INSERT];
        v1.extend_from_slice(&8u32.to_le_bytes());
        v1.extend_from_slice(&7u64.to_le_bytes());
        v1.extend_from_slice(&2u32.to_le_bytes());
        v1.extend_from_slice(b"hi");
        v1.extend_from_slice(&[1u8, REMOVE]);
        v1.extend_from_slice(&8u32.to_le_bytes());
        v1.extend_from_slice(&7u64.to_le_bytes());
        let mut frame = encode_frame(7, 3, 0, &v1);
        frame[..4].copy_from_slice(&MAGIC_V1.to_le_bytes());
        let crc = crc32c(crc32c(0, &frame[..32]), &v1);
        frame[32..36].copy_from_slice(&crc.to_le_bytes());
        let (format, changes) = decode_frame(&frame, 7, 3, 0).expect("whole");
        assert_eq!(format, Format::V1);
        assert_eq!(
            spelled(format, changes),
            vec![
                (1, 7u64.to_le_bytes().to_vec(), Some(b"hi".to_vec())),
                (1, 7u64.to_le_bytes().to_vec(), None)
            ]
        );
        // A run in a first-format frame, or one with nothing to follow,
        // does not parse.
        let run = [1u8, REMOVE_RUN, 1, 0, 0, 0];
        assert!(for_each_change(Format::V1, &run, |_| Ok(())).is_err());
        assert!(for_each_change(Format::V2, &run, |_| Ok(())).is_err());
        assert!(for_each_change(Format::V2, &[1u8, INSERT_NEXT, 0], |_| Ok(())).is_err());
    }

    #[test]
    fn varints_round_trip_and_refuse_overlong_input() {
        for n in [0usize, 1, 127, 128, 300, 16_383, 16_384, u32::MAX as usize] {
            let mut out = Vec::new();
            put_varint(&mut out, n);
            out.push(0xee);
            assert_eq!(take_varint(&out), Some((n, &[0xee][..])), "{n}");
        }
        assert_eq!(take_varint(&[0x80; 11]), None);
        assert_eq!(take_varint(&[0x80]), None);
    }

    /// A journal file in memory that keeps every write's place.
    #[derive(Debug, Default)]
    struct Recording {
        bytes: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
        writes: std::sync::Arc<std::sync::Mutex<Vec<(u64, usize)>>>,
        /// Writes past this many bytes fail as a full disk.
        room: Option<u64>,
    }

    impl StorageBackend for Recording {
        fn len(&self) -> io::Result<u64> {
            Ok(self.bytes.lock().unwrap().len() as u64)
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
            let bytes = self.bytes.lock().unwrap();
            out.copy_from_slice(&bytes[offset as usize..offset as usize + out.len()]);
            Ok(())
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.bytes.lock().unwrap().resize(len as usize, 0);
            Ok(())
        }
        fn sync_data(&self) -> io::Result<()> {
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            if self
                .room
                .is_some_and(|room| offset + data.len() as u64 > room)
            {
                return Err(io::Error::from(io::ErrorKind::StorageFull));
            }
            let mut bytes = self.bytes.lock().unwrap();
            let end = offset as usize + data.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[offset as usize..end].copy_from_slice(data);
            self.writes.lock().unwrap().push((offset, data.len()));
            Ok(())
        }
    }

    #[test]
    fn frames_start_on_blocks_and_no_write_touches_an_earlier_frame() {
        let file = Recording::default();
        let writes = std::sync::Arc::clone(&file.writes);
        let mut journal = Journal::new(Box::new(file), 64 * BLOCK as u64).unwrap();
        journal.id = 9;
        journal.epoch = 1;
        writes.lock().unwrap().clear(); // the zero fill
        let frames: Vec<Vec<u8>> = vec![vec![1; 10], vec![2; BLOCK], vec![3; 3 * BLOCK + 5]];
        for f in &frames {
            assert!(journal.fits(f.len()));
            journal.append(f).unwrap();
        }
        let writes = writes.lock().unwrap().clone();
        assert_eq!(writes.len(), frames.len(), "one write per frame");
        let mut end = 0;
        for (&(offset, len), f) in writes.iter().zip(&frames) {
            assert_eq!(offset, end, "each frame is written after the last");
            assert!(offset.is_multiple_of(BLOCK as u64) && len.is_multiple_of(BLOCK));
            assert_eq!(len as u64, Journal::frame_len(f.len()));
            end = offset + len as u64;
        }
        assert_eq!(journal.offset, end);
        let read: Vec<Vec<u8>> = journal
            .frames(9, 1)
            .unwrap()
            .into_iter()
            .map(|f| f.changes)
            .collect();
        assert_eq!(read, frames);
        // What is left: 64 blocks less the 1 + 2 + 4 written.
        assert!(journal.fits(57 * BLOCK - HEADER));
        assert!(!journal.fits(57 * BLOCK - HEADER + 1));
    }

    #[test]
    fn a_journal_that_cannot_grow_keeps_its_size_and_its_frames() {
        // An older, smaller journal with a frame in it, on a full disk.
        let small = Recording::default();
        let written = std::sync::Arc::clone(&small.bytes);
        let mut old = Journal::new(Box::new(small), 4 * BLOCK as u64).unwrap();
        old.id = 5;
        old.epoch = 2;
        old.append(b"acknowledged").unwrap();
        let bytes = written.lock().unwrap().clone();
        let full = Recording {
            bytes: std::sync::Arc::new(std::sync::Mutex::new(bytes)),
            room: Some(4 * BLOCK as u64),
            ..Recording::default()
        };
        let journal = Journal::new(Box::new(full), 64 * BLOCK as u64).unwrap();
        assert_eq!(journal.capacity, 4 * BLOCK as u64);
        let frames = journal.frames(5, 2).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].changes, b"acknowledged");
        // A new journal with no room at all is refused (the store then
        // runs without one: nothing was ever written to it).
        let empty = Recording {
            room: Some(0),
            ..Recording::default()
        };
        let refused = Journal::new(Box::new(empty), 64 * BLOCK as u64).unwrap_err();
        assert!(crate::space::is_io_no_space(&refused), "{refused}");
        // A fill that gets part of the way gives the space back.
        // (It writes 64 KiB at a time: the first write fits, the second not.)
        let partial = Recording {
            room: Some(20 * BLOCK as u64),
            ..Recording::default()
        };
        let bytes = std::sync::Arc::clone(&partial.bytes);
        let writes = std::sync::Arc::clone(&partial.writes);
        assert!(Journal::new(Box::new(partial), 64 * BLOCK as u64).is_err());
        assert_eq!(
            writes.lock().unwrap().len(),
            1,
            "part of the fill was written"
        );
        assert_eq!(
            bytes.lock().unwrap().len(),
            0,
            "the partial fill is released"
        );
    }

    #[test]
    fn packed_frames_of_the_first_format_are_walked_in_order() {
        // Two first-format frames back to back, as an older gateway wrote
        // them (no padding), then zeros.
        let v1_frame = |index: u64, key: u64| {
            let mut changes = vec![1u8, INSERT];
            changes.extend_from_slice(&8u32.to_le_bytes());
            changes.extend_from_slice(&key.to_le_bytes());
            changes.extend_from_slice(&1u32.to_le_bytes());
            changes.push(key as u8);
            let mut frame = encode_frame(4, 8, index, &changes);
            frame[..4].copy_from_slice(&MAGIC_V1.to_le_bytes());
            let crc = crc32c(crc32c(0, &frame[..32]), &changes);
            frame[32..36].copy_from_slice(&crc.to_le_bytes());
            frame
        };
        let mut bytes = v1_frame(0, 10);
        bytes.extend(v1_frame(1, 11));
        bytes.resize(4 * BLOCK, 0);
        let file = Recording {
            bytes: std::sync::Arc::new(std::sync::Mutex::new(bytes)),
            ..Recording::default()
        };
        let journal = Journal::new(Box::new(file), 4 * BLOCK as u64).unwrap();
        let frames = journal.frames(4, 8).unwrap();
        let keys: Vec<_> = frames
            .iter()
            .flat_map(|f| {
                assert_eq!(f.format, Format::V1);
                spelled(f.format, &f.changes)
            })
            .map(|(_, key, value)| (key, value))
            .collect();
        assert_eq!(
            keys,
            vec![
                (10u64.to_le_bytes().to_vec(), Some(vec![10])),
                (11u64.to_le_bytes().to_vec(), Some(vec![11]))
            ]
        );
    }

    #[test]
    fn a_run_at_the_last_key_neither_wraps_nor_panics() {
        // A remove of u64::MAX, then a run of 0 after it: nothing more;
        // a run of 1 after it would wrap, and does not parse.
        let mut bytes = vec![1u8, REMOVE, 8];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        let mut empty_run = bytes.clone();
        empty_run.extend_from_slice(&[1, REMOVE_RUN, 0, 0, 0, 0]);
        assert_eq!(spelled(Format::V2, &empty_run).len(), 1);
        let mut wrapping = bytes;
        wrapping.extend_from_slice(&[1, REMOVE_RUN, 1, 0, 0, 0]);
        assert!(for_each_change(Format::V2, &wrapping, |_| Ok(())).is_err());
        // And the writer starts a new change rather than wrap.
        let mut log = ChangeLog::default();
        log.push(TableId::Log, &u64::MAX.to_le_bytes(), None);
        log.push(TableId::Log, &0u64.to_le_bytes(), None);
        assert_eq!(
            spelled(Format::V2, log.as_bytes()),
            vec![
                (1, u64::MAX.to_le_bytes().to_vec(), None),
                (1, 0u64.to_le_bytes().to_vec(), None)
            ]
        );
    }
}
