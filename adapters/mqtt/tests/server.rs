//! The MQTT adapter against a real store and router, with rumqttc and raw bytes.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use support::*;

fn client(server: &Server, id: &str) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(id, "127.0.0.1", server.addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    AsyncClient::new(options, 64)
}

/// Polls until `f` returns Some; any connection error fails the test.
async fn poll_until<T>(
    events: &mut EventLoop,
    mut f: impl FnMut(&Event) -> Option<T>,
) -> Result<T> {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let event = events.poll().await?;
            if let Some(t) = f(&event) {
                return Ok(t);
            }
        }
    })
    .await
    .context("timed out polling the client")?
}

#[tokio::test]
async fn qos1_puback_means_the_message_is_in_the_store() -> Result<()> {
    let server = Server::start().await?;
    let (client, mut events) = client(&server, "durable");
    client
        .publish("plant/line1/temp", QoS::AtLeastOnce, false, "21.5")
        .await?;
    poll_until(&mut events, |e| {
        matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())
    })
    .await?;

    let records = server.records().await?;
    assert_eq!(records.len(), 1);
    assert_eq!(&*records[0].topic, "plant/line1/temp");
    assert_eq!(&records[0].payload[..], b"21.5");
    assert_eq!(&**records[0].publisher(), "durable");
    assert_eq!(records[0].qos, edge_core::QoS::AtLeastOnce);
    server.stop().await
}

#[tokio::test]
async fn pipelined_qos1_publishes_are_acked_in_order_after_commit() -> Result<()> {
    let server = Server::with(Options {
        max_inflight: 4,
        ..Options::default()
    })
    .await?;
    let mut raw = Raw::session(server.addr, "pipeline", 30).await?;
    // 40 publishes in one write: more than max_inflight, so the connection
    // has to stop reading and resume as commits complete.
    let mut burst = Vec::new();
    for pkid in 1..=40u16 {
        burst.extend(publish("bulk/data", &pkid.to_be_bytes(), 1, pkid, false));
    }
    raw.send(&burst).await?;
    for pkid in 1..=40u16 {
        raw.expect(&ack(PUBACK, pkid)).await?;
    }
    let records = server.records().await?;
    let payloads: Vec<u16> = records
        .iter()
        .map(|r| u16::from_be_bytes([r.payload[0], r.payload[1]]))
        .collect();
    assert_eq!(payloads, (1..=40).collect::<Vec<_>>());
    server.stop().await
}

#[tokio::test]
async fn subscribers_receive_by_wildcard_filters() -> Result<()> {
    let server = Server::start().await?;
    let (sub, mut sub_events) = client(&server, "subscriber");
    sub.subscribe("sensors/+/temp", QoS::AtLeastOnce).await?;
    sub.subscribe("alarms/#", QoS::AtMostOnce).await?;
    let mut subacks = 0;
    poll_until(&mut sub_events, |e| {
        if let Event::Incoming(Packet::SubAck(ack)) = e {
            assert_eq!(ack.return_codes.len(), 1);
            subacks += 1;
        }
        (subacks == 2).then_some(())
    })
    .await?;

    let (publisher, mut pub_events) = client(&server, "publisher");
    publisher
        .publish("sensors/a/temp", QoS::AtLeastOnce, false, "1")
        .await?;
    publisher
        .publish("sensors/a/humidity", QoS::AtLeastOnce, false, "2")
        .await?;
    publisher
        .publish("alarms/door/open", QoS::AtMostOnce, false, "3")
        .await?;
    let publisher_task = tokio::spawn(async move {
        let mut acks = 0;
        poll_until(&mut pub_events, |e| {
            if let Event::Incoming(Packet::PubAck(_)) = e {
                acks += 1;
            }
            (acks == 2).then_some(())
        })
        .await
    });

    let mut received = Vec::new();
    poll_until(&mut sub_events, |e| {
        if let Event::Incoming(Packet::Publish(p)) = e {
            received.push((p.topic.clone(), p.payload.clone(), p.qos));
        }
        (received.len() == 2).then_some(())
    })
    .await?;
    // One publisher's messages fan out in order, so a wrongly matched
    // `sensors/a/humidity` would have arrived before `alarms/door/open`.
    assert_eq!(received[0].0, "sensors/a/temp");
    assert_eq!(&received[0].1[..], b"1");
    assert_eq!(received[0].2, QoS::AtLeastOnce);
    assert_eq!(received[1].0, "alarms/door/open");
    assert_eq!(received[1].2, QoS::AtMostOnce);
    publisher_task.await??;
    server.stop().await
}

#[tokio::test]
async fn ping_and_disconnect() -> Result<()> {
    let server = Server::start().await?;
    let (client, mut events) = client(&server, "pinger");
    poll_until(&mut events, |e| {
        matches!(e, Event::Incoming(Packet::ConnAck(_))).then_some(())
    })
    .await?;
    drop(client);

    let mut raw = Raw::session(server.addr, "raw-pinger", 30).await?;
    raw.send(&PINGREQ).await?;
    raw.expect(&PINGRESP).await?;
    raw.send(&DISCONNECT).await?;
    raw.expect_closed().await?;
    server.stop().await
}

#[tokio::test]
async fn malformed_packet_closes_only_that_connection() -> Result<()> {
    let server = Server::start().await?;
    let mut healthy = Raw::session(server.addr, "healthy", 30).await?;
    let mut broken = Raw::session(server.addr, "broken", 30).await?;
    // Packet type 15 does not exist in MQTT 3.1.1.
    broken.send(&[0xF0, 0x00]).await?;
    broken.expect_closed().await?;
    // A QoS 1 publish without its packet id is malformed too.
    let mut broken = Raw::session(server.addr, "broken-2", 30).await?;
    broken.send(&[0x32, 0x03, 0x00, 0x01, b't']).await?;
    broken.expect_closed().await?;

    healthy.send(&PINGREQ).await?;
    healthy.expect(&PINGRESP).await?;
    healthy
        .send(&publish("still/working", b"ok", 1, 9, false))
        .await?;
    healthy.expect(&ack(PUBACK, 9)).await?;
    server.stop().await
}

#[tokio::test]
async fn oversized_packet_closes_the_connection() -> Result<()> {
    let server = Server::with(Options {
        max_packet_size: 1024,
        ..Options::default()
    })
    .await?;
    let mut raw = Raw::session(server.addr, "big", 30).await?;
    raw.send(&publish("t", &[0u8; 100], 0, 0, false)).await?;
    raw.send(&PINGREQ).await?;
    raw.expect(&PINGRESP).await?;
    // Announces 4 KiB; refused from the header, before the body is sent.
    raw.send(&[0x30, 0x80, 0x20]).await?;
    raw.expect_closed().await?;
    server.stop().await
}

#[tokio::test]
async fn invalid_topic_name_closes_the_connection() -> Result<()> {
    let server = Server::start().await?;
    let mut raw = Raw::session(server.addr, "wild", 30).await?;
    raw.send(&publish("a/+/b", b"x", 1, 1, false)).await?;
    raw.expect_closed().await?;
    assert!(server.records().await?.is_empty());
    server.stop().await
}

/// `$amqp/...` is the AMQP exchanges' namespace: an MQTT client can neither
/// subscribe there (0x80) nor publish there (closed, nothing stored).
#[tokio::test]
async fn the_amqp_namespace_is_closed_to_mqtt_clients() -> Result<()> {
    let server = Server::start().await?;
    let mut raw = Raw::session(server.addr, "nosy", 30).await?;
    raw.send(&subscribe(
        1,
        &[("$amqp/#", 1), ("$amqp//orders", 1), ("$amqpish/x", 1)],
    ))
    .await?;
    raw.expect(&[0x90, 5, 0, 1, 0x80, 0x80, 0x01]).await?;
    raw.send(&publish("$amqp/orders/new", b"x", 1, 1, false))
        .await?;
    raw.expect_closed().await?;
    assert!(server.records().await?.is_empty());
    server.stop().await
}

#[tokio::test]
async fn silent_connection_is_closed_after_one_and_a_half_keep_alives() -> Result<()> {
    let server = Server::start().await?;
    let mut raw = Raw::session(server.addr, "sleepy", 1).await?;
    let started = Instant::now();
    raw.expect_closed().await?;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400),
        "closed after {waited:?}"
    );
    server.stop().await
}

#[tokio::test]
async fn unsupported_protocol_levels_get_connack_0x01_or_0x84() -> Result<()> {
    let server = Server::start().await?;
    for (name, level) in [(&b"MQTT"[..], 3u8), (b"MQIsdp", 4)] {
        let mut raw = Raw::connect(server.addr).await?;
        raw.send(&connect(name, level, "modern", 30, true)).await?;
        raw.expect(&[0x20, 2, 0, 0x01]).await?;
        raw.expect_closed().await?;
    }
    // A level above 5 gets MQTT 5's form: 0x84 with a reason string.
    let mut raw = Raw::connect(server.addr).await?;
    raw.send(&connect(b"MQTT", 6, "future", 30, true)).await?;
    let why = b"unsupported protocol level 6";
    let mut connack = vec![0x20, 34, 0, 0x84, 31, 0x1F, 0, why.len() as u8];
    connack.extend_from_slice(why);
    raw.expect(&connack).await?;
    raw.expect_closed().await?;
    // An unknown protocol name gets no CONNACK at all (MQTT-3.1.2-1).
    let mut raw = Raw::connect(server.addr).await?;
    raw.send(&connect(b"MQTX", 4, "other", 30, true)).await?;
    raw.expect_closed().await?;
    server.stop().await
}

#[tokio::test]
async fn mqtt31_is_served_like_mqtt311() -> Result<()> {
    let server = Server::start().await?;
    let mut raw = Raw::connect(server.addr).await?;
    // Longer than 3.1's 23 bytes: accepted, as Mosquitto does.
    raw.send(&connect(
        b"MQIsdp",
        3,
        "an-mqtt-3.1-client-with-a-long-id",
        30,
        true,
    ))
    .await?;
    raw.expect(&[0x20, 2, 0, 0]).await?;
    raw.send(&publish("v31/temp", b"20", 1, 1, false)).await?;
    raw.expect(&ack(PUBACK, 1)).await?;
    raw.send(&PINGREQ).await?;
    raw.expect(&PINGRESP).await?;
    let records = server.records().await?;
    assert_eq!(records.len(), 1);
    assert_eq!(&*records[0].topic, "v31/temp");
    assert_eq!(
        &**records[0].publisher(),
        "an-mqtt-3.1-client-with-a-long-id"
    );
    // 3.1 has no assigned client ids: an empty one is rejected (2).
    let mut raw = Raw::connect(server.addr).await?;
    raw.send(&connect(b"MQIsdp", 3, "", 30, true)).await?;
    raw.expect(&[0x20, 2, 0, 0x02]).await?;
    raw.expect_closed().await?;
    server.stop().await
}

#[tokio::test]
async fn client_ids() -> Result<()> {
    let server = Server::start().await?;
    // Empty id with clean session: one is assigned.
    let mut raw = Raw::connect(server.addr).await?;
    raw.send(&connect(b"MQTT", 4, "", 30, true)).await?;
    raw.expect(&[0x20, 2, 0, 0]).await?;
    // Empty id without clean session: identifier rejected.
    let mut raw = Raw::connect(server.addr).await?;
    raw.send(&connect(b"MQTT", 4, "", 30, false)).await?;
    raw.expect(&[0x20, 2, 0, 0x02]).await?;
    raw.expect_closed().await?;
    // clean_session = false with an id is served (as a clean session).
    let mut raw = Raw::connect(server.addr).await?;
    raw.send(&connect(b"MQTT", 4, "keeper", 30, false)).await?;
    raw.expect(&[0x20, 2, 0, 0]).await?;
    // The first packet must be CONNECT.
    let mut raw = Raw::connect(server.addr).await?;
    raw.send(&PINGREQ).await?;
    raw.expect_closed().await?;
    server.stop().await
}

#[tokio::test]
async fn qos2_is_stored_once_and_completed() -> Result<()> {
    let server = Server::start().await?;
    let mut raw = Raw::session(server.addr, "exactly", 30).await?;
    raw.send(&publish("q2/topic", b"once", 2, 5, false)).await?;
    raw.expect(&ack(PUBREC, 5)).await?;
    // A retransmission before PUBREL is answered but not routed again.
    raw.send(&publish("q2/topic", b"once", 2, 5, true)).await?;
    raw.expect(&ack(PUBREC, 5)).await?;
    raw.send(&ack(PUBREL, 5)).await?;
    raw.expect(&ack(PUBCOMP, 5)).await?;
    let records = server.records().await?;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].qos as u8, 2);
    server.stop().await
}

#[tokio::test]
async fn invalid_filter_gets_a_failure_code() -> Result<()> {
    let server = Server::start().await?;
    let mut raw = Raw::session(server.addr, "filters", 30).await?;
    raw.send(&subscribe(3, &[("a/#/b", 1), ("a/+", 2), ("x/#", 0)]))
        .await?;
    // 0x80 for the invalid one; QoS 2 is granted as asked.
    raw.expect(&[0x90, 5, 0, 3, 0x80, 0x02, 0x00]).await?;
    server.stop().await
}

#[tokio::test]
async fn qos1_delivery_window_and_acks() -> Result<()> {
    let server = Server::with(Options {
        max_inflight: 2,
        ..Options::default()
    })
    .await?;
    let mut sub = Raw::session(server.addr, "slow-sub", 30).await?;
    sub.send(&subscribe(1, &[("feed", 1)])).await?;
    sub.expect(&[0x90, 3, 0, 1, 1]).await?;
    let mut publisher = Raw::session(server.addr, "feeder", 30).await?;
    for pkid in 1..=3u16 {
        publisher
            .send(&publish("feed", &[pkid as u8], 1, pkid, false))
            .await?;
        publisher.expect(&ack(PUBACK, pkid)).await?;
    }
    // Two in flight; the third waits for an ack.
    sub.expect(&publish("feed", &[1], 1, 1, false)).await?;
    sub.expect(&publish("feed", &[2], 1, 2, false)).await?;
    sub.send(&ack(PUBACK, 1)).await?;
    sub.expect(&publish("feed", &[3], 1, 3, false)).await?;
    server.stop().await
}

#[tokio::test]
async fn same_client_id_takes_over_the_old_connection() -> Result<()> {
    let server = Server::start().await?;
    let mut old = Raw::session(server.addr, "twin", 30).await?;
    let mut new = Raw::session(server.addr, "twin", 30).await?;
    old.expect_closed().await?;
    new.send(&PINGREQ).await?;
    new.expect(&PINGRESP).await?;
    server.stop().await
}

#[tokio::test]
async fn connections_over_the_limit_are_closed() -> Result<()> {
    let server = Server::with(Options {
        max_connections: 1,
        ..Options::default()
    })
    .await?;
    let mut first = Raw::session(server.addr, "first", 30).await?;
    let mut second = Raw::connect(server.addr).await?;
    second.expect_closed().await?;
    first.send(&PINGREQ).await?;
    first.expect(&PINGRESP).await?;
    // The slot is free again once the first leaves.
    first.send(&DISCONNECT).await?;
    first.expect_closed().await?;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut third = Raw::connect(server.addr).await?;
        third.send(&connect(b"MQTT", 4, "third", 30, true)).await?;
        // The permit is released just after the socket closes; retry until then.
        if third.expect(&[0x20, 2, 0, 0]).await.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!("slot never freed");
        }
        tokio::task::yield_now().await;
    }
    server.stop().await
}

#[tokio::test]
async fn store_full_closes_without_puback() -> Result<()> {
    let server = Server::with(Options {
        max_bytes: 4096,
        ..Options::default()
    })
    .await?;
    let mut raw = Raw::session(server.addr, "filler", 30).await?;
    raw.send(&publish("fill", &[7u8; 1000], 1, 1, false))
        .await?;
    raw.expect(&ack(PUBACK, 1)).await?;
    raw.send(&publish("fill", &[7u8; 8000], 1, 2, false))
        .await?;
    raw.expect_closed().await?;
    assert_eq!(server.records().await?.len(), 1);
    server.stop().await
}

#[tokio::test]
async fn shutdown_closes_connections_and_returns() -> Result<()> {
    let server = Server::start().await?;
    let mut raw = Raw::session(server.addr, "leaver", 30).await?;
    raw.send(&publish("last/words", b"bye", 1, 1, false))
        .await?;
    raw.expect(&ack(PUBACK, 1)).await?;
    let addr = server.addr;
    server.stop().await?;
    raw.expect_closed().await?;
    assert!(
        Raw::connect(addr).await.is_err(),
        "listener still accepting"
    );
    Ok(())
}

#[tokio::test]
async fn shutdown_still_acks_publishes_whose_commit_is_under_way() -> Result<()> {
    let (server, gate) = Server::gated(Options::default()).await?;
    let mut raw = Raw::session(server.addr, "in-flight", 30).await?;
    gate.close();
    raw.send(&publish("late/commit", b"1", 1, 1, false)).await?;
    gate.holding().await?;
    // The publish is read and its commit is under way: shut down now.
    server.shutdown.cancel();
    gate.open();
    raw.expect(&ack(PUBACK, 1)).await?;
    raw.expect_closed().await?;
    assert_eq!(server.records().await?.len(), 1);
    server.stop().await
}

#[tokio::test]
async fn puback_waits_for_the_commit_while_reading_goes_on() -> Result<()> {
    let (server, gate) = Server::gated(Options::default()).await?;
    let mut raw = Raw::session(server.addr, "patient", 30).await?;
    gate.close();
    raw.send(&publish("held/1", b"a", 1, 1, false)).await?;
    gate.holding().await?;
    raw.send(&publish("held/2", b"b", 1, 2, false)).await?;
    raw.send(&PINGREQ).await?;
    // Both publishes were read before the ping, yet nothing is committed:
    // the ping is answered first and no PUBACK precedes it.
    raw.expect(&PINGRESP).await?;
    gate.open();
    raw.expect(&ack(PUBACK, 1)).await?;
    raw.expect(&ack(PUBACK, 2)).await?;
    assert_eq!(server.records().await?.len(), 2);
    server.stop().await
}

/// A subscriber that stops reading while deliveries pile up for it must not
/// pin its connection. It keeps sending PINGREQs (so keep-alive is
/// satisfied whenever the gateway reads it): only the write stall — nothing
/// it is sent moves for 1.5 x keep-alive — can close it.
#[tokio::test]
async fn a_subscriber_that_stops_reading_is_closed_not_kept_forever() -> Result<()> {
    let server = Server::start().await?;
    let mut stuck = Raw::session(server.addr, "stuck", 1).await?;
    stuck.send(&subscribe(1, &[("flood/#", 0)])).await?;
    stuck.expect(&[0x90, 3, 0, 1, 0]).await?;
    // From here on `stuck` reads nothing.

    let mut flooder = Raw::session(server.addr, "flooder", 60).await?;
    let chunk = vec![b'x'; 60 * 1024];
    for _ in 0..256 {
        flooder
            .send(&publish("flood/x", &chunk, 0, 0, false))
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.router.session_count() > 1 {
        assert!(
            Instant::now() < deadline,
            "the stuck subscriber is still connected 20 s after the flood"
        );
        // PINGREQ; once the gateway has closed the socket this may fail.
        let _ = stuck.send(&[0xC0, 0]).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(stuck);
    server.stop().await
}

#[tokio::test]
async fn live_deliveries_have_retain_cleared() -> Result<()> {
    let server = Server::start().await?;
    let mut sub = Raw::session(server.addr, "sub", 30).await?;
    sub.send(&subscribe(1, &[("r/#", 0)])).await?;
    sub.expect(&[0x90, 3, 0, 1, 0]).await?;
    let mut publisher = Raw::session(server.addr, "pub", 30).await?;
    let mut retained = publish("r/1", b"v", 0, 0, false);
    retained[0] |= 0x01;
    publisher.send(&retained).await?;
    // PUBLISH, QoS 0, RETAIN 0: topic "r/1", payload "v".
    sub.expect(&[0x30, 6, 0, 3, b'r', b'/', b'1', b'v']).await?;
    server.stop().await
}

#[tokio::test]
async fn qos2_retransmission_while_committing_is_routed_once() -> Result<()> {
    let (server, gate) = Server::gated(Options::default()).await?;
    let mut sub = Raw::session(server.addr, "q2-sub", 30).await?;
    sub.send(&subscribe(1, &[("q2/#", 0)])).await?;
    sub.expect(&[0x90, 3, 0, 1, 0]).await?;
    let mut raw = Raw::session(server.addr, "q2-pub", 30).await?;
    gate.close();
    raw.send(&publish("q2/a", b"once", 2, 5, false)).await?;
    gate.holding().await?;
    // The same packet id again, DUP set, while its commit is under way.
    raw.send(&publish("q2/a", b"once", 2, 5, true)).await?;
    raw.send(&PINGREQ).await?;
    raw.expect(&PINGRESP).await?;
    gate.open();
    raw.expect(&ack(PUBREC, 5)).await?;
    raw.send(&ack(PUBREL, 5)).await?;
    raw.expect(&ack(PUBCOMP, 5)).await?;
    // After PUBCOMP the id starts a new publication (MQTT-4.3.3-2).
    raw.send(&publish("q2/a", b"again", 2, 5, false)).await?;
    raw.expect(&ack(PUBREC, 5)).await?;
    // One copy of each, in order: a second "once" would come before "again".
    sub.expect(&publish("q2/a", b"once", 0, 0, false)).await?;
    sub.expect(&publish("q2/a", b"again", 0, 0, false)).await?;
    let payloads: Vec<Vec<u8>> = server
        .records()
        .await?
        .into_iter()
        .map(|r| r.payload.to_vec())
        .collect();
    assert_eq!(payloads, [b"once".to_vec(), b"again".to_vec()]);
    server.stop().await
}

#[tokio::test]
async fn pubrel_before_pubrec_is_a_protocol_error() -> Result<()> {
    let (server, gate) = Server::gated(Options::default()).await?;
    let mut raw = Raw::session(server.addr, "hasty", 30).await?;
    gate.close();
    raw.send(&publish("q2/b", b"x", 2, 9, false)).await?;
    gate.holding().await?;
    // PUBCOMP now would complete a message that is not on disk yet.
    raw.send(&ack(PUBREL, 9)).await?;
    raw.expect_closed().await?;
    gate.open();
    server.stop().await
}

/// Outbound QoS 2, byte for byte, with a window of one: PUBLISH (QoS 2)
/// → PUBREC → PUBREL → PUBCOMP, and the next delivery only after PUBCOMP.
#[tokio::test]
async fn qos2_delivery_exchange_and_window() -> Result<()> {
    let server = Server::with(Options {
        max_inflight: 1,
        ..Options::default()
    })
    .await?;
    let mut sub = Raw::session(server.addr, "q2-receiver", 30).await?;
    sub.send(&subscribe(1, &[("q2out/#", 2)])).await?;
    sub.expect(&[0x90, 3, 0, 1, 2]).await?;
    let mut publisher = Raw::session(server.addr, "q2-sender", 30).await?;
    for pkid in 1..=2u16 {
        publisher
            .send(&publish("q2out/x", &[pkid as u8], 2, pkid, false))
            .await?;
        publisher.expect(&ack(PUBREC, pkid)).await?;
        publisher.send(&ack(PUBREL, pkid)).await?;
        publisher.expect(&ack(PUBCOMP, pkid)).await?;
    }
    sub.expect(&publish("q2out/x", &[1], 2, 1, false)).await?;
    sub.send(&ack(PUBREC, 1)).await?;
    sub.expect(&ack(PUBREL, 1)).await?;
    // The window stays full until PUBCOMP: two round trips show nothing
    // but their PINGRESPs, though the second delivery is waiting.
    for _ in 0..2 {
        sub.send(&PINGREQ).await?;
        sub.expect(&PINGRESP).await?;
    }
    // A repeated PUBREC is answered with PUBREL again.
    sub.send(&ack(PUBREC, 1)).await?;
    sub.expect(&ack(PUBREL, 1)).await?;
    sub.send(&ack(PUBCOMP, 1)).await?;
    sub.expect(&publish("q2out/x", &[2], 2, 2, false)).await?;
    // Acknowledging a QoS 2 delivery with PUBACK breaks the protocol.
    sub.send(&ack(PUBACK, 2)).await?;
    sub.expect_closed().await?;
    server.stop().await
}

/// A QoS 2 delivery and a QoS 2 publish with rumqttc on both ends.
#[tokio::test]
async fn qos2_end_to_end_with_rumqttc() -> Result<()> {
    let server = Server::start().await?;
    let (sub, mut sub_events) = client(&server, "q2-rumqttc-sub");
    sub.subscribe("exact/#", QoS::ExactlyOnce).await?;
    let granted = poll_until(&mut sub_events, |e| match e {
        Event::Incoming(Packet::SubAck(ack)) => Some(ack.return_codes.clone()),
        _ => None,
    })
    .await?;
    assert_eq!(
        granted,
        [rumqttc::SubscribeReasonCode::Success(QoS::ExactlyOnce)]
    );
    let (publisher, mut pub_events) = client(&server, "q2-rumqttc-pub");
    publisher
        .publish("exact/1", QoS::ExactlyOnce, false, "one")
        .await?;
    let publisher_task = tokio::spawn(async move {
        poll_until(&mut pub_events, |e| {
            matches!(e, Event::Incoming(Packet::PubComp(_))).then_some(())
        })
        .await
    });
    let mut seen = Vec::new();
    poll_until(&mut sub_events, |e| {
        match e {
            Event::Incoming(Packet::Publish(p)) => {
                assert_eq!(p.qos, QoS::ExactlyOnce);
                assert_eq!(&p.payload[..], b"one");
                seen.push("PUBLISH");
            }
            Event::Outgoing(rumqttc::Outgoing::PubRec(_)) => seen.push("PUBREC"),
            Event::Incoming(Packet::PubRel(_)) => seen.push("PUBREL"),
            Event::Outgoing(rumqttc::Outgoing::PubComp(_)) => seen.push("PUBCOMP"),
            _ => {}
        }
        (seen.last() == Some(&"PUBCOMP")).then_some(())
    })
    .await?;
    assert_eq!(seen, ["PUBLISH", "PUBREC", "PUBREL", "PUBCOMP"]);
    publisher_task.await??;
    server.stop().await
}

#[tokio::test]
async fn will_published_when_the_peer_closes_or_breaks_the_protocol() -> Result<()> {
    let mut server = Server::start().await?;
    let mut sub = Raw::session(server.addr, "watcher", 30).await?;
    sub.send(&subscribe(1, &[("wills/#", 1)])).await?;
    sub.expect(&[0x90, 3, 0, 1, 1]).await?;

    let mut dev = Raw::connect(server.addr).await?;
    dev.send(&connect_with_will(
        b"MQTT",
        4,
        "dev-a",
        30,
        (b"wills/a", b"lost", 1, false),
    ))
    .await?;
    dev.expect(&[0x20, 2, 0, 0]).await?;
    drop(dev);
    sub.expect(&publish("wills/a", b"lost", 1, 1, false))
        .await?;
    sub.send(&ack(PUBACK, 1)).await?;

    let mut dev = Raw::connect(server.addr).await?;
    dev.send(&connect_with_will(
        b"MQIsdp",
        3,
        "dev-b",
        30,
        (b"wills/b", b"broken", 0, false),
    ))
    .await?;
    dev.expect(&[0x20, 2, 0, 0]).await?;
    dev.send(&publish("a/#", b"x", 0, 0, false)).await?;
    dev.expect_closed().await?;
    sub.expect(&publish("wills/b", b"broken", 0, 0, false))
        .await?;

    // Subscribers are fed before the commit: look at the log once every
    // connection has ended (each awaits its will's commit).
    server.shutdown.cancel();
    tokio::time::timeout(PATIENCE, &mut server.task).await??;
    let records = server.records().await?;
    assert_eq!(
        records.len(),
        1,
        "the QoS 1 will is logged, the QoS 0 one is not"
    );
    assert_eq!(&*records[0].topic, "wills/a");
    assert_eq!(&**records[0].publisher(), "dev-a");
    assert_eq!(records[0].qos as u8, 1);
    Ok(())
}

#[tokio::test]
async fn will_discarded_on_disconnect() -> Result<()> {
    let server = Server::start().await?;
    let mut sub = Raw::session(server.addr, "watcher", 30).await?;
    sub.send(&subscribe(1, &[("wills/#", 0)])).await?;
    sub.expect(&[0x90, 3, 0, 1, 0]).await?;
    let mut dev = Raw::connect(server.addr).await?;
    dev.send(&connect_with_will(
        b"MQTT",
        4,
        "polite",
        30,
        (b"wills/p", b"gone", 0, false),
    ))
    .await?;
    dev.expect(&[0x20, 2, 0, 0]).await?;
    dev.send(&DISCONNECT).await?;
    // The gateway closes the socket after handing any will to the router.
    dev.expect_closed().await?;
    let mut other = Raw::session(server.addr, "sentinel", 30).await?;
    other
        .send(&publish("wills/sentinel", b"s", 0, 0, false))
        .await?;
    sub.expect(&publish("wills/sentinel", b"s", 0, 0, false))
        .await?;
    server.stop().await
}

#[tokio::test]
async fn will_published_at_shutdown() -> Result<()> {
    let mut server = Server::start().await?;
    let mut dev = Raw::connect(server.addr).await?;
    dev.send(&connect_with_will(
        b"MQTT",
        4,
        "stayer",
        30,
        (b"wills/s", b"gateway down", 1, true),
    ))
    .await?;
    dev.expect(&[0x20, 2, 0, 0]).await?;
    server.shutdown.cancel();
    dev.expect_closed().await?;
    tokio::time::timeout(PATIENCE, &mut server.task).await??;
    let records = server.records().await?;
    assert_eq!(records.len(), 1);
    assert_eq!(&*records[0].topic, "wills/s");
    assert_eq!(&records[0].payload[..], b"gateway down");
    assert!(records[0].retain, "the retain flag travels with the will");
    Ok(())
}

#[tokio::test]
async fn will_published_on_take_over() -> Result<()> {
    let server = Server::start().await?;
    let mut sub = Raw::session(server.addr, "watcher", 30).await?;
    sub.send(&subscribe(1, &[("wills/#", 0)])).await?;
    sub.expect(&[0x90, 3, 0, 1, 0]).await?;
    let mut old = Raw::connect(server.addr).await?;
    old.send(&connect_with_will(
        b"MQTT",
        4,
        "twin",
        30,
        (b"wills/t", b"replaced", 0, false),
    ))
    .await?;
    old.expect(&[0x20, 2, 0, 0]).await?;
    let mut new = Raw::session(server.addr, "twin", 30).await?;
    old.expect_closed().await?;
    sub.expect(&publish("wills/t", b"replaced", 0, 0, false))
        .await?;
    new.send(&PINGREQ).await?;
    new.expect(&PINGRESP).await?;
    server.stop().await
}

#[tokio::test]
async fn invalid_will_topic_closes_without_connack() -> Result<()> {
    let server = Server::start().await?;
    for topic in [&b"wills/+"[..], b"", b"\xc3\x28"] {
        let mut dev = Raw::connect(server.addr).await?;
        dev.send(&connect_with_will(
            b"MQTT",
            4,
            "bad-will",
            30,
            (topic, b"x", 0, false),
        ))
        .await?;
        dev.expect_closed().await?;
    }
    // Others are served.
    let mut raw = Raw::session(server.addr, "fine", 30).await?;
    raw.send(&PINGREQ).await?;
    raw.expect(&PINGRESP).await?;
    server.stop().await
}

#[tokio::test]
async fn a_will_the_store_refuses_costs_nothing_else() -> Result<()> {
    let mut server = Server::with(Options {
        max_bytes: 4096,
        ..Options::default()
    })
    .await?;
    let mut small = Raw::connect(server.addr).await?;
    small
        .send(&connect_with_will(
            b"MQTT",
            4,
            "light",
            30,
            (b"wills/l", b"ok", 1, false),
        ))
        .await?;
    small.expect(&[0x20, 2, 0, 0]).await?;
    small.send(&[0xF0, 0x00]).await?;
    small.expect_closed().await?;
    // Over the quota on its own: refused, counted, summarised.
    let mut heavy = Raw::connect(server.addr).await?;
    let big = vec![b'w'; 8000];
    heavy
        .send(&connect_with_will(
            b"MQTT",
            4,
            "heavy",
            30,
            (b"wills/h", &big, 1, false),
        ))
        .await?;
    heavy.expect(&[0x20, 2, 0, 0]).await?;
    heavy.send(&[0xF0, 0x00]).await?;
    heavy.expect_closed().await?;
    let mut bystander = Raw::session(server.addr, "bystander", 30).await?;
    bystander.send(&PINGREQ).await?;
    bystander.expect(&PINGRESP).await?;
    // Once every connection has ended (each awaited its will's commit),
    // the log holds the small will only.
    server.shutdown.cancel();
    tokio::time::timeout(PATIENCE, &mut server.task).await??;
    let topics: Vec<String> = server
        .records()
        .await?
        .into_iter()
        .map(|r| r.topic.to_string())
        .collect();
    assert_eq!(topics, ["wills/l"]);
    Ok(())
}

/// MQTT-4.4.0-1: a persistent session's unacknowledged deliveries are sent
/// again on reconnect with DUP set and their original packet ids, in order.
#[tokio::test]
async fn a_resumed_session_resends_with_the_original_packet_ids() -> Result<()> {
    let server = Server::start().await?;
    let mut sub = Raw::connect(server.addr).await?;
    sub.send(&connect(b"MQTT", 4, "resumer", 30, false)).await?;
    sub.expect(&[0x20, 2, 0, 0]).await?;
    sub.send(&subscribe(1, &[("resume/#", 1)])).await?;
    sub.expect(&[0x90, 3, 0, 1, 1]).await?;
    let mut publisher = Raw::session(server.addr, "resume-pub", 30).await?;
    for pkid in 1..=3u16 {
        publisher
            .send(&publish("resume/x", &[pkid as u8], 1, pkid, false))
            .await?;
        publisher.expect(&ack(PUBACK, pkid)).await?;
    }
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(sub.packet().await?);
    }
    // The first is acknowledged; the other two are not when the link drops.
    let pkid_of = |p: &[u8]| u16::from_be_bytes([p[12], p[13]]);
    assert_eq!(first[0][0], 0x32, "QoS 1 PUBLISH: {:02x?}", first[0]);
    sub.send(&ack(PUBACK, pkid_of(&first[0]))).await?;
    sub.send(&PINGREQ).await?;
    sub.expect(&PINGRESP).await?;
    drop(sub);

    let mut sub = Raw::connect(server.addr).await?;
    sub.send(&connect(b"MQTT", 4, "resumer", 30, false)).await?;
    sub.expect(&[0x20, 2, 1, 0]).await?;
    for original in &first[1..] {
        let mut dup = original.clone();
        dup[0] |= 0x08;
        assert_eq!(sub.packet().await?, dup, "same packet id, DUP set");
        sub.send(&ack(PUBACK, pkid_of(original))).await?;
    }
    sub.send(&PINGREQ).await?;
    sub.expect(&PINGRESP).await?;
    server.stop().await
}
