//! Scenario tests of one queue partition, each a short script: leases expiring and the record
//! coming back with its next attempt number, the backoff schedule, explicit nack delays,
//! rejects and running out of deliveries (dead-lettering, confirmed after the copy), stale
//! settlements, per-key ordering, and the in-flight and window limits.

use wharf_queues::{
    AckError, AcquireError, Acquired, Backoff, ConfigError, ConfirmError, DeadLetter,
    DeadLetterReason, Delivery, DeliveryFailure, KeyOrdering, NackError, NackOptions, QueueConfig,
    QueuePartition, QueueRecord, RecordState, ReplayError, StaleDelivery, DELIVERIES_MAX,
    IN_FLIGHT_RECORDS_MAX, NACK_DELAY_MS_MAX, WINDOW_RECORDS_MAX,
};

const ACK_WAIT_MS: u64 = 1_000;

fn config() -> QueueConfig {
    QueueConfig {
        ack_wait_ms: ACK_WAIT_MS,
        max_deliveries: 3,
        in_flight_max: 100,
        window_records_max: 1_000,
        key_ordering: KeyOrdering::Unordered,
        // No jitter: the scenarios check exact times.
        backoff: Backoff::exponential(100, 10_000, 2_000, 0).expect("valid"),
    }
}

/// The partition plus its whole state log, checked to replay to the same state.
struct Queue {
    partition: QueuePartition,
    log: Vec<QueueRecord>,
}

impl Queue {
    fn new(config: QueueConfig) -> Queue {
        let partition = QueuePartition::new(config, 0).expect("config");
        let log = partition.snapshot();
        Queue { partition, log }
    }

    /// Acquires from a log of `count` unkeyed records starting at offset 0.
    fn acquire(
        &mut self,
        member: &str,
        now_ms: u64,
        max_records: usize,
        count: u64,
    ) -> Vec<Acquired> {
        let candidates: Vec<(u64, Option<u64>)> = (0..count).map(|o| (o, None)).collect();
        self.acquire_from(member, now_ms, max_records, &candidates)
    }

    fn acquire_from(
        &mut self,
        member: &str,
        now_ms: u64,
        max_records: usize,
        log: &[(u64, Option<u64>)],
    ) -> Vec<Acquired> {
        let end = self.partition.end_offset();
        let candidates: Vec<(u64, Option<u64>)> =
            log.iter().copied().filter(|(o, _)| *o >= end).collect();
        let acquisition = self
            .partition
            .acquire(member, now_ms, max_records, &candidates)
            .expect("acquire");
        self.log.extend(acquisition.records);
        acquisition.acquired
    }

    fn check_replay(&self) {
        self.partition.check_invariants();
        let replayed = QueuePartition::replay(self.partition.config().clone(), self.log.clone())
            .expect("replay");
        assert_eq!(replayed.snapshot(), self.partition.snapshot());
        let from_snapshot =
            QueuePartition::replay(self.partition.config().clone(), self.partition.snapshot())
                .expect("replay the snapshot");
        assert_eq!(from_snapshot.snapshot(), self.partition.snapshot());
    }
}

fn delivery(member: &str, acquired: Acquired) -> Delivery<'_> {
    Delivery {
        member,
        offset: acquired.offset,
        delivery_attempt: acquired.delivery_attempt,
    }
}

fn nack_options(now_ms: u64) -> NackOptions {
    NackOptions {
        delay_ms: None,
        now_ms,
        jitter_sample: 0,
    }
}

#[test]
fn an_expired_lease_brings_the_record_back_with_attempt_two() {
    let mut q = Queue::new(config());
    let first = q.acquire("a", 0, 10, 1);
    assert_eq!(
        first,
        [Acquired {
            offset: 0,
            delivery_attempt: 1,
            lease_until_ms: ACK_WAIT_MS
        }]
    );
    assert_eq!(q.partition.next_deadline_ms(), Some(ACK_WAIT_MS));
    // Not yet: the lease holds until its deadline.
    let changes = q.partition.expire(ACK_WAIT_MS - 1, 0);
    assert!(changes.records.is_empty());
    assert!(q.acquire("b", ACK_WAIT_MS - 1, 10, 1).is_empty());
    let changes = q.partition.expire(ACK_WAIT_MS, 0);
    assert_eq!(
        changes.records,
        [QueueRecord::Released {
            offset: 0,
            delivery_count: 1,
            not_before_ms: ACK_WAIT_MS + 100
        }]
    );
    q.log.extend(changes.records);
    assert_eq!(q.partition.next_deadline_ms(), None);
    assert_eq!(
        q.partition.next_available_ms(ACK_WAIT_MS),
        Some(ACK_WAIT_MS + 100)
    );
    // The backoff holds it back, then member b gets it as attempt 2.
    assert!(q.acquire("b", ACK_WAIT_MS + 99, 10, 1).is_empty());
    let second = q.acquire("b", ACK_WAIT_MS + 100, 10, 1);
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].delivery_attempt, 2);
    assert_eq!(second[0].lease_until_ms, ACK_WAIT_MS + 100 + ACK_WAIT_MS);
    assert_eq!(q.partition.deliveries_by_attempt()[..2], [1, 1]);
    q.check_replay();
}

#[test]
fn the_backoff_schedule_sets_each_next_delivery_time() {
    let mut cfg = config();
    cfg.max_deliveries = 6;
    let mut q = Queue::new(cfg);
    let mut now_ms = 0;
    // 100, 200, 400, 800, 1600 ms after attempts 1..=5.
    for (attempt, delay_ms) in (1..=5).zip([100, 200, 400, 800, 1_600]) {
        let got = q.acquire("a", now_ms, 1, 1);
        assert_eq!(got.len(), 1, "attempt {attempt} at {now_ms}");
        assert_eq!(got[0].delivery_attempt, attempt);
        now_ms += 10;
        let changes = q
            .partition
            .nack(delivery("a", got[0]), nack_options(now_ms))
            .expect("nack");
        assert_eq!(
            changes.records,
            [QueueRecord::Released {
                offset: 0,
                delivery_count: attempt,
                not_before_ms: now_ms + delay_ms
            }]
        );
        q.log.extend(changes.records);
        assert!(q.acquire("a", now_ms + delay_ms - 1, 1, 1).is_empty());
        now_ms += delay_ms;
    }
    q.check_replay();
}

#[test]
fn a_list_backoff_is_followed_exactly() {
    let mut cfg = config();
    cfg.max_deliveries = 5;
    cfg.backoff = Backoff::list(vec![1_000, 5_000, 30_000]).expect("valid");
    let mut q = Queue::new(cfg);
    let mut now_ms = 0;
    for delay_ms in [1_000, 5_000, 30_000, 30_000] {
        let got = q.acquire("a", now_ms, 1, 1);
        let changes = q
            .partition
            .nack(delivery("a", got[0]), nack_options(now_ms))
            .expect("nack");
        let Some(&QueueRecord::Released { not_before_ms, .. }) = changes.records.first() else {
            panic!("not released: {changes:?}");
        };
        assert_eq!(not_before_ms, now_ms + delay_ms);
        q.log.extend(changes.records);
        now_ms = not_before_ms;
    }
}

#[test]
fn a_nack_with_an_explicit_delay_overrides_the_backoff() {
    let mut q = Queue::new(config());
    let got = q.acquire("a", 0, 1, 1);
    let options = NackOptions {
        delay_ms: Some(5_000),
        ..nack_options(50)
    };
    let changes = q
        .partition
        .nack(delivery("a", got[0]), options)
        .expect("nack");
    assert!(changes.dead_letters.is_empty());
    q.log.extend(changes.records);
    assert_eq!(
        q.partition.record_state(0),
        Some(&RecordState::Available {
            delivery_count: 1,
            not_before_ms: 5_050
        })
    );
    assert!(q.acquire("a", 5_049, 1, 1).is_empty());
    assert_eq!(q.acquire("a", 5_050, 1, 1)[0].delivery_attempt, 2);
    // A delay beyond the limit is refused and changes nothing.
    let before = q.partition.snapshot();
    let got = Acquired {
        offset: 0,
        delivery_attempt: 2,
        lease_until_ms: 0,
    };
    let options = NackOptions {
        delay_ms: Some(NACK_DELAY_MS_MAX + 1),
        ..nack_options(6_000)
    };
    assert_eq!(
        q.partition.nack(delivery("a", got), options),
        Err(NackError::DelayTooLong {
            delay_ms: NACK_DELAY_MS_MAX + 1
        })
    );
    assert_eq!(q.partition.snapshot(), before);
    q.check_replay();
}

#[test]
fn a_reject_dead_letters_at_once_with_its_reason_and_waits_for_the_copy() {
    let mut q = Queue::new(config());
    let got = q.acquire("a", 0, 10, 2);
    let changes = q
        .partition
        .reject(delivery("a", got[0]), "bad payload".into())
        .expect("reject");
    let expected = DeadLetter {
        offset: 0,
        delivery_count: 1,
        reason: DeadLetterReason::Rejected("bad payload".into()),
    };
    assert_eq!(changes.dead_letters, std::slice::from_ref(&expected));
    q.log.extend(changes.records);
    // Not done until the copy is confirmed: the start stays, and a crash now re-issues it.
    assert_eq!(q.partition.start_offset(), 0);
    assert_eq!(q.partition.dead_lettering_count(), 1);
    assert_eq!(q.partition.in_flight_count(), 1);
    let restarted = QueuePartition::replay(config(), q.log.clone()).expect("replay");
    assert_eq!(restarted.pending_dead_letters(), [expected]);
    let records = q.partition.confirm_dead_lettered(0).expect("confirm");
    assert_eq!(
        records,
        [
            QueueRecord::DeadLettered { offset: 0 },
            QueueRecord::StartAdvanced { start_offset: 1 }
        ]
    );
    q.log.extend(records);
    assert_eq!(
        q.partition.confirm_dead_lettered(0),
        Err(ConfirmError::NotDeadLettering { offset: 0 })
    );
    assert_eq!(
        q.partition.confirm_dead_lettered(1),
        Err(ConfirmError::NotDeadLettering { offset: 1 })
    );
    assert!(q.partition.pending_dead_letters().is_empty());
    q.check_replay();
}

#[test]
fn the_last_failed_delivery_dead_letters_with_its_count() {
    let mut q = Queue::new(config());
    let mut now_ms = 0;
    // Attempts 1 and 2 fail by nack and expiry; attempt 3 (the last) by expiry.
    let got = q.acquire("a", now_ms, 1, 1);
    let changes = q
        .partition
        .nack(delivery("a", got[0]), nack_options(now_ms))
        .expect("nack");
    assert!(changes.dead_letters.is_empty());
    q.log.extend(changes.records);
    now_ms += 100;
    let got = q.acquire("b", now_ms, 1, 1);
    assert_eq!(got[0].delivery_attempt, 2);
    now_ms = got[0].lease_until_ms;
    let changes = q.partition.expire(now_ms, 0);
    assert!(changes.dead_letters.is_empty());
    q.log.extend(changes.records);
    now_ms += 200;
    let got = q.acquire("c", now_ms, 1, 1);
    assert_eq!(got[0].delivery_attempt, 3);
    now_ms = got[0].lease_until_ms;
    let changes = q.partition.expire(now_ms, 0);
    assert_eq!(
        changes.dead_letters,
        [DeadLetter {
            offset: 0,
            delivery_count: 3,
            reason: DeadLetterReason::MaxDeliveries {
                last: DeliveryFailure::LeaseExpired
            },
        }]
    );
    q.log.extend(changes.records);
    // Never handed out again.
    assert!(q.acquire("a", now_ms + 1_000_000, 1, 1).is_empty());
    q.log
        .extend(q.partition.confirm_dead_lettered(0).expect("confirm"));
    assert_eq!(q.partition.start_offset(), 1);
    q.check_replay();
}

#[test]
fn a_nack_of_the_last_delivery_dead_letters() {
    let mut cfg = config();
    cfg.max_deliveries = 1;
    let mut q = Queue::new(cfg);
    let got = q.acquire("a", 0, 1, 1);
    let changes = q
        .partition
        .nack(delivery("a", got[0]), nack_options(0))
        .expect("nack");
    assert_eq!(
        changes.dead_letters,
        [DeadLetter {
            offset: 0,
            delivery_count: 1,
            reason: DeadLetterReason::MaxDeliveries {
                last: DeliveryFailure::Nacked
            },
        }]
    );
}

#[test]
fn a_stale_ack_cannot_settle_the_redelivery() {
    let mut q = Queue::new(config());
    let first = q.acquire("a", 0, 1, 1)[0];
    q.log.extend(q.partition.expire(ACK_WAIT_MS, 0).records);
    // While the record waits, the old delivery's ack is refused.
    assert_eq!(
        q.partition.ack(delivery("a", first)),
        Err(AckError::Stale(StaleDelivery::NotAcquired { offset: 0 }))
    );
    // Redelivered to the same member: the first attempt's ack still cannot confirm it.
    let second = q.acquire("a", ACK_WAIT_MS + 100, 1, 1)[0];
    assert_eq!(second.delivery_attempt, 2);
    let before = q.partition.snapshot();
    assert_eq!(
        q.partition.ack(delivery("a", first)),
        Err(AckError::Stale(StaleDelivery::AttemptMismatch {
            offset: 0,
            sent: 1,
            current: 2
        }))
    );
    assert!(q
        .partition
        .extend(delivery("a", first), ACK_WAIT_MS + 200)
        .is_err());
    assert!(q
        .partition
        .nack(delivery("a", first), nack_options(ACK_WAIT_MS + 200))
        .is_err());
    assert!(q
        .partition
        .reject(delivery("a", first), "x".into())
        .is_err());
    assert_eq!(
        q.partition.ack(delivery("b", second)),
        Err(AckError::Stale(StaleDelivery::OtherMember { offset: 0 }))
    );
    assert_eq!(q.partition.snapshot(), before, "refusals change nothing");
    // The current delivery's ack is accepted, once.
    q.log
        .extend(q.partition.ack(delivery("a", second)).expect("ack"));
    assert_eq!(q.partition.start_offset(), 1);
    assert!(q.partition.ack(delivery("a", second)).is_err());
    q.check_replay();
}

#[test]
fn an_extended_lease_is_not_reclaimed() {
    let mut q = Queue::new(config());
    let got = q.acquire("a", 0, 1, 1)[0];
    let (lease_until_ms, records) = q.partition.extend(delivery("a", got), 900).expect("extend");
    assert_eq!(lease_until_ms, 900 + ACK_WAIT_MS);
    q.log.extend(records);
    assert!(q.partition.expire(ACK_WAIT_MS, 0).records.is_empty());
    assert_eq!(q.partition.next_deadline_ms(), Some(900 + ACK_WAIT_MS));
    q.check_replay();
}

#[test]
fn per_key_ordering_holds_back_later_records_of_a_busy_key() {
    let mut cfg = config();
    cfg.key_ordering = KeyOrdering::PerKey;
    let mut q = Queue::new(cfg);
    // Keys: 0:k1 1:k2 2:k1 3:none 5:k2 (offset 4 was compacted away).
    let log = [
        (0, Some(1)),
        (1, Some(2)),
        (2, Some(1)),
        (3, None),
        (5, Some(2)),
    ];
    let got: Vec<u64> = q
        .acquire_from("a", 0, 10, &log)
        .iter()
        .map(|a| a.offset)
        .collect();
    assert_eq!(got, [0, 1, 3]);
    // Offset 2 was tracked (skipped for its key); 4 is not in the log; 5 stays untracked.
    assert_eq!(q.partition.end_offset(), 4);
    assert!(q.acquire_from("b", 0, 10, &log).is_empty());
    let first = Acquired {
        offset: 0,
        delivery_attempt: 1,
        lease_until_ms: ACK_WAIT_MS,
    };
    // A nack of key 1's first record keeps the key blocked: the redelivery comes first.
    q.log.extend(
        q.partition
            .nack(delivery("a", first), nack_options(0))
            .expect("nack")
            .records,
    );
    assert!(q.acquire_from("b", 50, 10, &log).is_empty());
    let again = q.acquire_from("b", 100, 10, &log);
    assert_eq!(again.iter().map(|a| a.offset).collect::<Vec<_>>(), [0]);
    q.log
        .extend(q.partition.ack(delivery("b", again[0])).expect("ack"));
    let got: Vec<u64> = q
        .acquire_from("b", 100, 10, &log)
        .iter()
        .map(|a| a.offset)
        .collect();
    assert_eq!(got, [2]);
    let second = Acquired {
        offset: 1,
        delivery_attempt: 1,
        lease_until_ms: ACK_WAIT_MS,
    };
    q.log
        .extend(q.partition.ack(delivery("a", second)).expect("ack"));
    let got: Vec<u64> = q
        .acquire_from("b", 100, 10, &log)
        .iter()
        .map(|a| a.offset)
        .collect();
    assert_eq!(got, [5]);
    q.check_replay();
}

#[test]
fn acquisition_stops_at_the_in_flight_limit() {
    let mut cfg = config();
    cfg.in_flight_max = 3;
    let mut q = Queue::new(cfg);
    assert_eq!(q.acquire("a", 0, 2, 10).len(), 2);
    assert_eq!(q.acquire("b", 0, 10, 10).len(), 1);
    assert_eq!(q.partition.in_flight_count(), 3);
    assert!(q.acquire("c", 0, 10, 10).is_empty());
    let done = Acquired {
        offset: 1,
        delivery_attempt: 1,
        lease_until_ms: ACK_WAIT_MS,
    };
    q.log
        .extend(q.partition.ack(delivery("a", done)).expect("ack"));
    assert_eq!(
        q.acquire("c", 0, 10, 10)
            .iter()
            .map(|a| a.offset)
            .collect::<Vec<_>>(),
        [3]
    );
    q.check_replay();
}

#[test]
fn a_stuck_oldest_record_stops_new_deliveries_at_the_window_limit() {
    let mut cfg = config();
    cfg.in_flight_max = 4;
    cfg.window_records_max = 4;
    let mut q = Queue::new(cfg);
    let stuck = q.acquire("slow", 0, 1, 100)[0];
    assert_eq!(stuck.offset, 0);
    // Records 1..=3 come and go; the window (0..=3) is then full while 0 is held.
    for _ in 0..3 {
        let got = q.acquire("fast", 0, 1, 100)[0];
        q.log
            .extend(q.partition.ack(delivery("fast", got)).expect("ack"));
    }
    assert_eq!(q.partition.window_len(), 4);
    assert_eq!(q.partition.end_offset(), 4);
    assert!(
        q.acquire("fast", 0, 10, 100).is_empty(),
        "the window is full"
    );
    assert_eq!(q.partition.oldest_pending_offset(), Some(0));
    // Once the oldest is done the window slides and deliveries resume.
    q.log
        .extend(q.partition.ack(delivery("slow", stuck)).expect("ack"));
    assert_eq!(q.partition.start_offset(), 4);
    assert_eq!(q.partition.window_len(), 0);
    assert_eq!(q.acquire("fast", 0, 10, 100).len(), 4);
    q.check_replay();
}

#[test]
fn bad_calls_get_typed_errors() {
    let mut q = Queue::new(config());
    assert_eq!(
        q.partition.acquire("", 0, 1, &[]),
        Err(AcquireError::InvalidMemberId { bytes: 0 })
    );
    assert_eq!(
        q.partition.acquire("a", 0, 1, &[(3, None), (3, None)]),
        Err(AcquireError::CandidatesNotAscending {
            previous: 3,
            offset: 3
        })
    );
    let bad = |edit: fn(&mut QueueConfig)| {
        let mut cfg = config();
        edit(&mut cfg);
        QueuePartition::new(cfg, 0).err()
    };
    assert_eq!(bad(|c| c.ack_wait_ms = 0), Some(ConfigError::AckWaitZero));
    assert!(matches!(
        bad(|c| c.max_deliveries = 0),
        Some(ConfigError::MaxDeliveries { .. })
    ));
    assert!(matches!(
        bad(|c| c.max_deliveries = DELIVERIES_MAX + 1),
        Some(ConfigError::MaxDeliveries { .. })
    ));
    assert!(matches!(
        bad(|c| c.in_flight_max = IN_FLIGHT_RECORDS_MAX + 1),
        Some(ConfigError::InFlightMax { .. })
    ));
    assert!(matches!(
        bad(|c| c.window_records_max = WINDOW_RECORDS_MAX + 1),
        Some(ConfigError::WindowRecordsMax { .. })
    ));
    assert!(matches!(
        bad(|c| c.backoff = Backoff::List { delays_ms: vec![] }),
        Some(ConfigError::Backoff(_))
    ));
    // A state log must begin with a snapshot, and its records must apply.
    assert_eq!(
        QueuePartition::replay(config(), [QueueRecord::Acked { offset: 0 }]).err(),
        Some(ReplayError::NoSnapshot)
    );
    assert!(matches!(
        QueuePartition::replay(
            config(),
            [
                QueueRecord::Snapshot { start_offset: 0 },
                QueueRecord::Acked { offset: 0 }
            ]
        ),
        Err(ReplayError::Inconsistent { index: 1, .. })
    ));
}

#[test]
fn the_full_window_limit_is_reachable_and_compacts_to_a_snapshot() {
    let mut cfg = config();
    cfg.window_records_max = WINDOW_RECORDS_MAX;
    cfg.in_flight_max = 4_096;
    let mut q = Queue::new(cfg);
    let stuck = q.acquire("slow", 0, 1, 1)[0];
    let log: Vec<(u64, Option<u64>)> = (0..WINDOW_RECORDS_MAX as u64 + 10)
        .map(|o| (o, None))
        .collect();
    // In batches: every record after the stuck one is delivered and acked.
    loop {
        let end = q.partition.end_offset();
        let candidates: Vec<_> = log
            .iter()
            .copied()
            .filter(|(o, _)| *o >= end)
            .take(5_000)
            .collect();
        let acquisition = q
            .partition
            .acquire("fast", 0, 4_000, &candidates)
            .expect("acquire");
        q.log.extend(acquisition.records);
        if acquisition.acquired.is_empty() {
            break;
        }
        for got in acquisition.acquired {
            q.log
                .extend(q.partition.ack(delivery("fast", got)).expect("ack"));
        }
    }
    q.partition.check_invariants();
    assert_eq!(q.partition.window_len(), WINDOW_RECORDS_MAX);
    assert_eq!(q.partition.end_offset(), WINDOW_RECORDS_MAX as u64);
    q.check_replay();
    q.log
        .extend(q.partition.ack(delivery("slow", stuck)).expect("ack"));
    assert_eq!(q.partition.window_len(), 0);
    assert_eq!(q.partition.start_offset(), WINDOW_RECORDS_MAX as u64);
    q.check_replay();
}
