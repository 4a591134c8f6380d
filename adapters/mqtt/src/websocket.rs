//! MQTT over WebSocket (`mqtt.ws_listen`, `mqtt.ws_path`), for dashboards
//! and browsers on the site network.
//!
//! A connection is a TCP connection of the MQTT listener like any other: it
//! holds a place among pending handshakes from its accept on, the HTTP
//! upgrade counts as handshake time (upgrade and CONNECT together within
//! `connect_timeout`; closed at shutdown or when evicted), and once
//! upgraded it becomes an ordinary [`Connection`] with the same limits,
//! sessions and router as TCP.
//!
//! The upgrade is accepted only on the configured path (404 otherwise) and
//! only with the `mqtt` subprotocol, which is answered (400 without it, as
//! MQTT brokers refuse WebSocket clients that do not ask for MQTT). A plain
//! HTTP request gets a 400 and the connection is closed.
//!
//! Design: a bridge between the WebSocket and a `tokio::io::duplex` pipe,
//! the connection running on the pipe's other end. The alternative, a
//! [`crate::transport::Transport`] on the WebSocket itself, would need a
//! cancel-safe frame writer and would mix WebSocket control frames (ping,
//! pong, close) into the connection loop. With the pipe, the connection
//! sees only the MQTT byte stream, which is what MQTT over WebSocket is
//! (MQTT-6.0.0-1..3: binary frames; a packet may span frames, a frame may
//! hold several packets): framing stays here, the connection loop stays
//! the one TCP runs. The cost is a copy through the pipe and the pipe's
//! buffer (at most `PIPE_SIZE` each way, allocated while bytes are in it).
//! A WebSocket connection holds more memory than a TCP one all the same:
//! tungstenite's read buffer (`WS_READ_BUFFER`) and the bridge's.
//! The bridge runs in the connection's own task (joined with it), so
//! shutdown waits for both.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use edge_core::Router;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response,
};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use crate::connection::{Connection, Settings};
use crate::listener::Admission;
use crate::logs;
use crate::transport::Stream;

/// The subprotocol a client must ask for (MQTT 3.1.1 section 6, MQTT 5 the same).
pub(crate) const SUBPROTOCOL: &str = "mqtt";
/// Bytes buffered in the pipe in each direction before the side writing
/// waits (back-pressure reaches the WebSocket, then the TCP window).
const PIPE_SIZE: usize = 64 * 1024;
/// Bytes reserved for one read from the connection's side of the pipe.
const READ_CHUNK: usize = 8 * 1024;
/// How long the bridge waits, once the connection has ended, for its last
/// bytes and the close handshake to get through.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// tungstenite's read buffer, allocated for the connection's life (its
/// default, 128 KiB, is for throughput, not for many quiet dashboards).
const WS_READ_BUFFER: usize = 8 * 1024;
/// WebSocket messages may hold several MQTT packets; never less than this.
const MIN_MESSAGE_SIZE: usize = 64 * 1024;

/// Why an upgrade was refused (`edge_mqtt_ws_refused_total`).
pub(crate) const REFUSED_REASONS: [&str; 4] = [
    "wrong_path",
    "no_subprotocol",
    "not_websocket",
    "upgrade_timeout",
];
/// Why an upgraded connection was closed abnormally (`edge_mqtt_ws_closed_total`).
pub(crate) const CLOSED_REASONS: [&str; 3] = ["text_frame", "too_large", "ws_protocol"];

/// The WebSocket endpoint of the MQTT listener.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) path: Arc<str>,
    pub(crate) config: WebSocketConfig,
}

impl Endpoint {
    pub(crate) fn new(path: &str, max_packet_size: usize) -> Endpoint {
        let max_message = max_packet_size.max(MIN_MESSAGE_SIZE);
        Endpoint {
            path: path.into(),
            config: WebSocketConfig::default()
                .read_buffer_size(WS_READ_BUFFER)
                .write_buffer_size(0)
                .max_message_size(Some(max_message))
                .max_frame_size(Some(max_message)),
        }
    }
}

/// Upgrades the connection and serves MQTT on it until it ends.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve<S: Wire>(
    mut stream: S,
    peer: SocketAddr,
    identity: Option<String>,
    endpoint: Endpoint,
    settings: Arc<Settings>,
    router: Router,
    admission: Admission,
    shutdown: CancellationToken,
) {
    let connect_timeout = settings.connect_timeout;
    let deadline = Instant::now() + connect_timeout;
    let upgraded = tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = admission.handshake.evicted() => {
            tracing::debug!(%peer, "WebSocket upgrade closed to make room for newer handshakes");
            return;
        }
        upgraded = timeout_at(deadline, upgrade(&mut stream, &endpoint)) => upgraded,
    };
    let ws = match upgraded {
        Ok(Ok(ws)) => ws,
        Ok(Err(refused)) => {
            refused.record(peer, &endpoint.path);
            if refused.answer_400 {
                let _ = timeout(connect_timeout, answer_bad_request(&mut stream, &endpoint)).await;
            }
            return;
        }
        Err(_) => {
            Refused::new(
                "upgrade_timeout",
                format!("no upgrade within {connect_timeout:?}"),
            )
            .record(peer, &endpoint.path);
            return;
        }
    };
    metrics::counter!("edge_mqtt_ws_connections_total").increment(1);
    metrics::gauge!("edge_mqtt_ws_connections").increment(1.0);
    tracing::debug!(%peer, "WebSocket upgraded");
    let (pipe, bridge_end) = tokio::io::duplex(PIPE_SIZE);
    // CONNECT gets what the upgrade left of connect_timeout.
    let settings = Arc::new(Settings {
        connect_timeout: deadline.saturating_duration_since(Instant::now()),
        ..Settings::clone(&settings)
    });
    let connection = Connection::new(Stream(pipe), peer, settings, identity);
    let done = CancellationToken::new();
    let serve = async {
        connection.serve(router, admission, shutdown).await;
        done.cancel();
    };
    tokio::join!(serve, bridge(ws, bridge_end, peer, &done));
    metrics::gauge!("edge_mqtt_ws_connections").decrement(1.0);
}

/// An upgrade refused: the metric label, what to log, and whether the
/// client still needs an answer (tungstenite answers the refusals it
/// made through the callback, not the requests it could not take).
#[derive(Debug)]
struct Refused {
    reason: &'static str,
    why: String,
    answer_400: bool,
}

impl Refused {
    fn new(reason: &'static str, why: String) -> Refused {
        Refused {
            reason,
            why,
            answer_400: false,
        }
    }

    fn record(&self, peer: SocketAddr, path: &str) {
        metrics::counter!("edge_mqtt_ws_refused_total", "reason" => self.reason).increment(1);
        logs::WS_REFUSED.record(self.reason, || {
            format!("peer={peer} ws_path={path} why={}", self.why)
        });
    }
}

/// The HTTP upgrade, checked against the endpoint.
async fn upgrade<'s, S: Wire>(
    stream: &'s mut S,
    endpoint: &Endpoint,
) -> Result<WebSocketStream<&'s mut S>, Refused> {
    let check = Check {
        path: endpoint.path.clone(),
    };
    match tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(endpoint.config))
        .await
    {
        Ok(ws) => Ok(ws),
        Err(WsError::Http(response)) => {
            let reason = if response.status() == StatusCode::NOT_FOUND {
                "wrong_path"
            } else {
                "no_subprotocol"
            };
            Err(Refused::new(
                reason,
                format!("answered {}", response.status()),
            ))
        }
        Err(e @ (WsError::Protocol(_) | WsError::HttpFormat(_) | WsError::Capacity(_))) => {
            Err(Refused {
                answer_400: true,
                ..Refused::new("not_websocket", e.to_string())
            })
        }
        Err(e) => Err(Refused::new("not_websocket", e.to_string())),
    }
}

/// The upgrade request's path and subprotocol; the response names `mqtt`.
#[derive(Debug)]
struct Check {
    path: Arc<str>,
}

impl Callback for Check {
    fn on_request(self, request: &Request, response: Response) -> Result<Response, ErrorResponse> {
        check_request(&self.path, request, response)
    }
}

// The error is tungstenite's response type, as its `Callback` wants it.
#[allow(clippy::result_large_err)]
fn check_request(
    path: &str,
    request: &Request,
    mut response: Response,
) -> Result<Response, ErrorResponse> {
    if request.uri().path() != path {
        return Err(error_response(
            StatusCode::NOT_FOUND,
            format!("MQTT over WebSocket is served on {path}\n"),
        ));
    }
    let offers_mqtt = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|list| list.split(','))
        .any(|protocol| protocol.trim() == SUBPROTOCOL);
    if !offers_mqtt {
        return Err(error_response(
            StatusCode::BAD_REQUEST,
            format!("the WebSocket subprotocol must be {SUBPROTOCOL:?}\n"),
        ));
    }
    response.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    Ok(response)
}

fn error_response(status: StatusCode, body: String) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(body.clone()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    response
}

/// A 400 for a request that is no WebSocket upgrade (best effort).
async fn answer_bad_request<S: Wire>(stream: &mut S, endpoint: &Endpoint) -> std::io::Result<()> {
    let body = format!(
        "MQTT over WebSocket: send a WebSocket upgrade to {} with Sec-WebSocket-Protocol: {SUBPROTOCOL}\n",
        endpoint.path
    );
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(answer.as_bytes()).await?;
    stream.shutdown().await
}

/// What the WebSocket runs on: plain TCP (`ws_listen`) or TLS (`wss_listen`).
pub(crate) trait Wire: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Wire for S {}

type Ws<'s, S> = WebSocketStream<&'s mut S>;

/// Moves bytes both ways between the WebSocket and the connection's pipe
/// until both directions are done, or `done` (the connection ended) plus
/// [`CLOSE_TIMEOUT`].
async fn bridge<S: Wire>(
    ws: Ws<'_, S>,
    pipe: DuplexStream,
    peer: SocketAddr,
    done: &CancellationToken,
) {
    let (sink, source) = ws.split();
    let (from_connection, to_connection) = tokio::io::split(pipe);
    let both = async {
        tokio::join!(
            inbound(source, to_connection),
            outbound(from_connection, sink)
        )
    };
    let give_up = async {
        done.cancelled().await;
        tokio::time::sleep(CLOSE_TIMEOUT).await;
    };
    tokio::select! {
        (inbound, outbound) = both => {
            for result in [inbound, outbound] {
                if let Err(e) = result {
                    record_error(peer, &e);
                }
            }
        }
        _ = give_up => tracing::debug!(%peer, "WebSocket close handshake not completed"),
    }
}

/// Client → connection: the payload of binary messages, in order. At the
/// client's close (or failure) the pipe is shut down, so the connection
/// reads the end of its stream.
async fn inbound<S: Wire>(
    mut source: futures::stream::SplitStream<Ws<'_, S>>,
    mut to_connection: WriteHalf<DuplexStream>,
) -> Result<(), BridgeError> {
    let result = async {
        while let Some(message) = source.next().await {
            match message.map_err(BridgeError::Ws)? {
                Message::Binary(data) => {
                    if to_connection.write_all(&data).await.is_err() {
                        // The connection has ended; its end closes the WebSocket.
                        return Ok(());
                    }
                }
                // MQTT-6.0.0-1: any other data frame closes the connection.
                Message::Text(_) => return Err(BridgeError::TextFrame),
                // Pongs are answered by tungstenite.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                Message::Close(_) => break,
            }
        }
        Ok(())
    }
    .await;
    let _ = to_connection.shutdown().await;
    result
}

/// Connection → client: what the connection wrote, one binary message per
/// read; at its end, the close handshake.
async fn outbound<S: Wire>(
    mut from_connection: ReadHalf<DuplexStream>,
    mut sink: futures::stream::SplitSink<Ws<'_, S>, Message>,
) -> Result<(), BridgeError> {
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(READ_CHUNK);
        match from_connection.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let message = Message::Binary(buf.split().freeze());
        sink.send(message).await.map_err(BridgeError::Ws)?;
    }
    match sink.close().await {
        Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Ok(()),
        Err(e) => Err(BridgeError::Ws(e)),
    }
}

#[derive(Debug)]
enum BridgeError {
    TextFrame,
    Ws(WsError),
}

fn record_error(peer: SocketAddr, error: &BridgeError) {
    let (reason, why) = match error {
        BridgeError::TextFrame => (
            "text_frame",
            "a text frame (MQTT needs binary frames)".to_string(),
        ),
        BridgeError::Ws(WsError::ConnectionClosed | WsError::AlreadyClosed) => return,
        // Many clients drop the socket after DISCONNECT without a close
        // frame: a TCP close, not a WebSocket fault.
        BridgeError::Ws(e @ WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
            tracing::debug!(%peer, error = %e, "WebSocket closed without a close frame");
            return;
        }
        BridgeError::Ws(WsError::Io(e)) => {
            tracing::debug!(%peer, error = %e, "WebSocket connection failed");
            return;
        }
        BridgeError::Ws(e @ WsError::Capacity(_)) => ("too_large", e.to_string()),
        BridgeError::Ws(e) => ("ws_protocol", e.to_string()),
    };
    metrics::counter!("edge_mqtt_ws_closed_total", "reason" => reason).increment(1);
    logs::WS_CLOSED.record(reason, || format!("peer={peer} why={why}"));
}
