//! Replays or explores simulator runs: `sim --seed N --steps M [--trace]`, or
//! `sim --seeds K --start S` for a batch, or `sim --seconds T` for a time-boxed random batch;
//! `--controller` runs the controller mode (the shipped Raft controller on three voters, leases,
//! ISR proposals, controller faults).

use std::time::{Duration, Instant};

use clap::Parser;
use wharf_tests::sim::{run, SimConfig};

#[derive(Parser)]
#[command(about = "Wharf's deterministic replication simulator")]
struct Args {
    /// The first (or only) seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Steps per run before the settling phase.
    #[arg(long, default_value_t = 3000)]
    steps: usize,
    /// Runs, with consecutive seeds from --seed.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Keep running random seeds until this many seconds have passed (overrides --seeds).
    #[arg(long)]
    seconds: Option<u64>,
    /// Per-step chance (per mille) that the leader applies retention (0: never).
    #[arg(long, default_value_t = 0)]
    retention_per_mille: u32,
    /// Per-produce chance (per mille) that the idempotent client sends one of its last batches
    /// again (0: the client is not idempotent).
    #[arg(long, default_value_t = 0)]
    idempotent_retry_per_mille: u32,
    /// Controller mode: replicas with `isr_via_controller`, driven by the shipped Raft controller.
    #[arg(long)]
    controller: bool,
    /// Controller mode: count leases outliving their fence (known controller bugs) instead of
    /// failing, to explore what they lead to (not part of the replay command of a failure).
    #[arg(long)]
    tolerate_lease_outliving_fence: bool,
    /// Print every event of the run.
    #[arg(long)]
    trace: bool,
}

fn main() {
    let args = Args::parse();
    let started = Instant::now();
    let random_start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut runs = 0u64;
    loop {
        let seed = match args.seconds {
            Some(_) => random_start.wrapping_add(runs.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            None => args.seed + runs,
        };
        let mut config = SimConfig::new(seed, args.steps);
        config.trace = args.trace;
        config.retention_per_mille = args.retention_per_mille;
        config.idempotent_retry_per_mille = args.idempotent_retry_per_mille;
        config.isr_via_controller = args.controller;
        config.tolerate_lease_outliving_fence = args.tolerate_lease_outliving_fence;
        match run(config) {
            Ok(report) => println!("seed {seed}: ok {report:?}"),
            Err(failure) => {
                eprintln!("{failure}");
                std::process::exit(1);
            }
        }
        runs += 1;
        let done = match args.seconds {
            Some(seconds) => started.elapsed() >= Duration::from_secs(seconds),
            None => runs >= args.seeds,
        };
        if done {
            break;
        }
    }
    println!(
        "{runs} run(s) passed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
