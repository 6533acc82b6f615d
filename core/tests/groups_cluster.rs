//! Consumer groups on a 3-broker cluster with the Raft controller: the offsets topic is
//! replicated (RF 3) and compacted on every replica; when the coordinator's broker is killed,
//! the new leader of the group's offsets partition replays it and the same member goes on
//! committing; the offsets survive a full cluster restart.

mod common;

use std::rc::Rc;

use common::{run, Broker, Cluster};
use wharf::client::consumer::ConsumerConfig;
use wharf::client::groups::{GroupConsumer, GroupConsumerConfig};
use wharf::client::producer::{Producer, ProducerConfig};
use wharf::client::{Client, ClientConfig};
use wharf::protocol::{group_partition, OFFSETS_TOPIC};

const TOPIC: &str = "events";
const PARTITIONS: u32 = 3;
const CONFIG: &str = "[groups]\nsession_timeout_ms = 3000\nheartbeat_interval_ms = 100\noffsets_topic_partitions = 2\noffsets_segment_bytes = 65536\nsnapshot_after_records = 100\n";
/// Waits of at most this many 100 ms steps.
const POLLS_MAX: usize = 300;

async fn connect(bootstrap: &str) -> Rc<Client> {
    let mut config = ClientConfig::new(bootstrap);
    config.request_timeout_ms = 5_000;
    Client::connect(config).await.expect("connect")
}

/// The offsets partition's log start on `broker`, from its metrics (0 when not hosted).
fn offsets_log_start(broker: &Broker, partition: u32) -> u64 {
    let series = format!(
        "wharf_partition_log_start_offset{{topic=\"{OFFSETS_TOPIC}\",partition=\"{partition}\"}}"
    );
    common::metric(broker, &series).unwrap_or(0)
}

#[test]
fn the_coordinator_fails_over_and_offsets_survive_a_full_cluster_restart() {
    let mut cluster = Cluster::start_controlled_with(2_000, CONFIG);
    let all = cluster.bootstraps();
    let offsets_partition = group_partition("g", 2);
    let coordinator = run(async {
        let client = connect(&all).await;
        client
            .create_topic(TOPIC, PARTITIONS, 3, Vec::new())
            .await
            .expect("create");
        let producer = Producer::new(Rc::clone(&client), ProducerConfig::default());
        // More records than the offsets committed below, so those stay inside the log.
        for i in 0..(250 * PARTITIONS) {
            producer
                .send_to(
                    TOPIC,
                    Some(i % PARTITIONS),
                    None,
                    format!("r{i}").as_bytes(),
                )
                .await
                .expect("queued");
        }
        producer.flush().await;
        let mut config = GroupConsumerConfig::new("g");
        config.auto_commit = false;
        config.consumer = ConsumerConfig {
            max_wait_ms: 50,
            ..ConsumerConfig::default()
        };
        let mut member = GroupConsumer::join(connect(&all).await, TOPIC, config)
            .await
            .expect("join");
        assert_eq!(member.assignment().len(), PARTITIONS as usize);
        for i in 1..=200u64 {
            for partition in member.assignment() {
                member.seek(partition, i).await.expect("seek");
            }
            member.commit().await.expect("commit");
        }
        let described = client.describe_group("g").await.expect("describe");
        described.coordinator
    });
    // Every replica of the group's offsets partition deleted the segments below a snapshot:
    // the followers follow the leader's log start.
    for id in 1..=3u32 {
        let mut start = 0;
        for _ in 0..POLLS_MAX {
            start = offsets_log_start(cluster.broker(id), offsets_partition);
            if start > 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(
            start > 0,
            "broker {id}: the offsets partition was not compacted"
        );
    }
    // Kill the coordinator: the group moves to the new leader of its offsets partition, with
    // its member and offsets.
    cluster.broker(coordinator).kill9();
    let survivors: String = (1..=3u32)
        .filter(|&id| id != coordinator)
        .map(|id| cluster.bootstrap(id))
        .collect::<Vec<_>>()
        .join(",");
    run(async {
        let client = connect(&survivors).await;
        let committed = client
            .committed_offsets("g")
            .await
            .expect("offsets after failover");
        assert_eq!(committed.len(), PARTITIONS as usize);
        assert!(committed.iter().all(|o| o.offset == 200), "{committed:?}");
        let described = client.describe_group("g").await.expect("describe");
        assert_ne!(described.coordinator, coordinator, "a new coordinator");
        assert_eq!(described.members.len(), 1, "the member was replayed");
        // A new member joins and takes over once the old one's session ends.
        let mut config = GroupConsumerConfig::new("g");
        config.auto_commit = false;
        let mut member = GroupConsumer::join(connect(&survivors).await, TOPIC, config)
            .await
            .expect("join after failover");
        let mut first_offsets = std::collections::BTreeMap::new();
        for _ in 0..POLLS_MAX {
            let records = member.poll().await.expect("poll");
            records
                .for_each(|r| {
                    first_offsets.entry(r.partition).or_insert(r.offset);
                })
                .expect("records");
            if first_offsets.len() == PARTITIONS as usize {
                break;
            }
        }
        assert_eq!(member.assignment().len(), PARTITIONS as usize);
        assert!(
            first_offsets.values().all(|&o| o == 200),
            "resumes at the committed offset: {first_offsets:?}"
        );
        for partition in member.assignment() {
            member.seek(partition, 201).await.expect("seek");
        }
        member
            .commit()
            .await
            .expect("commit on the new coordinator");
    });
    // Everything down at once, then up again: the offsets are still there.
    cluster.broker(coordinator).restart_same_ports();
    for id in 1..=3u32 {
        cluster.broker(id).kill9();
    }
    for id in 1..=3u32 {
        cluster.broker(id).spawn();
    }
    for id in 1..=3u32 {
        cluster.broker(id).wait_ready();
    }
    let all = cluster.bootstraps();
    run(async {
        let client = connect(&all).await;
        let committed = client
            .committed_offsets("g")
            .await
            .expect("offsets after a full restart");
        assert!(
            committed.iter().all(|o| o.offset == 201) && committed.len() == PARTITIONS as usize,
            "{committed:?}"
        );
    });
}
