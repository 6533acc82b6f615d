//! raft-rs's [`Storage`] over an in-memory copy of the controller's raft log.
//!
//! The node fills it from what [`crate::store::ControllerStore`] recovered, then keeps it equal to
//! what the driver persists: each `Ready`'s snapshot, entries and hard state go into the mirror
//! when the node hands the `Ready` out, and raft only reads them (as stable) after the driver has
//! persisted them and called `advance`. Reads never touch the disk (raft-rs's Storage is
//! synchronous; the disk is not).

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

pub(crate) struct MirrorStorage {
    hard_state: HardState,
    conf_state: ConfState,
    /// The latest snapshot (image bytes included): sent to followers that are too far behind.
    snapshot: Snapshot,
    /// `entries[i].index == snapshot index + 1 + i`.
    entries: Vec<Entry>,
}

impl MirrorStorage {
    pub(crate) fn new(
        hard_state: HardState,
        conf_state: ConfState,
        snapshot: Snapshot,
        entries: Vec<Entry>,
    ) -> MirrorStorage {
        let base = snapshot.get_metadata().index;
        for (offset, entry) in entries.iter().enumerate() {
            assert_eq!(entry.index, base + 1 + offset as u64, "entries are dense");
        }
        MirrorStorage {
            hard_state,
            conf_state,
            snapshot,
            entries,
        }
    }

    pub(crate) fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    fn first(&self) -> u64 {
        self.snapshot_index() + 1
    }

    fn last(&self) -> u64 {
        self.snapshot_index() + self.entries.len() as u64
    }

    /// Entries `[low, high)` already known to be present (committed, not compacted).
    pub(crate) fn entries_between(&self, low: u64, high: u64) -> &[Entry] {
        assert!(low >= self.first() && high <= self.last() + 1 && low <= high);
        let base = self.first();
        &self.entries[(low - base) as usize..(high - base) as usize]
    }

    pub(crate) fn set_hard_state(&mut self, hard_state: HardState) {
        self.hard_state = hard_state;
    }

    pub(crate) fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Appends entries, replacing a conflicting suffix (raft's truncate-on-conflict).
    pub(crate) fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        assert!(
            first.index >= self.first() && first.index <= self.last() + 1,
            "append at {} outside [{}, {}]",
            first.index,
            self.first(),
            self.last() + 1
        );
        self.entries.truncate((first.index - self.first()) as usize);
        self.entries.extend_from_slice(entries);
    }

    /// Installs a snapshot received from the leader: the whole log is replaced.
    pub(crate) fn install_snapshot(&mut self, snapshot: Snapshot) {
        let metadata = snapshot.get_metadata();
        assert!(metadata.index >= self.snapshot_index());
        self.hard_state.term = self.hard_state.term.max(metadata.term);
        self.hard_state.commit = metadata.index;
        self.conf_state = metadata.get_conf_state().clone();
        self.entries.clear();
        self.snapshot = snapshot;
    }

    /// Takes a local snapshot at an applied index: entries up to it are dropped.
    pub(crate) fn compact(&mut self, snapshot: Snapshot) {
        let index = snapshot.get_metadata().index;
        assert!(index > self.snapshot_index() && index <= self.last());
        assert_eq!(
            self.term(index).ok(),
            Some(snapshot.get_metadata().term),
            "snapshot term"
        );
        self.entries
            .drain(..(index - self.snapshot_index()) as usize);
        self.snapshot = snapshot;
    }
}

impl Storage for MirrorStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut entries = self.entries_between(low, high).to_vec();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index == self.snapshot_index() {
            return Ok(self.snapshot.get_metadata().term);
        }
        if index < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if index > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(index - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot_index() < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}
