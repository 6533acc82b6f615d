//! One consumer group as its coordinator keeps it (KIP-848 style): members join, heartbeat and
//! leave; the broker computes the target assignment with an [`Assignor`] and hands each member
//! its share incrementally. A partition moves only after its previous owner has given it up
//! (reported it no longer owns it), so no partition is ever consumed by two members of one
//! group at once, and members whose partitions do not move keep consuming through a rebalance.
//!
//! Every change is returned as [`GroupRecord`]s, which the coordinator writes to the group's
//! partition of the internal offsets topic before it answers; replaying them rebuilds the group
//! on the next coordinator (failover, restart). No clock: time arrives as `now_ms`.

use std::collections::{BTreeMap, BTreeSet};

use crate::assignor::{Assignment, Assignor, TopicPartition};

/// The epoch a member sends to join (or to rejoin after it was fenced).
pub const JOIN_EPOCH: i32 = 0;
/// The epoch a member sends to leave the group for good.
pub const LEAVE_EPOCH: i32 = -1;
/// The epoch a static member sends when it stops for a restart: its partitions stay reserved
/// for its instance id until the session timeout.
pub const STATIC_LEAVE_EPOCH: i32 = -2;

/// Bytes of a member id (chosen by the client, e.g. a UUID) or of a group id.
pub const ID_BYTES_MAX: usize = 255;
/// Topics one member may subscribe to.
pub const SUBSCRIBED_TOPICS_MAX: usize = 1_024;
/// Partitions one member may report owning (far above any sane assignment).
pub const OWNED_PARTITIONS_MAX: usize = 65_536;
/// Offsets one commit may carry.
pub const COMMIT_OFFSETS_MAX: usize = 65_536;
/// Bytes of the application metadata stored with a committed offset.
pub const COMMIT_METADATA_BYTES_MAX: usize = 4_096;

/// The coordinator's knobs for a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupConfig {
    /// A member that sends no heartbeat for this long is removed and its partitions move.
    pub session_timeout_ms: u64,
    /// How often members heartbeat (told to them in every answer).
    pub heartbeat_interval_ms: u64,
    /// How long a member may keep partitions it was asked to give up before it is removed.
    pub rebalance_timeout_ms: u64,
    /// Members a group may have.
    pub members_max: usize,
    pub assignor: Assignor,
}

impl Default for GroupConfig {
    fn default() -> GroupConfig {
        GroupConfig {
            session_timeout_ms: 10_000,
            heartbeat_interval_ms: 1_000,
            rebalance_timeout_ms: 30_000,
            members_max: 1_000,
            assignor: Assignor::Sticky,
        }
    }
}

/// A member's heartbeat (also its join and its leave).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub member_id: String,
    /// [`JOIN_EPOCH`], [`LEAVE_EPOCH`], [`STATIC_LEAVE_EPOCH`] or the member's current epoch.
    pub member_epoch: i32,
    /// Static membership: a member restarted with the same instance id takes its predecessor's
    /// place and partitions without a rebalance.
    pub instance_id: Option<String>,
    /// Required to join; `None` afterwards means unchanged.
    pub subscribed_topics: Option<BTreeSet<String>>,
    /// The partitions the member holds now; `None` means unchanged since its last heartbeat.
    pub owned: Option<BTreeSet<TopicPartition>>,
}

/// What a member is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatAnswer {
    pub member_epoch: i32,
    pub heartbeat_interval_ms: u64,
    /// The partitions the member may consume now. Any it holds beyond these it must stop
    /// consuming (after committing), then report in its next heartbeat's `owned`.
    pub assignment: BTreeSet<TopicPartition>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatError {
    /// The member was removed (session expired, left, replaced by its static successor):
    /// it must drop its partitions and join again with epoch 0.
    #[error("member {member_id:?} is not in the group; join again with epoch 0")]
    UnknownMember { member_id: String },
    /// The member's epoch is behind the coordinator's: it must drop its partitions and join
    /// again.
    #[error("member epoch {sent} is fenced (current {current}); join again with epoch 0")]
    FencedMemberEpoch { sent: i32, current: i32 },
    #[error("the group has {limit} members, its limit")]
    GroupFull { limit: usize },
    #[error("invalid heartbeat: {0}")]
    Invalid(String),
}

/// A committed offset: the next record the group will consume on the partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommittedOffset {
    pub offset: u64,
    /// The leader epoch of the last consumed record, when known: a consumer resuming after a
    /// failover can tell whether the log it read was truncated since.
    pub leader_epoch: Option<u32>,
    pub metadata: String,
    pub commit_ms: u64,
}

/// An offset commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// `None`: an administrative commit (reset-offsets, a consumer without group membership);
    /// accepted only while the group has no members.
    pub member_id: Option<String>,
    pub member_epoch: i32,
    pub offsets: Vec<(TopicPartition, CommittedOffset)>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    #[error("member {member_id:?} is not in the group")]
    UnknownMember { member_id: String },
    /// A commit from a member's older epoch (a zombie, or a member that missed a rebalance).
    #[error("member epoch {sent} is stale (current {current}); nothing was committed")]
    StaleMemberEpoch { sent: i32, current: i32 },
    /// The member does not own this partition (it moved to another member).
    #[error("member {member_id:?} does not own {partition}; nothing was committed")]
    NotOwned {
        member_id: String,
        partition: TopicPartition,
    },
    #[error(
        "the group has {members} active member(s): only they may commit; nothing was committed"
    )]
    GroupNotEmpty { members: usize },
    #[error("invalid commit: {0}")]
    Invalid(String),
}

/// A member as the coordinator keeps (and persists) it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberState {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub member_epoch: i32,
    /// The epoch before the last bump: a heartbeat from it is accepted when its answer was
    /// lost (the member's owned partitions show it did not act on anything newer).
    pub previous_epoch: i32,
    pub subscribed: BTreeSet<String>,
    /// What the member may consume.
    pub assigned: BTreeSet<TopicPartition>,
    /// What it was asked to give up and has not yet reported released: still its own, so no
    /// other member gets these yet.
    pub revoking: BTreeSet<TopicPartition>,
    /// Its share of the group's target assignment.
    pub target: BTreeSet<TopicPartition>,
}

/// What the coordinator writes to the offsets topic. Each record replaces the previous one of
/// its key (see [`GroupRecord::key`]), so the topic compacts to the latest of each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupRecord {
    Epoch {
        group_epoch: i32,
    },
    Member(MemberState),
    MemberRemoved {
        member_id: String,
    },
    Offset {
        partition: TopicPartition,
        committed: CommittedOffset,
    },
    OffsetDeleted {
        partition: TopicPartition,
    },
}

/// A record's compaction key within its group.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RecordKey {
    Epoch,
    Member(String),
    Offset(TopicPartition),
}

impl GroupRecord {
    pub fn key(&self) -> RecordKey {
        match self {
            GroupRecord::Epoch { .. } => RecordKey::Epoch,
            GroupRecord::Member(m) => RecordKey::Member(m.member_id.clone()),
            GroupRecord::MemberRemoved { member_id } => RecordKey::Member(member_id.clone()),
            GroupRecord::Offset { partition, .. } | GroupRecord::OffsetDeleted { partition } => {
                RecordKey::Offset(partition.clone())
            }
        }
    }

    /// Whether this record deletes its key (a tombstone).
    pub fn is_tombstone(&self) -> bool {
        matches!(
            self,
            GroupRecord::MemberRemoved { .. } | GroupRecord::OffsetDeleted { .. }
        )
    }
}

#[derive(Clone, Debug)]
struct Member {
    state: MemberState,
    /// Removed when `now_ms` passes this without a heartbeat.
    session_deadline_ms: u64,
    /// Removed when it still holds revoked partitions at this time.
    revoke_deadline_ms: Option<u64>,
}

/// One consumer group.
#[derive(Clone, Debug)]
pub struct Group {
    id: String,
    config: GroupConfig,
    group_epoch: i32,
    members: BTreeMap<String, Member>,
    /// Static instance id -> member id.
    instances: BTreeMap<String, String>,
    /// Partition -> the member that owns it (assigned or revoking).
    owners: BTreeMap<TopicPartition, String>,
    /// Partition counts of the topics members subscribe to (from the cluster metadata).
    topics: BTreeMap<String, u32>,
    offsets: BTreeMap<TopicPartition, CommittedOffset>,
    /// Changes not yet handed out as records.
    pending: Vec<GroupRecord>,
}

impl Group {
    pub fn new(id: impl Into<String>, config: GroupConfig) -> Group {
        Group {
            id: id.into(),
            config,
            group_epoch: 0,
            members: BTreeMap::new(),
            instances: BTreeMap::new(),
            owners: BTreeMap::new(),
            topics: BTreeMap::new(),
            offsets: BTreeMap::new(),
            pending: Vec::new(),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn config(&self) -> &GroupConfig {
        &self.config
    }

    pub fn group_epoch(&self) -> i32 {
        self.group_epoch
    }

    pub fn members(&self) -> impl Iterator<Item = &MemberState> {
        self.members.values().map(|m| &m.state)
    }

    pub fn member(&self, member_id: &str) -> Option<&MemberState> {
        self.members.get(member_id).map(|m| &m.state)
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn offsets(&self) -> &BTreeMap<TopicPartition, CommittedOffset> {
        &self.offsets
    }

    pub fn committed(&self, partition: &TopicPartition) -> Option<&CommittedOffset> {
        self.offsets.get(partition)
    }

    /// The topics some member subscribes to (the coordinator keeps their partition counts
    /// current with [`Group::set_topics`]).
    pub fn subscribed_topics(&self) -> BTreeSet<String> {
        self.members
            .values()
            .flat_map(|m| m.state.subscribed.iter().cloned())
            .collect()
    }

    /// The member that owns `partition` now, if any.
    pub fn owner(&self, partition: &TopicPartition) -> Option<&str> {
        self.owners.get(partition).map(String::as_str)
    }

    /// New partition counts (topics created, grown or deleted): recomputes the target if the
    /// group's subscriptions see a difference.
    pub fn set_topics(&mut self, topics: BTreeMap<String, u32>) -> Vec<GroupRecord> {
        let subscribed = self.subscribed_topics();
        let seen = |t: &BTreeMap<String, u32>| -> Vec<(String, u32)> {
            subscribed
                .iter()
                .filter_map(|name| t.get(name).map(|&n| (name.clone(), n)))
                .collect()
        };
        let changed = seen(&self.topics) != seen(&topics);
        self.topics = topics;
        if changed && !self.members.is_empty() {
            self.new_target();
        }
        self.take_records()
    }

    /// A heartbeat: join, stay, report released partitions, or leave.
    pub fn heartbeat(
        &mut self,
        heartbeat: Heartbeat,
        now_ms: u64,
    ) -> Result<(HeartbeatAnswer, Vec<GroupRecord>), HeartbeatError> {
        validate_heartbeat(&heartbeat)?;
        let answer = match heartbeat.member_epoch {
            JOIN_EPOCH => self.join(heartbeat, now_ms)?,
            LEAVE_EPOCH | STATIC_LEAVE_EPOCH => {
                self.leave(&heartbeat, now_ms)?;
                HeartbeatAnswer {
                    member_epoch: heartbeat.member_epoch,
                    heartbeat_interval_ms: 0,
                    assignment: BTreeSet::new(),
                }
            }
            epoch => self.beat(heartbeat, epoch, now_ms)?,
        };
        self.check_invariants();
        Ok((answer, self.take_records()))
    }

    fn join(
        &mut self,
        heartbeat: Heartbeat,
        now_ms: u64,
    ) -> Result<HeartbeatAnswer, HeartbeatError> {
        let subscribed = heartbeat.subscribed_topics.clone().ok_or_else(|| {
            HeartbeatError::Invalid("a join must name the subscribed topics".into())
        })?;
        let id = heartbeat.member_id.clone();
        // A static member restarting: take its predecessor's place (epoch, partitions) with
        // no rebalance. The predecessor is fenced: its next heartbeat or commit is refused.
        let predecessor = heartbeat
            .instance_id
            .as_ref()
            .and_then(|instance| self.instances.get(instance))
            .filter(|&previous| *previous != id)
            .cloned();
        if let Some(previous) = predecessor {
            let Some(old) = self.members.remove(&previous) else {
                unreachable!("instance {previous} maps to no member");
            };
            self.pending.push(GroupRecord::MemberRemoved {
                member_id: previous.clone(),
            });
            let mut state = old.state;
            state.member_id = id.clone();
            for tp in state.assigned.iter().chain(&state.revoking) {
                self.owners.insert(tp.clone(), id.clone());
            }
            let resubscribed = state.subscribed != subscribed;
            state.subscribed = subscribed;
            self.insert_member(state, now_ms);
            if resubscribed {
                self.new_target();
            }
            let epoch = self.members.get(&id).map_or(0, |m| m.state.member_epoch);
            return Ok(self.reconcile_and_answer(&id, epoch, now_ms));
        }
        if let Some(existing) = self.members.get(&id) {
            // A join from a known member: it lost its state (or our answer). It holds nothing
            // now, so whatever it had is released and it starts over.
            let instance = existing.state.instance_id.clone();
            if instance != heartbeat.instance_id {
                return Err(HeartbeatError::Invalid(format!(
                    "member {id:?} rejoined with instance id {:?}, not {instance:?}",
                    heartbeat.instance_id
                )));
            }
            self.release_all(&id);
            let resubscribed = self
                .members
                .get(&id)
                .is_some_and(|m| m.state.subscribed != subscribed);
            if let Some(member) = self.members.get_mut(&id) {
                member.state.subscribed = subscribed;
            }
            self.mark_dirty(&id);
            if resubscribed {
                self.new_target();
            }
            return Ok(self.reconcile_and_answer(&id, JOIN_EPOCH, now_ms));
        }
        if self.members.len() >= self.config.members_max {
            return Err(HeartbeatError::GroupFull {
                limit: self.config.members_max,
            });
        }
        self.insert_member(
            MemberState {
                member_id: id.clone(),
                instance_id: heartbeat.instance_id.clone(),
                member_epoch: 0,
                previous_epoch: 0,
                subscribed,
                assigned: BTreeSet::new(),
                revoking: BTreeSet::new(),
                target: BTreeSet::new(),
            },
            now_ms,
        );
        self.new_target();
        Ok(self.reconcile_and_answer(&id, JOIN_EPOCH, now_ms))
    }

    fn leave(&mut self, heartbeat: &Heartbeat, now_ms: u64) -> Result<(), HeartbeatError> {
        let id = &heartbeat.member_id;
        let Some(member) = self.members.get_mut(id) else {
            // Already gone (expired, or a retried leave): leaving is done.
            return Ok(());
        };
        if heartbeat.member_epoch == STATIC_LEAVE_EPOCH {
            if member.state.instance_id.is_none() {
                return Err(HeartbeatError::Invalid(
                    "only a static member (with an instance id) may leave temporarily".into(),
                ));
            }
            // Its place and partitions stay reserved for its instance id until the session
            // ends; a successor joining with that instance id takes them over at once.
            member.session_deadline_ms = now_ms.saturating_add(self.config.session_timeout_ms);
            return Ok(());
        }
        self.remove_member(id);
        Ok(())
    }

    fn beat(
        &mut self,
        heartbeat: Heartbeat,
        epoch: i32,
        now_ms: u64,
    ) -> Result<HeartbeatAnswer, HeartbeatError> {
        let id = heartbeat.member_id.clone();
        let Some(member) = self.members.get(&id) else {
            return Err(HeartbeatError::UnknownMember { member_id: id });
        };
        let state = &member.state;
        let held_nothing_newer = heartbeat.owned.as_ref().is_some_and(|owned| {
            owned
                .iter()
                .all(|tp| state.assigned.contains(tp) || state.revoking.contains(tp))
        });
        let accepted =
            epoch == state.member_epoch || (epoch == state.previous_epoch && held_nothing_newer);
        if !accepted {
            return Err(HeartbeatError::FencedMemberEpoch {
                sent: epoch,
                current: state.member_epoch,
            });
        }
        if heartbeat.instance_id != state.instance_id {
            return Err(HeartbeatError::Invalid(format!(
                "member {id:?} has instance id {:?}, not {:?}",
                state.instance_id, heartbeat.instance_id
            )));
        }
        if let Some(owned) = &heartbeat.owned {
            self.release_unowned(&id, owned);
        }
        if let Some(subscribed) = heartbeat.subscribed_topics {
            if self
                .members
                .get(&id)
                .is_some_and(|m| m.state.subscribed != subscribed)
            {
                if let Some(member) = self.members.get_mut(&id) {
                    member.state.subscribed = subscribed;
                }
                self.mark_dirty(&id);
                self.new_target();
            }
        }
        Ok(self.reconcile_and_answer(&id, epoch, now_ms))
    }

    /// Removes members whose session or revocation time ran out; their partitions move.
    pub fn expire(&mut self, now_ms: u64) -> Vec<GroupRecord> {
        let expired: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| {
                now_ms >= m.session_deadline_ms
                    || m.revoke_deadline_ms
                        .is_some_and(|deadline| now_ms >= deadline)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            self.remove_member(id);
        }
        self.check_invariants();
        self.take_records()
    }

    /// The earliest time [`Group::expire`] may remove someone (for the coordinator's timer).
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.members
            .values()
            .flat_map(|m| [Some(m.session_deadline_ms), m.revoke_deadline_ms])
            .flatten()
            .min()
    }

    /// Commits offsets: all of them or, on any error, none. The caller stamps each offset's
    /// `commit_ms` (wall-clock time, while `now_ms` elsewhere may be a monotonic clock).
    pub fn commit(&mut self, commit: Commit) -> Result<Vec<GroupRecord>, CommitError> {
        if commit.offsets.len() > COMMIT_OFFSETS_MAX {
            return Err(CommitError::Invalid(format!(
                "{} offsets in one commit (limit {COMMIT_OFFSETS_MAX})",
                commit.offsets.len()
            )));
        }
        for (partition, committed) in &commit.offsets {
            if partition.topic.is_empty() || partition.topic.len() > ID_BYTES_MAX {
                return Err(CommitError::Invalid(format!(
                    "topic name of {} to {ID_BYTES_MAX} bytes",
                    partition.topic.len()
                )));
            }
            if committed.metadata.len() > COMMIT_METADATA_BYTES_MAX {
                return Err(CommitError::Invalid(format!(
                    "metadata of {} bytes (limit {COMMIT_METADATA_BYTES_MAX})",
                    committed.metadata.len()
                )));
            }
        }
        match &commit.member_id {
            None => {
                let active = self.members.len();
                if active > 0 {
                    return Err(CommitError::GroupNotEmpty { members: active });
                }
            }
            Some(member_id) => {
                let Some(member) = self.members.get(member_id) else {
                    return Err(CommitError::UnknownMember {
                        member_id: member_id.clone(),
                    });
                };
                if commit.member_epoch != member.state.member_epoch {
                    return Err(CommitError::StaleMemberEpoch {
                        sent: commit.member_epoch,
                        current: member.state.member_epoch,
                    });
                }
                for (partition, _) in &commit.offsets {
                    if self.owners.get(partition) != Some(member_id) {
                        return Err(CommitError::NotOwned {
                            member_id: member_id.clone(),
                            partition: partition.clone(),
                        });
                    }
                }
            }
        }
        for (partition, committed) in commit.offsets {
            self.offsets.insert(partition.clone(), committed.clone());
            self.pending.push(GroupRecord::Offset {
                partition,
                committed,
            });
        }
        Ok(self.take_records())
    }

    /// Forgets committed offsets (`wharf group delete`, a deleted topic); only while the group
    /// has no members.
    pub fn delete_offsets(
        &mut self,
        which: impl Fn(&TopicPartition) -> bool,
    ) -> Result<Vec<GroupRecord>, CommitError> {
        if !self.members.is_empty() {
            return Err(CommitError::GroupNotEmpty {
                members: self.members.len(),
            });
        }
        let doomed: Vec<TopicPartition> = self
            .offsets
            .keys()
            .filter(|tp| which(tp))
            .cloned()
            .collect();
        for partition in doomed {
            self.offsets.remove(&partition);
            self.pending.push(GroupRecord::OffsetDeleted { partition });
        }
        Ok(self.take_records())
    }

    /// Rebuilds the group from its records (in log order) on a new coordinator. Sessions
    /// start afresh at `now_ms`: the members had no coordinator to heartbeat to meanwhile.
    pub fn replay(&mut self, record: GroupRecord, now_ms: u64) {
        match record {
            GroupRecord::Epoch { group_epoch } => self.group_epoch = group_epoch,
            GroupRecord::Member(state) => {
                let id = state.member_id.clone();
                self.release_all_quietly(&id);
                if let Some(old) = self.members.remove(&id) {
                    if let Some(instance) = &old.state.instance_id {
                        self.instances.remove(instance);
                    }
                }
                for tp in state.assigned.iter().chain(&state.revoking) {
                    self.owners.insert(tp.clone(), id.clone());
                }
                let revoking = !state.revoking.is_empty();
                self.insert_member_quietly(state, now_ms);
                if revoking {
                    if let Some(m) = self.members.get_mut(&id) {
                        m.revoke_deadline_ms =
                            Some(now_ms.saturating_add(self.config.rebalance_timeout_ms));
                    }
                }
            }
            GroupRecord::MemberRemoved { member_id } => {
                self.release_all_quietly(&member_id);
                if let Some(old) = self.members.remove(&member_id) {
                    if let Some(instance) = &old.state.instance_id {
                        self.instances.remove(instance);
                    }
                }
            }
            GroupRecord::Offset {
                partition,
                committed,
            } => {
                self.offsets.insert(partition, committed);
            }
            GroupRecord::OffsetDeleted { partition } => {
                self.offsets.remove(&partition);
            }
        }
    }

    /// Every record that describes the group now (what compaction of its records leaves).
    pub fn snapshot(&self) -> Vec<GroupRecord> {
        let mut records = vec![GroupRecord::Epoch {
            group_epoch: self.group_epoch,
        }];
        records.extend(
            self.members
                .values()
                .map(|m| GroupRecord::Member(m.state.clone())),
        );
        records.extend(
            self.offsets
                .iter()
                .map(|(partition, committed)| GroupRecord::Offset {
                    partition: partition.clone(),
                    committed: committed.clone(),
                }),
        );
        records
    }

    /// Panics when the group's bookkeeping is inconsistent (kept on in release builds: a
    /// partition consumed by two members is exactly what groups exist to prevent).
    pub fn check_invariants(&self) {
        let mut seen: BTreeMap<&TopicPartition, &str> = BTreeMap::new();
        for (id, member) in &self.members {
            assert_eq!(&member.state.member_id, id);
            assert!(
                member.state.assigned.is_disjoint(&member.state.revoking),
                "{id}: a partition both assigned and revoking"
            );
            assert!(member.state.member_epoch <= self.group_epoch);
            for tp in member.state.assigned.iter().chain(&member.state.revoking) {
                if let Some(other) = seen.insert(tp, id) {
                    panic!("{tp} owned by both {other} and {id}");
                }
                assert_eq!(self.owners.get(tp), Some(id), "owner of {tp}");
            }
            if let Some(instance) = &member.state.instance_id {
                assert_eq!(self.instances.get(instance), Some(id));
            }
        }
        assert_eq!(
            seen.len(),
            self.owners.len(),
            "owners map has stale entries"
        );
        assert!(self
            .instances
            .values()
            .all(|id| self.members.contains_key(id)));
    }

    fn insert_member(&mut self, state: MemberState, now_ms: u64) {
        let id = state.member_id.clone();
        self.insert_member_quietly(state, now_ms);
        self.mark_dirty(&id);
    }

    fn insert_member_quietly(&mut self, state: MemberState, now_ms: u64) {
        if let Some(instance) = &state.instance_id {
            self.instances
                .insert(instance.clone(), state.member_id.clone());
        }
        self.members.insert(
            state.member_id.clone(),
            Member {
                state,
                session_deadline_ms: now_ms.saturating_add(self.config.session_timeout_ms),
                revoke_deadline_ms: None,
            },
        );
    }

    fn remove_member(&mut self, id: &str) {
        self.release_all_quietly(id);
        if let Some(old) = self.members.remove(id) {
            if let Some(instance) = &old.state.instance_id {
                self.instances.remove(instance);
            }
            self.pending.push(GroupRecord::MemberRemoved {
                member_id: id.to_string(),
            });
            self.new_target();
        }
    }

    /// The member gave up (or lost) everything it held.
    fn release_all(&mut self, id: &str) {
        self.release_all_quietly(id);
        self.mark_dirty(id);
    }

    fn release_all_quietly(&mut self, id: &str) {
        if let Some(member) = self.members.get_mut(id) {
            for tp in member.state.assigned.iter().chain(&member.state.revoking) {
                self.owners.remove(tp);
            }
            member.state.assigned.clear();
            member.state.revoking.clear();
            member.revoke_deadline_ms = None;
        }
    }

    /// Partitions the member was asked to give up and no longer reports owning are free.
    fn release_unowned(&mut self, id: &str, owned: &BTreeSet<TopicPartition>) {
        let Some(member) = self.members.get_mut(id) else {
            return;
        };
        let released: Vec<TopicPartition> = member
            .state
            .revoking
            .iter()
            .filter(|tp| !owned.contains(*tp))
            .cloned()
            .collect();
        if released.is_empty() {
            return;
        }
        for tp in &released {
            member.state.revoking.remove(tp);
            self.owners.remove(tp);
        }
        if member.state.revoking.is_empty() {
            member.revoke_deadline_ms = None;
        }
        self.mark_dirty(id);
    }

    /// Bumps the group epoch and recomputes the target from the members' subscriptions, the
    /// topics and the current target (the sticky assignor keeps what it can).
    fn new_target(&mut self) {
        self.group_epoch += 1;
        self.pending.push(GroupRecord::Epoch {
            group_epoch: self.group_epoch,
        });
        let subscriptions: BTreeMap<String, BTreeSet<String>> = self
            .members
            .iter()
            .map(|(id, m)| (id.clone(), m.state.subscribed.clone()))
            .collect();
        let previous: Assignment = self
            .members
            .iter()
            .map(|(id, m)| (id.clone(), m.state.target.clone()))
            .collect();
        let target = self
            .config
            .assignor
            .assign(&subscriptions, &self.topics, &previous);
        let changed: Vec<String> = target
            .iter()
            .filter(|(id, t)| self.members.get(*id).is_some_and(|m| &m.state.target != *t))
            .map(|(id, _)| id.clone())
            .collect();
        for (id, partitions) in target {
            if let Some(member) = self.members.get_mut(&id) {
                member.state.target = partitions;
            }
        }
        for id in changed {
            self.mark_dirty(&id);
        }
    }

    /// Moves the member toward its target: first asks it to give up what it must, and only
    /// once it has, gives it its new partitions (those no other member still holds) and the
    /// group's epoch. Renews its session.
    fn reconcile_and_answer(
        &mut self,
        id: &str,
        confirmed_epoch: i32,
        now_ms: u64,
    ) -> HeartbeatAnswer {
        let group_epoch = self.group_epoch;
        let rebalance_timeout_ms = self.config.rebalance_timeout_ms;
        let mut changed = false;
        let Some(member) = self.members.get_mut(id) else {
            unreachable!("reconciling member {id} that is not in the group");
        };
        member.session_deadline_ms = now_ms.saturating_add(self.config.session_timeout_ms);
        let state = &mut member.state;
        let revoke: Vec<TopicPartition> =
            state.assigned.difference(&state.target).cloned().collect();
        if !revoke.is_empty() {
            for tp in revoke {
                state.assigned.remove(&tp);
                state.revoking.insert(tp);
            }
            member.revoke_deadline_ms = Some(now_ms.saturating_add(rebalance_timeout_ms));
            changed = true;
        }
        // Partitions it was asked to give up but that came back to it in the target: it may
        // keep consuming them.
        let regained: Vec<TopicPartition> = state
            .revoking
            .intersection(&state.target)
            .cloned()
            .collect();
        for tp in regained {
            state.revoking.remove(&tp);
            state.assigned.insert(tp);
            changed = true;
        }
        if state.revoking.is_empty() {
            member.revoke_deadline_ms = None;
            let free: Vec<TopicPartition> = state
                .target
                .iter()
                .filter(|tp| !state.assigned.contains(*tp))
                .filter(|tp| self.owners.get(*tp).is_none_or(|owner| owner == id))
                .cloned()
                .collect();
            for tp in free {
                self.owners.insert(tp.clone(), id.to_string());
                state.assigned.insert(tp);
                changed = true;
            }
            if state.member_epoch != group_epoch {
                // The epoch the member last showed it knows: if this answer is lost too, its
                // next heartbeat still carries that one.
                state.previous_epoch = confirmed_epoch;
                state.member_epoch = group_epoch;
                changed = true;
            }
        }
        let answer = HeartbeatAnswer {
            member_epoch: state.member_epoch,
            heartbeat_interval_ms: self.config.heartbeat_interval_ms,
            assignment: state.assigned.clone(),
        };
        if changed {
            self.mark_dirty(id);
        }
        answer
    }

    fn mark_dirty(&mut self, id: &str) {
        if let Some(member) = self.members.get(id) {
            self.pending.push(GroupRecord::Member(member.state.clone()));
        }
    }

    /// The changes since the last call, oldest first, with only the last record of each key
    /// kept (a member changed twice in one operation is written once, in its final state).
    fn take_records(&mut self) -> Vec<GroupRecord> {
        let pending = std::mem::take(&mut self.pending);
        let mut last: BTreeMap<RecordKey, usize> = BTreeMap::new();
        for (index, record) in pending.iter().enumerate() {
            last.insert(record.key(), index);
        }
        let keep: BTreeSet<usize> = last.into_values().collect();
        let mut records: Vec<GroupRecord> = pending
            .into_iter()
            .enumerate()
            .filter(|(index, _)| keep.contains(index))
            .map(|(_, record)| record)
            .collect();
        // A member record must carry its final state: refresh those still present.
        for record in &mut records {
            if let GroupRecord::Member(state) = record {
                if let Some(member) = self.members.get(&state.member_id) {
                    *state = member.state.clone();
                }
            }
        }
        records
    }
}

fn validate_heartbeat(heartbeat: &Heartbeat) -> Result<(), HeartbeatError> {
    let invalid = |why: String| Err(HeartbeatError::Invalid(why));
    if heartbeat.member_id.is_empty() || heartbeat.member_id.len() > ID_BYTES_MAX {
        return invalid(format!(
            "member id of {} bytes (1 to {ID_BYTES_MAX})",
            heartbeat.member_id.len()
        ));
    }
    if let Some(instance) = &heartbeat.instance_id {
        if instance.is_empty() || instance.len() > ID_BYTES_MAX {
            return invalid(format!(
                "instance id of {} bytes (1 to {ID_BYTES_MAX})",
                instance.len()
            ));
        }
    }
    if heartbeat.member_epoch < STATIC_LEAVE_EPOCH {
        return invalid(format!("member epoch {}", heartbeat.member_epoch));
    }
    if let Some(topics) = &heartbeat.subscribed_topics {
        if topics.len() > SUBSCRIBED_TOPICS_MAX {
            return invalid(format!(
                "{} subscribed topics (limit {SUBSCRIBED_TOPICS_MAX})",
                topics.len()
            ));
        }
        if let Some(bad) = topics
            .iter()
            .find(|t| t.is_empty() || t.len() > ID_BYTES_MAX)
        {
            return invalid(format!("topic name {bad:?}"));
        }
    }
    if let Some(owned) = &heartbeat.owned {
        if owned.len() > OWNED_PARTITIONS_MAX {
            return invalid(format!(
                "{} owned partitions (limit {OWNED_PARTITIONS_MAX})",
                owned.len()
            ));
        }
    }
    Ok(())
}
