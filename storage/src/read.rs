//! The read path of a partition log: whole batches from memory (staged) or disk (durable),
//! planned synchronously and executed without borrowing the log.

use std::collections::VecDeque;
use std::rc::Rc;

use rkyv::util::AlignedVec;

use crate::batch::{self, BatchError, BATCH_ALIGNMENT_BYTES};
use crate::disk::{page_ceil, page_floor, Disk, DiskFile, PAGE_BYTES};
use crate::ids::Offset;
use crate::log::{io_context, segment_file_name, PartitionLog, ReadError, StagedBatch};

/// Bytes returned by a read: whole batches, starting with the one that holds the requested
/// offset. Empty when there is nothing (yet) to read at that offset.
pub struct LogRead<R> {
    pub(crate) data: ReadData<R>,
    /// The offset after the last returned batch (the next offset to ask for).
    pub next_offset: Offset,
}

pub(crate) enum ReadData<R> {
    Empty,
    Disk { buffer: R, start: usize, end: usize },
    Memory(AlignedVec<BATCH_ALIGNMENT_BYTES>),
}

impl<R: std::ops::Deref<Target = [u8]>> LogRead<R> {
    /// Whole batches, laid end to end, 16-byte aligned.
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            ReadData::Empty => &[],
            ReadData::Disk { buffer, start, end } => &buffer[*start..*end],
            ReadData::Memory(bytes) => bytes,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.bytes().is_empty()
    }
}

/// A read decided by [`PartitionLog::plan_read`]: answered already, or a disk read to run.
pub enum ReadPlan<F: DiskFile> {
    Ready(LogRead<F::ReadBuffer>),
    Disk(DiskRead<F>),
}

/// A disk read that owns its file handle (the log is not borrowed while it runs).
pub struct DiskRead<F> {
    file: Rc<F>,
    name: String,
    start: u64,
    limit_bytes: u64,
    from: Offset,
    max_bytes: usize,
    chunk_bytes: usize,
}

impl<F: DiskFile> ReadPlan<F> {
    /// Performs the read. Every returned batch passed its CRC check and the batches are
    /// contiguous from the one holding the requested offset; if retention removed the segment
    /// meanwhile (its file may have been reused), the result is [`ReadError::Retry`].
    pub async fn execute(self) -> Result<LogRead<F::ReadBuffer>, ReadError> {
        match self {
            ReadPlan::Ready(read) => Ok(read),
            ReadPlan::Disk(read) => {
                let DiskRead {
                    file,
                    name,
                    start,
                    limit_bytes,
                    from,
                    max_bytes,
                    chunk_bytes,
                } = read;
                let result = read_batches(
                    &*file,
                    &name,
                    start,
                    limit_bytes,
                    from,
                    max_bytes,
                    chunk_bytes,
                )
                .await?;
                check_contiguous(result.bytes(), from)?;
                Ok(result)
            }
        }
    }
}

/// The batches must start with the one holding `from` and follow each other without gaps.
fn check_contiguous(bytes: &[u8], from: Offset) -> Result<(), ReadError> {
    let mut expected: Option<Offset> = None;
    for checked in batch::batches(bytes) {
        let header = checked
            .map_err(|e| ReadError::Corrupt {
                from,
                to: from.plus(1),
                detail: e.to_string(),
            })?
            .header;
        let fits = match expected {
            None => header.base_offset <= from && from < header.next_offset(),
            Some(next) => header.base_offset == next,
        };
        if !fits {
            return Err(ReadError::Retry { requested: from });
        }
        expected = Some(header.next_offset());
    }
    Ok(())
}

/// Whether a batch starts at an offset: known from memory, or the read that tells.
pub enum BoundaryCheck<F: DiskFile> {
    Known(bool),
    /// Read the batch holding the offset: a batch starts there exactly when it starts there.
    Read {
        offset: Offset,
        plan: ReadPlan<F>,
    },
}

impl<F: DiskFile> BoundaryCheck<F> {
    /// Resolves the check, reading if needed (without the log borrowed). `None` when the
    /// batch cannot be read yet (in a flush in flight whose buffers are not kept: see
    /// `LogConfig::recent_bytes_max`).
    pub async fn resolve(self) -> Result<Option<bool>, ReadError> {
        match self {
            BoundaryCheck::Known(known) => Ok(Some(known)),
            BoundaryCheck::Read { offset, plan } => {
                let read = plan.execute().await?;
                if read.bytes().is_empty() {
                    return Ok(None);
                }
                match batch::decode_header(read.bytes()) {
                    Ok(header) => Ok(Some(header.base_offset == offset)),
                    Err(error) => Err(ReadError::Corrupt {
                        from: offset,
                        to: offset.plus(1),
                        detail: error.to_string(),
                    }),
                }
            }
        }
    }
}

impl<D: Disk> PartitionLog<D> {
    /// The synchronous half of "does a batch start at `offset`?": [`PartitionLog::batch_boundary`]
    /// when memory tells, else the read to perform ([`BoundaryCheck::resolve`]).
    pub fn plan_boundary_check(&self, offset: Offset) -> Result<BoundaryCheck<D::File>, ReadError> {
        match self.batch_boundary(offset) {
            Some(known) => Ok(BoundaryCheck::Known(known)),
            None => Ok(BoundaryCheck::Read {
                offset,
                plan: self.plan_read(offset, 1)?,
            }),
        }
    }

    /// Reads whole batches starting with the one holding `from`, up to about `max_bytes` (at
    /// least one batch, so a consumer always progresses). The newest data comes from memory:
    /// staged batches, and those in flushes in flight or flushed recently while their buffers are
    /// kept (`LogConfig::recent_bytes_max`; without them data in a flush in flight is not
    /// readable until it completes, and the result is empty). Older data comes from disk and is
    /// checked by CRC. Reads stop at segment boundaries.
    ///
    /// Borrows the log across disk reads; a driver that keeps the log in a `RefCell` uses
    /// [`PartitionLog::plan_read`] and [`ReadPlan::execute`] instead.
    pub async fn read(
        &self,
        from: Offset,
        max_bytes: usize,
    ) -> Result<LogRead<<D::File as DiskFile>::ReadBuffer>, ReadError> {
        self.plan_read(from, max_bytes)?.execute().await
    }

    /// Whether a batch starts at `offset` (the log end counts), as far as the log knows without
    /// reading: `Some(true)` or `Some(false)` when segment bases, index entries or the batches
    /// in memory (staged and recent) tell, `None` when only reading the batch at `offset` can
    /// (the first batch a read from `offset` returns starts there exactly when it is one).
    /// A leader checks followers' reported offsets with it.
    pub fn batch_boundary(&self, offset: Offset) -> Option<bool> {
        let end = self.end_offset();
        if offset == end {
            return Some(true);
        }
        if offset < self.log_start || offset > end {
            return Some(false);
        }
        let in_memory = |batches: &VecDeque<StagedBatch>| {
            let at = batches.partition_point(|b| b.next_offset <= offset);
            batches
                .get(at)
                .filter(|b| b.base_offset <= offset)
                .map(|b| b.base_offset == offset)
        };
        if let Some(known) =
            in_memory(&self.recent_batches).or_else(|| in_memory(&self.staged_batches))
        {
            return Some(known);
        }
        let at = self.segments.partition_point(|s| s.base_offset <= offset);
        let segment = &self.segments[at.checked_sub(1)?];
        if segment.base_offset == offset {
            return Some(true);
        }
        let relative = u32::try_from(offset.0 - segment.base_offset.0).ok()?;
        let entries = segment.index.entries();
        let indexed = entries.partition_point(|e| e.relative_offset < relative);
        entries
            .get(indexed)
            .filter(|e| e.relative_offset == relative)
            .map(|_| true)
    }

    /// The synchronous half of a read: checks the range and either answers from memory or
    /// returns the disk read to perform, holding its own handle to the segment file so the log
    /// need not stay borrowed while it runs.
    pub fn plan_read(
        &self,
        from: Offset,
        max_bytes: usize,
    ) -> Result<ReadPlan<D::File>, ReadError> {
        let end_offset = self.end_offset();
        if from < self.log_start || from > end_offset {
            return Err(ReadError::OutOfRange {
                requested: from,
                log_start: self.log_start,
                end_offset,
            });
        }
        let empty = || {
            ReadPlan::Ready(LogRead {
                data: ReadData::Empty,
                next_offset: from,
            })
        };
        if from == end_offset {
            return Ok(empty());
        }
        if let Some(range) = self.corrupt.iter().find(|r| r.from <= from && from < r.to) {
            return Err(ReadError::Corrupt {
                from: range.from,
                to: range.to,
                detail: "found corrupt by recovery".to_string(),
            });
        }
        let in_memory = self
            .recent_batches
            .front()
            .is_some_and(|b| b.base_offset <= from);
        if in_memory || from >= self.durable.next_offset {
            if let Some(read) = self.read_memory(from, max_bytes) {
                return Ok(ReadPlan::Ready(read));
            }
            if from >= self.durable.next_offset {
                return Ok(empty());
            }
        }
        let at = self.segments.partition_point(|s| s.base_offset <= from);
        let segment = &self.segments[at.checked_sub(1).expect("from >= log_start")];
        let limit_bytes = if segment.base_offset == self.durable.segment_base {
            self.durable.position
        } else {
            segment.data_bytes
        };
        let Some(file) = segment.file.get() else {
            return Ok(empty());
        };
        let relative =
            u32::try_from(from.0 - segment.base_offset.0).expect("segment offsets fit u32");
        Ok(ReadPlan::Disk(DiskRead {
            file: Rc::clone(file),
            name: segment_file_name(segment.base_offset),
            start: u64::from(segment.index.lookup(relative)),
            limit_bytes,
            from,
            max_bytes,
            chunk_bytes: self.config.scan_chunk_bytes,
        }))
    }

    /// Copies batches from `from` that are in memory (recent, then staged buffers) into an
    /// aligned buffer. `None` when the batch holding `from` is not in memory.
    fn read_memory(
        &self,
        from: Offset,
        max_bytes: usize,
    ) -> Option<LogRead<<D::File as DiskFile>::ReadBuffer>> {
        // Recent batches, then staged ones: one run in offset order.
        let first_recent = self
            .recent_batches
            .partition_point(|b| b.next_offset <= from);
        let first_staged = self
            .staged_batches
            .partition_point(|b| b.next_offset <= from);
        let mut batches = self
            .recent_batches
            .iter()
            .skip(first_recent)
            .chain(self.staged_batches.iter().skip(first_staged))
            .peekable();
        let first = **batches.peek()?;
        if first.base_offset > from {
            return None; // The batch holding `from` is no longer in memory.
        }
        let mut out = AlignedVec::<BATCH_ALIGNMENT_BYTES>::new();
        let mut next_offset = from;
        let segment_base = first.segment_base;
        for batch in batches {
            // Reads never cross a segment boundary, and return at least one batch.
            if batch.segment_base != segment_base
                || (!out.is_empty() && out.len() + batch.batch_bytes > max_bytes)
            {
                break;
            }
            assert!(
                batch.base_offset >= next_offset || out.is_empty(),
                "staged batches are contiguous"
            );
            let before = out.len();
            let mut position = batch.position;
            let end = batch.position + batch.batch_bytes as u64;
            while position < end {
                let at = |segment_base, chunk_position, filled, bytes| {
                    bytes_at(
                        batch.segment_base,
                        position,
                        segment_base,
                        chunk_position,
                        filled,
                        bytes,
                    )
                };
                // Newest first: a kept buffer's partial last page is also in the next buffer.
                let in_memory = self
                    .recent
                    .iter()
                    .rev()
                    .find_map(|c| at(c.segment_base, c.position, c.filled, c.buffer.as_ref()))
                    .or_else(|| {
                        self.staged.iter().find_map(|c| {
                            at(c.segment_base, c.position, c.filled, c.buffer.as_ref())
                        })
                    });
                let Some(bytes) = in_memory else {
                    // Part of this batch is in a flush in flight whose buffer is not kept.
                    out.resize(before, 0);
                    return (!out.is_empty()).then_some(LogRead {
                        data: ReadData::Memory(out),
                        next_offset,
                    });
                };
                let take = bytes.len().min((end - position) as usize);
                out.extend_from_slice(&bytes[..take]);
                position += take as u64;
            }
            next_offset = batch.next_offset;
        }
        (!out.is_empty()).then_some(LogRead {
            data: ReadData::Memory(out),
            next_offset,
        })
    }
}

/// The log bytes from `position` of segment `segment_base` to the end of a memory buffer that
/// holds `filled` bytes from `chunk_position` of segment `chunk_segment`, if it holds `position`.
fn bytes_at(
    segment_base: Offset,
    position: u64,
    chunk_segment: Offset,
    chunk_position: u64,
    filled: usize,
    bytes: &[u8],
) -> Option<&[u8]> {
    let holds = chunk_segment == segment_base
        && chunk_position <= position
        && position < chunk_position + filled as u64;
    holds.then(|| &bytes[(position - chunk_position) as usize..filled])
}

/// Reads whole batches from `file` between `start` and `limit_bytes`, beginning with the batch
/// that holds `from`, up to about `max_bytes`. Every returned batch passed its CRC check.
async fn read_batches<F: DiskFile>(
    file: &F,
    name: &str,
    start: u64,
    limit_bytes: u64,
    from: Offset,
    max_bytes: usize,
    chunk_bytes: usize,
) -> Result<LogRead<F::ReadBuffer>, ReadError> {
    let corrupt = |detail: String| ReadError::Corrupt {
        from,
        to: from.plus(1),
        detail: format!("{name}: {detail}"),
    };
    let mut position = start;
    // Skip batches below `from`, a chunk at a time (at most one index interval plus one batch).
    loop {
        let want = (max_bytes.max(batch::BATCH_HEADER_BYTES))
            .clamp(PAGE_BYTES, chunk_bytes.max(PAGE_BYTES));
        let read_start = page_floor(position);
        let read_end = page_ceil((position + want as u64).min(limit_bytes));
        if position >= limit_bytes {
            return Ok(LogRead {
                data: ReadData::Empty,
                next_offset: from,
            });
        }
        let buffer = file
            .read_at(read_start, (read_end - read_start) as usize)
            .await
            .map_err(io_context("read", name))?;
        let valid_end = ((limit_bytes - read_start) as usize).min(buffer.len());
        let mut cursor = (position - read_start) as usize;
        let mut first = None;
        let mut next_offset = from;
        while cursor < valid_end {
            let header = match batch::decode_header(&buffer[cursor..valid_end]) {
                Ok(header) => header,
                Err(BatchError::Truncated { .. }) => break,
                // Return the good batches before a bad one; the next read reports it.
                Err(_) if first.is_some() => break,
                Err(error) => {
                    return Err(corrupt(format!(
                        "at position {}: {error}",
                        read_start + cursor as u64
                    )))
                }
            };
            if header.next_offset() <= from && first.is_none() {
                cursor += header.batch_bytes();
                position = read_start + cursor as u64;
                continue;
            }
            // A batch that does not continue the offsets (a CRC-valid batch inside a range
            // recovery reported corrupt) ends the read; the next read starts at its offset.
            if first.is_some() && header.base_offset != next_offset {
                break;
            }
            if cursor + header.batch_bytes() > valid_end {
                break;
            }
            if first.is_some_and(|f| cursor - f + header.batch_bytes() > max_bytes) {
                break;
            }
            match batch::check_batch(&buffer[cursor..valid_end]) {
                Ok(_) => {}
                Err(_) if first.is_some() => break,
                Err(error) => {
                    return Err(corrupt(format!(
                        "at position {}: {error}",
                        read_start + cursor as u64
                    )))
                }
            }
            first.get_or_insert(cursor);
            next_offset = header.next_offset();
            cursor += header.batch_bytes();
        }
        if let Some(first) = first {
            return Ok(LogRead {
                data: ReadData::Disk {
                    buffer,
                    start: first,
                    end: cursor,
                },
                next_offset,
            });
        }
        if position >= limit_bytes {
            return Ok(LogRead {
                data: ReadData::Empty,
                next_offset: from,
            });
        }
        // The batch at `position` did not fit in this read: read exactly that batch.
        let page = file
            .read_at(page_floor(position), PAGE_BYTES * 2)
            .await
            .map_err(io_context("read", name))?;
        let in_page = (position - page_floor(position)) as usize;
        let header = batch::decode_header(&page[in_page..])
            .map_err(|error| corrupt(format!("at position {position}: {error}")))?;
        if header.next_offset() <= from {
            position += header.batch_bytes() as u64;
            continue;
        }
        let read_start = page_floor(position);
        let read_end = page_ceil(position + header.batch_bytes() as u64);
        if position + header.batch_bytes() as u64 > limit_bytes {
            return Err(corrupt(format!(
                "batch at {position} runs past the end of the segment data"
            )));
        }
        let buffer = file
            .read_at(read_start, (read_end - read_start) as usize)
            .await
            .map_err(io_context("read", name))?;
        let cursor = (position - read_start) as usize;
        let end = cursor + header.batch_bytes();
        batch::check_batch(&buffer[cursor..end.min(buffer.len())])
            .map_err(|error| corrupt(format!("at position {position}: {error}")))?;
        return Ok(LogRead {
            data: ReadData::Disk {
                buffer,
                start: cursor,
                end,
            },
            next_offset: header.next_offset(),
        });
    }
}
