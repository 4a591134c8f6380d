//! A storage seam: a redb [`StorageBackend`] around the plain file backend
//! that counts what reaches the disk and can make `sync_data` slow.
//!
//! It exists for benches and tests: SD cards and eMMC take 5–50 ms per
//! fsync where a server SSD takes 0.1 ms, and group commit has to hold up
//! there. The byte counter measures write amplification (bytes written to
//! the file per durable message).

use std::fs::OpenOptions;
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redb::backends::FileBackend;
use redb::{BackendError, DatabaseError, StorageBackend};

/// What a [`SlowSyncBackend`] has seen; shared with whoever holds a clone.
#[derive(Debug, Default)]
pub struct BackendCounters {
    bytes_written: AtomicU64,
    syncs: AtomicU64,
}

impl BackendCounters {
    /// Bytes handed to `write` (before the OS page cache).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }

    /// Calls to `sync_data` (one per durable commit).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }
}

/// File backend whose `sync_data` takes at least `sync_delay` (zero: no delay,
/// counting only).
#[derive(Debug)]
pub struct SlowSyncBackend {
    inner: Box<dyn StorageBackend>,
    sync_delay: Duration,
    counters: Arc<BackendCounters>,
}

impl SlowSyncBackend {
    /// Opens (creating if missing) the database file at `path`.
    pub fn open(path: &Path, sync_delay: Duration) -> Result<SlowSyncBackend, DatabaseError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(SlowSyncBackend {
            inner: Box::new(FileBackend::new(file)?),
            sync_delay,
            counters: Arc::default(),
        })
    }

    /// Opens (creating if missing) a journal file at `path` the way
    /// [`crate::Store::open`] does (`O_DIRECT` on Linux), for
    /// [`crate::Store::open_with_journal`].
    pub fn open_journal(path: &Path, sync_delay: Duration) -> std::io::Result<SlowSyncBackend> {
        Ok(SlowSyncBackend {
            inner: Box::new(crate::journal::DirectFile::open(path)?),
            sync_delay,
            counters: Arc::default(),
        })
    }

    pub fn counters(&self) -> Arc<BackendCounters> {
        Arc::clone(&self.counters)
    }
}

impl StorageBackend for SlowSyncBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        if !self.sync_delay.is_zero() {
            std::thread::sleep(self.sync_delay);
        }
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.counters
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), io::Error> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
