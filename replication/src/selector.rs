//! Read-replica selection ("fetch from follower", Kafka KIP-392): on every consumer fetch the
//! partition leader suggests which replica the consumer should read from next, itself or an
//! in-sync follower.
//!
//! Why: a leader serves every producer and, by default, every consumer. Tailing consumers are
//! cheap (their data is in the page cache and the leader must read it anyway to replicate), but
//! a hot partition with many readers, or a reader replaying old data, can saturate the leader's
//! shard and slow down produces. Followers hold the same committed data; moving readers to them
//! (preferably in the reader's rack, which also saves cross-rack traffic) relieves the leader.
//!
//! The decision is a pure function of what the leader knows at that fetch: its own load, the
//! followers' ISR membership and lag, the reader's position, rack and current replica. The
//! consumer keeps reading from the chosen follower for a lease (`SelectorConfig::lease_ms`) and
//! then asks the leader again, telling it where it reads now (`Reader::current`), so that:
//!
//! - a reader on a follower stays there until the leader is clearly relieved (hysteresis:
//!   `return_permille`), instead of flapping between leader and follower at the threshold;
//! - readers far behind the high watermark ("cold", `cold_lag_records`) move first, at a lower
//!   pressure: they cost the leader disk reads and cache pollution, while tailing readers are
//!   nearly free;
//! - equally good followers share the readers by a stable hash of the consumer id, so one
//!   consumer keeps its follower across leases and many consumers spread evenly.

/// Per-topic policy (`replica_selector` topic config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaSelector {
    /// Always read from the leader (Kafka's default behaviour).
    Leader,
    /// Read from an in-sync follower in the consumer's rack when the leader is in another rack
    /// (Kafka's `RackAwareReplicaSelector`): saves cross-rack traffic, ignores load.
    Rack,
    /// Read from the leader until it is loaded, then move readers (cold ones first) to in-sync
    /// followers, preferring the consumer's rack.
    #[default]
    Load,
}

impl ReplicaSelector {
    /// Parses the `replica_selector` topic config value.
    pub fn parse(value: &str) -> Option<ReplicaSelector> {
        match value {
            "leader" => Some(ReplicaSelector::Leader),
            "rack" => Some(ReplicaSelector::Rack),
            "load" => Some(ReplicaSelector::Load),
            _ => None,
        }
    }

    /// The config value `parse` accepts for this policy.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaSelector::Leader => "leader",
            ReplicaSelector::Rack => "rack",
            ReplicaSelector::Load => "load",
        }
    }
}

/// Lease bounds: below 100 ms consumers would ask the leader again nearly every fetch (no
/// relief); above 10 minutes a reader would stay on a follower long after the leader is idle.
const LEASE_MS_MIN: u64 = 100;
const LEASE_MS_MAX: u64 = 600_000;
/// Shares are in permille: 1000 = the whole (or exactly at a threshold).
const PERMILLE: u64 = 1000;

/// Broker-wide selector tuning (the policy itself is per topic).
/// The broker's `[replica_selection]` section.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SelectorConfig {
    /// How long a consumer keeps reading from the chosen follower before asking the leader again.
    pub lease_ms: u64,
    /// Leader shard CPU busy share (permille) at which tailing readers move away.
    pub busy_high_permille: u32,
    /// Requests waiting on the leader shard at which tailing readers move away.
    pub queue_depth_high: u32,
    /// Consumer egress of the leader shard (bytes/s) at which tailing readers move away.
    pub egress_high_bytes_per_s: u64,
    /// Hysteresis: a reader on a follower returns only when the pressure is below this share
    /// (permille) of the pressure at which it moved.
    pub return_permille: u32,
    /// Cold readers (see `cold_lag_records`) move at this pressure (permille of "high");
    /// tailing readers at 1000.
    pub cold_move_permille: u32,
    /// A reader at least this many records behind the high watermark reads cold data and is
    /// the first to move.
    pub cold_lag_records: u64,
    /// A follower further behind the leader's log end than this (records) is not eligible: its
    /// readers would see the data late (it serves only up to its own high watermark).
    pub follower_lag_records_max: u64,
    /// A follower further behind the leader's log end than this (ms) is not eligible.
    pub follower_lag_ms_max: u64,
}

impl Default for SelectorConfig {
    fn default() -> Self {
        SelectorConfig {
            lease_ms: 10_000,
            busy_high_permille: 800,
            queue_depth_high: 256,
            egress_high_bytes_per_s: 200 * 1024 * 1024,
            return_permille: 500,
            cold_move_permille: 500,
            cold_lag_records: 100_000,
            follower_lag_records_max: 10_000,
            follower_lag_ms_max: 2_000,
        }
    }
}

/// Why a `SelectorConfig` is refused (it comes from the broker config file: input, not code).
#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorConfigError {
    #[error("lease_ms must be in {LEASE_MS_MIN}..={LEASE_MS_MAX}, not {0}")]
    LeaseMs(u64),
    #[error("busy_high_permille must be in 1..=1000, not {0}")]
    BusyHighPermille(u32),
    #[error("queue_depth_high must be at least 1, not {0}")]
    QueueDepthHigh(u32),
    #[error("egress_high_bytes_per_s must be at least 1, not {0}")]
    EgressHighBytesPerS(u64),
    #[error("return_permille must be in 0..1000 (below the moving pressure), not {0}")]
    ReturnPermille(u32),
    #[error("cold_move_permille must be in 1..=1000, not {0}")]
    ColdMovePermille(u32),
    #[error("cold_lag_records must be at least 1, not {0}")]
    ColdLagRecords(u64),
    #[error("follower_lag_records_max must be at least 1, not {0}")]
    FollowerLagRecordsMax(u64),
    #[error("follower_lag_ms_max must be at least 1, not {0}")]
    FollowerLagMsMax(u64),
}

impl SelectorConfig {
    /// Checks the ranges `select` relies on: nonzero thresholds (they divide), a return
    /// pressure below the moving pressure (else readers would flap) and cold readers moving no
    /// later than tailing ones.
    pub fn validate(&self) -> Result<(), SelectorConfigError> {
        if !(LEASE_MS_MIN..=LEASE_MS_MAX).contains(&self.lease_ms) {
            return Err(SelectorConfigError::LeaseMs(self.lease_ms));
        }
        if !(1..=1000).contains(&self.busy_high_permille) {
            return Err(SelectorConfigError::BusyHighPermille(
                self.busy_high_permille,
            ));
        }
        if self.queue_depth_high == 0 {
            return Err(SelectorConfigError::QueueDepthHigh(self.queue_depth_high));
        }
        if self.egress_high_bytes_per_s == 0 {
            return Err(SelectorConfigError::EgressHighBytesPerS(
                self.egress_high_bytes_per_s,
            ));
        }
        if self.return_permille >= 1000 {
            return Err(SelectorConfigError::ReturnPermille(self.return_permille));
        }
        if !(1..=1000).contains(&self.cold_move_permille) {
            return Err(SelectorConfigError::ColdMovePermille(
                self.cold_move_permille,
            ));
        }
        if self.cold_lag_records == 0 {
            return Err(SelectorConfigError::ColdLagRecords(self.cold_lag_records));
        }
        if self.follower_lag_records_max == 0 {
            return Err(SelectorConfigError::FollowerLagRecordsMax(
                self.follower_lag_records_max,
            ));
        }
        if self.follower_lag_ms_max == 0 {
            return Err(SelectorConfigError::FollowerLagMsMax(
                self.follower_lag_ms_max,
            ));
        }
        Ok(())
    }
}

/// The leader shard's load, as measured by the driver (smoothed; the selector does not care how).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaderLoad {
    /// Share of time the shard's tasks ran, permille.
    pub busy_permille: u32,
    /// Requests waiting on the shard.
    pub queue_depth: u32,
    /// Bytes per second the shard sends to consumers.
    pub egress_bytes_per_s: u64,
}

/// What the leader knows about one follower of the partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FollowerView<'a> {
    pub broker_id: u32,
    pub in_isr: bool,
    /// Fenced by the controller (or known dead): never chosen.
    pub fenced: bool,
    /// Records the follower is behind the leader's log end.
    pub lag_records: u64,
    /// How long ago the follower was last caught up with the leader's log end.
    pub lag_ms: u64,
    pub rack: Option<&'a str>,
}

/// The partition leader (the broker deciding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaderView<'a> {
    pub broker_id: u32,
    pub rack: Option<&'a str>,
    pub high_watermark: u64,
    pub load: LeaderLoad,
}

/// The consumer fetching.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reader<'a> {
    /// A stable hash of the consumer's id: spreads readers over equally good followers.
    pub id_hash: u64,
    pub rack: Option<&'a str>,
    pub fetch_offset: u64,
    /// The replica the consumer reads from now (its lease), if it said; None = the leader /
    /// unknown.
    pub current: Option<u32>,
    /// What serving this reader would add to the leader's egress (bytes/s; the partition's
    /// produce rate for a tailing reader). A reader on a follower comes back only if the
    /// leader stays below the return pressure *with* it: else the readers that left would
    /// come back at their next lease, load the leader again and leave again (flapping).
    pub egress_bytes_per_s: u64,
}

/// Why `select` chose what it chose (for metrics and `DescribeReaders`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The topic's policy is `leader`.
    Policy,
    /// The chosen replica is in the reader's rack (the leader, or a follower found there).
    SameRack,
    /// The reader did not say its rack: rack-aware selection has nothing to go by.
    NoRack,
    /// The leader is below the pressure at which this reader would move.
    NotLoaded,
    /// The leader is loaded: a tailing reader moved to a follower.
    Loaded,
    /// The leader is loaded enough for a cold reader: it moved to a follower.
    ColdReader,
    /// The reader keeps its current follower (no flapping between leases).
    Sticky,
    /// The leader's pressure fell well below the moving pressure: the reader comes back.
    Relieved,
    /// A follower would have been chosen, but none is eligible.
    NoEligibleFollower,
}

/// The replica a reader should read from next, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub replica: u32,
    pub reason: Reason,
}

impl Choice {
    pub fn is_leader(&self, leader: u32) -> bool {
        self.replica == leader
    }
}

/// The leader's pressure as a share of its "high" thresholds, in permille: the largest of
/// busy/busy_high, queue/queue_high, egress/egress_high (saturating, so 1000 = at a
/// threshold). Any one resource at its limit is enough to slow produces, hence the maximum.
///
/// A zero threshold (refused by `validate`) counts as 1 rather than dividing by zero.
pub fn pressure_permille(load: &LeaderLoad, config: &SelectorConfig) -> u32 {
    let busy =
        u64::from(load.busy_permille) * PERMILLE / u64::from(config.busy_high_permille.max(1));
    let queue = u64::from(load.queue_depth) * PERMILLE / u64::from(config.queue_depth_high.max(1));
    // u64::MAX * 1000 needs u128.
    let egress = u128::from(load.egress_bytes_per_s) * u128::from(PERMILLE)
        / u128::from(config.egress_high_bytes_per_s.max(1));
    let egress = u64::try_from(egress).unwrap_or(u64::MAX);
    u32::try_from(busy.max(queue).max(egress)).unwrap_or(u32::MAX)
}

/// A follower that may serve reads: in the ISR, not fenced, not the leader itself, lag within
/// both maxima. A lagging follower would show its readers data late (it serves only what it
/// has), so "in the ISR" alone (which tolerates `replica_lag_max_ms`) is not enough.
pub fn eligible(follower: &FollowerView<'_>, leader: u32, config: &SelectorConfig) -> bool {
    follower.in_isr
        && !follower.fenced
        && follower.broker_id != leader
        && follower.lag_records <= config.follower_lag_records_max
        && follower.lag_ms <= config.follower_lag_ms_max
}

/// Chooses the replica `reader` should read from next under `policy`.
///
/// `followers` has one entry per broker; it may include the leader itself (never chosen). If a
/// broker id appears more than once, only its first entry counts.
///
/// Invariants (tested below): the choice is the leader or an `eligible` follower; asking again
/// with `reader.current` set to the choice gives the same replica (no flapping).
pub fn select(
    policy: ReplicaSelector,
    config: &SelectorConfig,
    leader: &LeaderView<'_>,
    followers: &[FollowerView<'_>],
    reader: &Reader<'_>,
) -> Choice {
    let choice = match policy {
        ReplicaSelector::Leader => to_leader(leader, Reason::Policy),
        ReplicaSelector::Rack => select_by_rack(config, leader, followers, reader),
        ReplicaSelector::Load => select_by_load(config, leader, followers, reader),
    };
    debug_assert!(
        choice.is_leader(leader.broker_id)
            || find(followers, choice.replica).is_some_and(|f| eligible(
                f,
                leader.broker_id,
                config
            )),
        "chose ineligible replica {choice:?}"
    );
    choice
}

fn to_leader(leader: &LeaderView<'_>, reason: Reason) -> Choice {
    Choice {
        replica: leader.broker_id,
        reason,
    }
}

/// `Rack` policy: a follower in the reader's rack when the leader is elsewhere.
fn select_by_rack(
    config: &SelectorConfig,
    leader: &LeaderView<'_>,
    followers: &[FollowerView<'_>],
    reader: &Reader<'_>,
) -> Choice {
    let Some(rack) = reader.rack else {
        return to_leader(leader, Reason::NoRack);
    };
    if leader.rack == Some(rack) {
        return to_leader(leader, Reason::SameRack);
    }
    if let Some(current) = current_follower(config, leader, followers, reader) {
        if current.rack == Some(rack) {
            return Choice {
                replica: current.broker_id,
                reason: Reason::Sticky,
            };
        }
    }
    match spread(config, leader, followers, Some(rack), reader.id_hash) {
        Some(replica) => Choice {
            replica,
            reason: Reason::SameRack,
        },
        None => to_leader(leader, Reason::NoEligibleFollower),
    }
}

/// `Load` policy: move readers away from a loaded leader, cold ones first; bring them back only
/// once the pressure is well below the moving pressure.
fn select_by_load(
    config: &SelectorConfig,
    leader: &LeaderView<'_>,
    followers: &[FollowerView<'_>],
    reader: &Reader<'_>,
) -> Choice {
    let pressure_permille = u64::from(pressure_permille(&leader.load, config));
    let lag_records = leader.high_watermark.saturating_sub(reader.fetch_offset);
    let cold = lag_records >= config.cold_lag_records;
    // `min`s keep the invariants (cold readers move no later; return below move) even with a
    // config `validate` would refuse.
    let move_at_permille = if cold {
        u64::from(config.cold_move_permille).min(PERMILLE)
    } else {
        PERMILLE
    };
    let return_below_permille =
        (move_at_permille * u64::from(config.return_permille) / PERMILLE).min(move_at_permille);

    if let Some(current) = current_follower(config, leader, followers, reader) {
        let with_reader = LeaderLoad {
            egress_bytes_per_s: leader
                .load
                .egress_bytes_per_s
                .saturating_add(reader.egress_bytes_per_s),
            ..leader.load
        };
        let pressure_with_reader_permille =
            u64::from(self::pressure_permille(&with_reader, config));
        return if pressure_with_reader_permille < return_below_permille {
            to_leader(leader, Reason::Relieved)
        } else {
            Choice {
                replica: current.broker_id,
                reason: Reason::Sticky,
            }
        };
    }
    // On the leader (or its follower is gone): the reader leaves only at the moving pressure.
    if pressure_permille < move_at_permille {
        return to_leader(leader, Reason::NotLoaded);
    }
    let in_rack = reader
        .rack
        .and_then(|rack| spread(config, leader, followers, Some(rack), reader.id_hash));
    match in_rack.or_else(|| spread(config, leader, followers, None, reader.id_hash)) {
        Some(replica) => Choice {
            replica,
            reason: if cold {
                Reason::ColdReader
            } else {
                Reason::Loaded
            },
        },
        None => to_leader(leader, Reason::NoEligibleFollower),
    }
}

/// The first entry for `broker_id` (later duplicates are ignored everywhere).
fn find<'f, 'a>(followers: &'f [FollowerView<'a>], broker_id: u32) -> Option<&'f FollowerView<'a>> {
    followers.iter().find(|f| f.broker_id == broker_id)
}

/// The reader's current replica if it is an eligible follower (not the leader, not unknown).
fn current_follower<'f, 'a>(
    config: &SelectorConfig,
    leader: &LeaderView<'_>,
    followers: &'f [FollowerView<'a>],
    reader: &Reader<'_>,
) -> Option<&'f FollowerView<'a>> {
    let current = find(followers, reader.current?)?;
    eligible(current, leader.broker_id, config).then_some(current)
}

/// One of the eligible followers (in `rack`, if given): sorted by broker id, the one at
/// `id_hash % n`. Sorting makes the choice independent of the order the caller lists them in,
/// so a consumer lands on the same follower lease after lease.
///
/// Quadratic in the (at most `REPLICAS_MAX`) followers, but allocation-free on the fetch path.
fn spread(
    config: &SelectorConfig,
    leader: &LeaderView<'_>,
    followers: &[FollowerView<'_>],
    rack: Option<&str>,
    id_hash: u64,
) -> Option<u32> {
    let candidates = || {
        followers.iter().enumerate().filter_map(move |(i, f)| {
            let first = followers[..i].iter().all(|g| g.broker_id != f.broker_id);
            let in_rack = rack.is_none_or(|rack| f.rack == Some(rack));
            (first && in_rack && eligible(f, leader.broker_id, config)).then_some(f.broker_id)
        })
    };
    let count = candidates().count();
    if count == 0 {
        return None;
    }
    // `count` fits u64; the remainder is below `count`, so it fits usize.
    let index = (id_hash % count as u64) as usize;
    // Broker ids among candidates are distinct, so exactly one has `index` smaller ones.
    let chosen = candidates().find(|&id| candidates().filter(|&other| other < id).count() == index);
    assert!(
        chosen.is_some(),
        "rank {index} of {count} distinct ids not found"
    );
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LEADER: u32 = 1;

    fn follower(broker_id: u32, rack: Option<&'static str>) -> FollowerView<'static> {
        FollowerView {
            broker_id,
            in_isr: true,
            fenced: false,
            lag_records: 0,
            lag_ms: 0,
            rack,
        }
    }

    fn leader(rack: Option<&'static str>, load: LeaderLoad) -> LeaderView<'static> {
        LeaderView {
            broker_id: LEADER,
            rack,
            high_watermark: 1_000_000,
            load,
        }
    }

    /// A reader at the high watermark of `leader(..)`.
    fn tailing(rack: Option<&'static str>, current: Option<u32>) -> Reader<'static> {
        Reader {
            id_hash: 0,
            rack,
            fetch_offset: 1_000_000,
            current,
            egress_bytes_per_s: 0,
        }
    }

    fn busy(busy_permille: u32) -> LeaderLoad {
        LeaderLoad {
            busy_permille,
            ..LeaderLoad::default()
        }
    }

    fn choice(replica: u32, reason: Reason) -> Choice {
        Choice { replica, reason }
    }

    // With the default config, busy 800 permille = pressure 1000.
    const AT_HIGH: u32 = 800;

    #[test]
    fn parse_and_as_str_round_trip() {
        for policy in [
            ReplicaSelector::Leader,
            ReplicaSelector::Rack,
            ReplicaSelector::Load,
        ] {
            assert_eq!(ReplicaSelector::parse(policy.as_str()), Some(policy));
        }
        assert_eq!(ReplicaSelector::parse("Leader"), None);
        assert_eq!(ReplicaSelector::parse(""), None);
        assert_eq!(ReplicaSelector::default(), ReplicaSelector::Load);
    }

    #[test]
    fn default_config_is_valid() {
        assert_eq!(SelectorConfig::default().validate(), Ok(()));
    }

    #[test]
    fn validate_rejects_each_bad_field() {
        type Edit = fn(&mut SelectorConfig);
        let bad: [(Edit, SelectorConfigError); 12] = [
            (|c| c.lease_ms = 99, SelectorConfigError::LeaseMs(99)),
            (
                |c| c.lease_ms = 600_001,
                SelectorConfigError::LeaseMs(600_001),
            ),
            (
                |c| c.busy_high_permille = 0,
                SelectorConfigError::BusyHighPermille(0),
            ),
            (
                |c| c.busy_high_permille = 1001,
                SelectorConfigError::BusyHighPermille(1001),
            ),
            (
                |c| c.queue_depth_high = 0,
                SelectorConfigError::QueueDepthHigh(0),
            ),
            (
                |c| c.egress_high_bytes_per_s = 0,
                SelectorConfigError::EgressHighBytesPerS(0),
            ),
            (
                |c| c.return_permille = 1000,
                SelectorConfigError::ReturnPermille(1000),
            ),
            (
                |c| c.cold_move_permille = 0,
                SelectorConfigError::ColdMovePermille(0),
            ),
            (
                |c| c.cold_move_permille = 1001,
                SelectorConfigError::ColdMovePermille(1001),
            ),
            (
                |c| c.cold_lag_records = 0,
                SelectorConfigError::ColdLagRecords(0),
            ),
            (
                |c| c.follower_lag_records_max = 0,
                SelectorConfigError::FollowerLagRecordsMax(0),
            ),
            (
                |c| c.follower_lag_ms_max = 0,
                SelectorConfigError::FollowerLagMsMax(0),
            ),
        ];
        for (edit, error) in bad {
            let mut config = SelectorConfig::default();
            edit(&mut config);
            assert_eq!(config.validate(), Err(error));
            let message = error.to_string();
            assert!(message.contains("must be"), "{message}");
        }
        // The bounds themselves are accepted.
        let edges: [Edit; 8] = [
            |c| c.lease_ms = 100,
            |c| c.lease_ms = 600_000,
            |c| c.busy_high_permille = 1,
            |c| c.busy_high_permille = 1000,
            |c| c.return_permille = 999,
            |c| c.return_permille = 0,
            |c| c.cold_move_permille = 1,
            |c| c.cold_move_permille = 1000,
        ];
        for edit in edges {
            let mut config = SelectorConfig::default();
            edit(&mut config);
            assert_eq!(config.validate(), Ok(()), "{config:?}");
        }
    }

    #[test]
    fn validate_message_names_field_and_range() {
        let config = SelectorConfig {
            lease_ms: 5,
            ..SelectorConfig::default()
        };
        let message = config.validate().err().map(|e| e.to_string());
        assert_eq!(
            message.as_deref(),
            Some("lease_ms must be in 100..=600000, not 5")
        );
    }

    #[test]
    fn pressure_is_the_largest_share() {
        let config = SelectorConfig::default();
        assert_eq!(pressure_permille(&LeaderLoad::default(), &config), 0);
        assert_eq!(pressure_permille(&busy(400), &config), 500);
        assert_eq!(pressure_permille(&busy(800), &config), 1000);
        let load = LeaderLoad {
            busy_permille: 400,
            queue_depth: 384,
            egress_bytes_per_s: 50 * 1024 * 1024,
        };
        assert_eq!(pressure_permille(&load, &config), 1500);
        let load = LeaderLoad {
            busy_permille: 0,
            queue_depth: 0,
            egress_bytes_per_s: 300 * 1024 * 1024,
        };
        assert_eq!(pressure_permille(&load, &config), 1500);
    }

    #[test]
    fn pressure_saturates_at_extremes() {
        let load = LeaderLoad {
            busy_permille: u32::MAX,
            queue_depth: u32::MAX,
            egress_bytes_per_s: u64::MAX,
        };
        let config = SelectorConfig {
            busy_high_permille: 1,
            queue_depth_high: 1,
            egress_high_bytes_per_s: 1,
            ..SelectorConfig::default()
        };
        assert_eq!(pressure_permille(&load, &config), u32::MAX);
        // Zero thresholds (invalid) do not divide by zero.
        let config = SelectorConfig {
            busy_high_permille: 0,
            queue_depth_high: 0,
            egress_high_bytes_per_s: 0,
            ..SelectorConfig::default()
        };
        assert_eq!(pressure_permille(&load, &config), u32::MAX);
        let config = SelectorConfig {
            egress_high_bytes_per_s: u64::MAX,
            ..SelectorConfig::default()
        };
        let load = LeaderLoad {
            egress_bytes_per_s: u64::MAX,
            ..LeaderLoad::default()
        };
        assert_eq!(pressure_permille(&load, &config), 1000);
    }

    #[test]
    fn eligibility() {
        let config = SelectorConfig::default();
        let ok = follower(2, None);
        assert!(eligible(&ok, LEADER, &config));
        assert!(!eligible(
            &FollowerView {
                in_isr: false,
                ..ok
            },
            LEADER,
            &config
        ));
        assert!(!eligible(
            &FollowerView { fenced: true, ..ok },
            LEADER,
            &config
        ));
        assert!(!eligible(&ok, 2, &config), "the leader itself");
        let at_max = FollowerView {
            lag_records: config.follower_lag_records_max,
            lag_ms: config.follower_lag_ms_max,
            ..ok
        };
        assert!(eligible(&at_max, LEADER, &config));
        assert!(!eligible(
            &FollowerView {
                lag_records: at_max.lag_records + 1,
                ..at_max
            },
            LEADER,
            &config
        ));
        assert!(!eligible(
            &FollowerView {
                lag_ms: at_max.lag_ms + 1,
                ..at_max
            },
            LEADER,
            &config
        ));
    }

    #[test]
    fn leader_policy_ignores_everything() {
        let config = SelectorConfig::default();
        let followers = [follower(2, Some("b"))];
        let reader = tailing(Some("b"), Some(2));
        let got = select(
            ReplicaSelector::Leader,
            &config,
            &leader(Some("a"), busy(1000)),
            &followers,
            &reader,
        );
        assert_eq!(got, choice(LEADER, Reason::Policy));
        assert!(got.is_leader(LEADER));
    }

    #[test]
    fn rack_policy_branches() {
        let config = SelectorConfig::default();
        let rack = |leader_rack, followers: &[FollowerView<'static>], reader| {
            select(
                ReplicaSelector::Rack,
                &config,
                &leader(leader_rack, LeaderLoad::default()),
                followers,
                &reader,
            )
        };
        let followers = [
            follower(2, Some("b")),
            follower(3, Some("c")),
            follower(4, Some("b")),
        ];
        assert_eq!(
            rack(Some("a"), &followers, tailing(None, None)),
            choice(LEADER, Reason::NoRack)
        );
        assert_eq!(
            rack(Some("b"), &followers, tailing(Some("b"), Some(2))),
            choice(LEADER, Reason::SameRack)
        );
        assert_eq!(
            rack(Some("a"), &followers, tailing(Some("b"), Some(4))),
            choice(4, Reason::Sticky)
        );
        // Current follower in another rack: moved to the reader's rack.
        assert_eq!(
            rack(Some("a"), &followers, tailing(Some("b"), Some(3))),
            choice(2, Reason::SameRack)
        );
        let reader = Reader {
            id_hash: 1,
            ..tailing(Some("b"), None)
        };
        assert_eq!(
            rack(Some("a"), &followers, reader),
            choice(4, Reason::SameRack)
        );
        // A leader without a rack is not in the reader's rack.
        assert_eq!(
            rack(None, &followers, tailing(Some("c"), None)),
            choice(3, Reason::SameRack)
        );
        assert_eq!(
            rack(Some("a"), &followers, tailing(Some("z"), None)),
            choice(LEADER, Reason::NoEligibleFollower)
        );
        // The current follower stops being eligible: another one in the rack, or the leader.
        let fenced = [FollowerView {
            fenced: true,
            ..follower(2, Some("b"))
        }];
        assert_eq!(
            rack(Some("a"), &fenced, tailing(Some("b"), Some(2))),
            choice(LEADER, Reason::NoEligibleFollower)
        );
    }

    #[test]
    fn load_policy_branches() {
        let config = SelectorConfig::default();
        let load = |load, followers: &[FollowerView<'static>], reader| {
            select(
                ReplicaSelector::Load,
                &config,
                &leader(Some("a"), load),
                followers,
                &reader,
            )
        };
        let followers = [follower(2, Some("b")), follower(3, Some("c"))];
        // Tailing reader on the leader: moves only at the high threshold.
        assert_eq!(
            load(busy(AT_HIGH - 1), &followers, tailing(Some("b"), None)),
            choice(LEADER, Reason::NotLoaded)
        );
        assert_eq!(
            load(busy(AT_HIGH), &followers, tailing(Some("c"), None)),
            choice(3, Reason::Loaded)
        );
        // No rack, or no follower in the reader's rack: any eligible follower.
        assert_eq!(
            load(busy(AT_HIGH), &followers, tailing(None, Some(LEADER))),
            choice(2, Reason::Loaded)
        );
        assert_eq!(
            load(busy(AT_HIGH), &followers, tailing(Some("z"), None)),
            choice(2, Reason::Loaded)
        );
        // Cold reader: moves at cold_move_permille (500 of 800 = busy 400).
        let cold = Reader {
            fetch_offset: 1_000_000 - config.cold_lag_records,
            ..tailing(Some("c"), None)
        };
        assert_eq!(
            load(busy(399), &followers, cold),
            choice(LEADER, Reason::NotLoaded)
        );
        assert_eq!(
            load(busy(400), &followers, cold),
            choice(3, Reason::ColdReader)
        );
        // One record short of cold is tailing.
        let warm = Reader {
            fetch_offset: cold.fetch_offset + 1,
            ..cold
        };
        assert_eq!(
            load(busy(400), &followers, warm),
            choice(LEADER, Reason::NotLoaded)
        );
        // Loaded, nowhere to go.
        let out = [FollowerView {
            in_isr: false,
            ..follower(2, Some("b"))
        }];
        assert_eq!(
            load(busy(AT_HIGH), &out, tailing(Some("b"), None)),
            choice(LEADER, Reason::NoEligibleFollower)
        );
        assert_eq!(
            load(busy(AT_HIGH), &[], tailing(Some("b"), None)),
            choice(LEADER, Reason::NoEligibleFollower)
        );
    }

    #[test]
    fn load_policy_hysteresis() {
        let config = SelectorConfig::default();
        let load = |load, reader| {
            select(
                ReplicaSelector::Load,
                &config,
                &leader(Some("a"), load),
                &[follower(2, Some("b"))],
                &reader,
            )
        };
        // Tailing: move at 1000, return below 500 (busy 400).
        for current in [None, Some(LEADER)] {
            assert_eq!(
                load(busy(600), tailing(None, current)),
                choice(LEADER, Reason::NotLoaded)
            );
        }
        assert_eq!(
            load(busy(600), tailing(None, Some(2))),
            choice(2, Reason::Sticky)
        );
        assert_eq!(
            load(busy(400), tailing(None, Some(2))),
            choice(2, Reason::Sticky)
        );
        assert_eq!(
            load(busy(399), tailing(None, Some(2))),
            choice(LEADER, Reason::Relieved)
        );
        // Cold: move at 500, return below 250 (busy 200).
        let cold = Reader {
            fetch_offset: 0,
            ..tailing(None, Some(2))
        };
        assert_eq!(load(busy(200), cold), choice(2, Reason::Sticky));
        assert_eq!(load(busy(199), cold), choice(LEADER, Reason::Relieved));
        // No flapping: a relieved leader takes a reader back only if it stays below the
        // return pressure with that reader's egress added (default high: 200 MiB/s).
        let heavy = Reader {
            egress_bytes_per_s: 120 * 1024 * 1024,
            ..tailing(None, Some(2))
        };
        assert_eq!(load(busy(100), heavy), choice(2, Reason::Sticky));
        let light = Reader {
            egress_bytes_per_s: 10 * 1024 * 1024,
            ..tailing(None, Some(2))
        };
        assert_eq!(load(busy(100), light), choice(LEADER, Reason::Relieved));
    }

    #[test]
    fn load_policy_current_follower_gone() {
        let config = SelectorConfig::default();
        let load = |load, followers: &[FollowerView<'static>], current| {
            select(
                ReplicaSelector::Load,
                &config,
                &leader(None, load),
                followers,
                &tailing(None, current),
            )
        };
        let lagging = [
            FollowerView {
                lag_ms: config.follower_lag_ms_max + 1,
                ..follower(2, None)
            },
            follower(3, None),
        ];
        // Not loaded: back to the leader.
        assert_eq!(
            load(busy(600), &lagging, Some(2)),
            choice(LEADER, Reason::NotLoaded)
        );
        // Unknown current replica: treated as the leader.
        assert_eq!(
            load(busy(600), &lagging, Some(99)),
            choice(LEADER, Reason::NotLoaded)
        );
        // Loaded: another follower.
        assert_eq!(
            load(busy(AT_HIGH), &lagging, Some(2)),
            choice(3, Reason::Loaded)
        );
    }

    #[test]
    fn leader_in_follower_list_and_duplicates() {
        let config = SelectorConfig::default();
        // The caller may pass the whole replica set; a duplicate's first entry counts.
        let followers = [
            follower(LEADER, None),
            FollowerView {
                fenced: true,
                ..follower(2, None)
            },
            follower(2, None),
            follower(3, None),
        ];
        for id_hash in 0..8 {
            let reader = Reader {
                id_hash,
                ..tailing(None, Some(2))
            };
            let got = select(
                ReplicaSelector::Load,
                &config,
                &leader(None, busy(AT_HIGH)),
                &followers,
                &reader,
            );
            assert_eq!(got, choice(3, Reason::Loaded));
        }
    }

    /// Distinct consumers spread over all equally good followers, whatever order they are
    /// listed in.
    #[test]
    fn distinct_readers_spread_over_all_eligible_followers() {
        let config = SelectorConfig::default();
        let followers = [
            follower(7, Some("b")),
            follower(3, Some("b")),
            FollowerView {
                in_isr: false,
                ..follower(4, Some("b"))
            },
            follower(5, Some("b")),
            follower(9, Some("c")),
        ];
        for (policy, rack, expected) in [
            (ReplicaSelector::Load, None, vec![3, 5, 7, 9]),
            (ReplicaSelector::Load, Some("b"), vec![3, 5, 7]),
            (ReplicaSelector::Rack, Some("b"), vec![3, 5, 7]),
            (ReplicaSelector::Rack, Some("c"), vec![9]),
        ] {
            let mut counts = std::collections::BTreeMap::new();
            for id_hash in 0..120u64 {
                let reader = Reader {
                    id_hash: id_hash.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    ..tailing(rack, None)
                };
                let got = select(
                    policy,
                    &config,
                    &leader(Some("a"), busy(AT_HIGH)),
                    &followers,
                    &reader,
                );
                *counts.entry(got.replica).or_insert(0u32) += 1;
            }
            let chosen: Vec<u32> = counts.keys().copied().collect();
            assert_eq!(chosen, expected, "{policy:?} {rack:?}");
            // Consecutive hashes are spread exactly evenly by `% n`; these are not consecutive,
            // but none may starve.
            assert!(counts
                .values()
                .all(|&c| c >= 120 / expected.len() as u32 / 3));
        }
        // Consecutive hashes: exactly round robin in broker-id order.
        let picks: Vec<u32> = (0..6)
            .map(|id_hash| {
                let reader = Reader {
                    id_hash,
                    ..tailing(None, None)
                };
                select(
                    ReplicaSelector::Load,
                    &config,
                    &leader(None, busy(AT_HIGH)),
                    &followers,
                    &reader,
                )
                .replica
            })
            .collect();
        assert_eq!(picks, [3, 5, 7, 9, 3, 5]);
    }

    // ---- properties ----

    const RACKS: [Option<&str>; 3] = [None, Some("a"), Some("b")];
    const UNKNOWN: u32 = 999;

    #[derive(Clone, Debug)]
    struct Case {
        config: SelectorConfig,
        leader: LeaderView<'static>,
        followers: Vec<FollowerView<'static>>,
        reader: Reader<'static>,
    }

    impl Case {
        fn select(&self, policy: ReplicaSelector) -> Choice {
            self.select_with(policy, &self.reader)
        }

        fn select_with(&self, policy: ReplicaSelector, reader: &Reader<'static>) -> Choice {
            select(policy, &self.config, &self.leader, &self.followers, reader)
        }

        fn is_eligible(&self, id: u32) -> bool {
            find(&self.followers, id)
                .is_some_and(|f| eligible(f, self.leader.broker_id, &self.config))
        }

        fn pressure(&self) -> u64 {
            u64::from(pressure_permille(&self.leader.load, &self.config))
        }

        /// (move_at, return_below) for `reader`, as the spec states them.
        fn thresholds(&self, reader: &Reader<'_>) -> (u64, u64) {
            let cold = self
                .leader
                .high_watermark
                .saturating_sub(reader.fetch_offset)
                >= self.config.cold_lag_records;
            let move_at = if cold {
                u64::from(self.config.cold_move_permille)
            } else {
                1000
            };
            (
                move_at,
                move_at * u64::from(self.config.return_permille) / 1000,
            )
        }
    }

    fn any_config() -> impl Strategy<Value = SelectorConfig> {
        let random = (
            (
                100u64..=600_000,
                1u32..=1000,
                1u32..=1024,
                prop_oneof![1u64..=1 << 30, Just(u64::MAX)],
            ),
            (
                0u32..1000,
                1u32..=1000,
                1u64..=200_000,
                1u64..=20_000,
                1u64..=5_000,
            ),
        )
            .prop_map(
                |(
                    (lease_ms, busy_high_permille, queue_depth_high, egress_high_bytes_per_s),
                    (
                        return_permille,
                        cold_move_permille,
                        cold_lag_records,
                        follower_lag_records_max,
                        follower_lag_ms_max,
                    ),
                )| SelectorConfig {
                    lease_ms,
                    busy_high_permille,
                    queue_depth_high,
                    egress_high_bytes_per_s,
                    return_permille,
                    cold_move_permille,
                    cold_lag_records,
                    follower_lag_records_max,
                    follower_lag_ms_max,
                },
            );
        prop_oneof![Just(SelectorConfig::default()), random]
    }

    fn any_load() -> impl Strategy<Value = LeaderLoad> {
        (
            prop_oneof![0u32..=1200, any::<u32>()],
            prop_oneof![0u32..=600, any::<u32>()],
            prop_oneof![0u64..=400 * 1024 * 1024, any::<u64>()],
        )
            .prop_map(
                |(busy_permille, queue_depth, egress_bytes_per_s)| LeaderLoad {
                    busy_permille,
                    queue_depth,
                    egress_bytes_per_s,
                },
            )
    }

    /// A load around `config`'s thresholds, so that pressures fall on both sides of the moving
    /// and return pressures: one field at `share_permille` of its threshold, the others below.
    fn load_near(config: &SelectorConfig) -> impl Strategy<Value = LeaderLoad> {
        let (busy_high, queue_high, egress_high) = (
            u64::from(config.busy_high_permille),
            u64::from(config.queue_depth_high),
            u128::from(config.egress_high_bytes_per_s),
        );
        (0u64..=1500, 0usize..3, any::<[prop::sample::Index; 2]>()).prop_map(
            move |(share_permille, dominant, [a, b])| {
                let mut shares = [
                    a.index(share_permille as usize + 1) as u64,
                    b.index(share_permille as usize + 1) as u64,
                    0,
                ];
                shares[2] = shares[dominant];
                shares[dominant] = share_permille;
                let scale = |high: u64, share: u64| high * share / 1000;
                LeaderLoad {
                    busy_permille: u32::try_from(scale(busy_high, shares[0])).unwrap_or(u32::MAX),
                    queue_depth: u32::try_from(scale(queue_high, shares[1])).unwrap_or(u32::MAX),
                    egress_bytes_per_s: u64::try_from(egress_high * u128::from(shares[2]) / 1000)
                        .unwrap_or(u64::MAX),
                }
            },
        )
    }

    fn any_rack() -> impl Strategy<Value = Option<&'static str>> {
        prop::sample::select(RACKS.to_vec())
    }

    fn any_follower() -> impl Strategy<Value = FollowerView<'static>> {
        (
            prop::bool::weighted(0.9),
            prop::bool::weighted(0.1),
            prop_oneof![3 => 0u64..=100, 1 => 0u64..=30_000],
            prop_oneof![3 => 0u64..=100, 1 => 0u64..=6_000],
            any_rack(),
        )
            .prop_map(|(in_isr, fenced, lag_records, lag_ms, rack)| FollowerView {
                broker_id: 0,
                in_isr,
                fenced,
                lag_records,
                lag_ms,
                rack,
            })
    }

    fn any_case() -> impl Strategy<Value = Case> {
        let followers = prop::collection::vec(any_follower(), 0..=5).prop_flat_map(|fs| {
            // Distinct broker ids 2.., listed in a random order.
            let ids: Vec<u32> = (2..2 + fs.len() as u32).collect();
            (Just(fs), Just(ids).prop_shuffle())
        });
        let config_and_load = any_config().prop_flat_map(|config| {
            let load = prop_oneof![9 => load_near(&config).boxed(), 1 => any_load().boxed()];
            (Just(config), load)
        });
        (
            config_and_load,
            followers,
            any::<bool>(),
            (any_rack(), 0u64..=1_000_000),
            (
                any::<u64>(),
                any_rack(),
                prop_oneof![0u64..=10, 0u64..=300_000, any::<u64>()],
                0usize..4,
                any::<prop::sample::Index>(),
            ),
        )
            .prop_map(
                |(
                    (config, load),
                    (mut followers, ids),
                    leader_listed,
                    (leader_rack, high_watermark),
                    (id_hash, reader_rack, lag, current_kind, current_index),
                )| {
                    for (f, id) in followers.iter_mut().zip(&ids) {
                        f.broker_id = *id;
                    }
                    if leader_listed {
                        followers.push(follower(LEADER, leader_rack));
                    }
                    let current = match current_kind {
                        0 => None,
                        1 => Some(LEADER),
                        2 if !ids.is_empty() => Some(*current_index.get(&ids)),
                        _ => Some(UNKNOWN),
                    };
                    Case {
                        config,
                        leader: LeaderView {
                            broker_id: LEADER,
                            rack: leader_rack,
                            high_watermark,
                            load,
                        },
                        followers,
                        reader: Reader {
                            id_hash,
                            rack: reader_rack,
                            fetch_offset: high_watermark.saturating_sub(lag),
                            current,
                            egress_bytes_per_s: 0,
                        },
                    }
                },
            )
    }

    const POLICIES: [ReplicaSelector; 3] = [
        ReplicaSelector::Leader,
        ReplicaSelector::Rack,
        ReplicaSelector::Load,
    ];

    proptest! {
        #[test]
        fn strategy_configs_are_valid(config in any_config()) {
            prop_assert_eq!(config.validate(), Ok(()));
        }

        /// 1. Never out-of-ISR, fenced, lagging, the leader listed as a follower, or unknown.
        #[test]
        fn choice_is_leader_or_eligible(case in any_case()) {
            for policy in POLICIES {
                let got = case.select(policy);
                prop_assert!(
                    got.is_leader(LEADER) || case.is_eligible(got.replica),
                    "{:?} chose {:?}", policy, got
                );
            }
        }

        /// 2.
        #[test]
        fn leader_policy_always_leader(case in any_case()) {
            prop_assert_eq!(case.select(ReplicaSelector::Leader), choice(LEADER, Reason::Policy));
        }

        /// 3. A reader on the leader stays below its moving pressure.
        #[test]
        fn load_below_move_stays_on_leader(case in any_case()) {
            let (move_at, _) = case.thresholds(&case.reader);
            if case.pressure() < move_at && matches!(case.reader.current, None | Some(LEADER)) {
                prop_assert!(case.select(ReplicaSelector::Load).is_leader(LEADER));
            }
        }

        /// 4. Asking again from where the leader sent it gives the same answer.
        #[test]
        fn no_flapping(case in any_case()) {
            for policy in POLICIES {
                let first = case.select(policy);
                let again = case.select_with(policy, &Reader { current: Some(first.replica), ..case.reader });
                prop_assert_eq!(first.replica, again.replica, "{:?} then {:?}", first, again);
            }
        }

        /// 5. Between the return and the moving pressure, nobody moves.
        #[test]
        fn hysteresis_band_keeps_current(case in any_case()) {
            let (move_at, return_below) = case.thresholds(&case.reader);
            let p = case.pressure();
            if (return_below..move_at).contains(&p) {
                // The generated current, and every replica the reader could be on, so that the
                // band is tested from followers as often as it is hit.
                let currents = case
                    .reader
                    .current
                    .into_iter()
                    .chain(std::iter::once(LEADER))
                    .chain(case.followers.iter().map(|f| f.broker_id));
                for current in currents {
                    if current == LEADER || case.is_eligible(current) {
                        let reader = Reader { current: Some(current), ..case.reader };
                        let got = case.select_with(ReplicaSelector::Load, &reader);
                        prop_assert_eq!(got.replica, current, "{:?}", got);
                    }
                }
            }
        }

        /// 6. If a tailing reader on the leader moves, a cold one moves too.
        #[test]
        fn cold_readers_move_first(
            case in any_case(),
            current in prop::sample::select(vec![None, Some(LEADER)]),
            extra_lag in 0u64..=1_000_000,
        ) {
            let mut case = case;
            case.leader.high_watermark = case.leader.high_watermark.max(case.config.cold_lag_records);
            let high_watermark = case.leader.high_watermark;
            let tail = Reader { fetch_offset: high_watermark, current, ..case.reader };
            let cold = Reader {
                fetch_offset: (high_watermark - case.config.cold_lag_records).saturating_sub(extra_lag),
                ..tail
            };
            let tail_choice = case.select_with(ReplicaSelector::Load, &tail);
            let cold_choice = case.select_with(ReplicaSelector::Load, &cold);
            if !tail_choice.is_leader(LEADER) {
                prop_assert_eq!(tail_choice.reason, Reason::Loaded);
                prop_assert!(!cold_choice.is_leader(LEADER), "{:?}", cold_choice);
                prop_assert_eq!(cold_choice.reason, Reason::ColdReader);
            }
        }

        /// 7. Rack policy sends readers only to followers in their own rack.
        #[test]
        fn rack_policy_stays_in_rack(case in any_case()) {
            let got = case.select(ReplicaSelector::Rack);
            if !got.is_leader(LEADER) {
                let chosen = find(&case.followers, got.replica).map(|f| f.rack);
                prop_assert!(case.reader.rack.is_some());
                prop_assert_eq!(chosen, Some(case.reader.rack));
            }
        }

        /// 8. More load never means less pressure; extremes do not panic.
        #[test]
        fn pressure_is_monotone(
            config in any_config(),
            load in any_load(),
            more_busy in any::<u32>(),
            more_queue in any::<u32>(),
            more_egress in any::<u64>(),
        ) {
            let p = pressure_permille(&load, &config);
            let more = [
                LeaderLoad { busy_permille: load.busy_permille.saturating_add(more_busy), ..load },
                LeaderLoad { queue_depth: load.queue_depth.saturating_add(more_queue), ..load },
                LeaderLoad {
                    egress_bytes_per_s: load.egress_bytes_per_s.saturating_add(more_egress),
                    ..load
                },
            ];
            for more in more {
                prop_assert!(pressure_permille(&more, &config) >= p, "{:?} vs {:?}", more, load);
            }
            let max = LeaderLoad {
                busy_permille: u32::MAX,
                queue_depth: u32::MAX,
                egress_bytes_per_s: u64::MAX,
            };
            prop_assert!(pressure_permille(&max, &config) >= p);
        }
    }
}
