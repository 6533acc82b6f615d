//! End-to-end replication: three real `wharf serve` processes on 127.0.0.1 (a static cluster),
//! RF=3, min_insync_replicas=2, acks=all. Followers are killed with SIGKILL, restarted, and one
//! restarts with a damaged log; every acknowledged record must end up exactly once on every
//! replica, and the three logs must be identical (read back from disk after a clean stop).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::{run, Broker, Cluster};
use wharf::client::producer::{Partitioner, Producer, ProducerConfig};
use wharf::client::{Client, ClientConfig, ClientError};
use wharf::dma_disk::DmaDisk;
use wharf::protocol::{Acks, ConfigEntry, ErrorCode, PartitionDescription};
use wharf_storage::log::PartitionLog;

const TOPIC: &str = "replicated";
/// The ISR lag limit of the test cluster: short, so a dead follower leaves the ISR quickly.
const REPLICA_LAG_MAX_MS: u64 = 1_500;

fn client_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new(bootstrap);
    config.request_timeout_ms = 10_000;
    config
}

/// Produces `values` with `acks`; returns each record's outcome.
async fn produce(
    bootstrap: &str,
    values: &[String],
    acks: Acks,
    delivery_timeout_ms: u64,
) -> Vec<Result<u64, ClientError>> {
    let client = Client::connect(client_config(bootstrap))
        .await
        .expect("connect");
    let producer = Producer::new(
        Rc::clone(&client),
        ProducerConfig {
            acks,
            linger_ms: 2,
            batch_bytes: 8 * 1024,
            partitioner: Partitioner::RoundRobin,
            delivery_timeout_ms,
            request_timeout_ms: delivery_timeout_ms.min(10_000),
            ..ProducerConfig::default()
        },
    );
    let mut deliveries = Vec::new();
    for value in values {
        deliveries.push(
            producer
                .send(TOPIC, None, value.as_bytes())
                .await
                .expect("queued"),
        );
    }
    producer.flush().await;
    let mut results = Vec::new();
    for delivery in deliveries {
        results.push(
            delivery
                .await
                .map(|metadata| metadata.offset.unwrap_or(u64::MAX)),
        );
    }
    producer.close().await;
    results
}

fn values(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i}")).collect()
}

fn describe(bootstrap: &str) -> Option<PartitionDescription> {
    common::describe_partition(bootstrap, TOPIC)
}

fn wait_for(
    bootstrap: &str,
    what: &str,
    done: impl Fn(&PartitionDescription) -> bool,
) -> PartitionDescription {
    common::wait_for_partition(bootstrap, TOPIC, what, done)
}

/// The partition directory of the topic's partition 0 under `broker`'s data directory.
fn partition_dir(broker: &Broker) -> PathBuf {
    let topics = broker.dir.join("data").join("topics");
    let entry = std::fs::read_dir(&topics)
        .expect("topics dir")
        .filter_map(Result::ok)
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{TOPIC}-"))
        })
        .expect("topic dir");
    entry.path().join("0")
}

/// Every batch of a stopped broker's log, read back through the storage engine.
fn read_log(dir: &Path) -> Vec<(u64, Vec<u8>)> {
    let dir = dir.to_path_buf();
    run(async move {
        let disk = DmaDisk::open(&dir).await.expect("open partition dir");
        let (log, report) =
            PartitionLog::open(Rc::new(disk), wharf_storage::log::LogConfig::default(), 0)
                .await
                .expect("recover");
        assert!(report.corrupt.is_empty(), "{}: {report:?}", dir.display());
        wharf_storage::conformance::read_all(&log)
            .await
            .into_iter()
            .map(|(offset, bytes)| (offset.0, bytes))
            .collect()
    })
}

/// Record values of a log, in order.
fn record_values(log: &[(u64, Vec<u8>)]) -> Vec<String> {
    let mut out = Vec::new();
    for (_, bytes) in log {
        let checked = wharf_storage::batch::check_batch(bytes).expect("valid batch");
        for record in checked.records().expect("records").iter() {
            out.push(String::from_utf8_lossy(record.value.as_slice()).into_owned());
        }
    }
    out
}

/// Stops every broker cleanly, then checks that the three logs are identical and hold every
/// acknowledged value exactly once.
fn stop_and_compare(cluster: &mut Cluster, acknowledged: &[String]) {
    for broker in &mut cluster.brokers {
        assert_eq!(broker.stop(), 0, "clean stop:\n{}", broker.log());
    }
    let logs: Vec<Vec<(u64, Vec<u8>)>> = cluster
        .brokers
        .iter()
        .map(|b| read_log(&partition_dir(b)))
        .collect();
    for (i, log) in logs.iter().enumerate().skip(1) {
        assert_eq!(
            log.len(),
            logs[0].len(),
            "broker {} holds {} batches, broker 1 holds {}",
            i + 1,
            log.len(),
            logs[0].len()
        );
        assert!(
            log == &logs[0],
            "broker {} holds another log than broker 1",
            i + 1
        );
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let values = record_values(&logs[0]);
    for value in &values {
        *counts.entry(value.as_str()).or_default() += 1;
    }
    for value in acknowledged {
        assert_eq!(
            counts.get(value.as_str()).copied().unwrap_or(0),
            1,
            "acknowledged record {value} must be on every replica exactly once"
        );
    }
}

fn all_acknowledged(results: &[Result<u64, ClientError>], what: &str) {
    for (i, result) in results.iter().enumerate() {
        assert!(
            result.is_ok(),
            "{what}: record {i} not acknowledged: {result:?}"
        );
    }
}

/// The test cluster with `TOPIC` (one partition, RF 3, min_insync_replicas 2) created on
/// broker 1 and all three replicas in sync: the cluster, broker 1's address, the partition.
fn cluster_with_topic() -> (Cluster, String, PartitionDescription) {
    let cluster = Cluster::start(REPLICA_LAG_MAX_MS);
    let first = cluster.bootstrap(1);
    run(async {
        let client = Client::connect(client_config(&first))
            .await
            .expect("connect");
        client
            .create_topic(
                TOPIC,
                1,
                3,
                vec![ConfigEntry {
                    key: "min_insync_replicas".into(),
                    value: "2".into(),
                }],
            )
            .await
            .expect("create topic on every broker");
    });
    let described = wait_for(&first, "all three replicas in sync", |d| d.isr.len() == 3);
    (cluster, first, described)
}

#[test]
fn acks_all_survives_follower_failures_and_replicas_converge() {
    let (mut cluster, _, described) = cluster_with_topic();
    let leader = described.leader;
    assert_eq!(described.replicas.len(), 3);
    let followers: Vec<u32> = described
        .replicas
        .iter()
        .copied()
        .filter(|&r| r != leader)
        .collect();
    let at_leader = cluster.bootstrap(leader);
    let mut acknowledged = Vec::new();

    // All three up.
    let batch = values("healthy", 300);
    all_acknowledged(
        &run(produce(&at_leader, &batch, Acks::All, 20_000)),
        "healthy cluster",
    );
    acknowledged.extend(batch);

    // One follower dies: acks=all keeps succeeding (once it leaves the ISR).
    cluster.broker(followers[0]).kill9();
    let batch = values("one-down", 200);
    all_acknowledged(
        &run(produce(&at_leader, &batch, Acks::All, 20_000)),
        "one follower down",
    );
    acknowledged.extend(batch);
    let described = wait_for(&at_leader, "ISR without the dead follower", |d| {
        !d.isr.contains(&followers[0]) && d.isr.len() == 2
    });
    assert_eq!(described.high_watermark, described.end_offset);

    // A second one dies: acks=all is refused (nothing appended), acks=leader still works.
    cluster.broker(followers[1]).kill9();
    let alone = wait_for(&at_leader, "ISR of the leader alone", |d| {
        d.isr == vec![leader]
    });
    let started = Instant::now();
    let refused = run(produce(&at_leader, &values("refused", 1), Acks::All, 2_000));
    match &refused[0] {
        Err(ClientError::Server { code, .. }) => assert_eq!(*code, ErrorCode::NotEnoughReplicas),
        other => panic!("acks=all with one in-sync replica must be refused: {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refusal is prompt"
    );
    let after = describe(&at_leader).expect("describe");
    assert_eq!(
        after.end_offset, alone.end_offset,
        "a refused write appends nothing"
    );
    let batch = values("leader-only", 50);
    all_acknowledged(
        &run(produce(&at_leader, &batch, Acks::Leader, 20_000)),
        "acks=leader",
    );
    acknowledged.extend(batch);

    // Both come back, catch up and rejoin the ISR.
    cluster.broker(followers[0]).restart_same_ports();
    cluster.broker(followers[1]).restart_same_ports();
    wait_for(&at_leader, "both followers rejoined and caught up", |d| {
        d.isr.len() == 3 && d.high_watermark == d.end_offset
    });
    let batch = values("healed", 100);
    all_acknowledged(
        &run(produce(&at_leader, &batch, Acks::All, 20_000)),
        "healed cluster",
    );
    acknowledged.extend(batch);
    wait_for(&at_leader, "followers caught up", |d| {
        d.high_watermark == d.end_offset && d.isr.len() == 3
    });
    stop_and_compare(&mut cluster, &acknowledged);

    // A follower restarts with a bit flipped in its durable log, another with its segment
    // tail cut off: both repair from the leader.
    let flipped = partition_dir(&cluster.brokers[(followers[0] - 1) as usize]);
    let segment = flipped.join("00000000000000000000.log");
    let mut bytes = std::fs::read(&segment).expect("segment");
    bytes[200] ^= 0x10;
    std::fs::write(&segment, &bytes).expect("flip a bit");
    let cut = partition_dir(&cluster.brokers[(followers[1] - 1) as usize]);
    let segment = cut.join("00000000000000000000.log");
    let length = std::fs::metadata(&segment).expect("segment").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .expect("open");
    file.set_len(length / 2).expect("cut the tail");
    drop(file);
    for broker in &mut cluster.brokers {
        broker.restart_same_ports();
    }
    wait_for(&at_leader, "repaired followers in sync", |d| {
        d.isr.len() == 3 && d.high_watermark == d.end_offset
    });
    let flipped_log = cluster.broker(followers[0]).log();
    assert!(
        flipped_log.contains("truncates its corrupt suffix"),
        "the bit flip was detected and repaired:\n{flipped_log}"
    );

    let batch = values("repaired", 50);
    all_acknowledged(
        &run(produce(&at_leader, &batch, Acks::All, 20_000)),
        "after repair",
    );
    acknowledged.extend(batch);
    wait_for(&at_leader, "followers caught up again", |d| {
        d.high_watermark == d.end_offset && d.isr.len() == 3
    });
    stop_and_compare(&mut cluster, &acknowledged);
}

#[test]
fn topic_creation_needs_enough_brokers_and_reaches_all_of_them() {
    let mut cluster = Cluster::start(REPLICA_LAG_MAX_MS);
    let bootstrap = cluster.bootstrap(2);
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        match client.create_topic("too-wide", 1, 4, Vec::new()).await {
            Err(ClientError::Server { code, .. }) => {
                assert_eq!(code, ErrorCode::InvalidReplicationFactor)
            }
            other => panic!("RF 4 on 3 brokers must be refused: {other:?}"),
        }
        client
            .create_topic(TOPIC, 3, 2, Vec::new())
            .await
            .expect("create");
    });
    // Every broker knows the topic and who leads each partition.
    for id in 1..=3 {
        let bootstrap = cluster.bootstrap(id);
        let topic = run(async {
            let client = Client::connect(client_config(&bootstrap))
                .await
                .expect("connect");
            client.describe_topic(TOPIC).await.expect("describe")
        });
        assert_eq!(topic.partitions.len(), 3);
        for p in &topic.partitions {
            assert_eq!(p.replicas.len(), 2);
            assert_eq!(p.leader, p.replicas[0]);
        }
    }
    // A broker that is down makes creation fail without leaving the topic anywhere.
    cluster.broker(3).kill9();
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        match client.create_topic("partial", 1, 1, Vec::new()).await {
            Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::BrokerUnavailable),
            other => panic!("creation with a broker down must fail: {other:?}"),
        }
        let topics = client.list_topics().await.expect("list");
        assert!(
            topics.iter().all(|t| t.name != "partial"),
            "no partial topic left behind"
        );
    });
}

/// Regression: a restarted leader reported a high watermark of 0 (describe, ListOffsets latest)
/// until its followers fetched again in its new epoch — for ever with them down. It now starts
/// from the high watermark it stored (at its clean stop here), clamped to its durable log.
#[test]
fn a_restarted_leader_reports_its_committed_data_at_once() {
    let (mut cluster, _, described) = cluster_with_topic();
    let leader = described.leader;
    let at_leader = cluster.bootstrap(leader);
    all_acknowledged(
        &run(produce(
            &at_leader,
            &values("before", 200),
            Acks::All,
            20_000,
        )),
        "healthy cluster",
    );
    let committed = wait_for(&at_leader, "HW at the end", |d| {
        d.end_offset > 0 && d.high_watermark == d.end_offset
    })
    .high_watermark;
    // The followers first, so nothing can move the HW after the leader stores it at its stop.
    for id in (1..=3).filter(|&id| id != leader) {
        assert_eq!(cluster.broker(id).stop(), 0, "clean stop");
    }
    assert_eq!(cluster.broker(leader).stop(), 0, "clean stop");
    cluster.broker(leader).restart_same_ports();
    let described = wait_for(&at_leader, "the leader describes the partition", |_| true);
    assert_eq!(
        (described.high_watermark, described.end_offset),
        (committed, committed),
        "HW right after the restart, with every follower down"
    );
    let latest = run(async {
        let client = Client::connect(client_config(&at_leader))
            .await
            .expect("connect");
        client
            .list_offsets(TOPIC, &[0], wharf::protocol::OffsetSpec::Latest)
            .await
            .expect("list offsets")
    });
    assert_eq!(latest, vec![(0, committed)]);
}

/// A follower's fetch offset inside one of the leader's batches (the replica state machine
/// does not know batches; the driver checks) is refused with `InvalidReplicaOffsets` and
/// changes nothing; so is a durable offset above the fetch offset. Before, the first was
/// served (and counted as the follower's progress), the second clamped and counted.
#[test]
fn forged_replica_fetch_offsets_are_refused_and_change_nothing() {
    use wharf::client::{decode, Connection};
    use wharf::protocol::{ApiKey, ReplicaFetchRequest, ReplicaFetchResponse};
    let (mut cluster, first, described) = cluster_with_topic();
    let topic_id = run(async {
        let client = Client::connect(client_config(&first))
            .await
            .expect("connect");
        client
            .describe_topic(TOPIC)
            .await
            .expect("describe")
            .topic_id
    });
    let leader = described.leader;
    let at_leader = cluster.bootstrap(leader);
    all_acknowledged(
        &run(produce(&at_leader, &values("v", 300), Acks::All, 20_000)),
        "healthy cluster",
    );
    let before = wait_for(&at_leader, "HW at the end", |d| {
        d.end_offset > 0 && d.high_watermark == d.end_offset && d.isr.len() == 3
    });
    // A stopped follower's copy shows where the batches start (the leader's are the same).
    let forger = described
        .replicas
        .iter()
        .copied()
        .find(|&r| r != leader)
        .expect("a follower");
    assert_eq!(cluster.broker(forger).stop(), 0, "clean stop");
    let log = read_log(&partition_dir(cluster.broker(forger)));
    let (base, bytes) = log
        .iter()
        .find(|(_, bytes)| {
            wharf_storage::batch::check_batch(bytes).is_ok_and(|b| b.header.record_count > 1)
        })
        .expect("a batch of several records");
    let inside = base + 1;
    assert!(wharf_storage::batch::check_batch(bytes).is_ok());
    // The forger is a real peer (it holds the cluster secret): only the internal listener
    // serves replica fetches, to authenticated brokers fetching as themselves.
    let internal = cluster.internal(leader);
    let credentials = wharf::peer_auth::PeerCredentials {
        broker_id: forger,
        secret: wharf::peer_auth::ClusterSecret::load(&cluster.secret_path).expect("secret"),
    };
    let fetch = |fetch_offset: u64, durable_offset: u64| {
        let internal = internal.clone();
        let credentials = credentials.clone();
        run(async move {
            let connection =
                Connection::connect_peer(&internal, 16 * 1024 * 1024, Some(&credentials))
                    .await
                    .expect("connect and authenticate");
            let request = ReplicaFetchRequest {
                replica_id: forger,
                topic: TOPIC.to_string(),
                topic_id,
                partition: 0,
                leader_epoch: described.leader_epoch,
                fetch_id: 1,
                fetch_offset,
                last_fetched_epoch: Some(described.leader_epoch),
                durable_offset,
                high_watermark: 0,
                max_wait_ms: 0,
                max_bytes: 1024 * 1024,
            };
            let frame = connection
                .call(ApiKey::ReplicaFetch, &request, Vec::new(), 10_000)
                .await
                .expect("replica fetch");
            let response: ReplicaFetchResponse = decode(&frame).expect("decode");
            ErrorCode::from_u16(response.error)
        })
    };
    assert_eq!(
        fetch(inside, *base),
        ErrorCode::InvalidReplicaOffsets,
        "fetch offset inside a batch"
    );
    assert_eq!(
        fetch(*base, inside),
        ErrorCode::InvalidReplicaOffsets,
        "durable offset above the fetch offset"
    );
    let after = describe(&at_leader).expect("describe");
    assert_eq!(
        (after.high_watermark, after.end_offset),
        (before.high_watermark, before.end_offset)
    );
    // An honest fetch is still served.
    assert_eq!(fetch(*base, *base), ErrorCode::None);
}
