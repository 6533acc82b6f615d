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
//!
//! This file holds the partition's state, opening, produce, describe and close. The rest:
//! - `outputs`: the one place the replica is stepped and its outputs are carried out.
//! - `flusher`: group commit, retention checks and checkpoints.
//! - `read`: consumer reads, long polls and offset lookups.
//! - `replica_fetch` (leader) and `follower`: the two ends of replication.
//! - `maintenance`: truncation, reset and retention; `persist` and `files`: the epoch history
//!   and high watermark files; `log_slot`: where the log lives.

mod control;
mod files;
mod flusher;
mod follower;
mod log_slot;
mod maintenance;
mod outputs;
mod persist;
mod read;
mod replica_fetch;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use glommio::channels::local_channel::{self, LocalSender};
use glommio::sync::{RwLock, RwLockReadGuard};
use glommio::{Task, TaskQueueHandle};
use wharf_replication::{
    Ack, AckLevel, BrokerId, EpochHistory, FetchRequest, Input, LogState, ProduceError, Replica,
    ReplicaConfig, Role, WaiterId,
};
use wharf_storage::disk::{Disk, DiskFile};
use wharf_storage::log::{AppendError, LogRead};
use wharf_storage::{Epoch, Offset, PartitionLog};

use prometheus_client::metrics::histogram::Histogram;

use super::metrics::{Metrics, PartitionMetrics};
use crate::config::{FlushMode, TopicConfig};
use crate::dma_disk::DmaDisk;
use crate::protocol::{Acks, ErrorCode, FrameBuf, PartitionDescription};
use files::{load_epochs, load_high_watermark};
use log_slot::LogSlot;
use wharf_replication::driver::{self, Fetched, ProduceFailure};
use wharf_replication::producers::{ProducerStates, SequenceError};

pub type ReadBuffer = <<DmaDisk as Disk>::File as DiskFile>::ReadBuffer;
pub type Read = LogRead<ReadBuffer>;

/// An error for one partition, as sent to the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionError {
    pub code: ErrorCode,
    pub message: String,
    /// With `NotLeader`: the leader this replica follows and its epoch, when it knows one
    /// (the client retries there without asking for metadata).
    pub current_leader: Option<(BrokerId, Epoch)>,
}

impl PartitionError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> PartitionError {
        PartitionError {
            code,
            message: message.into(),
            current_leader: None,
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
    /// Controller mode: roles, epochs and the ISR come from the controller
    /// (`Partition::apply_state`); the leader proposes ISR changes through `isr_proposals`.
    pub controller_mode: bool,
    pub isr_proposals: Rc<IsrProposals>,
}

/// The controller's state of one partition (controller mode), applied by
/// [`Partition::apply_state`].
pub use wharf_replication::driver::PartitionState;

/// A leader's request to the controller to change a partition's ISR (Kafka's AlterPartition).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IsrProposal {
    pub topic: String,
    pub partition: u32,
    pub leader: BrokerId,
    pub leader_epoch: Epoch,
    pub partition_epoch: u64,
    pub isr: Vec<BrokerId>,
}

/// Proposals queued on their way to the controller, per shard. Each leader has at most one
/// outstanding and re-proposes after `ISR_PROPOSAL_RETRY_MS`, so dropping the oldest when full
/// loses nothing for good.
#[derive(Default)]
pub struct IsrProposals {
    queue: RefCell<VecDeque<IsrProposal>>,
    waiters: RefCell<Vec<oneshot::Sender<()>>>,
}

/// Proposals a shard holds before the oldest is dropped.
pub const ISR_PROPOSALS_QUEUED_MAX: usize = 4096;

impl IsrProposals {
    pub fn push(&self, proposal: IsrProposal) {
        let mut queue = self.queue.borrow_mut();
        if queue.len() >= ISR_PROPOSALS_QUEUED_MAX {
            queue.pop_front();
        }
        queue.push_back(proposal);
        drop(queue);
        for waiter in self.waiters.borrow_mut().drain(..) {
            let _ = waiter.send(());
        }
    }

    /// Everything queued, waiting for the first proposal when there is none.
    pub async fn take(&self) -> Vec<IsrProposal> {
        loop {
            let taken: Vec<IsrProposal> = self.queue.borrow_mut().drain(..).collect();
            if !taken.is_empty() {
                return taken;
            }
            let woken = park(&self.waiters);
            let _ = woken.await;
        }
    }
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

fn produce_failure(failure: ProduceFailure) -> PartitionError {
    let code = match &failure {
        ProduceFailure::Refused(error) => return produce_error(error.clone()),
        ProduceFailure::NoBatches | ProduceFailure::InvalidBatch { .. } => ErrorCode::InvalidBatch,
        ProduceFailure::Backpressure { .. } => ErrorCode::Backpressure,
        ProduceFailure::LogBusy => ErrorCode::PartitionUnavailable,
        ProduceFailure::Append(error) => match error {
            AppendError::Poisoned(_) => ErrorCode::StorageError,
            AppendError::InvalidBatch(_) => ErrorCode::InvalidBatch,
            AppendError::Backpressure { .. } => ErrorCode::Backpressure,
            AppendError::OffsetMismatch { .. } => ErrorCode::Unknown,
        },
        ProduceFailure::Sequence(error) => match error {
            SequenceError::OutOfOrder { .. } => ErrorCode::OutOfOrderSequence,
            SequenceError::FencedEpoch { .. } => ErrorCode::InvalidProducerEpoch,
            SequenceError::InvalidSequence { .. } | SequenceError::PartlyDuplicate => {
                ErrorCode::InvalidBatch
            }
        },
        ProduceFailure::Driver(_) => ErrorCode::StorageError,
    };
    PartitionError::new(code, failure.to_string())
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
    let current_leader = match &error {
        ProduceError::NotLeader {
            leader: Some(leader),
            epoch,
        } => Some((*leader, *epoch)),
        _ => None,
    };
    PartitionError {
        current_leader,
        ..PartitionError::new(code, error.to_string())
    }
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

/// Per follower: broker, lag in records, lag in ms, in the ISR.
pub struct FollowerLagView {
    pub high_watermark: u64,
    pub followers: Vec<(u32, u64, u64, bool)>,
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
    fetched: RefCell<Option<Fetched<FrameBuf>>>,
    /// Idempotent producers' last batches (kept in step with the log by the driver core).
    producers: RefCell<ProducerStates>,
    fetcher: RefCell<Option<Task<()>>>,
    /// Follower: woken when the controller changes this replica's leader or epoch, so a fetch
    /// in flight to the old leader is abandoned at once.
    role_waiters: RefCell<Vec<oneshot::Sender<()>>>,
    /// Controller mode: a state to apply once the follower log change in progress (truncation,
    /// reset) is done; the replica cannot lead in the middle of one.
    pending_state: RefCell<Option<PartitionState>>,
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
    /// Follower: when a replica fetch last succeeded (monotonic ms; 0: never). A follower that
    /// has not heard from its leader for longer than its fetches may wait plus
    /// `follower_lag_ms_max` stops serving consumers (`Shard::serve_read`).
    leader_heard_ms: Cell<u64>,
    /// Follower: the fetch offset the leader last reported corrupt (logged once per offset).
    corrupt_fetch_logged: Cell<Option<Offset>>,
    this: RefCell<std::rc::Weak<Partition>>,
    wake_flusher: LocalSender<()>,
    closing: Cell<bool>,
    pub metrics: PartitionMetrics,
    /// Leader: where each consumer of this partition was last sent to read (follower reads).
    pub(crate) readers: RefCell<crate::server::read_replicas::ReaderTable>,
    /// Leader: bytes appended per second (sampled on the shard's tick), and the counter value
    /// at the last sample: what a tailing reader costs the replica that serves it.
    ingest_bytes_per_s: Cell<u64>,
    ingest_sampled_bytes: Cell<u64>,
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
        let (mut log, report) = PartitionLog::open(Rc::new(disk), log_config, now_ms())
            .await
            .map_err(|e| format!("{topic}/{index}: recovery failed: {e}"))?;
        let me = replication.broker_id;
        // Static mode: the first replica leads. Controller mode: nobody until the controller's
        // state arrives (`apply_state`); until then the partition may become the leader, so it
        // treats itself as one below (keeps its suffix and its stored high watermark).
        let leader = if replication.controller_mode {
            me
        } else {
            replicas.first().copied().unwrap_or(me)
        };
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
        let producers = driver::scan_producers(&log)
            .await
            .map_err(|e| format!("{topic}/{index}: cannot rebuild the producer state: {e}"))?;
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
            isr_via_controller: replication.controller_mode,
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
            producers: RefCell::new(producers),
            fetcher: RefCell::new(None),
            role_waiters: RefCell::new(Vec::new()),
            pending_state: RefCell::new(None),
            epochs_wanted: Cell::new(0),
            epochs_stored: Cell::new(0),
            epochs_writing: Cell::new(false),
            epochs_failed: RefCell::new(None),
            epochs_waiters: RefCell::new(Vec::new()),
            served_ends: RefCell::new(HashMap::new()),
            leader_heard_ms: Cell::new(0),
            corrupt_fetch_logged: Cell::new(None),
            hw_stored: Cell::new(stored_high_watermark),
            hw_stored_at_ms: Cell::new(0),
            hw_storing: Cell::new(false),
            this: RefCell::new(std::rc::Weak::new()),
            wake_flusher,
            closing: Cell::new(false),
            metrics: partition_metrics,
            readers: RefCell::new(Default::default()),
            ingest_bytes_per_s: Cell::new(0),
            ingest_sampled_bytes: Cell::new(0),
            flush_latency,
            retention_check_ms,
            flusher: RefCell::new(None),
        });
        *partition.this.borrow_mut() = Rc::downgrade(&partition);
        let task = glommio::spawn_local_into(Rc::clone(&partition).run_flusher(wake, queue), queue)
            .map_err(|e| format!("cannot start flusher: {e}"))?;
        *partition.flusher.borrow_mut() = Some(task);
        if partition.replication.controller_mode {
            if partition.replicas.len() > 1 {
                // Idle until the controller makes this replica a follower.
                let fetcher = glommio::spawn_local_into(
                    Rc::clone(&partition).run_fetcher(fetcher_wake),
                    partition.replication.queue,
                )
                .map_err(|e| format!("cannot start fetcher: {e}"))?;
                *partition.fetcher.borrow_mut() = Some(fetcher);
            }
            tracing::info!(
                topic,
                partition = index,
                "opened; waiting for the controller's leader and ISR"
            );
        } else if leader == me {
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

    /// Whether this replica leads, and the leader epoch it is at (the one it leads or follows).
    pub fn read_role(&self) -> (bool, u32) {
        let replica = self.replica.borrow();
        (replica.is_leader(), replica.leader_epoch().0)
    }

    /// Follower: how long since a replica fetch from the leader last succeeded (`u64::MAX`:
    /// never, since this replica opened).
    pub fn leader_silent_ms(&self) -> u64 {
        match self.leader_heard_ms.get() {
            0 => u64::MAX,
            heard => monotonic_ms().saturating_sub(heard),
        }
    }

    /// Whether `offset` lies in this replica's log, `[log start, log end]` (a read there is not
    /// out of range).
    pub fn holds_offset(&self, offset: Offset) -> bool {
        self.log
            .get()
            .is_some_and(|log| log.log_start_offset() <= offset && offset <= log.end_offset())
    }

    /// Folds the bytes appended since the last call into the ingest rate.
    pub fn sample_ingest(&self, elapsed_s: f64) {
        let total = self.metrics.produced_bytes.get();
        let appended = total.saturating_sub(self.ingest_sampled_bytes.replace(total));
        if elapsed_s > 0.0 {
            self.ingest_bytes_per_s
                .set((appended as f64 / elapsed_s) as u64);
        }
    }

    pub fn ingest_bytes_per_s(&self) -> u64 {
        self.ingest_bytes_per_s.get()
    }

    /// Leader: what the read-replica selector needs of each follower.
    ///
    /// A follower at our end has its fetch parked here, and its time since it last caught
    /// up grows while it waits: up to one `fetch_wait_ms` of that is not lag. Beyond it, the
    /// follower stopped fetching (dead, stopped, cut off) and its lag grows from there.
    pub fn follower_view(&self) -> FollowerLagView {
        let replica = self.replica.borrow();
        let isr = replica.isr();
        let parked_ms_max = self.replication.fetch_wait_ms;
        FollowerLagView {
            high_watermark: self.high_watermark.get().0,
            followers: replica
                .follower_lag()
                .into_iter()
                .map(|(id, records, ms)| {
                    let ms = if records == 0 {
                        ms.saturating_sub(parked_ms_max)
                    } else {
                        ms
                    };
                    (id, records, ms, isr.contains(&id))
                })
                .collect(),
        }
    }

    async fn shared(&self) -> Option<RwLockReadGuard<'_, ()>> {
        match self.maintenance.try_read() {
            Ok(guard) => Some(guard),
            Err(_) => self.maintenance.read().await.ok(),
        }
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
        let bounds = driver::check_produce(payload).map_err(produce_failure)?;
        let Some(_guard) = self.shared().await else {
            return Err(PartitionError::new(
                ErrorCode::PartitionUnavailable,
                "partition closed",
            ));
        };
        // From here to the append nothing awaits: the replica's decision holds.
        let waiter = WaiterId(self.next_waiter.get());
        self.next_waiter.set(waiter.0 + 1);
        let appended = driver::produce(
            &mut outputs::Host(self),
            payload,
            bounds,
            waiter,
            ack_level(acks),
            monotonic_ms().saturating_add(timeout_ms),
            now_ms(),
        );
        let appended = match appended {
            Ok(appended) => appended,
            Err(failure) => {
                if matches!(failure, ProduceFailure::Backpressure { .. }) {
                    // Wake the flusher so the backlog drains.
                    let _ = self.wake_flusher.try_send(());
                }
                return Err(produce_failure(failure));
            }
        };
        if appended.duplicate {
            self.metrics.produce_duplicates.inc();
        } else {
            self.metrics.end_offset.set(appended.end.0 as i64);
            self.metrics.produced_bytes.inc_by(payload.len() as u64);
            let _ = self.wake_flusher.try_send(());
            for parked in self.append_waiters.borrow_mut().drain(..) {
                let _ = parked.send(());
            }
        }
        let (done, completion) = oneshot::channel();
        self.produce_waiters
            .borrow_mut()
            .insert(waiter.0, (Instant::now(), done));
        if let Err(message) = driver::produce_appended(&mut outputs::Host(self), appended) {
            return Err(PartitionError::new(ErrorCode::StorageError, message));
        }
        Ok(Admitted {
            base_offset: appended.base_offset,
            last_offset: appended.last_offset,
            leader_epoch: appended.leader_epoch,
            completion: Some(completion),
        })
    }

    fn advance_high_watermark(&self, to: Offset) {
        if to > self.high_watermark.get() {
            self.high_watermark.set(to);
            self.metrics.high_watermark.set(to.0 as i64);
            for waiter in self.data_waiters.borrow_mut().drain(..) {
                let _ = waiter.send(());
            }
            // Parked follower fetches carry the news (each parked with a lower one): a
            // follower serving consumers learns it now, not one long poll later.
            for parked in self.append_waiters.borrow_mut().drain(..) {
                let _ = parked.send(());
            }
        }
    }

    fn on_durable(&self, durable: Offset) {
        if let Err(error) = driver::flushed(&mut outputs::Host(self), durable) {
            tracing::error!(topic = %self.topic, partition = self.index, %error, "replica step failed");
        }
    }

    fn fail_waiters(&self, error: PartitionError) {
        for (_, (_, done)) in self.produce_waiters.borrow_mut().drain() {
            let _ = done.send(Err(error.clone()));
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
}
