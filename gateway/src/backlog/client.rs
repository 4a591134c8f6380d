//! A blocking HTTP/1.1 client for the admin endpoints, enough for one
//! request per connection to a gateway's metrics listener (usually on
//! loopback): plain HTTP only (`metrics.tls` needs a TLS client: use curl).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};

/// Time to connect to the admin listener.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to wait for an answer: a backlog of millions of records takes a
/// while to scan.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest answer read (the backlog JSON is a few KiB per route).
const MAX_ANSWER: u64 = 64 << 20;

/// Where the admin endpoints are: `http://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminUrl {
    host: String,
    port: u16,
}

impl AdminUrl {
    /// `http://host:port[/]`, or `host:port`.
    pub fn parse(url: &str) -> anyhow::Result<AdminUrl> {
        if url.starts_with("https://") {
            bail!(
                "{url}: this command speaks plain HTTP only; with metrics.tls use curl (GET /backlog, POST /dead-letters/replay?route=R)"
            );
        }
        let rest = url.strip_prefix("http://").unwrap_or(url);
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') {
            bail!("{url}: give the admin listener's address only (http://host:port)");
        }
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| anyhow!("{url}: no port (http://host:port, the metrics listener)"))?;
        let port = port
            .parse()
            .map_err(|_| anyhow!("{url}: {port:?} is not a port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            bail!("{url}: no host");
        }
        Ok(AdminUrl {
            host: host.to_string(),
            port,
        })
    }

    /// The admin listener of a configured `metrics.listen`: an unspecified
    /// address (`0.0.0.0`, `::`) is reached on loopback.
    pub fn of_listen(listen: std::net::SocketAddr) -> AdminUrl {
        let ip = match listen.ip() {
            std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
            ip => ip,
        };
        AdminUrl {
            host: ip.to_string(),
            port: listen.port(),
        }
    }
}

impl std::fmt::Display for AdminUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "http://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "http://{}:{}", self.host, self.port)
        }
    }
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum RequestError {
    /// Nothing listens there (connection refused, no route, timed out).
    Unreachable(anyhow::Error),
    /// Connected, but the exchange failed.
    Failed(anyhow::Error),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Unreachable(e) | RequestError::Failed(e) => write!(f, "{e:#}"),
        }
    }
}

/// One request with an empty body; the status code and the body.
/// `credentials`: HTTP basic authentication (`auth.admin_users`).
pub fn request(
    url: &AdminUrl,
    method: &str,
    path: &str,
    credentials: Option<(&str, &str)>,
) -> Result<(u16, String), RequestError> {
    let mut stream = connect(url).map_err(RequestError::Unreachable)?;
    exchange(&mut stream, url, method, path, credentials)
        .with_context(|| format!("{method} {url}{path}"))
        .map_err(RequestError::Failed)
}

fn connect(url: &AdminUrl) -> anyhow::Result<TcpStream> {
    let addrs: Vec<_> = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", url.host))?
        .collect();
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some((addr, e)),
        }
    }
    match last {
        Some((addr, e)) => Err(anyhow!(
            "cannot reach the admin endpoint {url} ({addr}): {e}"
        )),
        None => Err(anyhow!("{} resolves to no address", url.host)),
    }
}

fn exchange(
    stream: &mut TcpStream,
    url: &AdminUrl,
    method: &str,
    path: &str,
    credentials: Option<(&str, &str)>,
) -> anyhow::Result<(u16, String)> {
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\nContent-Length: 0\r\n",
        url.host, url.port
    );
    if let Some((user, password)) = credentials {
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        head.push_str(&format!("Authorization: Basic {token}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    let mut raw = Vec::new();
    stream.take(MAX_ANSWER).read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// Status and body of a whole HTTP/1.1 response (`Content-Length`,
/// chunked, or up to the end of the stream).
fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("the answer has no complete HTTP header"))?;
    let head = std::str::from_utf8(&raw[..end]).context("the HTTP header is not text")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("bad HTTP status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        }
    }
    let body = &raw[end + 4..];
    let body = if chunked {
        dechunk(body)?
    } else {
        match length {
            Some(n) if n <= body.len() => body[..n].to_vec(),
            Some(n) => bail!("the answer ended after {} of {n} body bytes", body.len()),
            None => body.to_vec(),
        }
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Joins the chunks of a chunked body.
fn dechunk(mut body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("a chunk size line is cut"))?;
        let size_text = std::str::from_utf8(&body[..line_end])?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| anyhow!("bad chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = body.get(..size).ok_or_else(|| anyhow!("a chunk is cut"))?;
        out.extend_from_slice(chunk);
        body = body.get(size + 2..).unwrap_or_default();
    }
}

/// `s` for a URL query value (everything but unreserved characters
/// percent-encoded).
pub fn query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_urls() {
        let url = AdminUrl::parse("http://127.0.0.1:9183/").expect("url");
        assert_eq!(url.to_string(), "http://127.0.0.1:9183");
        assert_eq!(AdminUrl::parse("localhost:9183").expect("url").port, 9183);
        assert_eq!(
            AdminUrl::parse("http://[::1]:9").expect("url").to_string(),
            "http://[::1]:9"
        );
        for bad in [
            "http://127.0.0.1",
            "https://h:1",
            "http://h:1/backlog",
            "http://:1",
            "h:x",
        ] {
            assert!(AdminUrl::parse(bad).is_err(), "{bad}");
        }
        let listen = "0.0.0.0:9183".parse().expect("addr");
        assert_eq!(
            AdminUrl::of_listen(listen).to_string(),
            "http://127.0.0.1:9183"
        );
    }

    #[test]
    fn responses_with_a_length_chunked_or_to_the_end() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(parse_response(plain).expect("plain"), (200, "hello".into()));
        let chunked =
            b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked).expect("chunked"),
            (403, "abcde".into())
        );
        let to_end = b"HTTP/1.0 500 Oops\r\n\r\nbroken";
        assert_eq!(
            parse_response(to_end).expect("to end"),
            (500, "broken".into())
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab")
                .is_err()
        );
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(query_value("alarms-1.x"), "alarms-1.x");
        assert_eq!(query_value("(no route)"), "%28no%20route%29");
        assert_eq!(query_value("a&b=c"), "a%26b%3Dc");
    }
}
