//! Shared subscriptions (`$share/{group}/{filter}`) over MQTT 3.1.1 with
//! real clients: each message goes to one member of the group, round-robin;
//! what a member's connection ends without acknowledging goes to the others;
//! persistent members keep the group's messages while all are away;
//! malformed share names are refused in the SUBACK.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;

use anyhow::{Context, Result, anyhow, bail};
use edge_tests::mqtt::{MosquittoSub, options};
use edge_tests::{MqttSubscriber, Publisher, TestGateway, unique};
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::{LONG, SHORT};

/// Publishes `count` QoS 1 messages `0..count` on `{prefix}/{n}` (payload
/// `n`) and requires every PUBACK.
async fn publish_numbered(addr: SocketAddr, prefix: &str, from: u64, count: u64) -> Result<()> {
    let prefix = prefix.to_string();
    let report = Publisher::new(addr, &unique("share-pub"))
        .run(count, LONG, move |i| {
            let n = from + i;
            (format!("{prefix}/{n}"), n.to_string().into_bytes())
        })
        .await;
    if !report.all_acked(count) {
        bail!("publish not acknowledged: {report:?}");
    }
    Ok(())
}

/// Every member's messages, in one channel: (member, payload number).
struct Members {
    rx: mpsc::Receiver<(String, u64)>,
    tx: mpsc::Sender<(String, u64)>,
    tasks: Vec<JoinHandle<()>>,
}

impl Members {
    fn new() -> Members {
        let (tx, rx) = mpsc::channel(10_000);
        Members {
            rx,
            tx,
            tasks: Vec::new(),
        }
    }

    fn rumqttc(&mut self, name: &str, mut sub: MqttSubscriber) {
        let (tx, name) = (self.tx.clone(), name.to_string());
        self.tasks.push(tokio::spawn(async move {
            while let Ok(p) = sub.recv(LONG).await {
                let Some(n) = number(&p.payload) else { return };
                if tx.send((name.clone(), n)).await.is_err() {
                    return;
                }
            }
        }));
    }

    fn mosquitto(&mut self, name: &str, mut sub: MosquittoSub) {
        let (tx, name) = (self.tx.clone(), name.to_string());
        self.tasks.push(tokio::spawn(async move {
            while let Ok((_, payload)) = sub.recv(LONG).await {
                let Some(n) = number(payload.as_bytes()) else {
                    return;
                };
                if tx.send((name.clone(), n)).await.is_err() {
                    return;
                }
            }
        }));
    }

    /// What each member received, once `expected` distinct messages arrived
    /// (bounded by [`LONG`]).
    async fn collect(&mut self, expected: usize) -> Result<HashMap<String, Vec<u64>>> {
        let mut got: HashMap<String, Vec<u64>> = HashMap::new();
        let mut distinct = BTreeSet::new();
        let deadline = tokio::time::Instant::now() + LONG;
        while distinct.len() < expected {
            let (member, n) = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .map_err(|_| {
                    anyhow!(
                        "{} of {expected} messages arrived within {LONG:?}",
                        distinct.len()
                    )
                })?
                .context("every member's connection ended")?;
            distinct.insert(n);
            got.entry(member).or_default().push(n);
        }
        Ok(got)
    }
}

impl Drop for Members {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn number(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload).ok()?.parse().ok()
}

/// Each number of `0..count` once across all members.
fn assert_disjoint_and_complete(got: &HashMap<String, Vec<u64>>, count: u64) {
    let mut all: Vec<u64> = got.values().flatten().copied().collect();
    all.sort_unstable();
    let expected: Vec<u64> = (0..count).collect();
    assert_eq!(all, expected, "every message to exactly one member");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_share_the_messages_round_robin() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let prefix = unique("share");
    let filter = format!("$share/g/{prefix}/#");
    let mut members = Members::new();
    for name in ["rumqttc-a", "rumqttc-b"] {
        let sub = MqttSubscriber::connect(addr, &unique(name), &[&filter]).await?;
        members.rumqttc(name, sub);
    }
    let mosquitto = MosquittoSub::start(addr.port(), &[&filter]).await?;
    members.mosquitto("mosquitto", mosquitto);
    // A plain subscriber of the same topics gets everything besides.
    let mut plain =
        MqttSubscriber::connect(addr, &unique("plain"), &[&format!("{prefix}/#")]).await?;

    publish_numbered(addr, &prefix, 0, 300).await?;
    let got = members.collect(300).await?;
    assert_disjoint_and_complete(&got, 300);
    for (member, ns) in &got {
        // Every queue has room for all 300: none is ever skipped.
        assert_eq!(ns.len(), 100, "{member}: one in three");
    }
    for n in 0..300 {
        let p = plain.recv(SHORT).await?;
        assert_eq!(number(&p.payload), Some(n));
    }
    drop(members);
    gw.shutdown().await?;
    Ok(())
}

/// A raw MQTT 3.1.1 client that subscribes and then never acknowledges.
async fn silent_member(addr: SocketAddr, filter: &str) -> Result<TcpStream> {
    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    }
    let mut stream = TcpStream::connect(addr).await?;
    // CONNECT: MQTT 3.1.1, clean session, no keep-alive.
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    body.extend_from_slice(&[4, 0x02, 0, 0]);
    string(&mut body, unique("silent").as_bytes());
    let mut connect = vec![0x10, body.len() as u8];
    connect.extend_from_slice(&body);
    // SUBSCRIBE packet id 1, QoS 1.
    let mut body = vec![0, 1];
    string(&mut body, filter.as_bytes());
    body.push(1);
    let mut subscribe = vec![0x82, body.len() as u8];
    subscribe.extend_from_slice(&body);
    stream.write_all(&connect).await?;
    stream.write_all(&subscribe).await?;
    let mut acks = [0u8; 9];
    tokio::time::timeout(SHORT, stream.read_exact(&mut acks))
        .await
        .context("no CONNACK and SUBACK")??;
    assert_eq!(acks, [0x20, 2, 0, 0, 0x90, 3, 0, 1, 1], "CONNACK, SUBACK");
    Ok(stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_member_leaves_unacknowledged_goes_to_the_others() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let prefix = unique("share-drop");
    let filter = format!("$share/g/{prefix}/#");
    let mut silent = silent_member(addr, &filter).await?;
    let mut members = Members::new();
    members.rumqttc(
        "a",
        MqttSubscriber::connect(addr, &unique("a"), &[&filter]).await?,
    );
    let mosquitto = MosquittoSub::start(addr.port(), &[&filter]).await?;
    members.mosquitto("b", mosquitto);

    publish_numbered(addr, &prefix, 0, 100).await?;
    // Its share reached it: a PUBLISH (QoS 1), never to be acknowledged.
    let mut first = [0u8; 1];
    tokio::time::timeout(SHORT, silent.read_exact(&mut first))
        .await
        .context("the silent member got nothing")??;
    assert_eq!(first[0] & 0xF0, 0x30, "a PUBLISH: {:02x}", first[0]);
    drop(silent);
    publish_numbered(addr, &prefix, 100, 200).await?;

    let got = members.collect(300).await?;
    assert_disjoint_and_complete(&got, 300);
    let metrics = gw.metrics().await?;
    let redistributed = edge_tests::http::metric(&metrics, "edge_shared_redistributed_total", &[]);
    assert!(
        redistributed.is_some_and(|n| n > 0.0),
        "what the silent member had went on: {redistributed:?}"
    );
    drop(members);
    gw.shutdown().await?;
    Ok(())
}

/// Connects a persistent (clean session = 0) client and waits for CONNACK.
async fn persistent(addr: SocketAddr, id: &str) -> Result<(AsyncClient, EventLoop)> {
    let mut o = options(addr, id);
    o.set_clean_session(false);
    let (client, mut events) = AsyncClient::new(o, 64);
    tokio::time::timeout(SHORT, async {
        loop {
            if let Event::Incoming(Incoming::ConnAck(_)) = events.poll().await? {
                return anyhow::Ok(());
            }
        }
    })
    .await
    .map_err(|_| anyhow!("{id}: no CONNACK"))??;
    Ok((client, events))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_members_keep_the_groups_messages_while_away() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let prefix = unique("share-away");
    let filter = format!("$share/g/{prefix}/#");
    let ids = [unique("p1"), unique("p2")];
    for id in &ids {
        let (client, mut events) = persistent(addr, id).await?;
        client.subscribe(&filter, QoS::AtLeastOnce).await?;
        tokio::time::timeout(SHORT, async {
            loop {
                if let Event::Incoming(Incoming::SubAck(_)) = events.poll().await? {
                    return anyhow::Ok(());
                }
            }
        })
        .await
        .map_err(|_| anyhow!("{id}: no SUBACK"))??;
        client.disconnect().await?;
        // Polled until the gateway closes the socket, which it does once
        // the session is offline.
        let _ = tokio::time::timeout(SHORT, async { while events.poll().await.is_ok() {} }).await;
    }

    publish_numbered(addr, &prefix, 0, 20).await?;
    // Each away member's queue kept its turns, in order: the first to come
    // back gets its half, the other the rest.
    let mut all = Vec::new();
    for id in &ids {
        let (_client, mut events) = persistent(addr, id).await?;
        let got = next_numbers(&mut events, 10).await?;
        assert!(got.is_sorted(), "{id}: in publish order: {got:?}");
        all.extend(got);
    }
    all.sort_unstable();
    assert_eq!(all, (0..20).collect::<Vec<u64>>(), "every message once");
    gw.shutdown().await?;
    Ok(())
}

/// The payload numbers of the next `n` PUBLISHes (rumqttc acknowledges).
async fn next_numbers(events: &mut EventLoop, n: usize) -> Result<Vec<u64>> {
    let mut got = Vec::new();
    tokio::time::timeout(LONG, async {
        while got.len() < n {
            if let Event::Incoming(Incoming::Publish(p)) = events.poll().await? {
                got.push(number(&p.payload).context("a numbered payload")?);
            }
        }
        anyhow::Ok(())
    })
    .await
    .map_err(|_| anyhow!("only {} of {n} messages arrived: {got:?}", got.len()))??;
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_share_names_get_a_suback_failure() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let (client, mut events) = AsyncClient::new(options(gw.mqtt_addr(), &unique("bad")), 16);
    // Well-formed as plain filters (rumqttc checks that much), not as
    // shared ones: an empty ShareName, no filter, an empty filter.
    let filters = ["$share//t", "$share/g", "$share/g/", "$share/g/t"];
    client
        .subscribe_many(
            filters
                .iter()
                .map(|f| rumqttc::SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce)),
        )
        .await?;
    let ack = tokio::time::timeout(SHORT, async {
        loop {
            if let Event::Incoming(Incoming::SubAck(ack)) = events.poll().await? {
                return anyhow::Ok(ack);
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no SUBACK"))??;
    use rumqttc::SubscribeReasonCode::{Failure, Success};
    assert_eq!(
        ack.return_codes,
        [Failure, Failure, Failure, Success(QoS::AtLeastOnce)],
        "only the well-formed one is granted"
    );
    gw.shutdown().await?;
    Ok(())
}
