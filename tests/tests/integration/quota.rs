//! The store quota: once full, QoS 1 publishes get no PUBACK, the
//! connection is closed, and the refusal shows on /metrics.

use std::time::Duration;

use edge_tests::http::metric;
use edge_tests::mqtt::publish_one;
use edge_tests::{Publisher, TestGateway, free_port, unique, wait_for};

use crate::SHORT;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_store_refuses_publishes_and_says_so_in_metrics() -> anyhow::Result<()> {
    // An upstream nobody listens on: everything stays in the store.
    let nowhere = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port()?);
    let gw = TestGateway::builder()
        .set("store.max_bytes", "\"32KiB\"")
        .upstream("central", &[nowhere])
        .route("all", "#", "central")
        .start()
        .await?;

    const PLANNED: u64 = 1_000; // 1 MB of payload: far over the quota
    let report = Publisher::new(gw.mqtt_addr(), &unique("filler"))
        .inflight(1)
        .run(PLANNED, Duration::from_secs(30), |i| {
            ("quota/fill".to_string(), vec![b'0' + (i % 10) as u8; 1024])
        })
        .await;
    assert!(
        !report.acked.is_empty(),
        "nothing was accepted before the quota: {report:?}"
    );
    assert!(
        (report.acked.len() as u64) < PLANNED,
        "all {PLANNED} KiB-sized messages acknowledged under a 32 KiB quota"
    );
    let error = report.error.clone().unwrap_or_default();
    assert!(
        error.starts_with("connection error"),
        "the connection was not closed on a refused publish: {report:?}"
    );
    eprintln!(
        "quota: {} messages accepted, then: {error}",
        report.acked.len()
    );

    // A new publisher of the same kind of message is refused too.
    assert!(
        publish_one(gw.mqtt_addr(), "quota/more", &[b'y'; 1024])
            .await
            .is_err(),
        "a new connection got a KiB message past the full store"
    );

    let rejected = wait_for("edge_store_rejected_total on /metrics", SHORT, || async {
        let text = gw.metrics().await.ok()?;
        metric(&text, "edge_store_rejected_total", &[]).filter(|v| *v > 0.0)
    })
    .await?;
    eprintln!("quota: edge_store_rejected_total = {rejected}");
    gw.shutdown().await?;
    Ok(())
}

/// The quota counts what is not yet forwarded: once the upstream has
/// confirmed the backlog, the same gateway accepts publishes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn space_is_reused_once_the_upstream_confirms() -> anyhow::Result<()> {
    use edge_tests::amqp::{AmqpQueue, QueueSpec};

    let node = crate::shared_node().await?;
    // The gateway logs in as a user that does not exist yet: the broker
    // refuses it, so the backlog stays in the store until the user appears.
    let user = unique("edge-user");
    let uri = format!("amqp://{user}:secret@127.0.0.1:{}/%2f", node.amqp_port());
    let prefix = unique("reuse");
    let spec = QueueSpec::topic(&format!("{prefix}.#"));
    let mut queue = AmqpQueue::open(&node.amqp_uri(), &spec).await?;
    let gw = TestGateway::builder()
        .set("store.max_bytes", "\"32KiB\"")
        .upstream("reuse", std::slice::from_ref(&uri))
        .route("all", &format!("{prefix}/#"), "reuse")
        .start()
        .await?;
    let topic = format!("{prefix}/fill");
    // About 1 KiB per message: a publisher name padded out, then the counter.
    let filler = "f".repeat(1000);

    let (fill_topic, fill_name) = (topic.clone(), filler.clone());
    let report = Publisher::new(gw.mqtt_addr(), &unique("filler"))
        .inflight(1)
        .run(1_000, Duration::from_secs(30), move |i| {
            (fill_topic.clone(), crate::payload(&fill_name, i))
        })
        .await;
    let accepted = report.acked.len() as u64;
    assert!(
        accepted > 0 && accepted < 1_000,
        "the quota did not bite: {report:?}"
    );
    assert!(
        publish_one(gw.mqtt_addr(), &topic, &[b'y'; 1024])
            .await
            .is_err(),
        "a publish past the full store was acknowledged"
    );

    // The user appears: the replicator's next attempt drains the backlog.
    let ctl_user = user.clone();
    crate::blocking(move || {
        node.ctl(&["add_user", &ctl_user, "secret"])?;
        node.ctl(&["set_permissions", "-p", "/", &ctl_user, ".*", ".*", ".*"])
    })
    .await?;
    let last = crate::payload(&filler, accepted - 1);
    let drained = queue
        .take_until(crate::LONG, |got| got.iter().any(|m| m.body == last))
        .await?;
    let per_publisher = crate::check_order_and_identity(gw.id(), &drained)?;
    assert_eq!(
        per_publisher.values().map(Vec::len).sum::<usize>() as u64,
        accepted
    );

    // Confirmed means retired: the space is free for new messages.
    wait_for(
        "the store to release the confirmed backlog",
        SHORT,
        || async { (gw.store().stats().live_bytes == 0).then_some(()) },
    )
    .await?;
    let again = format!("{prefix}/again");
    publish_one(gw.mqtt_addr(), &again, &[b'z'; 1024]).await?;
    let arrived = queue
        .take_until(SHORT, |got| {
            got.iter().any(|m| m.mqtt_topic() == Some(again.as_str()))
        })
        .await?;
    assert!(!arrived.is_empty());
    queue.delete().await?;
    gw.shutdown().await?;
    crate::blocking(move || node.ctl(&["delete_user", &user])).await
}

/// `when_full = "drop-oldest"`: devices are never refused; the oldest
/// messages make room, and the metric says how many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_keeps_accepting_and_counts_what_it_drops() -> anyhow::Result<()> {
    // An upstream that is never reachable keeps the records (nothing
    // forwards them): the quota fills.
    let gw = TestGateway::builder()
        .set("store.max_bytes", "\"32KiB\"")
        .set("store.when_full", "\"drop-oldest\"")
        .upstream(
            "unreachable",
            &["amqp://guest:guest@127.0.0.1:1/%2f".to_string()],
        )
        .route("drop", "drop/#", "unreachable")
        .start()
        .await?;
    const COUNT: u64 = 200; // ~200 KiB through a 32 KiB store
    let report = Publisher::new(gw.mqtt_addr(), &unique("newest"))
        .run(COUNT, Duration::from_secs(60), |i| {
            ("drop/oldest".to_string(), vec![b'0' + (i % 10) as u8; 1024])
        })
        .await;
    assert!(report.all_acked(COUNT), "a publish was refused: {report:?}");
    let stats = gw.store().stats();
    assert!(stats.live_bytes <= 32 * 1024, "{stats:?}");
    assert_eq!(
        stats.next_seq - stats.first_seq,
        stats.live_messages,
        "the newest are kept, contiguous"
    );
    let dropped = wait_for("the drop_oldest counter on /metrics", SHORT, || async {
        let text = gw.metrics().await.ok()?;
        metric(
            &text,
            "edge_messages_dropped_total",
            &["reason=\"drop_oldest\""],
        )
        .filter(|v| *v > 0.0)
    })
    .await?;
    assert!(
        dropped >= (COUNT - stats.live_messages) as f64,
        "dropped {dropped}, kept {}",
        stats.live_messages
    );
    gw.shutdown().await?;
    Ok(())
}
