//! The durable store of edge-gateway: the message log, its cursors, durable
//! queues, retained messages, sessions and dead letters in one redb
//! database, written by one thread with group commit.
//!
//! # What persists (schema 2)
//!
//! One redb database, `<data_dir>/edge.redb`, and its write-ahead journal,
//! `<data_dir>/edge.journal` (see "Recovery"); after damage, the file
//! kept aside, `edge.redb.corrupt-<unix seconds>[.<n>]` (and `.journal`),
//! and, while a salvage runs, `edge.redb.salvage`:
//!
//! | table           | key                  | value                                       |
//! |-----------------|----------------------|---------------------------------------------|
//! | `log`           | `u64` seq            | [`Record`]: bytes the core encoded (opaque)  |
//! | `cursors`       | `&str` name          | `u64`: next seq its owner has to forward    |
//! | `queues`        | `&str` name          | `u64` queue id                              |
//! | `queue_entries` | `(u64 queue, u64 seq)` | `u32` owner state (0 = queued)            |
//! | `refs`          | `u64` seq            | `u32`: queue entries referencing the record |
//! | `dedup`         | `&str` key           | `u64` seq of the append that recorded it (a publisher's idempotency key: an MQTT QoS 2 packet id awaiting PUBREL, `session/<client id>/<packet id>`; a downstream's `message_id`, `downstream/<name>/<message_id>`) |
//! | `retained`      | `&str` topic         | encoded [`Record`]                          |
//! | `sessions`      | `&str` client id     | the owner's encoding (opaque here)          |
//! | `definitions`   | `&str` key           | an adapter's own definitions (AMQP exchanges, queues, bindings), opaque here |
//! | `dead_letters`  | `u64` seq parked at  | typed dead letter + record (`dead.rs`)      |
//! | `replays`       | `u64` seq            | replay mark of a replayed dead letter       |
//! | `ages`          | `u64` append time (unix ms) | `u64`: first seq appended then (one entry per `max(1 s, max_age / 1000)` of appends; kept only with `max_age`) |
//! | `meta`          | `&str`               | `schema_version` (`u32` LE, 2), `retired_below` (`u64` LE), `gateway_id`, `stats` (six `u64` LE: live messages/bytes, dead letters/bytes, retained/bytes), `next_queue_id`, `journal` (journal id, current epoch: two `u64` LE), `closed` (present from a clean close's checkpoint until the next open) |
//!
//! The store gives records no meaning: it never parses a message's
//! headers. What it needs itself (who parked a record, which seq its
//! message id has, what references it) lives in typed columns.
//!
//! A store of schema 1 is migrated at open, in the opening transaction
//! (`migrate.rs`); another version is refused ([`OpenError::UnknownSchema`]),
//! never guessed at.
//!
//! # Invariants
//!
//! - Seqs start at the seed a new store is created with (1 by default; the
//!   gateway seeds from the clock so a replacement store never repeats the
//!   ids of a lost one), are assigned by the writer in inbox order and are never
//!   reused: after a restart the next seq is above the last record, every
//!   cursor and `retired_below`. Records queued by one caller commit in the
//!   order queued.
//! - An append is acknowledged (its [`Commit`] resolves `Ok(seq)`) only after
//!   the write transaction holding it — with its queue entries and its
//!   retained-table change — is durable: its journal frame synced, or (a
//!   checkpoint, or no journal) committed with `Durability::Immediate`. A
//!   batch whose commit fails acknowledges nothing.
//! - A cursor is the next seq its owner has to forward: everything below it is
//!   done. It never moves backwards and never past the next seq to be
//!   assigned. The cursors named in [`StoreOptions::cursors`] are created at
//!   open (at the first record) and others deleted; more can be created
//!   (at the next seq) and dropped at run time. A lazy move
//!   ([`Store::advance_cursor_lazily`], the forwarders') gets no commit of
//!   its own: the writer holds it for the next batch with other work, at
//!   most [`CURSOR_DELAY`], and not at all while the store is full
//!   (`writer/defer.rs`); a crash loses at most that much of the progress
//!   it records, which means messages forwarded again, never lost. In a
//!   batch, records the cursor moves ahead of an append retire before
//!   that append is weighed against the quota.
//! - **Reference rule.** A message fanned out to N durable queues is stored
//!   once: each queue holds an entry `(queue, seq)` and `refs[seq]` counts
//!   them (a queue named twice gets one entry, a deleted one none). A
//!   record is retired when every cursor is past it AND no entry references
//!   it: retirement deletes the unreferenced records below the smallest
//!   cursor (at most 10 000 per transaction; the writer continues while
//!   idle) and passes over the referenced ones; the entry that drops a
//!   passed record's count to zero deletes it. With no cursor nothing is
//!   retired, unless the store is opened with `retire_without_cursors` (the
//!   gateway without upstreams): then every unreferenced record is.
//! - Quota: the encoded bytes of the log, the dead letters and the retained
//!   messages (topic and record), kept in `meta` with every commit (opening
//!   does not scan). An append adds its record to the log and, when it sets
//!   a retained message, the topic and record again, less the retained
//!   message it replaces or clears. An append that would take the total
//!   past `max_bytes` (or past what the disk allows, `space.rs`) is refused
//!   with [`AppendError::Full`], and so is every later append of the same
//!   batch; after that, every append is refused until retirement has made
//!   room for what the largest refused append would add.
//!   So a small message cannot slip in behind a refused larger one of the
//!   same publisher, and its order has no holes. (A record larger than the
//!   whole quota is refused alone.) With `WhenFull::DropOldest` the oldest
//!   log records are deleted instead until the append fits (cursors below
//!   the new first record move up to it; queue entries of a dropped record
//!   read as gone; `retired_below` is raised so no seq is reused).
//! - **Age.** With [`StoreOptions::max_age`], log records appended longer
//!   ago than it are dropped whether an upstream forwarded them or not
//!   (`writer/age.rs`): cursors below the first record kept move up to it,
//!   `retired_below` rises, each dropped record is counted in
//!   `edge_messages_dropped_total{reason="max_age"}` and the sweep is logged
//!   (summarised) with the count. A record that a durable queue entry
//!   references is kept for that queue (its owner's expiry bounds it); only
//!   the log's side ages out. Append times are kept coarsely, one `ages`
//!   entry per `max(1 s, max_age / 1000)`: a record is dropped between
//!   `max_age` and `max_age` + that step after its append. The writer sweeps
//!   with every batch and, while idle, every step (a ticker thread queues a
//!   tick; a tick that finds nothing due commits nothing).
//! - Replay appends a dead letter's record to the log again under a new seq,
//!   with a [`Replay`] mark naming the upstreams that parked it and its
//!   original seq, so that only they forward it, under its original message
//!   id.
//!
//! # Recovery
//!
//! **Choice: a write-ahead journal in front of redb** (`journal.rs`), because
//! a durable redb commit rewrites ~9 pages (36 KiB) however little changed,
//! and touching fewer pages cannot go below the path from the log's leaf
//! to the header (~5 pages, 20 KiB). Each group commit is applied to redb
//! in one write transaction as before, but committed with
//! `Durability::None` (redb keeps it in memory: readers see it, the file is
//! not written); every key the batch inserted or removed, in order, is
//! appended to `<data_dir>/edge.journal` as one CRC-checked frame and
//! `fdatasync`ed *before* that commit, and only then is the batch
//! acknowledged. So "acknowledged = fsynced" holds: for the journal frame.
//! The journal file is filled with zeros once when created, then rewritten
//! in place, so its syncs write data pages and no metadata. A frame starts
//! on a fresh 4 KiB block, so no write touches a block holding an
//! acknowledged frame, and consecutive keys are written as runs (an
//! append's key, a retirement's deletes), so a burst's frames are ~1.15×
//! the records they hold (~1.03× before their padding). With [`JOURNAL_BYTES`] of 4 MiB, records that are
//! forwarded and retired within an epoch are never written to the database
//! file at all (their pages are freed before the checkpoint writes them):
//! a burst forwarded as it arrives costs ~1.2× its encoded records,
//! ~1.96× the payload of a 100-byte message (`benches/RESULTS.md`). A
//! backlog (the upstream away) is written twice, once to the journal and
//! once to the database at the checkpoint, ~2.2× its records: writing it
//! once would need the log to live in the journal's own segments beside
//! redb, with its own retirement and salvage rules; not done.
//!
//! A **checkpoint** folds the journal into the database: a batch committed
//! with `Durability::Immediate` that also records, in `meta["journal"]`,
//! the journal id and the next *epoch*; the next epoch's frames overwrite
//! the file from its start. A batch is a checkpoint when its frame would
//! not fit in what is left of [`JOURNAL_BYTES`], when it closes the store,
//! and when the writer stops on the last handle's drop. A store opened on a
//! caller's backend without a journal ([`Store::open_with_backend`])
//! commits every batch with `Durability::Immediate`, as before.
//!
//! Checkpoints (and the opening transaction) are committed with redb's
//! quick repair: two-phase (two syncs) and recording the allocator state,
//! so that after a crash redb opens the file without a repair, and a file
//! with a damaged page can still be opened to salvage it (redb's repair
//! refuses such a file whole). The check the repair made is made instead
//! by the open itself after a crash — the store is not marked `closed`
//! (a clean close's checkpoint sets the mark, the opening transaction
//! removes it), or the journal holds frames of the current epoch: every
//! page's checksum is verified (`check_integrity`, on a copy-on-write view
//! of the file, so that redb's rollback of a failed check never reaches
//! it) before the replay, and a failure is damage
//! ([`OpenError::is_corruption`]), salvaged below.
//!
//! **The recovery rule.** redb commits are atomic, and after a crash the
//! database is as of its last durable commit, the last checkpoint, or of
//! some later commit if redb wrote more. Opening replays the frames of the
//! epoch in `meta["journal"]`, from the start of the journal file, up to
//! the first frame that is torn (CRC), missing, out of order or of another
//! epoch or database, and commits the result as a checkpoint before
//! anything else. Frames hold blind writes (this key now has this value,
//! or none), so replaying the epoch's frames onto the database as of any
//! commit of that epoch gives the state after the last whole frame: every
//! acknowledged batch (its frame was synced), each seq once, never one
//! batch without the other. A crash during a frame write loses only that
//! unacknowledged batch; during a checkpoint, the database stays at the
//! previous one and the epoch's frames are replayed; after a checkpoint
//! and before the next frame, the new epoch has no frame and the old ones
//! no longer match. Frames carry the journal id drawn for their database,
//! so a journal beside a fresh database (the old one moved aside,
//! [`Store::move_aside`], which moves the journal with it) replays nothing.
//!
//! Then open migrates an older schema, creates missing tables, drops
//! unconfigured cursors and loads the figures from `meta`, the referenced
//! seqs from `refs` and the queue names. A durable commit that runs out of
//! disk space is refused as full and the database is reopened (`space.rs`),
//! then the journal is replayed onto it: the same recovery. The journal
//! itself never grows while open (no room to fill it at creation: the
//! store runs without one, every batch durable in redb, and says so at
//! WARN; an existing journal smaller than [`JOURNAL_BYTES`], an older
//! gateway's, that has no room to grow keeps its size, its frames
//! replayed as they are).
//!
//! **The salvage rule** (damage, not a crash: [`Store::salvage`],
//! `salvage.rs`). A database that redb reports as corrupted, or panics
//! reading, is salvaged rather than dropped: opened read-only (a file that
//! needs a repair is repaired in memory, over a copy-on-write view), every
//! table is copied into a fresh database range by range, each read inside
//! `catch_unwind`; a failed range is narrowed by binary search down to
//! single keys, so a damaged page loses the keys on it and no others
//! (name-keyed tables are read from both ends instead). Entries keep their
//! keys, so records keep their seqs and cursors their positions. Then the
//! epoch named in the salvaged `meta["journal"]` is replayed from the
//! damaged store's journal by the recovery rule above (blind writes onto
//! what was salvaged: they can only restore keys); without that entry the
//! journal is not replayed. `refs` is rebuilt from the queue entries (queue
//! entries of a lost queue are dropped), the figures are counted again,
//! and `retired_below` is raised to the highest of the old
//! `retired_below`, one past every salvaged seq, every cursor and the
//! caller's seed, so that no seq of the damaged store, even one on a lost
//! page, is handed out again. Only then is the damaged file moved aside
//! (kept unchanged) and the salvaged one renamed into its place.
//!
//! # Concurrency
//!
//! One named thread (`edge-store-writer`) owns every write transaction and
//! reads a bounded inbox; a full inbox is back-pressure on [`Store::submit`].
//! A batch is what is pending when the writer turns to the inbox; when that is
//! under half the previous batch it waits up to 0.5 ms for callers woken by the
//! last commit to queue again (see `writer.rs`). Reads are redb read
//! transactions and never wait for the writer. The thread stops on
//! [`Store::close`] or when the last handle is dropped; dropping the last
//! handle joins it, which waits for the batch in flight (one commit).
//!
//! A stopped gateway's store can be inspected with [`ReadOnlyStore`]
//! (`read_only.rs`): redb's read-only open, no writer, no open-time change;
//! redb refuses it while a [`Store`] holds the file.

mod backend;
mod dead;
mod error;
mod journal;
mod migrate;
mod read_only;
mod reader;
mod record;
mod salvage;
mod space;
mod tables;
mod writer;

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use redb::{Database, StorageBackend};
use tokio::sync::{mpsc, oneshot, watch};

pub use backend::{BackendCounters, SlowSyncBackend};
pub use dead::{Parked, Replay};
pub use error::{AppendError, FullReason, OpenError, StoreError};
pub use journal::JOURNAL_FILE;

/// Bytes of the journal file [`Store::open`] uses (see "Recovery").
pub const JOURNAL_BYTES: u64 = journal::CAPACITY;

/// Longest a [`Store::advance_cursor_lazily`] move waits for another
/// batch to commit with.
pub const CURSOR_DELAY: std::time::Duration = writer::defer::CURSOR_DELAY;
pub use read_only::ReadOnlyStore;
pub use record::Record;
pub use salvage::{SALVAGE_FILE, Salvage, SalvageError, TableSalvage};

use writer::{DeadLetterAction, Op, Writer};

/// Where an appended record goes. See [`Store::submit_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// Into the log (implied when `queues` is not empty).
    pub log: bool,
    /// Durable queues whose entries reference the record (one entry per
    /// queue; ids of deleted queues are skipped).
    pub queues: Vec<u64>,
    /// Sets or clears the retained message of a topic with this record.
    pub retain: Option<Retain>,
    /// Records this key in the same commit (see [`Store::dedup_keys`]).
    pub dedup: Option<String>,
}

impl Placement {
    /// The log only.
    pub fn log() -> Placement {
        Placement {
            log: true,
            ..Placement::default()
        }
    }
}

/// A change to the retained table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retain {
    /// The record becomes the retained message of this topic.
    Set(String),
    /// The topic has no retained message any more.
    Clear(String),
}

/// One log entry as read: seq, record, and the replay mark of a replayed
/// dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: Seq,
    pub record: Record,
    pub replay: Option<Replay>,
}

/// One entry of a durable queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    pub seq: Seq,
    /// The owner's state (0 when queued; see [`Store::queue_set`]).
    pub state: u32,
    /// `None` when the record is gone (`drop-oldest` made room).
    pub record: Option<Record>,
}

/// Position in the log. The first appended record gets 1; 0 means "none".
pub type Seq = u64;

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "edge.redb";

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Quota on live record bytes (encoded size of records not yet retired).
    pub max_bytes: u64,
    /// Most appends in one group commit.
    pub batch_max_messages: NonZeroUsize,
    /// Most encoded bytes in one group commit (the op that crosses it is
    /// still taken).
    pub batch_max_bytes: NonZeroUsize,
    /// Capacity of the writer's inbox; a full inbox is back-pressure on callers.
    pub inbox_capacity: NonZeroUsize,
    /// Names of the cursors that hold records in the log (one per upstream).
    /// Records below the smallest of them are retired. Cursors stored under
    /// other names are deleted at open. With no cursor nothing is retired,
    /// unless `retire_without_cursors`.
    pub cursors: Vec<String>,
    /// With no cursor at all (a gateway without upstreams: nothing will
    /// forward its records), retire every record no queue entry references,
    /// so that the log does not grow to the quota. Off, a store without
    /// cursors keeps its log (for a reader that owns it).
    pub retire_without_cursors: bool,
    /// What an append does when it would exceed `max_bytes`.
    pub when_full: WhenFull,
    /// Free space to keep on the data directory's filesystem. Below it the
    /// store takes no more bytes than it held when space ran short (its
    /// freed pages are reused; see [`Store`] "Disk space"); below half of
    /// it every append is refused. 0 turns the check off. Only stores
    /// opened on a directory check it.
    pub min_free: u64,
    /// Log records older than this (by append time) are dropped, forwarded
    /// or not (see "Age" above). `None`: no age bound.
    pub max_age: Option<std::time::Duration>,
}

/// The policy at the quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WhenFull {
    /// Refuse the append ([`AppendError::Full`]).
    #[default]
    Reject,
    /// Delete the oldest records of the log (forwarded or not) until the
    /// append fits; cursors below the new first record move up to it. Each
    /// dropped record is counted and logged at ERROR. Dead letters are
    /// never dropped: if the log is empty and it still does not fit, refuse.
    DropOldest,
}

/// Live figures, cheap to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Seq of the oldest record still in the log (0 when empty).
    pub first_seq: Seq,
    /// Seq the next append will get.
    pub next_seq: Seq,
    pub live_messages: u64,
    pub live_bytes: u64,
    /// Parked records and their bytes; they count toward the quota.
    pub dead_letters: u64,
    pub dead_letter_bytes: u64,
    /// Retained messages and their bytes (topic + record); they count
    /// toward the quota.
    pub retained: u64,
    pub retained_bytes: u64,
    pub max_bytes: u64,
}

/// A parked record, as listed by [`Store::dead_letters`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The log seq it was parked at.
    pub seq: Seq,
    /// The seq of its message id.
    pub original_seq: Seq,
    /// The upstreams that parked it (a replay goes to them only).
    pub upstreams: Vec<String>,
    pub reason: String,
    pub record: Record,
}

/// State shared by the handles and the writer thread.
pub(crate) struct Shared {
    /// `None` only while the writer reopens the database after a commit
    /// ran out of disk space (redb takes no writes after an I/O error).
    pub(crate) db: RwLock<Option<Arc<Database>>>,
    /// Opens the database again; `None` for a caller-supplied backend.
    pub(crate) reopen: Option<Reopen>,
    /// The data directory, whose filesystem's free space is checked.
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) options: StoreOptions,
    pub(crate) stats: Mutex<StoreStats>,
    /// Write transactions committed since open.
    pub(crate) commits: AtomicU64,
    pub(crate) committed: watch::Sender<Seq>,
    /// Milliseconds since the Unix epoch: the append times `max_age` goes by.
    pub(crate) clock: Clock,
    /// Set when a commit failed: redb refuses every later write after an
    /// I/O error, so the store is unusable until reopened.
    pub(crate) failure: watch::Sender<Option<String>>,
    /// `Some(reason)` while appends are refused (quota or disk space).
    pub(crate) full: watch::Sender<Option<FullReason>>,
}

pub(crate) type Reopen = Box<dyn Fn() -> Result<Database, redb::DatabaseError> + Send + Sync>;
pub(crate) type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock in milliseconds since the Unix epoch (0 before it).
fn system_clock() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Shared {
    /// The open database (a cheap clone of its handle).
    pub(crate) fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| StoreError::Read("the store is being reopened".into()))
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("options", &self.options)
            .field("commits", &self.commits)
            .finish_non_exhaustive()
    }
}

/// Where the database came from, and so what the store can do with it.
struct Source {
    reopen: Option<Reopen>,
    data_dir: Option<PathBuf>,
    clock: Clock,
}

/// Owned by the `Arc` all [`Store`] clones share; dropping it stops the writer.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    tx: Option<mpsc::Sender<Op>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Disconnected when the writer thread has returned.
    /// (A `Mutex` only to make the handle `Sync`.)
    exited: Mutex<std::sync::mpsc::Receiver<()>>,
}

/// How long dropping the last handle waits for the writer to finish what
/// is queued. Bounded so that a hung disk cannot hang the caller (often an
/// async task at shutdown) for ever.
const DROP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Drop for Handle {
    fn drop(&mut self) {
        // Closing the inbox lets the writer commit what is queued and return.
        self.tx = None;
        let Some(thread) = self.thread.take() else {
            return;
        };
        let exited = match self.exited.get_mut() {
            Ok(rx) => rx.recv_timeout(DROP_WAIT),
            Err(poisoned) => poisoned.into_inner().recv_timeout(DROP_WAIT),
        };
        match exited {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                tracing::error!(waited = ?DROP_WAIT,
                    "The store writer is stuck in a commit; leaving it. Nothing it had not committed was acknowledged.");
            }
            _ => {
                if thread.join().is_err() {
                    tracing::error!("The store writer thread panicked.");
                }
            }
        }
    }
}

/// Handle to the store; cheap to clone. The writer thread stops when the
/// last handle is dropped or [`Store::close`] is called.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Handle>,
}

impl Store {
    /// Opens (creating if missing) the store in `data_dir`. A new store's
    /// first seq is 1.
    pub fn open(data_dir: &Path, options: StoreOptions) -> Result<Store, OpenError> {
        Store::open_seeded(data_dir, options, 1)
    }

    /// Like [`Store::open`], but a store created now starts at `first_seq`.
    /// The gateway seeds new stores from the clock so that a store which
    /// replaces a lost or damaged one never reuses its seqs (message ids
    /// are `<gateway id>:<seq>`). An existing store ignores the seed.
    pub fn open_seeded(
        data_dir: &Path,
        options: StoreOptions,
        first_seq: Seq,
    ) -> Result<Store, OpenError> {
        std::fs::create_dir_all(data_dir).map_err(|source| OpenError::CreateDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(DB_FILE);
        adopt_salvaged(data_dir)?;
        let journal = open_journal(&data_dir.join(JOURNAL_FILE))?;
        if let Some(journal) = journal.as_ref() {
            check_after_crash(&path, journal)?;
        }
        let mut db = Database::create(&path).map_err(|source| OpenError::Database {
            path: path.clone(),
            source,
        })?;
        compact_if_mostly_free(&mut db, &path);
        let reopen_path = path.clone();
        let source = Source {
            reopen: Some(Box::new(move || Database::create(&reopen_path))),
            data_dir: Some(data_dir.to_path_buf()),
            clock: Arc::new(system_clock),
        };
        Store::start(db, path, source, options, first_seq, journal)
    }

    /// Renames a damaged database file in `data_dir` to
    /// `edge.redb.corrupt-<unix seconds>[.<n>]` so a fresh store can be opened,
    /// keeping the old one for recovery. Returns the new name.
    pub fn move_aside(data_dir: &Path) -> std::io::Result<PathBuf> {
        let path = data_dir.join(DB_FILE);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut aside = data_dir.join(format!("{DB_FILE}.corrupt-{}", now.as_secs()));
        // Never overwrite a file kept from an earlier move.
        let mut n = 1;
        while aside.exists() {
            aside = data_dir.join(format!("{DB_FILE}.corrupt-{}.{n}", now.as_secs()));
            n += 1;
        }
        std::fs::rename(&path, &aside)?;
        // The journal goes with its database: its frames may hold the last
        // acknowledged batches (they never replay onto another database).
        let mut journal_aside = aside.clone().into_os_string();
        journal_aside.push(".journal");
        match std::fs::rename(data_dir.join(JOURNAL_FILE), journal_aside) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(aside)
    }

    /// Salvages the damaged database in `data_dir` (see `salvage.rs`):
    /// copies every entry that can still be read, range by range around
    /// the damage, with the journal's frames that replay, into a fresh
    /// database; then moves the damaged file and its journal aside
    /// ([`Store::move_aside`], kept for forensics) and puts the fresh one
    /// in its place, for [`Store::open`] to open. No seq below `first_seq`,
    /// or below any seq salvaged or recorded by the damaged store, is handed
    /// out afterwards. The newest records may be on a lost page, so
    /// `first_seq` should be above any seq the damaged store could have
    /// used: the gateway passes its clock seed (see [`Store::open_seeded`]).
    /// Counts go to `edge_store_salvaged_total{table}` and
    /// `edge_store_salvage_lost_total{table}`. Blocking; call it only with
    /// no store open on `data_dir`. On error the damaged file is where it
    /// was.
    pub fn salvage(data_dir: &Path, first_seq: Seq) -> Result<Salvage, SalvageError> {
        let io = |what: &'static str| {
            move |source: std::io::Error| SalvageError::Io {
                path: data_dir.to_path_buf(),
                what,
                source,
            }
        };
        let partial = data_dir.join(SALVAGE_FILE);
        match std::fs::remove_file(&partial) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("removing an unfinished salvage")(e));
            }
            _ => {}
        }
        let mut damaged =
            salvage::Damaged::file(&data_dir.join(DB_FILE), &data_dir.join(JOURNAL_FILE))?;
        let target = Database::create(&partial).map_err(|source| SalvageError::Target {
            path: partial.clone(),
            source: source.into(),
        })?;
        let salvaged = salvage::salvage(&mut damaged, &target, first_seq);
        drop(target);
        drop(damaged);
        let mut report = match salvaged {
            Ok(report) => report,
            Err(e) => {
                // Nothing half-made is left to be taken for a store.
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        };
        let aside = Store::move_aside(data_dir).map_err(io("moving the damaged store aside"))?;
        std::fs::rename(&partial, data_dir.join(DB_FILE))
            .map_err(io("putting the salvaged store in place"))?;
        std::fs::File::open(data_dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io("syncing the data directory"))?;
        report.moved_to = Some(aside);
        Ok(report)
    }

    /// [`Store::open`] with a clock of the test's own (milliseconds since
    /// the Unix epoch), for `max_age` tests.
    #[cfg(test)]
    pub(crate) fn open_with_clock(
        data_dir: &Path,
        options: StoreOptions,
        clock: Clock,
    ) -> Result<Store, OpenError> {
        let path = data_dir.join(DB_FILE);
        let db = Database::create(&path).map_err(|source| OpenError::Database {
            path: path.clone(),
            source,
        })?;
        let source = Source {
            reopen: None,
            data_dir: None,
            clock,
        };
        let journal = open_journal(&data_dir.join(JOURNAL_FILE))?;
        Store::start(db, path, source, options, 1, journal)
    }

    /// Opens the store on a caller-supplied redb backend (benches, fault
    /// tests). `label` names it in errors.
    pub fn open_with_backend(
        backend: impl StorageBackend,
        label: &Path,
        options: StoreOptions,
    ) -> Result<Store, OpenError> {
        let db = create_with_backend(backend, label)?;
        let source = Source {
            reopen: None,
            data_dir: None,
            clock: Arc::new(system_clock),
        };
        Store::start(db, label.to_path_buf(), source, options, 1, None)
    }

    /// Like [`Store::open_with_backend`], with the write-ahead journal on
    /// `journal` (`journal_bytes` long; see "Recovery"), as
    /// [`Store::open`] has it on a file (benches, crash tests).
    pub fn open_with_journal(
        backend: impl StorageBackend,
        journal: impl StorageBackend,
        journal_bytes: u64,
        label: &Path,
        options: StoreOptions,
    ) -> Result<Store, OpenError> {
        let db = create_with_backend(backend, label)?;
        let journal = journal::Journal::new(Box::new(journal), journal_bytes).map_err(|e| {
            OpenError::Init {
                path: label.to_path_buf(),
                message: format!("cannot prepare the journal: {e}"),
                corrupt: false,
            }
        })?;
        let source = Source {
            reopen: None,
            data_dir: None,
            clock: Arc::new(system_clock),
        };
        Store::start(db, label.to_path_buf(), source, options, 1, Some(journal))
    }

    /// Like [`Store::open_with_backend`], with a function that makes a new
    /// backend on the same file: the store can then reopen the database
    /// after a commit ran out of space (fault tests of that path).
    pub fn open_with_backend_factory<B: StorageBackend>(
        factory: impl Fn() -> std::io::Result<B> + Send + Sync + 'static,
        label: &Path,
        options: StoreOptions,
    ) -> Result<Store, OpenError> {
        let open = move || -> Result<Database, redb::DatabaseError> {
            let backend = factory().map_err(|e| redb::DatabaseError::Storage(e.into()))?;
            Database::builder().create_with_backend(backend)
        };
        let db = open().map_err(|source| OpenError::Database {
            path: label.to_path_buf(),
            source,
        })?;
        let source = Source {
            reopen: Some(Box::new(open)),
            data_dir: None,
            clock: Arc::new(system_clock),
        };
        Store::start(db, label.to_path_buf(), source, options, 1, None)
    }

    fn start(
        db: Database,
        path: PathBuf,
        source: Source,
        options: StoreOptions,
        first_seq: Seq,
        mut journal: Option<journal::Journal>,
    ) -> Result<Store, OpenError> {
        if let Some(journal) = journal.as_mut() {
            journal::recover(&db, journal).map_err(|e| OpenError::Init {
                path: path.clone(),
                message: format!("replaying the journal: {e}"),
                corrupt: matches!(e, redb::Error::Corrupted(_))
                    || matches!(&e, redb::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData),
            })?;
        }
        let age_now = options.max_age.map(|_| (source.clock)());
        let journaled = journal.is_some();
        let loaded = tables::init(&db, &options.cursors, first_seq, age_now, journaled).map_err(|e| match e {
            tables::InitError::UnknownSchema { found } => OpenError::UnknownSchema {
                path: path.clone(),
                found,
                supported: tables::SCHEMA_VERSION,
            },
            tables::InitError::Redb(e) => OpenError::Init {
                path: path.clone(),
                message: e.to_string(),
                corrupt: matches!(e, redb::Error::Corrupted(_))
                    || matches!(&e, redb::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData),
            },
        })?;
        let stats = StoreStats {
            first_seq: loaded.first_seq,
            next_seq: loaded.next_seq,
            live_messages: loaded.stats.live_messages,
            live_bytes: loaded.stats.live_bytes,
            dead_letters: loaded.stats.dead_letters,
            dead_letter_bytes: loaded.stats.dead_bytes,
            retained: loaded.stats.retained,
            retained_bytes: loaded.stats.retained_bytes,
            max_bytes: options.max_bytes,
        };
        tracing::info!(
            path = %path.display(),
            first_seq = stats.first_seq,
            next_seq = stats.next_seq,
            live_messages = stats.live_messages,
            live_bytes = stats.live_bytes,
            "Store opened."
        );
        if let Some(dir) = &source.data_dir {
            space::warn_if_quota_exceeds_disk(dir, &path, &options);
        }
        zero_failure_counters();
        let (tx, rx) = mpsc::channel(options.inbox_capacity.get());
        let options_max_age = options.max_age;
        let shared = Arc::new(Shared {
            db: RwLock::new(Some(Arc::new(db))),
            reopen: source.reopen,
            data_dir: source.data_dir,
            clock: source.clock,
            full: watch::Sender::new(None),
            stats: Mutex::new(stats),
            commits: AtomicU64::new(0),
            committed: watch::Sender::new(loaded.next_seq - 1),
            failure: watch::Sender::new(None),
            options,
        });
        if let Some(max_age) = options_max_age {
            writer::age::start_ticker(tx.downgrade(), max_age);
        }
        let alarm = writer::defer::Alarm::start(tx.downgrade());
        let writer = Writer::new(Arc::clone(&shared), rx, loaded, journal, alarm);
        let (exit_tx, exited) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("edge-store-writer".into())
            .spawn(move || {
                writer.run();
                drop(exit_tx);
            })
            .map_err(|e| OpenError::Init {
                path,
                message: format!("cannot start the writer thread: {e}"),
                corrupt: false,
            })?;
        Ok(Store {
            inner: Arc::new(Handle {
                shared,
                tx: Some(tx),
                thread: Some(thread),
                exited: Mutex::new(exited),
            }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    async fn send(&self, op: Op) -> Result<(), ()> {
        match &self.inner.tx {
            Some(tx) => tx.send(op).await.map_err(|_| ()),
            None => Err(()),
        }
    }

    /// Queues `record` for the next group commit. Waits only for room in
    /// the writer's inbox (back-pressure); the returned future resolves
    /// when the record is durable (`Durability::Immediate`) or refused.
    /// Records queued by one caller are committed in the order queued.
    pub async fn submit(&self, record: Record) -> Result<Commit, AppendError> {
        self.submit_with(record, Placement::log()).await
    }

    /// Like [`Store::submit`], with where the record goes: the log (its
    /// seq is the commit's value; 0 when not logged), queue entries
    /// referencing it, and the retained table — all in one commit.
    pub async fn submit_with(
        &self,
        record: Record,
        placement: Placement,
    ) -> Result<Commit, AppendError> {
        let bytes = record.into_bytes();
        let (reply, rx) = oneshot::channel();
        let op = Op::Append(writer::AppendOp {
            bytes,
            log: placement.log || !placement.queues.is_empty(),
            queues: placement.queues,
            retain: placement.retain,
            dedup: placement.dedup,
            reply,
        });
        self.send(op).await.map_err(|()| AppendError::Closed)?;
        Ok(Commit { rx })
    }

    /// `submit` then wait for the commit.
    pub async fn append(&self, record: Record) -> Result<Seq, AppendError> {
        self.submit(record).await?.await
    }

    /// Reads up to `max_messages` log entries (and roughly `max_bytes`: at
    /// least one is returned when there is one) with seq >= `from`, in
    /// order. Blocking: call from `spawn_blocking`.
    pub fn read(
        &self,
        from: Seq,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        reader::read(&*self.shared().db()?, from, max_messages, max_bytes)
    }

    /// The durable value of a cursor: the next seq its owner has to forward
    /// (everything below it is done). Blocking (one read transaction).
    pub fn cursor(&self, name: &str) -> Result<Seq, StoreError> {
        reader::cursor(&*self.shared().db()?, name, || self.stats().next_seq)
    }

    /// Moves a cursor forward (never backward, never past the next seq) in
    /// the next group commit and resolves once durable. Retires records no
    /// cursor or queue needs any more.
    pub async fn advance_cursor(&self, name: &str, next: Seq) -> Result<(), StoreError> {
        self.done_op(|reply| Op::AdvanceCursor {
            name: name.to_string(),
            next,
            lazy: false,
            reply,
        })
        .await
    }

    /// [`Store::advance_cursor`] without a commit of its own: the move
    /// rides in the next group commit that has other work, or commits
    /// within [`CURSOR_DELAY`] at the latest (at once while the store is
    /// full: the move makes room), and resolves once durable. For a
    /// forwarder, whose cursor's durability only saves re-forwarding after
    /// a crash: a trickle then costs one commit per message, not one more
    /// per cursor that moves.
    pub async fn advance_cursor_lazily(&self, name: &str, next: Seq) -> Result<(), StoreError> {
        self.done_op(|reply| Op::AdvanceCursor {
            name: name.to_string(),
            next,
            lazy: true,
            reply,
        })
        .await
    }

    /// Creates a cursor at the next seq (nothing before it is kept for it);
    /// an existing one is left as it is.
    pub async fn create_cursor(&self, name: &str) -> Result<(), StoreError> {
        self.done_op(|reply| Op::CreateCursor {
            name: name.to_string(),
            reply,
        })
        .await
    }

    /// Deletes a cursor: the records it held may be retired.
    pub async fn drop_cursor(&self, name: &str) -> Result<(), StoreError> {
        self.done_op(|reply| Op::DropCursor {
            name: name.to_string(),
            reply,
        })
        .await
    }

    /// Parks a record in the dead-letter table; resolves once durable.
    /// Parking does not remove the record from the log. A seq parked again
    /// (by another upstream) keeps every upstream's name.
    pub async fn park(&self, seq: Seq, record: Record, parked: Parked) -> Result<(), StoreError> {
        let record = record.into_bytes();
        let meta = dead::Meta {
            original_seq: parked.original_seq,
            upstreams: vec![parked.upstream],
            reason: parked.reason,
        };
        self.done_op(|reply| Op::Park {
            seq,
            meta,
            record,
            reply,
        })
        .await
    }

    /// Returns the id of the durable queue `name`, creating it if needed.
    pub async fn create_queue(&self, name: &str) -> Result<u64, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::CreateQueue {
            name: name.to_string(),
            reply,
        })
        .await
        .map_err(|()| StoreError::Closed)?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Deletes a queue and its entries (records only it held may be retired).
    pub async fn delete_queue(&self, name: &str) -> Result<(), StoreError> {
        self.done_op(|reply| Op::DeleteQueue {
            name: name.to_string(),
            reply,
        })
        .await
    }

    /// Removes entries of a queue (delivered and acknowledged, or dropped).
    pub async fn queue_ack(&self, queue: u64, seqs: Vec<Seq>) -> Result<(), StoreError> {
        self.done_op(|reply| Op::QueueAck { queue, seqs, reply })
            .await
    }

    /// Records the owner's state of an entry (sent, packet id, ...).
    pub async fn queue_set(&self, queue: u64, seq: Seq, state: u32) -> Result<(), StoreError> {
        self.done_op(|reply| Op::QueueSet {
            queue,
            seq,
            state,
            reply,
        })
        .await
    }

    /// Up to `max` entries of `queue` with seq >= `from`, in seq order, each
    /// with its record (`None` if the record was dropped: `drop-oldest`).
    /// Blocking (one read transaction).
    pub fn queue_entries(
        &self,
        queue: u64,
        from: Seq,
        max: usize,
    ) -> Result<Vec<QueueEntry>, StoreError> {
        reader::queue_entries(&*self.shared().db()?, queue, from, max)
    }

    /// Every durable queue: (name, id). Blocking.
    pub fn queues(&self) -> Result<Vec<(String, u64)>, StoreError> {
        reader::queues(&*self.shared().db()?)
    }

    /// Stores a session as its owner encoded it (durable on return).
    pub async fn put_session(&self, id: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.done_op(|reply| Op::PutSession {
            id: id.to_string(),
            value,
            reply,
        })
        .await
    }

    pub async fn delete_session(&self, id: &str) -> Result<(), StoreError> {
        self.done_op(|reply| Op::DeleteSession {
            id: id.to_string(),
            reply,
        })
        .await
    }

    /// Every stored session: (id, value). Blocking.
    pub fn sessions(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        reader::sessions(&*self.shared().db()?)
    }

    /// Stores an adapter's definition (an AMQP exchange, queue or binding)
    /// as its owner encoded it (durable on return).
    pub async fn put_definition(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.done_op(|reply| Op::PutDefinition {
            key: key.to_string(),
            value,
            reply,
        })
        .await
    }

    pub async fn delete_definition(&self, key: &str) -> Result<(), StoreError> {
        self.done_op(|reply| Op::DeleteDefinition {
            key: key.to_string(),
            reply,
        })
        .await
    }

    /// The stored definitions whose key starts with `prefix`, in key order:
    /// (key, value). Blocking.
    pub fn definitions(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        reader::definitions(&*self.shared().db()?, prefix)
    }

    /// The dedup keys starting with `prefix` (recorded with appends, see
    /// [`Placement::dedup`]), with the seq of their append. Blocking.
    pub fn dedup_keys(&self, prefix: &str) -> Result<Vec<(String, Seq)>, StoreError> {
        reader::dedup_keys(&*self.shared().db()?, prefix)
    }

    /// Forgets dedup keys: `key` itself, or with `prefix` every key starting
    /// with it.
    pub async fn release_dedup(&self, key: &str, prefix: bool) -> Result<(), StoreError> {
        self.done_op(|reply| Op::ReleaseDedup {
            key: key.to_string(),
            prefix,
            reply,
        })
        .await
    }

    /// Every retained message: (topic, record). Blocking.
    pub fn retained(&self) -> Result<Vec<(String, Record)>, StoreError> {
        reader::retained(&*self.shared().db()?)
    }

    async fn done_op(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<(), StoreError>>) -> Op,
    ) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(op(reply))
            .await
            .map_err(|()| StoreError::Closed)?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// The gateway identity recorded in this store, if any. Blocking (one
    /// read transaction).
    pub fn gateway_id(&self) -> Result<Option<String>, StoreError> {
        reader::meta_string(&*self.shared().db()?, tables::GATEWAY_ID_KEY)
    }

    /// Records the gateway identity (durable on return). Message ids are
    /// `<gateway id>:<seq>`, so the identity belongs with the log.
    pub async fn set_gateway_id(&self, id: &str) -> Result<(), StoreError> {
        self.done_op(|reply| Op::SetGatewayId {
            id: id.to_string(),
            reply,
        })
        .await
    }

    /// Deletes up to `max` dead letters, oldest first; returns how many.
    pub async fn purge_dead_letters(&self, max: usize) -> Result<u64, StoreError> {
        self.dead_letter_op(DeadLetterAction::Purge, max, None)
            .await
    }

    /// Deletes the dead letters parked at these seqs (ones not parked are
    /// skipped), in one commit; returns how many.
    pub async fn purge_dead_letters_at(&self, seqs: Vec<Seq>) -> Result<u64, StoreError> {
        self.dead_letter_op(DeadLetterAction::Purge, seqs.len(), Some(seqs))
            .await
    }

    /// Appends the records of up to `max` dead letters to the log again
    /// (oldest first, under new seqs) and deletes them, in one commit;
    /// returns how many. Each replayed entry carries a [`Replay`] mark: only
    /// the upstreams that parked it forward it again, under its original
    /// message id.
    pub async fn replay_dead_letters(&self, max: usize) -> Result<u64, StoreError> {
        self.dead_letter_op(DeadLetterAction::Replay, max, None)
            .await
    }

    /// Like [`Store::replay_dead_letters`] for the dead letters parked at
    /// these seqs (in the order given; ones not parked are skipped), in one
    /// commit. The operator's selection (a route's dead letters) is made by
    /// the caller, who knows what records mean.
    pub async fn replay_dead_letters_at(&self, seqs: Vec<Seq>) -> Result<u64, StoreError> {
        self.dead_letter_op(DeadLetterAction::Replay, seqs.len(), Some(seqs))
            .await
    }

    async fn dead_letter_op(
        &self,
        action: DeadLetterAction,
        max: usize,
        only: Option<Vec<Seq>>,
    ) -> Result<u64, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::DeadLetters {
            action,
            max,
            only,
            reply,
        })
        .await
        .map_err(|()| StoreError::Closed)?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Lists up to `max` dead letters with seq >= `from`, in seq order.
    /// Blocking (one read transaction).
    pub fn dead_letters(&self, from: Seq, max: usize) -> Result<Vec<DeadLetter>, StoreError> {
        reader::dead_letters(&*self.shared().db()?, from, max)
    }

    /// Watch of the last committed seq; changes after every commit that
    /// appended, before its appends are acknowledged.
    pub fn committed(&self) -> watch::Receiver<Seq> {
        self.shared().committed.subscribe()
    }

    /// Watch of the store's failure: `Some(reason)` once a commit failed.
    /// From then on nothing can be stored; reopening the store (restarting
    /// the process) is the recovery, and the gateway exits for it.
    pub fn failure(&self) -> watch::Receiver<Option<String>> {
        self.shared().failure.subscribe()
    }

    /// The quota on live bytes ([`StoreOptions::max_bytes`]): a record
    /// above it can never be stored.
    pub fn max_bytes(&self) -> u64 {
        self.shared().options.max_bytes
    }

    /// Watch of refusals: `Some(reason)` while appends are refused because
    /// the quota or the disk is full, `None` again once one is accepted or
    /// a commit (a cursor advance, a queue acknowledgement) left room for
    /// the refused append; while idle and refusing, the writer also reads
    /// the free space again every second (room can come back from outside).
    /// The store stays up meanwhile: forwarding retires records and the
    /// space comes back by itself.
    pub fn full(&self) -> watch::Receiver<Option<FullReason>> {
        self.shared().full.subscribe()
    }

    pub fn stats(&self) -> StoreStats {
        match self.shared().stats.lock() {
            Ok(g) => *g,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    /// Write transactions committed since open (each one fsync). Appends
    /// divided by this is the mean group-commit batch.
    pub fn commits(&self) -> u64 {
        self.shared().commits.load(Ordering::Relaxed)
    }

    /// Lets queued work commit, then stops the writer thread. Other clones
    /// of this handle see [`AppendError::Closed`] / [`StoreError::Closed`]
    /// from then on; the database file is closed with the last handle.
    pub async fn close(self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        if self.send(Op::Close { reply }).await.is_ok() {
            // An error means the writer already stopped: also closed.
            let _ = rx.await;
        }
        // Joins the (finished) thread if this was the last handle.
        drop(self);
        Ok(())
    }
}

/// A database on a caller's backend; `label` names it in errors.
fn create_with_backend(backend: impl StorageBackend, label: &Path) -> Result<Database, OpenError> {
    Database::builder()
        .create_with_backend(backend)
        .map_err(|source| OpenError::Database {
            path: label.to_path_buf(),
            source,
        })
}

/// After a crash (the store is not marked `closed`, or the journal holds
/// frames: the last run did not end with its closing checkpoint), verifies
/// every page's checksum before the journal is replayed. Checkpoints record redb's allocator state, so redb
/// opens such a file without the repair that would have verified it; a
/// page a lying disk lost must still be found here, at open, where the
/// damage is salvaged, and not by a reader later.
///
/// The check runs on a copy-on-write view of the file, before the store
/// opens it: redb "repairs" a file whose check fails by rolling it back to
/// the previous commit, and that must not reach the file (salvage reads
/// the last checkpoint's pages and replays the journal on them). A file
/// the view cannot open is left to the real open to judge.
fn check_after_crash(path: &Path, journal: &journal::Journal) -> Result<(), OpenError> {
    if !path.exists() {
        return Ok(());
    }
    let view = (|| -> Result<Database, redb::DatabaseError> {
        let file = std::fs::File::open(path)?;
        let overlay = salvage::Overlay::new(Box::new(redb::backends::FileBackend::new(file)?))?;
        Database::builder().create_with_backend(overlay)
    })();
    let Ok(db) = view else {
        return Ok(());
    };
    let damaged = |message: String| OpenError::Init {
        path: path.to_path_buf(),
        message,
        corrupt: true,
    };
    let crashed = journal::pending(&db, journal).map_err(|e| OpenError::Init {
        path: path.to_path_buf(),
        message: format!("reading the journal epoch: {e}"),
        corrupt: matches!(e, redb::Error::Corrupted(_))
            || matches!(&e, redb::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData),
    })?;
    if !crashed {
        return Ok(());
    }
    // A check that failed and was "repaired" (in the view only) rolled the
    // last checkpoint back: damage too (salvage copies what is left of the
    // untouched file and replays the journal).
    let mut db = db;
    match db.check_integrity() {
        Ok(true) => Ok(()),
        Ok(false) => Err(damaged(
            "checksums after a crash: failed (redb rolled the last checkpoint back)".into(),
        )),
        Err(e) => Err(damaged(format!("checksums after a crash: {e}"))),
    }
}

/// A salvage interrupted between moving the damaged file aside and
/// renaming the salvaged one into place left `edge.redb.salvage` and no
/// `edge.redb`: the salvaged file is the store (it is complete, since the
/// damaged file is moved only after the salvage committed).
fn adopt_salvaged(data_dir: &Path) -> Result<(), OpenError> {
    let path = data_dir.join(DB_FILE);
    let salvaged = data_dir.join(SALVAGE_FILE);
    if path.exists() || !salvaged.exists() {
        return Ok(());
    }
    std::fs::rename(&salvaged, &path).map_err(|e| OpenError::Init {
        path: path.clone(),
        message: format!(
            "cannot put the salvaged store {} in place: {e}",
            salvaged.display()
        ),
        corrupt: false,
    })?;
    tracing::warn!(path = %path.display(), "Took the store salvaged by an interrupted start.");
    Ok(())
}

/// Files smaller than this are never compacted: the gain is not worth a
/// rewrite of the file.
const COMPACT_MIN_FILE: u64 = 8 << 20;

/// At open, before any transaction: compacts the database when less than
/// half of its file is in use (the rest is pages freed by retirement that
/// redb would reuse, but that an operator sees as a large file after a
/// long outage drained). redb compacts only with no transaction open at
/// all, which is only true here. A failed compaction leaves a consistent
/// database (redb commits each step) and is logged; the store opens anyway.
fn compact_if_mostly_free(db: &mut Database, path: &Path) {
    let file_len = std::fs::metadata(path).map_or(0, |m| m.len());
    if file_len < COMPACT_MIN_FILE {
        return;
    }
    let used = || -> Result<u64, redb::Error> {
        let txn = db.begin_write()?;
        let stats = txn.stats();
        txn.abort()?;
        let stats = stats?;
        Ok(stats.allocated_pages() * stats.page_size() as u64)
    };
    let used = match used() {
        Ok(u) => u,
        Err(error) => {
            tracing::warn!(%error, "Cannot read the store's page figures; not compacting.");
            return;
        }
    };
    if used.saturating_mul(2) >= file_len {
        return;
    }
    match db.compact() {
        Ok(_) => {
            let after = std::fs::metadata(path).map_or(0, |m| m.len());
            tracing::info!(
                before = file_len,
                after,
                in_use = used,
                "Store file compacted at open (it was mostly free pages)."
            );
        }
        Err(error) => tracing::warn!(%error, "Store compaction failed; opening uncompacted."),
    }
}

/// Opens (creating and zero-filling) the journal at `path`. When the
/// filesystem has no room to fill a new one, the store works without
/// (every batch then a durable redb commit): a journal not yet filled was
/// never written, so it holds no frame to replay. (One that exists but
/// cannot grow to [`JOURNAL_BYTES`] keeps its size: `Journal::new`.) Any
/// other failure fails the open, since the file may hold acknowledged
/// batches.
fn open_journal(path: &Path) -> Result<Option<journal::Journal>, OpenError> {
    let open = || -> std::io::Result<journal::Journal> {
        let file = journal::DirectFile::open(path)?;
        journal::Journal::new(Box::new(file), journal::CAPACITY)
    };
    match open() {
        Ok(j) => Ok(Some(j)),
        Err(error) if space::is_io_no_space(&error) => {
            tracing::warn!(path = %path.display(), %error,
                "No room for the store journal: every group commit is a durable database commit (more bytes written per message).");
            Ok(None)
        }
        Err(error) => Err(OpenError::Init {
            path: path.to_path_buf(),
            message: format!("cannot open the journal: {error}"),
            corrupt: false,
        }),
    }
}

/// The store's failure counters exist at zero from the start, so that an
/// alert on them can be written before the first failure.
fn zero_failure_counters() {
    metrics::counter!("edge_store_corruptions_total").increment(0);
    metrics::counter!("edge_store_commit_failures_total").increment(0);
    for reason in [FullReason::Quota, FullReason::Disk] {
        metrics::counter!("edge_store_rejected_total", "reason" => reason.label()).increment(0);
    }
    for table in salvage::TABLES {
        metrics::counter!("edge_store_salvaged_total", "table" => table).increment(0);
        metrics::counter!("edge_store_salvage_lost_total", "table" => table).increment(0);
    }
    for reason in ["store_full", "drop_oldest", "max_age"] {
        metrics::counter!("edge_messages_dropped_total", "reason" => reason).increment(0);
    }
}

/// See [`Store::submit`].
#[derive(Debug)]
pub struct Commit {
    rx: oneshot::Receiver<Result<Seq, AppendError>>,
}

impl std::future::Future for Commit {
    type Output = Result<Seq, AppendError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(AppendError::Closed)))
    }
}

#[cfg(test)]
mod tests;
