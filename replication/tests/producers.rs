//! Idempotent producer state (`wharf_replication::producers`): retries of the batches a
//! producer may still have in flight are recognised with their original offsets, gaps and
//! stale epochs are refused, a truncation forgets what it cut, and (property) no sequence of
//! sends and retries ever puts one batch in the log twice.

use proptest::prelude::*;
use wharf_replication::producers::*;
use wharf_storage::batch::BatchHeader;
use wharf_storage::ids::ProducerId;
use wharf_storage::{Epoch, Offset};

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

/// Producer 1, epoch 0: `count` batches of 2 records at offsets 0, 2, 4, ...
fn written(count: u32) -> ProducerStates {
    let mut states = ProducerStates::default();
    for i in 0..count {
        states.record(&header(1, 0, 2 * i, 2, 2 * u64::from(i)));
    }
    states
}

#[test]
fn retries_of_the_last_batches_are_answered_with_their_offsets() {
    let states = written(8);
    // The last PRODUCER_BATCHES_KEPT batches: 3..=7.
    for i in 3..8u32 {
        assert_eq!(
            states.check(&[header(1, 0, 2 * i, 2, 0)]),
            Ok(SequenceCheck::Duplicate {
                base_offset: Offset(2 * u64::from(i)),
                last_offset: Offset(2 * u64::from(i) + 1),
            })
        );
    }
    // Older than that: a producer never has it in flight any more.
    assert!(matches!(
        states.check(&[header(1, 0, 4, 2, 0)]),
        Err(SequenceError::OutOfOrder { expected: 16, .. })
    ));
    assert_eq!(
        states.check(&[header(1, 0, 16, 3, 0)]),
        Ok(SequenceCheck::Append)
    );
    // A gap, or a batch that overlaps without matching.
    assert!(matches!(
        states.check(&[header(1, 0, 17, 1, 0)]),
        Err(SequenceError::OutOfOrder { .. })
    ));
    assert!(matches!(
        states.check(&[header(1, 0, 14, 3, 0)]),
        Err(SequenceError::OutOfOrder { .. })
    ));
    // Another producer, or a batch without a producer, is unaffected.
    assert_eq!(
        states.check(&[header(2, 0, 40, 1, 0)]),
        Ok(SequenceCheck::Append)
    );
    assert_eq!(
        states.check(&[BatchHeader {
            producer_id: ProducerId::NONE,
            ..header(1, 0, 0, 1, 0)
        }]),
        Ok(SequenceCheck::Append)
    );
}

#[test]
fn epochs_fence_older_incarnations_and_restart_sequences() {
    let mut states = written(2);
    states.record(&header(1, 1, 0, 1, 10));
    assert!(matches!(
        states.check(&[header(1, 0, 4, 1, 0)]),
        Err(SequenceError::FencedEpoch {
            current: 1,
            found: 0,
            ..
        })
    ));
    assert!(matches!(
        states.check(&[header(1, 2, 5, 1, 0)]),
        Err(SequenceError::OutOfOrder { expected: 0, .. })
    ));
    assert_eq!(
        states.check(&[header(1, 2, 0, 1, 0)]),
        Ok(SequenceCheck::Append)
    );
    assert_eq!(
        states.written(ProducerId(1)).len(),
        1,
        "the new epoch forgot the old"
    );
}

#[test]
fn a_produce_is_checked_as_a_whole() {
    let states = written(2);
    // Two new batches in order in one produce.
    assert_eq!(
        states.check(&[header(1, 0, 4, 2, 0), header(1, 0, 6, 1, 0)]),
        Ok(SequenceCheck::Append)
    );
    // The second does not continue the first.
    assert!(matches!(
        states.check(&[header(1, 0, 4, 2, 0), header(1, 0, 4, 2, 0)]),
        Err(SequenceError::OutOfOrder { .. })
    ));
    // Both written before.
    assert_eq!(
        states.check(&[header(1, 0, 0, 2, 0), header(1, 0, 2, 2, 0)]),
        Ok(SequenceCheck::Duplicate {
            base_offset: Offset(0),
            last_offset: Offset(3)
        })
    );
    assert_eq!(
        states.check(&[header(1, 0, 2, 2, 0), header(1, 0, 4, 1, 0)]),
        Err(SequenceError::PartlyDuplicate)
    );
}

#[test]
fn a_truncation_forgets_what_it_cut_so_a_retry_appends_again() {
    let mut states = written(4);
    states.truncate(Offset(4));
    assert_eq!(states.written(ProducerId(1)).len(), 2);
    // The cut batch (sequence 4) is no longer in the log: its retry is appended.
    assert_eq!(
        states.check(&[header(1, 0, 4, 2, 0)]),
        Ok(SequenceCheck::Append)
    );
    states.truncate(Offset(0));
    assert!(states.is_empty());
    states.record(&header(1, 0, 0, 2, 0));
    states.clear();
    assert!(states.is_empty());
}

#[test]
fn the_stalest_producer_is_forgotten_past_the_limit() {
    let mut states = ProducerStates::default();
    for producer in 0..=PRODUCERS_PER_PARTITION_MAX as u64 {
        states.record(&header(producer, 0, 0, 1, producer));
    }
    assert_eq!(states.len(), PRODUCERS_PER_PARTITION_MAX);
    assert!(states.written(ProducerId(0)).is_empty(), "the stalest went");
    assert_eq!(states.written(ProducerId(1)).len(), 1);
}

/// A batch a producer sent: first sequence, records, and (first, last) offsets once written.
type Sent = (u32, u32, Option<(u64, u64)>);

proptest! {
    /// Producers send batches in order and retry any of their last few at random (a lost
    /// answer); the log, driven by `check` and `record`, holds each batch exactly once, in
    /// sequence order per producer, and every retry is answered with the original offsets.
    #[test]
    fn no_batch_lands_twice(ops in prop::collection::vec((0u64..3, 0usize..8, 1u32..4), 1..200)) {
        let mut states = ProducerStates::default();
        let mut end = 0u64;
        // Per producer: batches sent (first sequence, records, offsets once written).
        let mut sent: Vec<Vec<Sent>> = vec![Vec::new(); 3];
        for (producer, back, records) in ops {
            let mine = &mut sent[producer as usize];
            // back < 5 and something to retry: a retry of one of the last batches.
            let retry = back < PRODUCER_BATCHES_KEPT && back < mine.len();
            let (first, records) = if retry {
                let (first, records, _) = mine[mine.len() - 1 - back];
                (first, records)
            } else {
                let first = mine.last().map_or(0, |(f, r, _)| f + r);
                mine.push((first, records, None));
                (first, records)
            };
            let h = header(producer, 0, first, records, end);
            match states.check(&[h]).expect("in order or a retry") {
                SequenceCheck::Append => {
                    let index = mine.iter().position(|(f, _, _)| *f == first).expect("sent");
                    prop_assert!(mine[index].2.is_none(), "batch {first} of {producer} appended twice");
                    states.record(&h);
                    mine[index].2 = Some((end, end + u64::from(records) - 1));
                    end += u64::from(records);
                }
                SequenceCheck::Duplicate { base_offset, last_offset } => {
                    let at = mine.iter().find(|(f, _, _)| *f == first).and_then(|(_, _, at)| *at);
                    prop_assert_eq!(at, Some((base_offset.0, last_offset.0)));
                }
            }
        }
    }
}
