//! Wharf queues, sans-IO: the state a broker keeps for one queue group on one topic partition
//! (KIP-932 share-partition style) as a state machine that returns the records to persist, and
//! the redelivery [`Backoff`] policy as a pure function.
//!
//! A queue group consumes a topic like a work queue: any member may receive any record, each
//! record is acquired under a lease by one member at a time and settled one by one (ack, nack,
//! reject), and records that keep failing are copied to a dead-letter topic.
//!
//! The request flow, as the broker drives it:
//!
//! 1. On leadership the broker rebuilds the [`QueuePartition`] with [`QueuePartition::replay`]
//!    from its state log (which always begins with a [`QueueRecord::Snapshot`]), or creates it
//!    with [`QueuePartition::new`] and writes its [`QueuePartition::snapshot`] first.
//! 2. A fetch calls [`QueuePartition::acquire`] with the log's records from
//!    [`QueuePartition::end_offset`] onward; it hands out redeliveries and new records.
//! 3. Acks, nacks, rejects and lease extensions carry the delivery attempt they settle; a stale
//!    one is refused and changes nothing.
//! 4. A timer calls [`QueuePartition::expire`] at [`QueuePartition::next_deadline_ms`].
//! 5. Dead-letter instructions ([`DeadLetter`]) are carried out by the broker (a copy to the
//!    dead-letter topic), then confirmed with [`QueuePartition::confirm_dead_lettered`].
//!
//! Every operation returns [`QueueRecord`]s: the broker writes them to the replicated state log
//! (each operation's records as one batch) before it answers or delivers anything.
//!
//! No async, no clock, no randomness: time arrives as `now_ms`, jitter as a caller-supplied
//! random `u64`.

pub mod backoff;
pub mod partition;

pub use backoff::{Backoff, BackoffError, BACKOFF_DELAYS_MAX, MULTIPLIER_PERMILLE_MAX};
pub use partition::{
    AckError, AcquireError, Acquired, Acquisition, Changes, ConfigError, ConfirmError, DeadLetter,
    DeadLetterReason, Delivery, DeliveryFailure, ExtendError, KeyOrdering, NackError, NackOptions,
    QueueConfig, QueuePartition, QueueRecord, RecordState, RejectError, ReplayError, StaleDelivery,
    TrackedRecord, CANDIDATES_MAX, DELIVERIES_MAX, IN_FLIGHT_RECORDS_MAX, MEMBER_ID_BYTES_MAX,
    NACK_DELAY_MS_MAX, REJECT_REASON_BYTES_MAX, TRACKED_PER_RECORD_MAX, WINDOW_RECORDS_MAX,
};
