//! The group coordinator's state machine: joins, leaves, crashes, static restarts and commits,
//! driven by members that follow the protocol; random sequences check that no partition is
//! ever owned by two members, that the records replay to the same group, and that the group
//! settles with every partition consumed.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use wharf_groups::{
    Assignor, Commit, CommitError, CommittedOffset, Group, GroupConfig, GroupRecord, Heartbeat,
    HeartbeatError, TopicPartition, JOIN_EPOCH, LEAVE_EPOCH, STATIC_LEAVE_EPOCH,
};

const SESSION_MS: u64 = 1_000;

fn config(assignor: Assignor) -> GroupConfig {
    GroupConfig {
        session_timeout_ms: SESSION_MS,
        heartbeat_interval_ms: 100,
        rebalance_timeout_ms: 3_000,
        members_max: 16,
        assignor,
    }
}

fn topics(partitions: u32) -> BTreeMap<String, u32> {
    BTreeMap::from([("t".to_string(), partitions)])
}

fn subscribed() -> Option<BTreeSet<String>> {
    Some(BTreeSet::from(["t".to_string()]))
}

/// A member as its client sees itself: what it consumes now, at which epoch.
#[derive(Clone, Debug, Default)]
struct Client {
    member_id: String,
    instance_id: Option<String>,
    epoch: i32,
    owned: BTreeSet<TopicPartition>,
}

/// The coordinator's group plus every record it produced, and a replica rebuilt from them.
struct Harness {
    group: Group,
    log: Vec<GroupRecord>,
    now_ms: u64,
    /// Where full snapshots start in `log` (what the coordinator writes before it deletes
    /// the segments below one).
    snapshots: Vec<usize>,
}

impl Harness {
    fn new(assignor: Assignor, partitions: u32) -> Harness {
        let mut group = Group::new("g", config(assignor));
        let log = group.set_topics(topics(partitions));
        Harness {
            group,
            log,
            now_ms: 0,
            snapshots: Vec::new(),
        }
    }

    fn join(&mut self, client: &mut Client) {
        let (answer, records) = self
            .group
            .heartbeat(
                Heartbeat {
                    member_id: client.member_id.clone(),
                    member_epoch: JOIN_EPOCH,
                    instance_id: client.instance_id.clone(),
                    subscribed_topics: subscribed(),
                    owned: Some(BTreeSet::new()),
                },
                self.now_ms,
            )
            .expect("join");
        self.log.extend(records);
        client.epoch = answer.member_epoch;
        client.owned = answer.assignment;
    }

    /// One heartbeat; the client then consumes exactly what it was given (dropping what was
    /// taken away). `Err` when the client was fenced (it then holds nothing).
    fn beat(&mut self, client: &mut Client) -> Result<(), HeartbeatError> {
        let answer = self.group.heartbeat(
            Heartbeat {
                member_id: client.member_id.clone(),
                member_epoch: client.epoch,
                instance_id: client.instance_id.clone(),
                subscribed_topics: None,
                owned: Some(client.owned.clone()),
            },
            self.now_ms,
        );
        match answer {
            Ok((answer, records)) => {
                self.log.extend(records);
                client.epoch = answer.member_epoch;
                client.owned = answer.assignment;
                Ok(())
            }
            Err(error) => {
                client.owned.clear();
                Err(error)
            }
        }
    }

    fn leave(&mut self, client: &mut Client, epoch: i32) {
        let (_, records) = self
            .group
            .heartbeat(
                Heartbeat {
                    member_id: client.member_id.clone(),
                    member_epoch: epoch,
                    instance_id: client.instance_id.clone(),
                    subscribed_topics: None,
                    owned: None,
                },
                self.now_ms,
            )
            .expect("leave");
        self.log.extend(records);
        client.owned.clear();
    }

    fn expire(&mut self) {
        let records = self.group.expire(self.now_ms);
        self.log.extend(records);
    }

    fn snapshot(&mut self) {
        self.snapshots.push(self.log.len());
        let records = self.group.snapshot();
        self.log.extend(records);
    }

    /// A group rebuilt from the records matches the live one.
    fn check_replay(&self) {
        // The coordinator deletes whole segments below a snapshot: the log then starts at any
        // record at or before the snapshot. Every such suffix replays to the same group.
        for &at in &self.snapshots {
            for start in [0, at / 3, at / 2, at.saturating_sub(1), at] {
                let mut replayed = Group::new("g", self.group.config().clone());
                for record in &self.log[start..] {
                    replayed.replay(record.clone(), self.now_ms);
                }
                replayed.check_invariants();
                assert_eq!(
                    replayed.snapshot(),
                    self.group.snapshot(),
                    "replay from record {start} (snapshot at {at}) differs"
                );
            }
        }
        let mut replayed = Group::new("g", self.group.config().clone());
        for record in &self.log {
            replayed.replay(record.clone(), self.now_ms);
        }
        replayed.check_invariants();
        assert_eq!(
            replayed.snapshot(),
            self.group.snapshot(),
            "replayed group differs"
        );
        // Compaction (the latest record of each key, tombstones dropped) replays the same.
        let mut latest: BTreeMap<_, (usize, &GroupRecord)> = BTreeMap::new();
        for (index, record) in self.log.iter().enumerate() {
            latest.insert(record.key(), (index, record));
        }
        let mut compacted: Vec<(usize, &GroupRecord)> = latest
            .into_values()
            .filter(|(_, r)| !r.is_tombstone())
            .collect();
        compacted.sort_by_key(|(index, _)| *index);
        let mut from_compacted = Group::new("g", self.group.config().clone());
        for (_, record) in compacted {
            from_compacted.replay(record.clone(), self.now_ms);
        }
        from_compacted.check_invariants();
        assert_eq!(
            from_compacted.snapshot(),
            self.group.snapshot(),
            "compacted replay differs"
        );
    }
}

fn client(n: usize) -> Client {
    Client {
        member_id: format!("member-{n}"),
        ..Client::default()
    }
}

/// Heartbeats every live client until the group stops changing (bounded).
fn settle(h: &mut Harness, clients: &mut [&mut Client]) {
    for _ in 0..10 {
        for c in clients.iter_mut() {
            h.beat(c)
                .expect("a live member is not fenced while settling");
        }
    }
}

#[test]
fn a_join_moves_only_the_partitions_the_new_member_gets() {
    let mut h = Harness::new(Assignor::Sticky, 6);
    let mut a = client(1);
    let mut b = client(2);
    h.join(&mut a);
    assert_eq!(a.owned.len(), 6);
    h.join(&mut b);
    // b gets nothing yet: a still holds everything.
    assert!(b.owned.is_empty());
    let before = a.owned.clone();
    h.beat(&mut a).expect("beat");
    assert_eq!(a.owned.len(), 3, "a keeps three, gives up three");
    assert!(a.owned.is_subset(&before));
    // b gets nothing before a confirms it stopped consuming those three.
    h.beat(&mut b).expect("beat");
    assert!(b.owned.is_empty());
    h.beat(&mut a).expect("beat");
    h.beat(&mut b).expect("beat");
    // a's second heartbeat reported what it kept: b now has the rest.
    assert_eq!(b.owned.len(), 3);
    assert!(a.owned.is_disjoint(&b.owned));
    assert_eq!(a.epoch, h.group.group_epoch());
    assert_eq!(b.epoch, h.group.group_epoch());
    h.check_replay();
}

#[test]
fn a_partition_moves_only_after_its_owner_releases_it() {
    let mut h = Harness::new(Assignor::Sticky, 2);
    let mut a = client(1);
    let mut b = client(2);
    h.join(&mut a);
    h.join(&mut b);
    // b heartbeats many times while a is silent (but within its session): b gets nothing a
    // still holds.
    for _ in 0..5 {
        h.now_ms += 100;
        h.beat(&mut b).expect("beat");
        assert!(b.owned.is_empty(), "{:?}", b.owned);
    }
    // a's session ends: a is removed, b gets everything.
    h.now_ms += SESSION_MS;
    h.beat(&mut b).expect("beat");
    h.expire();
    h.beat(&mut b).expect("beat");
    assert_eq!(b.owned.len(), 2);
    // a's zombie is fenced, and its commits refused.
    assert!(matches!(
        h.beat(&mut a),
        Err(HeartbeatError::UnknownMember { .. })
    ));
    let zombie_commit = h.group.commit(Commit {
        member_id: Some(a.member_id.clone()),
        member_epoch: a.epoch,
        offsets: vec![(TopicPartition::new("t", 0), offset(5))],
    });
    assert!(matches!(
        zombie_commit,
        Err(CommitError::UnknownMember { .. })
    ));
    h.check_replay();
}

fn offset(offset: u64) -> CommittedOffset {
    CommittedOffset {
        offset,
        leader_epoch: Some(1),
        metadata: String::new(),
        commit_ms: 0,
    }
}

#[test]
fn commits_are_fenced_by_epoch_and_ownership() {
    let mut h = Harness::new(Assignor::Sticky, 2);
    let mut a = client(1);
    h.join(&mut a);
    let commit = |member: &Client, partition: u32, at: u64| Commit {
        member_id: Some(member.member_id.clone()),
        member_epoch: member.epoch,
        offsets: vec![(TopicPartition::new("t", partition), offset(at))],
    };
    let records = h.group.commit(commit(&a, 0, 10)).expect("commit");
    h.log.extend(records);
    assert_eq!(
        h.group
            .committed(&TopicPartition::new("t", 0))
            .map(|c| c.offset),
        Some(10)
    );
    let mut b = client(2);
    h.join(&mut b);
    settle(&mut h, &mut [&mut a, &mut b]);
    let (of_a, of_b) = (
        a.owned.first().cloned().expect("a owns one"),
        b.owned.first().cloned().expect("b owns one"),
    );
    // a may commit its own partition, not b's; an old epoch is refused.
    assert!(h.group.commit(commit(&a, of_a.partition, 11)).is_ok());
    assert!(matches!(
        h.group.commit(commit(&a, of_b.partition, 11)),
        Err(CommitError::NotOwned { .. })
    ));
    let stale = Commit {
        member_epoch: a.epoch - 1,
        ..commit(&a, of_a.partition, 12)
    };
    assert!(matches!(
        h.group.commit(stale),
        Err(CommitError::StaleMemberEpoch { .. })
    ));
    // An all-or-nothing batch: one bad partition and nothing is committed.
    let mixed = Commit {
        offsets: vec![(of_a.clone(), offset(99)), (of_b.clone(), offset(99))],
        ..commit(&a, 0, 0)
    };
    assert!(h.group.commit(mixed).is_err());
    assert_ne!(h.group.committed(&of_a).map(|c| c.offset), Some(99));
    // A commit is bounded.
    let huge = Commit {
        offsets: (0..=wharf_groups::group::COMMIT_OFFSETS_MAX as u32)
            .map(|p| (TopicPartition::new("t", p), offset(1)))
            .collect(),
        ..commit(&a, 0, 0)
    };
    assert!(matches!(h.group.commit(huge), Err(CommitError::Invalid(_))));
    // No anonymous commits into an active group; allowed once it is empty.
    let admin = Commit {
        member_id: None,
        member_epoch: -1,
        offsets: vec![(of_a.clone(), offset(0))],
    };
    assert!(matches!(
        h.group.commit(admin.clone()),
        Err(CommitError::GroupNotEmpty { .. })
    ));
    h.leave(&mut a, LEAVE_EPOCH);
    h.leave(&mut b, LEAVE_EPOCH);
    let records = h
        .group
        .commit(admin)
        .expect("admin commit to an empty group");
    h.log.extend(records);
    assert_eq!(h.group.committed(&of_a).map(|c| c.offset), Some(0));
    h.check_replay();
}

#[test]
fn a_restarted_static_member_gets_its_partitions_back_without_a_rebalance() {
    let mut h = Harness::new(Assignor::Sticky, 4);
    let mut a = Client {
        instance_id: Some("host-a".into()),
        ..client(1)
    };
    let mut b = Client {
        instance_id: Some("host-b".into()),
        ..client(2)
    };
    h.join(&mut a);
    h.join(&mut b);
    settle(&mut h, &mut [&mut a, &mut b]);
    h.beat(&mut a).expect("beat");
    h.beat(&mut b).expect("beat");
    let (epoch, a_owned) = (h.group.group_epoch(), a.owned.clone());
    assert_eq!(a_owned.len(), 2);
    // a stops for a restart, and comes back with a new member id.
    h.leave(&mut a, STATIC_LEAVE_EPOCH);
    h.now_ms += SESSION_MS / 2;
    h.expire();
    let mut a2 = Client {
        instance_id: Some("host-a".into()),
        ..client(3)
    };
    h.join(&mut a2);
    assert_eq!(a2.owned, a_owned, "same partitions");
    assert_eq!(h.group.group_epoch(), epoch, "no rebalance");
    h.beat(&mut b).expect("b undisturbed");
    // The old incarnation is fenced.
    assert!(matches!(
        h.beat(&mut a),
        Err(HeartbeatError::UnknownMember { .. })
    ));
    // A crash without the static leave: the successor takes over just the same.
    let mut a3 = Client {
        instance_id: Some("host-a".into()),
        ..client(4)
    };
    h.join(&mut a3);
    assert_eq!(a3.owned, a_owned);
    assert_eq!(h.group.group_epoch(), epoch);
    h.check_replay();
}

#[test]
fn a_static_member_that_does_not_return_loses_its_partitions_at_the_session_end() {
    let mut h = Harness::new(Assignor::Sticky, 4);
    let mut a = Client {
        instance_id: Some("host-a".into()),
        ..client(1)
    };
    let mut b = client(2);
    h.join(&mut a);
    h.join(&mut b);
    settle(&mut h, &mut [&mut a, &mut b]);
    h.leave(&mut a, STATIC_LEAVE_EPOCH);
    h.now_ms += SESSION_MS;
    h.beat(&mut b).expect("beat");
    h.expire();
    h.beat(&mut b).expect("beat");
    assert_eq!(b.owned.len(), 4);
    h.check_replay();
}

#[test]
fn bad_heartbeats_get_clear_errors_and_change_nothing() {
    let mut h = Harness::new(Assignor::Sticky, 2);
    let before = h.group.snapshot();
    let bad = [
        Heartbeat {
            member_id: String::new(),
            member_epoch: JOIN_EPOCH,
            instance_id: None,
            subscribed_topics: subscribed(),
            owned: None,
        },
        Heartbeat {
            member_id: "x".repeat(256),
            member_epoch: JOIN_EPOCH,
            instance_id: None,
            subscribed_topics: subscribed(),
            owned: None,
        },
        Heartbeat {
            member_id: "m".into(),
            member_epoch: JOIN_EPOCH,
            instance_id: None,
            subscribed_topics: None,
            owned: None,
        },
        Heartbeat {
            member_id: "m".into(),
            member_epoch: -3,
            instance_id: None,
            subscribed_topics: subscribed(),
            owned: None,
        },
        Heartbeat {
            member_id: "m".into(),
            member_epoch: JOIN_EPOCH,
            instance_id: None,
            subscribed_topics: Some((0..2000).map(|i| format!("t{i}")).collect()),
            owned: None,
        },
    ];
    for heartbeat in bad {
        let error = h.group.heartbeat(heartbeat, 0).expect_err("refused");
        assert!(matches!(error, HeartbeatError::Invalid(_)), "{error}");
        assert!(!error.to_string().is_empty());
    }
    // Unknown member, and a member epoch from the future.
    let unknown = Heartbeat {
        member_id: "nobody".into(),
        member_epoch: 3,
        instance_id: None,
        subscribed_topics: None,
        owned: None,
    };
    assert!(matches!(
        h.group.heartbeat(unknown, 0),
        Err(HeartbeatError::UnknownMember { .. })
    ));
    let mut a = client(1);
    h.join(&mut a);
    let future = Heartbeat {
        member_id: a.member_id.clone(),
        member_epoch: a.epoch + 5,
        instance_id: None,
        subscribed_topics: None,
        owned: None,
    };
    assert!(matches!(
        h.group.heartbeat(future, 0),
        Err(HeartbeatError::FencedMemberEpoch { .. })
    ));
    assert_ne!(h.group.snapshot(), before, "the join itself went through");
}

#[test]
fn the_group_is_bounded() {
    let mut h = Harness::new(Assignor::Sticky, 1);
    for n in 0..16 {
        h.join(&mut client(n));
    }
    let error = h
        .group
        .heartbeat(
            Heartbeat {
                member_id: "one-too-many".into(),
                member_epoch: JOIN_EPOCH,
                instance_id: None,
                subscribed_topics: subscribed(),
                owned: None,
            },
            0,
        )
        .expect_err("full");
    assert_eq!(error, HeartbeatError::GroupFull { limit: 16 });
}

#[derive(Clone, Debug)]
enum Step {
    Join(usize),
    Beat(usize),
    /// The heartbeat's answer is lost: the client keeps its old state.
    BeatLost(usize),
    Leave(usize),
    StaticLeave(usize),
    /// The client crashes and restarts with a new member id (same instance id if static).
    Restart(usize),
    Advance(u64),
    Commit(usize, u64),
    Grow(u32),
    Snapshot,
}

fn step() -> impl Strategy<Value = Step> {
    let member = 0usize..6;
    prop_oneof![
        3 => member.clone().prop_map(Step::Join),
        8 => member.clone().prop_map(Step::Beat),
        1 => member.clone().prop_map(Step::BeatLost),
        1 => member.clone().prop_map(Step::Leave),
        1 => member.clone().prop_map(Step::StaticLeave),
        1 => member.clone().prop_map(Step::Restart),
        2 => (0u64..700).prop_map(Step::Advance),
        2 => (member, 0u64..1000).prop_map(|(m, o)| Step::Commit(m, o)),
        1 => (1u32..12).prop_map(Step::Grow),
        1 => Just(Step::Snapshot),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random joins, heartbeats (some answers lost), leaves, restarts, silences and commits:
    /// no partition is ever held by two clients the coordinator still counts as members,
    /// every commit the coordinator accepts comes from the partition's owner, the records
    /// replay (and compact) to the same group, and once everyone heartbeats the group settles
    /// with every partition consumed by exactly one member.
    #[test]
    fn random_membership_changes_never_give_a_partition_to_two_members(
        steps in proptest::collection::vec(step(), 1..120),
        assignor in prop_oneof![Just(Assignor::Sticky), Just(Assignor::Range), Just(Assignor::RoundRobin)],
        partitions in 1u32..10,
    ) {
        let mut h = Harness::new(assignor, partitions);
        let mut partitions = partitions;
        let mut clients: Vec<Option<Client>> = vec![None; 6];
        let mut incarnation = 100;
        for step in steps {
            match step {
                Step::Join(m) => {
                    if clients[m].is_none() {
                        let mut c = Client {
                            instance_id: (m % 2 == 0).then(|| format!("instance-{m}")),
                            ..client(m)
                        };
                        h.join(&mut c);
                        clients[m] = Some(c);
                    }
                }
                Step::Beat(m) => {
                    if let Some(c) = clients[m].as_mut() {
                        if h.beat(c).is_err() {
                            clients[m] = None; // Fenced: it would join again later.
                        }
                    }
                }
                Step::BeatLost(m) => {
                    if let Some(c) = clients[m].as_mut() {
                        let mut copy = c.clone();
                        if h.beat(&mut copy).is_err() {
                            clients[m] = None;
                        }
                    }
                }
                Step::Leave(m) => {
                    if let Some(mut c) = clients[m].take() {
                        h.leave(&mut c, LEAVE_EPOCH);
                    }
                }
                Step::StaticLeave(m) => {
                    if let Some(mut c) = clients[m].take() {
                        if c.instance_id.is_some() {
                            h.leave(&mut c, STATIC_LEAVE_EPOCH);
                        }
                    }
                }
                Step::Restart(m) => {
                    if let Some(old) = clients[m].take() {
                        incarnation += 1;
                        let mut c = Client {
                            member_id: format!("member-{m}-{incarnation}"),
                            instance_id: old.instance_id,
                            ..Client::default()
                        };
                        h.join(&mut c);
                        clients[m] = Some(c);
                    }
                }
                Step::Advance(ms) => {
                    h.now_ms += ms;
                    h.expire();
                }
                Step::Commit(m, at) => {
                    if let Some(c) = clients[m].as_ref() {
                        if let Some(tp) = c.owned.first().cloned() {
                            let result = h.group.commit(Commit {
                                member_id: Some(c.member_id.clone()),
                                member_epoch: c.epoch,
                                offsets: vec![(tp.clone(), offset(at))],
                            });
                            if let Ok(records) = result {
                                prop_assert_eq!(h.group.owner(&tp), Some(c.member_id.as_str()));
                                h.log.extend(records);
                            }
                        }
                    }
                }
                Step::Snapshot => h.snapshot(),
                Step::Grow(more) => {
                    partitions = (partitions + more).min(20);
                    let records = h.group.set_topics(topics(partitions));
                    h.log.extend(records);
                }
            }
            h.group.check_invariants();
            // Clients the coordinator still counts as members never share a partition.
            let mut holder: BTreeMap<TopicPartition, String> = BTreeMap::new();
            for c in clients.iter().flatten() {
                if h.group.member(&c.member_id).is_none() {
                    continue;
                }
                for tp in &c.owned {
                    if let Some(other) = holder.insert(tp.clone(), c.member_id.clone()) {
                        prop_assert!(false, "{tp} consumed by {other} and {}", c.member_id);
                    }
                }
            }
        }
        h.check_replay();
        // Settle: every client still in the group heartbeats until nothing changes.
        let mut live: Vec<Client> = clients
            .into_iter()
            .flatten()
            .filter(|c| h.group.member(&c.member_id).is_some())
            .collect();
        // Members that left temporarily (static) or crashed are gone once their session ends.
        h.now_ms += SESSION_MS;
        for c in &mut live {
            h.beat(c).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        }
        h.expire();
        settle(&mut h, &mut live.iter_mut().collect::<Vec<_>>());
        if !live.is_empty() {
            let consumed: BTreeSet<TopicPartition> = live.iter().flat_map(|c| c.owned.clone()).collect();
            prop_assert_eq!(consumed.len(), partitions as usize, "every partition consumed");
            let total: usize = live.iter().map(|c| c.owned.len()).sum();
            prop_assert_eq!(total, partitions as usize, "none twice");
            for c in &live {
                prop_assert_eq!(c.epoch, h.group.group_epoch());
            }
        }
        h.check_replay();
    }
}
