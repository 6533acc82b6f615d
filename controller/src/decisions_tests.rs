//! Unit tests and property tests for the controller decisions.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

fn registration(id: BrokerId, incarnation: u64) -> BrokerRegistration {
    BrokerRegistration {
        id,
        incarnation,
        client_address: format!("client-{id}"),
        internal_address: format!("internal-{id}"),
    }
}

fn apply(image: &mut ClusterImage, records: &[Record]) {
    let index = image.applied_index() + 1;
    for record in records {
        image.apply(index, record).expect("decided records apply");
    }
}

fn image_with_brokers(ids: &[BrokerId]) -> ClusterImage {
    let mut image = ClusterImage::new();
    for id in ids {
        let records = register(&image, &registration(*id, 1)).expect("registers");
        apply(&mut image, &records);
    }
    image
}

fn topic_request(name: &str, partitions: u32, rf: u16, min_isr: u16) -> CreateTopicRequest {
    CreateTopicRequest {
        name: name.into(),
        partitions,
        replication_factor: rf,
        min_insync_replicas: min_isr,
        unclean_leader_election: false,
        config: BTreeMap::new(),
    }
}

/// Brokers 1..=3, topic "t" with one partition on replicas [1, 2, 3] led by 1.
fn three_replicas(min_isr: u16, unclean: bool) -> ClusterImage {
    let mut image = image_with_brokers(&[1, 2, 3]);
    let mut request = topic_request("t", 1, 3, min_isr);
    request.unclean_leader_election = unclean;
    let (mut records, _) = create_topic(&image, &request).expect("creates");
    // Normalize placement so the tests read in replica order 1, 2, 3.
    if let Record::CreateTopic { partitions, .. } = &mut records[0] {
        partitions[0].replicas = vec![1, 2, 3];
        partitions[0].isr = vec![1, 2, 3];
        partitions[0].leader = Some(1);
    }
    apply(&mut image, &records);
    image
}

fn partition(image: &ClusterImage) -> &PartitionRecord {
    image.partition("t", 0).expect("exists")
}

fn fence_and_apply(image: &mut ClusterImage, id: BrokerId) {
    let records = fence(image, id).expect("fences");
    apply(image, &records);
}

#[test]
fn fence_moves_leadership_to_the_next_isr_member() {
    let mut image = three_replicas(2, false);
    fence_and_apply(&mut image, 1);
    let p = partition(&image);
    assert_eq!(p.leader, Some(2));
    assert_eq!(p.isr, vec![2, 3]);
    assert!(p.elr.is_empty(), "ISR still at min_insync: no ELR");
    assert_eq!((p.leader_epoch, p.partition_epoch), (1, 1));
    assert!(image.broker(1).expect("known").fenced);
    assert_eq!(fence(&image, 1), Err(FenceError::AlreadyFenced(1)));
    assert_eq!(fence(&image, 9), Err(FenceError::UnknownBroker(9)));
}

#[test]
fn fence_of_a_follower_shrinks_the_isr_without_a_leader_change() {
    let mut image = three_replicas(2, false);
    fence_and_apply(&mut image, 3);
    let p = partition(&image);
    assert_eq!((p.leader, p.isr.clone()), (Some(1), vec![1, 2]));
    assert_eq!((p.leader_epoch, p.partition_epoch), (0, 1));
}

#[test]
fn below_min_isr_the_removed_replica_joins_the_elr_and_leads_later() {
    let mut image = three_replicas(2, false);
    fence_and_apply(&mut image, 3);
    fence_and_apply(&mut image, 1);
    let p = partition(&image);
    assert_eq!(
        (p.leader, p.isr.clone(), p.elr.clone()),
        (Some(2), vec![2], vec![1])
    );
    fence_and_apply(&mut image, 2);
    let p = partition(&image);
    // The last ISR member moves to the ELR: nobody is live, so no leader.
    assert_eq!(
        (p.leader, p.isr.clone(), p.elr.clone()),
        (None, vec![], vec![1, 2])
    );
    assert_eq!((p.leader_epoch, p.partition_epoch), (2, 3));
    // Broker 3 (not in the ELR: it left while the ISR was at min_insync) cannot lead.
    let records = register(&image, &registration(3, 2)).expect("registers");
    apply(&mut image, &records);
    assert_eq!(partition(&image).leader, None);
    // Broker 2, an ELR member, leads when it comes back; it leaves the ELR for the ISR.
    let records = register(&image, &registration(2, 2)).expect("registers");
    apply(&mut image, &records);
    let p = partition(&image);
    assert_eq!(
        (p.leader, p.isr.clone(), p.elr.clone()),
        (Some(2), vec![2], vec![1])
    );
    assert_eq!((p.leader_epoch, p.partition_epoch), (3, 4));
}

#[test]
fn leader_elected_from_the_elr_when_no_isr_member_is_live() {
    let mut image = three_replicas(3, false);
    // min_insync 3: every removal goes to the ELR.
    fence_and_apply(&mut image, 2);
    fence_and_apply(&mut image, 3);
    let p = partition(&image);
    assert_eq!((p.isr.clone(), p.elr.clone()), (vec![1], vec![2, 3]));
    let records = register(&image, &registration(3, 2)).expect("registers");
    apply(&mut image, &records);
    fence_and_apply(&mut image, 1);
    let p = partition(&image);
    assert_eq!(p.leader, Some(3));
    assert_eq!((p.isr.clone(), p.elr.clone()), (vec![3], vec![1, 2]));
}

#[test]
fn unclean_election_only_when_the_topic_allows_it() {
    for unclean in [false, true] {
        let mut image = three_replicas(1, unclean);
        fence_and_apply(&mut image, 2);
        fence_and_apply(&mut image, 3);
        // Brokers 2 and 3 come back with new incarnations; they are not in ISR or ELR.
        for id in [2, 3] {
            let records = register(&image, &registration(id, 2)).expect("registers");
            apply(&mut image, &records);
        }
        fence_and_apply(&mut image, 1);
        let p = partition(&image);
        if unclean {
            assert_eq!(
                (p.leader, p.isr.clone(), p.elr.clone()),
                (Some(2), vec![2], vec![])
            );
        } else {
            assert_eq!(
                (p.leader, p.isr.clone(), p.elr.clone()),
                (None, vec![], vec![1])
            );
        }
    }
}

#[test]
fn registration_refuses_stale_incarnations_and_fences_a_live_old_one() {
    let mut image = three_replicas(2, false);
    assert!(matches!(
        register(&image, &registration(1, 1)),
        Err(RegisterError::StaleIncarnation { stored: 1, .. })
    ));
    // A restart that comes back before its session lapsed: the old incarnation is fenced
    // (leadership moves), then the new one registers.
    let records = register(&image, &registration(1, 2)).expect("registers");
    assert!(matches!(
        records[0],
        Record::FenceBroker {
            id: 1,
            incarnation: 1
        }
    ));
    apply(&mut image, &records);
    let p = partition(&image);
    assert_eq!((p.leader, p.isr.clone()), (Some(2), vec![2, 3]));
    assert!(image.is_live(1));
}

#[test]
fn alter_partition_validates_epochs_leader_and_members() {
    let mut image = three_replicas(2, false);
    let request = AlterPartitionRequest {
        topic: "t".into(),
        partition: 0,
        leader: 1,
        leader_epoch: 0,
        partition_epoch: 0,
        new_isr: vec![1, 2],
    };
    let unknown = AlterPartitionRequest {
        partition: 5,
        ..request.clone()
    };
    assert_eq!(
        alter_partition(&image, &unknown),
        Err(AlterPartitionError::UnknownPartition)
    );
    let stale_epoch = AlterPartitionRequest {
        leader_epoch: 3,
        ..request.clone()
    };
    assert!(matches!(
        alter_partition(&image, &stale_epoch),
        Err(AlterPartitionError::FencedLeaderEpoch { .. })
    ));
    let not_leader = AlterPartitionRequest {
        leader: 2,
        ..request.clone()
    };
    assert!(matches!(
        alter_partition(&image, &not_leader),
        Err(AlterPartitionError::NotLeader { current: Some(1) })
    ));
    let stale_partition_epoch = AlterPartitionRequest {
        partition_epoch: 7,
        ..request.clone()
    };
    assert!(matches!(
        alter_partition(&image, &stale_partition_epoch),
        Err(AlterPartitionError::InvalidPartitionEpoch { .. })
    ));
    for bad_isr in [vec![2, 3], vec![1, 4], vec![1, 1]] {
        let bad = AlterPartitionRequest {
            new_isr: bad_isr,
            ..request.clone()
        };
        assert_eq!(
            alter_partition(&image, &bad),
            Err(AlterPartitionError::InvalidIsr)
        );
    }
    let (records, after) = alter_partition(&image, &request).expect("shrinks");
    apply(&mut image, &records);
    assert_eq!(partition(&image), &after);
    assert_eq!((after.isr.clone(), after.partition_epoch), (vec![1, 2], 1));
    // Broker 3 is fenced: it may not rejoin.
    fence_and_apply(&mut image, 3);
    let grow = AlterPartitionRequest {
        partition_epoch: partition(&image).partition_epoch,
        new_isr: vec![1, 2, 3],
        ..request.clone()
    };
    assert_eq!(
        alter_partition(&image, &grow),
        Err(AlterPartitionError::IneligibleReplica(3))
    );
    let records = register(&image, &registration(3, 2)).expect("registers");
    apply(&mut image, &records);
    let (records, after) = alter_partition(&image, &grow).expect("grows");
    apply(&mut image, &records);
    assert_eq!(after.isr, vec![1, 2, 3]);
}

#[test]
fn alter_partition_below_min_isr_puts_removed_members_in_the_elr() {
    let mut image = three_replicas(2, false);
    let request = AlterPartitionRequest {
        topic: "t".into(),
        partition: 0,
        leader: 1,
        leader_epoch: 0,
        partition_epoch: 0,
        new_isr: vec![1],
    };
    let (records, after) = alter_partition(&image, &request).expect("shrinks");
    apply(&mut image, &records);
    assert_eq!(
        (after.isr.clone(), after.elr.clone()),
        (vec![1], vec![2, 3])
    );
    // Broker 2 rejoins: the ISR is back at min_insync, the ELR clears.
    let request = AlterPartitionRequest {
        partition_epoch: 1,
        new_isr: vec![1, 2],
        ..request
    };
    let (_, after) = alter_partition(&image, &request).expect("grows");
    assert_eq!((after.isr, after.elr), (vec![1, 2], vec![]));
}

#[test]
fn controlled_shutdown_moves_leadership_then_reports_done() {
    let mut image = three_replicas(2, false);
    let decision = controlled_shutdown(&image, 1, 1).expect("starts");
    assert!(!decision.still_leading);
    apply(&mut image, &decision.records);
    let p = partition(&image);
    assert_eq!((p.leader, p.isr.clone()), (Some(2), vec![2, 3]));
    assert!(image.broker(1).expect("known").shutting_down);
    // A retry changes nothing more.
    let again = controlled_shutdown(&image, 1, 1).expect("retries");
    assert!(again.records.is_empty() && !again.still_leading);
    assert!(matches!(
        controlled_shutdown(&image, 1, 7),
        Err(ShutdownError::UnknownBroker { .. })
    ));
}

#[test]
fn controlled_shutdown_keeps_leadership_without_a_successor() {
    let mut image = three_replicas(1, false);
    fence_and_apply(&mut image, 2);
    fence_and_apply(&mut image, 3);
    let decision = controlled_shutdown(&image, 1, 1).expect("starts");
    assert!(decision.still_leading);
    apply(&mut image, &decision.records);
    assert_eq!(partition(&image).leader, Some(1));
    fence_and_apply(&mut image, 1);
    assert!(matches!(
        controlled_shutdown(&image, 1, 1),
        Err(ShutdownError::Fenced(1))
    ));
}

#[test]
fn create_topic_places_distinct_replicas_and_checks_arguments() {
    let image = image_with_brokers(&[1, 2, 3, 4]);
    let (records, partitions) = create_topic(&image, &topic_request("a", 8, 3, 2)).expect("ok");
    assert_eq!(records.len(), 1);
    for p in &partitions {
        let mut distinct = p.replicas.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 3);
        assert_eq!(p.leader, Some(p.replicas[0]));
        assert_eq!(p.isr, p.replicas);
        assert_eq!((p.leader_epoch, p.partition_epoch), (0, 0));
    }
    // Leaders spread over all brokers.
    let mut leaders: Vec<_> = partitions.iter().filter_map(|p| p.leader).collect();
    leaders.sort_unstable();
    leaders.dedup();
    assert_eq!(leaders, vec![1, 2, 3, 4]);
    // Deterministic.
    assert_eq!(
        create_topic(&image, &topic_request("a", 8, 3, 2))
            .expect("ok")
            .1,
        partitions
    );
    let invalid = |request| {
        matches!(
            create_topic(&image, &request),
            Err(CreateTopicError::InvalidArguments(_))
        )
    };
    assert!(invalid(topic_request("a", 0, 3, 2)));
    assert!(invalid(topic_request("a", 1, 0, 1)));
    assert!(invalid(topic_request("a", 1, 17, 1)));
    assert!(invalid(topic_request("a", 1, 3, 4)));
    assert!(invalid(topic_request("bad/name", 1, 3, 2)));
    assert!(matches!(
        create_topic(&image, &topic_request("a", 1, 5, 2)),
        Err(CreateTopicError::NotEnoughBrokers { live: 4, needed: 5 })
    ));
    let mut image = image;
    apply(&mut image, &records);
    assert!(matches!(
        create_topic(&image, &topic_request("a", 1, 3, 2)),
        Err(CreateTopicError::TopicExists(_))
    ));
    let records = delete_topic(&image, "a").expect("deletes");
    apply(&mut image, &records);
    assert!(image.topic("a").is_none());
    assert!(matches!(
        delete_topic(&image, "a"),
        Err(DeleteTopicError::UnknownTopic(_))
    ));
}

/// One step of the random workload of the property test.
#[derive(Clone, Debug)]
enum Step {
    Fence(BrokerId),
    Register(BrokerId),
    Shutdown(BrokerId),
    /// Leader of partition (index) shrinks/grows its ISR to the mask of its replicas.
    Alter(usize, u8),
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u32..=5).prop_map(Step::Fence),
        (1u32..=5).prop_map(Step::Register),
        (1u32..=5).prop_map(Step::Shutdown),
        (0usize..6, any::<u8>()).prop_map(|(p, mask)| Step::Alter(p, mask)),
    ]
}

fn check_invariants(before: &ClusterImage, after: &ClusterImage) {
    for p in after.partitions() {
        p.check().expect("structure");
        if let Some(leader) = p.leader {
            assert!(p.isr.contains(&leader) || p.elr.contains(&leader));
            assert!(!after.broker(leader).expect("registered").fenced, "{p:?}");
        }
        for member in &p.isr {
            assert!(!after.broker(*member).expect("registered").fenced, "{p:?}");
        }
        let old = before.partition(&p.topic, p.partition).expect("exists");
        assert!(p.partition_epoch >= old.partition_epoch);
        if p.leader != old.leader {
            assert!(p.leader_epoch > old.leader_epoch, "{old:?} -> {p:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn decisions_keep_partition_invariants(
        min_isr in 1u16..=3,
        unclean in any::<bool>(),
        steps in proptest::collection::vec(step_strategy(), 1..60),
    ) {
        let mut image = image_with_brokers(&[1, 2, 3, 4, 5]);
        let mut request = topic_request("t", 6, 3, min_isr);
        request.unclean_leader_election = unclean;
        let (records, _) = create_topic(&image, &request).expect("creates");
        apply(&mut image, &records);
        let mut incarnations = BTreeMap::new();
        for step in steps {
            let before = image.clone();
            let records = match step {
                Step::Fence(id) => fence(&image, id).unwrap_or_default(),
                Step::Register(id) => {
                    let incarnation = incarnations.entry(id).or_insert(1u64);
                    *incarnation += 1;
                    register(&image, &registration(id, *incarnation)).expect("newer incarnation")
                }
                Step::Shutdown(id) => {
                    let incarnation = image.broker(id).map_or(0, |b| b.incarnation);
                    controlled_shutdown(&image, id, incarnation).map(|d| d.records).unwrap_or_default()
                }
                Step::Alter(index, mask) => {
                    let p = image.partitions().nth(index).expect("six partitions").clone();
                    let Some(leader) = p.leader else { continue };
                    let mut new_isr: Vec<_> = p.replicas.iter().enumerate()
                        .filter(|(i, id)| mask & (1 << i) != 0 || **id == leader)
                        .map(|(_, id)| *id)
                        .collect();
                    new_isr.dedup();
                    let request = AlterPartitionRequest {
                        topic: p.topic.clone(),
                        partition: p.partition,
                        leader,
                        leader_epoch: p.leader_epoch,
                        partition_epoch: p.partition_epoch,
                        new_isr,
                    };
                    match alter_partition(&image, &request) {
                        Ok((records, _)) => records,
                        Err(AlterPartitionError::IneligibleReplica(_)) => continue,
                        Err(other) => panic!("unexpected {other}"),
                    }
                }
            };
            apply(&mut image, &records);
            check_invariants(&before, &image);
            if let Step::Fence(id) = step {
                for p in image.partitions() {
                    prop_assert!(p.leader != Some(id) && !p.isr.contains(&id));
                }
            }
        }
    }

    #[test]
    fn placement_is_distinct_and_deterministic(
        brokers in 1u32..=20,
        partitions in 1u32..=64,
        rf in 1u16..=16,
        name in "[a-z]{1,12}",
    ) {
        let ids: Vec<BrokerId> = (1..=brokers).collect();
        let image = image_with_brokers(&ids);
        let request = topic_request(&name, partitions, rf, 1);
        match create_topic(&image, &request) {
            Ok((_, placed)) => {
                prop_assert!(usize::from(rf) <= ids.len());
                for p in placed {
                    let mut distinct = p.replicas.clone();
                    distinct.sort_unstable();
                    distinct.dedup();
                    prop_assert_eq!(distinct.len(), usize::from(rf));
                    prop_assert!(p.replicas.iter().all(|id| ids.contains(id)));
                }
            }
            Err(CreateTopicError::NotEnoughBrokers { .. }) => prop_assert!(usize::from(rf) > ids.len()),
            Err(other) => prop_assert!(false, "unexpected {}", other),
        }
    }
}
