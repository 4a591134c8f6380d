//! `amqps://` upstreams: a private RabbitMQ node with a TLS listener that
//! requires a client certificate, all certificates made by the test (rcgen).
//! The gateway forwards over TLS with the right CA and client identity, and
//! with a CA that did not sign the broker's certificate it forwards nothing,
//! says why in its log, and never falls back to the plain port.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use edge_tests::amqp::{AmqpQueue, QueueSpec};
use edge_tests::mqtt::publish_one;
use edge_tests::{RabbitNode, TestGateway, unique};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

use crate::{SHORT, blocking, gateway_bin};

/// A CA and certificates it signed, all PEM.
struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

/// Parameters with their own common name (a leaf whose subject equals its
/// issuer's would look self-signed to the broker's path validation).
fn params(names: &[&str], common_name: &str) -> Result<CertificateParams> {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    Ok(params)
}

fn ca() -> Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = params(&[], &unique("edge test CA"))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

fn pki() -> Result<Pki> {
    let ca = ca()?;
    let server_key = KeyPair::generate()?;
    let mut server = params(&["127.0.0.1", "localhost"], "broker")?;
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = server.signed_by(&server_key, &ca)?;
    let client_key = KeyPair::generate()?;
    let mut client = params(&["edge-gateway"], "edge-gateway")?;
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client.signed_by(&client_key, &ca)?;
    Ok(Pki {
        ca: ca.pem(),
        server_cert: server.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    })
}

/// A node whose TLS listener verifies clients against the test CA.
async fn tls_node(pki: &Pki) -> Result<(RabbitNode, u16)> {
    let files: Vec<(&'static str, Vec<u8>)> = vec![
        ("ca.pem", pki.ca.clone().into_bytes()),
        ("server.pem", pki.server_cert.clone().into_bytes()),
        ("server.key", pki.server_key.clone().into_bytes()),
    ];
    blocking(move || {
        let borrowed: Vec<(&str, &[u8])> = files.iter().map(|(n, c)| (*n, c.as_slice())).collect();
        RabbitNode::dedicated_with("tls", &borrowed, |dir: &Path, port| {
            let p = |name: &str| dir.join(name).display().to_string();
            format!(
                "listeners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = true\n",
                p("ca.pem"),
                p("server.pem"),
                p("server.key"),
            )
        })
    })
    .await
}

fn write(dir: &Path, name: &str, contents: &str) -> Result<String> {
    let path = dir.join(name);
    std::fs::write(&path, contents)?;
    Ok(path.display().to_string())
}

fn quoted(s: &str) -> String {
    format!("{s:?}")
}

/// A gateway forwarding `<prefix>/#` to `uri` with these TLS files.
async fn gateway(
    uri: &str,
    prefix: &str,
    ca: &str,
    cert: &str,
    key: &str,
) -> Result<edge_tests::GatewayProcess> {
    TestGateway::builder()
        .upstream_with(
            "central",
            &[uri.to_string()],
            &[
                ("tls_ca_file", &quoted(ca)),
                ("tls_cert_file", &quoted(cert)),
                ("tls_key_file", &quoted(key)),
            ],
        )
        .route("all", &format!("{prefix}/#"), "central")
        .spawn(gateway_bin())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_mutual_tls_forwards_and_a_wrong_ca_forwards_nothing() -> Result<()> {
    let pki = pki()?;
    let (node, tls_port) = tls_node(&pki).await?;
    let files = tempfile::tempdir()?;
    let ca_file = write(files.path(), "ca.pem", &pki.ca)?;
    let cert_file = write(files.path(), "client.pem", &pki.client_cert)?;
    let key_file = write(files.path(), "client.key", &pki.client_key)?;
    let other_ca_file = write(files.path(), "other-ca.pem", &ca()?.pem())?;
    let amqps = format!("amqps://guest:guest@127.0.0.1:{tls_port}/%2f");

    // The right CA and a client certificate: forwarded over TLS.
    let prefix = unique("tls");
    let mut queue =
        AmqpQueue::open(&node.amqp_uri(), &QueueSpec::topic(&format!("{prefix}.#"))).await?;
    let gw = gateway(&amqps, &prefix, &ca_file, &cert_file, &key_file).await?;
    publish_one(gw.mqtt_addr(), &format!("{prefix}/a"), b"over tls").await?;
    let got = match queue.next(SHORT).await {
        Ok(got) => got,
        Err(e) => anyhow::bail!("{e}; gateway log:\n{}", gw.log()),
    };
    assert_eq!(got.body_str(), "over tls");
    assert_eq!(got.mqtt_topic(), Some(format!("{prefix}/a").as_str()));
    drop(gw);

    // A CA that did not sign the broker's certificate: nothing forwarded,
    // the reason logged, and the plain port never contacted.
    let prefix = unique("tls-bad");
    let mut queue =
        AmqpQueue::open(&node.amqp_uri(), &QueueSpec::topic(&format!("{prefix}.#"))).await?;
    let gw = gateway(&amqps, &prefix, &other_ca_file, &cert_file, &key_file).await?;
    publish_one(gw.mqtt_addr(), &format!("{prefix}/a"), b"must wait").await?;
    let deadline = tokio::time::Instant::now() + SHORT;
    let log = loop {
        let log = gw.log();
        if log.contains("cannot connect to upstream broker") {
            break log;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no connect failure logged:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let lower = log.to_lowercase();
    assert!(
        lower.contains("certificate") || lower.contains("unknownissuer"),
        "the reason names the certificate:\n{log}"
    );
    assert!(!log.contains("guest:guest"), "password logged:\n{log}");
    assert!(
        queue.next(Duration::from_secs(2)).await.is_err(),
        "nothing may arrive through an unverified link"
    );
    Ok(())
}
