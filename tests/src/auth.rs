//! Clients and files for the security tests: users added with the
//! gateway's own `passwd` command, rumqttc MQTT 3.1.1 and MQTT 5 clients
//! that log in and report every CONNACK, SUBACK and PUBACK code, and a
//! hand-rolled MQTT client whose socket can be bound to any loopback
//! address (127.0.0.2, ...) so a test can come from another source.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

/// Bound for one client operation (CONNACK, SUBACK, PUBACK).
const OP_TIMEOUT: Duration = Duration::from_secs(15);

/// Adds (or changes) `user` in the password file at `file` by running
/// `BINARY passwd FILE USER --stdin`, as an operator would.
pub async fn add_user(binary: &Path, file: &Path, user: &str, password: &str) -> Result<()> {
    let mut child = tokio::process::Command::new(binary)
        .arg("passwd")
        .arg(file)
        .arg(user)
        .arg("--stdin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawning the gateway's passwd command")?;
    let mut stdin = child.stdin.take().context("passwd stdin")?;
    stdin.write_all(format!("{password}\n").as_bytes()).await?;
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .map_err(|_| anyhow!("passwd {user} ran for over 60s"))??;
    if !out.status.success() {
        bail!(
            "passwd {user} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// User name and password of a login.
pub type Login<'a> = Option<(&'a str, &'a str)>;

// ---------------------------------------------------------------------
// MQTT 3.1.1 (rumqttc's default module).

/// A logged-in MQTT 3.1.1 client whose event loop runs in a task; the
/// loop ends with the first connection error (no reconnect).
pub struct Mqtt4 {
    client: rumqttc::AsyncClient,
    rx: mpsc::UnboundedReceiver<std::result::Result<rumqttc::Packet, String>>,
    task: tokio::task::JoinHandle<()>,
    /// PUBLISHes that arrived while waiting for something else.
    early: VecDeque<(String, String)>,
}

impl Drop for Mqtt4 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for Mqtt4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mqtt4").finish_non_exhaustive()
    }
}

/// Outcome of an MQTT 3.1.1 connection attempt.
#[derive(Debug)]
pub enum Connect4 {
    /// CONNACK 0: the client.
    Accepted(Mqtt4),
    /// A CONNACK refusal code.
    Refused(rumqttc::ConnectReturnCode),
}

impl Mqtt4 {
    /// Connects (clean session) with `login` and waits for the CONNACK.
    pub async fn attempt(addr: SocketAddr, client_id: &str, login: Login<'_>) -> Result<Connect4> {
        let mut o = crate::mqtt::options(addr, client_id);
        if let Some((user, password)) = login {
            o.set_credentials(user, password);
        }
        let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 64);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(p)) => {
                        if tx.send(Ok(p)).is_err() {
                            return;
                        }
                    }
                    Ok(rumqttc::Event::Outgoing(_)) => {}
                    Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                        let _ = tx.send(Ok(rumqttc::Packet::ConnAck(rumqttc::ConnAck {
                            session_present: false,
                            code,
                        })));
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        let first = tokio::time::timeout(OP_TIMEOUT, rx.recv())
            .await
            .map_err(|_| anyhow!("{client_id}: no CONNACK within {OP_TIMEOUT:?}"))?;
        let code = match first {
            None => bail!("{client_id}: event loop ended before the CONNACK"),
            Some(Err(e)) => bail!("{client_id}: connecting: {e}"),
            Some(Ok(rumqttc::Packet::ConnAck(ack))) => ack.code,
            Some(Ok(other)) => bail!("{client_id}: first packet is not a CONNACK: {other:?}"),
        };
        let me = Mqtt4 {
            client,
            rx,
            task,
            early: VecDeque::new(),
        };
        if code == rumqttc::ConnectReturnCode::Success {
            Ok(Connect4::Accepted(me))
        } else {
            Ok(Connect4::Refused(code))
        }
    }

    /// Connects with `login`; fails unless accepted.
    pub async fn connect(addr: SocketAddr, client_id: &str, login: Login<'_>) -> Result<Mqtt4> {
        match Self::attempt(addr, client_id, login).await? {
            Connect4::Accepted(c) => Ok(c),
            Connect4::Refused(code) => bail!("{client_id}: CONNACK {code:?}"),
        }
    }

    async fn expect<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(rumqttc::Packet) -> Option<T>,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + OP_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => bail!("no {what} within {OP_TIMEOUT:?}"),
                Ok(None) => bail!("event loop ended waiting for {what}"),
                Ok(Some(Err(e))) => bail!("connection ended waiting for {what}: {e}"),
                Ok(Some(Ok(p))) => {
                    let publish = Self::as_publish(&p);
                    if let Some(t) = pick(p) {
                        return Ok(t);
                    }
                    if let Some(got) = publish {
                        self.early.push_back(got);
                    }
                }
            }
        }
    }

    fn as_publish(p: &rumqttc::Packet) -> Option<(String, String)> {
        match p {
            rumqttc::Packet::Publish(p) => Some((
                p.topic.clone(),
                String::from_utf8_lossy(&p.payload).into_owned(),
            )),
            _ => None,
        }
    }

    /// Subscribes to `filter` at QoS 1; the SUBACK's return code.
    pub async fn subscribe(&mut self, filter: &str) -> Result<rumqttc::SubscribeReasonCode> {
        self.client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await?;
        let codes = self
            .expect("SUBACK", |p| match p {
                rumqttc::Packet::SubAck(a) => Some(a.return_codes),
                _ => None,
            })
            .await?;
        codes
            .first()
            .copied()
            .with_context(|| format!("empty SUBACK for {filter}"))
    }

    /// Publishes at QoS 1 and waits for the PUBACK (3.1.1 has no reason code).
    pub async fn publish1(&mut self, topic: &str, payload: &str) -> Result<()> {
        self.client
            .publish(
                topic,
                rumqttc::QoS::AtLeastOnce,
                false,
                payload.as_bytes().to_vec(),
            )
            .await?;
        self.expect("PUBACK", |p| match p {
            rumqttc::Packet::PubAck(_) => Some(()),
            _ => None,
        })
        .await
    }

    /// Every PUBLISH received, as (topic, payload), until the one whose
    /// payload is `marker` (excluded).
    pub async fn until_marker(&mut self, marker: &str) -> Result<Vec<(String, String)>> {
        let mut seen = Vec::new();
        loop {
            let (topic, payload) = match self.early.pop_front() {
                Some(got) => got,
                None => self
                    .expect("PUBLISH", |p| Self::as_publish(&p))
                    .await
                    .with_context(|| format!("waiting for marker {marker:?} after {seen:?}"))?,
            };
            if payload == marker {
                return Ok(seen);
            }
            seen.push((topic, payload));
        }
    }
}

// ---------------------------------------------------------------------
// MQTT 5 (rumqttc::v5).

use rumqttc::v5::mqttbytes::v5 as p5;

/// A logged-in MQTT 5 client whose event loop runs in a task.
pub struct Mqtt5 {
    client: rumqttc::v5::AsyncClient,
    rx: mpsc::UnboundedReceiver<std::result::Result<p5::Packet, rumqttc::v5::ConnectionError>>,
    task: tokio::task::JoinHandle<()>,
    /// PUBLISHes that arrived while waiting for something else.
    early: VecDeque<(String, String)>,
}

impl Drop for Mqtt5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for Mqtt5 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mqtt5").finish_non_exhaustive()
    }
}

/// Outcome of an MQTT 5 connection attempt.
#[derive(Debug)]
pub enum Connect5 {
    /// CONNACK success: the client.
    Accepted(Mqtt5),
    /// A CONNACK reason code other than success.
    Refused(p5::ConnectReturnCode),
}

impl Mqtt5 {
    /// Connects (clean start) with `login` and waits for the CONNACK.
    pub async fn attempt(addr: SocketAddr, client_id: &str, login: Login<'_>) -> Result<Connect5> {
        let mut o = rumqttc::v5::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        if let Some((user, password)) = login {
            o.set_credentials(user, password);
        }
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(o, 64);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(p)) => {
                        if tx.send(Ok(p)).is_err() {
                            return;
                        }
                    }
                    Ok(rumqttc::v5::Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
        });
        let first = tokio::time::timeout(OP_TIMEOUT, rx.recv())
            .await
            .map_err(|_| anyhow!("{client_id}: no CONNACK within {OP_TIMEOUT:?}"))?;
        let code = match first {
            None => bail!("{client_id}: event loop ended before the CONNACK"),
            Some(Ok(p5::Packet::ConnAck(ack))) => ack.code,
            Some(Ok(other)) => bail!("{client_id}: first packet is not a CONNACK: {other:?}"),
            Some(Err(rumqttc::v5::ConnectionError::ConnectionRefused(code))) => code,
            Some(Err(e)) => bail!("{client_id}: connecting: {e}"),
        };
        let me = Mqtt5 {
            client,
            rx,
            task,
            early: VecDeque::new(),
        };
        if code == p5::ConnectReturnCode::Success {
            Ok(Connect5::Accepted(me))
        } else {
            Ok(Connect5::Refused(code))
        }
    }

    /// Connects with `login`; fails unless accepted.
    pub async fn connect(addr: SocketAddr, client_id: &str, login: Login<'_>) -> Result<Mqtt5> {
        match Self::attempt(addr, client_id, login).await? {
            Connect5::Accepted(c) => Ok(c),
            Connect5::Refused(code) => bail!("{client_id}: CONNACK {code:?}"),
        }
    }

    async fn expect<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(p5::Packet) -> Option<T>,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + OP_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => bail!("no {what} within {OP_TIMEOUT:?}"),
                Ok(None) => bail!("event loop ended waiting for {what}"),
                Ok(Some(Err(e))) => bail!("connection ended waiting for {what}: {e}"),
                Ok(Some(Ok(p))) => {
                    let publish = Self::as_publish(&p);
                    if let Some(t) = pick(p) {
                        return Ok(t);
                    }
                    if let Some(got) = publish {
                        self.early.push_back(got);
                    }
                }
            }
        }
    }

    fn as_publish(p: &p5::Packet) -> Option<(String, String)> {
        match p {
            p5::Packet::Publish(p) => Some((
                String::from_utf8_lossy(&p.topic).into_owned(),
                String::from_utf8_lossy(&p.payload).into_owned(),
            )),
            _ => None,
        }
    }

    /// Subscribes to `filter` at QoS 1; the SUBACK's reason code.
    pub async fn subscribe(&mut self, filter: &str) -> Result<p5::SubscribeReasonCode> {
        self.client
            .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
            .await?;
        let codes = self
            .expect("SUBACK", |p| match p {
                p5::Packet::SubAck(a) => Some(a.return_codes),
                _ => None,
            })
            .await?;
        codes
            .first()
            .copied()
            .with_context(|| format!("empty SUBACK for {filter}"))
    }

    /// Publishes at QoS 1; the PUBACK's reason code.
    pub async fn publish1(&mut self, topic: &str, payload: &str) -> Result<p5::PubAckReason> {
        self.client
            .publish(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                Bytes::from(payload.to_string()),
            )
            .await?;
        self.expect("PUBACK", |p| match p {
            p5::Packet::PubAck(a) => Some(a.reason),
            _ => None,
        })
        .await
    }

    /// Publishes at QoS 0 (queued in the client; no acknowledgement).
    pub async fn publish0(&self, topic: &str, payload: &[u8]) -> Result<()> {
        self.client
            .publish(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                false,
                Bytes::from(payload.to_vec()),
            )
            .await?;
        Ok(())
    }

    /// Every PUBLISH received, as (topic, payload), until the one whose
    /// payload is `marker` (excluded).
    pub async fn until_marker(&mut self, marker: &str) -> Result<Vec<(String, String)>> {
        let mut seen = Vec::new();
        loop {
            let (topic, payload) = match self.early.pop_front() {
                Some(got) => got,
                None => self
                    .expect("PUBLISH", |p| Self::as_publish(&p))
                    .await
                    .with_context(|| format!("waiting for marker {marker:?} after {seen:?}"))?,
            };
            if payload == marker {
                return Ok(seen);
            }
            seen.push((topic, payload));
        }
    }

    /// Whether the connection is still up: true unless the event loop has
    /// reported an error (packets received meanwhile are skipped).
    pub fn still_connected(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(mpsc::error::TryRecvError::Disconnected) => return false,
                Err(mpsc::error::TryRecvError::Empty) => return true,
            }
        }
    }
}

// ---------------------------------------------------------------------
// A hand-rolled MQTT client on a socket bound to a chosen source address.

/// A TCP connection to `addr` from `local` (any port), e.g. 127.0.0.2.
pub async fn tcp_from(local: IpAddr, addr: SocketAddr) -> Result<tokio::net::TcpStream> {
    let socket = match local {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket
        .bind(SocketAddr::new(local, 0))
        .with_context(|| format!("binding a client socket to {local}"))?;
    tokio::time::timeout(OP_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| anyhow!("TCP connect to {addr} from {local} timed out"))?
        .with_context(|| format!("TCP connect to {addr} from {local}"))
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// Appends MQTT's variable-length encoding of a remaining length.
pub fn put_remaining_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            return;
        }
    }
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    put_remaining_length(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// A CONNECT packet: `level` 4 (MQTT 3.1.1) or 5, clean session,
/// keep-alive 60 s, optional user name and password.
pub fn connect_packet(level: u8, client_id: &str, login: Login<'_>) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, b"MQTT");
    body.push(level);
    let mut flags = 0x02;
    if login.is_some() {
        flags |= 0xC0;
    }
    body.push(flags);
    body.extend_from_slice(&60u16.to_be_bytes());
    if level == 5 {
        body.push(0); // no properties
    }
    put_str(&mut body, client_id.as_bytes());
    if let Some((user, password)) = login {
        put_str(&mut body, user.as_bytes());
        put_str(&mut body, password.as_bytes());
    }
    packet(0x10, &body)
}

/// A PUBLISH packet; QoS 1 with `pkid` when given, else QoS 0.
pub fn publish_packet(level: u8, topic: &str, payload: &[u8], pkid: Option<u16>) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, topic.as_bytes());
    if let Some(id) = pkid {
        body.extend_from_slice(&id.to_be_bytes());
    }
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    packet(if pkid.is_some() { 0x32 } else { 0x30 }, &body)
}

/// The reading half of a [`RawMqtt`] connection: whole packets.
#[derive(Debug)]
pub struct RawReader {
    reader: OwnedReadHalf,
    buf: Vec<u8>,
}

impl RawReader {
    /// The next packet as (first byte, body), `None` when the peer closed
    /// (or reset) the connection; an error after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<(u8, Vec<u8>)>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(p) = self.parse()? {
                return Ok(Some(p));
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout_at(deadline, self.reader.read(&mut chunk))
                .await
                .map_err(|_| anyhow!("no packet within {timeout:?}"))?;
            match read {
                Ok(0) | Err(_) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn parse(&mut self) -> Result<Option<(u8, Vec<u8>)>> {
        let mut len = 0usize;
        let mut shift = 0;
        let mut at = 1;
        loop {
            let Some(byte) = self.buf.get(at) else {
                return Ok(None);
            };
            len |= usize::from(byte & 0x7F) << shift;
            at += 1;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 21 {
                bail!("malformed remaining length from the gateway");
            }
        }
        if self.buf.len() < at + len {
            return Ok(None);
        }
        let first = self.buf[0];
        let body = self.buf[at..at + len].to_vec();
        self.buf.drain(..at + len);
        Ok(Some((first, body)))
    }
}

/// A minimal MQTT client (CONNECT, PUBLISH, PUBACK counting) over a
/// socket bound to a chosen source address.
#[derive(Debug)]
pub struct RawMqtt {
    /// The writing half: send packets built by [`publish_packet`].
    pub writer: OwnedWriteHalf,
    /// The reading half.
    pub reader: RawReader,
}

impl RawMqtt {
    /// Connects from `local` and sends CONNECT; the CONNACK's code (3.1.1
    /// return code or MQTT 5 reason), or `None` if the gateway closed the
    /// connection without one.
    pub async fn connect(
        local: IpAddr,
        addr: SocketAddr,
        level: u8,
        client_id: &str,
        login: Login<'_>,
    ) -> Result<(RawMqtt, Option<u8>)> {
        let stream = tcp_from(local, addr).await?;
        let (reader, mut writer) = stream.into_split();
        let mut reader = RawReader {
            reader,
            buf: Vec::new(),
        };
        // A gateway that refuses at accept may have closed already.
        if writer
            .write_all(&connect_packet(level, client_id, login))
            .await
            .is_err()
        {
            return Ok((RawMqtt { writer, reader }, None));
        }
        let code = match reader.next(OP_TIMEOUT).await? {
            None => None,
            Some((0x20, body)) if body.len() >= 2 => Some(body[1]),
            Some((first, body)) => bail!("expected CONNACK, got {first:#04x} {body:?}"),
        };
        Ok((RawMqtt { writer, reader }, code))
    }

    /// Publishes `count` QoS 1 messages to `topic` from a writer task while
    /// counting PUBACKs; returns how many arrived within `timeout`.
    pub async fn publish_acked(
        self,
        level: u8,
        topic: &str,
        count: u16,
        timeout: Duration,
    ) -> Result<u16> {
        let RawMqtt {
            mut writer,
            mut reader,
        } = self;
        let topic = topic.to_string();
        let sender = tokio::spawn(async move {
            for id in 1..=count {
                let p = publish_packet(level, &topic, format!("m{id}").as_bytes(), Some(id));
                if writer.write_all(&p).await.is_err() {
                    return writer;
                }
            }
            writer
        });
        let deadline = tokio::time::Instant::now() + timeout;
        let mut acked = 0u16;
        while acked < count {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match reader.next(left).await {
                Ok(Some((first, _))) if first & 0xF0 == 0x40 => acked += 1,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        let _writer = sender.await?;
        Ok(acked)
    }
}
