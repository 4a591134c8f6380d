//! Crash tests of the write-ahead journal (`journal.rs`) on the simulated
//! disk: the database and the journal are two files under one power.

use std::collections::BTreeMap;
use std::path::Path;

use super::disk::{Disk, Kept};
use super::{number, options, record};
use crate::{Seq, Store, StoreOptions};

/// A journal this small holds 8 frames (each takes a block of its own), so
/// every 9th batch is a checkpoint and a run of 60 crosses every step
/// several times: frame, checkpoint (fold), next epoch overwriting the
/// last.
const SMALL_JOURNAL: u64 = 8 * 4096;

fn open(db: &Disk, journal: &Disk, capacity: u64, opts: StoreOptions) -> Store {
    Store::open_with_journal(
        db.backend(),
        journal.backend(),
        capacity,
        Path::new("mem"),
        opts,
    )
    .unwrap()
}

/// Every record as (number, seq).
fn numbers(store: &Store) -> Vec<(u64, Seq)> {
    store
        .read(0, usize::MAX, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| (number(&e.record), e.seq))
        .collect()
}

#[tokio::test]
async fn a_crash_at_any_step_of_the_journal_loses_no_acknowledged_append_and_repeats_no_seq() {
    let mut cut = 0u64;
    loop {
        let db = Disk::default();
        let journal = db.sibling();
        let store = open(&db, &journal, SMALL_JOURNAL, options(u64::MAX, &["up"]));
        db.cut_power_after(cut);
        // Appends, a cursor moved every 10 (retirement goes through the
        // journal too), then a close (a last checkpoint).
        let mut acked: BTreeMap<u64, Seq> = BTreeMap::new();
        let mut cursor_acked = 0;
        for n in 1..=60u64 {
            match store.append(record(n, 40)).await {
                Ok(seq) => {
                    acked.insert(n, seq);
                }
                Err(_) => break,
            }
            if n % 10 == 0 {
                let to = acked[&(n - 3)];
                if store.advance_cursor("up", to).await.is_err() {
                    break;
                }
                cursor_acked = to;
            }
        }
        let _ = store.close().await;
        let finished = !db.power_is_cut();
        let kept = match cut % 3 {
            0 => Kept::Synced,
            1 => Kept::Written,
            _ => Kept::Torn(cut),
        };
        db.restart(kept);

        let store = open(&db, &journal, SMALL_JOURNAL, options(u64::MAX, &["up"]));
        let cursor = store.cursor("up").unwrap();
        assert!(
            cursor >= cursor_acked,
            "cut {cut}: acknowledged cursor {cursor_acked} came back as {cursor}"
        );
        let found = numbers(&store);
        let mut seen = BTreeMap::new();
        for &(n, seq) in &found {
            assert!(
                seen.insert(n, seq).is_none(),
                "cut {cut}: record {n} stored twice"
            );
            if let Some(&at) = acked.get(&n) {
                assert_eq!(seq, at, "cut {cut}: record {n} moved");
            }
        }
        for (&n, &seq) in &acked {
            if seq >= cursor {
                assert_eq!(
                    seen.get(&n),
                    Some(&seq),
                    "cut {cut} ({kept:?}): acknowledged record {n} (seq {seq}) lost"
                );
            }
        }
        let highest = acked
            .values()
            .chain(found.iter().map(|(_, s)| s))
            .copied()
            .max()
            .unwrap_or(0);
        let next = store.append(record(1000, 40)).await.unwrap();
        assert!(
            next > highest,
            "cut {cut}: seq {next} handed out again (highest {highest})"
        );
        store.close().await.unwrap();
        if finished {
            break;
        }
        cut += 1;
    }
    assert!(cut > 100, "only {cut} cut points");
}

#[tokio::test]
async fn acknowledged_appends_only_in_the_journal_come_back_by_replay() {
    let db = Disk::default();
    let journal = db.sibling();
    let store = open(&db, &journal, 1 << 20, options(u64::MAX, &[]));
    for n in 1..=20 {
        assert_eq!(store.append(record(n, 100)).await.unwrap(), n);
    }
    // Reads see what is journaled and not folded yet.
    assert_eq!(numbers(&store).len(), 20);
    // The power goes before any checkpoint: the database file holds none
    // of the 20, only the journal does.
    db.cut_power_after(0);
    drop(store);
    db.restart(Kept::Synced);
    let store = open(&db, &journal, 1 << 20, options(u64::MAX, &[]));
    let expected: Vec<(u64, Seq)> = (1..=20).map(|n| (n, n)).collect();
    assert_eq!(numbers(&store), expected);
    assert_eq!(store.stats().live_messages, 20, "figures replayed too");
    assert_eq!(store.append(record(21, 100)).await.unwrap(), 21);
}

#[tokio::test]
async fn a_journal_left_by_another_database_is_not_replayed() {
    let db = Disk::default();
    let journal = db.sibling();
    let store = open(&db, &journal, 1 << 20, options(u64::MAX, &[]));
    for n in 1..=5 {
        store.append(record(n, 10)).await.unwrap();
    }
    db.cut_power_after(0);
    drop(store);
    db.restart(Kept::Synced);
    // A fresh database (the damaged one moved aside) beside the old journal.
    let fresh = journal.sibling();
    let store = open(&fresh, &journal, 1 << 20, options(u64::MAX, &[]));
    assert!(numbers(&store).is_empty());
    assert_eq!(store.append(record(6, 10)).await.unwrap(), 1);
    store.close().await.unwrap();
    let store = open(&fresh, &journal, 1 << 20, options(u64::MAX, &[]));
    assert_eq!(numbers(&store), vec![(6, 1)]);
}
