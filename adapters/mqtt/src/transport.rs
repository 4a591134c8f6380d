//! What a connection needs of its byte stream, so that one connection loop
//! serves every transport: plain TCP, and any `AsyncRead + AsyncWrite`
//! stream (the WebSocket bridge's pipe today, TLS next).
//!
//! The connection reads and writes in the branches of one `select!`, so it
//! splits its stream into a read half and a write half for the loop, and
//! every read must be cancel-safe: bytes already read are in the caller's
//! buffer, never in a dropped future.
//!
//! Plain TCP keeps its idle-memory trick: it waits for readability without
//! a buffer and reserves one only once there is something to read, so a
//! quiet connection holds no read buffer. A generic stream (TLS, the
//! WebSocket pipe) can only read into a buffer it already has; it reserves
//! one before each read: a small one while reads are small (a quiet client
//! waits on [`IDLE_CHUNK`] bytes, not [`READ_CHUNK`]), a full one once a
//! read filled what was reserved.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::net::tcp;

/// Bytes reserved in the read buffer before a read.
const READ_CHUNK: usize = 8 * 1024;
/// Bytes a generic stream reserves after a read that did not fill its
/// reservation: what a quiet TLS or WebSocket client holds while it waits.
const IDLE_CHUNK: usize = 512;

/// The reading side of a transport.
pub(crate) trait ReadSome {
    /// Appends what is available (at least one byte) to `buf`; `Ok(0)` is
    /// the end of the stream. Cancel-safe: cancelled, it has read nothing.
    fn read_some(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send;
}

/// A connection's byte stream.
pub(crate) trait Transport: ReadSome + AsyncWrite + Unpin + Send {
    type Reader<'a>: ReadSome + Send
    where
        Self: 'a;
    type Writer<'a>: AsyncWrite + Unpin + Send
    where
        Self: 'a;

    /// The two halves, for reading and writing concurrently.
    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>);
}

/// Waits for readability, then reads what is there. The buffer is reserved
/// only then, and given back if the wake-up was spurious.
async fn read_ready(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        buf.reserve(READ_CHUNK);
        match stream.try_read_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if buf.is_empty() {
                    *buf = BytesMut::new();
                }
            }
            read => return read,
        }
    }
}

impl ReadSome for TcpStream {
    fn read_some(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send {
        read_ready(self, buf)
    }
}

impl ReadSome for tcp::ReadHalf<'_> {
    fn read_some(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send {
        let stream: &TcpStream = (*self).as_ref();
        read_ready(stream, buf)
    }
}

impl Transport for TcpStream {
    type Reader<'a> = tcp::ReadHalf<'a>;
    type Writer<'a> = tcp::WriteHalf<'a>;

    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        TcpStream::split(self)
    }
}

/// Any `AsyncRead + AsyncWrite` stream as a transport: reads reserve the
/// buffer first, then `read_buf` (cancel-safe).
#[derive(Debug)]
pub(crate) struct Stream<S>(pub(crate) S);

/// Reads into `buf` after reserving [`READ_CHUNK`] if `hot`, else
/// [`IDLE_CHUNK`]; `hot` becomes whether the read filled the reservation.
async fn read_into<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    hot: &mut bool,
) -> io::Result<usize> {
    let want = if *hot { READ_CHUNK } else { IDLE_CHUNK };
    buf.reserve(want);
    let n = reader.read_buf(buf).await?;
    *hot = n >= want;
    Ok(n)
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> ReadSome for Stream<S> {
    fn read_some(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send {
        let mut hot = true;
        async move { read_into(&mut self.0, buf, &mut hot).await }
    }
}

/// The read half of a generic stream, and whether its last read filled
/// its reservation.
#[derive(Debug)]
pub(crate) struct Half<R> {
    reader: R,
    hot: bool,
}

impl<R: AsyncRead + Unpin + Send> ReadSome for Half<R> {
    fn read_some(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send {
        read_into(&mut self.reader, buf, &mut self.hot)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Transport for Stream<S> {
    type Reader<'a>
        = Half<tokio::io::ReadHalf<&'a mut S>>
    where
        S: 'a;
    type Writer<'a>
        = tokio::io::WriteHalf<&'a mut S>
    where
        S: 'a;

    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        let (reader, writer) = tokio::io::split(&mut self.0);
        (Half { reader, hot: false }, writer)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
