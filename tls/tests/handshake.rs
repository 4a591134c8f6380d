//! edge-tls against real tokio-rustls clients on loopback: versions, client
//! certificates, non-TLS bytes, legacy ClientHellos, reload and load errors.
//! Certificates are made by rcgen into a tempdir per test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use edge_tls::{CertIdentity, HandshakeError, ServerTls, TlsError, TlsFiles, peer_identity};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream as ClientStream;

/// A test certificate authority.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Result<Ca> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let pem = params.self_signed(&key)?.pem();
        Ok(Ca {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// A leaf certificate and its key, both PEM.
    fn leaf(
        &self,
        cn: &str,
        dns: &str,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<(String, String)> {
        self.leaf_with(cn, dns, usage, |_| {})
    }

    fn leaf_with(
        &self,
        cn: &str,
        dns: &str,
        usage: ExtendedKeyUsagePurpose,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> Result<(String, String)> {
        let mut params = CertificateParams::new(vec![dns.to_owned()])?;
        params.distinguished_name = dn(cn);
        params.extended_key_usages = vec![usage];
        tweak(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    fn server_leaf(&self, cn: &str) -> Result<(String, String)> {
        self.leaf(cn, "localhost", ExtendedKeyUsagePurpose::ServerAuth)
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn write(dir: &Path, name: &str, contents: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Writes the server's cert/key (and optionally the client CA) and returns the files.
fn server_files(
    dir: &Path,
    (cert, key): &(String, String),
    client_ca: Option<&Ca>,
    require_client_cert: bool,
) -> Result<TlsFiles> {
    Ok(TlsFiles {
        cert_file: write(dir, "server.crt", cert)?,
        key_file: write(dir, "server.key", key)?,
        client_ca_file: match client_ca {
            Some(ca) => Some(write(dir, "client-ca.crt", &ca.pem)?),
            None => None,
        },
        require_client_cert,
    })
}

/// What the server saw of one connection: the handshake result and, on
/// success, the identities the client certificate carries (CN, SAN).
type Seen = Result<(Option<String>, Option<String>), HandshakeError>;

/// Accepts connections forever, reporting each handshake; echoes on success.
async fn serve(tls: Arc<ServerTls>) -> Result<(SocketAddr, mpsc::UnboundedReceiver<Seen>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tls = Arc::clone(&tls);
            let tx = tx.clone();
            tokio::spawn(async move {
                match tls.accept(tcp).await {
                    Ok(mut stream) => {
                        let cn = peer_identity(&stream, CertIdentity::CommonName);
                        let san = peer_identity(&stream, CertIdentity::SubjectAltName);
                        assert_eq!(peer_identity(&stream, CertIdentity::None), None);
                        let _ = tx.send(Ok((cn, san)));
                        let mut buf = [0u8; 1024];
                        while let Ok(n @ 1..) = stream.read(&mut buf).await {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        }
    });
    Ok((addr, rx))
}

async fn next_seen(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Result<Seen> {
    rx.recv().await.context("server task ended")
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client trusting `ca_pem`, with the given versions and optional client cert.
fn client_config(
    ca_pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
    client_cert: Option<&(String, String)>,
) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)?
        .with_root_certificates(roots);
    let config = match client_cert {
        Some((cert, key)) => {
            let chain =
                CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<_, _>>()?;
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(key.as_bytes())?)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

const BOTH: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

async fn connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<ClientStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
    TlsConnector::from(config).connect(name, tcp).await
}

async fn assert_echo(stream: &mut ClientStream<TcpStream>, payload: &[u8]) -> Result<()> {
    stream.write_all(payload).await?;
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).await?;
    assert_eq!(back, payload);
    Ok(())
}

fn rustls_error(err: &std::io::Error) -> Option<&rustls::Error> {
    err.get_ref()?.downcast_ref::<rustls::Error>()
}

#[tokio::test]
async fn handshake_with_tls13_and_tls12_clients_echoes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("test CA")?;
    let tls = ServerTls::load(server_files(
        dir.path(),
        &ca.server_leaf("gateway")?,
        None,
        false,
    )?)?;
    assert!(tls.describe().contains("gateway"), "{}", tls.describe());
    let (addr, mut seen) = serve(Arc::clone(&tls)).await?;

    for (versions, expected) in [
        (BOTH, rustls::ProtocolVersion::TLSv1_3),
        (
            &[&rustls::version::TLS12][..],
            rustls::ProtocolVersion::TLSv1_2,
        ),
    ] {
        let mut client = connect(addr, client_config(&ca.pem, versions, None)?).await?;
        assert_eq!(client.get_ref().1.protocol_version(), Some(expected));
        assert_eq!(
            next_seen(&mut seen).await?.map_err(|e| anyhow!(e))?,
            (None, None)
        );
        assert_echo(&mut client, b"hello over tls").await?;
    }
    Ok(())
}

#[tokio::test]
async fn client_trusting_another_ca_rejects_the_server() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("test CA")?;
    let other = Ca::new("other CA")?;
    let tls = ServerTls::load(server_files(
        dir.path(),
        &ca.server_leaf("gateway")?,
        None,
        false,
    )?)?;
    let (addr, mut seen) = serve(tls).await?;

    let err = match connect(addr, client_config(&other.pem, BOTH, None)?).await {
        Ok(_) => return Err(anyhow!("handshake succeeded with an untrusted server cert")),
        Err(e) => e,
    };
    assert!(
        matches!(
            rustls_error(&err),
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            ))
        ),
        "{err:?}"
    );
    // The server only sees the client's alert.
    let server_err = next_seen(&mut seen)
        .await?
        .err()
        .context("server handshake succeeded")?;
    assert_eq!(server_err.reason(), "other", "{server_err}");
    Ok(())
}

#[tokio::test]
async fn required_client_certificate_is_checked_and_names_the_user() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("test CA")?;
    let clients = Ca::new("client CA")?;
    let stranger = Ca::new("stranger CA")?;
    let files = server_files(
        dir.path(),
        &ca.server_leaf("gateway")?,
        Some(&clients),
        true,
    )?;
    let (addr, mut seen) = serve(ServerTls::load(files)?).await?;

    // No certificate. In TLS 1.3 the client finishes before the server
    // judges its certificate, so only the server's verdict is asserted.
    let _ = connect(addr, client_config(&ca.pem, BOTH, None)?).await;
    let err = next_seen(&mut seen)
        .await?
        .err()
        .context("accepted a client without cert")?;
    assert_eq!(err.reason(), "no_client_cert", "{err}");

    let foreign = stranger.leaf(
        "mallory",
        "mallory.example",
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let _ = connect(addr, client_config(&ca.pem, BOTH, Some(&foreign))?).await;
    let err = next_seen(&mut seen)
        .await?
        .err()
        .context("accepted a foreign client cert")?;
    assert_eq!(err.reason(), "bad_client_cert", "{err}");

    let good = clients.leaf(
        "alice",
        "alice.devices.example",
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let mut client = connect(addr, client_config(&ca.pem, BOTH, Some(&good))?).await?;
    let (cn, san) = next_seen(&mut seen).await?.map_err(|e| anyhow!(e))?;
    assert_eq!(cn.as_deref(), Some("alice"));
    assert_eq!(san.as_deref(), Some("alice.devices.example"));
    assert_echo(&mut client, b"authenticated").await?;
    Ok(())
}

#[tokio::test]
async fn optional_client_certificate_allows_anonymous_clients() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("test CA")?;
    let clients = Ca::new("client CA")?;
    let files = server_files(
        dir.path(),
        &ca.server_leaf("gateway")?,
        Some(&clients),
        false,
    )?;
    let (addr, mut seen) = serve(ServerTls::load(files)?).await?;

    let mut anonymous = connect(addr, client_config(&ca.pem, BOTH, None)?).await?;
    assert_eq!(
        next_seen(&mut seen).await?.map_err(|e| anyhow!(e))?,
        (None, None)
    );
    assert_echo(&mut anonymous, b"anonymous").await?;

    let good = clients.leaf("bob", "bob.example", ExtendedKeyUsagePurpose::ClientAuth)?;
    let _client = connect(addr, client_config(&ca.pem, BOTH, Some(&good))?).await?;
    let (cn, _) = next_seen(&mut seen).await?.map_err(|e| anyhow!(e))?;
    assert_eq!(cn.as_deref(), Some("bob"));
    Ok(())
}

#[tokio::test]
async fn expired_client_certificate_is_a_bad_client_cert() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("test CA")?;
    let files = server_files(dir.path(), &ca.server_leaf("gateway")?, Some(&ca), true)?;
    let (addr, mut seen) = serve(ServerTls::load(files)?).await?;

    let expired = ca.leaf_with(
        "old",
        "old.example",
        ExtendedKeyUsagePurpose::ClientAuth,
        |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        },
    )?;
    let _ = connect(addr, client_config(&ca.pem, BOTH, Some(&expired))?).await;
    let err = next_seen(&mut seen)
        .await?
        .err()
        .context("accepted an expired client cert")?;
    assert_eq!(err.reason(), "bad_client_cert", "{err}");
    assert!(
        matches!(
            err,
            HandshakeError::BadClientCert(
                rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. }
            )
        ),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn plain_mqtt_on_a_tls_port_is_not_tls() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("test CA")?;
    let tls = ServerTls::load(server_files(
        dir.path(),
        &ca.server_leaf("gateway")?,
        None,
        false,
    )?)?;
    let (addr, mut seen) = serve(tls).await?;

    let mut tcp = TcpStream::connect(addr).await?;
    // An MQTT 3.1.1 CONNECT: fixed header 0x10, remaining length 12, "MQTT", level 4, flags, keep-alive 60.
    tcp.write_all(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00")
        .await?;
    let err = next_seen(&mut seen)
        .await?
        .err()
        .context("accepted plain MQTT")?;
    assert_eq!(err.reason(), "not_tls", "{err}");
    Ok(())
}

#[tokio::test]
async fn peer_closing_mid_handshake_is_eof() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("test CA")?;
    let tls = ServerTls::load(server_files(
        dir.path(),
        &ca.server_leaf("gateway")?,
        None,
        false,
    )?)?;
    let (addr, mut seen) = serve(tls).await?;

    let mut tcp = TcpStream::connect(addr).await?;
    // The first three bytes of a handshake record header, then close.
    tcp.write_all(&[0x16, 0x03, 0x01]).await?;
    tcp.shutdown().await?;
    let err = next_seen(&mut seen)
        .await?
        .err()
        .context("handshake succeeded")?;
    assert_eq!(err.reason(), "eof", "{err}");
    Ok(())
}

/// A minimal pre-TLS-1.2 ClientHello record offering only `legacy_version`
/// (no supported_versions extension). Without `signature_algorithms` it has
/// no extensions at all, as a real TLS 1.0/1.1 client sends; with it, it
/// reaches rustls's version check itself.
fn legacy_client_hello(legacy_version: [u8; 2], signature_algorithms: bool) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&legacy_version); // client_version: 0x0301 = TLS 1.0, 0x0302 = TLS 1.1
    body.extend_from_slice(&[0x5a; 32]); // random: 32 bytes, any value
    body.push(0); // session_id: length 0
    body.extend_from_slice(&[0x00, 0x02, 0xc0, 0x09]); // cipher_suites: 2 bytes, TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA
    body.extend_from_slice(&[0x01, 0x00]); // compression_methods: 1 method, null
    if signature_algorithms {
        body.extend_from_slice(&[0x00, 0x08]); // extensions: 8 bytes
        body.extend_from_slice(&[0x00, 0x0d]); //   type: signature_algorithms
        body.extend_from_slice(&[0x00, 0x04]); //   extension data: 4 bytes
        body.extend_from_slice(&[0x00, 0x02, 0x04, 0x03]); //   list: 2 bytes, ecdsa_secp256r1_sha256
    } // else: the extensions field is omitted entirely

    let mut handshake = vec![0x01]; // msg_type: client_hello
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes();
    handshake.extend_from_slice(&len[1..]); // length: u24
    handshake.extend_from_slice(&body);

    let mut record = vec![0x16]; // ContentType: handshake
    record.extend_from_slice(&legacy_version); // record-layer version
    let len = u16::try_from(handshake.len()).unwrap_or(u16::MAX);
    record.extend_from_slice(&len.to_be_bytes()); // length: u16
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test]
async fn tls10_and_tls11_hellos_are_refused_with_protocol_version() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("test CA")?;
    let tls = ServerTls::load(server_files(
        dir.path(),
        &ca.server_leaf("gateway")?,
        None,
        false,
    )?)?;
    let (addr, mut seen) = serve(tls).await?;

    for version in [[0x03, 0x01], [0x03, 0x02]] {
        for signature_algorithms in [false, true] {
            let case = format!("{version:02x?}, signature_algorithms: {signature_algorithms}");
            let mut tcp = TcpStream::connect(addr).await?;
            tcp.write_all(&legacy_client_hello(version, signature_algorithms))
                .await?;
            let err = next_seen(&mut seen)
                .await?
                .err()
                .context("accepted a legacy hello")?;
            assert_eq!(err.reason(), "protocol_version", "{case}: {err}");
            // A fatal alert record: type 0x15, version (2 bytes), length 2, level 2 (fatal), description.
            let mut reply = Vec::new();
            tcp.read_to_end(&mut reply).await?;
            assert_eq!(reply.first(), Some(&0x15), "{case}: {reply:02x?}");
            assert_eq!(reply.get(5), Some(&2), "{case}: {reply:02x?}");
            if signature_algorithms {
                // 70 = protocol_version (without the extension rustls sends 40, handshake_failure).
                assert_eq!(reply.get(6), Some(&70), "{case}: {reply:02x?}");
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn reload_switches_new_handshakes_and_keeps_old_connections() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("test CA")?;
    let (cert_a, key_a) = ca.server_leaf("server-a")?;
    let files = server_files(dir.path(), &(cert_a.clone(), key_a), None, false)?;
    let tls = ServerTls::load(files.clone())?;
    let (addr, mut seen) = serve(Arc::clone(&tls)).await?;
    let config = client_config(&ca.pem, BOTH, None)?;
    let leaf_of = |stream: &ClientStream<TcpStream>| {
        stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
    };
    let der_of = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).map(|c| c.to_vec());

    let mut old = connect(addr, Arc::clone(&config)).await?;
    next_seen(&mut seen).await?.map_err(|e| anyhow!(e))?;
    assert_eq!(leaf_of(&old), Some(der_of(&cert_a)?));
    assert_echo(&mut old, b"before reload").await?;

    let (cert_b, key_b) = ca.server_leaf("server-b")?;
    std::fs::write(&files.cert_file, &cert_b)?;
    std::fs::write(&files.key_file, &key_b)?;
    tls.reload()?;
    assert!(tls.describe().contains("server-b"), "{}", tls.describe());

    let mut new = connect(addr, Arc::clone(&config)).await?;
    next_seen(&mut seen).await?.map_err(|e| anyhow!(e))?;
    assert_eq!(leaf_of(&new), Some(der_of(&cert_b)?));
    assert_echo(&mut new, b"after reload").await?;
    assert_echo(&mut old, b"old connection still works").await?;

    std::fs::write(
        &files.key_file,
        "-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n",
    )?;
    let err = tls.reload().err().context("reload accepted a broken key")?;
    assert!(
        matches!(&err, TlsError::Key { path, .. } if *path == files.key_file),
        "{err:?}"
    );
    assert!(tls.describe().contains("server-b"), "{}", tls.describe());

    let mut after_failure = connect(addr, config).await?;
    next_seen(&mut seen).await?.map_err(|e| anyhow!(e))?;
    assert_eq!(leaf_of(&after_failure), Some(der_of(&cert_b)?));
    assert_echo(&mut after_failure, b"still cert b").await?;
    Ok(())
}

#[test]
fn load_errors_name_the_file_and_the_problem() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("test CA")?;
    let pair = ca.server_leaf("gateway")?;
    let good = server_files(dir.path(), &pair, Some(&ca), false)?;

    let missing = TlsFiles {
        cert_file: dir.path().join("nope.crt"),
        ..good.clone()
    };
    let err = ServerTls::load(missing.clone())
        .err()
        .context("loaded a missing file")?;
    assert!(
        matches!(&err, TlsError::Read { path, .. } if *path == missing.cert_file),
        "{err:?}"
    );
    assert!(err.to_string().contains("nope.crt"), "{err}");

    let (_, other_key) = ca.server_leaf("someone else")?;
    let mismatched = TlsFiles {
        key_file: write(dir.path(), "other.key", &other_key)?,
        ..good.clone()
    };
    let err = ServerTls::load(mismatched)
        .err()
        .context("loaded a mismatched key")?;
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("other.key"), "{err}");

    for (name, contents) in [
        (
            "bad-base64.crt",
            "-----BEGIN CERTIFICATE-----\n!!not base64!!\n-----END CERTIFICATE-----\n",
        ),
        (
            "not-x509.crt",
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        ),
    ] {
        let garbage = TlsFiles {
            cert_file: write(dir.path(), name, contents)?,
            ..good.clone()
        };
        let err = ServerTls::load(garbage.clone())
            .err()
            .context("loaded a garbage cert")?;
        assert!(
            matches!(&err, TlsError::Certificate { path, .. } if *path == garbage.cert_file),
            "{err:?}"
        );
        assert!(err.to_string().contains(name), "{err}");
    }

    let empty = TlsFiles {
        cert_file: write(dir.path(), "empty.crt", "just text\n")?,
        ..good.clone()
    };
    let err = ServerTls::load(empty)
        .err()
        .context("loaded a cert file without certs")?;
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");

    let no_key = TlsFiles {
        key_file: write(dir.path(), "cert-as.key", &pair.0)?,
        ..good.clone()
    };
    let err = ServerTls::load(no_key)
        .err()
        .context("loaded a key file without a key")?;
    assert!(matches!(err, TlsError::Key { .. }), "{err:?}");

    let bad_ca = TlsFiles {
        client_ca_file: Some(write(dir.path(), "ca.crt", "nothing")?),
        ..good.clone()
    };
    let err = ServerTls::load(bad_ca)
        .err()
        .context("loaded an empty CA file")?;
    assert!(matches!(err, TlsError::Ca { .. }), "{err:?}");
    assert!(err.to_string().contains("ca.crt"), "{err}");

    let no_ca = TlsFiles {
        client_ca_file: None,
        require_client_cert: true,
        ..good.clone()
    };
    let err = ServerTls::load(no_ca)
        .err()
        .context("required client certs without a CA")?;
    assert!(matches!(err, TlsError::Config(_)), "{err:?}");

    let tls = ServerTls::load(good)?;
    let debug = format!("{tls:?}");
    assert!(
        !debug.contains(pair.1.lines().nth(1).unwrap_or("?")),
        "{debug}"
    );
    assert!(debug.contains("gateway"), "{debug}");
    Ok(())
}
