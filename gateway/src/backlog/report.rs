//! What `GET /backlog` answers and `edge-gateway backlog` prints: per
//! upstream its cursor and link state, per route of that upstream what is
//! still to forward and what is parked. The JSON form is the API (the CLI
//! reads it back from a running gateway); the table is for people.

use serde::{Deserialize, Serialize};

use edge_upstream::LinkStatus;

/// The bucket of dead letters whose topic no configured route of their
/// upstream matches any more (the configuration changed after they were
/// parked), and of an upstream no longer configured.
pub const NO_ROUTE: &str = "(no route)";

/// The link state word of a running gateway's upstream. The one place that
/// turns a [`LinkStatus`] into the word the API and the table show.
pub fn link_state(link: &LinkStatus) -> &'static str {
    link.state().as_str()
}

/// The backlog of every upstream, at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// When the figures were taken, Unix milliseconds (the ages are relative to it).
    pub taken_at_ms: u64,
    /// Where they come from: `"admin"` (a running gateway) or `"data-dir"`
    /// (a stopped gateway's store, read-only).
    pub source: String,
    pub upstreams: Vec<UpstreamBacklog>,
}

/// One upstream's backlog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpstreamBacklog {
    pub name: String,
    /// The next seq it has to forward; `None` for an upstream that is no
    /// longer configured but still has dead letters.
    pub cursor: Option<u64>,
    /// `up`, `down` (running gateway), or `None` when the gateway is stopped.
    pub link: Option<String>,
    /// Every configured route of this upstream, in configuration order
    /// (then [`NO_ROUTE`] when it has dead letters).
    pub routes: Vec<RouteBacklog>,
    /// Records from the cursor on that this build could not decode
    /// (counted, not forwardable by any route).
    pub unreadable: u64,
}

/// One route's share of an upstream's backlog.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteBacklog {
    pub route: String,
    /// Logged messages from the upstream's cursor on that this route forwards.
    pub messages: u64,
    /// Their size as stored (the encoded records: what counts toward the quota).
    pub bytes: u64,
    /// Their payloads alone.
    pub payload_bytes: u64,
    /// Receive time of the oldest of them, Unix milliseconds.
    pub oldest_timestamp_ms: Option<u64>,
    /// Its age in seconds at `taken_at_ms`.
    pub oldest_age_seconds: Option<f64>,
    /// Parked messages of this route (dead letters of this upstream whose
    /// topic this route matches first).
    pub dead_letters: u64,
    pub dead_letter_bytes: u64,
}

impl RouteBacklog {
    pub(crate) fn new(route: &str) -> RouteBacklog {
        RouteBacklog {
            route: route.to_string(),
            ..RouteBacklog::default()
        }
    }
}

impl Report {
    /// The report as JSON (the `GET /backlog` body).
    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialising cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// Parses a `GET /backlog` body.
    pub fn from_json(text: &str) -> Result<Report, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// A route's figures, if the report has that upstream and route.
    pub fn route(&self, upstream: &str, route: &str) -> Option<&RouteBacklog> {
        self.upstreams
            .iter()
            .find(|u| u.name == upstream)?
            .routes
            .iter()
            .find(|r| r.route == route)
    }

    /// One block per upstream: a header line (cursor, link), then a row per
    /// route (messages, bytes, oldest age, parked dead letters).
    pub fn table(&self) -> String {
        let mut out = String::new();
        if self.upstreams.is_empty() {
            out.push_str("no upstream configured: nothing is forwarded\n");
        }
        for u in &self.upstreams {
            let cursor = u.cursor.map_or("-".to_string(), |c| c.to_string());
            let link = u.link.as_deref().unwrap_or("gateway stopped");
            out.push_str(&format!(
                "upstream {}  cursor {cursor}  link {link}\n",
                u.name
            ));
            let mut rows = vec![[
                "route".to_string(),
                "messages".to_string(),
                "bytes".to_string(),
                "oldest".to_string(),
                "dead letters".to_string(),
                "dead bytes".to_string(),
            ]];
            for r in &u.routes {
                rows.push([
                    r.route.clone(),
                    r.messages.to_string(),
                    r.bytes.to_string(),
                    r.oldest_age_seconds.map_or("-".to_string(), age),
                    r.dead_letters.to_string(),
                    r.dead_letter_bytes.to_string(),
                ]);
            }
            let total = |f: fn(&RouteBacklog) -> u64| u.routes.iter().map(f).sum::<u64>();
            rows.push([
                "total".to_string(),
                total(|r| r.messages).to_string(),
                total(|r| r.bytes).to_string(),
                u.routes
                    .iter()
                    .filter_map(|r| r.oldest_age_seconds)
                    .reduce(f64::max)
                    .map_or("-".to_string(), age),
                total(|r| r.dead_letters).to_string(),
                total(|r| r.dead_letter_bytes).to_string(),
            ]);
            push_rows(&mut out, &rows);
            if u.unreadable > 0 {
                out.push_str(&format!(
                    "  {} record(s) after the cursor could not be decoded\n",
                    u.unreadable
                ));
            }
            out.push('\n');
        }
        out
    }
}

/// Rows in aligned columns: the first left-aligned, the others right.
fn push_rows(out: &mut String, rows: &[[String; 6]]) {
    let mut widths = [0usize; 6];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        out.push_str("  ");
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i == 0 {
                out.push_str(&format!("{cell:<w$}"));
            } else {
                out.push_str(&format!("  {cell:>w$}"));
            }
        }
        out.push('\n');
    }
}

/// An age for people: `42s`, `17m03s`, `5h12m`, `3d04h`.
fn age(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            taken_at_ms: 1_000_000,
            source: "admin".into(),
            upstreams: vec![UpstreamBacklog {
                name: "central".into(),
                cursor: Some(17),
                link: Some("down".into()),
                routes: vec![
                    RouteBacklog {
                        messages: 3,
                        bytes: 300,
                        payload_bytes: 30,
                        oldest_timestamp_ms: Some(900_000),
                        oldest_age_seconds: Some(100.0),
                        ..RouteBacklog::new("telemetry")
                    },
                    RouteBacklog {
                        dead_letters: 2,
                        dead_letter_bytes: 80,
                        ..RouteBacklog::new("alarms")
                    },
                ],
                unreadable: 0,
            }],
        }
    }

    #[test]
    fn the_json_form_reads_back_the_same() {
        let r = report();
        assert_eq!(Report::from_json(&r.to_json()).expect("parse"), r);
        assert_eq!(
            r.route("central", "alarms").map(|r| r.dead_letters),
            Some(2)
        );
        assert!(r.route("central", "nope").is_none());
    }

    #[test]
    fn the_table_has_a_row_per_route_and_a_total() {
        let text = report().table();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "upstream central  cursor 17  link down");
        assert!(lines[1].contains("route") && lines[1].contains("dead letters"));
        let row = |name: &str| -> Vec<String> {
            let line = lines
                .iter()
                .find(|l| l.trim_start().starts_with(name))
                .expect(name);
            line.split_whitespace().map(str::to_string).collect()
        };
        assert_eq!(
            row("telemetry"),
            ["telemetry", "3", "300", "1m40s", "0", "0"]
        );
        assert_eq!(row("alarms"), ["alarms", "0", "0", "-", "2", "80"]);
        assert_eq!(row("total"), ["total", "3", "300", "1m40s", "2", "80"]);
    }

    #[test]
    fn ages_read_in_the_largest_sensible_units() {
        assert_eq!(age(0.4), "0s");
        assert_eq!(age(59.0), "59s");
        assert_eq!(age(61.0), "1m01s");
        assert_eq!(age(3600.0 * 5.0 + 720.0), "5h12m");
        assert_eq!(age(86_400.0 * 3.0 + 4.0 * 3600.0), "3d04h");
        assert_eq!(age(-5.0), "0s", "a clock step back");
    }
}
