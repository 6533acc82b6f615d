//! Produce: the batches of each partition are admitted (appended, on the owner shard) in
//! arrival order; the response waits for every partition's acks, up to the request's timeout.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::future::{join_all, LocalBoxFuture};
use futures_util::FutureExt;

use super::{unavailable, PARTITIONS_PER_REQUEST_MAX};
use crate::protocol::*;
use crate::server::connection::Pending;
use crate::server::dispatch::respond;
use crate::server::partition::PartitionError;
use crate::server::shard::{RemoteAdmitted, Shard, ShardReply, ShardRequest};

impl Shard {
    pub(crate) async fn admit_produce(
        self: &Rc<Self>,
        frame: &mut Frame,
    ) -> Result<Pending, PartitionError> {
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
        crate::server::dispatch::refuse_internal(&request.topic, "written")?;
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
        leader_epoch: e.current_leader.map_or(0, |(_, epoch)| epoch.0),
        replicas_durable: 0,
        current_leader: e.current_leader.map(|(leader, _)| leader),
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
            current_leader: None,
        },
        Err(e) => failed(e),
    }
}
