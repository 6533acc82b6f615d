//! The `Disk` trait: every byte the log reads or writes goes through it.
//!
//! The contract follows O_DIRECT on Linux, so that a log correct on [`crate::mem_disk::MemDisk`]
//! is correct on real files:
//! - `read_at` and `write_at` positions and lengths are multiples of [`PAGE_BYTES`]; buffers
//!   come from [`Disk::alloc_buffer`] and are suitably aligned.
//! - A returned `write_at` means the bytes were handed to the device: they are *not* durable.
//!   Only a returned [`DiskFile::sync`] (fdatasync) makes earlier writes to that file durable,
//!   including size changes from `set_len` and `allocate`.
//! - Writes in flight at the same time may land in any order, and a crash can tear any of them
//!   at sector granularity.
//! - After an error from `write_at` or `sync` the file's durable state is unknown; callers must
//!   not retry (fsyncgate) and poison whatever depends on it.

use std::io;
use std::ops::Deref;

/// The unit of direct I/O: positions, lengths and buffer alignment.
pub const PAGE_BYTES: usize = 4096;

pub fn page_floor(position: u64) -> u64 {
    position - position % PAGE_BYTES as u64
}

pub fn page_ceil(position: u64) -> u64 {
    position.next_multiple_of(PAGE_BYTES as u64)
}

/// A directory of files accessed with direct I/O. Names are plain file names (no `/`).
#[expect(
    async_fn_in_trait,
    reason = "single-threaded executors; futures need not be Send"
)]
pub trait Disk {
    type File: DiskFile<Buffer = Self::Buffer>;
    /// A writable buffer aligned for direct I/O.
    type Buffer: IoBuffer;

    /// A buffer of `bytes` (a multiple of [`PAGE_BYTES`]) for `write_at`. Contents are unspecified.
    fn alloc_buffer(&self, bytes: usize) -> Self::Buffer;
    /// Creates `name` empty, truncating it if it exists, opened for reading and writing.
    async fn create(&self, name: &str) -> io::Result<Self::File>;
    /// Opens the existing file `name` for reading and writing.
    async fn open(&self, name: &str) -> io::Result<Self::File>;
    /// The names of the files in the directory, in no particular order.
    async fn list(&self) -> io::Result<Vec<String>>;
    /// Renames `from` to `to`, replacing `to`. Durable once [`Disk::sync_dir`] returns.
    async fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Removes `name`. Durable once [`Disk::sync_dir`] returns.
    async fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes creations and removals durable (fsync on the directory).
    async fn sync_dir(&self) -> io::Result<()>;
}

/// One open file. See the module docs for what each return means for durability.
#[expect(
    async_fn_in_trait,
    reason = "single-threaded executors; futures need not be Send"
)]
pub trait DiskFile {
    type Buffer: IoBuffer;
    /// Bytes read; may be shorter than asked at end of file. Aligned to at least 16 bytes.
    type ReadBuffer: Deref<Target = [u8]>;

    async fn read_at(&self, position: u64, bytes: usize) -> io::Result<Self::ReadBuffer>;
    /// Writes the whole buffer at `position`. Not durable until [`DiskFile::sync`].
    async fn write_at(&self, buffer: Self::Buffer, position: u64) -> io::Result<usize>;
    /// fdatasync: every write and size change that returned before this call is durable.
    async fn sync(&self) -> io::Result<()>;
    async fn file_bytes(&self) -> io::Result<u64>;
    /// Truncates or extends (with zeros) to `bytes`.
    async fn set_len(&self, bytes: u64) -> io::Result<()>;
    /// Preallocates the file to `bytes` (fallocate; the size grows, contents read as zeros), so
    /// direct writes land inside the file instead of extending it.
    async fn allocate(&self, bytes: u64) -> io::Result<()>;
}

/// A buffer for direct writes. `truncate` shortens it (to a page multiple) without copying, so a
/// partly filled staging buffer can be written as is.
pub trait IoBuffer: AsRef<[u8]> + AsMut<[u8]> {
    fn truncate(&mut self, bytes: usize);
    /// Another handle to the same bytes, so they can be read while a write of this buffer is in
    /// flight and after it (the log serves recent batches from memory this way). After sharing,
    /// neither handle may be changed: `as_mut` and `truncate` panic on a shared real buffer.
    fn share(&self) -> Self;
}
