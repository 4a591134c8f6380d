//! Shared by the MQTT load tools (`mqtt-load`, `mqtt5-load`,
//! `session-figures`): rumqttc clients that wait for their
//! acknowledgements (MQTT 3.1.1 here, MQTT 5 in [`v5`]), payloads stamped
//! with the time they were published, percentiles, and brokers
//! (edge-gateway or Mosquitto) started as private child processes on
//! loopback.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

/// Options every load client uses: the given session kind, a long
/// keep-alive, `inflight` unacknowledged QoS 1 publishes, packets up to
/// `payload` plus headers.
pub fn options(
    client_id: String,
    addr: SocketAddr,
    clean: bool,
    inflight: u16,
    payload: usize,
) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options
        .set_clean_session(clean)
        .set_keep_alive(Duration::from_secs(60))
        .set_inflight(inflight)
        .set_max_packet_size(payload + 1024, payload + 1024)
        .set_request_channel_capacity(usize::from(inflight) * 2);
    options
}

/// A client and its event loop, after the CONNACK. Flushes may stall for as
/// long as `timeout_secs` (a broker's flow control), and TCP_NODELAY is on.
pub async fn connect(
    options: MqttOptions,
    timeout_secs: u64,
) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let capacity = options.request_channel_capacity();
    let (client, mut eventloop) = AsyncClient::new(options, capacity);
    let mut network = eventloop.network_options();
    network.set_connection_timeout(timeout_secs);
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    wait_for(&mut eventloop, |p| matches!(p, Packet::ConnAck(_))).await?;
    Ok((client, eventloop))
}

/// Subscribes `filters` at `qos` (one SUBSCRIBE) and waits for the SUBACK,
/// which must grant every filter.
pub async fn subscribe(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    filters: impl IntoIterator<Item = String>,
    qos: QoS,
) -> anyhow::Result<()> {
    let filters: Vec<_> = filters
        .into_iter()
        .map(|f| rumqttc::SubscribeFilter::new(f, qos))
        .collect();
    let count = filters.len();
    client.subscribe_many(filters).await?;
    let mut granted = 0;
    wait_for(eventloop, |p| match p {
        Packet::SubAck(ack) => {
            granted = ack
                .return_codes
                .iter()
                .filter(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure))
                .count();
            true
        }
        _ => false,
    })
    .await?;
    if granted != count {
        bail!("the SUBACK granted {granted} of {count} filters");
    }
    Ok(())
}

/// Polls until `count` PUBLISHes have arrived (rumqttc acknowledges QoS 1
/// ones as they do), or until none has for `quiet`; returns how many did.
pub async fn receive(
    eventloop: &mut EventLoop,
    count: usize,
    quiet: Duration,
) -> anyhow::Result<usize> {
    let mut received = 0;
    while received < count {
        match tokio::time::timeout(quiet, eventloop.poll()).await {
            Ok(event) => {
                if let Event::Incoming(Packet::Publish(_)) = event? {
                    received += 1;
                }
            }
            Err(_) => break,
        }
    }
    Ok(received)
}

/// Polls until an incoming packet satisfies `done`.
pub async fn wait_for(
    eventloop: &mut EventLoop,
    mut done: impl FnMut(&Packet) -> bool,
) -> anyhow::Result<()> {
    loop {
        if let Event::Incoming(packet) = eventloop.poll().await?
            && done(&packet)
        {
            return Ok(());
        }
    }
}

/// Sends DISCONNECT and polls until it is written (or the connection ends).
pub async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) {
    if client.disconnect().await.is_err() {
        return;
    }
    while let Ok(event) = eventloop.poll().await {
        if let Event::Outgoing(rumqttc::Outgoing::Disconnect) = event {
            break;
        }
    }
}

/// A payload of `size` bytes (at least 8) whose first 8 carry the
/// microseconds from `epoch` to now.
pub fn stamped_payload(epoch: Instant, size: usize) -> Bytes {
    let mut buf = BytesMut::with_capacity(size.max(8));
    buf.put_u64(epoch.elapsed().as_micros() as u64);
    buf.resize(size.max(8), b'x');
    buf.freeze()
}

/// Microseconds from the stamp of a [`stamped_payload`] to now.
pub fn age_us(epoch: Instant, payload: &[u8]) -> Option<u32> {
    let stamp = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    let now = epoch.elapsed().as_micros() as u64;
    Some(u32::try_from(now.saturating_sub(stamp)).unwrap_or(u32::MAX))
}

/// `sorted` ascending; 0 when empty.
pub fn percentile_ms(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() - 1) as f64 * q).round() as usize;
    f64::from(sorted[rank.min(sorted.len() - 1)]) / 1000.0
}

/// The median of `values` (0 when empty).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Which broker a [`Broker`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gateway,
    Mosquitto,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Gateway => "gateway",
            Kind::Mosquitto => "mosquitto",
        }
    }
}

/// A broker as a child process with its own temporary directory (config,
/// data, log), listening on a free loopback port. Stopped on drop.
#[derive(Debug)]
pub struct Broker {
    pub kind: Kind,
    pub addr: SocketAddr,
    pub pid: u32,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Broker {
    /// Starts `kind`; `extra` is appended to its configuration: TOML lines
    /// for the gateway's `[mqtt]` table, `mosquitto.conf` lines for Mosquitto.
    pub fn start(kind: Kind, gateway: &Path, extra: &str) -> anyhow::Result<Broker> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("edge-bench-{}-", kind.name()))
            .tempdir()
            .context("creating the broker's directory")?;
        let addr = free_port()?;
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).context("creating the data directory")?;
        let (program, args): (PathBuf, Vec<String>) = match kind {
            Kind::Gateway => {
                let config = dir.path().join("gateway.toml");
                std::fs::write(
                    &config,
                    format!(
                        "[gateway]\nid = \"bench\"\ndata_dir = {:?}\n\n[mqtt]\nlisten = \"{addr}\"\n{extra}\n\n\
                         [metrics]\nenabled = false\n\n\
                         # Every load client connects from 127.0.0.1: lift the per-source limits.\n\
                         [limits]\nmax_connections_per_source = 100000\nconnection_rate_per_source = 1000000\n",
                        data.display().to_string()
                    ),
                )
                .context("writing gateway.toml")?;
                (
                    gateway.to_path_buf(),
                    vec!["--config".into(), config.display().to_string()],
                )
            }
            Kind::Mosquitto => {
                let config = dir.path().join("mosquitto.conf");
                std::fs::write(
                    &config,
                    format!(
                        "listener {} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                         persistence_location {}/\nlog_dest stderr\n{extra}\n",
                        addr.port(),
                        data.display()
                    ),
                )
                .context("writing mosquitto.conf")?;
                // Started as root, Mosquitto drops to the `mosquitto` user,
                // which must be able to write its persistence file.
                let _ = Command::new("chown")
                    .args(["-R", "mosquitto:"])
                    .arg(dir.path())
                    .stderr(Stdio::null())
                    .status();
                let program = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
                    .into_iter()
                    .map(PathBuf::from)
                    .find(|p| p.is_file())
                    .unwrap_or_else(|| PathBuf::from("mosquitto"));
                (program, vec!["-c".into(), config.display().to_string()])
            }
        };
        let log = std::fs::File::create(dir.path().join("log")).context("creating the log")?;
        let child = Command::new(&program)
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating the log")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let mut broker = Broker {
            kind,
            addr,
            pid: child.id(),
            child: Some(child),
            dir,
        };
        broker.wait_ready(Duration::from_secs(30))?;
        Ok(broker)
    }

    fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().context("waiting for the broker")?
            {
                self.child = None;
                bail!(
                    "{} exited at start ({status}):\n{}",
                    self.kind.name(),
                    self.log()
                );
            }
            if std::net::TcpStream::connect(self.addr).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{} not listening after {limit:?}", self.kind.name());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last 4 KiB of the broker's log.
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
        let start = (text.len().saturating_sub(4096)..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        text[start..].to_string()
    }

    /// `VmRSS` in KiB.
    pub fn rss_kb(&self) -> anyhow::Result<u64> {
        self.proc_field("status", "VmRSS:")
    }

    /// `write_bytes` of `/proc/<pid>/io`: bytes this process caused to be
    /// sent to the storage layer.
    pub fn write_bytes(&self) -> anyhow::Result<u64> {
        self.proc_field("io", "write_bytes:")
    }

    /// User plus system CPU time the broker has used, in clock ticks
    /// (`/proc/<pid>/stat` fields 14 and 15; USER_HZ is 100 on Linux).
    pub fn cpu_ticks(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/stat", self.pid);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // The fields after the command name, which is in parentheses.
        let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
        // fields[0] is field 3 (state): utime is field 14, stime 15.
        match (tick(11), tick(12)) {
            (Some(user), Some(system)) => Ok(user + system),
            _ => bail!("no utime/stime in {path}"),
        }
    }

    fn proc_field(&self, file: &str, name: &str) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/{file}", self.pid);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in {path}"))
    }

    /// SIGTERM, up to 10 s for a clean exit, then SIGKILL.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child);
        }
    }
}

/// SIGTERM to `child`, up to 10 s for a clean exit, then SIGKILL.
pub fn stop_child(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback address with a port that was free a moment ago.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding an ephemeral port")?;
    listener.local_addr().context("reading the ephemeral port")
}

/// The MQTT 5 twins of the helpers above, on `rumqttc::v5`.
pub mod v5 {
    use std::net::SocketAddr;
    use std::time::Duration;

    use rumqttc::v5::mqttbytes::v5::{ConnAck, Packet};
    use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};

    /// Options every MQTT 5 load client uses: clean start, a long
    /// keep-alive, at most `inflight` unacknowledged QoS 1/2 publishes (less
    /// if the server's receive maximum is lower), packets up to `payload`
    /// plus headers, and a connect that may take `timeout_secs`.
    pub fn options(
        client_id: String,
        addr: SocketAddr,
        inflight: u16,
        payload: usize,
        timeout_secs: u64,
    ) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        let max_packet = u32::try_from(payload + 1024).unwrap_or(u32::MAX);
        options
            .set_clean_start(true)
            .set_keep_alive(Duration::from_secs(60))
            .set_outgoing_inflight_upper_limit(inflight)
            .set_max_packet_size(Some(max_packet))
            .set_request_channel_capacity(usize::from(inflight) * 2)
            .set_connection_timeout(timeout_secs);
        let mut network = options.network_options();
        network.set_tcp_nodelay(true);
        options.set_network_options(network);
        options
    }

    /// A client and its event loop, after the CONNACK, which is returned
    /// (its properties carry the server's receive maximum).
    pub async fn connect(
        options: MqttOptions,
    ) -> anyhow::Result<(AsyncClient, EventLoop, ConnAck)> {
        let capacity = options.request_channel_capacity();
        let (client, mut eventloop) = AsyncClient::new(options, capacity);
        loop {
            if let Event::Incoming(Packet::ConnAck(connack)) = eventloop.poll().await? {
                return Ok((client, eventloop, connack));
            }
        }
    }

    /// Sends DISCONNECT and polls until it is written (or the connection ends).
    pub async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) {
        if client.disconnect().await.is_err() {
            return;
        }
        while let Ok(event) = eventloop.poll().await {
            if let Event::Outgoing(rumqttc::Outgoing::Disconnect) = event {
                break;
            }
        }
    }
}
