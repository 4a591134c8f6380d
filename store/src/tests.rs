use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::*;
use disk::{Disk, Fault};

mod defer;
mod disk;
mod journal;
mod model;
mod operator;
mod salvage;

pub(super) fn options(max_bytes: u64, cursors: &[&str]) -> StoreOptions {
    StoreOptions {
        retire_without_cursors: false,
        max_bytes,
        batch_max_messages: NonZeroUsize::new(1000).unwrap(),
        batch_max_bytes: NonZeroUsize::new(8 << 20).unwrap(),
        inbox_capacity: NonZeroUsize::new(1024).unwrap(),
        cursors: cursors.iter().map(|c| c.to_string()).collect(),
        when_full: Default::default(),
        min_free: 0,
        max_age: None,
    }
}

/// A record the tests can tell apart: `n` (8 bytes), then `payload_len`
/// filler bytes (the store does not look inside).
pub(super) fn record(n: u64, payload_len: usize) -> Record {
    let mut bytes = n.to_le_bytes().to_vec();
    bytes.resize(8 + payload_len, (n % 251) as u8);
    Record::new(bytes)
}

/// The `n` of a [`record`].
fn number(r: &Record) -> u64 {
    let mut n = [0u8; 8];
    n.copy_from_slice(&r.bytes()[..8]);
    u64::from_le_bytes(n)
}

fn all(store: &Store) -> Vec<(Seq, Record)> {
    store
        .read(0, usize::MAX, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.record))
        .collect()
}

/// Parked by `upstream` at its own seq.
fn parked(upstream: &str, seq: Seq, reason: &str) -> Parked {
    Parked {
        upstream: upstream.into(),
        original_seq: seq,
        reason: reason.into(),
    }
}

fn slow(dir: &Path, delay_ms: u64, opts: StoreOptions) -> Store {
    let backend =
        SlowSyncBackend::open(&dir.join(DB_FILE), Duration::from_millis(delay_ms)).unwrap();
    Store::open_with_backend(backend, dir, opts).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submits_share_commits_and_keep_per_caller_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = slow(dir.path(), 20, options(u64::MAX, &[]));
    let mut tasks = Vec::new();
    for caller in 0..8u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut commits = Vec::new();
            for i in 0..25 {
                commits.push(store.submit(record(caller * 100 + i, 32)).await.unwrap());
            }
            let mut seqs = Vec::new();
            for c in commits {
                seqs.push(c.await.unwrap());
            }
            seqs
        }));
    }
    let mut every = Vec::new();
    for t in tasks {
        let seqs = t.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "order per caller: {seqs:?}"
        );
        every.extend(seqs);
    }
    every.sort_unstable();
    assert_eq!(every, (1..=200).collect::<Vec<_>>());
    let commits = store.commits();
    assert!(commits < 50, "200 appends took {commits} commits");
    assert_eq!(store.stats().next_seq, 201);
    assert_eq!(*store.committed().borrow(), 200);
    store.close().await.unwrap();
}

#[tokio::test]
async fn full_store_refuses_then_reuses_space_after_cursor_advance() {
    let dir = tempfile::tempdir().unwrap();
    let size = record(0, 100).encoded_len() as u64;
    let store = Store::open(dir.path(), options(3 * size, &["up"])).unwrap();
    for n in 1..=3 {
        assert_eq!(store.append(record(n, 100)).await.unwrap(), n);
    }
    match store.append(record(4, 100)).await {
        Err(AppendError::Full {
            reason,
            live_bytes,
            max_bytes,
            record_bytes,
        }) => {
            assert_eq!(reason, FullReason::Quota);
            assert_eq!(
                (live_bytes, max_bytes, record_bytes),
                (3 * size, 3 * size, size)
            );
        }
        other => panic!("expected Full, got {other:?}"),
    }
    store.advance_cursor("up", 3).await.unwrap();
    let stats = store.stats();
    assert_eq!(
        (stats.first_seq, stats.live_messages, stats.live_bytes),
        (3, 1, size)
    );
    assert_eq!(store.append(record(4, 100)).await.unwrap(), 4);
    assert_eq!(store.append(record(5, 100)).await.unwrap(), 5);
    let seqs: Vec<Seq> = all(&store).into_iter().map(|(s, _)| s).collect();
    assert_eq!(seqs, vec![3, 4, 5]);
}

#[tokio::test]
async fn the_full_watch_clears_when_retirement_makes_room_without_an_append() {
    let dir = tempfile::tempdir().unwrap();
    let size = record(0, 100).encoded_len() as u64;
    let store = Store::open(dir.path(), options(3 * size, &["up"])).unwrap();
    let mut full = store.full();
    for n in 1..=3 {
        store.append(record(n, 100)).await.unwrap();
    }
    assert!(full.borrow_and_update().is_none());
    assert!(matches!(
        store.append(record(4, 100)).await,
        Err(AppendError::Full { .. })
    ));
    // The refusal is answered inside the batch, the watch set after its commit.
    let reason = *tokio::time::timeout(Duration::from_secs(5), full.wait_for(Option::is_some))
        .await
        .expect("reported as full")
        .unwrap();
    assert_eq!(reason, Some(FullReason::Quota));
    // A cursor that retires nothing (still at the first record) makes no room.
    store.advance_cursor("up", 1).await.unwrap();
    assert!(full.borrow_and_update().is_some(), "still full");
    store.advance_cursor("up", 2).await.unwrap();
    assert!(
        full.borrow().is_none(),
        "room again after the retiring commit, no append needed"
    );
    assert_eq!(store.append(record(4, 100)).await.unwrap(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_after_a_refusal_in_the_same_batch_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let small = record(0, 10).encoded_len() as u64;
    let store = slow(dir.path(), 50, options(small * 3, &[]));
    // The first commit holds the writer in its slow fsync while the rest queue.
    let first = store.submit(record(1, 10)).await.unwrap();
    let big = store.submit(record(2, 500)).await.unwrap();
    let after = store.submit(record(3, 10)).await.unwrap();
    assert_eq!(first.await.unwrap(), 1);
    assert!(matches!(big.await, Err(AppendError::Full { .. })));
    assert!(matches!(after.await, Err(AppendError::Full { .. })));
    assert_eq!(store.append(record(4, 10)).await.unwrap(), 2);
}

#[tokio::test]
async fn cursors_survive_reopen_and_unconfigured_ones_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(u64::MAX, &["a", "b"])).unwrap();
    for n in 1..=5 {
        store.append(record(n, 8)).await.unwrap();
    }
    assert_eq!(
        store.cursor("a").unwrap(),
        1,
        "unset reads as the first seq"
    );
    store.advance_cursor("a", 4).await.unwrap();
    store.advance_cursor("a", 2).await.unwrap();
    store.advance_cursor("b", 3).await.unwrap();
    assert_eq!(store.cursor("a").unwrap(), 4, "never backwards");
    assert!(matches!(
        store.advance_cursor("zzz", 1).await,
        Err(StoreError::UnknownCursor { .. })
    ));
    store.close().await.unwrap();

    let store = Store::open(dir.path(), options(u64::MAX, &["a"])).unwrap();
    assert_eq!(store.cursor("a").unwrap(), 4);
    // With only "a" configured, records below 4 retire on the next batch.
    store.append(record(6, 8)).await.unwrap();
    assert_eq!(store.stats().first_seq, 4);
    drop(store);

    let store = Store::open(dir.path(), options(u64::MAX, &["a", "b"])).unwrap();
    assert_eq!(
        store.cursor("b").unwrap(),
        4,
        "b was removed: reads as the first seq"
    );
    assert_eq!(store.cursor("a").unwrap(), 4);
}

#[tokio::test]
async fn reopen_after_drop_keeps_every_committed_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(u64::MAX, &[])).unwrap();
    let mut expected = Vec::new();
    for n in 1..=100 {
        let r = record(n, (n as usize * 7) % 300);
        assert_eq!(store.append(r.clone()).await.unwrap(), n);
        expected.push((n, r));
    }
    drop(store);
    let store = Store::open(dir.path(), options(u64::MAX, &[])).unwrap();
    assert_eq!(all(&store), expected);
    let stats = store.stats();
    let bytes: u64 = expected.iter().map(|(_, r)| r.encoded_len() as u64).sum();
    assert_eq!(
        (stats.first_seq, stats.next_seq, stats.live_bytes),
        (1, 101, bytes)
    );
    assert_eq!(store.append(record(101, 1)).await.unwrap(), 101);
}

#[tokio::test]
async fn read_honours_its_limits() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(u64::MAX, &[])).unwrap();
    for n in 1..=10 {
        store.append(record(n, 100)).await.unwrap();
    }
    assert_eq!(store.read(4, 3, usize::MAX).unwrap().len(), 3);
    assert_eq!(store.read(4, 3, usize::MAX).unwrap()[0].seq, 4);
    assert_eq!(
        store.read(1, 100, 1).unwrap().len(),
        1,
        "at least one record"
    );
    let size = record(1, 100).encoded_len();
    assert_eq!(store.read(1, 100, 2 * size).unwrap().len(), 2);
    assert!(store.read(11, 100, usize::MAX).unwrap().is_empty());
}

#[tokio::test]
async fn parked_records_are_listed_with_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(u64::MAX, &[])).unwrap();
    let seq = store.append(record(1, 5)).await.unwrap();
    store
        .park(
            seq,
            record(1, 5),
            parked("up", seq, "unroutable: no queue bound"),
        )
        .await
        .unwrap();
    let dead = store.dead_letters(0, 10).unwrap();
    assert_eq!(
        dead,
        vec![DeadLetter {
            seq,
            original_seq: seq,
            upstreams: vec!["up".into()],
            reason: "unroutable: no queue bound".into(),
            record: record(1, 5),
        }]
    );
}

#[tokio::test]
async fn an_unknown_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path(), options(u64::MAX, &[])).unwrap());
    {
        let db = redb::Database::create(dir.path().join(DB_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(tables::META)
            .unwrap()
            .insert(tables::SCHEMA_KEY, 99u32.to_le_bytes().as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    match Store::open(dir.path(), options(u64::MAX, &[])) {
        Err(e @ OpenError::UnknownSchema { .. }) => {
            assert!(e.to_string().contains("schema version 99"), "{e}");
        }
        other => panic!("expected UnknownSchema, got {other:?}"),
    }
}

#[tokio::test]
async fn retirement_is_bounded_per_transaction_and_continues() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(u64::MAX, &["up"])).unwrap();
    let total = writer::RETIRE_PER_TXN as u64 * 2 + 500;
    let mut commits = Vec::new();
    for n in 0..total {
        commits.push(store.submit(record(n, 0)).await.unwrap());
    }
    for c in commits {
        c.await.unwrap();
    }
    store.advance_cursor("up", total + 1).await.unwrap();
    assert!(store.stats().live_messages <= total - writer::RETIRE_PER_TXN as u64);
    // Every later commit (and the idle writer) retires the next slice.
    store.append(record(0, 0)).await.unwrap();
    store.append(record(0, 0)).await.unwrap();
    let stats = store.stats();
    assert_eq!((stats.live_messages, stats.first_seq), (2, total + 1));
    drop(store);
    let store = Store::open(dir.path(), options(u64::MAX, &["up"])).unwrap();
    assert_eq!(store.stats().next_seq, total + 3);
}

#[tokio::test]
async fn close_commits_queued_work_and_later_calls_see_closed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(u64::MAX, &[])).unwrap();
    let other = store.clone();
    let pending = store.submit(record(1, 1)).await.unwrap();
    store.close().await.unwrap();
    assert_eq!(pending.await.unwrap(), 1);
    assert!(matches!(
        other.append(record(2, 1)).await,
        Err(AppendError::Closed)
    ));
    drop(other);
    let store = Store::open(dir.path(), options(u64::MAX, &[])).unwrap();
    assert_eq!(all(&store).len(), 1);
}

#[tokio::test]
async fn a_failed_commit_acknowledges_nothing_in_its_batch() {
    let disk = Disk::default();
    let store =
        Store::open_with_backend(disk.backend(), Path::new("mem"), options(u64::MAX, &[])).unwrap();
    assert_eq!(store.append(record(1, 1)).await.unwrap(), 1);
    disk.set_fault(Fault::FailSync);
    let a = store.submit(record(2, 1)).await.unwrap();
    let b = store.submit(record(3, 1)).await.unwrap();
    assert!(matches!(a.await, Err(AppendError::Io(_))));
    assert!(matches!(b.await, Err(AppendError::Io(_))));
    assert_eq!(*store.committed().borrow(), 1);
    assert_eq!(store.stats().next_seq, 2);
    assert!(
        store.failure().borrow().is_some(),
        "the failure is reported"
    );
}

#[test]
fn a_damaged_file_is_corruption_and_can_be_moved_aside() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(DB_FILE), vec![0xAB_u8; 64 * 1024]).expect("write garbage");
    let err = Store::open(dir.path(), options(1 << 20, &[])).expect_err("garbage must not open");
    assert!(err.is_corruption(), "{err}");

    let aside = Store::move_aside(dir.path()).expect("move aside");
    assert!(aside.exists() && !dir.path().join(DB_FILE).exists());
    let store = Store::open(dir.path(), options(1 << 20, &[])).expect("a fresh store opens");
    assert_eq!(store.stats().next_seq, 1);
}

#[test]
fn a_locked_database_is_not_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = Store::open(dir.path(), options(1 << 20, &[])).expect("open");
    let err =
        Store::open(dir.path(), options(1 << 20, &[])).expect_err("second open of the same file");
    assert!(!err.is_corruption(), "a lock is not damage: {err}");
}

#[tokio::test]
async fn a_new_store_starts_at_its_seed_and_an_existing_one_ignores_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_seeded(dir.path(), options(1 << 20, &[]), 1_000).expect("open");
    assert_eq!(store.append(record(1, 8)).await.expect("append"), 1_000);
    store.close().await.expect("close");

    let store = Store::open_seeded(dir.path(), options(1 << 20, &[]), 5).expect("reopen");
    assert_eq!(store.append(record(2, 8)).await.expect("append"), 1_001);
}

#[tokio::test]
async fn after_a_refusal_appends_wait_until_the_refused_record_would_fit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let small = record(0, 10).encoded_len() as u64;
    let big = record(0, 2 * small as usize).encoded_len() as u64;
    let store = Store::open(dir.path(), options(8 * small + small / 2, &["up"])).expect("open");
    for n in 1..=8 {
        store.append(record(n, 10)).await.expect("fits");
    }
    let refused = store.append(record(9, 2 * small as usize)).await;
    assert!(
        matches!(refused, Err(AppendError::Full { .. })),
        "{big} bytes: {refused:?}"
    );
    // A small one would fit, but it would overtake the refused one.
    assert!(matches!(
        store.append(record(10, 10)).await,
        Err(AppendError::Full { .. })
    ));
    store.advance_cursor("up", 2).await.expect("advance"); // 7 small live: no room for big
    assert!(matches!(
        store.append(record(11, 10)).await,
        Err(AppendError::Full { .. })
    ));
    store.advance_cursor("up", 4).await.expect("advance"); // 5 small live: big fits
    assert_eq!(
        store.append(record(12, 10)).await.expect("accepted again"),
        9
    );
}

#[tokio::test]
async fn the_gateway_id_is_recorded_with_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), options(1 << 20, &[])).expect("open");
    assert_eq!(store.gateway_id().expect("read"), None);
    store.set_gateway_id("edge-7").await.expect("record");
    store.close().await.expect("close");
    let store = Store::open(dir.path(), options(1 << 20, &[])).expect("reopen");
    assert_eq!(store.gateway_id().expect("read").as_deref(), Some("edge-7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_does_not_wait_for_ever_on_a_stuck_commit() {
    let disk = Disk::default();
    let store = Store::open_with_backend(disk.backend(), Path::new("mem"), options(1 << 20, &[]))
        .expect("open");
    disk.set_fault(Fault::StuckSync);
    let commit = store.submit(record(1, 8)).await.expect("queued");
    let dropped = tokio::task::spawn_blocking(move || drop(store));
    tokio::time::timeout(Duration::from_secs(30), dropped)
        .await
        .expect("drop returned instead of joining the stuck writer")
        .expect("drop did not panic");
    drop(commit);
    // Lets the writer left behind finish.
    disk.set_fault(Fault::None);
}

#[tokio::test]
async fn dead_letters_count_toward_the_quota_and_can_be_purged_or_replayed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), options(1 << 20, &["up"])).expect("open");
    for n in 1..=3 {
        let seq = store.append(record(n, 50)).await.expect("append");
        store
            .park(
                seq,
                record(n, 50),
                parked("up", seq, &format!("reason {n}")),
            )
            .await
            .expect("park");
    }
    store.advance_cursor("up", 4).await.expect("advance"); // the log is retired
    let stats = store.stats();
    assert_eq!((stats.live_messages, stats.dead_letters), (0, 3));
    assert!(stats.dead_letter_bytes > 3 * 50, "{stats:?}");
    drop(store);

    // Counted again at open.
    let store = Store::open(dir.path(), options(1 << 20, &["up"])).expect("reopen");
    assert_eq!(store.stats().dead_letters, 3);

    // Replay one: it is appended to the log under a new seq.
    assert_eq!(store.replay_dead_letters(1).await.expect("replay"), 1);
    let replayed = store.read(0, 10, usize::MAX).expect("read");
    assert_eq!(
        replayed,
        vec![Entry {
            seq: 4,
            record: record(1, 50),
            replay: Some(Replay {
                original_seq: 1,
                upstreams: vec!["up".into()],
            }),
        }]
    );
    assert_eq!(store.stats().dead_letters, 2);
    assert_eq!(*store.committed().borrow(), 4, "replicators are woken");

    // Purge the rest.
    assert_eq!(
        store.purge_dead_letters(usize::MAX).await.expect("purge"),
        2
    );
    let stats = store.stats();
    assert_eq!((stats.dead_letters, stats.dead_letter_bytes), (0, 0));
    assert!(store.dead_letters(0, 10).expect("list").is_empty());
}

#[tokio::test]
async fn parked_bytes_fill_the_quota_like_log_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = record(0, 100).encoded_len() as u64;
    let store = Store::open(dir.path(), options(3 * size, &["up"])).expect("open");
    let seq = store.append(record(1, 100)).await.expect("append");
    store
        .park(seq, record(1, 100), parked("up", seq, "r"))
        .await
        .expect("park");
    store.advance_cursor("up", seq + 1).await.expect("advance");
    store
        .append(record(2, 100))
        .await
        .expect("room for one more");
    assert!(
        matches!(
            store.append(record(3, 100)).await,
            Err(AppendError::Full { .. })
        ),
        "the parked record takes its share of the quota"
    );
    store.purge_dead_letters(usize::MAX).await.expect("purge");
    store
        .append(record(4, 100))
        .await
        .expect("room again after the purge");
}

#[tokio::test]
async fn a_refused_record_that_cannot_fit_beside_the_dead_letters_locks_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let small = record(0, 40).encoded_len() as u64;
    let store = Store::open(dir.path(), options(20 * small, &["up"])).expect("open");
    // Dead letters take most of the quota; the log is empty.
    for n in 1..=12 {
        let seq = store.append(record(n, 40)).await.expect("append");
        store
            .park(seq, record(n, 40), parked("up", seq, "r"))
            .await
            .expect("park");
        store.advance_cursor("up", seq + 1).await.expect("advance");
    }
    assert_eq!(store.stats().live_messages, 0);
    let big = 8 * small as usize;
    assert!(matches!(
        store.append(record(16, big)).await,
        Err(AppendError::Full { .. })
    ));
    // The big one can never fit until dead letters go: small ones still do.
    store
        .append(record(17, 40))
        .await
        .expect("a small record is not locked out");
}

#[tokio::test]
async fn replay_appends_the_parked_record_as_is_marked_for_its_upstreams() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), options(1 << 20, &["up"])).expect("open");
    let mut marked = Vec::new();
    for n in 1..=2 {
        let seq = store.append(record(n, 20)).await.expect("append");
        // The parked copy differs from the logged one: the replay is of it.
        let parked_record = record(n + 100, 20);
        store
            .park(
                seq,
                parked_record.clone(),
                parked("central", seq, "unroutable"),
            )
            .await
            .expect("park");
        marked.push((parked_record, seq));
    }
    store.advance_cursor("up", 3).await.expect("advance");
    let commits = store.commits();

    assert_eq!(store.replay_dead_letters(10).await.expect("replay"), 2);
    assert_eq!(store.commits(), commits + 1, "one commit for the replay");
    let replayed: Vec<(Record, Seq)> = store
        .read(0, 10, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|e| {
            let replay = e.replay.expect("marked as a replay");
            assert!(replay.is_for("central") && !replay.is_for("backup"));
            (e.record, replay.original_seq)
        })
        .collect();
    assert_eq!(
        replayed, marked,
        "oldest first, as parked, with their first seqs"
    );
    assert_eq!(store.stats().dead_letters, 0);
}

#[tokio::test]
async fn a_seq_parked_by_two_upstreams_keeps_both_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), options(1 << 20, &[])).expect("open");
    let seq = store.append(record(1, 5)).await.expect("append");
    for upstream in ["a", "b", "a"] {
        store
            .park(
                seq,
                record(1, 5),
                parked(upstream, seq, &format!("{upstream} failed")),
            )
            .await
            .expect("park");
    }
    let dead = store.dead_letters(0, 10).expect("list");
    assert_eq!(dead.len(), 1);
    assert_eq!(store.stats().dead_letters, 1);
    assert_eq!(dead[0].upstreams, ["a", "b"]);
    assert_eq!(dead[0].record, record(1, 5), "no marks in the record");
    assert!(
        dead[0].reason.contains("a failed") && dead[0].reason.contains("b failed"),
        "{}",
        dead[0].reason
    );
}

#[tokio::test]
async fn drop_oldest_makes_room_moves_cursors_and_never_reuses_seqs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = record(0, 100).encoded_len() as u64;
    let opts = || StoreOptions {
        retire_without_cursors: false,
        when_full: WhenFull::DropOldest,
        min_free: 0,
        max_age: None,
        ..options(3 * size, &["up"])
    };
    let store = Store::open(dir.path(), opts()).expect("open");
    for n in 1..=3 {
        store.append(record(n, 100)).await.expect("fits");
    }
    store
        .advance_cursor("up", 2)
        .await
        .expect("seq 1 forwarded"); // retires seq 1
    // Seqs 4 and 5 each push out the oldest unforwarded record.
    assert_eq!(store.append(record(4, 100)).await.expect("accepted"), 4);
    assert_eq!(store.append(record(5, 100)).await.expect("accepted"), 5);
    let seqs: Vec<Seq> = all(&store).into_iter().map(|(s, _)| s).collect();
    assert_eq!(seqs, [3, 4, 5]);
    assert_eq!(
        store.cursor("up").expect("cursor"),
        3,
        "the cursor skips what was dropped"
    );
    let stats = store.stats();
    assert_eq!(
        (stats.first_seq, stats.live_messages, stats.live_bytes),
        (3, 3, 3 * size)
    );

    // A record larger than the whole quota is refused; reopened, seqs continue.
    let big = record(6, 3 * 100 + 100);
    assert!(
        matches!(store.append(big).await, Err(AppendError::Full { .. })),
        "larger than the quota"
    );
    store.close().await.expect("close");
    let store = Store::open(dir.path(), opts()).expect("reopen");
    assert_eq!(store.append(record(7, 100)).await.expect("accepted"), 6);
}

#[tokio::test]
async fn running_out_of_disk_space_refuses_like_the_quota_and_the_store_stays_up() {
    let disk = Disk::default();
    let factory = {
        let disk = disk.clone();
        move || Ok(disk.backend())
    };
    let store =
        Store::open_with_backend_factory(factory, Path::new("mem"), options(u64::MAX, &["up"]))
            .unwrap();
    for n in 1..=3 {
        assert_eq!(store.append(record(n, 100)).await.unwrap(), n);
    }
    disk.set_fault(Fault::NoSpace);
    // The failing commit, then a batch while the database cannot be reopened.
    for n in 4..=5 {
        match store.append(record(n, 100)).await {
            Err(AppendError::Full { reason, .. }) => assert_eq!(reason, FullReason::Disk),
            other => panic!("expected a disk-full refusal, got {other:?}"),
        }
    }
    assert!(store.failure().borrow().is_none(), "not a store failure");
    assert!(store.full().borrow().is_some(), "reported as full");
    disk.set_fault(Fault::None);
    // The store takes no more than it held when the disk filled: the next
    // append waits for retirement to make room.
    assert!(matches!(
        store.append(record(6, 100)).await,
        Err(AppendError::Full { .. })
    ));
    store.advance_cursor("up", 3).await.unwrap();
    let seq = store.append(record(7, 100)).await.unwrap();
    assert_eq!(seq, 4, "no seq was spent on refused appends");
    assert!(store.full().borrow().is_none(), "accepting again");
    let kept: Vec<u64> = all(&store)
        .into_iter()
        .map(|(s, r)| {
            assert_eq!(number(&r), if s == 4 { 7 } else { s });
            s
        })
        .collect();
    assert_eq!(kept, vec![3, 4], "1 and 2 retired, 3 kept, 7 appended");
    drop(store);
    // Nothing committed was lost across the reopen.
    let store =
        Store::open_with_backend(disk.backend(), Path::new("mem"), options(u64::MAX, &["up"]))
            .unwrap();
    assert_eq!(all(&store).len(), 2);
}

#[tokio::test]
async fn a_record_queued_for_many_is_stored_once_and_retired_when_the_last_acks() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(u64::MAX, &["up"])).unwrap();
    let mut queues = Vec::new();
    for n in 0..100 {
        queues.push(store.create_queue(&format!("session/{n}")).await.unwrap());
    }
    assert_eq!(
        store.create_queue("session/7").await.unwrap(),
        queues[7],
        "idempotent"
    );
    let placement = Placement {
        log: true,
        queues: queues.clone(),
        retain: None,
        dedup: None,
    };
    let seq = store
        .submit_with(record(1, 1000), placement)
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(store.stats().live_messages, 1);
    assert!(
        store.stats().live_bytes < 1100,
        "stored once: {:?}",
        store.stats()
    );
    // The upstream is done with it; the queues still hold it.
    store.advance_cursor("up", seq + 1).await.unwrap();
    assert_eq!(store.stats().live_messages, 1);
    for q in &queues[..99] {
        let entries = store.queue_entries(*q, 0, 10).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].record.as_ref(), Some(&record(1, 1000)));
        store.queue_ack(*q, vec![seq]).await.unwrap();
    }
    assert_eq!(store.stats().live_messages, 1, "one queue still holds it");
    store.queue_set(queues[99], seq, 7).await.unwrap();
    drop(store);

    // Entries, their state and the hold survive a reopen.
    let store = Store::open(dir.path(), options(u64::MAX, &["up"])).unwrap();
    let last = queues[99];
    let entries = store.queue_entries(last, 0, 10).unwrap();
    assert_eq!((entries.len(), entries[0].state), (1, 7));
    assert_eq!(store.queues().unwrap().len(), 100);
    store.queue_ack(last, vec![seq]).await.unwrap();
    assert_eq!(store.stats().live_messages, 0, "retired with the last ack");
    assert!(store.queue_entries(last, 0, 10).unwrap().is_empty());
}

/// Appends `record` to the log and to `queues`, waiting for its commit.
async fn append_to(store: &Store, record: Record, queues: Vec<u64>) -> Seq {
    let placement = Placement {
        log: true,
        queues,
        retain: None,
        dedup: None,
    };
    store
        .submit_with(record, placement)
        .await
        .unwrap()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_held_record_is_not_retired_before_the_upstream_is_done_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(u64::MAX, &["up"])).unwrap();
    let q = store.create_queue("s").await.unwrap();
    let seq = append_to(&store, record(1, 10), vec![q]).await;
    store.queue_ack(q, vec![seq]).await.unwrap();
    assert_eq!(all(&store).len(), 1, "the upstream has not forwarded it");
    store.advance_cursor("up", seq + 1).await.unwrap();
    assert!(all(&store).is_empty());
    // Deleting a queue releases what it held.
    let seq = store
        .submit_with(
            record(2, 10),
            Placement {
                log: true,
                queues: vec![q],
                retain: None,
                dedup: None,
            },
        )
        .await
        .unwrap()
        .await
        .unwrap();
    store.advance_cursor("up", seq + 1).await.unwrap();
    assert_eq!(all(&store).len(), 1);
    store.delete_queue("s").await.unwrap();
    assert!(all(&store).is_empty());
    assert!(store.queues().unwrap().is_empty());
}

#[tokio::test]
async fn retained_messages_are_set_replaced_and_cleared_durably() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(u64::MAX, &[])).unwrap();
    let retain = |topic: &str, clear: bool| Placement {
        log: false,
        queues: Vec::new(),
        retain: Some(if clear {
            Retain::Clear(topic.into())
        } else {
            Retain::Set(topic.into())
        }),
        dedup: None,
    };
    for (n, topic) in [(1, "a/b"), (2, "a/c"), (3, "a/b")] {
        let seq = store
            .submit_with(record(n, 5), retain(topic, false))
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(seq, 0, "not logged");
    }
    assert_eq!(store.stats().live_messages, 0);
    drop(store);
    let store = Store::open(dir.path(), options(u64::MAX, &[])).unwrap();
    let mut kept = store.retained().unwrap();
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        kept,
        vec![("a/b".into(), record(3, 5)), ("a/c".into(), record(2, 5))],
        "only the newest per topic"
    );
    assert_eq!(store.stats().retained, 2);
    store
        .submit_with(record(4, 0), retain("a/c", true))
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(store.retained().unwrap().len(), 1);
    assert_eq!(store.stats().retained, 1);
}

#[tokio::test]
async fn sessions_are_stored_opaque_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(u64::MAX, &[])).unwrap();
    store.put_session("dev-1", b"one".to_vec()).await.unwrap();
    store.put_session("dev-2", b"two".to_vec()).await.unwrap();
    store.put_session("dev-1", b"uno".to_vec()).await.unwrap();
    store.delete_session("dev-2").await.unwrap();
    drop(store);
    let store = Store::open(dir.path(), options(u64::MAX, &[])).unwrap();
    assert_eq!(
        store.sessions().unwrap(),
        vec![("dev-1".into(), b"uno".to_vec())]
    );
}

#[tokio::test]
async fn definitions_survive_reopen_and_are_listed_by_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(u64::MAX, &[])).unwrap();
    store
        .put_definition("amqp/x/a", b"1".to_vec())
        .await
        .unwrap();
    store
        .put_definition("amqp/x/b", b"2".to_vec())
        .await
        .unwrap();
    store
        .put_definition("amqp/q/a", b"3".to_vec())
        .await
        .unwrap();
    store
        .put_definition("amqp/x/a", b"one".to_vec())
        .await
        .unwrap();
    store.delete_definition("amqp/x/b").await.unwrap();
    drop(store);
    let store = Store::open(dir.path(), options(u64::MAX, &[])).unwrap();
    assert_eq!(
        store.definitions("amqp/x/").unwrap(),
        vec![("amqp/x/a".into(), b"one".to_vec())]
    );
    assert_eq!(store.definitions("amqp/").unwrap().len(), 2);
    assert!(
        store.sessions().unwrap().is_empty(),
        "kept apart from sessions"
    );
}

#[tokio::test]
async fn dedup_keys_commit_with_their_append_and_are_released() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(u64::MAX, &[])).unwrap();
    let keyed = |key: &str| Placement {
        dedup: Some(key.to_string()),
        ..Placement::log()
    };
    let a = store
        .submit_with(record(1, 5), keyed("s/dev/7"))
        .await
        .unwrap()
        .await
        .unwrap();
    store
        .submit_with(record(2, 5), keyed("s/dev/9"))
        .await
        .unwrap()
        .await
        .unwrap();
    store
        .submit_with(record(3, 5), keyed("s/other/1"))
        .await
        .unwrap()
        .await
        .unwrap();
    drop(store);
    let store = Store::open(dir.path(), options(u64::MAX, &[])).unwrap();
    let keys = store.dedup_keys("s/dev/").unwrap();
    assert_eq!(
        keys,
        vec![("s/dev/7".to_string(), a), ("s/dev/9".to_string(), a + 1)]
    );
    store.release_dedup("s/dev/7", false).await.unwrap();
    assert_eq!(store.dedup_keys("s/dev/").unwrap().len(), 1);
    store.release_dedup("s/dev/", true).await.unwrap();
    assert!(store.dedup_keys("s/dev/").unwrap().is_empty());
    assert_eq!(store.dedup_keys("s/").unwrap().len(), 1, "other keys kept");
}

/// Found by the model test: a queue deleted while an append naming it was
/// queued got an entry no one could ack, holding the record for ever.
#[tokio::test]
async fn an_append_naming_a_deleted_queue_holds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(u64::MAX, &["up"])).unwrap();
    let q = store.create_queue("s").await.unwrap();
    store.delete_queue("s").await.unwrap();
    let seq = append_to(&store, record(1, 10), vec![q]).await;
    assert!(store.queue_entries(q, 0, 10).unwrap().is_empty());
    store.advance_cursor("up", seq + 1).await.unwrap();
    assert!(all(&store).is_empty(), "retired: no queue holds it");
}

/// Found by the model test: a queue named twice counted two references
/// for its one entry, so its ack left the record held for ever.
#[tokio::test]
async fn a_queue_named_twice_holds_the_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(u64::MAX, &["up"])).unwrap();
    let q = store.create_queue("s").await.unwrap();
    let seq = append_to(&store, record(1, 10), vec![q, q]).await;
    assert_eq!(store.queue_entries(q, 0, 10).unwrap().len(), 1);
    store.advance_cursor("up", seq + 1).await.unwrap();
    store.queue_ack(q, vec![seq]).await.unwrap();
    assert!(all(&store).is_empty(), "retired with its one ack");
}

/// Found by the model test: an append that also set a retained message was
/// held to the quota for its log copy only.
#[tokio::test]
async fn the_retained_copy_of_an_append_counts_toward_the_quota() {
    let size = record(0, 100).encoded_len() as u64;
    let topic = "a/b";
    let set = |log| Placement {
        log,
        queues: Vec::new(),
        retain: Some(Retain::Set(topic.into())),
        dedup: None,
    };
    // One byte short of the log copy and the retained copy together.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        options(2 * size + topic.len() as u64 - 1, &["up"]),
    )
    .unwrap();
    let both = store.submit_with(record(1, 100), set(true)).await.unwrap();
    assert!(matches!(both.await, Err(AppendError::Full { .. })));
    let retained_only = store.submit_with(record(2, 100), set(false)).await.unwrap();
    assert_eq!(
        retained_only.await.unwrap(),
        0,
        "the retained copy alone fits"
    );
    // Replacing it adds nothing.
    let replacing = store.submit_with(record(3, 100), set(false)).await.unwrap();
    assert_eq!(replacing.await.unwrap(), 0);
    let stats = store.stats();
    assert_eq!(
        (stats.live_bytes, stats.retained_bytes),
        (0, size + topic.len() as u64)
    );
}

/// Found by the model test: the `committed` watch moved only after the
/// replies went out, so a caller holding an acknowledged seq could find it
/// behind.
#[tokio::test]
async fn the_committed_watch_has_reached_every_acknowledged_seq() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(u64::MAX, &[])).unwrap();
    let committed = store.committed();
    for n in 1..=200 {
        let seq = store.append(record(n, 8)).await.unwrap();
        assert_eq!(*committed.borrow(), seq);
    }
}

#[tokio::test]
async fn without_cursors_a_gateway_store_keeps_only_what_queues_reference() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = || StoreOptions {
        retire_without_cursors: true,
        ..options(8 << 10, &[])
    };
    let store = Store::open(dir.path(), opts()).unwrap();
    let q = store.create_queue("amqp:local").await.unwrap();
    // Far more than the quota goes through: nothing forwards it, so
    // nothing unreferenced stays.
    for n in 0..64 {
        append_to(&store, record(n, 1000), Vec::new()).await;
    }
    assert_eq!(store.stats().live_messages, 0, "{:?}", store.stats());
    let seq = append_to(&store, record(99, 1000), vec![q]).await;
    append_to(&store, record(100, 1000), Vec::new()).await;
    assert_eq!(store.stats().live_messages, 1, "the queued one is kept");
    drop(store);
    let store = Store::open(dir.path(), opts()).unwrap();
    let entries = store.queue_entries(q, 0, 10).unwrap();
    assert_eq!(entries[0].record.as_ref(), Some(&record(99, 1000)));
    store.queue_ack(q, vec![seq]).await.unwrap();
    assert_eq!(store.stats().live_messages, 0, "retired with its ack");
    // Off (the default), a store without cursors keeps its log.
    drop(store);
    let store = Store::open(dir.path(), options(u64::MAX, &[])).unwrap();
    append_to(&store, record(101, 10), Vec::new()).await;
    assert_eq!(store.stats().live_messages, 1);
}

/// Fill to ~2 MB, move the cursor to the end, wait for retirement to
/// delete everything, 20 times: redb reuses the freed pages, so the file
/// stays near the peak of live data instead of growing by it every cycle.
/// Reopening a file that is then mostly free compacts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_churn_keeps_the_file_bounded_and_a_mostly_free_file_is_compacted_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(DB_FILE);
    let len = || std::fs::metadata(&file).unwrap().len();
    const CYCLES: u64 = 20;
    const PER_CYCLE: u64 = 2000;
    const PAYLOAD: usize = 1000;
    let store = Store::open(dir.path(), options(u64::MAX, &["up"])).unwrap();
    let mut peak_live = 0u64;
    let mut largest = 0u64;
    let mut n = 0u64;
    for _ in 0..CYCLES {
        let mut commits = Vec::new();
        for _ in 0..PER_CYCLE {
            n += 1;
            commits.push(store.submit(record(n, PAYLOAD)).await.unwrap());
            if commits.len() == 500 {
                for c in commits.drain(..) {
                    c.await.unwrap();
                }
            }
        }
        for c in commits {
            c.await.unwrap();
        }
        peak_live = peak_live.max(store.stats().live_bytes);
        largest = largest.max(len());
        let end = store.stats().next_seq;
        store.advance_cursor("up", end).await.unwrap();
        // Retirement continues while the writer is idle; a bounded wait.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while store.stats().live_messages > 0 {
            assert!(std::time::Instant::now() < deadline, "retirement stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        largest = largest.max(len());
    }
    // Pages freed while an epoch runs are reused once its checkpoint has
    // committed: the file's slack is bounded by what one journal's worth of
    // batches frees.
    let bound = 2 * peak_live + crate::JOURNAL_BYTES + (4 << 20);
    assert!(
        largest <= bound,
        "file grew to {largest} bytes over {CYCLES} cycles of {peak_live} live bytes (bound {bound})"
    );
    println!("churn: peak live {peak_live} B, largest file {largest} B");

    // A backlog drained: the file is mostly free pages. Reopening compacts.
    for _ in 0..(6 * PER_CYCLE) {
        n += 1;
        store.submit(record(n, PAYLOAD)).await.unwrap();
    }
    let last = store.append(record(n + 1, PAYLOAD)).await.unwrap();
    let full = len();
    store.advance_cursor("up", last).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while store.stats().live_messages > 1 {
        assert!(std::time::Instant::now() < deadline, "retirement stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    store.close().await.unwrap();
    let before = len();
    let store = Store::open(dir.path(), options(u64::MAX, &["up"])).unwrap();
    let after = len();
    println!("compaction: file {full} B full, {before} B drained, {after} B after reopening");
    assert!(
        after < full / 4 && after <= before,
        "reopening a drained {before}-byte file left {after} bytes"
    );
    assert_eq!(all(&store).len(), 1, "the live record is kept");
}

/// A clock the test moves, in milliseconds since the Unix epoch.
fn manual_clock(start: u64) -> (Arc<AtomicU64>, Clock) {
    let now = Arc::new(AtomicU64::new(start));
    let read = Arc::clone(&now);
    (now, Arc::new(move || read.load(Ordering::SeqCst)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_age_drops_old_records_forwarded_or_not_and_keeps_what_a_queue_holds() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = 1_000_000_000;
    let (now, clock) = manual_clock(t0);
    let opts = StoreOptions {
        max_age: Some(Duration::from_secs(10)),
        ..options(u64::MAX, &["a", "b"])
    };
    let store = Store::open_with_clock(dir.path(), opts.clone(), Arc::clone(&clock)).unwrap();
    let q = store.create_queue("q").await.unwrap();
    store.append(record(1, 10)).await.unwrap();
    assert_eq!(append_to(&store, record(2, 10), vec![q]).await, 2);
    store.append(record(3, 10)).await.unwrap();
    // Upstream "a" forwarded 1 and 2, "b" nothing.
    store.advance_cursor("a", 3).await.unwrap();
    now.store(t0 + 5_000, Ordering::SeqCst);
    store.append(record(4, 10)).await.unwrap();
    store.append(record(5, 10)).await.unwrap();
    // 1..=3 are under 10 s old plus the 1 s step: kept.
    now.store(t0 + 10_999, Ordering::SeqCst);
    store.append(record(6, 10)).await.unwrap();
    let seqs = |s: &Store| all(s).into_iter().map(|(seq, _)| seq).collect::<Vec<_>>();
    assert_eq!(seqs(&store), vec![1, 2, 3, 4, 5, 6]);
    // Now they are old enough: the next batch drops 1 and 3, forwarded or
    // not; 2 stays for the queue, and both cursors move over them.
    now.store(t0 + 11_000, Ordering::SeqCst);
    store.append(record(7, 10)).await.unwrap();
    assert_eq!(seqs(&store), vec![2, 4, 5, 6, 7]);
    assert_eq!(store.cursor("a").unwrap(), 4);
    assert_eq!(store.cursor("b").unwrap(), 4);
    let queued = store.queue_entries(q, 0, 10).unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].record.as_ref().map(number), Some(2));
    assert_eq!(store.stats().live_messages, 5);
    store.close().await.unwrap();

    // The append times survive a reopen, and the idle writer sweeps on its
    // own: 4 and 5 go at t0 + 5 s + 1 s step + 10 s, with no append.
    let store = Store::open_with_clock(dir.path(), opts, clock).unwrap();
    now.store(t0 + 16_000, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while seqs(&store) != vec![2, 6, 7] {
        assert!(
            std::time::Instant::now() < deadline,
            "not swept while idle: {:?}",
            seqs(&store)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.cursor("b").unwrap(), 6);
    assert!(
        store.append(record(8, 10)).await.unwrap() > 7,
        "no seq reused"
    );
}
