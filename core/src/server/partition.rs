//! The driver of one partition on its owning shard: appends, group-commit flushing,
//! durable-ack waiters, long-poll wake-ups, reads below the high watermark, retention.
//!
//! The log sits in a `RefCell` and is only borrowed synchronously (plan a read, append, begin
//! or complete a flush), never across an await — except by retention, which first takes the
//! write side of `maintenance`; every other path takes its read side (uncontended: a
//! synchronous `try_read`).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::sync::{RwLock, RwLockReadGuard};
use glommio::{Task, TaskQueueHandle};
use wharf_storage::batch::{self, BatchError};
use wharf_storage::disk::{Disk, DiskFile};
use wharf_storage::log::{AppendError, FlushOutcome, LogRead, FLUSHES_IN_FLIGHT_MAX};
use wharf_storage::{AppendMode, Epoch, LogConfig, Offset, PartitionLog};

use prometheus_client::metrics::histogram::Histogram;

use super::metrics::{Metrics, PartitionMetrics};
use crate::config::{FlushMode, TopicConfig};
use crate::dma_disk::DmaDisk;
use crate::protocol::{Acks, ErrorCode, OffsetSpec, PartitionDescription};

pub type ReadBuffer = <<DmaDisk as Disk>::File as DiskFile>::ReadBuffer;
pub type Read = LogRead<ReadBuffer>;

/// How long an idle partition waits before bringing its checkpoint up to date.
const IDLE_CHECKPOINT_MS: u64 = 1000;
/// Reads retried after racing retention before giving up.
const READ_RETRIES_MAX: usize = 3;
/// Bytes scanned per step of a timestamp lookup.
const TIMESTAMP_SCAN_BYTES: usize = 1024 * 1024;

/// An error for one partition, as sent to the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionError {
    pub code: ErrorCode,
    pub message: String,
}

impl PartitionError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> PartitionError {
        PartitionError {
            code,
            message: message.into(),
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct DurableWaiter {
    /// Complete once the durable offset reaches this.
    needed: Offset,
    done: oneshot::Sender<Result<(), PartitionError>>,
}

/// What an accepted produce did; `completion` resolves when the acks are reached.
pub struct Admitted {
    pub base_offset: Offset,
    pub last_offset: Offset,
    pub leader_epoch: Epoch,
    pub completion: Option<oneshot::Receiver<Result<(), PartitionError>>>,
}

/// Bytes to serve from one partition: whole batches below the high watermark.
pub struct FetchData {
    pub high_watermark: Offset,
    pub log_start_offset: Offset,
    pub read: Option<Read>,
    pub bytes: usize,
}

impl FetchData {
    pub fn slice(&self) -> &[u8] {
        self.read.as_ref().map_or(&[], |r| &r.bytes()[..self.bytes])
    }
}

pub struct Partition {
    pub topic: String,
    pub index: u32,
    pub topic_id: u64,
    pub config: TopicConfig,
    pub leader_epoch: Epoch,
    pub replicas: Vec<u32>,
    log_config: LogConfig,
    log: RefCell<PartitionLog<DmaDisk>>,
    maintenance: RwLock<()>,
    high_watermark: Cell<Offset>,
    durable_waiters: RefCell<VecDeque<DurableWaiter>>,
    data_waiters: RefCell<Vec<oneshot::Sender<()>>>,
    wake_flusher: LocalSender<()>,
    closing: Cell<bool>,
    pub metrics: PartitionMetrics,
    flush_latency: Histogram,
    retention_check_ms: u64,
    flusher: RefCell<Option<Task<()>>>,
}

impl Partition {
    /// Opens (recovering) the log in `dir` and starts its flusher on `queue`.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        dir: std::path::PathBuf,
        topic: &str,
        index: u32,
        topic_id: u64,
        config: TopicConfig,
        leader_epoch: Epoch,
        replicas: Vec<u32>,
        metrics: &Metrics,
        flush_latency: Histogram,
        retention_check_ms: u64,
        queue: TaskQueueHandle,
    ) -> Result<Rc<Partition>, String> {
        let disk = DmaDisk::open(&dir)
            .await
            .map_err(|e| format!("{topic}/{index}: {e}"))?;
        let log_config = config.log_config();
        let (log, report) = PartitionLog::open(Rc::new(disk), log_config.clone(), now_ms())
            .await
            .map_err(|e| format!("{topic}/{index}: recovery failed: {e}"))?;
        if !report.corrupt.is_empty() || report.torn_tail_at.is_some() {
            tracing::warn!(
                topic,
                partition = index,
                ?report,
                "recovered partition log with repairs"
            );
        } else {
            tracing::debug!(topic, partition = index, ?report, "recovered partition log");
        }
        let (wake_flusher, wake) = local_channel::new_bounded(1);
        let partition_metrics = PartitionMetrics::new(metrics, topic, index);
        let durable = log.durable_offset();
        let high_watermark = match config.flush {
            FlushMode::Always => durable,
            FlushMode::Interval => log.end_offset(),
        };
        partition_metrics.end_offset.set(log.end_offset().0 as i64);
        partition_metrics
            .high_watermark
            .set(high_watermark.0 as i64);
        partition_metrics
            .log_start_offset
            .set(log.log_start_offset().0 as i64);
        let partition = Rc::new(Partition {
            topic: topic.to_string(),
            index,
            topic_id,
            config,
            leader_epoch,
            replicas,
            log_config,
            log: RefCell::new(log),
            maintenance: RwLock::new(()),
            high_watermark: Cell::new(high_watermark),
            durable_waiters: RefCell::new(VecDeque::new()),
            data_waiters: RefCell::new(Vec::new()),
            wake_flusher,
            closing: Cell::new(false),
            metrics: partition_metrics,
            flush_latency,
            retention_check_ms,
            flusher: RefCell::new(None),
        });
        let task = glommio::spawn_local_into(Rc::clone(&partition).run_flusher(wake, queue), queue)
            .map_err(|e| format!("cannot start flusher: {e}"))?;
        *partition.flusher.borrow_mut() = Some(task);
        Ok(partition)
    }

    pub fn high_watermark(&self) -> Offset {
        self.high_watermark.get()
    }

    async fn shared(&self) -> Option<RwLockReadGuard<'_, ()>> {
        match self.maintenance.try_read() {
            Ok(guard) => Some(guard),
            Err(_) => self.maintenance.read().await.ok(),
        }
    }

    /// Validates and appends the batches in `payload` (all or none), returning the assigned
    /// offsets and, unless the acks are already met, a completion to await.
    pub async fn produce(
        &self,
        payload: &mut [u8],
        acks: Acks,
    ) -> Result<Admitted, PartitionError> {
        if self.closing.get() {
            return Err(PartitionError::new(
                ErrorCode::ShuttingDown,
                "broker is shutting down",
            ));
        }
        // Check every batch before appending any, so a bad one changes nothing.
        let mut bounds = Vec::new();
        let mut at = 0usize;
        while at < payload.len() {
            let checked = batch::validate_batch(&payload[at..]).map_err(|e| {
                PartitionError::new(ErrorCode::InvalidBatch, format!("batch at byte {at}: {e}"))
            })?;
            let bytes = checked.header.batch_bytes();
            bounds.push(at..at + bytes);
            at += bytes;
        }
        if bounds.is_empty() {
            return Err(PartitionError::new(ErrorCode::InvalidBatch, "no batches"));
        }
        self.check_acks(acks)?;
        let Some(_guard) = self.shared().await else {
            return Err(PartitionError::new(
                ErrorCode::PartitionUnavailable,
                "partition closed",
            ));
        };
        let mut log = self.log.borrow_mut();
        if let Some(reason) = log.poisoned() {
            return Err(PartitionError::new(
                ErrorCode::StorageError,
                reason.to_string(),
            ));
        }
        if log.staged_bytes() + payload.len() > self.log_config.staged_bytes_max {
            // Wake the flusher so the backlog drains.
            let _ = self.wake_flusher.try_send(());
            return Err(PartitionError::new(
                ErrorCode::Backpressure,
                format!(
                    "{} bytes await flush (limit {}); retry after a backoff",
                    log.staged_bytes(),
                    self.log_config.staged_bytes_max
                ),
            ));
        }
        let now = now_ms();
        let mut first = None;
        let mut last = None;
        for range in bounds {
            let appended = log
                .append(
                    &mut payload[range],
                    AppendMode::Leader {
                        leader_epoch: self.leader_epoch,
                    },
                    now,
                )
                .map_err(|e| match e {
                    AppendError::Poisoned(reason) => {
                        PartitionError::new(ErrorCode::StorageError, reason)
                    }
                    AppendError::InvalidBatch(e) => {
                        PartitionError::new(ErrorCode::InvalidBatch, e.to_string())
                    }
                    AppendError::Backpressure { .. } => {
                        PartitionError::new(ErrorCode::Backpressure, e.to_string())
                    }
                    AppendError::OffsetMismatch { .. } => {
                        PartitionError::new(ErrorCode::Unknown, e.to_string())
                    }
                })?;
            first.get_or_insert(appended);
            last = Some(appended);
        }
        let (Some(first), Some(last)) = (first, last) else {
            unreachable!("at least one batch was appended");
        };
        let end = log.end_offset();
        drop(log);
        self.metrics.end_offset.set(end.0 as i64);
        self.metrics.produced_bytes.inc_by(payload.len() as u64);
        let _ = self.wake_flusher.try_send(());
        let completion = match self.config.flush {
            FlushMode::Interval => {
                // The topic opted out of fsync before ack: visible and acknowledged now.
                self.advance_high_watermark(end);
                None
            }
            FlushMode::Always if acks == Acks::None => None,
            FlushMode::Always => {
                let (done, completion) = oneshot::channel();
                self.durable_waiters.borrow_mut().push_back(DurableWaiter {
                    needed: last.last_offset.plus(1),
                    done,
                });
                Some(completion)
            }
        };
        Ok(Admitted {
            base_offset: first.base_offset,
            last_offset: last.last_offset,
            leader_epoch: self.leader_epoch,
            completion,
        })
    }

    /// A single-broker partition has one in-sync replica: itself.
    fn check_acks(&self, acks: Acks) -> Result<(), PartitionError> {
        let in_sync = 1usize;
        let replicas = self.replicas.len().max(1);
        let (required, what) = match acks {
            Acks::None | Acks::Leader => (1, "leader".to_string()),
            Acks::Quorum => (replicas / 2 + 1, "quorum".to_string()),
            Acks::All => (
                usize::from(self.config.min_insync_replicas).max(in_sync),
                "all".to_string(),
            ),
            Acks::Replicas(n) => (usize::from(n), format!("{n} replicas")),
        };
        if required > in_sync {
            return Err(PartitionError::new(
                ErrorCode::NotEnoughReplicas,
                format!("acks={what} needs {required} in-sync replicas, {in_sync} are in sync; nothing was appended"),
            ));
        }
        Ok(())
    }

    fn advance_high_watermark(&self, to: Offset) {
        if to > self.high_watermark.get() {
            self.high_watermark.set(to);
            self.metrics.high_watermark.set(to.0 as i64);
            for waiter in self.data_waiters.borrow_mut().drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    fn on_durable(&self, durable: Offset) {
        if self.config.flush == FlushMode::Always {
            self.advance_high_watermark(durable);
        }
        let mut waiters = self.durable_waiters.borrow_mut();
        while waiters.front().is_some_and(|w| w.needed <= durable) {
            if let Some(waiter) = waiters.pop_front() {
                let _ = waiter.done.send(Ok(()));
            }
        }
    }

    fn fail_waiters(&self, error: PartitionError) {
        for waiter in self.durable_waiters.borrow_mut().drain(..) {
            let _ = waiter.done.send(Err(error.clone()));
        }
    }

    /// Resolves once the high watermark passes `offset`, or at `deadline`.
    pub async fn wait_for_data(&self, offset: Offset, deadline: Instant) {
        if self.high_watermark.get() > offset || self.closing.get() {
            return;
        }
        let (wake, woken) = oneshot::channel();
        self.data_waiters.borrow_mut().push(wake);
        let remaining = deadline.saturating_duration_since(Instant::now());
        let _ = glommio::timer::timeout(remaining, async {
            let _ = woken.await;
            Ok(())
        })
        .await;
    }

    /// Whole batches from `from`, up to `max_bytes` (at least one batch if any), below the high
    /// watermark.
    pub async fn read(&self, from: Offset, max_bytes: usize) -> Result<FetchData, PartitionError> {
        for _ in 0..READ_RETRIES_MAX {
            let high_watermark = self.high_watermark.get();
            let plan = {
                let Some(_guard) = self.shared().await else {
                    return Err(PartitionError::new(
                        ErrorCode::PartitionUnavailable,
                        "partition closed",
                    ));
                };
                let log = self.log.borrow();
                let log_start = log.log_start_offset();
                let end = log.end_offset();
                if from < log_start || from > end {
                    return Err(PartitionError::new(
                        ErrorCode::OffsetOutOfRange,
                        format!("offset {from} is outside [{log_start}, {end}]"),
                    ));
                }
                if from >= high_watermark {
                    return Ok(FetchData {
                        high_watermark,
                        log_start_offset: log_start,
                        read: None,
                        bytes: 0,
                    });
                }
                (log.plan_read(from, max_bytes), log_start)
            };
            let (plan, log_start) = plan;
            let plan = plan.map_err(read_error)?;
            let read = match plan.execute().await {
                Ok(read) => read,
                Err(wharf_storage::log::ReadError::Retry { .. }) => continue,
                Err(e) => return Err(read_error(e)),
            };
            let bytes = bytes_below(read.bytes(), high_watermark);
            self.metrics.fetched_bytes.inc_by(bytes as u64);
            return Ok(FetchData {
                high_watermark,
                log_start_offset: log_start,
                read: Some(read),
                bytes,
            });
        }
        Err(PartitionError::new(
            ErrorCode::PartitionUnavailable,
            "the log kept changing under the read (retention); retry",
        ))
    }

    pub async fn list_offset(&self, spec: OffsetSpec) -> Result<Offset, PartitionError> {
        match spec {
            OffsetSpec::Earliest => Ok(self.log.borrow().log_start_offset()),
            OffsetSpec::Latest => Ok(self.high_watermark.get()),
            OffsetSpec::Timestamp(timestamp_ms) => self.offset_for_timestamp(timestamp_ms).await,
        }
    }

    /// Scans batch headers from the log start (no time index yet) for the first record at or
    /// after `timestamp_ms`; the high watermark when there is none.
    async fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Offset, PartitionError> {
        let mut at = self.log.borrow().log_start_offset();
        loop {
            let data = self.read(at, TIMESTAMP_SCAN_BYTES).await?;
            let bytes = data.slice();
            if bytes.is_empty() {
                return Ok(data.high_watermark);
            }
            for checked in batch::batches(bytes) {
                let checked = checked
                    .map_err(|e| PartitionError::new(ErrorCode::CorruptData, e.to_string()))?;
                let header = checked.header;
                if header.max_timestamp_ms >= timestamp_ms {
                    let records = checked
                        .records()
                        .map_err(|e| PartitionError::new(ErrorCode::CorruptData, e.to_string()))?;
                    for (i, record) in records.iter().enumerate() {
                        let ts = header.first_timestamp_ms + record.timestamp_delta_ms.to_native();
                        if ts >= timestamp_ms {
                            return Ok(header.base_offset.plus(i as u64));
                        }
                    }
                }
                at = header.next_offset();
            }
        }
    }

    pub fn describe(&self) -> PartitionDescription {
        let log = self.log.try_borrow();
        let (log_start, end, error) = match &log {
            Ok(log) => (
                log.log_start_offset().0,
                log.end_offset().0,
                if log.poisoned().is_some() {
                    ErrorCode::StorageError as u16
                } else {
                    0
                },
            ),
            // Retention is running: report what the metrics last saw.
            Err(_) => (
                self.metrics.log_start_offset.get() as u64,
                self.metrics.end_offset.get() as u64,
                0,
            ),
        };
        PartitionDescription {
            partition: self.index,
            leader: self.replicas.first().copied().unwrap_or(0),
            leader_epoch: self.leader_epoch.0,
            shard: 0,
            replicas: self.replicas.clone(),
            isr: self.replicas.iter().take(1).copied().collect(),
            log_start_offset: log_start,
            high_watermark: self.high_watermark.get().0,
            end_offset: end,
            error,
        }
    }

    /// Stops taking writes, flushes everything, writes a current checkpoint and waits for the
    /// flusher to finish.
    pub async fn close(&self) {
        self.closing.set(true);
        let _ = self.wake_flusher.try_send(());
        for waiter in self.data_waiters.borrow_mut().drain(..) {
            let _ = waiter.send(());
        }
        let task = self.flusher.borrow_mut().take();
        if let Some(task) = task {
            task.await;
        }
        self.fail_waiters(PartitionError::new(
            ErrorCode::ShuttingDown,
            "partition closed before the write was durable",
        ));
    }

    async fn run_flusher(self: Rc<Self>, wake: LocalReceiver<()>, queue: TaskQueueHandle) {
        let mut in_flight: VecDeque<(Instant, Task<FlushOutcome>)> = VecDeque::new();
        let mut last_flush_ms = now_ms();
        let mut flushed_since_checkpoint = false;
        let mut last_retention = Instant::now();
        loop {
            let closing = self.closing.get();
            while in_flight.len() < FLUSHES_IN_FLIGHT_MAX {
                let now = now_ms();
                let job = {
                    let mut log = self.log.borrow_mut();
                    if log.poisoned().is_some()
                        || !(closing || log.staged_bytes() > 0 && log.flush_due(last_flush_ms, now))
                    {
                        break;
                    }
                    match log.begin_flush() {
                        Ok(Some(job)) => job,
                        Ok(None) => break,
                        Err(error) => {
                            drop(log);
                            self.fail_waiters(PartitionError::new(
                                ErrorCode::StorageError,
                                error.to_string(),
                            ));
                            break;
                        }
                    }
                };
                last_flush_ms = now;
                flushed_since_checkpoint = true;
                match glommio::spawn_local_into(job.run(), queue) {
                    Ok(task) => in_flight.push_back((Instant::now(), task)),
                    Err(error) => {
                        tracing::error!(%error, "cannot spawn a flush");
                        break;
                    }
                }
            }
            if let Some((_, front)) = in_flight.front_mut() {
                let flushed = futures_lite::future::or(async { Some(front.await) }, async {
                    let _ = wake.recv().await;
                    None
                })
                .await;
                if let Some(outcome) = flushed {
                    if let Some((started, _)) = in_flight.pop_front() {
                        self.complete(outcome, started);
                    }
                }
                continue;
            }
            if closing {
                break;
            }
            if last_retention.elapsed() >= Duration::from_millis(self.retention_check_ms) {
                last_retention = Instant::now();
                self.apply_retention().await;
            }
            let wait_ms = match self.config.flush {
                FlushMode::Interval if self.log.borrow().staged_bytes() > 0 => self
                    .config
                    .flush_interval_ms
                    .saturating_sub(now_ms().saturating_sub(last_flush_ms))
                    .max(1),
                _ => IDLE_CHECKPOINT_MS.min(self.retention_check_ms),
            };
            let woken = glommio::timer::timeout(Duration::from_millis(wait_ms), async {
                Ok(wake.recv().await)
            })
            .await;
            if woken.is_err() && flushed_since_checkpoint && self.log.borrow().staged_bytes() == 0 {
                // Idle: make the checkpoint current so recovery knows the whole log is
                // acknowledged data (see storage/README.md).
                self.log.borrow_mut().request_checkpoint();
                flushed_since_checkpoint = false;
                self.flush_now(queue).await;
            }
        }
        // Closing: everything staged was flushed above; write a current checkpoint (twice, as
        // `PartitionLog::close` does: the second also covers index files sealed by the first).
        for _ in 0..2 {
            self.log.borrow_mut().request_checkpoint();
            self.flush_now(queue).await;
        }
    }

    async fn flush_now(&self, queue: TaskQueueHandle) {
        let begun = self.log.borrow_mut().begin_flush();
        let job = match begun {
            Ok(Some(job)) => job,
            Ok(None) | Err(_) => return,
        };
        let started = Instant::now();
        match glommio::spawn_local_into(job.run(), queue) {
            Ok(task) => {
                let outcome = task.await;
                self.complete(outcome, started);
            }
            Err(error) => tracing::error!(%error, "cannot spawn a flush"),
        }
    }

    fn complete(&self, outcome: FlushOutcome, started: Instant) {
        self.flush_latency.observe(started.elapsed().as_secs_f64());
        let result = self.log.borrow_mut().complete_flush(outcome);
        match result {
            Ok(durable) => self.on_durable(durable),
            Err(error) => {
                tracing::error!(topic = %self.topic, partition = self.index, %error, "flush failed; the partition refuses writes until restart");
                self.fail_waiters(PartitionError::new(
                    ErrorCode::StorageError,
                    error.to_string(),
                ));
            }
        }
    }

    // The write side of `maintenance` keeps every other user of the log out while this borrow
    // spans awaits (they all take the read side first).
    #[allow(clippy::await_holding_refcell_ref)]
    async fn apply_retention(&self) {
        let Ok(_exclusive) = self.maintenance.write().await else {
            return;
        };
        let result = {
            let mut log = self.log.borrow_mut();
            let result = log.apply_retention(now_ms()).await;
            self.metrics
                .log_start_offset
                .set(log.log_start_offset().0 as i64);
            result
        };
        match result {
            Ok(0) => {}
            Ok(deleted) => {
                tracing::info!(topic = %self.topic, partition = self.index, deleted, "retention deleted segments")
            }
            Err(error) => {
                tracing::error!(topic = %self.topic, partition = self.index, %error, "retention failed")
            }
        }
    }
}

fn read_error(error: wharf_storage::log::ReadError) -> PartitionError {
    use wharf_storage::log::ReadError;
    match error {
        ReadError::OutOfRange { .. } => {
            PartitionError::new(ErrorCode::OffsetOutOfRange, error.to_string())
        }
        ReadError::Corrupt { .. } => PartitionError::new(ErrorCode::CorruptData, error.to_string()),
        ReadError::Retry { .. } => {
            PartitionError::new(ErrorCode::PartitionUnavailable, error.to_string())
        }
        ReadError::Io(_) => PartitionError::new(ErrorCode::StorageError, error.to_string()),
    }
}

/// Bytes of the leading whole batches in `bytes` that start below `high_watermark`.
fn bytes_below(bytes: &[u8], high_watermark: Offset) -> usize {
    let mut at = 0;
    while at < bytes.len() {
        match batch::decode_header(&bytes[at..]) {
            Ok(header) if header.base_offset < high_watermark => at += header.batch_bytes(),
            Ok(_) | Err(BatchError::Truncated { .. }) => break,
            Err(_) => break,
        }
    }
    at.min(bytes.len())
}
