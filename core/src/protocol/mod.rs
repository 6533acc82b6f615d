//! The Wharf wire protocol: a pure codec (no glommio, no sockets), usable by any client runtime.
//!
//! Every message is one frame:
//!
//! ```text
//! 0   u32 frame_bytes     whole frame, header included (checked against the limit before any
//!                         allocation)
//! 4   u16 api_key         which API ([`ApiKey`])
//! 6   u16 api_version
//! 8   u32 correlation_id  echoed in the response
//! 12  u16 flags           bit 0: response
//! 14  u16 error_code      responses only: a frame-level error ([`ErrorCode`]); the body is then
//!                         an [`messages::ErrorBody`]
//! 16  u32 body_bytes      rkyv-archived request or response struct
//! 20  u32 payload_bytes   raw record batches (produce requests, fetch responses)
//! 24  u32 body_crc        CRC32C of the body and its padding (not the payload: every record
//!                         batch carries its own CRCs, checked wherever it is trusted)
//! 28  u32 header_crc      CRC32C of bytes 0..28
//! 32  body, zero-padded to a multiple of 16, then the payload
//! ```
//!
//! The payload starts 16-aligned so record batches (whose own format keeps 16-byte alignment)
//! can be validated and read in place: the bytes a producer sends are appended unchanged, and a
//! fetch response carries the log's bytes unchanged.
//!
//! All integers are little-endian; bodies use rkyv with the same pinned format features as
//! record batches, validated (bytecheck) on receipt.

pub mod messages;

use futures_lite::{AsyncRead, AsyncReadExt};
use rkyv::rancor;
use rkyv::util::AlignedVec;

pub use messages::*;

pub const FRAME_HEADER_BYTES: usize = 32;
/// Body and payload alignment inside a frame.
pub const FRAME_ALIGNMENT_BYTES: usize = 16;
/// Default cap on one frame (a produce request may carry many batches).
pub const FRAME_BYTES_MAX_DEFAULT: usize = 64 * 1024 * 1024;
/// Cap on the rkyv body of any frame: bodies hold names and numbers, never record data.
pub const BODY_BYTES_MAX: usize = 4 * 1024 * 1024;

pub const FLAG_RESPONSE: u16 = 1;

/// Frame buffers are 16-aligned so bodies and batches can be accessed in place.
pub type FrameBuf = AlignedVec<FRAME_ALIGNMENT_BYTES>;

/// The APIs. Numbers are part of the wire format and never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ApiKey {
    Versions = 0,
    Metadata = 1,
    CreateTopic = 2,
    DeleteTopic = 3,
    DescribeTopic = 4,
    Produce = 5,
    Fetch = 6,
    ListOffsets = 7,
    /// Broker to broker: a follower fetches from the partition leader.
    ReplicaFetch = 8,
    /// Broker to broker: install (or remove) a topic with the assignment the creating broker
    /// chose, so every broker of a static cluster knows it.
    ApplyTopic = 9,
    /// Internal listener: a peer names itself and sends a nonce; the broker answers with its
    /// own nonce and a proof that it holds the cluster secret.
    PeerAuthBegin = 10,
    /// Internal listener: the peer's proof that it holds the cluster secret.
    PeerAuthProve = 11,
    /// Internal: Raft messages from one controller voter to another.
    ControllerRaft = 12,
    /// Internal: a broker's heartbeat to the controller leader; the answer renews the broker's
    /// session and carries the metadata records it has not applied yet.
    BrokerHeartbeat = 13,
    /// Internal: a command for the controller leader (create or delete a topic, alter a
    /// partition's ISR, controlled shutdown), JSON-encoded.
    ControllerCommand = 14,
    /// Client: the brokers (alive, fenced, shutting down) and the controller's state.
    ClusterStatus = 15,
    /// Client: a producer id for an idempotent producer, or the next epoch of one it holds.
    InitProducerId = 16,
    /// Client, to the group's coordinator: join, heartbeat (report released partitions, get
    /// the assignment) or leave a consumer group.
    GroupHeartbeat = 17,
    /// Client, to the group's coordinator: commit consumed offsets.
    OffsetCommit = 18,
    /// Client, to the group's coordinator: the group's committed offsets.
    OffsetFetch = 19,
    /// Client, to the group's coordinator: members, assignments and committed offsets.
    DescribeGroup = 20,
    /// Client, to any broker: the groups its shards coordinate.
    ListGroups = 21,
    /// Client, to the group's coordinator: forget an empty group's committed offsets.
    DeleteGroup = 22,
    /// Queues (`wharf_queues`): define a queue group on a topic.
    CreateQueue = 23,
    /// Queues: records for a member, each under a lease.
    QueueAcquire = 24,
    /// Queues: ack, nack, reject or extend deliveries.
    QueueSettle = 25,
    DescribeQueue = 26,
    ListQueues = 27,
    /// Follower reads: where each consumer of a topic reads, from the partitions' leaders.
    DescribeReaders = 28,
}

impl ApiKey {
    pub const ALL: [ApiKey; 29] = [
        ApiKey::Versions,
        ApiKey::Metadata,
        ApiKey::CreateTopic,
        ApiKey::DeleteTopic,
        ApiKey::DescribeTopic,
        ApiKey::Produce,
        ApiKey::Fetch,
        ApiKey::ListOffsets,
        ApiKey::ReplicaFetch,
        ApiKey::ApplyTopic,
        ApiKey::PeerAuthBegin,
        ApiKey::PeerAuthProve,
        ApiKey::ControllerRaft,
        ApiKey::BrokerHeartbeat,
        ApiKey::ControllerCommand,
        ApiKey::ClusterStatus,
        ApiKey::InitProducerId,
        ApiKey::GroupHeartbeat,
        ApiKey::OffsetCommit,
        ApiKey::OffsetFetch,
        ApiKey::DescribeGroup,
        ApiKey::ListGroups,
        ApiKey::DeleteGroup,
        ApiKey::CreateQueue,
        ApiKey::QueueAcquire,
        ApiKey::QueueSettle,
        ApiKey::DescribeQueue,
        ApiKey::ListQueues,
        ApiKey::DescribeReaders,
    ];

    /// Broker-to-broker APIs: served only on the internal listener, to authenticated peers.
    pub fn is_internal(self) -> bool {
        matches!(
            self,
            ApiKey::ReplicaFetch
                | ApiKey::ApplyTopic
                | ApiKey::ControllerRaft
                | ApiKey::BrokerHeartbeat
                | ApiKey::ControllerCommand
        )
    }

    /// The peer handshake of the internal listener (the only APIs before it completes, with
    /// `Versions`).
    pub fn is_peer_auth(self) -> bool {
        matches!(self, ApiKey::PeerAuthBegin | ApiKey::PeerAuthProve)
    }

    pub fn from_u16(value: u16) -> Option<ApiKey> {
        ApiKey::ALL.into_iter().find(|k| *k as u16 == value)
    }

    /// The versions this build speaks: (min, max). A body's layout is fixed per version; a
    /// change bumps it and, before 1.0, drops the old one (a client of another version gets
    /// `unsupported_version` from `Versions` at connect, never a misread body).
    /// - Produce 1: `ProducePartitionResponse::current_leader` (the leader a `not_leader`
    ///   refusal names).
    /// - Fetch 1: follower reads (reader id and rack, the read lease's leader epoch and
    ///   replica; the preferred read replica in the answer).
    /// - Fetch 2: `FetchPartition::avoid_replicas` (every follower that failed the consumer
    ///   recently; was one `avoid_replica`).
    /// - ReplicaFetch 1: `ReplicaFetchRequest::high_watermark` (what the follower knows).
    pub fn supported_versions(self) -> (u16, u16) {
        match self {
            ApiKey::Produce => (1, 1),
            ApiKey::Fetch => (2, 2),
            ApiKey::ReplicaFetch => (1, 1),
            _ => (0, 0),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ApiKey::Versions => "versions",
            ApiKey::Metadata => "metadata",
            ApiKey::CreateTopic => "create_topic",
            ApiKey::DeleteTopic => "delete_topic",
            ApiKey::DescribeTopic => "describe_topic",
            ApiKey::Produce => "produce",
            ApiKey::Fetch => "fetch",
            ApiKey::ListOffsets => "list_offsets",
            ApiKey::ReplicaFetch => "replica_fetch",
            ApiKey::ApplyTopic => "apply_topic",
            ApiKey::PeerAuthBegin => "peer_auth_begin",
            ApiKey::PeerAuthProve => "peer_auth_prove",
            ApiKey::ControllerRaft => "controller_raft",
            ApiKey::BrokerHeartbeat => "broker_heartbeat",
            ApiKey::ControllerCommand => "controller_command",
            ApiKey::ClusterStatus => "cluster_status",
            ApiKey::InitProducerId => "init_producer_id",
            ApiKey::GroupHeartbeat => "group_heartbeat",
            ApiKey::OffsetCommit => "offset_commit",
            ApiKey::OffsetFetch => "offset_fetch",
            ApiKey::DescribeGroup => "describe_group",
            ApiKey::ListGroups => "list_groups",
            ApiKey::DeleteGroup => "delete_group",
            ApiKey::CreateQueue => "create_queue",
            ApiKey::QueueAcquire => "queue_acquire",
            ApiKey::QueueSettle => "queue_settle",
            ApiKey::DescribeQueue => "describe_queue",
            ApiKey::ListQueues => "list_queues",
            ApiKey::DescribeReaders => "describe_readers",
        }
    }
}

/// Error codes carried in responses (per frame or per partition). Numbers are wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    None = 0,
    /// The server failed in a way it could not classify; see the message.
    Unknown = 1,
    CorruptFrame = 2,
    FrameTooLarge = 3,
    UnknownApi = 4,
    UnsupportedVersion = 5,
    InvalidRequest = 6,
    UnknownTopic = 7,
    UnknownPartition = 8,
    TopicAlreadyExists = 9,
    InvalidTopic = 10,
    InvalidConfig = 11,
    InvalidReplicationFactor = 12,
    InvalidBatch = 13,
    OffsetOutOfRange = 14,
    /// This broker does not lead the partition (the metadata names who does).
    NotLeader = 15,
    /// Too few in-sync replicas for the requested acks; nothing was appended.
    NotEnoughReplicas = 16,
    /// The acks were not reached in time; the outcome is unknown (retriable).
    RequestTimeout = 17,
    /// The partition has too many bytes awaiting flush; retry after a backoff.
    Backpressure = 18,
    /// The partition's log hit an I/O error and refuses writes until restart.
    StorageError = 19,
    /// The requested offsets are corrupt on this replica.
    CorruptData = 20,
    ShuttingDown = 21,
    /// The partition is being created or deleted; retry.
    PartitionUnavailable = 22,
    /// Appended, but the ISR shrank below what the acks need; the outcome is unknown.
    NotEnoughReplicasAfterAppend = 23,
    /// A replica fetch named another leader epoch than the leader's.
    FencedLeaderEpoch = 24,
    /// The follower's log diverges from the leader's; the response says where to truncate.
    DivergingLog = 25,
    /// Another broker of the cluster did not answer.
    BrokerUnavailable = 26,
    /// An inter-broker API was sent to a client listener; only the internal listener serves it.
    InternalApiRefused = 27,
    /// A peer of the internal listener did not prove the cluster secret.
    AuthenticationFailed = 28,
    /// The data directory's free space is below the guard: produce is refused, reads work.
    DiskFull = 29,
    /// A follower reported offsets the leader cannot accept (not on a batch boundary, durable
    /// above fetched, fetched above the leader's end).
    InvalidReplicaOffsets = 30,
    /// A named per-broker or per-partition limit was reached (waiters, topics, partitions,
    /// connections); the message names the limit.
    LimitReached = 31,
    /// This broker is not the controller leader (or no controller runs here); the answer names
    /// the leader when known. Retriable.
    NotController = 32,
    /// The broker's registration is stale: the controller fenced it. It re-registers with a new
    /// incarnation (a restart) before it may lead or join an ISR again.
    BrokerFenced = 33,
    /// An ISR change based on a partition epoch that is no longer the controller's (the
    /// partition changed meanwhile, perhaps by this very change, whose answer was lost).
    InvalidPartitionEpoch = 34,
    /// An ISR change adds a replica that may not join (fenced, shutting down, unknown).
    IneligibleReplica = 35,
    /// An idempotent producer's batch does not continue its sequence on this partition
    /// (a gap: an earlier batch was lost); nothing was appended.
    OutOfOrderSequence = 36,
    /// An idempotent producer's epoch is older than the partition has seen: another instance
    /// with the same producer id took over.
    InvalidProducerEpoch = 37,
    /// This broker (shard) is not the group's coordinator: refresh the metadata of the
    /// offsets topic and ask the leader of the group's partition.
    NotCoordinator = 38,
    /// The coordinator is loading the group's state (it just became the coordinator, or the
    /// offsets topic is being created): retry shortly.
    CoordinatorLoading = 39,
    /// The member is not in the group (its session expired, it left, or a static successor
    /// replaced it): drop its partitions and join again with epoch 0.
    UnknownMemberId = 40,
    /// The member's epoch is fenced: drop its partitions and join again with epoch 0.
    FencedMemberEpoch = 41,
    /// A commit from an older member epoch, or for a partition the member does not own:
    /// nothing was committed.
    StaleMemberEpoch = 42,
    /// The group is at its member limit.
    GroupFull = 43,
    /// The operation needs a group without members (delete, reset offsets).
    GroupNotEmpty = 44,
    UnknownGroup = 45,
    /// A settlement for a delivery that is no longer current (its lease expired and the
    /// record was reclaimed or delivered again, or it was settled already): nothing changed.
    StaleDelivery = 46,
    UnknownQueue = 47,
    QueueAlreadyExists = 48,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 49] = [
        ErrorCode::None,
        ErrorCode::Unknown,
        ErrorCode::CorruptFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnknownApi,
        ErrorCode::UnsupportedVersion,
        ErrorCode::InvalidRequest,
        ErrorCode::UnknownTopic,
        ErrorCode::UnknownPartition,
        ErrorCode::TopicAlreadyExists,
        ErrorCode::InvalidTopic,
        ErrorCode::InvalidConfig,
        ErrorCode::InvalidReplicationFactor,
        ErrorCode::InvalidBatch,
        ErrorCode::OffsetOutOfRange,
        ErrorCode::NotLeader,
        ErrorCode::NotEnoughReplicas,
        ErrorCode::RequestTimeout,
        ErrorCode::Backpressure,
        ErrorCode::StorageError,
        ErrorCode::CorruptData,
        ErrorCode::ShuttingDown,
        ErrorCode::PartitionUnavailable,
        ErrorCode::NotEnoughReplicasAfterAppend,
        ErrorCode::FencedLeaderEpoch,
        ErrorCode::DivergingLog,
        ErrorCode::BrokerUnavailable,
        ErrorCode::InternalApiRefused,
        ErrorCode::AuthenticationFailed,
        ErrorCode::DiskFull,
        ErrorCode::InvalidReplicaOffsets,
        ErrorCode::LimitReached,
        ErrorCode::NotController,
        ErrorCode::BrokerFenced,
        ErrorCode::InvalidPartitionEpoch,
        ErrorCode::IneligibleReplica,
        ErrorCode::OutOfOrderSequence,
        ErrorCode::InvalidProducerEpoch,
        ErrorCode::NotCoordinator,
        ErrorCode::CoordinatorLoading,
        ErrorCode::UnknownMemberId,
        ErrorCode::FencedMemberEpoch,
        ErrorCode::StaleMemberEpoch,
        ErrorCode::GroupFull,
        ErrorCode::GroupNotEmpty,
        ErrorCode::UnknownGroup,
        ErrorCode::StaleDelivery,
        ErrorCode::UnknownQueue,
        ErrorCode::QueueAlreadyExists,
    ];

    /// Unknown numbers (from a newer peer) map to `Unknown`.
    pub fn from_u16(value: u16) -> ErrorCode {
        ErrorCode::ALL
            .into_iter()
            .find(|c| *c as u16 == value)
            .unwrap_or(ErrorCode::Unknown)
    }

    /// Whether a client may retry the same request and expect it to succeed eventually.
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::NotLeader
                | ErrorCode::NotEnoughReplicas
                // An idempotent producer's batch sent behind one that must be retried: it
                // lands once the earlier one has (nothing was appended, so a retry is safe).
                | ErrorCode::OutOfOrderSequence
                | ErrorCode::RequestTimeout
                | ErrorCode::Backpressure
                | ErrorCode::ShuttingDown
                | ErrorCode::PartitionUnavailable
                | ErrorCode::NotEnoughReplicasAfterAppend
                | ErrorCode::FencedLeaderEpoch
                | ErrorCode::BrokerUnavailable
                | ErrorCode::DiskFull
                | ErrorCode::LimitReached
                | ErrorCode::NotController
                | ErrorCode::NotCoordinator
                | ErrorCode::CoordinatorLoading
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::None => "none",
            ErrorCode::Unknown => "unknown",
            ErrorCode::CorruptFrame => "corrupt_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnknownApi => "unknown_api",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnknownTopic => "unknown_topic",
            ErrorCode::UnknownPartition => "unknown_partition",
            ErrorCode::TopicAlreadyExists => "topic_already_exists",
            ErrorCode::InvalidTopic => "invalid_topic",
            ErrorCode::InvalidConfig => "invalid_config",
            ErrorCode::InvalidReplicationFactor => "invalid_replication_factor",
            ErrorCode::InvalidBatch => "invalid_batch",
            ErrorCode::OffsetOutOfRange => "offset_out_of_range",
            ErrorCode::NotLeader => "not_leader",
            ErrorCode::NotEnoughReplicas => "not_enough_replicas",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::Backpressure => "backpressure",
            ErrorCode::StorageError => "storage_error",
            ErrorCode::CorruptData => "corrupt_data",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::PartitionUnavailable => "partition_unavailable",
            ErrorCode::NotEnoughReplicasAfterAppend => "not_enough_replicas_after_append",
            ErrorCode::FencedLeaderEpoch => "fenced_leader_epoch",
            ErrorCode::DivergingLog => "diverging_log",
            ErrorCode::BrokerUnavailable => "broker_unavailable",
            ErrorCode::InternalApiRefused => "internal_api_refused",
            ErrorCode::AuthenticationFailed => "authentication_failed",
            ErrorCode::DiskFull => "disk_full",
            ErrorCode::InvalidReplicaOffsets => "invalid_replica_offsets",
            ErrorCode::LimitReached => "limit_reached",
            ErrorCode::NotController => "not_controller",
            ErrorCode::BrokerFenced => "broker_fenced",
            ErrorCode::InvalidPartitionEpoch => "invalid_partition_epoch",
            ErrorCode::IneligibleReplica => "ineligible_replica",
            ErrorCode::OutOfOrderSequence => "out_of_order_sequence",
            ErrorCode::InvalidProducerEpoch => "invalid_producer_epoch",
            ErrorCode::NotCoordinator => "not_coordinator",
            ErrorCode::CoordinatorLoading => "coordinator_loading",
            ErrorCode::UnknownMemberId => "unknown_member_id",
            ErrorCode::FencedMemberEpoch => "fenced_member_epoch",
            ErrorCode::StaleMemberEpoch => "stale_member_epoch",
            ErrorCode::GroupFull => "group_full",
            ErrorCode::GroupNotEmpty => "group_not_empty",
            ErrorCode::UnknownGroup => "unknown_group",
            ErrorCode::StaleDelivery => "stale_delivery",
            ErrorCode::UnknownQueue => "unknown_queue",
            ErrorCode::QueueAlreadyExists => "queue_already_exists",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why bytes are not a valid frame. `Fatal` errors lose the framing: the connection must close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame header CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderCrc { stored: u32, computed: u32 },
    #[error("frame of {frame_bytes} bytes exceeds the limit of {limit_bytes}")]
    TooLarge {
        frame_bytes: usize,
        limit_bytes: usize,
    },
    #[error("frame lengths are inconsistent: {0}")]
    BadLengths(String),
    #[error("frame body CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BodyCrc { stored: u32, computed: u32 },
    #[error("connection closed after {received_bytes} of {expected_bytes} frame bytes")]
    Truncated {
        received_bytes: usize,
        expected_bytes: usize,
    },
    #[error("I/O error: {0}")]
    Io(String),
}

impl FrameError {
    /// Whether the stream position is still trustworthy after this error (the next frame can
    /// be read). Only a body CRC mismatch under a valid header keeps the framing.
    pub fn keeps_framing(&self) -> bool {
        matches!(self, FrameError::BodyCrc { .. })
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            _ => ErrorCode::CorruptFrame,
        }
    }
}

/// A body that does not decode as the type its api key and version promise.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what} body: {detail}")]
pub struct BodyError {
    pub what: &'static str,
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub frame_bytes: u32,
    pub api_key: u16,
    pub api_version: u16,
    pub correlation_id: u32,
    pub flags: u16,
    pub error_code: u16,
    pub body_bytes: u32,
    pub payload_bytes: u32,
    pub body_crc: u32,
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Bytes of a body once padded for the payload's alignment.
pub fn padded_body_bytes(body_bytes: usize) -> usize {
    body_bytes.next_multiple_of(FRAME_ALIGNMENT_BYTES)
}

impl FrameHeader {
    pub fn is_response(&self) -> bool {
        self.flags & FLAG_RESPONSE != 0
    }

    pub fn api(&self) -> Option<ApiKey> {
        ApiKey::from_u16(self.api_key)
    }

    pub fn error(&self) -> ErrorCode {
        ErrorCode::from_u16(self.error_code)
    }

    /// The fields, unchecked. Only for a header whose CRC matched (to answer a frame that
    /// breaks a limit with its own correlation id).
    pub fn parse(bytes: &[u8; FRAME_HEADER_BYTES]) -> FrameHeader {
        FrameHeader {
            frame_bytes: u32_at(bytes, 0),
            api_key: u16_at(bytes, 4),
            api_version: u16_at(bytes, 6),
            correlation_id: u32_at(bytes, 8),
            flags: u16_at(bytes, 12),
            error_code: u16_at(bytes, 14),
            body_bytes: u32_at(bytes, 16),
            payload_bytes: u32_at(bytes, 20),
            body_crc: u32_at(bytes, 24),
        }
    }

    /// Decodes and checks a header: CRC first, then lengths against `frame_bytes_max` — all
    /// before the caller allocates anything for the rest of the frame.
    pub fn decode(
        bytes: &[u8; FRAME_HEADER_BYTES],
        frame_bytes_max: usize,
    ) -> Result<FrameHeader, FrameError> {
        let stored = u32_at(bytes, 28);
        let computed = crc32c::crc32c(&bytes[..28]);
        if stored != computed {
            return Err(FrameError::HeaderCrc { stored, computed });
        }
        let header = FrameHeader::parse(bytes);
        let frame_bytes = header.frame_bytes as usize;
        if frame_bytes > frame_bytes_max {
            return Err(FrameError::TooLarge {
                frame_bytes,
                limit_bytes: frame_bytes_max,
            });
        }
        if header.body_bytes as usize > BODY_BYTES_MAX {
            return Err(FrameError::BadLengths(format!(
                "body of {} bytes exceeds {BODY_BYTES_MAX}",
                header.body_bytes
            )));
        }
        let expected = FRAME_HEADER_BYTES
            + padded_body_bytes(header.body_bytes as usize)
            + header.payload_bytes as usize;
        if expected != frame_bytes {
            return Err(FrameError::BadLengths(format!(
                "frame_bytes {frame_bytes} but header, body ({}) and payload ({}) make {expected}",
                header.body_bytes, header.payload_bytes
            )));
        }
        Ok(header)
    }

    pub fn encode(&self) -> [u8; FRAME_HEADER_BYTES] {
        let mut bytes = [0u8; FRAME_HEADER_BYTES];
        bytes[0..4].copy_from_slice(&self.frame_bytes.to_le_bytes());
        bytes[4..6].copy_from_slice(&self.api_key.to_le_bytes());
        bytes[6..8].copy_from_slice(&self.api_version.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.correlation_id.to_le_bytes());
        bytes[12..14].copy_from_slice(&self.flags.to_le_bytes());
        bytes[14..16].copy_from_slice(&self.error_code.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.body_bytes.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.payload_bytes.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.body_crc.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[..28]);
        bytes[28..32].copy_from_slice(&crc.to_le_bytes());
        bytes
    }
}

/// One received frame, header checked and body CRC verified. The buffer is 16-aligned.
pub struct Frame {
    pub header: FrameHeader,
    pub bytes: FrameBuf,
}

impl Frame {
    pub fn body(&self) -> &[u8] {
        &self.bytes[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + self.header.body_bytes as usize]
    }

    fn payload_start(&self) -> usize {
        FRAME_HEADER_BYTES + padded_body_bytes(self.header.body_bytes as usize)
    }

    pub fn payload(&self) -> &[u8] {
        &self.bytes[self.payload_start()..]
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = self.payload_start();
        &mut self.bytes[start..]
    }

    /// Decodes the body as `T`, validating the archive (never trusts the bytes).
    pub fn decode_body<T: Message>(&self) -> Result<T, BodyError> {
        decode_body(self.body())
    }
}

/// An rkyv-archived message body (implemented for every message type in [`messages`]).
/// The internal topic holding every consumer group's state and committed offsets.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// The internal topic holding every queue group's state (leases, acks, delivery counts).
pub const QUEUE_STATE_TOPIC: &str = "__queue_state";

/// Longest `FetchRequest::reader_id` and `rack` a broker accepts.
pub const READER_ID_BYTES_MAX: usize = 255;
pub const RACK_BYTES_MAX: usize = 64;
/// Most followers one fetch partition may ask the leader to avoid (more than any replication
/// factor a cluster of this size uses; a longer list is refused, not truncated).
pub const AVOID_REPLICAS_MAX: usize = 8;

/// Topics whose names start with `__` belong to the brokers (the offsets topic): clients may
/// read them but not create, delete or write them.
pub fn is_internal_topic(name: &str) -> bool {
    name.starts_with("__")
}

/// The partition of the offsets topic whose leader coordinates `group`.
pub fn group_partition(group: &str, partitions: u32) -> u32 {
    crc32c::crc32c(group.as_bytes()) % partitions.max(1)
}

pub trait Message: Sized {
    const WHAT: &'static str;
    /// Appends the archived form to `buffer`.
    fn archive_into(&self, buffer: FrameBuf) -> Result<FrameBuf, rancor::Error>;
    /// Validates and deserializes a 16-aligned archived body.
    fn from_archived(bytes: &[u8]) -> Result<Self, rancor::Error>;
}

pub fn decode_body<T: Message>(body: &[u8]) -> Result<T, BodyError> {
    let error = |e: rancor::Error| BodyError {
        what: T::WHAT,
        detail: e.to_string(),
    };
    if body.as_ptr().align_offset(FRAME_ALIGNMENT_BYTES) != 0 {
        // Frames read by `read_frame` are aligned; copy anything else.
        let mut aligned = FrameBuf::with_capacity(body.len());
        aligned.extend_from_slice(body);
        return T::from_archived(&aligned).map_err(error);
    }
    T::from_archived(body).map_err(error)
}

/// What goes in an outgoing frame's header besides the lengths and CRCs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameKind {
    pub api_key: u16,
    pub api_version: u16,
    pub correlation_id: u32,
    pub flags: u16,
    pub error_code: u16,
}

impl FrameKind {
    pub fn request(api: ApiKey, correlation_id: u32) -> FrameKind {
        FrameKind {
            api_key: api as u16,
            api_version: api.supported_versions().1,
            correlation_id,
            flags: 0,
            error_code: 0,
        }
    }

    pub fn response(request: &FrameHeader, error: ErrorCode) -> FrameKind {
        FrameKind {
            api_key: request.api_key,
            api_version: request.api_version,
            correlation_id: request.correlation_id,
            flags: FLAG_RESPONSE,
            error_code: error as u16,
        }
    }
}

/// Encodes header, body and padding. The payload slices are not copied: the caller writes them
/// right after the returned bytes. They are not covered by the frame's CRC: payloads are whole
/// record batches, each with its own header and body CRC, which the receiver checks (one CRC
/// pass per byte instead of two).
pub fn encode_frame<T: Message>(
    kind: FrameKind,
    body: &T,
    payload: &[&[u8]],
) -> Result<FrameBuf, BodyError> {
    let mut buffer = FrameBuf::with_capacity(256);
    buffer.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    let mut buffer = body.archive_into(buffer).map_err(|e| BodyError {
        what: T::WHAT,
        detail: e.to_string(),
    })?;
    let body_bytes = buffer.len() - FRAME_HEADER_BYTES;
    if body_bytes > BODY_BYTES_MAX {
        return Err(BodyError {
            what: T::WHAT,
            detail: format!("body of {body_bytes} bytes exceeds {BODY_BYTES_MAX}"),
        });
    }
    buffer.resize(FRAME_HEADER_BYTES + padded_body_bytes(body_bytes), 0);
    let payload_bytes: usize = payload.iter().map(|p| p.len()).sum();
    let crc = crc32c::crc32c(&buffer[FRAME_HEADER_BYTES..]);
    let frame_bytes = buffer.len() + payload_bytes;
    let header = FrameHeader {
        frame_bytes: u32::try_from(frame_bytes).map_err(|_| BodyError {
            what: T::WHAT,
            detail: format!("frame of {frame_bytes} bytes does not fit the length field"),
        })?,
        api_key: kind.api_key,
        api_version: kind.api_version,
        correlation_id: kind.correlation_id,
        flags: kind.flags,
        error_code: kind.error_code,
        body_bytes: body_bytes as u32,
        payload_bytes: payload_bytes as u32,
        body_crc: crc,
    };
    buffer[..FRAME_HEADER_BYTES].copy_from_slice(&header.encode());
    Ok(buffer)
}

/// What a frame read failed with: the header when it was trustworthy, and why.
pub type FrameReadError = (Option<FrameHeader>, FrameError);

/// Reads one frame. `Ok(None)` on a clean end of stream between frames. The header is checked
/// (CRC, lengths, `frame_bytes_max`) before the rest is allocated and read; the body CRC is
/// checked after. On [`FrameError::BodyCrc`] the whole frame was consumed and the header is
/// returned with the error so the caller can answer it.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    frame_bytes_max: usize,
) -> Result<Option<Frame>, FrameReadError> {
    let Some((header, header_bytes)) = read_frame_header(reader, frame_bytes_max).await? else {
        return Ok(None);
    };
    let frame_bytes = header.frame_bytes as usize;
    let mut bytes = FrameBuf::with_capacity(frame_bytes);
    bytes.extend_from_slice(&header_bytes);
    bytes.resize(frame_bytes, 0);
    read_frame_bytes(reader, &header, &mut bytes, FRAME_HEADER_BYTES).await?;
    finish_frame(header, bytes).map(Some)
}

/// Reads and checks a frame header (CRC, lengths, `frame_bytes_max`). `Ok(None)` on a clean
/// end of stream. Nothing of the body is read, so a server can decide whether it has room
/// for the frame before reading it.
pub async fn read_frame_header<R: AsyncRead + Unpin>(
    reader: &mut R,
    frame_bytes_max: usize,
) -> Result<Option<(FrameHeader, [u8; FRAME_HEADER_BYTES])>, FrameReadError> {
    let mut header_bytes = [0u8; FRAME_HEADER_BYTES];
    let mut filled = 0;
    while filled < FRAME_HEADER_BYTES {
        let n = reader
            .read(&mut header_bytes[filled..])
            .await
            .map_err(|e| (None, FrameError::Io(e.to_string())))?;
        if n == 0 {
            if filled == 0 {
                return Ok(None);
            }
            return Err((
                None,
                FrameError::Truncated {
                    received_bytes: filled,
                    expected_bytes: FRAME_HEADER_BYTES,
                },
            ));
        }
        filled += n;
    }
    let header = FrameHeader::decode(&header_bytes, frame_bytes_max).map_err(|e| {
        // With a good header CRC the correlation id is trustworthy even if a limit is broken.
        let trusted = !matches!(e, FrameError::HeaderCrc { .. });
        (trusted.then(|| FrameHeader::parse(&header_bytes)), e)
    })?;
    Ok(Some((header, header_bytes)))
}

/// Fills `bytes[filled..]` (sized to the whole frame by the caller) from `reader`.
pub async fn read_frame_bytes<R: AsyncRead + Unpin>(
    reader: &mut R,
    header: &FrameHeader,
    bytes: &mut [u8],
    mut filled: usize,
) -> Result<(), FrameReadError> {
    let frame_bytes = bytes.len();
    while filled < frame_bytes {
        let n = reader
            .read(&mut bytes[filled..])
            .await
            .map_err(|e| (Some(*header), FrameError::Io(e.to_string())))?;
        if n == 0 {
            return Err((
                Some(*header),
                FrameError::Truncated {
                    received_bytes: filled,
                    expected_bytes: frame_bytes,
                },
            ));
        }
        filled += n;
    }
    Ok(())
}

/// Checks the body CRC of a whole frame (header included in `bytes`).
pub fn finish_frame(header: FrameHeader, bytes: FrameBuf) -> Result<Frame, FrameReadError> {
    assert_eq!(bytes.len(), header.frame_bytes as usize, "frame not whole");
    let body_end = FRAME_HEADER_BYTES + padded_body_bytes(header.body_bytes as usize);
    let computed = crc32c::crc32c(&bytes[FRAME_HEADER_BYTES..body_end]);
    if computed != header.body_crc {
        return Err((
            Some(header),
            FrameError::BodyCrc {
                stored: header.body_crc,
                computed,
            },
        ));
    }
    Ok(Frame { header, bytes })
}

/// The byte range of each partition's batches in a produce payload, from the lengths the body
/// declares; an error unless they cover the payload exactly.
pub fn payload_ranges(
    payload_bytes: usize,
    lengths: impl Iterator<Item = usize>,
) -> Result<Vec<std::ops::Range<usize>>, String> {
    let mut ranges = Vec::new();
    let mut at = 0usize;
    for length in lengths {
        let end = at
            .checked_add(length)
            .filter(|end| *end <= payload_bytes)
            .ok_or_else(|| {
                format!("declared partition bytes exceed the {payload_bytes}-byte payload")
            })?;
        ranges.push(at..end);
        at = end;
    }
    if at != payload_bytes {
        return Err(format!(
            "payload has {payload_bytes} bytes but partitions declare {at}"
        ));
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests;
