//! MQTT clients: rumqttc publishers that track every PUBACK, a rumqttc
//! subscriber, and thin wrappers around `mosquitto_pub` / `mosquitto_sub`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, Outgoing, Publish, QoS};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// Options for a client of the gateway at `addr`.
pub fn options(addr: SocketAddr, client_id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    o
}

/// What a publisher got done.
#[derive(Debug, Clone, Default)]
pub struct PublishReport {
    /// Indices (0-based, in publish order) whose PUBACK arrived.
    pub acked: Vec<u64>,
    /// Messages written to the socket.
    pub sent: u64,
    /// Why the publisher stopped early (connection refused, closed, ...).
    pub error: Option<String>,
}

impl PublishReport {
    pub fn all_acked(&self, count: u64) -> bool {
        self.acked.len() as u64 == count && self.error.is_none()
    }
}

/// A QoS 1 (or 2) publisher that numbers its messages and records which
/// PUBACKs (PUBCOMPs) arrived: message `i` is `make(i)` = (topic, payload).
#[derive(Debug, Clone)]
pub struct Publisher {
    addr: SocketAddr,
    client_id: String,
    qos: QoS,
    inflight: u16,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
}

impl Publisher {
    pub fn new(addr: SocketAddr, client_id: &str) -> Publisher {
        Publisher {
            addr,
            client_id: client_id.to_string(),
            qos: QoS::AtLeastOnce,
            inflight: 100,
            stop: Arc::new(AtomicBool::new(false)),
            acked: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Publishes at QoS 2 instead: a message counts as acknowledged at its
    /// PUBCOMP.
    pub fn exactly_once(mut self) -> Publisher {
        self.qos = QoS::ExactlyOnce;
        self
    }

    /// Most unacknowledged publishes in flight.
    pub fn inflight(mut self, n: u16) -> Publisher {
        self.inflight = n;
        self
    }

    /// A flag that, once set, stops sending new messages; those in flight
    /// still get their PUBACKs awaited.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// PUBACKs received so far (live, while `run` is going).
    pub fn acked_counter(&self) -> Arc<AtomicU64> {
        self.acked.clone()
    }

    /// Publishes `count` messages in order and waits for their PUBACKs
    /// (PUBCOMPs at QoS 2), for at most `timeout`. Never fails: a connection error ends
    /// the run and is recorded in the report, with what was acked before.
    pub async fn run<F>(&self, count: u64, timeout: Duration, make: F) -> PublishReport
    where
        F: Fn(u64) -> (String, Vec<u8>) + Send + 'static,
    {
        let mut opts = options(self.addr, &self.client_id);
        opts.set_inflight(self.inflight);
        let (client, eventloop) = AsyncClient::new(opts, 64);
        let enqueued = Arc::new(AtomicU64::new(0));
        let done_sending = Arc::new(AtomicBool::new(false));
        let sender = {
            let client = client.clone();
            let enqueued = enqueued.clone();
            let done = done_sending.clone();
            let stop = self.stop.clone();
            let qos = self.qos;
            tokio::spawn(async move {
                for i in 0..count {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (topic, payload) = make(i);
                    if client.publish(topic, qos, false, payload).await.is_err() {
                        break;
                    }
                    enqueued.fetch_add(1, Ordering::Relaxed);
                }
                done.store(true, Ordering::Release);
            })
        };
        let report = drive(
            eventloop,
            count,
            timeout,
            &enqueued,
            &done_sending,
            &self.acked,
        )
        .await;
        sender.abort();
        let _ = client.try_disconnect();
        report
    }
}

async fn drive(
    mut eventloop: EventLoop,
    count: u64,
    timeout: Duration,
    enqueued: &AtomicU64,
    done_sending: &AtomicBool,
    acked: &AtomicU64,
) -> PublishReport {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut report = PublishReport::default();
    let mut in_flight: HashMap<u16, u64> = HashMap::new();
    loop {
        if report.acked.len() as u64 == count {
            return report;
        }
        if done_sending.load(Ordering::Acquire)
            && report.acked.len() as u64 == enqueued.load(Ordering::Relaxed)
            && in_flight.is_empty()
        {
            return report;
        }
        // Wake up now and then to notice a stop without traffic.
        let tick = tokio::time::Instant::now() + Duration::from_millis(100);
        match tokio::time::timeout_at(tick.min(deadline), eventloop.poll()).await {
            Err(_) if tokio::time::Instant::now() >= deadline => {
                report.error = Some(format!(
                    "timed out after {timeout:?}: {} of {count} acked, {} in flight",
                    report.acked.len(),
                    in_flight.len()
                ));
                return report;
            }
            Err(_) => {}
            Ok(Err(e)) => {
                report.error = Some(format!("connection error: {e}"));
                return report;
            }
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                in_flight.insert(pkid, report.sent);
                report.sent += 1;
            }
            Ok(Ok(Event::Incoming(
                Incoming::PubAck(rumqttc::PubAck { pkid })
                | Incoming::PubComp(rumqttc::PubComp { pkid }),
            ))) => {
                if let Some(i) = in_flight.remove(&pkid) {
                    report.acked.push(i);
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// A rumqttc subscriber fed by a background task.
#[derive(Debug)]
pub struct MqttSubscriber {
    client: AsyncClient,
    rx: mpsc::Receiver<Result<Publish, String>>,
    task: tokio::task::JoinHandle<()>,
    granted: Vec<rumqttc::SubscribeReasonCode>,
}

impl MqttSubscriber {
    /// Connects, subscribes to every filter at QoS 1 and waits for the
    /// SUBACK.
    pub async fn connect(addr: SocketAddr, client_id: &str, filters: &[&str]) -> Result<Self> {
        let filters: Vec<(&str, QoS)> = filters.iter().map(|f| (*f, QoS::AtLeastOnce)).collect();
        Self::connect_with(addr, client_id, &filters).await
    }

    /// Connects, subscribes to every filter at its QoS in one SUBSCRIBE and
    /// waits for the SUBACK; fails if any filter is refused.
    pub async fn connect_with(
        addr: SocketAddr,
        client_id: &str,
        filters: &[(&str, QoS)],
    ) -> Result<Self> {
        let (client, mut eventloop) = AsyncClient::new(options(addr, client_id), 64);
        client
            .subscribe_many(
                filters
                    .iter()
                    .map(|(f, qos)| rumqttc::SubscribeFilter::new(f.to_string(), *qos)),
            )
            .await?;
        let wait_suback = async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::SubAck(ack))) => return Ok(ack),
                    Ok(_) => {}
                    Err(e) => return Err(anyhow!("subscriber {client_id}: {e}")),
                }
            }
        };
        let ack = tokio::time::timeout(Duration::from_secs(10), wait_suback)
            .await
            .map_err(|_| anyhow!("no SUBACK for {client_id} within 10s"))??;
        if ack
            .return_codes
            .iter()
            .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
        {
            bail!("subscription refused: {ack:?}");
        }
        let (tx, rx) = mpsc::channel(10_000);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        if tx.send(Ok(p)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string())).await;
                        return;
                    }
                }
            }
        });
        Ok(MqttSubscriber {
            client,
            rx,
            task,
            granted: ack.return_codes,
        })
    }

    /// The SUBACK's return codes, one per filter.
    pub fn granted(&self) -> &[rumqttc::SubscribeReasonCode] {
        &self.granted
    }

    /// The next PUBLISH, or an error after `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Publish> {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Err(_) => bail!("no PUBLISH within {timeout:?}"),
            Ok(None) => bail!("subscriber task ended"),
            Ok(Some(Err(e))) => bail!("subscriber connection: {e}"),
            Ok(Some(Ok(p))) => Ok(p),
        }
    }

    pub fn client(&self) -> &AsyncClient {
        &self.client
    }
}

impl Drop for MqttSubscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Publishes one QoS 1 message and awaits its PUBACK.
pub async fn publish_one(addr: SocketAddr, topic: &str, payload: &[u8]) -> Result<()> {
    let topic = topic.to_string();
    let payload = payload.to_vec();
    let report = Publisher::new(addr, &crate::unique("pub1"))
        .run(1, Duration::from_secs(10), move |_| {
            (topic.clone(), payload.clone())
        })
        .await;
    if !report.all_acked(1) {
        bail!("publish not acknowledged: {report:?}");
    }
    Ok(())
}

/// `mosquitto_pub -h 127.0.0.1 -p PORT -q QOS -t TOPIC -m MESSAGE`; fails
/// unless it exits 0 within 10 s.
pub async fn mosquitto_pub(port: u16, topic: &str, message: &str, qos: u8) -> Result<()> {
    mosquitto_pub_with(port, topic, message, qos, &[]).await
}

/// [`mosquitto_pub`] with more arguments (`-V mqttv31`, `--will-topic`, ...).
pub async fn mosquitto_pub_with(
    port: u16,
    topic: &str,
    message: &str,
    qos: u8,
    extra: &[&str],
) -> Result<()> {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-q", &qos.to_string(), "-t", topic, "-m", message])
        .args(["-i", &crate::unique("mqpub")])
        .args(extra)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(10), cmd.output())
        .await
        .map_err(|_| anyhow!("mosquitto_pub did not finish within 10s"))?
        .context("running mosquitto_pub")?;
    if !out.status.success() {
        bail!(
            "mosquitto_pub failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A running `mosquitto_sub`, subscribed (its SUBACK seen) before
/// [`MosquittoSub::start`] returns.
#[derive(Debug)]
pub struct MosquittoSub {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

const MSG_PREFIX: &str = "MSG\t";

impl MosquittoSub {
    pub async fn start(port: u16, filters: &[&str]) -> Result<MosquittoSub> {
        Self::start_with(port, filters, &[]).await
    }

    /// [`MosquittoSub::start`] with more arguments (`--will-topic`, `-V`, ...).
    pub async fn start_with(port: u16, filters: &[&str], extra: &[&str]) -> Result<MosquittoSub> {
        // mosquitto_sub block-buffers a piped stdout: ask for lines. stdbuf
        // execs mosquitto_sub, so the child's pid is mosquitto_sub's.
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", "mosquitto_sub"])
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-d"])
            .args(["-i", &crate::unique("mqsub")])
            .args(["-F", "MSG\t%t\t%p"])
            .args(extra);
        for f in filters {
            cmd.args(["-t", f]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("spawning mosquitto_sub")?;
        let stdout = child.stdout.take().context("mosquitto_sub stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = tokio::time::timeout(left, lines.next_line())
                .await
                .map_err(|_| anyhow!("mosquitto_sub saw no SUBACK within 10s"))??
                .ok_or_else(|| anyhow!("mosquitto_sub exited before its SUBACK"))?;
            if line.contains("received SUBACK") {
                break;
            }
        }
        Ok(MosquittoSub { child, lines })
    }

    /// The next message as (topic, payload), or an error after `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Result<(String, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = tokio::time::timeout(left, self.lines.next_line())
                .await
                .map_err(|_| anyhow!("mosquitto_sub received nothing within {timeout:?}"))??
                .ok_or_else(|| anyhow!("mosquitto_sub exited"))?;
            if let Some(rest) = line.strip_prefix(MSG_PREFIX) {
                let (topic, payload) = rest.split_once('\t').unwrap_or((rest, ""));
                return Ok((topic.to_string(), payload.to_string()));
            }
        }
    }

    /// The process id of mosquitto_sub.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits (bounded) for mosquitto_sub to exit, however it was ended.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .map_err(|_| anyhow!("mosquitto_sub still running after {timeout:?}"))?
            .context("waiting for mosquitto_sub")
    }

    /// Kills it (SIGKILL) and reaps it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
