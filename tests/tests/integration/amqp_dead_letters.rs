//! AMQP queue limits and dead-lettering, as RabbitMQ applications use
//! them: `x-max-length(-bytes)` with each `x-overflow`, dead-letter
//! exchanges and routing keys with the `x-death` headers (rejected,
//! expired, maxlen, delivery_limit), chains and cycles, a missing
//! dead-letter exchange, and a durable queue's dead letters across a
//! kill -9 of the gateway. Clients: pika (`/usr/bin/python3`) and lapin.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};

use edge_tests::{TestGateway, unique};

use crate::SHORT;

/// Scenarios, one per argument; each prints what the test checks.
const SCRIPT: &str = r#"
import sys, pika
port, tag, scenario = int(sys.argv[1]), sys.argv[2], sys.argv[3]
conn = pika.BlockingConnection(pika.ConnectionParameters(
    "127.0.0.1", port, "/", pika.PlainCredentials("guest", "guest")))
ch = conn.channel()
ch.confirm_delivery()
q, d, x = "q-" + tag, "dlq-" + tag, "dlx-" + tag
persistent = pika.BasicProperties(delivery_mode=2)

def s(v):
    return v.decode() if isinstance(v, bytes) else str(v)

def death(props):
    out = []
    for e in (props.headers or {}).get("x-death", []):
        line = "%s/%s/%s/[%s]/%s" % (e["count"], s(e["reason"]), s(e["queue"]), s(e["exchange"]),
                                     ",".join(s(k) for k in e["routing-keys"]))
        if "original-expiration" in e:
            line += "/exp=" + s(e["original-expiration"])
        if "time" not in e:
            line += "/no-time"
        out.append(line)
    return "|".join(out)

def header(props, name):
    return s((props.headers or {}).get(name))

def take(queue, n):
    got = []
    for method, props, body in ch.consume(queue, auto_ack=True, inactivity_timeout=10):
        if method is None:
            break
        got.append((body.decode(), props))
        if len(got) == n:
            break
    ch.cancel()
    return got

def drain(queue):
    out = []
    while True:
        m, p, b = ch.basic_get(queue, auto_ack=True)
        if m is None:
            return " ".join(out)
        out.append(b.decode())

def dead_letter_queue(name, exchange, kind="fanout", key=""):
    ch.exchange_declare(exchange, kind)
    ch.queue_declare(name)
    ch.queue_bind(name, exchange, key)

def publish(exchange, key, body, props=persistent):
    try:
        ch.basic_publish(exchange, key, body, props)
        return "ack"
    except pika.exceptions.NackError:
        return "nack"

if scenario == "drop-head":
    dead_letter_queue(d, x)
    ch.queue_declare(q, durable=True, arguments={"x-max-length": 3, "x-dead-letter-exchange": x})
    print("confirms", " ".join(publish("", q, b"m%d" % i) for i in range(6)))
    print("ready", ch.queue_declare(q, durable=True, passive=True).method.message_count)
    print("queue", drain(q))
    for body, p in take(d, 3):
        print("dead", body, death(p))
elif scenario == "max-bytes":
    ch.queue_declare(q, arguments={"x-max-length-bytes": 10})
    for b in [b"aaaa", b"bbbb", b"cccc", b"dddd"]:
        publish("", q, b)
    print("queue", drain(q))
elif scenario == "reject-publish":
    ch.exchange_declare(x, "fanout")
    ch.queue_declare(q, arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
    ch.queue_declare(d)
    ch.queue_bind(q, x)
    ch.queue_bind(d, x)
    print("confirms", " ".join(publish(x, "", b"m%d" % i) for i in range(4)))
    print("queue", drain(q))
    print("other", drain(d))
    print("after", publish(x, "", b"m4"), drain(q))
elif scenario == "reject-publish-dlx":
    dead_letter_queue(d, x)
    ch.queue_declare(q, durable=True, arguments={
        "x-max-length": 1, "x-overflow": "reject-publish-dlx", "x-dead-letter-exchange": x})
    print("confirms", " ".join(publish("", q, b"m%d" % i) for i in range(3)))
    print("queue", drain(q))
    for body, p in take(d, 2):
        print("dead", body, death(p))
elif scenario == "reject":
    dead_letter_queue(d, x, "direct", q)
    ch.queue_declare(q, arguments={"x-dead-letter-exchange": x})
    publish("", q, b"r1")
    publish("", q, b"r2")
    m, p, b = ch.basic_get(q)
    ch.basic_reject(m.delivery_tag, requeue=False)
    m, p, b = ch.basic_get(q)
    ch.basic_nack(m.delivery_tag, requeue=False)
    for body, p in take(d, 2):
        print("dead", body, death(p), header(p, "x-first-death-reason"),
              header(p, "x-first-death-queue"), "[%s]" % header(p, "x-first-death-exchange"),
              header(p, "x-last-death-reason"), header(p, "x-last-death-queue"))
    print("queue", drain(q))
elif scenario == "ttl":
    dead_letter_queue(d, x)
    ch.queue_declare(q, arguments={"x-message-ttl": 100, "x-dead-letter-exchange": x})
    ch.queue_declare(q + "-m", arguments={"x-dead-letter-exchange": x})
    publish("", q, b"t1")
    publish("", q + "-m", b"t2", pika.BasicProperties(delivery_mode=2, expiration="150"))
    for body, p in sorted(take(d, 2), key=lambda m: m[0]):
        print("dead", body, death(p), "expiration", p.expiration)
elif scenario == "routing-key":
    dead_letter_queue(d, x, "direct", "dead")
    ch.queue_declare(q, arguments={"x-dead-letter-exchange": x, "x-dead-letter-routing-key": "dead"})
    publish("", q, b"k1")
    m, p, b = ch.basic_get(q)
    ch.basic_reject(m.delivery_tag, requeue=False)
    for body, p in take(d, 1):
        print("dead", body, death(p))
elif scenario == "chain":
    x2, q2, q3 = x + "-2", q + "-2", q + "-3"
    ch.exchange_declare(x, "fanout")
    ch.exchange_declare(x2, "fanout")
    ch.queue_declare(q, arguments={"x-message-ttl": 50, "x-dead-letter-exchange": x})
    ch.queue_declare(q2, arguments={"x-message-ttl": 50, "x-dead-letter-exchange": x2})
    ch.queue_bind(q2, x)
    ch.queue_declare(q3)
    ch.queue_bind(q3, x2)
    publish("", q, b"c1")
    for body, p in take(q3, 1):
        print("expired twice", body, death(p), header(p, "x-first-death-queue"),
              header(p, "x-last-death-queue"), "[%s]" % header(p, "x-last-death-exchange"))
    # Rejections back and forth: the (queue, reason) entry is counted.
    ch.queue_declare(q + "-a", arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": q + "-b"})
    ch.queue_declare(q + "-b", arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": q + "-a"})
    publish("", q + "-a", b"p1")
    for queue in [q + "-a", q + "-b", q + "-a"]:
        for method, props, body in ch.consume(queue, inactivity_timeout=10):
            if method is None:
                print("nothing in", queue)
            else:
                ch.basic_reject(method.delivery_tag, requeue=False)
            break
        ch.cancel()
    for body, p in take(q + "-b", 1):
        print("rejected thrice", body, death(p))
    # Expiring into itself: a cycle, dropped.
    ch.queue_declare(q + "-c", arguments={"x-message-ttl": 20, "x-dead-letter-exchange": ""})
    publish("", q + "-c", b"cycle")
elif scenario == "missing-exchange":
    ch.queue_declare(q, arguments={"x-dead-letter-exchange": "nowhere-" + tag})
    publish("", q, b"lost")
    m, p, b = ch.basic_get(q)
    ch.basic_reject(m.delivery_tag, requeue=False)
    print("queue", drain(q))
conn.close()
"#;

async fn scenario(gw: &TestGateway, tag: &str, name: &str) -> Result<Vec<String>> {
    let port = gw.amqp_addr().port().to_string();
    crate::run_python(name, SCRIPT, &[&port, tag, name]).await
}

/// Runs `name` against a fresh gateway; its lines, with the tag replaced
/// by `T`.
async fn run(name: &str) -> Result<(TestGateway, Vec<String>)> {
    let gw = TestGateway::builder().start().await?;
    let tag = unique("dl");
    let lines = scenario(&gw, &tag, name).await?;
    let lines = lines.into_iter().map(|l| l.replace(&tag, "T")).collect();
    Ok((gw, lines))
}

/// Waits (bounded) until the dropped counter for `reason` is at least one.
async fn dropped_counted(gw: &TestGateway, reason: &str) -> Result<f64> {
    dropped_seen(async || gw.metrics().await, reason).await
}

/// [`dropped_counted`] of a spawned gateway.
async fn dropped_counted_spawned(gw: &edge_tests::GatewayProcess, reason: &str) -> Result<f64> {
    dropped_seen(async || gw.metrics().await, reason).await
}

async fn dropped_seen(metrics: impl AsyncFn() -> Result<String>, reason: &str) -> Result<f64> {
    let label = format!("reason=\"{reason}\"");
    let deadline = Instant::now() + SHORT;
    loop {
        let text = metrics().await?;
        let n = edge_tests::http::metric(&text, "edge_messages_dropped_total", &[&label]);
        if let Some(n) = n.filter(|n| *n >= 1.0) {
            return Ok(n);
        }
        if Instant::now() > deadline {
            bail!("edge_messages_dropped_total{{{label}}} stayed {n:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_length_drop_head_keeps_the_newest_and_dead_letters_the_oldest() -> Result<()> {
    let (_gw, lines) = run("drop-head").await?;
    assert_eq!(
        lines,
        [
            "confirms ack ack ack ack ack ack",
            "ready 3",
            "queue m3 m4 m5",
            "dead m0 1/maxlen/q-T/[]/q-T",
            "dead m1 1/maxlen/q-T/[]/q-T",
            "dead m2 1/maxlen/q-T/[]/q-T",
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_length_bytes_counts_payload_bytes() -> Result<()> {
    let (gw, lines) = run("max-bytes").await?;
    assert_eq!(lines, ["queue cccc dddd"], "10 bytes hold two of four");
    dropped_counted(&gw, "amqp_max_length").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_publish_nacks_the_overflow_and_other_queues_still_get_it() -> Result<()> {
    let (_gw, lines) = run("reject-publish").await?;
    assert_eq!(
        lines,
        [
            "confirms ack ack nack nack",
            "queue m0 m1",
            "other m0 m1 m2 m3",
            "after ack m4",
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_publish_dlx_nacks_and_dead_letters_the_overflow() -> Result<()> {
    let (_gw, lines) = run("reject-publish-dlx").await?;
    assert_eq!(
        lines,
        [
            "confirms ack nack nack",
            "queue m0",
            "dead m1 1/maxlen/q-T/[]/q-T",
            "dead m2 1/maxlen/q-T/[]/q-T",
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_and_nacked_without_requeue_go_to_the_dead_letter_exchange() -> Result<()> {
    let (_gw, lines) = run("reject").await?;
    assert_eq!(
        lines,
        [
            "dead r1 1/rejected/q-T/[]/q-T rejected q-T [] rejected q-T",
            "dead r2 1/rejected/q-T/[]/q-T rejected q-T [] rejected q-T",
            "queue ",
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_dead_lettered_queue_ttl_and_per_message() -> Result<()> {
    let (_gw, lines) = run("ttl").await?;
    assert_eq!(
        lines,
        [
            "dead t1 1/expired/q-T/[]/q-T expiration None",
            "dead t2 1/expired/q-T-m/[]/q-T-m/exp=150 expiration None",
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_routing_key_replaces_the_original_one() -> Result<()> {
    let (_gw, lines) = run("routing-key").await?;
    assert_eq!(lines, ["dead k1 1/rejected/q-T/[]/q-T"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_chains_extend_and_count_x_death_and_cycles_are_dropped() -> Result<()> {
    let (gw, lines) = run("chain").await?;
    assert_eq!(
        lines,
        [
            "expired twice c1 1/expired/q-T-2/[dlx-T]/q-T|1/expired/q-T/[]/q-T q-T q-T-2 [dlx-T]",
            "rejected thrice p1 2/rejected/q-T-a/[]/q-T-a|1/rejected/q-T-b/[]/q-T-b",
        ]
    );
    dropped_counted(&gw, "amqp_dead_letter_cycle").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_exchange_drops_with_a_metric() -> Result<()> {
    let (gw, lines) = run("missing-exchange").await?;
    assert_eq!(lines, ["queue "]);
    dropped_counted(&gw, "amqp_dead_letter_no_exchange").await?;
    Ok(())
}

// ---- lapin ---------------------------------------------------------------

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

async fn dead_letter_queue(ch: &Channel, exchange: &str, queue: &str, durable: bool) -> Result<()> {
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

async fn publish_persistent(ch: &Channel, queue: &str, body: &[u8]) -> Result<()> {
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await?
        .await?;
    if !confirm.is_ack() {
        bail!("not confirmed: {confirm:?}");
    }
    Ok(())
}

fn header<'a>(d: &'a lapin::message::Delivery, name: &str) -> Option<&'a AMQPValue> {
    d.properties
        .headers()
        .as_ref()?
        .inner()
        .get(&ShortString::from(name))
}

/// The reasons of a delivery's `x-death` entries, latest first.
fn death_reasons(d: &lapin::message::Delivery) -> Vec<String> {
    let Some(AMQPValue::FieldArray(list)) = header(d, "x-death") else {
        return Vec::new();
    };
    list.as_slice()
        .iter()
        .filter_map(|e| match e {
            AMQPValue::FieldTable(t) => match t.inner().get(&ShortString::from("reason")) {
                Some(AMQPValue::LongString(s)) => Some(s.to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn integer(v: Option<&AMQPValue>) -> Option<i64> {
    match v? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

async fn next(consumer: &mut lapin::Consumer) -> Result<lapin::message::Delivery> {
    tokio::time::timeout(SHORT, consumer.next())
        .await
        .context("no delivery in time")?
        .context("consumer ended")?
        .map_err(Into::into)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_dead_letters_after_the_delivery_limit_with_x_delivery_count() -> Result<()>
{
    let gw = TestGateway::builder().start().await?;
    let conn = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let (q, dlx, dlq) = (unique("quorum"), unique("dlx"), unique("dlq"));
    dead_letter_queue(&ch, &dlx, &dlq, true).await?;
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        table(&[
            ("x-queue-type", text("quorum")),
            ("x-delivery-limit", AMQPValue::LongInt(2)),
            ("x-dead-letter-exchange", text(&dlx)),
        ]),
    )
    .await?;
    publish_persistent(&ch, &q, b"poison").await?;
    ch.basic_qos(1, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "work".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut counts = Vec::new();
    for _ in 0..3 {
        let d = next(&mut consumer).await?;
        assert_eq!(d.data, b"poison");
        counts.push((d.redelivered, integer(header(&d, "x-delivery-count"))));
        d.nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await?;
    }
    assert_eq!(
        counts,
        [(false, None), (true, Some(1)), (true, Some(2))],
        "x-delivery-count on redeliveries"
    );
    let mut dead = ch
        .basic_consume(
            dlq.as_str().into(),
            "dead".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let d = next(&mut dead).await?;
    assert_eq!(d.data, b"poison");
    assert_eq!(death_reasons(&d), ["delivery_limit"]);
    let get = ch
        .basic_get(
            q.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await?;
    assert!(get.is_none(), "gone from its queue after the third return");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_queues_dead_letters_survive_kill_9_never_lost() -> Result<()> {
    let mut gw = TestGateway::builder().spawn(crate::gateway_bin()).await?;
    let uri = gw.amqp_uri();
    let (q, dlx, dlq) = (unique("work"), unique("dlx"), unique("dlq"));
    const N: usize = 50;
    {
        let conn = edge_tests::amqp::connect(&uri).await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        dead_letter_queue(&ch, &dlx, &dlq, true).await?;
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            table(&[("x-dead-letter-exchange", text(&dlx))]),
        )
        .await?;
        for i in 0..N {
            publish_persistent(&ch, &q, format!("m{i}").as_bytes()).await?;
        }
        let mut consumer = ch
            .basic_consume(
                q.as_str().into(),
                "reject".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // Every message rejected; the gateway is killed right after the
        // last reject is sent, its dead-lettering maybe under way.
        for _ in 0..N {
            let d = next(&mut consumer).await?;
            d.reject(BasicRejectOptions { requeue: false }).await?;
        }
        gw.kill().await?;
    }
    gw.restart().await?;
    let conn = edge_tests::amqp::connect(&uri).await?;
    let ch = conn.create_channel().await?;
    // What was not dead-lettered before the kill is back in its queue:
    // rejected again now.
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "again".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut dead = ch
        .basic_consume(
            dlq.as_str().into(),
            "dead".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let deadline = tokio::time::Instant::now() + crate::LONG;
    while seen.len() < N {
        tokio::select! {
            d = consumer.next() => {
                let d = d.context("consumer ended")??;
                d.reject(BasicRejectOptions { requeue: false }).await?;
            }
            d = dead.next() => {
                let d = d.context("consumer ended")??;
                assert_eq!(death_reasons(&d).first().map(String::as_str), Some("rejected"));
                *seen.entry(String::from_utf8_lossy(&d.data).into_owned()).or_default() += 1;
                d.ack(BasicAckOptions::default()).await?;
            }
            _ = tokio::time::sleep_until(deadline) => bail!("dead letters missing: {} of {N} seen", seen.len()),
        }
    }
    let want: std::collections::BTreeSet<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(
        seen.keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        want,
        "every rejected message reached the dead-letter queue"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_count_of_a_durable_queue_survives_kill_9() -> Result<()> {
    let mut gw = TestGateway::builder().spawn(crate::gateway_bin()).await?;
    let uri = gw.amqp_uri();
    let (q, dlx, dlq, barrier) = (
        unique("quorum"),
        unique("dlx"),
        unique("dlq"),
        unique("barrier"),
    );
    let args = table(&[
        ("x-queue-type", text("quorum")),
        ("x-delivery-limit", AMQPValue::LongInt(2)),
        ("x-dead-letter-exchange", text(&dlx)),
    ]);
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    {
        let conn = edge_tests::amqp::connect(&uri).await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        dead_letter_queue(&ch, &dlx, &dlq, true).await?;
        ch.queue_declare(q.as_str().into(), durable, args.clone())
            .await?;
        ch.queue_declare(barrier.as_str().into(), durable, FieldTable::default())
            .await?;
        publish_persistent(&ch, &q, b"poison").await?;
        let mut consumer = ch
            .basic_consume(
                q.as_str().into(),
                "work".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        for _ in 0..2 {
            let d = next(&mut consumer).await?;
            d.nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await?;
        }
        let third = next(&mut consumer).await?;
        assert_eq!(integer(header(&third, "x-delivery-count")), Some(2));
        // A commit after the returns were recorded (the writer keeps order).
        publish_persistent(&ch, &barrier, b"barrier").await?;
        gw.kill().await?;
    }
    gw.restart().await?;
    let conn = edge_tests::amqp::connect(&uri).await?;
    let ch = conn.create_channel().await?;
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "again".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let d = next(&mut consumer).await?;
    assert!(d.redelivered, "returned before the restart");
    assert_eq!(integer(header(&d, "x-delivery-count")), Some(2));
    d.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    })
    .await?;
    let mut dead = ch
        .basic_consume(
            dlq.as_str().into(),
            "dead".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let d = next(&mut dead).await?;
    assert_eq!(death_reasons(&d), ["delivery_limit"], "the third return");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_head_is_exact_beyond_the_queues_memory() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let conn = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let q = unique("big");
    // More than a queue holds in memory (4096): the rest waits in the store.
    const MAX: usize = 5000;
    const SENT: usize = 6000;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(
        q.as_str().into(),
        durable,
        table(&[("x-max-length", AMQPValue::LongInt(MAX as i32))]),
    )
    .await?;
    let mut confirms = Vec::with_capacity(SENT);
    for i in 0..SENT {
        confirms.push(
            ch.basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?,
        );
    }
    for c in confirms {
        assert!(c.await?.is_ack());
    }
    let declared = ch
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..durable
            },
            FieldTable::default(),
        )
        .await?;
    assert_eq!(declared.message_count() as usize, MAX, "exactly the limit");
    let first = ch
        .basic_get(
            q.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await?
        .context("a message")?;
    assert_eq!(
        first.delivery.data,
        format!("m{}", SENT - MAX).as_bytes(),
        "the oldest kept"
    );
    Ok(())
}

/// The lines the gateway's log holds once it has stopped (SIGTERM writes
/// what its summaries still hold).
async fn log_after_stop(gw: &mut edge_tests::GatewayProcess) -> Result<String> {
    gw.terminate(SHORT).await?;
    Ok(std::fs::read_to_string(gw.log_path())?)
}

/// A dead-lettered copy whose only target is a full `reject-publish`
/// queue is refused there: the drop is counted and logged, and the
/// original leaves its queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettering_into_a_full_reject_publish_queue_is_counted_and_logged() -> Result<()> {
    let mut gw = TestGateway::builder().spawn(crate::gateway_bin()).await?;
    let conn = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let (a, dlx, b) = (unique("dl-a"), unique("dl-x"), unique("dl-full"));
    ch.exchange_declare(
        dlx.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let limited = table(&[
        ("x-max-length", AMQPValue::LongInt(1)),
        ("x-overflow", text("reject-publish")),
    ]);
    ch.queue_declare(b.as_str().into(), QueueDeclareOptions::default(), limited)
        .await?;
    ch.queue_bind(
        b.as_str().into(),
        dlx.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let to_dlx = table(&[("x-dead-letter-exchange", text(&dlx))]);
    ch.queue_declare(a.as_str().into(), QueueDeclareOptions::default(), to_dlx)
        .await?;
    publish_persistent(&ch, &b, b"fill").await?;
    publish_persistent(&ch, &a, b"doomed").await?;
    let text_before = gw.metrics().await?;
    let label = "reason=\"amqp_max_length\"";
    let before = edge_tests::http::metric(&text_before, "edge_messages_dropped_total", &[label])
        .unwrap_or(0.0);
    assert_eq!(before, 0.0, "nothing refused yet");

    let mut consumer = ch
        .basic_consume(
            a.as_str().into(),
            "dl".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let d = next(&mut consumer).await?;
    assert_eq!(d.data, b"doomed");
    d.acker
        .reject(BasicRejectOptions { requeue: false })
        .await?;
    assert!(dropped_counted_spawned(&gw, "amqp_max_length").await? >= 1.0);
    ch.basic_cancel("dl".into(), Default::default()).await?;

    // B still holds only what filled it; A holds nothing.
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let qa = ch
        .queue_declare(a.as_str().into(), passive, FieldTable::default())
        .await?;
    assert_eq!(qa.message_count(), 0, "the original left its queue");
    let qb = ch
        .queue_declare(b.as_str().into(), passive, FieldTable::default())
        .await?;
    assert_eq!(qb.message_count(), 1, "the full queue took no copy");
    conn.close(200, "bye".into()).await?;

    let log = log_after_stop(&mut gw).await?;
    let line = log
        .lines()
        .find(|l| l.contains("amqp_max_length") && l.contains("AMQP messages dropped"));
    let line = line.with_context(|| format!("no summary line of the drop in:\n{log}"))?;
    assert!(line.contains(&a), "the line names the queue: {line}");
    Ok(())
}

/// A message rejected from a queue without a dead-letter exchange is
/// dropped: counted, and summarised in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_message_without_a_dead_letter_exchange_is_logged() -> Result<()> {
    let mut gw = TestGateway::builder().spawn(crate::gateway_bin()).await?;
    let conn = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let q = unique("no-dlx");
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    publish_persistent(&ch, &q, b"gone").await?;
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let d = next(&mut consumer).await?;
    d.acker
        .reject(BasicRejectOptions { requeue: false })
        .await?;
    dropped_counted_spawned(&gw, "amqp_rejected").await?;
    conn.close(200, "bye".into()).await?;
    let log = log_after_stop(&mut gw).await?;
    assert!(
        log.lines()
            .any(|l| l.contains("amqp_rejected") && l.contains(&q)),
        "no summary line of the drop in:\n{log}"
    );
    Ok(())
}

/// CPU time (user + system) the process `pid` has used, in clock ticks
/// (100 a second on Linux).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces): state is the 3rd
    // field, utime the 14th, stime the 15th.
    let rest = stat.rsplit_once(')').context("no ')' in stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// A dead-lettered copy the store refuses (its quota is reached) is not
/// lost: the dying messages stay held, are not counted as ready, the
/// gateway idles meanwhile (nothing spins), and once room is made the
/// copies arrive in the dead-letter queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_the_full_store_refuses_is_retried_once_there_is_room() -> Result<()> {
    let mut gw = TestGateway::builder()
        .set("store.max_bytes", "\"32KiB\"")
        .spawn(crate::gateway_bin())
        .await?;
    let pid = gw.pid().context("the gateway's pid")?;
    // A consuming connection, never blocked (it does not publish).
    let consuming = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let ch = consuming.create_channel().await?;
    let (dlx, dlq, q, filler) = (
        unique("full-dlx"),
        unique("full-dlq"),
        unique("full-q"),
        unique("full-filler"),
    );
    dead_letter_queue(&ch, &dlx, &dlq, true).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    // A small drop-head limit: the dying entries outnumber it.
    ch.queue_declare(
        q.as_str().into(),
        durable,
        table(&[
            ("x-dead-letter-exchange", text(&dlx)),
            ("x-max-length", AMQPValue::LongInt(2)),
            ("x-overflow", text("drop-head")),
        ]),
    )
    .await?;
    ch.queue_declare(filler.as_str().into(), durable, FieldTable::default())
        .await?;
    ch.basic_qos(10, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "dying".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let publishing = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let pch = publishing.create_channel().await?;
    pch.confirm_select(ConfirmSelectOptions::default()).await?;
    // Four messages delivered (unacked: not counted by the limit).
    let mut deliveries = Vec::new();
    for i in 0..4 {
        publish_persistent(&pch, &q, format!("d{i}").as_bytes()).await?;
        deliveries.push(next(&mut consumer).await?);
    }
    // The store fills up to its quota.
    let body = "x".repeat(1024);
    let mut filled = 0;
    loop {
        let confirm = pch
            .basic_publish(
                "".into(),
                filler.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await?;
        if confirm.is_nack() {
            break;
        }
        filled += 1;
        assert!(filled < 100, "100 KiB acked under a 32 KiB quota");
    }
    // They die; their copies cannot be stored now.
    for d in &deliveries {
        d.reject(BasicRejectOptions { requeue: false }).await?;
    }
    // None of them is ready, nor lost from the store's view.
    let passive = QueueDeclareOptions {
        passive: true,
        ..durable
    };
    let counted = ch
        .queue_declare(q.as_str().into(), passive, FieldTable::default())
        .await?;
    assert_eq!(counted.message_count(), 0, "dying messages are not ready");
    // Meanwhile the gateway idles: no pump turns without waiting.
    let before = cpu_ticks(pid)?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid)? - before;
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        (used as f64 / 100.0) < 0.25 * elapsed,
        "the gateway used {used} ticks of CPU in {elapsed:.1} s while idle"
    );
    let counted = ch
        .queue_declare(q.as_str().into(), passive, FieldTable::default())
        .await?;
    assert_eq!(counted.message_count(), 0);

    // Room: the filler goes. The copies follow (unless the store made
    // room on its own meanwhile), in order, nothing lost.
    let purged = ch
        .queue_purge(filler.as_str().into(), Default::default())
        .await?;
    assert_eq!(purged, filled);
    let mut dead_consumer = ch
        .basic_consume(
            dlq.as_str().into(),
            "dead".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    for i in 0..4 {
        let d = next(&mut dead_consumer).await?;
        assert_eq!(d.data, format!("d{i}").as_bytes());
        assert_eq!(death_reasons(&d), ["rejected"]);
        d.ack(BasicAckOptions::default()).await?;
    }
    let counted = ch
        .queue_declare(q.as_str().into(), passive, FieldTable::default())
        .await?;
    assert_eq!(counted.message_count(), 0, "the dead entries are gone");
    consuming.close(200, "bye".into()).await?;
    gw.terminate(SHORT).await?;
    Ok(())
}
