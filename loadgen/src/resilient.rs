//! Surviving broker failures in the load generator (not in the client library, which others
//! change concurrently): the client's metadata comes from one bootstrap broker, so when that
//! broker dies the client cannot learn where partitions moved. A [`ClientSlot`] holds the
//! current client and replaces it with one bootstrapped from the next address that answers
//! (`--bootstrap a,b,c`); producers and consumers notice the new generation and rebuild.
//!
//! Also here: the tailing consumers of the audit and the read-back after the run, both of
//! which retry (metadata refresh, backoff) until a deadline instead of failing on the first
//! error.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use wharf::client::consumer::{Consumer, ConsumerConfig, SeekTo};
use wharf::client::{Client, ClientConfig, ClientError};
use wharf::protocol::{ErrorCode, OffsetSpec};

use crate::audit::{OffsetMap, PartitionRead};

/// Backoff between retries of a reader or a reconnection: doubles from the first to the max.
const RETRY_BACKOFF_FIRST: Duration = Duration::from_millis(50);
const RETRY_BACKOFF_MAX: Duration = Duration::from_millis(1_000);

pub struct ClientSlot {
    addresses: Vec<String>,
    request_timeout_ms: u64,
    current: RefCell<Rc<Client>>,
    generation: Cell<u64>,
    /// The address the current client bootstrapped from.
    index: Cell<usize>,
    rotating: Cell<bool>,
    pub reconnections: Cell<u64>,
}

fn is_connection_error(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::Connect { .. } | ClientError::Closed { .. } | ClientError::Timeout { .. }
    ) || matches!(
        error,
        ClientError::Server {
            code: ErrorCode::ShuttingDown | ErrorCode::BrokerUnavailable,
            ..
        }
    )
}

impl ClientSlot {
    /// Connects through the first address that answers, trying them all until `deadline`.
    pub async fn connect(
        addresses: &[String],
        request_timeout_ms: u64,
        deadline: Instant,
    ) -> Result<Rc<ClientSlot>, String> {
        assert!(!addresses.is_empty());
        let mut backoff = RETRY_BACKOFF_FIRST;
        loop {
            match connect_first(addresses, 0, request_timeout_ms).await {
                Ok((client, index)) => {
                    return Ok(Rc::new(ClientSlot {
                        addresses: addresses.to_vec(),
                        request_timeout_ms,
                        current: RefCell::new(client),
                        generation: Cell::new(0),
                        index: Cell::new(index),
                        rotating: Cell::new(false),
                        reconnections: Cell::new(0),
                    }))
                }
                Err(error) if Instant::now() + backoff >= deadline => return Err(error),
                Err(_) => {
                    glommio::timer::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                }
            }
        }
    }

    pub fn client(&self) -> Rc<Client> {
        Rc::clone(&self.current.borrow())
    }

    /// Changes each time the client is replaced.
    pub fn generation(&self) -> u64 {
        self.generation.get()
    }

    /// Refreshes the metadata; when the bootstrap broker does not answer, reconnects through
    /// the next address that does. Returns whether fresh metadata is in hand.
    pub async fn refresh(&self) -> bool {
        let client = self.client();
        match client.refresh_metadata().await {
            Ok(_) => true,
            Err(error) if is_connection_error(&error) && self.addresses.len() > 1 => {
                self.rotate().await
            }
            Err(_) => false,
        }
    }

    async fn rotate(&self) -> bool {
        if self.rotating.replace(true) {
            return false; // Another task is at it.
        }
        let start = (self.index.get() + 1) % self.addresses.len();
        let outcome = connect_first(&self.addresses, start, self.request_timeout_ms).await;
        self.rotating.set(false);
        match outcome {
            Ok((client, index)) => {
                tracing::warn!(address = %self.addresses[index], "bootstrap broker changed");
                *self.current.borrow_mut() = client;
                self.index.set(index);
                self.generation.set(self.generation.get() + 1);
                self.reconnections.set(self.reconnections.get() + 1);
                true
            }
            Err(_) => false,
        }
    }
}

/// A client bootstrapped (metadata in hand) from the first of `addresses`, from `start` on and
/// wrapping around, that answers.
async fn connect_first(
    addresses: &[String],
    start: usize,
    request_timeout_ms: u64,
) -> Result<(Rc<Client>, usize), String> {
    let mut errors = Vec::new();
    for step in 0..addresses.len() {
        let index = (start + step) % addresses.len();
        let mut config = ClientConfig::new(addresses[index].clone());
        config.request_timeout_ms = request_timeout_ms;
        let connected = async {
            let client = Client::connect(config).await?;
            client.refresh_metadata().await?;
            Ok::<_, ClientError>(client)
        };
        match connected.await {
            Ok(client) => return Ok((client, index)),
            Err(error) => errors.push(format!("{}: {error}", addresses[index])),
        }
    }
    Err(format!("no broker answered ({})", errors.join("; ")))
}

/// A reader of one partition that survives broker failures: it rebuilds its consumer (at the
/// position it reached) after an error or when the slot's client changes.
pub struct PartitionReader {
    slot: Rc<ClientSlot>,
    topic: String,
    partition: u32,
    max_wait_ms: u32,
    consumer: Option<(u64, Consumer)>,
    /// The next offset to read; `None` until the first seek.
    position: Option<u64>,
    pub log_start: Option<u64>,
    pub high_watermark: Option<u64>,
    backoff: Duration,
    pub errors: u64,
    pub reseeks: u64,
    pub last_error: Option<String>,
}

impl PartitionReader {
    pub fn new(slot: Rc<ClientSlot>, topic: &str, partition: u32, max_wait_ms: u32) -> Self {
        PartitionReader {
            slot,
            topic: topic.to_string(),
            partition,
            max_wait_ms,
            consumer: None,
            position: None,
            log_start: None,
            high_watermark: None,
            backoff: RETRY_BACKOFF_FIRST,
            errors: 0,
            reseeks: 0,
            last_error: None,
        }
    }

    pub fn caught_up(&self) -> bool {
        matches!((self.position, self.high_watermark), (Some(p), Some(hw)) if p >= hw)
    }

    /// One poll; calls `visit(offset, value)` for each record returned. Errors are absorbed
    /// (counted, then a metadata refresh and a backoff).
    pub async fn poll(&mut self, mut visit: impl FnMut(u64, &[u8])) {
        if let Err(error) = self.try_poll(&mut visit).await {
            self.errors += 1;
            self.last_error = Some(error.to_string());
            if let ClientError::Server {
                code: ErrorCode::OffsetOutOfRange,
                ..
            } = error
            {
                // The log now ends below our position (a new leader's shorter log): read again
                // from its high watermark; the audit checks what reappears.
                self.position = None;
                self.reseeks += 1;
            }
            self.consumer = None;
            self.slot.refresh().await;
            glommio::timer::sleep(self.backoff).await;
            self.backoff = (self.backoff * 2).min(RETRY_BACKOFF_MAX);
        } else {
            self.backoff = RETRY_BACKOFF_FIRST;
        }
    }

    async fn try_poll(&mut self, visit: &mut impl FnMut(u64, &[u8])) -> Result<(), ClientError> {
        let generation = self.slot.generation();
        if !matches!(&self.consumer, Some((g, _)) if *g == generation) {
            let mut consumer = Consumer::new(
                self.slot.client(),
                &self.topic,
                ConsumerConfig {
                    max_wait_ms: self.max_wait_ms,
                    ..ConsumerConfig::default()
                },
            );
            let seek = match (self.position, self.reseeks) {
                (Some(position), _) => SeekTo::Offset(position),
                (None, 0) => SeekTo::Earliest,
                (None, _) => SeekTo::Latest,
            };
            consumer.assign(Some(vec![self.partition]), seek).await?;
            // The high watermark now, from the leader (a fetch that fails for a partition
            // returns nothing for it, not an error: without this a reader of a partition
            // whose leader is down would look caught up at offset 0).
            let client = self.slot.client();
            let latest = client
                .list_offsets(&self.topic, &[self.partition], OffsetSpec::Latest)
                .await?;
            let latest = latest.first().map_or(0, |(_, o)| *o);
            self.high_watermark = Some(self.high_watermark.unwrap_or(0).max(latest));
            if self.position.is_none() && self.log_start.is_none() {
                self.log_start = consumer.position(self.partition);
            }
            self.position = consumer.position(self.partition);
            self.consumer = Some((generation, consumer));
        }
        let Some((_, consumer)) = self.consumer.as_mut() else {
            return Ok(());
        };
        let records = consumer.poll().await?;
        records.for_each(|record| visit(record.offset, record.value))?;
        self.position = consumer.position(self.partition);
        let polled = consumer.high_watermark(self.partition).unwrap_or(0);
        self.high_watermark = Some(self.high_watermark.unwrap_or(0).max(polled));
        Ok(())
    }
}

/// A tailing consumer of `partition` during the run: books every record it sees into `seen`
/// and counts offsets it skipped (a hole in what a consumer was shown). Stops after `end`
/// once caught up, or at `drain_until`.
#[allow(clippy::too_many_arguments)]
pub async fn tail(
    slot: Rc<ClientSlot>,
    topic: String,
    partition: u32,
    run_id: u32,
    seen: Rc<RefCell<OffsetMap>>,
    end: Instant,
    drain_until: Instant,
) -> (u64, u64) {
    let mut reader = PartitionReader::new(slot, &topic, partition, 100);
    let mut expected: Option<u64> = None;
    loop {
        let now = Instant::now();
        if now >= drain_until || (now >= end && reader.caught_up()) {
            return (reader.errors, reader.reseeks);
        }
        let reseeks = reader.reseeks;
        reader
            .poll(|offset, value| {
                let mut seen = seen.borrow_mut();
                if let Some(expected) = expected {
                    if offset > expected {
                        seen.skipped(partition, expected, offset);
                    }
                }
                expected = Some(offset + 1);
                seen.observe(run_id, partition, offset, value);
            })
            .await;
        if reader.reseeks != reseeks {
            expected = None; // Reading again from a new position: not a skip.
        }
    }
}

/// Reads every partition from its log start to its high watermark into a fresh map, with
/// retries until `deadline`.
pub async fn read_back(
    addresses: &[String],
    request_timeout_ms: u64,
    topic: &str,
    run_id: u32,
    deadline: Instant,
) -> Result<(OffsetMap, Vec<PartitionRead>, Vec<String>), String> {
    let slot = ClientSlot::connect(addresses, request_timeout_ms, deadline).await?;
    let mut partitions = None;
    while partitions.is_none() && Instant::now() < deadline {
        match slot.client().partition_count(topic).await {
            Ok(count) => partitions = Some(count),
            Err(_) => {
                slot.refresh().await;
                glommio::timer::sleep(RETRY_BACKOFF_MAX).await;
            }
        }
    }
    let partitions =
        partitions.ok_or_else(|| format!("cannot learn topic {topic}'s partitions"))?;
    let mut map = OffsetMap::default();
    let mut reads = Vec::new();
    let mut notes = Vec::new();
    for partition in 0..partitions {
        let mut reader = PartitionReader::new(Rc::clone(&slot), topic, partition, 50);
        while !reader.caught_up() && Instant::now() < deadline {
            reader
                .poll(|offset, value| map.observe(run_id, partition, offset, value))
                .await;
        }
        let complete = reader.caught_up();
        if !complete {
            notes.push(format!(
                "partition {partition}: not read to its high watermark by the deadline ({} errors, last: {})",
                reader.errors,
                reader.last_error.as_deref().unwrap_or("none")
            ));
        }
        reads.push(PartitionRead {
            log_start: reader.log_start.unwrap_or(0),
            high_watermark: reader.high_watermark.unwrap_or(0),
            complete,
        });
    }
    Ok((map, reads, notes))
}
