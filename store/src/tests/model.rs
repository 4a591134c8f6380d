//! Model test: random steps against a `BTreeMap` model of the store
//! (`model/state.rs`), on the simulated disk of `disk.rs`.
//!
//! Steps (`model/step.rs`): appends to the log, to durable queues (some
//! named twice, some deleted) and to the retained table; cursor advances;
//! queue create, delete, ack and state; park, purge and replay of dead
//! letters; clean reopens; power cuts. After every step the store must show
//! exactly the model: log entries (replay marks included), cursors, queues
//! and every entry of every queue id handed out, retained messages, dead
//! letters, the live figures and the `committed` watch.
//!
//! A power cut is armed to strike after a number of writes and syncs, so it
//! lands anywhere in a later commit (or in the open of a reopen). Each step
//! is one op and one commit, so the step that sees the store fail is the
//! one whose commit the cut broke. The store is then dropped and opened on
//! what the disk kept. redb commits are atomic, so:
//!
//! - an op acknowledged before the cut is durable: the state after the cut
//!   is never older than the model before the failed step;
//! - the failed op itself acknowledged nothing. When the disk kept only
//!   what was synced, it must not be visible at all. When it kept every
//!   write, or any of the writes since the last sync (the page cache may
//!   write back what it likes before the power goes), its commit may have
//!   landed whole, so the state is the model before or after the op, never
//!   a mix.

mod action;
mod state;
mod step;

use std::path::Path;

use proptest::prelude::*;

use super::disk::{Disk, Kept};
use super::options;
use crate::Store;
use action::{Action, Reply, run};
use state::{CURSORS, MAX_BYTES, Model, Snapshot};
use step::Step;

fn open(disk: &Disk) -> Result<Store, crate::OpenError> {
    Store::open_with_backend(
        disk.backend(),
        Path::new("model"),
        options(MAX_BYTES, &CURSORS),
    )
}

/// Opens the store; when an armed power cut struck the drop or the open
/// itself, restarts the disk first. Nothing is lost either way: no op was
/// in flight.
fn reopen(disk: &Disk, armed: &mut Option<Kept>) -> Store {
    match open(disk) {
        Ok(store) => store,
        Err(e) => {
            assert!(disk.power_is_cut(), "open failed without a power cut: {e}");
            let kept = armed.take().expect("the power was cut as armed");
            disk.restart(kept);
            open(disk).unwrap()
        }
    }
}

/// The models the store may match after a power cut struck the commit of
/// `action` (`got` its reply, `model` the state before it).
fn allowed_after_cut(
    model: &Model,
    action: &Action,
    got: &Result<Reply, String>,
    kept: Kept,
) -> Vec<Model> {
    let mut after = model.clone();
    let predicted = after.apply(action);
    match got {
        // Acknowledged (a refusal is answered before the commit): it holds.
        Ok(reply) => {
            assert_eq!(*reply, predicted, "{action:?}");
            vec![after]
        }
        // Not acknowledged: not there, unless unsynced writes survived and
        // with them the whole commit.
        Err(_) if kept == Kept::Synced => vec![model.clone()],
        Err(_) => vec![model.clone(), after],
    }
}

async fn check(steps: Vec<Step>) {
    let disk = Disk::default();
    let mut armed = None;
    let mut store = reopen(&disk, &mut armed);
    let mut model = Model::new();
    for (n, step) in steps.iter().enumerate() {
        match step {
            Step::Reopen => {
                drop(store);
                store = reopen(&disk, &mut armed);
                model.restarted();
            }
            Step::Crash { after: None, kept } => {
                disk.cut_power_after(0);
                drop(store);
                disk.restart(*kept);
                armed = None;
                store = reopen(&disk, &mut armed);
                model.restarted();
            }
            Step::Crash {
                after: Some(after),
                kept,
            } => {
                disk.cut_power_after(*after);
                armed = Some(*kept);
            }
            _ => {
                let Some(action) = model.resolve(step, n as u64) else {
                    continue;
                };
                let got = run(&store, action.clone()).await;
                let failure = store.failure().borrow().clone();
                let Some(failure) = failure else {
                    assert_eq!(got, Ok(model.apply(&action)), "step {n}: {action:?}");
                    check_store(&store, &model, n, step);
                    continue;
                };
                let kept = armed.take().unwrap_or_else(|| {
                    panic!("step {n}: a failure without a power cut: {failure}")
                });
                let allowed = allowed_after_cut(&model, &action, &got, kept);
                drop(store);
                disk.restart(kept);
                store = reopen(&disk, &mut armed);
                // Every id either model handed out.
                let ids = allowed[allowed.len() - 1].queue_ids();
                let seen = Snapshot::read(&store, ids.clone());
                model = match allowed.iter().find(|m| m.snapshot(ids.clone()) == seen) {
                    Some(m) => m.clone(),
                    None => panic!(
                        "step {n}: after a power cut in {action:?} ({kept:?} kept), \
                         the store holds {seen:#?}\nbut the model allows only {:#?}",
                        allowed
                            .iter()
                            .map(|m| m.snapshot(ids.clone()))
                            .collect::<Vec<_>>()
                    ),
                };
                model.restarted();
            }
        }
        check_store(&store, &model, n, step);
    }
}

fn check_store(store: &Store, model: &Model, n: usize, step: &Step) {
    let ids = model.queue_ids();
    assert_eq!(
        Snapshot::read(store, ids.clone()),
        model.snapshot(ids),
        "after step {n}: {step:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
    #[test]
    fn store_matches_a_btreemap_model(steps in proptest::collection::vec(step::step(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(check(steps));
    }
}
