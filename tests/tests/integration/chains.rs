//! Gateway chains (site → region → centre): gateway A's upstream is gateway
//! B's AMQP listener, B's is RabbitMQ. MQTT QoS 1 publishes into A arrive
//! in RabbitMQ, all, in per-publisher order, under A's message ids, and a
//! kill -9 of B mid-stream loses nothing A acknowledged.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use edge_tests::amqp::{AmqpQueue, QueueSpec};
use edge_tests::http::metric;
use edge_tests::{Publisher, TestGateway, unique, wait_for};

use crate::{LONG, check_order_and_identity, gateway_bin, payload, shared_node};

const PUBLISHERS: u64 = 2;
const PER_PUBLISHER: u64 = 1_500;
/// PUBACKs from A (over all publishers) before B is killed.
const KILL_AFTER: u64 = 800;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_gateways_forwards_everything_through_a_kill_9_of_the_middle_one()
-> anyhow::Result<()> {
    let node = shared_node().await?;
    let prefix = unique("chain");
    let mut queue =
        AmqpQueue::open(&node.amqp_uri(), &QueueSpec::topic(&format!("{prefix}.#"))).await?;
    let filter = format!("{prefix}/#");
    let mut region = TestGateway::builder()
        .upstream("centre", &[node.amqp_uri()])
        .route("up", &filter, "centre")
        .spawn(gateway_bin())
        .await?;
    let site = TestGateway::builder()
        .upstream("region", &[region.amqp_uri()])
        .route("up", &filter, "region")
        .spawn(gateway_bin())
        .await?;

    let mut runs = Vec::new();
    let mut counters = Vec::new();
    for p in 0..PUBLISHERS {
        let publisher = Publisher::new(site.mqtt_addr(), &unique(&format!("p{p}")));
        counters.push(publisher.acked_counter());
        let topic = format!("{prefix}/dev{p}");
        let name = format!("p{p}");
        runs.push(tokio::spawn(async move {
            publisher
                .run(PER_PUBLISHER, LONG, move |i| {
                    (topic.clone(), payload(&name, i))
                })
                .await
        }));
    }
    wait_for("PUBACKs from the site gateway", LONG, || {
        let total: u64 = counters.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        async move { (total >= KILL_AFTER).then_some(()) }
    })
    .await?;
    // The middle gateway dies mid-stream and comes back on its data.
    region.kill().await?;
    region.restart().await?;

    let mut must_arrive = HashSet::new();
    for (p, run) in runs.into_iter().enumerate() {
        let report = run.await?;
        assert!(
            report.all_acked(PER_PUBLISHER),
            "the site gateway stopped taking publishes while the region one was down: {report:?}"
        );
        must_arrive.extend(report.acked.iter().map(|i| payload(&format!("p{p}"), *i)));
    }

    let mut missing = must_arrive.clone();
    let received = queue
        .take_until(LONG, |got| {
            if let Some(m) = got.last() {
                missing.remove(&m.body);
            }
            missing.is_empty()
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}; {} acknowledged messages missing", missing.len()))?;
    // The site's ids, end to end; duplicates only under the same id.
    let per_publisher = check_order_and_identity(site.id(), &received)?;
    for p in 0..PUBLISHERS {
        let got = per_publisher.get(&format!("p{p}")).map_or(0, Vec::len) as u64;
        assert_eq!(got, PER_PUBLISHER, "publisher p{p}");
    }
    // Confirms came back hop by hop: both backlogs drain to zero.
    for (gw, upstream) in [(&site, "region"), (&region, "centre")] {
        let label = format!("upstream=\"{upstream}\"");
        wait_for(&format!("{upstream} backlog at 0"), LONG, || async {
            let text = gw.metrics().await.ok()?;
            (metric(&text, "edge_upstream_backlog_messages", &[&label]) == Some(0.0)).then_some(())
        })
        .await?;
    }
    let duplicates = received.len() - per_publisher.values().map(Vec::len).sum::<usize>();
    eprintln!(
        "chains: {} messages through two gateways, {duplicates} duplicates after kill -9 of the middle one",
        must_arrive.len()
    );
    queue.delete().await?;
    Ok(())
}

/// A route over a local exchange: AMQP publishes to `orders` whose key
/// matches the pattern go upstream under their own routing key, keeping
/// their message_id and correlation_id; others, and MQTT publishes on the
/// same words, do not take that route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_selects_amqp_publishes_by_local_exchange_and_key_pattern() -> anyhow::Result<()> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Confirmation, ExchangeKind};

    let node = shared_node().await?;
    let prefix = unique("eu");
    let mut queue =
        AmqpQueue::open(&node.amqp_uri(), &QueueSpec::topic(&format!("{prefix}.#"))).await?;
    let exchange = unique("orders");
    let upstream = unique("centre");
    let gw = TestGateway::builder()
        .upstream(&upstream, &[node.amqp_uri()])
        .local_route("orders", &exchange, &format!("{prefix}.#"), &upstream)
        .start()
        .await?;
    let conn = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    ch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let publish = |key: String, body: &'static str, id: &'static str| {
        let ch = ch.clone();
        let exchange = exchange.clone();
        async move {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(id.into())
                .with_correlation_id(format!("corr-{id}").as_str().into());
            let confirm = ch
                .basic_publish(
                    exchange.as_str().into(),
                    key.as_str().into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    props,
                )
                .await?;
            anyhow::Ok(tokio::time::timeout(crate::SHORT, confirm).await??)
        }
    };
    // Not selected: another key, and the same words from MQTT.
    publish(format!("us.{prefix}"), "other key", "m0").await?;
    edge_tests::mqtt::publish_one(gw.mqtt_addr(), &format!("{prefix}/de"), b"from mqtt").await?;
    let confirmed = publish(format!("{prefix}.de.berlin"), "selected", "m1").await?;
    assert_eq!(confirmed, Confirmation::Ack(None));

    let got = queue.next(crate::SHORT).await?;
    assert_eq!(got.body_str(), "selected", "the first upstream: {got:?}");
    assert_eq!(
        got.routing_key,
        format!("{prefix}.de.berlin"),
        "its own key"
    );
    assert_eq!(got.message_id.as_deref(), Some("m1"));
    assert_eq!(got.correlation_id.as_deref(), Some("corr-m1"));
    // Once the upstream confirmed and nothing waits for it, it was sent
    // that one message only.
    let label = format!("upstream=\"{upstream}\"");
    let forwarded = wait_for("the backlog forwarded", crate::SHORT, || async {
        let text = gw.metrics().await.ok()?;
        let forwarded = metric(&text, "edge_messages_forwarded_total", &[&label])?;
        let backlog = metric(&text, "edge_upstream_backlog_messages", &[&label])?;
        (forwarded >= 1.0 && backlog == 0.0).then_some(Some(forwarded))
    })
    .await?;
    assert_eq!(
        forwarded,
        Some(1.0),
        "only the selected publish went upstream"
    );
    conn.close(200, "done".into()).await?;
    queue.delete().await?;
    gw.shutdown().await?;
    Ok(())
}

/// A chain through an exchange of the middle gateway: the site forwards to
/// exchange `X` declared on the region gateway (the upstream client's
/// exchange check passes against our server), and the region forwards what
/// arrives there by a route over that local exchange, under the original
/// routing key and the site's message ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_can_hand_over_through_an_exchange_of_the_middle_gateway() -> anyhow::Result<()> {
    use lapin::ExchangeKind;
    use lapin::options::ExchangeDeclareOptions;
    use lapin::types::FieldTable;

    let node = shared_node().await?;
    let prefix = unique("via");
    let mut queue =
        AmqpQueue::open(&node.amqp_uri(), &QueueSpec::topic(&format!("{prefix}.#"))).await?;
    let exchange = unique("from-sites");
    let centre = unique("centre");
    let region = TestGateway::builder()
        .upstream(&centre, &[node.amqp_uri()])
        .local_route("sites", &exchange, "#", &centre)
        .start()
        .await?;
    let conn = edge_tests::amqp::connect(&region.amqp_uri()).await?;
    let ch = conn.create_channel().await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    ch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await?;
    conn.close(200, "declared".into()).await?;
    let site = TestGateway::builder()
        .upstream("region", &[region.amqp_uri()])
        .route_with(
            "up",
            &format!("{prefix}/#"),
            "region",
            &[("exchange", &format!("{exchange:?}"))],
        )
        .start()
        .await?;

    const N: u64 = 50;
    let topic_prefix = prefix.clone();
    let report = Publisher::new(site.mqtt_addr(), &unique("p"))
        .run(N, LONG, move |i| {
            (format!("{topic_prefix}/dev/{}", i % 2), payload("p", i))
        })
        .await;
    assert!(report.all_acked(N), "{report:?}");
    let received = queue.take(N as usize, LONG).await?;
    let per_publisher = check_order_and_identity(site.id(), &received)?;
    assert_eq!(per_publisher.get("p").map(Vec::len), Some(N as usize));
    for m in &received {
        let (_, n) = crate::parse_payload(&m.body)?;
        assert_eq!(
            m.routing_key,
            format!("{prefix}.dev.{}", n % 2),
            "the site's key"
        );
    }
    queue.delete().await?;
    site.shutdown().await?;
    region.shutdown().await?;
    Ok(())
}
