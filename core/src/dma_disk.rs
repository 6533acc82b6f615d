//! `DmaDisk`: the storage [`Disk`] on glommio DMA files (O_DIRECT through io_uring).
//!
//! One `DmaDisk` per partition directory, used only from the executor that opened it.
//!
//! glommio 0.9.0 on virtio disks: if the first DMA file an executor opens on a device is empty,
//! its IOPOLL probe misfires and later reads fail with EOPNOTSUPP (upstream #605/#670). So
//! [`DmaDisk::open`] first opens a small non-empty probe file in the directory and reads it back as
//! a self-test, before any segment is touched. The probe stays open: its handle also allocates the
//! DMA buffers the log stages writes in.

use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::{Directory, DmaBuffer, DmaFile, OpenOptions, ReadResult};
use wharf_storage::disk::{Disk, DiskFile, IoBuffer, PAGE_BYTES};

/// Name of the self-test file written in every data directory.
pub const PROBE_FILE_NAME: &str = ".wharf-dma-probe";
const PROBE_PATTERN: &[u8; 16] = b"wharf-dma-probe\n";

fn with_path<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(glommio::GlommioError<()>) -> io::Error + 'a {
    move |error| {
        let error = io::Error::from(error);
        io::Error::new(error.kind(), format!("{op} {}: {error}", path.display()))
    }
}

/// A page-aligned DMA buffer (from the executor's registered `io_memory` when it has room). It
/// is reference-counted so the log can keep reading it while glommio writes it
/// (`DmaFile::write_rc_at`) and after; it is changed only while it is not shared.
pub struct DmaBuf(Rc<DmaBuffer>);

impl DmaBuf {
    fn unique(&mut self) -> &mut DmaBuffer {
        Rc::get_mut(&mut self.0).expect("a DMA buffer is changed only before it is shared")
    }
}

impl AsRef<[u8]> for DmaBuf {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl AsMut<[u8]> for DmaBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self.unique().as_bytes_mut()
    }
}

impl IoBuffer for DmaBuf {
    fn truncate(&mut self, bytes: usize) {
        assert_eq!(bytes % PAGE_BYTES, 0, "direct writes are page-aligned");
        self.unique().trim_to_size(bytes);
    }

    fn share(&self) -> Self {
        DmaBuf(Rc::clone(&self.0))
    }
}

pub struct DmaDisk {
    dir: PathBuf,
    directory: Directory,
    probe: DmaFile,
}

impl DmaDisk {
    /// Opens (creating if needed) the directory `dir` and runs the DMA self-test. Must run on the
    /// glommio executor that will use it, before that executor opens any other DMA file on the
    /// same device.
    pub async fn open(dir: impl AsRef<Path>) -> io::Result<DmaDisk> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| {
            io::Error::new(e.kind(), format!("create directory {}: {e}", dir.display()))
        })?;
        // glommio opens paths with openat(-1, ..), which fails with EBADF for relative paths.
        let dir = std::fs::canonicalize(&dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("resolve directory {}: {e}", dir.display()),
            )
        })?;
        let probe_path = dir.join(PROBE_FILE_NAME);
        let mut page = vec![0u8; PAGE_BYTES];
        for chunk in page.chunks_mut(PROBE_PATTERN.len()) {
            chunk.copy_from_slice(PROBE_PATTERN);
        }
        // Written with buffered I/O: the probe must exist, non-empty, before the first DMA open.
        let current = std::fs::read(&probe_path).ok();
        if current.as_deref() != Some(&page[..]) {
            std::fs::write(&probe_path, &page).map_err(|e| {
                io::Error::new(e.kind(), format!("write {}: {e}", probe_path.display()))
            })?;
        }
        let probe = DmaFile::open(&probe_path)
            .await
            .map_err(with_path("open", &probe_path))?;
        let read = probe
            .read_at_aligned(0, PAGE_BYTES)
            .await
            .map_err(with_path("read", &probe_path))?;
        if *read != page[..] {
            return Err(io::Error::other(format!(
                "DMA self-test failed: {} read back {} bytes that differ from what was written",
                probe_path.display(),
                read.len()
            )));
        }
        if !is_direct(&probe) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{} does not support O_DIRECT (tmpfs?); Wharf needs direct I/O for its durability and latency model",
                    dir.display()
                ),
            ));
        }
        let directory = Directory::open(&dir)
            .await
            .map_err(with_path("open directory", &dir))?;
        Ok(DmaDisk {
            dir,
            directory,
            probe,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> PathBuf {
        assert!(
            !name.contains('/') && !name.is_empty(),
            "plain file names only: {name:?}"
        );
        self.dir.join(name)
    }
}

/// glommio silently reopens a file without O_DIRECT when the filesystem refuses it; check.
fn is_direct(file: &DmaFile) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL only reads the flags of a file descriptor that `file` keeps open.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_DIRECT != 0
}

/// Whether `open_file` creates (truncating) or requires an existing file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OpenMode {
    Create,
    Existing,
}

impl DmaDisk {
    /// Opens `name` for reading and writing with O_DIRECT.
    async fn open_file(&self, name: &str, mode: OpenMode) -> io::Result<DmaDiskFile> {
        let path = self.path(name);
        let create = mode == OpenMode::Create;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(create)
            .dma_open(&path)
            .await
            .map_err(with_path(if create { "create" } else { "open" }, &path))?;
        Ok(DmaDiskFile { file, path })
    }
}

impl Disk for DmaDisk {
    type File = DmaDiskFile;
    type Buffer = DmaBuf;

    fn alloc_buffer(&self, bytes: usize) -> DmaBuf {
        assert_eq!(
            bytes % PAGE_BYTES,
            0,
            "buffer size {bytes} not page-aligned"
        );
        DmaBuf(Rc::new(self.probe.alloc_dma_buffer(bytes)))
    }

    async fn create(&self, name: &str) -> io::Result<DmaDiskFile> {
        self.open_file(name, OpenMode::Create).await
    }

    async fn open(&self, name: &str) -> io::Result<DmaDiskFile> {
        self.open_file(name, OpenMode::Existing).await
    }

    async fn list(&self) -> io::Result<Vec<String>> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| io::Error::new(e.kind(), format!("list {}: {e}", self.dir.display())))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                if name != PROBE_FILE_NAME {
                    names.push(name.to_string());
                }
            }
        }
        Ok(names)
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (from, to) = (self.path(from), self.path(to));
        glommio::io::rename(&from, &to)
            .await
            .map_err(with_path("rename", &from))
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        let path = self.path(name);
        glommio::io::remove(&path)
            .await
            .map_err(with_path("remove", &path))
    }

    async fn sync_dir(&self) -> io::Result<()> {
        self.directory
            .sync()
            .await
            .map_err(with_path("fsync", &self.dir))
    }
}

pub struct DmaDiskFile {
    file: DmaFile,
    path: PathBuf,
}

impl DiskFile for DmaDiskFile {
    type Buffer = DmaBuf;
    type ReadBuffer = ReadResult;

    async fn read_at(&self, position: u64, bytes: usize) -> io::Result<ReadResult> {
        self.file
            .read_at_aligned(position, bytes)
            .await
            .map_err(with_path("read", &self.path))
    }

    async fn write_at(&self, buffer: DmaBuf, position: u64) -> io::Result<usize> {
        self.file
            .write_rc_at(buffer.0, position)
            .await
            .map_err(with_path("write", &self.path))
    }

    async fn sync(&self) -> io::Result<()> {
        self.file
            .fdatasync()
            .await
            .map_err(with_path("fdatasync", &self.path))
    }

    async fn file_bytes(&self) -> io::Result<u64> {
        // fstat on the descriptor, not a stat of the path glommio remembers: a file renamed
        // after it was opened (a snapshot's temporary file) no longer lives at that path.
        use std::os::fd::AsRawFd;
        let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: the descriptor is open for the life of `self.file`; fstat writes `stat`.
        let rc = unsafe { libc::fstat(self.file.as_raw_fd(), stat.as_mut_ptr()) };
        if rc != 0 {
            let error = io::Error::last_os_error();
            return Err(io::Error::new(
                error.kind(),
                format!("stat {}: {error}", self.path.display()),
            ));
        }
        // SAFETY: fstat returned 0, so it filled `stat`.
        let stat = unsafe { stat.assume_init() };
        Ok(stat.st_size as u64)
    }

    async fn set_len(&self, bytes: u64) -> io::Result<()> {
        self.file
            .truncate(bytes)
            .await
            .map_err(with_path("ftruncate", &self.path))
    }

    /// Preallocation is only an optimization (writes into allocated extents are cheaper): it
    /// is skipped when the filesystem has less room than it asks for, so it can never be what
    /// fills the disk (a failed fallocate would poison the log; the disk-space guard refuses
    /// produce before the data itself needs the space).
    async fn allocate(&self, bytes: u64) -> io::Result<()> {
        let directory = self.path.parent().unwrap_or(std::path::Path::new("."));
        match free_disk_bytes(directory) {
            Ok(free_bytes) if free_bytes < bytes.saturating_mul(2) => {
                tracing::warn!(path = %self.path.display(), bytes, free_bytes, "not preallocating a segment: the disk has too little room");
                return Ok(());
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "cannot read free space; preallocating anyway"),
        }
        self.file
            .pre_allocate(bytes, false)
            .await
            .map_err(with_path("fallocate", &self.path))
    }
}

/// Bytes available to this (unprivileged) process on the filesystem holding `path`.
pub fn free_disk_bytes(path: &std::path::Path) -> Result<u64, String> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{} contains a NUL byte", path.display()))?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a valid C string and `stats` is large enough for the result.
    let status = unsafe { libc::statvfs(c_path.as_ptr(), stats.as_mut_ptr()) };
    if status != 0 {
        return Err(format!(
            "statvfs {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: statvfs succeeded, so it filled `stats`.
    let stats = unsafe { stats.assume_init() };
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}
