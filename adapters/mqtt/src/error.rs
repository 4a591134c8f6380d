use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use edge_core::PublishError;

/// Errors of the public API.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
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
}

impl ProtocolError {
    /// Every label [`ProtocolError::reason`] gives.
    pub(crate) const REASONS: [&'static str; 10] = [
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
            | ProtocolError::AckMismatch { .. } => "unexpected_packet",
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
    #[error("client read nothing for {0:?} while packets waited for it")]
    WriteStalled(Duration),
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
            Close::WriteStalled(_) => "write_stalled",
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
