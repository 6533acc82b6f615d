//! Opening a partition log: recovery.
//!
//! 1. Read the durable checkpoint (newest valid slot). It says up to which (segment, position)
//!    every byte was synced: the *durable boundary*.
//! 2. If it says `Truncating`, finish that truncation: drop later segments, cut at its position.
//! 3. Sealed segments that lie wholly below the boundary and have a valid index file are trusted
//!    (their batches are still CRC-checked on every read). Every other segment is scanned batch
//!    by batch: header, CRCs, and offset continuity.
//! 4. An invalid batch *below* the boundary is corruption of acknowledged data: it is reported as
//!    a [`CorruptRange`] and the scan resynchronises at the next valid batch; nothing is
//!    truncated. An invalid batch *at or beyond* the boundary is a torn or lost unacknowledged
//!    write: the log is cut there and any later segment removed.
//! 5. The last segment is cut at its end (stale bytes beyond it zeroed, preallocation renewed),
//!    every scanned file is synced, a fresh checkpoint is written, and missing index files of
//!    sealed segments are written.
//!
//! Scans read `scan_chunk_bytes` at a time and yield between reads, so opening a large log
//! never stalls the executor.

use std::cell::OnceCell;
use std::rc::Rc;

use crate::batch::{self, BATCH_ALIGNMENT_BYTES, BATCH_HEADER_BYTES};
use crate::checkpoint::{Checkpoint, CheckpointState, CHECKPOINT_FILE_BYTES, CHECKPOINT_FILE_NAME};
use crate::disk::{page_ceil, page_floor, Disk, DiskFile, PAGE_BYTES};
use crate::ids::Offset;
use crate::index::SparseIndex;
use crate::log::{
    cut_segment_file, index_file_name, io_context, remove_segment_files, segment_file_name,
    write_checkpoint, CorruptRange, FileCell, LogConfig, LogIoError, LogPoint, PartitionLog,
    Recovered, Segment, RECYCLED_FILE_PREFIX,
};

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid log configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Io(#[from] LogIoError),
    #[error("flushing recovered state failed: {0}")]
    Flush(#[from] crate::log::FlushError),
}

/// What recovery found and did. Worth logging at start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    pub scanned_segments: usize,
    pub rebuilt_indexes: usize,
    /// Where a torn (non-zero, invalid) unacknowledged tail was cut: segment base and position.
    pub torn_tail_at: Option<(Offset, u64)>,
    /// Segments removed because they lay beyond a torn tail or an interrupted truncation.
    pub removed_segments: Vec<Offset>,
    /// Ranges of acknowledged offsets whose bytes are corrupt on this replica.
    pub corrupt: Vec<CorruptRange>,
    /// An interrupted suffix truncation was completed.
    pub finished_truncation: bool,
    /// An interrupted reset (`PartitionLog::reset`) was completed: every segment was removed.
    pub finished_reset: bool,
}

/// Durable knowledge about one segment being scanned.
#[derive(Clone, Copy, Debug)]
enum Durability {
    /// Nothing in this segment is known durable.
    Unknown,
    /// Bytes before `position` are durable and `next_offset` starts there.
    Upto { position: u64, next_offset: Offset },
    /// The whole segment is durable; the next segment starts at `next_offset`.
    Whole { next_offset: Offset },
}

struct ScanResult {
    data_bytes: u64,
    next_offset: Offset,
    index: SparseIndex,
    max_timestamp_ms: i64,
    corrupt: Vec<CorruptRange>,
    torn: bool,
}

/// A sliding read window over a file for sequential scans.
struct Window<'a, F: DiskFile> {
    file: &'a F,
    name: &'a str,
    file_bytes: u64,
    chunk_bytes: usize,
    start: u64,
    buffer: Option<F::ReadBuffer>,
}

impl<F: DiskFile> Window<'_, F> {
    /// The bytes `[position, position + bytes)`, or `None` if the file ends before that.
    async fn get(&mut self, position: u64, bytes: usize) -> Result<Option<&[u8]>, LogIoError> {
        let end = position + bytes as u64;
        if end > self.file_bytes {
            return Ok(None);
        }
        let covered = self
            .buffer
            .as_ref()
            .is_some_and(|b| self.start <= position && end <= self.start + b.len() as u64);
        if !covered {
            let read_start = page_floor(position);
            let read_bytes = (page_ceil(end) - read_start).max(self.chunk_bytes as u64);
            let read_bytes = read_bytes.min(page_ceil(self.file_bytes) - read_start);
            futures_lite::future::yield_now().await;
            let buffer = self
                .file
                .read_at(read_start, read_bytes as usize)
                .await
                .map_err(io_context("read", self.name))?;
            self.start = read_start;
            self.buffer = Some(buffer);
        }
        let buffer = self.buffer.as_ref().expect("filled above");
        let from = (position - self.start) as usize;
        if from + bytes > buffer.len() {
            return Ok(None);
        }
        Ok(Some(&buffer[from..from + bytes]))
    }
}

/// Checks the batch at `position`: header, CRCs, and that it starts at `expected` (when given).
/// Returns its size and header, or `None` when the bytes there are not such a batch.
async fn batch_at<F: DiskFile>(
    window: &mut Window<'_, F>,
    position: u64,
    expected: Option<Offset>,
) -> Result<Option<batch::BatchHeader>, LogIoError> {
    let Some(head) = window.get(position, BATCH_HEADER_BYTES).await? else {
        return Ok(None);
    };
    let Ok(header) = batch::decode_header(head) else {
        return Ok(None);
    };
    if expected.is_some_and(|e| e != header.base_offset) {
        return Ok(None);
    }
    let Some(bytes) = window.get(position, header.batch_bytes()).await? else {
        return Ok(None);
    };
    Ok(batch::check_batch(bytes).ok().map(|checked| checked.header))
}

/// Whether a batch found in the segment starting at `base` has offsets the segment can index
/// (32 bits relative to its base). A CRC-valid batch far beyond is not this segment's data.
fn fits_segment(header: &batch::BatchHeader, base: Offset) -> bool {
    header
        .next_offset()
        .0
        .checked_sub(base.0)
        .is_some_and(|relative| relative <= u64::from(u32::MAX))
}

async fn scan_segment<F: DiskFile>(
    file: &F,
    name: &str,
    base: Offset,
    durability: Durability,
    hard_end: Option<u64>,
    config: &LogConfig,
) -> Result<ScanResult, LogIoError> {
    let mut file_bytes = file.file_bytes().await.map_err(io_context("stat", name))?;
    if let (Durability::Upto { position, .. }, None) = (durability, hard_end) {
        if position > file_bytes {
            // The checkpoint vouches for bytes the file no longer has (its tail was lost). The
            // log goes on after them with the gap zero-filled (`cut_segment_file`), so extend
            // the file now: this scan then reads what every later open reads. (Without it, a
            // batch cut off by the lost tail whose missing bytes were zeros was corrupt on this
            // open and whole on the next, and the corrupt ranges changed: fuzz regression
            // `reopen-corrupt-ranges-differ`.)
            let extended = page_ceil(position);
            file.set_len(extended)
                .await
                .map_err(io_context("ftruncate", name))?;
            file_bytes = extended;
        }
    }
    let file_bytes = hard_end.map_or(file_bytes, |end| end.min(file_bytes));
    let mut window = Window {
        file,
        name,
        file_bytes,
        chunk_bytes: config.scan_chunk_bytes,
        start: 0,
        buffer: None,
    };
    let mut result = ScanResult {
        data_bytes: 0,
        next_offset: base,
        index: SparseIndex::new(config.index_interval_bytes),
        max_timestamp_ms: i64::MIN,
        corrupt: Vec::new(),
        torn: false,
    };
    let durable_position = match durability {
        Durability::Unknown => 0,
        Durability::Upto { position, .. } => position,
        Durability::Whole { .. } => u64::MAX,
    };
    // A batch belongs to this segment if the segment can index it and, when the next segment's
    // base is known, it ends by then (batches running past it are not this segment's data).
    let fits = |header: &batch::BatchHeader| {
        fits_segment(header, base)
            && match durability {
                Durability::Whole { next_offset } => header.next_offset() <= next_offset,
                _ => true,
            }
    };
    let mut position = 0u64;
    // Set after skipping corrupt bytes: the next batch gets an index entry of its own.
    let mut resynced = false;
    loop {
        if let Durability::Whole { next_offset } = durability {
            // A sealed segment is complete once it reaches the next segment's first offset; what
            // follows is preallocated space not yet given back.
            if result.next_offset == next_offset {
                return Ok(result);
            }
        }
        let found = batch_at(&mut window, position, Some(result.next_offset)).await?;
        if let Some(header) = found.filter(|h| fits(h)) {
            let relative =
                u32::try_from(header.base_offset.0 - base.0).expect("segment offsets fit u32");
            let indexed = u32::try_from(position).expect("segment fits u32");
            if std::mem::take(&mut resynced) {
                result.index.observe_always(relative, indexed);
            } else {
                result.index.observe(relative, indexed);
            }
            result.max_timestamp_ms = result.max_timestamp_ms.max(header.max_timestamp_ms);
            result.next_offset = header.next_offset();
            position += header.batch_bytes() as u64;
            result.data_bytes = position;
            continue;
        }
        // A wholly durable segment (`durable_position` = MAX) never gets here: if it ends before
        // the next segment's first offset, that is lost acknowledged data, reported below.
        if position >= durable_position {
            // Beyond what was ever synced: a torn or lost unacknowledged write, or the end.
            let remaining_bytes = file_bytes.saturating_sub(position) as usize;
            if let Some(head) = window
                .get(position, BATCH_HEADER_BYTES.min(remaining_bytes))
                .await?
            {
                result.torn = head.iter().any(|&b| b != 0);
            }
            if let Durability::Upto { next_offset, .. } = durability {
                // The checkpoint vouches for offsets up to `next_offset`: if the durable bytes
                // end before them, they are lost acknowledged data, never offsets to reuse.
                if result.next_offset < next_offset {
                    result.corrupt.push(CorruptRange {
                        from: result.next_offset,
                        to: next_offset,
                    });
                    result.next_offset = next_offset;
                }
            }
            return Ok(result);
        }
        // Invalid bytes inside the durable prefix: corruption. Resynchronise at the next valid
        // batch (batches start on 16-byte boundaries) and report the gap; never truncate.
        let search_end = durable_position.min(file_bytes);
        let mut found = None;
        let mut candidate = position + BATCH_ALIGNMENT_BYTES as u64;
        while candidate < search_end {
            if let Some(header) = batch_at(&mut window, candidate, None).await? {
                if header.base_offset > result.next_offset && fits(&header) {
                    found = Some((candidate, header));
                    break;
                }
            }
            candidate += BATCH_ALIGNMENT_BYTES as u64;
        }
        match (found, durability) {
            (Some((at, header)), _) => {
                assert!(result.next_offset < header.base_offset);
                result.corrupt.push(CorruptRange {
                    from: result.next_offset,
                    to: header.base_offset,
                });
                result.next_offset = header.base_offset;
                position = at;
                resynced = true;
            }
            (
                None,
                Durability::Upto {
                    position: end,
                    next_offset,
                },
            ) => {
                if next_offset <= result.next_offset {
                    // The checkpoint's point was reached: nothing is missing, the rest is tail.
                    return Ok(result);
                }
                result.corrupt.push(CorruptRange {
                    from: result.next_offset,
                    to: next_offset,
                });
                result.next_offset = next_offset;
                position = end;
                result.data_bytes = end;
                resynced = true;
                if end >= file_bytes {
                    return Ok(result);
                }
            }
            (None, Durability::Whole { next_offset }) => {
                assert!(
                    result.next_offset < next_offset,
                    "complete segments return above"
                );
                result.corrupt.push(CorruptRange {
                    from: result.next_offset,
                    to: next_offset,
                });
                result.next_offset = next_offset;
                result.data_bytes = position;
                return Ok(result);
            }
            (None, Durability::Unknown) => unreachable!("durable_position is 0 for Unknown"),
        }
    }
}

async fn read_checkpoint<D: Disk>(
    disk: &D,
    names: &[String],
) -> Result<(FileCell<D::File>, Option<Checkpoint>), LogIoError> {
    let cell: FileCell<D::File> = Rc::new(OnceCell::new());
    let checkpoint = if names.iter().any(|n| n == CHECKPOINT_FILE_NAME) {
        let file = disk
            .open(CHECKPOINT_FILE_NAME)
            .await
            .map_err(io_context("open", CHECKPOINT_FILE_NAME))?;
        let bytes = file
            .read_at(0, CHECKPOINT_FILE_BYTES)
            .await
            .map_err(io_context("read", CHECKPOINT_FILE_NAME))?;
        let checkpoint = Checkpoint::decode_file(&bytes);
        assert!(cell.set(Rc::new(file)).is_ok());
        checkpoint
    } else {
        let file = disk
            .create(CHECKPOINT_FILE_NAME)
            .await
            .map_err(io_context("create", CHECKPOINT_FILE_NAME))?;
        file.set_len(CHECKPOINT_FILE_BYTES as u64)
            .await
            .map_err(io_context("ftruncate", CHECKPOINT_FILE_NAME))?;
        file.sync()
            .await
            .map_err(io_context("fdatasync", CHECKPOINT_FILE_NAME))?;
        disk.sync_dir()
            .await
            .map_err(io_context("fsync directory", "."))?;
        assert!(cell.set(Rc::new(file)).is_ok());
        None
    };
    Ok((cell, checkpoint))
}

/// Segment base offsets present in the directory, sorted.
fn segment_bases(names: &[String]) -> Vec<Offset> {
    let mut bases: Vec<Offset> = names
        .iter()
        .filter_map(|name| name.strip_suffix(".log"))
        .filter(|stem| stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|stem| stem.parse().ok().map(Offset))
        .collect();
    bases.sort();
    bases
}

/// Reads a sealed segment's index file if it is valid and consistent with the segment.
async fn trusted_index<D: Disk>(
    disk: &D,
    names: &[String],
    base: Offset,
    next_base: Offset,
    config: &LogConfig,
) -> Result<Option<(SparseIndex, crate::index::SegmentSummary)>, LogIoError> {
    let name = index_file_name(base);
    if !names.contains(&name) {
        return Ok(None);
    }
    let file = disk.open(&name).await.map_err(io_context("open", &name))?;
    let bytes = file.file_bytes().await.map_err(io_context("stat", &name))?;
    if bytes == 0 || bytes % PAGE_BYTES as u64 != 0 || bytes > 64 * 1024 * 1024 {
        return Ok(None);
    }
    let contents = file
        .read_at(0, bytes as usize)
        .await
        .map_err(io_context("read", &name))?;
    match SparseIndex::decode(&contents, config.index_interval_bytes) {
        Ok((index, summary)) if summary.base_offset == base && summary.next_offset == next_base => {
            Ok(Some((index, summary)))
        }
        _ => Ok(None),
    }
}

impl<D: Disk> PartitionLog<D> {
    /// Opens (recovering) or creates the log in `disk`. See the module docs for what recovery
    /// guarantees. `now_ms` is the current time (recovered segments age from it).
    pub async fn open(
        disk: Rc<D>,
        config: LogConfig,
        now_ms: u64,
    ) -> Result<(Self, RecoveryReport), OpenError> {
        config.validate().map_err(OpenError::Config)?;
        let names = disk.list().await.map_err(io_context("list", "."))?;
        let (checkpoint_file, checkpoint) = read_checkpoint(&*disk, &names).await?;
        let mut report = RecoveryReport::default();
        let mut bases = segment_bases(&names);

        // An interrupted reset is finished first: no segment survives it.
        if checkpoint.is_some_and(|c| c.state == CheckpointState::Resetting) {
            for base in bases.drain(..) {
                remove_segment_files(&*disk, base).await?;
                report.removed_segments.push(base);
            }
            disk.sync_dir()
                .await
                .map_err(io_context("fsync directory", "."))?;
            report.finished_reset = true;
        }
        // An interrupted truncation is finished before anything else looks at the segments.
        let truncation = checkpoint.filter(|c| c.state == CheckpointState::Truncating);
        if let Some(truncating) = truncation {
            for base in bases.iter().filter(|b| **b > truncating.segment_base) {
                remove_segment_files(&*disk, *base).await?;
                report.removed_segments.push(*base);
            }
            bases.retain(|b| *b <= truncating.segment_base);
            disk.sync_dir()
                .await
                .map_err(io_context("fsync directory", "."))?;
            report.finished_truncation = true;
        }

        let mut segments: Vec<Segment<D::File>> = Vec::new();
        let mut corrupt = Vec::new();
        for (i, &base) in bases.iter().enumerate() {
            let next_base = bases.get(i + 1).copied();
            let name = segment_file_name(base);
            let file = Rc::new(disk.open(&name).await.map_err(io_context("open", &name))?);
            let mut segment = Segment::new(base, config.index_interval_bytes, now_ms);
            assert!(segment.file.set(Rc::clone(&file)).is_ok());
            // A valid index file is written only after its segment's data was synced.
            if let Some(next_base) = next_base {
                if let Some((index, summary)) =
                    trusted_index(&*disk, &names, base, next_base, &config).await?
                {
                    segment.index = index;
                    segment.next_offset = summary.next_offset;
                    segment.data_bytes = summary.data_bytes;
                    segment.max_timestamp_ms = summary.max_timestamp_ms;
                    segment.index_durable = true;
                    segments.push(segment);
                    continue;
                }
            }
            let durability = match (checkpoint, next_base) {
                (Some(c), _) if c.segment_base == base => Durability::Upto {
                    position: c.position,
                    next_offset: c.next_offset,
                },
                (Some(c), Some(next_base)) if c.segment_base > base => Durability::Whole {
                    next_offset: next_base,
                },
                _ => Durability::Unknown,
            };
            let hard_end = truncation
                .filter(|t| t.segment_base == base)
                .map(|t| t.position);
            let scan = scan_segment(&*file, &name, base, durability, hard_end, &config).await?;
            report.scanned_segments += 1;
            if scan.torn {
                report.torn_tail_at = Some((base, scan.data_bytes));
            }
            corrupt.extend(scan.corrupt.iter().copied());
            segment.index = scan.index;
            segment.next_offset = scan.next_offset;
            segment.data_bytes = scan.data_bytes;
            segment.max_timestamp_ms = scan.max_timestamp_ms;
            // A sealed segment is complete exactly when its batches run up to the next segment's
            // base offset (its file may still hold preallocated zeros after them).
            let continuous = next_base.is_none_or(|n| n == scan.next_offset);
            // Only an unacknowledged tail may take later segments with it: a segment the
            // checkpoint proves wholly durable has acknowledged segments after it.
            let wholly_durable = matches!(durability, Durability::Whole { .. });
            if next_base.is_some() && !wholly_durable && (!continuous || scan.data_bytes == 0) {
                // Everything after an unacknowledged tear is unacknowledged too: drop it.
                for later in bases.iter().skip(i + 1) {
                    remove_segment_files(&*disk, *later).await?;
                    report.removed_segments.push(*later);
                }
                disk.sync_dir()
                    .await
                    .map_err(io_context("fsync directory", "."))?;
                segments.push(segment);
                break;
            }
            if !scan.corrupt.is_empty() {
                // No index file for a segment with corrupt ranges: it would make the segment
                // trusted on the next open, which would then forget the ranges (reads of them
                // would come back empty instead of failing as corrupt). Marked as written so the
                // flush below skips it; every open scans it again.
                segment.index_durable = true;
            } else if next_base.is_some() {
                report.rebuilt_indexes += 1;
            }
            file.sync().await.map_err(io_context("fdatasync", &name))?;
            segments.push(segment);
        }
        // Drop an empty, non-first last segment (a roll whose data never became durable) so that
        // the next append re-creates it cleanly. Not one the checkpoint vouches offsets for (its
        // next offset is past its base): those offsets are reported corrupt, never reused.
        if segments.len() > 1
            && segments
                .last()
                .is_some_and(|s| s.data_bytes == 0 && s.next_offset == s.base_offset)
        {
            let empty = segments.pop().expect("checked");
            remove_segment_files(&*disk, empty.base_offset).await?;
            disk.sync_dir()
                .await
                .map_err(io_context("fsync directory", "."))?;
            report.removed_segments.push(empty.base_offset);
            let last = segments.last().expect("checked");
            crate::log::remove_if_exists(&*disk, &index_file_name(last.base_offset)).await?;
        }
        if segments.is_empty() {
            let start = checkpoint.map_or(Offset::ZERO, |c| c.next_offset);
            segments.push(Segment::new(start, config.index_interval_bytes, now_ms));
        }
        let active = segments.last_mut().expect("non-empty");
        active.index_durable = false;
        let tail = cut_segment_file(&*disk, active, active.data_bytes, &config).await?;
        let durable = LogPoint {
            segment_base: active.base_offset,
            position: active.data_bytes,
            next_offset: active.next_offset,
        };
        // Recycled segment files: keep up to the configured number for reuse, remove the rest.
        let mut recycled: Vec<String> = names
            .iter()
            .filter(|n| n.starts_with(RECYCLED_FILE_PREFIX) && n.ends_with(".log"))
            .cloned()
            .collect();
        recycled.sort();
        while recycled.len() > config.recycled_segments_max {
            let extra = recycled.remove(0);
            crate::log::remove_if_exists(&*disk, &extra).await?;
        }
        report.segments = segments.len();
        report.corrupt = corrupt.clone();
        let mut log = PartitionLog::assemble(
            Rc::clone(&disk),
            config,
            Recovered {
                segments,
                durable,
                tail_page_bytes: tail,
                checkpoint_file: Rc::clone(&checkpoint_file),
                checkpoint_durable: checkpoint,
                corrupt,
            },
        );
        if checkpoint.is_some() || durable.position > 0 {
            let sequence = checkpoint.map_or(1, |c| c.sequence + 1);
            let fresh = Checkpoint {
                sequence,
                state: CheckpointState::Normal,
                segment_base: durable.segment_base,
                position: durable.position,
                next_offset: durable.next_offset,
            };
            write_checkpoint(&*disk, &checkpoint_file, &fresh).await?;
            log.checkpoint_durable = Some(fresh);
            log.checkpoint_planned = Some(fresh);
        }
        log.recycled = recycled;
        // Writes index files of sealed segments that were scanned.
        log.flush().await?;
        Ok((log, report))
    }
}
