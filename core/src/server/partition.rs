//! The driver of one partition on its owning shard: appends, group-commit flushing,
//! durable-ack waiters, long-poll wake-ups, reads below the high watermark, retention.
//!
//! The log sits in a [`LogSlot`] and is only borrowed synchronously (plan a read, append, begin
//! or complete a flush), never across an await (`clippy::await_holding_refcell_ref` is denied
//! in the workspace). Maintenance (truncation, reset, retention) needs the log across awaits:
//! it takes the write side of `maintenance`, then takes the log out of its slot and puts it
//! back when done. Paths that change or read the log take the read side first (uncontended: a
//! synchronous `try_read`), so they never see the slot empty; the few synchronous paths that
//! cannot wait (the flusher, describe) find it empty and skip, instead of panicking on a borrow.

mod files;
mod log_slot;
mod maintenance;
mod persist;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::sync::{RwLock, RwLockReadGuard};
use glommio::{Task, TaskQueueHandle};
use wharf_replication::{
    Ack, AckLevel, BatchInfo, BrokerId, EpochHistory, FetchError, FetchReply, FetchRequest, Input,
    LogState, Output, ProduceError, Replica, ReplicaConfig, Role, WaiterId,
};
use wharf_storage::batch::{self, BatchError, BodyVerified};
use wharf_storage::disk::{Disk, DiskFile};
use wharf_storage::log::{AppendError, FlushOutcome, LogRead, FLUSHES_IN_FLIGHT_MAX};
use wharf_storage::{AppendMode, Epoch, LogConfig, Offset, PartitionLog};

use prometheus_client::metrics::histogram::Histogram;

use super::metrics::{Metrics, PartitionMetrics};
use crate::config::{FlushMode, TopicConfig};
use crate::dma_disk::DmaDisk;
use crate::protocol::{
    Acks, ErrorCode, FrameBuf, OffsetSpec, PartitionDescription, ReplicaFetchRequest,
    ReplicaFetchResponse,
};
use files::{load_epochs, load_high_watermark};
use log_slot::{log_busy, LogSlot};

pub type ReadBuffer = <<DmaDisk as Disk>::File as DiskFile>::ReadBuffer;
pub type Read = LogRead<ReadBuffer>;
/// Where one batch sits in a request or fetch frame, and the proof its body was CRC-checked.
type CheckedRange = (std::ops::Range<usize>, BodyVerified);

/// How long an idle partition waits before bringing its checkpoint up to date.
const IDLE_CHECKPOINT_MS: u64 = 1000;
/// Reads retried after racing retention before giving up.
const READ_RETRIES_MAX: usize = 3;
/// Reply ends a leader remembers per follower (`remember_served_end`).
const SERVED_ENDS_KEPT: usize = 16;
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

/// Wall-clock milliseconds since the Unix epoch: for what really is a timestamp (batch and
/// segment times, retention by time), never for durations.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Milliseconds on a monotonic clock (since the first call in this process): what the replica
/// measures ISR lag, produce deadlines and fetch backoff with. The wall clock can jump (NTP,
/// an operator): backwards, the replica's time stands still and deadlines stretch; forwards,
/// every follower leaves the ISR and every waiter times out at once.
pub fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// How this broker takes part in replicating the partition.
#[derive(Clone)]
pub struct ReplicationSettings {
    pub broker_id: BrokerId,
    /// Where each broker of the cluster takes replica fetches.
    pub internal_addresses: Rc<HashMap<BrokerId, String>>,
    /// What this broker proves on the leaders' internal listeners.
    pub peer: Option<crate::peer_auth::PeerCredentials>,
    pub replica_lag_max_ms: u64,
    pub fetch_wait_ms: u64,
    pub fetch_bytes_max: usize,
    pub fetch_backoff_ms: u64,
    pub frame_bytes_max: usize,
    pub queue: TaskQueueHandle,
}

type AckSender = oneshot::Sender<Result<Ack, PartitionError>>;

/// Registers a long poll in `waiters` and returns what wakes it. Fetches that timed out (or
/// whose connection closed) dropped their receivers: they are forgotten here, so an idle
/// partition polled for ever holds only the live ones.
fn park(waiters: &RefCell<Vec<oneshot::Sender<()>>>) -> oneshot::Receiver<()> {
    let (wake, woken) = oneshot::channel();
    let mut waiters = waiters.borrow_mut();
    waiters.retain(|waiter| !waiter.is_canceled());
    waiters.push(wake);
    woken
}

/// What an accepted produce did; `completion` resolves when the acks are reached.
pub struct Admitted {
    pub base_offset: Offset,
    pub last_offset: Offset,
    pub leader_epoch: Epoch,
    pub completion: Option<oneshot::Receiver<Result<Ack, PartitionError>>>,
}

fn produce_error(error: ProduceError) -> PartitionError {
    let code = match &error {
        ProduceError::NotLeader { .. }
        | ProduceError::LeaderChanged { .. }
        | ProduceError::LeaderLeaseExpired { .. } => ErrorCode::NotLeader,
        ProduceError::NotEnoughReplicas { .. } => ErrorCode::NotEnoughReplicas,
        ProduceError::NotEnoughReplicasAfterAppend { .. } => {
            ErrorCode::NotEnoughReplicasAfterAppend
        }
        ProduceError::InvalidAcks(..) => ErrorCode::InvalidRequest,
        ProduceError::Timeout { .. } => ErrorCode::RequestTimeout,
        ProduceError::TooManyWaiters { .. } => ErrorCode::LimitReached,
    };
    PartitionError::new(code, error.to_string())
}

pub fn ack_level(acks: Acks) -> AckLevel {
    match acks {
        Acks::None => AckLevel::None,
        Acks::Leader => AckLevel::Leader,
        Acks::Quorum => AckLevel::Quorum,
        Acks::All => AckLevel::All,
        Acks::Replicas(n) => AckLevel::Replicas(n),
    }
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
    pub replicas: Vec<u32>,
    dir: std::path::PathBuf,
    log_config: LogConfig,
    log: LogSlot,
    maintenance: RwLock<()>,
    high_watermark: Cell<Offset>,
    replica: RefCell<Replica>,
    replication: ReplicationSettings,
    next_waiter: Cell<u64>,
    /// Produce completions by waiter id, with the time the append happened.
    produce_waiters: RefCell<HashMap<u64, (Instant, AckSender)>>,
    data_waiters: RefCell<Vec<oneshot::Sender<()>>>,
    /// Follower fetches parked at this leader until the log end moves.
    append_waiters: RefCell<Vec<oneshot::Sender<()>>>,
    /// Follower: the next fetch to send, and the bytes of the reply being appended.
    outgoing_fetch: RefCell<Option<FetchRequest>>,
    wake_fetcher: LocalSender<()>,
    /// The last fetch response's frame and its batches, CRC-checked on arrival.
    fetched: RefCell<Option<(FrameBuf, Vec<CheckedRange>)>>,
    fetcher: RefCell<Option<Task<()>>>,
    /// Epoch-history generations: asked for by the replica, and durable in the file.
    epochs_wanted: Cell<u64>,
    epochs_stored: Cell<u64>,
    epochs_writing: Cell<bool>,
    epochs_failed: RefCell<Option<String>>,
    epochs_waiters: RefCell<Vec<oneshot::Sender<()>>>,
    /// Leader: the high watermark last stored, when, and whether a store is running.
    hw_stored: Cell<Offset>,
    hw_stored_at_ms: Cell<u64>,
    hw_storing: Cell<bool>,
    /// Leader: where the last replies to each follower ended (batch boundaries).
    served_ends: RefCell<HashMap<BrokerId, VecDeque<Offset>>>,
    /// Follower: the fetch offset the leader last reported corrupt (logged once per offset).
    corrupt_fetch_logged: Cell<Option<Offset>>,
    this: RefCell<std::rc::Weak<Partition>>,
    wake_flusher: LocalSender<()>,
    closing: Cell<bool>,
    pub metrics: PartitionMetrics,
    flush_latency: Histogram,
    retention_check_ms: u64,
    flusher: RefCell<Option<Task<()>>>,
}

impl Partition {
    /// Opens (recovering) the log in `dir`, starts its flusher on `queue` and takes up its role:
    /// the first replica leads (with a new epoch each time it starts), the others follow it.
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site (the shard); the arguments are the partition's identity and its shard's services"
    )]
    pub async fn open(
        dir: std::path::PathBuf,
        topic: &str,
        index: u32,
        topic_id: u64,
        config: TopicConfig,
        meta_epoch: Epoch,
        replicas: Vec<u32>,
        metrics: &Metrics,
        flush_latency: Histogram,
        retention_check_ms: u64,
        queue: TaskQueueHandle,
        replication: ReplicationSettings,
    ) -> Result<Rc<Partition>, String> {
        let disk = DmaDisk::open(&dir)
            .await
            .map_err(|e| format!("{topic}/{index}: {e}"))?;
        let log_config = config.log_config();
        let (mut log, report) = PartitionLog::open(Rc::new(disk), log_config.clone(), now_ms())
            .await
            .map_err(|e| format!("{topic}/{index}: recovery failed: {e}"))?;
        let me = replication.broker_id;
        let leader = replicas.first().copied().unwrap_or(me);
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
        if let Some(first) = report.corrupt.iter().map(|c| c.from).min() {
            if leader != me {
                // A follower repairs corruption from its leader: drop everything from the first
                // bad offset and fetch it again.
                tracing::warn!(topic, partition = index, from = %first, "follower truncates its corrupt suffix to fetch it again from the leader");
                log.truncate_suffix(first)
                    .await
                    .map_err(|e| format!("{topic}/{index}: cannot drop the corrupt suffix: {e}"))?;
            }
        }
        let files_dir = dir.clone();
        let (entries, stored_high_watermark) = glommio::executor()
            .spawn_blocking(move || (load_epochs(&files_dir), load_high_watermark(&files_dir)))
            .await;
        let stored_high_watermark = match stored_high_watermark {
            // Only a leader uses it: it computed it itself, from what a quorum held durably, and
            // a leader never truncates. A follower learns the HW from its leader.
            Ok(high_watermark) if leader == me => high_watermark,
            Ok(_) => Offset::ZERO,
            Err(error) => {
                tracing::warn!(topic, partition = index, %error, "ignoring the stored high watermark");
                Offset::ZERO
            }
        };
        let entries = match entries? {
            Some(entries) => entries,
            // Logs written before replication existed carry the metadata epoch.
            None if log.end_offset() > log.log_start_offset() => {
                vec![(meta_epoch, log.log_start_offset())]
            }
            None => Vec::new(),
        };
        let epochs = EpochHistory::new(entries, log.end_offset())
            .map_err(|e| format!("{topic}/{index}: {e}"))?;
        let end = log.end_offset();
        let durable = match config.flush {
            FlushMode::Always => log.durable_offset(),
            // The topic opted out of fsync before ack: appended counts as held.
            FlushMode::Interval => end,
        };
        let replica_config = ReplicaConfig {
            broker_id: me,
            replicas: if replicas.is_empty() {
                vec![me]
            } else {
                replicas.clone()
            },
            min_insync_replicas: usize::from(config.min_insync_replicas),
            replica_lag_max_ms: replication.replica_lag_max_ms,
            fetch_backoff_ms: replication.fetch_backoff_ms,
            isr_via_controller: false,
        };
        let current_epoch = epochs.latest().unwrap_or(Epoch(0)).max(meta_epoch);
        let replica = Replica::new(
            replica_config,
            LogState {
                log_start: log.log_start_offset(),
                end,
                durable,
                // Clamped to [log start, durable] by the replica: consumers and ListOffsets see
                // committed data at once instead of 0 until the followers fetch again.
                high_watermark: stored_high_watermark,
            },
            epochs,
            monotonic_ms(),
        )
        .map_err(|e| format!("{topic}/{index}: {e}"))?;
        let (wake_flusher, wake) = local_channel::new_bounded(1);
        let (wake_fetcher, fetcher_wake) = local_channel::new_bounded(1);
        let partition_metrics = PartitionMetrics::new(metrics, topic, index);
        partition_metrics.end_offset.set(end.0 as i64);
        partition_metrics
            .high_watermark
            .set(replica.high_watermark().0 as i64);
        partition_metrics
            .log_start_offset
            .set(log.log_start_offset().0 as i64);
        let partition = Rc::new(Partition {
            topic: topic.to_string(),
            index,
            topic_id,
            config,
            replicas,
            dir,
            log_config,
            log: LogSlot::new(log),
            maintenance: RwLock::new(()),
            high_watermark: Cell::new(replica.high_watermark()),
            replica: RefCell::new(replica),
            replication,
            next_waiter: Cell::new(1),
            produce_waiters: RefCell::new(HashMap::new()),
            data_waiters: RefCell::new(Vec::new()),
            append_waiters: RefCell::new(Vec::new()),
            outgoing_fetch: RefCell::new(None),
            wake_fetcher,
            fetched: RefCell::new(None),
            fetcher: RefCell::new(None),
            epochs_wanted: Cell::new(0),
            epochs_stored: Cell::new(0),
            epochs_writing: Cell::new(false),
            epochs_failed: RefCell::new(None),
            epochs_waiters: RefCell::new(Vec::new()),
            served_ends: RefCell::new(HashMap::new()),
            corrupt_fetch_logged: Cell::new(None),
            hw_stored: Cell::new(stored_high_watermark),
            hw_stored_at_ms: Cell::new(0),
            hw_storing: Cell::new(false),
            this: RefCell::new(std::rc::Weak::new()),
            wake_flusher,
            closing: Cell::new(false),
            metrics: partition_metrics,
            flush_latency,
            retention_check_ms,
            flusher: RefCell::new(None),
        });
        *partition.this.borrow_mut() = Rc::downgrade(&partition);
        let task = glommio::spawn_local_into(Rc::clone(&partition).run_flusher(wake, queue), queue)
            .map_err(|e| format!("cannot start flusher: {e}"))?;
        *partition.flusher.borrow_mut() = Some(task);
        if leader == me {
            let isr = partition.replica.borrow().replicas().to_vec();
            let epoch = Epoch(current_epoch.0 + 1);
            partition.step(Input::BecomeLeader {
                epoch,
                isr,
                partition_epoch: 0,
            })?;
            tracing::info!(topic, partition = index, %epoch, "leading");
        } else {
            let fetcher = glommio::spawn_local_into(
                Rc::clone(&partition).run_fetcher(fetcher_wake),
                partition.replication.queue,
            )
            .map_err(|e| format!("cannot start fetcher: {e}"))?;
            *partition.fetcher.borrow_mut() = Some(fetcher);
            partition.step(Input::BecomeFollower {
                epoch: current_epoch,
                leader,
            })?;
            tracing::info!(topic, partition = index, leader, "following");
        }
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

    /// Feeds `input` to the replica and carries out its outputs (and the inputs they lead to).
    /// Returns the outputs the caller must act on: `Append`, fetch answers, and completions of
    /// produces not registered yet (refusals).
    fn step(&self, input: Input) -> Result<Vec<Output>, String> {
        let mut inputs = VecDeque::from([input]);
        let mut unhandled = Vec::new();
        // Each output leads to at most one input; a chain longer than this is a bug.
        for _ in 0..1024 {
            let Some(input) = inputs.pop_front() else {
                return Ok(unhandled);
            };
            let mut outbox = Vec::new();
            self.replica.borrow_mut().step(input, &mut outbox);
            for output in outbox {
                if let Some(next) = self.execute(output, &mut unhandled)? {
                    inputs.push_back(next);
                }
            }
        }
        panic!("replica step chain did not end");
    }

    fn execute(
        &self,
        output: Output,
        unhandled: &mut Vec<Output>,
    ) -> Result<Option<Input>, String> {
        match output {
            Output::Complete { waiter, result } => {
                let entry = self.produce_waiters.borrow_mut().remove(&waiter.0);
                match entry {
                    Some((appended_at, done)) => {
                        self.metrics
                            .ack_wait
                            .observe(appended_at.elapsed().as_secs_f64());
                        let _ = done.send(result.map_err(produce_error));
                    }
                    None => unhandled.push(Output::Complete { waiter, result }),
                }
            }
            Output::Append { .. } | Output::ServeFetch { .. } | Output::RejectFetch { .. } => {
                unhandled.push(output)
            }
            Output::SendFetch { request, .. } => {
                *self.outgoing_fetch.borrow_mut() = Some(request);
                let _ = self.wake_fetcher.try_send(());
            }
            Output::AppendFetched { count } => {
                let fetched = self.fetched.borrow_mut().take();
                let Some((mut frame, ranges)) = fetched else {
                    return Err("AppendFetched without fetched batches".to_string());
                };
                let now = now_ms();
                // `fetch_once` holds the read side of `maintenance` while it steps the reply.
                let Some(mut log) = self.log.get_mut() else {
                    return Err("AppendFetched while the log is under maintenance".to_string());
                };
                for (range, verified) in ranges.into_iter().take(count) {
                    let batch = &mut frame[range];
                    if let Err(error) =
                        log.append_verified(batch, verified, AppendMode::Replica, now)
                    {
                        // Poisoned or inconsistent: the partition stops replicating until restart.
                        tracing::error!(topic = %self.topic, partition = self.index, %error, "cannot append fetched batches");
                        return Err(error.to_string());
                    }
                }
                let end = log.end_offset();
                drop(log);
                self.metrics.end_offset.set(end.0 as i64);
                let _ = self.wake_flusher.try_send(());
                if self.config.flush == FlushMode::Interval {
                    // Appended counts as held for this topic: report it with the append.
                    self.step(Input::FetchedAppended { next_offset: end })?;
                    return Ok(Some(Input::Flushed { durable: end }));
                }
                return Ok(Some(Input::FetchedAppended { next_offset: end }));
            }
            Output::Truncate { to } => {
                let partition = self.self_rc();
                let task = glommio::spawn_local_into(
                    async move { partition.truncate(to).await },
                    self.replication.queue,
                )
                .map_err(|e| format!("cannot start truncation: {e}"))?;
                task.detach();
            }
            Output::ResetLog { start } => {
                let partition = self.self_rc();
                let task = glommio::spawn_local_into(
                    async move { partition.reset_log(start).await },
                    self.replication.queue,
                )
                .map_err(|e| format!("cannot start the log reset: {e}"))?;
                task.detach();
            }
            Output::EpochHistoryChanged => self.persist_epochs()?,
            Output::HighWatermark(offset) => self.advance_high_watermark(offset),
            Output::IsrChanged(isr) => {
                let replicas = self.replicas.len().max(1);
                self.metrics.isr_size.set(isr.len() as i64);
                self.metrics
                    .under_replicated
                    .set(i64::from(isr.len() < replicas));
                tracing::info!(topic = %self.topic, partition = self.index, ?isr, "ISR changed");
            }
            // Only controller mode proposes; this driver runs the static mode.
            Output::ProposeIsr { .. } => {}
        }
        Ok(None)
    }

    fn self_rc(&self) -> Rc<Partition> {
        self.this
            .borrow()
            .upgrade()
            .expect("a partition in use is alive")
    }

    pub fn tick(&self) {
        if let Err(error) = self.step(Input::Tick {
            now_ms: monotonic_ms(),
        }) {
            tracing::error!(topic = %self.topic, partition = self.index, %error, "replica tick failed");
        }
        let replica = self.replica.borrow();
        let (lag_offsets, lag_ms) = replica
            .follower_lag()
            .into_iter()
            .fold((0, 0), |(o, m), (_, offsets, ms)| {
                (o.max(offsets), m.max(ms))
            });
        self.metrics.follower_lag_offsets.set(lag_offsets as i64);
        self.metrics.follower_lag_ms.set(lag_ms as i64);
        let is_leader = replica.is_leader();
        drop(replica);
        if is_leader {
            self.maybe_store_high_watermark();
        }
    }

    /// Validates and appends the batches in `payload` (all or none), returning the assigned
    /// offsets and a completion that resolves when the acks are reached.
    pub async fn produce(
        &self,
        payload: &mut [u8],
        acks: Acks,
        timeout_ms: u64,
    ) -> Result<Admitted, PartitionError> {
        if self.closing.get() {
            return Err(PartitionError::new(
                ErrorCode::ShuttingDown,
                "broker is shutting down",
            ));
        }
        if let Some(error) = self.epochs_failed.borrow().as_ref() {
            return Err(PartitionError::new(
                ErrorCode::StorageError,
                format!("the epoch history could not be written ({error}); restart to recover"),
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
            bounds.push((at..at + bytes, checked.body_verified()));
            at += bytes;
        }
        if bounds.is_empty() {
            return Err(PartitionError::new(ErrorCode::InvalidBatch, "no batches"));
        }
        let Some(_guard) = self.shared().await else {
            return Err(PartitionError::new(
                ErrorCode::PartitionUnavailable,
                "partition closed",
            ));
        };
        // From here to the append nothing awaits: the replica's decision holds.
        let waiter = WaiterId(self.next_waiter.get());
        self.next_waiter.set(waiter.0 + 1);
        let outputs = self
            .step(Input::Produce {
                waiter,
                acks: ack_level(acks),
                deadline_ms: monotonic_ms().saturating_add(timeout_ms),
            })
            .map_err(|e| PartitionError::new(ErrorCode::StorageError, e))?;
        let leader_epoch = match outputs.as_slice() {
            [Output::Append { leader_epoch, .. }] => *leader_epoch,
            [Output::Complete {
                result: Err(error), ..
            }] => return Err(produce_error(error.clone())),
            other => panic!("unexpected answer to Produce: {other:?}"),
        };
        let appended = self.append_produce(payload, bounds, leader_epoch);
        let (first, last, end) = match appended {
            Ok(appended) => appended,
            Err(error) => {
                let _ = self.step(Input::ProduceAborted { waiter });
                return Err(error);
            }
        };
        self.metrics.end_offset.set(end.0 as i64);
        self.metrics.produced_bytes.inc_by(payload.len() as u64);
        let _ = self.wake_flusher.try_send(());
        for parked in self.append_waiters.borrow_mut().drain(..) {
            let _ = parked.send(());
        }
        let (done, completion) = oneshot::channel();
        self.produce_waiters
            .borrow_mut()
            .insert(waiter.0, (Instant::now(), done));
        let stepped = self
            .step(Input::ProduceAppended {
                waiter,
                base_offset: first,
                next_offset: last.plus(1),
            })
            .and_then(|_| {
                if self.config.flush == FlushMode::Interval {
                    // The topic opted out of fsync before ack: appended counts as held.
                    self.step(Input::Flushed { durable: end }).map(|_| ())
                } else {
                    Ok(())
                }
            });
        if let Err(message) = stepped {
            return Err(PartitionError::new(ErrorCode::StorageError, message));
        }
        Ok(Admitted {
            base_offset: first,
            last_offset: last,
            leader_epoch,
            completion: Some(completion),
        })
    }

    /// Appends validated batches as leader of `leader_epoch`: (first offset, last offset, end).
    fn append_produce(
        &self,
        payload: &mut [u8],
        bounds: Vec<CheckedRange>,
        leader_epoch: Epoch,
    ) -> Result<(Offset, Offset, Offset), PartitionError> {
        let mut log = self.log.get_mut().ok_or_else(log_busy)?;
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
        for (range, verified) in bounds {
            let appended = log
                .append_verified(
                    &mut payload[range],
                    verified,
                    AppendMode::Leader { leader_epoch },
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
            first.get_or_insert(appended.base_offset);
            last = Some(appended.last_offset);
        }
        let (Some(first), Some(last)) = (first, last) else {
            unreachable!("at least one batch was appended");
        };
        Ok((first, last, log.end_offset()))
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
            if let Err(error) = self.step(Input::Flushed { durable }) {
                tracing::error!(topic = %self.topic, partition = self.index, %error, "replica step failed");
            }
        }
    }

    fn fail_waiters(&self, error: PartitionError) {
        for (_, (_, done)) in self.produce_waiters.borrow_mut().drain() {
            let _ = done.send(Err(error.clone()));
        }
    }

    /// Leader: answers a follower's fetch (long-polling up to its max wait when there is
    /// nothing new). Returns the response and the bytes to send with it.
    pub async fn replica_fetch(
        &self,
        request: &ReplicaFetchRequest,
        wait_ms_max: u64,
    ) -> (ReplicaFetchResponse, Option<FetchData>) {
        let mut response = ReplicaFetchResponse {
            error: 0,
            message: String::new(),
            fetch_id: request.fetch_id,
            leader_epoch: 0,
            high_watermark: 0,
            log_start_offset: 0,
            diverging_epoch: 0,
            diverging_end_offset: 0,
            batch_bytes: 0,
        };
        let fetch = FetchRequest {
            replica: request.replica_id,
            leader_epoch: Epoch(request.leader_epoch),
            fetch_id: request.fetch_id,
            fetch_offset: Offset(request.fetch_offset),
            last_fetched_epoch: request.last_fetched_epoch.map(Epoch),
            durable_offset: Offset(request.durable_offset),
            may_wait: request.max_wait_ms > 0,
        };
        if let Some(offset) = self.offset_inside_a_batch(&fetch).await {
            // Refused before the replica sees it: no progress, HW or ISR change.
            response.leader_epoch = self.replica.borrow().leader_epoch().0;
            response.error = ErrorCode::InvalidReplicaOffsets as u16;
            response.message = format!(
                "offset {offset} reported by replica {} does not start a batch here",
                request.replica_id
            );
            return (response, None);
        }
        let outputs = match self.step(Input::FetchRequest(fetch)) {
            Ok(outputs) => outputs,
            Err(message) => {
                response.error = ErrorCode::StorageError as u16;
                response.message = message;
                return (response, None);
            }
        };
        response.leader_epoch = self.replica.borrow().leader_epoch().0;
        let answer = outputs.into_iter().find(|o| {
            matches!(o, Output::ServeFetch { fetch_id, .. } | Output::RejectFetch { fetch_id, .. } if *fetch_id == request.fetch_id)
        });
        let from = match answer {
            Some(Output::ServeFetch { fetch_offset, .. }) => fetch_offset,
            Some(Output::RejectFetch { error, .. }) => {
                let code = match error {
                    FetchError::NotLeader { .. } => ErrorCode::NotLeader,
                    FetchError::FencedEpoch { .. } => ErrorCode::FencedLeaderEpoch,
                    FetchError::Diverging { epoch, end_offset } => {
                        response.diverging_epoch = epoch.0;
                        response.diverging_end_offset = end_offset.0;
                        ErrorCode::DivergingLog
                    }
                    FetchError::OffsetOutOfRange { log_start, .. } => {
                        // The follower starts again there (`ResetLog`).
                        response.log_start_offset = log_start.0;
                        ErrorCode::OffsetOutOfRange
                    }
                    FetchError::UnknownReplica(_) => ErrorCode::InvalidRequest,
                    FetchError::InvalidOffsets { .. } => ErrorCode::InvalidReplicaOffsets,
                    FetchError::CorruptData { .. } => ErrorCode::CorruptData,
                };
                response.error = code as u16;
                response.message = error.to_string();
                return (response, None);
            }
            _ => panic!("the replica did not answer fetch {}", request.fetch_id),
        };
        let wait_ms = u64::from(request.max_wait_ms).min(wait_ms_max);
        let deadline = Instant::now() + Duration::from_millis(wait_ms);
        let nothing_new = self.log.get().is_some_and(|log| log.end_offset() <= from);
        if nothing_new && !self.closing.get() {
            let woken = park(&self.append_waiters);
            let remaining = deadline.saturating_duration_since(Instant::now());
            let _ = glommio::timer::timeout(remaining, async {
                let _ = woken.await;
                Ok(())
            })
            .await;
        }
        let data = match self.read_to(from, request.max_bytes as usize, None).await {
            Ok(data) => data,
            Err(error) => {
                if error.code == ErrorCode::OffsetOutOfRange {
                    // Retention moved the log start during the long poll: the follower starts
                    // again there (`ResetLog`).
                    if let Some(log) = self.log.get() {
                        response.log_start_offset = log.log_start_offset().0;
                    }
                }
                response.error = error.code as u16;
                response.message = error.message;
                return (response, None);
            }
        };
        if let Some(read) = data.read.as_ref().filter(|r| data.bytes == r.bytes().len()) {
            self.remember_served_end(request.replica_id, read.next_offset);
        }
        let replica = self.replica.borrow();
        response.leader_epoch = replica.leader_epoch().0;
        response.high_watermark = replica.high_watermark().0;
        response.log_start_offset = data.log_start_offset.0;
        response.batch_bytes = data.bytes as u32;
        (response, Some(data))
    }

    /// Leader: remembers a batch boundary of this log that `replica` will report: where a reply
    /// to it ended, or an offset it reported that was checked. The follower's next fetch offset
    /// is such an end, and its durable offset usually is (or repeats while nothing new is
    /// durable, with `flush = "interval"`), so checking them against the log's batches rarely
    /// needs a read. Forgotten when the log is truncated or reset.
    fn remember_served_end(&self, replica: BrokerId, end: Offset) {
        let mut served = self.served_ends.borrow_mut();
        let ends = served.entry(replica).or_default();
        if ends.back() != Some(&end) {
            if ends.len() == SERVED_ENDS_KEPT {
                ends.pop_front();
            }
            ends.push_back(end);
        }
    }

    /// Leader: the first of a follower's reported offsets (fetch, then durable) that lies inside
    /// one of this log's batches. The replica checks the offsets' order and range but does not
    /// know batches; an offset inside a batch would let the HW (and consumers' reads, which
    /// return whole batches below it) land inside a batch. Only fetches the replica would serve
    /// are checked: a diverging follower's offsets mean nothing in this log.
    async fn offset_inside_a_batch(&self, fetch: &FetchRequest) -> Option<Offset> {
        if self.replica.borrow().validate_fetch(fetch).is_err() {
            return None; // The replica answers it (rejects it) itself.
        }
        let offsets = [fetch.fetch_offset, fetch.durable_offset];
        for (i, &offset) in offsets.iter().enumerate() {
            let served = self
                .served_ends
                .borrow()
                .get(&fetch.replica)
                .is_some_and(|ends| ends.contains(&offset));
            if served || (i > 0 && offset == offsets[0]) {
                continue;
            }
            let check = {
                let _guard = self.shared().await?;
                let log = self.log.get()?;
                if offset < log.log_start_offset() {
                    // Durable data retention already deleted here: nothing to check against.
                    continue;
                }
                log.plan_boundary_check(offset)
            };
            // A read that fails, or cannot tell yet, is left to the serving read to report.
            let resolved = match check {
                Ok(check) => check.resolve().await,
                Err(error) => Err(error),
            };
            match resolved {
                Ok(Some(false)) => return Some(offset),
                Ok(Some(true)) => self.remember_served_end(fetch.replica, offset),
                _ => {}
            }
        }
        None
    }

    /// Follower: sends the fetches the replica asks for, one at a time, to the leader's owning
    /// shard, and feeds the answers back.
    async fn run_fetcher(self: Rc<Self>, wake: LocalReceiver<()>) {
        let mut connection: Option<Rc<crate::client::Connection>> = None;
        loop {
            if self.closing.get() {
                return;
            }
            let request = self.outgoing_fetch.borrow_mut().take();
            let Some(request) = request else {
                if wake.recv().await.is_none() {
                    return;
                }
                continue;
            };
            let Role::Follower { leader } = self.replica.borrow().role() else {
                continue;
            };
            if let Err(error) = self.fetch_once(&mut connection, leader, request).await {
                tracing::debug!(topic = %self.topic, partition = self.index, leader, %error, "replica fetch failed");
                connection = None;
                if let Err(error) = self.step(Input::FetchFailed {
                    fetch_id: request.fetch_id,
                }) {
                    tracing::error!(%error, "replica step failed");
                }
            }
        }
    }

    async fn fetch_once(
        &self,
        connection: &mut Option<Rc<crate::client::Connection>>,
        leader: BrokerId,
        request: FetchRequest,
    ) -> Result<(), String> {
        use crate::client::{decode, Client, ClientConfig, Connection};
        use crate::protocol::ApiKey;
        let settings = &self.replication;
        if connection.as_ref().is_none_or(|c| c.is_closed()) {
            let address = settings
                .internal_addresses
                .get(&leader)
                .ok_or_else(|| format!("broker {leader} is not in cluster.brokers"))?;
            let mut client_config = ClientConfig::new(address.clone());
            client_config.peer = settings.peer.clone();
            let client = Client::connect(client_config)
                .await
                .map_err(|e| e.to_string())?;
            let owner = client
                .partition_address(&self.topic, self.index)
                .await
                .map_err(|e| e.to_string())?;
            *connection = Some(
                Connection::connect_peer(&owner, settings.frame_bytes_max, settings.peer.as_ref())
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        let Some(conn) = connection.as_ref() else {
            unreachable!("connected above");
        };
        let body = ReplicaFetchRequest {
            replica_id: settings.broker_id,
            topic: self.topic.clone(),
            topic_id: self.topic_id,
            partition: self.index,
            leader_epoch: request.leader_epoch.0,
            fetch_id: request.fetch_id,
            fetch_offset: request.fetch_offset.0,
            last_fetched_epoch: request.last_fetched_epoch.map(|e| e.0),
            durable_offset: request.durable_offset.0,
            max_wait_ms: if request.may_wait {
                settings.fetch_wait_ms as u32
            } else {
                0
            },
            max_bytes: settings.fetch_bytes_max as u32,
        };
        let timeout_ms = settings.fetch_wait_ms + 10_000;
        let frame = conn
            .call(ApiKey::ReplicaFetch, &body, Vec::new(), timeout_ms)
            .await
            .map_err(|e| e.to_string())?;
        let response: ReplicaFetchResponse = decode(&frame).map_err(|e| e.to_string())?;
        let epoch = Epoch(response.leader_epoch);
        let reply = match ErrorCode::from_u16(response.error) {
            ErrorCode::None => {
                self.corrupt_fetch_logged.set(None);
                let payload = frame.payload();
                let payload_start = frame.bytes.len() - payload.len();
                let bytes = payload
                    .get(..response.batch_bytes as usize)
                    .ok_or("replica fetch payload shorter than declared")?;
                let mut batches = Vec::new();
                let mut ranges = Vec::new();
                let mut at = 0usize;
                for checked in batch::batches(bytes) {
                    // A batch that fails its CRC is not appended: the next fetch asks again.
                    let Ok(checked) = checked else { break };
                    let header = checked.header;
                    batches.push(BatchInfo {
                        base_offset: header.base_offset,
                        next_offset: header.next_offset(),
                        leader_epoch: header.leader_epoch,
                    });
                    ranges.push((
                        payload_start + at..payload_start + at + checked.bytes.len(),
                        checked.body_verified(),
                    ));
                    at += checked.bytes.len();
                }
                *self.fetched.borrow_mut() = Some((frame.bytes, ranges));
                FetchReply::Data {
                    high_watermark: Offset(response.high_watermark),
                    log_start: Offset(response.log_start_offset),
                    batches,
                }
            }
            ErrorCode::FencedLeaderEpoch if epoch > self.replica.borrow().leader_epoch() => {
                // Static cluster: the leader restarted with a new epoch; follow it there.
                tracing::info!(topic = %self.topic, partition = self.index, leader, %epoch, "following the leader's new epoch");
                self.step(Input::BecomeFollower { epoch, leader })?;
                return Ok(());
            }
            ErrorCode::DivergingLog => FetchReply::Error(FetchError::Diverging {
                epoch: Epoch(response.diverging_epoch),
                end_offset: Offset(response.diverging_end_offset),
            }),
            ErrorCode::FencedLeaderEpoch => FetchReply::Error(FetchError::FencedEpoch {
                requested: request.leader_epoch,
                current: epoch,
            }),
            ErrorCode::OffsetOutOfRange => FetchReply::Error(FetchError::OffsetOutOfRange {
                requested: request.fetch_offset,
                log_start: Offset(response.log_start_offset),
            }),
            ErrorCode::CorruptData => {
                self.metrics.replica_fetch_corrupt.inc();
                // Once per range: the replica retries slowly (CORRUPT_FETCH_BACKOFF_MS), and
                // every retry fails the same way until the leader's copy is repaired.
                if self
                    .corrupt_fetch_logged
                    .replace(Some(request.fetch_offset))
                    != Some(request.fetch_offset)
                {
                    tracing::error!(topic = %self.topic, partition = self.index, leader, offset = %request.fetch_offset, message = %response.message, "the leader's copy of the data this follower needs is corrupt; retrying slowly until it is repaired");
                }
                FetchReply::Error(FetchError::CorruptData {
                    offset: request.fetch_offset,
                })
            }
            code => {
                tracing::debug!(topic = %self.topic, partition = self.index, code = code.name(), message = %response.message, "replica fetch refused");
                FetchReply::Error(FetchError::NotLeader { epoch })
            }
        };
        // The reply may be appended (`AppendFetched`, synchronously in this step): keep
        // maintenance out while it is.
        let Some(_guard) = self.shared().await else {
            return Err("partition closed".to_string());
        };
        self.step(Input::FetchReply {
            fetch_id: request.fetch_id,
            leader_epoch: epoch,
            reply,
        })?;
        Ok(())
    }

    /// Resolves once the high watermark passes `offset`, or at `deadline`.
    pub async fn wait_for_data(&self, offset: Offset, deadline: Instant) {
        if self.high_watermark.get() > offset || self.closing.get() {
            return;
        }
        let woken = park(&self.data_waiters);
        // Counts this fetch as parked until it returns or is dropped.
        struct Parked<'a>(&'a prometheus_client::metrics::gauge::Gauge);
        impl Drop for Parked<'_> {
            fn drop(&mut self) {
                self.0.dec();
            }
        }
        self.metrics.fetches_waiting.inc();
        let _parked = Parked(&self.metrics.fetches_waiting);
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
        self.read_to(from, max_bytes, Some(self.high_watermark.get()))
            .await
    }

    /// Whole batches from `from` that start below `limit` (the log end when `None`: followers
    /// copy what consumers cannot see yet).
    async fn read_to(
        &self,
        from: Offset,
        max_bytes: usize,
        limit: Option<Offset>,
    ) -> Result<FetchData, PartitionError> {
        for _ in 0..READ_RETRIES_MAX {
            let reported_high_watermark = self.high_watermark.get();
            let plan = {
                let Some(_guard) = self.shared().await else {
                    return Err(PartitionError::new(
                        ErrorCode::PartitionUnavailable,
                        "partition closed",
                    ));
                };
                let log = self.log.get().ok_or_else(log_busy)?;
                let log_start = log.log_start_offset();
                let end = log.end_offset();
                let high_watermark = limit.unwrap_or(end);
                if from < log_start || from > end {
                    return Err(PartitionError::new(
                        ErrorCode::OffsetOutOfRange,
                        format!("offset {from} is outside [{log_start}, {end}]"),
                    ));
                }
                if from >= high_watermark {
                    return Ok(FetchData {
                        high_watermark: reported_high_watermark,
                        log_start_offset: log_start,
                        read: None,
                        bytes: 0,
                    });
                }
                (log.plan_read(from, max_bytes), log_start, high_watermark)
            };
            let (plan, log_start, high_watermark) = plan;
            let plan = plan.map_err(read_error)?;
            let read = match plan.execute().await {
                Ok(read) => read,
                Err(wharf_storage::log::ReadError::Retry { .. }) => continue,
                Err(e) => return Err(read_error(e)),
            };
            let bytes = bytes_below(read.bytes(), high_watermark);
            self.metrics.fetched_bytes.inc_by(bytes as u64);
            return Ok(FetchData {
                high_watermark: reported_high_watermark,
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

    async fn log_start(&self) -> Result<Offset, PartitionError> {
        let Some(_guard) = self.shared().await else {
            return Err(PartitionError::new(
                ErrorCode::PartitionUnavailable,
                "partition closed",
            ));
        };
        let log = self.log.get().ok_or_else(log_busy)?;
        Ok(log.log_start_offset())
    }

    pub async fn list_offset(&self, spec: OffsetSpec) -> Result<Offset, PartitionError> {
        match spec {
            OffsetSpec::Earliest => self.log_start().await,
            OffsetSpec::Latest => Ok(self.high_watermark.get()),
            OffsetSpec::Timestamp(timestamp_ms) => self.offset_for_timestamp(timestamp_ms).await,
        }
    }

    /// Scans batch headers from the log start (no time index yet) for the first record at or
    /// after `timestamp_ms`; the high watermark when there is none.
    async fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Offset, PartitionError> {
        let mut at = self.log_start().await?;
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
        let log = self.log.get();
        let (log_start, end, error) = match &log {
            Some(log) => (
                log.log_start_offset().0,
                log.end_offset().0,
                if log.poisoned().is_some() {
                    ErrorCode::StorageError as u16
                } else {
                    0
                },
            ),
            // Maintenance is running: report what the metrics last saw.
            None => (
                self.metrics.log_start_offset.get() as u64,
                self.metrics.end_offset.get() as u64,
                0,
            ),
        };
        let replica = self.replica.borrow();
        let leader = match replica.role() {
            Role::Leader => self.replication.broker_id,
            Role::Follower { leader } => leader,
        };
        PartitionDescription {
            partition: self.index,
            leader,
            leader_epoch: replica.leader_epoch().0,
            shard: 0,
            replicas: replica.replicas().to_vec(),
            // A follower does not know the ISR: the leader's describe does.
            isr: replica.isr().to_vec(),
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
        // Dropping the fetcher's task cancels a fetch in flight.
        drop(self.fetcher.borrow_mut().take());
        for parked in self.append_waiters.borrow_mut().drain(..) {
            let _ = parked.send(());
        }
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
        // One store at a time (they share a temp file); `closing` stops new periodic ones.
        while self.hw_storing.get() {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        let high_watermark = self.high_watermark.get();
        if self.replica.borrow().is_leader() && high_watermark > self.hw_stored.get() {
            self.store_high_watermark(high_watermark).await;
        }
    }

    async fn run_flusher(self: Rc<Self>, wake: LocalReceiver<()>, queue: TaskQueueHandle) {
        let mut in_flight: VecDeque<(Instant, Task<FlushOutcome>)> = VecDeque::new();
        // Flush timing is a duration: the monotonic clock, like the replica's.
        let mut last_flush_ms = monotonic_ms();
        let mut flushed_since_checkpoint = false;
        let mut last_retention = Instant::now();
        loop {
            let closing = self.closing.get();
            while in_flight.len() < FLUSHES_IN_FLIGHT_MAX {
                let now = monotonic_ms();
                if !self.epochs_durable() {
                    break; // `write_epochs` wakes this loop when the file is current.
                }
                let job = {
                    // Out of its slot while maintenance runs: nothing to flush meanwhile.
                    let Some(mut log) = self.log.get_mut() else {
                        break;
                    };
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
                FlushMode::Interval if self.staged_bytes() > 0 => self
                    .config
                    .flush_interval_ms
                    .saturating_sub(monotonic_ms().saturating_sub(last_flush_ms))
                    .max(1),
                _ => IDLE_CHECKPOINT_MS.min(self.retention_check_ms),
            };
            let woken = glommio::timer::timeout(Duration::from_millis(wait_ms), async {
                Ok(wake.recv().await)
            })
            .await;
            if woken.is_err() && flushed_since_checkpoint && self.staged_bytes() == 0 {
                // Idle: make the checkpoint current so recovery knows the whole log is
                // acknowledged data (see storage/README.md).
                if let Some(mut log) = self.log.get_mut() {
                    log.request_checkpoint();
                    flushed_since_checkpoint = false;
                }
                self.flush_now(queue).await;
            }
        }
        // Closing: everything staged was flushed above; write a current checkpoint (twice, as
        // `PartitionLog::close` does: the second also covers index files sealed by the first).
        for _ in 0..2 {
            if let Some(mut log) = self.log.get_mut() {
                log.request_checkpoint();
            }
            self.flush_now(queue).await;
        }
    }

    /// Bytes appended and not yet handed to a flush (0 while maintenance holds the log).
    fn staged_bytes(&self) -> usize {
        self.log.get().map_or(0, |log| log.staged_bytes())
    }

    async fn flush_now(&self, queue: TaskQueueHandle) {
        if !self.wait_epochs_durable().await {
            return;
        }
        let begun = match self.log.get_mut() {
            Some(mut log) => log.begin_flush(),
            None => return,
        };
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
        // Maintenance takes the log only with no flush in flight, so it is here.
        let Some(result) = self
            .log
            .get_mut()
            .map(|mut log| log.complete_flush(outcome))
        else {
            tracing::error!(topic = %self.topic, partition = self.index, "a flush completed while maintenance held the log");
            return;
        };
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
