//! Target `request_bodies`: every rkyv message body of the protocol, requests and the responses
//! a client decodes, through `decode_body::<T>()`, plus `payload_ranges` on the lengths a
//! produce request or fetch response declares.
//!
//! One target for all 55 body types, not one per type: one build, one corpus and one time slot in
//! CI instead of nineteen, and libFuzzer's coverage feedback still tells the types apart (they are
//! different code). The corpus holds a valid body of every type.
//!
//! Input: `[selector u8][payload_bytes u32 le][body ...]`. `selector % BODY_TYPES` picks the
//! type; bit 7 also decodes from a misaligned copy (the copying path of `decode_body`).
//!
//! Invariants beyond "no panic":
//! - the aligned (in place) and misaligned (copying) paths agree;
//! - a body that decodes re-encodes, reads back through `read_frame` and decodes to an equal
//!   value, and encoding that value again gives the same bytes (the encoding is canonical);
//! - `payload_ranges` succeeds exactly when the declared lengths add up to the payload, and then
//!   returns contiguous ranges covering it, one per partition.

use std::fmt::Debug;

use futures_lite::future::block_on;

use crate::le_u32;
use crate::protocol::*;

/// The body types, in selector order. Requests first (the server decodes them), then responses
/// (the client decodes them), then the error body of any failed response.
pub const BODY_TYPES: [&str; 55] = [
    "VersionsRequest",
    "MetadataRequest",
    "CreateTopicRequest",
    "DeleteTopicRequest",
    "DescribeTopicRequest",
    "ProduceRequest",
    "FetchRequest",
    "ListOffsetsRequest",
    "ReplicaFetchRequest",
    "ApplyTopicRequest",
    "VersionsResponse",
    "MetadataResponse",
    "TopicResult",
    "DescribeTopicResponse",
    "ProduceResponse",
    "FetchResponse",
    "ListOffsetsResponse",
    "ReplicaFetchResponse",
    "ErrorBody",
    "PeerAuthBeginRequest",
    "PeerAuthProveRequest",
    "PeerAuthBeginResponse",
    "ControllerRaftRequest",
    "ControllerRaftResponse",
    "BrokerHeartbeatRequest",
    "BrokerHeartbeatResponse",
    "ControllerCommandRequest",
    "ControllerCommandResponse",
    "ClusterStatusRequest",
    "ClusterStatusResponse",
    "InitProducerIdRequest",
    "InitProducerIdResponse",
    "GroupHeartbeatRequest",
    "GroupHeartbeatResponse",
    "OffsetCommitRequest",
    "GroupResult",
    "OffsetFetchRequest",
    "OffsetFetchResponse",
    "DescribeGroupRequest",
    "DescribeGroupResponse",
    "ListGroupsRequest",
    "ListGroupsResponse",
    "DeleteGroupRequest",
    "StoredGroupRecord",
    "CreateQueueRequest",
    "QueueAcquireRequest",
    "QueueAcquireResponse",
    "QueueSettleRequest",
    "QueueSettleResponse",
    "DescribeQueueRequest",
    "DescribeQueueResponse",
    "ListQueuesRequest",
    "ListQueuesResponse",
    "DescribeReadersRequest",
    "DescribeReadersResponse",
];

/// Frame-size limit for the re-encoded frames (bodies are at most `BODY_BYTES_MAX`).
const FRAME_BYTES_MAX: usize = BODY_BYTES_MAX + 2 * FRAME_HEADER_BYTES;

pub fn run(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let payload_bytes = le_u32(rest, 0) as usize;
    let body = rest.get(4..).unwrap_or(&[]);
    let index = usize::from(selector) % BODY_TYPES.len();
    let misaligned_too = selector & 0x80 != 0;
    check_selected(index, body, payload_bytes, misaligned_too);
}

/// Decodes `body` as the type at `index` of [`BODY_TYPES`] and checks it.
pub fn check_selected(index: usize, body: &[u8], payload_bytes: usize, misaligned_too: bool) {
    let c = Checks {
        body,
        misaligned_too,
    };
    match index {
        0 => drop(c.check::<VersionsRequest>()),
        1 => drop(c.check::<MetadataRequest>()),
        2 => drop(c.check::<CreateTopicRequest>()),
        3 => drop(c.check::<DeleteTopicRequest>()),
        4 => drop(c.check::<DescribeTopicRequest>()),
        5 => {
            if let Some(request) = c.check::<ProduceRequest>() {
                let lengths = request.partitions.iter().map(|p| p.batch_bytes as usize);
                check_payload_ranges(payload_bytes, lengths);
            }
        }
        6 => drop(c.check::<FetchRequest>()),
        7 => drop(c.check::<ListOffsetsRequest>()),
        8 => drop(c.check::<ReplicaFetchRequest>()),
        9 => drop(c.check::<ApplyTopicRequest>()),
        10 => drop(c.check::<VersionsResponse>()),
        11 => drop(c.check::<MetadataResponse>()),
        12 => drop(c.check::<TopicResult>()),
        13 => drop(c.check::<DescribeTopicResponse>()),
        14 => drop(c.check::<ProduceResponse>()),
        15 => {
            if let Some(response) = c.check::<FetchResponse>() {
                let lengths = response.partitions.iter().map(|p| p.batch_bytes as usize);
                check_payload_ranges(payload_bytes, lengths);
            }
        }
        16 => drop(c.check::<ListOffsetsResponse>()),
        17 => drop(c.check::<ReplicaFetchResponse>()),
        18 => drop(c.check::<ErrorBody>()),
        19 => drop(c.check::<PeerAuthBeginRequest>()),
        20 => drop(c.check::<PeerAuthProveRequest>()),
        21 => drop(c.check::<PeerAuthBeginResponse>()),
        22 => drop(c.check::<ControllerRaftRequest>()),
        23 => drop(c.check::<ControllerRaftResponse>()),
        24 => drop(c.check::<BrokerHeartbeatRequest>()),
        25 => drop(c.check::<BrokerHeartbeatResponse>()),
        26 => drop(c.check::<ControllerCommandRequest>()),
        27 => drop(c.check::<ControllerCommandResponse>()),
        28 => drop(c.check::<ClusterStatusRequest>()),
        29 => drop(c.check::<ClusterStatusResponse>()),
        30 => drop(c.check::<InitProducerIdRequest>()),
        31 => drop(c.check::<InitProducerIdResponse>()),
        32 => drop(c.check::<GroupHeartbeatRequest>()),
        33 => drop(c.check::<GroupHeartbeatResponse>()),
        34 => drop(c.check::<OffsetCommitRequest>()),
        35 => drop(c.check::<GroupResult>()),
        36 => drop(c.check::<OffsetFetchRequest>()),
        37 => drop(c.check::<OffsetFetchResponse>()),
        38 => drop(c.check::<DescribeGroupRequest>()),
        39 => drop(c.check::<DescribeGroupResponse>()),
        40 => drop(c.check::<ListGroupsRequest>()),
        41 => drop(c.check::<ListGroupsResponse>()),
        42 => drop(c.check::<DeleteGroupRequest>()),
        // Not a request body: the value of an offsets-topic record, decoded when a new
        // coordinator replays its partition.
        43 => drop(c.check::<StoredGroupRecord>()),
        44 => drop(c.check::<CreateQueueRequest>()),
        45 => drop(c.check::<QueueAcquireRequest>()),
        46 => drop(c.check::<QueueAcquireResponse>()),
        47 => drop(c.check::<QueueSettleRequest>()),
        48 => drop(c.check::<QueueSettleResponse>()),
        49 => drop(c.check::<DescribeQueueRequest>()),
        50 => drop(c.check::<DescribeQueueResponse>()),
        51 => drop(c.check::<ListQueuesRequest>()),
        52 => drop(c.check::<ListQueuesResponse>()),
        53 => drop(c.check::<DescribeReadersRequest>()),
        54 => drop(c.check::<DescribeReadersResponse>()),
        _ => unreachable!("index < BODY_TYPES.len()"),
    }
}

/// The body type a frame carries, from its header, as an index into [`BODY_TYPES`]; `None` for
/// an unknown api key.
pub fn body_type_of(header: &FrameHeader) -> Option<usize> {
    let api = header.api()?;
    if header.is_response() && header.error() != ErrorCode::None {
        return Some(18);
    }
    // APIs added later fall to `_` (no body type here yet) instead of breaking this build.
    #[allow(unreachable_patterns)]
    let (request, response) = match api {
        ApiKey::Versions => (0, 10),
        ApiKey::Metadata => (1, 11),
        ApiKey::CreateTopic => (2, 12),
        ApiKey::DeleteTopic => (3, 12),
        ApiKey::DescribeTopic => (4, 13),
        ApiKey::Produce => (5, 14),
        ApiKey::Fetch => (6, 15),
        ApiKey::ListOffsets => (7, 16),
        ApiKey::ReplicaFetch => (8, 17),
        ApiKey::ApplyTopic => (9, 12),
        ApiKey::PeerAuthBegin => (19, 21),
        ApiKey::PeerAuthProve => (20, 12),
        ApiKey::ControllerRaft => (22, 23),
        ApiKey::BrokerHeartbeat => (24, 25),
        ApiKey::ControllerCommand => (26, 27),
        ApiKey::ClusterStatus => (28, 29),
        ApiKey::InitProducerId => (30, 31),
        ApiKey::GroupHeartbeat => (32, 33),
        ApiKey::OffsetCommit => (34, 35),
        ApiKey::OffsetFetch => (36, 37),
        ApiKey::DescribeGroup => (38, 39),
        ApiKey::ListGroups => (40, 41),
        ApiKey::DeleteGroup => (42, 35),
        ApiKey::CreateQueue => (44, 35),
        ApiKey::QueueAcquire => (45, 46),
        ApiKey::QueueSettle => (47, 48),
        ApiKey::DescribeQueue => (49, 50),
        ApiKey::ListQueues => (51, 52),
        ApiKey::DescribeReaders => (53, 54),
        _ => return None,
    };
    Some(if header.is_response() {
        response
    } else {
        request
    })
}

struct Checks<'a> {
    body: &'a [u8],
    misaligned_too: bool,
}

impl Checks<'_> {
    /// Decodes the body as `T` (from a 16-aligned copy, as `read_frame` delivers it) and, when
    /// it decodes, checks the round trip. Returns the value.
    fn check<T: Message + PartialEq + Debug>(&self) -> Option<T> {
        let mut aligned = FrameBuf::with_capacity(self.body.len());
        aligned.extend_from_slice(self.body);
        let decoded = decode_body::<T>(&aligned);
        if self.misaligned_too {
            let mut shifted = FrameBuf::with_capacity(self.body.len() + 1);
            shifted.push(0);
            shifted.extend_from_slice(self.body);
            let copied = decode_body::<T>(&shifted[1..]);
            assert_eq!(
                decoded.as_ref().ok(),
                copied.as_ref().ok(),
                "aligned and copying decodes of a {} disagree",
                T::WHAT
            );
        }
        let value = decoded.ok()?;
        round_trip(&value);
        Some(value)
    }
}

/// Encodes `value` in a frame, reads the frame back and decodes it: it must be equal, and its
/// encoding must be the same bytes.
pub fn round_trip<T: Message + PartialEq + Debug>(value: &T) {
    let kind = FrameKind::request(ApiKey::Versions, 1);
    let frame = match encode_frame(kind, value, &[]) {
        Ok(frame) => frame,
        // A body just under the limit may archive a little larger; nothing else may fail.
        Err(error) => {
            assert!(
                error.detail.contains("exceeds"),
                "a decoded {} does not re-encode: {error}",
                T::WHAT
            );
            return;
        }
    };
    let mut reader = futures_lite::io::Cursor::new(&frame[..]);
    let read = block_on(read_frame(&mut reader, FRAME_BYTES_MAX))
        .unwrap_or_else(|(_, e)| panic!("an encoded {} frame does not read: {e}", T::WHAT))
        .expect("one frame");
    assert_eq!(read.bytes.len(), frame.len());
    let again: T = read
        .decode_body()
        .unwrap_or_else(|e| panic!("a re-encoded {} does not decode: {e}", T::WHAT));
    assert_eq!(&again, value, "{} changed in a round trip", T::WHAT);
    let frame_again = encode_frame(kind, &again, &[]).expect("encoded once already");
    assert_eq!(
        &frame_again[..],
        &frame[..],
        "{} encodes to different bytes",
        T::WHAT
    );
}

/// `payload_ranges` against its specification: an error unless the lengths add up to the
/// payload exactly; then contiguous ranges from 0 to the payload's end.
pub fn check_payload_ranges(payload_bytes: usize, lengths: impl Iterator<Item = usize> + Clone) {
    let declared: u128 = lengths.clone().map(|l| l as u128).sum();
    let count = lengths.clone().count();
    match payload_ranges(payload_bytes, lengths) {
        Ok(ranges) => {
            assert_eq!(
                declared, payload_bytes as u128,
                "ranges accepted a mismatch"
            );
            assert_eq!(ranges.len(), count);
            let mut at = 0;
            for range in &ranges {
                assert_eq!(range.start, at, "ranges are contiguous");
                assert!(range.start <= range.end);
                at = range.end;
            }
            assert_eq!(at, payload_bytes, "ranges cover the payload");
        }
        Err(_) => assert_ne!(declared, payload_bytes as u128, "ranges refused a match"),
    }
}
