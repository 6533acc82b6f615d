//! Scenario tests for the replica state machine: each reads as a script of inputs and the
//! outputs they must produce.

use proptest::prelude::*;
use wharf_replication::*;
use wharf_storage::{Epoch, Offset};

fn config(me: BrokerId) -> ReplicaConfig {
    ReplicaConfig {
        broker_id: me,
        replicas: vec![1, 2, 3],
        min_insync_replicas: 2,
        replica_lag_max_ms: 1000,
        fetch_backoff_ms: 50,
        isr_via_controller: false,
    }
}

fn empty_log() -> LogState {
    LogState {
        log_start: Offset(0),
        end: Offset(0),
        durable: Offset(0),
        high_watermark: Offset(0),
    }
}

fn leader() -> Replica {
    let mut replica =
        Replica::new(config(1), empty_log(), EpochHistory::default(), 0).expect("replica");
    let mut out = Vec::new();
    replica.step(
        Input::BecomeLeader {
            epoch: Epoch(1),
            isr: vec![1, 2, 3],
            partition_epoch: 0,
        },
        &mut out,
    );
    assert!(out.contains(&Output::EpochHistoryChanged));
    replica
}

fn step(replica: &mut Replica, input: Input) -> Outbox {
    let mut out = Vec::new();
    replica.step(input, &mut out);
    out
}

/// Produces `records` records with `acks` and returns the outputs after the append.
fn produce(replica: &mut Replica, id: u64, acks: AckLevel, records: u64) -> Outbox {
    let out = step(
        replica,
        Input::Produce {
            waiter: WaiterId(id),
            acks,
            deadline_ms: 5_000,
        },
    );
    match out.as_slice() {
        [Output::Append { waiter, .. }] => assert_eq!(*waiter, WaiterId(id)),
        other => return other.to_vec(),
    }
    let base = replica.end_offset();
    step(
        replica,
        Input::ProduceAppended {
            waiter: WaiterId(id),
            base_offset: base,
            next_offset: base.plus(records),
        },
    )
}

fn fetch(replica: &mut Replica, from: BrokerId, offset: u64, durable: u64) -> Outbox {
    step(
        replica,
        Input::FetchRequest(FetchRequest {
            replica: from,
            leader_epoch: Epoch(1),
            fetch_id: 7,
            fetch_offset: Offset(offset),
            last_fetched_epoch: (offset > 0).then_some(Epoch(1)),
            durable_offset: Offset(durable),
            may_wait: true,
        }),
    )
}

/// A follower of `leader` in epoch 3 over a recovered log with the given epoch history, and
/// the first fetch it sends.
fn follower_in_epoch_3(
    leader: BrokerId,
    log: LogState,
    epochs: &[(u32, u64)],
) -> (Replica, FetchRequest) {
    let history = EpochHistory::new(
        epochs.iter().map(|&(e, o)| (Epoch(e), Offset(o))).collect(),
        log.end,
    )
    .expect("history");
    let mut f = Replica::new(config(2), log, history, 0).expect("replica");
    let out = step(
        &mut f,
        Input::BecomeFollower {
            epoch: Epoch(3),
            leader,
        },
    );
    let Some(Output::SendFetch { request, .. }) = out.last().cloned() else {
        panic!("{out:?}");
    };
    (f, request)
}

/// The epoch-3 leader answers `fetch_id` with `Diverging{epoch, end_offset}`.
fn diverging(follower: &mut Replica, fetch_id: u64, epoch: u32, end_offset: u64) -> Outbox {
    step(
        follower,
        Input::FetchReply {
            fetch_id,
            leader_epoch: Epoch(3),
            reply: FetchReply::Error(FetchError::Diverging {
                epoch: Epoch(epoch),
                end_offset: Offset(end_offset),
            }),
        },
    )
}

fn completed(out: &[Output]) -> Vec<(u64, Result<Ack, ProduceError>)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Complete { waiter, result } => Some((waiter.0, result.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn each_ack_level_completes_when_its_replicas_hold_the_batch() {
    let mut r = leader();
    assert!(completed(&produce(&mut r, 1, AckLevel::Leader, 10)).is_empty());
    assert!(completed(&produce(&mut r, 2, AckLevel::Quorum, 10)).is_empty());
    assert!(completed(&produce(&mut r, 3, AckLevel::All, 10)).is_empty());
    assert!(completed(&produce(&mut r, 4, AckLevel::Replicas(3), 10)).is_empty());
    // Leader durable through 20: acks=leader for the first done; quorum needs one more.
    let done = completed(&step(
        &mut r,
        Input::Flushed {
            durable: Offset(20),
        },
    ));
    assert_eq!(done.len(), 1);
    let ack = done[0].1.clone().expect("acked");
    assert_eq!(
        (done[0].0, ack.base_offset, ack.durable_replicas),
        (1, Offset(0), 1)
    );
    assert_eq!(r.high_watermark(), Offset(0));
    // Follower 2 durable through 20: quorum (2 of 3) done; all still needs follower 3.
    let out = fetch(&mut r, 2, 20, 20);
    let done = completed(&out);
    assert_eq!(done.iter().map(|d| d.0).collect::<Vec<_>>(), vec![2]);
    assert_eq!(done[0].1.clone().expect("acked").durable_replicas, 2);
    assert!(out.contains(&Output::ServeFetch {
        replica: 2,
        fetch_id: 7,
        fetch_offset: Offset(20),
        may_wait: true,
    }));
    assert_eq!(r.high_watermark(), Offset(0), "HW waits for the whole ISR");
    step(
        &mut r,
        Input::Flushed {
            durable: Offset(40),
        },
    );
    fetch(&mut r, 2, 40, 40);
    let out = fetch(&mut r, 3, 40, 40);
    let mut done: Vec<u64> = completed(&out).iter().map(|d| d.0).collect();
    done.sort_unstable();
    assert_eq!(done, vec![3, 4]);
    assert_eq!(r.high_watermark(), Offset(40));
    assert!(out.contains(&Output::HighWatermark(Offset(40))));
}

#[test]
fn a_lagging_follower_leaves_the_isr_and_acks_all_is_refused_before_append() {
    let mut r = leader();
    produce(&mut r, 1, AckLevel::Leader, 5);
    step(&mut r, Input::Flushed { durable: Offset(5) });
    fetch(&mut r, 2, 5, 5);
    // Follower 3 never fetches; follower 2 keeps up.
    step(&mut r, Input::Tick { now_ms: 900 });
    fetch(&mut r, 2, 5, 5);
    assert_eq!(r.isr(), &[1, 2, 3]);
    let out = step(&mut r, Input::Tick { now_ms: 1001 });
    assert!(out.contains(&Output::IsrChanged(vec![1, 2])));
    // HW now follows the smaller ISR.
    assert_eq!(r.high_watermark(), Offset(5));
    // Follower 2 falls behind too.
    produce(&mut r, 2, AckLevel::Leader, 5);
    step(&mut r, Input::Tick { now_ms: 2500 });
    assert_eq!(r.isr(), &[1]);
    let end = r.end_offset();
    for acks in [AckLevel::All, AckLevel::Quorum, AckLevel::Replicas(2)] {
        let done = completed(&produce(&mut r, 10, acks, 1));
        assert!(
            matches!(
                done[0].1,
                Err(ProduceError::NotEnoughReplicas { in_sync: 1, .. })
            ),
            "{acks:?}: {done:?}"
        );
    }
    assert_eq!(r.end_offset(), end, "nothing appended");
    assert!(completed(&produce(&mut r, 11, AckLevel::Leader, 1)).is_empty());
    // Follower 2 catches up to the end and rejoins.
    let end = r.end_offset();
    step(&mut r, Input::Flushed { durable: end });
    let end = r.end_offset().0;
    let out = fetch(&mut r, 2, end, end);
    assert!(out.contains(&Output::IsrChanged(vec![1, 2])));
}

#[test]
fn waiters_time_out_with_what_was_achieved_and_isr_shrink_strands_acks_all() {
    let mut r = leader();
    produce(&mut r, 1, AckLevel::Quorum, 3);
    step(&mut r, Input::Flushed { durable: Offset(3) });
    // The followers copied the batch (so they stay in sync) but never made it durable.
    for now_ms in (0..5_000).step_by(900) {
        assert!(completed(&step(&mut r, Input::Tick { now_ms })).is_empty());
        fetch(&mut r, 2, 3, 0);
        fetch(&mut r, 3, 3, 0);
    }
    let done = completed(&step(&mut r, Input::Tick { now_ms: 5_000 }));
    assert_eq!(
        done,
        vec![(
            1,
            Err(ProduceError::Timeout {
                durable_replicas: 1
            })
        )]
    );

    let mut r = leader();
    produce(&mut r, 1, AckLevel::All, 3);
    step(&mut r, Input::Flushed { durable: Offset(3) });
    step(&mut r, Input::Tick { now_ms: 500 });
    fetch(&mut r, 2, 0, 0);
    let done = completed(&step(&mut r, Input::Tick { now_ms: 1001 }));
    assert!(
        matches!(
            done[0].1,
            Err(ProduceError::NotEnoughReplicasAfterAppend {
                in_sync: 1,
                required: 2
            })
        ),
        "{done:?}"
    );
}

#[test]
fn invalid_acks_and_produce_on_a_follower_are_refused() {
    let mut r = leader();
    let done = completed(&produce(&mut r, 1, AckLevel::Replicas(4), 1));
    assert!(matches!(done[0].1, Err(ProduceError::InvalidAcks(..))));
    let mut f = Replica::new(config(2), empty_log(), EpochHistory::default(), 0).expect("replica");
    step(
        &mut f,
        Input::BecomeFollower {
            epoch: Epoch(1),
            leader: 1,
        },
    );
    let done = completed(&produce(&mut f, 1, AckLevel::Leader, 1));
    assert_eq!(
        done[0].1,
        Err(ProduceError::NotLeader {
            leader: Some(1),
            epoch: Epoch(1)
        })
    );
}

#[test]
fn follower_fetches_appends_flushes_and_reports_durable() {
    let mut f = Replica::new(config(2), empty_log(), EpochHistory::default(), 0).expect("replica");
    let out = step(
        &mut f,
        Input::BecomeFollower {
            epoch: Epoch(1),
            leader: 1,
        },
    );
    let Some(Output::SendFetch { leader: 1, request }) = out.last().cloned() else {
        panic!("no fetch: {out:?}");
    };
    assert_eq!(
        (request.fetch_offset, request.last_fetched_epoch),
        (Offset(0), None)
    );
    let batches = vec![
        BatchInfo {
            base_offset: Offset(0),
            next_offset: Offset(4),
            leader_epoch: Epoch(1),
        },
        BatchInfo {
            base_offset: Offset(4),
            next_offset: Offset(9),
            leader_epoch: Epoch(1),
        },
    ];
    let out = step(
        &mut f,
        Input::FetchReply {
            fetch_id: request.fetch_id,
            leader_epoch: Epoch(1),
            reply: FetchReply::Data {
                high_watermark: Offset(4),
                log_start: Offset(0),
                batches,
            },
        },
    );
    assert_eq!(
        out,
        vec![
            Output::EpochHistoryChanged,
            Output::AppendFetched { count: 2 }
        ]
    );
    // Appended, not yet durable: the next fetch streams at once, without letting the leader
    // wait (its durable offset is still 0).
    let out = step(
        &mut f,
        Input::FetchedAppended {
            next_offset: Offset(9),
        },
    );
    let Some(Output::SendFetch { request, .. }) = out.last().cloned() else {
        panic!("no streaming fetch: {out:?}");
    };
    assert_eq!(
        (
            request.fetch_offset,
            request.durable_offset,
            request.may_wait
        ),
        (Offset(9), Offset(0), false)
    );
    // Nothing new at the leader: wait for the flush instead of polling again.
    let out = step(
        &mut f,
        Input::FetchReply {
            fetch_id: request.fetch_id,
            leader_epoch: Epoch(1),
            reply: FetchReply::Data {
                high_watermark: Offset(4),
                log_start: Offset(0),
                batches: vec![],
            },
        },
    );
    assert!(out.is_empty(), "{out:?}");
    let out = step(&mut f, Input::Flushed { durable: Offset(9) });
    assert_eq!(out[0], Output::HighWatermark(Offset(4)));
    let Some(Output::SendFetch { request, .. }) = out.last().cloned() else {
        panic!("no fetch: {out:?}");
    };
    assert_eq!(
        (
            request.fetch_offset,
            request.durable_offset,
            request.last_fetched_epoch,
            request.may_wait
        ),
        (Offset(9), Offset(9), Some(Epoch(1)), true)
    );
    // A duplicate of the old reply is ignored.
    let stale = step(
        &mut f,
        Input::FetchReply {
            fetch_id: request.fetch_id - 1,
            leader_epoch: Epoch(1),
            reply: FetchReply::Data {
                high_watermark: Offset(9),
                log_start: Offset(0),
                batches: vec![],
            },
        },
    );
    assert!(stale.is_empty());
    // A failed fetch backs off, then retries on a tick.
    step(
        &mut f,
        Input::FetchFailed {
            fetch_id: request.fetch_id,
        },
    );
    assert!(step(&mut f, Input::Tick { now_ms: 10 }).is_empty());
    let out = step(&mut f, Input::Tick { now_ms: 60 });
    assert!(matches!(out.as_slice(), [Output::SendFetch { .. }]));
}

#[test]
fn a_diverged_follower_truncates_to_the_leaders_epoch_end() {
    // The leader of epoch 1 wrote [0, 10); this replica then led epoch 2 briefly and wrote
    // [10, 15) that nobody else has. Broker 3 now leads epoch 3 with epoch 1 ending at 12.
    let log = LogState {
        log_start: Offset(0),
        end: Offset(15),
        durable: Offset(15),
        high_watermark: Offset(8),
    };
    let history = EpochHistory::new(
        vec![(Epoch(1), Offset(0)), (Epoch(2), Offset(10))],
        Offset(15),
    )
    .expect("history");
    let mut f = Replica::new(config(2), log, history, 0).expect("replica");
    let out = step(
        &mut f,
        Input::BecomeFollower {
            epoch: Epoch(3),
            leader: 3,
        },
    );
    let Some(Output::SendFetch { request, .. }) = out.last().cloned() else {
        panic!("{out:?}");
    };
    assert_eq!(request.last_fetched_epoch, Some(Epoch(2)));
    // The leader never had epoch 2: its largest epoch below is 1, ending at 12.
    let mut leader = Replica::new(
        config(3),
        LogState {
            log_start: Offset(0),
            end: Offset(20),
            durable: Offset(20),
            high_watermark: Offset(8),
        },
        EpochHistory::new(
            vec![(Epoch(1), Offset(0)), (Epoch(3), Offset(12))],
            Offset(20),
        )
        .expect("history"),
        0,
    )
    .expect("replica");
    step(
        &mut leader,
        Input::BecomeLeader {
            epoch: Epoch(3),
            isr: vec![2, 3],
            partition_epoch: 0,
        },
    );
    let answer = step(&mut leader, Input::FetchRequest(request));
    assert_eq!(
        answer,
        vec![Output::RejectFetch {
            replica: 2,
            fetch_id: request.fetch_id,
            error: FetchError::Diverging {
                epoch: Epoch(1),
                end_offset: Offset(12)
            },
        }]
    );
    let out = diverging(&mut f, request.fetch_id, 1, 12);
    // Its own epoch 1 ends at 10 (epoch 2 began there): truncate to 10, not 12.
    assert_eq!(out, vec![Output::Truncate { to: Offset(10) }]);
    let out = step(
        &mut f,
        Input::Truncated {
            end: Offset(10),
            durable: Offset(10),
        },
    );
    // Epoch 2 began at 10 and is gone: the persisted history must forget it before anything
    // else is appended at 10.
    assert_eq!(out.first(), Some(&Output::EpochHistoryChanged), "{out:?}");
    assert_eq!(f.epochs().latest(), Some(Epoch(1)));
    let Some(Output::SendFetch { request, .. }) = out.last().cloned() else {
        panic!("{out:?}");
    };
    assert_eq!(
        (request.fetch_offset, request.last_fetched_epoch),
        (Offset(10), Some(Epoch(1)))
    );
    let answer = step(&mut leader, Input::FetchRequest(request));
    assert!(matches!(
        answer.last(),
        Some(Output::ServeFetch {
            fetch_offset: Offset(10),
            ..
        })
    ));
    // A fetch from a stale epoch is fenced.
    let stale = FetchRequest {
        leader_epoch: Epoch(2),
        ..request
    };
    assert!(matches!(
        step(&mut leader, Input::FetchRequest(stale)).as_slice(),
        [Output::RejectFetch {
            error: FetchError::FencedEpoch { .. },
            ..
        }]
    ));
}

#[test]
fn leadership_change_fails_parked_waiters() {
    let mut r = leader();
    produce(&mut r, 1, AckLevel::All, 3);
    let done = completed(&step(
        &mut r,
        Input::BecomeFollower {
            epoch: Epoch(2),
            leader: 2,
        },
    ));
    assert_eq!(
        done,
        vec![(1, Err(ProduceError::LeaderChanged { epoch: Epoch(2) }))]
    );
}

proptest! {
    /// The high watermark is durable on every ISR member and on at least min_insync replicas,
    /// and it is the largest such offset.
    #[test]
    fn high_watermark_is_the_largest_safe_offset(
        durables in proptest::collection::vec(0u64..50, 1..6),
        isr_mask in 0u32..64,
        min_insync in 1usize..6,
    ) {
        let replicas: Vec<BrokerId> = (1..=durables.len() as u32).collect();
        let isr: Vec<BrokerId> = replicas.iter().copied().filter(|r| r == &1 || isr_mask & (1 << r) != 0).collect();
        let durable_of = |r: BrokerId| Offset(durables[(r - 1) as usize]);
        let hw = high_watermark(&replicas, &isr, min_insync, durable_of);
        let k = min_insync.min(replicas.len());
        let holds = |o: Offset| isr.iter().all(|&r| durable_of(r) >= o)
            && replicas.iter().filter(|&&r| durable_of(r) >= o).count() >= k;
        prop_assert!(holds(hw) || hw == Offset(0));
        prop_assert!(!holds(hw.plus(1)));
    }
}

/// Regression (simulator seed 29): a follower whose last epoch the leader never had must
/// truncate even when the leader's log is longer.
#[test]
fn a_last_epoch_unknown_to_the_leader_is_divergence() {
    let log = LogState {
        log_start: Offset(0),
        end: Offset(20),
        durable: Offset(20),
        high_watermark: Offset(0),
    };
    let history = EpochHistory::new(
        vec![(Epoch(1), Offset(0)), (Epoch(3), Offset(10))],
        Offset(20),
    )
    .expect("history");
    let mut leader = Replica::new(config(1), log, history, 0).expect("replica");
    step(
        &mut leader,
        Input::BecomeLeader {
            epoch: Epoch(3),
            isr: vec![1, 2, 3],
            partition_epoch: 0,
        },
    );
    let request = FetchRequest {
        replica: 2,
        leader_epoch: Epoch(3),
        fetch_id: 1,
        fetch_offset: Offset(12),
        last_fetched_epoch: Some(Epoch(2)),
        durable_offset: Offset(12),
        may_wait: true,
    };
    assert_eq!(
        step(&mut leader, Input::FetchRequest(request)),
        vec![Output::RejectFetch {
            replica: 2,
            fetch_id: 1,
            error: FetchError::Diverging {
                epoch: Epoch(1),
                end_offset: Offset(10)
            },
        }]
    );
}

/// Regression (simulator seed 48): an epoch this replica led without writing anything must not
/// block older-epoch batches that the new leader holds at those offsets.
#[test]
fn an_empty_epoch_at_the_log_end_yields_to_the_leaders_batches() {
    let log = LogState {
        log_start: Offset(0),
        end: Offset(10),
        durable: Offset(10),
        high_watermark: Offset(0),
    };
    let (mut f, request) = follower_in_epoch_3(1, log, &[(1, 0), (2, 10)]);
    assert_eq!(request.last_fetched_epoch, Some(Epoch(1)));
    let batches = vec![BatchInfo {
        base_offset: Offset(10),
        next_offset: Offset(14),
        leader_epoch: Epoch(1),
    }];
    let out = step(
        &mut f,
        Input::FetchReply {
            fetch_id: request.fetch_id,
            leader_epoch: Epoch(3),
            reply: FetchReply::Data {
                high_watermark: Offset(0),
                log_start: Offset(0),
                batches,
            },
        },
    );
    assert_eq!(out.first(), Some(&Output::EpochHistoryChanged), "{out:?}");
    assert_eq!(
        out.last(),
        Some(&Output::AppendFetched { count: 1 }),
        "{out:?}"
    );
    assert_eq!(f.epochs().entries(), &[(Epoch(1), Offset(0))]);
}

/// `quorum` counts in-sync replicas and always includes the leader: two followers holding a
/// batch the leader has not synced yet do not acknowledge it.
#[test]
fn quorum_needs_the_leader_and_counts_only_in_sync_replicas() {
    let mut r = leader();
    assert!(completed(&produce(&mut r, 1, AckLevel::Quorum, 4)).is_empty());
    fetch(&mut r, 2, 4, 4);
    assert!(
        completed(&fetch(&mut r, 3, 4, 4)).is_empty(),
        "leader not durable yet"
    );
    let done = completed(&step(&mut r, Input::Flushed { durable: Offset(4) }));
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].1.clone().expect("acked").durable_replicas, 3);
}

/// Regression (simulator seed 13532248086542615334): a follower whose log was only partly
/// durable truncated; the truncation flushed what was staged below the cut, so no flush
/// completion followed. The replica kept its old durable offset, waited for a flush forever
/// and stopped fetching. `Truncated` now carries the log's durable offset.
#[test]
fn truncation_reports_durability_and_the_follower_keeps_fetching() {
    let log = LogState {
        log_start: Offset(0),
        end: Offset(20),
        durable: Offset(8),
        high_watermark: Offset(8),
    };
    let (mut f, request) = follower_in_epoch_3(1, log, &[(1, 0), (2, 12)]);
    // The leader has epoch 2 up to 14 only.
    let out = diverging(&mut f, request.fetch_id, 2, 14);
    assert_eq!(out, vec![Output::Truncate { to: Offset(14) }]);
    // The driver's truncation flushed [8, 14) too.
    let out = step(
        &mut f,
        Input::Truncated {
            end: Offset(14),
            durable: Offset(14),
        },
    );
    assert_eq!(f.durable_offset(), Offset(14));
    let Some(Output::SendFetch { request, .. }) = out.last().cloned() else {
        panic!("{out:?}");
    };
    assert_eq!(request.durable_offset, Offset(14));
    // An empty answer must not leave it waiting for a flush: it fetches again (long poll).
    let out = step(
        &mut f,
        Input::FetchReply {
            fetch_id: request.fetch_id,
            leader_epoch: Epoch(3),
            reply: FetchReply::Data {
                high_watermark: Offset(14),
                log_start: Offset(0),
                batches: Vec::new(),
            },
        },
    );
    let Some(Output::SendFetch { request, .. }) = out.last().cloned() else {
        panic!("an empty reply after truncation must lead to the next fetch: {out:?}");
    };
    assert!(request.may_wait);
    assert_eq!(f.high_watermark(), Offset(14));
}

// ---- Hardening: every network input validated, every limit a typed error. ----

fn forged(from: BrokerId, offset: u64, last_epoch: Option<u32>, durable: u64) -> Input {
    Input::FetchRequest(FetchRequest {
        replica: from,
        leader_epoch: Epoch(1),
        fetch_id: 99,
        fetch_offset: Offset(offset),
        last_fetched_epoch: last_epoch.map(Epoch),
        durable_offset: Offset(durable),
        may_wait: true,
    })
}

/// Regression: the leader clamped a follower's durable offset to its fetch offset and
/// counted it, and a fetch offset above its end reached an assert (or came back as
/// divergence). Forged reports are now refused with `InvalidOffsets` and change nothing.
#[test]
fn forged_follower_offsets_are_refused_and_change_nothing() {
    let mut r = leader();
    assert!(completed(&produce(&mut r, 1, AckLevel::All, 10)).is_empty());
    step(
        &mut r,
        Input::Flushed {
            durable: Offset(10),
        },
    );
    // Follower 3 holds the batch durably; follower 2 fetched half of it.
    fetch(&mut r, 3, 10, 10);
    fetch(&mut r, 2, 5, 5);
    assert_eq!(r.high_watermark(), Offset(5));
    let lag_before = r.follower_lag();
    let cases = [
        // Durable above fetched (the old code counted min(durable, fetched) = 7).
        (7, Some(1), 10),
        // Fetched above the leader's end, in the leader's own epoch.
        (20, Some(1), 20),
        // Fetched above the end with an older epoch the leader has: still not a prefix.
        (11, Some(1), 11),
    ];
    for (offset, last_epoch, durable) in cases {
        let out = step(&mut r, forged(2, offset, last_epoch, durable));
        assert_eq!(out.len(), 1, "only the rejection: {out:?}");
        assert!(
            matches!(
                out[0],
                Output::RejectFetch {
                    replica: 2,
                    fetch_id: 99,
                    error: FetchError::InvalidOffsets { .. }
                }
            ),
            "fetch {offset} durable {durable}: {out:?}"
        );
        assert_eq!(r.high_watermark(), Offset(5), "HW unchanged");
        assert_eq!(r.isr(), &[1, 2, 3], "ISR unchanged");
        assert_eq!(r.waiting_produces(), 1, "acks=all waiter not completed");
        assert_eq!(r.follower_lag(), lag_before, "progress untouched");
    }
    // The pure check agrees with the step.
    let Input::FetchRequest(request) = forged(2, 7, Some(1), 10) else {
        unreachable!("forged builds a fetch request");
    };
    assert!(matches!(
        r.validate_fetch(&request),
        Err(FetchError::InvalidOffsets { .. })
    ));
    // An honest report still moves everything.
    let done = completed(&fetch(&mut r, 2, 10, 10));
    assert_eq!(r.high_watermark(), Offset(10));
    assert_eq!(done.len(), 1);
    assert!(done[0].1.is_ok());
}

/// A fetch offset above a new leader's end is divergence when the follower's last epoch is
/// older than the leader's: it is not refused as invalid.
#[test]
fn a_longer_log_from_an_older_epoch_is_divergence_not_invalid() {
    let mut leader = Replica::new(
        config(1),
        LogState {
            log_start: Offset(0),
            end: Offset(8),
            durable: Offset(8),
            high_watermark: Offset(0),
        },
        EpochHistory::new(vec![(Epoch(1), Offset(0))], Offset(8)).expect("history"),
        0,
    )
    .expect("replica");
    step(
        &mut leader,
        Input::BecomeLeader {
            epoch: Epoch(2),
            isr: vec![1, 2, 3],
            partition_epoch: 0,
        },
    );
    let out = step(
        &mut leader,
        Input::FetchRequest(FetchRequest {
            replica: 2,
            leader_epoch: Epoch(2),
            fetch_id: 1,
            fetch_offset: Offset(12),
            last_fetched_epoch: Some(Epoch(1)),
            durable_offset: Offset(12),
            may_wait: true,
        }),
    );
    assert!(
        matches!(
            out.as_slice(),
            [Output::RejectFetch {
                error: FetchError::Diverging {
                    epoch: Epoch(1),
                    end_offset: Offset(8)
                },
                ..
            }]
        ),
        "{out:?}"
    );
}

fn leader_with_min_insync(min_insync_replicas: usize) -> Replica {
    let mut c = config(1);
    c.min_insync_replicas = min_insync_replicas;
    let mut r = Replica::new(c, empty_log(), EpochHistory::default(), 0).expect("replica");
    step(
        &mut r,
        Input::BecomeLeader {
            epoch: Epoch(1),
            isr: vec![1, 2, 3],
            partition_epoch: 0,
        },
    );
    r
}

/// Regression: `quorum` and `N` ignored min_insync_replicas: with 3 replicas, min 3 and two in
/// sync, they were appended (and acknowledged on two copies); an ISR shrink left their waiters
/// to time out. DESIGN §1: refused before append, and stranded waiters fail at once.
#[test]
fn quorum_and_n_follow_min_insync_replicas_like_all() {
    let mut r = leader_with_min_insync(3);
    // Follower 3 never fetches and leaves the ISR.
    step(&mut r, Input::Tick { now_ms: 900 });
    fetch(&mut r, 2, 0, 0);
    step(&mut r, Input::Tick { now_ms: 1001 });
    assert_eq!(r.isr(), &[1, 2]);
    for acks in [
        AckLevel::Quorum,
        AckLevel::Replicas(1),
        AckLevel::Replicas(2),
        AckLevel::All,
    ] {
        let done = completed(&produce(&mut r, 10, acks, 1));
        assert_eq!(
            done,
            vec![(
                10,
                Err(ProduceError::NotEnoughReplicas {
                    required: 3,
                    in_sync: 2
                })
            )],
            "{acks:?}"
        );
    }
    assert_eq!(r.end_offset(), Offset(0), "nothing appended");
    // acks=leader does not wait for followers: min_insync does not apply.
    assert!(completed(&produce(&mut r, 11, AckLevel::Leader, 1)).is_empty());

    // Waiters of every level that waits for followers fail as soon as the ISR shrinks.
    let mut r = leader_with_min_insync(3);
    for (id, acks) in [
        (1, AckLevel::Quorum),
        (2, AckLevel::Replicas(2)),
        (3, AckLevel::All),
    ] {
        assert!(completed(&produce(&mut r, id, acks, 1)).is_empty());
    }
    step(&mut r, Input::Tick { now_ms: 900 });
    fetch(&mut r, 2, 3, 0);
    let mut done = completed(&step(&mut r, Input::Tick { now_ms: 1001 }));
    done.sort_by_key(|(id, _)| *id);
    let stranded = Err(ProduceError::NotEnoughReplicasAfterAppend {
        required: 3,
        in_sync: 2,
    });
    assert_eq!(
        done,
        vec![(1, stranded.clone()), (2, stranded.clone()), (3, stranded)]
    );
    assert_eq!(r.waiting_produces(), 0);
}

/// Regression: WAITERS_MAX was an assert; enough produces in flight crashed the shard.
#[test]
fn produces_beyond_waiters_max_are_refused_before_append() {
    let mut r = leader();
    for id in 0..WAITERS_MAX as u64 {
        let out = step(
            &mut r,
            Input::Produce {
                waiter: WaiterId(id),
                acks: AckLevel::All,
                deadline_ms: 5_000,
            },
        );
        assert!(matches!(out.as_slice(), [Output::Append { .. }]));
    }
    let over = WaiterId(WAITERS_MAX as u64);
    let produce_over = Input::Produce {
        waiter: over,
        acks: AckLevel::All,
        deadline_ms: 5_000,
    };
    let out = step(&mut r, produce_over.clone());
    assert_eq!(
        completed(&out),
        vec![(
            over.0,
            Err(ProduceError::TooManyWaiters { limit: WAITERS_MAX })
        )]
    );
    assert!(ProduceError::TooManyWaiters { limit: WAITERS_MAX }.is_retriable());
    // One append is given up: room for one more.
    step(
        &mut r,
        Input::ProduceAborted {
            waiter: WaiterId(0),
        },
    );
    let out = step(&mut r, produce_over);
    assert!(matches!(out.as_slice(), [Output::Append { .. }]), "{out:?}");
}

/// Regression: `Replica::new` asserted on its replica set, so a topic with 17 replicas (or a
/// forged one naming this broker twice) crash-looped the broker at every start.
#[test]
fn replica_sets_and_log_states_no_replica_can_use_are_errors() {
    let new = |replicas: Vec<BrokerId>, log: LogState| {
        let mut c = config(1);
        c.replicas = replicas;
        Replica::new(c, log, EpochHistory::default(), 0).map(|_| ())
    };
    assert_eq!(
        new((1..=REPLICAS_MAX as u32).collect(), empty_log()),
        Ok(())
    );
    assert_eq!(
        new((1..=REPLICAS_MAX as u32 + 1).collect(), empty_log()),
        Err(ReplicaConfigError::TooManyReplicas {
            count: REPLICAS_MAX + 1,
            limit: REPLICAS_MAX
        })
    );
    assert_eq!(
        new(Vec::new(), empty_log()),
        Err(ReplicaConfigError::NoReplicas)
    );
    assert!(matches!(
        new(vec![2, 3], empty_log()),
        Err(ReplicaConfigError::NotAReplica { broker: 1, .. })
    ));
    assert_eq!(
        new(vec![1, 2, 2], empty_log()),
        Err(ReplicaConfigError::DuplicateReplica(2))
    );
    let backwards = LogState {
        log_start: Offset(0),
        end: Offset(5),
        durable: Offset(9),
        high_watermark: Offset(0),
    };
    assert!(matches!(
        new(vec![1, 2, 3], backwards),
        Err(ReplicaConfigError::InvalidLogState { .. })
    ));
}

/// Regression: a leader whose persisted epoch history was at its limit panicked ("epoch
/// history full") when it began its new epoch, at every start; a follower did when a leader
/// sent batches of a new epoch. The oldest epochs now make room.
#[test]
fn a_full_epoch_history_makes_room_instead_of_crashing() {
    use wharf_replication::epochs::EPOCH_HISTORY_ENTRIES_MAX;
    let full = || {
        EpochHistory::new(
            (0..EPOCH_HISTORY_ENTRIES_MAX as u64)
                .map(|i| (Epoch(i as u32 + 1), Offset(i)))
                .collect(),
            Offset(EPOCH_HISTORY_ENTRIES_MAX as u64),
        )
        .expect("history")
    };
    let end = Offset(EPOCH_HISTORY_ENTRIES_MAX as u64);
    let log = LogState {
        log_start: Offset(0),
        end,
        durable: end,
        high_watermark: Offset(0),
    };
    let next = Epoch(EPOCH_HISTORY_ENTRIES_MAX as u32 + 1);
    let mut leader = Replica::new(config(1), log, full(), 0).expect("replica");
    let out = step(
        &mut leader,
        Input::BecomeLeader {
            epoch: next,
            isr: vec![1, 2, 3],
            partition_epoch: 0,
        },
    );
    assert!(out.contains(&Output::EpochHistoryChanged));
    assert_eq!(leader.epochs().latest(), Some(next));
    assert_eq!(leader.epochs().entries().len(), EPOCH_HISTORY_ENTRIES_MAX);

    let mut follower = Replica::new(config(2), log, full(), 0).expect("replica");
    let out = step(
        &mut follower,
        Input::BecomeFollower {
            epoch: next,
            leader: 1,
        },
    );
    let Some(Output::SendFetch { request, .. }) = out.last().cloned() else {
        panic!("{out:?}");
    };
    let out = step(
        &mut follower,
        Input::FetchReply {
            fetch_id: request.fetch_id,
            leader_epoch: next,
            reply: FetchReply::Data {
                high_watermark: end,
                log_start: Offset(0),
                batches: vec![BatchInfo {
                    base_offset: end,
                    next_offset: end.plus(3),
                    leader_epoch: next,
                }],
            },
        },
    );
    assert_eq!(out.first(), Some(&Output::EpochHistoryChanged), "{out:?}");
    assert_eq!(
        out.last(),
        Some(&Output::AppendFetched { count: 1 }),
        "{out:?}"
    );
    assert_eq!(follower.epochs().latest(), Some(next));
}

/// Regression: a follower whose fetch offset fell below the leader's log start (retention on
/// the leader) was answered `OffsetOutOfRange` and retried for ever. It now empties its log,
/// starts at the leader's log start, copies from there and rejoins the ISR.
#[test]
fn a_follower_below_the_leaders_log_start_resets_its_log_and_rejoins() {
    let log = LogState {
        log_start: Offset(0),
        end: Offset(10),
        durable: Offset(10),
        high_watermark: Offset(10),
    };
    let (mut f, request) = follower_in_epoch_3(1, log, &[(1, 0)]);
    let out = step(
        &mut f,
        Input::FetchReply {
            fetch_id: request.fetch_id,
            leader_epoch: Epoch(3),
            reply: FetchReply::Error(FetchError::OffsetOutOfRange {
                requested: Offset(10),
                log_start: Offset(50),
            }),
        },
    );
    assert_eq!(out, vec![Output::ResetLog { start: Offset(50) }]);
    // Nothing is fetched while the log is being reset.
    assert!(step(&mut f, Input::Tick { now_ms: 10_000 }).is_empty());
    let out = step(&mut f, Input::LogReset { start: Offset(50) });
    assert_eq!(out[0], Output::EpochHistoryChanged);
    assert!(f.epochs().entries().is_empty());
    let Some(Output::SendFetch { request, .. }) = out.last().cloned() else {
        panic!("{out:?}");
    };
    assert_eq!(
        (
            request.fetch_offset,
            request.last_fetched_epoch,
            request.durable_offset
        ),
        (Offset(50), None, Offset(50))
    );

    // The leader, whose log starts at 50, serves that fetch and takes the follower back into
    // the ISR once it has caught up.
    let mut leader = Replica::new(
        config(1),
        LogState {
            log_start: Offset(50),
            end: Offset(60),
            durable: Offset(60),
            high_watermark: Offset(60),
        },
        EpochHistory::new(vec![(Epoch(2), Offset(50))], Offset(60)).expect("history"),
        0,
    )
    .expect("replica");
    step(
        &mut leader,
        Input::BecomeLeader {
            epoch: Epoch(3),
            isr: vec![1, 3],
            partition_epoch: 0,
        },
    );
    let out = step(&mut leader, Input::FetchRequest(request));
    assert!(
        matches!(
            out.last(),
            Some(Output::ServeFetch {
                fetch_offset: Offset(50),
                ..
            })
        ),
        "{out:?}"
    );
    let out = step(
        &mut f,
        Input::FetchReply {
            fetch_id: request.fetch_id,
            leader_epoch: Epoch(3),
            reply: FetchReply::Data {
                high_watermark: Offset(60),
                log_start: Offset(50),
                batches: vec![BatchInfo {
                    base_offset: Offset(50),
                    next_offset: Offset(60),
                    leader_epoch: Epoch(2),
                }],
            },
        },
    );
    assert_eq!(out.first(), Some(&Output::EpochHistoryChanged), "{out:?}");
    assert_eq!(
        out.last(),
        Some(&Output::AppendFetched { count: 1 }),
        "{out:?}"
    );
    // Streaming: the next fetch goes out at once, before the flush (durable still 50).
    let out = step(
        &mut f,
        Input::FetchedAppended {
            next_offset: Offset(60),
        },
    );
    let Some(Output::SendFetch { request, .. }) = out.last().cloned() else {
        panic!("{out:?}");
    };
    let out = step(&mut leader, Input::FetchRequest(request));
    assert!(!out.iter().any(|o| matches!(o, Output::IsrChanged(_))));
    step(
        &mut f,
        Input::FetchReply {
            fetch_id: request.fetch_id,
            leader_epoch: Epoch(3),
            reply: FetchReply::Data {
                high_watermark: Offset(60),
                log_start: Offset(50),
                batches: Vec::new(),
            },
        },
    );
    let out = step(
        &mut f,
        Input::Flushed {
            durable: Offset(60),
        },
    );
    let Some(Output::SendFetch { request, .. }) = out.last().cloned() else {
        panic!("{out:?}");
    };
    assert_eq!(request.last_fetched_epoch, Some(Epoch(2)));
    assert_eq!(request.durable_offset, Offset(60));
    let out = step(&mut leader, Input::FetchRequest(request));
    assert!(out.contains(&Output::IsrChanged(vec![1, 2, 3])), "{out:?}");
}

/// An empty log reset at a start above the (new) leader's log start is told it diverges at
/// the leader's log start: it starts again there instead of backing off for ever.
#[test]
fn an_empty_log_above_the_leaders_start_resets_down_to_it() {
    let log = LogState {
        log_start: Offset(50),
        end: Offset(50),
        durable: Offset(50),
        high_watermark: Offset(50),
    };
    let (mut f, request) = follower_in_epoch_3(1, log, &[]);
    assert_eq!(request.last_fetched_epoch, None);
    let out = diverging(&mut f, request.fetch_id, 0, 20);
    assert_eq!(out, vec![Output::ResetLog { start: Offset(20) }]);
}

/// The leader reported its copy of the range corrupt: the follower asks again only after
/// CORRUPT_FETCH_BACKOFF_MS, not at the fetch backoff (a tight loop against a range that
/// cannot be served until repaired).
#[test]
fn corrupt_data_at_the_leader_backs_off_slowly() {
    let log = LogState {
        log_start: Offset(0),
        end: Offset(10),
        durable: Offset(10),
        high_watermark: Offset(10),
    };
    let (mut f, request) = follower_in_epoch_3(1, log, &[(1, 0)]);
    let out = step(
        &mut f,
        Input::FetchReply {
            fetch_id: request.fetch_id,
            leader_epoch: Epoch(3),
            reply: FetchReply::Error(FetchError::CorruptData { offset: Offset(10) }),
        },
    );
    assert!(out.is_empty(), "{out:?}");
    // The ordinary fetch backoff (50 ms) and anything short of the corrupt backoff: silence.
    for now_ms in [50, 1_000, CORRUPT_FETCH_BACKOFF_MS - 1] {
        assert!(step(&mut f, Input::Tick { now_ms }).is_empty(), "{now_ms}");
    }
    let out = step(
        &mut f,
        Input::Tick {
            now_ms: CORRUPT_FETCH_BACKOFF_MS,
        },
    );
    assert!(
        matches!(out.as_slice(), [Output::SendFetch { request, .. }] if request.fetch_offset == Offset(10)),
        "{out:?}"
    );
}

/// A restarted leader starts from the high watermark it stored (the driver passes it in
/// `LogState`), clamped to what it holds durably, and keeps it while the followers have not
/// fetched in its new epoch: ListOffsets and describe see committed data at once.
#[test]
fn a_restarted_leader_starts_from_its_stored_high_watermark() {
    let start = |stored: u64| {
        let log = LogState {
            log_start: Offset(0),
            end: Offset(20),
            durable: Offset(15),
            high_watermark: Offset(stored),
        };
        let history = EpochHistory::new(vec![(Epoch(1), Offset(0))], log.end).expect("history");
        let mut r = Replica::new(config(1), log, history, 0).expect("replica");
        step(
            &mut r,
            Input::BecomeLeader {
                epoch: Epoch(2),
                isr: vec![1, 2, 3],
                partition_epoch: 0,
            },
        );
        r.high_watermark()
    };
    assert_eq!(start(12), Offset(12));
    // Never above what this replica holds durably.
    assert_eq!(start(30), Offset(15));
}

/// Regression (simulator with retention, seed 3 at 20‰ in `retention_makes_lagging_followers_
/// reset_and_rejoin`): the leader's replica never learned that retention moved its log start,
/// so a follower that reset to the leader's log start fetched there with no epoch and was told
/// it diverged at 0; it reset to 0, was refused below the log start, reset again, for ever.
#[test]
fn a_leader_learns_its_log_start_from_retention() {
    let mut r = leader();
    produce(&mut r, 1, AckLevel::Leader, 60);
    step(
        &mut r,
        Input::Flushed {
            durable: Offset(60),
        },
    );
    step(
        &mut r,
        Input::LogStartMoved {
            log_start: Offset(50),
        },
    );
    let out = step(&mut r, forged(2, 20, Some(1), 20));
    assert!(
        matches!(
            out.as_slice(),
            [Output::RejectFetch {
                error: FetchError::OffsetOutOfRange {
                    log_start: Offset(50),
                    ..
                },
                ..
            }]
        ),
        "{out:?}"
    );
    // A follower whose log was emptied to start there fetches with no epoch: served.
    let out = step(&mut r, forged(2, 50, None, 50));
    assert!(
        matches!(
            out.last(),
            Some(Output::ServeFetch {
                fetch_offset: Offset(50),
                ..
            })
        ),
        "{out:?}"
    );
}
