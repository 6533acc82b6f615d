//! The controller voter on shard 0 of each broker in `cluster.controller_voters`: drives the
//! sans-IO `wharf_controller::ControllerNode` (raft-rs) with a clock, persists what each Ready
//! asks through `ControllerStore` over direct I/O (`<data_dir>/controller/`), sends Raft
//! messages to the other voters over their internal listeners, and answers heartbeats and
//! commands (as the leader) or points to the leader.
//!
//! One driver task owns the order of effects: persist, then send, then apply and complete
//! proposals, then advance (the raft-rs Ready protocol). Inputs (a peer's message, a
//! heartbeat, a proposal) step the node synchronously and wake the driver.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use futures_channel::oneshot;
use wharf_controller::decisions::{
    AlterPartitionError, AlterPartitionRequest, CreateTopicError, CreateTopicRequest,
};
use wharf_controller::node::{
    BrokerHeartbeat, BrokerStatus, ControllerConfig, ControllerNode, MetadataDelta as NodeDelta,
    ProposalError, ProposalId, ProposalOutcome, ProposalResult, ProposeError,
};
use wharf_controller::store::ControllerStore;

use super::cluster::{Command, CommandError, MetadataDelta};
use crate::dma_disk::DmaDisk;
use crate::protocol::*;
use crate::server::partition::monotonic_ms;
use crate::server::shard::Shard;

/// Raft messages queued per peer before the oldest are dropped (Raft resends what matters).
const PEER_QUEUE_MAX: usize = 1024;
/// Commands waiting for their commit at once.
const COMMANDS_WAITING_MAX: usize = 4096;
/// After a topic is created, how long the answer waits for the new replicas' brokers to apply
/// it (they report their applied index in heartbeats), so a client can produce at once.
const REPLICAS_APPLY_WAIT_MS: u64 = 2_000;
const REPLICAS_APPLY_POLL_MS: u64 = 20;

pub struct ControllerHost {
    broker_id: u32,
    node: RefCell<ControllerNode>,
    /// Taken out while a persist is in flight (the driver is the only user).
    store: RefCell<Option<ControllerStore<DmaDisk>>>,
    tick_ms: u64,
    wake: RefCell<Vec<oneshot::Sender<()>>>,
    peers: HashMap<u32, Rc<PeerQueue>>,
    waiting: RefCell<HashMap<ProposalId, oneshot::Sender<(u64, ProposalResult)>>>,
    /// The applied index each broker reported in its last heartbeat (leader only).
    applied_by_broker: RefCell<HashMap<u32, u64>>,
    poisoned: RefCell<Option<String>>,
    stopped: Cell<bool>,
}

#[derive(Default)]
struct PeerQueue {
    messages: RefCell<VecDeque<Vec<u8>>>,
    wake: RefCell<Vec<oneshot::Sender<()>>>,
}

impl PeerQueue {
    fn push(&self, message: Vec<u8>) {
        let mut messages = self.messages.borrow_mut();
        if messages.len() >= PEER_QUEUE_MAX {
            messages.pop_front();
        }
        messages.push_back(message);
        drop(messages);
        for wake in self.wake.borrow_mut().drain(..) {
            let _ = wake.send(());
        }
    }

    async fn take(&self) -> Vec<Vec<u8>> {
        loop {
            let taken: Vec<Vec<u8>> = self.messages.borrow_mut().drain(..).collect();
            if !taken.is_empty() {
                return taken;
            }
            let (wake, woken) = oneshot::channel();
            self.wake.borrow_mut().push(wake);
            let _ = woken.await;
        }
    }
}

impl ControllerHost {
    /// Opens the controller's store and starts the driver and the peer senders.
    pub async fn start(shard: &Rc<Shard>) -> Result<Rc<ControllerHost>, String> {
        let config = &shard.shared.config;
        let dir = config.data_dir.join("controller");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let disk = DmaDisk::open(&dir)
            .await
            .map_err(|e| format!("controller store {}: {e}", dir.display()))?;
        let (store, recovered) = ControllerStore::open(disk)
            .await
            .map_err(|e| format!("controller store {}: {e}", dir.display()))?;
        let mut node_config =
            ControllerConfig::new(config.broker_id, config.cluster.controller_voters.clone());
        node_config.tick_ms = config.cluster.controller_tick_ms;
        node_config.election_ticks = config.cluster.controller_election_ticks;
        node_config.broker_session_timeout_ms = config.cluster.broker_session_timeout_ms;
        let node = ControllerNode::new(node_config, recovered, monotonic_ms())
            .map_err(|e| format!("controller: {e}"))?;
        let peers = config
            .cluster
            .controller_voters
            .iter()
            .filter(|v| **v != config.broker_id)
            .map(|v| (*v, Rc::new(PeerQueue::default())))
            .collect();
        let host = Rc::new(ControllerHost {
            broker_id: config.broker_id,
            node: RefCell::new(node),
            store: RefCell::new(Some(store)),
            tick_ms: config.cluster.controller_tick_ms,
            wake: RefCell::new(Vec::new()),
            peers,
            waiting: RefCell::new(HashMap::new()),
            applied_by_broker: RefCell::new(HashMap::new()),
            poisoned: RefCell::new(None),
            stopped: Cell::new(false),
        });
        let driving = Rc::clone(&host);
        let stop = shard.stop_signal();
        glommio::spawn_local_into(
            async move {
                futures_lite::future::or(driving.drive(), stop).await;
                driving.stopped.set(true);
            },
            shard.queues.replication,
        )
        .map_err(|e| format!("spawn: {e}"))?
        .detach();
        for (&peer, queue) in &host.peers {
            let sending = Rc::clone(shard);
            let queue = Rc::clone(queue);
            let from = host.broker_id;
            let tick_ms = host.tick_ms;
            glommio::spawn_local_into(
                async move { sending.send_raft_loop(peer, from, queue, tick_ms).await },
                shard.queues.replication,
            )
            .map_err(|e| format!("spawn: {e}"))?
            .detach();
        }
        tracing::info!(
            broker = host.broker_id,
            voters = ?config.cluster.controller_voters,
            "controller voter started"
        );
        Ok(host)
    }

    pub fn leader_id(&self) -> Option<u32> {
        self.node.borrow().leader_id()
    }

    /// Controlled shutdown of the active controller's broker: hands Raft leadership to another
    /// voter and waits (bounded) until it took over.
    pub async fn step_down(&self, timeout_ms: u64) {
        let target = self.node.borrow_mut().transfer_leadership();
        let Some(target) = target else {
            return;
        };
        tracing::info!(
            to = target,
            "controlled shutdown: handing controller leadership over"
        );
        self.kick();
        for _ in 0..timeout_ms / self.tick_ms.max(1) {
            if self.leader_id().is_some_and(|l| l != self.broker_id) {
                return;
            }
            glommio::timer::sleep(Duration::from_millis(self.tick_ms)).await;
            self.kick();
        }
        tracing::warn!("the controller leadership did not move in time; stopping anyway");
    }

    /// (term, commit index) for `wharf cluster status`.
    pub fn raft_position(&self) -> (u64, u64) {
        let node = self.node.borrow();
        (node.term(), node.commit_index())
    }

    fn kick(&self) {
        for wake in self.wake.borrow_mut().drain(..) {
            let _ = wake.send(());
        }
    }

    /// The driver: ticks the node and carries out every Ready, in order.
    async fn drive(self: &Rc<Self>) {
        let mut last_tick_ms = monotonic_ms();
        loop {
            let (wake, woken) = oneshot::channel();
            self.wake.borrow_mut().push(wake);
            let _ = glommio::timer::timeout(Duration::from_millis(self.tick_ms), async {
                let _ = woken.await;
                Ok(())
            })
            .await;
            let now = monotonic_ms();
            if now >= last_tick_ms + self.tick_ms {
                last_tick_ms = now;
                self.node.borrow_mut().tick(now);
            }
            if let Err(error) = self.process_ready().await {
                // An I/O error poisons the store: this voter stops; the others keep a quorum.
                tracing::error!(%error, "controller store failed; this controller voter stops");
                *self.poisoned.borrow_mut() = Some(error);
                return;
            }
        }
    }

    async fn process_ready(&self) -> Result<(), String> {
        // Bounded: each round consumes one Ready; a node keeps few ready in a row.
        for _ in 0..64 {
            let ready = self.node.borrow_mut().ready();
            let Some(ready) = ready else {
                return Ok(());
            };
            let token = ready.token();
            if !ready.persist.is_empty() {
                let mut store = self
                    .store
                    .borrow_mut()
                    .take()
                    .ok_or("controller store in use")?;
                let persisted = store.persist(&ready.persist).await;
                *self.store.borrow_mut() = Some(store);
                persisted.map_err(|e| e.to_string())?;
            }
            for (to, message) in ready.messages {
                if let Some(queue) = self.peers.get(&to) {
                    queue.push(message);
                }
            }
            let applied = self.node.borrow().applied_index();
            for (id, outcome) in ready.completed {
                if let Some(waiter) = self.waiting.borrow_mut().remove(&id) {
                    let _ = waiter.send((applied, outcome));
                }
            }
            self.node.borrow_mut().advance(token);
        }
        Ok(())
    }

    /// A broker's heartbeat (leader only). The answer carries the metadata the broker lacks;
    /// `BrokerFenced` tells a fenced (or superseded) incarnation to register anew.
    pub fn heartbeat(&self, request: &BrokerHeartbeatRequest) -> BrokerHeartbeatResponse {
        let refused =
            |error: ErrorCode, message: String, leader_hint: Option<u32>| BrokerHeartbeatResponse {
                error: error as u16,
                message,
                leader_hint,
                delta_json: Vec::new(),
                shutdown_ready: false,
            };
        if let Some(error) = self.poisoned.borrow().as_ref() {
            return refused(
                ErrorCode::NotController,
                format!("this controller voter stopped: {error}"),
                None,
            );
        }
        let beat = BrokerHeartbeat {
            id: request.broker_id,
            incarnation: request.incarnation,
            client_address: request.client_address.clone(),
            internal_address: request.internal_address.clone(),
            applied_index: request.applied_index,
        };
        let outcome = self.node.borrow_mut().heartbeat(&beat, monotonic_ms());
        self.kick();
        let reply = match outcome {
            Ok(reply) => reply,
            Err(not) => {
                let leader_hint = not.leader_hint.filter(|l| *l != self.broker_id);
                return refused(
                    ErrorCode::NotController,
                    format!("broker {} is not the controller leader", self.broker_id),
                    leader_hint,
                );
            }
        };
        self.applied_by_broker
            .borrow_mut()
            .insert(request.broker_id, request.applied_index);
        let (error, message) = match reply.status {
            BrokerStatus::Active | BrokerStatus::ShuttingDown => (ErrorCode::None, String::new()),
            // Not a live session yet: no lease until the registration commits.
            BrokerStatus::Registering => (
                ErrorCode::BrokerUnavailable,
                "registering this incarnation; heartbeat again".to_string(),
            ),
            BrokerStatus::Fenced => (
                ErrorCode::BrokerFenced,
                format!(
                    "broker {} incarnation {} is fenced; register a new incarnation",
                    request.broker_id, request.incarnation
                ),
            ),
        };
        let delta = match reply.metadata {
            NodeDelta::Records(records) if records.is_empty() => None,
            NodeDelta::Records(records) if request.applied_index > 0 => {
                Some(MetadataDelta::Records(records))
            }
            // A broker that starts applies one whole image, never half a history.
            NodeDelta::Records(_) => {
                Some(MetadataDelta::Snapshot(self.node.borrow().image().clone()))
            }
            NodeDelta::Snapshot { image, .. } => Some(MetadataDelta::Snapshot(image)),
        };
        BrokerHeartbeatResponse {
            error: error as u16,
            message,
            leader_hint: Some(self.broker_id),
            delta_json: delta
                .map(|d| serde_json::to_vec(&d).unwrap_or_default())
                .unwrap_or_default(),
            shutdown_ready: false,
        }
    }

    /// A command (leader only): proposes it and answers once committed and applied here.
    pub async fn command(&self, command: Command, timeout_ms: u64) -> ControllerCommandResponse {
        if self.waiting.borrow().len() >= COMMANDS_WAITING_MAX {
            return command_response(Err(CommandError(
                ErrorCode::LimitReached,
                format!("{COMMANDS_WAITING_MAX} controller commands are waiting"),
            )));
        }
        let proposed = {
            let mut node = self.node.borrow_mut();
            match &command {
                Command::CreateTopic {
                    name,
                    partitions,
                    replication_factor,
                    min_insync_replicas,
                    unclean_leader_election,
                    config,
                } => node.propose_create_topic(CreateTopicRequest {
                    name: name.clone(),
                    partitions: *partitions,
                    replication_factor: *replication_factor,
                    min_insync_replicas: *min_insync_replicas,
                    unclean_leader_election: *unclean_leader_election,
                    config: config.clone(),
                }),
                Command::DeleteTopic { name } => node.propose_delete_topic(name.clone()),
                Command::AlterPartition {
                    topic,
                    partition,
                    leader,
                    leader_epoch,
                    partition_epoch,
                    new_isr,
                } => node.propose_alter_partition(AlterPartitionRequest {
                    topic: topic.clone(),
                    partition: *partition,
                    leader: *leader,
                    leader_epoch: *leader_epoch,
                    partition_epoch: *partition_epoch,
                    new_isr: new_isr.clone(),
                }),
                Command::ControlledShutdown { id, incarnation } => {
                    node.propose_controlled_shutdown(*id, *incarnation)
                }
            }
        };
        let id = match proposed {
            Ok(id) => id,
            Err(ProposeError::NotController { leader_hint }) => {
                return ControllerCommandResponse {
                    error: ErrorCode::NotController as u16,
                    message: format!("broker {} is not the controller leader", self.broker_id),
                    leader_hint: leader_hint.filter(|l| *l != self.broker_id),
                    committed_index: 0,
                    still_leading: false,
                };
            }
            Err(ProposeError::QueueFull) => {
                return command_response(Err(CommandError(
                    ErrorCode::Backpressure,
                    "the controller's request queue is full".to_string(),
                )))
            }
        };
        let (done, outcome) = oneshot::channel();
        self.waiting.borrow_mut().insert(id, done);
        self.kick();
        let result = futures_lite::future::or(async { outcome.await.ok() }, async {
            glommio::timer::sleep(Duration::from_millis(timeout_ms)).await;
            None
        })
        .await;
        let Some((index, outcome)) = result else {
            self.waiting.borrow_mut().remove(&id);
            return command_response(Err(CommandError(
                ErrorCode::RequestTimeout,
                format!("the controller did not commit the command within {timeout_ms} ms"),
            )));
        };
        match outcome {
            Ok(outcome) => {
                if let Command::CreateTopic { name, .. } = &command {
                    self.wait_replicas_applied(name, index).await;
                }
                let mut response = command_response(Ok(index));
                response.still_leading = matches!(
                    outcome,
                    ProposalOutcome::ShutdownProgress {
                        still_leading: true
                    }
                );
                response
            }
            Err(error) => command_response(Err(proposal_error(error))),
        }
    }

    /// After a create: waits (bounded) until the live brokers holding the topic's replicas
    /// reported applying it, so their partitions are open when the client produces.
    async fn wait_replicas_applied(&self, topic: &str, index: u64) {
        let brokers: Vec<u32> = {
            let node = self.node.borrow();
            let image = node.image();
            let mut brokers: Vec<u32> = image
                .topic(topic)
                .map(|t| {
                    t.partitions
                        .iter()
                        .flat_map(|p| p.replicas.clone())
                        .collect()
                })
                .unwrap_or_default();
            brokers.sort_unstable();
            brokers.dedup();
            brokers.retain(|b| image.is_live(*b) && *b != self.broker_id);
            brokers
        };
        for _ in 0..REPLICAS_APPLY_WAIT_MS / REPLICAS_APPLY_POLL_MS {
            let all_applied = {
                let applied = self.applied_by_broker.borrow();
                brokers
                    .iter()
                    .all(|b| applied.get(b).is_some_and(|i| *i >= index))
            };
            if all_applied {
                return;
            }
            glommio::timer::sleep(Duration::from_millis(REPLICAS_APPLY_POLL_MS)).await;
        }
        tracing::warn!(
            topic,
            index,
            "created; some replicas' brokers have not applied it yet"
        );
    }

    /// Raft messages from another voter.
    pub fn step(&self, request: &ControllerRaftRequest) -> ControllerRaftResponse {
        let mut failure = None;
        {
            let mut node = self.node.borrow_mut();
            for message in &request.messages {
                if let Err(error) = node.step(message) {
                    failure = Some(error.to_string());
                }
            }
        }
        self.kick();
        match failure {
            None => ControllerRaftResponse {
                error: 0,
                message: String::new(),
            },
            Some(message) => ControllerRaftResponse {
                error: ErrorCode::InvalidRequest as u16,
                message,
            },
        }
    }
}

/// The wire code for a controller refusal.
fn proposal_error(error: ProposalError) -> CommandError {
    let code = match &error {
        ProposalError::NotController { .. } | ProposalError::LeadershipLost { .. } => {
            ErrorCode::NotController
        }
        ProposalError::CreateTopic(CreateTopicError::TopicExists(_)) => {
            ErrorCode::TopicAlreadyExists
        }
        ProposalError::CreateTopic(CreateTopicError::NotEnoughBrokers { .. }) => {
            ErrorCode::InvalidReplicationFactor
        }
        ProposalError::CreateTopic(CreateTopicError::TooManyTopics) => ErrorCode::LimitReached,
        ProposalError::CreateTopic(_) => ErrorCode::InvalidRequest,
        ProposalError::DeleteTopic(_) => ErrorCode::UnknownTopic,
        ProposalError::AlterPartition(
            AlterPartitionError::FencedLeaderEpoch { .. } | AlterPartitionError::NotLeader { .. },
        ) => ErrorCode::FencedLeaderEpoch,
        ProposalError::AlterPartition(AlterPartitionError::InvalidPartitionEpoch { .. }) => {
            ErrorCode::InvalidPartitionEpoch
        }
        ProposalError::AlterPartition(AlterPartitionError::IneligibleReplica(_)) => {
            ErrorCode::IneligibleReplica
        }
        ProposalError::AlterPartition(AlterPartitionError::UnknownPartition) => {
            ErrorCode::UnknownPartition
        }
        ProposalError::AlterPartition(_) => ErrorCode::InvalidRequest,
        ProposalError::Shutdown(_) => ErrorCode::BrokerFenced,
        ProposalError::Register(_) | ProposalError::Fence(_) => ErrorCode::Unknown,
    };
    CommandError(code, error.to_string())
}

fn command_response(result: Result<u64, CommandError>) -> ControllerCommandResponse {
    match result {
        Ok(index) => ControllerCommandResponse {
            error: 0,
            message: String::new(),
            leader_hint: None,
            committed_index: index,
            still_leading: false,
        },
        Err(CommandError(code, message)) => ControllerCommandResponse {
            error: code as u16,
            message,
            leader_hint: None,
            committed_index: 0,
            still_leading: false,
        },
    }
}

impl Shard {
    fn host(&self) -> Option<Rc<ControllerHost>> {
        self.cluster.borrow().as_ref().and_then(|c| c.host.clone())
    }

    /// `ControllerRaft` (shard 0).
    pub(crate) fn controller_raft(&self, request: ControllerRaftRequest) -> ControllerRaftResponse {
        match self.host() {
            Some(host) => host.step(&request),
            None => ControllerRaftResponse {
                error: ErrorCode::NotController as u16,
                message: "this broker is not a controller voter".to_string(),
            },
        }
    }

    /// `BrokerHeartbeat` (shard 0).
    pub(crate) fn broker_heartbeat(
        &self,
        request: BrokerHeartbeatRequest,
    ) -> BrokerHeartbeatResponse {
        match self.host() {
            Some(host) => host.heartbeat(&request),
            None => BrokerHeartbeatResponse {
                error: ErrorCode::NotController as u16,
                message: "this broker is not a controller voter".to_string(),
                leader_hint: None,
                delta_json: Vec::new(),
                shutdown_ready: false,
            },
        }
    }

    /// `ControllerCommand` (shard 0).
    pub(crate) async fn controller_command(
        &self,
        request: ControllerCommandRequest,
    ) -> ControllerCommandResponse {
        let Some(host) = self.host() else {
            return ControllerCommandResponse {
                error: ErrorCode::NotController as u16,
                message: "this broker is not a controller voter".to_string(),
                leader_hint: None,
                committed_index: 0,
                still_leading: false,
            };
        };
        let command: Command = match serde_json::from_slice(&request.command_json) {
            Ok(command) => command,
            Err(error) => {
                return command_response(Err(CommandError(
                    ErrorCode::InvalidRequest,
                    format!("controller command: {error}"),
                )))
            }
        };
        let timeout_ms = self.shared.config.cluster.broker_call_timeout_ms;
        host.command(command, timeout_ms).await
    }

    /// Sends queued Raft messages to one voter, batching what accumulated meanwhile.
    async fn send_raft_loop(
        self: Rc<Self>,
        peer: u32,
        from: u32,
        queue: Rc<PeerQueue>,
        tick_ms: u64,
    ) {
        while !self.stopping.get() {
            let messages = futures_lite::future::or(async { Some(queue.take().await) }, async {
                self.stop_signal().await;
                None
            })
            .await;
            let Some(messages) = messages else {
                return;
            };
            let Some(cluster) = self.cluster.borrow().clone() else {
                return;
            };
            let request = ControllerRaftRequest { from, messages };
            if let Err(error) = cluster
                .call(peer, ApiKey::ControllerRaft, &request, tick_ms * 4)
                .await
            {
                // Raft retransmits: dropping this batch only delays the peer.
                tracing::debug!(peer, %error, "cannot send Raft messages");
                glommio::timer::sleep(Duration::from_millis(tick_ms)).await;
            }
        }
    }
}
