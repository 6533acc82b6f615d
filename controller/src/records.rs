//! Metadata records and the cluster image they build.
//!
//! Every raft log entry of the controller carries one batch of [`Record`]s, serialized with
//! `serde_json` (see [`encode_batch`]). A batch is applied atomically: all of its records take
//! the entry's raft index. [`ClusterImage::apply`] is deterministic, so every voter and every
//! broker that applies the same records in the same order holds the same image.
//!
//! Invariants kept by `apply` (checked on every `PartitionChange`, see [`PartitionRecord::check`]):
//! - `replicas` are distinct; `isr` and `elr` are subsets of `replicas`, disjoint, in replica order;
//! - a leader, when there is one, is in the ISR;
//! - the partition epoch grows by exactly one per change; the leader epoch grows by exactly one
//!   whenever the leader changes (also to or from `None`) and never otherwise.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A broker's identity in the cluster (`broker.id` in the configuration).
pub type BrokerId = u32;

/// The longest replica set a topic may ask for.
pub const REPLICATION_FACTOR_MAX: u16 = 16;
/// The most partitions one topic may have.
pub const PARTITIONS_PER_TOPIC_MAX: u32 = 1024;
/// The most topics a cluster may hold.
pub const TOPICS_MAX: usize = 4096;
/// The most brokers that may register.
pub const BROKERS_MAX: usize = 1024;
/// The longest topic name, in bytes.
pub const TOPIC_NAME_BYTES_MAX: usize = 249;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerRecord {
    pub id: BrokerId,
    /// Chosen by the broker at each start, larger than any before it: a registration with a
    /// larger incarnation means the previous process is gone.
    pub incarnation: u64,
    pub client_address: String,
    pub internal_address: String,
    pub fenced: bool,
    pub shutting_down: bool,
}

impl BrokerRecord {
    /// Registered, unfenced and not shutting down: may lead and may join an ISR.
    pub fn is_live(&self) -> bool {
        !self.fenced && !self.shutting_down
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRecord {
    pub topic: String,
    pub partition: u32,
    /// The replica set, in preference order (the first live one is the preferred leader).
    pub replicas: Vec<BrokerId>,
    pub leader: Option<BrokerId>,
    pub leader_epoch: u64,
    /// Bumped by every change of leader, ISR or ELR (KIP-497 `partition_epoch`).
    pub partition_epoch: u64,
    pub isr: Vec<BrokerId>,
    /// Eligible leader replicas (KIP-966): replicas that left the ISR while it was below
    /// `min_insync_replicas`, so the high watermark could not advance past their data.
    pub elr: Vec<BrokerId>,
}

impl PartitionRecord {
    /// Checks the structural invariants listed in the module docs.
    pub fn check(&self) -> Result<(), ApplyError> {
        let invalid = |reason: &'static str| ApplyError::InvalidPartition {
            topic: self.topic.clone(),
            partition: self.partition,
            reason,
        };
        let mut seen = self.replicas.clone();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != self.replicas.len() || self.replicas.is_empty() {
            return Err(invalid("replicas empty or repeated"));
        }
        if !is_ordered_subset(&self.isr, &self.replicas) {
            return Err(invalid("isr not an ordered subset of replicas"));
        }
        if !is_ordered_subset(&self.elr, &self.replicas) {
            return Err(invalid("elr not an ordered subset of replicas"));
        }
        if self.isr.iter().any(|id| self.elr.contains(id)) {
            return Err(invalid("isr and elr overlap"));
        }
        if let Some(leader) = self.leader {
            if !self.isr.contains(&leader) {
                return Err(invalid("leader not in isr"));
            }
        }
        Ok(())
    }
}

/// `subset` holds distinct members of `replicas`, in the order of `replicas`.
fn is_ordered_subset(subset: &[BrokerId], replicas: &[BrokerId]) -> bool {
    let mut position = 0;
    for id in subset {
        match replicas[position..].iter().position(|r| r == id) {
            Some(found) => position += found + 1,
            None => return false,
        }
    }
    true
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicRecord {
    pub name: String,
    pub partitions: u32,
    pub replication_factor: u16,
    pub min_insync_replicas: u16,
    pub unclean_leader_election: bool,
    /// Opaque topic configuration, passed through to brokers.
    pub config: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// Registers the broker (or a new incarnation of it): it is unfenced and not shutting down.
    RegisterBroker {
        id: BrokerId,
        incarnation: u64,
        client_address: String,
        internal_address: String,
    },
    FenceBroker {
        id: BrokerId,
        incarnation: u64,
    },
    BeginShutdown {
        id: BrokerId,
        incarnation: u64,
    },
    CreateTopic {
        topic: TopicRecord,
        partitions: Vec<PartitionRecord>,
    },
    DeleteTopic {
        name: String,
    },
    PartitionChange {
        topic: String,
        partition: u32,
        leader: Option<BrokerId>,
        leader_epoch: u64,
        partition_epoch: u64,
        isr: Vec<BrokerId>,
        elr: Vec<BrokerId>,
    },
}

impl Record {
    /// The change that turns a partition into `after` (same topic and partition).
    pub fn partition_change(after: &PartitionRecord) -> Record {
        Record::PartitionChange {
            topic: after.topic.clone(),
            partition: after.partition,
            leader: after.leader,
            leader_epoch: after.leader_epoch,
            partition_epoch: after.partition_epoch,
            isr: after.isr.clone(),
            elr: after.elr.clone(),
        }
    }
}

/// Why a record does not apply. Records decided by the controller always apply (the active
/// controller decides against the image of the whole log before the entry); a rejection is a bug.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ApplyError {
    #[error("index {index} is below the applied index {applied_index}")]
    IndexRegressed { index: u64, applied_index: u64 },
    #[error("broker {id}: incarnation {incarnation} is not newer than {stored}")]
    StaleIncarnation {
        id: BrokerId,
        incarnation: u64,
        stored: u64,
    },
    #[error("broker {id} incarnation {incarnation} is not registered")]
    UnknownBroker { id: BrokerId, incarnation: u64 },
    #[error("too many brokers (at most {BROKERS_MAX})")]
    TooManyBrokers,
    #[error("topic {0} exists")]
    TopicExists(String),
    #[error("too many topics (at most {TOPICS_MAX})")]
    TooManyTopics,
    #[error("topic {0} is unknown")]
    UnknownTopic(String),
    #[error("partition {topic}/{partition} is unknown")]
    UnknownPartition { topic: String, partition: u32 },
    #[error("partition {topic}/{partition}: {reason}")]
    InvalidPartition {
        topic: String,
        partition: u32,
        reason: &'static str,
    },
}

/// One topic: its configuration and its partitions, indexed by partition number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicImage {
    /// The index of the record that created the topic: unique for ever, so a topic deleted
    /// and created again under the same name gets new files on every broker.
    #[serde(default)]
    pub topic_id: u64,
    pub topic: TopicRecord,
    pub partitions: Vec<PartitionRecord>,
}

/// The cluster metadata as of `applied_index`: what every broker's view converges to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterImage {
    applied_index: u64,
    brokers: BTreeMap<BrokerId, BrokerRecord>,
    topics: BTreeMap<String, TopicImage>,
}

impl ClusterImage {
    pub fn new() -> ClusterImage {
        ClusterImage::default()
    }

    /// The raft index of the last entry applied (entries without records count too).
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    pub fn broker(&self, id: BrokerId) -> Option<&BrokerRecord> {
        self.brokers.get(&id)
    }

    pub fn brokers(&self) -> impl Iterator<Item = &BrokerRecord> {
        self.brokers.values()
    }

    /// Registered, unfenced, not shutting down.
    pub fn is_live(&self, id: BrokerId) -> bool {
        self.brokers.get(&id).is_some_and(BrokerRecord::is_live)
    }

    pub fn topic(&self, name: &str) -> Option<&TopicImage> {
        self.topics.get(name)
    }

    pub fn topics(&self) -> impl Iterator<Item = &TopicImage> {
        self.topics.values()
    }

    pub fn partition(&self, topic: &str, partition: u32) -> Option<&PartitionRecord> {
        self.topics
            .get(topic)
            .and_then(|t| t.partitions.get(partition as usize))
    }

    /// Every partition of every topic, in (topic, partition) order.
    pub fn partitions(&self) -> impl Iterator<Item = &PartitionRecord> {
        self.topics.values().flat_map(|t| t.partitions.iter())
    }

    /// Marks the entry at `index` applied (for entries that carry no records).
    pub fn advance_to(&mut self, index: u64) {
        assert!(
            index >= self.applied_index,
            "applied index regressed: {index} < {}",
            self.applied_index
        );
        self.applied_index = index;
    }

    /// Applies one record of the entry at raft `index`. Several records of one entry share its
    /// index. On error the image is unchanged (except nothing: it is checked before any change).
    pub fn apply(&mut self, index: u64, record: &Record) -> Result<(), ApplyError> {
        if index < self.applied_index {
            return Err(ApplyError::IndexRegressed {
                index,
                applied_index: self.applied_index,
            });
        }
        self.apply_record(index, record)?;
        self.applied_index = index;
        Ok(())
    }

    fn apply_record(&mut self, index: u64, record: &Record) -> Result<(), ApplyError> {
        match record {
            Record::RegisterBroker {
                id,
                incarnation,
                client_address,
                internal_address,
            } => {
                if let Some(stored) = self.brokers.get(id) {
                    if *incarnation <= stored.incarnation {
                        return Err(ApplyError::StaleIncarnation {
                            id: *id,
                            incarnation: *incarnation,
                            stored: stored.incarnation,
                        });
                    }
                } else if self.brokers.len() >= BROKERS_MAX {
                    return Err(ApplyError::TooManyBrokers);
                }
                self.brokers.insert(
                    *id,
                    BrokerRecord {
                        id: *id,
                        incarnation: *incarnation,
                        client_address: client_address.clone(),
                        internal_address: internal_address.clone(),
                        fenced: false,
                        shutting_down: false,
                    },
                );
            }
            Record::FenceBroker { id, incarnation } => {
                let broker = self.broker_mut(*id, *incarnation)?;
                broker.fenced = true;
            }
            Record::BeginShutdown { id, incarnation } => {
                let broker = self.broker_mut(*id, *incarnation)?;
                broker.shutting_down = true;
            }
            Record::CreateTopic { topic, partitions } => {
                self.create_topic(index, topic, partitions)?
            }
            Record::DeleteTopic { name } => {
                if self.topics.remove(name).is_none() {
                    return Err(ApplyError::UnknownTopic(name.clone()));
                }
            }
            Record::PartitionChange {
                topic,
                partition,
                leader,
                leader_epoch,
                partition_epoch,
                isr,
                elr,
            } => {
                let current = self.partition(topic, *partition).ok_or_else(|| {
                    ApplyError::UnknownPartition {
                        topic: topic.clone(),
                        partition: *partition,
                    }
                })?;
                let invalid = |reason| ApplyError::InvalidPartition {
                    topic: topic.clone(),
                    partition: *partition,
                    reason,
                };
                if *partition_epoch != current.partition_epoch + 1 {
                    return Err(invalid("partition epoch is not the next one"));
                }
                let expected_leader_epoch = if *leader == current.leader {
                    current.leader_epoch
                } else {
                    current.leader_epoch + 1
                };
                if *leader_epoch != expected_leader_epoch {
                    return Err(invalid("leader epoch does not follow the leader change"));
                }
                let after = PartitionRecord {
                    leader: *leader,
                    leader_epoch: *leader_epoch,
                    partition_epoch: *partition_epoch,
                    isr: isr.clone(),
                    elr: elr.clone(),
                    ..current.clone()
                };
                after.check()?;
                let slot = self
                    .topics
                    .get_mut(topic)
                    .and_then(|t| t.partitions.get_mut(*partition as usize))
                    .expect("checked above");
                *slot = after;
            }
        }
        Ok(())
    }

    fn broker_mut(
        &mut self,
        id: BrokerId,
        incarnation: u64,
    ) -> Result<&mut BrokerRecord, ApplyError> {
        match self.brokers.get_mut(&id) {
            Some(broker) if broker.incarnation == incarnation => Ok(broker),
            _ => Err(ApplyError::UnknownBroker { id, incarnation }),
        }
    }

    fn create_topic(
        &mut self,
        topic_id: u64,
        topic: &TopicRecord,
        partitions: &[PartitionRecord],
    ) -> Result<(), ApplyError> {
        if self.topics.contains_key(&topic.name) {
            return Err(ApplyError::TopicExists(topic.name.clone()));
        }
        if self.topics.len() >= TOPICS_MAX {
            return Err(ApplyError::TooManyTopics);
        }
        for (number, partition) in partitions.iter().enumerate() {
            partition.check()?;
            if partition.topic != topic.name || partition.partition as usize != number {
                return Err(ApplyError::InvalidPartition {
                    topic: topic.name.clone(),
                    partition: partition.partition,
                    reason: "partition out of place",
                });
            }
        }
        if partitions.len() != topic.partitions as usize {
            return Err(ApplyError::InvalidPartition {
                topic: topic.name.clone(),
                partition: 0,
                reason: "partition count differs from the topic's",
            });
        }
        self.topics.insert(
            topic.name.clone(),
            TopicImage {
                topic_id,
                topic: topic.clone(),
                partitions: partitions.to_vec(),
            },
        );
        Ok(())
    }
}

/// The payload of one raft entry: a batch of records (applied atomically).
pub fn encode_batch(records: &[Record]) -> Vec<u8> {
    serde_json::to_vec(records).expect("records always serialize")
}

/// Decodes an entry payload; an empty payload (raft's leader no-op) is an empty batch.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<Record>, serde_json::Error> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_slice(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(id: BrokerId, incarnation: u64) -> Record {
        Record::RegisterBroker {
            id,
            incarnation,
            client_address: format!("client-{id}"),
            internal_address: format!("internal-{id}"),
        }
    }

    fn topic_with_one_partition(image: &mut ClusterImage) {
        let topic = TopicRecord {
            name: "t".into(),
            partitions: 1,
            replication_factor: 3,
            min_insync_replicas: 2,
            unclean_leader_election: false,
            config: BTreeMap::new(),
        };
        let partition = PartitionRecord {
            topic: "t".into(),
            partition: 0,
            replicas: vec![1, 2, 3],
            leader: Some(1),
            leader_epoch: 0,
            partition_epoch: 0,
            isr: vec![1, 2, 3],
            elr: vec![],
        };
        image
            .apply(
                2,
                &Record::CreateTopic {
                    topic,
                    partitions: vec![partition],
                },
            )
            .expect("creates");
    }

    #[test]
    fn registration_refuses_stale_incarnations_and_unfences() {
        let mut image = ClusterImage::new();
        image.apply(1, &register(1, 5)).expect("registers");
        image
            .apply(
                2,
                &Record::FenceBroker {
                    id: 1,
                    incarnation: 5,
                },
            )
            .expect("fences");
        assert!(!image.is_live(1));
        assert!(matches!(
            image.apply(3, &register(1, 5)),
            Err(ApplyError::StaleIncarnation { .. })
        ));
        image.apply(3, &register(1, 6)).expect("new incarnation");
        assert!(image.is_live(1));
        assert_eq!(image.applied_index(), 3);
        assert!(matches!(
            image.apply(2, &register(1, 7)),
            Err(ApplyError::IndexRegressed { .. })
        ));
    }

    #[test]
    fn partition_change_checks_epochs_and_shape() {
        let mut image = ClusterImage::new();
        topic_with_one_partition(&mut image);
        let change = |leader, leader_epoch, partition_epoch, isr: Vec<u32>, elr: Vec<u32>| {
            Record::PartitionChange {
                topic: "t".into(),
                partition: 0,
                leader,
                leader_epoch,
                partition_epoch,
                isr,
                elr,
            }
        };
        // Leader change without an epoch bump.
        assert!(image
            .apply(3, &change(Some(2), 0, 1, vec![2, 3], vec![]))
            .is_err());
        // Partition epoch skipped.
        assert!(image
            .apply(3, &change(Some(1), 0, 2, vec![1, 2], vec![]))
            .is_err());
        // Leader outside the ISR.
        assert!(image
            .apply(3, &change(Some(1), 0, 1, vec![2, 3], vec![]))
            .is_err());
        // ISR out of replica order.
        assert!(image
            .apply(3, &change(Some(1), 0, 1, vec![2, 1], vec![]))
            .is_err());
        image
            .apply(3, &change(Some(2), 1, 1, vec![2, 3], vec![]))
            .expect("valid change");
        let partition = image.partition("t", 0).expect("exists");
        assert_eq!(partition.leader, Some(2));
        assert_eq!((partition.leader_epoch, partition.partition_epoch), (1, 1));
    }

    #[test]
    fn batches_round_trip_and_image_serializes() {
        let mut image = ClusterImage::new();
        image.apply(1, &register(7, 1)).expect("registers");
        topic_with_one_partition(&mut image);
        let batch = vec![register(8, 1), Record::DeleteTopic { name: "t".into() }];
        assert_eq!(decode_batch(&encode_batch(&batch)).expect("decodes"), batch);
        assert!(decode_batch(b"").expect("empty").is_empty());
        let bytes = serde_json::to_vec(&image).expect("serializes");
        let back: ClusterImage = serde_json::from_slice(&bytes).expect("deserializes");
        assert_eq!(back, image);
    }
}
