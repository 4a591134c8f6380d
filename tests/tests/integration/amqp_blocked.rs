//! `connection.blocked` / `connection.unblocked` to publishing connections
//! of pika (which announces the capability) and raw clients while the
//! store refuses: a tiny quota filled over AMQP,
//! the upstream that would drain it refusing the gateway's login until the
//! test creates its user; then the backlog drains, the store clears its
//! "full" state without any publish, the clients hear `unblocked`, and a
//! publish is confirmed again.

use std::process::Stdio;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{AMQPClass, connection};
use amq_protocol::types::{AMQPValue, FieldTable};
use anyhow::{Context, Result, bail};
use edge_tests::amqp::{AmqpQueue, QueueSpec};
use edge_tests::amqp_raw::{RawAmqp, frame_bytes};
use edge_tests::http::{get, metric};
use edge_tests::{TestGateway, unique, wait_for};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::{LONG, SHORT, shared_node};

/// Fills the store through amq.topic until a publish is nacked, reports
/// the blocked notification, then (once told on stdin) waits to be
/// unblocked and publishes once more.
const SCRIPT: &str = r#"
import sys, time, pika
port, key = int(sys.argv[1]), sys.argv[2]
def connect():
    params = pika.ConnectionParameters("127.0.0.1", port, "/",
        pika.PlainCredentials("guest", "guest"), heartbeat=30)
    conn = pika.BlockingConnection(params)
    events = []
    conn.add_on_connection_blocked_callback(
        lambda c, frame: events.append("blocked " + frame.method.reason))
    conn.add_on_connection_unblocked_callback(lambda c, frame: events.append("unblocked"))
    return conn, events
def wait(conn, events, what):
    deadline = time.time() + 60
    while not any(e.startswith(what) for e in events) and time.time() < deadline:
        conn.process_data_events(time_limit=0.2)
    return [e for e in events if e.startswith(what)]
conn, events = connect()
ch = conn.channel()
ch.confirm_delivery()
props = pika.BasicProperties(delivery_mode=2)
acked = 0
for i in range(1000):
    try:
        ch.basic_publish("amq.topic", key, ("%04d" % i).encode() + b"x" * 1000, props)
        acked += 1
    except pika.exceptions.NackError:
        break
print("acked", acked, "then nacked", flush=True)
print("first:", wait(conn, events, "blocked")[:1], flush=True)
sys.stdin.readline()
print("first:", wait(conn, events, "unblocked")[:1], flush=True)
ch.basic_publish("amq.topic", key, b"after", props)
print("confirmed after", flush=True)
conn.close()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_is_told_blocked_while_the_store_is_full_and_unblocked_once_it_drains() -> Result<()> {
    let node = shared_node().await?;
    // Not a user yet: the upstream refuses the gateway, the backlog stays.
    let user = unique("blocked-user");
    let uri = format!("amqp://{user}:secret@127.0.0.1:{}/%2f", node.amqp_port());
    let prefix = unique("blocked");
    let mut upstream_queue =
        AmqpQueue::open(&node.amqp_uri(), &QueueSpec::topic(&format!("{prefix}.#"))).await?;
    let gw = TestGateway::builder()
        .set("store.max_bytes", "\"32KiB\"")
        .upstream("drain", std::slice::from_ref(&uri))
        .route("all", &format!("{prefix}/#"), "drain")
        .start()
        .await?;
    let metrics = gw.metrics_addr().context("metrics are enabled")?;

    let mut child = tokio::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(gw.amqp_addr().port().to_string())
        .arg(format!("{prefix}.fill"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("running /usr/bin/python3")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut next = async || -> Result<String> {
        match tokio::time::timeout(LONG, lines.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => bail!("the pika script ended early"),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => bail!("the pika script said nothing for {LONG:?}"),
        }
    };

    let filled = next().await?;
    let acked: u64 = filled
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("unexpected {filled:?}"))?;
    assert!(
        acked > 0 && acked < 1000,
        "the 32 KiB quota did not bite: {filled}"
    );
    let blocked = "['blocked store full: store.max_bytes quota reached']";
    assert_eq!(next().await?, format!("first: {blocked}"));
    // A connection opened while full is told at its first publish if it
    // announced the capability, and never if it did not.
    let mut late = announcing(gw.amqp_addr(), true).await?;
    late.open_channel(1).await?;
    publish_raw(&mut late, 1).await?;
    match late.frame().await? {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Blocked(b))) => {
            assert_eq!(
                b.reason.as_str(),
                "store full: store.max_bytes quota reached"
            )
        }
        other => bail!("expected connection.blocked, got {other}"),
    }
    let mut silent = announcing(gw.amqp_addr(), false).await?;
    silent.open_channel(1).await?;
    publish_raw(&mut silent, 1).await?;
    let (_, health) = get(metrics, "/healthz").await?;
    assert!(health.contains("store: full"), "{health}");
    let nacks = metric(
        &gw.metrics().await?,
        "edge_amqp_confirms_total",
        &["result=\"nack\""],
    );
    assert!(nacks >= Some(1.0), "the nack is not counted: {nacks:?}");

    // The user appears: the replicator drains the backlog, retirement
    // makes room, and the store says so without any publish.
    let ctl_user = user.clone();
    crate::blocking(move || {
        node.ctl(&["add_user", &ctl_user, "secret"])?;
        node.ctl(&["set_permissions", "-p", "/", &ctl_user, ".*", ".*", ".*"])
    })
    .await?;
    wait_for("/healthz without \"store: full\"", LONG, || async {
        let (_, body) = get(metrics, "/healthz").await.ok()?;
        (!body.contains("store: full")).then_some(())
    })
    .await?;
    stdin.write_all(b"go\n").await?;
    assert_eq!(next().await?, "first: ['unblocked']");
    match late.frame().await? {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Unblocked(_))) => {}
        other => bail!("expected connection.unblocked, got {other}"),
    }
    // Nothing came to the one without the capability: its next frame
    // answers its own request.
    silent.open_channel(2).await?;
    assert_eq!(next().await?, "confirmed after");
    let status = tokio::time::timeout(SHORT, child.wait()).await??;
    assert!(status.success(), "pika script: {status}");

    let got = upstream_queue
        .take_until(LONG, |got| got.iter().any(|m| m.body == b"after"))
        .await?;
    assert!(
        got.len() as u64 > acked,
        "{} arrived upstream, {acked} were acked before the refusal",
        got.len()
    );
    upstream_queue.delete().await?;
    gw.shutdown().await?;
    Ok(())
}

/// One transient basic.publish (to the default exchange, a key no queue
/// has) on channel `ch`: what makes a connection a publisher.
async fn publish_raw(c: &mut RawAmqp, ch: u16) -> Result<()> {
    use amq_protocol::frame::AMQPContentHeader;
    use amq_protocol::protocol::basic;
    c.method(
        ch,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "nobody-here".into(),
            mandatory: false,
            immediate: false,
        })),
    )
    .await?;
    let header = AMQPFrame::Header(
        ch,
        AMQPContentHeader {
            class_id: 60,
            body_size: 1,
            properties: basic::AMQPProperties::default(),
        },
    );
    c.write(&frame_bytes(&header)).await?;
    c.write(&frame_bytes(&AMQPFrame::Body(ch, b"x".to_vec())))
        .await
}

/// A raw connection whose start-ok does or does not announce the
/// `connection.blocked` capability.
async fn announcing(addr: std::net::SocketAddr, capable: bool) -> Result<RawAmqp> {
    let mut capabilities = FieldTable::default();
    capabilities.insert("connection.blocked".into(), AMQPValue::Boolean(capable));
    let mut properties = FieldTable::default();
    properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    RawAmqp::open_announcing(addr, 131_072, 0, properties).await
}

/// The same for the disk reserve (`store.min_free`) on a small tmpfs:
/// blocked with the disk's reason at the refusal, unblocked once another
/// file gives its space back, with no publish in between (the store looks
/// at the free space again by itself). Needs root for the tmpfs; skipped
/// (with the reason) otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_on_the_disk_reserve_and_unblocked_when_space_comes_back() -> Result<()> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    use lapin::{BasicProperties, Confirmation};

    let dir = tempfile::Builder::new().prefix("edgetest-fs-").tempdir()?;
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(dir.path())
        .output();
    match mounted {
        Ok(out) if out.status.success() => {}
        other => {
            eprintln!("SKIPPED blocked on disk: cannot mount a tmpfs (needs root): {other:?}");
            return Ok(());
        }
    }
    let _unmount = Unmount(dir.path().to_path_buf());
    let data_dir = dir.path().join("data");
    let gw = TestGateway::builder()
        .set(
            "gateway.data_dir",
            &format!("{:?}", data_dir.display().to_string()),
        )
        .set("store.min_free", "\"4MiB\"")
        .start()
        .await?;
    let queue = unique("disk-blocked");
    let conn = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(queue.as_str().into(), durable, FieldTable::default())
        .await?;
    let publish = async |body: &[u8]| -> Result<Confirmation> {
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        Ok(tokio::time::timeout(SHORT, confirm).await??)
    };
    assert_eq!(publish(b"before").await?, Confirmation::Ack(None));
    // A publishing connection (one publish while there is room: told nothing).
    let mut watcher = announcing(gw.amqp_addr(), true).await?;
    watcher.open_channel(1).await?;
    publish_raw(&mut watcher, 1).await?;

    // Another file takes the filesystem down to 2 MiB free, below the reserve.
    let ballast = dir.path().join("ballast");
    fill_leaving(&ballast, 2 << 20)?;
    assert!(
        matches!(publish(b"refused").await?, Confirmation::Nack(_)),
        "a publish into the reserve was acked"
    );
    match watcher.frame().await? {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Blocked(b))) => {
            assert_eq!(
                b.reason.as_str(),
                "low on disk: store.min_free reserve reached"
            )
        }
        other => bail!("expected connection.blocked, got {other}"),
    }

    std::fs::remove_file(&ballast)?;
    match watcher.frame().await? {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Unblocked(_))) => {}
        other => bail!("expected connection.unblocked, got {other}"),
    }
    assert_eq!(publish(b"after").await?, Confirmation::Ack(None));
    conn.close(200, "done".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

/// Writes `path` until the filesystem is full, then gives back `leave` bytes.
fn fill_leaving(path: &std::path::Path, leave: u64) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    let chunk = vec![0u8; 64 << 10];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => return Err(e.into()),
        }
    }
    let len = file.metadata()?.len();
    file.set_len(len.saturating_sub(leave))?;
    file.sync_all()?;
    Ok(())
}

/// Lazily unmounts the tmpfs when the test ends, however it ends.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}
