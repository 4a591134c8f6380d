//! Salvage of a damaged store (`salvage.rs`, issue 9): pages of a closed
//! store's file are mangled (bit rot, a disk that lost writes), the open
//! fails on them, and salvage must keep every entry that is not on a
//! damaged page, with its seq, and never hand out one of the old seqs
//! again.

use std::collections::BTreeSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use super::disk::{Disk, Kept};
use super::{number, options, parked, record};
use crate::salvage;
use crate::{DB_FILE, JOURNAL_FILE, Placement, SALVAGE_FILE, Seq, Store, StoreOptions};

/// redb's page size: the unit of damage.
const PAGE: usize = 4096;
const RECORDS: u64 = 2_000;
const PAYLOAD: usize = 200;

/// A store in `dir` with `RECORDS` records at seqs 1..=RECORDS, the
/// cursor "up" at 301, a session, a definition, a dead letter, the
/// gateway id, a queue holding seqs 10..20 and a dedup key; closed.
async fn fill(dir: &Path, opts: StoreOptions) {
    let store = Store::open(dir, opts).unwrap();
    store.set_gateway_id("gw-salvage").await.unwrap();
    let queue = store.create_queue("q").await.unwrap();
    let mut commits = Vec::new();
    for n in 1..=RECORDS {
        let placement = Placement {
            log: true,
            queues: if (10..20).contains(&n) {
                vec![queue]
            } else {
                vec![]
            },
            dedup: (n == 7).then(|| "client/7".to_string()),
            ..Placement::default()
        };
        commits.push(
            store
                .submit_with(record(n, PAYLOAD), placement)
                .await
                .unwrap(),
        );
    }
    for (n, commit) in (1..).zip(commits) {
        assert_eq!(commit.await.unwrap(), n, "seqs follow the numbers");
    }
    store.advance_cursor("up", 301).await.unwrap();
    store
        .put_session("client", b"session".to_vec())
        .await
        .unwrap();
    store
        .put_definition("exchange/x", b"direct".to_vec())
        .await
        .unwrap();
    store
        .park(5, record(5, PAYLOAD), parked("up", 5, "rejected"))
        .await
        .unwrap();
    store.close().await.unwrap();
}

/// The pages of `bytes` that contain `needle`.
fn pages_holding(bytes: &[u8], needle: &[u8]) -> Vec<usize> {
    let mut pages: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(at, _)| at / PAGE)
        .collect();
    pages.dedup();
    pages
}

/// Damages the pages of the database file in `dir` holding records
/// `numbers` (every copy: redb leaves old versions of pages in free
/// space) by flipping all their bytes; returns the record numbers any
/// damaged page held.
fn damage_pages_of(dir: &Path, numbers: &[u64]) -> BTreeSet<u64> {
    let path = dir.join(DB_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let mut pages = Vec::new();
    for &n in numbers {
        pages.extend(pages_holding(&bytes, record(n, PAYLOAD).bytes()));
    }
    let held: BTreeSet<u64> = (1..=RECORDS)
        .filter(|&n| {
            let r = record(n, PAYLOAD);
            pages.iter().any(|&p| {
                let page = &bytes[p * PAGE..((p + 1) * PAGE).min(bytes.len())];
                page.windows(r.bytes().len()).any(|w| w == &r.bytes()[..])
            })
        })
        .collect();
    for &p in &pages {
        let end = ((p + 1) * PAGE).min(bytes.len());
        for b in &mut bytes[p * PAGE..end] {
            *b ^= 0xFF;
        }
    }
    std::fs::write(&path, bytes).unwrap();
    held
}

/// Opening the store fails (an error that says damage, or a panic inside
/// the storage engine).
fn assert_open_fails_on_damage(dir: &Path) {
    let opened = salvage::quietly(|| {
        catch_unwind(AssertUnwindSafe(|| {
            Store::open(dir, options(u64::MAX, &["up"]))
        }))
    });
    match opened {
        Ok(Ok(_)) => panic!("the damaged store opened"),
        Ok(Err(e)) => assert!(e.is_corruption(), "not reported as damage: {e}"),
        Err(_) => {}
    }
}

#[tokio::test]
async fn salvage_keeps_every_record_off_the_damaged_pages_with_its_seq() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    fill(dir, options(u64::MAX, &["up"])).await;
    // The first record's page (the open reads it) and one in the middle.
    let on_damaged = damage_pages_of(dir, &[10, 1_000]);
    assert!(
        on_damaged.len() < 200,
        "a few pages hold a few dozen records"
    );
    assert_open_fails_on_damage(dir);

    let report = Store::salvage(dir, 1).unwrap();
    let aside = report.moved_to.clone().unwrap();
    assert!(aside.exists(), "the damaged file is kept");
    assert!(!dir.join(SALVAGE_FILE).exists());
    let mut aside_journal = aside.clone().into_os_string();
    aside_journal.push(".journal");
    assert!(Path::new(&aside_journal).exists() && !dir.join(JOURNAL_FILE).exists());
    let store = Store::open(dir, options(u64::MAX, &["up"])).unwrap();
    let entries = store.read(0, usize::MAX, usize::MAX).unwrap();
    let mut found = BTreeSet::new();
    for e in &entries {
        assert_eq!(number(&e.record), e.seq, "record {} moved", e.seq);
        assert_eq!(e.record, record(e.seq, PAYLOAD), "record {} changed", e.seq);
        found.insert(e.seq);
    }
    // The cursor at 301 retired the records below it but the queue's.
    for n in (10..20).chain(301..=RECORDS) {
        assert!(
            found.contains(&n) || on_damaged.contains(&n),
            "record {n} was on no damaged page and is gone"
        );
    }
    assert!(
        !found.contains(&10) && !found.contains(&1_000),
        "the damaged pages were read"
    );
    let lost = (RECORDS - 300 + 10) - entries.len() as u64;
    let log = report.table("log").unwrap();
    assert_eq!(log.salvaged, entries.len() as u64);
    assert_eq!(
        log.lost, lost,
        "lost = the store's own figures minus the salvaged"
    );
    assert!(log.damaged >= 1, "{report:?}");

    assert_eq!(store.cursor("up").unwrap(), 301, "the cursor is kept");
    assert_eq!(store.gateway_id().unwrap().as_deref(), Some("gw-salvage"));
    assert_eq!(
        store.sessions().unwrap(),
        vec![("client".to_string(), b"session".to_vec())]
    );
    assert_eq!(
        store.definitions("").unwrap(),
        vec![("exchange/x".to_string(), b"direct".to_vec())]
    );
    let dead = store.dead_letters(0, 10).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].seq, &dead[0].reason), (5, &"rejected".to_string()));
    assert_eq!(
        store.dedup_keys("client/").unwrap(),
        vec![("client/7".to_string(), 7)]
    );
    let queues = store.queues().unwrap();
    assert_eq!(queues.len(), 1);
    let queued: Vec<Seq> = store
        .queue_entries(queues[0].1, 0, 100)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        queued,
        (10..20).collect::<Vec<_>>(),
        "the queue's entries are kept"
    );
    let with_record = store.queue_entries(queues[0].1, 0, 100).unwrap();
    for e in &with_record {
        assert_eq!(
            e.record.is_some(),
            found.contains(&e.seq),
            "entry {} and the log disagree",
            e.seq
        );
    }

    let stats = store.stats();
    assert_eq!(
        stats.live_messages,
        entries.len() as u64,
        "figures counted again"
    );
    let next = store.append(record(RECORDS + 1, PAYLOAD)).await.unwrap();
    assert!(next > RECORDS, "seq {next} was the damaged store's");
    assert_eq!(next, report.next_seq);
}

/// A store that crashed with acknowledged batches only in its journal,
/// one of whose frames is then torn: salvage applies the frames before the
/// torn one (the rule of the open), reads the database file without
/// changing it (it needs a repair: the repair stays in memory), and starts
/// the salvaged store's seqs at the seed, above the seqs lost with the
/// torn frame.
#[tokio::test]
async fn salvage_replays_the_journal_frames_that_replay_and_leaves_the_file_as_it_was() {
    let db = Disk::default();
    let journal = db.sibling();
    let opts = || options(u64::MAX, &[]);
    let store = Store::open_with_journal(
        db.backend(),
        journal.backend(),
        crate::JOURNAL_BYTES,
        Path::new("mem"),
        opts(),
    )
    .unwrap();
    for n in 1..=100u64 {
        assert_eq!(store.append(record(n, PAYLOAD)).await.unwrap(), n);
    }
    // The power goes before any checkpoint: the database file holds the
    // open's checkpoint, the journal the hundred batches.
    db.cut_power_after(0);
    drop(store);
    db.restart(Kept::Synced);

    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    std::fs::write(dir.join(DB_FILE), db.contents()).unwrap();
    let mut frames = journal.contents();
    let torn = pages_holding(&frames, record(60, PAYLOAD).bytes());
    assert!(!torn.is_empty(), "record 60 is in the journal");
    let at = frames
        .windows(PAYLOAD)
        .position(|w| w == &record(60, PAYLOAD).bytes()[..PAYLOAD])
        .unwrap();
    frames[at + 20] ^= 0x01;
    std::fs::write(dir.join(JOURNAL_FILE), frames).unwrap();
    let before = std::fs::read(dir.join(DB_FILE)).unwrap();

    let seed = 1_000_000;
    let report = Store::salvage(dir, seed).unwrap();
    assert_eq!(report.journal_frames, 59, "{report:?}");
    let aside = report.moved_to.clone().unwrap();
    assert_eq!(
        std::fs::read(&aside).unwrap(),
        before,
        "the damaged file was changed"
    );

    let store = Store::open(dir, opts()).unwrap();
    let found: Vec<(Seq, u64)> = store
        .read(0, usize::MAX, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| (e.seq, number(&e.record)))
        .collect();
    assert_eq!(found, (1..60).map(|n| (n, n)).collect::<Vec<_>>());
    let next = store.append(record(101, PAYLOAD)).await.unwrap();
    assert_eq!(next, seed, "seqs 60..=100 were acknowledged: never again");
}

/// A name-keyed table cannot be bisected: it is read from both ends, so a
/// damaged page in its middle loses the sessions on that page only.
#[tokio::test]
async fn a_damaged_page_in_the_middle_of_the_sessions_loses_only_its_sessions() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let store = Store::open(dir, options(u64::MAX, &[])).unwrap();
    let value = |i: u32| format!("session-{i:04}-{}", "x".repeat(150)).into_bytes();
    for i in 0..300u32 {
        store
            .put_session(&format!("client-{i:04}"), value(i))
            .await
            .unwrap();
    }
    store.close().await.unwrap();

    let path = dir.join(DB_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let pages = pages_holding(&bytes, &value(150));
    let on_damaged: BTreeSet<u32> = (0..300)
        .filter(|&i| {
            pages.iter().any(|&p| {
                bytes[p * PAGE..((p + 1) * PAGE).min(bytes.len())]
                    .windows(value(i).len())
                    .any(|w| w == &value(i)[..])
            })
        })
        .collect();
    let len = bytes.len();
    for &p in &pages {
        for b in &mut bytes[p * PAGE..((p + 1) * PAGE).min(len)] {
            *b ^= 0xFF;
        }
    }
    std::fs::write(&path, bytes).unwrap();

    let report = Store::salvage(dir, 1).unwrap();
    let store = Store::open(dir, options(u64::MAX, &[])).unwrap();
    let sessions = store.sessions().unwrap();
    let found: BTreeSet<u32> = sessions
        .iter()
        .map(|(id, v)| {
            let i: u32 = id.trim_start_matches("client-").parse().unwrap();
            assert_eq!(v, &value(i), "session {id} changed");
            i
        })
        .collect();
    assert!(!found.contains(&150), "the damaged page was read");
    for i in 0..300 {
        assert!(
            found.contains(&i) || on_damaged.contains(&i),
            "session {i} was on no damaged page and is gone"
        );
    }
    let t = report.table("sessions").unwrap();
    assert_eq!((t.salvaged, t.damaged, t.lost), (found.len() as u64, 1, 1));
}

/// A start killed between moving the damaged file aside and renaming the
/// salvaged one into place: the next open takes the salvaged file.
#[tokio::test]
async fn an_open_takes_a_finished_salvage_left_without_its_rename() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let store = Store::open(dir, options(u64::MAX, &[])).unwrap();
    assert_eq!(store.append(record(1, PAYLOAD)).await.unwrap(), 1);
    store.close().await.unwrap();
    std::fs::rename(dir.join(DB_FILE), dir.join(SALVAGE_FILE)).unwrap();

    let store = Store::open(dir, options(u64::MAX, &[])).unwrap();
    let entries = store.read(0, 10, usize::MAX).unwrap();
    assert_eq!(entries.len(), 1, "the salvaged file is the store");
    assert!(!dir.join(SALVAGE_FILE).exists());
}

/// Nothing readable (not a redb file at all): an error, the damaged file
/// where it was, and no half-made salvage left behind.
#[test]
fn an_unreadable_file_is_an_error_and_stays_in_place() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    std::fs::write(dir.join(DB_FILE), vec![0xAB_u8; 64 * 1024]).unwrap();
    let err = Store::salvage(dir, 1).expect_err("garbage has nothing to salvage");
    assert!(
        matches!(err, crate::SalvageError::Unreadable { .. }),
        "{err}"
    );
    assert!(dir.join(DB_FILE).exists());
    assert!(!dir.join(SALVAGE_FILE).exists());
}

/// Whichever single page of a store is damaged, salvage either says the
/// file is unreadable or gives back only records exactly as appended, at
/// their seqs, and starts new seqs at the seed (the last records may be on
/// the damaged page: only the seed is known to be above them). Nothing the
/// storage engine does on a mangled page (errors, panics, garbage)
/// escapes the salvage.
#[tokio::test]
async fn salvage_survives_the_damage_of_any_one_page() {
    let pristine = tempfile::tempdir().unwrap();
    let store = Store::open(pristine.path(), options(u64::MAX, &["up"])).unwrap();
    const N: u64 = 600;
    const SEED: u64 = 1_000_000;
    let mut commits = Vec::new();
    for n in 1..=N {
        commits.push(store.submit(record(n, PAYLOAD)).await.unwrap());
    }
    for c in commits {
        c.await.unwrap();
    }
    store.advance_cursor("up", 101).await.unwrap();
    store.close().await.unwrap();
    let bytes = std::fs::read(pristine.path().join(DB_FILE)).unwrap();
    let pages = bytes.len().div_ceil(PAGE);

    let mut unreadable = 0;
    let mut salvaged_some = 0;
    // Pages never written (zeros) hold nothing to lose.
    let used: Vec<usize> = (0..pages)
        .filter(|&p| {
            bytes[p * PAGE..((p + 1) * PAGE).min(bytes.len())]
                .iter()
                .any(|&b| b != 0)
        })
        .collect();
    for &page in &used {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        let mut damaged = bytes.clone();
        let len = damaged.len();
        for b in &mut damaged[page * PAGE..((page + 1) * PAGE).min(len)] {
            *b ^= 0xFF;
        }
        std::fs::write(dir.join(DB_FILE), damaged).unwrap();
        let report = match Store::salvage(dir, SEED) {
            Ok(report) => report,
            Err(crate::SalvageError::Unreadable { .. }) => {
                unreadable += 1;
                continue;
            }
            Err(e) => panic!("page {page}: {e}"),
        };
        let store = Store::open(dir, options(u64::MAX, &["up"])).unwrap();
        let entries = store.read(0, usize::MAX, usize::MAX).unwrap();
        for e in &entries {
            assert_eq!(
                e.record,
                record(e.seq, PAYLOAD),
                "page {page}: seq {}",
                e.seq
            );
        }
        assert!(
            entries.iter().all(|e| e.seq >= 101),
            "page {page}: a retired record came back"
        );
        if !entries.is_empty() {
            salvaged_some += 1;
        }
        assert_eq!(report.table("log").unwrap().salvaged, entries.len() as u64);
        let next = store.append(record(N + 1, PAYLOAD)).await.unwrap();
        assert_eq!(next, SEED, "page {page}: new seqs start at the seed");
    }
    // The header, the table directory and the log's root page hold
    // everything below them: those cost the whole file or the whole log.
    let pages = used.len();
    assert!(
        salvaged_some >= pages * 3 / 4,
        "{pages} pages: {unreadable} left nothing readable, only {salvaged_some} gave records back"
    );
}

/// Issue 9's case: the power goes (the file is not closed cleanly), and a
/// page of the database file is then found damaged. The open finds it
/// (checksums are verified after a crash), and salvage reads the file as
/// of its last checkpoint (checkpoints record redb's allocator state, so
/// it opens without the repair that would refuse the damaged page), then
/// replays the journal's frames: every record off the damaged page comes
/// back, those acknowledged only in the journal included.
#[tokio::test]
async fn a_crashed_store_with_a_damaged_page_is_salvaged_with_its_journal() {
    let db = Disk::default();
    let journal = db.sibling();
    let store = Store::open_with_journal(
        db.backend(),
        journal.backend(),
        1 << 20,
        Path::new("mem"),
        options(u64::MAX, &[]),
    )
    .unwrap();
    // Enough for checkpoints (a 1 MiB journal holds a few thousand of
    // these appends in batches of 100), the last ones acknowledged in the
    // journal only. (Salvage
    // reads a journal of the full size: the file's end reads as zeros.)
    const MANY: u64 = 10_000;
    let mut commits = Vec::new();
    for n in 1..=MANY {
        commits.push(store.submit(record(n, PAYLOAD)).await.unwrap());
        if commits.len() == 100 {
            for c in commits.drain(..) {
                c.await.unwrap();
            }
        }
    }
    for c in commits {
        c.await.unwrap();
    }
    // Three batches of one: at most one of them is a checkpoint, so the
    // journal holds frames of the epoch whatever the batches before did.
    for n in MANY + 1..=MANY + 3 {
        store.append(record(n, PAYLOAD)).await.unwrap();
    }
    const ALL: u64 = MANY + 3;
    db.cut_power_after(0);
    drop(store);
    db.restart(Kept::Synced);

    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let mut bytes = db.contents();
    let pages = pages_holding(&bytes, record(1_000, PAYLOAD).bytes());
    assert!(!pages.is_empty(), "record 1000 is in the database file");
    let on_damaged: BTreeSet<u64> = (1..=ALL)
        .filter(|&n| {
            let r = record(n, PAYLOAD);
            pages.iter().any(|&p| {
                bytes[p * PAGE..((p + 1) * PAGE).min(bytes.len())]
                    .windows(r.bytes().len())
                    .any(|w| w == &r.bytes()[..])
            })
        })
        .collect();
    let len = bytes.len();
    for &p in &pages {
        for b in &mut bytes[p * PAGE..((p + 1) * PAGE).min(len)] {
            *b ^= 0xFF;
        }
    }
    std::fs::write(dir.join(DB_FILE), &bytes).unwrap();
    std::fs::write(dir.join(JOURNAL_FILE), journal.contents()).unwrap();
    assert_open_fails_on_damage(dir);
    // The check that found the damage changed nothing in the file: what
    // salvage reads is what the crash left.
    assert!(
        std::fs::read(dir.join(DB_FILE)).unwrap() == bytes,
        "the failed open rewrote the damaged file"
    );

    let report = Store::salvage(dir, 1).unwrap();
    assert!(report.journal_frames > 0, "{report:?}");
    let store = Store::open(dir, options(u64::MAX, &[])).unwrap();
    let found: BTreeSet<u64> = store
        .read(0, usize::MAX, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e.record, record(e.seq, PAYLOAD), "seq {}", e.seq);
            e.seq
        })
        .collect();
    for n in 1..=ALL {
        assert!(
            found.contains(&n) || on_damaged.contains(&n),
            "record {n} was on no damaged page and is gone ({report:?})"
        );
    }
    assert!(!found.contains(&1_000), "the damaged page was read");
    let next = store.append(record(ALL + 1, PAYLOAD)).await.unwrap();
    assert!(next > ALL, "seq {next} reused");
}

#[tokio::test]
async fn a_crash_before_the_first_batch_of_a_run_still_gets_its_checksums_checked() {
    let root = tempfile::tempdir().unwrap();
    let (dir, crashed) = (root.path().join("live"), root.path().join("crashed"));
    fill(&dir, options(u64::MAX, &["up"])).await;
    // The next run has opened the store and written nothing yet: the
    // journal holds no frame of the current epoch. The files as they are
    // now are what a crash at this point leaves.
    let store = Store::open(&dir, options(u64::MAX, &["up"])).unwrap();
    std::fs::create_dir_all(&crashed).unwrap();
    for file in [DB_FILE, JOURNAL_FILE] {
        std::fs::copy(dir.join(file), crashed.join(file)).unwrap();
    }
    store.close().await.unwrap();
    // A page the disk did not really write is found at open, not later by
    // a reader.
    let held = damage_pages_of(&crashed, &[1_000]);
    assert!(held.contains(&1_000));
    assert_open_fails_on_damage(&crashed);
}
