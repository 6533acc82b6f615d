//! Helpers to run work on glommio executors with explicit, bounded settings.

use glommio::LocalExecutorBuilder;

/// Registered DMA memory per executor. This host allows 8 MiB of locked memory by default, so a
/// shard asks for less; buffers beyond it fall back to ordinary aligned allocations.
pub const IO_MEMORY_BYTES_DEFAULT: usize = 4 * 1024 * 1024;
/// io_uring submission queue depth per executor.
pub const RING_DEPTH_DEFAULT: usize = 128;

/// Runs `future` to completion on a fresh glommio executor on the current thread.
pub fn run_local<T>(
    name: &str,
    future: impl std::future::Future<Output = T>,
) -> std::io::Result<T> {
    let executor = LocalExecutorBuilder::default()
        .name(name)
        .io_memory(IO_MEMORY_BYTES_DEFAULT)
        .ring_depth(RING_DEPTH_DEFAULT)
        .make()
        .map_err(|e| {
            std::io::Error::other(format!("cannot start a glommio executor (io_uring): {e}"))
        })?;
    Ok(executor.run(future))
}

/// Staging and frame buffers of a megabyte or more are allocated and freed for every request.
/// With glibc's defaults each one is a fresh `mmap` (above the mmap threshold) or is trimmed back
/// to the kernel when freed, so every request pays a page fault per 4 KiB it touches (measured:
/// page faults and their memcg accounting took a quarter of the broker's CPU with 1 MiB
/// batches). Fixed thresholds keep freed memory in the process for the next request. Call it
/// before any thread starts. Returns whether the allocator took the thresholds (it logs a
/// warning when not).
pub fn keep_freed_memory() -> bool {
    /// Allocations below this come from the heap and are reused after a free.
    const MMAP_THRESHOLD_BYTES: i32 = 32 * 1024 * 1024;
    /// Free memory at the top of a heap is given back to the kernel only beyond this.
    const TRIM_THRESHOLD_BYTES: i32 = 256 * 1024 * 1024;
    // SAFETY: mallopt only changes allocator tunables; it is called before other threads exist.
    let set = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    };
    if !set {
        tracing::warn!("mallopt refused the allocator thresholds; large buffers stay mmap-backed");
    }
    set
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_allocator_takes_the_thresholds() {
        assert!(super::keep_freed_memory());
    }
}
