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
    #[error("store {path}: {message}")]
    Init {
        path: std::path::PathBuf,
        message: String,
    },
}

/// Why an append was not committed. Expected conditions are variants.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    /// The quota would be exceeded (`when_full = "reject"`).
    #[error(
        "store full: {live_bytes} of {max_bytes} bytes live, record of {record_bytes} bytes refused"
    )]
    Full {
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
    #[error("store read failed: {0}")]
    Read(String),
    #[error("store write failed: {0}")]
    Write(String),
    #[error("record {seq} is unreadable: {source}")]
    Decode {
        seq: Seq,
        #[source]
        source: crate::DecodeError,
    },
}
