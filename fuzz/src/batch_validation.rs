//! Target `batch_validation`: `check_batch` over batches laid end to end (a produce payload, a
//! fetch response, a segment read), then validated rkyv access to every record of each batch
//! that passes, as the broker (produce, list offsets by timestamp) and the consumer read them.
//!
//! Input: `[mode u8][bytes ...]`, copied to a 16-aligned buffer. Mode bit 0 repairs the CRCs of
//! every batch before checking, so the fuzzer gets past the CRCs into the header fields and the
//! rkyv body; bit 1 also checks a copy shifted by one byte (misaligned: the CRC check must still
//! pass, record access must refuse it).
//!
//! Invariants beyond "no panic", for each batch that passes `check_batch`:
//! - it is exactly `batch_bytes()` long, a multiple of 16, its header decodes to the same
//!   fields, its header and body CRCs match and its padding is zero;
//! - `validate_batch` passes exactly when `records()` does; then there are `record_count`
//!   records, each record's timestamp (`first_timestamp_ms + timestamp_delta_ms`) is within the
//!   header's bounds (the broker skips batches by `max_timestamp_ms`), and the archived body
//!   deserializes to an owned `BatchBody` that re-archives to an equal body;
//! - stamping another base offset and epoch keeps it valid and leaves the body unchanged.

use rkyv::rancor;
use rkyv::util::AlignedVec;
use wharf_storage::batch::{
    self, check_batch, decode_header, padded_batch_bytes, stamp, validate_batch, BatchBody,
    BatchError, BATCH_ALIGNMENT_BYTES, BATCH_HEADER_BYTES,
};
use wharf_storage::{Epoch, Offset};

use crate::le_u32;

pub type Aligned = AlignedVec<BATCH_ALIGNMENT_BYTES>;

pub fn run(data: &[u8]) {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let mut aligned = Aligned::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    if mode & 1 != 0 {
        repair_crcs(&mut aligned);
    }
    check_batches(&aligned);
    if mode & 2 != 0 {
        let mut shifted = Aligned::with_capacity(aligned.len() + 1);
        shifted.push(0);
        shifted.extend_from_slice(&aligned);
        check_misaligned(&shifted[1..]);
    }
}

/// Rewrites the body and header CRCs of each batch laid end to end in `bytes`, as far as their
/// headers' lengths fit, so that the checks behind the CRCs get fuzzed.
pub fn repair_crcs(bytes: &mut [u8]) {
    let mut at = 0usize;
    while at + BATCH_HEADER_BYTES <= bytes.len() {
        let body_bytes = le_u32(bytes, at + 52) as usize;
        let body_end = at + BATCH_HEADER_BYTES + body_bytes;
        if body_end > bytes.len() {
            return;
        }
        let body_crc = crc32c::crc32c(&bytes[at + BATCH_HEADER_BYTES..body_end]);
        bytes[at + 12..at + 16].copy_from_slice(&body_crc.to_le_bytes());
        let header_crc = crc32c::crc32c(&bytes[at + 12..at + BATCH_HEADER_BYTES]);
        bytes[at + 8..at + 12].copy_from_slice(&header_crc.to_le_bytes());
        at += padded_batch_bytes(body_bytes);
    }
}

/// Checks every batch of `bytes` (16-aligned) that passes `check_batch`, up to the first that
/// does not. Returns how many passed.
pub fn check_batches(bytes: &[u8]) -> usize {
    let mut passed = 0;
    for checked in batch::batches(bytes) {
        let Ok(checked) = checked else {
            break;
        };
        check_one(checked);
        passed += 1;
    }
    // The iterator and check_batch agree.
    let mut at = 0;
    for _ in 0..passed {
        at += check_batch(&bytes[at..])
            .expect("passed in the iterator")
            .bytes
            .len();
    }
    if at < bytes.len() {
        assert!(check_batch(&bytes[at..]).is_err(), "iterator stopped early");
    }
    passed
}

fn check_one(checked: batch::CheckedBatch<'_>) {
    let header = checked.header;
    let bytes = checked.bytes;
    assert_eq!(bytes.len(), header.batch_bytes());
    assert_eq!(bytes.len() % BATCH_ALIGNMENT_BYTES, 0);
    assert_eq!(decode_header(bytes), Ok(header));
    let body_end = BATCH_HEADER_BYTES + header.body_bytes as usize;
    assert_eq!(
        crc32c::crc32c(&bytes[BATCH_HEADER_BYTES..body_end]),
        header.body_crc
    );
    assert_eq!(
        crc32c::crc32c(&bytes[12..BATCH_HEADER_BYTES]),
        header.header_crc
    );
    assert!(bytes[body_end..].iter().all(|&b| b == 0), "padding is zero");
    assert!(header.record_count >= 1);
    assert_eq!(header.last_offset_delta, header.record_count - 1);
    assert!(header
        .base_offset
        .0
        .checked_add(u64::from(header.record_count))
        .is_some());
    assert!(header.max_timestamp_ms >= header.first_timestamp_ms);
    assert!(checked.body_verified().vouches_for(&header));

    let records = checked.records();
    assert_eq!(
        validate_batch(bytes).is_ok(),
        records.is_ok(),
        "validate_batch agrees with records()"
    );
    if let Ok(records) = records {
        assert_eq!(records.len(), header.record_count as usize);
        let mut touched = 0usize;
        for record in records.iter() {
            // As the consumer and the broker's list-offsets-by-timestamp compute it.
            let timestamp_ms = header
                .first_timestamp_ms
                .checked_add(record.timestamp_delta_ms.to_native());
            assert!(
                timestamp_ms.is_some_and(|t| t <= header.max_timestamp_ms),
                "record timestamp {:?} (first {} + delta {}) is above max_timestamp_ms {}",
                timestamp_ms,
                header.first_timestamp_ms,
                record.timestamp_delta_ms.to_native(),
                header.max_timestamp_ms
            );
            touched += record.key.as_ref().map_or(0, |k| k.len());
            touched += record.value.len();
            for h in record.headers.iter() {
                touched += h.key.as_str().len() + h.value.len();
            }
        }
        assert!(touched <= bytes.len() * records.len().max(1));
        let owned: BatchBody = rkyv::deserialize::<BatchBody, rancor::Error>(
            rkyv::access::<batch::ArchivedBatchBody, rancor::Error>(
                &bytes[BATCH_HEADER_BYTES..body_end],
            )
            .expect("validated above"),
        )
        .expect("a validated archive deserializes");
        assert_eq!(owned.records.len(), records.len());
        let archived_again =
            rkyv::to_bytes::<rancor::Error>(&owned).expect("an owned body archives");
        let again: BatchBody = rkyv::from_bytes::<BatchBody, rancor::Error>(&archived_again)
            .expect("a fresh archive validates");
        assert_eq!(again, owned, "body round trip");
    }

    // The leader stamps offsets and epoch into the header only.
    let mut copy = Aligned::with_capacity(bytes.len());
    copy.extend_from_slice(bytes);
    stamp(&mut copy, Offset(7), Epoch(header.leader_epoch.0 ^ 1));
    let stamped = check_batch(&copy).expect("a stamped batch stays valid");
    assert_eq!(stamped.header.base_offset, Offset(7));
    assert_eq!(&copy[BATCH_HEADER_BYTES..], &bytes[BATCH_HEADER_BYTES..]);
    assert_eq!(stamped.records().is_ok(), checked.records().is_ok());
}

/// A misaligned copy passes the same CRC checks, but record access refuses it.
fn check_misaligned(bytes: &[u8]) {
    for checked in batch::batches(bytes) {
        let Ok(checked) = checked else {
            break;
        };
        assert_eq!(checked.records().err(), Some(BatchError::Misaligned));
    }
}
