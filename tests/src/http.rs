//! A tiny HTTP/1.0 client over a TCP stream, enough for `/healthz`,
//! `/metrics` and the dead-letter endpoints, plus a Prometheus text lookup.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `GET path` → (status code, body). Bounded by 10 s.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    request(addr, "GET", path).await
}

/// `POST path` with an empty body → (status code, body). Bounded by 10 s.
pub async fn post(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    request(addr, "POST", path).await
}

async fn request(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
    tokio::time::timeout(
        Duration::from_secs(10),
        request_unbounded(addr, method, path),
    )
    .await
    .map_err(|_| anyhow!("{method} http://{addr}{path} timed out"))?
}

async fn request_unbounded(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP header end in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// Sum of the samples of metric `name` whose label set contains every
/// `labels` entry (`key="value"` fragments), or `None` when there is none.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_set, value) = if let Some(inner) = rest.strip_prefix('{') {
            match inner.split_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            }
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue; // a longer metric name sharing the prefix
        };
        if !labels.iter().all(|l| label_set.contains(l)) {
            continue;
        }
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::metric;

    #[test]
    fn metric_sums_matching_samples_only() {
        let text = "# TYPE edge_x counter\n\
                    edge_x{reason=\"quota\"} 3\n\
                    edge_x{reason=\"other\"} 4\n\
                    edge_x_total 9\n\
                    edge_y 1.5\n";
        assert_eq!(metric(text, "edge_x", &[]), Some(7.0));
        assert_eq!(metric(text, "edge_x", &["reason=\"quota\""]), Some(3.0));
        assert_eq!(metric(text, "edge_y", &[]), Some(1.5));
        assert_eq!(metric(text, "edge_z", &[]), None);
    }
}
