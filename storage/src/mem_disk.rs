//! `MemDisk`: an in-memory [`Disk`] that models what a crash keeps, for tests and benches.
//!
//! Each file has a *written* image (what reads see now) and a *durable* image (what survives a
//! crash), plus the list of operations issued since its last `sync`. [`MemDisk::crash`] rebuilds
//! every file from its durable image plus a seeded random choice of those pending operations:
//! each is kept, lost, or torn at 512-byte sector granularity (so a torn 4 KiB page is possible
//! too). Directory changes (create, rename, remove) are pending until [`Disk::sync_dir`]; a crash
//! keeps a random *prefix* of them, in order, as a journaling filesystem does. A file that no
//! surviving name refers to is gone after the crash, whatever was synced into it.
//!
//! Faults: EIO on the n-th next write or sync, ENOSPC beyond a capacity, bit flips. Alignment is
//! checked as O_DIRECT would: misaligned positions or lengths fail with EINVAL.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rkyv::util::AlignedVec;

use crate::disk::{Disk, DiskFile, IoBuffer, PAGE_BYTES};

/// Torn writes keep or lose whole units of one of these sizes: a disk sector or a page.
pub const SECTOR_BYTES: usize = 512;
pub const TEAR_PAGE_BYTES: usize = PAGE_BYTES;

pub type MemBuffer = AlignedVec<PAGE_BYTES>;

impl IoBuffer for MemBuffer {
    fn truncate(&mut self, bytes: usize) {
        assert!(bytes <= self.len());
        self.resize(bytes, 0);
    }

    /// A copy: the same bytes for every reader, which is all the contract promises (the log
    /// never changes a buffer after sharing it). Only tests pay for the copy.
    fn share(&self) -> Self {
        self.clone()
    }
}

#[derive(Debug)]
enum PendingOp {
    Write { position: u64, data: Vec<u8> },
    SetLen { bytes: u64 },
}

#[derive(Debug, Default)]
struct MemFile {
    written: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<PendingOp>,
}

type FileId = u64;

/// A directory change not yet made durable by `sync_dir`.
#[derive(Debug, Clone)]
enum DirOp {
    Link { name: String, id: FileId },
    Unlink { name: String },
    Rename { from: String, to: String },
}

fn apply_dir_op(names: &mut BTreeMap<String, FileId>, op: &DirOp) {
    match op {
        DirOp::Link { name, id } => {
            names.insert(name.clone(), *id);
        }
        DirOp::Unlink { name } => {
            names.remove(name);
        }
        DirOp::Rename { from, to } => {
            if let Some(id) = names.remove(from) {
                names.insert(to.clone(), id);
            }
        }
    }
}

#[derive(Debug)]
struct MemState {
    files: BTreeMap<FileId, MemFile>,
    /// The directory as it is now.
    names: BTreeMap<String, FileId>,
    /// The directory as of the last `sync_dir`.
    durable_names: BTreeMap<String, FileId>,
    /// Directory changes since the last `sync_dir`, in order.
    dir_ops: Vec<DirOp>,
    next_id: FileId,
    /// Bumped by every crash; handles from an older generation fail with EIO.
    generation: u64,
    writes_until_eio: Option<u64>,
    syncs_until_eio: Option<u64>,
    capacity_bytes: Option<u64>,
    syncs: u64,
    writes: u64,
    reads: u64,
}

/// Counters for asserting on I/O patterns in tests (e.g. group commit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemDiskStats {
    pub syncs: u64,
    pub writes: u64,
    /// `read_at` calls, on any file.
    pub reads: u64,
}

/// How a crash treats writes that were not synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// Every unsynced operation is lost.
    LoseUnsynced,
    /// Each unsynced operation is independently kept, lost or torn in units of `tear_bytes`
    /// ([`SECTOR_BYTES`] or [`TEAR_PAGE_BYTES`]), from the seed.
    Random { seed: u64, tear_bytes: usize },
}

#[derive(Clone, Debug)]
pub struct MemDisk {
    state: Rc<RefCell<MemState>>,
}

impl Default for MemDisk {
    fn default() -> Self {
        Self::new()
    }
}

fn error(kind: io::ErrorKind, message: String) -> io::Error {
    io::Error::new(kind, message)
}

/// O_DIRECT refuses misaligned positions and lengths with EINVAL; so does MemDisk.
fn check_aligned(what: &str, position: u64, bytes: usize) -> io::Result<()> {
    if !position.is_multiple_of(PAGE_BYTES as u64) || !bytes.is_multiple_of(PAGE_BYTES) {
        return Err(error(
            io::ErrorKind::InvalidInput,
            format!("{what} at {position} of {bytes} bytes is not {PAGE_BYTES}-aligned"),
        ));
    }
    Ok(())
}

impl MemDisk {
    pub fn new() -> Self {
        MemDisk {
            state: Rc::new(RefCell::new(MemState {
                files: BTreeMap::new(),
                names: BTreeMap::new(),
                durable_names: BTreeMap::new(),
                dir_ops: Vec::new(),
                next_id: 0,
                generation: 0,
                writes_until_eio: None,
                syncs_until_eio: None,
                capacity_bytes: None,
                syncs: 0,
                writes: 0,
                reads: 0,
            })),
        }
    }

    /// Simulates power loss: see the module docs. Open handles become stale (EIO).
    pub fn crash(&self, mode: CrashMode) {
        let mut state = self.state.borrow_mut();
        state.generation += 1;
        let mut rng = match mode {
            CrashMode::LoseUnsynced => None,
            CrashMode::Random { seed, .. } => Some(StdRng::seed_from_u64(seed)),
        };
        let tear_bytes = match mode {
            CrashMode::Random { tear_bytes, .. } => tear_bytes,
            CrashMode::LoseUnsynced => SECTOR_BYTES,
        };
        assert!(
            tear_bytes == SECTOR_BYTES || tear_bytes == TEAR_PAGE_BYTES,
            "tear unit {tear_bytes}"
        );
        let kept_ops = match rng.as_mut() {
            Some(rng) => rng.random_range(0..=state.dir_ops.len()),
            None => 0,
        };
        let mut names = state.durable_names.clone();
        for op in state.dir_ops.drain(..).take(kept_ops) {
            apply_dir_op(&mut names, &op);
        }
        state.durable_names = names.clone();
        state.names = names;
        let live: std::collections::BTreeSet<FileId> = state.names.values().copied().collect();
        state.files.retain(|id, _| live.contains(id));
        for file in state.files.values_mut() {
            let mut image = std::mem::take(&mut file.durable);
            for op in file.pending.drain(..) {
                let Some(rng) = rng.as_mut() else { continue };
                match op {
                    PendingOp::SetLen { bytes } => {
                        if rng.random_bool(0.5) {
                            image.resize(bytes as usize, 0);
                        }
                    }
                    PendingOp::Write { position, data } => {
                        let choice = rng.random_range(0..3);
                        if choice == 0 {
                            continue; // lost
                        }
                        let end = position as usize + data.len();
                        if image.len() < end {
                            image.resize(end, 0);
                        }
                        for (sector, chunk) in data.chunks(tear_bytes).enumerate() {
                            // choice 1: fully written; choice 2: torn, each sector kept or lost.
                            if choice == 1 || rng.random_bool(0.5) {
                                let at = position as usize + sector * tear_bytes;
                                image[at..at + chunk.len()].copy_from_slice(chunk);
                            }
                        }
                    }
                }
            }
            file.written = image.clone();
            file.durable = image;
        }
    }

    /// The next `count`-th write (1 = the very next) fails with EIO, as do all later ones until
    /// cleared with `None`.
    pub fn fail_writes_after(&self, count: Option<u64>) {
        self.state.borrow_mut().writes_until_eio = count;
    }

    /// The next `count`-th sync fails with EIO (and every later one until cleared).
    pub fn fail_syncs_after(&self, count: Option<u64>) {
        self.state.borrow_mut().syncs_until_eio = count;
    }

    /// Writes or allocations that would grow the total size of all files beyond `bytes` fail
    /// with ENOSPC.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.state.borrow_mut().capacity_bytes = bytes;
    }

    /// Flips one bit in both the written and durable images of `name` (media corruption).
    pub fn flip_bit(&self, name: &str, position: u64, bit: u8) {
        let mut state = self.state.borrow_mut();
        let id = *state.names.get(name).expect("flip_bit on a missing file");
        let file = state.files.get_mut(&id).expect("named files exist");
        for image in [&mut file.written, &mut file.durable] {
            if let Some(byte) = image.get_mut(position as usize) {
                *byte ^= 1 << (bit % 8);
            }
        }
    }

    /// The current (written) contents of a file, for assertions.
    pub fn contents(&self, name: &str) -> Option<Vec<u8>> {
        let state = self.state.borrow();
        state
            .names
            .get(name)
            .and_then(|id| state.files.get(id))
            .map(|f| f.written.clone())
    }

    pub fn file_names(&self) -> Vec<String> {
        self.state.borrow().names.keys().cloned().collect()
    }

    pub fn stats(&self) -> MemDiskStats {
        let state = self.state.borrow();
        MemDiskStats {
            syncs: state.syncs,
            writes: state.writes,
            reads: state.reads,
        }
    }

    fn handle(&self, name: &str, id: FileId) -> MemFileHandle {
        MemFileHandle {
            disk: self.clone(),
            name: name.to_string(),
            id,
            generation: self.state.borrow().generation,
        }
    }
}

impl MemState {
    fn total_bytes(&self) -> u64 {
        self.files.values().map(|f| f.written.len() as u64).sum()
    }

    fn check_space(&self, current_bytes: u64, new_bytes: u64) -> io::Result<()> {
        if let Some(capacity) = self.capacity_bytes {
            let total = self.total_bytes() - current_bytes + new_bytes;
            if new_bytes > current_bytes && total > capacity {
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
        }
        Ok(())
    }
}

/// Counts down an armed fault; true when this operation must fail.
fn trip(counter: &mut Option<u64>) -> bool {
    match counter {
        Some(0) | Some(1) => {
            *counter = Some(0);
            true
        }
        Some(n) => {
            *n -= 1;
            false
        }
        None => false,
    }
}

impl Disk for MemDisk {
    type File = MemFileHandle;
    type Buffer = MemBuffer;

    fn alloc_buffer(&self, bytes: usize) -> MemBuffer {
        assert_eq!(
            bytes % PAGE_BYTES,
            0,
            "buffer size {bytes} not page-aligned"
        );
        let mut buffer = MemBuffer::with_capacity(bytes);
        buffer.resize(bytes, 0);
        buffer
    }

    async fn create(&self, name: &str) -> io::Result<MemFileHandle> {
        assert!(!name.contains('/'), "file names are plain names");
        let id = {
            let mut state = self.state.borrow_mut();
            let id = state.next_id;
            state.next_id += 1;
            state.files.insert(id, MemFile::default());
            state.names.insert(name.to_string(), id);
            state.dir_ops.push(DirOp::Link {
                name: name.to_string(),
                id,
            });
            id
        };
        Ok(self.handle(name, id))
    }

    async fn open(&self, name: &str) -> io::Result<MemFileHandle> {
        let id = self.state.borrow().names.get(name).copied();
        match id {
            Some(id) => Ok(self.handle(name, id)),
            None => Err(error(
                io::ErrorKind::NotFound,
                format!("{name}: no such file"),
            )),
        }
    }

    async fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.file_names())
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut state = self.state.borrow_mut();
        let id = state
            .names
            .remove(from)
            .ok_or_else(|| error(io::ErrorKind::NotFound, format!("{from}: no such file")))?;
        state.names.insert(to.to_string(), id);
        state.dir_ops.push(DirOp::Rename {
            from: from.to_string(),
            to: to.to_string(),
        });
        Ok(())
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        let mut state = self.state.borrow_mut();
        if state.names.remove(name).is_none() {
            return Err(error(
                io::ErrorKind::NotFound,
                format!("{name}: no such file"),
            ));
        }
        state.dir_ops.push(DirOp::Unlink {
            name: name.to_string(),
        });
        Ok(())
    }

    async fn sync_dir(&self) -> io::Result<()> {
        let mut state = self.state.borrow_mut();
        state.durable_names = state.names.clone();
        state.dir_ops.clear();
        // Files no name refers to, now or durably, can never be reached again.
        let live: std::collections::BTreeSet<FileId> = state.names.values().copied().collect();
        state.files.retain(|id, _| live.contains(id));
        Ok(())
    }
}

/// A handle to one file of a [`MemDisk`]; stale (EIO) after a crash.
#[derive(Debug)]
pub struct MemFileHandle {
    disk: MemDisk,
    /// The name it was opened by, for messages only.
    name: String,
    id: FileId,
    generation: u64,
}

impl MemFileHandle {
    fn with_file<T>(
        &self,
        f: impl FnOnce(&mut MemState, FileId) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut state = self.disk.state.borrow_mut();
        if state.generation != self.generation {
            return Err(error(
                io::ErrorKind::Other,
                format!("{}: stale handle after crash", self.name),
            ));
        }
        if !state.files.contains_key(&self.id) {
            return Err(error(
                io::ErrorKind::NotFound,
                format!("{}: removed", self.name),
            ));
        }
        f(&mut state, self.id)
    }
}

fn file_mut(state: &mut MemState, id: FileId) -> &mut MemFile {
    state.files.get_mut(&id).expect("checked by with_file")
}

impl DiskFile for MemFileHandle {
    type Buffer = MemBuffer;
    type ReadBuffer = MemBuffer;

    async fn read_at(&self, position: u64, bytes: usize) -> io::Result<MemBuffer> {
        check_aligned("read", position, bytes)?;
        self.with_file(|state, id| {
            state.reads += 1;
            let file = file_mut(state, id);
            let start = (position as usize).min(file.written.len());
            let end = (position as usize + bytes).min(file.written.len());
            let mut buffer = MemBuffer::with_capacity(end - start);
            buffer.extend_from_slice(&file.written[start..end]);
            Ok(buffer)
        })
    }

    async fn write_at(&self, buffer: MemBuffer, position: u64) -> io::Result<usize> {
        check_aligned("write", position, buffer.len())?;
        self.with_file(|state, id| {
            if trip(&mut state.writes_until_eio) {
                return Err(io::Error::from_raw_os_error(5)); // EIO
            }
            let current = file_mut(state, id).written.len() as u64;
            let end = position + buffer.len() as u64;
            state.check_space(current, current.max(end))?;
            state.writes += 1;
            let file = file_mut(state, id);
            if file.written.len() < end as usize {
                file.written.resize(end as usize, 0);
            }
            file.written[position as usize..end as usize].copy_from_slice(&buffer);
            file.pending.push(PendingOp::Write {
                position,
                data: buffer.to_vec(),
            });
            Ok(buffer.len())
        })
    }

    async fn sync(&self) -> io::Result<()> {
        self.with_file(|state, id| {
            if trip(&mut state.syncs_until_eio) {
                // Like Linux after a failed writeback: the pending data may or may not be on the
                // media, and a later fsync will not report it again.
                return Err(io::Error::from_raw_os_error(5));
            }
            state.syncs += 1;
            let file = file_mut(state, id);
            // Apply what was issued since the last sync (cost proportional to it, not the file).
            for op in file.pending.drain(..) {
                match op {
                    PendingOp::SetLen { bytes } => file.durable.resize(bytes as usize, 0),
                    PendingOp::Write { position, data } => {
                        let end = position as usize + data.len();
                        if file.durable.len() < end {
                            file.durable.resize(end, 0);
                        }
                        file.durable[position as usize..end].copy_from_slice(&data);
                    }
                }
            }
            debug_assert!(
                file.durable == file.written,
                "durable image matches after sync"
            );
            Ok(())
        })
    }

    async fn file_bytes(&self) -> io::Result<u64> {
        self.with_file(|state, id| Ok(file_mut(state, id).written.len() as u64))
    }

    async fn set_len(&self, bytes: u64) -> io::Result<()> {
        self.with_file(|state, id| {
            let current = file_mut(state, id).written.len() as u64;
            state.check_space(current, bytes)?;
            let file = file_mut(state, id);
            file.written.resize(bytes as usize, 0);
            file.pending.push(PendingOp::SetLen { bytes });
            Ok(())
        })
    }

    async fn allocate(&self, bytes: u64) -> io::Result<()> {
        // fallocate without KEEP_SIZE: grows the file (zeros), never shrinks it.
        if bytes <= self.file_bytes().await? {
            return Ok(());
        }
        self.set_len(bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;

    #[test]
    fn unsynced_writes_are_lost_and_synced_ones_kept() {
        block_on(async {
            let disk = MemDisk::new();
            let file = disk.create("f").await.expect("create");
            disk.sync_dir().await.expect("sync dir");
            let mut page = disk.alloc_buffer(PAGE_BYTES);
            page.as_mut_slice().fill(1);
            file.write_at(page, 0).await.expect("write");
            file.sync().await.expect("sync");
            let mut page = disk.alloc_buffer(PAGE_BYTES);
            page.as_mut_slice().fill(2);
            file.write_at(page, PAGE_BYTES as u64).await.expect("write");
            disk.crash(CrashMode::LoseUnsynced);
            assert!(
                file.file_bytes().await.is_err(),
                "handle is stale after crash"
            );
            let file = disk.open("f").await.expect("open");
            assert_eq!(file.file_bytes().await.expect("len"), PAGE_BYTES as u64);
            assert!(file
                .read_at(0, PAGE_BYTES)
                .await
                .expect("read")
                .iter()
                .all(|&b| b == 1));
        });
    }

    #[test]
    fn directory_changes_are_pending_until_sync_dir() {
        block_on(async {
            let disk = MemDisk::new();
            let kept = disk.create("kept").await.expect("create");
            kept.sync().await.expect("sync");
            disk.sync_dir().await.expect("sync dir");
            let lost = disk.create("lost").await.expect("create");
            lost.sync()
                .await
                .expect("a synced file whose name is not durable");
            disk.rename("kept", "renamed").await.expect("rename");
            assert_eq!(kept.file_bytes().await.expect("handles follow renames"), 0);
            disk.crash(CrashMode::LoseUnsynced);
            assert_eq!(disk.file_names(), vec!["kept".to_string()]);
        });
    }

    #[test]
    fn misaligned_io_is_rejected() {
        block_on(async {
            let disk = MemDisk::new();
            let file = disk.create("f").await.expect("create");
            assert!(file.read_at(100, PAGE_BYTES).await.is_err());
            let mut odd = MemBuffer::new();
            odd.resize(100, 0);
            assert!(file.write_at(odd, 0).await.is_err());
        });
    }

    #[test]
    fn faults_fire_when_armed() {
        block_on(async {
            let disk = MemDisk::new();
            let file = disk.create("f").await.expect("create");
            disk.fail_syncs_after(Some(1));
            assert!(file.sync().await.is_err());
            disk.fail_syncs_after(None);
            disk.set_capacity(Some(PAGE_BYTES as u64));
            assert!(file
                .write_at(disk.alloc_buffer(PAGE_BYTES), 0)
                .await
                .is_ok());
            let error = file
                .write_at(disk.alloc_buffer(PAGE_BYTES), PAGE_BYTES as u64)
                .await;
            assert_eq!(error.expect_err("full").raw_os_error(), Some(28));
        });
    }
}
