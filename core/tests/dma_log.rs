//! The disk-generic log suite on DmaDisk: real files, O_DIRECT through io_uring, in a temp dir.
//! Needs io_uring; if the kernel or sandbox refuses it, the test fails and says so.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use wharf::dma_disk::DmaDisk;
use wharf_storage::conformance::{run_all, Harness};

struct DmaHarness {
    root: PathBuf,
}

impl Harness for DmaHarness {
    type D = DmaDisk;

    async fn disk(&self, dir: &str) -> DmaDisk {
        DmaDisk::open(self.root.join(dir))
            .await
            .expect("open DmaDisk")
    }

    fn flip_bit(&self, dir: &str, file: &str, position: u64) {
        let path = self.root.join(dir).join(file);
        let mut handle = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open for damage");
        let mut byte = [0u8; 1];
        handle.seek(SeekFrom::Start(position)).expect("seek");
        handle.read_exact(&mut byte).expect("read");
        byte[0] ^= 1;
        handle.seek(SeekFrom::Start(position)).expect("seek");
        handle.write_all(&byte).expect("write");
        handle.sync_all().expect("sync");
    }
}

#[test]
fn log_suite_on_dma_disk() {
    let root = tempfile::tempdir().expect("tempdir");
    let harness = DmaHarness {
        root: root.path().to_path_buf(),
    };
    wharf::runtime::run_local("dma-log-test", async move { run_all(&harness).await })
        .expect("this test needs io_uring (glommio); the kernel or sandbox refused it");
}

#[test]
fn dma_self_test_writes_a_probe_and_reads_it_back() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("data");
    let names = wharf::runtime::run_local("dma-probe-test", async move {
        use wharf_storage::disk::Disk;
        let disk = DmaDisk::open(&dir).await.expect("self-test");
        assert!(dir.join(wharf::dma_disk::PROBE_FILE_NAME).exists());
        disk.list().await.expect("list")
    })
    .expect("this test needs io_uring (glommio)");
    assert!(
        names.is_empty(),
        "the probe is not listed as a log file: {names:?}"
    );
}

#[test]
fn relative_data_directories_work() {
    let root = tempfile::tempdir_in(".").expect("tempdir in the working directory");
    let relative = root.path().file_name().expect("name").to_owned();
    let relative = std::path::PathBuf::from(relative).join("data");
    wharf::runtime::run_local("dma-relative-test", async move {
        use wharf_storage::disk::{Disk, DiskFile};
        let disk = DmaDisk::open(&relative).await.expect("relative path opens");
        let file = disk.create("x.log").await.expect("create");
        file.allocate(1 << 20).await.expect("fallocate");
        assert_eq!(file.file_bytes().await.expect("len"), 1 << 20);
    })
    .expect("this test needs io_uring (glommio)");
}
