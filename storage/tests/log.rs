//! Partition log behaviour on MemDisk: append, flush, read, roll, truncate, retention, faults.

mod common;

use common::*;
use futures_lite::future::block_on;
use wharf_storage::batch::{self, BATCH_HEADER_BYTES};
use wharf_storage::log::{
    index_file_name, segment_file_name, AppendError, AppendMode, FlushError, LogConfig, ReadError,
};
use wharf_storage::mem_disk::{CrashMode, MemDisk};
use wharf_storage::policy::RetentionLimits;
use wharf_storage::{Epoch, Offset};

#[test]
fn append_flush_read_round_trip_across_segments() {
    let disk = MemDisk::new();
    let (mut log, report) = open(&disk, small_config());
    assert_eq!(report.segments, 1);
    let mut expected = Vec::new();
    for tag in 0..200u64 {
        let mut batch = make_batch(3, 700, tag, 1000 + tag as i64);
        let appended = log.append(&mut batch, EPOCH, 0).expect("append");
        assert_eq!(appended.base_offset, Offset(tag * 3));
        assert_eq!(appended.last_offset, Offset(tag * 3 + 2));
        expected.push((appended.base_offset, batch.to_vec()));
        if tag % 7 == 0 {
            block_on(log.flush()).expect("flush");
            assert_eq!(log.durable_offset(), log.end_offset());
        }
    }
    assert!(
        log.durable_offset() < log.end_offset(),
        "tail not yet flushed"
    );
    // Staged (unflushed) data is readable from memory, flushed data from disk.
    assert_same_batches(&read_all(&log), &expected);
    block_on(log.flush()).expect("flush");
    assert!(
        log.segment_count() > 3,
        "small segments roll: {}",
        log.segment_count()
    );
    assert_same_batches(&read_all(&log), &expected);
    // Sealed segments have their index files.
    for base in &log.segment_bases()[..log.segment_count() - 1] {
        assert!(
            disk.contents(&index_file_name(*base)).is_some(),
            "index of {base}"
        );
    }
    drop(log);
    let (log, report) = open(&disk, small_config());
    assert!(report.corrupt.is_empty());
    assert_eq!(report.torn_tail_at, None);
    assert_eq!(
        report.scanned_segments, 1,
        "sealed segments with valid indexes are not rescanned"
    );
    assert_eq!(log.end_offset(), Offset(600));
    assert_same_batches(&read_all(&log), &expected);
}

#[test]
fn read_positions_inside_a_batch_return_that_batch() {
    let disk = MemDisk::new();
    let (mut log, _) = open(&disk, small_config());
    for tag in 0..10 {
        log.append(&mut make_batch(4, 10, tag, 0), EPOCH, 0)
            .expect("append");
    }
    block_on(log.flush()).expect("flush");
    let read = block_on(log.read(Offset(6), 1)).expect("read");
    let first = batch::check_batch(read.bytes()).expect("batch");
    assert_eq!(first.header.base_offset, Offset(4));
    assert_eq!(read.next_offset, Offset(8));
    assert!(block_on(log.read(Offset(40), 100))
        .expect("at end")
        .is_empty());
    assert!(matches!(
        block_on(log.read(Offset(41), 100)),
        Err(ReadError::OutOfRange { .. })
    ));
}

#[test]
fn group_commit_shares_one_sync_among_many_appends() {
    let disk = MemDisk::new();
    let (mut log, _) = open(
        &disk,
        LogConfig {
            write_chunk_bytes: 64 * 1024,
            ..small_config()
        },
    );
    block_on(log.flush()).expect("settle");
    let syncs_before = disk.stats().syncs;
    for tag in 0..20 {
        log.append(&mut make_batch(1, 100, tag, 0), EPOCH, 0)
            .expect("append");
    }
    block_on(log.flush()).expect("flush");
    let syncs = disk.stats().syncs - syncs_before;
    // One fdatasync for the segment (plus at most one for the checkpoint), not one per append.
    assert!(syncs <= 2, "{syncs} syncs for 20 appends");
    assert_eq!(log.durable_offset(), Offset(20));
}

#[test]
fn appends_continue_while_a_flush_is_in_flight() {
    let disk = MemDisk::new();
    let (mut log, _) = open(&disk, small_config());
    for tag in 0..5 {
        log.append(&mut make_batch(2, 500, tag, 0), EPOCH, 0)
            .expect("append");
    }
    let job = log.begin_flush().expect("begin").expect("work to do");
    // Staged while the first flush is in flight: goes to the next flush.
    for tag in 5..9 {
        log.append(&mut make_batch(2, 500, tag, 0), EPOCH, 0)
            .expect("append");
    }
    assert!(log.flush_in_flight());
    let durable = log.complete_flush(block_on(job.run())).expect("complete");
    assert_eq!(durable, Offset(10));
    assert_eq!(log.end_offset(), Offset(18));
    block_on(log.flush()).expect("second flush");
    assert_eq!(log.durable_offset(), Offset(18));
    let expected_len = read_all(&log).len();
    drop(log);
    disk.crash(CrashMode::LoseUnsynced);
    let (log, _) = open(&disk, small_config());
    assert_eq!(read_all(&log).len(), expected_len);
}

#[test]
fn replica_appends_keep_leader_offsets_and_refuse_gaps() {
    let disk = MemDisk::new();
    let (mut log, _) = open(&disk, small_config());
    let mut batch = make_batch(2, 10, 0, 0);
    batch::stamp(&mut batch, Offset(0), Epoch(7));
    let appended = log
        .append(&mut batch, AppendMode::Replica, 0)
        .expect("append");
    assert_eq!(appended.leader_epoch, Epoch(7));
    let mut gap = make_batch(1, 10, 1, 0);
    batch::stamp(&mut gap, Offset(5), Epoch(7));
    assert!(matches!(
        log.append(&mut gap, AppendMode::Replica, 0),
        Err(AppendError::OffsetMismatch {
            expected: Offset(2),
            found: Offset(5)
        })
    ));
}

#[test]
fn malformed_batches_are_refused_and_change_nothing() {
    let disk = MemDisk::new();
    let (mut log, _) = open(&disk, small_config());
    let mut good = make_batch(1, 10, 0, 0);
    let mut bad_crc = good.to_vec();
    let last = bad_crc.len() - 20;
    bad_crc[last] ^= 1;
    assert!(matches!(
        log.append(&mut bad_crc, EPOCH, 0),
        Err(AppendError::InvalidBatch(_))
    ));
    assert!(matches!(
        log.append(&mut good[..40], EPOCH, 0),
        Err(AppendError::InvalidBatch(_))
    ));
    let mut garbage = vec![0xAB; 300];
    assert!(matches!(
        log.append(&mut garbage, EPOCH, 0),
        Err(AppendError::InvalidBatch(_))
    ));
    assert_eq!(log.end_offset(), Offset(0));
    assert_eq!(log.staged_bytes(), 0);
    log.append(&mut good, EPOCH, 0)
        .expect("a good batch still appends");
}

#[test]
fn backpressure_when_too_much_is_staged() {
    let disk = MemDisk::new();
    let config = small_config();
    let limit = config.staged_bytes_max;
    let (mut log, _) = open(&disk, config);
    let mut appended = 0usize;
    let error = loop {
        match log.append(&mut make_batch(10, 20_000, 0, 0), EPOCH, 0) {
            Ok(_) => appended += 1,
            Err(error) => break error,
        }
        assert!(appended < 10_000, "limit never hit");
    };
    assert!(matches!(error, AppendError::Backpressure { limit_bytes, .. } if limit_bytes == limit));
    block_on(log.flush()).expect("flush");
    log.append(&mut make_batch(1, 10, 0, 0), EPOCH, 0)
        .expect("room again");
}

#[test]
fn truncate_suffix_is_durable_and_appends_continue() {
    let disk = MemDisk::new();
    let (mut log, _) = open(&disk, small_config());
    let mut bases = Vec::new();
    for tag in 0..120 {
        bases.push(
            log.append(&mut make_batch(2, 900, tag, 0), EPOCH, 0)
                .expect("append")
                .base_offset,
        );
    }
    block_on(log.flush()).expect("flush");
    let segments_before = log.segment_count();
    let to = bases[40];
    assert!(matches!(
        block_on(log.truncate_suffix(to.plus(1))),
        Err(wharf_storage::log::TruncateError::NotBatchBoundary { .. })
    ));
    block_on(log.truncate_suffix(to)).expect("truncate");
    assert_eq!(log.end_offset(), to);
    assert!(log.segment_count() < segments_before);
    let kept = read_all(&log);
    assert_eq!(kept.len(), 40);
    // New data after the cut, then a crash that loses nothing synced.
    for tag in 1000..1010 {
        log.append(&mut make_batch(1, 100, tag, 0), EPOCH, 0)
            .expect("append");
    }
    block_on(log.flush()).expect("flush");
    let expected = read_all(&log);
    drop(log);
    disk.crash(CrashMode::LoseUnsynced);
    let (log, report) = open(&disk, small_config());
    assert!(report.corrupt.is_empty());
    assert_same_batches(&read_all(&log), &expected);
}

#[test]
fn interrupted_truncation_completes_on_recovery() {
    // Fail the sync that follows the segment cut: the Truncating checkpoint is durable, the cut
    // may or may not be. Recovery must finish the truncation either way.
    for fail_at in 1..5u64 {
        let disk = MemDisk::new();
        let (mut log, _) = open(&disk, small_config());
        for tag in 0..60 {
            log.append(&mut make_batch(2, 900, tag, 0), EPOCH, 0)
                .expect("append");
        }
        block_on(log.flush()).expect("flush");
        let to = Offset(40);
        disk.fail_syncs_after(Some(fail_at));
        let result = block_on(log.truncate_suffix(to));
        disk.fail_syncs_after(None);
        drop(log);
        disk.crash(CrashMode::Random {
            seed: fail_at,
            tear_bytes: wharf_storage::mem_disk::SECTOR_BYTES,
        });
        let (log, report) = open(&disk, small_config());
        let end = log.end_offset();
        assert!(
            end == to || (result.is_err() && end == Offset(120)),
            "fail_at {fail_at}: end {end} {result:?} {report:?}"
        );
        if report.finished_truncation {
            assert_eq!(end, to);
        }
        assert!(report.corrupt.is_empty(), "fail_at {fail_at}: {report:?}");
        assert_eq!(read_all(&log).len() as u64, end.0 / 2);
    }
}

#[test]
fn retention_deletes_whole_sealed_segments_by_size_and_time() {
    let disk = MemDisk::new();
    let config = LogConfig {
        retention: RetentionLimits {
            retention_bytes_max: Some(150 * 1024),
            retention_ms_max: None,
        },
        ..small_config()
    };
    let (mut log, _) = open(&disk, config.clone());
    for tag in 0..400 {
        log.append(&mut make_batch(1, 1000, tag, tag as i64), EPOCH, 0)
            .expect("append");
    }
    block_on(log.flush()).expect("flush");
    let before = log.segment_count();
    let deleted = block_on(log.apply_retention(0)).expect("retention");
    assert!(deleted > 0 && log.segment_count() == before - deleted);
    let start = log.log_start_offset();
    assert_eq!(start, log.segment_bases()[0]);
    assert!(!disk.file_names().contains(&segment_file_name(Offset(0))));
    assert!(matches!(
        block_on(log.read(Offset(0), 10)),
        Err(ReadError::OutOfRange { .. })
    ));
    assert_eq!(read_all(&log).first().map(|(o, _)| *o), Some(start));
    drop(log);
    let (log, _) = open(&disk, config);
    assert_eq!(log.log_start_offset(), start);

    // By time: segments whose newest record is older than the limit go.
    let disk = MemDisk::new();
    let config = LogConfig {
        retention: RetentionLimits {
            retention_bytes_max: None,
            retention_ms_max: Some(1000),
        },
        ..small_config()
    };
    let (mut log, _) = open(&disk, config);
    for tag in 0..200 {
        log.append(&mut make_batch(1, 1000, tag, tag as i64 * 10), EPOCH, 0)
            .expect("append");
    }
    block_on(log.flush()).expect("flush");
    assert_eq!(
        block_on(log.apply_retention(0)).expect("nothing old yet"),
        0
    );
    let deleted = block_on(log.apply_retention(2500)).expect("retention");
    assert!(deleted > 0 && deleted < log.segment_count() + deleted);
}

#[test]
fn delete_below_removes_only_whole_durable_segments_below_the_offset() {
    let disk = MemDisk::new();
    let (mut log, _) = open(&disk, small_config());
    for tag in 0..400 {
        log.append(&mut make_batch(1, 1000, tag, tag as i64), EPOCH, 0)
            .expect("append");
    }
    // Nothing is durable yet: nothing may go.
    assert_eq!(block_on(log.delete_below(Offset(300))).expect("delete"), 0);
    block_on(log.flush()).expect("flush");
    let before = log.segment_count();
    let deleted = block_on(log.delete_below(Offset(200))).expect("delete");
    assert!(deleted > 0 && log.segment_count() == before - deleted);
    let start = log.log_start_offset();
    assert!(start <= Offset(200) && start > Offset(0), "start {start}");
    assert_eq!(start, log.segment_bases()[0]);
    assert_eq!(read_all(&log).first().map(|(o, _)| *o), Some(start));
    assert_eq!(read_all(&log).len() as u64, 400 - start.0);
    // Far beyond the end: every sealed segment goes, never the active one.
    block_on(log.delete_below(Offset(u64::MAX))).expect("delete");
    assert_eq!(log.segment_count(), 1);
    assert_eq!(log.end_offset(), Offset(400));
    let start = log.log_start_offset();
    drop(log);
    let (log, _) = open(&disk, small_config());
    assert_eq!(log.log_start_offset(), start, "the start survives a reopen");
    assert_eq!(log.end_offset(), Offset(400));
}

#[test]
fn sync_error_poisons_the_log() {
    let disk = MemDisk::new();
    let (mut log, _) = open(&disk, small_config());
    log.append(&mut make_batch(1, 10, 0, 0), EPOCH, 0)
        .expect("append");
    block_on(log.flush()).expect("flush");
    log.append(&mut make_batch(1, 10, 1, 0), EPOCH, 0)
        .expect("append");
    disk.fail_syncs_after(Some(1));
    assert!(matches!(block_on(log.flush()), Err(FlushError::Io(_))));
    disk.fail_syncs_after(None);
    assert!(log.poisoned().is_some());
    assert!(matches!(
        log.append(&mut make_batch(1, 10, 2, 0), EPOCH, 0),
        Err(AppendError::Poisoned(_))
    ));
    assert!(matches!(
        block_on(log.flush()),
        Err(FlushError::Poisoned(_))
    ));
    assert_eq!(
        log.durable_offset(),
        Offset(1),
        "the failed flush acknowledged nothing"
    );
    drop(log);
    disk.crash(CrashMode::LoseUnsynced);
    let (log, _) = open(&disk, small_config());
    assert!(
        log.end_offset() >= Offset(1),
        "acknowledged data survives restart"
    );
}

#[test]
fn enospc_is_a_clear_error_and_loses_nothing_acknowledged() {
    let disk = MemDisk::new();
    let config = LogConfig {
        preallocate: false,
        ..small_config()
    };
    let (mut log, _) = open(&disk, config.clone());
    for tag in 0..10 {
        log.append(&mut make_batch(1, 1000, tag, 0), EPOCH, 0)
            .expect("append");
    }
    block_on(log.flush()).expect("flush");
    let acknowledged = read_all(&log);
    let used: u64 = disk
        .file_names()
        .iter()
        .map(|n| disk.contents(n).map_or(0, |c| c.len() as u64))
        .sum();
    disk.set_capacity(Some(used + 4096));
    for tag in 10..40 {
        log.append(&mut make_batch(1, 1000, tag, 0), EPOCH, 0)
            .expect("append");
    }
    let error = block_on(log.flush()).expect_err("disk full");
    let message = error.to_string();
    assert!(
        message.contains("write") && message.contains("28"),
        "clear error: {message}"
    );
    assert!(log.poisoned().is_some());
    drop(log);
    disk.set_capacity(None);
    disk.crash(CrashMode::LoseUnsynced);
    let (log, _) = open(&disk, config);
    assert_same_batches(&read_all(&log)[..acknowledged.len()], &acknowledged);
}

#[test]
fn bit_flip_in_a_flushed_segment_is_reported_not_truncated() {
    let disk = MemDisk::new();
    let config = LogConfig {
        segment_bytes_max: 1024 * 1024,
        ..small_config()
    };
    let (mut log, _) = open(&disk, config.clone());
    let mut positions = Vec::new();
    let mut position = 0u64;
    for tag in 0..50 {
        let mut batch = make_batch(2, 1000, tag, 0);
        positions.push(position);
        position += batch.len() as u64;
        log.append(&mut batch, EPOCH, 0).expect("append");
    }
    block_on(log.flush()).expect("flush");
    let end = log.end_offset();
    block_on(log.close()).expect("close");
    // Flip a bit in the body of batch 20 (offsets 40..42), in the middle of the active segment.
    disk.flip_bit(
        &segment_file_name(Offset(0)),
        positions[20] + BATCH_HEADER_BYTES as u64 + 100,
        3,
    );
    let (log, report) = open(&disk, config);
    assert_eq!(report.corrupt.len(), 1, "{report:?}");
    assert_eq!(
        (report.corrupt[0].from, report.corrupt[0].to),
        (Offset(40), Offset(42))
    );
    assert_eq!(log.end_offset(), end, "nothing truncated");
    assert!(matches!(
        block_on(log.read(Offset(40), 100)),
        Err(ReadError::Corrupt { .. })
    ));
    assert!(matches!(
        block_on(log.read(Offset(41), 100)),
        Err(ReadError::Corrupt { .. })
    ));
    let after = block_on(log.read(Offset(42), 100)).expect("batches after the damage are served");
    assert_eq!(
        batch::check_batch(after.bytes())
            .expect("valid")
            .header
            .base_offset,
        Offset(42)
    );
    assert!(block_on(log.read(Offset(0), 100)).is_ok());
}

#[test]
fn bit_flip_in_a_sealed_segment_is_caught_on_read() {
    let disk = MemDisk::new();
    let (mut log, _) = open(&disk, small_config());
    for tag in 0..100 {
        log.append(&mut make_batch(1, 1500, tag, 0), EPOCH, 0)
            .expect("append");
    }
    // A clean shutdown writes the index files of sealed segments and a current checkpoint.
    block_on(log.close()).expect("close");
    disk.flip_bit(&segment_file_name(Offset(0)), 200, 0);
    let (log, _) = open(&disk, small_config());
    assert!(matches!(
        block_on(log.read(Offset(0), 100)),
        Err(ReadError::Corrupt { .. })
    ));
    assert!(block_on(log.read(Offset(99), 100)).is_ok());
}

#[test]
fn reopening_an_empty_log_is_empty() {
    let disk = MemDisk::new();
    let (log, _) = open(&disk, small_config());
    assert_eq!(log.end_offset(), Offset(0));
    drop(log);
    let (mut log, report) = open(&disk, small_config());
    assert_eq!(report.segments, 1);
    log.append(&mut make_batch(1, 1, 0, 0), EPOCH, 0)
        .expect("append");
}

#[test]
fn invalid_config_is_refused() {
    let disk = MemDisk::new();
    let config = wharf_storage::LogConfig {
        segment_bytes_max: 1000,
        ..small_config()
    };
    let result = block_on(wharf_storage::PartitionLog::open(
        std::rc::Rc::new(disk),
        config,
        0,
    ));
    assert!(matches!(result, Err(wharf_storage::OpenError::Config(_))));
}

/// A log that keeps one recycled segment file, and the value size that makes every batch exactly
/// one page. With page-sized batches every end of data is page-aligned, so after the last batch a
/// reused file holds an intact stale batch header (a flush zero-fills only the rest of its last
/// page): the hardest case for recovery and reads.
fn recycling_log_with_page_batches() -> (
    MemDisk,
    LogConfig,
    wharf_storage::PartitionLog<MemDisk>,
    usize,
) {
    let disk = MemDisk::new();
    let config = LogConfig {
        retention: RetentionLimits {
            retention_bytes_max: Some(100 * 1024),
            retention_ms_max: None,
        },
        recycled_segments_max: 1,
        // These tests are about what disk reads see: keep recent batches out of memory.
        recent_bytes_max: 0,
        ..small_config()
    };
    let value_bytes = (3000..4096)
        .find(|v| make_batch(1, *v, 0, 0).len() == 4096)
        .expect("a page-sized batch");
    let (log, _) = open(&disk, config.clone());
    (disk, config, log, value_bytes)
}

#[test]
fn recycled_segment_files_never_resurrect_stale_batches() {
    let (disk, config, mut log, value_bytes) = recycling_log_with_page_batches();
    for tag in 0..200 {
        log.append(&mut make_batch(1, value_bytes, tag, 0), EPOCH, 0)
            .expect("append");
    }
    block_on(log.flush()).expect("flush");
    assert!(block_on(log.apply_retention(0)).expect("retention") > 0);
    assert!(
        disk.file_names().iter().any(|n| n.starts_with("recycle-")),
        "a segment file was kept for reuse"
    );
    // Roll into a new segment that reuses the recycled file, write only a little into it, so
    // the old segment's batches follow ours in the file.
    let start_segments = log.segment_count();
    let mut tag = 1000;
    while log.segment_count() == start_segments {
        log.append(&mut make_batch(1, value_bytes, tag, 0), EPOCH, 0)
            .expect("append");
        tag += 1;
    }
    block_on(log.flush()).expect("flush");
    assert!(
        !disk.file_names().iter().any(|n| n.starts_with("recycle-")),
        "the recycled file was reused"
    );
    let expected = read_all(&log);
    let end = log.end_offset();
    drop(log);
    disk.crash(CrashMode::LoseUnsynced);
    let (log, report) = open(&disk, config);
    assert!(report.corrupt.is_empty(), "{report:?}");
    assert_eq!(
        log.end_offset(),
        end,
        "stale batches after the end are not taken for data"
    );
    assert_same_batches(&read_all(&log), &expected);
}

#[test]
fn segments_roll_by_age_with_time_as_an_argument() {
    let disk = MemDisk::new();
    let config = LogConfig {
        segment_age_ms_max: 60_000,
        ..small_config()
    };
    let (mut log, _) = open(&disk, config);
    log.append(&mut make_batch(1, 10, 0, 0), EPOCH, 1_000)
        .expect("append");
    log.append(&mut make_batch(1, 10, 1, 0), EPOCH, 60_999)
        .expect("append");
    assert_eq!(log.segment_count(), 1, "younger than the limit");
    log.append(&mut make_batch(1, 10, 2, 0), EPOCH, 61_000)
        .expect("append");
    assert_eq!(log.segment_count(), 2, "rolled by age");
    assert_eq!(log.segment_bases()[1], Offset(2));
}

#[test]
fn flush_policy_decides_when_the_driver_flushes() {
    use wharf_storage::policy::FlushPolicy;
    let disk = MemDisk::new();
    let (mut always, _) = open(&disk, small_config());
    assert!(!always.flush_due(0, 0), "nothing staged");
    always
        .append(&mut make_batch(1, 10, 0, 0), EPOCH, 0)
        .expect("append");
    assert!(always.flush_due(0, 0));
    let disk = MemDisk::new();
    let config = LogConfig {
        flush_policy: FlushPolicy::Interval { interval_ms: 100 },
        ..small_config()
    };
    let (mut interval, _) = open(&disk, config);
    interval
        .append(&mut make_batch(1, 10, 0, 0), EPOCH, 0)
        .expect("append");
    assert!(!interval.flush_due(1_000, 1_050));
    assert!(interval.flush_due(1_000, 1_100));
}

#[test]
fn planned_reads_do_not_borrow_the_log_and_detect_a_recycled_file() {
    let (_disk, _config, mut log, value_bytes) = recycling_log_with_page_batches();
    for tag in 0..60 {
        log.append(&mut make_batch(1, value_bytes, tag, 0), EPOCH, 0)
            .expect("append");
    }
    block_on(log.flush()).expect("flush");

    // A planned read survives appends and flushes made while it waits.
    let plan = log.plan_read(Offset(3), 4096).expect("plan");
    log.append(&mut make_batch(1, value_bytes, 999, 0), EPOCH, 0)
        .expect("append");
    block_on(log.flush()).expect("flush");
    let read = block_on(plan.execute()).expect("read");
    assert_eq!(
        batch::check_batch(read.bytes())
            .expect("batch")
            .header
            .base_offset,
        Offset(3)
    );

    // Retention recycles segment 0 and a new segment overwrites its file: the read in flight
    // must not return the new segment's batches as offset 0.
    let plan = log.plan_read(Offset(0), 4096).expect("plan");
    assert!(block_on(log.apply_retention(0)).expect("retention") > 0);
    let segments = log.segment_count();
    let mut tag = 2000;
    while log.segment_count() == segments {
        log.append(&mut make_batch(1, value_bytes, tag, 0), EPOCH, 0)
            .expect("append");
        tag += 1;
    }
    block_on(log.flush()).expect("flush");
    assert!(matches!(
        block_on(plan.execute()),
        Err(ReadError::Retry {
            requested: Offset(0)
        })
    ));
    assert!(matches!(
        log.plan_read(Offset(0), 10),
        Err(ReadError::OutOfRange { .. })
    ));
}

/// Regression (crash test seed 755765936700): retention removed every segment holding data while
/// the new active segment existed only in memory, and the checkpoint was stale, so after a crash
/// recovery restarted the offsets below what had been acknowledged.
#[test]
fn retention_never_lets_offsets_restart_below_the_acknowledged_end() {
    let disk = MemDisk::new();
    let config = LogConfig {
        retention: RetentionLimits {
            retention_bytes_max: Some(1),
            retention_ms_max: None,
        },
        recycled_segments_max: 1,
        ..small_config()
    };
    let (mut log, _) = open(&disk, config.clone());
    let mut tag = 0;
    while log.segment_count() == 1 {
        log.append(&mut make_batch(1, 3000, tag, 0), EPOCH, 0)
            .expect("append");
        tag += 1;
        if log.segment_count() == 1 {
            block_on(log.flush()).expect("flush");
        }
    }
    // The batch that rolled into segment 2 is staged only; everything before it is acknowledged.
    let acknowledged = log.durable_offset();
    assert!(
        block_on(log.apply_retention(0)).expect("retention") > 0,
        "segment 1 is deleted"
    );
    drop(log);
    disk.crash(CrashMode::LoseUnsynced);
    let (log, _) = open(&disk, config);
    assert!(
        log.end_offset() >= acknowledged,
        "offsets restarted at {} below the acknowledged end {acknowledged}",
        log.end_offset()
    );
}

#[test]
fn retention_is_refused_on_a_poisoned_log() {
    let disk = MemDisk::new();
    let (mut log, _) = open(&disk, small_config());
    log.append(&mut make_batch(1, 10, 0, 0), EPOCH, 0)
        .expect("append");
    disk.fail_syncs_after(Some(1));
    assert!(block_on(log.flush()).is_err());
    disk.fail_syncs_after(None);
    assert!(block_on(log.apply_retention(0)).is_err());
}

/// A sealed segment below the durable checkpoint whose file lost its end (and whose index is
/// gone, so it is scanned) is damage to acknowledged data: it is reported, and the later
/// segments, which hold acknowledged data too, are kept. Cut points: mid-batch, exactly at a batch
/// boundary, and an empty file.
#[test]
fn a_short_durable_segment_is_reported_and_later_segments_kept() {
    use wharf_storage::disk::{Disk, DiskFile};
    let batch_bytes = make_batch(1, 2000, 0, 0).len() as u64;
    for cut_bytes in [2 * batch_bytes + 100, 2 * batch_bytes, 0] {
        let disk = MemDisk::new();
        let (mut log, _) = open(&disk, small_config());
        for tag in 0..100 {
            log.append(&mut make_batch(1, 2000, tag, 0), EPOCH, 0)
                .expect("append");
        }
        let end = log.end_offset();
        let second_segment = log.segment_bases()[1];
        assert!(log.segment_count() >= 3);
        block_on(log.close()).expect("close");
        block_on(async {
            let file = disk
                .open(&segment_file_name(Offset(0)))
                .await
                .expect("open");
            file.set_len(cut_bytes).await.expect("cut the file short");
            file.sync().await.expect("sync");
            disk.remove(&index_file_name(Offset(0)))
                .await
                .expect("remove index");
            disk.sync_dir().await.expect("sync dir");
        });
        let (log, report) = open(&disk, small_config());
        assert!(
            report.removed_segments.is_empty(),
            "cut at {cut_bytes}: {report:?}"
        );
        assert_eq!(
            log.end_offset(),
            end,
            "cut at {cut_bytes}: later segments are kept"
        );
        assert_eq!(report.corrupt.len(), 1, "cut at {cut_bytes}: {report:?}");
        assert_eq!(report.corrupt[0].to, second_segment);
        assert!(block_on(log.read(second_segment, 10)).is_ok());
    }
}

/// A batch larger than a staging buffer is staged (and written) whole: a flush of two such
/// batches issues two writes and copies nothing together, and small batches still share one
/// write. Buffers taking over the previous one's partial page keep the log byte-exact.
#[test]
fn each_batch_is_staged_whole_and_large_batches_are_not_copied_together() {
    let disk = MemDisk::new();
    let config = LogConfig {
        segment_bytes_max: 1024 * 1024,
        checkpoint_interval_bytes: u64::MAX,
        ..small_config()
    };
    let (mut log, _) = open(&disk, config.clone());
    let mut expected = Vec::new();
    let mut append = |log: &mut wharf_storage::PartitionLog<MemDisk>, value_bytes, tag| {
        let mut batch = make_batch(1, value_bytes, tag, 0);
        let appended = log.append(&mut batch, EPOCH, 0).expect("append");
        expected.push((appended.base_offset, batch.to_vec()));
    };
    // A partial page stays behind after this flush and is carried into the next buffer.
    append(&mut log, 3000, 0);
    block_on(log.flush()).expect("flush");
    let large_bytes = 3 * config.write_chunk_bytes;
    let writes_before = disk.stats().writes;
    append(&mut log, large_bytes, 1);
    append(&mut log, large_bytes, 2);
    block_on(log.flush()).expect("flush");
    assert_eq!(
        disk.stats().writes - writes_before,
        2,
        "one write per large batch"
    );
    let writes_before = disk.stats().writes;
    for tag in 3..8 {
        append(&mut log, 100, tag);
    }
    block_on(log.flush()).expect("flush");
    assert_eq!(
        disk.stats().writes - writes_before,
        1,
        "small batches share one write"
    );
    // Small batches, then one that does not fit the buffer (it takes over the partial page),
    // then more small ones: all in one flush.
    for tag in 8..11 {
        append(&mut log, 2500, tag);
    }
    append(&mut log, large_bytes, 11);
    append(&mut log, 100, 12);
    assert_same_batches(&read_all(&log), &expected);
    block_on(log.flush()).expect("flush");
    drop(log);
    disk.crash(CrashMode::LoseUnsynced);
    let (log, report) = open(&disk, config);
    assert!(report.corrupt.is_empty());
    assert_same_batches(&read_all(&log), &expected);
}

/// `append_verified` skips the body CRC only for the batch the proof was made for: a proof of
/// another batch, or a header damaged after the check, is refused and changes nothing.
#[test]
fn append_verified_refuses_a_proof_made_for_another_batch() {
    let disk = MemDisk::new();
    let (mut log, _) = open(&disk, small_config());
    let mut first = make_batch(2, 300, 1, 0);
    let mut second = make_batch(2, 400, 2, 0);
    let proof_of_first = batch::check_batch(&first).expect("valid").body_verified();
    assert!(matches!(
        log.append_verified(&mut second, proof_of_first, EPOCH, 0),
        Err(AppendError::InvalidBatch(_))
    ));
    assert_eq!(log.end_offset(), Offset(0));
    let proof_of_second = batch::check_batch(&second).expect("valid").body_verified();
    let mut damaged = second.to_vec();
    damaged[BATCH_HEADER_BYTES - 1] ^= 1;
    assert!(matches!(
        log.append_verified(&mut damaged, proof_of_second, EPOCH, 0),
        Err(AppendError::InvalidBatch(_))
    ));
    assert_eq!(log.end_offset(), Offset(0));
    log.append_verified(&mut first, proof_of_first, EPOCH, 0)
        .expect("append with its own proof");
    log.append_verified(&mut second, proof_of_second, EPOCH, 0)
        .expect("append with its own proof");
    assert_eq!(log.end_offset(), Offset(4));
    block_on(log.flush()).expect("flush");
    assert_eq!(read_all(&log).len(), 2);
}

/// The newest batches are read from memory: staged ones, those in a flush in flight (before,
/// such a read came back empty until the flush completed) and recently flushed ones while their
/// buffers are kept. Beyond `recent_bytes_max` older batches come from disk again, and a suffix
/// truncation forgets what memory held.
#[test]
fn recent_batches_are_read_from_memory_including_a_flush_in_flight() {
    let disk = MemDisk::new();
    let config = LogConfig {
        segment_bytes_max: 1024 * 1024,
        recent_bytes_max: 32 * 1024,
        ..small_config()
    };
    let (mut log, _) = open(&disk, config);
    let mut expected = Vec::new();
    type Expected = Vec<(Offset, Vec<u8>)>;
    let append = |log: &mut wharf_storage::PartitionLog<MemDisk>, expected: &mut Expected, tag| {
        let mut batch = make_batch(2, 1500, tag, 0);
        let appended = log.append(&mut batch, EPOCH, 0).expect("append");
        expected.push((appended.base_offset, batch.to_vec()));
    };
    for tag in 0..5 {
        append(&mut log, &mut expected, tag);
    }
    let reads_before = disk.stats().reads;
    let job = log.begin_flush().expect("begin").expect("work to do");
    let in_flight = block_on(log.read(Offset(0), 1 << 20)).expect("read");
    assert_eq!(
        in_flight.next_offset,
        Offset(10),
        "data in a flush in flight is readable"
    );
    log.complete_flush(block_on(job.run())).expect("complete");
    assert_same_batches(&read_all(&log), &expected);
    assert_eq!(
        disk.stats().reads,
        reads_before,
        "recent batches come from memory"
    );
    // Push the first batches out of the 32 KiB kept: they come from disk, unchanged.
    for tag in 5..40 {
        append(&mut log, &mut expected, tag);
        if tag % 4 == 0 {
            block_on(log.flush()).expect("flush");
        }
    }
    block_on(log.flush()).expect("flush");
    let reads_before = disk.stats().reads;
    assert_same_batches(&read_all(&log), &expected);
    assert!(disk.stats().reads > reads_before, "old batches from disk");
    // After a suffix truncation memory holds nothing of the old suffix.
    block_on(log.truncate_suffix(Offset(60))).expect("truncate");
    expected.truncate(30);
    append(&mut log, &mut expected, 1000);
    assert_same_batches(&read_all(&log), &expected);
    block_on(log.flush()).expect("flush");
    assert_same_batches(&read_all(&log), &expected);
}

/// Kept buffers count with the memory they hold, not the log bytes in them: many small flushes
/// (each holding a whole staging buffer) keep only `recent_bytes_max` of buffers, and older
/// batches are read from disk. Counting log bytes let one-record flushes pin thousands of
/// megabyte buffers under an 8 MiB limit.
#[test]
fn kept_buffers_count_with_the_memory_they_hold() {
    let disk = MemDisk::new();
    let config = LogConfig {
        segment_bytes_max: 1024 * 1024,
        write_chunk_bytes: 64 * 1024,
        // Two staging buffers, but far more than the log bytes of the ten flushes below.
        recent_bytes_max: 128 * 1024,
        ..small_config()
    };
    let (mut log, _) = open(&disk, config);
    let mut expected = Vec::new();
    for tag in 0..10 {
        let mut batch = make_batch(1, 3000, tag, 0);
        let appended = log.append(&mut batch, EPOCH, 0).expect("append");
        expected.push((appended.base_offset, batch.to_vec()));
        block_on(log.flush()).expect("flush");
    }
    let reads_before = disk.stats().reads;
    assert_same_batches(&read_all(&log), &expected);
    assert!(
        disk.stats().reads > reads_before,
        "ten small flushes hold ten staging buffers: the oldest are read from disk"
    );
}

#[test]
fn batch_boundary_is_known_from_memory_bases_and_the_index_else_unknown() {
    let disk = MemDisk::new();
    let (mut log, _) = open(&disk, small_config());
    for tag in 0..120 {
        log.append(&mut make_batch(2, 900, tag, 0), EPOCH, 0)
            .expect("append");
    }
    // Staged: every batch start is known, and every offset inside a batch.
    assert_eq!(log.batch_boundary(Offset(0)), Some(true));
    assert_eq!(log.batch_boundary(Offset(10)), Some(true));
    assert_eq!(log.batch_boundary(Offset(11)), Some(false));
    assert_eq!(log.batch_boundary(Offset(240)), Some(true), "the log end");
    assert_eq!(
        log.batch_boundary(Offset(241)),
        Some(false),
        "beyond the end"
    );
    block_on(log.flush()).expect("flush");
    drop(log);
    // After a restart nothing is in memory: segment bases and index entries are known, any
    // other offset needs a read.
    let (log, _) = open(&disk, small_config());
    let bases = log.segment_bases();
    assert!(bases.len() > 2);
    for base in &bases {
        assert_eq!(log.batch_boundary(*base), Some(true));
    }
    let inside = bases[1].plus(1);
    assert_eq!(log.batch_boundary(inside), None);
    // The read resolves it: offset `inside` lies in the batch starting at `bases[1]`.
    let check = log.plan_boundary_check(inside).expect("in range");
    assert_eq!(block_on(check.resolve()).expect("read"), Some(false));
    let next_batch = bases[1].plus(2);
    let check = log.plan_boundary_check(next_batch).expect("in range");
    assert_eq!(block_on(check.resolve()).expect("read"), Some(true));
    assert!(log
        .plan_boundary_check(Offset(300))
        .is_ok_and(|c| matches!(c, wharf_storage::log::BoundaryCheck::Known(false))));
    assert_eq!(log.batch_boundary(Offset(240)), Some(true));
    assert_eq!(log.batch_boundary(Offset(300)), Some(false));
}

#[test]
fn reset_restarts_the_log_empty_at_a_start_and_survives_a_crash() {
    let disk = MemDisk::new();
    let (mut log, _) = open(&disk, small_config());
    for tag in 0..60 {
        log.append(&mut make_batch(2, 900, tag, 0), EPOCH, 0)
            .expect("append");
    }
    block_on(log.flush()).expect("flush");
    // Staged data is dropped with the rest.
    log.append(&mut make_batch(2, 900, 99, 0), EPOCH, 0)
        .expect("append");
    let start = Offset(1000);
    block_on(log.reset(start, 0)).expect("reset");
    assert_eq!(log.log_start_offset(), start);
    assert_eq!(log.end_offset(), start);
    assert_eq!(log.durable_offset(), start);
    assert_eq!(log.segment_count(), 1);
    assert!(read_all(&log).is_empty());
    // Crash right after the reset: the log reopens empty at `start`.
    disk.crash(CrashMode::LoseUnsynced);
    drop(log);
    let (mut log, report) = open(&disk, small_config());
    assert!(report.corrupt.is_empty(), "{report:?}");
    assert_eq!(
        (log.log_start_offset(), log.end_offset()),
        (start, start),
        "{report:?}"
    );
    // Replicated batches continue at `start`.
    for tag in 0..5u64 {
        log.append(&mut make_batch(2, 900, tag, 0), EPOCH, 0)
            .expect("append");
    }
    block_on(log.flush()).expect("flush");
    let expected = read_all(&log);
    assert_eq!(expected[0].0, start);
    drop(log);
    disk.crash(CrashMode::LoseUnsynced);
    let (log, _) = open(&disk, small_config());
    assert_eq!(log.log_start_offset(), start);
    assert_eq!(log.end_offset(), start.plus(10));
    assert_same_batches(&read_all(&log), &expected);
}

#[test]
fn interrupted_reset_yields_the_old_log_or_the_empty_one() {
    // Fail each sync of the reset in turn (checkpoint, directory, checkpoint), then crash with
    // random loss (each unsynced removal kept or lost): recovery must see either the old log
    // whole or the empty log at `start`, never some segments without the others.
    let start = Offset(1000);
    for (fail_at, seed) in (1..5u64).flat_map(|f| (0..16u64).map(move |s| (f, s))) {
        println!("fail_at {fail_at} seed {seed}");
        let disk = MemDisk::new();
        let (mut log, _) = open(&disk, small_config());
        for tag in 0..60 {
            log.append(&mut make_batch(2, 900, tag, 0), EPOCH, 0)
                .expect("append");
        }
        block_on(log.flush()).expect("flush");
        let old = read_all(&log);
        disk.fail_syncs_after(Some(fail_at));
        let result = block_on(log.reset(start, 0));
        disk.fail_syncs_after(None);
        if result.is_err() {
            assert!(log.poisoned().is_some(), "a failed reset poisons the log");
        }
        drop(log);
        disk.crash(CrashMode::Random {
            seed,
            tear_bytes: wharf_storage::mem_disk::SECTOR_BYTES,
        });
        let (log, report) = open(&disk, small_config());
        assert!(report.corrupt.is_empty(), "fail_at {fail_at}: {report:?}");
        let reset = (log.log_start_offset(), log.end_offset()) == (start, start);
        assert!(
            reset || (result.is_err() && log.log_start_offset() == Offset(0)),
            "fail_at {fail_at}: [{}, {}) {result:?} {report:?}",
            log.log_start_offset(),
            log.end_offset()
        );
        if report.finished_reset || result.is_ok() {
            assert!(reset, "fail_at {fail_at}: {report:?}");
        }
        if !reset {
            assert_same_batches(&read_all(&log), &old);
        }
    }
}

/// A crash in the middle of a reset: the `Resetting` checkpoint is durable and the first
/// segment's removal too, the others not. Recovery must finish the reset (an empty log at its
/// offset), not open the remaining segments as a log that starts at the second segment.
#[test]
fn recovery_finishes_a_reset_interrupted_after_some_removals() {
    use wharf_storage::checkpoint::{Checkpoint, CheckpointState, CHECKPOINT_FILE_NAME};
    use wharf_storage::disk::{Disk, DiskFile, PAGE_BYTES};
    let disk = MemDisk::new();
    let (mut log, _) = open(&disk, small_config());
    for tag in 0..120 {
        log.append(&mut make_batch(2, 900, tag, 0), EPOCH, 0)
            .expect("append");
    }
    block_on(log.flush()).expect("flush");
    let bases = log.segment_bases();
    assert!(bases.len() >= 3, "{bases:?}");
    drop(log);
    // Newer than any checkpoint the log wrote (rolls write them), so recovery takes it.
    let sequence = disk
        .contents(CHECKPOINT_FILE_NAME)
        .and_then(|bytes| Checkpoint::decode_file(&bytes))
        .map_or(1, |c| c.sequence + 1);
    let start = Offset(1000);
    let resetting = Checkpoint {
        sequence,
        state: CheckpointState::Resetting,
        segment_base: start,
        position: 0,
        next_offset: start,
    };
    block_on(async {
        let file = disk.open(CHECKPOINT_FILE_NAME).await.expect("open");
        let mut buffer = disk.alloc_buffer(PAGE_BYTES);
        buffer.as_mut().copy_from_slice(&resetting.encode());
        file.write_at(buffer, (resetting.slot() * PAGE_BYTES) as u64)
            .await
            .expect("write");
        file.sync().await.expect("sync");
        disk.remove(&segment_file_name(bases[0]))
            .await
            .expect("remove");
        disk.sync_dir().await.expect("sync dir");
    });
    let (log, report) = open(&disk, small_config());
    assert!(report.finished_reset, "{report:?}");
    assert!(report.corrupt.is_empty(), "{report:?}");
    assert_eq!((log.log_start_offset(), log.end_offset()), (start, start));
    assert!(
        disk.file_names()
            .iter()
            .all(|n| !n.ends_with(".log") && !n.ends_with(".index")),
        "{:?}",
        disk.file_names()
    );
}
