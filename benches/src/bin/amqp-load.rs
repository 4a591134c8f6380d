//! AMQP 0-9-1 loads for the issue 8 figures (`benches/amqp-figures.sh`),
//! through lapin, against any broker (edge-gateway or RabbitMQ) at `--uri`.
//! Prints one `key=value` result line.
//!
//! - `publish`: `--publishers` connections, one channel each in confirm
//!   mode, publish persistent messages (delivery_mode 2) through the default
//!   exchange into the durable queue `--queue` (declared durable and purged
//!   first; nobody consumes), each keeping up to `--window` unconfirmed.
//!   Runs `--seconds` (or until `--count` in total are confirmed);
//!   msgs/s = confirmed / elapsed. `--shape` says what each publish carries
//!   besides its body (issue 9's drain gap: which part of the gateway's
//!   publish costs RabbitMQ):
//!   - `plain` (default): delivery_mode 2 and nothing else;
//!   - `mandatory`: `plain` with the `mandatory` flag;
//!   - `ids`: `plain` with `message_id` "gw-0123456789abcdef:<n>" (n counts
//!     up per publisher from 1234567), `app_id` "gw-0123456789abcdef" and a
//!     timestamp (now, in seconds), as the gateway sets them;
//!   - `headers`: `ids` with the gateway's three headers:
//!     `x-gateway-message-id` (the `message_id`), `x-mqtt-topic` "load/3",
//!     `x-publisher` "mqtt-load-3", all long strings;
//!   - `gateway`: `headers` with `mandatory`: what the gateway's forwarder
//!     sends for a bulk-route message (`adapters/upstream/src/convert.rs`,
//!     `to_publish`);
//!   - `topic`: `ids` with only `x-mqtt-topic` of the three headers;
//!   - `topic-publisher`: `ids` with `x-mqtt-topic` and `x-publisher` (the
//!     three headers less `x-gateway-message-id`, which repeats `message_id`);
//!   - `gateway-lean`: `topic-publisher` with `mandatory`: what the gateway
//!     would send without the redundant `x-gateway-message-id`;
//!   - `one-header`: `ids` with a single header `h`, the long string "x":
//!     whether it is the table's existence or its size that costs.
//!
//!   Every header value is a long string, with the same values in every
//!   shape that sends that header.
//! - `consume`: fills the durable queue with `--fill` persistent confirmed
//!   messages (not timed), then one consumer with manual ack and
//!   `basic.qos(--prefetch)` acknowledges each delivery until it has them
//!   all; msgs/s from `basic.consume` to the last ack.
//! - `idle`: `VmRSS` of `--pid` before and after `--connections` connections
//!   that each opened one channel and stay idle; KiB per connection.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

#[derive(Debug, Parser)]
#[command(about = "AMQP 0-9-1 loads: confirmed persistent publish, manual-ack consume, idle RSS")]
struct Args {
    /// Broker URI.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    uri: String,
    /// The durable queue used.
    #[arg(long, default_value = "bench")]
    queue: String,
    /// Payload bytes of every message.
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Bound on the whole run, in seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    #[command(subcommand)]
    mode: Mode,
}

/// What a publish carries besides its body (the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Shape {
    Plain,
    Mandatory,
    Ids,
    Headers,
    Gateway,
    Topic,
    TopicPublisher,
    GatewayLean,
    OneHeader,
}

/// The gateway id every shape but `plain` and `mandatory` uses (about as
/// long as a generated one, e.g. "raspberrypi-3fa9c1d0").
const GATEWAY_ID: &str = "gw-0123456789abcdef";

impl Shape {
    fn mandatory(self) -> bool {
        matches!(self, Shape::Mandatory | Shape::Gateway | Shape::GatewayLean)
    }

    /// The properties of the publish numbered `n`.
    fn properties(self, n: u64) -> BasicProperties {
        let plain = BasicProperties::default().with_delivery_mode(2);
        if matches!(self, Shape::Plain | Shape::Mandatory) {
            return plain;
        }
        let id = format!("{GATEWAY_ID}:{n}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut properties = plain
            .with_timestamp(now)
            .with_app_id(ShortString::from(GATEWAY_ID));
        if let Some(headers) = self.headers(&id) {
            properties = properties.with_headers(headers);
        }
        properties.with_message_id(ShortString::from(id))
    }

    /// The header table of a publish whose `message_id` is `id`; `None` for
    /// the shapes that send no table (`plain`, `mandatory`, `ids`).
    fn headers(self, id: &str) -> Option<FieldTable> {
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes()));
        let mut headers = FieldTable::default();
        // Which of the gateway's three headers: (x-gateway-message-id,
        // x-publisher); x-mqtt-topic is in every shape that has them.
        let (message_id, publisher) = match self {
            Shape::Plain | Shape::Mandatory | Shape::Ids => return None,
            Shape::OneHeader => {
                headers.insert(ShortString::from("h"), text("x"));
                return Some(headers);
            }
            Shape::Topic => (false, false),
            Shape::TopicPublisher | Shape::GatewayLean => (false, true),
            Shape::Headers | Shape::Gateway => (true, true),
        };
        if message_id {
            headers.insert(ShortString::from("x-gateway-message-id"), text(id));
        }
        headers.insert(ShortString::from("x-mqtt-topic"), text("load/3"));
        if publisher {
            headers.insert(ShortString::from("x-publisher"), text("mqtt-load-3"));
        }
        Some(headers)
    }
}

#[derive(Debug, Subcommand)]
enum Mode {
    Publish {
        #[arg(long, default_value_t = 1)]
        publishers: usize,
        /// Unconfirmed publishes per publisher.
        #[arg(long, default_value_t = 100)]
        window: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Stop after this many confirmed (in total) instead.
        #[arg(long)]
        count: Option<usize>,
        /// What each publish carries besides its body (the module doc).
        #[arg(long, value_enum, default_value_t = Shape::Plain)]
        shape: Shape,
    },
    Consume {
        #[arg(long, default_value_t = 50_000)]
        fill: usize,
        #[arg(long, default_value_t = 1000)]
        prefetch: u16,
    },
    Idle {
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// The broker's process (for RabbitMQ the node's beam.smp).
        #[arg(long)]
        pid: u32,
        /// Seconds to let the RSS settle before each reading.
        #[arg(long, default_value_t = 3.0)]
        settle: f64,
    },
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("amqp-load: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let limit = Duration::from_secs(args.timeout);
    match runtime.block_on(async { tokio::time::timeout(limit, run(args)).await }) {
        Ok(Ok(line)) => {
            println!("{line}");
            std::process::ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("amqp-load: {e:#}");
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("amqp-load: timed out after {limit:?}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<String> {
    match args.mode {
        Mode::Publish {
            publishers,
            window,
            seconds,
            count,
            shape,
        } => {
            declare(&args.uri, &args.queue, true).await?;
            let (confirmed, elapsed) = publish(
                &args.uri,
                &args.queue,
                args.payload,
                publishers,
                window,
                Duration::from_secs_f64(seconds),
                count,
                shape,
            )
            .await?;
            Ok(format!(
                "mode=publish shape={} publishers={publishers} window={window} \
                 confirmed={confirmed} seconds={:.3} msgs_per_s={:.0}",
                shape
                    .to_possible_value()
                    .map_or_else(String::new, |v| v.get_name().to_string()),
                elapsed.as_secs_f64(),
                confirmed as f64 / elapsed.as_secs_f64()
            ))
        }
        Mode::Consume { fill, prefetch } => {
            declare(&args.uri, &args.queue, true).await?;
            let (filled, _) = publish(
                &args.uri,
                &args.queue,
                args.payload,
                1,
                1000,
                Duration::from_secs(args.timeout),
                Some(fill),
                Shape::Plain,
            )
            .await?;
            if filled < fill {
                bail!("filled {filled} of {fill}");
            }
            let depth = declare(&args.uri, &args.queue, false).await?;
            if (depth as usize) < fill {
                bail!("the queue holds {depth} after filling {fill}");
            }
            let (consumed, elapsed) = consume(&args.uri, &args.queue, prefetch, fill).await?;
            Ok(format!(
                "mode=consume prefetch={prefetch} depth={depth} consumed={consumed} \
                 seconds={:.3} msgs_per_s={:.0}",
                elapsed.as_secs_f64(),
                consumed as f64 / elapsed.as_secs_f64()
            ))
        }
        Mode::Idle {
            connections,
            pid,
            settle,
        } => idle(&args.uri, connections, pid, Duration::from_secs_f64(settle)).await,
    }
}

async fn connect(uri: &str) -> anyhow::Result<Connection> {
    Connection::connect(uri, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to {uri}"))
}

/// Declares the durable queue (purging it if `purge`); returns its depth.
async fn declare(uri: &str, queue: &str, purge: bool) -> anyhow::Result<u32> {
    let conn = connect(uri).await?;
    let channel = conn.create_channel().await?;
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring {queue}"))?;
    let depth = q.message_count();
    if purge {
        channel
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await
            .with_context(|| format!("purging {queue}"))?;
    }
    conn.close(200, "declared".into()).await?;
    Ok(depth)
}

#[allow(clippy::too_many_arguments)]
async fn publish(
    uri: &str,
    queue: &str,
    payload: usize,
    publishers: usize,
    window: usize,
    duration: Duration,
    count: Option<usize>,
    shape: Shape,
) -> anyhow::Result<(usize, Duration)> {
    let mut channels = Vec::with_capacity(publishers);
    for _ in 0..publishers {
        let conn = connect(uri).await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channels.push((conn, channel));
    }
    let per = count.map(|c| c.div_ceil(publishers));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (_, channel) in &channels {
        let channel = channel.clone();
        let queue = queue.to_string();
        tasks.spawn(async move {
            publisher(channel, queue, payload, window, deadline, per, shape).await
        });
    }
    let mut confirmed = 0;
    while let Some(result) = tasks.join_next().await {
        confirmed += result.context("publisher task")??;
    }
    let elapsed = start.elapsed();
    for (conn, _) in channels {
        let _ = conn.close(200, "done".into()).await;
    }
    Ok((confirmed, elapsed))
}

/// One publisher: up to `window` unconfirmed, until `deadline` or `count`;
/// returns how many were acked (a nack is an error).
async fn publisher(
    channel: Channel,
    queue: String,
    payload: usize,
    window: usize,
    deadline: Instant,
    count: Option<usize>,
    shape: Shape,
) -> anyhow::Result<usize> {
    let body = vec![b'x'; payload];
    let options = BasicPublishOptions {
        mandatory: shape.mandatory(),
        immediate: false,
    };
    let mut pending = FuturesUnordered::new();
    let mut sent = 0;
    let mut acked = 0;
    loop {
        let more = Instant::now() < deadline && count.is_none_or(|c| sent < c);
        if more && pending.len() < window {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    options,
                    &body,
                    shape.properties(1_234_567 + sent as u64),
                )
                .await?;
            pending.push(confirm);
            sent += 1;
            continue;
        }
        match pending.next().await {
            None => return Ok(acked),
            Some(confirmation) => {
                let confirmation = confirmation?;
                if !confirmation.is_ack() {
                    bail!("broker nacked a publish: {confirmation:?}");
                }
                acked += 1;
            }
        }
    }
}

async fn consume(
    uri: &str,
    queue: &str,
    prefetch: u16,
    want: usize,
) -> anyhow::Result<(usize, Duration)> {
    let conn = connect(uri).await?;
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let start = Instant::now();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "bench-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumed = 0;
    while consumed < want {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .map_err(|_| anyhow!("no delivery for 10 s after {consumed}"))?
            .ok_or_else(|| anyhow!("the consumer ended after {consumed}"))??;
        delivery.ack(BasicAckOptions::default()).await?;
        consumed += 1;
    }
    let elapsed = start.elapsed();
    let _ = conn.close(200, "done".into()).await;
    Ok((consumed, elapsed))
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

async fn idle(uri: &str, connections: usize, pid: u32, settle: Duration) -> anyhow::Result<String> {
    tokio::time::sleep(settle).await;
    let before = rss_kib(pid)?;
    let mut held = Vec::with_capacity(connections);
    for _ in 0..connections {
        let conn = connect(uri).await?;
        let channel = conn.create_channel().await?;
        held.push((conn, channel));
    }
    tokio::time::sleep(settle).await;
    let after = rss_kib(pid)?;
    for (conn, _) in held {
        let _ = conn.close(200, "done".into()).await;
    }
    Ok(format!(
        "mode=idle connections={connections} rss_before_kib={before} rss_after_kib={after} \
         kib_per_conn={:.2}",
        (after as f64 - before as f64) / connections as f64
    ))
}
