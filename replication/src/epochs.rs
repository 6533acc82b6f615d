//! The leader-epoch history of one replica's log: which epoch wrote which offsets. It answers
//! the divergence question of leader-epoch truncation (Kafka KIP-101/279): "where does my copy
//! of epoch E end?".

use wharf_storage::{Epoch, Offset};

/// Epochs a history keeps; a partition sees one epoch per leader change, so this is far above
/// anything a real partition reaches (the driver persists the history as one small file).
pub const EPOCH_HISTORY_ENTRIES_MAX: usize = 4096;

/// Why an epoch could not be recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EpochHistoryError {
    #[error("epoch history full ({limit} epochs); make room first")]
    Full { limit: usize },
    #[error("epoch {epoch} starts at {start}, before epoch {latest} at {latest_start}")]
    StartsBeforeLatest {
        epoch: Epoch,
        start: Offset,
        latest: Epoch,
        latest_start: Offset,
    },
}

/// Why persisted history entries cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EpochHistoryLoadError {
    #[error("epoch history out of order: ({0}, {1}) then ({2}, {3})")]
    OutOfOrder(Epoch, Offset, Epoch, Offset),
    #[error("epoch history has {count} entries (limit {limit})")]
    TooMany { count: usize, limit: usize },
}

/// `(epoch, start offset)` pairs, both strictly increasing. Epoch `e` covers
/// `[start(e), start(next entry))`, the last one up to the log end.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochHistory {
    entries: Vec<(Epoch, Offset)>,
}

impl EpochHistory {
    /// Builds a history from persisted entries, dropping any that start beyond `log_end` (their
    /// data was lost in a crash) and checking the order.
    pub fn new(
        mut entries: Vec<(Epoch, Offset)>,
        log_end: Offset,
    ) -> Result<Self, EpochHistoryLoadError> {
        for pair in entries.windows(2) {
            if pair[0].0 >= pair[1].0 || pair[0].1 > pair[1].1 {
                return Err(EpochHistoryLoadError::OutOfOrder(
                    pair[0].0, pair[0].1, pair[1].0, pair[1].1,
                ));
            }
        }
        entries.retain(|&(_, start)| start <= log_end);
        if entries.len() > EPOCH_HISTORY_ENTRIES_MAX {
            return Err(EpochHistoryLoadError::TooMany {
                count: entries.len(),
                limit: EPOCH_HISTORY_ENTRIES_MAX,
            });
        }
        Ok(EpochHistory { entries })
    }

    pub fn entries(&self) -> &[(Epoch, Offset)] {
        &self.entries
    }

    /// The newest epoch, if any.
    pub fn latest(&self) -> Option<Epoch> {
        self.entries.last().map(|&(epoch, _)| epoch)
    }

    /// The epoch of the last record below `log_end` (what a follower reports as its last
    /// fetched epoch); `None` for an empty log.
    pub fn last_epoch_below(&self, log_end: Offset) -> Option<Epoch> {
        self.entries
            .iter()
            .rev()
            .find(|&&(_, start)| start < log_end)
            .map(|&(epoch, _)| epoch)
    }

    /// Records that `epoch` starts at `start`. Returns `Ok(false)` (and changes nothing) when
    /// the epoch is not newer than the latest one. Epochs and offsets of fetched batches come
    /// from the network, so a history that cannot take them is an error, not a crash.
    pub fn begin(&mut self, epoch: Epoch, start: Offset) -> Result<bool, EpochHistoryError> {
        if let Some(&(latest, latest_start)) = self.entries.last() {
            if epoch <= latest {
                return Ok(false);
            }
            if start < latest_start {
                return Err(EpochHistoryError::StartsBeforeLatest {
                    epoch,
                    start,
                    latest,
                    latest_start,
                });
            }
            if start == latest_start {
                // The previous epoch wrote nothing here: it no longer covers any offset.
                self.entries.pop();
            }
        }
        if self.entries.len() >= EPOCH_HISTORY_ENTRIES_MAX {
            return Err(EpochHistoryError::Full {
                limit: EPOCH_HISTORY_ENTRIES_MAX,
            });
        }
        self.entries.push((epoch, start));
        Ok(true)
    }

    /// Makes room for one more epoch when the history is full: first drops epochs that cover
    /// nothing at or above `log_start` (retention deleted their data), then, if still full, the
    /// oldest epoch. Forgetting an old epoch is safe, only slower: a follower whose last epoch
    /// is older than every epoch kept here is answered `Diverging` at the log start and fetches
    /// again from there; a follower that lacks it truncates to its own older epochs.
    /// Returns whether anything was dropped.
    pub fn make_room(&mut self, log_start: Offset) -> bool {
        if self.entries.len() < EPOCH_HISTORY_ENTRIES_MAX {
            return false;
        }
        // Keep the epoch that covers `log_start`: the last one starting at or below it.
        let covering = self
            .entries
            .partition_point(|&(_, start)| start <= log_start);
        let below = covering.saturating_sub(1);
        if below > 0 {
            self.entries.drain(..below);
        } else {
            self.entries.remove(0);
        }
        true
    }

    /// Forgets every epoch (the log was emptied: nothing is covered any more).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Drops the epochs that start at or above `to` after the log was truncated to `to`.
    /// Returns whether any was dropped (the persisted history must then be rewritten).
    pub fn truncate(&mut self, to: Offset) -> bool {
        let before = self.entries.len();
        self.entries.retain(|&(_, start)| start < to);
        self.entries.len() != before
    }

    /// Where this log's copy of `epoch` ends, as the leader answers a follower: the largest
    /// epoch `<= epoch` this log has, and the start of the next epoch after it (or `log_end`).
    /// `None` when every epoch here is newer than `epoch`.
    pub fn end_of(&self, epoch: Epoch, log_end: Offset) -> Option<(Epoch, Offset)> {
        let index = self.entries.iter().rposition(|&(e, _)| e <= epoch)?;
        let end = self
            .entries
            .get(index + 1)
            .map_or(log_end, |&(_, start)| start);
        Some((self.entries[index].0, end))
    }

    /// Where a follower truncates after the leader said its copy of `leader_epoch` ends at
    /// `leader_end` (Kafka's `getOffsetTruncationState`, KIP-279):
    /// - this log has `leader_epoch` too: both copies of it were written by the same leader, so
    ///   they agree up to the shorter one; truncate to the lower of the two ends (a batch
    ///   boundary in both logs);
    /// - this log lacks `leader_epoch`: truncate to the end of this log's largest epoch below
    ///   it (the start of the next epoch here, a batch boundary of this log). The leader's
    ///   offset belongs to an epoch this log never saw and may fall inside one of this log's
    ///   batches. The next fetch then reports that older epoch and the leader answers for it,
    ///   so truncation converges one epoch at a time;
    /// - every epoch here is newer than `leader_epoch`: nothing is known to match; truncate to
    ///   the log start.
    pub fn divergence_point(
        &self,
        leader_epoch: Epoch,
        leader_end: Offset,
        log_start: Offset,
        log_end: Offset,
    ) -> Offset {
        let point = match self.entries.iter().rposition(|&(e, _)| e <= leader_epoch) {
            None => log_start,
            Some(index) => {
                let own_end = self
                    .entries
                    .get(index + 1)
                    .map_or(log_end, |&(_, start)| start);
                if self.entries[index].0 == leader_epoch {
                    own_end.min(leader_end)
                } else {
                    own_end
                }
            }
        };
        point.max(log_start).min(log_end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(entries: &[(u32, u64)], end: u64) -> EpochHistory {
        EpochHistory::new(
            entries
                .iter()
                .map(|&(e, s)| (Epoch(e), Offset(s)))
                .collect(),
            Offset(end),
        )
        .expect("valid history")
    }

    #[test]
    fn end_of_answers_with_the_largest_epoch_not_above() {
        let h = history(&[(1, 0), (3, 10), (5, 20)], 30);
        assert_eq!(h.end_of(Epoch(1), Offset(30)), Some((Epoch(1), Offset(10))));
        assert_eq!(h.end_of(Epoch(2), Offset(30)), Some((Epoch(1), Offset(10))));
        assert_eq!(h.end_of(Epoch(4), Offset(30)), Some((Epoch(3), Offset(20))));
        assert_eq!(h.end_of(Epoch(9), Offset(30)), Some((Epoch(5), Offset(30))));
        assert_eq!(h.end_of(Epoch(0), Offset(30)), None);
    }

    #[test]
    fn divergence_point_is_below_both_copies() {
        // Follower wrote epochs 1 and 2; the leader never saw epoch 2 and says epoch 1 ends at 8.
        let follower = history(&[(1, 0), (2, 10)], 15);
        assert_eq!(
            follower.divergence_point(Epoch(1), Offset(8), Offset(0), Offset(15)),
            Offset(8)
        );
        // The leader's epoch 1 runs to 12, but this log's epoch 1 ends at 10.
        assert_eq!(
            follower.divergence_point(Epoch(1), Offset(12), Offset(0), Offset(15)),
            Offset(10)
        );
        // Same epoch on both sides: keep up to the leader's end.
        assert_eq!(
            follower.divergence_point(Epoch(2), Offset(13), Offset(0), Offset(15)),
            Offset(13)
        );
    }

    /// Regression (simulator seed 2373404285590186184): the follower led epoch 6 on top of
    /// epoch 3; the new leader lacks epoch 6 and answers with its epoch 4, ending at 226 — an
    /// offset inside one of the follower's epoch-3 batches. The follower never saw epoch 4, so
    /// it truncates only its own epochs above 3 (to 264, where its epoch 6 began) and asks again
    /// with epoch 3.
    #[test]
    fn a_leader_epoch_this_log_lacks_truncates_to_the_end_of_the_older_epoch() {
        let follower = history(&[(1, 0), (3, 161), (6, 264)], 268);
        assert_eq!(
            follower.divergence_point(Epoch(4), Offset(226), Offset(0), Offset(268)),
            Offset(264)
        );
        // Next round: the leader's epoch 3 ends at 216, which this log has too.
        let follower = history(&[(1, 0), (3, 161)], 264);
        assert_eq!(
            follower.divergence_point(Epoch(3), Offset(216), Offset(0), Offset(264)),
            Offset(216)
        );
        // Every epoch here is newer than the leader's answer: nothing is known to match.
        let follower = history(&[(5, 10), (6, 20)], 30);
        assert_eq!(
            follower.divergence_point(Epoch(4), Offset(25), Offset(10), Offset(30)),
            Offset(10)
        );
    }

    #[test]
    fn begin_truncate_and_last_epoch() {
        let mut h = EpochHistory::default();
        assert_eq!(h.begin(Epoch(1), Offset(0)), Ok(true));
        assert_eq!(h.begin(Epoch(1), Offset(5)), Ok(false));
        assert_eq!(h.begin(Epoch(2), Offset(5)), Ok(true));
        // Epoch 3 starts where 2 did: 2 wrote nothing and disappears.
        assert_eq!(h.begin(Epoch(3), Offset(5)), Ok(true));
        assert_eq!(h.entries(), &[(Epoch(1), Offset(0)), (Epoch(3), Offset(5))]);
        assert_eq!(h.last_epoch_below(Offset(5)), Some(Epoch(1)));
        assert_eq!(h.last_epoch_below(Offset(6)), Some(Epoch(3)));
        assert_eq!(h.last_epoch_below(Offset(0)), None);
        h.truncate(Offset(5));
        assert_eq!(h.latest(), Some(Epoch(1)));
    }

    /// Regression: a full history used to be an assert, reachable from batches a leader sends
    /// (each new epoch in a fetch reply begins an entry) and from a restart of a leader whose
    /// persisted history was at the limit (a crash loop).
    #[test]
    fn a_full_history_is_an_error_and_make_room_frees_an_entry() {
        let mut h = EpochHistory::default();
        for i in 0..EPOCH_HISTORY_ENTRIES_MAX as u64 {
            assert_eq!(h.begin(Epoch(i as u32 + 1), Offset(i * 10)), Ok(true));
        }
        let next = Epoch(EPOCH_HISTORY_ENTRIES_MAX as u32 + 1);
        let at = Offset(EPOCH_HISTORY_ENTRIES_MAX as u64 * 10);
        assert_eq!(
            h.begin(next, at),
            Err(EpochHistoryError::Full {
                limit: EPOCH_HISTORY_ENTRIES_MAX
            })
        );
        // Retention deleted everything below 35: epochs 1..=3 cover nothing any more.
        assert!(h.make_room(Offset(35)));
        assert_eq!(h.entries()[0], (Epoch(4), Offset(30)));
        assert_eq!(h.begin(next, at), Ok(true));
        for i in 1..=2u64 {
            assert_eq!(h.begin(Epoch(next.0 + i as u32), at.plus(i)), Ok(true));
        }
        // Full again with nothing below the log start: the oldest epoch goes.
        assert!(h.make_room(Offset(0)));
        assert_eq!(h.entries()[0], (Epoch(5), Offset(40)));
        assert!(!h.make_room(Offset(0)));
        // A start before the latest epoch's is refused, not asserted.
        assert!(matches!(
            h.begin(Epoch(u32::MAX), Offset(1)),
            Err(EpochHistoryError::StartsBeforeLatest { .. })
        ));
    }

    #[test]
    fn new_rejects_disorder_and_drops_lost_epochs() {
        assert_eq!(
            EpochHistory::new(
                vec![(Epoch(2), Offset(0)), (Epoch(1), Offset(5))],
                Offset(9)
            ),
            Err(EpochHistoryLoadError::OutOfOrder(
                Epoch(2),
                Offset(0),
                Epoch(1),
                Offset(5)
            ))
        );
        let h = history(&[(1, 0), (2, 10)], 7);
        assert_eq!(h.entries(), &[(Epoch(1), Offset(0))]);
        let too_many: Vec<_> = (0..=EPOCH_HISTORY_ENTRIES_MAX as u64)
            .map(|i| (Epoch(i as u32 + 1), Offset(i)))
            .collect();
        assert_eq!(
            EpochHistory::new(too_many, Offset(u64::MAX)),
            Err(EpochHistoryLoadError::TooMany {
                count: EPOCH_HISTORY_ENTRIES_MAX + 1,
                limit: EPOCH_HISTORY_ENTRIES_MAX
            })
        );
    }
}
