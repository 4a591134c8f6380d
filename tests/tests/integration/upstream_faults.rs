//! Upstream faults that must stay local to what they concern: a route to
//! an exchange the broker does not have (or that is deleted while
//! connected) parks that route's messages while the other routes flow;
//! while a link is down, its cursor does not hold traffic that none of its
//! routes takes.

use edge_tests::amqp::{AmqpQueue, QueueSpec, connect};
use edge_tests::http::metric;
use edge_tests::{Publisher, TestGateway, free_port, unique, wait_for};
use lapin::ExchangeKind;
use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions};
use lapin::types::FieldTable;

use crate::{SHORT, check_order_and_identity, payload};

const PER_ROUTE: u64 = 50;

/// Publishes `count` QoS 1 messages `<publisher>:<i>` on `topic`, all acked.
async fn publish(gw: &TestGateway, topic: &str, publisher: &str, count: u64) {
    let (topic, name) = (topic.to_string(), publisher.to_string());
    let report = Publisher::new(gw.mqtt_addr(), &unique(publisher))
        .run(count, SHORT, move |i| (topic.clone(), payload(&name, i)))
        .await;
    assert!(report.all_acked(count), "{report:?}");
}

/// Dead letters whose reason names `exchange`.
fn parked_for(gw: &TestGateway, exchange: &str) -> Vec<edge_store::DeadLetter> {
    let dead = gw.store().dead_letters(0, 10_000).unwrap();
    dead.into_iter()
        .filter(|d| d.reason == format!("exchange {exchange:?} not found"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_exchange_parks_its_route_and_the_other_routes_flow() -> anyhow::Result<()> {
    let uri = crate::shared_node().await?.amqp_uri();
    let prefix = unique("faults");
    let upstream = unique("faulty");
    let missing = unique("no-such-exchange");
    // An exchange that exists at connect time and is deleted later.
    let doomed = unique("doomed-exchange");
    let conn = connect(&uri).await?;
    let channel = conn.create_channel().await?;
    channel
        .exchange_declare(
            doomed.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut good = AmqpQueue::open(&uri, &QueueSpec::topic(&format!("{prefix}.good.#"))).await?;
    let doomed_spec = QueueSpec {
        exchange: doomed.clone(),
        ..QueueSpec::topic(&format!("{prefix}.doomed.#"))
    };
    let mut doomed_queue = AmqpQueue::open(&uri, &doomed_spec).await?;

    let gw = TestGateway::builder()
        .upstream(&upstream, std::slice::from_ref(&uri))
        .route("good", &format!("{prefix}/good/#"), &upstream)
        .route_with(
            "bad",
            &format!("{prefix}/bad/#"),
            &upstream,
            &[("exchange", &format!("{missing:?}"))],
        )
        .route_with(
            "doomed",
            &format!("{prefix}/doomed/#"),
            &upstream,
            &[("exchange", &format!("{doomed:?}"))],
        )
        .start()
        .await?;

    // The bad route's messages come first: they must not hold the others.
    publish(&gw, &format!("{prefix}/bad/1"), "bad", PER_ROUTE).await;
    publish(&gw, &format!("{prefix}/good/1"), "good", PER_ROUTE).await;
    publish(&gw, &format!("{prefix}/doomed/1"), "doomed", 1).await;
    let got = good.take(PER_ROUTE as usize, SHORT).await?;
    let per_publisher = check_order_and_identity(gw.id(), &got)?;
    assert_eq!(per_publisher["good"], (0..PER_ROUTE).collect::<Vec<_>>());
    doomed_queue.next(SHORT).await?;

    let parked = wait_for("the bad route's messages parked", SHORT, || async {
        let parked = parked_for(&gw, &missing);
        (parked.len() as u64 == PER_ROUTE).then_some(parked)
    })
    .await?;
    assert!(
        parked
            .iter()
            .all(|d| edge_core::Message::from_record(&d.record)
                .is_ok_and(|m| *m.topic == format!("{prefix}/bad/1"))),
        "{parked:?}"
    );
    let counted = wait_for("the parked counter on /metrics", SHORT, || async {
        let text = gw.metrics().await.ok()?;
        let labels = [
            &format!("upstream=\"{upstream}\"")[..],
            "reason=\"exchange_not_found\"",
        ];
        metric(&text, "edge_messages_parked_total", &labels).filter(|v| *v >= PER_ROUTE as f64)
    })
    .await?;
    assert_eq!(counted, PER_ROUTE as f64);

    // An exchange deleted while connected: its route's messages are parked
    // after the link is rebuilt, and the good route keeps flowing.
    channel
        .exchange_delete(doomed.as_str().into(), ExchangeDeleteOptions::default())
        .await?;
    publish(&gw, &format!("{prefix}/doomed/2"), "doomed2", PER_ROUTE).await;
    publish(&gw, &format!("{prefix}/good/2"), "good2", PER_ROUTE).await;
    let got = good.take(PER_ROUTE as usize, SHORT).await?;
    let per_publisher = check_order_and_identity(gw.id(), &got)?;
    assert_eq!(per_publisher["good2"], (0..PER_ROUTE).collect::<Vec<_>>());
    wait_for("the deleted exchange's messages parked", SHORT, || async {
        (parked_for(&gw, &doomed).len() as u64 == PER_ROUTE).then_some(())
    })
    .await?;

    // Everything is done: the cursor reaches the end of the log.
    let end = gw.store().stats().next_seq;
    wait_for("the cursor past every message", SHORT, || async {
        (gw.store().cursor(&upstream).ok()? == end).then_some(())
    })
    .await?;

    good.delete().await?;
    conn.close(200, "done".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_link_does_not_hold_messages_none_of_its_routes_take() -> anyhow::Result<()> {
    let nowhere = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port()?);
    let elsewhere = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port()?);
    let prefix = unique("down");
    let gw = TestGateway::builder()
        .upstream("down", &[nowhere])
        .route("mine", &format!("{prefix}/mine/#"), "down")
        .upstream("other", &[elsewhere])
        .route("theirs", &format!("{prefix}/theirs/#"), "other")
        .start()
        .await?;
    let start = gw.store().cursor("down")?;

    publish(&gw, &format!("{prefix}/theirs/1"), "theirs", PER_ROUTE).await;
    let end = gw.store().stats().next_seq;
    assert!(end >= start + PER_ROUTE);
    wait_for(
        "the down upstream's cursor past the others' messages",
        SHORT,
        || async { (gw.store().cursor("down").ok()? == end).then_some(()) },
    )
    .await?;
    assert_eq!(
        gw.store().cursor("other")?,
        start,
        "the upstream whose route takes them keeps them"
    );

    // It stops at the first message one of its routes takes.
    publish(&gw, &format!("{prefix}/mine/1"), "mine", 1).await;
    let mine = gw.store().stats().next_seq - 1;
    publish(&gw, &format!("{prefix}/theirs/2"), "theirs2", 5).await;
    // Give the link-down ticks a chance to (wrongly) move past it.
    let stop = tokio::time::Instant::now() + std::time::Duration::from_millis(2500);
    while tokio::time::Instant::now() < stop {
        assert_eq!(gw.store().cursor("down")?, mine);
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    gw.shutdown().await?;
    Ok(())
}

/// Whether `exchange` exists on the broker at `uri` (a passive declare).
async fn exchange_exists(uri: &str, exchange: &str) -> anyhow::Result<bool> {
    let conn = connect(uri).await?;
    let channel = conn.create_channel().await?;
    let options = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    let found = channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            options,
            FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = conn.close(200, "checked".into()).await;
    Ok(found)
}

/// A gateway whose route `<prefix>/#` to `central` (at `uri`) declares
/// `exchange` as a topic exchange.
fn declaring(uri: &str, prefix: &str, exchange: &str) -> edge_tests::TestGatewayBuilder {
    TestGateway::builder()
        .upstream("central", &[uri.to_string()])
        .route_with(
            "declaring",
            &format!("{prefix}/#"),
            "central",
            &[
                ("exchange", &format!("{exchange:?}")),
                ("declare_exchange", "\"topic\""),
            ],
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_declares_its_exchange_and_forwards_to_it() -> anyhow::Result<()> {
    let uri = crate::shared_node().await?.amqp_uri();
    let prefix = unique("declare");
    let exchange = unique("declared-exchange");
    assert!(!exchange_exists(&uri, &exchange).await?);
    let gw = declaring(&uri, &prefix, &exchange).start().await?;
    wait_for("the gateway to declare the exchange", SHORT, || async {
        exchange_exists(&uri, &exchange).await.ok()?.then_some(())
    })
    .await?;
    let spec = QueueSpec {
        exchange: exchange.clone(),
        ..QueueSpec::topic(&format!("{prefix}.#"))
    };
    let mut queue = AmqpQueue::open(&uri, &spec).await?;
    publish(&gw, &format!("{prefix}/1"), "declared", PER_ROUTE).await;
    let got = queue.take(PER_ROUTE as usize, SHORT).await?;
    let per_publisher = check_order_and_identity(gw.id(), &got)?;
    assert_eq!(
        per_publisher["declared"],
        (0..PER_ROUTE).collect::<Vec<_>>()
    );

    queue.delete().await?;
    let conn = connect(&uri).await?;
    conn.create_channel()
        .await?
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await?;
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_declare_is_reported_and_its_route_parks() -> anyhow::Result<()> {
    let node = crate::shared_node().await?;
    let prefix = unique("refused");
    let exchange = unique("undeclarable");
    // A user who may write and read but configure nothing.
    let user = unique("noconf");
    let ctl_user = user.clone();
    crate::blocking(move || {
        node.ctl(&["add_user", &ctl_user, "secret"])?;
        node.ctl(&["set_permissions", "-p", "/", &ctl_user, "^$", ".*", ".*"])
    })
    .await?;
    let uri = format!("amqp://{user}:secret@127.0.0.1:{}/%2f", node.amqp_port());
    let gw = declaring(&uri, &prefix, &exchange).start().await?;
    publish(&gw, &format!("{prefix}/1"), "refused", PER_ROUTE).await;
    let refusals = wait_for("the refused declare on /metrics", SHORT, || async {
        let text = gw.metrics().await.ok()?;
        let labels = [
            &format!("exchange=\"{exchange}\"")[..],
            "reason=\"access_refused\"",
        ];
        metric(&text, "edge_upstream_declare_failures_total", &labels)
    })
    .await?;
    assert!(refusals >= 1.0);
    // Not declared, so missing: its messages are parked, not lost.
    wait_for("the route's messages parked", SHORT, || async {
        (parked_for(&gw, &exchange).len() as u64 == PER_ROUTE).then_some(())
    })
    .await?;
    assert!(!exchange_exists(&node.amqp_uri(), &exchange).await?);
    gw.shutdown().await?;
    crate::blocking(move || node.ctl(&["delete_user", &user])).await
}
