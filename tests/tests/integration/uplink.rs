//! The uplink under the faults operators meet: a cluster node going away
//! and coming back, a path that silently swallows everything, a broker
//! that is down while publishers want a confirmation from it, and a
//! backlog drained under a rate cap.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use edge_tests::amqp::{AmqpQueue, QueueSpec};
use edge_tests::http::{get, metric};
use edge_tests::proxy::Proxy;
use edge_tests::{PublishReport, Publisher, RabbitNode, Received, TestGateway, unique, wait_for};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::task::JoinHandle;

use crate::{LONG, SHORT, blocking, check_order_and_identity, parse_payload, payload};

/// The upstream's line in `/healthz`, e.g. `up (127.0.0.1:5672)`.
async fn health_of(metrics: SocketAddr, upstream: &str) -> String {
    let Ok((_, body)) = get(metrics, "/healthz").await else {
        return String::new();
    };
    let prefix = format!("upstream {upstream}: ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_default()
        .to_string()
}

async fn wait_health(metrics: SocketAddr, upstream: &str, want: &str) -> Result<()> {
    wait_for(&format!("/healthz to say {want:?}"), LONG, || async {
        (health_of(metrics, upstream).await == want).then_some(())
    })
    .await
}

/// A proxy in front of the shared node (refusing at first when `refusing`),
/// a topic prefix of its own and a queue on the node taking `<prefix>.#`.
async fn behind_a_proxy(label: &str, refusing: bool) -> Result<(Proxy, String, AmqpQueue)> {
    let node = crate::shared_node().await?;
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], node.amqp_port()))).await?;
    proxy.set_refusing(refusing);
    let prefix = unique(label);
    let spec = QueueSpec::topic(&format!("{prefix}.#"));
    let queue = AmqpQueue::open(&node.amqp_uri(), &spec).await?;
    Ok((proxy, prefix, queue))
}

/// The payload counters in `received`, checking that a message id always
/// carries the same payload and a payload always the same id.
fn counters(received: &[Received]) -> Result<BTreeSet<u64>> {
    let mut id_of: HashMap<Vec<u8>, Option<String>> = HashMap::new();
    let mut out = BTreeSet::new();
    for m in received {
        if let Some(id) = id_of.insert(m.body.clone(), m.message_id.clone())
            && id != m.message_id
        {
            bail!(
                "{:?} arrived as {id:?} and {:?}",
                m.body_str(),
                m.message_id
            );
        }
        out.insert(parse_payload(&m.body)?.1);
    }
    Ok(out)
}

/// Publishes `count` QoS 1 messages `meter:<from + i>` on `<prefix>/meter/1`
/// from a new client, awaiting their PUBACKs.
async fn publish_meter(gw: &TestGateway, prefix: &str, from: u64, count: u64) -> PublishReport {
    let topic = format!("{prefix}/meter/1");
    Publisher::new(gw.mqtt_addr(), &unique("meter"))
        .run(count, LONG, move |i| {
            (topic.clone(), payload("meter", from + i))
        })
        .await
}

/// A publisher sending `meter:<i>` on `<prefix>/meter/1` with `inflight`
/// unacknowledged at most, until its stop flag is set; its PUBACK counter.
fn publish_meter_until_stopped(
    gw: &TestGateway,
    prefix: &str,
    inflight: u16,
) -> (JoinHandle<PublishReport>, Arc<AtomicBool>, Arc<AtomicU64>) {
    let publisher = Publisher::new(gw.mqtt_addr(), &unique("meter")).inflight(inflight);
    let (stop, acked) = (publisher.stop_flag(), publisher.acked_counter());
    let topic = format!("{prefix}/meter/1");
    let publishing = tokio::spawn(async move {
        publisher
            .run(u64::MAX, LONG, move |i| {
                (topic.clone(), payload("meter", i))
            })
            .await
    });
    (publishing, stop, acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_stopping_fails_over_to_the_next_and_back_without_loss() -> Result<()> {
    // Both nodes boot at once.
    let booting = std::thread::spawn(|| RabbitNode::dedicated("failover-b"));
    let mut first = blocking(|| RabbitNode::dedicated("failover-a")).await?;
    let second = blocking(move || {
        booting
            .join()
            .map_err(|_| anyhow::anyhow!("booting the second node panicked"))?
    })
    .await?;
    let prefix = unique("failover");
    let spec = QueueSpec::topic(&format!("{prefix}.#")).durable();
    // The first node's queue is read only at the end (a consumer's
    // deliveries in flight when the node stops would be lost to the test).
    AmqpQueue::declare(&first.amqp_uri(), &spec).await?;
    let mut on_second = AmqpQueue::open(&second.amqp_uri(), &spec).await?;
    let gw = TestGateway::builder()
        .upstream_with(
            "cluster",
            &[first.amqp_uri(), second.amqp_uri()],
            &[("return_to_first", "true"), ("reconnect_max", "\"1s\"")],
        )
        .route_with(
            "all",
            &format!("{prefix}/#"),
            "cluster",
            &[("priority", "5")],
        )
        .start()
        .await?;
    let metrics = gw.metrics_addr().expect("metrics on");
    let (a, b) = (
        format!("127.0.0.1:{}", first.amqp_port()),
        format!("127.0.0.1:{}", second.amqp_port()),
    );
    wait_health(metrics, "cluster", &format!("up ({a})")).await?;

    // Sustained publishing through all that follows.
    let (publishing, stop, acked) = publish_meter_until_stopped(&gw, &prefix, 4);
    let until_acked = |n: u64| {
        let acked = acked.clone();
        wait_for("more PUBACKs", LONG, move || {
            let acked = acked.clone();
            async move { (acked.load(Ordering::Relaxed) >= n).then_some(()) }
        })
    };
    until_acked(200).await?;

    first = blocking(move || first.stop().map(|()| first)).await?;
    wait_health(metrics, "cluster", &format!("up ({b})")).await?;
    let failed_over_at = acked.load(Ordering::Relaxed);
    until_acked(failed_over_at + 200).await?;
    let mut from_second = on_second
        .take(1, SHORT)
        .await
        .map_err(|e| anyhow::anyhow!("nothing forwarded to the second node: {e:#}"))?;

    first = blocking(move || first.start_again().map(|()| first)).await?;
    wait_health(metrics, "cluster", &format!("up ({a})")).await?;
    let returned_at = acked.load(Ordering::Relaxed);
    until_acked(returned_at + 200).await?;
    stop.store(true, Ordering::Relaxed);
    let report = publishing.await?;
    let sent = report.sent;
    assert!(report.all_acked(sent), "{report:?}");

    // Every acknowledged message is on one node or the other (or both, as
    // a duplicate with the same message id), each node's in order.
    let last = payload("meter", sent - 1);
    let mut on_first = AmqpQueue::open(&first.amqp_uri(), &spec).await?;
    let from_first = on_first
        .take_until(LONG, |got| got.iter().any(|m| m.body == last))
        .await?;
    let on_first_counters = counters(&from_first)?;
    let wanted: BTreeSet<u64> = (0..sent)
        .filter(|n| !on_first_counters.contains(n))
        .collect();
    let rest = on_second
        .take_until(SHORT, |got| {
            let mut seen = counters(&from_second).unwrap_or_default();
            seen.extend(counters(got).unwrap_or_default());
            wanted.is_subset(&seen)
        })
        .await
        .map_err(|e| anyhow::anyhow!("acknowledged but on neither node: {e:#}"))?;
    from_second.extend(rest);
    check_order_and_identity(gw.id(), &from_first)?;
    check_order_and_identity(gw.id(), &from_second)?;
    let both: Vec<Received> = from_first.iter().chain(&from_second).cloned().collect();
    let counters = counters(&both)?;
    assert!((0..sent).all(|n| counters.contains(&n)));
    assert!(
        both.iter().all(|m| m.priority == Some(5)),
        "the route's priority is the AMQP priority"
    );

    let text = gw.metrics().await?;
    let node_up = |node: &str| {
        metric(
            &text,
            "edge_upstream_node_up",
            &["upstream=\"cluster\"", &format!("node=\"{node}\"")],
        )
    };
    assert_eq!(node_up(&a), Some(1.0), "{text}");
    assert_eq!(node_up(&b), Some(0.0), "{text}");
    let connects_to_second = metric(
        &text,
        "edge_upstream_connects_total",
        &[
            "upstream=\"cluster\"",
            &format!("node=\"{b}\""),
            "result=\"ok\"",
        ],
    );
    assert!(connects_to_second >= Some(1.0), "{text}");

    on_first.delete().await?;
    gw.shutdown().await?;
    blocking(move || {
        let mut second = second;
        first.stop()?;
        second.stop()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_link_is_reported_stalled_and_rebuilt_by_the_watchdog() -> Result<()> {
    let (proxy, prefix, mut queue) = behind_a_proxy("blackhole", false).await?;
    let gw = TestGateway::builder()
        .upstream_with(
            "central",
            &[proxy.amqp_uri()],
            &[("confirm_timeout", "\"2s\"")],
        )
        .route("all", &format!("{prefix}/#"), "central")
        .start()
        .await?;
    let metrics = gw.metrics_addr().expect("metrics on");
    wait_health(metrics, "central", &format!("up ({})", proxy.addr())).await?;
    let report = publish_meter(&gw, &prefix, 0, 20).await;
    assert!(report.all_acked(20), "{report:?}");
    let mut received = queue.take(20, SHORT).await?;

    // The path swallows everything: the socket stays up, nothing moves.
    proxy.set_blackhole(true);
    let report = publish_meter(&gw, &prefix, 20, 100).await;
    assert!(
        report.all_acked(100),
        "the local store still acknowledges: {report:?}"
    );
    wait_health(metrics, "central", &format!("stalled ({})", proxy.addr())).await?;
    let text = gw.metrics().await?;
    let state = |s: &str| {
        metric(
            &text,
            "edge_upstream_state",
            &["upstream=\"central\"", &format!("state=\"{s}\"")],
        )
    };
    assert_eq!(state("stalled"), Some(1.0), "{text}");
    assert_eq!(state("up"), Some(0.0), "{text}");
    // Still stalled while reconnects through the blackhole time out.
    let accepted = proxy.accepted();
    wait_for(
        "a reconnect attempt through the blackhole",
        LONG,
        || async { (proxy.accepted() > accepted).then_some(()) },
    )
    .await?;
    assert_eq!(
        health_of(metrics, "central").await,
        format!("stalled ({})", proxy.addr())
    );

    // The path heals: a rebuilt link delivers the backlog.
    proxy.set_blackhole(false);
    let backlog = queue
        .take_until(LONG, |got| {
            got.iter().any(|m| m.body == payload("meter", 119))
        })
        .await?;
    received.extend(backlog);
    wait_health(metrics, "central", &format!("up ({})", proxy.addr())).await?;
    let per_publisher = check_order_and_identity(gw.id(), &received)?;
    let mut all: Vec<u64> = per_publisher.values().flatten().copied().collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all, (0..120).collect::<Vec<_>>(), "lost in the blackhole");
    queue.delete().await?;
    gw.shutdown().await?;
    Ok(())
}

/// A gateway whose route `alarms` (`<prefix>/alarms/#`) to `central`
/// (through `proxy`) acknowledges once the broker confirmed.
fn confirmed_alarms(proxy: &Proxy, prefix: &str) -> edge_tests::TestGatewayBuilder {
    TestGateway::builder()
        .upstream("central", &[proxy.amqp_uri()])
        .route_with(
            "alarms",
            &format!("{prefix}/alarms/#"),
            "central",
            &[("ack", "\"upstream-confirmed\"")],
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_confirmed_route_acks_only_once_the_broker_confirmed() -> Result<()> {
    let (proxy, prefix, mut queue) = behind_a_proxy("ackpoint", true).await?;
    let gw = confirmed_alarms(&proxy, &prefix)
        .route("data", &format!("{prefix}/data/#"), "central")
        .start()
        .await?;

    let mut options = edge_tests::mqtt::options(gw.mqtt_addr(), &unique("device"));
    options.set_inflight(10);
    let (client, mut events) = AsyncClient::new(options, 16);
    client
        .publish(format!("{prefix}/data/1"), QoS::AtLeastOnce, false, "21.5")
        .await?;
    client
        .publish(
            format!("{prefix}/alarms/1"),
            QoS::AtLeastOnce,
            false,
            "fire",
        )
        .await?;
    // The persisted route's PUBACK comes from the local store; the
    // upstream-confirmed one does not come while the broker is away.
    // (PUBACKs keep the order of the PUBLISHes, so one behind the alarm
    // would wait too.)
    let mut acks = Vec::new();
    let down_until = Instant::now() + Duration::from_secs(2);
    while let Ok(event) = tokio::time::timeout_at(down_until.into(), events.poll()).await {
        if let Event::Incoming(Packet::PubAck(ack)) = event? {
            acks.push(ack.pkid);
        }
    }
    assert_eq!(
        acks,
        vec![1],
        "only the persisted route's message is acknowledged"
    );
    assert!(queue.take(1, Duration::from_millis(200)).await.is_err());

    proxy.set_refusing(false);
    let acked = tokio::time::timeout(LONG, async {
        loop {
            if let Event::Incoming(Packet::PubAck(ack)) = events.poll().await? {
                return anyhow::Ok(ack.pkid);
            }
        }
    })
    .await??;
    assert_eq!(acked, 2);
    let got = queue.take(2, SHORT).await?;
    assert!(
        got.iter().any(|m| m.body == b"fire"),
        "PUBACK came after the broker had it: {got:?}"
    );
    client.disconnect().await?;
    queue.delete().await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amqp_publishers_confirm_waits_for_the_broker_on_an_upstream_confirmed_route()
-> Result<()> {
    let (proxy, prefix, mut queue) = behind_a_proxy("ackpoint-amqp", true).await?;
    let gw = confirmed_alarms(&proxy, &prefix).start().await?;
    let conn = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await?;
    // amq.topic is the MQTT topic space: key `<prefix>.alarms.1` is topic
    // `<prefix>/alarms/1`.
    let confirm = channel
        .basic_publish(
            "amq.topic".into(),
            format!("{prefix}.alarms.1").as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            b"smoke",
            lapin::BasicProperties::default(),
        )
        .await?;
    let mut confirm = Box::pin(confirm);
    assert!(
        tokio::time::timeout(Duration::from_secs(2), &mut confirm)
            .await
            .is_err(),
        "confirmed while the upstream broker was unreachable"
    );
    proxy.set_refusing(false);
    let confirmation = tokio::time::timeout(LONG, confirm).await??;
    assert!(confirmation.is_ack(), "{confirmation:?}");
    let got = queue.next(SHORT).await?;
    assert_eq!(got.body, b"smoke");
    conn.close(200, "done".into()).await?;
    queue.delete().await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_rate_cap_spreads_the_backlog_drain() -> Result<()> {
    const BACKLOG: u64 = 300;
    const RATE: u64 = 100;
    let (proxy, prefix, mut queue) = behind_a_proxy("replaycap", true).await?;
    let gw = TestGateway::builder()
        .upstream_with(
            "central",
            &[proxy.amqp_uri()],
            &[("max_replay_rate", &RATE.to_string())],
        )
        .route("all", &format!("{prefix}/#"), "central")
        .start()
        .await?;
    let report = publish_meter(&gw, &prefix, 0, BACKLOG).await;
    assert!(report.all_acked(BACKLOG), "{report:?}");

    proxy.set_refusing(false);
    let first = queue.next(LONG).await?;
    let started = Instant::now();
    let mut received = vec![first];
    received.extend(queue.take(BACKLOG as usize - 1, LONG).await?);
    let took = started.elapsed();
    let per_publisher = check_order_and_identity(gw.id(), &received)?;
    assert_eq!(
        per_publisher.values().next().map(Vec::len),
        Some(BACKLOG as usize)
    );
    // A lower bound only (a slow machine makes it longer, never shorter):
    // the backlog less the cap's burst, at the cap's rate.
    let floor = Duration::from_secs_f64((BACKLOG - RATE / 10 - 1) as f64 / RATE as f64);
    assert!(
        took >= floor.mul_f64(0.9),
        "{BACKLOG} messages drained in {took:?}, faster than {RATE}/s allows"
    );
    queue.delete().await?;
    gw.shutdown().await?;
    Ok(())
}

/// `edge_messages_forwarded_total` of `upstream`, summed over its routes.
async fn forwarded(gw: &TestGateway, upstream: &str) -> f64 {
    let Ok(text) = gw.metrics().await else {
        return 0.0;
    };
    let label = format!("upstream=\"{upstream}\"");
    text.lines()
        .filter(|l| l.starts_with("edge_messages_forwarded_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_broker_crashes_under_load_lose_nothing() -> Result<()> {
    const CRASHES: usize = 10;
    let mut node = blocking(|| RabbitNode::dedicated("crashes")).await?;
    let uri = node.amqp_uri();
    let prefix = unique("crashes");
    // Read only at the end: what the broker confirmed must survive its
    // own kill -9 (a durable queue confirms persistent messages once they
    // are on its disk).
    let spec = QueueSpec::topic(&format!("{prefix}.#")).durable();
    AmqpQueue::declare(&uri, &spec).await?;
    let gw = TestGateway::builder()
        .upstream("central", std::slice::from_ref(&uri))
        .route("all", &format!("{prefix}/#"), "central")
        .start()
        .await?;
    let (publishing, stop, _) = publish_meter_until_stopped(&gw, &prefix, 8);
    for crash in 0..CRASHES {
        // Forwarding has resumed since the last crash before the next one.
        let before = forwarded(&gw, "central").await;
        wait_for(
            &format!("forwarding before crash {crash}"),
            LONG,
            || async { (forwarded(&gw, "central").await >= before + 50.0).then_some(()) },
        )
        .await?;
        node = blocking(move || {
            node.kill()?;
            node.start_again().map(|()| node)
        })
        .await?;
    }
    stop.store(true, Ordering::Relaxed);
    let report = publishing.await?;
    let sent = report.sent;
    assert!(report.all_acked(sent), "{report:?}");

    let last = payload("meter", sent - 1);
    let mut queue = AmqpQueue::open(&uri, &spec).await?;
    let received = queue
        .take_until(LONG, |got| got.iter().any(|m| m.body == last))
        .await?;
    let per_publisher = check_order_and_identity(gw.id(), &received)?;
    let got: BTreeSet<u64> = per_publisher.values().flatten().copied().collect();
    let lost: Vec<u64> = (0..sent).filter(|n| !got.contains(n)).collect();
    assert!(
        lost.is_empty(),
        "{} of {sent} acknowledged messages lost: {lost:?}",
        lost.len()
    );
    queue.delete().await?;
    gw.shutdown().await?;
    blocking(move || node.stop()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_to_a_quorum_queue_is_confirmed_after_its_raft_commit() -> Result<()> {
    const COUNT: u64 = 200;
    let uri = crate::shared_node().await?.amqp_uri();
    let prefix = unique("quorum");
    let spec = QueueSpec::topic(&format!("{prefix}.#")).quorum();
    let mut queue = AmqpQueue::open(&uri, &spec).await?;
    let gw = TestGateway::builder()
        .upstream("central", std::slice::from_ref(&uri))
        .route("all", &format!("{prefix}/#"), "central")
        .start()
        .await?;
    let report = publish_meter(&gw, &prefix, 0, COUNT).await;
    assert!(report.all_acked(COUNT), "{report:?}");
    let received = queue.take(COUNT as usize, LONG).await?;
    let per_publisher = check_order_and_identity(gw.id(), &received)?;
    assert_eq!(
        per_publisher.values().next().map(Vec::len),
        Some(COUNT as usize)
    );
    wait_for("the cursor past every message", SHORT, || async {
        (forwarded(&gw, "central").await >= COUNT as f64).then_some(())
    })
    .await?;
    queue.delete().await?;
    gw.shutdown().await?;
    Ok(())
}
