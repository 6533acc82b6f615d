//! Wharf broker shell: the glommio side of Wharf.
//!
//! Today this crate holds the DMA implementation of the storage `Disk` trait ([`dma_disk`]) and a
//! minimal `wharf` binary. The shard runtime, network protocol, client library and CLI come with
//! the single-node broker issue.

pub mod dma_disk;
pub mod runtime;
