//! rabbitmq-c's command-line clients (Debian's `amqp-tools`, installed by
//! scripts/test.sh) against the gateway's AMQP listener: declare a durable
//! queue, publish with properties, get and consume, cross-protocol with
//! mosquitto on `amq.topic`, delete.

use std::process::Stdio;

use anyhow::{Context, Result, bail};
use edge_tests::amqp::connect;
use edge_tests::http::metric;
use edge_tests::mqtt::{MosquittoSub, mosquitto_pub};
use edge_tests::{TestGateway, unique, wait_for};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

use crate::SHORT;

/// Runs `tool` with the gateway's address and `args`; its stdout, or an
/// error naming its exit status and stderr.
async fn tool(tool: &str, port: u16, args: &[&str]) -> Result<String> {
    let out = tokio::time::timeout(
        SHORT,
        tokio::process::Command::new(tool)
            .args(["--server", "127.0.0.1", "--port", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("{tool} {args:?} hung"))?
    .with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!(
            "{tool} {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_tools_declare_publish_get_consume_and_delete() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let port = gw.amqp_addr().port();
    let queue = unique("tools");

    let declared = tool("amqp-declare-queue", port, &["-d", "-q", &queue]).await?;
    assert_eq!(declared.trim(), queue, "declare-queue prints the name");

    // Every property amqp-publish can set arrives, as RabbitMQ would deliver it.
    tool(
        "amqp-publish",
        port,
        &[
            "-r",
            &queue,
            "-p",
            "-C",
            "text/plain",
            "-E",
            "gzip",
            "-t",
            "replies",
            "-H",
            "x-site: north",
            "-H",
            "x-n: 7",
            "-b",
            "first",
        ],
    )
    .await?;
    let conn = connect(&gw.amqp_uri()).await?;
    let channel = conn.create_channel().await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "check".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let d = tokio::time::timeout(SHORT, consumer.next())
        .await?
        .context("consumer ended")??;
    assert_eq!(d.data, b"first");
    let p = &d.properties;
    assert_eq!(*p.delivery_mode(), Some(2), "-p: persistent");
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("text/plain")
    );
    assert_eq!(
        p.content_encoding().as_ref().map(|s| s.as_str()),
        Some("gzip")
    );
    assert_eq!(p.reply_to().as_ref().map(|s| s.as_str()), Some("replies"));
    let headers = p.headers().clone().unwrap_or_default();
    let header = |k: &str| match headers.inner().get(k) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        other => other.map(|v| format!("{v:?}")),
    };
    assert_eq!(header("x-site").as_deref(), Some("north"));
    assert_eq!(header("x-n").as_deref(), Some("7"));
    d.ack(BasicAckOptions::default()).await?;
    conn.close(200, "checked".into()).await?;

    // Line-buffered: one message per line, then consumed in order.
    let lines = tokio::process::Command::new("amqp-publish")
        .args(["--server", "127.0.0.1", "--port", &port.to_string()])
        .args(["-r", &queue, "-p", "-l"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    feed(lines, b"one\ntwo\nthree\nfour\n").await?;
    // amqp-publish takes no confirms: the queue's gauge says when all four
    // are in.
    let series = format!("queue=\"{queue}\"");
    wait_for("four ready messages on /metrics", SHORT, || async {
        let text = gw.metrics().await.ok()?;
        (metric(
            &text,
            "edge_amqp_queue_messages",
            &[&series, "state=\"ready\""],
        ) == Some(4.0))
        .then_some(())
    })
    .await?;
    let got = tool("amqp-get", port, &["-q", &queue]).await?;
    assert_eq!(got, "one\n", "the first line, in order");
    let consumed = tool(
        "amqp-consume",
        port,
        &["-q", &queue, "-c", "3", "-p", "1", "cat"],
    )
    .await?;
    assert_eq!(consumed, "two\nthree\nfour\n", "the rest, in order");
    assert!(
        tool("amqp-get", port, &["-q", &queue]).await.is_err(),
        "amqp-get on an empty queue fails"
    );

    // Cross-protocol on amq.topic: AMQP in, MQTT out...
    let prefix = unique("tools");
    let mut sub = MosquittoSub::start(gw.mqtt_addr().port(), &[&format!("{prefix}/#")]).await?;
    tool(
        "amqp-publish",
        port,
        &[
            "-e",
            "amq.topic",
            "-r",
            &format!("{prefix}.a.b"),
            "-b",
            "to mqtt",
        ],
    )
    .await?;
    assert_eq!(
        sub.recv(SHORT).await?,
        (format!("{prefix}/a/b"), "to mqtt".to_string())
    );
    sub.stop().await;
    // ...and MQTT in, AMQP out: amqp-consume declares its (auto-delete)
    // queue and binds it, the gauge says when its consumer is there, then
    // mosquitto_pub publishes.
    let bound = unique("tools-bound");
    let consume = tokio::process::Command::new("amqp-consume")
        .args(["--server", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "-q",
            &bound,
            "-e",
            "amq.topic",
            "-r",
            &format!("{prefix}.from.*"),
        ])
        .args(["-c", "1", "cat"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let series = format!("queue=\"{bound}\"");
    let consuming = wait_for("amqp-consume's consumer on /metrics", SHORT, || async {
        let text = gw.metrics().await.ok()?;
        (metric(&text, "edge_amqp_queue_consumers", &[&series]) == Some(1.0)).then_some(())
    })
    .await;
    if let Err(e) = consuming {
        let mut consume = consume;
        let _ = consume.start_kill();
        let out = consume.wait_with_output().await?;
        bail!(
            "{e:#}; amqp-consume: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    mosquitto_pub(
        gw.mqtt_addr().port(),
        &format!("{prefix}/from/mqtt"),
        "to amqp",
        1,
    )
    .await?;
    let out = tokio::time::timeout(SHORT, consume.wait_with_output()).await??;
    assert!(out.status.success(), "amqp-consume: {}", out.status);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "to amqp");

    // Delete, and the queue is gone.
    tool("amqp-delete-queue", port, &["-q", &queue]).await?;
    let conn = connect(&gw.amqp_uri()).await?;
    let channel = conn.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let gone = channel
        .queue_declare(queue.as_str().into(), passive, FieldTable::default())
        .await;
    assert!(gone.is_err(), "the deleted queue is still there");
    gw.shutdown().await?;
    Ok(())
}

/// Writes `input` to the child's stdin, closes it, and waits for it.
async fn feed(mut child: tokio::process::Child, input: &[u8]) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(input).await?;
    drop(stdin);
    let status = tokio::time::timeout(SHORT, child.wait()).await??;
    if !status.success() {
        bail!("amqp-publish -l: {status}");
    }
    Ok(())
}
