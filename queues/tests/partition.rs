//! Random operation sequences against one queue partition, checked step by step against a
//! simple model of what each record's state must be: several members acquire, ack, nack,
//! reject and extend (including stale and foreign deliveries), time advances and leases
//! expire, dead-letter copies are confirmed, the topic grows (with compaction gaps), snapshots
//! are taken. Failing cases are shrunk and kept in `partition.proptest-regressions`, which
//! proptest replays first; the failure message names the step.
//!
//! Checked: one holder per record; an acked record is never handed out again; a stale or
//! foreign settlement is refused and changes nothing (and a current one is accepted); the
//! attempt number counts deliveries and never passes `max_deliveries`, and a record is
//! dead-lettered exactly when its last delivery fails; the in-flight limit; `start_offset`
//! only moves over done records; the window limit; per-key ordering; the state log (whole, from each snapshot,
//! and each snapshot alone) replays to the live state.

use std::collections::BTreeMap;

use proptest::prelude::*;
use wharf_queues::{
    Backoff, DeadLetterReason, Delivery, DeliveryFailure, KeyOrdering, NackOptions, QueueConfig,
    QueuePartition, QueueRecord, RecordState,
};

const MEMBERS: usize = 3;
/// Deliveries each member remembers (old ones make stale settlements).
const HISTORY_MAX: usize = 24;

#[derive(Clone, Debug)]
enum Step {
    /// Appends records to the topic: (skipped offsets before it, key).
    Produce(Vec<(u8, Option<u64>)>),
    Acquire {
        member: usize,
        max_records: usize,
        read: usize,
    },
    Ack(Settle),
    Nack(Settle, Option<u64>, u64),
    Reject(Settle),
    Extend(Settle),
    Advance(u64, u64),
    Confirm(usize),
    Snapshot,
}

/// Which delivery to settle: one from `member`'s history, possibly sent as another member.
#[derive(Clone, Copy, Debug)]
struct Settle {
    member: usize,
    pick: usize,
    impostor: bool,
}

fn settle() -> impl Strategy<Value = Settle> {
    (0..MEMBERS, 0..HISTORY_MAX, prop::bool::weighted(0.1)).prop_map(|(member, pick, impostor)| {
        Settle {
            member,
            pick,
            impostor,
        }
    })
}

fn step() -> impl Strategy<Value = Step> {
    let key = prop_oneof![1 => Just(None), 3 => (0u64..4).prop_map(Some)];
    prop_oneof![
        2 => proptest::collection::vec((prop_oneof![4 => Just(0u8), 1 => 1u8..3], key), 1..6)
            .prop_map(Step::Produce),
        5 => (0..MEMBERS, 1usize..5, 0usize..10)
            .prop_map(|(member, max_records, read)| Step::Acquire { member, max_records, read }),
        4 => settle().prop_map(Step::Ack),
        2 => (settle(), prop::option::of(0u64..400), any::<u64>())
            .prop_map(|(s, delay, jitter)| Step::Nack(s, delay, jitter)),
        1 => settle().prop_map(Step::Reject),
        1 => settle().prop_map(Step::Extend),
        3 => (0u64..400, any::<u64>()).prop_map(|(ms, jitter)| Step::Advance(ms, jitter)),
        2 => (0usize..8).prop_map(Step::Confirm),
        1 => Just(Step::Snapshot),
    ]
}

fn config() -> impl Strategy<Value = QueueConfig> {
    let backoff = prop_oneof![
        (0u64..200, 0u64..500, 1_000u32..4_000, 0u32..=1_000).prop_map(|(i, extra, m, j)| {
            Backoff::exponential(i, i + extra, m, j).expect("valid")
        }),
        proptest::collection::vec(0u64..300, 1..4)
            .prop_map(|delays| Backoff::list(delays).expect("valid")),
    ];
    (
        50u64..300,
        1u32..5,
        1usize..6,
        0usize..10,
        prop::bool::ANY,
        backoff,
    )
        .prop_map(
            |(ack_wait_ms, max_deliveries, in_flight_max, window_extra, per_key, backoff)| {
                QueueConfig {
                    ack_wait_ms,
                    max_deliveries,
                    in_flight_max,
                    window_records_max: in_flight_max + window_extra,
                    key_ordering: if per_key {
                        KeyOrdering::PerKey
                    } else {
                        KeyOrdering::Unordered
                    },
                    backoff,
                }
            },
        )
}

/// What the model says a record's state is (records never delivered are absent).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Model {
    Held {
        member: usize,
        attempt: u32,
        lease_until_ms: u64,
    },
    Waiting {
        count: u32,
        not_before_ms: u64,
    },
    DeadLettering {
        count: u32,
    },
    Done,
}

struct Harness {
    config: QueueConfig,
    partition: QueuePartition,
    log: Vec<QueueRecord>,
    snapshots: Vec<usize>,
    now_ms: u64,
    /// The topic partition's records: offset -> key hash.
    topic: BTreeMap<u64, Option<u64>>,
    model: BTreeMap<u64, Model>,
    /// Per member: the deliveries it received (offset, attempt), newest last.
    history: Vec<Vec<(u64, u32)>>,
}

fn member_id(member: usize) -> String {
    format!("member-{member}")
}

impl Harness {
    fn new(config: QueueConfig) -> Harness {
        let partition = QueuePartition::new(config.clone(), 0).expect("config");
        let log = partition.snapshot();
        Harness {
            config,
            partition,
            log,
            snapshots: vec![0],
            now_ms: 0,
            topic: BTreeMap::new(),
            model: BTreeMap::new(),
            history: vec![Vec::new(); MEMBERS],
        }
    }

    fn held(&self) -> usize {
        self.model
            .values()
            .filter(|m| matches!(m, Model::Held { .. }))
            .count()
    }

    fn acquire(
        &mut self,
        member: usize,
        max_records: usize,
        read: usize,
    ) -> Result<(), TestCaseError> {
        let end = self.partition.end_offset();
        let candidates: Vec<(u64, Option<u64>)> = self
            .topic
            .range(end..)
            .take(read)
            .map(|(&o, &k)| (o, k))
            .collect();
        let acquisition = self
            .partition
            .acquire(&member_id(member), self.now_ms, max_records, &candidates)
            .map_err(|e| TestCaseError::fail(format!("acquire: {e}")))?;
        self.log.extend(acquisition.records);
        prop_assert!(acquisition.acquired.len() <= max_records);
        prop_assert!(acquisition
            .acquired
            .windows(2)
            .all(|w| w[0].offset < w[1].offset));
        for got in acquisition.acquired {
            let offset = got.offset;
            prop_assert!(
                self.topic.contains_key(&offset),
                "{offset} is not in the topic"
            );
            let previous = match self.model.get(&offset) {
                None => 0,
                Some(&Model::Waiting {
                    count,
                    not_before_ms,
                }) => {
                    prop_assert!(
                        not_before_ms <= self.now_ms,
                        "{offset} handed out before its backoff"
                    );
                    count
                }
                Some(other) => {
                    prop_assert!(false, "{offset} handed out while {other:?}");
                    unreachable!()
                }
            };
            prop_assert_eq!(got.delivery_attempt, previous + 1, "attempt of {}", offset);
            prop_assert!(got.delivery_attempt <= self.config.max_deliveries);
            prop_assert_eq!(got.lease_until_ms, self.now_ms + self.config.ack_wait_ms);
            if self.config.key_ordering == KeyOrdering::PerKey {
                if let Some(key) = self.topic[&offset] {
                    // Every earlier record of the key is done, so none is in flight either.
                    for (&earlier, _) in
                        self.topic.range(..offset).filter(|(_, k)| **k == Some(key))
                    {
                        prop_assert_eq!(
                            self.model.get(&earlier),
                            Some(&Model::Done),
                            "{} (key {}) handed out before {} was done",
                            offset,
                            key,
                            earlier
                        );
                    }
                }
            }
            self.model.insert(
                offset,
                Model::Held {
                    member,
                    attempt: got.delivery_attempt,
                    lease_until_ms: got.lease_until_ms,
                },
            );
            let history = &mut self.history[member];
            history.push((offset, got.delivery_attempt));
            if history.len() > HISTORY_MAX {
                history.remove(0);
            }
        }
        prop_assert!(
            self.held() <= self.config.in_flight_max,
            "in flight above the limit"
        );
        Ok(())
    }

    /// The delivery a settle step refers to, and whether the model says it is current.
    fn delivery(&self, s: Settle) -> Option<(usize, u64, u32, bool)> {
        let history = &self.history[s.member];
        if history.is_empty() {
            return None;
        }
        let (offset, attempt) = history[s.pick % history.len()];
        let sender = if s.impostor {
            (s.member + 1) % MEMBERS
        } else {
            s.member
        };
        let current = matches!(
            self.model.get(&offset),
            Some(&Model::Held { member, attempt: a, .. }) if member == sender && a == attempt
        );
        Some((sender, offset, attempt, current))
    }

    /// Runs a settlement; a stale one must be refused without any change.
    fn settle<T, E: std::fmt::Debug>(
        &mut self,
        s: Settle,
        what: &str,
        run: impl FnOnce(&mut QueuePartition, Delivery<'_>) -> Result<T, E>,
    ) -> Result<Option<(u64, u32, T)>, TestCaseError> {
        let Some((sender, offset, attempt, current)) = self.delivery(s) else {
            return Ok(None);
        };
        let before = self.partition.snapshot();
        let id = member_id(sender);
        let result = run(
            &mut self.partition,
            Delivery {
                member: &id,
                offset,
                delivery_attempt: attempt,
            },
        );
        match result {
            Ok(value) => {
                prop_assert!(
                    current,
                    "stale {what} of {offset} attempt {attempt} by {id} accepted"
                );
                Ok(Some((offset, attempt, value)))
            }
            Err(error) => {
                prop_assert!(!current, "current {what} of {offset} refused: {error:?}");
                prop_assert_eq!(
                    &self.partition.snapshot(),
                    &before,
                    "a refused {} changed the state",
                    what
                );
                Ok(None)
            }
        }
    }

    /// A failed delivery (nack without delay, expiry) went to the backoff or dead-lettered.
    fn check_failed(
        &mut self,
        offset: u64,
        attempt: u32,
        records: &[QueueRecord],
        dead_lettered: bool,
        not_before_range: (u64, u64),
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(
            dead_lettered,
            attempt >= self.config.max_deliveries,
            "{} at attempt {}",
            offset,
            attempt
        );
        if dead_lettered {
            self.model
                .insert(offset, Model::DeadLettering { count: attempt });
        } else {
            let not_before_ms = records.iter().find_map(|r| match *r {
                QueueRecord::Released {
                    offset: o,
                    delivery_count,
                    not_before_ms,
                } if o == offset => Some((delivery_count, not_before_ms)),
                _ => None,
            });
            let Some((count, not_before_ms)) = not_before_ms else {
                prop_assert!(false, "{offset} not released");
                unreachable!()
            };
            prop_assert_eq!(count, attempt);
            prop_assert!(
                not_before_range.0 <= not_before_ms && not_before_ms <= not_before_range.1,
                "{} not before {} outside {:?}",
                offset,
                not_before_ms,
                not_before_range
            );
            self.model.insert(
                offset,
                Model::Waiting {
                    count,
                    not_before_ms,
                },
            );
        }
        Ok(())
    }

    fn backoff_range(&self, attempt: u32) -> (u64, u64) {
        (
            self.now_ms + self.config.backoff.delay_floor_ms(attempt),
            self.now_ms + self.config.backoff.delay_unjittered_ms(attempt),
        )
    }

    fn run(&mut self, step: Step) -> Result<(), TestCaseError> {
        match step {
            Step::Produce(records) => {
                let mut next = self.topic.keys().next_back().map_or(0, |o| o + 1);
                for (gap, key) in records {
                    next += u64::from(gap);
                    self.topic.insert(next, key);
                    next += 1;
                }
            }
            Step::Acquire {
                member,
                max_records,
                read,
            } => self.acquire(member, max_records, read)?,
            Step::Ack(s) => {
                if let Some((offset, _, records)) = self.settle(s, "ack", |p, d| p.ack(d))? {
                    self.log.extend(records);
                    self.model.insert(offset, Model::Done);
                }
            }
            Step::Nack(s, delay_ms, jitter_sample) => {
                let options = NackOptions {
                    delay_ms,
                    now_ms: self.now_ms,
                    jitter_sample,
                };
                if let Some((offset, attempt, changes)) =
                    self.settle(s, "nack", |p, d| p.nack(d, options))?
                {
                    let dead = !changes.dead_letters.is_empty();
                    if dead {
                        prop_assert_eq!(changes.dead_letters.len(), 1);
                        prop_assert_eq!(changes.dead_letters[0].delivery_count, attempt);
                        prop_assert_eq!(
                            &changes.dead_letters[0].reason,
                            &DeadLetterReason::MaxDeliveries {
                                last: DeliveryFailure::Nacked
                            }
                        );
                    }
                    let range = match delay_ms {
                        Some(d) => (self.now_ms + d, self.now_ms + d),
                        None => self.backoff_range(attempt),
                    };
                    self.check_failed(offset, attempt, &changes.records, dead, range)?;
                    self.log.extend(changes.records);
                }
            }
            Step::Reject(s) => {
                if let Some((offset, attempt, changes)) =
                    self.settle(s, "reject", |p, d| p.reject(d, "no".into()))?
                {
                    prop_assert_eq!(changes.dead_letters.len(), 1);
                    prop_assert_eq!(changes.dead_letters[0].delivery_count, attempt);
                    self.model
                        .insert(offset, Model::DeadLettering { count: attempt });
                    self.log.extend(changes.records);
                }
            }
            Step::Extend(s) => {
                let now_ms = self.now_ms;
                if let Some((offset, _, (lease_until_ms, records))) =
                    self.settle(s, "extend", |p, d| p.extend(d, now_ms))?
                {
                    let Some(Model::Held {
                        lease_until_ms: old,
                        ..
                    }) = self.model.get_mut(&offset)
                    else {
                        unreachable!("accepted, so held");
                    };
                    prop_assert_eq!(lease_until_ms, (now_ms + self.config.ack_wait_ms).max(*old));
                    *old = lease_until_ms;
                    self.log.extend(records);
                }
            }
            Step::Advance(ms, jitter_sample) => {
                self.now_ms += ms;
                let changes = self.partition.expire(self.now_ms, jitter_sample);
                let due: Vec<(u64, u32)> = self
                    .model
                    .iter()
                    .filter_map(|(&o, m)| match *m {
                        Model::Held {
                            attempt,
                            lease_until_ms,
                            ..
                        } if lease_until_ms <= self.now_ms => Some((o, attempt)),
                        _ => None,
                    })
                    .collect();
                let dead: Vec<u64> = changes.dead_letters.iter().map(|d| d.offset).collect();
                for (offset, attempt) in due {
                    let range = self.backoff_range(attempt);
                    self.check_failed(
                        offset,
                        attempt,
                        &changes.records,
                        dead.contains(&offset),
                        range,
                    )?;
                }
                for d in &changes.dead_letters {
                    prop_assert_eq!(
                        self.model.get(&d.offset),
                        Some(&Model::DeadLettering {
                            count: d.delivery_count
                        })
                    );
                    prop_assert_eq!(
                        &d.reason,
                        &DeadLetterReason::MaxDeliveries {
                            last: DeliveryFailure::LeaseExpired
                        }
                    );
                }
                self.log.extend(changes.records);
                prop_assert!(self
                    .partition
                    .next_deadline_ms()
                    .is_none_or(|d| d > self.now_ms));
            }
            Step::Confirm(pick) => {
                let pending: Vec<u64> = self
                    .model
                    .iter()
                    .filter(|(_, m)| matches!(m, Model::DeadLettering { .. }))
                    .map(|(&o, _)| o)
                    .collect();
                let expected: Vec<u64> = self
                    .partition
                    .pending_dead_letters()
                    .iter()
                    .map(|d| d.offset)
                    .collect();
                prop_assert_eq!(&pending, &expected);
                if pending.is_empty() {
                    // Confirming anything else is refused.
                    let offset = pick as u64;
                    let before = self.partition.snapshot();
                    prop_assert!(self.partition.confirm_dead_lettered(offset).is_err());
                    prop_assert_eq!(self.partition.snapshot(), before);
                } else {
                    let offset = pending[pick % pending.len()];
                    let records = self
                        .partition
                        .confirm_dead_lettered(offset)
                        .map_err(|e| TestCaseError::fail(format!("{e}")))?;
                    self.log.extend(records);
                    self.model.insert(offset, Model::Done);
                }
            }
            Step::Snapshot => {
                self.snapshots.push(self.log.len());
                self.log.extend(self.partition.snapshot());
            }
        }
        Ok(())
    }

    /// The partition agrees with the model, record by record.
    fn check_state(&self, start_before: u64) -> Result<(), TestCaseError> {
        self.partition.check_invariants();
        let start = self.partition.start_offset();
        prop_assert!(start >= start_before, "start moved back");
        // Everything below the start is done; the record at it (if tracked) is not.
        for (&offset, _) in self.topic.range(..start) {
            prop_assert_eq!(
                self.model.get(&offset),
                Some(&Model::Done),
                "start {} passed {}",
                start,
                offset
            );
        }
        prop_assert_eq!(self.partition.in_flight_count(), self.held());
        prop_assert!(self.partition.in_flight_count() <= self.config.in_flight_max);
        prop_assert!(
            self.partition.window_len() <= self.config.window_records_max,
            "window above its limit"
        );
        for (&offset, model) in self.model.range(start..) {
            let state = self.partition.record_state(offset);
            let agrees = match (model, state) {
                (
                    Model::Held {
                        member,
                        attempt,
                        lease_until_ms,
                    },
                    Some(RecordState::Acquired {
                        member: m,
                        delivery_count,
                        lease_until_ms: l,
                    }),
                ) => *m == member_id(*member) && delivery_count == attempt && l == lease_until_ms,
                (
                    Model::Waiting {
                        count,
                        not_before_ms,
                    },
                    Some(RecordState::Available {
                        delivery_count,
                        not_before_ms: n,
                    }),
                ) => delivery_count == count && n == not_before_ms,
                (
                    Model::DeadLettering { count },
                    Some(RecordState::DeadLettering { delivery_count, .. }),
                ) => delivery_count == count,
                (Model::Done, Some(RecordState::Acked | RecordState::DeadLettered)) => true,
                _ => false,
            };
            prop_assert!(agrees, "{offset}: model {model:?}, state {state:?}");
        }
        Ok(())
    }

    fn check_replay(&self) -> Result<(), TestCaseError> {
        let live = self.partition.snapshot();
        for &at in &self.snapshots {
            let replayed =
                QueuePartition::replay(self.config.clone(), self.log[at..].iter().cloned())
                    .map_err(|e| TestCaseError::fail(format!("replay from {at}: {e}")))?;
            prop_assert_eq!(
                &replayed.snapshot(),
                &live,
                "replay from the snapshot at {} differs",
                at
            );
        }
        let alone = QueuePartition::replay(self.config.clone(), live.clone())
            .map_err(|e| TestCaseError::fail(format!("snapshot replay: {e}")))?;
        prop_assert_eq!(&alone.snapshot(), &live, "the snapshot alone differs");
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_every_delivery_rule(
        config in config(),
        steps in proptest::collection::vec(step(), 1..150),
    ) {
        let mut h = Harness::new(config);
        for (index, step) in steps.into_iter().enumerate() {
            let start_before = h.partition.start_offset();
            let description = format!("step {index}: {step:?}");
            h.run(step).map_err(|e| TestCaseError::fail(format!("{description}: {e}")))?;
            h.check_state(start_before).map_err(|e| TestCaseError::fail(format!("after {description}: {e}")))?;
            if index % 16 == 0 {
                h.check_replay()?;
            }
        }
        h.check_replay()?;
    }
}
