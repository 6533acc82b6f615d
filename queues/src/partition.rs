//! One queue group's state on one topic partition (KIP-932 share-partition style).
//!
//! ```text
//!   offsets:  ... done | start_offset                                 end_offset | untracked ...
//!                      [ A  Q  a  D  A  .  a  q  A  ...  (the window)          )
//!   A acquired   Q available   a acked   D dead-lettering   q dead-lettered   . not in the log
//! ```
//!
//! 1. Every record below `start_offset` is done (acked or dead-lettered): nothing is kept for
//!    it. The record at `start_offset` is the oldest not yet done.
//! 2. The window holds every log record in `[start_offset, end_offset)` with its state and key
//!    hash; offsets in that range missing from the window are not in the log (compacted
//!    away) and count as done. It holds at most `window_records_max` records: when the
//!    oldest record is stuck (a slow consumer, a long backoff), new records stop being
//!    handed out once the window is full, so the state stays bounded.
//! 3. Records at or above `end_offset` were never handed out. [`QueuePartition::acquire`]
//!    takes them from the caller's read of the log (the candidates) and tracks them.
//! 4. A record moves Available -> Acquired (one member, one attempt, a lease) -> Acked, back to
//!    Available (nack, lease expiry; after a backoff), or to DeadLettering (rejected, or out of
//!    deliveries) -> DeadLettered once the caller confirms the dead-letter copy is durable.
//! 5. `start_offset` advances over done records and the window forgets them.
//!
//! Every change is returned as [`QueueRecord`]s; [`QueuePartition::replay`] rebuilds the exact
//! state from them, and [`QueuePartition::snapshot`] returns records that alone rebuild it.

use std::collections::{BTreeMap, BTreeSet};

use crate::backoff::{Backoff, BackoffError};

/// Tracked records per partition: the most records in `[start_offset, end_offset)` the state
/// holds at once (each a few dozen bytes, so a few MiB per partition at worst).
pub const WINDOW_RECORDS_MAX: usize = 65_536;
/// Records acquired at once on one partition (the `in_flight_max` configuration's ceiling).
pub const IN_FLIGHT_RECORDS_MAX: usize = 16_384;
/// The largest `max_deliveries` a queue may be configured with.
pub const DELIVERIES_MAX: u32 = 1_000;
/// Candidates one acquire may pass (more than the window could ever take).
pub const CANDIDATES_MAX: usize = WINDOW_RECORDS_MAX;
/// Records one [`QueueRecord::Tracked`] carries: a large read or a snapshot is split so no
/// single state-log record grows beyond a few tens of KiB.
pub const TRACKED_PER_RECORD_MAX: usize = 1_024;
/// Bytes of a member id (chosen by the client).
pub const MEMBER_ID_BYTES_MAX: usize = 255;
/// Bytes of a reject reason (copied into the dead-letter record's headers).
pub const REJECT_REASON_BYTES_MAX: usize = 1_024;
/// The longest explicit nack delay: a week. Longer parks belong in a scheduled-delivery
/// feature, not in a lease table.
pub const NACK_DELAY_MS_MAX: u64 = 7 * 24 * 3_600 * 1_000;

const _: () = assert!(IN_FLIGHT_RECORDS_MAX <= WINDOW_RECORDS_MAX);
const _: () = assert!(TRACKED_PER_RECORD_MAX <= WINDOW_RECORDS_MAX);
const _: () = assert!(CANDIDATES_MAX >= WINDOW_RECORDS_MAX);

/// Whether records that share a key may be in flight together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyOrdering {
    /// Any available record may be handed out.
    Unordered,
    /// A record is handed out only once every earlier record with its key is done, so one key
    /// is never in flight twice and its records are processed in log order.
    PerKey,
}

/// The queue's knobs for one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// The lease: how long a member holds a record before it is delivered again.
    pub ack_wait_ms: u64,
    /// Deliveries a record gets; when the last one fails, the record is dead-lettered.
    pub max_deliveries: u32,
    /// Records acquired at once on this partition.
    pub in_flight_max: usize,
    /// Records tracked at once (at most [`WINDOW_RECORDS_MAX`]); lower only to test the limit.
    pub window_records_max: usize,
    pub key_ordering: KeyOrdering,
    pub backoff: Backoff,
}

impl Default for QueueConfig {
    fn default() -> QueueConfig {
        QueueConfig {
            ack_wait_ms: 30_000,
            max_deliveries: 5,
            in_flight_max: 1_000,
            window_records_max: WINDOW_RECORDS_MAX,
            key_ordering: KeyOrdering::Unordered,
            backoff: Backoff::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("ack_wait_ms must be above 0")]
    AckWaitZero,
    #[error("max_deliveries {max_deliveries} is outside 1..={limit}")]
    MaxDeliveries { max_deliveries: u32, limit: u32 },
    #[error("in_flight_max {in_flight_max} is outside 1..={limit}")]
    InFlightMax { in_flight_max: usize, limit: usize },
    #[error("window_records_max {window_records_max} is outside in_flight_max..={limit}")]
    WindowRecordsMax {
        window_records_max: usize,
        limit: usize,
    },
    #[error(transparent)]
    Backoff(#[from] BackoffError),
}

impl QueueConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ack_wait_ms == 0 {
            return Err(ConfigError::AckWaitZero);
        }
        if !(1..=DELIVERIES_MAX).contains(&self.max_deliveries) {
            return Err(ConfigError::MaxDeliveries {
                max_deliveries: self.max_deliveries,
                limit: DELIVERIES_MAX,
            });
        }
        if !(1..=IN_FLIGHT_RECORDS_MAX).contains(&self.in_flight_max) {
            return Err(ConfigError::InFlightMax {
                in_flight_max: self.in_flight_max,
                limit: IN_FLIGHT_RECORDS_MAX,
            });
        }
        // A window smaller than the in-flight limit would make that limit unreachable.
        if !(self.in_flight_max..=WINDOW_RECORDS_MAX).contains(&self.window_records_max) {
            return Err(ConfigError::WindowRecordsMax {
                window_records_max: self.window_records_max,
                limit: WINDOW_RECORDS_MAX,
            });
        }
        self.backoff.validate()?;
        Ok(())
    }
}

/// Why a delivery attempt failed (named in the dead-letter headers as the last reason).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeliveryFailure {
    Nacked,
    LeaseExpired,
}

/// Why a record went to the dead-letter topic.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeadLetterReason {
    /// Its last allowed delivery failed this way.
    MaxDeliveries { last: DeliveryFailure },
    /// A consumer rejected it, with its reason.
    Rejected(String),
}

/// A record's state in the window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordState {
    /// May be handed out once `now_ms >= not_before_ms`.
    Available {
        delivery_count: u32,
        not_before_ms: u64,
    },
    /// Held by `member` for its delivery number `delivery_count` until `lease_until_ms`.
    Acquired {
        member: String,
        delivery_count: u32,
        lease_until_ms: u64,
    },
    Acked,
    /// Bound for the dead-letter topic: the caller copies it there and then confirms. Until
    /// then it is neither deliverable nor done, so a crash between the copy and the
    /// confirmation re-issues the copy (at least once) instead of losing the record.
    DeadLettering {
        delivery_count: u32,
        reason: DeadLetterReason,
    },
    DeadLettered,
}

impl RecordState {
    /// Acked or dead-lettered: nothing more will happen to it.
    pub fn is_done(&self) -> bool {
        matches!(self, RecordState::Acked | RecordState::DeadLettered)
    }
}

/// A record entering the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrackedRecord {
    pub offset: u64,
    /// A hash of the record's key, for per-key ordering; `None` for a record without a key.
    pub key_hash: Option<u64>,
}

/// What the caller writes to the queue's state log. Replayed in order they rebuild the state;
/// the log always begins with a [`QueueRecord::Snapshot`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum QueueRecord {
    /// Forget everything: the state is empty with `start_offset = end_offset = start_offset`.
    /// The records after it (from [`QueuePartition::snapshot`]) fill the window again.
    Snapshot {
        start_offset: u64,
    },
    /// New records entered the window as available (never delivered); `end_offset` moves past
    /// the last. Offsets skipped between the old end and the last are not in the log.
    Tracked {
        records: Vec<TrackedRecord>,
    },
    Acquired {
        offset: u64,
        member: String,
        delivery_count: u32,
        lease_until_ms: u64,
    },
    LeaseExtended {
        offset: u64,
        lease_until_ms: u64,
    },
    /// Back to available after a failed delivery (nack, lease expiry).
    Released {
        offset: u64,
        delivery_count: u32,
        not_before_ms: u64,
    },
    Acked {
        offset: u64,
    },
    DeadLettering {
        offset: u64,
        delivery_count: u32,
        reason: DeadLetterReason,
    },
    DeadLettered {
        offset: u64,
    },
    /// Every record below `start_offset` is done and forgotten.
    StartAdvanced {
        start_offset: u64,
    },
}

/// One record handed to a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acquired {
    pub offset: u64,
    /// 1 for the first delivery. The member sends it back with its ack, nack, reject or
    /// extend, so a settlement for an older delivery cannot settle this one.
    pub delivery_attempt: u32,
    pub lease_until_ms: u64,
}

/// What [`QueuePartition::acquire`] hands out: persist `records` before delivering `acquired`
/// (otherwise a crash would hand the same attempt number out twice).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct Acquisition {
    pub acquired: Vec<Acquired>,
    pub records: Vec<QueueRecord>,
}

/// The caller's instruction: copy the record at `offset` to the dead-letter topic (headers:
/// original topic, partition, offset, delivery count, reason), then call
/// [`QueuePartition::confirm_dead_lettered`] once the copy is durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    pub offset: u64,
    pub delivery_count: u32,
    pub reason: DeadLetterReason,
}

/// The result of an operation that may dead-letter records: persist `records` first, then
/// carry out `dead_letters`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct Changes {
    pub records: Vec<QueueRecord>,
    pub dead_letters: Vec<DeadLetter>,
}

/// The delivery a settlement refers to: who got which record at which attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery<'a> {
    pub member: &'a str,
    pub offset: u64,
    pub delivery_attempt: u32,
}

/// The arguments of a nack besides the delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NackOptions {
    /// Deliver again after this long; `None` uses the backoff policy for the attempt.
    pub delay_ms: Option<u64>,
    pub now_ms: u64,
    /// A random sample for the backoff's jitter.
    pub jitter_sample: u64,
}

/// Why a settlement does not match the record's current delivery. Nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StaleDelivery {
    /// The record is not acquired by anyone (done, available, dead-lettering, or not tracked):
    /// the lease expired and was reclaimed, or the delivery was already settled.
    #[error("record {offset} is not acquired")]
    NotAcquired { offset: u64 },
    #[error("record {offset} is acquired by another member")]
    OtherMember { offset: u64 },
    /// The record was delivered again since the delivery this settlement is for.
    #[error("record {offset} is at delivery attempt {current}, not {sent}")]
    AttemptMismatch {
        offset: u64,
        sent: u32,
        current: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AcquireError {
    #[error("member id of {bytes} bytes (1 to {MEMBER_ID_BYTES_MAX})")]
    InvalidMemberId { bytes: usize },
    #[error("{count} candidates (limit {CANDIDATES_MAX})")]
    TooManyCandidates { count: usize },
    #[error("candidate offsets must be strictly ascending: {offset} after {previous}")]
    CandidatesNotAscending { previous: u64, offset: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("ack refused, nothing changed: {0}")]
    Stale(#[from] StaleDelivery),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NackError {
    #[error("nack refused, nothing changed: {0}")]
    Stale(#[from] StaleDelivery),
    #[error("nack delay {delay_ms} ms is above {NACK_DELAY_MS_MAX} ms")]
    DelayTooLong { delay_ms: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RejectError {
    #[error("reject refused, nothing changed: {0}")]
    Stale(#[from] StaleDelivery),
    #[error("reject reason of {bytes} bytes (limit {REJECT_REASON_BYTES_MAX})")]
    ReasonTooLong { bytes: usize },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExtendError {
    #[error("extend refused, nothing changed: {0}")]
    Stale(#[from] StaleDelivery),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfirmError {
    /// Already confirmed (a duplicate confirmation), or never bound for the dead-letter topic.
    #[error("record {offset} is not awaiting its dead-letter copy")]
    NotDeadLettering { offset: u64 },
}

/// A state log that does not describe a valid state (corruption or a bug in its writer).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the state log does not begin with a snapshot")]
    NoSnapshot,
    #[error("state record {index} ({record:?}) does not apply: {why}")]
    Inconsistent {
        index: usize,
        record: Box<QueueRecord>,
        why: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    key_hash: Option<u64>,
    state: RecordState,
}

/// The queue state of one queue group on one topic partition.
#[derive(Clone, Debug)]
pub struct QueuePartition {
    config: QueueConfig,
    start_offset: u64,
    end_offset: u64,
    window: BTreeMap<u64, Entry>,
    /// Records in the Acquired state (kept in step with the window; checked by
    /// [`QueuePartition::check_invariants`]).
    in_flight: usize,
    /// Metrics, not state: deliveries handed out by this process, by attempt (index 0 = first
    /// deliveries, the rest are redeliveries). Not persisted, like any process counter.
    deliveries_by_attempt: Vec<u64>,
}

impl QueuePartition {
    /// An empty queue whose first record to deliver is `start_offset`. Write its
    /// [`QueuePartition::snapshot`] to the state log first: replay starts from a snapshot.
    pub fn new(config: QueueConfig, start_offset: u64) -> Result<QueuePartition, ConfigError> {
        config.validate()?;
        let deliveries_max = usize::try_from(config.max_deliveries).unwrap_or(usize::MAX);
        Ok(QueuePartition {
            config,
            start_offset,
            end_offset: start_offset,
            window: BTreeMap::new(),
            in_flight: 0,
            deliveries_by_attempt: vec![0; deliveries_max],
        })
    }

    /// Rebuilds the state from its log (in order, starting with a snapshot). A record that
    /// does not apply to the state before it is an error: the log is corrupt.
    pub fn replay(
        config: QueueConfig,
        records: impl IntoIterator<Item = QueueRecord>,
    ) -> Result<QueuePartition, ReplayError> {
        let mut partition = QueuePartition::new(config, 0)?;
        for (index, record) in records.into_iter().enumerate() {
            if index == 0 && !matches!(record, QueueRecord::Snapshot { .. }) {
                return Err(ReplayError::NoSnapshot);
            }
            if let Err(why) = partition.apply(&record) {
                return Err(ReplayError::Inconsistent {
                    index,
                    record: Box::new(record),
                    why,
                });
            }
        }
        partition.check_invariants();
        Ok(partition)
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Every record below is done.
    pub fn start_offset(&self) -> u64 {
        self.start_offset
    }

    /// Records from here on were never handed out: the caller reads its acquire candidates
    /// from here.
    pub fn end_offset(&self) -> u64 {
        self.end_offset
    }

    /// Records tracked now (at most `window_records_max`).
    pub fn window_len(&self) -> usize {
        self.window.len()
    }

    /// The state of a tracked record; `None` below `start_offset` (done), at or above
    /// `end_offset` (never delivered) and for offsets not in the log.
    pub fn record_state(&self, offset: u64) -> Option<&RecordState> {
        self.window.get(&offset).map(|entry| &entry.state)
    }

    /// Records acquired now.
    pub fn in_flight_count(&self) -> usize {
        self.in_flight
    }

    /// Tracked records waiting for a (re)delivery, whether or not their backoff has passed.
    /// Records at or above `end_offset` are available too but not counted here.
    pub fn available_count(&self) -> usize {
        self.count(|state| matches!(state, RecordState::Available { .. }))
    }

    /// Records waiting for their dead-letter copy to be confirmed.
    pub fn dead_lettering_count(&self) -> usize {
        self.count(|state| matches!(state, RecordState::DeadLettering { .. }))
    }

    /// The oldest record not yet done (for the "oldest unacked record age" metric: the caller
    /// looks up its timestamp). `None` when every tracked record is done; the oldest then is
    /// the first at or after `end_offset`, if the log has one.
    pub fn oldest_pending_offset(&self) -> Option<u64> {
        self.window.keys().next().copied()
    }

    /// Deliveries handed out since this process loaded the partition, by attempt: index 0
    /// counts first deliveries, index n counts deliveries with attempt n + 1 (redeliveries).
    pub fn deliveries_by_attempt(&self) -> &[u64] {
        &self.deliveries_by_attempt
    }

    /// The earliest lease deadline: call [`QueuePartition::expire`] then.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.window
            .values()
            .filter_map(|entry| match entry.state {
                RecordState::Acquired { lease_until_ms, .. } => Some(lease_until_ms),
                _ => None,
            })
            .min()
    }

    /// The earliest time after `now_ms` at which a waiting record becomes deliverable (to
    /// wake consumers that found nothing).
    pub fn next_available_ms(&self, now_ms: u64) -> Option<u64> {
        self.window
            .values()
            .filter_map(|entry| match entry.state {
                RecordState::Available { not_before_ms, .. } if not_before_ms > now_ms => {
                    Some(not_before_ms)
                }
                _ => None,
            })
            .min()
    }

    /// The dead-letter copies not yet confirmed: after a restart the caller carries these out
    /// again (the copy may then exist twice in the dead-letter topic: at least once).
    pub fn pending_dead_letters(&self) -> Vec<DeadLetter> {
        self.window
            .iter()
            .filter_map(|(&offset, entry)| match &entry.state {
                RecordState::DeadLettering {
                    delivery_count,
                    reason,
                } => Some(DeadLetter {
                    offset,
                    delivery_count: *delivery_count,
                    reason: reason.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    /// Hands `member` up to `max_records` deliverable records, lowest offsets first, within
    /// the in-flight and window limits. `candidates` are the log's records (offset, key hash)
    /// as the caller read them from [`QueuePartition::end_offset`] onward, ascending; offsets
    /// the read skipped are not in the log (compacted). Candidates below `end_offset` are
    /// ignored: those records are tracked already.
    pub fn acquire(
        &mut self,
        member: &str,
        now_ms: u64,
        max_records: usize,
        candidates: &[(u64, Option<u64>)],
    ) -> Result<Acquisition, AcquireError> {
        validate_member(member).map_err(|bytes| AcquireError::InvalidMemberId { bytes })?;
        if candidates.len() > CANDIDATES_MAX {
            return Err(AcquireError::TooManyCandidates {
                count: candidates.len(),
            });
        }
        for pair in candidates.windows(2) {
            if pair[1].0 <= pair[0].0 {
                return Err(AcquireError::CandidatesNotAscending {
                    previous: pair[0].0,
                    offset: pair[1].0,
                });
            }
        }
        let room = max_records.min(self.config.in_flight_max.saturating_sub(self.in_flight));
        let mut acquisition = Acquisition::default();
        if room == 0 {
            return Ok(acquisition);
        }
        let per_key = self.config.key_ordering == KeyOrdering::PerKey;
        // Keys of not-done records seen so far in offset order: a later record of such a key
        // must wait (the earlier one is in flight, waiting for a redelivery, or dead-lettering).
        let mut keys_blocked: BTreeSet<u64> = BTreeSet::new();
        let mut picked: Vec<u64> = Vec::new();
        // 1. Tracked records: redeliveries, and records skipped earlier for their key.
        for (&offset, entry) in &self.window {
            if picked.len() == room {
                break;
            }
            if entry.state.is_done() {
                continue;
            }
            let key_free = !per_key || entry.key_hash.is_none_or(|k| !keys_blocked.contains(&k));
            if let RecordState::Available { not_before_ms, .. } = entry.state {
                if not_before_ms <= now_ms && key_free {
                    picked.push(offset);
                }
            }
            if let Some(key) = entry.key_hash {
                keys_blocked.insert(key);
            }
        }
        // 2. New records from the log, while the window has room. Skipped ones before the
        // last pick are tracked too (as available), so `end_offset` can move past them.
        let mut tracked: Vec<TrackedRecord> = Vec::new();
        let mut tracked_until_pick = 0;
        for &(offset, key_hash) in candidates {
            if picked.len() == room
                || self.window.len() + tracked.len() >= self.config.window_records_max
            {
                break;
            }
            if offset < self.end_offset {
                continue;
            }
            tracked.push(TrackedRecord { offset, key_hash });
            let key_free = !per_key || key_hash.is_none_or(|k| !keys_blocked.contains(&k));
            if key_free {
                picked.push(offset);
                tracked_until_pick = tracked.len();
            }
            if let Some(key) = key_hash {
                keys_blocked.insert(key);
            }
        }
        // Records after the last pick stay untracked: a later read finds them again.
        tracked.truncate(tracked_until_pick);
        for chunk in tracked.chunks(TRACKED_PER_RECORD_MAX) {
            let record = QueueRecord::Tracked {
                records: chunk.to_vec(),
            };
            self.apply_live(&record);
            acquisition.records.push(record);
        }
        let lease_until_ms = now_ms.saturating_add(self.config.ack_wait_ms);
        for offset in picked {
            let delivery_count = match self.window.get(&offset).map(|entry| &entry.state) {
                Some(RecordState::Available { delivery_count, .. }) => delivery_count + 1,
                other => unreachable!("picked record {offset} in state {other:?}"),
            };
            let record = QueueRecord::Acquired {
                offset,
                member: member.to_string(),
                delivery_count,
                lease_until_ms,
            };
            self.apply_live(&record);
            acquisition.records.push(record);
            acquisition.acquired.push(Acquired {
                offset,
                delivery_attempt: delivery_count,
                lease_until_ms,
            });
            let index = usize::try_from(delivery_count - 1).unwrap_or(usize::MAX);
            if let Some(counter) = self.deliveries_by_attempt.get_mut(index) {
                *counter += 1;
            }
        }
        self.advance_start(&mut acquisition.records);
        assert!(acquisition.acquired.len() <= room);
        assert!(self.in_flight <= self.config.in_flight_max);
        Ok(acquisition)
    }

    /// The member processed the record: it is done.
    pub fn ack(&mut self, delivery: Delivery<'_>) -> Result<Vec<QueueRecord>, AckError> {
        self.check_delivery(delivery)?;
        let mut records = Vec::new();
        self.push_live(
            &mut records,
            QueueRecord::Acked {
                offset: delivery.offset,
            },
        );
        self.advance_start(&mut records);
        Ok(records)
    }

    /// The member could not process the record now: deliver it again after the explicit delay
    /// or the backoff for this attempt, or dead-letter it when this was its last delivery.
    pub fn nack(
        &mut self,
        delivery: Delivery<'_>,
        options: NackOptions,
    ) -> Result<Changes, NackError> {
        if let Some(delay_ms) = options.delay_ms {
            if delay_ms > NACK_DELAY_MS_MAX {
                return Err(NackError::DelayTooLong { delay_ms });
            }
        }
        let delivery_count = self.check_delivery(delivery)?;
        let mut changes = Changes::default();
        let delay_ms = options.delay_ms.unwrap_or_else(|| {
            self.config
                .backoff
                .delay_ms(delivery_count, options.jitter_sample)
        });
        self.fail_delivery(
            delivery.offset,
            delivery_count,
            DeliveryFailure::Nacked,
            options.now_ms.saturating_add(delay_ms),
            &mut changes,
        );
        self.advance_start(&mut changes.records);
        Ok(changes)
    }

    /// The member will never be able to process the record: dead-letter it now.
    pub fn reject(
        &mut self,
        delivery: Delivery<'_>,
        reason: String,
    ) -> Result<Changes, RejectError> {
        if reason.len() > REJECT_REASON_BYTES_MAX {
            return Err(RejectError::ReasonTooLong {
                bytes: reason.len(),
            });
        }
        let delivery_count = self.check_delivery(delivery)?;
        let mut changes = Changes::default();
        self.dead_letter(
            delivery.offset,
            delivery_count,
            DeadLetterReason::Rejected(reason),
            &mut changes,
        );
        Ok(changes)
    }

    /// The member needs longer: its lease runs `ack_wait_ms` from `now_ms` (never shorter than
    /// it was). Returns the new deadline.
    pub fn extend(
        &mut self,
        delivery: Delivery<'_>,
        now_ms: u64,
    ) -> Result<(u64, Vec<QueueRecord>), ExtendError> {
        self.check_delivery(delivery)?;
        let Some(RecordState::Acquired { lease_until_ms, .. }) = self.record_state(delivery.offset)
        else {
            unreachable!("checked delivery {delivery:?} is not acquired");
        };
        let lease_until_ms = now_ms
            .saturating_add(self.config.ack_wait_ms)
            .max(*lease_until_ms);
        let mut records = Vec::new();
        self.push_live(
            &mut records,
            QueueRecord::LeaseExtended {
                offset: delivery.offset,
                lease_until_ms,
            },
        );
        Ok((lease_until_ms, records))
    }

    /// Reclaims every lease whose deadline has come (`lease_until_ms <= now_ms`): the record
    /// waits for the backoff of its attempt, or is dead-lettered after its last delivery.
    /// `jitter_sample` is mixed with each record's offset so records that expire together
    /// spread out. The next deadline is [`QueuePartition::next_deadline_ms`].
    pub fn expire(&mut self, now_ms: u64, jitter_sample: u64) -> Changes {
        let expired: Vec<(u64, u32)> = self
            .window
            .iter()
            .filter_map(|(&offset, entry)| match entry.state {
                RecordState::Acquired {
                    delivery_count,
                    lease_until_ms,
                    ..
                } if lease_until_ms <= now_ms => Some((offset, delivery_count)),
                _ => None,
            })
            .collect();
        let mut changes = Changes::default();
        for (offset, delivery_count) in expired {
            let delay_ms = self
                .config
                .backoff
                .delay_ms(delivery_count, mix64(jitter_sample ^ offset));
            self.fail_delivery(
                offset,
                delivery_count,
                DeliveryFailure::LeaseExpired,
                now_ms.saturating_add(delay_ms),
                &mut changes,
            );
        }
        self.advance_start(&mut changes.records);
        assert!(self
            .next_deadline_ms()
            .is_none_or(|deadline| deadline > now_ms));
        changes
    }

    /// The dead-letter copy of the record at `offset` is durable: the record is done.
    pub fn confirm_dead_lettered(&mut self, offset: u64) -> Result<Vec<QueueRecord>, ConfirmError> {
        if !matches!(
            self.record_state(offset),
            Some(RecordState::DeadLettering { .. })
        ) {
            return Err(ConfirmError::NotDeadLettering { offset });
        }
        let mut records = Vec::new();
        self.push_live(&mut records, QueueRecord::DeadLettered { offset });
        self.advance_start(&mut records);
        Ok(records)
    }

    /// Records that alone rebuild the state (what the caller writes before it deletes the
    /// state log below them).
    pub fn snapshot(&self) -> Vec<QueueRecord> {
        let mut records = vec![QueueRecord::Snapshot {
            start_offset: self.start_offset,
        }];
        let tracked: Vec<TrackedRecord> = self
            .window
            .iter()
            .map(|(&offset, entry)| TrackedRecord {
                offset,
                key_hash: entry.key_hash,
            })
            .collect();
        for chunk in tracked.chunks(TRACKED_PER_RECORD_MAX) {
            records.push(QueueRecord::Tracked {
                records: chunk.to_vec(),
            });
        }
        for (&offset, entry) in &self.window {
            let record = match &entry.state {
                // Tracked records start as never delivered: nothing more to say.
                RecordState::Available {
                    delivery_count: 0,
                    not_before_ms: 0,
                } => continue,
                &RecordState::Available {
                    delivery_count,
                    not_before_ms,
                } => QueueRecord::Released {
                    offset,
                    delivery_count,
                    not_before_ms,
                },
                RecordState::Acquired {
                    member,
                    delivery_count,
                    lease_until_ms,
                } => QueueRecord::Acquired {
                    offset,
                    member: member.clone(),
                    delivery_count: *delivery_count,
                    lease_until_ms: *lease_until_ms,
                },
                RecordState::Acked => QueueRecord::Acked { offset },
                RecordState::DeadLettering {
                    delivery_count,
                    reason,
                } => QueueRecord::DeadLettering {
                    offset,
                    delivery_count: *delivery_count,
                    reason: reason.clone(),
                },
                RecordState::DeadLettered => QueueRecord::DeadLettered { offset },
            };
            records.push(record);
        }
        records
    }

    /// Panics when the bookkeeping is inconsistent. O(window), so the operations keep to
    /// their own cheap checks and leave this to replay and to the tests, which run it after
    /// every step.
    pub fn check_invariants(&self) {
        assert!(self.window.len() <= WINDOW_RECORDS_MAX);
        assert!(self.start_offset <= self.end_offset);
        match (self.window.first_key_value(), self.window.last_key_value()) {
            (Some((&first, first_entry)), Some((&last, _))) => {
                assert_eq!(
                    first, self.start_offset,
                    "start is the oldest tracked record"
                );
                assert!(
                    !first_entry.state.is_done(),
                    "start must move past done records"
                );
                assert_eq!(
                    last.checked_add(1),
                    Some(self.end_offset),
                    "end follows the last"
                );
            }
            _ => assert_eq!(self.start_offset, self.end_offset, "an empty window"),
        }
        let mut in_flight = 0;
        // Per key: whether a not-done record of it came earlier in offset order.
        let mut keys_pending: BTreeSet<u64> = BTreeSet::new();
        for entry in self.window.values() {
            match &entry.state {
                RecordState::Available { delivery_count, .. } => {
                    assert!(*delivery_count <= DELIVERIES_MAX);
                }
                RecordState::Acquired {
                    member,
                    delivery_count,
                    ..
                } => {
                    in_flight += 1;
                    assert!(validate_member(member).is_ok());
                    assert!((1..=DELIVERIES_MAX).contains(delivery_count));
                    if self.config.key_ordering == KeyOrdering::PerKey {
                        if let Some(key) = entry.key_hash {
                            assert!(
                                !keys_pending.contains(&key),
                                "a record acquired while an earlier one of its key is not done"
                            );
                        }
                    }
                }
                RecordState::DeadLettering { delivery_count, .. } => {
                    assert!(*delivery_count <= DELIVERIES_MAX);
                }
                RecordState::Acked | RecordState::DeadLettered => {}
            }
            if !entry.state.is_done() {
                if let Some(key) = entry.key_hash {
                    keys_pending.insert(key);
                }
            }
        }
        assert_eq!(in_flight, self.in_flight, "in-flight count");
        assert!(self.in_flight <= IN_FLIGHT_RECORDS_MAX);
    }

    fn count(&self, which: impl Fn(&RecordState) -> bool) -> usize {
        self.window
            .values()
            .filter(|entry| which(&entry.state))
            .count()
    }

    /// Whether `delivery` is the record's current delivery; returns its attempt number.
    fn check_delivery(&self, delivery: Delivery<'_>) -> Result<u32, StaleDelivery> {
        let offset = delivery.offset;
        match self.record_state(offset) {
            Some(RecordState::Acquired {
                member,
                delivery_count,
                ..
            }) => {
                if member != delivery.member {
                    Err(StaleDelivery::OtherMember { offset })
                } else if *delivery_count != delivery.delivery_attempt {
                    Err(StaleDelivery::AttemptMismatch {
                        offset,
                        sent: delivery.delivery_attempt,
                        current: *delivery_count,
                    })
                } else {
                    Ok(*delivery_count)
                }
            }
            _ => Err(StaleDelivery::NotAcquired { offset }),
        }
    }

    /// A delivery failed (nack, lease expiry): wait until `not_before_ms`, or dead-letter the
    /// record when that was its last allowed delivery.
    fn fail_delivery(
        &mut self,
        offset: u64,
        delivery_count: u32,
        failure: DeliveryFailure,
        not_before_ms: u64,
        changes: &mut Changes,
    ) {
        if delivery_count >= self.config.max_deliveries {
            let reason = DeadLetterReason::MaxDeliveries { last: failure };
            self.dead_letter(offset, delivery_count, reason, changes);
        } else {
            let record = QueueRecord::Released {
                offset,
                delivery_count,
                not_before_ms,
            };
            self.push_live(&mut changes.records, record);
        }
    }

    fn dead_letter(
        &mut self,
        offset: u64,
        delivery_count: u32,
        reason: DeadLetterReason,
        changes: &mut Changes,
    ) {
        let record = QueueRecord::DeadLettering {
            offset,
            delivery_count,
            reason: reason.clone(),
        };
        self.push_live(&mut changes.records, record);
        changes.dead_letters.push(DeadLetter {
            offset,
            delivery_count,
            reason,
        });
    }

    /// Moves `start_offset` over the done records at the front of the window (and over the
    /// whole window when every tracked record is done).
    fn advance_start(&mut self, records: &mut Vec<QueueRecord>) {
        let start_offset = self
            .window
            .iter()
            .find(|(_, entry)| !entry.state.is_done())
            .map_or(self.end_offset, |(&offset, _)| offset);
        if start_offset != self.start_offset {
            self.push_live(records, QueueRecord::StartAdvanced { start_offset });
        }
    }

    fn push_live(&mut self, records: &mut Vec<QueueRecord>, record: QueueRecord) {
        self.apply_live(&record);
        records.push(record);
    }

    /// Applies a record this state machine just produced: it must apply.
    fn apply_live(&mut self, record: &QueueRecord) {
        if let Err(why) = self.apply(record) {
            panic!("a record of our own does not apply: {record:?}: {why}");
        }
    }

    /// The single place the state changes: live operations and replay both come through here,
    /// so the state log describes the state exactly.
    fn apply(&mut self, record: &QueueRecord) -> Result<(), String> {
        match record {
            &QueueRecord::Snapshot { start_offset } => {
                self.start_offset = start_offset;
                self.end_offset = start_offset;
                self.window.clear();
                self.in_flight = 0;
            }
            QueueRecord::Tracked { records } => {
                if records.is_empty() || records.len() > TRACKED_PER_RECORD_MAX {
                    return Err(format!("{} tracked records", records.len()));
                }
                if self.window.len() + records.len() > WINDOW_RECORDS_MAX {
                    return Err("the window would overflow".into());
                }
                let mut next_offset = self.end_offset;
                for tracked in records {
                    if tracked.offset < next_offset {
                        return Err(format!("offset {} below {next_offset}", tracked.offset));
                    }
                    next_offset = tracked.offset.checked_add(1).ok_or("offset overflow")?;
                }
                for tracked in records {
                    self.window.insert(
                        tracked.offset,
                        Entry {
                            key_hash: tracked.key_hash,
                            state: RecordState::Available {
                                delivery_count: 0,
                                not_before_ms: 0,
                            },
                        },
                    );
                }
                self.end_offset = next_offset;
            }
            QueueRecord::Acquired {
                offset,
                member,
                delivery_count,
                lease_until_ms,
            } => {
                if validate_member(member).is_err() {
                    return Err("invalid member id".into());
                }
                if !(1..=DELIVERIES_MAX).contains(delivery_count) {
                    return Err("delivery count out of range".into());
                }
                self.set_state(
                    *offset,
                    RecordState::Acquired {
                        member: member.clone(),
                        delivery_count: *delivery_count,
                        lease_until_ms: *lease_until_ms,
                    },
                )?;
            }
            &QueueRecord::LeaseExtended {
                offset,
                lease_until_ms: extended_ms,
            } => match self.window.get_mut(&offset).map(|entry| &mut entry.state) {
                Some(RecordState::Acquired { lease_until_ms, .. }) => *lease_until_ms = extended_ms,
                _ => return Err("not acquired".into()),
            },
            &QueueRecord::Released {
                offset,
                delivery_count,
                not_before_ms,
            } => {
                if delivery_count > DELIVERIES_MAX {
                    return Err("delivery count out of range".into());
                }
                let state = RecordState::Available {
                    delivery_count,
                    not_before_ms,
                };
                self.set_state(offset, state)?;
            }
            &QueueRecord::Acked { offset } => self.set_state(offset, RecordState::Acked)?,
            QueueRecord::DeadLettering {
                offset,
                delivery_count,
                reason,
            } => {
                if *delivery_count > DELIVERIES_MAX {
                    return Err("delivery count out of range".into());
                }
                let state = RecordState::DeadLettering {
                    delivery_count: *delivery_count,
                    reason: reason.clone(),
                };
                self.set_state(*offset, state)?;
            }
            &QueueRecord::DeadLettered { offset } => {
                self.set_state(offset, RecordState::DeadLettered)?;
            }
            &QueueRecord::StartAdvanced { start_offset } => {
                if start_offset < self.start_offset || start_offset > self.end_offset {
                    return Err(format!(
                        "start outside [{}, {}]",
                        self.start_offset, self.end_offset
                    ));
                }
                if let Some((offset, _)) = self
                    .window
                    .range(..start_offset)
                    .find(|(_, entry)| !entry.state.is_done())
                {
                    return Err(format!("record {offset} below the new start is not done"));
                }
                self.window = self.window.split_off(&start_offset);
                self.start_offset = start_offset;
            }
        }
        Ok(())
    }

    /// Sets a tracked, not-done record's state (done is final), keeping the in-flight count.
    fn set_state(&mut self, offset: u64, state: RecordState) -> Result<(), String> {
        let Some(entry) = self.window.get_mut(&offset) else {
            return Err(format!("record {offset} is not tracked"));
        };
        if entry.state.is_done() {
            return Err(format!("record {offset} is done"));
        }
        let was_acquired = matches!(entry.state, RecordState::Acquired { .. });
        let is_acquired = matches!(state, RecordState::Acquired { .. });
        entry.state = state;
        match (was_acquired, is_acquired) {
            (false, true) => self.in_flight += 1,
            (true, false) => self.in_flight -= 1,
            _ => {}
        }
        if self.in_flight > IN_FLIGHT_RECORDS_MAX {
            return Err("too many records in flight".into());
        }
        Ok(())
    }
}

/// `Err(bytes)` when the member id is empty or too long.
fn validate_member(member: &str) -> Result<(), usize> {
    if member.is_empty() || member.len() > MEMBER_ID_BYTES_MAX {
        return Err(member.len());
    }
    Ok(())
}

/// SplitMix64's finaliser: spreads one random sample into independent-looking ones per record.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
