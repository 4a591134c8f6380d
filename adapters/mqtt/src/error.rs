use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use edge_core::PublishError;

/// Errors of the public API.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("MQTT over TLS on {addr} needs a server certificate ([tls] cert_file and key_file)")]
    NoCertificate { addr: SocketAddr },
    #[error("cannot bind the MQTT listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the local address of the MQTT listener bound on {addr}: {source}")]
    LocalAddr {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// A client broke the protocol; the connection is closed, nothing else is affected.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProtocolError {
    #[error("packet of {size} bytes exceeds max_packet_size of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("malformed packet: {0}")]
    Malformed(rumqttd::protocol::Error),
    #[error("unknown protocol name in CONNECT")]
    UnknownProtocol,
    #[error("first packet was not CONNECT (packet type {0})")]
    NotConnect(u8),
    #[error("second CONNECT on one connection")]
    DuplicateConnect,
    #[error("topic name is not UTF-8")]
    TopicNotUtf8,
    #[error("invalid topic name {0:?} (empty, wildcard or NUL)")]
    InvalidTopic(String),
    /// A topic of the AMQP exchanges' namespace (`$amqp/...`).
    #[error("topic {0:?} is reserved to AMQP clients")]
    ReservedTopic(String),
    #[error("invalid will topic {0:?} (not UTF-8, empty, wildcard or NUL)")]
    InvalidWillTopic(String),
    #[error("unexpected {0} packet from a client")]
    Unexpected(&'static str),
    /// PUBREL for a QoS 2 publish whose PUBREC has not been sent: the
    /// message is not durable yet, so it cannot be released.
    #[error("PUBREL for packet id {0} before its PUBREC")]
    EarlyPubRel(u16),
    /// An acknowledgement of the wrong kind for a delivery in flight.
    #[error("{got} for packet id {pkid}, which awaits {awaiting}")]
    AckMismatch {
        got: &'static str,
        pkid: u16,
        awaiting: &'static str,
    },
    /// An MQTT 5 property block that breaks the spec: malformed (0x81),
    /// or a protocol error (0x82) when `violation`.
    #[error("{why}")]
    BadProperty { violation: bool, why: String },
    /// AUTH (MQTT 5 enhanced authentication) is not served.
    #[error("AUTH packet, but no authentication method was agreed")]
    Auth,
    /// A topic alias of 0, above the maximum granted, or unknown.
    #[error("topic alias {alias}: {why}")]
    TopicAlias { alias: u16, why: &'static str },
    /// More unacknowledged QoS 1/2 publishes than the receive maximum.
    #[error("more than {0} QoS 1/2 publishes unacknowledged (receive maximum)")]
    ReceiveMaximum(u16),
    /// A QoS 0 PUBLISH whose payload format indicator says UTF-8 and
    /// whose payload is not.
    #[error("payload is not UTF-8, as its payload format indicator says")]
    PayloadFormat,
    /// MQTT 5 DISCONNECT setting a session expiry when CONNECT set none.
    #[error("DISCONNECT sets a session expiry, CONNECT had 0")]
    ExpiryAfterZero,
    /// No local on a shared subscription (MQTT-3.8.3-4).
    #[error("no local on shared subscription {0:?}")]
    SharedNoLocal(String),
}

impl ProtocolError {
    /// Every label [`ProtocolError::reason`] gives.
    pub(crate) const REASONS: [&'static str; 15] = [
        "packet_too_large",
        "malformed",
        "unknown_protocol",
        "not_connect",
        "duplicate_connect",
        "topic_not_utf8",
        "invalid_topic",
        "reserved_topic",
        "invalid_will_topic",
        "unexpected_packet",
        "bad_property",
        "auth",
        "topic_alias",
        "receive_maximum",
        "payload_format",
    ];

    /// Label of `edge_mqtt_protocol_errors_total`.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            ProtocolError::TooLarge { .. } => "packet_too_large",
            ProtocolError::Malformed(_) => "malformed",
            ProtocolError::UnknownProtocol => "unknown_protocol",
            ProtocolError::NotConnect(_) => "not_connect",
            ProtocolError::DuplicateConnect => "duplicate_connect",
            ProtocolError::TopicNotUtf8 => "topic_not_utf8",
            ProtocolError::InvalidTopic(_) => "invalid_topic",
            ProtocolError::ReservedTopic(_) => "reserved_topic",
            ProtocolError::InvalidWillTopic(_) => "invalid_will_topic",
            ProtocolError::Unexpected(_)
            | ProtocolError::EarlyPubRel(_)
            | ProtocolError::AckMismatch { .. }
            | ProtocolError::ExpiryAfterZero
            | ProtocolError::SharedNoLocal(_) => "unexpected_packet",
            ProtocolError::BadProperty { .. } => "bad_property",
            ProtocolError::Auth => "auth",
            ProtocolError::TopicAlias { .. } => "topic_alias",
            ProtocolError::ReceiveMaximum(_) => "receive_maximum",
            ProtocolError::PayloadFormat => "payload_format",
        }
    }

    /// The MQTT 5 reason code of the DISCONNECT (or CONNACK) it earns.
    pub(crate) fn code(&self) -> u8 {
        match self {
            ProtocolError::TooLarge { .. } => 0x95,
            ProtocolError::Malformed(_)
            | ProtocolError::TopicNotUtf8
            | ProtocolError::BadProperty {
                violation: false, ..
            } => 0x81,
            ProtocolError::InvalidTopic(_)
            | ProtocolError::ReservedTopic(_)
            | ProtocolError::InvalidWillTopic(_) => 0x90,
            ProtocolError::TopicAlias { .. } => 0x94,
            ProtocolError::ReceiveMaximum(_) => 0x93,
            ProtocolError::PayloadFormat => 0x99,
            ProtocolError::UnknownProtocol
            | ProtocolError::NotConnect(_)
            | ProtocolError::DuplicateConnect
            | ProtocolError::Unexpected(_)
            | ProtocolError::EarlyPubRel(_)
            | ProtocolError::AckMismatch { .. }
            | ProtocolError::BadProperty { .. }
            | ProtocolError::Auth
            | ProtocolError::ExpiryAfterZero
            | ProtocolError::SharedNoLocal(_) => 0x82,
        }
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Close {
    #[error("client sent DISCONNECT")]
    Disconnect,
    #[error("peer closed the socket")]
    PeerClosed,
    #[error("no CONNECT within {0:?}")]
    ConnectTimeout(Duration),
    #[error("no CONNECT yet, closed to make room for newer connections")]
    HandshakeEvicted,
    #[error("no packet within 1.5 x keep-alive ({0:?})")]
    KeepAlive(Duration),
    #[error("CONNECT refused: {0}")]
    Refused(String),
    #[error("client id taken over by a newer connection")]
    TakenOver,
    /// MQTT 5 DISCONNECT with reason 0x04: the will is published.
    #[error("client sent DISCONNECT with will message")]
    DisconnectWithWill,
    #[error("client read nothing for {0:?} while packets waited for it")]
    WriteStalled(Duration),
    #[error("held back by the publish rate limit for {0:?} without a break")]
    RateLimited(Duration),
    #[error("gateway shutting down")]
    Shutdown,
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("store refused a message: {0}")]
    Store(PublishError),
    /// The session's durable state could not be read or written.
    #[error("session store: {0}")]
    Session(String),
    #[error("cannot encode a packet: {0}")]
    Encode(rumqttd::protocol::Error),
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

impl Close {
    /// The reason code of the DISCONNECT an MQTT 5 client is sent before
    /// the socket closes, when there is one to send.
    pub(crate) fn disconnect_code(&self) -> Option<u8> {
        match self {
            Close::Protocol(e) => Some(e.code()),
            Close::KeepAlive(_) => Some(0x8D),
            Close::TakenOver => Some(0x8E),
            Close::Shutdown => Some(0x8B),
            Close::Store(PublishError::Full { .. }) => Some(0x97),
            Close::Store(_) | Close::Session(_) => Some(0x80),
            Close::WriteStalled(_) => Some(0x89),
            Close::RateLimited(_) => Some(0x96),
            Close::Encode(_) => Some(0x83),
            Close::Disconnect
            | Close::DisconnectWithWill
            | Close::PeerClosed
            | Close::ConnectTimeout(_)
            | Close::HandshakeEvicted
            | Close::Refused(_)
            | Close::Io(_) => None,
        }
    }

    /// Whether an accepted connection that ended this way publishes its
    /// will: always, except after the client's DISCONNECT (MQTT-3.1.2-8,
    /// MQTT-3.1.2-10). Gateway shutdown publishes it too, as Mosquitto does.
    pub(crate) fn publishes_will(&self) -> bool {
        !matches!(self, Close::Disconnect)
    }

    /// Label of `edge_mqtt_disconnects_total`.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Close::Disconnect => "client_disconnect",
            Close::PeerClosed => "peer_closed",
            Close::ConnectTimeout(_) => "connect_timeout",
            Close::HandshakeEvicted => "handshake_evicted",
            Close::KeepAlive(_) => "keep_alive_timeout",
            Close::Refused(_) => "connect_refused",
            Close::TakenOver => "taken_over",
            Close::DisconnectWithWill => "client_disconnect_with_will",
            Close::WriteStalled(_) => "write_stalled",
            Close::RateLimited(_) => "rate_limited",
            Close::Shutdown => "shutdown",
            Close::Protocol(_) => "protocol_error",
            Close::Store(PublishError::Full { .. }) => "store_full",
            Close::Store(_) => "store_error",
            Close::Session(_) => "session_error",
            Close::Encode(_) => "encode_error",
            Close::Io(_) => "io_error",
        }
    }
}
