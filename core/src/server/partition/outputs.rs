//! The one place where the partition talks to its replica: `step` feeds it an input and
//! `execute_output` carries out each output it returns (and feeds back the inputs they lead to).
//! The outputs only the caller can carry out (it holds the batches, or the fetch to answer) come
//! back to it as an `Answer`.

use std::collections::VecDeque;

use wharf_replication::{Ack, FetchError, Input, Output, ProduceError};
use wharf_storage::{AppendMode, Epoch, Offset};

use super::{now_ms, produce_error, Partition};
use crate::config::FlushMode;

/// What the replica answered the caller's input with.
#[derive(Debug)]
pub(super) enum Answer {
    /// Leader: append the produce's batches with this epoch (`Output::Append`).
    Append { leader_epoch: Epoch },
    /// A produce answered before it was registered: a refusal (`Output::Complete`).
    Complete { result: Result<Ack, ProduceError> },
    /// Leader: serve the fetch from `fetch_offset` (`Output::ServeFetch`).
    ServeFetch { fetch_id: u64, fetch_offset: Offset },
    /// Leader: refuse the fetch (`Output::RejectFetch`).
    RejectFetch { fetch_id: u64, error: FetchError },
}

impl Partition {
    /// Feeds `input` to the replica and carries out its outputs (and the inputs they lead to).
    /// Returns what the caller must act on: `Append`, fetch answers, and completions of
    /// produces not registered yet (refusals).
    pub(super) fn step(&self, input: Input) -> Result<Vec<Answer>, String> {
        let mut inputs = VecDeque::from([input]);
        let mut answers = Vec::new();
        // Each output leads to at most one input; a chain longer than this is a bug.
        for _ in 0..1024 {
            let Some(input) = inputs.pop_front() else {
                return Ok(answers);
            };
            let mut outbox = Vec::new();
            self.replica.borrow_mut().step(input, &mut outbox);
            for output in outbox {
                if let Some(next) = self.execute_output(output, &mut answers)? {
                    inputs.push_back(next);
                }
            }
        }
        panic!("replica step chain did not end");
    }

    /// Carries out one output of the replica (every output goes through here), or hands it to
    /// the caller as an `Answer`. Returns the input it leads to, if any.
    fn execute_output(
        &self,
        output: Output,
        answers: &mut Vec<Answer>,
    ) -> Result<Option<Input>, String> {
        match output {
            Output::Complete { waiter, result } => {
                let entry = self.produce_waiters.borrow_mut().remove(&waiter.0);
                match entry {
                    Some((appended_at, done)) => {
                        self.metrics
                            .ack_wait
                            .observe(appended_at.elapsed().as_secs_f64());
                        let _ = done.send(result.map_err(produce_error));
                    }
                    None => answers.push(Answer::Complete { result }),
                }
            }
            Output::Append { leader_epoch, .. } => answers.push(Answer::Append { leader_epoch }),
            Output::ServeFetch {
                fetch_id,
                fetch_offset,
                ..
            } => answers.push(Answer::ServeFetch {
                fetch_id,
                fetch_offset,
            }),
            Output::RejectFetch {
                fetch_id, error, ..
            } => answers.push(Answer::RejectFetch { fetch_id, error }),
            Output::SendFetch { request, .. } => {
                *self.outgoing_fetch.borrow_mut() = Some(request);
                let _ = self.wake_fetcher.try_send(());
            }
            Output::AppendFetched { count } => {
                let fetched = self.fetched.borrow_mut().take();
                let Some((mut frame, ranges)) = fetched else {
                    return Err("AppendFetched without fetched batches".to_string());
                };
                let now = now_ms();
                // `fetch_once` holds the read side of `maintenance` while it steps the reply.
                let Some(mut log) = self.log.get_mut() else {
                    return Err("AppendFetched while the log is under maintenance".to_string());
                };
                for (range, verified) in ranges.into_iter().take(count) {
                    let batch = &mut frame[range];
                    if let Err(error) =
                        log.append_verified(batch, verified, AppendMode::Replica, now)
                    {
                        // Poisoned or inconsistent: the partition stops replicating until restart.
                        tracing::error!(topic = %self.topic, partition = self.index, %error, "cannot append fetched batches");
                        return Err(error.to_string());
                    }
                }
                let end = log.end_offset();
                drop(log);
                self.metrics.end_offset.set(end.0 as i64);
                let _ = self.wake_flusher.try_send(());
                if self.config.flush == FlushMode::Interval {
                    // Appended counts as held for this topic: report it with the append.
                    self.step(Input::FetchedAppended { next_offset: end })?;
                    return Ok(Some(Input::Flushed { durable: end }));
                }
                return Ok(Some(Input::FetchedAppended { next_offset: end }));
            }
            Output::Truncate { to } => {
                let partition = self.self_rc();
                let task = glommio::spawn_local_into(
                    async move { partition.truncate(to).await },
                    self.replication.queue,
                )
                .map_err(|e| format!("cannot start truncation: {e}"))?;
                task.detach();
            }
            Output::ResetLog { start } => {
                let partition = self.self_rc();
                let task = glommio::spawn_local_into(
                    async move { partition.reset_log(start).await },
                    self.replication.queue,
                )
                .map_err(|e| format!("cannot start the log reset: {e}"))?;
                task.detach();
            }
            Output::EpochHistoryChanged => self.persist_epochs()?,
            Output::HighWatermark(offset) => self.advance_high_watermark(offset),
            Output::IsrChanged(isr) => {
                let replicas = self.replicas.len().max(1);
                self.metrics.isr_size.set(isr.len() as i64);
                self.metrics
                    .under_replicated
                    .set(i64::from(isr.len() < replicas));
                tracing::info!(topic = %self.topic, partition = self.index, ?isr, "ISR changed");
            }
            // Controller mode: the shard forwards it to the controller; the answer comes back
            // as `IsrCommitted` (through the metadata log) or `IsrRejected`.
            Output::ProposeIsr {
                isr,
                leader_epoch,
                partition_epoch,
            } => {
                tracing::info!(topic = %self.topic, partition = self.index, ?isr, partition_epoch, "proposing an ISR change to the controller");
                self.replication.isr_proposals.push(super::IsrProposal {
                    topic: self.topic.clone(),
                    partition: self.index,
                    leader: self.replication.broker_id,
                    leader_epoch,
                    partition_epoch,
                    isr,
                });
            }
        }
        Ok(None)
    }
}
