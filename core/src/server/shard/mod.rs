//! One shard: its partitions, listeners, the channel mesh to the other shards, and the request
//! handlers. Requests for partitions owned by another shard are forwarded over the mesh; the
//! Wharf client avoids that hop by connecting to the owner's direct port (metadata names it).
//!
//! A request's path through the shard, one module per step:
//! 1. `runtime`: start-up and shutdown, the listeners and their connection slots, the tick
//!    loops, opening the partitions the shard owns.
//! 2. `super::connection`: reads frames and hands each to `Shard::admit` in arrival order.
//! 3. `super::dispatch`: the access check, the body's decoding and the handler by API key, and
//!    the response helpers.
//! 4. `super::handlers`: one module per API family (produce, fetch, offsets, metadata, the
//!    inter-broker replica fetch and peer handshake).
//! 5. `routing`: which shard owns a partition, and the requests shards send each other.
//! 6. `super::control`: everything that changes or applies the cluster metadata.

mod routing;
mod runtime;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use futures_channel::oneshot;
use glommio::channels::channel_mesh::Senders;
use glommio::sync::{Gate, Semaphore};
use glommio::TaskQueueHandle;

use super::connection::RequestBudget;
use super::control::Cluster;
use super::metrics::ShardMetrics;
use super::partition::{
    IsrProposal, IsrProposals, Partition, PartitionError, PartitionState, ReplicationSettings,
};
use super::Shared;
use crate::metadata::{BrokerMetadata, TopicMeta};
use crate::protocol::*;
use wharf_replication::{Ack, IsrRejection};

pub(crate) use runtime::{run, OpenFailure};

/// A request from another shard.
pub enum ShardRequest {
    Produce {
        topic: String,
        partition: u32,
        acks: Acks,
        timeout_ms: u64,
        batches: FrameBuf,
    },
    Fetch(crate::server::read_replicas::ReadAsk),
    Readers {
        topic: String,
        partition: u32,
    },
    WaitForData {
        topic: String,
        partition: u32,
        offset: u64,
        deadline: Instant,
    },
    ListOffset {
        topic: String,
        partition: u32,
        spec: OffsetSpec,
    },
    Describe {
        topic: String,
        partition: u32,
    },
    CreateTopic(CreateTopicRequest),
    DeleteTopic(String),
    ApplyTopic(ApplyTopicRequest),
    OpenPartitions {
        topic: String,
        meta: TopicMeta,
        partitions: Vec<u32>,
    },
    ClosePartitions {
        topic: String,
    },
    Metadata(Arc<BrokerMetadata>),
    /// Controller mode: the controller's leader, epoch and ISR of partitions this shard owns.
    PartitionStates(Vec<(String, u32, PartitionState)>),
    /// Controller mode: this broker's session lease was renewed up to `until_ms`.
    Lease {
        until_ms: u64,
    },
    /// Controller mode, to shard 0: ISR proposals of another shard's leaders.
    AlterPartitions(Vec<IsrProposal>),
    /// Controller APIs arrive on any shard's internal listener; the controller and the
    /// broker's controller client live on shard 0.
    ControllerRaft(ControllerRaftRequest),
    BrokerHeartbeat(BrokerHeartbeatRequest),
    ControllerCommand(ControllerCommandRequest),
    ClusterStatus,
    /// A consumer-group request for the coordinator of offsets partition `partition`, which
    /// this shard owns.
    Group {
        partition: u32,
        op: crate::server::groups::GroupOp,
    },
    /// A queue request for the coordinator of state partition `partition`, which this shard
    /// owns.
    Queue {
        partition: u32,
        op: crate::server::queues::QueueOp,
    },
    /// Controller mode: the controller refused a leader's ISR proposal.
    IsrRejected {
        topic: String,
        partition: u32,
        partition_epoch: u64,
        reason: IsrRejection,
    },
}

pub struct RemoteAdmitted {
    pub base_offset: u64,
    pub last_offset: u64,
    pub leader_epoch: u32,
    pub completion: Option<oneshot::Receiver<Result<Ack, PartitionError>>>,
}

pub enum ShardReply {
    Admitted(Result<RemoteAdmitted, PartitionError>),
    Fetched(Result<crate::server::read_replicas::Served<FrameBuf>, PartitionError>),
    Readers(Option<crate::protocol::PartitionReaders>),
    Woken,
    Offset(Result<u64, PartitionError>),
    Described(Result<PartitionDescription, PartitionError>),
    Topic(TopicResult),
    Done(Result<(), String>),
    ControllerRaft(ControllerRaftResponse),
    BrokerHeartbeat(BrokerHeartbeatResponse),
    ControllerCommand(ControllerCommandResponse),
    ClusterStatus(ClusterStatusResponse),
    Group(crate::server::groups::GroupAnswer),
    Queue(crate::server::queues::QueueAnswer),
}

pub struct Envelope {
    request: ShardRequest,
    reply: oneshot::Sender<ShardReply>,
}

pub struct Queues {
    pub client: TaskQueueHandle,
    pub replication: TaskQueueHandle,
    pub background: TaskQueueHandle,
    // The controller voter and the broker's heartbeat run in `replication`, not in a
    // latency-sensitive queue of their own: heartbeats *arrive* through connection tasks in
    // `client`, so a voter whose fence timer ran ahead of a saturated `client` queue fenced
    // every broker at the end of each saturated run (tried and reverted, CI 2026-12-05).
}

pub struct Shard {
    pub id: u32,
    pub shared: Arc<Shared>,
    pub(super) metadata: RefCell<Arc<BrokerMetadata>>,
    pub(super) partitions: RefCell<HashMap<String, Vec<Option<Rc<Partition>>>>>,
    senders: Senders<Envelope>,
    peer_of_shard: Vec<usize>,
    pub queues: Queues,
    pub metrics: ShardMetrics,
    /// Serializes metadata changes (on shard 0).
    pub(super) admin_lock: Semaphore,
    pub(super) stopping: Cell<bool>,
    stop_waiters: RefCell<Vec<oneshot::Sender<()>>>,
    pub connections: Gate,
    /// Open connections of this shard: all, and per source address (client listeners).
    open_connections: Cell<usize>,
    connections_by_address: RefCell<HashMap<std::net::IpAddr, usize>>,
    /// Request bytes being read or admitted (`request_bytes_max_per_shard`).
    pub request_budget: RequestBudget,
    /// Partitions that failed to open at start-up, and why (they answer `storage_error`).
    failed_opens: RefCell<HashMap<(String, u32), String>>,
    /// Each broker's internal listener (`cluster.brokers[].internal_address`).
    internal_addresses: Rc<HashMap<u32, String>>,
    /// Controller mode: this shard's leaders' ISR proposals, on their way to the controller.
    pub(super) isr_proposals: Rc<IsrProposals>,
    /// Controller mode, shard 0: the broker's side of the controller protocol (and the
    /// controller voter, on voters).
    pub(super) cluster: RefCell<Option<Rc<Cluster>>>,
    /// Consumer-group coordinators of the offsets partitions this shard owns.
    pub(crate) coordinator: crate::server::groups::Coordinator,
    /// Queue coordinators of the queue-state partitions this shard owns.
    pub(crate) queue_coordinator: crate::server::queues::QueueCoordinator,
    /// This shard's load, as the read-replica selector of the partitions it leads sees it.
    pub(crate) load: Rc<crate::server::read_replicas::ShardLoad>,
}

impl Shard {
    /// Every partition this shard has open (a snapshot: no borrow is held afterwards).
    pub(super) fn local_partitions(&self) -> Vec<Rc<Partition>> {
        self.partitions
            .borrow()
            .values()
            .flatten()
            .flatten()
            .cloned()
            .collect()
    }

    pub(super) fn local_partition(&self, topic: &str, partition: u32) -> Option<Rc<Partition>> {
        self.partitions
            .borrow()
            .get(topic)
            .and_then(|slots| slots.get(partition as usize).cloned().flatten())
    }

    /// What this broker presents on other brokers' internal listeners.
    pub(super) fn peer_credentials(&self) -> Option<crate::peer_auth::PeerCredentials> {
        self.shared
            .secret
            .clone()
            .map(|secret| crate::peer_auth::PeerCredentials {
                broker_id: self.shared.config.broker_id,
                secret,
            })
    }

    pub(super) fn replication_settings(&self) -> ReplicationSettings {
        let config = &self.shared.config;
        ReplicationSettings {
            broker_id: config.broker_id,
            internal_addresses: Rc::clone(&self.internal_addresses),
            peer: self.peer_credentials(),
            replica_lag_max_ms: config.cluster.replica_lag_max_ms,
            fetch_wait_ms: config.cluster.replica_fetch_wait_ms,
            fetch_bytes_max: config
                .cluster
                .replica_fetch_bytes_max
                .min(config.fetch_bytes_max),
            fetch_backoff_ms: config.cluster.replica_fetch_backoff_ms,
            frame_bytes_max: config.frame_bytes_max,
            queue: self.queues.replication,
            controller_mode: self.controller_mode(),
            isr_proposals: Rc::clone(&self.isr_proposals),
        }
    }

    /// Whether a Raft controller runs this cluster (`cluster.controller_voters`).
    pub(super) fn controller_mode(&self) -> bool {
        !self.shared.config.cluster.controller_voters.is_empty()
    }
}
