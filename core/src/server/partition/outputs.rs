//! The partition as the host of the shared driver core (`wharf_replication::driver`): the one
//! place where the replica's outputs are carried out lives there, generic over the disk and
//! the transport, and the simulator runs the same code. This file supplies what the broker
//! does for it: oneshot waiters, fetches through the follower task, ISR proposals through the
//! shard's queue, truncation and reset as tasks, the epoch-history file, metrics and wake-ups.

use wharf_replication::driver::{self, Answer, Durability, Fetched, PartitionHost};
use wharf_replication::producers::ProducerStates;
use wharf_replication::{Ack, BrokerId, FetchRequest, Input, ProduceError, Replica, WaiterId};
use wharf_storage::{Epoch, Offset, PartitionLog};

use super::{now_ms, produce_error, Partition};
use crate::config::FlushMode;
use crate::dma_disk::DmaDisk;
use crate::protocol::FrameBuf;

/// The driver's view of a partition (everything it touches is behind the partition's cells).
pub(super) struct Host<'a>(pub(super) &'a Partition);

impl Partition {
    /// Feeds `input` to the replica and carries out its outputs (and the inputs they lead to).
    /// Returns what the caller must act on: `Append`, fetch answers, and completions of
    /// produces not registered yet (refusals).
    pub(super) fn step(&self, input: Input) -> Result<Vec<Answer>, String> {
        driver::step(&mut Host(self), input)
    }
}

impl PartitionHost for Host<'_> {
    type Disk = DmaDisk;
    type Frame = FrameBuf;

    fn durability(&self) -> Durability {
        match self.0.config.flush {
            FlushMode::Always => Durability::Synced,
            FlushMode::Interval => Durability::Appended,
        }
    }

    fn wall_clock_ms(&self) -> u64 {
        now_ms()
    }

    fn with_replica<R>(&mut self, f: impl FnOnce(&mut Replica) -> R) -> R {
        f(&mut self.0.replica.borrow_mut())
    }

    fn with_log<R>(&mut self, f: impl FnOnce(&mut PartitionLog<DmaDisk>) -> R) -> Option<R> {
        // `fetch_once` and `produce` hold the read side of `maintenance` while they step: the
        // log is in its slot unless something is wrong.
        let mut log = self.0.log.get_mut()?;
        Some(f(&mut log))
    }

    fn take_fetched(&mut self) -> Option<Fetched<FrameBuf>> {
        self.0.fetched.borrow_mut().take()
    }

    fn with_producers<R>(&mut self, f: impl FnOnce(&mut ProducerStates) -> R) -> R {
        f(&mut self.0.producers.borrow_mut())
    }

    fn complete(&mut self, waiter: WaiterId, result: Result<Ack, ProduceError>) -> bool {
        let entry = self.0.produce_waiters.borrow_mut().remove(&waiter.0);
        let Some((appended_at, done)) = entry else {
            return false;
        };
        self.0
            .metrics
            .ack_wait
            .observe(appended_at.elapsed().as_secs_f64());
        let _ = done.send(result.map_err(produce_error));
        true
    }

    fn send_fetch(&mut self, _leader: BrokerId, request: FetchRequest) {
        // The follower task sends it to the leader it follows (`follower.rs`).
        *self.0.outgoing_fetch.borrow_mut() = Some(request);
        let _ = self.0.wake_fetcher.try_send(());
    }

    fn propose_isr(&mut self, isr: Vec<BrokerId>, leader_epoch: Epoch, partition_epoch: u64) {
        let partition = self.0;
        tracing::info!(topic = %partition.topic, partition = partition.index, ?isr, partition_epoch, "proposing an ISR change to the controller");
        // The shard forwards it to the controller.
        partition
            .replication
            .isr_proposals
            .push(super::IsrProposal {
                topic: partition.topic.clone(),
                partition: partition.index,
                leader: partition.replication.broker_id,
                leader_epoch,
                partition_epoch,
                isr,
            });
    }

    fn start_truncate(&mut self, to: Offset) -> Result<Option<Input>, String> {
        let partition = self.0.self_rc();
        glommio::spawn_local_into(
            async move { partition.truncate(to).await },
            self.0.replication.queue,
        )
        .map_err(|e| format!("cannot start truncation: {e}"))?
        .detach();
        Ok(None) // `truncate` reports `Truncated`.
    }

    fn start_reset(&mut self, start: Offset) -> Result<Option<Input>, String> {
        let partition = self.0.self_rc();
        glommio::spawn_local_into(
            async move { partition.reset_log(start).await },
            self.0.replication.queue,
        )
        .map_err(|e| format!("cannot start the log reset: {e}"))?
        .detach();
        Ok(None) // `reset_log` reports `LogReset`.
    }

    fn persist_epochs(&mut self) -> Result<(), String> {
        self.0.persist_epochs()
    }

    fn high_watermark_advanced(&mut self, to: Offset) {
        self.0.advance_high_watermark(to);
    }

    fn isr_changed(&mut self, isr: &[BrokerId]) {
        let partition = self.0;
        let replicas = partition.replicas.len().max(1);
        partition.metrics.isr_size.set(isr.len() as i64);
        partition
            .metrics
            .under_replicated
            .set(i64::from(isr.len() < replicas));
        tracing::info!(topic = %partition.topic, partition = partition.index, ?isr, "ISR changed");
    }

    fn fetched_appended(&mut self, end: Offset) {
        self.0.metrics.end_offset.set(end.0 as i64);
        let _ = self.0.wake_flusher.try_send(());
    }
}
