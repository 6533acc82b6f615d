//! The partition driver's core: the one place where a replica's outputs are carried out, the
//! produce and replicated appends, and the controller's state applied to a replica. Generic
//! over the log's [`Disk`] and over the host ([`PartitionHost`]), which supplies the transport
//! (fetches to the leader, ISR proposals to the controller), the waiters and the work that
//! takes time (truncation, reset, the epoch-history file). The broker runs it on a glommio
//! shard (`wharf::server::partition`); the simulator (`wharf-tests`) runs the same code over
//! `MemDisk` and its seeded network, so what the simulator checks is what ships.
//!
//! Sans-IO like the replica: nothing here awaits, reads a clock or touches a file.

use std::ops::{Deref, DerefMut, Range};

use wharf_storage::batch::{self, BatchError, BatchHeader, BodyVerified};
use wharf_storage::disk::Disk;
use wharf_storage::log::{AppendError, PartitionLog, ReadError};
use wharf_storage::{AppendMode, Epoch, Offset};

use crate::producers::{ProducerStates, SequenceCheck, SequenceError};

use crate::replica::{
    Ack, AckLevel, BatchInfo, BrokerId, FetchError, Input, Outbox, Output, ProduceError, Replica,
    Role, WaiterId,
};

/// Inputs one driver call may chain (each output leads to at most one input); a longer chain
/// is a bug in the replica.
pub const STEP_CHAIN_MAX: usize = 1024;

/// When an appended batch counts as held by this replica (the topic's `flush` setting).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Once it is synced (fdatasync before ack): the host reports flushes with [`flushed`].
    Synced,
    /// Once it is appended (the topic opted out of fsync before ack).
    Appended,
}

/// What the replica answered the caller's input with: the outputs only the caller can carry
/// out (it holds the batches, or the fetch to answer).
#[derive(Debug)]
pub enum Answer {
    /// Leader: append the produce's batches with this epoch (`Output::Append`).
    Append { leader_epoch: Epoch },
    /// A produce answered before the host registered it: a refusal (`Output::Complete`).
    Complete { result: Result<Ack, ProduceError> },
    /// Leader: serve the fetch from `fetch_offset` (`Output::ServeFetch`).
    ServeFetch {
        replica: BrokerId,
        fetch_id: u64,
        fetch_offset: Offset,
        may_wait: bool,
    },
    /// Leader: refuse the fetch (`Output::RejectFetch`).
    RejectFetch {
        replica: BrokerId,
        fetch_id: u64,
        error: FetchError,
    },
}

/// A fetch reply's batches, CRC-checked on arrival: the frame they came in and where each
/// batch sits in it. Appended (`Output::AppendFetched`) without being checked again.
pub struct Fetched<F> {
    frame: F,
    batches: Vec<CheckedBatch>,
}

impl<F: Deref<Target = [u8]>> Fetched<F> {
    /// Checks the batches in `frame[payload]` in order and stops at the first that fails: it
    /// and what follows are not appended, and the next fetch asks for them again. Returns the
    /// batches for the replica (`FetchReply::Data`).
    pub fn check(frame: F, payload: Range<usize>) -> (Fetched<F>, Vec<BatchInfo>) {
        let mut infos = Vec::new();
        let mut batches = Vec::new();
        let mut at = payload.start;
        for checked in batch::batches(&frame[payload]) {
            let Ok(checked) = checked else { break };
            let header = checked.header;
            infos.push(BatchInfo {
                base_offset: header.base_offset,
                next_offset: header.next_offset(),
                leader_epoch: header.leader_epoch,
            });
            let bytes = checked.bytes.len();
            batches.push(CheckedBatch {
                range: at..at + bytes,
                verified: checked.body_verified(),
                header,
            });
            at += bytes;
        }
        (Fetched { frame, batches }, infos)
    }

    pub fn len(&self) -> usize {
        self.batches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}

/// What the driver needs from the place it runs in. Every method is synchronous; work that
/// takes time (truncation, reset) is started here and reported back as an input when done.
pub trait PartitionHost {
    type Disk: Disk;
    /// The buffer a fetch reply arrived in.
    type Frame: DerefMut<Target = [u8]>;

    fn durability(&self) -> Durability;
    /// Wall-clock milliseconds: what appended batches and new segments are stamped with
    /// (retention by time), never a duration.
    fn wall_clock_ms(&self) -> u64;
    fn with_replica<R>(&mut self, f: impl FnOnce(&mut Replica) -> R) -> R;
    /// The log, or `None` while it is out of reach (maintenance holds it).
    fn with_log<R>(&mut self, f: impl FnOnce(&mut PartitionLog<Self::Disk>) -> R) -> Option<R>;
    /// The batches of the fetch reply being stepped (`Output::AppendFetched` takes them).
    fn take_fetched(&mut self) -> Option<Fetched<Self::Frame>>;
    /// The partition's idempotent-producer state (kept in step with the log by the driver).
    fn with_producers<R>(&mut self, f: impl FnOnce(&mut ProducerStates) -> R) -> R;

    /// Completes a produce the host registered after its append; `false` when it has none
    /// (the refusal is then answered to the caller as [`Answer::Complete`]).
    fn complete(&mut self, waiter: WaiterId, result: Result<Ack, ProduceError>) -> bool;
    /// Transport, follower: send this fetch to the leader.
    fn send_fetch(&mut self, leader: BrokerId, request: crate::replica::FetchRequest);
    /// Transport, controller mode: send this leader's ISR change to the controller; the
    /// answer comes back as `IsrCommitted` (through the metadata) or `IsrRejected`.
    fn propose_isr(&mut self, isr: Vec<BrokerId>, leader_epoch: Epoch, partition_epoch: u64);
    /// Starts truncating the log to `to`; returns `Input::Truncated` if it is already done,
    /// else reports it when it is.
    fn start_truncate(&mut self, to: Offset) -> Result<Option<Input>, String>;
    /// Starts emptying the log to restart at `start` (`Input::LogReset`, as above).
    fn start_reset(&mut self, start: Offset) -> Result<Option<Input>, String>;
    /// Makes the replica's epoch history durable before any data of a new epoch is.
    fn persist_epochs(&mut self) -> Result<(), String>;
    fn high_watermark_advanced(&mut self, to: Offset);
    fn isr_changed(&mut self, isr: &[BrokerId]);
    /// Fetched batches were appended; the log now ends at `end` (wake the flusher).
    fn fetched_appended(&mut self, end: Offset);
}

/// Feeds `input` to the replica and carries out its outputs (and the inputs they lead to).
/// Returns what the caller must act on: `Append`, fetch answers, and completions of produces
/// the host has not registered (refusals). An error leaves the replica where it stopped; the
/// log is poisoned or the host could not start a task.
pub fn step<H: PartitionHost>(host: &mut H, input: Input) -> Result<Vec<Answer>, String> {
    let mut inputs = std::collections::VecDeque::from([input]);
    let mut answers = Vec::new();
    for _ in 0..STEP_CHAIN_MAX {
        let Some(input) = inputs.pop_front() else {
            return Ok(answers);
        };
        let mut outbox = Outbox::new();
        host.with_replica(|replica| replica.step(input, &mut outbox));
        for output in outbox {
            inputs.extend(execute(host, output, &mut answers)?);
        }
    }
    panic!("replica step chain did not end within {STEP_CHAIN_MAX} inputs");
}

/// Carries out one output of the replica (every output goes through here), or hands it to
/// the caller as an [`Answer`]. Returns the inputs it leads to.
fn execute<H: PartitionHost>(
    host: &mut H,
    output: Output,
    answers: &mut Vec<Answer>,
) -> Result<Vec<Input>, String> {
    match output {
        Output::Complete { waiter, result } => {
            if !host.complete(waiter, result.clone()) {
                answers.push(Answer::Complete { result });
            }
        }
        Output::Append { leader_epoch, .. } => answers.push(Answer::Append { leader_epoch }),
        Output::ServeFetch {
            replica,
            fetch_id,
            fetch_offset,
            may_wait,
        } => answers.push(Answer::ServeFetch {
            replica,
            fetch_id,
            fetch_offset,
            may_wait,
        }),
        Output::RejectFetch {
            replica,
            fetch_id,
            error,
        } => answers.push(Answer::RejectFetch {
            replica,
            fetch_id,
            error,
        }),
        Output::SendFetch { leader, request } => host.send_fetch(leader, request),
        Output::AppendFetched { count } => {
            let Some(mut fetched) = host.take_fetched() else {
                return Err("AppendFetched without fetched batches".to_string());
            };
            let frame = &mut fetched.frame;
            let now_ms = host.wall_clock_ms();
            let mut headers = Vec::with_capacity(count);
            let appended = host.with_log(|log| {
                for checked in fetched.batches.drain(..).take(count) {
                    log.append_verified(
                        &mut frame[checked.range],
                        checked.verified,
                        AppendMode::Replica,
                        now_ms,
                    )?;
                    headers.push(checked.header);
                }
                Ok::<Offset, AppendError>(log.end_offset())
            });
            // Followers keep the producers' state too: it survives a failover.
            host.with_producers(|producers| headers.iter().for_each(|h| producers.record(h)));
            let end = match appended {
                Some(Ok(end)) => end,
                // Poisoned or inconsistent: the partition stops replicating until restart.
                Some(Err(error)) => return Err(format!("cannot append fetched batches: {error}")),
                None => return Err("AppendFetched while the log is out of reach".to_string()),
            };
            host.fetched_appended(end);
            let mut next = vec![Input::FetchedAppended { next_offset: end }];
            if host.durability() == Durability::Appended {
                // Appended counts as held for this topic: report it with the append.
                next.push(Input::Flushed { durable: end });
            }
            return Ok(next);
        }
        Output::Truncate { to } => {
            // Nothing is appended while the truncation runs (the replica is changing its log).
            host.with_producers(|producers| producers.truncate(to));
            return Ok(host.start_truncate(to)?.into_iter().collect());
        }
        Output::ResetLog { start } => {
            host.with_producers(ProducerStates::clear);
            return Ok(host.start_reset(start)?.into_iter().collect());
        }
        Output::EpochHistoryChanged => host.persist_epochs()?,
        Output::HighWatermark(offset) => host.high_watermark_advanced(offset),
        Output::IsrChanged(isr) => host.isr_changed(&isr),
        Output::ProposeIsr {
            isr,
            leader_epoch,
            partition_epoch,
        } => host.propose_isr(isr, leader_epoch, partition_epoch),
    }
    Ok(Vec::new())
}

/// The host's flush made everything below `durable` durable.
pub fn flushed<H: PartitionHost>(host: &mut H, durable: Offset) -> Result<(), String> {
    if host.durability() == Durability::Synced {
        step(host, Input::Flushed { durable })?;
    }
    Ok(())
}

/// Why a produce was not appended. Nothing of it is in the log.
#[derive(Debug, thiserror::Error)]
pub enum ProduceFailure {
    #[error("no batches")]
    NoBatches,
    #[error("batch at byte {at_byte}: {error}")]
    InvalidBatch { at_byte: usize, error: BatchError },
    /// The replica refused it (not the leader, not enough replicas, ...).
    #[error(transparent)]
    Refused(ProduceError),
    #[error("{staged_bytes} bytes await flush (limit {limit_bytes}); retry after a backoff")]
    Backpressure {
        staged_bytes: usize,
        limit_bytes: usize,
    },
    #[error("the log is busy with maintenance; retry")]
    LogBusy,
    #[error(transparent)]
    Append(AppendError),
    /// An idempotent producer's batch out of sequence, or of a fenced epoch.
    #[error(transparent)]
    Sequence(SequenceError),
    /// Carrying out the replica's outputs failed (see [`step`]).
    #[error("{0}")]
    Driver(String),
}

/// Where one batch sits in a produce's payload or a fetch frame, its header (before stamping)
/// and the proof its body was CRC-checked.
#[derive(Clone, Debug)]
pub struct CheckedBatch {
    pub range: Range<usize>,
    pub verified: BodyVerified,
    pub header: BatchHeader,
}

/// Checks every batch of a produce's payload before any is appended, so a bad one changes
/// nothing.
pub fn check_produce(payload: &[u8]) -> Result<Vec<CheckedBatch>, ProduceFailure> {
    let mut bounds = Vec::new();
    let mut at = 0usize;
    while at < payload.len() {
        let checked = batch::validate_batch(&payload[at..])
            .map_err(|error| ProduceFailure::InvalidBatch { at_byte: at, error })?;
        let bytes = checked.header.batch_bytes();
        bounds.push(CheckedBatch {
            range: at..at + bytes,
            verified: checked.body_verified(),
            header: checked.header,
        });
        at += bytes;
    }
    if bounds.is_empty() {
        return Err(ProduceFailure::NoBatches);
    }
    Ok(bounds)
}

/// A produce in the log, not yet counted by the replica: the host registers its waiter, then
/// calls [`produce_appended`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub waiter: WaiterId,
    pub base_offset: Offset,
    pub last_offset: Offset,
    pub leader_epoch: Epoch,
    /// Where the log ends after it.
    pub end: Offset,
    /// An idempotent producer's retry: the batches were already in the log at these offsets,
    /// and nothing was appended.
    pub duplicate: bool,
}

/// Leader: asks the replica to take a produce and appends its batches (all or none), stamped
/// with the leader's epoch. `now_ms` is wall-clock time for the batches' timestamps. An
/// idempotent producer's batches must continue its sequence; a retry of batches already in
/// the log appends nothing and is answered with their offsets once they reach the acks.
pub fn produce<H: PartitionHost>(
    host: &mut H,
    payload: &mut [u8],
    bounds: Vec<CheckedBatch>,
    waiter: WaiterId,
    acks: AckLevel,
    deadline_ms: u64,
    now_ms: u64,
) -> Result<Appended, ProduceFailure> {
    let headers: Vec<BatchHeader> = bounds.iter().map(|b| b.header).collect();
    let sequence = host
        .with_producers(|producers| producers.check(&headers))
        .map_err(ProduceFailure::Sequence)?;
    let answers = step(
        host,
        Input::Produce {
            waiter,
            acks,
            deadline_ms,
        },
    )
    .map_err(ProduceFailure::Driver)?;
    let leader_epoch = match answers.as_slice() {
        [Answer::Append { leader_epoch }] => *leader_epoch,
        [Answer::Complete { result: Err(error) }] => {
            return Err(ProduceFailure::Refused(error.clone()))
        }
        other => panic!("unexpected answer to Produce: {other:?}"),
    };
    if let SequenceCheck::Duplicate {
        base_offset,
        last_offset,
    } = sequence
    {
        let end = host.with_log(|log| log.end_offset());
        return Ok(Appended {
            waiter,
            base_offset,
            last_offset,
            leader_epoch,
            end: end.unwrap_or(last_offset.plus(1)),
            duplicate: true,
        });
    }
    let payload_bytes = payload.len();
    let appended = host.with_log(|log| {
        if let Some(reason) = log.poisoned() {
            return Err(ProduceFailure::Append(AppendError::Poisoned(
                reason.to_string(),
            )));
        }
        let limit_bytes = log.config().staged_bytes_max;
        if log.staged_bytes() + payload_bytes > limit_bytes {
            return Err(ProduceFailure::Backpressure {
                staged_bytes: log.staged_bytes(),
                limit_bytes,
            });
        }
        let mut first = None;
        let mut last = None;
        let mut stamped = Vec::with_capacity(bounds.len());
        for checked in bounds {
            let appended = log
                .append_verified(
                    &mut payload[checked.range],
                    checked.verified,
                    AppendMode::Leader { leader_epoch },
                    now_ms,
                )
                .map_err(ProduceFailure::Append)?;
            first.get_or_insert(appended.base_offset);
            last = Some(appended.last_offset);
            stamped.push(BatchHeader {
                base_offset: appended.base_offset,
                leader_epoch,
                ..checked.header
            });
        }
        let (Some(base_offset), Some(last_offset)) = (first, last) else {
            unreachable!("check_produce found at least one batch");
        };
        Ok((
            Appended {
                waiter,
                base_offset,
                last_offset,
                leader_epoch,
                end: log.end_offset(),
                duplicate: false,
            },
            stamped,
        ))
    });
    let failure = match appended {
        Some(Ok((appended, stamped))) => {
            host.with_producers(|producers| stamped.iter().for_each(|h| producers.record(h)));
            return Ok(appended);
        }
        Some(Err(failure)) => failure,
        None => ProduceFailure::LogBusy,
    };
    // The replica forgets the waiter it was told to append for.
    step(host, Input::ProduceAborted { waiter }).map_err(ProduceFailure::Driver)?;
    Err(failure)
}

/// Counts an appended produce: the replica completes it (through [`PartitionHost::complete`])
/// once its acks are reached.
pub fn produce_appended<H: PartitionHost>(host: &mut H, appended: Appended) -> Result<(), String> {
    let (waiter, base_offset, next_offset) = (
        appended.waiter,
        appended.base_offset,
        appended.last_offset.plus(1),
    );
    let input = if appended.duplicate {
        Input::ProduceDuplicate {
            waiter,
            base_offset,
            next_offset,
        }
    } else {
        Input::ProduceAppended {
            waiter,
            base_offset,
            next_offset,
        }
    };
    step(host, input)?;
    if host.durability() == Durability::Appended {
        // Appended counts as held for this topic.
        step(
            host,
            Input::Flushed {
                durable: appended.end,
            },
        )?;
    }
    Ok(())
}

/// The controller's state of one partition (controller mode): its leader, leader epoch,
/// partition epoch (the version ISR proposals are based on) and ISR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionState {
    pub leader: Option<BrokerId>,
    pub leader_epoch: Epoch,
    pub partition_epoch: u64,
    pub isr: Vec<BrokerId>,
}

/// What [`apply_state`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateApplied {
    /// A follower log change (truncation, reset) is in progress: the replica cannot change role
    /// in the middle of one. The host keeps the state and applies it when the change is done.
    Deferred,
    /// An older epoch than the replica's (a restarted broker replays what it applied).
    Stale,
    /// This replica leads in a new epoch.
    Leading,
    /// This replica follows (a new leader or epoch): a fetch to the old leader is abandoned.
    Following,
    /// The leader adopted a committed ISR within its epoch.
    IsrCommitted,
    /// Nothing changed (already following that leader in that epoch), or no eligible leader:
    /// nobody serves until one returns; a deposed leader stops acknowledging when its lease
    /// ends.
    Unchanged,
}

/// Brings replica `me` to the controller's state: leads or follows in the given epoch, or
/// adopts a committed ISR within the current one.
pub fn apply_state<H: PartitionHost>(
    host: &mut H,
    me: BrokerId,
    state: &PartitionState,
) -> Result<StateApplied, String> {
    let (changing_log, role, epoch, leading) = host.with_replica(|replica| {
        (
            replica.changing_log(),
            replica.role(),
            replica.leader_epoch(),
            replica.is_leader(),
        )
    });
    if changing_log {
        return Ok(StateApplied::Deferred);
    }
    if state.leader_epoch < epoch {
        return Ok(StateApplied::Stale);
    }
    match state.leader {
        Some(leader) if leader == me => {
            if leading && state.leader_epoch == epoch {
                step(
                    host,
                    Input::IsrCommitted {
                        isr: state.isr.clone(),
                        partition_epoch: state.partition_epoch,
                    },
                )?;
                Ok(StateApplied::IsrCommitted)
            } else {
                step(
                    host,
                    Input::BecomeLeader {
                        epoch: state.leader_epoch,
                        isr: state.isr.clone(),
                        partition_epoch: state.partition_epoch,
                    },
                )?;
                Ok(StateApplied::Leading)
            }
        }
        Some(leader) if !(role == (Role::Follower { leader }) && state.leader_epoch == epoch) => {
            step(
                host,
                Input::BecomeFollower {
                    epoch: state.leader_epoch,
                    leader,
                },
            )?;
            Ok(StateApplied::Following)
        }
        Some(_) | None => Ok(StateApplied::Unchanged),
    }
}

/// Newest segments scanned for producer state when a log is opened: a producer with a batch it
/// may still retry wrote it recently (default segments are 1 GiB).
pub const PRODUCER_SCAN_SEGMENTS: usize = 2;
/// Bytes read per step of that scan.
const PRODUCER_SCAN_CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// Rebuilds the idempotent-producer state from the log's newest segments (at open, before the
/// log serves anything). Reads whole batches and parses only their headers.
pub async fn scan_producers<D: Disk>(log: &PartitionLog<D>) -> Result<ProducerStates, ReadError> {
    let bases = log.segment_bases();
    let from = bases
        .len()
        .checked_sub(PRODUCER_SCAN_SEGMENTS)
        .map_or(log.log_start_offset(), |i| bases[i])
        .max(log.log_start_offset());
    let mut states = ProducerStates::default();
    let mut at = from;
    let end = log.end_offset();
    // Each read returns at least one batch, so this ends within (end - from) reads.
    while at < end {
        let read = log.read(at, PRODUCER_SCAN_CHUNK_BYTES).await?;
        // Recovery checked every batch below the end: headers are enough here.
        let bytes = read.bytes();
        let mut position = 0usize;
        while position < bytes.len() {
            let Ok(header) = batch::decode_header(&bytes[position..]) else {
                return Ok(states);
            };
            states.record(&header);
            position += header.batch_bytes();
        }
        if read.next_offset <= at {
            break;
        }
        at = read.next_offset;
    }
    Ok(states)
}
