//! The simulator's controller mode (`SimConfig::isr_via_controller`): the shipped controller
//! (`wharf_controller`: three `ControllerNode` voters over raft-rs, each with its
//! `ControllerStore` on a `MemDisk`) hosted by the three simulated brokers, as production does
//! with `controller_voters = [1, 2, 3]`, and each broker's client side of it, modelled on
//! `core/src/server/control/cluster.rs`:
//!
//! - a voter is driven as the crate docs say (inputs, `ready`, persist, send, `advance`); raft
//!   messages travel on the simulated network between the hosts (cut links, drops, delays,
//!   duplicates), with extra drops of their own; a broker crash crashes its voter (its store's
//!   unsynced writes are lost or torn) and a restart recovers it from the store;
//! - every broker heartbeats the voter it believes leads (following `NotController` hints,
//!   trying the next voter after an unanswered heartbeat), registers each incarnation, applies
//!   the metadata delta to its own `ClusterImage`, hands a changed partition state to its replica
//!   (`BecomeLeader` / `BecomeFollower` / `IsrCommitted`, as `Partition::apply_state`), and
//!   renews the lease to `sent + session timeout - heartbeat interval`; a `Fenced` answer makes
//!   it register again with incarnation + 1;
//! - replica ISR proposals go to the controller leader as `propose_alter_partition`; a refusal
//!   comes back as `IsrRejected` with the reason mapped as `core` maps it (leadership lost, no
//!   controller and no answer in time: `NotApplied`);
//! - the topic is created with `propose_create_topic` once three brokers registered.
//!
//! Faults on top of the simulator's: the broker hosting the controller leader crashes; a broker
//! loses its heartbeats for a while (isolated from the controller, not from its peers), so its
//! lease lapses and the controller fences it; raft messages are dropped.
//!
//! Invariants: at most one raft leader per term; a committed entry never changes; one leader per
//! partition leader epoch in the committed records (and, in `sim.rs`, among the replicas); when a
//! fence of a broker's incarnation commits, the lease of that incarnation has ended, and it is
//! never renewed past the fence afterwards; a broker acknowledges nothing that waits for
//! followers after its incarnation's fence committed or after its lease ended.

use std::collections::BTreeMap;

use futures_lite::future::block_on;
use rand::Rng;
use wharf_controller::decisions::{AlterPartitionError, AlterPartitionRequest, CreateTopicRequest};
use wharf_controller::node::{
    BrokerHeartbeat, BrokerStatus, ControllerConfig, ControllerNode, HeartbeatReply, MetadataDelta,
    NotController, ProposalError, ProposalId, ProposalOutcome, ProposalResult,
};
use wharf_controller::records::{ClusterImage, PartitionRecord, Record};
use wharf_controller::store::ControllerStore;
use wharf_replication::driver::{self, PartitionState, StateApplied};
use wharf_replication::{BrokerId, Input, IsrRejection, LogState, Replica, Role};
use wharf_storage::mem_disk::{CrashMode, MemDisk};
use wharf_storage::Epoch;

use super::{Check, Message, Sim, SimHost};

/// The simulated topic (one partition).
pub const TOPIC: &str = "orders";
/// How often a live broker heartbeats (simulated ms).
pub const HEARTBEAT_INTERVAL_MS: u64 = 10;
/// The controller fences a broker not heard from for this long.
pub const SESSION_TIMEOUT_MS: u64 = 120;
/// Raft timing: a tick every 4 ms, elections after 10 ticks (staggered per voter), raft
/// heartbeats every 2 ticks.
const TICK_MS: u64 = 4;
const ELECTION_TICKS: usize = 10;
const HEARTBEAT_TICKS: usize = 2;
/// Small, so snapshots, log compaction and snapshot deltas to brokers happen in a run.
const SNAPSHOT_EVERY_ENTRIES: u64 = 40;
/// Raft messages dropped on top of the network's own drops.
const RAFT_DROP_PERCENT: u32 = 5;
const READY_ROUNDS_MAX: usize = 64;
/// A broker gives up on an unanswered ISR proposal after this long (`NotApplied`, as `core`).
const PROPOSAL_TIMEOUT_MS: u64 = SESSION_TIMEOUT_MS;
/// The topic creation is asked again after this long without it committing.
const CREATE_RETRY_MS: u64 = 100;

const _: () = assert!(HEARTBEAT_INTERVAL_MS < SESSION_TIMEOUT_MS);

fn voter_config(id: BrokerId, voters: &[BrokerId]) -> ControllerConfig {
    ControllerConfig {
        tick_ms: TICK_MS,
        election_ticks: ELECTION_TICKS,
        heartbeat_ticks: HEARTBEAT_TICKS,
        broker_session_timeout_ms: SESSION_TIMEOUT_MS,
        snapshot_every_entries: SNAPSHOT_EVERY_ENTRIES,
        ..ControllerConfig::new(id, voters.to_vec())
    }
}

struct Voter {
    disk: MemDisk,
    running: Option<(ControllerNode, ControllerStore<MemDisk>)>,
}

/// A broker's controller client (shard 0 of the broker in `core`).
struct Client {
    /// The incarnation it registers with: grows at every start and every `Fenced` answer.
    incarnation: u64,
    /// The voter it believes leads.
    guess: BrokerId,
    image: ClusterImage,
    heartbeat_sent_ms: Option<u64>,
    answered: bool,
    /// Heartbeats are lost until then (the broker is cut off from the controller).
    silent_until_ms: u64,
    /// ISR proposals awaiting an answer: token -> (partition epoch, deadline).
    proposals: BTreeMap<u64, (u64, u64)>,
}

/// The controller voters, the brokers' clients and what the checks remember.
pub(super) struct Quorum {
    voters_ids: Vec<BrokerId>,
    voters: Vec<Voter>,
    clients: Vec<Client>,
    /// Proposals handed to a voter: (voter, id) -> (broker, node incarnation, token).
    proposals: BTreeMap<(BrokerId, ProposalId), (BrokerId, u64, u64)>,
    create_asked_ms: Option<u64>,
    next_token: u64,
    /// Raft term -> its leader.
    raft_leaders: BTreeMap<u64, BrokerId>,
    /// Raft index -> the records committed there.
    committed: BTreeMap<u64, Vec<Record>>,
    /// (broker, incarnation) -> when its fence committed.
    fenced_at: BTreeMap<(BrokerId, u64), u64>,
    /// Leader epoch -> the leader the committed records gave it.
    partition_leaders: BTreeMap<u64, Option<BrokerId>>,
    /// The newest committed state of the partition, with its raft index.
    partition: Option<(u64, PartitionRecord)>,
}

impl Quorum {
    pub(super) fn new(replicas: usize) -> Quorum {
        let ids: Vec<BrokerId> = (1..=replicas as BrokerId).collect();
        let voters = ids
            .iter()
            .map(|&id| {
                let disk = MemDisk::new();
                let (store, recovered) =
                    block_on(ControllerStore::open(disk.clone())).expect("a new store opens");
                let node = ControllerNode::new(voter_config(id, &ids), recovered, 0)
                    .expect("a voter starts");
                Voter {
                    disk,
                    running: Some((node, store)),
                }
            })
            .collect();
        let clients = ids
            .iter()
            .map(|&id| Client {
                incarnation: 1,
                guess: id,
                image: ClusterImage::new(),
                heartbeat_sent_ms: None,
                answered: true,
                silent_until_ms: 0,
                proposals: BTreeMap::new(),
            })
            .collect();
        Quorum {
            voters_ids: ids,
            voters,
            clients,
            proposals: BTreeMap::new(),
            create_asked_ms: None,
            next_token: 1,
            raft_leaders: BTreeMap::new(),
            committed: BTreeMap::new(),
            fenced_at: BTreeMap::new(),
            partition_leaders: BTreeMap::new(),
            partition: None,
        }
    }

    fn node(&mut self, id: BrokerId) -> Option<&mut ControllerNode> {
        self.voters[(id - 1) as usize]
            .running
            .as_mut()
            .map(|(node, _)| node)
    }

    /// The voter that leads raft (the highest term if a stale one still thinks it does).
    pub(super) fn raft_leader(&self) -> Option<BrokerId> {
        self.voters
            .iter()
            .zip(&self.voters_ids)
            .filter_map(|(v, id)| v.running.as_ref().map(|(n, _)| (n, *id)))
            .filter(|(n, _)| n.is_leader())
            .max_by_key(|(n, _)| n.term())
            .map(|(_, id)| id)
    }

    pub(super) fn fenced_since(&self, broker: BrokerId, now_ms: u64) -> Option<u64> {
        let incarnation = self.clients[(broker - 1) as usize].incarnation;
        self.fenced_at
            .get(&(broker, incarnation))
            .copied()
            .filter(|at| *at <= now_ms)
    }

    pub(super) fn incarnation(&self, broker: BrokerId) -> u64 {
        self.clients[(broker - 1) as usize].incarnation
    }

    pub(super) fn terms(&self) -> usize {
        self.raft_leaders.len()
    }

    /// The partition's replica set in the controller's order, once the topic exists.
    pub(super) fn replica_order(&self) -> Option<Vec<BrokerId>> {
        self.partition.as_ref().map(|(_, p)| p.replicas.clone())
    }

    /// The partition's ISR as the controller committed it (what it elects from).
    pub(super) fn committed_isr(&self) -> Option<Vec<BrokerId>> {
        self.partition.as_ref().map(|(_, p)| p.isr.clone())
    }

    pub(super) fn all_voters_running(&self) -> bool {
        self.voters.iter().all(|v| v.running.is_some())
    }
}

fn partition_state_changed(before: Option<&PartitionRecord>, after: &PartitionRecord) -> bool {
    before.is_none_or(|b| {
        b.leader != after.leader
            || b.leader_epoch != after.leader_epoch
            || b.partition_epoch != after.partition_epoch
            || b.isr != after.isr
    })
}

/// `core`'s mapping of a controller refusal of an ISR proposal (`send_isr_proposals`).
fn rejection(error: &ProposalError) -> IsrRejection {
    match error {
        ProposalError::AlterPartition(
            AlterPartitionError::FencedLeaderEpoch { .. } | AlterPartitionError::NotLeader { .. },
        ) => IsrRejection::FencedLeaderEpoch,
        ProposalError::AlterPartition(AlterPartitionError::InvalidPartitionEpoch { .. }) => {
            IsrRejection::StalePartitionEpoch
        }
        ProposalError::AlterPartition(AlterPartitionError::IneligibleReplica(_)) => {
            IsrRejection::IneligibleReplica
        }
        _ => IsrRejection::NotApplied,
    }
}

fn epoch_u32(epoch: u64) -> Epoch {
    Epoch(u32::try_from(epoch).expect("leader epochs stay below 2^32"))
}

impl Sim {
    fn quorum(&mut self) -> &mut Quorum {
        self.quorum.as_mut().expect("controller mode")
    }

    /// Controller mode, at the start of a step: the replicas see the new time first (a lease
    /// is judged by the replica's clock), the voters tick and run, brokers due to heartbeat
    /// do, proposals without an answer time out, the topic is created.
    pub(super) fn controller_step(&mut self) -> Check {
        let now = self.now_ms;
        let ids = self.quorum().voters_ids.clone();
        for &id in &ids {
            self.input(id, Input::Tick { now_ms: now });
        }
        for &id in &ids {
            if let Some(node) = self.quorum().node(id) {
                node.tick(now);
            }
            self.drive_voter(id)?;
        }
        self.check_raft_leaders()?;
        for &id in &ids {
            self.expire_proposals(id);
            self.heartbeat(id);
        }
        self.create_topic()
    }

    /// Runs voter `id`'s driver loop until it has nothing to do (crate docs of
    /// `wharf_controller`): persist, send, hand on what committed and what completed, advance.
    fn drive_voter(&mut self, id: BrokerId) -> Check {
        for _ in 0..READY_ROUNDS_MAX {
            let quorum = self.quorum();
            let Some((node, store)) = quorum.voters[(id - 1) as usize].running.as_mut() else {
                return Ok(());
            };
            let Some(ready) = node.ready() else {
                return Ok(());
            };
            if let Err(e) = block_on(store.persist(&ready.persist)) {
                // A poisoned store: the voter stops (it would restart from its store).
                quorum.voters[(id - 1) as usize].running = None;
                return Err(format!("voter {id}: persist failed: {e}"));
            }
            let token = ready.token();
            for (to, bytes) in ready.messages {
                if self.rng.random_range(0..100) >= RAFT_DROP_PERCENT {
                    self.send(id, to, Message::Raft(bytes));
                }
            }
            let mut by_index: BTreeMap<u64, Vec<Record>> = BTreeMap::new();
            for (index, record) in ready.applied {
                by_index.entry(index).or_default().push(record);
            }
            for (index, records) in by_index {
                // Reported by the step's check: the ready must be advanced first.
                if let Err(violation) = self.committed(id, index, records) {
                    self.violation.get_or_insert(violation);
                }
            }
            for (proposal, result) in ready.completed {
                self.proposal_completed(id, proposal, result);
            }
            let quorum = self.quorum();
            let (node, _) = quorum.voters[(id - 1) as usize]
                .running
                .as_mut()
                .expect("running");
            node.advance(token);
        }
        Err(format!("voter {id} never settled"))
    }

    fn check_raft_leaders(&mut self) -> Check {
        let mut new_leaders = Vec::new();
        let quorum = self.quorum();
        for (voter, id) in quorum.voters.iter().zip(&quorum.voters_ids) {
            let Some((node, _)) = voter.running.as_ref().filter(|(n, _)| n.is_leader()) else {
                continue;
            };
            let term = node.term();
            match quorum.raft_leaders.get(&term) {
                Some(known) if known != id => {
                    return Err(format!(
                        "controller voters {known} and {id} both lead raft term {term}"
                    ));
                }
                Some(_) => {}
                None => {
                    quorum.raft_leaders.insert(term, *id);
                    new_leaders.push((*id, term, node.applied_index(), node.commit_index()));
                }
            }
        }
        for (id, term, applied, commit) in new_leaders {
            self.trace(|| {
                format!("voter {id} leads raft term {term} (applied {applied}, commit {commit})")
            });
        }
        Ok(())
    }

    /// Records committed at `index` (applied by voter `id`): they never change, a leader epoch
    /// has one leader, and a fence commits only after the fenced incarnation's lease ended.
    fn committed(&mut self, id: BrokerId, index: u64, records: Vec<Record>) -> Check {
        let now = self.now_ms;
        let quorum = self.quorum();
        if let Some(known) = quorum.committed.get(&index) {
            if known != &records {
                return Err(format!(
                    "committed raft entry {index} differs on voter {id}: {known:?} / {records:?}"
                ));
            }
            return Ok(());
        }
        quorum.committed.insert(index, records.clone());
        for record in &records {
            let changed = match record {
                Record::CreateTopic { partitions, .. } => {
                    partitions.iter().find(|p| p.topic == TOPIC).cloned()
                }
                Record::PartitionChange {
                    topic,
                    partition,
                    leader,
                    leader_epoch,
                    partition_epoch,
                    isr,
                    elr,
                } if topic == TOPIC => {
                    let before = self.quorum().partition.as_ref().map(|(_, p)| p.clone());
                    before.map(|before| PartitionRecord {
                        topic: topic.clone(),
                        partition: *partition,
                        leader: *leader,
                        leader_epoch: *leader_epoch,
                        partition_epoch: *partition_epoch,
                        isr: isr.clone(),
                        elr: elr.clone(),
                        replicas: before.replicas,
                    })
                }
                Record::FenceBroker { id, incarnation } => {
                    self.fence_committed(*id, *incarnation)?;
                    None
                }
                _ => None,
            };
            let Some(after) = changed else {
                continue;
            };
            let quorum = self.quorum();
            let known = *quorum
                .partition_leaders
                .entry(after.leader_epoch)
                .or_insert(after.leader);
            if known != after.leader {
                return Err(format!(
                    "committed records give leader epoch {} two leaders: {known:?} and {:?}",
                    after.leader_epoch, after.leader
                ));
            }
            let previous = quorum.partition.as_ref().map(|(_, p)| p.clone());
            quorum.partition = Some((index, after.clone()));
            // A broker leaving the ISR (fenced, lagging) is a failure for the successor rule:
            // the controller no longer elects it.
            let left: Vec<BrokerId> = previous
                .as_ref()
                .map(|p| {
                    p.isr
                        .iter()
                        .copied()
                        .filter(|m| !after.isr.contains(m))
                        .collect()
                })
                .unwrap_or_default();
            for id in left {
                self.broker_failed(id);
            }
            if after.leader.is_some()
                && previous
                    .as_ref()
                    .is_none_or(|p| p.leader_epoch != after.leader_epoch)
            {
                self.report.leader_changes += 1;
                if previous.is_some_and(|p| p.leader.is_some()) {
                    self.report.failovers += 1;
                }
            }
            let (leader, epoch, isr) = (after.leader, after.leader_epoch, after.isr.clone());
            self.trace(|| {
                format!("controller committed at {index}: {leader:?} leads epoch {epoch}, ISR {isr:?} at {now} ms")
            });
            self.controller.leader = after.leader;
            self.controller.epoch = epoch_u32(after.leader_epoch);
            self.controller.isr = after.isr;
        }
        Ok(())
    }

    /// A fence of `broker`'s `incarnation` committed: that incarnation's lease has ended.
    fn fence_committed(&mut self, broker: BrokerId, incarnation: u64) -> Check {
        let now = self.now_ms;
        self.report.fences += 1;
        let quorum = self.quorum();
        quorum.fenced_at.entry((broker, incarnation)).or_insert(now);
        let current = quorum.incarnation(broker) == incarnation;
        self.trace(|| format!("controller fenced broker {broker} incarnation {incarnation}"));
        let lease = self.nodes[(broker - 1) as usize]
            .live
            .as_ref()
            .map_or(0, |l| l.replica.lease_until_ms());
        if current && lease > now {
            if self.config.tolerate_lease_outliving_fence {
                self.report.leases_outliving_fence += 1;
                return Ok(());
            }
            return Err(format!(
                "broker {broker} incarnation {incarnation} fenced at {now} ms while its lease \
                 runs until {lease} ms"
            ));
        }
        Ok(())
    }

    fn proposal_completed(
        &mut self,
        voter: BrokerId,
        proposal: ProposalId,
        result: ProposalResult,
    ) {
        if let Ok(ProposalOutcome::TopicCreated(_)) = &result {
            self.trace(|| format!("topic {TOPIC} created"));
        }
        let Some((broker, node_incarnation, token)) =
            self.quorum().proposals.remove(&(voter, proposal))
        else {
            return;
        };
        let result = match result {
            Ok(_) => {
                self.report.isr_commits += 1;
                Ok(())
            }
            Err(error) => Err(rejection(&error)),
        };
        let answer = Message::ProposalAnswer {
            node_incarnation,
            token,
            result,
        };
        self.send(voter, broker, answer);
    }

    /// The broker's own timeout on ISR proposals nobody answered (`NotApplied`, as `core`).
    fn expire_proposals(&mut self, id: BrokerId) {
        let now = self.now_ms;
        let client = &mut self.quorum().clients[(id - 1) as usize];
        let expired: Vec<(u64, u64)> = client
            .proposals
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(token, (epoch, _))| (*token, *epoch))
            .collect();
        for (token, partition_epoch) in expired {
            self.quorum().clients[(id - 1) as usize]
                .proposals
                .remove(&token);
            self.report.isr_rejections += 1;
            self.input(
                id,
                Input::IsrRejected {
                    partition_epoch,
                    reason: IsrRejection::NotApplied,
                },
            );
        }
    }

    /// Broker `id` heartbeats the voter it believes leads, every interval (one without an
    /// answer makes it try the next voter).
    fn heartbeat(&mut self, id: BrokerId) {
        let now = self.now_ms;
        if !self.alive(id) {
            return;
        }
        let node_incarnation = self.nodes[(id - 1) as usize].incarnation;
        let voters = self.quorum().voters_ids.len() as BrokerId;
        let client = &mut self.quorum().clients[(id - 1) as usize];
        if client
            .heartbeat_sent_ms
            .is_some_and(|sent| now < sent + HEARTBEAT_INTERVAL_MS)
        {
            return;
        }
        if !client.answered {
            client.guess = client.guess % voters + 1;
        }
        client.heartbeat_sent_ms = Some(now);
        client.answered = false;
        if now < client.silent_until_ms {
            return; // Lost.
        }
        let request = BrokerHeartbeat {
            id,
            incarnation: client.incarnation,
            client_address: format!("client-{id}"),
            internal_address: format!("internal-{id}"),
            applied_index: client.image.applied_index(),
        };
        let target = client.guess;
        let message = Message::Heartbeat {
            node_incarnation,
            sent_ms: now,
            request,
        };
        self.send(id, target, message);
    }

    /// Controller mode: a message for the voter on broker `to`.
    pub(super) fn at_voter(&mut self, from: BrokerId, to: BrokerId, message: Message) -> Check {
        let now = self.now_ms;
        let Some(node) = self.quorum().node(to) else {
            return Ok(()); // The host is down.
        };
        match message {
            Message::Raft(bytes) => {
                let _ = node.step(&bytes);
            }
            Message::Heartbeat {
                node_incarnation,
                sent_ms,
                request,
            } => {
                let incarnation = request.incarnation;
                let answer = node.heartbeat(&request, now);
                // Registrations and fences it queued reach raft now.
                self.drive_voter(to)?;
                let answer = Message::HeartbeatAnswer {
                    node_incarnation,
                    incarnation,
                    sent_ms,
                    answer: Box::new(answer),
                };
                self.send(to, from, answer);
            }
            Message::ProposeIsr {
                node_incarnation,
                token,
                request,
            } => match node.propose_alter_partition(request) {
                Ok(proposal) => {
                    self.quorum()
                        .proposals
                        .insert((to, proposal), (from, node_incarnation, token));
                    self.drive_voter(to)?;
                }
                Err(_) => {
                    let answer = Message::ProposalAnswer {
                        node_incarnation,
                        token,
                        result: Err(IsrRejection::NotApplied),
                    };
                    self.send(to, from, answer);
                }
            },
            _ => unreachable!("not a message for a voter"),
        }
        Ok(())
    }

    /// Controller mode: broker `to` gets the answer to its heartbeat.
    pub(super) fn heartbeat_answered(
        &mut self,
        from: BrokerId,
        to: BrokerId,
        incarnation: u64,
        sent_ms: u64,
        answer: Result<HeartbeatReply, NotController>,
    ) -> Check {
        let now = self.now_ms;
        let client = &mut self.quorum().clients[(to - 1) as usize];
        if client.incarnation != incarnation {
            return Ok(()); // To an incarnation it no longer is.
        }
        client.answered = true;
        let reply = match answer {
            Err(NotController { leader_hint }) => {
                if let Some(hint) = leader_hint.filter(|h| *h != from) {
                    client.guess = hint;
                    client.heartbeat_sent_ms = None; // Ask the hinted leader at once.
                }
                return Ok(());
            }
            Ok(reply) => reply,
        };
        client.guess = from;
        match reply.status {
            BrokerStatus::Fenced => {
                client.incarnation += 1;
                client.heartbeat_sent_ms = None;
                let next = client.incarnation;
                self.trace(|| format!("broker {to} was fenced; registers incarnation {next}"));
                return Ok(());
            }
            BrokerStatus::Registering => return Ok(()),
            BrokerStatus::Active | BrokerStatus::ShuttingDown => {}
        }
        let before = client
            .image
            .partition(TOPIC, 0)
            .cloned()
            .filter(|_| client.image.applied_index() > 0);
        match reply.metadata {
            MetadataDelta::Snapshot { image, .. } => {
                if image.applied_index() > client.image.applied_index() {
                    client.image = image;
                }
            }
            MetadataDelta::Records(records) => {
                let applied_before = client.image.applied_index();
                for (index, record) in records {
                    if index <= applied_before {
                        continue;
                    }
                    client
                        .image
                        .apply(index, &record)
                        .map_err(|e| format!("broker {to}: metadata record {index}: {e}"))?;
                }
            }
        }
        let after = client.image.partition(TOPIC, 0).cloned();
        if let Some(after) = after.filter(|a| partition_state_changed(before.as_ref(), a)) {
            self.apply_partition_state(to, &after);
        }
        // The lease after the metadata that came with it (as `core`): a leader deposed by this
        // answer is a follower before its lease is renewed.
        let until_ms = sent_ms + reply.session_timeout_ms - HEARTBEAT_INTERVAL_MS;
        let fenced = self.quorum().fenced_at.get(&(to, incarnation)).copied();
        if let Some(at) = fenced.filter(|at| until_ms > *at) {
            if self.config.tolerate_lease_outliving_fence {
                self.report.leases_outliving_fence += 1;
                self.input(to, Input::LeaseRenewed { until_ms });
                return Ok(());
            }
            return Err(format!(
                "voter {from} renewed the lease of broker {to} incarnation {incarnation} to \
                 {until_ms} ms at {now} ms, its fence committed at {at} ms"
            ));
        }
        self.trace(|| format!("voter {from} renews broker {to}'s lease to {until_ms} ms"));
        self.input(to, Input::LeaseRenewed { until_ms });
        Ok(())
    }

    /// Controller mode: broker `to` gets the answer to one of its ISR proposals.
    pub(super) fn proposal_answered(
        &mut self,
        to: BrokerId,
        token: u64,
        result: Result<(), IsrRejection>,
    ) {
        let Some((partition_epoch, _)) = self.quorum().clients[(to - 1) as usize]
            .proposals
            .remove(&token)
        else {
            return;
        };
        if let Err(reason) = result {
            self.report.isr_rejections += 1;
            self.trace(|| format!("broker {to}: ISR proposal refused: {reason:?}"));
            self.input(
                to,
                Input::IsrRejected {
                    partition_epoch,
                    reason,
                },
            );
        }
    }

    /// Controller mode: a replica proposes an ISR; the broker sends it to the controller.
    pub(super) fn propose_isr(
        &mut self,
        id: BrokerId,
        isr: Vec<BrokerId>,
        leader_epoch: Epoch,
        partition_epoch: u64,
    ) {
        let now = self.now_ms;
        let node_incarnation = self.nodes[(id - 1) as usize].incarnation;
        let quorum = self.quorum();
        let token = quorum.next_token;
        quorum.next_token += 1;
        let client = &mut quorum.clients[(id - 1) as usize];
        client
            .proposals
            .insert(token, (partition_epoch, now + PROPOSAL_TIMEOUT_MS));
        let target = client.guess;
        let request = AlterPartitionRequest {
            topic: TOPIC.to_string(),
            partition: 0,
            leader: id,
            leader_epoch: u64::from(leader_epoch.0),
            partition_epoch,
            new_isr: isr,
        };
        self.send(
            id,
            target,
            Message::ProposeIsr {
                node_incarnation,
                token,
                request,
            },
        );
    }

    /// The partition's state from the controller, applied by the shipped driver core
    /// (`driver::apply_state`, as `Partition::apply_state` does): a newer epoch is a role
    /// change, the same epoch on the leader a committed ISR.
    fn apply_partition_state(&mut self, id: BrokerId, state: &PartitionRecord) {
        if !self.alive(id) {
            return;
        }
        self.adopt_replica_order(id, &state.replicas);
        let state = PartitionState {
            leader: state.leader,
            leader_epoch: epoch_u32(state.leader_epoch),
            partition_epoch: state.partition_epoch,
            isr: state.isr.clone(),
        };
        let applied = driver::apply_state(&mut SimHost { sim: self, id }, id, &state)
            .unwrap_or_else(|e| panic!("node {id}: applying the controller's state: {e}"));
        match applied {
            StateApplied::Leading => self.note_leader(id, state.leader_epoch),
            // The simulator truncates and resets within one step: no log change is ever in
            // progress when metadata arrives.
            StateApplied::Deferred => {
                self.violation.get_or_insert(format!(
                    "node {id}: a state deferred while no log change can be in progress"
                ));
            }
            StateApplied::Stale
            | StateApplied::Following
            | StateApplied::IsrCommitted
            | StateApplied::Unchanged => {}
        }
    }

    /// The replicas started before the topic existed list the replica set in broker id order;
    /// `core` opens a partition only once it has the controller's metadata, so with the
    /// controller's order. Before its first role, the replica is created again with that
    /// order (same log, epochs and lease: it has done nothing yet).
    fn adopt_replica_order(&mut self, id: BrokerId, replicas: &[BrokerId]) {
        let now = self.now_ms;
        let mut config = self.replica_config(id);
        config.replicas = replicas.to_vec();
        let live = self.node(id).live.as_mut().expect("checked by the caller");
        if live.replica.replicas() == replicas {
            return;
        }
        assert_eq!(
            live.replica.role(),
            Role::Follower { leader: id },
            "node {id}: the replica set changed under a replica with a role"
        );
        let log = LogState {
            log_start: live.log.log_start_offset(),
            end: live.log.end_offset(),
            durable: live.log.durable_offset(),
            high_watermark: live.replica.high_watermark(),
        };
        let lease_until_ms = live.replica.lease_until_ms();
        let mut replica = Replica::new(config, log, live.replica.epochs().clone(), now)
            .unwrap_or_else(|e| panic!("node {id}: cannot create the replica again: {e}"));
        if lease_until_ms > 0 {
            let mut outbox = Vec::new();
            replica.step(
                Input::LeaseRenewed {
                    until_ms: lease_until_ms,
                },
                &mut outbox,
            );
            assert!(outbox.is_empty(), "node {id}: {outbox:?}");
        }
        live.replica = replica;
    }

    /// The topic is created through the controller leader once three brokers registered.
    fn create_topic(&mut self) -> Check {
        let now = self.now_ms;
        let replicas = self.config.replicas as u16;
        let min_insync = self.config.min_insync as u16;
        let quorum = self.quorum();
        if quorum.partition.is_some()
            || quorum
                .create_asked_ms
                .is_some_and(|at| now < at + CREATE_RETRY_MS)
        {
            return Ok(());
        }
        let Some(leader) = quorum.raft_leader() else {
            return Ok(());
        };
        let node = quorum.node(leader).expect("running");
        let live = node.image().brokers().filter(|b| b.is_live()).count();
        if live < usize::from(replicas) || node.image().topic(TOPIC).is_some() {
            return Ok(());
        }
        let request = CreateTopicRequest {
            name: TOPIC.into(),
            partitions: 1,
            replication_factor: replicas,
            min_insync_replicas: min_insync,
            unclean_leader_election: false,
            config: BTreeMap::new(),
        };
        if node.propose_create_topic(request).is_ok() {
            quorum.create_asked_ms = Some(now);
            self.drive_voter(leader)?;
        }
        Ok(())
    }

    /// Controller mode: broker `id` and its voter crash (the voter's unsynced writes are lost
    /// or torn as well).
    pub(super) fn crash_voter(&mut self, id: BrokerId, mode: CrashMode) {
        let quorum = self.quorum();
        let voter = &mut quorum.voters[(id - 1) as usize];
        voter.running = None;
        voter.disk.crash(mode);
        quorum.proposals.retain(|(voter, _), _| *voter != id);
    }

    /// Controller mode: broker `id` restarts: its voter recovers from its store, its client
    /// registers a new incarnation with an empty image.
    pub(super) fn restart_voter(&mut self, id: BrokerId) -> Check {
        let now = self.now_ms;
        let quorum = self.quorum();
        let ids = quorum.voters_ids.clone();
        let voter = &mut quorum.voters[(id - 1) as usize];
        if voter.running.is_none() {
            let (store, recovered) = block_on(ControllerStore::open(voter.disk.clone()))
                .map_err(|e| format!("voter {id}: recovery failed: {e}"))?;
            let node = ControllerNode::new(voter_config(id, &ids), recovered, now)
                .map_err(|e| format!("voter {id}: cannot restart: {e}"))?;
            voter.running = Some((node, store));
        }
        let client = &mut quorum.clients[(id - 1) as usize];
        client.incarnation += 1;
        client.image = ClusterImage::new();
        client.heartbeat_sent_ms = None;
        client.answered = true;
        client.proposals.clear();
        Ok(())
    }

    /// Controller-mode faults (the `leader_move` roll): the controller leader's broker crashes,
    /// or a broker loses its heartbeats for a while.
    pub(super) fn controller_fault(&mut self, fault_budget: usize) -> Check {
        let now = self.now_ms;
        if self.rng.random_bool(0.5) {
            let Some(leader) = self.quorum().raft_leader() else {
                return Ok(());
            };
            if self.down_count() < fault_budget && self.alive(leader) {
                self.trace(|| format!("controller leader {leader} crashes"));
                self.report.controller_leader_crashes += 1;
                self.crash(leader);
            }
        } else {
            let id = self.rng.random_range(1..=self.config.replicas as BrokerId);
            let until = now + self.rng.random_range(2 * HEARTBEAT_INTERVAL_MS..=400);
            self.trace(|| format!("broker {id} loses its heartbeats until {until} ms"));
            self.report.heartbeat_outages += 1;
            self.quorum().clients[(id - 1) as usize].silent_until_ms = until;
        }
        Ok(())
    }

    /// Settling: heartbeats flow again.
    pub(super) fn heal_controller(&mut self) {
        for client in &mut self.quorum().clients {
            client.silent_until_ms = 0;
        }
    }
}
