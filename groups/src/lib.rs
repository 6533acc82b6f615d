//! Wharf consumer groups (DESIGN §7), sans-IO: the state a group coordinator keeps for one
//! group (members, KIP-848 style incremental assignment, committed offsets) as a state machine
//! that returns the records to persist, and the partition assignors as pure functions.
//!
//! No async, no clock, no randomness: time arrives as `now_ms`, member ids come from the
//! clients, persistence leaves as [`GroupRecord`]s the coordinator writes to the internal
//! offsets topic and replays on failover.

pub mod assignor;
pub mod group;

pub use assignor::{Assignment, Assignor, TopicPartition};
pub use group::{
    Commit, CommitError, CommittedOffset, Group, GroupConfig, GroupRecord, Heartbeat,
    HeartbeatAnswer, HeartbeatError, MemberState, RecordKey, JOIN_EPOCH, LEAVE_EPOCH,
    STATIC_LEAVE_EPOCH,
};
