//! Fetch: reads each named partition (on its owner shard) below the high watermark within the
//! request's byte budget, and long-polls until `min_bytes` arrive or the wait ends.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{select_all, LocalBoxFuture};
use futures_util::FutureExt;

use super::{unavailable, PARTITIONS_PER_REQUEST_MAX};
use crate::protocol::*;
use crate::server::connection::{OutPayload, Outgoing, Pending};
use crate::server::dispatch::respond;
use crate::server::partition::PartitionError;
use crate::server::read_replicas::{ReadAsk, Served};
use crate::server::shard::{Shard, ShardReply, ShardRequest};

impl Shard {
    pub(crate) fn admit_fetch(
        self: &Rc<Self>,
        header: FrameHeader,
        request: FetchRequest,
    ) -> Result<Pending, PartitionError> {
        if request.partitions.is_empty() || request.partitions.len() > PARTITIONS_PER_REQUEST_MAX {
            return Err(PartitionError::new(
                ErrorCode::InvalidRequest,
                format!("a fetch names 1..={PARTITIONS_PER_REQUEST_MAX} partitions"),
            ));
        }
        if request.reader_id.len() > READER_ID_BYTES_MAX || request.rack.len() > RACK_BYTES_MAX {
            return Err(PartitionError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "a fetch's reader_id is at most {READER_ID_BYTES_MAX} bytes and its rack at \
                     most {RACK_BYTES_MAX}"
                ),
            ));
        }
        if let Some(p) = request
            .partitions
            .iter()
            .find(|p| p.avoid_replicas.len() > AVOID_REPLICAS_MAX)
        {
            return Err(PartitionError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "partition {}/{} asks to avoid {} replicas; at most {AVOID_REPLICAS_MAX}",
                    p.topic,
                    p.partition,
                    p.avoid_replicas.len()
                ),
            ));
        }
        // They become metric labels and CLI output: printable ASCII without quotes or braces.
        let printable = |text: &str| {
            text.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:/@".contains(&b))
        };
        if !printable(&request.reader_id) || !printable(&request.rack) {
            return Err(PartitionError::new(
                ErrorCode::InvalidRequest,
                "a fetch's reader_id and rack use only ASCII letters, digits and -_.:/@",
            ));
        }
        let shard = Rc::clone(self);
        Ok(async move { shard.fetch(header, request).await }.boxed_local())
    }

    async fn fetch(self: Rc<Self>, header: FrameHeader, request: FetchRequest) -> Option<Outgoing> {
        let config = &self.shared.config;
        let wait_ms = u64::from(request.max_wait_ms).min(config.request_wait_ms_max);
        let deadline = Instant::now() + Duration::from_millis(wait_ms);
        let budget = (request.max_bytes as usize).min(config.fetch_bytes_max);
        // More than the response may carry could never be reached.
        let min_bytes = (request.min_bytes as usize).clamp(1, budget.max(1));
        let reader_id: Arc<str> = Arc::from(request.reader_id.as_str());
        let rack: Arc<str> = Arc::from(request.rack.as_str());
        // Bounded by the deadline: every pass either answers or waits for new data.
        loop {
            let mut partitions = Vec::with_capacity(request.partitions.len());
            let mut payload = Vec::new();
            let mut total = 0usize;
            // An error or a redirect is answered at once: the consumer acts on it.
            let mut answer_now = false;
            for p in &request.partitions {
                let max_bytes = (p.max_bytes as usize).min(budget.saturating_sub(total));
                let ask = ReadAsk {
                    topic: p.topic.clone(),
                    partition: p.partition,
                    offset: p.fetch_offset,
                    max_bytes: max_bytes.max(1),
                    leader_epoch: p.leader_epoch,
                    read_replica: p.read_replica,
                    avoid_replicas: p.avoid_replicas.clone(),
                    reader_id: Arc::clone(&reader_id),
                    rack: Arc::clone(&rack),
                };
                let result = if max_bytes == 0 && total > 0 {
                    // Budget spent: report the partition without data.
                    Ok(None)
                } else {
                    self.read_partition(ask).await.map(Some)
                };
                match result {
                    Ok(served) => {
                        let (hw, start, epoch, redirect, len) =
                            served.as_ref().map_or((0, 0, 0, None, 0), |s| {
                                (
                                    s.high_watermark,
                                    s.log_start_offset,
                                    s.leader_epoch,
                                    s.redirect,
                                    s.bytes,
                                )
                            });
                        answer_now |= redirect.is_some();
                        total += len;
                        partitions.push(FetchPartitionResponse {
                            topic: p.topic.clone(),
                            partition: p.partition,
                            error: 0,
                            message: String::new(),
                            high_watermark: hw,
                            log_start_offset: start,
                            batch_bytes: len as u32,
                            leader_epoch: epoch,
                            preferred_read_replica: redirect.map(|(broker, _)| broker),
                            read_lease_ms: redirect.map_or(0, |(_, lease_ms)| lease_ms),
                        });
                        if let Some(out) = served.and_then(|s| s.data) {
                            if len > 0 {
                                payload.push(out);
                            }
                        }
                    }
                    Err(e) => {
                        answer_now = true;
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
                            leader_epoch: 0,
                            preferred_read_replica: None,
                            read_lease_ms: 0,
                        });
                    }
                }
            }
            if total >= min_bytes || answer_now || Instant::now() >= deadline || self.stopping.get()
            {
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
            let _parked = self.load.park_fetch();
            futures_lite::future::or(
                async {
                    select_all(waits).await;
                },
                self.stop_signal(),
            )
            .await;
        }
    }

    /// One partition of a consumer fetch, served by its owner shard (here or over the mesh).
    async fn read_partition(
        self: &Rc<Self>,
        ask: ReadAsk,
    ) -> Result<Served<OutPayload>, PartitionError> {
        let owner = self.owner(&ask.topic, ask.partition)?;
        if owner == self.id {
            let Some(local) = self.local_partition(&ask.topic, ask.partition) else {
                return Err(self.missing(&ask.topic, ask.partition));
            };
            return Ok(self.serve_read(&local, &ask).await?.map(OutPayload::Local));
        }
        match self.to_shard(owner, ShardRequest::Fetch(ask)).await {
            Some(ShardReply::Fetched(Ok(served))) => Ok(served.map(OutPayload::Owned)),
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
}
