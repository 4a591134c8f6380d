//! Replaying or purging dead letters on an operator's request, all of them
//! or one route's: pages of the dead-letter table are selected off the
//! async threads ([`super::scan::select_dead_letters`]) and each page's
//! selection is one store commit. Used by the admin endpoints and by the
//! CLI on a stopped gateway's store.

use std::collections::HashMap;
use std::sync::Arc;

use edge_core::Routes;
use edge_store::Store;

use super::report::NO_ROUTE;
use super::scan::select_dead_letters;

/// What is done with the selected dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterAction {
    /// Back into the log, forwarded again by the upstreams that parked them
    /// (under their original message ids).
    Replay,
    /// Deleted.
    Purge,
}

impl DeadLetterAction {
    /// The past participle the answers use: `replayed 3`.
    pub fn verb(self) -> &'static str {
        match self {
            DeadLetterAction::Replay => "replayed",
            DeadLetterAction::Purge => "purged",
        }
    }
}

/// Whether `route` names a configured route (or the [`NO_ROUTE`] bucket of
/// dead letters no route matches any more).
pub fn check_route(routes: &Routes, route: &str) -> Result<(), String> {
    if route == NO_ROUTE || routes.iter().any(|r| r.name == route) {
        return Ok(());
    }
    let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
    Err(format!(
        "no route named {route:?} (configured: {})",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    ))
}

/// Replays or purges the dead letters parked now (of `route`, or all);
/// returns how many. Dead letters parked while this runs — a replayed one
/// parked again because its cause is not fixed — wait for the next request.
/// On a store error: how many were done before it, and the error.
pub async fn act_on_dead_letters(
    store: &Store,
    own: Arc<HashMap<String, Routes>>,
    route: Option<String>,
    action: DeadLetterAction,
) -> Result<u64, (u64, anyhow::Error)> {
    // Every parked seq is a log seq below the next one; a dead letter
    // parked from now on gets a higher one.
    let upto = store.stats().next_seq.saturating_sub(1);
    let mut from = 0;
    let mut total = 0u64;
    loop {
        let (view, own, route) = (store.clone(), own.clone(), route.clone());
        let selected = tokio::task::spawn_blocking(move || {
            select_dead_letters(&view, &own, route.as_deref(), from, upto)
        })
        .await;
        let (seqs, next) = match selected {
            Ok(Ok(page)) => page,
            Ok(Err(e)) => return Err((total, e.into())),
            Err(e) => return Err((total, e.into())),
        };
        if !seqs.is_empty() {
            let done = match action {
                DeadLetterAction::Replay => store.replay_dead_letters_at(seqs).await,
                DeadLetterAction::Purge => store.purge_dead_letters_at(seqs).await,
            };
            total += done.map_err(|e| (total, e.into()))?;
        }
        match next {
            Some(next) => from = next,
            None => return Ok(total),
        }
    }
}
