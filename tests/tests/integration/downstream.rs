//! Downstream commands, central → devices (issue 9): a `[[downstream]]`
//! consumes a queue on the shared RabbitMQ node and publishes each message
//! locally. Covered: the topic from the routing key (mapped back) or the
//! `x-mqtt-topic` header, with `topic_prefix`; properties to MQTT 5; an
//! unmappable message rejected while the rest flows; an offline persistent
//! session getting its command after reconnecting; a duplicate
//! `message_id` delivered once; a gateway that aborts between the local
//! commit and the upstream ack loses nothing and delivers nothing twice.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use edge_tests::amqp::{AmqpQueue, QueueSpec, connect};
use edge_tests::http::metric;
use edge_tests::mqtt::options;
use edge_tests::{
    GatewayProcess, MqttSubscriber, TestGateway, TestGatewayBuilder, unique, wait_for,
};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, Incoming, QoS};

use crate::{LONG, SHORT, gateway_bin, shared_node};

/// The environment variable of `gateway-under-test`'s crash seam.
const ABORT_AFTER: &str = "EDGE_TEST_ABORT_AFTER_DOWNSTREAM_COMMITS";

/// A publisher on the central broker (confirm mode) to `amq.topic`.
struct Central {
    conn: Connection,
    channel: Channel,
}

impl Central {
    async fn open(uri: &str) -> Result<Central> {
        let conn = connect(uri).await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Central { conn, channel })
    }

    /// Publishes persistently with `properties` and awaits the confirm.
    async fn publish(&self, key: &str, body: &[u8], properties: BasicProperties) -> Result<()> {
        let confirm = self
            .channel
            .basic_publish(
                "amq.topic".into(),
                key.into(),
                BasicPublishOptions::default(),
                body,
                properties.with_delivery_mode(2),
            )
            .await?;
        let confirmation = tokio::time::timeout(SHORT, confirm)
            .await
            .map_err(|_| anyhow!("no publisher confirm"))??;
        if !confirmation.is_ack() {
            bail!("central broker nacked the publish: {confirmation:?}");
        }
        Ok(())
    }

    /// A command with `message_id`.
    async fn command(&self, key: &str, body: &str, message_id: &str) -> Result<()> {
        let p = BasicProperties::default().with_message_id(ShortString::from(message_id));
        self.publish(key, body.as_bytes(), p).await
    }

    async fn delete_queue(self, queue: &str) -> Result<()> {
        self.channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .with_context(|| format!("deleting queue {queue}"))?;
        self.conn.close(200, "done".into()).await?;
        Ok(())
    }
}

/// A durable queue bound to `amq.topic` with `<prefix>.#`, not consumed
/// (the gateway will); its name.
async fn command_queue(uri: &str, prefix: &str) -> Result<String> {
    let spec = QueueSpec::topic(&format!("{prefix}.#")).durable();
    AmqpQueue::declare(uri, &spec).await?;
    Ok(spec.name)
}

fn headers(entries: &[(&str, &str)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in entries {
        table.insert(
            ShortString::from(*k),
            AMQPValue::LongString(LongString::from(v.as_bytes())),
        );
    }
    table
}

/// Sample of `name` with `labels` in the `/metrics` text (0 when absent).
fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    metric(text, name, labels).unwrap_or(0.0)
}

/// Waits until the downstream `name` of an in-process gateway is up.
async fn linked(gw: &TestGateway, name: &str) -> Result<()> {
    let label = format!("downstream=\"{name}\"");
    wait_for("the downstream link", SHORT, || async {
        let text = gw.metrics().await.ok()?;
        (sample(&text, "edge_downstream_state", &[&label, "state=\"up\""]) == 1.0).then_some(())
    })
    .await
}

/// A gateway whose downstream `name` consumes `queue` of the broker at
/// `uri` (its upstream `central`), with `keys` besides.
fn consuming(uri: &str, name: &str, queue: &str, keys: &[(&str, &str)]) -> TestGatewayBuilder {
    TestGateway::builder()
        .upstream("central", &[uri.to_string()])
        .downstream(name, "central", queue, keys)
}

/// Starts `builder` and waits until its downstream `name` is up.
async fn start_linked(builder: TestGatewayBuilder, name: &str) -> Result<TestGateway> {
    let gw = builder.start().await?;
    linked(&gw, name).await?;
    Ok(gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_reaches_mqtt_subscribers_on_its_mapped_topic_or_its_header_topic() -> Result<()>
{
    let node = shared_node().await?;
    let prefix = unique("down");
    let queue = command_queue(&node.amqp_uri(), &prefix).await?;
    let name = unique("commands");
    let gw = start_linked(
        consuming(
            &node.amqp_uri(),
            &name,
            &queue,
            &[("topic_prefix", "\"site1/\"")],
        ),
        &name,
    )
    .await?;
    let mut v311 = MqttSubscriber::connect(
        gw.mqtt_addr(),
        &unique("dev"),
        &[&format!("site1/{prefix}/#")],
    )
    .await?;
    let mut v5 = V5Subscriber::connect(gw.mqtt_addr(), &format!("site1/{prefix}/#")).await?;
    let central = Central::open(&node.amqp_uri()).await?;

    // The routing key mapped back: `.` separates levels, %2E is a dot.
    let props = BasicProperties::default()
        .with_message_id("c-1".into())
        .with_correlation_id("req-1".into())
        .with_reply_to(ShortString::from(format!("replies/{prefix}")))
        .with_content_type("text/plain".into())
        .with_expiration("60000".into())
        .with_headers(headers(&[("op", "reboot")]));
    central
        .publish(&format!("{prefix}.dev%2E1.cmd"), b"reboot", props)
        .await?;
    let p = v311.recv(SHORT).await?;
    assert_eq!(p.topic, format!("site1/{prefix}/dev.1/cmd"));
    assert_eq!(&p.payload[..], b"reboot");
    assert_eq!(p.qos, QoS::AtLeastOnce, "downstream qos 1 by default");
    let p5 = v5.recv().await?;
    assert_eq!(p5.topic, format!("site1/{prefix}/dev.1/cmd").as_bytes());
    let props5 = p5.properties.context("MQTT 5 properties")?;
    assert_eq!(props5.correlation_data.as_deref(), Some(&b"req-1"[..]));
    assert_eq!(
        props5.response_topic.as_deref(),
        Some(format!("replies/{prefix}").as_str())
    );
    assert_eq!(props5.content_type.as_deref(), Some("text/plain"));
    let expiry = props5.message_expiry_interval.context("message expiry")?;
    assert!(
        (55..=60).contains(&expiry),
        "AMQP expiration 60000 ms is the MQTT 5 expiry: {expiry} s"
    );
    assert!(
        props5
            .user_properties
            .contains(&("op".to_string(), "reboot".to_string())),
        "{:?}",
        props5.user_properties
    );
    assert!(
        !props5
            .user_properties
            .iter()
            .any(|(k, _)| k == "x-mqtt-topic"),
        "the topic header is spent on the topic"
    );

    // The header wins over the routing key.
    let topic = format!("{prefix}/dev2/cmd.v2");
    let p = BasicProperties::default()
        .with_message_id("c-2".into())
        .with_headers(headers(&[("x-mqtt-topic", &topic)]));
    central
        .publish(&format!("{prefix}.elsewhere"), b"update", p)
        .await?;
    let got = v311.recv(SHORT).await?;
    assert_eq!(got.topic, format!("site1/{topic}"));
    assert_eq!(&got.payload[..], b"update");

    // A topic that is no MQTT topic name is rejected; the queue flows on.
    let bad = BasicProperties::default()
        .with_message_id("c-3".into())
        .with_headers(headers(&[("x-mqtt-topic", &format!("{prefix}/all/#"))]));
    central.publish(&format!("{prefix}.x"), b"bad", bad).await?;
    central
        .command(&format!("{prefix}.dev3.cmd"), "after", "c-4")
        .await?;
    let got = v311.recv(SHORT).await?;
    assert_eq!(got.topic, format!("site1/{prefix}/dev3/cmd"));
    assert_eq!(&got.payload[..], b"after", "the bad one was not delivered");
    let text = gw.metrics().await?;
    let label = format!("downstream=\"{name}\"");
    assert_eq!(
        sample(
            &text,
            "edge_downstream_rejected_total",
            &[&label, "reason=\"invalid_topic\""]
        ),
        1.0
    );
    assert_eq!(
        sample(&text, "edge_downstream_received_total", &[&label]),
        4.0
    );
    let health = edge_tests::http::get(gw.metrics_addr().context("metrics")?, "/healthz")
        .await?
        .1;
    assert!(
        health.contains(&format!("downstream {name}: up")),
        "{health}"
    );

    gw.shutdown().await?;
    central.delete_queue(&queue).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_persistent_session_gets_its_command_after_reconnecting() -> Result<()> {
    let node = shared_node().await?;
    let prefix = unique("offline");
    let queue = command_queue(&node.amqp_uri(), &prefix).await?;
    let name = unique("commands");
    let gw = start_linked(consuming(&node.amqp_uri(), &name, &queue, &[]), &name).await?;
    let device = unique("device");
    let filter = format!("{prefix}/{device}/cmd/#");
    let (client, mut eventloop) = persistent(gw.mqtt_addr(), &device).await?;
    client.subscribe(&filter, QoS::AtLeastOnce).await?;
    until(&mut eventloop, |e| matches!(e, Incoming::SubAck(_))).await?;
    client.disconnect().await?;
    until(&mut eventloop, |_| false).await.ok();
    drop(eventloop);

    let central = Central::open(&node.amqp_uri()).await?;
    for n in 0..3 {
        central
            .command(
                &format!("{prefix}.{device}.cmd.set"),
                &format!("set-{n}"),
                &format!("{device}-{n}"),
            )
            .await?;
    }
    let label = format!("downstream=\"{name}\"");
    wait_for(
        "the commands taken off the central queue",
        SHORT,
        || async {
            let text = gw.metrics().await.ok()?;
            (sample(&text, "edge_downstream_received_total", &[&label]) == 3.0).then_some(())
        },
    )
    .await?;
    let text = gw.metrics().await?;
    assert_eq!(
        sample(&text, "edge_downstream_unmatched_total", &[&label]),
        0.0,
        "the offline session's subscription took them"
    );

    let (_client, mut eventloop) = persistent(gw.mqtt_addr(), &device).await?;
    let mut got = Vec::new();
    while got.len() < 3 {
        if let Incoming::Publish(p) =
            until(&mut eventloop, |e| matches!(e, Incoming::Publish(_))).await?
        {
            assert_eq!(p.topic, format!("{prefix}/{device}/cmd/set"));
            got.push(String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    assert_eq!(got, ["set-0", "set-1", "set-2"], "queued in order");

    gw.shutdown().await?;
    central.delete_queue(&queue).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_id_published_twice_is_delivered_once() -> Result<()> {
    let node = shared_node().await?;
    let prefix = unique("dup");
    let queue = command_queue(&node.amqp_uri(), &prefix).await?;
    let name = unique("commands");
    let gw = start_linked(consuming(&node.amqp_uri(), &name, &queue, &[]), &name).await?;
    let mut sub =
        MqttSubscriber::connect(gw.mqtt_addr(), &unique("dev"), &[&format!("{prefix}/#")]).await?;
    let central = Central::open(&node.amqp_uri()).await?;
    let key = format!("{prefix}.dev.cmd");
    central.command(&key, "open-valve", "cmd-17").await?;
    central.command(&key, "open-valve", "cmd-17").await?;
    // Without a message id, each copy is delivered (at least once).
    central
        .publish(&key, b"no-id", BasicProperties::default())
        .await?;
    central
        .publish(&key, b"no-id", BasicProperties::default())
        .await?;
    central.command(&key, "close-valve", "cmd-18").await?;

    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(String::from_utf8_lossy(&sub.recv(SHORT).await?.payload).into_owned());
    }
    assert_eq!(got, ["open-valve", "no-id", "no-id", "close-valve"]);
    let text = gw.metrics().await?;
    let label = format!("downstream=\"{name}\"");
    assert_eq!(
        sample(&text, "edge_downstream_duplicates_total", &[&label]),
        1.0
    );
    assert_eq!(
        sample(&text, "edge_downstream_without_id_total", &[&label]),
        2.0
    );

    // The window outlives the gateway: a resend after a restart is caught.
    let root = gw.shutdown().await?;
    let gw = start_linked(
        consuming(&node.amqp_uri(), &name, &queue, &[]).root(root),
        &name,
    )
    .await?;
    let mut sub =
        MqttSubscriber::connect(gw.mqtt_addr(), &unique("dev"), &[&format!("{prefix}/#")]).await?;
    central.command(&key, "open-valve", "cmd-17").await?;
    central.command(&key, "vent", "cmd-19").await?;
    let p = sub.recv(SHORT).await?;
    assert_eq!(&p.payload[..], b"vent", "cmd-17 was not delivered again");
    let text = gw.metrics().await?;
    assert_eq!(
        sample(&text, "edge_downstream_duplicates_total", &[&label]),
        2.0
    );

    gw.shutdown().await?;
    central.delete_queue(&queue).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_queue_is_retried_until_it_exists_or_declared_with_declare() -> Result<()> {
    let node = shared_node().await?;
    let prefix = unique("late");
    let missing = QueueSpec::topic(&format!("{prefix}.missing.#")).durable();
    let declared = QueueSpec::topic(&format!("{prefix}.declared.#")).durable();
    let (late, own) = (unique("late"), unique("own"));
    let gw = TestGateway::builder()
        .upstream("central", &[node.amqp_uri()])
        .downstream(&late, "central", &missing.name, &[])
        .downstream(&own, "central", &declared.name, &[("declare", "true")])
        .start()
        .await?;
    // The gateway declared its own queue (durable): binding it is enough.
    linked(&gw, &own).await?;
    AmqpQueue::declare(&node.amqp_uri(), &declared).await?;
    let late_ok = format!("downstream=\"{late}\"");
    wait_for("retries against the missing queue", SHORT, || async {
        let text = gw.metrics().await.ok()?;
        let ok = sample(
            &text,
            "edge_downstream_connects_total",
            &[&late_ok, "result=\"ok\""],
        );
        let down = sample(
            &text,
            "edge_downstream_state",
            &[&late_ok, "state=\"down\""],
        );
        (ok >= 2.0 && down == 1.0).then_some(())
    })
    .await?;

    let mut sub =
        MqttSubscriber::connect(gw.mqtt_addr(), &unique("dev"), &[&format!("{prefix}/#")]).await?;
    let central = Central::open(&node.amqp_uri()).await?;
    central
        .command(&format!("{prefix}.declared.cmd"), "to-own", "o-1")
        .await?;
    let p = sub.recv(SHORT).await?;
    assert_eq!(p.topic, format!("{prefix}/declared/cmd"));
    assert_eq!(&p.payload[..], b"to-own");

    // Once the queue exists, the next attempt consumes it.
    AmqpQueue::declare(&node.amqp_uri(), &missing).await?;
    central
        .command(&format!("{prefix}.missing.cmd"), "to-late", "l-1")
        .await?;
    let p = sub.recv(LONG).await?;
    assert_eq!(p.topic, format!("{prefix}/missing/cmd"));
    assert_eq!(&p.payload[..], b"to-late");
    linked(&gw, &late).await?;

    gw.shutdown().await?;
    central
        .channel
        .queue_delete(missing.name.as_str().into(), QueueDeleteOptions::default())
        .await?;
    central.delete_queue(&declared.name).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_larger_than_the_store_quota_is_rejected_not_retried_forever() -> Result<()> {
    let node = shared_node().await?;
    let prefix = unique("huge");
    let queue = command_queue(&node.amqp_uri(), &prefix).await?;
    let name = unique("commands");
    let gw = start_linked(
        consuming(&node.amqp_uri(), &name, &queue, &[]).set("store.max_bytes", "\"64KiB\""),
        &name,
    )
    .await?;
    let mut sub =
        MqttSubscriber::connect(gw.mqtt_addr(), &unique("dev"), &[&format!("{prefix}/#")]).await?;
    let central = Central::open(&node.amqp_uri()).await?;
    let huge = vec![b'x'; 128 * 1024];
    let p = BasicProperties::default().with_message_id("h-1".into());
    central.publish(&format!("{prefix}.fw"), &huge, p).await?;
    central
        .command(&format!("{prefix}.cmd"), "small", "h-2")
        .await?;
    let got = sub.recv(SHORT).await?;
    assert_eq!(
        &got.payload[..],
        b"small",
        "the huge one never reaches a device"
    );
    let label = format!("downstream=\"{name}\"");
    let text = gw.metrics().await?;
    assert_eq!(
        sample(
            &text,
            "edge_downstream_rejected_total",
            &[&label, "reason=\"unstorable\""]
        ),
        1.0
    );

    gw.shutdown().await?;
    central.delete_queue(&queue).await?;
    Ok(())
}

/// Commands drained in one go by the throughput test.
const BACKLOG: usize = 5_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_commands_drains_complete_and_in_order() -> Result<()> {
    let node = shared_node().await?;
    let prefix = unique("drain");
    // Filled before the downstream can consume it: the queue does not
    // exist yet, so the downstream retries until it does.
    let spec = QueueSpec::topic(&format!("{prefix}.#")).durable();
    let name = unique("commands");
    let gw = TestGateway::builder()
        .upstream("central", &[node.amqp_uri()])
        .downstream(&name, "central", &spec.name, &[("dedup_window", "1000")])
        .start()
        .await?;
    let mut sub =
        MqttSubscriber::connect(gw.mqtt_addr(), &unique("dev"), &[&format!("{prefix}/#")]).await?;
    let central = Central::open(&node.amqp_uri()).await?;
    central
        .channel
        .queue_declare(
            spec.name.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut confirms = Vec::with_capacity(BACKLOG);
    for n in 0..BACKLOG {
        let p = BasicProperties::default()
            .with_message_id(ShortString::from(format!("b-{n}")))
            .with_delivery_mode(2);
        confirms.push(
            central
                .channel
                .basic_publish(
                    "".into(),
                    spec.name.as_str().into(),
                    BasicPublishOptions::default(),
                    format!("{n:06}").as_bytes(),
                    p.with_headers(headers(&[("x-mqtt-topic", &format!("{prefix}/dev/cmd"))])),
                )
                .await?,
        );
    }
    for confirm in confirms {
        if !confirm.await?.is_ack() {
            bail!("central broker nacked a command");
        }
    }
    let first = sub.recv(LONG).await?;
    let started = std::time::Instant::now();
    let mut last = String::from_utf8_lossy(&first.payload).into_owned();
    assert_eq!(last, "000000");
    for n in 1..BACKLOG {
        let p = sub.recv(SHORT).await?;
        let body = String::from_utf8_lossy(&p.payload).into_owned();
        assert_eq!(body, format!("{n:06}"), "after {last}");
        last = body;
    }
    let elapsed = started.elapsed();
    eprintln!(
        "downstream drain: {BACKLOG} commands (QoS 1, prefetch 100) to an MQTT subscriber in {elapsed:.2?} ({:.0} msg/s)",
        (BACKLOG - 1) as f64 / elapsed.as_secs_f64()
    );
    // The window keeps the newest 1,000 ids in the store, no more.
    let store = gw.store().clone();
    let prefix_key = format!("downstream/{name}/");
    let kept = wait_for("the dedup window trimmed to 1,000", SHORT, || {
        let (store, prefix_key) = (store.clone(), prefix_key.clone());
        async move {
            let keys = tokio::task::spawn_blocking(move || store.dedup_keys(&prefix_key))
                .await
                .ok()?
                .ok()?;
            (keys.len() == 1000).then_some(keys)
        }
    })
    .await?;
    assert!(
        kept.iter().all(|(k, _)| k
            .strip_prefix(&prefix_key)
            .and_then(|id| id.strip_prefix("b-"))
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n >= BACKLOG - 1000)),
        "the newest ids are kept"
    );
    let text = gw.metrics().await?;
    let label = format!("downstream=\"{name}\"");
    assert_eq!(
        sample(&text, "edge_downstream_duplicates_total", &[&label]),
        0.0
    );

    gw.shutdown().await?;
    central.delete_queue(&spec.name).await?;
    Ok(())
}

/// Commands sent while the device is away.
const COMMANDS: usize = 300;
/// The gateway aborts after this many local commits, each before its ack.
const ABORT_AT: usize = 120;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_between_commit_and_ack_loses_nothing_and_duplicates_nothing() -> Result<()> {
    let node = shared_node().await?;
    let prefix = unique("downcrash");
    let queue = command_queue(&node.amqp_uri(), &prefix).await?;
    let name = "commands";
    let mut gw = TestGateway::builder()
        .upstream("central", &[node.amqp_uri()])
        .downstream(name, "central", &queue, &[("prefetch", "50")])
        .env(ABORT_AFTER, &ABORT_AT.to_string())
        .spawn(gateway_bin())
        .await?;
    let device = unique("device");
    let (client, mut eventloop) = persistent(gw.mqtt_addr(), &device).await?;
    client
        .subscribe(format!("{prefix}/#"), QoS::AtLeastOnce)
        .await?;
    until(&mut eventloop, |e| matches!(e, Incoming::SubAck(_))).await?;
    client.disconnect().await?;
    until(&mut eventloop, |_| false).await.ok();
    drop(eventloop);

    let central = Central::open(&node.amqp_uri()).await?;
    for n in 0..COMMANDS {
        central
            .command(
                &format!("{prefix}.dev.cmd"),
                &format!("cmd-{n:04}"),
                &format!("id-{n:04}"),
            )
            .await?;
    }
    let status = gw.wait_exit(LONG).await?;
    assert!(
        !status.success(),
        "the seam aborts the gateway after commit {ABORT_AT}: {status}"
    );

    gw.remove_env(ABORT_AFTER);
    gw.restart().await?;
    // What the first run committed without acknowledging comes again and
    // is recognised by its message id.
    let suppressed = wait_for("a redelivery suppressed", LONG, || async {
        let text = gw.metrics().await.ok()?;
        let duplicates = sample(&text, "edge_downstream_duplicates_total", &[]);
        (duplicates >= 1.0).then_some(duplicates)
    })
    .await;
    let duplicates = match suppressed {
        Ok(n) => n,
        Err(e) => {
            let text = gw.metrics().await.unwrap_or_default();
            let ours: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("edge_downstream"))
                .collect();
            bail!("{e}\n{}\nlog:\n{}", ours.join("\n"), gw.log());
        }
    };

    let (_client, mut eventloop) = persistent(gw.mqtt_addr(), &device).await?;
    let mut seen: HashMap<String, usize> = HashMap::new();
    while seen.len() < COMMANDS {
        let Incoming::Publish(p) =
            until(&mut eventloop, |e| matches!(e, Incoming::Publish(_))).await?
        else {
            continue;
        };
        let body = String::from_utf8_lossy(&p.payload).into_owned();
        *seen.entry(body).or_default() += 1;
    }
    for n in 0..COMMANDS {
        let body = format!("cmd-{n:04}");
        assert_eq!(seen.get(&body), Some(&1), "{body} arrived once");
    }
    check_quiet(&mut eventloop).await?;
    let text = gw.metrics().await?;
    let duplicates = sample(&text, "edge_downstream_duplicates_total", &[]).max(duplicates);
    eprintln!(
        "downstream crash: {COMMANDS} commands, abort after commit {ABORT_AT}, {duplicates} redeliveries suppressed"
    );

    terminate(&mut gw).await?;
    central.delete_queue(&queue).await?;
    Ok(())
}

/// Nothing more arrives for a moment (a duplicate would).
async fn check_quiet(eventloop: &mut EventLoop) -> Result<()> {
    let quiet = tokio::time::timeout(Duration::from_millis(700), async {
        loop {
            if let Event::Incoming(Incoming::Publish(p)) = eventloop.poll().await? {
                return anyhow::Ok(p);
            }
        }
    })
    .await;
    match quiet {
        Err(_) => Ok(()),
        Ok(Ok(p)) => bail!("a further delivery arrived: {p:?}"),
        Ok(Err(e)) => Err(e),
    }
}

async fn terminate(gw: &mut GatewayProcess) -> Result<()> {
    let status = gw.terminate(LONG).await?;
    if !status.success() {
        bail!("gateway exited with {status}; log:\n{}", gw.log());
    }
    Ok(())
}

/// An MQTT 3.1.1 client with clean session = 0, connected.
async fn persistent(addr: SocketAddr, id: &str) -> Result<(AsyncClient, EventLoop)> {
    let mut o = options(addr, id);
    o.set_clean_session(false);
    let (client, mut eventloop) = AsyncClient::new(o, 64);
    match until(&mut eventloop, |e| matches!(e, Incoming::ConnAck(_))).await? {
        Incoming::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {}
        other => bail!("CONNACK {other:?}"),
    }
    Ok((client, eventloop))
}

/// Polls until an incoming packet `wanted` accepts (bounded by [`LONG`]);
/// an error when the connection ends first.
async fn until(
    eventloop: &mut EventLoop,
    mut wanted: impl FnMut(&Incoming) -> bool,
) -> Result<Incoming> {
    tokio::time::timeout(LONG, async {
        loop {
            if let Event::Incoming(packet) = eventloop.poll().await?
                && wanted(&packet)
            {
                return anyhow::Ok(packet);
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no such packet within {LONG:?}"))?
}

/// An MQTT 5 subscriber at QoS 1.
struct V5Subscriber {
    rx: tokio::sync::mpsc::Receiver<rumqttc::v5::mqttbytes::v5::Publish>,
    task: tokio::task::JoinHandle<()>,
    _client: rumqttc::v5::AsyncClient,
}

impl V5Subscriber {
    async fn connect(addr: SocketAddr, filter: &str) -> Result<V5Subscriber> {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::{Event as V5Event, MqttOptions};
        let mut o = MqttOptions::new(unique("v5"), addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(o, 64);
        client
            .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
            .await?;
        tokio::time::timeout(SHORT, async {
            loop {
                if let V5Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await? {
                    return anyhow::Ok(());
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no SUBACK"))??;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let task = tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if let V5Event::Incoming(Packet::Publish(p)) = event
                    && tx.send(p).await.is_err()
                {
                    return;
                }
            }
        });
        Ok(V5Subscriber {
            rx,
            task,
            _client: client,
        })
    }

    async fn recv(&mut self) -> Result<rumqttc::v5::mqttbytes::v5::Publish> {
        tokio::time::timeout(SHORT, self.rx.recv())
            .await
            .map_err(|_| anyhow!("no MQTT 5 PUBLISH within {SHORT:?}"))?
            .context("MQTT 5 subscriber ended")
    }
}

impl Drop for V5Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}
