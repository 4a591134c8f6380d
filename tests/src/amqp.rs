//! The central side, seen through lapin: a per-test queue bound to an
//! exchange, consumed with a timeout.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};

/// One message as the central broker delivered it.
#[derive(Debug, Clone)]
pub struct Received {
    pub body: Vec<u8>,
    pub exchange: String,
    pub routing_key: String,
    pub message_id: Option<String>,
    pub app_id: Option<String>,
    pub delivery_mode: Option<u8>,
    pub priority: Option<u8>,
    pub expiration: Option<String>,
    pub content_type: Option<String>,
    pub correlation_id: Option<String>,
    /// Headers with string-like values, as text.
    pub headers: BTreeMap<String, String>,
    pub redelivered: bool,
}

impl Received {
    /// The original MQTT topic (`x-mqtt-topic` header).
    pub fn mqtt_topic(&self) -> Option<&str> {
        self.headers.get("x-mqtt-topic").map(String::as_str)
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A queue bound to an exchange on the central broker, with a consumer
/// (auto-ack) attached.
#[derive(Debug)]
pub struct AmqpQueue {
    name: String,
    conn: Connection,
    channel: Channel,
    consumer: Consumer,
}

/// How to declare the test's queue.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    pub name: String,
    pub exchange: String,
    pub binding_key: String,
    /// Durable survives a broker restart (link tests); otherwise the queue
    /// is deleted with its consumer.
    pub durable: bool,
}

impl QueueSpec {
    /// A fresh auto-delete queue on `amq.topic` bound with `binding_key`.
    pub fn topic(binding_key: &str) -> QueueSpec {
        QueueSpec {
            name: crate::unique("q"),
            exchange: "amq.topic".to_string(),
            binding_key: binding_key.to_string(),
            durable: false,
        }
    }

    pub fn durable(mut self) -> QueueSpec {
        self.durable = true;
        self
    }
}

/// Connects to the broker at `uri` (bounded by a timeout).
pub async fn connect(uri: &str) -> Result<Connection> {
    tokio::time::timeout(
        Duration::from_secs(15),
        Connection::connect(uri, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| anyhow!("timed out connecting to {uri}"))?
    .with_context(|| format!("connecting to {uri}"))
}

impl AmqpQueue {
    /// Declares and binds the queue without consuming from it, so it keeps
    /// what is routed to it (for durable queues, across broker restarts).
    pub async fn declare(uri: &str, spec: &QueueSpec) -> Result<()> {
        let conn = connect(uri).await?;
        let channel = conn.create_channel().await?;
        declare_and_bind(&channel, spec).await?;
        conn.close(200, "declared".into()).await?;
        Ok(())
    }

    /// Declares the queue (idempotent), binds it and starts consuming.
    /// Calling it again after a broker restart reattaches to a durable queue.
    pub async fn open(uri: &str, spec: &QueueSpec) -> Result<AmqpQueue> {
        let conn = connect(uri).await?;
        let channel = conn.create_channel().await?;
        declare_and_bind(&channel, spec).await?;
        let consumer = channel
            .basic_consume(
                spec.name.as_str().into(),
                crate::unique("consumer").as_str().into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("consuming {}", spec.name))?;
        Ok(AmqpQueue {
            name: spec.name.clone(),
            conn,
            channel,
            consumer,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The next message, or an error after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Result<Received> {
        match tokio::time::timeout(timeout, self.consumer.next()).await {
            Err(_) => bail!("no message on {} within {timeout:?}", self.name),
            Ok(None) => bail!("consumer on {} ended", self.name),
            Ok(Some(Err(e))) => Err(e).with_context(|| format!("consuming {}", self.name)),
            Ok(Some(Ok(d))) => Ok(convert(d)),
        }
    }

    /// Exactly `n` messages; fails if they do not all arrive within
    /// `timeout` in total (and says how many did).
    pub async fn take(&mut self, n: usize, timeout: Duration) -> Result<Vec<Received>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Ok(m) => out.push(m),
                Err(e) => bail!("got {} of {n} messages: {e:#}", out.len()),
            }
        }
        Ok(out)
    }

    /// Messages until `done(&received_so_far)` is true, bounded by `timeout`.
    pub async fn take_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[Received]) -> bool,
    ) -> Result<Vec<Received>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while !done(&out) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Ok(m) => out.push(m),
                Err(e) => bail!("condition not met after {} messages: {e:#}", out.len()),
            }
        }
        Ok(out)
    }

    /// Publishes with publisher confirms and waits for the confirm.
    pub async fn publish_confirmed(&self, exchange: &str, key: &str, body: &[u8]) -> Result<()> {
        publish_confirmed(&self.channel, exchange, key, body).await
    }

    /// Deletes the queue and closes the connection.
    pub async fn delete(self) -> Result<()> {
        self.channel
            .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
            .await?;
        self.conn.close(200, "bye".into()).await?;
        Ok(())
    }
}

async fn declare_and_bind(channel: &Channel, spec: &QueueSpec) -> Result<()> {
    let options = QueueDeclareOptions {
        durable: spec.durable,
        auto_delete: !spec.durable,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(spec.name.as_str().into(), options, FieldTable::default())
        .await
        .with_context(|| format!("declaring queue {}", spec.name))?;
    channel
        .queue_bind(
            spec.name.as_str().into(),
            spec.exchange.as_str().into(),
            spec.binding_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("binding queue {} to {}", spec.name, spec.exchange))?;
    Ok(())
}

/// Connects, publishes one persistent message with a confirm, closes.
pub async fn publish_once(uri: &str, exchange: &str, key: &str, body: &[u8]) -> Result<()> {
    let conn = connect(uri).await?;
    let channel = conn.create_channel().await?;
    publish_confirmed(&channel, exchange, key, body).await?;
    conn.close(200, "published".into()).await?;
    Ok(())
}

/// One confirmed publish on `channel` (puts it in confirm mode first).
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
) -> Result<()> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let confirm = channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await?;
    let confirmation = tokio::time::timeout(Duration::from_secs(10), confirm)
        .await
        .map_err(|_| anyhow!("no publisher confirm within 10s"))??;
    if !confirmation.is_ack() {
        bail!("broker nacked the publish: {confirmation:?}");
    }
    Ok(())
}

fn convert(d: lapin::message::Delivery) -> Received {
    let p = &d.properties;
    let text = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| s.as_str().to_string());
    let mut headers = BTreeMap::new();
    if let Some(table) = p.headers() {
        for (k, v) in table.inner() {
            let value = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_string(),
                AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
                other => format!("{other:?}"),
            };
            headers.insert(k.as_str().to_string(), value);
        }
    }
    Received {
        exchange: d.exchange.as_str().to_string(),
        routing_key: d.routing_key.as_str().to_string(),
        message_id: text(p.message_id()),
        app_id: text(p.app_id()),
        delivery_mode: *p.delivery_mode(),
        priority: *p.priority(),
        expiration: text(p.expiration()),
        content_type: text(p.content_type()),
        correlation_id: text(p.correlation_id()),
        headers,
        redelivered: d.redelivered,
        body: d.data,
    }
}
