//! The simulated disk every fault test of this crate runs on: one database
//! file in memory that keeps what was written apart from what a completed
//! `sync_data` made durable, with one [`Fault`] at a time.
//!
//! - A write lands in `written` at once (what reads see, like the page
//!   cache) and is queued as unsynced; `sync_data` applies the queue to
//!   `synced`, the bytes that outlive a power cut.
//! - [`Disk::cut_power_after`] lets a number of writes and syncs through,
//!   then cuts the power: every later write and sync fails with a plain I/O
//!   error (not "no space", which the store answers by reopening), so the
//!   store reports a failure. A `set_len` after the cut is dropped and
//!   reported done: redb shrinks the file after a commit's final sync, and
//!   failing that call would report a failure for a commit that is durable.
//! - [`Disk::restart`] is the power coming back: the file holds what
//!   survived ([`Kept`]), the fault is gone, and a new backend on the disk
//!   is a process opening the file again.
//! - [`Disk::sibling`] is a second file on the same disk (the journal
//!   beside the database): one power, one fault, for both.

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// What the disk does to the calls it gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum Fault {
    #[default]
    None,
    /// `sync_data` fails (a plain I/O error); writes still land.
    FailSync,
    /// `sync_data` blocks until the fault is changed.
    StuckSync,
    /// Writes and syncs fail with "no space left on device".
    NoSpace,
    /// Writes and syncs fail; nothing reaches the file any more.
    PowerCut,
}

/// What the file holds after a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kept {
    /// What the last completed sync made durable.
    Synced,
    /// Every write made before the cut, as if the page cache reached the
    /// platter after all.
    Written,
    /// What was synced, and of the writes since then those a coin tossed
    /// from this seed picks: the page cache may write back any of its pages,
    /// in any order, before the power goes.
    Torn(u64),
}

#[derive(Debug)]
enum Change {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

impl Change {
    fn apply(&self, bytes: &mut Vec<u8>) {
        match self {
            Change::Write(offset, data) => {
                let start = *offset as usize;
                let end = start + data.len();
                if bytes.len() < end {
                    bytes.resize(end, 0);
                }
                bytes[start..end].copy_from_slice(data);
            }
            Change::SetLen(len) => bytes.resize(*len as usize, 0),
        }
    }
}

/// One file's bytes.
#[derive(Debug, Default)]
struct Bytes {
    written: Vec<u8>,
    synced: Vec<u8>,
    unsynced: Vec<Change>,
}

#[derive(Debug, Default)]
struct File {
    files: Vec<Bytes>,
    fault: Fault,
    /// Writes and syncs still let through before the power is cut.
    power_left: Option<u64>,
}

impl File {
    /// Counts one write or sync against [`File::power_left`]; `Err` once the
    /// power is (or now gets) cut, or with the fault in force.
    fn admit(&mut self, what: &str) -> io::Result<()> {
        if let Some(left) = self.power_left {
            match left.checked_sub(1) {
                Some(left) => self.power_left = Some(left),
                None => {
                    self.power_left = None;
                    self.fault = Fault::PowerCut;
                }
            }
        }
        match self.fault {
            Fault::PowerCut => Err(io::Error::other(format!("power cut: {what} lost"))),
            Fault::NoSpace => Err(io::Error::from(io::ErrorKind::StorageFull)),
            _ => Ok(()),
        }
    }
}

/// A simulated disk (one file of it); clones share it.
#[derive(Debug, Clone)]
pub(super) struct Disk {
    file: Arc<(Mutex<File>, Condvar)>,
    index: usize,
}

impl Default for Disk {
    fn default() -> Disk {
        let file = File {
            files: vec![Bytes::default()],
            ..File::default()
        };
        Disk {
            file: Arc::new((Mutex::new(file), Condvar::new())),
            index: 0,
        }
    }
}

impl Disk {
    fn lock(&self) -> MutexGuard<'_, File> {
        self.file.0.lock().unwrap()
    }

    /// Another file on this disk, under the same power and fault.
    pub(super) fn sibling(&self) -> Disk {
        let mut file = self.lock();
        file.files.push(Bytes::default());
        let index = file.files.len() - 1;
        drop(file);
        Disk {
            file: Arc::clone(&self.file),
            index,
        }
    }

    /// A redb backend on this disk's file.
    pub(super) fn backend(&self) -> DiskBackend {
        DiskBackend { disk: self.clone() }
    }

    pub(super) fn set_fault(&self, fault: Fault) {
        self.lock().fault = fault;
        self.file.1.notify_all();
    }

    /// Lets `calls` more writes and syncs through, then cuts the power.
    pub(super) fn cut_power_after(&self, calls: u64) {
        self.lock().power_left = Some(calls);
    }

    /// The file's bytes as they are now (what a read sees).
    pub(super) fn contents(&self) -> Vec<u8> {
        self.lock().files[self.index].written.clone()
    }

    pub(super) fn power_is_cut(&self) -> bool {
        self.lock().fault == Fault::PowerCut
    }

    /// The power comes back (cut now if it was not): the file keeps what
    /// `kept` says and the disk works again. Call it once nothing uses the
    /// old backend (the store was dropped).
    pub(super) fn restart(&self, kept: Kept) {
        let mut file = self.lock();
        for (i, bytes) in file.files.iter_mut().enumerate() {
            let unsynced = std::mem::take(&mut bytes.unsynced);
            match kept {
                Kept::Synced => {}
                Kept::Written => bytes.synced = bytes.written.clone(),
                Kept::Torn(seed) => {
                    let seed = seed.wrapping_add((i as u64) << 40);
                    for (n, change) in unsynced.iter().enumerate() {
                        if coin(seed, n as u64) {
                            change.apply(&mut bytes.synced);
                        }
                    }
                }
            }
            bytes.written = bytes.synced.clone();
        }
        file.fault = Fault::None;
        file.power_left = None;
        drop(file);
        self.file.1.notify_all();
    }
}

/// One toss of a coin seeded with `seed` (splitmix64 of `seed + n`).
fn coin(seed: u64, n: u64) -> bool {
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) & 1 == 1
}

/// A [`Disk`] as a redb storage backend.
#[derive(Debug)]
pub(super) struct DiskBackend {
    disk: Disk,
}

impl redb::StorageBackend for DiskBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.disk.lock().files[self.disk.index].written.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let file = self.disk.lock();
        let start = offset as usize;
        let bytes = file.files[self.disk.index]
            .written
            .get(start..start + out.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut file = self.disk.lock();
        if file.fault != Fault::PowerCut {
            let change = Change::SetLen(len);
            let bytes = &mut file.files[self.disk.index];
            change.apply(&mut bytes.written);
            bytes.unsynced.push(change);
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut file = self.disk.lock();
        while file.fault == Fault::StuckSync {
            file = self.disk.file.1.wait(file).unwrap();
        }
        file.admit("sync")?;
        if file.fault == Fault::FailSync {
            return Err(io::Error::other("injected fsync failure"));
        }
        let Bytes {
            synced, unsynced, ..
        } = &mut file.files[self.disk.index];
        for change in unsynced.drain(..) {
            change.apply(synced);
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut file = self.disk.lock();
        file.admit("write")?;
        let change = Change::Write(offset, data.to_vec());
        let bytes = &mut file.files[self.disk.index];
        change.apply(&mut bytes.written);
        bytes.unsynced.push(change);
        Ok(())
    }
}
