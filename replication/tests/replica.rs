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
    let mut replica = Replica::new(config(1), empty_log(), EpochHistory::default(), 0);
    let mut out = Vec::new();
    replica.step(
        Input::BecomeLeader {
            epoch: Epoch(1),
            isr: vec![1, 2, 3],
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
    let mut f = Replica::new(config(2), log, history, 0);
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
    fetch(&mut r, 2, 0, 0);
    fetch(&mut r, 3, 0, 0);
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
    let mut f = Replica::new(config(2), empty_log(), EpochHistory::default(), 0);
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
    let mut f = Replica::new(config(2), empty_log(), EpochHistory::default(), 0);
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
    let mut f = Replica::new(config(2), log, history, 0);
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
    );
    step(
        &mut leader,
        Input::BecomeLeader {
            epoch: Epoch(3),
            isr: vec![2, 3],
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
    let mut leader = Replica::new(config(1), log, history, 0);
    step(
        &mut leader,
        Input::BecomeLeader {
            epoch: Epoch(3),
            isr: vec![1, 2, 3],
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
    assert_eq!(
        out,
        vec![
            Output::EpochHistoryChanged,
            Output::AppendFetched { count: 1 }
        ]
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
