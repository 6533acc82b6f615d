//! A consumer of assigned partitions: seek (earliest, latest, offset, timestamp), then `poll`
//! long-polls every owner connection at once and returns the fetched batches. Records are read
//! in place from the response frames (validated rkyv access), in offset order per partition.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use wharf_storage::batch::check_batch;

use super::{decode, Client, ClientError, Connection};
use crate::protocol::{
    ApiKey, ErrorCode, FetchPartition, FetchRequest, FetchResponse, Frame, OffsetSpec,
    AVOID_REPLICAS_MAX,
};

#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    pub max_wait_ms: u32,
    pub min_bytes: u32,
    pub max_bytes: u32,
    pub partition_max_bytes: u32,
    /// Names this consumer to the leaders (follower reads spread readers by it, and
    /// `wharf topic describe --readers` lists it). `None`: `PID-N`, unique in this process.
    pub reader_id: Option<String>,
    /// This consumer's rack (KIP-392 `client.rack`): with `replica_selector = rack`, leaders
    /// send it to a replica in the same rack.
    pub rack: Option<String>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            max_wait_ms: 500,
            min_bytes: 1,
            max_bytes: 8 * 1024 * 1024,
            partition_max_bytes: 4 * 1024 * 1024,
            reader_id: None,
            rack: None,
        }
    }
}

/// Distinguishes the consumers of one process in their default reader ids.
static READERS_STARTED: AtomicU64 = AtomicU64::new(0);

/// A follower the leader sent this consumer to, until `until`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadLease {
    pub broker: u32,
    /// The leader epoch the follower must be at (else it refuses and we go back).
    pub leader_epoch: u32,
    pub until: Instant,
}

/// Where to start reading a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeekTo {
    Earliest,
    Latest,
    Offset(u64),
    /// The first record at or after this time (ms since the epoch).
    Timestamp(i64),
}

#[derive(Clone, Copy, Debug)]
struct Assigned {
    partition: u32,
    /// The next offset to return.
    position: u64,
    high_watermark: u64,
    /// Reading from a follower (follower reads) until the lease ends or the follower fails.
    lease: Option<ReadLease>,
    /// The follower of the last lease (told to the leader when the lease ends: it keeps us
    /// there while that follower is still a good choice).
    last_replica: Option<u32>,
    /// Followers that failed us, each with until when the leader is asked not to send us
    /// there (at most `AVOID_REPLICAS_MAX`: the oldest gives way).
    avoid: [Option<(u32, Instant)>; AVOID_REPLICAS_MAX],
}

pub struct Consumer {
    client: Rc<Client>,
    topic: String,
    config: ConsumerConfig,
    reader_id: String,
    assigned: Vec<Assigned>,
    /// Polls in a row in which a leader could not be reached (failover in progress).
    polls_failed: u32,
}

/// Polls in a row that may fail to reach a partition's leader (each after a metadata refresh
/// and `POLL_RETRY_BACKOFF_MS`) before `poll` reports the error: a failover takes well under
/// this, a cluster that is down does not.
pub const POLL_FAILURES_MAX: u32 = 50;
const POLL_RETRY_BACKOFF_MS: u64 = 100;
/// Extra fetch passes one `poll` makes after a redirect (to a follower, or back to the leader
/// after a follower failed) returned no records.
const POLL_REDIRECT_PASSES_MAX: usize = 2;
/// How long the leader is asked to keep a consumer off a follower that failed it: longer than
/// a dead follower takes to leave the ISR or fall past the selector's lag limit.
pub const FAILED_FOLLOWER_AVOID_MS: u64 = 10_000;

/// One record, borrowed from a fetch response.
#[derive(Clone, Copy)]
pub struct RecordView<'a> {
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub headers: &'a [wharf_storage::batch::ArchivedRecordHeader],
}

impl std::fmt::Debug for RecordView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordView")
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .field("timestamp_ms", &self.timestamp_ms)
            .field("key", &self.key)
            .field("value", &self.value)
            .field("headers", &self.headers.len())
            .finish()
    }
}

impl RecordView<'_> {
    /// The value of the first header named `key`.
    pub fn header(&self, key: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.key.as_str() == key)
            .map(|h| h.value.as_slice())
    }
}

struct Fetched {
    partition: u32,
    /// Records before this offset were already returned (a fetch starts at a batch boundary).
    from: u64,
    frame: Rc<Frame>,
    start: usize,
    end: usize,
}

/// The records of one poll.
pub struct Records {
    fetched: Vec<Fetched>,
    /// A partition was sent to another replica (or back to its leader) during the poll.
    redirected: bool,
}

impl Records {
    /// No records (a poll with nothing to fetch).
    pub fn empty() -> Records {
        Records {
            fetched: Vec::new(),
            redirected: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.fetched.iter().all(|f| f.start == f.end)
    }

    /// Per partition, the newest record timestamp of what this poll returned and the leader
    /// epoch of its last batch (from the batch headers alone: no record is decoded).
    pub fn newest_batches(&self) -> Vec<(u32, i64, u32)> {
        let mut newest = Vec::new();
        for fetched in &self.fetched {
            let bytes = &fetched.frame.payload()[fetched.start..fetched.end];
            let mut at = 0;
            let mut last = None;
            while at < bytes.len() {
                let Ok(header) = wharf_storage::batch::decode_header(&bytes[at..]) else {
                    break;
                };
                let max = last
                    .map_or(i64::MIN, |(t, _)| t)
                    .max(header.max_timestamp_ms);
                last = Some((max, header.leader_epoch.0));
                at += header.batch_bytes();
            }
            if let Some((timestamp_ms, leader_epoch)) = last {
                newest.push((fetched.partition, timestamp_ms, leader_epoch));
            }
        }
        newest
    }

    /// Every record, partition by partition, in offset order; corrupt data is an error.
    pub fn for_each(&self, mut visit: impl FnMut(RecordView<'_>)) -> Result<usize, ClientError> {
        let mut count = 0;
        for fetched in &self.fetched {
            let bytes = &fetched.frame.payload()[fetched.start..fetched.end];
            let mut at = 0;
            while at < bytes.len() {
                let batch = check_batch(&bytes[at..])
                    .map_err(|e| ClientError::Protocol(format!("fetched batch: {e}")))?;
                let records = batch
                    .records()
                    .map_err(|e| ClientError::Protocol(format!("fetched batch: {e}")))?;
                let header = batch.header;
                for (i, record) in records.iter().enumerate() {
                    let offset = header.base_offset.0 + i as u64;
                    if offset < fetched.from {
                        continue;
                    }
                    visit(RecordView {
                        partition: fetched.partition,
                        offset,
                        timestamp_ms: header.first_timestamp_ms
                            + record.timestamp_delta_ms.to_native(),
                        key: record.key.as_ref().map(|k| k.as_slice()),
                        value: record.value.as_slice(),
                        headers: record.headers.as_slice(),
                    });
                    count += 1;
                }
                at += header.batch_bytes();
            }
        }
        Ok(count)
    }
}

impl Consumer {
    pub fn new(client: Rc<Client>, topic: &str, config: ConsumerConfig) -> Consumer {
        let reader_id = config.reader_id.clone().unwrap_or_else(|| {
            format!(
                "{}-{}",
                std::process::id(),
                READERS_STARTED.fetch_add(1, Ordering::Relaxed)
            )
        });
        Consumer {
            client,
            topic: topic.to_string(),
            config,
            reader_id,
            assigned: Vec::new(),
            polls_failed: 0,
        }
    }

    /// Assigns `partitions` (all of the topic's when `None`), starting at `seek`.
    pub async fn assign(
        &mut self,
        partitions: Option<Vec<u32>>,
        seek: SeekTo,
    ) -> Result<(), ClientError> {
        let count = self.client.partition_count(&self.topic).await?;
        let partitions = partitions.unwrap_or_else(|| (0..count).collect());
        if let Some(bad) = partitions.iter().find(|p| **p >= count) {
            return Err(ClientError::server(
                ErrorCode::UnknownPartition,
                format!(
                    "topic {:?} has {count} partitions, not {}",
                    self.topic,
                    bad + 1
                ),
            ));
        }
        self.assigned = partitions
            .into_iter()
            .map(|partition| Assigned {
                partition,
                position: 0,
                high_watermark: 0,
                lease: None,
                last_replica: None,
                avoid: [None; AVOID_REPLICAS_MAX],
            })
            .collect();
        self.seek_all(seek).await
    }

    pub fn partitions(&self) -> Vec<u32> {
        self.assigned.iter().map(|a| a.partition).collect()
    }

    pub async fn seek_all(&mut self, seek: SeekTo) -> Result<(), ClientError> {
        let partitions = self.partitions();
        for partition in partitions {
            self.seek(partition, seek).await?;
        }
        Ok(())
    }

    pub async fn seek(&mut self, partition: u32, seek: SeekTo) -> Result<(), ClientError> {
        let position = match seek {
            SeekTo::Offset(offset) => offset,
            SeekTo::Earliest | SeekTo::Latest | SeekTo::Timestamp(_) => {
                let spec = match seek {
                    SeekTo::Earliest => OffsetSpec::Earliest,
                    SeekTo::Latest => OffsetSpec::Latest,
                    SeekTo::Timestamp(ts) => OffsetSpec::Timestamp(ts),
                    SeekTo::Offset(_) => unreachable!("handled above"),
                };
                let offsets = self
                    .client
                    .list_offsets(&self.topic, &[partition], spec)
                    .await?;
                offsets.first().map_or(0, |(_, o)| *o)
            }
        };
        let Some(assigned) = self.assigned.iter_mut().find(|a| a.partition == partition) else {
            return Err(ClientError::Invalid(format!(
                "partition {partition} is not assigned"
            )));
        };
        assigned.position = position;
        Ok(())
    }

    pub fn position(&self, partition: u32) -> Option<u64> {
        self.assigned
            .iter()
            .find(|a| a.partition == partition)
            .map(|a| a.position)
    }

    /// The high watermark each partition reported on the last poll.
    pub fn high_watermark(&self, partition: u32) -> Option<u64> {
        self.assigned
            .iter()
            .find(|a| a.partition == partition)
            .map(|a| a.high_watermark)
    }

    /// The follower `partition` is read from now, if the leader sent this consumer to one.
    pub fn read_replica(&self, partition: u32) -> Option<u32> {
        let now = Instant::now();
        self.assigned
            .iter()
            .find(|a| a.partition == partition)
            .and_then(|a| a.lease)
            .filter(|lease| lease.until > now)
            .map(|lease| lease.broker)
    }

    pub fn reader_id(&self) -> &str {
        &self.reader_id
    }

    /// Fetches from every assigned partition (one request per connection, all at once),
    /// waiting up to `max_wait_ms` for data, and advances the positions past what it returns.
    /// Each partition is read from its leader, or from the follower the leader sent this
    /// consumer to (follower reads) until that lease ends or the follower fails; a redirect
    /// is followed at once within the same call.
    pub async fn poll(&mut self) -> Result<Records, ClientError> {
        // A redirect answers without data: one more pass reads from the follower at once.
        let mut records = self.poll_once().await?;
        for _ in 0..POLL_REDIRECT_PASSES_MAX {
            if !records.redirected || !records.is_empty() {
                break;
            }
            records = self.poll_once().await?;
        }
        if records.redirected && records.is_empty() {
            // Redirected back and forth without data (followers failing in turn): do not
            // spin; the leader serves us once the avoided followers are known to it.
            glommio::timer::sleep(Duration::from_millis(POLL_RETRY_BACKOFF_MS)).await;
        }
        Ok(records)
    }

    async fn poll_once(&mut self) -> Result<Records, ClientError> {
        let client = Rc::clone(&self.client);
        let now = Instant::now();
        // Per connection: the partitions asked there, each with the lease it reads under.
        let mut by_address: HashMap<String, Vec<(Assigned, Option<ReadLease>)>> = HashMap::new();
        for assigned in &mut self.assigned {
            if assigned.lease.is_some_and(|lease| lease.until <= now) {
                assigned.lease = None;
            }
            let follower = match assigned.lease {
                Some(lease) => client
                    .partition_address_at(&self.topic, assigned.partition, lease.broker)
                    .await?
                    .map(|address| (address, lease)),
                None => None,
            };
            let (address, lease) = match follower {
                Some((address, lease)) => (address, Some(lease)),
                None => {
                    assigned.lease = None;
                    let address = client
                        .partition_address(&self.topic, assigned.partition)
                        .await?;
                    (address, None)
                }
            };
            by_address
                .entry(address)
                .or_default()
                .push((*assigned, lease));
        }
        let mut requests = Vec::new();
        let mut unreachable: Option<ClientError> = None;
        for (address, assigned) in by_address {
            let via_followers: Vec<u32> = assigned
                .iter()
                .filter(|(_, lease)| lease.is_some())
                .map(|(a, _)| a.partition)
                .collect();
            // A leader that died (or stopped) fails only its own partitions, for this poll; a
            // follower that did sends its readers back to the leader at once.
            let connection: Rc<Connection> = match client.connection(&address).await {
                Ok(connection) => connection,
                Err(error) if error.is_retriable() => {
                    if via_followers.is_empty() {
                        unreachable = Some(error);
                    }
                    self.end_leases(&via_followers);
                    continue;
                }
                Err(error) => return Err(error),
            };
            let request = FetchRequest {
                max_wait_ms: self.config.max_wait_ms,
                min_bytes: self.config.min_bytes,
                max_bytes: self.config.max_bytes,
                partitions: assigned
                    .iter()
                    .map(|(a, lease)| FetchPartition {
                        topic: self.topic.clone(),
                        partition: a.partition,
                        fetch_offset: a.position,
                        max_bytes: self.config.partition_max_bytes,
                        leader_epoch: lease.map(|l| l.leader_epoch),
                        read_replica: lease.map(|l| l.broker).or(a.last_replica),
                        avoid_replicas: a
                            .avoid
                            .iter()
                            .flatten()
                            .filter(|(_, until)| *until > now)
                            .map(|&(broker, _)| broker)
                            .collect(),
                    })
                    .collect(),
                reader_id: self.reader_id.clone(),
                rack: self.config.rack.clone().unwrap_or_default(),
            };
            let timeout_ms = u64::from(self.config.max_wait_ms) + client.config.request_timeout_ms;
            requests.push(async move {
                let answer = connection
                    .call(ApiKey::Fetch, &request, Vec::new(), timeout_ms)
                    .await;
                (answer, via_followers)
            });
        }
        let mut fetched = Vec::new();
        let mut redirected = false;
        for (frame, via_followers) in join_all(requests).await {
            let frame = match frame {
                Ok(frame) => Rc::new(frame),
                Err(error) if error.is_retriable() => {
                    if via_followers.is_empty() {
                        unreachable = Some(error);
                    }
                    self.end_leases(&via_followers);
                    continue;
                }
                Err(error) => return Err(error),
            };
            let response: FetchResponse = decode(&frame)?;
            let mut at = 0usize;
            for p in response.partitions {
                let from_follower = via_followers.contains(&p.partition);
                let code = ErrorCode::from_u16(p.error);
                if code != ErrorCode::None {
                    if from_follower {
                        // Whatever the follower's trouble (fenced, behind, restarting,
                        // retention), the leader serves the partition on the next pass.
                        self.end_leases(&[p.partition]);
                        redirected = true;
                        if code == ErrorCode::FencedLeaderEpoch {
                            let _ = client.refresh_metadata().await;
                        }
                        continue;
                    }
                    if code.is_retriable() {
                        let _ = client.refresh_metadata().await;
                        continue;
                    }
                    return Err(ClientError::server(
                        code,
                        format!("partition {}: {}", p.partition, p.message),
                    ));
                }
                let len = p.batch_bytes as usize;
                if at + len > frame.payload().len() {
                    return Err(ClientError::Protocol(
                        "fetch payload shorter than declared".to_string(),
                    ));
                }
                let Some(assigned) = self
                    .assigned
                    .iter_mut()
                    .find(|a| a.partition == p.partition)
                else {
                    at += len;
                    continue;
                };
                if let Some(broker) = p.preferred_read_replica {
                    // The leader sends us to a follower: no data came with it.
                    assigned.lease = Some(ReadLease {
                        broker,
                        leader_epoch: p.leader_epoch,
                        until: Instant::now()
                            + Duration::from_millis(u64::from(p.read_lease_ms.max(1))),
                    });
                    assigned.last_replica = Some(broker);
                    assigned.high_watermark = assigned.high_watermark.max(p.high_watermark);
                    redirected = true;
                    at += len;
                    continue;
                }
                if !from_follower {
                    // The leader served us itself: it wants us there.
                    assigned.last_replica = None;
                }
                assigned.high_watermark = if from_follower {
                    // A follower learns the leader's high watermark one replica fetch late:
                    // keep the larger one the leader told us, or `caught_up` would stop early.
                    // (Committed records stay committed: it never has to come down.)
                    assigned.high_watermark.max(p.high_watermark)
                } else {
                    p.high_watermark
                };
                let from = assigned.position;
                // Advance past the last whole batch returned.
                let bytes = &frame.payload()[at..at + len];
                let mut scan = 0;
                while scan < bytes.len() {
                    let batch = check_batch(&bytes[scan..])
                        .map_err(|e| ClientError::Protocol(format!("fetched batch: {e}")))?;
                    assigned.position = assigned.position.max(batch.header.next_offset().0);
                    scan += batch.header.batch_bytes();
                }
                fetched.push(Fetched {
                    partition: p.partition,
                    from,
                    frame: Rc::clone(&frame),
                    start: at,
                    end: at + len,
                });
                at += len;
            }
        }
        match unreachable {
            None => self.polls_failed = 0,
            Some(error) => {
                self.polls_failed += 1;
                if self.polls_failed > POLL_FAILURES_MAX {
                    return Err(error);
                }
                // The partitions move to a new leader: learn it, and do not spin meanwhile.
                let _ = client.refresh_metadata().await;
                if fetched.is_empty() {
                    glommio::timer::sleep(std::time::Duration::from_millis(POLL_RETRY_BACKOFF_MS))
                        .await;
                }
            }
        }
        Ok(Records {
            fetched,
            redirected,
        })
    }

    /// Back to the leader for these partitions (their follower failed or refused), which is
    /// asked not to send us to that follower again for `FAILED_FOLLOWER_AVOID_MS`.
    fn end_leases(&mut self, partitions: &[u32]) {
        let until = Instant::now() + Duration::from_millis(FAILED_FOLLOWER_AVOID_MS);
        for assigned in &mut self.assigned {
            if partitions.contains(&assigned.partition) {
                if let Some(lease) = assigned.lease.take() {
                    let slot = avoid_slot(&assigned.avoid, lease.broker, Instant::now());
                    assigned.avoid[slot] = Some((lease.broker, until));
                }
                assigned.last_replica = None;
            }
        }
    }

    /// Whether every assigned partition's position reached the high watermark it last heard
    /// (from a follower: the larger of its own and the leader's last one).
    pub fn caught_up(&self) -> bool {
        self.assigned.iter().all(|a| a.position >= a.high_watermark)
    }
}

/// Where a follower that failed us goes in the avoid list: its own slot if it is there, else a
/// free or expired one, else the one that expires first.
fn avoid_slot(avoid: &[Option<(u32, Instant)>], broker: u32, now: Instant) -> usize {
    avoid
        .iter()
        .position(|a| a.is_some_and(|(b, _)| b == broker))
        .or_else(|| {
            avoid
                .iter()
                .position(|a| a.is_none_or(|(_, until)| until <= now))
        })
        .or_else(|| (0..avoid.len()).min_by_key(|&i| avoid[i].map(|(_, until)| until)))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_followers_are_all_avoided_until_the_list_is_full() {
        let now = Instant::now();
        let later = |ms: u64| Some(now + Duration::from_millis(ms));
        let mut avoid = [None; AVOID_REPLICAS_MAX];
        // Two followers failing in turn are both kept (one slot would let them alternate).
        for (broker, ms) in [(2, 100), (3, 200)] {
            let slot = avoid_slot(&avoid, broker, now);
            avoid[slot] = later(ms).map(|until| (broker, until));
        }
        assert_eq!(avoid[0], later(100).map(|u| (2, u)));
        assert_eq!(avoid[1], later(200).map(|u| (3, u)));
        // The same follower again renews its own slot.
        assert_eq!(avoid_slot(&avoid, 3, now), 1);
        // An expired entry is reused.
        assert_eq!(avoid_slot(&avoid, 4, now + Duration::from_millis(150)), 0);
        // Full: the entry that expires first gives way.
        let mut full = [None; AVOID_REPLICAS_MAX];
        for (i, slot) in full.iter_mut().enumerate() {
            *slot = later(1_000 - i as u64).map(|u| (10 + i as u32, u));
        }
        assert_eq!(avoid_slot(&full, 99, now), AVOID_REPLICAS_MAX - 1);
    }
}
