//! Store and forward across a link cut: the broker stops, devices keep
//! publishing, the backlog drains by itself when the broker is back.

use edge_tests::amqp::{AmqpQueue, QueueSpec};
use edge_tests::{Publisher, RabbitNode, TestGateway, unique};

use crate::{LONG, SHORT, blocking, check_order_and_identity, payload};

const BEFORE: u64 = 10;
const DURING: u64 = 500;
const AFTER: u64 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_built_while_broker_is_down_drains_in_order_when_it_returns() -> anyhow::Result<()>
{
    let mut node = blocking(|| RabbitNode::dedicated("link")).await?;
    let uri = node.amqp_uri();
    let prefix = unique("link");
    let spec = QueueSpec::topic(&format!("{prefix}.#")).durable();
    let mut queue = AmqpQueue::open(&uri, &spec).await?;
    let gw = TestGateway::builder()
        .upstream("central", std::slice::from_ref(&uri))
        .route("all", &format!("{prefix}/#"), "central")
        .start()
        .await?;
    let addr = gw.mqtt_addr();
    let topic = format!("{prefix}/meter/1");
    let publish = |from: u64, count: u64| {
        let topic = topic.clone();
        async move {
            Publisher::new(addr, &unique("meter"))
                .run(count, LONG, move |i| {
                    (topic.clone(), payload("meter", from + i))
                })
                .await
        }
    };

    // Link up: live traffic flows.
    let report = publish(0, BEFORE).await;
    assert!(report.all_acked(BEFORE), "{report:?}");
    let mut received = queue.take(BEFORE as usize, SHORT).await?;
    drop(queue);

    // Link down: PUBACKs still come, from the local store.
    node = blocking(move || node.stop().map(|()| node)).await?;
    let report = publish(BEFORE, DURING).await;
    assert!(
        report.all_acked(DURING),
        "publishes while the broker is down were not all acknowledged: {report:?}"
    );

    // Link back: the backlog drains without any new traffic.
    node = blocking(move || node.start_again().map(|()| node)).await?;
    let mut queue = AmqpQueue::open(&uri, &spec).await?;
    let gw_id = gw.id().to_string();
    let backlog = queue
        .take_until(LONG, |got| {
            got.iter()
                .any(|m| m.body == payload("meter", BEFORE + DURING - 1))
        })
        .await?;
    received.extend(backlog);

    // Then live traffic follows the backlog.
    let report = publish(BEFORE + DURING, AFTER).await;
    assert!(report.all_acked(AFTER), "{report:?}");
    let last = BEFORE + DURING + AFTER - 1;
    let live = queue
        .take_until(SHORT, |got| {
            got.iter().any(|m| m.body == payload("meter", last))
        })
        .await?;
    received.extend(live);

    let per_publisher = check_order_and_identity(&gw_id, &received)?;
    assert_eq!(
        per_publisher["meter"],
        (0..=last).collect::<Vec<_>>(),
        "messages lost across the link cut"
    );
    queue.delete().await?;
    gw.shutdown().await?;
    blocking(move || node.stop()).await
}
