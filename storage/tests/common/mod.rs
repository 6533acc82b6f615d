//! Helpers shared by the storage integration tests.
#![allow(
    dead_code,
    unused_imports,
    reason = "each test binary uses a different subset"
)]

use std::rc::Rc;

use futures_lite::future::block_on;
use rand::rngs::StdRng;
use rand::Rng;
use rkyv::util::AlignedVec;
use wharf_storage::disk::Disk;
use wharf_storage::log::{AppendMode, LogConfig, PartitionLog};
use wharf_storage::mem_disk::MemDisk;
use wharf_storage::{Epoch, Offset};

pub const EPOCH: AppendMode = AppendMode::Leader {
    leader_epoch: Epoch(1),
};

/// A small log configuration that exercises rolls and multi-chunk flushes quickly.
pub fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 64 * 1024,
        index_interval_bytes: 1024,
        write_chunk_bytes: 8 * 1024,
        scan_chunk_bytes: 16 * 1024,
        staged_bytes_max: 16 * 1024 * 1024,
        ..LogConfig::default()
    }
}

pub use wharf_storage::conformance::make_batch;

pub fn random_batch(rng: &mut StdRng, tag: u64, timestamp_ms: i64) -> AlignedVec<16> {
    let records = rng.random_range(1..6);
    let value_bytes = rng.random_range(0..3000);
    make_batch(records, value_bytes, tag, timestamp_ms)
}

pub fn open(
    disk: &MemDisk,
    config: LogConfig,
) -> (PartitionLog<MemDisk>, wharf_storage::RecoveryReport) {
    block_on(PartitionLog::open(Rc::new(disk.clone()), config, 0)).expect("open")
}

/// Every batch from the log start to the end, checked (the conformance suite's reader).
pub fn read_all<D: Disk>(log: &PartitionLog<D>) -> Vec<(Offset, Vec<u8>)> {
    block_on(wharf_storage::conformance::read_all(log))
}

pub use wharf_storage::conformance::assert_same_batches;
