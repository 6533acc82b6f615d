//! The durable checkpoint: where the log was last known to be durable.
//!
//! Recovery needs to tell a torn tail (written but never acknowledged: truncate it) from
//! corruption of acknowledged data (report it, never truncate). The checkpoint file
//! `durable.checkpoint` records a position up to which every byte is known to have been synced.
//! Each flush writes the checkpoint of the *previous* completed flush alongside its data and syncs
//! both, so a checkpoint never claims more than was durable when it was written.
//!
//! Two 4 KiB slots, written alternately, so a torn checkpoint write leaves the other slot valid:
//!
//! ```text
//!  0      4    6     8      12          16          24             32          40           48
//!  +------+----+-----+------+-----------+-----------+--------------+-----------+------------+
//!  |magic |ver |state| crc  | reserved  | sequence  | segment base | position  | next offset|
//!  +------+----+-----+------+-----------+-----------+--------------+-----------+------------+
//! ```
//!
//! `state` is `Normal`, `Truncating` or `Resetting`: a suffix truncation writes `Truncating`
//! first, so a crash in the middle of it finishes the truncation on recovery instead of
//! resurrecting the suffix; a reset (the whole log discarded, restarted empty at
//! `next_offset`) writes `Resetting` first, so recovery removes every segment file left.

use crate::disk::PAGE_BYTES;
use crate::ids::Offset;

pub const CHECKPOINT_FILE_NAME: &str = "durable.checkpoint";
pub const CHECKPOINT_MAGIC: u32 = u32::from_le_bytes(*b"WCKP");
pub const CHECKPOINT_FORMAT_VERSION: u16 = 1;
pub const CHECKPOINT_SLOTS: usize = 2;
pub const CHECKPOINT_FILE_BYTES: usize = CHECKPOINT_SLOTS * PAGE_BYTES;
const CHECKPOINT_USED_BYTES: usize = 48;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointState {
    Normal,
    /// A suffix truncation to (`segment_base`, `position`) was in progress.
    Truncating,
    /// A reset was in progress: every segment goes, the log restarts empty at `next_offset`.
    Resetting,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub sequence: u64,
    pub state: CheckpointState,
    /// The segment holding the durable end.
    pub segment_base: Offset,
    /// Every byte of that segment before `position` is durable (all earlier segments too).
    pub position: u64,
    /// The offset of the first record at or after `position`.
    pub next_offset: Offset,
}

impl Checkpoint {
    /// The slot this checkpoint is written to.
    pub fn slot(&self) -> usize {
        (self.sequence % CHECKPOINT_SLOTS as u64) as usize
    }

    /// One page holding this checkpoint.
    pub fn encode(&self) -> [u8; PAGE_BYTES] {
        let mut page = [0u8; PAGE_BYTES];
        page[0..4].copy_from_slice(&CHECKPOINT_MAGIC.to_le_bytes());
        page[4..6].copy_from_slice(&CHECKPOINT_FORMAT_VERSION.to_le_bytes());
        let state: u16 = match self.state {
            CheckpointState::Normal => 0,
            CheckpointState::Truncating => 1,
            CheckpointState::Resetting => 2,
        };
        page[6..8].copy_from_slice(&state.to_le_bytes());
        page[16..24].copy_from_slice(&self.sequence.to_le_bytes());
        page[24..32].copy_from_slice(&self.segment_base.0.to_le_bytes());
        page[32..40].copy_from_slice(&self.position.to_le_bytes());
        page[40..48].copy_from_slice(&self.next_offset.0.to_le_bytes());
        let crc = checksum(&page);
        page[8..12].copy_from_slice(&crc.to_le_bytes());
        page
    }

    /// Decodes one slot; `None` if it is empty, torn or corrupt.
    pub fn decode(page: &[u8]) -> Option<Checkpoint> {
        if page.len() < CHECKPOINT_USED_BYTES {
            return None;
        }
        let u64_at = |at: usize| {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&page[at..at + 8]);
            u64::from_le_bytes(raw)
        };
        let magic = u32::from_le_bytes([page[0], page[1], page[2], page[3]]);
        let version = u16::from_le_bytes([page[4], page[5]]);
        let crc = u32::from_le_bytes([page[8], page[9], page[10], page[11]]);
        if magic != CHECKPOINT_MAGIC
            || version != CHECKPOINT_FORMAT_VERSION
            || crc != checksum(page)
        {
            return None;
        }
        let state = match u16::from_le_bytes([page[6], page[7]]) {
            0 => CheckpointState::Normal,
            1 => CheckpointState::Truncating,
            2 => CheckpointState::Resetting,
            _ => return None,
        };
        Some(Checkpoint {
            sequence: u64_at(16),
            state,
            segment_base: Offset(u64_at(24)),
            position: u64_at(32),
            next_offset: Offset(u64_at(40)),
        })
    }

    /// The newest valid checkpoint among the slots of a checkpoint file.
    pub fn decode_file(bytes: &[u8]) -> Option<Checkpoint> {
        bytes
            .chunks(PAGE_BYTES)
            .take(CHECKPOINT_SLOTS)
            .filter_map(Checkpoint::decode)
            .max_by_key(|checkpoint| checkpoint.sequence)
    }
}

fn checksum(page: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&page[0..8]);
    crc32c::crc32c_append(crc, &page[12..CHECKPOINT_USED_BYTES])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(sequence: u64) -> Checkpoint {
        Checkpoint {
            sequence,
            state: CheckpointState::Normal,
            segment_base: Offset(100),
            position: 8192,
            next_offset: Offset(150),
        }
    }

    #[test]
    fn newest_valid_slot_wins_and_torn_slot_is_ignored() {
        let mut file = vec![0u8; CHECKPOINT_FILE_BYTES];
        let older = sample(4);
        let newer = sample(5);
        file[older.slot() * PAGE_BYTES..][..PAGE_BYTES].copy_from_slice(&older.encode());
        file[newer.slot() * PAGE_BYTES..][..PAGE_BYTES].copy_from_slice(&newer.encode());
        assert_eq!(Checkpoint::decode_file(&file), Some(newer));
        file[newer.slot() * PAGE_BYTES + 33] ^= 0x40;
        assert_eq!(Checkpoint::decode_file(&file), Some(older));
        assert_eq!(Checkpoint::decode_file(&[0u8; CHECKPOINT_FILE_BYTES]), None);
    }
}
