//! Forwards records from a store in a temporary directory to a RabbitMQ
//! node and checks, with a lapin consumer, that every one arrives in order
//! with its message id.
//!
//! ```text
//! AMQP_URI=amqp://guest:guest@127.0.0.1:5699/%2f \
//!   cargo run -p edge-upstream --example forward -- [COUNT] [APPEND_INTERVAL_MS]
//! ```
//!
//! With an append interval the run lasts long enough to stop and start the
//! broker by hand in the middle; the forwarder resumes from its cursor and
//! the consumer reconnects. Every 100th record goes to a topic no route
//! matches (skipped) and every 250th to a route with no binding (parked).

use std::collections::BTreeSet;
use std::num::NonZeroUsize;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use edge_config::UpstreamConfig;
use edge_core::{Message, QoS, Route, Routes, Value};
use edge_store::{Seq, Store, StoreOptions};
use edge_upstream::Replicator;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const QUEUE: &str = "edge-forward-example";
const GATEWAY: &str = "gw-example";

fn topic_of(i: u64) -> String {
    if matches!(i % 100, 0) {
        format!("other/{i}")
    } else if i % 250 == 125 {
        format!("lost/{i}")
    } else {
        format!("sensors/{}/temp", i % 7)
    }
}

fn forwarded(i: u64) -> bool {
    !(matches!(i % 100, 0) || i % 250 == 125)
}

/// Consumes the queue until cancelled, reconnecting while the broker is away;
/// sends the seq of every message id it sees.
async fn consume(uri: String, tx: mpsc::UnboundedSender<Seq>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let result: anyhow::Result<()> = async {
            let conn = Connection::connect(&uri, ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            let mut consumer = ch
                .basic_consume(
                    QUEUE.into(),
                    "forward-example".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            loop {
                let delivery = tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    d = consumer.next() => d.context("consumer ended")??,
                };
                let id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .context("message without message_id")?
                    .to_string();
                let seq: Seq = id
                    .strip_prefix(&format!("{GATEWAY}:"))
                    .context("foreign message id")?
                    .parse()?;
                delivery.ack(BasicAckOptions::default()).await?;
                let _ = tx.send(seq);
            }
        }
        .await;
        if let Err(e) = result {
            eprintln!("consumer: {e}; reconnecting");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,lapin=error".into()),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let count: u64 = args.next().map_or(Ok(10_000), |a| a.parse())?;
    let interval = Duration::from_millis(args.next().map_or(Ok(0), |a| a.parse())?);
    let uri = std::env::var("AMQP_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5699/%2f".into());

    // The queue the route's messages land in.
    let conn = Connection::connect(&uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(QUEUE.into(), durable, FieldTable::default())
        .await?;
    ch.queue_bind(
        QUEUE.into(),
        "amq.topic".into(),
        "edge.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.queue_purge(QUEUE.into(), QueuePurgeOptions::default())
        .await?;
    conn.close(200, "setup done".into()).await?;

    let dir = tempfile::tempdir()?;
    let store = Store::open(
        dir.path(),
        StoreOptions {
            max_bytes: 1 << 30,
            batch_max_messages: NonZeroUsize::new(512).context("non-zero")?,
            batch_max_bytes: NonZeroUsize::new(4 << 20).context("non-zero")?,
            inbox_capacity: NonZeroUsize::new(4096).context("non-zero")?,
            cursors: vec!["central".into()],
            retire_without_cursors: false,
            when_full: Default::default(),
            min_free: 0,
            max_age: None,
        },
    )?;
    let config = UpstreamConfig {
        name: "central".into(),
        uris: vec!["amqp://guest:guest@127.0.0.1:1/%2f".into(), uri.clone()],
        max_in_flight: NonZeroUsize::new(256).context("non-zero")?,
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(2),
        confirm_timeout: Duration::from_secs(10),
        tls: Default::default(),
        return_to_first: false,
        max_replay_rate: None,
    };
    let route = |name: &str, filter: &str, key: &str| {
        Route::new(edge_config::RouteConfig {
            name: name.into(),
            filter: filter.into(),
            local: None,
            upstream: "central".into(),
            exchange: "amq.topic".into(),
            routing_key: key.into(),
            priority: 0,
            ttl: Some(Duration::from_secs(3600)),
            persistent: true,
            ack: edge_config::AckPoint::Persisted,
            declare_exchange: None,
        })
    };
    let routes = Routes::new(vec![
        route("telemetry", "sensors/#", "edge.{topic}"),
        route("lost", "lost/#", "nowhere.{topic}"),
    ]);

    let shutdown = CancellationToken::new();
    let replicator = Replicator::new(config, routes, store.clone(), GATEWAY.into());
    let link = replicator.link();
    let forwarder = tokio::spawn(replicator.run(shutdown.clone()));

    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop_consumer = CancellationToken::new();
    let consumer = tokio::spawn(consume(uri.clone(), tx, stop_consumer.clone()));

    let started = Instant::now();
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let mut commits = Vec::new();
    for i in 1..=count {
        let mut message = Message::new(
            topic_of(i),
            Bytes::from(format!("{{\"i\":{i}}}")),
            QoS::AtLeastOnce,
            "example".into(),
        );
        message.timestamp_ms = now_ms;
        message.properties.headers = vec![("unit".into(), Value::Str("C".into()))];
        commits.push(store.submit(message.to_record()?).await?);
        if !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
    }
    for c in commits {
        c.await?;
    }
    let appended = started.elapsed();

    let expected: BTreeSet<Seq> = (1..=count).filter(|i| forwarded(*i)).collect();
    let mut seen = BTreeSet::new();
    let (mut received, mut duplicates, mut out_of_order, mut last) = (0u64, 0u64, 0u64, 0);
    let deadline = Instant::now() + Duration::from_secs(120 + count / 100);
    while seen.len() < expected.len() {
        let seq = tokio::time::timeout_at(deadline.into(), rx.recv())
            .await
            .context("timed out waiting for messages")?
            .context("consumer stopped")?;
        received += 1;
        if !seen.insert(seq) {
            duplicates += 1;
        } else if seq < last {
            out_of_order += 1;
        }
        last = last.max(seq);
    }
    let drained = started.elapsed();
    // Let the cursor pass the parked and skipped tail, then stop.
    let until = Instant::now() + Duration::from_secs(10);
    while store.cursor("central")? <= count && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    forwarder.await?;
    stop_consumer.cancel();
    consumer.await?;
    let cursor = store.cursor("central")?;
    let parked = store.dead_letters(0, usize::MAX)?;
    println!(
        "appended {count} in {appended:?}; {} forwarded, all received after {drained:?} \
         ({:.0} msg/s); {received} deliveries, {duplicates} duplicates, {out_of_order} out of \
         order; cursor {cursor}; {} parked; link up at end: {}",
        expected.len(),
        expected.len() as f64 / drained.as_secs_f64(),
        parked.len(),
        link.is_up(),
    );
    if let Some(p) = parked.first() {
        println!("first parked: seq {} reason {:?}", p.seq, p.reason);
    }
    if seen != expected {
        bail!("received a different set of messages than forwarded");
    }
    if out_of_order > 0 {
        bail!("{out_of_order} messages arrived out of order");
    }
    if cursor != count + 1 {
        bail!("cursor is {cursor}, expected {}", count + 1);
    }
    let expected_parked = (1..=count).filter(|i| i % 250 == 125).count();
    if parked.len() != expected_parked {
        bail!("{} parked, expected {expected_parked}", parked.len());
    }
    store.close().await?;
    Ok(())
}
