//! Standard clients against the gateway: mosquitto_pub / mosquitto_sub.

use edge_tests::amqp::{AmqpQueue, QueueSpec};
use edge_tests::mqtt::{MosquittoSub, mosquitto_pub, publish_one};
use edge_tests::{MqttSubscriber, TestGateway, unique};

use crate::{SHORT, shared_node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_message_arrives_upstream() -> anyhow::Result<()> {
    let node = shared_node().await?;
    let prefix = unique("mqpub");
    let mut queue =
        AmqpQueue::open(&node.amqp_uri(), &QueueSpec::topic(&format!("{prefix}.#"))).await?;
    let gw = TestGateway::builder()
        .upstream("central", &[node.amqp_uri()])
        .route("all", &format!("{prefix}/#"), "central")
        .start()
        .await?;

    let topic = format!("{prefix}/kitchen/temp");
    mosquitto_pub(gw.mqtt_addr().port(), &topic, "21.5", 1).await?;

    let m = queue.next(SHORT).await?;
    assert_eq!(m.body_str(), "21.5");
    assert_eq!(m.routing_key, format!("{prefix}.kitchen.temp"));
    assert_eq!(m.mqtt_topic(), Some(topic.as_str()));
    queue.delete().await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_receives_what_rumqttc_publishes_by_wildcard() -> anyhow::Result<()> {
    let gw = TestGateway::builder().start().await?;
    let port = gw.mqtt_addr().port();
    let mut sub = MosquittoSub::start(port, &["home/+/temp", "garden/#"]).await?;

    for topic in [
        "home/kitchen/temp",
        "home/kitchen/hum",
        "garden/bed/1/moisture",
        "attic",
    ] {
        publish_one(gw.mqtt_addr(), topic, topic.as_bytes()).await?;
    }
    // The sentinel, published last: whatever did not arrive before it
    // was not delivered at all.
    publish_one(gw.mqtt_addr(), "garden/end", b"end").await?;

    let mut got = Vec::new();
    loop {
        let (topic, payload) = sub.recv(SHORT).await?;
        if topic == "garden/end" {
            break;
        }
        assert_eq!(topic, payload);
        got.push(topic);
    }
    assert_eq!(got, ["home/kitchen/temp", "garden/bed/1/moisture"]);
    sub.stop().await;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_subscriber_receives_mosquitto_pub() -> anyhow::Result<()> {
    let gw = TestGateway::builder().start().await?;
    let mut sub = MqttSubscriber::connect(gw.mqtt_addr(), &unique("sub"), &["plant/#"]).await?;
    mosquitto_pub(gw.mqtt_addr().port(), "plant/line1/speed", "42", 1).await?;
    let p = sub.recv(SHORT).await?;
    assert_eq!(p.topic, "plant/line1/speed");
    assert_eq!(&p.payload[..], b"42");
    drop(sub);
    gw.shutdown().await?;
    Ok(())
}
