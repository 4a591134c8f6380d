//! MQTT over WebSocket (`mqtt.ws_listen`): a browser-style client
//! (tokio-tungstenite) speaking raw MQTT 3.1.1 bytes in binary frames, with
//! packets split across frames and several packets in one frame; paho-mqtt
//! over websockets; the same router, sessions and limits as TCP; refused
//! upgrades (wrong path, no `mqtt` subprotocol, plain HTTP, silence) that
//! leave the listener serving.
//!
//! (rumqttc's `websocket` feature brings a second tungstenite and a TLS
//! stack into the build; paho is the independent real client here.)

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use edge_tests::{MqttSubscriber, TestGateway, unique};
use futures::{SinkExt, StreamExt};
use rumqttc::{AsyncClient, Event, Incoming, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::SHORT;

/// A gateway serving MQTT over WebSocket on an ephemeral port.
async fn gateway() -> Result<TestGateway> {
    ws_gateway(&[]).await
}

async fn ws_gateway(settings: &[(&str, &str)]) -> Result<TestGateway> {
    let mut builder = TestGateway::builder().set("mqtt.ws_listen", "\"127.0.0.1:0\"");
    for (key, value) in settings {
        builder = builder.set(key, value);
    }
    builder.start().await
}

fn ws_addr(gw: &TestGateway) -> Result<SocketAddr> {
    gw.ws_addr()
        .context("the gateway has no WebSocket listener")
}

/// An MQTT packet: fixed header byte, remaining length, body.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let digit = (len % 128) as u8;
        len /= 128;
        out.push(if len > 0 { digit | 0x80 } else { digit });
        if len == 0 {
            return {
                out.extend_from_slice(body);
                out
            };
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// MQTT 3.1.1 CONNECT, keep-alive 30 s.
fn connect_packet(client_id: &str, clean: bool) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, "MQTT");
    body.push(4);
    body.push(if clean { 0x02 } else { 0x00 });
    body.extend_from_slice(&30u16.to_be_bytes());
    put_str(&mut body, client_id);
    packet(0x10, &body)
}

fn subscribe_packet(pkid: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    put_str(&mut body, filter);
    body.push(qos);
    packet(0x82, &body)
}

fn publish_qos1(pkid: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, topic);
    body.extend_from_slice(&pkid.to_be_bytes());
    body.extend_from_slice(payload);
    packet(0x32, &body)
}

/// A decoded packet from the gateway: first byte and body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Packet {
    first: u8,
    body: Vec<u8>,
}

impl Packet {
    fn kind(&self) -> u8 {
        self.first >> 4
    }

    /// A PUBLISH's topic and payload (QoS 1 or 2: after the packet id).
    fn publish(&self) -> Result<(String, Vec<u8>)> {
        if self.kind() != 3 {
            bail!("not a PUBLISH: {self:?}");
        }
        let len = usize::from(u16::from_be_bytes([self.body[0], self.body[1]]));
        let topic = String::from_utf8(self.body[2..2 + len].to_vec())?;
        let skip = if self.first & 0x06 != 0 { 2 } else { 0 };
        Ok((topic, self.body[2 + len + skip..].to_vec()))
    }

    fn publish_pkid(&self) -> [u8; 2] {
        let len = usize::from(u16::from_be_bytes([self.body[0], self.body[1]]));
        [self.body[2 + len], self.body[3 + len]]
    }
}

/// A browser-style MQTT client: a WebSocket with the `mqtt` subprotocol,
/// MQTT bytes in binary frames, and whatever framing the test wants.
struct WsClient {
    ws: WebSocketStream<TcpStream>,
    /// Bytes received but not yet decoded into packets.
    pending: Vec<u8>,
}

impl WsClient {
    async fn open(addr: SocketAddr, path: &str) -> Result<WsClient> {
        let ws = upgrade(addr, path, Some("mqtt")).await?;
        Ok(WsClient {
            ws,
            pending: Vec::new(),
        })
    }

    /// Sends one binary frame.
    async fn frame(&mut self, bytes: &[u8]) -> Result<()> {
        self.ws
            .send(Message::Binary(Bytes::copy_from_slice(bytes)))
            .await?;
        Ok(())
    }

    /// The next MQTT packet, however the gateway framed it.
    async fn packet(&mut self) -> Result<Packet> {
        let next = async {
            loop {
                if let Some(packet) = self.take_packet() {
                    return Ok(packet);
                }
                match self.ws.next().await {
                    Some(Ok(Message::Binary(data))) => self.pending.extend_from_slice(&data),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(other)) => bail!("unexpected WebSocket message {other:?}"),
                    Some(Err(e)) => bail!("WebSocket failed: {e}"),
                    None => bail!("WebSocket ended"),
                }
            }
        };
        tokio::time::timeout(SHORT, next)
            .await
            .context("no MQTT packet within SHORT")?
    }

    fn take_packet(&mut self) -> Option<Packet> {
        let mut len = 0usize;
        let mut shift = 0;
        let mut at = 1;
        loop {
            let byte = *self.pending.get(at)?;
            len |= usize::from(byte & 0x7f) << shift;
            shift += 7;
            at += 1;
            if byte & 0x80 == 0 {
                break;
            }
        }
        if self.pending.len() < at + len {
            return None;
        }
        let first = self.pending[0];
        let body = self.pending[at..at + len].to_vec();
        self.pending.drain(..at + len);
        Some(Packet { first, body })
    }

    /// CONNECT in one frame; returns the CONNACK's session-present flag.
    async fn connect(&mut self, client_id: &str, clean: bool) -> Result<bool> {
        self.frame(&connect_packet(client_id, clean)).await?;
        let connack = self.packet().await?;
        if connack.first != 0x20 || connack.body.len() != 2 || connack.body[1] != 0 {
            bail!("expected a successful CONNACK, got {connack:?}");
        }
        Ok(connack.body[0] & 1 == 1)
    }

    async fn subscribe(&mut self, pkid: u16, filter: &str) -> Result<()> {
        self.frame(&subscribe_packet(pkid, filter, 1)).await?;
        let suback = self.packet().await?;
        let mut want = pkid.to_be_bytes().to_vec();
        want.push(1);
        assert_eq!(
            suback,
            Packet {
                first: 0x90,
                body: want
            },
            "SUBACK"
        );
        Ok(())
    }

    /// Waits for the gateway to close the WebSocket (after DISCONNECT).
    async fn closed(mut self) -> Result<()> {
        let end = async {
            while let Some(message) = self.ws.next().await {
                match message {
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(SHORT, end)
            .await
            .context("the gateway did not close the WebSocket")
    }
}

/// The HTTP upgrade to `path`, offering `subprotocol`; checks the answer
/// names `mqtt` when the upgrade succeeds.
async fn upgrade(
    addr: SocketAddr,
    path: &str,
    subprotocol: Option<&str>,
) -> Result<WebSocketStream<TcpStream>> {
    let mut request = format!("ws://{addr}{path}").into_client_request()?;
    if let Some(p) = subprotocol {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse()?);
    }
    let stream = TcpStream::connect(addr).await?;
    let (ws, response) =
        tokio::time::timeout(SHORT, tokio_tungstenite::client_async(request, stream))
            .await
            .context("no upgrade answer")??;
    let answered = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok());
    assert_eq!(answered, Some("mqtt"), "the gateway names the subprotocol");
    Ok(ws)
}

/// The HTTP status of a refused upgrade.
async fn refused_status(addr: SocketAddr, path: &str, subprotocol: Option<&str>) -> Result<u16> {
    match upgrade(addr, path, subprotocol).await {
        Ok(_) => bail!("upgrade to {path} with {subprotocol:?} was accepted"),
        Err(e) => match e.downcast_ref::<WsError>() {
            Some(WsError::Http(response)) => Ok(response.status().as_u16()),
            _ => bail!("expected an HTTP refusal, got {e:#}"),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_mqtt_in_binary_frames_whatever_the_framing() -> Result<()> {
    let gw = gateway().await?;
    let addr = ws_addr(&gw)?;
    let id = unique("wsraw");
    let topic = format!("{id}/t");
    let mut client = WsClient::open(addr, "/mqtt").await?;
    assert!(!client.connect(&id, true).await?, "no session present");
    client.subscribe(1, &topic).await?;

    let seq_before = gw.store().stats().next_seq;
    // One PUBLISH split across two frames.
    let publish = publish_qos1(7, &topic, b"split");
    let (head, tail) = publish.split_at(5);
    client.frame(head).await?;
    client.frame(tail).await?;
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(client.packet().await?);
    }
    let puback = Packet {
        first: 0x40,
        body: vec![0, 7],
    };
    assert!(got.contains(&puback), "PUBACK for id 7: {got:?}");
    let delivery = got
        .iter()
        .find(|p| p.kind() == 3)
        .context("the subscription's delivery")?;
    assert_eq!(delivery.publish()?, (topic.clone(), b"split".to_vec()));
    client
        .frame(&packet(0x40, &delivery.publish_pkid()))
        .await?;

    // Two packets (PUBLISH and PINGREQ) in one frame.
    let mut both = publish_qos1(8, &topic, b"together");
    both.extend_from_slice(&packet(0xc0, &[]));
    client.frame(&both).await?;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(client.packet().await?);
    }
    assert!(
        got.contains(&Packet {
            first: 0x40,
            body: vec![0, 8]
        }),
        "{got:?}"
    );
    assert!(
        got.contains(&Packet {
            first: 0xd0,
            body: vec![]
        }),
        "PINGRESP: {got:?}"
    );
    let delivery = got
        .iter()
        .find(|p| p.kind() == 3)
        .context("the second delivery")?;
    assert_eq!(delivery.publish()?, (topic.clone(), b"together".to_vec()));
    // The PUBACKs came after the commits: both messages went through the log.
    assert!(
        gw.store().stats().next_seq >= seq_before + 2,
        "both publishes appended"
    );

    // A packet larger than every buffer on the way (tungstenite's, the
    // bridge's pipe): one frame in, many frames out.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    client.frame(&publish_qos1(9, &topic, &big)).await?;
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(client.packet().await?);
    }
    assert!(
        got.contains(&Packet {
            first: 0x40,
            body: vec![0, 9]
        }),
        "PUBACK 9"
    );
    let delivery = got
        .iter()
        .find(|p| p.kind() == 3)
        .context("the large delivery")?;
    assert_eq!(delivery.publish()?, (topic.clone(), big));

    client.frame(&packet(0xe0, &[])).await?;
    client.closed().await?;
    gw.shutdown().await?;
    Ok(())
}

/// A WebSocket client and a TCP client share the router both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_tcp_clients_reach_each_other() -> Result<()> {
    let gw = gateway().await?;
    let id = unique("wsmix");
    let filter = format!("{id}/#");
    let mut tcp = MqttSubscriber::connect(gw.mqtt_addr(), &format!("{id}-tcp"), &[&filter]).await?;
    let mut ws = WsClient::open(ws_addr(&gw)?, "/mqtt").await?;
    ws.connect(&format!("{id}-ws"), true).await?;
    ws.subscribe(1, &format!("{id}/from-tcp")).await?;

    ws.frame(&publish_qos1(1, &format!("{id}/from-ws"), b"hello tcp"))
        .await?;
    let puback = ws.packet().await?;
    assert_eq!(
        puback,
        Packet {
            first: 0x40,
            body: vec![0, 1]
        }
    );
    let p = tcp.recv(SHORT).await?;
    assert_eq!(p.topic, format!("{id}/from-ws"));
    assert_eq!(&p.payload[..], b"hello tcp");

    edge_tests::mqtt::publish_one(gw.mqtt_addr(), &format!("{id}/from-tcp"), b"hello ws").await?;
    let delivery = ws.packet().await?;
    assert_eq!(
        delivery.publish()?,
        (format!("{id}/from-tcp"), b"hello ws".to_vec())
    );
    gw.shutdown().await?;
    Ok(())
}

/// A persistent session created over WebSocket is resumed over TCP with
/// what was queued for it meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_created_over_websocket_resumes_over_tcp() -> Result<()> {
    let gw = gateway().await?;
    let id = unique("wssess");
    let topic = format!("{id}/q");
    let mut ws = WsClient::open(ws_addr(&gw)?, "/mqtt").await?;
    assert!(!ws.connect(&id, false).await?, "a new session");
    ws.subscribe(1, &topic).await?;
    ws.frame(&packet(0xe0, &[])).await?;
    ws.closed().await?;

    edge_tests::mqtt::publish_one(gw.mqtt_addr(), &topic, b"while away").await?;

    let mut options = edge_tests::mqtt::options(gw.mqtt_addr(), &id);
    options.set_clean_session(false);
    let (_client, mut eventloop) = AsyncClient::new(options, 16);
    let resumed = async {
        let mut present = None;
        loop {
            match eventloop.poll().await? {
                Event::Incoming(Incoming::ConnAck(ack)) => present = Some(ack.session_present),
                Event::Incoming(Incoming::Publish(p)) => {
                    return Ok::<_, anyhow::Error>((present, p));
                }
                _ => {}
            }
        }
    };
    let (present, p) = tokio::time::timeout(SHORT, resumed)
        .await
        .context("no queued message over TCP")??;
    assert_eq!(present, Some(true), "the WebSocket's session is present");
    assert_eq!(p.topic, topic);
    assert_eq!(&p.payload[..], b"while away");
    assert_eq!(p.qos, QoS::AtLeastOnce);
    gw.shutdown().await?;
    Ok(())
}

/// Wrong path, no or another subprotocol, plain HTTP and a silent socket
/// are refused; the listener goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_upgrades_are_refused_and_the_listener_keeps_serving() -> Result<()> {
    let gw = ws_gateway(&[
        ("mqtt.ws_path", "\"/ws\""),
        ("mqtt.connect_timeout", "\"500ms\""),
    ])
    .await?;
    let addr = ws_addr(&gw)?;
    assert_eq!(refused_status(addr, "/mqtt", Some("mqtt")).await?, 404);
    assert_eq!(refused_status(addr, "/ws", None).await?, 400);
    assert_eq!(refused_status(addr, "/ws", Some("wamp")).await?, 400);

    let mut plain = TcpStream::connect(addr).await?;
    plain
        .write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    tokio::time::timeout(SHORT, plain.read_to_end(&mut answer))
        .await
        .context("no answer to a plain GET")??;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // A socket that never upgrades is closed after connect_timeout.
    let mut silent = TcpStream::connect(addr).await?;
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(SHORT, silent.read(&mut byte))
        .await
        .context("a silent socket was kept open")?;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // Upgraded but no CONNECT: closed within what is left of connect_timeout.
    WsClient::open(addr, "/ws").await?.closed().await?;

    // A text frame is not MQTT (MQTT-6.0.0-1): the connection is closed.
    let mut texting = WsClient::open(addr, "/ws").await?;
    texting.ws.send(Message::text("CONNECT")).await?;
    texting.closed().await?;

    let id = unique("wsok");
    let mut client = WsClient::open(addr, "/ws").await?;
    client.connect(&id, true).await?;
    client.subscribe(1, &format!("{id}/t")).await?;

    let (status, health) =
        edge_tests::http::get(gw.metrics_addr().context("metrics")?, "/healthz").await?;
    assert_eq!(status, 200);
    assert!(
        health.contains(&format!("mqtt websocket {addr}: path /ws\n")),
        "{health}"
    );
    let metrics = gw.metrics().await?;
    for reason in [
        "wrong_path",
        "no_subprotocol",
        "not_websocket",
        "upgrade_timeout",
    ] {
        let line = format!("edge_mqtt_ws_refused_total{{reason=\"{reason}\"}}");
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(&line) && !l.ends_with(" 0")),
            "{line} counted:\n{metrics}"
        );
    }
    assert!(metrics.contains("edge_mqtt_ws_closed_total{reason=\"text_frame\"}"));
    gw.shutdown().await?;
    Ok(())
}

/// WebSocket clients count toward `mqtt.max_connections` with TCP ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_clients_share_max_connections_with_tcp() -> Result<()> {
    let gw = ws_gateway(&[("mqtt.max_connections", "1")]).await?;
    let id = unique("wslimit");
    let _tcp = MqttSubscriber::connect(gw.mqtt_addr(), &format!("{id}-tcp"), &[&format!("{id}/t")])
        .await?;
    let mut ws = WsClient::open(ws_addr(&gw)?, "/mqtt").await?;
    ws.frame(&connect_packet(&format!("{id}-ws"), true)).await?;
    let connack = ws.packet().await?;
    // 3: server unavailable.
    assert_eq!(
        connack,
        Packet {
            first: 0x20,
            body: vec![0, 3]
        }
    );
    gw.shutdown().await?;
    Ok(())
}

const PAHO: &str = r#"
import sys, time
import paho.mqtt.client as mqtt

port, tcp_port, path, topic = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
got, state = [], {}

def on_connect(c, u, flags, rc):
    state["rc"] = rc
    c.subscribe(topic + "/#", qos=1)

def on_subscribe(c, u, mid, granted):
    state["granted"] = granted

def on_publish(c, u, mid):
    state["acked"] = mid

def on_message(c, u, m):
    got.append("%d %s %s" % (m.qos, m.topic, m.payload.decode()))

ws = mqtt.Client(client_id=topic + "-paho-ws", transport="websockets")
ws.ws_set_options(path=path)
ws.on_connect, ws.on_subscribe, ws.on_message, ws.on_publish = on_connect, on_subscribe, on_message, on_publish
ws.connect("127.0.0.1", port, keepalive=30)
ws.loop_start()
deadline = time.time() + 20
while "granted" not in state and time.time() < deadline:
    time.sleep(0.02)
ws.publish(topic + "/from-paho-ws", "over websocket", qos=1)
tcp = mqtt.Client(client_id=topic + "-paho-tcp")
tcp.connect("127.0.0.1", tcp_port, keepalive=30)
tcp.loop_start()
tcp.publish(topic + "/from-paho-tcp", "over tcp", qos=1).wait_for_publish(20)
while len(got) < 2 and time.time() < deadline:
    time.sleep(0.02)
tcp.disconnect()
tcp.loop_stop()
ws.disconnect()
ws.loop_stop()
print("rc", state.get("rc"), "granted", state.get("granted"), "acked", "acked" in state)
for line in sorted(got):
    print(line)
"#;

/// paho-mqtt over websockets: subscribes, publishes at QoS 1 (PUBACK), and
/// hears a TCP client; a rumqttc TCP subscriber hears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paho_websocket_client_talks_with_tcp_clients() -> Result<()> {
    let gw = gateway().await?;
    let id = unique("wspaho");
    let mut tcp = MqttSubscriber::connect(
        gw.mqtt_addr(),
        &format!("{id}-sub"),
        &[&format!("{id}/from-paho-ws")],
    )
    .await?;
    let ws_port = ws_addr(&gw)?.port().to_string();
    let tcp_port = gw.mqtt_addr().port().to_string();
    let out = crate::run_python(
        "paho-mqtt websockets",
        PAHO,
        &[&ws_port, &tcp_port, "/mqtt", &id],
    )
    .await?;
    assert_eq!(out[0], "rc 0 granted (1,) acked True", "{out:?}");
    assert_eq!(
        out[1..],
        [
            format!("1 {id}/from-paho-tcp over tcp"),
            format!("1 {id}/from-paho-ws over websocket"),
        ],
        "{out:?}"
    );
    let p = tcp.recv(SHORT).await?;
    assert_eq!(p.topic, format!("{id}/from-paho-ws"));
    assert_eq!(&p.payload[..], b"over websocket");
    gw.shutdown().await?;
    Ok(())
}
