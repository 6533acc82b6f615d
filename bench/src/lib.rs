//! Shared workloads for Wharf's benchmarks (criterion benches in `benches/`, and the
//! `log-append` binary that reports append throughput against the machine's limits).

use std::rc::Rc;
use std::time::{Duration, Instant};

use rkyv::util::AlignedVec;
use wharf::dma_disk::DmaDisk;
use wharf_storage::batch::{BatchBuilder, ProducerStamp};
use wharf_storage::log::{AppendMode, LogConfig, PartitionLog, FLUSHES_IN_FLIGHT_MAX};
use wharf_storage::policy::RetentionLimits;
use wharf_storage::Epoch;

/// Minimal `--name value` argument reading shared by the bench tools.
pub mod args {
    /// The value after `name`, if present.
    pub fn value(args: &[String], name: &str) -> Option<String> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    }

    /// The number after `name`, or `default`; exits with a clear message on a non-number.
    pub fn number(args: &[String], name: &str, default: u64) -> u64 {
        match value(args, name) {
            None => default,
            Some(v) => v.parse().unwrap_or_else(|_| {
                eprintln!("{name} takes a number, got {v:?}");
                std::process::exit(2)
            }),
        }
    }

    pub fn flag(args: &[String], name: &str) -> bool {
        args.iter().any(|a| a == name)
    }
}

/// A batch of `records` records of `record_bytes` each.
pub fn make_batch(records: usize, record_bytes: usize) -> AlignedVec<16> {
    let mut builder = BatchBuilder::new(ProducerStamp::default());
    let value = vec![0x5Au8; record_bytes];
    for i in 0..records {
        builder
            .push(1_700_000_000_000 + i as i64, None, &value, &[])
            .expect("push");
    }
    builder.finish().expect("finish")
}

/// Settings of the DMA append workload.
#[derive(Clone, Debug)]
pub struct AppendWorkload {
    pub record_bytes: usize,
    pub batch_bytes: usize,
    /// One fdatasync per this many bytes appended.
    pub flush_bytes: usize,
    pub write_chunk_bytes: usize,
    pub segment_bytes_max: u64,
    /// Reuse segment files deleted by retention (the default for logs).
    pub recycle: bool,
    /// Retention keeps this many segments' worth of bytes (`None`: keep everything).
    pub retain_segments: Option<u64>,
    /// `LogConfig::checkpoint_interval_bytes` (0: a checkpoint with every flush).
    pub checkpoint_interval_bytes: u64,
}

impl Default for AppendWorkload {
    fn default() -> Self {
        AppendWorkload {
            record_bytes: 1024,
            batch_bytes: 64 * 1024,
            flush_bytes: 1024 * 1024,
            write_chunk_bytes: 1024 * 1024,
            segment_bytes_max: 256 << 20,
            recycle: true,
            retain_segments: Some(2),
            checkpoint_interval_bytes: LogConfig::default().checkpoint_interval_bytes,
        }
    }
}

/// An open log on DmaDisk plus a prepared batch, ready to be driven.
pub struct DmaAppender {
    log: PartitionLog<DmaDisk>,
    batch: AlignedVec<16>,
    workload: AppendWorkload,
    in_flight:
        std::collections::VecDeque<glommio::task::JoinHandle<wharf_storage::log::FlushOutcome>>,
}

impl DmaAppender {
    pub async fn open(dir: &std::path::Path, workload: AppendWorkload) -> DmaAppender {
        let disk = DmaDisk::open(dir).await.expect("DmaDisk");
        let config = LogConfig {
            segment_bytes_max: workload.segment_bytes_max,
            write_chunk_bytes: workload.write_chunk_bytes,
            // Keep the bench's disk footprint bounded: two segments.
            retention: RetentionLimits {
                retention_bytes_max: workload
                    .retain_segments
                    .map(|n| n * workload.segment_bytes_max),
                retention_ms_max: None,
            },
            recycled_segments_max: if workload.recycle { 2 } else { 0 },
            checkpoint_interval_bytes: workload.checkpoint_interval_bytes,
            ..LogConfig::default()
        };
        let (log, _) = PartitionLog::open(Rc::new(disk), config, 0)
            .await
            .expect("open log");
        let records = (workload.batch_bytes / (workload.record_bytes + 64)).max(1);
        let batch = make_batch(records, workload.record_bytes);
        DmaAppender {
            log,
            batch,
            workload,
            in_flight: std::collections::VecDeque::new(),
        }
    }

    pub fn batch_bytes(&self) -> usize {
        self.batch.len()
    }

    /// Appends `bytes` worth of batches with one fdatasync per `flush_bytes`, keeping one flush in
    /// flight while the next megabyte is appended (as the broker does). Returns bytes appended.
    pub async fn run_bytes(&mut self, bytes: u64) -> u64 {
        let mut appended = 0u64;
        let mut since_flush = 0usize;
        let mut batch = self.batch.clone();
        while appended < bytes {
            self.log
                .append(
                    &mut batch,
                    AppendMode::Leader {
                        leader_epoch: Epoch(1),
                    },
                    0,
                )
                .expect("append");
            appended += batch.len() as u64;
            since_flush += batch.len();
            if since_flush >= self.workload.flush_bytes {
                since_flush = 0;
                // Keep up to FLUSHES_IN_FLIGHT_MAX flushes going: one syncing, one writing.
                if self.in_flight.len() == FLUSHES_IN_FLIGHT_MAX {
                    self.finish_oldest().await;
                }
                if let Some(job) = self.log.begin_flush().expect("begin flush") {
                    self.in_flight
                        .push_back(glommio::spawn_local(job.run()).detach());
                }
            }
        }
        appended
    }

    async fn finish_oldest(&mut self) {
        if let Some(handle) = self.in_flight.pop_front() {
            let outcome = handle.await.expect("flush task");
            self.log.complete_flush(outcome).expect("flush");
            if self.log.segment_count() > 2 {
                self.log.apply_retention(0).await.expect("retention");
            }
        }
    }

    async fn finish_in_flight(&mut self) {
        while !self.in_flight.is_empty() {
            self.finish_oldest().await;
        }
    }

    /// Waits for everything appended to be durable.
    pub async fn settle(&mut self) {
        self.finish_in_flight().await;
        self.log.flush().await.expect("flush");
    }
}

/// Times `run_bytes(total)` + settle; returns (bytes, elapsed).
pub async fn timed_append(appender: &mut DmaAppender, total_bytes: u64) -> (u64, Duration) {
    let start = Instant::now();
    let bytes = appender.run_bytes(total_bytes).await;
    appender.settle().await;
    (bytes, start.elapsed())
}
