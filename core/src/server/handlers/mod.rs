//! The handlers of the client and inter-broker APIs, one module per API family. Each takes the
//! decoded request from `super::dispatch` and returns the future of its response; a partition
//! another shard owns is reached through `Shard::to_shard` (`super::shard`). The topic
//! administration APIs (create, delete, apply) are handled by `super::control`.

mod fetch;
mod metadata;
mod offsets;
mod peer_auth;
mod produce;
mod replica_fetch;

use super::partition::PartitionError;
use crate::protocol::ErrorCode;

/// Upper bounds on list sizes in one request.
const PARTITIONS_PER_REQUEST_MAX: usize = 10_000;

fn unavailable(message: &str) -> PartitionError {
    PartitionError::new(ErrorCode::ShuttingDown, message)
}
