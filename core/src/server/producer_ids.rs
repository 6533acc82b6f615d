//! Producer ids for idempotent producers (`InitProducerId`), unique across the cluster and
//! across restarts without asking anyone: `[broker id: 16 bits][block: 28][counter: 20]`. Each
//! start of a broker reserves the next block durably (`metadata::reserve_producer_id_block`)
//! before handing out any id of it, so a restarted broker never repeats one.

use std::sync::atomic::{AtomicU64, Ordering};

pub const BROKER_BITS: u32 = 16;
pub const BLOCK_BITS: u32 = 28;
pub const COUNTER_BITS: u32 = 20;
/// Ids one broker run hands out; past it `InitProducerId` answers `limit_reached` until the
/// broker restarts (and reserves a new block). The last counter value is never used, so no id
/// is `ProducerId::NONE` (all ones).
pub const IDS_PER_RUN: u64 = (1 << COUNTER_BITS) - 1;

pub struct ProducerIds {
    base: u64,
    next: AtomicU64,
}

impl ProducerIds {
    pub fn new(broker_id: u32, block: u64) -> Result<ProducerIds, String> {
        if u64::from(broker_id) >= 1 << BROKER_BITS {
            return Err(format!(
                "broker_id {broker_id} is too large for producer ids (at most {})",
                (1u64 << BROKER_BITS) - 1
            ));
        }
        if block >= 1 << BLOCK_BITS {
            return Err(format!(
                "every producer-id block of this broker is used ({block}); \
                 remove the data directory's producer-id-block file only with a new broker id"
            ));
        }
        Ok(ProducerIds {
            base: (u64::from(broker_id) << (BLOCK_BITS + COUNTER_BITS)) | (block << COUNTER_BITS),
            next: AtomicU64::new(0),
        })
    }

    /// A new producer id, or `None` once this run's block is used up.
    pub fn allocate(&self) -> Option<u64> {
        let counter = self.next.fetch_add(1, Ordering::Relaxed);
        (counter < IDS_PER_RUN).then_some(self.base | counter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_per_broker_and_block_and_never_none() {
        let a = ProducerIds::new(1, 0).expect("ids");
        let b = ProducerIds::new(2, 0).expect("ids");
        let c = ProducerIds::new(1, 1).expect("ids");
        let ids = [a.allocate(), a.allocate(), b.allocate(), c.allocate()];
        let mut unique: Vec<u64> = ids.iter().map(|i| i.expect("an id")).collect();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 4, "{ids:?}");
        let last = ProducerIds::new(u32::from(u16::MAX), (1 << BLOCK_BITS) - 1).expect("ids");
        last.next.store(IDS_PER_RUN - 1, Ordering::Relaxed);
        assert_ne!(last.allocate(), Some(u64::MAX));
        assert_eq!(last.allocate(), None, "the block is used up");
        assert!(ProducerIds::new(1 << 16, 0).is_err());
        assert!(ProducerIds::new(1, 1 << BLOCK_BITS).is_err());
    }
}
