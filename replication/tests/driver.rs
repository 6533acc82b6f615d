//! The partition driver core (`wharf_replication::driver`) over a `MemDisk` log and a host that
//! records what it was asked to do: produces are all-or-none, refusals reach the caller,
//! backpressure leaves no waiter behind, the topic's durability decides when an append counts,
//! fetched batches stop at the first bad one, and the controller's state waits for a log change
//! in progress. The simulator (`wharf-tests`) runs the same core through faults.

use std::collections::BTreeSet;
use std::rc::Rc;

use futures_lite::future::block_on;
use rkyv::util::AlignedVec;
use wharf_replication::driver::{
    self, Durability, Fetched, PartitionHost, PartitionState, ProduceFailure, StateApplied,
};
use wharf_replication::producers::ProducerStates;
use wharf_replication::*;
use wharf_storage::conformance::make_batch;
use wharf_storage::log::{LogConfig, PartitionLog};
use wharf_storage::mem_disk::MemDisk;
use wharf_storage::{Epoch, Offset};

struct TestHost {
    durability: Durability,
    replica: Replica,
    log: PartitionLog<MemDisk>,
    /// Produces registered after their append; completions of them.
    registered: BTreeSet<u64>,
    completed: Vec<(WaiterId, Result<Ack, ProduceError>)>,
    fetched: Option<Fetched<AlignedVec<16>>>,
    producers: ProducerStates,
    fetches_sent: Vec<(BrokerId, FetchRequest)>,
    /// Truncations asked for; left running (reported by the test) when `truncate_later`.
    truncations: Vec<Offset>,
    truncate_later: bool,
    epochs_persisted: usize,
}

fn log_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 64 * 1024,
        ..LogConfig::default()
    }
}

impl TestHost {
    fn new(me: BrokerId, replicas: Vec<BrokerId>, durability: Durability) -> TestHost {
        let (log, _) =
            block_on(PartitionLog::open(Rc::new(MemDisk::new()), log_config(), 0)).expect("open");
        let config = ReplicaConfig {
            broker_id: me,
            replicas,
            min_insync_replicas: 1,
            replica_lag_max_ms: 1000,
            fetch_backoff_ms: 50,
            isr_via_controller: true,
        };
        let state = LogState {
            log_start: Offset(0),
            end: Offset(0),
            durable: Offset(0),
            high_watermark: Offset(0),
        };
        TestHost {
            durability,
            replica: Replica::new(config, state, EpochHistory::default(), 0).expect("replica"),
            log,
            registered: BTreeSet::new(),
            completed: Vec::new(),
            fetched: None,
            producers: ProducerStates::default(),
            fetches_sent: Vec::new(),
            truncations: Vec::new(),
            truncate_later: false,
            epochs_persisted: 0,
        }
    }

    /// Broker 1 leading epoch 1 of a partition on brokers 1 and 2, alone in the ISR.
    fn leader(durability: Durability) -> TestHost {
        let mut host = TestHost::new(1, vec![1, 2], durability);
        let state = PartitionState {
            leader: Some(1),
            leader_epoch: Epoch(1),
            partition_epoch: 1,
            isr: vec![1],
        };
        assert_eq!(
            driver::apply_state(&mut host, 1, &state),
            Ok(StateApplied::Leading)
        );
        host
    }

    /// Produces one batch with `acks`; registers it as the broker does after the append.
    fn produce(&mut self, waiter: u64, acks: AckLevel) -> Result<driver::Appended, ProduceFailure> {
        let mut bytes = make_batch(2, 100, waiter, 0);
        let bounds = driver::check_produce(&bytes)?;
        let appended = driver::produce(self, &mut bytes, bounds, WaiterId(waiter), acks, 1_000, 0)?;
        self.registered.insert(waiter);
        driver::produce_appended(self, appended).expect("counted");
        Ok(appended)
    }

    fn completed(&self, waiter: u64) -> Option<&Result<Ack, ProduceError>> {
        self.completed
            .iter()
            .find(|(w, _)| w.0 == waiter)
            .map(|(_, r)| r)
    }
}

impl PartitionHost for TestHost {
    type Disk = MemDisk;
    type Frame = AlignedVec<16>;

    fn durability(&self) -> Durability {
        self.durability
    }

    fn wall_clock_ms(&self) -> u64 {
        0
    }

    fn with_replica<R>(&mut self, f: impl FnOnce(&mut Replica) -> R) -> R {
        f(&mut self.replica)
    }

    fn with_log<R>(&mut self, f: impl FnOnce(&mut PartitionLog<MemDisk>) -> R) -> Option<R> {
        Some(f(&mut self.log))
    }

    fn take_fetched(&mut self) -> Option<Fetched<AlignedVec<16>>> {
        self.fetched.take()
    }

    fn with_producers<R>(&mut self, f: impl FnOnce(&mut ProducerStates) -> R) -> R {
        f(&mut self.producers)
    }

    fn complete(&mut self, waiter: WaiterId, result: Result<Ack, ProduceError>) -> bool {
        if !self.registered.remove(&waiter.0) {
            return false;
        }
        self.completed.push((waiter, result));
        true
    }

    fn send_fetch(&mut self, leader: BrokerId, request: FetchRequest) {
        self.fetches_sent.push((leader, request));
    }

    fn propose_isr(&mut self, _isr: Vec<BrokerId>, _leader_epoch: Epoch, _partition_epoch: u64) {}

    fn start_truncate(&mut self, to: Offset) -> Result<Option<Input>, String> {
        self.truncations.push(to);
        if self.truncate_later {
            return Ok(None);
        }
        block_on(self.log.truncate_suffix(to)).map_err(|e| e.to_string())?;
        Ok(Some(Input::Truncated {
            end: self.log.end_offset(),
            durable: self.log.durable_offset(),
        }))
    }

    fn start_reset(&mut self, start: Offset) -> Result<Option<Input>, String> {
        block_on(self.log.reset(start, 0)).map_err(|e| e.to_string())?;
        Ok(Some(Input::LogReset { start }))
    }

    fn persist_epochs(&mut self) -> Result<(), String> {
        self.epochs_persisted += 1;
        Ok(())
    }

    fn high_watermark_advanced(&mut self, _to: Offset) {}

    fn isr_changed(&mut self, _isr: &[BrokerId]) {}

    fn fetched_appended(&mut self, _end: Offset) {}
}

#[test]
fn a_produce_with_a_bad_batch_appends_nothing() {
    let mut host = TestHost::leader(Durability::Synced);
    let good = make_batch(1, 10, 1, 0);
    let mut bad = make_batch(1, 10, 2, 0);
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    let mut payload = AlignedVec::<16>::new();
    payload.extend_from_slice(&good);
    payload.extend_from_slice(&bad);
    match driver::check_produce(&payload) {
        Err(ProduceFailure::InvalidBatch { at_byte, .. }) => assert_eq!(at_byte, good.len()),
        other => panic!("expected the second batch refused, got {other:?}"),
    }
    assert!(matches!(
        driver::check_produce(&[]),
        Err(ProduceFailure::NoBatches)
    ));
    assert_eq!(host.log.end_offset(), Offset(0));
    // The good batch alone goes in.
    let appended = host.produce(1, AckLevel::Leader).expect("appended");
    assert_eq!((appended.base_offset, appended.end), (Offset(0), Offset(2)));
}

#[test]
fn durability_decides_when_an_append_counts_as_held() {
    // fsync before ack: acks=leader completes only once the flush is reported.
    let mut synced = TestHost::leader(Durability::Synced);
    let appended = synced.produce(1, AckLevel::Leader).expect("appended");
    assert_eq!(synced.completed(1), None, "not durable yet");
    let durable = block_on(synced.log.flush()).expect("flush");
    driver::flushed(&mut synced, durable).expect("flushed");
    let ack = synced.completed(1).expect("completed").clone().expect("ok");
    assert_eq!(ack.next_offset, appended.last_offset.plus(1));
    // flush = interval: appended counts as held, and a flush report changes nothing.
    let mut appended_only = TestHost::leader(Durability::Appended);
    appended_only
        .produce(1, AckLevel::Leader)
        .expect("appended");
    assert!(matches!(appended_only.completed(1), Some(Ok(_))));
    assert_eq!(appended_only.completed.len(), 1);
}

#[test]
fn a_refused_produce_is_answered_to_the_caller_and_appends_nothing() {
    let mut host = TestHost::new(2, vec![1, 2], Durability::Synced);
    let state = PartitionState {
        leader: Some(1),
        leader_epoch: Epoch(3),
        partition_epoch: 1,
        isr: vec![1, 2],
    };
    assert_eq!(
        driver::apply_state(&mut host, 2, &state),
        Ok(StateApplied::Following)
    );
    let (leader, request) = host.fetches_sent.last().expect("a fetch to the leader");
    assert_eq!((*leader, request.leader_epoch), (1, Epoch(3)));
    match host.produce(1, AckLevel::All) {
        Err(ProduceFailure::Refused(ProduceError::NotLeader { leader, epoch })) => {
            assert_eq!((leader, epoch), (Some(1), Epoch(3)));
        }
        other => panic!("expected not_leader, got {other:?}"),
    }
    assert_eq!(host.log.end_offset(), Offset(0));
    assert!(host.completed.is_empty() && host.registered.is_empty());
}

#[test]
fn backpressure_appends_nothing_and_leaves_no_waiter_behind() {
    let mut host = TestHost::leader(Durability::Synced);
    let limit = host.log.config().staged_bytes_max;
    let mut waiter = 0;
    let failure = loop {
        waiter += 1;
        assert!(
            waiter < 100_000,
            "staged {} of {limit}",
            host.log.staged_bytes()
        );
        let mut bytes = make_batch(8, 60_000, waiter, 0);
        let bounds = driver::check_produce(&bytes).expect("valid");
        match driver::produce(
            &mut host,
            &mut bytes,
            bounds,
            WaiterId(waiter),
            AckLevel::Leader,
            1_000,
            0,
        ) {
            Ok(appended) => {
                host.registered.insert(waiter);
                driver::produce_appended(&mut host, appended).expect("counted");
            }
            Err(failure) => break failure,
        }
    };
    assert!(
        matches!(failure, ProduceFailure::Backpressure { .. }),
        "{failure:?}"
    );
    let end = host.log.end_offset();
    assert_eq!(
        host.replica.produces_in_progress() as u64,
        waiter - 1,
        "the refused produce holds no slot"
    );
    // Everything staged becomes durable: every admitted waiter completes, and the refused
    // one was forgotten by the replica (no completion, no timeout later).
    let durable = block_on(host.log.flush()).expect("flush");
    driver::flushed(&mut host, durable).expect("flushed");
    let answers = driver::step(&mut host, Input::Tick { now_ms: 10_000 }).expect("tick");
    assert!(
        answers.is_empty(),
        "no waiter left to time out: {answers:?}"
    );
    assert_eq!(host.completed.len() as u64, waiter - 1);
    assert!(host.completed.iter().all(|(_, r)| r.is_ok()));
    assert_eq!(host.completed(waiter), None);
    assert_eq!(host.log.end_offset(), end);
}

#[test]
fn fetched_batches_stop_at_the_first_that_fails_its_check() {
    let mut frame = AlignedVec::<16>::new();
    let header_bytes = 32;
    frame.extend_from_slice(&[0u8; 32]); // what precedes the payload in a frame
    let mut lengths = Vec::new();
    for tag in 0..3u64 {
        let mut batch = make_batch(1, 50, tag, 0);
        wharf_storage::batch::stamp(&mut batch, Offset(tag), Epoch(1));
        lengths.push(batch.len());
        frame.extend_from_slice(&batch);
    }
    let second_end = header_bytes + lengths[0] + lengths[1];
    frame[second_end - 1] ^= 0xff; // the second batch's body
    let end = frame.len();
    let (fetched, infos) = Fetched::check(frame, header_bytes..end);
    assert_eq!(fetched.len(), 1, "only the batch before the bad one");
    assert_eq!(infos.len(), 1);
    assert_eq!(
        (infos[0].base_offset, infos[0].next_offset),
        (Offset(0), Offset(1))
    );
}

#[test]
fn the_controllers_state_waits_for_a_log_change_in_progress_and_old_epochs_are_ignored() {
    // Broker 1 led epoch 1 and appended a batch nobody else has; then broker 2 leads epoch 2.
    let mut host = TestHost::leader(Durability::Synced);
    host.produce(1, AckLevel::Leader).expect("appended");
    let stale = PartitionState {
        leader: Some(2),
        leader_epoch: Epoch(0),
        partition_epoch: 1,
        isr: vec![1, 2],
    };
    assert_eq!(
        driver::apply_state(&mut host, 1, &stale),
        Ok(StateApplied::Stale)
    );
    let follow = PartitionState {
        leader: Some(2),
        leader_epoch: Epoch(2),
        partition_epoch: 2,
        isr: vec![2],
    };
    assert_eq!(
        driver::apply_state(&mut host, 1, &follow),
        Ok(StateApplied::Following)
    );
    assert_eq!(
        driver::apply_state(&mut host, 1, &follow),
        Ok(StateApplied::Unchanged),
        "already following it in that epoch"
    );
    // The new leader says this log diverges at 0: truncation starts and is left running.
    host.truncate_later = true;
    let (_, request) = host.fetches_sent.last().cloned().expect("a fetch");
    driver::step(
        &mut host,
        Input::FetchReply {
            fetch_id: request.fetch_id,
            leader_epoch: Epoch(2),
            reply: FetchReply::Error(FetchError::Diverging {
                epoch: Epoch(0),
                end_offset: Offset(0),
            }),
        },
    )
    .expect("stepped");
    assert_eq!(host.truncations, vec![Offset(0)]);
    let lead = PartitionState {
        leader: Some(1),
        leader_epoch: Epoch(3),
        partition_epoch: 3,
        isr: vec![1, 2],
    };
    assert_eq!(
        driver::apply_state(&mut host, 1, &lead),
        Ok(StateApplied::Deferred),
        "no role change in the middle of a truncation"
    );
    assert!(!host.replica.is_leader());
    // The truncation finishes; the deferred state then applies.
    block_on(host.log.truncate_suffix(Offset(0))).expect("truncate");
    let (end, durable) = (host.log.end_offset(), host.log.durable_offset());
    driver::step(&mut host, Input::Truncated { end, durable }).expect("truncated");
    assert_eq!(
        driver::apply_state(&mut host, 1, &lead),
        Ok(StateApplied::Leading)
    );
    assert!(host.replica.is_leader());
    assert!(host.epochs_persisted >= 2, "each new epoch is persisted");
}

/// A batch of `records` records from idempotent producer 9 starting at `sequence`.
fn idempotent_batch(sequence: u32, records: usize) -> AlignedVec<16> {
    let mut builder =
        wharf_storage::batch::BatchBuilder::new(wharf_storage::batch::ProducerStamp {
            producer_id: wharf_storage::ProducerId(9),
            producer_epoch: 0,
            base_sequence: sequence,
        });
    for i in 0..records {
        builder.push(i as i64, None, b"value", &[]).expect("push");
    }
    builder.finish().expect("finish")
}

fn produce_bytes(
    host: &mut TestHost,
    waiter: u64,
    mut bytes: AlignedVec<16>,
) -> Result<driver::Appended, ProduceFailure> {
    let bounds = driver::check_produce(&bytes)?;
    let appended = driver::produce(
        host,
        &mut bytes,
        bounds,
        WaiterId(waiter),
        AckLevel::Leader,
        1_000,
        0,
    )?;
    host.registered.insert(waiter);
    driver::produce_appended(host, appended).expect("counted");
    Ok(appended)
}

#[test]
fn an_idempotent_retry_appends_nothing_and_completes_with_the_original_offsets() {
    let mut host = TestHost::leader(Durability::Synced);
    let first = produce_bytes(&mut host, 1, idempotent_batch(0, 3)).expect("appended");
    produce_bytes(&mut host, 2, idempotent_batch(3, 2)).expect("appended");
    let end = host.log.end_offset();
    // The answer to the first was lost; the producer sends it again.
    let retry = produce_bytes(&mut host, 3, idempotent_batch(0, 3)).expect("answered");
    assert!(retry.duplicate);
    assert_eq!(
        (retry.base_offset, retry.last_offset),
        (first.base_offset, first.last_offset)
    );
    assert_eq!(host.log.end_offset(), end, "nothing appended");
    // It completes with the acks of the original range.
    assert_eq!(host.completed(3), None, "not durable yet");
    let durable = block_on(host.log.flush()).expect("flush");
    driver::flushed(&mut host, durable).expect("flushed");
    let ack = host.completed(3).expect("completed").clone().expect("ok");
    assert_eq!(
        (ack.base_offset, ack.next_offset),
        (first.base_offset, first.last_offset.plus(1))
    );
    // A gap is refused and appends nothing; so is an older epoch.
    match produce_bytes(&mut host, 4, idempotent_batch(9, 1)) {
        Err(ProduceFailure::Sequence(error)) => {
            assert!(matches!(
                error,
                wharf_replication::producers::SequenceError::OutOfOrder { expected: 5, .. }
            ))
        }
        other => panic!("expected out of order, got {other:?}"),
    }
    assert_eq!(host.log.end_offset(), end);
    assert_eq!(host.replica.produces_in_progress(), 0);
    // The state is a function of the log: a scan of it finds the same.
    let scanned = block_on(driver::scan_producers(&host.log)).expect("scan");
    assert_eq!(scanned, host.producers);
}
