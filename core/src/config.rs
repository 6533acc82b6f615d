//! Broker configuration (`wharf serve`): a TOML file, overridden by command-line flags. Every key
//! has a default that works with no file. Topic settings given at creation are resolved against
//! the broker's `[topic_defaults]` and stored with the topic.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use wharf_replication::selector::{ReplicaSelector, SelectorConfig};
use wharf_storage::policy::{FlushPolicy, RetentionLimits};
use wharf_storage::LogConfig;

use crate::protocol::{ConfigEntry, FRAME_BYTES_MAX_DEFAULT};

pub const CLIENT_PORT_DEFAULT: u16 = 9092;
pub const ADMIN_PORT_DEFAULT: u16 = 9644;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// This broker's id in the cluster.
    pub broker_id: u32,
    pub data_dir: PathBuf,
    /// The shared client listener: every shard accepts here (SO_REUSEPORT).
    pub listen: String,
    /// Host name clients are told to connect to; defaults to the `listen` host.
    pub advertised_host: Option<String>,
    /// Each shard also listens on its own port so clients can reach a partition's owner
    /// directly: shard i uses `shard_port_base + i`, or an ephemeral port when 0.
    pub shard_port_base: u16,
    /// Admin HTTP endpoint: `/metrics`, `/livez`, `/readyz`.
    pub admin_listen: String,
    /// Shards (one per core); 0 means every available core.
    pub shards: usize,
    /// Which CPUs the shards are pinned to: `"auto"` (shard i on CPU i when there are enough
    /// CPUs, else unpinned), `"unbound"` (no pinning: the kernel places the shard threads, for
    /// several brokers sharing one host), or a list such as `"0-3,6"` (shard i on the i-th CPU
    /// listed; at least `shards` CPUs).
    pub cpu_set: CpuSet,
    /// Each shard busy-polls this long before sleeping when idle: lower latency (no wake-up
    /// through the kernel for requests arriving within it) for CPU time. 0 sleeps at once.
    pub spin_before_park_us: u64,
    /// Registered DMA memory per shard (locked memory; the default limit is 8 MiB per process).
    pub io_memory_bytes: usize,
    pub frame_bytes_max: usize,
    /// Bytes of request frames being read or admitted on one shard at once: a frame's bytes
    /// are read only while this budget allows (the socket is not read otherwise), so many
    /// connections announcing large frames cannot exhaust memory. At least `frame_bytes_max`.
    pub request_bytes_max_per_shard: usize,
    /// Connections one shard keeps open (client and internal together).
    pub connections_per_shard_max: usize,
    /// Of `connections_per_shard_max`, slots only the internal listener may use, so clients
    /// filling the broker cannot cut replication off.
    pub connections_reserved_internal: usize,
    /// Client connections one source IP address may hold open per shard.
    pub connections_per_address_max: usize,
    /// Topics this broker keeps (creation beyond it is refused with `limit_reached`).
    pub topics_max: usize,
    /// Partitions (all topics, all replicas hosted here) this broker keeps.
    pub partitions_max: usize,
    /// Produce is refused with `disk_full` while the data directory's filesystem has less
    /// free space than this (reads go on; nothing is poisoned). 0 turns the guard off.
    pub disk_free_bytes_min: u64,
    /// Requests read from one connection but not yet answered.
    pub requests_in_flight_max: usize,
    /// A frame must arrive whole within this time once its first byte did (slow clients).
    pub request_read_timeout_ms: u64,
    /// A response must be written within this time (clients that stop reading).
    pub response_write_timeout_ms: u64,
    /// Connections with no request for this long are closed.
    pub idle_timeout_ms: u64,
    /// Upper bound on a fetch's `max_wait_ms` and a produce's `timeout_ms`.
    pub request_wait_ms_max: u64,
    /// Upper bound on the batch bytes of one fetch response.
    pub fetch_bytes_max: usize,
    /// On SIGTERM, in-flight requests get this long to finish before logs are flushed.
    pub shutdown_timeout_ms: u64,
    /// At start-up, how long to wait for a port that still answers (a killed predecessor's
    /// listener being torn down) before giving up.
    pub port_wait_ms: u64,
    /// Capacity of each shard-to-shard channel.
    pub shard_channel_capacity: usize,
    /// How often each partition applies its retention limits.
    pub retention_check_interval_ms: u64,
    pub log: LogSettings,
    pub topic_defaults: TopicDefaults,
    pub cluster: ClusterConfig,
    pub groups: GroupsConfig,
    /// Follower reads (KIP-392): when a leader sends consumers to its in-sync followers, by its
    /// load, their lag and racks (topics choose the policy: `replica_selector`).
    pub replica_selection: SelectorConfig,
}

/// Consumer groups: the coordinators and the internal offsets topic that stores them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupsConfig {
    /// Partitions of `__consumer_offsets` (created on the first group request; a group's
    /// coordinator is the leader of partition `crc32c(group) % partitions`). Fixed once the
    /// topic exists.
    pub offsets_topic_partitions: u32,
    /// Replicas of `__consumer_offsets` (capped at the number of brokers).
    pub offsets_topic_replication_factor: u16,
    /// A member without a heartbeat for this long is removed and its partitions move.
    pub session_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// How long a member may keep partitions it was asked to give up.
    pub rebalance_timeout_ms: u64,
    pub members_max: usize,
    /// Groups one coordinator partition keeps.
    pub groups_per_partition_max: usize,
    /// `sticky` (moves only what balance requires), `range` or `round-robin`.
    pub assignor: String,
    /// Segment size of `__consumer_offsets` (set at its creation). Whole segments below a
    /// coordinator's latest snapshot are deleted, so this bounds the history kept.
    pub offsets_segment_bytes: u64,
    /// A coordinator writes a full snapshot of its groups after this many records since the
    /// last one, then deletes the segments below it (the offsets topic's compaction)...
    pub snapshot_after_records: u64,
    /// ...or after this long, if anything was written since.
    pub snapshot_interval_ms: u64,
}

impl Default for GroupsConfig {
    fn default() -> GroupsConfig {
        GroupsConfig {
            offsets_topic_partitions: 4,
            offsets_topic_replication_factor: 3,
            session_timeout_ms: 10_000,
            heartbeat_interval_ms: 500,
            rebalance_timeout_ms: 30_000,
            members_max: 1_000,
            groups_per_partition_max: 10_000,
            assignor: "sticky".to_string(),
            offsets_segment_bytes: 16 * 1024 * 1024,
            snapshot_after_records: 100_000,
            snapshot_interval_ms: 600_000,
        }
    }
}

/// The static broker list and replication settings. With no brokers listed, this broker is a
/// cluster of one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub brokers: Vec<ClusterBroker>,
    /// A follower that has not caught up with its leader for this long leaves the ISR.
    pub replica_lag_max_ms: u64,
    /// How long a leader holds a follower's fetch when there is nothing new.
    pub replica_fetch_wait_ms: u64,
    /// Bytes a follower asks for per fetch (at most `fetch_bytes_max`).
    pub replica_fetch_bytes_max: usize,
    /// Pause after a failed fetch before the next.
    pub replica_fetch_backoff_ms: u64,
    /// Timeout of broker-to-broker admin calls (topic creation on the other brokers).
    pub broker_call_timeout_ms: u64,
    /// The internal listener: inter-broker APIs (replica fetch, topic changes) are served here
    /// only, to peers that prove the cluster secret; client listeners refuse them. Required
    /// when `brokers` lists more than this broker. Every shard accepts here (SO_REUSEPORT).
    pub internal_listen: Option<String>,
    /// Each shard's own internal port (peers fetch straight from a partition's owner shard):
    /// shard i uses `internal_shard_port_base + i`, or an ephemeral port when 0.
    pub internal_shard_port_base: u16,
    /// File holding the cluster secret (at least 16 bytes; mode 600): peers authenticate with
    /// an HMAC-SHA256 challenge/response over it. Required with `internal_listen`.
    pub secret_file: Option<PathBuf>,
    /// The brokers that run the Raft controller (an odd number, e.g. 3; each must be in
    /// `brokers`). Empty: a static cluster (no failover; leaders are fixed at topic creation).
    pub controller_voters: Vec<u32>,
    /// The controller's Raft tick; elections start after `controller_election_ticks` ticks
    /// without a leader, and the leader sends Raft heartbeats every 2 ticks.
    pub controller_tick_ms: u64,
    pub controller_election_ticks: usize,
    /// How often a broker heartbeats to the controller leader (which also carries it the
    /// metadata records it has not applied).
    pub broker_heartbeat_interval_ms: u64,
    /// A broker whose heartbeats stop for this long is fenced: it leaves every ISR and its
    /// partitions get new leaders. A leader stops acknowledging `acks=quorum|all` once its own
    /// last answered heartbeat is this old (minus a margin), before it can be fenced.
    pub broker_session_timeout_ms: u64,
    /// How long SIGTERM waits for the controller to move this broker's leadership away before
    /// the broker stops anyway (controlled shutdown).
    pub controlled_shutdown_timeout_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            brokers: Vec::new(),
            replica_lag_max_ms: 10_000,
            replica_fetch_wait_ms: 500,
            replica_fetch_bytes_max: 4 * 1024 * 1024,
            replica_fetch_backoff_ms: 100,
            broker_call_timeout_ms: 5_000,
            internal_listen: None,
            internal_shard_port_base: 0,
            secret_file: None,
            controller_voters: Vec::new(),
            controller_tick_ms: 50,
            controller_election_ticks: 10,
            broker_heartbeat_interval_ms: 100,
            broker_session_timeout_ms: 600,
            controlled_shutdown_timeout_ms: 10_000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterBroker {
    pub id: u32,
    /// Where clients reach this broker (its `listen` address as seen from others).
    pub address: String,
    /// This broker's internal listener (its `cluster.internal_listen` as seen from the other
    /// brokers): followers fetch and topic changes arrive there. Required in a cluster of more
    /// than one broker. (`replication_address`, its name before the internal listener existed,
    /// is still read.)
    #[serde(alias = "replication_address")]
    pub internal_address: Option<String>,
    /// The broker's rack (KIP-392 `broker.rack`): consumers that name a rack read from a
    /// replica in it when the topic's `replica_selector` is `rack` (or `load`, as a preference).
    #[serde(default)]
    pub rack: Option<String>,
}

/// CPUs a shard thread may be pinned to (config `cpu_set`). Written as a string in TOML and
/// on the command line, parsed once where the config is read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum CpuSet {
    /// Shard i on CPU i when the shards fit on the available CPUs, else unpinned.
    Auto,
    /// No pinning.
    Unbound,
    /// Shard i on the i-th CPU listed.
    List(Vec<usize>),
}

/// Highest CPU id a `cpu_set` list may name.
pub const CPU_ID_MAX: usize = 4095;

impl CpuSet {
    /// Parses `"auto"`, `"unbound"` or a list of CPU ids and ranges (`"0-3,6"`).
    pub fn parse(text: &str) -> Result<CpuSet, String> {
        let text = text.trim();
        match text {
            "auto" => return Ok(CpuSet::Auto),
            "unbound" => return Ok(CpuSet::Unbound),
            _ => {}
        }
        let invalid = |why: String| {
            format!("cpu_set = \"{text}\": {why} (expected \"auto\", \"unbound\" or a list like \"0-3,6\")")
        };
        let cpu = |part: &str| -> Result<usize, String> {
            let cpu: usize = part
                .trim()
                .parse()
                .map_err(|_| invalid(format!("\"{part}\" is not a CPU id")))?;
            if cpu > CPU_ID_MAX {
                return Err(invalid(format!("CPU {cpu} is above {CPU_ID_MAX}")));
            }
            Ok(cpu)
        };
        let mut cpus = Vec::new();
        for part in text.split(',') {
            let (first, last) = match part.split_once('-') {
                Some((first, last)) => (cpu(first)?, cpu(last)?),
                None => (cpu(part)?, cpu(part)?),
            };
            if first > last {
                return Err(invalid(format!("range {first}-{last} is empty")));
            }
            for id in first..=last {
                if cpus.contains(&id) {
                    return Err(invalid(format!("CPU {id} is listed twice")));
                }
                cpus.push(id);
            }
        }
        Ok(CpuSet::List(cpus))
    }

    /// The CPU shard `shard` of `shards` is pinned to, or `None` for an unpinned thread.
    pub fn cpu_of(&self, shard: usize, shards: usize, cores: usize) -> Option<usize> {
        match self {
            CpuSet::Auto => (shards <= cores).then_some(shard),
            CpuSet::Unbound => None,
            CpuSet::List(cpus) => cpus.get(shard).copied(),
        }
    }
}

impl TryFrom<String> for CpuSet {
    type Error = String;
    fn try_from(text: String) -> Result<CpuSet, String> {
        CpuSet::parse(&text)
    }
}

impl From<CpuSet> for String {
    fn from(set: CpuSet) -> String {
        set.to_string()
    }
}

impl std::fmt::Display for CpuSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CpuSet::Auto => f.write_str("auto"),
            CpuSet::Unbound => f.write_str("unbound"),
            CpuSet::List(cpus) => {
                let ids: Vec<String> = cpus.iter().map(usize::to_string).collect();
                f.write_str(&ids.join(","))
            }
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            broker_id: 1,
            data_dir: PathBuf::from("./wharf-data"),
            listen: format!("127.0.0.1:{CLIENT_PORT_DEFAULT}"),
            advertised_host: None,
            shard_port_base: 0,
            admin_listen: format!("127.0.0.1:{ADMIN_PORT_DEFAULT}"),
            shards: 0,
            cpu_set: CpuSet::Auto,
            spin_before_park_us: 0,
            io_memory_bytes: crate::runtime::IO_MEMORY_BYTES_DEFAULT,
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            request_bytes_max_per_shard: 256 * 1024 * 1024,
            connections_per_shard_max: 4096,
            connections_reserved_internal: 64,
            connections_per_address_max: 1024,
            topics_max: 10_000,
            partitions_max: 100_000,
            disk_free_bytes_min: 1024 * 1024 * 1024,
            requests_in_flight_max: 128,
            request_read_timeout_ms: 30_000,
            response_write_timeout_ms: 30_000,
            idle_timeout_ms: 600_000,
            request_wait_ms_max: 60_000,
            fetch_bytes_max: 16 * 1024 * 1024,
            shutdown_timeout_ms: 10_000,
            port_wait_ms: 10_000,
            shard_channel_capacity: 1024,
            retention_check_interval_ms: 10_000,
            log: LogSettings::default(),
            topic_defaults: TopicDefaults::default(),
            cluster: ClusterConfig::default(),
            groups: GroupsConfig::default(),
            replica_selection: SelectorConfig::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `auto` (text on a terminal, JSON otherwise), `text` or `json`.
    pub format: String,
    /// A tracing filter, for example `info` or `wharf=debug,info`. `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: "auto".to_string(),
            level: "info".to_string(),
        }
    }
}

/// When acknowledged writes are fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlushMode {
    /// Before the acknowledgement (the default).
    Always,
    /// Every `flush_interval_ms`; acknowledged writes may be lost on power failure.
    Interval,
}

/// Settings of one topic, resolved when it is created and stored with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicDefaults {
    pub flush: FlushMode,
    pub flush_interval_ms: u64,
    pub segment_bytes: u64,
    pub segment_ms: u64,
    /// Per partition; 0 keeps everything.
    pub retention_bytes: u64,
    /// 0 keeps everything.
    pub retention_ms: u64,
    /// In-sync replicas `acks=all` needs (DESIGN default 2); topics with fewer replicas use
    /// their replication factor.
    pub min_insync_replicas: u16,
    /// Preallocate segment files (faster O_DIRECT writes; costs disk space up front).
    pub preallocate: bool,
    /// Memory per partition that keeps the newest flushed (and in-flight) write buffers, so
    /// followers and consumers at the tail read from memory instead of the disk. 0 reads
    /// everything flushed from disk (and data whose flush is still running only afterwards).
    pub recent_bytes_max: u64,
    /// Controller mode: when every in-sync and eligible replica is fenced, elect a live
    /// replica that may lack acknowledged records (availability over durability). Off.
    pub unclean_leader_election: bool,
    /// Where the leader sends consumers to read: `leader` (never elsewhere), `rack` (an
    /// in-sync replica in the consumer's rack) or `load` (in-sync followers when the leader's
    /// shard is loaded; cold readers first). Default `load`.
    pub replica_selector: ReplicaSelector,
}

impl Default for TopicDefaults {
    fn default() -> Self {
        TopicDefaults {
            flush: FlushMode::Always,
            flush_interval_ms: 1000,
            segment_bytes: 256 * 1024 * 1024,
            segment_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: 0,
            retention_ms: 7 * 24 * 3600 * 1000,
            min_insync_replicas: 2,
            preallocate: true,
            recent_bytes_max: LogConfig::default().recent_bytes_max as u64,
            unclean_leader_election: false,
            replica_selector: ReplicaSelector::Load,
        }
    }
}

pub type TopicConfig = TopicDefaults;

/// The most memory one partition may keep for reads of recent data (`recent_bytes_max`): a
/// typo of a few digits should not let a topic pin the host's memory.
pub const RECENT_BYTES_MAX_LIMIT: u64 = 1 << 30;

/// The keys `wharf topic create --config KEY=VALUE` accepts.
pub const TOPIC_CONFIG_KEYS: [&str; 11] = [
    "flush",
    "flush_interval_ms",
    "segment_bytes",
    "segment_ms",
    "retention_bytes",
    "retention_ms",
    "min_insync_replicas",
    "preallocate",
    "recent_bytes_max",
    "unclean_leader_election",
    "replica_selector",
];

impl TopicConfig {
    /// Applies `entries` over these values. Unknown keys and bad values are errors naming the key.
    pub fn with_entries(&self, entries: &[ConfigEntry]) -> Result<TopicConfig, String> {
        let mut config = self.clone();
        for ConfigEntry { key, value } in entries {
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("{key} must be a non-negative integer, not {value:?}"))
            };
            match key.as_str() {
                "flush" => {
                    config.flush = match value.as_str() {
                        "always" => FlushMode::Always,
                        "interval" => FlushMode::Interval,
                        _ => {
                            return Err(format!("flush must be always or interval, not {value:?}"))
                        }
                    }
                }
                "flush_interval_ms" => config.flush_interval_ms = number()?,
                "segment_bytes" => config.segment_bytes = number()?,
                "segment_ms" => config.segment_ms = number()?,
                "retention_bytes" => config.retention_bytes = number()?,
                "retention_ms" => config.retention_ms = number()?,
                "min_insync_replicas" => {
                    config.min_insync_replicas = u16::try_from(number()?)
                        .map_err(|_| format!("min_insync_replicas {value} is too large"))?
                }
                "preallocate" => {
                    config.preallocate = value
                        .parse::<bool>()
                        .map_err(|_| format!("preallocate must be true or false, not {value:?}"))?
                }
                "recent_bytes_max" => config.recent_bytes_max = number()?,
                "unclean_leader_election" => {
                    config.unclean_leader_election = value.parse::<bool>().map_err(|_| {
                        format!("unclean_leader_election must be true or false, not {value:?}")
                    })?
                }
                "replica_selector" => {
                    config.replica_selector = ReplicaSelector::parse(value).ok_or_else(|| {
                        format!("replica_selector must be leader, rack or load, not {value:?}")
                    })?
                }
                _ => {
                    return Err(format!(
                        "unknown topic config {key:?}; known: {}",
                        TOPIC_CONFIG_KEYS.join(", ")
                    ))
                }
            }
        }
        config.log_config().validate()?;
        if config.flush == FlushMode::Interval && config.flush_interval_ms == 0 {
            return Err("flush_interval_ms must be positive with flush = interval".to_string());
        }
        if config.min_insync_replicas == 0 {
            return Err("min_insync_replicas must be at least 1".to_string());
        }
        if config.recent_bytes_max > RECENT_BYTES_MAX_LIMIT {
            return Err(format!(
                "recent_bytes_max {} is above the limit of {RECENT_BYTES_MAX_LIMIT} bytes per partition",
                config.recent_bytes_max
            ));
        }
        Ok(config)
    }

    pub fn entries(&self) -> Vec<ConfigEntry> {
        let entry = |key: &str, value: String| ConfigEntry {
            key: key.to_string(),
            value,
        };
        vec![
            entry(
                "flush",
                match self.flush {
                    FlushMode::Always => "always".to_string(),
                    FlushMode::Interval => "interval".to_string(),
                },
            ),
            entry("flush_interval_ms", self.flush_interval_ms.to_string()),
            entry("segment_bytes", self.segment_bytes.to_string()),
            entry("segment_ms", self.segment_ms.to_string()),
            entry("retention_bytes", self.retention_bytes.to_string()),
            entry("retention_ms", self.retention_ms.to_string()),
            entry("min_insync_replicas", self.min_insync_replicas.to_string()),
            entry("preallocate", self.preallocate.to_string()),
            entry("recent_bytes_max", self.recent_bytes_max.to_string()),
            entry(
                "unclean_leader_election",
                self.unclean_leader_election.to_string(),
            ),
            entry(
                "replica_selector",
                self.replica_selector.as_str().to_string(),
            ),
        ]
    }

    /// The storage configuration of this topic's partition logs.
    pub fn log_config(&self) -> LogConfig {
        let nonzero = |v: u64| (v > 0).then_some(v);
        LogConfig {
            segment_bytes_max: self.segment_bytes,
            segment_age_ms_max: self.segment_ms,
            retention: RetentionLimits {
                retention_bytes_max: nonzero(self.retention_bytes),
                retention_ms_max: nonzero(self.retention_ms),
            },
            flush_policy: match self.flush {
                FlushMode::Always => FlushPolicy::Always,
                FlushMode::Interval => FlushPolicy::Interval {
                    interval_ms: self.flush_interval_ms,
                },
            },
            preallocate: self.preallocate,
            // Checked to fit by `with_entries` and `ServerConfig::validate`.
            recent_bytes_max: usize::try_from(self.recent_bytes_max).unwrap_or(usize::MAX),
            ..LogConfig::default()
        }
    }
}

impl ServerConfig {
    /// Loads `path` (if given) over the defaults.
    pub fn load(path: Option<&std::path::Path>) -> Result<ServerConfig, String> {
        let Some(path) = path else {
            return Ok(ServerConfig::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("invalid config {}: {e}", path.display()))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// Resolves `shards = 0` and checks every limit; the error names the key.
    pub fn validate(mut self) -> Result<ServerConfig, String> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if self.shards == 0 {
            self.shards = cores;
        }
        if self.shards > 256 {
            return Err(format!("shards = {} is more than 256", self.shards));
        }
        if let CpuSet::List(cpus) = &self.cpu_set {
            if cpus.len() < self.shards {
                return Err(format!(
                    "cpu_set = \"{}\" lists {} CPU(s) for {} shards",
                    self.cpu_set,
                    cpus.len(),
                    self.shards
                ));
            }
        }
        parse_host_port("listen", &self.listen)?;
        parse_host_port("admin_listen", &self.admin_listen)?;
        if self.frame_bytes_max < 1024 * 1024 {
            return Err("frame_bytes_max must be at least 1 MiB".to_string());
        }
        if self.fetch_bytes_max + 1024 * 1024 > self.frame_bytes_max {
            return Err(
                "fetch_bytes_max must leave 1 MiB of frame_bytes_max for headers".to_string(),
            );
        }
        for (key, value) in [
            ("connections_per_shard_max", self.connections_per_shard_max),
            ("requests_in_flight_max", self.requests_in_flight_max),
            ("shard_channel_capacity", self.shard_channel_capacity),
            (
                "connections_per_address_max",
                self.connections_per_address_max,
            ),
            ("topics_max", self.topics_max),
            ("partitions_max", self.partitions_max),
            (
                "retention_check_interval_ms",
                self.retention_check_interval_ms as usize,
            ),
        ] {
            if value == 0 {
                return Err(format!("{key} must be positive"));
            }
        }
        if self.request_bytes_max_per_shard < self.frame_bytes_max {
            return Err(format!(
                "request_bytes_max_per_shard ({}) must be at least frame_bytes_max ({}): a frame \
                 larger than the budget could never be read",
                self.request_bytes_max_per_shard, self.frame_bytes_max
            ));
        }
        if self.connections_reserved_internal >= self.connections_per_shard_max {
            return Err(format!(
                "connections_reserved_internal ({}) must be below connections_per_shard_max ({})",
                self.connections_reserved_internal, self.connections_per_shard_max
            ));
        }
        if self.io_memory_bytes < 1024 * 1024 {
            return Err("io_memory_bytes must be at least 1 MiB".to_string());
        }
        if !["auto", "text", "json"].contains(&self.log.format.as_str()) {
            return Err(format!(
                "log.format must be auto, text or json, not {:?}",
                self.log.format
            ));
        }
        self.topic_defaults
            .with_entries(&[])
            .map_err(|e| format!("topic_defaults: {e}"))?;
        let groups = &self.groups;
        if wharf_groups::Assignor::parse(&groups.assignor).is_none() {
            return Err(format!(
                "groups.assignor must be sticky, range or round-robin, not {:?}",
                groups.assignor
            ));
        }
        if groups.offsets_topic_partitions == 0 || groups.offsets_topic_replication_factor == 0 {
            return Err(
                "groups.offsets_topic_partitions and _replication_factor must be > 0".into(),
            );
        }
        if groups.heartbeat_interval_ms == 0
            || groups.session_timeout_ms < 3 * groups.heartbeat_interval_ms
        {
            return Err(format!(
                "groups.session_timeout_ms ({}) must be at least 3 heartbeat intervals \
                 (groups.heartbeat_interval_ms = {}, > 0)",
                groups.session_timeout_ms, groups.heartbeat_interval_ms
            ));
        }
        if groups.snapshot_after_records == 0 || groups.snapshot_interval_ms == 0 {
            return Err("groups.snapshot_after_records and _interval_ms must be > 0".into());
        }
        if groups.members_max == 0 || groups.groups_per_partition_max == 0 {
            return Err(
                "groups.members_max and groups.groups_per_partition_max must be > 0".into(),
            );
        }
        self.replica_selection
            .validate()
            .map_err(|e| format!("replica_selection: {e}"))?;
        let mut ids = std::collections::BTreeSet::new();
        for broker in &self.cluster.brokers {
            if !ids.insert(broker.id) {
                return Err(format!("cluster.brokers lists broker {} twice", broker.id));
            }
            if let Some(rack) = &broker.rack {
                if rack.is_empty() || rack.len() > crate::protocol::RACK_BYTES_MAX {
                    return Err(format!(
                        "cluster.brokers: broker {}'s rack must be 1..={} bytes",
                        broker.id,
                        crate::protocol::RACK_BYTES_MAX
                    ));
                }
            }
            parse_host_port("cluster.brokers.address", &broker.address)?;
            if let Some(internal) = &broker.internal_address {
                parse_host_port("cluster.brokers.internal_address", internal)?;
            } else if self.cluster.brokers.len() > 1 {
                return Err(format!(
                    "cluster.brokers: broker {} has no internal_address (its cluster.internal_listen)",
                    broker.id
                ));
            }
        }
        if self.cluster.brokers.len() > 1 && self.cluster.internal_listen.is_none() {
            return Err(
                "cluster.internal_listen is required in a cluster of more than one broker: \
                 inter-broker APIs are served only there"
                    .to_string(),
            );
        }
        if let Some(internal) = &self.cluster.internal_listen {
            let (_, internal_port) = parse_host_port("cluster.internal_listen", internal)?;
            let (_, client_port) = parse_host_port("listen", &self.listen)?;
            if internal_port != 0 && internal_port == client_port {
                return Err("cluster.internal_listen must use another port than listen".to_string());
            }
            if self.cluster.secret_file.is_none() {
                return Err(
                    "cluster.secret_file is required with cluster.internal_listen: peers prove \
                     the cluster secret before any inter-broker request"
                        .to_string(),
                );
            }
        }
        if !self.cluster.brokers.is_empty() && !ids.contains(&self.broker_id) {
            return Err(format!(
                "cluster.brokers does not list this broker (broker_id = {})",
                self.broker_id
            ));
        }
        let mut voters = std::collections::BTreeSet::new();
        for voter in &self.cluster.controller_voters {
            if !ids.contains(voter) {
                return Err(format!(
                    "cluster.controller_voters names broker {voter}, which cluster.brokers does not list"
                ));
            }
            if !voters.insert(*voter) {
                return Err(format!(
                    "cluster.controller_voters lists broker {voter} twice"
                ));
            }
        }
        if !self.cluster.controller_voters.is_empty() {
            if self.cluster.internal_listen.is_none() {
                return Err(
                    "cluster.controller_voters needs cluster.internal_listen: the controller \
                     and broker heartbeats use the internal listener"
                        .to_string(),
                );
            }
            let session = self.cluster.broker_session_timeout_ms;
            let interval = self.cluster.broker_heartbeat_interval_ms;
            if interval == 0 || session < 3 * interval {
                return Err(format!(
                    "cluster.broker_session_timeout_ms ({session}) must be at least 3 heartbeat \
                     intervals (cluster.broker_heartbeat_interval_ms = {interval}, > 0)"
                ));
            }
            if self.cluster.controller_tick_ms == 0 || self.cluster.controller_election_ticks < 3 {
                return Err(
                    "cluster.controller_tick_ms must be > 0 and controller_election_ticks >= 3"
                        .to_string(),
                );
            }
        }
        if self.cluster.brokers.len() > wharf_replication::replica::REPLICAS_MAX {
            return Err(format!(
                "cluster.brokers lists {} brokers (limit {})",
                self.cluster.brokers.len(),
                wharf_replication::replica::REPLICAS_MAX
            ));
        }
        for (key, value) in [
            (
                "cluster.replica_lag_max_ms",
                self.cluster.replica_lag_max_ms,
            ),
            (
                "cluster.replica_fetch_wait_ms",
                self.cluster.replica_fetch_wait_ms,
            ),
            (
                "cluster.replica_fetch_bytes_max",
                self.cluster.replica_fetch_bytes_max as u64,
            ),
            (
                "cluster.broker_call_timeout_ms",
                self.cluster.broker_call_timeout_ms,
            ),
        ] {
            if value == 0 {
                return Err(format!("{key} must be positive"));
            }
        }
        Ok(self)
    }

    /// The host other brokers reach the internal listener at (`None` without one, or when it
    /// listens on every address: then the advertised host).
    pub fn internal_host(&self) -> Option<String> {
        let internal = self.cluster.internal_listen.as_deref()?;
        let (host, _) = parse_host_port("cluster.internal_listen", internal).ok()?;
        (host != "0.0.0.0" && host != "::" && host != "[::]").then_some(host)
    }

    pub fn advertised_host(&self) -> String {
        if let Some(host) = &self.advertised_host {
            return host.clone();
        }
        let (host, _) = parse_host_port("listen", &self.listen).unwrap_or_default();
        if host == "0.0.0.0" || host == "::" || host == "[::]" {
            // Reachable from this host at least; set advertised_host for remote clients.
            "127.0.0.1".to_string()
        } else {
            host
        }
    }
}

/// Splits `HOST:PORT`, with a clear error naming `what`.
pub fn parse_host_port(what: &str, text: &str) -> Result<(String, u16), String> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{what} must be HOST:PORT, not {text:?}"))?;
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("{what}: bad port in {text:?}"))?;
    if host.is_empty() {
        return Err(format!("{what}: missing host in {text:?}"));
    }
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_round_trip_through_toml() {
        let config = ServerConfig::default()
            .validate()
            .expect("defaults are valid");
        assert!(config.shards >= 1);
        let text = config.to_toml();
        let back: ServerConfig = toml::from_str(&text).expect("parses");
        assert_eq!(back, config);
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let config: ServerConfig = toml::from_str(include_str!("../../deploy/wharf.toml"))
            .expect("deploy/wharf.toml parses");
        let config = config.validate().expect("deploy/wharf.toml is valid");
        assert_eq!(config.shard_port_base, 9100);
    }

    #[test]
    fn cpu_sets_parse_and_place_shards() {
        assert_eq!(CpuSet::parse("auto"), Ok(CpuSet::Auto));
        assert_eq!(CpuSet::parse("unbound"), Ok(CpuSet::Unbound));
        assert_eq!(CpuSet::parse("0-2, 5"), Ok(CpuSet::List(vec![0, 1, 2, 5])));
        assert_eq!(CpuSet::Auto.cpu_of(1, 2, 2), Some(1));
        assert_eq!(CpuSet::Auto.cpu_of(1, 3, 2), None);
        assert_eq!(CpuSet::Unbound.cpu_of(0, 1, 2), None);
        assert_eq!(CpuSet::List(vec![1]).cpu_of(0, 1, 2), Some(1));
        for (text, says) in [
            ("", "is not a CPU id"),
            ("x", "is not a CPU id"),
            ("3-1", "is empty"),
            ("1,1", "listed twice"),
            ("99999", "above"),
        ] {
            let error = CpuSet::parse(text).expect_err(text);
            assert!(
                error.contains(says) && error.contains("cpu_set"),
                "{text}: {error}"
            );
        }
        let error = ServerConfig {
            shards: 2,
            cpu_set: CpuSet::List(vec![1]),
            ..ServerConfig::default()
        }
        .validate()
        .expect_err("too few CPUs");
        assert!(error.contains("lists 1 CPU(s) for 2 shards"), "{error}");
        // A list survives `--print-config` and a reload.
        let config = ServerConfig {
            cpu_set: CpuSet::parse("0-1,4").expect("list"),
            ..ServerConfig::default()
        };
        let back: ServerConfig = toml::from_str(&config.to_toml()).expect("parses");
        assert_eq!(back.cpu_set, CpuSet::List(vec![0, 1, 4]));
        let error = toml::from_str::<ServerConfig>("cpu_set = \"3-1\"")
            .expect_err("bad cpu_set in TOML")
            .to_string();
        assert!(error.contains("is empty"), "{error}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let error = toml::from_str::<ServerConfig>("listn = \"x\"")
            .expect_err("unknown key")
            .to_string();
        assert!(error.contains("listn"), "{error}");
        let error = ServerConfig {
            listen: "nowhere".to_string(),
            ..ServerConfig::default()
        }
        .validate()
        .expect_err("bad listen");
        assert!(error.contains("listen"), "{error}");
        let bad_groups = [
            ("fastest", 10_000, 500, 4, "groups.assignor"),
            ("sticky", 1_000, 500, 4, "groups.session_timeout_ms"),
            ("sticky", 10_000, 0, 4, "groups.session_timeout_ms"),
            ("sticky", 10_000, 500, 0, "groups.offsets_topic_partitions"),
        ];
        for (assignor, session, heartbeat, partitions, named) in bad_groups {
            let error = ServerConfig {
                groups: GroupsConfig {
                    assignor: assignor.to_string(),
                    session_timeout_ms: session,
                    heartbeat_interval_ms: heartbeat,
                    offsets_topic_partitions: partitions,
                    ..GroupsConfig::default()
                },
                ..ServerConfig::default()
            }
            .validate()
            .expect_err("bad groups settings");
            assert!(error.contains(named), "{error}");
        }
    }

    #[test]
    fn topic_entries_override_defaults_and_are_checked() {
        let entry = |k: &str, v: &str| ConfigEntry {
            key: k.to_string(),
            value: v.to_string(),
        };
        let config = TopicDefaults::default()
            .with_entries(&[
                entry("flush", "interval"),
                entry("segment_bytes", "1048576"),
                entry("recent_bytes_max", "0"),
            ])
            .expect("valid");
        assert_eq!(config.flush, FlushMode::Interval);
        assert_eq!(config.log_config().segment_bytes_max, 1 << 20);
        assert_eq!(config.log_config().recent_bytes_max, 0);
        assert_eq!(
            TopicDefaults::default().log_config().recent_bytes_max,
            LogConfig::default().recent_bytes_max
        );
        assert_eq!(
            TopicDefaults::default()
                .with_entries(&config.entries())
                .expect("own entries parse"),
            config
        );
        for bad in [
            entry("flush", "sometimes"),
            entry("segment_bytes", "1000"),
            entry("segment_bytes", "-1"),
            entry("colour", "blue"),
            entry("min_insync_replicas", "0"),
            entry("recent_bytes_max", "many"),
            entry(
                "recent_bytes_max",
                &(RECENT_BYTES_MAX_LIMIT + 1).to_string(),
            ),
        ] {
            assert!(
                TopicDefaults::default()
                    .with_entries(std::slice::from_ref(&bad))
                    .is_err(),
                "{bad:?} accepted"
            );
        }
    }
}
