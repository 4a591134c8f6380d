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
//!
//! Each lane has a durable cursor, `<upstream>/priority-<N>`; the
//! upstream's own cursor is the lowest of them, so retirement, the backlog
//! report and a configuration that goes back to one priority keep working.
//! A lane starts from the higher of its cursor and the upstream's (a lane
//! cursor is created at the log's first record, and the upstream's cursor
//! never passes a record a lane had not done). With one priority there is
//! one lane and its cursor is the upstream's.

use edge_core::Routes;
use edge_store::Seq;
use tokio::sync::watch;

use crate::cursor::CursorFlusher;

/// The durable cursor of `upstream`'s lane of `priority`.
pub fn lane_cursor(upstream: &str, priority: u8) -> String {
    format!("{upstream}/priority-{priority}")
}

/// Every durable cursor of `upstream`: its own and, with more than one
/// priority, one per lane.
pub fn cursor_names(upstream: &str, routes: &Routes) -> Vec<String> {
    let priorities = routes.priorities(upstream);
    let mut names = vec![upstream.to_string()];
    if priorities.len() > 1 {
        names.extend(priorities.iter().map(|p| lane_cursor(upstream, *p)));
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
        assert_eq!(
            cursor_names("a", &routes),
            vec!["a", "a/priority-9", "a/priority-0"]
        );
        assert!(routes.priorities("c").is_empty());
    }
}
