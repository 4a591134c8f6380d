//! TLS on the gateway's client listeners, end to end: MQTT over TLS
//! (rumqttc, mosquitto, paho), AMQP over TLS (pika, lapin, EXTERNAL login by
//! client certificate), MQTT over WebSocket over TLS, HTTPS metrics and the
//! admin endpoint, refused handshakes and their metric labels, certificate
//! rotation on reload, and a client certificate's CN as the MQTT user for
//! ACLs. Certificates come from `edge_tests::pki` (rcgen), per test.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use edge_tests::http::metric;
use edge_tests::pki::{CertKey, Pki};
use edge_tests::{TestGateway, TestGatewayBuilder, unique, wait_for};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::SHORT;

/// `"text"` as a TOML string.
fn quoted(s: impl AsRef<str>) -> String {
    format!("{:?}", s.as_ref())
}

fn path_value(p: &Path) -> String {
    quoted(p.display().to_string())
}

/// A gateway with the PKI's server certificate and every TLS listener
/// (MQTT, WSS, AMQP) on ephemeral loopback ports.
pub(crate) fn tls_gateway(pki: &Pki) -> TestGatewayBuilder {
    TestGateway::builder()
        .set("tls.cert_file", &path_value(&pki.server_files.cert))
        .set("tls.key_file", &path_value(&pki.server_files.key))
        .set("mqtt.tls_listen", "\"127.0.0.1:0\"")
        .set("mqtt.wss_listen", "\"127.0.0.1:0\"")
        .set("amqp.tls_listen", "\"127.0.0.1:0\"")
}

/// [`tls_gateway`] verifying client certificates against the test CA.
fn mtls_gateway(pki: &Pki, require_client_cert: bool) -> TestGatewayBuilder {
    tls_gateway(pki)
        .set("tls.client_ca_file", &path_value(&pki.ca_file))
        .set(
            "tls.require_client_cert",
            if require_client_cert { "true" } else { "false" },
        )
}

fn mqtt_tls_addr(gw: &TestGateway) -> Result<SocketAddr> {
    gw.mqtt_tls_addr().context("no MQTT TLS listener")
}

pub(crate) fn amqp_tls_addr(gw: &TestGateway) -> Result<SocketAddr> {
    gw.amqp_tls_addr().context("no AMQP TLS listener")
}

/// A rustls client configuration (ring) trusting `ca_pem`, presenting
/// `identity` when given.
fn client_config(ca_pem: &str, identity: Option<&CertKey>) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.context("CA PEM")?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(ck) => {
            let chain = CertificateDer::pem_slice_iter(ck.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .context("client certificate PEM")?;
            let key =
                PrivateKeyDer::from_pem_slice(ck.key_pem.as_bytes()).context("client key PEM")?;
            builder.with_client_auth_cert(chain, key)?
        }
    };
    Ok(Arc::new(config))
}

/// A raw TLS connection to `addr` for server name 127.0.0.1.
async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::IpAddress(addr.ip().into());
    let stream = tokio::time::timeout(SHORT, TlsConnector::from(config).connect(name, tcp))
        .await
        .context("TLS handshake hung")??;
    Ok(stream)
}

/// The DER of the first certificate of a PEM chain.
fn der_of(pem: &str) -> Result<Vec<u8>> {
    let cert = CertificateDer::from_pem_slice(pem.as_bytes()).context("certificate PEM")?;
    Ok(cert.as_ref().to_vec())
}

/// The leaf certificate a TLS server presented.
fn served_leaf(stream: &TlsStream<TcpStream>) -> Result<Vec<u8>> {
    let (_, conn) = stream.get_ref();
    let chain = conn.peer_certificates().context("no server certificate")?;
    let leaf = chain.first().context("empty server chain")?;
    Ok(leaf.as_ref().to_vec())
}

/// An MQTT packet: fixed header byte, remaining length, body.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    edge_tests::auth::put_remaining_length(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// An MQTT 3.1.1 CONNECT, clean session, keep-alive 30 s.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30];
    let id = client_id.as_bytes();
    body.extend_from_slice(&u16::try_from(id.len()).unwrap_or(0).to_be_bytes());
    body.extend_from_slice(id);
    packet(0x10, &body)
}

/// Sends CONNECT over `stream` and returns the first bytes answered: the
/// CONNACK on success; an error or `None` (closed) when the server refused.
async fn mqtt_handshake<S>(stream: &mut S) -> Result<Option<Vec<u8>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(&connect_packet(&unique("raw"))).await?;
    stream.flush().await?;
    let mut buf = [0u8; 4];
    let n = tokio::time::timeout(SHORT, stream.read(&mut buf))
        .await
        .context("no answer to CONNECT")??;
    Ok((n > 0).then(|| buf[..n].to_vec()))
}

/// Whether a TLS client with `config` gets an MQTT CONNACK; `false` when
/// the handshake fails or the server closes the connection instead.
async fn gets_connack(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<bool> {
    let mut stream = match tls_connect(addr, config).await {
        Ok(s) => s,
        Err(_) => return Ok(false),
    };
    match mqtt_handshake(&mut stream).await {
        Ok(Some(bytes)) => Ok(bytes.first() == Some(&0x20)),
        Ok(None) | Err(_) => Ok(false),
    }
}

/// Counter value now (0 when absent), read from the gateway's `/metrics`.
async fn counter(gw: &TestGateway, name: &str, labels: &[&str]) -> Result<f64> {
    Ok(metric(&gw.metrics().await?, name, labels).unwrap_or(0.0))
}

/// Waits until the counter exceeds `before`.
async fn counter_rises(gw: &TestGateway, name: &str, labels: &[&str], before: f64) -> Result<f64> {
    let what = format!("{name}{labels:?} above {before}");
    wait_for(&what, SHORT, || async {
        counter(gw, name, labels).await.ok().filter(|v| *v > before)
    })
    .await
}

const FAILURES: &str = "edge_tls_handshake_failures_total";

/// A rumqttc 3.1.1 client over TLS, its event loop on a task.
struct TlsMqtt {
    client: rumqttc::AsyncClient,
    events: mpsc::UnboundedReceiver<Result<rumqttc::Event, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsMqtt {
    /// Connects and waits for a successful CONNACK.
    async fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<TlsMqtt> {
        let mut opts = edge_tests::mqtt::options(addr, &unique("tls"));
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(config),
        ));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 16);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(event) => {
                        if tx.send(Ok(event)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        let mut me = TlsMqtt {
            client,
            events,
            task,
        };
        me.next(|e| match e {
            rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(ack)) => Some(ack.code),
            _ => None,
        })
        .await
        .and_then(|code| match code {
            rumqttc::ConnectReturnCode::Success => Ok(()),
            other => Err(anyhow!("CONNACK {other:?}")),
        })?;
        Ok(me)
    }

    /// The first event `pick` selects, within [`SHORT`].
    async fn next<T>(&mut self, mut pick: impl FnMut(&rumqttc::Event) -> Option<T>) -> Result<T> {
        let deadline = tokio::time::Instant::now() + SHORT;
        loop {
            let got = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .map_err(|_| anyhow!("no awaited MQTT event within {SHORT:?}"))?;
            match got {
                None => bail!("MQTT event loop ended"),
                Some(Err(e)) => bail!("MQTT connection: {e}"),
                Some(Ok(event)) => {
                    if let Some(v) = pick(&event) {
                        return Ok(v);
                    }
                }
            }
        }
    }

    /// Publishes at QoS 1 and waits for a PUBACK.
    async fn publish_acked(&mut self, topic: &str, payload: &[u8]) -> Result<()> {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.to_vec())
            .await?;
        self.next(|e| {
            matches!(e, rumqttc::Event::Incoming(rumqttc::Incoming::PubAck(_))).then_some(())
        })
        .await
    }
}

impl Drop for TlsMqtt {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// 1. rumqttc over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_tls_rumqttc_and_mosquitto_publish_and_receive_over_tls() -> Result<()> {
    let pki = Pki::new()?;
    let gw = tls_gateway(&pki).start().await?;
    let addr = mqtt_tls_addr(&gw)?;
    let config = client_config(pki.ca.pem(), None)?;
    let topic = format!("{}/t", unique("tls1"));

    let mut sub = TlsMqtt::connect(addr, config.clone()).await?;
    sub.client
        .subscribe(&topic, rumqttc::QoS::AtLeastOnce)
        .await?;
    let codes = sub
        .next(|e| match e {
            rumqttc::Event::Incoming(rumqttc::Incoming::SubAck(ack)) => {
                Some(ack.return_codes.clone())
            }
            _ => None,
        })
        .await?;
    assert_eq!(
        codes,
        vec![rumqttc::SubscribeReasonCode::Success(
            rumqttc::QoS::AtLeastOnce
        )]
    );

    let mut publisher = TlsMqtt::connect(addr, config).await?;
    publisher.publish_acked(&topic, b"over tls").await?;
    let got = sub
        .next(|e| match e {
            rumqttc::Event::Incoming(rumqttc::Incoming::Publish(p)) => Some(p.clone()),
            _ => None,
        })
        .await?;
    assert_eq!(got.topic, topic);
    assert_eq!(&got.payload[..], b"over tls");

    // mosquitto_pub trusting the test CA, no client certificate asked for.
    let port = addr.port().to_string();
    let ca = pki.ca_file.display().to_string();
    let (ok, out) = mosquitto_pub(&[
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-q",
        "1",
        "-t",
        &topic,
        "-m",
        "from mosquitto",
        "--cafile",
        &ca,
    ])
    .await?;
    assert!(ok, "mosquitto_pub --cafile failed: {out}");
    let got = sub
        .next(|e| match e {
            rumqttc::Event::Incoming(rumqttc::Incoming::Publish(p)) => Some(p.clone()),
            _ => None,
        })
        .await?;
    assert_eq!(&got.payload[..], b"from mosquitto");
    gw.shutdown().await?;
    Ok(())
}

/// `mosquitto_pub` with arbitrary arguments; (success, output).
async fn mosquitto_pub(args: &[&str]) -> Result<(bool, String)> {
    let out = tokio::time::timeout(
        SHORT,
        tokio::process::Command::new("mosquitto_pub")
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("mosquitto_pub hung")?
    .context("running mosquitto_pub")?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

// 2. mosquitto_pub / mosquitto_sub over TLS, with and without client certificates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_tls_mosquitto_needs_a_client_cert_when_required() -> Result<()> {
    let pki = Pki::new()?;
    let (_, client_files) = pki.client("mosq", "mosq-client")?;
    let gw = mtls_gateway(&pki, true).start().await?;
    let port = mqtt_tls_addr(&gw)?.port().to_string();
    let ca = pki.ca_file.display().to_string();
    let cert = client_files.cert.display().to_string();
    let key = client_files.key.display().to_string();
    let topic = format!("{}/m", unique("mosq"));
    let tls_args = [
        "--cafile",
        ca.as_str(),
        "--cert",
        cert.as_str(),
        "--key",
        key.as_str(),
    ];

    let mut sub = edge_tests::mqtt::MosquittoSub::start_with(
        mqtt_tls_addr(&gw)?.port(),
        &[&topic],
        &tls_args,
    )
    .await?;
    let mut args = vec![
        "-h",
        "127.0.0.1",
        "-p",
        port.as_str(),
        "-q",
        "1",
        "-t",
        &topic,
    ];
    args.extend_from_slice(&["-m", "with a cert"]);
    args.extend_from_slice(&tls_args);
    let (ok, out) = mosquitto_pub(&args).await?;
    assert!(ok, "mosquitto_pub with a client certificate failed: {out}");
    let (t, p) = sub.recv(SHORT).await?;
    assert_eq!((t.as_str(), p.as_str()), (topic.as_str(), "with a cert"));

    let before = counter(
        &gw,
        FAILURES,
        &["protocol=\"mqtt\"", "reason=\"no_client_cert\""],
    )
    .await?;
    let (ok, out) = mosquitto_pub(&[
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-q",
        "1",
        "-t",
        &topic,
        "-m",
        "no cert",
        "--cafile",
        &ca,
    ])
    .await?;
    assert!(
        !ok,
        "mosquitto_pub without a client certificate succeeded: {out}"
    );
    counter_rises(
        &gw,
        FAILURES,
        &["protocol=\"mqtt\"", "reason=\"no_client_cert\""],
        before,
    )
    .await?;
    assert!(
        sub.recv(std::time::Duration::from_millis(300))
            .await
            .is_err(),
        "the refused publish was delivered"
    );
    sub.stop().await;
    gw.shutdown().await?;
    Ok(())
}

const PAHO_SCRIPT: &str = r#"
import sys, threading, paho.mqtt.client as mqtt
port, ca, topic = int(sys.argv[1]), sys.argv[2], sys.argv[3]
got = threading.Event()
seen = []
def on_message(c, u, m):
    seen.append(m.payload.decode())
    got.set()
c = mqtt.Client(client_id=topic.replace("/", "-") + "-paho")
c.tls_set(ca_certs=ca)
c.on_message = on_message
c.connect("127.0.0.1", port, 30)
c.loop_start()
r, _ = c.subscribe(topic, qos=1)
print("subscribe", r)
info = c.publish(topic, "paho over tls", qos=1)
info.wait_for_publish(10)
print("published", info.is_published())
print("received", got.wait(10), seen)
c.loop_stop()
c.disconnect()
"#;

// 3a. paho-mqtt over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_tls_paho_publishes_and_receives_over_tls() -> Result<()> {
    let pki = Pki::new()?;
    let gw = tls_gateway(&pki).start().await?;
    let port = mqtt_tls_addr(&gw)?.port().to_string();
    let topic = format!("{}/p", unique("paho"));
    let ca = pki.ca_file.display().to_string();
    let lines = crate::run_python("paho tls", PAHO_SCRIPT, &[&port, &ca, &topic]).await?;
    assert_eq!(
        lines,
        [
            "subscribe 0",
            "published True",
            "received True ['paho over tls']"
        ]
    );
    gw.shutdown().await?;
    Ok(())
}

const PIKA_SCRIPT: &str = r#"
import sys, ssl, pika
port, ca, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
params = pika.ConnectionParameters("127.0.0.1", port, "/", pika.PlainCredentials("guest", "guest"),
    ssl_options=pika.SSLOptions(ctx, "127.0.0.1"), heartbeat=30)
conn = pika.BlockingConnection(params)
ch = conn.channel()
q = ch.queue_declare(queue="", exclusive=True).method.queue
ch.queue_bind(q, "amq.topic", routing_key=key)
ch.confirm_delivery()
ch.basic_publish("amq.topic", key, b"pika over tls")
print("published")
for method, props, body in ch.consume(q, auto_ack=True, inactivity_timeout=10):
    print("got", body.decode() if body else None)
    break
conn.close()
"#;

// 3b. pika over AMQP TLS: publish to amq.topic and consume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_tls_pika_publishes_to_amq_topic_and_consumes_over_tls() -> Result<()> {
    let pki = Pki::new()?;
    let gw = tls_gateway(&pki).start().await?;
    let port = amqp_tls_addr(&gw)?.port().to_string();
    let key = format!("{}.k", unique("pika"));
    let ca = pki.ca_file.display().to_string();
    let lines = crate::run_python("pika tls", PIKA_SCRIPT, &[&port, &ca, &key]).await?;
    assert_eq!(lines, ["published", "got pika over tls"]);
    gw.shutdown().await?;
    Ok(())
}

/// lapin over `amqps://` with the test CA and an optional identity.
pub(crate) async fn lapin_connect(
    uri: &str,
    pki: &Pki,
    identity: Option<&CertKey>,
) -> Result<lapin::Connection> {
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: identity.map(|ck| lapin::tcp::OwnedIdentity::PKCS8 {
            pem: ck.cert_pem.clone().into_bytes(),
            key: ck.key_pem.clone().into_bytes(),
        }),
        cert_chain: Some(pki.ca.pem().to_string()),
    };
    let runtime = lapin::runtime::default_runtime()?;
    let conn = tokio::time::timeout(
        SHORT,
        lapin::Connection::connect_with_config(
            uri,
            lapin::ConnectionProperties::default(),
            tls,
            runtime,
        ),
    )
    .await
    .context("amqps connect hung")??;
    Ok(conn)
}

/// Declares a queue bound to amq.topic, publishes one confirmed message
/// there and consumes it back.
async fn amqp_round_trip(conn: &lapin::Connection, body: &[u8]) -> Result<Vec<u8>> {
    use futures::StreamExt;
    use lapin::options::{
        BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
        QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    let ch = conn.create_channel().await?;
    let key = format!("{}.k", unique("lapin"));
    let queue = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    ch.queue_bind(
        queue.name().clone(),
        "amq.topic".into(),
        key.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let confirm = ch
        .basic_publish(
            "amq.topic".into(),
            key.as_str().into(),
            BasicPublishOptions::default(),
            body,
            lapin::BasicProperties::default(),
        )
        .await?
        .await?;
    if !confirm.is_ack() {
        bail!("publish not confirmed: {confirm:?}");
    }
    let mut consumer = ch
        .basic_consume(
            queue.name().clone(),
            "c".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let delivery = tokio::time::timeout(SHORT, consumer.next())
        .await
        .context("no delivery")?
        .context("consumer ended")??;
    Ok(delivery.data)
}

// 4a. lapin over amqps:// with guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_tls_lapin_amqps_publishes_and_consumes() -> Result<()> {
    let pki = Pki::new()?;
    let gw = tls_gateway(&pki).start().await?;
    let uri = format!("amqps://guest:guest@{}/%2f", amqp_tls_addr(&gw)?);
    let conn = lapin_connect(&uri, &pki, None).await?;
    assert_eq!(
        amqp_round_trip(&conn, b"lapin over tls")
            .await
            .context("round trip")?,
        b"lapin over tls"
    );
    // Not `?`: the gateway ends AMQP over TLS without close_notify, which
    // lapin reports as an error (security_tls_close.rs, a known bug).
    let _ = conn.close(200, "done".into()).await;
    gw.shutdown().await?;
    Ok(())
}

// 4b. EXTERNAL login by the client certificate's CN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_tls_lapin_external_login_is_the_certificate_cn() -> Result<()> {
    let pki = Pki::new()?;
    let (device, _) = pki.client("device", "device-7")?;
    let (stranger, _) = pki.client("stranger", "stranger-1")?;
    let acl = pki.path().join("acl");
    std::fs::write(&acl, "user device-7\ntopic readwrite #\namqp .* .* .*\n")?;
    let gw = mtls_gateway(&pki, false)
        .set("auth.cert_identity", "\"cn\"")
        .set("auth.allow_anonymous", "false")
        .set("auth.acl_file", &path_value(&acl))
        .start()
        .await?;
    let uri = format!(
        "amqps://{}/%2f?auth_mechanism=external",
        amqp_tls_addr(&gw)?
    );
    let before = counter(&gw, "edge_logins_total", &["protocol=\"amqp\""]).await?;
    let conn = lapin_connect(&uri, &pki, Some(&device))
        .await
        .context("EXTERNAL login")?;
    assert_eq!(
        amqp_round_trip(&conn, b"as device-7")
            .await
            .context("round trip")?,
        b"as device-7"
    );
    // Not `?`: the gateway ends AMQP over TLS without close_notify, which
    // lapin reports as an error (security_tls_close.rs, a known bug).
    let _ = conn.close(200, "done".into()).await;
    counter_rises(&gw, "edge_logins_total", &["protocol=\"amqp\""], before).await?;

    // A certificate whose CN has no AMQP permissions in the ACL file: the
    // login may succeed, but declaring anything is refused.
    let conn = lapin_connect(&uri, &pki, Some(&stranger))
        .await
        .context("EXTERNAL login of a user without amqp line")?;
    let err = amqp_round_trip(&conn, b"x")
        .await
        .err()
        .context("a CN without amqp permissions used AMQP")?;
    let text = format!("{err:#}");
    assert!(
        text.contains("ACCESS") && text.contains("REFUSED"),
        "not an access refusal: {text}"
    );

    // EXTERNAL without a client certificate is refused.
    assert!(
        lapin_connect(&uri, &pki, None).await.is_err(),
        "EXTERNAL without a certificate logged in"
    );
    gw.shutdown().await?;
    Ok(())
}

// 5a. A client that trusts another CA does not get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_tls_a_client_trusting_another_ca_fails_the_handshake() -> Result<()> {
    let pki = Pki::new()?;
    let gw = tls_gateway(&pki).start().await?;
    let addr = mqtt_tls_addr(&gw)?;
    let err = tls_connect(addr, client_config(pki.other_ca.pem(), None)?).await;
    assert!(
        err.is_err(),
        "handshake with an untrusted server certificate succeeded"
    );
    let msg = format!("{:#}", err.err().context("checked above")?);
    assert!(
        msg.contains("UnknownIssuer") || msg.contains("unknown issuer"),
        "{msg}"
    );
    // The right CA still works.
    assert!(gets_connack(addr, client_config(pki.ca.pem(), None)?).await?);
    gw.shutdown().await?;
    Ok(())
}

// 5b. An expired client certificate: refused, bad_client_cert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_tls_an_expired_client_certificate_is_a_bad_client_cert() -> Result<()> {
    let pki = Pki::new()?;
    let expired = pki.ca.expired_client("old-device")?;
    let gw = mtls_gateway(&pki, true).start().await?;
    let addr = mqtt_tls_addr(&gw)?;
    let labels = ["protocol=\"mqtt\"", "reason=\"bad_client_cert\""];
    let before = counter(&gw, FAILURES, &labels).await?;
    assert!(
        !gets_connack(addr, client_config(pki.ca.pem(), Some(&expired))?).await?,
        "an expired client certificate got a CONNACK"
    );
    counter_rises(&gw, FAILURES, &labels, before).await?;
    // A certificate signed by another CA is a bad client certificate too.
    let foreign = pki.other_ca.client("foreign", &["foreign"])?;
    let before = counter(&gw, FAILURES, &labels).await?;
    assert!(!gets_connack(addr, client_config(pki.ca.pem(), Some(&foreign))?).await?);
    counter_rises(&gw, FAILURES, &labels, before).await?;
    // A valid one is let in.
    let (good, _) = pki.client("good", "good-device")?;
    assert!(gets_connack(addr, client_config(pki.ca.pem(), Some(&good))?).await?);
    gw.shutdown().await?;
    Ok(())
}

// 5c. No client certificate under require_client_cert: no_client_cert, on
// MQTT and AMQP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_tls_a_missing_client_certificate_is_refused_when_required() -> Result<()> {
    let pki = Pki::new()?;
    let gw = mtls_gateway(&pki, true).start().await?;
    let config = client_config(pki.ca.pem(), None)?;
    let labels = ["protocol=\"mqtt\"", "reason=\"no_client_cert\""];
    let before = counter(&gw, FAILURES, &labels).await?;
    assert!(!gets_connack(mqtt_tls_addr(&gw)?, config).await?);
    counter_rises(&gw, FAILURES, &labels, before).await?;

    let uri = format!("amqps://guest:guest@{}/%2f", amqp_tls_addr(&gw)?);
    let labels = ["protocol=\"amqp\"", "reason=\"no_client_cert\""];
    let before = counter(&gw, FAILURES, &labels).await?;
    assert!(
        lapin_connect(&uri, &pki, None).await.is_err(),
        "AMQP without a client certificate connected"
    );
    counter_rises(&gw, FAILURES, &labels, before).await?;
    gw.shutdown().await?;
    Ok(())
}

/// A TLS 1.0/1.1-style ClientHello record with no extensions at all.
fn legacy_client_hello(version: [u8; 2]) -> Vec<u8> {
    let mut hello = Vec::new();
    hello.extend_from_slice(&version); // client_version
    hello.extend_from_slice(&[0x42; 32]); // random
    hello.push(0); // empty session id
    hello.extend_from_slice(&[0x00, 0x04, 0x00, 0x2f, 0x00, 0x35]); // two AES-CBC-SHA suites
    hello.extend_from_slice(&[0x01, 0x00]); // compression: null only
    let mut handshake = vec![0x01]; // client_hello
    let len = u32::try_from(hello.len()).unwrap_or(0).to_be_bytes();
    handshake.extend_from_slice(&len[1..]);
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16]; // handshake record
    record.extend_from_slice(&version);
    record.extend_from_slice(&u16::try_from(handshake.len()).unwrap_or(0).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// Writes `bytes` on a plain TCP connection and reads until the server
/// closes it (bounded): what it answered.
async fn answer_to(addr: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(bytes).await?;
    let mut answer = Vec::new();
    match tokio::time::timeout(SHORT, tcp.read_to_end(&mut answer)).await {
        Err(_) => bail!("the server kept the connection open"),
        // A reset after an alert is a close too.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(Err(e)) => return Err(e.into()),
        Ok(Ok(_)) => {}
    }
    Ok(answer)
}

// 5d. TLS 1.0 and 1.1 hellos: an alert (or a close), protocol_version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_tls_legacy_tls_versions_are_refused_as_protocol_version() -> Result<()> {
    let pki = Pki::new()?;
    let gw = tls_gateway(&pki).start().await?;
    let labels = ["protocol=\"mqtt\"", "reason=\"protocol_version\""];
    for version in [[0x03, 0x01], [0x03, 0x02]] {
        let before = counter(&gw, FAILURES, &labels).await?;
        let answer = answer_to(mqtt_tls_addr(&gw)?, &legacy_client_hello(version)).await?;
        assert!(
            answer.is_empty() || answer[0] == 0x15,
            "answer to a {version:?} hello is not an alert: {answer:02x?}"
        );
        counter_rises(&gw, FAILURES, &labels, before).await?;
    }
    gw.shutdown().await?;
    Ok(())
}

// 5e. Plain MQTT (and plain AMQP) on the TLS ports: closed unanswered,
// not_tls; the plain listeners beside them still serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_tls_plain_mqtt_on_the_tls_port_is_closed_as_not_tls() -> Result<()> {
    let pki = Pki::new()?;
    let gw = tls_gateway(&pki).start().await?;
    let labels = ["protocol=\"mqtt\"", "reason=\"not_tls\""];
    let before = counter(&gw, FAILURES, &labels).await?;
    let answer = answer_to(mqtt_tls_addr(&gw)?, &connect_packet("plain-on-tls")).await?;
    assert!(
        answer.first() != Some(&0x20),
        "a CONNACK came back on the TLS port: {answer:02x?}"
    );
    counter_rises(&gw, FAILURES, &labels, before).await?;

    let mut tcp = TcpStream::connect(gw.mqtt_addr()).await?;
    let connack = mqtt_handshake(&mut tcp).await?;
    assert_eq!(connack.as_deref(), Some(&[0x20, 0x02, 0x00, 0x00][..]));

    // The AMQP protocol header on the AMQP TLS port: closed, never answered
    // with connection.start (an AMQP frame starts with type 1).
    let labels = ["protocol=\"amqp\"", "reason=\"not_tls\""];
    let before = counter(&gw, FAILURES, &labels).await?;
    let answer = answer_to(amqp_tls_addr(&gw)?, b"AMQP\x00\x00\x09\x01").await?;
    assert!(
        answer.first() != Some(&0x01) && !answer.starts_with(b"AMQP"),
        "an AMQP answer came back on the TLS port: {answer:02x?}"
    );
    counter_rises(&gw, FAILURES, &labels, before).await?;
    // The plain AMQP listener still serves.
    let plain = edge_tests::amqp::connect(&gw.amqp_uri()).await?;
    plain.close(200, "done".into()).await?;
    gw.shutdown().await?;
    Ok(())
}

// 6. MQTT over WebSocket over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_tls_mqtt_over_wss_connects() -> Result<()> {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let pki = Pki::new()?;
    let gw = tls_gateway(&pki).start().await?;
    let addr = gw.mqtt_wss_addr().context("no WSS listener")?;
    let tls = tls_connect(addr, client_config(pki.ca.pem(), None)?).await?;
    let mut request = format!("wss://{addr}/mqtt").into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse()?);
    let (mut ws, response) =
        tokio::time::timeout(SHORT, tokio_tungstenite::client_async(request, tls))
            .await
            .context("no WebSocket upgrade answer")??;
    assert_eq!(
        response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok()),
        Some("mqtt")
    );
    ws.send(Message::Binary(connect_packet(&unique("wss")).into()))
        .await?;
    let mut got = Vec::new();
    while got.len() < 4 {
        match tokio::time::timeout(SHORT, ws.next())
            .await
            .context("no CONNACK over WSS")?
        {
            Some(Ok(Message::Binary(data))) => got.extend_from_slice(&data),
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("WSS: {e}"),
            None => bail!("WSS closed before CONNACK"),
        }
    }
    assert_eq!(&got[..4], &[0x20, 0x02, 0x00, 0x00]);
    gw.shutdown().await?;
    Ok(())
}

// 7a. Rotation: a reload serves the new certificate to new clients and
// leaves connected clients alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_tls_reload_serves_the_new_certificate_and_keeps_clients() -> Result<()> {
    let pki = Pki::new()?;
    let gw = tls_gateway(&pki).start().await?;
    let addr = mqtt_tls_addr(&gw)?;
    let config = client_config(pki.ca.pem(), None)?;
    let first = tls_connect(addr, config.clone()).await?;
    assert_eq!(served_leaf(&first)?, der_of(&pki.server.cert_pem)?);
    drop(first);
    let mut client_a = TlsMqtt::connect(addr, config.clone()).await?;

    let second = pki.ca.server("edge-gateway-rotated")?;
    std::fs::write(&pki.server_files.cert, &second.cert_pem)?;
    std::fs::write(&pki.server_files.key, &second.key_pem)?;
    let ok = ["what=\"tls\"", "outcome=\"ok\""];
    let before = counter(&gw, "edge_reloads_total", &ok).await?;
    gw.reload();
    counter_rises(&gw, "edge_reloads_total", &ok, before).await?;
    let fresh = tls_connect(addr, config.clone()).await?;
    assert_eq!(served_leaf(&fresh)?, der_of(&second.cert_pem)?);
    drop(fresh);
    client_a
        .publish_acked(&format!("{}/a", unique("rot")), b"after rotation")
        .await?;

    // A broken key: the reload fails and the second certificate stays.
    std::fs::write(
        &pki.server_files.key,
        "-----BEGIN PRIVATE KEY-----\nnot a key\n",
    )?;
    let failed = ["what=\"tls\"", "outcome=\"failed\""];
    let before = counter(&gw, "edge_reloads_total", &failed).await?;
    gw.reload();
    counter_rises(&gw, "edge_reloads_total", &failed, before).await?;
    let fresh = tls_connect(addr, config).await?;
    assert_eq!(served_leaf(&fresh)?, der_of(&second.cert_pem)?);
    client_a
        .publish_acked(&format!("{}/b", unique("rot")), b"after a failed reload")
        .await?;
    gw.shutdown().await?;
    Ok(())
}

// 7b. The same rotation by SIGHUP to a gateway process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_tls_sighup_to_a_gateway_process_rotates_the_certificate() -> Result<()> {
    let pki = Pki::new()?;
    let port = edge_tests::free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let gw = TestGateway::builder()
        .set("tls.cert_file", &path_value(&pki.server_files.cert))
        .set("tls.key_file", &path_value(&pki.server_files.key))
        .set("mqtt.tls_listen", &quoted(addr.to_string()))
        .spawn(crate::gateway_bin())
        .await?;
    let config = client_config(pki.ca.pem(), None)?;
    let first = tls_connect(addr, config.clone()).await?;
    assert_eq!(served_leaf(&first)?, der_of(&pki.server.cert_pem)?);
    drop(first);
    let mut client_a = TlsMqtt::connect(addr, config.clone()).await?;

    let second = pki.ca.server("edge-gateway-sighup")?;
    std::fs::write(&pki.server_files.cert, &second.cert_pem)?;
    std::fs::write(&pki.server_files.key, &second.key_pem)?;
    let ok = ["what=\"tls\"", "outcome=\"ok\""];
    let before = metric(&gw.metrics().await?, "edge_reloads_total", &ok).unwrap_or(0.0);
    let pid = gw.pid().context("gateway process has no pid")?;
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()?;
    assert!(status.success(), "kill -HUP {pid} failed");
    wait_for("a TLS reload after SIGHUP", SHORT, || async {
        let text = gw.metrics().await.ok()?;
        metric(&text, "edge_reloads_total", &ok).filter(|v| *v > before)
    })
    .await
    .with_context(|| gw.log())?;
    let fresh = tls_connect(addr, config).await?;
    assert_eq!(served_leaf(&fresh)?, der_of(&second.cert_pem)?);
    client_a
        .publish_acked(&format!("{}/a", unique("hup")), b"after SIGHUP")
        .await?;
    Ok(())
}

/// One HTTP/1.1 request over TLS; (status, body).
async fn https_get(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    path: &str,
    authorization: Option<&str>,
) -> Result<(u16, String)> {
    let mut stream = tls_connect(addr, config).await?;
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    if let Some(a) = authorization {
        request.push_str(&format!("Authorization: {a}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    match tokio::time::timeout(SHORT, stream.read_to_end(&mut raw))
        .await
        .context("HTTPS answer hung")?
    {
        Ok(_) => {}
        // Servers that close without close_notify: the body is complete.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e.into()),
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no header end in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    Ok((status, body.to_string()))
}

// 8. HTTPS metrics and the admin endpoint with basic authentication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_tls_metrics_over_https_and_admin_basic_auth() -> Result<()> {
    use base64::Engine as _;
    let pki = Pki::new()?;
    let passwords = pki.path().join("passwd");
    edge_auth::set_user(&passwords, "ops", b"s3cret")?;
    edge_auth::set_user(&passwords, "viewer", b"other")?;
    let gw = tls_gateway(&pki)
        .set("metrics.tls", "true")
        .set("auth.password_file", &path_value(&passwords))
        .set("auth.admin_users", "[\"ops\"]")
        // The wrong password below must not hold back the right one.
        .set("limits.login_backoff", "\"0s\"")
        .set("limits.login_backoff_max", "\"0s\"")
        .start()
        .await?;
    let addr = gw.metrics_addr().context("no metrics listener")?;
    let config = client_config(pki.ca.pem(), None)?;

    let (status, body) = https_get(addr, config.clone(), "/metrics", None).await?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("edge_"), "no gateway metrics: {body}");
    // Plain HTTP on the HTTPS port gets no metrics.
    assert!(
        edge_tests::http::get(addr, "/metrics").await.is_err(),
        "plain HTTP answered on the HTTPS listener"
    );

    let basic = |user: &str, pw: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
        )
    };
    let (status, _) = https_get(addr, config.clone(), "/dead-letters", None).await?;
    assert_eq!(status, 401, "no credentials");
    let (status, _) = https_get(
        addr,
        config.clone(),
        "/dead-letters",
        Some(&basic("ops", "wrong")),
    )
    .await?;
    assert_eq!(status, 401, "wrong password");
    let (status, _) = https_get(
        addr,
        config.clone(),
        "/dead-letters",
        Some(&basic("viewer", "other")),
    )
    .await?;
    // A valid user who is not an admin is told no more than a stranger.
    assert_eq!(status, 401, "a user who is not an admin");
    let (status, body) =
        https_get(addr, config, "/dead-letters", Some(&basic("ops", "s3cret"))).await?;
    assert_eq!(status, 200, "{body}");
    gw.shutdown().await?;
    Ok(())
}

/// A rumqttc v5 client over TLS, without user name; connected.
async fn v5_tls_client(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<(rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop)> {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
    let mut opts = rumqttc::v5::MqttOptions::new(unique("v5tls"), "127.0.0.1", addr.port());
    opts.set_keep_alive(std::time::Duration::from_secs(30));
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(config),
    ));
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 16);
    let code = tokio::time::timeout(SHORT, async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::v5::Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack.code),
                Ok(_) => {}
                Err(e) => return Err(anyhow!("v5 connect: {e}")),
            }
        }
    })
    .await
    .context("no CONNACK")??;
    if code != ConnectReturnCode::Success {
        bail!("CONNACK {code:?}");
    }
    Ok((client, eventloop))
}

/// Publishes at QoS 1 and returns the PUBACK's reason.
async fn v5_publish(
    client: &rumqttc::v5::AsyncClient,
    eventloop: &mut rumqttc::v5::EventLoop,
    topic: &str,
) -> Result<rumqttc::v5::mqttbytes::v5::PubAckReason> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    client
        .publish(
            topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            b"m".to_vec(),
        )
        .await?;
    tokio::time::timeout(SHORT, async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::v5::Event::Incoming(Packet::PubAck(ack))) => return Ok(ack.reason),
                Ok(_) => {}
                Err(e) => return Err(anyhow!("v5 publish: {e}")),
            }
        }
    })
    .await
    .context("no PUBACK")?
}

// 9. The client certificate's CN is the MQTT user the ACL applies to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_tls_the_certificate_cn_is_the_mqtt_user_for_acls() -> Result<()> {
    use rumqttc::v5::mqttbytes::v5::PubAckReason;
    let pki = Pki::new()?;
    let (device, _) = pki.client("device", "device-7")?;
    let acl = pki.path().join("acl");
    std::fs::write(&acl, "user device-7\ntopic write devices/device-7/#\n")?;
    let gw = mtls_gateway(&pki, true)
        .set("auth.cert_identity", "\"cn\"")
        .set("auth.allow_anonymous", "false")
        .set("auth.acl_file", &path_value(&acl))
        .start()
        .await?;
    let addr = mqtt_tls_addr(&gw)?;
    let (client, mut eventloop) =
        v5_tls_client(addr, client_config(pki.ca.pem(), Some(&device))?).await?;
    // Accepted: Success, or NoMatchingSubscribers (0x10, also a success).
    let allowed = v5_publish(&client, &mut eventloop, "devices/device-7/temp").await?;
    assert!(
        matches!(
            allowed,
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
        ),
        "publish on the device's own topic: {allowed:?}"
    );
    assert_eq!(
        v5_publish(&client, &mut eventloop, "devices/device-8/temp").await?,
        PubAckReason::NotAuthorized
    );
    assert_eq!(
        v5_publish(&client, &mut eventloop, "elsewhere").await?,
        PubAckReason::NotAuthorized
    );
    gw.shutdown().await?;
    Ok(())
}
