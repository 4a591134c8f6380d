//! Persistent sessions (clean session = 0, MQTT-3.1.2-4/5): subscriptions
//! and QoS ≥ 1 messages queued while the client is away survive its
//! disconnect, a kill -9 of the gateway and a restart; CONNACK says the
//! session is present; a clean session discards it.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use edge_tests::mqtt::options;
use edge_tests::{Publisher, TestGateway, unique};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, Incoming, QoS};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::{LONG, SHORT};

/// Connects with `clean` and returns the CONNACK's session-present flag.
async fn connect(
    addr: std::net::SocketAddr,
    id: &str,
    clean: bool,
) -> Result<(AsyncClient, EventLoop, bool)> {
    let mut o = options(addr, id);
    o.set_clean_session(clean);
    let (client, mut eventloop) = AsyncClient::new(o, 64);
    let present = tokio::time::timeout(SHORT, async {
        loop {
            match eventloop.poll().await? {
                Event::Incoming(Incoming::ConnAck(ack)) => {
                    if ack.code != ConnectReturnCode::Success {
                        bail!("CONNACK {:?}", ack.code);
                    }
                    return Ok(ack.session_present);
                }
                _ => continue,
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no CONNACK"))??;
    Ok((client, eventloop, present))
}

/// Payloads of the next `n` PUBLISHes (acknowledged by rumqttc).
async fn next_payloads(eventloop: &mut EventLoop, n: usize) -> Result<Vec<String>> {
    let mut got = Vec::new();
    tokio::time::timeout(LONG, async {
        while got.len() < n {
            if let Event::Incoming(Incoming::Publish(p)) = eventloop.poll().await? {
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
            }
        }
        anyhow::Ok(())
    })
    .await
    .map_err(|_| anyhow!("only {} of {n} messages arrived: {got:?}", got.len()))??;
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_for_an_absent_persistent_session_survive_kill_9_in_order() -> Result<()> {
    let mut gw = TestGateway::builder().spawn(crate::gateway_bin()).await?;
    let addr = gw.mqtt_addr();
    let id = unique("persist");
    let topic = format!("{id}/cmd");

    let (client, mut eventloop, present) = connect(addr, &id, false).await?;
    assert!(!present, "a new session is not present");
    client.subscribe(&topic, QoS::AtLeastOnce).await?;
    tokio::time::timeout(SHORT, async {
        loop {
            if let Event::Incoming(Incoming::SubAck(_)) = eventloop.poll().await? {
                return anyhow::Ok(());
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no SUBACK"))??;
    client.disconnect().await?;
    let _ = tokio::time::timeout(SHORT, async { while eventloop.poll().await.is_ok() {} }).await;

    // Published while the device is away, acknowledged to the publisher.
    const N: u64 = 200;
    let t = topic.clone();
    let report = Publisher::new(addr, &unique("sender"))
        .run(N, LONG, move |i| {
            (t.clone(), format!("m{i:04}").into_bytes())
        })
        .await;
    assert!(report.all_acked(N), "{report:?}");

    gw.restart().await?; // kill -9, then the same data directory

    let (_client, mut eventloop, present) = connect(addr, &id, false).await?;
    assert!(present, "the session survived the crash");
    let got = next_payloads(&mut eventloop, N as usize).await?;
    let want: Vec<String> = (0..N).map(|i| format!("m{i:04}")).collect();
    assert_eq!(got, want, "everything, once, in order");

    // A clean session discards it.
    drop(eventloop);
    let (_c, _e, present) = connect(addr, &id, true).await?;
    assert!(!present);
    drop((_c, _e));
    let (_c, _e, present) = connect(addr, &id, false).await?;
    assert!(!present, "the clean session threw the old one away");
    gw.terminate(SHORT).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_with_c_and_i_gets_what_was_sent_while_it_was_away() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let port = gw.mqtt_addr().port().to_string();
    let id = unique("msub");
    let topic = format!("{id}/t");
    let sub = |count: &str| {
        let mut cmd = Command::new("mosquitto_sub");
        cmd.args(["-h", "127.0.0.1", "-p", &port, "-c", "-i", &id, "-q", "1"])
            .args(["-t", &topic, "-C", count, "-W", "20"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        cmd
    };
    // First visit: subscribe and leave (-C 1 exits after the first message).
    let mut first = sub("1").spawn().context("mosquitto_sub")?;
    let stdout = first.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    // Its session exists once the subscription does: publish until it gets one.
    let mut n = 0;
    let line = loop {
        n += 1;
        edge_tests::mqtt::mosquitto_pub(gw.mqtt_addr().port(), &topic, "hello", 1).await?;
        if let Ok(Ok(Some(line))) =
            tokio::time::timeout(Duration::from_secs(2), lines.next_line()).await
        {
            break line;
        }
        if n > 20 {
            bail!("the first mosquitto_sub never received a message");
        }
    };
    assert_eq!(line, "hello");
    tokio::time::timeout(SHORT, first.wait()).await??;

    for i in 0..5 {
        edge_tests::mqtt::mosquitto_pub(gw.mqtt_addr().port(), &topic, &format!("away {i}"), 1)
            .await?;
    }
    let out = tokio::time::timeout(LONG, sub("5").output()).await??;
    let text = String::from_utf8_lossy(&out.stdout);
    let got: Vec<&str> = text.lines().collect();
    assert_eq!(got, ["away 0", "away 1", "away 2", "away 3", "away 4"]);
    gw.shutdown().await?;
    Ok(())
}

/// Raw MQTT 3.1.1 bytes for the QoS 2 handshake test.
mod raw {
    pub fn connect(id: &str, clean: bool) -> Vec<u8> {
        let mut body = vec![
            0,
            4,
            b'M',
            b'Q',
            b'T',
            b'T',
            4,
            if clean { 0x02 } else { 0x00 },
            0,
            60,
        ];
        body.extend_from_slice(&(id.len() as u16).to_be_bytes());
        body.extend_from_slice(id.as_bytes());
        let mut p = vec![0x10, body.len() as u8];
        p.extend(body);
        p
    }

    pub fn publish_qos2(topic: &str, pkid: u16, payload: &[u8], dup: bool) -> Vec<u8> {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&pkid.to_be_bytes());
        body.extend_from_slice(payload);
        let mut p = vec![0x34 | if dup { 0x08 } else { 0 }, body.len() as u8];
        p.extend(body);
        p
    }

    pub fn ack(kind: u8, pkid: u16) -> Vec<u8> {
        let [a, b] = pkid.to_be_bytes();
        vec![kind, 2, a, b]
    }

    pub const PUBREC: u8 = 0x50;
    pub const PUBREL: u8 = 0x62;
    pub const PUBCOMP: u8 = 0x70;
}

async fn expect_bytes(s: &mut tokio::net::TcpStream, want: &[u8]) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(SHORT, s.read_exact(&mut got))
        .await
        .map_err(|_| anyhow!("expected {want:02x?}: nothing within {SHORT:?}"))??;
    if got != want {
        bail!("expected {want:02x?}, got {got:02x?}");
    }
    Ok(())
}

async fn raw_session(
    addr: std::net::SocketAddr,
    id: &str,
    present: bool,
) -> Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(&raw::connect(id, false)).await?;
    expect_bytes(&mut s, &[0x20, 2, u8::from(present), 0]).await?;
    Ok(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_qos2_handshake_survives_kill_9_without_loss_or_duplicate() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut gw = TestGateway::builder().spawn(crate::gateway_bin()).await?;
    let addr = gw.mqtt_addr();
    let topic = format!("{}/q2", unique("q2"));
    let watcher = unique("watcher");
    // A persistent watcher, away during the test, counts what got routed.
    let (client, mut eventloop, _) = connect(addr, &watcher, false).await?;
    client.subscribe(&topic, QoS::ExactlyOnce).await?;
    tokio::time::timeout(SHORT, async {
        loop {
            if let Event::Incoming(Incoming::SubAck(_)) = eventloop.poll().await? {
                return anyhow::Ok(());
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no SUBACK"))??;
    drop((client, eventloop));

    let id = unique("q2pub");
    let mut s = raw_session(addr, &id, false).await?;
    s.write_all(&raw::publish_qos2(&topic, 7, b"once", false))
        .await?;
    expect_bytes(&mut s, &raw::ack(raw::PUBREC, 7)).await?;
    // The gateway dies before the client's PUBREL.
    gw.restart().await?;

    // The client retransmits the PUBLISH (it may not have seen the PUBREC):
    // it is recognised, not routed again.
    let mut s = raw_session(addr, &id, true).await?;
    s.write_all(&raw::publish_qos2(&topic, 7, b"once", true))
        .await?;
    expect_bytes(&mut s, &raw::ack(raw::PUBREC, 7)).await?;
    s.write_all(&raw::ack(raw::PUBREL, 7)).await?;
    expect_bytes(&mut s, &raw::ack(raw::PUBCOMP, 7)).await?;
    // Released: the id now starts a new message.
    s.write_all(&raw::publish_qos2(&topic, 7, b"second", false))
        .await?;
    expect_bytes(&mut s, &raw::ack(raw::PUBREC, 7)).await?;
    s.write_all(&raw::ack(raw::PUBREL, 7)).await?;
    expect_bytes(&mut s, &raw::ack(raw::PUBCOMP, 7)).await?;
    drop(s);

    let (_client, mut eventloop, present) = connect(addr, &watcher, false).await?;
    assert!(present);
    let got = next_payloads(&mut eventloop, 2).await?;
    assert_eq!(got, ["once", "second"], "each exactly once");
    // Nothing else was queued for the watcher: the next one is a sentinel
    // published now.
    edge_tests::mqtt::mosquitto_pub(addr.port(), &topic, "end", 1).await?;
    assert_eq!(
        next_payloads(&mut eventloop, 1).await?,
        ["end"],
        "a duplicate arrived"
    );
    gw.terminate(SHORT).await?;
    Ok(())
}
