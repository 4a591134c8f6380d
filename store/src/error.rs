use crate::Seq;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open store {path}: {source}")]
    Database {
        path: std::path::PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    /// The database was written by a build with another schema version.
    #[error(
        "store {path} has schema version {found}; this build reads version {supported} (move it aside or use a matching build)"
    )]
    UnknownSchema {
        path: std::path::PathBuf,
        found: String,
        supported: u32,
    },
    #[error("store {path}: {message}")]
    Init {
        path: std::path::PathBuf,
        message: String,
        /// The tables could not be read because the file is damaged.
        corrupt: bool,
    },
}

impl OpenError {
    /// Whether the database file itself is damaged — as opposed to locked
    /// by another process, unreadable for lack of permission, or written by
    /// a build with another schema. Only damage justifies moving it aside.
    /// Whether another handle holds the database (the running gateway).
    pub fn is_in_use(&self) -> bool {
        matches!(
            self,
            OpenError::Database {
                source: redb::DatabaseError::DatabaseAlreadyOpen,
                ..
            }
        )
    }

    /// Whether a read-only open was refused because the file was not closed
    /// cleanly: the repair a normal open makes is needed first.
    pub fn needs_repair(&self) -> bool {
        matches!(
            self,
            OpenError::Database {
                source: redb::DatabaseError::RepairAborted,
                ..
            }
        )
    }

    pub fn is_corruption(&self) -> bool {
        match self {
            OpenError::Database {
                source: redb::DatabaseError::Storage(storage),
                ..
            } => storage_is_corrupt(storage),
            OpenError::Init { corrupt, .. } => *corrupt,
            _ => false,
        }
    }
}

pub(crate) fn storage_is_corrupt(e: &redb::StorageError) -> bool {
    match e {
        redb::StorageError::Corrupted(_) => true,
        // redb reports a foreign or mangled header ("magic number
        // mismatch") as invalid data.
        redb::StorageError::Io(io) => io.kind() == std::io::ErrorKind::InvalidData,
        _ => false,
    }
}

/// Why the store is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullReason {
    /// `max_bytes` would be exceeded (`when_full = "reject"`).
    Quota,
    /// The filesystem is short of space (`min_free`, or a commit ran out):
    /// `max_bytes` is then the bytes the store held when it ran short.
    Disk,
}

impl FullReason {
    /// Label of `edge_store_rejected_total`.
    pub fn label(self) -> &'static str {
        match self {
            FullReason::Quota => "full",
            FullReason::Disk => "disk_full",
        }
    }
}

impl std::fmt::Display for FullReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FullReason::Quota => "quota reached",
            FullReason::Disk => "filesystem out of space",
        })
    }
}

/// Why an append was not committed. Expected conditions are variants.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    /// Refused for room: the quota would be exceeded, or the disk is short
    /// of space. Nothing stored is touched; space comes back as upstreams
    /// confirm.
    #[error(
        "store full ({reason}): {live_bytes} of {max_bytes} bytes used, record of {record_bytes} bytes refused"
    )]
    Full {
        reason: FullReason,
        live_bytes: u64,
        max_bytes: u64,
        record_bytes: u64,
    },
    /// The writer has stopped (shutdown).
    #[error("store closed")]
    Closed,
    /// The commit failed; nothing in the batch was made durable.
    #[error("store commit failed: {0}")]
    Io(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store closed")]
    Closed,
    /// `advance_cursor` on a name not in `StoreOptions::cursors`.
    #[error("cursor {name:?} is not configured")]
    UnknownCursor { name: String },
    #[error("store read failed: {0}")]
    Read(String),
    #[error("store write failed: {0}")]
    Write(String),
    /// A stored value of the store's own (a dead letter's marks) is damaged.
    #[error("entry {seq} is unreadable: {what}")]
    Damaged { seq: Seq, what: &'static str },
}
