//! A log test suite generic over the [`Disk`], so the same checks run on `MemDisk` and on the
//! glommio `DmaDisk` against real files. Each check uses its own directory from the harness.

use std::rc::Rc;

use crate::batch::{self, BatchBuilder, ProducerStamp, BATCH_HEADER_BYTES};
use crate::disk::Disk;
use crate::ids::{Epoch, Offset};
use crate::log::{segment_file_name, AppendMode, LogConfig, PartitionLog, ReadError};
use crate::policy::RetentionLimits;
use rkyv::util::AlignedVec;

/// What a test environment provides: fresh directories, and a way to damage a file.
#[expect(async_fn_in_trait, reason = "single-threaded executors")]
pub trait Harness {
    type D: Disk;
    /// A handle on directory `dir` (created empty on first use). Calling it again for the same
    /// `dir` gives a new handle on the same files, as after a process restart.
    async fn disk(&self, dir: &str) -> Self::D;
    /// Flips one bit of `file` in `dir`, on the medium.
    fn flip_bit(&self, dir: &str, file: &str, position: u64);
}

const LEADER: AppendMode = AppendMode::Leader {
    leader_epoch: Epoch(1),
};

pub fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 256 * 1024,
        index_interval_bytes: 1024,
        write_chunk_bytes: 16 * 1024,
        scan_chunk_bytes: 64 * 1024,
        staged_bytes_max: 16 * 1024 * 1024,
        ..LogConfig::default()
    }
}

/// A batch of `records` records of `value_bytes` each, keyed and filled from `tag`, with
/// timestamps from `timestamp_ms`.
pub fn make_batch(
    records: usize,
    value_bytes: usize,
    tag: u64,
    timestamp_ms: i64,
) -> AlignedVec<16> {
    let mut builder = BatchBuilder::new(ProducerStamp::default());
    for i in 0..records {
        let value = vec![(tag as u8).wrapping_add(i as u8); value_bytes];
        builder
            .push(
                timestamp_ms + i as i64,
                Some(&tag.to_le_bytes()),
                &value,
                &[],
            )
            .expect("push");
    }
    builder.finish().expect("finish")
}

async fn open<H: Harness>(
    harness: &H,
    dir: &str,
    config: LogConfig,
) -> (PartitionLog<H::D>, crate::RecoveryReport) {
    PartitionLog::open(Rc::new(harness.disk(dir).await), config, 0)
        .await
        .expect("open")
}

/// Every batch from log start to end, checked (CRC, rkyv, dense offsets).
pub async fn read_all<D: Disk>(log: &PartitionLog<D>) -> Vec<(Offset, Vec<u8>)> {
    let mut out = Vec::new();
    let mut next = log.log_start_offset();
    for _ in 0..1_000_000 {
        if next >= log.end_offset() {
            return out;
        }
        let read = log.read(next, 64 * 1024).await.expect("read");
        assert!(
            !read.is_empty(),
            "empty read at {next} below end {}",
            log.end_offset()
        );
        for checked in batch::batches(read.bytes()) {
            let checked = checked.expect("valid batch");
            checked.records().expect("rkyv-valid body");
            if checked.header.next_offset() <= next {
                continue;
            }
            assert_eq!(checked.header.base_offset, next, "offsets are dense");
            out.push((next, checked.bytes.to_vec()));
            next = checked.header.next_offset();
        }
    }
    panic!("read loop bound exceeded");
}

/// Asserts two batch lists are equal, naming the first difference instead of dumping bytes.
pub fn assert_same_batches(got: &[(Offset, Vec<u8>)], expected: &[(Offset, Vec<u8>)]) {
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert_eq!(g.0, e.0, "batch {i}: offset");
        assert!(
            g.1 == e.1,
            "batch {i} at offset {}: bytes differ ({} vs {} bytes)",
            g.0,
            g.1.len(),
            e.1.len()
        );
    }
    assert_eq!(got.len(), expected.len(), "batch count");
}

/// Runs every check in the suite.
pub async fn run_all<H: Harness>(harness: &H) {
    round_trip_and_restart(harness).await;
    large_batches_span_write_chunks(harness).await;
    appends_during_flush(harness).await;
    truncate_and_restart(harness).await;
    retention(harness).await;
    bit_flip_is_reported(harness).await;
}

pub async fn round_trip_and_restart<H: Harness>(harness: &H) {
    let (mut log, _) = open(harness, "round-trip", config()).await;
    let mut expected = Vec::new();
    for tag in 0..300u64 {
        let mut batch = make_batch(
            1 + (tag % 4) as usize,
            300 + (tag as usize * 37) % 2000,
            tag,
            tag as i64,
        );
        let appended = log.append(&mut batch, LEADER, 0).expect("append");
        expected.push((appended.base_offset, batch.to_vec()));
        if tag % 11 == 0 {
            log.flush().await.expect("flush");
        }
    }
    log.flush().await.expect("flush");
    assert!(log.segment_count() > 2, "segments roll");
    assert_same_batches(&read_all(&log).await, &expected);
    let end = log.end_offset();
    // A restart without close (kill -9): flushed data survives, bytes identical.
    drop(log);
    let (log, report) = open(harness, "round-trip", config()).await;
    assert!(report.corrupt.is_empty(), "{report:?}");
    assert_eq!(log.end_offset(), end);
    assert_same_batches(&read_all(&log).await, &expected);
    log.close().await.expect("close");
    let (log, report) = open(harness, "round-trip", config()).await;
    assert_eq!(
        report.scanned_segments, 1,
        "only the active segment is scanned after a clean close"
    );
    assert_same_batches(&read_all(&log).await, &expected);
}

pub async fn large_batches_span_write_chunks<H: Harness>(harness: &H) {
    let (mut log, _) = open(harness, "large", config()).await;
    let mut expected = Vec::new();
    for tag in 0..6 {
        // 100 KiB batches in 16 KiB write chunks.
        let mut batch = make_batch(10, 10_000, tag, tag as i64);
        log.append(&mut batch, LEADER, 0).expect("append");
        expected.push(batch.to_vec());
    }
    log.flush().await.expect("flush");
    drop(log);
    let (log, _) = open(harness, "large", config()).await;
    let got: Vec<Vec<u8>> = read_all(&log).await.into_iter().map(|(_, b)| b).collect();
    assert_eq!(got.len(), expected.len(), "batch count");
    assert!(got == expected, "large batches differ after restart");
}

pub async fn appends_during_flush<H: Harness>(harness: &H) {
    let (mut log, _) = open(harness, "in-flight", config()).await;
    for tag in 0..10 {
        log.append(&mut make_batch(2, 1000, tag, tag as i64), LEADER, 0)
            .expect("append");
    }
    let job = log.begin_flush().expect("begin").expect("job");
    for tag in 10..20 {
        log.append(&mut make_batch(2, 1000, tag, tag as i64), LEADER, 0)
            .expect("append");
    }
    assert_eq!(
        log.complete_flush(job.run().await).expect("complete"),
        Offset(20)
    );
    assert_eq!(log.flush().await.expect("flush"), Offset(40));
    let all = read_all(&log).await;
    drop(log);
    let (log, _) = open(harness, "in-flight", config()).await;
    assert_same_batches(&read_all(&log).await, &all);
}

pub async fn truncate_and_restart<H: Harness>(harness: &H) {
    let (mut log, _) = open(harness, "truncate", config()).await;
    let mut bases = Vec::new();
    for tag in 0..200 {
        bases.push(
            log.append(&mut make_batch(1, 3000, tag, tag as i64), LEADER, 0)
                .expect("append")
                .base_offset,
        );
    }
    log.flush().await.expect("flush");
    log.truncate_suffix(bases[50]).await.expect("truncate");
    assert_eq!(log.end_offset(), bases[50]);
    for tag in 500..510 {
        log.append(&mut make_batch(1, 100, tag, tag as i64), LEADER, 0)
            .expect("append");
    }
    log.flush().await.expect("flush");
    let expected = read_all(&log).await;
    assert_eq!(expected.len(), 60);
    drop(log);
    let (log, report) = open(harness, "truncate", config()).await;
    assert!(report.corrupt.is_empty());
    assert_same_batches(&read_all(&log).await, &expected);
}

pub async fn retention<H: Harness>(harness: &H) {
    let config = LogConfig {
        retention: RetentionLimits {
            retention_bytes_max: Some(600 * 1024),
            retention_ms_max: None,
        },
        ..config()
    };
    let (mut log, _) = open(harness, "retention", config.clone()).await;
    for tag in 0..1000 {
        log.append(&mut make_batch(1, 2000, tag, tag as i64), LEADER, 0)
            .expect("append");
    }
    log.flush().await.expect("flush");
    let deleted = log.apply_retention(0).await.expect("retention");
    assert!(deleted > 0);
    let start = log.log_start_offset();
    assert!(start > Offset(0));
    assert!(matches!(
        log.read(Offset(0), 1).await,
        Err(ReadError::OutOfRange { .. })
    ));
    drop(log);
    let (log, _) = open(harness, "retention", config).await;
    assert_eq!(log.log_start_offset(), start);
    assert_eq!(read_all(&log).await.len() as u64, 1000 - start.0);
}

pub async fn bit_flip_is_reported<H: Harness>(harness: &H) {
    let (mut log, _) = open(harness, "bit-flip", config()).await;
    let mut position = 0u64;
    let mut target = 0u64;
    for tag in 0..40 {
        let mut batch = make_batch(1, 1000, tag, tag as i64);
        if tag == 20 {
            target = position;
        }
        position += batch.len() as u64;
        log.append(&mut batch, LEADER, 0).expect("append");
    }
    log.close().await.expect("close");
    harness.flip_bit(
        "bit-flip",
        &segment_file_name(Offset(0)),
        target + BATCH_HEADER_BYTES as u64 + 10,
    );
    let (log, report) = open(harness, "bit-flip", config()).await;
    assert_eq!(report.corrupt.len(), 1, "{report:?}");
    assert_eq!(log.end_offset(), Offset(40), "nothing truncated");
    assert!(matches!(
        log.read(Offset(20), 10).await,
        Err(ReadError::Corrupt { .. })
    ));
    assert!(log.read(Offset(21), 10).await.is_ok());
}
