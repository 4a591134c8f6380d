//! QoS 1 ingest over MQTT over WebSocket (`--ws`) or plain TCP, with the
//! same client on both, so that the two transports of one gateway can be
//! compared: what differs is only the framing and the gateway's bridge.
//!
//! rumqttc's WebSocket transport is not used (its `websocket` feature brings
//! a second tungstenite and a TLS stack); this client writes MQTT 3.1.1
//! bytes itself. Each publisher connects with a clean session, waits for
//! its CONNACK, and once all are connected publishes `--messages` QoS 1
//! messages on `load/<publisher>` with at most `--inflight` unacknowledged.
//! Over WebSocket every PUBLISH is its own binary frame, as browser clients
//! (MQTT.js) send them; over TCP the window's packets go out in one write.
//! A publisher is done when every PUBACK has arrived; the PUBACK latency of
//! a message runs from its write to its PUBACK.
//!
//! Output is one line of `key=value` pairs, like `mqtt-load`. A global
//! timeout bounds the run; hitting it is an error.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use clap::Parser;
use edge_benches::mqtt::percentile_ms;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Barrier;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[derive(Debug, Parser)]
#[command(about = "QoS 1 ingest over MQTT over WebSocket or TCP; prints one result line")]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The WebSocket listener's port with `--ws`, else the MQTT port.
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Speak MQTT over WebSocket (subprotocol `mqtt`) instead of TCP.
    #[arg(long)]
    ws: bool,
    /// The WebSocket path.
    #[arg(long, default_value = "/mqtt")]
    ws_path: String,
    /// Concurrent publishers, one connection each.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Messages per publisher.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Unacknowledged publishes per connection.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    inflight: u16,
    /// Whole-run limit in seconds (connect included).
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Label printed first on the result line.
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
            eprintln!("mqtt-ws-load: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mqtt-ws-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<String> {
    if args.publishers == 0 || args.messages == 0 {
        bail!("--publishers and --messages must be at least 1");
    }
    let addr = tokio::net::lookup_host((args.host.as_str(), args.port))
        .await?
        .next()
        .context("the host has no address")?;
    let connected = Arc::new(Barrier::new(args.publishers + 1));
    let payload = Bytes::from(vec![b'x'; args.payload]);
    let run_id = std::process::id();
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..args.publishers {
        let job = Job {
            addr,
            ws_path: args.ws.then(|| args.ws_path.clone()),
            client_id: format!("wsload-{run_id}-{index}"),
            topic: format!("load/{index}"),
            messages: args.messages,
            inflight: args.inflight,
            payload: payload.clone(),
            connected: Arc::clone(&connected),
        };
        tasks.spawn(job.run());
    }
    let limit = Duration::from_secs(args.timeout);
    let outcome = tokio::time::timeout(limit, async {
        tokio::select! {
            _ = connected.wait() => {}
            Some(joined) = tasks.join_next() => {
                joined.context("a publisher task failed")??;
                bail!("a publisher ended before all were connected");
            }
        }
        let started = Instant::now();
        let mut latencies_us = Vec::with_capacity(args.publishers * args.messages);
        while let Some(joined) = tasks.join_next().await {
            latencies_us.extend(joined.context("a publisher task failed")??);
        }
        Ok::<_, anyhow::Error>((started.elapsed(), latencies_us))
    })
    .await;
    let (elapsed, mut latencies_us) = match outcome {
        Ok(result) => result?,
        Err(_) => {
            tasks.abort_all();
            bail!("timed out after {} s", args.timeout);
        }
    };
    latencies_us.sort_unstable();
    let secs = elapsed.as_secs_f64();
    let mut line = String::new();
    if !args.label.is_empty() {
        line.push_str(&format!("label={} ", args.label));
    }
    line.push_str(&format!(
        "transport={} qos=1 publishers={} inflight={} payload={} messages={} seconds={:.3} \
         msgs_per_s={:.0} puback_p50_ms={:.2} puback_p99_ms={:.2}",
        if args.ws { "ws" } else { "tcp" },
        args.publishers,
        args.inflight,
        args.payload,
        latencies_us.len(),
        secs,
        latencies_us.len() as f64 / secs,
        percentile_ms(&latencies_us, 0.50),
        percentile_ms(&latencies_us, 0.99)
    ));
    Ok(line)
}

/// A connection to the broker: MQTT bytes over TCP or in WebSocket frames.
enum Link {
    Tcp(TcpStream),
    Ws(Box<WebSocketStream<TcpStream>>),
}

impl Link {
    async fn open(addr: SocketAddr, ws_path: Option<&str>) -> anyhow::Result<Link> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let Some(path) = ws_path else {
            return Ok(Link::Tcp(stream));
        };
        let mut request = format!("ws://{addr}{path}").into_client_request()?;
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", "mqtt".parse()?);
        let (ws, _) = tokio_tungstenite::client_async(request, stream).await?;
        Ok(Link::Ws(Box::new(ws)))
    }

    /// Sends the packets, each its own frame over WebSocket.
    async fn send(&mut self, packets: &[Bytes]) -> anyhow::Result<()> {
        match self {
            Link::Tcp(stream) => {
                let all: Vec<u8> = packets.concat();
                stream.write_all(&all).await?;
            }
            Link::Ws(ws) => {
                for p in packets {
                    ws.feed(Message::Binary(p.clone())).await?;
                }
                ws.flush().await?;
            }
        }
        Ok(())
    }

    /// Appends received bytes to `buf`.
    async fn recv(&mut self, buf: &mut BytesMut) -> anyhow::Result<()> {
        match self {
            Link::Tcp(stream) => {
                buf.reserve(16 * 1024);
                if stream.read_buf(buf).await? == 0 {
                    bail!("the broker closed the connection");
                }
            }
            Link::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(data))) => {
                        buf.extend_from_slice(&data);
                        break;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(other)) => bail!("unexpected WebSocket message {other:?}"),
                    Some(Err(e)) => bail!("WebSocket failed: {e}"),
                    None => bail!("the broker closed the WebSocket"),
                }
            },
        }
        Ok(())
    }
}

/// One MQTT packet: header byte, remaining length, body.
fn packet(first: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.extend_from_slice(&[first]);
    let mut len = body.len();
    loop {
        let digit = (len % 128) as u8;
        len /= 128;
        out.extend_from_slice(&[if len > 0 { digit | 0x80 } else { digit }]);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out.freeze()
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The next whole packet of `buf` (header byte, body), if there is one.
fn take_packet(buf: &mut BytesMut) -> Option<(u8, BytesMut)> {
    let mut len = 0usize;
    let mut at = 1;
    loop {
        let byte = *buf.get(at)?;
        len |= usize::from(byte & 0x7f) << (7 * (at - 1));
        at += 1;
        if byte & 0x80 == 0 || at > 4 {
            break;
        }
    }
    if buf.len() < at + len {
        return None;
    }
    let mut whole = buf.split_to(at + len);
    let first = whole[0];
    Some((first, whole.split_off(at)))
}

#[derive(Debug)]
struct Job {
    addr: SocketAddr,
    ws_path: Option<String>,
    client_id: String,
    topic: String,
    messages: usize,
    inflight: u16,
    payload: Bytes,
    connected: Arc<Barrier>,
}

impl Job {
    /// Publishes every message and returns the PUBACK latencies in µs.
    async fn run(self) -> anyhow::Result<Vec<u32>> {
        let mut link = Link::open(self.addr, self.ws_path.as_deref())
            .await
            .with_context(|| format!("{} could not connect", self.client_id))?;
        let mut body = Vec::new();
        put_str(&mut body, "MQTT");
        body.extend_from_slice(&[4, 0x02, 0, 60]);
        put_str(&mut body, &self.client_id);
        link.send(&[packet(0x10, &body)]).await?;
        let mut buf = BytesMut::new();
        let connack = loop {
            if let Some(p) = take_packet(&mut buf) {
                break p;
            }
            link.recv(&mut buf).await?;
        };
        if connack.0 != 0x20 || connack.1.get(1) != Some(&0) {
            bail!("{} was refused: {connack:?}", self.client_id);
        }
        self.connected.wait().await;

        let mut sent_at: Vec<Option<Instant>> = vec![None; usize::from(self.inflight) + 1];
        let mut latencies = Vec::with_capacity(self.messages);
        let mut free: Vec<u16> = (1..=self.inflight).rev().collect();
        let mut sent = 0;
        while latencies.len() < self.messages {
            let mut batch = Vec::new();
            while sent < self.messages
                && let Some(pkid) = free.pop()
            {
                let mut body = Vec::with_capacity(self.topic.len() + self.payload.len() + 4);
                put_str(&mut body, &self.topic);
                body.extend_from_slice(&pkid.to_be_bytes());
                body.extend_from_slice(&self.payload);
                batch.push(packet(0x32, &body));
                sent_at[usize::from(pkid)] = Some(Instant::now());
                sent += 1;
            }
            if !batch.is_empty() {
                link.send(&batch).await?;
            }
            link.recv(&mut buf).await?;
            while let Some((first, body)) = take_packet(&mut buf) {
                if first != 0x40 || body.len() != 2 {
                    continue;
                }
                let pkid = u16::from_be_bytes([body[0], body[1]]);
                if let Some(at) = sent_at.get_mut(usize::from(pkid)).and_then(Option::take) {
                    latencies.push(u32::try_from(at.elapsed().as_micros()).unwrap_or(u32::MAX));
                    free.push(pkid);
                }
            }
        }
        let _ = link.send(&[packet(0xe0, &[])]).await;
        Ok(latencies)
    }
}
