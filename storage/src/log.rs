//! `PartitionLog`: one partition's append-only log of record batches.
//!
//! Request flow:
//! 1. [`PartitionLog::append`] checks the batch (header + CRCs; [`PartitionLog::append_verified`]
//!    only the header when the caller checked the body at the network boundary), stamps base
//!    offset and leader epoch into its header, and copies it whole into one page-aligned staging
//!    buffer that comes from the disk (so it is written without another copy). It returns the
//!    assigned offsets at once. Nothing is durable yet.
//! 2. [`PartitionLog::begin_flush`] takes every staged buffer and returns a [`FlushJob`]
//!    (`flush.rs`): the writes (one per staging buffer, small contiguous ones coalesced, so
//!    usually one), segment creations,
//!    index writes of sealed segments, the checkpoint, and one fdatasync per touched file. Appends may continue while the job runs:
//!    they are staged for the next flush. This is group commit: every append staged before
//!    `begin_flush` shares the job's fdatasync.
//! 3. [`FlushJob::run`] does the I/O without borrowing the log; [`PartitionLog::complete_flush`]
//!    records the outcome. Only then does [`PartitionLog::durable_offset`] advance. Any I/O error
//!    poisons the log: every later append and flush fails (retrying fsync is not safe).
//! 4. [`PartitionLog::read`] (`read.rs`) serves whole batches: durable data from disk (checked by
//!    CRC on the way out), staged data from memory.
//!
//! The last partial page of the active segment is kept in memory after a flush and rewritten
//! (with the new bytes behind it) by the next one, so every write is page-aligned.

use std::cell::OnceCell;
use std::collections::VecDeque;
use std::io;
use std::rc::Rc;

use crate::batch::{self, BatchError, BodyVerified, BATCH_BYTES_MAX};
use crate::checkpoint::{Checkpoint, CheckpointState, CHECKPOINT_FILE_NAME};
use crate::disk::{page_ceil, page_floor, Disk, DiskFile, IoBuffer, PAGE_BYTES};
use crate::ids::{Epoch, Offset};
use crate::index::{SegmentSummary, SparseIndex};
use crate::policy::{self, FlushPolicy, RetentionLimits, RollDecision, RollLimits, SegmentFacts};

/// Tunables of one partition log. Limits are named and checked by [`LogConfig::validate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// A segment is rolled before an append would take it past this size.
    pub segment_bytes_max: u64,
    /// A segment is rolled once it is this old.
    pub segment_age_ms_max: u64,
    /// One sparse-index entry per this many bytes of log.
    pub index_interval_bytes: u32,
    pub retention: RetentionLimits,
    /// Capacity of a staging buffer: batches staged between two flushes share one until it is
    /// full; a larger batch gets a buffer of its own size. So also the usual largest write.
    pub write_chunk_bytes: usize,
    /// Appends beyond this many unflushed bytes are refused with `Backpressure`.
    pub staged_bytes_max: usize,
    /// Buffers handed to flushes stay readable from memory up to this many bytes (the newest
    /// buffer is kept even when larger): followers and tailing consumers read the newest data,
    /// including data whose flush is still running, without a disk read. 0 turns it off (data in
    /// a flush in flight is then unreadable until the flush completes).
    pub recent_bytes_max: usize,
    /// Read size of recovery scans.
    pub scan_chunk_bytes: usize,
    /// The durable checkpoint is rewritten after this many bytes were flushed (and on roll,
    /// close, and [`PartitionLog::request_checkpoint`]). Each checkpoint costs one extra
    /// fdatasync; see `storage/README.md` for what its age means.
    pub checkpoint_interval_bytes: u64,
    /// Keep up to this many segment files deleted by retention and reuse them for new segments:
    /// writing into blocks that were written before makes fdatasync cheaper (no extent
    /// conversion to journal) and avoids fragmentation. 0 disables recycling.
    pub recycled_segments_max: usize,
    /// When acknowledged writes must be fsynced: before the acknowledgement (`Always`, the
    /// default) or at most every interval. The driver asks [`PartitionLog::flush_due`].
    pub flush_policy: FlushPolicy,
    /// Preallocate each new segment to `segment_bytes_max` (writing inside a file is about twice
    /// as fast as extending it with O_DIRECT).
    pub preallocate: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes_max: 1 << 30,
            segment_age_ms_max: 7 * 24 * 3600 * 1000,
            index_interval_bytes: 4096,
            retention: RetentionLimits::default(),
            write_chunk_bytes: 1024 * 1024,
            staged_bytes_max: 64 * 1024 * 1024,
            recent_bytes_max: 8 * 1024 * 1024,
            scan_chunk_bytes: 1024 * 1024,
            checkpoint_interval_bytes: 64 * 1024 * 1024,
            recycled_segments_max: 2,
            flush_policy: FlushPolicy::Always,
            preallocate: true,
        }
    }
}

impl LogConfig {
    pub fn validate(&self) -> Result<(), String> {
        let page = PAGE_BYTES as u64;
        if self.segment_bytes_max < page || !self.segment_bytes_max.is_multiple_of(page) {
            return Err(format!(
                "segment_bytes_max {} must be a positive multiple of {page}",
                self.segment_bytes_max
            ));
        }
        // Index positions are u32; a segment may exceed its limit by at most one batch.
        if self.segment_bytes_max + BATCH_BYTES_MAX as u64 > u64::from(u32::MAX) {
            return Err(format!(
                "segment_bytes_max {} is too large (index positions are 32-bit)",
                self.segment_bytes_max
            ));
        }
        if self.write_chunk_bytes < PAGE_BYTES || !self.write_chunk_bytes.is_multiple_of(PAGE_BYTES)
        {
            return Err(format!(
                "write_chunk_bytes {} must be a positive multiple of {PAGE_BYTES}",
                self.write_chunk_bytes
            ));
        }
        if self.scan_chunk_bytes < PAGE_BYTES || !self.scan_chunk_bytes.is_multiple_of(PAGE_BYTES) {
            return Err(format!(
                "scan_chunk_bytes {} must be a positive multiple of {PAGE_BYTES}",
                self.scan_chunk_bytes
            ));
        }
        if self.staged_bytes_max < BATCH_BYTES_MAX + self.write_chunk_bytes {
            return Err(format!(
                "staged_bytes_max {} must hold at least one largest batch ({BATCH_BYTES_MAX}) plus one write chunk",
                self.staged_bytes_max
            ));
        }
        if self.index_interval_bytes == 0 {
            return Err("index_interval_bytes must be positive".to_string());
        }
        Ok(())
    }

    pub(crate) fn roll_limits(&self) -> RollLimits {
        RollLimits {
            segment_bytes_max: self.segment_bytes_max,
            segment_age_ms_max: self.segment_age_ms_max,
        }
    }
}

/// An I/O error with the operation and file it came from.
#[derive(Debug, thiserror::Error)]
#[error("{op} {file}: {source}")]
pub struct LogIoError {
    pub op: &'static str,
    pub file: String,
    #[source]
    pub source: io::Error,
}

pub(crate) fn io_context<'a>(
    op: &'static str,
    file: &'a str,
) -> impl FnOnce(io::Error) -> LogIoError + 'a {
    move |source| LogIoError {
        op,
        file: file.to_string(),
        source,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("log is poisoned after an earlier I/O error ({0}); restart to recover")]
    Poisoned(String),
    #[error("invalid batch: {0}")]
    InvalidBatch(#[from] BatchError),
    #[error("replicated batch starts at offset {found}, the log ends at {expected}")]
    OffsetMismatch { expected: Offset, found: Offset },
    #[error("{staged_bytes} bytes await flush (limit {limit_bytes}); flush before appending")]
    Backpressure {
        staged_bytes: usize,
        limit_bytes: usize,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("log is poisoned after an earlier I/O error ({0}); restart to recover")]
    Poisoned(String),
    #[error(transparent)]
    Io(#[from] LogIoError),
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("offset {requested} is outside the log [{log_start}, {end_offset}]")]
    OutOfRange {
        requested: Offset,
        log_start: Offset,
        end_offset: Offset,
    },
    #[error("offsets [{from}, {to}) are corrupt on this replica: {detail}")]
    Corrupt {
        from: Offset,
        to: Offset,
        detail: String,
    },
    #[error("offset {requested}: the segment changed while it was read (retention); read again")]
    Retry { requested: Offset },
    #[error(transparent)]
    Io(#[from] LogIoError),
}

#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("log is poisoned after an earlier I/O error ({0}); restart to recover")]
    Poisoned(String),
    #[error(transparent)]
    Io(#[from] LogIoError),
}

#[derive(Debug, thiserror::Error)]
pub enum TruncateError {
    #[error("log is poisoned after an earlier I/O error ({0}); restart to recover")]
    Poisoned(String),
    #[error("offset {offset} is not the start of a batch")]
    NotBatchBoundary { offset: Offset },
    #[error("offset {offset} is below the log start {log_start}")]
    BelowLogStart { offset: Offset, log_start: Offset },
    #[error(transparent)]
    Io(#[from] LogIoError),
    #[error(transparent)]
    Read(#[from] ReadError),
}

/// How an append assigns offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendMode {
    /// Leader: assign the next offsets and this epoch (the producer's header values are ignored).
    Leader { leader_epoch: Epoch },
    /// Follower: keep the leader's offsets and epoch; the batch must start at the log end.
    Replica,
}

/// What an append did. Not durable until `durable_offset() > last_offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub base_offset: Offset,
    pub last_offset: Offset,
    pub leader_epoch: Epoch,
}

/// A range of offsets this replica cannot serve because its bytes failed validation inside the
/// durable prefix. Replication repairs it from another replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CorruptRange {
    pub from: Offset,
    pub to: Offset,
}

/// A point in the log: a segment, a byte position in it, and the offset that starts there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LogPoint {
    pub segment_base: Offset,
    pub position: u64,
    pub next_offset: Offset,
}

pub(crate) type FileCell<F> = Rc<OnceCell<Rc<F>>>;

pub(crate) struct Segment<F> {
    pub base_offset: Offset,
    /// Empty until the first flush that writes to this segment creates the file.
    pub file: FileCell<F>,
    pub next_offset: Offset,
    pub data_bytes: u64,
    pub index: SparseIndex,
    pub max_timestamp_ms: i64,
    pub created_ms: u64,
    /// For sealed segments: the index file is durable (else the next flush writes it).
    pub index_durable: bool,
    /// The index file is being written by a flush in flight.
    pub index_planned: bool,
    /// A flush (maybe still in flight) creates this segment's file.
    pub create_planned: bool,
}

impl<F> Segment<F> {
    pub fn new(base_offset: Offset, interval_bytes: u32, now_ms: u64) -> Self {
        Segment {
            base_offset,
            file: Rc::new(OnceCell::new()),
            next_offset: base_offset,
            data_bytes: 0,
            index: SparseIndex::new(interval_bytes),
            max_timestamp_ms: i64::MIN,
            created_ms: now_ms,
            index_durable: false,
            index_planned: false,
            create_planned: false,
        }
    }

    fn facts(&self) -> SegmentFacts {
        SegmentFacts {
            data_bytes: self.data_bytes,
            created_ms: self.created_ms,
            max_timestamp_ms: self.max_timestamp_ms,
        }
    }

    pub fn summary(&self) -> SegmentSummary {
        SegmentSummary {
            base_offset: self.base_offset,
            next_offset: self.next_offset,
            data_bytes: self.data_bytes,
            max_timestamp_ms: self.max_timestamp_ms,
        }
    }
}

pub fn segment_file_name(base_offset: Offset) -> String {
    format!("{:020}.log", base_offset.0)
}

/// A segment file kept for reuse after retention deleted its segment.
pub fn recycled_file_name(base_offset: Offset) -> String {
    format!("{RECYCLED_FILE_PREFIX}{:020}.log", base_offset.0)
}

pub const RECYCLED_FILE_PREFIX: &str = "recycle-";

pub fn index_file_name(base_offset: Offset) -> String {
    format!("{:020}.index", base_offset.0)
}

pub use crate::flush::{FlushJob, FlushOutcome};
use crate::flush::{SegmentCreate, SegmentWrite};
pub use crate::read::{BoundaryCheck, DiskRead, LogRead, ReadPlan};

/// Flushes that may be in flight at once: one syncing while the next one writes.
pub const FLUSHES_IN_FLIGHT_MAX: usize = 2;

/// A flush merges contiguous staging chunks into one write up to this many bytes (see
/// `coalesce_staged`).
pub const COALESCE_BYTES_MAX: usize = 256 * 1024;

/// A page-aligned staging buffer: bytes destined for `position` of one segment.
pub(crate) struct StagedChunk<D: Disk> {
    pub(crate) segment_base: Offset,
    pub(crate) file: FileCell<D::File>,
    pub(crate) position: u64,
    pub(crate) buffer: D::Buffer,
    pub(crate) filled: usize,
}

/// A buffer handed to a flush and kept for reads (see [`LogConfig::recent_bytes_max`]).
pub(crate) struct RecentChunk<B> {
    pub(crate) segment_base: Offset,
    pub(crate) position: u64,
    /// Bytes of log data at the start of `buffer` (the rest is padding to a page).
    pub(crate) filled: usize,
    /// Memory the buffer holds: its size when allocated, before it was cut to the write.
    pub(crate) allocated_bytes: usize,
    pub(crate) buffer: B,
}

/// A batch appended but not yet durable, and where its bytes sit.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StagedBatch {
    pub(crate) base_offset: Offset,
    pub(crate) next_offset: Offset,
    pub(crate) segment_base: Offset,
    pub(crate) position: u64,
    pub(crate) batch_bytes: usize,
}

/// The partial last page of the active segment, rewritten by the next flush.
pub(crate) struct TailPage {
    pub(crate) position: u64,
    pub(crate) bytes: Vec<u8>,
}

/// What recovery hands to [`PartitionLog::assemble`].
pub(crate) struct Recovered<F> {
    pub segments: Vec<Segment<F>>,
    pub durable: LogPoint,
    pub tail_page_bytes: Vec<u8>,
    pub checkpoint_file: FileCell<F>,
    pub checkpoint_durable: Option<Checkpoint>,
    pub corrupt: Vec<CorruptRange>,
}

/// One partition's log. Owned by one shard; not shared across threads.
pub struct PartitionLog<D: Disk> {
    pub(crate) disk: Rc<D>,
    pub(crate) config: LogConfig,
    /// Oldest first; the last one is the active segment. Never empty.
    pub(crate) segments: Vec<Segment<D::File>>,
    pub(crate) log_start: Offset,
    pub(crate) durable: LogPoint,
    pub(crate) staged: VecDeque<StagedChunk<D>>,
    staged_bytes: usize,
    pub(crate) staged_batches: VecDeque<StagedBatch>,
    /// Buffers of flushes in flight and of recent ones, oldest first (`recent_bytes_max`).
    pub(crate) recent: VecDeque<RecentChunk<D::Buffer>>,
    recent_bytes: usize,
    /// Durable batches whose bytes are all in `recent`, oldest first; `staged_batches` goes on
    /// from where they end.
    pub(crate) recent_batches: VecDeque<StagedBatch>,
    tail_page: Option<TailPage>,
    /// Targets of the flushes in flight, oldest first (at most [`FLUSHES_IN_FLIGHT_MAX`]).
    flush_targets: VecDeque<LogPoint>,
    /// Fires when the newest in-flight flush has finished its writes; the next flush waits for
    /// it before writing, because both may write the same partial tail page.
    writes_done: Option<futures_channel::oneshot::Receiver<()>>,
    /// The last checkpoint handed to a flush job (durable or not yet).
    pub(crate) checkpoint_planned: Option<Checkpoint>,
    /// The next flush writes a checkpoint regardless of the interval.
    checkpoint_requested: bool,
    pub(crate) checkpoint_file: FileCell<D::File>,
    pub(crate) checkpoint_durable: Option<Checkpoint>,
    pub(crate) corrupt: Vec<CorruptRange>,
    poisoned: Option<String>,
    /// Names of segment files kept for reuse (see `LogConfig::recycled_segments_max`).
    pub(crate) recycled: Vec<String>,
}

impl<D: Disk> PartitionLog<D> {
    /// A log over recovered state; see `recovery.rs` for `open`.
    pub(crate) fn assemble(disk: Rc<D>, config: LogConfig, recovered: Recovered<D::File>) -> Self {
        let Recovered {
            segments,
            durable,
            tail_page_bytes,
            checkpoint_file,
            checkpoint_durable,
            corrupt,
        } = recovered;
        let active = segments.last().expect("at least one segment");
        assert_eq!(durable.segment_base, active.base_offset);
        assert_eq!(durable.position, active.data_bytes);
        assert_eq!(durable.next_offset, active.next_offset);
        assert_eq!(
            tail_page_bytes.len() as u64,
            active.data_bytes - page_floor(active.data_bytes)
        );
        let tail_page = (!tail_page_bytes.is_empty()).then(|| TailPage {
            position: page_floor(active.data_bytes),
            bytes: tail_page_bytes,
        });
        let log_start = segments.first().expect("non-empty").base_offset;
        PartitionLog {
            disk,
            config,
            segments,
            log_start,
            durable,
            staged: VecDeque::new(),
            staged_bytes: 0,
            staged_batches: VecDeque::new(),
            recent: VecDeque::new(),
            recent_bytes: 0,
            recent_batches: VecDeque::new(),
            tail_page,
            flush_targets: VecDeque::new(),
            writes_done: None,
            checkpoint_planned: checkpoint_durable,
            checkpoint_requested: false,
            checkpoint_file,
            checkpoint_durable,
            corrupt,
            poisoned: None,
            recycled: Vec::new(),
        }
    }

    /// The offset the next appended record gets.
    pub fn end_offset(&self) -> Offset {
        self.active().next_offset
    }

    /// Every record below this offset is durable (fsynced).
    pub fn durable_offset(&self) -> Offset {
        self.durable.next_offset
    }

    /// The first offset still in the log (moves forward with retention).
    pub fn log_start_offset(&self) -> Offset {
        self.log_start
    }

    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// Bytes appended and not yet handed to a flush.
    pub fn staged_bytes(&self) -> usize {
        self.staged_bytes
    }

    /// How many flushes are in flight.
    pub fn flushes_in_flight(&self) -> usize {
        self.flush_targets.len()
    }

    pub fn flush_in_flight(&self) -> bool {
        !self.flush_targets.is_empty()
    }

    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    pub fn corrupt_ranges(&self) -> &[CorruptRange] {
        &self.corrupt
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Base offsets of all segments, oldest first.
    pub fn segment_bases(&self) -> Vec<Offset> {
        self.segments.iter().map(|s| s.base_offset).collect()
    }

    pub(crate) fn active(&self) -> &Segment<D::File> {
        self.segments.last().expect("never empty")
    }

    fn active_mut(&mut self) -> &mut Segment<D::File> {
        self.segments.last_mut().expect("never empty")
    }

    /// Appends one batch (see the module docs). Returns the assigned offsets; the batch is in
    /// memory only until a flush that began after this call completes. `batch` is stamped in
    /// place in `Leader` mode.
    pub fn append(
        &mut self,
        batch: &mut [u8],
        mode: AppendMode,
        now_ms: u64,
    ) -> Result<Appended, AppendError> {
        if let Some(reason) = &self.poisoned {
            return Err(AppendError::Poisoned(reason.clone()));
        }
        let header = batch::check_batch(batch)?.header;
        self.append_checked(batch, header, mode, now_ms)
    }

    /// [`PartitionLog::append`] of a batch whose body [`batch::check_batch`] already checked
    /// (at the network boundary): only the header is decoded and checked again, and it must be
    /// the header `verified` was made for. Same durability contract as `append`.
    pub fn append_verified(
        &mut self,
        batch: &mut [u8],
        verified: BodyVerified,
        mode: AppendMode,
        now_ms: u64,
    ) -> Result<Appended, AppendError> {
        if let Some(reason) = &self.poisoned {
            return Err(AppendError::Poisoned(reason.clone()));
        }
        let header = batch::decode_header(batch)?;
        if !verified.vouches_for(&header) {
            return Err(AppendError::InvalidBatch(BatchError::BadHeader {
                field: "body_crc",
                detail: "the batch is not the one whose body was checked".to_string(),
            }));
        }
        self.append_checked(batch, header, mode, now_ms)
    }

    fn append_checked(
        &mut self,
        batch: &mut [u8],
        header: batch::BatchHeader,
        mode: AppendMode,
        now_ms: u64,
    ) -> Result<Appended, AppendError> {
        let batch_bytes = header.batch_bytes();
        if batch.len() != batch_bytes {
            return Err(AppendError::InvalidBatch(BatchError::BadHeader {
                field: "body_bytes",
                detail: format!(
                    "batch is {batch_bytes} bytes but {} were given",
                    batch.len()
                ),
            }));
        }
        if self.staged_bytes + batch_bytes > self.config.staged_bytes_max {
            return Err(AppendError::Backpressure {
                staged_bytes: self.staged_bytes,
                limit_bytes: self.config.staged_bytes_max,
            });
        }
        let end = self.end_offset();
        let leader_epoch = match mode {
            AppendMode::Leader { leader_epoch } => {
                batch::stamp(batch, end, leader_epoch);
                leader_epoch
            }
            AppendMode::Replica => {
                if header.base_offset != end {
                    return Err(AppendError::OffsetMismatch {
                        expected: end,
                        found: header.base_offset,
                    });
                }
                header.leader_epoch
            }
        };
        let next_offset = end.plus(u64::from(header.record_count));

        if let RollDecision::Roll(_) = policy::decide_roll(
            &self.active().facts(),
            batch_bytes as u64,
            now_ms,
            &self.config.roll_limits(),
        ) {
            self.roll(now_ms);
        }
        let active = self.active_mut();
        assert_eq!(
            active.next_offset, end,
            "offsets are dense: the batch starts at the log end"
        );
        let position = active.data_bytes;
        let relative =
            u32::try_from(end.0 - active.base_offset.0).expect("segment holds < 2^32 records");
        active.index.observe(
            relative,
            u32::try_from(position).expect("validated segment size"),
        );
        if active.data_bytes == 0 {
            active.created_ms = now_ms;
        }
        active.data_bytes += batch_bytes as u64;
        active.next_offset = next_offset;
        active.max_timestamp_ms = active.max_timestamp_ms.max(header.max_timestamp_ms);
        let segment_base = active.base_offset;
        self.stage(segment_base, position, batch);
        self.staged_batches.push_back(StagedBatch {
            base_offset: end,
            next_offset,
            segment_base,
            position,
            batch_bytes,
        });
        Ok(Appended {
            base_offset: end,
            last_offset: Offset(next_offset.0 - 1),
            leader_epoch,
        })
    }

    fn roll(&mut self, now_ms: u64) {
        let next = self.end_offset();
        let interval = self.config.index_interval_bytes;
        let active = self.active_mut();
        assert!(active.data_bytes > 0, "never roll an empty segment");
        active.index_durable = false;
        active.index_planned = false;
        self.tail_page = None;
        self.segments.push(Segment::new(next, interval, now_ms));
    }

    /// Copies one batch (`bytes`) to `position` of segment `segment_base` in the staging
    /// buffers. A batch always lands in one buffer: when the newest buffer lacks room, a new one
    /// is sized to hold the batch whole (at least `write_chunk_bytes`) and takes over the newest
    /// buffer's partial last page (at most one page is copied twice). Buffers stay page-aligned,
    /// contiguous and non-overlapping, so a flush writes each one as it is; before, a batch was
    /// split over fixed-size buffers and the flush copied the pieces back together (about 10%
    /// of the broker's CPU with 1 MiB batches).
    fn stage(&mut self, segment_base: Offset, position: u64, bytes: &[u8]) {
        assert!(!bytes.is_empty(), "a batch is never empty");
        let fits = self.staged.back().is_some_and(|chunk| {
            chunk.segment_base == segment_base
                && chunk.filled + bytes.len() <= chunk.buffer.as_ref().len()
        });
        if !fits {
            let chunk_position = page_floor(position);
            let carried_bytes = (position - chunk_position) as usize;
            let capacity_bytes = self
                .config
                .write_chunk_bytes
                .max(page_ceil((carried_bytes + bytes.len()) as u64) as usize);
            let mut chunk = StagedChunk::<D> {
                segment_base,
                file: Rc::clone(&self.active().file),
                position: chunk_position,
                buffer: self.disk.alloc_buffer(capacity_bytes),
                filled: carried_bytes,
            };
            // The partial page in front of `position` comes from the newest buffer of this
            // segment if there is one, else from the tail the previous flush left in memory.
            let previous = self
                .staged
                .back_mut()
                .filter(|previous| previous.segment_base == segment_base);
            if let Some(previous) = previous {
                assert_eq!(
                    previous.position + previous.filled as u64,
                    position,
                    "staging is contiguous"
                );
                let page_start = previous.filled - carried_bytes;
                chunk.buffer.as_mut()[..carried_bytes]
                    .copy_from_slice(&previous.buffer.as_ref()[page_start..previous.filled]);
                previous.filled = page_start;
                if previous.filled == 0 {
                    self.staged.pop_back();
                }
            } else if let Some(tail) = self.tail_page.take() {
                assert_eq!(tail.position, chunk_position);
                assert_eq!(tail.bytes.len(), carried_bytes);
                chunk.buffer.as_mut()[..carried_bytes].copy_from_slice(&tail.bytes);
            } else {
                assert_eq!(carried_bytes, 0, "chunk starts mid-page without its tail");
            }
            self.staged.push_back(chunk);
        }
        let chunk = self.staged.back_mut().expect("pushed above");
        assert_eq!(
            chunk.position + chunk.filled as u64,
            position,
            "staging is contiguous"
        );
        chunk.buffer.as_mut()[chunk.filled..chunk.filled + bytes.len()].copy_from_slice(bytes);
        chunk.filled += bytes.len();
        self.staged_bytes += bytes.len();
    }

    /// Takes everything staged into a [`FlushJob`]. `None` if there is nothing to do. Up to
    /// [`FLUSHES_IN_FLIGHT_MAX`] flushes may be in flight; their outcomes must be passed to
    /// [`PartitionLog::complete_flush`] in the order the jobs were begun.
    pub fn begin_flush(&mut self) -> Result<Option<FlushJob<D>>, FlushError> {
        if let Some(reason) = &self.poisoned {
            return Err(FlushError::Poisoned(reason.clone()));
        }
        assert!(
            self.flush_targets.len() < FLUSHES_IN_FLIGHT_MAX,
            "too many flushes in flight"
        );
        let checkpoint = self.checkpoint_due();
        let indexable = self.indexable_segments();
        if self.staged.is_empty() && checkpoint.is_none() && indexable.is_empty() {
            return Ok(None);
        }
        let preallocate_bytes = if self.config.preallocate {
            self.config.segment_bytes_max
        } else {
            0
        };
        let (writes_done_sender, writes_done) = futures_channel::oneshot::channel();
        let mut job = FlushJob {
            disk: Rc::clone(&self.disk),
            wait_for_writes: self.writes_done.replace(writes_done),
            writes_done: writes_done_sender,
            creates: Vec::new(),
            writes: Vec::new(),
            index_writes: Vec::new(),
            trims: Vec::new(),
            syncs: Vec::new(),
            checkpoint: checkpoint.map(|c| (c, Rc::clone(&self.checkpoint_file))),
            target: LogPoint {
                segment_base: self.active().base_offset,
                position: self.active().data_bytes,
                next_offset: self.end_offset(),
            },
        };
        if checkpoint.is_some() {
            self.checkpoint_planned = checkpoint;
            self.checkpoint_requested = false;
        }
        let active_base = self.active().base_offset;
        self.coalesce_staged();
        while let Some(mut chunk) = self.staged.pop_front() {
            let name = segment_file_name(chunk.segment_base);
            // Staged chunks belong to the newest one or two segments: search from the back.
            let segment = self
                .segments
                .iter_mut()
                .rev()
                .find(|s| s.base_offset == chunk.segment_base)
                .expect("staged data belongs to a segment of the log");
            if chunk.file.get().is_none() && !segment.create_planned {
                // Created once, by the first flush that writes to it; a later flush in flight
                // waits for this one's writes, so the file exists by then.
                segment.create_planned = true;
                let recycled = self.recycled.pop();
                job.creates.push(SegmentCreate {
                    name: name.clone(),
                    file: Rc::clone(&chunk.file),
                    preallocate_bytes,
                    recycled,
                });
            }
            if !job.syncs.iter().any(|(n, _)| *n == name) {
                job.syncs.push((name.clone(), Rc::clone(&chunk.file)));
            }
            let write_bytes = page_ceil(chunk.filled as u64) as usize;
            chunk.buffer.as_mut()[chunk.filled..write_bytes].fill(0);
            let is_last_of_active = chunk.segment_base == active_base && self.staged.is_empty();
            let partial = chunk.filled % PAGE_BYTES;
            if is_last_of_active && partial != 0 {
                let page_start = chunk.filled - partial;
                self.tail_page = Some(TailPage {
                    position: chunk.position + page_start as u64,
                    bytes: chunk.buffer.as_ref()[page_start..chunk.filled].to_vec(),
                });
            }
            let allocated_bytes = chunk.buffer.as_ref().len();
            chunk.buffer.truncate(write_bytes);
            if self.config.recent_bytes_max > 0 {
                self.remember(RecentChunk {
                    segment_base: chunk.segment_base,
                    position: chunk.position,
                    filled: chunk.filled,
                    allocated_bytes,
                    buffer: chunk.buffer.share(),
                });
            }
            job.writes.push(SegmentWrite {
                name,
                file: chunk.file,
                position: chunk.position,
                buffer: chunk.buffer,
            });
        }
        self.staged_bytes = 0;
        for at in indexable {
            let segment = &mut self.segments[at];
            segment.index_planned = true;
            job.index_writes.push((
                segment.base_offset,
                segment.index.encode(&segment.summary()),
            ));
            // Give back the preallocated space beyond the data.
            let name = segment_file_name(segment.base_offset);
            job.trims.push((
                name.clone(),
                Rc::clone(&segment.file),
                page_ceil(segment.data_bytes),
            ));
            if !job.syncs.iter().any(|(n, _)| *n == name) {
                job.syncs.push((name, Rc::clone(&segment.file)));
            }
        }
        self.flush_targets.push_back(job.target);
        Ok(Some(job))
    }

    /// Merges runs of contiguous staged chunks of one segment into one buffer while the run
    /// stays within [`COALESCE_BYTES_MAX`]. Writes to one file are served one after another by
    /// the I/O stack (measured: four 256 KiB writes in flight ran like one at a time), so for
    /// small writes a second write's latency (about 300 µs) costs more than copying them
    /// together. Large chunks are written as they are: their transfer time dominates the
    /// write's cost anyway, and copying them took about 10% of the broker's CPU.
    fn coalesce_staged(&mut self) {
        let mut merged: VecDeque<StagedChunk<D>> = VecDeque::with_capacity(self.staged.len());
        while let Some(first) = self.staged.pop_front() {
            let mut run = vec![first];
            while let Some(next) = self.staged.front() {
                let last = run.last().expect("run starts non-empty");
                let total: usize = run.iter().map(|c| c.filled).sum::<usize>() + next.filled;
                let contiguous = next.segment_base == last.segment_base
                    && next.position == last.position + last.filled as u64;
                if !contiguous || total > COALESCE_BYTES_MAX {
                    break;
                }
                run.push(self.staged.pop_front().expect("peeked"));
            }
            if run.len() == 1 {
                merged.extend(run);
                continue;
            }
            let filled: usize = run.iter().map(|c| c.filled).sum();
            let mut buffer = self.disk.alloc_buffer(page_ceil(filled as u64) as usize);
            let mut at = 0;
            for chunk in &run {
                buffer.as_mut()[at..at + chunk.filled]
                    .copy_from_slice(&chunk.buffer.as_ref()[..chunk.filled]);
                at += chunk.filled;
            }
            let first = run.swap_remove(0);
            merged.push_back(StagedChunk {
                segment_base: first.segment_base,
                file: first.file,
                position: first.position,
                buffer,
                filled,
            });
        }
        self.staged = merged;
    }

    /// Sealed segments whose data is durable and whose index file is neither durable nor in a
    /// flush yet. Writing an index only after its data is durable is what lets recovery trust a
    /// valid index file.
    fn indexable_segments(&self) -> Vec<usize> {
        let durable = self.durable.next_offset;
        let sealed = self.segments.len() - 1; // Every segment but the last is sealed.
        self.segments[..sealed]
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.index_durable && !s.index_planned && s.next_offset <= durable)
            .filter(|(_, s)| s.file.get().is_some())
            .map(|(at, _)| at)
            .collect()
    }

    /// The checkpoint a flush starting now should write: the last completed flush's durable
    /// point, if the file does not say so already.
    fn checkpoint_due(&self) -> Option<Checkpoint> {
        let durable = self.durable;
        match self.checkpoint_planned {
            Some(c) if c.state == CheckpointState::Normal => {
                let current =
                    c.segment_base == durable.segment_base && c.position == durable.position;
                let behind_bytes = if c.segment_base == durable.segment_base {
                    durable.position.saturating_sub(c.position)
                } else {
                    u64::MAX // A roll happened since: sealed segments become trusted sooner.
                };
                if current
                    || (!self.checkpoint_requested
                        && behind_bytes < self.config.checkpoint_interval_bytes)
                {
                    return None;
                }
            }
            Some(_) => {}
            None if durable.position == 0 && durable.segment_base == self.log_start => return None,
            None => {}
        }
        Some(Checkpoint {
            sequence: self.next_checkpoint_sequence(),
            state: CheckpointState::Normal,
            segment_base: durable.segment_base,
            position: durable.position,
            next_offset: durable.next_offset,
        })
    }

    /// Whether the driver should begin a flush now under the log's [`FlushPolicy`], given when
    /// the last flush began. Backpressure (`staged_bytes_max`) forces one regardless.
    pub fn flush_due(&self, last_flush_ms: u64, now_ms: u64) -> bool {
        let nearly_full =
            self.staged_bytes + self.config.write_chunk_bytes >= self.config.staged_bytes_max;
        nearly_full
            || policy::flush_due(
                self.config.flush_policy,
                self.staged_bytes,
                last_flush_ms,
                now_ms,
            )
    }

    /// Asks the next flush to bring the durable checkpoint up to date even if less than
    /// `checkpoint_interval_bytes` were flushed since the last one. The driver calls this on an
    /// idle timer so that the window in which damage to recent data would be mistaken for a torn
    /// write (see `storage/README.md`) stays short.
    pub fn request_checkpoint(&mut self) {
        self.checkpoint_requested = true;
    }

    /// Records the outcome of the in-flight flush. On success the durable offset advances to the
    /// end of the log as of `begin_flush`; on error the log is poisoned.
    pub fn complete_flush(&mut self, outcome: FlushOutcome) -> Result<Offset, FlushError> {
        let target = self
            .flush_targets
            .pop_front()
            .expect("a flush was in flight");
        assert_eq!(
            target, outcome.target,
            "flush outcomes are completed in the order begun"
        );
        if let Err(error) = outcome.result {
            self.poisoned = Some(error.to_string());
            return Err(FlushError::Io(error));
        }
        if let Some(reason) = &self.poisoned {
            // An earlier flush failed: nothing after it may be acknowledged.
            return Err(FlushError::Poisoned(reason.clone()));
        }
        assert!(
            target.next_offset >= self.durable.next_offset,
            "durable offset never moves back"
        );
        self.durable = target;
        if let Some(checkpoint) = outcome.checkpoint {
            // Retention may have written a newer one while this flush ran.
            if self
                .checkpoint_durable
                .is_none_or(|c| c.sequence < checkpoint.sequence)
            {
                self.checkpoint_durable = Some(checkpoint);
            }
        }
        for base in outcome.indexed {
            if let Some(segment) = self.segments.iter_mut().find(|s| s.base_offset == base) {
                segment.index_durable = true;
                segment.index_planned = false;
            }
        }
        while self
            .staged_batches
            .front()
            .is_some_and(|b| b.next_offset <= target.next_offset)
        {
            let batch = self.staged_batches.pop_front().expect("peeked");
            if self.config.recent_bytes_max > 0 {
                self.recent_batches.push_back(batch);
            }
        }
        self.forget_unreachable_batches();
        Ok(self.durable.next_offset)
    }

    /// Keeps `chunk` readable from memory, dropping the oldest kept buffers beyond
    /// `recent_bytes_max` (the newest stays even when larger). Buffers count with the memory
    /// they hold, not the log bytes in them: a flush of a few bytes still holds a buffer of
    /// `write_chunk_bytes`.
    fn remember(&mut self, chunk: RecentChunk<D::Buffer>) {
        self.recent_bytes += chunk.allocated_bytes;
        self.recent.push_back(chunk);
        while self.recent.len() > 1 && self.recent_bytes > self.config.recent_bytes_max {
            let evicted = self.recent.pop_front().expect("more than one");
            self.recent_bytes -= evicted.allocated_bytes;
        }
        self.forget_unreachable_batches();
    }

    /// Drops recent batches that start before the oldest kept buffer: part of their bytes is
    /// gone from memory, so they are read from disk again.
    fn forget_unreachable_batches(&mut self) {
        let Some(floor) = self.recent.front() else {
            self.recent_batches.clear();
            return;
        };
        let floor = (floor.segment_base, floor.position);
        while self
            .recent_batches
            .front()
            .is_some_and(|b| (b.segment_base, b.position) < floor)
        {
            self.recent_batches.pop_front();
        }
    }

    /// Forgets every buffer kept for reads (their bytes may no longer be the log's).
    fn forget_recent(&mut self) {
        self.recent.clear();
        self.recent_bytes = 0;
        self.recent_batches.clear();
    }

    /// Flushes everything appended so far and waits until it is durable. A convenience over
    /// `begin_flush` / `run` / `complete_flush` for callers that need not append meanwhile.
    pub async fn flush(&mut self) -> Result<Offset, FlushError> {
        assert!(
            self.flush_targets.is_empty(),
            "flush() with flushes in flight: complete them first"
        );
        match self.begin_flush()? {
            Some(job) => {
                let outcome = job.run().await;
                self.complete_flush(outcome)
            }
            None => Ok(self.durable_offset()),
        }
    }

    /// Flushes everything and brings the durable checkpoint up to date, so that a later open
    /// knows the whole log is acknowledged data. Call on clean shutdown.
    pub async fn close(mut self) -> Result<Offset, FlushError> {
        assert!(
            self.flush_targets.is_empty(),
            "close with a flush in flight"
        );
        self.flush().await?;
        // The first flush may have written the previous durable point; this one writes the
        // current one (and the index files of segments sealed by the first).
        self.request_checkpoint();
        self.flush().await
    }

    /// Removes every record at or after `to` (which must start a batch), durably, so that a
    /// crash at any point either keeps the old suffix or completes the truncation. Used by
    /// followers to drop a divergent suffix. Flushes staged data first.
    pub async fn truncate_suffix(&mut self, to: Offset) -> Result<(), TruncateError> {
        if let Some(reason) = &self.poisoned {
            return Err(TruncateError::Poisoned(reason.clone()));
        }
        assert!(
            self.flush_targets.is_empty(),
            "truncate_suffix with flushes in flight: complete them first"
        );
        if to >= self.end_offset() {
            return Ok(());
        }
        if to < self.log_start {
            return Err(TruncateError::BelowLogStart {
                offset: to,
                log_start: self.log_start,
            });
        }
        self.flush().await.map_err(|e| match e {
            FlushError::Poisoned(reason) => TruncateError::Poisoned(reason),
            FlushError::Io(io) => TruncateError::Io(io),
        })?;
        let at = self.segments.partition_point(|s| s.base_offset <= to) - 1;
        let position = self.position_of_batch(at, to).await?;
        let result = self.truncate_at(at, position, to).await;
        if let Err(error) = &result {
            self.poisoned = Some(error.to_string());
        }
        result.map_err(TruncateError::Io)
    }

    /// Finds the file position of the batch starting at `offset` in segment `at`.
    async fn position_of_batch(&self, at: usize, offset: Offset) -> Result<u64, TruncateError> {
        let segment = &self.segments[at];
        if offset == segment.base_offset {
            return Ok(0);
        }
        let read = self.read(offset, 1).await?;
        let first = batch::check_batch(read.bytes()).map_err(|e| ReadError::Corrupt {
            from: offset,
            to: offset.plus(1),
            detail: e.to_string(),
        })?;
        if first.header.base_offset != offset {
            return Err(TruncateError::NotBatchBoundary { offset });
        }
        // Walk from the indexed position to find where this batch starts.
        let relative = u32::try_from(offset.0 - segment.base_offset.0).expect("fits");
        let mut position = u64::from(segment.index.lookup(relative));
        let file = segment.file.get().expect("durable segment has a file");
        let name = segment_file_name(segment.base_offset);
        loop {
            let page = file
                .read_at(page_floor(position), PAGE_BYTES * 2)
                .await
                .map_err(io_context("read", &name))?;
            let in_page = (position - page_floor(position)) as usize;
            let header =
                batch::decode_header(&page[in_page..]).map_err(|e| ReadError::Corrupt {
                    from: offset,
                    to: offset.plus(1),
                    detail: e.to_string(),
                })?;
            if header.base_offset == offset {
                return Ok(position);
            }
            if header.base_offset > offset {
                return Err(TruncateError::NotBatchBoundary { offset });
            }
            position += header.batch_bytes() as u64;
        }
    }

    /// The truncation protocol (see `checkpoint.rs`): checkpoint `Truncating`, drop later
    /// segments, cut the segment, checkpoint `Normal`.
    async fn truncate_at(
        &mut self,
        at: usize,
        position: u64,
        to: Offset,
    ) -> Result<(), LogIoError> {
        let base = self.segments[at].base_offset;
        let sequence = self.next_checkpoint_sequence();
        let mut checkpoint = Checkpoint {
            sequence,
            state: CheckpointState::Truncating,
            segment_base: base,
            position,
            next_offset: to,
        };
        write_checkpoint(&*self.disk, &self.checkpoint_file, &checkpoint).await?;
        self.checkpoint_durable = Some(checkpoint);
        self.checkpoint_planned = Some(checkpoint);
        for segment in self.segments.drain(at + 1..) {
            remove_segment_files(&*self.disk, segment.base_offset).await?;
        }
        remove_if_exists(&*self.disk, &index_file_name(base)).await?;
        self.disk
            .sync_dir()
            .await
            .map_err(io_context("fsync directory", "."))?;
        let tail =
            cut_segment_file(&*self.disk, &self.segments[at], position, &self.config).await?;
        let segment = &mut self.segments[at];
        assert!(
            position <= segment.data_bytes,
            "truncation never cuts beyond the data"
        );
        assert!(
            base <= to && to <= segment.next_offset,
            "truncation point lies in this segment"
        );
        segment.index_durable = false;
        segment.data_bytes = position;
        segment.next_offset = to;
        segment
            .index
            .truncate_from(u32::try_from(to.0 - base.0).expect("fits"));
        self.durable = LogPoint {
            segment_base: base,
            position,
            next_offset: to,
        };
        self.tail_page = (!tail.is_empty()).then(|| TailPage {
            position: page_floor(position),
            bytes: tail,
        });
        self.staged_batches.clear();
        self.forget_recent();
        checkpoint.sequence += 1;
        checkpoint.state = CheckpointState::Normal;
        write_checkpoint(&*self.disk, &self.checkpoint_file, &checkpoint).await?;
        self.checkpoint_durable = Some(checkpoint);
        self.checkpoint_planned = Some(checkpoint);
        Ok(())
    }

    /// Discards every segment and restarts the log empty at `start` (log start = end = durable
    /// = `start`), durably: a follower whose leader deleted (retention) everything it would
    /// fetch next starts again at the leader's log start. Staged data is dropped, not flushed.
    ///
    /// Crash safety: a `Resetting` checkpoint naming `start` is synced first; recovery that sees
    /// it removes every segment file left and opens the log empty at `start`. Then the segment
    /// files go, then a `Normal` checkpoint at `start` (position 0) is synced: recovery that
    /// finds no segment opens the log empty at the checkpoint's offset. So a crash at any point
    /// yields either the old log or the empty one, never a mix.
    pub async fn reset(&mut self, start: Offset, now_ms: u64) -> Result<(), ResetError> {
        if let Some(reason) = &self.poisoned {
            return Err(ResetError::Poisoned(reason.clone()));
        }
        assert!(
            self.flush_targets.is_empty(),
            "reset with flushes in flight: complete them first"
        );
        let result = self.reset_files(start).await;
        match &result {
            Ok(()) => {
                self.segments = vec![Segment::new(
                    start,
                    self.config.index_interval_bytes,
                    now_ms,
                )];
                self.log_start = start;
                self.durable = LogPoint {
                    segment_base: start,
                    position: 0,
                    next_offset: start,
                };
                self.staged.clear();
                self.staged_bytes = 0;
                self.staged_batches.clear();
                self.forget_recent();
                self.tail_page = None;
                self.writes_done = None;
                self.corrupt.clear();
            }
            Err(error) => self.poisoned = Some(error.to_string()),
        }
        result.map_err(ResetError::Io)
    }

    /// The file side of [`PartitionLog::reset`].
    async fn reset_files(&mut self, start: Offset) -> Result<(), LogIoError> {
        let mut checkpoint = Checkpoint {
            sequence: self.next_checkpoint_sequence(),
            state: CheckpointState::Resetting,
            segment_base: start,
            position: 0,
            next_offset: start,
        };
        write_checkpoint(&*self.disk, &self.checkpoint_file, &checkpoint).await?;
        self.checkpoint_durable = Some(checkpoint);
        self.checkpoint_planned = Some(checkpoint);
        // The segments stay in memory until the files are gone: a failure here poisons the log,
        // which must still answer its offsets.
        let bases: Vec<Offset> = self.segments.iter().map(|s| s.base_offset).collect();
        for base in bases {
            remove_segment_files(&*self.disk, base).await?;
        }
        self.disk
            .sync_dir()
            .await
            .map_err(io_context("fsync directory", "."))?;
        checkpoint.sequence += 1;
        checkpoint.state = CheckpointState::Normal;
        write_checkpoint(&*self.disk, &self.checkpoint_file, &checkpoint).await?;
        self.checkpoint_durable = Some(checkpoint);
        self.checkpoint_planned = Some(checkpoint);
        Ok(())
    }

    /// Writes and syncs a checkpoint of the current durable point unless the durable checkpoint
    /// already says so.
    async fn write_current_checkpoint(&mut self) -> Result<(), LogIoError> {
        let durable = self.durable;
        let current = self.checkpoint_durable.is_some_and(|c| {
            c.state == CheckpointState::Normal
                && c.segment_base == durable.segment_base
                && c.position == durable.position
        });
        if current {
            return Ok(());
        }
        let checkpoint = Checkpoint {
            sequence: self.next_checkpoint_sequence(),
            state: CheckpointState::Normal,
            segment_base: durable.segment_base,
            position: durable.position,
            next_offset: durable.next_offset,
        };
        write_checkpoint(&*self.disk, &self.checkpoint_file, &checkpoint).await?;
        self.checkpoint_durable = Some(checkpoint);
        self.checkpoint_planned = Some(checkpoint);
        Ok(())
    }

    /// Above every checkpoint written or handed to a flush in flight, so the newest one wins.
    fn next_checkpoint_sequence(&self) -> u64 {
        let planned = self.checkpoint_planned.map_or(0, |c| c.sequence);
        let durable = self.checkpoint_durable.map_or(0, |c| c.sequence);
        planned.max(durable) + 1
    }

    /// Applies the retention policy: deletes the oldest sealed segments it selects and moves the
    /// log start. Returns how many segments were deleted.
    pub async fn apply_retention(&mut self, now_ms: u64) -> Result<usize, LogIoError> {
        if let Some(reason) = &self.poisoned {
            return Err(LogIoError {
                op: "retention",
                file: String::new(),
                source: io::Error::other(format!("log is poisoned ({reason}); restart to recover")),
            });
        }
        let sealed: Vec<SegmentFacts> = self
            .segments
            .iter()
            .take(self.segments.len() - 1)
            // Only durable data may be deleted, and never a segment whose index file a flush in
            // flight is about to write.
            .take_while(|s| s.next_offset <= self.durable.next_offset && !s.index_planned)
            .map(Segment::facts)
            .collect();
        let delete = policy::decide_retention(
            &sealed,
            self.active().data_bytes,
            now_ms,
            &self.config.retention,
        );
        self.delete_oldest(delete).await
    }

    /// Deletes the sealed, durable segments that lie entirely below `offset` (a consumer-group
    /// coordinator wrote a full snapshot of its state at `offset`; a follower follows its
    /// leader's log start) and moves the log start. Returns how many segments were deleted.
    pub async fn delete_below(&mut self, offset: Offset) -> Result<usize, LogIoError> {
        if let Some(reason) = &self.poisoned {
            return Err(LogIoError {
                op: "delete below",
                file: String::new(),
                source: io::Error::other(format!("log is poisoned ({reason}); restart to recover")),
            });
        }
        let delete = self
            .segments
            .iter()
            .take(self.segments.len() - 1)
            .take_while(|s| {
                s.next_offset <= offset
                    && s.next_offset <= self.durable.next_offset
                    && !s.index_planned
            })
            .count();
        self.delete_oldest(delete).await
    }

    /// Deletes the `delete` oldest segments (sealed and durable: the callers checked).
    async fn delete_oldest(&mut self, delete: usize) -> Result<usize, LogIoError> {
        assert!(
            delete < self.segments.len(),
            "the active segment is never deleted"
        );
        if delete > 0 {
            // Deleting may remove every segment that holds data (the active one can be empty), so
            // the checkpoint must carry the log end first: otherwise recovery could restart the
            // offsets below what was acknowledged (found by the crash test, seed 755765936700).
            if let Err(error) = self.write_current_checkpoint().await {
                self.poisoned = Some(error.to_string());
                return Err(error);
            }
        }
        for _ in 0..delete {
            let segment = self.segments.remove(0);
            if self.recycled.len() < self.config.recycled_segments_max
                && segment.file.get().is_some()
            {
                let name = segment_file_name(segment.base_offset);
                let recycled = recycled_file_name(segment.base_offset);
                drop(segment.file);
                self.disk
                    .rename(&name, &recycled)
                    .await
                    .map_err(io_context("rename", &name))?;
                remove_if_exists(&*self.disk, &index_file_name(segment.base_offset)).await?;
                self.recycled.push(recycled);
            } else {
                remove_segment_files(&*self.disk, segment.base_offset).await?;
            }
            self.log_start = self.segments[0].base_offset;
            self.corrupt.retain(|r| r.to > segment.next_offset);
            futures_lite::future::yield_now().await;
        }
        if delete > 0 {
            self.disk
                .sync_dir()
                .await
                .map_err(io_context("fsync directory", "."))?;
        }
        Ok(delete)
    }
}

/// Writes and syncs one checkpoint slot.
pub(crate) async fn write_checkpoint<D: Disk>(
    disk: &D,
    cell: &FileCell<D::File>,
    checkpoint: &Checkpoint,
) -> Result<(), LogIoError> {
    let file = cell.get().expect("checkpoint file is opened at open");
    let mut buffer = disk.alloc_buffer(PAGE_BYTES);
    buffer.as_mut().copy_from_slice(&checkpoint.encode());
    file.write_at(buffer, (checkpoint.slot() * PAGE_BYTES) as u64)
        .await
        .map_err(io_context("write", CHECKPOINT_FILE_NAME))?;
    file.sync()
        .await
        .map_err(io_context("fdatasync", CHECKPOINT_FILE_NAME))
}

pub(crate) async fn remove_if_exists<D: Disk>(disk: &D, name: &str) -> Result<(), LogIoError> {
    match disk.remove(name).await {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            Err(io_context("remove", name)(error))
        }
        _ => Ok(()),
    }
}

pub(crate) async fn remove_segment_files<D: Disk>(
    disk: &D,
    base: Offset,
) -> Result<(), LogIoError> {
    remove_if_exists(disk, &segment_file_name(base)).await?;
    remove_if_exists(disk, &index_file_name(base)).await
}

/// Cuts a segment file at `position` so nothing after it can ever be read back as a batch:
/// rewrites the page holding `position` with zeros after it (its valid prefix rewritten with the
/// same bytes, so a torn write cannot damage it), truncates the file to that page, preallocates
/// again, and syncs. Returns the valid bytes of that last partial page.
pub(crate) async fn cut_segment_file<D: Disk>(
    disk: &D,
    segment: &Segment<D::File>,
    position: u64,
    config: &LogConfig,
) -> Result<Vec<u8>, LogIoError> {
    let name = segment_file_name(segment.base_offset);
    let Some(file) = segment.file.get() else {
        return Ok(Vec::new());
    };
    let page_start = page_floor(position);
    let partial = (position - page_start) as usize;
    let mut tail = Vec::new();
    if partial > 0 {
        let page = file
            .read_at(page_start, PAGE_BYTES)
            .await
            .map_err(io_context("read", &name))?;
        let mut buffer = disk.alloc_buffer(PAGE_BYTES);
        buffer.as_mut().fill(0);
        let have = page.len().min(partial);
        buffer.as_mut()[..have].copy_from_slice(&page[..have]);
        tail = buffer.as_ref()[..partial].to_vec();
        file.write_at(buffer, page_start)
            .await
            .map_err(io_context("write", &name))?;
    }
    file.set_len(page_ceil(position))
        .await
        .map_err(io_context("ftruncate", &name))?;
    if config.preallocate {
        file.allocate(config.segment_bytes_max)
            .await
            .map_err(io_context("fallocate", &name))?;
    }
    file.sync().await.map_err(io_context("fdatasync", &name))?;
    Ok(tail)
}
