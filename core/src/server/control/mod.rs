//! Cluster metadata: everything that changes it or applies it. Changes are serialized on
//! shard 0 (`on_shard_zero`, under `admin_lock`), persisted to the data directory, then
//! published to every shard; `topics` has the topic life cycle (create, apply, delete). The
//! controller will live here too.

mod topics;

use std::rc::Rc;
use std::sync::Arc;

use futures_util::future::join_all;

use super::dispatch::topic_error;
use super::shard::{Shard, ShardReply, ShardRequest};
use crate::metadata::{self, BrokerMetadata};
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

    /// Closes this shard's partitions of a deleted topic (`ShardRequest::ClosePartitions`).
    pub(crate) async fn close_partitions(&self, topic: &str) {
        let removed = self.partitions.borrow_mut().remove(topic);
        for partition in removed.into_iter().flatten().flatten() {
            partition.close().await;
            partition.metrics.remove(&self.shared.metrics);
        }
    }
}
