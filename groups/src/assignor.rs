//! Server-side partition assignors: pure functions from the group's members, their
//! subscriptions, the topics' partition counts and (for `Sticky`) the previous assignment, to
//! a target assignment. The coordinator runs one whenever the group changes (KIP-848: the
//! assignment is computed by the broker, not by a group leader among the clients).

use std::collections::{BTreeMap, BTreeSet};

/// One partition of one topic.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: u32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: u32) -> TopicPartition {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Member id -> the partitions it owns.
pub type Assignment = BTreeMap<String, BTreeSet<TopicPartition>>;

/// Which assignor a group uses (`group.assignor` on the broker, per group on join).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Assignor {
    /// Per topic, contiguous ranges of partitions to the subscribed members in member order:
    /// members subscribed to several co-partitioned topics get the same partition numbers of
    /// each (joins on keys), at the price of balance across topics.
    Range,
    /// Every partition dealt in turn to the next subscribed member: balanced, not sticky.
    RoundRobin,
    /// Keeps every partition where it is unless balance requires moving it; a join or leave
    /// moves only the partitions that must move (the default).
    #[default]
    Sticky,
}

impl Assignor {
    pub fn name(self) -> &'static str {
        match self {
            Assignor::Range => "range",
            Assignor::RoundRobin => "round-robin",
            Assignor::Sticky => "sticky",
        }
    }

    pub fn parse(name: &str) -> Option<Assignor> {
        match name {
            "range" => Some(Assignor::Range),
            "round-robin" | "roundrobin" => Some(Assignor::RoundRobin),
            "sticky" | "uniform" => Some(Assignor::Sticky),
            _ => None,
        }
    }

    /// The target assignment. Every member of `subscriptions` gets an entry (possibly empty);
    /// every partition of every topic that some member subscribes to and `partitions` knows is
    /// owned by exactly one member subscribed to its topic. Topics missing from `partitions`
    /// (not created yet, deleted) are assigned nothing.
    pub fn assign(
        self,
        subscriptions: &BTreeMap<String, BTreeSet<String>>,
        partitions: &BTreeMap<String, u32>,
        previous: &Assignment,
    ) -> Assignment {
        let mut assignment: Assignment = subscriptions
            .keys()
            .map(|member| (member.clone(), BTreeSet::new()))
            .collect();
        match self {
            Assignor::Range => range(subscriptions, partitions, &mut assignment),
            Assignor::RoundRobin => round_robin(subscriptions, partitions, &mut assignment),
            Assignor::Sticky => sticky(subscriptions, partitions, previous, &mut assignment),
        }
        assignment
    }
}

/// The subscribed topics that exist, each with its subscribers in member order.
fn subscribers<'a>(
    subscriptions: &'a BTreeMap<String, BTreeSet<String>>,
    partitions: &BTreeMap<String, u32>,
) -> BTreeMap<&'a str, Vec<&'a str>> {
    let mut by_topic: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (member, topics) in subscriptions {
        for topic in topics {
            if partitions.contains_key(topic) {
                by_topic.entry(topic).or_default().push(member);
            }
        }
    }
    by_topic
}

fn range(
    subscriptions: &BTreeMap<String, BTreeSet<String>>,
    partitions: &BTreeMap<String, u32>,
    assignment: &mut Assignment,
) {
    for (topic, members) in subscribers(subscriptions, partitions) {
        let count = partitions.get(topic).copied().unwrap_or(0);
        let share = count / members.len() as u32;
        let extra = count % members.len() as u32;
        let mut next = 0u32;
        for (index, member) in members.iter().enumerate() {
            let take = share + u32::from((index as u32) < extra);
            let owned = assignment.entry((*member).to_string()).or_default();
            owned.extend((next..next + take).map(|p| TopicPartition::new(topic, p)));
            next += take;
        }
        debug_assert_eq!(next, count);
    }
}

fn round_robin(
    subscriptions: &BTreeMap<String, BTreeSet<String>>,
    partitions: &BTreeMap<String, u32>,
    assignment: &mut Assignment,
) {
    let members: Vec<&String> = subscriptions.keys().collect();
    if members.is_empty() {
        return;
    }
    let mut turn = 0usize;
    for topic in subscribers(subscriptions, partitions).keys() {
        for partition in 0..partitions.get(*topic).copied().unwrap_or(0) {
            // The next member in the circle that subscribes to this topic (one exists: the
            // topic is in `subscribers`), so the loop ends within one turn of the circle.
            for _ in 0..members.len() {
                let member = members[turn % members.len()];
                turn += 1;
                if subscriptions[member].contains(*topic) {
                    assignment
                        .entry(member.clone())
                        .or_default()
                        .insert(TopicPartition::new(*topic, partition));
                    break;
                }
            }
        }
    }
}

/// Keeps what each member owned (when it still subscribes to the topic and the partition
/// still exists), gives the unowned partitions to the least-loaded eligible members, then
/// moves partitions from the most to the least loaded eligible member while they differ by
/// two or more. With identical subscriptions the result is balanced (counts differ by at most
/// one) and moves the fewest partitions that balance allows.
fn sticky(
    subscriptions: &BTreeMap<String, BTreeSet<String>>,
    partitions: &BTreeMap<String, u32>,
    previous: &Assignment,
    assignment: &mut Assignment,
) {
    let by_topic = subscribers(subscriptions, partitions);
    let mut owner: BTreeMap<TopicPartition, String> = BTreeMap::new();
    // Retained: in member order, so a partition two members claimed stays with the first.
    for (member, topics) in subscriptions {
        let Some(owned) = previous.get(member) else {
            continue;
        };
        for tp in owned {
            let exists = partitions.get(&tp.topic).is_some_and(|&n| tp.partition < n);
            if exists && topics.contains(&tp.topic) && !owner.contains_key(tp) {
                owner.insert(tp.clone(), member.clone());
                assignment
                    .entry(member.clone())
                    .or_default()
                    .insert(tp.clone());
            }
        }
    }
    let count =
        |assignment: &Assignment, member: &str| assignment.get(member).map_or(0, BTreeSet::len);
    // The unowned partitions, each to the eligible member with the fewest (ties: member order).
    for (topic, members) in &by_topic {
        for partition in 0..partitions.get(*topic).copied().unwrap_or(0) {
            let tp = TopicPartition::new(*topic, partition);
            if owner.contains_key(&tp) {
                continue;
            }
            let Some(least) = members.iter().min_by_key(|m| (count(assignment, m), **m)) else {
                continue;
            };
            owner.insert(tp.clone(), (*least).to_string());
            assignment
                .entry((*least).to_string())
                .or_default()
                .insert(tp);
        }
    }
    // Rebalance. Each move lowers the sum of squared counts by at least 2, so the loop ends;
    // the bound only guards against a bug.
    let moves_max = owner.len() * owner.len().max(1) + 1;
    for _ in 0..moves_max {
        let Some((from, to, tp)) = best_move(&by_topic, assignment) else {
            return;
        };
        if let Some(owned) = assignment.get_mut(&from) {
            owned.remove(&tp);
        }
        assignment.entry(to).or_default().insert(tp);
    }
    panic!("sticky assignor did not converge within {moves_max} moves");
}

/// The move that helps balance most: from the most loaded member that owns a partition some
/// member with at least two fewer partitions also subscribes to, to the least loaded such
/// member. `None` when no member can give one to another with two fewer.
fn best_move(
    by_topic: &BTreeMap<&str, Vec<&str>>,
    assignment: &Assignment,
) -> Option<(String, String, TopicPartition)> {
    let mut givers: Vec<(&String, usize)> = assignment.iter().map(|(m, o)| (m, o.len())).collect();
    // Most loaded first; ties in member order.
    givers.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    for (giver, giver_count) in givers {
        let owned = &assignment[giver];
        // Its partitions from the highest down, so what moves is predictable.
        for tp in owned.iter().rev() {
            let Some(eligible) = by_topic.get(tp.topic.as_str()) else {
                continue;
            };
            let taker = eligible
                .iter()
                .filter(|m| **m != giver.as_str())
                .map(|m| (assignment.get(*m).map_or(0, BTreeSet::len), *m))
                .min();
            if let Some((taker_count, taker)) = taker {
                if taker_count + 2 <= giver_count {
                    return Some((giver.clone(), taker.to_string(), tp.clone()));
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subs(members: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
        members
            .iter()
            .map(|(m, t)| (m.to_string(), t.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    fn owned(assignment: &Assignment, member: &str) -> Vec<String> {
        assignment[member].iter().map(|tp| tp.to_string()).collect()
    }

    #[test]
    fn range_gives_contiguous_ranges_and_the_extra_partitions_to_the_first_members() {
        let s = subs(&[("a", &["t", "u"]), ("b", &["t", "u"])]);
        let p = BTreeMap::from([("t".to_string(), 3), ("u".to_string(), 3)]);
        let a = Assignor::Range.assign(&s, &p, &Assignment::new());
        assert_eq!(owned(&a, "a"), ["t/0", "t/1", "u/0", "u/1"]);
        assert_eq!(owned(&a, "b"), ["t/2", "u/2"]);
    }

    #[test]
    fn round_robin_skips_members_not_subscribed() {
        let s = subs(&[("a", &["t"]), ("b", &["t", "u"])]);
        let p = BTreeMap::from([("t".to_string(), 2), ("u".to_string(), 2)]);
        let a = Assignor::RoundRobin.assign(&s, &p, &Assignment::new());
        assert_eq!(owned(&a, "a"), ["t/0"]);
        assert_eq!(owned(&a, "b"), ["t/1", "u/0", "u/1"]);
    }

    #[test]
    fn sticky_moves_only_what_a_new_member_needs() {
        let p = BTreeMap::from([("t".to_string(), 6)]);
        let two = subs(&[("a", &["t"]), ("b", &["t"])]);
        let first = Assignor::Sticky.assign(&two, &p, &Assignment::new());
        assert_eq!(owned(&first, "a"), ["t/0", "t/2", "t/4"]);
        let three = subs(&[("a", &["t"]), ("b", &["t"]), ("c", &["t"])]);
        let second = Assignor::Sticky.assign(&three, &p, &first);
        assert_eq!(second["c"].len(), 2);
        // a and b each gave up one partition and kept the other two.
        for m in ["a", "b"] {
            assert_eq!(second[m].len(), 2);
            assert!(second[m].is_subset(&first[m]), "{m}: {second:?}");
        }
        // c leaves: its partitions go back, nothing else moves.
        let third = Assignor::Sticky.assign(&two, &p, &second);
        for m in ["a", "b"] {
            assert!(second[m].is_subset(&third[m]));
            assert_eq!(third[m].len(), 3);
        }
    }

    #[test]
    fn unknown_topics_and_partitions_beyond_the_count_are_not_assigned() {
        let s = subs(&[("a", &["t", "gone"])]);
        let p = BTreeMap::from([("t".to_string(), 1)]);
        let previous = Assignment::from([(
            "a".to_string(),
            BTreeSet::from([TopicPartition::new("t", 5), TopicPartition::new("gone", 0)]),
        )]);
        for assignor in [Assignor::Range, Assignor::RoundRobin, Assignor::Sticky] {
            let a = assignor.assign(&s, &p, &previous);
            assert_eq!(owned(&a, "a"), ["t/0"], "{}", assignor.name());
        }
    }
}
