//! The Wharf cluster controller: cluster metadata kept by a Raft quorum of controller voters
//! (raft-rs `RawNode`), as a sans-IO crate. No glommio, no clock (time arrives as `now_ms`), no
//! files (all I/O goes through [`wharf_storage::disk::Disk`] in [`store`]), no unseeded
//! randomness (see [`node::ControllerConfig::raft_config`] for election timeouts).
//!
//! Modules:
//! - [`records`]: the metadata records (raft entries carry batches of them, JSON) and the
//!   [`records::ClusterImage`] they build.
//! - [`decisions`]: pure controller decisions (fence, register, AlterPartition, controlled
//!   shutdown, create/delete topic) returning records.
//! - [`node`]: [`node::ControllerNode`], one voter.
//! - [`store`]: [`store::ControllerStore`], the voter's durable raft log, hard state and snapshot.
//!
//! The driver (on one shard) owns a node and its store and loops:
//!
//! 1. Feed inputs: [`node::ControllerNode::tick`] with the time, [`node::ControllerNode::step`]
//!    with raft messages from peers, [`node::ControllerNode::heartbeat`] for brokers (answered
//!    at once; registrations and fences become proposals), `propose_*` for admin requests and
//!    partition leaders (a [`node::ProposalId`] now, the outcome later). Inputs are queued;
//!    they reach raft at the next `ready`.
//! 2. `let ready = node.ready()` (until it returns `None`). The node hands inputs to raft,
//!    decides queued requests (as the active controller, in one batch entry at a time, against
//!    its fully applied image), takes a snapshot every `snapshot_every_entries`, and collects
//!    raft's `Ready`: committed entries are applied to the image right away.
//! 3. Persist `ready.persist` with [`store::ControllerStore::persist`]; it returns once synced.
//!    On an error the store is poisoned: stop and restart the voter from the store.
//! 4. Send `ready.messages` to the other voters (after the persist: raft-rs's rule for votes and
//!    append responses; the leader's appends wait too, which costs one fsync of latency).
//! 5. Hand `ready.applied` (committed records) and `ready.completed` (proposal outcomes) on.
//! 6. `node.advance(ready.token())`: raft learns the batch is durable (raft-rs `advance`); the
//!    messages and commits that follow come out of the next `ready`.
//!
//! Brokers catch up with [`node::ControllerNode::records_since`] (carried by heartbeat
//! replies): the records after their applied index, or the whole image once the log is
//! compacted past it.

pub mod decisions;
mod mirror;
pub mod node;
pub mod records;
pub mod store;
