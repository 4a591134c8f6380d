//! The dead-letter endpoints: parked messages are listed, replayed once the
//! cause is fixed (they reach the broker), and purged.

use std::time::{Duration, Instant};

use edge_tests::amqp::{AmqpQueue, QueueSpec, connect};
use edge_tests::http::{get, post};
use edge_tests::{Publisher, TestGateway, unique, wait_for};
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

    // The operator creates the exchange (already bound), then replays. The
    // replicator notices the exchange on its next check; until then a
    // replayed message is parked again, so replay until they arrive.
    let conn = connect(&uri).await?;
    let channel = conn.create_channel().await?;
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let spec = QueueSpec {
        exchange: exchange.clone(),
        ..QueueSpec::topic(&format!("{prefix}.#"))
    };
    let mut queue = AmqpQueue::open(&uri, &spec).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut arrived = Vec::new();
    while (arrived.len() as u64) < COUNT {
        assert!(
            Instant::now() < deadline,
            "replayed messages never arrived: {arrived:?}"
        );
        let (status, body) = post(admin, "/dead-letters/replay").await?;
        assert_eq!(status, 200, "{body}");
        if let Ok(got) = queue
            .take(COUNT as usize - arrived.len(), Duration::from_secs(3))
            .await
        {
            arrived.extend(got);
        }
    }
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
