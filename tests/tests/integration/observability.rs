//! `/healthz` and `/metrics` answer and show what the gateway did.

use anyhow::Context;
use edge_tests::amqp::{AmqpQueue, QueueSpec};
use edge_tests::http::{get, metric};
use edge_tests::mqtt::publish_one;
use edge_tests::{TestGateway, unique, wait_for};

use crate::{SHORT, shared_node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_metrics_answer() -> anyhow::Result<()> {
    let node = shared_node().await?;
    let prefix = unique("obs");
    let mut queue =
        AmqpQueue::open(&node.amqp_uri(), &QueueSpec::topic(&format!("{prefix}.#"))).await?;
    // Metrics are process-wide and other in-process gateways report on
    // their upstreams too: a name of our own keeps this series ours.
    let upstream = unique("central");
    let gw = TestGateway::builder()
        .upstream(&upstream, &[node.amqp_uri()])
        .route("all", &format!("{prefix}/#"), &upstream)
        .start()
        .await?;
    let metrics_addr = gw.metrics_addr().expect("metrics are enabled");

    let (status, _) = get(metrics_addr, "/healthz").await?;
    assert_eq!(status, 200);

    publish_one(gw.mqtt_addr(), &format!("{prefix}/probe"), b"1").await?;
    queue.next(SHORT).await?;

    let wanted = [
        "edge_store_commit_seconds",
        "edge_store_batch_size",
        "edge_messages_in_total",
        "edge_messages_forwarded_total",
        "edge_upstream_link_up",
        "edge_connections",
    ];
    let missing = |text: &str| -> Vec<&str> {
        wanted
            .iter()
            .copied()
            .filter(|name| metric(text, name, &[]).is_none() && !has_histogram(text, name))
            .collect()
    };
    let found = wait_for("every wanted metric on /metrics", SHORT, || async {
        let text = gw.metrics().await.ok()?;
        missing(&text).is_empty().then_some(text)
    })
    .await;
    let text = match found {
        Ok(text) => text,
        Err(e) => {
            let text = gw.metrics().await?;
            anyhow::bail!("{e:#}; missing {:?} in:\n{text}", missing(&text));
        }
    };
    assert!(metric(&text, "edge_messages_in_total", &[]).unwrap_or(0.0) >= 1.0);
    assert_eq!(
        metric(
            &text,
            "edge_upstream_link_up",
            &[&format!("upstream=\"{upstream}\"")]
        )
        .map(|v| v > 0.0),
        Some(true),
        "link not reported up"
    );

    let (status, _) = get(metrics_addr, "/nope").await?;
    assert_eq!(status, 404);
    queue.delete().await?;
    gw.shutdown().await?;
    Ok(())
}

fn has_histogram(text: &str, name: &str) -> bool {
    ["_bucket", "_count", "_sum"]
        .iter()
        .any(|suffix| metric(text, &format!("{name}{suffix}"), &[]).is_some())
        || text
            .lines()
            .any(|l| l.starts_with(&format!("{name}{{quantile")))
}

/// AMQP on `/metrics` and `/healthz`, in a gateway process of its own (so
/// the gauges are this test's alone): connections, channels, a queue's
/// ready and unacked depth and consumers, confirms, a channel exception by
/// reply code, messages in and out; then everything back to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_traffic_shows_on_metrics_and_healthz() -> anyhow::Result<()> {
    use futures::StreamExt;
    use lapin::options::{
        BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
        QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Confirmation};

    let gw = TestGateway::builder().spawn(crate::gateway_bin()).await?;
    let queue = unique("obs-amqp");
    let conn = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    publisher
        .queue_declare(queue.as_str().into(), durable, FieldTable::default())
        .await?;
    for i in 0..5 {
        let confirm = publisher
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        assert_eq!(
            tokio::time::timeout(SHORT, confirm).await??,
            Confirmation::Ack(None)
        );
    }
    let consumer_channel = conn.create_channel().await?;
    consumer_channel
        .basic_qos(2, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "obs".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    for _ in 0..2 {
        tokio::time::timeout(SHORT, consumer.next())
            .await?
            .context("consumer ended")??;
    }
    // A channel exception: NOT_FOUND, closing that channel only.
    let doomed = conn.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    assert!(
        doomed
            .queue_declare(
                unique("missing").as_str().into(),
                passive,
                FieldTable::default()
            )
            .await
            .is_err()
    );

    let q = format!("queue=\"{queue}\"");
    let want: Vec<(&str, Vec<&str>, f64)> = vec![
        ("edge_connections", vec!["protocol=\"amqp\""], 1.0),
        ("edge_amqp_channels", vec![], 2.0),
        ("edge_amqp_queues", vec![], 1.0),
        ("edge_amqp_queue_messages", vec![&q, "state=\"ready\""], 3.0),
        (
            "edge_amqp_queue_messages",
            vec![&q, "state=\"unacked\""],
            2.0,
        ),
        ("edge_amqp_queue_consumers", vec![&q], 1.0),
        ("edge_amqp_queue_bytes", vec![&q], 10.0),
        ("edge_amqp_confirms_total", vec!["result=\"ack\""], 5.0),
        ("edge_amqp_confirms_total", vec!["result=\"nack\""], 0.0),
        (
            "edge_amqp_exceptions_total",
            vec!["scope=\"channel\"", "code=\"NOT_FOUND\""],
            1.0,
        ),
        (
            "edge_amqp_exceptions_total",
            vec!["scope=\"connection\""],
            0.0,
        ),
        ("edge_messages_in_total", vec!["protocol=\"amqp\""], 5.0),
        ("edge_messages_out_total", vec!["protocol=\"amqp\""], 2.0),
    ];
    let wrong = |text: &str| -> Vec<String> {
        want.iter()
            .filter_map(|(name, labels, value)| {
                let got = metric(text, name, labels);
                (got != Some(*value)).then(|| format!("{name}{labels:?} = {got:?}, want {value}"))
            })
            .collect()
    };
    let settled = wait_for("the AMQP figures on /metrics", SHORT, || async {
        let text = gw.metrics().await.ok()?;
        wrong(&text).is_empty().then_some(())
    })
    .await;
    if let Err(e) = settled {
        let text = gw.metrics().await?;
        anyhow::bail!("{e:#}: {:?}", wrong(&text));
    }
    let (status, health) = get(gw.metrics_addr(), "/healthz").await?;
    assert_eq!(status, 200);
    let line = format!("amqp {}: 1 connection(s)", gw.amqp_addr());
    assert!(
        health.lines().any(|l| l == line),
        "{line:?} not in {health}"
    );

    conn.close(200, "done".into()).await?;
    wait_for("the AMQP gauges back at zero", SHORT, || async {
        let text = gw.metrics().await.ok()?;
        let zero = |name: &str, labels: &[&str]| metric(&text, name, labels) == Some(0.0);
        (zero("edge_connections", &["protocol=\"amqp\""])
            && zero("edge_amqp_channels", &[])
            && zero("edge_amqp_queue_messages", &[&q, "state=\"unacked\""])
            && zero("edge_amqp_queue_consumers", &[&q])
            && metric(&text, "edge_amqp_queue_messages", &[&q, "state=\"ready\""]) == Some(5.0))
        .then_some(())
    })
    .await?;
    let (_, health) = get(gw.metrics_addr(), "/healthz").await?;
    let line = format!("amqp {}: 0 connection(s)", gw.amqp_addr());
    assert!(
        health.lines().any(|l| l == line),
        "{line:?} not in {health}"
    );
    Ok(())
}
