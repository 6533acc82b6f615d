//! One replica of one partition, as a sans-IO state machine (DESIGN §5).
//!
//! The driver feeds [`Input`]s through [`Replica::step`] and carries out the [`Output`]s it
//! gets back, in order: appends, fetches to send, fetches to serve, truncations, completions.
//! The log itself stays with the driver; the replica only learns offsets (what was appended,
//! what is durable), so the same logic runs over glommio DMA files in `wharf` and over `MemDisk`
//! in the simulator.
//!
//! ```text
//!  follower                               leader
//!  SendFetch{offset, last epoch, durable} ──▶ FetchRequest: check epoch, update follower,
//!                                              HW, complete waiters ──▶ ServeFetch{offset}
//!  FetchReply{batches, HW} ◀── driver reads batches (long poll), sends with the current HW
//!  AppendFetched ──▶ FollowerAppended ──▶ Flushed ──▶ next SendFetch (reports durable)
//! ```

use std::collections::BTreeMap;

use wharf_storage::{Epoch, Offset};

use crate::epochs::EpochHistory;
use crate::isr::{self, FollowerView, IsrProposal, IsrRejection, ISR_PROPOSAL_RETRY_MS};

/// A broker in the cluster.
pub type BrokerId = u32;

/// Produces a leader holds at once, appended or about to be (pending appends plus waiters).
/// Producers reach it with enough requests in flight, so beyond it a produce is refused with
/// [`ProduceError::TooManyWaiters`] before anything is appended.
pub const WAITERS_MAX: usize = 1 << 16;
/// Replicas in one replica set.
pub const REPLICAS_MAX: usize = 16;
/// How long a follower waits before fetching a range again that the leader reported corrupt:
/// the leader cannot serve it until repaired, and a tight retry would only load both brokers.
pub const CORRUPT_FETCH_BACKOFF_MS: u64 = 5_000;

/// Why a replica cannot be created (its configuration comes from topic metadata and its log
/// state from recovery: both are input, so neither may crash the broker).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaConfigError {
    #[error("the replica set is empty")]
    NoReplicas,
    #[error("the replica set has {count} replicas (limit {limit})")]
    TooManyReplicas { count: usize, limit: usize },
    #[error("broker {broker} is not in replica set {replicas:?}")]
    NotAReplica {
        broker: BrokerId,
        replicas: Vec<BrokerId>,
    },
    #[error("broker {0} appears more than once in the replica set")]
    DuplicateReplica(BrokerId),
    #[error("log state out of order: start {log_start}, durable {durable}, end {end}")]
    InvalidLogState {
        log_start: Offset,
        durable: Offset,
        end: Offset,
    },
}

/// The shape every replica set must have, wherever it comes from (stored topic metadata, a
/// topic being created, a peer's `ApplyTopic`): non-empty, at most `REPLICAS_MAX` brokers,
/// none twice.
pub fn check_replica_set(replicas: &[BrokerId]) -> Result<(), ReplicaConfigError> {
    if replicas.is_empty() {
        return Err(ReplicaConfigError::NoReplicas);
    }
    if replicas.len() > REPLICAS_MAX {
        return Err(ReplicaConfigError::TooManyReplicas {
            count: replicas.len(),
            limit: REPLICAS_MAX,
        });
    }
    for (i, r) in replicas.iter().enumerate() {
        if replicas[..i].contains(r) {
            return Err(ReplicaConfigError::DuplicateReplica(*r));
        }
    }
    Ok(())
}

/// How many replicas must hold a produce durably before it is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckLevel {
    /// Acknowledged once appended on the leader (the producer does not wait at all).
    None,
    /// Durable on the leader.
    Leader,
    /// Durable on a majority of the replica set, counted among in-sync replicas, the leader
    /// included; in controller mode also on the leader's successor (see below).
    ///
    /// Controller mode, `Quorum` and `Replicas(n)` with n ≥ 2 (the successor rule): the batch
    /// must also be durable on the leader's **successor**, the broker the controller elects if
    /// this leader fails ([`crate::isr::successor`]: the first other ISR member in replica-set
    /// order; while an ISR proposal is pending, the successor under the committed and under the
    /// proposed ISR, since the controller holds one or the other). The election does not look
    /// at offsets, so without this a lagging follower that happens to come first could be
    /// elected and the others would truncate to it. Guarantee: a write so acknowledged survives
    /// the failure of any **one** broker (crash, fence, or falling out of the ISR), the leader
    /// included, because whoever the controller elects holds it; a failure not yet noticed
    /// when the write was acknowledged counts (so does a fence committed that this leader has
    /// not applied yet: within that window it may count the fenced broker as its successor). It does not survive two (the leader dies while
    /// its successor is fenced or has just left the ISR): that is `All`'s job. Static mode has
    /// no election (the first replica always leads), so the rule does not apply there.
    Quorum,
    /// Durable on every in-sync replica, with at least `min_insync_replicas` in sync.
    All,
    /// Durable on this many in-sync replicas, the leader included; for n ≥ 2 in controller
    /// mode also on the leader's successor, as `Quorum`.
    Replicas(u8),
}

/// Identifies a produce waiter; chosen by the driver, unique among its live waiters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WaiterId(pub u64);

#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    pub broker_id: BrokerId,
    /// The replica set, preferred leader first. Fixed for the life of this replica.
    pub replicas: Vec<BrokerId>,
    /// Clamped to the replica set's size.
    pub min_insync_replicas: usize,
    /// A follower that has not caught up with the leader for this long leaves the ISR.
    pub replica_lag_max_ms: u64,
    /// How long a follower waits before fetching again after a failed fetch.
    pub fetch_backoff_ms: u64,
    /// Controller mode (DESIGN §6, KIP-497/KIP-966; see [`crate::isr`]): the leader proposes
    /// ISR changes (`ProposeIsr`) and adopts only what the controller commits
    /// (`IsrCommitted`), and it acknowledges `quorum`/`N`/`all` and advances the high
    /// watermark only while its controller lease (`LeaseRenewed`) lasts. False (static mode):
    /// the leader changes the ISR itself and has no lease.
    pub isr_via_controller: bool,
}

/// Where the log stands when the replica is created (after recovery).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogState {
    pub log_start: Offset,
    pub end: Offset,
    pub durable: Offset,
    /// The high watermark persisted or learned before (never above `durable`).
    pub high_watermark: Offset,
}

/// What an acknowledged produce achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    pub base_offset: Offset,
    pub next_offset: Offset,
    pub leader_epoch: Epoch,
    /// Replicas that held the batch durably when it was acknowledged.
    pub durable_replicas: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProduceError {
    #[error("this replica is not the leader (leader {leader:?}, epoch {epoch})")]
    NotLeader {
        leader: Option<BrokerId>,
        epoch: Epoch,
    },
    #[error("acks need {required} in-sync replicas, {in_sync} are in sync; nothing was appended")]
    NotEnoughReplicas { required: usize, in_sync: usize },
    #[error("appended, but the ISR shrank to {in_sync} (acks need {required}); outcome unknown")]
    NotEnoughReplicasAfterAppend { required: usize, in_sync: usize },
    #[error("acks={0:?} cannot be met by a replica set of {1}")]
    InvalidAcks(AckLevel, usize),
    #[error("timed out with {durable_replicas} replica(s) holding the batch; outcome unknown")]
    Timeout { durable_replicas: u8 },
    #[error(
        "leadership moved to epoch {epoch} before the batch was acknowledged; outcome unknown"
    )]
    LeaderChanged { epoch: Epoch },
    #[error("{limit} produces already wait on this partition (WAITERS_MAX); nothing was appended")]
    TooManyWaiters { limit: usize },
    /// Controller mode: the leader's controller lease ran out (the controller may be electing
    /// another leader), so it acknowledges no `quorum`, `N` or `all` produce. Refused before
    /// appending (nothing was appended), or failing a waiter (outcome unknown).
    #[error("the leader's controller lease expired at {until_ms} ms; it may have been replaced")]
    LeaderLeaseExpired { until_ms: u64 },
}

impl ProduceError {
    /// Whether the producer may retry (all of these may succeed later).
    pub fn is_retriable(&self) -> bool {
        !matches!(self, ProduceError::InvalidAcks(..))
    }
}

/// A follower's fetch, as the leader receives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    pub replica: BrokerId,
    /// The epoch the follower believes the leader has.
    pub leader_epoch: Epoch,
    /// Matches the reply to the request.
    pub fetch_id: u64,
    /// The follower's log end: it holds every offset below.
    pub fetch_offset: Offset,
    /// The epoch of the follower's last record; `None` for an empty log.
    pub last_fetched_epoch: Option<Epoch>,
    /// The follower's durable offset.
    pub durable_offset: Offset,
    /// Whether the leader may hold the fetch until new data arrives. False while the follower
    /// streams (appended data is being flushed): it wants an answer now, with or without data.
    pub may_wait: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("not the leader of epoch {epoch}")]
    NotLeader { epoch: Epoch },
    #[error("fetch for epoch {requested}, the leader is at epoch {current}")]
    FencedEpoch { requested: Epoch, current: Epoch },
    #[error("the follower's log diverges: the leader's epoch {epoch} ends at {end_offset}")]
    Diverging { epoch: Epoch, end_offset: Offset },
    #[error("offset {requested} is below the leader's log start {log_start}")]
    OffsetOutOfRange {
        requested: Offset,
        log_start: Offset,
    },
    #[error("broker {0} is not a replica of this partition")]
    UnknownReplica(BrokerId),
    /// The follower reported offsets no follower of this leader can have: durable above
    /// fetched, fetched above the leader's end, or (checked by the driver, which knows the
    /// batches) an offset inside a batch.
    #[error(
        "invalid replica offsets: fetch offset {fetch_offset}, durable offset {durable_offset}, \
         leader log end {log_end}"
    )]
    InvalidOffsets {
        fetch_offset: Offset,
        durable_offset: Offset,
        log_end: Offset,
    },
    /// The leader's copy of the range starting at `offset` is corrupt: it cannot serve it
    /// until that range is repaired.
    #[error("the leader's data at offset {offset} is corrupt")]
    CorruptData { offset: Offset },
}

/// One batch of a fetch reply, as the follower's driver decoded it from the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchInfo {
    pub base_offset: Offset,
    pub next_offset: Offset,
    pub leader_epoch: Epoch,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchReply {
    Data {
        high_watermark: Offset,
        log_start: Offset,
        batches: Vec<BatchInfo>,
    },
    Error(FetchError),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// Time passes (milliseconds on the driver's monotonic clock).
    Tick { now_ms: u64 },
    /// Lead `epoch`, starting with `isr` in sync (the controller's ISR; the leader included)
    /// at the controller's `partition_epoch` (the version of the partition's leader and ISR
    /// state, which ISR proposals are based on; static mode passes 0).
    BecomeLeader {
        epoch: Epoch,
        isr: Vec<BrokerId>,
        partition_epoch: u64,
    },
    /// Follow `leader` in `epoch`.
    BecomeFollower { epoch: Epoch, leader: BrokerId },
    /// A produce arrives. Answered with `Append` or a failed `Complete`.
    Produce {
        waiter: WaiterId,
        acks: AckLevel,
        deadline_ms: u64,
    },
    /// The driver appended a produce it was told to `Append`.
    ProduceAppended {
        waiter: WaiterId,
        base_offset: Offset,
        next_offset: Offset,
    },
    /// The driver found a produce it was told to `Append` already in the log at
    /// `[base_offset, next_offset)` (an idempotent producer's retry): nothing was appended; it
    /// completes when that range reaches its acks.
    ProduceDuplicate {
        waiter: WaiterId,
        base_offset: Offset,
        next_offset: Offset,
    },
    /// The driver could not append it (bad batch, backpressure, poisoned log): forget it.
    ProduceAborted { waiter: WaiterId },
    /// Everything below `durable` is durable on this replica.
    Flushed { durable: Offset },
    /// Leader: a follower's fetch arrived.
    FetchRequest(FetchRequest),
    /// Follower: the leader answered fetch `fetch_id`.
    FetchReply {
        fetch_id: u64,
        leader_epoch: Epoch,
        reply: FetchReply,
    },
    /// Follower: fetch `fetch_id` failed in transit (connection lost, timeout).
    FetchFailed { fetch_id: u64 },
    /// Follower: the driver appended the batches of an `AppendFetched`.
    FetchedAppended { next_offset: Offset },
    /// Follower: the driver truncated the log as told; it now ends at `end` and is durable
    /// below `durable` (truncation flushes what was staged below the cut, so this is usually
    /// `end`, and no later flush will report it).
    Truncated { end: Offset, durable: Offset },
    /// Follower: the driver emptied the log as told by `ResetLog`: it now starts, ends and is
    /// durable at `start`.
    LogReset { start: Offset },
    /// Retention deleted the log below `log_start`. A leader answers fetches below it with
    /// `OffsetOutOfRange` (and accepts a follower's empty log starting there).
    LogStartMoved { log_start: Offset },
    /// Controller mode: the controller committed this ISR at `partition_epoch` (this leader's
    /// proposal, or its own change, say after fencing a broker). Every committed change of the
    /// partition within the current leader epoch must reach the leader (from the metadata log),
    /// even if an answer to a proposal was lost. Older or repeated epochs are ignored; so is
    /// the input on a follower and in static mode.
    IsrCommitted {
        isr: Vec<BrokerId>,
        partition_epoch: u64,
    },
    /// Controller mode: the controller refused the proposal based on `partition_epoch` (the
    /// epoch the `ProposeIsr` carried; answers to other proposals are ignored).
    IsrRejected {
        partition_epoch: u64,
        reason: IsrRejection,
    },
    /// Controller mode: the controller granted this broker a lease up to `until_ms` (on the
    /// driver's clock, as `Tick`). Measure it from when the heartbeat was *sent*, minus a
    /// margin for clock-rate drift and the tick interval (the replica judges it by its last
    /// `Tick`), so that it always ends before the controller's session timeout fences this
    /// broker. Leases only grow; ignored in static mode.
    LeaseRenewed { until_ms: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Leader: append the waiter's batches with this epoch, then report `ProduceAppended`.
    Append {
        waiter: WaiterId,
        leader_epoch: Epoch,
    },
    /// A produce is answered.
    Complete {
        waiter: WaiterId,
        result: Result<Ack, ProduceError>,
    },
    /// Leader: answer `replica`'s fetch with batches from `fetch_offset` (waiting for new data
    /// up to the request's max wait), stamped with the high watermark at the time of sending.
    ServeFetch {
        replica: BrokerId,
        fetch_id: u64,
        fetch_offset: Offset,
        may_wait: bool,
    },
    /// Leader: answer `replica`'s fetch with an error.
    RejectFetch {
        replica: BrokerId,
        fetch_id: u64,
        error: FetchError,
    },
    /// Follower: send this fetch to `leader`.
    SendFetch {
        leader: BrokerId,
        request: FetchRequest,
    },
    /// Follower: append the first `count` batches of the last reply, then report
    /// `FetchedAppended` (and flush as usual; the next fetch goes out once they are durable).
    AppendFetched { count: usize },
    /// Follower: truncate the log to `to` (a batch boundary), then report `Truncated`.
    Truncate { to: Offset },
    /// Follower: the leader's log starts above this log's end (retention deleted what it would
    /// fetch): discard the whole log durably, restart it empty at `start`, then report
    /// `LogReset` (Kafka's truncate-fully-and-start-at).
    ResetLog { start: Offset },
    /// Persist the epoch history before acting on later outputs (it changed).
    EpochHistoryChanged,
    /// The high watermark moved: wake consumers waiting for data.
    HighWatermark(Offset),
    /// Leader: the ISR changed (static mode: the leader decided; controller mode: the
    /// controller committed it). For describe and metrics; in static mode also for the
    /// controller.
    IsrChanged(Vec<BrokerId>),
    /// Controller mode, leader: ask the controller to make `isr` the ISR (Kafka
    /// AlterPartition), applicable only while the partition is at `partition_epoch` and
    /// `leader_epoch`. Answer with `IsrCommitted` or `IsrRejected`; the replica sends the same
    /// proposal again after `ISR_PROPOSAL_RETRY_MS` without an answer, and never has more than
    /// one outstanding.
    ProposeIsr {
        isr: Vec<BrokerId>,
        leader_epoch: Epoch,
        partition_epoch: u64,
    },
}

/// The outputs of a step, in the order the driver must carry them out.
pub type Outbox = Vec<Output>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower { leader: BrokerId },
}

#[derive(Clone, Copy, Debug)]
struct FollowerProgress {
    /// The follower holds every offset below this (as checked against our epochs).
    fetch_offset: Offset,
    durable_offset: Offset,
    last_caught_up_ms: u64,
    /// Our log end and the time when we last served this follower.
    last_fetch_leader_end: Offset,
    last_fetch_ms: u64,
    fetched_this_epoch: bool,
}

#[derive(Clone, Copy, Debug)]
struct ProduceWaiter {
    id: WaiterId,
    acks: AckLevel,
    deadline_ms: u64,
    base_offset: Offset,
    next_offset: Offset,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FetchPhase {
    /// Nothing outstanding: send a fetch on the next step that can.
    Idle,
    /// Fetch `id` is out.
    Fetching {
        id: u64,
    },
    /// The driver appends `count` batches ending at `next`.
    Appending {
        next: Offset,
    },
    /// What was appended is being flushed. The next fetch goes out at once without letting the
    /// leader wait (pipelining fetch and flush under load), unless the last answer was empty:
    /// then it waits for the flush, so the fetch after it reports the durable offset.
    AwaitingFlush {
        last_reply_empty: bool,
    },
    Truncating,
    /// The driver empties the log (`ResetLog`).
    Resetting,
    /// Fetch again at this time.
    Backoff {
        until_ms: u64,
    },
}

#[derive(Debug)]
pub struct Replica {
    config: ReplicaConfig,
    role: Role,
    epoch: Epoch,
    epochs: EpochHistory,
    now_ms: u64,
    log_start: Offset,
    end: Offset,
    durable: Offset,
    high_watermark: Offset,
    // Leader state.
    /// The committed ISR (in static mode, the one the leader decided).
    isr: Vec<BrokerId>,
    /// Controller mode: the committed partition epoch (ISR proposals are based on it).
    partition_epoch: u64,
    /// Controller mode: the one ISR proposal not yet superseded.
    proposal: Option<IsrProposal>,
    /// Controller mode: no new proposal before this time (the last one was refused).
    proposal_blocked_until_ms: u64,
    /// Controller mode: the controller lease ends here (`LeaseRenewed`; survives role changes:
    /// it is the broker's lease).
    lease_until_ms: u64,
    /// Controller mode: the controller said a newer leader epoch exists; acknowledge nothing
    /// until the next role change.
    fenced: bool,
    /// Controller mode, leader: the end of the highest range acknowledged in this epoch to a
    /// produce that needed the successor (`quorum`, `N` ≥ 2). A follower joins the ISR only
    /// holding it durably: a joiner placed before the successor in replica order becomes the
    /// new successor, and it must not lack what the old one was waited for.
    acknowledged_end: Offset,
    followers: BTreeMap<BrokerId, FollowerProgress>,
    waiters: Vec<ProduceWaiter>,
    /// Produces told to `Append`, not yet reported appended: their ack level and deadline.
    pending: BTreeMap<WaiterId, (AckLevel, u64)>,
    // Follower state.
    phase: FetchPhase,
    next_fetch_id: u64,
    leader_high_watermark: Offset,
}

impl Replica {
    /// A replica that neither leads nor follows until told to (`BecomeLeader`/`BecomeFollower`).
    /// Fails on a replica set or log state no replica can work with (a forged or damaged topic
    /// must fail that partition, not crash the broker at every start).
    pub fn new(
        config: ReplicaConfig,
        log: LogState,
        epochs: EpochHistory,
        now_ms: u64,
    ) -> Result<Replica, ReplicaConfigError> {
        check_replica_set(&config.replicas)?;
        if !config.replicas.contains(&config.broker_id) {
            return Err(ReplicaConfigError::NotAReplica {
                broker: config.broker_id,
                replicas: config.replicas,
            });
        }
        if !(log.log_start <= log.durable && log.durable <= log.end) {
            return Err(ReplicaConfigError::InvalidLogState {
                log_start: log.log_start,
                durable: log.durable,
                end: log.end,
            });
        }
        let mut config = config;
        config.min_insync_replicas = config.min_insync_replicas.clamp(1, config.replicas.len());
        let high_watermark = log.high_watermark.min(log.durable).max(log.log_start);
        Ok(Replica {
            epoch: epochs.latest().unwrap_or(Epoch(0)),
            role: Role::Follower {
                leader: config.broker_id,
            },
            config,
            epochs,
            now_ms,
            log_start: log.log_start,
            end: log.end,
            durable: log.durable,
            high_watermark,
            isr: Vec::new(),
            partition_epoch: 0,
            proposal: None,
            proposal_blocked_until_ms: 0,
            lease_until_ms: 0,
            fenced: false,
            acknowledged_end: Offset::ZERO,
            followers: BTreeMap::new(),
            waiters: Vec::new(),
            pending: BTreeMap::new(),
            phase: FetchPhase::Idle,
            next_fetch_id: 1,
            leader_high_watermark: high_watermark,
        })
    }

    /// Whether the driver is changing the follower log (appending fetched batches, truncating,
    /// resetting): `BecomeLeader` must wait until it reported the change done.
    pub fn changing_log(&self) -> bool {
        matches!(
            self.phase,
            FetchPhase::Truncating | FetchPhase::Resetting | FetchPhase::Appending { .. }
        )
    }

    pub fn role(&self) -> Role {
        self.role
    }
    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader
    }
    pub fn leader_epoch(&self) -> Epoch {
        self.epoch
    }
    pub fn high_watermark(&self) -> Offset {
        self.high_watermark
    }
    pub fn end_offset(&self) -> Offset {
        self.end
    }
    pub fn durable_offset(&self) -> Offset {
        self.durable
    }
    pub fn epochs(&self) -> &EpochHistory {
        &self.epochs
    }
    pub fn replicas(&self) -> &[BrokerId] {
        &self.config.replicas
    }
    pub fn min_insync_replicas(&self) -> usize {
        self.config.min_insync_replicas
    }
    /// The in-sync replicas (leader only; empty on a follower). In controller mode, the
    /// committed ISR.
    pub fn isr(&self) -> &[BrokerId] {
        &self.isr
    }
    /// Controller mode: the ISR proposal not yet superseded, if any.
    pub fn proposed_isr(&self) -> Option<&[BrokerId]> {
        self.proposal.as_ref().map(|p| p.isr.as_slice())
    }
    /// The ISR the high watermark waits for: the committed ISR, plus in controller mode the
    /// members of a pending proposal.
    pub fn maximal_isr(&self) -> Vec<BrokerId> {
        isr::maximal_isr(&self.isr, self.proposed_isr())
    }
    /// Controller mode: the committed partition epoch this replica knows.
    pub fn partition_epoch(&self) -> u64 {
        self.partition_epoch
    }
    /// Controller mode: when the controller lease ends (0: never granted).
    pub fn lease_until_ms(&self) -> u64 {
        self.lease_until_ms
    }
    /// Whether this leader may acknowledge `quorum`/`N`/`all` produces and advance its high
    /// watermark now: always in static mode; in controller mode while its lease lasts and the
    /// controller has not fenced its epoch.
    pub fn may_acknowledge(&self) -> bool {
        !self.config.isr_via_controller || (!self.fenced && self.now_ms < self.lease_until_ms)
    }
    pub fn waiting_produces(&self) -> usize {
        self.waiters.len()
    }
    /// Produces holding one of the `WAITERS_MAX` slots: told to append and not yet reported
    /// appended or aborted, or waiting for their acks.
    pub fn produces_in_progress(&self) -> usize {
        self.pending.len() + self.waiters.len()
    }
    /// Leader: per follower, how far behind our end it is (offsets) and since when it has not
    /// caught up (ms).
    pub fn follower_lag(&self) -> Vec<(BrokerId, u64, u64)> {
        self.followers
            .iter()
            .map(|(&id, p)| {
                (
                    id,
                    self.end.0.saturating_sub(p.fetch_offset.0),
                    self.now_ms.saturating_sub(p.last_caught_up_ms),
                )
            })
            .collect()
    }

    /// Moves the replica one step; the outputs are appended to `outbox` in order.
    pub fn step(&mut self, input: Input, outbox: &mut Outbox) {
        match input {
            Input::Tick { now_ms } => self.on_tick(now_ms, outbox),
            Input::BecomeLeader {
                epoch,
                isr,
                partition_epoch,
            } => self.become_leader(epoch, isr, partition_epoch, outbox),
            Input::BecomeFollower { epoch, leader } => self.become_follower(epoch, leader, outbox),
            Input::Produce {
                waiter,
                acks,
                deadline_ms,
            } => self.on_produce(waiter, acks, deadline_ms, outbox),
            Input::ProduceAppended {
                waiter,
                base_offset,
                next_offset,
            } => self.on_produce_appended(waiter, base_offset, next_offset, outbox),
            Input::ProduceDuplicate {
                waiter,
                base_offset,
                next_offset,
            } => self.on_produce_duplicate(waiter, base_offset, next_offset, outbox),
            Input::ProduceAborted { waiter } => {
                self.pending.remove(&waiter);
            }
            Input::Flushed { durable } => self.on_flushed(durable, outbox),
            Input::FetchRequest(request) => self.on_fetch_request(request, outbox),
            Input::FetchReply {
                fetch_id,
                leader_epoch,
                reply,
            } => self.on_fetch_reply(fetch_id, leader_epoch, reply, outbox),
            Input::FetchFailed { fetch_id } => {
                if self.phase == (FetchPhase::Fetching { id: fetch_id }) {
                    self.phase = FetchPhase::Backoff {
                        until_ms: self.now_ms + self.config.fetch_backoff_ms,
                    };
                }
            }
            Input::FetchedAppended { next_offset } => {
                let FetchPhase::Appending { next } = self.phase else {
                    panic!("FetchedAppended in phase {:?}", self.phase);
                };
                assert_eq!(
                    next_offset, next,
                    "appended batches end elsewhere than told"
                );
                self.end = next_offset;
                self.phase = FetchPhase::AwaitingFlush {
                    last_reply_empty: false,
                };
                self.maybe_fetch(outbox);
            }
            Input::Truncated { end, durable } => {
                assert_eq!(self.phase, FetchPhase::Truncating, "unexpected truncation");
                assert!(end >= self.log_start && end <= self.end);
                assert!(
                    durable <= end,
                    "durable {durable} beyond the truncated end {end}"
                );
                self.end = end;
                // Take the log's word: the truncation may have made staged data durable, and
                // a follower waiting for a flush that never comes would stop fetching.
                self.durable = durable;
                if self.epochs.truncate(end) {
                    // The persisted history must forget these epochs too: kept there, they
                    // would outlive a crash and claim offsets that the next leader's batches
                    // fill with another epoch's data, and a follower asking where its copy
                    // of such an epoch ends would be answered beyond the divergence (sim seed
                    // 5101248181277296577, controller mode, idempotent retries).
                    outbox.push(Output::EpochHistoryChanged);
                }
                self.phase = FetchPhase::Idle;
                self.maybe_fetch(outbox);
            }
            Input::LogStartMoved { log_start } => {
                // Retention keeps the active segment: the start never passes the end.
                self.log_start = self.log_start.max(log_start.min(self.end));
            }
            Input::LogReset { start } => {
                assert_eq!(self.phase, FetchPhase::Resetting, "unexpected log reset");
                self.log_start = start;
                self.end = start;
                self.durable = start;
                // Nothing is left for any epoch to cover; the next batches begin entries again.
                if !self.epochs.entries().is_empty() {
                    self.epochs.clear();
                    outbox.push(Output::EpochHistoryChanged);
                }
                // The high watermark stays where it was (possibly below the new start): only
                // the leader's next answer moves it, so it never runs ahead of the leader's.
                self.phase = FetchPhase::Idle;
                self.maybe_fetch(outbox);
            }
            Input::IsrCommitted {
                isr,
                partition_epoch,
            } => self.on_isr_committed(isr, partition_epoch, outbox),
            Input::IsrRejected {
                partition_epoch,
                reason,
            } => self.on_isr_rejected(partition_epoch, reason, outbox),
            Input::LeaseRenewed { until_ms } => {
                if !self.config.isr_via_controller || until_ms <= self.lease_until_ms {
                    return;
                }
                self.lease_until_ms = until_ms;
                if self.is_leader() {
                    self.update_high_watermark(outbox);
                    self.complete_waiters(outbox);
                }
            }
        }
    }

    fn on_tick(&mut self, now_ms: u64, outbox: &mut Outbox) {
        self.now_ms = self.now_ms.max(now_ms);
        match self.role {
            Role::Leader => {
                if self.config.isr_via_controller {
                    self.maybe_propose_isr(outbox);
                    if !self.may_acknowledge() {
                        // The lease ran out: fail what waits for followers (`complete_waiters`).
                        self.complete_waiters(outbox);
                    }
                } else {
                    self.shrink_isr(outbox);
                }
                let now = self.now_ms;
                let mut expired = Vec::new();
                self.waiters.retain(|w| {
                    let keep = w.deadline_ms > now;
                    if !keep {
                        expired.push(*w);
                    }
                    keep
                });
                for waiter in expired {
                    let durable_replicas = self.durable_count(waiter.next_offset);
                    outbox.push(Output::Complete {
                        waiter: waiter.id,
                        result: Err(ProduceError::Timeout { durable_replicas }),
                    });
                }
            }
            Role::Follower { .. } => {
                if let FetchPhase::Backoff { until_ms } = self.phase {
                    if until_ms <= self.now_ms {
                        self.phase = FetchPhase::Idle;
                    }
                }
                self.maybe_fetch(outbox);
            }
        }
    }

    fn become_leader(
        &mut self,
        epoch: Epoch,
        isr: Vec<BrokerId>,
        partition_epoch: u64,
        outbox: &mut Outbox,
    ) {
        assert!(
            epoch >= self.epoch,
            "epoch went back from {} to {epoch}",
            self.epoch
        );
        assert!(
            isr.contains(&self.config.broker_id),
            "leader outside its ISR"
        );
        assert!(isr.iter().all(|r| self.config.replicas.contains(r)));
        if matches!(
            self.phase,
            FetchPhase::Truncating | FetchPhase::Resetting | FetchPhase::Appending { .. }
        ) {
            // The driver finishes the operation in progress before acting on this input.
            panic!("BecomeLeader while the follower log is being changed");
        }
        self.fail_waiters(epoch, outbox);
        self.role = Role::Leader;
        self.epoch = epoch;
        // A history at its limit (persisted so, say) must not stop a leader from starting:
        // forgetting old epochs only makes followers that still have them fetch again.
        self.epochs.make_room(self.log_start);
        match self.epochs.begin(epoch, self.end) {
            Ok(true) => outbox.push(Output::EpochHistoryChanged),
            Ok(false) => {}
            // Entries never start beyond the log end (dropped at recovery and truncation).
            Err(error) => panic!("cannot begin epoch {epoch} at {}: {error}", self.end),
        }
        self.phase = FetchPhase::Idle;
        let now = self.now_ms;
        let end = self.end;
        self.followers = self
            .config
            .replicas
            .iter()
            .filter(|&&r| r != self.config.broker_id)
            .map(|&r| {
                (
                    r,
                    FollowerProgress {
                        fetch_offset: Offset::ZERO,
                        durable_offset: Offset::ZERO,
                        // A grace period of one lag limit to fetch in the new epoch.
                        last_caught_up_ms: now,
                        last_fetch_leader_end: end,
                        last_fetch_ms: now,
                        fetched_this_epoch: false,
                    },
                )
            })
            .collect();
        let mut isr = isr;
        isr.sort_unstable();
        isr.dedup();
        self.isr = isr;
        self.partition_epoch = partition_epoch;
        self.proposal = None;
        self.proposal_blocked_until_ms = 0;
        self.fenced = false;
        // The previous leader may have acknowledged batches above the HW that it waited for
        // this broker (its successor) to hold: a joiner must hold all that this log has.
        self.acknowledged_end = end;
        outbox.push(Output::IsrChanged(self.isr.clone()));
        self.update_high_watermark(outbox);
    }

    fn become_follower(&mut self, epoch: Epoch, leader: BrokerId, outbox: &mut Outbox) {
        assert!(
            epoch >= self.epoch,
            "epoch went back from {} to {epoch}",
            self.epoch
        );
        assert_ne!(leader, self.config.broker_id, "following itself");
        assert!(self.config.replicas.contains(&leader));
        self.fail_waiters(epoch, outbox);
        self.role = Role::Follower { leader };
        self.epoch = epoch;
        self.isr.clear();
        self.followers.clear();
        self.proposal = None;
        self.fenced = false;
        self.leader_high_watermark = self.high_watermark;
        match self.phase {
            // Let the log operation in progress finish; the next fetch uses the new epoch.
            FetchPhase::Appending { .. }
            | FetchPhase::Truncating
            | FetchPhase::Resetting
            | FetchPhase::AwaitingFlush { .. } => {}
            _ => self.phase = FetchPhase::Idle,
        }
        self.maybe_fetch(outbox);
    }

    fn fail_waiters(&mut self, epoch: Epoch, outbox: &mut Outbox) {
        for waiter in self.waiters.drain(..) {
            outbox.push(Output::Complete {
                waiter: waiter.id,
                result: Err(ProduceError::LeaderChanged { epoch }),
            });
        }
    }

    fn required(&self, acks: AckLevel) -> Result<usize, ProduceError> {
        let replicas = self.config.replicas.len();
        match acks {
            AckLevel::None | AckLevel::Leader => Ok(1),
            AckLevel::Quorum => Ok(replicas / 2 + 1),
            AckLevel::All => Ok(self.config.min_insync_replicas),
            AckLevel::Replicas(n) if n >= 1 && usize::from(n) <= replicas => Ok(usize::from(n)),
            AckLevel::Replicas(_) => Err(ProduceError::InvalidAcks(acks, replicas)),
        }
    }

    /// In-sync replicas (the leader included) an ack level needs: what it counts, and never
    /// fewer than `min_insync_replicas` for the levels that wait for followers (DESIGN §1:
    /// below it `quorum`, `N` and `all` are refused, they never silently degrade).
    fn isr_needed(&self, acks: AckLevel) -> Result<usize, ProduceError> {
        let required = self.required(acks)?;
        Ok(match acks {
            AckLevel::None | AckLevel::Leader => required,
            AckLevel::Quorum | AckLevel::Replicas(_) | AckLevel::All => {
                required.max(self.config.min_insync_replicas)
            }
        })
    }

    fn on_produce(
        &mut self,
        waiter: WaiterId,
        acks: AckLevel,
        deadline_ms: u64,
        outbox: &mut Outbox,
    ) {
        let result = match self.role {
            Role::Follower { leader } => Err(ProduceError::NotLeader {
                leader: (leader != self.config.broker_id).then_some(leader),
                epoch: self.epoch,
            }),
            Role::Leader if self.fenced => Err(ProduceError::NotLeader {
                leader: None,
                epoch: self.epoch,
            }),
            Role::Leader => self.isr_needed(acks).and_then(|required| {
                if self.waits_for_followers(acks) && !self.may_acknowledge() {
                    Err(ProduceError::LeaderLeaseExpired {
                        until_ms: self.lease_until_ms,
                    })
                } else if self.isr.len() < required {
                    Err(ProduceError::NotEnoughReplicas {
                        required,
                        in_sync: self.isr.len(),
                    })
                } else if self.pending.len() + self.waiters.len() >= WAITERS_MAX {
                    Err(ProduceError::TooManyWaiters { limit: WAITERS_MAX })
                } else {
                    Ok(())
                }
            }),
        };
        match result {
            Ok(()) => {
                let previous = self.pending.insert(waiter, (acks, deadline_ms));
                assert!(previous.is_none(), "waiter id {waiter:?} reused");
                outbox.push(Output::Append {
                    waiter,
                    leader_epoch: self.epoch,
                });
            }
            Err(error) => outbox.push(Output::Complete {
                waiter,
                result: Err(error),
            }),
        }
    }

    fn on_produce_appended(
        &mut self,
        waiter: WaiterId,
        base_offset: Offset,
        next_offset: Offset,
        outbox: &mut Outbox,
    ) {
        let (acks, deadline_ms) = self
            .pending
            .remove(&waiter)
            .expect("ProduceAppended for a produce that was not told to Append");
        if !self.is_leader() || self.fenced {
            // Leadership moved between Append and now: the append happened in the old epoch.
            outbox.push(Output::Complete {
                waiter,
                result: Err(ProduceError::LeaderChanged { epoch: self.epoch }),
            });
            return;
        }
        assert_eq!(
            base_offset, self.end,
            "produce appended away from the log end"
        );
        assert!(next_offset > base_offset);
        self.end = next_offset;
        // `on_produce` admits no more than WAITERS_MAX pending appends and waiters together.
        assert!(self.waiters.len() < WAITERS_MAX, "too many produce waiters");
        self.waiters.push(ProduceWaiter {
            id: waiter,
            acks,
            deadline_ms,
            base_offset,
            next_offset,
        });
        self.complete_waiters(outbox);
    }

    fn on_produce_duplicate(
        &mut self,
        waiter: WaiterId,
        base_offset: Offset,
        next_offset: Offset,
        outbox: &mut Outbox,
    ) {
        let (acks, deadline_ms) = self
            .pending
            .remove(&waiter)
            .expect("ProduceDuplicate for a produce that was not told to Append");
        if !self.is_leader() || self.fenced {
            outbox.push(Output::Complete {
                waiter,
                result: Err(ProduceError::LeaderChanged { epoch: self.epoch }),
            });
            return;
        }
        assert!(
            base_offset < next_offset && next_offset <= self.end,
            "a duplicate [{base_offset}, {next_offset}) outside the log (end {})",
            self.end
        );
        // Offsets only: the waiter completes as any other once its range reaches the acks.
        self.waiters.push(ProduceWaiter {
            id: waiter,
            acks,
            deadline_ms,
            base_offset,
            next_offset,
        });
        self.complete_waiters(outbox);
    }

    fn on_flushed(&mut self, durable: Offset, outbox: &mut Outbox) {
        assert!(
            durable <= self.end,
            "durable {durable} beyond end {}",
            self.end
        );
        if durable <= self.durable {
            return;
        }
        self.durable = durable;
        match self.role {
            Role::Leader => {
                self.update_high_watermark(outbox);
                self.complete_waiters(outbox);
            }
            Role::Follower { .. } => {
                self.update_follower_high_watermark(outbox);
                self.maybe_fetch(outbox);
            }
        }
    }

    /// Leader: whether `request` would be served, without changing anything. The driver calls
    /// it to know whether the offsets are worth checking against the log's batches (a diverging
    /// follower's offsets mean nothing in this log); `step` checks the same.
    pub fn validate_fetch(&self, request: &FetchRequest) -> Result<(), FetchError> {
        if !self.is_leader() {
            return Err(FetchError::NotLeader { epoch: self.epoch });
        }
        if request.leader_epoch != self.epoch {
            return Err(FetchError::FencedEpoch {
                requested: request.leader_epoch,
                current: self.epoch,
            });
        }
        if !self.followers.contains_key(&request.replica) {
            return Err(FetchError::UnknownReplica(request.replica));
        }
        let invalid = FetchError::InvalidOffsets {
            fetch_offset: request.fetch_offset,
            durable_offset: request.durable_offset,
            log_end: self.end,
        };
        // A follower holds what it made durable: durable above fetched is a forged or broken
        // report, and counting it would move the HW over data the follower does not have.
        if request.durable_offset > request.fetch_offset {
            return Err(invalid);
        }
        // Only this leader writes its epoch, so a follower's copy of it is a prefix of ours;
        // anything longer is not divergence but a false report.
        if request.last_fetched_epoch == Some(self.epoch) && request.fetch_offset > self.end {
            return Err(invalid);
        }
        if let Some(last_epoch) = request.last_fetched_epoch {
            let diverging = match self.epochs.end_of(last_epoch, self.end) {
                // The follower's last epoch is unknown here (its suffix was written by a
                // leader this log never followed), or our copy of it ends below its log end.
                Some((epoch, end_offset))
                    if epoch != last_epoch || end_offset < request.fetch_offset =>
                {
                    Some((epoch, end_offset))
                }
                Some(_) => None,
                // Every epoch we have is newer: nothing of the follower's log is known to match.
                None => Some((last_epoch, self.log_start)),
            };
            if let Some((epoch, end_offset)) = diverging {
                return Err(FetchError::Diverging { epoch, end_offset });
            }
        } else if request.fetch_offset > self.log_start {
            // No epoch for a non-empty log is a malformed request: treat it as diverging.
            return Err(FetchError::Diverging {
                epoch: Epoch(0),
                end_offset: self.log_start,
            });
        }
        if request.fetch_offset < self.log_start {
            return Err(FetchError::OffsetOutOfRange {
                requested: request.fetch_offset,
                log_start: self.log_start,
            });
        }
        // The epoch check bounds the fetch offset by our end; kept as a check, not an assert,
        // because every field here comes from the network.
        if request.fetch_offset > self.end {
            return Err(invalid);
        }
        Ok(())
    }

    fn on_fetch_request(&mut self, request: FetchRequest, outbox: &mut Outbox) {
        if let Err(error) = self.validate_fetch(&request) {
            // Rejected: no progress, HW or ISR change.
            outbox.push(Output::RejectFetch {
                replica: request.replica,
                fetch_id: request.fetch_id,
                error,
            });
            return;
        }
        let now = self.now_ms;
        let end = self.end;
        let high_watermark = self.high_watermark;
        let progress = self
            .followers
            .get_mut(&request.replica)
            .expect("checked above");
        progress.fetch_offset = request.fetch_offset;
        progress.durable_offset = request.durable_offset;
        progress.fetched_this_epoch = true;
        if request.fetch_offset >= end {
            progress.last_caught_up_ms = now;
        } else if request.fetch_offset >= progress.last_fetch_leader_end {
            progress.last_caught_up_ms = progress.last_caught_up_ms.max(progress.last_fetch_ms);
        }
        progress.last_fetch_leader_end = end;
        progress.last_fetch_ms = now;
        let rejoins = !self.isr.contains(&request.replica)
            && request.fetch_offset >= end
            && progress.durable_offset >= high_watermark;
        if self.config.isr_via_controller {
            // The controller decides; `maybe_propose_isr` judges the join rule again.
            if rejoins {
                self.maybe_propose_isr(outbox);
            }
        } else if rejoins {
            self.isr.push(request.replica);
            self.isr.sort_unstable();
            outbox.push(Output::IsrChanged(self.isr.clone()));
        }
        self.update_high_watermark(outbox);
        self.complete_waiters(outbox);
        outbox.push(Output::ServeFetch {
            replica: request.replica,
            fetch_id: request.fetch_id,
            fetch_offset: request.fetch_offset,
            may_wait: request.may_wait,
        });
    }

    fn on_fetch_reply(
        &mut self,
        fetch_id: u64,
        leader_epoch: Epoch,
        reply: FetchReply,
        outbox: &mut Outbox,
    ) {
        if self.phase != (FetchPhase::Fetching { id: fetch_id }) {
            return; // A duplicate or a reply to a fetch we gave up on.
        }
        if self.is_leader() {
            self.phase = FetchPhase::Idle;
            return;
        }
        if leader_epoch != self.epoch {
            // A reply from another epoch's leader: retry after a backoff.
            self.phase = FetchPhase::Backoff {
                until_ms: self.now_ms + self.config.fetch_backoff_ms,
            };
            return;
        }
        match reply {
            FetchReply::Data {
                high_watermark,
                log_start,
                batches,
            } => {
                let _ = log_start;
                self.leader_high_watermark = self.leader_high_watermark.max(high_watermark);
                let mut next = self.end;
                let mut count = 0;
                let mut history_changed = false;
                for batch in &batches {
                    if batch.base_offset != next
                        || batch.next_offset <= batch.base_offset
                        || batch.leader_epoch > self.epoch
                    {
                        break; // Keep the contiguous prefix; fetch the rest again.
                    }
                    if count == 0
                        && self
                            .epochs
                            .entries()
                            .last()
                            .is_some_and(|&(_, start)| start >= next)
                    {
                        // Epochs that begin at our log end wrote nothing here (we led one
                        // briefly, say): the leader's batches decide what covers these offsets.
                        self.epochs.truncate(next);
                        history_changed = true;
                    }
                    if self.epochs.latest().is_none_or(|e| batch.leader_epoch > e) {
                        self.epochs.make_room(self.log_start);
                        match self.epochs.begin(batch.leader_epoch, batch.base_offset) {
                            Ok(changed) => history_changed |= changed,
                            // Batches start at our end, above every entry: cannot happen, but
                            // the epochs come from the network, so stop here rather than crash.
                            Err(_) => break,
                        }
                    } else if self.epochs.latest().is_some_and(|e| batch.leader_epoch < e) {
                        break; // Epochs never go back inside a log.
                    }
                    next = batch.next_offset;
                    count += 1;
                }
                if history_changed {
                    outbox.push(Output::EpochHistoryChanged);
                }
                self.update_follower_high_watermark(outbox);
                if count == 0 && !batches.is_empty() {
                    // Nothing usable (misaligned or out of order): do not spin on it.
                    self.phase = FetchPhase::Backoff {
                        until_ms: self.now_ms + self.config.fetch_backoff_ms,
                    };
                } else if count == 0 {
                    self.phase = if self.durable < self.end {
                        FetchPhase::AwaitingFlush {
                            last_reply_empty: true,
                        }
                    } else {
                        FetchPhase::Idle
                    };
                    self.maybe_fetch(outbox);
                } else {
                    self.phase = FetchPhase::Appending { next };
                    outbox.push(Output::AppendFetched { count });
                }
            }
            FetchReply::Error(FetchError::Diverging { epoch, end_offset }) => {
                let to = self
                    .epochs
                    .divergence_point(epoch, end_offset, self.log_start, self.end);
                if to < self.end {
                    self.phase = FetchPhase::Truncating;
                    outbox.push(Output::Truncate { to });
                } else if self.log_start == self.end && end_offset < self.log_start {
                    // Nothing left to truncate, and the leader wants this log to start lower
                    // than it does (an empty log reset at a start another leader's log is
                    // below): start again where the leader says.
                    self.phase = FetchPhase::Resetting;
                    outbox.push(Output::ResetLog { start: end_offset });
                } else {
                    // Nothing above the point: the leader's answer was for an older state.
                    self.phase = FetchPhase::Backoff {
                        until_ms: self.now_ms + self.config.fetch_backoff_ms,
                    };
                }
            }
            FetchReply::Error(FetchError::OffsetOutOfRange { log_start, .. })
                if log_start > self.end =>
            {
                // Retention on the leader deleted what this log would fetch next: nothing of
                // it can be copied, so drop the whole log and start at the leader's log start.
                self.phase = FetchPhase::Resetting;
                outbox.push(Output::ResetLog { start: log_start });
            }
            FetchReply::Error(FetchError::CorruptData { .. }) => {
                // The leader cannot serve this range until it is repaired: ask again slowly.
                self.phase = FetchPhase::Backoff {
                    until_ms: self.now_ms
                        + CORRUPT_FETCH_BACKOFF_MS.max(self.config.fetch_backoff_ms),
                };
            }
            FetchReply::Error(_) => {
                self.phase = FetchPhase::Backoff {
                    until_ms: self.now_ms + self.config.fetch_backoff_ms,
                };
            }
        }
    }

    /// Follower: sends the next fetch when nothing is outstanding: at once (no waiting at the
    /// leader) while streaming, else once everything appended is durable (so the fetch reports
    /// it and the leader can acknowledge).
    fn maybe_fetch(&mut self, outbox: &mut Outbox) {
        let Role::Follower { leader } = self.role else {
            return;
        };
        if leader == self.config.broker_id {
            return; // Not told whom to follow yet.
        }
        let may_wait = match self.phase {
            FetchPhase::Idle => self.durable >= self.end,
            FetchPhase::AwaitingFlush { .. } if self.durable >= self.end => true,
            FetchPhase::AwaitingFlush {
                last_reply_empty: false,
            } => false,
            _ => return,
        };
        let fetch_id = self.next_fetch_id;
        self.next_fetch_id += 1;
        self.phase = FetchPhase::Fetching { id: fetch_id };
        outbox.push(Output::SendFetch {
            leader,
            request: FetchRequest {
                replica: self.config.broker_id,
                leader_epoch: self.epoch,
                fetch_id,
                fetch_offset: self.end,
                last_fetched_epoch: self.epochs.last_epoch_below(self.end),
                durable_offset: self.durable,
                may_wait,
            },
        });
    }

    fn update_follower_high_watermark(&mut self, outbox: &mut Outbox) {
        let candidate = self.leader_high_watermark.min(self.durable);
        if candidate > self.high_watermark {
            self.high_watermark = candidate;
            outbox.push(Output::HighWatermark(candidate));
        }
    }

    /// Durable offsets of the replicas that fetched in this epoch (and our own).
    fn durable_of(&self, replica: BrokerId) -> Offset {
        if replica == self.config.broker_id {
            return self.durable;
        }
        self.followers
            .get(&replica)
            .filter(|p| p.fetched_this_epoch)
            .map_or(Offset::ZERO, |p| p.durable_offset)
    }

    /// In-sync replicas (the leader included) that hold everything below `next_offset`
    /// durably. Only in-sync replicas count: an out-of-sync follower may never be elected, so
    /// its copy does not protect an acknowledged write. With an ISR proposal pending, only the
    /// members that stay in sync whichever way the controller decides count (the minimal ISR).
    fn durable_count(&self, next_offset: Offset) -> u8 {
        isr::minimal_isr(&self.isr, self.proposed_isr())
            .iter()
            .filter(|&&r| self.durable_of(r) >= next_offset)
            .count() as u8
    }

    /// Controller mode: the brokers the controller would elect if this leader failed now (see
    /// [`AckLevel::Quorum`]): the successor under the committed ISR and, while a proposal is
    /// pending, under the proposed one. Not the minimal ISR's successor: with a shrink pending
    /// the controller may still elect the member being removed, with an expansion pending it
    /// may already elect the one being added.
    fn successors(&self) -> Vec<BrokerId> {
        let me = self.config.broker_id;
        let mut successors: Vec<BrokerId> = std::iter::once(self.isr.as_slice())
            .chain(self.proposed_isr())
            .filter_map(|isr| isr::successor(&self.config.replicas, isr, me))
            .collect();
        successors.dedup();
        assert!(successors.len() <= 2 && !successors.contains(&me));
        successors
    }

    /// Whether `acks` needs the successor rule (see [`AckLevel::Quorum`]): `quorum` and `N`
    /// counting at least two replicas, in controller mode.
    fn needs_successor(&self, acks: AckLevel) -> bool {
        self.config.isr_via_controller
            && matches!(acks, AckLevel::Quorum | AckLevel::Replicas(_))
            && self.required(acks).is_ok_and(|required| required >= 2)
    }

    /// Whether the successors hold everything below `next_offset` durably (true when there
    /// is none: the leader is alone in the ISR, which `min_insync_replicas` refuses anyway).
    fn successors_hold(&self, next_offset: Offset) -> bool {
        self.successors()
            .iter()
            .all(|&s| self.durable_of(s) >= next_offset)
    }

    /// Whether `acks` waits for followers (and so for `min_insync_replicas` and the lease).
    fn waits_for_followers(&self, acks: AckLevel) -> bool {
        !matches!(acks, AckLevel::None | AckLevel::Leader)
    }

    /// Moves the HW to the largest offset durable on every member of the maximal ISR and on
    /// `min_insync_replicas` replicas, but only while the committed ISR holds at least
    /// `min_insync_replicas` (strict min ISR, KIP-966: with fewer in sync nothing becomes
    /// committed, even what out-of-sync followers happen to hold) and, in controller mode,
    /// while the lease lasts and the epoch is not fenced.
    fn update_high_watermark(&mut self, outbox: &mut Outbox) {
        if self.isr.len() < self.config.min_insync_replicas || !self.may_acknowledge() {
            return;
        }
        let maximal = self.maximal_isr();
        debug_assert!(self.isr.iter().all(|r| maximal.contains(r)));
        let candidate = high_watermark(
            &self.config.replicas,
            &maximal,
            self.config.min_insync_replicas,
            |r| self.durable_of(r),
        )
        .min(self.end);
        if candidate > self.high_watermark {
            self.high_watermark = candidate;
            outbox.push(Output::HighWatermark(candidate));
        }
    }

    fn shrink_isr(&mut self, outbox: &mut Outbox) {
        let now = self.now_ms;
        let lag_max = self.config.replica_lag_max_ms;
        let followers = &self.followers;
        let before = self.isr.len();
        let me = self.config.broker_id;
        self.isr.retain(|r| {
            *r == me
                || followers
                    .get(r)
                    .is_some_and(|p| now.saturating_sub(p.last_caught_up_ms) <= lag_max)
        });
        if self.isr.len() != before {
            outbox.push(Output::IsrChanged(self.isr.clone()));
            // A smaller ISR may let the high watermark move (or strand waiters).
            self.update_high_watermark(outbox);
            self.complete_waiters(outbox);
        }
    }

    /// Controller mode, leader: proposes the ISR it wants when it differs from the committed
    /// one and no proposal is outstanding; sends an unanswered proposal again after
    /// `ISR_PROPOSAL_RETRY_MS`.
    fn maybe_propose_isr(&mut self, outbox: &mut Outbox) {
        if !self.config.isr_via_controller || !self.is_leader() || self.fenced {
            return;
        }
        let now = self.now_ms;
        if let Some(proposal) = &mut self.proposal {
            if !proposal.awaiting_metadata
                && now >= proposal.sent_ms.saturating_add(ISR_PROPOSAL_RETRY_MS)
            {
                proposal.sent_ms = now;
                outbox.push(Output::ProposeIsr {
                    isr: proposal.isr.clone(),
                    leader_epoch: proposal.leader_epoch,
                    partition_epoch: proposal.partition_epoch,
                });
            }
            return;
        }
        if now < self.proposal_blocked_until_ms {
            return;
        }
        let lag_max = self.config.replica_lag_max_ms;
        let views: Vec<FollowerView> = self
            .followers
            .iter()
            .map(|(&broker, p)| FollowerView {
                broker,
                keeps_up: now.saturating_sub(p.last_caught_up_ms) <= lag_max,
                may_join: p.fetched_this_epoch
                    && p.fetch_offset >= p.last_fetch_leader_end
                    && p.durable_offset >= self.high_watermark.max(self.acknowledged_end),
            })
            .collect();
        let wanted = isr::wanted_isr(self.config.broker_id, &self.isr, &views);
        if wanted == self.isr {
            return;
        }
        assert!(wanted.contains(&self.config.broker_id));
        self.proposal = Some(IsrProposal {
            isr: wanted.clone(),
            leader_epoch: self.epoch,
            partition_epoch: self.partition_epoch,
            sent_ms: now,
            awaiting_metadata: false,
        });
        outbox.push(Output::ProposeIsr {
            isr: wanted,
            leader_epoch: self.epoch,
            partition_epoch: self.partition_epoch,
        });
    }

    fn on_isr_committed(&mut self, isr: Vec<BrokerId>, partition_epoch: u64, outbox: &mut Outbox) {
        if !self.config.isr_via_controller || partition_epoch <= self.partition_epoch {
            return; // Static mode, or an older or repeated state.
        }
        if !self.is_leader() {
            self.partition_epoch = partition_epoch;
            return;
        }
        let mut isr = isr;
        isr.sort_unstable();
        isr.dedup();
        if isr.is_empty() || !isr.iter().all(|r| self.config.replicas.contains(r)) {
            return; // Not an ISR of this partition: a broken or forged message changes nothing.
        }
        self.partition_epoch = partition_epoch;
        // The controller refuses proposals based on an older partition epoch: whatever was
        // pending is either this change or can no longer be applied.
        self.proposal = None;
        if !isr.contains(&self.config.broker_id) {
            // The controller removed the leader from its own ISR: it is being replaced.
            self.fence(outbox);
            return;
        }
        self.isr = isr;
        outbox.push(Output::IsrChanged(self.isr.clone()));
        // A smaller ISR may let the HW move (or strand waiters); a larger one may let the
        // leader propose what it still wants.
        self.update_high_watermark(outbox);
        self.complete_waiters(outbox);
        self.maybe_propose_isr(outbox);
    }

    fn on_isr_rejected(&mut self, partition_epoch: u64, reason: IsrRejection, outbox: &mut Outbox) {
        let is_leader = self.is_leader();
        let Some(proposal) = &mut self.proposal else {
            return;
        };
        if proposal.partition_epoch != partition_epoch || !is_leader {
            return; // The answer to an earlier proposal.
        }
        match reason {
            IsrRejection::FencedLeaderEpoch => self.fence(outbox),
            IsrRejection::StalePartitionEpoch => proposal.awaiting_metadata = true,
            IsrRejection::IneligibleReplica | IsrRejection::NotApplied => {
                debug_assert!(reason.certainly_not_applied());
                // Not applied: it leaves the maximal ISR now; the next proposal waits one
                // retry delay (the reason may persist).
                let retry_at = proposal.sent_ms.saturating_add(ISR_PROPOSAL_RETRY_MS);
                self.proposal = None;
                if self.now_ms >= retry_at {
                    self.maybe_propose_isr(outbox);
                } else {
                    self.proposal_blocked_until_ms = retry_at;
                }
                self.update_high_watermark(outbox);
                self.complete_waiters(outbox);
            }
        }
    }

    /// Controller mode: a newer leader epoch exists. Fail every waiter (retriable) and
    /// acknowledge nothing until the next role change.
    fn fence(&mut self, outbox: &mut Outbox) {
        self.fenced = true;
        for waiter in self.waiters.drain(..) {
            outbox.push(Output::Complete {
                waiter: waiter.id,
                result: Err(ProduceError::NotLeader {
                    leader: None,
                    epoch: self.epoch,
                }),
            });
        }
    }

    fn complete_waiters(&mut self, outbox: &mut Outbox) {
        if self.waiters.is_empty() {
            return;
        }
        let in_sync = self.isr.len();
        let lease_expired =
            (!self.may_acknowledge()).then_some(Err(ProduceError::LeaderLeaseExpired {
                until_ms: self.lease_until_ms,
            }));
        let mut index = 0;
        while index < self.waiters.len() {
            let waiter = self.waiters[index];
            let durable_replicas = self.durable_count(waiter.next_offset);
            let required = self.required(waiter.acks).unwrap_or(usize::MAX);
            let isr_needed = self.isr_needed(waiter.acks).unwrap_or(usize::MAX);
            let stranded = Some(Err(ProduceError::NotEnoughReplicasAfterAppend {
                required: isr_needed,
                in_sync,
            }));
            let result = match waiter.acks {
                AckLevel::None => Some(Ok(())),
                AckLevel::Leader => (self.durable >= waiter.next_offset).then_some(Ok(())),
                // Controller mode: a leader past its lease (or fenced) may have been replaced;
                // nothing that waits for followers is acknowledged, and its waiters fail fast
                // (retriable; the producer finds the leader again) instead of timing out.
                AckLevel::Quorum | AckLevel::Replicas(_) | AckLevel::All
                    if lease_expired.is_some() =>
                {
                    lease_expired.clone()
                }
                // Checked before the count: an ack given while fewer than min_insync_replicas
                // are in sync would promise more than the ISR can keep.
                AckLevel::Quorum | AckLevel::Replicas(_) if in_sync < isr_needed => stranded,
                // The leader must hold it too: a static leader that restarts (or, with the
                // controller, a leader elected from the ISR) keeps what it holds. In
                // controller mode so must the successor: the controller elects it, whatever
                // it holds, if this leader fails.
                AckLevel::Quorum | AckLevel::Replicas(_) => (self.durable >= waiter.next_offset
                    && usize::from(durable_replicas) >= required
                    && (!self.needs_successor(waiter.acks)
                        || self.successors_hold(waiter.next_offset)))
                .then_some(Ok(())),
                AckLevel::All if self.high_watermark >= waiter.next_offset => Some(Ok(())),
                AckLevel::All if in_sync < isr_needed => stranded,
                AckLevel::All => None,
            };
            match result {
                None => index += 1,
                Some(result) => {
                    self.waiters.swap_remove(index);
                    if result.is_ok() && self.needs_successor(waiter.acks) {
                        self.acknowledged_end = self.acknowledged_end.max(waiter.next_offset);
                    }
                    outbox.push(Output::Complete {
                        waiter: waiter.id,
                        result: result.map(|()| Ack {
                            base_offset: waiter.base_offset,
                            next_offset: waiter.next_offset,
                            leader_epoch: self.epoch,
                            durable_replicas,
                        }),
                    });
                }
            }
        }
    }
}

/// The largest offset durable on every in-sync replica and on at least `min_insync` replicas.
/// Pure, so it can be checked exhaustively.
pub fn high_watermark(
    replicas: &[BrokerId],
    isr: &[BrokerId],
    min_insync: usize,
    durable_of: impl Fn(BrokerId) -> Offset,
) -> Offset {
    let isr_min = isr
        .iter()
        .map(|&r| durable_of(r))
        .min()
        .unwrap_or(Offset::ZERO);
    let mut durables: Vec<Offset> = replicas.iter().map(|&r| durable_of(r)).collect();
    durables.sort_unstable_by(|a, b| b.cmp(a));
    let k = min_insync.clamp(1, replicas.len().max(1));
    let kth = durables.get(k - 1).copied().unwrap_or(Offset::ZERO);
    isr_min.min(kth)
}
