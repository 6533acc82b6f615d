//! The leader-epoch history of one replica's log: which epoch wrote which offsets. It answers
//! the divergence question of leader-epoch truncation (Kafka KIP-101/279): "where does my copy
//! of epoch E end?".

use wharf_storage::{Epoch, Offset};

/// Epochs a history keeps; a partition sees one epoch per leader change, so this is far above
/// anything a real partition reaches (the driver persists the history as one small file).
pub const EPOCH_HISTORY_ENTRIES_MAX: usize = 4096;

/// `(epoch, start offset)` pairs, both strictly increasing. Epoch `e` covers
/// `[start(e), start(next entry))`, the last one up to the log end.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochHistory {
    entries: Vec<(Epoch, Offset)>,
}

impl EpochHistory {
    /// Builds a history from persisted entries, dropping any that start beyond `log_end` (their
    /// data was lost in a crash) and checking the order.
    pub fn new(mut entries: Vec<(Epoch, Offset)>, log_end: Offset) -> Result<Self, String> {
        for pair in entries.windows(2) {
            if pair[0].0 >= pair[1].0 || pair[0].1 > pair[1].1 {
                return Err(format!("epoch history out of order: {pair:?}"));
            }
        }
        entries.retain(|&(_, start)| start <= log_end);
        if entries.len() > EPOCH_HISTORY_ENTRIES_MAX {
            return Err(format!(
                "epoch history has {} entries (limit {EPOCH_HISTORY_ENTRIES_MAX})",
                entries.len()
            ));
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

    /// Records that `epoch` starts at `start`. Returns false (and changes nothing) when the
    /// epoch is not newer than the latest one.
    pub fn begin(&mut self, epoch: Epoch, start: Offset) -> bool {
        if let Some(&(latest, latest_start)) = self.entries.last() {
            if epoch <= latest {
                return false;
            }
            assert!(
                start >= latest_start,
                "epoch {epoch} starts at {start}, before epoch {latest} at {latest_start}"
            );
            if start == latest_start {
                // The previous epoch wrote nothing here: it no longer covers any offset.
                self.entries.pop();
            }
        }
        assert!(
            self.entries.len() < EPOCH_HISTORY_ENTRIES_MAX,
            "epoch history full"
        );
        self.entries.push((epoch, start));
        true
    }

    /// Drops the epochs that start at or above `to` after the log was truncated to `to`.
    pub fn truncate(&mut self, to: Offset) {
        self.entries.retain(|&(_, start)| start < to);
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
    /// `leader_end`: below both that and the end of this log's own copy of epochs up to
    /// `leader_epoch`, so everything kept was written by the same leaders as the leader's log.
    pub fn divergence_point(
        &self,
        leader_epoch: Epoch,
        leader_end: Offset,
        log_start: Offset,
        log_end: Offset,
    ) -> Offset {
        let own_end = match self.entries.iter().position(|&(e, _)| e > leader_epoch) {
            Some(index) => self.entries[index].1,
            None => log_end,
        };
        own_end.min(leader_end).max(log_start).min(log_end)
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

    #[test]
    fn begin_truncate_and_last_epoch() {
        let mut h = EpochHistory::default();
        assert!(h.begin(Epoch(1), Offset(0)));
        assert!(!h.begin(Epoch(1), Offset(5)));
        assert!(h.begin(Epoch(2), Offset(5)));
        // Epoch 3 starts where 2 did: 2 wrote nothing and disappears.
        assert!(h.begin(Epoch(3), Offset(5)));
        assert_eq!(h.entries(), &[(Epoch(1), Offset(0)), (Epoch(3), Offset(5))]);
        assert_eq!(h.last_epoch_below(Offset(5)), Some(Epoch(1)));
        assert_eq!(h.last_epoch_below(Offset(6)), Some(Epoch(3)));
        assert_eq!(h.last_epoch_below(Offset(0)), None);
        h.truncate(Offset(5));
        assert_eq!(h.latest(), Some(Epoch(1)));
    }

    #[test]
    fn new_rejects_disorder_and_drops_lost_epochs() {
        assert!(EpochHistory::new(
            vec![(Epoch(2), Offset(0)), (Epoch(1), Offset(5))],
            Offset(9)
        )
        .is_err());
        let h = history(&[(1, 0), (2, 10)], 7);
        assert_eq!(h.entries(), &[(Epoch(1), Offset(0))]);
    }
}
