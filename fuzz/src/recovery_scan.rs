//! Target `recovery_scan`: `PartitionLog::open` (the recovery scan) over a `MemDisk` holding one
//! or two segment files of arbitrary bytes and, optionally, an arbitrary durable checkpoint.
//!
//! Input (any byte string is valid; missing bytes read as 0):
//!
//! ```text
//! 0      flags: bit 0 write a checkpoint, bit 1 its state is Truncating, bit 2 it names segment
//!        1 (else segment 0), bit 3 two segments, bit 4 repair the CRCs of the batches laid end
//!        to end in each segment (so the fuzzer reaches the offset checks), bit 5 file sizes are
//!        the exact byte counts (else zero-padded to a page, as the log writes them)
//! 1..5   checkpoint position (u32 le, modulo 1 MiB)
//! 5..9   checkpoint next offset minus its segment's base (u32 le)
//! 9..11  bytes of segment 0 (u16 le); the rest of the input is segment 1's
//! 11..15 segment 1's base offset minus 1 (u32 le); segment 0's base is 0
//! 15..   segment bytes
//! ```
//!
//! Invariants beyond "no panic":
//! - `open` succeeds (a `MemDisk` without injected faults never fails);
//! - without a checkpoint nothing is known durable, so nothing is reported corrupt and the log
//!   keeps exactly the valid batches with dense offsets from the start of segment 0 (then of
//!   segment 1, if segment 0 ends right at its base), byte for byte: a prefix of valid batches;
//! - with any checkpoint, everything between log start and end reads back as CRC-valid batches
//!   with dense offsets, except ranges that recovery reported corrupt (reads there fail as
//!   corrupt), and opening again finds the same log (recovery is idempotent: no torn tail, no
//!   removed segment, the same corrupt ranges and batches; after finishing a truncation, see the
//!   comment in `run` for the one allowed difference).

use std::rc::Rc;

use futures_lite::future::block_on;
use wharf_storage::batch::check_batch;
use wharf_storage::checkpoint::{Checkpoint, CheckpointState, CHECKPOINT_FILE_NAME};
use wharf_storage::disk::{Disk, DiskFile, PAGE_BYTES};
use wharf_storage::log::{segment_file_name, LogConfig, PartitionLog, ReadError};
use wharf_storage::mem_disk::MemDisk;
use wharf_storage::{Offset, RecoveryReport};

use crate::{le_u16, le_u32};

pub const FLAG_CHECKPOINT: u8 = 1;
pub const FLAG_TRUNCATING: u8 = 2;
pub const FLAG_CHECKPOINT_IN_SEGMENT_1: u8 = 4;
pub const FLAG_TWO_SEGMENTS: u8 = 8;
pub const FLAG_REPAIR_CRCS: u8 = 16;
pub const FLAG_EXACT_SIZES: u8 = 32;
pub const INPUT_HEADER_BYTES: usize = 15;
const POSITION_MAX: u32 = 1 << 20;

/// A decoded input.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub flags: u8,
    pub checkpoint_position: u32,
    pub checkpoint_offset_delta: u32,
    pub segment_1_base: Offset,
    pub segments: Vec<Vec<u8>>,
}

impl Scenario {
    pub fn parse(data: &[u8]) -> Scenario {
        let flags = data.first().copied().unwrap_or(0);
        let split = usize::from(le_u16(data, 9));
        let rest = data.get(INPUT_HEADER_BYTES..).unwrap_or(&[]);
        let (first, second) = rest.split_at(split.min(rest.len()));
        let mut segments = vec![first.to_vec()];
        if flags & FLAG_TWO_SEGMENTS != 0 {
            segments.push(second.to_vec());
        }
        Scenario {
            flags,
            checkpoint_position: le_u32(data, 1) % POSITION_MAX,
            checkpoint_offset_delta: le_u32(data, 5),
            segment_1_base: Offset(u64::from(le_u32(data, 11)) + 1),
            segments,
        }
    }

    /// The input bytes of this scenario (the generator writes seeds with it).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.flags];
        out.extend_from_slice(&self.checkpoint_position.to_le_bytes());
        out.extend_from_slice(&self.checkpoint_offset_delta.to_le_bytes());
        let split = u16::try_from(self.segments[0].len()).expect("segment 0 fits u16");
        out.extend_from_slice(&split.to_le_bytes());
        out.extend_from_slice(&((self.segment_1_base.0 - 1) as u32).to_le_bytes());
        for segment in &self.segments {
            out.extend_from_slice(segment);
        }
        out
    }

    fn base(&self, segment: usize) -> Offset {
        if segment == 0 {
            Offset::ZERO
        } else {
            self.segment_1_base
        }
    }

    fn checkpoint(&self) -> Option<Checkpoint> {
        if self.flags & FLAG_CHECKPOINT == 0 {
            return None;
        }
        let segment = usize::from(self.flags & FLAG_CHECKPOINT_IN_SEGMENT_1 != 0);
        let segment_base = self.base(segment);
        Some(Checkpoint {
            sequence: 5,
            state: if self.flags & FLAG_TRUNCATING != 0 {
                CheckpointState::Truncating
            } else {
                CheckpointState::Normal
            },
            segment_base,
            position: u64::from(self.checkpoint_position),
            next_offset: segment_base.plus(u64::from(self.checkpoint_offset_delta)),
        })
    }
}

/// A small configuration: scans read a page at a time, so windows slide even over small inputs.
pub fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 64 * 1024,
        index_interval_bytes: 1024,
        write_chunk_bytes: 8 * 1024,
        scan_chunk_bytes: PAGE_BYTES,
        staged_bytes_max: 16 * 1024 * 1024,
        ..LogConfig::default()
    }
}

pub fn run(data: &[u8]) {
    let mut scenario = Scenario::parse(data);
    if scenario.flags & FLAG_REPAIR_CRCS != 0 {
        for segment in &mut scenario.segments {
            // The batch repair works on any buffer; alignment does not matter for CRCs.
            crate::batch_validation::repair_crcs(segment);
        }
    }
    let disk = MemDisk::new();
    let files = write_files(&disk, &scenario);
    let (log, report) = open(&disk);
    if std::env::var_os("WHARF_FUZZ_DEBUG").is_some() {
        eprintln!(
            "{scenario:?}\nfirst open: {report:?}, segments {:?}",
            log.segment_bases()
        );
    }
    let batches = read_everything(&log, &report);
    if scenario.checkpoint().is_none() {
        assert!(
            report.corrupt.is_empty(),
            "nothing is known durable, so nothing is corrupt: {report:?}"
        );
        let expected = expected_without_checkpoint(&scenario, &files);
        assert_eq!(batches.len(), expected.len(), "kept batches: {report:?}");
        for ((offset, got), (want_offset, want)) in batches.iter().zip(&expected) {
            assert_eq!(offset, want_offset);
            assert!(got == want, "batch at {offset} differs from the input");
        }
    }
    let end_offset = log.end_offset();
    let log_start = log.log_start_offset();
    drop(log);
    let (again, report_again) = open(&disk);
    if std::env::var_os("WHARF_FUZZ_DEBUG").is_some() {
        eprintln!("second open: {report_again:?}");
    }
    assert_eq!(again.end_offset(), end_offset, "reopen: end offset");
    assert_eq!(again.log_start_offset(), log_start, "reopen: log start");
    assert_eq!(report_again.torn_tail_at, None, "reopen: {report_again:?}");
    assert!(
        report_again.removed_segments.is_empty(),
        "reopen: {report_again:?}"
    );
    let batches_again = read_everything(&again, &report);
    if report.finished_truncation {
        // Finishing a truncation scans only up to the truncation point, then zeroes the file
        // after it. A (fuzzed, CRC-valid) batch that straddles that point with zero padding
        // after it is invalid to the first scan and valid to the next: the reopen may then find
        // more good batches and narrower corrupt ranges, never fewer batches or new ranges.
        // (A real truncation point is a batch boundary, so a real log never gets here.)
        assert!(
            report_again.corrupt.iter().all(|c| report
                .corrupt
                .iter()
                .any(|r| r.from <= c.from && c.to <= r.to)),
            "reopen: corrupt ranges {:?} not within the first {:?}",
            report_again.corrupt,
            report.corrupt
        );
        assert!(
            batches.iter().all(|b| batches_again.contains(b)),
            "reopen: batches lost"
        );
        return;
    }
    assert_eq!(
        report_again.corrupt, report.corrupt,
        "reopen: corrupt ranges"
    );
    assert!(batches_again == batches, "reopen: batches differ");
}

/// Writes the segment files (and the checkpoint) and returns each segment's file contents.
fn write_files(disk: &MemDisk, scenario: &Scenario) -> Vec<Vec<u8>> {
    let mut files = Vec::new();
    block_on(async {
        for (i, bytes) in scenario.segments.iter().enumerate() {
            let name = segment_file_name(scenario.base(i));
            let file = disk.create(&name).await.expect("create");
            let padded = bytes.len().next_multiple_of(PAGE_BYTES);
            if padded > 0 {
                let mut buffer = disk.alloc_buffer(padded);
                buffer.as_mut_slice().fill(0);
                buffer[..bytes.len()].copy_from_slice(bytes);
                file.write_at(buffer, 0).await.expect("write");
            }
            let mut contents = bytes.clone();
            if scenario.flags & FLAG_EXACT_SIZES != 0 {
                file.set_len(bytes.len() as u64).await.expect("set_len");
            } else {
                contents.resize(padded, 0);
            }
            file.sync().await.expect("sync");
            files.push(contents);
        }
        if let Some(checkpoint) = scenario.checkpoint() {
            let file = disk.create(CHECKPOINT_FILE_NAME).await.expect("create");
            let mut buffer = disk.alloc_buffer(2 * PAGE_BYTES);
            buffer.as_mut_slice().fill(0);
            let slot = checkpoint.slot() * PAGE_BYTES;
            buffer[slot..slot + PAGE_BYTES].copy_from_slice(&checkpoint.encode());
            file.write_at(buffer, 0).await.expect("write");
            file.sync().await.expect("sync");
        }
        disk.sync_dir().await.expect("sync_dir");
    });
    files
}

fn open(disk: &MemDisk) -> (PartitionLog<MemDisk>, RecoveryReport) {
    block_on(PartitionLog::open(Rc::new(disk.clone()), config(), 0))
        .unwrap_or_else(|e| panic!("open on a fault-free MemDisk failed: {e}"))
}

/// The batches recovery must keep when no checkpoint exists: from the start of each segment,
/// every batch that checks and starts at the expected offset, up to the first that does not.
fn expected_without_checkpoint(scenario: &Scenario, files: &[Vec<u8>]) -> Vec<(Offset, Vec<u8>)> {
    let mut kept = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let base = scenario.base(i);
        let mut next = base;
        let mut at = 0;
        while let Ok(checked) = check_batch(&file[at..]) {
            if checked.header.base_offset != next {
                break;
            }
            kept.push((next, checked.bytes.to_vec()));
            next = checked.header.next_offset();
            at += checked.bytes.len();
        }
        // The next segment is kept only if this one is non-empty and ends at its base.
        let next_base = (i + 1 < files.len()).then(|| scenario.base(i + 1));
        if next_base.is_none_or(|n| at == 0 || n != next) {
            break;
        }
    }
    kept
}

/// Reads from log start to end: CRC-valid batches with dense offsets, except in reported
/// corrupt ranges, which must fail as corrupt and are skipped.
fn read_everything(log: &PartitionLog<MemDisk>, report: &RecoveryReport) -> Vec<(Offset, Vec<u8>)> {
    let mut out = Vec::new();
    let mut next = log.log_start_offset();
    for _ in 0..100_000 {
        if next >= log.end_offset() {
            return out;
        }
        match block_on(log.read(next, 64 * 1024)) {
            Ok(read) => {
                assert!(
                    !read.is_empty(),
                    "empty read at {next} below end {}",
                    log.end_offset()
                );
                let mut at = 0;
                while at < read.bytes().len() {
                    let checked = check_batch(&read.bytes()[at..]).unwrap_or_else(|e| {
                        panic!("read at {next} returned an invalid batch: {e}")
                    });
                    at += checked.bytes.len();
                    let header = checked.header;
                    if header.next_offset() <= next {
                        continue;
                    }
                    assert!(
                        header.base_offset <= next,
                        "gap before {}",
                        header.base_offset
                    );
                    out.push((header.base_offset, checked.bytes.to_vec()));
                    next = header.next_offset();
                }
            }
            Err(ReadError::Corrupt { from, to, .. }) => {
                assert!(
                    report.corrupt.iter().any(|c| c.from <= next && next < c.to),
                    "read at {next} failed as corrupt [{from}, {to}) outside the reported ranges {:?}",
                    report.corrupt
                );
                assert!(to > next, "a corrupt range ends after the offset read");
                next = to;
            }
            Err(error) => panic!("read at {next} (end {}) failed: {error}", log.end_offset()),
        }
    }
    panic!("read loop bound exceeded");
}
