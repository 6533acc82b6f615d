//! Controller decisions: pure functions from the cluster image and a request to the records that
//! carry the decision out (STYLE habit 11, "decide, then do"). They never change the image; the
//! caller proposes the records and every voter applies them when they commit.
//!
//! Leader election for a partition whose leader is lost, in order:
//! 1. the first *live* (registered, unfenced, not shutting down) ISR member in replica order;
//! 2. else the first live ELR member (KIP-966), which joins the ISR and leaves the ELR;
//! 3. else, only if the topic allows unclean election, the first live replica, with ISR = [it]
//!    and the ELR cleared (its data may be behind: the ELR's guarantee no longer holds);
//! 4. else no leader.
//!
//! ELR (KIP-966): a replica removed from the ISR while the remaining ISR is below
//! `min_insync_replicas` joins the ELR: with strict min ISR the high watermark cannot advance
//! below `min_insync_replicas`, so it holds every committed record. Members of the ISR are never
//! in the ELR; once the ISR holds `min_insync_replicas` again the ELR is cleared.
//!
//! The last ISR member: when fencing removes it the ISR becomes empty and the member moves to the
//! ELR (the empty ISR is below any `min_insync_replicas` >= 1), so the knowledge of who holds the
//! data is kept in the ELR rather than by leaving a dead broker in the ISR as Kafka did before
//! KIP-966. It leads again when it registers (step 2 at registration). A fenced broker stays in
//! the ELR: its data is on its disk and it may come back.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::records::{
    BrokerId, ClusterImage, PartitionRecord, Record, TopicRecord, PARTITIONS_PER_TOPIC_MAX,
    REPLICATION_FACTOR_MAX, TOPICS_MAX, TOPIC_NAME_BYTES_MAX,
};

/// A broker's registration: the first heartbeat of a new incarnation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerRegistration {
    pub id: BrokerId,
    pub incarnation: u64,
    pub client_address: String,
    pub internal_address: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum RegisterError {
    #[error("broker {id}: incarnation {incarnation} is not newer than the registered {stored}")]
    StaleIncarnation {
        id: BrokerId,
        incarnation: u64,
        stored: u64,
    },
    #[error("too many brokers")]
    TooManyBrokers,
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum FenceError {
    #[error("broker {0} is not registered")]
    UnknownBroker(BrokerId),
    #[error("broker {0} is already fenced")]
    AlreadyFenced(BrokerId),
}

/// KIP-497 AlterPartition: a leader asks to change its partition's ISR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlterPartitionRequest {
    pub topic: String,
    pub partition: u32,
    pub leader: BrokerId,
    pub leader_epoch: u64,
    pub partition_epoch: u64,
    pub new_isr: Vec<BrokerId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum AlterPartitionError {
    #[error("unknown partition")]
    UnknownPartition,
    #[error("leader epoch {request} is not the current {current}")]
    FencedLeaderEpoch { request: u64, current: u64 },
    #[error("broker is not the leader (the leader is {current:?})")]
    NotLeader { current: Option<BrokerId> },
    #[error("partition epoch {request} is not the current {current}")]
    InvalidPartitionEpoch { request: u64, current: u64 },
    #[error("replica {0} may not join the ISR (unregistered, fenced or shutting down)")]
    IneligibleReplica(BrokerId),
    #[error("the new ISR is not a set of replicas containing the leader")]
    InvalidIsr,
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ShutdownError {
    #[error("broker {id} incarnation {incarnation} is not registered")]
    UnknownBroker { id: BrokerId, incarnation: u64 },
    #[error("broker {0} is fenced")]
    Fenced(BrokerId),
}

/// The records of one controlled-shutdown step, and whether the broker still leads partitions
/// (no other live ISR member could take them over): the broker retries until it leads none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShutdownDecision {
    pub records: Vec<Record>,
    pub still_leading: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateTopicRequest {
    pub name: String,
    pub partitions: u32,
    pub replication_factor: u16,
    pub min_insync_replicas: u16,
    pub unclean_leader_election: bool,
    pub config: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum CreateTopicError {
    #[error("topic {0} exists")]
    TopicExists(String),
    #[error("{live} live brokers cannot hold replication factor {needed}")]
    NotEnoughBrokers { live: usize, needed: u16 },
    #[error("invalid arguments: {0}")]
    InvalidArguments(&'static str),
    #[error("too many topics")]
    TooManyTopics,
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DeleteTopicError {
    #[error("topic {0} is unknown")]
    UnknownTopic(String),
}

/// Registers a new incarnation of a broker. A live previous incarnation is fenced first (its
/// process is gone), then partitions without a leader whose ISR or ELR holds the broker get it
/// as leader.
pub fn register(
    image: &ClusterImage,
    registration: &BrokerRegistration,
) -> Result<Vec<Record>, RegisterError> {
    let id = registration.id;
    let mut scratch = image.clone();
    let mut records = Vec::new();
    match image.broker(id) {
        Some(stored) if registration.incarnation <= stored.incarnation => {
            return Err(RegisterError::StaleIncarnation {
                id,
                incarnation: registration.incarnation,
                stored: stored.incarnation,
            })
        }
        Some(stored) if !stored.fenced => {
            let fencing = fence(image, id).expect("a registered unfenced broker can be fenced");
            apply_all(&mut scratch, &fencing);
            records.extend(fencing);
        }
        Some(_) => {}
        None if image.brokers().count() >= crate::records::BROKERS_MAX => {
            return Err(RegisterError::TooManyBrokers)
        }
        None => {}
    }
    let registered = Record::RegisterBroker {
        id,
        incarnation: registration.incarnation,
        client_address: registration.client_address.clone(),
        internal_address: registration.internal_address.clone(),
    };
    apply_all(&mut scratch, std::slice::from_ref(&registered));
    records.push(registered);
    for topic in scratch.topics() {
        for partition in &topic.partitions {
            if partition.leader.is_some() || !partition.replicas.contains(&id) {
                continue;
            }
            let mut after = partition.clone();
            if after.isr.contains(&id) || after.elr.contains(&id) {
                after.elr.retain(|member| *member != id);
                insert_in_replica_order(&mut after.isr, id, &after.replicas);
            } else if topic.topic.unclean_leader_election
                && after.isr.is_empty()
                && after.elr.is_empty()
            {
                after.isr = vec![id];
            } else {
                continue;
            }
            after.leader = Some(id);
            normalize(&mut after, &topic.topic);
            records.extend(finish(partition, after));
        }
    }
    Ok(records)
}

/// Fences the broker's current incarnation: it leaves every ISR, and partitions it led get a
/// new leader (see the module docs).
pub fn fence(image: &ClusterImage, id: BrokerId) -> Result<Vec<Record>, FenceError> {
    let broker = image.broker(id).ok_or(FenceError::UnknownBroker(id))?;
    if broker.fenced {
        return Err(FenceError::AlreadyFenced(id));
    }
    let mut records = vec![Record::FenceBroker {
        id,
        incarnation: broker.incarnation,
    }];
    let live = |candidate: BrokerId| candidate != id && image.is_live(candidate);
    for topic in image.topics() {
        for partition in &topic.partitions {
            let after = without_replica(partition, id, &topic.topic, &live);
            records.extend(finish(partition, after));
        }
    }
    Ok(records)
}

/// Validates and carries out a leader's ISR change (KIP-497). Returns the records and the
/// partition as it will be once they apply.
pub fn alter_partition(
    image: &ClusterImage,
    request: &AlterPartitionRequest,
) -> Result<(Vec<Record>, PartitionRecord), AlterPartitionError> {
    let topic = image
        .topic(&request.topic)
        .ok_or(AlterPartitionError::UnknownPartition)?;
    let current = topic
        .partitions
        .get(request.partition as usize)
        .ok_or(AlterPartitionError::UnknownPartition)?;
    if request.leader_epoch != current.leader_epoch {
        return Err(AlterPartitionError::FencedLeaderEpoch {
            request: request.leader_epoch,
            current: current.leader_epoch,
        });
    }
    if current.leader != Some(request.leader) {
        return Err(AlterPartitionError::NotLeader {
            current: current.leader,
        });
    }
    if request.partition_epoch != current.partition_epoch {
        return Err(AlterPartitionError::InvalidPartitionEpoch {
            request: request.partition_epoch,
            current: current.partition_epoch,
        });
    }
    let mut new_isr = Vec::new();
    for member in &request.new_isr {
        if !current.replicas.contains(member) || new_isr.contains(member) {
            return Err(AlterPartitionError::InvalidIsr);
        }
        insert_in_replica_order(&mut new_isr, *member, &current.replicas);
    }
    if !new_isr.contains(&request.leader) {
        return Err(AlterPartitionError::InvalidIsr);
    }
    for member in &new_isr {
        if !current.isr.contains(member) && !image.is_live(*member) {
            return Err(AlterPartitionError::IneligibleReplica(*member));
        }
    }
    let mut after = current.clone();
    for removed in current.isr.iter().filter(|m| !new_isr.contains(m)) {
        if new_isr.len() < usize::from(topic.topic.min_insync_replicas) {
            insert_in_replica_order(&mut after.elr, *removed, &current.replicas);
        }
    }
    after.isr = new_isr;
    normalize(&mut after, &topic.topic);
    let records: Vec<Record> = finish(current, after.clone()).into_iter().collect();
    let result = match records.first() {
        Some(_) => PartitionRecord {
            partition_epoch: current.partition_epoch + 1,
            ..after
        },
        None => current.clone(),
    };
    Ok((records, result))
}

/// One step of a controlled shutdown: marks the broker shutting down, moves the leadership of
/// partitions it leads to another live ISR member and takes it out of ISRs where at least one
/// member remains.
pub fn controlled_shutdown(
    image: &ClusterImage,
    id: BrokerId,
    incarnation: u64,
) -> Result<ShutdownDecision, ShutdownError> {
    let broker = match image.broker(id) {
        Some(broker) if broker.incarnation == incarnation => broker,
        _ => return Err(ShutdownError::UnknownBroker { id, incarnation }),
    };
    if broker.fenced {
        return Err(ShutdownError::Fenced(id));
    }
    let mut records = Vec::new();
    if !broker.shutting_down {
        records.push(Record::BeginShutdown { id, incarnation });
    }
    let live = |candidate: BrokerId| candidate != id && image.is_live(candidate);
    let mut still_leading = false;
    for topic in image.topics() {
        for partition in &topic.partitions {
            if !partition.isr.contains(&id) {
                continue;
            }
            let successor = partition.isr.iter().copied().find(|m| live(*m));
            if partition.leader == Some(id) && successor.is_none() {
                still_leading = true;
                continue;
            }
            if partition.isr.len() == 1 {
                continue; // Its only member: removing it would leave nobody known to be in sync.
            }
            let after = without_replica(partition, id, &topic.topic, &live);
            assert!(after.leader != Some(id));
            records.extend(finish(partition, after));
        }
    }
    Ok(ShutdownDecision {
        records,
        still_leading,
    })
}

/// Creates a topic: replicas placed round robin over the live brokers in id order, starting at a
/// position derived from the topic name (so topics spread), the first replica leading.
pub fn create_topic(
    image: &ClusterImage,
    request: &CreateTopicRequest,
) -> Result<(Vec<Record>, Vec<PartitionRecord>), CreateTopicError> {
    let invalid = CreateTopicError::InvalidArguments;
    let name_ok = !request.name.is_empty()
        && request.name.len() <= TOPIC_NAME_BYTES_MAX
        && request
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if !name_ok {
        return Err(invalid("topic names are 1-249 bytes of [A-Za-z0-9._-]"));
    }
    if request.partitions == 0 || request.partitions > PARTITIONS_PER_TOPIC_MAX {
        return Err(invalid("partitions must be 1..=1024"));
    }
    if request.replication_factor == 0 || request.replication_factor > REPLICATION_FACTOR_MAX {
        return Err(invalid("replication factor must be 1..=16"));
    }
    if request.min_insync_replicas == 0 || request.min_insync_replicas > request.replication_factor
    {
        return Err(invalid(
            "min_insync_replicas must be 1..=replication factor",
        ));
    }
    if image.topic(&request.name).is_some() {
        return Err(CreateTopicError::TopicExists(request.name.clone()));
    }
    if image.topics().count() >= TOPICS_MAX {
        return Err(CreateTopicError::TooManyTopics);
    }
    let live: Vec<BrokerId> = image
        .brokers()
        .filter(|b| b.is_live())
        .map(|b| b.id)
        .collect();
    let replication_factor = usize::from(request.replication_factor);
    if live.len() < replication_factor {
        return Err(CreateTopicError::NotEnoughBrokers {
            live: live.len(),
            needed: request.replication_factor,
        });
    }
    let start = crc32c::crc32c(request.name.as_bytes()) as usize % live.len();
    let partitions: Vec<PartitionRecord> = (0..request.partitions)
        .map(|partition| {
            let first = start + partition as usize;
            let replicas: Vec<BrokerId> = (0..replication_factor)
                .map(|j| live[(first + j) % live.len()])
                .collect();
            PartitionRecord {
                topic: request.name.clone(),
                partition,
                leader: Some(replicas[0]),
                leader_epoch: 0,
                partition_epoch: 0,
                isr: replicas.clone(),
                elr: Vec::new(),
                replicas,
            }
        })
        .collect();
    let topic = TopicRecord {
        name: request.name.clone(),
        partitions: request.partitions,
        replication_factor: request.replication_factor,
        min_insync_replicas: request.min_insync_replicas,
        unclean_leader_election: request.unclean_leader_election,
        config: request.config.clone(),
    };
    let records = vec![Record::CreateTopic {
        topic,
        partitions: partitions.clone(),
    }];
    Ok((records, partitions))
}

pub fn delete_topic(image: &ClusterImage, name: &str) -> Result<Vec<Record>, DeleteTopicError> {
    if image.topic(name).is_none() {
        return Err(DeleteTopicError::UnknownTopic(name.to_string()));
    }
    Ok(vec![Record::DeleteTopic {
        name: name.to_string(),
    }])
}

/// Applies records decided against `image` to it (a scratch copy): they always apply.
pub(crate) fn apply_all(image: &mut ClusterImage, records: &[Record]) {
    let index = image.applied_index();
    for record in records {
        if let Err(error) = image.apply(index, record) {
            panic!("a decided record does not apply: {error}: {record:?}");
        }
    }
}

/// The partition once `removed` leaves its ISR and, if it led, its leadership.
fn without_replica(
    partition: &PartitionRecord,
    removed: BrokerId,
    topic: &TopicRecord,
    live: &dyn Fn(BrokerId) -> bool,
) -> PartitionRecord {
    let mut after = partition.clone();
    if !partition.isr.contains(&removed) {
        assert!(
            partition.leader != Some(removed),
            "the leader is in the ISR"
        );
        return after;
    }
    after.isr.retain(|member| *member != removed);
    if after.isr.len() < usize::from(topic.min_insync_replicas) {
        insert_in_replica_order(&mut after.elr, removed, &partition.replicas);
    }
    if partition.leader == Some(removed) {
        after.leader = elect(&mut after, topic, live);
    }
    normalize(&mut after, topic);
    after
}

/// Chooses a leader for a partition that has none (steps 1-4 of the module docs), updating its
/// ISR and ELR for the choice.
fn elect(
    partition: &mut PartitionRecord,
    topic: &TopicRecord,
    live: &dyn Fn(BrokerId) -> bool,
) -> Option<BrokerId> {
    if let Some(member) = partition.isr.iter().copied().find(|m| live(*m)) {
        return Some(member);
    }
    if let Some(member) = partition.elr.iter().copied().find(|m| live(*m)) {
        partition.elr.retain(|m| *m != member);
        insert_in_replica_order(&mut partition.isr, member, &partition.replicas);
        return Some(member);
    }
    if topic.unclean_leader_election {
        if let Some(replica) = partition.replicas.iter().copied().find(|m| live(*m)) {
            partition.isr = vec![replica];
            partition.elr.clear();
            return Some(replica);
        }
    }
    None
}

/// ISR members leave the ELR; an ISR at `min_insync_replicas` clears the ELR.
fn normalize(partition: &mut PartitionRecord, topic: &TopicRecord) {
    let isr = partition.isr.clone();
    partition.elr.retain(|member| !isr.contains(member));
    if partition.isr.len() >= usize::from(topic.min_insync_replicas) {
        partition.elr.clear();
    }
}

/// The change record from `before` to `after` (epochs set here), or none if nothing changed.
fn finish(before: &PartitionRecord, mut after: PartitionRecord) -> Option<Record> {
    if after.leader == before.leader && after.isr == before.isr && after.elr == before.elr {
        return None;
    }
    after.leader_epoch = before.leader_epoch + u64::from(after.leader != before.leader);
    after.partition_epoch = before.partition_epoch + 1;
    debug_assert!(
        after.check().is_ok(),
        "decided an invalid partition {after:?}"
    );
    Some(Record::partition_change(&after))
}

fn insert_in_replica_order(list: &mut Vec<BrokerId>, id: BrokerId, replicas: &[BrokerId]) {
    if list.contains(&id) {
        return;
    }
    list.push(id);
    let rank = |member: &BrokerId| replicas.iter().position(|r| r == member);
    list.sort_by_key(rank);
}

#[cfg(test)]
#[path = "decisions_tests.rs"]
mod tests;
