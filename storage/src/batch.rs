//! The record batch: Wharf's one record format, on the wire, on disk and in memory.
//!
//! ```text
//!  0      4      6      8        12       16             24      28      32      36   38   40
//!  +------+------+------+--------+--------+--------------+-------+-------+-------+----+----+
//!  |magic |ver   |attrs |hdr crc |body crc| base offset  |count  |last Δ |epoch  |pep |rsv |
//!  +------+------+------+--------+--------+--------------+-------+-------+-------+----+----+
//!  40             48      52      56             64             72             80
//!  +--------------+-------+-------+--------------+--------------+--------------+
//!  | producer id  |base   |body   | first        | max          | reserved (0) |
//!  |              |seq    |bytes  | timestamp ms | timestamp ms |              |
//!  +--------------+-------+-------+--------------+--------------+--------------+
//!  80                                     80 + body_bytes        align16
//!  +--------------------------------------+----------------------+
//!  | rkyv archive of BatchBody (records)  | zero padding to 16   |
//!  +--------------------------------------+----------------------+
//! ```
//!
//! All integers are little-endian. The header is 80 bytes, a multiple of 16, and every batch is
//! padded to a multiple of 16, so when a batch starts 16-aligned (a segment page, a DMA buffer,
//! an [`AlignedVec`]) its body is 16-aligned too and rkyv's validated access works in place.
//! The rkyv format is pinned in the workspace (`little_endian`, `pointer_width_32`, `aligned`)
//! and asserted below: it is part of the on-disk and on-wire format.
//!
//! The header CRC32C covers bytes 12..80 (everything after itself); the body CRC32C covers the
//! body bytes. The leader assigns base offset and leader epoch by rewriting the header and its
//! CRC only ([`stamp`]): the body a producer encoded is never re-encoded.

use rkyv::munge::munge;
use rkyv::rancor;
use rkyv::ser::{Allocator, Writer};
use rkyv::util::AlignedVec;
use rkyv::vec::{ArchivedVec, VecResolver};
use rkyv::{Archive, Place};

use crate::ids::{Epoch, Offset, ProducerId};

/// "WHRF" in little-endian.
pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"WHRF");
pub const BATCH_FORMAT_VERSION: u16 = 1;
pub const BATCH_HEADER_BYTES: usize = 80;
/// Batches start and end on this boundary so rkyv bodies stay aligned end to end.
pub const BATCH_ALIGNMENT_BYTES: usize = 16;
/// The largest batch (header + body + padding) Wharf accepts anywhere.
pub const BATCH_BYTES_MAX: usize = 8 * 1024 * 1024;
/// A batch holds at most this many records (bounds validation work per batch).
pub const BATCH_RECORDS_MAX: usize = 1 << 20;
/// `base_sequence` of a producer that does not use idempotence.
pub const SEQUENCE_NONE: u32 = u32::MAX;

const _: () = assert!(BATCH_HEADER_BYTES.is_multiple_of(BATCH_ALIGNMENT_BYTES));
const _: () = assert!(BATCH_BYTES_MAX.is_multiple_of(BATCH_ALIGNMENT_BYTES));
const _: () = assert!(BATCH_BYTES_MAX <= u32::MAX as usize);
// The body is only accessed in place if its archived types need no more than the batch alignment.
const _: () = assert!(std::mem::align_of::<ArchivedBatchBody>() <= BATCH_ALIGNMENT_BYTES);
const _: () = assert!(std::mem::align_of::<ArchivedRecord>() <= BATCH_ALIGNMENT_BYTES);
// Pin the rkyv format: 32-bit relative pointers and lengths (pointer_width_32).
const _: () = assert!(std::mem::size_of::<rkyv::Archived<usize>>() == 4);

// Field positions in the header.
const AT_MAGIC: usize = 0;
const AT_VERSION: usize = 4;
const AT_ATTRIBUTES: usize = 6;
const AT_HEADER_CRC: usize = 8;
const AT_BODY_CRC: usize = 12;
const AT_BASE_OFFSET: usize = 16;
const AT_RECORD_COUNT: usize = 24;
const AT_LAST_OFFSET_DELTA: usize = 28;
const AT_LEADER_EPOCH: usize = 32;
const AT_PRODUCER_EPOCH: usize = 36;
const AT_RESERVED_A: usize = 38;
const AT_PRODUCER_ID: usize = 40;
const AT_BASE_SEQUENCE: usize = 48;
const AT_BODY_BYTES: usize = 52;
const AT_FIRST_TIMESTAMP: usize = 56;
const AT_MAX_TIMESTAMP: usize = 64;
const AT_RESERVED_B: usize = 72;
const _: () = assert!(AT_RESERVED_B + 8 == BATCH_HEADER_BYTES);
/// The header CRC covers everything after the CRC field itself.
const HEADER_CRC_FROM: usize = AT_HEADER_CRC + 4;

/// One record as a producer builds it.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Milliseconds relative to the batch's first timestamp (may be negative).
    pub timestamp_delta_ms: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<RecordHeader>,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub key: String,
    pub value: Vec<u8>,
}

/// The archived body of a batch. A struct (not a bare vector) so fields can be added in a new
/// format version.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BatchBody {
    pub records: Vec<Record>,
}

/// A borrowed slice, archived the way a `Vec` is ([`ArchivedVec`]), so the builder can encode
/// records straight from its one buffer (see [`RecordRef`]).
struct SliceRef<'a, T>(&'a [T]);

impl<T: Archive> Archive for SliceRef<'_, T> {
    type Archived = ArchivedVec<T::Archived>;
    type Resolver = VecResolver;

    fn resolve(&self, resolver: Self::Resolver, out: Place<Self::Archived>) {
        ArchivedVec::resolve_from_slice(self.0, resolver, out);
    }
}

impl<T, S> rkyv::Serialize<S> for SliceRef<'_, T>
where
    T: rkyv::Serialize<S>,
    S: rancor::Fallible + Allocator + Writer + ?Sized,
{
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        ArchivedVec::<T::Archived>::serialize_from_slice(self.0, serializer)
    }
}

/// A [`Record`] over borrowed bytes, archived as [`ArchivedRecord`]: the same bytes the owned
/// record encodes to (tested), without an allocation per record. Fields are serialized in the
/// order the derive for `Record` uses.
struct RecordRef<'a> {
    timestamp_delta_ms: i64,
    key: Option<SliceRef<'a, u8>>,
    value: SliceRef<'a, u8>,
    headers: SliceRef<'a, RecordHeader>,
}

struct RecordRefResolver {
    key: Option<VecResolver>,
    value: VecResolver,
    headers: VecResolver,
}

impl Archive for RecordRef<'_> {
    type Archived = ArchivedRecord;
    type Resolver = RecordRefResolver;

    fn resolve(&self, resolver: Self::Resolver, out: Place<Self::Archived>) {
        // The pattern names every field: a field added to `Record` stops this compiling.
        munge!(let ArchivedRecord { timestamp_delta_ms, key, value, headers } = out);
        self.timestamp_delta_ms.resolve((), timestamp_delta_ms);
        self.key.resolve(resolver.key, key);
        self.value.resolve(resolver.value, value);
        self.headers.resolve(resolver.headers, headers);
    }
}

impl<S> rkyv::Serialize<S> for RecordRef<'_>
where
    S: rancor::Fallible + Allocator + Writer + ?Sized,
    RecordHeader: rkyv::Serialize<S>,
{
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        Ok(RecordRefResolver {
            key: self.key.serialize(serializer)?,
            value: self.value.serialize(serializer)?,
            headers: self.headers.serialize(serializer)?,
        })
    }
}

/// A [`BatchBody`] over [`RecordRef`]s, archived as [`ArchivedBatchBody`].
struct BatchBodyRef<'a> {
    records: SliceRef<'a, RecordRef<'a>>,
}

impl Archive for BatchBodyRef<'_> {
    type Archived = ArchivedBatchBody;
    type Resolver = VecResolver;

    fn resolve(&self, resolver: Self::Resolver, out: Place<Self::Archived>) {
        munge!(let ArchivedBatchBody { records } = out);
        self.records.resolve(resolver, records);
    }
}

impl<S> rkyv::Serialize<S> for BatchBodyRef<'_>
where
    S: rancor::Fallible + Allocator + Writer + ?Sized,
    RecordHeader: rkyv::Serialize<S>,
{
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        self.records.serialize(serializer)
    }
}

/// Why bytes are not a valid batch. Every variant is an input error, never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("batch truncated: need {needed_bytes} bytes, have {available_bytes}")]
    Truncated {
        needed_bytes: usize,
        available_bytes: usize,
    },
    #[error("bad batch magic {found:#010x}")]
    BadMagic { found: u32 },
    #[error("unsupported batch format version {found}")]
    UnsupportedVersion { found: u16 },
    #[error("batch header CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderCrc { stored: u32, computed: u32 },
    #[error("batch body CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BodyCrc { stored: u32, computed: u32 },
    #[error("batch of {batch_bytes} bytes exceeds the limit of {limit_bytes}")]
    TooLarge {
        batch_bytes: usize,
        limit_bytes: usize,
    },
    #[error("batch header field {field} is invalid: {detail}")]
    BadHeader { field: &'static str, detail: String },
    #[error("batch body is not 16-byte aligned in memory; copy it into an aligned buffer")]
    Misaligned,
    #[error("batch body is not a valid rkyv archive: {0}")]
    BadBody(String),
    #[error("batch is empty: a batch holds at least one record")]
    Empty,
}

/// The decoded fixed header of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub attributes: u16,
    pub header_crc: u32,
    pub body_crc: u32,
    pub base_offset: Offset,
    pub record_count: u32,
    pub last_offset_delta: u32,
    pub leader_epoch: Epoch,
    pub producer_epoch: u16,
    pub producer_id: ProducerId,
    pub base_sequence: u32,
    pub body_bytes: u32,
    pub first_timestamp_ms: i64,
    pub max_timestamp_ms: i64,
}

impl BatchHeader {
    /// Total bytes of the batch including padding, as it sits on disk and on the wire.
    pub fn batch_bytes(&self) -> usize {
        padded_batch_bytes(self.body_bytes as usize)
    }

    /// The offset after the last record of this batch.
    pub fn next_offset(&self) -> Offset {
        self.base_offset.plus(u64::from(self.last_offset_delta) + 1)
    }

    pub fn last_offset(&self) -> Offset {
        self.base_offset.plus(u64::from(self.last_offset_delta))
    }
}

/// Header + body + padding for a body of `body_bytes`.
pub fn padded_batch_bytes(body_bytes: usize) -> usize {
    (BATCH_HEADER_BYTES + body_bytes).next_multiple_of(BATCH_ALIGNMENT_BYTES)
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}
fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(raw)
}
fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}
fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
}
fn put_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

fn header_crc_of(header: &[u8]) -> u32 {
    crc32c::crc32c(&header[HEADER_CRC_FROM..BATCH_HEADER_BYTES])
}

/// Decodes and checks the fixed header: magic, version, header CRC, reserved fields, lengths.
/// Does not look at the body. `bytes` may be longer than the batch.
pub fn decode_header(bytes: &[u8]) -> Result<BatchHeader, BatchError> {
    if bytes.len() < BATCH_HEADER_BYTES {
        return Err(BatchError::Truncated {
            needed_bytes: BATCH_HEADER_BYTES,
            available_bytes: bytes.len(),
        });
    }
    let magic = u32_at(bytes, AT_MAGIC);
    if magic != BATCH_MAGIC {
        return Err(BatchError::BadMagic { found: magic });
    }
    let version = u16_at(bytes, AT_VERSION);
    if version != BATCH_FORMAT_VERSION {
        return Err(BatchError::UnsupportedVersion { found: version });
    }
    let stored = u32_at(bytes, AT_HEADER_CRC);
    let computed = header_crc_of(bytes);
    if stored != computed {
        return Err(BatchError::HeaderCrc { stored, computed });
    }
    let header = BatchHeader {
        attributes: u16_at(bytes, AT_ATTRIBUTES),
        header_crc: stored,
        body_crc: u32_at(bytes, AT_BODY_CRC),
        base_offset: Offset(u64_at(bytes, AT_BASE_OFFSET)),
        record_count: u32_at(bytes, AT_RECORD_COUNT),
        last_offset_delta: u32_at(bytes, AT_LAST_OFFSET_DELTA),
        leader_epoch: Epoch(u32_at(bytes, AT_LEADER_EPOCH)),
        producer_epoch: u16_at(bytes, AT_PRODUCER_EPOCH),
        producer_id: ProducerId(u64_at(bytes, AT_PRODUCER_ID)),
        base_sequence: u32_at(bytes, AT_BASE_SEQUENCE),
        body_bytes: u32_at(bytes, AT_BODY_BYTES),
        first_timestamp_ms: u64_at(bytes, AT_FIRST_TIMESTAMP) as i64,
        max_timestamp_ms: u64_at(bytes, AT_MAX_TIMESTAMP) as i64,
    };
    let bad = |field: &'static str, detail: String| Err(BatchError::BadHeader { field, detail });
    if header.attributes != 0 {
        return bad(
            "attributes",
            format!("{} (no attributes are defined)", header.attributes),
        );
    }
    if u16_at(bytes, AT_RESERVED_A) != 0 || u64_at(bytes, AT_RESERVED_B) != 0 {
        return bad("reserved", "must be zero".to_string());
    }
    if header.record_count == 0 {
        return Err(BatchError::Empty);
    }
    if header.record_count as usize > BATCH_RECORDS_MAX {
        return bad(
            "record_count",
            format!("{} > {BATCH_RECORDS_MAX}", header.record_count),
        );
    }
    if header.last_offset_delta != header.record_count - 1 {
        return bad(
            "last_offset_delta",
            format!(
                "{} with {} records",
                header.last_offset_delta, header.record_count
            ),
        );
    }
    if header
        .base_offset
        .0
        .checked_add(u64::from(header.record_count))
        .is_none()
    {
        return bad("base_offset", format!("{} overflows", header.base_offset));
    }
    let batch_bytes = header.batch_bytes();
    if batch_bytes > BATCH_BYTES_MAX {
        return Err(BatchError::TooLarge {
            batch_bytes,
            limit_bytes: BATCH_BYTES_MAX,
        });
    }
    if header.max_timestamp_ms < header.first_timestamp_ms {
        return bad("max_timestamp_ms", "below first_timestamp_ms".to_string());
    }
    Ok(header)
}

/// A batch whose header, CRCs and padding were checked. The body has not been rkyv-validated
/// yet; [`CheckedBatch::records`] does that. This split lets recovery and replication verify
/// integrity (CRC) without paying for structural validation they do not need.
#[derive(Clone, Copy, Debug)]
pub struct CheckedBatch<'a> {
    pub header: BatchHeader,
    /// Exactly `header.batch_bytes()` bytes: header, body and padding.
    pub bytes: &'a [u8],
}

/// Checks the batch at the start of `bytes` (header, header CRC, length, body CRC, zero padding).
pub fn check_batch(bytes: &[u8]) -> Result<CheckedBatch<'_>, BatchError> {
    let header = decode_header(bytes)?;
    let batch_bytes = header.batch_bytes();
    if bytes.len() < batch_bytes {
        return Err(BatchError::Truncated {
            needed_bytes: batch_bytes,
            available_bytes: bytes.len(),
        });
    }
    let body_end = BATCH_HEADER_BYTES + header.body_bytes as usize;
    let computed = crc32c::crc32c(&bytes[BATCH_HEADER_BYTES..body_end]);
    if computed != header.body_crc {
        return Err(BatchError::BodyCrc {
            stored: header.body_crc,
            computed,
        });
    }
    if bytes[body_end..batch_bytes].iter().any(|&b| b != 0) {
        return Err(BatchError::BadHeader {
            field: "padding",
            detail: "must be zero".to_string(),
        });
    }
    Ok(CheckedBatch {
        header,
        bytes: &bytes[..batch_bytes],
    })
}

/// Proof that a batch's body and padding matched its header when [`check_batch`] ran. It lets
/// [`crate::log::PartitionLog::append_verified`] skip a second pass of CRC32C over the body
/// (about 5% of the broker's CPU with 1 MiB batches). It pins the header's body CRC and length,
/// so it cannot vouch for another batch; the holder of the bytes must not change the body
/// between the check and the append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyVerified {
    body_crc: u32,
    body_bytes: u32,
}

impl BodyVerified {
    /// Whether this proof was made for a batch with `header`'s body.
    pub fn vouches_for(&self, header: &BatchHeader) -> bool {
        self.body_crc == header.body_crc && self.body_bytes == header.body_bytes
    }
}

impl<'a> CheckedBatch<'a> {
    /// The proof that this batch's body was checked, for [`crate::log::PartitionLog::append_verified`].
    pub fn body_verified(&self) -> BodyVerified {
        BodyVerified {
            body_crc: self.header.body_crc,
            body_bytes: self.header.body_bytes,
        }
    }

    /// The body, accessed in place through rkyv's validated access (bytecheck), without
    /// deserializing. Fails with [`BatchError::Misaligned`] when the bytes are not 16-aligned.
    pub fn records(&self) -> Result<&'a rkyv::vec::ArchivedVec<ArchivedRecord>, BatchError> {
        let body =
            &self.bytes[BATCH_HEADER_BYTES..BATCH_HEADER_BYTES + self.header.body_bytes as usize];
        if body.as_ptr().align_offset(BATCH_ALIGNMENT_BYTES) != 0 {
            return Err(BatchError::Misaligned);
        }
        let archived = rkyv::access::<ArchivedBatchBody, rancor::Error>(body)
            .map_err(|error| BatchError::BadBody(error.to_string()))?;
        if archived.records.len() != self.header.record_count as usize {
            return Err(BatchError::BadHeader {
                field: "record_count",
                detail: format!(
                    "header says {} records, body holds {}",
                    self.header.record_count,
                    archived.records.len()
                ),
            });
        }
        // Readers compute `first_timestamp_ms + timestamp_delta_ms` and skip batches by
        // `max_timestamp_ms` (list offsets by time, retention): both must hold for every record.
        for record in archived.records.iter() {
            let delta_ms = record.timestamp_delta_ms.to_native();
            let in_bounds = self
                .header
                .first_timestamp_ms
                .checked_add(delta_ms)
                .is_some_and(|timestamp_ms| timestamp_ms <= self.header.max_timestamp_ms);
            if !in_bounds {
                return Err(BatchError::BadHeader {
                    field: "max_timestamp_ms",
                    detail: format!(
                        "a record's timestamp (first {} + delta {delta_ms}) is above it ({})",
                        self.header.first_timestamp_ms, self.header.max_timestamp_ms
                    ),
                });
            }
        }
        Ok(&archived.records)
    }
}

/// Full validation at a trust boundary: CRCs, header, and the rkyv structure of the body.
pub fn validate_batch(bytes: &[u8]) -> Result<CheckedBatch<'_>, BatchError> {
    let checked = check_batch(bytes)?;
    checked.records()?;
    Ok(checked)
}

/// Sets the producer identity of an encoded batch (an idempotent producer stamps its id, epoch
/// and sequence when the batch is first sent) and recomputes the header CRC; the body and its
/// CRC are untouched.
pub fn stamp_producer(batch: &mut [u8], producer: ProducerStamp) {
    assert!(
        batch.len() >= BATCH_HEADER_BYTES,
        "stamp on a truncated batch"
    );
    assert_eq!(
        u32_at(batch, AT_MAGIC),
        BATCH_MAGIC,
        "stamp on bytes that are not a batch"
    );
    batch[AT_PRODUCER_EPOCH..AT_PRODUCER_EPOCH + 2]
        .copy_from_slice(&producer.producer_epoch.to_le_bytes());
    put_u64(batch, AT_PRODUCER_ID, producer.producer_id.0);
    put_u32(batch, AT_BASE_SEQUENCE, producer.base_sequence);
    let crc = header_crc_of(batch);
    put_u32(batch, AT_HEADER_CRC, crc);
}

/// Sets base offset and leader epoch of an encoded batch and recomputes the header CRC. The body
/// and its CRC are untouched: this is how the leader assigns offsets without re-encoding.
pub fn stamp(batch: &mut [u8], base_offset: Offset, leader_epoch: Epoch) {
    assert!(
        batch.len() >= BATCH_HEADER_BYTES,
        "stamp on a truncated batch"
    );
    assert_eq!(
        u32_at(batch, AT_MAGIC),
        BATCH_MAGIC,
        "stamp on bytes that are not a batch"
    );
    let record_count = u32_at(batch, AT_RECORD_COUNT);
    assert!(
        base_offset.0.checked_add(u64::from(record_count)).is_some(),
        "offset overflow"
    );
    put_u64(batch, AT_BASE_OFFSET, base_offset.0);
    put_u32(batch, AT_LEADER_EPOCH, leader_epoch.0);
    let crc = header_crc_of(batch);
    put_u32(batch, AT_HEADER_CRC, crc);
}

/// Producer identity carried in every batch header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducerStamp {
    pub producer_id: ProducerId,
    pub producer_epoch: u16,
    pub base_sequence: u32,
}

impl Default for ProducerStamp {
    fn default() -> Self {
        ProducerStamp {
            producer_id: ProducerId::NONE,
            producer_epoch: 0,
            base_sequence: SEQUENCE_NONE,
        }
    }
}

/// Encodes records into one batch. Producers use it; the broker only stamps headers.
///
/// ```
/// use wharf_storage::batch::{BatchBuilder, check_batch};
/// let mut builder = BatchBuilder::new(Default::default());
/// builder.push(1_700_000_000_000, Some(b"key"), b"value", &[]).unwrap();
/// let batch = builder.finish().unwrap();
/// let checked = check_batch(&batch).unwrap();
/// assert_eq!(checked.records().unwrap()[0].value.as_slice(), b"value");
/// ```
#[derive(Debug)]
pub struct BatchBuilder {
    producer: ProducerStamp,
    /// Keys and values of every record, end to end: one buffer instead of two allocations per
    /// record. `finish` encodes them from here.
    bytes: Vec<u8>,
    records: Vec<PendingRecord>,
    first_timestamp_ms: i64,
    max_timestamp_ms: i64,
    payload_bytes: usize,
}

/// A pushed record: where its key and value are in the builder's buffer.
#[derive(Debug)]
struct PendingRecord {
    timestamp_delta_ms: i64,
    key: Option<std::ops::Range<usize>>,
    value: std::ops::Range<usize>,
    headers: Vec<RecordHeader>,
}

/// Rough per-record rkyv overhead (relative pointers, lengths, option tag, timestamp, padding),
/// used only to decide when a batch is full.
const RECORD_OVERHEAD_BYTES_ESTIMATE: usize = 48;

impl BatchBuilder {
    pub fn new(producer: ProducerStamp) -> Self {
        Self::with_capacity(producer, 0)
    }

    /// A builder whose buffer holds `payload_bytes` of keys and values before it grows (a
    /// producer passes its batch size, so filling a batch never copies the buffer).
    pub fn with_capacity(producer: ProducerStamp, payload_bytes: usize) -> Self {
        BatchBuilder {
            producer,
            bytes: Vec::with_capacity(payload_bytes.min(BATCH_BYTES_MAX)),
            records: Vec::new(),
            first_timestamp_ms: 0,
            max_timestamp_ms: 0,
            payload_bytes: 0,
        }
    }

    pub fn record_count(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// An upper-bound estimate of the encoded batch size, for batch-size limits.
    pub fn estimated_batch_bytes(&self) -> usize {
        padded_batch_bytes(self.payload_bytes + 16) + 16
    }

    /// Adds a record. Fails (changing nothing) if the batch would exceed [`BATCH_BYTES_MAX`] or
    /// [`BATCH_RECORDS_MAX`].
    pub fn push(
        &mut self,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<(), BatchError> {
        let record_bytes = RECORD_OVERHEAD_BYTES_ESTIMATE
            + key.map_or(0, <[u8]>::len)
            + value.len()
            + headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 24)
                .sum::<usize>();
        let batch_bytes = padded_batch_bytes(self.payload_bytes + record_bytes + 16) + 16;
        if batch_bytes > BATCH_BYTES_MAX {
            return Err(BatchError::TooLarge {
                batch_bytes,
                limit_bytes: BATCH_BYTES_MAX,
            });
        }
        if self.records.len() >= BATCH_RECORDS_MAX {
            return Err(BatchError::BadHeader {
                field: "record_count",
                detail: format!("at most {BATCH_RECORDS_MAX} records per batch"),
            });
        }
        // Each record's timestamp is stored as a delta from the first: it must be representable.
        if !self.records.is_empty() && timestamp_ms.checked_sub(self.first_timestamp_ms).is_none() {
            return Err(BatchError::BadHeader {
                field: "timestamp_ms",
                detail: format!(
                    "{timestamp_ms} is too far from the batch's first timestamp {}",
                    self.first_timestamp_ms
                ),
            });
        }
        if self.records.is_empty() {
            self.first_timestamp_ms = timestamp_ms;
            self.max_timestamp_ms = timestamp_ms;
        }
        self.max_timestamp_ms = self.max_timestamp_ms.max(timestamp_ms);
        self.payload_bytes += record_bytes;
        let mut keep = |bytes: &[u8]| {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(bytes);
            start..self.bytes.len()
        };
        let key = key.map(&mut keep);
        let value = keep(value);
        self.records.push(PendingRecord {
            timestamp_delta_ms: timestamp_ms - self.first_timestamp_ms,
            key,
            value,
            headers: if headers.is_empty() {
                Vec::new()
            } else {
                headers
                    .iter()
                    .map(|(k, v)| RecordHeader {
                        key: (*k).to_string(),
                        value: v.to_vec(),
                    })
                    .collect()
            },
        });
        Ok(())
    }

    /// Encodes the batch with base offset 0 and epoch 0 (the leader stamps both on append).
    pub fn finish(self) -> Result<AlignedVec<BATCH_ALIGNMENT_BYTES>, BatchError> {
        if self.records.is_empty() {
            return Err(BatchError::Empty);
        }
        let record_count = u32::try_from(self.records.len()).expect("bounded by BATCH_RECORDS_MAX");
        let mut buffer = AlignedVec::<BATCH_ALIGNMENT_BYTES>::with_capacity(
            self.estimated_batch_bytes().min(BATCH_BYTES_MAX),
        );
        buffer.extend_from_slice(&[0u8; BATCH_HEADER_BYTES]);
        let records: Vec<RecordRef<'_>> = self
            .records
            .iter()
            .map(|r| RecordRef {
                timestamp_delta_ms: r.timestamp_delta_ms,
                key: r.key.clone().map(|k| SliceRef(&self.bytes[k])),
                value: SliceRef(&self.bytes[r.value.clone()]),
                headers: SliceRef(&r.headers),
            })
            .collect();
        let body = BatchBodyRef {
            records: SliceRef(&records),
        };
        let mut buffer = rkyv::api::high::to_bytes_in::<_, rancor::Error>(&body, buffer)
            .map_err(|error| BatchError::BadBody(error.to_string()))?;
        let body_bytes = buffer.len() - BATCH_HEADER_BYTES;
        let batch_bytes = padded_batch_bytes(body_bytes);
        if batch_bytes > BATCH_BYTES_MAX {
            return Err(BatchError::TooLarge {
                batch_bytes,
                limit_bytes: BATCH_BYTES_MAX,
            });
        }
        buffer.resize(batch_bytes, 0);
        let body_crc = crc32c::crc32c(&buffer[BATCH_HEADER_BYTES..BATCH_HEADER_BYTES + body_bytes]);
        let header = &mut buffer[..BATCH_HEADER_BYTES];
        put_u32(header, AT_MAGIC, BATCH_MAGIC);
        header[AT_VERSION..AT_VERSION + 2].copy_from_slice(&BATCH_FORMAT_VERSION.to_le_bytes());
        put_u32(header, AT_BODY_CRC, body_crc);
        put_u32(header, AT_RECORD_COUNT, record_count);
        put_u32(header, AT_LAST_OFFSET_DELTA, record_count - 1);
        header[AT_PRODUCER_EPOCH..AT_PRODUCER_EPOCH + 2]
            .copy_from_slice(&self.producer.producer_epoch.to_le_bytes());
        put_u64(header, AT_PRODUCER_ID, self.producer.producer_id.0);
        put_u32(header, AT_BASE_SEQUENCE, self.producer.base_sequence);
        put_u32(
            header,
            AT_BODY_BYTES,
            u32::try_from(body_bytes).expect("bounded by BATCH_BYTES_MAX"),
        );
        put_u64(header, AT_FIRST_TIMESTAMP, self.first_timestamp_ms as u64);
        put_u64(header, AT_MAX_TIMESTAMP, self.max_timestamp_ms as u64);
        stamp(&mut buffer, Offset::ZERO, Epoch(0));
        debug_assert!(validate_batch(&buffer).is_ok());
        Ok(buffer)
    }
}

/// Iterates over the batches laid end to end in `bytes`, checking each (header and CRCs).
/// Stops at the first error, which it yields once.
pub fn batches(bytes: &[u8]) -> BatchIter<'_> {
    BatchIter {
        bytes,
        failed: false,
    }
}

pub struct BatchIter<'a> {
    bytes: &'a [u8],
    failed: bool,
}

impl<'a> Iterator for BatchIter<'a> {
    type Item = Result<CheckedBatch<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.bytes.is_empty() || self.failed {
            return None;
        }
        match check_batch(self.bytes) {
            Ok(batch) => {
                self.bytes = &self.bytes[batch.bytes.len()..];
                Some(Ok(batch))
            }
            Err(error) => {
                self.failed = true;
                Some(Err(error))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn build(values: &[Vec<u8>], first_ms: i64) -> AlignedVec<BATCH_ALIGNMENT_BYTES> {
        let mut builder = BatchBuilder::new(ProducerStamp::default());
        for (i, value) in values.iter().enumerate() {
            let key = format!("k{i}");
            builder
                .push(
                    first_ms + i as i64,
                    Some(key.as_bytes()),
                    value,
                    &[("h", b"v")],
                )
                .expect("push");
        }
        builder.finish().expect("finish")
    }

    #[test]
    fn header_layout_is_pinned() {
        let batch = build(&[b"a".to_vec()], 7);
        assert_eq!(&batch[0..4], b"WHRF");
        assert_eq!(batch.len() % BATCH_ALIGNMENT_BYTES, 0);
        let header = decode_header(&batch).expect("header");
        assert_eq!(header.record_count, 1);
        assert_eq!(header.first_timestamp_ms, 7);
        assert_eq!(header.batch_bytes(), batch.len());
    }

    #[test]
    fn stamp_changes_only_the_header() {
        let mut batch = build(&[b"x".to_vec(), b"y".to_vec()], 100);
        let body_before = batch[BATCH_HEADER_BYTES..].to_vec();
        stamp(&mut batch, Offset(42), Epoch(3));
        assert_eq!(&batch[BATCH_HEADER_BYTES..], &body_before[..]);
        let checked = validate_batch(&batch).expect("valid after stamp");
        assert_eq!(checked.header.base_offset, Offset(42));
        assert_eq!(checked.header.leader_epoch, Epoch(3));
        assert_eq!(checked.header.next_offset(), Offset(44));
    }

    #[test]
    fn stamp_producer_sets_the_identity_and_keeps_the_batch_valid() {
        let mut batch = build(&[b"x".to_vec(), b"y".to_vec()], 100);
        let body_before = batch[BATCH_HEADER_BYTES..].to_vec();
        let producer = ProducerStamp {
            producer_id: ProducerId(0x0001_0000_0000_0007),
            producer_epoch: 513,
            base_sequence: 40,
        };
        stamp_producer(&mut batch, producer);
        assert_eq!(&batch[BATCH_HEADER_BYTES..], &body_before[..]);
        let header = validate_batch(&batch).expect("valid after stamp").header;
        assert_eq!(
            (
                header.producer_id,
                header.producer_epoch,
                header.base_sequence
            ),
            (
                producer.producer_id,
                producer.producer_epoch,
                producer.base_sequence
            )
        );
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let batch = build(&[b"hello".to_vec(), b"world".to_vec()], 1);
        for bit in 0..batch.len() * 8 {
            let mut copy = AlignedVec::<16>::new();
            copy.extend_from_slice(&batch);
            copy[bit / 8] ^= 1 << (bit % 8);
            assert!(
                validate_batch(&copy).is_err(),
                "flip of bit {bit} went unnoticed"
            );
        }
    }

    #[test]
    fn truncated_batches_are_errors() {
        let batch = build(&[vec![9u8; 100]], 1);
        for len in 0..batch.len() {
            assert!(
                matches!(
                    check_batch(&batch[..len]),
                    Err(BatchError::Truncated { .. })
                ),
                "length {len}"
            );
        }
    }

    #[test]
    fn misaligned_body_is_reported_not_read() {
        let batch = build(&[b"v".to_vec()], 1);
        let mut shifted = AlignedVec::<16>::new();
        shifted.push(0);
        shifted.extend_from_slice(&batch);
        let checked = check_batch(&shifted[1..]).expect("crc is alignment-independent");
        assert_eq!(checked.records().err(), Some(BatchError::Misaligned));
    }

    #[test]
    fn empty_builder_refuses_to_finish() {
        assert_eq!(
            BatchBuilder::new(ProducerStamp::default()).finish().err(),
            Some(BatchError::Empty)
        );
    }

    #[test]
    fn oversized_record_is_refused() {
        let mut builder = BatchBuilder::new(ProducerStamp::default());
        let huge = vec![0u8; BATCH_BYTES_MAX];
        assert!(matches!(
            builder.push(0, None, &huge, &[]),
            Err(BatchError::TooLarge { .. })
        ));
        assert!(builder.is_empty());
    }

    type TestRecord = (i64, Option<Vec<u8>>, Vec<u8>, Vec<(String, Vec<u8>)>);

    fn any_record() -> impl Strategy<Value = TestRecord> {
        (
            -5_000i64..5_000,
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::collection::vec(
                ("[a-z]{0,6}", proptest::collection::vec(any::<u8>(), 0..20)),
                0..3,
            ),
        )
    }

    proptest! {
        /// The builder encodes from borrowed bytes (`RecordRef`); the format is what rkyv makes
        /// of the owned `BatchBody`. Both must give the same bytes.
        #[test]
        fn borrowed_encoding_is_byte_identical_to_the_owned_body(
            records in proptest::collection::vec(any_record(), 1..30),
        ) {
            let mut builder = BatchBuilder::new(ProducerStamp::default());
            for (ts, key, value, headers) in &records {
                let headers: Vec<(&str, &[u8])> =
                    headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
                builder.push(1_000 + ts, key.as_deref(), value, &headers).expect("push");
            }
            let batch = builder.finish().expect("finish");
            let owned = BatchBody {
                records: records
                    .iter()
                    .map(|(ts, key, value, headers)| Record {
                        timestamp_delta_ms: ts - records[0].0,
                        key: key.clone(),
                        value: value.clone(),
                        headers: headers
                            .iter()
                            .map(|(k, v)| RecordHeader { key: k.clone(), value: v.clone() })
                            .collect(),
                    })
                    .collect(),
            };
            let mut expected = AlignedVec::<BATCH_ALIGNMENT_BYTES>::new();
            expected.extend_from_slice(&[0u8; BATCH_HEADER_BYTES]);
            let expected = rkyv::api::high::to_bytes_in::<_, rancor::Error>(&owned, expected)
                .expect("owned encoding");
            let body_bytes = decode_header(&batch).expect("header").body_bytes as usize;
            prop_assert_eq!(body_bytes, expected.len() - BATCH_HEADER_BYTES);
            prop_assert_eq!(
                &batch[BATCH_HEADER_BYTES..BATCH_HEADER_BYTES + body_bytes],
                &expected[BATCH_HEADER_BYTES..]
            );
        }

        #[test]
        fn round_trip(
            values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..20),
            first_ms in -1_000_000i64..1_000_000_000_000,
            base in 0u64..u64::MAX / 2,
            epoch in any::<u32>(),
        ) {
            let mut batch = build(&values, first_ms);
            stamp(&mut batch, Offset(base), Epoch(epoch));
            let checked = validate_batch(&batch).expect("valid");
            let records = checked.records().expect("records");
            prop_assert_eq!(records.len(), values.len());
            for (i, (record, value)) in records.iter().zip(&values).enumerate() {
                prop_assert_eq!(record.value.as_slice(), value.as_slice());
                prop_assert_eq!(record.timestamp_delta_ms.to_native(), i as i64);
                let key = record.key.as_ref().map(|k| k.as_slice().to_vec());
                prop_assert_eq!(key, Some(format!("k{i}").into_bytes()));
            }
            prop_assert_eq!(checked.header.base_offset, Offset(base));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut aligned = AlignedVec::<16>::new();
            aligned.extend_from_slice(&bytes);
            let _ = validate_batch(&aligned);
            for batch in batches(&aligned) {
                let _ = batch.map(|b| b.records().map(|r| r.len()));
            }
        }

        #[test]
        fn valid_header_with_garbage_body_never_panics(
            garbage in proptest::collection::vec(any::<u8>(), 16..512),
        ) {
            // Forge a header whose CRCs are right but whose body is random: exercises bytecheck.
            let mut batch = build(&[b"seed".to_vec()], 0);
            let body_bytes = garbage.len();
            let mut forged = AlignedVec::<16>::new();
            forged.extend_from_slice(&batch[..BATCH_HEADER_BYTES]);
            forged.extend_from_slice(&garbage);
            forged.resize(padded_batch_bytes(body_bytes), 0);
            put_u32(&mut forged, AT_BODY_BYTES, body_bytes as u32);
            put_u32(&mut forged, AT_BODY_CRC, crc32c::crc32c(&garbage));
            stamp(&mut forged, Offset(0), Epoch(0));
            // Either bytecheck rejects the body, or it really is a one-record archive (the header
            // says one record); never a panic, never a mismatched count.
            match validate_batch(&forged) {
                Ok(checked) => prop_assert_eq!(checked.records().map(|r| r.len()).ok(), Some(1)),
                Err(error) => prop_assert!(
                    matches!(error, BatchError::BadBody(_) | BatchError::BadHeader { .. }),
                    "unexpected error {:?}",
                    error
                ),
            }
            batch.clear();
        }
    }
}
