//! Who an AMQP connection is and what it may touch: RabbitMQ's three
//! permissions (configure, write, read) as regular expressions over the
//! names of exchanges and queues, from the `amqp` lines of `auth.acl_file`,
//! plus the topic rules of the same file wherever AMQP reaches the MQTT
//! topic space through `amq.topic`: publishing there is publishing to the
//! topic, binding a queue there is subscribing to the filter. One model for
//! both protocols, so an AMQP client cannot read through `amq.topic` what
//! it is denied as an MQTT topic.
//!
//! Which permission each method needs follows RabbitMQ: declare and delete
//! need configure; publish needs write on the exchange; queue.bind needs
//! write on the queue and read on the exchange (exchange.bind: write on the
//! destination, read on the source); consume, get and purge need read on
//! the queue. A refusal is 403 ACCESS_REFUSED on the channel.

use edge_auth::AmqpPermission;

use crate::connection::Connection;
use crate::convert::{self, AMQ_TOPIC};
use crate::error::{ACCESS_REFUSED, Exception};

/// The name the default exchange is checked under, as in RabbitMQ.
const DEFAULT_EXCHANGE: &str = "amq.default";

/// What is checked.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Resource {
    Exchange,
    Queue,
}

impl Resource {
    fn noun(self) -> &'static str {
        match self {
            Resource::Exchange => "exchange",
            Resource::Queue => "queue",
        }
    }
}

impl Connection {
    /// Refuses unless the connection's user holds `permission` on `name`.
    pub(crate) fn permit(
        &self,
        permission: AmqpPermission,
        resource: Resource,
        name: &str,
    ) -> Result<(), Exception> {
        let name = match (resource, name) {
            (Resource::Exchange, "") => DEFAULT_EXCHANGE,
            (_, name) => name,
        };
        let security = &self.settings.security;
        if security.authority.amqp_allows(&self.who, permission, name) {
            return Ok(());
        }
        let verb = match permission {
            AmqpPermission::Configure => "configure",
            AmqpPermission::Write => "write",
            AmqpPermission::Read => "read",
        };
        Err(self.denied(
            verb,
            format!(
                "{verb} access to {} '{name}' in vhost '/' refused for user '{}'",
                resource.noun(),
                self.user_name()
            ),
        ))
    }

    /// Refuses a publish to `amq.topic` that the topic rules deny.
    pub(crate) fn permit_topic(&self, topic: &str) -> Result<(), Exception> {
        let security = &self.settings.security;
        if security.authority.can_publish(&self.who, &self.name, topic) {
            return Ok(());
        }
        Err(self.denied(
            "publish_topic",
            format!(
                "publishing to topic '{topic}' refused for user '{}'",
                self.user_name()
            ),
        ))
    }

    /// Refuses a binding to `amq.topic` whose filter the topic rules do not
    /// let the user read.
    pub(crate) fn permit_binding(&self, exchange: &str, key: &str) -> Result<(), Exception> {
        if exchange != AMQ_TOPIC {
            return Ok(());
        }
        // A key that maps to no MQTT filter (an inner `#`, which an
        // exchange binding still matches with) is checked as the widest
        // filter: only a user who may read everything may bind it.
        let filter = convert::filter_of(exchange, convert::Kind::Topic, key)
            .unwrap_or_else(|_| "#".to_string());
        let security = &self.settings.security;
        if security
            .authority
            .can_subscribe(&self.who, &self.name, &filter)
        {
            return Ok(());
        }
        Err(self.denied(
            "subscribe_topic",
            format!(
                "binding to amq.topic with '{key}' (topic filter '{filter}') refused for user '{}'",
                self.user_name()
            ),
        ))
    }

    fn user_name(&self) -> &str {
        self.who.user().unwrap_or("")
    }

    fn denied(&self, action: &'static str, text: String) -> Exception {
        metrics::counter!("edge_acl_denied_total", "protocol" => "amqp", "action" => action)
            .increment(1);
        crate::logs::DENIED.record(action, || format!("peer={} {text}", self.peer));
        Exception::channel(ACCESS_REFUSED, text)
    }
}
