//! Queue arguments of different kinds on one queue (lapin): a priority
//! queue with a `drop-head` length limit (in memory and with its head
//! spilled to the store), expiry and dead-lettering in a priority queue,
//! and a single-active-consumer quorum queue with a delivery limit.

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};

use edge_tests::{TestGateway, unique};

use crate::SHORT;

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

const DURABLE: QueueDeclareOptions = QueueDeclareOptions {
    passive: false,
    durable: true,
    exclusive: false,
    auto_delete: false,
    nowait: false,
};

/// A durable fanout exchange `dlx` with the durable queue `dlq` bound.
async fn dead_letter_queue(ch: &Channel, dlx: &str, dlq: &str) -> Result<()> {
    let options = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        dlx.into(),
        ExchangeKind::Fanout,
        options,
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(dlq.into(), DURABLE, FieldTable::default())
        .await?;
    ch.queue_bind(
        dlq.into(),
        dlx.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// Publishes persistent messages (body, properties) and awaits every confirm.
async fn publish(ch: &Channel, queue: &str, messages: &[(String, BasicProperties)]) -> Result<()> {
    let mut confirms = Vec::with_capacity(messages.len());
    for (body, props) in messages {
        confirms.push(
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props.clone().with_delivery_mode(2),
            )
            .await?,
        );
    }
    for c in confirms {
        let confirm = c.await?;
        if !confirm.is_ack() {
            bail!("not confirmed: {confirm:?}");
        }
    }
    Ok(())
}

fn with_priority(body: &str, p: u8) -> (String, BasicProperties) {
    (
        body.to_string(),
        BasicProperties::default().with_priority(p),
    )
}

async fn consumer(ch: &Channel, queue: &str, tag: &str) -> Result<lapin::Consumer> {
    Ok(ch
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?)
}

async fn next(consumer: &mut lapin::Consumer) -> Result<lapin::message::Delivery> {
    tokio::time::timeout(SHORT, consumer.next())
        .await
        .context("no delivery in time")?
        .context("consumer ended")?
        .map_err(Into::into)
}

/// The next `n` bodies, acknowledged.
async fn bodies(consumer: &mut lapin::Consumer, n: usize) -> Result<Vec<String>> {
    let mut got = Vec::with_capacity(n);
    for _ in 0..n {
        let d = next(consumer).await?;
        got.push(String::from_utf8_lossy(&d.data).into_owned());
        d.ack(BasicAckOptions::default()).await?;
    }
    Ok(got)
}

fn header<'a>(d: &'a lapin::message::Delivery, name: &str) -> Option<&'a AMQPValue> {
    d.properties
        .headers()
        .as_ref()?
        .inner()
        .get(&ShortString::from(name))
}

/// The reason of a dead-lettered delivery's latest `x-death` entry.
fn death_reason(d: &lapin::message::Delivery) -> Option<String> {
    let Some(AMQPValue::FieldArray(list)) = header(d, "x-death") else {
        return None;
    };
    match list.as_slice().first()? {
        AMQPValue::FieldTable(t) => match t.inner().get(&ShortString::from("reason")) {
            Some(AMQPValue::LongString(s)) => Some(s.to_string()),
            _ => None,
        },
        _ => None,
    }
}

async fn message_count(ch: &Channel, queue: &str) -> Result<u32> {
    let ok = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..DURABLE
            },
            FieldTable::default(),
        )
        .await?;
    Ok(ok.message_count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_head_on_a_priority_queue_drops_the_highest_priority_first() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let conn = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let (q, dlx, dlq) = (unique("prio-len"), unique("dlx"), unique("dlq"));
    dead_letter_queue(&ch, &dlx, &dlq).await?;
    ch.queue_declare(
        q.as_str().into(),
        DURABLE,
        table(&[
            ("x-max-priority", AMQPValue::ShortShortUInt(9)),
            ("x-max-length", AMQPValue::LongInt(2)),
            ("x-dead-letter-exchange", text(&dlx)),
        ]),
    )
    .await?;
    // The third arrival puts the queue over its limit: its head, as
    // RabbitMQ's priority queues see it, is the highest priority one.
    let sent = [
        with_priority("p1", 1),
        with_priority("p5", 5),
        with_priority("p3", 3),
    ];
    publish(&ch, &q, &sent).await?;
    let mut dead = consumer(&ch, &dlq, "dead").await?;
    let d = next(&mut dead).await?;
    assert_eq!(&d.data[..], b"p5");
    assert_eq!(death_reason(&d).as_deref(), Some("maxlen"));
    d.ack(BasicAckOptions::default()).await?;
    assert_eq!(message_count(&ch, &q).await?, 2);
    let mut kept = consumer(&ch, &q, "kept").await?;
    assert_eq!(bodies(&mut kept, 2).await?, ["p3", "p1"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_queues_spilled_head_is_dropped_while_memory_holds_unacked_ones() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let conn = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let (q, dlx, dlq) = (unique("prio-spill"), unique("dlx"), unique("dlq"));
    dead_letter_queue(&ch, &dlx, &dlq).await?;
    const LIMIT: usize = 300;
    const LATER: usize = 400;
    // A queue's memory holds 4096 messages: a consumer keeps them all
    // unacknowledged, so what comes next waits spilled in the store.
    const HELD: usize = 4096;
    ch.queue_declare(
        q.as_str().into(),
        DURABLE,
        table(&[
            ("x-max-priority", AMQPValue::ShortShortUInt(5)),
            ("x-max-length", AMQPValue::LongInt(LIMIT as i32)),
            ("x-dead-letter-exchange", text(&dlx)),
        ]),
    )
    .await?;
    let cch = conn.create_channel().await?;
    cch.basic_qos(HELD as u16, BasicQosOptions::default())
        .await?;
    let mut held = consumer(&cch, &q, "holder").await?;
    // In steps below the limit, each taken before the next is sent.
    let mut last = None;
    for step in (0..HELD).collect::<Vec<_>>().chunks(LIMIT - 50) {
        let first: Vec<_> = step
            .iter()
            .map(|i| (format!("a{i}"), BasicProperties::default()))
            .collect();
        publish(&ch, &q, &first).await?;
        for i in step {
            let d = next(&mut held).await?;
            assert_eq!(d.data, format!("a{i}").as_bytes());
            last = Some(d);
        }
    }
    let later: Vec<_> = (0..LATER)
        .map(|i| (format!("b{i}"), BasicProperties::default()))
        .collect();
    publish(&ch, &q, &later).await?;
    // The oldest of those die, read back from the store to be
    // dead-lettered in order; the newest LIMIT stay.
    let mut dead = consumer(&ch, &dlq, "dead").await?;
    for i in 0..LATER - LIMIT {
        let d = next(&mut dead).await?;
        assert_eq!(
            String::from_utf8_lossy(&d.data),
            format!("b{i}"),
            "dropped in order"
        );
        assert_eq!(death_reason(&d).as_deref(), Some("maxlen"));
        d.ack(BasicAckOptions::default()).await?;
    }
    assert_eq!(message_count(&ch, &q).await? as usize, LIMIT);
    last.context("held")?
        .ack(BasicAckOptions { multiple: true })
        .await?;
    let rest = bodies(&mut held, LIMIT).await?;
    let expected: Vec<String> = (LATER - LIMIT..LATER).map(|i| format!("b{i}")).collect();
    assert_eq!(rest, expected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_low_priority_message_is_dead_lettered_behind_live_higher_ones() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let conn = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let (q, dlx, dlq) = (unique("prio-ttl"), unique("dlx"), unique("dlq"));
    dead_letter_queue(&ch, &dlx, &dlq).await?;
    ch.queue_declare(
        q.as_str().into(),
        DURABLE,
        table(&[
            ("x-max-priority", AMQPValue::ShortShortUInt(9)),
            ("x-dead-letter-exchange", text(&dlx)),
        ]),
    )
    .await?;
    let expiring = |body: &str, p: u8, ms: &str| {
        (
            body.to_string(),
            BasicProperties::default()
                .with_priority(p)
                .with_expiration(ms.into()),
        )
    };
    // Nobody consumes: the high one stays the head; the low ones expire
    // behind it (earliest expiry first), and die on time with reason
    // `expired` (RabbitMQ would leave them until they reach the head).
    let sent = [
        with_priority("high", 9),
        expiring("low-late", 1, "400"),
        expiring("mid", 4, "60000"),
        expiring("low-soon", 1, "100"),
        expiring("lowest", 0, "200"),
    ];
    publish(&ch, &q, &sent).await?;
    let mut dead = consumer(&ch, &dlq, "dead").await?;
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = next(&mut dead).await?;
        assert_eq!(death_reason(&d).as_deref(), Some("expired"));
        got.push(String::from_utf8_lossy(&d.data).into_owned());
        d.ack(BasicAckOptions::default()).await?;
    }
    // Within priority 1 arrival order holds: "low-soon" waits behind
    // "low-late" (as at any head).
    assert_eq!(got, ["lowest", "low-late", "low-soon"]);
    assert_eq!(message_count(&ch, &q).await?, 2);
    let mut live = consumer(&ch, &q, "live").await?;
    assert_eq!(bodies(&mut live, 2).await?, ["high", "mid"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_active_consumer_queue_counts_returns_to_its_delivery_limit() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let setup = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let ch = setup.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let (q, dlx, dlq) = (unique("sac-limit"), unique("dlx"), unique("dlq"));
    dead_letter_queue(&ch, &dlx, &dlq).await?;
    ch.queue_declare(
        q.as_str().into(),
        DURABLE,
        table(&[
            ("x-queue-type", text("quorum")),
            ("x-single-active-consumer", AMQPValue::Boolean(true)),
            ("x-delivery-limit", AMQPValue::LongInt(1)),
            ("x-dead-letter-exchange", text(&dlx)),
        ]),
    )
    .await?;
    let first = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let fch = first.create_channel().await?;
    let mut active = consumer(&fch, &q, "first").await?;
    let second = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let sch = second.create_channel().await?;
    let mut waiting = consumer(&sch, &q, "second").await?;
    let sent: Vec<_> = (0..3)
        .map(|i| (format!("m{i}"), BasicProperties::default()))
        .collect();
    publish(&ch, &q, &sent).await?;
    for i in 0..3 {
        let d = next(&mut active).await?;
        assert_eq!(d.data, format!("m{i}").as_bytes());
        assert!(!d.redelivered);
    }
    // The active consumer's connection goes: its unacked messages come
    // back once (x-delivery-count 1) to the next consumer, in order.
    first.close(200, "bye".into()).await?;
    let mut tags = Vec::new();
    for i in 0..3 {
        let d = next(&mut waiting).await?;
        assert_eq!(d.data, format!("m{i}").as_bytes(), "in order");
        assert!(d.redelivered);
        match header(&d, "x-delivery-count") {
            Some(AMQPValue::LongLongInt(1) | AMQPValue::LongInt(1)) => {}
            other => bail!("x-delivery-count {other:?}"),
        }
        tags.push(d.delivery_tag);
    }
    // Returned once more: past the limit, they are dead-lettered in order.
    sch.basic_nack(
        tags[2],
        BasicNackOptions {
            multiple: true,
            requeue: true,
        },
    )
    .await?;
    let mut dead = consumer(&ch, &dlq, "dead").await?;
    for i in 0..3 {
        let d = next(&mut dead).await?;
        assert_eq!(d.data, format!("m{i}").as_bytes());
        assert_eq!(death_reason(&d).as_deref(), Some("delivery_limit"));
        d.ack(BasicAckOptions::default()).await?;
    }
    assert_eq!(message_count(&ch, &q).await?, 0);
    Ok(())
}

/// "<body> <redelivered> <x-delivery-count or ->" of a delivery.
fn seen(d: &lapin::message::Delivery) -> String {
    let count = match header(d, "x-delivery-count") {
        Some(AMQPValue::LongLongInt(n)) => n.to_string(),
        Some(AMQPValue::LongInt(n)) => n.to_string(),
        Some(other) => format!("{other:?}"),
        None => "-".into(),
    };
    format!(
        "{} {} {count}",
        String::from_utf8_lossy(&d.data),
        d.redelivered
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_counts_and_the_redelivered_flag_share_the_entry_state_across_a_clean_restart()
-> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let conn = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let q = unique("limit-restart");
    let args = table(&[
        ("x-queue-type", text("quorum")),
        ("x-delivery-limit", AMQPValue::LongInt(5)),
    ]);
    ch.queue_declare(q.as_str().into(), DURABLE, args.clone())
        .await?;
    let sent: Vec<_> = (0..3)
        .map(|i| (format!("m{i}"), BasicProperties::default()))
        .collect();
    publish(&ch, &q, &sent).await?;
    ch.basic_qos(2, BasicQosOptions::default()).await?;
    let mut c = consumer(&ch, &q, "holder").await?;
    let d = next(&mut c).await?;
    assert_eq!(seen(&d), "m0 false -");
    d.nack(BasicNackOptions {
        multiple: false,
        requeue: true,
    })
    .await?;
    // m0 once returned, and m1, held unacked when the gateway stops; m2
    // never delivered.
    let held = [next(&mut c).await?, next(&mut c).await?];
    // (m1 may have been delivered before m0 came back.)
    let mut held_seen = held.each_ref().map(seen);
    held_seen.sort();
    assert_eq!(held_seen, ["m0 true 1", "m1 false -"]);
    // The shutdown closes the connection: both come back once more.
    let root = gw.shutdown().await?;
    drop(conn);
    let gw = TestGateway::builder().root(root).start().await?;
    let conn = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let ch = conn.create_channel().await?;
    let mut c = consumer(&ch, &q, "after").await?;
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = next(&mut c).await?;
        got.push(seen(&d));
        d.ack(BasicAckOptions::default()).await?;
    }
    assert_eq!(got, ["m0 true 2", "m1 true 1", "m2 false -"]);
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

/// A durable `drop-head` queue at its limit whose consumer acknowledges
/// bursts with `multiple` while a publisher refills it at once: the
/// acknowledged entries are still counted by the store until their ack
/// commits, yet they are neither ready nor waiting in the store, so no
/// message within the limit dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_head_drops_nothing_within_the_limit_while_acks_commit() -> Result<()> {
    const MAX: usize = 100;
    const BURST: u16 = 50;
    const ROUNDS: usize = 40;
    let gw = TestGateway::builder().start().await?;
    let conn = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let (q, dlx, dlq) = (unique("acking"), unique("acking-dlx"), unique("acking-dlq"));
    dead_letter_queue(&publisher, &dlx, &dlq).await?;
    publisher
        .queue_declare(
            q.as_str().into(),
            DURABLE,
            table(&[
                ("x-max-length", AMQPValue::LongInt(MAX as i32)),
                ("x-overflow", text("drop-head")),
                ("x-dead-letter-exchange", text(&dlx)),
            ]),
        )
        .await?;
    let batch = |from: usize, n: usize| -> Vec<(String, BasicProperties)> {
        (from..from + n)
            .map(|i| (format!("m{i}"), BasicProperties::default()))
            .collect()
    };
    publish(&publisher, &q, &batch(0, MAX)).await?;
    let mut sent = MAX;

    let consumer_conn = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let ch = consumer_conn.create_channel().await?;
    ch.basic_qos(BURST, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "acker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut received = 0usize;
    // Each round: a burst acknowledged at once, then as many published at
    // once (ready never exceeds the limit: at most MAX - BURST wait while
    // a burst is out).
    for round in 0..ROUNDS {
        let mut last = 0;
        for _ in 0..BURST {
            let d = tokio::time::timeout(SHORT, consumer.next())
                .await
                .with_context(|| {
                    format!("round {round}: no delivery of m{received} in time (dropped?)")
                })?
                .context("consumer ended")??;
            let body = String::from_utf8_lossy(&d.data).into_owned();
            if body != format!("m{received}") {
                bail!(
                    "round {round}: got {body}, expected m{received}: messages within the limit died"
                );
            }
            received += 1;
            last = d.delivery_tag;
        }
        ch.basic_ack(last, BasicAckOptions { multiple: true })
            .await?;
        publish(&publisher, &q, &batch(sent, usize::from(BURST))).await?;
        sent += usize::from(BURST);
    }
    // Drain what is left: every message arrives, in order.
    while received < sent {
        let d = tokio::time::timeout(SHORT, consumer.next())
            .await
            .with_context(|| format!("no delivery of m{received} in time (dropped?)"))?
            .context("consumer ended")??;
        let body = String::from_utf8_lossy(&d.data).into_owned();
        if body != format!("m{received}") {
            bail!("got {body}, expected m{received}: messages within the limit died");
        }
        received += 1;
        d.ack(BasicAckOptions::default()).await?;
    }
    let dead = publisher
        .queue_declare(
            dlq.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..DURABLE
            },
            FieldTable::default(),
        )
        .await?;
    assert_eq!(dead.message_count(), 0, "nothing was over the limit");
    Ok(())
}
