//! A batching producer: records are gathered per partition into batches (up to `batch_bytes`,
//! or until `linger_ms` passed), one batch per partition is in flight at a time by default (so
//! retries never reorder a partition; see `max_in_flight_per_partition`), retriable errors are retried with exponential backoff and
//! jitter until `delivery_timeout_ms`, and `send` waits while `buffer_bytes_max` bytes are
//! unacknowledged (backpressure).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use rand::{Rng, SeedableRng};
use wharf_storage::batch::{BatchBuilder, BatchError, BATCH_BYTES_MAX};

use super::{decode, Client, ClientError};
use crate::protocol::{
    Acks, ApiKey, ErrorCode, FrameBuf, ProducePartition, ProduceRequest, ProduceResponse,
};
use wharf_replication::producers::SEQUENCE_MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Partitioner {
    /// Records with a key go to `crc32c(key) % partitions`. Records without one stick to one
    /// partition for a stint: until its batch is sent or `batch_bytes` went there, whichever
    /// comes first (full batches at any rate). The next stint goes to the partition with the
    /// fewest unacknowledged bytes, so a slow partition is not handed more (Kafka's uniform
    /// and adaptive sticky partitioner, KIP-794).
    KeyHash,
    /// Every record to the next partition in turn (batches still fill per partition).
    RoundRobin,
}

#[derive(Clone, Debug)]
pub struct ProducerConfig {
    pub acks: Acks,
    pub linger_ms: u64,
    pub batch_bytes: usize,
    pub buffer_bytes_max: usize,
    /// How long the broker may take to answer one produce request.
    pub request_timeout_ms: u64,
    /// How long a record may take from `send` to its acknowledgement, retries included.
    pub delivery_timeout_ms: u64,
    pub retry_backoff_ms: u64,
    pub retry_backoff_max_ms: u64,
    /// The backoff limit while the partition has no reachable leader (`not_leader`, a lost
    /// connection): failover takes well under a second, and the next try should find the new
    /// leader soon after, not a whole `retry_backoff_max_ms` later.
    pub leader_retry_backoff_max_ms: u64,
    pub partitioner: Partitioner,
    /// Produce requests of one partition in flight at once. 1 keeps a partition's records in
    /// order whatever fails; more raises throughput (more data per fsync on the broker). An
    /// idempotent producer keeps order with up to `IDEMPOTENT_IN_FLIGHT_MAX` (a batch sent
    /// behind one that must be retried is refused as out of sequence and retried after it);
    /// without idempotence a retried batch can land after batches sent behind it.
    pub max_in_flight_per_partition: usize,
    /// Idempotence (on by default): the producer gets a producer id (`InitProducerId`) and
    /// stamps each batch with its per-partition sequence, so a batch retried after a lost
    /// answer or a failover is written once. Off: a retry can write a batch twice.
    pub idempotent: bool,
}

/// Requests in flight per partition an idempotent producer keeps in order: as many batches as
/// a partition remembers per producer (`wharf_replication::producers::PRODUCER_BATCHES_KEPT`).
pub const IDEMPOTENT_IN_FLIGHT_MAX: usize = 5;

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            acks: Acks::All,
            linger_ms: 5,
            batch_bytes: 256 * 1024,
            buffer_bytes_max: 64 * 1024 * 1024,
            request_timeout_ms: 30_000,
            delivery_timeout_ms: 120_000,
            retry_backoff_ms: 100,
            retry_backoff_max_ms: 1_000,
            leader_retry_backoff_max_ms: 200,
            partitioner: Partitioner::KeyHash,
            max_in_flight_per_partition: 1,
            idempotent: true,
        }
    }
}

/// Where an acknowledged record landed. `offset` is `None` with acks=none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordMetadata {
    pub partition: u32,
    pub offset: Option<u64>,
}

/// The shared outcome of one batch: its base offset (None with acks=none) or an error.
#[derive(Default)]
struct BatchSlot {
    result: RefCell<Option<Result<Option<u64>, ClientError>>>,
    wakers: RefCell<Vec<Waker>>,
}

impl BatchSlot {
    fn complete(&self, result: Result<Option<u64>, ClientError>) {
        *self.result.borrow_mut() = Some(result);
        for waker in self.wakers.borrow_mut().drain(..) {
            waker.wake();
        }
    }
}

/// Resolves when the record is acknowledged (or failed for good).
pub struct Delivery {
    slot: Rc<BatchSlot>,
    partition: u32,
    index: u32,
}

impl Future for Delivery {
    type Output = Result<RecordMetadata, ClientError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &*self.slot.result.borrow() {
            Some(Ok(base)) => Poll::Ready(Ok(RecordMetadata {
                partition: self.partition,
                offset: base.map(|b| b + u64::from(self.index)),
            })),
            Some(Err(error)) => Poll::Ready(Err(error.clone())),
            None => {
                self.slot.wakers.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

struct OpenBatch {
    builder: BatchBuilder,
    slot: Rc<BatchSlot>,
    created: Instant,
    buffer_bytes: usize,
}

struct SealedBatch {
    bytes: Rc<FrameBuf>,
    slot: Rc<BatchSlot>,
    created: Instant,
    buffer_bytes: usize,
    /// Idempotent: the producer epoch it was last stamped with.
    epoch: u16,
    /// Idempotent: times it was sent again after a sequence refusal (`resequence`).
    sequence_resends: u32,
}

struct PartitionQueue {
    open: Option<OpenBatch>,
    sealed: VecDeque<SealedBatch>,
    /// Record bytes queued here and not yet acknowledged or failed (the sticky partitioner's
    /// measure of how far behind this partition is).
    unacked_bytes: usize,
    wake: LocalSender<()>,
}

/// The sticky partitioner's current stint on one topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stint {
    partition: u32,
    /// Record bytes sent to `partition` in this stint.
    bytes: usize,
}

impl Stint {
    /// Where a keyless record of `record_bytes` goes, and the stint after it. A stint ends once
    /// it has carried `stint_bytes_max`, or once its partition's batch went out (`batch_open`
    /// false after the stint carried something). The next partition is the one with the least
    /// `backlog`; ties go to the first after the current one, so idle partitions take turns.
    fn place(
        self,
        partitions: u32,
        record_bytes: usize,
        stint_bytes_max: usize,
        batch_open: bool,
        backlog: impl Fn(u32) -> usize,
    ) -> Stint {
        assert!(partitions > 0, "a topic has at least one partition");
        let current = self.partition % partitions;
        let ended = self.bytes >= stint_bytes_max || (self.bytes > 0 && !batch_open);
        if !ended {
            return Stint {
                partition: current,
                bytes: self.bytes + record_bytes,
            };
        }
        let next = (1..=partitions)
            .map(|step| (current + step) % partitions)
            .min_by_key(|&p| backlog(p))
            .expect("at least one partition");
        Stint {
            partition: next,
            bytes: record_bytes,
        }
    }
}

struct Inner {
    client: Rc<Client>,
    config: ProducerConfig,
    /// Per topic, per partition (looked up by `&str`: no allocation per record).
    queues: RefCell<HashMap<String, HashMap<u32, PartitionQueue>>>,
    buffered_bytes: Cell<usize>,
    /// Batches created and not yet completed.
    batches_pending: Cell<usize>,
    waiters: RefCell<Vec<oneshot::Sender<()>>>,
    round_robin: Cell<u32>,
    /// Per topic: the stint keyless records currently go to.
    sticky: RefCell<HashMap<String, Stint>>,
    /// Idempotence: the producer id, once `InitProducerId` gave one; the semaphore lets one
    /// partition task ask while the others wait for its answer.
    producer_id: Cell<Option<u64>>,
    producer_id_asking: glommio::sync::Semaphore,
    closed: Cell<bool>,
}

impl Inner {
    /// Wakes everyone waiting for buffer space or for the producer to drain.
    fn notify(&self) {
        for waiter in self.waiters.borrow_mut().drain(..) {
            let _ = waiter.send(());
        }
    }

    async fn changed(&self, until: Instant) -> bool {
        let (wake, woken) = oneshot::channel();
        self.waiters.borrow_mut().push(wake);
        let remaining = until.saturating_duration_since(Instant::now());
        glommio::timer::timeout(remaining, async {
            let _ = woken.await;
            Ok(())
        })
        .await
        .is_ok()
    }
}

pub struct Producer {
    inner: Rc<Inner>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Producer {
    pub fn new(client: Rc<Client>, config: ProducerConfig) -> Producer {
        Producer {
            inner: Rc::new(Inner {
                client,
                config,
                queues: RefCell::new(HashMap::new()),
                buffered_bytes: Cell::new(0),
                batches_pending: Cell::new(0),
                waiters: RefCell::new(Vec::new()),
                round_robin: Cell::new(0),
                sticky: RefCell::new(HashMap::new()),
                producer_id: Cell::new(None),
                producer_id_asking: glommio::sync::Semaphore::new(1),
                closed: Cell::new(false),
            }),
        }
    }

    pub fn config(&self) -> &ProducerConfig {
        &self.inner.config
    }

    /// Queues a record; waits while the buffer is full. The returned [`Delivery`] resolves
    /// with its offset once acknowledged at the configured acks.
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
    ) -> Result<Delivery, ClientError> {
        self.send_to(topic, None, key, value).await
    }

    /// Like [`Producer::send`], to a chosen partition (or the partitioner's if `None`).
    pub async fn send_to(
        &self,
        topic: &str,
        partition: Option<u32>,
        key: Option<&[u8]>,
        value: &[u8],
    ) -> Result<Delivery, ClientError> {
        let inner = &self.inner;
        if inner.closed.get() {
            return Err(ClientError::Invalid("the producer is closed".to_string()));
        }
        let record_bytes = value.len() + key.map_or(0, <[u8]>::len) + 64;
        if record_bytes > BATCH_BYTES_MAX / 2 {
            return Err(ClientError::Invalid(format!(
                "a record of {record_bytes} bytes exceeds the limit of {}",
                BATCH_BYTES_MAX / 2
            )));
        }
        // Read the clock only when the buffer is full: this runs once per record.
        let mut deadline = None;
        while inner.buffered_bytes.get() > 0
            && inner.buffered_bytes.get() + record_bytes > inner.config.buffer_bytes_max
        {
            let until = *deadline.get_or_insert_with(|| {
                Instant::now() + Duration::from_millis(inner.config.delivery_timeout_ms)
            });
            if !inner.changed(until).await {
                return Err(ClientError::Timeout {
                    what: "waiting for producer buffer space".to_string(),
                    timeout_ms: inner.config.delivery_timeout_ms,
                });
            }
        }
        let partitions = inner.client.partition_count(topic).await?;
        if let Acks::Replicas(n) = inner.config.acks {
            let replicas = inner.client.replication_factor(topic).await?;
            if usize::from(n) > replicas {
                // No retry can help: the topic has fewer replicas than the acks ask for.
                return Err(ClientError::server(
                    ErrorCode::NotEnoughReplicas,
                    format!("acks={n} but topic {topic:?} has {replicas} replicas"),
                ));
            }
        }
        let partition = match partition {
            Some(p) if p < partitions => p,
            Some(p) => {
                return Err(ClientError::server(
                    ErrorCode::UnknownPartition,
                    format!("topic {topic:?} has {partitions} partitions, not {}", p + 1),
                ))
            }
            None => match (inner.config.partitioner, key) {
                (Partitioner::KeyHash, Some(key)) => crc32c::crc32c(key) % partitions,
                (Partitioner::KeyHash, None) => {
                    let mut sticky = inner.sticky.borrow_mut();
                    if !sticky.contains_key(topic) {
                        let start = Stint {
                            partition: inner.round_robin.get() % partitions,
                            bytes: 0,
                        };
                        sticky.insert(topic.to_string(), start);
                    }
                    let stint = sticky.get_mut(topic).expect("inserted above");
                    let queues = inner.queues.borrow();
                    let topic_queues = queues.get(topic);
                    let queue = |p: u32| topic_queues.and_then(|t| t.get(&p));
                    let batch_open =
                        queue(stint.partition % partitions).is_some_and(|q| q.open.is_some());
                    *stint = stint.place(
                        partitions,
                        record_bytes,
                        inner.config.batch_bytes,
                        batch_open,
                        |p| queue(p).map_or(0, |q| q.unacked_bytes),
                    );
                    stint.partition
                }
                (Partitioner::RoundRobin, _) => {
                    let next = inner.round_robin.get();
                    inner.round_robin.set(next.wrapping_add(1));
                    next % partitions
                }
            },
        };
        inner
            .buffered_bytes
            .set(inner.buffered_bytes.get() + record_bytes);
        let known = inner
            .queues
            .borrow()
            .get(topic)
            .is_some_and(|t| t.contains_key(&partition));
        if !known {
            let (wake, woken) = local_channel::new_bounded(1);
            inner
                .queues
                .borrow_mut()
                .entry(topic.to_string())
                .or_default()
                .insert(
                    partition,
                    PartitionQueue {
                        open: None,
                        sealed: VecDeque::new(),
                        unacked_bytes: 0,
                        wake,
                    },
                );
            // glommio may run a new task at once: spawn with no borrow held.
            glommio::spawn_local(run_partition(
                Rc::clone(inner),
                topic.to_string(),
                partition,
                woken,
            ))
            .detach();
        }
        let mut queues = inner.queues.borrow_mut();
        let queue = queues
            .get_mut(topic)
            .and_then(|t| t.get_mut(&partition))
            .expect("inserted above");
        if queue.open.as_ref().is_some_and(|open| {
            open.builder.estimated_batch_bytes() + record_bytes > inner.config.batch_bytes
        }) {
            seal(queue);
        }
        let timestamp_ms = now_ms();
        for _attempt in 0..2 {
            let open = queue.open.get_or_insert_with(|| {
                inner.batches_pending.set(inner.batches_pending.get() + 1);
                OpenBatch {
                    builder: BatchBuilder::with_capacity(
                        Default::default(),
                        inner.config.batch_bytes,
                    ),
                    slot: Rc::new(BatchSlot::default()),
                    created: Instant::now(),
                    buffer_bytes: 0,
                }
            });
            match open.builder.push(timestamp_ms, key, value, &[]) {
                Ok(()) => {
                    open.buffer_bytes += record_bytes;
                    let delivery = Delivery {
                        slot: Rc::clone(&open.slot),
                        partition,
                        index: (open.builder.record_count() - 1) as u32,
                    };
                    if open.builder.estimated_batch_bytes() >= inner.config.batch_bytes {
                        seal(queue);
                    }
                    queue.unacked_bytes += record_bytes;
                    let _ = queue.wake.try_send(());
                    return Ok(delivery);
                }
                Err(BatchError::TooLarge { .. }) if !open.builder.is_empty() => seal(queue),
                Err(error) => {
                    inner
                        .buffered_bytes
                        .set(inner.buffered_bytes.get() - record_bytes);
                    return Err(ClientError::Invalid(error.to_string()));
                }
            }
        }
        inner
            .buffered_bytes
            .set(inner.buffered_bytes.get() - record_bytes);
        Err(ClientError::Invalid(
            "record does not fit an empty batch".to_string(),
        ))
    }

    /// Sends everything buffered now (ignoring linger) and waits until every batch sent so
    /// far is acknowledged or failed.
    pub async fn flush(&self) {
        let inner = &self.inner;
        for queue in inner
            .queues
            .borrow_mut()
            .values_mut()
            .flat_map(|t| t.values_mut())
        {
            if queue.open.is_some() {
                seal(queue);
                let _ = queue.wake.try_send(());
            }
        }
        let far = Instant::now() + Duration::from_millis(inner.config.delivery_timeout_ms * 2);
        while inner.batches_pending.get() > 0 {
            if !inner.changed(far).await {
                break;
            }
        }
    }

    /// Flushes, then stops the partition tasks.
    pub async fn close(&self) {
        self.flush().await;
        self.inner.closed.set(true);
        for queue in self.inner.queues.borrow().values().flat_map(|t| t.values()) {
            let _ = queue.wake.try_send(());
        }
    }

    /// Bytes buffered and not yet acknowledged.
    pub fn buffered_bytes(&self) -> usize {
        self.inner.buffered_bytes.get()
    }
}

fn seal(queue: &mut PartitionQueue) {
    let Some(open) = queue.open.take() else {
        return;
    };
    match open.builder.finish() {
        Ok(bytes) => queue.sealed.push_back(SealedBatch {
            bytes: Rc::new(bytes),
            slot: open.slot,
            created: open.created,
            buffer_bytes: open.buffer_bytes,
            epoch: 0,
            sequence_resends: 0,
        }),
        Err(error) => {
            // Completed by the partition task's accounting below.
            queue.sealed.push_back(SealedBatch {
                bytes: Rc::new(FrameBuf::new()),
                slot: open.slot,
                created: open.created,
                buffer_bytes: open.buffer_bytes,
                epoch: 0,
                sequence_resends: 0,
            });
            tracing::error!(%error, "cannot encode a batch");
        }
    }
}

/// A batch's send (with its retries) in flight.
type Sending = glommio::Task<Result<Option<u64>, ClientError>>;

/// An idempotent producer's sequence on one partition.
#[derive(Default)]
struct Sequence {
    /// The producer epoch this partition's batches carry: raised (sequences restart at 0)
    /// after a batch failed for good, or when the partition refuses a sequence that no batch
    /// of ours can fill any more (`resequence`): a gap the partition would refuse for ever.
    epoch: u16,
    next: u32,
    /// A batch failed for good: the next stamp starts a new epoch.
    restart: bool,
}

impl Sequence {
    /// Starts a new epoch at sequence 0 (Kafka's epoch bump, KIP-360).
    fn bump(&mut self) -> Result<(), ClientError> {
        self.epoch = self.epoch.checked_add(1).ok_or_else(|| {
            ClientError::Invalid("the producer's epochs on this partition are used up".into())
        })?;
        self.next = 0;
        self.restart = false;
        Ok(())
    }
}

/// Sends of one batch after sequence refusals (`resequence`) before it fails with the refusal:
/// one as it was, one at a new epoch, and a spare for a refusal racing a failover.
const SEQUENCE_RESENDS_MAX: u32 = 3;

/// Whether `error` is the partition refusing the batch's sequence or producer epoch.
fn is_sequence_refusal(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::Server {
            code: ErrorCode::OutOfOrderSequence | ErrorCode::InvalidProducerEpoch,
            ..
        }
    )
}

impl Inner {
    /// The producer id, asking a broker the first time.
    async fn producer_id(&self) -> Result<u64, ClientError> {
        if let Some(id) = self.producer_id.get() {
            return Ok(id);
        }
        let _permit = self
            .producer_id_asking
            .acquire_permit(1)
            .await
            .map_err(|e| ClientError::Invalid(format!("producer closed: {e}")))?;
        if let Some(id) = self.producer_id.get() {
            return Ok(id);
        }
        let (id, _epoch) = self.client.init_producer_id(None).await?;
        self.producer_id.set(Some(id));
        Ok(id)
    }

    /// Stamps a batch with the producer id, the partition's epoch and its next sequence: before
    /// its first send, or again when the partition moved to a new epoch (`resequence`; the
    /// bytes are copied then, as earlier attempts still hold them).
    async fn stamp(
        &self,
        batch: &mut SealedBatch,
        sequence: &mut Sequence,
    ) -> Result<(), ClientError> {
        let producer_id = self.producer_id().await?;
        if sequence.restart {
            sequence.bump()?;
        }
        if Rc::get_mut(&mut batch.bytes).is_none() {
            let mut copy = FrameBuf::with_capacity(batch.bytes.len());
            copy.extend_from_slice(&batch.bytes);
            batch.bytes = Rc::new(copy);
        }
        batch.epoch = sequence.epoch;
        let bytes = Rc::get_mut(&mut batch.bytes)
            .ok_or_else(|| ClientError::Invalid("a batch copy is shared".into()))?;
        let records = wharf_storage::batch::decode_header(bytes)
            .map_err(|e| ClientError::Invalid(e.to_string()))?
            .record_count;
        wharf_storage::batch::stamp_producer(
            bytes,
            wharf_storage::batch::ProducerStamp {
                producer_id: wharf_storage::ProducerId(producer_id),
                producer_epoch: sequence.epoch,
                base_sequence: sequence.next,
            },
        );
        let span = u64::from(sequence.next) + u64::from(records);
        sequence.next = (span % (u64::from(SEQUENCE_MAX) + 1)) as u32;
        Ok(())
    }
}

/// Sends one partition's batches in order: up to `max_in_flight_per_partition` requests at
/// once (at most `IDEMPOTENT_IN_FLIGHT_MAX` when idempotent), completed in the order they
/// were sent.
async fn run_partition(inner: Rc<Inner>, topic: String, partition: u32, woken: LocalReceiver<()>) {
    let linger = Duration::from_millis(inner.config.linger_ms);
    let mut window = inner.config.max_in_flight_per_partition.max(1);
    if inner.config.idempotent {
        window = window.min(IDEMPOTENT_IN_FLIGHT_MAX);
    }
    let mut sequence = Sequence::default();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(partition);
    let mut in_flight: VecDeque<(SealedBatch, Sending)> = VecDeque::new();
    loop {
        // What to wait for when nothing can be sent now: `Some(None)` a wake-up, `Some(Some(d))`
        // a wake-up or the linger deadline, `None` (window full) only the oldest request.
        let mut wait = None;
        // While older batches still need a new stamp (the partition moved to a new epoch, or
        // a batch failed for good and the ones behind it will be refused), nothing new goes
        // out: it would land before them.
        let resequencing = inner.config.idempotent
            && !in_flight.is_empty()
            && (sequence.restart || in_flight.iter().any(|(b, _)| b.epoch != sequence.epoch));
        if in_flight.len() < window && !resequencing {
            let next = {
                let mut queues = inner.queues.borrow_mut();
                let Some(queue) = queues.get_mut(&topic).and_then(|t| t.get_mut(&partition)) else {
                    return;
                };
                if let Some(batch) = queue.sealed.pop_front() {
                    Ok(batch)
                } else if let Some(open) = &queue.open {
                    let age = open.created.elapsed();
                    if age >= linger {
                        seal(queue);
                        continue;
                    }
                    Err(Some(linger - age))
                } else if inner.closed.get() && in_flight.is_empty() {
                    return;
                } else {
                    Err(None)
                }
            };
            match next {
                Ok(mut batch) => {
                    seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    // The first attempt is queued here, in batch order; only waiting for its
                    // answer (and any retry) runs concurrently.
                    let first = if batch.bytes.is_empty() {
                        Err(ClientError::Invalid(
                            "the batch could not be encoded".to_string(),
                        ))
                    } else if inner.config.idempotent {
                        match inner.stamp(&mut batch, &mut sequence).await {
                            Ok(()) => start_produce(&inner, &topic, partition, &batch.bytes).await,
                            Err(error) => Err(error),
                        }
                    } else {
                        start_produce(&inner, &topic, partition, &batch.bytes).await
                    };
                    // Spawned with no borrow held (glommio may run it at once).
                    let task = glommio::spawn_local(send_with_retries(
                        Rc::clone(&inner),
                        topic.clone(),
                        partition,
                        Rc::clone(&batch.bytes),
                        batch.created,
                        seed,
                        first,
                    ));
                    in_flight.push_back((batch, task));
                    continue;
                }
                Err(deadline) => wait = Some(deadline),
            }
        }
        let woken_or_lingered = async {
            match wait {
                Some(Some(deadline)) => {
                    let _ = glommio::timer::timeout(deadline, async {
                        woken.recv().await;
                        Ok(())
                    })
                    .await;
                }
                Some(None) => {
                    woken.recv().await;
                }
                None => futures_lite::future::pending::<()>().await,
            }
            None
        };
        let completed = match in_flight.front_mut() {
            Some((_, front)) => {
                futures_lite::future::or(async { Some(front.await) }, woken_or_lingered).await
            }
            None => woken_or_lingered.await,
        };
        if let Some(result) = completed {
            let result = match result {
                Err(error) if inner.config.idempotent && is_sequence_refusal(&error) => {
                    match resequence(
                        &inner,
                        &topic,
                        partition,
                        &mut in_flight,
                        &mut sequence,
                        seed,
                        error,
                    )
                    .await
                    {
                        Ok(()) => continue,
                        Err(error) => Err(error),
                    }
                }
                result => result,
            };
            if result.is_err() && inner.config.idempotent {
                // Whether or not it was written, the partition may now miss a sequence: the
                // next batch starts a new epoch (older ones still in flight are then refused).
                sequence.restart = true;
            }
            if let Some((batch, _)) = in_flight.pop_front() {
                batch.slot.complete(result);
                inner
                    .buffered_bytes
                    .set(inner.buffered_bytes.get() - batch.buffer_bytes);
                if let Some(queue) = inner
                    .queues
                    .borrow_mut()
                    .get_mut(&topic)
                    .and_then(|t| t.get_mut(&partition))
                {
                    assert!(
                        queue.unacked_bytes >= batch.buffer_bytes,
                        "partition {partition} completes more bytes than it queued"
                    );
                    queue.unacked_bytes -= batch.buffer_bytes;
                }
                inner.batches_pending.set(inner.batches_pending.get() - 1);
                inner.notify();
            }
        }
    }
}

/// The oldest batch in flight was refused for its sequence or epoch; every batch before it is
/// done. Sends it again in its place (`Ok`), or gives its refusal back (`Err`) to fail it:
/// - stamped before the partition's current epoch: stamped again at that epoch and sent;
/// - out of order, first time: sent again as it was (it was answered while an earlier batch
///   was still being retried; that batch has landed since);
/// - otherwise the gap before it can never be filled (a batch failed for good, or a failover
///   elected a leader without batches it had acknowledged at a weaker ack level): a new epoch
///   starts at sequence 0 with this batch (KIP-360). A batch refused after an attempt of it
///   was written can then be written twice (at least once), as Kafka's producer can.
async fn resequence(
    inner: &Rc<Inner>,
    topic: &str,
    partition: u32,
    in_flight: &mut VecDeque<(SealedBatch, Sending)>,
    sequence: &mut Sequence,
    seed: u64,
    error: ClientError,
) -> Result<(), ClientError> {
    let Some((batch, task)) = in_flight.front_mut() else {
        return Err(error);
    };
    let deadline = batch.created + Duration::from_millis(inner.config.delivery_timeout_ms);
    if batch.sequence_resends >= SEQUENCE_RESENDS_MAX || Instant::now() >= deadline {
        return Err(error);
    }
    let out_of_order = matches!(
        error,
        ClientError::Server {
            code: ErrorCode::OutOfOrderSequence,
            ..
        }
    );
    let current = batch.epoch == sequence.epoch && !sequence.restart;
    if !(current && out_of_order && batch.sequence_resends == 0) {
        if current {
            sequence.bump()?;
        }
        inner.stamp(batch, sequence).await?;
        tracing::info!(
            topic,
            partition,
            epoch = sequence.epoch,
            %error,
            "the partition cannot take the batch's sequence; starting a new producer epoch"
        );
    }
    batch.sequence_resends += 1;
    let first = start_produce(inner, topic, partition, &batch.bytes).await;
    *task = glommio::spawn_local(send_with_retries(
        Rc::clone(inner),
        topic.to_string(),
        partition,
        Rc::clone(&batch.bytes),
        batch.created,
        seed.wrapping_add(u64::from(batch.sequence_resends)),
        first,
    ));
    Ok(())
}

/// While a produce is outstanding for longer than this, the producer looks (once per period)
/// whether the partition's leader moved: a request to a deposed leader that stopped answering (a
/// stopped process, a network partition) is abandoned and retried at the new leader instead of
/// waiting out the request timeout. (A deposed leader acknowledges nothing once its controller
/// lease ended, so the abandoned attempt can at most leave a duplicate, as any retry can.)
pub const LEADER_CHECK_MS: u64 = 500;

/// Resolves once the metadata names another leader (or epoch) than `sent_to`.
async fn leader_moved(
    client: &Client,
    topic: &str,
    partition: u32,
    sent_to: Option<(u32, u32)>,
) -> ClientError {
    loop {
        glommio::timer::sleep(Duration::from_millis(LEADER_CHECK_MS)).await;
        if client.refresh_metadata().await.is_err() {
            continue;
        }
        let now = client.cached_leader(topic, partition);
        if sent_to.is_some() && now.is_some() && now != sent_to {
            return ClientError::server(
                ErrorCode::NotLeader,
                format!(
                    "{topic}/{partition}: the leader moved ({sent_to:?} -> {now:?}) while the \
                     request was outstanding"
                ),
            );
        }
    }
}

async fn send_with_retries(
    inner: Rc<Inner>,
    topic: String,
    partition: u32,
    bytes: Rc<FrameBuf>,
    created: Instant,
    seed: u64,
    first: Result<Pending, ClientError>,
) -> Result<Option<u64>, ClientError> {
    let mut first = Some(first);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let config = &inner.config;
    let delivery_deadline = created + Duration::from_millis(config.delivery_timeout_ms);
    let mut attempt = 0u32;
    loop {
        let attempt_started = match first.take() {
            Some(started) => started,
            None => start_produce(&inner, &topic, partition, &bytes).await,
        };
        let sent_to = inner.client.cached_leader(&topic, partition);
        let result = match attempt_started {
            Ok(pending) => {
                futures_lite::future::or(pending, async {
                    Err(leader_moved(&inner.client, &topic, partition, sent_to).await)
                })
                .await
            }
            Err(error) => Err(error),
        };
        let error = match result {
            Ok(offset) => return Ok(offset),
            // Idempotent: the partition loop decides, in batch order (`resequence`).
            Err(error) if config.idempotent && is_sequence_refusal(&error) => return Err(error),
            Err(error) if error.is_retriable() => error,
            Err(error) => return Err(error),
        };
        let leader_lost = matches!(
            error,
            ClientError::Connect { .. }
                | ClientError::Closed { .. }
                | ClientError::Server {
                    code: ErrorCode::NotLeader | ErrorCode::PartitionUnavailable,
                    ..
                }
        );
        // The refusal named the new leader (or the metadata moved while it was outstanding):
        // retry there at once, without asking for metadata. Only a newer epoch is learned, so
        // this cannot repeat without the cluster moving on.
        let now_leader = inner.client.cached_leader(&topic, partition);
        if leader_lost && sent_to.is_some() && now_leader.is_some() && now_leader != sent_to {
            if Instant::now() >= delivery_deadline {
                return Err(error);
            }
            tracing::debug!(topic, partition, ?sent_to, ?now_leader, %error, "retrying at the new leader");
            attempt += 1;
            continue;
        }
        let backoff_max_ms = if leader_lost {
            config.leader_retry_backoff_max_ms
        } else {
            config.retry_backoff_max_ms
        };
        let backoff_ms = config
            .retry_backoff_ms
            .saturating_mul(1u64 << attempt.min(16))
            .min(backoff_max_ms);
        // Jitter between half and all of the backoff, so clients do not retry in step.
        let backoff = Duration::from_millis(rng.random_range(backoff_ms / 2..=backoff_ms.max(1)));
        if Instant::now() + backoff >= delivery_deadline {
            return Err(error);
        }
        tracing::debug!(topic, partition, attempt, %error, "retrying a batch");
        glommio::timer::sleep(backoff).await;
        if leader_lost {
            let _ = inner.client.refresh_metadata().await;
        }
        attempt += 1;
    }
}

type Pending =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<u64>, ClientError>>>>;

/// Sends one attempt of a batch: the request is queued on the connection before this returns
/// (so attempts started in order go out in order); the returned future is its outcome.
async fn start_produce(
    inner: &Inner,
    topic: &str,
    partition: u32,
    bytes: &Rc<FrameBuf>,
) -> Result<Pending, ClientError> {
    let config = &inner.config;
    let connection = inner.client.partition_connection(topic, partition).await?;
    let request = ProduceRequest {
        acks: config.acks,
        timeout_ms: u32::try_from(config.request_timeout_ms).unwrap_or(u32::MAX),
        topic: topic.to_string(),
        partitions: vec![ProducePartition {
            partition,
            batch_bytes: bytes.len() as u32,
        }],
    };
    if config.acks == Acks::None {
        connection.send_only(ApiKey::Produce, &request, vec![Rc::clone(bytes)])?;
        return Ok(Box::pin(futures_lite::future::ready(Ok(None))));
    }
    // The broker answers by its timeout; allow for the network on top.
    let response = connection.start_call(
        ApiKey::Produce,
        &request,
        vec![Rc::clone(bytes)],
        config.request_timeout_ms + 5_000,
    )?;
    let client = Rc::clone(&inner.client);
    let topic = topic.to_string();
    Ok(Box::pin(async move {
        let frame = response.await?;
        let response: ProduceResponse = decode(&frame)?;
        let Some(p) = response
            .partitions
            .into_iter()
            .find(|p| p.partition == partition)
        else {
            return Err(ClientError::Protocol(
                "produce response without our partition".to_string(),
            ));
        };
        match ErrorCode::from_u16(p.error) {
            ErrorCode::None => Ok(Some(p.base_offset)),
            code => {
                if let (ErrorCode::NotLeader, Some(leader)) = (code, p.current_leader) {
                    // The retry goes straight to the leader the refusal names.
                    client.learn_leader(&topic, partition, leader, p.leader_epoch);
                }
                Err(ClientError::server(code, p.message))
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::Stint;

    const KIB: usize = 1024;

    fn st(partition: u32, bytes: usize) -> Stint {
        Stint { partition, bytes }
    }

    #[test]
    fn a_stint_stays_while_its_batch_is_open_and_under_the_limit() {
        let stint = st(1, 10 * KIB);
        let next = stint.place(3, KIB, 64 * KIB, true, |_| 0);
        assert_eq!(next, st(1, 11 * KIB));
    }

    #[test]
    fn a_stint_ends_when_its_batch_went_out() {
        let stint = st(1, 10 * KIB);
        assert_eq!(stint.place(3, KIB, 64 * KIB, false, |_| 0), st(2, KIB));
        // A fresh stint has no batch yet: it does not end before carrying anything.
        let fresh = st(1, 0);
        assert_eq!(fresh.place(3, KIB, 64 * KIB, false, |_| 0).partition, 1);
    }

    #[test]
    fn a_stint_ends_after_its_byte_limit_even_with_the_batch_still_open() {
        // A partition whose requests are all in flight keeps its batch open; it must not take
        // every record meanwhile.
        let stint = st(0, 64 * KIB);
        assert_eq!(stint.place(3, KIB, 64 * KIB, true, |_| 0), st(1, KIB));
    }

    #[test]
    fn the_next_stint_goes_to_the_least_backlogged_partition_ties_in_turn() {
        let stint = st(0, 64 * KIB);
        let backlog = [900, 500, 200, 200];
        let next = stint.place(4, KIB, 64 * KIB, true, |p| backlog[p as usize]);
        assert_eq!(
            next.partition, 2,
            "least backlog, first after the current among ties"
        );
        let idle = stint.place(4, KIB, 64 * KIB, true, |_| 0);
        assert_eq!(idle.partition, 1, "all idle: the next in turn");
        // The current partition may be chosen again when it is the least behind.
        let own = stint.place(4, KIB, 64 * KIB, true, |p| if p == 0 { 0 } else { 9 });
        assert_eq!(own.partition, 0);
        // Fewer partitions than the stint remembers (the topic's metadata changed).
        let shrunk = st(7, 0).place(3, KIB, 64 * KIB, true, |_| 0);
        assert_eq!(shrunk.partition, 1);
    }

    /// Partition 0 acknowledges a quarter as fast as the others and, its requests all being in
    /// flight, keeps its batch open. Without the byte limit and the backlog choice (the old
    /// rule: move on only once the batch went out) it drew nearly every record; now it draws
    /// the least, and the slower it is the less it gets.
    #[test]
    fn a_slow_partition_is_not_handed_more_records() {
        let drain_per_step = [KIB / 4, KIB, KIB];
        let mut backlog = [0usize; 3];
        let mut placed = [0usize; 3];
        let mut open_records = [0usize; 3];
        let mut stint = st(0, 0);
        for _step in 0..100_000 {
            let p = stint.partition as usize;
            // Fast partitions send their batch after 2 records (linger); the slow one never
            // does on its own.
            let batch_open = p == 0 || open_records[p] < 2;
            let b = backlog;
            stint = stint.place(3, KIB, 64 * KIB, batch_open, |q| b[q as usize]);
            let p = stint.partition as usize;
            open_records = if stint.bytes == KIB {
                [0; 3]
            } else {
                open_records
            };
            open_records[p] += 1;
            placed[p] += 1;
            backlog[p] += KIB;
            for (q, drain) in drain_per_step.iter().enumerate() {
                backlog[q] = backlog[q].saturating_sub(*drain);
            }
        }
        println!("records per partition: {placed:?}, backlog at the end {backlog:?}");
        assert!(placed[0] < placed[1] && placed[0] < placed[2], "{placed:?}");
        assert!(
            backlog[0] <= 2 * 64 * KIB,
            "the slow partition's backlog stays bounded: {backlog:?}"
        );
    }
}
