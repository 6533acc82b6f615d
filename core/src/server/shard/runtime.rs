//! A shard's life: start-up (joining the mesh, recovering its partitions, binding its
//! listeners, spawning its loops), the accept loop with its connection limits, the heartbeat and
//! replica tick loops, the disk-space guard, and the graceful stop.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt;
use glommio::channels::channel_mesh::{Full, MeshBuilder};
use glommio::net::TcpListener;
use glommio::sync::{Gate, Semaphore};
use glommio::{Latency, Shares};
use wharf_storage::Epoch;

use super::{Envelope, Queues, Shard};
use crate::config::parse_host_port;
use crate::metadata::{self, BrokerMetadata, TopicMeta};
use crate::server::connection::{self, ListenerKind, RequestBudget};
use crate::server::metrics::{QueueLabels, ShardMetrics};
use crate::server::partition::{IsrProposals, Partition};
use crate::server::Shared;

const HEARTBEAT_MS: u64 = 250;
/// Environment variable (tests only): shard 0 panics this many milliseconds after start.
pub const FAILPOINT_SHARD_PANIC_MS: &str = "WHARF_FAILPOINT_SHARD_PANIC_MS";
/// How often replicas get a tick: the resolution of ack deadlines and ISR lag.
const REPLICA_TICK_MS: u64 = 20;

/// What a partition that cannot be opened does to the caller.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenFailure {
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

/// Runs shard `id`: starts it, reports the start on `started`, serves until `stopped`, then
/// drains connections and closes its partitions.
pub(crate) async fn run(
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
    if shard.controller_mode() {
        shard.finish_controlled_shutdown().await;
    }
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
        isr_proposals: Rc::new(IsrProposals::default()),
        cluster: RefCell::new(None),
        coordinator: Default::default(),
        queue_coordinator: Default::default(),
        load: Default::default(),
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
        let expiring = Rc::clone(&shard);
        glommio::spawn_local_into(expiring.group_expiry_loop(), shard.queues.background)
            .map_err(|e| format!("spawn: {e}"))?
            .detach();
        let queue_ticking = Rc::clone(&shard);
        glommio::spawn_local_into(queue_ticking.queue_tick_loop(), shard.queues.background)
            .map_err(|e| format!("spawn: {e}"))?
            .detach();
    }
    if shard.controller_mode() {
        let proposing = Rc::clone(&shard);
        glommio::spawn_local_into(
            async move { proposing.isr_proposal_loop().await },
            shard.queues.replication,
        )
        .map_err(|e| format!("spawn: {e}"))?
        .detach();
        if id == 0 {
            shard.start_cluster().await?;
        }
    }
    if id == 0 {
        let admin = crate::server::admin::bind(&shard.shared.config.admin_listen)?;
        let shared = Arc::clone(&shard.shared);
        let stop = shard.stop_signal();
        glommio::spawn_local_into(
            crate::server::admin::serve(admin, shared, stop),
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
        let _ = executor.executor_stats();
        let mut sampled_at = Instant::now();
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
                // The read-replica selector's load: every task's run time (not sleeping or
                // spinning) over the wall time since the last sample.
                let now = Instant::now();
                let runtime = executor.executor_stats().executor_runtime();
                let elapsed_s = now.duration_since(sampled_at).as_secs_f64();
                self.load.sample(runtime.as_secs_f64(), elapsed_s);
                for partition in self.local_partitions() {
                    partition.sample_ingest(elapsed_s);
                    self.tidy_readers(&partition, now);
                }
                sampled_at = now;
                let load = self.load.snapshot();
                self.metrics
                    .busy_permille
                    .set(i64::from(load.busy_permille));
                self.metrics
                    .consumer_egress_bytes_per_second
                    .set(load.egress_bytes_per_s as i64);
                self.metrics.queue_depth.set(i64::from(load.queue_depth));
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

    pub(crate) async fn open_partitions(
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
            let open_already = self
                .partitions
                .borrow()
                .get(name)
                .and_then(|slots| slots.get(index as usize).cloned().flatten())
                .is_some_and(|p| p.topic_id == topic.topic_id);
            if open_already {
                // A retried metadata apply: the log has its one owner already.
                continue;
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
            if let Some(replaced) = slots[index as usize].replace(partition) {
                // An older topic of the same name: its readers (and the shard's count of
                // them) go with it.
                replaced
                    .readers
                    .borrow_mut()
                    .clear(&self.reader_book(&replaced));
            }
        }
        Ok(())
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
}
