//! Follower: the fetcher task sends the fetches the replica asks for to the leader's owning
//! shard, checks the batches of each reply and feeds the reply back to the replica (which asks
//! for them to be appended: `Output::AppendFetched`).

use std::rc::Rc;

use glommio::channels::local_channel::LocalReceiver;
use wharf_replication::driver::Fetched;
use wharf_replication::{BrokerId, FetchError, FetchReply, FetchRequest, Input, Role};
use wharf_storage::{Epoch, Offset};

use super::{monotonic_ms, Partition};
use crate::protocol::{ErrorCode, ReplicaFetchRequest, ReplicaFetchResponse};

/// How long connecting to a leader (handshake and metadata included) may take.
const CONNECT_TIMEOUT_MS: u64 = 2_000;

impl Partition {
    /// Follower: sends the fetches the replica asks for, one at a time, to the leader's owning
    /// shard, and feeds the answers back.
    pub(super) async fn run_fetcher(self: Rc<Self>, wake: LocalReceiver<()>) {
        let mut connection: Option<Rc<crate::client::Connection>> = None;
        // The leader `connection` goes to: a new leader (failover) needs a new connection.
        let mut connected_to: Option<BrokerId> = None;
        loop {
            if self.closing.get() {
                return;
            }
            let request = self.outgoing_fetch.borrow_mut().take();
            let Some(request) = request else {
                if wake.recv().await.is_none() {
                    return;
                }
                continue;
            };
            let Role::Follower { leader } = self.replica.borrow().role() else {
                continue;
            };
            if connected_to != Some(leader) {
                connection = None;
                connected_to = Some(leader);
            }
            // A role change abandons the fetch: the old leader may be gone or hanging.
            let role_changed = self.role_changed();
            let fetched = futures_lite::future::or(
                self.fetch_once(&mut connection, leader, request),
                async {
                    let _ = role_changed.await;
                    Err("the leader changed".to_string())
                },
            )
            .await;
            if let Err(error) = fetched {
                tracing::debug!(topic = %self.topic, partition = self.index, leader, %error, "replica fetch failed");
                connection = None;
                if let Err(error) = self.step(Input::FetchFailed {
                    fetch_id: request.fetch_id,
                }) {
                    tracing::error!(%error, "replica step failed");
                }
            }
        }
    }

    async fn fetch_once(
        &self,
        connection: &mut Option<Rc<crate::client::Connection>>,
        leader: BrokerId,
        request: FetchRequest,
    ) -> Result<(), String> {
        use crate::client::{decode, Client, ClientConfig, Connection};
        use crate::protocol::ApiKey;
        let settings = &self.replication;
        if connection.as_ref().is_none_or(|c| c.is_closed()) {
            let address = settings
                .internal_addresses
                .get(&leader)
                .ok_or_else(|| format!("broker {leader} is not in cluster.brokers"))?
                .clone();
            let peer = settings.peer.clone();
            let frame_bytes_max = settings.frame_bytes_max;
            let topic = self.topic.clone();
            let index = self.index;
            // Bounded: a leader that stopped (SIGSTOP) still accepts connections.
            let connect = async move {
                let mut client_config = ClientConfig::new(address.clone());
                client_config.peer = peer.clone();
                client_config.request_timeout_ms = CONNECT_TIMEOUT_MS;
                let client = Client::connect(client_config)
                    .await
                    .map_err(|e| e.to_string())?;
                // The leader's own shard that owns the partition (its metadata names it),
                // else its shared internal listener, which forwards.
                let owner = client
                    .partition_address_on(&topic, index, leader)
                    .await
                    .map_err(|e| e.to_string())?
                    .unwrap_or(address);
                Connection::connect_peer(&owner, frame_bytes_max, peer.as_ref())
                    .await
                    .map_err(|e| e.to_string())
            };
            let connected = futures_lite::future::or(connect, async {
                glommio::timer::sleep(std::time::Duration::from_millis(CONNECT_TIMEOUT_MS)).await;
                Err(format!("connecting to broker {leader} timed out"))
            })
            .await?;
            *connection = Some(connected);
        }
        let Some(conn) = connection.as_ref() else {
            unreachable!("connected above");
        };
        let body = ReplicaFetchRequest {
            replica_id: settings.broker_id,
            topic: self.topic.clone(),
            topic_id: self.topic_id,
            partition: self.index,
            leader_epoch: request.leader_epoch.0,
            fetch_id: request.fetch_id,
            fetch_offset: request.fetch_offset.0,
            last_fetched_epoch: request.last_fetched_epoch.map(|e| e.0),
            durable_offset: request.durable_offset.0,
            high_watermark: self.high_watermark.get().0,
            max_wait_ms: if request.may_wait {
                settings.fetch_wait_ms as u32
            } else {
                0
            },
            max_bytes: settings.fetch_bytes_max as u32,
        };
        let timeout_ms = settings.fetch_wait_ms + 10_000;
        let frame = conn
            .call(ApiKey::ReplicaFetch, &body, Vec::new(), timeout_ms)
            .await
            .map_err(|e| e.to_string())?;
        let response: ReplicaFetchResponse = decode(&frame).map_err(|e| e.to_string())?;
        tracing::trace!(topic = %self.topic, partition = self.index, leader, fetch_id = request.fetch_id, offset = %request.fetch_offset, code = response.error, "replica fetch answered");
        let epoch = Epoch(response.leader_epoch);
        let leader_log_start = Offset(response.log_start_offset);
        let reply = match ErrorCode::from_u16(response.error) {
            ErrorCode::None => {
                self.corrupt_fetch_logged.set(None);
                self.leader_heard_ms.set(monotonic_ms().max(1));
                let payload = frame.payload();
                let payload_start = frame.bytes.len() - payload.len();
                if payload.len() < response.batch_bytes as usize {
                    return Err("replica fetch payload shorter than declared".to_string());
                }
                let payload = payload_start..payload_start + response.batch_bytes as usize;
                // A batch that fails its CRC is not appended: the next fetch asks again.
                let (fetched, batches) = Fetched::check(frame.bytes, payload);
                *self.fetched.borrow_mut() = Some(fetched);
                FetchReply::Data {
                    high_watermark: Offset(response.high_watermark),
                    log_start: Offset(response.log_start_offset),
                    batches,
                }
            }
            ErrorCode::FencedLeaderEpoch
                if !self.replication.controller_mode
                    && epoch > self.replica.borrow().leader_epoch() =>
            {
                // Static cluster: the leader restarted with a new epoch; follow it there.
                tracing::info!(topic = %self.topic, partition = self.index, leader, %epoch, "following the leader's new epoch");
                self.step(Input::BecomeFollower { epoch, leader })?;
                return Ok(());
            }
            ErrorCode::DivergingLog => FetchReply::Error(FetchError::Diverging {
                epoch: Epoch(response.diverging_epoch),
                end_offset: Offset(response.diverging_end_offset),
            }),
            ErrorCode::FencedLeaderEpoch => FetchReply::Error(FetchError::FencedEpoch {
                requested: request.leader_epoch,
                current: epoch,
            }),
            ErrorCode::OffsetOutOfRange => FetchReply::Error(FetchError::OffsetOutOfRange {
                requested: request.fetch_offset,
                log_start: Offset(response.log_start_offset),
            }),
            ErrorCode::CorruptData => {
                self.metrics.replica_fetch_corrupt.inc();
                // Once per range: the replica retries slowly (CORRUPT_FETCH_BACKOFF_MS), and
                // every retry fails the same way until the leader's copy is repaired.
                if self
                    .corrupt_fetch_logged
                    .replace(Some(request.fetch_offset))
                    != Some(request.fetch_offset)
                {
                    tracing::error!(topic = %self.topic, partition = self.index, leader, offset = %request.fetch_offset, message = %response.message, "the leader's copy of the data this follower needs is corrupt; retrying slowly until it is repaired");
                }
                FetchReply::Error(FetchError::CorruptData {
                    offset: request.fetch_offset,
                })
            }
            code => {
                tracing::debug!(topic = %self.topic, partition = self.index, code = code.name(), message = %response.message, "replica fetch refused");
                FetchReply::Error(FetchError::NotLeader { epoch })
            }
        };
        // The reply may be appended (`AppendFetched`, synchronously in this step): keep
        // maintenance out while it is.
        let Some(_guard) = self.shared().await else {
            return Err("partition closed".to_string());
        };
        let data = matches!(reply, FetchReply::Data { .. });
        self.step(Input::FetchReply {
            fetch_id: request.fetch_id,
            leader_epoch: epoch,
            reply,
        })?;
        drop(_guard);
        if data {
            self.follow_leader_log_start(leader_log_start).await;
        }
        Ok(())
    }
}
