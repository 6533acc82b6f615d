//! Cluster metadata: everything that changes it or applies it. Changes are serialized on
//! shard 0 (`on_shard_zero`, under `admin_lock`), persisted to the data directory, then
//! published to every shard; `topics` has the topic life cycle (create, apply, delete). The
//! controller will live here too.

mod cluster;
mod host;
mod lease;
mod topics;

pub use cluster::{Cluster, Command, CommandError};
pub use host::ControllerHost;

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use super::dispatch::topic_error;
use super::shard::{Shard, ShardReply, ShardRequest};
use crate::metadata::{self, BrokerMetadata, TopicMeta};
use crate::protocol::*;

impl Shard {
    /// Forwards a metadata change to shard 0, which owns them.
    async fn on_shard_zero(self: &Rc<Self>, request: ShardRequest) -> TopicResult {
        match self.to_shard(0, request).await {
            Some(ShardReply::Topic(result)) => result,
            _ => topic_error(ErrorCode::ShuttingDown, "shard 0 is not answering"),
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

    /// Makes `metadata` this shard's view (`ShardRequest::Metadata`, sent by `publish`).
    pub(crate) fn install_metadata(&self, metadata: Arc<BrokerMetadata>) {
        *self.metadata.borrow_mut() = metadata;
    }

    /// Opens `topic`'s partitions on the shards that own them (each shard skips partitions this
    /// broker holds no replica of). `Err` when a shard does not answer; otherwise the errors of
    /// the partitions that could not open (empty when all did).
    async fn open_on_shards(
        self: &Rc<Self>,
        name: &str,
        topic: &TopicMeta,
    ) -> Result<Vec<String>, String> {
        let shards = self.shared.shards() as u32;
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
                    topic: name.to_string(),
                    meta: topic.clone(),
                    partitions: owned,
                },
            )
        });
        let mut failed = Vec::new();
        for reply in join_all(opens).await {
            match reply {
                Some(ShardReply::Done(Ok(()))) => {}
                Some(ShardReply::Done(Err(message))) => failed.push(message),
                _ => return Err("a shard is not answering".to_string()),
            }
        }
        Ok(failed)
    }

    /// Closes `name`'s partitions on every shard.
    async fn close_on_shards(self: &Rc<Self>, name: &str) {
        let shards = self.shared.shards() as u32;
        let closes = (0..shards).map(|shard| {
            self.to_shard(
                shard,
                ShardRequest::ClosePartitions {
                    topic: name.to_string(),
                },
            )
        });
        join_all(closes).await;
    }

    /// Removes a deleted topic's files (a failure is logged: the next start removes them, as
    /// the metadata no longer names the topic).
    async fn remove_topic_files(&self, name: &str, topic_id: u64) {
        if let Some(delay_ms) = std::env::var(FAILPOINT_TOPIC_REMOVE_DELAY_MS)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            // Test-only failpoint: a removal as slow as gigabytes on a busy disk.
            glommio::timer::sleep(Duration::from_millis(delay_ms)).await;
        }
        let data_dir = self.shared.config.data_dir.clone();
        let dir_name = name.to_string();
        let removed = glommio::executor()
            .spawn_blocking(move || metadata::remove_topic_dir(&data_dir, &dir_name, topic_id))
            .await;
        if let Err(message) = removed {
            tracing::warn!(topic = %name, %message, "could not remove the deleted topic's files yet");
        }
    }

    /// Closes this shard's partitions of a deleted topic (`ShardRequest::ClosePartitions`).
    pub(crate) async fn close_partitions(&self, topic: &str) {
        let removed = self.partitions.borrow_mut().remove(topic);
        for partition in removed.into_iter().flatten().flatten() {
            partition.close().await;
            partition.metrics.remove(&self.shared.metrics);
            partition
                .readers
                .borrow_mut()
                .clear(&self.reader_book(&partition));
        }
    }
}

/// Test-only failpoint: removing a deleted topic's files first waits this many ms.
pub const FAILPOINT_TOPIC_REMOVE_DELAY_MS: &str = "WHARF_FAILPOINT_TOPIC_REMOVE_DELAY_MS";

/// Test-only failpoint: bringing the broker to new controller metadata first waits this
/// many ms (as opening partitions can on a saturated disk).
pub const FAILPOINT_METADATA_APPLY_DELAY_MS: &str = "WHARF_FAILPOINT_METADATA_APPLY_DELAY_MS";

/// How long a create waits for this broker to apply the new topic after the controller
/// committed it.
const APPLY_WAIT_MS: u64 = 5_000;
/// How often the other shards look whether shard 0 finished the controlled shutdown.
const SHUTDOWN_POLL_MS: u64 = 10;

impl Shard {
    /// Shard 0, controller mode: starts the controller voter (on voters) and the heartbeat.
    pub(crate) async fn start_cluster(self: &Rc<Self>) -> Result<(), String> {
        let config = &self.shared.config;
        {
            let metadata = self.metadata.borrow();
            if !metadata.controller_managed && !metadata.topics.is_empty() {
                return Err(format!(
                    "{} holds {} topic(s) of a static cluster (no controller_voters); a controller \
                     cannot take them over (it would remove them): start this data directory \
                     without cluster.controller_voters, or with an empty data directory",
                    config.data_dir.display(),
                    metadata.topics.len()
                ));
            }
        }
        let host = if config.cluster.controller_voters.contains(&config.broker_id) {
            Some(ControllerHost::start(self).await?)
        } else {
            None
        };
        let (apply_wake, apply_woken) = glommio::channels::local_channel::new_bounded(1);
        let cluster = Rc::new(Cluster::new(self, host, apply_wake));
        *self.cluster.borrow_mut() = Some(Rc::clone(&cluster));
        let applying = Rc::clone(self);
        glommio::spawn_local_into(
            async move { applying.metadata_apply_loop(apply_woken).await },
            self.queues.replication,
        )
        .map_err(|e| format!("spawn: {e}"))?
        .detach();
        let beating = Rc::clone(self);
        glommio::spawn_local_into(
            async move { beating.heartbeat_loop().await },
            self.queues.replication,
        )
        .map_err(|e| format!("spawn: {e}"))?
        .detach();
        Ok(())
    }

    /// Controller mode, at SIGTERM: shard 0 moves this broker's leadership away; the other
    /// shards keep serving until it is done (bounded), so no partition stops early.
    pub(crate) async fn finish_controlled_shutdown(self: &Rc<Self>) {
        if self.id == 0 {
            self.controlled_shutdown().await;
            self.shared
                .controlled_shutdown_done
                .store(true, Ordering::Release);
            return;
        }
        let limit_ms = self.shared.config.cluster.controlled_shutdown_timeout_ms + 1_000;
        for _ in 0..limit_ms / SHUTDOWN_POLL_MS {
            if self.shared.controlled_shutdown_done.load(Ordering::Acquire) {
                return;
            }
            glommio::timer::sleep(Duration::from_millis(SHUTDOWN_POLL_MS)).await;
        }
    }

    /// Shard 0, controller mode: creates a topic through the controller and answers once this
    /// broker applied it (its partitions here are open).
    pub(crate) async fn create_topic_via_controller(
        self: &Rc<Self>,
        name: String,
        partitions: u32,
        replication_factor: u16,
        config: crate::config::TopicConfig,
    ) -> TopicResult {
        let command = Command::CreateTopic {
            name,
            partitions,
            replication_factor,
            min_insync_replicas: config.min_insync_replicas.min(replication_factor),
            unclean_leader_election: config.unclean_leader_election,
            config: config
                .entries()
                .into_iter()
                .map(|e| (e.key, e.value))
                .collect(),
        };
        self.run_controller_command(command).await
    }

    /// Shard 0: sends `command` to the controller leader and waits until this broker applied
    /// its records.
    pub(crate) async fn run_controller_command(self: &Rc<Self>, command: Command) -> TopicResult {
        let Some(cluster) = self.cluster.borrow().clone() else {
            return topic_error(
                ErrorCode::ShuttingDown,
                "the controller client is not running",
            );
        };
        match cluster.command(&command, APPLY_WAIT_MS).await {
            Ok(response) => {
                let index = response.committed_index;
                if cluster.wait_applied(index, APPLY_WAIT_MS).await {
                    TopicResult {
                        error: 0,
                        message: String::new(),
                    }
                } else {
                    topic_error(
                        ErrorCode::RequestTimeout,
                        format!(
                            "the controller committed the change at index {index}, but this \
                             broker has not applied it within {APPLY_WAIT_MS} ms"
                        ),
                    )
                }
            }
            Err(CommandError(code, message)) => topic_error(code, message),
        }
    }
}
