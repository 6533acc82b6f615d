//! The simulator's driver side of controller mode (`SimConfig::isr_via_controller`): what a
//! broker does with the stand-in controller's messages, and what the controller does with the
//! brokers'. Split from `sim.rs` to keep each file readable.

use wharf_replication::{BrokerId, Input, Role};

use super::{Check, Message, Sim, CONTROLLER_COMMIT_DELAY_MS, CONTROLLER_NODE};
use crate::stand_in_controller::{PartitionState, HEARTBEAT_INTERVAL_MS};

impl Sim {
    /// Controller mode: the stand-in controller handles a broker's message and answers.
    pub(super) fn at_controller(&mut self, from: BrokerId, message: Message) {
        let now = self.now_ms;
        let Some(stand_in) = self.stand_in.as_mut() else {
            return;
        };
        match message {
            Message::Heartbeat {
                incarnation,
                sent_ms,
            } => match stand_in.heartbeat(from, incarnation, sent_ms, now) {
                Ok(Some((state, lease))) => {
                    let answer = Message::Metadata {
                        incarnation,
                        state,
                        lease_until_ms: Some(lease),
                    };
                    self.send(CONTROLLER_NODE, from, answer);
                }
                Ok(None) => {}
                Err(e) => {
                    self.violation.get_or_insert(e);
                }
            },
            Message::ProposeIsr {
                incarnation,
                isr,
                leader_epoch,
                partition_epoch,
            } => match stand_in.propose(from, &isr, leader_epoch, partition_epoch) {
                Ok(state) => {
                    self.report.isr_commits += 1;
                    let answer = Message::Metadata {
                        incarnation,
                        state,
                        lease_until_ms: None,
                    };
                    self.send_after(CONTROLLER_NODE, from, answer, CONTROLLER_COMMIT_DELAY_MS);
                }
                Err(reason) => {
                    self.report.isr_rejections += 1;
                    let answer = Message::IsrRejected {
                        incarnation,
                        partition_epoch,
                        reason,
                    };
                    self.send(CONTROLLER_NODE, from, answer);
                }
            },
            _ => unreachable!("not a message for the controller"),
        }
        self.sync_controller_view();
    }

    /// Controller mode: what the driver does with the partition state from the controller:
    /// a newer epoch is a role change, the same epoch on the leader a committed ISR.
    pub(super) fn apply_metadata(&mut self, id: BrokerId, state: &PartitionState) {
        let Some(live) = self.node(id).live.as_ref() else {
            return;
        };
        let (role, epoch) = (live.replica.role(), live.replica.leader_epoch());
        let Some(leader) = state.leader else {
            return; // Offline: whoever led keeps waiting for its lease to end.
        };
        if state.leader_epoch < epoch {
            return; // Older than what this replica knows.
        }
        let new_epoch = state.leader_epoch > epoch;
        if leader == id {
            if new_epoch || role != Role::Leader {
                self.note_leader(id, state.leader_epoch);
                self.input(
                    id,
                    Input::BecomeLeader {
                        epoch: state.leader_epoch,
                        isr: state.isr.clone(),
                        partition_epoch: state.partition_epoch,
                    },
                );
            } else {
                self.input(
                    id,
                    Input::IsrCommitted {
                        isr: state.isr.clone(),
                        partition_epoch: state.partition_epoch,
                    },
                );
            }
        } else if new_epoch || role != (Role::Follower { leader }) {
            self.input(
                id,
                Input::BecomeFollower {
                    epoch: state.leader_epoch,
                    leader,
                },
            );
        }
    }

    /// Controller mode, at the start of a step: the replicas see the new time first (a lease
    /// is judged by the replica's clock, which the driver keeps current), the stand-in
    /// controller fences silent brokers, and brokers due to heartbeat do.
    pub(super) fn controller_step(&mut self) -> Check {
        let now = self.now_ms;
        for id in 1..=self.config.replicas as BrokerId {
            self.input(id, Input::Tick { now_ms: now });
        }
        let stand_in = self.stand_in.as_mut().expect("controller mode");
        let fenced = stand_in.tick(now)?;
        if !fenced.is_empty() {
            self.trace(|| format!("controller fenced {fenced:?}"));
        }
        self.sync_controller_view();
        for id in 1..=self.config.replicas as BrokerId {
            let node = self.node(id);
            let incarnation = node.incarnation;
            let Some(live) = node.live.as_mut() else {
                continue;
            };
            if live
                .heartbeat_sent_ms
                .is_some_and(|sent| now < sent + HEARTBEAT_INTERVAL_MS)
            {
                continue;
            }
            live.heartbeat_sent_ms = Some(now);
            let heartbeat = Message::Heartbeat {
                incarnation,
                sent_ms: now,
            };
            self.send(id, CONTROLLER_NODE, heartbeat);
        }
        Ok(())
    }
}
