//! Scenario tests for the replica in controller mode (`isr_via_controller`: ISR proposals,
//! the maximal ISR, the controller lease), for strict min ISR in both modes, and for role
//! changes at any time. Kept apart from `replica.rs` (static mode) so neither file grows past
//! a readable size.

use proptest::prelude::*;
use wharf_replication::isr::{maximal_isr, minimal_isr, successor, wanted_isr, FollowerView};
use wharf_replication::*;
use wharf_storage::{Epoch, Offset};

/// Far beyond any tick of these tests.
const LEASE_FOREVER_MS: u64 = 1 << 40;

fn config(me: BrokerId, isr_via_controller: bool) -> ReplicaConfig {
    ReplicaConfig {
        broker_id: me,
        replicas: vec![1, 2, 3],
        min_insync_replicas: 2,
        replica_lag_max_ms: 1000,
        fetch_backoff_ms: 50,
        isr_via_controller,
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

fn step(replica: &mut Replica, input: Input) -> Outbox {
    let mut out = Vec::new();
    replica.step(input, &mut out);
    out
}

/// Broker 1 leading epoch 1 at partition epoch 10 with `isr`, in controller mode, with a lease
/// granted until `lease_until_ms` (0: none).
fn controller_leader(isr: Vec<BrokerId>, lease_until_ms: u64) -> Replica {
    let mut r =
        Replica::new(config(1, true), empty_log(), EpochHistory::default(), 0).expect("replica");
    step(
        &mut r,
        Input::BecomeLeader {
            epoch: Epoch(1),
            isr,
            partition_epoch: 10,
        },
    );
    if lease_until_ms > 0 {
        step(
            &mut r,
            Input::LeaseRenewed {
                until_ms: lease_until_ms,
            },
        );
    }
    r
}

fn static_leader(isr: Vec<BrokerId>) -> Replica {
    let mut r =
        Replica::new(config(1, false), empty_log(), EpochHistory::default(), 0).expect("replica");
    step(
        &mut r,
        Input::BecomeLeader {
            epoch: Epoch(1),
            isr,
            partition_epoch: 0,
        },
    );
    r
}

/// Produces `records` records with `acks`; returns the outputs (after the append if any).
fn produce(replica: &mut Replica, id: u64, acks: AckLevel, records: u64) -> Outbox {
    let out = step(
        replica,
        Input::Produce {
            waiter: WaiterId(id),
            acks,
            deadline_ms: 1 << 30,
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

fn flushed(replica: &mut Replica, durable: u64) -> Outbox {
    step(
        replica,
        Input::Flushed {
            durable: Offset(durable),
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

fn tick(replica: &mut Replica, now_ms: u64) -> Outbox {
    step(replica, Input::Tick { now_ms })
}

fn completed(out: &[Output]) -> Vec<(u64, Result<Ack, ProduceError>)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Complete { waiter, result } => Some((waiter.0, result.clone())),
            _ => None,
        })
        .collect()
}

fn proposals(out: &[Output]) -> Vec<(Vec<BrokerId>, u64)> {
    out.iter()
        .filter_map(|o| match o {
            Output::ProposeIsr {
                isr,
                leader_epoch,
                partition_epoch,
            } => {
                assert_eq!(*leader_epoch, Epoch(1));
                Some((isr.clone(), *partition_epoch))
            }
            _ => None,
        })
        .collect()
}

fn isr_changes(out: &[Output]) -> Vec<Vec<BrokerId>> {
    out.iter()
        .filter_map(|o| match o {
            Output::IsrChanged(isr) => Some(isr.clone()),
            _ => None,
        })
        .collect()
}

/// A controller-mode leader of [0, 5) whose follower 3 holds only [0, 3) and stops fetching:
/// at 1001 ms it proposes the ISR [1, 2]. Waiter 1 (acks=all, [0, 5)) waits.
fn leader_proposing_to_drop_3() -> Replica {
    let mut r = controller_leader(vec![1, 2, 3], LEASE_FOREVER_MS);
    assert!(completed(&produce(&mut r, 1, AckLevel::All, 5)).is_empty());
    flushed(&mut r, 5);
    fetch(&mut r, 2, 5, 5);
    fetch(&mut r, 3, 3, 3);
    assert_eq!(r.high_watermark(), Offset(3));
    tick(&mut r, 900);
    fetch(&mut r, 2, 5, 5);
    let out = tick(&mut r, 1001);
    assert_eq!(proposals(&out), vec![(vec![1, 2], 10)]);
    assert!(isr_changes(&out).is_empty(), "not adopted: {out:?}");
    assert_eq!(r.isr(), &[1, 2, 3]);
    assert_eq!(r.proposed_isr(), Some(&[1, 2][..]));
    r
}

#[test]
fn a_pending_shrink_holds_the_hw_at_the_removed_members_durable_offset() {
    let mut r = leader_proposing_to_drop_3();
    // Everything else is durable on 1 and 2, but broker 3 may still be elected.
    assert!(completed(&produce(&mut r, 2, AckLevel::All, 5)).is_empty());
    flushed(&mut r, 10);
    let out = fetch(&mut r, 2, 10, 10);
    assert!(completed(&out).is_empty(), "{out:?}");
    assert_eq!(r.high_watermark(), Offset(3), "held by broker 3");
    assert!(proposals(&tick(&mut r, 1500)).is_empty(), "one in flight");

    // The controller commits it: adopted, reported, and the HW moves over [1, 2].
    let out = step(
        &mut r,
        Input::IsrCommitted {
            isr: vec![2, 1],
            partition_epoch: 11,
        },
    );
    assert_eq!(isr_changes(&out), vec![vec![1, 2]]);
    assert!(out.contains(&Output::HighWatermark(Offset(10))));
    let mut done: Vec<u64> = completed(&out).iter().map(|(id, _)| *id).collect();
    done.sort_unstable();
    assert_eq!(done, vec![1, 2]);
    assert_eq!((r.isr(), r.proposed_isr()), (&[1, 2][..], None));
    assert_eq!(r.partition_epoch(), 11);
    // A repeated or older commit changes nothing.
    for partition_epoch in [11, 9] {
        let out = step(
            &mut r,
            Input::IsrCommitted {
                isr: vec![1, 2, 3],
                partition_epoch,
            },
        );
        assert!(out.is_empty(), "{out:?}");
    }
    assert_eq!(r.isr(), &[1, 2]);
}

#[test]
fn a_pending_expansion_waits_for_the_new_member_but_quorum_does_not_count_it_yet() {
    let mut r = controller_leader(vec![1, 2], LEASE_FOREVER_MS);
    // Broker 3 fetches at the end with everything committed: it may join.
    let out = fetch(&mut r, 3, 0, 0);
    assert_eq!(proposals(&out), vec![(vec![1, 2, 3], 10)]);
    assert_eq!(r.isr(), &[1, 2]);
    assert_eq!(r.maximal_isr(), vec![1, 2, 3]);

    // quorum counts the minimal ISR [1, 2]; the HW waits for the maximal one [1, 2, 3].
    assert!(completed(&produce(&mut r, 1, AckLevel::Quorum, 5)).is_empty());
    assert!(completed(&produce(&mut r, 2, AckLevel::All, 5)).is_empty());
    flushed(&mut r, 10);
    let done = completed(&fetch(&mut r, 2, 10, 10));
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].0, 1);
    assert_eq!(done[0].1.clone().expect("acked").durable_replicas, 2);
    assert_eq!(r.high_watermark(), Offset(0), "broker 3 is not durable yet");
    let done = completed(&fetch(&mut r, 3, 10, 10));
    assert_eq!(done.iter().map(|d| d.0).collect::<Vec<_>>(), vec![2]);
    assert_eq!(r.high_watermark(), Offset(10));

    // Broker 3's copy does not count towards quorum until the controller commits it.
    assert!(completed(&produce(&mut r, 3, AckLevel::Quorum, 5)).is_empty());
    flushed(&mut r, 15);
    assert!(completed(&fetch(&mut r, 3, 15, 15)).is_empty());
    let out = step(
        &mut r,
        Input::IsrCommitted {
            isr: vec![1, 2, 3],
            partition_epoch: 11,
        },
    );
    assert_eq!(isr_changes(&out), vec![vec![1, 2, 3]]);
    // Now it counts (a majority holds the batch), but the successor, broker 2, must hold it
    // too: the controller would elect broker 2, not 3, if broker 1 failed.
    assert!(completed(&out).is_empty(), "{out:?}");
    let done = completed(&fetch(&mut r, 2, 15, 15));
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].1.clone().expect("acked").durable_replicas, 3);
}

#[test]
fn an_unanswered_proposal_is_sent_again_after_the_retry_delay() {
    let mut r = leader_proposing_to_drop_3();
    fetch(&mut r, 2, 5, 5);
    assert!(proposals(&tick(&mut r, 1001 + ISR_PROPOSAL_RETRY_MS - 1)).is_empty());
    fetch(&mut r, 2, 5, 5);
    let out = tick(&mut r, 1001 + ISR_PROPOSAL_RETRY_MS);
    assert_eq!(proposals(&out), vec![(vec![1, 2], 10)], "the same proposal");
}

#[test]
fn a_proposal_refused_as_not_applied_leaves_the_maximal_isr_and_is_retried_later() {
    let mut r = leader_proposing_to_drop_3();
    // Answers to other proposals are ignored.
    let out = step(
        &mut r,
        Input::IsrRejected {
            partition_epoch: 9,
            reason: IsrRejection::NotApplied,
        },
    );
    assert!(out.is_empty());
    assert!(r.proposed_isr().is_some());
    let out = step(
        &mut r,
        Input::IsrRejected {
            partition_epoch: 10,
            reason: IsrRejection::IneligibleReplica,
        },
    );
    assert!(out.is_empty(), "{out:?}");
    assert_eq!((r.isr(), r.proposed_isr()), (&[1, 2, 3][..], None));
    assert_eq!(r.high_watermark(), Offset(3), "broker 3 is still in sync");
    fetch(&mut r, 2, 5, 5);
    assert!(
        proposals(&tick(&mut r, 1500)).is_empty(),
        "not before the delay"
    );
    fetch(&mut r, 2, 5, 5);
    let out = tick(&mut r, 1001 + ISR_PROPOSAL_RETRY_MS);
    assert_eq!(proposals(&out), vec![(vec![1, 2], 10)]);
}

/// The controller may have applied a proposal answered `StalePartitionEpoch` (its first answer
/// was lost): it stays in the maximal ISR, unsent, until the controller's state arrives.
#[test]
fn a_proposal_refused_as_stale_stays_in_the_maximal_isr_until_the_commit_arrives() {
    let mut r = controller_leader(vec![1, 2], LEASE_FOREVER_MS);
    assert_eq!(
        proposals(&fetch(&mut r, 3, 0, 0)),
        vec![(vec![1, 2, 3], 10)]
    );
    step(
        &mut r,
        Input::IsrRejected {
            partition_epoch: 10,
            reason: IsrRejection::StalePartitionEpoch,
        },
    );
    assert_eq!(r.maximal_isr(), vec![1, 2, 3]);
    assert!(completed(&produce(&mut r, 1, AckLevel::All, 5)).is_empty());
    flushed(&mut r, 5);
    fetch(&mut r, 2, 5, 5);
    assert_eq!(r.high_watermark(), Offset(0), "broker 3 may be in the ISR");
    assert!(proposals(&tick(&mut r, 5 * ISR_PROPOSAL_RETRY_MS)).is_empty());
    fetch(&mut r, 2, 5, 5);
    assert_eq!(completed(&fetch(&mut r, 3, 5, 5)).len(), 1);
    assert_eq!(r.high_watermark(), Offset(5));
    // The controller's state: broker 3 did join (our proposal, answered twice).
    let out = step(
        &mut r,
        Input::IsrCommitted {
            isr: vec![1, 2, 3],
            partition_epoch: 11,
        },
    );
    assert_eq!(isr_changes(&out), vec![vec![1, 2, 3]]);
    assert_eq!((r.isr(), r.proposed_isr()), (&[1, 2, 3][..], None));
}

#[test]
fn a_fenced_leader_epoch_stops_all_acknowledgements_until_a_role_change() {
    let mut r = leader_proposing_to_drop_3();
    let out = step(
        &mut r,
        Input::IsrRejected {
            partition_epoch: 10,
            reason: IsrRejection::FencedLeaderEpoch,
        },
    );
    let not_leader = Err(ProduceError::NotLeader {
        leader: None,
        epoch: Epoch(1),
    });
    assert_eq!(completed(&out), vec![(1, not_leader.clone())]);
    assert!(!r.may_acknowledge());
    for (id, acks) in [
        (2, AckLevel::All),
        (3, AckLevel::Leader),
        (4, AckLevel::None),
    ] {
        assert_eq!(
            completed(&produce(&mut r, id, acks, 1)),
            vec![(id, not_leader.clone())]
        );
    }
    assert_eq!(r.end_offset(), Offset(5), "nothing appended");
    fetch(&mut r, 3, 5, 5);
    assert_eq!(r.high_watermark(), Offset(3), "frozen");
    assert!(proposals(&tick(&mut r, 10_000)).is_empty());
    // The controller's decision arrives: broker 2 leads epoch 2.
    step(
        &mut r,
        Input::BecomeFollower {
            epoch: Epoch(2),
            leader: 2,
        },
    );
    assert_eq!(r.role(), Role::Follower { leader: 2 });
    assert!(r.may_acknowledge(), "the fence ends with the role change");
}

/// A controller change of its own (it fenced broker 3, say) reaches the leader with no
/// proposal pending; a committed ISR without the leader means it is being replaced.
#[test]
fn the_leader_adopts_the_controllers_own_changes() {
    let mut r = controller_leader(vec![1, 2, 3], LEASE_FOREVER_MS);
    let out = step(
        &mut r,
        Input::IsrCommitted {
            isr: vec![1, 2],
            partition_epoch: 12,
        },
    );
    assert_eq!(isr_changes(&out), vec![vec![1, 2]]);
    // Not a subset of the replica set: ignored.
    let out = step(
        &mut r,
        Input::IsrCommitted {
            isr: vec![1, 9],
            partition_epoch: 13,
        },
    );
    assert!(out.is_empty());
    assert_eq!(r.partition_epoch(), 12);
    assert!(completed(&produce(&mut r, 1, AckLevel::All, 1)).is_empty());
    let out = step(
        &mut r,
        Input::IsrCommitted {
            isr: vec![2, 3],
            partition_epoch: 13,
        },
    );
    assert!(
        matches!(
            completed(&out).as_slice(),
            [(1, Err(ProduceError::NotLeader { leader: None, .. }))]
        ),
        "{out:?}"
    );
    assert!(!r.may_acknowledge());
}

#[test]
fn an_expired_lease_blocks_acks_all_and_the_hw_while_acks_leader_completes() {
    // No lease yet: acks=all is refused before append; acks=leader works.
    let mut r = controller_leader(vec![1, 2, 3], 0);
    assert_eq!(
        completed(&produce(&mut r, 1, AckLevel::All, 5)),
        vec![(1, Err(ProduceError::LeaderLeaseExpired { until_ms: 0 }))]
    );
    assert!(ProduceError::LeaderLeaseExpired { until_ms: 0 }.is_retriable());
    assert_eq!(r.end_offset(), Offset(0), "nothing appended");
    assert!(completed(&produce(&mut r, 2, AckLevel::Leader, 5)).is_empty());
    assert_eq!(completed(&flushed(&mut r, 5)).len(), 1);
    fetch(&mut r, 2, 5, 5);
    fetch(&mut r, 3, 5, 5);
    assert_eq!(r.high_watermark(), Offset(0), "no lease, no HW");

    // The lease arrives: the HW catches up at once.
    let out = step(&mut r, Input::LeaseRenewed { until_ms: 2_000 });
    assert!(out.contains(&Output::HighWatermark(Offset(5))), "{out:?}");
    for (id, acks) in [(3, AckLevel::All), (4, AckLevel::Quorum)] {
        assert!(completed(&produce(&mut r, id, acks, 5)).is_empty());
    }
    flushed(&mut r, 15);
    for now_ms in (500..2_000).step_by(500) {
        tick(&mut r, now_ms);
        fetch(&mut r, 2, 15, 5);
        fetch(&mut r, 3, 15, 5);
    }
    // It runs out: the waiters fail fast, retriably; followers' reports move nothing.
    let expired = Err(ProduceError::LeaderLeaseExpired { until_ms: 2_000 });
    let mut done = completed(&tick(&mut r, 2_000));
    done.sort_by_key(|d| d.0);
    assert_eq!(done, vec![(3, expired.clone()), (4, expired.clone())]);
    assert!(!r.may_acknowledge());
    let out = fetch(&mut r, 2, 15, 15);
    assert!(completed(&out).is_empty());
    fetch(&mut r, 3, 15, 15);
    assert_eq!(r.high_watermark(), Offset(5));
    assert_eq!(
        completed(&produce(&mut r, 5, AckLevel::Replicas(2), 1)),
        vec![(5, expired)]
    );
    assert!(completed(&produce(&mut r, 6, AckLevel::Leader, 5)).is_empty());
    assert_eq!(completed(&flushed(&mut r, 20)).len(), 1, "acks=leader");
    assert_eq!(r.high_watermark(), Offset(5));
    // Older leases change nothing; a newer one lets the HW move again.
    assert!(step(&mut r, Input::LeaseRenewed { until_ms: 1_000 }).is_empty());
    fetch(&mut r, 2, 20, 20);
    let out = step(&mut r, Input::LeaseRenewed { until_ms: 4_000 });
    assert!(out.contains(&Output::HighWatermark(Offset(15))), "{out:?}");
}

#[test]
fn static_mode_has_no_lease_and_ignores_the_controller_inputs() {
    let mut r = static_leader(vec![1, 2, 3]);
    assert!(r.may_acknowledge());
    assert!(step(&mut r, Input::LeaseRenewed { until_ms: 5 }).is_empty());
    assert_eq!(r.lease_until_ms(), 0);
    let out = step(
        &mut r,
        Input::IsrCommitted {
            isr: vec![1],
            partition_epoch: 3,
        },
    );
    assert!(out.is_empty());
    assert_eq!(r.isr(), &[1, 2, 3]);
    tick(&mut r, 10_000);
    assert!(completed(&produce(&mut r, 1, AckLevel::Leader, 1)).is_empty());
    assert_eq!(completed(&flushed(&mut r, 1)).len(), 1);
}

/// Strict min ISR (KIP-966), both modes: with fewer than `min_insync_replicas` in the ISR the
/// HW stays put, even when an out-of-sync follower holds the data (it may not be elected).
#[test]
fn the_hw_advances_only_while_the_isr_holds_min_insync_replicas() {
    for isr_via_controller in [false, true] {
        let mut r = if isr_via_controller {
            controller_leader(vec![1], LEASE_FOREVER_MS)
        } else {
            static_leader(vec![1])
        };
        assert!(completed(&produce(&mut r, 1, AckLevel::Leader, 10)).is_empty());
        flushed(&mut r, 10);
        // Broker 2 holds [0, 5) durably but is not at the end: it does not (ask to) join.
        let out = fetch(&mut r, 2, 5, 5);
        assert!(proposals(&out).is_empty() && isr_changes(&out).is_empty());
        assert_eq!(
            r.high_watermark(),
            Offset(0),
            "controller {isr_via_controller}"
        );
        for acks in [AckLevel::All, AckLevel::Quorum, AckLevel::Replicas(2)] {
            assert!(
                matches!(
                    completed(&produce(&mut r, 2, acks, 1)).as_slice(),
                    [(
                        2,
                        Err(ProduceError::NotEnoughReplicas {
                            required: 2,
                            in_sync: 1
                        })
                    )]
                ),
                "{acks:?}"
            );
        }
        // Broker 2 catches up and joins: the HW moves.
        let out = fetch(&mut r, 2, 10, 10);
        if isr_via_controller {
            assert_eq!(proposals(&out), vec![(vec![1, 2], 10)]);
            assert_eq!(r.high_watermark(), Offset(0), "not committed yet");
            step(
                &mut r,
                Input::IsrCommitted {
                    isr: vec![1, 2],
                    partition_epoch: 11,
                },
            );
        }
        assert_eq!(r.isr(), &[1, 2]);
        assert_eq!(
            r.high_watermark(),
            Offset(10),
            "controller {isr_via_controller}"
        );
    }
}

/// A leader told to follow fails every waiting produce (retriably; the client looks up the
/// new leader) and forgets its followers, proposals included.
#[test]
fn a_leader_that_becomes_follower_fails_its_waiters_and_drops_follower_state() {
    for isr_via_controller in [false, true] {
        let mut r = if isr_via_controller {
            leader_proposing_to_drop_3()
        } else {
            static_leader(vec![1, 2, 3])
        };
        // Waiter 1 (acks=all) already waits in the controller-mode set-up.
        if !isr_via_controller {
            assert!(completed(&produce(&mut r, 1, AckLevel::All, 5)).is_empty());
        }
        assert!(completed(&produce(&mut r, 2, AckLevel::Quorum, 5)).is_empty());
        let out = step(
            &mut r,
            Input::BecomeFollower {
                epoch: Epoch(2),
                leader: 2,
            },
        );
        let mut done = completed(&out);
        done.sort_by_key(|d| d.0);
        assert_eq!(done.iter().map(|d| d.0).collect::<Vec<_>>(), vec![1, 2]);
        for (_, result) in &done {
            let error = result.clone().expect_err("failed");
            assert_eq!(error, ProduceError::LeaderChanged { epoch: Epoch(2) });
            assert!(error.is_retriable());
        }
        assert_eq!(r.waiting_produces(), 0);
        assert!(r.isr().is_empty() && r.follower_lag().is_empty());
        assert_eq!(r.proposed_isr(), None);
        // A follower's fetch is refused; nothing is proposed any more.
        let out = fetch(&mut r, 3, 5, 5);
        assert!(matches!(
            out.as_slice(),
            [Output::RejectFetch {
                error: FetchError::NotLeader { .. },
                ..
            }]
        ));
        assert!(proposals(&tick(&mut r, 100_000)).is_empty());
    }
}

/// Failover seen by a follower: a new leader and epoch arrive while its fetch to the old
/// leader is out. It fetches from the new leader at once, ignores the old leader's late reply
/// (by fetch id), and truncates what the new leader does not have.
#[test]
fn a_follower_abandons_its_fetch_to_the_old_leader_and_truncates_against_the_new_one() {
    // Epoch 1 wrote [0, 10), epoch 3 (leader 1) [10, 20) of which the new leader has [10, 15).
    let log = LogState {
        log_start: Offset(0),
        end: Offset(20),
        durable: Offset(20),
        high_watermark: Offset(10),
    };
    let history = EpochHistory::new(
        vec![(Epoch(1), Offset(0)), (Epoch(3), Offset(10))],
        Offset(20),
    )
    .expect("history");
    let mut f = Replica::new(config(2, true), log, history, 0).expect("replica");
    let out = step(
        &mut f,
        Input::BecomeFollower {
            epoch: Epoch(3),
            leader: 1,
        },
    );
    let Some(Output::SendFetch {
        leader: 1,
        request: old,
    }) = out.last().cloned()
    else {
        panic!("{out:?}");
    };
    // Failover: broker 3 leads epoch 4.
    let out = step(
        &mut f,
        Input::BecomeFollower {
            epoch: Epoch(4),
            leader: 3,
        },
    );
    let Some(Output::SendFetch {
        leader: 3,
        request: new,
    }) = out.last().cloned()
    else {
        panic!("{out:?}");
    };
    assert_ne!(new.fetch_id, old.fetch_id);
    assert_eq!(
        (new.leader_epoch, new.fetch_offset, new.last_fetched_epoch),
        (Epoch(4), Offset(20), Some(Epoch(3)))
    );
    // The old leader's late answer (stamped with either epoch) is ignored.
    for leader_epoch in [Epoch(3), Epoch(4)] {
        let out = step(
            &mut f,
            Input::FetchReply {
                fetch_id: old.fetch_id,
                leader_epoch,
                reply: FetchReply::Data {
                    high_watermark: Offset(25),
                    log_start: Offset(0),
                    batches: vec![BatchInfo {
                        base_offset: Offset(20),
                        next_offset: Offset(25),
                        leader_epoch: Epoch(3),
                    }],
                },
            },
        );
        assert!(out.is_empty(), "{out:?}");
    }
    assert_eq!(
        (f.end_offset(), f.high_watermark()),
        (Offset(20), Offset(10))
    );
    // The new leader's copy of epoch 3 ends at 15: truncate there, then fetch from 15.
    let out = step(
        &mut f,
        Input::FetchReply {
            fetch_id: new.fetch_id,
            leader_epoch: Epoch(4),
            reply: FetchReply::Error(FetchError::Diverging {
                epoch: Epoch(3),
                end_offset: Offset(15),
            }),
        },
    );
    assert_eq!(out, vec![Output::Truncate { to: Offset(15) }]);
    let out = step(
        &mut f,
        Input::Truncated {
            end: Offset(15),
            durable: Offset(15),
        },
    );
    let Some(Output::SendFetch { leader: 3, request }) = out.last().cloned() else {
        panic!("{out:?}");
    };
    assert_eq!(
        (request.fetch_offset, request.last_fetched_epoch),
        (Offset(15), Some(Epoch(3)))
    );
}

/// Broker 1 leading epoch 1 at partition epoch 10 in controller mode, over the replica set
/// `replicas` (broker 1 anywhere in it) with `isr`, its lease granted for ever.
fn controller_leader_of(replicas: Vec<BrokerId>, isr: Vec<BrokerId>) -> Replica {
    let config = ReplicaConfig {
        replicas,
        ..config(1, true)
    };
    let mut r = Replica::new(config, empty_log(), EpochHistory::default(), 0).expect("replica");
    step(
        &mut r,
        Input::BecomeLeader {
            epoch: Epoch(1),
            isr,
            partition_epoch: 10,
        },
    );
    step(
        &mut r,
        Input::LeaseRenewed {
            until_ms: LEASE_FOREVER_MS,
        },
    );
    r
}

/// The waiters that completed successfully in `out`, with their acks' replica counts.
fn acked(out: &[Output]) -> Vec<(u64, u8)> {
    completed(out)
        .into_iter()
        .map(|(id, result)| (id, result.expect("acked").durable_replicas))
        .collect()
}

/// The successor rule (CI: an idempotent producer stuck on out_of_order_sequence after a
/// failover): a majority holding a `quorum`/`N` batch is not enough, the broker the
/// controller would elect if the leader failed must hold it. Before, broker 3's copy
/// completed these waiters; broker 2, lagging, was then elected and broker 3 truncated to it.
#[test]
fn quorum_and_n_wait_for_the_successor_not_just_any_majority() {
    for acks in [AckLevel::Quorum, AckLevel::Replicas(2)] {
        let mut r = controller_leader_of(vec![1, 2, 3], vec![1, 2, 3]);
        assert!(completed(&produce(&mut r, 1, acks, 5)).is_empty());
        flushed(&mut r, 5);
        let out = fetch(&mut r, 3, 5, 5);
        assert!(completed(&out).is_empty(), "acks={acks:?}: {out:?}");
        // Fetched is not enough: a crash of broker 2 after the leader's would lose it, but
        // the leader's failure alone must not.
        assert!(
            completed(&fetch(&mut r, 2, 5, 0)).is_empty(),
            "acks={acks:?}"
        );
        assert_eq!(
            acked(&fetch(&mut r, 2, 5, 5)),
            vec![(1, 3)],
            "acks={acks:?}"
        );
    }
}

/// The successor comes from the replica-set order (the controller's ISR order), not from
/// broker ids and not from where the leader sits: replicas [2, 1, 3] led by 1 → broker 2;
/// [1, 3, 2] → broker 3.
#[test]
fn the_successor_is_the_first_other_isr_member_in_replica_order() {
    let mut r = controller_leader_of(vec![2, 1, 3], vec![3, 2, 1]);
    assert!(completed(&produce(&mut r, 1, AckLevel::Quorum, 5)).is_empty());
    flushed(&mut r, 5);
    assert!(completed(&fetch(&mut r, 3, 5, 5)).is_empty());
    assert_eq!(acked(&fetch(&mut r, 2, 5, 5)), vec![(1, 3)]);

    let mut r = controller_leader_of(vec![1, 3, 2], vec![1, 2, 3]);
    assert!(completed(&produce(&mut r, 1, AckLevel::Replicas(2), 5)).is_empty());
    flushed(&mut r, 5);
    assert_eq!(acked(&fetch(&mut r, 3, 5, 5)), vec![(1, 2)]);

    // Broker 2 out of the ISR: broker 3 succeeds broker 1 in [2, 1, 3].
    let mut r = controller_leader_of(vec![2, 1, 3], vec![1, 3]);
    assert!(completed(&produce(&mut r, 1, AckLevel::Quorum, 5)).is_empty());
    flushed(&mut r, 5);
    assert_eq!(acked(&fetch(&mut r, 3, 5, 5)), vec![(1, 2)]);
}

/// With a shrink pending that removes the successor, the controller may still elect it (the
/// proposal may not be applied), so quorum waits for it as well as for the successor under
/// the proposed ISR; the minimal ISR's successor alone (broker 3) would not do.
#[test]
fn with_a_shrink_of_the_successor_pending_quorum_waits_for_both_successors() {
    let mut r = controller_leader_of(vec![1, 2, 3], vec![1, 2, 3]);
    assert!(completed(&produce(&mut r, 1, AckLevel::Quorum, 5)).is_empty());
    flushed(&mut r, 5);
    fetch(&mut r, 2, 3, 3);
    assert!(completed(&fetch(&mut r, 3, 5, 5)).is_empty());
    tick(&mut r, 900);
    fetch(&mut r, 3, 5, 5);
    let out = tick(&mut r, 1001);
    assert_eq!(proposals(&out), vec![(vec![1, 3], 10)]);
    assert!(completed(&out).is_empty());
    assert!(
        completed(&fetch(&mut r, 3, 5, 5)).is_empty(),
        "broker 2 may still be elected"
    );
    let out = step(
        &mut r,
        Input::IsrCommitted {
            isr: vec![1, 3],
            partition_epoch: 11,
        },
    );
    assert_eq!(acked(&out), vec![(1, 2)]);
}

/// A follower joining the ISR may become the successor (broker 2 comes before broker 3 in
/// [1, 2, 3, 4]), so it joins only once it durably holds what `quorum`/`N` acknowledged with
/// the old successor, not merely the HW (which broker 4 holds back).
#[test]
fn a_follower_joins_only_holding_what_quorum_and_n_acknowledged() {
    let mut r = controller_leader_of(vec![1, 2, 3, 4], vec![1, 3, 4]);
    fetch(&mut r, 4, 0, 0);
    // Broker 2 is at the end with the HW: it may join, but the controller does not apply it.
    let out = fetch(&mut r, 2, 0, 0);
    assert_eq!(proposals(&out), vec![(vec![1, 2, 3, 4], 10)]);
    step(
        &mut r,
        Input::IsrRejected {
            partition_epoch: 10,
            reason: IsrRejection::NotApplied,
        },
    );
    assert_eq!(r.proposed_isr(), None);
    // Acknowledged on 1 and 3, the successor under [1, 3, 4]; broker 4 holds the HW at 0.
    assert!(completed(&produce(&mut r, 1, AckLevel::Replicas(2), 5)).is_empty());
    flushed(&mut r, 5);
    assert_eq!(acked(&fetch(&mut r, 3, 5, 5)), vec![(1, 2)]);
    assert_eq!(r.high_watermark(), Offset(0));
    // Broker 2's last fetch was at the end then and it holds the HW, but not [0, 5).
    let out = tick(&mut r, 1000);
    assert!(proposals(&out).is_empty(), "{out:?}");
    let out = fetch(&mut r, 2, 5, 5);
    assert_eq!(proposals(&out), vec![(vec![1, 2, 3, 4], 10)]);
}

/// Static mode has no election (the first replica always leads): no successor rule, any
/// majority of the ISR with the leader completes `quorum`.
#[test]
fn static_mode_quorum_needs_no_successor() {
    let mut r = static_leader(vec![1, 2, 3]);
    assert!(completed(&produce(&mut r, 1, AckLevel::Quorum, 5)).is_empty());
    flushed(&mut r, 5);
    assert_eq!(acked(&fetch(&mut r, 3, 5, 5)), vec![(1, 2)]);
}

proptest! {
    /// The maximal ISR holds every member of either ISR, the minimal one only members of both,
    /// and the HW over the maximal ISR never passes the HW over either (a pending change never
    /// commits what one of the two ISRs lacks).
    #[test]
    fn maximal_and_minimal_isrs_bound_both_sides(
        durables in proptest::collection::vec(0u64..50, 5),
        committed_mask in 0u32..32,
        proposed_mask in proptest::option::of(0u32..32),
    ) {
        let replicas: Vec<BrokerId> = (1..=5).collect();
        let pick = |mask: u32| -> Vec<BrokerId> {
            replicas.iter().copied().filter(|r| *r == 1 || mask & (1 << (r - 1)) != 0).collect()
        };
        let committed = pick(committed_mask);
        let proposed = proposed_mask.map(pick);
        let maximal = maximal_isr(&committed, proposed.as_deref());
        let minimal = minimal_isr(&committed, proposed.as_deref());
        for r in replicas.iter() {
            let in_proposed = proposed.as_ref().is_none_or(|p| p.contains(r));
            let in_any = committed.contains(r) || proposed.as_ref().is_some_and(|p| p.contains(r));
            prop_assert_eq!(maximal.contains(r), in_any);
            prop_assert_eq!(minimal.contains(r), committed.contains(r) && in_proposed);
        }
        let durable_of = |r: BrokerId| Offset(durables[(r - 1) as usize]);
        let hw = high_watermark(&replicas, &maximal, 2, durable_of);
        prop_assert!(hw <= high_watermark(&replicas, &committed, 2, durable_of));
        if let Some(p) = &proposed {
            prop_assert!(hw <= high_watermark(&replicas, p, 2, durable_of));
        }
    }

    /// The successor is what the controller's `elect` takes when the leader fails and every
    /// other member is live: the ISR in replica order (the controller's ISR order), the
    /// leader removed, first member; whatever order the leader's ISR list has.
    #[test]
    fn the_successor_is_the_controllers_choice(
        replicas in Just(vec![1u32, 2, 3, 4, 5]).prop_shuffle(),
        isr_mask in 0u32..32,
        leader_index in 0usize..5,
    ) {
        let leader = replicas[leader_index];
        let mut isr: Vec<BrokerId> = (1..=5)
            .filter(|r| *r == leader || isr_mask & (1 << (r - 1)) != 0)
            .collect();
        isr.reverse();
        let mut controller_isr: Vec<BrokerId> =
            replicas.iter().copied().filter(|r| isr.contains(r)).collect();
        controller_isr.retain(|r| *r != leader);
        prop_assert_eq!(
            successor(&replicas, &isr, leader),
            controller_isr.first().copied()
        );
    }

    /// The wanted ISR always holds the leader, keeps only followers that keep up, and adds
    /// only followers that may join.
    #[test]
    fn the_wanted_isr_follows_the_stay_and_join_rules(
        committed_mask in 0u32..16,
        keeps_up in proptest::collection::vec(any::<bool>(), 3),
        may_join in proptest::collection::vec(any::<bool>(), 3),
    ) {
        let committed: Vec<BrokerId> =
            (1..=4).filter(|r| *r == 1 || committed_mask & (1 << (r - 1)) != 0).collect();
        let views: Vec<FollowerView> = (0..3)
            .map(|i| FollowerView { broker: i as BrokerId + 2, keeps_up: keeps_up[i], may_join: may_join[i] })
            .collect();
        let wanted = wanted_isr(1, &committed, &views);
        prop_assert!(wanted.contains(&1));
        prop_assert!(wanted.windows(2).all(|w| w[0] < w[1]));
        for v in &views {
            let expected = v.keeps_up && (committed.contains(&v.broker) || v.may_join);
            prop_assert_eq!(wanted.contains(&v.broker), expected);
        }
    }
}
