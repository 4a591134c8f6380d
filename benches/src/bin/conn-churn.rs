//! Does memory come back after connections leave? Starts the release
//! gateway as a child process and reads its RSS (`VmRSS` in
//! `/proc/<pid>/status`) idle, with `--connections` MQTT clients connected,
//! subscribed and served, and again after they have all gone.
//!
//! One cycle:
//!
//! 1. open `--connections` raw-socket clients (CONNECT with a clean session,
//!    then one SUBSCRIBE with two filters: `churn/<n>/cmd` and
//!    `churn/all/#`), at most `--concurrency` handshakes at a time;
//! 2. one more client publishes one QoS 0 message to every `churn/<n>/cmd`
//!    and `--broadcasts` to `churn/all/news`; every client reads until it has
//!    all of its deliveries;
//! 3. RSS is read with every client still connected ("peak");
//! 4. every client sends DISCONNECT and closes; the tool polls `/metrics`
//!    until `edge_connections{protocol="mqtt"}` reads 0 (with a deadline),
//!    then waits `--settle` seconds (30 by default: jemalloc, the gateway's
//!    allocator, purges freed pages over its 10 s decay, in steps) and
//!    reads RSS again ("after"); the readings of every second go to stderr.
//!
//! Cycles repeat on the same gateway, so a ratchet shows as "after" growing
//! from cycle to cycle. The subscriptions and deliveries are QoS 0 and no
//! route is configured, so nothing is written to the store (whose page
//! cache would grow RSS for reasons other than the allocator).
//!
//! Each client is a socket in this process and one in the gateway: the
//! open-file limit must exceed `--connections` (`ulimit -n 8192`).
//!
//! ```sh
//! cargo build --release -p edge-gateway -p edge-benches
//! target/release/conn-churn --connections 2000 --cycles 3
//! target/release/conn-churn --env _RJEM_MALLOC_CONF=dirty_decay_ms:1000   # allocator settings
//! target/release/conn-churn --gateway /tmp/edge-gateway-glibc --env MALLOC_ARENA_MAX=1
//! ```
//!
//! Output: progress on stderr, one `key=value` line per cycle and a summary
//! line on stdout.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Buf, BufMut, BytesMut};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

#[derive(Debug, Parser)]
#[command(about = "RSS of the gateway before, during and after MQTT connection churn")]
struct Args {
    /// The gateway binary; default: `edge-gateway` next to this binary.
    #[arg(long)]
    gateway: Option<PathBuf>,
    /// Clients per cycle.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Connect/disconnect cycles on the same gateway.
    #[arg(long, default_value_t = 3)]
    cycles: usize,
    /// QoS 0 messages on `churn/all/news`, delivered to every client.
    #[arg(long, default_value_t = 3)]
    broadcasts: usize,
    /// Payload bytes of every published message.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Handshakes (CONNECT..SUBACK) in progress at once.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Seconds to wait after the last connection is gone before reading RSS
    /// (jemalloc's background thread purges freed pages over ~10-20 s).
    #[arg(long, default_value_t = 30)]
    settle: u64,
    /// Bound on each phase (connect, deliver, drain), in seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// `KEY=VALUE` added to the gateway's environment (repeatable), e.g.
    /// `MALLOC_ARENA_MAX=2`.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    envs: Vec<String>,
    /// Label printed first on every result line.
    #[arg(long, default_value = "")]
    label: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("conn-churn: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("conn-churn: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.connections == 0 || args.cycles == 0 || args.concurrency == 0 {
        bail!("--connections, --cycles and --concurrency must be at least 1");
    }
    check_open_files(args.connections)?;
    let binary = match &args.gateway {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("locating this binary")?
            .with_file_name("edge-gateway"),
    };
    let gateway = Gateway::start(&binary, &args).await?;
    let result = churn(&gateway, &args).await;
    gateway.stop();
    result
}

async fn churn(gateway: &Gateway, args: &Args) -> anyhow::Result<()> {
    let limit = Duration::from_secs(args.timeout);
    let label = if args.label.is_empty() {
        String::new()
    } else {
        format!("label={} ", args.label)
    };
    // Let start-up allocations (store open, runtime threads) finish.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = gateway.memory()?;
    eprintln!("idle: {} kB RSS ({} threads)", idle.rss_kb, idle.threads);
    let per_conn =
        |peak_kb: u64| peak_kb.saturating_sub(idle.rss_kb) as f64 / args.connections as f64;
    let mut peaks = Vec::with_capacity(args.cycles);
    let mut afters = Vec::with_capacity(args.cycles);
    for cycle in 1..=args.cycles {
        let started = Instant::now();
        let clients = connect_all(gateway.mqtt, cycle, args, limit).await?;
        let clients = deliver(gateway.mqtt, clients, args, limit).await?;
        let peak = gateway.memory()?;
        eprintln!(
            "cycle {cycle}: {} clients served in {:.1} s, {} kB RSS ({} threads)",
            clients.len(),
            started.elapsed().as_secs_f64(),
            peak.rss_kb,
            peak.threads
        );
        close_all(clients).await;
        let drained = Instant::now();
        wait_connections_zero(gateway.metrics, limit).await?;
        let drained = drained.elapsed();
        // One reading a second, on stderr, shows how fast memory comes back.
        let mut trace = Vec::new();
        for _ in 0..args.settle {
            tokio::time::sleep(Duration::from_secs(1)).await;
            trace.push((gateway.memory()?.rss_kb / 1024).to_string());
        }
        eprintln!(
            "cycle {cycle}: RSS MiB each second after the drain: {}",
            trace.join(" ")
        );
        let after = gateway.memory()?;
        println!(
            "{label}cycle={cycle} connections={} idle_kb={} peak_kb={} after_kb={} \
             per_conn_kb={:.1} after_over_idle_kb={} drain_ms={} settle_s={}",
            args.connections,
            idle.rss_kb,
            peak.rss_kb,
            after.rss_kb,
            per_conn(peak.rss_kb),
            after.rss_kb.saturating_sub(idle.rss_kb),
            drained.as_millis(),
            args.settle
        );
        peaks.push(peak.rss_kb);
        afters.push(after.rss_kb);
    }
    let max_peak = peaks.iter().copied().max().unwrap_or(0);
    let afters: Vec<String> = afters.iter().map(u64::to_string).collect();
    println!(
        "{label}summary connections={} cycles={} idle_kb={} max_peak_kb={max_peak} \
         per_conn_kb={:.1} after_kb={}",
        args.connections,
        args.cycles,
        idle.rss_kb,
        per_conn(max_peak),
        afters.join(",")
    );
    Ok(())
}

/// Fails early, with the fix, when the open-file limit cannot hold the
/// clients (this process holds one socket per client, so does the gateway).
fn check_open_files(connections: usize) -> anyhow::Result<()> {
    let limits =
        std::fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(soft) = soft
        && soft < connections + 256
    {
        bail!(
            "the open-file limit is {soft}, too low for {connections} connections: \
             raise it first (ulimit -n 8192)"
        );
    }
    Ok(())
}

/// The gateway under measurement, a child process with its own directory.
#[derive(Debug)]
struct Gateway {
    child: std::sync::Mutex<Option<Child>>,
    pid: u32,
    mqtt: SocketAddr,
    metrics: SocketAddr,
    dir: tempfile::TempDir,
}

#[derive(Debug, Clone, Copy)]
struct Memory {
    rss_kb: u64,
    threads: u64,
}

impl Gateway {
    async fn start(binary: &Path, args: &Args) -> anyhow::Result<Gateway> {
        if !binary.is_file() {
            bail!(
                "no gateway binary at {} (cargo build --release -p edge-gateway, or --gateway PATH)",
                binary.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("conn-churn-")
            .tempdir()
            .context("creating the gateway's directory")?;
        let mqtt = free_port()?;
        let metrics = free_port()?;
        // Room for every client of a cycle plus the publisher and stragglers
        // of the previous cycle.
        let max_connections = (args.connections + 500).max(2500);
        let config = format!(
            "[gateway]\nid = \"conn-churn\"\ndata_dir = {:?}\nshutdown_grace = \"5s\"\n\n\
             [mqtt]\nlisten = \"{mqtt}\"\nmax_connections = {max_connections}\n\n\
             [metrics]\nlisten = \"{metrics}\"\n\n\
             [limits]\nmax_connections_per_source = 100000\nconnection_rate_per_source = 1000000\n",
            dir.path().join("data").display().to_string()
        );
        let config_path = dir.path().join("gateway.toml");
        std::fs::write(&config_path, config).context("writing gateway.toml")?;
        let log = std::fs::File::create(dir.path().join("gateway.log"))
            .context("creating gateway.log")?;
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating the log file")?)
            .stderr(log);
        for pair in &args.envs {
            let (key, value) = pair
                .split_once('=')
                .with_context(|| format!("--env {pair:?} is not KEY=VALUE"))?;
            command.env(key, value);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let gateway = Gateway {
            pid: child.id(),
            child: std::sync::Mutex::new(Some(child)),
            mqtt,
            metrics,
            dir,
        };
        gateway.wait_ready(Duration::from_secs(30)).await?;
        eprintln!(
            "gateway {} (pid {}) on {mqtt}, metrics on {metrics}",
            binary.display(),
            gateway.pid
        );
        Ok(gateway)
    }

    async fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(mut child) = self.child.lock()
                && let Some(c) = child.as_mut()
                && let Some(status) = c.try_wait().context("waiting for the gateway")?
            {
                *child = None;
                bail!(
                    "the gateway exited during start-up ({status}):\n{}",
                    self.log()
                );
            }
            if let Ok((200, _)) = http_get(self.metrics, "/healthz").await
                && TcpStream::connect(self.mqtt).await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the gateway was not ready within {limit:?}:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn memory(&self) -> anyhow::Result<Memory> {
        let path = format!("/proc/{}/status", self.pid);
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no {name} in {path}"))
        };
        Ok(Memory {
            rss_kb: field("VmRSS:")?,
            threads: field("Threads:")?,
        })
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default();
        let start = text.len().saturating_sub(4096);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        text[start..].to_string()
    }

    /// SIGTERM, a bounded wait for a clean exit, then SIGKILL.
    fn stop(&self) {
        let Ok(mut guard) = self.child.lock() else {
            return;
        };
        if let Some(child) = guard.take() {
            edge_benches::mqtt::stop_child(child);
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding an ephemeral port")?;
    listener.local_addr().context("reading the ephemeral port")
}

/// A raw MQTT 3.1.1 client: a socket and the bytes of a partial packet.
#[derive(Debug)]
struct Client {
    index: usize,
    stream: TcpStream,
    buf: BytesMut,
}

impl Client {
    async fn connect(addr: SocketAddr, index: usize, client_id: &str) -> anyhow::Result<Client> {
        let stream = TcpStream::connect(addr).await.context("connecting")?;
        stream.set_nodelay(true).context("setting TCP_NODELAY")?;
        let mut client = Client {
            index,
            stream,
            buf: BytesMut::with_capacity(256),
        };
        client.send(&connect_packet(client_id)).await?;
        let (header, body) = client.read_packet().await?;
        if header != 0x20 || body.len() != 2 || body[1] != 0 {
            bail!("expected CONNACK accepted, got header {header:#04x} body {body:?}");
        }
        Ok(client)
    }

    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(bytes).await.context("writing")
    }

    /// The next whole packet: its first byte and its body.
    async fn read_packet(&mut self) -> anyhow::Result<(u8, BytesMut)> {
        loop {
            if let Some((header, length, offset)) = parse_fixed_header(&self.buf)?
                && self.buf.len() >= offset + length
            {
                self.buf.advance(offset);
                let body = self.buf.split_to(length);
                return Ok((header, body));
            }
            if self
                .stream
                .read_buf(&mut self.buf)
                .await
                .context("reading")?
                == 0
            {
                bail!("the gateway closed the connection");
            }
        }
    }
}

/// `(first byte, remaining length, header length)` once the fixed header is
/// complete.
fn parse_fixed_header(buf: &[u8]) -> anyhow::Result<Option<(u8, usize, usize)>> {
    let Some(&header) = buf.first() else {
        return Ok(None);
    };
    let mut length = 0usize;
    for (i, &byte) in buf.iter().skip(1).take(4).enumerate() {
        length |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((header, length, i + 2)));
        }
    }
    if buf.len() >= 5 {
        bail!("malformed remaining length");
    }
    Ok(None)
}

fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(header);
    let mut length = body.len();
    loop {
        let mut byte = (length % 128) as u8;
        length /= 128;
        if length > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if length == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn put_str(body: &mut BytesMut, s: &str) {
    // Topic names and client ids here are short ASCII.
    body.put_u16(s.len() as u16);
    body.put_slice(s.as_bytes());
}

fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = BytesMut::new();
    put_str(&mut body, "MQTT");
    body.put_u8(4); // protocol level 3.1.1
    body.put_u8(0x02); // clean session
    body.put_u16(300); // keep-alive seconds, longer than any hold
    put_str(&mut body, client_id);
    packet(0x10, &body)
}

fn subscribe_packet(filters: &[String]) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_u16(1); // packet id
    for filter in filters {
        put_str(&mut body, filter);
        body.put_u8(0); // QoS 0
    }
    packet(0x82, &body)
}

fn publish_packet(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = BytesMut::new();
    put_str(&mut body, topic);
    body.put_slice(payload);
    packet(0x30, &body)
}

const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// Connects and subscribes every client of a cycle.
async fn connect_all(
    addr: SocketAddr,
    cycle: usize,
    args: &Args,
    limit: Duration,
) -> anyhow::Result<Vec<Client>> {
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let run_id = std::process::id();
    let mut tasks = JoinSet::new();
    for index in 0..args.connections {
        let permits = Arc::clone(&permits);
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.context("semaphore closed")?;
            let id = format!("churn-{run_id}-{cycle}-{index}");
            let mut client = Client::connect(addr, index, &id)
                .await
                .with_context(|| format!("client {index}"))?;
            let filters = [format!("churn/{index}/cmd"), "churn/all/#".to_string()];
            client.send(&subscribe_packet(&filters)).await?;
            let (header, body) = client.read_packet().await?;
            if header != 0x90 || body.len() != 2 + filters.len() || body[2..].contains(&0x80) {
                bail!("client {index}: expected SUBACK granting both filters, got {header:#04x} {body:?}");
            }
            Ok::<_, anyhow::Error>(client)
        });
    }
    let clients = collect(
        &mut tasks,
        args.connections,
        limit,
        "connecting and subscribing",
    )
    .await?;
    Ok(clients)
}

/// Publishes one message to every client's own filter and `--broadcasts` to
/// all, and waits until every client has read its deliveries.
async fn deliver(
    addr: SocketAddr,
    clients: Vec<Client>,
    args: &Args,
    limit: Duration,
) -> anyhow::Result<Vec<Client>> {
    let expected = 1 + args.broadcasts;
    let mut tasks = JoinSet::new();
    for mut client in clients {
        tasks.spawn(async move {
            for _ in 0..expected {
                let (header, _) = client.read_packet().await?;
                if header >> 4 != 3 {
                    bail!(
                        "client {}: expected PUBLISH, got {header:#04x}",
                        client.index
                    );
                }
            }
            Ok::<_, anyhow::Error>(client)
        });
    }

    let payload = vec![b'x'; args.payload];
    let mut publisher = Client::connect(
        addr,
        usize::MAX,
        &format!("churn-{}-pub", std::process::id()),
    )
    .await
    .context("the publisher")?;
    let mut bytes = Vec::new();
    for index in 0..args.connections {
        bytes.extend(publish_packet(&format!("churn/{index}/cmd"), &payload));
        if bytes.len() > 64 * 1024 {
            publisher.send(&bytes).await?;
            bytes.clear();
        }
    }
    for _ in 0..args.broadcasts {
        bytes.extend(publish_packet("churn/all/news", &payload));
    }
    publisher.send(&bytes).await?;

    let clients = collect(&mut tasks, args.connections, limit, "delivering").await;
    publisher.send(&DISCONNECT).await.ok();
    drop(publisher);
    clients
}

async fn collect(
    tasks: &mut JoinSet<anyhow::Result<Client>>,
    expected: usize,
    limit: Duration,
    phase: &str,
) -> anyhow::Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(expected);
    let joined = tokio::time::timeout(limit, async {
        while let Some(joined) = tasks.join_next().await {
            clients.push(joined.context("a client task failed")??);
        }
        Ok::<_, anyhow::Error>(())
    })
    .await;
    match joined {
        Ok(result) => result.with_context(|| format!("while {phase}"))?,
        Err(_) => {
            tasks.abort_all();
            bail!(
                "{phase}: {} of {expected} clients done after {limit:?}",
                clients.len()
            );
        }
    }
    clients.sort_by_key(|c| c.index);
    Ok(clients)
}

async fn close_all(clients: Vec<Client>) {
    let mut tasks = JoinSet::new();
    for mut client in clients {
        tasks.spawn(async move {
            client.send(&DISCONNECT).await.ok();
            client.stream.shutdown().await.ok();
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Polls `/metrics` until `edge_connections{protocol="mqtt"}` is 0 (an
/// absent gauge counts as 0).
async fn wait_connections_zero(metrics: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let (status, body) = http_get(metrics, "/metrics").await?;
        if status != 200 {
            bail!("GET /metrics answered {status}");
        }
        let open = body
            .lines()
            .find_map(|l| l.strip_prefix("edge_connections{protocol=\"mqtt\"} "))
            .map(|v| v.trim().parse::<f64>())
            .transpose()
            .context("parsing edge_connections")?
            .unwrap_or(0.0);
        if open == 0.0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("edge_connections{{protocol=\"mqtt\"}} still {open} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A minimal HTTP/1.1 GET on a blocking thread: status and body.
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to {addr}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .context("setting a read timeout")?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .context("sending the request")?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .context("reading the response")?;
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("no HTTP status")?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    })
    .await
    .context("the HTTP task panicked")?
}
