//! The AMQP listener with lapin as the client: login, confirms after the
//! commit, manual acks and requeues, get, mandatory returns, error codes,
//! durable definitions across restarts and kill -9, and AMQP ↔ MQTT on
//! `amq.topic`.

use anyhow::{Context, Result, anyhow, bail};
use edge_tests::amqp::connect;
use edge_tests::{MqttSubscriber, TestGateway, unique};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::{LONG, SHORT};

/// A connection and a channel in confirm mode.
async fn open(uri: &str) -> Result<(Connection, Channel)> {
    let conn = connect(uri).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((conn, channel))
}

async fn declare(channel: &Channel, name: &str, durable: bool) -> Result<()> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring {name}"))?;
    Ok(())
}

async fn declare_exchange(
    channel: &Channel,
    name: &str,
    kind: ExchangeKind,
    durable: bool,
) -> lapin::Result<()> {
    channel
        .exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                durable,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) -> Result<()> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("binding {queue} to {exchange} with {key}"))
}

/// Publishes persistent messages and waits for every confirm; returns
/// whether each was acked.
async fn publish(
    channel: &Channel,
    exchange: &str,
    key: &str,
    bodies: &[String],
    mandatory: bool,
) -> Result<Vec<lapin::Confirmation>> {
    let mut confirms = Vec::new();
    for body in bodies {
        let confirm = channel
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions {
                    mandatory,
                    ..BasicPublishOptions::default()
                },
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        confirms.push(confirm);
    }
    let mut out = Vec::new();
    for confirm in confirms {
        out.push(
            tokio::time::timeout(SHORT, confirm)
                .await
                .map_err(|_| anyhow!("no publisher confirm within {SHORT:?}"))??,
        );
    }
    Ok(out)
}

/// A passive declare's message count.
async fn message_count(channel: &Channel, queue: &str) -> Result<u32> {
    let ok = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(ok.message_count())
}

fn bodies(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

async fn next(consumer: &mut lapin::Consumer) -> Result<lapin::message::Delivery> {
    match tokio::time::timeout(SHORT, consumer.next()).await {
        Err(_) => bail!("no delivery within {SHORT:?}"),
        Ok(None) => bail!("consumer ended"),
        Ok(Some(d)) => Ok(d?),
    }
}

async fn consume(channel: &Channel, queue: &str, no_ack: bool) -> Result<lapin::Consumer> {
    Ok(channel
        .basic_consume(
            queue.into(),
            unique("ctag").as_str().into(),
            BasicConsumeOptions {
                no_ack,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_with_access_refused() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let uri = format!("amqp://guest:nope@{}/%2f", gw.amqp_addr());
    let err = tokio::time::timeout(
        SHORT,
        Connection::connect(&uri, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| anyhow!("connect did not finish"))?
    .expect_err("wrong password");
    let text = format!("{err:?}");
    assert!(
        text.contains("403") || text.contains("ACCESS_REFUSED"),
        "{text}"
    );
    let unknown_vhost = format!("amqp://guest:guest@{}/other", gw.amqp_addr());
    let err = tokio::time::timeout(
        SHORT,
        Connection::connect(&unknown_vhost, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| anyhow!("connect did not finish"))?
    .expect_err("unknown vhost");
    assert!(format!("{err:?}").contains("NOT_ALLOWED"), "{err:?}");
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_publishes_are_consumed_with_manual_acks_and_requeues() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let (conn, channel) = open(&gw.amqp_uri()).await?;
    let queue = unique("orders");
    declare(&channel, &queue, true).await?;
    let sent = bodies("m", 20);
    let confirms = publish(&channel, "", &queue, &sent, false).await?;
    assert!(confirms.iter().all(|c| c.is_ack()), "{confirms:?}");
    // Acknowledged means committed: the store has them.
    assert!(gw.store().stats().live_messages >= 20);

    let consumer_channel = conn.create_channel().await?;
    consumer_channel
        .basic_qos(1, BasicQosOptions::default())
        .await?;
    let mut consumer = consume(&consumer_channel, &queue, false).await?;
    let first = next(&mut consumer).await?;
    assert_eq!(first.data, b"m-0");
    assert!(!first.redelivered);
    // Requeued: it comes back, first, marked redelivered.
    first
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await?;
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let d = next(&mut consumer).await?;
        if got.is_empty() {
            assert!(d.redelivered, "a requeued delivery is marked redelivered");
        }
        got.push(String::from_utf8(d.data.clone())?);
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    assert_eq!(got, sent, "in order, each once");
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_mandatory_returns_and_exchange_kinds() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let (conn, channel) = open(&gw.amqp_uri()).await?;
    let q = unique("getq");
    declare(&channel, &q, false).await?;
    assert!(
        channel
            .basic_get(q.as_str().into(), BasicGetOptions::default())
            .await?
            .is_none(),
        "get-empty"
    );
    publish(&channel, "", &q, &bodies("g", 2), false).await?;
    let m = channel
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await?
        .context("get-ok")?;
    assert_eq!(m.delivery.data, b"g-0");
    assert_eq!(m.message_count, 1);

    // Nothing bound: a mandatory publish comes back with 312, still acked.
    let confirms = publish(&channel, "amq.direct", "nowhere", &bodies("r", 1), true).await?;
    let returned = confirms
        .into_iter()
        .next()
        .and_then(|c| c.take_message())
        .context("a returned message")?;
    assert_eq!(returned.reply_code, 312);
    assert_eq!(returned.delivery.data, b"r-0");

    // Fanout, direct and topic exchanges of our own.
    for (kind, key, binding, hit) in [
        (ExchangeKind::Fanout, "any", "ignored", true),
        (ExchangeKind::Direct, "a.b", "a.b", true),
        (ExchangeKind::Direct, "a.b", "a.c", false),
        (ExchangeKind::Topic, "a.b.c", "a.*.c", true),
        (ExchangeKind::Topic, "a.b.c", "a.#", true),
        (ExchangeKind::Topic, "a.b.c", "b.#", false),
    ] {
        let x = unique("x");
        declare_exchange(&channel, &x, kind.clone(), false).await?;
        let bound = unique("bq");
        declare(&channel, &bound, false).await?;
        bind(&channel, &bound, &x, binding).await?;
        publish(&channel, &x, key, &bodies("k", 1), false).await?;
        let got = channel
            .basic_get(bound.as_str().into(), BasicGetOptions { no_ack: true })
            .await?;
        assert_eq!(got.is_some(), hit, "{kind:?} {key} bound by {binding}");
        if let Some(m) = got {
            assert_eq!(m.delivery.exchange.as_str(), x);
            assert_eq!(m.delivery.routing_key.as_str(), key);
        }
    }
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

/// The channel exception a failing declaration closes its channel with.
async fn refused(result: lapin::Result<()>) -> String {
    match result {
        Ok(()) => "accepted".to_string(),
        Err(e) => format!("{e:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declarations_fail_with_rabbitmq_codes() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let conn = connect(&gw.amqp_uri()).await?;

    let ch = conn.create_channel().await?;
    let passive = ch
        .queue_declare(
            "no-such-queue".into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|_| ());
    let text = refused(passive).await;
    assert!(text.contains("404") || text.contains("NOT_FOUND"), "{text}");

    let ch = conn.create_channel().await?;
    let reserved = declare_exchange(&ch, "amq.mine", ExchangeKind::Direct, false).await;
    let text = refused(reserved).await;
    assert!(
        text.contains("403") || text.contains("ACCESS_REFUSED"),
        "{text}"
    );

    let ch = conn.create_channel().await?;
    let x = unique("ex");
    declare_exchange(&ch, &x, ExchangeKind::Direct, false).await?;
    let again = declare_exchange(&ch, &x, ExchangeKind::Fanout, false).await;
    let text = refused(again).await;
    assert!(
        text.contains("406") || text.contains("PRECONDITION_FAILED"),
        "{text}"
    );
    // The connection survived its channels' exceptions.
    let ch = conn.create_channel().await?;
    declare(&ch, &unique("still"), false).await?;
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_exchanges_queues_and_bindings_survive_a_restart() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let (conn, channel) = open(&gw.amqp_uri()).await?;
    let x = unique("dx");
    let q = unique("dq");
    declare_exchange(&channel, &x, ExchangeKind::Topic, true).await?;
    declare(&channel, &q, true).await?;
    bind(&channel, &q, &x, "site.*.temp").await?;
    publish(&channel, &x, "site.a.temp", &bodies("before", 1), false).await?;
    conn.close(200, "bye".into()).await?;
    let root = gw.shutdown().await?;
    let gw = TestGateway::builder().root(root).start().await?;
    let (conn, channel) = open(&gw.amqp_uri()).await?;
    let confirms = publish(&channel, &x, "site.b.temp", &bodies("after", 1), true).await?;
    assert!(
        confirms
            .iter()
            .all(|c| matches!(c, lapin::Confirmation::Ack(None))),
        "routed through the restored binding: {confirms:?}"
    );
    let mut consumer = consume(&channel, &q, false).await?;
    for want in ["before-0", "after-0"] {
        let d = next(&mut consumer).await?;
        assert_eq!(d.data, want.as_bytes());
        assert_eq!(d.exchange.as_str(), x);
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_persistent_messages_in_a_durable_queue_survive_kill_9() -> Result<()> {
    let mut gw = TestGateway::builder().spawn(crate::gateway_bin()).await?;
    let q = unique("killq");
    let sent = bodies("k", 50);
    {
        let (conn, channel) = open(&gw.amqp_uri()).await?;
        declare(&channel, &q, true).await?;
        let confirms = publish(&channel, "", &q, &sent, false).await?;
        assert!(confirms.iter().all(|c| c.is_ack()));
        // Take and acknowledge the first ten; leave ten more unacknowledged.
        let mut consumer = consume(&channel, &q, false).await?;
        for want in &sent[..20] {
            let d = next(&mut consumer).await?;
            assert_eq!(d.data, want.as_bytes());
            if d.delivery_tag <= 10 {
                d.acker.ack(BasicAckOptions::default()).await?;
            }
        }
        // The acks are on the wire; a get on another channel waits for
        // the connection to have processed them (frames are in order).
        let probe = conn.create_channel().await?;
        message_count(&probe, &q).await?;
        gw.kill().await?;
    }
    gw.restart().await?;
    let (conn, channel) = open(&gw.amqp_uri()).await?;
    let mut consumer = consume(&channel, &q, false).await?;
    let mut got = Vec::new();
    while got.last() != sent.last() {
        let d = next(&mut consumer).await?;
        got.push(String::from_utf8(d.data.clone())?);
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    // Acks reach the store in the background: the first ten may come again.
    let tail: Vec<&String> = got.iter().filter(|b| !sent[..10].contains(b)).collect();
    assert_eq!(
        tail,
        sent[10..].iter().collect::<Vec<_>>(),
        "every unacknowledged message, in order"
    );
    conn.close(200, "bye".into()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_and_mqtt_meet_on_amq_topic() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let prefix = unique("plant");
    let (conn, channel) = open(&gw.amqp_uri()).await?;

    // MQTT publish → AMQP queue bound to amq.topic.
    let q = unique("fromMqtt");
    declare(&channel, &q, true).await?;
    bind(&channel, &q, "amq.topic", &format!("{prefix}.*.temp")).await?;
    let topic = format!("{prefix}/line1/temp");
    edge_tests::mqtt::publish_one(gw.mqtt_addr(), &topic, b"21.5").await?;
    let mut consumer = consume(&channel, &q, false).await?;
    let d = next(&mut consumer).await?;
    assert_eq!(d.data, b"21.5");
    assert_eq!(d.exchange.as_str(), "amq.topic");
    assert_eq!(d.routing_key.as_str(), format!("{prefix}.line1.temp"));
    assert_eq!(
        *d.properties.delivery_mode(),
        Some(2),
        "QoS 1 is persistent"
    );
    d.acker.ack(BasicAckOptions::default()).await?;

    // AMQP publish to amq.topic → MQTT subscriber, dots in a level kept.
    let mut sub =
        MqttSubscriber::connect(gw.mqtt_addr(), &unique("sub"), &[&format!("{prefix}/#")]).await?;
    let key = format!("{prefix}.spBv1%2E0.cmd");
    publish(&channel, "amq.topic", &key, &bodies("cmd", 1), true).await?;
    let p = sub.recv(LONG).await?;
    assert_eq!(p.topic, format!("{prefix}/spBv1.0/cmd"));
    assert_eq!(&p.payload[..], b"cmd-0");
    assert_eq!(p.qos, rumqttc::QoS::AtLeastOnce, "persistent is QoS 1");

    // A direct exchange's traffic never reaches an MQTT `#` subscriber.
    let mut all = MqttSubscriber::connect(gw.mqtt_addr(), &unique("all"), &["#"]).await?;
    publish(&channel, "", &q, &bodies("private", 1), false).await?;
    let d = next(&mut consumer).await?;
    assert_eq!(d.data, b"private-0");
    publish(&channel, "amq.topic", &key, &bodies("public", 1), false).await?;
    let p = all.recv(SHORT).await?;
    assert_eq!(
        &p.payload[..],
        b"public-0",
        "the queue's message did not come first"
    );
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_content_property_is_kept() -> Result<()> {
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let gw = TestGateway::builder().start().await?;
    let (conn, channel) = open(&gw.amqp_uri()).await?;
    let q = unique("props");
    declare(&channel, &q, true).await?;
    let mut headers = FieldTable::default();
    headers.insert(
        "site".into(),
        AMQPValue::LongString(LongString::from("north")),
    );
    headers.insert("count".into(), AMQPValue::LongInt(7));
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(5)
        .with_correlation_id("req-1".into())
        .with_reply_to("replies".into())
        .with_expiration("600000".into())
        .with_message_id("m-1".into())
        .with_timestamp(1_700_000_000)
        .with_type("reading".into())
        .with_user_id("guest".into())
        .with_app_id("historian".into());
    let confirm = channel
        .basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            b"{}",
            properties,
        )
        .await?
        .await?;
    assert!(confirm.is_ack());
    let m = channel
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await?
        .context("get-ok")?;
    let p = &m.delivery.properties;
    let text = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| s.as_str().to_string());
    assert_eq!(text(p.content_type()).as_deref(), Some("application/json"));
    assert_eq!(text(p.content_encoding()).as_deref(), Some("gzip"));
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(*p.priority(), Some(5));
    assert_eq!(text(p.correlation_id()).as_deref(), Some("req-1"));
    assert_eq!(text(p.reply_to()).as_deref(), Some("replies"));
    let left: u64 = text(p.expiration()).context("expiration")?.parse()?;
    assert!(left > 590_000 && left <= 600_000, "what is left: {left}");
    assert_eq!(text(p.message_id()).as_deref(), Some("m-1"));
    assert_eq!(*p.timestamp(), Some(1_700_000_000));
    assert_eq!(text(p.kind()).as_deref(), Some("reading"));
    assert_eq!(text(p.user_id()).as_deref(), Some("guest"));
    assert_eq!(text(p.app_id()).as_deref(), Some("historian"));
    let h = p.headers().as_ref().context("headers")?;
    assert_eq!(
        h.inner().get("site"),
        Some(&AMQPValue::LongString(LongString::from("north")))
    );
    assert!(
        matches!(
            h.inner().get("count"),
            Some(AMQPValue::LongLongInt(7) | AMQPValue::LongInt(7))
        ),
        "{h:?}"
    );
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_queues_are_locked_and_go_with_their_connection_and_consumers_are_cancelled()
-> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let owner = connect(&gw.amqp_uri()).await?;
    let ch = owner.create_channel().await?;
    let q = unique("excl");
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    let other = connect(&gw.amqp_uri()).await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let locked = other
        .create_channel()
        .await?
        .queue_declare(q.as_str().into(), passive, FieldTable::default())
        .await;
    let text = format!("{locked:?}");
    assert!(
        text.contains("RESOURCE_LOCKED") || text.contains("405"),
        "{text}"
    );
    owner.close(200, "bye".into()).await?;
    edge_tests::wait_for("the exclusive queue to go", SHORT, || {
        let (other, q) = (&other, q.clone());
        async move {
            let r = other
                .create_channel()
                .await
                .ok()?
                .queue_declare(q.as_str().into(), passive, FieldTable::default())
                .await;
            let text = format!("{r:?}");
            (text.contains("NOT_FOUND") || text.contains("404")).then_some(text)
        }
    })
    .await?;

    // A consumer whose queue is deleted by someone else is cancelled.
    let q = unique("deleted");
    let ch = other.create_channel().await?;
    declare(&ch, &q, false).await?;
    let mut consumer = consume(&ch, &q, false).await?;
    let deleter = other.create_channel().await?;
    deleter
        .queue_delete(
            q.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await?;
    let ended = tokio::time::timeout(SHORT, consumer.next())
        .await
        .map_err(|_| anyhow!("the consumer was not cancelled"))?;
    assert!(ended.is_none(), "{ended:?}");
    other.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_nacks_confirmed_publishes() -> Result<()> {
    let gw = TestGateway::builder()
        .set("store.max_bytes", "\"32KiB\"")
        .start()
        .await?;
    let (conn, channel) = open(&gw.amqp_uri()).await?;
    let q = unique("full");
    declare(&channel, &q, true).await?;
    // One at a time, each awaiting its confirm, until the first nack:
    // lapin announces connection.blocked and, once told, writes nothing
    // more (RabbitMQ's flow), so nothing is left half-sent.
    let body = "x".repeat(1024);
    let mut sent = Vec::new();
    let acked = loop {
        let m = format!("{:03}{body}", sent.len());
        let confirm = publish(&channel, "", &q, std::slice::from_ref(&m), false).await?;
        if confirm[0].is_nack() {
            break sent.len();
        }
        sent.push(m);
        assert!(sent.len() < 100, "100 KiB acked under a 32 KiB quota");
    };
    assert!(acked > 0, "nothing acked under 32 KiB");
    // The publisher is told it is blocked, and the connection lives on.
    edge_tests::wait_for("connection.blocked", SHORT, || async {
        conn.status().blocked().then_some(())
    })
    .await?;
    assert!(
        conn.status().connected(),
        "the publishing connection closed"
    );
    // What was acked is there for a consuming connection, which is never
    // blocked; acking it makes room, and the publisher is unblocked.
    let (consuming, consume_channel) = open(&gw.amqp_uri()).await?;
    let mut consumer = consume(&consume_channel, &q, false).await?;
    for want in &sent {
        let d = next(&mut consumer).await?;
        assert_eq!(d.data, want.as_bytes());
        d.ack(BasicAckOptions::default()).await?;
    }
    edge_tests::wait_for("connection.unblocked", SHORT, || async {
        (!conn.status().blocked()).then_some(())
    })
    .await?;
    let again = publish(&channel, "", &q, &["after".to_string()], false).await?;
    assert!(again[0].is_ack(), "refused after the store made room");
    let text = gw.metrics().await?;
    let refused = edge_tests::http::metric(
        &text,
        "edge_messages_dropped_total",
        &["reason=\"amqp_refused\""],
    );
    // At least ours (the recorder is the process's, shared by tests).
    assert!(refused.is_some_and(|v| v >= 1.0), "counted: {refused:?}");
    consuming.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_publish_concurrently_and_consumers_share_a_queue() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let publisher = connect(&gw.amqp_uri()).await?;
    let q = unique("shared");
    let setup = publisher.create_channel().await?;
    declare(&setup, &q, true).await?;

    // Two consumers on their own connections, prefetch 10 each.
    let mut consumers = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..2 {
        let conn = connect(&gw.amqp_uri()).await?;
        let ch = conn.create_channel().await?;
        ch.basic_qos(10, BasicQosOptions::default()).await?;
        consumers.push(consume(&ch, &q, false).await?);
        conns.push((conn, ch));
    }
    let text = gw.metrics().await?;
    let channels = edge_tests::http::metric(&text, "edge_amqp_channels", &[]);
    assert!(channels.is_some_and(|n| n >= 3.0), "{channels:?}");
    let connections = edge_tests::http::metric(&text, "edge_connections", &["protocol=\"amqp\""]);
    assert!(connections.is_some_and(|n| n >= 3.0), "{connections:?}");

    // Four channels of one connection publish at once: their content
    // frames interleave on the wire.
    let mut tasks = Vec::new();
    for c in 0..4 {
        let ch = publisher.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            publish(&ch, "", &q, &bodies(&format!("c{c}"), 50), false).await
        }));
    }
    for t in tasks {
        assert!(t.await??.iter().all(|c| c.is_ack()));
    }
    let mut got = std::collections::BTreeSet::new();
    let mut per_consumer = [0usize; 2];
    while got.len() < 200 {
        for (i, consumer) in consumers.iter_mut().enumerate() {
            if let Ok(Some(d)) =
                tokio::time::timeout(std::time::Duration::from_millis(50), consumer.next()).await
            {
                let d = d?;
                assert!(
                    got.insert(String::from_utf8(d.data.clone())?),
                    "delivered twice"
                );
                per_consumer[i] += 1;
                d.acker.ack(BasicAckOptions::default()).await?;
            }
        }
    }
    assert!(
        per_consumer.iter().all(|n| *n > 0),
        "both consumers served: {per_consumer:?}"
    );
    for (conn, _) in conns {
        conn.close(200, "bye".into()).await?;
    }
    publisher.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bindings_to_transient_exchanges_and_auto_delete_queues_end_as_in_rabbitmq() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let (conn, channel) = open(&gw.amqp_uri()).await?;
    let x = unique("tx");
    let q = unique("dq");
    declare_exchange(&channel, &x, ExchangeKind::Direct, false).await?;
    declare(&channel, &q, true).await?;
    bind(&channel, &q, &x, "k").await?;
    conn.close(200, "bye".into()).await?;
    let root = gw.shutdown().await?;

    // The transient exchange and its binding are gone; the durable queue stays.
    let gw = TestGateway::builder().root(root).start().await?;
    let (conn, channel) = open(&gw.amqp_uri()).await?;
    declare_exchange(&channel, &x, ExchangeKind::Direct, false).await?;
    let confirms = publish(&channel, &x, "k", &bodies("lost", 1), true).await?;
    let returned = confirms.into_iter().next().and_then(|c| c.take_message());
    assert!(
        returned.is_some_and(|r| r.reply_code == 312),
        "no binding survived"
    );
    let confirms = publish(&channel, "", &q, &bodies("kept", 1), true).await?;
    assert!(
        matches!(confirms[0], lapin::Confirmation::Ack(None)),
        "the queue survived"
    );

    // An auto-delete queue goes with its last consumer; an exclusive
    // consumer keeps others out.
    let auto = unique("auto");
    channel
        .queue_declare(
            auto.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let tag = unique("only");
    // Held: lapin cancels a consumer it drops.
    let _only = channel
        .basic_consume(
            auto.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions {
                exclusive: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let second = conn.create_channel().await?;
    let refused = second
        .basic_consume(
            auto.as_str().into(),
            "second".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    let text = format!("{refused:?}");
    assert!(
        text.contains("ACCESS_REFUSED") || text.contains("403"),
        "{text}"
    );
    channel
        .basic_cancel(
            tag.as_str().into(),
            lapin::options::BasicCancelOptions::default(),
        )
        .await?;
    let probe = conn.create_channel().await?;
    let gone = probe
        .queue_declare(
            auto.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    let text = format!("{gone:?}");
    assert!(text.contains("NOT_FOUND") || text.contains("404"), "{text}");
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_queue_beyond_its_memory_is_read_back_from_the_store_in_order() -> Result<()> {
    // More than a queue holds in memory (4096) plus the core's channel to
    // it (1024): the rest waits in the store and is read back from there.
    const N: usize = 6000;
    let gw = TestGateway::builder().start().await?;
    let (conn, channel) = open(&gw.amqp_uri()).await?;
    let q = unique("deep");
    declare(&channel, &q, true).await?;
    let sent: Vec<String> = (0..N).map(|i| format!("{i:05}")).collect();
    for chunk in sent.chunks(500) {
        let confirms = publish(&channel, "", &q, chunk, false).await?;
        assert!(confirms.iter().all(|c| c.is_ack()));
    }
    // declare-ok counts what the store holds, not what is in memory.
    assert_eq!(message_count(&channel, &q).await? as usize, N);
    let consumer_channel = conn.create_channel().await?;
    consumer_channel
        .basic_qos(200, BasicQosOptions::default())
        .await?;
    let mut consumer = consume(&consumer_channel, &q, false).await?;
    let mut got = Vec::with_capacity(N);
    while got.len() < N {
        let d = tokio::time::timeout(LONG, consumer.next())
            .await
            .map_err(|_| anyhow!("only {} of {N} delivered", got.len()))?
            .context("consumer ended")??;
        got.push(String::from_utf8(d.data.clone())?);
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    assert_eq!(got, sent, "each once, in order");
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_client_cannot_take_an_amqp_queues_session() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let (conn, channel) = open(&gw.amqp_uri()).await?;
    let q = unique("guarded");
    declare(&channel, &q, true).await?;
    publish(&channel, "", &q, &bodies("safe", 1), false).await?;

    // A clean session with the queue's session id would discard it.
    let mut o = edge_tests::mqtt::options(gw.mqtt_addr(), &format!("amqp:{q}"));
    o.set_clean_session(true);
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(o, 8);
    let refused = tokio::time::timeout(SHORT, eventloop.poll())
        .await
        .map_err(|_| anyhow!("no answer to CONNECT"))?;
    let text = format!("{refused:?}");
    assert!(text.contains("BadClientId"), "{text}");

    let m = channel
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await?
        .context("the queue kept its message")?;
    assert_eq!(m.delivery.data, b"safe-0");
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_delete_exchange_goes_with_its_last_binding() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let (conn, channel) = open(&gw.amqp_uri()).await?;
    let x = unique("ax");
    let q = unique("aq");
    channel
        .exchange_declare(
            x.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    declare(&channel, &q, false).await?;
    bind(&channel, &q, &x, "a").await?;
    bind(&channel, &q, &x, "b").await?;
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    for key in ["a", "b"] {
        // Present while a binding is left, gone after the last.
        channel
            .exchange_declare(
                x.as_str().into(),
                ExchangeKind::Fanout,
                passive,
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("present before unbinding {key}"))?;
        channel
            .queue_unbind(
                q.as_str().into(),
                x.as_str().into(),
                key.into(),
                FieldTable::default(),
            )
            .await?;
    }
    let gone = channel
        .exchange_declare(
            x.as_str().into(),
            ExchangeKind::Fanout,
            passive,
            FieldTable::default(),
        )
        .await;
    let text = format!("{gone:?}");
    assert!(text.contains("NOT_FOUND") || text.contains("404"), "{text}");
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

/// `x-message-ttl`: a message older than the queue's TTL goes to nobody
/// (counted as expired); one within it is delivered; a redeclare with
/// another TTL is 406, an invalid one too, and the TTL of a durable queue
/// comes back after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_message_ttl_expires_what_waited_longer() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let (conn, channel) = open(&gw.amqp_uri()).await?;
    let ttl = |ms: i64| {
        let mut args = FieldTable::default();
        args.insert(
            "x-message-ttl".into(),
            lapin::types::AMQPValue::LongLongInt(ms),
        );
        args
    };
    let declare_with = |ch: &Channel, q: &str, args: FieldTable| {
        let (ch, q) = (ch.clone(), q.to_string());
        async move {
            ch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .map(|_| ())
        }
    };
    // TTL 0: nothing waits, so a get finds nothing.
    let instant = unique("ttl0");
    declare_with(&channel, &instant, ttl(0)).await?;
    publish(&channel, "", &instant, &bodies("t", 2), false).await?;
    // The queue's pump may still be moving them in: get until the expiry
    // is counted (bounded), never receiving one.
    let deadline = tokio::time::Instant::now() + SHORT;
    loop {
        let get = channel
            .basic_get(instant.as_str().into(), BasicGetOptions { no_ack: true })
            .await?;
        assert!(get.is_none(), "expired at once: {get:?}");
        let metrics = gw.metrics().await?;
        let counted = metrics
            .lines()
            .any(|l| l.starts_with("edge_messages_expired_total") && !l.ends_with(" 0"));
        if counted {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "expiry not counted:\n{metrics}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // An hour: delivered.
    let hour = unique("ttl1h");
    declare_with(&channel, &hour, ttl(3_600_000)).await?;
    publish(&channel, "", &hour, &bodies("h", 1), false).await?;
    let got = channel
        .basic_get(hour.as_str().into(), BasicGetOptions { no_ack: true })
        .await?
        .context("within its TTL")?;
    assert_eq!(got.delivery.data, b"h-0");
    // Another TTL, or none, for an existing queue; a negative one.
    for args in [ttl(5), FieldTable::default(), ttl(-1)] {
        let ch = conn.create_channel().await?;
        let text = refused(declare_with(&ch, &hour, args).await).await;
        assert!(
            text.contains("406") || text.contains("PRECONDITION_FAILED"),
            "{text}"
        );
    }
    conn.close(200, "bye".into()).await?;
    // The durable queue keeps its TTL across a restart.
    let root = gw.shutdown().await?;
    let gw = TestGateway::builder().root(root).start().await?;
    let (conn, channel) = open(&gw.amqp_uri()).await?;
    declare_with(&channel, &hour, ttl(3_600_000)).await?;
    let ch = conn.create_channel().await?;
    let text = refused(declare_with(&ch, &hour, FieldTable::default()).await).await;
    assert!(
        text.contains("406") || text.contains("PRECONDITION_FAILED"),
        "{text}"
    );
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

/// Whether a delivery is waiting: after a round trip on the channel (the
/// server sends what it decided to send before the reply, in order).
async fn has_more(channel: &Channel, queue: &str, consumer: &mut lapin::Consumer) -> Result<bool> {
    message_count(channel, queue).await?;
    Ok(futures::FutureExt::now_or_never(consumer.next()).is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_qos_limits_each_consumer_or_the_whole_channel_as_rabbitmq() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let (conn, channel) = open(&gw.amqp_uri()).await?;
    let queues = [unique("qos-a"), unique("qos-b")];
    for q in &queues {
        declare(&channel, q, false).await?;
        publish(&channel, "", q, &bodies(q, 5), false).await?;
    }

    // global = false: a limit of 2 for each consumer created afterwards.
    let per_consumer = conn.create_channel().await?;
    per_consumer
        .basic_qos(2, BasicQosOptions { global: false })
        .await?;
    let mut a = consume(&per_consumer, &queues[0], false).await?;
    let mut b = consume(&per_consumer, &queues[1], false).await?;
    let mut held = Vec::new();
    for consumer in [&mut a, &mut b] {
        for _ in 0..2 {
            held.push(next(consumer).await?);
        }
    }
    assert!(
        !has_more(&per_consumer, &queues[0], &mut a).await?,
        "a got a third"
    );
    assert!(
        !has_more(&per_consumer, &queues[1], &mut b).await?,
        "b got a third"
    );
    // An ack gives credit back to the consumer that had the message.
    held[0].ack(BasicAckOptions::default()).await?;
    held.push(next(&mut a).await?);
    assert!(!has_more(&per_consumer, &queues[1], &mut b).await?);
    per_consumer.close(200, "done".into()).await?;

    // global = true: 3 in flight over the whole channel, whichever consumer.
    let shared = conn.create_channel().await?;
    shared
        .basic_qos(3, BasicQosOptions { global: true })
        .await?;
    let mut a = consume(&shared, &queues[0], false).await?;
    let mut b = consume(&shared, &queues[1], false).await?;
    let mut got = Vec::new();
    while got.len() < 3 {
        tokio::select! {
            d = next(&mut a) => got.push(d?),
            d = next(&mut b) => got.push(d?),
        }
    }
    assert!(
        !has_more(&shared, &queues[0], &mut a).await?,
        "over the channel limit"
    );
    assert!(
        !has_more(&shared, &queues[1], &mut b).await?,
        "over the channel limit"
    );
    got[0]
        .ack(BasicAckOptions::default())
        .await
        .context("ack")?;
    let more = tokio::select! {
        d = next(&mut a) => d?,
        d = next(&mut b) => d?,
    };
    assert!(more.delivery_tag > got[2].delivery_tag);
    conn.close(200, "done".into()).await?;
    Ok(())
}

/// A publish to amq.topic with `x-mqtt-topic`: MQTT subscribers get it on
/// that topic (a bridge's routing key that lost the topic's `.`s does not
/// hide it), AMQP bindings still match its routing key, each once; a
/// header naming the `$amqp/` namespace is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_mqtt_topic_names_the_mqtt_topic_of_an_amq_topic_publish() -> Result<()> {
    use lapin::types::{AMQPValue, LongString};
    let gw = TestGateway::builder().start().await?;
    let prefix = unique("site");
    let (conn, channel) = open(&gw.amqp_uri()).await?;
    let q = unique("bykey");
    declare(&channel, &q, false).await?;
    bind(&channel, &q, "amq.topic", &format!("{prefix}.#")).await?;
    let named = format!("{prefix}/spBv1.0/cmd");
    let mut sub = MqttSubscriber::connect(gw.mqtt_addr(), &unique("sub"), &[&named]).await?;
    let publish_named = |header: String, body: &'static [u8]| {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-mqtt-topic".into(),
            AMQPValue::LongString(LongString::from(header)),
        );
        let channel = channel.clone();
        let key = format!("{prefix}.spBv1.0.cmd"); // the lossy key
        async move {
            channel
                .basic_publish(
                    "amq.topic".into(),
                    key.as_str().into(),
                    BasicPublishOptions::default(),
                    body,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_headers(headers),
                )
                .await?
                .await?;
            anyhow::Ok(())
        }
    };
    publish_named(named.clone(), b"named").await?;
    let p = sub.recv(LONG).await?;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        (named.as_str(), &b"named"[..])
    );
    let mut consumer = consume(&channel, &q, true).await?;
    let d = next(&mut consumer).await?;
    assert_eq!(
        d.data, b"named",
        "the binding on the routing key matched too"
    );

    // Reserved: routed by its key alone, which the subscriber's filter
    // does not match (the key reads as spBv1/0).
    publish_named("$amqp/x/y".to_string(), b"reserved").await?;
    let d = next(&mut consumer).await?;
    assert_eq!(d.data, b"reserved");
    publish_named(named.clone(), b"again").await?;
    let p = sub.recv(LONG).await?;
    assert_eq!(&p.payload[..], b"again", "the reserved one reached MQTT");
    let d = next(&mut consumer).await?;
    assert_eq!(d.data, b"again", "one copy per queue");
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}
