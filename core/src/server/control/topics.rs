//! The topic life cycle, run on shard 0: create (validate, pick ids and replica sets, apply on
//! the other brokers first, then install here), apply (install or remove a topic another broker
//! created), delete; installing persists the metadata, opens the partitions on their shards and
//! publishes the metadata.

use std::rc::Rc;
use std::sync::Arc;

use crate::metadata::{self, PartitionMeta, TopicMeta};
use crate::protocol::*;
use crate::server::dispatch::topic_error;
use crate::server::partition::PartitionError;
use crate::server::shard::{Shard, ShardRequest};

impl Shard {
    /// The checks every create makes, static or through the controller: a valid name and
    /// partition count, a config that parses, `min_insync_replicas` within the replication
    /// factor. Returns the name, the replication factor and the topic's config.
    fn validate_new_topic(
        &self,
        request: &CreateTopicRequest,
    ) -> Result<(String, u16, crate::config::TopicConfig), TopicResult> {
        let name = request.name.clone();
        if let Err(message) = metadata::validate_topic_name(&name) {
            return Err(topic_error(ErrorCode::InvalidTopic, message));
        }
        if request.partitions == 0 || request.partitions > metadata::PARTITIONS_PER_TOPIC_MAX {
            return Err(topic_error(
                ErrorCode::InvalidRequest,
                format!(
                    "partitions must be 1..={}, not {}",
                    metadata::PARTITIONS_PER_TOPIC_MAX,
                    request.partitions
                ),
            ));
        }
        let replication_factor = request.replication_factor.max(1);
        let config = self
            .shared
            .config
            .topic_defaults
            .with_entries(&request.configs)
            .map_err(|message| topic_error(ErrorCode::InvalidConfig, message))?;
        let explicit_min_insync = request
            .configs
            .iter()
            .any(|c| c.key == "min_insync_replicas");
        if explicit_min_insync && config.min_insync_replicas > replication_factor {
            return Err(topic_error(
                ErrorCode::InvalidConfig,
                format!(
                    "min_insync_replicas {} exceeds the replication factor {replication_factor}",
                    config.min_insync_replicas
                ),
            ));
        }
        Ok((name, replication_factor, config))
    }

    pub(crate) async fn create_topic(self: &Rc<Self>, request: CreateTopicRequest) -> TopicResult {
        if self.id != 0 {
            return self.on_shard_zero(ShardRequest::CreateTopic(request)).await;
        }
        let (name, replication_factor, config) = match self.validate_new_topic(&request) {
            Ok(valid) => valid,
            Err(result) => return result,
        };
        if self.controller_mode() {
            return self
                .create_topic_via_controller(name, request.partitions, replication_factor, config)
                .await;
        }
        let Ok(_permit) = self.admin_lock.acquire_permit(1).await else {
            return topic_error(ErrorCode::ShuttingDown, "shutting down");
        };
        let me = self.shared.config.broker_id;
        let mut brokers: Vec<u32> = self
            .shared
            .config
            .cluster
            .brokers
            .iter()
            .map(|b| b.id)
            .collect();
        if brokers.is_empty() {
            brokers.push(me);
        }
        brokers.sort_unstable();
        if usize::from(replication_factor) > brokers.len() {
            return topic_error(
                ErrorCode::InvalidReplicationFactor,
                format!("replication factor {replication_factor} needs {replication_factor} brokers; this cluster has {}", brokers.len()),
            );
        }
        let mut next = (**self.metadata.borrow()).clone();
        if next.topics.contains_key(&name) {
            return topic_error(
                ErrorCode::TopicAlreadyExists,
                format!("topic {name:?} already exists"),
            );
        }
        // Ids carry the creating broker so that brokers of a static cluster never collide.
        let topic_id = if self.shared.config.cluster.brokers.is_empty() {
            next.next_topic_id
        } else {
            (u64::from(me) << 40) | next.next_topic_id
        };
        next.next_topic_id += 1;
        if let Err(message) = self.persist(next).await {
            return topic_error(ErrorCode::StorageError, message);
        }
        // Replica sets rotate over the brokers so leadership spreads; the first replica leads.
        let first = crc32c::crc32c(name.as_bytes()) as usize;
        let replicas: Vec<Vec<u32>> = (0..request.partitions as usize)
            .map(|p| {
                (0..usize::from(replication_factor))
                    .map(|i| brokers[(first + p + i) % brokers.len()])
                    .collect()
            })
            .collect();
        let apply = ApplyTopicRequest {
            name: name.clone(),
            topic_id,
            delete: false,
            replication_factor,
            configs: config.entries(),
            replicas,
        };
        // The other brokers first: if one cannot take it, nobody keeps it.
        let mut applied = Vec::new();
        for broker in self
            .shared
            .config
            .cluster
            .brokers
            .iter()
            .filter(|b| b.id != me)
        {
            let Some(address) = broker.internal_address.as_deref() else {
                return topic_error(
                    ErrorCode::BrokerUnavailable,
                    format!("broker {} has no internal_address", broker.id),
                );
            };
            match self.call_broker(address, &apply).await {
                Ok(()) => applied.push(address.to_string()),
                Err(message) => {
                    let undo = ApplyTopicRequest {
                        delete: true,
                        ..apply.clone()
                    };
                    for address in &applied {
                        if let Err(e) = self.call_broker(address, &undo).await {
                            tracing::warn!(topic = %name, %address, error = %e, "could not undo a partial topic creation");
                        }
                    }
                    return topic_error(
                        ErrorCode::BrokerUnavailable,
                        format!("broker {} ({}) could not create the topic: {message}; nothing was created", broker.id, broker.address),
                    );
                }
            }
        }
        let result = self.install_topic(&apply).await;
        if result.error == 0 {
            tracing::info!(topic = %name, partitions = request.partitions, replication_factor, "created topic");
        }
        result
    }

    /// Sends an `ApplyTopic` to another broker of the cluster.
    async fn call_broker(&self, address: &str, request: &ApplyTopicRequest) -> Result<(), String> {
        let timeout_ms = self.shared.config.cluster.broker_call_timeout_ms;
        let connection = crate::client::Connection::connect_peer(
            address,
            self.shared.config.frame_bytes_max,
            self.peer_credentials().as_ref(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let frame = connection
            .call(ApiKey::ApplyTopic, request, Vec::new(), timeout_ms)
            .await
            .map_err(|e| e.to_string())?;
        let result: TopicResult = crate::client::decode(&frame).map_err(|e| e.to_string())?;
        if result.error != 0 {
            return Err(format!(
                "{}: {}",
                ErrorCode::from_u16(result.error).name(),
                result.message
            ));
        }
        Ok(())
    }

    /// Installs (or removes) a topic another broker created, with its id and assignment.
    pub(crate) async fn apply_topic(self: &Rc<Self>, request: ApplyTopicRequest) -> TopicResult {
        if self.controller_mode() {
            // Topics come from the controller's log; a static cluster's two-phase apply would
            // make this broker disagree with it.
            return topic_error(
                ErrorCode::InvalidRequest,
                "ApplyTopic is a static cluster's API; this cluster runs a controller",
            );
        }
        if self.id != 0 {
            return self.on_shard_zero(ShardRequest::ApplyTopic(request)).await;
        }
        let Ok(_permit) = self.admin_lock.acquire_permit(1).await else {
            return topic_error(ErrorCode::ShuttingDown, "shutting down");
        };
        let existing = self
            .metadata
            .borrow()
            .topics
            .get(&request.name)
            .map(|t| t.topic_id);
        if request.delete {
            return match existing {
                Some(id) if id == request.topic_id => self.uninstall_topic(request.name).await,
                _ => TopicResult {
                    error: 0,
                    message: String::new(),
                },
            };
        }
        match existing {
            Some(id) if id == request.topic_id => TopicResult {
                error: 0,
                message: String::new(),
            },
            Some(_) => topic_error(
                ErrorCode::TopicAlreadyExists,
                format!(
                    "topic {:?} already exists here with another id",
                    request.name
                ),
            ),
            None => {
                if let Err(message) = metadata::validate_topic_name(&request.name) {
                    return topic_error(ErrorCode::InvalidTopic, message);
                }
                if request.replicas.is_empty()
                    || request.replicas.len() > metadata::PARTITIONS_PER_TOPIC_MAX as usize
                {
                    return topic_error(ErrorCode::InvalidRequest, "bad partition count");
                }
                self.install_topic(&request).await
            }
        }
    }

    /// Checks a topic before it is installed (created here or sent by another broker): the
    /// broker's topic and partition caps, and an assignment every broker can open — each
    /// replica set non-empty, at most `REPLICAS_MAX` distinct brokers of `cluster.brokers`
    /// (or this broker alone), as long as the replication factor. Anything else would be
    /// stored and then fail every start.
    fn check_new_topic(&self, request: &ApplyTopicRequest) -> Result<(), PartitionError> {
        let config = &self.shared.config;
        let metadata = self.metadata.borrow();
        if metadata.topics.len() >= config.topics_max {
            return Err(PartitionError::new(
                ErrorCode::LimitReached,
                format!(
                    "this broker keeps at most topics_max = {} topics",
                    config.topics_max
                ),
            ));
        }
        let me = config.broker_id;
        let hosted = |replicas: &[u32]| replicas.contains(&me);
        let partitions_now: usize = metadata
            .topics
            .values()
            .map(|t| t.partitions.iter().filter(|p| hosted(&p.replicas)).count())
            .sum();
        let partitions_new = request.replicas.iter().filter(|r| hosted(r)).count();
        if partitions_now + partitions_new > config.partitions_max {
            return Err(PartitionError::new(
                ErrorCode::LimitReached,
                format!(
                    "this broker hosts {partitions_now} partitions; {partitions_new} more would \
                     exceed partitions_max = {}",
                    config.partitions_max
                ),
            ));
        }
        let known = |id: u32| {
            config.cluster.brokers.iter().any(|b| b.id == id)
                || (config.cluster.brokers.is_empty() && id == me)
        };
        for (partition, replicas) in request.replicas.iter().enumerate() {
            let problem =
                if let Err(error) = wharf_replication::replica::check_replica_set(replicas) {
                    Some(error.to_string())
                } else if replicas.len() != usize::from(request.replication_factor.max(1)) {
                    Some(format!(
                        "{} replicas for replication factor {}",
                        replicas.len(),
                        request.replication_factor
                    ))
                } else {
                    replicas
                        .iter()
                        .find(|&&id| !known(id))
                        .map(|id| format!("broker {id} is not in cluster.brokers"))
                };
            if let Some(problem) = problem {
                return Err(PartitionError::new(
                    ErrorCode::InvalidReplicationFactor,
                    format!(
                        "partition {partition} of topic {:?}: {problem}",
                        request.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Persists a topic with the given id and assignment, opens the partitions this broker
    /// hosts and publishes the metadata to every shard.
    async fn install_topic(self: &Rc<Self>, request: &ApplyTopicRequest) -> TopicResult {
        let config = match self
            .shared
            .config
            .topic_defaults
            .with_entries(&request.configs)
        {
            Ok(config) => config,
            Err(message) => return topic_error(ErrorCode::InvalidConfig, message),
        };
        if let Err(error) = self.check_new_topic(request) {
            return topic_error(error.code, error.message);
        }
        let name = request.name.clone();
        let shards = self.shared.shards() as u32;
        let topic = TopicMeta {
            topic_id: request.topic_id,
            replication_factor: request.replication_factor,
            config,
            partitions: request
                .replicas
                .iter()
                .enumerate()
                .map(|(p, replicas)| PartitionMeta {
                    shard: metadata::placement(&name, p as u32, shards),
                    leader: replicas
                        .first()
                        .copied()
                        .unwrap_or(self.shared.config.broker_id),
                    leader_epoch: 0,
                    replicas: replicas.clone(),
                    isr: Vec::new(),
                })
                .collect(),
        };
        let mut next = (**self.metadata.borrow()).clone();
        next.topics.insert(name.clone(), topic.clone());
        if let Err(message) = self.persist(next.clone()).await {
            return topic_error(ErrorCode::StorageError, message);
        }
        // Open the logs before anyone can see the topic.
        match self.open_on_shards(&name, &topic).await {
            Ok(failed) => {
                if let Some(message) = failed.into_iter().next() {
                    return topic_error(ErrorCode::StorageError, message);
                }
            }
            Err(message) => return topic_error(ErrorCode::ShuttingDown, message),
        }
        self.publish(Arc::new(next)).await;
        TopicResult {
            error: 0,
            message: String::new(),
        }
    }

    pub(crate) async fn delete_topic(self: &Rc<Self>, name: String) -> TopicResult {
        if self.id != 0 {
            return self.on_shard_zero(ShardRequest::DeleteTopic(name)).await;
        }
        if self.controller_mode() {
            return self
                .run_controller_command(super::Command::DeleteTopic { name })
                .await;
        }
        let Ok(_permit) = self.admin_lock.acquire_permit(1).await else {
            return topic_error(ErrorCode::ShuttingDown, "shutting down");
        };
        let Some(topic) = self.metadata.borrow().topics.get(&name).cloned() else {
            return topic_error(
                ErrorCode::UnknownTopic,
                format!("topic {name:?} does not exist"),
            );
        };
        let me = self.shared.config.broker_id;
        let undo = ApplyTopicRequest {
            name: name.clone(),
            topic_id: topic.topic_id,
            delete: true,
            replication_factor: topic.replication_factor,
            configs: Vec::new(),
            replicas: Vec::new(),
        };
        let mut failed = Vec::new();
        for broker in self
            .shared
            .config
            .cluster
            .brokers
            .iter()
            .filter(|b| b.id != me)
        {
            let Some(address) = broker.internal_address.as_deref() else {
                continue;
            };
            if let Err(message) = self.call_broker(address, &undo).await {
                failed.push(format!("broker {}: {message}", broker.id));
            }
        }
        let result = self.uninstall_topic(name).await;
        if result.error == 0 && !failed.is_empty() {
            return topic_error(
                ErrorCode::BrokerUnavailable,
                format!(
                    "deleted here, but not on {}; delete again once they are up",
                    failed.join("; ")
                ),
            );
        }
        result
    }

    async fn uninstall_topic(self: &Rc<Self>, name: String) -> TopicResult {
        let mut next = (**self.metadata.borrow()).clone();
        let Some(topic) = next.topics.remove(&name) else {
            return topic_error(
                ErrorCode::UnknownTopic,
                format!("topic {name:?} does not exist"),
            );
        };
        if let Err(message) = self.persist(next.clone()).await {
            return topic_error(ErrorCode::StorageError, message);
        }
        self.publish(Arc::new(next)).await;
        self.close_on_shards(&name).await;
        self.remove_topic_files(&name, topic.topic_id).await;
        tracing::info!(topic = %name, "deleted topic");
        TopicResult {
            error: 0,
            message: String::new(),
        }
    }
}
