//! What the operator's tools need from the store: dead letters replayed or
//! purged by seq, and a stopped gateway's store read without a change.

use super::*;

async fn park_each(store: &Store, count: u64) {
    for n in 1..=count {
        let seq = store.append(record(n, 20)).await.unwrap();
        store
            .park(seq, record(n, 20), parked("up", seq, "no exchange"))
            .await
            .unwrap();
    }
}

fn parked_seqs(store: &Store) -> Vec<Seq> {
    store
        .dead_letters(0, 100)
        .unwrap()
        .iter()
        .map(|d| d.seq)
        .collect()
}

#[tokio::test]
async fn chosen_dead_letters_are_replayed_or_purged_and_the_others_stay() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(1 << 20, &["up"])).unwrap();
    park_each(&store, 4).await;
    store.advance_cursor("up", 5).await.unwrap();
    let parked_bytes = store.stats().dead_letter_bytes;

    // 99 is not parked: skipped, not counted.
    assert_eq!(
        store.replay_dead_letters_at(vec![3, 99, 1]).await.unwrap(),
        2
    );
    assert_eq!(parked_seqs(&store), vec![2, 4]);
    let replayed: Vec<(u64, Option<Seq>)> = store
        .read(5, 10, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| (number(&e.record), e.replay.as_ref().map(|r| r.original_seq)))
        .collect();
    assert_eq!(
        replayed,
        vec![(3, Some(3)), (1, Some(1))],
        "in the order given"
    );

    assert_eq!(store.purge_dead_letters_at(vec![4]).await.unwrap(), 1);
    assert_eq!(parked_seqs(&store), vec![2]);
    assert_eq!(store.purge_dead_letters_at(Vec::new()).await.unwrap(), 0);
    let stats = store.stats();
    // Every dead letter here has the same size.
    assert_eq!(
        (stats.dead_letters, stats.dead_letter_bytes),
        (1, parked_bytes / 4)
    );
}

#[tokio::test]
async fn a_read_only_open_sees_the_closed_store_and_changes_no_byte() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(1 << 20, &["up", "other"])).unwrap();
    park_each(&store, 3).await;
    store.advance_cursor("up", 2).await.unwrap();
    store.set_gateway_id("gw-1").await.unwrap();
    let entries = store.read(0, 100, usize::MAX).unwrap();
    let dead = store.dead_letters(0, 100).unwrap();
    store.close().await.unwrap();
    let file = dir.path().join(DB_FILE);
    {
        let running = Store::open(dir.path(), options(1 << 20, &["up", "other"])).unwrap();
        match ReadOnlyStore::open(dir.path()) {
            Err(OpenError::Database {
                source: redb::DatabaseError::DatabaseAlreadyOpen,
                ..
            }) => {}
            other => panic!("opened beside a writer: {other:?}"),
        }
        running.close().await.unwrap();
    }
    let before = std::fs::read(&file).unwrap();

    let view = ReadOnlyStore::open(dir.path()).unwrap();
    assert_eq!(view.read(0, 100, usize::MAX).unwrap(), entries);
    assert_eq!(view.read(3, 100, usize::MAX).unwrap(), entries[2..]);
    assert_eq!(view.dead_letters(0, 100).unwrap(), dead);
    assert_eq!(view.cursor("up").unwrap(), 2);
    assert_eq!(view.cursor("never-stored").unwrap(), 1, "the first record");
    let mut cursors = view.cursors().unwrap();
    cursors.sort();
    assert_eq!(cursors, vec![("other".into(), 1), ("up".into(), 2)]);
    assert_eq!(view.gateway_id().unwrap().as_deref(), Some("gw-1"));
    drop(view);

    assert!(std::fs::read(&file).unwrap() == before, "the file changed");
    // And the store opens normally afterwards.
    let store = Store::open(dir.path(), options(1 << 20, &["up", "other"])).unwrap();
    assert_eq!(store.read(0, 100, usize::MAX).unwrap(), entries);
}

#[test]
fn a_read_only_open_of_a_missing_store_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing-here");
    assert!(ReadOnlyStore::open(&missing).is_err());
    assert!(!missing.exists());
}
