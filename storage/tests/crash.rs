//! Crash consistency on MemDisk, from seeds.
//!
//! Each seed runs a random workload (appends, flushes, flushes with appends in flight, suffix
//! truncations), injects a failing write or sync at a random point, crashes (unsynced writes kept,
//! lost or torn at sector granularity), recovers, and checks:
//! - the recovered log is a prefix of what was appended (byte for byte, every CRC valid),
//! - it holds every batch whose flush returned,
//! - offsets are dense, no corruption is reported (none was injected),
//! - the recovered log accepts appends and survives a second crash.
//!
//! A failure names its seed; `WHARF_SEED=N cargo test -p wharf-storage --test crash` replays
//! it. `WHARF_SEEDS=N` runs N seeds instead of the default, starting at `WHARF_SEED_START`
//! (default 0); the test script adds a batch from a random start each run.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::*;
use futures_lite::future::block_on;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wharf_storage::log::{AppendError, LogConfig, PartitionLog};
use wharf_storage::mem_disk::{CrashMode, MemDisk};
use wharf_storage::Offset;

const DEFAULT_SEEDS: u64 = 400;
const STEPS_MAX: usize = 250;

struct Model {
    /// Every batch the log should hold, in order (stamped bytes).
    batches: Vec<(Offset, Vec<u8>)>,
    /// Every record below this offset was acknowledged durable by a returned flush.
    acknowledged: Offset,
    /// The log start after the last retention: batches below it are no longer tracked.
    start: Offset,
}

fn random_config(rng: &mut StdRng) -> LogConfig {
    LogConfig {
        segment_bytes_max: [16 * 1024, 64 * 1024, 256 * 1024][rng.random_range(0..3)],
        write_chunk_bytes: [4096, 8192, 64 * 1024][rng.random_range(0..3)],
        preallocate: rng.random_bool(0.7),
        checkpoint_interval_bytes: [4096, 32 * 1024, 64 * 1024 * 1024][rng.random_range(0..3)],
        recycled_segments_max: rng.random_range(0..3),
        retention: wharf_storage::policy::RetentionLimits {
            retention_bytes_max: Some(48 * 1024),
            retention_ms_max: None,
        },
        ..small_config()
    }
}

fn run_seed(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let disk = MemDisk::new();
    let config = random_config(&mut rng);
    let (mut log, _) = open(&disk, config.clone());
    let mut model = Model {
        batches: Vec::new(),
        acknowledged: Offset(0),
        start: Offset(0),
    };
    let mut tag = 0u64;
    let steps = rng.random_range(1..STEPS_MAX);
    for _ in 0..steps {
        if log.poisoned().is_some() {
            break;
        }
        match rng.random_range(0..100) {
            0..55 => append(&mut log, &mut model, &mut rng, &mut tag),
            55..75 => {
                if block_on(log.flush()).is_ok() {
                    model.acknowledged = log.durable_offset();
                }
            }
            75..82 => {
                // Group commit with appends arriving while the flush is in flight.
                let Ok(job) = log.begin_flush() else { break };
                for _ in 0..rng.random_range(0..4) {
                    append(&mut log, &mut model, &mut rng, &mut tag);
                }
                if let Some(job) = job {
                    if log.complete_flush(block_on(job.run())).is_ok() {
                        model.acknowledged = log.durable_offset();
                    }
                }
            }
            82..85 => {
                // Two flushes in flight: the second writes while the first syncs. Outcomes are
                // completed in order; a crash may come between them.
                let Ok(Some(first)) = log.begin_flush() else {
                    continue;
                };
                append(&mut log, &mut model, &mut rng, &mut tag);
                // A poisoned log refuses the second flush; the first one still completes.
                let second = log.begin_flush().unwrap_or_default();
                if rng.random_bool(0.3) {
                    disk.fail_syncs_after(Some(rng.random_range(1..4)));
                }
                // Run the second job's future first: it must wait for the first one's writes.
                let (second_outcome, first_outcome) = block_on(futures_lite::future::zip(
                    async {
                        match second {
                            Some(job) => Some(job.run().await),
                            None => None,
                        }
                    },
                    first.run(),
                ));
                disk.fail_syncs_after(None);
                if log.complete_flush(first_outcome).is_ok() {
                    model.acknowledged = log.durable_offset();
                }
                if let Some(outcome) = second_outcome {
                    if log.complete_flush(outcome).is_ok() {
                        model.acknowledged = log.durable_offset();
                    }
                }
            }
            85..88 if !model.batches.is_empty() => {
                let cut = rng.random_range(0..model.batches.len());
                let to = model.batches[cut].0;
                // Truncation deliberately removes records (replication decides so).
                model.acknowledged = model.acknowledged.min(to);
                if block_on(log.truncate_suffix(to)).is_ok() {
                    model.batches.truncate(cut);
                    model.acknowledged = log.durable_offset();
                }
            }
            88..90 => {
                // Retention deletes (or recycles) the oldest segments, or a coordinator deletes
                // the segments below its snapshot; the model drops them too.
                let deleting = if rng.random_bool(0.5) || model.batches.is_empty() {
                    block_on(log.apply_retention(u64::MAX / 2))
                } else {
                    let below = model.batches[rng.random_range(0..model.batches.len())].0;
                    block_on(log.delete_below(below))
                };
                if let Ok(deleted) = deleting {
                    if deleted > 0 {
                        let start = log.log_start_offset();
                        model.batches.retain(|(offset, _)| *offset >= start);
                        model.start = start;
                    }
                }
            }
            90..100 => {
                // Arm an I/O failure somewhere in the next flush's writes or syncs.
                if rng.random_bool(0.5) {
                    disk.fail_syncs_after(Some(rng.random_range(1..4)));
                } else {
                    disk.fail_writes_after(Some(rng.random_range(1..6)));
                }
                for _ in 0..rng.random_range(0..5) {
                    append(&mut log, &mut model, &mut rng, &mut tag);
                }
                if block_on(log.flush()).is_ok() {
                    model.acknowledged = log.durable_offset();
                }
                disk.fail_syncs_after(None);
                disk.fail_writes_after(None);
            }
            _ => append(&mut log, &mut model, &mut rng, &mut tag),
        }
    }
    drop(log);
    let mode = if rng.random_bool(0.8) {
        CrashMode::Random {
            seed: rng.random(),
            tear_bytes: tear_unit(&mut rng),
        }
    } else {
        CrashMode::LoseUnsynced
    };
    disk.crash(mode);
    let (mut log, report) = open(&disk, config.clone());
    let recovered = check_recovered(&log, &model, &report);

    // The recovered log takes new appends and survives another crash.
    model.batches.truncate(recovered);
    for _ in 0..rng.random_range(1..10) {
        append(&mut log, &mut model, &mut rng, &mut tag);
    }
    block_on(log.flush()).expect("flush after recovery");
    model.acknowledged = log.durable_offset();
    drop(log);
    disk.crash(CrashMode::Random {
        seed: rng.random(),
        tear_bytes: tear_unit(&mut rng),
    });
    let (log, report) = open(&disk, config);
    let recovered = check_recovered(&log, &model, &report);
    assert_eq!(
        recovered,
        model.batches.len(),
        "everything flushed after recovery survives"
    );
}

/// Torn writes lose whole 512-byte sectors or whole 4 KiB pages.
fn tear_unit(rng: &mut StdRng) -> usize {
    if rng.random_bool(0.5) {
        wharf_storage::mem_disk::SECTOR_BYTES
    } else {
        wharf_storage::mem_disk::TEAR_PAGE_BYTES
    }
}

fn append(log: &mut PartitionLog<MemDisk>, model: &mut Model, rng: &mut StdRng, tag: &mut u64) {
    *tag += 1;
    let mut batch = random_batch(rng, *tag, *tag as i64);
    match log.append(&mut batch, EPOCH, *tag) {
        Ok(appended) => {
            assert_eq!(
                appended.base_offset,
                model
                    .batches
                    .last()
                    .map_or(log.log_start_offset(), |(o, b)| {
                        let header = wharf_storage::batch::decode_header(b).expect("model batch");
                        assert_eq!(header.base_offset, *o);
                        header.next_offset()
                    })
            );
            model.batches.push((appended.base_offset, batch.to_vec()));
        }
        Err(AppendError::Poisoned(_)) | Err(AppendError::Backpressure { .. }) => {}
        Err(error) => panic!("append failed: {error}"),
    }
}

/// Checks the recovered log against the model; returns how many model batches it holds.
fn check_recovered(
    log: &PartitionLog<MemDisk>,
    model: &Model,
    report: &wharf_storage::RecoveryReport,
) -> usize {
    assert!(
        report.corrupt.is_empty(),
        "no corruption was injected: {report:?}"
    );
    // Retention that a crash undid (its directory changes were not synced yet) may bring old
    // segments back; they are valid data below what the model still tracks.
    let recovered: Vec<_> = read_all(log)
        .into_iter()
        .filter(|(offset, _)| *offset >= model.start)
        .collect();
    assert!(
        recovered.len() <= model.batches.len(),
        "recovered {} batches, appended {}",
        recovered.len(),
        model.batches.len()
    );
    for (i, (got, want)) in recovered.iter().zip(&model.batches).enumerate() {
        assert_eq!(got.0, want.0, "batch {i} offset");
        assert!(
            got.1 == want.1,
            "batch {i} at offset {} differs from what was appended",
            got.0
        );
    }
    assert!(
        log.end_offset() >= model.acknowledged,
        "acknowledged up to {} but recovered only up to {} ({report:?})",
        model.acknowledged,
        log.end_offset()
    );
    assert_eq!(
        log.durable_offset(),
        log.end_offset(),
        "everything recovered is durable"
    );
    recovered.len()
}

#[test]
fn crash_recovery_keeps_a_prefix_with_every_acknowledged_batch() {
    // Seeds that once found a bug run every time.
    const REGRESSION_SEEDS: &[u64] = &[755_765_936_700];
    let seeds: Vec<u64> = match std::env::var("WHARF_SEED") {
        Ok(seed) => vec![seed.parse().expect("WHARF_SEED is a number")],
        Err(_) => {
            let count = std::env::var("WHARF_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(DEFAULT_SEEDS);
            let start: u64 = std::env::var("WHARF_SEED_START")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            eprintln!("crash consistency: seeds {start}..{}", start + count);
            (start..start + count).collect()
        }
    };
    let regression = if std::env::var("WHARF_SEED").is_ok() {
        &[][..]
    } else {
        REGRESSION_SEEDS
    };
    for seed in regression.iter().copied().chain(seeds) {
        if catch_unwind(AssertUnwindSafe(|| run_seed(seed))).is_err() {
            panic!("crash consistency failed for seed {seed}; replay: WHARF_SEED={seed} cargo test -p wharf-storage --test crash");
        }
    }
}
