//! Consumer groups end to end on a real `wharf serve`: members share a topic's partitions and
//! rebalance on join, leave and crash (a partition moves only once its owner gave it up, so
//! nothing is consumed twice across a clean hand-over); committed offsets survive a kill -9
//! and a new member resumes where the group stopped; a restarted static member gets its
//! partitions back without a rebalance; bad requests get clear errors.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use common::{run, Broker};
use wharf::client::consumer::ConsumerConfig;
use wharf::client::groups::{GroupConsumer, GroupConsumerConfig};
use wharf::client::producer::{Producer, ProducerConfig};
use wharf::client::{Client, ClientConfig, ClientError};
use wharf::protocol::ErrorCode;

const TOPIC: &str = "events";
const PARTITIONS: u32 = 6;
const RECORDS: u32 = 600;
/// Short sessions so a crashed member's partitions move within the test.
const GROUPS_CONFIG: &str = "[groups]\nsession_timeout_ms = 1500\nheartbeat_interval_ms = 100\noffsets_topic_partitions = 3\n";
/// Rounds of polling every member before a wait gives up (each round at most ~100 ms).
const ROUNDS_MAX: usize = 300;

async fn connect(address: &str) -> Rc<Client> {
    Client::connect(ClientConfig::new(address))
        .await
        .expect("connect")
}

async fn produce_all(client: &Rc<Client>) {
    client
        .create_topic(TOPIC, PARTITIONS, 1, Vec::new())
        .await
        .expect("create");
    let producer = Producer::new(Rc::clone(client), ProducerConfig::default());
    let mut deliveries = Vec::new();
    for i in 0..RECORDS {
        let value = format!("r{i:04}");
        deliveries.push(
            producer
                .send_to(TOPIC, Some(i % PARTITIONS), None, value.as_bytes())
                .await
                .expect("queued"),
        );
    }
    producer.flush().await;
    for delivery in deliveries {
        delivery.await.expect("acknowledged");
    }
}

fn member_config(instance: Option<&str>, auto_commit: bool) -> GroupConsumerConfig {
    let mut config = GroupConsumerConfig::new("g");
    config.instance_id = instance.map(str::to_string);
    config.auto_commit = auto_commit;
    config.consumer = ConsumerConfig {
        max_wait_ms: 50,
        ..ConsumerConfig::default()
    };
    config
}

/// Polls `member` once and counts what it returned.
async fn poll_into(member: &mut GroupConsumer, seen: &mut BTreeMap<String, u32>) {
    let records = member.poll().await.expect("poll");
    records
        .for_each(|r| {
            *seen
                .entry(String::from_utf8_lossy(r.value).into_owned())
                .or_default() += 1;
        })
        .expect("records");
}

/// One poll; every record is processed (kept) before the positions are committed.
async fn poll_then_commit(member: &mut GroupConsumer, processed: &mut Vec<String>) {
    let records = member.poll().await.expect("poll");
    records
        .for_each(|r| processed.push(String::from_utf8_lossy(r.value).into_owned()))
        .expect("records");
    member.commit().await.expect("commit");
}

fn assignment(member: &GroupConsumer) -> BTreeSet<u32> {
    member.assignment().into_iter().collect()
}

#[test]
fn members_share_partitions_and_rebalance_on_join_leave_and_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), 2, GROUPS_CONFIG);
    let address = broker.bootstrap();
    run(async {
        let client = connect(&address).await;
        produce_all(&client).await;
        let mut seen = BTreeMap::new();
        let mut a = GroupConsumer::join(connect(&address).await, TOPIC, member_config(None, true))
            .await
            .expect("a joins");
        assert_eq!(
            assignment(&a).len(),
            PARTITIONS as usize,
            "alone, a gets all"
        );
        poll_into(&mut a, &mut seen).await;
        let mut b = GroupConsumer::join(connect(&address).await, TOPIC, member_config(None, true))
            .await
            .expect("b joins");
        // Until a gives partitions up, b waits for them: never both on one partition.
        let mut settled = false;
        for _ in 0..ROUNDS_MAX {
            poll_into(&mut a, &mut seen).await;
            poll_into(&mut b, &mut seen).await;
            let (on_a, on_b) = (assignment(&a), assignment(&b));
            assert!(on_a.is_disjoint(&on_b), "a {on_a:?} and b {on_b:?} overlap");
            settled = on_a.len() == 3 && on_b.len() == 3;
            if settled && seen.len() == RECORDS as usize {
                break;
            }
        }
        assert!(settled, "a {:?}, b {:?}", assignment(&a), assignment(&b));
        assert_eq!(seen.len(), RECORDS as usize, "every record consumed");
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "consumed twice across a clean hand-over: {twice:?}"
        );
        let described = client.describe_group("g").await.expect("describe");
        assert_eq!(described.members.len(), 2);
        let committed: u64 = described.offsets.iter().map(|o| o.offset).sum();
        assert!(committed > 0, "offsets committed: {:?}", described.offsets);
        // The coordinator exports the members' lag: all caught up, every partition reported.
        let mut caught_up = false;
        for _ in 0..ROUNDS_MAX {
            poll_into(&mut a, &mut seen).await;
            poll_into(&mut b, &mut seen).await;
            let (_, metrics) = broker.http_get("/metrics").expect("metrics");
            let lags: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("wharf_group_lag_records{group=\"g\""))
                .collect();
            caught_up = lags.len() == PARTITIONS as usize
                && lags.iter().all(|l| l.ends_with(" 0"))
                && metrics.contains("wharf_group_members{group=\"g\"} 2");
            if caught_up {
                break;
            }
        }
        assert!(
            caught_up,
            "lag metrics: every partition reported at 0 lag, 2 members"
        );
        let described = client.describe_group("g").await.expect("describe");
        assert_eq!(
            described.lag.len(),
            PARTITIONS as usize,
            "{:?}",
            described.lag
        );

        // b leaves: a takes everything back.
        b.leave().await.expect("b leaves");
        let mut back = false;
        for _ in 0..ROUNDS_MAX {
            poll_into(&mut a, &mut seen).await;
            if assignment(&a).len() == PARTITIONS as usize {
                back = true;
                break;
            }
        }
        assert!(back, "after b left, a has {:?}", assignment(&a));

        // c joins, takes half, then crashes (no leave): after its session, a has all again.
        let mut c = GroupConsumer::join(connect(&address).await, TOPIC, member_config(None, true))
            .await
            .expect("c joins");
        let mut halves = false;
        for _ in 0..ROUNDS_MAX {
            poll_into(&mut a, &mut seen).await;
            poll_into(&mut c, &mut seen).await;
            if assignment(&c).len() == 3 {
                halves = true;
                break;
            }
        }
        assert!(halves, "c has {:?}", assignment(&c));
        drop(c);
        let mut recovered = false;
        for _ in 0..ROUNDS_MAX {
            poll_into(&mut a, &mut seen).await;
            if assignment(&a).len() == PARTITIONS as usize {
                recovered = true;
                break;
            }
        }
        assert!(recovered, "after c crashed, a has {:?}", assignment(&a));
        let described = client.describe_group("g").await.expect("describe");
        assert_eq!(described.members.len(), 1, "{:?}", described.members);
        a.leave().await.expect("a leaves");
    });
}

#[test]
fn committed_offsets_survive_a_kill_and_a_new_member_resumes_without_skipping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(dir.path(), 1, GROUPS_CONFIG);
    let address = broker.bootstrap();
    let mut processed: Vec<String> = Vec::new();
    run(async {
        let client = connect(&address).await;
        produce_all(&client).await;
        let mut member =
            GroupConsumer::join(connect(&address).await, TOPIC, member_config(None, false))
                .await
                .expect("join");
        // Process, then commit synchronously before the next poll.
        for _ in 0..ROUNDS_MAX {
            poll_then_commit(&mut member, &mut processed).await;
            if processed.len() >= (RECORDS / 2) as usize {
                break;
            }
        }
        // The member dies with the broker: no leave, no further commit.
    });
    let before = processed.len();
    assert!(before >= (RECORDS / 2) as usize);
    broker.kill9();
    broker.restart();
    let address = broker.bootstrap();
    run(async {
        let client = connect(&address).await;
        let committed = client
            .committed_offsets("g")
            .await
            .expect("offsets survive");
        assert!(
            committed.iter().all(|o| o.leader_epoch.is_some()),
            "each commit carries the leader epoch of what was consumed: {committed:?}"
        );
        assert_eq!(
            committed.iter().map(|o| o.offset).sum::<u64>(),
            before as u64,
            "committed = processed: {committed:?}"
        );
        // The old member's session ends; a new member resumes at the committed offsets.
        let mut member =
            GroupConsumer::join(connect(&address).await, TOPIC, member_config(None, false))
                .await
                .expect("join after restart");
        for _ in 0..ROUNDS_MAX {
            poll_then_commit(&mut member, &mut processed).await;
            if processed.len() >= RECORDS as usize && !assignment(&member).is_empty() {
                break;
            }
        }
        member.leave().await.expect("leave");
    });
    let unique: BTreeSet<&String> = processed.iter().collect();
    assert_eq!(unique.len(), RECORDS as usize, "no record skipped");
    assert_eq!(processed.len(), RECORDS as usize, "none processed twice");
}

#[test]
fn a_restarted_static_member_gets_its_partitions_back_without_a_rebalance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), 1, GROUPS_CONFIG);
    let address = broker.bootstrap();
    run(async {
        let client = connect(&address).await;
        produce_all(&client).await;
        let mut seen = BTreeMap::new();
        let mut a = GroupConsumer::join(
            connect(&address).await,
            TOPIC,
            member_config(Some("host-a"), true),
        )
        .await
        .expect("a");
        let mut b = GroupConsumer::join(
            connect(&address).await,
            TOPIC,
            member_config(Some("host-b"), true),
        )
        .await
        .expect("b");
        for _ in 0..ROUNDS_MAX {
            poll_into(&mut a, &mut seen).await;
            poll_into(&mut b, &mut seen).await;
            if assignment(&a).len() == 3 && assignment(&b).len() == 3 {
                break;
            }
        }
        let (a_had, b_had) = (assignment(&a), assignment(&b));
        assert_eq!((a_had.len(), b_had.len()), (3, 3));
        let epoch = client
            .describe_group("g")
            .await
            .expect("describe")
            .group_epoch;
        a.leave().await.expect("a stops for a restart");
        let a2 = GroupConsumer::join(
            connect(&address).await,
            TOPIC,
            member_config(Some("host-a"), true),
        )
        .await
        .expect("a again");
        assert_eq!(assignment(&a2), a_had, "same partitions at once");
        poll_into(&mut b, &mut seen).await;
        assert_eq!(assignment(&b), b_had, "b undisturbed");
        let described = client.describe_group("g").await.expect("describe");
        assert_eq!(described.group_epoch, epoch, "no rebalance");
        assert_eq!(described.members.len(), 2);
    });
}

#[test]
fn bad_group_requests_get_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), 1, GROUPS_CONFIG);
    let address = broker.bootstrap();
    run(async {
        let client = connect(&address).await;
        client
            .create_topic(TOPIC, PARTITIONS, 1, Vec::new())
            .await
            .expect("create");
        fn code<T>(result: Result<T, ClientError>) -> ErrorCode {
            match result {
                Err(ClientError::Server { code, .. }) => code,
                Err(other) => panic!("expected a refusal, got {other}"),
                Ok(_) => panic!("expected a refusal, got success"),
            }
        }
        assert_eq!(
            code(client.describe_group("nobody").await),
            ErrorCode::UnknownGroup
        );
        // The offsets topic is the brokers': clients cannot create, delete or write it.
        let internal = wharf::protocol::OFFSETS_TOPIC;
        assert_eq!(
            code(client.create_topic(internal, 1, 1, Vec::new()).await),
            ErrorCode::InvalidTopic
        );
        assert_eq!(
            code(client.delete_topic(internal).await),
            ErrorCode::InvalidTopic
        );
        let producer = Producer::new(Rc::clone(&client), ProducerConfig::default());
        let delivery = producer
            .send_to(internal, Some(0), None, b"garbage")
            .await
            .expect("queued");
        producer.flush().await;
        assert_eq!(code(delivery.await), ErrorCode::InvalidTopic);
        assert_eq!(
            code(client.describe_group(&"x".repeat(300)).await),
            ErrorCode::InvalidRequest
        );
        // An administrative commit into an active group is refused, and commits nothing.
        let member = GroupConsumer::join(connect(&address).await, TOPIC, member_config(None, true))
            .await
            .expect("join");
        let entry = wharf::protocol::OffsetCommitEntry {
            topic: TOPIC.into(),
            partition: 0,
            offset: 42,
            leader_epoch: None,
            metadata: String::new(),
        };
        assert_eq!(
            code(client.commit_offsets_admin("g", vec![entry.clone()]).await),
            ErrorCode::GroupNotEmpty
        );
        assert_eq!(
            code(client.delete_group("g").await),
            ErrorCode::GroupNotEmpty
        );
        // A heartbeat with more lag reports than any member can own is refused.
        let flood = wharf::protocol::GroupHeartbeatRequest {
            group: "g".into(),
            member_id: member.member_id().to_string(),
            member_epoch: member.member_epoch(),
            instance_id: None,
            subscribed_topics: None,
            owned: None,
            lag: (0..70_000u32)
                .map(|partition| wharf::protocol::PartitionLag {
                    topic: TOPIC.into(),
                    partition,
                    position: 0,
                    high_watermark: 0,
                    lag_ms: 0,
                })
                .collect(),
        };
        let flooded: Result<wharf::protocol::GroupHeartbeatResponse, ClientError> = client
            .coordinator_call(wharf::protocol::ApiKey::GroupHeartbeat, "g", &flood)
            .await;
        assert_eq!(code(flooded), ErrorCode::InvalidRequest);
        member.leave().await.expect("leave");
        client
            .commit_offsets_admin("g", vec![entry])
            .await
            .expect("allowed once empty");
        let offsets = client.committed_offsets("g").await.expect("offsets");
        assert!(offsets.iter().any(|o| o.partition == 0 && o.offset == 42));
        client.delete_group("g").await.expect("delete");
        assert_eq!(
            code(client.describe_group("g").await),
            ErrorCode::UnknownGroup
        );
    });
}

/// The offsets topic is compacted by the coordinator's snapshots: after enough commits the
/// segments below the latest snapshot are gone, and a restarted broker rebuilds the group
/// (members, committed offsets) from what is left.
#[test]
fn snapshots_compact_the_offsets_topic_and_the_group_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config =
        format!("{GROUPS_CONFIG}offsets_segment_bytes = 65536\nsnapshot_after_records = 200\n");
    let mut broker = Broker::start(dir.path(), 1, &config);
    let address = broker.bootstrap();
    let commits = 400u64;
    let member_id = run(async {
        let client = connect(&address).await;
        produce_all(&client).await;
        let mut member =
            GroupConsumer::join(connect(&address).await, TOPIC, member_config(None, false))
                .await
                .expect("join");
        for i in 1..=commits {
            for partition in member.assignment() {
                member.seek(partition, i).await.expect("seek");
            }
            member.commit().await.expect("commit");
        }
        member.member_id().to_string()
    });
    let offsets_partition = wharf::protocol::group_partition("g", 3);
    let series = format!(
        "wharf_partition_log_start_offset{{topic=\"{}\",partition=\"{offsets_partition}\"}}",
        wharf::protocol::OFFSETS_TOPIC
    );
    let log_start = |broker: &Broker| common::metric(broker, &series).unwrap_or(0);
    let mut compacted = 0;
    for _ in 0..ROUNDS_MAX {
        compacted = log_start(&broker);
        if compacted > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        compacted > commits,
        "segments below a snapshot deleted: log start {compacted}"
    );
    broker.kill9();
    broker.restart();
    let address = broker.bootstrap();
    run(async {
        let client = connect(&address).await;
        let committed = client.committed_offsets("g").await.expect("offsets");
        assert_eq!(committed.len(), PARTITIONS as usize);
        assert!(
            committed.iter().all(|o| o.offset == commits),
            "{committed:?}"
        );
        let described = client.describe_group("g").await.expect("describe");
        assert_eq!(
            described
                .members
                .iter()
                .map(|m| m.member_id.as_str())
                .collect::<Vec<_>>(),
            [member_id.as_str()],
            "the member is still there until its session ends"
        );
    });
}

/// The CLI: `wharf consume --group` resumes where the group stopped; `wharf group list |
/// describe | reset-offsets | delete`; bad combinations are refused with exit code 2.
#[test]
fn the_cli_consumes_as_a_group_and_manages_groups() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), 2, GROUPS_CONFIG);
    let bootstrap = broker.bootstrap();
    let cli = |args: &[&str], stdin: &str| common::cli(&bootstrap, args, stdin);
    let (code, _, err) = cli(&["topic", "create", "lines", "--partitions", "3"], "");
    assert_eq!(code, Some(0), "{err}");
    let input: String = (0..50).map(|i| format!("line {i}\n")).collect();
    let (code, _, err) = cli(&["produce", "lines"], &input);
    assert_eq!(code, Some(0), "{err}");
    let (code, first, err) = cli(&["consume", "lines", "--group", "cg", "--count", "20"], "");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(first.lines().count(), 20, "{first}");
    let (code, rest, err) = cli(&["consume", "lines", "--group", "cg"], "");
    assert_eq!(code, Some(0), "{err}");
    let mut all: Vec<&str> = first.lines().chain(rest.lines()).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        all.len(),
        50,
        "each record once across both runs: {first}\n--\n{rest}"
    );
    assert_eq!(first.lines().count() + rest.lines().count(), 50);
    let (code, out, err) = cli(&["group", "describe", "cg", "--format", "json"], "");
    assert_eq!(code, Some(0), "{err}");
    let described: serde_json::Value = serde_json::from_str(&out).expect("json");
    let committed: u64 = described["offsets"]
        .as_array()
        .expect("offsets")
        .iter()
        .map(|o| o["committed"].as_u64().expect("committed"))
        .sum();
    assert_eq!(committed, 50, "{out}");
    assert_eq!(
        described["members"].as_array().map(Vec::len),
        Some(0),
        "{out}"
    );
    let (code, out, _) = cli(&["group", "list"], "");
    assert_eq!(code, Some(0));
    assert!(out.contains("cg"), "{out}");
    // Pub/sub: another group reads every record too, independently.
    let (code, other, err) = cli(&["consume", "lines", "--group", "other"], "");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        other.lines().count(),
        50,
        "a second group gets every record"
    );
    let (code, out, _) = cli(&["group", "list", "--format", "json"], "");
    assert_eq!(code, Some(0));
    let listed: serde_json::Value = serde_json::from_str(&out).expect("json");
    let names: Vec<&str> = listed
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g["group"].as_str())
        .collect();
    assert_eq!(names, ["cg", "other"], "{out}");
    let (code, _, err) = cli(
        &[
            "group",
            "reset-offsets",
            "cg",
            "--topic",
            "lines",
            "--to",
            "earliest",
        ],
        "",
    );
    assert_eq!(code, Some(0), "{err}");
    let (code, again, err) = cli(&["consume", "lines", "--group", "cg"], "");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(again.lines().count(), 50, "from the start again");
    let (code, _, err) = cli(
        &["consume", "lines", "--group", "cg", "--partition", "1"],
        "",
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--partition and --group"), "{err}");
    let (code, _, err) = cli(
        &[
            "group",
            "reset-offsets",
            "cg",
            "--topic",
            "lines",
            "--to",
            "soon",
        ],
        "",
    );
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = cli(&["group", "delete", "cg"], "");
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = cli(&["group", "describe", "cg"], "");
    assert_ne!(code, Some(0));
    assert!(err.contains("unknown_group"), "{err}");
}
