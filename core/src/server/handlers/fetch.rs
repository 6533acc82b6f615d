//! Fetch: reads each named partition (on its owner shard) below the high watermark within the
//! request's byte budget, and long-polls until `min_bytes` arrive or the wait ends.

use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_util::future::{select_all, LocalBoxFuture};
use futures_util::FutureExt;
use wharf_storage::Offset;

use super::{unavailable, PARTITIONS_PER_REQUEST_MAX};
use crate::protocol::*;
use crate::server::connection::{OutPayload, Outgoing, Pending};
use crate::server::dispatch::respond;
use crate::server::partition::{FetchData, Partition, PartitionError};
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
}

pub(crate) async fn read_local(
    partition: &Partition,
    offset: u64,
    max_bytes: usize,
) -> Result<FetchData, PartitionError> {
    partition.read(Offset(offset), max_bytes).await
}
