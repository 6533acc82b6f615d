//! Leader: serving a follower's fetch (`ReplicaFetch`). Offsets the follower reports are checked
//! against this log's batch boundaries before the replica sees them; the replica decides what
//! to serve; the fetch long-polls for new data and reads up to the log end.

use std::time::{Duration, Instant};

use wharf_replication::{BrokerId, FetchError, FetchRequest, Input};
use wharf_storage::{Epoch, Offset};

use super::{park, FetchData, Partition};
use crate::protocol::{ErrorCode, ReplicaFetchRequest, ReplicaFetchResponse};
use wharf_replication::driver::Answer;

/// Reply ends a leader remembers per follower (`remember_served_end`).
const SERVED_ENDS_KEPT: usize = 16;

impl Partition {
    /// Leader: answers a follower's fetch (long-polling up to its max wait when there is
    /// nothing new). Returns the response and the bytes to send with it.
    pub async fn replica_fetch(
        &self,
        request: &ReplicaFetchRequest,
        wait_ms_max: u64,
    ) -> (ReplicaFetchResponse, Option<FetchData>) {
        let mut response = ReplicaFetchResponse {
            error: 0,
            message: String::new(),
            fetch_id: request.fetch_id,
            leader_epoch: 0,
            high_watermark: 0,
            log_start_offset: 0,
            diverging_epoch: 0,
            diverging_end_offset: 0,
            batch_bytes: 0,
        };
        let fetch = FetchRequest {
            replica: request.replica_id,
            leader_epoch: Epoch(request.leader_epoch),
            fetch_id: request.fetch_id,
            fetch_offset: Offset(request.fetch_offset),
            last_fetched_epoch: request.last_fetched_epoch.map(Epoch),
            durable_offset: Offset(request.durable_offset),
            may_wait: request.max_wait_ms > 0,
        };
        if let Some(offset) = self.offset_inside_a_batch(&fetch).await {
            // Refused before the replica sees it: no progress, HW or ISR change.
            response.leader_epoch = self.replica.borrow().leader_epoch().0;
            response.error = ErrorCode::InvalidReplicaOffsets as u16;
            response.message = format!(
                "offset {offset} reported by replica {} does not start a batch here",
                request.replica_id
            );
            return (response, None);
        }
        let outputs = match self.step(Input::FetchRequest(fetch)) {
            Ok(outputs) => outputs,
            Err(message) => {
                response.error = ErrorCode::StorageError as u16;
                response.message = message;
                return (response, None);
            }
        };
        response.leader_epoch = self.replica.borrow().leader_epoch().0;
        let answer = outputs.into_iter().find(|o| {
            matches!(o, Answer::ServeFetch { fetch_id, .. } | Answer::RejectFetch { fetch_id, .. } if *fetch_id == request.fetch_id)
        });
        let from = match answer {
            Some(Answer::ServeFetch { fetch_offset, .. }) => fetch_offset,
            Some(Answer::RejectFetch { error, .. }) => {
                let code = match error {
                    FetchError::NotLeader { .. } => ErrorCode::NotLeader,
                    FetchError::FencedEpoch { .. } => ErrorCode::FencedLeaderEpoch,
                    FetchError::Diverging { epoch, end_offset } => {
                        response.diverging_epoch = epoch.0;
                        response.diverging_end_offset = end_offset.0;
                        ErrorCode::DivergingLog
                    }
                    FetchError::OffsetOutOfRange { log_start, .. } => {
                        // The follower starts again there (`ResetLog`).
                        response.log_start_offset = log_start.0;
                        ErrorCode::OffsetOutOfRange
                    }
                    FetchError::UnknownReplica(_) => ErrorCode::InvalidRequest,
                    FetchError::InvalidOffsets { .. } => ErrorCode::InvalidReplicaOffsets,
                    FetchError::CorruptData { .. } => ErrorCode::CorruptData,
                };
                response.error = code as u16;
                response.message = error.to_string();
                return (response, None);
            }
            _ => panic!("the replica did not answer fetch {}", request.fetch_id),
        };
        let wait_ms = u64::from(request.max_wait_ms).min(wait_ms_max);
        let deadline = Instant::now() + Duration::from_millis(wait_ms);
        let nothing_new = self.log.get().is_some_and(|log| log.end_offset() <= from);
        // A high watermark the follower does not know yet is news too (KIP-392): followers
        // serve consumers below it, so it must not wait for the next append or the timeout.
        // (The follower says what it knows: right after its restart or a lost answer too.)
        let hw_news = request.high_watermark < self.high_watermark.get().0;
        if nothing_new && !hw_news && !self.closing.get() {
            let woken = park(&self.append_waiters);
            let remaining = deadline.saturating_duration_since(Instant::now());
            let _ = glommio::timer::timeout(remaining, async {
                let _ = woken.await;
                Ok(())
            })
            .await;
        }
        let data = match self.read_to(from, request.max_bytes as usize, None).await {
            Ok(data) => data,
            Err(error) => {
                if error.code == ErrorCode::OffsetOutOfRange {
                    // Retention moved the log start during the long poll: the follower starts
                    // again there (`ResetLog`).
                    if let Some(log) = self.log.get() {
                        response.log_start_offset = log.log_start_offset().0;
                    }
                }
                response.error = error.code as u16;
                response.message = error.message;
                return (response, None);
            }
        };
        if let Some(read) = data.read.as_ref().filter(|r| data.bytes == r.bytes().len()) {
            self.remember_served_end(request.replica_id, read.next_offset);
        }
        let replica = self.replica.borrow();
        response.leader_epoch = replica.leader_epoch().0;
        response.high_watermark = replica.high_watermark().0;
        response.log_start_offset = data.log_start_offset.0;
        response.batch_bytes = data.bytes as u32;
        (response, Some(data))
    }

    /// Leader: remembers a batch boundary of this log that `replica` will report: where a reply
    /// to it ended, or an offset it reported that was checked. The follower's next fetch offset
    /// is such an end, and its durable offset usually is (or repeats while nothing new is
    /// durable, with `flush = "interval"`), so checking them against the log's batches rarely
    /// needs a read. Forgotten when the log is truncated or reset.
    fn remember_served_end(&self, replica: BrokerId, end: Offset) {
        let mut served = self.served_ends.borrow_mut();
        let ends = served.entry(replica).or_default();
        if ends.back() != Some(&end) {
            if ends.len() == SERVED_ENDS_KEPT {
                ends.pop_front();
            }
            ends.push_back(end);
        }
    }

    /// Leader: the first of a follower's reported offsets (fetch, then durable) that lies inside
    /// one of this log's batches. The replica checks the offsets' order and range but does not
    /// know batches; an offset inside a batch would let the HW (and consumers' reads, which
    /// return whole batches below it) land inside a batch. Only fetches the replica would serve
    /// are checked: a diverging follower's offsets mean nothing in this log.
    async fn offset_inside_a_batch(&self, fetch: &FetchRequest) -> Option<Offset> {
        if self.replica.borrow().validate_fetch(fetch).is_err() {
            return None; // The replica answers it (rejects it) itself.
        }
        let offsets = [fetch.fetch_offset, fetch.durable_offset];
        for (i, &offset) in offsets.iter().enumerate() {
            let served = self
                .served_ends
                .borrow()
                .get(&fetch.replica)
                .is_some_and(|ends| ends.contains(&offset));
            if served || (i > 0 && offset == offsets[0]) {
                continue;
            }
            let check = {
                let _guard = self.shared().await?;
                let log = self.log.get()?;
                if offset < log.log_start_offset() {
                    // Durable data retention already deleted here: nothing to check against.
                    continue;
                }
                log.plan_boundary_check(offset)
            };
            // A read that fails, or cannot tell yet, is left to the serving read to report.
            let resolved = match check {
                Ok(check) => check.resolve().await,
                Err(error) => Err(error),
            };
            match resolved {
                Ok(Some(false)) => return Some(offset),
                Ok(Some(true)) => self.remember_served_end(fetch.replica, offset),
                _ => {}
            }
        }
        None
    }
}
