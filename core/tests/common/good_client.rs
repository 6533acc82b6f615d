//! A well-behaved client that keeps producing and reading back while a test attacks the
//! broker: every request must be answered, in time, and what it wrote must stay as written.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::wire::{
    answered, batch, connect_from, connect_to, error_message, produce_frame, read_response, request,
};
use wharf::protocol::*;

/// Pause between two rounds (one produce, one fetch) of the good client.
const ROUND_PAUSE_MS: u64 = 10;
/// A request answered later than this counts as slow.
pub const ANSWER_MS_TARGET: u64 = 100;
/// No request may take longer than this, whatever the machine is doing.
pub const ANSWER_MS_MAX: u64 = 2_000;

/// `finish` first waits (bounded) until the good client made this many requests.
const REQUESTS_MIN: usize = 40;

pub struct GoodClient {
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
    handle: Option<JoinHandle<GoodReport>>,
}

#[derive(Debug, Default)]
pub struct GoodReport {
    pub latencies_us: Vec<u64>,
    pub failures: Vec<String>,
    /// (offset, value) of every acknowledged record.
    pub acknowledged: Vec<(u64, Vec<u8>)>,
}

impl GoodReport {
    /// Every request answered without error; none over `ANSWER_MS_MAX`; at least 99% within
    /// `ANSWER_MS_TARGET` (the rest are the machine's scheduling and disk stalls: the good
    /// client's topic does not fsync before acks).
    pub fn assert_served(&self, what: &str) {
        assert!(
            self.failures.is_empty(),
            "{what}: good client failed: {:?}",
            self.failures
        );
        assert!(
            self.latencies_us.len() >= REQUESTS_MIN,
            "{what}: too few requests ({})",
            self.latencies_us.len()
        );
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        let p50 = sorted[sorted.len() / 2];
        let p99 = sorted[sorted.len() * 99 / 100];
        let max = *sorted.last().unwrap_or(&0);
        let slow = sorted
            .iter()
            .filter(|&&l| l > ANSWER_MS_TARGET * 1000)
            .count();
        println!(
            "{what}: good client: {} requests, p50 {p50} us, p99 {p99} us, max {max} us, {slow} over {ANSWER_MS_TARGET} ms",
            sorted.len()
        );
        assert!(
            max <= ANSWER_MS_MAX * 1000,
            "{what}: a request took {max} us"
        );
        assert!(
            slow * 100 <= sorted.len(),
            "{what}: {slow} of {} requests took over {ANSWER_MS_TARGET} ms",
            sorted.len()
        );
    }
}

/// Creates `topic` (one partition, no fsync before acks: latency then measures the broker,
/// not the disk) on `address`.
pub fn create_topic(address: &str, topic: &str) {
    let mut stream = connect_to(address);
    std::io::Write::write_all(
        &mut stream,
        &request(
            ApiKey::CreateTopic,
            1,
            &CreateTopicRequest {
                name: topic.to_string(),
                partitions: 1,
                replication_factor: 1,
                configs: vec![ConfigEntry {
                    key: "flush".to_string(),
                    value: "interval".to_string(),
                }],
            },
            &[],
        ),
    )
    .expect("send");
    let frame = read_response(&mut stream).expect("create answered");
    let result: TopicResult = frame.decode_body().expect("result");
    assert_eq!(result.error, 0, "create {topic}: {}", result.message);
}

impl GoodClient {
    /// Starts producing to partition 0 of `topic` (created by the caller) on `address` and
    /// reading each record back, connecting from 127.0.0.2: attackers connect from
    /// 127.0.0.1, so per-address limits aimed at them do not hit it.
    pub fn start(address: &str, topic: &str) -> GoodClient {
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let stopping = Arc::clone(&stop);
        let counting = Arc::clone(&requests);
        let address = address.to_string();
        let topic = topic.to_string();
        let handle = std::thread::spawn(move || run(&address, &topic, &stopping, &counting));
        GoodClient {
            stop,
            requests,
            handle: Some(handle),
        }
    }

    /// Waits (bounded) until the good client made `count` more requests: an attack is then
    /// measured over a real stretch of the good client's traffic.
    pub fn serve_more(&self, count: usize) {
        let target = self.requests.load(Ordering::Acquire) + count;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.requests.load(Ordering::Acquire) < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(ROUND_PAUSE_MS));
        }
    }

    pub fn finish(mut self) -> GoodReport {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.requests.load(Ordering::Acquire) < REQUESTS_MIN && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(ROUND_PAUSE_MS));
        }
        self.stop.store(true, Ordering::Release);
        self.handle
            .take()
            .expect("running")
            .join()
            .expect("good client thread")
    }
}

impl Drop for GoodClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn timed<T>(
    report: &mut GoodReport,
    requests: &AtomicUsize,
    call: impl FnOnce() -> Result<T, String>,
) -> Option<T> {
    let started = Instant::now();
    let result = call();
    report
        .latencies_us
        .push(started.elapsed().as_micros() as u64);
    requests.fetch_add(1, Ordering::Release);
    match result {
        Ok(value) => Some(value),
        Err(error) => {
            report.failures.push(error);
            None
        }
    }
}

fn run(address: &str, topic: &str, stop: &AtomicBool, requests: &AtomicUsize) -> GoodReport {
    let mut report = GoodReport::default();
    let mut stream = connect_from(address, std::net::Ipv4Addr::new(127, 0, 0, 2))
        .expect("good client connects from 127.0.0.2");
    stream
        .set_read_timeout(Some(Duration::from_millis(ANSWER_MS_MAX * 2)))
        .expect("timeout");
    let mut round = 0u32;
    while !stop.load(Ordering::Acquire) && report.failures.is_empty() {
        round += 1;
        let value = format!("good-{round}").into_bytes();
        let produced = timed(&mut report, requests, || {
            produce_one(&mut stream, round * 2, topic, &value)
        });
        let Some(offset) = produced else { break };
        report.acknowledged.push((offset, value.clone()));
        let read = timed(&mut report, requests, || {
            fetch_values(&mut stream, round * 2 + 1, topic, offset, 0)
        });
        if let Some(values) = read {
            if values.first().map(|(o, v)| (*o, v.as_slice())) != Some((offset, value.as_slice())) {
                report.failures.push(format!(
                    "read back {values:?} at offset {offset}, wrote {value:?}"
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(ROUND_PAUSE_MS));
    }
    report
}

fn produce_one(stream: &mut TcpStream, id: u32, topic: &str, value: &[u8]) -> Result<u64, String> {
    std::io::Write::write_all(stream, &produce_frame(id, topic, 0, &batch(&[value])))
        .map_err(|e| format!("send produce: {e}"))?;
    let response: ProduceResponse = answered(stream, "produce")?;
    let partition = response.partitions.first().ok_or("no partition")?;
    partition_ok("produce", partition.error, &partition.message)?;
    Ok(partition.base_offset)
}

fn partition_ok(what: &str, error: u16, message: &str) -> Result<(), String> {
    if error == 0 {
        return Ok(());
    }
    Err(format!("{what}: {}: {message}", ErrorCode::from_u16(error)))
}

/// (offset, value) of the records a fetch from `offset` returns.
pub fn fetch_values(
    stream: &mut TcpStream,
    id: u32,
    topic: &str,
    offset: u64,
    max_wait_ms: u32,
) -> Result<Vec<(u64, Vec<u8>)>, String> {
    std::io::Write::write_all(
        stream,
        &request(
            ApiKey::Fetch,
            id,
            &FetchRequest {
                max_wait_ms,
                min_bytes: 1,
                max_bytes: 1024 * 1024,
                partitions: vec![FetchPartition {
                    topic: topic.to_string(),
                    partition: 0,
                    fetch_offset: offset,
                    max_bytes: 1024 * 1024,
                    leader_epoch: None,
                    read_replica: None,
                    avoid_replicas: Vec::new(),
                }],
                reader_id: String::new(),
                rack: String::new(),
            },
            &[],
        ),
    )
    .map_err(|e| format!("send fetch: {e}"))?;
    let frame = read_response(stream).ok_or("fetch not answered")?;
    let response: FetchResponse = if frame.header.error() == ErrorCode::None {
        frame.decode_body().map_err(|e| e.to_string())?
    } else {
        return Err(format!("fetch: {}", error_message(&frame)));
    };
    let partition = response.partitions.first().ok_or("no partition")?;
    partition_ok("fetch", partition.error, &partition.message)?;
    let mut values = Vec::new();
    for checked in wharf_storage::batch::batches(frame.payload()) {
        let checked = checked.map_err(|e| format!("fetched batch: {e}"))?;
        let base = checked.header.base_offset.0;
        for (i, record) in checked
            .records()
            .map_err(|e| e.to_string())?
            .iter()
            .enumerate()
        {
            values.push((base + i as u64, record.value.to_vec()));
        }
    }
    Ok(values)
}

/// Every record of partition 0 of `topic` from offset 0 up to the end.
pub fn read_all(address: &str, topic: &str) -> Vec<(u64, Vec<u8>)> {
    let mut stream = connect_to(address);
    let mut all = Vec::new();
    for round in 0..100_000u32 {
        let next = all.last().map_or(0, |(o, _): &(u64, Vec<u8>)| o + 1);
        let values = fetch_values(&mut stream, round, topic, next, 0).expect("read back");
        if values.is_empty() {
            return all;
        }
        all.extend(values.into_iter().filter(|(o, _)| *o >= next));
    }
    panic!("read_all did not reach the end");
}
