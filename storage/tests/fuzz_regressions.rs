//! Regression tests for bugs the fuzz targets found (`fuzz/`, `bash scripts/fuzz.sh`): one test
//! per bug, named after it. The fuzz inputs themselves are kept under `fuzz/regressions/` and
//! replayed by `cargo test --manifest-path fuzz/Cargo.toml`.

mod common;

use common::*;
use futures_lite::future::block_on;
use rkyv::util::AlignedVec;
use wharf_storage::batch::{
    check_batch, stamp, validate_batch, BatchBuilder, BatchError, ProducerStamp,
};
use wharf_storage::checkpoint::{
    Checkpoint, CheckpointState, CHECKPOINT_FILE_BYTES, CHECKPOINT_FILE_NAME,
};
use wharf_storage::disk::{Disk, DiskFile, PAGE_BYTES};
use wharf_storage::log::{index_file_name, segment_file_name, ReadError};
use wharf_storage::mem_disk::MemDisk;
use wharf_storage::{Epoch, Offset};

fn aligned(hex: &[&str]) -> AlignedVec<16> {
    let hex: String = hex.concat();
    let mut bytes = AlignedVec::<16>::new();
    for i in (0..hex.len()).step_by(2) {
        bytes.push(u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"));
    }
    bytes
}

/// `fuzz/regressions/batch_validation/timestamp-above-max` (with its CRCs repaired, as a producer
/// computes them): two records, first timestamp 1699999999995, max 1699999999998, but the
/// second record's delta is 1688849860263939. It passed `validate_batch`, so the broker accepted
/// it; list-offsets-by-time skips batches by `max_timestamp_ms`, and consumers compute
/// `first + delta`, which overflows i64 for larger deltas (a panic in debug builds).
#[test]
fn fuzz_record_timestamp_above_max_timestamp_is_invalid() {
    let batch = aligned(&[
        "5748524601000000158d47237947c29d000000000000000002000000010000000300000000000000ffffffffffffffff",
        "ffffffffd0000000fb67e5cf8b010000fe67e5cf8b01000000000000000000006b65792d306161616161306166373635",
        "3139313663643433646400007472616365ffffffe6ffffff10000000ffffffffffffffffe6ffffff0000000062626262",
        "62306166373635313931376364343364640000007472616365ffffffe5ffffff10000000ffffffffffffffffe5ffffff",
        "00000000000000000000000000000000010000007cffffff0500000079ffffff0500000088ffffff0200000000000000",
        "030000000000060000000000000000000000000088ffffff0500000098ffffff0200000000000000b0ffffff02000000",
    ]);
    let checked = check_batch(&batch).expect("header and CRCs are fine");
    assert!(matches!(
        checked.records(),
        Err(BatchError::BadHeader {
            field: "max_timestamp_ms",
            ..
        })
    ));
    assert!(validate_batch(&batch).is_err());
}

/// The builder stores timestamps as deltas from the first: one too far away to be represented
/// used to wrap silently; now the push is refused and the batch stays valid.
#[test]
fn fuzz_builder_refuses_a_timestamp_delta_that_overflows() {
    let mut builder = BatchBuilder::new(ProducerStamp::default());
    builder.push(i64::MIN + 10, None, b"a", &[]).expect("first");
    assert!(matches!(
        builder.push(i64::MAX, None, b"b", &[]),
        Err(BatchError::BadHeader {
            field: "timestamp_ms",
            ..
        })
    ));
    builder.push(-5, None, b"c", &[]).expect("representable");
    let batch = builder.finish().expect("finish");
    let checked = validate_batch(&batch).expect("valid");
    assert_eq!(checked.records().expect("records").len(), 2);
}

/// Appends `count` one-record batches of `value_bytes` and closes; returns the batch size.
fn write_log(disk: &MemDisk, count: u64, value_bytes: usize) -> u64 {
    let (mut log, _) = open(disk, small_config());
    let mut batch_bytes = 0;
    for tag in 0..count {
        let mut batch = make_batch(1, value_bytes, tag, tag as i64);
        batch_bytes = batch.len() as u64;
        log.append(&mut batch, EPOCH, 0).expect("append");
    }
    block_on(log.close()).expect("close");
    batch_bytes
}

/// `fuzz/regressions/recovery_scan/read-fails-on-good-batches-before-corrupt-one`: with small
/// batches (several per index interval) and a corrupt header inside the durable prefix, a read
/// from offset 0 failed as corrupt [0, 1) because a later batch in the same read was bad, and a
/// read just after the corrupt range failed too (the read walks batch headers from the last index
/// entry and cannot step over a corrupt header).
#[test]
fn fuzz_reads_around_a_corrupt_batch_return_the_good_batches() {
    let disk = MemDisk::new();
    let batch_bytes = write_log(&disk, 10, 10);
    // Base offset field of batch 3: its header CRC no longer matches.
    disk.flip_bit(&segment_file_name(Offset(0)), 3 * batch_bytes + 20, 0);
    let (log, report) = open(&disk, small_config());
    assert_eq!(report.corrupt.len(), 1, "{report:?}");
    assert_eq!(
        (report.corrupt[0].from, report.corrupt[0].to),
        (Offset(3), Offset(4))
    );
    let read = block_on(log.read(Offset(0), 64 * 1024)).expect("batches 0..3 are fine");
    assert_eq!(read.next_offset, Offset(3));
    assert!(matches!(
        block_on(log.read(Offset(3), 64 * 1024)),
        Err(ReadError::Corrupt { .. })
    ));
    let read = block_on(log.read(Offset(4), 64 * 1024)).expect("batches 4..10 are fine");
    assert_eq!(read.next_offset, Offset(10));
}

/// `fuzz/regressions/recovery_scan/corrupt-ranges-forgotten-on-reopen`: the first open after
/// corruption of a sealed segment's last batch reported it, then wrote the segment's index file;
/// the next open trusted that index and forgot the range, and reads of it came back empty (a
/// consumer stalled there) instead of failing as corrupt.
#[test]
fn fuzz_corrupt_ranges_are_reported_again_after_a_reopen() {
    let disk = MemDisk::new();
    let batch_bytes = write_log(&disk, 90, 1000);
    let (log, _) = open(&disk, small_config());
    let bases = log.segment_bases();
    drop(log);
    assert!(bases.len() >= 2, "the log rolled: {bases:?}");
    let last_of_first = bases[1].0 - 1;
    disk.flip_bit(
        &segment_file_name(Offset(0)),
        last_of_first * batch_bytes + 20,
        0,
    );
    // As after a crash before the sealed segment's index file was written: the open scans it.
    block_on(async {
        disk.remove(&index_file_name(Offset(0)))
            .await
            .expect("remove");
        disk.sync_dir().await.expect("sync_dir");
    });
    let (log, report) = open(&disk, small_config());
    assert_eq!(report.corrupt.len(), 1, "{report:?}");
    drop(log);
    let (log, again) = open(&disk, small_config());
    assert_eq!(again.corrupt, report.corrupt, "the reopen reports it again");
    assert!(matches!(
        block_on(log.read(Offset(last_of_first), 64 * 1024)),
        Err(ReadError::Corrupt { .. })
    ));
}

/// Writes `contents` as file `name` (zero-padded to a page) and syncs it.
fn write_file(disk: &MemDisk, name: &str, contents: &[u8]) {
    block_on(async {
        let file = disk.create(name).await.expect("create");
        let padded = contents.len().next_multiple_of(PAGE_BYTES);
        if padded > 0 {
            let mut buffer = disk.alloc_buffer(padded);
            buffer.as_mut_slice().fill(0);
            buffer[..contents.len()].copy_from_slice(contents);
            file.write_at(buffer, 0).await.expect("write");
        }
        file.sync().await.expect("sync");
        disk.sync_dir().await.expect("sync_dir");
    });
}

fn write_checkpoint(disk: &MemDisk, segment_base: Offset, position: u64, next_offset: Offset) {
    let checkpoint = Checkpoint {
        sequence: 5,
        state: CheckpointState::Normal,
        segment_base,
        position,
        next_offset,
    };
    let mut file = vec![0u8; CHECKPOINT_FILE_BYTES];
    let slot = checkpoint.slot() * PAGE_BYTES;
    file[slot..slot + PAGE_BYTES].copy_from_slice(&checkpoint.encode());
    write_file(disk, CHECKPOINT_FILE_NAME, &file);
}

/// `fuzz/regressions/recovery_scan/end-offset-goes-back-on-reopen`: both segment files empty
/// and a checkpoint vouching for offset 0 in segment 1. The first open reported [0, 1) corrupt
/// and ended the log at 1, then wrote a checkpoint (segment 0, position 0, next offset 1); the
/// second open stopped at position 0 without looking at that next offset and ended the log at 0,
/// so offset 0 would have been assigned again.
#[test]
fn fuzz_end_offset_never_goes_back_on_reopen() {
    let disk = MemDisk::new();
    write_file(&disk, &segment_file_name(Offset(0)), &[]);
    write_file(&disk, &segment_file_name(Offset(1)), &[]);
    write_checkpoint(&disk, Offset(1), 3328, Offset(1));
    let (log, report) = open(&disk, small_config());
    assert_eq!(log.end_offset(), Offset(1), "{report:?}");
    drop(log);
    let (log, again) = open(&disk, small_config());
    assert_eq!(log.end_offset(), Offset(1), "{again:?}");
    assert_eq!(again.corrupt, report.corrupt);
}

/// `fuzz/regressions/recovery_scan/batch-offsets-beyond-the-segment-range`: a CRC-valid batch
/// whose offsets lie more than 2^32 past the segment's base, found while resynchronising after
/// corrupt bytes in the durable prefix, panicked recovery ("segment offsets fit u32"). It is not
/// this segment's data: the scan skips it.
#[test]
fn fuzz_recovery_skips_a_batch_beyond_the_segment_offset_range() {
    let mut first = make_batch(1, 8, 1, 0);
    stamp(&mut first, Offset(0), Epoch(1));
    let mut far = make_batch(1, 8, 2, 0);
    stamp(&mut far, Offset(5_000_000_000), Epoch(1));
    let mut segment = first.to_vec();
    segment.extend_from_slice(&[0x55; 16]);
    segment.extend_from_slice(&far);
    let disk = MemDisk::new();
    write_file(&disk, &segment_file_name(Offset(0)), &segment);
    write_checkpoint(&disk, Offset(0), segment.len() as u64, Offset(1));
    let (log, report) = open(&disk, small_config());
    assert_eq!(log.end_offset(), Offset(1), "{report:?}");
    assert_eq!(read_all(&log).len(), 1);
}

/// `fuzz/regressions/recovery_scan/vouched-empty-last-segment-dropped`: empty segment files and
/// a checkpoint vouching for offsets up to 7 at the start of segment 1. Recovery reported [1, 7)
/// corrupt, then dropped segment 1 as an empty roll, so the log ended at 1 with a corrupt range
/// beyond its end, and a reopen forgot the range.
#[test]
fn fuzz_an_empty_last_segment_the_checkpoint_vouches_for_is_kept() {
    let disk = MemDisk::new();
    write_file(&disk, &segment_file_name(Offset(0)), &[]);
    write_file(&disk, &segment_file_name(Offset(1)), &[]);
    write_checkpoint(&disk, Offset(1), 0, Offset(7));
    let (log, report) = open(&disk, small_config());
    assert_eq!(log.end_offset(), Offset(7), "{report:?}");
    assert!(report.removed_segments.is_empty(), "{report:?}");
    drop(log);
    let (log, again) = open(&disk, small_config());
    assert_eq!(log.end_offset(), Offset(7), "{again:?}");
    assert_eq!(again.corrupt, report.corrupt);
}

/// `fuzz/regressions/recovery_scan/sealed-segment-runs-past-next-base`: a segment the checkpoint
/// proves wholly durable whose batches run past the next segment's base offset panicked recovery
/// ("complete segments return above"). Such a batch is not this segment's data: its offsets are
/// reported corrupt up to the next base.
#[test]
fn fuzz_a_sealed_segment_running_past_the_next_base_is_corrupt_not_a_panic() {
    let mut batch = make_batch(4, 8, 1, 0);
    stamp(&mut batch, Offset(0), Epoch(1));
    let disk = MemDisk::new();
    write_file(&disk, &segment_file_name(Offset(0)), &batch);
    write_file(&disk, &segment_file_name(Offset(2)), &[]);
    write_checkpoint(&disk, Offset(2), 0, Offset(2));
    let (log, report) = open(&disk, small_config());
    assert_eq!(report.corrupt.len(), 1, "{report:?}");
    assert_eq!(
        (report.corrupt[0].from, report.corrupt[0].to),
        (Offset(0), Offset(2))
    );
    assert_eq!(log.end_offset(), Offset(2));
}

/// `fuzz/regressions/recovery_scan/read-retries-forever-on-a-misplaced-batch`: a CRC-valid batch
/// with the wrong offsets between two good ones (recovery reports its range corrupt) made every
/// read from before it fail with `Retry` ("the segment changed while it was read"), so a
/// consumer retried forever. Reads now end before a batch that does not continue the offsets.
#[test]
fn fuzz_a_misplaced_batch_ends_a_read_instead_of_a_retry() {
    let mut first = make_batch(2, 8, 1, 0);
    stamp(&mut first, Offset(0), Epoch(1));
    let mut misplaced = make_batch(1, 8, 2, 0);
    stamp(&mut misplaced, Offset(1 << 40), Epoch(1));
    let mut last = make_batch(3, 8, 3, 0);
    stamp(&mut last, Offset(3), Epoch(1));
    let segment = [first.to_vec(), misplaced.to_vec(), last.to_vec()].concat();
    let disk = MemDisk::new();
    write_file(&disk, &segment_file_name(Offset(0)), &segment);
    write_checkpoint(&disk, Offset(0), segment.len() as u64, Offset(6));
    let (log, report) = open(&disk, small_config());
    assert_eq!(report.corrupt.len(), 1, "{report:?}");
    let read = block_on(log.read(Offset(0), 64 * 1024)).expect("the first batch");
    assert_eq!(read.next_offset, Offset(2));
    assert!(matches!(
        block_on(log.read(Offset(2), 64 * 1024)),
        Err(ReadError::Corrupt { .. })
    ));
    let read = block_on(log.read(Offset(3), 64 * 1024)).expect("the last batch");
    assert_eq!(read.next_offset, Offset(6));
}

/// `fuzz/regressions/recovery_scan/reopen-corrupt-ranges-differ` (CI, 2026-12-05): a segment
/// file whose tail was lost in the middle of its last batch, the lost bytes all zeros, and a
/// checkpoint vouching for bytes past the file's end. The first open found the batch cut off
/// and reported its offsets corrupt, then zero-filled the file up to the checkpoint's position
/// (where the log goes on); the next open found the batch whole and reported narrower corrupt
/// ranges. The scan now extends the file first, so both opens read the same bytes.
#[test]
fn fuzz_a_lost_zero_tail_reads_the_same_on_every_open() {
    let mut batch = make_batch(1, 8, 1, 0);
    stamp(&mut batch, Offset(0), Epoch(1));
    let zeros = batch.iter().rev().take_while(|b| **b == 0).count();
    assert!(zeros > 0, "the test needs a batch that ends in zero bytes");
    let kept = batch.len() - zeros;
    let disk = MemDisk::new();
    let name = segment_file_name(Offset(0));
    write_file(&disk, &name, &batch[..kept]);
    block_on(async {
        let file = disk.open(&name).await.expect("open");
        file.set_len(kept as u64).await.expect("set_len");
        file.sync().await.expect("sync");
    });
    write_checkpoint(&disk, Offset(0), PAGE_BYTES as u64 * 2, Offset(3));
    let (log, report) = open(&disk, small_config());
    assert_eq!(log.end_offset(), Offset(3), "{report:?}");
    assert!(block_on(log.read(Offset(0), batch.len())).is_ok());
    drop(log);
    let (log, again) = open(&disk, small_config());
    assert_eq!(
        again.corrupt, report.corrupt,
        "the reopen reads the same log"
    );
    assert!(block_on(log.read(Offset(0), batch.len())).is_ok());
    assert_eq!(
        report.corrupt.first().map(|c| c.from),
        Some(Offset(1)),
        "the batch cut by the lost zeros is whole: {report:?}"
    );
}
