//! Priority lanes: how an upstream drains the routes of higher priority
//! first.
//!
//! An upstream whose routes have more than one `priority` forwards through
//! one lane per priority. A lane reads the whole log from its own cursor
//! and takes the records whose first matching route of the upstream has
//! its priority, passing the others as done for it; so each route's
//! records are forwarded in seq order (order per publisher within a route
//! holds) and a lane of high priority is never behind the backlog of a
//! lower one. All lanes publish on the link's one channel, sharing its
//! `max_in_flight`; each turn fills free slots from the highest lane with
//! something to forward, so a lower lane gets slots only while every
//! higher one has nothing (more) to read, and a live message of a high
//! lane waits behind at most the lower lanes' publishes already in flight.
//! (Passing another lane's records has a budget of its own per turn: a
//! high lane scanning past a long low-priority backlog lets the low lane
//! publish meanwhile instead of after the whole scan.)
//!
//! Each lane has a durable cursor, `<upstream>/priority-<N>/<mapping>`;
//! the upstream's own cursor is the lowest of them, so retirement, the
//! backlog report and a configuration that goes back to one priority keep
//! working. A lane starts from the higher of its cursor and the upstream's
//! (a lane cursor is created at the log's first record, and the upstream's
//! cursor never passes a record a lane had not done). With one priority
//! there is one lane and its cursor is the upstream's.
//!
//! A lane cursor means "done" only under the mapping of records to lanes
//! it was moved under: a lane passes other lanes' records. So `<mapping>`
//! is a fingerprint of what decides that mapping — the upstream's routes in
//! order, each with its selection and priority. A configuration that
//! changes it names new lane cursors: the old ones are dropped at open and
//! every lane starts again from the upstream's cursor (messages past it
//! may be forwarded again, under their same message ids; none is skipped).

use edge_core::Routes;
use edge_store::Seq;
use tokio::sync::watch;

use crate::cursor::CursorFlusher;

/// The durable cursor of `upstream`'s lane of `priority` under `routes`.
pub fn lane_cursor(upstream: &str, priority: u8, routes: &Routes) -> String {
    format!(
        "{upstream}/priority-{priority}/{:016x}",
        mapping(upstream, routes)
    )
}

/// A fingerprint (64-bit FNV-1a, stable across builds) of what maps a
/// record to a lane of `upstream`: its routes in order, each with its
/// selection (filter, or local exchange and routing-key pattern) and
/// priority.
fn mapping(upstream: &str, routes: &Routes) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    let mut eat = |bytes: &[u8]| {
        for b in bytes.iter().chain(std::iter::once(&0xff)) {
            hash = (hash ^ u64::from(*b)).wrapping_mul(PRIME);
        }
    };
    for route in routes.iter().filter(|r| r.upstream == upstream) {
        match &route.local {
            Some(local) => {
                eat(b"local");
                eat(local.exchange.as_bytes());
                eat(local.routing_key.as_bytes());
            }
            None => eat(route.filter.as_bytes()),
        }
        eat(&[route.priority]);
    }
    hash
}

/// Every durable cursor of `upstream`: its own and, with more than one
/// priority, one per lane.
pub fn cursor_names(upstream: &str, routes: &Routes) -> Vec<String> {
    let priorities = routes.priorities(upstream);
    let mut names = vec![upstream.to_string()];
    if priorities.len() > 1 {
        names.extend(priorities.iter().map(|p| lane_cursor(upstream, *p, routes)));
    }
    names
}

/// A lane's state that outlives a link.
#[derive(Debug)]
pub(crate) struct Lane {
    pub(crate) priority: u8,
    /// First seq not done in this lane.
    pub(crate) position: Seq,
    /// Persists `position` under the lane's cursor; none for a single lane
    /// (the upstream's cursor is its cursor).
    pub(crate) flusher: Option<CursorFlusher>,
    /// Where `position` is published for `ack = "upstream-confirmed"`.
    pub(crate) progress: Option<watch::Sender<Seq>>,
}

impl Lane {
    pub(crate) fn set_position(&mut self, next: Seq) {
        if next <= self.position {
            return;
        }
        self.position = next;
        if let Some(flusher) = &self.flusher {
            flusher.set(next);
        }
        if let Some(progress) = &self.progress {
            progress.send_replace(next);
        }
    }

    pub(crate) async fn finish(self) {
        if let Some(flusher) = self.flusher {
            flusher.finish().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use edge_core::Route;

    use super::*;

    fn route(upstream: &str, priority: u8) -> Route {
        Route::new(edge_config::RouteConfig {
            name: format!("{upstream}-{priority}"),
            filter: "#".into(),
            local: None,
            upstream: upstream.into(),
            exchange: "amq.topic".into(),
            routing_key: "{topic}".into(),
            priority,
            ttl: None,
            persistent: true,
            ack: edge_config::AckPoint::Persisted,
            declare_exchange: None,
        })
    }

    #[test]
    fn one_priority_is_one_lane_on_the_upstreams_own_cursor() {
        let routes = Routes::new(vec![route("a", 3), route("a", 3), route("b", 7)]);
        assert_eq!(routes.priorities("a"), vec![3]);
        assert_eq!(cursor_names("a", &routes), vec!["a".to_string()]);
    }

    #[test]
    fn several_priorities_are_lanes_highest_first_each_with_a_cursor() {
        let routes = Routes::new(vec![
            route("a", 0),
            route("a", 9),
            route("b", 5),
            route("a", 0),
        ]);
        assert_eq!(routes.priorities("a"), vec![9, 0]);
        let names = cursor_names("a", &routes);
        assert_eq!(names.len(), 3);
        assert_eq!(names[0], "a");
        assert!(names[1].starts_with("a/priority-9/"), "{names:?}");
        assert!(names[2].starts_with("a/priority-0/"), "{names:?}");
        assert!(routes.priorities("c").is_empty());
    }

    /// Routes of upstream `a` with these filters and priorities, in order.
    fn routes_of(filters: &[(&str, u8)]) -> Vec<Route> {
        filters
            .iter()
            .map(|(filter, priority)| {
                let mut config = (*route("a", *priority)).clone();
                config.filter = filter.to_string();
                Route::new(config)
            })
            .collect()
    }

    #[test]
    fn lane_cursors_change_with_the_mapping_of_records_to_lanes() {
        let with = |filters: &[(&str, u8)]| lane_cursor("a", 9, &Routes::new(routes_of(filters)));
        let base = with(&[("x/#", 9), ("y/#", 0)]);
        assert_eq!(base, with(&[("x/#", 9), ("y/#", 0)]), "stable");
        // A route moving to another lane, a filter changing, the order of
        // the routes changing: records may now be in other lanes.
        assert_ne!(base, with(&[("x/#", 0), ("y/#", 9)]));
        assert_ne!(base, with(&[("x/+", 9), ("y/#", 0)]));
        assert_ne!(base, with(&[("y/#", 0), ("x/#", 9)]));
        // Another upstream's routes do not matter.
        let mut routes = routes_of(&[("x/#", 9), ("y/#", 0)]);
        routes.push(route("b", 3));
        assert_eq!(base, lane_cursor("a", 9, &Routes::new(routes)));
    }
}
