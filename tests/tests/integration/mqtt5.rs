//! MQTT 5.0 end to end with real clients: rumqttc's v5 client,
//! `mosquitto_pub`/`mosquitto_sub -V mqttv5` (`-D` properties, `-x`
//! session expiry), Python paho-mqtt v5, and raw bytes where no client
//! library misbehaves on purpose. Covered: what CONNACK states and
//! refusals in v5 form; sessions with an expiry (across a kill -9, 0, a
//! short one, changed by DISCONNECT); message expiry (queued, retained,
//! the remaining lifetime); properties MQTT 5 → MQTT 5, → the gateway's
//! AMQP server, → an upstream broker, and AMQP → MQTT 5; topic aliases,
//! receive maximum and maximum packet size both ways; subscription
//! options and identifiers; reason codes; wills (delay, cancel, bounded
//! by the session, 0x04, at shutdown); 3.1.1 and 5 on one listener.
//!
//! Waits are bounded and await events; where the subject is time itself
//! (an expiry, a will delay), the test lets that time pass and then awaits
//! an event that orders what it checks. A check that something does not
//! arrive waits [`QUIET`], which a slow gateway can only pass wrongly.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use edge_tests::mqtt::{MosquittoSub, mosquitto_pub_with};
use edge_tests::{MqttSubscriber, TestGateway, unique};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnectReturnCode, DisconnectReasonCode, Filter, LastWill, LastWillProperties, Packet,
    PubAckReason, PubRecReason, Publish, PublishProperties, RetainForwardRule, SubscribeProperties,
    SubscribeReasonCode, UnsubAckReason,
};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions, StateError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::{SHORT, gateway_bin};

/// Bound for something that must not happen: a delivery the gateway holds
/// back. A slow gateway can only make such a check pass wrongly, never
/// fail wrongly.
const QUIET: Duration = Duration::from_millis(700);

// ---------------------------------------------------------------------
// A rumqttc v5 client fed by a background task.

/// What the event loop reported: an incoming packet, or how it ended.
type Incoming = std::result::Result<Packet, ConnectionError>;

/// A connected rumqttc v5 client; its event loop runs in a task that ends
/// with the first connection error (no reconnect).
struct V5Client {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Incoming>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for V5Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Options for an MQTT 5 client of the gateway at `addr`.
fn opts(addr: SocketAddr, id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o
}

/// Options with a session that outlives the connection by `expiry` s.
fn persistent(addr: SocketAddr, id: &str, expiry: u32) -> MqttOptions {
    let mut o = opts(addr, id);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(expiry));
    o
}

impl V5Client {
    /// Connects and returns the CONNACK; fails on a refusal.
    async fn connect(o: MqttOptions) -> Result<(V5Client, ConnAck)> {
        let (c, ack) = Self::connect_any(o).await?;
        if ack.code != ConnectReturnCode::Success {
            c.task.abort();
            bail!("CONNACK {:?}", ack.code);
        }
        Ok((c, ack))
    }

    /// Connects; the CONNACK whatever it says.
    async fn connect_any(o: MqttOptions) -> Result<(V5Client, ConnAck)> {
        let (client, mut eventloop) = AsyncClient::new(o, 64);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(Ok(p)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
        });
        let ack = match tokio::time::timeout(SHORT, rx.recv()).await {
            Err(_) => bail!("no CONNACK within {SHORT:?}"),
            Ok(None) => bail!("event loop ended before CONNACK"),
            Ok(Some(Ok(Packet::ConnAck(ack)))) => ack,
            Ok(Some(Ok(other))) => bail!("first packet is not CONNACK: {other:?}"),
            Ok(Some(Err(ConnectionError::ConnectionRefused(code)))) => ConnAck {
                session_present: false,
                code,
                properties: None,
            },
            Ok(Some(Err(e))) => bail!("connecting: {e}"),
        };
        Ok((V5Client { client, rx, task }, ack))
    }

    /// The first incoming packet `pick` takes, skipping others; fails on a
    /// connection error or after [`SHORT`].
    async fn expect<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(Packet) -> Option<T>,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + SHORT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => bail!("no {what} within {SHORT:?}"),
                Ok(None) => bail!("event loop ended waiting for {what}"),
                Ok(Some(Err(e))) => bail!("connection ended waiting for {what}: {e}"),
                Ok(Some(Ok(p))) => {
                    if let Some(t) = pick(p) {
                        return Ok(t);
                    }
                }
            }
        }
    }

    /// The next PUBLISH.
    async fn publish(&mut self) -> Result<Publish> {
        self.expect("PUBLISH", |p| match p {
            Packet::Publish(p) => Some(p),
            _ => None,
        })
        .await
    }

    /// A PUBLISH arriving within `wait`, if any (other packets skipped).
    async fn publish_within(&mut self, wait: Duration) -> Result<Option<Publish>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return Ok(None),
                Ok(None) => bail!("event loop ended"),
                Ok(Some(Err(e))) => bail!("connection ended: {e}"),
                Ok(Some(Ok(Packet::Publish(p)))) => return Ok(Some(p)),
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Subscribes (one SUBSCRIBE, optional subscription identifier) and
    /// returns the SUBACK's reason codes.
    async fn subscribe(
        &mut self,
        filters: Vec<Filter>,
        id: Option<usize>,
    ) -> Result<Vec<SubscribeReasonCode>> {
        let props = SubscribeProperties {
            id,
            user_properties: Vec::new(),
        };
        self.client
            .subscribe_many_with_properties(filters, props)
            .await?;
        self.expect("SUBACK", |p| match p {
            Packet::SubAck(a) => Some(a.return_codes),
            _ => None,
        })
        .await
    }

    /// Subscribes to `filter` at QoS 1; fails unless granted.
    async fn subscribe1(&mut self, filter: &str) -> Result<()> {
        let codes = self
            .subscribe(vec![Filter::new(filter, QoS::AtLeastOnce)], None)
            .await?;
        if codes != [SubscribeReasonCode::Success(QoS::AtLeastOnce)] {
            bail!("SUBACK for {filter}: {codes:?}");
        }
        Ok(())
    }

    /// Publishes at QoS 1 and returns the PUBACK's reason.
    async fn publish1(
        &mut self,
        topic: &str,
        payload: &str,
        props: Option<PublishProperties>,
    ) -> Result<PubAckReason> {
        let payload = Bytes::from(payload.to_string());
        match props {
            Some(p) => {
                self.client
                    .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, p)
                    .await?
            }
            None => {
                self.client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await?
            }
        }
        self.expect("PUBACK", |p| match p {
            Packet::PubAck(a) => Some(a.reason),
            _ => None,
        })
        .await
    }

    /// Waits for the gateway to end the connection: the DISCONNECT's
    /// reason code, or `None` when it closed without one.
    async fn closed(&mut self) -> Result<Option<DisconnectReasonCode>> {
        let deadline = tokio::time::Instant::now() + SHORT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => bail!("connection still open after {SHORT:?}"),
                Ok(None) => bail!("event loop ended without an error"),
                Ok(Some(Ok(Packet::Disconnect(d)))) => return Ok(Some(d.reason_code)),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(ConnectionError::MqttState(StateError::ServerDisconnect {
                    reason_code,
                    ..
                })))) => return Ok(Some(reason_code)),
                Ok(Some(Err(_))) => return Ok(None),
            }
        }
    }

    /// A normal DISCONNECT, then the end of the connection.
    async fn disconnect(mut self) -> Result<()> {
        self.client.disconnect().await?;
        let deadline = tokio::time::Instant::now() + SHORT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => bail!("connection still open {SHORT:?} after DISCONNECT"),
                Ok(None | Some(Err(_))) => return Ok(()),
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

fn text(b: &Bytes) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn props() -> PublishProperties {
    PublishProperties::default()
}

fn filter(path: &str, f: impl FnOnce(&mut Filter)) -> Filter {
    let mut filter = Filter::new(path, QoS::AtLeastOnce);
    f(&mut filter);
    filter
}

// ---------------------------------------------------------------------
// Raw MQTT 5 bytes, for what no client library sends on purpose.

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return;
        }
    }
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// A will for [`raw_connect`]: topic, payload, and its raw property block.
struct RawWill<'a> {
    topic: &'a str,
    payload: &'a [u8],
    props: &'a [u8],
}

/// An MQTT 5 CONNECT: clean start, keep-alive 60 s, no properties.
fn raw_connect(id: &str, will: Option<RawWill<'_>>) -> Vec<u8> {
    raw_connect_with(id, true, &[], will)
}

/// An MQTT 5 CONNECT with `clean` start and the raw property block `props`.
fn raw_connect_with(id: &str, clean: bool, props: &[u8], will: Option<RawWill<'_>>) -> Vec<u8> {
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.push(5);
    let mut flags = if clean { 0x02 } else { 0 };
    if will.is_some() {
        flags |= 0x04 | (1 << 3); // will, at QoS 1
    }
    body.push(flags);
    body.extend_from_slice(&60u16.to_be_bytes());
    varint(props.len(), &mut body);
    body.extend_from_slice(props);
    string(id.as_bytes(), &mut body);
    if let Some(w) = will {
        varint(w.props.len(), &mut body);
        body.extend_from_slice(w.props);
        string(w.topic.as_bytes(), &mut body);
        string(w.payload, &mut body);
    }
    packet(0x10, &body)
}

/// A QoS 1 PUBLISH with no properties.
fn raw_publish1(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    string(topic.as_bytes(), &mut body);
    body.extend_from_slice(&pkid.to_be_bytes());
    body.push(0);
    body.extend_from_slice(payload);
    packet(0x32, &body)
}

/// The next whole packet from `s`: its first byte and body.
async fn read_packet(s: &mut TcpStream) -> Result<Option<(u8, Vec<u8>)>> {
    tokio::time::timeout(SHORT, async {
        let mut first = [0u8; 1];
        if s.read(&mut first).await? == 0 {
            return Ok(None);
        }
        let mut len = 0usize;
        for shift in 0..4 {
            let b = s.read_u8().await?;
            len |= usize::from(b & 0x7f) << (7 * shift);
            if b & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await?;
        anyhow::Ok(Some((first[0], body)))
    })
    .await
    .map_err(|_| anyhow!("no packet within {SHORT:?}"))?
}

/// Connects raw and checks the CONNACK is a success.
async fn raw_connected(addr: SocketAddr, connect: &[u8]) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(connect).await?;
    match read_packet(&mut s).await? {
        Some((0x20, body)) if body.get(1) == Some(&0) => Ok(s),
        other => bail!("not a successful CONNACK: {other:?}"),
    }
}

// ---------------------------------------------------------------------
// CONNACK

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_assigns_an_id_and_states_the_limits() -> Result<()> {
    let gw = TestGateway::builder()
        .set("mqtt.max_inflight", "7")
        .set("mqtt.max_packet_size", "\"64KiB\"")
        .start()
        .await?;
    let (c, ack) = V5Client::connect(opts(gw.mqtt_addr(), "")).await?;
    let p = ack
        .properties
        .clone()
        .context("CONNACK without properties")?;
    let assigned = p
        .assigned_client_identifier
        .clone()
        .context("no assigned client identifier for an empty one")?;
    assert!(!assigned.is_empty());
    assert_eq!(p.receive_max, Some(7), "{p:?}");
    assert_eq!(p.max_packet_size, Some(64 * 1024), "{p:?}");
    assert_eq!(p.topic_alias_max, Some(64), "{p:?}");
    // Absent means available (MQTT 5 §3.2.2.3): 0 or 1 both say something.
    assert_ne!(p.retain_available, Some(0), "{p:?}");
    assert_ne!(p.wildcard_subscription_available, Some(0), "{p:?}");
    assert_ne!(p.subscription_identifiers_available, Some(0), "{p:?}");
    assert!(p.max_qos.is_none() || p.max_qos == Some(2), "{p:?}");
    c.disconnect().await?;

    // A second empty id gets another identifier.
    let (c, ack) = V5Client::connect(opts(gw.mqtt_addr(), "")).await?;
    let again = ack.properties.and_then(|p| p.assigned_client_identifier);
    assert!(
        again.is_some() && again.as_deref() != Some(assigned.as_str()),
        "{again:?}"
    );
    c.disconnect().await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_come_in_a_connack_the_client_can_read() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    // Enhanced authentication is not served: 0x8C, bad authentication
    // method, in rumqttc's own reading of the CONNACK.
    let mut o = opts(addr, &unique("auth"));
    o.set_authentication_method(Some("SCRAM-SHA-1".into()));
    let (_c, ack) = V5Client::connect_any(o).await?;
    assert_eq!(ack.code, ConnectReturnCode::BadAuthenticationMethod);

    // A protocol level above 5: CONNACK 0x84 in MQTT 5's form (flags,
    // reason code, property length), then close.
    let mut connect = raw_connect(&unique("lvl6"), None);
    connect[8] = 6; // the protocol level after 0x10, length, "MQTT"
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&connect).await?;
    match read_packet(&mut s).await? {
        Some((0x20, body)) => {
            assert_eq!(body.get(..2), Some(&[0x00, 0x84][..]), "CONNACK {body:?}");
            assert!(body.len() >= 3, "no property length: {body:?}");
        }
        other => bail!("level 6 got {other:?}, not CONNACK 0x84"),
    }
    assert!(
        read_packet(&mut s).await?.is_none(),
        "still open after 0x84"
    );

    // Others connect as before.
    let (c, _) = V5Client::connect(opts(addr, &unique("fine"))).await?;
    c.disconnect().await?;
    gw.shutdown().await?;
    Ok(())
}

/// The CONNACK's shared subscription availability is what SUBSCRIBE does:
/// available (absent or 1) means one message of `$share/g/t` reaches one
/// member; unavailable (0) means the SUBACK refuses with 0x9E.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_availability_is_stated_truthfully() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let t = unique("share");
    let shared = format!("$share/g/{t}/#");
    let (mut a, ack) = V5Client::connect(opts(addr, &unique("sa"))).await?;
    let available = ack.properties.and_then(|p| p.shared_subscription_available) != Some(0);
    let codes = a
        .subscribe(vec![Filter::new(&shared, QoS::AtLeastOnce)], None)
        .await?;
    if !available {
        assert_eq!(
            codes,
            [SubscribeReasonCode::SharedSubscriptionsNotSupported]
        );
        gw.shutdown().await?;
        return Ok(());
    }
    assert_eq!(
        codes,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)],
        "shared subscription refused though CONNACK says available"
    );
    let (mut b, _) = V5Client::connect(opts(addr, &unique("sb"))).await?;
    b.subscribe1(&shared).await?;
    let (mut p, _) = V5Client::connect(opts(addr, &unique("sp"))).await?;
    p.publish1(&format!("{t}/x"), "one", None).await?;
    let got_a = a.publish_within(QUIET).await?;
    let got_b = b.publish_within(QUIET).await?;
    assert_eq!(
        usize::from(got_a.is_some()) + usize::from(got_b.is_some()),
        1,
        "one message of a shared subscription reached {got_a:?} and {got_b:?}"
    );
    gw.shutdown().await?;
    Ok(())
}

// ---------------------------------------------------------------------
// Sessions with an expiry

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_session_with_expiry_survives_kill_9_and_restart() -> Result<()> {
    let mut gw = TestGateway::builder().spawn(gateway_bin()).await?;
    let addr = gw.mqtt_addr();
    let id = unique("v5crash");
    let topic = format!("{id}/q");

    let (mut c, ack) = V5Client::connect(persistent(addr, &id, 300)).await?;
    assert!(!ack.session_present);
    let codes = c
        .subscribe(vec![filter(&topic, |f| f.nolocal = true)], Some(7))
        .await?;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    c.disconnect().await?;
    let typed = [
        "-V",
        "mqttv5",
        "-D",
        "publish",
        "content-type",
        "text/x-kept",
    ];
    for n in 0..3 {
        mosquitto_pub_with(addr.port(), &topic, &format!("m{n}"), 1, &typed).await?;
    }
    gw.kill().await?;
    gw.restart().await?;

    let (mut c, ack) = V5Client::connect(persistent(addr, &id, 300)).await?;
    assert!(ack.session_present, "the session did not survive kill -9");
    let mut got = Vec::new();
    for _ in 0..3 {
        let p = c.publish().await?;
        assert_eq!(p.qos, QoS::AtLeastOnce);
        let props = p.properties.clone().unwrap_or_default();
        // The subscription identifier is part of the stored session, the
        // properties of the stored message.
        assert_eq!(props.subscription_identifiers, [7], "{p:?}");
        assert_eq!(props.content_type.as_deref(), Some("text/x-kept"), "{p:?}");
        got.push(text(&p.payload));
    }
    assert_eq!(got, ["m0", "m1", "m2"]);
    // No local is part of the stored session too.
    c.publish1(&topic, "own", None).await?;
    mosquitto_pub_with(addr.port(), &topic, "other", 1, &["-V", "mqttv5"]).await?;
    let next = text(&c.publish().await?.payload);
    assert_eq!(next, "other", "no local was lost across kill -9");
    c.disconnect().await?;

    // mosquitto_sub's own session with an expiry (-x) is kept too: it
    // subscribes and leaves (-E), then comes back for one message (-C 1).
    let mid = unique("mqx");
    let mtopic = format!("{mid}/t");
    let session = [
        "-V",
        "mqttv5",
        "-c",
        "-x",
        "300",
        "-i",
        mid.as_str(),
        "-q",
        "1",
        "-t",
        mtopic.as_str(),
    ];
    mosquitto_sub_run(addr.port(), &session, &["-E"]).await?;
    mosquitto_pub_with(addr.port(), &mtopic, "kept", 1, &["-V", "mqttv5"]).await?;
    gw.kill().await?;
    gw.restart().await?;
    let out = mosquitto_sub_run(
        addr.port(),
        &session,
        &["-C", "1", "-W", "10", "-F", "%t %p"],
    )
    .await?;
    assert_eq!(
        out.trim_end(),
        format!("{mtopic} kept"),
        "mosquitto_sub -x after kill -9"
    );
    Ok(())
}

/// Runs `mosquitto_sub -h 127.0.0.1 -p PORT ARGS MORE` to its end
/// (bounded); its stdout, or an error unless it exits 0.
async fn mosquitto_sub_run(port: u16, args: &[&str], more: &[&str]) -> Result<String> {
    let out = tokio::time::timeout(
        SHORT,
        tokio::process::Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .args(more)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| anyhow!("mosquitto_sub {more:?} ran for over {SHORT:?}"))??;
    if !out.status.success() {
        bail!(
            "mosquitto_sub {more:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_zero_ends_with_the_connection_and_a_short_one_runs_out() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();

    // Expiry 0 (the MQTT 5 default): nothing left after the connection.
    let id = unique("zero");
    let (mut c, _) = V5Client::connect(persistent(addr, &id, 0)).await?;
    c.subscribe1(&format!("{id}/t")).await?;
    c.disconnect().await?;
    let (c, ack) = V5Client::connect(persistent(addr, &id, 0)).await?;
    assert!(
        !ack.session_present,
        "a session with expiry 0 outlived its connection"
    );
    c.disconnect().await?;

    // Expiry 2 s: present when back at once, gone when back later.
    let id = unique("short");
    let (mut c, _) = V5Client::connect(persistent(addr, &id, 2)).await?;
    c.subscribe1(&format!("{id}/t")).await?;
    c.disconnect().await?;
    let (c, ack) = V5Client::connect(persistent(addr, &id, 2)).await?;
    assert!(ack.session_present, "a 2 s session was gone at once");
    c.disconnect().await?;
    tokio::time::sleep(Duration::from_millis(3500)).await; // the expiry is the subject
    let (c, ack) = V5Client::connect(persistent(addr, &id, 2)).await?;
    assert!(
        !ack.session_present,
        "a 2 s session was still there after 3.5 s"
    );
    c.disconnect().await?;
    gw.shutdown().await?;
    Ok(())
}

/// Session expiry interval (0x11) as a property block entry.
fn expiry_prop(secs: u32) -> Vec<u8> {
    let mut p = vec![0x11];
    p.extend_from_slice(&secs.to_be_bytes());
    p
}

/// A DISCONNECT (reason 0) setting the session expiry to `secs`.
fn disconnect_with_expiry(secs: u32) -> Vec<u8> {
    let props = expiry_prop(secs);
    let mut body = vec![0x00];
    varint(props.len(), &mut body);
    body.extend_from_slice(&props);
    packet(0xE0, &body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_may_end_the_session_but_not_revive_one_without_expiry() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();

    // CONNECT with 300 s, DISCONNECT with 0: the session ends now.
    let id = unique("dexp");
    let mut s = raw_connected(addr, &raw_connect_with(&id, false, &expiry_prop(300), None)).await?;
    s.write_all(&disconnect_with_expiry(0)).await?;
    let after = read_packet(&mut s).await?;
    assert!(after.is_none(), "DISCONNECT answered with {after:?}");
    let (c, ack) = V5Client::connect(persistent(addr, &id, 300)).await?;
    assert!(
        !ack.session_present,
        "DISCONNECT with expiry 0 left the session"
    );
    c.disconnect().await?;

    // And with a longer one it stays (the CONNECT had 1 s).
    let id = unique("dlong");
    let mut s = raw_connected(addr, &raw_connect_with(&id, false, &expiry_prop(1), None)).await?;
    s.write_all(&disconnect_with_expiry(300)).await?;
    assert!(read_packet(&mut s).await?.is_none());
    tokio::time::sleep(Duration::from_millis(2500)).await; // past the CONNECT's 1 s
    let (c, ack) = V5Client::connect(persistent(addr, &id, 300)).await?;
    assert!(
        ack.session_present,
        "DISCONNECT's longer expiry was not taken"
    );
    c.disconnect().await?;

    // CONNECT without expiry (0), DISCONNECT with 300: a protocol error
    // (MQTT-3.14.2-2), answered with DISCONNECT 0x82.
    let id = unique("dzero");
    let mut s = raw_connected(addr, &raw_connect_with(&id, false, &[], None)).await?;
    s.write_all(&disconnect_with_expiry(300)).await?;
    match read_packet(&mut s).await? {
        Some((0xE0, d)) => assert_eq!(d.first(), Some(&0x82), "DISCONNECT {d:?}"),
        other => bail!("raising the expiry from 0 got {other:?}, not DISCONNECT 0x82"),
    }
    let (c, ack) = V5Client::connect(persistent(addr, &id, 300)).await?;
    assert!(
        !ack.session_present,
        "a session without expiry outlived its connection"
    );
    c.disconnect().await?;
    gw.shutdown().await?;
    Ok(())
}

// ---------------------------------------------------------------------
// Message expiry

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_queued_messages_are_not_delivered_and_others_carry_what_is_left() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let id = unique("mexp");
    let topic = format!("{id}/t");
    let (mut c, _) = V5Client::connect(persistent(addr, &id, 300)).await?;
    c.subscribe1(&topic).await?;
    c.disconnect().await?;

    let (mut p, _) = V5Client::connect(opts(addr, &unique("mexp-pub"))).await?;
    let short = PublishProperties {
        message_expiry_interval: Some(1),
        ..props()
    };
    let long = PublishProperties {
        message_expiry_interval: Some(60),
        ..props()
    };
    p.publish1(&topic, "short", Some(short)).await?;
    p.publish1(&topic, "long", Some(long)).await?;
    // mosquitto_pub's message expiry (-D publish message-expiry-interval).
    mosquitto_pub_with(
        addr.port(),
        &topic,
        "short-mosq",
        1,
        &[
            "-V",
            "mqttv5",
            "-D",
            "publish",
            "message-expiry-interval",
            "1",
        ],
    )
    .await?;
    p.disconnect().await?;
    tokio::time::sleep(Duration::from_millis(2200)).await; // past the 1 s expiry

    let (mut c, ack) = V5Client::connect(persistent(addr, &id, 300)).await?;
    assert!(ack.session_present);
    let m = c.publish().await?;
    assert_eq!(text(&m.payload), "long", "an expired message was delivered");
    let left = m
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval);
    assert!(
        matches!(left, Some(s) if (1..60).contains(&s)),
        "remaining lifetime {left:?}, published with 60 s, 2 s ago"
    );
    assert!(
        c.publish_within(QUIET).await?.is_none(),
        "an expired message was delivered"
    );
    c.disconnect().await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_expires_too() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let t = unique("rexp");
    let (p, _) = V5Client::connect(opts(addr, &unique("rpub"))).await?;
    for (topic, secs) in [("short", 1), ("long", 60)] {
        let expiring = PublishProperties {
            message_expiry_interval: Some(secs),
            ..props()
        };
        p.client
            .publish_with_properties(
                format!("{t}/{topic}"),
                QoS::AtLeastOnce,
                true,
                topic,
                expiring,
            )
            .await?;
    }
    let mut p = p;
    p.expect("PUBACK", |p| matches!(p, Packet::PubAck(_)).then_some(()))
        .await?;
    p.expect("PUBACK", |p| matches!(p, Packet::PubAck(_)).then_some(()))
        .await?;
    tokio::time::sleep(Duration::from_millis(2200)).await; // past the 1 s expiry

    let (mut sub, _) = V5Client::connect(opts(addr, &unique("rsub"))).await?;
    sub.subscribe1(&format!("{t}/#")).await?;
    let m = sub.publish().await?;
    assert_eq!(
        text(&m.payload),
        "long",
        "an expired retained message was sent"
    );
    assert!(m.retain);
    let left = m
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval);
    assert!(
        matches!(left, Some(s) if (1..60).contains(&s)),
        "remaining lifetime {left:?}"
    );
    assert!(
        sub.publish_within(QUIET).await?.is_none(),
        "an expired retained message was sent"
    );
    gw.shutdown().await?;
    Ok(())
}

// ---------------------------------------------------------------------
// Properties

fn full_props(reply: &str) -> PublishProperties {
    PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(120),
        content_type: Some("application/json".into()),
        response_topic: Some(reply.into()),
        correlation_data: Some(Bytes::from_static(b"req-42")),
        user_properties: vec![("site".into(), "north".into()), ("line".into(), "7".into())],
        ..props()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_travel_from_mqtt5_to_mqtt5_clients() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let t = unique("props");
    let reply = format!("{t}/reply");
    let (mut sub, _) = V5Client::connect(opts(addr, &unique("psub"))).await?;
    sub.subscribe1(&format!("{t}/#")).await?;
    let mut mosq = MosquittoSub::start_with(
        addr.port(),
        &[&format!("{t}/#")],
        &["-V", "mqttv5", "-F", "MSG\t%t\t%p|%C|%R|%F|%P"],
    )
    .await?;

    // rumqttc v5 → rumqttc v5 and mosquitto_sub.
    let (mut p, _) = V5Client::connect(opts(addr, &unique("ppub"))).await?;
    assert_eq!(
        p.publish1(&format!("{t}/a"), "{}", Some(full_props(&reply)))
            .await?,
        PubAckReason::Success
    );
    let m = sub.publish().await?;
    let got = m.properties.context("delivery without properties")?;
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    assert_eq!(got.response_topic.as_deref(), Some(reply.as_str()));
    assert_eq!(got.correlation_data.as_deref(), Some(&b"req-42"[..]));
    assert_eq!(got.payload_format_indicator, Some(1));
    assert_eq!(
        got.user_properties,
        [
            ("site".to_string(), "north".to_string()),
            ("line".to_string(), "7".to_string())
        ]
    );
    assert!(
        matches!(got.message_expiry_interval, Some(s) if s <= 120 && s > 0),
        "{got:?}"
    );
    let (topic, line) = mosq.recv(SHORT).await?;
    assert_eq!(topic, format!("{t}/a"));
    assert_eq!(
        line,
        format!("{{}}|application/json|{reply}|1|site:north line:7"),
        "mosquitto_sub's view"
    );

    // mosquitto_pub -D → rumqttc v5.
    mosquitto_pub_with(
        addr.port(),
        &format!("{t}/b"),
        "hello",
        1,
        &[
            "-V",
            "mqttv5",
            "-D",
            "publish",
            "content-type",
            "text/plain",
            "-D",
            "publish",
            "response-topic",
            &reply,
            "-D",
            "publish",
            "correlation-data",
            "abc",
            "-D",
            "publish",
            "user-property",
            "k",
            "v",
            "-D",
            "publish",
            "payload-format-indicator",
            "1",
        ],
    )
    .await?;
    let m = sub.publish().await?;
    assert_eq!(text(&m.payload), "hello");
    let got = m.properties.context("delivery without properties")?;
    assert_eq!(got.content_type.as_deref(), Some("text/plain"));
    assert_eq!(got.response_topic.as_deref(), Some(reply.as_str()));
    assert_eq!(got.correlation_data.as_deref(), Some(&b"abc"[..]));
    assert_eq!(got.user_properties, [("k".to_string(), "v".to_string())]);
    assert_eq!(got.payload_format_indicator, Some(1));
    mosq.stop().await;
    gw.shutdown().await?;
    Ok(())
}

/// One AMQP delivery: body and the properties MQTT 5 maps to.
#[derive(Debug)]
struct AmqpGot {
    body: String,
    content_type: Option<String>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    expiration: Option<String>,
    headers: Vec<(String, String)>,
}

/// An exclusive queue on `uri`'s `amq.topic` bound with `key`, consumed
/// (auto-ack); the connection must be kept open while it is used.
async fn amqp_consumer(uri: &str, key: &str) -> Result<(lapin::Connection, lapin::Consumer)> {
    let conn = edge_tests::amqp::connect(uri).await?;
    let channel = conn.create_channel().await?;
    let q = unique("q5");
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(q.as_str().into(), exclusive, FieldTable::default())
        .await?;
    channel
        .queue_bind(
            q.as_str().into(),
            "amq.topic".into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    let consumer = channel
        .basic_consume(
            q.as_str().into(),
            "c5".into(),
            no_ack,
            FieldTable::default(),
        )
        .await?;
    Ok((conn, consumer))
}

/// The next delivery of `consumer` (bounded by `timeout`).
async fn amqp_next(consumer: &mut lapin::Consumer, timeout: Duration) -> Result<AmqpGot> {
    let d = tokio::time::timeout(timeout, consumer.next())
        .await
        .map_err(|_| anyhow!("no AMQP delivery within {timeout:?}"))?
        .context("consumer ended")??;
    let s = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| s.as_str().to_string());
    let pr = &d.properties;
    let mut headers = Vec::new();
    if let Some(table) = pr.headers() {
        for (k, v) in table.inner() {
            let v = match v {
                AMQPValue::LongString(v) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
                AMQPValue::ShortString(v) => v.as_str().to_string(),
                other => format!("{other:?}"),
            };
            headers.push((k.as_str().to_string(), v));
        }
    }
    Ok(AmqpGot {
        body: String::from_utf8_lossy(&d.data).into_owned(),
        content_type: s(pr.content_type()),
        correlation_id: s(pr.correlation_id()),
        reply_to: s(pr.reply_to()),
        expiration: s(pr.expiration()),
        headers,
    })
}

/// What [`full_props`] must become in AMQP basic properties.
fn assert_amqp_mapping(got: &AmqpGot, reply: &str) -> Result<()> {
    assert_eq!(got.body, "{}", "{got:?}");
    assert_eq!(
        got.content_type.as_deref(),
        Some("application/json"),
        "{got:?}"
    );
    assert_eq!(got.correlation_id.as_deref(), Some("req-42"), "{got:?}");
    assert_eq!(got.reply_to.as_deref(), Some(reply), "{got:?}");
    let ms: u64 = got
        .expiration
        .as_deref()
        .context("no expiration")?
        .parse()?;
    assert!(
        ms > 0 && ms <= 120_000,
        "expiration {ms} ms for a 120 s message"
    );
    for (k, v) in [("site", "north"), ("line", "7")] {
        assert!(
            got.headers.iter().any(|(hk, hv)| hk == k && hv == v),
            "header {k}={v} missing: {:?}",
            got.headers
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_map_from_mqtt5_to_the_gateways_amqp_server() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let t = unique("toamqp");
    let (conn, mut consumer) = amqp_consumer(&gw.amqp_uri(), &format!("{t}.#")).await?;
    let (mut p, _) = V5Client::connect(opts(gw.mqtt_addr(), &unique("apub"))).await?;
    p.publish1(&format!("{t}/a"), "{}", Some(full_props("replies/here")))
        .await?;
    assert_amqp_mapping(&amqp_next(&mut consumer, SHORT).await?, "replies/here")?;
    conn.close(200, "done".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

/// The same mapping on the way upstream: a route to RabbitMQ, with the
/// remaining lifetime as `expiration`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_map_from_mqtt5_to_an_upstream_broker() -> Result<()> {
    let node = crate::shared_node().await?;
    let t = unique("up5");
    let (conn, mut consumer) = amqp_consumer(&node.amqp_uri(), &format!("{t}.#")).await?;
    let gw = TestGateway::builder()
        .upstream("central", &[node.amqp_uri()])
        .route("v5", &format!("{t}/#"), "central")
        .start()
        .await?;
    let (mut p, _) = V5Client::connect(opts(gw.mqtt_addr(), &unique("upub"))).await?;
    let routed = p
        .publish1(&format!("{t}/a"), "{}", Some(full_props("replies/up")))
        .await?;
    assert_eq!(routed, PubAckReason::Success, "a routed message is matched");
    let got = amqp_next(&mut consumer, crate::LONG).await?;
    assert_amqp_mapping(&got, "replies/up")?;
    conn.close(200, "done".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_properties_reach_mqtt5_subscribers() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let t = unique("fromamqp");
    let (mut sub, _) = V5Client::connect(opts(gw.mqtt_addr(), &unique("asub"))).await?;
    sub.subscribe1(&format!("{t}/#")).await?;

    let conn = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    let channel = conn.create_channel().await?;
    let mut headers = FieldTable::default();
    headers.insert("site".into(), AMQPValue::LongString("south".into()));
    let props = lapin::BasicProperties::default()
        .with_content_type("text/csv".into())
        .with_correlation_id("corr-9".into())
        .with_reply_to(format!("{t}/replies").as_str().into())
        .with_expiration("60000".into())
        .with_headers(headers);
    channel
        .basic_publish(
            "amq.topic".into(),
            format!("{t}.a").as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            b"1,2",
            props,
        )
        .await?;
    let m = sub.publish().await?;
    assert_eq!(
        (text(&m.topic), text(&m.payload)),
        (format!("{t}/a"), "1,2".to_string())
    );
    let p = m.properties.context("no properties from AMQP")?;
    assert_eq!(p.content_type.as_deref(), Some("text/csv"), "{p:?}");
    assert_eq!(p.correlation_data.as_deref(), Some(&b"corr-9"[..]), "{p:?}");
    assert_eq!(p.response_topic, Some(format!("{t}/replies")), "{p:?}");
    assert!(
        p.user_properties
            .contains(&("site".to_string(), "south".to_string())),
        "{p:?}"
    );
    assert!(
        matches!(p.message_expiry_interval, Some(s) if (1..=60).contains(&s)),
        "{p:?}"
    );
    conn.close(200, "done".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

// ---------------------------------------------------------------------
// Topic aliases

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_work_both_ways() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let t = unique("alias");
    let topic = format!("{t}/long/topic/name");

    // The subscriber takes up to 4 aliases from the gateway.
    let mut o = opts(addr, &unique("asub"));
    o.set_topic_alias_max(Some(4));
    let (mut sub, _) = V5Client::connect(o).await?;
    sub.subscribe1(&format!("{t}/#")).await?;

    // The publisher sets alias 3, then publishes on it with an empty topic.
    let (mut p, _) = V5Client::connect(opts(addr, &unique("apub"))).await?;
    let aliased = PublishProperties {
        topic_alias: Some(3),
        ..props()
    };
    p.publish1(&topic, "one", Some(aliased.clone())).await?;
    p.publish1("", "two", Some(aliased)).await?;
    p.publish1(&topic, "three", None).await?;

    let first = sub.publish().await?;
    assert_eq!(
        (text(&first.topic), text(&first.payload)),
        (topic.clone(), "one".to_string())
    );
    let alias = first
        .properties
        .as_ref()
        .and_then(|p| p.topic_alias)
        .context("the gateway set no alias for a client taking 4")?;
    assert!((1..=4).contains(&alias));
    for payload in ["two", "three"] {
        let m = sub.publish().await?;
        assert_eq!(text(&m.payload), payload);
        assert_eq!(
            m.properties.as_ref().and_then(|p| p.topic_alias),
            Some(alias)
        );
        assert!(
            m.topic.is_empty(),
            "an established alias still sent the topic {:?}",
            text(&m.topic)
        );
    }

    // A client that takes no aliases gets whole topics.
    let (mut plain, _) = V5Client::connect(opts(addr, &unique("plain"))).await?;
    plain.subscribe1(&format!("{t}/#")).await?;
    p.publish1(&topic, "four", None).await?;
    let m = plain.publish().await?;
    assert_eq!(text(&m.topic), topic);
    assert_eq!(m.properties.as_ref().and_then(|p| p.topic_alias), None);

    // A client alias may be set again to another topic.
    let other = format!("{t}/other");
    let remap = PublishProperties {
        topic_alias: Some(3),
        ..props()
    };
    p.publish1(&other, "five", Some(remap.clone())).await?;
    p.publish1("", "six", Some(remap)).await?;
    for payload in ["five", "six"] {
        let m = plain.publish().await?;
        assert_eq!(
            (text(&m.topic), text(&m.payload)),
            (other.clone(), payload.to_string())
        );
    }

    // With its one alias taken, the gateway sends other topics whole.
    let mut o = opts(addr, &unique("onealias"));
    o.set_topic_alias_max(Some(1));
    let (mut one, _) = V5Client::connect(o).await?;
    one.subscribe1(&format!("{t}/#")).await?;
    for (to, payload) in [
        (&topic, "x1"),
        (&other, "y1"),
        (&topic, "x2"),
        (&other, "y2"),
    ] {
        p.publish1(to, payload, None).await?;
    }
    let mut seen = Vec::new();
    for _ in 0..4 {
        let m = one.publish().await?;
        let alias = m.properties.as_ref().and_then(|p| p.topic_alias);
        seen.push((text(&m.topic), alias, text(&m.payload)));
    }
    assert_eq!(
        seen,
        [
            (topic.clone(), Some(1), "x1".to_string()),
            (other.clone(), None, "y1".to_string()),
            (String::new(), Some(1), "x2".to_string()),
            (other.clone(), None, "y2".to_string()),
        ]
    );

    // Aliases are the connection's: a resumed session starts afresh.
    let id = unique("aliasq");
    let mut o = persistent(addr, &id, 300);
    o.set_topic_alias_max(Some(4));
    let (mut c, _) = V5Client::connect(o.clone()).await?;
    c.subscribe1(&format!("{t}/#")).await?;
    p.publish1(&topic, "before", None).await?;
    let m = c.publish().await?;
    assert!(!m.topic.is_empty() && m.properties.and_then(|p| p.topic_alias).is_some());
    c.disconnect().await?;
    p.publish1(&topic, "queued", None).await?;
    let (mut c, _) = V5Client::connect(o).await?;
    let m = c.publish().await?;
    assert_eq!(text(&m.payload), "queued");
    assert_eq!(
        text(&m.topic),
        topic,
        "a new connection relied on an old alias"
    );
    c.disconnect().await?;

    // An alias never set, with an empty topic: DISCONNECT 0x82/0x94.
    let mut s = raw_connected(addr, &raw_connect(&unique("rawalias"), None)).await?;
    let mut body = Vec::new();
    string(b"", &mut body);
    body.extend_from_slice(&1u16.to_be_bytes());
    body.extend_from_slice(&[3, 0x23, 0, 9]); // topic alias 9
    body.extend_from_slice(b"x");
    s.write_all(&packet(0x32, &body)).await?;
    match read_packet(&mut s).await? {
        Some((0xE0, d)) => assert!(matches!(d.first(), Some(0x82 | 0x94)), "DISCONNECT {d:?}"),
        other => bail!("an unknown alias got {other:?}, not DISCONNECT"),
    }
    gw.shutdown().await?;
    Ok(())
}

// ---------------------------------------------------------------------
// Receive maximum

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_keeps_to_the_clients_receive_maximum() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let t = unique("rmax");
    let mut o = opts(addr, &unique("rsub"));
    o.set_receive_maximum(Some(2));
    o.set_manual_acks(true);
    let (mut sub, _) = V5Client::connect(o).await?;
    sub.subscribe1(&format!("{t}/#")).await?;

    let (mut p, _) = V5Client::connect(opts(addr, &unique("rpub"))).await?;
    for n in 0..6 {
        p.publish1(&format!("{t}/x"), &format!("m{n}"), None)
            .await?;
    }
    let mut unacked = vec![sub.publish().await?, sub.publish().await?];
    assert!(
        sub.publish_within(QUIET).await?.is_none(),
        "a third QoS 1 delivery with 2 unacknowledged and receive maximum 2"
    );
    let mut got: Vec<String> = unacked.iter().map(|m| text(&m.payload)).collect();
    // Each ack lets exactly one more through.
    while got.len() < 6 {
        let m = unacked.remove(0);
        sub.client.ack(&m).await?;
        let next = sub.publish().await?;
        got.push(text(&next.payload));
        unacked.push(next);
        if got.len() < 6 {
            assert!(
                sub.publish_within(Duration::from_millis(200))
                    .await?
                    .is_none(),
                "more than 2 in flight"
            );
        }
    }
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4", "m5"]);

    // The same for what a persistent session's queue holds at reconnect.
    let id = unique("rback");
    let mut o = persistent(addr, &id, 300);
    o.set_receive_maximum(Some(2));
    o.set_manual_acks(true);
    let (mut c, _) = V5Client::connect(o.clone()).await?;
    c.subscribe1(&format!("{t}/q")).await?;
    c.disconnect().await?;
    for n in 0..5 {
        p.publish1(&format!("{t}/q"), &format!("b{n}"), None)
            .await?;
    }
    let (mut c, ack) = V5Client::connect(o).await?;
    assert!(ack.session_present);
    let mut unacked = vec![c.publish().await?, c.publish().await?];
    let mut got: Vec<String> = unacked.iter().map(|m| text(&m.payload)).collect();
    assert!(
        c.publish_within(QUIET).await?.is_none(),
        "a third queued delivery with 2 unacknowledged and receive maximum 2"
    );
    while got.len() < 5 {
        c.client.ack(&unacked.remove(0)).await?;
        let next = c.publish().await?;
        got.push(text(&next.payload));
        unacked.push(next);
    }
    assert_eq!(got, ["b0", "b1", "b2", "b3", "b4"]);
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_the_gateways_receive_maximum_is_disconnected_with_0x93() -> Result<()> {
    let gw = TestGateway::builder()
        .set("mqtt.max_inflight", "2")
        .start()
        .await?;
    let addr = gw.mqtt_addr();
    let mut s = raw_connected(addr, &raw_connect(&unique("greedy"), None)).await?;
    // Thirty QoS 1 publishes in one write: more unacknowledged than 2.
    let mut burst = Vec::new();
    for pkid in 1..=30u16 {
        burst.extend(raw_publish1("rmax/in", pkid, b"x"));
    }
    s.write_all(&burst).await?;
    let mut seen = Vec::new();
    loop {
        match read_packet(&mut s).await? {
            Some((0xE0, d)) => {
                assert_eq!(d.first(), Some(&0x93), "DISCONNECT {d:?} after {seen:?}");
                break;
            }
            Some((first, _)) => seen.push(first),
            None => bail!("closed without DISCONNECT 0x93 (saw {seen:?})"),
        }
    }
    // Others are unaffected.
    let (mut p, _) = V5Client::connect(opts(addr, &unique("polite"))).await?;
    p.publish1("rmax/in", "fine", None).await?;
    gw.shutdown().await?;
    Ok(())
}

// ---------------------------------------------------------------------
// Maximum packet size

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maximum_packet_sizes_hold_both_ways() -> Result<()> {
    let gw = TestGateway::builder()
        .set("mqtt.max_packet_size", "\"1KiB\"")
        .start()
        .await?;
    let addr = gw.mqtt_addr();
    let t = unique("mps");
    let big = "B".repeat(600);
    let (mut p, _) = V5Client::connect(opts(addr, &unique("big"))).await?;

    // Live: the oversized delivery is skipped, the next one arrives.
    let mut o = opts(addr, &unique("small"));
    o.set_max_packet_size(Some(256));
    let (mut sub, _) = V5Client::connect(o).await?;
    sub.subscribe1(&format!("{t}/live")).await?;
    for payload in ["small-1", &big, "small-2"] {
        p.publish1(&format!("{t}/live"), payload, None).await?;
    }
    assert_eq!(text(&sub.publish().await?.payload), "small-1");
    let next = text(&sub.publish().await?.payload);
    assert_eq!(next, "small-2", "the oversized one was not skipped");

    // Queued for an offline session: skipped for good (MQTT-3.1.2-25:
    // discarded), not kept for a later connection that takes more.
    let id = unique("mpsq");
    let mut small = persistent(addr, &id, 300);
    small.set_max_packet_size(Some(256));
    let (mut c, _) = V5Client::connect(small.clone()).await?;
    c.subscribe1(&format!("{t}/queued")).await?;
    c.disconnect().await?;
    for payload in ["q-1", &big, "q-2"] {
        p.publish1(&format!("{t}/queued"), payload, None).await?;
    }
    let (mut c, _) = V5Client::connect(small).await?;
    assert_eq!(text(&c.publish().await?.payload), "q-1");
    assert_eq!(text(&c.publish().await?.payload), "q-2");
    c.disconnect().await?;
    let (mut c, ack) = V5Client::connect(persistent(addr, &id, 300)).await?;
    assert!(ack.session_present);
    let late = c.publish_within(QUIET).await?;
    assert!(late.is_none(), "a skipped delivery came later: {late:?}");
    c.disconnect().await?;

    // Towards the gateway: a PUBLISH over mqtt.max_packet_size is 0x95.
    let mut s = raw_connected(addr, &raw_connect(&unique("huge"), None)).await?;
    s.write_all(&raw_publish1(&format!("{t}/in"), 1, &[b'x'; 2000]))
        .await?;
    match read_packet(&mut s).await? {
        Some((0xE0, d)) => assert_eq!(d.first(), Some(&0x95), "DISCONNECT {d:?}"),
        other => bail!("an oversized PUBLISH got {other:?}, not DISCONNECT 0x95"),
    }
    gw.shutdown().await?;
    Ok(())
}

// ---------------------------------------------------------------------
// Subscription options

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_options_are_honoured() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let t = unique("subopt");

    // No local: a client's own publishes do not come back to it.
    let (mut me, _) = V5Client::connect(opts(addr, &unique("self"))).await?;
    let codes = me
        .subscribe(vec![filter(&format!("{t}/nl"), |f| f.nolocal = true)], None)
        .await?;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    me.publish1(&format!("{t}/nl"), "mine", None).await?;
    let (mut other, _) = V5Client::connect(opts(addr, &unique("other"))).await?;
    other.publish1(&format!("{t}/nl"), "theirs", None).await?;
    assert_eq!(
        text(&me.publish().await?.payload),
        "theirs",
        "no local delivered the client's own message"
    );

    // Retain as published: a live retained publish keeps RETAIN only there.
    let (mut rap, _) = V5Client::connect(opts(addr, &unique("rap"))).await?;
    rap.subscribe(
        vec![filter(&format!("{t}/rap"), |f| f.preserve_retain = true)],
        None,
    )
    .await?;
    let (mut plain, _) = V5Client::connect(opts(addr, &unique("norap"))).await?;
    plain.subscribe1(&format!("{t}/rap")).await?;
    other
        .client
        .publish(format!("{t}/rap"), QoS::AtLeastOnce, true, "kept")
        .await?;
    assert!(
        rap.publish().await?.retain,
        "retain as published lost RETAIN"
    );
    assert!(
        !plain.publish().await?.retain,
        "RETAIN on a live delivery without retain as published"
    );

    // Retain handling: 0 sends retained at every SUBSCRIBE, 1 only for a
    // new subscription, 2 never.
    let rt = format!("{t}/rap");
    for (rule, expect) in [
        (RetainForwardRule::OnEverySubscribe, [true, true]),
        (RetainForwardRule::OnNewSubscribe, [true, false]),
        (RetainForwardRule::Never, [false, false]),
    ] {
        let (mut c, _) = V5Client::connect(opts(addr, &unique("rh"))).await?;
        for (i, want) in expect.into_iter().enumerate() {
            c.subscribe(
                vec![filter(&rt, |f| f.retain_forward_rule = rule.clone())],
                None,
            )
            .await?;
            let got = c.publish_within(if want { SHORT } else { QUIET }).await?;
            assert_eq!(
                got.is_some(),
                want,
                "{rule:?}, subscribe #{}: {got:?}",
                i + 1
            );
            if let Some(m) = got {
                assert!(m.retain && text(&m.payload) == "kept", "{m:?}");
            }
        }
    }

    // Retain handling 1 on a resumed session: the subscription exists.
    let id = unique("rh1");
    for (round, want) in [(0, true), (1, false)] {
        let (mut c, ack) = V5Client::connect(persistent(addr, &id, 300)).await?;
        assert_eq!(ack.session_present, round == 1);
        c.subscribe(
            vec![filter(&rt, |f| {
                f.retain_forward_rule = RetainForwardRule::OnNewSubscribe
            })],
            None,
        )
        .await?;
        let got = c.publish_within(if want { SHORT } else { QUIET }).await?;
        assert_eq!(
            got.is_some(),
            want,
            "retain handling 1, connection {round}: {got:?}"
        );
        c.disconnect().await?;
    }

    // Subscription identifiers: two overlapping filters, both ids.
    let (mut ids, _) = V5Client::connect(opts(addr, &unique("ids"))).await?;
    ids.subscribe(
        vec![Filter::new(format!("{t}/id/#"), QoS::AtLeastOnce)],
        Some(11),
    )
    .await?;
    ids.subscribe(
        vec![Filter::new(format!("{t}/id/+"), QoS::AtLeastOnce)],
        Some(22),
    )
    .await?;
    ids.subscribe(
        vec![Filter::new(format!("{t}/other"), QoS::AtLeastOnce)],
        Some(33),
    )
    .await?;
    other.publish1(&format!("{t}/id/x"), "both", None).await?;
    let m = ids.publish().await?;
    let mut got = m
        .properties
        .map(|p| p.subscription_identifiers)
        .unwrap_or_default();
    got.sort_unstable();
    assert_eq!(
        got,
        [11, 22],
        "one delivery carrying both matching subscriptions' ids"
    );
    assert!(
        ids.publish_within(QUIET).await?.is_none(),
        "overlapping filters delivered twice"
    );
    // A retained message sent for a SUBSCRIBE carries its identifier.
    ids.subscribe(vec![Filter::new(&rt, QoS::AtLeastOnce)], Some(44))
        .await?;
    let m = ids.publish().await?;
    assert!(m.retain && text(&m.payload) == "kept", "{m:?}");
    let got = m.properties.map(|p| p.subscription_identifiers);
    assert_eq!(
        got,
        Some(vec![44]),
        "the retained message's subscription id"
    );
    gw.shutdown().await?;
    Ok(())
}

// ---------------------------------------------------------------------
// Reason codes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reason_codes_for_no_subscribers_unsubscribe_and_take_over() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let t = unique("rc");
    let id = unique("rcid");
    let (mut c, _) = V5Client::connect(opts(addr, &id)).await?;
    assert_eq!(
        c.publish1(&format!("{t}/nobody"), "x", None).await?,
        PubAckReason::NoMatchingSubscribers
    );
    c.subscribe1(&format!("{t}/me")).await?;
    assert_eq!(
        c.publish1(&format!("{t}/me"), "x", None).await?,
        PubAckReason::Success
    );
    // QoS 2: the PUBREC says 0x10, and the exchange still completes.
    c.client
        .publish(format!("{t}/nobody"), QoS::ExactlyOnce, false, "y")
        .await?;
    let rec = c
        .expect("PUBREC", |p| match p {
            Packet::PubRec(r) => Some(r.reason),
            _ => None,
        })
        .await?;
    assert_eq!(rec, PubRecReason::NoMatchingSubscribers);
    c.expect("PUBCOMP", |p| matches!(p, Packet::PubComp(_)).then_some(()))
        .await?;

    c.client.unsubscribe(format!("{t}/never")).await?;
    let reasons = c
        .expect("UNSUBACK", |p| match p {
            Packet::UnsubAck(a) => Some(a.reasons),
            _ => None,
        })
        .await?;
    assert_eq!(reasons, [UnsubAckReason::NoSubscriptionExisted]);
    c.client.unsubscribe(format!("{t}/me")).await?;
    let reasons = c
        .expect("UNSUBACK", |p| match p {
            Packet::UnsubAck(a) => Some(a.reasons),
            _ => None,
        })
        .await?;
    assert_eq!(reasons, [UnsubAckReason::Success]);

    // Take-over: the old connection hears 0x8E.
    let (newer, _) = V5Client::connect(opts(addr, &id)).await?;
    assert_eq!(
        c.closed().await?,
        Some(DisconnectReasonCode::SessionTakenOver)
    );
    newer.disconnect().await?;
    gw.shutdown().await?;
    Ok(())
}

/// A QoS 1 publish with payload format indicator 1 and a payload that is
/// not UTF-8: the PUBACK's reason and reason string.
async fn publish_bad_utf8(c: &mut V5Client, topic: &str) -> Result<(PubAckReason, Option<String>)> {
    let utf8 = PublishProperties {
        payload_format_indicator: Some(1),
        ..props()
    };
    c.client
        .publish_with_properties(
            topic,
            QoS::AtLeastOnce,
            false,
            Bytes::from_static(&[0xC3, 0x28, 0xFF]),
            utf8,
        )
        .await?;
    c.expect("PUBACK", |p| match p {
        Packet::PubAck(a) => Some((a.reason, a.properties.and_then(|p| p.reason_string))),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_is_not_the_utf8_it_claims_gets_0x99_with_a_reason_only_if_asked()
-> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let t = unique("pfi");
    let (mut watcher, _) = V5Client::connect(opts(addr, &unique("pfiw"))).await?;
    watcher.subscribe1(&format!("{t}/#")).await?;

    // Problem information requested (the default): a reason string.
    let (mut c, _) = V5Client::connect(opts(addr, &unique("pfi1"))).await?;
    let (reason, why) = publish_bad_utf8(&mut c, &format!("{t}/bad")).await?;
    assert_eq!(reason, PubAckReason::PayloadFormatInvalid);
    assert!(
        why.is_some_and(|w| !w.is_empty()),
        "no reason string though problem information was requested"
    );
    // The connection stays and the refused message went nowhere.
    assert_eq!(
        c.publish1(&format!("{t}/good"), "fine", None).await?,
        PubAckReason::Success
    );
    assert_eq!(
        text(&watcher.publish().await?.payload),
        "fine",
        "the invalid payload was delivered"
    );

    // Request problem information 0: the reason code alone.
    let mut o = opts(addr, &unique("pfi0"));
    o.set_request_problem_info(Some(0));
    let (mut c, _) = V5Client::connect(o).await?;
    let (reason, why) = publish_bad_utf8(&mut c, &format!("{t}/bad")).await?;
    assert_eq!(reason, PubAckReason::PayloadFormatInvalid);
    assert_eq!(
        why, None,
        "a reason string though request problem information was 0"
    );
    gw.shutdown().await?;
    Ok(())
}

/// Subscription identifiers a client may not send: 0 in SUBSCRIBE
/// (MQTT 5 §3.8.2.1.2) and any in a PUBLISH to the server (MQTT-3.3.4-6).
/// Each is a protocol error: DISCONNECT 0x82 for that connection only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misplaced_subscription_identifiers_are_protocol_errors() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let (mut bystander, _) = V5Client::connect(opts(addr, &unique("by"))).await?;
    bystander.subscribe1("subid/#").await?;

    let mut zero = Vec::new();
    zero.extend_from_slice(&1u16.to_be_bytes());
    zero.extend_from_slice(&[2, 0x0B, 0]); // subscription identifier 0
    string(b"subid/a", &mut zero);
    zero.push(1);
    let mut in_publish = Vec::new();
    string(b"subid/b", &mut in_publish);
    in_publish.extend_from_slice(&1u16.to_be_bytes());
    in_publish.extend_from_slice(&[2, 0x0B, 5]); // subscription identifier 5
    in_publish.extend_from_slice(b"x");
    for (what, bytes) in [
        ("id 0 in SUBSCRIBE", packet(0x82, &zero)),
        ("id in PUBLISH", packet(0x32, &in_publish)),
    ] {
        let mut s = raw_connected(addr, &raw_connect(&unique("subid"), None)).await?;
        s.write_all(&bytes).await?;
        match read_packet(&mut s).await? {
            Some((0xE0, d)) => assert_eq!(d.first(), Some(&0x82), "{what}: DISCONNECT {d:?}"),
            other => bail!("{what}: got {other:?}, not DISCONNECT 0x82"),
        }
    }
    // Neither reached anyone; the bystander is fine.
    let (mut p, _) = V5Client::connect(opts(addr, &unique("after"))).await?;
    p.publish1("subid/c", "after", None).await?;
    assert_eq!(text(&bystander.publish().await?.payload), "after");
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_refuses_with_0x97_and_keeps_the_connection() -> Result<()> {
    let nowhere = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        edge_tests::free_port()?
    );
    let gw = TestGateway::builder()
        .set("store.max_bytes", "\"32KiB\"")
        .set("store.when_full", "\"reject\"")
        .upstream("central", &[nowhere])
        .route("all", "#", "central")
        .start()
        .await?;
    let (mut c, _) = V5Client::connect(opts(gw.mqtt_addr(), &unique("filler"))).await?;
    let big = "f".repeat(1024);
    let mut accepted = 0;
    let mut refused = None;
    for _ in 0..200 {
        match c.publish1("quota5/fill", &big, None).await? {
            PubAckReason::Success => accepted += 1,
            other => {
                refused = Some(other);
                break;
            }
        }
    }
    assert!(accepted > 0, "nothing accepted before the quota");
    assert_eq!(
        refused,
        Some(PubAckReason::QuotaExceeded),
        "after {accepted} accepted"
    );
    // The connection stays: it is still answered, QoS 2 in its PUBREC.
    assert_eq!(
        c.publish1("quota5/fill", &big, None).await?,
        PubAckReason::QuotaExceeded
    );
    c.client
        .publish("quota5/fill", QoS::ExactlyOnce, false, big.clone())
        .await?;
    let rec = c
        .expect("PUBREC", |p| match p {
            Packet::PubRec(r) => Some(r.reason),
            _ => None,
        })
        .await?;
    assert_eq!(rec, PubRecReason::QuotaExceeded);
    c.disconnect().await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_v5_clients_0x8b() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let (mut c, _) = V5Client::connect(opts(gw.mqtt_addr(), &unique("stay"))).await?;
    c.subscribe1("shutdown5/#").await?;
    let shutdown = tokio::spawn(gw.shutdown());
    assert_eq!(
        c.closed().await?,
        Some(DisconnectReasonCode::ServerShuttingDown)
    );
    shutdown.await??;
    Ok(())
}

// ---------------------------------------------------------------------
// Wills

fn will(topic: &str, payload: &str, delay: Option<u32>) -> LastWill {
    LastWill {
        topic: Bytes::from(topic.to_string()),
        message: Bytes::from(payload.to_string()),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Some(LastWillProperties {
            delay_interval: delay,
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: Some("text/plain".into()),
            response_topic: None,
            correlation_data: Some(Bytes::from_static(b"w-1")),
            user_properties: vec![("why".into(), "gone".into())],
        }),
    }
}

/// A v5 client with `will` that then loses its connection (no DISCONNECT).
async fn vanish(addr: SocketAddr, id: &str, w: LastWill, expiry: u32) -> Result<()> {
    let mut o = persistent(addr, id, expiry);
    o.set_last_will(w);
    let (c, _) = V5Client::connect(o).await?;
    drop(c); // aborts the event loop: the socket closes without DISCONNECT
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_delay_is_honoured_and_a_reconnect_cancels_it() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let t = unique("wdelay");
    let (mut watcher, _) = V5Client::connect(opts(addr, &unique("watch"))).await?;
    watcher.subscribe1(&format!("{t}/#")).await?;

    // Delay 2 s: not at once, then it comes, with its properties.
    let id = unique("late");
    let left = Instant::now();
    vanish(addr, &id, will(&format!("{t}/will"), "late", Some(2)), 60).await?;
    let m = watcher.publish().await?;
    assert_eq!(text(&m.payload), "late");
    assert!(
        left.elapsed() >= Duration::from_millis(1900),
        "a 2 s will delay ended after {:?}",
        left.elapsed()
    );
    let p = m.properties.context("will without properties")?;
    assert_eq!(p.content_type.as_deref(), Some("text/plain"));
    assert_eq!(p.correlation_data.as_deref(), Some(&b"w-1"[..]));
    assert_eq!(p.user_properties, [("why".to_string(), "gone".to_string())]);

    // Back within the delay: the will is cancelled.
    let id = unique("back");
    vanish(
        addr,
        &id,
        will(&format!("{t}/will"), "cancelled", Some(2)),
        60,
    )
    .await?;
    let (again, ack) = V5Client::connect(persistent(addr, &id, 60)).await?;
    assert!(ack.session_present);
    tokio::time::sleep(Duration::from_millis(2500)).await; // past the delay
    let (mut p, _) = V5Client::connect(opts(addr, &unique("marker"))).await?;
    p.publish1(&format!("{t}/marker"), "after", None).await?;
    let m = watcher.publish().await?;
    assert_eq!(text(&m.payload), "after", "a cancelled will was published");
    again.disconnect().await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_0x04_publishes_the_will_and_a_normal_one_does_not() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let t = unique("w04");
    let (mut watcher, _) = V5Client::connect(opts(addr, &unique("watch"))).await?;
    watcher.subscribe1(&format!("{t}/#")).await?;

    // Will properties: content type (0x03) "text/plain", user property
    // (0x26) why=bye.
    let mut wp = vec![0x03];
    string(b"text/plain", &mut wp);
    wp.push(0x26);
    string(b"why", &mut wp);
    string(b"bye", &mut wp);
    let topic = format!("{t}/will");
    let raw_will = || RawWill {
        topic: &topic,
        payload: b"bye",
        props: &wp,
    };

    // A normal DISCONNECT (0x00): no will.
    let mut s = raw_connected(addr, &raw_connect(&unique("w00"), Some(raw_will()))).await?;
    s.write_all(&[0xE0, 0x01, 0x00]).await?;
    let after = read_packet(&mut s).await?;
    assert!(after.is_none(), "still open after DISCONNECT: {after:?}");
    // DISCONNECT 0x04: the will.
    let mut s = raw_connected(addr, &raw_connect(&unique("w04"), Some(raw_will()))).await?;
    s.write_all(&[0xE0, 0x01, 0x04]).await?;
    assert!(
        read_packet(&mut s).await?.is_none(),
        "still open after DISCONNECT 0x04"
    );

    let m = watcher.publish().await?;
    assert_eq!(
        text(&m.payload),
        "bye",
        "the first message is the 0x04 will"
    );
    let p = m.properties.context("will without properties")?;
    assert_eq!(p.content_type.as_deref(), Some("text/plain"));
    assert_eq!(p.user_properties, [("why".to_string(), "bye".to_string())]);
    assert!(
        watcher.publish_within(QUIET).await?.is_none(),
        "a normal DISCONNECT published its will"
    );
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_delay_longer_than_the_session_ends_with_the_session() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let t = unique("wsess");
    let (mut watcher, _) = V5Client::connect(opts(addr, &unique("watch"))).await?;
    watcher.subscribe1(&format!("{t}/#")).await?;
    // Delay 60 s, session expiry 1 s: the will goes when the session ends
    // (MQTT 5 §3.1.3.2.2), well within SHORT.
    vanish(
        addr,
        &unique("brief"),
        will(&format!("{t}/will"), "session-over", Some(60)),
        1,
    )
    .await?;
    assert_eq!(text(&watcher.publish().await?.payload), "session-over");
    // Session expiry 0: at once, whatever the delay.
    vanish(
        addr,
        &unique("none"),
        will(&format!("{t}/will"), "no-session", Some(60)),
        0,
    )
    .await?;
    assert_eq!(text(&watcher.publish().await?.payload), "no-session");
    gw.shutdown().await?;
    Ok(())
}

/// Gateway shutdown publishes a will still waiting out its delay, like
/// those of the connections it closes; a persistent watcher gets it after
/// the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_publishes_a_delayed_will_at_once() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let t = unique("wshut");
    let watch_id = unique("watch");
    let (mut watcher, _) = V5Client::connect(persistent(addr, &watch_id, 300)).await?;
    watcher.subscribe1(&format!("{t}/#")).await?;
    watcher.disconnect().await?;
    vanish(
        addr,
        &unique("pending"),
        will(&format!("{t}/will"), "at-shutdown", Some(60)),
        300,
    )
    .await?;
    // Whether the gateway saw the close first (the will then waits out
    // its delay) or closes the connection itself, shutdown publishes it.
    let root = gw.shutdown().await?;

    let gw = TestGateway::builder().root(root).start().await?;
    let (mut watcher, ack) = V5Client::connect(persistent(gw.mqtt_addr(), &watch_id, 300)).await?;
    assert!(ack.session_present);
    let m = watcher.publish().await?;
    assert_eq!(
        text(&m.payload),
        "at-shutdown",
        "the delayed will was lost at shutdown"
    );
    gw.shutdown().await?;
    Ok(())
}

/// DISCONNECT 0x04 that also sets the session expiry to 0: the session
/// ends now, so a will waiting for a longer delay goes now too (the will is
/// published at the earlier of its delay and the session's end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_goes_when_disconnect_ends_the_session_before_its_delay() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let t = unique("wend");
    let (mut watcher, _) = V5Client::connect(opts(addr, &unique("watch"))).await?;
    watcher.subscribe1(&format!("{t}/#")).await?;
    let mut delay = vec![0x18]; // will delay interval: 60 s
    delay.extend_from_slice(&60u32.to_be_bytes());
    let topic = format!("{t}/will");
    let w = RawWill {
        topic: &topic,
        payload: b"ended",
        props: &delay,
    };
    let connect = raw_connect_with(&unique("wender"), false, &expiry_prop(300), Some(w));
    let mut s = raw_connected(addr, &connect).await?;
    let props = expiry_prop(0);
    let mut body = vec![0x04];
    varint(props.len(), &mut body);
    body.extend_from_slice(&props);
    s.write_all(&packet(0xE0, &body)).await?;
    assert!(read_packet(&mut s).await?.is_none());
    let m = watcher
        .publish()
        .await
        .context("the will waited for its delay after the session ended")?;
    assert_eq!(text(&m.payload), "ended");
    gw.shutdown().await?;
    Ok(())
}

// ---------------------------------------------------------------------
// 3.1.1 and 5 together; paho v5

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_and_v5_clients_exchange_messages_on_one_listener() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let addr = gw.mqtt_addr();
    let t = unique("mix");
    let mut old = MqttSubscriber::connect(addr, &unique("v311"), &[&format!("{t}/to311")]).await?;
    let (mut new, _) = V5Client::connect(opts(addr, &unique("v5"))).await?;
    new.subscribe1(&format!("{t}/to5")).await?;

    new.publish1(&format!("{t}/to311"), "from5", Some(full_props("r/x")))
        .await?;
    let m = old.recv(SHORT).await?;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        (format!("{t}/to311").as_str(), &b"from5"[..])
    );

    edge_tests::mqtt::publish_one(addr, &format!("{t}/to5"), b"from311").await?;
    let m = new.publish().await?;
    assert_eq!(text(&m.payload), "from311");
    assert_eq!(m.qos, QoS::AtLeastOnce);
    gw.shutdown().await?;
    Ok(())
}

const PAHO_V5: &str = r#"
import sys, time
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

port, topic = int(sys.argv[1]), sys.argv[2]
state, got = {}, []

def on_connect(c, u, flags, rc, props=None):
    state["rc"] = int(rc.value) if hasattr(rc, "value") else rc
    state["assigned"] = getattr(props, "AssignedClientIdentifier", None)
    sp = Properties(PacketTypes.SUBSCRIBE)
    sp.SubscriptionIdentifier = 5
    c.subscribe(topic, qos=1, properties=sp)

def on_subscribe(c, u, mid, codes, props=None):
    state["sub"] = [int(x.value) for x in codes]
    pp = Properties(PacketTypes.PUBLISH)
    pp.ContentType = "text/x-paho"
    pp.CorrelationData = b"pc-1"
    pp.ResponseTopic = topic + "/r"
    pp.UserProperty = ("from", "paho")
    pp.MessageExpiryInterval = 90
    c.publish(topic, b"hi", qos=1, properties=pp)

def on_message(c, u, m):
    p = m.properties
    got.append("%s %s %s %s %s %s %s %s" % (m.topic, m.payload.decode(),
        p.ContentType, p.CorrelationData.decode(), p.ResponseTopic,
        p.UserProperty, p.SubscriptionIdentifier, p.MessageExpiryInterval <= 90))

c = mqtt.Client(client_id="", protocol=mqtt.MQTTv5)
c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
c.connect("127.0.0.1", port, keepalive=30, clean_start=True)
c.loop_start()
deadline = time.time() + 15
while time.time() < deadline and not got:
    time.sleep(0.02)
c.disconnect()
c.loop_stop()
print("rc", state.get("rc"), "assigned", state.get("assigned") is not None, "sub", state.get("sub"))
for line in got:
    print(line)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paho_v5_client_gets_an_id_subscription_ids_and_properties() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let topic = format!("{}/p", unique("paho5"));
    let out = crate::run_python(
        "paho-mqtt v5",
        PAHO_V5,
        &[&gw.mqtt_addr().port().to_string(), &topic],
    )
    .await?;
    assert_eq!(
        out.first().map(String::as_str),
        Some("rc 0 assigned True sub [1]"),
        "{out:?}"
    );
    assert_eq!(
        out.get(1).map(String::as_str),
        Some(format!("{topic} hi text/x-paho pc-1 {topic}/r [('from', 'paho')] [5] True").as_str()),
        "{out:?}"
    );
    gw.shutdown().await?;
    Ok(())
}
