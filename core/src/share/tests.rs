use std::num::NonZeroUsize;

use bytes::Bytes;
use edge_store::{Store, StoreOptions};
use tokio::sync::mpsc;

use crate::message::QoS;
use crate::route::Routes;
use crate::router::RouterOptions;
use crate::session::{AttachOptions, SessionError, SessionExpiry, Subscriber};

use super::*;

fn store(dir: &std::path::Path) -> Store {
    Store::open(
        dir,
        StoreOptions {
            retire_without_cursors: false,
            max_bytes: 1 << 20,
            batch_max_messages: NonZeroUsize::new(64).expect("non-zero"),
            batch_max_bytes: NonZeroUsize::new(1 << 20).expect("non-zero"),
            inbox_capacity: NonZeroUsize::new(64).expect("non-zero"),
            cursors: vec![],
            when_full: Default::default(),
            min_free: 0,
            max_age: None,
        },
    )
    .expect("open store")
}

const PERSISTENT: AttachOptions = AttachOptions {
    clean: false,
    expiry: SessionExpiry::Default,
    queue: 8,
    gate: None,
};

/// Publishes `t` with payload `n` and waits for the receipt (the fan-out
/// is done then).
async fn publish(router: &Router, topic: &str, n: usize, qos: QoS) {
    let message = Message::new(topic, Bytes::from(n.to_string()), qos, "pub".into());
    router
        .publish(message)
        .await
        .expect("publish")
        .await
        .expect("accepted");
}

/// The payloads waiting in `rx` (every fan-out already happened).
fn drain(rx: &mut mpsc::Receiver<Delivery>) -> Vec<usize> {
    std::iter::from_fn(|| rx.try_recv().ok())
        .map(|d| {
            std::str::from_utf8(&d.message.payload)
                .expect("utf-8")
                .parse()
                .expect("a number")
        })
        .collect()
}

async fn member(
    router: &Router,
    id: &str,
    filter: &str,
    queue: usize,
) -> (Subscriber, mpsc::Receiver<Delivery>) {
    let (sub, rx) = router.connect(id.into(), queue);
    sub.subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    (sub, rx)
}

#[tokio::test]
async fn each_message_goes_to_one_member_round_robin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::default());
    let mut members = Vec::new();
    for id in ["a", "b", "c"] {
        members.push(member(&router, id, "$share/g/t/#", 64).await);
    }
    for n in 0..30 {
        publish(&router, &format!("t/{n}"), n, QoS::AtLeastOnce).await;
    }
    for (i, (_, rx)) in members.iter_mut().enumerate() {
        let got = drain(rx);
        let expected: Vec<usize> = (i..30).step_by(3).collect();
        assert_eq!(got, expected, "member {i} in turn");
    }
}

#[tokio::test]
async fn a_full_member_is_skipped_for_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::default());
    let (_a, mut a) = member(&router, "a", "$share/g/t", 1).await;
    let (_b, mut b) = member(&router, "b", "$share/g/t", 64).await;
    for n in 0..6 {
        publish(&router, "t", n, QoS::AtLeastOnce).await;
    }
    assert_eq!(drain(&mut a), [0], "a's queue holds one");
    assert_eq!(drain(&mut b), [1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn plain_and_shared_subscriptions_of_one_session_give_one_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::default());
    let (s, mut s_rx) = member(&router, "s", "t/#", 64).await;
    s.subscribe("$share/g/t/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    s.subscribe("$share/h/t/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let (_o, mut o_rx) = member(&router, "o", "$share/g/t/#", 64).await;
    for n in 0..4 {
        publish(&router, "t/x", n, QoS::AtLeastOnce).await;
    }
    assert_eq!(
        drain(&mut s_rx),
        [0, 1, 2, 3],
        "once each, by its plain filter"
    );
    assert_eq!(drain(&mut o_rx), [1, 3], "every other one of group g");
    s.unsubscribe("t/#").await.expect("unsubscribe");
    s.unsubscribe("$share/g/t/#").await.expect("unsubscribe");
    for n in 4..8 {
        publish(&router, "t/x", n, QoS::AtLeastOnce).await;
    }
    assert_eq!(drain(&mut s_rx), [4, 5, 6, 7], "group h is s alone");
    assert_eq!(drain(&mut o_rx), [4, 5, 6, 7], "group g is o alone");
    assert_eq!(s.filters(), ["$share/h/t/#"]);
}

#[tokio::test]
async fn invalid_share_names_and_no_local_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::default());
    let (s, _rx) = router.connect("s".into(), 8);
    for filter in [
        "$share//t",
        "$share/g+/t",
        "$share/#/t",
        "$share/g",
        "$share/g/",
    ] {
        assert_eq!(
            s.subscribe(filter, QoS::AtLeastOnce).await,
            Err(SessionError::InvalidFilter(filter.to_string())),
            "{filter:?}"
        );
    }
    let no_local = SubOptions {
        no_local: true,
        ..SubOptions::qos(QoS::AtLeastOnce)
    };
    assert!(matches!(
        s.subscribe_with("$share/g/t", no_local, crate::RetainHandling::Always)
            .await,
        Err(SessionError::InvalidFilter(_))
    ));
    assert!(s.filters().is_empty());
    assert!(!router.is_routed("t"));
}

#[tokio::test]
async fn retained_messages_are_not_sent_to_shared_subscriptions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::default());
    let mut retained = Message::new("t", Bytes::from_static(b"r"), QoS::AtLeastOnce, "p".into());
    retained.retain = true;
    router
        .publish(retained)
        .await
        .expect("publish")
        .await
        .expect("accepted");
    let (s, _rx) = router.connect("s".into(), 8);
    let (_, shared) = s
        .subscribe("$share/g/t", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    assert!(shared.is_empty());
    let (_, plain) = s.subscribe("t", QoS::AtLeastOnce).await.expect("subscribe");
    assert_eq!(plain.len(), 1);
}

#[tokio::test]
async fn offline_persistent_members_keep_the_groups_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::default());
    for id in ["p1", "p2"] {
        let a = router.attach(id.into(), PERSISTENT).await.expect("attach");
        a.subscriber
            .subscribe("$share/g/t", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        a.subscriber.leave().await.expect("leave");
    }
    for n in 0..6 {
        publish(&router, "t", n, QoS::AtLeastOnce).await;
    }
    // QoS 0 is not queued for an absent session, shared or not.
    publish(&router, "t", 99, QoS::AtMostOnce).await;
    let mut all = Vec::new();
    for id in ["p1", "p2"] {
        let a = router.attach(id.into(), PERSISTENT).await.expect("attach");
        assert!(a.session_present);
        let backlog = a.subscriber.backlog(0, 100).await.expect("backlog");
        assert_eq!(backlog.len(), 3, "{id}: its turns");
        for entry in &backlog {
            let matched = a.subscriber.matched(&entry.message).expect("group matches");
            assert_eq!(matched.qos, QoS::AtLeastOnce);
        }
        all.extend(backlog.iter().map(|e| e.message.payload.clone()));
    }
    all.sort();
    let expected: Vec<Bytes> = (0..6).map(|n: usize| Bytes::from(n.to_string())).collect();
    assert_eq!(all, expected, "every message once");
}

#[tokio::test]
async fn groups_survive_a_restart_and_an_online_member_goes_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let router = Router::new(store(dir.path()), Routes::default());
        for id in ["p1", "p2"] {
            let a = router.attach(id.into(), PERSISTENT).await.expect("attach");
            a.subscriber
                .subscribe("$share/g/t", QoS::AtLeastOnce)
                .await
                .expect("subscribe");
            a.subscriber
                .subscribe("t", QoS::AtMostOnce)
                .await
                .expect("subscribe");
            a.subscriber.leave().await.expect("leave");
        }
        router.store().clone().close().await.expect("close");
    }
    let router = Router::start(
        store(dir.path()),
        Routes::default(),
        RouterOptions::default(),
    )
    .await
    .expect("start");
    // Both away: one queue entry each, in turn (their QoS 0 plain filter
    // queues nothing).
    for n in 0..2 {
        publish(&router, "t", n, QoS::AtLeastOnce).await;
    }
    let mut p2 = router
        .attach("p2".into(), PERSISTENT)
        .await
        .expect("attach");
    for n in 2..6 {
        publish(&router, "t", n, QoS::AtLeastOnce).await;
    }
    let live: Vec<Delivery> = std::iter::from_fn(|| p2.deliveries.try_recv().ok()).collect();
    assert_eq!(live.len(), 4, "the online member takes every one, once");
    assert!(
        live.iter()
            .all(|d| d.qos == QoS::AtLeastOnce && d.share.as_deref() == Some("$share/g/t")),
        "through the group: {live:?}"
    );
    let p1 = router
        .attach("p1".into(), PERSISTENT)
        .await
        .expect("attach");
    let backlog = p1.subscriber.backlog(0, 10).await.expect("backlog");
    assert_eq!(backlog.len(), 1, "its turn while both were away");
    let mut filters = p1.subscriber.filters();
    filters.sort();
    assert_eq!(filters, ["$share/g/t", "t"]);
}

#[tokio::test]
async fn undelivered_group_deliveries_go_to_another_member() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::default());
    let (a, mut a_rx) = member(&router, "a", "$share/g/t", 8).await;
    let (_b, mut b_rx) = member(&router, "b", "$share/g/t", 8).await;
    let (plain, mut plain_rx) = member(&router, "plain", "t", 8).await;
    for n in 0..4 {
        publish(&router, "t", n, QoS::AtLeastOnce).await;
    }
    let unsettled: Vec<Delivery> = std::iter::from_fn(|| a_rx.try_recv().ok()).collect();
    assert_eq!(unsettled.len(), 2);
    assert!(
        unsettled
            .iter()
            .all(|d| d.share.as_deref() == Some("$share/g/t"))
    );
    let not_shared: Vec<Delivery> = std::iter::from_fn(|| plain_rx.try_recv().ok()).collect();
    assert!(not_shared.iter().all(|d| d.share.is_none()));
    drop(a);
    let mut handed = unsettled;
    handed.extend(not_shared);
    assert_eq!(router.redistribute("a", handed), 2, "the group's two only");
    assert_eq!(drain(&mut b_rx), [1, 3, 0, 2]);
    assert!(drain(&mut plain_rx).is_empty());
    // With nobody left in the group they are dropped (counted).
    let d = {
        publish(&router, "t", 9, QoS::AtLeastOnce).await;
        b_rx.try_recv().expect("b's")
    };
    drop(_b);
    drop(plain);
    assert_eq!(router.redistribute("b", vec![d]), 0);
}

#[tokio::test]
async fn a_clean_member_leaving_takes_its_membership_along() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::default());
    let (a, _a_rx) = member(&router, "a", "$share/g/t", 8).await;
    let (b, mut b_rx) = member(&router, "b", "$share/g/t", 8).await;
    drop(a);
    for n in 0..3 {
        publish(&router, "t", n, QoS::AtLeastOnce).await;
    }
    assert_eq!(drain(&mut b_rx), [0, 1, 2]);
    drop(b);
    assert!(!router.is_routed("t"));
    let registry = router.inner.registry();
    assert!(registry.shares.groups.is_empty() && registry.shares.members.is_empty());
    assert!(registry.trie.is_empty());
}

/// Routes `n` without waiting for its receipt: the members are chosen, the
/// fan-out (after the commit, on the dispatcher) has not happened yet.
async fn route(router: &Router, n: usize) -> crate::Receipt {
    let message = Message::new(
        "t",
        Bytes::from(n.to_string()),
        QoS::AtLeastOnce,
        "p".into(),
    );
    router.publish(message).await.expect("publish")
}

// Current-thread runtime: the dispatcher cannot fan out before the test
// awaits a receipt.
#[tokio::test(flavor = "current_thread")]
async fn a_member_gone_or_full_at_the_fan_out_is_passed_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::default());
    let (a, _a_rx) = member(&router, "a", "$share/g/t", 8).await;
    let (_b, mut b_rx) = member(&router, "b", "$share/g/t", 8).await;
    let receipt = route(&router, 0).await;
    drop(a);
    receipt.await.expect("accepted");
    assert_eq!(drain(&mut b_rx), [0], "a left before the fan-out");

    let (_c, mut c_rx) = member(&router, "c", "$share/h/t", 1).await;
    let (_d, mut d_rx) = member(&router, "d", "$share/h/t", 8).await;
    // c, d, c: c's one place is still free when it is chosen again.
    let mut receipts = Vec::new();
    for n in 1..4 {
        receipts.push(route(&router, n).await);
    }
    for receipt in receipts {
        receipt.await.expect("accepted");
    }
    assert_eq!(drain(&mut c_rx), [1]);
    assert_eq!(drain(&mut d_rx), [2, 3], "c was full at its second turn");
    assert_eq!(drain(&mut b_rx), [1, 2, 3], "group g: b alone");
}
