//! Controller mode: the controller's decisions reach the partition here. The leader, its epoch
//! and the ISR come from the metadata log (`apply_state`), the broker's session with the
//! controller bounds how long a leader may acknowledge (`renew_lease`), and the leader's ISR
//! proposals leave through the shard's `IsrProposals` queue (`outputs.rs`).

use wharf_replication::driver::{self, StateApplied};
use wharf_replication::{Input, IsrRejection};

use super::outputs::Host;
use super::{park, Partition, PartitionState};

impl Partition {
    /// Brings the replica to the controller's state: leads or follows in the given epoch, or
    /// adopts a committed ISR within the current one. Older epochs are ignored (the metadata
    /// log is applied in order, but a restarted broker may replay what it already applied).
    pub fn apply_state(&self, state: &PartitionState) -> Result<(), String> {
        if !self.replication.controller_mode {
            return Ok(());
        }
        let me = self.replication.broker_id;
        match driver::apply_state(&mut Host(self), me, state)? {
            StateApplied::Deferred => {
                // Applied when the change is done (`apply_pending_state`); a newer state
                // replaces an older one waiting.
                *self.pending_state.borrow_mut() = Some(state.clone());
            }
            StateApplied::Leading => {
                tracing::info!(topic = %self.topic, partition = self.index, epoch = %state.leader_epoch, isr = ?state.isr, "leading (controller)");
                self.wake_role_waiters();
            }
            StateApplied::Following => {
                tracing::info!(topic = %self.topic, partition = self.index, leader = ?state.leader, epoch = %state.leader_epoch, "following (controller)");
                self.wake_role_waiters();
                let _ = self.wake_fetcher.try_send(());
            }
            StateApplied::Stale | StateApplied::IsrCommitted | StateApplied::Unchanged => {}
        }
        Ok(())
    }

    /// Applies the state that arrived during a follower log change, once it is done.
    pub(super) fn apply_pending_state(&self) {
        let pending = self.pending_state.borrow_mut().take();
        if let Some(state) = pending {
            if let Err(error) = self.apply_state(&state) {
                tracing::error!(topic = %self.topic, partition = self.index, %error, "cannot apply the controller's state");
            }
        }
    }

    /// The controller answered this leader's ISR proposal with a refusal.
    pub fn reject_isr_proposal(
        &self,
        partition_epoch: u64,
        reason: IsrRejection,
    ) -> Result<(), String> {
        self.step(Input::IsrRejected {
            partition_epoch,
            reason,
        })
        .map(|_| ())
    }

    /// The controller renewed this broker's session: a leader may acknowledge until
    /// `until_ms` (monotonic clock).
    pub fn renew_lease(&self, until_ms: u64) -> Result<(), String> {
        if !self.replication.controller_mode {
            return Ok(());
        }
        self.step(Input::LeaseRenewed { until_ms }).map(|_| ())
    }

    /// Resolves at the next role change (the fetcher abandons a fetch to the old leader).
    pub(super) fn role_changed(&self) -> futures_channel::oneshot::Receiver<()> {
        park(&self.role_waiters)
    }

    fn wake_role_waiters(&self) {
        for waiter in self.role_waiters.borrow_mut().drain(..) {
            let _ = waiter.send(());
        }
    }
}
