//! The harness on its own: private RabbitMQ nodes and the AMQP helpers.

use edge_tests::amqp::{AmqpQueue, QueueSpec, publish_once};
use edge_tests::{RabbitNode, unique};

use crate::{LONG, SHORT, blocking, shared_node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_node_round_trips_a_message() -> anyhow::Result<()> {
    let node = shared_node().await?;
    let prefix = unique("harness");
    let mut queue =
        AmqpQueue::open(&node.amqp_uri(), &QueueSpec::topic(&format!("{prefix}.#"))).await?;
    queue
        .publish_confirmed("amq.topic", &format!("{prefix}.hello"), b"one")
        .await?;
    let m = queue.next(SHORT).await?;
    assert_eq!(m.body, b"one");
    assert_eq!(m.routing_key, format!("{prefix}.hello"));
    assert_eq!(m.delivery_mode, Some(2));
    queue.delete().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_node_keeps_durable_messages_across_kill_and_restart() -> anyhow::Result<()> {
    let mut node = blocking(|| RabbitNode::dedicated("harness")).await?;
    let uri = node.amqp_uri();
    let spec = QueueSpec::topic("harness.#").durable();
    AmqpQueue::declare(&uri, &spec).await?;
    publish_once(&uri, "amq.topic", "harness.kept", b"persistent").await?;

    let mut node = blocking(move || node.kill().map(|()| node)).await?;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", node.amqp_port()))
            .await
            .is_err(),
        "killed node still accepts connections"
    );
    node = blocking(move || node.start_again().map(|()| node)).await?;

    let mut queue = AmqpQueue::open(&uri, &spec).await?;
    let m = queue.next(LONG).await?;
    assert_eq!(m.body, b"persistent");
    queue.delete().await?;
    blocking(move || node.stop()).await
}
