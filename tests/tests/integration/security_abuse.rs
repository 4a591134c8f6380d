//! Misbehaving clients against a gateway run as a child process (its own
//! metrics, log and file descriptors): idle sockets, CONNECTs that never
//! complete, password guessing, publishers over their rate, too many
//! connections from one address. In each, a well-behaved client keeps
//! getting its QoS 1 messages acknowledged. Every phase is bounded and
//! stays on loopback (127.0.0.2 stands in for a second host).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edge_tests::auth::{Mqtt5, RawMqtt, add_user, publish_packet};
use edge_tests::http::metric;
use edge_tests::{GatewayProcess, Publisher, TestGateway, unique, wait_for};
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{SHORT, gateway_bin};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Another source address on loopback: another "host" to the guard.
const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A sample of a child gateway's metrics (0 when absent).
async fn sample(gw: &GatewayProcess, name: &str, labels: &[&str]) -> Result<f64> {
    Ok(metric(&gw.metrics().await?, name, labels).unwrap_or(0.0))
}

/// Waits until the sample reaches at least `at_least`; returns it.
async fn reaches(gw: &GatewayProcess, name: &str, labels: &[&str], at_least: f64) -> Result<f64> {
    wait_for(
        &format!("{name}{labels:?} >= {at_least}"),
        SHORT,
        || async {
            sample(gw, name, labels)
                .await
                .ok()
                .filter(|v| *v >= at_least)
        },
    )
    .await
}

/// The well-behaved client: `count` QoS 1 messages, all acknowledged.
async fn good_client(addr: SocketAddr, count: u64) -> Result<Duration> {
    let started = Instant::now();
    let topic = format!("good/{}", unique("t"));
    let report = Publisher::new(addr, &unique("good"))
        .run(count, SHORT, move |i| {
            (topic.clone(), format!("{i}").into_bytes())
        })
        .await;
    if !report.all_acked(count) {
        bail!(
            "good client: {} of {count} acked ({:?})",
            report.acked.len(),
            report.error
        );
    }
    Ok(started.elapsed())
}

/// Whether the gateway closes `stream` (EOF or reset) within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 64];
    loop {
        match tokio::time::timeout(within, stream.read(&mut byte)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_sockets_do_not_keep_a_client_out() -> Result<()> {
    const IDLE: usize = 2000;
    let gw = TestGateway::builder()
        .set("limits.max_connections_per_source", "100000")
        .set("limits.connection_rate_per_source", "1000000")
        .spawn(gateway_bin())
        .await?;
    let addr = gw.mqtt_addr();
    let started = Instant::now();
    let mut idle = Vec::with_capacity(IDLE);
    for chunk in 0..IDLE / 100 {
        let batch = (0..100).map(|_| TcpStream::connect(addr));
        for s in futures::future::join_all(batch).await {
            idle.push(s.with_context(|| format!("idle socket in batch {chunk}"))?);
        }
    }
    let opened = started.elapsed();
    let took = good_client(addr, 500).await?;
    let evicted = reaches(
        &gw,
        "edge_connections_rejected_total",
        &["protocol=\"mqtt\"", "reason=\"max_handshakes_per_source\""],
        (IDLE - 32) as f64,
    )
    .await?;
    // A second wave of idle sockets while a client from another address
    // connects and publishes: it is served meanwhile.
    let wave = async {
        let mut more = Vec::with_capacity(IDLE / 2);
        for _ in 0..IDLE / 200 {
            let batch = (0..100).map(|_| TcpStream::connect(addr));
            for s in futures::future::join_all(batch).await {
                more.push(s?);
            }
        }
        anyhow::Ok(more)
    };
    let other = async {
        let (client, code) = RawMqtt::connect(OTHER, addr, 4, &unique("other"), None).await?;
        if code != Some(0) {
            bail!("client from 127.0.0.2 during the wave: CONNACK {code:?}");
        }
        client.publish_acked(4, "good/other", 500, SHORT).await
    };
    let (more, acked) = tokio::join!(wave, other);
    let more = more?;
    assert_eq!(
        acked?, 500,
        "the client from 127.0.0.2 during the second wave"
    );
    let total = reaches(
        &gw,
        "edge_connections_rejected_total",
        &["protocol=\"mqtt\"", "reason=\"max_handshakes_per_source\""],
        (IDLE + IDLE / 2 - 64) as f64,
    )
    .await?;
    println!(
        "{IDLE} idle sockets opened in {opened:?}; good client: 500 acked in {took:?}; \
         {evicted} handshakes evicted; after a second wave of {} while 127.0.0.2 got 500 acked: {total}",
        more.len()
    );
    drop(idle);
    drop(more);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_that_never_completes_is_closed_after_connect_timeout() -> Result<()> {
    const STALLED: usize = 20;
    let gw = TestGateway::builder()
        .set("mqtt.connect_timeout", "\"1s\"")
        .spawn(gateway_bin())
        .await?;
    let addr = gw.mqtt_addr();
    let before = sample(
        &gw,
        "edge_mqtt_disconnects_total",
        &["reason=\"connect_timeout\""],
    )
    .await?;
    let started = Instant::now();
    let stalled = (0..STALLED).map(|_| async move {
        let mut s = TcpStream::connect(addr).await?;
        // CONNECT announcing 32 bytes, of which 5 ever arrive.
        s.write_all(&[0x10, 0x20, 0x00, 0x04, b'M', b'Q', b'T'])
            .await?;
        let closed = closed_within(&mut s, Duration::from_secs(10)).await;
        anyhow::Ok((closed, started.elapsed()))
    });
    let (stalled, good) = tokio::join!(futures::future::join_all(stalled), good_client(addr, 200));
    let took = good?;
    let mut slowest = Duration::ZERO;
    for r in stalled {
        let (closed, at) = r?;
        assert!(closed, "a stalled CONNECT was not closed within 10s");
        assert!(
            at >= Duration::from_millis(900),
            "closed after {at:?}, before connect_timeout"
        );
        slowest = slowest.max(at);
    }
    assert!(
        slowest < Duration::from_secs(4),
        "closed only after {slowest:?}"
    );
    let after = reaches(
        &gw,
        "edge_mqtt_disconnects_total",
        &["reason=\"connect_timeout\""],
        before + STALLED as f64,
    )
    .await?;
    println!(
        "{STALLED} stalled CONNECTs closed by {slowest:?}; connect_timeout count {after}; good client 200 acked in {took:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_guessing_is_slowed_per_source_and_not_logged_line_by_line() -> Result<()> {
    const TRIES: usize = 50;
    let dir = tempfile::tempdir()?;
    let passwd = dir.path().join("passwd");
    add_user(gateway_bin(), &passwd, "alice", "alice-Pw-7f3a9c").await?;
    let gw = TestGateway::builder()
        .set(
            "auth.password_file",
            &format!("{:?}", passwd.display().to_string()),
        )
        .spawn(gateway_bin())
        .await?;
    let addr = gw.mqtt_addr();

    let started = Instant::now();
    let guesser = async {
        let mut answered = 0;
        let mut cut_off = 0;
        for i in 0..TRIES {
            let guess = format!("guess-{i}");
            let (_, code) =
                RawMqtt::connect(LOCAL, addr, 4, &unique("guess"), Some(("alice", &guess))).await?;
            match code {
                Some(4) => answered += 1,
                None => cut_off += 1,
                Some(other) => bail!("guess {i}: CONNACK {other}"),
            }
        }
        anyhow::Ok((answered, cut_off, started.elapsed()))
    };
    let honest = async {
        let (client, code) = RawMqtt::connect(
            OTHER,
            addr,
            4,
            &unique("honest"),
            Some(("alice", "alice-Pw-7f3a9c")),
        )
        .await?;
        if code != Some(0) {
            bail!("alice from 127.0.0.2: CONNACK {code:?}");
        }
        client.publish_acked(4, "good/alice", 200, SHORT).await
    };
    let (guessed, acked) = tokio::join!(guesser, honest);
    let (answered, cut_off, took) = guessed?;
    assert_eq!(acked?, 200, "the honest client's messages");
    assert!(
        cut_off >= TRIES - 10,
        "only {cut_off} of {TRIES} guesses were cut off at accept"
    );
    let backoff = reaches(
        &gw,
        "edge_connections_rejected_total",
        &["protocol=\"mqtt\"", "reason=\"login_backoff\""],
        cut_off as f64,
    )
    .await?;
    let bad = sample(
        &gw,
        "edge_logins_total",
        &["protocol=\"mqtt\"", "outcome=\"bad_credentials\""],
    )
    .await?;
    assert_eq!(bad, answered as f64);
    let log = std::fs::read_to_string(gw.log_path())?;
    let lines = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    let login_lines = lines("logins refused");
    let refused_lines = lines("connections refused");
    assert!(login_lines >= 1, "no line about refused logins:\n{log}");
    assert!(
        login_lines + refused_lines <= 6,
        "{login_lines} + {refused_lines} lines for {TRIES} guesses:\n{log}"
    );
    assert!(!log.contains("guess-"), "a guessed password is in the log");
    println!(
        "{TRIES} guesses in {took:?}: {answered} answered (CONNACK 4), {cut_off} cut off; \
         login_backoff count {backoff}; log lines: {login_lines} login + {refused_lines} refused"
    );
    Ok(())
}

/// An MQTT 5 client that publishes at QoS 0 as fast as the socket takes
/// it; how long until the gateway's DISCONNECT, and its reason code
/// (`None`: closed without one).
async fn flood(addr: SocketAddr) -> Result<(Duration, Option<u8>)> {
    let (client, code) = RawMqtt::connect(LOCAL, addr, 5, &unique("flood"), None).await?;
    if code != Some(0) {
        bail!("flood client: CONNACK {code:?}");
    }
    let RawMqtt {
        mut writer,
        mut reader,
    } = client;
    let started = Instant::now();
    let packet = publish_packet(5, "flood/t", b"0123456789", None);
    let burst: Vec<u8> = packet.repeat(64);
    let writing = tokio::spawn(async move { while writer.write_all(&burst).await.is_ok() {} });
    let ended = loop {
        match reader.next(Duration::from_secs(20)).await? {
            None => break None,
            Some((0xE0, body)) => break Some(body.first().copied().unwrap_or(0)),
            Some(_) => {}
        }
    };
    writing.abort();
    Ok((started.elapsed(), ended))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_over_their_rate_are_held_then_disconnected() -> Result<()> {
    let gw = TestGateway::builder()
        .set("limits.publish_rate", "20")
        .set("limits.rate_grace", "\"2s\"")
        .spawn(gateway_bin())
        .await?;
    let addr = gw.mqtt_addr();
    let ok = |r: PubAckReason| {
        matches!(
            r,
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
        )
    };

    // 10 msg/s for 6 s: under the rate, never waits.
    let steady = async {
        let mut c = Mqtt5::connect(addr, &unique("steady"), None).await?;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut slowest = Duration::ZERO;
        for i in 0..60 {
            tick.tick().await;
            let t = Instant::now();
            let reason = c.publish1("steady/t", &format!("{i}")).await?;
            if !ok(reason) {
                bail!("steady publish {i}: {reason:?}");
            }
            slowest = slowest.max(t.elapsed());
        }
        anyhow::Ok((slowest, c.still_connected()))
    };
    // Three bursts of 35 (the bucket holds 20): held, never cut off.
    let bursty = async {
        let mut c = Mqtt5::connect(addr, &unique("bursty"), None).await?;
        let mut longest = Duration::ZERO;
        for burst in 0..3 {
            let t = Instant::now();
            for i in 0..35 {
                c.publish0("bursty/t", format!("{burst}-{i}").as_bytes())
                    .await?;
            }
            // A QoS 1 publish behind the burst is acked once the burst is read.
            let reason = c.publish1("bursty/t", "end").await?;
            if !ok(reason) {
                bail!("burst {burst}: {reason:?}");
            }
            longest = longest.max(t.elapsed());
            // Pacing: the bucket refills between bursts.
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
        anyhow::Ok((longest, c.still_connected()))
    };
    let (steady, bursty, flooded) = tokio::join!(steady, bursty, flood(addr));
    let (steady_slowest, steady_up) = steady?;
    let (burst_longest, bursty_up) = bursty?;
    let (cut_after, reason) = flooded?;
    println!(
        "flood disconnected after {cut_after:?} with {reason:?}; steady slowest ack {steady_slowest:?}; \
         longest burst {burst_longest:?}"
    );
    assert_eq!(reason, Some(0x96), "flood ended without DISCONNECT 0x96");
    assert!(
        cut_after >= Duration::from_millis(1500) && cut_after < Duration::from_secs(10),
        "flood cut off after {cut_after:?} (rate_grace 2s)"
    );
    assert!(steady_up, "the steady client was disconnected");
    assert!(
        steady_slowest < Duration::from_millis(500),
        "the steady client waited {steady_slowest:?} for an ack"
    );
    assert!(bursty_up, "the bursty client was disconnected");
    assert!(
        burst_longest >= Duration::from_millis(500),
        "a burst of 36 at 20/s went through in {burst_longest:?}: not held"
    );
    let held = sample(
        &gw,
        "edge_rate_limited_total",
        &["protocol=\"mqtt\"", "outcome=\"held\""],
    )
    .await?;
    let disconnected = sample(
        &gw,
        "edge_rate_limited_total",
        &["protocol=\"mqtt\"", "outcome=\"disconnected\""],
    )
    .await?;
    assert!(held >= 2.0, "held = {held}");
    assert_eq!(disconnected, 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_gets_at_most_its_share_of_amqp_connections() -> Result<()> {
    let gw = TestGateway::builder()
        .set("limits.max_connections_per_source", "5")
        .spawn(gateway_bin())
        .await?;
    let uri = gw.amqp_uri();
    let mut five = Vec::new();
    for _ in 0..5 {
        five.push(edge_tests::amqp::connect(&uri).await?);
    }
    let t = Instant::now();
    let mut sixth = TcpStream::connect(gw.amqp_addr()).await?;
    sixth.write_all(b"AMQP\x00\x00\x09\x01").await.ok();
    assert!(
        closed_within(&mut sixth, Duration::from_secs(2)).await,
        "the 6th AMQP connection from 127.0.0.1 stayed open"
    );
    let closed_after = t.elapsed();
    let refused = reaches(
        &gw,
        "edge_connections_rejected_total",
        &["protocol=\"amqp\"", "reason=\"max_connections_per_source\""],
        1.0,
    )
    .await?;
    assert_eq!(refused, 1.0);
    // From 127.0.0.2 the protocol header is answered with Connection.Start.
    let mut other = edge_tests::auth::tcp_from(OTHER, gw.amqp_addr()).await?;
    other.write_all(b"AMQP\x00\x00\x09\x01").await?;
    let mut frame = [0u8; 7];
    tokio::time::timeout(SHORT, other.read_exact(&mut frame))
        .await
        .context("no answer to 127.0.0.2")??;
    assert_eq!(frame[0], 1, "a method frame (Connection.Start)");
    // The places are per source across protocols: 127.0.0.1 has no room
    // left for MQTT either, 127.0.0.2 has.
    let (_, code) = RawMqtt::connect(LOCAL, gw.mqtt_addr(), 4, &unique("full"), None).await?;
    assert_eq!(code, None, "MQTT from 127.0.0.1 with its 5 places taken");
    let (good, code) = RawMqtt::connect(OTHER, gw.mqtt_addr(), 4, &unique("good"), None).await?;
    assert_eq!(code, Some(0), "MQTT from 127.0.0.2");
    let acked = good.publish_acked(4, "good/other", 200, SHORT).await?;
    assert_eq!(acked, 200);
    println!(
        "6th AMQP connection closed after {closed_after:?}; refused count {refused}; \
         127.0.0.2 answered over AMQP and got 200 MQTT messages acked"
    );
    for c in five {
        c.close(200, "bye".into()).await.ok();
    }
    Ok(())
}

/// An AMQP publisher over `limits.publish_rate` is held back (the gateway
/// stops reading it), never disconnected: every publish is confirmed, the
/// hold is counted, and the connection is still usable afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amqp_publisher_over_its_rate_is_held_back_not_dropped() -> Result<()> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    let gw = TestGateway::builder()
        .set("limits.publish_rate", "20")
        .set("limits.rate_grace", "\"1s\"")
        .spawn(gateway_bin())
        .await?;
    let connection = Connection::connect(&gw.amqp_uri(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let queue = unique("paced");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await?;
    // Three seconds' worth at 20/s, sent at once: well past the 1 s grace
    // that would disconnect an MQTT client.
    const COUNT: usize = 60;
    let mut confirms = Vec::with_capacity(COUNT);
    for i in 0..COUNT {
        confirms.push(
            channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    format!("{i}").as_bytes(),
                    BasicProperties::default(),
                )
                .await?,
        );
    }
    for confirm in confirms {
        let confirmation = tokio::time::timeout(SHORT, confirm)
            .await
            .context("no confirm in time")??;
        assert!(confirmation.is_ack(), "{confirmation:?}");
    }
    let held = reaches(
        &gw,
        "edge_rate_limited_total",
        &["protocol=\"amqp\"", "outcome=\"held\""],
        1.0,
    )
    .await?;
    assert!(connection.status().connected(), "still connected");
    let count = channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?
        .message_count();
    assert_eq!(count as usize, COUNT, "every held publish was taken");
    println!("AMQP publisher at {COUNT} messages against 20/s: held {held} time(s), all confirmed");
    Ok(())
}

/// Regression tests of bugs found here.
mod regressions {
    use super::*;

    /// An MQTT connection keeps its per-source place until it ends, not
    /// only until its CONNACK (it once gave it back there, so
    /// `limits.max_connections_per_source` bounded only handshakes).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_source_gets_at_most_its_share_of_connections() -> Result<()> {
        let gw = TestGateway::builder()
            .set("limits.max_connections_per_source", "5")
            .spawn(gateway_bin())
            .await?;
        let addr = gw.mqtt_addr();
        // The readiness probe's socket must be gone before counting.
        reaches(
            &gw,
            "edge_mqtt_disconnects_total",
            &["reason=\"peer_closed\""],
            1.0,
        )
        .await?;
        let mut five = Vec::new();
        for _ in 0..5 {
            let (c, code) = RawMqtt::connect(LOCAL, addr, 4, &unique("five"), None).await?;
            assert_eq!(code, Some(0));
            five.push(c);
        }
        let t = Instant::now();
        let mut sixth = TcpStream::connect(addr).await?;
        assert!(
            closed_within(&mut sixth, Duration::from_secs(2)).await,
            "the 6th connection from 127.0.0.1 stayed open"
        );
        let closed_after = t.elapsed();
        let refused = reaches(
            &gw,
            "edge_connections_rejected_total",
            &["protocol=\"mqtt\"", "reason=\"max_connections_per_source\""],
            1.0,
        )
        .await?;
        assert_eq!(refused, 1.0);
        let (other, code) = RawMqtt::connect(OTHER, addr, 4, &unique("other"), None).await?;
        assert_eq!(code, Some(0), "a client from 127.0.0.2");
        let acked = other.publish_acked(4, "good/other", 200, SHORT).await?;
        assert_eq!(acked, 200);
        println!(
            "6th connection closed after {closed_after:?}; refused count {refused}; 127.0.0.2: 200 acked"
        );
        drop(five);
        Ok(())
    }
}
