//! Controller mode, broker side (shard 0 of every broker): the heartbeat to the controller
//! leader, the metadata image it carries back, and applying that image to this broker
//! (topics opened and closed, leaders and ISRs handed to the owning shards, the lease that
//! bounds how long a leader may acknowledge without the controller).
//!
//! The heartbeat is the broker's session: the controller fences a broker whose heartbeats stop
//! for `broker_session_timeout_ms`. Each answered heartbeat renews a lease measured from when
//! it was *sent*, minus one heartbeat interval: it always ends before the controller can fence
//! this broker, so a leader cut off from the controller stops acknowledging before another
//! leader of its partitions can be elected.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use glommio::channels::local_channel::{LocalReceiver, LocalSender};
use serde::{Deserialize, Serialize};
use wharf_controller::records::{ClusterImage, PartitionRecord, Record};
use wharf_replication::IsrRejection;
use wharf_storage::Epoch;

use super::host::ControllerHost;
use super::lease::PendingLeases;
use crate::client::{decode, Connection};
use crate::metadata::{self, BrokerMetadata, PartitionMeta, TopicMeta};
use crate::peer_auth::PeerCredentials;
use crate::protocol::*;
use crate::server::partition::{monotonic_ms, IsrProposal, PartitionState};
use crate::server::shard::{Shard, ShardRequest};

/// `PartitionMeta::leader` of a partition without a leader (every ISR member fenced).
pub const NO_LEADER: u32 = u32::MAX;
/// Heartbeats sent in a row without a pause while looking for the controller leader.
const HEARTBEAT_RETRIES_MAX: usize = 6;
/// Backoff between attempts at an apply round that failed (doubling up to the max).
const APPLY_RETRY_INITIAL_MS: u64 = 50;
const APPLY_RETRY_MAX_MS: u64 = 2_000;

/// What a heartbeat answer carries: the records after the broker's applied index, or the
/// whole image when it is too far behind (or the log was compacted).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MetadataDelta {
    Records(Vec<(u64, Record)>),
    Snapshot(ClusterImage),
}

/// A command for the controller leader (`ApiKey::ControllerCommand`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Command {
    CreateTopic {
        name: String,
        partitions: u32,
        replication_factor: u16,
        min_insync_replicas: u16,
        unclean_leader_election: bool,
        config: BTreeMap<String, String>,
    },
    DeleteTopic {
        name: String,
    },
    AlterPartition {
        topic: String,
        partition: u32,
        leader: u32,
        leader_epoch: u64,
        partition_epoch: u64,
        new_isr: Vec<u32>,
    },
    /// Moves leadership off broker `id` (one step; repeated until it leads nothing).
    ControlledShutdown {
        id: u32,
        incarnation: u64,
    },
}

/// The broker's side of the controller protocol (lives on shard 0).
pub struct Cluster {
    broker_id: u32,
    /// New at each start; raised when the controller fenced this broker (re-registration).
    incarnation: Cell<u64>,
    pub voters: Vec<u32>,
    internal_addresses: Rc<HashMap<u32, String>>,
    client_address: String,
    internal_address: String,
    peer: Option<PeerCredentials>,
    frame_bytes_max: usize,
    heartbeat_interval_ms: u64,
    session_timeout_ms: u64,
    /// The metadata as applied by this broker.
    pub image: RefCell<ClusterImage>,
    leader_hint: Cell<Option<u32>>,
    next_voter: Cell<usize>,
    /// One connection per (broker, API): answers come in order per connection, so a command
    /// waiting for its commit must not hold heartbeats or Raft messages behind it.
    connections: RefCell<HashMap<(u32, ApiKey), Rc<Connection>>>,
    /// The controller voter running on this broker, if it is one.
    pub host: Option<Rc<ControllerHost>>,
    /// Controlled shutdown: asked, and confirmed by the controller (this broker leads nothing).
    pub shutting_down: Cell<bool>,
    pub shutdown_ready: Cell<bool>,
    /// Waiters for the reconciled index to reach a value (topic creation).
    applied_waiters: RefCell<Vec<(u64, futures_channel::oneshot::Sender<()>)>>,
    /// The image this broker has been brought to (topics opened and closed, partition states
    /// handed to the shards). It lags `image` while the apply task works: heartbeats go on
    /// meanwhile, so a slow apply (opening partitions on a saturated disk) cannot lapse the
    /// session and get every broker fenced (CI 2026-12-05).
    reconciled: RefCell<ClusterImage>,
    /// The leases heartbeat answers granted that still wait for the apply of the metadata
    /// that came with them.
    lease_pending: RefCell<PendingLeases>,
    /// Wakes the apply task (`metadata_apply_loop`); a full channel means it is woken already.
    apply_wake: LocalSender<()>,
}

impl Cluster {
    pub fn new(
        shard: &Shard,
        host: Option<Rc<ControllerHost>>,
        apply_wake: LocalSender<()>,
    ) -> Cluster {
        let config = &shard.shared.config;
        let me = config.broker_id;
        let own = config.cluster.brokers.iter().find(|b| b.id == me);
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        Cluster {
            broker_id: me,
            incarnation: Cell::new(incarnation),
            voters: config.cluster.controller_voters.clone(),
            internal_addresses: Rc::new(
                config
                    .cluster
                    .brokers
                    .iter()
                    .filter_map(|b| Some((b.id, b.internal_address.clone()?)))
                    .collect(),
            ),
            client_address: own.map_or_else(|| config.listen.clone(), |b| b.address.clone()),
            internal_address: own
                .and_then(|b| b.internal_address.clone())
                .unwrap_or_default(),
            peer: shard.peer_credentials(),
            frame_bytes_max: config.frame_bytes_max,
            heartbeat_interval_ms: config.cluster.broker_heartbeat_interval_ms,
            session_timeout_ms: config.cluster.broker_session_timeout_ms,
            image: RefCell::new(ClusterImage::new()),
            leader_hint: Cell::new(None),
            next_voter: Cell::new(0),
            connections: RefCell::new(HashMap::new()),
            host,
            shutting_down: Cell::new(false),
            shutdown_ready: Cell::new(false),
            applied_waiters: RefCell::new(Vec::new()),
            reconciled: RefCell::new(ClusterImage::new()),
            lease_pending: RefCell::new(PendingLeases::default()),
            apply_wake,
        }
    }

    pub fn leader_hint(&self) -> Option<u32> {
        match &self.host {
            Some(host) => host.leader_id().or(self.leader_hint.get()),
            None => self.leader_hint.get(),
        }
    }

    /// The controller log index this broker's image holds (what its heartbeats report).
    pub fn applied_index(&self) -> u64 {
        self.image.borrow().applied_index()
    }

    /// The index this broker has been brought to (its partitions opened, closed and told
    /// their state); at most `applied_index`.
    pub fn reconciled_index(&self) -> u64 {
        self.reconciled.borrow().applied_index()
    }

    /// The voter to ask next: the known leader, else the voters in turn.
    fn target(&self) -> u32 {
        if let Some(leader) = self.leader_hint() {
            return leader;
        }
        let i = self.next_voter.get();
        self.next_voter.set(i.wrapping_add(1));
        self.voters[i % self.voters.len()]
    }

    fn forget_leader(&self, broker: u32) {
        if self.leader_hint.get() == Some(broker) {
            self.leader_hint.set(None);
        }
        self.connections
            .borrow_mut()
            .retain(|(b, _), _| *b != broker);
    }

    /// One call to another broker's internal listener.
    pub async fn call<T: Message>(
        &self,
        broker: u32,
        api: ApiKey,
        body: &T,
        timeout_ms: u64,
    ) -> Result<Frame, String> {
        let existing = self.connections.borrow().get(&(broker, api)).cloned();
        let connection = match existing {
            Some(c) if !c.is_closed() => c,
            _ => {
                let address = self
                    .internal_addresses
                    .get(&broker)
                    .ok_or_else(|| format!("broker {broker} is not in cluster.brokers"))?;
                let connect =
                    Connection::connect_peer(address, self.frame_bytes_max, self.peer.as_ref());
                let connection = futures_lite::future::or(
                    async {
                        connect
                            .await
                            .map_err(|e| format!("connect to broker {broker}: {e}"))
                    },
                    async {
                        glommio::timer::sleep(Duration::from_millis(timeout_ms)).await;
                        Err(format!("connect to broker {broker}: timed out"))
                    },
                )
                .await?;
                self.connections
                    .borrow_mut()
                    .insert((broker, api), Rc::clone(&connection));
                connection
            }
        };
        match connection.call(api, body, Vec::new(), timeout_ms).await {
            Ok(frame) => Ok(frame),
            Err(error) => {
                self.connections.borrow_mut().remove(&(broker, api));
                Err(format!("broker {broker}: {error}"))
            }
        }
    }

    /// Sends a command to the controller leader, following `not_controller` hints.
    pub async fn command(
        &self,
        command: &Command,
        timeout_ms: u64,
    ) -> Result<ControllerCommandResponse, CommandError> {
        let command_json = serde_json::to_vec(command)
            .map_err(|e| CommandError(ErrorCode::InvalidRequest, e.to_string()))?;
        let deadline = monotonic_ms() + timeout_ms;
        let mut last = CommandError(ErrorCode::NotController, "no controller leader".into());
        for _ in 0..HEARTBEAT_RETRIES_MAX * 4 {
            let now = monotonic_ms();
            if now >= deadline {
                break;
            }
            let target = self.target();
            let response = if target == self.broker_id {
                match &self.host {
                    Some(host) => host.command(command.clone(), deadline - now).await,
                    None => return Err(last),
                }
            } else {
                let request = ControllerCommandRequest {
                    command_json: command_json.clone(),
                };
                match self
                    .call(target, ApiKey::ControllerCommand, &request, deadline - now)
                    .await
                    .and_then(|frame| {
                        decode::<ControllerCommandResponse>(&frame).map_err(|e| e.to_string())
                    }) {
                    Ok(response) => response,
                    Err(error) => {
                        self.forget_leader(target);
                        last = CommandError(ErrorCode::NotController, error);
                        glommio::timer::sleep(Duration::from_millis(self.heartbeat_interval_ms))
                            .await;
                        continue;
                    }
                }
            };
            match ErrorCode::from_u16(response.error) {
                ErrorCode::None => return Ok(response),
                ErrorCode::NotController => {
                    self.forget_leader(target);
                    self.leader_hint
                        .set(response.leader_hint.filter(|l| *l != target));
                    last = CommandError(ErrorCode::NotController, response.message);
                    if response.leader_hint.is_none() {
                        glommio::timer::sleep(Duration::from_millis(self.heartbeat_interval_ms))
                            .await;
                    }
                }
                code => return Err(CommandError(code, response.message)),
            }
        }
        Err(last)
    }

    /// Resolves once this broker has been brought to the metadata up to `index` (bounded by
    /// `timeout_ms`).
    pub async fn wait_applied(&self, index: u64, timeout_ms: u64) -> bool {
        if self.reconciled_index() >= index {
            return true;
        }
        let (wake, woken) = futures_channel::oneshot::channel();
        self.applied_waiters.borrow_mut().push((index, wake));
        glommio::timer::timeout(Duration::from_millis(timeout_ms), async {
            let _ = woken.await;
            Ok(())
        })
        .await
        .is_ok()
            && self.reconciled_index() >= index
    }

    fn wake_applied(&self) {
        let applied = self.reconciled_index();
        self.applied_waiters
            .borrow_mut()
            .retain_mut(|(index, _)| *index > applied);
    }
}

/// An error with the code to answer.
#[derive(Debug)]
pub struct CommandError(pub ErrorCode, pub String);

impl Shard {
    fn cluster(&self) -> Option<Rc<Cluster>> {
        self.cluster.borrow().clone()
    }

    /// Shard 0, controller mode: heartbeats to the controller leader until the shard stops.
    pub(crate) async fn heartbeat_loop(self: Rc<Self>) {
        let Some(cluster) = self.cluster() else {
            return;
        };
        let interval = Duration::from_millis(cluster.heartbeat_interval_ms);
        while !self.stopping.get() {
            let mut answered = false;
            for _ in 0..HEARTBEAT_RETRIES_MAX {
                match self.heartbeat_once(&cluster).await {
                    HeartbeatOutcome::Answered => {
                        answered = true;
                        break;
                    }
                    HeartbeatOutcome::TryAnother => continue,
                    HeartbeatOutcome::Wait => break,
                }
            }
            if !answered {
                tracing::debug!(
                    broker = cluster.broker_id,
                    "no controller answered this round"
                );
            }
            futures_lite::future::or(glommio::timer::sleep(interval), self.stop_signal()).await;
        }
    }

    async fn heartbeat_once(self: &Rc<Self>, cluster: &Rc<Cluster>) -> HeartbeatOutcome {
        let sent_at_ms = monotonic_ms();
        let request = BrokerHeartbeatRequest {
            broker_id: cluster.broker_id,
            incarnation: cluster.incarnation.get(),
            client_address: cluster.client_address.clone(),
            internal_address: cluster.internal_address.clone(),
            // What this broker has been brought to, not the image: the controller waits for
            // it before answering a topic create, so the partitions are open by then. Records
            // the image holds already come again and are skipped (`apply_records`).
            applied_index: cluster.reconciled_index(),
            shutting_down: cluster.shutting_down.get(),
        };
        let target = cluster.target();
        let timeout_ms = cluster.heartbeat_interval_ms * 2;
        let response = if target == cluster.broker_id {
            match &cluster.host {
                Some(host) => host.heartbeat(&request),
                None => return HeartbeatOutcome::TryAnother,
            }
        } else {
            let called = cluster
                .call(target, ApiKey::BrokerHeartbeat, &request, timeout_ms)
                .await
                .and_then(|f| decode::<BrokerHeartbeatResponse>(&f).map_err(|e| e.to_string()));
            match called {
                Ok(response) => response,
                Err(error) => {
                    tracing::debug!(target, %error, "heartbeat failed");
                    self.shared.metrics.controller.heartbeat_failures.inc();
                    cluster.forget_leader(target);
                    return HeartbeatOutcome::TryAnother;
                }
            }
        };
        match ErrorCode::from_u16(response.error) {
            ErrorCode::None => {}
            ErrorCode::NotController => {
                cluster.forget_leader(target);
                let hint = response.leader_hint.filter(|l| *l != target);
                cluster.leader_hint.set(hint);
                return if hint.is_some() {
                    HeartbeatOutcome::TryAnother
                } else {
                    HeartbeatOutcome::Wait
                };
            }
            ErrorCode::BrokerFenced => {
                // The controller fenced this incarnation (its session lapsed): register anew.
                let next = cluster.incarnation.get() + 1;
                tracing::warn!(
                    broker = cluster.broker_id,
                    incarnation = next,
                    "the controller fenced this broker; registering again"
                );
                cluster.incarnation.set(next);
                self.shared.metrics.controller.reregistrations.inc();
                return HeartbeatOutcome::TryAnother;
            }
            ErrorCode::BrokerUnavailable => {
                // The controller is committing this incarnation's registration.
                tracing::debug!(target, message = %response.message, "registering");
                cluster.leader_hint.set(Some(target));
                return HeartbeatOutcome::Wait;
            }
            _ => {
                tracing::warn!(target, code = response.error, message = %response.message, "heartbeat refused");
                return HeartbeatOutcome::Wait;
            }
        }
        cluster.leader_hint.set(Some(target));
        if !response.delta_json.is_empty() {
            let applied = serde_json::from_slice::<MetadataDelta>(&response.delta_json)
                .map_err(|e| format!("cannot decode the controller's metadata: {e}"))
                .and_then(|delta| apply_records(&cluster.image, delta));
            if let Err(error) = applied {
                // No lease without the metadata that came with it: this broker may have been
                // deposed by a record it could not apply. It keeps heartbeating (the
                // controller sends the records again) and stops acknowledging when its lease
                // ends.
                tracing::error!(%error, "cannot apply the controller's metadata; lease not renewed");
                self.shared.metrics.controller.heartbeat_failures.inc();
                return HeartbeatOutcome::Answered;
            }
        }
        // The lease waits for the metadata that came with it: a leader deposed by this answer
        // must become a follower before its lease could be renewed. The answer proves the
        // session alive as of `sent_at_ms`; the lease ends one heartbeat interval before the
        // controller could fence this broker. Bringing the broker to the new image runs in
        // its own task (`metadata_apply_loop`), which renews the lease once it got there;
        // the heartbeats go on meanwhile, so the session never waits for the disk.
        let until_ms =
            sent_at_ms + cluster.session_timeout_ms - cluster.heartbeat_interval_ms.max(1);
        cluster
            .lease_pending
            .borrow_mut()
            .push(cluster.applied_index(), until_ms);
        if cluster.reconciled_index() >= cluster.applied_index() {
            self.renew_pending_lease(cluster).await;
        } else {
            // Full: the apply task is woken already and takes the newest image.
            let _ = cluster.apply_wake.try_send(());
        }
        {
            let image = cluster.image.borrow();
            let metrics = &self.shared.metrics.controller;
            metrics.applied_index.set(image.applied_index() as i64);
            metrics
                .brokers_fenced
                .set(image.brokers().filter(|b| b.fenced).count() as i64);
            if let Some(host) = &cluster.host {
                let (term, commit) = host.raft_position();
                metrics.raft_term.set(term as i64);
                metrics.raft_commit_index.set(commit as i64);
                metrics
                    .is_leader
                    .set(i64::from(host.leader_id() == Some(cluster.broker_id)));
            }
        }
        HeartbeatOutcome::Answered
    }

    async fn broadcast_lease(self: &Rc<Self>, until_ms: u64) {
        let shards = self.shared.shards() as u32;
        let renewals =
            (0..shards).map(|shard| self.to_shard(shard, ShardRequest::Lease { until_ms }));
        join_all(renewals).await;
    }

    /// Renews the lease of this shard's partitions (`ShardRequest::Lease`).
    pub(crate) fn renew_leases(&self, until_ms: u64) {
        for partition in self.local_partitions() {
            if let Err(error) = partition.renew_lease(until_ms) {
                tracing::error!(topic = %partition.topic, partition = partition.index, %error, "cannot renew the lease");
            }
        }
    }

    /// Renews the pending lease if this broker has been brought to the metadata it needs.
    async fn renew_pending_lease(self: &Rc<Self>, cluster: &Cluster) {
        let reconciled = cluster.reconciled_index();
        let Some(until_ms) = cluster
            .lease_pending
            .borrow_mut()
            .take_satisfied(reconciled)
        else {
            return;
        };
        self.broadcast_lease(until_ms).await;
        self.shared
            .controller_lease_until_ms
            .fetch_max(until_ms, std::sync::atomic::Ordering::AcqRel);
        self.shared
            .controller_registered
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Shard 0, controller mode: brings this broker to the image the heartbeats applied, one
    /// round per wake-up (a round takes the newest image, so changes that arrive while one
    /// runs coalesce), and renews the lease that waited for it. Ends when the shard stops
    /// (after the controlled shutdown, which still needs it).
    pub(crate) async fn metadata_apply_loop(self: Rc<Self>, woken: LocalReceiver<()>) {
        let Some(cluster) = self.cluster() else {
            return;
        };
        loop {
            let woke = futures_lite::future::or(async { woken.recv().await.is_some() }, async {
                self.stop_signal().await;
                false
            })
            .await;
            if !woke || self.stopping.get() {
                return;
            }
            // Each round reaches the image as it was when the round began; a round is only
            // started while behind, and the image only grows, so this ends once caught up.
            let mut retry_ms = APPLY_RETRY_INITIAL_MS;
            while cluster.reconciled_index() < cluster.applied_index() {
                let before = cluster.reconciled.borrow().clone();
                let after = cluster.image.borrow().clone();
                let reconciled = {
                    let Ok(_permit) = self.admin_lock.acquire_permit(1).await else {
                        return;
                    };
                    self.reconcile(&before, &after).await
                };
                if let Err(error) = reconciled {
                    // Not brought to `after`: the round is retried from the same `before`
                    // (every step is idempotent), and no lease waiting for it is renewed, so
                    // a broker that cannot apply the metadata stops acknowledging instead of
                    // acting on a stale view. Retried with backoff until it works or the
                    // shard stops.
                    tracing::error!(%error, retry_ms, "cannot apply the controller's metadata; retrying");
                    let stopped = futures_lite::future::or(
                        async {
                            glommio::timer::sleep(Duration::from_millis(retry_ms)).await;
                            false
                        },
                        async {
                            self.stop_signal().await;
                            true
                        },
                    )
                    .await;
                    if stopped {
                        return;
                    }
                    retry_ms = (retry_ms * 2).min(APPLY_RETRY_MAX_MS);
                    continue;
                }
                retry_ms = APPLY_RETRY_INITIAL_MS;
                *cluster.reconciled.borrow_mut() = after;
                // The lease first: a topic create answered after `wake_applied` finds its
                // leaders acknowledging.
                self.renew_pending_lease(&cluster).await;
                cluster.wake_applied();
            }
        }
    }

    /// Shard 0: makes this broker match `after` (topics opened and closed, metadata stored and
    /// published, every changed partition's leader, epoch and ISR handed to its shard).
    pub(crate) async fn reconcile(
        self: &Rc<Self>,
        before: &ClusterImage,
        after: &ClusterImage,
    ) -> Result<(), String> {
        if let Some(delay_ms) = std::env::var(super::FAILPOINT_METADATA_APPLY_DELAY_MS)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            // Test-only failpoint: an apply as slow as opening partitions on a busy disk.
            glommio::timer::sleep(Duration::from_millis(delay_ms)).await;
        }
        let me = self.shared.config.broker_id;
        let shards = self.shared.shards() as u32;
        let current = (**self.metadata.borrow()).clone();
        let mut next = BrokerMetadata {
            topics: BTreeMap::new(),
            controller_managed: true,
            ..current.clone()
        };
        for topic in after.topics() {
            let name = topic.topic.name.clone();
            let topic_id = topic.topic_id;
            let kept = current.topics.get(&name).filter(|t| t.topic_id == topic_id);
            let entries: Vec<ConfigEntry> = topic
                .topic
                .config
                .iter()
                .map(|(key, value)| ConfigEntry {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect();
            let config = match kept {
                Some(kept) => kept.config.clone(),
                None => match self.shared.config.topic_defaults.with_entries(&entries) {
                    Ok(config) => config,
                    Err(error) => {
                        // The controller validated it, so only a config this broker's version
                        // does not know gets here. Failing the round would keep every other
                        // partition from its new state: this topic stays closed here (its
                        // clients get `unknown_topic` from this broker) and the rest applies.
                        tracing::error!(topic = %name, %error, "cannot open a topic with this config; skipped");
                        continue;
                    }
                },
            };
            let partitions = topic
                .partitions
                .iter()
                .map(|p| PartitionMeta {
                    shard: kept
                        .and_then(|k| k.partitions.get(p.partition as usize))
                        .map_or_else(
                            || metadata::placement(&name, p.partition, shards),
                            |k| k.shard,
                        ),
                    leader: p.leader.unwrap_or(NO_LEADER),
                    leader_epoch: epoch_u32(p.leader_epoch),
                    replicas: p.replicas.clone(),
                    isr: p.isr.clone(),
                })
                .collect();
            next.topics.insert(
                name,
                TopicMeta {
                    topic_id,
                    replication_factor: topic.topic.replication_factor,
                    config,
                    partitions,
                },
            );
        }
        let removed: Vec<(String, u64)> = current
            .topics
            .iter()
            .filter(|(name, t)| {
                next.topics
                    .get(*name)
                    .is_none_or(|n| n.topic_id != t.topic_id)
            })
            .map(|(name, t)| (name.clone(), t.topic_id))
            .collect();
        let added: Vec<String> = next
            .topics
            .iter()
            .filter(|(name, t)| {
                current
                    .topics
                    .get(*name)
                    .is_none_or(|c| c.topic_id != t.topic_id)
            })
            .map(|(name, _)| name.clone())
            .collect();
        // Partitions that stay get their new state first, then the lease that waited for this
        // image is renewed: a deposed leader is a follower by then, and the lease does not
        // wait for the metadata file's fsync or for new topics' files.
        self.hand_states(&state_changes(me, before, after, &next, &added, false))
            .await;
        if let Some(cluster) = self.cluster() {
            let early = cluster
                .lease_pending
                .borrow()
                .satisfied(after.applied_index());
            if let Some(until_ms) = early {
                self.broadcast_lease(until_ms).await;
            }
        }
        if next != current {
            self.persist(next.clone()).await?;
        }
        for (name, _) in &removed {
            self.close_on_shards(name).await;
        }
        for name in &added {
            let Some(topic) = next.topics.get(name) else {
                continue;
            };
            for message in self.open_on_shards(name, topic).await? {
                tracing::error!(topic = %name, %message, "cannot open a partition of a new topic");
            }
        }
        if next != current {
            self.publish(Arc::new(next.clone())).await;
        }
        self.hand_states(&state_changes(me, before, after, &next, &added, true))
            .await;
        // The files go in the background: unlinking gigabytes on a busy disk takes seconds, and
        // the lease waits for this apply (before it had a task of its own, the heartbeats did,
        // and every broker was fenced when a large topic was deleted under load, CI
        // 2026-12-05). The directory carries the topic id, so a topic created again with the
        // same name never meets it; a restart removes what is left.
        for (name, topic_id) in removed {
            let shard = Rc::clone(self);
            let spawned = glommio::spawn_local_into(
                async move { shard.remove_topic_files(&name, topic_id).await },
                self.queues.background,
            );
            match spawned {
                Ok(task) => {
                    task.detach();
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot start removing a deleted topic's files")
                }
            }
        }
        Ok(())
    }

    /// Hands each shard its partitions' new states (`ShardRequest::PartitionStates`).
    async fn hand_states(
        self: &Rc<Self>,
        by_shard: &BTreeMap<u32, Vec<(String, u32, PartitionState)>>,
    ) {
        let updates = by_shard.iter().map(|(shard, states)| {
            self.to_shard(*shard, ShardRequest::PartitionStates(states.clone()))
        });
        join_all(updates).await;
    }

    /// Applies the controller's state to this shard's partitions (`ShardRequest::PartitionStates`).
    pub(crate) fn apply_partition_states(&self, states: Vec<(String, u32, PartitionState)>) {
        for (topic, index, state) in states {
            let Some(partition) = self.local_partition(&topic, index) else {
                continue;
            };
            if let Err(error) = partition.apply_state(&state) {
                tracing::error!(%topic, partition = index, %error, "cannot apply the controller's state");
            }
        }
    }

    /// Every shard, controller mode: forwards its leaders' ISR proposals to shard 0, which
    /// sends them to the controller.
    pub(crate) async fn isr_proposal_loop(self: Rc<Self>) {
        while !self.stopping.get() {
            let proposals =
                futures_lite::future::or(async { Some(self.isr_proposals.take().await) }, async {
                    self.stop_signal().await;
                    None
                })
                .await;
            let Some(proposals) = proposals else {
                return;
            };
            if self.id == 0 {
                self.send_isr_proposals(proposals).await;
            } else {
                let _ = self
                    .to_shard(0, ShardRequest::AlterPartitions(proposals))
                    .await;
            }
        }
    }

    /// Shard 0: sends ISR proposals to the controller; a refusal goes back to the partition.
    pub(crate) async fn send_isr_proposals(self: &Rc<Self>, proposals: Vec<IsrProposal>) {
        let Some(cluster) = self.cluster() else {
            return;
        };
        for proposal in proposals {
            let command = Command::AlterPartition {
                topic: proposal.topic.clone(),
                partition: proposal.partition,
                leader: proposal.leader,
                leader_epoch: u64::from(proposal.leader_epoch.0),
                partition_epoch: proposal.partition_epoch,
                new_isr: proposal.isr.clone(),
            };
            let timeout_ms = cluster.session_timeout_ms;
            let reason = match cluster.command(&command, timeout_ms).await {
                Ok(_) => continue, // The committed change arrives with the metadata.
                Err(CommandError(ErrorCode::FencedLeaderEpoch, _)) => {
                    IsrRejection::FencedLeaderEpoch
                }
                Err(CommandError(ErrorCode::InvalidPartitionEpoch, _)) => {
                    IsrRejection::StalePartitionEpoch
                }
                Err(CommandError(ErrorCode::IneligibleReplica, _)) => {
                    IsrRejection::IneligibleReplica
                }
                Err(CommandError(code, message)) => {
                    tracing::debug!(topic = %proposal.topic, partition = proposal.partition, code = code.name(), %message, "ISR proposal not applied");
                    IsrRejection::NotApplied
                }
            };
            let shard = self
                .metadata
                .borrow()
                .topics
                .get(&proposal.topic)
                .and_then(|t| t.partitions.get(proposal.partition as usize))
                .map(|p| p.shard);
            if let Some(shard) = shard {
                let _ = self
                    .to_shard(
                        shard,
                        ShardRequest::IsrRejected {
                            topic: proposal.topic,
                            partition: proposal.partition,
                            partition_epoch: proposal.partition_epoch,
                            reason,
                        },
                    )
                    .await;
            }
        }
    }

    pub(crate) fn reject_isr_proposal(
        &self,
        topic: &str,
        index: u32,
        partition_epoch: u64,
        reason: IsrRejection,
    ) {
        if let Some(partition) = self.local_partition(topic, index) {
            if let Err(error) = partition.reject_isr_proposal(partition_epoch, reason) {
                tracing::error!(%topic, partition = index, %error, "cannot apply the controller's refusal");
            }
        }
    }

    /// Shard 0, SIGTERM in controller mode: asks the controller to move this broker's
    /// leadership away and waits (bounded) until it has, so a rolling restart fails no
    /// request. The broker keeps serving meanwhile (as a follower once leadership moved).
    pub(crate) async fn controlled_shutdown(self: &Rc<Self>) {
        let Some(cluster) = self.cluster() else {
            return;
        };
        cluster.shutting_down.set(true);
        let timeout_ms = self.shared.config.cluster.controlled_shutdown_timeout_ms;
        let deadline = monotonic_ms() + timeout_ms;
        tracing::info!("controlled shutdown: moving leadership off this broker");
        let mut done = false;
        // Bounded by the deadline; each step waits for a commit or a heartbeat interval.
        while !done && monotonic_ms() < deadline {
            let command = Command::ControlledShutdown {
                id: cluster.broker_id,
                incarnation: cluster.incarnation.get(),
            };
            let left_ms = deadline.saturating_sub(monotonic_ms()).max(1);
            match cluster.command(&command, left_ms).await {
                Ok(response) if !response.still_leading => {
                    // Fetch the move now and wait until it is applied, so this broker stops
                    // leading at once.
                    let _ = self.heartbeat_once(&cluster).await;
                    let left_ms = deadline.saturating_sub(monotonic_ms()).max(1);
                    done = cluster.wait_applied(cluster.applied_index(), left_ms).await;
                }
                Ok(_) => {
                    glommio::timer::sleep(Duration::from_millis(cluster.heartbeat_interval_ms))
                        .await
                }
                Err(CommandError(code, message)) => {
                    tracing::debug!(code = code.name(), %message, "controlled shutdown step failed");
                    glommio::timer::sleep(Duration::from_millis(cluster.heartbeat_interval_ms))
                        .await;
                }
            }
        }
        if let Some(host) = &cluster.host {
            // The active controller goes last: a new one is elected at once instead of the
            // brokers' sessions and leases waiting out an election timeout.
            host.step_down(cluster.session_timeout_ms).await;
        }
        cluster.shutdown_ready.set(done);
        if done {
            tracing::info!("controlled shutdown: this broker leads nothing; stopping");
        } else {
            tracing::warn!(timeout_ms, "controlled shutdown timed out; stopping anyway");
        }
    }

    /// `ClusterStatus`: the brokers as this broker's applied metadata has them, and the
    /// controller as it knows it.
    pub(crate) fn cluster_status(&self) -> ClusterStatusResponse {
        let Some(cluster) = self.cluster() else {
            return ClusterStatusResponse {
                error: ErrorCode::NotController as u16,
                message: "this broker runs without a controller (cluster.controller_voters is \
                          empty): a static cluster"
                    .to_string(),
                voters: Vec::new(),
                controller_leader: None,
                applied_index: 0,
                raft_term: 0,
                raft_commit_index: 0,
                brokers: Vec::new(),
            };
        };
        let image = cluster.image.borrow();
        let brokers = image
            .brokers()
            .map(|b| BrokerStatus {
                broker_id: b.id,
                incarnation: b.incarnation,
                client_address: b.client_address.clone(),
                state: if b.fenced {
                    "fenced"
                } else if b.shutting_down {
                    "shutting_down"
                } else {
                    "alive"
                }
                .to_string(),
                leaders: image
                    .partitions()
                    .filter(|p| p.leader == Some(b.id))
                    .count() as u32,
            })
            .collect();
        let (raft_term, raft_commit_index) = cluster
            .host
            .as_ref()
            .map_or((0, 0), |host| host.raft_position());
        ClusterStatusResponse {
            error: 0,
            message: String::new(),
            voters: cluster.voters.clone(),
            controller_leader: cluster.leader_hint(),
            applied_index: image.applied_index(),
            raft_term,
            raft_commit_index,
            brokers,
        }
    }
}

enum HeartbeatOutcome {
    Answered,
    TryAnother,
    Wait,
}

/// The local partitions whose state `after` changes, by owning shard: those of the topics
/// `added` (all of theirs) when `fresh`, else those of the topics that stay.
fn state_changes(
    me: u32,
    before: &ClusterImage,
    after: &ClusterImage,
    next: &BrokerMetadata,
    added: &[String],
    fresh: bool,
) -> BTreeMap<u32, Vec<(String, u32, PartitionState)>> {
    let mut by_shard: BTreeMap<u32, Vec<(String, u32, PartitionState)>> = BTreeMap::new();
    for topic in after.topics() {
        let name = &topic.topic.name;
        if added.contains(name) != fresh {
            continue;
        }
        let Some(meta) = next.topics.get(name) else {
            continue;
        };
        for p in &topic.partitions {
            if !p.replicas.contains(&me) {
                continue;
            }
            let unchanged = !fresh
                && before
                    .partition(name, p.partition)
                    .is_some_and(|old| same_state(old, p));
            if unchanged {
                continue;
            }
            let Some(shard) = meta.partitions.get(p.partition as usize).map(|m| m.shard) else {
                continue;
            };
            by_shard.entry(shard).or_default().push((
                name.clone(),
                p.partition,
                PartitionState {
                    leader: p.leader,
                    leader_epoch: Epoch(epoch_u32(p.leader_epoch)),
                    partition_epoch: p.partition_epoch,
                    isr: p.isr.clone(),
                },
            ));
        }
    }
    by_shard
}

/// Applies a heartbeat answer's records (or snapshot) to the in-memory image: pure and quick,
/// so it runs in the heartbeat loop; bringing the broker to the image is the apply task's.
fn apply_records(image: &RefCell<ClusterImage>, delta: MetadataDelta) -> Result<(), String> {
    let mut image = image.borrow_mut();
    match delta {
        MetadataDelta::Snapshot(snapshot) => {
            if snapshot.applied_index() > image.applied_index() {
                *image = snapshot;
            }
        }
        MetadataDelta::Records(records) => {
            // Records of one Raft entry share its index: skip whole entries applied before
            // this delta, never a later record of the entry being applied.
            let applied_before = image.applied_index();
            for (index, record) in records {
                if index <= applied_before {
                    continue;
                }
                image
                    .apply(index, &record)
                    .map_err(|e| format!("metadata record {index}: {e}"))?;
            }
        }
    }
    Ok(())
}

fn same_state(a: &PartitionRecord, b: &PartitionRecord) -> bool {
    a.leader == b.leader
        && a.leader_epoch == b.leader_epoch
        && a.partition_epoch == b.partition_epoch
        && a.isr == b.isr
}

/// Leader epochs travel as u32 in batches and on the wire; the controller counts in u64.
fn epoch_u32(epoch: u64) -> u32 {
    u32::try_from(epoch).expect("leader epochs stay below 2^32")
}
