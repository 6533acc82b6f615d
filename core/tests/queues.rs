//! Queues end to end on a real `wharf serve`: records acquired under leases and settled one by
//! one; a crashed member's records come back after the lease to another member, and its late
//! ack is refused; nack with a delay and the backoff schedule are kept; after
//! `max_deliveries` (or a reject) the record is in the dead-letter topic with headers naming
//! where it came from; members get disjoint records; acks and pending deliveries survive a
//! kill -9 of the broker, replayed from a compacted state log.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::{run, Broker};
use wharf::client::producer::{Producer, ProducerConfig};
use wharf::client::queues::QueueMember;
use wharf::client::{decode, Client, ClientConfig, ClientError};
use wharf::protocol::*;

const TOPIC: &str = "jobs";
const PARTITIONS: u32 = 3;
const CONFIG: &str = "[groups]\noffsets_topic_partitions = 2\n";
/// Small segments and frequent snapshots, so the state log is compacted within a test.
const COMPACTING_CONFIG: &str = "[groups]\noffsets_topic_partitions = 2\noffsets_segment_bytes = 65536\nsnapshot_after_records = 200\n";
/// Acquire calls a wait makes before it gives up (each long-polls at most `WAIT_MS`).
const ROUNDS_MAX: usize = 200;
const WAIT_MS: u32 = 100;

async fn connect(address: &str) -> Rc<Client> {
    Client::connect(ClientConfig::new(address))
        .await
        .expect("connect")
}

async fn produce(client: &Rc<Client>, count: u32) {
    let producer = Producer::new(Rc::clone(client), ProducerConfig::default());
    let mut deliveries = Vec::new();
    for i in 0..count {
        let value = format!("job{i:04}");
        let key = format!("k{}", i % 7);
        deliveries.push(
            producer
                .send_to(
                    TOPIC,
                    Some(i % PARTITIONS),
                    Some(key.as_bytes()),
                    value.as_bytes(),
                )
                .await
                .expect("queued"),
        );
    }
    producer.flush().await;
    for delivery in deliveries {
        delivery.await.expect("acknowledged");
    }
}

fn settings(ack_wait_ms: u64, max_deliveries: u32) -> QueueSettings {
    QueueSettings {
        ack_wait_ms,
        max_deliveries,
        backoff_list_ms: vec![300, 600],
        ..QueueSettings::default()
    }
}

/// Acquires until `count` records came (or the rounds run out).
async fn acquire_n(member: &QueueMember, count: usize) -> Vec<QueueDelivery> {
    let mut got = Vec::new();
    for _ in 0..ROUNDS_MAX {
        if got.len() >= count {
            break;
        }
        let more = member
            .acquire((count - got.len()) as u32, WAIT_MS)
            .await
            .expect("acquire");
        got.extend(more);
    }
    got
}

/// Asserts that the call was refused with `code`.
fn assert_refused<T: std::fmt::Debug>(result: &Result<T, ClientError>, code: ErrorCode) {
    assert!(
        matches!(result, Err(ClientError::Server { code: c, .. }) if *c == code),
        "expected {code}: {result:?}"
    );
}

fn value(d: &QueueDelivery) -> String {
    String::from_utf8_lossy(&d.value).into_owned()
}

/// Every record of `topic` partition `partition` with its headers.
async fn read_with_headers(
    client: &Rc<Client>,
    topic: &str,
    partition: u32,
) -> Vec<(Vec<u8>, BTreeMap<String, String>)> {
    let connection = client
        .partition_connection(topic, partition)
        .await
        .expect("leader");
    let request = FetchRequest {
        max_wait_ms: 0,
        min_bytes: 0,
        max_bytes: 1 << 20,
        partitions: vec![FetchPartition {
            topic: topic.to_string(),
            partition,
            fetch_offset: 0,
            max_bytes: 1 << 20,
            leader_epoch: None,
            read_replica: None,
            avoid_replicas: Vec::new(),
        }],
        reader_id: String::new(),
        rack: String::new(),
    };
    let frame = connection
        .call(ApiKey::Fetch, &request, Vec::new(), 5_000)
        .await
        .expect("fetch");
    let response: FetchResponse = decode(&frame).expect("decode");
    let mut out = Vec::new();
    let mut at = 0;
    for p in response.partitions {
        assert_eq!(p.error, 0, "{}", p.message);
        let bytes = &frame.payload()[at..at + p.batch_bytes as usize];
        at += p.batch_bytes as usize;
        let mut scan = 0;
        while scan < bytes.len() {
            let batch = wharf_storage::batch::check_batch(&bytes[scan..]).expect("batch");
            for record in batch.records().expect("records").iter() {
                let headers = record
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.key.as_str().to_string(),
                            String::from_utf8_lossy(h.value.as_slice()).into_owned(),
                        )
                    })
                    .collect();
                out.push((record.value.as_slice().to_vec(), headers));
            }
            scan += batch.header.batch_bytes();
        }
    }
    out
}

#[test]
fn leases_redeliver_with_backoff_stale_acks_are_refused_and_failures_go_to_the_dead_letter_topic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), 2, CONFIG);
    let address = broker.bootstrap();
    run(async move {
        let client = connect(&address).await;
        client
            .create_topic(TOPIC, PARTITIONS, 1, Vec::new())
            .await
            .expect("create topic");
        // Bad input first: unknown topic, bad backoff, unknown queue.
        let unknown = client
            .create_queue("q", "nope", QueueSettings::default())
            .await;
        assert_refused(&unknown, ErrorCode::UnknownTopic);
        let shrinking = QueueSettings {
            backoff_multiplier_permille: 500,
            ..QueueSettings::default()
        };
        let bad = client.create_queue("q", TOPIC, shrinking).await;
        assert_refused(&bad, ErrorCode::InvalidConfig);
        let missing = QueueMember::new(Rc::clone(&client), "none", "m")
            .acquire(1, 0)
            .await;
        assert_refused(&missing, ErrorCode::UnknownQueue);

        client
            .create_queue("q", TOPIC, settings(800, 3))
            .await
            .expect("create queue");
        // Again with the same settings: fine; with others: refused.
        client
            .create_queue("q", TOPIC, settings(800, 3))
            .await
            .expect("create again");
        let other = client.create_queue("q", TOPIC, settings(900, 3)).await;
        assert_refused(&other, ErrorCode::QueueAlreadyExists);
        produce(&client, 30).await;

        // A member takes 5 records and "crashes" (never settles them).
        let crashed = QueueMember::new(Rc::clone(&client), "q", "crashed");
        let taken = acquire_n(&crashed, 5).await;
        assert_eq!(taken.len(), 5);
        assert!(taken.iter().all(|d| d.delivery_attempt == 1));
        let taken_at = Instant::now();

        // Another member gets the other 25, never one of the 5 while their lease runs.
        let worker = QueueMember::new(Rc::clone(&client), "q", "worker");
        let rest = acquire_n(&worker, 25).await;
        assert_eq!(rest.len(), 25);
        let taken_values: BTreeSet<String> = taken.iter().map(value).collect();
        assert!(rest.iter().all(|d| !taken_values.contains(&value(d))));
        for d in &rest {
            worker.ack(d).await.expect("ack");
        }
        // An ack of an acked delivery is stale.
        let twice = worker.ack(&rest[0]).await;
        assert_refused(&twice, ErrorCode::StaleDelivery);

        // After the lease (800 ms) and the first backoff (300 ms), the 5 come back to the
        // worker at attempt 2.
        let again = acquire_n(&worker, 5).await;
        let waited = taken_at.elapsed();
        assert_eq!(again.len(), 5, "redelivered after the lease");
        assert!(again.iter().all(|d| d.delivery_attempt == 2));
        assert!(
            waited >= Duration::from_millis(800 + 300 - 50),
            "redelivered after {waited:?}, before lease + backoff"
        );
        // Within a tolerance: the tick (50 ms) and a long-poll round (wakes when a record
        // comes due), with room for a loaded CI machine.
        assert!(
            waited <= Duration::from_millis(800 + 300 + 2_000),
            "redelivered only after {waited:?}"
        );
        let again_values: BTreeSet<String> = again.iter().map(value).collect();
        assert_eq!(again_values, taken_values);
        // The crashed member's late ack cannot settle the new delivery.
        let stale = crashed.ack(&taken[0]).await;
        assert_refused(&stale, ErrorCode::StaleDelivery);

        // Extend renews a lease.
        let extended = worker.extend(&again[0]).await.expect("extend");
        assert!(extended >= again[0].lease_until_ms);
        // Ack one, reject one, nack one with an explicit delay, nack two with the backoff.
        worker.ack(&again[0]).await.expect("ack");
        worker
            .reject(&again[1], "cannot parse")
            .await
            .expect("reject");
        let nacked_at = Instant::now();
        worker.nack(&again[2], Some(400)).await.expect("nack");
        worker.nack(&again[3], None).await.expect("nack");
        worker.nack(&again[4], None).await.expect("nack");
        // Nothing is deliverable during the nack delay.
        let early = worker.acquire(5, 0).await.expect("acquire");
        assert!(early.is_empty(), "delivered during the delay: {early:?}");
        // The explicit delay (400 ms) and the backoff of attempt 2 (600 ms).
        let third = acquire_n(&worker, 3).await;
        assert_eq!(third.len(), 3);
        assert!(nacked_at.elapsed() >= Duration::from_millis(400 - 50));
        assert!(third.iter().all(|d| d.delivery_attempt == 3));
        // The last allowed delivery fails: dead-lettered.
        for d in &third {
            worker.nack(d, Some(0)).await.expect("nack");
        }
        // Four records reach the dead-letter topic: one rejected, three after 3 deliveries.
        let mut dead = Vec::new();
        for _ in 0..ROUNDS_MAX {
            dead.clear();
            for p in 0..PARTITIONS {
                dead.extend(read_with_headers(&client, "jobs.dlq", p).await);
            }
            if dead.len() >= 4 {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(dead.len(), 4, "dead letters: {dead:?}");
        let rejected = dead
            .iter()
            .find(|(v, _)| *v == again[1].value)
            .expect("the rejected record");
        assert_eq!(rejected.1["wharf.dlq.topic"], TOPIC);
        assert_eq!(
            rejected.1["wharf.dlq.partition"],
            again[1].partition.to_string()
        );
        assert_eq!(rejected.1["wharf.dlq.offset"], again[1].offset.to_string());
        assert_eq!(rejected.1["wharf.dlq.delivery_count"], "2");
        assert_eq!(rejected.1["wharf.dlq.reason"], "rejected: cannot parse");
        for d in &third {
            let (_, headers) = dead.iter().find(|(v, _)| *v == d.value).expect("dead");
            assert_eq!(headers["wharf.dlq.delivery_count"], "3");
            assert_eq!(headers["wharf.dlq.reason"], "max_deliveries: nacked");
        }
        let described = client.describe_queue("q").await.expect("describe");
        assert_eq!(described.topic, TOPIC);
        assert_eq!(described.settings.dead_letter_topic, "jobs.dlq");
        assert_eq!(described.dead_lettered, 4);
        for p in &described.partitions {
            assert_eq!(p.in_flight, 0);
            assert_eq!(p.start_offset, 10, "everything done on {p:?}");
        }
        let listed = client.list_queues().await.expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].group, "q");
    });
    // The metrics say the same (counters since the coordinator loaded the queue).
    let metric = |series: &str| common::metric(&broker, series);
    assert_eq!(
        metric("wharf_queue_dead_lettered_total{group=\"q\"}"),
        Some(4)
    );
    assert_eq!(metric("wharf_queue_acked_total{group=\"q\"}"), Some(26));
    assert_eq!(
        metric("wharf_queue_deliveries_total{group=\"q\",attempt=\"1\"}"),
        Some(30)
    );
    assert_eq!(
        metric("wharf_queue_deliveries_total{group=\"q\",attempt=\"2\"}"),
        Some(5)
    );
    assert_eq!(
        metric("wharf_queue_deliveries_total{group=\"q\",attempt=\"3\"}"),
        Some(3)
    );
    let mut in_flight = None;
    for _ in 0..ROUNDS_MAX {
        in_flight = metric("wharf_queue_in_flight{group=\"q\"}");
        if in_flight == Some(0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(in_flight, Some(0));
}

#[test]
fn members_get_disjoint_records_and_acks_and_leases_survive_a_kill9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(dir.path(), 2, COMPACTING_CONFIG);
    let address = broker.bootstrap();
    const RECORDS: u32 = 300;
    let (acked, held) = run(async move {
        let client = connect(&address).await;
        client
            .create_topic(TOPIC, PARTITIONS, 1, Vec::new())
            .await
            .expect("create topic");
        client
            .create_queue("work", TOPIC, settings(1_500, 5))
            .await
            .expect("create queue");
        produce(&client, RECORDS).await;
        let members: Vec<QueueMember> = (0..4)
            .map(|i| QueueMember::new(Rc::clone(&client), "work", &format!("m{i}")))
            .collect();
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        let mut acked = BTreeSet::new();
        // Every member takes records in turn and acks all but the last batch of the last
        // member, which stays held across the restart.
        let mut held = Vec::new();
        for round in 0..ROUNDS_MAX {
            if seen.len() as u32 >= RECORDS {
                break;
            }
            let member = &members[round % members.len()];
            let got = member.acquire(16, WAIT_MS).await.expect("acquire");
            for d in &got {
                let previous = seen.insert(value(d), member.member().to_string());
                assert!(previous.is_none(), "{} delivered twice", value(d));
            }
            if seen.len() as u32 >= RECORDS && held.is_empty() {
                held = got;
                break;
            }
            for d in &got {
                member.ack(d).await.expect("ack");
                acked.insert(value(d));
            }
        }
        assert_eq!(seen.len() as u32, RECORDS, "every record delivered once");
        assert!(!held.is_empty());
        let owners: BTreeSet<&String> = seen.values().collect();
        assert!(owners.len() >= 3, "records spread over members: {owners:?}");
        (acked, held)
    });
    // The state log was compacted: snapshots written, the segments below them deleted.
    let series = format!(
        "wharf_partition_log_start_offset{{topic=\"{QUEUE_STATE_TOPIC}\",partition=\"{}\"}}",
        group_partition("work", 2)
    );
    let mut log_start = 0;
    for _ in 0..ROUNDS_MAX {
        log_start = common::metric(&broker, &series).unwrap_or(0);
        if log_start > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(log_start > 0, "the queue state log was not compacted");
    broker.kill9();
    broker.restart();
    let address = broker.bootstrap();
    run(async move {
        let client = connect(&address).await;
        // Acks survived: only the held records come back, after their lease, at attempt 2.
        let member = QueueMember::new(Rc::clone(&client), "work", "after");
        let back = acquire_n(&member, held.len()).await;
        let back_values: BTreeSet<String> = back.iter().map(value).collect();
        let held_values: BTreeSet<String> = held.iter().map(value).collect();
        assert_eq!(
            back_values, held_values,
            "exactly the unacked records come back"
        );
        assert!(back.iter().all(|d| d.delivery_attempt == 2));
        assert!(back_values.is_disjoint(&acked));
        for d in &back {
            member.ack(d).await.expect("ack");
        }
        let nothing = member.acquire(10, 300).await.expect("acquire");
        assert!(nothing.is_empty(), "{nothing:?}");
        let described = client.describe_queue("work").await.expect("describe");
        let done: u64 = described.partitions.iter().map(|p| p.start_offset).sum();
        assert_eq!(done, u64::from(RECORDS));
    });
}

#[test]
fn the_cli_creates_describes_lists_and_consumes_a_queue_with_acks() {
    use common::cli;
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), 2, CONFIG);
    let address = broker.bootstrap();
    let (code, _, err) = cli(
        &address,
        &["topic", "create", TOPIC, "--partitions", "3"],
        "",
    );
    assert_eq!(code, Some(0), "{err}");
    // Bad input: a jitter above 1, a queue on a missing topic.
    let (code, _, err) = cli(
        &address,
        &[
            "queue",
            "create",
            "q",
            "--topic",
            TOPIC,
            "--backoff-jitter",
            "1.5",
        ],
        "",
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("jitter"), "{err}");
    let (code, _, err) = cli(&address, &["queue", "create", "q", "--topic", "nope"], "");
    assert_ne!(code, Some(0));
    assert!(err.contains("unknown_topic"), "{err}");
    let (code, out, err) = cli(
        &address,
        &[
            "queue",
            "create",
            "q",
            "--topic",
            TOPIC,
            "--ack-wait-ms",
            "60000",
        ],
        "",
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("jobs.dlq"), "{out}");
    let lines: String = (0..20).map(|i| format!("line{i}\n")).collect();
    let (code, _, err) = cli(&address, &["produce", TOPIC], &lines);
    assert_eq!(code, Some(0), "{err}");
    // Twelve acked, then the other eight; none twice.
    let (code, first, err) = cli(
        &address,
        &["consume", TOPIC, "--queue", "q", "--ack", "--count", "12"],
        "",
    );
    assert_eq!(code, Some(0), "{err}");
    let (code, rest, err) = cli(&address, &["consume", TOPIC, "--queue", "q", "--ack"], "");
    assert_eq!(code, Some(0), "{err}");
    let mut all: Vec<&str> = first.lines().chain(rest.lines()).collect();
    assert_eq!(first.lines().count(), 12);
    all.sort_unstable();
    let mut expected: Vec<String> = (0..20).map(|i| format!("line{i}")).collect();
    expected.sort_unstable();
    assert_eq!(all, expected);
    // A consumer on the wrong topic is told so.
    let (code, _, err) = cli(&address, &["consume", "other", "--queue", "q"], "");
    assert_ne!(code, Some(0));
    assert!(err.contains("consumes"), "{err}");
    let (code, out, err) = cli(
        &address,
        &["queue", "describe", "q", "--format", "json"],
        "",
    );
    assert_eq!(code, Some(0), "{err}");
    let described: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(described["acked"], 20);
    assert_eq!(described["ack_wait_ms"], 60000);
    let done: u64 = described["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| p["done_below"].as_u64().expect("done"))
        .sum();
    assert_eq!(done, 20);
    let (code, out, err) = cli(&address, &["queue", "list"], "");
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("jobs.dlq"), "{out}");

    // A queue with one delivery and a short lease: three records printed but never acked go
    // to the dead-letter topic, and `queue replay` sends them back to the topic once.
    let (code, _, err) = cli(
        &address,
        &[
            "queue",
            "create",
            "r",
            "--topic",
            TOPIC,
            "--ack-wait-ms",
            "300",
            "--max-deliveries",
            "1",
        ],
        "",
    );
    assert_eq!(code, Some(0), "{err}");
    let (code, dropped, err) = cli(
        &address,
        &["consume", TOPIC, "--queue", "r", "--count", "3"],
        "",
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(dropped.lines().count(), 3);
    let mut dead = String::new();
    for _ in 0..ROUNDS_MAX {
        let (code, out, err) = cli(&address, &["consume", "jobs.dlq"], "");
        assert_eq!(code, Some(0), "{err}");
        dead = out;
        if dead.lines().count() >= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sorted_lines(&dead), sorted_lines(&dropped));
    let (code, out, err) = cli(&address, &["queue", "replay", "r"], "");
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("replayed 3 records from jobs.dlq to jobs"),
        "{out}"
    );
    let (code, out, err) = cli(&address, &["queue", "replay", "r"], "");
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("replayed 0 records"),
        "a second replay sends nothing: {out}"
    );
    // The queue delivers the 17 never taken and the 3 replayed (as new records).
    let (code, out, err) = cli(&address, &["consume", TOPIC, "--queue", "r", "--ack"], "");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().count(), 20, "{out}");
    // The 17 never taken and copies of the 3 dead-lettered: every line once.
    assert_eq!(sorted_lines(&out), sorted_lines(&lines));
}

fn sorted_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.sort_unstable();
    lines
}

#[test]
fn hostile_queue_requests_get_clear_errors_and_per_key_ordering_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), 2, CONFIG);
    let address = broker.bootstrap();
    run(async move {
        let client = connect(&address).await;
        client
            .create_topic(TOPIC, PARTITIONS, 1, Vec::new())
            .await
            .expect("create topic");
        let ordered = QueueSettings {
            per_key_ordering: true,
            ..settings(60_000, 3)
        };
        client
            .create_queue("keys", TOPIC, ordered)
            .await
            .expect("create queue");
        produce(&client, 70).await;
        let invalid = |r: &Result<Vec<QueueDelivery>, ClientError>| {
            matches!(
                r,
                Err(ClientError::Server {
                    code: ErrorCode::InvalidRequest,
                    ..
                })
            )
        };
        let long_member = "m".repeat(300);
        let r = QueueMember::new(Rc::clone(&client), "keys", &long_member)
            .acquire(1, 0)
            .await;
        assert!(invalid(&r), "{r:?}");
        let member = QueueMember::new(Rc::clone(&client), "keys", "m");
        let r = member.acquire(0, 0).await;
        assert!(invalid(&r), "{r:?}");
        let r = member.acquire(1_000_000, 0).await;
        assert!(invalid(&r), "{r:?}");
        let too_many: Vec<QueueSettlement> = (0..2_000)
            .map(|i| QueueSettlement {
                partition: 0,
                offset: i,
                delivery_attempt: 1,
                action: SettleAction::Ack,
            })
            .collect();
        let r = member.settle(too_many).await;
        assert_refused(&r, ErrorCode::InvalidRequest);
        // A settlement for a record never delivered and one for a partition that does not
        // exist: each refused on its own, nothing changes.
        let results = member
            .settle(vec![
                QueueSettlement {
                    partition: 0,
                    offset: 5,
                    delivery_attempt: 1,
                    action: SettleAction::Ack,
                },
                QueueSettlement {
                    partition: 99,
                    offset: 0,
                    delivery_attempt: 1,
                    action: SettleAction::Nack { delay_ms: None },
                },
            ])
            .await
            .expect("settle");
        assert_eq!(results[0].error, ErrorCode::StaleDelivery as u16);
        assert_eq!(results[1].error, ErrorCode::UnknownPartition as u16);
        // Per-key ordering: 70 records over 7 keys; acquiring everything at once gives at
        // most one record per (partition, key) in flight.
        let got = member.acquire(1_000, 200).await.expect("acquire");
        assert!(!got.is_empty());
        let mut keys = BTreeSet::new();
        for d in &got {
            assert!(
                keys.insert((d.partition, d.key.clone())),
                "two records of one key in flight: {d:?}"
            );
        }
        // An over-long reject reason is refused, the lease stays.
        let r = member.reject(&got[0], &"x".repeat(5_000)).await;
        assert_refused(&r, ErrorCode::InvalidRequest);
        // Acking them releases the next record of each key.
        for d in &got {
            member.ack(d).await.expect("ack");
        }
        let next = member.acquire(1_000, 200).await.expect("acquire");
        assert!(!next.is_empty());
        for d in &next {
            assert!(got
                .iter()
                .all(|g| g.offset != d.offset || g.partition != d.partition));
        }
    });
}
