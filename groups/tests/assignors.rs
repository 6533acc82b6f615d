//! Property tests of the assignors: every partition of a subscribed topic is owned by exactly
//! one member subscribed to it; round-robin and sticky balance identical subscriptions; sticky
//! moves the fewest partitions balance allows.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use wharf_groups::{Assignment, Assignor, TopicPartition};

const TOPICS: [&str; 4] = ["a", "b", "c", "d"];

fn topics() -> impl Strategy<Value = BTreeMap<String, u32>> {
    proptest::collection::vec(0u32..13, TOPICS.len()).prop_map(|counts| {
        TOPICS
            .iter()
            .zip(counts)
            // Count 12 stands for "the topic does not exist".
            .filter(|(_, n)| *n < 12)
            .map(|(t, n)| (t.to_string(), n))
            .collect()
    })
}

fn subscriptions(homogeneous: bool) -> impl Strategy<Value = BTreeMap<String, BTreeSet<String>>> {
    let member_topics = proptest::collection::btree_set(
        proptest::sample::select(TOPICS.to_vec()).prop_map(String::from),
        1..=TOPICS.len(),
    );
    (1usize..9, proptest::collection::vec(member_topics, 8)).prop_map(move |(count, subs)| {
        (0..count)
            .map(|m| {
                let topics = if homogeneous {
                    subs[0].clone()
                } else {
                    subs[m].clone()
                };
                (format!("m{m}"), topics)
            })
            .collect()
    })
}

/// A previous assignment: random claims (possibly stale, duplicated or for unknown members).
fn previous() -> impl Strategy<Value = Assignment> {
    proptest::collection::btree_map(
        (0usize..10).prop_map(|m| format!("m{m}")),
        proptest::collection::btree_set(
            (proptest::sample::select(TOPICS.to_vec()), 0u32..14)
                .prop_map(|(t, p)| TopicPartition::new(t, p)),
            0..20,
        ),
        0..10,
    )
}

fn check_valid(
    assignor: Assignor,
    subs: &BTreeMap<String, BTreeSet<String>>,
    topics: &BTreeMap<String, u32>,
    assignment: &Assignment,
) -> Result<(), TestCaseError> {
    let members: BTreeSet<&String> = subs.keys().collect();
    prop_assert_eq!(
        members,
        assignment.keys().collect::<BTreeSet<_>>(),
        "{}",
        assignor.name()
    );
    let mut owner: BTreeMap<&TopicPartition, &String> = BTreeMap::new();
    for (member, owned) in assignment {
        for tp in owned {
            prop_assert!(
                subs[member].contains(&tp.topic),
                "{member} not subscribed to {tp}"
            );
            prop_assert!(
                topics.get(&tp.topic).is_some_and(|&n| tp.partition < n),
                "{tp} does not exist"
            );
            prop_assert!(owner.insert(tp, member).is_none(), "{tp} owned twice");
        }
    }
    for (topic, &count) in topics {
        if subs.values().any(|t| t.contains(topic)) {
            for p in 0..count {
                prop_assert!(
                    owner.contains_key(&TopicPartition::new(topic.clone(), p)),
                    "{}: {topic}/{p} unassigned",
                    assignor.name()
                );
            }
        }
    }
    Ok(())
}

fn spread(assignment: &Assignment) -> usize {
    let counts: Vec<usize> = assignment.values().map(BTreeSet::len).collect();
    counts.iter().max().unwrap_or(&0) - counts.iter().min().unwrap_or(&0)
}

/// The fewest retained partitions any balanced assignment must take from their owners: the
/// `total % members` members that keep the most get the larger share.
fn moves_lower_bound(retained: &[usize], total: usize) -> usize {
    let members = retained.len();
    let mut sorted = retained.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    sorted
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            let share = total / members + usize::from(i < total % members);
            r.saturating_sub(share)
        })
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_assignor_gives_each_partition_to_exactly_one_subscribed_member(
        subs in subscriptions(false), topics in topics(), previous in previous(),
    ) {
        for assignor in [Assignor::Range, Assignor::RoundRobin, Assignor::Sticky] {
            let assignment = assignor.assign(&subs, &topics, &previous);
            check_valid(assignor, &subs, &topics, &assignment)?;
        }
    }

    #[test]
    fn round_robin_and_sticky_balance_identical_subscriptions(
        subs in subscriptions(true), topics in topics(), previous in previous(),
    ) {
        for assignor in [Assignor::RoundRobin, Assignor::Sticky] {
            let assignment = assignor.assign(&subs, &topics, &previous);
            prop_assert!(spread(&assignment) <= 1, "{}: {:?}", assignor.name(), assignment);
        }
        // Range balances each topic on its own.
        let assignment = Assignor::Range.assign(&subs, &topics, &previous);
        for topic in topics.keys() {
            let per: Vec<usize> = assignment.values().map(|o| o.iter().filter(|tp| &tp.topic == topic).count()).collect();
            if subs.values().next().is_some_and(|t| t.contains(topic)) {
                prop_assert!(per.iter().max().unwrap_or(&0) - per.iter().min().unwrap_or(&0) <= 1);
            }
        }
    }

    #[test]
    fn sticky_moves_no_more_partitions_than_balance_requires(
        subs in subscriptions(true), topics in topics(), previous in previous(),
    ) {
        let assignment = Assignor::Sticky.assign(&subs, &topics, &previous);
        // What each member could keep: its previous partitions that still exist and that it
        // still subscribes to, each claimed by its first claimant only.
        let mut claimed = BTreeSet::new();
        let mut retained = Vec::new();
        let mut moved = 0;
        for (member, topics_of) in &subs {
            let mut kept = 0;
            for tp in previous.get(member).into_iter().flatten() {
                let valid = topics_of.contains(&tp.topic)
                    && topics.get(&tp.topic).is_some_and(|&n| tp.partition < n);
                if valid && claimed.insert(tp.clone()) {
                    kept += 1;
                    if !assignment[member].contains(tp) {
                        moved += 1;
                    }
                }
            }
            retained.push(kept);
        }
        let total: usize = assignment.values().map(BTreeSet::len).sum();
        prop_assert_eq!(moved, moves_lower_bound(&retained, total), "{:?} -> {:?}", previous, assignment);
    }

    #[test]
    fn sticky_is_stable_when_nothing_changes(subs in subscriptions(false), topics in topics()) {
        let first = Assignor::Sticky.assign(&subs, &topics, &Assignment::new());
        let second = Assignor::Sticky.assign(&subs, &topics, &first);
        prop_assert_eq!(first, second);
    }
}
