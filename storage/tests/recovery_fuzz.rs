//! Property test of the recovery scan: a segment of valid batches, damaged by arbitrary byte
//! changes and followed by arbitrary garbage, never makes `open` panic, and with no checkpoint
//! (nothing known durable) recovery keeps exactly the batches before the first damaged one.

mod common;

use common::*;
use futures_lite::future::block_on;
use proptest::prelude::*;
use wharf_storage::batch::stamp;
use wharf_storage::disk::{Disk, DiskFile, PAGE_BYTES};
use wharf_storage::log::segment_file_name;
use wharf_storage::mem_disk::MemDisk;
use wharf_storage::{Epoch, Offset};

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]
    #[test]
    fn recovery_keeps_the_prefix_before_the_first_damage(
        sizes in proptest::collection::vec((1usize..4, 0usize..1500), 1..20),
        damage in proptest::collection::vec((any::<u32>(), 1u8..=255), 0..4),
        garbage in proptest::collection::vec(any::<u8>(), 0..3000),
    ) {
        // Lay out valid batches with dense offsets.
        let mut bytes = Vec::new();
        let mut starts = Vec::new();
        let mut next = 0u64;
        for (tag, (records, value_bytes)) in sizes.iter().enumerate() {
            let mut batch = make_batch(*records, *value_bytes, tag as u64, 0);
            stamp(&mut batch, Offset(next), Epoch(1));
            starts.push(bytes.len());
            next += *records as u64;
            bytes.extend_from_slice(&batch);
        }
        let valid_end = bytes.len();
        bytes.extend_from_slice(&garbage);
        // Damage: XOR non-zero values at arbitrary positions (inside batches or the garbage).
        let mut first_damaged = starts.len();
        for (at, xor) in &damage {
            let at = *at as usize % bytes.len();
            bytes[at] ^= xor;
            if at < valid_end {
                let batch = starts.partition_point(|s| *s <= at) - 1;
                first_damaged = first_damaged.min(batch);
            }
        }
        let disk = MemDisk::new();
        block_on(async {
            let file = disk.create(&segment_file_name(Offset(0))).await.expect("create");
            let mut buffer = disk.alloc_buffer(bytes.len().next_multiple_of(PAGE_BYTES));
            buffer.as_mut_slice().fill(0);
            buffer[..bytes.len()].copy_from_slice(&bytes);
            file.write_at(buffer, 0).await.expect("write");
            file.sync().await.expect("sync");
        });
        let (log, report) = open(&disk, small_config());
        prop_assert!(report.corrupt.is_empty(), "nothing is known durable, so nothing is corrupt");
        let recovered = read_all(&log);
        prop_assert_eq!(recovered.len(), first_damaged, "{:?}", report);
        for (i, (offset, batch)) in recovered.iter().enumerate() {
            prop_assert_eq!(&batch[..], &bytes[starts[i]..starts[i] + batch.len()]);
            prop_assert_eq!(offset.0, sizes[..i].iter().map(|(r, _)| *r as u64).sum::<u64>());
        }
    }
}
