//! Routes: which messages are forwarded to which upstream, and how.

use edge_config::RouteConfig;

use crate::topic;

/// One configured route: its [`RouteConfig`] plus the matching and
/// routing-key logic. Derefs to the configuration's fields.
#[derive(Debug, Clone)]
pub struct Route {
    config: RouteConfig,
    /// For a route selecting a local AMQP exchange: the publish's own
    /// routing key from its core topic (the AMQP adapter's mapping), which
    /// `{topic}` in the routing-key template then stands for.
    key_of: Option<fn(&str) -> String>,
}

impl std::ops::Deref for Route {
    type Target = RouteConfig;

    fn deref(&self) -> &RouteConfig {
        &self.config
    }
}

impl Route {
    pub fn new(config: RouteConfig) -> Route {
        Route {
            config,
            key_of: None,
        }
    }

    /// A route over what AMQP clients publish to a local exchange: `filter`
    /// is its selection in the core's topic space and `key_of` recovers a
    /// publish's routing key from its topic (both from the AMQP adapter).
    pub fn local(mut config: RouteConfig, filter: String, key_of: fn(&str) -> String) -> Route {
        config.filter = filter;
        Route {
            config,
            key_of: Some(key_of),
        }
    }

    pub fn from_config(c: &RouteConfig) -> Route {
        Route::new(c.clone())
    }

    pub fn matches(&self, topic: &str) -> bool {
        topic::matches(&self.filter, topic)
    }

    /// The AMQP routing key for a message on `topic`.
    pub fn routing_key_for(&self, topic: &str) -> String {
        let key = match self.key_of {
            Some(key_of) => key_of(topic),
            None => topic::to_routing_key(topic),
        };
        if self.routing_key == "{topic}" {
            key
        } else {
            self.routing_key.replace("{topic}", &key)
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

    /// The distinct priorities of `upstream`'s routes, highest first: its
    /// forwarder's lanes (see `edge-upstream`'s `lanes.rs`).
    pub fn priorities(&self, upstream: &str) -> Vec<u8> {
        let mut priorities: Vec<u8> = self
            .routes
            .iter()
            .filter(|r| r.upstream == upstream)
            .map(|r| r.priority)
            .collect();
        priorities.sort_unstable_by(|a, b| b.cmp(a));
        priorities.dedup();
        priorities
    }
}
