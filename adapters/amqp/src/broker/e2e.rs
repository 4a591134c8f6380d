//! Exchange-to-exchange bindings (`exchange.bind`, `exchange.unbind`): a
//! publish to the source also goes to the destination when the binding
//! matches under the source's type (`bindings.rs` evaluates them). Durable
//! when both exchanges are.

use amq_protocol::types::FieldTable;

use super::rows::{Dest, binding_row, encode_binding};
use super::{Broker, store_err};
use crate::bindings::{BindArgs, Leads, Matcher};
use crate::error::{ACCESS_REFUSED, Exception};

fn default_exchange() -> Exception {
    Exception::channel(
        ACCESS_REFUSED,
        "operation not permitted on the default exchange",
    )
}

impl Broker {
    pub(crate) async fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        key: &str,
        args: &FieldTable,
    ) -> Result<(), Exception> {
        let _change = self.changes.lock().await;
        let s = self.exchange(source)?;
        let d = self.exchange(destination)?;
        if source.is_empty() || destination.is_empty() {
            return Err(default_exchange());
        }
        let args = BindArgs::new(args)?;
        Matcher::new(s.kind, key, &args)?;
        if s.durable && d.durable {
            let dest = Dest::Exchange(destination);
            self.router
                .store()
                .put_definition(
                    &binding_row(dest, source, key, &args),
                    encode_binding(dest, source, key, &args),
                )
                .await
                .map_err(store_err)?;
        }
        self.link(source, destination, key, args)
    }

    pub(crate) async fn unbind_exchange(
        &self,
        destination: &str,
        source: &str,
        key: &str,
        args: &FieldTable,
    ) -> Result<(), Exception> {
        let _change = self.changes.lock().await;
        self.exchange(source)?;
        self.exchange(destination)?;
        if source.is_empty() || destination.is_empty() {
            return Err(default_exchange());
        }
        let args = BindArgs::new(args)?;
        let binding = (
            source.to_string(),
            destination.to_string(),
            key.to_string(),
            args,
        );
        if !self.unlink(&binding).await? {
            return Ok(());
        }
        self.drop_if_unused(source).await
    }

    /// Adds an exchange binding to the registry (its row written).
    pub(super) fn link(
        &self,
        source: &str,
        destination: &str,
        key: &str,
        args: BindArgs,
    ) -> Result<(), Exception> {
        let mut r = self.registry();
        for x in [source, destination] {
            if !r.exchanges.contains_key(x) {
                return Err(super::not_found_exchange(x));
            }
        }
        r.add_edge(source, Leads::Exchange(destination.to_string()), key, &args)?;
        r.e2e.insert((
            source.to_string(),
            destination.to_string(),
            key.to_string(),
            args,
        ));
        Ok(())
    }

    /// Removes one exchange binding, registry first, then its row; whether
    /// it existed.
    async fn unlink(
        &self,
        binding: &(String, String, String, BindArgs),
    ) -> Result<bool, Exception> {
        let (source, destination, key, args) = binding;
        let durable = {
            let mut r = self.registry();
            if !r.e2e.remove(binding) {
                return Ok(false);
            }
            r.remove_edge(source, &Leads::Exchange(destination.clone()), key, args);
            let durable = |x: &str| r.exchanges.get(x).is_some_and(|e| e.durable);
            durable(source) && durable(destination)
        };
        if durable {
            self.router
                .store()
                .delete_definition(&binding_row(Dest::Exchange(destination), source, key, args))
                .await
                .map_err(store_err)?;
        }
        Ok(true)
    }

    /// Removes every exchange binding `exchange` is the source or the
    /// destination of; returns the other sources that lost one.
    pub(super) async fn unlink_all(&self, exchange: &str) -> Result<Vec<String>, Exception> {
        let bound: Vec<(String, String, String, BindArgs)> = self
            .registry()
            .e2e
            .iter()
            .filter(|(s, d, ..)| s == exchange || d == exchange)
            .cloned()
            .collect();
        let mut sources = Vec::new();
        for binding in bound {
            self.unlink(&binding).await?;
            if binding.0 != exchange && !sources.contains(&binding.0) {
                sources.push(binding.0);
            }
        }
        Ok(sources)
    }
}
