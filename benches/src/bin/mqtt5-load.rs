//! MQTT 5 publish load against any MQTT 5 broker, for side-by-side runs
//! (`PROTO=v5 benches/compare.sh`): the twin of `mqtt-load` on rumqttc's v5
//! client, with QoS 2 and without subscribers.
//!
//! Every publisher connects with clean start and a unique client id and
//! waits for its CONNACK; the clock starts when all are connected. Each then
//! publishes `--messages` messages on `load/<publisher>`:
//!
//! - QoS 1: the publisher is done when every PUBACK has arrived; a message's
//!   latency runs from the moment the client wrote the PUBLISH (rumqttc's
//!   `Outgoing::Publish`) to its PUBACK.
//! - QoS 2: done when every PUBCOMP has arrived; the latency runs from the
//!   PUBLISH written to its PUBCOMP (PUBREC and PUBREL included).
//! - QoS 0: nothing is acknowledged, so a publisher ends with one QoS 1
//!   "fence" message and waits for its PUBACK. A broker handles the packets
//!   of one connection in order, so the fence means every earlier message
//!   was taken by the broker. The fence is not counted.
//!
//! The window is `--inflight` unacknowledged QoS 1/2 publishes, or the
//! server's receive maximum if that is lower (printed as `receive_max`, the
//! lowest any CONNACK announced).
//!
//! Every PUBACK, PUBREC and PUBCOMP must carry a success reason code (0x00,
//! or 0x10 "no matching subscribers"). Any other is counted as an error and
//! fails the run. A PUBREC or PUBCOMP with a failure reason ends that
//! message's exchange, but rumqttc does not give its window slot back: a
//! publisher whose whole window is held that way stops at once (rather than
//! at the timeout), and the error says which acks failed.
//!
//! Output is one line of `key=value` pairs with the keys of `mqtt-load`
//! (`puback_p50_ms`/`puback_p99_ms` are the PUBCOMP latency at QoS 2, as
//! `ack=` says), so `compare.sh` parses both. A global timeout bounds the
//! run; hitting it is an error.

use std::collections::VecDeque;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use edge_benches::mqtt::percentile_ms;
use edge_benches::mqtt::v5::{connect, disconnect, options};
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PubCompReason, PubRecReason};
use rumqttc::v5::{Event, MqttOptions};
use tokio::sync::Barrier;

#[derive(Debug, Parser)]
#[command(about = "Publish load against an MQTT 5 broker; prints one result line")]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Concurrent publishers, one connection each.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Messages per publisher.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// 0, 1 or 2.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Unacknowledged QoS 1/2 publishes per connection (client side window;
    /// the server's receive maximum may lower it).
    #[arg(long, default_value_t = 64)]
    inflight: u16,
    /// Whole-run limit in seconds (connect included).
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Label printed first on the result line.
    #[arg(long, default_value = "")]
    label: String,
}

/// What one publisher measured.
#[derive(Debug, Default)]
struct Outcome {
    /// Messages the broker took (QoS 0: written before the fence's PUBACK).
    sent: usize,
    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) latencies in microseconds.
    latencies_us: Vec<u32>,
}

/// Acknowledgements with a failure reason code, across publishers (kept
/// outside the tasks so that a timeout can still report them).
#[derive(Debug, Default)]
struct Failures {
    count: AtomicUsize,
    first: OnceLock<String>,
}

impl Failures {
    fn record(&self, what: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let _ = self.first.set(what);
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// How many there were and the first, if any.
    fn summary(&self) -> Option<String> {
        match self.count() {
            0 => None,
            n => Some(format!(
                "{n} ack(s) had a failure reason code (first: {})",
                self.first.get().map(String::as_str).unwrap_or("?")
            )),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mqtt5-load: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mqtt5-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<String> {
    if args.publishers == 0 || args.messages == 0 || args.inflight == 0 {
        bail!("--publishers, --messages and --inflight must be at least 1");
    }
    let qos = qos_of(args.qos);
    let limit = Duration::from_secs(args.timeout);
    let addr = tokio::net::lookup_host((args.host.as_str(), args.port))
        .await?
        .next()
        .context("the host has no address")?;
    let payload = Bytes::from(vec![b'x'; args.payload]);
    // Publishers and the coordinator, which waits until all are connected.
    let connected = Arc::new(Barrier::new(args.publishers + 1));
    let failures = Arc::new(Failures::default());
    let receive_max = Arc::new(AtomicU16::new(u16::MAX));
    // The clock starts when the first task resumes from the barrier, before
    // any publisher sends.
    let started_at = Arc::new(OnceLock::new());
    let run_id = std::process::id();

    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..args.publishers {
        let options = options(
            format!("load5-{run_id}-{index}"),
            addr,
            args.inflight,
            args.payload,
            args.timeout,
        );
        let job = Job {
            index,
            messages: args.messages,
            qos,
            inflight: args.inflight,
            payload: payload.clone(),
            connected: Arc::clone(&connected),
            started_at: Arc::clone(&started_at),
            failures: Arc::clone(&failures),
            receive_max: Arc::clone(&receive_max),
        };
        tasks.spawn(job.run(options));
    }

    let outcome = tokio::time::timeout(limit, async {
        // A publisher that ends before everyone is connected has failed;
        // once all are, one may end before this task sees the barrier open.
        tokio::select! {
            biased;
            _ = connected.wait() => {}
            Some(joined) = tasks.join_next() => {
                joined.context("a publisher task failed")??;
                bail!("a publisher ended before all were connected");
            }
        }
        let started = *started_at.get_or_init(Instant::now);
        let mut total = Outcome::default();
        while let Some(joined) = tasks.join_next().await {
            let outcome = joined.context("a publisher task failed")??;
            total.sent += outcome.sent;
            total.latencies_us.extend(outcome.latencies_us);
        }
        Ok::<_, anyhow::Error>((started.elapsed(), total))
    })
    .await;
    let (elapsed, mut total) = match (outcome, failures.summary()) {
        (Ok(Ok(result)), None) => result,
        (Ok(Ok((_, total))), Some(failed)) => bail!("{} message(s) taken; {failed}", total.sent),
        (Ok(Err(e)), None) => return Err(e),
        (Ok(Err(e)), Some(failed)) => return Err(e.context(failed)),
        (Err(_), failed) => {
            tasks.abort_all();
            let failed = failed.map(|f| format!("; {f}")).unwrap_or_default();
            bail!("timed out after {} s{failed}", args.timeout);
        }
    };

    let secs = elapsed.as_secs_f64();
    let mut line = String::new();
    if !args.label.is_empty() {
        line.push_str(&format!("label={} ", args.label));
    }
    line.push_str(&format!(
        "protocol=5 qos={} publishers={} inflight={} receive_max={} payload={} messages={} \
         errors=0 seconds={:.3} msgs_per_s={:.0}",
        args.qos,
        args.publishers,
        args.inflight,
        receive_max.load(Ordering::Relaxed),
        args.payload,
        total.sent,
        secs,
        total.sent as f64 / secs
    ));
    if !total.latencies_us.is_empty() {
        total.latencies_us.sort_unstable();
        line.push_str(&format!(
            " ack={} puback_p50_ms={:.2} puback_p99_ms={:.2}",
            if qos == QoS::ExactlyOnce {
                "pubcomp"
            } else {
                "puback"
            },
            percentile_ms(&total.latencies_us, 0.50),
            percentile_ms(&total.latencies_us, 0.99)
        ));
    }
    Ok(line)
}

fn qos_of(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// The wire value of a PUBACK reason (rumqttc keeps its own mapping private).
fn puback_code(reason: PubAckReason) -> u8 {
    match reason {
        PubAckReason::Success => 0x00,
        PubAckReason::NoMatchingSubscribers => 0x10,
        PubAckReason::UnspecifiedError => 0x80,
        PubAckReason::ImplementationSpecificError => 0x83,
        PubAckReason::NotAuthorized => 0x87,
        PubAckReason::TopicNameInvalid => 0x90,
        PubAckReason::PacketIdentifierInUse => 0x91,
        PubAckReason::QuotaExceeded => 0x97,
        PubAckReason::PayloadFormatInvalid => 0x99,
    }
}

/// The wire value of a PUBREC reason.
fn pubrec_code(reason: PubRecReason) -> u8 {
    match reason {
        PubRecReason::Success => 0x00,
        PubRecReason::NoMatchingSubscribers => 0x10,
        PubRecReason::UnspecifiedError => 0x80,
        PubRecReason::ImplementationSpecificError => 0x83,
        PubRecReason::NotAuthorized => 0x87,
        PubRecReason::TopicNameInvalid => 0x90,
        PubRecReason::PacketIdentifierInUse => 0x91,
        PubRecReason::QuotaExceeded => 0x97,
        PubRecReason::PayloadFormatInvalid => 0x99,
    }
}

/// The wire value of a PUBCOMP reason.
fn pubcomp_code(reason: PubCompReason) -> u8 {
    match reason {
        PubCompReason::Success => 0x00,
        PubCompReason::PacketIdentifierNotFound => 0x92,
    }
}

/// The packet that ended a message's exchange.
#[derive(Debug, Clone, Copy)]
enum Ending {
    Acked,
    Received,
    Completed,
}

impl Ending {
    fn name(self) -> &'static str {
        match self {
            Ending::Acked => "PUBACK",
            Ending::Received => "PUBREC",
            Ending::Completed => "PUBCOMP",
        }
    }

    /// rumqttc frees the window slot of a failed PUBACK, not of a failed
    /// PUBREC or PUBCOMP.
    fn keeps_slot_on_failure(self) -> bool {
        !matches!(self, Ending::Acked)
    }
}

/// 0x00 (success) and 0x10 (no matching subscribers) are the successes.
fn succeeded(code: u8) -> bool {
    matches!(code, 0x00 | 0x10)
}

#[derive(Debug)]
struct Job {
    index: usize,
    messages: usize,
    qos: QoS,
    inflight: u16,
    payload: Bytes,
    connected: Arc<Barrier>,
    started_at: Arc<OnceLock<Instant>>,
    failures: Arc<Failures>,
    /// The lowest receive maximum announced in a CONNACK.
    receive_max: Arc<AtomicU16>,
}

impl Job {
    async fn run(self, options: MqttOptions) -> anyhow::Result<Outcome> {
        let (client, mut eventloop, connack) = connect(options)
            .await
            .with_context(|| format!("publisher {} could not connect", self.index))?;
        // No receive maximum in the CONNACK means 65,535.
        let announced = connack
            .properties
            .and_then(|p| p.receive_max)
            .unwrap_or(u16::MAX);
        self.receive_max.fetch_min(announced, Ordering::Relaxed);
        self.connected.wait().await;
        self.started_at.get_or_init(Instant::now);

        let topic = format!("load/{}", self.index);
        let producer = {
            let client = client.clone();
            let (qos, messages, payload) = (self.qos, self.messages, self.payload.clone());
            tokio::spawn(async move {
                for _ in 0..messages {
                    client
                        .publish_bytes(topic.as_str(), qos, false, payload.clone())
                        .await?;
                }
                if qos == QoS::AtMostOnce {
                    client
                        .publish_bytes(topic.as_str(), QoS::AtLeastOnce, false, payload)
                        .await?;
                }
                Ok::<_, rumqttc::v5::ClientError>(())
            })
        };

        let acks_needed = if self.qos == QoS::AtMostOnce {
            1
        } else {
            self.messages
        };
        let mut window = Window::new(self.inflight);
        // Window slots rumqttc keeps after a failed PUBREC or PUBCOMP.
        let (mut held, slots) = (0, self.inflight.min(announced));
        let mut outcome = Outcome {
            sent: 0,
            latencies_us: Vec::with_capacity(if self.qos == QoS::AtMostOnce {
                0
            } else {
                self.messages
            }),
        };
        let mut acks = 0;
        while acks < acks_needed {
            let event = eventloop
                .poll()
                .await
                .with_context(|| format!("publisher {} lost its connection", self.index))?;
            let (pkid, code, ending) = match event {
                Event::Outgoing(Outgoing::Publish(0)) => {
                    outcome.sent += 1;
                    continue;
                }
                Event::Outgoing(Outgoing::Publish(pkid)) => {
                    window.written(pkid);
                    continue;
                }
                Event::Incoming(Packet::PubAck(ack)) => {
                    (ack.pkid, puback_code(ack.reason), Ending::Acked)
                }
                Event::Incoming(Packet::PubRec(rec)) => {
                    let code = pubrec_code(rec.reason);
                    if succeeded(code) {
                        // The exchange goes on (rumqttc sends the PUBREL).
                        continue;
                    }
                    (rec.pkid, code, Ending::Received)
                }
                Event::Incoming(Packet::PubComp(comp)) => {
                    (comp.pkid, pubcomp_code(comp.reason), Ending::Completed)
                }
                _ => continue,
            };
            // This message's exchange is over, with `code`.
            acks += 1;
            let latency = window.acked(pkid);
            if !succeeded(code) {
                self.failures.record(format!(
                    "publisher {}: {} of packet id {pkid} with 0x{code:02x}",
                    self.index,
                    ending.name()
                ));
                held += u16::from(ending.keeps_slot_on_failure());
                if held >= slots && acks < acks_needed {
                    bail!(
                        "publisher {}: failed exchanges hold all {slots} slots of its window",
                        self.index
                    );
                }
            } else if self.qos != QoS::AtMostOnce {
                outcome.sent += 1;
                if let Some(us) = latency {
                    outcome.latencies_us.push(us);
                }
            }
        }
        producer
            .await
            .context("producer task panicked")?
            .context("client request channel closed")?;

        disconnect(&client, &mut eventloop).await;
        Ok(outcome)
    }
}

/// When each unacknowledged PUBLISH was written, by packet id. rumqttc
/// hands out ids 1..=window; at QoS 2 it may reuse an id once its PUBREC
/// arrived, before the PUBCOMP, so an id can have two messages in flight
/// (their acks come in order).
#[derive(Debug)]
struct Window {
    by_pkid: Vec<VecDeque<Instant>>,
}

impl Window {
    fn new(inflight: u16) -> Window {
        Window {
            by_pkid: vec![VecDeque::new(); usize::from(inflight) + 1],
        }
    }

    fn written(&mut self, pkid: u16) {
        if let Some(times) = self.by_pkid.get_mut(usize::from(pkid)) {
            times.push_back(Instant::now());
        }
    }

    /// The latency in microseconds of the oldest message in flight on
    /// `pkid`, which is now acknowledged.
    fn acked(&mut self, pkid: u16) -> Option<u32> {
        let at = self.by_pkid.get_mut(usize::from(pkid))?.pop_front()?;
        Some(u32::try_from(at.elapsed().as_micros()).unwrap_or(u32::MAX))
    }
}
