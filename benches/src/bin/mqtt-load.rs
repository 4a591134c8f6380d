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
//! Output is one line of `key=value` pairs (easy to `grep`/`sed`). A global
//! timeout bounds the run; hitting it is an error.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
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
    /// Label printed first on the result line.
    #[arg(long, default_value = "")]
    label: String,
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
    let qos = if args.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let limit = Duration::from_secs(args.timeout);
    let payload = Bytes::from(vec![b'x'; args.payload]);
    // Publishers plus the coordinator, which reads the clock once all are connected.
    let connected = Arc::new(Barrier::new(args.publishers + 1));
    let run_id = std::process::id();

    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..args.publishers {
        let mut options = MqttOptions::new(
            format!("load-{run_id}-{index}"),
            args.host.clone(),
            args.port,
        );
        options
            .set_clean_session(true)
            .set_keep_alive(Duration::from_secs(60))
            .set_inflight(args.inflight)
            .set_max_packet_size(args.payload + 1024, args.payload + 1024)
            .set_request_channel_capacity(usize::from(args.inflight) * 2);
        let job = Job {
            index,
            messages: args.messages,
            qos,
            payload: payload.clone(),
            connected: Arc::clone(&connected),
            timeout_secs: args.timeout,
        };
        tasks.spawn(job.run(options));
    }

    let outcome = tokio::time::timeout(limit, async {
        // A publisher that ends before everyone is connected has failed.
        tokio::select! {
            _ = connected.wait() => {}
            Some(joined) = tasks.join_next() => {
                joined.context("a publisher task failed")??;
                bail!("a publisher ended before all were connected");
            }
        }
        let started = Instant::now();
        let mut total = Outcome::default();
        while let Some(joined) = tasks.join_next().await {
            let outcome = joined.context("a publisher task failed")??;
            total.sent += outcome.sent;
            total.latencies_us.extend(outcome.latencies_us);
        }
        Ok::<_, anyhow::Error>((started.elapsed(), total))
    })
    .await;
    let (elapsed, mut total) = match outcome {
        Ok(result) => result?,
        Err(_) => {
            tasks.abort_all();
            bail!("timed out after {} s", args.timeout);
        }
    };

    let secs = elapsed.as_secs_f64();
    let mut line = String::new();
    if !args.label.is_empty() {
        line.push_str(&format!("label={} ", args.label));
    }
    line.push_str(&format!(
        "qos={} publishers={} payload={} messages={} seconds={:.3} msgs_per_s={:.0}",
        args.qos,
        args.publishers,
        args.payload,
        total.sent,
        secs,
        total.sent as f64 / secs
    ));
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

/// `sorted` must be non-empty and ascending.
fn percentile_ms(sorted: &[u32], q: f64) -> f64 {
    let rank = ((sorted.len() - 1) as f64 * q).round() as usize;
    f64::from(sorted[rank.min(sorted.len() - 1)]) / 1000.0
}

#[derive(Debug)]
struct Job {
    index: usize,
    messages: usize,
    qos: QoS,
    payload: Bytes,
    connected: Arc<Barrier>,
    timeout_secs: u64,
}

impl Job {
    async fn run(self, options: MqttOptions) -> anyhow::Result<Outcome> {
        let capacity = options.request_channel_capacity();
        let (client, mut eventloop) = AsyncClient::new(options, capacity);
        // A broker that throttles a fast publisher (RabbitMQ's flow control)
        // can stall a flush for seconds: only the global timeout ends the run.
        let mut network = eventloop.network_options();
        network.set_connection_timeout(self.timeout_secs);
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        wait_connack(&mut eventloop)
            .await
            .with_context(|| format!("publisher {} could not connect", self.index))?;
        self.connected.wait().await;

        let topic = format!("load/{}", self.index);
        let producer = {
            let client = client.clone();
            let topic = topic.clone();
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

        client.disconnect().await.ok();
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        Ok(outcome)
    }
}

async fn wait_connack(eventloop: &mut EventLoop) -> anyhow::Result<()> {
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
            return Ok(());
        }
    }
}
