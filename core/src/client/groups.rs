//! Consumer groups, client side: the coordinator calls (heartbeat, commit, fetch offsets,
//! describe, list, delete) with their retries, and [`GroupConsumer`], a member that consumes
//! the partitions of one topic its group's coordinator assigns it.
//!
//! The member follows the KIP-848 protocol the coordinator runs (`wharf_groups`): it
//! heartbeats every `heartbeat_interval_ms`; when the assignment shrinks it commits the
//! partitions it gives up (auto-commit), stops fetching them and heartbeats at once to report
//! them released; new partitions start at the group's committed offset (or per
//! `offset_reset`).

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::consumer::{Consumer, ConsumerConfig, Records, SeekTo};
use super::{decode, Client, ClientError};
use crate::protocol::*;

/// Calls a coordinator call makes before it gives up on retriable refusals (the coordinator
/// moving, the offsets topic being created); with the backoff below, about 10 s.
pub const COORDINATOR_ATTEMPTS_MAX: u32 = 20;
const COORDINATOR_BACKOFF_MS: u64 = 50;
const COORDINATOR_BACKOFF_MAX_MS: u64 = 1_000;

/// Responses of the group APIs: each carries an error code and message.
pub trait GroupResponse: Message {
    fn error(&self) -> (u16, &str);
}

macro_rules! group_responses {
    ($($name:ident),*) => {$(
        impl GroupResponse for $name {
            fn error(&self) -> (u16, &str) {
                (self.error, &self.message)
            }
        }
    )*};
}
group_responses!(
    GroupHeartbeatResponse,
    GroupResult,
    OffsetFetchResponse,
    DescribeGroupResponse,
    ListGroupsResponse,
    QueueAcquireResponse,
    QueueSettleResponse,
    DescribeQueueResponse,
    ListQueuesResponse
);

impl Client {
    /// The address of `group`'s coordinator: the leader (shard) of its offsets partition.
    /// Before the offsets topic exists, any broker (it creates the topic and answers
    /// `coordinator_loading`).
    async fn coordinator_address(
        &self,
        state_topic: &str,
        group: &str,
        refresh: bool,
    ) -> Result<String, ClientError> {
        let metadata = if refresh {
            self.refresh_metadata().await?
        } else {
            self.metadata().await?
        };
        let partitions = metadata
            .topics
            .iter()
            .find(|t| t.name == state_topic)
            .map_or(0, |t| t.partitions.len() as u32);
        if partitions == 0 {
            return Ok(self.bootstrap_address());
        }
        self.partition_address(state_topic, group_partition(group, partitions))
            .await
    }

    /// Sends a group request to the group's coordinator, retrying retriable refusals (with a
    /// metadata refresh and a backoff) up to [`COORDINATOR_ATTEMPTS_MAX`] times.
    pub async fn coordinator_call<Q: Message, R: GroupResponse>(
        &self,
        api: ApiKey,
        group: &str,
        request: &Q,
    ) -> Result<R, ClientError> {
        self.coordinator_call_on(OFFSETS_TOPIC, api, group, request, 0)
            .await
    }

    /// Like [`Client::coordinator_call`], for the coordinator of `group` on `state_topic`
    /// (`__consumer_offsets` or `__queue_state`), waiting `extra_ms` longer for the answer
    /// (a long poll).
    pub async fn coordinator_call_on<Q: Message, R: GroupResponse>(
        &self,
        state_topic: &str,
        api: ApiKey,
        group: &str,
        request: &Q,
        extra_ms: u64,
    ) -> Result<R, ClientError> {
        let mut last = None;
        for attempt in 0..COORDINATOR_ATTEMPTS_MAX {
            if attempt > 0 {
                let backoff_ms = (COORDINATOR_BACKOFF_MS << (attempt - 1).min(10))
                    .min(COORDINATOR_BACKOFF_MAX_MS);
                glommio::timer::sleep(Duration::from_millis(backoff_ms)).await;
            }
            let answered = async {
                let address = self
                    .coordinator_address(state_topic, group, attempt > 0)
                    .await?;
                let connection = self.connection(&address).await?;
                let frame = connection
                    .call(
                        api,
                        request,
                        Vec::new(),
                        self.config.request_timeout_ms + extra_ms,
                    )
                    .await?;
                decode::<R>(&frame)
            }
            .await;
            let error = match answered {
                Ok(response) => {
                    let (code, message) = response.error();
                    let code = ErrorCode::from_u16(code);
                    if code == ErrorCode::None {
                        return Ok(response);
                    }
                    ClientError::server(code, message.to_string())
                }
                Err(error) => error,
            };
            if !error.is_retriable() {
                return Err(error);
            }
            last = Some(error);
        }
        Err(last.unwrap_or_else(|| ClientError::Invalid("no attempt made".into())))
    }

    /// The group's committed offsets, by topic and partition.
    pub async fn committed_offsets(
        &self,
        group: &str,
    ) -> Result<Vec<CommittedOffsetEntry>, ClientError> {
        let response: OffsetFetchResponse = self
            .coordinator_call(
                ApiKey::OffsetFetch,
                group,
                &OffsetFetchRequest {
                    group: group.to_string(),
                },
            )
            .await?;
        Ok(response.offsets)
    }

    /// Commits offsets as an administrator (`wharf group reset-offsets`): only into a group
    /// without members.
    pub async fn commit_offsets_admin(
        &self,
        group: &str,
        offsets: Vec<OffsetCommitEntry>,
    ) -> Result<(), ClientError> {
        let _: GroupResult = self
            .coordinator_call(
                ApiKey::OffsetCommit,
                group,
                &OffsetCommitRequest {
                    group: group.to_string(),
                    member_id: None,
                    member_epoch: -1,
                    offsets,
                },
            )
            .await?;
        Ok(())
    }

    pub async fn describe_group(&self, group: &str) -> Result<DescribeGroupResponse, ClientError> {
        self.coordinator_call(
            ApiKey::DescribeGroup,
            group,
            &DescribeGroupRequest {
                group: group.to_string(),
            },
        )
        .await
    }

    /// Forgets an empty group's committed offsets.
    pub async fn delete_group(&self, group: &str) -> Result<(), ClientError> {
        let _: GroupResult = self
            .coordinator_call(
                ApiKey::DeleteGroup,
                group,
                &DeleteGroupRequest {
                    group: group.to_string(),
                },
            )
            .await?;
        Ok(())
    }

    /// Every group the cluster's coordinators hold (each broker answers for its own).
    pub async fn list_groups(&self) -> Result<Vec<GroupListing>, ClientError> {
        let metadata = self.refresh_metadata().await?;
        let mut groups = BTreeMap::new();
        for broker in &metadata.brokers {
            let address = format!("{}:{}", broker.host, broker.port);
            let connection = self.connection(&address).await?;
            let frame = connection
                .call(
                    ApiKey::ListGroups,
                    &ListGroupsRequest {},
                    Vec::new(),
                    self.config.request_timeout_ms,
                )
                .await?;
            let response: ListGroupsResponse = decode(&frame)?;
            for listing in response.groups {
                groups.insert(listing.group.clone(), listing);
            }
        }
        Ok(groups.into_values().collect())
    }
}

/// Where a member starts a partition the group has no committed offset for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetReset {
    Earliest,
    Latest,
    /// Refuse (an error from `poll`): the application must commit or seek first.
    None,
}

#[derive(Clone, Debug)]
pub struct GroupConsumerConfig {
    pub group: String,
    /// Static membership: a restarted consumer with the same instance id gets its partitions
    /// back without a rebalance.
    pub instance_id: Option<String>,
    pub offset_reset: OffsetReset,
    /// Commit the positions of what `poll` returned, at the start of a later poll (at most
    /// every `auto_commit_interval_ms`), before giving a partition up and before leaving:
    /// at-least-once without application code (a crash redelivers at most an interval's worth).
    pub auto_commit: bool,
    pub auto_commit_interval_ms: u64,
    pub consumer: ConsumerConfig,
}

impl GroupConsumerConfig {
    pub fn new(group: impl Into<String>) -> GroupConsumerConfig {
        GroupConsumerConfig {
            group: group.into(),
            instance_id: None,
            offset_reset: OffsetReset::Earliest,
            auto_commit: true,
            auto_commit_interval_ms: 1_000,
            consumer: ConsumerConfig::default(),
        }
    }
}

/// A member of a consumer group consuming one topic.
pub struct GroupConsumer {
    client: Rc<Client>,
    topic: String,
    config: GroupConsumerConfig,
    member_id: String,
    member_epoch: i32,
    heartbeat_interval_ms: u64,
    next_heartbeat: Instant,
    consumer: Consumer,
    /// The partitions this member consumes now.
    owned: BTreeSet<u32>,
    /// Positions not yet committed (auto-commit commits them before the next fetch).
    uncommitted: bool,
    /// Per partition, the newest record timestamp this member consumed (its lag in time).
    newest_consumed_ms: BTreeMap<u32, i64>,
    /// Per partition, the leader epoch of the last batch consumed (stored with commits).
    consumed_epoch: BTreeMap<u32, u32>,
    last_commit: Instant,
}

impl GroupConsumer {
    /// Joins the group (subscribed to `topic`) and takes the partitions it is given.
    pub async fn join(
        client: Rc<Client>,
        topic: &str,
        config: GroupConsumerConfig,
    ) -> Result<GroupConsumer, ClientError> {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| ClientError::Invalid(format!("random: {e}")))?;
        let member_id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let consumer = Consumer::new(Rc::clone(&client), topic, config.consumer.clone());
        let mut member = GroupConsumer {
            client,
            topic: topic.to_string(),
            config,
            member_id,
            member_epoch: 0,
            heartbeat_interval_ms: 500,
            next_heartbeat: Instant::now(),
            consumer,
            owned: BTreeSet::new(),
            uncommitted: false,
            newest_consumed_ms: BTreeMap::new(),
            consumed_epoch: BTreeMap::new(),
            last_commit: Instant::now(),
        };
        member.heartbeat(true).await?;
        Ok(member)
    }

    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    pub fn member_epoch(&self) -> i32 {
        self.member_epoch
    }

    /// The partitions this member consumes now.
    pub fn assignment(&self) -> Vec<u32> {
        self.owned.iter().copied().collect()
    }

    pub fn position(&self, partition: u32) -> Option<u64> {
        self.consumer.position(partition)
    }

    /// Moves one of this member's partitions to `offset` (the next commit stores it).
    pub async fn seek(&mut self, partition: u32, offset: u64) -> Result<(), ClientError> {
        self.consumer
            .seek(partition, SeekTo::Offset(offset))
            .await?;
        self.uncommitted = true;
        Ok(())
    }

    /// Whether every partition of this member was read up to its high watermark.
    pub fn caught_up(&self) -> bool {
        self.consumer.caught_up()
    }

    /// Heartbeats when due, then fetches from the member's partitions (waiting up to the
    /// consumer's `max_wait_ms`). With auto-commit, what the previous poll returned is
    /// committed first.
    pub async fn poll(&mut self) -> Result<Records, ClientError> {
        let commit_due = self.last_commit.elapsed()
            >= Duration::from_millis(self.config.auto_commit_interval_ms);
        if self.config.auto_commit && self.uncommitted && commit_due {
            self.commit().await?;
        }
        if Instant::now() >= self.next_heartbeat {
            self.heartbeat(false).await?;
        }
        if self.owned.is_empty() {
            // Nothing to fetch: wait as a fetch would, then let the caller poll again.
            let wait_ms =
                u64::from(self.config.consumer.max_wait_ms).min(self.heartbeat_interval_ms);
            glommio::timer::sleep(Duration::from_millis(wait_ms)).await;
            return Ok(Records::empty());
        }
        let records = match self.consumer.poll().await {
            Ok(records) => records,
            Err(ClientError::Server {
                code: ErrorCode::OffsetOutOfRange,
                message,
            }) => {
                // A committed offset outside the log (retention deleted below it, or it was
                // set beyond the end): start over per `offset_reset`.
                self.reset_out_of_range(&message).await?;
                return Ok(Records::empty());
            }
            Err(error) => return Err(error),
        };
        if !records.is_empty() {
            self.uncommitted = true;
            for (partition, timestamp_ms, leader_epoch) in records.newest_batches() {
                let newest = self.newest_consumed_ms.entry(partition).or_insert(i64::MIN);
                *newest = (*newest).max(timestamp_ms);
                self.consumed_epoch.insert(partition, leader_epoch);
            }
        }
        Ok(records)
    }

    /// Commits the positions of every partition this member consumes (synchronously: it
    /// returns once the coordinator wrote them with `acks=all`).
    pub async fn commit(&mut self) -> Result<(), ClientError> {
        let partitions: Vec<u32> = self.owned.iter().copied().collect();
        self.commit_partitions(&partitions).await?;
        self.uncommitted = false;
        self.last_commit = Instant::now();
        Ok(())
    }

    async fn commit_partitions(&mut self, partitions: &[u32]) -> Result<(), ClientError> {
        let offsets: Vec<OffsetCommitEntry> = partitions
            .iter()
            .filter_map(|&p| {
                Some(OffsetCommitEntry {
                    topic: self.topic.clone(),
                    partition: p,
                    offset: self.consumer.position(p)?,
                    leader_epoch: self.consumed_epoch.get(&p).copied(),
                    metadata: String::new(),
                })
            })
            .collect();
        if offsets.is_empty() {
            return Ok(());
        }
        let request = OffsetCommitRequest {
            group: self.config.group.clone(),
            member_id: Some(self.member_id.clone()),
            member_epoch: self.member_epoch,
            offsets,
        };
        let _: GroupResult = self
            .client
            .coordinator_call(ApiKey::OffsetCommit, &self.config.group, &request)
            .await?;
        Ok(())
    }

    /// Leaves the group (after committing, with auto-commit): its partitions move to the
    /// other members at once. A static member leaves "for a restart": its partitions wait for
    /// its successor until the session timeout.
    pub async fn leave(mut self) -> Result<(), ClientError> {
        if self.config.auto_commit && self.uncommitted {
            self.commit().await?;
        }
        let epoch = if self.config.instance_id.is_some() {
            -2
        } else {
            -1
        };
        let request = GroupHeartbeatRequest {
            group: self.config.group.clone(),
            member_id: self.member_id.clone(),
            member_epoch: epoch,
            instance_id: self.config.instance_id.clone(),
            subscribed_topics: None,
            owned: None,
            lag: Vec::new(),
        };
        let _: GroupHeartbeatResponse = self
            .client
            .coordinator_call(ApiKey::GroupHeartbeat, &self.config.group, &request)
            .await?;
        Ok(())
    }

    /// One heartbeat (a join when `join`); applies the assignment it returns. A fenced or
    /// removed member drops its partitions and joins again.
    async fn heartbeat(&mut self, join: bool) -> Result<(), ClientError> {
        let mut joining = join;
        // A revocation is reported by an immediate second heartbeat; a fence by a rejoin.
        for _ in 0..4 {
            let request = GroupHeartbeatRequest {
                group: self.config.group.clone(),
                member_id: self.member_id.clone(),
                member_epoch: if joining { 0 } else { self.member_epoch },
                instance_id: self.config.instance_id.clone(),
                subscribed_topics: joining.then(|| vec![self.topic.clone()]),
                owned: Some(
                    self.owned
                        .iter()
                        .map(|&partition| GroupPartition {
                            topic: self.topic.clone(),
                            partition,
                        })
                        .collect(),
                ),
                lag: self.lag(),
            };
            let answer: Result<GroupHeartbeatResponse, ClientError> = self
                .client
                .coordinator_call(ApiKey::GroupHeartbeat, &self.config.group, &request)
                .await;
            let response = match answer {
                Ok(response) => response,
                Err(ClientError::Server {
                    code: ErrorCode::UnknownMemberId | ErrorCode::FencedMemberEpoch,
                    ..
                }) => {
                    // Another member may own our partitions now: stop at once, no commit.
                    self.owned.clear();
                    self.consumer = Consumer::new(
                        Rc::clone(&self.client),
                        &self.topic,
                        self.config.consumer.clone(),
                    );
                    self.uncommitted = false;
                    joining = true;
                    continue;
                }
                Err(error) => return Err(error),
            };
            self.member_epoch = response.member_epoch;
            self.heartbeat_interval_ms = u64::from(response.heartbeat_interval_ms).max(10);
            self.next_heartbeat =
                Instant::now() + Duration::from_millis(self.heartbeat_interval_ms);
            let assigned: BTreeSet<u32> = response
                .assignment
                .iter()
                .filter(|p| p.topic == self.topic)
                .map(|p| p.partition)
                .collect();
            let released = self.apply_assignment(assigned).await?;
            if !released {
                return Ok(());
            }
            joining = false;
        }
        Ok(())
    }

    /// Moves every partition whose position is outside its log (below the log start or past
    /// the end) per `offset_reset`; with `none`, reports the refusal.
    async fn reset_out_of_range(&mut self, message: &str) -> Result<(), ClientError> {
        let partitions: Vec<u32> = self.owned.iter().copied().collect();
        let earliest = self
            .client
            .list_offsets(&self.topic, &partitions, OffsetSpec::Earliest)
            .await?;
        let latest = self
            .client
            .list_offsets(&self.topic, &partitions, OffsetSpec::Latest)
            .await?;
        for &partition in &partitions {
            let Some(position) = self.consumer.position(partition) else {
                continue;
            };
            let bound =
                |list: &[(u32, u64)]| list.iter().find(|(p, _)| *p == partition).map(|(_, o)| *o);
            let (Some(start), Some(end)) = (bound(&earliest), bound(&latest)) else {
                continue;
            };
            if (start..=end).contains(&position) {
                continue;
            }
            let to = match self.config.offset_reset {
                OffsetReset::Earliest => start,
                OffsetReset::Latest => end,
                OffsetReset::None => {
                    return Err(ClientError::server(
                        ErrorCode::OffsetOutOfRange,
                        format!(
                            "{message} (group {:?}, offset_reset none)",
                            self.config.group
                        ),
                    ))
                }
            };
            tracing::warn!(group = %self.config.group, topic = %self.topic, partition, position, to, "position outside the log; reset per offset_reset");
            self.consumer.seek(partition, SeekTo::Offset(to)).await?;
            self.uncommitted = true;
        }
        Ok(())
    }

    /// How far behind this member is on each of its partitions.
    fn lag(&self) -> Vec<PartitionLag> {
        let now_ms = crate::server::partition::now_ms() as i64;
        self.owned
            .iter()
            .filter_map(|&partition| {
                let position = self.consumer.position(partition)?;
                let high_watermark = self.consumer.high_watermark(partition)?;
                let lag_ms = if position >= high_watermark {
                    0
                } else {
                    self.newest_consumed_ms
                        .get(&partition)
                        .map_or(0, |&t| now_ms.saturating_sub(t).max(0) as u64)
                };
                Some(PartitionLag {
                    topic: self.topic.clone(),
                    partition,
                    position,
                    high_watermark,
                    lag_ms,
                })
            })
            .collect()
    }

    /// Takes the new assignment: commits and drops partitions taken away, starts new ones at
    /// the committed offset. Returns whether any was given up (to report it at once).
    async fn apply_assignment(&mut self, assigned: BTreeSet<u32>) -> Result<bool, ClientError> {
        let revoked: Vec<u32> = self.owned.difference(&assigned).copied().collect();
        let added: Vec<u32> = assigned.difference(&self.owned).copied().collect();
        if revoked.is_empty() && added.is_empty() {
            return Ok(false);
        }
        if !revoked.is_empty() && self.config.auto_commit {
            self.commit_partitions(&revoked).await?;
        }
        let mut positions: BTreeMap<u32, u64> = assigned
            .iter()
            .filter_map(|&p| Some((p, self.consumer.position(p)?)))
            .collect();
        if !added.is_empty() {
            let committed = self.client.committed_offsets(&self.config.group).await?;
            for &partition in &added {
                let offset = committed
                    .iter()
                    .find(|c| c.topic == self.topic && c.partition == partition)
                    .map(|c| c.offset);
                let position = match (offset, self.config.offset_reset) {
                    (Some(offset), _) => offset,
                    (None, OffsetReset::None) => {
                        return Err(ClientError::server(
                            ErrorCode::OffsetOutOfRange,
                            format!(
                                "group {:?} has no committed offset for {}/{partition} and offset_reset is none",
                                self.config.group, self.topic
                            ),
                        ))
                    }
                    (None, reset) => {
                        let spec = if reset == OffsetReset::Latest {
                            OffsetSpec::Latest
                        } else {
                            OffsetSpec::Earliest
                        };
                        let offsets = self.client.list_offsets(&self.topic, &[partition], spec).await?;
                        offsets.first().map_or(0, |(_, o)| *o)
                    }
                };
                positions.insert(partition, position);
            }
        }
        let list: Vec<u32> = assigned.iter().copied().collect();
        self.consumer.assign(Some(list), SeekTo::Offset(0)).await?;
        for (&partition, &position) in &positions {
            self.consumer
                .seek(partition, SeekTo::Offset(position))
                .await?;
        }
        self.owned = assigned;
        Ok(!revoked.is_empty())
    }
}
