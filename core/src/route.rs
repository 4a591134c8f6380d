//! Routes: which messages are forwarded to which upstream, and how.

use std::time::Duration;

use edge_config::RouteConfig;

use crate::topic;

/// One configured route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    pub filter: String,
    pub upstream: String,
    pub exchange: String,
    /// Template; `{topic}` is replaced by the mapped topic.
    pub routing_key: String,
    pub priority: u8,
    pub ttl: Option<Duration>,
    pub persistent: bool,
}

impl Route {
    pub fn from_config(c: &RouteConfig) -> Route {
        Route {
            name: c.name.clone(),
            filter: c.filter.clone(),
            upstream: c.upstream.clone(),
            exchange: c.exchange.clone(),
            routing_key: c.routing_key.clone(),
            priority: c.priority,
            ttl: c.ttl,
            persistent: c.persistent,
        }
    }

    pub fn matches(&self, topic: &str) -> bool {
        topic::matches(&self.filter, topic)
    }

    /// The AMQP routing key for a message on `topic`.
    pub fn routing_key_for(&self, topic: &str) -> String {
        if self.routing_key == "{topic}" {
            topic::to_routing_key(topic)
        } else {
            self.routing_key
                .replace("{topic}", &topic::to_routing_key(topic))
        }
    }
}

/// All routes, in configuration order.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    routes: Vec<Route>,
}

impl Routes {
    pub fn new(routes: Vec<Route>) -> Routes {
        Routes { routes }
    }

    pub fn from_config(routes: &[RouteConfig]) -> Routes {
        Routes::new(routes.iter().map(Route::from_config).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    /// Routes whose filter matches `topic`.
    pub fn matching<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a Route> {
        self.routes.iter().filter(move |r| r.matches(topic))
    }

    /// The routes of one upstream.
    pub fn of_upstream(&self, upstream: &str) -> Routes {
        Routes::new(
            self.routes
                .iter()
                .filter(|r| r.upstream == upstream)
                .cloned()
                .collect(),
        )
    }

    /// The first route of this set matching `topic`: a message is forwarded
    /// once per upstream, by its first matching route.
    pub fn first_match(&self, topic: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(topic))
    }
}
