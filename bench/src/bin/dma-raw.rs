//! Baseline for `log-append`: the same write + fdatasync pattern straight on a glommio DmaFile,
//! without the log, so the log's own overhead can be told apart from the I/O stack's.
//!
//! `cargo run --release -p wharf-bench --bin dma-raw -- [--dir DIR] [--total-mib N] [--write-kib N]
//!  [--writes-in-flight N] [--fresh]`

use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

use glommio::io::{DmaFile, OpenOptions};
use wharf_bench::args;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let number = |name: &str, default: u64| args::number(&args, name, default);
    let dir = PathBuf::from(
        args::value(&args, "--dir").unwrap_or_else(|| "target/bench-dma-raw".to_string()),
    );
    let total_bytes = number("--total-mib", 2048) << 20;
    let write_bytes = (number("--write-kib", 256) << 10) as usize;
    let in_flight = number("--writes-in-flight", 4) as usize;
    let fresh = args::flag(&args, "--fresh");
    std::fs::create_dir_all(&dir).expect("dir");
    let rate = wharf::runtime::run_local("dma-raw", async move {
        let disk = wharf::dma_disk::DmaDisk::open(&dir)
            .await
            .expect("self-test");
        let path = disk.dir().join("raw.log");
        let _ = std::fs::remove_file(&path);
        let file: Rc<DmaFile> = Rc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .dma_open(&path)
                .await
                .expect("open"),
        );
        file.pre_allocate(total_bytes, false)
            .await
            .expect("fallocate");
        if !fresh {
            // Write the file once so the measured pass overwrites written blocks.
            let mut position = 0;
            while position < total_bytes {
                let buffer = file.alloc_dma_buffer(1 << 20);
                file.write_at(buffer, position).await.expect("write");
                position += 1 << 20;
            }
            file.fdatasync().await.expect("sync");
        }
        let start = Instant::now();
        let mut position = 0u64;
        while position < total_bytes {
            // One "flush": in_flight writes of write_bytes at once, then one fdatasync.
            let mut writes = Vec::new();
            for _ in 0..in_flight {
                let mut buffer = file.alloc_dma_buffer(write_bytes);
                buffer.as_bytes_mut().fill(0x5A);
                let file = Rc::clone(&file);
                let at = position;
                writes.push(async move { file.write_at(buffer, at).await.expect("write") });
                position += write_bytes as u64;
            }
            futures_util::future::join_all(writes).await;
            file.fdatasync().await.expect("sync");
        }
        let rate = total_bytes as f64 / start.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&path);
        rate
    })
    .expect("needs io_uring");
    println!(
        "dma-raw: {} x {} KiB writes in flight then fdatasync, {}: {:.2} GB/s",
        in_flight,
        write_bytes >> 10,
        if fresh {
            "fresh preallocated file"
        } else {
            "overwriting written blocks"
        },
        rate / 1e9
    );
}
