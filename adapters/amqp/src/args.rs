//! Queue declaration arguments: RabbitMQ's `x-` arguments, read from a
//! `queue.declare`, compared on a redeclare and kept in a durable queue's
//! definition row.
//!
//! Served: `x-message-ttl`, `x-expires`, `x-max-length`,
//! `x-max-length-bytes`, `x-overflow`, `x-dead-letter-exchange`,
//! `x-dead-letter-routing-key`, `x-max-priority`,
//! `x-single-active-consumer`, `x-queue-type` (`classic`, `quorum`) and
//! `x-delivery-limit`. Accepted and without effect here, as they only
//! place or tune a queue in a cluster: `x-queue-mode`,
//! `x-queue-master-locator`, `x-queue-leader-locator`,
//! `x-quorum-initial-group-size`, `x-quorum-target-group-size`,
//! `x-dead-letter-strategy` (dead-lettering is always at least once
//! here). `x-queue-type: stream` is refused (540). Other arguments are
//! ignored, as RabbitMQ ignores them.
//!
//! Row encoding (after the row's version byte 2 and flags byte): a list of
//! `u8 tag, u8 length, value` fields; integers are u64 LE, names UTF-8.
//! Unknown tags are skipped, so a later version can add fields.

use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable};

use crate::error::{Exception, NOT_IMPLEMENTED, PRECONDITION_FAILED};

/// What a full queue does with one more message (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Overflow {
    /// The oldest ready messages go (dead-lettered, reason `maxlen`).
    #[default]
    DropHead,
    /// The new message is refused: `basic.nack` to a confirming publisher.
    RejectPublish,
    /// Refused as `RejectPublish`, and dead-lettered.
    RejectPublishDlx,
}

impl Overflow {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Overflow::DropHead => "drop-head",
            Overflow::RejectPublish => "reject-publish",
            Overflow::RejectPublishDlx => "reject-publish-dlx",
        }
    }

    fn parse(s: &str) -> Option<Overflow> {
        [
            Overflow::DropHead,
            Overflow::RejectPublish,
            Overflow::RejectPublishDlx,
        ]
        .into_iter()
        .find(|o| o.name() == s)
    }
}

/// `x-queue-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum QueueType {
    #[default]
    Classic,
    /// Served as a durable queue; what distinguishes it for applications
    /// is kept: durable only, and a delivery limit of 20 by default.
    Quorum,
}

impl QueueType {
    pub(crate) fn name(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// RabbitMQ 4's delivery limit of a quorum queue without `x-delivery-limit`.
pub(crate) const QUORUM_DELIVERY_LIMIT: u64 = 20;

/// The arguments of a queue.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct QueueArgs {
    /// `x-message-ttl`, ms: a message older than this (since the gateway
    /// received it) is dead (expired).
    pub message_ttl: Option<u64>,
    /// `x-expires`, ms: the queue is deleted after being unused this long.
    pub expires: Option<u64>,
    /// `x-max-length`: ready messages, at most.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes`: payload bytes of ready messages, at most.
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    pub dead_letter_exchange: Option<Arc<str>>,
    pub dead_letter_routing_key: Option<Arc<str>>,
    /// `x-max-priority`: priorities 0 to this are served, higher first.
    pub max_priority: Option<u8>,
    pub single_active_consumer: bool,
    pub queue_type: QueueType,
    /// `x-delivery-limit` as declared.
    pub delivery_limit: Option<u64>,
}

fn invalid(queue: &str, arg: &str, why: impl std::fmt::Display) -> Exception {
    Exception::channel(
        PRECONDITION_FAILED,
        format!("invalid arg '{arg}' for queue '{queue}' in vhost '/': {why}"),
    )
}

/// 406 for an argument of the wrong AMQP type, in RabbitMQ's words.
fn unacceptable(queue: &str, arg: &str, value: &AMQPValue) -> Exception {
    invalid(
        queue,
        arg,
        format!("{{unacceptable_type,{}}}", type_name(value)),
    )
}

/// An integer argument of any AMQP integer type.
fn integer(value: &AMQPValue) -> Option<i128> {
    Some(match value {
        AMQPValue::ShortShortInt(v) => i128::from(*v),
        AMQPValue::ShortShortUInt(v) => i128::from(*v),
        AMQPValue::ShortInt(v) => i128::from(*v),
        AMQPValue::ShortUInt(v) => i128::from(*v),
        AMQPValue::LongInt(v) => i128::from(*v),
        AMQPValue::LongUInt(v) => i128::from(*v),
        AMQPValue::LongLongInt(v) => i128::from(*v),
        _ => return None,
    })
}

fn type_name(value: &AMQPValue) -> &'static str {
    match value {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => "longstr",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Float(_) | AMQPValue::Double(_) => "float",
        AMQPValue::Void => "void",
        _ => "integer",
    }
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// A non-negative integer in `min..=max`.
fn bounded(
    queue: &str,
    arg: &str,
    value: &AMQPValue,
    min: i128,
    max: i128,
) -> Result<u64, Exception> {
    let n = integer(value).ok_or_else(|| unacceptable(queue, arg, value))?;
    if n < min {
        return Err(invalid(
            queue,
            arg,
            if n < 0 {
                format!("{{value_negative,{n}}}")
            } else {
                format!("{{value_zero,{n}}}")
            },
        ));
    }
    if n > max {
        return Err(invalid(
            queue,
            arg,
            format!("{{value_too_large,{n},{max}}}"),
        ));
    }
    u64::try_from(n).map_err(|_| invalid(queue, arg, format!("{{value_too_large,{n},{max}}}")))
}

impl QueueArgs {
    /// Reads a declaration's arguments (406 for a value of the wrong type
    /// or range, 540 for a stream); `queue` names the queue in errors.
    pub(crate) fn parse(queue: &str, table: &FieldTable) -> Result<QueueArgs, Exception> {
        let mut args = QueueArgs::default();
        const U32_MAX: i128 = u32::MAX as i128;
        const U63_MAX: i128 = i64::MAX as i128;
        for (key, value) in table {
            let arg = key.as_str();
            match arg {
                "x-message-ttl" => {
                    args.message_ttl = Some(bounded(queue, arg, value, 0, U32_MAX)?);
                }
                "x-expires" => args.expires = Some(bounded(queue, arg, value, 1, U32_MAX)?),
                "x-max-length" => args.max_length = Some(bounded(queue, arg, value, 0, U63_MAX)?),
                "x-max-length-bytes" => {
                    args.max_length_bytes = Some(bounded(queue, arg, value, 0, U63_MAX)?);
                }
                "x-max-priority" => {
                    args.max_priority = Some(bounded(queue, arg, value, 0, 255)? as u8);
                }
                "x-delivery-limit" => {
                    args.delivery_limit = Some(bounded(queue, arg, value, 0, U63_MAX)?);
                }
                "x-overflow" => {
                    let s = text(value).ok_or_else(|| unacceptable(queue, arg, value))?;
                    args.overflow = Overflow::parse(&s).ok_or_else(|| {
                        invalid(
                            queue,
                            arg,
                            format!(
                                "{{unknown_overflow_value,'{s}'}} (drop-head, reject-publish or reject-publish-dlx)"
                            ),
                        )
                    })?;
                }
                "x-dead-letter-exchange" | "x-dead-letter-routing-key" => {
                    let s = text(value).ok_or_else(|| unacceptable(queue, arg, value))?;
                    let s = Some(Arc::from(s));
                    if arg == "x-dead-letter-exchange" {
                        args.dead_letter_exchange = s;
                    } else {
                        args.dead_letter_routing_key = s;
                    }
                }
                "x-single-active-consumer" => match value {
                    AMQPValue::Boolean(b) => args.single_active_consumer = *b,
                    v => return Err(unacceptable(queue, arg, v)),
                },
                "x-queue-type" => {
                    let s = text(value).ok_or_else(|| unacceptable(queue, arg, value))?;
                    args.queue_type = match s.as_str() {
                        "classic" => QueueType::Classic,
                        "quorum" => QueueType::Quorum,
                        "stream" => {
                            return Err(Exception::connection(
                                NOT_IMPLEMENTED,
                                format!("queue '{queue}': stream queues are not implemented"),
                            ));
                        }
                        other => {
                            return Err(invalid(
                                queue,
                                arg,
                                format!("unknown queue type '{other}' (classic or quorum)"),
                            ));
                        }
                    };
                }
                _ => {}
            }
        }
        if args.dead_letter_routing_key.is_some() && args.dead_letter_exchange.is_none() {
            return Err(Exception::channel(
                PRECONDITION_FAILED,
                format!(
                    "invalid arg 'x-dead-letter-routing-key' for queue '{queue}' in vhost '/': Key 'x-dead-letter-exchange' is mandatory if 'x-dead-letter-routing-key' is defined"
                ),
            ));
        }
        if args.queue_type == QueueType::Quorum && args.overflow == Overflow::RejectPublishDlx {
            return Err(invalid(
                queue,
                "x-overflow",
                "reject-publish-dlx is not supported by quorum queues (drop-head or reject-publish)",
            ));
        }
        Ok(args)
    }

    /// A quorum queue is durable, not exclusive and not auto-delete (406
    /// otherwise, with RabbitMQ's texts).
    pub(crate) fn check_properties(
        &self,
        queue: &str,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
    ) -> Result<(), Exception> {
        if self.queue_type != QueueType::Quorum {
            return Ok(());
        }
        let property = if !durable {
            "non-durable"
        } else if exclusive {
            "exclusive"
        } else if auto_delete {
            "auto-delete"
        } else {
            return Ok(());
        };
        Err(Exception::channel(
            PRECONDITION_FAILED,
            format!("invalid property '{property}' for queue '{queue}' in vhost '/'"),
        ))
    }

    /// The delivery limit in force: the declared one, else 20 for a
    /// quorum queue (RabbitMQ 4), else none.
    #[allow(dead_code)] // until redeliveries are counted
    pub(crate) fn effective_delivery_limit(&self) -> Option<u64> {
        self.delivery_limit.or(match self.queue_type {
            QueueType::Quorum => Some(QUORUM_DELIVERY_LIMIT),
            QueueType::Classic => None,
        })
    }

    /// The first argument that differs from `current`, as RabbitMQ names it
    /// in a 406 on a redeclare: (argument, asked, current).
    pub(crate) fn inequivalent(
        &self,
        current: &QueueArgs,
    ) -> Option<(&'static str, String, String)> {
        fn show<T: std::fmt::Display>(v: &Option<T>) -> String {
            v.as_ref()
                .map_or_else(|| "none".to_string(), |v| format!("'{v}'"))
        }
        let fields: [(&'static str, String, String); 11] = [
            (
                "x-message-ttl",
                show(&self.message_ttl),
                show(&current.message_ttl),
            ),
            ("x-expires", show(&self.expires), show(&current.expires)),
            (
                "x-max-length",
                show(&self.max_length),
                show(&current.max_length),
            ),
            (
                "x-max-length-bytes",
                show(&self.max_length_bytes),
                show(&current.max_length_bytes),
            ),
            (
                "x-overflow",
                self.overflow.name().to_string(),
                current.overflow.name().to_string(),
            ),
            (
                "x-dead-letter-exchange",
                show(&self.dead_letter_exchange),
                show(&current.dead_letter_exchange),
            ),
            (
                "x-dead-letter-routing-key",
                show(&self.dead_letter_routing_key),
                show(&current.dead_letter_routing_key),
            ),
            (
                "x-max-priority",
                show(&self.max_priority),
                show(&current.max_priority),
            ),
            (
                "x-single-active-consumer",
                self.single_active_consumer.to_string(),
                current.single_active_consumer.to_string(),
            ),
            (
                "x-queue-type",
                self.queue_type.name().to_string(),
                current.queue_type.name().to_string(),
            ),
            (
                "x-delivery-limit",
                show(&self.delivery_limit),
                show(&current.delivery_limit),
            ),
        ];
        fields.into_iter().find(|(_, asked, had)| asked != had)
    }

    /// The fields of a definition row (after its version and flags bytes).
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        fn put(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
            let value = &value[..value.len().min(255)];
            out.push(tag);
            out.push(value.len() as u8);
            out.extend_from_slice(value);
        }
        let ints = [
            (1, self.message_ttl),
            (2, self.expires),
            (3, self.max_length),
            (4, self.max_length_bytes),
            (5, self.max_priority.map(u64::from)),
            (6, self.delivery_limit),
        ];
        for (tag, v) in ints {
            if let Some(v) = v {
                put(out, tag, &v.to_le_bytes());
            }
        }
        let overflow = match self.overflow {
            Overflow::DropHead => 0,
            Overflow::RejectPublish => 1,
            Overflow::RejectPublishDlx => 2,
        };
        put(out, 7, &[overflow]);
        if let Some(x) = &self.dead_letter_exchange {
            put(out, 8, x.as_bytes());
        }
        if let Some(k) = &self.dead_letter_routing_key {
            put(out, 9, k.as_bytes());
        }
        put(out, 10, &[u8::from(self.single_active_consumer)]);
        let queue_type = match self.queue_type {
            QueueType::Classic => 0,
            QueueType::Quorum => 1,
        };
        put(out, 11, &[queue_type]);
    }

    /// Reads what `encode` wrote; `None` when a field is cut or unreadable.
    pub(crate) fn decode(mut v: &[u8]) -> Option<QueueArgs> {
        let mut args = QueueArgs::default();
        while let [tag, len, rest @ ..] = v {
            let value = rest.get(..usize::from(*len))?;
            v = &rest[usize::from(*len)..];
            let int = || value.try_into().ok().map(u64::from_le_bytes);
            let name = || std::str::from_utf8(value).ok().map(Arc::from);
            match tag {
                1 => args.message_ttl = Some(int()?),
                2 => args.expires = Some(int()?),
                3 => args.max_length = Some(int()?),
                4 => args.max_length_bytes = Some(int()?),
                5 => args.max_priority = Some(u8::try_from(int()?).ok()?),
                6 => args.delivery_limit = Some(int()?),
                7 => {
                    args.overflow = match value {
                        [0] => Overflow::DropHead,
                        [1] => Overflow::RejectPublish,
                        [2] => Overflow::RejectPublishDlx,
                        _ => return None,
                    }
                }
                8 => args.dead_letter_exchange = Some(name()?),
                9 => args.dead_letter_routing_key = Some(name()?),
                10 => args.single_active_consumer = value == [1],
                11 => {
                    args.queue_type = match value {
                        [0] => QueueType::Classic,
                        [1] => QueueType::Quorum,
                        _ => return None,
                    }
                }
                _ => {}
            }
        }
        v.is_empty().then_some(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::{LongString, ShortString};

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(ShortString::from(*k), v.clone());
        }
        t
    }

    fn full() -> QueueArgs {
        QueueArgs {
            message_ttl: Some(60_000),
            expires: Some(1_800_000),
            max_length: Some(10),
            max_length_bytes: Some(1 << 20),
            overflow: Overflow::RejectPublish,
            dead_letter_exchange: Some("dlx".into()),
            dead_letter_routing_key: Some("dead.key".into()),
            max_priority: Some(9),
            single_active_consumer: true,
            queue_type: QueueType::Quorum,
            delivery_limit: Some(3),
        }
    }

    #[test]
    fn rows_round_trip_and_refuse_cuts() {
        for args in [QueueArgs::default(), full()] {
            let mut row = Vec::new();
            args.encode(&mut row);
            assert_eq!(QueueArgs::decode(&row), Some(args.clone()));
            // A row cut inside a field is refused (redb writes a row whole;
            // this guards against a misread length).
            assert_eq!(QueueArgs::decode(&row[..row.len() - 1]), None);
        }
        // An unknown tag is skipped.
        assert_eq!(QueueArgs::decode(&[200, 1, 7]), Some(QueueArgs::default()));
    }

    #[test]
    fn parses_what_rabbitmq_accepts() {
        let t = table(&[
            ("x-message-ttl", AMQPValue::LongInt(60_000)),
            ("x-expires", AMQPValue::LongUInt(1_800_000)),
            ("x-max-length", AMQPValue::ShortShortInt(10)),
            ("x-max-length-bytes", AMQPValue::LongLongInt(1 << 20)),
            (
                "x-overflow",
                AMQPValue::LongString(LongString::from("reject-publish")),
            ),
            (
                "x-dead-letter-exchange",
                AMQPValue::LongString(LongString::from("dlx")),
            ),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString(LongString::from("dead.key")),
            ),
            ("x-max-priority", AMQPValue::ShortInt(9)),
            ("x-single-active-consumer", AMQPValue::Boolean(true)),
            (
                "x-queue-type",
                AMQPValue::LongString(LongString::from("quorum")),
            ),
            ("x-delivery-limit", AMQPValue::LongInt(3)),
            (
                "x-queue-mode",
                AMQPValue::LongString(LongString::from("lazy")),
            ),
            ("x-something-else", AMQPValue::Boolean(true)),
        ]);
        assert_eq!(QueueArgs::parse("q", &t).ok(), Some(full()));
        assert_eq!(
            QueueArgs::parse("q", &FieldTable::default()).ok(),
            Some(QueueArgs::default())
        );
        assert_eq!(QueueArgs::default().effective_delivery_limit(), None);
        let quorum = QueueArgs {
            queue_type: QueueType::Quorum,
            ..QueueArgs::default()
        };
        assert_eq!(
            quorum.effective_delivery_limit(),
            Some(QUORUM_DELIVERY_LIMIT)
        );
    }

    #[test]
    fn refuses_bad_values_with_406_naming_the_argument() {
        let cases = [
            ("x-message-ttl", AMQPValue::LongInt(-1)),
            ("x-message-ttl", AMQPValue::LongLongInt(1 << 40)),
            ("x-expires", AMQPValue::LongInt(0)),
            (
                "x-max-length",
                AMQPValue::LongString(LongString::from("10")),
            ),
            ("x-max-priority", AMQPValue::LongInt(256)),
            (
                "x-overflow",
                AMQPValue::LongString(LongString::from("drop-tail")),
            ),
            ("x-single-active-consumer", AMQPValue::LongInt(1)),
            (
                "x-queue-type",
                AMQPValue::LongString(LongString::from("lazy")),
            ),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString(LongString::from("k")),
            ),
        ];
        for (arg, value) in cases {
            let e = QueueArgs::parse("q", &table(&[(arg, value.clone())]))
                .expect_err(&format!("{arg} = {value:?} accepted"));
            assert_eq!(e.code, PRECONDITION_FAILED, "{arg}");
            assert!(e.text.contains(arg), "{arg}: {}", e.text);
        }
        let stream = table(&[(
            "x-queue-type",
            AMQPValue::LongString(LongString::from("stream")),
        )]);
        assert_eq!(
            QueueArgs::parse("q", &stream).map_err(|e| e.code).err(),
            Some(NOT_IMPLEMENTED)
        );
    }

    #[test]
    fn names_the_first_inequivalent_argument() {
        let mut asked = full();
        assert_eq!(asked.inequivalent(&full()), None);
        asked.max_length = Some(11);
        let (arg, a, b) = asked.inequivalent(&full()).expect("differs");
        assert_eq!(
            (arg, a.as_str(), b.as_str()),
            ("x-max-length", "'11'", "'10'")
        );
        assert_eq!(
            QueueArgs::default().inequivalent(&full()).map(|d| d.0),
            Some("x-message-ttl")
        );
    }
}
