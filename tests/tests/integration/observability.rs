//! `/healthz` and `/metrics` answer and show what the gateway did.

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
