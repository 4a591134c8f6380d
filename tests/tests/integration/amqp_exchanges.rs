//! Headers exchanges, exchange-to-exchange bindings and transactions on
//! the AMQP listener, with lapin and pika as the clients: x-match variants
//! on `amq.headers` and declared exchanges, durable headers bindings
//! across kill -9, chains, cycles and mixes of exchange bindings delivering
//! one copy per queue, an MQTT subscriber reached through an exchange
//! binding, tx commit, rollback and acks, and the 406 cases.
//!
//! "Nothing more arrived" is checked without waiting: a marker published
//! to the queue afterwards (through the default exchange, confirmed) must
//! be the next delivery.

use anyhow::{Context, Result, anyhow, bail};
use edge_tests::amqp::connect;
use edge_tests::{MqttSubscriber, TestGateway, unique};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeBindOptions, ExchangeDeclareOptions, ExchangeUnbindOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, Consumer, ExchangeKind};

use crate::{LONG, SHORT};

const MARKER: &str = "marker";

/// A connection and a channel in confirm mode.
async fn open(uri: &str) -> Result<(Connection, Channel)> {
    let conn = connect(uri).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((conn, channel))
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

async fn exchange(channel: &Channel, name: &str, kind: ExchangeKind, durable: bool) -> Result<()> {
    exchange_with(channel, name, kind, durable, false).await
}

async fn exchange_with(
    channel: &Channel,
    name: &str,
    kind: ExchangeKind,
    durable: bool,
    auto_delete: bool,
) -> Result<()> {
    channel
        .exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                durable,
                auto_delete,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring exchange {name}"))
}

async fn queue(channel: &Channel, name: &str, durable: bool) -> Result<()> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring queue {name}"))?;
    Ok(())
}

async fn bind(channel: &Channel, q: &str, x: &str, key: &str, args: FieldTable) -> Result<()> {
    channel
        .queue_bind(
            q.into(),
            x.into(),
            key.into(),
            QueueBindOptions::default(),
            args,
        )
        .await
        .with_context(|| format!("binding {q} to {x}"))
}

async fn bind_x(channel: &Channel, dest: &str, source: &str, key: &str) -> lapin::Result<()> {
    channel
        .exchange_bind(
            dest.into(),
            source.into(),
            key.into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

async fn unbind_x(channel: &Channel, dest: &str, source: &str, key: &str) -> Result<()> {
    channel
        .exchange_unbind(
            dest.into(),
            source.into(),
            key.into(),
            ExchangeUnbindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("unbinding {dest} from {source}"))
}

/// One confirmed persistent publish; whether it was returned (mandatory).
async fn publish(
    channel: &Channel,
    x: &str,
    key: &str,
    body: &str,
    headers: Option<FieldTable>,
    mandatory: bool,
) -> Result<bool> {
    let mut props = BasicProperties::default().with_delivery_mode(2);
    if let Some(h) = headers {
        props = props.with_headers(h);
    }
    let confirm = channel
        .basic_publish(
            x.into(),
            key.into(),
            BasicPublishOptions {
                mandatory,
                ..BasicPublishOptions::default()
            },
            body.as_bytes(),
            props,
        )
        .await?;
    let c = tokio::time::timeout(SHORT, confirm)
        .await
        .map_err(|_| anyhow!("no confirm within {SHORT:?}"))??;
    match c {
        lapin::Confirmation::Ack(returned) => Ok(returned.is_some()),
        other => bail!("publish to {x:?} not acked: {other:?}"),
    }
}

async fn consume(channel: &Channel, q: &str, no_ack: bool) -> Result<Consumer> {
    Ok(channel
        .basic_consume(
            q.into(),
            unique("ctag").as_str().into(),
            BasicConsumeOptions {
                no_ack,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?)
}

async fn next(consumer: &mut Consumer) -> Result<lapin::message::Delivery> {
    match tokio::time::timeout(SHORT, consumer.next()).await {
        Err(_) => bail!("no delivery within {SHORT:?}"),
        Ok(None) => bail!("consumer ended"),
        Ok(Some(d)) => Ok(d?),
    }
}

/// A queue with a no-ack consumer, and what it received.
struct Probe {
    name: String,
    consumer: Consumer,
}

impl Probe {
    async fn new(channel: &Channel, prefix: &str) -> Result<Probe> {
        let name = unique(prefix);
        queue(channel, &name, false).await?;
        let consumer = consume(channel, &name, true).await?;
        Ok(Probe { name, consumer })
    }

    /// Everything it received before a marker published now.
    async fn received(&mut self, channel: &Channel) -> Result<Vec<String>> {
        publish(channel, "", &self.name, MARKER, None, false).await?;
        let mut out = Vec::new();
        loop {
            let d = next(&mut self.consumer)
                .await
                .with_context(|| format!("{} after {out:?}", self.name))?;
            let body = String::from_utf8(d.data)?;
            if body == MARKER {
                return Ok(out);
            }
            out.push(body);
        }
    }
}

fn closed_with(err: &lapin::Error, code: &str, name: &str) -> bool {
    let text = format!("{err:?}");
    text.contains(code) || text.contains(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_exchanges_match_all_any_and_with_x() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let (conn, ch) = open(&gw.amqp_uri()).await?;
    let declared = unique("hx");
    exchange(&ch, &declared, ExchangeKind::Headers, false).await?;
    for x in ["amq.headers", "amq.match", declared.as_str()] {
        let mut all = Probe::new(&ch, "all").await?;
        let mut any = Probe::new(&ch, "any").await?;
        let mut with_x = Probe::new(&ch, "withx").await?;
        let mut present = Probe::new(&ch, "present").await?;
        let mut all_x = Probe::new(&ch, "allx").await?;
        let report = table(&[
            ("x-match", s("all")),
            ("format", s("pdf")),
            ("type", s("report")),
            ("x-ignored", s("yes")),
        ]);
        bind(&ch, &all.name, x, "ignored", report.clone()).await?;
        // A second binding of the same queue: still one copy.
        let pdf = table(&[("format", s("pdf"))]);
        bind(&ch, &all.name, x, "", pdf.clone()).await?;
        let either = table(&[
            ("x-match", s("any")),
            ("type", s("log")),
            ("n", AMQPValue::LongInt(7)),
        ]);
        bind(&ch, &any.name, x, "", either.clone()).await?;
        let tagged = table(&[("x-match", s("any-with-x")), ("x-tag", s("a"))]);
        bind(&ch, &with_x.name, x, "", tagged).await?;
        bind(&ch, &present.name, x, "", table(&[("k", AMQPValue::Void)])).await?;
        let both_x = table(&[
            ("x-match", s("all-with-x")),
            ("x-tag", s("a")),
            ("n", AMQPValue::ShortInt(7)),
        ]);
        bind(&ch, &all_x.name, x, "", both_x).await?;

        let h = |e: &[(&str, AMQPValue)]| Some(table(e));
        let routed = [
            ("m1", h(&[("format", s("pdf")), ("type", s("report"))])),
            ("m2", h(&[("type", s("log"))])),
            (
                "m3",
                h(&[("x-tag", s("a")), ("n", AMQPValue::LongLongInt(7))]),
            ),
            ("m4", h(&[("k", s("anything")), ("format", s("pdf"))])),
        ];
        for (body, headers) in routed {
            let returned = publish(&ch, x, "some.key", body, headers, true).await?;
            assert!(!returned, "{body} on {x} was routed");
        }
        let returned = publish(&ch, x, "", "m5", h(&[("type", s("x"))]), true).await?;
        assert!(returned, "nothing matches m5: returned");
        let returned = publish(&ch, x, "", "m6", None, true).await?;
        assert!(returned, "no headers: returned");

        assert_eq!(all.received(&ch).await?, ["m1", "m4"], "{x}: all");
        assert_eq!(any.received(&ch).await?, ["m2", "m3"], "{x}: any");
        assert_eq!(with_x.received(&ch).await?, ["m3"], "{x}: any-with-x");
        assert_eq!(present.received(&ch).await?, ["m4"], "{x}: void");
        assert_eq!(all_x.received(&ch).await?, ["m3"], "{x}: all-with-x");

        // Unbinding needs the binding's arguments.
        ch.queue_unbind(
            any.name.as_str().into(),
            x.into(),
            "".into(),
            table(&[("type", s("log"))]),
        )
        .await?;
        publish(&ch, x, "", "m7", h(&[("type", s("log"))]), false).await?;
        assert_eq!(any.received(&ch).await?, ["m7"], "other arguments: kept");
        ch.queue_unbind(any.name.as_str().into(), x.into(), "".into(), either)
            .await?;
        ch.queue_unbind(all.name.as_str().into(), x.into(), "".into(), pdf)
            .await?;
        publish(&ch, x, "", "m8", h(&[("type", s("log"))]), false).await?;
        publish(&ch, x, "", "m9", h(&[("format", s("pdf"))]), false).await?;
        let m10 = h(&[("format", s("pdf")), ("type", s("report"))]);
        publish(&ch, x, "", "m10", m10, false).await?;
        assert_eq!(any.received(&ch).await?, Vec::<String>::new(), "unbound");
        assert_eq!(all.received(&ch).await?, ["m10"], "its other binding");
    }
    // An invalid x-match is refused (406), the channel closed.
    let bad = Probe::new(&ch, "bad").await?;
    let err = ch
        .queue_bind(
            bad.name.as_str().into(),
            "amq.headers".into(),
            "".into(),
            QueueBindOptions::default(),
            table(&[("x-match", s("most"))]),
        )
        .await
        .expect_err("invalid x-match");
    assert!(closed_with(&err, "406", "PRECONDITION_FAILED"), "{err:?}");
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_headers_and_exchange_bindings_survive_kill_9() -> Result<()> {
    let mut gw = TestGateway::builder().spawn(crate::gateway_bin()).await?;
    let hx = unique("dhx");
    let src = unique("dsrc");
    let q = unique("dhq");
    let fq = unique("dfq");
    let match_args = table(&[("x-match", s("any")), ("site", s("north"))]);
    {
        let (conn, ch) = open(&gw.amqp_uri()).await?;
        exchange(&ch, &hx, ExchangeKind::Headers, true).await?;
        exchange(&ch, &src, ExchangeKind::Topic, true).await?;
        queue(&ch, &q, true).await?;
        queue(&ch, &fq, true).await?;
        bind(&ch, &q, &hx, "", match_args.clone()).await?;
        // src → hx for keys under plant.#, src → amq.fanout for all.
        bind_x(&ch, &hx, &src, "plant.#").await?;
        bind_x(&ch, "amq.fanout", &src, "#").await?;
        bind(&ch, &fq, "amq.fanout", "", FieldTable::default()).await?;
        let north = Some(table(&[("site", s("north"))]));
        assert!(!publish(&ch, &hx, "", "before", north, true).await?);
        conn.close(200, "bye".into()).await?;
        gw.kill().await?;
    }
    gw.restart().await?;
    let (conn, ch) = open(&gw.amqp_uri()).await?;
    let north = || Some(table(&[("site", s("north"))]));
    let south = Some(table(&[("site", s("south"))]));
    assert!(!publish(&ch, &hx, "", "direct", north(), true).await?);
    assert!(publish(&ch, &hx, "", "south", south, true).await?);
    assert!(!publish(&ch, &src, "plant.a", "via-src", north(), true).await?);
    assert!(!publish(&ch, &src, "other", "fanout-only", north(), true).await?);
    let mut consumer = consume(&ch, &q, false).await?;
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = next(&mut consumer).await?;
        got.push(String::from_utf8(d.data.clone())?);
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    assert_eq!(got, ["before", "direct", "via-src"]);
    let mut fanned = consume(&ch, &fq, true).await?;
    for want in ["via-src", "fanout-only"] {
        assert_eq!(next(&mut fanned).await?.data, want.as_bytes());
    }
    // Unbinding with the stored arguments removes the restored binding.
    ch.queue_unbind(q.as_str().into(), hx.as_str().into(), "".into(), match_args)
        .await?;
    assert!(publish(&ch, &hx, "", "gone", north(), true).await?);
    unbind_x(&ch, "amq.fanout", &src, "#").await?;
    assert!(publish(&ch, &src, "other", "unbound", north(), true).await?);
    conn.close(200, "bye".into()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_binding_chains_cycles_and_mixes_deliver_one_copy_per_queue() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let (conn, ch) = open(&gw.amqp_uri()).await?;
    let (sx, d1, d2, hx) = (unique("s"), unique("d1"), unique("d2"), unique("h"));
    exchange(&ch, &sx, ExchangeKind::Fanout, false).await?;
    exchange(&ch, &d1, ExchangeKind::Topic, false).await?;
    exchange(&ch, &d2, ExchangeKind::Direct, false).await?;
    exchange(&ch, &hx, ExchangeKind::Headers, false).await?;
    bind_x(&ch, &d1, &sx, "ignored").await?; // fanout: every key
    bind_x(&ch, &d2, &d1, "a.#").await?;
    bind_x(&ch, &sx, &d2, "a.b").await?; // the cycle back to s
    bind_x(&ch, &hx, &sx, "").await?;
    let mut on_s = Probe::new(&ch, "on-s").await?;
    let mut on_d1 = Probe::new(&ch, "on-d1").await?;
    let mut on_d2 = Probe::new(&ch, "on-d2").await?;
    let mut everywhere = Probe::new(&ch, "everywhere").await?;
    let mut on_h = Probe::new(&ch, "on-h").await?;
    let none = FieldTable::default;
    bind(&ch, &on_s.name, &sx, "", none()).await?;
    bind(&ch, &on_d1.name, &d1, "a.*", none()).await?;
    bind(&ch, &on_d2.name, &d2, "a.b", none()).await?;
    for (x, key) in [(&sx, ""), (&d1, "#"), (&d2, "a.b")] {
        bind(&ch, &everywhere.name, x, key, none()).await?;
    }
    bind(&ch, &on_h.name, &hx, "", table(&[("k", s("v"))])).await?;

    let kv = || Some(table(&[("k", s("v"))]));
    assert!(!publish(&ch, &sx, "a.b", "1", kv(), true).await?);
    assert!(!publish(&ch, &d2, "a.b", "2", None, true).await?);
    assert!(!publish(&ch, &sx, "x.y", "3", None, true).await?);
    assert_eq!(on_s.received(&ch).await?, ["1", "2", "3"]);
    assert_eq!(on_d1.received(&ch).await?, ["1", "2"]);
    assert_eq!(on_d2.received(&ch).await?, ["1", "2"]);
    assert_eq!(everywhere.received(&ch).await?, ["1", "2", "3"]);
    assert_eq!(on_h.received(&ch).await?, ["1"], "headers through s");

    // A cycle of two: each queue once, whichever end is published to.
    let (p, r) = (unique("p"), unique("r"));
    exchange(&ch, &p, ExchangeKind::Fanout, false).await?;
    exchange(&ch, &r, ExchangeKind::Fanout, false).await?;
    bind_x(&ch, &r, &p, "").await?;
    bind_x(&ch, &p, &r, "").await?;
    let mut on_p = Probe::new(&ch, "on-p").await?;
    let mut on_r = Probe::new(&ch, "on-r").await?;
    bind(&ch, &on_p.name, &p, "", none()).await?;
    bind(&ch, &on_r.name, &r, "", none()).await?;
    assert!(!publish(&ch, &p, "k", "to-p", None, true).await?);
    assert!(!publish(&ch, &r, "k", "to-r", None, true).await?);
    assert_eq!(on_p.received(&ch).await?, ["to-p", "to-r"]);
    assert_eq!(on_r.received(&ch).await?, ["to-p", "to-r"]);

    // Unbinding s → d1 cuts d1 and what is behind it off s.
    unbind_x(&ch, &d1, &sx, "ignored").await?;
    assert!(!publish(&ch, &sx, "a.b", "4", None, true).await?);
    assert_eq!(on_d1.received(&ch).await?, Vec::<String>::new());
    assert_eq!(on_d2.received(&ch).await?, Vec::<String>::new());
    assert_eq!(on_s.received(&ch).await?, ["4"]);
    // Deleting d2 removes its bindings: d1 reaches no further.
    ch.exchange_delete(d2.as_str().into(), Default::default())
        .await?;
    assert!(!publish(&ch, &d1, "a.b", "5", None, true).await?);
    assert_eq!(on_d1.received(&ch).await?, ["5"]);
    assert_eq!(on_s.received(&ch).await?, Vec::<String>::new());
    assert_eq!(everywhere.received(&ch).await?, ["4", "5"]);

    // mandatory: returned only when no path reaches a queue.
    let (e, f) = (unique("e"), unique("f"));
    exchange(&ch, &e, ExchangeKind::Direct, false).await?;
    exchange(&ch, &f, ExchangeKind::Fanout, false).await?;
    bind_x(&ch, &f, &e, "k").await?;
    assert!(publish(&ch, &e, "k", "6", None, true).await?, "returned");
    let mut on_f = Probe::new(&ch, "on-f").await?;
    bind(&ch, &on_f.name, &f, "", none()).await?;
    assert!(!publish(&ch, &e, "k", "7", None, true).await?);
    assert!(publish(&ch, &e, "other", "8", None, true).await?);
    assert_eq!(on_f.received(&ch).await?, ["7"]);

    // An auto-delete exchange goes with its last binding as the source.
    let ad = unique("ad");
    exchange_with(&ch, &ad, ExchangeKind::Fanout, false, true).await?;
    bind_x(&ch, &f, &ad, "").await?;
    unbind_x(&ch, &f, &ad, "").await?;
    let err = ch
        .exchange_declare(
            ad.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("auto-deleted");
    assert!(closed_with(&err, "404", "NOT_FOUND"), "{err:?}");
    let ch = conn.create_channel().await?;
    let err = bind_x(&ch, &unique("missing"), &e, "k")
        .await
        .expect_err("no such destination");
    assert!(closed_with(&err, "404", "NOT_FOUND"), "{err:?}");
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_binding_survives_a_restart() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let (sx, dx, q) = (unique("rs"), unique("rd"), unique("rq"));
    let transient = unique("rt");
    {
        let (conn, ch) = open(&gw.amqp_uri()).await?;
        exchange(&ch, &sx, ExchangeKind::Direct, true).await?;
        exchange(&ch, &dx, ExchangeKind::Topic, true).await?;
        exchange(&ch, &transient, ExchangeKind::Fanout, false).await?;
        queue(&ch, &q, true).await?;
        bind_x(&ch, &dx, &sx, "site.a").await?;
        bind_x(&ch, &transient, &sx, "site.a").await?;
        bind(&ch, &q, &dx, "site.*", FieldTable::default()).await?;
        conn.close(200, "bye".into()).await?;
    }
    let root = gw.shutdown().await?;
    let gw = TestGateway::builder().root(root).start().await?;
    let (conn, ch) = open(&gw.amqp_uri()).await?;
    assert!(!publish(&ch, &sx, "site.a", "routed", None, true).await?);
    assert!(publish(&ch, &sx, "site.b", "not", None, true).await?);
    let mut consumer = consume(&ch, &q, true).await?;
    assert_eq!(next(&mut consumer).await?.data, b"routed");
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_subscriber_gets_an_amqp_publish_through_an_exchange_binding() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let (conn, ch) = open(&gw.amqp_uri()).await?;
    let prefix = unique("e2e");
    let sx = unique("to-mqtt");
    exchange(&ch, &sx, ExchangeKind::Direct, false).await?;
    let key = format!("{prefix}.line1.temp");
    bind_x(&ch, "amq.topic", &sx, &key).await?;
    let mut amqp_side = Probe::new(&ch, "also").await?;
    bind(&ch, &amqp_side.name, &sx, &key, FieldTable::default()).await?;
    let mut sub =
        MqttSubscriber::connect(gw.mqtt_addr(), &unique("sub"), &[&format!("{prefix}/#")]).await?;
    assert!(!publish(&ch, &sx, &key, "21.5", None, true).await?);
    let p = sub.recv(LONG).await?;
    assert_eq!(p.topic, format!("{prefix}/line1/temp"));
    assert_eq!(&p.payload[..], b"21.5");
    assert_eq!(p.qos, rumqttc::QoS::AtLeastOnce);
    assert_eq!(amqp_side.received(&ch).await?, ["21.5"], "once");
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_publishes_are_seen_after_commit_and_rollback_discards_them() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let (conn, ch) = open(&gw.amqp_uri()).await?;
    let mut probe = Probe::new(&ch, "txq").await?;
    let tx = conn.create_channel().await?;
    tx.tx_select().await?;
    let persistent = || BasicProperties::default().with_delivery_mode(2);
    for body in ["t1", "t2"] {
        tx.basic_publish(
            "".into(),
            probe.name.as_str().into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            persistent(),
        )
        .await?;
    }
    assert_eq!(probe.received(&ch).await?, Vec::<String>::new(), "held");
    tx.tx_commit().await?;
    assert_eq!(probe.received(&ch).await?, ["t1", "t2"], "committed");
    tx.basic_publish(
        "".into(),
        probe.name.as_str().into(),
        BasicPublishOptions::default(),
        b"t3",
        persistent(),
    )
    .await?;
    tx.tx_rollback().await?;
    tx.tx_commit().await?;
    assert_eq!(
        probe.received(&ch).await?,
        Vec::<String>::new(),
        "discarded"
    );
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_acks_wait_for_commit_and_rolled_back_ones_stay_unacked() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let (conn, ch) = open(&gw.amqp_uri()).await?;
    let q = unique("txack");
    queue(&ch, &q, true).await?;
    for body in ["a1", "a2"] {
        publish(&ch, "", &q, body, None, false).await?;
    }
    let tx = conn.create_channel().await?;
    tx.tx_select().await?;
    let mut consumer = consume(&tx, &q, false).await?;
    let first = next(&mut consumer).await?;
    let second = next(&mut consumer).await?;
    assert_eq!(
        (&first.data[..], &second.data[..]),
        (&b"a1"[..], &b"a2"[..])
    );
    first.acker.ack(BasicAckOptions::default()).await?;
    tx.tx_rollback().await?;
    // Rolled back: the delivery is unacknowledged again, so acking its tag
    // once more is allowed (an unknown tag would close the channel).
    tx.basic_ack(first.delivery_tag, BasicAckOptions::default())
        .await?;
    tx.tx_commit().await?;
    // Closing the channel requeues what is unacked: a2 only.
    tx.close(200, "bye".into()).await?;
    let mut again = consume(&ch, &q, true).await?;
    let d = next(&mut again).await?;
    assert_eq!(d.data, b"a2");
    assert!(d.redelivered);
    publish(&ch, "", &q, MARKER, None, false).await?;
    assert_eq!(next(&mut again).await?.data, MARKER.as_bytes(), "a1 acked");
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_transaction_survives_kill_9() -> Result<()> {
    let mut gw = TestGateway::builder().spawn(crate::gateway_bin()).await?;
    let q = unique("txkill");
    {
        let (conn, ch) = open(&gw.amqp_uri()).await?;
        queue(&ch, &q, true).await?;
        let tx = conn.create_channel().await?;
        tx.tx_select().await?;
        for body in ["c1", "c2", "c3"] {
            tx.basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        }
        // commit-ok comes once the store has them: nothing is lost by a
        // kill right after it.
        tx.tx_commit().await?;
        tx.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            b"uncommitted",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await?;
        // A rejection held in a transaction and rolled back changes nothing.
        let mut consumer = consume(&tx, &q, false).await?;
        let d = next(&mut consumer).await?;
        assert_eq!(d.data, b"c1");
        tx.basic_reject(
            d.delivery_tag,
            lapin::options::BasicRejectOptions { requeue: false },
        )
        .await?;
        tx.tx_rollback().await?;
        gw.kill().await?;
        drop(conn);
    }
    gw.restart().await?;
    let (conn, ch) = open(&gw.amqp_uri()).await?;
    let mut consumer = consume(&ch, &q, true).await?;
    for want in ["c1", "c2", "c3"] {
        assert_eq!(next(&mut consumer).await?.data, want.as_bytes());
    }
    publish(&ch, "", &q, MARKER, None, false).await?;
    assert_eq!(next(&mut consumer).await?.data, MARKER.as_bytes());
    conn.close(200, "bye".into()).await?;
    Ok(())
}

/// pika: tx mode and confirm mode exclude each other, commit and rollback
/// need select (406 and RabbitMQ's texts), a commit's publishes are
/// routed by a headers exchange, a rollback's are not.
const PIKA_TX: &str = r#"
import sys, pika
port, x, q = int(sys.argv[1]), sys.argv[2], sys.argv[3]
conn = pika.BlockingConnection(pika.ConnectionParameters(
    "127.0.0.1", port, "/", pika.PlainCredentials("guest", "guest")))
ch = conn.channel()
ch.exchange_declare(x, exchange_type="headers")
ch.queue_declare(q)
ch.queue_bind(q, x, arguments={"x-match": "any", "kind": "a", "n": 1})
def expect_406(what, f):
    global ch
    try:
        f()
        print(what, "accepted")
    except pika.exceptions.ChannelClosedByBroker as e:
        print(what, e.reply_code, e.reply_text)
    ch = conn.channel()
expect_406("commit", lambda: ch.tx_commit())
expect_406("rollback", lambda: ch.tx_rollback())
def confirm_then_tx():
    ch.confirm_delivery()
    ch.tx_select()
expect_406("tx after confirm", confirm_then_tx)
def tx_then_confirm():
    ch.tx_select()
    ch.confirm_delivery()
expect_406("confirm after tx", tx_then_confirm)
ch.tx_select()
for body, h in [("p1", {"kind": "a"}), ("p2", {"kind": "b"}), ("p3", {"n": 1})]:
    ch.basic_publish(x, "", body.encode(), pika.BasicProperties(headers=h, delivery_mode=2))
ch.tx_commit()
ch.basic_publish(x, "", b"p4", pika.BasicProperties(headers={"kind": "a"}))
ch.tx_rollback()
ch.basic_publish("", q, b"end")
ch.tx_commit()
got = []
for method, props, body in ch.consume(q, auto_ack=True, inactivity_timeout=10):
    if method is None:
        break
    got.append(body.decode())
    if body == b"end":
        break
print(" ".join(got))
conn.close()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_transactions_and_headers_exchanges() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let port = gw.amqp_addr().port().to_string();
    let out =
        crate::run_python("pika tx", PIKA_TX, &[&port, &unique("phx"), &unique("phq")]).await?;
    assert_eq!(
        out,
        [
            "commit 406 PRECONDITION_FAILED - channel is not transactional",
            "rollback 406 PRECONDITION_FAILED - channel is not transactional",
            "tx after confirm 406 PRECONDITION_FAILED - cannot switch from confirm to tx mode",
            "confirm after tx 406 PRECONDITION_FAILED - cannot switch from tx to confirm mode",
            "p1 p3 end",
        ]
    );
    gw.shutdown().await?;
    Ok(())
}

/// A commit whose held publish finds its exchange deleted fails (the
/// channel closes, 404); the delivery the transaction acked after it was
/// not settled, so the close requeues it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_failing_on_a_deleted_exchange_requeues_the_acks_after_it() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let (conn, ch) = open(&gw.amqp_uri()).await?;
    let (q, x) = (unique("txfail"), unique("txgone"));
    queue(&ch, &q, false).await?;
    publish(&ch, "", &q, "one", None, false).await?;
    ch.exchange_declare(
        x.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let tx = conn.create_channel().await?;
    tx.tx_select().await?;
    let mut consumer = consume(&tx, &q, false).await?;
    let one = next(&mut consumer).await?;
    assert_eq!(one.data, b"one");
    tx.basic_publish(
        x.as_str().into(),
        "".into(),
        BasicPublishOptions::default(),
        b"held",
        BasicProperties::default(),
    )
    .await?;
    // A round trip on the transaction's channel: the publish is held (its
    // exchange checked) before the exchange goes.
    tx.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.exchange_delete(x.as_str().into(), Default::default())
        .await?;
    tx.basic_ack(one.delivery_tag, BasicAckOptions::default())
        .await?;
    let e = tx
        .tx_commit()
        .await
        .expect_err("the commit publishes to a deleted exchange");
    assert!(
        e.to_string().contains("404") || e.to_string().contains("NOT_FOUND"),
        "{e}"
    );
    // The ack was not performed: message one comes again.
    let mut again = consume(&ch, &q, true).await?;
    let d = next(&mut again).await?;
    assert_eq!(d.data, b"one");
    assert!(d.redelivered);
    conn.close(200, "bye".into()).await?;
    gw.shutdown().await?;
    Ok(())
}
