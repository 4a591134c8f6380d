//! A real store, router and listener on 127.0.0.1:0, and a raw-bytes client.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroUsize};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use edge_config::MqttConfig;
use edge_core::{Message, Router, Routes};
use edge_mqtt::MqttListener;
use edge_store::{Store, StoreOptions};
use redb::StorageBackend;
use redb::backends::InMemoryBackend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Upper bound on any single wait in these tests; expiring it is a failure.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub struct Server {
    pub addr: SocketAddr,
    pub store: Store,
    pub router: Router,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

#[derive(Clone)]
pub struct Options {
    pub max_bytes: u64,
    pub max_packet_size: usize,
    pub max_connections: usize,
    pub max_inflight: u16,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            max_bytes: 64 << 20,
            max_packet_size: 64 * 1024,
            max_connections: 100,
            max_inflight: 16,
        }
    }
}

impl Server {
    pub async fn start() -> Result<Server> {
        Server::with(Options::default()).await
    }

    pub async fn with(options: Options) -> Result<Server> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path(), store_options(&options)?)?;
        Server::on(store, dir, options).await
    }

    /// A server whose store commits only while `gate` is open.
    pub async fn gated(options: Options) -> Result<(Server, Gate)> {
        let dir = tempfile::tempdir()?;
        let gate = Gate::default();
        let backend = GatedBackend {
            inner: InMemoryBackend::new(),
            gate: gate.clone(),
        };
        let store = Store::open_with_backend(backend, dir.path(), store_options(&options)?)?;
        Ok((Server::on(store, dir, options).await?, gate))
    }

    async fn on(store: Store, dir: tempfile::TempDir, options: Options) -> Result<Server> {
        // Started, so that offline sessions expire as in the gateway.
        let router = Router::start(
            store.clone(),
            Routes::new(Vec::new()),
            edge_core::RouterOptions::default(),
        )
        .await?;
        let config = MqttConfig {
            listen: "127.0.0.1:0".parse()?,
            max_connections: NonZeroUsize::new(options.max_connections).context("nonzero")?,
            max_handshakes: NonZeroUsize::new(256).context("nonzero")?,
            max_handshakes_per_source: NonZeroUsize::new(256).context("nonzero")?,
            max_packet_size: NonZeroUsize::new(options.max_packet_size).context("nonzero")?,
            connect_timeout: Duration::from_secs(5),
            max_inflight: NonZeroU16::new(options.max_inflight).context("nonzero")?,
            max_queued_messages: NonZeroUsize::new(1000).context("nonzero")?,
            session_expiry: Duration::from_secs(3600),
            max_session_queue: NonZeroUsize::new(1000).context("nonzero")?,
            max_session_queue_bytes: 64 << 20,
            ws_listen: None,
            ws_path: "/mqtt".to_string(),
            tls_listen: None,
            wss_listen: None,
        };
        let listener = MqttListener::bind(&config, edge_auth::Security::open()).await?;
        let addr = listener.local_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(listener.run(router.clone(), shutdown.clone()));
        Ok(Server {
            addr,
            store,
            router,
            shutdown,
            task,
            _dir: dir,
        })
    }

    /// Every message in the log, in order.
    pub async fn records(&self) -> Result<Vec<Message>> {
        let store = self.store.clone();
        let records =
            tokio::task::spawn_blocking(move || store.read(1, 10_000, usize::MAX)).await??;
        records
            .into_iter()
            .map(|e| Message::from_record(&e.record).context("decodes"))
            .collect()
    }

    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .context("listener did not stop")??;
        Ok(())
    }
}

fn store_options(options: &Options) -> Result<StoreOptions> {
    Ok(StoreOptions {
        max_bytes: options.max_bytes,
        batch_max_messages: NonZeroUsize::new(1024).context("nonzero")?,
        batch_max_bytes: NonZeroUsize::new(4 << 20).context("nonzero")?,
        inbox_capacity: NonZeroUsize::new(1024).context("nonzero")?,
        cursors: Vec::new(),
        retire_without_cursors: false,
        when_full: Default::default(),
        min_free: 0,
        max_age: None,
    })
}

/// Holds the store's fsyncs (and so its commits) while closed.
#[derive(Debug, Clone, Default)]
pub struct Gate {
    inner: Arc<GateInner>,
}

#[derive(Debug, Default)]
struct GateInner {
    closed: Mutex<bool>,
    opened: Condvar,
    /// Notified whenever a sync finds the gate closed.
    held: tokio::sync::Notify,
}

impl Gate {
    pub fn close(&self) {
        *self
            .inner
            .closed
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
    }

    pub fn open(&self) {
        *self
            .inner
            .closed
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = false;
        self.inner.opened.notify_all();
    }

    /// Resolves once a commit is waiting at the closed gate.
    pub async fn holding(&self) -> Result<()> {
        tokio::time::timeout(PATIENCE, self.inner.held.notified())
            .await
            .context("no commit reached the gate")
    }

    fn pass(&self) {
        let mut closed = self
            .inner
            .closed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *closed {
            self.inner.held.notify_one();
        }
        while *closed {
            closed = self
                .inner
                .opened
                .wait(closed)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

#[derive(Debug)]
struct GatedBackend {
    inner: InMemoryBackend,
    gate: Gate,
}

impl StorageBackend for GatedBackend {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.gate.pass();
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.inner.write(offset, data)
    }
}

/// A client speaking raw bytes.
pub struct Raw {
    pub stream: TcpStream,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Result<Raw> {
        Ok(Raw {
            stream: TcpStream::connect(addr).await?,
        })
    }

    /// Connects and completes a 3.1.1 handshake.
    pub async fn session(addr: SocketAddr, client_id: &str, keep_alive: u16) -> Result<Raw> {
        let mut raw = Raw::connect(addr).await?;
        raw.send(&connect(b"MQTT", 4, client_id, keep_alive, true))
            .await?;
        raw.expect(&[0x20, 2, 0, 0]).await?;
        Ok(raw)
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Reads exactly `expected.len()` bytes and compares them.
    pub async fn expect(&mut self, expected: &[u8]) -> Result<()> {
        let mut got = vec![0; expected.len()];
        tokio::time::timeout(PATIENCE, self.stream.read_exact(&mut got))
            .await
            .context("timed out waiting for bytes")??;
        if got != expected {
            bail!("expected {expected:02x?}, got {got:02x?}");
        }
        Ok(())
    }

    /// Reads one whole packet (fixed header included).
    pub async fn packet(&mut self) -> Result<Vec<u8>> {
        tokio::time::timeout(PATIENCE, async {
            let mut packet = vec![self.stream.read_u8().await?];
            let (mut len, mut shift) = (0usize, 0);
            loop {
                let b = self.stream.read_u8().await?;
                packet.push(b);
                len |= usize::from(b & 0x7F) << shift;
                shift += 7;
                if b & 0x80 == 0 || shift > 21 {
                    break;
                }
            }
            let start = packet.len();
            packet.resize(start + len, 0);
            self.stream.read_exact(&mut packet[start..]).await?;
            anyhow::Ok(packet)
        })
        .await
        .context("timed out waiting for a packet")?
    }

    /// Waits until the server closes the connection, failing on any byte.
    pub async fn expect_closed(&mut self) -> Result<()> {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(PATIENCE, self.stream.read(&mut buf)).await {
            Err(_) => bail!("connection still open after {PATIENCE:?}"),
            Ok(Ok(0)) => Ok(()),
            Ok(Ok(n)) => bail!("expected close, got {:02x?}", &buf[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Ok(Err(e)) => Err(e.into()),
        }
    }
}

/// Appends an MQTT remaining length (variable byte integer).
pub fn remaining_length(out: &mut Vec<u8>, mut len: usize) {
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

/// A whole packet: first byte, remaining length, body.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    remaining_length(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// Appends a length-prefixed MQTT string.
pub fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

pub fn connect(name: &[u8], level: u8, client_id: &str, keep_alive: u16, clean: bool) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, name);
    body.push(level);
    body.push(if clean { 0x02 } else { 0 });
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        body.push(0); // no properties
    }
    string(&mut body, client_id.as_bytes());
    packet(0x10, &body)
}

/// A clean-session CONNECT with a will: `(topic, payload, qos, retain)`.
pub fn connect_with_will(
    name: &[u8],
    level: u8,
    client_id: &str,
    keep_alive: u16,
    will: (&[u8], &[u8], u8, bool),
) -> Vec<u8> {
    let (topic, payload, qos, retain) = will;
    let mut body = Vec::new();
    string(&mut body, name);
    body.push(level);
    body.push(0x02 | 0x04 | (qos << 3) | (u8::from(retain) << 5));
    body.extend_from_slice(&keep_alive.to_be_bytes());
    string(&mut body, client_id.as_bytes());
    string(&mut body, topic);
    string(&mut body, payload);
    packet(0x10, &body)
}

pub fn publish(topic: &str, payload: &[u8], qos: u8, pkid: u16, dup: bool) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1) | (u8::from(dup) << 3), &body)
}

pub fn subscribe(pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    for (filter, qos) in filters {
        string(&mut body, filter.as_bytes());
        body.push(*qos);
    }
    packet(0x82, &body)
}

pub fn ack(kind: u8, pkid: u16) -> Vec<u8> {
    let [hi, lo] = pkid.to_be_bytes();
    vec![kind, 2, hi, lo]
}

pub const PUBACK: u8 = 0x40;
pub const PUBREC: u8 = 0x50;
pub const PUBREL: u8 = 0x62;
pub const PUBCOMP: u8 = 0x70;
pub const PINGREQ: [u8; 2] = [0xC0, 0];
pub const PINGRESP: [u8; 2] = [0xD0, 0];
pub const DISCONNECT: [u8; 2] = [0xE0, 0];
