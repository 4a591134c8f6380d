//! MQTT publish load against any MQTT 3.1.1 broker, for side-by-side runs
//! (`benches/compare.sh`).
//!
//! Every publisher connects with a clean session and a unique client id and
//! waits for its CONNACK; the clock starts when all are connected. Each then
//! publishes `--messages` messages on `load/<publisher>`:
//!
//! - QoS 1: the publisher is done when every PUBACK has arrived. The PUBACK
//!   latency of a message runs from the moment the client wrote the PUBLISH
//!   (rumqttc's `Outgoing::Publish`) to its PUBACK.
//! - QoS 0: nothing is acknowledged, so a publisher ends with one QoS 1
//!   "fence" message and waits for its PUBACK. A broker handles the packets
//!   of one connection in order, so the fence means every earlier message
//!   was taken by the broker, not just written to the socket. The fence is
//!   not counted.
//!
//! With `--subscribers N`, N more clean-session clients subscribe to
//! `load/#` (at `--sub-qos`) before the clock starts, and each must receive
//! every message (QoS 1 deliveries are acknowledged by rumqttc as they
//! arrive). Payloads then carry the publish time in their first 8 bytes
//! (stamped just before the message is handed to the client), so each
//! delivery gives a publish-to-delivery latency; `deliveries_per_s` counts
//! from the start to the last delivery. A subscriber that hears nothing for
//! `--quiet` seconds after the publishers finished stops, and what it
//! missed is reported as `lost`.
//!
//! `--rate R` paces each publisher at R messages/s (for latency at a load
//! the broker keeps up with, rather than at saturation, where latency is
//! mostly time queued in the client's window).
//!
//! Output is one line of `key=value` pairs (easy to `grep`/`sed`). A global
//! timeout bounds the run; hitting it is an error.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use edge_benches::mqtt::{
    age_us, connect, disconnect, options, percentile_ms, stamped_payload, subscribe,
};
use rumqttc::{Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::Barrier;

#[derive(Debug, Parser)]
#[command(about = "Publish load against an MQTT 3.1.1 broker; prints one result line")]
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
    /// 0 or 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Unacknowledged QoS 1 publishes per connection (client side window).
    #[arg(long, default_value_t = 64)]
    inflight: u16,
    /// Whole-run limit in seconds (connect included).
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Clean-session subscribers to `load/#`, each receiving every message.
    #[arg(long, default_value_t = 0)]
    subscribers: usize,
    /// QoS of the subscriptions, 0 or 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    sub_qos: u8,
    /// Messages per second per publisher; 0 = as fast as the window allows.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Seconds a subscriber waits for more once the publishers are done.
    #[arg(long, default_value_t = 5)]
    quiet: u64,
    /// Label printed first on the result line.
    #[arg(long, default_value = "")]
    label: String,
}

/// What one subscriber measured.
#[derive(Debug, Default)]
struct Received {
    deliveries: usize,
    /// Since the clock started.
    last_at: Option<Duration>,
    /// Publish-to-delivery latencies in microseconds.
    latencies_us: Vec<u32>,
}

/// What one publisher measured.
#[derive(Debug, Default)]
struct Outcome {
    sent: usize,
    /// PUBACK latencies in microseconds (QoS 1 only).
    latencies_us: Vec<u32>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mqtt-load: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mqtt-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<String> {
    if args.publishers == 0 || args.messages == 0 || args.inflight == 0 {
        bail!("--publishers, --messages and --inflight must be at least 1");
    }
    if args.subscribers > 0 && args.payload < 8 {
        bail!("--payload must be at least 8 with --subscribers (it carries the publish time)");
    }
    let qos = qos_of(args.qos);
    let limit = Duration::from_secs(args.timeout);
    let addr = tokio::net::lookup_host((args.host.as_str(), args.port))
        .await?
        .next()
        .context("the host has no address")?;
    let payload = Bytes::from(vec![b'x'; args.payload]);
    // Publishers, subscribers and the coordinator, which reads the clock once
    // all are connected (and subscribed).
    let connected = Arc::new(Barrier::new(args.publishers + args.subscribers + 1));
    let run_id = std::process::id();
    let epoch = Instant::now();
    let publishers_done = Arc::new(tokio::sync::Notify::new());
    let started_at = Arc::new(std::sync::OnceLock::new());

    let mut subscribers = tokio::task::JoinSet::new();
    // A QoS 0 publisher's fence message reaches the subscribers too.
    let per_publisher = args.messages + usize::from(qos == QoS::AtMostOnce);
    for index in 0..args.subscribers {
        let options = options(
            format!("load-{run_id}-sub-{index}"),
            addr,
            true,
            args.inflight,
            args.payload,
        );
        let sub = Subscriber {
            index,
            expected: per_publisher * args.publishers,
            qos: qos_of(args.sub_qos),
            connected: Arc::clone(&connected),
            publishers_done: Arc::clone(&publishers_done),
            started_at: Arc::clone(&started_at),
            epoch,
            quiet: Duration::from_secs(args.quiet),
            timeout_secs: args.timeout,
        };
        subscribers.spawn(sub.run(options));
    }

    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..args.publishers {
        let options = options(
            format!("load-{run_id}-{index}"),
            addr,
            true,
            args.inflight,
            args.payload,
        );
        let job = Job {
            index,
            messages: args.messages,
            qos,
            payload: payload.clone(),
            stamp: (args.subscribers > 0).then_some(epoch),
            rate: args.rate,
            connected: Arc::clone(&connected),
            timeout_secs: args.timeout,
        };
        tasks.spawn(job.run(options));
    }

    let outcome = tokio::time::timeout(limit, async {
        // A publisher that ends before everyone is connected has failed.
        // Once all are, one may end before this task sees the barrier open.
        tokio::select! {
            biased;
            _ = connected.wait() => {}
            Some(joined) = tasks.join_next() => {
                joined.context("a publisher task failed")??;
                bail!("a publisher ended before all were connected");
            }
        }
        let started = Instant::now();
        let _ = started_at.set(started);
        let mut total = Outcome::default();
        while let Some(joined) = tasks.join_next().await {
            let outcome = joined.context("a publisher task failed")??;
            total.sent += outcome.sent;
            total.latencies_us.extend(outcome.latencies_us);
        }
        let elapsed = started.elapsed();
        publishers_done.notify_waiters();
        let mut received = Received::default();
        while let Some(joined) = subscribers.join_next().await {
            let r = joined.context("a subscriber task failed")??;
            received.deliveries += r.deliveries;
            received.last_at = received.last_at.max(r.last_at);
            received.latencies_us.extend(r.latencies_us);
        }
        Ok::<_, anyhow::Error>((elapsed, total, received))
    })
    .await;
    let (elapsed, mut total, mut received) = match outcome {
        Ok(result) => result?,
        Err(_) => {
            tasks.abort_all();
            subscribers.abort_all();
            bail!("timed out after {} s", args.timeout);
        }
    };

    let secs = elapsed.as_secs_f64();
    let mut line = String::new();
    if !args.label.is_empty() {
        line.push_str(&format!("label={} ", args.label));
    }
    line.push_str(&format!(
        "qos={} publishers={} subscribers={} inflight={} rate={} payload={} messages={} \
         seconds={:.3} msgs_per_s={:.0}",
        args.qos,
        args.publishers,
        args.subscribers,
        args.inflight,
        args.rate,
        args.payload,
        total.sent,
        secs,
        total.sent as f64 / secs
    ));
    if args.subscribers > 0 {
        let expected = per_publisher * args.publishers * args.subscribers;
        let until_last = received.last_at.unwrap_or(elapsed).as_secs_f64();
        received.latencies_us.sort_unstable();
        line.push_str(&format!(
            " sub_qos={} deliveries={} lost={} deliveries_per_s={:.0} delivery_p50_ms={:.2} \
             delivery_p99_ms={:.2}",
            args.sub_qos,
            received.deliveries,
            expected.saturating_sub(received.deliveries),
            received.deliveries as f64 / until_last,
            percentile_ms(&received.latencies_us, 0.50),
            percentile_ms(&received.latencies_us, 0.99)
        ));
    }
    if !total.latencies_us.is_empty() {
        total.latencies_us.sort_unstable();
        line.push_str(&format!(
            " puback_p50_ms={:.2} puback_p99_ms={:.2}",
            percentile_ms(&total.latencies_us, 0.50),
            percentile_ms(&total.latencies_us, 0.99)
        ));
    }
    Ok(line)
}

fn qos_of(level: u8) -> QoS {
    if level == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

#[derive(Debug)]
struct Subscriber {
    index: usize,
    expected: usize,
    qos: QoS,
    connected: Arc<Barrier>,
    publishers_done: Arc<tokio::sync::Notify>,
    started_at: Arc<std::sync::OnceLock<Instant>>,
    epoch: Instant,
    quiet: Duration,
    timeout_secs: u64,
}

impl Subscriber {
    async fn run(self, options: MqttOptions) -> anyhow::Result<Received> {
        let (client, mut eventloop) = connect(options, self.timeout_secs)
            .await
            .with_context(|| format!("subscriber {} could not connect", self.index))?;
        subscribe(&client, &mut eventloop, ["load/#".to_string()], self.qos)
            .await
            .with_context(|| format!("subscriber {} could not subscribe", self.index))?;
        self.connected.wait().await;
        let mut received = Received {
            latencies_us: Vec::with_capacity(self.expected),
            ..Received::default()
        };
        let done = self.publishers_done.notified();
        tokio::pin!(done);
        let mut finished = false;
        while received.deliveries < self.expected {
            let event = if finished {
                match tokio::time::timeout(self.quiet, eventloop.poll()).await {
                    Ok(event) => event,
                    Err(_) => break,
                }
            } else {
                tokio::select! {
                    event = eventloop.poll() => event,
                    () = &mut done => { finished = true; continue; }
                }
            };
            let event =
                event.with_context(|| format!("subscriber {} lost its connection", self.index))?;
            if let Event::Incoming(Packet::Publish(publish)) = event {
                received.deliveries += 1;
                received.last_at = self.started_at.get().map(Instant::elapsed);
                if let Some(us) = age_us(self.epoch, &publish.payload) {
                    received.latencies_us.push(us);
                }
            }
        }
        disconnect(&client, &mut eventloop).await;
        Ok(received)
    }
}

#[derive(Debug)]
struct Job {
    index: usize,
    messages: usize,
    qos: QoS,
    payload: Bytes,
    /// Stamp each payload with the publish time (from this epoch).
    stamp: Option<Instant>,
    /// Messages per second; 0 = unpaced.
    rate: u64,
    connected: Arc<Barrier>,
    timeout_secs: u64,
}

impl Job {
    async fn run(self, options: MqttOptions) -> anyhow::Result<Outcome> {
        // A broker that throttles a fast publisher (RabbitMQ's flow control)
        // can stall a flush for seconds: only the global timeout ends the run.
        let (client, mut eventloop) = connect(options, self.timeout_secs)
            .await
            .with_context(|| format!("publisher {} could not connect", self.index))?;
        self.connected.wait().await;

        let topic = format!("load/{}", self.index);
        let producer = {
            let client = client.clone();
            let topic = topic.clone();
            let (qos, messages, payload) = (self.qos, self.messages, self.payload.clone());
            let (stamp, rate) = (self.stamp, self.rate);
            tokio::spawn(async move {
                let start = tokio::time::Instant::now();
                for n in 0..messages {
                    if let Some(due) = (n as u64 * 1_000_000).checked_div(rate) {
                        tokio::time::sleep_until(start + Duration::from_micros(due)).await;
                    }
                    let payload = match stamp {
                        Some(epoch) => stamped_payload(epoch, payload.len()),
                        None => payload.clone(),
                    };
                    client
                        .publish_bytes(topic.as_str(), qos, false, payload)
                        .await?;
                }
                if qos == QoS::AtMostOnce {
                    client
                        .publish_bytes(topic.as_str(), QoS::AtLeastOnce, false, payload)
                        .await?;
                }
                Ok::<_, rumqttc::ClientError>(())
            })
        };

        // Send times by packet id; rumqttc reuses ids 1..=inflight.
        let mut sent_at: Vec<Option<Instant>> = vec![None; usize::from(u16::MAX) + 1];
        let acks_needed = if self.qos == QoS::AtLeastOnce {
            self.messages
        } else {
            1
        };
        let mut outcome = Outcome {
            sent: 0,
            latencies_us: Vec::with_capacity(if self.qos == QoS::AtLeastOnce {
                self.messages
            } else {
                0
            }),
        };
        let mut acks = 0;
        while acks < acks_needed {
            let event = eventloop
                .poll()
                .await
                .with_context(|| format!("publisher {} lost its connection", self.index))?;
            match event {
                Event::Outgoing(Outgoing::Publish(pkid)) => {
                    if pkid == 0 {
                        outcome.sent += 1;
                    } else {
                        sent_at[usize::from(pkid)] = Some(Instant::now());
                    }
                }
                Event::Incoming(Packet::PubAck(ack)) => {
                    acks += 1;
                    if self.qos == QoS::AtLeastOnce {
                        outcome.sent += 1;
                        if let Some(at) = sent_at[usize::from(ack.pkid)].take() {
                            let us = at.elapsed().as_micros();
                            outcome
                                .latencies_us
                                .push(u32::try_from(us).unwrap_or(u32::MAX));
                        }
                    }
                }
                _ => {}
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
