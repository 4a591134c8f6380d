//! Forwarding upstream: completeness, order, identity and properties.

use std::collections::HashSet;
use std::time::Instant;

use edge_tests::amqp::{AmqpQueue, QueueSpec};
use edge_tests::mqtt::publish_one;
use edge_tests::{Publisher, TestGateway, unique};

use crate::{LONG, SHORT, check_order_and_identity, message_seq, payload, shared_node};

const PUBLISHERS: u64 = 4;
const PER_PUBLISHER: u64 = 2_500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_qos1_messages_arrive_complete_in_order_with_identity() -> anyhow::Result<()> {
    let node = shared_node().await?;
    let prefix = unique("fwd");
    let mut queue =
        AmqpQueue::open(&node.amqp_uri(), &QueueSpec::topic(&format!("{prefix}.#"))).await?;
    let gw = TestGateway::builder()
        .upstream("central", &[node.amqp_uri()])
        .route("telemetry", &format!("{prefix}/#"), "central")
        .start()
        .await?;
    let addr = gw.mqtt_addr();

    let started = Instant::now();
    let mut runs = Vec::new();
    for p in 0..PUBLISHERS {
        let prefix = prefix.clone();
        let name = format!("p{p}");
        runs.push(tokio::spawn(async move {
            Publisher::new(addr, &unique(&name))
                .run(PER_PUBLISHER, LONG, move |i| {
                    (format!("{prefix}/dev{p}/data"), payload(&name, i))
                })
                .await
        }));
    }
    for run in runs {
        let report = run.await?;
        assert!(
            report.all_acked(PER_PUBLISHER),
            "publisher stopped: {report:?}"
        );
    }
    let acked_in = started.elapsed();

    let total = (PUBLISHERS * PER_PUBLISHER) as usize;
    let received = queue.take(total, LONG).await?;
    let elapsed = started.elapsed();
    eprintln!(
        "forward: {total} messages PUBACKed in {acked_in:.2?}, all upstream in {elapsed:.2?} ({:.0} msg/s)",
        total as f64 / elapsed.as_secs_f64()
    );

    let per_publisher = check_order_and_identity(gw.id(), &received)?;
    for p in 0..PUBLISHERS {
        let counters = &per_publisher[&format!("p{p}")];
        assert_eq!(
            counters,
            &(0..PER_PUBLISHER).collect::<Vec<_>>(),
            "publisher p{p} lost or duplicated messages"
        );
    }
    let mut seqs = HashSet::new();
    for m in &received {
        let (publisher, _) = crate::parse_payload(&m.body)?;
        let p = publisher.trim_start_matches('p');
        let topic = format!("{prefix}/dev{p}/data");
        assert_eq!(
            m.mqtt_topic(),
            Some(topic.as_str()),
            "x-mqtt-topic of {m:?}"
        );
        assert_eq!(m.routing_key, format!("{prefix}.dev{p}.data"));
        assert_eq!(m.exchange, "amq.topic");
        assert_eq!(m.app_id.as_deref(), Some(gw.id()), "app_id of {m:?}");
        assert_eq!(m.delivery_mode, Some(2), "delivery mode of {m:?}");
        assert!(seqs.insert(message_seq(gw.id(), m)?), "duplicate {m:?}");
    }
    queue.delete().await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_with_dots_travel_escaped_and_come_back_in_the_header() -> anyhow::Result<()> {
    let node = shared_node().await?;
    let group = unique("sp");
    let mut queue = AmqpQueue::open(
        &node.amqp_uri(),
        &QueueSpec::topic(&format!("spBv1%2E0.{group}.#")),
    )
    .await?;
    let gw = TestGateway::builder()
        .upstream("central", &[node.amqp_uri()])
        .route("sparkplug", &format!("spBv1.0/{group}/#"), "central")
        .start()
        .await?;
    let topic = format!("spBv1.0/{group}/NDATA/node1");
    publish_one(gw.mqtt_addr(), &topic, b"metrics").await?;

    let m = queue.next(SHORT).await?;
    assert_eq!(m.routing_key, format!("spBv1%2E0.{group}.NDATA.node1"));
    assert_eq!(m.mqtt_topic(), Some(topic.as_str()));
    assert_eq!(m.body, b"metrics");
    queue.delete().await?;
    gw.shutdown().await?;
    Ok(())
}

/// The upstream's password can live in a file of its own (a secret mounted
/// by systemd or a container runtime), not in the config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_password_can_come_from_a_file() -> anyhow::Result<()> {
    let node = shared_node().await?;
    let prefix = unique("pwfile");
    let mut queue =
        AmqpQueue::open(&node.amqp_uri(), &QueueSpec::topic(&format!("{prefix}.#"))).await?;
    let secrets = tempfile::tempdir()?;
    let file = secrets.path().join("central.password");
    std::fs::write(&file, "guest\n")?;
    let uri = format!("amqp://guest@127.0.0.1:{}/%2f", node.amqp_port());
    let gw = TestGateway::builder()
        .upstream_with(
            "central",
            &[uri],
            &[(
                "password_file",
                &format!("{:?}", file.display().to_string()),
            )],
        )
        .route("all", &format!("{prefix}/#"), "central")
        .start()
        .await?;
    publish_one(
        gw.mqtt_addr(),
        &format!("{prefix}/x"),
        b"secret-less config",
    )
    .await?;
    assert_eq!(queue.next(SHORT).await?.body_str(), "secret-less config");
    gw.shutdown().await?;
    Ok(())
}
