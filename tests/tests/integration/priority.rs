//! Route priorities while a backlog drains: the high-priority route's
//! backlog goes first, its live traffic overtakes a low-priority backlog
//! (and, with `ack = "upstream-confirmed"`, is acknowledged without
//! waiting for it), and order within each route holds.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use edge_gateway::backlog::Report;
use edge_tests::amqp::{AmqpQueue, QueueSpec};
use edge_tests::http::{get, metric};
use edge_tests::proxy::Proxy;
use edge_tests::{Publisher, Received, TestGateway, TestGatewayBuilder, unique, wait_for};
use rumqttc::{AsyncClient, Event, Packet, QoS};

use crate::{LONG, check_order_and_identity, gateway_bin, parse_payload, payload};

/// A proxy in front of the shared node, refusing until the test opens it,
/// a topic prefix of its own and a queue on the node taking `<prefix>.#`.
async fn behind_a_refusing_proxy(label: &str) -> Result<(Proxy, String, AmqpQueue)> {
    let node = crate::shared_node().await?;
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], node.amqp_port()))).await?;
    proxy.set_refusing(true);
    let prefix = unique(label);
    let queue =
        AmqpQueue::open(&node.amqp_uri(), &QueueSpec::topic(&format!("{prefix}.#"))).await?;
    Ok((proxy, prefix, queue))
}

/// The running gateway's `GET /backlog`.
async fn backlog(gw: &TestGateway) -> Result<Report> {
    let addr = gw.metrics_addr().context("the gateway serves metrics")?;
    let (status, body) = get(addr, "/backlog").await?;
    anyhow::ensure!(status == 200, "GET /backlog: {status} {body}");
    Report::from_json(&body).with_context(|| format!("not a backlog: {body}"))
}

/// A gateway with two routes to `central`: `data` (`<prefix>/data/#`,
/// priority 0) and `alarms` (`<prefix>/alarms/#`, priority 9, with
/// `alarm_keys` besides).
fn with_lanes(prefix: &str, alarm_keys: &[(&str, &str)]) -> TestGatewayBuilder {
    let mut keys = vec![("priority", "9")];
    keys.extend_from_slice(alarm_keys);
    TestGateway::builder()
        .route("data", &format!("{prefix}/data/#"), "central")
        .route_with("alarms", &format!("{prefix}/alarms/#"), "central", &keys)
}

/// Publishes `total` QoS 1 messages from one client, one in ten an alarm
/// (`alarm:<i>` on `<prefix>/alarms/1`), the others `data:<i>` on
/// `<prefix>/data/1`: a backlog that interleaves both routes.
async fn publish_interleaved(addr: SocketAddr, prefix: &str, total: u64) {
    let data_topic = format!("{prefix}/data/1");
    let alarm_topic = format!("{prefix}/alarms/1");
    let report = Publisher::new(addr, &unique("device"))
        .run(total, LONG, move |i| {
            if i % 10 == 9 {
                (alarm_topic.clone(), payload("alarm", i))
            } else {
                (data_topic.clone(), payload("data", i))
            }
        })
        .await;
    assert!(report.all_acked(total), "{report:?}");
}

/// Whether a message is one of the `alarm` publisher's.
fn is_alarm(m: &Received) -> bool {
    parse_payload(&m.body).is_ok_and(|(publisher, _)| publisher == "alarm")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drains_the_high_priority_route_first_in_order_within_each() -> Result<()> {
    const TOTAL: u64 = 1500;
    let (proxy, prefix, mut queue) = behind_a_refusing_proxy("prio-drain").await?;
    let gw = with_lanes(&prefix, &[])
        .upstream_with("central", &[proxy.amqp_uri()], &[("max_in_flight", "500")])
        .start()
        .await?;
    publish_interleaved(gw.mqtt_addr(), &prefix, TOTAL).await;
    let waiting = |report: &Report, route: &str| {
        report
            .upstreams
            .iter()
            .flat_map(|u| u.routes.iter())
            .find(|r| r.route == route)
            .map(|r| r.messages)
    };
    let before = backlog(&gw).await?;
    assert_eq!(waiting(&before, "alarms"), Some(TOTAL / 10));
    assert_eq!(waiting(&before, "data"), Some(TOTAL - TOTAL / 10));

    proxy.set_refusing(false);
    let received = queue.take(TOTAL as usize, LONG).await?;
    let alarms = (TOTAL / 10) as usize;
    let first: Vec<&Received> = received.iter().take(alarms).collect();
    let out_of_turn = first.iter().filter(|m| !is_alarm(m)).count();
    assert_eq!(
        out_of_turn, 0,
        "the first {alarms} messages forwarded must be the alarms; {out_of_turn} were data"
    );
    let per_route = check_order_and_identity(gw.id(), &received)?;
    assert_eq!(per_route.get("alarm").map(Vec::len), Some(alarms));
    assert_eq!(
        per_route.get("data").map(Vec::len),
        Some(TOTAL as usize - alarms)
    );
    // AMQP priority from the route.
    assert!(
        received
            .iter()
            .filter(|m| is_alarm(m))
            .all(|m| m.priority == Some(9))
    );
    // Each lane's durable cursor is past what it forwarded: the backlog
    // (counted from the lane cursors) empties for both routes.
    wait_for("the backlog to empty", LONG, || async {
        let report = backlog(&gw).await.ok()?;
        (waiting(&report, "alarms") == Some(0) && waiting(&report, "data") == Some(0)).then_some(())
    })
    .await?;
    queue.delete().await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_high_priority_traffic_overtakes_a_low_priority_backlog() -> Result<()> {
    const BACKLOG: u64 = 4000;
    const RATE: u64 = 1000;
    let (proxy, prefix, mut queue) = behind_a_refusing_proxy("prio-live").await?;
    let gw = with_lanes(&prefix, &[("ack", "\"upstream-confirmed\"")])
        .upstream_with(
            "central",
            &[proxy.amqp_uri()],
            &[("max_replay_rate", &RATE.to_string())],
        )
        .start()
        .await?;
    let data_topic = format!("{prefix}/data/1");
    let report = Publisher::new(gw.mqtt_addr(), &unique("meter"))
        .run(BACKLOG, LONG, move |i| {
            (data_topic.clone(), payload("data", i))
        })
        .await;
    assert!(report.all_acked(BACKLOG), "{report:?}");

    proxy.set_refusing(false);
    // The drain has begun (at RATE a second it takes seconds).
    let first = queue.next(LONG).await?;
    assert!(!is_alarm(&first));

    let options = edge_tests::mqtt::options(gw.mqtt_addr(), &unique("alarm"));
    let (client, mut events) = AsyncClient::new(options, 16);
    client
        .publish(
            format!("{prefix}/alarms/1"),
            QoS::AtLeastOnce,
            false,
            payload("alarm", 0),
        )
        .await?;
    // Its PUBACK waits for the broker's confirm of the alarm only, not for
    // the data backlog ahead of it in the log.
    tokio::time::timeout(LONG, async {
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = events.poll().await? {
                return anyhow::Ok(());
            }
        }
    })
    .await
    .context("no PUBACK for the alarm")??;
    let forwarded_data = metric(
        &gw.metrics().await?,
        "edge_messages_forwarded_total",
        &["route=\"data\"", "upstream=\"central\""],
    )
    .unwrap_or(0.0);
    assert!(
        (forwarded_data as u64) < BACKLOG / 2,
        "the alarm was acknowledged only after {forwarded_data} of {BACKLOG} backlog messages"
    );

    let mut received = vec![first];
    received.extend(queue.take(BACKLOG as usize, LONG).await?);
    let at = received
        .iter()
        .position(is_alarm)
        .context("the alarm was not forwarded")?;
    let behind = received.len() - 1 - at;
    assert!(
        behind as u64 >= BACKLOG / 2,
        "the alarm came after {at} backlog messages; only {behind} were left behind it"
    );
    let per_route = check_order_and_identity(gw.id(), &received)?;
    assert_eq!(per_route.get("data").map(Vec::len), Some(BACKLOG as usize));
    // Nothing was forwarded twice: no copy of the alarm (or of anything)
    // follows the drain.
    let extra = queue.next(Duration::from_secs(2)).await;
    assert!(extra.is_err(), "a message after the drain: {extra:?}");
    client.disconnect().await?;
    queue.delete().await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_lose_nothing_when_the_gateway_is_killed_mid_drain() -> Result<()> {
    const TOTAL: u64 = 3000;
    let (proxy, prefix, mut queue) = behind_a_refusing_proxy("prio-kill").await?;
    let mut gw = with_lanes(&prefix, &[])
        .upstream_with(
            "central",
            &[proxy.amqp_uri()],
            &[("max_replay_rate", "2000")],
        )
        .spawn(gateway_bin())
        .await?;
    publish_interleaved(gw.mqtt_addr(), &prefix, TOTAL).await;

    proxy.set_refusing(false);
    // Mid-drain: the alarms are through, part of the data is.
    let mut received = queue.take(TOTAL as usize / 4, LONG).await?;
    gw.kill().await?;
    gw.restart().await?;
    let distinct = |got: &[Received]| {
        got.iter()
            .map(|m| m.body.as_slice())
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    let rest = queue
        .take_until(LONG, |got| {
            let mut all: Vec<&Received> = received.iter().collect();
            all.extend(got);
            all.iter()
                .map(|m| m.body.as_slice())
                .collect::<std::collections::HashSet<_>>()
                .len()
                >= TOTAL as usize
        })
        .await?;
    received.extend(rest);
    assert_eq!(distinct(&received), TOTAL as usize);
    // Forwarded again after the kill only under the same message id, and
    // in order within each route.
    let per_route = check_order_and_identity(gw.id(), &received)?;
    assert_eq!(
        per_route.get("alarm").map(Vec::len),
        Some(TOTAL as usize / 10)
    );
    assert_eq!(
        per_route.get("data").map(Vec::len),
        Some(TOTAL as usize - TOTAL as usize / 10)
    );
    queue.delete().await?;
    gw.terminate(LONG).await?;
    Ok(())
}
