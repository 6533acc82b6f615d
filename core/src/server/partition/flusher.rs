//! The flusher task: group commit (flushes begun as the topic's flush mode asks, up to
//! `FLUSHES_IN_FLIGHT_MAX` in flight), retention checks, the idle checkpoint, and the final
//! flush and checkpoint when the partition closes.

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::channels::local_channel::LocalReceiver;
use glommio::{Task, TaskQueueHandle};
use wharf_storage::log::{FlushOutcome, FLUSHES_IN_FLIGHT_MAX};

use super::{monotonic_ms, Partition, PartitionError};
use crate::config::FlushMode;
use crate::protocol::ErrorCode;

/// How long an idle partition waits before bringing its checkpoint up to date.
const IDLE_CHECKPOINT_MS: u64 = 1000;

impl Partition {
    pub(super) async fn run_flusher(
        self: Rc<Self>,
        wake: LocalReceiver<()>,
        queue: TaskQueueHandle,
    ) {
        let mut in_flight: VecDeque<(Instant, Task<FlushOutcome>)> = VecDeque::new();
        // Flush timing is a duration: the monotonic clock, like the replica's.
        let mut last_flush_ms = monotonic_ms();
        let mut flushed_since_checkpoint = false;
        let mut last_retention = Instant::now();
        loop {
            let closing = self.closing.get();
            while in_flight.len() < FLUSHES_IN_FLIGHT_MAX {
                let now = monotonic_ms();
                if !self.epochs_durable() {
                    break; // `write_epochs` wakes this loop when the file is current.
                }
                let job = {
                    // Out of its slot while maintenance runs: nothing to flush meanwhile.
                    let Some(mut log) = self.log.get_mut() else {
                        break;
                    };
                    if log.poisoned().is_some()
                        || !(closing || log.staged_bytes() > 0 && log.flush_due(last_flush_ms, now))
                    {
                        break;
                    }
                    match log.begin_flush() {
                        Ok(Some(job)) => job,
                        Ok(None) => break,
                        Err(error) => {
                            drop(log);
                            self.fail_waiters(PartitionError::new(
                                ErrorCode::StorageError,
                                error.to_string(),
                            ));
                            break;
                        }
                    }
                };
                last_flush_ms = now;
                flushed_since_checkpoint = true;
                match glommio::spawn_local_into(job.run(), queue) {
                    Ok(task) => in_flight.push_back((Instant::now(), task)),
                    Err(error) => {
                        tracing::error!(%error, "cannot spawn a flush");
                        break;
                    }
                }
            }
            if let Some((_, front)) = in_flight.front_mut() {
                let flushed = futures_lite::future::or(async { Some(front.await) }, async {
                    let _ = wake.recv().await;
                    None
                })
                .await;
                if let Some(outcome) = flushed {
                    if let Some((started, _)) = in_flight.pop_front() {
                        self.complete(outcome, started);
                    }
                }
                continue;
            }
            if closing {
                break;
            }
            if last_retention.elapsed() >= Duration::from_millis(self.retention_check_ms) {
                last_retention = Instant::now();
                self.apply_retention().await;
            }
            let wait_ms = match self.config.flush {
                FlushMode::Interval if self.staged_bytes() > 0 => self
                    .config
                    .flush_interval_ms
                    .saturating_sub(monotonic_ms().saturating_sub(last_flush_ms))
                    .max(1),
                _ => IDLE_CHECKPOINT_MS.min(self.retention_check_ms),
            };
            let woken = glommio::timer::timeout(Duration::from_millis(wait_ms), async {
                Ok(wake.recv().await)
            })
            .await;
            if woken.is_err() && flushed_since_checkpoint && self.staged_bytes() == 0 {
                // Idle: make the checkpoint current so recovery knows the whole log is
                // acknowledged data (see storage/README.md).
                if let Some(mut log) = self.log.get_mut() {
                    log.request_checkpoint();
                    flushed_since_checkpoint = false;
                }
                self.flush_now(queue).await;
            }
        }
        // Closing: everything staged was flushed above; write a current checkpoint (twice, as
        // `PartitionLog::close` does: the second also covers index files sealed by the first).
        for _ in 0..2 {
            if let Some(mut log) = self.log.get_mut() {
                log.request_checkpoint();
            }
            self.flush_now(queue).await;
        }
    }

    /// Bytes appended and not yet handed to a flush (0 while maintenance holds the log).
    fn staged_bytes(&self) -> usize {
        self.log.get().map_or(0, |log| log.staged_bytes())
    }

    async fn flush_now(&self, queue: TaskQueueHandle) {
        if !self.wait_epochs_durable().await {
            return;
        }
        let begun = match self.log.get_mut() {
            Some(mut log) => log.begin_flush(),
            None => return,
        };
        let job = match begun {
            Ok(Some(job)) => job,
            Ok(None) | Err(_) => return,
        };
        let started = Instant::now();
        match glommio::spawn_local_into(job.run(), queue) {
            Ok(task) => {
                let outcome = task.await;
                self.complete(outcome, started);
            }
            Err(error) => tracing::error!(%error, "cannot spawn a flush"),
        }
    }

    fn complete(&self, outcome: FlushOutcome, started: Instant) {
        self.flush_latency.observe(started.elapsed().as_secs_f64());
        // Maintenance takes the log only with no flush in flight, so it is here.
        let Some(result) = self
            .log
            .get_mut()
            .map(|mut log| log.complete_flush(outcome))
        else {
            tracing::error!(topic = %self.topic, partition = self.index, "a flush completed while maintenance held the log");
            return;
        };
        match result {
            Ok(durable) => self.on_durable(durable),
            Err(error) => {
                tracing::error!(topic = %self.topic, partition = self.index, %error, "flush failed; the partition refuses writes until restart");
                self.fail_waiters(PartitionError::new(
                    ErrorCode::StorageError,
                    error.to_string(),
                ));
            }
        }
    }
}
