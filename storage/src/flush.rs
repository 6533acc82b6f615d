//! A flush detached from the log: the I/O that makes staged appends durable, run while the log
//! keeps taking appends (see `PartitionLog::begin_flush`).

use std::io;
use std::rc::Rc;

use crate::checkpoint::{Checkpoint, CHECKPOINT_FILE_NAME};
use crate::disk::{Disk, DiskFile, PAGE_BYTES};
use crate::ids::Offset;
use crate::log::{index_file_name, io_context, FileCell, LogIoError, LogPoint};

/// A segment file a flush creates (or takes over from a recycled file) before writing to it.
pub(crate) struct SegmentCreate<F> {
    pub(crate) name: String,
    pub(crate) file: FileCell<F>,
    pub(crate) preallocate_bytes: u64,
    pub(crate) recycled: Option<String>,
}

/// One page-aligned write of a flush.
pub(crate) struct SegmentWrite<F, B> {
    pub(crate) name: String,
    pub(crate) file: FileCell<F>,
    pub(crate) position: u64,
    pub(crate) buffer: B,
}

/// The I/O of one flush, detached from the log so that appends can go on while it runs.
pub struct FlushJob<D: Disk> {
    pub(crate) disk: Rc<D>,
    /// The previous flush's writes must finish before ours start (shared tail page).
    pub(crate) wait_for_writes: Option<futures_channel::oneshot::Receiver<()>>,
    pub(crate) writes_done: futures_channel::oneshot::Sender<()>,
    pub(crate) creates: Vec<SegmentCreate<D::File>>,
    pub(crate) writes: Vec<SegmentWrite<D::File, D::Buffer>>,
    pub(crate) index_writes: Vec<(Offset, Vec<u8>)>,
    pub(crate) trims: Vec<(String, FileCell<D::File>, u64)>,
    pub(crate) syncs: Vec<(String, FileCell<D::File>)>,
    pub(crate) checkpoint: Option<(Checkpoint, FileCell<D::File>)>,
    pub(crate) target: LogPoint,
}

/// What a finished [`FlushJob`] reports back to [`PartitionLog::complete_flush`].
pub struct FlushOutcome {
    pub(crate) target: LogPoint,
    pub(crate) indexed: Vec<Offset>,
    pub(crate) checkpoint: Option<Checkpoint>,
    pub(crate) result: Result<(), LogIoError>,
}

impl<D: Disk> FlushJob<D> {
    /// Runs the flush: create new segment files, write everything (all writes in flight at
    /// once), trim sealed segments, then fdatasync every touched file. Returns when the target
    /// is durable or an error occurred.
    pub async fn run(self) -> FlushOutcome {
        let FlushJob {
            disk,
            wait_for_writes,
            writes_done,
            creates,
            writes,
            index_writes,
            trims,
            syncs,
            checkpoint,
            target,
        } = self;
        let indexed: Vec<Offset> = index_writes.iter().map(|(base, _)| *base).collect();
        let checkpoint_written = checkpoint.as_ref().map(|(c, _)| *c);
        let result = async {
            if let Some(previous) = wait_for_writes {
                if previous.await.is_err() {
                    return Err(LogIoError {
                        op: "flush",
                        file: String::new(),
                        source: io::Error::other(
                            "an earlier flush failed before finishing its writes",
                        ),
                    });
                }
            }
            for SegmentCreate {
                name,
                file: cell,
                preallocate_bytes,
                recycled,
            } in &creates
            {
                let file = match recycled {
                    Some(recycled) => {
                        // Its stale batches have offsets below this segment's base, so recovery's
                        // offset-continuity check never takes them for ours.
                        disk.rename(recycled, name)
                            .await
                            .map_err(io_context("rename", recycled))?;
                        disk.open(name).await.map_err(io_context("open", name))?
                    }
                    None => disk
                        .create(name)
                        .await
                        .map_err(io_context("create", name))?,
                };
                if *preallocate_bytes > 0 {
                    file.allocate(*preallocate_bytes)
                        .await
                        .map_err(io_context("fallocate", name))?;
                }
                assert!(
                    cell.set(Rc::new(file)).is_ok(),
                    "segment file created twice"
                );
            }
            let mut pending = Vec::new();
            for SegmentWrite {
                name,
                file: cell,
                position,
                buffer,
            } in writes
            {
                let file = Rc::clone(cell.get().expect("created above or earlier"));
                pending.push(Box::pin(async move {
                    let bytes = buffer.as_ref().len();
                    let written = file
                        .write_at(buffer, position)
                        .await
                        .map_err(io_context("write", &name))?;
                    if written != bytes {
                        return Err(LogIoError {
                            op: "write",
                            file: name.clone(),
                            source: io::Error::new(
                                io::ErrorKind::WriteZero,
                                format!("short write {written} of {bytes}"),
                            ),
                        });
                    }
                    Ok(())
                })
                    as std::pin::Pin<
                        Box<dyn std::future::Future<Output = Result<(), LogIoError>>>,
                    >);
            }
            if let Some((checkpoint, cell)) = &checkpoint {
                let file = Rc::clone(cell.get().expect("checkpoint file opened at open"));
                let mut buffer = disk.alloc_buffer(PAGE_BYTES);
                buffer.as_mut().copy_from_slice(&checkpoint.encode());
                let position = (checkpoint.slot() * PAGE_BYTES) as u64;
                pending.push(Box::pin(async move {
                    file.write_at(buffer, position)
                        .await
                        .map_err(io_context("write", CHECKPOINT_FILE_NAME))?;
                    Ok(())
                }));
            }
            for result in futures_util::future::join_all(pending).await {
                result?;
            }
            // The next flush may now write (it may rewrite our partial tail page). Its receiver
            // may already be gone if no flush follows; that is fine.
            let _ = writes_done.send(());
            for (name, cell, bytes) in &trims {
                let file = cell.get().expect("sealed segment has a file");
                file.set_len(*bytes)
                    .await
                    .map_err(io_context("ftruncate", name))?;
            }
            let mut sync_all = Vec::new();
            for (name, cell) in &syncs {
                let file = Rc::clone(cell.get().expect("synced file exists"));
                let name = name.clone();
                sync_all.push(Box::pin(async move {
                    file.sync().await.map_err(io_context("fdatasync", &name))
                })
                    as std::pin::Pin<
                        Box<dyn std::future::Future<Output = Result<(), LogIoError>>>,
                    >);
            }
            if let Some((_, cell)) = &checkpoint {
                let file = Rc::clone(cell.get().expect("checkpoint file"));
                sync_all.push(Box::pin(async move {
                    file.sync()
                        .await
                        .map_err(io_context("fdatasync", CHECKPOINT_FILE_NAME))
                }));
            }
            for result in futures_util::future::join_all(sync_all).await {
                result?;
            }
            // Index files of sealed segments are written only once their data is synced, so a
            // valid index file proves its segment is durable (recovery trusts it).
            let mut index_all = Vec::new();
            for (base, bytes) in index_writes {
                let disk = Rc::clone(&disk);
                index_all.push(Box::pin(async move {
                    let name = index_file_name(base);
                    let file = disk
                        .create(&name)
                        .await
                        .map_err(io_context("create", &name))?;
                    let mut buffer = disk.alloc_buffer(bytes.len());
                    buffer.as_mut().copy_from_slice(&bytes);
                    file.write_at(buffer, 0)
                        .await
                        .map_err(io_context("write", &name))?;
                    file.sync().await.map_err(io_context("fdatasync", &name))
                }));
            }
            for result in futures_util::future::join_all(index_all).await {
                result?;
            }
            if !creates.is_empty() || !indexed.is_empty() {
                disk.sync_dir()
                    .await
                    .map_err(io_context("fsync directory", "."))?;
            }
            Ok(())
        }
        .await;
        FlushOutcome {
            target,
            indexed,
            checkpoint: checkpoint_written,
            result,
        }
    }
}
