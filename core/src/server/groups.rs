//! Consumer-group coordinators. A group's coordinator is the leader of partition
//! `crc32c(group) % N` of the internal topic `__consumer_offsets` (created on the first group
//! request); the shard that owns that partition keeps the group's state (`wharf_groups::Group`)
//! and writes every change to the partition, `acks=all`, before it answers. A new leader of
//! the partition (failover, restart) replays it to rebuild its groups before serving them.
//!
//! Operations on one coordinator partition run one at a time (a semaphore held across the
//! write): a group's state never gets ahead of its log by more than the write in flight, and a
//! failed write drops the loaded state so the next request reloads it from the log.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::time::Duration;

use futures_util::FutureExt;
use glommio::sync::Semaphore;
use wharf_groups::{
    Assignor, Commit, CommitError, CommittedOffset, Group, GroupConfig, GroupRecord, Heartbeat,
    HeartbeatError, MemberState, TopicPartition,
};
use wharf_storage::batch::{batches, BatchBuilder};
use wharf_storage::Offset;

use super::connection::Pending;
use super::dispatch::respond;
use super::partition::{monotonic_ms, now_ms, Partition, PartitionError};
use super::shard::{Shard, ShardReply, ShardRequest};
use crate::protocol::*;

/// Bytes read per step while a new coordinator replays its partition.
const LOAD_READ_BYTES: usize = 1024 * 1024;
/// Read steps a replay may take (each reads at least one batch): far above any offsets
/// partition, a guard against a loop that makes no progress.
const LOAD_STEPS_MAX: usize = 1_000_000;
/// Records per batch when a change is written.
const RECORDS_PER_BATCH_MAX: usize = 256;
/// Records per write of a snapshot or of expired members (a few MiB at most: within what a
/// partition stages before it pushes back).
const RECORDS_PER_WRITE_MAX: usize = 8 * RECORDS_PER_BATCH_MAX;
/// How long a coordinator waits for its write to reach `acks=all`.
const PERSIST_TIMEOUT_MS: u64 = 10_000;
/// How often coordinators remove members whose session ended.
pub const GROUP_EXPIRY_TICK_MS: u64 = 100;

/// A group request, as shards forward it to the coordinator's shard.
#[derive(Clone, Debug)]
pub enum GroupOp {
    Heartbeat(GroupHeartbeatRequest),
    Commit(OffsetCommitRequest),
    Fetch(OffsetFetchRequest),
    Describe(DescribeGroupRequest),
    Delete(DeleteGroupRequest),
    /// The groups this shard coordinates.
    List,
}

#[derive(Clone, Debug)]
pub enum GroupAnswer {
    Heartbeat(GroupHeartbeatResponse),
    Result(GroupResult),
    Fetch(OffsetFetchResponse),
    Describe(DescribeGroupResponse),
    List(Vec<GroupListing>),
}

impl GroupOp {
    fn group(&self) -> &str {
        match self {
            GroupOp::Heartbeat(r) => &r.group,
            GroupOp::Commit(r) => &r.group,
            GroupOp::Fetch(r) => &r.group,
            GroupOp::Describe(r) => &r.group,
            GroupOp::Delete(r) => &r.group,
            GroupOp::List => "",
        }
    }

    fn error(&self, code: ErrorCode, message: impl Into<String>) -> GroupAnswer {
        let (error, message) = (code as u16, message.into());
        match self {
            GroupOp::Heartbeat(_) => GroupAnswer::Heartbeat(GroupHeartbeatResponse {
                error,
                message,
                member_epoch: 0,
                heartbeat_interval_ms: 0,
                assignment: Vec::new(),
            }),
            GroupOp::Commit(_) | GroupOp::Delete(_) => {
                GroupAnswer::Result(GroupResult { error, message })
            }
            GroupOp::Fetch(_) => GroupAnswer::Fetch(OffsetFetchResponse {
                error,
                message,
                offsets: Vec::new(),
            }),
            GroupOp::Describe(_) => GroupAnswer::Describe(DescribeGroupResponse {
                error,
                message,
                lag: Vec::new(),
                group_epoch: 0,
                assignor: String::new(),
                coordinator: 0,
                members: Vec::new(),
                offsets: Vec::new(),
            }),
            GroupOp::List => GroupAnswer::List(Vec::new()),
        }
    }
}

/// The coordinator state of one shard: per offsets partition it owns.
#[derive(Default)]
pub struct Coordinator {
    partitions: RefCell<HashMap<u32, Rc<CoordinatorPartition>>>,
}

struct CoordinatorPartition {
    /// One operation at a time, held across its write.
    lock: Semaphore,
    loaded: RefCell<Option<Loaded>>,
}

struct Loaded {
    /// The leader epoch this state was loaded in: a new epoch (another leader was in between)
    /// means reloading.
    leader_epoch: u32,
    groups: BTreeMap<String, Group>,
    /// The members' last lag reports, per group and partition (memory only: members report
    /// again within a heartbeat interval).
    lag: BTreeMap<String, BTreeMap<(String, u32), PartitionLag>>,
    /// Records written (or replayed) since the last full snapshot, and when it was taken.
    records_since_snapshot: u64,
    last_snapshot_ms: u64,
}

impl Coordinator {
    /// Every coordinator partition of this shard (a snapshot: no borrow held afterwards).
    fn all(&self) -> Vec<(u32, Rc<CoordinatorPartition>)> {
        self.partitions
            .borrow()
            .iter()
            .map(|(i, p)| (*i, Rc::clone(p)))
            .collect()
    }

    fn partition(&self, index: u32) -> Rc<CoordinatorPartition> {
        Rc::clone(
            self.partitions
                .borrow_mut()
                .entry(index)
                .or_insert_with(|| {
                    Rc::new(CoordinatorPartition {
                        lock: Semaphore::new(1),
                        loaded: RefCell::new(None),
                    })
                }),
        )
    }
}

fn group_config(config: &crate::config::GroupsConfig) -> GroupConfig {
    GroupConfig {
        session_timeout_ms: config.session_timeout_ms,
        heartbeat_interval_ms: config.heartbeat_interval_ms,
        rebalance_timeout_ms: config.rebalance_timeout_ms,
        members_max: config.members_max,
        assignor: Assignor::parse(&config.assignor).unwrap_or_default(),
    }
}

impl Shard {
    /// Admits a group API request: answered by the coordinator's shard.
    pub(crate) fn admit_group(self: &Rc<Self>, header: FrameHeader, op: GroupOp) -> Pending {
        let shard = Rc::clone(self);
        async move {
            match shard.group_request(op).await {
                GroupAnswer::Heartbeat(r) => respond(&header, &r, Vec::new()),
                GroupAnswer::Result(r) => respond(&header, &r, Vec::new()),
                GroupAnswer::Fetch(r) => respond(&header, &r, Vec::new()),
                GroupAnswer::Describe(r) => respond(&header, &r, Vec::new()),
                GroupAnswer::List(groups) => respond(
                    &header,
                    &ListGroupsResponse {
                        error: 0,
                        message: String::new(),
                        groups,
                    },
                    Vec::new(),
                ),
            }
        }
        .boxed_local()
    }

    async fn group_request(self: &Rc<Self>, op: GroupOp) -> GroupAnswer {
        if let GroupOp::List = op {
            let mut groups = Vec::new();
            for shard in 0..self.shared.shards() as u32 {
                if let Some(ShardReply::Group(GroupAnswer::List(more))) = self
                    .to_shard(
                        shard,
                        ShardRequest::Group {
                            partition: 0,
                            op: GroupOp::List,
                        },
                    )
                    .await
                {
                    groups.extend(more);
                }
            }
            groups.sort_by(|a, b| a.group.cmp(&b.group));
            return GroupAnswer::List(groups);
        }
        let group = op.group();
        if group.is_empty() || group.len() > wharf_groups::group::ID_BYTES_MAX {
            return op.error(
                ErrorCode::InvalidRequest,
                format!(
                    "group ids are 1 to {} bytes long",
                    wharf_groups::group::ID_BYTES_MAX
                ),
            );
        }
        let partitions = self
            .metadata
            .borrow()
            .topics
            .get(OFFSETS_TOPIC)
            .map(|t| t.partitions.len() as u32);
        let Some(partitions) = partitions.filter(|&n| n > 0) else {
            let result = self.create_internal_topic(OFFSETS_TOPIC).await;
            return op.error(
                ErrorCode::CoordinatorLoading,
                format!("{OFFSETS_TOPIC} is being created ({result}); retry"),
            );
        };
        let partition = group_partition(group, partitions);
        let owner = match self.owner(OFFSETS_TOPIC, partition) {
            Ok(owner) => owner,
            Err(e) => return op.error(ErrorCode::NotCoordinator, e.message),
        };
        if owner == self.id {
            return self.coordinate(partition, op).await;
        }
        let failed = op.error(
            ErrorCode::CoordinatorLoading,
            "the coordinator's shard is not answering",
        );
        match self
            .to_shard(owner, ShardRequest::Group { partition, op })
            .await
        {
            Some(ShardReply::Group(answer)) => answer,
            _ => failed,
        }
    }

    /// Creates an internal state topic (`__consumer_offsets`, `__queue_state`; any broker may
    /// ask, a second creation finds it there). Both take the `[groups]` offsets-topic sizes.
    pub(crate) async fn create_internal_topic(self: &Rc<Self>, name: &str) -> String {
        let config = &self.shared.config.groups;
        let brokers = self.shared.config.cluster.brokers.len().max(1);
        let replication_factor = config
            .offsets_topic_replication_factor
            .min(u16::try_from(brokers).unwrap_or(u16::MAX));
        let request = CreateTopicRequest {
            name: name.to_string(),
            partitions: config.offsets_topic_partitions,
            replication_factor,
            configs: vec![
                // Group state is acknowledged only once durable on every in-sync replica.
                ConfigEntry {
                    key: "flush".into(),
                    value: "always".into(),
                },
                ConfigEntry {
                    key: "min_insync_replicas".into(),
                    value: replication_factor.min(2).to_string(),
                },
                // Compaction is the coordinators' snapshots, not retention: keep everything
                // until a snapshot makes it obsolete.
                ConfigEntry {
                    key: "retention_ms".into(),
                    value: "0".into(),
                },
                ConfigEntry {
                    key: "retention_bytes".into(),
                    value: "0".into(),
                },
                ConfigEntry {
                    key: "segment_bytes".into(),
                    value: config.offsets_segment_bytes.to_string(),
                },
            ],
        };
        let result = self.create_topic(request).await;
        match ErrorCode::from_u16(result.error) {
            ErrorCode::None => "created".to_string(),
            ErrorCode::TopicAlreadyExists => "already there".to_string(),
            code => format!("{code}: {}", result.message),
        }
    }

    /// Runs `op` on the coordinator of offsets partition `index`, which this shard owns.
    pub(crate) async fn coordinate(self: &Rc<Self>, index: u32, op: GroupOp) -> GroupAnswer {
        if let GroupOp::List = op {
            return GroupAnswer::List(self.list_groups());
        }
        let Some(partition) = self.local_partition(OFFSETS_TOPIC, index) else {
            return op.error(
                ErrorCode::NotCoordinator,
                format!("{OFFSETS_TOPIC}/{index} is not open on this shard"),
            );
        };
        let description = partition.describe();
        let me = self.shared.config.broker_id;
        if description.leader != me {
            return op.error(
                ErrorCode::NotCoordinator,
                format!(
                    "broker {} leads {OFFSETS_TOPIC}/{index}, the group's coordinator",
                    description.leader
                ),
            );
        }
        let coordinator = self.coordinator.partition(index);
        let Ok(_permit) = coordinator.lock.acquire_permit(1).await else {
            return op.error(ErrorCode::ShuttingDown, "shutting down");
        };
        let current = coordinator.loaded.borrow().as_ref().map(|l| l.leader_epoch);
        if current != Some(description.leader_epoch) {
            match self.load_groups(&partition).await {
                Ok((groups, replayed)) => {
                    *coordinator.loaded.borrow_mut() = Some(Loaded {
                        leader_epoch: description.leader_epoch,
                        groups,
                        lag: BTreeMap::new(),
                        records_since_snapshot: replayed,
                        last_snapshot_ms: monotonic_ms(),
                    });
                }
                Err(e) => {
                    return op.error(
                        ErrorCode::CoordinatorLoading,
                        format!("loading {OFFSETS_TOPIC}/{index}: {}", e.message),
                    )
                }
            }
        }
        let topics = self.topic_partition_counts();
        let (answer, records) = {
            let mut loaded = coordinator.loaded.borrow_mut();
            let Some(loaded) = loaded.as_mut() else {
                return op.error(ErrorCode::CoordinatorLoading, "not loaded; retry");
            };
            let mut applied = self.apply(&mut loaded.groups, &op, topics);
            let heartbeat = match &op {
                GroupOp::Heartbeat(request) => Some(request),
                _ => None,
            };
            self.track_lag(loaded, op.group(), heartbeat);
            if let GroupAnswer::Describe(described) = &mut applied.0 {
                described.lag = loaded
                    .lag
                    .get(op.group())
                    .map(|reports| reports.values().cloned().collect())
                    .unwrap_or_default();
            }
            applied
        };
        if !records.is_empty() {
            let written = records.len() as u64;
            if let Err(e) = persist(&partition, tagged(op.group(), records)).await {
                // The state may now be ahead of the log: forget it, reload on the next request.
                *coordinator.loaded.borrow_mut() = None;
                let code = ErrorCode::from_u16(e.code as u16);
                let code = if code.is_retriable() {
                    code
                } else {
                    ErrorCode::CoordinatorLoading
                };
                return op.error(code, format!("writing the group's change: {}", e.message));
            }
            if let Some(loaded) = coordinator.loaded.borrow_mut().as_mut() {
                loaded.records_since_snapshot += written;
            }
        }
        answer
    }

    /// The groups this shard coordinates now (loaded, on partitions it leads).
    fn list_groups(&self) -> Vec<GroupListing> {
        let me = self.shared.config.broker_id;
        let partitions = self.coordinator.all();
        let mut listed = Vec::new();
        for (index, coordinator) in partitions {
            let leads = self
                .local_partition(OFFSETS_TOPIC, index)
                .is_some_and(|p| p.describe().leader == me);
            if !leads {
                continue;
            }
            if let Some(loaded) = coordinator.loaded.borrow().as_ref() {
                listed.extend(loaded.groups.values().map(|g| {
                    let reports = loaded.lag.get(g.id());
                    let lags = reports.into_iter().flat_map(|r| r.values());
                    GroupListing {
                        group: g.id().to_string(),
                        members: g.members().count() as u32,
                        group_epoch: g.group_epoch(),
                        lag_records: lags
                            .clone()
                            .map(|l| l.high_watermark.saturating_sub(l.position))
                            .sum(),
                        lag_ms_max: lags.map(|l| l.lag_ms).max().unwrap_or(0),
                    }
                }));
            }
        }
        listed
    }

    fn topic_partition_counts(&self) -> BTreeMap<String, u32> {
        self.metadata
            .borrow()
            .topics
            .iter()
            .filter(|(name, _)| name.as_str() != OFFSETS_TOPIC)
            .map(|(name, t)| (name.clone(), t.partitions.len() as u32))
            .collect()
    }

    /// Carries out `op` on the loaded groups; returns the answer and the records to write.
    fn apply(
        &self,
        groups: &mut BTreeMap<String, Group>,
        op: &GroupOp,
        topics: BTreeMap<String, u32>,
    ) -> (GroupAnswer, Vec<GroupRecord>) {
        let config = &self.shared.config.groups;
        let now = monotonic_ms();
        let name = op.group().to_string();
        if let GroupOp::Heartbeat(request) = op {
            if request.lag.len() > wharf_groups::group::OWNED_PARTITIONS_MAX {
                return (
                    op.error(
                        ErrorCode::InvalidRequest,
                        format!(
                            "{} lag reports (limit {})",
                            request.lag.len(),
                            wharf_groups::group::OWNED_PARTITIONS_MAX
                        ),
                    ),
                    Vec::new(),
                );
            }
        }
        let creates = matches!(op, GroupOp::Heartbeat(_) | GroupOp::Commit(_));
        if !groups.contains_key(&name) {
            if !creates {
                return (
                    op.error(
                        ErrorCode::UnknownGroup,
                        format!("group {name:?} does not exist"),
                    ),
                    Vec::new(),
                );
            }
            if groups.len() >= config.groups_per_partition_max {
                return (
                    op.error(
                        ErrorCode::LimitReached,
                        format!(
                            "this coordinator partition keeps {} groups (groups.groups_per_partition_max)",
                            config.groups_per_partition_max
                        ),
                    ),
                    Vec::new(),
                );
            }
            groups.insert(name.clone(), Group::new(name.clone(), group_config(config)));
        }
        let Some(group) = groups.get_mut(&name) else {
            unreachable!("group {name} was just inserted");
        };
        let mut records = group.set_topics(topics);
        records.extend(group.expire(now));
        let answer = match op {
            GroupOp::Heartbeat(request) => match group.heartbeat(heartbeat_of(request), now) {
                Ok((answer, more)) => {
                    records.extend(more);
                    GroupAnswer::Heartbeat(GroupHeartbeatResponse {
                        error: 0,
                        message: String::new(),
                        member_epoch: answer.member_epoch,
                        heartbeat_interval_ms: u32::try_from(answer.heartbeat_interval_ms)
                            .unwrap_or(u32::MAX),
                        assignment: answer.assignment.iter().map(wire_partition).collect(),
                    })
                }
                Err(e) => {
                    let code = match &e {
                        HeartbeatError::UnknownMember { .. } => ErrorCode::UnknownMemberId,
                        HeartbeatError::FencedMemberEpoch { .. } => ErrorCode::FencedMemberEpoch,
                        HeartbeatError::GroupFull { .. } => ErrorCode::GroupFull,
                        HeartbeatError::Invalid(_) => ErrorCode::InvalidRequest,
                    };
                    op.error(code, e.to_string())
                }
            },
            GroupOp::Commit(request) => {
                let wall_ms = now_ms();
                let commit = Commit {
                    member_id: request.member_id.clone(),
                    member_epoch: request.member_epoch,
                    offsets: request
                        .offsets
                        .iter()
                        .map(|o| {
                            (
                                TopicPartition::new(o.topic.clone(), o.partition),
                                CommittedOffset {
                                    offset: o.offset,
                                    leader_epoch: o.leader_epoch,
                                    metadata: o.metadata.clone(),
                                    commit_ms: wall_ms,
                                },
                            )
                        })
                        .collect(),
                };
                match group.commit(commit) {
                    Ok(more) => {
                        records.extend(more);
                        GroupAnswer::Result(GroupResult {
                            error: 0,
                            message: String::new(),
                        })
                    }
                    Err(e) => {
                        let code = match &e {
                            CommitError::UnknownMember { .. } => ErrorCode::UnknownMemberId,
                            CommitError::StaleMemberEpoch { .. } | CommitError::NotOwned { .. } => {
                                ErrorCode::StaleMemberEpoch
                            }
                            CommitError::GroupNotEmpty { .. } => ErrorCode::GroupNotEmpty,
                            CommitError::Invalid(_) => ErrorCode::InvalidRequest,
                        };
                        op.error(code, e.to_string())
                    }
                }
            }
            GroupOp::Fetch(_) => GroupAnswer::Fetch(OffsetFetchResponse {
                error: 0,
                message: String::new(),
                offsets: group
                    .offsets()
                    .iter()
                    .map(|(tp, c)| wire_offset(tp, c))
                    .collect(),
            }),
            GroupOp::Describe(_) => GroupAnswer::Describe(DescribeGroupResponse {
                error: 0,
                message: String::new(),
                lag: Vec::new(), // Filled by `track_lag`.
                group_epoch: group.group_epoch(),
                assignor: group.config().assignor.name().to_string(),
                coordinator: self.shared.config.broker_id,
                members: group.members().map(describe_member).collect(),
                offsets: group
                    .offsets()
                    .iter()
                    .map(|(tp, c)| wire_offset(tp, c))
                    .collect(),
            }),
            GroupOp::Delete(_) => match group.delete_offsets(|_| true) {
                Ok(more) => {
                    records.extend(more);
                    GroupAnswer::Result(GroupResult {
                        error: 0,
                        message: String::new(),
                    })
                }
                Err(e) => op.error(ErrorCode::GroupNotEmpty, e.to_string()),
            },
            GroupOp::List => GroupAnswer::List(Vec::new()),
        };
        // A group left with nothing (every member gone, no offsets) is forgotten.
        if group.is_empty() && group.offsets().is_empty() {
            groups.remove(&name);
        }
        (answer, records)
    }

    /// Keeps the lag a heartbeat reported (for the partitions its member owns) and drops the
    /// reports of partitions nobody in the group owns any more; updates the lag metrics.
    fn track_lag(
        &self,
        loaded: &mut Loaded,
        name: &str,
        heartbeat: Option<&GroupHeartbeatRequest>,
    ) {
        let Some(group) = loaded.groups.get(name) else {
            self.forget_lag(loaded, name);
            return;
        };
        let reports = loaded.lag.entry(name.to_string()).or_default();
        if let Some(request) = heartbeat {
            for lag in &request.lag {
                let tp = TopicPartition::new(lag.topic.clone(), lag.partition);
                if group.owner(&tp) == Some(request.member_id.as_str()) {
                    reports.insert((lag.topic.clone(), lag.partition), lag.clone());
                }
            }
        }
        let metrics = &self.shared.metrics;
        let labels = |topic: &str, partition: u32| crate::server::metrics::GroupPartitionLabels {
            group: name.to_string(),
            topic: topic.to_string(),
            partition,
        };
        reports.retain(|(topic, partition), _| {
            let owned = group
                .owner(&TopicPartition::new(topic.clone(), *partition))
                .is_some();
            if !owned {
                metrics.group_lag_records.remove(&labels(topic, *partition));
                metrics.group_lag_ms.remove(&labels(topic, *partition));
            }
            owned
        });
        for ((topic, partition), lag) in reports.iter() {
            metrics
                .group_lag_records
                .get_or_create(&labels(topic, *partition))
                .set(lag.high_watermark.saturating_sub(lag.position) as i64);
            metrics
                .group_lag_ms
                .get_or_create(&labels(topic, *partition))
                .set(lag.lag_ms as i64);
        }
        metrics
            .group_members
            .get_or_create(&crate::server::metrics::GroupLabels {
                group: name.to_string(),
            })
            .set(group.members().count() as i64);
    }

    fn forget_lag(&self, loaded: &mut Loaded, name: &str) {
        let metrics = &self.shared.metrics;
        if let Some(reports) = loaded.lag.remove(name) {
            for (topic, partition) in reports.keys() {
                let labels = crate::server::metrics::GroupPartitionLabels {
                    group: name.to_string(),
                    topic: topic.clone(),
                    partition: *partition,
                };
                metrics.group_lag_records.remove(&labels);
                metrics.group_lag_ms.remove(&labels);
            }
        }
        metrics
            .group_members
            .remove(&crate::server::metrics::GroupLabels {
                group: name.to_string(),
            });
    }

    /// Replays offsets partition `partition` from its start to its end into groups.
    async fn load_groups(
        &self,
        partition: &Rc<Partition>,
    ) -> Result<(BTreeMap<String, Group>, u64), PartitionError> {
        let config = group_config(&self.shared.config.groups);
        let now = monotonic_ms();
        let description = partition.describe();
        let mut from = Offset(description.log_start_offset);
        let mut groups: BTreeMap<String, Group> = BTreeMap::new();
        let mut replayed = 0u64;
        for _ in 0..LOAD_STEPS_MAX {
            let data = partition.read_to(from, LOAD_READ_BYTES, None).await?;
            if data.bytes == 0 {
                break;
            }
            let mut progressed = false;
            for batch in batches(data.slice()) {
                let corrupt = |e: wharf_storage::batch::BatchError| {
                    PartitionError::new(ErrorCode::CorruptData, format!("{OFFSETS_TOPIC}: {e}"))
                };
                let batch = batch.map_err(corrupt)?;
                let header = batch.header;
                for (i, record) in batch.records().map_err(corrupt)?.iter().enumerate() {
                    if header.base_offset.0 + (i as u64) < from.0 {
                        continue;
                    }
                    let stored: StoredGroupRecord = decode_body(record.value.as_slice())
                        .map_err(|e| PartitionError::new(ErrorCode::CorruptData, e.to_string()))?;
                    let group = groups
                        .entry(stored.group.clone())
                        .or_insert_with(|| Group::new(stored.group.clone(), config.clone()));
                    group.replay(group_record(stored.change), now);
                    replayed += 1;
                }
                if header.next_offset() > from {
                    from = header.next_offset();
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
        groups.retain(|_, g| !(g.is_empty() && g.offsets().is_empty()));
        for group in groups.values() {
            group.check_invariants();
        }
        Ok((groups, replayed))
    }

    /// Shard task: removes members whose session ended, on every coordinator this shard runs.
    pub(crate) async fn group_expiry_loop(self: Rc<Self>) {
        while !self.stopping.get() {
            glommio::timer::sleep(Duration::from_millis(GROUP_EXPIRY_TICK_MS)).await;
            let partitions = self.coordinator.all();
            for (index, coordinator) in partitions {
                self.expire_partition(index, &coordinator).await;
            }
        }
    }

    async fn expire_partition(self: &Rc<Self>, index: u32, coordinator: &CoordinatorPartition) {
        let now = monotonic_ms();
        let config = &self.shared.config.groups;
        let due = coordinator.loaded.borrow().as_ref().is_some_and(|l| {
            let expiring = l
                .groups
                .values()
                .any(|g| g.next_deadline_ms().is_some_and(|d| d <= now));
            let snapshot = l.records_since_snapshot >= config.snapshot_after_records
                || (l.records_since_snapshot > 0
                    && now.saturating_sub(l.last_snapshot_ms) >= config.snapshot_interval_ms);
            expiring || snapshot
        });
        if !due {
            return;
        }
        let Some(partition) = self.local_partition(OFFSETS_TOPIC, index) else {
            *coordinator.loaded.borrow_mut() = None;
            return;
        };
        let Ok(_permit) = coordinator.lock.acquire_permit(1).await else {
            return;
        };
        let description = partition.describe();
        let leads = description.leader == self.shared.config.broker_id;
        let current = coordinator.loaded.borrow().as_ref().map(|l| l.leader_epoch);
        if !leads || current != Some(description.leader_epoch) {
            // No longer this partition's leader (or another was in between): the state is
            // stale; the next request reloads it. Its groups' metrics belong to the new
            // coordinator now.
            if let Some(mut stale) = coordinator.loaded.borrow_mut().take() {
                let names: Vec<String> = stale.groups.keys().cloned().collect();
                for name in names {
                    self.forget_lag(&mut stale, &name);
                }
            }
            return;
        }
        let changes: Vec<(String, Vec<GroupRecord>)> = {
            let mut loaded = coordinator.loaded.borrow_mut();
            let Some(loaded) = loaded.as_mut() else {
                return;
            };
            let now = monotonic_ms();
            let changes: Vec<(String, Vec<GroupRecord>)> = loaded
                .groups
                .iter_mut()
                .map(|(name, g)| (name.clone(), g.expire(now)))
                .filter(|(_, records)| !records.is_empty())
                .collect();
            loaded
                .groups
                .retain(|_, g| !(g.is_empty() && g.offsets().is_empty()));
            for (name, _) in &changes {
                self.track_lag(loaded, name, None);
            }
            changes
        };
        for write in writes(changes) {
            let written = write.len() as u64;
            if let Err(e) = persist(&partition, write).await {
                tracing::warn!(error = %e.message, "could not write expired members; reloading");
                *coordinator.loaded.borrow_mut() = None;
                return;
            }
            if let Some(loaded) = coordinator.loaded.borrow_mut().as_mut() {
                loaded.records_since_snapshot += written;
            }
        }
        self.maybe_snapshot(index, &partition, coordinator).await;
    }

    /// Writes a full snapshot of the partition's groups once enough was written since the
    /// last one (or long enough ago), then deletes the segments below it: everything before a
    /// complete, committed snapshot is obsolete. Called with the partition's lock held.
    async fn maybe_snapshot(
        &self,
        index: u32,
        partition: &Rc<Partition>,
        coordinator: &CoordinatorPartition,
    ) {
        let config = &self.shared.config.groups;
        let now = monotonic_ms();
        let snapshot: Vec<(String, Vec<GroupRecord>)> = {
            let loaded = coordinator.loaded.borrow();
            let Some(loaded) = loaded.as_ref() else {
                return;
            };
            let due = loaded.records_since_snapshot >= config.snapshot_after_records
                || (loaded.records_since_snapshot > 0
                    && now.saturating_sub(loaded.last_snapshot_ms) >= config.snapshot_interval_ms);
            if !due {
                return;
            }
            loaded
                .groups
                .iter()
                .map(|(name, g)| (name.clone(), g.snapshot()))
                .collect()
        };
        // With no groups left, everything written so far is obsolete.
        let mut delete_below = Offset(partition.describe().end_offset);
        for (i, write) in writes(snapshot).into_iter().enumerate() {
            match persist(partition, write).await {
                Ok(base) if i == 0 => delete_below = base,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e.message, "could not write a group snapshot; reloading");
                    *coordinator.loaded.borrow_mut() = None;
                    return;
                }
            }
        }
        if let Some(loaded) = coordinator.loaded.borrow_mut().as_mut() {
            loaded.records_since_snapshot = 0;
            loaded.last_snapshot_ms = now;
        }
        match partition.delete_below(delete_below).await {
            Ok(deleted) => {
                tracing::debug!(partition = index, %delete_below, deleted, "group snapshot written; older segments deleted")
            }
            Err(error) => {
                tracing::warn!(partition = index, %error, "deleting below a group snapshot")
            }
        }
    }
}

fn tagged(group: &str, records: Vec<GroupRecord>) -> Vec<(String, GroupRecord)> {
    records
        .into_iter()
        .map(|r| (group.to_string(), r))
        .collect()
}

/// Groups' changes cut into writes of about `RECORDS_PER_WRITE_MAX` records, never splitting
/// one group's changes (a failed write then leaves each group at a state it was really in).
fn writes(changes: Vec<(String, Vec<GroupRecord>)>) -> Vec<Vec<(String, GroupRecord)>> {
    let mut writes: Vec<Vec<(String, GroupRecord)>> = Vec::new();
    for (group, records) in changes {
        let fits = writes
            .last()
            .is_some_and(|w| w.len() + records.len() <= RECORDS_PER_WRITE_MAX);
        if !fits {
            writes.push(Vec::new());
        }
        if let Some(write) = writes.last_mut() {
            write.extend(tagged(&group, records));
        }
    }
    writes
}

/// Writes groups' changes to their offsets partition (one produce) and waits for `acks=all`.
/// Returns the offset of the first record written.
async fn persist(
    partition: &Rc<Partition>,
    records: Vec<(String, GroupRecord)>,
) -> Result<Offset, PartitionError> {
    let timestamp_ms = now_ms() as i64;
    let mut payload: Vec<u8> = Vec::new();
    for chunk in records.chunks(RECORDS_PER_BATCH_MAX) {
        let mut builder = BatchBuilder::new(Default::default());
        for (group, record) in chunk {
            let key = format!("{group}\u{0}{}", key_string(record));
            let stored = StoredGroupRecord {
                group: group.clone(),
                change: stored_change(record),
            };
            let value = stored
                .archive_into(FrameBuf::new())
                .map_err(|e| PartitionError::new(ErrorCode::Unknown, e.to_string()))?;
            builder
                .push(timestamp_ms, Some(key.as_bytes()), &value, &[])
                .map_err(|e| PartitionError::new(ErrorCode::InvalidBatch, e.to_string()))?;
        }
        let batch = builder
            .finish()
            .map_err(|e| PartitionError::new(ErrorCode::InvalidBatch, e.to_string()))?;
        payload.extend_from_slice(&batch);
    }
    write_acks_all(partition, &payload, "the group's change").await
}

/// Appends `payload` (whole batches) to an internal partition this shard leads and waits for
/// `acks=all` (bounded by [`PERSIST_TIMEOUT_MS`]). Returns the offset of the first record.
pub(crate) async fn write_acks_all(
    partition: &Rc<Partition>,
    payload: &[u8],
    what: &str,
) -> Result<Offset, PartitionError> {
    let mut aligned = FrameBuf::with_capacity(payload.len());
    aligned.extend_from_slice(payload);
    let admitted = partition
        .produce(&mut aligned, Acks::All, PERSIST_TIMEOUT_MS)
        .await?;
    let base = admitted.base_offset;
    let Some(completion) = admitted.completion else {
        return Ok(base);
    };
    match glommio::timer::timeout(Duration::from_millis(PERSIST_TIMEOUT_MS), async {
        Ok(completion.await)
    })
    .await
    {
        Ok(Ok(result)) => result.map(|_| base),
        Ok(Err(_canceled)) => Err(PartitionError::new(
            ErrorCode::PartitionUnavailable,
            format!("the partition closed before {what} was durable"),
        )),
        Err(_) => Err(PartitionError::new(
            ErrorCode::RequestTimeout,
            format!("{what} did not reach acks=all in time"),
        )),
    }
}

fn key_string(record: &GroupRecord) -> String {
    match record.key() {
        wharf_groups::RecordKey::Epoch => "epoch".to_string(),
        wharf_groups::RecordKey::Member(id) => format!("member\u{0}{id}"),
        wharf_groups::RecordKey::Offset(tp) => {
            format!("offset\u{0}{}\u{0}{}", tp.topic, tp.partition)
        }
    }
}

fn heartbeat_of(request: &GroupHeartbeatRequest) -> Heartbeat {
    Heartbeat {
        member_id: request.member_id.clone(),
        member_epoch: request.member_epoch,
        instance_id: request.instance_id.clone(),
        subscribed_topics: request
            .subscribed_topics
            .as_ref()
            .map(|t| t.iter().cloned().collect()),
        owned: request
            .owned
            .as_ref()
            .map(|o| o.iter().map(topic_partition).collect()),
    }
}

fn topic_partition(p: &GroupPartition) -> TopicPartition {
    TopicPartition::new(p.topic.clone(), p.partition)
}

fn wire_partition(tp: &TopicPartition) -> GroupPartition {
    GroupPartition {
        topic: tp.topic.clone(),
        partition: tp.partition,
    }
}

fn wire_partitions(set: &BTreeSet<TopicPartition>) -> Vec<GroupPartition> {
    set.iter().map(wire_partition).collect()
}

fn wire_offset(tp: &TopicPartition, c: &CommittedOffset) -> CommittedOffsetEntry {
    CommittedOffsetEntry {
        topic: tp.topic.clone(),
        partition: tp.partition,
        offset: c.offset,
        leader_epoch: c.leader_epoch,
        metadata: c.metadata.clone(),
        commit_ms: c.commit_ms,
    }
}

fn describe_member(m: &MemberState) -> GroupMemberDescription {
    GroupMemberDescription {
        member_id: m.member_id.clone(),
        instance_id: m.instance_id.clone(),
        member_epoch: m.member_epoch,
        subscribed_topics: m.subscribed.iter().cloned().collect(),
        assigned: wire_partitions(&m.assigned),
        revoking: wire_partitions(&m.revoking),
    }
}

fn stored_change(record: &GroupRecord) -> StoredGroupChange {
    match record {
        GroupRecord::Epoch { group_epoch } => StoredGroupChange::Epoch {
            group_epoch: *group_epoch,
        },
        GroupRecord::Member(m) => StoredGroupChange::Member(StoredMember {
            member_id: m.member_id.clone(),
            instance_id: m.instance_id.clone(),
            member_epoch: m.member_epoch,
            previous_epoch: m.previous_epoch,
            subscribed_topics: m.subscribed.iter().cloned().collect(),
            assigned: wire_partitions(&m.assigned),
            revoking: wire_partitions(&m.revoking),
            target: wire_partitions(&m.target),
        }),
        GroupRecord::MemberRemoved { member_id } => StoredGroupChange::MemberRemoved {
            member_id: member_id.clone(),
        },
        GroupRecord::Offset {
            partition,
            committed,
        } => StoredGroupChange::Offset(wire_offset(partition, committed)),
        GroupRecord::OffsetDeleted { partition } => {
            StoredGroupChange::OffsetDeleted(wire_partition(partition))
        }
    }
}

fn group_record(change: StoredGroupChange) -> GroupRecord {
    let set = |v: Vec<GroupPartition>| v.iter().map(topic_partition).collect();
    match change {
        StoredGroupChange::Epoch { group_epoch } => GroupRecord::Epoch { group_epoch },
        StoredGroupChange::Member(m) => GroupRecord::Member(MemberState {
            member_id: m.member_id,
            instance_id: m.instance_id,
            member_epoch: m.member_epoch,
            previous_epoch: m.previous_epoch,
            subscribed: m.subscribed_topics.into_iter().collect(),
            assigned: set(m.assigned),
            revoking: set(m.revoking),
            target: set(m.target),
        }),
        StoredGroupChange::MemberRemoved { member_id } => GroupRecord::MemberRemoved { member_id },
        StoredGroupChange::Offset(o) => GroupRecord::Offset {
            partition: TopicPartition::new(o.topic, o.partition),
            committed: CommittedOffset {
                offset: o.offset,
                leader_epoch: o.leader_epoch,
                metadata: o.metadata,
                commit_ms: o.commit_ms,
            },
        },
        StoredGroupChange::OffsetDeleted(p) => GroupRecord::OffsetDeleted {
            partition: topic_partition(&p),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(sizes: &[usize]) -> Vec<(String, Vec<GroupRecord>)> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let records = (0..n)
                    .map(|e| GroupRecord::Epoch {
                        group_epoch: e as i32,
                    })
                    .collect();
                (format!("g{i}"), records)
            })
            .collect()
    }

    #[test]
    fn writes_keep_each_group_whole_and_stay_near_the_limit() {
        let big = RECORDS_PER_WRITE_MAX + 5;
        let sizes = [3, RECORDS_PER_WRITE_MAX - 2, 1, big, 7];
        let cut = writes(changes(&sizes));
        let total: usize = cut.iter().map(Vec::len).sum();
        assert_eq!(total, sizes.iter().sum::<usize>(), "nothing lost");
        for write in &cut {
            // One group per write when it alone exceeds the limit; else within it.
            let groups: BTreeSet<&String> = write.iter().map(|(g, _)| g).collect();
            assert!(write.len() <= RECORDS_PER_WRITE_MAX || groups.len() == 1);
        }
        // No group is split across writes.
        let mut seen_in: BTreeMap<&String, usize> = BTreeMap::new();
        for (i, write) in cut.iter().enumerate() {
            for (group, _) in write {
                assert_eq!(*seen_in.entry(group).or_insert(i), i, "{group} split");
            }
        }
        assert!(writes(Vec::new()).is_empty());
    }
}
