//! Idempotent producers: per partition, what each producer last wrote, so a retried batch is
//! answered with its original offsets instead of being appended twice (Kafka's producer state,
//! KIP-98). Sans-IO and a pure function of the log: the leader records a batch when it appends
//! it, a follower when it appends it from the leader, a truncation forgets what it cut, and a
//! restart rebuilds the state by scanning the log's newest batches. So dedupe survives a
//! restart and a failover (the new leader held the same batches).
//!
//! Sequences count records per (producer, partition) from 0, wrapping after [`SEQUENCE_MAX`]; a
//! batch carries its first record's sequence. A producer's epoch fences older incarnations: a
//! batch of an older epoch is refused, a newer epoch starts again at sequence 0.

use std::collections::{BTreeMap, VecDeque};

use wharf_storage::batch::{BatchHeader, SEQUENCE_NONE};
use wharf_storage::ids::ProducerId;
use wharf_storage::Offset;

/// Batches remembered per producer and partition: a producer keeps at most this many requests
/// in flight per partition, so any retry it can send is among them (Kafka keeps 5).
pub const PRODUCER_BATCHES_KEPT: usize = 5;
/// Producers remembered per partition; past it the one that wrote longest ago is forgotten (a
/// retry from it is then appended as a new producer's batch: at-least-once, as before).
pub const PRODUCERS_PER_PARTITION_MAX: usize = 16_384;
/// The largest sequence; the next one is 0.
pub const SEQUENCE_MAX: u32 = i32::MAX as u32;

/// One batch a producer wrote: its sequences and where it landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WrittenBatch {
    pub first_sequence: u32,
    pub last_sequence: u32,
    pub base_offset: Offset,
    pub last_offset: Offset,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ProducerEntry {
    epoch: u16,
    /// Oldest first, at most `PRODUCER_BATCHES_KEPT`.
    batches: VecDeque<WrittenBatch>,
}

/// What to do with a produce's batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SequenceCheck {
    /// New batches (or not idempotent): append them.
    Append,
    /// Every batch was written before, at these offsets: answer them, append nothing.
    Duplicate {
        base_offset: Offset,
        last_offset: Offset,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    #[error("producer {producer}: sequence {found} out of order (expected {expected}); nothing was appended")]
    OutOfOrder {
        producer: u64,
        expected: u32,
        found: u32,
    },
    #[error("producer {producer}: epoch {found} is older than its current epoch {current} (another instance took over)")]
    FencedEpoch {
        producer: u64,
        current: u16,
        found: u16,
    },
    #[error("producer {producer}: sequence {found} is beyond the largest ({SEQUENCE_MAX})")]
    InvalidSequence { producer: u64, found: u32 },
    #[error("a produce mixes batches written before with new ones")]
    PartlyDuplicate,
}

/// The sequence of the last of `records` records starting at `first`.
fn last_sequence(first: u32, records: u32) -> u32 {
    let span = u64::from(records.max(1)) - 1;
    ((u64::from(first) + span) % (u64::from(SEQUENCE_MAX) + 1)) as u32
}

fn next_sequence(last: u32) -> u32 {
    if last == SEQUENCE_MAX {
        0
    } else {
        last + 1
    }
}

/// The producer state of one partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProducerStates {
    producers: BTreeMap<u64, ProducerEntry>,
    /// Producers by the offset of their newest batch, for forgetting the stalest.
    by_last_offset: BTreeMap<Offset, u64>,
}

impl ProducerStates {
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// The batches remembered for `producer`, oldest first.
    pub fn written(&self, producer: ProducerId) -> Vec<WrittenBatch> {
        self.producers
            .get(&producer.0)
            .map(|e| e.batches.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Decides what to do with a produce's batches (headers in order, before stamping). A
    /// produce is appended whole or answered whole: all its idempotent batches are duplicates,
    /// or none is and each continues its producer's sequence.
    pub fn check(&self, headers: &[BatchHeader]) -> Result<SequenceCheck, SequenceError> {
        let mut duplicates: Vec<WrittenBatch> = Vec::new();
        let mut fresh = 0usize;
        // What earlier batches of this produce will have written, per producer: (epoch, last).
        let mut pending: BTreeMap<u64, (u16, u32)> = BTreeMap::new();
        for header in headers {
            if header.producer_id == ProducerId::NONE || header.base_sequence == SEQUENCE_NONE {
                fresh += 1;
                continue;
            }
            let producer = header.producer_id.0;
            let first = header.base_sequence;
            if first > SEQUENCE_MAX {
                return Err(SequenceError::InvalidSequence {
                    producer,
                    found: first,
                });
            }
            let last = last_sequence(first, header.record_count);
            let epoch = header.producer_epoch;
            let known = pending.get(&producer).copied().or_else(|| {
                self.producers
                    .get(&producer)
                    .and_then(|e| e.batches.back().map(|b| (e.epoch, b.last_sequence)))
            });
            let entry = self.producers.get(&producer);
            match known {
                // A producer this partition has no state for: new, or forgotten.
                None => {}
                Some((current, _)) if epoch < current => {
                    return Err(SequenceError::FencedEpoch {
                        producer,
                        current,
                        found: epoch,
                    })
                }
                // A new epoch starts again at sequence 0.
                Some((current, _)) if epoch > current && first != 0 => {
                    return Err(SequenceError::OutOfOrder {
                        producer,
                        expected: 0,
                        found: first,
                    });
                }
                Some((current, _)) if epoch > current => {}
                Some((_, previous_last)) => {
                    let written = entry.and_then(|e| {
                        (e.epoch == epoch && !pending.contains_key(&producer))
                            .then(|| {
                                e.batches
                                    .iter()
                                    .find(|b| b.first_sequence == first && b.last_sequence == last)
                            })
                            .flatten()
                    });
                    if let Some(written) = written {
                        duplicates.push(*written);
                        continue;
                    }
                    let expected = next_sequence(previous_last);
                    if first != expected {
                        return Err(SequenceError::OutOfOrder {
                            producer,
                            expected,
                            found: first,
                        });
                    }
                }
            }
            pending.insert(producer, (epoch, last));
            fresh += 1;
        }
        match (duplicates.first(), duplicates.last(), fresh) {
            (Some(first), Some(last), 0) => Ok(SequenceCheck::Duplicate {
                base_offset: first.base_offset,
                last_offset: last.last_offset,
            }),
            (None, _, _) => Ok(SequenceCheck::Append),
            _ => Err(SequenceError::PartlyDuplicate),
        }
    }

    /// Records a batch the log now holds (stamped: its offsets are final). Batches must be
    /// recorded in log order.
    pub fn record(&mut self, header: &BatchHeader) {
        if header.producer_id == ProducerId::NONE || header.base_sequence == SEQUENCE_NONE {
            return;
        }
        let producer = header.producer_id.0;
        let written = WrittenBatch {
            first_sequence: header.base_sequence,
            last_sequence: last_sequence(header.base_sequence, header.record_count),
            base_offset: header.base_offset,
            last_offset: header.last_offset(),
        };
        let entry = self.producers.entry(producer).or_default();
        if let Some(newest) = entry.batches.back() {
            self.by_last_offset.remove(&newest.last_offset);
        }
        if header.producer_epoch != entry.epoch {
            // A new incarnation: what the old one wrote cannot be retried by it any more.
            entry.batches.clear();
            entry.epoch = header.producer_epoch;
        }
        if entry.batches.len() == PRODUCER_BATCHES_KEPT {
            entry.batches.pop_front();
        }
        entry.batches.push_back(written);
        self.by_last_offset.insert(written.last_offset, producer);
        while self.producers.len() > PRODUCERS_PER_PARTITION_MAX {
            let Some((_, stalest)) = self.by_last_offset.pop_first() else {
                break;
            };
            self.producers.remove(&stalest);
        }
    }

    /// The log was cut at `to`: forgets every batch at or above it.
    pub fn truncate(&mut self, to: Offset) {
        let cut: Vec<(Offset, u64)> = self
            .by_last_offset
            .range(to..)
            .map(|(o, p)| (*o, *p))
            .collect();
        for (offset, producer) in cut {
            self.by_last_offset.remove(&offset);
            let Some(entry) = self.producers.get_mut(&producer) else {
                continue;
            };
            entry.batches.retain(|b| b.last_offset < to);
            match entry.batches.back() {
                Some(newest) => {
                    self.by_last_offset.insert(newest.last_offset, producer);
                }
                None => {
                    self.producers.remove(&producer);
                }
            }
        }
    }

    /// The log was emptied (a follower restarting at its leader's log start): forgets all.
    pub fn clear(&mut self) {
        self.producers.clear();
        self.by_last_offset.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_storage::Epoch;

    fn header(producer: u64, epoch: u16, first: u32, records: u32, base: u64) -> BatchHeader {
        BatchHeader {
            attributes: 0,
            header_crc: 0,
            body_crc: 0,
            base_offset: Offset(base),
            record_count: records,
            last_offset_delta: records - 1,
            leader_epoch: Epoch(1),
            producer_epoch: epoch,
            producer_id: ProducerId(producer),
            base_sequence: first,
            body_bytes: 0,
            first_timestamp_ms: 0,
            max_timestamp_ms: 0,
        }
    }

    #[test]
    fn sequences_wrap_after_the_largest() {
        assert_eq!(last_sequence(SEQUENCE_MAX, 1), SEQUENCE_MAX);
        assert_eq!(last_sequence(SEQUENCE_MAX, 2), 0);
        assert_eq!(next_sequence(SEQUENCE_MAX), 0);
        let mut states = ProducerStates::default();
        states.record(&header(7, 0, SEQUENCE_MAX - 1, 3, 0));
        assert_eq!(
            states.check(&[header(7, 0, 1, 1, 3)]),
            Ok(SequenceCheck::Append)
        );
    }
}
