//! The partition's small durable files, written off the reactor (glommio's blocking pool): the
//! epoch history, which must be in its file before any data of a new epoch can become durable,
//! and the high watermark a leader restarts from.

use std::rc::Rc;
use std::time::Duration;

use wharf_storage::Offset;

use super::files::{store_epochs, store_high_watermark};
use super::{monotonic_ms, park, Partition, PartitionError};
use crate::protocol::ErrorCode;

/// How often a leader stores a high watermark that moved (`files::HIGH_WATERMARK_FILE`): a
/// restarted leader starts from it, so ListOffsets and describe report committed data at once.
/// An older value is always safe, so this only bounds how far behind it can be.
const HIGH_WATERMARK_STORE_INTERVAL_MS: u64 = 5_000;

impl Partition {
    /// Starts writing the epoch history (or makes the write in progress run once more). Until
    /// the file holds it, no flush begins (`epochs_durable`): data of an epoch the file lacks
    /// must never become durable, or a restart would reuse that epoch (the leader starts at the
    /// file's latest + 1) for other data. Staged data is not on disk, so appends may go on.
    pub(super) fn persist_epochs(&self) -> Result<(), String> {
        self.epochs_wanted.set(self.epochs_wanted.get() + 1);
        if self.epochs_writing.replace(true) {
            return Ok(()); // The running writer sees the new generation.
        }
        let partition = self.self_rc();
        glommio::spawn_local_into(partition.write_epochs(), self.replication.queue)
            .map_err(|e| format!("cannot start writing the epoch history: {e}"))?
            .detach();
        Ok(())
    }

    /// Writes the epoch history until the file holds the latest generation, one write at a
    /// time (so an older history never replaces a newer one).
    async fn write_epochs(self: Rc<Self>) {
        loop {
            let wanted = self.epochs_wanted.get();
            if self.epochs_stored.get() >= wanted {
                break;
            }
            // Taken now: at least as new as generation `wanted`.
            let entries = self.replica.borrow().epochs().entries().to_vec();
            let dir = self.dir.clone();
            let stored = glommio::executor()
                .spawn_blocking(move || store_epochs(&dir, &entries))
                .await;
            match stored {
                Ok(()) => self.epochs_stored.set(wanted),
                Err(error) => {
                    tracing::error!(topic = %self.topic, partition = self.index, %error, "cannot write the epoch history; the partition flushes nothing until restart");
                    *self.epochs_failed.borrow_mut() = Some(error.clone());
                    self.fail_waiters(PartitionError::new(ErrorCode::StorageError, error));
                    break;
                }
            }
        }
        self.epochs_writing.set(false);
        for waiter in self.epochs_waiters.borrow_mut().drain(..) {
            let _ = waiter.send(());
        }
        let _ = self.wake_flusher.try_send(());
    }

    /// Whether the epoch history file holds the replica's current history.
    pub(super) fn epochs_durable(&self) -> bool {
        self.epochs_stored.get() >= self.epochs_wanted.get()
    }

    /// Waits until the epoch history file is current; false if writing it failed.
    pub(super) async fn wait_epochs_durable(&self) -> bool {
        while !self.epochs_durable() {
            if self.epochs_failed.borrow().is_some() {
                return false;
            }
            let woken = park(&self.epochs_waiters);
            if self.epochs_writing.get() {
                let _ = woken.await;
            } else {
                // Unreachable (a wanted generation always has a writer), but never hang here.
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
        }
        true
    }

    /// Leader: stores the high watermark if it moved and the last store is old enough.
    pub(super) fn maybe_store_high_watermark(&self) {
        let high_watermark = self.high_watermark.get();
        let now = monotonic_ms();
        if self.closing.get()
            || self.hw_storing.get()
            || high_watermark <= self.hw_stored.get()
            || now.saturating_sub(self.hw_stored_at_ms.get()) < HIGH_WATERMARK_STORE_INTERVAL_MS
        {
            return;
        }
        self.hw_storing.set(true);
        self.hw_stored_at_ms.set(now);
        let partition = self.self_rc();
        let spawned = glommio::spawn_local_into(
            async move {
                partition.store_high_watermark(high_watermark).await;
                partition.hw_storing.set(false);
            },
            self.replication.queue,
        );
        match spawned {
            Ok(task) => {
                task.detach();
            }
            Err(error) => {
                self.hw_storing.set(false);
                tracing::warn!(topic = %self.topic, partition = self.index, %error, "cannot start storing the high watermark");
            }
        }
    }

    pub(super) async fn store_high_watermark(&self, high_watermark: Offset) {
        let dir = self.dir.clone();
        let stored = glommio::executor()
            .spawn_blocking(move || store_high_watermark(&dir, high_watermark))
            .await;
        match stored {
            Ok(()) => self.hw_stored.set(self.hw_stored.get().max(high_watermark)),
            Err(error) => {
                tracing::warn!(topic = %self.topic, partition = self.index, %error, "cannot store the high watermark")
            }
        }
    }
}
