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
