//! What a connection needs of its byte stream, so that one connection loop
//! serves every transport (plain TCP today; a WebSocket bridge and TLS are
//! the next ones).
//!
//! The connection reads and writes in the branches of one `select!`, so it
//! splits its stream into a read half and a write half for the loop, and
//! every read must be cancel-safe: bytes already read are in the caller's
//! buffer, never in a dropped future.
//!
//! Plain TCP keeps its idle-memory trick: it waits for readability without
//! a buffer and reserves one only once there is something to read, so a
//! quiet connection holds no read buffer.

use std::future::Future;
use std::io;

use bytes::BytesMut;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::net::tcp;

/// Bytes reserved in the read buffer before a read.
const READ_CHUNK: usize = 8 * 1024;

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
