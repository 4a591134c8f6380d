use std::num::NonZeroUsize;

use edge_core::Route;
use edge_store::StoreOptions;

use crate::health::LinkStatus;

use super::*;

fn record(topic: &str) -> Record {
    let mut m = Message::new(
        topic,
        Bytes::from_static(b"x"),
        edge_core::QoS::AtLeastOnce,
        "dev-1".into(),
    );
    m.timestamp_ms = 1_700_000_000_000;
    m.to_record().expect("encodes")
}

fn forwarder(store: &Store, filter: &str) -> Forwarder {
    let route = Route::new(edge_config::RouteConfig {
        name: "up".into(),
        filter: filter.into(),
        local: None,
        upstream: "central".into(),
        exchange: "amq.topic".into(),
        routing_key: "{topic}".into(),
        priority: 0,
        ttl: None,
        persistent: true,
        ack: edge_config::AckPoint::Persisted,
        declare_exchange: None,
    });
    let start = store.cursor("central").unwrap();
    Forwarder {
        name: "central".into(),
        gateway_id: "gw".into(),
        routes: Routes::new(vec![route]),
        store: store.clone(),
        max_in_flight: 16,
        confirm_timeout: Duration::from_secs(5),
        metrics: UpstreamMetrics::new("central"),
        status: LinkStatus::new("central"),
        replay_cap: None,
        return_check: Duration::from_secs(30),
        progress: None,
        flusher: CursorFlusher::spawn(store.clone(), "central".into(), start),
        position: Arc::new(AtomicU64::new(start)),
        lanes: vec![Lane {
            priority: 0,
            position: start,
            flusher: None,
            progress: None,
        }],
    }
}

#[tokio::test]
async fn while_down_the_cursor_passes_records_no_route_takes_up_to_the_first_it_does() {
    let dir = tempfile::tempdir().unwrap();
    let options = options();
    let store = Store::open(dir.path(), options).unwrap();
    let mut f = forwarder(&store, "up/#");
    let first = f.position();
    let mut commits = Vec::new();
    for i in 0..3000 {
        commits.push(store.submit(record(&format!("local/{i}"))).await.unwrap());
    }
    for commit in commits {
        commit.await.unwrap();
    }
    let wanted = store.append(record("up/1")).await.unwrap();
    store.append(record("local/after")).await.unwrap();

    f.skip_unmatched(1000).await;
    assert_eq!(f.position(), first + 1000, "bounded work per call");
    f.skip_unmatched(DOWN_SKIP_MAX_RECORDS).await;
    assert_eq!(f.position(), wanted, "stops at the first record to forward");
    f.skip_unmatched(DOWN_SKIP_MAX_RECORDS).await;
    assert_eq!(f.position(), wanted);

    let Forwarder { flusher, .. } = f;
    flusher.finish().await;
    assert_eq!(store.cursor("central").unwrap(), wanted, "persisted");
}

fn options() -> StoreOptions {
    StoreOptions {
        max_bytes: 1 << 30,
        batch_max_messages: NonZeroUsize::new(1000).unwrap(),
        batch_max_bytes: NonZeroUsize::new(8 << 20).unwrap(),
        inbox_capacity: NonZeroUsize::new(1024).unwrap(),
        cursors: vec!["central".into()],
        retire_without_cursors: false,
        when_full: Default::default(),
        min_free: 0,
        max_age: None,
    }
}

fn open(dir: &std::path::Path) -> Store {
    Store::open(dir, options()).unwrap()
}

fn parked(upstream: &str, original_seq: Seq) -> edge_store::Parked {
    edge_store::Parked {
        upstream: upstream.into(),
        original_seq,
        reason: "unroutable".into(),
    }
}

#[tokio::test]
async fn a_replay_parked_by_another_upstream_is_passed_one_parked_here_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let theirs = store.append(record("up/1")).await.unwrap();
    let ours = store.append(record("up/2")).await.unwrap();
    store
        .park(theirs, record("up/1"), parked("backup", theirs))
        .await
        .unwrap();
    store
        .park(ours, record("up/2"), parked("central", ours))
        .await
        .unwrap();
    store.advance_cursor("central", ours + 1).await.unwrap();
    assert_eq!(store.replay_dead_letters(10).await.unwrap(), 2);
    let mut f = forwarder(&store, "up/#");
    let replays = store.read(ours + 1, 10, usize::MAX).unwrap();
    assert_eq!(replays.len(), 2);

    f.skip_unmatched(DOWN_SKIP_MAX_RECORDS).await;
    assert_eq!(
        f.position(),
        replays[1].seq,
        "only the other upstream's replay is passed"
    );
    assert!(route_of_entry(&f.routes, "central", &replays[0]).is_none());
    assert!(route_of_entry(&f.routes, "central", &replays[1]).is_some());
    assert!(route_of_entry(&f.routes, "backup", &replays[0]).is_some());
    f.flusher.finish().await;
}

#[tokio::test]
async fn parks_of_a_settled_prefix_share_a_commit_and_are_marked() {
    let dir = tempfile::tempdir().unwrap();
    // A slow fsync, as on an SD card: parks queued while one commits
    // all go into the next.
    let backend = edge_store::SlowSyncBackend::open(
        &dir.path().join(edge_store::DB_FILE),
        Duration::from_millis(20),
    )
    .unwrap();
    let options = options();
    let store = Store::open_with_backend(backend, dir.path(), options).unwrap();
    let mut f = forwarder(&store, "up/#");
    let mut seqs = Vec::new();
    for i in 0..5 {
        seqs.push(store.append(record(&format!("up/{i}"))).await.unwrap());
    }
    let mut s = Session::new(std::iter::once(seqs[0]), BTreeSet::new(), None);
    for &seq in &seqs {
        // A replay of seq 2 parked again keeps its original seq.
        let original = (seq == seqs[4]).then_some(2);
        let item = InFlight {
            record: record("up/x"),
            topic: "up/x".into(),
            route: "up".into(),
            published_at: Instant::now(),
            original,
            park: Some(Park {
                kind: "unroutable",
                reason: format!("no queue for {seq}"),
            }),
        };
        assert!(s.lanes[0].window.push_done(seq, item));
    }
    let commits = store.commits();
    f.settle(&mut s).await.unwrap();
    // Awaited one by one they took five commits; queued together at
    // most the first goes alone (the writer may wake between queueing).
    let used = store.commits() - commits;
    assert!(used <= 2, "five parks took {used} commits");
    assert_eq!(f.position(), seqs[4] + 1);

    let dead = store.dead_letters(0, 10).unwrap();
    assert_eq!(dead.len(), 5);
    for (letter, &seq) in dead.iter().zip(&seqs) {
        assert_eq!(letter.seq, seq);
        assert_eq!(letter.upstreams, ["central"]);
        let first = if seq == seqs[4] { 2 } else { seq };
        assert_eq!(letter.original_seq, first);
    }
    f.flusher.finish().await;
}
