//! Storage benchmarks (criterion). Quick mode for CI:
//! `cargo bench -p wharf-bench --bench storage -- --warm-up-time 0.5 --measurement-time 2 --sample-size 10`

use std::cell::RefCell;
use std::hint::black_box;
use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use futures_lite::future::block_on;
use wharf_bench::{make_batch, timed_append, AppendWorkload, DmaAppender};
use wharf_storage::batch::{validate_batch, BatchBuilder, ProducerStamp};
use wharf_storage::index::SparseIndex;
use wharf_storage::log::{AppendMode, LogConfig, PartitionLog};
use wharf_storage::mem_disk::MemDisk;
use wharf_storage::policy::RetentionLimits;
use wharf_storage::Epoch;

const RECORD_BYTES: usize = 1024;
const RECORDS_PER_BATCH: usize = 62; // about 64 KiB per batch

fn batch_codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("batch");
    let value = vec![0x5Au8; RECORD_BYTES];
    group.throughput(Throughput::Elements(RECORDS_PER_BATCH as u64));
    group.bench_function("build 62 x 1 KiB records (records/s)", |b| {
        b.iter(|| {
            let mut builder = BatchBuilder::new(ProducerStamp::default());
            for i in 0..RECORDS_PER_BATCH {
                builder.push(i as i64, None, &value, &[]).expect("push");
            }
            black_box(builder.finish().expect("finish"))
        })
    });
    let batch = make_batch(RECORDS_PER_BATCH, RECORD_BYTES);
    group.throughput(Throughput::Bytes(batch.len() as u64));
    group.bench_function("validate + read 64 KiB batch (bytes/s)", |b| {
        b.iter(|| {
            let checked = validate_batch(black_box(&batch)).expect("valid");
            let records = checked.records().expect("records");
            black_box(records.iter().map(|r| r.value.len()).sum::<usize>())
        })
    });
    group.finish();
}

fn crc(c: &mut Criterion) {
    let mut group = c.benchmark_group("crc32c");
    for bytes in [4096usize, 64 * 1024, 1 << 20] {
        let data = vec![0xA5u8; bytes];
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(format!("{bytes} bytes"), |b| {
            b.iter(|| crc32c::crc32c(black_box(&data)))
        });
    }
    group.finish();
}

fn index_lookup(c: &mut Criterion) {
    // A full 1 GiB segment at one entry per 4 KiB: 262,144 entries.
    let mut index = SparseIndex::new(4096);
    for i in 0..262_144u32 {
        index.observe(i * 4, i * 4096);
    }
    let mut probe = 0u32;
    c.bench_function("index lookup in 262144 entries", |b| {
        b.iter(|| {
            probe = probe.wrapping_mul(1_664_525).wrapping_add(1_013_904_223) % (262_144 * 4);
            black_box(index.lookup(probe))
        })
    });
}

fn mem_append(c: &mut Criterion) {
    let disk = MemDisk::new();
    let config = LogConfig {
        segment_bytes_max: 16 << 20,
        preallocate: false,
        retention: RetentionLimits {
            retention_bytes_max: Some(32 << 20),
            retention_ms_max: None,
        },
        recycled_segments_max: 0,
        ..LogConfig::default()
    };
    let (mut log, _) = block_on(PartitionLog::open(Rc::new(disk), config, 0)).expect("open");
    let batch = make_batch(RECORDS_PER_BATCH, RECORD_BYTES);
    let mut group = c.benchmark_group("log on MemDisk");
    group.throughput(Throughput::Bytes(16 * batch.len() as u64));
    group.bench_function("append 16 x 64 KiB batches + flush", |b| {
        b.iter_batched_ref(
            || batch.clone(),
            |batch| {
                for _ in 0..16 {
                    log.append(
                        batch,
                        AppendMode::Leader {
                            leader_epoch: Epoch(1),
                        },
                        0,
                    )
                    .expect("append");
                }
                block_on(log.flush()).expect("flush");
                block_on(log.apply_retention(0)).expect("retention");
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn dma_append(c: &mut Criterion) {
    let dir = std::env::var("WHARF_BENCH_DIR")
        .unwrap_or_else(|_| "target/bench-criterion-dma".to_string());
    let _ = std::fs::remove_dir_all(&dir);
    let executor = glommio::LocalExecutorBuilder::default()
        .io_memory(wharf::runtime::IO_MEMORY_BYTES_DEFAULT)
        .make()
        .expect("this benchmark needs io_uring (glommio)");
    let appender = Rc::new(RefCell::new(None::<DmaAppender>));
    {
        let appender = Rc::clone(&appender);
        let dir = dir.clone();
        executor.run(async move {
            let opened =
                DmaAppender::open(std::path::Path::new(&dir), AppendWorkload::default()).await;
            *appender.borrow_mut() = Some(opened);
        });
    }
    let mut group = c.benchmark_group("log on DmaDisk");
    let per_iteration_bytes: u64 = 16 << 20;
    group.throughput(Throughput::Bytes(per_iteration_bytes));
    group.bench_function(
        "append 1 KiB records in 64 KiB batches, fdatasync per 1 MiB (16 MiB)",
        |b| {
            b.iter_custom(|iterations| {
                let appender = Rc::clone(&appender);
                executor.run(async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iterations {
                        // The appender is only touched inside this executor; no borrow spans tasks.
                        let mut taken = appender.borrow_mut().take().expect("appender");
                        let start = Instant::now();
                        timed_append(&mut taken, per_iteration_bytes).await;
                        total += start.elapsed();
                        *appender.borrow_mut() = Some(taken);
                    }
                    total
                })
            })
        },
    );
    group.finish();
    drop(appender);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(
    benches,
    batch_codec,
    crc,
    index_lookup,
    mem_append,
    dma_append
);
criterion_main!(benches);
