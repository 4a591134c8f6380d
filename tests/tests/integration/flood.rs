//! What a hostile or broken site network can do without taking the
//! gateway out of service: a flood of sockets that never send CONNECT, a
//! storm of refused connections, a subscriber that reads nothing.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use edge_tests::http::metric;
use edge_tests::mqtt::publish_one;
use edge_tests::{MqttSubscriber, Publisher, TestGateway, unique, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::SHORT;

/// An MQTT 3.1.1 CONNECT, clean session, keep-alive 60 s.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 60];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

/// A SUBSCRIBE (packet id 1) to one filter at QoS 0.
fn subscribe_packet(filter: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x01];
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(0);
    let mut packet = vec![0x82, body.len() as u8];
    packet.extend(body);
    packet
}

/// Keeps `sockets` idle connections (never a byte sent) from `sources` open
/// to `addr` until `until`, opening a new one as soon as the gateway closes
/// one. Returns how many were opened in all.
async fn idle_flood(
    addr: SocketAddr,
    sources: Vec<Ipv4Addr>,
    sockets: usize,
    until: Instant,
) -> u64 {
    let opened = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..sockets {
        let source = sources[i % sources.len()];
        let opened = Arc::clone(&opened);
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let Ok(socket) = TcpSocket::new_v4() else {
                    return;
                };
                if socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).is_err() {
                    return;
                }
                let Ok(Ok(mut stream)) = tokio::time::timeout_at(until, socket.connect(addr)).await
                else {
                    continue;
                };
                opened.fetch_add(1, Ordering::Relaxed);
                let mut buf = [0u8; 16];
                // Until the gateway closes it, or the flood ends.
                let _ = tokio::time::timeout_at(until, stream.read(&mut buf)).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    opened.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_sockets_cannot_keep_a_real_client_out() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    // An established client from before the flood is never touched.
    let topic = unique("flood/t").replace('-', "/");
    let mut established = MqttSubscriber::connect(addr, &unique("established"), &[&topic]).await?;

    let until = Instant::now() + Duration::from_secs(4);
    let sources: Vec<Ipv4Addr> = (2..=5).map(|n| Ipv4Addr::new(127, 0, 0, n)).collect();
    let flood = tokio::spawn(idle_flood(addr, sources.clone(), 1_000, until));
    // Let the flood reach its size before the real client comes.
    wait_for("the flood to fill the handshake budget", SHORT, || async {
        let text = gw.metrics().await.ok()?;
        metric(&text, "edge_mqtt_handshakes", &[]).filter(|v| *v >= 100.0)
    })
    .await?;

    let (mut attempts, mut served) = (0u32, 0u32);
    let mut failures = Vec::new();
    while Instant::now() < until {
        attempts += 1;
        let started = Instant::now();
        match publish_one(addr, &topic, format!("real {attempts}").as_bytes()).await {
            Ok(()) => served += 1,
            Err(e) => failures.push(format!(
                "attempt {attempts} after {:?}: {e:#}",
                started.elapsed()
            )),
        }
    }
    let opened = flood.await?;
    eprintln!(
        "handshake flood: {opened} idle sockets opened from {} addresses in 4 s; a real client was served {served} times of {attempts}",
        sources.len()
    );
    assert!(opened >= 1_000, "the flood never got going: {opened}");
    assert!(attempts >= 3, "too few attempts to judge: {attempts}");
    assert_eq!(
        served, attempts,
        "a real client was kept out by idle sockets: {failures:?}"
    );
    // The established subscriber got every one of them, still connected.
    for _ in 0..served {
        established.recv(SHORT).await?;
    }
    let text = gw.metrics().await?;
    let evicted = metric(
        &text,
        "edge_connections_rejected_total",
        &["reason=\"max_handshakes_per_source\""],
    )
    .unwrap_or(0.0);
    assert!(evicted > 0.0, "the per-source budget never bit");
    gw.shutdown().await?;
    Ok(())
}

/// Counts the lines of `log` from line `from` on.
fn lines_since(log: &str, from: usize) -> Vec<&str> {
    log.lines().skip(from).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_and_drop_storms_write_a_bounded_number_of_log_lines() -> Result<()> {
    let mut gw = TestGateway::builder()
        .set("mqtt.max_connections", "2")
        .set("mqtt.max_queued_messages", "100")
        // Its 5,000 clients come from 127.0.0.1 as fast as they can: this
        // test is about max_connections, not the per-source rate.
        .set("limits.connection_rate_per_source", "1000000")
        .spawn(crate::gateway_bin())
        .await?;
    let addr = gw.mqtt_addr();
    let before = std::fs::read_to_string(gw.log_path())?.lines().count();

    // A subscriber that reads nothing (with a small receive window): its
    // queue overflows.
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut slow = socket.connect(addr).await?;
    slow.write_all(&connect_packet("slow")).await?;
    slow.write_all(&subscribe_packet("storm/#")).await?;
    let mut ack = [0u8; 9]; // CONNACK (4) + SUBACK (5)
    tokio::time::timeout(SHORT, slow.read_exact(&mut ack)).await??;
    // The second and last place is the publisher's.
    const BURST: u64 = 20_000;
    let report = Publisher::new(addr, &unique("burst"))
        .run(BURST, Duration::from_secs(120), |i| {
            (
                "storm/data".to_string(),
                vec![b'x'; 1000 + (i % 7) as usize],
            )
        })
        .await;
    assert!(report.all_acked(BURST), "{report:?}");
    // The publisher has gone: another client takes the second place.
    wait_for("the publisher's connection to end", SHORT, || async {
        let text = gw.metrics().await.ok()?;
        metric(&text, "edge_connections", &["protocol=\"mqtt\""]).filter(|v| *v == 1.0)
    })
    .await?;
    let mut holder = TcpStream::connect(addr).await?;
    holder.write_all(&connect_packet("holder")).await?;
    let mut connack = [0u8; 4];
    tokio::time::timeout(SHORT, holder.read_exact(&mut connack)).await??;
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);

    // 5,000 clients past max_connections: each gets CONNACK 3 and is closed.
    let refused = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let refused = Arc::clone(&refused);
        tasks.push(tokio::spawn(async move {
            for i in 0..625 {
                let Ok(mut s) = TcpStream::connect(addr).await else {
                    continue;
                };
                if s.write_all(&connect_packet(&format!("r{t}-{i}")))
                    .await
                    .is_err()
                {
                    continue;
                }
                let mut connack = [0u8; 4];
                if let Ok(Ok(_)) = tokio::time::timeout(SHORT, s.read_exact(&mut connack)).await
                    && connack == [0x20, 0x02, 0x00, 0x03]
                {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let refused = refused.load(Ordering::Relaxed);
    assert_eq!(refused, 5_000, "every client past the limit gets CONNACK 3");

    let text = gw.metrics().await?;
    let dropped = metric(
        &text,
        "edge_messages_dropped_total",
        &["reason=\"subscriber_queue_full\""],
    )
    .unwrap_or(0.0);
    assert!(
        dropped > 10_000.0,
        "the slow subscriber dropped only {dropped}"
    );
    drop((slow, holder));
    // SIGTERM flushes what is still pending in the summaries.
    gw.terminate(SHORT).await?;
    let log = std::fs::read_to_string(gw.log_path())?;
    let lines = lines_since(&log, before);
    eprintln!(
        "log storm: {dropped} dropped deliveries and {refused} refused connections wrote {} lines:\n{}",
        lines.len(),
        lines.join("\n")
    );
    assert!(lines.len() <= 20, "{} log lines", lines.len());
    assert!(
        lines.iter().any(|l| l.contains("subscriber queues full")),
        "the drops were not reported at all"
    );
    let refusal_counts: u64 = lines
        .iter()
        .filter(|l| l.contains("MQTT connections refused"))
        .filter_map(|l| {
            let rest = l.split("count=").nth(1)?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum();
    assert_eq!(
        refusal_counts, refused,
        "the summaries account for every refusal"
    );
    Ok(())
}
