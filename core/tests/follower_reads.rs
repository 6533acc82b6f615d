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

use common::{cli, metric, run, wait_for_partition, wire, Cluster, STATE_POLLS_MAX};
use wharf::client::consumer::{Consumer, ConsumerConfig, SeekTo};
use wharf::client::producer::{Partitioner, Producer, ProducerConfig};
use wharf::client::{Client, ClientConfig};
use wharf::protocol::{
    Acks, ApiKey, ConfigEntry, ErrorCode, FetchPartition, FetchRequest, FetchResponse,
};

const TOPIC: &str = "reads";
const PINNED: &str = "pinned";
const REPLICA_LAG_MAX_MS: u64 = 3_000;
const CONSUMERS: usize = 3;
/// Records produced per round (acks=all) before every consumer polls once.
const RECORDS_PER_ROUND: usize = 20;
/// Rounds each phase may take before the test fails naming it.
const ROUNDS_MAX: usize = 150;
/// Any load moves tailing readers (busy share ≥ 0.1%), and only a dead or lagging follower
/// brings them back (`return_permille = 0`): the moves this test checks are the selector's,
/// not the machine's.
const SELECTION: &str = "[replica_selection]\nlease_ms = 2000\nbusy_high_permille = 1\nreturn_permille = 0\nfollower_lag_ms_max = 3000\n";

fn client_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new(bootstrap);
    config.request_timeout_ms = 5_000;
    config
}

fn start() -> Cluster {
    let cluster = Cluster::start_controlled_with(REPLICA_LAG_MAX_MS, SELECTION);
    let bootstrap = cluster.bootstraps();
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        for (topic, selector) in [(TOPIC, "load"), (PINNED, "leader")] {
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
    for topic in [TOPIC, PINNED] {
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
        for i in 0..200 {
            let delivery = producer
                .send(PINNED, None, format!("p-{i}").as_bytes())
                .await
                .expect("queued");
            drop(delivery);
        }
        producer.flush().await;
        producer.close().await;
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
    let fetch = |offset: u64, leader_epoch: Option<u32>, reader_id: &str| FetchRequest {
        max_wait_ms: 200,
        min_bytes: 1,
        max_bytes: 1 << 20,
        partitions: vec![FetchPartition {
            topic: PINNED.to_string(),
            partition: 0,
            fetch_offset: offset,
            max_bytes: 1 << 20,
            leader_epoch,
            read_replica: Some(follower),
            avoid_replica: None,
        }],
        reader_id: reader_id.to_string(),
        rack: String::new(),
    };
    let mut stream = wire::connect_to(&address);
    let ask = |stream: &mut std::net::TcpStream, request: &FetchRequest| {
        use std::io::Write;
        stream
            .write_all(&wire::request(ApiKey::Fetch, 7, request, &[]))
            .expect("send");
        wire::read_response(stream).expect("answer")
    };
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
