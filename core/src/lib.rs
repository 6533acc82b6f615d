//! Wharf broker shell: the glommio side of Wharf — shards, network, wire protocol, client library
//! and CLI. See `docs/architecture.md`.

pub mod dma_disk;
pub mod protocol;
pub mod runtime;
