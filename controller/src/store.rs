//! `ControllerStore`: the controller's durable raft state, through the [`Disk`] trait.
//!
//! Three files in the controller's directory:
//!
//! ```text
//! controller.hardstate   two 4 KiB slots written alternately (a torn write leaves the other):
//!   0      4    6     8     12     16         24     32     40       48
//!   +------+----+-----+-----+------+----------+------+------+--------+
//!   |magic |ver | pad | crc | pad  | sequence | term | vote | commit |
//!   +------+----+-----+-----+------+----------+------+------+--------+
//!
//! controller.log         page 0: header; then CRC32C frames packed back to back:
//!   header: magic u32 | ver u16 | pad u16 | crc u32 | pad u32 | base_index u64 | base_term u64
//!   frame:  crc u32 | payload_bytes u32 | index u64 | term u64 | prev_term u64 | payload
//!           (payload: the protobuf raft Entry; crc covers everything after itself)
//!
//! controller.snapshot    magic u32 | ver u16 | pad u16 | crc u32 | voters u32 | body_bytes u64
//!                        | index u64 | term u64 | voters × u64 | body (the ClusterImage, JSON)
//! ```
//!
//! Durability (what a returned call means):
//! - [`ControllerStore::persist`] returns once the batch's snapshot, entries and hard state are
//!   all synced: raft may then count them as persisted and the driver may send the messages.
//! - The snapshot and a rewritten (compacted) log are written to `*.tmp`, synced, renamed over
//!   the old file and the directory synced, so either the old or the new file survives a crash.
//! - The log file is append-only: a truncation on conflict appends the replacing frames after
//!   the old ones (a frame whose index is at or below the last one replaces the suffix from it),
//!   so a torn write can only damage frames that were never reported persisted. Frames chain by
//!   `prev_term` (raft's log matching): recovery accepts a frame only if it follows the entry
//!   before its index.
//!
//! Recovery ([`ControllerStore::open`]): removes `*.tmp`, loads the snapshot and the newest valid
//! hard-state slot, then scans frames up to the first torn or invalid one (a torn tail is normal
//! after a crash: it was never reported persisted). A log that ends before the recorded commit
//! index lost acknowledged entries: that is corruption, reported, never repaired here.
//!
//! After an error from a write or sync the store is poisoned: every later call fails (fsyncgate).

use std::io;

use protobuf::Message as _;
use raft::eraftpb::Entry;
use thiserror::Error;
use wharf_storage::disk::{page_ceil, page_floor, Disk, DiskFile, PAGE_BYTES};

pub const HARD_STATE_FILE_NAME: &str = "controller.hardstate";
pub const LOG_FILE_NAME: &str = "controller.log";
pub const SNAPSHOT_FILE_NAME: &str = "controller.snapshot";
const TMP_SUFFIX: &str = ".tmp";

const HARD_STATE_MAGIC: u32 = u32::from_le_bytes(*b"WCHS");
const LOG_MAGIC: u32 = u32::from_le_bytes(*b"WCLG");
const SNAPSHOT_MAGIC: u32 = u32::from_le_bytes(*b"WCSN");
const FORMAT_VERSION: u16 = 1;

const HARD_STATE_SLOTS: usize = 2;
const HARD_STATE_USED_BYTES: usize = 48;
const LOG_HEADER_USED_BYTES: usize = 32;
const FRAME_HEADER_BYTES: usize = 32;
const SNAPSHOT_HEADER_BYTES: usize = 40;

/// The largest raft entry the store accepts (one batch of records).
pub const ENTRY_BYTES_MAX: usize = 8 * 1024 * 1024;
/// The largest snapshot body (the serialized cluster image).
pub const SNAPSHOT_BODY_BYTES_MAX: usize = 256 * 1024 * 1024;
/// The largest log file recovery reads (the log is compacted at every snapshot).
pub const LOG_FILE_BYTES_MAX: u64 = 1024 * 1024 * 1024;
/// The most voters a snapshot records.
pub const VOTERS_MAX: usize = 15;

const _: () = assert!(HARD_STATE_USED_BYTES <= PAGE_BYTES);
const _: () = assert!(LOG_HEADER_USED_BYTES <= PAGE_BYTES);
const _: () = assert!(ENTRY_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(SNAPSHOT_HEADER_BYTES + VOTERS_MAX * 8 <= PAGE_BYTES);

/// Raft's hard state: the current term, the vote in it, the commit index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardStateRecord {
    pub term: u64,
    pub vote: u64,
    pub commit: u64,
}

/// A snapshot of the cluster image at a raft index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub index: u64,
    pub term: u64,
    pub voters: Vec<u64>,
    /// The serialized [`crate::records::ClusterImage`].
    pub data: Vec<u8>,
}

/// What one `Ready` asks to make durable, in this order: snapshot, entries, hard state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PersistBatch {
    /// A snapshot to install (from the leader) or to compact the log to (taken locally).
    /// Entries up to its index are dropped from the log; later ones stay if they follow it.
    pub snapshot: Option<SnapshotRecord>,
    /// Entries to append; the first may be at or below the last index (a conflicting suffix is
    /// truncated first).
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardStateRecord>,
}

impl PersistBatch {
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none() && self.entries.is_empty() && self.hard_state.is_none()
    }
}

/// The durable state found by [`ControllerStore::open`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recovered {
    pub hard_state: HardStateRecord,
    pub snapshot: Option<SnapshotRecord>,
    /// Entries after the snapshot, dense.
    pub entries: Vec<Entry>,
    /// Bytes after the last valid frame that recovery ignored (a torn tail).
    pub torn_tail_bytes: u64,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{operation} {file}: {source}")]
    Io {
        operation: &'static str,
        file: String,
        source: io::Error,
    },
    #[error("corrupt {file}: {reason}")]
    Corrupt { file: String, reason: String },
    #[error("the store failed earlier ({0}); restart to recover")]
    Poisoned(String),
    #[error("entry of {0} bytes exceeds the limit")]
    EntryTooLarge(usize),
}

fn io_error<'a>(
    operation: &'static str,
    file: &'a str,
) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        operation,
        file: file.to_string(),
        source,
    }
}

fn corrupt(file: &str, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        file: file.to_string(),
        reason: reason.into(),
    }
}

/// Where one entry's frame sits in the log file.
#[derive(Clone, Copy, Debug)]
struct FramePosition {
    position: u64,
    term: u64,
}

pub struct ControllerStore<D: Disk> {
    disk: D,
    log: D::File,
    hard_state_file: Option<D::File>,
    hard_state_sequence: u64,
    /// The log file holds entries after (`base_index`, `base_term`).
    base_index: u64,
    base_term: u64,
    /// `frames[i]` is the entry at `base_index + 1 + i`.
    frames: Vec<FramePosition>,
    /// The end of the last frame.
    log_end_bytes: u64,
    poisoned: Option<String>,
}

impl<D: Disk> ControllerStore<D> {
    /// Recovers the durable state from `disk` (creating an empty store if there is none).
    pub async fn open(disk: D) -> Result<(ControllerStore<D>, Recovered), StoreError> {
        let names = disk.list().await.map_err(io_error("list", "."))?;
        let mut removed_tmp = false;
        for name in names.iter().filter(|n| n.ends_with(TMP_SUFFIX)) {
            disk.remove(name).await.map_err(io_error("remove", name))?;
            removed_tmp = true;
        }
        if removed_tmp {
            disk.sync_dir().await.map_err(io_error("sync_dir", "."))?;
        }
        let has = |name: &str| names.iter().any(|n| n == name);
        let snapshot = if has(SNAPSHOT_FILE_NAME) {
            Some(read_snapshot(&disk).await?)
        } else {
            None
        };
        let (hard_state_file, hard_state, hard_state_sequence) = if has(HARD_STATE_FILE_NAME) {
            let file = disk
                .open(HARD_STATE_FILE_NAME)
                .await
                .map_err(io_error("open", HARD_STATE_FILE_NAME))?;
            let bytes = file
                .read_at(0, HARD_STATE_SLOTS * PAGE_BYTES)
                .await
                .map_err(io_error("read", HARD_STATE_FILE_NAME))?;
            // No valid slot: the first write was torn before it returned; nothing relied on it.
            let (sequence, state) = decode_hard_state_file(&bytes).unwrap_or_default();
            (Some(file), state, sequence)
        } else {
            (None, HardStateRecord::default(), 0)
        };
        let (snapshot_index, snapshot_term) =
            snapshot.as_ref().map_or((0, 0), |s| (s.index, s.term));
        let mut store = if has(LOG_FILE_NAME) {
            let log = disk
                .open(LOG_FILE_NAME)
                .await
                .map_err(io_error("open", LOG_FILE_NAME))?;
            ControllerStore {
                disk,
                log,
                hard_state_file,
                hard_state_sequence,
                base_index: 0,
                base_term: 0,
                frames: Vec::new(),
                log_end_bytes: PAGE_BYTES as u64,
                poisoned: None,
            }
        } else {
            let log = write_log_file(&disk, snapshot_index, snapshot_term, &[]).await?;
            ControllerStore {
                disk,
                log,
                hard_state_file,
                hard_state_sequence,
                base_index: snapshot_index,
                base_term: snapshot_term,
                frames: Vec::new(),
                log_end_bytes: PAGE_BYTES as u64,
                poisoned: None,
            }
        };
        let (entries, torn_tail_bytes) = store.scan_log().await?;
        // Entries up to the snapshot are dropped; a log that does not follow the snapshot (one
        // installed from the leader, or a compaction cut short by a crash) is rewritten.
        let entries = store
            .reconcile_with_snapshot(snapshot_index, snapshot_term, entries)
            .await?;
        let last_index = store.last_index();
        if hard_state.commit > last_index {
            return Err(corrupt(
                LOG_FILE_NAME,
                format!(
                    "log ends at {last_index} below the durable commit index {}",
                    hard_state.commit
                ),
            ));
        }
        let recovered = Recovered {
            hard_state,
            snapshot,
            entries,
            torn_tail_bytes,
        };
        Ok((store, recovered))
    }

    /// The index of the last durable entry (or of the snapshot when the log is empty).
    pub fn last_index(&self) -> u64 {
        self.base_index + self.frames.len() as u64
    }

    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// Makes `batch` durable: snapshot, then entries, then hard state, each synced before the
    /// next. On any error the store is poisoned.
    pub async fn persist(&mut self, batch: &PersistBatch) -> Result<(), StoreError> {
        if let Some(reason) = &self.poisoned {
            return Err(StoreError::Poisoned(reason.clone()));
        }
        let result = self.persist_inner(batch).await;
        if let Err(error) = &result {
            self.poisoned = Some(error.to_string());
        }
        result
    }

    async fn persist_inner(&mut self, batch: &PersistBatch) -> Result<(), StoreError> {
        if let Some(snapshot) = &batch.snapshot {
            write_snapshot(&self.disk, snapshot).await?;
            self.compact(snapshot.index, snapshot.term).await?;
        }
        if !batch.entries.is_empty() {
            self.append(&batch.entries).await?;
        }
        if let Some(hard_state) = batch.hard_state {
            self.write_hard_state(hard_state).await?;
        }
        Ok(())
    }

    fn term_at(&self, index: u64) -> Option<u64> {
        if index == self.base_index {
            return Some(self.base_term);
        }
        if index < self.base_index || index > self.last_index() {
            return None;
        }
        Some(self.frames[(index - self.base_index - 1) as usize].term)
    }

    async fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        let first = entries[0].index;
        assert!(
            first > self.base_index && first <= self.last_index() + 1,
            "append at {first} outside ({}, {}]",
            self.base_index,
            self.last_index() + 1
        );
        if first <= self.last_index() {
            // A conflicting suffix: the new frames are appended after it and replace it (the
            // log file is append-only, so a torn write never damages acknowledged frames).
            self.frames.truncate((first - self.base_index - 1) as usize);
        }
        let mut prev_term = self.term_at(first - 1).expect("first - 1 is in the log");
        let mut frames = Vec::new();
        let mut positions = Vec::with_capacity(entries.len());
        for (offset, entry) in entries.iter().enumerate() {
            assert_eq!(entry.index, first + offset as u64, "entries are dense");
            assert!(entry.term >= prev_term, "terms never decrease in a log");
            let payload = entry.write_to_bytes().expect("entries encode");
            if payload.len() > ENTRY_BYTES_MAX {
                return Err(StoreError::EntryTooLarge(payload.len()));
            }
            positions.push(FramePosition {
                position: self.log_end_bytes + frames.len() as u64,
                term: entry.term,
            });
            encode_frame(&mut frames, entry.index, entry.term, prev_term, &payload);
            prev_term = entry.term;
        }
        let start = page_floor(self.log_end_bytes);
        let mut bytes = if start < self.log_end_bytes {
            let page = self
                .log
                .read_at(start, PAGE_BYTES)
                .await
                .map_err(io_error("read", LOG_FILE_NAME))?;
            let kept = (self.log_end_bytes - start) as usize;
            assert!(page.len() >= kept, "the log's last page is readable");
            page[..kept].to_vec()
        } else {
            Vec::new()
        };
        bytes.extend_from_slice(&frames);
        write_padded(&self.disk, &self.log, start, &bytes, LOG_FILE_NAME).await?;
        self.log
            .sync()
            .await
            .map_err(io_error("sync", LOG_FILE_NAME))?;
        self.log_end_bytes += frames.len() as u64;
        self.frames.extend(positions);
        Ok(())
    }

    /// Drops entries up to `index` (keeping later ones only if they follow it) by rewriting the
    /// log to a temporary file renamed over it.
    async fn compact(&mut self, index: u64, term: u64) -> Result<(), StoreError> {
        assert!(index >= self.base_index, "snapshots never go back");
        // Frames after `index`, copied one by one (replaced frames in between are left out).
        let mut kept = Vec::new();
        let mut kept_frames = Vec::new();
        if self.term_at(index) == Some(term) && index < self.last_index() {
            let first = (index - self.base_index) as usize;
            let from = self.frames[first].position;
            let bytes = self.read_log(from, self.log_end_bytes).await?;
            for frame in &self.frames[first..] {
                let at = (frame.position - from) as usize;
                let length = FRAME_HEADER_BYTES + frame_payload_bytes(&bytes[at..]);
                kept_frames.push(FramePosition {
                    position: PAGE_BYTES as u64 + kept.len() as u64,
                    term: frame.term,
                });
                kept.extend_from_slice(&bytes[at..at + length]);
            }
        }
        self.log = write_log_file(&self.disk, index, term, &kept).await?;
        self.base_index = index;
        self.base_term = term;
        self.frames = kept_frames;
        self.log_end_bytes = PAGE_BYTES as u64 + kept.len() as u64;
        Ok(())
    }

    async fn read_log(&self, from: u64, to: u64) -> Result<Vec<u8>, StoreError> {
        let start = page_floor(from);
        let bytes = self
            .log
            .read_at(start, (page_ceil(to) - start) as usize)
            .await
            .map_err(io_error("read", LOG_FILE_NAME))?;
        let (skip, end) = ((from - start) as usize, (to - start) as usize);
        if bytes.len() < end {
            return Err(corrupt(LOG_FILE_NAME, "shorter than its frames"));
        }
        Ok(bytes[skip..end].to_vec())
    }

    async fn write_hard_state(&mut self, hard_state: HardStateRecord) -> Result<(), StoreError> {
        if self.hard_state_file.is_none() {
            let file = self
                .disk
                .create(HARD_STATE_FILE_NAME)
                .await
                .map_err(io_error("create", HARD_STATE_FILE_NAME))?;
            self.disk
                .sync_dir()
                .await
                .map_err(io_error("sync_dir", "."))?;
            self.hard_state_file = Some(file);
        }
        let file = self.hard_state_file.as_ref().expect("created above");
        let sequence = self.hard_state_sequence + 1;
        let page = encode_hard_state(sequence, hard_state);
        let position = (sequence % HARD_STATE_SLOTS as u64) * PAGE_BYTES as u64;
        write_padded(&self.disk, file, position, &page, HARD_STATE_FILE_NAME).await?;
        file.sync()
            .await
            .map_err(io_error("sync", HARD_STATE_FILE_NAME))?;
        self.hard_state_sequence = sequence;
        Ok(())
    }

    /// Reads every valid frame of the log file; returns the entries and the ignored tail bytes.
    async fn scan_log(&mut self) -> Result<(Vec<Entry>, u64), StoreError> {
        let file_bytes = self
            .log
            .file_bytes()
            .await
            .map_err(io_error("size", LOG_FILE_NAME))?;
        if file_bytes > LOG_FILE_BYTES_MAX {
            return Err(corrupt(LOG_FILE_NAME, format!("{file_bytes} bytes")));
        }
        let bytes = self
            .log
            .read_at(0, page_ceil(file_bytes) as usize)
            .await
            .map_err(io_error("read", LOG_FILE_NAME))?;
        let (base_index, base_term) =
            decode_log_header(&bytes).ok_or_else(|| corrupt(LOG_FILE_NAME, "bad header"))?;
        self.base_index = base_index;
        self.base_term = base_term;
        self.frames.clear();
        let mut entries = Vec::new();
        let mut position = PAGE_BYTES;
        // Bounded: each iteration consumes at least a frame header of a bounded file.
        while let Some((index, term, frame_prev_term, payload)) =
            decode_frame(&bytes[position.min(bytes.len())..])
        {
            // A frame extends the log or replaces a suffix (truncation on conflict); either way
            // it must follow the entry before it (log matching).
            let last_index = base_index + entries.len() as u64;
            if index <= base_index
                || index > last_index + 1
                || self.term_at(index - 1) != Some(frame_prev_term)
                || term < frame_prev_term
            {
                break;
            }
            let Ok(entry) = Entry::parse_from_bytes(payload) else {
                break;
            };
            if entry.index != index || entry.term != term {
                break;
            }
            let keep = (index - base_index - 1) as usize;
            self.frames.truncate(keep);
            entries.truncate(keep);
            self.frames.push(FramePosition {
                position: position as u64,
                term,
            });
            entries.push(entry);
            position += FRAME_HEADER_BYTES + payload.len();
        }
        self.log_end_bytes = position as u64;
        let torn_tail_bytes = file_bytes.saturating_sub(position as u64);
        if page_ceil(position as u64) < file_bytes {
            // Drop a torn tail beyond the last page in use, so nothing of it lingers.
            self.log
                .set_len(page_ceil(position as u64))
                .await
                .map_err(io_error("set_len", LOG_FILE_NAME))?;
            self.log
                .sync()
                .await
                .map_err(io_error("sync", LOG_FILE_NAME))?;
        }
        Ok((entries, torn_tail_bytes))
    }

    async fn reconcile_with_snapshot(
        &mut self,
        snapshot_index: u64,
        snapshot_term: u64,
        entries: Vec<Entry>,
    ) -> Result<Vec<Entry>, StoreError> {
        if self.base_index == snapshot_index {
            if self.base_term != snapshot_term {
                return Err(corrupt(
                    LOG_FILE_NAME,
                    "base term differs from the snapshot's",
                ));
            }
            return Ok(entries);
        }
        if self.base_index > snapshot_index {
            return Err(corrupt(
                LOG_FILE_NAME,
                format!(
                    "log starts after {} but the snapshot is at {snapshot_index}",
                    self.base_index
                ),
            ));
        }
        let follows = self.term_at(snapshot_index) == Some(snapshot_term);
        self.compact(snapshot_index, snapshot_term).await?;
        if !follows {
            return Ok(Vec::new());
        }
        Ok(entries
            .into_iter()
            .filter(|e| e.index > snapshot_index)
            .collect())
    }
}

/// Writes `bytes` at the page-aligned `position`, zero-padded to a whole number of pages.
async fn write_padded<D: Disk>(
    disk: &D,
    file: &D::File,
    position: u64,
    bytes: &[u8],
    name: &str,
) -> Result<(), StoreError> {
    assert_eq!(position % PAGE_BYTES as u64, 0);
    let padded = page_ceil(bytes.len() as u64).max(PAGE_BYTES as u64) as usize;
    let mut buffer = disk.alloc_buffer(padded);
    let target = buffer.as_mut();
    target[..bytes.len()].copy_from_slice(bytes);
    target[bytes.len()..].fill(0);
    file.write_at(buffer, position)
        .await
        .map_err(io_error("write", name))?;
    Ok(())
}

/// Writes a whole log file (header + `frames`) under a temporary name, syncs it and renames it
/// over the log; returns the open new log.
async fn write_log_file<D: Disk>(
    disk: &D,
    base_index: u64,
    base_term: u64,
    frames: &[u8],
) -> Result<D::File, StoreError> {
    let tmp = format!("{LOG_FILE_NAME}{TMP_SUFFIX}");
    let file = disk.create(&tmp).await.map_err(io_error("create", &tmp))?;
    let mut bytes = vec![0u8; PAGE_BYTES];
    bytes[..LOG_HEADER_USED_BYTES].copy_from_slice(&encode_log_header(base_index, base_term));
    bytes.extend_from_slice(frames);
    write_padded(disk, &file, 0, &bytes, &tmp).await?;
    file.sync().await.map_err(io_error("sync", &tmp))?;
    disk.rename(&tmp, LOG_FILE_NAME)
        .await
        .map_err(io_error("rename", &tmp))?;
    disk.sync_dir().await.map_err(io_error("sync_dir", "."))?;
    Ok(file)
}

async fn write_snapshot<D: Disk>(disk: &D, snapshot: &SnapshotRecord) -> Result<(), StoreError> {
    assert!(snapshot.voters.len() <= VOTERS_MAX, "too many voters");
    if snapshot.data.len() > SNAPSHOT_BODY_BYTES_MAX {
        return Err(corrupt(
            SNAPSHOT_FILE_NAME,
            "snapshot body too large to write",
        ));
    }
    let tmp = format!("{SNAPSHOT_FILE_NAME}{TMP_SUFFIX}");
    let file = disk.create(&tmp).await.map_err(io_error("create", &tmp))?;
    let bytes = encode_snapshot(snapshot);
    write_padded(disk, &file, 0, &bytes, &tmp).await?;
    file.sync().await.map_err(io_error("sync", &tmp))?;
    disk.rename(&tmp, SNAPSHOT_FILE_NAME)
        .await
        .map_err(io_error("rename", &tmp))?;
    disk.sync_dir().await.map_err(io_error("sync_dir", "."))?;
    Ok(())
}

async fn read_snapshot<D: Disk>(disk: &D) -> Result<SnapshotRecord, StoreError> {
    let file = disk
        .open(SNAPSHOT_FILE_NAME)
        .await
        .map_err(io_error("open", SNAPSHOT_FILE_NAME))?;
    let file_bytes = file
        .file_bytes()
        .await
        .map_err(io_error("size", SNAPSHOT_FILE_NAME))?;
    if file_bytes > (SNAPSHOT_BODY_BYTES_MAX + PAGE_BYTES) as u64 {
        return Err(corrupt(SNAPSHOT_FILE_NAME, "too large"));
    }
    let bytes = file
        .read_at(0, page_ceil(file_bytes) as usize)
        .await
        .map_err(io_error("read", SNAPSHOT_FILE_NAME))?;
    // The snapshot was synced before it was renamed into place: it must be whole.
    decode_snapshot(&bytes).ok_or_else(|| corrupt(SNAPSHOT_FILE_NAME, "bad header or checksum"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(raw)
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// CRC32C of a header whose checksum sits at bytes 8..12, over `used` bytes.
fn header_checksum(bytes: &[u8], used: usize) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&bytes[0..8]), &bytes[12..used])
}

fn encode_hard_state(sequence: u64, state: HardStateRecord) -> [u8; HARD_STATE_USED_BYTES] {
    let mut page = [0u8; HARD_STATE_USED_BYTES];
    page[0..4].copy_from_slice(&HARD_STATE_MAGIC.to_le_bytes());
    page[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    page[16..24].copy_from_slice(&sequence.to_le_bytes());
    page[24..32].copy_from_slice(&state.term.to_le_bytes());
    page[32..40].copy_from_slice(&state.vote.to_le_bytes());
    page[40..48].copy_from_slice(&state.commit.to_le_bytes());
    let crc = header_checksum(&page, HARD_STATE_USED_BYTES);
    page[8..12].copy_from_slice(&crc.to_le_bytes());
    page
}

fn decode_hard_state(page: &[u8]) -> Option<(u64, HardStateRecord)> {
    if page.len() < HARD_STATE_USED_BYTES
        || u32_at(page, 0) != HARD_STATE_MAGIC
        || u16_at(page, 4) != FORMAT_VERSION
        || u32_at(page, 8) != header_checksum(page, HARD_STATE_USED_BYTES)
    {
        return None;
    }
    let state = HardStateRecord {
        term: u64_at(page, 24),
        vote: u64_at(page, 32),
        commit: u64_at(page, 40),
    };
    Some((u64_at(page, 16), state))
}

/// The newest valid slot.
fn decode_hard_state_file(bytes: &[u8]) -> Option<(u64, HardStateRecord)> {
    bytes
        .chunks(PAGE_BYTES)
        .take(HARD_STATE_SLOTS)
        .filter_map(decode_hard_state)
        .max_by_key(|(sequence, _)| *sequence)
}

fn encode_log_header(base_index: u64, base_term: u64) -> [u8; LOG_HEADER_USED_BYTES] {
    let mut page = [0u8; LOG_HEADER_USED_BYTES];
    page[0..4].copy_from_slice(&LOG_MAGIC.to_le_bytes());
    page[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    page[16..24].copy_from_slice(&base_index.to_le_bytes());
    page[24..32].copy_from_slice(&base_term.to_le_bytes());
    let crc = header_checksum(&page, LOG_HEADER_USED_BYTES);
    page[8..12].copy_from_slice(&crc.to_le_bytes());
    page
}

fn decode_log_header(bytes: &[u8]) -> Option<(u64, u64)> {
    if bytes.len() < PAGE_BYTES
        || u32_at(bytes, 0) != LOG_MAGIC
        || u16_at(bytes, 4) != FORMAT_VERSION
        || u32_at(bytes, 8) != header_checksum(bytes, LOG_HEADER_USED_BYTES)
    {
        return None;
    }
    Some((u64_at(bytes, 16), u64_at(bytes, 24)))
}

fn encode_frame(out: &mut Vec<u8>, index: u64, term: u64, prev_term: u64, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&term.to_le_bytes());
    out.extend_from_slice(&prev_term.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

fn frame_payload_bytes(bytes: &[u8]) -> usize {
    u32_at(bytes, 4) as usize
}

/// (index, term, prev_term, payload) of the frame at the start of `bytes`, if it is whole.
fn decode_frame(bytes: &[u8]) -> Option<(u64, u64, u64, &[u8])> {
    if bytes.len() < FRAME_HEADER_BYTES {
        return None;
    }
    let payload_bytes = frame_payload_bytes(bytes);
    if payload_bytes == 0
        || payload_bytes > ENTRY_BYTES_MAX
        || bytes.len() < FRAME_HEADER_BYTES + payload_bytes
    {
        return None;
    }
    let frame = &bytes[..FRAME_HEADER_BYTES + payload_bytes];
    if u32_at(frame, 0) != crc32c::crc32c(&frame[4..]) {
        return None;
    }
    Some((
        u64_at(frame, 8),
        u64_at(frame, 16),
        u64_at(frame, 24),
        &frame[FRAME_HEADER_BYTES..],
    ))
}

fn encode_snapshot(snapshot: &SnapshotRecord) -> Vec<u8> {
    let mut bytes = vec![0u8; SNAPSHOT_HEADER_BYTES];
    bytes[0..4].copy_from_slice(&SNAPSHOT_MAGIC.to_le_bytes());
    bytes[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes[12..16].copy_from_slice(&(snapshot.voters.len() as u32).to_le_bytes());
    bytes[16..24].copy_from_slice(&(snapshot.data.len() as u64).to_le_bytes());
    bytes[24..32].copy_from_slice(&snapshot.index.to_le_bytes());
    bytes[32..40].copy_from_slice(&snapshot.term.to_le_bytes());
    for voter in &snapshot.voters {
        bytes.extend_from_slice(&voter.to_le_bytes());
    }
    bytes.extend_from_slice(&snapshot.data);
    let crc = header_checksum(&bytes, bytes.len());
    bytes[8..12].copy_from_slice(&crc.to_le_bytes());
    bytes
}

fn decode_snapshot(bytes: &[u8]) -> Option<SnapshotRecord> {
    if bytes.len() < SNAPSHOT_HEADER_BYTES
        || u32_at(bytes, 0) != SNAPSHOT_MAGIC
        || u16_at(bytes, 4) != FORMAT_VERSION
    {
        return None;
    }
    let voters = u32_at(bytes, 12) as usize;
    let body_bytes = usize::try_from(u64_at(bytes, 16)).ok()?;
    if voters > VOTERS_MAX || body_bytes > SNAPSHOT_BODY_BYTES_MAX {
        return None;
    }
    let used = SNAPSHOT_HEADER_BYTES + voters * 8 + body_bytes;
    if bytes.len() < used || u32_at(bytes, 8) != header_checksum(bytes, used) {
        return None;
    }
    Some(SnapshotRecord {
        index: u64_at(bytes, 24),
        term: u64_at(bytes, 32),
        voters: (0..voters)
            .map(|i| u64_at(bytes, SNAPSHOT_HEADER_BYTES + i * 8))
            .collect(),
        data: bytes[SNAPSHOT_HEADER_BYTES + voters * 8..used].to_vec(),
    })
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
