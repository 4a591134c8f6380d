//! Free space on the data directory's filesystem.
//!
//! redb grows its file as it needs pages and reuses pages freed by retired
//! records, but it cannot take any write after an I/O error such as
//! `ENOSPC`. So the writer keeps `min_free` bytes of the filesystem free:
//! once less is available it takes no more bytes than the store held at that
//! moment (new records then go into pages that retirement frees, not into a
//! larger file), and below half of `min_free` it refuses every append. A
//! commit that still runs out of space is refused like a full quota, and the
//! database is reopened (see `writer.rs`).

use std::io;
use std::path::Path;

use crate::StoreOptions;

/// After a commit ran out of space (with `min_free` 0 or too small), the
/// store holds to what it had until at least this much is free again.
pub(crate) const ROOM_AGAIN: u64 = 4 << 20;

/// Bytes available to this process on the filesystem holding `dir`.
pub(crate) fn available(dir: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Whether `e` says the filesystem (or the user's disk quota) is full.
pub(crate) fn is_no_space(e: &redb::Error) -> bool {
    matches!(e, redb::Error::Io(io) if is_io_no_space(io))
}

/// Whether an I/O error says the filesystem (or the quota) is full.
pub(crate) fn is_io_no_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// At open: warns when `max_bytes` is more than the filesystem can hold
/// beside the reserve, since then the disk, not the quota, is what will
/// refuse data.
pub(crate) fn warn_if_quota_exceeds_disk(dir: &Path, file: &Path, options: &StoreOptions) {
    let available = match available(dir) {
        Ok(a) => a,
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "cannot read the free space of the data directory's filesystem; the store.min_free reserve is not enforced");
            return;
        }
    };
    let file_len = std::fs::metadata(file).map_or(0, |m| m.len());
    let capacity = available
        .saturating_add(file_len)
        .saturating_sub(options.min_free);
    if options.max_bytes > capacity {
        tracing::warn!(
            dir = %dir.display(),
            max_bytes = options.max_bytes,
            available,
            store_file_bytes = file_len,
            min_free = options.min_free,
            "store.max_bytes exceeds what the filesystem can hold: the disk will fill before the quota; appends are refused once less than store.min_free is free"
        );
    }
}
