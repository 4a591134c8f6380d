//! Python's pika (Debian's python3-pika, installed by scripts/test.sh), the
//! client most local applications use, running the classic persistence
//! recipe against the gateway: a durable queue, delivery_mode 2, publisher
//! confirms, a mandatory publish returned, a kill -9 of the gateway, then a
//! consumer with manual acks that nacks (requeue) its first delivery.

use anyhow::Result;
use edge_tests::{TestGateway, unique};

const SCRIPT: &str = r#"
import sys, pika
port, queue, phase = int(sys.argv[1]), sys.argv[2], sys.argv[3]
params = pika.ConnectionParameters(
    "127.0.0.1", port, "/", pika.PlainCredentials("guest", "guest"), heartbeat=30)
conn = pika.BlockingConnection(params)
ch = conn.channel()
if phase == "publish":
    ch.queue_declare(queue=queue, durable=True)
    ch.confirm_delivery()
    for i in range(10):
        props = pika.BasicProperties(delivery_mode=2, content_type="text/plain", headers={"n": i})
        ch.basic_publish("", queue, ("msg-%d" % i).encode(), props, mandatory=True)
    try:
        ch.basic_publish("amq.direct", "nobody", b"x", mandatory=True)
        print("unroutable accepted")
    except pika.exceptions.UnroutableError:
        print("unroutable returned")
    print("published 10")
else:
    ch.queue_declare(queue=queue, durable=True, passive=True)
    ch.basic_qos(prefetch_count=1)
    got, nacked = [], [False]
    def on_message(c, method, props, body):
        if not nacked[0]:
            nacked[0] = True
            c.basic_nack(method.delivery_tag, requeue=True)
            return
        n = props.headers.get("n") if props.headers else None
        got.append("%s %s %s %s %s" % (body.decode(), method.redelivered, props.delivery_mode, props.content_type, n))
        c.basic_ack(method.delivery_tag)
        if len(got) == 10:
            c.stop_consuming()
    ch.basic_consume(queue, on_message)
    conn.call_later(30, ch.stop_consuming)
    ch.start_consuming()
    for line in got:
        print(line)
    method, props, body = ch.basic_get(queue, auto_ack=True)
    print("get-empty", method is None)
    try:
        ch.queue_declare(queue="missing-" + queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        print("passive", e.reply_code)
conn.close()
"#;

async fn run_pika(args: &[&str]) -> Result<Vec<String>> {
    crate::run_python("pika", SCRIPT, args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pika_persistence_recipe_survives_kill_9() -> Result<()> {
    let mut gw = TestGateway::builder().spawn(crate::gateway_bin()).await?;
    let port = gw.amqp_addr().port().to_string();
    let queue = unique("pika");
    let published = run_pika(&[&port, &queue, "publish"]).await?;
    assert_eq!(published, ["unroutable returned", "published 10"]);

    gw.kill().await?;
    gw.restart().await?;

    let consumed = run_pika(&[&port, &queue, "consume"]).await?;
    let mut want: Vec<String> = (0..10)
        .map(|i| {
            let redelivered = if i == 0 { "True" } else { "False" };
            format!("msg-{i} {redelivered} 2 text/plain {i}")
        })
        .collect();
    want.push("get-empty True".into());
    want.push("passive 404".into());
    assert_eq!(consumed, want, "in order, the nacked one again first");
    Ok(())
}
