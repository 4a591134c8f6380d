//! Reading one table of a damaged database range by range, around the
//! pages that cannot be read.
//!
//! redb does not check a page's checksum when it reads it: a damaged page
//! makes a read fail (`Corrupted`, an I/O error) or panic (an index out of
//! bounds in a mangled page), and neither says which keys it held. Every
//! read here is one read transaction inside `catch_unwind`, and a failed
//! one is narrowed down:
//!
//! - **Seq-keyed tables** (`u64`, `(u64, u64)` keys) are read forward in
//!   chunks. Where a read fails after key `k`, a binary search finds the
//!   smallest start `s > k` from which a read succeeds (a start whose path
//!   leads into the damaged page fails, one past the page's last key does
//!   not), then a backward read from `s - 1` picks up whatever is readable
//!   below it (a good page between two bad ones), and the forward read goes
//!   on from `s`. One damaged leaf thus loses the keys on it and nothing
//!   else, in about 64 reads (128 for pairs) per damaged stretch.
//! - **Name-keyed tables** (`&str` keys) cannot be bisected: they are read
//!   forward from the first key and, after a failure, backward from the
//!   last one. What lies between the first and the last failure is lost
//!   (these tables are small: cursors, queues, sessions, ...).
//!
//! What is read is handed to a sink in chunks, so a large log is never
//! held in memory whole. A panic may leave the database handle unusable
//! (a poisoned lock): the source reopens the database after one.

use std::ops::Bound;
use std::panic::{AssertUnwindSafe, catch_unwind};

use redb::{Key, ReadTransaction, TableDefinition, TableError, Value};

/// Entries handed to the sink at a time (one write transaction each).
pub(super) const CHUNK: usize = 4096;

/// One raw entry: the key and value as redb encodes them.
pub(super) type Raw = (Vec<u8>, Vec<u8>);

/// How a read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// The range was read to its end.
    Done,
    /// `CHUNK` entries were read; more may follow.
    More,
    /// A page could not be read (error or panic).
    Damaged,
}

/// What a table gave up, as far as reading can tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Scanned {
    pub entries: u64,
    /// Stretches of keys that could not be read.
    pub stretches: u64,
    /// Key values inside those stretches that were not read (seq-keyed
    /// tables only; for the log, the seq gaps), not counting a stretch that
    /// runs to the end of the table.
    pub skipped: u128,
    /// Reads that panicked.
    pub panics: u64,
}

/// Where reads go: begins read transactions on the damaged database.
pub(super) trait Source {
    /// A read transaction, reopening the database if it is suspect;
    /// `None` when it cannot be opened at all.
    fn begin(&mut self) -> Option<ReadTransaction>;
    /// A read panicked: the handle may hold a poisoned lock, so the next
    /// [`Source::begin`] reopens the database.
    fn suspect(&mut self);
}

/// Key types the seq-keyed scan can do arithmetic on: a total order on
/// `0..=MAX` matching redb's order of the encoded keys.
pub(super) trait NumKey: Key + 'static {
    const MAX: u128;
    fn to_num(bytes: &[u8]) -> u128;
    fn from_num(n: u128) -> Vec<u8>;
}

impl NumKey for u64 {
    const MAX: u128 = u64::MAX as u128;
    fn to_num(bytes: &[u8]) -> u128 {
        u128::from(<u64 as Value>::from_bytes(bytes))
    }
    fn from_num(n: u128) -> Vec<u8> {
        (n as u64).to_le_bytes().to_vec()
    }
}

impl NumKey for (u64, u64) {
    const MAX: u128 = u128::MAX;
    fn to_num(bytes: &[u8]) -> u128 {
        let (a, b) = <(u64, u64) as Value>::from_bytes(bytes);
        (u128::from(a) << 64) | u128::from(b)
    }
    fn from_num(n: u128) -> Vec<u8> {
        let key = ((n >> 64) as u64, n as u64);
        let bytes = <(u64, u64) as Value>::as_bytes(&key);
        let bytes: &[u8] = bytes.as_ref();
        bytes.to_vec()
    }
}

/// Reads up to `limit` entries of `def` in `(from, to)`, forward or
/// backward, into `out`; entries read before a failure are kept.
#[allow(clippy::too_many_arguments)]
fn read<K: Key + 'static, V: Value + 'static>(
    source: &mut dyn Source,
    def: TableDefinition<K, V>,
    from: &Bound<Vec<u8>>,
    to: &Bound<Vec<u8>>,
    backward: bool,
    limit: usize,
    out: &mut Vec<Raw>,
    panics: &mut u64,
) -> End {
    let Some(txn) = source.begin() else {
        return End::Damaged;
    };
    let result = super::quietly(|| {
        catch_unwind(AssertUnwindSafe(move || {
            // Dropped in here too: a damaged page can make that panic.
            let txn = txn;
            read_txn(&txn, def, (from, to), backward, limit, &mut *out)
        }))
    });
    match result {
        Ok(Ok(end)) => end,
        Ok(Err(_)) => End::Damaged,
        Err(_) => {
            *panics += 1;
            source.suspect();
            End::Damaged
        }
    }
}

fn read_txn<K: Key + 'static, V: Value + 'static>(
    txn: &ReadTransaction,
    def: TableDefinition<K, V>,
    (from, to): (&Bound<Vec<u8>>, &Bound<Vec<u8>>),
    backward: bool,
    limit: usize,
    out: &mut Vec<Raw>,
) -> Result<End, redb::Error> {
    let table = match txn.open_table(def) {
        Ok(table) => table,
        Err(TableError::TableDoesNotExist(_)) => return Ok(End::Done),
        Err(e) => return Err(e.into()),
    };
    let range = table.range::<K::SelfType<'_>>((typed::<K>(from), typed::<K>(to)))?;
    let mut take = |entry: Result<(redb::AccessGuard<'_, K>, redb::AccessGuard<'_, V>), _>| {
        let (k, v): (redb::AccessGuard<'_, K>, redb::AccessGuard<'_, V>) = entry?;
        out.push((
            K::as_bytes(&k.value()).as_ref().to_vec(),
            V::as_bytes(&v.value()).as_ref().to_vec(),
        ));
        Ok::<_, redb::StorageError>(())
    };
    let mut n = 0usize;
    if backward {
        for entry in range.rev() {
            if n == limit {
                return Ok(End::More);
            }
            take(entry)?;
            n += 1;
        }
    } else {
        for entry in range {
            if n == limit {
                return Ok(End::More);
            }
            take(entry)?;
            n += 1;
        }
    }
    Ok(End::Done)
}

/// A bound on encoded keys as a bound on `K`.
fn typed<K: Key + 'static>(bound: &Bound<Vec<u8>>) -> Bound<K::SelfType<'_>> {
    match bound {
        Bound::Included(k) => Bound::Included(K::from_bytes(k)),
        Bound::Excluded(k) => Bound::Excluded(K::from_bytes(k)),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// Reads a seq-keyed table forward from `from`, in chunks, into `sink`;
/// returns how it ended and the last key read.
fn forward<K: NumKey, V: Value + 'static>(
    source: &mut dyn Source,
    def: TableDefinition<K, V>,
    mut from: u128,
    sink: &mut dyn FnMut(Vec<Raw>) -> Result<(), redb::Error>,
    scanned: &mut Scanned,
) -> Result<(End, Option<u128>), redb::Error> {
    let mut last = None;
    loop {
        let mut out = Vec::new();
        let end = read(
            source,
            def,
            &Bound::Included(K::from_num(from)),
            &Bound::Unbounded,
            false,
            CHUNK,
            &mut out,
            &mut scanned.panics,
        );
        if let Some((k, _)) = out.last() {
            last = Some(K::to_num(k));
        }
        scanned.entries += out.len() as u64;
        if !out.is_empty() {
            sink(out)?;
        }
        match (end, last) {
            (End::More, Some(l)) if l < K::MAX => from = l + 1,
            (End::More, _) => return Ok((End::Done, last)),
            (end, _) => return Ok((end, last)),
        }
    }
}

/// Whether a read of a seq-keyed table starting at `at` gets past the
/// damage: it reads an entry, or finds that none follows.
fn readable_from<K: NumKey, V: Value + 'static>(
    source: &mut dyn Source,
    def: TableDefinition<K, V>,
    at: u128,
    panics: &mut u64,
) -> bool {
    let mut out = Vec::new();
    let end = read(
        source,
        def,
        &Bound::Included(K::from_num(at)),
        &Bound::Unbounded,
        false,
        1,
        &mut out,
        panics,
    );
    end != End::Damaged || !out.is_empty()
}

/// The smallest start above `failed` from which a read succeeds (`None`:
/// nothing is readable from there to the end). Binary search: it assumes
/// the starts that fail form one stretch, which holds for one damaged page
/// (the backward read in [`seq_table`] covers the other cases).
fn restart_after<K: NumKey, V: Value + 'static>(
    source: &mut dyn Source,
    def: TableDefinition<K, V>,
    failed: u128,
    panics: &mut u64,
) -> Option<u128> {
    let mut lo = failed;
    let mut hi: Option<u128> = None;
    loop {
        // Candidates strictly between lo and hi (hi = None: up to MAX).
        let between = match hi {
            Some(h) => h - lo - 1,
            None => K::MAX - lo,
        };
        if between == 0 {
            return hi;
        }
        let mid = lo + 1 + (between - 1) / 2;
        if readable_from(source, def, mid, panics) {
            hi = Some(mid);
        } else {
            lo = mid;
        }
    }
}

/// Reads `[from, to)` of a seq-keyed table backward, in chunks, until the
/// first failure; returns the entries in key order.
fn backward<K: NumKey, V: Value + 'static>(
    source: &mut dyn Source,
    def: TableDefinition<K, V>,
    from: u128,
    to: Option<u128>,
    panics: &mut u64,
) -> Vec<Raw> {
    let mut got: Vec<Raw> = Vec::new();
    let mut upper = to.map_or(Bound::Unbounded, |t| Bound::Excluded(K::from_num(t)));
    loop {
        let before = got.len();
        let end = read(
            source,
            def,
            &Bound::Included(K::from_num(from)),
            &upper,
            true,
            CHUNK,
            &mut got,
            panics,
        );
        match (end, got.get(before..).and_then(<[Raw]>::last)) {
            (End::More, Some((k, _))) => upper = Bound::Excluded(k.clone()),
            _ => break,
        }
    }
    got.reverse();
    got
}

/// Copies a seq-keyed table into `sink`, around its damaged pages.
pub(super) fn seq_table<K: NumKey, V: Value + 'static>(
    source: &mut dyn Source,
    def: TableDefinition<K, V>,
    sink: &mut dyn FnMut(Vec<Raw>) -> Result<(), redb::Error>,
) -> Result<Scanned, redb::Error> {
    let mut scanned = Scanned::default();
    let mut from = 0u128;
    loop {
        let (end, last) = forward(source, def, from, sink, &mut scanned)?;
        if end != End::Damaged {
            return Ok(scanned);
        }
        // The first key the forward read did not get.
        let failed = match last {
            Some(l) if l == K::MAX => return Ok(scanned),
            Some(l) => l + 1,
            None => from,
        };
        scanned.stretches += 1;
        let restart = restart_after(source, def, failed, &mut scanned.panics);
        let below = backward(source, def, failed, restart, &mut scanned.panics);
        // Key values in [failed, restart) not read: for the log, seq gaps.
        // A stretch running to the end of the table has no upper bound to
        // count a gap from: it counts as a stretch only.
        if let Some(r) = restart {
            scanned.skipped += (r - failed).saturating_sub(below.len() as u128);
        }
        scanned.entries += below.len() as u64;
        if !below.is_empty() {
            sink(below)?;
        }
        match restart {
            Some(r) => from = r,
            None => return Ok(scanned),
        }
    }
}

/// Copies a name-keyed table into `sink`: forward from the first key,
/// then, after a failure, backward from the last.
pub(super) fn named_table<K: Key + 'static, V: Value + 'static>(
    source: &mut dyn Source,
    def: TableDefinition<K, V>,
    sink: &mut dyn FnMut(Vec<Raw>) -> Result<(), redb::Error>,
) -> Result<Scanned, redb::Error> {
    let mut scanned = Scanned::default();
    let mut from = Bound::Unbounded;
    let last_forward = loop {
        let mut out = Vec::new();
        let end = read(
            source,
            def,
            &from,
            &Bound::Unbounded,
            false,
            CHUNK,
            &mut out,
            &mut scanned.panics,
        );
        let last = out.last().map(|(k, _)| k.clone());
        scanned.entries += out.len() as u64;
        if !out.is_empty() {
            sink(out)?;
        }
        match (end, last) {
            (End::Done, _) => return Ok(scanned),
            (End::More, Some(k)) => from = Bound::Excluded(k),
            (End::More, None) => return Ok(scanned),
            (End::Damaged, last) => break last.map_or(from, Bound::Excluded),
        }
    };
    scanned.stretches += 1;
    let mut to = Bound::Unbounded;
    loop {
        let mut out = Vec::new();
        let end = read(
            source,
            def,
            &last_forward,
            &to,
            true,
            CHUNK,
            &mut out,
            &mut scanned.panics,
        );
        let lowest = out.last().map(|(k, _)| k.clone());
        scanned.entries += out.len() as u64;
        if !out.is_empty() {
            sink(out)?;
        }
        match (end, lowest) {
            (End::More, Some(k)) => to = Bound::Excluded(k),
            _ => return Ok(scanned),
        }
    }
}
