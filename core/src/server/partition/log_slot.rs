//! Where the partition keeps its log: a cell no borrow of which ever spans an await. A
//! maintenance operation (truncation, reset, retention), holding the write side of the
//! partition's `maintenance` lock, takes the log out of the cell for as long as it needs it.

use std::cell::{Ref, RefCell, RefMut};

use wharf_storage::PartitionLog;

use super::PartitionError;
use crate::dma_disk::DmaDisk;
use crate::protocol::ErrorCode;

/// The partition's log, or nothing while a maintenance operation holds it (see the module
/// docs). Borrows of the slot are synchronous; the taken log is owned by the maintenance task.
pub(super) struct LogSlot(RefCell<Option<PartitionLog<DmaDisk>>>);

impl LogSlot {
    pub(super) fn new(log: PartitionLog<DmaDisk>) -> LogSlot {
        LogSlot(RefCell::new(Some(log)))
    }

    pub(super) fn get(&self) -> Option<Ref<'_, PartitionLog<DmaDisk>>> {
        Ref::filter_map(self.0.borrow(), Option::as_ref).ok()
    }

    pub(super) fn get_mut(&self) -> Option<RefMut<'_, PartitionLog<DmaDisk>>> {
        RefMut::filter_map(self.0.borrow_mut(), Option::as_mut).ok()
    }

    /// Takes the log out until the returned guard drops (also when its task is cancelled).
    pub(super) fn take(&self) -> Option<TakenLog<'_>> {
        let log = self.0.borrow_mut().take()?;
        Some(TakenLog {
            slot: self,
            log: Some(log),
        })
    }
}

/// The log taken out of its slot by a maintenance operation; put back on drop.
pub(super) struct TakenLog<'a> {
    slot: &'a LogSlot,
    log: Option<PartitionLog<DmaDisk>>,
}

impl std::ops::Deref for TakenLog<'_> {
    type Target = PartitionLog<DmaDisk>;
    fn deref(&self) -> &Self::Target {
        self.log.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for TakenLog<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.log.as_mut().expect("present until dropped")
    }
}

impl Drop for TakenLog<'_> {
    fn drop(&mut self) {
        *self.slot.0.borrow_mut() = self.log.take();
    }
}

pub(super) fn log_busy() -> PartitionError {
    PartitionError::new(
        ErrorCode::PartitionUnavailable,
        "the log is under maintenance (truncation, reset or retention); retry",
    )
}
