//! One client connection: the handshake (`handshake.rs`: protocol header, start, tune,
//! open), then a loop that reads frames, settles publisher confirms, writes
//! deliveries and keeps heartbeats, until the client closes, breaks the
//! protocol, falls silent or the gateway shuts down.
//!
//! The connection owns its read buffer, so the socket read in `select!` is
//! cancel-safe: bytes of a partial frame stay in the buffer across turns.
//! Frames are encoded into a write buffer that one branch flushes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame};
use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::protocol::{AMQPClass, connection};
use bytes::{Bytes, BytesMut};
use edge_auth::{Pacer, Principal, Security};
use edge_core::PublishError;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use crate::blocked::Blocked;
use crate::broker::Broker;
use crate::channel::Channel;
use crate::codec::{self, FRAME_OVERHEAD, PROTOCOL_HEADER};
use crate::error::{
    CHANNEL_ERROR, COMMAND_INVALID, CONNECTION_FORCED, Exception, FRAME_ERROR, INTERNAL_ERROR,
    NOT_ALLOWED, Scope, UNEXPECTED_FRAME,
};
use crate::queue::ConnId;
use crate::telemetry;

const READ_CHUNK: usize = 16 * 1024;
/// Bytes waiting for a slow client before the connection stops taking
/// deliveries and reading (back-pressure instead of buffering).
pub(crate) const WRITE_HIGH_WATER: usize = 256 * 1024;
/// A client without heartbeats that reads nothing of what waits for it for
/// this long is closed: it holds a connection and unacknowledged deliveries
/// for nothing. With heartbeats the limit is two intervals.
const WRITE_STALL: Duration = Duration::from_secs(30);
/// How long a closing connection waits for the client's close-ok.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Frames accepted before connection.tune-ok: the spec's frame-min-size.
const HANDSHAKE_FRAME_MAX: u32 = 4096 * 4;

/// Per-connection limits, from `AmqpConfig`.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
    pub handshake_timeout: Duration,
    pub max_message_size: u64,
    pub max_unconfirmed: usize,
    /// Users, permissions, TLS and limits.
    pub security: Arc<Security>,
}

/// The halves of a connection's byte stream (plain TCP or TLS).
pub(crate) type Reader = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Why a connection ends.
#[derive(Debug)]
pub(crate) enum End {
    /// The client closed (connection.close, answered with close-ok).
    Closed,
    /// A wrong protocol header, answered with ours.
    BadHeader,
    /// We close with this exception.
    Exception(Exception),
    PeerGone,
    Io(std::io::Error),
    HeartbeatMissed,
    /// The client read nothing of what waited for it for this long.
    WriteStalled(Duration),
    HandshakeTimeout,
    Shutdown,
}

impl End {
    fn reason(&self) -> &'static str {
        match self {
            End::Closed => "client_close",
            End::BadHeader => "bad_protocol_header",
            End::Exception(_) => "exception",
            End::PeerGone => "peer_gone",
            End::Io(_) => "io_error",
            End::HeartbeatMissed => "heartbeat_missed",
            End::WriteStalled(_) => "write_stalled",
            End::HandshakeTimeout => "handshake_timeout",
            End::Shutdown => "shutdown",
        }
    }
}

impl From<Exception> for End {
    fn from(e: Exception) -> End {
        End::Exception(e)
    }
}

impl From<std::io::Error> for End {
    fn from(e: std::io::Error) -> End {
        End::Io(e)
    }
}

/// Consecutive confirm-mode acks of one channel, not sent yet.
#[derive(Debug)]
pub(crate) struct AckRun {
    channel: u16,
    epoch: u64,
    first: u64,
    last: u64,
}

/// A publish's outcome, in publish order.
pub(crate) struct Settled {
    pub channel: u16,
    /// The channel's epoch when published.
    pub epoch: u64,
    /// Its delivery tag in confirm mode.
    pub tag: Option<u64>,
    pub result: Result<(), PublishError>,
    /// The end of a transaction's commit (its publishes' outcomes before
    /// it): tx.commit-ok, or the channel closed if one failed.
    pub commit: bool,
    /// A queue refused it at its limit (`reject-publish`): nacked.
    pub refused: bool,
}

pub(crate) struct Connection {
    pub(crate) id: ConnId,
    pub(crate) peer: SocketAddr,
    reader: Reader,
    writer: Writer,
    /// The verified client certificate's user name, for EXTERNAL.
    pub(crate) identity: Option<String>,
    /// Who logged in (anonymous until then).
    pub(crate) who: Principal,
    /// Its publish rates (`limits.publish_rate`, `publish_byte_rate`): over
    /// them the connection is not read until they are paid.
    pub(crate) pacer: Pacer,
    pub(crate) rbuf: BytesMut,
    pub(crate) out: Vec<u8>,
    pub(crate) settings: Arc<Settings>,
    pub(crate) broker: Arc<Broker>,
    /// Negotiated in tune-ok.
    pub(crate) frame_max: u32,
    pub(crate) channel_max: u16,
    pub(crate) heartbeat: Duration,
    pub(crate) channels: HashMap<u16, Channel>,
    pub(crate) pending: FuturesOrdered<BoxFuture<'static, Settled>>,
    /// Woken by queues when messages are ready for a consumer here.
    pub(crate) wake: Arc<Notify>,
    /// Deliveries may be possible (woken, acked, new consumer, flow on).
    pub(crate) deliver_due: bool,
    /// The publisher name of messages from this connection.
    pub(crate) name: Arc<str>,
    /// The store's refusals, for a client with the `connection.blocked`
    /// capability (`blocked.rs`).
    pub(crate) blocked: Option<Blocked>,
    /// Channels opened so far (each opening's epoch).
    epochs: u64,
    /// Commits that failed (channel, epoch, why): their channels close.
    pub(crate) failed_commits: Vec<(u16, u64, Exception)>,
    /// Message bytes the transactions of this connection's channels hold.
    pub(crate) tx_budget: crate::channel::TxBudget,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.id)
            .field("peer", &self.peer)
            .field("channels", &self.channels.len())
            .finish_non_exhaustive()
    }
}

impl Connection {
    pub(crate) fn new(
        (reader, writer): (Reader, Writer),
        peer: SocketAddr,
        identity: Option<String>,
        id: ConnId,
        settings: Arc<Settings>,
        broker: Arc<Broker>,
    ) -> Connection {
        Connection {
            id,
            peer,
            reader,
            writer,
            identity,
            who: Principal::anonymous(),
            // Local applications are held back, never disconnected.
            pacer: Pacer::new(
                settings.security.client_limits.publish_rate,
                settings.security.client_limits.publish_byte_rate,
                Duration::MAX,
                std::time::Instant::now(),
            ),
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            out: Vec::with_capacity(READ_CHUNK),
            settings,
            broker,
            frame_max: HANDSHAKE_FRAME_MAX,
            channel_max: 0,
            heartbeat: Duration::ZERO,
            channels: HashMap::new(),
            pending: FuturesOrdered::new(),
            wake: Arc::new(Notify::new()),
            deliver_due: false,
            name: format!("amqp:{peer}").into(),
            blocked: None,
            epochs: 0,
            failed_commits: Vec::new(),
            tx_budget: Default::default(),
        }
    }

    /// Serves the connection to its end, then cleans up after it.
    pub(crate) async fn serve(mut self, shutdown: CancellationToken) {
        let limit = self.settings.handshake_timeout;
        let end = match timeout(limit, self.handshake()).await {
            Ok(Ok(())) => self.run(&shutdown).await,
            Ok(Err(end)) => end,
            Err(_) => End::HandshakeTimeout,
        };
        telemetry::closed(end.reason());
        match &end {
            End::Exception(e) => {
                tracing::debug!(peer = %self.peer, code = e.code, error = %e, "closing the connection");
                self.close_with(e).await;
            }
            End::Shutdown => {
                let e = Exception::connection(
                    CONNECTION_FORCED,
                    "broker forced connection closure with reason 'shutdown'",
                );
                self.close_with(&e).await;
            }
            End::BadHeader => {
                let _ = timeout(CLOSE_TIMEOUT, self.writer.write_all(PROTOCOL_HEADER)).await;
            }
            End::Closed => {
                let _ = timeout(CLOSE_TIMEOUT, self.flush()).await;
            }
            End::Io(error) => tracing::debug!(peer = %self.peer, %error, "connection failed"),
            End::WriteStalled(after) => {
                tracing::info!(peer = %self.peer, ?after, "the client reads nothing of what waits for it: closing the connection")
            }
            End::HeartbeatMissed => {
                tracing::info!(peer = %self.peer, heartbeat = ?self.heartbeat, "missed heartbeats from client, timeout: closing the connection")
            }
            End::HandshakeTimeout => {
                tracing::info!(peer = %self.peer, "no connection.open within the handshake timeout: closed")
            }
            End::PeerGone => {}
        }
        if !matches!(end, End::Io(_) | End::PeerGone) {
            // A clean end of the byte stream: over TLS, the close_notify
            // that tells the client nothing was cut off.
            let _ = timeout(CLOSE_TIMEOUT, self.writer.shutdown()).await;
        }
        self.cleanup().await;
    }

    /// Until when the connection is not read, for its publish rates.
    fn held(&self) -> Option<Instant> {
        self.pacer.held().map(Instant::from_std)
    }

    /// Sends connection.close and waits (bounded) for close-ok.
    async fn close_with(&mut self, e: &Exception) {
        telemetry::exception(Scope::Connection, e.code);
        let close = connection::Close {
            reply_code: e.code,
            reply_text: e.reply_text().into(),
            class_id: e.class_id,
            method_id: e.method_id,
        };
        if self
            .method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(close)),
            )
            .is_err()
        {
            return;
        }
        let _ = timeout(CLOSE_TIMEOUT, async {
            self.flush().await?;
            loop {
                match self.next_frame().await? {
                    AMQPFrame::Method(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)),
                    ) => {
                        return Ok::<(), End>(());
                    }
                    AMQPFrame::Method(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::Close(_)),
                    ) => {
                        self.method(
                            0,
                            AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                                connection::CloseOk {},
                            )),
                        )?;
                        self.flush().await?;
                        return Ok(());
                    }
                    _ => {}
                }
            }
        })
        .await;
    }

    /// Requeues what the client did not acknowledge, ends its consumers
    /// and deletes its exclusive queues.
    async fn cleanup(&mut self) {
        let channels: Vec<u16> = self.channels.keys().copied().collect();
        for ch in channels {
            self.drop_channel(ch).await;
        }
        for q in self.broker.owned_by(self.id) {
            self.broker.drop_queue(&q).await;
        }
    }

    /// Forgets a channel: unacked deliveries back to their queues, its
    /// consumers gone (an auto-delete queue that loses its last one goes).
    pub(crate) async fn drop_channel(&mut self, ch: u16) {
        let Some(mut channel) = self.channels.remove(&ch) else {
            return;
        };
        telemetry::channels(-1.0);
        for (q, ids) in channel.take_unsettled() {
            q.requeue(&ids);
        }
        for (_, consumer) in std::mem::take(&mut channel.consumers) {
            if consumer.queue.remove_consumer(consumer.key) && consumer.queue.flags.auto_delete {
                self.broker.drop_queue(&consumer.queue).await;
            }
        }
    }

    // ---- frames out -------------------------------------------------

    pub(crate) fn send(&mut self, frame: &AMQPFrame) -> Result<(), Exception> {
        codec::encode(&mut self.out, frame).map_err(|e| Exception::connection(INTERNAL_ERROR, e))
    }

    pub(crate) fn method(&mut self, ch: u16, method: AMQPClass) -> Result<(), Exception> {
        self.send(&AMQPFrame::Method(ch, method))
    }

    /// A method with content: header frame, then the body split by frame-max.
    pub(crate) fn content(
        &mut self,
        ch: u16,
        method: AMQPClass,
        properties: AMQPProperties,
        body: &Bytes,
    ) -> Result<(), Exception> {
        self.method(ch, method)?;
        self.send(&AMQPFrame::Header(
            ch,
            AMQPContentHeader {
                class_id: 60,
                body_size: body.len() as u64,
                properties,
            },
        ))?;
        let chunk = (self.frame_max as usize)
            .saturating_sub(FRAME_OVERHEAD)
            .max(1);
        for part in body.chunks(chunk) {
            self.send(&AMQPFrame::Body(ch, part.to_vec()))?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), End> {
        if !self.out.is_empty() {
            self.writer.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    pub(crate) async fn fill(&mut self) -> Result<(), End> {
        self.rbuf.reserve(READ_CHUNK);
        match self.reader.read_buf(&mut self.rbuf).await? {
            0 => Err(End::PeerGone),
            _ => Ok(()),
        }
    }

    fn decode(&mut self) -> Result<Option<AMQPFrame>, End> {
        codec::decode(&mut self.rbuf, self.frame_max)
            .map_err(|e| Exception::connection(e.reply_code(), e).into())
    }

    /// The next frame (handshake and closing only: writes what is pending
    /// first).
    pub(crate) async fn next_frame(&mut self) -> Result<AMQPFrame, End> {
        loop {
            if let Some(frame) = self.decode()? {
                return Ok(frame);
            }
            self.flush().await?;
            self.fill().await?;
        }
    }

    // ---- running -----------------------------------------------------

    /// The main loop. Reading, writing, confirms, deliveries and the
    /// heartbeat are branches of one `select!`.
    async fn run(&mut self, shutdown: &CancellationToken) -> End {
        let hb = self.heartbeat;
        let stall = if hb.is_zero() { WRITE_STALL } else { hb * 2 };
        let mut tick = tokio::time::interval(if hb.is_zero() {
            WRITE_STALL / 4
        } else {
            (hb / 2).max(Duration::from_millis(500))
        });
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_read = Instant::now();
        let mut last_write = Instant::now();
        // Since when what waits for the client has not moved.
        let mut stalled_since: Option<Instant> = None;
        loop {
            // Frames already buffered, as far as back-pressure allows.
            while self.pending.len() < self.settings.max_unconfirmed
                && self.out.len() < WRITE_HIGH_WATER
                && self.held().is_none()
            {
                match self.decode() {
                    Ok(Some(frame)) => {
                        if let Err(end) = self.dispatch(frame).await {
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(end) => return end,
                }
            }
            if let Err(e) = self.deliver_ready().await {
                return e.into();
            }
            let writing = !self.out.is_empty();
            if !writing {
                stalled_since = None;
            } else if stalled_since.is_none() {
                stalled_since = Some(Instant::now());
            }
            let held = self.held();
            let reading = self.pending.len() < self.settings.max_unconfirmed
                && self.out.len() < WRITE_HIGH_WATER
                && held.is_none();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return End::Shutdown,
                written = self.writer.write(&self.out), if writing => match written {
                    Ok(0) => return End::PeerGone,
                    Ok(n) => {
                        self.out.drain(..n);
                        last_write = Instant::now();
                        stalled_since = Some(last_write);
                    }
                    Err(e) => return e.into(),
                },
                Some(settled) = self.pending.next(), if !self.pending.is_empty() => {
                    // Every outcome ready now; consecutive acks of a channel
                    // go out as one basic.ack with `multiple`.
                    let mut run = None;
                    let mut next = Some(settled);
                    while let Some(s) = next {
                        if let Err(e) = self.settled(s, &mut run) {
                            return e.into();
                        }
                        next = self.pending.next().now_or_never().flatten();
                    }
                    if let Err(e) = self.flush_acks(&mut run) {
                        return e.into();
                    }
                    for (ch, epoch, e) in std::mem::take(&mut self.failed_commits) {
                        if self.is_open(ch, epoch)
                            && let Err(e) = self.channel_exception(ch, e).await
                        {
                            return e.into();
                        }
                    }
                }
                read = self.reader.read_buf(&mut self.rbuf), if reading => match read {
                    Ok(0) => return End::PeerGone,
                    Ok(_) => {
                        last_read = Instant::now();
                        self.rbuf.reserve(READ_CHUNK);
                    }
                    Err(e) => return e.into(),
                },
                _ = tokio::time::sleep_until(held.unwrap_or_else(Instant::now)), if held.is_some() => {
                    // The wait was ours, not the client's silence.
                    last_read = Instant::now();
                }
                _ = self.wake.notified() => self.deliver_due = true,
                () = crate::blocked::changed(&mut self.blocked) => {
                    if let Err(e) = self.tell_blocked() {
                        return e.into();
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    if stalled_since.is_some_and(|at| now.duration_since(at) > stall) {
                        return End::WriteStalled(stall);
                    }
                    if hb.is_zero() {
                        continue;
                    }
                    // A client told it is blocked may stop writing altogether,
                    // heartbeats included (lapin does): as RabbitMQ, its
                    // silence is not counted meanwhile.
                    let told_blocked = self.blocked.as_ref().is_some_and(|b| b.told);
                    if reading && !told_blocked && now.duration_since(last_read) > hb * 2 {
                        return End::HeartbeatMissed;
                    }
                    if !reading || told_blocked {
                        // The wait is ours, not the client's silence.
                        last_read = now;
                    }
                    if now.duration_since(last_write) >= hb / 2
                        && self.out.is_empty()
                        && let Err(e) = self.send(&AMQPFrame::Heartbeat)
                    {
                        return e.into();
                    }
                }
            }
        }
    }

    /// A publish's outcome: in confirm mode an ack joins `run` (a channel
    /// and the first and last tag of consecutive acks), a nack goes out
    /// after the run before it.
    fn settled(&mut self, s: Settled, run: &mut Option<AckRun>) -> Result<(), Exception> {
        use amq_protocol::protocol::basic;
        if let Err(error) = &s.result {
            telemetry::dropped("amqp_refused", 1);
            crate::logs::REFUSED.record(error.reason(), || {
                format!(
                    "connection={} channel={} error={error}",
                    self.name, s.channel
                )
            });
        }
        if s.commit {
            return self.committed(s, run);
        }
        let (Some(tag), true) = (s.tag, self.is_open(s.channel, s.epoch)) else {
            return Ok(());
        };
        telemetry::confirmed(s.result.is_ok() && !s.refused, 1);
        if s.result.is_ok() && !s.refused {
            match run {
                Some(r) if r.channel == s.channel && r.epoch == s.epoch && r.last + 1 == tag => {
                    r.last = tag
                }
                _ => {
                    self.flush_acks(run)?;
                    *run = Some(AckRun {
                        channel: s.channel,
                        epoch: s.epoch,
                        first: tag,
                        last: tag,
                    });
                }
            }
            return Ok(());
        }
        self.flush_acks(run)?;
        let nack = basic::AMQPMethod::Nack(basic::Nack {
            delivery_tag: tag,
            multiple: false,
            requeue: false,
        });
        self.method(s.channel, AMQPClass::Basic(nack))
    }

    /// Whether channel `ch` is still the opening `epoch` (and not closing).
    pub(crate) fn is_open(&self, ch: u16, epoch: u64) -> bool {
        self.channels
            .get(&ch)
            .is_some_and(|c| c.epoch == epoch && !c.closing)
    }

    /// Sends the acks of `run`: every tag up to its last on the channel is
    /// settled by then (outcomes come in publish order), so one ack with
    /// `multiple` covers exactly the run.
    pub(crate) fn flush_acks(&mut self, run: &mut Option<AckRun>) -> Result<(), Exception> {
        use amq_protocol::protocol::basic;
        let Some(r) = run.take() else { return Ok(()) };
        if !self.is_open(r.channel, r.epoch) {
            return Ok(());
        }
        let ack = basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: r.last,
            multiple: r.first != r.last,
        });
        self.method(r.channel, AMQPClass::Basic(ack))
    }

    /// One frame from the client.
    async fn dispatch(&mut self, frame: AMQPFrame) -> Result<(), End> {
        let ch = frame.channel_id();
        match frame {
            AMQPFrame::Heartbeat => return Ok(()),
            AMQPFrame::InvalidHeartbeat(ch) => {
                return Err(Exception::connection(
                    FRAME_ERROR,
                    format!("heartbeat frame on channel {ch}"),
                )
                .into());
            }
            AMQPFrame::ProtocolHeader(_) => {
                return Err(Exception::connection(
                    FRAME_ERROR,
                    "protocol header after the handshake",
                )
                .into());
            }
            AMQPFrame::Method(0, AMQPClass::Connection(m)) => return self.on_connection_method(m),
            _ if ch == 0 => {
                return Err(Exception::connection(
                    COMMAND_INVALID,
                    format!("{frame} on channel 0"),
                )
                .into());
            }
            _ => {}
        }
        if let AMQPFrame::Method(
            _,
            AMQPClass::Channel(amq_protocol::protocol::channel::AMQPMethod::Open(_)),
        ) = frame
        {
            return self.open_channel(ch).map_err(End::from);
        }
        let Some(channel) = self.channels.get_mut(&ch) else {
            return Err(Exception::connection(
                CHANNEL_ERROR,
                format!("expected 'channel.open' on channel {ch}, got {frame}"),
            )
            .into());
        };
        if channel.closing {
            return self.while_closing(ch, frame).await;
        }
        let result = match frame {
            AMQPFrame::Header(_, header) => {
                let max = self.settings.max_message_size;
                match channel.on_header(header.class_id, header.body_size, header.properties, max) {
                    Ok(Some(content)) => self.publish(ch, content).await,
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            AMQPFrame::Body(_, chunk) => match channel.on_body(chunk) {
                Ok(Some(content)) => self.publish(ch, content).await,
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            },
            AMQPFrame::Method(_, _) if channel.expects_content() => Err(Exception::connection(
                UNEXPECTED_FRAME,
                format!(
                    "expected content header for the basic.publish on channel {ch}, got {frame}"
                ),
            )),
            AMQPFrame::Method(_, method) => match self.note_publish(&method) {
                Ok(()) => self.on_method(ch, method).await,
                Err(e) => Err(e),
            },
            _ => Ok(()),
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.scope == Scope::Connection => Err(e.into()),
            Err(e) => self.channel_exception(ch, e).await.map_err(End::from),
        }
    }

    fn on_connection_method(&mut self, m: connection::AMQPMethod) -> Result<(), End> {
        match m {
            connection::AMQPMethod::Close(close) => {
                tracing::debug!(peer = %self.peer, code = close.reply_code, text = %close.reply_text, "client closed the connection");
                self.method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                )?;
                Err(End::Closed)
            }
            connection::AMQPMethod::CloseOk(_) => Err(End::Closed),
            connection::AMQPMethod::Blocked(_) | connection::AMQPMethod::Unblocked(_) => Ok(()),
            other => Err(Exception::connection(
                COMMAND_INVALID,
                format!("unexpected connection method {other:?}"),
            )
            .into()),
        }
    }

    fn open_channel(&mut self, ch: u16) -> Result<(), Exception> {
        if ch > self.channel_max {
            return Err(Exception::connection(
                NOT_ALLOWED,
                format!(
                    "channel {ch} is above the negotiated channel_max of {}",
                    self.channel_max
                ),
            )
            .on(20, 10));
        }
        if self.channels.contains_key(&ch) {
            return Err(Exception::connection(
                CHANNEL_ERROR,
                format!("second 'channel.open' seen on channel {ch}"),
            )
            .on(20, 10));
        }
        self.epochs += 1;
        self.channels.insert(ch, Channel::open(self.epochs));
        telemetry::channels(1.0);
        use amq_protocol::protocol::channel;
        self.method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
        )
    }

    /// A channel we are closing sees only close and close-ok.
    async fn while_closing(&mut self, ch: u16, frame: AMQPFrame) -> Result<(), End> {
        use amq_protocol::protocol::channel;
        match frame {
            AMQPFrame::Method(_, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_))) => {
                self.drop_channel(ch).await;
            }
            AMQPFrame::Method(_, AMQPClass::Channel(channel::AMQPMethod::Close(_))) => {
                self.drop_channel(ch).await;
                self.method(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                )?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Closes one channel with `e`; the connection goes on.
    async fn channel_exception(&mut self, ch: u16, e: Exception) -> Result<(), Exception> {
        use amq_protocol::protocol::channel;
        telemetry::exception(Scope::Channel, e.code);
        tracing::debug!(peer = %self.peer, channel = ch, code = e.code, error = %e, "channel exception");
        // Its deliveries go back and its consumers end now; the number
        // stays taken until the client's close-ok.
        if let Some(mut c) = self.channels.remove(&ch) {
            for (q, ids) in c.take_unsettled() {
                q.requeue(&ids);
            }
            for (_, consumer) in std::mem::take(&mut c.consumers) {
                if consumer.queue.remove_consumer(consumer.key) && consumer.queue.flags.auto_delete
                {
                    self.broker.drop_queue(&consumer.queue).await;
                }
            }
            self.channels.insert(ch, Channel::closing());
        }
        self.method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: e.code,
                reply_text: e.reply_text().into(),
                class_id: e.class_id,
                method_id: e.method_id,
            })),
        )
    }
}
