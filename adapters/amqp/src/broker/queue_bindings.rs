//! Bindings of queues (`queue.bind`, `queue.unbind`, and at start the
//! stored ones again): a binding is the queue session's filter in the
//! trie, for a headers exchange one filter per queue that the adapter's
//! evaluation of the headers leads to (`bindings.rs`). The registry's
//! index of what the adapter evaluates is kept here too.

use amq_protocol::types::FieldTable;

use super::rows::{self, Dest, binding_row, encode_binding};
use super::{Broker, Registry, not_found_exchange, not_found_queue, session_err, store_err};
use crate::bindings::{BindArgs, Edge, HeadersMatch, Leads, Matcher};
use crate::convert::{self, Kind};
use crate::error::{ACCESS_REFUSED, Exception, NOT_IMPLEMENTED};
use crate::queue::ConnId;

impl Registry {
    /// Adds a binding from `source` the adapter evaluates (a headers
    /// exchange's, an exchange binding), once.
    pub(super) fn add_edge(
        &mut self,
        source: &str,
        leads: Leads,
        key: &str,
        args: &BindArgs,
    ) -> Result<(), Exception> {
        let kind = self
            .exchanges
            .get(source)
            .map(|x| x.kind)
            .ok_or_else(|| not_found_exchange(source))?;
        let matcher = Matcher::new(kind, key, args)?;
        let edges = self.edges.entry(source.to_string()).or_default();
        if !edges
            .iter()
            .any(|e| e.leads == leads && e.key == key && e.args == *args)
        {
            edges.push(Edge {
                matcher,
                leads,
                key: key.to_string(),
                args: args.clone(),
            });
        }
        Ok(())
    }

    pub(super) fn remove_edge(&mut self, source: &str, leads: &Leads, key: &str, args: &BindArgs) {
        if let Some(edges) = self.edges.get_mut(source) {
            edges.retain(|e| !(e.leads == *leads && e.key == key && e.args == *args));
            if edges.is_empty() {
                self.edges.remove(source);
            }
        }
    }

    /// Whether `exchange` is the source of any binding.
    pub(super) fn is_source(&self, exchange: &str) -> bool {
        self.bindings
            .values()
            .any(|set| set.iter().any(|(x, _, _)| x == exchange))
            || self.e2e.iter().any(|(s, ..)| s == exchange)
    }
}

impl Broker {
    /// The trie filter of a binding of `queue`: for a headers exchange
    /// the one filter of all its bindings of that queue.
    pub(super) fn binding_filter(
        exchange: &str,
        kind: Kind,
        key: &str,
        queue: &str,
    ) -> Result<String, Exception> {
        if kind == Kind::Headers {
            return Ok(convert::headers_filter(exchange, queue));
        }
        convert::filter_of(exchange, kind, key).map_err(|e| Exception::channel(NOT_IMPLEMENTED, e))
    }

    /// The bindings of the store again, at start.
    pub(super) async fn restore(&self, stored: Vec<rows::Stored>) {
        for b in stored {
            let restored = if b.to_exchange {
                self.link(&b.source, &b.destination, &b.key, b.args.clone())
            } else {
                self.subscribe(&b.destination, &b.source, &b.key, b.args.clone())
                    .await
            };
            if let Err(e) = restored {
                tracing::warn!(destination = %b.destination, source = %b.source, key = %b.key, error = %e, "cannot restore a stored binding");
            }
        }
    }

    /// The queue's session takes the binding's filter (at start: again).
    pub(super) async fn subscribe(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
        args: BindArgs,
    ) -> Result<(), Exception> {
        let (q, x) = {
            let r = self.registry();
            let q = r
                .queues
                .get(queue)
                .cloned()
                .ok_or_else(|| not_found_queue(queue))?;
            let x = r
                .exchanges
                .get(exchange)
                .copied()
                .ok_or_else(|| not_found_exchange(exchange))?;
            (q, x)
        };
        let filter = Self::binding_filter(exchange, x.kind, key, queue)?;
        q.bind(&filter).await.map_err(session_err)?;
        let mut r = self.registry();
        if x.kind == Kind::Headers {
            r.add_edge(exchange, Leads::Topic(filter), key, &args)?;
        }
        r.bindings.entry(queue.to_string()).or_default().insert((
            exchange.to_string(),
            key.to_string(),
            args,
        ));
        Ok(())
    }

    pub(crate) async fn bind(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
        args: &FieldTable,
        conn: ConnId,
    ) -> Result<(), Exception> {
        let _change = self.changes.lock().await;
        let q = self.queue(queue, conn)?;
        let x = self.exchange(exchange)?;
        if exchange.is_empty() {
            return Err(Exception::channel(
                ACCESS_REFUSED,
                "operation not permitted on the default exchange",
            ));
        }
        Self::binding_filter(exchange, x.kind, key, queue)?;
        if x.kind == Kind::Headers {
            HeadersMatch::parse(args)?;
        }
        let args = BindArgs::new(args)?;
        if q.flags.durable && !q.flags.exclusive && x.durable {
            self.router
                .store()
                .put_definition(
                    &binding_row(Dest::Queue(queue), exchange, key, &args),
                    encode_binding(Dest::Queue(queue), exchange, key, &args),
                )
                .await
                .map_err(store_err)?;
        }
        self.subscribe(queue, exchange, key, args).await
    }

    pub(crate) async fn unbind(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
        args: &FieldTable,
        conn: ConnId,
    ) -> Result<(), Exception> {
        let _change = self.changes.lock().await;
        self.queue(queue, conn)?;
        let x = self.exchange(exchange)?;
        let args = BindArgs::new(args)?;
        self.remove_binding(queue, exchange, x.kind, key, &args)
            .await
    }

    pub(super) async fn remove_binding(
        &self,
        queue: &str,
        exchange: &str,
        kind: Kind,
        key: &str,
        args: &BindArgs,
    ) -> Result<(), Exception> {
        let binding = (exchange.to_string(), key.to_string(), args.clone());
        let filter = Self::binding_filter(exchange, kind, key, queue)?;
        let (q, filter_still_used) = {
            let mut r = self.registry();
            let Some(set) = r.bindings.get_mut(queue) else {
                return Ok(());
            };
            if !set.remove(&binding) {
                return Ok(());
            }
            // Another binding with the same filter (fanout keys, headers
            // arguments) keeps it.
            let used = set.iter().any(|(x, k, _)| {
                x == exchange && Self::binding_filter(x, kind, k, queue).is_ok_and(|f| f == filter)
            });
            if kind == Kind::Headers {
                r.remove_edge(exchange, &Leads::Topic(filter.clone()), key, args);
            }
            (r.queues.get(queue).cloned(), used)
        };
        let Some(q) = q else { return Ok(()) };
        if !filter_still_used {
            q.unbind(&filter).await.map_err(session_err)?;
        }
        if q.flags.durable && !q.flags.exclusive {
            self.router
                .store()
                .delete_definition(&binding_row(Dest::Queue(queue), exchange, key, args))
                .await
                .map_err(store_err)?;
        }
        self.drop_if_unused(exchange).await
    }
}
