//! ReplicaFetch (inter-broker): a follower fetches from the partition this shard leads; the
//! partition's replica decides what to serve (`Partition::replica_fetch`).

use std::rc::Rc;

use futures_util::FutureExt;

use crate::protocol::*;
use crate::server::connection::{ConnectionContext, OutPayload, Pending};
use crate::server::dispatch::respond;
use crate::server::partition::PartitionError;
use crate::server::shard::Shard;

impl Shard {
    pub(crate) fn admit_replica_fetch(
        self: &Rc<Self>,
        header: FrameHeader,
        request: ReplicaFetchRequest,
        context: &ConnectionContext,
    ) -> Result<Pending, PartitionError> {
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
        Ok(async move {
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
        .boxed_local())
    }
}
