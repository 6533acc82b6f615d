//! Versions, Metadata and DescribeTopic: what the broker speaks, where each partition lives
//! (with the replicas' live leader, epoch and ISR), and a topic's full description.

use std::rc::Rc;

use super::PARTITIONS_PER_REQUEST_MAX;
use crate::config::parse_host_port;
use crate::metadata::TopicMeta;
use crate::protocol::*;
use crate::server::connection::ListenerKind;
use crate::server::shard::{Shard, ShardReply, ShardRequest};

impl Shard {
    /// The APIs and versions this broker speaks.
    pub(crate) fn versions(&self) -> VersionsResponse {
        VersionsResponse {
            broker_id: self.shared.config.broker_id,
            server_version: env!("CARGO_PKG_VERSION").to_string(),
            apis: ApiKey::ALL
                .iter()
                .map(|api| {
                    let (min_version, max_version) = api.supported_versions();
                    ApiVersionRange {
                        api_key: *api as u16,
                        min_version,
                        max_version,
                    }
                })
                .collect(),
        }
    }

    /// Replaces the stored leader, epoch and ISR of every partition this broker hosts with its
    /// replica's live view (the stored metadata only knows the initial assignment: epoch 0 and
    /// every replica in sync). A leader reports its ISR; a follower reports the epoch it
    /// follows and the ISR it knows (none: the leader's metadata has it).
    pub(crate) async fn fill_live_partition_state(
        self: &Rc<Self>,
        response: &mut MetadataResponse,
    ) {
        if self.controller_mode() {
            // The stored metadata is the controller's: leader, epoch and ISR are current.
            return;
        }
        let me = self.shared.config.broker_id;
        for topic in &mut response.topics {
            for partition in &mut topic.partitions {
                if !partition.replicas.contains(&me) {
                    continue;
                }
                let reply = self
                    .to_shard(
                        partition.shard,
                        ShardRequest::Describe {
                            topic: topic.name.clone(),
                            partition: partition.partition,
                        },
                    )
                    .await;
                if let Some(ShardReply::Described(Ok(live))) = reply {
                    partition.leader = live.leader;
                    partition.leader_epoch = live.leader_epoch;
                    partition.isr = live.isr;
                }
            }
        }
    }

    /// The metadata; asked on the internal listener, it names the shards' internal ports (a
    /// follower then fetches straight from the owner shard).
    pub(crate) fn metadata_response(
        &self,
        request: MetadataRequest,
        listener: ListenerKind,
    ) -> MetadataResponse {
        let config = &self.shared.config;
        let host = config.advertised_host();
        let port = parse_host_port("listen", &config.listen).map_or(0, |(_, p)| p);
        let (shard_addresses, host) = match listener {
            ListenerKind::Client => (&self.shared.shard_addresses, host),
            ListenerKind::Internal => (
                &self.shared.internal_shard_addresses,
                config.internal_host().unwrap_or(host),
            ),
        };
        let shards = shard_addresses
            .iter()
            .enumerate()
            .filter_map(|(shard, address)| {
                address.get().map(|a| ShardAddress {
                    shard: shard as u32,
                    host: host.clone(),
                    port: a.port(),
                })
            })
            .collect();
        let metadata = self.metadata.borrow();
        let describe = |name: &str, topic: &TopicMeta| TopicMetadata {
            name: name.to_string(),
            error: 0,
            partitions: topic
                .partitions
                .iter()
                .enumerate()
                .map(|(i, p)| PartitionMetadata {
                    partition: i as u32,
                    leader: p.leader,
                    leader_epoch: p.leader_epoch,
                    shard: p.shard,
                    replicas: p.replicas.clone(),
                    isr: if p.isr.is_empty() {
                        p.replicas.clone()
                    } else {
                        p.isr.clone()
                    },
                })
                .collect(),
        };
        let topics = match request.topics {
            None => metadata
                .topics
                .iter()
                .map(|(name, topic)| describe(name, topic))
                .collect(),
            Some(names) => names
                .iter()
                .take(PARTITIONS_PER_REQUEST_MAX)
                .map(|name| match metadata.topics.get(name) {
                    Some(topic) => describe(name, topic),
                    None => TopicMetadata {
                        name: name.clone(),
                        error: ErrorCode::UnknownTopic as u16,
                        partitions: Vec::new(),
                    },
                })
                .collect(),
        };
        let mut brokers = vec![BrokerInfo {
            broker_id: config.broker_id,
            host: config.advertised_host(),
            port,
            shards,
        }];
        // Other brokers of the cluster: their client address (their own metadata names their
        // shards).
        for broker in config
            .cluster
            .brokers
            .iter()
            .filter(|b| b.id != config.broker_id)
        {
            if let Ok((host, port)) = parse_host_port("address", &broker.address) {
                brokers.push(BrokerInfo {
                    broker_id: broker.id,
                    host,
                    port,
                    shards: Vec::new(),
                });
            }
        }
        MetadataResponse { brokers, topics }
    }

    pub(crate) async fn describe_topic(self: &Rc<Self>, name: String) -> DescribeTopicResponse {
        let topic = self.metadata.borrow().topics.get(&name).cloned();
        let Some(topic) = topic else {
            return DescribeTopicResponse {
                error: ErrorCode::UnknownTopic as u16,
                message: format!("topic {name:?} does not exist"),
                topic: None,
            };
        };
        let mut partitions = Vec::new();
        for (index, meta) in topic.partitions.iter().enumerate() {
            let reply = self
                .to_shard(
                    meta.shard,
                    ShardRequest::Describe {
                        topic: name.clone(),
                        partition: index as u32,
                    },
                )
                .await;
            let controller_mode = self.controller_mode();
            partitions.push(match reply {
                Some(ShardReply::Described(Ok(mut description))) => {
                    if controller_mode {
                        // The controller's leader, epoch and ISR; the offsets are this replica's.
                        description.leader = meta.leader;
                        description.leader_epoch = meta.leader_epoch;
                        description.isr = meta.isr.clone();
                    }
                    description
                }
                other => {
                    let error = match other {
                        Some(ShardReply::Described(Err(e))) => e.code,
                        _ => ErrorCode::ShuttingDown,
                    };
                    PartitionDescription {
                        partition: index as u32,
                        leader: meta.leader,
                        leader_epoch: meta.leader_epoch,
                        shard: meta.shard,
                        replicas: meta.replicas.clone(),
                        isr: if controller_mode {
                            meta.isr.clone()
                        } else {
                            Vec::new()
                        },
                        log_start_offset: 0,
                        high_watermark: 0,
                        end_offset: 0,
                        error: error as u16,
                    }
                }
            });
        }
        DescribeTopicResponse {
            error: 0,
            message: String::new(),
            topic: Some(TopicDescription {
                name,
                topic_id: topic.topic_id,
                replication_factor: topic.replication_factor,
                configs: topic.config.entries(),
                partitions,
            }),
        }
    }
}
