//! Lazy cursor moves (`writer/defer.rs`): they ride in the next commit that
//! has other work, commit alone within `CURSOR_DELAY`, at once while the
//! store is full, and with the close.

use std::time::Duration;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_move_rides_in_the_next_append_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(1 << 20, &["up"])).unwrap();
    let first = store.append(record(1, 100)).await.unwrap();
    let before = store.commits();
    let moving = {
        let store = store.clone();
        tokio::spawn(async move { store.advance_cursor_lazily("up", first + 1).await })
    };
    // Held, not committed: no commit, the cursor still at the record.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!moving.is_finished(), "a lazy move alone waits for a batch");
    assert_eq!(store.commits(), before);
    assert_eq!(store.cursor("up").unwrap(), first);

    let second = store.append(record(2, 100)).await.unwrap();
    moving.await.unwrap().unwrap();
    assert_eq!(store.commits(), before + 1, "one commit for both");
    assert_eq!(store.cursor("up").unwrap(), first + 1);
    // And the move retired the first record in that commit.
    let seqs: Vec<Seq> = all(&store).into_iter().map(|(s, _)| s).collect();
    assert_eq!(seqs, vec![second]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_move_alone_commits_within_the_delay() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(1 << 20, &["up"])).unwrap();
    let first = store.append(record(1, 100)).await.unwrap();
    // A move held (its alarm armed), then taken along by an append...
    let moving = {
        let store = store.clone();
        tokio::spawn(async move { store.advance_cursor_lazily("up", first + 1).await })
    };
    // Time for the writer to hold it (had it not, this would check less,
    // never fail wrongly).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = store.append(record(2, 100)).await.unwrap();
    moving.await.unwrap().unwrap();
    // ...then one alone: its own deadline wakes the writer, not the first's.
    tokio::time::timeout(
        CURSOR_DELAY * 3,
        store.advance_cursor_lazily("up", second + 1),
    )
    .await
    .expect("committed within the delay, with nothing else to ride in")
    .unwrap();
    assert_eq!(store.cursor("up").unwrap(), second + 1);
    assert_eq!(store.stats().live_messages, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_move_commits_at_once_while_the_store_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let size = record(0, 100).encoded_len() as u64;
    let store = Store::open(dir.path(), options(2 * size, &["up"])).unwrap();
    let mut full = store.full();
    let first = store.append(record(1, 100)).await.unwrap();
    store.append(record(2, 100)).await.unwrap();
    assert!(matches!(
        store.append(record(3, 100)).await,
        Err(AppendError::Full { .. })
    ));
    tokio::time::timeout(Duration::from_secs(5), full.wait_for(Option::is_some))
        .await
        .expect("reported as full")
        .unwrap();
    // Well under CURSOR_DELAY: the move is what makes room, so it is not held.
    tokio::time::timeout(
        CURSOR_DELAY / 4,
        store.advance_cursor_lazily("up", first + 1),
    )
    .await
    .expect("not held while full")
    .unwrap();
    assert!(full.borrow().is_none(), "room again");
    assert_eq!(store.append(record(3, 100)).await.unwrap(), first + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_move_is_committed_by_the_close_and_survives_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(1 << 20, &["up"])).unwrap();
    let first = store.append(record(1, 100)).await.unwrap();
    let mover = store.clone();
    // join! polls the move first: it is in the inbox before the close.
    let (moved, closed) = tokio::join!(mover.advance_cursor_lazily("up", first + 1), store.close());
    moved.unwrap();
    closed.unwrap();
    drop(mover);
    let store = Store::open(dir.path(), options(1 << 20, &["up"])).unwrap();
    assert_eq!(store.cursor("up").unwrap(), first + 1);
    assert_eq!(store.stats().live_messages, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_counts_the_room_a_held_move_makes() {
    let dir = tempfile::tempdir().unwrap();
    let size = record(0, 100).encoded_len() as u64;
    let store = Store::open(dir.path(), options(2 * size, &["up"])).unwrap();
    let first = store.append(record(1, 100)).await.unwrap();
    let second = store.append(record(2, 100)).await.unwrap();
    // At the quota, nothing refused yet. join! polls the move first, so it
    // is in the inbox ahead of the append: held (then the append's batch
    // takes it) or in the same batch, ahead of it.
    let (moved, third) = tokio::join!(store.advance_cursor_lazily("up", first + 1), async {
        // Time for the writer to hold the move on its own.
        tokio::time::sleep(Duration::from_millis(100)).await;
        store.append(record(3, 100)).await
    });
    // It commits with this append, and the record it retires makes the room.
    let third = third.expect("the room of the move ahead counts for the append in its batch");
    moved.unwrap();
    let seqs: Vec<Seq> = all(&store).into_iter().map(|(s, _)| s).collect();
    assert_eq!(seqs, vec![second, third]);
}
