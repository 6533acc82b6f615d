//! Reads: whole batches below the high watermark (consumers) or the log end (followers), long
//! polls for new data, and offset lookups (earliest, latest, by timestamp).

use std::time::Instant;

use wharf_storage::batch::{self, BatchError};
use wharf_storage::Offset;

use super::log_slot::log_busy;
use super::{park, FetchData, Partition, PartitionError};
use crate::protocol::{ErrorCode, OffsetSpec};

/// Reads retried after racing retention before giving up.
const READ_RETRIES_MAX: usize = 3;
/// Bytes scanned per step of a timestamp lookup.
const TIMESTAMP_SCAN_BYTES: usize = 1024 * 1024;

impl Partition {
    /// Resolves once the high watermark passes `offset`, or at `deadline`.
    pub async fn wait_for_data(&self, offset: Offset, deadline: Instant) {
        if self.high_watermark.get() > offset || self.closing.get() {
            return;
        }
        let woken = park(&self.data_waiters);
        // Counts this fetch as parked until it returns or is dropped.
        struct Parked<'a>(&'a prometheus_client::metrics::gauge::Gauge);
        impl Drop for Parked<'_> {
            fn drop(&mut self) {
                self.0.dec();
            }
        }
        self.metrics.fetches_waiting.inc();
        let _parked = Parked(&self.metrics.fetches_waiting);
        let remaining = deadline.saturating_duration_since(Instant::now());
        let _ = glommio::timer::timeout(remaining, async {
            let _ = woken.await;
            Ok(())
        })
        .await;
    }

    /// Whole batches from `from`, up to `max_bytes` (at least one batch if any), below the high
    /// watermark.
    pub async fn read(&self, from: Offset, max_bytes: usize) -> Result<FetchData, PartitionError> {
        self.read_to(from, max_bytes, Some(self.high_watermark.get()))
            .await
    }

    /// A follower serving a consumer (follower reads): committed batches only, below this
    /// replica's high watermark. A consumer ahead of this replica's log end (it read further
    /// at the leader) gets nothing yet instead of an error: its long poll waits for this
    /// replica to catch up.
    pub async fn read_committed(
        &self,
        from: Offset,
        max_bytes: usize,
    ) -> Result<FetchData, PartitionError> {
        let end = self.log.get().map(|log| log.end_offset());
        if end.is_some_and(|end| from > end) {
            return Ok(FetchData {
                high_watermark: self.high_watermark.get(),
                log_start_offset: self.log_start().await?,
                read: None,
                bytes: 0,
            });
        }
        self.read(from, max_bytes).await
    }

    /// Whole batches from `from` that start below `limit` (the log end when `None`: followers
    /// copy what consumers cannot see yet).
    pub(crate) async fn read_to(
        &self,
        from: Offset,
        max_bytes: usize,
        limit: Option<Offset>,
    ) -> Result<FetchData, PartitionError> {
        for _ in 0..READ_RETRIES_MAX {
            let reported_high_watermark = self.high_watermark.get();
            let plan = {
                let Some(_guard) = self.shared().await else {
                    return Err(PartitionError::new(
                        ErrorCode::PartitionUnavailable,
                        "partition closed",
                    ));
                };
                let log = self.log.get().ok_or_else(log_busy)?;
                let log_start = log.log_start_offset();
                let end = log.end_offset();
                let high_watermark = limit.unwrap_or(end);
                if from < log_start || from > end {
                    return Err(PartitionError::new(
                        ErrorCode::OffsetOutOfRange,
                        format!("offset {from} is outside [{log_start}, {end}]"),
                    ));
                }
                if from >= high_watermark {
                    return Ok(FetchData {
                        high_watermark: reported_high_watermark,
                        log_start_offset: log_start,
                        read: None,
                        bytes: 0,
                    });
                }
                (log.plan_read(from, max_bytes), log_start, high_watermark)
            };
            let (plan, log_start, high_watermark) = plan;
            let plan = plan.map_err(read_error)?;
            let read = match plan.execute().await {
                Ok(read) => read,
                Err(wharf_storage::log::ReadError::Retry { .. }) => continue,
                Err(e) => return Err(read_error(e)),
            };
            let bytes = bytes_below(read.bytes(), high_watermark);
            self.metrics.fetched_bytes.inc_by(bytes as u64);
            return Ok(FetchData {
                high_watermark: reported_high_watermark,
                log_start_offset: log_start,
                read: Some(read),
                bytes,
            });
        }
        Err(PartitionError::new(
            ErrorCode::PartitionUnavailable,
            "the log kept changing under the read (retention); retry",
        ))
    }

    async fn log_start(&self) -> Result<Offset, PartitionError> {
        let Some(_guard) = self.shared().await else {
            return Err(PartitionError::new(
                ErrorCode::PartitionUnavailable,
                "partition closed",
            ));
        };
        let log = self.log.get().ok_or_else(log_busy)?;
        Ok(log.log_start_offset())
    }

    pub async fn list_offset(&self, spec: OffsetSpec) -> Result<Offset, PartitionError> {
        match spec {
            OffsetSpec::Earliest => self.log_start().await,
            OffsetSpec::Latest => Ok(self.high_watermark.get()),
            OffsetSpec::Timestamp(timestamp_ms) => self.offset_for_timestamp(timestamp_ms).await,
        }
    }

    /// Scans batch headers from the log start (no time index yet) for the first record at or
    /// after `timestamp_ms`; the high watermark when there is none.
    async fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Offset, PartitionError> {
        let mut at = self.log_start().await?;
        loop {
            let data = self.read(at, TIMESTAMP_SCAN_BYTES).await?;
            let bytes = data.slice();
            if bytes.is_empty() {
                return Ok(data.high_watermark);
            }
            for checked in batch::batches(bytes) {
                let checked = checked
                    .map_err(|e| PartitionError::new(ErrorCode::CorruptData, e.to_string()))?;
                let header = checked.header;
                if header.max_timestamp_ms >= timestamp_ms {
                    let records = checked
                        .records()
                        .map_err(|e| PartitionError::new(ErrorCode::CorruptData, e.to_string()))?;
                    for (i, record) in records.iter().enumerate() {
                        let ts = header.first_timestamp_ms + record.timestamp_delta_ms.to_native();
                        if ts >= timestamp_ms {
                            return Ok(header.base_offset.plus(i as u64));
                        }
                    }
                }
                at = header.next_offset();
            }
        }
    }
}

fn read_error(error: wharf_storage::log::ReadError) -> PartitionError {
    use wharf_storage::log::ReadError;
    match error {
        ReadError::OutOfRange { .. } => {
            PartitionError::new(ErrorCode::OffsetOutOfRange, error.to_string())
        }
        ReadError::Corrupt { .. } => PartitionError::new(ErrorCode::CorruptData, error.to_string()),
        ReadError::Retry { .. } => {
            PartitionError::new(ErrorCode::PartitionUnavailable, error.to_string())
        }
        ReadError::Io(_) => PartitionError::new(ErrorCode::StorageError, error.to_string()),
    }
}

/// Bytes of the leading whole batches in `bytes` that start below `high_watermark`.
fn bytes_below(bytes: &[u8], high_watermark: Offset) -> usize {
    let mut at = 0;
    while at < bytes.len() {
        match batch::decode_header(&bytes[at..]) {
            Ok(header) if header.base_offset < high_watermark => at += header.batch_bytes(),
            Ok(_) | Err(BatchError::Truncated { .. }) => break,
            Err(_) => break,
        }
    }
    at.min(bytes.len())
}
