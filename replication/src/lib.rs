//! Wharf replication: the sans-IO replica state machine (DESIGN §5): pull-based replication,
//! the high watermark, the ISR, per-request ack levels and leader-epoch truncation.
//!
//! No async, no glommio, no clock, no randomness: time arrives as `Input::Tick`, I/O leaves as
//! `Output`s that the driver (`wharf`'s partition driver, or the simulator in `wharf-tests`)
//! carries out and reports back.

pub mod driver;
pub mod epochs;
pub mod isr;
pub mod producers;
pub mod replica;
pub mod selector;

pub use epochs::{EpochHistory, EpochHistoryError, EpochHistoryLoadError};
pub use isr::{IsrRejection, ISR_PROPOSAL_RETRY_MS};
pub use replica::{
    high_watermark, Ack, AckLevel, BatchInfo, BrokerId, FetchError, FetchReply, FetchRequest,
    Input, LogState, Outbox, Output, ProduceError, Replica, ReplicaConfig, ReplicaConfigError,
    Role, WaiterId, CORRUPT_FETCH_BACKOFF_MS, REPLICAS_MAX, WAITERS_MAX,
};
