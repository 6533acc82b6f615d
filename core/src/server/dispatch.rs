//! A request from a connection, in arrival order: the API key and version are checked, then the
//! trust boundary (`check_access`), then the body is decoded and handed to its API's handler
//! (`super::handlers`, `super::control`), which returns the future of the response. The
//! response helpers (`respond`, `error_frame`) are here too.

use std::rc::Rc;
use std::time::Instant;

use futures_util::FutureExt;

use super::connection::{ConnectionContext, ListenerKind, OutPayload, Outgoing, Pending};
use super::groups::GroupOp;
use super::partition::PartitionError;
use super::queues::QueueOp;
use super::shard::{Shard, ShardReply, ShardRequest};
use crate::protocol::*;

impl Shard {
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
        // Counted in the shard's queue depth until answered (the read-replica selector's load),
        // unless what is left after admission is waiting on a condition, not work: a produce
        // was appended at admission and waits for its acks; replica fetches, queue acquires
        // and group heartbeats are long polls; the controller's traffic is a heartbeat. (A
        // consumer fetch counts until it parks: `ShardLoad::park_fetch`.)
        let waits = matches!(
            api,
            ApiKey::Produce
                | ApiKey::ReplicaFetch
                | ApiKey::QueueAcquire
                | ApiKey::GroupHeartbeat
                | ApiKey::ControllerRaft
                | ApiKey::BrokerHeartbeat
        );
        let counted = (!waits).then(|| self.load.begin_request());
        async move {
            let response = pending.await;
            latency.observe(started.elapsed().as_secs_f64());
            drop(counted);
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
                ready(respond(&header, &self.versions(), Vec::new()))
            }
            ApiKey::Metadata => {
                let request: MetadataRequest = frame.decode_body().map_err(invalid)?;
                self.check_metadata_fresh()?;
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
                refuse_internal(&request.name, "created")?;
                let shard = Rc::clone(self);
                async move {
                    let result = shard.create_topic(request).await;
                    respond(&header, &result, Vec::new())
                }
                .boxed_local()
            }
            ApiKey::DeleteTopic => {
                let request: DeleteTopicRequest = frame.decode_body().map_err(invalid)?;
                refuse_internal(&request.name, "deleted")?;
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
                self.admit_replica_fetch(header, request, context)?
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
                self.admit_fetch(header, request)?
            }
            ApiKey::ListOffsets => {
                let request: ListOffsetsRequest = frame.decode_body().map_err(invalid)?;
                self.admit_list_offsets(header, request)?
            }
            ApiKey::ControllerRaft => {
                let request: ControllerRaftRequest = frame.decode_body().map_err(invalid)?;
                check_peer_is(context, request.from, "sent Raft messages")?;
                self.on_controller_shard(header, ShardRequest::ControllerRaft(request))
            }
            ApiKey::BrokerHeartbeat => {
                let request: BrokerHeartbeatRequest = frame.decode_body().map_err(invalid)?;
                // A heartbeat keeps a broker's session (and its leadership) alive: only the
                // broker itself may send it.
                check_peer_is(context, request.broker_id, "heartbeated")?;
                self.on_controller_shard(header, ShardRequest::BrokerHeartbeat(request))
            }
            ApiKey::ControllerCommand => {
                let request: ControllerCommandRequest = frame.decode_body().map_err(invalid)?;
                self.on_controller_shard(header, ShardRequest::ControllerCommand(request))
            }
            ApiKey::ClusterStatus => {
                let _request: ClusterStatusRequest = frame.decode_body().map_err(invalid)?;
                self.on_controller_shard(header, ShardRequest::ClusterStatus)
            }
            ApiKey::InitProducerId => {
                let request: InitProducerIdRequest = frame.decode_body().map_err(invalid)?;
                let response = self.init_producer_id(&request);
                ready(respond(&header, &response, Vec::new()))
            }
            ApiKey::GroupHeartbeat => {
                let request: GroupHeartbeatRequest = frame.decode_body().map_err(invalid)?;
                self.admit_group(header, GroupOp::Heartbeat(request))
            }
            ApiKey::OffsetCommit => {
                let request: OffsetCommitRequest = frame.decode_body().map_err(invalid)?;
                self.admit_group(header, GroupOp::Commit(request))
            }
            ApiKey::OffsetFetch => {
                let request: OffsetFetchRequest = frame.decode_body().map_err(invalid)?;
                self.admit_group(header, GroupOp::Fetch(request))
            }
            ApiKey::DescribeGroup => {
                let request: DescribeGroupRequest = frame.decode_body().map_err(invalid)?;
                self.admit_group(header, GroupOp::Describe(request))
            }
            ApiKey::ListGroups => {
                let _request: ListGroupsRequest = frame.decode_body().map_err(invalid)?;
                self.admit_group(header, GroupOp::List)
            }
            ApiKey::DeleteGroup => {
                let request: DeleteGroupRequest = frame.decode_body().map_err(invalid)?;
                self.admit_group(header, GroupOp::Delete(request))
            }
            ApiKey::CreateQueue => {
                let request: CreateQueueRequest = frame.decode_body().map_err(invalid)?;
                self.admit_queue(header, QueueOp::Create(request))
            }
            ApiKey::QueueAcquire => {
                let request: QueueAcquireRequest = frame.decode_body().map_err(invalid)?;
                self.admit_queue(header, QueueOp::Acquire(request))
            }
            ApiKey::QueueSettle => {
                let request: QueueSettleRequest = frame.decode_body().map_err(invalid)?;
                self.admit_queue(header, QueueOp::Settle(request))
            }
            ApiKey::DescribeQueue => {
                let request: DescribeQueueRequest = frame.decode_body().map_err(invalid)?;
                self.admit_queue(header, QueueOp::Describe(request))
            }
            ApiKey::ListQueues => {
                let _request: ListQueuesRequest = frame.decode_body().map_err(invalid)?;
                self.admit_queue(header, QueueOp::List)
            }
            ApiKey::DescribeReaders => {
                let request: DescribeReadersRequest = frame.decode_body().map_err(invalid)?;
                let shard = Rc::clone(self);
                async move {
                    match shard.describe_readers(request).await {
                        Ok(response) => respond(&header, &response, Vec::new()),
                        Err(e) => error_frame(&header, e.code, e.message),
                    }
                }
                .boxed_local()
            }
        })
    }

    /// Controller mode: a broker cut off from the controller (its session lease ended) does not
    /// answer metadata — it may still name itself leader of partitions that moved — so clients
    /// ask another broker.
    fn check_metadata_fresh(&self) -> Result<(), PartitionError> {
        if !self.controller_mode() {
            return Ok(());
        }
        let lease = self
            .shared
            .controller_lease_until_ms
            .load(std::sync::atomic::Ordering::Acquire);
        // Refused only once the lease ended a whole session ago: by then the controller has
        // fenced this broker for certain, while a heartbeat delayed by load (CI's saturated
        // 2-core cluster figures) does not turn every client away.
        let grace_ms = self.shared.config.cluster.broker_session_timeout_ms;
        if super::partition::monotonic_ms() < lease.saturating_add(grace_ms) {
            return Ok(());
        }
        Err(PartitionError::new(
            ErrorCode::BrokerUnavailable,
            "this broker has no live session with the controller; its metadata may be stale: \
             ask another broker",
        ))
    }

    /// `InitProducerId`: a new id from this run's block, or the next epoch of the id the
    /// producer holds (an epoch past the largest gets a new id instead).
    fn init_producer_id(&self, request: &InitProducerIdRequest) -> InitProducerIdResponse {
        let mut response = InitProducerIdResponse {
            error: 0,
            message: String::new(),
            producer_id: 0,
            producer_epoch: 0,
        };
        if let Some(id) = request.producer_id {
            if let Some(epoch) = request.producer_epoch.checked_add(1) {
                if id != wharf_storage::ProducerId::NONE.0 {
                    response.producer_id = id;
                    response.producer_epoch = epoch;
                    return response;
                }
            }
        }
        match self.shared.producer_ids.allocate() {
            Some(id) => response.producer_id = id,
            None => {
                response.error = ErrorCode::LimitReached as u16;
                response.message = format!(
                    "this broker handed out its {} producer ids of this run; ask another broker \
                     or restart it",
                    super::producer_ids::IDS_PER_RUN
                );
            }
        }
        response
    }

    /// Controller APIs are served by shard 0 (where the controller and its client live).
    fn on_controller_shard(self: &Rc<Self>, header: FrameHeader, request: ShardRequest) -> Pending {
        let shard = Rc::clone(self);
        async move {
            match shard.to_shard(0, request).await {
                Some(ShardReply::ControllerRaft(body)) => respond(&header, &body, Vec::new()),
                Some(ShardReply::BrokerHeartbeat(body)) => respond(&header, &body, Vec::new()),
                Some(ShardReply::ControllerCommand(body)) => respond(&header, &body, Vec::new()),
                Some(ShardReply::ClusterStatus(body)) => respond(&header, &body, Vec::new()),
                _ => error_frame(
                    &header,
                    ErrorCode::ShuttingDown,
                    "shard 0 is not answering".to_string(),
                ),
            }
        }
        .boxed_local()
    }
}

/// The request names broker `claimed` as its sender: it must be the authenticated peer.
fn check_peer_is(
    context: &ConnectionContext,
    claimed: u32,
    what: &str,
) -> Result<(), PartitionError> {
    if context.authenticated_peer() == Some(claimed) {
        return Ok(());
    }
    Err(PartitionError::new(
        ErrorCode::AuthenticationFailed,
        format!(
            "broker {claimed} {what} on a connection authenticated as {:?}",
            context.authenticated_peer()
        ),
    ))
}

pub(crate) fn topic_error(code: ErrorCode, message: impl Into<String>) -> TopicResult {
    TopicResult {
        error: code as u16,
        message: message.into(),
    }
}

pub(crate) fn ready(outgoing: Option<Outgoing>) -> Pending {
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

/// Internal topics (the offsets topic) are the brokers' own: a client that could delete or
/// write one could wipe or corrupt every consumer group.
pub(crate) fn refuse_internal(topic: &str, what: &str) -> Result<(), PartitionError> {
    if is_internal_topic(topic) {
        return Err(PartitionError::new(
            ErrorCode::InvalidTopic,
            format!("{topic:?} is an internal topic (names starting with \"__\"): it cannot be {what} by clients"),
        ));
    }
    Ok(())
}
