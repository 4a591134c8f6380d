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
