//! A data directory written by the schema-1 build (store/tests/fixtures/v1,
//! see its README) opens with this build: backlog, cursors, gateway id and
//! dead letters kept, the dead-letter marks moved out of the message
//! headers, and every record still decodes as a message (format version 1).

#![allow(clippy::unwrap_used)]

use std::num::NonZeroUsize;
use std::path::Path;

use edge_core::Message;
use edge_store::{Store, StoreOptions, WhenFull};

fn options() -> StoreOptions {
    StoreOptions {
        retire_without_cursors: false,
        max_bytes: 1 << 30,
        batch_max_messages: NonZeroUsize::new(100).unwrap(),
        batch_max_bytes: NonZeroUsize::new(1 << 20).unwrap(),
        inbox_capacity: NonZeroUsize::new(100).unwrap(),
        cursors: vec!["central".into(), "backup".into()],
        when_full: WhenFull::Reject,
        min_free: 0,
        max_age: None,
    }
}

/// A copy of the fixture: opening migrates in place.
fn fixture_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../store/tests/fixtures/v1/edge.redb");
    std::fs::copy(src, dir.path().join(edge_store::DB_FILE)).unwrap();
    dir
}

#[tokio::test]
async fn a_v1_store_opens_with_its_backlog_cursors_and_dead_letters() {
    let dir = fixture_copy();
    let store = Store::open(dir.path(), options()).unwrap();
    assert_eq!(store.gateway_id().unwrap().as_deref(), Some("fixture-gw"));
    assert_eq!(store.cursor("central").unwrap(), 1010);
    assert_eq!(store.cursor("backup").unwrap(), 1005);
    let stats = store.stats();
    assert_eq!((stats.first_seq, stats.next_seq), (1005, 1020));
    assert_eq!(stats.live_messages, 15);

    let backlog = store.read(1005, 100, usize::MAX).unwrap();
    let seqs: Vec<u64> = backlog.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1005..1020).collect::<Vec<_>>());
    for e in &backlog {
        let n = e.seq - 1000;
        let m = Message::from_record(&e.record).unwrap();
        assert_eq!(&*m.topic, format!("fixture/dev-{}/temp", n % 3));
        assert_eq!(&m.payload[..], format!("v1 message {n:02}").as_bytes());
        assert_eq!(m.properties.headers.len(), 1, "content-type only");
        assert!(e.replay.is_none());
    }

    let dead = store.dead_letters(0, 10).unwrap();
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!((d.seq, d.original_seq), (1007, 1007));
    assert_eq!(d.upstreams, ["central"]);
    assert_eq!(d.reason, "unroutable: NO_ROUTE");
    let m = Message::from_record(&d.record).unwrap();
    assert!(
        m.properties
            .headers
            .iter()
            .all(|(k, _)| !k.starts_with("x-edge-")),
        "marks moved out of the message: {:?}",
        m.properties.headers
    );
    assert_eq!(stats.dead_letters, 1);

    // The figures were recorded; a replay is marked for its upstream.
    assert_eq!(store.replay_dead_letters(10).await.unwrap(), 1);
    let replayed = store.read(1020, 10, usize::MAX).unwrap();
    let replay = replayed[0].replay.as_ref().unwrap();
    assert_eq!(replay.original_seq, 1007);
    assert!(replay.is_for("central") && !replay.is_for("backup"));
    let live = store.stats().live_bytes;
    drop(store);

    // Reopening (schema 2 now) reads the same figures without a migration.
    let store = Store::open(dir.path(), options()).unwrap();
    assert_eq!(store.stats().live_bytes, live);
    assert_eq!(store.stats().live_messages, 16);
}
