//! The cost of TLS on the MQTT listener, the gateway beside Mosquitto, same
//! machine, same run: QoS 1 ingest over TLS as a ratio of plain TCP, TLS
//! handshakes (each followed by CONNECT/CONNACK) per second, and memory
//! per idle TLS connection (RSS growth with `--idle` connected clients).
//!
//! The certificates are made here (rcgen): a CA and a server certificate
//! for 127.0.0.1, ECDSA P-256. Both brokers run as private child processes
//! with a plain and a TLS listener side by side; the clients are rumqttc
//! over rustls (ring), identical for both.
//!
//! Output: one `key=value` line per measurement, then the ratios.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use edge_benches::mqtt::{Broker, Kind, connect, free_port, options, wait_for};
use rumqttc::{Event, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport};

#[derive(Debug, Parser)]
#[command(about = "TLS vs plain MQTT on the gateway and on Mosquitto")]
struct Args {
    /// The gateway binary (a release build).
    #[arg(long, default_value = "target/release/edge-gateway")]
    gateway: PathBuf,
    /// Concurrent QoS 1 publishers.
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Messages per publisher.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Client-side window of unacknowledged publishes.
    #[arg(long, default_value_t = 64)]
    inflight: u16,
    /// TLS handshakes (+ CONNECT/CONNACK) to time.
    #[arg(long, default_value_t = 1000)]
    handshakes: usize,
    /// Concurrent handshakes.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Idle connections held for the memory figure.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// Runs of each ingest measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tls-figures: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tls-figures: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// PEM files in a directory every broker user can read.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    client: Arc<rustls::ClientConfig>,
}

fn pki() -> anyhow::Result<Pki> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let dir = tempfile::Builder::new()
        .prefix("edge-bench-pki-")
        .tempdir()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "edge bench CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "bench broker");
    let cert = params.signed_by(&key, &ca)?;
    let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
        let path = dir.path().join(name);
        std::fs::write(&path, text)?;
        set_mode(&path, 0o644)?;
        Ok(path)
    };
    let ca_path = write("ca.pem", &ca.pem())?;
    let cert_path = write("server.pem", &cert.pem())?;
    let key_path = write("server.key", &key.serialize_pem())?;
    set_mode(dir.path(), 0o755)?;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone())?;
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Pki {
        _dir: dir,
        ca: ca_path,
        cert: cert_path,
        key: key_path,
        client: Arc::new(client),
    })
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// A broker with a plain and a TLS listener.
fn start(kind: Kind, gateway: &Path, pki: &Pki, tls: SocketAddr) -> anyhow::Result<Broker> {
    let extra = match kind {
        Kind::Gateway => format!(
            "tls_listen = \"{tls}\"\nmax_connections = 20000\nmax_handshakes = 20000\n\
             max_handshakes_per_source = 20000\n\n[tls]\ncert_file = {:?}\nkey_file = {:?}\n\n\
             [amqp]\nenabled = false\n",
            pki.cert.display().to_string(),
            pki.key.display().to_string()
        ),
        Kind::Mosquitto => format!(
            "max_connections -1\nlistener {} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
            tls.port(),
            pki.ca.display(),
            pki.cert.display(),
            pki.key.display()
        ),
    };
    Broker::start(kind, gateway, &extra)
}

fn client_options(pki: &Pki, id: String, addr: SocketAddr, tls: bool, a: &Args) -> MqttOptions {
    let mut o = options(id, addr, true, a.inflight, a.payload);
    if tls {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            pki.client.clone(),
        )));
    }
    o
}

/// Messages a second, all publishers together, until the last PUBACK.
async fn ingest(pki: &Pki, addr: SocketAddr, tls: bool, a: &Args) -> anyhow::Result<f64> {
    let payload = Bytes::from(vec![b'x'; a.payload]);
    let mut clients = Vec::new();
    for i in 0..a.publishers {
        let id = format!("tlsfig-{}-{i}", std::process::id());
        clients.push(connect(client_options(pki, id, addr, tls, a), 60).await?);
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (client, mut eventloop)) in clients.into_iter().enumerate() {
        let payload = payload.clone();
        let messages = a.messages;
        tasks.spawn(async move {
            let topic = format!("tlsfig/{i}");
            let producer = tokio::spawn({
                let client = client.clone();
                async move {
                    for _ in 0..messages {
                        if client
                            .publish_bytes(topic.as_str(), QoS::AtLeastOnce, false, payload.clone())
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            });
            let mut acked = 0;
            while acked < messages {
                match eventloop.poll().await? {
                    Event::Incoming(Packet::PubAck(_)) => acked += 1,
                    Event::Outgoing(Outgoing::Disconnect) => bail!("disconnected"),
                    _ => {}
                }
            }
            producer.abort();
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok((a.publishers * a.messages) as f64 / elapsed)
}

/// TLS handshake + CONNECT/CONNACK + DISCONNECT, `concurrency` at a time.
async fn handshakes(pki: &Pki, addr: SocketAddr, a: &Args) -> anyhow::Result<f64> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..a.concurrency {
        let next = next.clone();
        let config = pki.client.clone();
        let total = a.handshakes;
        tasks.spawn(async move {
            let connector = tokio_rustls::TlsConnector::from(config);
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= total {
                    return anyhow::Ok(());
                }
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let mut tls = connector.connect(name.clone(), tcp).await?;
                mqtt_connect(&mut tls, n).await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(a.handshakes as f64 / start.elapsed().as_secs_f64())
}

/// A minimal MQTT 3.1.1 CONNECT (clean session, client id `hs<n>`), its
/// CONNACK, and DISCONNECT.
async fn mqtt_connect<S>(stream: &mut S, n: usize) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let id = format!("hs{n}");
    let mut packet = vec![0x10, 0];
    packet.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60]);
    packet.extend_from_slice(&(id.len() as u16).to_be_bytes());
    packet.extend_from_slice(id.as_bytes());
    packet[1] = (packet.len() - 2) as u8;
    stream.write_all(&packet).await?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await?;
    if connack[0] != 0x20 || connack[3] != 0 {
        bail!("CONNACK refused: {connack:?}");
    }
    stream.write_all(&[0xE0, 0]).await?;
    stream.shutdown().await?;
    Ok(())
}

/// RSS growth per connection with `idle` connected, silent clients.
async fn idle_memory(
    broker: &Broker,
    pki: &Pki,
    addr: SocketAddr,
    tls: bool,
    a: &Args,
) -> anyhow::Result<f64> {
    let before = broker.rss_kb()?;
    let mut held = Vec::with_capacity(a.idle);
    for i in 0..a.idle {
        let id = format!("idle-{}-{tls}-{i}", std::process::id());
        let mut o = client_options(pki, id, addr, tls, a);
        o.set_keep_alive(Duration::from_secs(600));
        let (client, mut eventloop) = connect(o, 60).await?;
        // Keep polling so the client answers nothing but stays open.
        let task = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        held.push((client, task));
    }
    // Let the broker settle its buffers.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = broker.rss_kb()?;
    for (client, task) in held {
        let _ = client.disconnect().await;
        task.abort();
    }
    Ok((after.saturating_sub(before)) as f64 * 1024.0 / a.idle as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

async fn run(a: Args) -> anyhow::Result<()> {
    let pki = pki()?;
    let mut ratios = Vec::new();
    for kind in [Kind::Gateway, Kind::Mosquitto] {
        let tls_addr = free_port()?;
        let broker = start(kind, &a.gateway, &pki, tls_addr)?;
        // Both listeners up before timing.
        let probe = client_options(&pki, "probe".into(), tls_addr, true, &a);
        let (c, mut e) = connect(probe, 30).await?;
        let _ = c.disconnect().await;
        let _ = wait_for(&mut e, |_| true).await;
        let mut plain = Vec::new();
        let mut tls = Vec::new();
        for _ in 0..a.runs {
            plain.push(ingest(&pki, broker.addr, false, &a).await?);
            tls.push(ingest(&pki, tls_addr, true, &a).await?);
        }
        let (plain, tls) = (median(plain), median(tls));
        let hs = handshakes(&pki, tls_addr, &a).await?;
        let mem_plain = idle_memory(&broker, &pki, broker.addr, false, &a).await?;
        let mem_tls = idle_memory(&broker, &pki, tls_addr, true, &a).await?;
        println!(
            "broker={} qos1_plain_msgs_per_s={plain:.0} qos1_tls_msgs_per_s={tls:.0} tls_over_plain={:.2} \
             tls_handshakes_per_s={hs:.0} idle_bytes_per_plain_conn={mem_plain:.0} idle_bytes_per_tls_conn={mem_tls:.0}",
            kind.name(),
            tls / plain
        );
        ratios.push((kind, plain, tls, hs, mem_tls));
        drop(broker);
    }
    if let [(_, gp, gt, gh, gm), (_, mp, mt, mh, mm)] = ratios[..] {
        println!(
            "gateway_vs_mosquitto plain_ingest={:.2} tls_ingest={:.2} tls_handshakes={:.2} idle_tls_memory={:.2}",
            gp / mp,
            gt / mt,
            gh / mh,
            gm / mm.max(1.0)
        );
    }
    Ok(())
}
