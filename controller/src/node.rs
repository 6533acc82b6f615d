//! `ControllerNode`: one controller voter, a raft-rs `RawNode` plus the cluster image, broker
//! sessions and the active controller's decisions. Sans-IO: see the crate docs for the flow.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Message, Snapshot};
use raft::{RawNode, StateRole};
use thiserror::Error;

use crate::decisions::{
    self, AlterPartitionError, AlterPartitionRequest, BrokerRegistration, CreateTopicError,
    CreateTopicRequest, DeleteTopicError, FenceError, RegisterError, ShutdownError,
};
use crate::mirror::MirrorStorage;
use crate::records::{decode_batch, encode_batch, BrokerId, ClusterImage, PartitionRecord, Record};
use crate::store::{HardStateRecord, PersistBatch, Recovered, SnapshotRecord, VOTERS_MAX};

/// Raft messages received but not yet handed to raft (they wait for the next `ready`).
pub const INBOX_MESSAGES_MAX: usize = 4096;
/// Requests (proposals, registrations, fences) waiting for the active controller to decide.
pub const REQUESTS_QUEUED_MAX: usize = 1024;
/// Requests decided together into one raft entry.
pub const BATCH_REQUESTS_MAX: usize = 64;
/// A batch stops growing once its records take this many bytes (the entry limit is larger).
pub const BATCH_BYTES_TARGET: usize = 1024 * 1024;
/// Raft ticks owed after a long pause are capped here (the rest are skipped).
pub const TICKS_OWED_MAX: u64 = 64;
/// The largest raft append message, in bytes.
pub const RAFT_MESSAGE_BYTES_MAX: u64 = 1024 * 1024;
/// Append messages in flight to one follower.
pub const RAFT_INFLIGHT_MESSAGES_MAX: usize = 64;
/// A snapshot sent to a follower that has not caught up after this long is reported failed,
/// so raft sends it again (raft-rs waits for that report; a lost snapshot would stall it).
pub const SNAPSHOT_RESEND_MS: u64 = 1000;

const _: () = assert!(BATCH_BYTES_TARGET < crate::store::ENTRY_BYTES_MAX);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerConfig {
    pub node_id: u32,
    /// Every voter, this node included. Static: there are no membership changes.
    pub voters: Vec<u32>,
    pub tick_ms: u64,
    /// Ticks without a leader before this node campaigns (the base; see [`Self::raft_config`]).
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// A broker that has not heartbeated for this long is fenced.
    pub broker_session_timeout_ms: u64,
    /// A snapshot of the image is taken (and the log compacted) every this many entries.
    pub snapshot_every_entries: u64,
}

impl ControllerConfig {
    pub fn new(node_id: u32, voters: Vec<u32>) -> ControllerConfig {
        ControllerConfig {
            node_id,
            voters,
            tick_ms: 50,
            election_ticks: 10,
            heartbeat_ticks: 2,
            broker_session_timeout_ms: 600,
            snapshot_every_entries: 1000,
        }
    }

    /// The raft-rs configuration. raft-rs draws each election timeout from
    /// `[min_election_tick, max_election_tick)` with `thread_rng`; to keep the controller
    /// deterministic (simulation replays from a seed) the range holds one value,
    /// `election_ticks + 2 * (position of this node among the sorted voters)`. The stagger makes
    /// split votes rare: after a leader dies the voter with the lowest position times out first
    /// and, with pre-vote, normally wins before the next one even campaigns.
    pub fn raft_config(&self) -> raft::Config {
        let mut voters = self.voters.clone();
        voters.sort_unstable();
        let position = voters
            .iter()
            .position(|v| *v == self.node_id)
            .expect("the node is a voter");
        let election_ticks = self.election_ticks + 2 * position;
        raft::Config {
            id: u64::from(self.node_id),
            election_tick: self.election_ticks,
            heartbeat_tick: self.heartbeat_ticks,
            min_election_tick: election_ticks,
            max_election_tick: election_ticks + 1,
            max_size_per_msg: RAFT_MESSAGE_BYTES_MAX,
            max_inflight_msgs: RAFT_INFLIGHT_MESSAGES_MAX,
            check_quorum: true,
            pre_vote: true,
            ..raft::Config::default()
        }
    }

    fn check(&self) -> Result<(), NodeError> {
        let mut voters = self.voters.clone();
        voters.sort_unstable();
        voters.dedup();
        if voters.len() != self.voters.len()
            || voters.is_empty()
            || voters.len() > VOTERS_MAX
            || voters.contains(&0)
            || !voters.contains(&self.node_id)
        {
            return Err(NodeError::Config(
                "voters must be 1..=15 distinct non-zero ids including node_id",
            ));
        }
        if self.tick_ms == 0 || self.snapshot_every_entries == 0 {
            return Err(NodeError::Config(
                "tick_ms and snapshot_every_entries must be positive",
            ));
        }
        self.raft_config()
            .validate()
            .map_err(|_| NodeError::Config("election_ticks must exceed heartbeat_ticks > 0"))
    }
}

#[derive(Debug, Error)]
pub enum NodeError {
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    #[error("the recovered snapshot does not decode: {0}")]
    Snapshot(String),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StepError {
    #[error("the message does not decode")]
    Decode,
    #[error("the message is not from a voter to this node")]
    UnknownPeer,
    #[error("the inbox is full; the message is dropped (raft retransmits)")]
    InboxFull,
}

/// This node is not the active controller; the leader it knows of, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error("not the active controller (leader hint {leader_hint:?})")]
pub struct NotController {
    pub leader_hint: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum ProposeError {
    #[error("not the active controller (leader hint {leader_hint:?})")]
    NotController { leader_hint: Option<u32> },
    #[error("too many requests queued")]
    QueueFull,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProposalId(pub u64);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProposalOutcome {
    TopicCreated(Vec<PartitionRecord>),
    TopicDeleted,
    PartitionAltered(PartitionRecord),
    ShutdownProgress { still_leading: bool },
    BrokerRegistered,
    BrokerFenced,
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ProposalError {
    /// Never proposed: this node lost leadership first. Retry at the leader.
    #[error("not the active controller (leader hint {leader_hint:?})")]
    NotController { leader_hint: Option<u32> },
    /// Proposed, but leadership changed before it committed: it may or may not have applied.
    #[error("leadership lost; outcome unknown (leader hint {leader_hint:?})")]
    LeadershipLost { leader_hint: Option<u32> },
    #[error(transparent)]
    CreateTopic(#[from] CreateTopicError),
    #[error(transparent)]
    DeleteTopic(#[from] DeleteTopicError),
    #[error(transparent)]
    AlterPartition(#[from] AlterPartitionError),
    #[error(transparent)]
    Shutdown(#[from] ShutdownError),
    #[error(transparent)]
    Register(#[from] RegisterError),
    #[error(transparent)]
    Fence(#[from] FenceError),
}

pub type ProposalResult = Result<ProposalOutcome, ProposalError>;

/// A broker's periodic heartbeat (the first one of an incarnation registers it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerHeartbeat {
    pub id: BrokerId,
    pub incarnation: u64,
    pub client_address: String,
    pub internal_address: String,
    /// The broker's metadata image is at this index; the reply carries what follows.
    pub applied_index: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerStatus {
    /// The registration of this incarnation is being committed; keep heartbeating.
    Registering,
    Active,
    ShuttingDown,
    /// Fenced or stale: this incarnation may not serve; restart with a new incarnation.
    Fenced,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetadataDelta {
    /// Records after the broker's applied index, whole entries only, in order.
    Records(Vec<(u64, Record)>),
    /// The broker is too far behind (the log is compacted): here is the whole image.
    Snapshot { index: u64, image: ClusterImage },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatReply {
    pub status: BrokerStatus,
    pub session_timeout_ms: u64,
    pub metadata: MetadataDelta,
}

/// One round of work for the driver. See the crate docs for the order to carry it out in.
#[derive(Debug)]
pub struct ControllerReady {
    token: u64,
    /// Make this durable first (`ControllerStore::persist`).
    pub persist: PersistBatch,
    /// Then send these raft messages: (voter id, protobuf bytes).
    pub messages: Vec<(u32, Vec<u8>)>,
    /// Records committed and applied to the image since the previous ready, with their index.
    pub applied: Vec<(u64, Record)>,
    /// Proposals whose outcome is now known.
    pub completed: Vec<(ProposalId, ProposalResult)>,
}

impl ControllerReady {
    /// Pass to [`ControllerNode::advance`] once `persist` is durable and `messages` are sent.
    pub fn token(&self) -> ReadyToken {
        ReadyToken(self.token)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadyToken(u64);

#[derive(Clone, Debug)]
enum Request {
    Register(BrokerRegistration),
    Fence { id: BrokerId, incarnation: u64 },
    CreateTopic(CreateTopicRequest),
    DeleteTopic(String),
    AlterPartition(AlterPartitionRequest),
    ControlledShutdown { id: BrokerId, incarnation: u64 },
}

struct InFlightBatch {
    index: u64,
    term: u64,
    results: Vec<(Option<ProposalId>, ProposalResult)>,
    requests: Vec<Request>,
}

#[derive(Clone, Copy, Debug)]
struct Session {
    incarnation: u64,
    deadline_ms: u64,
}

pub struct ControllerNode {
    config: ControllerConfig,
    raw: RawNode<MirrorStorage>,
    image: ClusterImage,
    now_ms: u64,
    tick_last_ms: Option<u64>,
    ticks_owed: u64,
    inbox: VecDeque<Message>,
    requests: VecDeque<(Option<ProposalId>, Request)>,
    in_flight: Option<InFlightBatch>,
    proposal_id_next: u64,
    /// The term this node leads in, once it has granted sessions for it.
    leader_term: Option<u64>,
    sessions: BTreeMap<BrokerId, Session>,
    /// Registrations and fences queued or in flight, so heartbeats and ticks do not repeat them.
    registering: BTreeSet<(BrokerId, u64)>,
    fencing: BTreeSet<BrokerId>,
    /// The raft `Ready` handed out and not yet advanced.
    raw_ready: Option<raft::Ready>,
    ready_in_flight: Option<u64>,
    ready_number_next: u64,
    pending_messages: Vec<(u32, Vec<u8>)>,
    pending_applied: Vec<(u64, Record)>,
    pending_completed: Vec<(ProposalId, ProposalResult)>,
    pending_snapshot: Option<SnapshotRecord>,
    commit_dirty: bool,
    /// Followers sent a snapshot, and when.
    snapshots_sent_ms: BTreeMap<u64, u64>,
}

fn discard_logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl ControllerNode {
    /// Starts a voter from what its store recovered. `now_ms` starts the clock.
    pub fn new(
        config: ControllerConfig,
        recovered: Recovered,
        now_ms: u64,
    ) -> Result<ControllerNode, NodeError> {
        config.check()?;
        let conf_state = voters_conf_state(&config.voters);
        let mut snapshot = Snapshot::default();
        let image = match &recovered.snapshot {
            Some(record) => {
                let image: ClusterImage = serde_json::from_slice(&record.data)
                    .map_err(|e| NodeError::Snapshot(e.to_string()))?;
                if image.applied_index() != record.index {
                    return Err(NodeError::Snapshot("image index differs".into()));
                }
                snapshot.data = record.data.clone().into();
                image
            }
            None => ClusterImage::new(),
        };
        let metadata = snapshot.mut_metadata();
        metadata.index = image.applied_index();
        metadata.term = recovered.snapshot.as_ref().map_or(0, |s| s.term);
        metadata.set_conf_state(conf_state.clone());
        let mut hard_state = HardState::default();
        hard_state.term = recovered.hard_state.term;
        hard_state.vote = recovered.hard_state.vote;
        // A snapshot installed just before a crash may be newer than the durable commit index.
        hard_state.commit = recovered.hard_state.commit.max(image.applied_index());
        let mirror = MirrorStorage::new(hard_state, conf_state, snapshot, recovered.entries);
        let mut raft_config = config.raft_config();
        raft_config.applied = image.applied_index();
        let raw = RawNode::new(&raft_config, mirror, &discard_logger())?;
        Ok(ControllerNode {
            config,
            raw,
            image,
            now_ms,
            tick_last_ms: Some(now_ms),
            ticks_owed: 0,
            inbox: VecDeque::new(),
            requests: VecDeque::new(),
            in_flight: None,
            proposal_id_next: 1,
            leader_term: None,
            sessions: BTreeMap::new(),
            registering: BTreeSet::new(),
            fencing: BTreeSet::new(),
            raw_ready: None,
            ready_in_flight: None,
            ready_number_next: 1,
            pending_messages: Vec::new(),
            pending_applied: Vec::new(),
            pending_completed: Vec::new(),
            pending_snapshot: None,
            commit_dirty: false,
            snapshots_sent_ms: BTreeMap::new(),
        })
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// Advances the clock; raft ticks once per `tick_ms` elapsed (applied at the next `ready`).
    pub fn tick(&mut self, now_ms: u64) {
        self.observe_time(now_ms);
        let last = self.tick_last_ms.get_or_insert(now_ms);
        while self.now_ms - *last >= self.config.tick_ms && self.ticks_owed < TICKS_OWED_MAX {
            *last += self.config.tick_ms;
            self.ticks_owed += 1;
        }
        if self.now_ms - *last >= self.config.tick_ms {
            *last = self.now_ms; // A long pause: the ticks beyond the cap are skipped.
        }
    }

    /// A raft message from a peer (protobuf bytes). Handed to raft at the next `ready`.
    pub fn step(&mut self, message_bytes: &[u8]) -> Result<(), StepError> {
        let message = Message::parse_from_bytes(message_bytes).map_err(|_| StepError::Decode)?;
        let from_voter = u32::try_from(message.from)
            .is_ok_and(|from| from != self.config.node_id && self.config.voters.contains(&from));
        if !from_voter
            || message.to != u64::from(self.config.node_id)
            || raft::raw_node::is_local_msg(message.get_msg_type())
        {
            return Err(StepError::UnknownPeer);
        }
        if self.inbox.len() >= INBOX_MESSAGES_MAX {
            return Err(StepError::InboxFull);
        }
        self.inbox.push_back(message);
        Ok(())
    }

    /// A broker heartbeat; only the active controller answers.
    pub fn heartbeat(
        &mut self,
        request: &BrokerHeartbeat,
        now_ms: u64,
    ) -> Result<HeartbeatReply, NotController> {
        self.observe_time(now_ms);
        if !self.is_active() || self.leader_term != Some(self.raw.raft.term) {
            // Not the active controller yet (see `is_active`): the broker asks again.
            return Err(NotController {
                leader_hint: self.leader_id(),
            });
        }
        let status = match self.image.broker(request.id) {
            Some(stored) if request.incarnation < stored.incarnation => BrokerStatus::Fenced,
            Some(stored) if request.incarnation == stored.incarnation => {
                // A fence of this incarnation is decided (queued or in flight): no more lease
                // (simulator seed 4).
                if stored.fenced || self.fencing.contains(&request.id) {
                    BrokerStatus::Fenced
                } else {
                    self.sessions.insert(
                        request.id,
                        Session {
                            incarnation: request.incarnation,
                            deadline_ms: self.now_ms + self.config.broker_session_timeout_ms,
                        },
                    );
                    if stored.shutting_down {
                        BrokerStatus::ShuttingDown
                    } else {
                        BrokerStatus::Active
                    }
                }
            }
            _ => {
                let key = (request.id, request.incarnation);
                if !self.registering.contains(&key) && self.requests.len() < REQUESTS_QUEUED_MAX {
                    self.registering.insert(key);
                    let registration = BrokerRegistration {
                        id: request.id,
                        incarnation: request.incarnation,
                        client_address: request.client_address.clone(),
                        internal_address: request.internal_address.clone(),
                    };
                    self.requests
                        .push_back((None, Request::Register(registration)));
                }
                BrokerStatus::Registering
            }
        };
        Ok(HeartbeatReply {
            status,
            session_timeout_ms: self.config.broker_session_timeout_ms,
            metadata: self.records_since(request.applied_index, HEARTBEAT_RECORDS_MAX),
        })
    }

    pub fn propose_create_topic(
        &mut self,
        request: CreateTopicRequest,
    ) -> Result<ProposalId, ProposeError> {
        self.enqueue(Request::CreateTopic(request))
    }

    pub fn propose_delete_topic(&mut self, name: String) -> Result<ProposalId, ProposeError> {
        self.enqueue(Request::DeleteTopic(name))
    }

    pub fn propose_alter_partition(
        &mut self,
        request: AlterPartitionRequest,
    ) -> Result<ProposalId, ProposeError> {
        self.enqueue(Request::AlterPartition(request))
    }

    /// One step of a controlled shutdown; the outcome says whether the broker still leads.
    pub fn propose_controlled_shutdown(
        &mut self,
        id: BrokerId,
        incarnation: u64,
    ) -> Result<ProposalId, ProposeError> {
        self.enqueue(Request::ControlledShutdown { id, incarnation })
    }

    /// The next round of work, or `None` when there is nothing to do. The previous ready must
    /// have been advanced.
    pub fn ready(&mut self) -> Option<ControllerReady> {
        assert!(
            self.ready_in_flight.is_none(),
            "advance the previous ready before asking for the next"
        );
        self.feed_raft();
        self.retry_snapshots();
        self.observe_role();
        self.expire_sessions();
        self.decide_and_propose();
        self.maybe_snapshot();
        let mut persist = PersistBatch {
            snapshot: self.pending_snapshot.take(),
            ..PersistBatch::default()
        };
        if self.raw.has_ready() {
            let mut ready = self.raw.ready();
            self.queue_messages(ready.take_messages());
            if !ready.snapshot().is_empty() {
                self.install_snapshot(ready.snapshot().clone(), &mut persist);
            }
            for entry in ready.take_committed_entries() {
                self.apply_entry(&entry);
            }
            let entries = ready.take_entries();
            self.raw.mut_store().append(&entries);
            persist.entries = entries;
            if let Some(hard_state) = ready.hs() {
                self.raw.mut_store().set_hard_state(hard_state.clone());
                persist.hard_state = Some(self.hard_state_record());
            }
            self.queue_messages(ready.take_persisted_messages());
            self.raw_ready = Some(ready);
        }
        // A commit index learnt after the last persist rides along with the next one (it is
        // not needed for safety: a restart re-learns it from the leader).
        if self.commit_dirty && !persist.is_empty() {
            persist.hard_state = Some(self.hard_state_record());
        }
        if persist.hard_state.is_some() {
            self.commit_dirty = false;
        }
        let idle = self.raw_ready.is_none()
            && persist.is_empty()
            && self.pending_messages.is_empty()
            && self.pending_applied.is_empty()
            && self.pending_completed.is_empty();
        if idle {
            return None;
        }
        let token = self.ready_number_next;
        self.ready_number_next += 1;
        self.ready_in_flight = Some(token);
        Some(ControllerReady {
            token,
            persist,
            messages: std::mem::take(&mut self.pending_messages),
            applied: std::mem::take(&mut self.pending_applied),
            completed: std::mem::take(&mut self.pending_completed),
        })
    }

    /// Tells raft the ready's batch is durable and its messages sent. Outputs this produces
    /// (more messages, newly committed records) come with the next `ready`.
    pub fn advance(&mut self, token: ReadyToken) {
        assert_eq!(
            self.ready_in_flight,
            Some(token.0),
            "advance of another ready"
        );
        self.ready_in_flight = None;
        let Some(ready) = self.raw_ready.take() else {
            return;
        };
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut hard_state = self.raw.store().hard_state().clone();
            hard_state.commit = commit;
            self.raw.mut_store().set_hard_state(hard_state);
            self.commit_dirty = true;
        }
        self.queue_messages(light.take_messages());
        for entry in light.take_committed_entries() {
            self.apply_entry(&entry);
        }
        self.raw.advance_apply();
    }

    /// Records after `index` for a broker catching up (at most about `max_records`, whole
    /// entries), or the whole image if the log no longer reaches back that far.
    pub fn records_since(&self, index: u64, max_records: usize) -> MetadataDelta {
        let applied = self.image.applied_index();
        if index >= applied {
            return MetadataDelta::Records(Vec::new());
        }
        let store = self.raw.store();
        if index < store.snapshot_index() {
            return MetadataDelta::Snapshot {
                index: applied,
                image: self.image.clone(),
            };
        }
        let mut records = Vec::new();
        for entry in store.entries_between(index + 1, applied + 1) {
            if records.len() >= max_records.max(1) {
                break;
            }
            let batch = decode_batch(&entry.data).expect("committed entries decode");
            records.extend(batch.into_iter().map(|record| (entry.index, record)));
        }
        MetadataDelta::Records(records)
    }

    /// Hands Raft leadership to the most caught-up other voter (the active controller's broker
    /// is shutting down), so the quorum does not wait out an election timeout without a
    /// leader. Returns the transferee; raft-rs carries it out through the next `ready`s.
    pub fn transfer_leadership(&mut self) -> Option<u32> {
        if !self.is_leader() {
            return None;
        }
        let me = self.config.node_id;
        let progress = self.raw.raft.prs();
        let target = self
            .config
            .voters
            .iter()
            .copied()
            .filter(|voter| *voter != me)
            .max_by_key(|voter| progress.get(u64::from(*voter)).map_or(0, |p| p.matched))?;
        self.raw.transfer_leader(u64::from(target));
        Some(target)
    }

    pub fn leader_id(&self) -> Option<u32> {
        u32::try_from(self.raw.raft.leader_id)
            .ok()
            .filter(|id| *id != 0)
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn image(&self) -> &ClusterImage {
        &self.image
    }

    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    pub fn applied_index(&self) -> u64 {
        self.image.applied_index()
    }

    fn observe_time(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    fn enqueue(&mut self, request: Request) -> Result<ProposalId, ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NotController {
                leader_hint: self.leader_id(),
            });
        }
        if self.requests.len() >= REQUESTS_QUEUED_MAX {
            return Err(ProposeError::QueueFull);
        }
        let id = ProposalId(self.proposal_id_next);
        self.proposal_id_next += 1;
        self.requests.push_back((Some(id), request));
        Ok(id)
    }

    fn queue_messages(&mut self, messages: Vec<Message>) {
        for message in &messages {
            if message.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                self.snapshots_sent_ms.insert(message.to, self.now_ms);
            }
        }
        self.pending_messages.extend(encode_messages(messages));
    }

    /// Reports snapshots that did not get their follower going as failed (raft resends them).
    fn retry_snapshots(&mut self) {
        let now_ms = self.now_ms;
        let due: Vec<u64> = self
            .snapshots_sent_ms
            .iter()
            .filter(|(_, sent_ms)| now_ms.saturating_sub(**sent_ms) >= SNAPSHOT_RESEND_MS)
            .map(|(peer, _)| *peer)
            .collect();
        for peer in due {
            self.snapshots_sent_ms.remove(&peer);
            let waiting = self.is_leader()
                && self
                    .raw
                    .raft
                    .prs()
                    .get(peer)
                    .is_some_and(|progress| progress.state == raft::ProgressState::Snapshot);
            if waiting {
                self.raw
                    .report_snapshot(peer, raft::SnapshotStatus::Failure);
            }
        }
    }

    fn feed_raft(&mut self) {
        for _ in 0..std::mem::take(&mut self.ticks_owed) {
            self.raw.tick();
        }
        // Bounded by INBOX_MESSAGES_MAX. Errors (a stale or unexpected message) change nothing.
        while let Some(message) = self.inbox.pop_front() {
            let _ = self.raw.step(message);
        }
    }

    /// On becoming leader: every registered, unfenced broker gets a full session from now. On
    /// losing leadership: queued requests fail (they were never proposed).
    /// The leader may act as the active controller (answer heartbeats, grant and expire
    /// sessions) only once an entry of its own term is committed and its image has applied
    /// everything committed: before that, a fence an earlier leader committed may still be
    /// unknown to it, and it would renew the lease of a fenced broker (simulator seeds 78, 554).
    fn is_active(&self) -> bool {
        let log = &self.raw.raft.raft_log;
        self.is_leader()
            && log
                .term(log.committed)
                .is_ok_and(|t| t == self.raw.raft.term)
            && self.image.applied_index() >= log.committed
    }

    fn observe_role(&mut self) {
        let term = self.raw.raft.term;
        if self.is_leader() {
            if !self.is_active() {
                return;
            }
            if self.leader_term != Some(term) {
                self.leader_term = Some(term);
                let deadline_ms = self.now_ms + self.config.broker_session_timeout_ms;
                self.sessions = self
                    .image
                    .brokers()
                    .filter(|b| !b.fenced)
                    .map(|b| {
                        let session = Session {
                            incarnation: b.incarnation,
                            deadline_ms,
                        };
                        (b.id, session)
                    })
                    .collect();
            }
            return;
        }
        if self.leader_term.take().is_some() {
            self.sessions.clear();
            self.registering.clear();
            self.fencing.clear();
            let leader_hint = self.leader_id();
            for (id, _) in self.requests.drain(..) {
                if let Some(id) = id {
                    let error = ProposalError::NotController { leader_hint };
                    self.pending_completed.push((id, Err(error)));
                }
            }
        }
    }

    fn expire_sessions(&mut self) {
        if self.leader_term.is_none() {
            return;
        }
        let now_ms = self.now_ms;
        let expired: Vec<(BrokerId, Session)> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.deadline_ms < now_ms)
            .map(|(id, s)| (*id, *s))
            .collect();
        for (id, session) in expired {
            if self.requests.len() >= REQUESTS_QUEUED_MAX {
                break;
            }
            self.sessions.remove(&id);
            let current = self
                .image
                .broker(id)
                .is_some_and(|b| b.incarnation == session.incarnation && !b.fenced);
            if current && self.fencing.insert(id) {
                let request = Request::Fence {
                    id,
                    incarnation: session.incarnation,
                };
                self.requests.push_back((None, request));
            }
        }
    }

    /// The active controller decides queued requests against its image and proposes their
    /// records as one entry. It decides only when its whole log is applied and no batch is in
    /// flight, so the image a batch was decided against is exactly the image it applies to.
    fn decide_and_propose(&mut self) {
        let log_applied = self.image.applied_index() == self.raw.raft.raft_log.last_index();
        if self.leader_term.is_none()
            || self.in_flight.is_some()
            || self.requests.is_empty()
            || !log_applied
        {
            return;
        }
        let mut scratch = self.image.clone();
        let mut records = Vec::new();
        let mut results = Vec::new();
        let mut requests = Vec::new();
        let mut batch_bytes = 0;
        while results.len() < BATCH_REQUESTS_MAX && batch_bytes < BATCH_BYTES_TARGET {
            let Some((id, request)) = self.requests.pop_front() else {
                break;
            };
            let result = match decide(&scratch, &request) {
                Ok((decided, outcome)) => {
                    decisions::apply_all(&mut scratch, &decided);
                    batch_bytes += encode_batch(&decided).len();
                    records.extend(decided);
                    Ok(outcome)
                }
                Err(error) => Err(error),
            };
            results.push((id, result));
            requests.push(request);
        }
        if records.is_empty() {
            self.complete(results, &requests);
            return;
        }
        let index = self.raw.raft.raft_log.last_index() + 1;
        let term = self.raw.raft.term;
        match self.raw.propose(Vec::new(), encode_batch(&records)) {
            Ok(()) => {
                assert_eq!(self.raw.raft.raft_log.last_index(), index);
                self.in_flight = Some(InFlightBatch {
                    index,
                    term,
                    results,
                    requests,
                });
            }
            Err(_) => {
                let leader_hint = self.leader_id();
                let failed = results
                    .into_iter()
                    .map(|(id, _)| (id, Err(ProposalError::NotController { leader_hint })))
                    .collect();
                self.complete(failed, &requests);
            }
        }
    }

    fn complete(
        &mut self,
        results: Vec<(Option<ProposalId>, ProposalResult)>,
        requests: &[Request],
    ) {
        for request in requests {
            match request {
                Request::Register(registration) => {
                    self.registering
                        .remove(&(registration.id, registration.incarnation));
                }
                Request::Fence { id, .. } => {
                    self.fencing.remove(id);
                }
                _ => {}
            }
        }
        for (id, result) in results {
            if let Some(id) = id {
                self.pending_completed.push((id, result));
            }
        }
    }

    fn apply_entry(&mut self, entry: &Entry) {
        assert!(
            entry.index > self.image.applied_index(),
            "entries apply once, in order"
        );
        if entry.get_entry_type() == EntryType::EntryNormal {
            let batch = decode_batch(&entry.data).expect("committed entries decode");
            for record in batch {
                if let Err(error) = self.image.apply(entry.index, &record) {
                    panic!(
                        "committed record at {} does not apply: {error}",
                        entry.index
                    );
                }
                self.note_applied(&record);
                self.pending_applied.push((entry.index, record));
            }
        }
        self.image.advance_to(entry.index);
        if let Some(batch) = self.in_flight.take() {
            if batch.index > entry.index {
                self.in_flight = Some(batch);
            } else {
                let results = if batch.index == entry.index && batch.term == entry.term {
                    batch.results
                } else {
                    let leader_hint = self.leader_id();
                    batch
                        .results
                        .into_iter()
                        .map(|(id, _)| (id, Err(ProposalError::LeadershipLost { leader_hint })))
                        .collect()
                };
                self.complete(results, &batch.requests);
            }
        }
    }

    /// Keeps the active controller's sessions in step with registrations and fences.
    fn note_applied(&mut self, record: &Record) {
        if self.leader_term.is_none() {
            return;
        }
        match record {
            Record::RegisterBroker {
                id, incarnation, ..
            } => {
                let session = Session {
                    incarnation: *incarnation,
                    deadline_ms: self.now_ms + self.config.broker_session_timeout_ms,
                };
                self.sessions.insert(*id, session);
            }
            Record::FenceBroker { id, .. } => {
                self.sessions.remove(id);
            }
            _ => {}
        }
    }

    fn install_snapshot(&mut self, snapshot: Snapshot, persist: &mut PersistBatch) {
        let metadata = snapshot.get_metadata();
        let image: ClusterImage =
            serde_json::from_slice(&snapshot.data).expect("snapshots from the leader decode");
        assert_eq!(image.applied_index(), metadata.index);
        assert!(metadata.index > self.image.applied_index());
        persist.snapshot = Some(SnapshotRecord {
            index: metadata.index,
            term: metadata.term,
            voters: metadata.get_conf_state().voters.clone(),
            data: snapshot.data.to_vec(),
        });
        self.image = image;
        if let Some(batch) = self.in_flight.take() {
            let leader_hint = self.leader_id();
            let failed = batch
                .results
                .into_iter()
                .map(|(id, _)| (id, Err(ProposalError::LeadershipLost { leader_hint })))
                .collect();
            self.complete(failed, &batch.requests);
        }
        self.raw.mut_store().install_snapshot(snapshot);
        self.commit_dirty = true;
    }

    /// Every `snapshot_every_entries` applied entries: snapshot the image, compact the log.
    fn maybe_snapshot(&mut self) {
        let applied = self.image.applied_index();
        let store = self.raw.store();
        if applied < store.snapshot_index() + self.config.snapshot_every_entries {
            return;
        }
        let term = raft::Storage::term(store, applied).expect("applied entries are in the log");
        let data = serde_json::to_vec(&self.image).expect("images serialize");
        let mut snapshot = Snapshot {
            data: data.clone().into(),
            ..Snapshot::default()
        };
        let metadata = snapshot.mut_metadata();
        metadata.index = applied;
        metadata.term = term;
        let conf_state = voters_conf_state(&self.config.voters);
        metadata.set_conf_state(conf_state.clone());
        self.raw.mut_store().compact(snapshot);
        self.pending_snapshot = Some(SnapshotRecord {
            index: applied,
            term,
            voters: conf_state.voters,
            data,
        });
    }

    fn hard_state_record(&self) -> HardStateRecord {
        let hard_state = self.raw.store().hard_state();
        HardStateRecord {
            term: hard_state.term,
            vote: hard_state.vote,
            commit: hard_state.commit,
        }
    }
}

/// Records carried by one heartbeat reply, at most (whole entries).
pub const HEARTBEAT_RECORDS_MAX: usize = 1024;

fn voters_conf_state(voters: &[u32]) -> ConfState {
    ConfState {
        voters: voters.iter().map(|v| u64::from(*v)).collect(),
        ..ConfState::default()
    }
}

fn encode_messages(messages: Vec<Message>) -> impl Iterator<Item = (u32, Vec<u8>)> {
    messages.into_iter().map(|message| {
        let to = u32::try_from(message.to).expect("voter ids are u32");
        (to, message.write_to_bytes().expect("messages encode"))
    })
}

fn decide(
    image: &ClusterImage,
    request: &Request,
) -> Result<(Vec<Record>, ProposalOutcome), ProposalError> {
    Ok(match request {
        Request::Register(registration) => (
            decisions::register(image, registration)?,
            ProposalOutcome::BrokerRegistered,
        ),
        Request::Fence { id, incarnation } => {
            let current = image
                .broker(*id)
                .is_some_and(|b| b.incarnation == *incarnation);
            if !current {
                return Err(FenceError::UnknownBroker(*id).into());
            }
            (decisions::fence(image, *id)?, ProposalOutcome::BrokerFenced)
        }
        Request::CreateTopic(request) => {
            let (records, partitions) = decisions::create_topic(image, request)?;
            (records, ProposalOutcome::TopicCreated(partitions))
        }
        Request::DeleteTopic(name) => (
            decisions::delete_topic(image, name)?,
            ProposalOutcome::TopicDeleted,
        ),
        Request::AlterPartition(request) => {
            let (records, after) = decisions::alter_partition(image, request)?;
            (records, ProposalOutcome::PartitionAltered(after))
        }
        Request::ControlledShutdown { id, incarnation } => {
            let decision = decisions::controlled_shutdown(image, *id, *incarnation)?;
            let outcome = ProposalOutcome::ShutdownProgress {
                still_leading: decision.still_leading,
            };
            (decision.records, outcome)
        }
    })
}

#[cfg(test)]
#[path = "node_tests.rs"]
mod tests;
