//! The dead-letter endpoints: parked messages are listed, replayed once the
//! cause is fixed (they reach the broker once, under their original message
//! id, and only through the upstream that parked them), and purged.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use edge_tests::amqp::{AmqpQueue, QueueSpec, connect};
use edge_tests::http::{get, post};
use edge_tests::{Publisher, Received, TestGateway, unique, wait_for};
use lapin::ExchangeKind;
use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;

use crate::{SHORT, payload};

const COUNT: u64 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_messages_are_listed_replayed_after_the_fix_and_purged() -> anyhow::Result<()> {
    let uri = crate::shared_node().await?.amqp_uri();
    let prefix = unique("dl");
    let upstream = unique("dl-up");
    // The route's exchange does not exist yet: its messages are parked.
    let exchange = unique("later-exchange");
    let gw = TestGateway::builder()
        .upstream(&upstream, std::slice::from_ref(&uri))
        .route_with(
            "late",
            &format!("{prefix}/#"),
            &upstream,
            &[("exchange", &format!("{exchange:?}"))],
        )
        .start()
        .await?;
    let admin = gw
        .metrics_addr()
        .expect("the telemetry port serves the dead-letter endpoints");
    let topic = format!("{prefix}/meter");
    let (t, name) = (topic.clone(), "meter".to_string());
    let report = Publisher::new(gw.mqtt_addr(), &unique("meter"))
        .run(COUNT, SHORT, move |i| (t.clone(), payload(&name, i)))
        .await;
    assert!(report.all_acked(COUNT), "{report:?}");
    wait_for("the route's messages to be parked", SHORT, || async {
        (gw.store().stats().dead_letters == COUNT).then_some(())
    })
    .await?;

    let (status, listing) = get(admin, "/dead-letters").await?;
    assert_eq!(status, 200, "{listing}");
    assert!(
        listing.starts_with(&format!("{COUNT} dead letter(s)")),
        "{listing}"
    );
    assert_eq!(
        listing
            .lines()
            .filter(|l| l.contains(&topic) && l.contains("not found"))
            .count(),
        COUNT as usize,
        "{listing}"
    );

    let original_ids = parked_ids(&gw)?;

    // The operator creates the exchange (already bound), then replays.
    let conn = connect(&uri).await?;
    declare_exchange(&conn, &exchange).await?;
    let spec = QueueSpec {
        exchange: exchange.clone(),
        ..QueueSpec::topic(&format!("{prefix}.#"))
    };
    let mut queue = AmqpQueue::open(&uri, &spec).await?;
    let arrived = replay_until_arrived(admin, &mut queue, COUNT as usize).await?;
    let ids: BTreeSet<String> = arrived
        .iter()
        .map(|m| m.message_id.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        ids, original_ids,
        "replayed under their original message ids"
    );
    assert!(
        arrived
            .iter()
            .all(|m| m.headers.keys().all(|k| !k.starts_with("x-edge-"))),
        "internal headers stay in the gateway: {arrived:?}"
    );
    exactly_once(&gw, &upstream, &mut queue).await?;
    let mut bodies: Vec<String> = arrived.iter().map(|m| m.body_str()).collect();
    bodies.sort();
    let expected: Vec<String> = (0..COUNT)
        .map(|i| String::from_utf8_lossy(&payload("meter", i)).into_owned())
        .collect();
    assert_eq!(
        bodies, expected,
        "every parked message reached the broker once replayed"
    );
    assert!(
        arrived
            .iter()
            .all(|m| m.mqtt_topic() == Some(topic.as_str()))
    );

    // Everything replayed went through: nothing is left to purge.
    assert_eq!(gw.store().stats().dead_letters, 0);
    let (status, body) = post(admin, "/dead-letters/purge").await?;
    assert_eq!((status, body.trim()), (200, "purged 0"));
    queue.delete().await?;
    conn.close(200, "done".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

/// Upstream A's route goes to a missing exchange and parks; upstream B
/// delivers the same messages. A replay reaches A once, under the original
/// ids, and B not a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_goes_only_to_the_upstream_that_parked() -> anyhow::Result<()> {
    let uri = crate::shared_node().await?.amqp_uri();
    let prefix = unique("dl2");
    let (up_a, up_b) = (unique("dl2-a"), unique("dl2-b"));
    let exchange = unique("later-exchange");
    let mut queue_b = AmqpQueue::open(&uri, &QueueSpec::topic(&format!("{prefix}.#"))).await?;
    let gw = TestGateway::builder()
        .upstream(&up_a, std::slice::from_ref(&uri))
        .upstream(&up_b, std::slice::from_ref(&uri))
        .route_with(
            "to-a",
            &format!("{prefix}/#"),
            &up_a,
            &[("exchange", &format!("{exchange:?}"))],
        )
        .route("to-b", &format!("{prefix}/#"), &up_b)
        .start()
        .await?;
    let admin = gw.metrics_addr().expect("telemetry port");
    let (t, name) = (format!("{prefix}/meter"), "m2".to_string());
    let report = Publisher::new(gw.mqtt_addr(), &unique("m2"))
        .run(COUNT, SHORT, move |i| (t.clone(), payload(&name, i)))
        .await;
    assert!(report.all_acked(COUNT), "{report:?}");
    let delivered_b = queue_b.take(COUNT as usize, SHORT).await?;
    wait_for("upstream A to park", SHORT, || async {
        (gw.store().stats().dead_letters == COUNT).then_some(())
    })
    .await?;
    let original_ids = parked_ids(&gw)?;
    let ids_b: BTreeSet<String> = delivered_b
        .iter()
        .map(|m| m.message_id.clone().unwrap_or_default())
        .collect();
    assert_eq!(ids_b, original_ids);

    let conn = connect(&uri).await?;
    declare_exchange(&conn, &exchange).await?;
    let spec_a = QueueSpec {
        exchange: exchange.clone(),
        ..QueueSpec::topic(&format!("{prefix}.#"))
    };
    let mut queue_a = AmqpQueue::open(&uri, &spec_a).await?;
    let arrived = replay_until_arrived(admin, &mut queue_a, COUNT as usize).await?;
    let ids_a: BTreeSet<String> = arrived
        .iter()
        .map(|m| m.message_id.clone().unwrap_or_default())
        .collect();
    assert_eq!(ids_a, original_ids, "A gets them under the original ids");
    exactly_once(&gw, &up_a, &mut queue_a).await?;
    // B has passed the replayed records; none reached its queue.
    exactly_once(&gw, &up_b, &mut queue_b).await?;

    queue_a.delete().await?;
    queue_b.delete().await?;
    conn.close(200, "done".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

/// The message ids of what is parked: `<gateway id>:<seq parked>`.
fn parked_ids(gw: &TestGateway) -> anyhow::Result<BTreeSet<String>> {
    Ok(gw
        .store()
        .dead_letters(0, 1000)?
        .iter()
        .map(|d| format!("{}:{}", gw.id(), d.seq))
        .collect())
}

pub(crate) async fn declare_exchange(
    conn: &lapin::Connection,
    exchange: &str,
) -> anyhow::Result<()> {
    let channel = conn.create_channel().await?;
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel.close(200, "declared".into()).await?;
    Ok(())
}

/// Replays until `n` messages arrived. The forwarder checks a missing
/// exchange again before parking when its last check is over a second old:
/// a replay within a second of that check may be parked again.
async fn replay_until_arrived(
    admin: SocketAddr,
    queue: &mut AmqpQueue,
    n: usize,
) -> anyhow::Result<Vec<Received>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut arrived = Vec::new();
    while arrived.len() < n {
        assert!(
            Instant::now() < deadline,
            "replayed messages never arrived: {arrived:?}"
        );
        let (status, body) = post(admin, "/dead-letters/replay").await?;
        assert_eq!(status, 200, "{body}");
        if let Ok(got) = queue.take(n - arrived.len(), Duration::from_secs(3)).await {
            arrived.extend(got);
        }
    }
    Ok(arrived)
}

/// Once `upstream`'s cursor has passed everything in the log, `queue` holds
/// nothing more (a copy would have been published before the cursor moved).
async fn exactly_once(
    gw: &TestGateway,
    upstream: &str,
    queue: &mut AmqpQueue,
) -> anyhow::Result<()> {
    let end = gw.store().stats().next_seq;
    wait_for("the cursor to pass the replayed records", SHORT, || async {
        let cursor = gw.store().cursor(upstream).ok()?;
        (cursor >= end).then_some(())
    })
    .await?;
    if let Ok(extra) = queue.next(Duration::from_millis(500)).await {
        panic!("a second copy arrived through {upstream}: {extra:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_deletes_what_is_parked() -> anyhow::Result<()> {
    let uri = crate::shared_node().await?.amqp_uri();
    let prefix = unique("dlp");
    let upstream = unique("dlp-up");
    let gw = TestGateway::builder()
        .upstream(&upstream, std::slice::from_ref(&uri))
        .route_with(
            "nowhere",
            &format!("{prefix}/#"),
            &upstream,
            &[("exchange", &format!("{:?}", unique("absent")))],
        )
        .start()
        .await?;
    let admin = gw.metrics_addr().expect("telemetry port");
    let (t, name) = (format!("{prefix}/x"), "p".to_string());
    let report = Publisher::new(gw.mqtt_addr(), &unique("p"))
        .run(COUNT, SHORT, move |i| (t.clone(), payload(&name, i)))
        .await;
    assert!(report.all_acked(COUNT), "{report:?}");
    wait_for("parking", SHORT, || async {
        (gw.store().stats().dead_letters == COUNT).then_some(())
    })
    .await?;
    let bytes_before = gw.store().stats().dead_letter_bytes;
    assert!(bytes_before > 0);

    let (status, body) = post(admin, "/dead-letters/purge").await?;
    assert_eq!(
        (status, body.trim()),
        (200, format!("purged {COUNT}").as_str())
    );
    let stats = gw.store().stats();
    assert_eq!((stats.dead_letters, stats.dead_letter_bytes), (0, 0));
    gw.shutdown().await?;
    Ok(())
}
