//! Request and response bodies. Field order and types are wire format: add fields only in a new
//! api version. Names are UTF-8; every list has a limit checked by the server.

use rkyv::rancor;
use rkyv::{Archive, Deserialize, Serialize};

use super::{FrameBuf, Message};

macro_rules! messages {
    ($($name:ident),* $(,)?) => {$(
        impl Message for $name {
            const WHAT: &'static str = stringify!($name);
            fn archive_into(&self, buffer: FrameBuf) -> Result<FrameBuf, rancor::Error> {
                rkyv::api::high::to_bytes_in::<_, rancor::Error>(self, buffer)
            }
            fn from_archived(bytes: &[u8]) -> Result<Self, rancor::Error> {
                rkyv::from_bytes::<$name, rancor::Error>(bytes)
            }
        }
    )*};
}

messages!(
    ErrorBody,
    VersionsRequest,
    VersionsResponse,
    MetadataRequest,
    MetadataResponse,
    CreateTopicRequest,
    DeleteTopicRequest,
    TopicResult,
    DescribeTopicRequest,
    DescribeTopicResponse,
    ProduceRequest,
    ProduceResponse,
    FetchRequest,
    FetchResponse,
    ListOffsetsRequest,
    ListOffsetsResponse,
    ReplicaFetchRequest,
    ReplicaFetchResponse,
    ApplyTopicRequest,
    PeerAuthBeginRequest,
    PeerAuthBeginResponse,
    PeerAuthProveRequest,
    ControllerRaftRequest,
    ControllerRaftResponse,
    BrokerHeartbeatRequest,
    BrokerHeartbeatResponse,
    ControllerCommandRequest,
    ControllerCommandResponse,
    ClusterStatusRequest,
    ClusterStatusResponse,
    InitProducerIdRequest,
    InitProducerIdResponse,
    GroupHeartbeatRequest,
    GroupHeartbeatResponse,
    OffsetCommitRequest,
    GroupResult,
    OffsetFetchRequest,
    OffsetFetchResponse,
    DescribeGroupRequest,
    DescribeGroupResponse,
    ListGroupsRequest,
    ListGroupsResponse,
    DeleteGroupRequest,
    StoredGroupRecord,
    CreateQueueRequest,
    QueueAcquireRequest,
    QueueAcquireResponse,
    QueueSettleRequest,
    QueueSettleResponse,
    DescribeQueueRequest,
    DescribeQueueResponse,
    ListQueuesRequest,
    ListQueuesResponse,
    DescribeReadersRequest,
    DescribeReadersResponse,
);

/// Body of a response whose header carries a frame-level error code.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ErrorBody {
    pub message: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VersionsRequest {
    pub client_name: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ApiVersionRange {
    pub api_key: u16,
    pub min_version: u16,
    pub max_version: u16,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VersionsResponse {
    pub broker_id: u32,
    pub server_version: String,
    pub apis: Vec<ApiVersionRange>,
}

/// `topics: None` asks for every topic.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MetadataRequest {
    pub topics: Option<Vec<String>>,
}

/// Where one shard of a broker accepts connections.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ShardAddress {
    pub shard: u32,
    pub host: String,
    pub port: u16,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BrokerInfo {
    pub broker_id: u32,
    /// The broker's shared listener (any shard).
    pub host: String,
    pub port: u16,
    pub shards: Vec<ShardAddress>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PartitionMetadata {
    pub partition: u32,
    pub leader: u32,
    pub leader_epoch: u32,
    /// The leader's shard that owns this partition: connect to it to avoid a hop.
    pub shard: u32,
    pub replicas: Vec<u32>,
    pub isr: Vec<u32>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TopicMetadata {
    pub name: String,
    pub error: u16,
    pub partitions: Vec<PartitionMetadata>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MetadataResponse {
    pub brokers: Vec<BrokerInfo>,
    pub topics: Vec<TopicMetadata>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ConfigEntry {
    pub key: String,
    pub value: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CreateTopicRequest {
    pub name: String,
    pub partitions: u32,
    pub replication_factor: u16,
    pub configs: Vec<ConfigEntry>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeleteTopicRequest {
    pub name: String,
}

/// The answer to create and delete.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TopicResult {
    pub error: u16,
    pub message: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DescribeTopicRequest {
    pub name: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PartitionDescription {
    pub partition: u32,
    pub leader: u32,
    pub leader_epoch: u32,
    pub shard: u32,
    pub replicas: Vec<u32>,
    pub isr: Vec<u32>,
    pub log_start_offset: u64,
    pub high_watermark: u64,
    pub end_offset: u64,
    /// Non-zero when the partition cannot serve (for example its log is poisoned).
    pub error: u16,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TopicDescription {
    pub name: String,
    pub topic_id: u64,
    pub replication_factor: u16,
    pub configs: Vec<ConfigEntry>,
    pub partitions: Vec<PartitionDescription>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DescribeTopicResponse {
    pub error: u16,
    pub message: String,
    pub topic: Option<TopicDescription>,
}

/// How many replicas must hold a batch durably before it is acknowledged.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acks {
    /// No response at all.
    None,
    Leader,
    /// A majority of the replica set.
    Quorum,
    /// Every in-sync replica (and at least `min_insync_replicas`).
    All,
    /// This many replicas, the leader included.
    Replicas(u8),
}

impl std::str::FromStr for Acks {
    type Err = String;
    fn from_str(text: &str) -> Result<Acks, String> {
        match text {
            "none" | "0" => Ok(Acks::None),
            "leader" => Ok(Acks::Leader),
            "quorum" => Ok(Acks::Quorum),
            "all" => Ok(Acks::All),
            other => match other.parse::<u8>() {
                Ok(n) if n >= 1 => Ok(Acks::Replicas(n)),
                _ => Err(format!(
                    "acks must be none, leader, quorum, all or a replica count 1..=255, not {other:?}"
                )),
            },
        }
    }
}

impl std::fmt::Display for Acks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Acks::None => f.write_str("none"),
            Acks::Leader => f.write_str("leader"),
            Acks::Quorum => f.write_str("quorum"),
            Acks::All => f.write_str("all"),
            Acks::Replicas(n) => write!(f, "{n}"),
        }
    }
}

/// One partition's share of a produce request: `batch_bytes` of the payload (whole batches).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ProducePartition {
    pub partition: u32,
    pub batch_bytes: u32,
}

/// Batches for partitions of one topic. The payload holds each partition's batches in the
/// order listed.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ProduceRequest {
    pub acks: Acks,
    /// How long the broker may wait for the acks before answering `RequestTimeout`.
    pub timeout_ms: u32,
    pub topic: String,
    pub partitions: Vec<ProducePartition>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ProducePartitionResponse {
    pub partition: u32,
    pub error: u16,
    pub message: String,
    /// Offset of the first record appended for this partition.
    pub base_offset: u64,
    /// Offset of the last record appended.
    pub last_offset: u64,
    /// The epoch the batches were appended in; with `not_leader` and `current_leader`, that
    /// leader's epoch.
    pub leader_epoch: u32,
    /// Replicas that held the batches durably when they were acknowledged (fsync on).
    pub replicas_durable: u16,
    /// Version 1. With `not_leader`: the broker this one follows for the partition, when it
    /// knows one, so the client can retry there at once (KIP-951 style).
    pub current_leader: Option<u32>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ProduceResponse {
    pub partitions: Vec<ProducePartitionResponse>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FetchPartition {
    pub topic: String,
    pub partition: u32,
    pub fetch_offset: u64,
    pub max_bytes: u32,
    /// The leader epoch the consumer was given with its read lease (KIP-320): a replica with
    /// another epoch refuses with `fenced_leader_epoch`, so the consumer goes back to the leader.
    /// `None`: no check (reads from the leader).
    pub leader_epoch: Option<u32>,
    /// The follower the consumer reads this partition from (or read from until its lease
    /// ended): the leader keeps it there while it stays a good choice (hysteresis).
    pub read_replica: Option<u32>,
    /// Followers that recently failed this consumer (unreachable, or refused the read), at
    /// most `AVOID_REPLICAS_MAX`: the leader does not send it to any of them.
    pub avoid_replicas: Vec<u32>,
}

/// Long-poll: answered once `min_bytes` are available across the partitions or `max_wait_ms`
/// passed. At least one whole batch is returned when one exists, even above `max_bytes`.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    pub max_wait_ms: u32,
    pub min_bytes: u32,
    pub max_bytes: u32,
    pub partitions: Vec<FetchPartition>,
    /// Who reads (at most `READER_ID_BYTES_MAX` bytes; empty: anonymous): spreads readers
    /// over followers and names them in `DescribeReaders`.
    pub reader_id: String,
    /// The consumer's rack (KIP-392 `client.rack`; empty: none).
    pub rack: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FetchPartitionResponse {
    pub topic: String,
    pub partition: u32,
    pub error: u16,
    pub message: String,
    /// Consumers may read below this offset (everything below is durable).
    pub high_watermark: u64,
    pub log_start_offset: u64,
    /// Bytes of whole batches for this partition in the payload, in order.
    pub batch_bytes: u32,
    /// The answering replica's leader epoch (a consumer sent to a follower names it there).
    pub leader_epoch: u32,
    /// The leader's advice (KIP-392): read this partition from that broker for
    /// `read_lease_ms`, then ask the leader again. A redirect carries no data.
    pub preferred_read_replica: Option<u32>,
    pub read_lease_ms: u32,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FetchResponse {
    pub partitions: Vec<FetchPartitionResponse>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The log start offset.
    Earliest,
    /// The high watermark (the next offset a consumer will see).
    Latest,
    /// The first offset whose record timestamp is at or after this (ms since the epoch); the
    /// high watermark if none is.
    Timestamp(i64),
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ListOffsetsPartition {
    pub partition: u32,
    pub spec: OffsetSpec,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ListOffsetsRequest {
    pub topic: String,
    pub partitions: Vec<ListOffsetsPartition>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ListOffsetsPartitionResponse {
    pub partition: u32,
    pub error: u16,
    pub message: String,
    pub offset: u64,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ListOffsetsResponse {
    pub partitions: Vec<ListOffsetsPartitionResponse>,
}

/// Where the consumers of a topic read, as the leaders of its partitions know it: asked of each
/// broker that leads some partition; it answers for the partitions it leads.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DescribeReadersRequest {
    pub topic: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ReaderInfo {
    pub reader_id: String,
    pub rack: String,
    /// The broker the leader last sent this reader to (itself when it serves it).
    pub replica: u32,
    pub fetch_offset: u64,
    /// Since the reader last fetched from the leader.
    pub last_seen_ms_ago: u64,
    /// Why the leader chose that replica (`loaded`, `cold_reader`, `same_rack`, ...).
    pub reason: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PartitionReaders {
    pub partition: u32,
    pub leader: u32,
    /// The leader shard's load: busy share (permille), requests waiting, consumer egress
    /// (bytes/s), and the pressure the selector sees (permille of its thresholds).
    pub busy_permille: u32,
    pub queue_depth: u32,
    pub egress_bytes_per_s: u64,
    pub pressure_permille: u32,
    pub readers: Vec<ReaderInfo>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DescribeReadersResponse {
    pub partitions: Vec<PartitionReaders>,
}

/// A follower's fetch for one partition (DESIGN §5). Sent to the leader's owning shard.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ReplicaFetchRequest {
    pub replica_id: u32,
    pub topic: String,
    pub topic_id: u64,
    pub partition: u32,
    /// The epoch the follower believes the leader has.
    pub leader_epoch: u32,
    pub fetch_id: u64,
    /// The follower's log end.
    pub fetch_offset: u64,
    /// The epoch of the follower's last record; `None` for an empty log.
    pub last_fetched_epoch: Option<u32>,
    /// Everything below this is durable on the follower.
    pub durable_offset: u64,
    /// The high watermark the follower knows: a leader with a higher one answers at once
    /// instead of parking the fetch (the follower serves consumers below it).
    pub high_watermark: u64,
    pub max_wait_ms: u32,
    pub max_bytes: u32,
}

/// The batches (in the payload, `batch_bytes` long) from the fetch offset, or an error.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ReplicaFetchResponse {
    pub error: u16,
    pub message: String,
    pub fetch_id: u64,
    /// The leader's current epoch (also on errors: a fenced follower learns it here).
    pub leader_epoch: u32,
    pub high_watermark: u64,
    pub log_start_offset: u64,
    /// With `DivergingLog`: the leader's largest epoch not above the follower's last epoch,
    /// and where the leader's copy of it ends.
    pub diverging_epoch: u32,
    pub diverging_end_offset: u64,
    pub batch_bytes: u32,
}

/// Installs a topic with a given id and assignment on another broker, or removes it.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ApplyTopicRequest {
    pub name: String,
    pub topic_id: u64,
    pub delete: bool,
    pub replication_factor: u16,
    pub configs: Vec<ConfigEntry>,
    /// Per partition, the replica set (the first replica leads).
    pub replicas: Vec<Vec<u32>>,
}

/// First step of the internal listener's handshake (HMAC-SHA256 challenge/response over the
/// cluster secret; `server::peer_auth` has the scheme).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthBeginRequest {
    /// The connecting broker's id (must be listed in `cluster.brokers`).
    pub broker_id: u32,
    /// Fresh random bytes from the connecting broker.
    pub client_nonce: Vec<u8>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthBeginResponse {
    pub error: u16,
    pub message: String,
    /// The answering broker's id.
    pub broker_id: u32,
    /// Fresh random bytes from the answering broker: the peer's proof covers them.
    pub server_nonce: Vec<u8>,
    /// The answering broker's proof that it holds the secret (the peer checks it, so a
    /// follower cannot be fed by an impostor leader).
    pub server_proof: Vec<u8>,
}

/// Second step: the connecting broker's proof. Answered with a `TopicResult` (error code and
/// message); on failure the connection is closed.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthProveRequest {
    pub proof: Vec<u8>,
}

/// Raft messages (raft-rs protobuf encoding, opaque here) from controller voter `from`.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ControllerRaftRequest {
    pub from: u32,
    pub messages: Vec<Vec<u8>>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ControllerRaftResponse {
    pub error: u16,
    pub message: String,
}

/// A broker's heartbeat. The first one with a new `incarnation` registers the broker.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BrokerHeartbeatRequest {
    pub broker_id: u32,
    /// New at every start of the broker process (its registration epoch).
    pub incarnation: u64,
    pub client_address: String,
    pub internal_address: String,
    /// The last metadata log index this broker applied.
    pub applied_index: u64,
    /// The broker is stopping (SIGTERM); informational (the move is a controller command).
    pub shutting_down: bool,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BrokerHeartbeatResponse {
    pub error: u16,
    pub message: String,
    /// With `not_controller`: the controller leader, when known.
    pub leader_hint: Option<u32>,
    /// Metadata records after `applied_index`, or a snapshot (JSON of the controller's delta).
    pub delta_json: Vec<u8>,
    /// With `shutting_down`: the broker leads nothing any more and may stop.
    pub shutdown_ready: bool,
}

/// A command for the controller leader (JSON of the controller's command type).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ControllerCommandRequest {
    pub command_json: Vec<u8>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ControllerCommandResponse {
    pub error: u16,
    pub message: String,
    pub leader_hint: Option<u32>,
    /// The metadata index at which the command's records were committed (0 on error).
    pub committed_index: u64,
    /// Controlled shutdown: the broker still leads partitions (no other eligible replica yet).
    pub still_leading: bool,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ClusterStatusRequest {}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BrokerStatus {
    pub broker_id: u32,
    pub incarnation: u64,
    pub client_address: String,
    /// "alive", "fenced" or "shutting_down".
    pub state: String,
    pub leaders: u32,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ClusterStatusResponse {
    pub error: u16,
    pub message: String,
    /// The controller voters, and the leader as this broker knows it.
    pub voters: Vec<u32>,
    pub controller_leader: Option<u32>,
    /// This broker's view: the metadata index it applied; on a voter, the Raft term and commit.
    pub applied_index: u64,
    pub raft_term: u64,
    pub raft_commit_index: u64,
    pub brokers: Vec<BrokerStatus>,
}

/// An idempotent producer asks for its identity: a new producer id (`producer_id` none), or
/// the next epoch of the one it holds (it restarts its sequences at 0 in that epoch; batches
/// of older epochs are then refused with `invalid_producer_epoch`).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InitProducerIdRequest {
    pub producer_id: Option<u64>,
    pub producer_epoch: u16,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InitProducerIdResponse {
    pub error: u16,
    pub message: String,
    pub producer_id: u64,
    pub producer_epoch: u16,
}

/// One partition of a topic, as consumer groups name it.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct GroupPartition {
    pub topic: String,
    pub partition: u32,
}

/// A consumer group member's heartbeat (KIP-848 style): `member_epoch` 0 joins, -1 leaves,
/// -2 leaves for a restart (static members), else the member's current epoch. The member id
/// is chosen by the client (a random id per consumer instance).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GroupHeartbeatRequest {
    pub group: String,
    pub member_id: String,
    pub member_epoch: i32,
    pub instance_id: Option<String>,
    /// Required to join; `None` afterwards means unchanged.
    pub subscribed_topics: Option<Vec<String>>,
    /// The partitions the member consumes now; `None` means unchanged.
    pub owned: Option<Vec<GroupPartition>>,
    /// How far behind the member is on each partition it consumes (for the coordinator's lag
    /// metrics and `wharf group describe`).
    pub lag: Vec<PartitionLag>,
}

/// A member's position on one partition against that partition's high watermark.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: u32,
    /// The next offset the member will consume.
    pub position: u64,
    /// The partition's high watermark when the member last fetched.
    pub high_watermark: u64,
    /// 0 when caught up; else how old the last record it consumed is (ms): an upper bound on
    /// the age of the oldest record it has not consumed yet.
    pub lag_ms: u64,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GroupHeartbeatResponse {
    pub error: u16,
    pub message: String,
    pub member_epoch: i32,
    pub heartbeat_interval_ms: u32,
    /// What the member may consume now; it stops consuming anything else it holds (after
    /// committing) and reports that in its next heartbeat.
    pub assignment: Vec<GroupPartition>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct OffsetCommitEntry {
    pub topic: String,
    pub partition: u32,
    /// The next offset the group will consume.
    pub offset: u64,
    pub leader_epoch: Option<u32>,
    pub metadata: String,
}

/// `member_id: None` commits as an administrator (reset-offsets): only into a group without
/// members.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct OffsetCommitRequest {
    pub group: String,
    pub member_id: Option<String>,
    pub member_epoch: i32,
    pub offsets: Vec<OffsetCommitEntry>,
}

/// The answer to a commit or a group deletion: all of it was done, or none.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GroupResult {
    pub error: u16,
    pub message: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct OffsetFetchRequest {
    pub group: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CommittedOffsetEntry {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub leader_epoch: Option<u32>,
    pub metadata: String,
    /// When the coordinator accepted the commit (ms since the Unix epoch).
    pub commit_ms: u64,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct OffsetFetchResponse {
    pub error: u16,
    pub message: String,
    pub offsets: Vec<CommittedOffsetEntry>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DescribeGroupRequest {
    pub group: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GroupMemberDescription {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub member_epoch: i32,
    pub subscribed_topics: Vec<String>,
    pub assigned: Vec<GroupPartition>,
    /// Partitions it was asked to give up and has not yet released.
    pub revoking: Vec<GroupPartition>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DescribeGroupResponse {
    pub error: u16,
    pub message: String,
    pub group_epoch: i32,
    pub assignor: String,
    /// The broker coordinating the group.
    pub coordinator: u32,
    pub members: Vec<GroupMemberDescription>,
    pub offsets: Vec<CommittedOffsetEntry>,
    /// The members' last reported lag per partition.
    pub lag: Vec<PartitionLag>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ListGroupsRequest {}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GroupListing {
    pub group: String,
    pub members: u32,
    pub group_epoch: i32,
    /// The members' last reported lag: summed over partitions, and the largest in time.
    pub lag_records: u64,
    pub lag_ms_max: u64,
}

/// The groups this broker coordinates (a client asks every broker).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ListGroupsResponse {
    pub error: u16,
    pub message: String,
    pub groups: Vec<GroupListing>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeleteGroupRequest {
    pub group: String,
}

/// A member as the coordinator persists it (see `wharf_groups::MemberState`).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StoredMember {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub member_epoch: i32,
    pub previous_epoch: i32,
    pub subscribed_topics: Vec<String>,
    pub assigned: Vec<GroupPartition>,
    pub revoking: Vec<GroupPartition>,
    pub target: Vec<GroupPartition>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum StoredGroupChange {
    Epoch { group_epoch: i32 },
    Member(StoredMember),
    MemberRemoved { member_id: String },
    Offset(CommittedOffsetEntry),
    OffsetDeleted(GroupPartition),
}

/// The value of one record of the internal offsets topic: a change to one group's state. The
/// record's key is the group and the change's key, so compaction keeps the latest of each.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StoredGroupRecord {
    pub group: String,
    pub change: StoredGroupChange,
}

/// A queue group's knobs (`wharf queue create`). Zero or empty means the broker's default.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct QueueSettings {
    /// The lease: a record not settled within this is delivered again.
    pub ack_wait_ms: u64,
    /// Deliveries a record gets before it goes to the dead-letter topic.
    pub max_deliveries: u32,
    /// Records acquired at once per partition.
    pub in_flight_max: u32,
    /// Exponential backoff between deliveries of one record.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// The multiplier in thousandths (2000 doubles).
    pub backoff_multiplier_permille: u32,
    /// Up to this share (thousandths) of each delay is random.
    pub backoff_jitter_permille: u32,
    /// An explicit list of delays instead (the last repeats).
    pub backoff_list_ms: Vec<u64>,
    /// Records with one key are never in flight twice at once.
    pub per_key_ordering: bool,
    /// Empty: `<topic>.dlq`.
    pub dead_letter_topic: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CreateQueueRequest {
    pub group: String,
    pub topic: String,
    pub settings: QueueSettings,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct QueueAcquireRequest {
    pub group: String,
    /// Chosen by the member (1 to 255 bytes); settlements must name the same.
    pub member: String,
    pub records_max: u32,
    /// Long poll: how long to wait for a record when none is deliverable now.
    pub wait_ms: u32,
}

/// One record handed to a member, under a lease.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct QueueDelivery {
    pub partition: u32,
    pub offset: u64,
    /// 1 for the first delivery; the member sends it back with its settlement.
    pub delivery_attempt: u32,
    /// Wall-clock ms since the epoch: settle before this or the record is delivered again.
    pub lease_until_ms: u64,
    pub timestamp_ms: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct QueueAcquireResponse {
    pub error: u16,
    pub message: String,
    pub topic: String,
    pub records: Vec<QueueDelivery>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum SettleAction {
    Ack,
    /// Deliver again after `delay_ms`, or after the queue's backoff for this attempt.
    Nack {
        delay_ms: Option<u64>,
    },
    /// Straight to the dead-letter topic, with this reason in its headers.
    Reject {
        reason: String,
    },
    /// Renew the lease (`ack_wait_ms` from now).
    Extend,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct QueueSettlement {
    pub partition: u32,
    pub offset: u64,
    pub delivery_attempt: u32,
    pub action: SettleAction,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct QueueSettleRequest {
    pub group: String,
    pub member: String,
    pub settlements: Vec<QueueSettlement>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct QueueSettleResult {
    pub error: u16,
    pub message: String,
    /// After an extend: the new end of the lease.
    pub lease_until_ms: u64,
}

/// One result per settlement, in order; the frame error is for the request as a whole.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct QueueSettleResponse {
    pub error: u16,
    pub message: String,
    pub results: Vec<QueueSettleResult>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DescribeQueueRequest {
    pub group: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct QueuePartitionDescription {
    pub partition: u32,
    /// Every record below is done (acked or dead-lettered).
    pub start_offset: u64,
    /// Records from here on were never delivered.
    pub end_offset: u64,
    pub in_flight: u32,
    /// Waiting for a redelivery (backoff or nack delay).
    pub waiting: u32,
    pub dead_lettering: u32,
    /// Age of the oldest record not yet done, when known (ms); 0 when none.
    pub oldest_pending_age_ms: u64,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DescribeQueueResponse {
    pub error: u16,
    pub message: String,
    pub group: String,
    pub topic: String,
    pub coordinator: u32,
    pub settings: QueueSettings,
    pub partitions: Vec<QueuePartitionDescription>,
    /// Since the coordinator loaded the queue (process counters).
    pub acked: u64,
    pub redelivered: u64,
    pub dead_lettered: u64,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ListQueuesRequest {}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct QueueListing {
    pub group: String,
    pub topic: String,
    pub in_flight: u32,
    pub dead_letter_topic: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ListQueuesResponse {
    pub error: u16,
    pub message: String,
    pub queues: Vec<QueueListing>,
}
