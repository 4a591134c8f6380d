use std::num::NonZeroUsize;
use std::time::Duration;

use bytes::Bytes;
use edge_store::StoreOptions;

use super::*;
use crate::route::Route;
use crate::session::{AttachOptions, SessionExpiry};

const WAIT: Duration = Duration::from_secs(5);

fn store_with(dir: &std::path::Path, max_bytes: u64) -> Store {
    Store::open(
        dir,
        StoreOptions {
            retire_without_cursors: false,
            max_bytes,
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

fn store(dir: &std::path::Path) -> Store {
    store_with(dir, 1 << 20)
}

fn route(filter: &str) -> Route {
    Route::new(edge_config::RouteConfig {
        name: "r".into(),
        filter: filter.into(),
        local: None,
        upstream: "up".into(),
        exchange: "amq.topic".into(),
        routing_key: "{topic}".into(),
        priority: 0,
        ttl: None,
        persistent: true,
        ack: edge_config::AckPoint::Persisted,
        declare_exchange: None,
    })
}

const PERSISTENT: AttachOptions = AttachOptions {
    clean: false,
    expiry: SessionExpiry::Default,
    queue: 8,
    gate: None,
};

fn msg(topic: &str, qos: QoS) -> Message {
    Message::new(topic, Bytes::from_static(b"x"), qos, "pub".into())
}

/// Publishes and waits for the receipt; the log seq if logged.
async fn publish(router: &Router, message: Message) -> Option<Seq> {
    router
        .publish(message)
        .await
        .expect("publish")
        .await
        .expect("accepted")
}

async fn recv(rx: &mut mpsc::Receiver<Delivery>) -> Delivery {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a delivery in time")
        .expect("open")
}

#[tokio::test]
async fn logs_qos1_and_routed_messages_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::new(vec![route("up/#")]));
    let r = publish(&router, msg("local/a", QoS::AtMostOnce)).await;
    assert_eq!(r, None, "unrouted QoS 0 is not logged");
    let seq = router
        .publish(msg("local/b", QoS::AtLeastOnce))
        .await
        .expect("publish")
        .await;
    assert_eq!(seq.expect("committed"), Some(1));
    let seq = router
        .publish(msg("up/c", QoS::AtMostOnce))
        .await
        .expect("publish")
        .await;
    assert_eq!(seq.expect("committed"), Some(2));
    let stored = router.store().read(1, 10, 1 << 20).expect("read");
    let topics: Vec<String> = stored
        .iter()
        .map(|e| {
            Message::from_record(&e.record)
                .expect("decodes")
                .topic
                .to_string()
        })
        .collect();
    assert_eq!(topics, ["local/b", "up/c"]);
}

#[tokio::test]
async fn fans_out_once_per_session_at_the_highest_granted_qos() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::default());
    let (sub, mut rx) = router.connect("s".into(), 8);
    sub.subscribe("a/+", QoS::AtMostOnce)
        .await
        .expect("subscribe");
    sub.subscribe("a/#", QoS::ExactlyOnce)
        .await
        .expect("subscribe");
    let (other, mut other_rx) = router.connect("o".into(), 8);
    other
        .subscribe("b/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");

    publish(&router, msg("a/x", QoS::ExactlyOnce)).await;
    let d = recv(&mut rx).await;
    assert_eq!(&*d.message.topic, "a/x");
    assert_eq!(d.qos, QoS::ExactlyOnce);
    assert!(rx.try_recv().is_err(), "overlapping filters deliver once");
    assert!(
        other_rx.try_recv().is_err(),
        "non-matching session gets nothing"
    );

    sub.unsubscribe("a/#").await.expect("unsubscribe");
    sub.unsubscribe("a/+").await.expect("unsubscribe");
    publish(&router, msg("a/y", QoS::AtMostOnce)).await;
    assert!(rx.try_recv().is_err(), "unsubscribed");
}

#[tokio::test]
async fn a_message_the_store_refuses_is_delivered_to_nobody() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store_with(dir.path(), 200), Routes::default());
    let (sub, mut rx) = router.connect("s".into(), 8);
    sub.subscribe("#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let mut big = msg("t", QoS::AtLeastOnce);
    big.payload = Bytes::from(vec![0u8; 1000]);
    let refused = router.publish(big).await.expect("queued").await;
    assert!(
        matches!(refused, Err(PublishError::Full { .. })),
        "{refused:?}"
    );
    publish(&router, msg("t", QoS::AtLeastOnce)).await;
    let d = recv(&mut rx).await;
    assert_eq!(d.message.payload.len(), 1, "only the accepted one arrives");
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn a_full_subscriber_queue_drops_instead_of_blocking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::default());
    let (sub, mut rx) = router.connect("slow".into(), 1);
    sub.subscribe("#", QoS::AtMostOnce)
        .await
        .expect("subscribe");
    for _ in 0..3 {
        publish(&router, msg("t", QoS::AtMostOnce)).await;
    }
    assert!(rx.try_recv().is_ok());
    assert!(rx.try_recv().is_err(), "only the queue's capacity was kept");
}

#[tokio::test]
async fn the_same_client_id_takes_over_and_drop_unregisters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::default());
    let (first, _rx1) = router.connect("dev".into(), 1);
    let (second, _rx2) = router.connect("dev".into(), 1);
    tokio::time::timeout(WAIT, first.taken_over())
        .await
        .expect("first session is told it was taken over");
    drop(first);
    assert_eq!(router.session_count(), 1, "the newer connection keeps it");
    drop(second);
    assert_eq!(router.session_count(), 0);
}

#[tokio::test]
async fn a_persistent_session_keeps_what_came_while_it_was_away() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::default());
    let persistent = PERSISTENT;
    let a = router
        .attach("dev".into(), persistent.clone())
        .await
        .expect("attach");
    assert!(!a.session_present);
    a.subscriber
        .subscribe("cmd/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    drop(a);
    for n in 0..3u8 {
        let mut m = msg("cmd/x", QoS::AtLeastOnce);
        m.payload = Bytes::from(vec![n]);
        publish(&router, m).await;
    }
    // QoS 0 is not queued for an absent session.
    publish(&router, msg("cmd/x", QoS::AtMostOnce)).await;

    let mut b = router
        .attach("dev".into(), persistent)
        .await
        .expect("attach");
    assert!(b.session_present);
    let backlog = b.subscriber.backlog(0, 100).await.expect("backlog");
    let payloads: Vec<u8> = backlog.iter().map(|e| e.message.payload[0]).collect();
    assert_eq!(payloads, [0, 1, 2], "in order");
    b.subscriber
        .ack(backlog.iter().map(|e| e.seq).collect())
        .await
        .expect("ack");
    assert!(
        b.subscriber
            .backlog(0, 100)
            .await
            .expect("backlog")
            .is_empty()
    );
    // Online: a live delivery carries its seq, to be acknowledged.
    publish(&router, msg("cmd/y", QoS::AtLeastOnce)).await;
    let d = recv(&mut b.deliveries).await;
    let seq = d.seq.expect("a queued delivery");
    b.subscriber.ack(vec![seq]).await.expect("ack");

    // A clean start discards the session.
    drop(b);
    let c = router
        .attach(
            "dev".into(),
            AttachOptions {
                clean: true,
                expiry: SessionExpiry::WithConnection,
                queue: 8,
                gate: None,
            },
        )
        .await
        .expect("attach");
    assert!(!c.session_present);
    drop(c);
    assert_eq!(router.session_count(), 0);
}

/// A message past its expiry is delivered to nobody: not live, not from a
/// session's queue, not as a retained message.
#[tokio::test]
async fn an_expired_message_is_delivered_to_nobody() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::default());
    let mut online = router
        .attach("online".into(), PERSISTENT)
        .await
        .expect("attach");
    online
        .subscriber
        .subscribe("t/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let away = router
        .attach("away".into(), PERSISTENT)
        .await
        .expect("attach");
    away.subscriber
        .subscribe("t/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    drop(away);
    let stale = |topic: &str| {
        let mut m = msg(topic, QoS::AtLeastOnce);
        m.retain = true;
        m.properties.expires_at_ms = Some(1);
        m
    };
    publish(&router, stale("t/old")).await;
    let mut fresh = msg("t/new", QoS::AtLeastOnce);
    fresh.properties.expires_at_ms = Some(u64::MAX);
    publish(&router, fresh).await;

    assert_eq!(&*recv(&mut online.deliveries).await.message.topic, "t/new");
    let away = router
        .attach("away".into(), PERSISTENT)
        .await
        .expect("attach");
    let topics: Vec<String> = away
        .subscriber
        .backlog(0, 10)
        .await
        .expect("backlog")
        .iter()
        .map(|e| e.message.topic.to_string())
        .collect();
    assert_eq!(topics, ["t/new"]);
    let (_, retained) = away
        .subscriber
        .subscribe("t/old", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    assert!(
        retained.is_empty(),
        "an expired retained message is not sent"
    );
}

/// An absent session's queue is bounded by messages and by bytes: what
/// does not fit is not queued for it (and is still stored for the others).
#[tokio::test]
async fn an_absent_sessions_queue_is_bounded_by_messages_and_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = |n: usize| {
        let mut m = msg("cmd/x", QoS::AtLeastOnce);
        m.payload = Bytes::from(vec![n as u8; n]);
        m
    };
    let one = size(100).to_record().expect("encodes").encoded_len() as u64;
    let router = Router::with_options(
        store(dir.path()),
        Routes::default(),
        RouterOptions {
            max_session_queue: 3,
            max_session_queue_bytes: 2 * one + one / 2,
            ..RouterOptions::default()
        },
    );
    // "count" takes only small messages: the byte bound does not bite. An
    // AMQP queue's session has no bound but the store quota.
    for (id, filter) in [
        ("bytes", "cmd/x"),
        ("count", "cmd/small"),
        ("amqp:q", "cmd/#"),
    ] {
        let a = router.attach(id.into(), PERSISTENT).await.expect("attach");
        a.subscriber
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
    }
    for _ in 0..3 {
        publish(&router, size(100)).await;
    }
    for _ in 0..4 {
        let mut m = msg("cmd/small", QoS::AtLeastOnce);
        m.payload = Bytes::from_static(b"s");
        publish(&router, m).await;
    }
    let backlog = |id: &'static str| {
        let router = router.clone();
        async move {
            let a = router.attach(id.into(), PERSISTENT).await.expect("attach");
            let entries = a.subscriber.backlog(0, 100).await.expect("backlog");
            entries
                .iter()
                .map(|e| e.message.payload.len())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(backlog("bytes").await, [100, 100], "2.5 messages of bytes");
    assert_eq!(backlog("count").await, [1, 1, 1], "3 messages");
    assert_eq!(backlog("amqp:q").await.len(), 7, "every message");
}

#[tokio::test]
async fn sessions_and_retained_messages_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let router = Router::new(store(dir.path()), Routes::default());
        let a = router
            .attach("dev".into(), PERSISTENT)
            .await
            .expect("attach");
        a.subscriber
            .subscribe("s/#", QoS::ExactlyOnce)
            .await
            .expect("subscribe");
        drop(a);
        let mut r = msg("s/1", QoS::AtLeastOnce);
        r.retain = true;
        publish(&router, r).await;
        router.store().clone().close().await.expect("close");
    }
    let router = Router::start(
        store(dir.path()),
        Routes::default(),
        RouterOptions::default(),
    )
    .await
    .expect("start");
    assert_eq!(router.session_count(), 1);
    let a = router
        .attach("dev".into(), PERSISTENT)
        .await
        .expect("attach");
    assert!(a.session_present);
    let backlog = a.subscriber.backlog(0, 10).await.expect("backlog");
    assert_eq!(backlog.len(), 1);
    assert!(backlog[0].message.retain);
    let (_, retained) = a
        .subscriber
        .subscribe("s/+", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    assert_eq!(retained.len(), 1);
    assert_eq!(&*retained[0].topic, "s/1");
}

#[tokio::test]
async fn an_empty_retained_payload_clears_the_topic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::default());
    let (sub, _rx) = router.connect("s".into(), 8);
    let mut r = msg("t/a", QoS::AtMostOnce);
    r.retain = true;
    publish(&router, r).await;
    assert_eq!(
        sub.subscribe("t/#", QoS::AtMostOnce)
            .await
            .expect("sub")
            .1
            .len(),
        1
    );
    let mut clear = msg("t/a", QoS::AtMostOnce);
    clear.retain = true;
    clear.payload = Bytes::new();
    publish(&router, clear).await;
    assert!(
        sub.subscribe("t/#", QoS::AtMostOnce)
            .await
            .expect("sub")
            .1
            .is_empty()
    );
    assert_eq!(router.store().retained().expect("read").len(), 0);
}

#[tokio::test]
async fn is_routed_sees_sessions_and_routes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::new(vec![route("up/#")]));
    assert!(!router.is_routed("a/b"));
    assert!(router.is_routed("up/x"));
    let (sub, _rx) = router.connect("s".into(), 8);
    sub.subscribe("a/+", QoS::AtMostOnce).await.expect("sub");
    assert!(router.is_routed("a/b"));
    assert!(
        !router.is_routed("$amqp/a/b"),
        "no leading wildcard on $ topics"
    );
    drop(sub);
    assert!(!router.is_routed("a/b"));
}

#[tokio::test]
async fn leave_writes_the_record_before_it_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store(dir.path());
    let router = Router::new(store.clone(), Routes::default());
    let a = router
        .attach("dev".into(), PERSISTENT)
        .await
        .expect("attach");
    a.subscriber
        .subscribe("a/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let connected = store.sessions().expect("sessions");
    a.subscriber.leave().await.expect("leave");
    let left = store.sessions().expect("sessions");
    assert_eq!(left.len(), 1);
    assert_ne!(left, connected, "the record now says when it left");
    assert_eq!(router.session_count(), 1, "persistent: kept, offline");
    let again = router
        .attach("dev".into(), PERSISTENT)
        .await
        .expect("resume");
    assert!(again.session_present);
    assert_eq!(
        again.subscriber.filters(),
        ["a/#"],
        "resumed with its filters"
    );
}

#[tokio::test]
async fn publish_to_reaches_the_union_of_its_topics_once_each() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::new(vec![route("up/#")]));
    let (both, mut both_rx) = router.connect("both".into(), 8);
    both.subscribe("a/#", QoS::AtMostOnce)
        .await
        .expect("subscribe");
    both.subscribe("b/x", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let (only_b, mut b_rx) = router.connect("b".into(), 8);
    only_b
        .subscribe("b/x", QoS::AtMostOnce)
        .await
        .expect("subscribe");
    let (none, mut none_rx) = router.connect("none".into(), 8);
    none.subscribe("c/#", QoS::AtMostOnce)
        .await
        .expect("subscribe");

    assert!(!router.is_routed_any(["z/1", "d"]));
    assert!(router.is_routed_any(["z/1", "b/x"]));
    assert!(router.is_routed_any(["z/1", "up/q"]), "a route counts");

    let also = ["b/x".to_string(), "a/y".to_string()];
    router
        .publish_to(msg("a/x", QoS::AtLeastOnce), &also)
        .await
        .expect("publish")
        .await
        .expect("accepted");
    let d = recv(&mut both_rx).await;
    assert_eq!(&*d.message.topic, "a/x", "seen on its own topic");
    assert_eq!(d.qos, QoS::AtLeastOnce, "the highest grant of any topic");
    assert!(both_rx.try_recv().is_err(), "one copy per session");
    let d = recv(&mut b_rx).await;
    assert_eq!(d.qos, QoS::AtMostOnce);
    assert!(b_rx.try_recv().is_err());
    assert!(none_rx.try_recv().is_err());

    // Logged once, for the route that only an extra topic matches.
    let seq = router
        .publish_to(msg("z/0", QoS::AtMostOnce), &["up/1".to_string()])
        .await
        .expect("publish")
        .await
        .expect("accepted");
    assert_eq!(seq, Some(2));
    assert_eq!(router.store().read(1, 10, 1 << 20).expect("read").len(), 2);
}

/// Admits `left` more messages.
#[derive(Debug)]
struct Admit(std::sync::atomic::AtomicU64);

impl crate::session::Gate for Admit {
    fn admit(&self, _: &Message) -> bool {
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

#[tokio::test]
async fn a_gate_refuses_for_its_session_only_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::default());
    let gated = router
        .attach(
            "amqp:gated".into(),
            AttachOptions {
                gate: Some(Arc::new(Admit(1.into()))),
                ..PERSISTENT
            },
        )
        .await
        .expect("attach");
    let (open, mut open_rx) = router.connect("other".into(), 8);
    gated
        .subscriber
        .subscribe("g/#", QoS::AtLeastOnce)
        .await
        .expect("sub");
    open.subscribe("g/#", QoS::AtLeastOnce).await.expect("sub");
    let mut gated_rx = gated.deliveries;
    let first = router
        .publish_gated(msg("g/1", QoS::AtLeastOnce), &[])
        .await
        .expect("publish");
    assert!(first.refused.is_none());
    first.receipt.await.expect("accepted");
    let second = router
        .publish_gated(msg("g/2", QoS::AtLeastOnce), &[])
        .await
        .expect("publish");
    let refused = second.refused.expect("refused by the gated session");
    assert_eq!(refused.sessions, vec![Arc::<str>::from("amqp:gated")]);
    assert_eq!(&*refused.message.topic, "g/2");
    second.receipt.await.expect("accepted");
    assert_eq!(&*recv(&mut gated_rx).await.message.topic, "g/1");
    assert_eq!(&*recv(&mut open_rx).await.message.topic, "g/1");
    assert_eq!(&*recv(&mut open_rx).await.message.topic, "g/2");
    assert!(
        gated_rx.try_recv().is_err(),
        "the refused message is not delivered"
    );
    assert_eq!(gated.subscriber.queued_messages(), Some(1), "nor queued");
}

/// Counts what it admitted and what came back.
#[derive(Debug, Default)]
struct Ledger {
    admitted: std::sync::atomic::AtomicU64,
    refunded: std::sync::atomic::AtomicU64,
}

impl crate::session::Gate for Ledger {
    fn admit(&self, _: &Message) -> bool {
        self.admitted.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn refund(&self, _: &Message) {
        self.refunded.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test]
async fn a_gate_is_refunded_for_what_its_full_channel_could_not_take() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::default());
    let ledger = Arc::new(Ledger::default());
    let attached = router
        .attach(
            "amqp:small".into(),
            AttachOptions {
                clean: true,
                expiry: SessionExpiry::WithConnection,
                queue: 1,
                gate: Some(Arc::clone(&ledger) as Arc<dyn crate::session::Gate>),
            },
        )
        .await
        .expect("attach");
    attached
        .subscriber
        .subscribe("s/#", QoS::AtMostOnce)
        .await
        .expect("sub");
    for n in 0..3 {
        publish(&router, msg(&format!("s/{n}"), QoS::AtMostOnce)).await;
    }
    assert_eq!(ledger.admitted.load(Ordering::Relaxed), 3);
    assert_eq!(
        ledger.refunded.load(Ordering::Relaxed),
        2,
        "one fits the channel, two were dropped"
    );
}

#[tokio::test]
async fn a_backlog_page_is_not_shortened_by_the_entries_it_skips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::default());
    let away = router
        .attach("away".into(), PERSISTENT)
        .await
        .expect("attach");
    away.subscriber
        .subscribe("t/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    drop(away);
    // Three expired entries first, then three live ones.
    for n in 0..6 {
        let mut m = msg(&format!("t/{n}"), QoS::AtLeastOnce);
        m.properties.expires_at_ms = Some(if n < 3 { 1 } else { u64::MAX });
        publish(&router, m).await;
    }
    let away = router
        .attach("away".into(), PERSISTENT)
        .await
        .expect("attach");
    let page = away.subscriber.backlog(0, 2).await.expect("backlog");
    let topics: Vec<&str> = page.iter().map(|e| &*e.message.topic).collect();
    assert_eq!(topics, ["t/3", "t/4"], "a full page: more may follow");
    let from = page.last().map_or(0, |e| e.seq + 1);
    let rest = away.subscriber.backlog(from, 2).await.expect("backlog");
    assert_eq!(rest.len(), 1, "short: the queue has no more");
}

/// MQTT 5 subscription options: no local, retain as published, the
/// identifiers of every matching filter, and retain handling.
#[tokio::test]
async fn subscription_options_shape_each_delivery() {
    use crate::session::{RetainHandling, SubOptions};
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::new(store(dir.path()), Routes::default());
    let (me, mut rx) = router.connect("me".into(), 8);
    let sub = |id, no_local, retain_as_published| SubOptions {
        qos: QoS::AtLeastOnce,
        no_local,
        retain_as_published,
        id,
    };
    me.subscribe_with("a/#", sub(7, false, true), RetainHandling::Always)
        .await
        .expect("subscribe");
    me.subscribe_with("a/+", sub(3, true, false), RetainHandling::Always)
        .await
        .expect("subscribe");
    let mut retained = msg("a/x", QoS::AtLeastOnce);
    retained.retain = true;
    publish(&router, retained).await;
    let d = recv(&mut rx).await;
    assert_eq!(d.sub_ids, [3, 7], "every matching filter's id, ascending");
    assert!(d.retain_as_published, "a/# keeps the RETAIN flag");
    assert!(
        !d.retained,
        "a live delivery, not one from the retained store"
    );

    // Its own message: only the filter without no-local matches.
    let own = Message::new(
        "a/y",
        Bytes::from_static(b"o"),
        QoS::AtLeastOnce,
        "me".into(),
    );
    publish(&router, own).await;
    let d = recv(&mut rx).await;
    assert_eq!(d.sub_ids, [7]);
    assert!(!d.retain_as_published, "not published retained");
    me.unsubscribe("a/#").await.expect("unsubscribe");
    let own = Message::new(
        "a/z",
        Bytes::from_static(b"o"),
        QoS::AtLeastOnce,
        "me".into(),
    );
    publish(&router, own).await;
    publish(&router, msg("a/w", QoS::AtLeastOnce)).await;
    let d = recv(&mut rx).await;
    assert_eq!(&*d.message.topic, "a/w", "its own a/z was not sent back");

    // Retain handling: 1 sends the retained message only to a new
    // subscription, 2 never.
    let (_, first) = me
        .subscribe_with("a/x", sub(0, false, false), RetainHandling::IfNew)
        .await
        .expect("subscribe");
    assert_eq!(first.len(), 1);
    let (_, again) = me
        .subscribe_with("a/x", sub(0, false, false), RetainHandling::IfNew)
        .await
        .expect("subscribe");
    assert!(again.is_empty(), "the subscription existed");
    let (_, never) = me
        .subscribe_with("a/#", sub(0, false, false), RetainHandling::Never)
        .await
        .expect("subscribe");
    assert!(never.is_empty());
    let (_, always) = me
        .subscribe_with("a/#", sub(0, false, false), RetainHandling::Always)
        .await
        .expect("subscribe");
    assert_eq!(always.len(), 1);
}

/// A session's own expiry replaces the router's default, and survives a
/// restart (the record keeps it).
#[tokio::test]
async fn a_session_keeps_its_own_expiry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = RouterOptions {
        session_expiry: Duration::from_secs(3600),
        ..RouterOptions::default()
    };
    let router = Router::start(store(dir.path()), Routes::default(), options)
        .await
        .expect("start");
    let short = router
        .attach(
            "short".into(),
            AttachOptions {
                expiry: SessionExpiry::After(Duration::from_millis(1)),
                ..PERSISTENT
            },
        )
        .await
        .expect("attach");
    let long = router
        .attach(
            "long".into(),
            AttachOptions {
                expiry: SessionExpiry::Never,
                ..PERSISTENT
            },
        )
        .await
        .expect("attach");
    short.subscriber.leave().await.expect("leave");
    long.subscriber.leave().await.expect("leave");
    // The expiry check runs every second, and deletes the record after
    // the session left the registry; bounded wait for both.
    let deadline = tokio::time::Instant::now() + WAIT;
    let stored = loop {
        let stored = router.store().sessions().expect("sessions");
        if router.session_count() == 1 && stored.len() == 1 {
            break stored;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "short never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ids: Vec<&str> = stored.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["long"]);
    let decoded = crate::session::tests_decode_expiry(&stored[0].1);
    assert_eq!(decoded, Some(SessionExpiry::Never));
}

#[tokio::test]
async fn an_upstream_confirmed_route_acknowledges_once_its_upstream_is_past_the_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut confirmed = route("alarms/#");
    let mut config = (*confirmed).clone();
    config.ack = edge_config::AckPoint::UpstreamConfirmed;
    confirmed = Route::new(config);
    let progress = Progress::new([("up", vec![0])]);
    let position = progress.sender("up").expect("known upstream");
    let router = Router::with_options(
        store(dir.path()),
        Routes::new(vec![confirmed, route("data/#")]),
        RouterOptions {
            progress,
            ..RouterOptions::default()
        },
    );
    // The persisted route acknowledges at the commit, whatever the upstream.
    let data = publish(&router, msg("data/1", QoS::AtLeastOnce)).await;
    assert!(data.is_some());

    let mut receipt = router
        .publish(msg("alarms/1", QoS::AtLeastOnce))
        .await
        .expect("publish");
    let seq = router
        .store()
        .committed()
        .wait_for(|c| *c > data.unwrap_or(0))
        .await
        .map(|c| *c)
        .expect("store open");
    // Committed, but the upstream has not passed it: no acknowledgement.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut receipt)
            .await
            .is_err(),
        "acknowledged before the upstream confirmed"
    );
    position.send_replace(seq);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut receipt)
            .await
            .is_err(),
        "the position must be PAST the message"
    );
    position.send_replace(seq + 1);
    let acked = tokio::time::timeout(WAIT, receipt)
        .await
        .expect("acknowledged once confirmed");
    assert_eq!(acked.expect("accepted"), Some(seq));
}

#[tokio::test]
async fn an_upstream_confirmed_route_waits_for_its_own_lane_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = (*route("alarms/#")).clone();
    config.ack = edge_config::AckPoint::UpstreamConfirmed;
    config.priority = 9;
    let alarms = Route::new(config);
    let progress = Progress::new([("up", vec![9, 0])]);
    let all = progress.sender("up").expect("known upstream");
    let high = progress.lane_sender("up", 9).expect("a lane of priority 9");
    assert!(progress.lane_sender("up", 5).is_none(), "no route has 5");
    let router = Router::with_options(
        store(dir.path()),
        Routes::new(vec![alarms, route("data/#")]),
        RouterOptions {
            progress,
            ..RouterOptions::default()
        },
    );
    let receipt = router
        .publish(msg("alarms/1", QoS::AtLeastOnce))
        .await
        .expect("publish");
    let seq = router
        .store()
        .committed()
        .wait_for(|c| *c > 0)
        .await
        .map(|c| *c)
        .expect("store open");
    // The low lane (a backlog) holds the upstream's own position back; the
    // lane of priority 9 passing the message is what acknowledges it.
    all.send_replace(0);
    high.send_replace(seq + 1);
    let acked = tokio::time::timeout(WAIT, receipt)
        .await
        .expect("acknowledged once its lane confirmed");
    assert_eq!(acked.expect("accepted"), Some(seq));
}
