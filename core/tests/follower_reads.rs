//! Follower reads (KIP-392) end to end on the 3-broker controller cluster: tailing consumers
//! move to in-sync followers when the leader is loaded, go back at once when their follower
//! dies, and across every move no record is skipped or read twice. A `leader` topic is never
//! redirected; a read under another epoch's lease is refused; a consumer ahead of a follower
//! waits instead of failing. The leader counts as loaded here because the test sets its
//! thresholds to the floor (`[replica_selection]`), not because of timing.

mod common;

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use common::{
    cli, client_config, metric, produce_to, run, wait_for_partition, wire, Cluster, STATE_POLLS_MAX,
};
use wharf::client::consumer::{Consumer, ConsumerConfig, SeekTo};
use wharf::client::producer::{Partitioner, Producer, ProducerConfig};
use wharf::client::Client;
use wharf::protocol::{
    Acks, ApiKey, ConfigEntry, ErrorCode, FetchPartition, FetchPartitionResponse, FetchRequest,
    FetchResponse, AVOID_REPLICAS_MAX,
};

const TOPIC: &str = "reads";
const PINNED: &str = "pinned";
const RACKED: &str = "racked";
const REPLICA_LAG_MAX_MS: u64 = 3_000;
const CONSUMERS: usize = 3;
/// Records produced per round (acks=all) before every consumer polls once.
const RECORDS_PER_ROUND: usize = 20;
/// Rounds each phase may take before the test fails naming it.
const ROUNDS_MAX: usize = 150;
/// Any load moves tailing readers (busy share ≥ 0.1%, or one request in progress: the fetch
/// being served is one), and only a dead or lagging follower brings them back
/// (`return_permille = 0`): the moves this test checks are the selector's, not the machine's.
const SELECTION: &str = "[replica_selection]\nlease_ms = 2000\nbusy_high_permille = 1\nqueue_depth_high = 1\nreturn_permille = 0\nfollower_lag_ms_max = 3000\n";

/// Broker `i + 1` is in rack `RACKS[i]`.
const RACKS: [&str; 3] = ["rack-1", "rack-2", "rack-3"];

fn start() -> Cluster {
    start_with(REPLICA_LAG_MAX_MS, "")
}

/// The 3-broker controller cluster (racks `RACKS`, `cluster_config` in its `[cluster]`
/// section) with the topics `reads` (`load`), `pinned` (`leader`) and `racked` (`rack`).
fn start_with(replica_lag_max_ms: u64, cluster_config: &str) -> Cluster {
    let cluster =
        Cluster::start_controlled_racks(replica_lag_max_ms, SELECTION, cluster_config, &RACKS);
    let bootstrap = cluster.bootstraps();
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        for (topic, selector) in [(TOPIC, "load"), (PINNED, "leader"), (RACKED, "rack")] {
            let configs = vec![
                ConfigEntry {
                    key: "min_insync_replicas".to_string(),
                    value: "2".to_string(),
                },
                ConfigEntry {
                    key: "replica_selector".to_string(),
                    value: selector.to_string(),
                },
            ];
            client
                .create_topic(topic, 1, 3, configs)
                .await
                .expect("create topic");
        }
    });
    for topic in [TOPIC, PINNED, RACKED] {
        for id in 1..=3 {
            wait_for_partition(&cluster.bootstrap(id), topic, "full ISR everywhere", |d| {
                d.replicas.len() == 3 && d.isr.len() == 3
            });
        }
    }
    cluster
}

/// One consumer's view: every record it returned, in order.
struct Reader {
    consumer: Consumer,
    seen: Vec<(u64, String)>,
}

impl Reader {
    async fn poll(&mut self) {
        let records = self.consumer.poll().await.expect("poll");
        records
            .for_each(|r| {
                self.seen
                    .push((r.offset, String::from_utf8_lossy(r.value).to_string()));
            })
            .expect("records");
    }

    fn position(&self) -> u64 {
        self.consumer.position(0).expect("assigned")
    }
}

/// Produces `RECORDS_PER_ROUND` records (acks=all, offsets booked in `acked`), then every
/// reader polls once.
async fn round(
    producer: &Producer,
    sent: &mut usize,
    readers: &mut [Reader],
    acked: &mut BTreeMap<u64, String>,
) {
    let mut deliveries = Vec::new();
    for _ in 0..RECORDS_PER_ROUND {
        let value = format!("r-{sent}");
        *sent += 1;
        let delivery = producer
            .send(TOPIC, None, value.as_bytes())
            .await
            .expect("queued");
        deliveries.push((value, delivery));
    }
    producer.flush().await;
    for (value, delivery) in deliveries {
        let metadata = delivery
            .await
            .unwrap_or_else(|e| panic!("{value} was not acknowledged: {e}"));
        acked.insert(metadata.offset.expect("acks=all"), value);
    }
    for reader in readers.iter_mut() {
        reader.poll().await;
    }
}

/// Each reader returned offsets 0, 1, 2, ... with the acknowledged values: nothing skipped,
/// nothing twice, across every move between replicas.
fn assert_exact(readers: &[Reader], acked: &BTreeMap<u64, String>) {
    for (i, reader) in readers.iter().enumerate() {
        let offsets: Vec<u64> = reader.seen.iter().map(|(o, _)| *o).collect();
        let expected: Vec<u64> = (0..acked.len() as u64).collect();
        assert_eq!(
            offsets, expected,
            "reader {i} skipped or repeated records across replica moves"
        );
        for (offset, value) in &reader.seen {
            assert_eq!(
                acked.get(offset),
                Some(value),
                "reader {i} read another value at {offset}"
            );
        }
    }
}

/// One partition-0 fetch at the wire level (the fields the tests vary).
#[derive(Default)]
struct FetchAsk<'a> {
    topic: &'a str,
    offset: u64,
    leader_epoch: Option<u32>,
    read_replica: Option<u32>,
    avoid_replicas: Vec<u32>,
    reader_id: &'a str,
    rack: &'a str,
    max_wait_ms: u32,
}

impl FetchAsk<'_> {
    fn request(&self) -> FetchRequest {
        FetchRequest {
            max_wait_ms: if self.max_wait_ms == 0 {
                200
            } else {
                self.max_wait_ms
            },
            min_bytes: 1,
            max_bytes: 1 << 20,
            partitions: vec![FetchPartition {
                topic: self.topic.to_string(),
                partition: 0,
                fetch_offset: self.offset,
                max_bytes: 1 << 20,
                leader_epoch: self.leader_epoch,
                read_replica: self.read_replica,
                avoid_replicas: self.avoid_replicas.clone(),
            }],
            reader_id: self.reader_id.to_string(),
            rack: self.rack.to_string(),
        }
    }
}

fn ask(stream: &mut std::net::TcpStream, request: &FetchRequest) -> wharf::protocol::Frame {
    use std::io::Write;
    stream
        .write_all(&wire::request(ApiKey::Fetch, 7, request, &[]))
        .expect("send");
    wire::read_response(stream).expect("answer")
}

/// The answer for partition 0 of a fetch that was not refused as a whole.
fn ask_partition(
    stream: &mut std::net::TcpStream,
    request: &FetchRequest,
) -> FetchPartitionResponse {
    let frame = ask(stream, request);
    assert_eq!(frame.header.error(), ErrorCode::None, "fetch refused");
    let response: FetchResponse = frame.decode_body().expect("fetch response");
    response.partitions.into_iter().next().expect("partition 0")
}

#[test]
fn tailing_consumers_move_to_followers_under_load_and_back_when_their_follower_dies() {
    let mut cluster = start();
    let bootstrap = cluster.bootstraps();
    let leader = common::describe_partition(&bootstrap, TOPIC)
        .expect("described")
        .leader;
    let (acked, moved_to, dead) = run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        let producer = Producer::new(
            Rc::clone(&client),
            ProducerConfig {
                acks: Acks::All,
                linger_ms: 1,
                partitioner: Partitioner::RoundRobin,
                delivery_timeout_ms: 30_000,
                request_timeout_ms: 5_000,
                ..ProducerConfig::default()
            },
        );
        let mut readers = Vec::new();
        for i in 0..CONSUMERS {
            let mut consumer = Consumer::new(
                Rc::clone(&client),
                TOPIC,
                ConsumerConfig {
                    max_wait_ms: 100,
                    reader_id: Some(format!("tail-{i}")),
                    ..ConsumerConfig::default()
                },
            );
            consumer
                .assign(Some(vec![0]), SeekTo::Earliest)
                .await
                .expect("assign");
            readers.push(Reader {
                consumer,
                seen: Vec::new(),
            });
        }
        let mut acked = BTreeMap::new();
        let mut sent = 0usize;
        // Phase 1: every tailing reader is sent to a follower.
        let mut moved = false;
        for _ in 0..ROUNDS_MAX {
            round(&producer, &mut sent, &mut readers, &mut acked).await;
            if readers.iter().all(|r| {
                r.consumer
                    .read_replica(0)
                    .is_some_and(|broker| broker != leader)
            }) {
                moved = true;
                break;
            }
        }
        assert!(
            moved,
            "the readers never moved to followers: {:?}",
            readers
                .iter()
                .map(|r| r.consumer.read_replica(0))
                .collect::<Vec<_>>()
        );
        let moved_to: Vec<u32> = readers
            .iter()
            .map(|r| r.consumer.read_replica(0).expect("moved"))
            .collect();
        // Phase 2: the follower of reader 0 dies; its readers leave it at once and go on.
        let dead = moved_to[0];
        cluster.broker(dead).kill9();
        let positions: Vec<u64> = readers.iter().map(Reader::position).collect();
        let mut recovered = false;
        for _ in 0..ROUNDS_MAX {
            round(&producer, &mut sent, &mut readers, &mut acked).await;
            if readers.iter().zip(&positions).all(|(r, before)| {
                r.consumer.read_replica(0) != Some(dead) && r.position() > *before
            }) {
                recovered = true;
                break;
            }
        }
        assert!(
            recovered,
            "readers stayed on dead follower {dead} or stopped reading: {:?}",
            readers
                .iter()
                .map(|r| (r.consumer.read_replica(0), r.position()))
                .collect::<Vec<_>>()
        );
        // Phase 3: no more records; every reader reaches the end.
        let end = acked.len() as u64;
        for _ in 0..ROUNDS_MAX {
            if readers.iter().all(|r| r.position() >= end) {
                break;
            }
            for reader in readers.iter_mut() {
                reader.poll().await;
            }
        }
        producer.close().await;
        assert_exact(&readers, &acked);
        (acked, moved_to, dead)
    });
    assert!(acked.len() > RECORDS_PER_ROUND);
    // The leader counted its redirects; a live follower served reads.
    let leader_broker = cluster.broker(leader);
    assert!(
        metric(leader_broker, "wharf_fetch_redirects_total").unwrap_or(0) >= CONSUMERS as u64,
        "the leader did not count its redirects"
    );
    let live_follower = moved_to
        .iter()
        .copied()
        .find(|b| *b != dead)
        .or_else(|| (1..=3).find(|b| *b != leader && *b != dead))
        .expect("a live follower");
    assert!(
        metric(
            cluster.broker(live_follower),
            "wharf_fetches_served_total{shard=\"0\",role=\"follower\"}"
        )
        .is_some(),
        "the follower metric is missing"
    );
    // `wharf topic describe --readers` names each reader and where it was sent.
    let (code, stdout, stderr) = cli(
        &cluster.bootstrap(leader),
        &["topic", "describe", TOPIC, "--readers"],
        "",
    );
    assert_eq!(code, Some(0), "describe --readers failed: {stderr}");
    for i in 0..CONSUMERS {
        assert!(
            stdout.contains(&format!("tail-{i}")),
            "reader tail-{i} missing from:\n{stdout}"
        );
    }
    assert!(stdout.contains("READS_FROM"), "no header in:\n{stdout}");
}

#[test]
fn a_leader_topic_is_never_redirected_and_followers_refuse_stale_leases() {
    let cluster = start();
    let bootstrap = cluster.bootstraps();
    let described = common::describe_partition(&bootstrap, PINNED).expect("described");
    let leader = described.leader;
    let follower = (1..=3).find(|b| *b != leader).expect("a follower");
    produce_to(&bootstrap, PINNED, "p", 200);
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        let mut consumer = Consumer::new(
            Rc::clone(&client),
            PINNED,
            ConsumerConfig {
                max_wait_ms: 100,
                reader_id: Some("pinned-reader".to_string()),
                ..ConsumerConfig::default()
            },
        );
        consumer
            .assign(Some(vec![0]), SeekTo::Earliest)
            .await
            .expect("assign");
        let mut read = 0;
        for _ in 0..STATE_POLLS_MAX {
            let records = consumer.poll().await.expect("poll");
            read += records.for_each(|_| {}).expect("records");
            assert_eq!(
                consumer.read_replica(0),
                None,
                "replica_selector = leader redirected a reader"
            );
            if read >= 200 {
                break;
            }
        }
        assert_eq!(read, 200, "the pinned topic was not read whole");
    });
    // Wire level, at the follower: a lease of another epoch is refused (the consumer goes back
    // to the leader); a consumer ahead of the follower's log waits and gets nothing, no error;
    // over-long names are refused before any read.
    let epoch = described.leader_epoch;
    let address = cluster.bootstrap(follower);
    let fetch = |offset: u64, leader_epoch: Option<u32>, reader_id: &str| {
        FetchAsk {
            topic: PINNED,
            offset,
            leader_epoch,
            read_replica: Some(follower),
            reader_id,
            ..FetchAsk::default()
        }
        .request()
    };
    let mut stream = wire::connect_to(&address);
    let frame = ask(&mut stream, &fetch(0, Some(epoch + 1), "wire"));
    let response: FetchResponse = frame.decode_body().expect("fetch response");
    assert_eq!(
        ErrorCode::from_u16(response.partitions[0].error),
        ErrorCode::FencedLeaderEpoch,
        "a follower served a lease of another epoch: {response:?}"
    );
    let frame = ask(&mut stream, &fetch(10_000, Some(epoch), "wire"));
    let response: FetchResponse = frame.decode_body().expect("fetch response");
    assert_eq!(
        ErrorCode::from_u16(response.partitions[0].error),
        ErrorCode::None,
        "a consumer ahead of the follower got an error: {response:?}"
    );
    assert_eq!(response.partitions[0].batch_bytes, 0);
    let frame = ask(&mut stream, &fetch(0, Some(epoch), "wire"));
    let response: FetchResponse = frame.decode_body().expect("fetch response");
    assert_eq!(
        ErrorCode::from_u16(response.partitions[0].error),
        ErrorCode::None
    );
    assert!(
        response.partitions[0].batch_bytes > 0,
        "the follower served no committed data under a valid lease"
    );
    let frame = ask(&mut stream, &fetch(0, None, &"x".repeat(300)));
    assert_eq!(
        frame.header.error(),
        ErrorCode::InvalidRequest,
        "an over-long reader id was accepted"
    );
    // The follower still serves after the refusals (nothing crashed or stalled).
    std::thread::sleep(Duration::from_millis(10));
    let frame = ask(&mut stream, &fetch(0, Some(epoch), "wire"));
    let response: FetchResponse = frame.decode_body().expect("fetch response");
    assert_eq!(
        ErrorCode::from_u16(response.partitions[0].error),
        ErrorCode::None
    );
}

#[test]
fn the_leader_checks_range_avoided_followers_and_racks_before_redirecting() {
    let mut cluster = start();
    let bootstrap = cluster.bootstraps();
    // At the leader of `reads` (loaded here: the fetch being served is a request in progress
    // and `queue_depth_high = 1`), a named reader is sent to a follower.
    let lead = common::describe_partition(&bootstrap, TOPIC)
        .expect("described")
        .leader;
    let followers: Vec<u32> = (1..=3).filter(|b| *b != lead).collect();
    let mut stream = wire::connect_to(&cluster.bootstrap(lead));
    let at_leader = |offset: u64, avoid_replicas: Vec<u32>| {
        FetchAsk {
            topic: TOPIC,
            offset,
            avoid_replicas,
            reader_id: "wire-load",
            ..FetchAsk::default()
        }
        .request()
    };
    let answer = ask_partition(&mut stream, &at_leader(0, Vec::new()));
    assert!(
        answer
            .preferred_read_replica
            .is_some_and(|b| followers.contains(&b)),
        "a loaded leader kept a named reader: {answer:?}"
    );
    // Every follower the reader avoids is passed over; avoiding all, the leader serves it.
    let answer = ask_partition(&mut stream, &at_leader(0, vec![followers[0]]));
    assert_eq!(
        answer.preferred_read_replica,
        Some(followers[1]),
        "the leader sent the reader to a follower it avoids: {answer:?}"
    );
    let answer = ask_partition(&mut stream, &at_leader(0, followers.clone()));
    assert_eq!(
        (
            ErrorCode::from_u16(answer.error),
            answer.preferred_read_replica
        ),
        (ErrorCode::None, None),
        "the leader sent the reader to a follower it avoids: {answer:?}"
    );
    // An offset outside the leader's log is answered there (the consumer resets), not sent
    // to a follower that would answer empty.
    let answer = ask_partition(&mut stream, &at_leader(1_000_000, Vec::new()));
    assert_eq!(
        (
            ErrorCode::from_u16(answer.error),
            answer.preferred_read_replica
        ),
        (ErrorCode::OffsetOutOfRange, None),
        "an out-of-range reader was redirected: {answer:?}"
    );
    let frame = ask(&mut stream, &at_leader(0, vec![1; AVOID_REPLICAS_MAX + 1]));
    assert_eq!(
        frame.header.error(),
        ErrorCode::InvalidRequest,
        "an over-long avoid list was accepted"
    );
    let answer = ask_partition(&mut stream, &at_leader(0, Vec::new()));
    assert!(answer.preferred_read_replica.is_some(), "{answer:?}");

    // `racked` (`replica_selector = rack`): a consumer in a follower's rack reads there, every
    // record once; one in the leader's rack stays on the leader.
    let racked = common::describe_partition(&bootstrap, RACKED).expect("described");
    let rack_follower = (1..=3).find(|b| *b != racked.leader).expect("a follower");
    const RACK_RECORDS: u64 = 100;
    produce_to(&bootstrap, RACKED, "k", RACK_RECORDS as usize);
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        for (broker, expected) in [(rack_follower, Some(rack_follower)), (racked.leader, None)] {
            let rack = RACKS[(broker - 1) as usize];
            let mut consumer = Consumer::new(
                Rc::clone(&client),
                RACKED,
                ConsumerConfig {
                    max_wait_ms: 100,
                    reader_id: Some(format!("in-{rack}")),
                    rack: Some(rack.to_string()),
                    ..ConsumerConfig::default()
                },
            );
            consumer
                .assign(Some(vec![0]), SeekTo::Earliest)
                .await
                .expect("assign");
            let mut offsets = Vec::new();
            let mut replicas = Vec::new();
            for _ in 0..STATE_POLLS_MAX {
                let records = consumer.poll().await.expect("poll");
                records
                    .for_each(|r| offsets.push(r.offset))
                    .expect("records");
                replicas.push(consumer.read_replica(0));
                if offsets.len() as u64 >= RACK_RECORDS {
                    break;
                }
            }
            assert_eq!(
                offsets,
                (0..RACK_RECORDS).collect::<Vec<_>>(),
                "the reader in {rack} skipped or repeated records"
            );
            match expected {
                Some(follower) => assert!(
                    replicas.contains(&Some(follower)),
                    "the reader in {rack} never read from broker {follower} of its rack: \
                     {replicas:?}"
                ),
                None => assert!(
                    replicas.iter().all(Option::is_none),
                    "the reader in the leader's rack {rack} was redirected: {replicas:?}"
                ),
            }
        }
    });

    // Queue depth counts work, not waits: parked replica fetches of many idle partitions do
    // not make a leader look loaded.
    const IDLE_PARTITIONS: u32 = 24;
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        client
            .create_topic("idle", IDLE_PARTITIONS, 3, Vec::new())
            .await
            .expect("create topic");
    });
    wait_for_partition(&bootstrap, "idle", "full ISR", |d| d.isr.len() == 3);
    let depths: Vec<u32> = run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        let mut depths = Vec::new();
        for _ in 0..5 {
            let readers = client.describe_readers(TOPIC).await.expect("readers");
            depths.extend(readers.iter().map(|p| p.queue_depth));
        }
        depths
    });
    assert!(
        depths.iter().min().is_some_and(|d| *d <= 3),
        "an idle leader of {IDLE_PARTITIONS} replicated partitions reports queue depths \
         {depths:?}: parked long polls count as load"
    );

    // Leadership moves away (the leader stops until the controller fences it and elects
    // another): back as a follower, the old leader forgets its readers and their series.
    let series = format!("wharf_reader_replica{{topic=\"{TOPIC}\"");
    let reader_series = |cluster: &mut Cluster| {
        cluster
            .broker(lead)
            .http_get("/metrics")
            .map(|(_, text)| text.contains(&series))
    };
    assert_eq!(
        reader_series(&mut cluster),
        Some(true),
        "no {series} series"
    );
    cluster.broker(lead).signal(libc::SIGSTOP);
    wait_for_partition(
        &cluster.bootstrap(followers[0]),
        TOPIC,
        "a new leader",
        |d| d.leader != lead,
    );
    cluster.broker(lead).signal(libc::SIGCONT);
    let mut forgotten = false;
    for _ in 0..STATE_POLLS_MAX {
        if reader_series(&mut cluster) == Some(false) {
            forgotten = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        forgotten,
        "broker {lead} kept its readers' series after it stopped leading {TOPIC}"
    );
}

#[test]
fn followers_hear_the_high_watermark_at_once_and_stop_serving_when_cut_off() {
    // Replica fetches park at the leader for 10 s, and a broker is fenced only after 30 s:
    // a follower learns a new high watermark at once only because the leader answers its
    // parked fetch with it, and a follower whose leader stopped refuses reads before any
    // failover would fence it.
    let mut cluster = start_with(
        30_000,
        "replica_fetch_wait_ms = 10000\nbroker_session_timeout_ms = 30000\n",
    );
    let bootstrap = cluster.bootstraps();
    let described = common::describe_partition(&bootstrap, TOPIC).expect("described");
    let (leader, epoch) = (described.leader, described.leader_epoch);
    let follower = (1..=3).find(|b| *b != leader).expect("a follower");
    const RECORDS: u64 = 20;
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        let producer = Producer::new(
            Rc::clone(&client),
            ProducerConfig {
                acks: Acks::All,
                ..ProducerConfig::default()
            },
        );
        for i in 0..RECORDS {
            // One at a time: each record is its own batch, acknowledged before the next.
            let delivery = producer
                .send(TOPIC, None, format!("h-{i}").as_bytes())
                .await
                .expect("queued");
            producer.flush().await;
            delivery.await.expect("acknowledged");
        }
        producer.close().await;
    });
    let mut stream = wire::connect_to(&cluster.bootstrap(follower));
    let at_follower = |offset: u64, max_wait_ms: u32| {
        FetchAsk {
            topic: TOPIC,
            offset,
            leader_epoch: Some(epoch),
            read_replica: Some(follower),
            reader_id: "wire-follower",
            max_wait_ms,
            ..FetchAsk::default()
        }
        .request()
    };
    // The last acknowledged record is readable at the follower within a 3 s long poll
    // (it would take the 10 s replica-fetch wait otherwise).
    let answer = ask_partition(&mut stream, &at_follower(RECORDS - 1, 3_000));
    assert_eq!(
        ErrorCode::from_u16(answer.error),
        ErrorCode::None,
        "{answer:?}"
    );
    assert!(
        answer.batch_bytes > 0 && answer.high_watermark == RECORDS,
        "the follower had not heard the high watermark of acknowledged records: {answer:?}"
    );

    // The leader stops (SIGSTOP: no failover for 30 s). The follower serves its committed
    // data until it has not heard from the leader for follower_lag_ms_max + the fetch wait,
    // then refuses, naming why.
    cluster.broker(leader).signal(libc::SIGSTOP);
    let mut refused = None;
    for _ in 0..STATE_POLLS_MAX {
        let answer = ask_partition(&mut stream, &at_follower(0, 100));
        match ErrorCode::from_u16(answer.error) {
            ErrorCode::None => assert!(answer.batch_bytes > 0, "{answer:?}"),
            _ => {
                refused = Some(answer);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.broker(leader).signal(libc::SIGCONT);
    let refused = refused.expect("a follower cut off from its leader kept serving reads");
    assert_eq!(
        ErrorCode::from_u16(refused.error),
        ErrorCode::PartitionUnavailable,
        "{refused:?}"
    );
    assert!(
        refused.message.contains("has not heard from its leader"),
        "{refused:?}"
    );
    // The leader is back: the follower serves again (its next replica fetch is answered).
    let mut served = false;
    for _ in 0..STATE_POLLS_MAX {
        let answer = ask_partition(&mut stream, &at_follower(0, 100));
        if ErrorCode::from_u16(answer.error) == ErrorCode::None && answer.batch_bytes > 0 {
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        served,
        "the follower did not serve again once its leader was back"
    );
}
