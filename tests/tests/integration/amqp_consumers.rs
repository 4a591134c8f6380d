//! Queue arguments that change who gets what: `x-max-priority` (pika),
//! `x-single-active-consumer` (pika, two connections), `x-expires` (pika,
//! durable across a restart too), and the redelivered flag of a durable
//! queue's messages after kill -9 and after a clean restart (lapin).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edge_tests::amqp::connect;
use edge_tests::{TestGateway, unique};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};

use crate::SHORT;

/// Helpers every script below starts with: `port` and `queue` from argv,
/// `connect()`, `publish(ch, body, priority)` (persistent, confirmed,
/// mandatory: False when it was returned), `drain(conn, cond)`, which
/// processes events on `conn` until `cond()` holds (bounded),
/// `single_active_with(conn, n)` (the queue as a single-active-consumer
/// one holding m0..m<n-1>) and `consume_all(ch, q, n)`.
const PRELUDE: &str = r#"
import sys, time, pika
port, queue = int(sys.argv[1]), sys.argv[2]
def connect():
    return pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", port, "/", pika.PlainCredentials("guest", "guest")))
def publish(ch, body, priority=None):
    try:
        ch.basic_publish("", queue, body.encode(),
            pika.BasicProperties(delivery_mode=2, priority=priority), mandatory=True)
        return True
    except pika.exceptions.UnroutableError:
        return False
def drain(conn, cond, limit=15):
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise Exception("condition not met within %ss" % limit)
        conn.process_data_events(time_limit=0.05)
def single_active_with(conn, n):
    ch = conn.channel()
    ch.queue_declare(queue, arguments={"x-single-active-consumer": True})
    ch.confirm_delivery()
    for i in range(n):
        assert publish(ch, "m%d" % i)
    return ch
def consume_all(ch, q, n):
    got = []
    def on(c, m, p, b):
        got.append("%s %s" % (b.decode(), m.redelivered))
        c.basic_ack(m.delivery_tag)
    tag = ch.basic_consume(q, on)
    drain(ch.connection, lambda: len(got) >= n)
    ch.basic_cancel(tag)
    return got
"#;

async fn pika(what: &str, body: &str, args: &[&str]) -> Result<Vec<String>> {
    crate::run_python(what, &format!("{PRELUDE}{body}"), args).await
}

/// Publishes `(body, priority)` pairs to a fresh queue declared with
/// `arguments`, then prints what a consumer receives, in order.
const PRIORITIES: &str = r#"
import json
phase, arguments, sent = sys.argv[3], json.loads(sys.argv[4]), json.loads(sys.argv[5])
conn = connect()
ch = conn.channel()
ch.confirm_delivery()
if phase in ("all", "publish"):
    ch.queue_declare(queue, durable=True, arguments=arguments)
    for body, priority in sent:
        assert publish(ch, body, priority)
if phase in ("all", "consume"):
    ch.basic_qos(prefetch_count=1)
    for line in consume_all(ch, queue, len(sent)):
        print(line)
conn.close()
"#;

async fn priorities(
    port: &str,
    queue: &str,
    phase: &str,
    arguments: &str,
    sent: &[(String, Option<u8>)],
) -> Result<Vec<String>> {
    let sent: Vec<String> = sent
        .iter()
        .map(|(body, p)| match p {
            Some(p) => format!(r#"["{body}", {p}]"#),
            None => format!(r#"["{body}", null]"#),
        })
        .collect();
    let sent = format!("[{}]", sent.join(", "));
    pika(
        "priorities",
        PRIORITIES,
        &[port, queue, phase, arguments, &sent],
    )
    .await
}

/// Bodies `p<priority>-<n>` in an interleaved arrival order, and the order
/// a priority queue with `max` delivers them in: highest (capped at
/// `max`) first, arrival order within a priority.
fn interleaved(max: u8) -> (Vec<(String, Option<u8>)>, Vec<String>) {
    let mut sent = Vec::new();
    for n in 0..3 {
        for p in [3u8, 0, 9, 5, 1, 8, 2, 7, 4, 6] {
            sent.push((format!("p{p}-{n}"), Some(p)));
        }
        sent.push((format!("none-{n}"), None));
        sent.push((format!("p200-{n}"), Some(200)));
    }
    let effective = |p: Option<u8>| p.unwrap_or(0).min(max);
    let mut order: Vec<(usize, &(String, Option<u8>))> = sent.iter().enumerate().collect();
    order.sort_by_key(|(i, (_, p))| (std::cmp::Reverse(effective(*p)), *i));
    let want = order
        .into_iter()
        .map(|(_, (body, _))| format!("{body} False"))
        .collect();
    (sent, want)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_queue_delivers_higher_priorities_first_and_fifo_within_one() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let port = gw.amqp_addr().port().to_string();
    for max in [9u8, 5] {
        let (sent, want) = interleaved(max);
        let queue = unique("prio");
        let args = format!(r#"{{"x-max-priority": {max}}}"#);
        let got = priorities(&port, &queue, "all", &args, &sent).await?;
        assert_eq!(got, want, "x-max-priority {max}");
    }
    // Without x-max-priority the property changes nothing.
    let (sent, _) = interleaved(9);
    let got = priorities(&port, &unique("fifo"), "all", "{}", &sent).await?;
    let fifo: Vec<String> = sent.iter().map(|(b, _)| format!("{b} False")).collect();
    assert_eq!(got, fifo);
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_priority_queue_keeps_its_order_across_kill_9() -> Result<()> {
    let mut gw = TestGateway::builder().spawn(crate::gateway_bin()).await?;
    let port = gw.amqp_addr().port().to_string();
    let queue = unique("dprio");
    let args = r#"{"x-max-priority": 9}"#;
    let (sent, want) = interleaved(9);
    let none = priorities(&port, &queue, "publish", args, &sent).await?;
    assert!(none.is_empty());
    gw.kill().await?;
    gw.restart().await?;
    // Never delivered before the kill: not redelivered.
    let got = priorities(&port, &queue, "consume", args, &sent).await?;
    assert_eq!(got, want);
    Ok(())
}

const REDECLARE: &str = r#"
conn = connect()
ch = conn.channel()
ch.queue_declare(queue, arguments={"x-max-priority": 9})
ch.queue_declare(queue, arguments={"x-max-priority": 9})
print("same ok")
try:
    ch.queue_declare(queue, arguments={"x-max-priority": 5})
except pika.exceptions.ChannelClosedByBroker as e:
    print(e.reply_code, e.reply_text)
ch = conn.channel()
try:
    ch.queue_declare(queue)
except pika.exceptions.ChannelClosedByBroker as e:
    print(e.reply_code, e.reply_text)
conn.close()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeclaring_with_another_max_priority_is_precondition_failed() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let port = gw.amqp_addr().port().to_string();
    let queue = unique("reprio");
    let got = pika("redeclare", REDECLARE, &[&port, &queue]).await?;
    assert_eq!(
        got,
        [
            "same ok".to_string(),
            format!(
                "406 PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue '{queue}' in vhost '/': received '5' but current is '9'"
            ),
            format!(
                "406 PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue '{queue}' in vhost '/': received none but current is '9'"
            ),
        ]
    );
    gw.shutdown().await?;
    Ok(())
}

/// Two consumers on a single-active-consumer queue, each on its own
/// connection: A (prefetch 3) then B. A is cancelled: its unacked
/// messages stay with its channel, as in RabbitMQ (acked there).
const SINGLE_ACTIVE: &str = r#"
setup = connect()
sch = single_active_with(setup, 10)
a_conn, b_conn = connect(), connect()
a, b = a_conn.channel(), b_conn.channel()
a.basic_qos(prefetch_count=3)
got_a, got_b = [], []
a_tag = a.basic_consume(queue, lambda c, m, p, body: got_a.append((m.delivery_tag, body.decode(), m.redelivered)))
drain(a_conn, lambda: len(got_a) == 3)
b.basic_consume(queue, lambda c, m, p, body: (got_b.append("%s %s" % (body.decode(), m.redelivered)), c.basic_ack(m.delivery_tag)))
# Anything the queue sent B with its consume-ok came before this reply.
ok = b.queue_declare(queue, passive=True)
b_conn.process_data_events(time_limit=0)
print("waiting", got_b, ok.method.consumer_count, ok.method.message_count)
try:
    setup.channel().basic_consume(queue, lambda *x: None, exclusive=True)
except pika.exceptions.ChannelClosedByBroker as e:
    print(e.reply_code, e.reply_text)
# A acks its first: only A gets the next one.
a.basic_ack(got_a[0][0])
drain(a_conn, lambda: len(got_a) == 4)
print("a", " ".join(body for _, body, _ in got_a))
a.basic_cancel(a_tag)
drain(b_conn, lambda: len(got_b) == 6)
# A's unacked ones are still A's to ack.
for tag, _, _ in got_a[1:]:
    a.basic_ack(tag)
a.queue_declare(queue, passive=True)
print("b", " ".join(got_b))
ok = sch.queue_declare(queue, passive=True)
print("left", ok.method.message_count)
for c in (a_conn, b_conn, setup):
    if c.is_open:
        c.close()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_active_consumer_queue_serves_one_consumer_then_the_next() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let port = gw.amqp_addr().port().to_string();
    let queue = unique("sac");
    let refused = format!("403 ACCESS_REFUSED - queue '{queue}' in vhost '/' in exclusive use");
    let got = pika("single active", SINGLE_ACTIVE, &[&port, &queue]).await?;
    assert_eq!(
        got,
        [
            "waiting [] 2 7".to_string(),
            refused.clone(),
            "a m0 m1 m2 m3".into(),
            "b m4 False m5 False m6 False m7 False m8 False m9 False".into(),
            "left 0".into(),
        ]
    );
    gw.shutdown().await?;
    Ok(())
}

/// A (prefetch 3, in a child process) holds three messages while B waits;
/// then A's process is killed: its connection ends without a word.
const SINGLE_ACTIVE_GONE: &str = r#"
import subprocess
CHILD = '''
ch = connect().channel()
ch.basic_qos(prefetch_count=3)
got = []
ch.basic_consume(queue, lambda c, m, p, b: got.append(b.decode()))
drain(ch.connection, lambda: len(got) == 3)
print("a", " ".join(got), flush=True)
sys.stdin.read()
'''
setup = connect()
sch = single_active_with(setup, 10)
a = subprocess.Popen([sys.executable, "-c", PRELUDE + CHILD, str(port), queue],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
print(a.stdout.readline().strip())
b_conn = connect()
b = b_conn.channel()
got_b = []
b.basic_consume(queue, lambda c, m, p, body: (got_b.append("%s %s" % (body.decode(), m.redelivered)), c.basic_ack(m.delivery_tag)))
ok = b.queue_declare(queue, passive=True)
b_conn.process_data_events(time_limit=0)
print("waiting", got_b, ok.method.consumer_count)
a.kill()
a.wait()
drain(b_conn, lambda: len(got_b) == 10)
print("b", " ".join(got_b))
b_conn.close()
setup.close()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_single_active_consumer_gets_the_unacked_ones_of_a_vanished_one() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let port = gw.amqp_addr().port().to_string();
    let queue = unique("sacgone");
    // The child runs the same prelude.
    let script = format!("PRELUDE = {PRELUDE:?}\n{SINGLE_ACTIVE_GONE}");
    let got = pika("single active", &script, &[&port, &queue]).await?;
    assert_eq!(
        got,
        [
            "a m0 m1 m2",
            "waiting [] 2",
            "b m0 True m1 True m2 True m3 False m4 False m5 False m6 False m7 False m8 False m9 False",
        ],
        "A's unacked ones go back to their place, B gets them first"
    );
    gw.shutdown().await?;
    Ok(())
}

/// Commands in order: `declare=<ms>` (a durable queue with x-expires),
/// `probe` (is the queue there? a mandatory publish to it is returned once
/// it is gone; a passive declare would renew its lease, as in RabbitMQ),
/// `wait-gone` (probes until it is gone, bounded), `passive` (a passive
/// declare: ok or the 404), `consume-for=<s>` (a consumer keeps it that
/// long and gets a message published then; cancelled after).
const EXPIRES: &str = r#"
conn = connect()
ch = conn.channel()
ch.confirm_delivery()
for cmd in sys.argv[3:]:
    op, _, arg = cmd.partition("=")
    if op == "declare":
        ch.queue_declare(queue, durable=True, arguments={"x-expires": int(arg)})
        print("declared")
    elif op == "probe":
        print("there" if publish(ch, "probe") else "gone")
    elif op == "wait-gone":
        start = time.monotonic()
        while publish(ch, "probe"):
            if time.monotonic() - start > 30:
                raise Exception("the queue did not expire")
            time.sleep(0.05)
        print("gone after %d ms" % ((time.monotonic() - start) * 1000))
    elif op == "passive":
        try:
            ch.queue_declare(queue, passive=True)
            print("passive ok")
        except pika.exceptions.ChannelClosedByBroker as e:
            print(e.reply_code, e.reply_text)
            ch = conn.channel()
            ch.confirm_delivery()
    elif op == "consume-for":
        got = []
        tag = ch.basic_consume(queue, lambda c, m, p, b: got.append(b), auto_ack=True)
        until = time.monotonic() + float(arg)
        while time.monotonic() < until:
            conn.process_data_events(time_limit=0.05)
        assert publish(ch, "while consumed")
        drain(conn, lambda: b"while consumed" in got)
        ch.basic_cancel(tag)
        print("consumed")
conn.close()
"#;

fn gone_after(line: &str) -> Result<u64> {
    line.strip_prefix("gone after ")
        .and_then(|l| l.strip_suffix(" ms"))
        .with_context(|| format!("not a 'gone after' line: {line:?}"))?
        .parse()
        .context("gone after <ms>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_queue_expires_and_a_consumer_keeps_it() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let port = gw.amqp_addr().port().to_string();
    let queue = unique("exp");
    let got = pika(
        "expires",
        EXPIRES,
        &[
            &port,
            &queue,
            "declare=600",
            "probe",
            "wait-gone",
            "passive",
        ],
    )
    .await?;
    assert_eq!(got[..2], ["declared", "there"]);
    assert!(gone_after(&got[2])? <= 10_000, "{got:?}");
    assert_eq!(
        got[3],
        format!("404 NOT_FOUND - no queue '{queue}' in vhost '/'")
    );

    // A consumer for three times the expiry keeps it; once it is cancelled
    // the expiry counts again from then.
    let queue = unique("exp");
    let started = Instant::now();
    let got = pika(
        "expires",
        EXPIRES,
        &[
            &port,
            &queue,
            "declare=500",
            "consume-for=1.5",
            "probe",
            "wait-gone",
        ],
    )
    .await?;
    assert_eq!(got[..3], ["declared", "consumed", "there"]);
    gone_after(&got[3])?;
    assert!(started.elapsed() >= Duration::from_millis(2000));
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_expiring_queue_expires_counting_from_the_gateways_start() -> Result<()> {
    let mut gw = TestGateway::builder().spawn(crate::gateway_bin()).await?;
    let port = gw.amqp_addr().port().to_string();
    let queue = unique("dexp");
    let expires = Duration::from_millis(3000);
    let ms = format!("declare={}", expires.as_millis());
    let got = pika("expires", EXPIRES, &[&port, &queue, &ms, "probe"]).await?;
    assert_eq!(got, ["declared", "there"]);
    gw.kill().await?;
    let killed = Instant::now();
    gw.restart().await?;
    let got = pika("expires", EXPIRES, &[&port, &queue, "probe", "wait-gone"]).await?;
    assert_eq!(got[0], "there", "the restart restarted the expiry");
    gone_after(&got[1])?;
    assert!(
        killed.elapsed() >= expires,
        "deleted {:?} after the kill: the expiry counts from the start",
        killed.elapsed()
    );
    // Its definition went with it. A declaration waits for a deletion's
    // rows (definition changes are serialised): once this one is declared,
    // the deletion is durable, and the kill cannot cut it short.
    let conn = connect(&gw.amqp_uri()).await?;
    let ch = conn.create_channel().await?;
    ch.queue_declare(
        unique("barrier").as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    conn.close(200, "barrier".into()).await?;
    gw.restart().await?;
    let got = pika("expires", EXPIRES, &[&port, &queue, "passive"]).await?;
    assert_eq!(
        got,
        [format!("404 NOT_FOUND - no queue '{queue}' in vhost '/'")]
    );
    Ok(())
}

// ---- the redelivered flag across restarts (lapin) -----------------------

async fn durable_queue_with(uri: &str, queue: &str, bodies: &[&str]) -> Result<()> {
    let conn = connect(uri).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    for body in bodies {
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        if !tokio::time::timeout(SHORT, confirm).await??.is_ack() {
            bail!("publish of {body} not confirmed");
        }
    }
    conn.close(200, "bye".into()).await?;
    Ok(())
}

/// A consumer (manual acks) that received, and holds unacked, the first
/// `n` messages of `queue`.
async fn holding(uri: &str, queue: &str, n: u16) -> Result<(Connection, Channel, Vec<String>)> {
    let conn = connect(uri).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(n, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "holder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut held = Vec::new();
    for _ in 0..n {
        let d = tokio::time::timeout(SHORT, consumer.next())
            .await
            .context("no delivery")?
            .context("consumer ended")??;
        held.push(String::from_utf8(d.data)?);
    }
    Ok((conn, ch, held))
}

/// Every message of `queue` as "<body> <redelivered>", acked.
async fn drain(uri: &str, queue: &str, n: usize) -> Result<Vec<String>> {
    let conn = connect(uri).await?;
    let ch = conn.create_channel().await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut got = Vec::new();
    while got.len() < n {
        let d = tokio::time::timeout(SHORT, consumer.next())
            .await
            .with_context(|| format!("got only {got:?}"))?
            .context("consumer ended")??;
        got.push(format!(
            "{} {}",
            String::from_utf8(d.data.clone())?,
            d.redelivered
        ));
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    conn.close(200, "bye".into()).await?;
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_a_consumer_held_come_back_redelivered_after_kill_9() -> Result<()> {
    let mut gw = TestGateway::builder().spawn(crate::gateway_bin()).await?;
    let uri = gw.amqp_uri();
    let queue = unique("redkill");
    durable_queue_with(&uri, &queue, &["m0", "m1", "m2", "m3"]).await?;
    let (_conn, _ch, held) = holding(&uri, &queue, 2).await?;
    assert_eq!(held, ["m0", "m1"]);
    gw.kill().await?;
    gw.restart().await?;
    let got = drain(&uri, &queue, 4).await?;
    // After a crash of a queue that was delivering, any stored message may
    // have been delivered: all are flagged (never a false "false").
    assert_eq!(got, ["m0 true", "m1 true", "m2 true", "m3 true"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_clean_restart_only_delivered_messages_are_redelivered() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let uri = gw.amqp_uri();
    let queue = unique("redclean");
    durable_queue_with(&uri, &queue, &["m0", "m1", "m2", "m3"]).await?;
    let (conn, _ch, held) = holding(&uri, &queue, 2).await?;
    assert_eq!(held, ["m0", "m1"]);
    // The shutdown closes the consumer's connection: m0 and m1 go back.
    let root = gw.shutdown().await?;
    drop(conn);
    let gw = TestGateway::builder().root(root).start().await?;
    let uri = gw.amqp_uri();
    let got = drain(&uri, &queue, 4).await?;
    assert_eq!(got, ["m0 true", "m1 true", "m2 false", "m3 false"]);
    // Still precise after a second clean restart.
    durable_queue_with(&uri, &queue, &["n0", "n1"]).await?;
    let root = gw.shutdown().await?;
    let gw = TestGateway::builder().root(root).start().await?;
    let got = drain(&gw.amqp_uri(), &queue, 2).await?;
    assert_eq!(got, ["n0 false", "n1 false"]);
    gw.shutdown().await?;
    Ok(())
}

// ---- a priority backlog larger than memory (lapin) ----------------------

/// Publishes `(body, priority)` persistent, confirmed, in chunks.
async fn publish_all(ch: &Channel, queue: &str, sent: &[(String, u8)]) -> Result<()> {
    for chunk in sent.chunks(500) {
        let mut confirms = Vec::new();
        for (body, priority) in chunk {
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_priority(*priority);
            confirms.push(
                ch.basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    properties,
                )
                .await?,
            );
        }
        for confirm in confirms {
            if !tokio::time::timeout(SHORT, confirm).await??.is_ack() {
                bail!("a publish was not confirmed");
            }
        }
    }
    Ok(())
}

/// `n` messages of `queue`, acked, by a consumer with prefetch 50.
async fn consume_n(uri: &str, queue: &str, n: usize) -> Result<Vec<String>> {
    let conn = connect(uri).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(50, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "deep".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let d = tokio::time::timeout(crate::LONG, consumer.next())
            .await
            .with_context(|| format!("only {} of {n} delivered", got.len()))?
            .context("consumer ended")??;
        got.push(String::from_utf8(d.data.clone())?);
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    conn.close(200, "bye".into()).await?;
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_backlog_larger_than_memory_is_delivered_in_priority_order() -> Result<()> {
    // More than a queue holds in memory (4096), then higher priorities
    // behind them: live, then after a restart.
    const LOW: usize = 4500;
    let mut sent: Vec<(String, u8)> = (0..LOW).map(|i| (format!("low-{i:05}"), 1)).collect();
    sent.extend((0..10).map(|i| (format!("high-{i:02}"), 9)));
    sent.extend((0..10).map(|i| (format!("mid-{i:02}"), 5)));
    let mut want: Vec<String> = sent[LOW..].iter().map(|(b, _)| b.clone()).collect();
    want.extend(sent[..LOW].iter().map(|(b, _)| b.clone()));

    let gw = TestGateway::builder().start().await?;
    let queue = unique("deepprio");
    let conn = connect(&gw.amqp_uri()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-max-priority".into(),
        lapin::types::AMQPValue::ShortShortUInt(9),
    );
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await?;
    publish_all(&ch, &queue, &sent).await?;
    let got = consume_n(&gw.amqp_uri(), &queue, sent.len()).await?;
    assert!(got == want, "live: first {:?}", &got[..25]);

    publish_all(&ch, &queue, &sent).await?;
    conn.close(200, "bye".into()).await?;
    let root = gw.shutdown().await?;
    let gw = TestGateway::builder().root(root).start().await?;
    let got = consume_n(&gw.amqp_uri(), &queue, sent.len()).await?;
    assert!(got == want, "after a restart: first {:?}", &got[..25]);
    gw.shutdown().await?;
    Ok(())
}
