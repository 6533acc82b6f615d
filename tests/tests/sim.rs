//! The simulator over a fixed set of seeds (CI adds a time-boxed random batch through the `sim`
//! binary). `WHARF_SIM_SEEDS=N` runs N seeds; a failure prints its seed and the replay command.

use wharf_tests::sim::{run, SimConfig};

#[test]
fn fixed_seeds_keep_every_invariant() {
    let seeds: u64 = std::env::var("WHARF_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let mut totals = (0, 0, 0, 0, 0);
    for seed in 0..seeds {
        let report = run(SimConfig::new(seed, 3000)).unwrap_or_else(|failure| panic!("{failure}"));
        totals.0 += report.acknowledged_all;
        totals.1 += report.crashes;
        totals.2 += report.leader_changes;
        totals.3 += report.truncations;
        totals.4 += report.refused;
    }
    println!(
        "acks=all acknowledged {}, crashes {}, leader changes {}, truncations {}, refused {}",
        totals.0, totals.1, totals.2, totals.3, totals.4
    );
    // The faults the invariants are meant to survive did happen.
    assert!(
        totals.0 > 0 && totals.1 > 0 && totals.2 > seeds as usize && totals.4 > 0,
        "{totals:?}"
    );
}

/// Seeds the random batch found bugs with, and what each found; each must keep passing.
const REGRESSION_SEEDS: &[(u64, &str)] = &[
    (
        2_373_404_285_590_186_184,
        "truncation to the leader's end of an epoch the follower never had landed inside one of \
     the follower's batches (EpochHistory::divergence_point)",
    ),
    (
        13_532_248_086_542_615_334,
        "a truncation flushed the follower's staged data but the replica kept its old durable \
     offset and waited for a flush that never came (Input::Truncated carries durability)",
    ),
];

#[test]
fn regression_seeds_keep_every_invariant() {
    for &(seed, found) in REGRESSION_SEEDS {
        run(SimConfig::new(seed, 3000))
            .unwrap_or_else(|failure| panic!("{failure}\n(this seed once found: {found})"));
    }
}

/// With retention on the leaders, followers that were down fall below the leader's log start:
/// they must empty their logs (`ResetLog`), copy from the leader's log start and rejoin, with
/// every invariant kept. Before `ResetLog` they retried `OffsetOutOfRange` for ever and the run
/// never settled.
#[test]
fn retention_makes_lagging_followers_reset_and_rejoin() {
    let seeds: u64 = std::env::var("WHARF_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let (mut deletes, mut resets) = (0, 0);
    for seed in 0..seeds {
        println!("seed {seed}");
        let mut config = SimConfig::new(seed, 3000);
        config.retention_per_mille = 20;
        let report = run(config).unwrap_or_else(|failure| panic!("{failure}"));
        deletes += report.retention_deletes;
        resets += report.resets;
    }
    println!("retention deleted {deletes} segment(s); {resets} follower reset(s)");
    assert!(
        deletes > 0 && resets > 0,
        "deletes {deletes}, resets {resets}"
    );
}

/// Controller mode: the replicas propose ISR changes to the stand-in controller, hold leases,
/// and fail over when the controller fences a silent leader. Seed 244 is kept because it
/// catches a leader that computes its HW over the committed ISR only (not the maximal one).
#[test]
fn controller_mode_keeps_every_invariant_through_failovers() {
    let seeds: u64 = std::env::var("WHARF_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let mut total = wharf_tests::sim::SimReport::default();
    for seed in (0..seeds).chain([244]) {
        println!("controller mode, seed {seed}");
        let mut config = SimConfig::new(seed, 3000);
        config.isr_via_controller = true;
        let report = run(config).unwrap_or_else(|failure| panic!("{failure}"));
        total.acknowledged_all += report.acknowledged_all;
        total.failovers += report.failovers;
        total.isr_commits += report.isr_commits;
        total.isr_rejections += report.isr_rejections;
        total.lease_refusals += report.lease_refusals;
        total.truncations += report.truncations;
    }
    println!(
        "acks=all acknowledged {}, failovers {}, ISR commits {}, ISR rejections {}, lease \
         refusals {}, truncations {}",
        total.acknowledged_all,
        total.failovers,
        total.isr_commits,
        total.isr_rejections,
        total.lease_refusals,
        total.truncations
    );
    // What controller mode exists for did happen.
    assert!(
        total.acknowledged_all > 0
            && total.failovers > 0
            && total.isr_commits > 0
            && total.lease_refusals > 0
            && total.truncations > 0,
        "{total:?}"
    );
}
