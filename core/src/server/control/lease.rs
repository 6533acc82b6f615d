//! The leases that heartbeat answers granted and that still wait for this broker to be brought
//! to the metadata that came with them.
//!
//! One slot was not enough (review, 2026-12-05): under constant metadata churn every heartbeat
//! answer carried a newer index and overwrote the slot before the apply task reached it, so no
//! lease was ever renewed and the broker stopped acknowledging although it was alive and
//! applying. Keeping the last few grants lets the lease that the finished apply round *can*
//! satisfy be renewed.

/// Grants kept; the oldest goes first when full. At the default heartbeat interval this
/// covers an apply round of about eight heartbeats.
pub const LEASES_PENDING_MAX: usize = 8;

/// Pending grants, oldest first: `(applied index it needs, lease end in ms)`, both strictly
/// increasing along the list.
#[derive(Debug, Default)]
pub struct PendingLeases {
    grants: Vec<(u64, u64)>,
}

impl PendingLeases {
    /// Records a grant. A grant needing the same index as the newest one replaces it (its
    /// lease ends later); a grant that ends no later than one already kept adds nothing.
    pub fn push(&mut self, index: u64, until_ms: u64) {
        if self.grants.last().is_some_and(|(_, u)| *u >= until_ms) {
            return;
        }
        // Older grants needing at least as much add nothing the new one does not give.
        self.grants.retain(|(i, _)| *i < index);
        if self.grants.len() == LEASES_PENDING_MAX {
            self.grants.remove(0);
        }
        self.grants.push((index, until_ms));
        debug_assert!(self
            .grants
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1));
    }

    /// The latest lease end among grants satisfied by `reconciled`, without taking it.
    pub fn satisfied(&self, reconciled: u64) -> Option<u64> {
        self.grants
            .iter()
            .rev()
            .find(|(index, _)| *index <= reconciled)
            .map(|(_, until)| *until)
    }

    /// Takes the grants satisfied by `reconciled`; answers the latest lease end among them.
    pub fn take_satisfied(&mut self, reconciled: u64) -> Option<u64> {
        let until = self.satisfied(reconciled)?;
        self.grants.retain(|(index, _)| *index > reconciled);
        Some(until)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.grants.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_satisfiable_grant_survives_newer_ones_under_churn() {
        let mut leases = PendingLeases::default();
        // Every heartbeat brings a newer index while one apply round reaches index 10.
        for beat in 0..5u64 {
            leases.push(10 + beat, 1_000 + beat * 100);
        }
        // The single slot kept only (14, 1400) and renewed nothing here.
        assert_eq!(leases.take_satisfied(10), Some(1_000));
        assert_eq!(leases.len(), 4);
        assert_eq!(leases.take_satisfied(12), Some(1_200));
        assert_eq!(leases.take_satisfied(12), None);
        assert_eq!(leases.take_satisfied(20), Some(1_400));
        assert!(leases.is_empty());
    }

    #[test]
    fn the_list_is_bounded_and_keeps_the_newest() {
        let mut leases = PendingLeases::default();
        for beat in 0..100u64 {
            leases.push(beat, 10 * beat + 1);
            assert!(leases.len() <= LEASES_PENDING_MAX);
        }
        assert_eq!(leases.satisfied(99), Some(991));
        assert_eq!(leases.satisfied(91), None);
        assert_eq!(leases.satisfied(92), Some(921));
    }

    #[test]
    fn a_grant_for_the_same_index_replaces_and_a_stale_one_is_ignored() {
        let mut leases = PendingLeases::default();
        leases.push(5, 100);
        leases.push(5, 200);
        assert_eq!(leases.len(), 1);
        leases.push(6, 150);
        assert_eq!(leases.len(), 1);
        // A newer grant needing less covers older ones needing more.
        leases.push(7, 300);
        leases.push(4, 400);
        assert_eq!(leases.len(), 1);
        assert_eq!(leases.take_satisfied(4), Some(400));
    }
}
