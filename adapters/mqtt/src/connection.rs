//! One client connection: the CONNECT handshake, then a loop that reads
//! packets, acknowledges committed publishes, writes deliveries and
//! enforces keep-alive, until the client leaves, breaks the protocol, is
//! taken over, or the gateway shuts down. Then the client's will, if it
//! left one and did not send DISCONNECT, is published (`will.rs`).
//!
//! The connection owns its read buffer, so the socket read in `select!` is
//! cancel-safe: bytes of a partial packet stay in the buffer across turns.
//! Replies are encoded into a write buffer and flushed once per turn.
//! The byte stream is any [`Transport`] (plain TCP, the WebSocket bridge's
//! pipe): one loop for all of them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use edge_auth::{LoginError, Principal, Security};
use edge_core::{AttachOptions, Attached, Delivery, Router, SessionExpiry};
use futures::{FutureExt, StreamExt};
use rumqttd::protocol::{ConnAck, ConnAckProperties, ConnectReturnCode, Login, Packet};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use crate::access::Access;
use crate::codec::{self, Hello, Version};
use crate::error::Close;
use crate::listener::Admission;
use crate::logs;
use crate::outbox::Pushed;
use crate::session::{self, Session};
use crate::transport::{ReadSome, Transport};
use crate::v5::{self, V5};
use crate::will::{self, Will};

/// How long a shutting-down connection waits for outstanding commits.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing connection may take to flush its last acks.
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// Deliveries taken from the router in one loop turn.
const DELIVERY_BATCH: usize = 64;
/// Bytes waiting for a slow client before the connection stops reading it
/// and stops taking deliveries (back-pressure instead of buffering).
const WRITE_HIGH_WATER: usize = 256 * 1024;
/// A client without keep-alive that reads nothing of what waits for it for
/// this long is closed: it holds a connection slot and a delivery queue for
/// nothing. With keep-alive, the limit is 1.5 x keep-alive, like silence.
const WRITE_STALL: Duration = Duration::from_secs(30);

/// Per-connection limits, from `MqttConfig`.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub max_packet_size: usize,
    pub connect_timeout: Duration,
    pub max_inflight: u16,
    pub max_queued_messages: usize,
    /// Wills waiting out their MQTT 5 delay, shared by the listeners.
    pub wills: Arc<will::Delayed>,
    /// Users, permissions, TLS and limits.
    pub security: Arc<Security>,
}

static ASSIGNED_IDS: AtomicU64 = AtomicU64::new(1);

/// What an accepted CONNECT leaves for the end of the connection.
#[derive(Debug, Default)]
struct Accepted {
    client_id: Option<Arc<str>>,
    will: Option<Will>,
    /// How long the session outlives the connection (a will's delay ends
    /// with it).
    expiry: Option<SessionExpiry>,
    /// MQTT 5 past CONNACK: the connection's end is told in a DISCONNECT
    /// (with a reason string unless the client asked for none).
    v5_problem_info: Option<bool>,
}

/// A connection past its CONNACK.
struct Established {
    session: Session,
    deliveries: mpsc::Receiver<Delivery>,
    keep_alive: Option<Duration>,
    /// Its place under `mqtt.max_connections`, held until it ends.
    permit: tokio::sync::OwnedSemaphorePermit,
    /// Its place under the per-source limits, held until it ends.
    source: edge_auth::SourcePermit,
}

#[derive(Debug)]
pub(crate) struct Connection<S> {
    stream: S,
    peer: SocketAddr,
    settings: Arc<Settings>,
    /// The user name of the client's verified TLS certificate, when
    /// `auth.cert_identity` takes it from there.
    identity: Option<String>,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl<S: Transport> Connection<S> {
    pub(crate) fn new(
        stream: S,
        peer: SocketAddr,
        settings: Arc<Settings>,
        identity: Option<String>,
    ) -> Connection<S> {
        Connection {
            stream,
            peer,
            settings,
            identity,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
        }
    }

    /// Serves the connection to its end and logs why it ended.
    pub(crate) async fn serve(
        mut self,
        router: Router,
        admission: Admission,
        shutdown: CancellationToken,
    ) {
        let mut accepted = Accepted::default();
        let close = self.run(&router, admission, &shutdown, &mut accepted).await;
        if let (Some(problem_info), Some(code)) =
            (accepted.v5_problem_info, close.disconnect_code())
        {
            let why = problem_info.then(|| close.to_string());
            codec::encode_disconnect(&mut self.wbuf, code, why.as_deref());
        }
        // Handed to the router before the socket closes, so whoever sees
        // the close can count on the will's fan-out being done. An MQTT 5
        // will with a delay waits it out (at most the session's expiry);
        // a reconnect before then cancels it.
        let will = match (accepted.will.take(), &accepted.client_id) {
            (Some(w), Some(id)) if close.publishes_will() => {
                let delay = match accepted.expiry {
                    Some(SessionExpiry::After(d)) => w.delay.min(d),
                    Some(SessionExpiry::WithConnection) | None => Duration::ZERO,
                    Some(SessionExpiry::Default | SessionExpiry::Never) => w.delay,
                };
                if delay.is_zero() || matches!(close, Close::Shutdown) {
                    Box::pin(will::publish(&router, w, id.clone())).await
                } else if matches!(close, Close::TakenOver) {
                    // The newer connection is the client back within the
                    // delay: no will (MQTT-3.1.3-9).
                    will::cancelled(id);
                    None
                } else {
                    self.settings.wills.schedule(
                        router.clone(),
                        w,
                        id.clone(),
                        delay,
                        shutdown.clone(),
                    );
                    None
                }
            }
            _ => None,
        };
        if !matches!(close, Close::Io(_)) && !self.wbuf.is_empty() {
            // Acks earned before the close still go out.
            let _ = timeout(FINAL_FLUSH_TIMEOUT, self.flush()).await;
        }
        let _ = timeout(FINAL_FLUSH_TIMEOUT, self.stream.shutdown()).await;
        if let Some(will) = will {
            Box::pin(will.settle()).await;
        }
        self.log_close(&close, accepted.client_id.as_deref());
    }

    fn log_close(&self, close: &Close, client_id: Option<&str>) {
        let peer = self.peer;
        let client_id = client_id.unwrap_or("");
        metrics::counter!("edge_mqtt_disconnects_total", "reason" => close.reason()).increment(1);
        match close {
            Close::Protocol(e) => {
                metrics::counter!("edge_mqtt_protocol_errors_total", "reason" => e.reason())
                    .increment(1);
                logs::PROTOCOL_ERRORS.record(e.reason(), || {
                    format!("peer={peer} client_id={client_id:?} error={e}")
                });
            }
            Close::KeepAlive(_)
            | Close::DisconnectWithWill
            | Close::HandshakeEvicted
            | Close::ConnectTimeout(_)
            | Close::TakenOver
            | Close::WriteStalled(_)
            | Close::RateLimited(_)
            | Close::Session(_)
            | Close::Refused(_) => {
                logs::CLOSED.record(close.reason(), || {
                    format!("peer={peer} client_id={client_id:?} why={close}")
                });
            }
            // Logged where the refusal was seen.
            Close::Store(_) => {}
            Close::Encode(e) => {
                logs::ENCODE_FAILED.record("packet", || {
                    format!("peer={peer} client_id={client_id:?} error={e}")
                });
            }
            Close::Disconnect | Close::PeerClosed | Close::Shutdown | Close::Io(_) => {
                tracing::debug!(%peer, client_id, reason = close.reason(), "{close}: connection closed");
            }
        }
    }

    async fn run(
        &mut self,
        router: &Router,
        admission: Admission,
        shutdown: &CancellationToken,
        accepted: &mut Accepted,
    ) -> Close {
        // The handshake's state (CONNECT, the attach, ...) is boxed and gone
        // once it is done: only the session's state stays in the task.
        let established =
            match Box::pin(self.handshake(router, admission, shutdown, accepted)).await {
                Ok(established) => established,
                Err(close) => return close,
            };
        let Established {
            mut session,
            mut deliveries,
            keep_alive,
            permit,
            source,
        } = established;
        let close = self
            .session_loop(&mut session, &mut deliveries, keep_alive, shutdown)
            .await;
        // MQTT 5: a DISCONNECT may have changed the session expiry, which
        // bounds the will's delay.
        if let Some(v5) = &session.v5 {
            accepted.expiry = Some(session::session_expiry(v5.session_expiry));
        }
        let close = match close {
            Close::Shutdown => Box::pin(self.drain(&mut session)).await,
            close => close,
        };
        // Before the session is left: what the client acknowledged is out
        // of its queue, so a reconnect does not get it again.
        Box::pin(session.finish_acks()).await;
        // Shared subscriptions' deliveries it did not complete go to other
        // members of their groups (not at shutdown: they are closing too).
        if !matches!(close, Close::Shutdown) {
            session.hand_back(deliveries);
        }
        drop(permit);
        drop(source);
        close
    }

    /// CONNECT to CONNACK: the session, or why there is none.
    async fn handshake(
        &mut self,
        router: &Router,
        admission: Admission,
        shutdown: &CancellationToken,
        accepted: &mut Accepted,
    ) -> Result<Established, Close> {
        let connect_timeout = self.settings.connect_timeout;
        let Admission {
            handshake,
            limit,
            max_connections,
            source,
        } = admission;
        let hello = tokio::select! {
            _ = shutdown.cancelled() => return Err(Close::Shutdown),
            _ = handshake.evicted() => return Err(Close::HandshakeEvicted),
            hello = timeout(connect_timeout, self.read_connect()) => match hello {
                Err(_) => return Err(Close::ConnectTimeout(connect_timeout)),
                Ok(Err(close)) => return Err(close),
                Ok(Ok(hello)) => hello,
            },
        };
        drop(handshake);
        // Held until the connection ends.
        let Ok(permit) = limit.try_acquire_owned() else {
            metrics::counter!("edge_connections_rejected_total", "protocol" => "mqtt", "reason" => "max_connections").increment(1);
            logs::REFUSED.record("max_connections", || {
                format!("peer={} max_connections={max_connections}", self.peer)
            });
            let version = match &hello {
                Hello::Accepted { version, .. } => *version,
                Hello::Unsupported { .. } => Version::V311,
            };
            return Err(self
                .refuse(
                    version,
                    ConnectReturnCode::ServiceUnavailable,
                    ConnectReturnCode::ServerBusy,
                    format!("{max_connections} clients connected (mqtt.max_connections)"),
                )
                .await);
        };
        let (version, connect, props, login, will) = match hello {
            Hello::Accepted {
                version,
                connect,
                props,
                login,
                will,
            } => (version, connect, props, login, will),
            Hello::Unsupported { level } => {
                let version = if level > 5 {
                    Version::V5
                } else {
                    Version::V311
                };
                return Err(self
                    .refuse(
                        version,
                        ConnectReturnCode::RefusedProtocolVersion,
                        ConnectReturnCode::UnsupportedProtocolVersion,
                        format!("unsupported protocol level {level}"),
                    )
                    .await);
            }
        };
        if let Some(method) = props
            .as_ref()
            .and_then(|p| p.authentication_method.as_ref())
        {
            // MQTT 5 enhanced authentication is not served.
            return Err(self
                .refuse(
                    version,
                    ConnectReturnCode::NotAuthorized,
                    ConnectReturnCode::BadAuthenticationMethod,
                    format!("authentication method {method:?} is not supported"),
                )
                .await);
        }
        let who = match self.login(login).await {
            Ok(who) => who,
            Err(refused) => {
                let (v3, v5, why) = match refused {
                    LoginError::BadCredentials => (
                        ConnectReturnCode::BadUserNamePassword,
                        ConnectReturnCode::BadUserNamePassword,
                        "bad user name or password",
                    ),
                    LoginError::NotAuthorized => (
                        ConnectReturnCode::NotAuthorized,
                        ConnectReturnCode::NotAuthorized,
                        "not authorized",
                    ),
                };
                return Err(self.refuse(version, v3, v5, why.to_string()).await);
            }
        };
        let v5 = version.is_v5();
        let mut assigned = false;
        let client_id: Arc<str> = match (connect.client_id.is_empty(), connect.clean_session) {
            (false, _) if edge_core::session::is_amqp_queue(&connect.client_id) => {
                return Err(self
                    .refuse(
                        version,
                        ConnectReturnCode::ClientIdentifierNotValid,
                        ConnectReturnCode::ClientIdentifierNotValid,
                        format!(
                            "client id {:?} names an AMQP queue's session",
                            connect.client_id
                        ),
                    )
                    .await);
            }
            (false, _) => connect.client_id.into(),
            // MQTT 3.1 requires a client id (refused with 2, as Mosquitto does).
            (true, _) if version == Version::V31 => {
                return Err(self
                    .refuse(
                        version,
                        ConnectReturnCode::ClientIdentifierNotValid,
                        ConnectReturnCode::ClientIdentifierNotValid,
                        "empty client id from an MQTT 3.1 client".to_string(),
                    )
                    .await);
            }
            // MQTT 5 assigns one whatever the clean start (MQTT-3.1.3-6/7).
            (true, clean) if clean || v5 => {
                assigned = true;
                format!("edge-auto-{}", ASSIGNED_IDS.fetch_add(1, Ordering::Relaxed)).into()
            }
            (true, _) => {
                return Err(self
                    .refuse(
                        version,
                        ConnectReturnCode::ClientIdentifierNotValid,
                        ConnectReturnCode::ClientIdentifierNotValid,
                        "empty client id without clean session".to_string(),
                    )
                    .await);
            }
        };
        if let Some(w) = &will
            && !self
                .settings
                .security
                .authority
                .can_publish(&who, &client_id, &w.topic)
        {
            metrics::counter!("edge_acl_denied_total", "protocol" => "mqtt", "action" => "will")
                .increment(1);
            logs::DENIED.record("will", || {
                format!(
                    "peer={} client_id={client_id:?} user={:?} will_topic={}",
                    self.peer,
                    who.user(),
                    w.topic
                )
            });
            return Err(self
                .refuse(
                    version,
                    ConnectReturnCode::NotAuthorized,
                    ConnectReturnCode::NotAuthorized,
                    format!("publishing the will to {:?} is not allowed", w.topic),
                )
                .await);
        }
        accepted.client_id = Some(client_id.clone());
        // A client back before its will's delay ran out keeps it unsent.
        self.settings.wills.cancel(&client_id);
        let expiry = if v5 {
            session::session_expiry(
                props
                    .as_ref()
                    .and_then(|p| p.session_expiry_interval)
                    .unwrap_or(0),
            )
        } else if connect.clean_session {
            SessionExpiry::WithConnection
        } else {
            SessionExpiry::Default
        };
        accepted.expiry = Some(expiry);
        let attach = AttachOptions {
            clean: connect.clean_session,
            expiry,
            queue: self.settings.max_queued_messages,
            gate: None,
        };
        let attached = match Box::pin(router.attach(client_id.clone(), attach)).await {
            Ok(attached) => attached,
            Err(e) => {
                return Err(self
                    .refuse(
                        version,
                        ConnectReturnCode::ServiceUnavailable,
                        ConnectReturnCode::ServerUnavailable,
                        format!("cannot open the session: {e}"),
                    )
                    .await);
            }
        };
        let Attached {
            subscriber,
            deliveries,
            session_present,
        } = attached;
        let access = Access::new(self.settings.security.clone(), who, client_id.clone());
        if session_present && let Err(e) = access.prune_resumed(&subscriber).await {
            return Err(self
                .refuse(
                    version,
                    ConnectReturnCode::ServiceUnavailable,
                    ConnectReturnCode::ServerUnavailable,
                    format!("cannot update the session: {e}"),
                )
                .await);
        }
        let connack = ConnAck {
            // MQTT-3.2.2-1/2.
            session_present,
            code: ConnectReturnCode::Success,
        };
        let connack_props = v5.then(|| ConnAckProperties {
            receive_max: Some(self.settings.max_inflight),
            retain_available: Some(1),
            max_packet_size: Some(u32::try_from(self.settings.max_packet_size).unwrap_or(u32::MAX)),
            assigned_client_identifier: assigned.then(|| client_id.to_string()),
            topic_alias_max: Some(v5::TOPIC_ALIAS_MAX),
            wildcard_subscription_available: Some(1),
            subscription_identifiers_available: Some(1),
            shared_subscription_available: Some(1),
            ..ConnAckProperties::default()
        });
        session::write(
            Packet::ConnAck(connack, connack_props),
            &mut self.wbuf,
            version,
        )?;
        // Accepted: from here on the will is the connection's (MQTT-3.1.2-8).
        accepted.will = will;
        tracing::debug!(peer = %self.peer, client_id = %client_id, ?version, keep_alive = connect.keep_alive, "client connected");
        let keep_alive = (connect.keep_alive > 0)
            .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
        let v5_state = v5.then(|| {
            let state = V5::new(props.as_deref());
            accepted.v5_problem_info = Some(state.problem_info);
            let receive_max = props
                .as_ref()
                .and_then(|p| p.receive_maximum)
                .unwrap_or(u16::MAX);
            (state, receive_max)
        });
        let mut session = Session::new(
            access,
            client_id,
            router.clone(),
            subscriber,
            self.settings.max_inflight,
            session_present,
            version,
            v5_state,
        );
        if session_present {
            session.load_inbound().await?;
        }
        Ok(Established {
            session,
            deliveries,
            keep_alive,
            permit,
            source,
        })
    }

    /// A CONNACK refusal, in the form `version` reads: `v3` for MQTT 3.1.x,
    /// `v5` for MQTT 5.
    async fn refuse(
        &mut self,
        version: Version,
        v3: ConnectReturnCode,
        v5: ConnectReturnCode,
        why: String,
    ) -> Close {
        let connack = ConnAck {
            session_present: false,
            code: if version.is_v5() { v5 } else { v3 },
        };
        let props = version.is_v5().then(|| ConnAckProperties {
            reason_string: Some(why.clone()),
            ..ConnAckProperties::default()
        });
        match session::write(Packet::ConnAck(connack, props), &mut self.wbuf, version) {
            Ok(()) => Close::Refused(why),
            Err(close) => close,
        }
    }

    /// Who the client is: its certificate's identity, or its CONNECT's
    /// user name and password checked against the password file.
    async fn login(&self, login: Option<Login>) -> Result<Principal, LoginError> {
        let (user, password) = match &login {
            Some(l) => (
                Some(l.username.as_str()),
                (!l.password.is_empty()).then_some(l.password.as_bytes()),
            ),
            None => (None, None),
        };
        let result = self
            .settings
            .security
            .login(self.peer.ip(), self.identity.as_deref(), user, password)
            .await;
        let outcome = match &result {
            Ok(_) => "accepted",
            Err(LoginError::BadCredentials) => "bad_credentials",
            Err(LoginError::NotAuthorized) => "not_authorized",
        };
        metrics::counter!("edge_logins_total", "protocol" => "mqtt", "outcome" => outcome)
            .increment(1);
        if result.is_err() {
            // The user name is logged, never the password.
            let shown = self.settings.security.loggable_user(user);
            logs::LOGIN_REFUSED.record(outcome, || format!("peer={} user={shown}", self.peer));
        }
        result
    }

    async fn read_connect(&mut self) -> Result<Hello, Close> {
        loop {
            if let Some(hello) =
                codec::decode_connect(&mut self.rbuf, self.settings.max_packet_size)?
            {
                return Ok(hello);
            }
            self.fill().await?;
        }
    }

    /// Reads more bytes into the read buffer. Cancel-safe.
    async fn fill(&mut self) -> Result<(), Close> {
        match self.stream.read_some(&mut self.rbuf).await? {
            0 => Err(Close::PeerClosed),
            _ => Ok(()),
        }
    }

    /// Writes the write buffer out. Cancel-safe: the buffer is advanced by
    /// what was written, so a later flush continues where this one stopped.
    async fn flush(&mut self) -> Result<(), Close> {
        if !self.wbuf.is_empty() {
            self.stream.write_all_buf(&mut self.wbuf).await?;
        }
        Ok(())
    }

    /// The connection's main loop. Reading, writing, commits, deliveries and
    /// timers are all branches of one `select!`, so a client that stops
    /// reading cannot stop the gateway from reading it (and the other way
    /// round), and both keep-alive and a write stall are noticed.
    async fn session_loop(
        &mut self,
        session: &mut Session,
        deliveries: &mut mpsc::Receiver<Delivery>,
        keep_alive: Option<Duration>,
        shutdown: &CancellationToken,
    ) -> Close {
        let idle_limit = keep_alive.unwrap_or(Duration::from_secs(86_400));
        let stall_limit = keep_alive.unwrap_or(WRITE_STALL);
        let idle = sleep_until(Instant::now() + idle_limit);
        let stall = sleep_until(Instant::now() + stall_limit);
        tokio::pin!(idle, stall);
        let (mut reader, mut writer) = self.stream.split();
        let mut was_writing = false;
        loop {
            // An idle connection holds no buffers: they are allocated when
            // the socket is readable or something is to be written, and
            // given back once empty (idle memory per connection is what
            // a gateway with thousands of quiet devices pays for).
            release_if_empty(&mut self.rbuf);
            release_if_empty(&mut self.wbuf);
            // Packets already buffered, as far as back-pressure allows.
            while session.can_read() && self.wbuf.len() < WRITE_HIGH_WATER {
                match codec::decode(
                    &mut self.rbuf,
                    self.settings.max_packet_size,
                    session.version,
                ) {
                    Ok(Some(inbound)) => {
                        idle.as_mut().reset(Instant::now() + idle_limit);
                        if let Err(close) = session.on_packet(inbound, &mut self.wbuf).await {
                            return close;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return e.into(),
                }
            }
            // A persistent session's queue from the store, and retained
            // messages of new subscriptions, go first.
            if self.wbuf.len() < WRITE_HIGH_WATER
                && session.needs_fill()
                && let Err(close) = Box::pin(session.fill_from_store(&mut self.wbuf)).await
            {
                return close;
            }
            while self.wbuf.len() < WRITE_HIGH_WATER
                && session
                    .queued
                    .front()
                    .is_some_and(|(d, _)| session.outbox.fits(d))
            {
                let Some((delivery, dup)) = session.queued.pop_front() else {
                    break;
                };
                deliver(session, &delivery, dup, &mut self.wbuf, self.peer);
            }
            session.flush_acks().await;
            let live = session.takes_live();
            let writing = !self.wbuf.is_empty();
            if writing && !was_writing {
                stall.as_mut().reset(Instant::now() + stall_limit);
            }
            was_writing = writing;
            // Stop taking work while the client is this far behind.
            let room = self.wbuf.len() < WRITE_HIGH_WATER;
            let reading = session.can_read() && room;
            let held = session.access.held();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Close::Shutdown,
                _ = session.subscriber.taken_over() => return Close::TakenOver,
                written = writer.write_buf(&mut self.wbuf), if writing => match written {
                    Ok(0) => return Close::PeerClosed,
                    Ok(_) => stall.as_mut().reset(Instant::now() + stall_limit),
                    Err(e) => return e.into(),
                },
                Some(committed) = session.pending.next(), if !session.pending.is_empty() => {
                    if let Err(close) = session.on_committed(committed, &mut self.wbuf) {
                        return close;
                    }
                    while let Some(Some(committed)) = session.pending.next().now_or_never() {
                        if let Err(close) = session.on_committed(committed, &mut self.wbuf) {
                            return close;
                        }
                    }
                    if !reading {
                        // The wait was ours, not the client's silence.
                        idle.as_mut().reset(Instant::now() + idle_limit);
                    }
                }
                _ = sleep_until(held.unwrap_or_else(Instant::now)), if held.is_some() => {
                    // The wait was ours, not the client's silence.
                    idle.as_mut().reset(Instant::now() + idle_limit);
                }
                read = reader.read_some(&mut self.rbuf), if reading => match read {
                    Ok(0) => return Close::PeerClosed,
                    Ok(_) => {}
                    Err(e) => return e.into(),
                },
                Some(delivery) = deliveries.recv(),
                    if live && room && session.queued.is_empty() && session.outbox.has_room() =>
                {
                    let mut next = Some(delivery);
                    let mut taken = 0;
                    while let Some(delivery) = next.take() {
                        if !session.take_live(&delivery) {
                            // Already sent from the store.
                        } else if session.outbox.fits(&delivery) {
                            deliver(session, &delivery, false, &mut self.wbuf, self.peer);
                        } else {
                            // Its packet id is in flight: it waits, and so
                            // does everything after it.
                            session.queued.push_back((delivery, false));
                            break;
                        }
                        taken += 1;
                        if taken < DELIVERY_BATCH && session.outbox.has_room() {
                            next = deliveries.try_recv().ok();
                        }
                    }
                }
                _ = &mut idle, if keep_alive.is_some() && reading => {
                    return Close::KeepAlive(idle_limit);
                }
                _ = &mut stall, if writing => return Close::WriteStalled(stall_limit),
            }
        }
    }

    /// Shutdown: read nothing more, and acknowledge what commits within the
    /// drain timeout; `serve` then flushes (bounded) and closes.
    async fn drain(&mut self, session: &mut Session) -> Close {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !session.pending.is_empty() {
            match tokio::time::timeout_at(deadline, session.pending.next()).await {
                Ok(Some(committed)) => {
                    if let Err(close) = session.on_committed(committed, &mut self.wbuf) {
                        return close;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    logs::SHUTDOWN_UNACKED.record_n(
                        "drain_timeout",
                        session.pending.len() as u64,
                        || {
                            format!(
                                "peer={} client_id={} waited={DRAIN_TIMEOUT:?}",
                                self.peer, session.client_id
                            )
                        },
                    );
                    break;
                }
            }
        }
        Close::Shutdown
    }
}

/// Frees an empty buffer's memory (decoded packets may still share it).
fn release_if_empty(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = BytesMut::new();
    }
}

/// Encodes one delivery into the write buffer (the caller checked the
/// outbox has room); an unencodable one is dropped, counted, and one not
/// to be sent (expired, larger than an MQTT 5 client takes) is settled,
/// counted.
fn deliver(
    session: &mut Session,
    delivery: &Delivery,
    dup: bool,
    wbuf: &mut BytesMut,
    peer: SocketAddr,
) {
    match session
        .outbox
        .push(delivery, dup, wbuf, session.v5.as_mut())
    {
        Err(e) => {
            logs::ENCODE_FAILED.record("delivery", || {
                format!(
                    "peer={peer} client_id={} topic={} error={e}",
                    session.client_id, delivery.message.topic
                )
            });
            metrics::counter!("edge_messages_dropped_total", "reason" => "unencodable")
                .increment(1);
        }
        Ok(Pushed::Sent) => {
            metrics::counter!("edge_messages_out_total", "protocol" => "mqtt").increment(1);
        }
        Ok(Pushed::Skipped(reason)) => {
            session.settled(delivery.seq);
            if reason == "expired" {
                metrics::counter!("edge_messages_expired_total", "protocol" => delivery.message.origin.protocol.as_str()).increment(1);
            } else {
                metrics::counter!("edge_messages_dropped_total", "reason" => reason).increment(1);
                logs::NOT_SENT.record(reason, || {
                    format!(
                        "peer={peer} client_id={} topic={} (larger than the client's maximum packet size)",
                        session.client_id, delivery.message.topic
                    )
                });
            }
        }
    }
}
