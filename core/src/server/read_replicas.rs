//! Follower reads (KIP-392): on every consumer fetch a partition's leader may send the consumer
//! to an in-sync follower for a lease, chosen by `wharf_replication::selector` from this shard's
//! load, the followers' lag, the consumer's position and racks. A follower serves committed
//! records only (below its own high watermark, which never passes the leader's), so a consumer
//! moving between replicas never sees a record that could be truncated.
//!
//! What lives here: the shard's load (sampled on its tick), each led partition's table of
//! readers (for `DescribeReaders` and the per-reader metric), and the per-partition serve step
//! the fetch handler runs on the partition's owner shard.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use wharf_replication::selector::{
    self, FollowerView, LeaderLoad, LeaderView, Reader, Reason, ReplicaSelector,
};
use wharf_storage::Offset;

use crate::config::FlushMode;
use crate::protocol::{
    DescribeReadersRequest, DescribeReadersResponse, ErrorCode, PartitionReaders, ReaderInfo,
};
use crate::server::metrics::{Metrics, ReaderLabels};
use crate::server::partition::{FetchData, Partition, PartitionError};
use crate::server::shard::{Shard, ShardReply, ShardRequest};

/// Readers one led partition remembers (the oldest is forgotten beyond it): bounds the table
/// and the per-reader metric series a crowd of short-lived consumers can create.
pub const READERS_PER_PARTITION_MAX: usize = 64;
/// A reader not seen by the leader for this long is dropped from the table at the next fetch.
pub const READER_FORGET_MS: u64 = 120_000;
/// Readers one shard remembers over all its led partitions (and so per-reader metric series):
/// many partitions times `READERS_PER_PARTITION_MAX` could otherwise grow without a bound.
pub const READERS_PER_SHARD_MAX: usize = 4096;
/// Smoothing of the sampled load: each sample moves the estimate this share (permille) of the
/// way, so one busy tick does not move every reader and one idle tick does not bring them back.
const LOAD_SMOOTHING_PERMILLE: u64 = 500;

/// One shard's load as the selector sees it. Updated by the shard's own tasks only.
#[derive(Default)]
pub struct ShardLoad {
    /// Requests admitted and not yet answered that are work, not waits (see `dispatch`; the
    /// consumer fetches parked in long polls included until they park).
    requests_pending: Cell<u32>,
    /// Consumer fetches parked waiting for data: idle, not load.
    fetches_parked: Cell<u32>,
    /// Batch bytes served to consumers by this shard's partitions since the last sample.
    egress_bytes: Cell<u64>,
    busy_permille: Cell<u32>,
    egress_bytes_per_s: Cell<u64>,
    /// Readers booked in this shard's reader tables (at most `READERS_PER_SHARD_MAX`).
    pub(crate) readers_tracked: Cell<usize>,
}

impl ShardLoad {
    pub fn snapshot(&self) -> LeaderLoad {
        LeaderLoad {
            busy_permille: self.busy_permille.get(),
            queue_depth: self
                .requests_pending
                .get()
                .saturating_sub(self.fetches_parked.get()),
            egress_bytes_per_s: self.egress_bytes_per_s.get(),
        }
    }

    /// Folds in one sample: `runtime_s` of task run time over `elapsed_s` of wall time.
    pub fn sample(&self, runtime_s: f64, elapsed_s: f64) {
        if elapsed_s <= 0.0 {
            return;
        }
        let busy = ((runtime_s / elapsed_s) * 1000.0).clamp(0.0, 1000.0) as u64;
        let egress = (self.egress_bytes.replace(0) as f64 / elapsed_s) as u64;
        let smooth = |old: u64, new: u64| {
            (old * (1000 - LOAD_SMOOTHING_PERMILLE) + new * LOAD_SMOOTHING_PERMILLE) / 1000
        };
        self.busy_permille
            .set(smooth(u64::from(self.busy_permille.get()), busy) as u32);
        self.egress_bytes_per_s
            .set(smooth(self.egress_bytes_per_s.get(), egress));
    }

    pub fn served(&self, bytes: usize) {
        self.egress_bytes
            .set(self.egress_bytes.get().saturating_add(bytes as u64));
    }

    /// Counts a request from admission to its answer (the guard ends it).
    pub fn begin_request(self: &Rc<Self>) -> PendingRequest {
        self.requests_pending
            .set(self.requests_pending.get().saturating_add(1));
        PendingRequest(Rc::clone(self))
    }

    /// Counts a consumer fetch as parked while the guard lives.
    pub fn park_fetch(self: &Rc<Self>) -> ParkedFetch {
        self.fetches_parked
            .set(self.fetches_parked.get().saturating_add(1));
        ParkedFetch(Rc::clone(self))
    }
}

pub struct PendingRequest(Rc<ShardLoad>);

impl Drop for PendingRequest {
    fn drop(&mut self) {
        let pending = &self.0.requests_pending;
        pending.set(pending.get().saturating_sub(1));
    }
}

pub struct ParkedFetch(Rc<ShardLoad>);

impl Drop for ParkedFetch {
    fn drop(&mut self) {
        let parked = &self.0.fetches_parked;
        parked.set(parked.get().saturating_sub(1));
    }
}

struct ReaderEntry {
    rack: String,
    replica: u32,
    fetch_offset: u64,
    seen: Instant,
    reason: Reason,
}

/// Where a reader table books its metric series, and the shard's count of readers tracked.
pub struct ReaderBook<'a> {
    pub metrics: &'a Metrics,
    pub topic: &'a str,
    pub partition: u32,
    pub tracked: &'a Cell<usize>,
}

impl ReaderBook<'_> {
    fn labels(&self, reader: &str) -> ReaderLabels {
        ReaderLabels {
            topic: self.topic.to_string(),
            partition: self.partition,
            reader: reader.to_string(),
        }
    }
}

/// The readers of one led partition: where the leader last sent each.
#[derive(Default)]
pub struct ReaderTable {
    entries: HashMap<String, ReaderEntry>,
}

impl ReaderTable {
    /// Books where `id` was sent. A known reader is updated in place (no allocation, and its
    /// metric series is touched only when its replica changes): this runs on every fetch.
    fn record(
        &mut self,
        book: &ReaderBook<'_>,
        id: &str,
        rack: &str,
        update: (u32, u64, Instant, Reason),
    ) {
        let (replica, fetch_offset, now, reason) = update;
        if let Some(entry) = self.entries.get_mut(id) {
            if entry.replica != replica {
                book.metrics
                    .reader_replica
                    .get_or_create(&book.labels(id))
                    .set(i64::from(replica));
            }
            if entry.rack != rack {
                entry.rack = rack.to_string();
            }
            entry.replica = replica;
            entry.fetch_offset = fetch_offset;
            entry.seen = now;
            entry.reason = reason;
            return;
        }
        // A new reader: forget the silent ones first, then this table's oldest when it (or
        // the shard) is full. A shard full of other partitions' readers books none here:
        // the redirect still happens, only the table and the series are bounded.
        self.forget_silent(book, now);
        let shard_full = book.tracked.get() >= READERS_PER_SHARD_MAX;
        if self.entries.len() >= READERS_PER_PARTITION_MAX || shard_full {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.seen)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(oldest) => self.forget(book, &oldest),
                None => return,
            }
        }
        book.metrics
            .reader_replica
            .get_or_create(&book.labels(id))
            .set(i64::from(replica));
        self.entries.insert(
            id.to_string(),
            ReaderEntry {
                rack: rack.to_string(),
                replica,
                fetch_offset,
                seen: now,
                reason,
            },
        );
        book.tracked.set(book.tracked.get() + 1);
        assert!(self.entries.len() <= READERS_PER_PARTITION_MAX);
        assert!(book.tracked.get() <= READERS_PER_SHARD_MAX);
    }

    fn forget(&mut self, book: &ReaderBook<'_>, id: &str) {
        if self.entries.remove(id).is_some() {
            book.metrics.reader_replica.remove(&book.labels(id));
            book.tracked.set(book.tracked.get().saturating_sub(1));
        }
    }

    /// Forgets the readers the leader has not seen for `READER_FORGET_MS` (run on the
    /// shard's tick, and before a new reader is booked).
    pub fn forget_silent(&mut self, book: &ReaderBook<'_>, now: Instant) {
        let silent: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| now.duration_since(e.seen).as_millis() as u64 > READER_FORGET_MS)
            .map(|(id, _)| id.clone())
            .collect();
        for id in silent {
            self.forget(book, &id);
        }
    }

    /// Forgets every reader: the partition closes, or this replica no longer leads it (its
    /// readers now ask the new leader, which books them there).
    pub fn clear(&mut self, book: &ReaderBook<'_>) {
        let ids: Vec<String> = self.entries.keys().cloned().collect();
        for id in ids {
            self.forget(book, &id);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn describe(&self, now: Instant) -> Vec<ReaderInfo> {
        let mut readers: Vec<ReaderInfo> = self
            .entries
            .iter()
            .map(|(id, e)| ReaderInfo {
                reader_id: id.clone(),
                rack: e.rack.clone(),
                replica: e.replica,
                fetch_offset: e.fetch_offset,
                last_seen_ms_ago: now.duration_since(e.seen).as_millis() as u64,
                reason: reason_name(e.reason).to_string(),
            })
            .collect();
        readers.sort_by(|a, b| a.reader_id.cmp(&b.reader_id));
        readers
    }
}

pub fn reason_name(reason: Reason) -> &'static str {
    match reason {
        Reason::Policy => "policy",
        Reason::SameRack => "same_rack",
        Reason::NoRack => "no_rack",
        Reason::NotLoaded => "not_loaded",
        Reason::Loaded => "loaded",
        Reason::ColdReader => "cold_reader",
        Reason::Sticky => "sticky",
        Reason::Relieved => "relieved",
        Reason::NoEligibleFollower => "no_eligible_follower",
    }
}

/// One partition of a consumer fetch, as its owner shard serves it.
#[derive(Clone, Debug)]
pub struct ReadAsk {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub max_bytes: usize,
    pub leader_epoch: Option<u32>,
    pub read_replica: Option<u32>,
    /// Followers the consumer asks not to be sent to (they failed it recently).
    pub avoid_replicas: Vec<u32>,
    /// Shared by the partitions of one request (and sent across shards).
    pub reader_id: Arc<str>,
    pub rack: Arc<str>,
}

/// What the owner shard answers for one partition: data (`T`: the read in place, or its bytes
/// when it crosses shards) or a redirect to a follower.
pub struct Served<T> {
    pub high_watermark: u64,
    pub log_start_offset: u64,
    pub leader_epoch: u32,
    /// `(broker, lease_ms)`: read there; no data comes with it.
    pub redirect: Option<(u32, u32)>,
    pub data: Option<T>,
    pub bytes: usize,
}

impl<T> Served<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Served<U> {
        Served {
            high_watermark: self.high_watermark,
            log_start_offset: self.log_start_offset,
            leader_epoch: self.leader_epoch,
            redirect: self.redirect,
            data: self.data.map(f),
            bytes: self.bytes,
        }
    }
}

impl Shard {
    /// Serves one partition of a consumer fetch on its owner shard: checks the read lease's
    /// epoch, lets the leader redirect the reader, and reads below the high watermark.
    pub(crate) async fn serve_read(
        &self,
        local: &Partition,
        ask: &ReadAsk,
    ) -> Result<Served<FetchData>, PartitionError> {
        let me = self.shared.config.broker_id;
        let (is_leader, epoch) = local.read_role();
        if let Some(expected) = ask.leader_epoch {
            if expected != epoch {
                // KIP-320: this replica is behind (it has not heard of the epoch the lease
                // names) or ahead (the consumer's lease predates a failover): either way the
                // consumer asks the leader again.
                return Err(PartitionError::new(
                    ErrorCode::FencedLeaderEpoch,
                    format!(
                        "replica {me} of {}/{} is at leader epoch {epoch}, the read lease names \
                         {expected}: read from the leader",
                        ask.topic, ask.partition
                    ),
                ));
            }
        }
        if !is_leader {
            // A healthy leader answers every replica fetch within its long poll, and a
            // follower with `flush = interval` may wait one flush interval before it fetches
            // again; silence beyond those and the lag the selector allows means this replica
            // is cut off.
            let config = &self.shared.config;
            let silent_ms = local.leader_silent_ms();
            let flush_wait_ms = match local.config.flush {
                FlushMode::Always => 0,
                FlushMode::Interval => local.config.flush_interval_ms,
            };
            let silent_ms_max = config
                .replica_selection
                .follower_lag_ms_max
                .saturating_add(config.cluster.replica_fetch_wait_ms)
                .saturating_add(flush_wait_ms);
            if silent_ms > silent_ms_max {
                // Cut off from its leader, this replica cannot know how stale it is: the
                // consumer goes back to the leader (or learns the new one) instead.
                return Err(PartitionError::new(
                    ErrorCode::PartitionUnavailable,
                    format!(
                        "replica {me} of {}/{} has not heard from its leader for {}: read from \
                         the leader",
                        ask.topic,
                        ask.partition,
                        if silent_ms == u64::MAX {
                            "since it started".to_string()
                        } else {
                            format!("{silent_ms} ms")
                        }
                    ),
                ));
            }
        }
        // A reader outside the leader's log is answered here (`offset_out_of_range`, so it
        // resets), not sent to a follower that cannot tell it so.
        if is_leader && local.holds_offset(Offset(ask.offset)) {
            let (replica, reason) = self.choose_read_replica(local, ask);
            if !ask.reader_id.is_empty() {
                local.readers.borrow_mut().record(
                    &self.reader_book(local),
                    &ask.reader_id,
                    &ask.rack,
                    (replica, ask.offset, Instant::now(), reason),
                );
            }
            if replica != me {
                self.metrics.fetch_redirects.inc();
                let lease_ms = u32::try_from(self.shared.config.replica_selection.lease_ms)
                    .unwrap_or(u32::MAX);
                return Ok(Served {
                    high_watermark: local.high_watermark().0,
                    log_start_offset: 0,
                    leader_epoch: epoch,
                    redirect: Some((replica, lease_ms)),
                    data: None,
                    bytes: 0,
                });
            }
        }
        let data = if is_leader {
            local.read(Offset(ask.offset), ask.max_bytes).await?
        } else {
            local
                .read_committed(Offset(ask.offset), ask.max_bytes)
                .await?
        };
        let role = usize::from(!is_leader);
        self.metrics.fetches_served[role].inc();
        self.metrics.consumer_fetched_bytes[role].inc_by(data.bytes as u64);
        self.load.served(data.bytes);
        Ok(Served {
            high_watermark: data.high_watermark.0,
            log_start_offset: data.log_start_offset.0,
            leader_epoch: epoch,
            redirect: None,
            bytes: data.bytes,
            data: Some(data),
        })
    }

    pub(crate) fn reader_book<'a>(&'a self, local: &'a Partition) -> ReaderBook<'a> {
        ReaderBook {
            metrics: &self.shared.metrics,
            topic: &local.topic,
            partition: local.index,
            tracked: &self.load.readers_tracked,
        }
    }

    /// On the shard's tick: a partition this replica no longer leads forgets its readers
    /// (and their series); a led one forgets the silent ones.
    pub(crate) fn tidy_readers(&self, local: &Partition, now: Instant) {
        let mut readers = local.readers.borrow_mut();
        if readers.is_empty() {
            return;
        }
        let book = self.reader_book(local);
        if local.read_role().0 {
            readers.forget_silent(&book, now);
        } else {
            readers.clear(&book);
        }
    }

    /// The leader's choice for one reader: itself or an eligible follower.
    fn choose_read_replica(&self, local: &Partition, ask: &ReadAsk) -> (u32, Reason) {
        let config = &self.shared.config;
        let me = config.broker_id;
        let policy: ReplicaSelector = local.config.replica_selector;
        // An anonymous fetch (the brokers' own reads, tools) is never redirected: only a
        // consumer that names itself follows a redirect and keeps a lease.
        if policy == ReplicaSelector::Leader || local.replicas.len() < 2 || ask.reader_id.is_empty()
        {
            return (me, Reason::Policy);
        }
        // The cluster's broker list is short: a scan, no map built per fetch.
        let rack_of = |broker: u32| {
            config
                .cluster
                .brokers
                .iter()
                .find(|b| b.id == broker)
                .and_then(|b| b.rack.as_deref())
        };
        let view = local.follower_view();
        let followers: Vec<FollowerView<'_>> = view
            .followers
            .iter()
            .map(|&(broker_id, lag_records, lag_ms, in_isr)| FollowerView {
                broker_id,
                in_isr,
                // The consumer's own report that this follower just failed it. (The
                // controller's fencing reaches the leader as an ISR without the broker.)
                fenced: ask.avoid_replicas.contains(&broker_id),
                lag_records,
                lag_ms,
                rack: rack_of(broker_id),
            })
            .collect();
        let leader = LeaderView {
            broker_id: me,
            rack: rack_of(me),
            high_watermark: view.high_watermark,
            load: self.load.snapshot(),
        };
        let reader = Reader {
            id_hash: u64::from(crc32c::crc32c(ask.reader_id.as_bytes())),
            rack: (!ask.rack.is_empty()).then_some(&*ask.rack),
            fetch_offset: ask.offset,
            current: ask.read_replica,
            egress_bytes_per_s: local.ingest_bytes_per_s(),
        };
        let choice = selector::select(
            policy,
            &config.replica_selection,
            &leader,
            &followers,
            &reader,
        );
        (choice.replica, choice.reason)
    }

    /// `DescribeReaders`: this broker's led partitions of the topic, from their owner shards.
    pub(crate) async fn describe_readers(
        self: &Rc<Self>,
        request: DescribeReadersRequest,
    ) -> Result<DescribeReadersResponse, PartitionError> {
        let count = self
            .metadata
            .borrow()
            .topics
            .get(&request.topic)
            .map(|t| t.partitions.len() as u32)
            .ok_or_else(|| {
                PartitionError::new(
                    ErrorCode::UnknownTopic,
                    format!("topic {:?} does not exist", request.topic),
                )
            })?;
        let mut partitions = Vec::new();
        for partition in 0..count {
            let owner = self.owner(&request.topic, partition)?;
            match self
                .to_shard(
                    owner,
                    ShardRequest::Readers {
                        topic: request.topic.clone(),
                        partition,
                    },
                )
                .await
            {
                Some(ShardReply::Readers(Some(readers))) => partitions.push(readers),
                Some(ShardReply::Readers(None)) => {}
                _ => {
                    return Err(PartitionError::new(
                        ErrorCode::PartitionUnavailable,
                        "owner shard is not answering",
                    ))
                }
            }
        }
        Ok(DescribeReadersResponse { partitions })
    }

    /// The readers of one partition this shard owns, if this broker leads it.
    pub(crate) fn partition_readers(
        &self,
        topic: &str,
        partition: u32,
    ) -> Option<PartitionReaders> {
        let local = self.local_partition(topic, partition)?;
        let (is_leader, _) = local.read_role();
        if !is_leader {
            return None;
        }
        let load = self.load.snapshot();
        let readers = local.readers.borrow().describe(Instant::now());
        Some(PartitionReaders {
            partition,
            leader: self.shared.config.broker_id,
            busy_permille: load.busy_permille,
            queue_depth: load.queue_depth,
            egress_bytes_per_s: load.egress_bytes_per_s,
            pressure_permille: selector::pressure_permille(
                &load,
                &self.shared.config.replica_selection,
            ),
            readers,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn book<'a>(metrics: &'a Metrics, partition: u32, tracked: &'a Cell<usize>) -> ReaderBook<'a> {
        ReaderBook {
            metrics,
            topic: "t",
            partition,
            tracked,
        }
    }

    fn series(metrics: &Metrics, partition: u32, reader: &str) -> bool {
        let labels = ReaderLabels {
            topic: "t".to_string(),
            partition,
            reader: reader.to_string(),
        };
        // `get_or_create` would add it: look through the encoded text instead.
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("r", "r", metrics.reader_replica.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        text.contains(&format!(
            "partition=\"{}\",reader=\"{}\"",
            labels.partition, labels.reader
        ))
    }

    #[test]
    fn a_table_is_bounded_per_partition_and_per_shard_and_clears_its_series() {
        let metrics = Metrics::new();
        let tracked = Cell::new(0);
        let now = Instant::now();
        let mut first = ReaderTable::default();
        let update = |i: u64| (2, i, now + Duration::from_millis(i), Reason::Loaded);
        for i in 0..(READERS_PER_PARTITION_MAX as u64 + 10) {
            first.record(
                &book(&metrics, 0, &tracked),
                &format!("r{i}"),
                "",
                update(i),
            );
        }
        assert_eq!(first.entries.len(), READERS_PER_PARTITION_MAX);
        assert_eq!(tracked.get(), READERS_PER_PARTITION_MAX);
        // The oldest were forgotten, with their series.
        assert!(!series(&metrics, 0, "r0"));
        assert!(series(
            &metrics,
            0,
            &format!("r{}", READERS_PER_PARTITION_MAX + 9)
        ));
        // A known reader is updated in place: nothing is added.
        first.record(&book(&metrics, 0, &tracked), "r70", "rack-a", update(500));
        assert_eq!(tracked.get(), READERS_PER_PARTITION_MAX);
        assert_eq!(first.entries["r70"].fetch_offset, 500);

        // The shard is full: a new table books nobody (it has nobody to give way).
        tracked.set(READERS_PER_SHARD_MAX);
        let mut second = ReaderTable::default();
        second.record(&book(&metrics, 1, &tracked), "late", "", update(1));
        assert!(second.is_empty());
        assert!(!series(&metrics, 1, "late"));
        // A full shard: a table with readers replaces its own oldest instead of growing.
        first.record(&book(&metrics, 0, &tracked), "newest", "", update(600));
        assert_eq!(first.entries.len(), READERS_PER_PARTITION_MAX);
        assert_eq!(tracked.get(), READERS_PER_SHARD_MAX);
        tracked.set(READERS_PER_PARTITION_MAX);

        // Silent readers are forgotten; leadership lost forgets everyone.
        let later = now + Duration::from_millis(READER_FORGET_MS + 1_000);
        first.record(
            &book(&metrics, 0, &tracked),
            "fresh",
            "",
            (2, 0, later, Reason::Loaded),
        );
        first.forget_silent(&book(&metrics, 0, &tracked), later);
        assert_eq!(first.entries.len(), 1);
        assert_eq!(tracked.get(), 1);
        first.clear(&book(&metrics, 0, &tracked));
        assert!(first.is_empty());
        assert_eq!(tracked.get(), 0);
        assert!(!series(&metrics, 0, "fresh"));
    }
}
