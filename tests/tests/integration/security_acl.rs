//! Users and permissions end to end: logins against a password file over
//! MQTT 3.1.1, MQTT 5 and AMQP; one ACL file enforced for all three
//! protocols (including AMQP reaching MQTT topics through `amq.topic`);
//! the secure default for listeners beyond loopback; and an ACL reload.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use edge_tests::auth::{Connect4, Connect5, Mqtt4, Mqtt5, add_user};
use edge_tests::gateway::run_binary;
use edge_tests::http::metric;
use edge_tests::mqtt::mosquitto_pub_with;
use edge_tests::{TestGateway, unique};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode as Code5, PubAckReason, SubscribeReasonCode as Sub5,
};
use rumqttc::{ConnectReturnCode as Code4, QoS, SubscribeReasonCode as Sub4};
use tokio::sync::OnceCell;

use crate::{SHORT, gateway_bin};

const ALICE: (&str, &str) = ("alice", "alice-Pw-7f3a9c");
const BOB: (&str, &str) = ("bob", "bob-Pw-51e0d2");
/// A user who may read and write every topic (the "operator").
const OPS: (&str, &str) = ("ops", "ops-Pw-c48b16");

/// The ACL of the matrix. Alice's AMQP read regex includes `amq.topic`:
/// binding a queue there needs read on the exchange (as in RabbitMQ), and
/// only then do the topic rules decide which keys she may bind.
const ACL: &str = r#"# security_acl matrix
user alice
topic write sensors/alice/#
topic read cmd/alice/#
amqp "^alice\..*" "^(amq\.topic|alice\..*)$" "^(amq\.topic|alice\..*)$"

user bob
topic readwrite shared/#
topic deny shared/secret
amqp "^bob\..*" "^bob\..*" "^bob\..*"

user ops
topic readwrite #

pattern read status/%u/#
"#;

/// The password file text for alice, bob and ops, hashed once per run
/// (argon2id is slow in a debug build).
async fn password_text() -> Result<&'static str> {
    static TEXT: OnceCell<String> = OnceCell::const_new();
    let text = TEXT
        .get_or_try_init(|| async {
            let dir = tempfile::tempdir()?;
            let file = dir.path().join("passwd");
            for (user, password) in [ALICE, BOB, OPS] {
                add_user(gateway_bin(), &file, user, password).await?;
            }
            std::fs::read_to_string(&file).context("reading the password file back")
        })
        .await?;
    Ok(text.as_str())
}

/// A directory with `passwd` (alice, bob, ops) and `acl` (`acl` text).
struct AuthFiles {
    dir: tempfile::TempDir,
}

impl AuthFiles {
    async fn new(acl: &str) -> Result<AuthFiles> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("passwd"), password_text().await?)?;
        std::fs::write(dir.path().join("acl"), acl)?;
        Ok(AuthFiles { dir })
    }

    fn passwd(&self) -> PathBuf {
        self.dir.path().join("passwd")
    }

    fn acl(&self) -> PathBuf {
        self.dir.path().join("acl")
    }
}

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// An in-process gateway with these users, the ACL, and no login back-off
/// (the tests fail logins on purpose and then log in from the same address).
async fn gateway(files: &AuthFiles) -> Result<TestGateway> {
    TestGateway::builder()
        .set("auth.password_file", &toml_path(&files.passwd()))
        .set("auth.acl_file", &toml_path(&files.acl()))
        .set("limits.login_backoff", "\"0s\"")
        .start()
        .await
}

fn amqp_uri(addr: std::net::SocketAddr, (user, password): (&str, &str)) -> String {
    format!("amqp://{user}:{password}@{addr}/%2f")
}

async fn amqp_connect(uri: &str) -> std::result::Result<Connection, String> {
    match tokio::time::timeout(
        SHORT,
        Connection::connect(uri, ConnectionProperties::default()),
    )
    .await
    {
        Err(_) => Err("AMQP connect timed out".into()),
        Ok(Err(e)) => Err(format!("{e:?} / {e}")),
        Ok(Ok(c)) => Ok(c),
    }
}

fn is_access_refused(text: &str) -> bool {
    text.contains("403") || text.contains("ACCESS_REFUSED") || text.contains("AccessRefused")
}

/// An operation that must fail with 403 ACCESS_REFUSED.
fn assert_refused<T: std::fmt::Debug>(what: &str, r: std::result::Result<T, lapin::Error>) {
    match r {
        Ok(v) => panic!("{what}: allowed ({v:?}), expected 403 ACCESS_REFUSED"),
        Err(e) => {
            let text = format!("{e:?} / {e}");
            assert!(is_access_refused(&text), "{what}: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_checked_on_every_protocol_and_passwords_never_logged() -> Result<()> {
    let files = AuthFiles::new(ACL).await?;
    let wrong = "Wr0ng-pw-zz9-plural-z-alpha";
    let gw = TestGateway::builder()
        .set("auth.password_file", &toml_path(&files.passwd()))
        .set("limits.login_backoff", "\"0s\"")
        .spawn(gateway_bin())
        .await?;
    let mqtt = gw.mqtt_addr();

    // MQTT 3.1.1.
    match Mqtt4::attempt(mqtt, &unique("l4"), Some((ALICE.0, wrong))).await? {
        Connect4::Refused(code) => assert_eq!(code, Code4::BadUserNamePassword),
        Connect4::Accepted(_) => bail!("3.1.1 wrong password accepted"),
    }
    match Mqtt4::attempt(mqtt, &unique("l4"), None).await? {
        Connect4::Refused(code) => assert_eq!(code, Code4::NotAuthorized),
        Connect4::Accepted(_) => bail!("3.1.1 anonymous accepted"),
    }
    Mqtt4::connect(mqtt, &unique("l4"), Some(ALICE)).await?;

    // MQTT 5.
    match Mqtt5::attempt(mqtt, &unique("l5"), Some((BOB.0, wrong))).await? {
        Connect5::Refused(code) => assert_eq!(code, Code5::BadUserNamePassword),
        Connect5::Accepted(_) => bail!("v5 wrong password accepted"),
    }
    match Mqtt5::attempt(mqtt, &unique("l5"), None).await? {
        Connect5::Refused(code) => assert_eq!(code, Code5::NotAuthorized),
        Connect5::Accepted(_) => bail!("v5 anonymous accepted"),
    }
    Mqtt5::connect(mqtt, &unique("l5"), Some(BOB)).await?;

    // mosquitto_pub: a wrong password fails, the right one publishes.
    let port = mqtt.port();
    let refused = mosquitto_pub_with(
        port,
        "sensors/alice/t",
        "x",
        1,
        &["-u", ALICE.0, "-P", wrong],
    )
    .await;
    assert!(
        refused.is_err(),
        "mosquitto_pub with a wrong password succeeded"
    );
    mosquitto_pub_with(
        port,
        "sensors/alice/t",
        "x",
        1,
        &["-u", ALICE.0, "-P", ALICE.1],
    )
    .await?;

    // AMQP: PLAIN with a wrong password, guest/guest, then a real user.
    let amqp = gw.amqp_addr();
    let err = amqp_connect(&amqp_uri(amqp, (ALICE.0, wrong)))
        .await
        .err()
        .context("AMQP wrong password accepted")?;
    assert!(is_access_refused(&err), "{err}");
    let err = amqp_connect(&amqp_uri(amqp, ("guest", "guest")))
        .await
        .err()
        .context("AMQP guest/guest accepted despite a password file")?;
    assert!(is_access_refused(&err), "{err}");
    let conn = amqp_connect(&amqp_uri(amqp, ALICE))
        .await
        .map_err(|e| anyhow!("alice over AMQP: {e}"))?;
    let ch = conn
        .create_channel()
        .await
        .context("alice opens a channel")?;
    ch.queue_declare(
        "alice.login".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .context("alice declares a queue (no acl_file: everything allowed)")?;
    conn.close(200, "bye".into())
        .await
        .context("closing alice's connection")?;

    let m = gw.metrics().await?;
    let logins = |outcome: &str| {
        metric(
            &m,
            "edge_logins_total",
            &["protocol=\"mqtt\"", &format!("outcome=\"{outcome}\"")],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(logins("bad_credentials"), 3.0, "{m}");
    assert_eq!(logins("not_authorized"), 2.0, "{m}");
    assert!(logins("accepted") >= 3.0, "{m}");
    let amqp_refused = metric(
        &m,
        "edge_logins_total",
        &["protocol=\"amqp\"", "outcome=\"refused\""],
    )
    .unwrap_or(0.0);
    assert!(amqp_refused >= 2.0, "{m}");

    let log = std::fs::read_to_string(gw.log_path()).context("reading the gateway log")?;
    for secret in [wrong, ALICE.1, BOB.1] {
        assert!(!log.contains(secret), "a password is in the log:\n{log}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acl_matrix_holds_for_mqtt_3_1_1() -> Result<()> {
    let files = AuthFiles::new(ACL).await?;
    let gw = gateway(&files).await?;
    let addr = gw.mqtt_addr();

    let mut ops = Mqtt4::connect(addr, &unique("ops"), Some(OPS)).await?;
    assert_eq!(
        ops.subscribe("sensors/#").await?,
        Sub4::Success(QoS::AtLeastOnce)
    );
    let mut alice = Mqtt4::connect(addr, &unique("alice"), Some(ALICE)).await?;
    let mut bob = Mqtt4::connect(addr, &unique("bob"), Some(BOB)).await?;

    // Publish: allowed arrives; denied is acked (3.1.1 has no way to say
    // no) but dropped; the marker after it proves nothing is in between.
    alice.publish1("sensors/alice/t", "allowed").await?;
    alice.publish1("sensors/bob/t", "denied").await?;
    alice.publish1("sensors/alice/m", "marker").await?;
    assert_eq!(
        ops.until_marker("marker").await?,
        [("sensors/alice/t".to_string(), "allowed".to_string())]
    );

    // Subscribe: read rules cover, write-only or uncovered filters do not.
    assert_eq!(
        alice.subscribe("cmd/alice/#").await?,
        Sub4::Success(QoS::AtLeastOnce)
    );
    assert_eq!(alice.subscribe("sensors/alice/#").await?, Sub4::Failure);
    assert_eq!(alice.subscribe("cmd/#").await?, Sub4::Failure);
    // A deny inside the filter refuses the whole filter.
    assert_eq!(bob.subscribe("shared/#").await?, Sub4::Failure);
    assert_eq!(
        bob.subscribe("shared/open").await?,
        Sub4::Success(QoS::AtLeastOnce)
    );
    // %u: each user reads their own status tree only.
    assert_eq!(
        alice.subscribe("status/alice/#").await?,
        Sub4::Success(QoS::AtLeastOnce)
    );
    assert_eq!(alice.subscribe("status/bob/#").await?, Sub4::Failure);
    assert_eq!(
        bob.subscribe("status/bob/x").await?,
        Sub4::Success(QoS::AtLeastOnce)
    );
    assert_eq!(bob.subscribe("status/alice/#").await?, Sub4::Failure);

    // What was granted delivers; bob's denied topic never reaches ops.
    ops.publish1("cmd/alice/go", "cmd").await?;
    ops.publish1("status/alice/up", "status").await?;
    ops.publish1("status/bob/x", "bob-status").await?;
    ops.publish1("cmd/alice/m", "marker").await?;
    assert_eq!(
        alice.until_marker("marker").await?,
        [
            ("cmd/alice/go".to_string(), "cmd".to_string()),
            ("status/alice/up".to_string(), "status".to_string())
        ]
    );
    assert_eq!(
        ops.subscribe("shared/#").await?,
        Sub4::Success(QoS::AtLeastOnce)
    );
    bob.publish1("shared/secret", "denied").await?;
    bob.publish1("shared/open", "open").await?;
    bob.publish1("shared/m", "marker").await?;
    assert_eq!(
        ops.until_marker("marker").await?,
        [("shared/open".to_string(), "open".to_string())]
    );
    assert_eq!(
        bob.until_marker("open").await?,
        [("status/bob/x".to_string(), "bob-status".to_string())]
    );

    let m = gw.metrics().await?;
    let denied = metric(
        &m,
        "edge_acl_denied_total",
        &["protocol=\"mqtt\"", "action=\"publish\""],
    )
    .unwrap_or(0.0);
    assert!(denied >= 2.0, "{m}");
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acl_matrix_holds_for_mqtt_5() -> Result<()> {
    let files = AuthFiles::new(ACL).await?;
    let gw = gateway(&files).await?;
    let addr = gw.mqtt_addr();
    let granted = Sub5::Success(QoS5::AtLeastOnce);

    let mut ops = Mqtt5::connect(addr, &unique("ops"), Some(OPS)).await?;
    assert_eq!(ops.subscribe("sensors/#").await?, granted);
    let mut alice = Mqtt5::connect(addr, &unique("alice"), Some(ALICE)).await?;
    let mut bob = Mqtt5::connect(addr, &unique("bob"), Some(BOB)).await?;

    let ok = |r: PubAckReason| {
        matches!(
            r,
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
        )
    };
    assert!(ok(alice.publish1("sensors/alice/t", "allowed").await?));
    assert_eq!(
        alice.publish1("sensors/bob/t", "denied").await?,
        PubAckReason::NotAuthorized
    );
    assert!(ok(alice.publish1("sensors/alice/m", "marker").await?));
    assert_eq!(
        ops.until_marker("marker").await?,
        [("sensors/alice/t".to_string(), "allowed".to_string())]
    );

    assert_eq!(alice.subscribe("cmd/alice/#").await?, granted);
    assert_eq!(
        alice.subscribe("sensors/alice/#").await?,
        Sub5::NotAuthorized
    );
    assert_eq!(alice.subscribe("cmd/#").await?, Sub5::NotAuthorized);
    assert_eq!(bob.subscribe("shared/#").await?, Sub5::NotAuthorized);
    assert_eq!(bob.subscribe("shared/open").await?, granted);
    assert_eq!(alice.subscribe("status/alice/#").await?, granted);
    assert_eq!(alice.subscribe("status/bob/#").await?, Sub5::NotAuthorized);
    assert_eq!(bob.subscribe("status/bob/x").await?, granted);
    assert_eq!(bob.subscribe("status/alice/#").await?, Sub5::NotAuthorized);

    assert!(ok(ops.publish1("cmd/alice/go", "cmd").await?));
    assert!(ok(ops.publish1("status/alice/up", "status").await?));
    assert!(ok(ops.publish1("cmd/alice/m", "marker").await?));
    assert_eq!(
        alice.until_marker("marker").await?,
        [
            ("cmd/alice/go".to_string(), "cmd".to_string()),
            ("status/alice/up".to_string(), "status".to_string())
        ]
    );
    assert_eq!(ops.subscribe("shared/#").await?, granted);
    assert_eq!(
        bob.publish1("shared/secret", "denied").await?,
        PubAckReason::NotAuthorized
    );
    assert!(ok(bob.publish1("shared/open", "open").await?));
    assert!(ok(bob.publish1("shared/m", "marker").await?));
    assert_eq!(
        ops.until_marker("marker").await?,
        [("shared/open".to_string(), "open".to_string())]
    );
    assert_eq!(bob.until_marker("open").await?, []);
    gw.shutdown().await?;
    Ok(())
}

async fn consumer(
    channel: &Channel,
    queue: &str,
) -> std::result::Result<lapin::Consumer, lapin::Error> {
    channel
        .basic_consume(
            queue.into(),
            unique("ctag").as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

async fn declare(channel: &Channel, queue: &str) -> std::result::Result<(), lapin::Error> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|_| ())
}

async fn bind(channel: &Channel, queue: &str, key: &str) -> std::result::Result<(), lapin::Error> {
    channel
        .queue_bind(
            queue.into(),
            "amq.topic".into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_permissions_and_topic_rules_apply_across_protocols() -> Result<()> {
    let files = AuthFiles::new(ACL).await?;
    let gw = gateway(&files).await?;
    let mqtt = gw.mqtt_addr();
    let amqp = gw.amqp_addr();
    let alice = amqp_connect(&amqp_uri(amqp, ALICE))
        .await
        .map_err(|e| anyhow!("alice over AMQP: {e}"))?;
    let bob = amqp_connect(&amqp_uri(amqp, BOB))
        .await
        .map_err(|e| anyhow!("bob over AMQP: {e}"))?;
    let alice_q = format!("alice.{}", unique("q"));
    let bob_q = format!("bob.{}", unique("q"));

    // Configure: only her own names.
    let ch = alice.create_channel().await?;
    declare(&ch, &alice_q).await?;
    let ch = alice.create_channel().await?;
    assert_refused("alice declares bob.q", declare(&ch, &bob_q).await);

    // Bindings to amq.topic are subscriptions to the mapped filter.
    let ch = alice.create_channel().await?;
    assert_refused("bind cmd.bob.#", bind(&ch, &alice_q, "cmd.bob.#").await);
    let ch = alice.create_channel().await?;
    bind(&ch, &alice_q, "cmd.alice.#").await?;
    let mut got = consumer(&ch, &alice_q).await?;
    let mut ops = Mqtt5::connect(mqtt, &unique("ops"), Some(OPS)).await?;
    ops.publish1("cmd/alice/x", "for-alice").await?;
    let delivery = tokio::time::timeout(SHORT, got.next())
        .await
        .map_err(|_| anyhow!("alice's queue got nothing within {SHORT:?}"))?
        .context("consumer ended")??;
    assert_eq!(delivery.data, b"for-alice");
    assert_eq!(delivery.routing_key.as_str(), "cmd.alice.x");

    // Publishing to amq.topic is publishing to the topic.
    assert_eq!(
        ops.subscribe("sensors/#").await?,
        Sub5::Success(QoS5::AtLeastOnce)
    );
    let ch = alice.create_channel().await?;
    let denied =
        edge_tests::amqp::publish_confirmed(&ch, "amq.topic", "sensors.bob.t", b"no").await;
    let text = format!(
        "{:?}",
        denied.err().context("publish to sensors.bob.t allowed")?
    );
    assert!(is_access_refused(&text), "{text}");
    let ch = alice.create_channel().await?;
    edge_tests::amqp::publish_confirmed(&ch, "amq.topic", "sensors.alice.t", b"yes").await?;
    edge_tests::amqp::publish_confirmed(&ch, "amq.topic", "sensors.alice.m", b"marker").await?;
    assert_eq!(
        ops.until_marker("marker").await?,
        [("sensors/alice/t".to_string(), "yes".to_string())]
    );

    // Read: consuming someone else's queue is refused.
    let bch = bob.create_channel().await?;
    declare(&bch, &bob_q).await?;
    let ch = alice.create_channel().await?;
    assert_refused("alice consumes bob's queue", consumer(&ch, &bob_q).await);
    // Bob may not declare alice's names either, nor use amq.topic at all.
    let bch = bob.create_channel().await?;
    assert_refused("bob declares alice.x", declare(&bch, "alice.x").await);

    let m = gw.metrics().await?;
    for action in ["publish_topic", "subscribe_topic"] {
        let n = metric(
            &m,
            "edge_acl_denied_total",
            &["protocol=\"amqp\"", &format!("action=\"{action}\"")],
        )
        .unwrap_or(0.0);
        assert!(n >= 1.0, "{action}: {m}");
    }
    alice.close(200, "bye".into()).await.ok();
    bob.close(200, "bye".into()).await.ok();
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_beyond_loopback_need_an_explicit_choice() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // No auth at all, MQTT on every interface: refused with exit 64.
    let text = TestGateway::builder()
        .set("mqtt.listen", "\"0.0.0.0:0\"")
        .to_toml(
            "127.0.0.1:0",
            "127.0.0.1:0",
            "127.0.0.1:0",
            &dir.path().join("data"),
        );
    let file = dir.path().join("exposed.toml");
    std::fs::write(&file, text)?;
    let path = file.display().to_string();
    let (code, out) = run_binary(gateway_bin(), &["--config", &path]).await?;
    assert_eq!(code, Some(64), "output:\n{out}");
    assert!(out.contains("auth.allow_anonymous"), "output:\n{out}");
    let (code, out) = run_binary(gateway_bin(), &["check-config", &path]).await?;
    assert_eq!(code, Some(64), "output:\n{out}");
    assert!(out.contains("auth.allow_anonymous"), "output:\n{out}");

    // With allow_anonymous = true it runs, and says so in a WARN.
    let gw = TestGateway::builder()
        .set("amqp.listen", "\"0.0.0.0:0\"")
        .set("auth.allow_anonymous", "true")
        .spawn(gateway_bin())
        .await?;
    let log = std::fs::read_to_string(gw.log_path())?;
    let warned = log
        .lines()
        .any(|l| l.contains("WARN") && l.contains("allow_anonymous"));
    assert!(warned, "no WARN about anonymous access in:\n{log}");
    drop(gw);

    // check-config names the ACL file and the bad line.
    let acl = dir.path().join("bad.acl");
    std::fs::write(
        &acl,
        "user alice\ntopic read ok/#\ntopic read sensors/#/bad\n",
    )?;
    let text = TestGateway::builder()
        .set("auth.acl_file", &toml_path(&acl))
        .to_toml(
            "127.0.0.1:0",
            "127.0.0.1:0",
            "127.0.0.1:0",
            &dir.path().join("data"),
        );
    let file = dir.path().join("badacl.toml");
    std::fs::write(&file, text)?;
    let (code, out) = run_binary(
        gateway_bin(),
        &["check-config", &file.display().to_string()],
    )
    .await?;
    assert_eq!(code, Some(64), "output:\n{out}");
    let place = format!("{}:3", acl.display());
    assert!(out.contains(&place), "{place:?} missing from:\n{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_acl_applies_to_new_connections() -> Result<()> {
    let files = AuthFiles::new(ACL).await?;
    let gw = gateway(&files).await?;
    let addr = gw.mqtt_addr();
    let mut before = Mqtt5::connect(addr, &unique("alice"), Some(ALICE)).await?;
    assert_eq!(
        before.publish1("reports/alice/1", "no").await?,
        PubAckReason::NotAuthorized
    );
    let granted = ACL.replace(
        "topic write sensors/alice/#",
        "topic write sensors/alice/#\ntopic write reports/alice/#",
    );
    std::fs::write(files.acl(), granted)?;
    gw.reload();

    let mut ops = Mqtt5::connect(addr, &unique("ops"), Some(OPS)).await?;
    assert_eq!(
        ops.subscribe("reports/#").await?,
        Sub5::Success(QoS5::AtLeastOnce)
    );
    // reload() has swapped the rules when it returns.
    let mut after = Mqtt5::connect(addr, &unique("alice"), Some(ALICE)).await?;
    let ok = |r: PubAckReason| {
        matches!(
            r,
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
        )
    };
    assert!(ok(after.publish1("reports/alice/1", "yes").await?));
    assert!(ok(after.publish1("reports/alice/m", "marker").await?));
    assert_eq!(
        ops.until_marker("marker").await?,
        [("reports/alice/1".to_string(), "yes".to_string())]
    );
    // What the old file allowed still holds, what it did not still does not.
    assert_eq!(
        after.publish1("reports/bob/1", "no").await?,
        PubAckReason::NotAuthorized
    );
    gw.shutdown().await?;
    Ok(())
}

/// Publishes with an `x-mqtt-topic` header, waiting for the confirm.
async fn publish_naming(
    channel: &Channel,
    exchange: &str,
    key: &str,
    mqtt_topic: &str,
) -> Result<()> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::{AMQPValue, LongString};
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut headers = FieldTable::default();
    headers.insert(
        "x-mqtt-topic".into(),
        AMQPValue::LongString(LongString::from(mqtt_topic)),
    );
    let confirmation = tokio::time::timeout(
        SHORT,
        channel
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                b"sneaky",
                lapin::BasicProperties::default().with_headers(headers),
            )
            .await?,
    )
    .await
    .map_err(|_| anyhow!("no confirm within {SHORT:?}"))??;
    if !confirmation.is_ack() {
        bail!("nacked: {confirmation:?}");
    }
    Ok(())
}

/// The topic rules hold however an AMQP publish or binding reaches MQTT's
/// topic space: a routing key beside an `x-mqtt-topic` header (both topics
/// are reached), an exchange-to-exchange binding out of `amq.topic` (a
/// subscription), and one into it (a publish).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_rules_cannot_be_side_stepped_through_headers_or_exchange_bindings() -> Result<()> {
    use lapin::options::{ExchangeBindOptions, ExchangeDeclareOptions};
    let files = AuthFiles::new(ACL).await?;
    let gw = gateway(&files).await?;
    let alice = amqp_connect(&amqp_uri(gw.amqp_addr(), ALICE))
        .await
        .map_err(|e| anyhow!("alice over AMQP: {e}"))?;
    let refused = |what: &str, r: Result<()>| {
        let text = format!("{:?}", r.err());
        assert!(is_access_refused(&text), "{what}: {text}");
    };

    // The header names an allowed topic, the key a denied one, and the
    // other way round: both reach a topic she may not write.
    let ch = alice.create_channel().await?;
    refused(
        "key sensors.bob.t, header sensors/alice/t",
        publish_naming(&ch, "amq.topic", "sensors.bob.t", "sensors/alice/t").await,
    );
    let ch = alice.create_channel().await?;
    refused(
        "key sensors.alice.t, header sensors/bob/t",
        publish_naming(&ch, "amq.topic", "sensors.alice.t", "sensors/bob/t").await,
    );
    let ch = alice.create_channel().await?;
    publish_naming(&ch, "amq.topic", "sensors.alice.t", "sensors/alice/u").await?;

    // Her own exchanges.
    let ch = alice.create_channel().await?;
    for name in ["alice.out", "alice.in"] {
        ch.exchange_declare(
            name.into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    }
    // Out of amq.topic: a subscription to the mapped filter.
    let bind = |ch: Channel, destination: &'static str, source: &'static str, key: &'static str| async move {
        ch.exchange_bind(
            destination.into(),
            source.into(),
            key.into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
    };
    let ch = alice.create_channel().await?;
    assert_refused(
        "alice.out <- amq.topic cmd.bob.#",
        bind(ch, "alice.out", "amq.topic", "cmd.bob.#").await,
    );
    // An inner `#` maps to no MQTT filter but still matches in an
    // exchange binding (cmd.bob.secret.x): checked as `#`, refused.
    let ch = alice.create_channel().await?;
    assert_refused(
        "alice.out <- amq.topic cmd.#.x",
        bind(ch, "alice.out", "amq.topic", "cmd.#.x").await,
    );
    let ch = alice.create_channel().await?;
    bind(ch, "alice.out", "amq.topic", "cmd.alice.#").await?;
    // Into amq.topic: every topic it reaches is a publish to it.
    let ch = alice.create_channel().await?;
    bind(ch, "amq.topic", "alice.in", "#").await?;
    let ch = alice.create_channel().await?;
    refused(
        "alice.in sensors.bob.t",
        edge_tests::amqp::publish_confirmed(&ch, "alice.in", "sensors.bob.t", b"no").await,
    );
    let ch = alice.create_channel().await?;
    edge_tests::amqp::publish_confirmed(&ch, "alice.in", "sensors.alice.t", b"yes").await?;
    alice.close(200, "bye".into()).await.ok();
    gw.shutdown().await?;
    Ok(())
}

/// A persistent-session MQTT 3.1.1 client logged in as `user`.
async fn persistent(
    addr: std::net::SocketAddr,
    client_id: &str,
    (user, password): (&str, &str),
) -> Result<(rumqttc::AsyncClient, rumqttc::EventLoop, bool)> {
    let mut options = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options
        .set_clean_session(false)
        .set_credentials(user, password)
        .set_keep_alive(std::time::Duration::from_secs(30));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 16);
    let present = tokio::time::timeout(SHORT, async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack)) =
                eventloop.poll().await?
            {
                anyhow::ensure!(ack.code == Code4::Success, "refused: {:?}", ack.code);
                return Ok(ack.session_present);
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no CONNACK within {SHORT:?}"))??;
    Ok((client, eventloop, present))
}

/// A persistent session resumed under another user (or after the ACL
/// changed) keeps only the subscriptions that user may read: bob, taking
/// over alice's client id, gets neither what was queued for her while she
/// was away nor what is published afterwards on her topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_keeps_only_what_its_new_user_may_read() -> Result<()> {
    let files = AuthFiles::new(ACL).await?;
    let gw = gateway(&files).await?;
    let addr = gw.mqtt_addr();
    let id = unique("shared-device");

    let (alice, mut events, _) = persistent(addr, &id, ALICE).await?;
    alice.subscribe("cmd/alice/#", QoS::AtLeastOnce).await?;
    tokio::time::timeout(SHORT, async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) = events.poll().await? {
                return anyhow::Ok(());
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no SUBACK"))??;
    alice.disconnect().await?;
    while events.poll().await.is_ok() {}

    // Queued for the offline session.
    let mut ops = Mqtt5::connect(addr, &unique("ops"), Some(OPS)).await?;
    ops.publish1("cmd/alice/queued", "for-alice-only").await?;

    let (bob, mut events, present) = persistent(addr, &id, BOB).await?;
    assert!(present, "the session itself is resumed");
    ops.publish1("cmd/alice/live", "for-alice-only").await?;
    // A marker bob may read, published after both: once it is there,
    // anything for alice would have been delivered before it.
    bob.subscribe("shared/open", QoS::AtLeastOnce).await?;
    let mut seen = Vec::new();
    tokio::time::timeout(SHORT, async {
        let mut marker_sent = false;
        loop {
            match events.poll().await? {
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) if !marker_sent => {
                    marker_sent = true;
                    ops.publish1("shared/open", "marker").await?;
                }
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                    let payload = String::from_utf8_lossy(&p.payload).to_string();
                    if payload == "marker" {
                        return anyhow::Ok(());
                    }
                    seen.push((p.topic.clone(), payload));
                }
                _ => {}
            }
        }
    })
    .await
    .map_err(|_| anyhow!("marker not received within {SHORT:?}"))??;
    assert!(seen.is_empty(), "bob got alice's messages: {seen:?}");
    let m = gw.metrics().await?;
    let dropped = metric(
        &m,
        "edge_acl_denied_total",
        &["protocol=\"mqtt\"", "action=\"resumed_subscription\""],
    )
    .unwrap_or(0.0);
    assert!(dropped >= 1.0, "{m}");
    bob.disconnect().await.ok();
    gw.shutdown().await?;
    Ok(())
}

/// Without a password file a user name proves nothing, so it cannot pick
/// an ACL section: a client naming itself `ops` (who may do anything) is
/// anonymous, and the anonymous rules (none here) apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_password_file_a_user_name_is_not_an_identity() -> Result<()> {
    let files = AuthFiles::new(ACL).await?;
    let gw = TestGateway::builder()
        .set("auth.acl_file", &toml_path(&files.acl()))
        .start()
        .await?;
    let mut claimed =
        Mqtt5::connect(gw.mqtt_addr(), &unique("claims-ops"), Some(("ops", "x"))).await?;
    assert_eq!(claimed.subscribe("#").await?, Sub5::NotAuthorized);
    assert_eq!(
        claimed.publish1("cmd/alice/x", "forged").await?,
        PubAckReason::NotAuthorized
    );
    gw.shutdown().await?;
    Ok(())
}
