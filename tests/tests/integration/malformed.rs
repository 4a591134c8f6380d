//! Malformed packets close that one connection and cost nothing else.

use std::net::SocketAddr;
use std::time::Duration;

use edge_tests::mqtt::publish_one;
use edge_tests::{MqttSubscriber, TestGateway, unique};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::SHORT;

/// A valid MQTT 3.1.1 CONNECT (clean session, keep-alive 60 s, id "raw1").
const CONNECT: &[u8] = &[
    0x10, 16, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 60, 0x00, 0x04, b'r', b'a',
    b'w', b'1',
];
const CONNACK_ACCEPTED: &[u8] = &[0x20, 0x02, 0x00, 0x00];

/// Reads until the server closes the connection; fails if it stays open.
async fn expect_closed(stream: &mut TcpStream, what: &str) -> anyhow::Result<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(SHORT, stream.read(&mut buf)).await {
            Err(_) => anyhow::bail!("{what}: connection still open after {SHORT:?} (read {got:?})"),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

async fn connected(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(CONNECT).await?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(SHORT, s.read_exact(&mut ack)).await??;
    assert_eq!(ack, CONNACK_ACCEPTED);
    Ok(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_close_only_their_connection() -> anyhow::Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let mut sub = MqttSubscriber::connect(addr, &unique("bystander"), &["mal/#"]).await?;

    // A remaining length longer than four bytes, before CONNECT.
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]).await?;
    expect_closed(&mut s, "bad remaining length").await?;

    // Packet type 0 (reserved) after a good CONNECT.
    let mut s = connected(addr).await?;
    s.write_all(&[0x00, 0x00]).await?;
    expect_closed(&mut s, "reserved packet type").await?;

    // A PUBLISH whose topic name holds a wildcard.
    let mut s = connected(addr).await?;
    s.write_all(&[
        0x32, 9, 0x00, 0x03, b'a', b'/', b'#', 0x00, 0x01, b'h', b'i',
    ])
    .await?;
    expect_closed(&mut s, "wildcard in topic name").await?;

    // A second CONNECT on the same connection (§3.1.0-2).
    let mut s = connected(addr).await?;
    s.write_all(CONNECT).await?;
    expect_closed(&mut s, "second CONNECT").await?;

    // Garbage that is not MQTT at all.
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    expect_closed(&mut s, "HTTP request").await?;

    // Everyone else is fine: the old subscriber gets a new client's message.
    publish_one(addr, "mal/after", b"still here").await?;
    let p = sub.recv(Duration::from_secs(10)).await?;
    assert_eq!(p.topic, "mal/after");
    assert_eq!(&p.payload[..], b"still here");
    drop(sub);
    gw.shutdown().await?;
    Ok(())
}
