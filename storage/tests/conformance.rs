//! The disk-generic log suite on MemDisk (the same suite runs on DmaDisk in `core`).

use std::cell::RefCell;
use std::collections::HashMap;

use futures_lite::future::block_on;
use wharf_storage::conformance::{run_all, Harness};
use wharf_storage::mem_disk::MemDisk;

#[derive(Default)]
struct MemHarness {
    dirs: RefCell<HashMap<String, MemDisk>>,
}

impl Harness for MemHarness {
    type D = MemDisk;

    async fn disk(&self, dir: &str) -> MemDisk {
        self.dirs
            .borrow_mut()
            .entry(dir.to_string())
            .or_default()
            .clone()
    }

    fn flip_bit(&self, dir: &str, file: &str, position: u64) {
        self.dirs.borrow()[dir].flip_bit(file, position, 0);
    }
}

#[test]
fn log_suite_on_mem_disk() {
    block_on(run_all(&MemHarness::default()));
}
