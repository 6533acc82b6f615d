//! Prometheus metrics. Families are shared by all shards (the registry is encoded by the admin
//! endpoint); every series a shard updates on the data path is created once and its handle kept
//! (an atomic, touched only by that shard), so the data path takes no lock.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::protocol::{ApiKey, ErrorCode};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub topic: String,
    pub partition: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupPartitionLabels {
    pub group: String,
    pub topic: String,
    pub partition: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueAttemptLabels {
    pub group: String,
    /// The delivery attempt (1 = first delivery), capped at `QUEUE_ATTEMPT_LABEL_MAX`.
    pub attempt: u32,
}

/// Attempts above this share one series.
pub const QUEUE_ATTEMPT_LABEL_MAX: u32 = 10;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReaderLabels {
    pub topic: String,
    pub partition: u32,
    pub reader: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub shard: u32,
    /// The role of the replica that served a consumer fetch: `leader` or `follower`.
    pub role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    pub shard: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub shard: u32,
    pub api: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub shard: u32,
    pub api: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub shard: u32,
    pub queue: &'static str,
}

fn latency_histogram() -> Histogram {
    // 10 µs .. ~10 s.
    Histogram::new(exponential_buckets(1e-5, 2.0, 21))
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct Metrics {
    pub registry: Registry,
    pub partition_end_offset: Family<PartitionLabels, Gauge>,
    pub partition_high_watermark: Family<PartitionLabels, Gauge>,
    pub partition_log_start_offset: Family<PartitionLabels, Gauge>,
    pub partition_produced_bytes: Family<PartitionLabels, Counter>,
    pub partition_fetched_bytes: Family<PartitionLabels, Counter>,
    pub partition_isr_size: Family<PartitionLabels, Gauge>,
    pub partition_under_replicated: Family<PartitionLabels, Gauge>,
    pub partition_follower_lag_offsets: Family<PartitionLabels, Gauge>,
    pub partition_follower_lag_ms: Family<PartitionLabels, Gauge>,
    pub partition_ack_wait: HistogramFamily<PartitionLabels>,
    pub partition_fetches_waiting: Family<PartitionLabels, Gauge>,
    pub replica_fetch_corrupt: Family<PartitionLabels, Counter>,
    pub partition_produce_duplicates: Family<PartitionLabels, Counter>,
    /// Consumer groups, on the coordinator: lag per consumed partition (records and ms) and
    /// members per group.
    pub group_lag_records: Family<GroupPartitionLabels, Gauge>,
    pub group_lag_ms: Family<GroupPartitionLabels, Gauge>,
    pub group_members: Family<GroupLabels, Gauge>,
    pub queue_in_flight: Family<GroupLabels, Gauge>,
    pub queue_waiting: Family<GroupLabels, Gauge>,
    pub queue_oldest_pending_age_ms: Family<GroupLabels, Gauge>,
    pub queue_deliveries: Family<QueueAttemptLabels, Counter>,
    pub queue_acked: Family<GroupLabels, Counter>,
    pub queue_dead_lettered: Family<GroupLabels, Counter>,
    pub requests: Family<ApiLabels, Counter>,
    pub request_errors: Family<ErrorLabels, Counter>,
    pub request_latency: HistogramFamily<ApiLabels>,
    pub flush_latency: HistogramFamily<ShardLabels>,
    pub connections: Family<ShardLabels, Gauge>,
    pub task_queue_runtime: Family<QueueLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    pub connections_refused: Family<ShardLabels, Counter>,
    pub peer_auth_failures: Family<ShardLabels, Counter>,
    pub disk_full: Family<ShardLabels, Gauge>,
    pub request_budget_used_bytes: Family<ShardLabels, Gauge>,
    /// Follower reads: consumer fetches served per role, redirects to followers, where each
    /// reader of a led partition was sent (broker id), and the shard load the selector sees.
    pub fetches_served: Family<RoleLabels, Counter>,
    pub consumer_fetched_bytes: Family<RoleLabels, Counter>,
    pub fetch_redirects: Family<ShardLabels, Counter>,
    pub reader_replica: Family<ReaderLabels, Gauge>,
    pub shard_busy_permille: Family<ShardLabels, Gauge>,
    pub shard_consumer_egress_bytes_per_second: Family<ShardLabels, Gauge>,
    pub shard_queue_depth: Family<ShardLabels, Gauge>,
    /// Controller mode: this broker's view of the controller and its session.
    pub controller: ControllerMetrics,
}

/// Controller mode (`cluster.controller_voters`).
#[derive(Clone, Default)]
pub struct ControllerMetrics {
    /// 1 on the voter that is the active controller.
    pub is_leader: Gauge,
    pub raft_term: Gauge,
    pub raft_commit_index: Gauge,
    /// The metadata index this broker applied.
    pub applied_index: Gauge,
    /// Brokers the applied metadata lists as fenced.
    pub brokers_fenced: Gauge,
    /// Heartbeats that got no answer from a controller voter.
    pub heartbeat_failures: Counter,
    /// Times this broker found itself fenced and registered again.
    pub reregistrations: Counter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let metrics = Metrics {
            registry: Registry::with_prefix("wharf"),
            partition_end_offset: Family::default(),
            partition_high_watermark: Family::default(),
            partition_log_start_offset: Family::default(),
            partition_produced_bytes: Family::default(),
            partition_fetched_bytes: Family::default(),
            partition_isr_size: Family::default(),
            partition_under_replicated: Family::default(),
            partition_follower_lag_offsets: Family::default(),
            partition_follower_lag_ms: Family::default(),
            partition_ack_wait: Family::new_with_constructor(latency_histogram),
            partition_fetches_waiting: Family::default(),
            replica_fetch_corrupt: Family::default(),
            partition_produce_duplicates: Family::default(),
            group_lag_records: Family::default(),
            group_lag_ms: Family::default(),
            group_members: Family::default(),
            queue_in_flight: Family::default(),
            queue_waiting: Family::default(),
            queue_oldest_pending_age_ms: Family::default(),
            queue_deliveries: Family::default(),
            queue_acked: Family::default(),
            queue_dead_lettered: Family::default(),
            requests: Family::default(),
            request_errors: Family::default(),
            request_latency: Family::new_with_constructor(latency_histogram),
            flush_latency: Family::new_with_constructor(latency_histogram),
            connections: Family::default(),
            task_queue_runtime: Family::default(),
            fetches_served: Family::default(),
            consumer_fetched_bytes: Family::default(),
            fetch_redirects: Family::default(),
            reader_replica: Family::default(),
            shard_busy_permille: Family::default(),
            shard_consumer_egress_bytes_per_second: Family::default(),
            shard_queue_depth: Family::default(),
            connections_refused: Family::default(),
            peer_auth_failures: Family::default(),
            disk_full: Family::default(),
            request_budget_used_bytes: Family::default(),
            controller: ControllerMetrics::default(),
        };
        let mut metrics = metrics;
        let registry = &mut metrics.registry;
        let controller = metrics.controller.clone();
        registry.register(
            "controller_is_leader",
            "1 on the controller voter that is the active controller",
            controller.is_leader,
        );
        registry.register(
            "controller_raft_term",
            "The controller voter's Raft term",
            controller.raft_term,
        );
        registry.register(
            "controller_raft_commit_index",
            "The controller voter's Raft commit index",
            controller.raft_commit_index,
        );
        registry.register(
            "metadata_applied_index",
            "The controller metadata index this broker applied",
            controller.applied_index,
        );
        registry.register(
            "brokers_fenced",
            "Brokers the applied controller metadata lists as fenced",
            controller.brokers_fenced,
        );
        registry.register(
            "controller_heartbeat_failures",
            "Heartbeats to a controller voter that got no answer",
            controller.heartbeat_failures,
        );
        registry.register(
            "broker_reregistrations",
            "Times the controller had fenced this broker and it registered again",
            controller.reregistrations,
        );
        registry.register(
            "connections_refused",
            "Connections closed at once: a connection limit was reached",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "peer_auth_failures",
            "Internal-listener connections that failed to prove the cluster secret",
            metrics.peer_auth_failures.clone(),
        );
        registry.register(
            "disk_full",
            "1 while the data directory's free space is below disk_free_bytes_min (produce refused)",
            metrics.disk_full.clone(),
        );
        registry.register(
            "request_budget_used_bytes",
            "Request bytes being read or admitted on the shard (of request_bytes_max_per_shard)",
            metrics.request_budget_used_bytes.clone(),
        );
        registry.register(
            "partition_end_offset",
            "Offset after the last appended record",
            metrics.partition_end_offset.clone(),
        );
        registry.register(
            "partition_high_watermark",
            "Offset below which consumers may read (durable)",
            metrics.partition_high_watermark.clone(),
        );
        registry.register(
            "partition_log_start_offset",
            "First offset still kept by retention",
            metrics.partition_log_start_offset.clone(),
        );
        registry.register(
            "partition_produce_duplicates",
            "Produces of idempotent producers answered as retries of batches already written (nothing appended)",
            metrics.partition_produce_duplicates.clone(),
        );
        registry.register(
            "group_lag_records",
            "Consumer group lag per partition: high watermark minus the member's position, as its last heartbeat reported",
            metrics.group_lag_records.clone(),
        );
        registry.register(
            "group_lag_ms",
            "Consumer group lag per partition in time: 0 when caught up, else the age of the newest record the member consumed (an upper bound)",
            metrics.group_lag_ms.clone(),
        );
        registry.register(
            "group_members",
            "Members of each consumer group this broker coordinates",
            metrics.group_members.clone(),
        );
        registry.register(
            "queue_in_flight",
            "Records of each queue group this broker coordinates that are leased to a member now",
            metrics.queue_in_flight.clone(),
        );
        registry.register(
            "queue_waiting",
            "Records of each queue group waiting for a redelivery (backoff or nack delay)",
            metrics.queue_waiting.clone(),
        );
        registry.register(
            "queue_oldest_pending_age_ms",
            "Age of each queue group's oldest record not yet acked or dead-lettered (0 when none, or when its record is not in memory)",
            metrics.queue_oldest_pending_age_ms.clone(),
        );
        registry.register(
            "queue_deliveries",
            "Records handed to queue members, by delivery attempt (attempt 2 and up are redeliveries)",
            metrics.queue_deliveries.clone(),
        );
        registry.register(
            "queue_acked",
            "Records acked by queue members",
            metrics.queue_acked.clone(),
        );
        registry.register(
            "queue_dead_lettered",
            "Records copied to a queue's dead-letter topic",
            metrics.queue_dead_lettered.clone(),
        );
        registry.register(
            "fetches_served",
            "Consumer fetch partitions served, by the serving replica's role (follower reads)",
            metrics.fetches_served.clone(),
        );
        registry.register(
            "consumer_fetched_bytes",
            "Batch bytes served to consumers, by the serving replica's role (a broker's consumer egress)",
            metrics.consumer_fetched_bytes.clone(),
        );
        registry.register(
            "fetch_redirects",
            "Consumer fetch partitions the leader answered with a preferred read replica (a follower) instead of data",
            metrics.fetch_redirects.clone(),
        );
        registry.register(
            "reader_replica",
            "Per reader of a partition this broker leads: the broker it was last sent to read from (bounded per partition)",
            metrics.reader_replica.clone(),
        );
        registry.register(
            "shard_busy_permille",
            "Share of time each shard's tasks ran (permille, smoothed): the CPU signal of the read-replica selector",
            metrics.shard_busy_permille.clone(),
        );
        registry.register(
            "shard_consumer_egress_bytes_per_second",
            "Batch bytes per second each shard served to consumers (smoothed)",
            metrics.shard_consumer_egress_bytes_per_second.clone(),
        );
        registry.register(
            "shard_queue_depth",
            "Requests admitted and not yet answered on each shard, parked long polls excluded",
            metrics.shard_queue_depth.clone(),
        );
        registry.register(
            "partition_produced_bytes",
            "Batch bytes appended",
            metrics.partition_produced_bytes.clone(),
        );
        registry.register(
            "partition_fetched_bytes",
            "Batch bytes served to consumers",
            metrics.partition_fetched_bytes.clone(),
        );
        registry.register(
            "replica_fetch_corrupt",
            "Replica fetches the leader answered with corrupt data (the follower backs off)",
            metrics.replica_fetch_corrupt.clone(),
        );
        registry.register(
            "partition_isr_size",
            "In-sync replicas (leader's view; 0 on followers)",
            metrics.partition_isr_size.clone(),
        );
        registry.register(
            "partition_under_replicated",
            "1 when the leader's ISR is smaller than the replica set",
            metrics.partition_under_replicated.clone(),
        );
        registry.register(
            "partition_follower_lag_offsets",
            "Leader: offsets the furthest follower is behind the log end",
            metrics.partition_follower_lag_offsets.clone(),
        );
        registry.register(
            "partition_follower_lag_ms",
            "Leader: time since the least caught-up follower was last caught up",
            metrics.partition_follower_lag_ms.clone(),
        );
        registry.register(
            "partition_ack_wait_seconds",
            "Time produces waited after the append for their acks (durability on replicas)",
            metrics.partition_ack_wait.clone(),
        );
        registry.register(
            "partition_fetches_waiting",
            "Consumer fetches long-polling this partition for data above the high watermark",
            metrics.partition_fetches_waiting.clone(),
        );
        registry.register(
            "requests",
            "Requests received, by shard and api",
            metrics.requests.clone(),
        );
        registry.register(
            "request_errors",
            "Requests or partitions answered with an error code",
            metrics.request_errors.clone(),
        );
        registry.register(
            "request_latency_seconds",
            "Time from a request's arrival to its response being ready",
            metrics.request_latency.clone(),
        );
        registry.register(
            "flush_latency_seconds",
            "Duration of log flushes (write + fdatasync)",
            metrics.flush_latency.clone(),
        );
        registry.register(
            "connections",
            "Open client connections",
            metrics.connections.clone(),
        );
        registry.register(
            "task_queue_runtime_seconds",
            "CPU time each shard task queue ran",
            metrics.task_queue_runtime.clone(),
        );
        metrics
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            text = format!("# encoding failed: {error}\n");
        }
        text
    }

    pub fn record_error(&self, shard: u32, api: ApiKey, code: ErrorCode) {
        self.request_errors
            .get_or_create(&ErrorLabels {
                shard,
                api: api.name(),
                code: code.name(),
            })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// One partition's series, held by its owning shard.
pub struct PartitionMetrics {
    labels: PartitionLabels,
    pub end_offset: Gauge,
    pub high_watermark: Gauge,
    pub log_start_offset: Gauge,
    pub produced_bytes: Counter,
    pub fetched_bytes: Counter,
    pub isr_size: Gauge,
    pub under_replicated: Gauge,
    pub follower_lag_offsets: Gauge,
    pub follower_lag_ms: Gauge,
    pub ack_wait: Histogram,
    pub fetches_waiting: Gauge,
    pub replica_fetch_corrupt: Counter,
    pub produce_duplicates: Counter,
}

impl PartitionMetrics {
    pub fn new(metrics: &Metrics, topic: &str, partition: u32) -> PartitionMetrics {
        let labels = PartitionLabels {
            topic: topic.to_string(),
            partition,
        };
        PartitionMetrics {
            end_offset: metrics.partition_end_offset.get_or_create_owned(&labels),
            high_watermark: metrics
                .partition_high_watermark
                .get_or_create_owned(&labels),
            log_start_offset: metrics
                .partition_log_start_offset
                .get_or_create_owned(&labels),
            produced_bytes: metrics
                .partition_produced_bytes
                .get_or_create_owned(&labels),
            fetched_bytes: metrics.partition_fetched_bytes.get_or_create_owned(&labels),
            isr_size: metrics.partition_isr_size.get_or_create_owned(&labels),
            under_replicated: metrics
                .partition_under_replicated
                .get_or_create_owned(&labels),
            follower_lag_offsets: metrics
                .partition_follower_lag_offsets
                .get_or_create_owned(&labels),
            follower_lag_ms: metrics
                .partition_follower_lag_ms
                .get_or_create_owned(&labels),
            ack_wait: metrics.partition_ack_wait.get_or_create_owned(&labels),
            fetches_waiting: metrics
                .partition_fetches_waiting
                .get_or_create_owned(&labels),
            replica_fetch_corrupt: metrics.replica_fetch_corrupt.get_or_create_owned(&labels),
            produce_duplicates: metrics
                .partition_produce_duplicates
                .get_or_create_owned(&labels),
            labels,
        }
    }

    /// Drops the series of a deleted partition.
    pub fn remove(&self, metrics: &Metrics) {
        metrics.partition_end_offset.remove(&self.labels);
        metrics.partition_high_watermark.remove(&self.labels);
        metrics.partition_log_start_offset.remove(&self.labels);
        metrics.partition_produced_bytes.remove(&self.labels);
        metrics.partition_fetched_bytes.remove(&self.labels);
        metrics.partition_isr_size.remove(&self.labels);
        metrics.partition_under_replicated.remove(&self.labels);
        metrics.partition_follower_lag_offsets.remove(&self.labels);
        metrics.partition_follower_lag_ms.remove(&self.labels);
        metrics.partition_ack_wait.remove(&self.labels);
        metrics.partition_fetches_waiting.remove(&self.labels);
        metrics.replica_fetch_corrupt.remove(&self.labels);
        metrics.partition_produce_duplicates.remove(&self.labels);
    }
}

/// Per-shard request series, indexed by api.
pub struct ShardMetrics {
    pub requests: Vec<Counter>,
    pub latency: Vec<Histogram>,
    pub flush_latency: Histogram,
    pub connections: Gauge,
    pub connections_refused: Counter,
    pub peer_auth_failures: Counter,
    pub disk_full: Gauge,
    pub request_budget_used_bytes: Gauge,
    /// Indexed by role: 0 leader, 1 follower.
    pub fetches_served: [Counter; 2],
    pub consumer_fetched_bytes: [Counter; 2],
    pub fetch_redirects: Counter,
    pub busy_permille: Gauge,
    pub consumer_egress_bytes_per_second: Gauge,
    pub queue_depth: Gauge,
}

impl ShardMetrics {
    pub fn new(metrics: &Metrics, shard: u32) -> ShardMetrics {
        let labels = |api: ApiKey| ApiLabels {
            shard,
            api: api.name(),
        };
        ShardMetrics {
            requests: ApiKey::ALL
                .iter()
                .map(|api| metrics.requests.get_or_create_owned(&labels(*api)))
                .collect(),
            latency: ApiKey::ALL
                .iter()
                .map(|api| metrics.request_latency.get_or_create_owned(&labels(*api)))
                .collect(),
            flush_latency: metrics
                .flush_latency
                .get_or_create_owned(&ShardLabels { shard }),
            connections: metrics
                .connections
                .get_or_create_owned(&ShardLabels { shard }),
            connections_refused: metrics
                .connections_refused
                .get_or_create_owned(&ShardLabels { shard }),
            peer_auth_failures: metrics
                .peer_auth_failures
                .get_or_create_owned(&ShardLabels { shard }),
            disk_full: metrics
                .disk_full
                .get_or_create_owned(&ShardLabels { shard }),
            request_budget_used_bytes: metrics
                .request_budget_used_bytes
                .get_or_create_owned(&ShardLabels { shard }),
            fetches_served: ["leader", "follower"].map(|role| {
                metrics
                    .fetches_served
                    .get_or_create_owned(&RoleLabels { shard, role })
            }),
            consumer_fetched_bytes: ["leader", "follower"].map(|role| {
                metrics
                    .consumer_fetched_bytes
                    .get_or_create_owned(&RoleLabels { shard, role })
            }),
            fetch_redirects: metrics
                .fetch_redirects
                .get_or_create_owned(&ShardLabels { shard }),
            busy_permille: metrics
                .shard_busy_permille
                .get_or_create_owned(&ShardLabels { shard }),
            consumer_egress_bytes_per_second: metrics
                .shard_consumer_egress_bytes_per_second
                .get_or_create_owned(&ShardLabels { shard }),
            queue_depth: metrics
                .shard_queue_depth
                .get_or_create_owned(&ShardLabels { shard }),
        }
    }
}
