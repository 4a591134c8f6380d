//! The damaged database as salvage reads it: opened read-only (redb's
//! read-only open, or a normal open on an [`Overlay`] when the file needs
//! a repair), reopened after a panic, with this thread's panic messages
//! silenced while it reads (they are expected and counted).

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use redb::{
    Database, DatabaseError, ReadOnlyDatabase, ReadTransaction, ReadableDatabase, StorageBackend,
};

use super::SalvageError;
use super::overlay::Overlay;
use super::scan;
use crate::journal;

type Opener = Box<dyn Fn() -> Result<SourceDb, DatabaseError>>;

/// The damaged database, as salvage reads it: how to (re)open it, and its
/// journal with the journal's length.
pub(crate) struct Damaged {
    pub(crate) label: PathBuf,
    pub(crate) open: Opener,
    pub(crate) journal: Option<(Box<dyn StorageBackend>, u64)>,
}

impl Damaged {
    /// The damaged file at `path`, and its journal if there is one.
    pub(crate) fn file(path: &Path, journal: &Path) -> Result<Damaged, SalvageError> {
        let db_path = path.to_path_buf();
        let journal = match std::fs::File::open(journal) {
            Ok(file) => {
                let backend =
                    redb::backends::FileBackend::new(file).map_err(|e| SalvageError::Io {
                        path: journal.to_path_buf(),
                        what: "opening the journal",
                        source: std::io::Error::other(e.to_string()),
                    })?;
                let overlay =
                    Overlay::new(Box::new(backend)).map_err(|source| SalvageError::Io {
                        path: journal.to_path_buf(),
                        what: "reading the journal",
                        source,
                    })?;
                Some((
                    Box::new(overlay) as Box<dyn StorageBackend>,
                    journal::CAPACITY,
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(SalvageError::Io {
                    path: journal.to_path_buf(),
                    what: "opening the journal",
                    source,
                });
            }
        };
        Ok(Damaged {
            label: path.to_path_buf(),
            open: Box::new(move || open_file(&db_path)),
            journal,
        })
    }
}

/// The damaged database file opened for reading: redb's read-only open,
/// or, when it refuses because the file needs a repair, a normal open on
/// an [`Overlay`] of the read-only file (the repair stays in memory).
fn open_file(path: &Path) -> Result<SourceDb, DatabaseError> {
    match ReadOnlyDatabase::open(path) {
        Ok(db) => Ok(SourceDb::ReadOnly(db)),
        Err(DatabaseError::RepairAborted) => {
            let file = std::fs::File::open(path)?;
            let overlay = Overlay::new(Box::new(redb::backends::FileBackend::new(file)?))?;
            Ok(SourceDb::Copy(
                Database::builder().create_with_backend(overlay)?,
            ))
        }
        Err(e) => Err(e),
    }
}

pub(crate) enum SourceDb {
    ReadOnly(ReadOnlyDatabase),
    /// A database on an [`Overlay`]: its writes never reach the file.
    Copy(Database),
}

impl SourceDb {
    fn begin_read(&self) -> Result<ReadTransaction, redb::TransactionError> {
        match self {
            SourceDb::ReadOnly(db) => db.begin_read(),
            SourceDb::Copy(db) => db.begin_read(),
        }
    }
}

/// The damaged database as `scan.rs` reads it: reopened after a panic.
pub(super) struct Reader<'d> {
    pub(super) open: &'d Opener,
    pub(super) db: Option<SourceDb>,
    pub(super) suspect: bool,
}

impl Reader<'_> {
    pub(super) fn reopen(&mut self) -> Result<(), DatabaseError> {
        // The old handle first: it may hold the file's lock.
        let old = self.db.take();
        quietly(|| drop(catch_unwind(AssertUnwindSafe(move || drop(old)))));
        let opened = quietly(|| catch_unwind(AssertUnwindSafe(|| (self.open)())));
        match opened {
            Ok(Ok(db)) => {
                self.db = Some(db);
                self.suspect = false;
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DatabaseError::Storage(redb::StorageError::Corrupted(
                "the storage engine panicked while opening the file".into(),
            ))),
        }
    }
}

impl scan::Source for Reader<'_> {
    fn begin(&mut self) -> Option<ReadTransaction> {
        if (self.suspect || self.db.is_none()) && self.reopen().is_err() {
            return None;
        }
        let db = self.db.as_ref()?;
        match quietly(|| catch_unwind(AssertUnwindSafe(|| db.begin_read()))) {
            Ok(Ok(txn)) => Some(txn),
            _ => {
                self.suspect = true;
                None
            }
        }
    }

    fn suspect(&mut self) {
        self.suspect = true;
    }
}

thread_local! {
    /// Set while this thread reads a damaged database: its panics are
    /// expected and counted, not printed one by one.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with this thread's panic messages silenced (other threads'
/// still reach the previous hook).
pub(crate) fn quietly<T>(f: impl FnOnce() -> T) -> T {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let out = f();
    QUIET.with(|q| q.set(was));
    out
}
