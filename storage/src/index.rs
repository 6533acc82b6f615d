//! Sparse offset index of one segment: offset → file position, one entry every
//! `index_interval_bytes` of log.
//!
//! The active segment's index lives in memory and is rebuilt by the recovery scan. When a segment
//! is sealed its index is written once to `<base>.index`:
//!
//! ```text
//!  0      4    6    8       12     16           24           32           40           48    64
//!  +------+----+----+-------+------+------------+------------+------------+------------+-----+
//!  |magic |ver |rsv |entries| crc  | base off.  | next off.  | data bytes | max ts ms  | rsv |
//!  +------+----+----+-------+------+------------+------------+------------+------------+-----+
//!  64: entries × { relative offset u32, position u32 } ... zero padding to a 4 KiB multiple
//! ```
//!
//! The CRC32C covers bytes 16..64 and every entry. An index that fails any check is rebuilt from
//! the segment, never trusted.

use crate::disk::PAGE_BYTES;
use crate::ids::Offset;

pub const INDEX_MAGIC: u32 = u32::from_le_bytes(*b"WIDX");
pub const INDEX_FORMAT_VERSION: u16 = 1;
pub const INDEX_HEADER_BYTES: usize = 64;
pub const INDEX_ENTRY_BYTES: usize = 8;
/// Bounds the size of an index file we are willing to read (a 4 GiB segment at 512-byte interval).
pub const INDEX_ENTRIES_MAX: usize = 8 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// Offset of a batch's first record, relative to the segment's base offset.
    pub relative_offset: u32,
    /// File position where that batch starts.
    pub position: u32,
}

/// What a sealed segment's index file records about the segment besides the entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentSummary {
    pub base_offset: Offset,
    pub next_offset: Offset,
    pub data_bytes: u64,
    pub max_timestamp_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SparseIndex {
    entries: Vec<IndexEntry>,
    interval_bytes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexDecodeError {
    #[error("index file truncated")]
    Truncated,
    #[error("bad index magic or version")]
    BadMagic,
    #[error("index CRC mismatch")]
    Crc,
    #[error("index entries out of order or beyond the segment")]
    Inconsistent,
}

impl SparseIndex {
    pub fn new(interval_bytes: u32) -> Self {
        assert!(interval_bytes > 0);
        SparseIndex {
            entries: Vec::new(),
            interval_bytes,
        }
    }

    pub fn entries(&self) -> &[IndexEntry] {
        &self.entries
    }

    /// Records a batch that starts at `position`; adds an entry if the last one is at least the
    /// interval behind. Batches must be recorded in order.
    pub fn observe(&mut self, relative_offset: u32, position: u32) {
        let last_position = match self.entries.last() {
            Some(last) => {
                assert!(relative_offset > last.relative_offset && position > last.position);
                last.position
            }
            None => 0,
        };
        // Position 0 is implicit: lookups below the first entry start at the segment start.
        if position >= last_position + self.interval_bytes {
            self.entries.push(IndexEntry {
                relative_offset,
                position,
            });
        }
    }

    /// Records a batch that lookups must find even if the last entry is less than the interval
    /// behind: the first batch after a corrupt range, which reads cannot reach by walking batch
    /// headers from an earlier entry.
    pub fn observe_always(&mut self, relative_offset: u32, position: u32) {
        if let Some(last) = self.entries.last() {
            assert!(relative_offset > last.relative_offset && position > last.position);
        }
        if position > 0 {
            self.entries.push(IndexEntry {
                relative_offset,
                position,
            });
        }
    }

    /// The position of the latest indexed batch starting at or before `relative_offset`.
    pub fn lookup(&self, relative_offset: u32) -> u32 {
        let at = self
            .entries
            .partition_point(|e| e.relative_offset <= relative_offset);
        if at == 0 {
            0
        } else {
            self.entries[at - 1].position
        }
    }

    /// Drops entries at or after `relative_offset` (suffix truncation).
    pub fn truncate_from(&mut self, relative_offset: u32) {
        let keep = self
            .entries
            .partition_point(|e| e.relative_offset < relative_offset);
        self.entries.truncate(keep);
    }

    /// Encodes the index file, padded to a multiple of [`PAGE_BYTES`].
    pub fn encode(&self, summary: &SegmentSummary) -> Vec<u8> {
        let body_bytes = INDEX_HEADER_BYTES + self.entries.len() * INDEX_ENTRY_BYTES;
        let mut bytes = vec![0u8; body_bytes.next_multiple_of(PAGE_BYTES)];
        bytes[0..4].copy_from_slice(&INDEX_MAGIC.to_le_bytes());
        bytes[4..6].copy_from_slice(&INDEX_FORMAT_VERSION.to_le_bytes());
        let count = u32::try_from(self.entries.len()).expect("entry count fits u32");
        bytes[8..12].copy_from_slice(&count.to_le_bytes());
        bytes[16..24].copy_from_slice(&summary.base_offset.0.to_le_bytes());
        bytes[24..32].copy_from_slice(&summary.next_offset.0.to_le_bytes());
        bytes[32..40].copy_from_slice(&summary.data_bytes.to_le_bytes());
        bytes[40..48].copy_from_slice(&summary.max_timestamp_ms.to_le_bytes());
        for (i, entry) in self.entries.iter().enumerate() {
            let at = INDEX_HEADER_BYTES + i * INDEX_ENTRY_BYTES;
            bytes[at..at + 4].copy_from_slice(&entry.relative_offset.to_le_bytes());
            bytes[at + 4..at + 8].copy_from_slice(&entry.position.to_le_bytes());
        }
        let crc = crc32c::crc32c(&bytes[16..body_bytes]);
        bytes[12..16].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// Decodes and checks an index file.
    pub fn decode(
        bytes: &[u8],
        interval_bytes: u32,
    ) -> Result<(SparseIndex, SegmentSummary), IndexDecodeError> {
        if bytes.len() < INDEX_HEADER_BYTES {
            return Err(IndexDecodeError::Truncated);
        }
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let u64_at = |at: usize| {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(raw)
        };
        if u32_at(0) != INDEX_MAGIC
            || u16::from_le_bytes([bytes[4], bytes[5]]) != INDEX_FORMAT_VERSION
        {
            return Err(IndexDecodeError::BadMagic);
        }
        let count = u32_at(8) as usize;
        if count > INDEX_ENTRIES_MAX {
            return Err(IndexDecodeError::Inconsistent);
        }
        let body_bytes = INDEX_HEADER_BYTES + count * INDEX_ENTRY_BYTES;
        if bytes.len() < body_bytes {
            return Err(IndexDecodeError::Truncated);
        }
        if crc32c::crc32c(&bytes[16..body_bytes]) != u32_at(12) {
            return Err(IndexDecodeError::Crc);
        }
        let summary = SegmentSummary {
            base_offset: Offset(u64_at(16)),
            next_offset: Offset(u64_at(24)),
            data_bytes: u64_at(32),
            max_timestamp_ms: u64_at(40) as i64,
        };
        if summary.next_offset <= summary.base_offset {
            return Err(IndexDecodeError::Inconsistent);
        }
        let mut index = SparseIndex::new(interval_bytes);
        for i in 0..count {
            let at = INDEX_HEADER_BYTES + i * INDEX_ENTRY_BYTES;
            let entry = IndexEntry {
                relative_offset: u32_at(at),
                position: u32_at(at + 4),
            };
            let in_order = index.entries.last().is_none_or(|last| {
                entry.relative_offset > last.relative_offset && entry.position > last.position
            });
            let in_segment = u64::from(entry.position) < summary.data_bytes
                && summary.base_offset.0 + u64::from(entry.relative_offset) < summary.next_offset.0;
            if !in_order || !in_segment {
                return Err(IndexDecodeError::Inconsistent);
            }
            index.entries.push(entry);
        }
        Ok((index, summary))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn lookup_returns_the_latest_entry_at_or_before(
            sizes in proptest::collection::vec(16u32..20_000, 1..300),
            interval in 1u32..16_384,
            probe_seed in any::<u64>(),
        ) {
            // Lay out batches of one record each with the given sizes.
            let mut index = SparseIndex::new(interval);
            let mut starts = Vec::new();
            let mut position = 0u32;
            for (i, size) in sizes.iter().enumerate() {
                index.observe(i as u32, position);
                starts.push(position);
                position += size;
            }
            let target = (probe_seed % sizes.len() as u64) as u32;
            let found = index.lookup(target);
            // The answer is a batch start at or before the target, and no indexed entry lies
            // strictly between it and the target.
            let found_batch = starts.iter().position(|&s| s == found).expect("a batch start");
            prop_assert!(found_batch as u32 <= target);
            for entry in index.entries() {
                prop_assert!(!(entry.position > found && entry.relative_offset <= target));
            }
            // Scanning forward from the answer reaches the target within the interval (plus one
            // batch of slack), which is what keeps reads cheap.
            prop_assert!(starts[target as usize] - found <= interval + sizes.iter().max().copied().unwrap_or(0));
        }

        #[test]
        fn encode_decode_round_trip(count in 0usize..500, interval in 1u32..8192) {
            let mut index = SparseIndex::new(interval);
            for i in 0..count {
                index.observe(i as u32, (i as u32) * 100);
            }
            let summary = SegmentSummary {
                base_offset: Offset(1000),
                next_offset: Offset(1000 + count as u64 + 1),
                data_bytes: (count as u64 + 1) * 100,
                max_timestamp_ms: 77,
            };
            let bytes = index.encode(&summary);
            prop_assert_eq!(bytes.len() % PAGE_BYTES, 0);
            let (decoded, decoded_summary) = SparseIndex::decode(&bytes, interval).expect("decode");
            prop_assert_eq!(decoded, index);
            prop_assert_eq!(decoded_summary, summary);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = SparseIndex::decode(&bytes, 4096);
        }
    }

    #[test]
    fn corrupt_index_is_rejected() {
        let mut index = SparseIndex::new(10);
        index.observe(0, 0);
        index.observe(1, 50);
        let summary = SegmentSummary {
            base_offset: Offset(0),
            next_offset: Offset(2),
            data_bytes: 100,
            max_timestamp_ms: 0,
        };
        let mut bytes = index.encode(&summary);
        bytes[INDEX_HEADER_BYTES] ^= 1;
        assert_eq!(
            SparseIndex::decode(&bytes, 10).err(),
            Some(IndexDecodeError::Crc)
        );
    }

    #[test]
    fn truncate_from_drops_the_suffix() {
        let mut index = SparseIndex::new(1);
        for i in 0..10 {
            index.observe(i, i * 10 + 10);
        }
        index.truncate_from(5);
        assert_eq!(index.entries().len(), 5);
        assert_eq!(index.lookup(9), 50);
    }
}
