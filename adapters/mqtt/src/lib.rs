//! MQTT 5.0, 3.1.1 and 3.1 server adapter: decodes client packets with
//! rumqttd's `protocol` codecs (v4 and v5), publishes into the
//! [`edge_core::Router`], acknowledges QoS 1/2 publishes only once they
//! are committed to the store, and writes the router's deliveries back to
//! subscribers at QoS 0, 1 or 2.
//!
//! - MQTT 3.1 (`MQIsdp`, level 3) is served like 3.1.1: its CONNECT is
//!   rewritten into a 3.1.1 one before rumqttd parses it (`codec.rs`).
//!   Levels below 5 that are not served get CONNACK 0x01, above 5 MQTT 5's
//!   0x84; an unknown protocol name is closed without a CONNACK.
//! - MQTT 5 (`v5.rs`): the connection's state (topic aliases both ways,
//!   the client's receive maximum and maximum packet size, problem
//!   information) and the mapping of its properties to the core's
//!   `Properties`; reason codes in every ack, DISCONNECT with a reason
//!   before the gateway closes a connection (`error.rs`). The property
//!   blocks and packet types the v5 codec mishandles are checked from the
//!   raw frame first (`codec/props.rs`).
//! - Last wills are kept from CONNECT and published through the router
//!   when an accepted connection ends any way but DISCONNECT (MQTT 5:
//!   or with DISCONNECT 0x04), gateway shutdown included; an MQTT 5 will
//!   delay holds it, and a reconnect in time cancels it (`will.rs`).
//! - QoS 2 both ways: inbound PUBREC after the commit, PUBREL → PUBCOMP
//!   (`session.rs`); outbound PUBLISH → PUBREC → PUBREL → PUBCOMP within
//!   `max_inflight` (`outbox.rs`).
//! - Persistent sessions (`clean_session = 0`) live in the core
//!   (`edge_core::session`): the connection attaches, reads the session's
//!   durable queue from the store before live deliveries, acknowledges
//!   queue entries on PUBACK/PUBCOMP, records a QoS 2 PUBREC so a resumed
//!   session sends PUBREL, and commits inbound QoS 2 packet ids with their
//!   message so a retransmission after a restart is not routed twice.
//! - Retained messages are stored by the router; a SUBSCRIBE sends the
//!   matching ones with RETAIN set before live deliveries.
//! - Shared subscriptions (`$share/{group}/{filter}`) are the core's
//!   (`edge_core` `share.rs`); the connection keeps its in-flight group
//!   deliveries until PUBACK/PUBREC and, when it ends, hands back those
//!   and the unsent ones for another member (`Router::redistribute`).
//!
//! - MQTT over WebSocket (`mqtt.ws_listen`, subprotocol `mqtt`) is the same
//!   server: the upgrade shares the handshake budget, then the connection
//!   loop runs on a pipe bridged to the WebSocket (`websocket.rs`). The loop
//!   is generic over its byte stream (`transport.rs`), for TLS next.
//!
//! Authentication is not served yet.

mod access;
mod codec;
mod connection;
mod error;
mod handshakes;
mod listener;
mod logs;
mod outbox;
mod session;
mod transport;
mod v5;
mod websocket;
mod will;

pub use error::MqttError;
pub use listener::MqttListener;

/// The packet decoder the connections use, reachable from property tests
/// and fuzz targets. Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    use bytes::BytesMut;
    pub use rumqttd::protocol::{Connect, Login, Packet};

    /// A decoding failure: the metric label of the protocol error and its message.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct DecodeError {
        /// `packet_too_large`, `malformed`, `unknown_protocol`, `not_connect`, ...
        pub reason: &'static str,
        pub message: String,
    }

    impl From<crate::error::ProtocolError> for DecodeError {
        fn from(e: crate::error::ProtocolError) -> Self {
            DecodeError {
                reason: e.reason(),
                message: e.to_string(),
            }
        }
    }

    /// The first packet of a connection, as `decode_connect` sees it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Hello {
        /// MQTT 3.1.1 (`level` 4) or 3.1 (`level` 3).
        Accepted {
            level: u8,
            connect: Connect,
            login: Option<Login>,
            will: Option<Will>,
        },
        Unsupported {
            level: u8,
        },
    }

    /// A will from CONNECT, its topic validated.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Will {
        pub topic: String,
        pub payload: bytes::Bytes,
        pub qos: u8,
        pub retain: bool,
    }

    /// Decodes the next packet of `buf` on an MQTT 3.1.1 connection,
    /// consuming it: the packet, its QoS and packet id (0 when not a QoS
    /// 1/2 PUBLISH). `None` until whole.
    pub fn decode(
        buf: &mut BytesMut,
        max_packet_size: usize,
    ) -> Result<Option<(Packet, u8, u16)>, DecodeError> {
        decode_as(buf, max_packet_size, false)
    }

    /// [`decode`] on an MQTT 5 connection when `v5`.
    pub fn decode_as(
        buf: &mut BytesMut,
        max_packet_size: usize,
        v5: bool,
    ) -> Result<Option<(Packet, u8, u16)>, DecodeError> {
        let version = if v5 {
            crate::codec::Version::V5
        } else {
            crate::codec::Version::V311
        };
        Ok(crate::codec::decode(buf, max_packet_size, version)?.map(|i| (i.packet, i.qos, i.pkid)))
    }

    /// Decodes the first packet of a connection, which must be CONNECT.
    pub fn decode_connect(
        buf: &mut BytesMut,
        max_packet_size: usize,
    ) -> Result<Option<Hello>, DecodeError> {
        Ok(
            crate::codec::decode_connect(buf, max_packet_size)?.map(|h| match h {
                crate::codec::Hello::Accepted {
                    version,
                    connect,
                    props: _,
                    login,
                    will,
                } => Hello::Accepted {
                    level: match version {
                        crate::codec::Version::V31 => 3,
                        crate::codec::Version::V311 => 4,
                        crate::codec::Version::V5 => 5,
                    },
                    connect,
                    login,
                    will: will.map(|w| Will {
                        topic: w.topic,
                        payload: w.payload,
                        qos: w.qos as u8,
                        retain: w.retain,
                    }),
                },
                crate::codec::Hello::Unsupported { level } => Hello::Unsupported { level },
            }),
        )
    }
}
