//! ListOffsets: each partition's earliest or latest offset, or the first at a timestamp, asked
//! of its owner shard.

use std::rc::Rc;

use futures_util::FutureExt;

use super::{unavailable, PARTITIONS_PER_REQUEST_MAX};
use crate::protocol::*;
use crate::server::connection::Pending;
use crate::server::dispatch::respond;
use crate::server::partition::PartitionError;
use crate::server::shard::{Shard, ShardReply, ShardRequest};

impl Shard {
    pub(crate) fn admit_list_offsets(
        self: &Rc<Self>,
        header: FrameHeader,
        request: ListOffsetsRequest,
    ) -> Result<Pending, PartitionError> {
        if request.partitions.len() > PARTITIONS_PER_REQUEST_MAX {
            return Err(PartitionError::new(
                ErrorCode::InvalidRequest,
                format!("at most {PARTITIONS_PER_REQUEST_MAX} partitions per request"),
            ));
        }
        let shard = Rc::clone(self);
        Ok(async move {
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
                        shard
                            .shared
                            .metrics
                            .record_error(shard.id, ApiKey::ListOffsets, e.code);
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
        .boxed_local())
    }
}
