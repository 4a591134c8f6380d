//! What a salvage reports, and why one cannot be made.

use std::path::PathBuf;

use redb::DatabaseError;

use crate::Seq;
use crate::tables::SCHEMA_VERSION;

/// What one table gave up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableSalvage {
    pub table: &'static str,
    /// Entries copied from the damaged database.
    pub salvaged: u64,
    /// Entries lost (see the module documentation for what is counted).
    pub lost: u64,
    /// Stretches of keys that could not be read.
    pub damaged: u64,
}

/// The outcome of a salvage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Salvage {
    /// One per table of the salvage order (`salvage::TABLES`), in that order.
    pub tables: Vec<TableSalvage>,
    /// Journal frames applied to what was salvaged.
    pub journal_frames: usize,
    /// No seq below this is handed out by the salvaged store.
    pub next_seq: Seq,
    /// Reads the storage engine panicked in (each one contained).
    pub panics: u64,
    /// Where the damaged file was moved (by [`crate::Store::salvage`]).
    pub moved_to: Option<PathBuf>,
}

impl Salvage {
    pub fn table(&self, name: &str) -> Option<&TableSalvage> {
        self.tables.iter().find(|t| t.table == name)
    }

    pub fn salvaged(&self) -> u64 {
        self.tables.iter().map(|t| t.salvaged).sum()
    }

    pub fn lost(&self) -> u64 {
        self.tables.iter().map(|t| t.lost).sum()
    }

    /// `table=count` for every table with a count, e.g. `log=46000 cursors=2`
    /// (`-` when there is none): the log line's fields.
    pub fn summary(&self, count: impl Fn(&TableSalvage) -> u64) -> String {
        let parts: Vec<String> = self
            .tables
            .iter()
            .filter(|t| count(t) > 0)
            .map(|t| format!("{}={}", t.table, count(t)))
            .collect();
        if parts.is_empty() {
            "-".to_string()
        } else {
            parts.join(" ")
        }
    }
}

/// Why a salvage could not be made. The damaged file is then left where
/// it is (the caller moves it aside without salvage).
#[derive(Debug, thiserror::Error)]
pub enum SalvageError {
    /// Not even the database header and table directory can be read.
    #[error("cannot read the damaged store {path} at all: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: DatabaseError,
    },
    /// The damaged store records another schema version: its tables are
    /// not this build's to copy.
    #[error(
        "the damaged store {path} has schema version {found}; salvage reads version {SCHEMA_VERSION}"
    )]
    Schema { path: PathBuf, found: String },
    #[error("cannot write the salvaged store {path}: {source}")]
    Target {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error("salvaging the store in {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}
