//! MQTT 3.1.1 behaviour with real clients (rumqttc, mosquitto_pub and
//! mosquitto_sub) and raw bytes where the packet sequence itself is the
//! point: last wills, MQTT 3.1 and unsupported protocol levels, QoS 2 both
//! ways, overlapping subscriptions.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edge_tests::amqp::{AmqpQueue, QueueSpec};
use edge_tests::mqtt::{MosquittoSub, mosquitto_pub, mosquitto_pub_with, options};
use edge_tests::{MqttSubscriber, Publisher, TestGateway, unique};
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, LastWill, QoS, SubscribeReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{SHORT, shared_node};

/// A client speaking raw MQTT bytes.
struct Raw {
    stream: TcpStream,
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A clean-session CONNECT; `will` is (topic, payload, QoS).
fn connect(
    name: &[u8],
    level: u8,
    id: &str,
    keep_alive: u16,
    will: Option<(&str, &str, u8)>,
) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, name);
    body.push(level);
    let mut flags = 0x02;
    if let Some((_, _, qos)) = will {
        flags |= 0x04 | (qos << 3);
    }
    body.push(flags);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        body.push(0); // no properties
    }
    string(&mut body, id.as_bytes());
    if let Some((topic, payload, _)) = will {
        string(&mut body, topic.as_bytes());
        string(&mut body, payload.as_bytes());
    }
    packet(0x10, &body)
}

fn publish(topic: &str, payload: &[u8], qos: u8, pkid: u16) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &body)
}

fn ack(kind: u8, pkid: u16) -> Vec<u8> {
    let [hi, lo] = pkid.to_be_bytes();
    vec![kind, 2, hi, lo]
}

const CONNACK_OK: [u8; 4] = [0x20, 2, 0, 0];
const PUBACK: u8 = 0x40;
const PUBREC: u8 = 0x50;
const PUBREL: u8 = 0x62;
const PUBCOMP: u8 = 0x70;
const PINGREQ: [u8; 2] = [0xC0, 0];
const PINGRESP: [u8; 2] = [0xD0, 0];
const DISCONNECT: [u8; 2] = [0xE0, 0];

impl Raw {
    async fn connect(addr: SocketAddr, hello: &[u8]) -> Result<Raw> {
        let mut raw = Raw {
            stream: TcpStream::connect(addr).await?,
        };
        raw.send(hello).await?;
        Ok(raw)
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    async fn expect(&mut self, expected: &[u8]) -> Result<()> {
        let mut got = vec![0; expected.len()];
        tokio::time::timeout(SHORT, self.stream.read_exact(&mut got))
            .await
            .context("timed out waiting for bytes")??;
        if got != expected {
            bail!("expected {expected:02x?}, got {got:02x?}");
        }
        Ok(())
    }

    /// Waits until the gateway closes the connection, failing on any byte.
    async fn expect_closed(&mut self) -> Result<()> {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(SHORT, self.stream.read(&mut buf)).await {
            Err(_) => bail!("connection still open after {SHORT:?}"),
            Ok(Ok(0)) => Ok(()),
            Ok(Ok(n)) => bail!("expected close, got {:02x?}", &buf[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Ok(Err(e)) => Err(e.into()),
        }
    }
}

/// A rumqttc client whose CONNACK has been seen; its event loop is handed
/// back unpolled, so the connection stays as it is until polled again.
async fn rumqttc_connected(
    addr: SocketAddr,
    id: &str,
    will: Option<LastWill>,
) -> Result<(AsyncClient, EventLoop)> {
    let mut opts = options(addr, id);
    if let Some(will) = will {
        opts.set_last_will(will);
    }
    let (client, mut events) = AsyncClient::new(opts, 16);
    tokio::time::timeout(SHORT, async {
        loop {
            if let Event::Incoming(Incoming::ConnAck(ack)) = events.poll().await? {
                anyhow::ensure!(
                    ack.code == rumqttc::ConnectReturnCode::Success,
                    "{id}: {ack:?}"
                );
                return Ok(());
            }
        }
    })
    .await
    .with_context(|| format!("{id}: no CONNACK within {SHORT:?}"))??;
    Ok((client, events))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_published_when_mosquitto_sub_is_killed() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let port = gw.mqtt_addr().port();
    let topic = format!("{}/status", unique("will"));
    let mut watcher =
        MqttSubscriber::connect(gw.mqtt_addr(), &unique("watcher"), &[&topic]).await?;

    let will_args = [
        "--will-topic",
        &topic,
        "--will-payload",
        "offline",
        "--will-qos",
        "1",
    ];
    let mut device = MosquittoSub::start_with(port, &["x"], &will_args).await?;
    let pid = device.pid().context("mosquitto_sub has no pid")?;
    let killed = tokio::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .await?;
    assert!(killed.success(), "kill -9 {pid}: {killed}");
    device.wait_exit(SHORT).await?;

    let will = watcher.recv(SHORT).await?;
    assert_eq!(will.topic, topic);
    assert_eq!(&will.payload[..], b"offline");
    assert_eq!(will.qos, QoS::AtLeastOnce);
    drop(watcher);
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_published_on_keep_alive_timeout() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let topic = format!("{}/status", unique("will"));
    let mut watcher =
        MqttSubscriber::connect(gw.mqtt_addr(), &unique("watcher"), &[&topic]).await?;

    let hello = connect(
        b"MQTT",
        4,
        &unique("sleepy"),
        1,
        Some((&topic, "timed out", 1)),
    );
    let mut device = Raw::connect(gw.mqtt_addr(), &hello).await?;
    device.expect(&CONNACK_OK).await?;
    let silent_since = Instant::now();
    // Silent from here on: the gateway gives up after 1.5 x keep-alive.
    device.expect_closed().await?;
    let waited = silent_since.elapsed();
    assert!(
        waited >= Duration::from_millis(1400),
        "closed after {waited:?}"
    );

    let will = watcher.recv(SHORT).await?;
    assert_eq!(will.topic, topic);
    assert_eq!(&will.payload[..], b"timed out");
    drop(watcher);
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_not_published_after_disconnect() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let topic = format!("{}/status", unique("will"));
    let mut watcher =
        MqttSubscriber::connect(gw.mqtt_addr(), &unique("watcher"), &[&topic]).await?;

    let hello = connect(
        b"MQTT",
        4,
        &unique("polite"),
        30,
        Some((&topic, "must not appear", 0)),
    );
    let mut device = Raw::connect(gw.mqtt_addr(), &hello).await?;
    device.expect(&CONNACK_OK).await?;
    device.send(&DISCONNECT).await?;
    // The gateway hands a will to the router before it closes the socket.
    device.expect_closed().await?;
    mosquitto_pub(gw.mqtt_addr().port(), &topic, "sentinel", 1).await?;

    let next = watcher.recv(SHORT).await?;
    assert_eq!(
        &next.payload[..],
        b"sentinel",
        "the will was published: {next:?}"
    );
    drop(watcher);
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_published_on_take_over() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let topic = format!("{}/status", unique("will"));
    let mut watcher = MqttSubscriber::connect(addr, &unique("watcher"), &[&topic]).await?;

    let id = unique("twin");
    let will = LastWill::new(&topic, "replaced", QoS::AtLeastOnce, false);
    // The first connection is kept open (its event loop is not polled, so
    // it neither closes nor reconnects): only the take-over can end it.
    let (_old, _old_events) = rumqttc_connected(addr, &id, Some(will)).await?;
    let (new, mut new_events) = rumqttc_connected(addr, &id, None).await?;

    let got = watcher.recv(SHORT).await?;
    assert_eq!(got.topic, topic);
    assert_eq!(&got.payload[..], b"replaced");
    // The new connection is served.
    new.publish(&topic, QoS::AtLeastOnce, false, "new one here")
        .await?;
    tokio::time::timeout(SHORT, async {
        loop {
            if let Event::Incoming(Incoming::PubAck(_)) = new_events.poll().await? {
                return anyhow::Ok(());
            }
        }
    })
    .await??;
    assert_eq!(&watcher.recv(SHORT).await?.payload[..], b"new one here");
    drop(watcher);
    gw.shutdown().await?;
    Ok(())
}

/// Mosquitto publishes the wills of clients still connected when it shuts
/// down; so does the gateway, and a will bound upstream is committed then
/// and forwarded (before the stop or after the next start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_published_at_shutdown_reaches_upstream() -> Result<()> {
    let node = shared_node().await?;
    let prefix = unique("shutwill");
    let mut queue =
        AmqpQueue::open(&node.amqp_uri(), &QueueSpec::topic(&format!("{prefix}.#"))).await?;
    let builder = || {
        TestGateway::builder()
            .upstream("central", &[node.amqp_uri()])
            .route("wills", &format!("{prefix}/#"), "central")
    };
    let gw = builder().start().await?;
    let topic = format!("{prefix}/dev-1/status");
    let hello = connect(
        b"MQTT",
        4,
        &unique("stayer"),
        30,
        Some((&topic, "gateway stopped", 1)),
    );
    let mut device = Raw::connect(gw.mqtt_addr(), &hello).await?;
    device.expect(&CONNACK_OK).await?;

    let root = gw.shutdown().await?;
    device.expect_closed().await?;
    let gw = builder().root(root).start().await?;
    let m = queue.next(SHORT).await?;
    assert_eq!(m.body_str(), "gateway stopped");
    assert_eq!(m.mqtt_topic(), Some(topic.as_str()));
    queue.delete().await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt31_clients_connect_and_publish() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let prefix = unique("v31");
    let mut watcher =
        MqttSubscriber::connect(addr, &unique("watcher"), &[&format!("{prefix}/#")]).await?;

    // Raw "MQIsdp" level 3, with a client id over 3.1's 23 bytes.
    let id = format!("{}-longer-than-23-bytes", unique("mqisdp"));
    let mut raw = Raw::connect(addr, &connect(b"MQIsdp", 3, &id, 30, None)).await?;
    raw.expect(&CONNACK_OK).await?;
    raw.send(&publish(&format!("{prefix}/raw"), b"3.1 raw", 1, 1))
        .await?;
    raw.expect(&ack(PUBACK, 1)).await?;
    let got = watcher.recv(SHORT).await?;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        (format!("{prefix}/raw").as_str(), &b"3.1 raw"[..])
    );

    // mosquitto_pub and mosquitto_sub speaking 3.1.
    let mut sub31 =
        MosquittoSub::start_with(addr.port(), &[&format!("{prefix}/#")], &["-V", "mqttv31"])
            .await?;
    mosquitto_pub_with(
        addr.port(),
        &format!("{prefix}/cli"),
        "3.1 cli",
        1,
        &["-V", "mqttv31"],
    )
    .await?;
    let got = watcher.recv(SHORT).await?;
    assert_eq!(&got.payload[..], b"3.1 cli");
    let (topic, payload) = sub31.recv(SHORT).await?;
    assert_eq!(
        (topic, payload),
        (format!("{prefix}/cli"), "3.1 cli".to_string())
    );
    sub31.stop().await;
    drop(watcher);
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_protocol_levels_are_refused() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    // Levels that do not match the name: CONNACK 0x01 (unacceptable
    // protocol version), then close.
    for (name, level) in [(&b"MQTT"[..], 3u8), (b"MQIsdp", 4)] {
        let mut raw = Raw::connect(addr, &connect(name, level, &unique("lvl"), 30, None)).await?;
        raw.expect(&[0x20, 2, 0, 0x01]).await?;
        raw.expect_closed().await?;
    }
    // An unknown protocol name: closed without CONNACK (MQTT-3.1.2-1).
    let mut raw = Raw::connect(addr, &connect(b"MQTX", 4, &unique("lvl"), 30, None)).await?;
    raw.expect_closed().await?;
    gw.shutdown().await?;
    Ok(())
}

/// QoS 2 with rumqttc on both ends, through a small window: granted 2,
/// every message delivered exactly once, in order, at QoS 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_publish_and_subscribe_with_rumqttc() -> Result<()> {
    let gw = TestGateway::builder()
        .set("mqtt.max_inflight", "4")
        .start()
        .await?;
    let addr = gw.mqtt_addr();
    let prefix = unique("q2");
    let filter = format!("{prefix}/#");
    let mut sub =
        MqttSubscriber::connect_with(addr, &unique("q2sub"), &[(&filter, QoS::ExactlyOnce)])
            .await?;
    assert_eq!(
        sub.granted(),
        [SubscribeReasonCode::Success(QoS::ExactlyOnce)]
    );

    let count = 50;
    let topic = format!("{prefix}/data");
    let report = Publisher::new(addr, &unique("q2pub"))
        .exactly_once()
        .inflight(8)
        .run(count, SHORT, move |i| {
            (topic.clone(), format!("{i}").into_bytes())
        })
        .await;
    assert!(report.all_acked(count), "{report:?}");
    mosquitto_pub(addr.port(), &format!("{prefix}/end"), "end", 2).await?;

    let mut got = Vec::new();
    loop {
        let p = sub.recv(SHORT).await?;
        assert_eq!(p.qos, QoS::ExactlyOnce);
        if p.topic.ends_with("/end") {
            break;
        }
        got.push(String::from_utf8(p.payload.to_vec())?.parse::<u64>()?);
    }
    assert_eq!(got, (0..count).collect::<Vec<_>>());
    drop(sub);
    gw.shutdown().await?;
    Ok(())
}

/// The outbound QoS 2 exchange byte for byte: PUBLISH (QoS 2, DUP 0) →
/// PUBREC → PUBREL → PUBCOMP, and the next message is the next PUBLISH,
/// not a resend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_delivery_packet_sequence() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let topic = format!("{}/x", unique("q2raw"));
    let mut sub = Raw::connect(addr, &connect(b"MQTT", 4, &unique("q2raw"), 30, None)).await?;
    sub.expect(&CONNACK_OK).await?;
    let mut subscribe = vec![0, 1];
    string(&mut subscribe, topic.as_bytes());
    subscribe.push(2);
    sub.send(&packet(0x82, &subscribe)).await?;
    sub.expect(&[0x90, 3, 0, 1, 2]).await?;

    // mosquitto_pub -q 2 completes its own PUBLISH/PUBREC/PUBREL/PUBCOMP.
    mosquitto_pub(addr.port(), &topic, "first", 2).await?;
    sub.expect(&publish(&topic, b"first", 2, 1)).await?;
    sub.send(&ack(PUBREC, 1)).await?;
    sub.expect(&ack(PUBREL, 1)).await?;
    sub.send(&ack(PUBCOMP, 1)).await?;
    sub.send(&PINGREQ).await?;
    sub.expect(&PINGRESP).await?;

    mosquitto_pub(addr.port(), &topic, "second", 2).await?;
    sub.expect(&publish(&topic, b"second", 2, 2)).await?;
    sub.send(&ack(PUBREC, 2)).await?;
    sub.expect(&ack(PUBREL, 2)).await?;
    sub.send(&ack(PUBCOMP, 2)).await?;
    sub.send(&DISCONNECT).await?;
    sub.expect_closed().await?;
    gw.shutdown().await?;
    Ok(())
}

/// Overlapping subscriptions of one client get one copy of a message, at
/// the highest QoS granted among the matching filters, capped by the
/// message's own QoS (MQTT-3.3.5-1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_subscriptions_deliver_one_copy_at_the_highest_qos() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let p = unique("ov");
    let (all, exact) = (format!("{p}/#"), format!("{p}/+/t"));
    let mut sub = MqttSubscriber::connect_with(
        addr,
        &unique("ovsub"),
        &[(&all, QoS::AtMostOnce), (&exact, QoS::ExactlyOnce)],
    )
    .await?;
    assert_eq!(
        sub.granted(),
        [
            SubscribeReasonCode::Success(QoS::AtMostOnce),
            SubscribeReasonCode::Success(QoS::ExactlyOnce)
        ]
    );
    let port = addr.port();
    mosquitto_pub(port, &format!("{p}/a/t"), "both-q2", 2).await?;
    mosquitto_pub(port, &format!("{p}/a/t"), "both-q1", 1).await?;
    mosquitto_pub(port, &format!("{p}/b"), "one-q2", 2).await?;
    mosquitto_pub(port, &format!("{p}/end"), "end", 0).await?;

    let mut got = Vec::new();
    loop {
        let m = sub.recv(SHORT).await?;
        let payload = String::from_utf8(m.payload.to_vec())?;
        if payload == "end" {
            break;
        }
        got.push((payload, m.qos));
    }
    let expected = [
        ("both-q2".to_string(), QoS::ExactlyOnce),
        ("both-q1".to_string(), QoS::AtLeastOnce),
        ("one-q2".to_string(), QoS::AtMostOnce),
    ];
    assert_eq!(got, expected);
    drop(sub);
    gw.shutdown().await?;
    Ok(())
}
