//! Operations that change the log across awaits: a follower's truncation and reset, and
//! retention. Each takes the write side of the partition's `maintenance` lock, waits until no
//! flush is in flight, and takes the log out of its slot (see `log_slot.rs`).

use std::rc::Rc;
use std::time::Duration;

use wharf_replication::Input;
use wharf_storage::Offset;

use super::log_slot::TakenLog;
use super::{now_ms, Partition};

impl Partition {
    /// Under the write side of `maintenance`: waits until no flush is in flight (the flusher
    /// begins none meanwhile: nothing new is appended, and it skips while the log is out), then
    /// takes the log out of its slot. `None` when closing.
    async fn take_quiet_log(&self) -> Option<TakenLog<'_>> {
        loop {
            if self.closing.get() {
                return None;
            }
            let quiet = self.log.get()?.flushes_in_flight() == 0;
            if quiet {
                return self.log.take();
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Follower: drops a divergent suffix (after the flushes in flight), then fetches again.
    pub(super) async fn truncate(self: Rc<Self>, to: Offset) {
        // Truncation flushes what is staged below the cut: its epochs must be in the file.
        if !self.wait_epochs_durable().await {
            return;
        }
        let Ok(_exclusive) = self.maintenance.write().await else {
            return;
        };
        let Some(mut log) = self.take_quiet_log().await else {
            return;
        };
        // Reply ends remembered while leading may not be batch boundaries of the new log.
        self.served_ends.borrow_mut().clear();
        let result = log.truncate_suffix(to).await;
        let result = (result, (log.end_offset(), log.durable_offset()));
        drop(log);
        match result {
            (Ok(()), (end, durable)) => {
                tracing::warn!(topic = %self.topic, partition = self.index, %to, "truncated a divergent suffix");
                self.metrics.end_offset.set(end.0 as i64);
                if let Err(error) = self.step(Input::Truncated { end, durable }) {
                    tracing::error!(%error, "after truncation");
                }
                self.apply_pending_state();
            }
            (Err(error), _) => {
                tracing::error!(topic = %self.topic, partition = self.index, %error, "truncation failed; the partition stops replicating until restart");
            }
        }
    }

    /// Follower: the leader's log starts above this log's end, so nothing here can be continued:
    /// empties the log durably (after the flushes in flight) and restarts it at `start`.
    pub(super) async fn reset_log(self: Rc<Self>, start: Offset) {
        let Ok(_exclusive) = self.maintenance.write().await else {
            return;
        };
        let Some(mut log) = self.take_quiet_log().await else {
            return;
        };
        self.served_ends.borrow_mut().clear();
        let result = log.reset(start, now_ms()).await;
        drop(log);
        match result {
            Ok(()) => {
                tracing::warn!(topic = %self.topic, partition = self.index, %start, "the leader's log starts above this log's end: emptied the log to copy it again from the leader's log start");
                self.metrics.end_offset.set(start.0 as i64);
                self.metrics.log_start_offset.set(start.0 as i64);
                if let Err(error) = self.step(Input::LogReset { start }) {
                    tracing::error!(%error, "after the log reset");
                }
                self.apply_pending_state();
            }
            Err(error) => {
                tracing::error!(topic = %self.topic, partition = self.index, %error, "log reset failed; the partition stops replicating until restart");
            }
        }
    }

    /// Deletes the whole segments below `offset` (at or below the high watermark: only
    /// committed data goes) and moves the log start: the leader of an offsets partition after
    /// a full snapshot of its groups, a follower following its leader's log start. Returns
    /// how many segments went.
    pub(crate) async fn delete_below(&self, offset: Offset) -> Result<usize, String> {
        let offset = offset.min(self.high_watermark.get());
        let Ok(_exclusive) = self.maintenance.write().await else {
            return Err("partition closed".into());
        };
        let Some(mut log) = self.take_quiet_log().await else {
            return Err("partition closed".into());
        };
        let result = log.delete_below(offset).await;
        let log_start = log.log_start_offset();
        self.metrics.log_start_offset.set(log_start.0 as i64);
        drop(log);
        match result {
            Ok(0) => Ok(0),
            Ok(deleted) => {
                if let Err(error) = self.step(Input::LogStartMoved { log_start }) {
                    tracing::error!(topic = %self.topic, partition = self.index, %error, "after deleting below {offset}");
                }
                tracing::info!(topic = %self.topic, partition = self.index, deleted, %log_start, "deleted the segments below {offset}");
                Ok(deleted)
            }
            Err(error) => {
                tracing::error!(topic = %self.topic, partition = self.index, %error, "deleting below {offset} failed");
                Err(error.to_string())
            }
        }
    }

    /// Follower: deletes what lies below the leader's log start (its retention, or an offsets
    /// partition's snapshot), once a whole segment here is below it.
    pub(super) async fn follow_leader_log_start(&self, leader_log_start: Offset) {
        let target = leader_log_start.min(self.high_watermark.get());
        let deletable = self.log.get().is_some_and(|log| {
            log.log_start_offset() < target
                && log
                    .segment_bases()
                    .get(1)
                    .is_some_and(|&next| next <= target)
        });
        if deletable {
            let _ = self.delete_below(target).await;
        }
    }

    /// Runs from the flusher between flushes, so no flush is in flight; the log is taken out
    /// of its slot under the write side of `maintenance`.
    pub(super) async fn apply_retention(&self) {
        let Ok(_exclusive) = self.maintenance.write().await else {
            return;
        };
        let Some(mut log) = self.take_quiet_log().await else {
            return;
        };
        let result = log.apply_retention(now_ms()).await;
        let log_start = log.log_start_offset();
        self.metrics.log_start_offset.set(log_start.0 as i64);
        drop(log);
        if matches!(result, Ok(deleted) if deleted > 0) {
            // The leader's replica answers fetches below it with `OffsetOutOfRange`.
            if let Err(error) = self.step(Input::LogStartMoved { log_start }) {
                tracing::error!(topic = %self.topic, partition = self.index, %error, "after retention");
            }
        }
        match result {
            Ok(0) => {}
            Ok(deleted) => {
                tracing::info!(topic = %self.topic, partition = self.index, deleted, "retention deleted segments")
            }
            Err(error) => {
                tracing::error!(topic = %self.topic, partition = self.index, %error, "retention failed")
            }
        }
    }
}
