//! Wharf storage: the partition log and its record format.
//!
//! Sans-IO: no glommio, no `std::fs`, no clock, no unseeded randomness. All I/O goes through the
//! [`disk::Disk`] trait (glommio DMA files in `wharf`, [`mem_disk::MemDisk`] in tests); time
//! enters as `now_ms` arguments. See `storage/README.md` for the on-disk format and the
//! durability contract of each write API.

pub mod batch;
pub mod checkpoint;
#[cfg(feature = "testing")]
pub mod conformance;
pub mod disk;
mod flush;
pub mod ids;
pub mod index;
pub mod log;
#[cfg(feature = "testing")]
pub mod mem_disk;
pub mod policy;
mod read;
pub mod recovery;

pub use ids::{Epoch, Offset, ProducerId};
pub use log::{AppendMode, Appended, LogConfig, PartitionLog, ResetError};
pub use recovery::{OpenError, RecoveryReport};
