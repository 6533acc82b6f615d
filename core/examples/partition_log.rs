//! Appends a few records to a partition log on DmaDisk, flushes, reads them back, and closes.
//! `cargo run -p wharf --example partition_log -- [DIR]` (default ./wharf-data/example-0).

use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use wharf::dma_disk::DmaDisk;
use wharf_storage::batch::{batches, BatchBuilder, ProducerStamp};
use wharf_storage::{AppendMode, Epoch, LogConfig, PartitionLog};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "./wharf-data/example-0".to_string());
    wharf::runtime::run_local("example", async move {
        // Opening self-tests O_DIRECT on the directory and recovers whatever is there.
        let disk = DmaDisk::open(&dir).await?;
        let (mut log, report) =
            PartitionLog::open(Rc::new(disk), LogConfig::default(), now_ms()).await?;
        println!(
            "opened {dir}: {} segment(s), end offset {}, {report:?}",
            log.segment_count(),
            log.end_offset()
        );

        let mut builder = BatchBuilder::new(ProducerStamp::default());
        for i in 0..3 {
            builder.push(
                now_ms() as i64,
                Some(b"key"),
                format!("hello {i}").as_bytes(),
                &[],
            )?;
        }
        let mut batch = builder.finish()?;
        let appended = log.append(
            &mut batch,
            AppendMode::Leader {
                leader_epoch: Epoch(1),
            },
            now_ms(),
        )?;
        // Durable once flush returns; every append before it shares this one fdatasync.
        let durable = log.flush().await?;
        println!(
            "appended offsets {}..={}, durable below {durable}",
            appended.base_offset, appended.last_offset
        );

        let read = log.read(appended.base_offset, 1 << 20).await?;
        for checked in batches(read.bytes()) {
            let checked = checked?;
            for record in checked.records()?.iter() {
                println!("  {}", String::from_utf8_lossy(record.value.as_slice()));
            }
        }
        log.close().await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })??;
    Ok(())
}
