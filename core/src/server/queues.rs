//! Queue coordinators (issue 16). A queue group's coordinator is the leader of partition
//! `crc32c(group) % N` of the internal topic `__queue_state` (created on the first queue
//! request), exactly as consumer groups use `__consumer_offsets`. The shard that owns that
//! partition keeps, per queue group and per partition of the consumed topic, the sans-IO state
//! of `wharf_queues::QueuePartition` (leases, delivery attempts, acks, backoff, dead-lettering)
//! and writes every change to the partition, `acks=all`, before it answers or hands anything
//! out. A new leader of the partition (failover, restart) replays it: no ack and no pending
//! delivery is lost, and an attempt number is never handed out twice.
//!
//! The consumed topic's records are read, and dead-letter copies written, through an ordinary
//! client inside the broker (`Client`, bootstrapped at this broker's own listener): the
//! coordinator need not hold the topic's partitions, and the records reach members byte for
//! byte as the producer wrote them (key, value, timestamp).
//!
//! Operations on one state partition run one at a time (a semaphore held across the write);
//! the long poll of an acquire waits for new records *outside* it, so a waiting member never
//! holds up another member's acks. A failed write drops the loaded state, and the next
//! request reloads it from the log.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use glommio::sync::Semaphore;
use serde::{Deserialize, Serialize};
use wharf_queues::{
    Backoff, DeadLetter, DeadLetterReason, Delivery, DeliveryFailure, KeyOrdering, NackOptions,
    QueueConfig, QueuePartition, QueueRecord, StaleDelivery, MEMBER_ID_BYTES_MAX,
};
use wharf_storage::batch::{batches, check_batch, BatchBuilder};
use wharf_storage::Offset;

use super::connection::Pending;
use super::dispatch::respond;
use super::groups::write_acks_all;
use super::metrics::{GroupLabels, QueueAttemptLabels, QUEUE_ATTEMPT_LABEL_MAX};
use super::partition::{monotonic_ms, now_ms, Partition, PartitionError};
use super::shard::{Shard, ShardReply, ShardRequest};
use crate::client::{decode, Client, ClientConfig, ClientError};
use crate::protocol::*;

/// Bytes read per step while a new coordinator replays its partition.
const LOAD_READ_BYTES: usize = 1024 * 1024;
/// Read steps a replay may take: a guard against a loop that makes no progress.
const LOAD_STEPS_MAX: usize = 1_000_000;
/// State records per batch when a change is written.
const RECORDS_PER_BATCH_MAX: usize = 256;
/// State records per write of a snapshot (a few MiB at most).
const RECORDS_PER_WRITE_MAX: usize = 8 * RECORDS_PER_BATCH_MAX;
/// How often each shard expires leases and carries out dead-letter copies.
pub const QUEUE_TICK_MS: u64 = 50;
/// The longest long poll of an acquire.
pub const ACQUIRE_WAIT_MS_MAX: u32 = 30_000;
/// Records one acquire may ask for.
pub const ACQUIRE_RECORDS_MAX: u32 = 1_000;
/// Settlements in one request.
pub const SETTLEMENTS_MAX: usize = 1_000;
/// Queue groups one state partition keeps.
pub const QUEUES_PER_PARTITION_MAX: usize = 1_024;
/// Bytes of one partition's records read per fetch of new records.
const FETCH_PARTITION_BYTES: u32 = 1024 * 1024;
/// Records read ahead but not yet handed out, kept in memory per queue group.
const CACHE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// One round of an acquire's long poll waits at most this long for new records, then looks
/// again at redeliveries that came due.
const WAIT_ROUND_MS_MAX: u64 = 200;
/// Rounds an acquire may take (each waits or hands something out): far above what
/// `ACQUIRE_WAIT_MS_MAX` allows, a guard against a loop that makes no progress.
const ACQUIRE_ROUNDS_MAX: usize = 10_000;
/// Dead-letter copies carried out per queue per tick.
const DEAD_LETTERS_PER_TICK_MAX: usize = 256;
/// Timeout of the coordinator's own fetches and dead-letter writes.
const CLIENT_TIMEOUT_MS: u64 = 10_000;

/// Headers of a dead-letter record (its key and value are the original's).
pub const DLQ_HEADER_TOPIC: &str = "wharf.dlq.topic";
pub const DLQ_HEADER_PARTITION: &str = "wharf.dlq.partition";
pub const DLQ_HEADER_OFFSET: &str = "wharf.dlq.offset";
pub const DLQ_HEADER_DELIVERIES: &str = "wharf.dlq.delivery_count";
pub const DLQ_HEADER_REASON: &str = "wharf.dlq.reason";

/// A record of the state topic (JSON in the record value; the key is the group).
#[derive(Clone, Debug, Serialize, Deserialize)]
enum StoredQueueRecord {
    Created {
        group: String,
        topic: String,
        settings: StoredSettings,
        partitions: u32,
    },
    Partition {
        group: String,
        partition: u32,
        record: QueueRecord,
    },
}

/// [`QueueSettings`] as stored (the wire type is rkyv only).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredSettings {
    ack_wait_ms: u64,
    max_deliveries: u32,
    in_flight_max: u32,
    backoff_initial_ms: u64,
    backoff_max_ms: u64,
    backoff_multiplier_permille: u32,
    backoff_jitter_permille: u32,
    backoff_list_ms: Vec<u64>,
    per_key_ordering: bool,
    dead_letter_topic: String,
}

impl From<&QueueSettings> for StoredSettings {
    fn from(s: &QueueSettings) -> StoredSettings {
        StoredSettings {
            ack_wait_ms: s.ack_wait_ms,
            max_deliveries: s.max_deliveries,
            in_flight_max: s.in_flight_max,
            backoff_initial_ms: s.backoff_initial_ms,
            backoff_max_ms: s.backoff_max_ms,
            backoff_multiplier_permille: s.backoff_multiplier_permille,
            backoff_jitter_permille: s.backoff_jitter_permille,
            backoff_list_ms: s.backoff_list_ms.clone(),
            per_key_ordering: s.per_key_ordering,
            dead_letter_topic: s.dead_letter_topic.clone(),
        }
    }
}

impl From<StoredSettings> for QueueSettings {
    fn from(s: StoredSettings) -> QueueSettings {
        QueueSettings {
            ack_wait_ms: s.ack_wait_ms,
            max_deliveries: s.max_deliveries,
            in_flight_max: s.in_flight_max,
            backoff_initial_ms: s.backoff_initial_ms,
            backoff_max_ms: s.backoff_max_ms,
            backoff_multiplier_permille: s.backoff_multiplier_permille,
            backoff_jitter_permille: s.backoff_jitter_permille,
            backoff_list_ms: s.backoff_list_ms,
            per_key_ordering: s.per_key_ordering,
            dead_letter_topic: s.dead_letter_topic,
        }
    }
}

impl StoredQueueRecord {
    fn group(&self) -> &str {
        match self {
            StoredQueueRecord::Created { group, .. }
            | StoredQueueRecord::Partition { group, .. } => group,
        }
    }
}

/// A queue request, as shards forward it to the coordinator's shard.
#[derive(Clone, Debug)]
pub enum QueueOp {
    Create(CreateQueueRequest),
    Acquire(QueueAcquireRequest),
    Settle(QueueSettleRequest),
    Describe(DescribeQueueRequest),
    /// The queues this shard coordinates.
    List,
}

#[derive(Clone, Debug)]
pub enum QueueAnswer {
    Result(GroupResult),
    Acquire(QueueAcquireResponse),
    Settle(QueueSettleResponse),
    Describe(DescribeQueueResponse),
    List(Vec<QueueListing>),
}

impl QueueOp {
    fn group(&self) -> &str {
        match self {
            QueueOp::Create(r) => &r.group,
            QueueOp::Acquire(r) => &r.group,
            QueueOp::Settle(r) => &r.group,
            QueueOp::Describe(r) => &r.group,
            QueueOp::List => "",
        }
    }

    fn error(&self, code: ErrorCode, message: impl Into<String>) -> QueueAnswer {
        let (error, message) = (code as u16, message.into());
        match self {
            QueueOp::Create(_) => QueueAnswer::Result(GroupResult { error, message }),
            QueueOp::Acquire(_) => QueueAnswer::Acquire(QueueAcquireResponse {
                error,
                message,
                topic: String::new(),
                records: Vec::new(),
            }),
            QueueOp::Settle(_) => QueueAnswer::Settle(QueueSettleResponse {
                error,
                message,
                results: Vec::new(),
            }),
            QueueOp::Describe(_) => QueueAnswer::Describe(DescribeQueueResponse {
                error,
                message,
                group: String::new(),
                topic: String::new(),
                coordinator: 0,
                settings: QueueSettings::default(),
                partitions: Vec::new(),
                acked: 0,
                redelivered: 0,
                dead_lettered: 0,
            }),
            QueueOp::List => QueueAnswer::List(Vec::new()),
        }
    }
}

/// The queue coordinators of one shard: per state partition it owns.
#[derive(Default)]
pub struct QueueCoordinator {
    partitions: RefCell<HashMap<u32, Rc<StatePartition>>>,
    /// The coordinator's own client (reads the consumed topics, writes dead letters).
    client: RefCell<Option<Rc<Client>>>,
}

struct StatePartition {
    /// One operation at a time, held across its write.
    lock: Semaphore,
    loaded: RefCell<Option<Loaded>>,
}

struct Loaded {
    /// The leader epoch this state was loaded in: a new epoch means reloading.
    leader_epoch: u32,
    queues: BTreeMap<String, Queue>,
    /// Records written (or replayed) since the last snapshot, and when it was taken
    /// (monotonic): the state log is compacted as `__consumer_offsets` is.
    records_since_snapshot: u64,
    last_snapshot_ms: u64,
}

/// One record read from the consumed topic.
#[derive(Clone, Debug)]
struct CachedRecord {
    timestamp_ms: i64,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
}

impl CachedRecord {
    fn bytes(&self) -> usize {
        self.value.len() + self.key.as_ref().map_or(0, Vec::len) + 32
    }
}

struct Queue {
    topic: String,
    /// As created, with every default filled in.
    settings: QueueSettings,
    partitions: BTreeMap<u32, QueuePartition>,
    /// Records read from the topic and not done yet (candidates and records in the window),
    /// by (partition, offset); at most `CACHE_BYTES_MAX` of them.
    cache: BTreeMap<(u32, u64), CachedRecord>,
    cache_bytes: usize,
    /// Per partition, where the next read of new records starts when the log no longer has
    /// the queue's end offset (retention deleted it).
    read_from: BTreeMap<u32, u64>,
    /// Some records may wait for their dead-letter copy.
    dead_letters_pending: bool,
    /// Process counters (since this coordinator loaded the queue).
    acked: u64,
    redelivered: u64,
    dead_lettered: u64,
}

impl Queue {
    /// Drops cached records that are done or no longer tracked below the start.
    fn prune_cache(&mut self) {
        let partitions = &self.partitions;
        let mut freed = 0usize;
        self.cache.retain(|(partition, offset), record| {
            let keep = partitions.get(partition).is_some_and(|qp| {
                *offset >= qp.start_offset()
                    && !qp.record_state(*offset).is_some_and(|s| s.is_done())
            });
            if !keep {
                freed += record.bytes();
            }
            keep
        });
        self.cache_bytes -= freed;
    }

    /// The next offset to read new records of `partition` from.
    fn next_read(&self, partition: u32, qp: &QueuePartition) -> u64 {
        let cached_end = self
            .cache
            .range((partition, 0)..=(partition, u64::MAX))
            .next_back()
            .map(|((_, offset), _)| offset + 1)
            .unwrap_or(0);
        qp.end_offset()
            .max(cached_end)
            .max(self.read_from.get(&partition).copied().unwrap_or(0))
    }
}

/// The settings with every default filled in, and the state machine's config they make.
pub fn normalize_settings(
    topic: &str,
    settings: &QueueSettings,
) -> Result<(QueueSettings, QueueConfig), String> {
    let defaults = QueueConfig::default();
    let mut s = settings.clone();
    if s.ack_wait_ms == 0 {
        s.ack_wait_ms = defaults.ack_wait_ms;
    }
    if s.max_deliveries == 0 {
        s.max_deliveries = defaults.max_deliveries;
    }
    if s.in_flight_max == 0 {
        s.in_flight_max = defaults.in_flight_max as u32;
    }
    let Backoff::Exponential {
        initial_ms,
        max_ms,
        multiplier_permille,
        ..
    } = Backoff::default()
    else {
        unreachable!("the default backoff is exponential");
    };
    if s.backoff_initial_ms == 0 {
        s.backoff_initial_ms = initial_ms;
    }
    if s.backoff_max_ms == 0 {
        s.backoff_max_ms = max_ms.max(s.backoff_initial_ms);
    }
    if s.backoff_multiplier_permille == 0 {
        s.backoff_multiplier_permille = multiplier_permille;
    }
    if s.dead_letter_topic.is_empty() {
        s.dead_letter_topic = format!("{topic}.dlq");
    }
    if s.dead_letter_topic == topic {
        return Err("the dead-letter topic must not be the consumed topic".to_string());
    }
    if is_internal_topic(&s.dead_letter_topic) {
        return Err(format!(
            "the dead-letter topic {:?} is an internal name",
            s.dead_letter_topic
        ));
    }
    let backoff = if s.backoff_list_ms.is_empty() {
        Backoff::exponential(
            s.backoff_initial_ms,
            s.backoff_max_ms,
            s.backoff_multiplier_permille,
            s.backoff_jitter_permille,
        )
    } else {
        Backoff::list(s.backoff_list_ms.clone())
    }
    .map_err(|e| e.to_string())?;
    let in_flight_max = s.in_flight_max as usize;
    let config = QueueConfig {
        ack_wait_ms: s.ack_wait_ms,
        max_deliveries: s.max_deliveries,
        in_flight_max,
        window_records_max: defaults.window_records_max.max(in_flight_max),
        key_ordering: if s.per_key_ordering {
            KeyOrdering::PerKey
        } else {
            KeyOrdering::Unordered
        },
        backoff,
    };
    config.validate().map_err(|e| e.to_string())?;
    Ok((s, config))
}

fn key_hash(key: Option<&[u8]>) -> Option<u64> {
    key.map(|k| u64::from(crc32c::crc32c(k)) | (u64::from(crc32c::crc32c_append(7, k)) << 32))
}

/// A random sample for backoff jitter (std's per-process random hash keys; jitter needs no
/// more).
fn jitter_sample() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(now_ms());
    hasher.finish()
}

impl Shard {
    /// Admits a queue API request: answered by the coordinator's shard.
    pub(crate) fn admit_queue(self: &Rc<Self>, header: FrameHeader, op: QueueOp) -> Pending {
        let shard = Rc::clone(self);
        async move {
            match shard.queue_request(op).await {
                QueueAnswer::Result(r) => respond(&header, &r, Vec::new()),
                QueueAnswer::Acquire(r) => respond(&header, &r, Vec::new()),
                QueueAnswer::Settle(r) => respond(&header, &r, Vec::new()),
                QueueAnswer::Describe(r) => respond(&header, &r, Vec::new()),
                QueueAnswer::List(queues) => respond(
                    &header,
                    &ListQueuesResponse {
                        error: 0,
                        message: String::new(),
                        queues,
                    },
                    Vec::new(),
                ),
            }
        }
        .boxed_local()
    }

    async fn queue_request(self: &Rc<Self>, op: QueueOp) -> QueueAnswer {
        if let QueueOp::List = op {
            let mut queues = Vec::new();
            for shard in 0..self.shared.shards() as u32 {
                if let Some(ShardReply::Queue(QueueAnswer::List(more))) = self
                    .to_shard(
                        shard,
                        ShardRequest::Queue {
                            partition: 0,
                            op: QueueOp::List,
                        },
                    )
                    .await
                {
                    queues.extend(more);
                }
            }
            queues.sort_by(|a, b| a.group.cmp(&b.group));
            return QueueAnswer::List(queues);
        }
        let group = op.group();
        if group.is_empty() || group.len() > wharf_groups::group::ID_BYTES_MAX {
            return op.error(
                ErrorCode::InvalidRequest,
                format!(
                    "queue group names are 1 to {} bytes long",
                    wharf_groups::group::ID_BYTES_MAX
                ),
            );
        }
        let partitions = self
            .metadata
            .borrow()
            .topics
            .get(QUEUE_STATE_TOPIC)
            .map(|t| t.partitions.len() as u32);
        let Some(partitions) = partitions.filter(|&n| n > 0) else {
            let result = self.create_internal_topic(QUEUE_STATE_TOPIC).await;
            return op.error(
                ErrorCode::CoordinatorLoading,
                format!("{QUEUE_STATE_TOPIC} is being created ({result}); retry"),
            );
        };
        let partition = group_partition(group, partitions);
        let owner = match self.owner(QUEUE_STATE_TOPIC, partition) {
            Ok(owner) => owner,
            Err(e) => return op.error(ErrorCode::NotCoordinator, e.message),
        };
        if owner == self.id {
            return self.coordinate_queue(partition, op).await;
        }
        let failed = op.error(
            ErrorCode::CoordinatorLoading,
            "the coordinator's shard is not answering",
        );
        match self
            .to_shard(owner, ShardRequest::Queue { partition, op })
            .await
        {
            Some(ShardReply::Queue(answer)) => answer,
            _ => failed,
        }
    }

    fn state_partition(&self, index: u32) -> Rc<StatePartition> {
        Rc::clone(
            self.queue_coordinator
                .partitions
                .borrow_mut()
                .entry(index)
                .or_insert_with(|| {
                    Rc::new(StatePartition {
                        lock: Semaphore::new(1),
                        loaded: RefCell::new(None),
                    })
                }),
        )
    }

    /// The state partition `index` if this broker leads it, loaded in the current epoch
    /// (replayed first when it is not). Call with the partition's lock held.
    async fn led_and_loaded(
        self: &Rc<Self>,
        index: u32,
        state: &StatePartition,
    ) -> Result<Rc<Partition>, (ErrorCode, String)> {
        let Some(partition) = self.local_partition(QUEUE_STATE_TOPIC, index) else {
            return Err((
                ErrorCode::NotCoordinator,
                format!("{QUEUE_STATE_TOPIC}/{index} is not open on this shard"),
            ));
        };
        let description = partition.describe();
        let me = self.shared.config.broker_id;
        if description.leader != me {
            if let Some(loaded) = state.loaded.borrow_mut().take() {
                // Another broker coordinates these queues now: its gauges are the live ones.
                for group in loaded.queues.keys() {
                    self.forget_queue_gauges(group);
                }
            }
            return Err((
                ErrorCode::NotCoordinator,
                format!(
                    "broker {} leads {QUEUE_STATE_TOPIC}/{index}, the queue's coordinator",
                    description.leader
                ),
            ));
        }
        let current = state.loaded.borrow().as_ref().map(|l| l.leader_epoch);
        if current != Some(description.leader_epoch) {
            match self.load_queues(&partition).await {
                Ok((queues, replayed)) => {
                    *state.loaded.borrow_mut() = Some(Loaded {
                        leader_epoch: description.leader_epoch,
                        queues,
                        records_since_snapshot: replayed,
                        last_snapshot_ms: monotonic_ms(),
                    });
                }
                Err(e) => {
                    *state.loaded.borrow_mut() = None;
                    return Err((
                        ErrorCode::CoordinatorLoading,
                        format!("loading {QUEUE_STATE_TOPIC}/{index}: {}", e.message),
                    ));
                }
            }
        }
        Ok(partition)
    }

    /// Runs `op` on the coordinator of state partition `index`, which this shard owns.
    pub(crate) async fn coordinate_queue(self: &Rc<Self>, index: u32, op: QueueOp) -> QueueAnswer {
        match op {
            QueueOp::List => QueueAnswer::List(self.list_queues()),
            QueueOp::Create(request) => self.create_queue(index, request).await,
            QueueOp::Acquire(request) => self.acquire(index, request).await,
            QueueOp::Settle(request) => self.settle(index, request).await,
            QueueOp::Describe(request) => self.describe_queue(index, request).await,
        }
    }

    fn list_queues(&self) -> Vec<QueueListing> {
        let me = self.shared.config.broker_id;
        let mut listed = Vec::new();
        let partitions: Vec<(u32, Rc<StatePartition>)> = self
            .queue_coordinator
            .partitions
            .borrow()
            .iter()
            .map(|(i, p)| (*i, Rc::clone(p)))
            .collect();
        for (index, state) in partitions {
            let leads = self
                .local_partition(QUEUE_STATE_TOPIC, index)
                .is_some_and(|p| p.describe().leader == me);
            if !leads {
                continue;
            }
            if let Some(loaded) = state.loaded.borrow().as_ref() {
                listed.extend(loaded.queues.iter().map(|(group, q)| {
                    QueueListing {
                        group: group.clone(),
                        topic: q.topic.clone(),
                        in_flight: q
                            .partitions
                            .values()
                            .map(|p| p.in_flight_count() as u32)
                            .sum(),
                        dead_letter_topic: q.settings.dead_letter_topic.clone(),
                    }
                }));
            }
        }
        listed
    }

    async fn create_queue(self: &Rc<Self>, index: u32, request: CreateQueueRequest) -> QueueAnswer {
        let op = QueueOp::Create(request.clone());
        if is_internal_topic(&request.topic) {
            return op.error(
                ErrorCode::InvalidTopic,
                format!("{:?} is an internal topic", request.topic),
            );
        }
        let topic_meta = self
            .metadata
            .borrow()
            .topics
            .get(&request.topic)
            .map(|t| (t.partitions.len() as u32, t.replication_factor));
        let Some((partitions, replication_factor)) = topic_meta else {
            return op.error(
                ErrorCode::UnknownTopic,
                format!("topic {:?} does not exist", request.topic),
            );
        };
        let (settings, config) = match normalize_settings(&request.topic, &request.settings) {
            Ok(normalized) => normalized,
            Err(message) => return op.error(ErrorCode::InvalidConfig, message),
        };
        // The dead-letter topic first: a queue never dead-letters into nowhere.
        let dlq_exists = self
            .metadata
            .borrow()
            .topics
            .contains_key(&settings.dead_letter_topic);
        if !dlq_exists {
            let created = self
                .create_topic(CreateTopicRequest {
                    name: settings.dead_letter_topic.clone(),
                    partitions,
                    replication_factor,
                    configs: Vec::new(),
                })
                .await;
            let code = ErrorCode::from_u16(created.error);
            if code != ErrorCode::None && code != ErrorCode::TopicAlreadyExists {
                return op.error(
                    code,
                    format!(
                        "creating the dead-letter topic {:?}: {}",
                        settings.dead_letter_topic, created.message
                    ),
                );
            }
        }
        let state = self.state_partition(index);
        let Ok(_permit) = state.lock.acquire_permit(1).await else {
            return op.error(ErrorCode::ShuttingDown, "shutting down");
        };
        let partition = match self.led_and_loaded(index, &state).await {
            Ok(partition) => partition,
            Err((code, message)) => return op.error(code, message),
        };
        let records = {
            let loaded = state.loaded.borrow();
            let Some(loaded) = loaded.as_ref() else {
                return op.error(ErrorCode::CoordinatorLoading, "not loaded; retry");
            };
            if let Some(existing) = loaded.queues.get(&request.group) {
                return if existing.topic == request.topic && existing.settings == settings {
                    QueueAnswer::Result(GroupResult {
                        error: 0,
                        message: "exists already with these settings".to_string(),
                    })
                } else {
                    op.error(
                        ErrorCode::QueueAlreadyExists,
                        format!(
                            "queue group {:?} exists on topic {:?} with other settings",
                            request.group, existing.topic
                        ),
                    )
                };
            }
            if loaded.queues.len() >= QUEUES_PER_PARTITION_MAX {
                return op.error(
                    ErrorCode::LimitReached,
                    format!("this coordinator partition keeps {QUEUES_PER_PARTITION_MAX} queues"),
                );
            }
            let mut records = vec![StoredQueueRecord::Created {
                group: request.group.clone(),
                topic: request.topic.clone(),
                settings: StoredSettings::from(&settings),
                partitions,
            }];
            for p in 0..partitions {
                let qp = match QueuePartition::new(config.clone(), 0) {
                    Ok(qp) => qp,
                    Err(e) => return op.error(ErrorCode::InvalidConfig, e.to_string()),
                };
                records.extend(tagged(&request.group, p, qp.snapshot()));
            }
            records
        };
        if let Err(e) = persist(&partition, &state, &records).await {
            *state.loaded.borrow_mut() = None;
            return op.error(
                retriable(e.code),
                format!("writing the queue: {}", e.message),
            );
        }
        let queue = build_queue(&request.topic, &settings, partitions, BTreeMap::new());
        match queue {
            Ok(queue) => {
                if let Some(loaded) = state.loaded.borrow_mut().as_mut() {
                    loaded.queues.insert(request.group.clone(), queue);
                }
                QueueAnswer::Result(GroupResult {
                    error: 0,
                    message: String::new(),
                })
            }
            Err(message) => op.error(ErrorCode::InvalidConfig, message),
        }
    }

    async fn acquire(self: &Rc<Self>, index: u32, request: QueueAcquireRequest) -> QueueAnswer {
        let op = QueueOp::Acquire(request.clone());
        if request.member.is_empty() || request.member.len() > MEMBER_ID_BYTES_MAX {
            return op.error(
                ErrorCode::InvalidRequest,
                format!("member ids are 1 to {MEMBER_ID_BYTES_MAX} bytes long"),
            );
        }
        if request.records_max == 0 || request.records_max > ACQUIRE_RECORDS_MAX {
            return op.error(
                ErrorCode::InvalidRequest,
                format!("records_max must be 1 to {ACQUIRE_RECORDS_MAX}"),
            );
        }
        let wait_ms = u64::from(request.wait_ms.min(ACQUIRE_WAIT_MS_MAX));
        let deadline = Instant::now() + Duration::from_millis(wait_ms);
        let mut round_wait_ms = 0u64;
        for _ in 0..ACQUIRE_ROUNDS_MAX {
            if let Err((code, message)) = self
                .read_new_records(index, &request.group, round_wait_ms)
                .await
            {
                return op.error(code, message);
            }
            let acquired = match self.acquire_once(index, &request).await {
                Ok(acquired) => acquired,
                Err((code, message)) => return op.error(code, message),
            };
            let left_ms = deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as u64;
            if !acquired.1.is_empty() || left_ms == 0 {
                let records = match self
                    .with_contents(index, &request.group, &acquired.0, acquired.1)
                    .await
                {
                    Ok(records) => records,
                    Err((code, message)) => return op.error(code, message),
                };
                return QueueAnswer::Acquire(QueueAcquireResponse {
                    error: 0,
                    message: String::new(),
                    topic: acquired.0,
                    records,
                });
            }
            // Nothing now: wait for new records (the fetch long-polls), but no longer than
            // until a waiting redelivery comes due.
            let due_ms = acquired
                .2
                .map_or(WAIT_ROUND_MS_MAX, |at| at.saturating_sub(now_ms()));
            round_wait_ms = left_ms.min(WAIT_ROUND_MS_MAX).min(due_ms.max(1));
        }
        op.error(ErrorCode::RequestTimeout, "the acquire made no progress")
    }

    /// One acquire under the lock: hands out what is deliverable now and writes it. Returns
    /// the topic, the deliveries (without contents) and when the next waiting record comes due.
    #[allow(clippy::type_complexity)]
    async fn acquire_once(
        self: &Rc<Self>,
        index: u32,
        request: &QueueAcquireRequest,
    ) -> Result<(String, Vec<(u32, wharf_queues::Acquired)>, Option<u64>), (ErrorCode, String)>
    {
        let state = self.state_partition(index);
        let Ok(_permit) = state.lock.acquire_permit(1).await else {
            return Err((ErrorCode::ShuttingDown, "shutting down".to_string()));
        };
        let partition = self.led_and_loaded(index, &state).await?;
        let now = now_ms();
        let (topic, acquired, records, next_due) = {
            let mut loaded = state.loaded.borrow_mut();
            let Some(queue) = loaded
                .as_mut()
                .and_then(|l| l.queues.get_mut(&request.group))
            else {
                return Err(unknown_queue(&request.group));
            };
            let mut left = request.records_max as usize;
            let mut acquired = Vec::new();
            let mut records = Vec::new();
            // Start at a rotating partition so one busy partition does not starve the rest.
            let count = queue.partitions.len().max(1);
            let first = (now as usize / QUEUE_TICK_MS as usize) % count;
            let order: Vec<u32> = queue
                .partitions
                .keys()
                .copied()
                .cycle()
                .skip(first)
                .take(queue.partitions.len())
                .collect();
            for p in order {
                if left == 0 {
                    break;
                }
                let Some(qp) = queue.partitions.get_mut(&p) else {
                    continue;
                };
                let candidates: Vec<(u64, Option<u64>)> = queue
                    .cache
                    .range((p, qp.end_offset())..=(p, u64::MAX))
                    .take(wharf_queues::CANDIDATES_MAX)
                    .map(|((_, offset), r)| (*offset, key_hash(r.key.as_deref())))
                    .collect();
                let acquisition = qp
                    .acquire(&request.member, now, left, &candidates)
                    .map_err(|e| (ErrorCode::InvalidRequest, e.to_string()))?;
                left -= acquisition.acquired.len();
                for a in &acquisition.acquired {
                    if a.delivery_attempt > 1 {
                        queue.redelivered += 1;
                    }
                    self.shared
                        .metrics
                        .queue_deliveries
                        .get_or_create(&QueueAttemptLabels {
                            group: request.group.clone(),
                            attempt: a.delivery_attempt.min(QUEUE_ATTEMPT_LABEL_MAX),
                        })
                        .inc();
                }
                acquired.extend(acquisition.acquired.into_iter().map(|a| (p, a)));
                records.extend(tagged(&request.group, p, acquisition.records));
            }
            let next_due = queue
                .partitions
                .values()
                .filter_map(|qp| qp.next_available_ms(now))
                .min();
            queue.prune_cache();
            (queue.topic.clone(), acquired, records, next_due)
        };
        if !records.is_empty() {
            if let Err(e) = persist(&partition, &state, &records).await {
                // Nothing is handed out that is not written: forget, reload next time.
                *state.loaded.borrow_mut() = None;
                return Err((
                    retriable(e.code),
                    format!("writing the acquisition: {}", e.message),
                ));
            }
        }
        Ok((topic, acquired, next_due))
    }

    /// Reads records of the queue's topic past what it has seen into its cache (long-polling
    /// up to `wait_ms` when there is room for more). Holds no lock while it waits.
    async fn read_new_records(
        self: &Rc<Self>,
        index: u32,
        group: &str,
        wait_ms: u64,
    ) -> Result<(), (ErrorCode, String)> {
        let state = self.state_partition(index);
        let (topic, reads, epoch) = {
            let loaded = state.loaded.borrow();
            let Some(loaded) = loaded.as_ref() else {
                // Loaded by the acquire that follows.
                return Ok(());
            };
            let Some(queue) = loaded.queues.get(group) else {
                return Err(unknown_queue(group));
            };
            if queue.cache_bytes >= CACHE_BYTES_MAX {
                return Ok(());
            }
            let reads: Vec<(u32, u64)> = queue
                .partitions
                .iter()
                .filter(|(p, qp)| {
                    // Enough candidates read ahead already for a full window of leases.
                    let ahead = queue
                        .cache
                        .range((**p, qp.end_offset())..=(**p, u64::MAX))
                        .count();
                    ahead < qp.config().in_flight_max
                })
                .map(|(p, qp)| (*p, queue.next_read(*p, qp)))
                .collect();
            (queue.topic.clone(), reads, loaded.leader_epoch)
        };
        if reads.is_empty() {
            return Ok(());
        }
        let fetched = self
            .fetch_records(&topic, &reads, wait_ms)
            .await
            .map_err(|e| (client_code(&e), format!("reading {topic}: {e}")))?;
        let mut loaded = state.loaded.borrow_mut();
        let Some(loaded) = loaded.as_mut().filter(|l| l.leader_epoch == epoch) else {
            return Ok(());
        };
        let Some(queue) = loaded.queues.get_mut(group) else {
            return Ok(());
        };
        for (p, outcome) in fetched {
            match outcome {
                FetchOutcome::Records(records) => {
                    let Some(qp) = queue.partitions.get(&p) else {
                        continue;
                    };
                    let from = queue.next_read(p, qp);
                    for (offset, record) in records {
                        // Only contiguous reads past what is known, within the budget.
                        if offset < from || queue.cache_bytes >= CACHE_BYTES_MAX {
                            continue;
                        }
                        queue.cache_bytes += record.bytes();
                        queue.cache.insert((p, offset), record);
                    }
                }
                FetchOutcome::StartsAt(log_start) => {
                    // Retention deleted records the queue never delivered: they are gone
                    // for every reader; go on from the log's start.
                    tracing::warn!(%topic, partition = p, log_start, "queue records deleted by retention before delivery");
                    queue.read_from.insert(p, log_start);
                }
            }
        }
        Ok(())
    }

    /// Fetches `(partition, from)` of `topic` through the coordinator's client.
    async fn fetch_records(
        self: &Rc<Self>,
        topic: &str,
        reads: &[(u32, u64)],
        wait_ms: u64,
    ) -> Result<Vec<(u32, FetchOutcome)>, ClientError> {
        let client = self.queue_client().await?;
        let mut by_address: BTreeMap<String, Vec<(u32, u64)>> = BTreeMap::new();
        for &(p, from) in reads {
            let address = client.partition_address(topic, p).await?;
            by_address.entry(address).or_default().push((p, from));
        }
        let mut calls = Vec::new();
        for (address, reads) in by_address {
            let connection = client.connection(&address).await?;
            let request = FetchRequest {
                max_wait_ms: wait_ms as u32,
                min_bytes: 1,
                max_bytes: FETCH_PARTITION_BYTES.saturating_mul(reads.len() as u32),
                partitions: reads
                    .iter()
                    .map(|&(partition, fetch_offset)| FetchPartition {
                        topic: topic.to_string(),
                        partition,
                        fetch_offset,
                        max_bytes: FETCH_PARTITION_BYTES,
                        leader_epoch: None,
                        read_replica: None,
                        avoid_replicas: Vec::new(),
                    })
                    .collect(),
                reader_id: String::new(),
                rack: String::new(),
            };
            calls.push(async move {
                connection
                    .call(
                        ApiKey::Fetch,
                        &request,
                        Vec::new(),
                        wait_ms + CLIENT_TIMEOUT_MS,
                    )
                    .await
            });
        }
        let mut outcomes = Vec::new();
        for frame in futures_util::future::join_all(calls).await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(error) => {
                    let _ = client.refresh_metadata().await;
                    return Err(error);
                }
            };
            let response: FetchResponse = decode(&frame)?;
            let mut at = 0usize;
            for p in response.partitions {
                let len = p.batch_bytes as usize;
                let code = ErrorCode::from_u16(p.error);
                if code == ErrorCode::OffsetOutOfRange {
                    outcomes.push((p.partition, FetchOutcome::StartsAt(p.log_start_offset)));
                    at += len;
                    continue;
                }
                if code != ErrorCode::None {
                    if code.is_retriable() {
                        let _ = client.refresh_metadata().await;
                        at += len;
                        continue;
                    }
                    return Err(ClientError::server(code, p.message));
                }
                let Some(bytes) = frame.payload().get(at..at + len) else {
                    return Err(ClientError::Protocol(
                        "fetch payload shorter than declared".to_string(),
                    ));
                };
                outcomes.push((p.partition, FetchOutcome::Records(parse_records(bytes)?)));
                at += len;
            }
        }
        Ok(outcomes)
    }

    /// The coordinator's client, connected on first use.
    async fn queue_client(self: &Rc<Self>) -> Result<Rc<Client>, ClientError> {
        if let Some(client) = self.queue_coordinator.client.borrow().as_ref() {
            return Ok(Rc::clone(client));
        }
        let mut config = ClientConfig::new(self.shared.config.listen.clone());
        config.request_timeout_ms = CLIENT_TIMEOUT_MS;
        let client = Client::connect(config).await?;
        *self.queue_coordinator.client.borrow_mut() = Some(Rc::clone(&client));
        Ok(client)
    }

    /// The deliveries with their records' contents (from the cache, else read again: after a
    /// failover the new coordinator has none cached).
    async fn with_contents(
        self: &Rc<Self>,
        index: u32,
        group: &str,
        topic: &str,
        acquired: Vec<(u32, wharf_queues::Acquired)>,
    ) -> Result<Vec<QueueDelivery>, (ErrorCode, String)> {
        let mut deliveries = Vec::with_capacity(acquired.len());
        for (p, a) in acquired {
            let record = match self.cached(index, group, p, a.offset) {
                Some(record) => record,
                None => self.read_one(topic, p, a.offset).await.map_err(|e| {
                    (
                        client_code(&e),
                        format!("reading {topic}/{p}@{}: {e}", a.offset),
                    )
                })?,
            };
            deliveries.push(QueueDelivery {
                partition: p,
                offset: a.offset,
                delivery_attempt: a.delivery_attempt,
                lease_until_ms: a.lease_until_ms,
                timestamp_ms: record.timestamp_ms,
                key: record.key,
                value: record.value,
            });
        }
        Ok(deliveries)
    }

    fn cached(&self, index: u32, group: &str, partition: u32, offset: u64) -> Option<CachedRecord> {
        let state = self.state_partition(index);
        let loaded = state.loaded.borrow();
        loaded
            .as_ref()?
            .queues
            .get(group)?
            .cache
            .get(&(partition, offset))
            .cloned()
    }

    /// Reads the one record at `offset`.
    async fn read_one(
        self: &Rc<Self>,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<CachedRecord, ClientError> {
        let fetched = self.fetch_records(topic, &[(partition, offset)], 0).await?;
        for (p, outcome) in fetched {
            if let (true, FetchOutcome::Records(records)) = (p == partition, outcome) {
                if let Some((_, record)) = records.into_iter().find(|(o, _)| *o == offset) {
                    return Ok(record);
                }
            }
        }
        Err(ClientError::server(
            ErrorCode::OffsetOutOfRange,
            format!("record {offset} is no longer in the log"),
        ))
    }

    async fn settle(self: &Rc<Self>, index: u32, request: QueueSettleRequest) -> QueueAnswer {
        let op = QueueOp::Settle(request.clone());
        if request.settlements.len() > SETTLEMENTS_MAX {
            return op.error(
                ErrorCode::InvalidRequest,
                format!(
                    "{} settlements (limit {SETTLEMENTS_MAX})",
                    request.settlements.len()
                ),
            );
        }
        let state = self.state_partition(index);
        let Ok(_permit) = state.lock.acquire_permit(1).await else {
            return op.error(ErrorCode::ShuttingDown, "shutting down");
        };
        let partition = match self.led_and_loaded(index, &state).await {
            Ok(partition) => partition,
            Err((code, message)) => return op.error(code, message),
        };
        let now = now_ms();
        let (results, records, acks) = {
            let mut loaded = state.loaded.borrow_mut();
            let Some(queue) = loaded
                .as_mut()
                .and_then(|l| l.queues.get_mut(&request.group))
            else {
                let (code, message) = unknown_queue(&request.group);
                return op.error(code, message);
            };
            let mut results = Vec::with_capacity(request.settlements.len());
            let mut records = Vec::new();
            let acked_before = queue.acked;
            for s in &request.settlements {
                let result = settle_one(queue, &request.member, s, now);
                let (error, message, lease_until_ms, more) = match result {
                    Ok((lease_until_ms, more)) => {
                        (ErrorCode::None, String::new(), lease_until_ms, more)
                    }
                    Err((code, message)) => (code, message, 0, Vec::new()),
                };
                records.extend(tagged(&request.group, s.partition, more));
                results.push(QueueSettleResult {
                    error: error as u16,
                    message,
                    lease_until_ms,
                });
            }
            queue.prune_cache();
            (results, records, queue.acked - acked_before)
        };
        if !records.is_empty() {
            if let Err(e) = persist(&partition, &state, &records).await {
                *state.loaded.borrow_mut() = None;
                return op.error(
                    retriable(e.code),
                    format!("writing the settlements: {}", e.message),
                );
            }
        }
        self.shared
            .metrics
            .queue_acked
            .get_or_create(&GroupLabels {
                group: request.group.clone(),
            })
            .inc_by(acks);
        QueueAnswer::Settle(QueueSettleResponse {
            error: 0,
            message: String::new(),
            results,
        })
    }

    async fn describe_queue(
        self: &Rc<Self>,
        index: u32,
        request: DescribeQueueRequest,
    ) -> QueueAnswer {
        let op = QueueOp::Describe(request.clone());
        let state = self.state_partition(index);
        let Ok(_permit) = state.lock.acquire_permit(1).await else {
            return op.error(ErrorCode::ShuttingDown, "shutting down");
        };
        if let Err((code, message)) = self.led_and_loaded(index, &state).await {
            return op.error(code, message);
        }
        let now = now_ms() as i64;
        let loaded = state.loaded.borrow();
        let Some(queue) = loaded.as_ref().and_then(|l| l.queues.get(&request.group)) else {
            let (code, message) = unknown_queue(&request.group);
            return op.error(code, message);
        };
        let partitions = queue
            .partitions
            .iter()
            .map(|(p, qp)| {
                let oldest_pending_age_ms = qp
                    .oldest_pending_offset()
                    .and_then(|o| queue.cache.get(&(*p, o)))
                    .map_or(0, |r| now.saturating_sub(r.timestamp_ms).max(0) as u64);
                QueuePartitionDescription {
                    partition: *p,
                    start_offset: qp.start_offset(),
                    end_offset: qp.end_offset(),
                    in_flight: qp.in_flight_count() as u32,
                    waiting: qp.available_count() as u32,
                    dead_lettering: qp.dead_lettering_count() as u32,
                    oldest_pending_age_ms,
                }
            })
            .collect();
        QueueAnswer::Describe(DescribeQueueResponse {
            error: 0,
            message: String::new(),
            group: request.group.clone(),
            topic: queue.topic.clone(),
            coordinator: self.shared.config.broker_id,
            settings: queue.settings.clone(),
            partitions,
            acked: queue.acked,
            redelivered: queue.redelivered,
            dead_lettered: queue.dead_lettered,
        })
    }

    /// Replays a state partition into its queues.
    async fn load_queues(
        &self,
        partition: &Rc<Partition>,
    ) -> Result<(BTreeMap<String, Queue>, u64), PartitionError> {
        let description = partition.describe();
        let mut from = Offset(description.log_start_offset);
        let mut created: BTreeMap<String, (String, QueueSettings, u32)> = BTreeMap::new();
        let mut logs: BTreeMap<String, BTreeMap<u32, Vec<QueueRecord>>> = BTreeMap::new();
        let mut replayed = 0u64;
        let corrupt = |e: String| {
            PartitionError::new(ErrorCode::CorruptData, format!("{QUEUE_STATE_TOPIC}: {e}"))
        };
        for _ in 0..LOAD_STEPS_MAX {
            let data = partition.read_to(from, LOAD_READ_BYTES, None).await?;
            if data.bytes == 0 {
                break;
            }
            let mut progressed = false;
            for batch in batches(data.slice()) {
                let batch = batch.map_err(|e| corrupt(e.to_string()))?;
                let header = batch.header;
                for (i, record) in batch
                    .records()
                    .map_err(|e| corrupt(e.to_string()))?
                    .iter()
                    .enumerate()
                {
                    if header.base_offset.0 + (i as u64) < from.0 {
                        continue;
                    }
                    replayed += 1;
                    let stored: StoredQueueRecord = serde_json::from_slice(record.value.as_slice())
                        .map_err(|e| corrupt(e.to_string()))?;
                    match stored {
                        StoredQueueRecord::Created {
                            group,
                            topic,
                            settings,
                            partitions,
                        } => {
                            // Also the first record of every snapshot: the partitions' logs
                            // are reset by their own `Snapshot` records (a snapshot cut short
                            // by a crash leaves the other partitions' history in place).
                            created.insert(group, (topic, settings.into(), partitions));
                        }
                        StoredQueueRecord::Partition {
                            group,
                            partition,
                            record,
                        } => {
                            let log = logs.entry(group).or_default().entry(partition).or_default();
                            if matches!(record, QueueRecord::Snapshot { .. }) {
                                log.clear();
                            }
                            log.push(record);
                        }
                    }
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
        let mut queues = BTreeMap::new();
        for (group, (topic, settings, partitions)) in created {
            let log = logs.remove(&group).unwrap_or_default();
            let queue = build_queue(&topic, &settings, partitions, log)
                .map_err(|e| corrupt(format!("queue {group}: {e}")))?;
            queues.insert(group, queue);
        }
        Ok((queues, replayed))
    }

    /// Shard task: expires leases and carries out dead-letter copies on every state partition
    /// this shard leads (loading those not loaded, so a new coordinator redelivers without
    /// waiting for a request).
    pub(crate) async fn queue_tick_loop(self: Rc<Self>) {
        while !self.stopping.get() {
            glommio::timer::sleep(Duration::from_millis(QUEUE_TICK_MS)).await;
            let led: Vec<u32> = self
                .partitions
                .borrow()
                .get(QUEUE_STATE_TOPIC)
                .map(|slots| {
                    slots
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| {
                            p.as_ref().is_some_and(|p| {
                                p.describe().leader == self.shared.config.broker_id
                            })
                        })
                        .map(|(i, _)| i as u32)
                        .collect()
                })
                .unwrap_or_default();
            for index in led {
                self.tick_partition(index).await;
            }
        }
    }

    async fn tick_partition(self: &Rc<Self>, index: u32) {
        let state = self.state_partition(index);
        let dead_letters = {
            let Ok(_permit) = state.lock.acquire_permit(1).await else {
                return;
            };
            let Ok(partition) = self.led_and_loaded(index, &state).await else {
                return;
            };
            let now = now_ms();
            let mut records = Vec::new();
            let mut dead_letters: Vec<(String, String, String, u32, DeadLetter)> = Vec::new();
            {
                let mut loaded = state.loaded.borrow_mut();
                let Some(loaded) = loaded.as_mut() else {
                    return;
                };
                for (group, queue) in loaded.queues.iter_mut() {
                    for (p, qp) in queue.partitions.iter_mut() {
                        if qp.next_deadline_ms().is_some_and(|d| d <= now) {
                            let changes = qp.expire(now, jitter_sample());
                            queue.dead_letters_pending |= !changes.dead_letters.is_empty();
                            records.extend(tagged(group, *p, changes.records));
                        }
                    }
                    self.set_queue_gauges(group, queue, now);
                    if queue.dead_letters_pending {
                        for (p, qp) in &queue.partitions {
                            for dl in qp.pending_dead_letters() {
                                if dead_letters.len() >= DEAD_LETTERS_PER_TICK_MAX {
                                    break;
                                }
                                dead_letters.push((
                                    group.clone(),
                                    queue.topic.clone(),
                                    queue.settings.dead_letter_topic.clone(),
                                    *p,
                                    dl,
                                ));
                            }
                        }
                        if dead_letters.iter().all(|d| &d.0 != group) {
                            queue.dead_letters_pending = false;
                        }
                    }
                }
            }
            if !records.is_empty() {
                if let Err(e) = persist(&partition, &state, &records).await {
                    tracing::warn!(partition = index, error = %e.message, "cannot write expired leases; reloading");
                    *state.loaded.borrow_mut() = None;
                    return;
                }
            }
            self.maybe_snapshot_queues(index, &partition, &state).await;
            dead_letters
        };
        // The copies go out without the lock (they take a produce round trip each).
        let mut confirmed: Vec<(String, u32, u64)> = Vec::new();
        for (group, topic, dlq, p, dl) in dead_letters {
            let record = match self.cached(index, &group, p, dl.offset) {
                Some(record) => Ok(record),
                None => self.read_one(&topic, p, dl.offset).await,
            };
            let copied = match record {
                Ok(record) => self.write_dead_letter(&topic, &dlq, p, &dl, &record).await,
                Err(e) => Err(e),
            };
            match copied {
                Ok(()) => confirmed.push((group, p, dl.offset)),
                Err(e) => {
                    tracing::warn!(%group, %topic, partition = p, offset = dl.offset, error = %e, "cannot copy to the dead-letter topic yet");
                    // Retried on a later tick.
                    if let Some(q) = state
                        .loaded
                        .borrow_mut()
                        .as_mut()
                        .and_then(|l| l.queues.get_mut(&group))
                    {
                        q.dead_letters_pending = true;
                    }
                }
            }
        }
        if confirmed.is_empty() {
            return;
        }
        let Ok(_permit) = state.lock.acquire_permit(1).await else {
            return;
        };
        let Ok(partition) = self.led_and_loaded(index, &state).await else {
            return;
        };
        let mut records = Vec::new();
        {
            let mut loaded = state.loaded.borrow_mut();
            let Some(loaded) = loaded.as_mut() else {
                return;
            };
            for (group, p, offset) in confirmed {
                let Some(queue) = loaded.queues.get_mut(&group) else {
                    continue;
                };
                let Some(qp) = queue.partitions.get_mut(&p) else {
                    continue;
                };
                // Not dead-lettering any more (reloaded meanwhile and confirmed): a duplicate
                // copy, at least once.
                if let Ok(more) = qp.confirm_dead_lettered(offset) {
                    queue.dead_lettered += 1;
                    self.shared
                        .metrics
                        .queue_dead_lettered
                        .get_or_create(&GroupLabels {
                            group: group.clone(),
                        })
                        .inc();
                    records.extend(tagged(&group, p, more));
                }
                queue.prune_cache();
            }
        }
        if !records.is_empty() {
            if let Err(e) = persist(&partition, &state, &records).await {
                tracing::warn!(partition = index, error = %e.message, "cannot write dead-letter confirmations; reloading");
                *state.loaded.borrow_mut() = None;
            }
        }
    }

    /// Compacts the state log (lock held): after `groups.snapshot_after_records` records or
    /// `groups.snapshot_interval_ms`, writes every queue's state anew (its `Created` record,
    /// then each partition's snapshot) and deletes the segments below it, on the followers too.
    async fn maybe_snapshot_queues(
        &self,
        index: u32,
        partition: &Rc<Partition>,
        state: &StatePartition,
    ) {
        let config = &self.shared.config.groups;
        let now = monotonic_ms();
        let snapshot: Vec<StoredQueueRecord> = {
            let loaded = state.loaded.borrow();
            let Some(loaded) = loaded.as_ref() else {
                return;
            };
            let due = loaded.records_since_snapshot >= config.snapshot_after_records
                || (loaded.records_since_snapshot > 0
                    && now.saturating_sub(loaded.last_snapshot_ms) >= config.snapshot_interval_ms);
            if !due {
                return;
            }
            let mut records = Vec::new();
            for (group, queue) in &loaded.queues {
                records.push(StoredQueueRecord::Created {
                    group: group.clone(),
                    topic: queue.topic.clone(),
                    settings: StoredSettings::from(&queue.settings),
                    partitions: queue.partitions.len() as u32,
                });
                for (p, qp) in &queue.partitions {
                    records.extend(tagged(group, *p, qp.snapshot()));
                }
            }
            records
        };
        // With no queues, everything written so far is obsolete.
        let mut delete_below = Offset(partition.describe().end_offset);
        for (i, write) in snapshot.chunks(RECORDS_PER_WRITE_MAX).enumerate() {
            match persist(partition, state, write).await {
                Ok(base) if i == 0 => delete_below = base,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(partition = index, error = %e.message, "could not write a queue snapshot; reloading");
                    *state.loaded.borrow_mut() = None;
                    return;
                }
            }
        }
        if let Some(loaded) = state.loaded.borrow_mut().as_mut() {
            loaded.records_since_snapshot = 0;
            loaded.last_snapshot_ms = now;
        }
        match partition.delete_below(delete_below).await {
            Ok(deleted) => {
                tracing::debug!(partition = index, %delete_below, deleted, "queue snapshot written; older segments deleted")
            }
            Err(error) => {
                tracing::warn!(partition = index, %error, "deleting below a queue snapshot")
            }
        }
    }

    fn set_queue_gauges(&self, group: &str, queue: &Queue, now: u64) {
        let metrics = &self.shared.metrics;
        let labels = GroupLabels {
            group: group.to_string(),
        };
        let in_flight: usize = queue.partitions.values().map(|p| p.in_flight_count()).sum();
        let waiting: usize = queue.partitions.values().map(|p| p.available_count()).sum();
        let oldest_age_ms = queue
            .partitions
            .iter()
            .filter_map(|(p, qp)| {
                let offset = qp.oldest_pending_offset()?;
                let record = queue.cache.get(&(*p, offset))?;
                Some((now as i64).saturating_sub(record.timestamp_ms).max(0))
            })
            .max()
            .unwrap_or(0);
        metrics
            .queue_in_flight
            .get_or_create(&labels)
            .set(in_flight as i64);
        metrics
            .queue_waiting
            .get_or_create(&labels)
            .set(waiting as i64);
        metrics
            .queue_oldest_pending_age_ms
            .get_or_create(&labels)
            .set(oldest_age_ms);
    }

    fn forget_queue_gauges(&self, group: &str) {
        let metrics = &self.shared.metrics;
        let labels = GroupLabels {
            group: group.to_string(),
        };
        metrics.queue_in_flight.remove(&labels);
        metrics.queue_waiting.remove(&labels);
        metrics.queue_oldest_pending_age_ms.remove(&labels);
    }

    /// Copies one record to the dead-letter topic (`acks=all`), with headers naming where it
    /// came from, how often it was delivered and why it failed.
    async fn write_dead_letter(
        self: &Rc<Self>,
        topic: &str,
        dlq: &str,
        partition: u32,
        dl: &DeadLetter,
        record: &CachedRecord,
    ) -> Result<(), ClientError> {
        let client = self.queue_client().await?;
        let dlq_partitions = client.partition_count(dlq).await?;
        let target = partition % dlq_partitions.max(1);
        let reason = match &dl.reason {
            DeadLetterReason::Rejected(reason) => format!("rejected: {reason}"),
            DeadLetterReason::MaxDeliveries {
                last: DeliveryFailure::Nacked,
            } => "max_deliveries: nacked".to_string(),
            DeadLetterReason::MaxDeliveries {
                last: DeliveryFailure::LeaseExpired,
            } => "max_deliveries: lease expired".to_string(),
        };
        let partition_text = partition.to_string();
        let offset_text = dl.offset.to_string();
        let count_text = dl.delivery_count.to_string();
        let headers: [(&str, &[u8]); 5] = [
            (DLQ_HEADER_TOPIC, topic.as_bytes()),
            (DLQ_HEADER_PARTITION, partition_text.as_bytes()),
            (DLQ_HEADER_OFFSET, offset_text.as_bytes()),
            (DLQ_HEADER_DELIVERIES, count_text.as_bytes()),
            (DLQ_HEADER_REASON, reason.as_bytes()),
        ];
        let mut builder = BatchBuilder::new(Default::default());
        builder
            .push(
                record.timestamp_ms,
                record.key.as_deref(),
                &record.value,
                &headers,
            )
            .map_err(|e| ClientError::Invalid(format!("dead-letter record: {e}")))?;
        let batch = builder
            .finish()
            .map_err(|e| ClientError::Invalid(format!("dead-letter record: {e}")))?;
        let mut payload = FrameBuf::with_capacity(batch.len());
        payload.extend_from_slice(&batch);
        let request = ProduceRequest {
            acks: Acks::All,
            timeout_ms: CLIENT_TIMEOUT_MS as u32,
            topic: dlq.to_string(),
            partitions: vec![ProducePartition {
                partition: target,
                batch_bytes: batch.len() as u32,
            }],
        };
        let connection = client.partition_connection(dlq, target).await?;
        let frame = connection
            .call(
                ApiKey::Produce,
                &request,
                vec![Rc::new(payload)],
                CLIENT_TIMEOUT_MS,
            )
            .await;
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                let _ = client.refresh_metadata().await;
                return Err(e);
            }
        };
        let response: ProduceResponse = decode(&frame)?;
        for p in response.partitions {
            let code = ErrorCode::from_u16(p.error);
            if code != ErrorCode::None {
                let _ = client.refresh_metadata().await;
                return Err(ClientError::server(code, p.message));
            }
        }
        Ok(())
    }
}

enum FetchOutcome {
    Records(Vec<(u64, CachedRecord)>),
    /// The offset asked for is below the log's start, which is here.
    StartsAt(u64),
}

fn parse_records(bytes: &[u8]) -> Result<Vec<(u64, CachedRecord)>, ClientError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let batch = check_batch(&bytes[at..])
            .map_err(|e| ClientError::Protocol(format!("fetched batch: {e}")))?;
        let header = batch.header;
        let records = batch
            .records()
            .map_err(|e| ClientError::Protocol(format!("fetched batch: {e}")))?;
        for (i, record) in records.iter().enumerate() {
            out.push((
                header.base_offset.0 + i as u64,
                CachedRecord {
                    timestamp_ms: header.first_timestamp_ms + record.timestamp_delta_ms.to_native(),
                    key: record.key.as_ref().map(|k| k.as_slice().to_vec()),
                    value: record.value.as_slice().to_vec(),
                },
            ));
        }
        at += header.batch_bytes();
    }
    Ok(out)
}

/// One settlement on the loaded queue: the new lease end (extend) and the records to write.
fn settle_one(
    queue: &mut Queue,
    member: &str,
    s: &QueueSettlement,
    now: u64,
) -> Result<(u64, Vec<QueueRecord>), (ErrorCode, String)> {
    let Some(qp) = queue.partitions.get_mut(&s.partition) else {
        return Err((
            ErrorCode::UnknownPartition,
            format!("the queue's topic has no partition {}", s.partition),
        ));
    };
    let delivery = Delivery {
        member,
        offset: s.offset,
        delivery_attempt: s.delivery_attempt,
    };
    let stale = |e: StaleDelivery| (ErrorCode::StaleDelivery, e.to_string());
    match &s.action {
        SettleAction::Ack => {
            let records = qp
                .ack(delivery)
                .map_err(|wharf_queues::AckError::Stale(e)| stale(e))?;
            queue.acked += 1;
            Ok((0, records))
        }
        SettleAction::Nack { delay_ms } => {
            let changes = qp
                .nack(
                    delivery,
                    NackOptions {
                        delay_ms: *delay_ms,
                        now_ms: now,
                        jitter_sample: jitter_sample(),
                    },
                )
                .map_err(|e| match e {
                    wharf_queues::NackError::Stale(e) => stale(e),
                    other => (ErrorCode::InvalidRequest, other.to_string()),
                })?;
            queue.dead_letters_pending |= !changes.dead_letters.is_empty();
            Ok((0, changes.records))
        }
        SettleAction::Reject { reason } => {
            let changes = qp.reject(delivery, reason.clone()).map_err(|e| match e {
                wharf_queues::RejectError::Stale(e) => stale(e),
                other => (ErrorCode::InvalidRequest, other.to_string()),
            })?;
            queue.dead_letters_pending |= !changes.dead_letters.is_empty();
            Ok((0, changes.records))
        }
        SettleAction::Extend => {
            let (until, records) = qp
                .extend(delivery, now)
                .map_err(|wharf_queues::ExtendError::Stale(e)| stale(e))?;
            Ok((until, records))
        }
    }
}

fn build_queue(
    topic: &str,
    settings: &QueueSettings,
    partitions: u32,
    mut logs: BTreeMap<u32, Vec<QueueRecord>>,
) -> Result<Queue, String> {
    let (_, config) = normalize_settings(topic, settings)?;
    let mut states = BTreeMap::new();
    for p in 0..partitions {
        let qp = match logs.remove(&p) {
            Some(log) if !log.is_empty() => {
                QueuePartition::replay(config.clone(), log).map_err(|e| e.to_string())?
            }
            _ => QueuePartition::new(config.clone(), 0).map_err(|e| e.to_string())?,
        };
        states.insert(p, qp);
    }
    Ok(Queue {
        topic: topic.to_string(),
        settings: settings.clone(),
        partitions: states,
        cache: BTreeMap::new(),
        cache_bytes: 0,
        read_from: BTreeMap::new(),
        dead_letters_pending: true,
        acked: 0,
        redelivered: 0,
        dead_lettered: 0,
    })
}

/// The code a coordinator answers for its own client's failure: the server's code, else
/// retriable (the topic's leader was unreachable).
fn client_code(e: &ClientError) -> ErrorCode {
    match e {
        ClientError::Server { code, .. } => *code,
        ClientError::Protocol(_) | ClientError::Invalid(_) => ErrorCode::Unknown,
        _ => ErrorCode::CoordinatorLoading,
    }
}

/// State records of one queue partition, as written to the state topic.
fn tagged(
    group: &str,
    partition: u32,
    records: Vec<QueueRecord>,
) -> impl Iterator<Item = StoredQueueRecord> + '_ {
    records
        .into_iter()
        .map(move |record| StoredQueueRecord::Partition {
            group: group.to_string(),
            partition,
            record,
        })
}

fn unknown_queue(group: &str) -> (ErrorCode, String) {
    (
        ErrorCode::UnknownQueue,
        format!("queue group {group:?} does not exist (wharf queue create)"),
    )
}

/// A failed state write as the client sees it: retriable (the state reloads).
fn retriable(code: ErrorCode) -> ErrorCode {
    if code.is_retriable() {
        code
    } else {
        ErrorCode::CoordinatorLoading
    }
}

/// Writes state records to the state partition (one produce) and waits for `acks=all`.
async fn persist(
    partition: &Rc<Partition>,
    state: &StatePartition,
    records: &[StoredQueueRecord],
) -> Result<Offset, PartitionError> {
    let timestamp_ms = now_ms() as i64;
    let mut payload: Vec<u8> = Vec::new();
    for chunk in records.chunks(RECORDS_PER_BATCH_MAX) {
        let mut builder = BatchBuilder::new(Default::default());
        for record in chunk {
            let value = serde_json::to_vec(record)
                .map_err(|e| PartitionError::new(ErrorCode::Unknown, e.to_string()))?;
            builder
                .push(timestamp_ms, Some(record.group().as_bytes()), &value, &[])
                .map_err(|e| PartitionError::new(ErrorCode::InvalidBatch, e.to_string()))?;
        }
        let batch = builder
            .finish()
            .map_err(|e| PartitionError::new(ErrorCode::InvalidBatch, e.to_string()))?;
        payload.extend_from_slice(&batch);
    }
    let written = write_acks_all(partition, &payload, "the queue's change").await?;
    if let Some(loaded) = state.loaded.borrow_mut().as_mut() {
        loaded.records_since_snapshot += records.len() as u64;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_get_defaults_and_bad_ones_are_refused() {
        let (s, config) = normalize_settings("orders", &QueueSettings::default()).expect("test");
        assert_eq!(s.dead_letter_topic, "orders.dlq");
        assert_eq!(config.ack_wait_ms, 30_000);
        assert_eq!(config.max_deliveries, 5);
        let same = QueueSettings {
            dead_letter_topic: "orders".into(),
            ..Default::default()
        };
        assert!(normalize_settings("orders", &same).is_err());
        let internal = QueueSettings {
            dead_letter_topic: "__x".into(),
            ..Default::default()
        };
        assert!(normalize_settings("orders", &internal).is_err());
        let shrinking = QueueSettings {
            backoff_multiplier_permille: 500,
            ..Default::default()
        };
        assert!(normalize_settings("orders", &shrinking).is_err());
        let list = QueueSettings {
            backoff_list_ms: vec![10, 20],
            ..Default::default()
        };
        let (_, config) = normalize_settings("orders", &list).expect("test");
        assert_eq!(
            config.backoff,
            Backoff::List {
                delays_ms: vec![10, 20]
            }
        );
    }

    #[test]
    fn stored_records_round_trip() {
        let record = StoredQueueRecord::Partition {
            group: "g".into(),
            partition: 3,
            record: QueueRecord::Acquired {
                offset: 7,
                member: "m".into(),
                delivery_count: 2,
                lease_until_ms: 99,
            },
        };
        let bytes = serde_json::to_vec(&record).expect("test");
        let back: StoredQueueRecord = serde_json::from_slice(&bytes).expect("test");
        assert_eq!(format!("{back:?}"), format!("{record:?}"));
    }
}
