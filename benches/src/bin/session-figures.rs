//! The broker figures of issue 6 that `compare.sh` does not take: each case
//! starts its brokers (the release edge-gateway, and Mosquitto where a
//! ratio to it is asked for) as private child processes on loopback with
//! data in a temporary directory, runs `--rounds` interleaved rounds and
//! prints one `key=value` line per measurement and a summary per case with
//! the median of the per-round ratios. Publish loads are `mqtt-load`
//! (next to this binary) run as a child process.
//!
//! Cases (`--case`, repeatable; all by default):
//!
//! - `nonmatching`: the same publish loads with no other subscription and
//!   with `--filters` (10,000) non-matching subscriptions held by
//!   `--holders` connections (`load/x<n>/cmd`, `load/x<n>/config/+`: they
//!   share the topic's first level, as device filters do). One broker per
//!   kind; the subscriptions come and go between loads (order none, many,
//!   many, none, ...). Ratio: msgs/s with none / msgs/s with many (= cost).
//! - `drain`: a persistent session (clean session = 0, QoS 1 on `load/#`)
//!   leaves; `--queued` QoS 1 messages are published; it reconnects and
//!   reads (acknowledging each) until it has them all. msgs/s from the
//!   reconnect to the last message, gateway and Mosquitto, ratio.
//! - `idle`: RSS (`VmRSS`) before and after `--idle` clean-session
//!   connections that only connected; KiB per connection, both brokers.
//!   Needs `ulimit -n` above the count.
//! - `disk`: the gateway's `/proc/<pid>/io` `write_bytes` across
//!   `--disk-messages` QoS 1 publishes fanned out to 0, 1 and 100 persistent
//!   sessions that are offline (a fresh gateway for each); bytes per message
//!   and ratios to 1 session.
//!
//! ```sh
//! cargo build --release -p edge-gateway -p edge-benches
//! ulimit -n 8192; target/release/session-figures --rounds 3
//! ```

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use edge_benches::mqtt::{Broker, Kind, connect, disconnect, median, options, receive, subscribe};
use rumqttc::{AsyncClient, EventLoop, QoS};
use tokio::task::JoinSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Case {
    Nonmatching,
    Drain,
    Idle,
    Disk,
}

#[derive(Debug, Parser)]
#[command(
    about = "Issue 6 broker figures: non-matching subscriptions, offline drain, idle RSS, disk bytes"
)]
struct Args {
    /// Cases to run (repeatable); all by default.
    #[arg(long, value_enum)]
    case: Vec<Case>,
    /// Interleaved rounds per case.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The gateway binary; default: `edge-gateway` next to this binary.
    #[arg(long)]
    gateway: Option<PathBuf>,
    /// Payload bytes of every published message.
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// nonmatching: subscriptions that match nothing published.
    #[arg(long, default_value_t = 10_000)]
    filters: usize,
    /// nonmatching: connections holding them.
    #[arg(long, default_value_t = 10)]
    holders: usize,
    /// drain: messages queued for the offline session.
    #[arg(long, default_value_t = 100_000)]
    queued: usize,
    /// idle: connections held.
    #[arg(long, default_value_t = 2_000)]
    idle: usize,
    /// disk: messages published per measurement.
    #[arg(long, default_value_t = 5_000)]
    disk_messages: usize,
    /// disk: the numbers of offline persistent sessions compared.
    #[arg(long, value_delimiter = ',', default_value = "0,1,100")]
    sessions: Vec<usize>,
    /// Bound on each load or phase, in seconds.
    #[arg(long, default_value_t = 90)]
    timeout: u64,
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if args.case.is_empty() {
        args.case = vec![Case::Nonmatching, Case::Drain, Case::Idle, Case::Disk];
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("session-figures: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("session-figures: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Binaries and settings every case uses.
#[derive(Debug)]
struct Env {
    gateway: PathBuf,
    mqtt_load: PathBuf,
    payload: usize,
    timeout: u64,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let here = std::env::current_exe().context("locating this binary")?;
    let env = Env {
        gateway: args
            .gateway
            .clone()
            .unwrap_or_else(|| here.with_file_name("edge-gateway")),
        mqtt_load: here.with_file_name("mqtt-load"),
        payload: args.payload,
        timeout: args.timeout,
    };
    for path in [&env.gateway, &env.mqtt_load] {
        if !path.is_file() {
            bail!(
                "no binary at {} (cargo build --release -p edge-gateway -p edge-benches)",
                path.display()
            );
        }
    }
    println!("loadavg_start={}", loadavg());
    for case in &args.case {
        match case {
            Case::Nonmatching => nonmatching(&env, &args).await?,
            Case::Drain => drain(&env, &args).await?,
            Case::Idle => idle(&env, &args).await?,
            Case::Disk => disk(&env, &args).await?,
        }
    }
    println!("loadavg_end={}", loadavg());
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(","))
        .unwrap_or_default()
}

/// Runs `mqtt-load` against `broker` and returns its result line.
fn mqtt_load(env: &Env, broker: &Broker, load: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(&env.mqtt_load)
        .arg("--port")
        .arg(broker.addr.port().to_string())
        .arg("--payload")
        .arg(env.payload.to_string())
        .arg("--timeout")
        .arg(env.timeout.to_string())
        .args(load)
        .output()
        .context("running mqtt-load")?;
    if !output.status.success() {
        bail!(
            "mqtt-load {load:?} against {} failed: {}\n{}",
            broker.kind.name(),
            String::from_utf8_lossy(&output.stderr),
            broker.log()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// The value of `key=` in a result line.
fn field(line: &str, key: &str) -> anyhow::Result<f64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} in {line:?}"))
}

fn start(
    env: &Env,
    kind: Kind,
    gateway_extra: &str,
    mosquitto_extra: &str,
) -> anyhow::Result<Broker> {
    match kind {
        Kind::Gateway => Broker::start(kind, &env.gateway, gateway_extra),
        Kind::Mosquitto => Broker::start(kind, &env.gateway, mosquitto_extra),
    }
}

// ---------------------------------------------------------------- nonmatching

/// Connections holding subscriptions that match nothing, polled in the
/// background so they answer pings.
struct Holders {
    clients: Vec<AsyncClient>,
    pollers: JoinSet<()>,
}

impl Holders {
    async fn open(
        env: &Env,
        broker: &Broker,
        filters: usize,
        holders: usize,
    ) -> anyhow::Result<Holders> {
        let per = filters.div_ceil(holders.max(1));
        let mut clients = Vec::new();
        let mut pollers = JoinSet::new();
        let run_id = std::process::id();
        for h in 0..holders {
            let first = h * per;
            let last = ((h + 1) * per).min(filters);
            let opts = options(
                format!("hold-{run_id}-{h}"),
                broker.addr,
                true,
                64,
                256 * 1024,
            );
            let (client, mut eventloop) = connect(opts, env.timeout).await?;
            // Half device command topics, half config filters with a `+`.
            let filters = (first..last).map(|n| {
                if n % 2 == 0 {
                    format!("load/x{}/cmd", n / 2)
                } else {
                    format!("load/x{}/config/+", n / 2)
                }
            });
            // SUBSCRIBEs of 500 filters (a packet of ~10 KB).
            let all: Vec<String> = filters.collect();
            for chunk in all.chunks(500) {
                subscribe(&client, &mut eventloop, chunk.to_vec(), QoS::AtLeastOnce).await?;
            }
            pollers.spawn(async move { while eventloop.poll().await.is_ok() {} });
            clients.push(client);
        }
        Ok(Holders { clients, pollers })
    }

    async fn close(mut self) {
        for client in &self.clients {
            client.disconnect().await.ok();
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.pollers.join_next().await.is_some() {}
        })
        .await;
        self.pollers.abort_all();
    }
}

async fn nonmatching(env: &Env, args: &Args) -> anyhow::Result<()> {
    let loads: [(&str, Vec<&str>); 2] = [
        (
            "qos0 4 pub x 50k",
            vec!["--qos", "0", "--publishers", "4", "--messages", "50000"],
        ),
        (
            "qos1 1 pub x 20k, 100 in flight",
            vec![
                "--qos",
                "1",
                "--publishers",
                "1",
                "--messages",
                "20000",
                "--inflight",
                "100",
            ],
        ),
    ];
    for kind in [Kind::Gateway, Kind::Mosquitto] {
        let broker = start(
            env,
            kind,
            "max_inflight = 100",
            "max_inflight_messages 100\nmax_queued_messages 1000\n",
        )?;
        // ratios[load] = per-round (msgs/s with none) / (msgs/s with many)
        let mut ratios = vec![Vec::new(); loads.len()];
        // cpu_ratios[load] = per-round broker CPU per message, many / none
        let mut cpu_ratios = vec![Vec::new(); loads.len()];
        for round in 1..=args.rounds {
            let order: [bool; 2] = if round % 2 == 1 {
                [false, true]
            } else {
                [true, false]
            };
            let mut rates = vec![[0.0f64; 2]; loads.len()];
            let mut cpus = vec![[0.0f64; 2]; loads.len()];
            for many in order {
                let holders = if many {
                    let t = Instant::now();
                    let h = Holders::open(env, &broker, args.filters, args.holders).await?;
                    eprintln!(
                        "{}: {} subscriptions on {} connections in {:.1} s",
                        kind.name(),
                        args.filters,
                        args.holders,
                        t.elapsed().as_secs_f64()
                    );
                    Some(h)
                } else {
                    None
                };
                for (i, (name, load)) in loads.iter().enumerate() {
                    let ticks = broker.cpu_ticks()?;
                    let line = mqtt_load(env, &broker, load)?;
                    let ticks = broker.cpu_ticks()?.saturating_sub(ticks);
                    let rate = field(&line, "msgs_per_s")?;
                    // Microseconds of broker CPU per message (ticks are 10 ms).
                    let cpu_us = ticks as f64 * 10_000.0 / field(&line, "messages")?;
                    rates[i][usize::from(many)] = rate;
                    cpus[i][usize::from(many)] = cpu_us;
                    println!(
                        "case=nonmatching target={} round={round} load={:?} other_subscriptions={} \
                         msgs_per_s={rate:.0} broker_cpu_us_per_msg={cpu_us:.2} loadavg={} {line}",
                        kind.name(),
                        name,
                        if many { args.filters } else { 0 },
                        loadavg()
                    );
                }
                if let Some(h) = holders {
                    h.close().await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            for (i, r) in rates.iter().enumerate() {
                ratios[i].push(r[0] / r[1]);
                cpu_ratios[i].push(cpus[i][1] / cpus[i][0]);
            }
        }
        for (i, (name, _)) in loads.iter().enumerate() {
            println!(
                "summary case=nonmatching target={} load={name:?} \
                 time_ratio_many_over_none_median={:.2} rounds={} \
                 cpu_ratio_many_over_none_median={:.2} rounds={}",
                kind.name(),
                median(&ratios[i]),
                join(&ratios[i]),
                median(&cpu_ratios[i]),
                join(&cpu_ratios[i])
            );
        }
    }
    Ok(())
}

/// Both brokers, the first one alternating from round to round.
fn kinds_in(round: usize) -> [Kind; 2] {
    if round % 2 == 1 {
        [Kind::Gateway, Kind::Mosquitto]
    } else {
        [Kind::Mosquitto, Kind::Gateway]
    }
}

fn join(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.2}"))
        .collect::<Vec<_>>()
        .join(",")
}

// ---------------------------------------------------------------------- drain

async fn persistent(
    env: &Env,
    broker: &Broker,
    id: &str,
) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let opts = options(id.to_string(), broker.addr, false, 64, env.payload);
    connect(opts, env.timeout).await
}

/// A persistent session `id` with a QoS 1 subscription to `load/#`, whose
/// client has left (DISCONNECT): what it is sent is queued.
async fn leave_subscribed(env: &Env, broker: &Broker, id: &str) -> anyhow::Result<()> {
    let (client, mut eventloop) = persistent(env, broker, id).await?;
    subscribe(
        &client,
        &mut eventloop,
        ["load/#".to_string()],
        QoS::AtLeastOnce,
    )
    .await?;
    disconnect(&client, &mut eventloop).await;
    Ok(())
}

async fn drain(env: &Env, args: &Args) -> anyhow::Result<()> {
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let queued = args.queued.to_string();
    for round in 1..=args.rounds {
        for kind in kinds_in(round) {
            // The queue must hold them all: Mosquitto's default is 1,000.
            let broker = start(
                env,
                kind,
                "",
                "max_inflight_messages 64\nmax_queued_messages 0\n",
            )?;
            let id = format!("drain-{}", std::process::id());
            leave_subscribed(env, &broker, &id).await?;
            let line = mqtt_load(
                env,
                &broker,
                &["--qos", "1", "--publishers", "1", "--messages", &queued],
            )?;
            let rss_before = broker.rss_kb()?;
            let started = Instant::now();
            let (client, mut eventloop) = persistent(env, &broker, &id).await?;
            let received = receive(&mut eventloop, args.queued, Duration::from_secs(5)).await?;
            let secs = started.elapsed().as_secs_f64();
            if received < args.queued {
                bail!(
                    "{}: the drain got {received} of {} (nothing more for 5 s)",
                    kind.name(),
                    args.queued
                );
            }
            let rss_after = broker.rss_kb()?;
            disconnect(&client, &mut eventloop).await;
            let rate = received as f64 / secs;
            rates[usize::from(kind == Kind::Mosquitto)].push(rate);
            println!(
                "case=drain target={} round={round} queued={} payload={} seconds={secs:.3} \
                 msgs_per_s={rate:.0} rss_kb_queued={rss_before} rss_kb_drained={rss_after} \
                 loadavg={} publish: {line}",
                kind.name(),
                args.queued,
                env.payload,
                loadavg()
            );
        }
    }
    let ratios: Vec<f64> = rates[0].iter().zip(&rates[1]).map(|(g, m)| g / m).collect();
    println!(
        "summary case=drain gateway_msgs_per_s_median={:.0} mosquitto_msgs_per_s_median={:.0} \
         ratio_median={:.2} rounds={}",
        median(&rates[0]),
        median(&rates[1]),
        median(&ratios),
        join(&ratios)
    );
    Ok(())
}

// ----------------------------------------------------------------------- idle

async fn idle(env: &Env, args: &Args) -> anyhow::Result<()> {
    let mut per_conn: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let max = args.idle + 100;
    for round in 1..=args.rounds {
        for kind in kinds_in(round) {
            let broker = start(env, kind, &format!("max_connections = {max}"), "")?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let before = broker.rss_kb()?;
            let clients = hold_idle(env, &broker, args.idle).await?;
            // Let the last handshakes' allocations settle.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let after = broker.rss_kb()?;
            let kib = after.saturating_sub(before) as f64 / args.idle as f64;
            per_conn[usize::from(kind == Kind::Mosquitto)].push(kib);
            println!(
                "case=idle target={} round={round} connections={} rss_kb_before={before} \
                 rss_kb_after={after} kib_per_conn={kib:.2} loadavg={}",
                kind.name(),
                clients.len(),
                loadavg()
            );
            drop(clients);
        }
    }
    let ratios: Vec<f64> = per_conn[0]
        .iter()
        .zip(&per_conn[1])
        .map(|(g, m)| g / m)
        .collect();
    println!(
        "summary case=idle connections={} gateway_kib_per_conn_median={:.2} \
         mosquitto_kib_per_conn_median={:.2} ratio_median={:.2} rounds={}",
        args.idle,
        median(&per_conn[0]),
        median(&per_conn[1]),
        median(&ratios),
        join(&ratios)
    );
    Ok(())
}

/// `count` clean-session clients that connected and do nothing else (their
/// event loops are not polled again; the keep-alive is 60 s).
async fn hold_idle(
    env: &Env,
    broker: &Broker,
    count: usize,
) -> anyhow::Result<Vec<(AsyncClient, EventLoop)>> {
    let run_id = std::process::id();
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = JoinSet::new();
    for n in 0..count {
        let permits = std::sync::Arc::clone(&permits);
        let opts = options(format!("idle-{run_id}-{n}"), broker.addr, true, 64, 256);
        let timeout = env.timeout;
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            connect(opts, timeout).await
        });
    }
    let mut clients = Vec::with_capacity(count);
    while let Some(joined) = tasks.join_next().await {
        clients.push(joined.context("a client task failed")??);
    }
    Ok(clients)
}

// ----------------------------------------------------------------------- disk

async fn disk(env: &Env, args: &Args) -> anyhow::Result<()> {
    let messages = args.disk_messages.to_string();
    // per_msg[i] = bytes per message with args.sessions[i] sessions, per round
    let mut per_msg = vec![Vec::new(); args.sessions.len()];
    for round in 1..=args.rounds {
        let mut order: Vec<usize> = (0..args.sessions.len()).collect();
        if round % 2 == 0 {
            order.reverse();
        }
        for i in order {
            let sessions = args.sessions[i];
            let broker = start(env, Kind::Gateway, "", "")?;
            for s in 0..sessions {
                let id = format!("disk-{}-{s}", std::process::id());
                leave_subscribed(env, &broker, &id).await?;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let before = broker.write_bytes()?;
            let line = mqtt_load(
                env,
                &broker,
                &["--qos", "1", "--publishers", "1", "--messages", &messages],
            )?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let after = broker.write_bytes()?;
            let bytes = after.saturating_sub(before) as f64 / args.disk_messages as f64;
            // The last session to subscribe must have them all queued.
            let queued = if sessions > 0 {
                let id = format!("disk-{}-{}", std::process::id(), sessions - 1);
                let (client, mut eventloop) = persistent(env, &broker, &id).await?;
                let n = receive(&mut eventloop, args.disk_messages, Duration::from_secs(5)).await?;
                disconnect(&client, &mut eventloop).await;
                n
            } else {
                0
            };
            per_msg[i].push(bytes);
            println!(
                "case=disk round={round} offline_sessions={sessions} messages={} payload={} \
                 write_bytes={} bytes_per_msg={bytes:.0} last_session_received={queued} \
                 loadavg={} publish: {line}",
                args.disk_messages,
                env.payload,
                after.saturating_sub(before),
                loadavg()
            );
        }
    }
    let one = args.sessions.iter().position(|&s| s == 1);
    for (i, sessions) in args.sessions.iter().enumerate() {
        let ratios: Vec<f64> = match one {
            Some(j) => per_msg[i]
                .iter()
                .zip(&per_msg[j])
                .map(|(a, b)| a / b)
                .collect(),
            None => Vec::new(),
        };
        println!(
            "summary case=disk offline_sessions={sessions} bytes_per_msg_median={:.0} \
             ratio_to_one_session_median={:.2} rounds={}",
            median(&per_msg[i]),
            median(&ratios),
            join(&ratios)
        );
    }
    Ok(())
}
