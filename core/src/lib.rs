//! Wharf broker shell: the glommio side of Wharf — shards, network, wire protocol, client library
//! and CLI. See `docs/architecture.md`.

pub mod cli;
pub mod client;
pub mod config;
pub mod dma_disk;
pub mod metadata;
pub mod peer_auth;
pub mod protocol;
pub mod runtime;
pub mod server;
