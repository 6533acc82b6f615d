//! Queues on a 3-broker cluster with the Raft controller: `__queue_state` is replicated (RF 3);
//! when the queue coordinator's broker is killed, the new leader of the queue's state
//! partition replays it: acked records are never delivered again, the records a member held
//! come back after their lease at the next attempt, and the rest are delivered once.

mod common;

use std::collections::BTreeSet;
use std::rc::Rc;

use common::{run, Cluster};
use wharf::client::producer::{Producer, ProducerConfig};
use wharf::client::queues::QueueMember;
use wharf::client::{Client, ClientConfig};
use wharf::protocol::QueueSettings;

const TOPIC: &str = "jobs";
const PARTITIONS: u32 = 3;
const RECORDS: u32 = 60;
const CONFIG: &str = "[groups]\noffsets_topic_partitions = 2\n";
/// Acquire calls a wait makes (each long-polls at most 200 ms, or fails over).
const ROUNDS_MAX: usize = 300;

async fn connect(bootstrap: &str) -> Rc<Client> {
    let mut config = ClientConfig::new(bootstrap);
    config.request_timeout_ms = 5_000;
    Client::connect(config).await.expect("connect")
}

#[test]
fn the_queue_coordinator_fails_over_without_losing_an_ack_or_a_lease() {
    let mut cluster = Cluster::start_controlled_with(2_000, CONFIG);
    let all: String = (1..=3)
        .map(|id| cluster.bootstrap(id))
        .collect::<Vec<_>>()
        .join(",");
    let (coordinator, acked, held) = run(async {
        let client = connect(&all).await;
        client
            .create_topic(TOPIC, PARTITIONS, 3, Vec::new())
            .await
            .expect("create");
        client
            .create_queue(
                "work",
                TOPIC,
                QueueSettings {
                    ack_wait_ms: 2_000,
                    backoff_list_ms: vec![100],
                    ..QueueSettings::default()
                },
            )
            .await
            .expect("create queue");
        let producer = Producer::new(Rc::clone(&client), ProducerConfig::default());
        for i in 0..RECORDS {
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
        let member = QueueMember::new(Rc::clone(&client), "work", "before");
        let mut got = Vec::new();
        for _ in 0..ROUNDS_MAX {
            if got.len() >= 20 {
                break;
            }
            got.extend(
                member
                    .acquire((20 - got.len()) as u32, 200)
                    .await
                    .expect("acquire"),
            );
        }
        assert_eq!(got.len(), 20);
        let mut acked = BTreeSet::new();
        for d in &got[..15] {
            member.ack(d).await.expect("ack");
            acked.insert(d.value.clone());
        }
        let held: BTreeSet<Vec<u8>> = got[15..].iter().map(|d| d.value.clone()).collect();
        let described = client.describe_queue("work").await.expect("describe");
        (described.coordinator, acked, held)
    });
    cluster.broker(coordinator).kill9();
    let survivors: String = (1..=3u32)
        .filter(|&id| id != coordinator)
        .map(|id| cluster.bootstrap(id))
        .collect::<Vec<_>>()
        .join(",");
    run(async {
        let client = connect(&survivors).await;
        let member = QueueMember::new(Rc::clone(&client), "work", "after");
        let mut seen = BTreeSet::new();
        let mut redelivered = BTreeSet::new();
        for _ in 0..ROUNDS_MAX {
            if seen.len() as u32 >= RECORDS - 15 {
                break;
            }
            let got = member
                .acquire(50, 200)
                .await
                .expect("acquire after failover");
            for d in &got {
                assert!(!acked.contains(&d.value), "an acked record came back");
                assert!(
                    seen.insert(d.value.clone()),
                    "delivered twice after failover"
                );
                if d.delivery_attempt == 2 {
                    redelivered.insert(d.value.clone());
                } else {
                    assert_eq!(d.delivery_attempt, 1);
                }
                member.ack(d).await.expect("ack on the new coordinator");
            }
        }
        assert_eq!(
            seen.len() as u32,
            RECORDS - 15,
            "every unacked record delivered"
        );
        assert_eq!(redelivered, held, "the held records came back at attempt 2");
        let described = client.describe_queue("work").await.expect("describe");
        assert_ne!(described.coordinator, coordinator, "a new coordinator");
        let done: u64 = described.partitions.iter().map(|p| p.start_offset).sum();
        assert_eq!(done, u64::from(RECORDS));
    });
}
