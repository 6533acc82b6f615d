//! One shard: its partitions, listeners, the channel mesh to the other shards, and the request
//! handlers. Requests for partitions owned by another shard are forwarded over the mesh; the
//! Wharf client avoids that hop by connecting to the owner's direct port (metadata names it).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use futures_util::future::{join_all, select_all, LocalBoxFuture};
use futures_util::FutureExt;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::net::TcpListener;
use glommio::sync::{Gate, Semaphore};
use glommio::{Latency, Shares, TaskQueueHandle};
use wharf_storage::{Epoch, Offset};

use super::connection::{
    self, ConnectionContext, ListenerKind, OutPayload, Outgoing, PeerAuthState, Pending,
    RequestBudget,
};
use super::metrics::{QueueLabels, ShardMetrics};
use super::partition::{FetchData, Partition, PartitionError, ReplicationSettings};
use super::Shared;
use crate::config::parse_host_port;
use crate::metadata::{self, BrokerMetadata, PartitionMeta, TopicMeta};
use crate::protocol::*;
use wharf_replication::Ack;

/// Upper bounds on list sizes in one request.
const PARTITIONS_PER_REQUEST_MAX: usize = 10_000;
const HEARTBEAT_MS: u64 = 250;
/// Environment variable (tests only): shard 0 panics this many milliseconds after start.
pub const FAILPOINT_SHARD_PANIC_MS: &str = "WHARF_FAILPOINT_SHARD_PANIC_MS";
/// How often replicas get a tick: the resolution of ack deadlines and ISR lag.
const REPLICA_TICK_MS: u64 = 20;

/// A request from another shard.
pub enum ShardRequest {
    Produce {
        topic: String,
        partition: u32,
        acks: Acks,
        timeout_ms: u64,
        batches: FrameBuf,
    },
    Fetch {
        topic: String,
        partition: u32,
        offset: u64,
        max_bytes: usize,
    },
    WaitForData {
        topic: String,
        partition: u32,
        offset: u64,
        deadline: Instant,
    },
    ListOffset {
        topic: String,
        partition: u32,
        spec: OffsetSpec,
    },
    Describe {
        topic: String,
        partition: u32,
    },
    CreateTopic(CreateTopicRequest),
    DeleteTopic(String),
    ApplyTopic(ApplyTopicRequest),
    OpenPartitions {
        topic: String,
        meta: TopicMeta,
        partitions: Vec<u32>,
    },
    ClosePartitions {
        topic: String,
    },
    Metadata(Arc<BrokerMetadata>),
}

pub struct RemoteAdmitted {
    pub base_offset: u64,
    pub last_offset: u64,
    pub leader_epoch: u32,
    pub completion: Option<oneshot::Receiver<Result<Ack, PartitionError>>>,
}

pub enum ShardReply {
    Admitted(Result<RemoteAdmitted, PartitionError>),
    Fetched(Result<(u64, u64, FrameBuf), PartitionError>),
    Woken,
    Offset(Result<u64, PartitionError>),
    Described(Result<PartitionDescription, PartitionError>),
    Topic(TopicResult),
    Done(Result<(), String>),
}

pub struct Envelope {
    request: ShardRequest,
    reply: oneshot::Sender<ShardReply>,
}

pub struct Queues {
    pub client: TaskQueueHandle,
    pub replication: TaskQueueHandle,
    pub background: TaskQueueHandle,
}

pub struct Shard {
    pub id: u32,
    pub shared: Arc<Shared>,
    metadata: RefCell<Arc<BrokerMetadata>>,
    partitions: RefCell<HashMap<String, Vec<Option<Rc<Partition>>>>>,
    senders: Senders<Envelope>,
    peer_of_shard: Vec<usize>,
    pub queues: Queues,
    pub metrics: ShardMetrics,
    admin_lock: Semaphore,
    stopping: Cell<bool>,
    stop_waiters: RefCell<Vec<oneshot::Sender<()>>>,
    pub connections: Gate,
    /// Open connections of this shard: all, and per source address (client listeners).
    open_connections: Cell<usize>,
    connections_by_address: RefCell<HashMap<std::net::IpAddr, usize>>,
    /// Request bytes being read or admitted (`request_bytes_max_per_shard`).
    pub request_budget: RequestBudget,
    /// Partitions that failed to open at start-up, and why (they answer `storage_error`).
    failed_opens: RefCell<HashMap<(String, u32), String>>,
    /// Each broker's internal listener (`cluster.brokers[].internal_address`).
    internal_addresses: Rc<HashMap<u32, String>>,
}

/// What a partition that cannot be opened does to the caller.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OpenFailure {
    /// Topic creation: the error fails (and undoes) the creation.
    Fail,
    /// Start-up: logged, the partition stays unavailable, the broker serves the others (one
    /// bad partition must not keep the whole broker down at every start).
    Report,
}

/// One counted connection; gives its slot back when the connection ends.
struct ConnectionSlot {
    shard: Rc<Shard>,
    address: Option<std::net::IpAddr>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let shard = &self.shard;
        shard.open_connections.set(shard.open_connections.get() - 1);
        if let Some(address) = self.address {
            let mut by_address = shard.connections_by_address.borrow_mut();
            if let Some(count) = by_address.get_mut(&address) {
                *count -= 1;
                if *count == 0 {
                    by_address.remove(&address);
                }
            }
        }
    }
}

fn unavailable(message: &str) -> PartitionError {
    PartitionError::new(ErrorCode::ShuttingDown, message)
}

/// Runs shard `id`: starts it, reports the start on `started`, serves until `stopped`, then
/// drains connections and closes its partitions.
pub(super) async fn run(
    id: u32,
    shared: Arc<Shared>,
    mesh: MeshBuilder<Envelope, Full>,
    broker_metadata: Arc<BrokerMetadata>,
    stopped: oneshot::Receiver<()>,
    started: std::sync::mpsc::Sender<Result<(), String>>,
) -> Result<(), String> {
    let (shard, tasks) = match start(id, shared, mesh, broker_metadata).await {
        Ok(running) => {
            let _ = started.send(Ok(()));
            running
        }
        Err(error) => {
            let _ = started.send(Err(format!("shard {id}: {error}")));
            return Err(error);
        }
    };
    let _ = stopped.await;
    shard.begin_stop();
    let drain = Duration::from_millis(shard.shared.config.shutdown_timeout_ms);
    if glommio::timer::timeout(drain, async {
        let _ = shard.connections.close().await;
        Ok(())
    })
    .await
    .is_err()
    {
        tracing::warn!(
            shard = id,
            "connections still open after the shutdown timeout; closing logs anyway"
        );
    }
    for partition in shard.local_partitions() {
        partition.close().await;
    }
    shard.senders.close();
    drop(tasks);
    tracing::info!(shard = id, "shard stopped");
    Ok(())
}

async fn start(
    id: u32,
    shared: Arc<Shared>,
    mesh: MeshBuilder<Envelope, Full>,
    broker_metadata: Arc<BrokerMetadata>,
) -> Result<(Rc<Shard>, Vec<glommio::Task<()>>), String> {
    let (senders, mut receivers) = mesh
        .join()
        .await
        .map_err(|e| format!("cannot join the shard mesh: {e}"))?;
    shared.peer_ids[id as usize]
        .set(senders.peer_id())
        .map_err(|_| "peer id set twice".to_string())?;
    // Every shard must know every other's peer id before anyone forwards.
    shared.mesh_barrier.wait();
    let peer_of_shard = shared
        .peer_ids
        .iter()
        .map(|p| p.get().copied().unwrap_or(usize::MAX))
        .collect();
    let executor = glommio::executor();
    let queues = Queues {
        client: executor.create_task_queue(Shares::Static(1000), Latency::NotImportant, "client"),
        replication: executor.create_task_queue(
            Shares::Static(1000),
            Latency::NotImportant,
            "replication",
        ),
        background: executor.create_task_queue(
            Shares::Static(1000),
            Latency::NotImportant,
            "background",
        ),
    };
    let shard = Rc::new(Shard {
        id,
        metrics: ShardMetrics::new(&shared.metrics, id),
        metadata: RefCell::new(Arc::clone(&broker_metadata)),
        partitions: RefCell::new(HashMap::new()),
        senders,
        peer_of_shard,
        queues,
        admin_lock: Semaphore::new(1),
        stopping: Cell::new(false),
        stop_waiters: RefCell::new(Vec::new()),
        connections: Gate::new(),
        open_connections: Cell::new(0),
        connections_by_address: RefCell::new(HashMap::new()),
        request_budget: RequestBudget::new(shared.config.request_bytes_max_per_shard),
        failed_opens: RefCell::new(HashMap::new()),
        internal_addresses: Rc::new(
            shared
                .config
                .cluster
                .brokers
                .iter()
                .filter_map(|b| Some((b.id, b.internal_address.clone()?)))
                .collect(),
        ),
        shared,
    });
    // Recover every partition this shard owns.
    for (name, topic) in &broker_metadata.topics {
        let owned: Vec<u32> = topic
            .partitions
            .iter()
            .enumerate()
            .filter(|(_, p)| p.shard == id)
            .map(|(i, _)| i as u32)
            .collect();
        shard
            .open_partitions(name, topic, &owned, OpenFailure::Report)
            .await?;
    }
    let config = &shard.shared.config;
    let shared_listener = TcpListener::bind(config.listen.as_str())
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let (host, _) = parse_host_port("listen", &config.listen)?;
    let direct_port = if config.shard_port_base == 0 {
        0
    } else {
        config.shard_port_base + id as u16
    };
    let direct_listener = TcpListener::bind((host.as_str(), direct_port))
        .map_err(|e| format!("cannot listen on {host}:{direct_port}: {e}"))?;
    let direct_address = direct_listener
        .local_addr()
        .map_err(|e| format!("listener address: {e}"))?;
    let _ = shard.shared.shard_addresses[id as usize].set(direct_address);
    let mut listeners = vec![
        (shared_listener, ListenerKind::Client),
        (direct_listener, ListenerKind::Client),
    ];
    if let Some(internal) = &config.cluster.internal_listen {
        let shared_internal = TcpListener::bind(internal.as_str())
            .map_err(|e| format!("cannot listen on {internal} (cluster.internal_listen): {e}"))?;
        let (internal_host, _) = parse_host_port("cluster.internal_listen", internal)?;
        let port = if config.cluster.internal_shard_port_base == 0 {
            0
        } else {
            config.cluster.internal_shard_port_base + id as u16
        };
        let direct_internal = TcpListener::bind((internal_host.as_str(), port))
            .map_err(|e| format!("cannot listen on {internal_host}:{port}: {e}"))?;
        let address = direct_internal
            .local_addr()
            .map_err(|e| format!("listener address: {e}"))?;
        let _ = shard.shared.internal_shard_addresses[id as usize].set(address);
        listeners.push((shared_internal, ListenerKind::Internal));
        listeners.push((direct_internal, ListenerKind::Internal));
    }

    let mut tasks = Vec::new();
    for (peer, receiver) in receivers.streams() {
        let receiving = Rc::clone(&shard);
        tasks.push(
            glommio::spawn_local_into(
                async move {
                    while let Some(envelope) = receiver.recv().await {
                        receiving.dispatch_envelope(envelope).await;
                    }
                    tracing::trace!(peer, "mesh channel closed");
                },
                shard.queues.client,
            )
            .map_err(|e| format!("spawn: {e}"))?,
        );
    }
    for (listener, kind) in listeners {
        let shard_for_accept = Rc::clone(&shard);
        glommio::spawn_local_into(
            async move { shard_for_accept.accept_loop(listener, kind).await },
            shard.queues.client,
        )
        .map_err(|e| format!("spawn: {e}"))?
        .detach();
    }
    {
        let ticking = Rc::clone(&shard);
        glommio::spawn_local_into(
            async move { ticking.tick_loop().await },
            shard.queues.background,
        )
        .map_err(|e| format!("spawn: {e}"))?
        .detach();
        let ticking = Rc::clone(&shard);
        glommio::spawn_local_into(
            async move { ticking.replica_tick_loop().await },
            shard.queues.replication,
        )
        .map_err(|e| format!("spawn: {e}"))?
        .detach();
    }
    if id == 0 {
        let admin = super::admin::bind(&shard.shared.config.admin_listen)?;
        let shared = Arc::clone(&shard.shared);
        let stop = shard.stop_signal();
        glommio::spawn_local_into(
            super::admin::serve(admin, shared, stop),
            shard.queues.background,
        )
        .map_err(|e| format!("spawn: {e}"))?
        .detach();
    }
    if id == 0 {
        if let Some(delay_ms) = std::env::var(FAILPOINT_SHARD_PANIC_MS)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            // Test-only failpoint: proves a shard panic stops the whole broker.
            tracing::warn!(
                delay_ms,
                "failpoint {FAILPOINT_SHARD_PANIC_MS} set: shard 0 will panic"
            );
            glommio::spawn_local(async move {
                glommio::timer::sleep(Duration::from_millis(delay_ms)).await;
                panic!("failpoint {FAILPOINT_SHARD_PANIC_MS}: shard 0 panics on purpose");
            })
            .detach();
        }
    }
    shard.shared.ready_shards.fetch_add(1, Ordering::AcqRel);
    tracing::info!(shard = id, direct = %direct_address, partitions = shard.partition_count(), "shard ready");
    Ok((shard, tasks))
}

impl Shard {
    /// Every partition this shard has open (a snapshot: no borrow is held afterwards).
    fn local_partitions(&self) -> Vec<Rc<Partition>> {
        self.partitions
            .borrow()
            .values()
            .flatten()
            .flatten()
            .cloned()
            .collect()
    }

    fn partition_count(&self) -> usize {
        self.partitions
            .borrow()
            .values()
            .map(|v| v.iter().flatten().count())
            .sum()
    }

    fn begin_stop(&self) {
        self.stopping.set(true);
        for waiter in self.stop_waiters.borrow_mut().drain(..) {
            let _ = waiter.send(());
        }
    }

    /// Resolves when the shard begins to stop.
    pub fn stop_signal(&self) -> LocalBoxFuture<'static, ()> {
        if self.stopping.get() {
            return futures_util::future::ready(()).boxed_local();
        }
        let (wake, woken) = oneshot::channel();
        self.stop_waiters.borrow_mut().push(wake);
        async move {
            let _ = woken.await;
        }
        .boxed_local()
    }

    async fn accept_loop(self: Rc<Self>, listener: TcpListener, kind: ListenerKind) {
        loop {
            let accepted =
                futures_lite::future::or(async { Some(listener.accept().await) }, async {
                    self.stop_signal().await;
                    None
                })
                .await;
            let Some(accepted) = accepted else {
                return;
            };
            let stream = match accepted {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::warn!(shard = self.id, %error, "accept failed");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Some(slot) = self.take_connection_slot(&stream, kind) else {
                drop(stream);
                continue;
            };
            let shard = Rc::clone(&self);
            let spawned = self.connections.spawn(async move {
                shard.metrics.connections.inc();
                connection::serve(Rc::clone(&shard), stream, kind).await;
                shard.metrics.connections.dec();
                drop(slot);
            });
            match spawned {
                Ok(task) => {
                    task.detach();
                }
                Err(_) => return,
            }
        }
    }

    /// Counts a new connection against the limits, or refuses it (with a log line): the
    /// shard's `connections_per_shard_max`, of which `connections_reserved_internal` only
    /// the internal listener may use, and `connections_per_address_max` per client address.
    fn take_connection_slot(
        self: &Rc<Self>,
        stream: &glommio::net::TcpStream,
        kind: ListenerKind,
    ) -> Option<ConnectionSlot> {
        let config = &self.shared.config;
        let peer = stream.peer_addr().ok();
        let open = self.open_connections.get();
        let limit = match kind {
            ListenerKind::Client => {
                config.connections_per_shard_max - config.connections_reserved_internal
            }
            ListenerKind::Internal => config.connections_per_shard_max,
        };
        if open >= limit {
            tracing::warn!(
                shard = self.id,
                ?peer,
                ?kind,
                open,
                limit,
                "connection limit reached; closing a new connection"
            );
            self.metrics.connections_refused.inc();
            return None;
        }
        let address = match (kind, peer) {
            (ListenerKind::Client, Some(peer)) => {
                let mut by_address = self.connections_by_address.borrow_mut();
                let count = by_address.entry(peer.ip()).or_insert(0);
                if *count >= config.connections_per_address_max {
                    tracing::warn!(shard = self.id, %peer, limit = config.connections_per_address_max, "connection limit per address reached; closing a new connection");
                    self.metrics.connections_refused.inc();
                    return None;
                }
                *count += 1;
                Some(peer.ip())
            }
            _ => None,
        };
        self.open_connections.set(open + 1);
        Some(ConnectionSlot {
            shard: Rc::clone(self),
            address,
        })
    }

    async fn tick_loop(self: Rc<Self>) {
        let executor = glommio::executor();
        let queues = [
            ("client", self.queues.client),
            ("replication", self.queues.replication),
            ("background", self.queues.background),
        ];
        let counters: Vec<_> = queues
            .iter()
            .map(|(name, _)| {
                self.shared
                    .metrics
                    .task_queue_runtime
                    .get_or_create_owned(&QueueLabels {
                        shard: self.id,
                        queue: name,
                    })
            })
            .collect();
        let mut ticks = 0u64;
        while !self.stopping.get() {
            let elapsed_ms = self.shared.started.elapsed().as_millis() as u64;
            self.shared.heartbeats_ms[self.id as usize].store(elapsed_ms, Ordering::Release);
            ticks += 1;
            if ticks.is_multiple_of(4) {
                for ((_, handle), counter) in queues.iter().zip(&counters) {
                    if let Ok(stats) = executor.task_queue_stats(*handle) {
                        counter.inc_by(stats.runtime().as_secs_f64());
                    }
                }
            }
            self.metrics
                .request_budget_used_bytes
                .set(self.request_budget.used_bytes() as i64);
            if self.id == 0 {
                self.check_disk_space();
            }
            glommio::timer::sleep(Duration::from_millis(HEARTBEAT_MS)).await;
        }
    }

    /// The disk-space guard: produce is refused with `disk_full` while the data directory's
    /// filesystem has less than `disk_free_bytes_min` available, so the disk never fills up
    /// under the logs (a failed write would poison them); reads go on.
    fn check_disk_space(&self) {
        let config = &self.shared.config;
        if config.disk_free_bytes_min == 0 {
            return;
        }
        let free_bytes = match crate::dma_disk::free_disk_bytes(&config.data_dir) {
            Ok(free) => free,
            Err(error) => {
                tracing::warn!(%error, "cannot read the data directory's free space");
                return;
            }
        };
        let full = free_bytes < config.disk_free_bytes_min;
        // Written only when it changes: every produce on every shard reads it.
        let was_full = self.shared.disk_full.load(Ordering::Acquire);
        if full != was_full {
            self.shared.disk_full.store(full, Ordering::Release);
        }
        self.metrics.disk_full.set(i64::from(full));
        if full && !was_full {
            tracing::error!(
                free_bytes,
                disk_free_bytes_min = config.disk_free_bytes_min,
                "the data directory is almost full: refusing produce until space is freed"
            );
        } else if !full && was_full {
            tracing::info!(free_bytes, "disk space freed: accepting produce again");
        }
    }

    async fn open_partitions(
        &self,
        name: &str,
        topic: &TopicMeta,
        partitions: &[u32],
        on_failure: OpenFailure,
    ) -> Result<(), String> {
        let count = topic.partitions.len();
        let me = self.shared.config.broker_id;
        for &index in partitions {
            let meta = &topic.partitions[index as usize];
            if !meta.replicas.is_empty() && !meta.replicas.contains(&me) {
                continue; // Another broker's replica: this broker only knows the metadata.
            }
            let dir =
                metadata::partition_dir(&self.shared.config.data_dir, name, topic.topic_id, index);
            let partition = Partition::open(
                dir,
                name,
                index,
                topic.topic_id,
                topic.config.clone(),
                Epoch(meta.leader_epoch),
                meta.replicas.clone(),
                &self.shared.metrics,
                self.metrics.flush_latency.clone(),
                self.shared.config.retention_check_interval_ms,
                self.queues.background,
                self.replication_settings(),
            )
            .await;
            let partition = match (partition, on_failure) {
                (Ok(partition), _) => partition,
                (Err(error), OpenFailure::Fail) => return Err(error),
                (Err(error), OpenFailure::Report) => {
                    tracing::error!(topic = name, partition = index, %error, "cannot open this partition; it stays unavailable, the others are served");
                    self.failed_opens
                        .borrow_mut()
                        .insert((name.to_string(), index), error);
                    continue;
                }
            };
            let mut map = self.partitions.borrow_mut();
            let slots = map
                .entry(name.to_string())
                .or_insert_with(|| vec![None; count]);
            slots[index as usize] = Some(partition);
        }
        Ok(())
    }

    /// What this broker presents on other brokers' internal listeners.
    fn peer_credentials(&self) -> Option<crate::peer_auth::PeerCredentials> {
        self.shared
            .secret
            .clone()
            .map(|secret| crate::peer_auth::PeerCredentials {
                broker_id: self.shared.config.broker_id,
                secret,
            })
    }

    fn replication_settings(&self) -> ReplicationSettings {
        let config = &self.shared.config;
        ReplicationSettings {
            broker_id: config.broker_id,
            internal_addresses: Rc::clone(&self.internal_addresses),
            peer: self.peer_credentials(),
            replica_lag_max_ms: config.cluster.replica_lag_max_ms,
            fetch_wait_ms: config.cluster.replica_fetch_wait_ms,
            fetch_bytes_max: config
                .cluster
                .replica_fetch_bytes_max
                .min(config.fetch_bytes_max),
            fetch_backoff_ms: config.cluster.replica_fetch_backoff_ms,
            frame_bytes_max: config.frame_bytes_max,
            queue: self.queues.replication,
        }
    }

    /// Ticks every local partition's replica (ISR, ack deadlines, follower backoff).
    async fn replica_tick_loop(self: Rc<Self>) {
        while !self.stopping.get() {
            for partition in self.local_partitions() {
                partition.tick();
            }
            glommio::timer::sleep(Duration::from_millis(REPLICA_TICK_MS)).await;
        }
    }

    fn local_partition(&self, topic: &str, partition: u32) -> Option<Rc<Partition>> {
        self.partitions
            .borrow()
            .get(topic)
            .and_then(|slots| slots.get(partition as usize).cloned().flatten())
    }

    /// The shard owning `topic`/`partition`, by this shard's view of the metadata.
    fn owner(&self, topic: &str, partition: u32) -> Result<u32, PartitionError> {
        let metadata = self.metadata.borrow();
        let Some(meta) = metadata.topics.get(topic) else {
            return Err(PartitionError::new(
                ErrorCode::UnknownTopic,
                format!("topic {topic:?} does not exist"),
            ));
        };
        match meta.partitions.get(partition as usize) {
            Some(p) => Ok(p.shard),
            None => Err(PartitionError::new(
                ErrorCode::UnknownPartition,
                format!(
                    "topic {topic:?} has partitions 0..{}, not {partition}",
                    meta.partitions.len()
                ),
            )),
        }
    }

    /// Runs `request` on `shard`: directly when it is this one, else over the mesh.
    async fn to_shard(self: &Rc<Self>, shard: u32, request: ShardRequest) -> Option<ShardReply> {
        if shard == self.id {
            // Boxed: handlers forward to other shards (recursion through this function).
            return Some(Rc::clone(self).handle(request).boxed_local().await);
        }
        let (reply, replied) = oneshot::channel();
        let peer = self.peer_of_shard[shard as usize];
        if self
            .senders
            .send_to(peer, Envelope { request, reply })
            .await
            .is_err()
        {
            return None;
        }
        replied.await.ok()
    }

    async fn dispatch_envelope(self: &Rc<Self>, envelope: Envelope) {
        let Envelope { request, reply } = envelope;
        // Produce is admitted in arrival order before the next message is read (ordering per
        // partition); everything else may wait, so it runs on its own task.
        if matches!(request, ShardRequest::Produce { .. }) {
            let _ = reply.send(Rc::clone(self).handle(request).await);
            return;
        }
        let shard = Rc::clone(self);
        let spawned = glommio::spawn_local_into(
            async move {
                let _ = reply.send(shard.handle(request).await);
            },
            self.queues.client,
        );
        if let Ok(task) = spawned {
            task.detach();
        }
    }

    async fn handle(self: Rc<Self>, request: ShardRequest) -> ShardReply {
        match request {
            ShardRequest::Produce {
                topic,
                partition,
                acks,
                timeout_ms,
                mut batches,
            } => {
                let Some(local) = self.local_partition(&topic, partition) else {
                    return ShardReply::Admitted(Err(self.missing(&topic, partition)));
                };
                ShardReply::Admitted(
                    local
                        .produce(&mut batches, acks, timeout_ms)
                        .await
                        .map(|a| RemoteAdmitted {
                            base_offset: a.base_offset.0,
                            last_offset: a.last_offset.0,
                            leader_epoch: a.leader_epoch.0,
                            completion: a.completion,
                        }),
                )
            }
            ShardRequest::Fetch {
                topic,
                partition,
                offset,
                max_bytes,
            } => {
                let Some(local) = self.local_partition(&topic, partition) else {
                    return ShardReply::Fetched(Err(self.missing(&topic, partition)));
                };
                ShardReply::Fetched(read_local(&local, offset, max_bytes).await.map(|data| {
                    let mut bytes = FrameBuf::with_capacity(data.bytes);
                    bytes.extend_from_slice(data.slice());
                    (data.high_watermark.0, data.log_start_offset.0, bytes)
                }))
            }
            ShardRequest::WaitForData {
                topic,
                partition,
                offset,
                deadline,
            } => {
                if let Some(local) = self.local_partition(&topic, partition) {
                    futures_lite::future::or(
                        local.wait_for_data(Offset(offset), deadline),
                        self.stop_signal(),
                    )
                    .await;
                }
                ShardReply::Woken
            }
            ShardRequest::ListOffset {
                topic,
                partition,
                spec,
            } => {
                let Some(local) = self.local_partition(&topic, partition) else {
                    return ShardReply::Offset(Err(self.missing(&topic, partition)));
                };
                ShardReply::Offset(local.list_offset(spec).await.map(|o| o.0))
            }
            ShardRequest::Describe { topic, partition } => {
                let Some(local) = self.local_partition(&topic, partition) else {
                    return ShardReply::Described(Err(self.missing(&topic, partition)));
                };
                let mut description = local.describe();
                description.shard = self.id;
                ShardReply::Described(Ok(description))
            }
            ShardRequest::CreateTopic(request) => {
                ShardReply::Topic(self.create_topic(request).await)
            }
            ShardRequest::DeleteTopic(name) => ShardReply::Topic(self.delete_topic(name).await),
            ShardRequest::ApplyTopic(request) => ShardReply::Topic(self.apply_topic(request).await),
            ShardRequest::OpenPartitions {
                topic,
                meta,
                partitions,
            } => ShardReply::Done(
                self.open_partitions(&topic, &meta, &partitions, OpenFailure::Fail)
                    .await,
            ),
            ShardRequest::ClosePartitions { topic } => {
                let removed = self.partitions.borrow_mut().remove(&topic);
                for partition in removed.into_iter().flatten().flatten() {
                    partition.close().await;
                    partition.metrics.remove(&self.shared.metrics);
                }
                ShardReply::Done(Ok(()))
            }
            ShardRequest::Metadata(metadata) => {
                *self.metadata.borrow_mut() = metadata;
                ShardReply::Done(Ok(()))
            }
        }
    }

    fn missing(&self, topic: &str, partition: u32) -> PartitionError {
        if let Some(error) = self
            .failed_opens
            .borrow()
            .get(&(topic.to_string(), partition))
        {
            return PartitionError::new(
                ErrorCode::StorageError,
                format!("{topic}/{partition} could not be opened at start-up: {error}"),
            );
        }
        match self.owner(topic, partition) {
            Err(error) => error,
            Ok(_) => PartitionError::new(
                ErrorCode::PartitionUnavailable,
                format!("{topic}/{partition} is not open on shard {}", self.id),
            ),
        }
    }

    // ---- admin (shard 0 owns metadata changes) ----

    /// Forwards a metadata change to shard 0, which owns them.
    async fn on_shard_zero(self: &Rc<Self>, request: ShardRequest) -> TopicResult {
        match self.to_shard(0, request).await {
            Some(ShardReply::Topic(result)) => result,
            _ => topic_error(ErrorCode::ShuttingDown, "shard 0 is not answering"),
        }
    }

    async fn create_topic(self: &Rc<Self>, request: CreateTopicRequest) -> TopicResult {
        if self.id != 0 {
            return self.on_shard_zero(ShardRequest::CreateTopic(request)).await;
        }
        let Ok(_permit) = self.admin_lock.acquire_permit(1).await else {
            return topic_error(ErrorCode::ShuttingDown, "shutting down");
        };
        let name = request.name;
        if let Err(message) = metadata::validate_topic_name(&name) {
            return topic_error(ErrorCode::InvalidTopic, message);
        }
        if request.partitions == 0 || request.partitions > metadata::PARTITIONS_PER_TOPIC_MAX {
            return topic_error(
                ErrorCode::InvalidRequest,
                format!(
                    "partitions must be 1..={}, not {}",
                    metadata::PARTITIONS_PER_TOPIC_MAX,
                    request.partitions
                ),
            );
        }
        let me = self.shared.config.broker_id;
        let mut brokers: Vec<u32> = self
            .shared
            .config
            .cluster
            .brokers
            .iter()
            .map(|b| b.id)
            .collect();
        if brokers.is_empty() {
            brokers.push(me);
        }
        brokers.sort_unstable();
        let replication_factor = request.replication_factor.max(1);
        if usize::from(replication_factor) > brokers.len() {
            return topic_error(
                ErrorCode::InvalidReplicationFactor,
                format!("replication factor {replication_factor} needs {replication_factor} brokers; this cluster has {}", brokers.len()),
            );
        }
        let config = match self
            .shared
            .config
            .topic_defaults
            .with_entries(&request.configs)
        {
            Ok(config) => config,
            Err(message) => return topic_error(ErrorCode::InvalidConfig, message),
        };
        let explicit_min_insync = request
            .configs
            .iter()
            .any(|c| c.key == "min_insync_replicas");
        if explicit_min_insync && config.min_insync_replicas > replication_factor {
            return topic_error(
                ErrorCode::InvalidConfig,
                format!(
                    "min_insync_replicas {} exceeds the replication factor {replication_factor}",
                    config.min_insync_replicas
                ),
            );
        }
        let mut next = (**self.metadata.borrow()).clone();
        if next.topics.contains_key(&name) {
            return topic_error(
                ErrorCode::TopicAlreadyExists,
                format!("topic {name:?} already exists"),
            );
        }
        // Ids carry the creating broker so that brokers of a static cluster never collide.
        let topic_id = if self.shared.config.cluster.brokers.is_empty() {
            next.next_topic_id
        } else {
            (u64::from(me) << 40) | next.next_topic_id
        };
        next.next_topic_id += 1;
        if let Err(message) = self.persist(next).await {
            return topic_error(ErrorCode::StorageError, message);
        }
        // Replica sets rotate over the brokers so leadership spreads; the first replica leads.
        let first = crc32c::crc32c(name.as_bytes()) as usize;
        let replicas: Vec<Vec<u32>> = (0..request.partitions as usize)
            .map(|p| {
                (0..usize::from(replication_factor))
                    .map(|i| brokers[(first + p + i) % brokers.len()])
                    .collect()
            })
            .collect();
        let apply = ApplyTopicRequest {
            name: name.clone(),
            topic_id,
            delete: false,
            replication_factor,
            configs: config.entries(),
            replicas,
        };
        // The other brokers first: if one cannot take it, nobody keeps it.
        let mut applied = Vec::new();
        for broker in self
            .shared
            .config
            .cluster
            .brokers
            .iter()
            .filter(|b| b.id != me)
        {
            let Some(address) = broker.internal_address.as_deref() else {
                return topic_error(
                    ErrorCode::BrokerUnavailable,
                    format!("broker {} has no internal_address", broker.id),
                );
            };
            match self.call_broker(address, &apply).await {
                Ok(()) => applied.push(address.to_string()),
                Err(message) => {
                    let undo = ApplyTopicRequest {
                        delete: true,
                        ..apply.clone()
                    };
                    for address in &applied {
                        if let Err(e) = self.call_broker(address, &undo).await {
                            tracing::warn!(topic = %name, %address, error = %e, "could not undo a partial topic creation");
                        }
                    }
                    return topic_error(
                        ErrorCode::BrokerUnavailable,
                        format!("broker {} ({}) could not create the topic: {message}; nothing was created", broker.id, broker.address),
                    );
                }
            }
        }
        let result = self.install_topic(&apply).await;
        if result.error == 0 {
            tracing::info!(topic = %name, partitions = request.partitions, replication_factor, "created topic");
        }
        result
    }

    /// Sends an `ApplyTopic` to another broker of the cluster.
    async fn call_broker(&self, address: &str, request: &ApplyTopicRequest) -> Result<(), String> {
        let timeout_ms = self.shared.config.cluster.broker_call_timeout_ms;
        let connection = crate::client::Connection::connect_peer(
            address,
            self.shared.config.frame_bytes_max,
            self.peer_credentials().as_ref(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let frame = connection
            .call(ApiKey::ApplyTopic, request, Vec::new(), timeout_ms)
            .await
            .map_err(|e| e.to_string())?;
        let result: TopicResult = crate::client::decode(&frame).map_err(|e| e.to_string())?;
        if result.error != 0 {
            return Err(format!(
                "{}: {}",
                ErrorCode::from_u16(result.error).name(),
                result.message
            ));
        }
        Ok(())
    }

    /// Installs (or removes) a topic another broker created, with its id and assignment.
    async fn apply_topic(self: &Rc<Self>, request: ApplyTopicRequest) -> TopicResult {
        if self.id != 0 {
            return self.on_shard_zero(ShardRequest::ApplyTopic(request)).await;
        }
        let Ok(_permit) = self.admin_lock.acquire_permit(1).await else {
            return topic_error(ErrorCode::ShuttingDown, "shutting down");
        };
        let existing = self
            .metadata
            .borrow()
            .topics
            .get(&request.name)
            .map(|t| t.topic_id);
        if request.delete {
            return match existing {
                Some(id) if id == request.topic_id => self.uninstall_topic(request.name).await,
                _ => TopicResult {
                    error: 0,
                    message: String::new(),
                },
            };
        }
        match existing {
            Some(id) if id == request.topic_id => TopicResult {
                error: 0,
                message: String::new(),
            },
            Some(_) => topic_error(
                ErrorCode::TopicAlreadyExists,
                format!(
                    "topic {:?} already exists here with another id",
                    request.name
                ),
            ),
            None => {
                if let Err(message) = metadata::validate_topic_name(&request.name) {
                    return topic_error(ErrorCode::InvalidTopic, message);
                }
                if request.replicas.is_empty()
                    || request.replicas.len() > metadata::PARTITIONS_PER_TOPIC_MAX as usize
                {
                    return topic_error(ErrorCode::InvalidRequest, "bad partition count");
                }
                self.install_topic(&request).await
            }
        }
    }

    /// Persists a topic with the given id and assignment, opens the partitions this broker
    /// hosts and publishes the metadata to every shard.
    /// Checks a topic before it is installed (created here or sent by another broker): the
    /// broker's topic and partition caps, and an assignment every broker can open — each
    /// replica set non-empty, at most `REPLICAS_MAX` distinct brokers of `cluster.brokers`
    /// (or this broker alone), as long as the replication factor. Anything else would be
    /// stored and then fail every start.
    fn check_new_topic(&self, request: &ApplyTopicRequest) -> Result<(), PartitionError> {
        let config = &self.shared.config;
        let metadata = self.metadata.borrow();
        if metadata.topics.len() >= config.topics_max {
            return Err(PartitionError::new(
                ErrorCode::LimitReached,
                format!(
                    "this broker keeps at most topics_max = {} topics",
                    config.topics_max
                ),
            ));
        }
        let me = config.broker_id;
        let hosted = |replicas: &[u32]| replicas.contains(&me);
        let partitions_now: usize = metadata
            .topics
            .values()
            .map(|t| t.partitions.iter().filter(|p| hosted(&p.replicas)).count())
            .sum();
        let partitions_new = request.replicas.iter().filter(|r| hosted(r)).count();
        if partitions_now + partitions_new > config.partitions_max {
            return Err(PartitionError::new(
                ErrorCode::LimitReached,
                format!(
                    "this broker hosts {partitions_now} partitions; {partitions_new} more would \
                     exceed partitions_max = {}",
                    config.partitions_max
                ),
            ));
        }
        let known = |id: u32| {
            config.cluster.brokers.iter().any(|b| b.id == id)
                || (config.cluster.brokers.is_empty() && id == me)
        };
        for (partition, replicas) in request.replicas.iter().enumerate() {
            let problem =
                if let Err(error) = wharf_replication::replica::check_replica_set(replicas) {
                    Some(error.to_string())
                } else if replicas.len() != usize::from(request.replication_factor.max(1)) {
                    Some(format!(
                        "{} replicas for replication factor {}",
                        replicas.len(),
                        request.replication_factor
                    ))
                } else {
                    replicas
                        .iter()
                        .find(|&&id| !known(id))
                        .map(|id| format!("broker {id} is not in cluster.brokers"))
                };
            if let Some(problem) = problem {
                return Err(PartitionError::new(
                    ErrorCode::InvalidReplicationFactor,
                    format!(
                        "partition {partition} of topic {:?}: {problem}",
                        request.name
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn install_topic(self: &Rc<Self>, request: &ApplyTopicRequest) -> TopicResult {
        let config = match self
            .shared
            .config
            .topic_defaults
            .with_entries(&request.configs)
        {
            Ok(config) => config,
            Err(message) => return topic_error(ErrorCode::InvalidConfig, message),
        };
        if let Err(error) = self.check_new_topic(request) {
            return topic_error(error.code, error.message);
        }
        let name = request.name.clone();
        let shards = self.shared.shards() as u32;
        let topic = TopicMeta {
            topic_id: request.topic_id,
            replication_factor: request.replication_factor,
            config,
            partitions: request
                .replicas
                .iter()
                .enumerate()
                .map(|(p, replicas)| PartitionMeta {
                    shard: metadata::placement(&name, p as u32, shards),
                    leader: replicas
                        .first()
                        .copied()
                        .unwrap_or(self.shared.config.broker_id),
                    leader_epoch: 0,
                    replicas: replicas.clone(),
                })
                .collect(),
        };
        let mut next = (**self.metadata.borrow()).clone();
        next.topics.insert(name.clone(), topic.clone());
        if let Err(message) = self.persist(next.clone()).await {
            return topic_error(ErrorCode::StorageError, message);
        }
        // Open the logs before anyone can see the topic.
        let opens = (0..shards).map(|shard| {
            let owned: Vec<u32> = topic
                .partitions
                .iter()
                .enumerate()
                .filter(|(_, p)| p.shard == shard)
                .map(|(i, _)| i as u32)
                .collect();
            self.to_shard(
                shard,
                ShardRequest::OpenPartitions {
                    topic: name.clone(),
                    meta: topic.clone(),
                    partitions: owned,
                },
            )
        });
        for reply in join_all(opens).await {
            match reply {
                Some(ShardReply::Done(Ok(()))) => {}
                Some(ShardReply::Done(Err(message))) => {
                    return topic_error(ErrorCode::StorageError, message)
                }
                _ => return topic_error(ErrorCode::ShuttingDown, "a shard is not answering"),
            }
        }
        self.publish(Arc::new(next)).await;
        TopicResult {
            error: 0,
            message: String::new(),
        }
    }

    async fn delete_topic(self: &Rc<Self>, name: String) -> TopicResult {
        if self.id != 0 {
            return self.on_shard_zero(ShardRequest::DeleteTopic(name)).await;
        }
        let Ok(_permit) = self.admin_lock.acquire_permit(1).await else {
            return topic_error(ErrorCode::ShuttingDown, "shutting down");
        };
        let Some(topic) = self.metadata.borrow().topics.get(&name).cloned() else {
            return topic_error(
                ErrorCode::UnknownTopic,
                format!("topic {name:?} does not exist"),
            );
        };
        let me = self.shared.config.broker_id;
        let undo = ApplyTopicRequest {
            name: name.clone(),
            topic_id: topic.topic_id,
            delete: true,
            replication_factor: topic.replication_factor,
            configs: Vec::new(),
            replicas: Vec::new(),
        };
        let mut failed = Vec::new();
        for broker in self
            .shared
            .config
            .cluster
            .brokers
            .iter()
            .filter(|b| b.id != me)
        {
            let Some(address) = broker.internal_address.as_deref() else {
                continue;
            };
            if let Err(message) = self.call_broker(address, &undo).await {
                failed.push(format!("broker {}: {message}", broker.id));
            }
        }
        let result = self.uninstall_topic(name).await;
        if result.error == 0 && !failed.is_empty() {
            return topic_error(
                ErrorCode::BrokerUnavailable,
                format!(
                    "deleted here, but not on {}; delete again once they are up",
                    failed.join("; ")
                ),
            );
        }
        result
    }

    async fn uninstall_topic(self: &Rc<Self>, name: String) -> TopicResult {
        let mut next = (**self.metadata.borrow()).clone();
        let Some(topic) = next.topics.remove(&name) else {
            return topic_error(
                ErrorCode::UnknownTopic,
                format!("topic {name:?} does not exist"),
            );
        };
        if let Err(message) = self.persist(next.clone()).await {
            return topic_error(ErrorCode::StorageError, message);
        }
        self.publish(Arc::new(next)).await;
        let shards = self.shared.shards() as u32;
        let closes = (0..shards).map(|shard| {
            self.to_shard(
                shard,
                ShardRequest::ClosePartitions {
                    topic: name.clone(),
                },
            )
        });
        join_all(closes).await;
        let data_dir = self.shared.config.data_dir.clone();
        let dir_name = name.clone();
        let removed = glommio::executor()
            .spawn_blocking(move || {
                metadata::remove_topic_dir(&data_dir, &dir_name, topic.topic_id)
            })
            .await;
        if let Err(message) = removed {
            // The metadata no longer names it: the next start removes the directory.
            tracing::warn!(topic = %name, %message, "could not remove the deleted topic's files yet");
        }
        tracing::info!(topic = %name, "deleted topic");
        TopicResult {
            error: 0,
            message: String::new(),
        }
    }

    async fn persist(&self, next: BrokerMetadata) -> Result<(), String> {
        let data_dir = self.shared.config.data_dir.clone();
        glommio::executor()
            .spawn_blocking(move || metadata::store(&data_dir, &next))
            .await
    }

    async fn publish(self: &Rc<Self>, next: Arc<BrokerMetadata>) {
        let shards = self.shared.shards() as u32;
        let updates = (0..shards)
            .map(|shard| self.to_shard(shard, ShardRequest::Metadata(Arc::clone(&next))));
        join_all(updates).await;
    }

    // ---- client requests ----

    /// Admits one request: does what must happen in arrival order (produce appends) and
    /// returns the future of its response.
    pub async fn admit(self: &Rc<Self>, mut frame: Frame, context: &ConnectionContext) -> Pending {
        let header = frame.header;
        let Some(api) = header.api() else {
            return ready(error_frame(
                &header,
                ErrorCode::UnknownApi,
                format!("unknown api key {}", header.api_key),
            ));
        };
        self.metrics.requests[api as usize].inc();
        let (min, max) = api.supported_versions();
        if header.api_version < min || header.api_version > max {
            self.shared
                .metrics
                .record_error(self.id, api, ErrorCode::UnsupportedVersion);
            return ready(error_frame(
                &header,
                ErrorCode::UnsupportedVersion,
                format!(
                    "{} version {} is not supported (this broker speaks {min}..={max})",
                    api.name(),
                    header.api_version
                ),
            ));
        }
        if header.is_response() {
            return ready(error_frame(
                &header,
                ErrorCode::InvalidRequest,
                "a response was sent as a request".to_string(),
            ));
        }
        if let Err(error) = self.check_access(api, context) {
            self.shared.metrics.record_error(self.id, api, error.code);
            return ready(error_frame(&header, error.code, error.message));
        }
        let started = Instant::now();
        let pending = match self.admit_api(api, &mut frame, context).await {
            Ok(pending) => pending,
            Err(error) => {
                self.shared.metrics.record_error(self.id, api, error.code);
                return ready(error_frame(&header, error.code, error.message));
            }
        };
        let latency = self.metrics.latency[api as usize].clone();
        async move {
            let response = pending.await;
            latency.observe(started.elapsed().as_secs_f64());
            response
        }
        .boxed_local()
    }

    /// The trust boundary: inter-broker APIs only on the internal listener, and there only
    /// after the peer proved the cluster secret (anything else closes the connection).
    fn check_access(&self, api: ApiKey, context: &ConnectionContext) -> Result<(), PartitionError> {
        match context.listener {
            ListenerKind::Client if api.is_internal() || api.is_peer_auth() => {
                Err(PartitionError::new(
                    ErrorCode::InternalApiRefused,
                    format!(
                        "{} is an inter-broker API: it is served only on the internal listener \
                         (cluster.internal_listen), to brokers that prove the cluster secret",
                        api.name()
                    ),
                ))
            }
            ListenerKind::Client => Ok(()),
            ListenerKind::Internal
                if api == ApiKey::Versions
                    || api.is_peer_auth()
                    || context.authenticated_peer().is_some() =>
            {
                Ok(())
            }
            ListenerKind::Internal => {
                context.close_after_response.set(true);
                self.metrics.peer_auth_failures.inc();
                tracing::warn!(shard = self.id, peer = %context.peer, api = api.name(), "refused a request from an unauthenticated peer of the internal listener; closing");
                Err(PartitionError::new(
                    ErrorCode::AuthenticationFailed,
                    format!(
                        "{}: the internal listener serves only peers that proved the cluster \
                         secret (PeerAuthBegin, PeerAuthProve)",
                        api.name()
                    ),
                ))
            }
        }
    }

    /// The broker's side of the peer handshake (`crate::peer_auth` has the scheme).
    fn peer_auth_begin(
        &self,
        request: PeerAuthBeginRequest,
        context: &ConnectionContext,
    ) -> PeerAuthBeginResponse {
        let config = &self.shared.config;
        let refuse = |message: String| {
            context.close_after_response.set(true);
            self.metrics.peer_auth_failures.inc();
            tracing::warn!(shard = self.id, peer = %context.peer, broker_id = request.broker_id, %message, "peer authentication refused; closing");
            PeerAuthBeginResponse {
                error: ErrorCode::AuthenticationFailed as u16,
                message,
                broker_id: config.broker_id,
                server_nonce: Vec::new(),
                server_proof: Vec::new(),
            }
        };
        let Some(secret) = &self.shared.secret else {
            return refuse("this broker has no cluster secret".to_string());
        };
        if *context.auth.borrow() != PeerAuthState::NotStarted {
            return refuse("the handshake was already begun on this connection".to_string());
        }
        if !config
            .cluster
            .brokers
            .iter()
            .any(|b| b.id == request.broker_id)
        {
            return refuse(format!(
                "broker {} is not listed in cluster.brokers",
                request.broker_id
            ));
        }
        let Ok(client_nonce) =
            <[u8; crate::peer_auth::NONCE_BYTES]>::try_from(request.client_nonce.as_slice())
        else {
            return refuse(format!(
                "the nonce must have {} bytes",
                crate::peer_auth::NONCE_BYTES
            ));
        };
        let server_nonce = match crate::peer_auth::nonce() {
            Ok(nonce) => nonce,
            Err(message) => return refuse(message),
        };
        *context.auth.borrow_mut() = PeerAuthState::Challenged {
            broker_id: request.broker_id,
            client_nonce,
            server_nonce,
        };
        PeerAuthBeginResponse {
            error: 0,
            message: String::new(),
            broker_id: config.broker_id,
            server_nonce: server_nonce.to_vec(),
            server_proof: secret.server_proof(&client_nonce, &server_nonce, config.broker_id),
        }
    }

    fn peer_auth_prove(
        &self,
        request: PeerAuthProveRequest,
        context: &ConnectionContext,
    ) -> TopicResult {
        let state = *context.auth.borrow();
        let verified = match (state, &self.shared.secret) {
            (
                PeerAuthState::Challenged {
                    broker_id,
                    client_nonce,
                    server_nonce,
                },
                Some(secret),
            ) => secret
                .verify_client(&server_nonce, &client_nonce, broker_id, &request.proof)
                .then_some(broker_id),
            _ => None,
        };
        match verified {
            Some(broker_id) => {
                *context.auth.borrow_mut() = PeerAuthState::Authenticated { broker_id };
                tracing::debug!(shard = self.id, peer = %context.peer, broker_id, "peer authenticated");
                topic_error(ErrorCode::None, "")
            }
            None => {
                context.close_after_response.set(true);
                self.metrics.peer_auth_failures.inc();
                tracing::warn!(shard = self.id, peer = %context.peer, "a peer failed to prove the cluster secret; closing");
                topic_error(
                    ErrorCode::AuthenticationFailed,
                    "the proof does not match the cluster secret",
                )
            }
        }
    }

    async fn admit_api(
        self: &Rc<Self>,
        api: ApiKey,
        frame: &mut Frame,
        context: &ConnectionContext,
    ) -> Result<Pending, PartitionError> {
        let header = frame.header;
        let invalid = |e: BodyError| PartitionError::new(ErrorCode::InvalidRequest, e.to_string());
        Ok(match api {
            ApiKey::Versions => {
                let _request: VersionsRequest = frame.decode_body().map_err(invalid)?;
                let body = VersionsResponse {
                    broker_id: self.shared.config.broker_id,
                    server_version: env!("CARGO_PKG_VERSION").to_string(),
                    apis: ApiKey::ALL
                        .iter()
                        .map(|api| {
                            let (min_version, max_version) = api.supported_versions();
                            ApiVersionRange {
                                api_key: *api as u16,
                                min_version,
                                max_version,
                            }
                        })
                        .collect(),
                };
                ready(respond(&header, &body, Vec::new()))
            }
            ApiKey::Metadata => {
                let request: MetadataRequest = frame.decode_body().map_err(invalid)?;
                let mut response = self.metadata_response(request, context.listener);
                let shard = Rc::clone(self);
                async move {
                    shard.fill_live_partition_state(&mut response).await;
                    respond(&header, &response, Vec::new())
                }
                .boxed_local()
            }
            ApiKey::CreateTopic => {
                let request: CreateTopicRequest = frame.decode_body().map_err(invalid)?;
                let shard = Rc::clone(self);
                async move {
                    let result = shard.create_topic(request).await;
                    respond(&header, &result, Vec::new())
                }
                .boxed_local()
            }
            ApiKey::DeleteTopic => {
                let request: DeleteTopicRequest = frame.decode_body().map_err(invalid)?;
                let shard = Rc::clone(self);
                async move {
                    let result = shard.delete_topic(request.name).await;
                    respond(&header, &result, Vec::new())
                }
                .boxed_local()
            }
            ApiKey::DescribeTopic => {
                let request: DescribeTopicRequest = frame.decode_body().map_err(invalid)?;
                let shard = Rc::clone(self);
                async move {
                    let body = shard.describe_topic(request.name).await;
                    respond(&header, &body, Vec::new())
                }
                .boxed_local()
            }
            ApiKey::Produce => self.admit_produce(frame).await?,
            ApiKey::PeerAuthBegin => {
                let request: PeerAuthBeginRequest = frame.decode_body().map_err(invalid)?;
                ready(respond(
                    &header,
                    &self.peer_auth_begin(request, context),
                    Vec::new(),
                ))
            }
            ApiKey::PeerAuthProve => {
                let request: PeerAuthProveRequest = frame.decode_body().map_err(invalid)?;
                ready(respond(
                    &header,
                    &self.peer_auth_prove(request, context),
                    Vec::new(),
                ))
            }
            ApiKey::ReplicaFetch => {
                let request: ReplicaFetchRequest = frame.decode_body().map_err(invalid)?;
                // A peer fetches as itself only: its progress moves the high watermark.
                if context.authenticated_peer() != Some(request.replica_id) {
                    return Err(PartitionError::new(
                        ErrorCode::AuthenticationFailed,
                        format!(
                            "replica {} fetched on a connection authenticated as {:?}",
                            request.replica_id,
                            context.authenticated_peer()
                        ),
                    ));
                }
                let local = self
                    .local_partition(&request.topic, request.partition)
                    .filter(|p| p.topic_id == request.topic_id)
                    .ok_or_else(|| self.missing(&request.topic, request.partition))?;
                let wait_ms_max = self.shared.config.request_wait_ms_max;
                let fetch_bytes_max = self.shared.config.fetch_bytes_max;
                async move {
                    let mut request = request;
                    request.max_bytes = request.max_bytes.min(fetch_bytes_max as u32).max(1);
                    let (response, data) = local.replica_fetch(&request, wait_ms_max).await;
                    let payload = data
                        .filter(|d| d.bytes > 0)
                        .map(OutPayload::Local)
                        .into_iter()
                        .collect();
                    respond(&header, &response, payload)
                }
                .boxed_local()
            }
            ApiKey::ApplyTopic => {
                let request: ApplyTopicRequest = frame.decode_body().map_err(invalid)?;
                let shard = Rc::clone(self);
                async move {
                    let result = shard.apply_topic(request).await;
                    respond(&header, &result, Vec::new())
                }
                .boxed_local()
            }
            ApiKey::Fetch => {
                let request: FetchRequest = frame.decode_body().map_err(invalid)?;
                if request.partitions.is_empty()
                    || request.partitions.len() > PARTITIONS_PER_REQUEST_MAX
                {
                    return Err(PartitionError::new(
                        ErrorCode::InvalidRequest,
                        format!("a fetch names 1..={PARTITIONS_PER_REQUEST_MAX} partitions"),
                    ));
                }
                let shard = Rc::clone(self);
                async move { shard.fetch(header, request).await }.boxed_local()
            }
            ApiKey::ListOffsets => {
                let request: ListOffsetsRequest = frame.decode_body().map_err(invalid)?;
                if request.partitions.len() > PARTITIONS_PER_REQUEST_MAX {
                    return Err(PartitionError::new(
                        ErrorCode::InvalidRequest,
                        format!("at most {PARTITIONS_PER_REQUEST_MAX} partitions per request"),
                    ));
                }
                let shard = Rc::clone(self);
                async move {
                    let mut partitions = Vec::new();
                    for p in request.partitions {
                        let result = match shard.owner(&request.topic, p.partition) {
                            Err(e) => Err(e),
                            Ok(owner) => match shard
                                .to_shard(
                                    owner,
                                    ShardRequest::ListOffset {
                                        topic: request.topic.clone(),
                                        partition: p.partition,
                                        spec: p.spec,
                                    },
                                )
                                .await
                            {
                                Some(ShardReply::Offset(result)) => result,
                                _ => Err(unavailable("owner shard is not answering")),
                            },
                        };
                        partitions.push(match result {
                            Ok(offset) => ListOffsetsPartitionResponse {
                                partition: p.partition,
                                error: 0,
                                message: String::new(),
                                offset,
                            },
                            Err(e) => {
                                shard.shared.metrics.record_error(
                                    shard.id,
                                    ApiKey::ListOffsets,
                                    e.code,
                                );
                                ListOffsetsPartitionResponse {
                                    partition: p.partition,
                                    error: e.code as u16,
                                    message: e.message,
                                    offset: 0,
                                }
                            }
                        });
                    }
                    respond(&header, &ListOffsetsResponse { partitions }, Vec::new())
                }
                .boxed_local()
            }
        })
    }

    /// Replaces the stored leader, epoch and ISR of every partition this broker hosts with its
    /// replica's live view (the stored metadata only knows the initial assignment: epoch 0 and
    /// every replica in sync). A leader reports its ISR; a follower reports the epoch it
    /// follows and the ISR it knows (none: the leader's metadata has it).
    async fn fill_live_partition_state(self: &Rc<Self>, response: &mut MetadataResponse) {
        let me = self.shared.config.broker_id;
        for topic in &mut response.topics {
            for partition in &mut topic.partitions {
                if !partition.replicas.contains(&me) {
                    continue;
                }
                let reply = self
                    .to_shard(
                        partition.shard,
                        ShardRequest::Describe {
                            topic: topic.name.clone(),
                            partition: partition.partition,
                        },
                    )
                    .await;
                if let Some(ShardReply::Described(Ok(live))) = reply {
                    partition.leader = live.leader;
                    partition.leader_epoch = live.leader_epoch;
                    partition.isr = live.isr;
                }
            }
        }
    }

    /// The metadata; asked on the internal listener, it names the shards' internal ports (a
    /// follower then fetches straight from the owner shard).
    fn metadata_response(
        &self,
        request: MetadataRequest,
        listener: ListenerKind,
    ) -> MetadataResponse {
        let config = &self.shared.config;
        let host = config.advertised_host();
        let port = parse_host_port("listen", &config.listen).map_or(0, |(_, p)| p);
        let (shard_addresses, host) = match listener {
            ListenerKind::Client => (&self.shared.shard_addresses, host),
            ListenerKind::Internal => (
                &self.shared.internal_shard_addresses,
                config.internal_host().unwrap_or(host),
            ),
        };
        let shards = shard_addresses
            .iter()
            .enumerate()
            .filter_map(|(shard, address)| {
                address.get().map(|a| ShardAddress {
                    shard: shard as u32,
                    host: host.clone(),
                    port: a.port(),
                })
            })
            .collect();
        let metadata = self.metadata.borrow();
        let describe = |name: &str, topic: &TopicMeta| TopicMetadata {
            name: name.to_string(),
            error: 0,
            partitions: topic
                .partitions
                .iter()
                .enumerate()
                .map(|(i, p)| PartitionMetadata {
                    partition: i as u32,
                    leader: p.leader,
                    leader_epoch: p.leader_epoch,
                    shard: p.shard,
                    replicas: p.replicas.clone(),
                    isr: p.replicas.clone(),
                })
                .collect(),
        };
        let topics = match request.topics {
            None => metadata
                .topics
                .iter()
                .map(|(name, topic)| describe(name, topic))
                .collect(),
            Some(names) => names
                .iter()
                .take(PARTITIONS_PER_REQUEST_MAX)
                .map(|name| match metadata.topics.get(name) {
                    Some(topic) => describe(name, topic),
                    None => TopicMetadata {
                        name: name.clone(),
                        error: ErrorCode::UnknownTopic as u16,
                        partitions: Vec::new(),
                    },
                })
                .collect(),
        };
        let mut brokers = vec![BrokerInfo {
            broker_id: config.broker_id,
            host: config.advertised_host(),
            port,
            shards,
        }];
        // Other brokers of the cluster: their client address (their own metadata names their
        // shards).
        for broker in config
            .cluster
            .brokers
            .iter()
            .filter(|b| b.id != config.broker_id)
        {
            if let Ok((host, port)) = parse_host_port("address", &broker.address) {
                brokers.push(BrokerInfo {
                    broker_id: broker.id,
                    host,
                    port,
                    shards: Vec::new(),
                });
            }
        }
        MetadataResponse { brokers, topics }
    }

    async fn describe_topic(self: &Rc<Self>, name: String) -> DescribeTopicResponse {
        let topic = self.metadata.borrow().topics.get(&name).cloned();
        let Some(topic) = topic else {
            return DescribeTopicResponse {
                error: ErrorCode::UnknownTopic as u16,
                message: format!("topic {name:?} does not exist"),
                topic: None,
            };
        };
        let mut partitions = Vec::new();
        for (index, meta) in topic.partitions.iter().enumerate() {
            let reply = self
                .to_shard(
                    meta.shard,
                    ShardRequest::Describe {
                        topic: name.clone(),
                        partition: index as u32,
                    },
                )
                .await;
            partitions.push(match reply {
                Some(ShardReply::Described(Ok(description))) => description,
                other => {
                    let error = match other {
                        Some(ShardReply::Described(Err(e))) => e.code,
                        _ => ErrorCode::ShuttingDown,
                    };
                    PartitionDescription {
                        partition: index as u32,
                        leader: meta.leader,
                        leader_epoch: meta.leader_epoch,
                        shard: meta.shard,
                        replicas: meta.replicas.clone(),
                        isr: Vec::new(),
                        log_start_offset: 0,
                        high_watermark: 0,
                        end_offset: 0,
                        error: error as u16,
                    }
                }
            });
        }
        DescribeTopicResponse {
            error: 0,
            message: String::new(),
            topic: Some(TopicDescription {
                name,
                topic_id: topic.topic_id,
                replication_factor: topic.replication_factor,
                configs: topic.config.entries(),
                partitions,
            }),
        }
    }

    async fn admit_produce(self: &Rc<Self>, frame: &mut Frame) -> Result<Pending, PartitionError> {
        let header = frame.header;
        if self.shared.disk_full.load(Ordering::Acquire) {
            return Err(PartitionError::new(
                ErrorCode::DiskFull,
                format!(
                    "the data directory has less than disk_free_bytes_min = {} bytes free; \
                     nothing was appended",
                    self.shared.config.disk_free_bytes_min
                ),
            ));
        }
        let request: ProduceRequest = frame
            .decode_body()
            .map_err(|e| PartitionError::new(ErrorCode::InvalidRequest, e.to_string()))?;
        if request.partitions.is_empty() || request.partitions.len() > PARTITIONS_PER_REQUEST_MAX {
            return Err(PartitionError::new(
                ErrorCode::InvalidRequest,
                format!("a produce names 1..={PARTITIONS_PER_REQUEST_MAX} partitions"),
            ));
        }
        let ranges = payload_ranges(
            frame.payload().len(),
            request.partitions.iter().map(|p| p.batch_bytes as usize),
        )
        .map_err(|message| PartitionError::new(ErrorCode::InvalidRequest, message))?;
        let wait_ms = u64::from(request.timeout_ms).min(self.shared.config.request_wait_ms_max);
        let deadline = Instant::now() + Duration::from_millis(wait_ms);
        let acks = request.acks;
        let mut parts: Vec<LocalBoxFuture<'static, ProducePartitionResponse>> = Vec::new();
        for (p, range) in request.partitions.iter().zip(ranges) {
            let partition = p.partition;
            let admitted: Result<RemoteAdmitted, PartitionError> =
                match self.owner(&request.topic, partition) {
                    Err(e) => Err(e),
                    Ok(owner) if owner == self.id => {
                        match self.local_partition(&request.topic, partition) {
                            None => Err(self.missing(&request.topic, partition)),
                            Some(local) => local
                                .produce(&mut frame.payload_mut()[range], acks, wait_ms)
                                .await
                                .map(|a| RemoteAdmitted {
                                    base_offset: a.base_offset.0,
                                    last_offset: a.last_offset.0,
                                    leader_epoch: a.leader_epoch.0,
                                    completion: a.completion,
                                }),
                        }
                    }
                    Ok(owner) => {
                        let mut batches = FrameBuf::with_capacity(range.len());
                        batches.extend_from_slice(&frame.payload()[range]);
                        match self
                            .to_shard(
                                owner,
                                ShardRequest::Produce {
                                    topic: request.topic.clone(),
                                    partition,
                                    acks,
                                    timeout_ms: wait_ms,
                                    batches,
                                },
                            )
                            .await
                        {
                            Some(ShardReply::Admitted(result)) => result,
                            _ => Err(unavailable("owner shard is not answering")),
                        }
                    }
                };
            if let Err(e) = &admitted {
                self.shared
                    .metrics
                    .record_error(self.id, ApiKey::Produce, e.code);
            }
            parts.push(complete_produce(partition, admitted, deadline).boxed_local());
        }
        if acks == Acks::None {
            // Fire and forget: no response at all.
            return Ok(futures_util::future::ready(None).boxed_local());
        }
        Ok(async move {
            let partitions = join_all(parts).await;
            respond(&header, &ProduceResponse { partitions }, Vec::new())
        }
        .boxed_local())
    }

    async fn read_partition(
        self: &Rc<Self>,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: usize,
    ) -> Result<(u64, u64, OutPayload, usize), PartitionError> {
        let owner = self.owner(topic, partition)?;
        if owner == self.id {
            let Some(local) = self.local_partition(topic, partition) else {
                return Err(self.missing(topic, partition));
            };
            let data = read_local(&local, offset, max_bytes).await?;
            let bytes = data.bytes;
            return Ok((
                data.high_watermark.0,
                data.log_start_offset.0,
                OutPayload::Local(data),
                bytes,
            ));
        }
        match self
            .to_shard(
                owner,
                ShardRequest::Fetch {
                    topic: topic.to_string(),
                    partition,
                    offset,
                    max_bytes,
                },
            )
            .await
        {
            Some(ShardReply::Fetched(Ok((hw, start, bytes)))) => {
                let len = bytes.len();
                Ok((hw, start, OutPayload::Owned(bytes), len))
            }
            Some(ShardReply::Fetched(Err(e))) => Err(e),
            _ => Err(unavailable("owner shard is not answering")),
        }
    }

    async fn wait_partition(
        self: Rc<Self>,
        topic: String,
        partition: u32,
        offset: u64,
        deadline: Instant,
    ) {
        let Ok(owner) = self.owner(&topic, partition) else {
            return;
        };
        let _ = self
            .to_shard(
                owner,
                ShardRequest::WaitForData {
                    topic,
                    partition,
                    offset,
                    deadline,
                },
            )
            .await;
    }

    async fn fetch(self: Rc<Self>, header: FrameHeader, request: FetchRequest) -> Option<Outgoing> {
        let config = &self.shared.config;
        let wait_ms = u64::from(request.max_wait_ms).min(config.request_wait_ms_max);
        let deadline = Instant::now() + Duration::from_millis(wait_ms);
        let budget = (request.max_bytes as usize).min(config.fetch_bytes_max);
        // More than the response may carry could never be reached.
        let min_bytes = (request.min_bytes as usize).clamp(1, budget.max(1));
        // Bounded by the deadline: every pass either answers or waits for new data.
        loop {
            let mut partitions = Vec::with_capacity(request.partitions.len());
            let mut payload = Vec::new();
            let mut total = 0usize;
            let mut errors = false;
            for p in &request.partitions {
                let max_bytes = (p.max_bytes as usize).min(budget.saturating_sub(total));
                let result = if max_bytes == 0 && total > 0 {
                    // Budget spent: report the partition without data.
                    Ok((0, 0, None, 0))
                } else {
                    self.read_partition(&p.topic, p.partition, p.fetch_offset, max_bytes.max(1))
                        .await
                        .map(|(hw, start, out, len)| (hw, start, Some(out), len))
                };
                match result {
                    Ok((hw, start, out, len)) => {
                        total += len;
                        partitions.push(FetchPartitionResponse {
                            topic: p.topic.clone(),
                            partition: p.partition,
                            error: 0,
                            message: String::new(),
                            high_watermark: hw,
                            log_start_offset: start,
                            batch_bytes: len as u32,
                        });
                        if let Some(out) = out {
                            if len > 0 {
                                payload.push(out);
                            }
                        }
                    }
                    Err(e) => {
                        errors = true;
                        self.shared
                            .metrics
                            .record_error(self.id, ApiKey::Fetch, e.code);
                        partitions.push(FetchPartitionResponse {
                            topic: p.topic.clone(),
                            partition: p.partition,
                            error: e.code as u16,
                            message: e.message,
                            high_watermark: 0,
                            log_start_offset: 0,
                            batch_bytes: 0,
                        });
                    }
                }
            }
            if total >= min_bytes || errors || Instant::now() >= deadline || self.stopping.get() {
                return respond(&header, &FetchResponse { partitions }, payload);
            }
            drop(payload);
            // Wait for data beyond what this pass saw: waiting for the fetch offset alone
            // would return at once while the high watermark is past it (fewer bytes than
            // `min_bytes` already there), and the loop would spin until the deadline.
            let waits: Vec<LocalBoxFuture<'static, ()>> = request
                .partitions
                .iter()
                .zip(&partitions)
                .map(|(p, seen)| {
                    let beyond = p.fetch_offset.max(seen.high_watermark);
                    Rc::clone(&self)
                        .wait_partition(p.topic.clone(), p.partition, beyond, deadline)
                        .boxed_local()
                })
                .collect();
            futures_lite::future::or(
                async {
                    select_all(waits).await;
                },
                self.stop_signal(),
            )
            .await;
        }
    }
}

async fn read_local(
    partition: &Partition,
    offset: u64,
    max_bytes: usize,
) -> Result<FetchData, PartitionError> {
    partition.read(Offset(offset), max_bytes).await
}

async fn complete_produce(
    partition: u32,
    admitted: Result<RemoteAdmitted, PartitionError>,
    deadline: Instant,
) -> ProducePartitionResponse {
    let failed = |e: PartitionError| ProducePartitionResponse {
        partition,
        error: e.code as u16,
        message: e.message,
        base_offset: 0,
        last_offset: 0,
        leader_epoch: 0,
        replicas_durable: 0,
    };
    let admitted = match admitted {
        Ok(admitted) => admitted,
        Err(e) => return failed(e),
    };
    let durable = match admitted.completion {
        None => Ok(None),
        Some(completion) => {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match glommio::timer::timeout(remaining, async { Ok(completion.await) }).await {
                Ok(Ok(result)) => result.map(Some),
                Ok(Err(_canceled)) => Err(unavailable(
                    "the partition closed before the write was durable",
                )),
                Err(_) => Err(PartitionError::new(
                    ErrorCode::RequestTimeout,
                    "the acks were not reached in time; the write may or may not be durable",
                )),
            }
        }
    };
    match durable {
        Ok(ack) => ProducePartitionResponse {
            partition,
            error: 0,
            message: String::new(),
            base_offset: admitted.base_offset,
            last_offset: admitted.last_offset,
            leader_epoch: admitted.leader_epoch,
            replicas_durable: ack.map_or(0, |a| u16::from(a.durable_replicas)),
        },
        Err(e) => failed(e),
    }
}

fn topic_error(code: ErrorCode, message: impl Into<String>) -> TopicResult {
    TopicResult {
        error: code as u16,
        message: message.into(),
    }
}

fn ready(outgoing: Option<Outgoing>) -> Pending {
    futures_util::future::ready(outgoing).boxed_local()
}

/// A response frame; an encoding failure (a body over the limit) becomes a frame-level error.
pub fn respond<T: Message>(
    header: &FrameHeader,
    body: &T,
    payload: Vec<OutPayload>,
) -> Option<Outgoing> {
    let slices: Vec<&[u8]> = payload.iter().map(OutPayload::bytes).collect();
    match encode_frame(FrameKind::response(header, ErrorCode::None), body, &slices) {
        Ok(head) => Some(Outgoing { head, payload }),
        Err(error) => error_frame(header, ErrorCode::Unknown, error.to_string()),
    }
}

pub fn error_frame(header: &FrameHeader, code: ErrorCode, message: String) -> Option<Outgoing> {
    encode_frame(
        FrameKind::response(header, code),
        &ErrorBody { message },
        &[],
    )
    .ok()
    .map(|head| Outgoing {
        head,
        payload: Vec::new(),
    })
}
