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
