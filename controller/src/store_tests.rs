//! ControllerStore tests: round trips, truncation on conflict, torn tails, and crash consistency
//! on MemDisk from seeds (`WHARF_SEED=N` replays one seed, `WHARF_SEEDS=N` runs N).

use futures_lite::future::block_on;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wharf_storage::mem_disk::{CrashMode, MemDisk, SECTOR_BYTES, TEAR_PAGE_BYTES};

use super::*;

fn entry(index: u64, term: u64, payload_bytes: usize) -> Entry {
    Entry {
        index,
        term,
        data: vec![(index % 251) as u8; payload_bytes].into(),
        ..Entry::default()
    }
}

fn open(disk: &MemDisk) -> (ControllerStore<MemDisk>, Recovered) {
    block_on(ControllerStore::open(disk.clone())).expect("opens")
}

fn persist(store: &mut ControllerStore<MemDisk>, batch: &PersistBatch) {
    block_on(store.persist(batch)).expect("persists");
}

fn ids(entries: &[Entry]) -> Vec<(u64, u64)> {
    entries.iter().map(|e| (e.index, e.term)).collect()
}

#[test]
fn entries_hard_state_and_snapshot_round_trip() {
    let disk = MemDisk::new();
    let (mut store, recovered) = open(&disk);
    assert_eq!(recovered, Recovered::default());
    let entries: Vec<Entry> = (1..=5).map(|i| entry(i, 1, 100 * i as usize)).collect();
    let hard_state = HardStateRecord {
        term: 1,
        vote: 2,
        commit: 3,
    };
    persist(
        &mut store,
        &PersistBatch {
            snapshot: None,
            entries: entries.clone(),
            hard_state: Some(hard_state),
        },
    );
    disk.crash(CrashMode::LoseUnsynced);
    let (mut store, recovered) = open(&disk);
    assert_eq!(recovered.entries, entries);
    assert_eq!(recovered.hard_state, hard_state);
    let snapshot = SnapshotRecord {
        index: 3,
        term: 1,
        voters: vec![1, 2, 3],
        data: b"{\"image\":1}".to_vec(),
    };
    persist(
        &mut store,
        &PersistBatch {
            snapshot: Some(snapshot.clone()),
            ..PersistBatch::default()
        },
    );
    disk.crash(CrashMode::LoseUnsynced);
    let (_, recovered) = open(&disk);
    assert_eq!(recovered.snapshot, Some(snapshot));
    assert_eq!(ids(&recovered.entries), vec![(4, 1), (5, 1)]);
    assert_eq!(recovered.entries, entries[3..].to_vec());
}

#[test]
fn a_conflicting_suffix_is_replaced_and_never_resurrected() {
    let disk = MemDisk::new();
    let (mut store, _) = open(&disk);
    // Long entries at term 3, then a shorter replacement at term 2 from index 2: the stale
    // frames of term 3 lie beyond the new end and must not come back.
    let old: Vec<Entry> = (1..=4)
        .map(|i| entry(i, if i == 1 { 1 } else { 3 }, 3000))
        .collect();
    persist(
        &mut store,
        &PersistBatch {
            entries: old,
            ..PersistBatch::default()
        },
    );
    persist(
        &mut store,
        &PersistBatch {
            entries: vec![entry(2, 2, 10)],
            ..PersistBatch::default()
        },
    );
    disk.crash(CrashMode::LoseUnsynced);
    let (_, recovered) = open(&disk);
    assert_eq!(ids(&recovered.entries), vec![(1, 1), (2, 2)]);
}

#[test]
fn a_torn_tail_is_dropped_and_the_log_accepts_appends() {
    let disk = MemDisk::new();
    let (mut store, _) = open(&disk);
    persist(
        &mut store,
        &PersistBatch {
            entries: (1..=3).map(|i| entry(i, 1, 500)).collect(),
            ..PersistBatch::default()
        },
    );
    // Corrupt the middle of entry 3: recovery keeps 1 and 2.
    let position = store.frames[2].position + 40;
    disk.flip_bit(LOG_FILE_NAME, position, 3);
    let (mut store, recovered) = open(&disk);
    assert_eq!(ids(&recovered.entries), vec![(1, 1), (2, 1)]);
    assert!(recovered.torn_tail_bytes > 0);
    persist(
        &mut store,
        &PersistBatch {
            entries: vec![entry(3, 2, 10)],
            ..PersistBatch::default()
        },
    );
    let (_, recovered) = open(&disk);
    assert_eq!(ids(&recovered.entries), vec![(1, 1), (2, 1), (3, 2)]);
}

#[test]
fn losing_committed_entries_is_reported_as_corruption() {
    let disk = MemDisk::new();
    let (mut store, _) = open(&disk);
    persist(
        &mut store,
        &PersistBatch {
            entries: (1..=3).map(|i| entry(i, 1, 500)).collect(),
            hard_state: Some(HardStateRecord {
                term: 1,
                vote: 1,
                commit: 3,
            }),
            ..PersistBatch::default()
        },
    );
    disk.flip_bit(LOG_FILE_NAME, store.frames[1].position + 40, 0);
    assert!(matches!(
        block_on(ControllerStore::open(disk.clone())),
        Err(StoreError::Corrupt { .. })
    ));
}

#[test]
fn an_io_error_poisons_the_store() {
    let disk = MemDisk::new();
    let (mut store, _) = open(&disk);
    disk.fail_syncs_after(Some(1));
    let batch = PersistBatch {
        entries: vec![entry(1, 1, 10)],
        ..PersistBatch::default()
    };
    assert!(matches!(
        block_on(store.persist(&batch)),
        Err(StoreError::Io { .. })
    ));
    disk.fail_syncs_after(None);
    assert!(matches!(
        block_on(store.persist(&batch)),
        Err(StoreError::Poisoned(_))
    ));
    assert!(store.poisoned().is_some());
}

/// The log as raft sees it: a snapshot point and the entries after it.
#[derive(Clone, Debug, PartialEq)]
struct LogView {
    snapshot: (u64, u64),
    entries: Vec<Entry>,
    hard_state: HardStateRecord,
}

impl LogView {
    fn last_index(&self) -> u64 {
        self.snapshot.0 + self.entries.len() as u64
    }

    fn term_at(&self, index: u64) -> u64 {
        if index == self.snapshot.0 {
            return self.snapshot.1;
        }
        self.entries[(index - self.snapshot.0 - 1) as usize].term
    }

    fn entry(&self, index: u64) -> Option<&Entry> {
        index
            .checked_sub(self.snapshot.0 + 1)
            .and_then(|i| self.entries.get(i as usize))
    }

    fn after(&self, batch: &PersistBatch) -> LogView {
        let mut next = self.clone();
        if let Some(snapshot) = &batch.snapshot {
            let follows = snapshot.index <= next.last_index()
                && next.term_at(snapshot.index) == snapshot.term;
            next.entries = if follows {
                next.entries[(snapshot.index - next.snapshot.0) as usize..].to_vec()
            } else {
                Vec::new()
            };
            next.snapshot = (snapshot.index, snapshot.term);
        }
        if let Some(first) = batch.entries.first() {
            next.entries
                .truncate((first.index - next.snapshot.0 - 1) as usize);
            next.entries.extend(batch.entries.iter().cloned());
        }
        if let Some(hard_state) = batch.hard_state {
            next.hard_state = hard_state;
        }
        next
    }
}

fn view_of(recovered: &Recovered) -> LogView {
    LogView {
        snapshot: recovered
            .snapshot
            .as_ref()
            .map_or((0, 0), |s| (s.index, s.term)),
        entries: recovered.entries.clone(),
        hard_state: recovered.hard_state,
    }
}

fn random_batch(rng: &mut StdRng, view: &LogView, next_term: &mut u64) -> PersistBatch {
    let mut batch = PersistBatch::default();
    let commit = view.hard_state.commit;
    if rng.random_bool(0.15) && commit > view.snapshot.0 {
        let index = rng.random_range(view.snapshot.0 + 1..=commit);
        batch.snapshot = Some(SnapshotRecord {
            index,
            term: view.term_at(index),
            voters: vec![1, 2, 3],
            data: vec![7; rng.random_range(1..6000)],
        });
        return batch;
    }
    let last = view.last_index();
    // Never truncate at or below the commit index (raft never does).
    let first = if rng.random_bool(0.25) && last > commit {
        *next_term += 1;
        rng.random_range(commit + 1..=last)
    } else {
        last + 1
    };
    let term = (*next_term).max(view.term_at(first - 1));
    let count = rng.random_range(1..6);
    batch.entries = (first..first + count)
        .map(|i| entry(i, term, rng.random_range(0..2500)))
        .collect();
    let new_last = first + count - 1;
    if rng.random_bool(0.6) {
        batch.hard_state = Some(HardStateRecord {
            term,
            vote: rng.random_range(1..4),
            commit: rng.random_range(commit..=new_last.min(commit + 3)),
        });
    }
    batch
}

/// Recovered must be either the acknowledged view or a state the in-flight batch could leave.
fn check_recovered(seed: u64, acknowledged: &LogView, target: Option<&LogView>, got: &LogView) {
    let valid_against = |expected: &LogView, at_least: u64| -> bool {
        got.last_index() >= at_least
            && got.last_index() <= expected.last_index()
            && (got.snapshot.0 + 1..=got.last_index()).all(|i| got.entry(i) == expected.entry(i))
            && (got.snapshot.0 == acknowledged.snapshot.0
                || Some(got.snapshot) == target.map(|t| t.snapshot))
    };
    if got == acknowledged {
        return;
    }
    let hard_state_ok = got.hard_state == acknowledged.hard_state
        || Some(got.hard_state) == target.map(|t| t.hard_state);
    assert!(
        hard_state_ok,
        "seed {seed}: hard state {:?}",
        got.hard_state
    );
    let acknowledged_ok = valid_against(acknowledged, acknowledged.last_index());
    let target_ok = target.is_some_and(|target| {
        // Entries below the first one the batch rewrote must all be there.
        let common = (acknowledged.snapshot.0 + 1..=acknowledged.last_index())
            .take_while(|i| target.entry(*i) == acknowledged.entry(*i))
            .last()
            .unwrap_or(acknowledged.snapshot.0);
        // Acknowledged entries may only be lost by being replaced by the batch's own.
        let at_least = if common < acknowledged.last_index() {
            common + 1
        } else {
            common
        };
        valid_against(target, at_least.max(got.snapshot.0))
    });
    assert!(
        acknowledged_ok || target_ok,
        "seed {seed}: recovered {:?} entries up to {} {:?} (acknowledged {:?} up to {} {:?}, target {:?})",
        got.snapshot,
        got.last_index(),
        got.hard_state,
        acknowledged.snapshot,
        acknowledged.last_index(),
        acknowledged.hard_state,
        target.map(|t| (t.snapshot, t.last_index(), t.hard_state))
    );
}

fn run_seed(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let disk = MemDisk::new();
    let (mut store, recovered) = open(&disk);
    let mut acknowledged = view_of(&recovered);
    let mut next_term = 1;
    for _round in 0..3 {
        let steps = rng.random_range(1..40);
        let mut target = None;
        for step in 0..steps {
            let batch = random_batch(&mut rng, &acknowledged, &mut next_term);
            let after = acknowledged.after(&batch);
            if step + 1 == steps && rng.random_bool(0.5) {
                // Fail a write or sync partway through the last batch.
                if rng.random_bool(0.5) {
                    disk.fail_writes_after(Some(rng.random_range(1..4)));
                } else {
                    disk.fail_syncs_after(Some(rng.random_range(1..4)));
                }
            }
            match block_on(store.persist(&batch)) {
                Ok(()) => acknowledged = after,
                Err(_) => {
                    target = Some(after);
                    break;
                }
            }
        }
        disk.fail_writes_after(None);
        disk.fail_syncs_after(None);
        let tear_bytes = if rng.random_bool(0.5) {
            SECTOR_BYTES
        } else {
            TEAR_PAGE_BYTES
        };
        disk.crash(CrashMode::Random {
            seed: rng.random(),
            tear_bytes,
        });
        let (reopened, recovered) = match block_on(ControllerStore::open(disk.clone())) {
            Ok(opened) => opened,
            Err(error) => panic!("seed {seed}: recovery failed: {error}"),
        };
        let got = view_of(&recovered);
        check_recovered(seed, &acknowledged, target.as_ref(), &got);
        acknowledged = got;
        next_term = next_term.max(acknowledged.hard_state.term) + 1;
        store = reopened;
    }
}

#[test]
fn crash_at_any_point_recovers_a_consistent_log() {
    let seeds: u64 = std::env::var("WHARF_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    if let Some(seed) = std::env::var("WHARF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run_seed(seed);
        return;
    }
    for seed in 0..seeds {
        run_seed(seed);
    }
}
