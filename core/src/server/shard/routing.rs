//! Routing between shards: which shard owns a partition, running a `ShardRequest` there
//! (directly or over the channel mesh), and serving the requests other shards send.

use std::rc::Rc;

use futures_channel::oneshot;
use futures_util::FutureExt;
use wharf_storage::Offset;

use super::{Envelope, OpenFailure, RemoteAdmitted, Shard, ShardReply, ShardRequest};
use crate::protocol::*;
use crate::server::partition::PartitionError;

impl Shard {
    /// The shard owning `topic`/`partition`, by this shard's view of the metadata.
    pub(crate) fn owner(&self, topic: &str, partition: u32) -> Result<u32, PartitionError> {
        let metadata = self.metadata.borrow();
        let Some(meta) = metadata.topics.get(topic) else {
            return Err(PartitionError::new(
                ErrorCode::UnknownTopic,
                format!("topic {topic:?} does not exist"),
            ));
        };
        match meta.partitions.get(partition as usize) {
            Some(p) => Ok(p.shard),
            None => Err(PartitionError::new(
                ErrorCode::UnknownPartition,
                format!(
                    "topic {topic:?} has partitions 0..{}, not {partition}",
                    meta.partitions.len()
                ),
            )),
        }
    }

    /// Runs `request` on `shard`: directly when it is this one, else over the mesh.
    pub(crate) async fn to_shard(
        self: &Rc<Self>,
        shard: u32,
        request: ShardRequest,
    ) -> Option<ShardReply> {
        if shard == self.id {
            // Boxed: handlers forward to other shards (recursion through this function).
            return Some(Rc::clone(self).handle(request).boxed_local().await);
        }
        let (reply, replied) = oneshot::channel();
        let peer = self.peer_of_shard[shard as usize];
        if self
            .senders
            .send_to(peer, Envelope { request, reply })
            .await
            .is_err()
        {
            return None;
        }
        replied.await.ok()
    }

    pub(super) async fn dispatch_envelope(self: &Rc<Self>, envelope: Envelope) {
        let Envelope { request, reply } = envelope;
        // Produce is admitted in arrival order before the next message is read (ordering per
        // partition); everything else may wait, so it runs on its own task.
        if matches!(request, ShardRequest::Produce { .. }) {
            let _ = reply.send(Rc::clone(self).handle(request).await);
            return;
        }
        let shard = Rc::clone(self);
        let spawned = glommio::spawn_local_into(
            async move {
                let _ = reply.send(shard.handle(request).await);
            },
            self.queues.client,
        );
        if let Ok(task) = spawned {
            task.detach();
        }
    }

    async fn handle(self: Rc<Self>, request: ShardRequest) -> ShardReply {
        match request {
            ShardRequest::Produce {
                topic,
                partition,
                acks,
                timeout_ms,
                mut batches,
            } => {
                let Some(local) = self.local_partition(&topic, partition) else {
                    return ShardReply::Admitted(Err(self.missing(&topic, partition)));
                };
                ShardReply::Admitted(
                    local
                        .produce(&mut batches, acks, timeout_ms)
                        .await
                        .map(|a| RemoteAdmitted {
                            base_offset: a.base_offset.0,
                            last_offset: a.last_offset.0,
                            leader_epoch: a.leader_epoch.0,
                            completion: a.completion,
                        }),
                )
            }
            ShardRequest::Fetch(ask) => {
                let Some(local) = self.local_partition(&ask.topic, ask.partition) else {
                    return ShardReply::Fetched(Err(self.missing(&ask.topic, ask.partition)));
                };
                ShardReply::Fetched(self.serve_read(&local, &ask).await.map(|served| {
                    served.map(|data| {
                        let mut bytes = FrameBuf::with_capacity(data.bytes);
                        bytes.extend_from_slice(data.slice());
                        bytes
                    })
                }))
            }
            ShardRequest::Readers { topic, partition } => {
                ShardReply::Readers(self.partition_readers(&topic, partition))
            }
            ShardRequest::WaitForData {
                topic,
                partition,
                offset,
                deadline,
            } => {
                if let Some(local) = self.local_partition(&topic, partition) {
                    futures_lite::future::or(
                        local.wait_for_data(Offset(offset), deadline),
                        self.stop_signal(),
                    )
                    .await;
                }
                ShardReply::Woken
            }
            ShardRequest::ListOffset {
                topic,
                partition,
                spec,
            } => {
                let Some(local) = self.local_partition(&topic, partition) else {
                    return ShardReply::Offset(Err(self.missing(&topic, partition)));
                };
                ShardReply::Offset(local.list_offset(spec).await.map(|o| o.0))
            }
            ShardRequest::Describe { topic, partition } => {
                let Some(local) = self.local_partition(&topic, partition) else {
                    return ShardReply::Described(Err(self.missing(&topic, partition)));
                };
                let mut description = local.describe();
                description.shard = self.id;
                ShardReply::Described(Ok(description))
            }
            ShardRequest::CreateTopic(request) => {
                ShardReply::Topic(self.create_topic(request).await)
            }
            ShardRequest::DeleteTopic(name) => ShardReply::Topic(self.delete_topic(name).await),
            ShardRequest::ApplyTopic(request) => ShardReply::Topic(self.apply_topic(request).await),
            ShardRequest::OpenPartitions {
                topic,
                meta,
                partitions,
            } => ShardReply::Done(
                self.open_partitions(&topic, &meta, &partitions, OpenFailure::Fail)
                    .await,
            ),
            ShardRequest::ClosePartitions { topic } => {
                self.close_partitions(&topic).await;
                ShardReply::Done(Ok(()))
            }
            ShardRequest::Metadata(metadata) => {
                self.install_metadata(metadata);
                ShardReply::Done(Ok(()))
            }
            ShardRequest::PartitionStates(states) => {
                self.apply_partition_states(states);
                ShardReply::Done(Ok(()))
            }
            ShardRequest::Lease { until_ms } => {
                self.renew_leases(until_ms);
                ShardReply::Done(Ok(()))
            }
            ShardRequest::AlterPartitions(proposals) => {
                self.send_isr_proposals(proposals).await;
                ShardReply::Done(Ok(()))
            }
            ShardRequest::ControllerRaft(request) => {
                ShardReply::ControllerRaft(self.controller_raft(request))
            }
            ShardRequest::BrokerHeartbeat(request) => {
                ShardReply::BrokerHeartbeat(self.broker_heartbeat(request))
            }
            ShardRequest::ControllerCommand(request) => {
                ShardReply::ControllerCommand(self.controller_command(request).await)
            }
            ShardRequest::ClusterStatus => ShardReply::ClusterStatus(self.cluster_status()),
            ShardRequest::Group { partition, op } => {
                ShardReply::Group(self.coordinate(partition, op).await)
            }
            ShardRequest::Queue { partition, op } => {
                ShardReply::Queue(self.coordinate_queue(partition, op).await)
            }
            ShardRequest::IsrRejected {
                topic,
                partition,
                partition_epoch,
                reason,
            } => {
                self.reject_isr_proposal(&topic, partition, partition_epoch, reason);
                ShardReply::Done(Ok(()))
            }
        }
    }

    pub(crate) fn missing(&self, topic: &str, partition: u32) -> PartitionError {
        if let Some(error) = self
            .failed_opens
            .borrow()
            .get(&(topic.to_string(), partition))
        {
            return PartitionError::new(
                ErrorCode::StorageError,
                format!("{topic}/{partition} could not be opened at start-up: {error}"),
            );
        }
        match self.owner(topic, partition) {
            Err(error) => error,
            Ok(_) => PartitionError::new(
                ErrorCode::PartitionUnavailable,
                format!("{topic}/{partition} is not open on shard {}", self.id),
            ),
        }
    }
}
