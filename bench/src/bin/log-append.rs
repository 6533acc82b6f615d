//! Append throughput of `PartitionLog` on `DmaDisk` (O_DIRECT, io_uring, fdatasync per flush),
//! reported next to fio's figure from `bench/limits.sh` when `target/limits.json` exists.
//!
//! `cargo run --release -p wharf-bench --bin log-append -- [--dir DIR] [--total-mib N] [--runs N]
//!   [--record-bytes B] [--batch-bytes B] [--flush-bytes B] [--chunk-bytes B] [--segment-mib N]
//!   [--checkpoint-interval-bytes B] [--fresh] [--keep-all]`
//!
//! Retention keeps two segments, so after the first ones new segments reuse recycled files (the
//! steady state of a broker with retention). `--fresh` disables recycling (every segment is a
//! newly preallocated file), `--keep-all` disables retention, and
//! `--checkpoint-interval-bytes 0` writes the durable checkpoint with every flush.

use std::path::PathBuf;

use wharf_bench::{args, timed_append, AppendWorkload, DmaAppender};

fn main() {
    // As the broker does: large staging buffers are reused instead of page-faulted in anew.
    let _ = wharf::runtime::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let number = |name: &str, default: u64| args::number(&args, name, default);
    let dir = PathBuf::from(
        args::value(&args, "--dir").unwrap_or_else(|| "target/bench-log-append".to_string()),
    );
    let total_bytes = number("--total-mib", 4096) << 20;
    let runs = number("--runs", 3);
    let workload = AppendWorkload {
        record_bytes: number("--record-bytes", 1024) as usize,
        batch_bytes: number("--batch-bytes", 64 * 1024) as usize,
        flush_bytes: number("--flush-bytes", 1 << 20) as usize,
        write_chunk_bytes: number("--chunk-bytes", 1024 * 1024) as usize,
        segment_bytes_max: number("--segment-mib", 256) << 20,
        recycle: !args::flag(&args, "--fresh"),
        retain_segments: (!args::flag(&args, "--keep-all")).then_some(2),
        checkpoint_interval_bytes: number(
            "--checkpoint-interval-bytes",
            AppendWorkload::default().checkpoint_interval_bytes,
        ),
    };
    let _ = std::fs::remove_dir_all(&dir);
    let report = wharf::runtime::run_local("log-append", {
        let dir = dir.clone();
        let workload = workload.clone();
        async move {
            let mut appender = DmaAppender::open(&dir, workload).await;
            // Warm-up: first segment creation and preallocation.
            timed_append(&mut appender, 64 << 20).await;
            let mut rates = Vec::new();
            for _ in 0..runs {
                let (bytes, elapsed) = timed_append(&mut appender, total_bytes).await;
                rates.push(bytes as f64 / elapsed.as_secs_f64());
            }
            (appender.batch_bytes(), rates)
        }
    })
    .expect("this benchmark needs io_uring");
    let _ = std::fs::remove_dir_all(&dir);
    let (batch_bytes, mut rates) = report;
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    println!(
        "log-append: {} B records in {} B batches, fdatasync per {} B, {} B write chunks, {} MiB segments, {}, fsync mode always",
        workload.record_bytes,
        batch_bytes,
        workload.flush_bytes,
        workload.write_chunk_bytes,
        workload.segment_bytes_max >> 20,
        if workload.recycle { "segment recycling on" } else { "fresh segments only (--fresh)" }
    );
    println!(
        "  runs: {:?} GB/s",
        rates
            .iter()
            .map(|r| format!("{:.2}", r / 1e9))
            .collect::<Vec<_>>()
    );
    println!("  median: {:.2} GB/s", median / 1e9);
    if let Ok(limits) = std::fs::read_to_string("target/limits.json") {
        let key = "\"odirect_seq_write_1m_qd1_prealloc_bytes_per_s\":";
        if let Some(fio) = limits
            .split(key)
            .nth(1)
            .and_then(|rest| rest.split([',', '}']).next())
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            println!(
                "  fio O_DIRECT 1 MiB qd1 prealloc: {:.2} GB/s -> ratio {:.0}% (target >= 70%)",
                fio / 1e9,
                100.0 * median / fio
            );
        }
    }
}
