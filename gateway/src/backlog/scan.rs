//! The one computation behind `GET /backlog` and the offline
//! `edge-gateway backlog --data-dir`: the log read from the smallest cursor
//! on in bounded chunks, each record counted for every upstream whose
//! cursor it is at or past (the cursor of the priority lane that forwards
//! it, when the upstream has lanes), under the route that upstream's
//! replicator would forward it by; then the dead letters, by parking
//! upstream and route. Blocking (store read transactions): call it off the async threads.

use std::collections::HashMap;

use edge_core::{Message, Route, Routes};
use edge_store::{DeadLetter, Entry, ReadOnlyStore, Seq, Store, StoreError};

use super::report::{NO_ROUTE, Report, RouteBacklog, UpstreamBacklog};

/// Most log records read per read transaction.
const SCAN_MESSAGES: usize = 1024;
/// Roughly the most record bytes read per read transaction.
const SCAN_BYTES: usize = 4 << 20;
/// Dead letters read per read transaction.
pub(crate) const DEAD_LETTER_PAGE: usize = 1000;

/// The reads a backlog needs, from a running gateway's [`Store`] or a
/// stopped gateway's [`ReadOnlyStore`].
pub trait LogView {
    fn cursor(&self, name: &str) -> Result<Seq, StoreError>;
    fn read(
        &self,
        from: Seq,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StoreError>;
    fn dead_letters(&self, from: Seq, max: usize) -> Result<Vec<DeadLetter>, StoreError>;
}

impl LogView for Store {
    fn cursor(&self, name: &str) -> Result<Seq, StoreError> {
        Store::cursor(self, name)
    }
    fn read(&self, from: Seq, max: usize, max_bytes: usize) -> Result<Vec<Entry>, StoreError> {
        Store::read(self, from, max, max_bytes)
    }
    fn dead_letters(&self, from: Seq, max: usize) -> Result<Vec<DeadLetter>, StoreError> {
        Store::dead_letters(self, from, max)
    }
}

impl LogView for ReadOnlyStore {
    fn cursor(&self, name: &str) -> Result<Seq, StoreError> {
        ReadOnlyStore::cursor(self, name)
    }
    fn read(&self, from: Seq, max: usize, max_bytes: usize) -> Result<Vec<Entry>, StoreError> {
        ReadOnlyStore::read(self, from, max, max_bytes)
    }
    fn dead_letters(&self, from: Seq, max: usize) -> Result<Vec<DeadLetter>, StoreError> {
        ReadOnlyStore::dead_letters(self, from, max)
    }
}

/// A configured upstream as the scan sees it: its name and, on a running
/// gateway, its link state.
#[derive(Debug, Clone)]
pub struct UpstreamRef {
    pub name: String,
    pub link: Option<&'static str>,
}

/// The route of `upstream` (its own routes `own`) that forwards `entry`,
/// by the replicator's rule: a replayed dead letter only through the
/// upstreams that parked it, otherwise the first of its routes matching the
/// topic.
fn route_of<'r>(own: &'r Routes, upstream: &str, entry: &Entry, topic: &str) -> Option<&'r Route> {
    if entry.replay.as_ref().is_some_and(|r| !r.is_for(upstream)) {
        return None;
    }
    own.first_match(topic)
}

/// The name of the route of `upstream` a dead letter on `topic` belongs to
/// ([`NO_ROUTE`] when none matches or the topic is unreadable).
fn dead_letter_route<'r>(own: Option<&'r Routes>, topic: Option<&str>) -> &'r str {
    match (own, topic) {
        (Some(own), Some(topic)) => own.first_match(topic).map_or(NO_ROUTE, |r| r.name.as_str()),
        _ => NO_ROUTE,
    }
}

/// Each configured upstream's own routes, by name.
pub(crate) fn routes_by_upstream<'a>(
    upstreams: impl Iterator<Item = &'a str>,
    routes: &Routes,
) -> HashMap<String, Routes> {
    upstreams
        .map(|u| (u.to_string(), routes.of_upstream(u)))
        .collect()
}

/// The topic of a stored record, if it decodes.
fn topic_of(record: &edge_store::Record) -> Option<String> {
    Message::from_record(record)
        .ok()
        .map(|m| m.topic.to_string())
}

/// The backlog of `upstreams` (configuration order) over `routes`, at
/// `now_ms`; `source` says where the store is (see [`Report::source`]).
pub fn scan(
    view: &impl LogView,
    upstreams: &[UpstreamRef],
    routes: &Routes,
    source: &str,
    now_ms: u64,
) -> Result<Report, StoreError> {
    let own = routes_by_upstream(upstreams.iter().map(|u| u.name.as_str()), routes);
    let mut report = Report {
        taken_at_ms: now_ms,
        source: source.to_string(),
        upstreams: Vec::with_capacity(upstreams.len()),
    };
    let mut cursors = Vec::with_capacity(upstreams.len());
    for u in upstreams {
        let cursor = view.cursor(&u.name)?;
        let mut lanes = Vec::new();
        if let Some(routes) = own.get(&u.name) {
            let priorities = routes.priorities(&u.name);
            for &p in priorities.iter().filter(|_| priorities.len() > 1) {
                let lane = view.cursor(&edge_upstream::lane_cursor(&u.name, p, routes))?;
                lanes.push((p, lane.max(cursor)));
            }
        }
        cursors.push(Cursors { own: cursor, lanes });
        report.upstreams.push(UpstreamBacklog {
            name: u.name.clone(),
            cursor: Some(cursor),
            link: u.link.map(str::to_string),
            routes: own
                .get(&u.name)
                .into_iter()
                .flat_map(Routes::iter)
                .map(|r| RouteBacklog::new(&r.name))
                .collect(),
            unreadable: 0,
        });
    }
    if let Some(mut from) = cursors.iter().map(|c| c.own).min() {
        loop {
            let chunk = view.read(from, SCAN_MESSAGES, SCAN_BYTES)?;
            let Some(last) = chunk.last() else { break };
            from = last.seq + 1;
            for entry in &chunk {
                count_entry(&mut report, &cursors, &own, entry);
            }
        }
    }
    count_dead_letters(view, &mut report, &own)?;
    for r in report
        .upstreams
        .iter_mut()
        .flat_map(|u| u.routes.iter_mut())
    {
        r.oldest_age_seconds = r
            .oldest_timestamp_ms
            .map(|t| now_ms.saturating_sub(t) as f64 / 1000.0);
    }
    Ok(report)
}

/// An upstream's cursor and, with priority lanes, each lane's.
struct Cursors {
    own: Seq,
    lanes: Vec<(u8, Seq)>,
}

impl Cursors {
    /// The cursor that a record on a route of `priority` is counted from.
    fn of(&self, priority: u8) -> Seq {
        self.lanes
            .iter()
            .find(|(p, _)| *p == priority)
            .map_or(self.own, |(_, c)| *c)
    }
}

/// Counts one log record for each upstream whose cursor it is at or past.
fn count_entry(
    report: &mut Report,
    cursors: &[Cursors],
    own: &HashMap<String, Routes>,
    entry: &Entry,
) {
    let message = Message::from_record(&entry.record).ok();
    for (u, cursor) in report.upstreams.iter_mut().zip(cursors) {
        if entry.seq < cursor.own {
            continue;
        }
        let Some(message) = &message else {
            u.unreadable += 1;
            continue;
        };
        let Some(route) = own
            .get(&u.name)
            .and_then(|routes| route_of(routes, &u.name, entry, &message.topic))
        else {
            continue;
        };
        if entry.seq < cursor.of(route.priority) {
            continue;
        }
        let Some(bucket) = u.routes.iter_mut().find(|b| b.route == route.name) else {
            continue;
        };
        bucket.messages += 1;
        bucket.bytes += entry.record.encoded_len() as u64;
        bucket.payload_bytes += message.payload.len() as u64;
        bucket.oldest_timestamp_ms = Some(
            bucket
                .oldest_timestamp_ms
                .map_or(message.timestamp_ms, |t| t.min(message.timestamp_ms)),
        );
    }
}

/// Every dead letter, under each upstream that parked it and that
/// upstream's route for its topic.
fn count_dead_letters(
    view: &impl LogView,
    report: &mut Report,
    own: &HashMap<String, Routes>,
) -> Result<(), StoreError> {
    let mut from = 0;
    loop {
        let page = view.dead_letters(from, DEAD_LETTER_PAGE)?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        from = last.seq + 1;
        for d in &page {
            let topic = topic_of(&d.record);
            for parked_by in &d.upstreams {
                let route = dead_letter_route(own.get(parked_by), topic.as_deref());
                let upstream = match report.upstreams.iter().position(|u| &u.name == parked_by) {
                    Some(i) => &mut report.upstreams[i],
                    None => {
                        report.upstreams.push(UpstreamBacklog {
                            name: parked_by.clone(),
                            cursor: None,
                            link: None,
                            routes: Vec::new(),
                            unreadable: 0,
                        });
                        let end = report.upstreams.len() - 1;
                        &mut report.upstreams[end]
                    }
                };
                let bucket = match upstream.routes.iter().position(|b| b.route == route) {
                    Some(i) => &mut upstream.routes[i],
                    None => {
                        upstream.routes.push(RouteBacklog::new(route));
                        let end = upstream.routes.len() - 1;
                        &mut upstream.routes[end]
                    }
                };
                bucket.dead_letters += 1;
                bucket.dead_letter_bytes += d.record.encoded_len() as u64;
            }
        }
    }
}

/// The dead letters an operator's replay or purge takes from one page:
/// those parked at seqs from `from` up to `upto`, all of them or (with
/// `route`) those that route's upstream parked and whose topic that route
/// matches first. Returns them and where the next page starts (`None`
/// when past `upto` or the end).
pub(crate) fn select_dead_letters(
    view: &impl LogView,
    own: &HashMap<String, Routes>,
    route: Option<&str>,
    from: Seq,
    upto: Seq,
) -> Result<(Vec<Seq>, Option<Seq>), StoreError> {
    let page = view.dead_letters(from, DEAD_LETTER_PAGE)?;
    let next = page.last().map(|d| d.seq + 1).filter(|next| *next <= upto);
    let chosen = page
        .iter()
        .filter(|d| d.seq <= upto)
        .filter(|d| match route {
            None => true,
            Some(route) => {
                let topic = topic_of(&d.record);
                d.upstreams
                    .iter()
                    .any(|u| dead_letter_route(own.get(u), topic.as_deref()) == route)
            }
        })
        .map(|d| d.seq)
        .collect();
    Ok((chosen, next))
}
