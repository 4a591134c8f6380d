//! An AMQP 0-9-1 client over a bare `TcpStream`, for the cases real
//! clients never produce: it does the handshake with amq-protocol's
//! generator, then writes whatever bytes a test wants and reads frames
//! back with amq-protocol's parser.

use std::net::SocketAddr;
use std::time::Duration;

use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame, parse_frame};
use amq_protocol::protocol::{AMQPClass, channel, connection};
use amq_protocol::types::FieldTable;
use anyhow::{Context, Result, anyhow, bail};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long any single read may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection after the handshake (or before, see [`RawAmqp::connect`]).
#[derive(Debug)]
pub struct RawAmqp {
    stream: TcpStream,
    buf: BytesMut,
}

/// A close the server sent: code, text, class and method ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

/// Encodes one frame.
pub fn frame_bytes(frame: &AMQPFrame) -> Vec<u8> {
    match gen_frame(frame)(WriteContext::from(Vec::new())) {
        Ok(ctx) => ctx.into_inner().0,
        Err(e) => panic!("cannot encode {frame}: {e}"),
    }
}

impl RawAmqp {
    /// Connects without sending anything.
    pub async fn connect(addr: SocketAddr) -> Result<RawAmqp> {
        let stream = TcpStream::connect(addr).await?;
        Ok(RawAmqp {
            stream,
            buf: BytesMut::new(),
        })
    }

    /// Connects and completes the handshake as guest/guest with
    /// `frame_max`, no heartbeats.
    pub async fn open(addr: SocketAddr, frame_max: u32) -> Result<RawAmqp> {
        RawAmqp::open_tuned(addr, frame_max, 0).await
    }

    /// The same with `heartbeat` seconds in tune-ok.
    pub async fn open_tuned(addr: SocketAddr, frame_max: u32, heartbeat: u16) -> Result<RawAmqp> {
        RawAmqp::open_announcing(addr, frame_max, heartbeat, FieldTable::default()).await
    }

    /// The same with these start-ok client-properties (e.g. capabilities).
    pub async fn open_announcing(
        addr: SocketAddr,
        frame_max: u32,
        heartbeat: u16,
        client_properties: FieldTable,
    ) -> Result<RawAmqp> {
        let mut c = RawAmqp::connect(addr).await?;
        c.write(b"AMQP\x00\x00\x09\x01").await?;
        match c.frame().await? {
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(_))) => {}
            other => bail!("expected connection.start, got {other}"),
        }
        c.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties,
                mechanism: "PLAIN".into(),
                response: "\0guest\0guest".into(),
                locale: "en_US".into(),
            })),
        )
        .await?;
        match c.frame().await? {
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(_))) => {}
            other => bail!("expected connection.tune, got {other}"),
        }
        c.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 16,
                frame_max,
                heartbeat,
            })),
        )
        .await?;
        c.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        )
        .await?;
        match c.frame().await? {
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))) => {}
            other => bail!("expected connection.open-ok, got {other}"),
        }
        Ok(c)
    }

    /// Opens channel `ch` and waits for open-ok.
    pub async fn open_channel(&mut self, ch: u16) -> Result<()> {
        self.method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await?;
        match self.frame().await? {
            AMQPFrame::Method(c, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))) if c == ch => {
                Ok(())
            }
            other => bail!("expected channel.open-ok, got {other}"),
        }
    }

    pub async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    pub async fn method(&mut self, ch: u16, method: AMQPClass) -> Result<()> {
        self.write(&frame_bytes(&AMQPFrame::Method(ch, method)))
            .await
    }

    /// Raw bytes until the server closes the socket (bounded).
    pub async fn read_to_end(&mut self) -> Result<Vec<u8>> {
        let mut out = self.buf.split().to_vec();
        tokio::time::timeout(READ_TIMEOUT, self.stream.read_to_end(&mut out))
            .await
            .map_err(|_| anyhow!("the server did not close within {READ_TIMEOUT:?}"))??;
        Ok(out)
    }

    /// The next frame from the server (heartbeats included).
    pub async fn frame(&mut self) -> Result<AMQPFrame> {
        loop {
            if self.buf.len() >= 7 {
                let size = u32::from_be_bytes([self.buf[3], self.buf[4], self.buf[5], self.buf[6]]);
                let whole = size as usize + 8;
                if self.buf.len() >= whole {
                    let frame = parse_frame(&self.buf[..whole])
                        .map_err(|e| anyhow!("unparseable frame from the server: {e:?}"))?
                        .1;
                    self.buf.advance(whole);
                    return Ok(frame);
                }
            }
            let n = tokio::time::timeout(READ_TIMEOUT, self.stream.read_buf(&mut self.buf))
                .await
                .map_err(|_| anyhow!("no frame within {READ_TIMEOUT:?}"))?
                .context("reading")?;
            if n == 0 {
                bail!("the server closed the socket");
            }
        }
    }

    /// Skips frames until connection.close, answers close-ok, and expects
    /// the socket to be closed after.
    pub async fn expect_connection_close(&mut self) -> Result<Closed> {
        loop {
            if let AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c))) =
                self.frame().await?
            {
                self.method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                )
                .await?;
                let rest = self.read_to_end().await?;
                if !rest.is_empty() {
                    bail!("{} bytes after connection.close", rest.len());
                }
                return Ok(Closed {
                    code: c.reply_code,
                    text: c.reply_text.to_string(),
                    class_id: c.class_id,
                    method_id: c.method_id,
                });
            }
        }
    }

    /// Skips frames until channel.close on `ch`, answers close-ok.
    pub async fn expect_channel_close(&mut self, ch: u16) -> Result<Closed> {
        loop {
            match self.frame().await? {
                AMQPFrame::Method(c, AMQPClass::Channel(channel::AMQPMethod::Close(close)))
                    if c == ch =>
                {
                    self.method(
                        ch,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    )
                    .await?;
                    return Ok(Closed {
                        code: close.reply_code,
                        text: close.reply_text.to_string(),
                        class_id: close.class_id,
                        method_id: close.method_id,
                    });
                }
                AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                    bail!(
                        "expected a channel close, the connection closed: {} {}",
                        c.reply_code,
                        c.reply_text
                    )
                }
                _ => {}
            }
        }
    }
}
