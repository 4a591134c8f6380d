//! kill -9 of the gateway under load: every PUBACKed message still
//! arrives upstream after a restart on the same data directory.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use edge_tests::amqp::{AmqpQueue, QueueSpec};
use edge_tests::{Publisher, TestGateway, unique, wait_for};

use crate::{LONG, check_order_and_identity, gateway_bin, payload, shared_node};

const PUBLISHERS: u64 = 4;
/// More than can be sent before the kill: the publishers are cut mid-run.
const PLANNED: u64 = 1_000_000;
/// PUBACKs to see (over all publishers) before the kill.
const KILL_AFTER: u64 = 2_000;
const AFTER_RESTART: u64 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_message_survives_kill_9_under_load() -> anyhow::Result<()> {
    let node = shared_node().await?;
    let prefix = unique("crash");
    let mut queue =
        AmqpQueue::open(&node.amqp_uri(), &QueueSpec::topic(&format!("{prefix}.#"))).await?;
    let mut gw = TestGateway::builder()
        .upstream("central", &[node.amqp_uri()])
        .route("all", &format!("{prefix}/#"), "central")
        .spawn(gateway_bin())
        .await?;
    let addr = gw.mqtt_addr();

    let mut runs = Vec::new();
    let mut counters = Vec::new();
    for p in 0..PUBLISHERS {
        let publisher = Publisher::new(addr, &unique(&format!("p{p}")));
        counters.push(publisher.acked_counter());
        let topic = format!("{prefix}/dev{p}");
        let name = format!("p{p}");
        runs.push(tokio::spawn(async move {
            publisher
                .run(PLANNED, LONG, move |i| (topic.clone(), payload(&name, i)))
                .await
        }));
    }
    wait_for("PUBACKs under load", LONG, || {
        let total: u64 = counters.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        async move { (total >= KILL_AFTER).then_some(()) }
    })
    .await?;
    gw.kill().await?;

    let mut must_arrive = HashSet::new();
    for (p, run) in runs.into_iter().enumerate() {
        let report = run.await?;
        assert!(
            report.error.is_some(),
            "publisher p{p} finished without noticing the kill: {report:?}"
        );
        for i in report.acked {
            must_arrive.insert(payload(&format!("p{p}"), i));
        }
    }
    let acked_before = must_arrive.len();

    gw.restart().await?;
    for p in 0..PUBLISHERS {
        let name = format!("p{p}-after");
        let topic = format!("{prefix}/dev{p}");
        let n = name.clone();
        let report = Publisher::new(addr, &unique(&name))
            .run(AFTER_RESTART, LONG, move |i| {
                (topic.clone(), payload(&n, i))
            })
            .await;
        assert!(report.all_acked(AFTER_RESTART), "{report:?}");
        must_arrive.extend((0..AFTER_RESTART).map(|i| payload(&name, i)));
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
    let per_publisher = check_order_and_identity(gw.id(), &received)?;
    let duplicates = received.len() - per_publisher.values().map(Vec::len).sum::<usize>();
    eprintln!(
        "crash: {acked_before} PUBACKed before kill -9, {} received upstream, {duplicates} duplicates",
        received.len()
    );
    queue.delete().await?;
    Ok(())
}
