//! A stopped gateway's store, opened read-only for inspection
//! (`edge-gateway backlog --data-dir`): redb's `ReadOnlyDatabase` on the
//! file, no writer thread, no open-time changes (no migration, no cursor
//! created or dropped), so the file is left byte for byte as it was.
//!
//! redb refuses such an open while a `Database` holds the file (the running
//! gateway: [`redb::DatabaseError::DatabaseAlreadyOpen`]) and when the file
//! was not closed cleanly (a crash: [`redb::DatabaseError::RepairAborted`];
//! the next normal open repairs it).

use std::path::{Path, PathBuf};

use redb::{ReadOnlyDatabase, ReadableDatabase, ReadableTable};

use crate::reader::{self, read_err};
use crate::tables::{CURSORS, LOG, META, SCHEMA_KEY, SCHEMA_VERSION};
use crate::{DB_FILE, DeadLetter, Entry, OpenError, Seq, StoreError};

/// Read transactions on a store no process writes to.
pub struct ReadOnlyStore {
    db: ReadOnlyDatabase,
    path: PathBuf,
}

impl std::fmt::Debug for ReadOnlyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadOnlyStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ReadOnlyStore {
    /// Opens `<data_dir>/edge.redb` read-only; never creates or changes it.
    /// A store of another schema version is refused (a schema-1 store is
    /// migrated by the gateway's next start, not here).
    pub fn open(data_dir: &Path) -> Result<ReadOnlyStore, OpenError> {
        let path = data_dir.join(DB_FILE);
        let db = ReadOnlyDatabase::open(&path).map_err(|source| OpenError::Database {
            path: path.clone(),
            source,
        })?;
        let store = ReadOnlyStore { db, path };
        let found = store.schema_version().map_err(|e| OpenError::Init {
            path: store.path.clone(),
            message: e.to_string(),
            corrupt: false,
        })?;
        if found != Some(SCHEMA_VERSION) {
            return Err(OpenError::UnknownSchema {
                path: store.path.clone(),
                found: found.map_or_else(|| "none".to_string(), |v| v.to_string()),
                supported: SCHEMA_VERSION,
            });
        }
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn schema_version(&self) -> Result<Option<u32>, StoreError> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let meta = match txn.open_table(META) {
            Ok(meta) => meta,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(read_err(e)),
        };
        let value = meta.get(SCHEMA_KEY).map_err(read_err)?;
        Ok(value
            .and_then(|v| <[u8; 4]>::try_from(v.value()).ok())
            .map(u32::from_le_bytes))
    }

    /// Like [`crate::Store::read`].
    pub fn read(
        &self,
        from: Seq,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        reader::read(&self.db, from, max_messages, max_bytes)
    }

    /// Like [`crate::Store::cursor`]: a cursor never stored reads as the
    /// first seq in the log (the one past the last record when it is empty).
    pub fn cursor(&self, name: &str) -> Result<Seq, StoreError> {
        let past_last = || self.past_last().unwrap_or(0);
        reader::cursor(&self.db, name, past_last)
    }

    /// Every stored cursor: (name, next seq).
    pub fn cursors(&self) -> Result<Vec<(String, Seq)>, StoreError> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(CURSORS).map_err(read_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(read_err)? {
            let (k, v) = entry.map_err(read_err)?;
            out.push((k.value().to_string(), v.value()));
        }
        Ok(out)
    }

    fn past_last(&self) -> Result<Seq, StoreError> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let log = txn.open_table(LOG).map_err(read_err)?;
        let last = log.last().map_err(read_err)?.map(|(k, _)| k.value());
        Ok(last.map_or(0, |seq| seq + 1))
    }

    /// Like [`crate::Store::dead_letters`].
    pub fn dead_letters(&self, from: Seq, max: usize) -> Result<Vec<DeadLetter>, StoreError> {
        reader::dead_letters(&self.db, from, max)
    }

    /// Like [`crate::Store::gateway_id`].
    pub fn gateway_id(&self) -> Result<Option<String>, StoreError> {
        reader::meta_string(&self.db, crate::tables::GATEWAY_ID_KEY)
    }
}
