//! Transactions (`tx.select`, `tx.commit`, `tx.rollback`), as RabbitMQ
//! serves them: on a channel in transaction mode publishes, acks, nacks
//! and rejects are held (`channel::Tx`, bounded) until the commit, which
//! performs them in order and answers commit-ok once every held publish
//! is committed to the store (a failed one closes the channel, 406
//! `partial tx completion`; a held publish whose exchange is gone by then
//! closes it 404, and the acks, nacks and rejects held after it are put
//! back as unacknowledged, for the close to requeue). A rollback discards the publishes and makes
//! the settled deliveries unacknowledged again. Transaction and confirm
//! mode exclude each other on one channel (406).

use std::sync::Arc;

use amq_protocol::protocol::{AMQPClass, tx};
use futures::FutureExt;

use crate::channel::{Held, by_queue};
use crate::connection::{AckRun, Connection, Settled};
use crate::error::{Exception, PRECONDITION_FAILED};

impl Connection {
    pub(crate) async fn on_tx(&mut self, ch: u16, m: tx::AMQPMethod) -> Result<(), Exception> {
        let Some(chan) = self.channels.get_mut(&ch) else {
            return Ok(());
        };
        match m {
            tx::AMQPMethod::Select(_) => {
                if chan.confirm {
                    return Err(Exception::channel(
                        PRECONDITION_FAILED,
                        "cannot switch from confirm to tx mode",
                    ));
                }
                let budget = &self.tx_budget;
                chan.tx
                    .get_or_insert_with(|| crate::channel::Tx::new(Arc::clone(budget)));
                self.method(ch, AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})))
            }
            tx::AMQPMethod::Commit(_) => self.commit(ch).await,
            tx::AMQPMethod::Rollback(_) => {
                chan.roll_back()?;
                self.method(
                    ch,
                    AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
                )
            }
            other => Err(Exception::connection(
                crate::error::COMMAND_INVALID,
                format!("unexpected tx method {other:?}"),
            )),
        }
    }

    /// Performs what the transaction held, in order; commit-ok follows
    /// (in `pending`) the outcomes of its publishes.
    async fn commit(&mut self, ch: u16) -> Result<(), Exception> {
        let Some(chan) = self.channels.get_mut(&ch) else {
            return Ok(());
        };
        let held = chan.take_tx()?;
        let epoch = chan.epoch;
        let mut outcomes = Vec::new();
        let mut held = held.into_iter();
        while let Some(h) = held.next() {
            match h {
                Held::Publish(content) => match self.publish_now(ch, *content).await {
                    Ok(outcome) => outcomes.push(outcome),
                    Err(e) => {
                        // The channel closes; the deliveries the rest of
                        // the transaction settled are unacked again, so
                        // that its close requeues them (as RabbitMQ).
                        if let Some(chan) = self.channels.get_mut(&ch) {
                            for rest in held {
                                if let Held::Settle { entries, .. } = rest {
                                    chan.restore(entries);
                                }
                            }
                        }
                        return Err(e);
                    }
                },
                Held::Settle { entries, requeue } => {
                    let settled = by_queue(entries.into_iter().map(|(_, u)| u).collect());
                    self.apply_settle(settled, requeue).await;
                }
            }
        }
        let done = async move {
            let mut result = Ok(());
            for outcome in outcomes {
                let s = outcome.await;
                if result.is_ok() {
                    result = s.result;
                }
            }
            Settled {
                channel: ch,
                epoch,
                tag: None,
                result,
                commit: true,
                refused: false,
            }
        };
        self.pending.push_back(done.boxed());
        Ok(())
    }

    /// A commit's publishes are all settled: commit-ok, or the channel's
    /// close if one failed.
    pub(crate) fn committed(
        &mut self,
        s: Settled,
        run: &mut Option<AckRun>,
    ) -> Result<(), Exception> {
        if !self.is_open(s.channel, s.epoch) {
            return Ok(());
        }
        if s.result.is_err() {
            // The store's refusal is logged and counted (`settled`).
            let e = Exception::channel(PRECONDITION_FAILED, "partial tx completion").on(90, 20);
            self.failed_commits.push((s.channel, s.epoch, e));
            return Ok(());
        }
        self.flush_acks(run)?;
        self.method(
            s.channel,
            AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})),
        )
    }
}
