//! Queues, client side: creating and describing queue groups, and [`QueueMember`], a member
//! that acquires records under leases and settles each one (ack, nack, reject, extend).
//!
//! Every call goes to the queue group's coordinator (the leader of its `__queue_state`
//! partition) and is retried on retriable refusals, as the consumer-group calls are. A
//! settlement carries the delivery attempt it settles: one for a delivery whose lease expired
//! (the record went to another member) is refused with `stale_delivery` and changes nothing.

use std::collections::BTreeMap;
use std::rc::Rc;

use super::{decode, Client, ClientError};
use crate::protocol::*;

impl Client {
    /// Defines queue group `group` on `topic` (and creates its dead-letter topic). Creating
    /// it again with the same settings succeeds; other settings are `queue_already_exists`.
    pub async fn create_queue(
        &self,
        group: &str,
        topic: &str,
        settings: QueueSettings,
    ) -> Result<(), ClientError> {
        let _: GroupResult = self
            .coordinator_call_on(
                QUEUE_STATE_TOPIC,
                ApiKey::CreateQueue,
                group,
                &CreateQueueRequest {
                    group: group.to_string(),
                    topic: topic.to_string(),
                    settings,
                },
                0,
            )
            .await?;
        Ok(())
    }

    pub async fn describe_queue(&self, group: &str) -> Result<DescribeQueueResponse, ClientError> {
        self.coordinator_call_on(
            QUEUE_STATE_TOPIC,
            ApiKey::DescribeQueue,
            group,
            &DescribeQueueRequest {
                group: group.to_string(),
            },
            0,
        )
        .await
    }

    /// Every queue group the cluster's coordinators hold (each broker answers for its own).
    pub async fn list_queues(&self) -> Result<Vec<QueueListing>, ClientError> {
        let metadata = self.refresh_metadata().await?;
        let mut queues = BTreeMap::new();
        for broker in &metadata.brokers {
            let address = format!("{}:{}", broker.host, broker.port);
            let connection = self.connection(&address).await?;
            let frame = connection
                .call(
                    ApiKey::ListQueues,
                    &ListQueuesRequest {},
                    Vec::new(),
                    self.config.request_timeout_ms,
                )
                .await?;
            let response: ListQueuesResponse = decode(&frame)?;
            for listing in response.queues {
                queues.insert(listing.group.clone(), listing);
            }
        }
        Ok(queues.into_values().collect())
    }
}

/// A member of a queue group.
pub struct QueueMember {
    client: Rc<Client>,
    group: String,
    member: String,
}

impl QueueMember {
    /// `member` names this member in leases (1 to 255 bytes; unique per live member).
    pub fn new(client: Rc<Client>, group: &str, member: &str) -> QueueMember {
        QueueMember {
            client,
            group: group.to_string(),
            member: member.to_string(),
        }
    }

    pub fn member(&self) -> &str {
        &self.member
    }

    /// Up to `records_max` records, each leased to this member; waits up to `wait_ms` when
    /// none is deliverable now (empty when none came).
    pub async fn acquire(
        &self,
        records_max: u32,
        wait_ms: u32,
    ) -> Result<Vec<QueueDelivery>, ClientError> {
        let response: QueueAcquireResponse = self
            .client
            .coordinator_call_on(
                QUEUE_STATE_TOPIC,
                ApiKey::QueueAcquire,
                &self.group,
                &QueueAcquireRequest {
                    group: self.group.clone(),
                    member: self.member.clone(),
                    records_max,
                    wait_ms,
                },
                u64::from(wait_ms),
            )
            .await?;
        Ok(response.records)
    }

    /// Settles several deliveries at once; one result per settlement, in order.
    pub async fn settle(
        &self,
        settlements: Vec<QueueSettlement>,
    ) -> Result<Vec<QueueSettleResult>, ClientError> {
        let count = settlements.len();
        let response: QueueSettleResponse = self
            .client
            .coordinator_call_on(
                QUEUE_STATE_TOPIC,
                ApiKey::QueueSettle,
                &self.group,
                &QueueSettleRequest {
                    group: self.group.clone(),
                    member: self.member.clone(),
                    settlements,
                },
                0,
            )
            .await?;
        if response.results.len() != count {
            return Err(ClientError::Protocol(format!(
                "{} settle results for {count} settlements",
                response.results.len()
            )));
        }
        Ok(response.results)
    }

    async fn settle_one(
        &self,
        delivery: &QueueDelivery,
        action: SettleAction,
    ) -> Result<u64, ClientError> {
        let results = self
            .settle(vec![QueueSettlement {
                partition: delivery.partition,
                offset: delivery.offset,
                delivery_attempt: delivery.delivery_attempt,
                action,
            }])
            .await?;
        let result = &results[0];
        match ErrorCode::from_u16(result.error) {
            ErrorCode::None => Ok(result.lease_until_ms),
            code => Err(ClientError::server(code, result.message.clone())),
        }
    }

    /// Done with the record.
    pub async fn ack(&self, delivery: &QueueDelivery) -> Result<(), ClientError> {
        self.settle_one(delivery, SettleAction::Ack).await.map(drop)
    }

    /// Deliver it again after `delay_ms` (or the queue's backoff for this attempt).
    pub async fn nack(
        &self,
        delivery: &QueueDelivery,
        delay_ms: Option<u64>,
    ) -> Result<(), ClientError> {
        self.settle_one(delivery, SettleAction::Nack { delay_ms })
            .await
            .map(drop)
    }

    /// Never processable: to the dead-letter topic now, with `reason`.
    pub async fn reject(&self, delivery: &QueueDelivery, reason: &str) -> Result<(), ClientError> {
        self.settle_one(
            delivery,
            SettleAction::Reject {
                reason: reason.to_string(),
            },
        )
        .await
        .map(drop)
    }

    /// Renews the lease; returns its new end (ms since the epoch).
    pub async fn extend(&self, delivery: &QueueDelivery) -> Result<u64, ClientError> {
        self.settle_one(delivery, SettleAction::Extend).await
    }
}
