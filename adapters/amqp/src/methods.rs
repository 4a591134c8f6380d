//! The methods of an open channel: exchanges, queues, bindings (of queues
//! and of exchanges), publish (held in a transaction, `tx.rs`),
//! consume, get, acknowledgements, qos, flow and confirms.

use std::sync::Arc;

use amq_protocol::protocol::{AMQPClass, basic, channel, confirm, exchange, queue};
use amq_protocol::types::FieldTable;
use edge_core::{Message, QoS};
use futures::FutureExt;
use futures::future::BoxFuture;

use crate::args::QueueArgs;
use crate::bindings::Resolved;
use crate::broker::{ExchangeSpec, QueueSpec};
use crate::channel::{ByQueue, Consumer, Content, Held};
use crate::connection::{Connection, Settled, WRITE_HIGH_WATER};
use crate::convert;
use crate::error::{ACCESS_REFUSED, Exception, NO_ROUTE, NOT_ALLOWED, NOT_IMPLEMENTED};
use crate::permissions::Resource;
use crate::queue::{Flags, Queue, Queued};
use crate::{properties, telemetry};
use edge_auth::AmqpPermission::{Configure, Read, Write};

/// Deliveries taken from one queue for one consumer in a turn.
const DELIVERY_BATCH: usize = 64;

/// Refuses exchange declaration arguments, which none is served yet
/// (`alternate-exchange` would be the first).
fn unsupported_arguments(arguments: &FieldTable, what: &str) -> Result<(), Exception> {
    if let Some((key, _)) = arguments.into_iter().next() {
        return Err(Exception::connection(
            NOT_IMPLEMENTED,
            format!("{what} argument '{key}' is not implemented yet"),
        ));
    }
    Ok(())
}

impl Connection {
    /// The queue a method names; the empty name is the channel's last
    /// declared queue.
    fn queue_named(&self, ch: u16, name: &str) -> Result<Arc<Queue>, Exception> {
        let name = match (
            name,
            self.channels.get(&ch).and_then(|c| c.last_queue.as_deref()),
        ) {
            ("", Some(last)) => last.to_string(),
            (name, _) => name.to_string(),
        };
        self.broker.queue(&name, self.id)
    }

    fn reply(&mut self, ch: u16, nowait: bool, method: AMQPClass) -> Result<(), Exception> {
        if nowait {
            return Ok(());
        }
        self.method(ch, method)
    }

    pub(crate) async fn on_method(&mut self, ch: u16, method: AMQPClass) -> Result<(), Exception> {
        let (class, id) = (method.get_amqp_class_id(), method.get_amqp_method_id());
        self.method_inner(ch, method)
            .await
            .map_err(|e| if e.class_id == 0 { e.on(class, id) } else { e })
    }

    async fn method_inner(&mut self, ch: u16, method: AMQPClass) -> Result<(), Exception> {
        match method {
            AMQPClass::Channel(m) => self.on_channel(ch, m).await,
            AMQPClass::Exchange(m) => self.on_exchange(ch, m).await,
            AMQPClass::Queue(m) => self.on_queue(ch, m).await,
            AMQPClass::Basic(m) => self.on_basic(ch, m).await,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                if let Some(c) = self.channels.get_mut(&ch) {
                    if c.tx.is_some() {
                        return Err(Exception::channel(
                            crate::error::PRECONDITION_FAILED,
                            "cannot switch from tx to confirm mode",
                        ));
                    }
                    c.confirm = true;
                }
                self.reply(
                    ch,
                    s.nowait,
                    AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                )
            }
            AMQPClass::Tx(m) => self.on_tx(ch, m).await,
            other => Err(Exception::connection(
                crate::error::COMMAND_INVALID,
                format!("unexpected method {other:?}"),
            )),
        }
    }

    async fn on_channel(&mut self, ch: u16, m: channel::AMQPMethod) -> Result<(), Exception> {
        match m {
            channel::AMQPMethod::Flow(flow) => {
                if let Some(c) = self.channels.get_mut(&ch) {
                    c.active = flow.active;
                }
                self.deliver_due = true;
                self.method(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                        active: flow.active,
                    })),
                )
            }
            channel::AMQPMethod::Close(_) => {
                self.drop_channel(ch).await;
                self.method(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                )
            }
            channel::AMQPMethod::FlowOk(_) => Ok(()),
            other => Err(Exception::connection(
                crate::error::COMMAND_INVALID,
                format!("unexpected channel method {other:?}"),
            )),
        }
    }

    async fn on_exchange(&mut self, ch: u16, m: exchange::AMQPMethod) -> Result<(), Exception> {
        match m {
            exchange::AMQPMethod::Declare(d) => {
                if !d.passive {
                    self.permit(Configure, Resource::Exchange, d.exchange.as_str())
                        .map_err(|e| e.on(40, 10))?;
                    unsupported_arguments(&d.arguments, "exchange")?;
                }
                let spec = ExchangeSpec {
                    name: d.exchange.to_string(),
                    kind: d.kind.to_string(),
                    passive: d.passive,
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                    internal: d.internal,
                };
                self.broker.declare_exchange(&spec).await?;
                self.reply(
                    ch,
                    d.nowait,
                    AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {})),
                )
            }
            exchange::AMQPMethod::Delete(d) => {
                self.permit(Configure, Resource::Exchange, d.exchange.as_str())
                    .map_err(|e| e.on(40, 20))?;
                self.broker
                    .delete_exchange(d.exchange.as_str(), d.if_unused)
                    .await?;
                self.reply(
                    ch,
                    d.nowait,
                    AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})),
                )
            }
            exchange::AMQPMethod::Bind(b) => {
                self.permit(Write, Resource::Exchange, b.destination.as_str())
                    .and_then(|()| self.permit(Read, Resource::Exchange, b.source.as_str()))
                    .and_then(|()| self.permit_binding(b.source.as_str(), b.routing_key.as_str()))
                    .map_err(|e| e.on(40, 30))?;
                self.broker
                    .bind_exchange(
                        b.destination.as_str(),
                        b.source.as_str(),
                        b.routing_key.as_str(),
                        &b.arguments,
                    )
                    .await?;
                self.reply(
                    ch,
                    b.nowait,
                    AMQPClass::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})),
                )
            }
            exchange::AMQPMethod::Unbind(u) => {
                self.permit(Write, Resource::Exchange, u.destination.as_str())
                    .and_then(|()| self.permit(Read, Resource::Exchange, u.source.as_str()))
                    .map_err(|e| e.on(40, 40))?;
                self.broker
                    .unbind_exchange(
                        u.destination.as_str(),
                        u.source.as_str(),
                        u.routing_key.as_str(),
                        &u.arguments,
                    )
                    .await?;
                self.reply(
                    ch,
                    u.nowait,
                    AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})),
                )
            }
            other => Err(Exception::connection(
                crate::error::COMMAND_INVALID,
                format!("unexpected exchange method {other:?}"),
            )),
        }
    }

    async fn on_queue(&mut self, ch: u16, m: queue::AMQPMethod) -> Result<(), Exception> {
        match m {
            queue::AMQPMethod::Declare(d) => {
                if !d.passive {
                    // A server-named queue is checked under the prefix of
                    // the names the server makes.
                    let name = match d.queue.as_str() {
                        "" => "amq.gen-",
                        name => name,
                    };
                    self.permit(Configure, Resource::Queue, name)
                        .map_err(|e| e.on(50, 10))?;
                }
                let args = if d.passive {
                    QueueArgs::default()
                } else {
                    let args = QueueArgs::parse(d.queue.as_str(), &d.arguments)?;
                    args.check_properties(d.queue.as_str(), d.durable, d.exclusive, d.auto_delete)?;
                    args
                };
                let spec = QueueSpec {
                    name: d.queue.to_string(),
                    passive: d.passive,
                    flags: Flags {
                        durable: d.durable,
                        exclusive: d.exclusive,
                        auto_delete: d.auto_delete,
                        args: Arc::new(args),
                    },
                };
                let q = self.broker.declare_queue(&spec, self.id).await?;
                if let Some(c) = self.channels.get_mut(&ch) {
                    c.last_queue = Some(q.name.to_string());
                }
                self.reply(
                    ch,
                    d.nowait,
                    AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                        queue: q.name.as_ref().into(),
                        message_count: q.message_count(),
                        consumer_count: q.consumer_count(),
                    })),
                )
            }
            queue::AMQPMethod::Bind(b) => {
                let q = self.queue_named(ch, b.queue.as_str())?;
                self.permit(Write, Resource::Queue, &q.name)
                    .and_then(|()| self.permit(Read, Resource::Exchange, b.exchange.as_str()))
                    .and_then(|()| self.permit_binding(b.exchange.as_str(), b.routing_key.as_str()))
                    .map_err(|e| e.on(50, 20))?;
                self.broker
                    .bind(
                        &q.name,
                        b.exchange.as_str(),
                        b.routing_key.as_str(),
                        &b.arguments,
                        self.id,
                    )
                    .await?;
                self.reply(
                    ch,
                    b.nowait,
                    AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
                )
            }
            queue::AMQPMethod::Unbind(u) => {
                let q = self.queue_named(ch, u.queue.as_str())?;
                self.permit(Write, Resource::Queue, &q.name)
                    .and_then(|()| self.permit(Read, Resource::Exchange, u.exchange.as_str()))
                    .map_err(|e| e.on(50, 50))?;
                self.broker
                    .unbind(
                        &q.name,
                        u.exchange.as_str(),
                        u.routing_key.as_str(),
                        &u.arguments,
                        self.id,
                    )
                    .await?;
                self.method(
                    ch,
                    AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})),
                )
            }
            queue::AMQPMethod::Purge(p) => {
                let q = self.queue_named(ch, p.queue.as_str())?;
                self.permit(Read, Resource::Queue, &q.name)
                    .map_err(|e| e.on(50, 30))?;
                let message_count = q
                    .purge()
                    .await
                    .map_err(|e| Exception::connection(crate::error::INTERNAL_ERROR, e))?;
                self.reply(
                    ch,
                    p.nowait,
                    AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk { message_count })),
                )
            }
            queue::AMQPMethod::Delete(d) => {
                let q = self.queue_named(ch, d.queue.as_str())?;
                self.permit(Configure, Resource::Queue, &q.name)
                    .map_err(|e| e.on(50, 40))?;
                let message_count = self
                    .broker
                    .delete_queue(&q.name, self.id, d.if_unused, d.if_empty)
                    .await?;
                self.reply(
                    ch,
                    d.nowait,
                    AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                        message_count,
                    })),
                )
            }
            other => Err(Exception::connection(
                crate::error::COMMAND_INVALID,
                format!("unexpected queue method {other:?}"),
            )),
        }
    }

    async fn on_basic(&mut self, ch: u16, m: basic::AMQPMethod) -> Result<(), Exception> {
        match m {
            basic::AMQPMethod::Publish(p) => {
                if p.immediate {
                    // RabbitMQ has refused it since 3.0.
                    return Err(Exception::connection(NOT_IMPLEMENTED, "immediate=true"));
                }
                if let Some(c) = self.channels.get_mut(&ch) {
                    c.start_publish(p);
                }
                Ok(())
            }
            basic::AMQPMethod::Qos(q) => {
                if let Some(c) = self.channels.get_mut(&ch) {
                    if q.global {
                        c.prefetch = q.prefetch_count;
                    } else {
                        c.consumer_prefetch = q.prefetch_count;
                    }
                }
                self.deliver_due = true;
                self.method(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                )
            }
            basic::AMQPMethod::Consume(c) => self.consume(ch, c).await,
            basic::AMQPMethod::Cancel(c) => {
                let tag = c.consumer_tag.to_string();
                let consumer = self
                    .channels
                    .get_mut(&ch)
                    .and_then(|chan| chan.consumers.remove(&tag));
                if let Some(consumer) = consumer
                    && consumer.queue.remove_consumer(consumer.key)
                    && consumer.queue.flags.auto_delete
                {
                    self.broker.drop_queue(&consumer.queue).await;
                }
                self.reply(
                    ch,
                    c.nowait,
                    AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                        consumer_tag: tag.into(),
                    })),
                )
            }
            basic::AMQPMethod::Get(g) => self.get(ch, g).await,
            basic::AMQPMethod::Ack(a) => self.settle(ch, a.delivery_tag, a.multiple, None).await,
            basic::AMQPMethod::Nack(n) => {
                self.settle(ch, n.delivery_tag, n.multiple, Some(n.requeue))
                    .await
            }
            basic::AMQPMethod::Reject(r) => {
                self.settle(ch, r.delivery_tag, false, Some(r.requeue))
                    .await
            }
            basic::AMQPMethod::Recover(r) => {
                self.recover(ch);
                let _ = r.requeue; // RabbitMQ requeues either way.
                self.method(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
                )
            }
            basic::AMQPMethod::RecoverAsync(_) => {
                self.recover(ch);
                Ok(())
            }
            other => Err(Exception::connection(
                crate::error::COMMAND_INVALID,
                format!("unexpected basic method {other:?}"),
            )),
        }
    }

    fn recover(&mut self, ch: u16) {
        if let Some(c) = self.channels.get_mut(&ch) {
            for (q, ids) in c.take_unacked() {
                q.requeue(&ids);
            }
        }
        self.deliver_due = true;
    }

    async fn consume(&mut self, ch: u16, c: basic::Consume) -> Result<(), Exception> {
        let q = self.queue_named(ch, c.queue.as_str())?;
        self.permit(Read, Resource::Queue, &q.name)
            .map_err(|e| e.on(60, 20))?;
        let key = crate::queue::consumer_key();
        let tag = match c.consumer_tag.as_str() {
            "" => format!("amq.ctag-{key}"),
            t => t.to_string(),
        };
        let Some(chan) = self.channels.get_mut(&ch) else {
            return Ok(());
        };
        if chan.consumers.contains_key(&tag) {
            return Err(Exception::connection(
                NOT_ALLOWED,
                format!("attempt to reuse consumer tag '{tag}'"),
            ));
        }
        if !q.add_consumer(key, Arc::clone(&self.wake), c.exclusive) {
            return Err(Exception::channel(
                ACCESS_REFUSED,
                format!("queue '{}' in vhost '/' in exclusive use", q.name),
            ));
        }
        chan.consumers.insert(
            tag.clone(),
            Consumer {
                queue: Arc::clone(&q),
                no_ack: c.no_ack,
                key,
                prefetch: chan.consumer_prefetch,
                unacked: 0,
            },
        );
        self.deliver_due = true;
        self.reply(
            ch,
            c.nowait,
            AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                consumer_tag: tag.into(),
            })),
        )
    }

    async fn get(&mut self, ch: u16, g: basic::Get) -> Result<(), Exception> {
        let q = self.queue_named(ch, g.queue.as_str())?;
        self.permit(Read, Resource::Queue, &q.name)
            .map_err(|e| e.on(60, 70))?;
        let Some(m) = q.get(g.no_ack).await else {
            return self.method(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
            );
        };
        let Some(chan) = self.channels.get_mut(&ch) else {
            return Ok(());
        };
        let delivery_tag = chan.delivered(&q, m.id, g.no_ack, None);
        let (exchange, routing_key) = convert::origin_of(&m.message.topic);
        let method = AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
            delivery_tag,
            redelivered: m.redelivered,
            exchange: exchange.into(),
            routing_key: crate::error::truncate(&routing_key, 255).into(),
            message_count: q.message_count(),
        }));
        telemetry::message_out();
        let props = delivery_properties(&q, &m);
        self.content(ch, method, props, &m.message.payload)
    }

    async fn settle(
        &mut self,
        ch: u16,
        tag: u64,
        multiple: bool,
        requeue: Option<bool>,
    ) -> Result<(), Exception> {
        let Some(chan) = self.channels.get_mut(&ch) else {
            return Ok(());
        };
        if chan.tx.is_some() {
            let entries = chan.settle_entries(tag, multiple)?;
            return chan.hold(Held::Settle { entries, requeue });
        }
        let settled = chan.settle(tag, multiple)?;
        self.apply_settle(settled, requeue).await;
        Ok(())
    }

    /// Performs settled deliveries: acked, requeued or dropped.
    pub(crate) async fn apply_settle(&mut self, settled: ByQueue, requeue: Option<bool>) {
        for (q, ids) in settled {
            match requeue {
                Some(true) => q.requeue(&ids),
                Some(false) => q.reject(&ids),
                None => q.ack(&ids).await,
            }
        }
        self.deliver_due = true;
    }

    /// Takes ready messages for the consumers that have credit, while the
    /// client reads what it is sent.
    pub(crate) async fn deliver_ready(&mut self) -> Result<(), Exception> {
        if !self.deliver_due {
            return Ok(());
        }
        self.deliver_due = false;
        let consumers: Vec<(u16, String, Arc<Queue>, bool, u64)> = self
            .channels
            .iter()
            .filter(|(_, c)| c.active && !c.closing)
            .flat_map(|(ch, c)| {
                c.consumers
                    .iter()
                    .map(|(tag, k)| (*ch, tag.clone(), Arc::clone(&k.queue), k.no_ack, k.key))
            })
            .collect();
        for (ch, tag, q, no_ack, key) in consumers {
            if q.is_deleted() {
                self.cancelled(ch, &tag)?;
                continue;
            }
            if self.out.len() >= WRITE_HIGH_WATER {
                // The write branch drains it; then try again.
                self.deliver_due = true;
                break;
            }
            let credit = match self.channels.get(&ch) {
                Some(_) if no_ack => DELIVERY_BATCH,
                Some(c) => c.credit(&tag).min(DELIVERY_BATCH),
                None => 0,
            };
            if credit == 0 {
                continue;
            }
            let taken = q.take(Some(key), credit, no_ack).await;
            if taken.len() == credit {
                self.deliver_due = true;
            }
            for m in taken {
                self.deliver(ch, &tag, &q, m, no_ack)?;
            }
        }
        Ok(())
    }

    /// The consumer's queue was deleted: basic.cancel to the client
    /// (`consumer_cancel_notify`).
    fn cancelled(&mut self, ch: u16, tag: &str) -> Result<(), Exception> {
        if let Some(c) = self.channels.get_mut(&ch) {
            c.consumers.remove(tag);
        }
        self.method(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                consumer_tag: tag.into(),
                nowait: true,
            })),
        )
    }

    fn deliver(
        &mut self,
        ch: u16,
        tag: &str,
        q: &Arc<Queue>,
        m: Queued,
        no_ack: bool,
    ) -> Result<(), Exception> {
        let Some(chan) = self.channels.get_mut(&ch) else {
            q.requeue(&[m.id]);
            return Ok(());
        };
        let delivery_tag = chan.delivered(q, m.id, no_ack, Some(tag));
        let (exchange, routing_key) = convert::origin_of(&m.message.topic);
        let method = AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: tag.into(),
            delivery_tag,
            redelivered: m.redelivered,
            exchange: exchange.into(),
            routing_key: crate::error::truncate(&routing_key, 255).into(),
        }));
        telemetry::message_out();
        let props = delivery_properties(q, &m);
        self.content(ch, method, props, &m.message.payload)
    }

    /// A publish with all of its content: routed through the core; its
    /// confirm (if the channel is in confirm mode) waits for the receipt.
    /// In a transaction it is held until the commit (its exchange checked
    /// now, as RabbitMQ does).
    pub(crate) async fn publish(&mut self, ch: u16, content: Content) -> Result<(), Exception> {
        self.permit(Write, Resource::Exchange, content.publish.exchange.as_str())
            .map_err(|e| e.on(60, 40))?;
        let now = std::time::Instant::now();
        if let edge_auth::Pace::Held { until, first: true } =
            self.pacer.charge(content.body.len(), now)
        {
            metrics::counter!("edge_rate_limited_total", "protocol" => "amqp", "outcome" => "held")
                .increment(1);
            crate::logs::RATE_LIMITED.record("held", || {
                format!(
                    "connection={} user={:?} wait={:?}",
                    self.name,
                    self.who.user(),
                    until.saturating_duration_since(now)
                )
            });
        }
        if self.channels.get(&ch).is_some_and(|c| c.tx.is_some()) {
            let name = content.publish.exchange.as_str();
            let exchange = self.broker.exchange(name).map_err(|e| e.on(60, 40))?;
            if exchange.internal {
                return Err(internal_exchange(name));
            }
            return match self.channels.get_mut(&ch) {
                Some(c) => c
                    .hold(Held::Publish(Box::new(content)))
                    .map_err(|e| e.on(60, 40)),
                None => Ok(()),
            };
        }
        let settled = self.publish_now(ch, content).await?;
        self.pending.push_back(settled);
        Ok(())
    }

    /// Routes a publish; its outcome, for `pending`.
    pub(crate) async fn publish_now(
        &mut self,
        ch: u16,
        content: Content,
    ) -> Result<BoxFuture<'static, Settled>, Exception> {
        let Content {
            publish,
            properties,
            body,
        } = content;
        telemetry::message_in();
        let name = publish.exchange.as_str();
        let key = publish.routing_key.as_str();
        let (exchange, resolved) = self
            .broker
            .route(name, key, properties.headers().as_ref())
            .map_err(|e| e.on(60, 40))?;
        if exchange.internal {
            return Err(internal_exchange(name));
        }
        let epoch = self.channels.get(&ch).map_or(0, |c| c.epoch);
        let tag = self.channels.get_mut(&ch).and_then(|c| {
            c.confirm.then(|| {
                c.next_publish += 1;
                c.next_publish - 1
            })
        });
        let Resolved {
            mut topic,
            mut also,
        } = resolved;
        // `x-mqtt-topic` on amq.topic names the MQTT topic (MQTT subscribers
        // see it); bindings still match the routing key's topic as well.
        if name == convert::AMQ_TOPIC
            && let Some(own) = topic.as_ref()
            && let Some(named) = convert::named_mqtt_topic(properties.headers().as_ref())
            && named != *own
        {
            also.push(own.clone());
            topic = Some(named);
        }
        // Every MQTT topic the publish reaches, whichever way: its own on
        // amq.topic, the routing key's beside an `x-mqtt-topic`, and those
        // an exchange-to-exchange binding into amq.topic adds.
        for t in topic.iter().chain(also.iter()) {
            if !convert::is_exchange_namespace(t) {
                self.permit_topic(t).map_err(|e| e.on(60, 40))?;
            }
        }
        let router = self.broker.router();
        let routed = topic.filter(|t| {
            router.is_routed_any(std::iter::once(t.as_str()).chain(also.iter().map(String::as_str)))
        });
        let Some(topic) = routed else {
            telemetry::dropped("amqp_unroutable", 1);
            crate::logs::UNROUTABLE.record("unroutable", || {
                format!(
                    "connection={} exchange={name:?} routing_key={key:?}",
                    self.name
                )
            });
            if publish.mandatory {
                let method = AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                    reply_code: NO_ROUTE,
                    reply_text: "NO_ROUTE".into(),
                    exchange: publish.exchange.clone(),
                    routing_key: publish.routing_key.clone(),
                }));
                self.content(ch, method, properties, &body)?;
            }
            return Ok(futures::future::ready(Settled {
                channel: ch,
                epoch,
                tag,
                result: Ok(()),
                commit: false,
                refused: false,
            })
            .boxed());
        };
        // Persistent messages are committed (and queued durably) before
        // their confirm: QoS 1. Transient ones are delivered from memory.
        let qos = match properties.delivery_mode() {
            Some(2) => QoS::AtLeastOnce,
            _ => QoS::AtMostOnce,
        };
        let mut message = Message::new(topic, body, qos, Arc::clone(&self.name));
        properties::apply(&properties, &mut message);
        let settled = match self.broker.router().publish_gated(message, &also).await {
            Ok(gated) => {
                let refused = gated.refused.is_some();
                if let Some(r) = gated.refused {
                    let conn = &self.name;
                    self.broker.refused(r, &|| {
                        format!("connection={conn} exchange={name:?} routing_key={key:?}")
                    });
                }
                let receipt = gated.receipt;
                async move {
                    Settled {
                        channel: ch,
                        epoch,
                        tag,
                        result: receipt.await.map(|_| ()),
                        commit: false,
                        refused,
                    }
                }
                .boxed()
            }
            Err(e) => futures::future::ready(Settled {
                channel: ch,
                epoch,
                tag,
                result: Err(e),
                commit: false,
                refused: false,
            })
            .boxed(),
        };
        Ok(settled)
    }
}

fn internal_exchange(name: &str) -> Exception {
    Exception::channel(
        ACCESS_REFUSED,
        format!("cannot publish to internal exchange '{name}' in vhost '/'"),
    )
    .on(60, 40)
}

/// A delivery's properties: the message's, and `x-delivery-count` on a
/// redelivery from a queue with a delivery limit.
fn delivery_properties(q: &Queue, m: &Queued) -> amq_protocol::protocol::basic::AMQPProperties {
    let props = properties::of(&m.message);
    if m.returns == 0 || !q.counts_deliveries() {
        return props;
    }
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(
        "x-delivery-count".into(),
        amq_protocol::types::AMQPValue::LongLongInt(i64::from(m.returns)),
    );
    props.with_headers(headers)
}
