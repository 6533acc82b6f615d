//! Automatic failover end to end: three real `wharf serve` processes on 127.0.0.1 that run the
//! Raft controller (`controller_voters = [1, 2, 3]`), a topic with RF=3, min_insync_replicas=2,
//! acks=all. A leader is killed, stopped (SIGSTOP: a zombie) or shut down (SIGTERM); the
//! controller fences it and elects a new leader from the ISR; every acknowledged record must
//! stay at its offset, and the cluster must return to a full ISR once the broker is back.
//! Timings here are generous bounds on waits, not performance figures (`bench/failover.sh`).

mod common;

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use common::{client_config, produce_to, run, wait_for_partition, wire, Cluster, STATE_POLLS_MAX};
use wharf::client::consumer::{Consumer, ConsumerConfig, SeekTo};
use wharf::client::producer::{Producer, ProducerConfig};
use wharf::client::{Client, ClientError};
use wharf::peer_auth::ClusterSecret;
use wharf::protocol::{
    Acks, ApiKey, BrokerHeartbeatRequest, ClusterStatusResponse, ConfigEntry,
    ControllerCommandRequest, ControllerCommandResponse, ControllerRaftRequest,
    ControllerRaftResponse, ErrorCode, PartitionDescription, ProduceResponse,
};

const TOPIC: &str = "failover";
const REPLICA_LAG_MAX_MS: u64 = 2_000;

fn start() -> Cluster {
    let cluster = Cluster::start_controlled(REPLICA_LAG_MAX_MS, "");
    let bootstrap = cluster.bootstraps();
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        let configs = vec![ConfigEntry {
            key: "min_insync_replicas".to_string(),
            value: "2".to_string(),
        }];
        client
            .create_topic(TOPIC, 1, 3, configs)
            .await
            .expect("create topic through the controller");
    });
    // The create is answered once the broker that took it applied it; the others apply it at
    // their next heartbeat (their apply runs beside it), and the ISR fills as followers fetch.
    for id in 1..=3 {
        wait_for(
            &cluster.bootstrap(id),
            "every broker knows the topic, full ISR",
            |d| d.replicas.len() == 3 && d.isr.len() == 3,
        );
    }
    cluster
}

/// Produces `count` records with acks=all; returns (value, offset) of each acknowledged one.
fn produce(bootstrap: &str, prefix: &str, count: usize) -> Vec<(String, u64)> {
    produce_to(bootstrap, TOPIC, prefix, count)
}

/// Reads partition 0 from the start up to its high watermark: offset -> value.
fn read_all(bootstrap: &str) -> BTreeMap<u64, String> {
    run(async {
        let client = Client::connect(client_config(bootstrap))
            .await
            .expect("connect");
        let mut consumer = Consumer::new(Rc::clone(&client), TOPIC, ConsumerConfig::default());
        consumer
            .assign(Some(vec![0]), SeekTo::Earliest)
            .await
            .expect("assign");
        let mut seen = BTreeMap::new();
        for _ in 0..STATE_POLLS_MAX {
            let records = consumer.poll().await.expect("poll");
            records
                .for_each(|r| {
                    let value = String::from_utf8_lossy(r.value).to_string();
                    if let Some(earlier) = seen.insert(r.offset, value.clone()) {
                        assert_eq!(
                            earlier, value,
                            "offset {} read twice, differently",
                            r.offset
                        );
                    }
                })
                .expect("records");
            if records.is_empty() && consumer.caught_up() && consumer.high_watermark(0) > Some(0) {
                break;
            }
        }
        seen
    })
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

fn status(bootstrap: &str) -> Result<ClusterStatusResponse, ClientError> {
    run(async {
        let client = Client::connect(client_config(bootstrap)).await?;
        client.cluster_status().await
    })
}

/// Every acknowledged record is at its acknowledged offset, and offsets are dense.
fn assert_all_kept(log: &BTreeMap<u64, String>, acked: &[(String, u64)]) {
    for (value, offset) in acked {
        assert_eq!(
            log.get(offset),
            Some(value),
            "acknowledged {value} at offset {offset} is not there"
        );
    }
    let offsets: Vec<u64> = log.keys().copied().collect();
    let dense: Vec<u64> = (0..offsets.len() as u64).collect();
    assert_eq!(offsets, dense, "the log has holes");
}

#[test]
fn a_killed_leader_is_replaced_from_the_isr_and_nothing_acknowledged_is_lost() {
    let mut cluster = start();
    let bootstrap = cluster.bootstraps();
    let mut acked = produce(&bootstrap, "before", 200);
    let before = wait_for(&bootstrap, "a full ISR", |d| d.isr.len() == 3);
    let old_leader = before.leader;
    cluster.broker(old_leader).kill9();

    let survivor = (1..=3).find(|id| *id != old_leader).expect("a survivor");
    let after = wait_for(&cluster.bootstrap(survivor), "a new leader", |d| {
        d.leader != old_leader && d.leader != u32::MAX
    });
    assert!(
        after.leader_epoch > before.leader_epoch,
        "the new leader has a new epoch: {before:?} -> {after:?}"
    );
    assert!(
        !after.isr.contains(&old_leader),
        "the dead broker left the ISR: {after:?}"
    );
    acked.extend(produce(&bootstrap, "during", 200));
    let status = status(&cluster.bootstrap(survivor)).expect("status");
    let dead = status
        .brokers
        .iter()
        .find(|b| b.broker_id == old_leader)
        .expect("the dead broker is listed");
    assert_eq!(dead.state, "fenced", "{status:?}");

    cluster.broker(old_leader).restart_same_ports();
    wait_for(&bootstrap, "the restarted broker back in the ISR", |d| {
        d.isr.len() == 3
    });
    acked.extend(produce(&bootstrap, "after", 100));
    let log = read_all(&cluster.bootstrap(old_leader));
    assert_all_kept(&log, &acked);
}

#[test]
fn a_stopped_leader_is_fenced_and_acknowledges_nothing_after_it_wakes() {
    let mut cluster = start();
    let bootstrap = cluster.bootstraps();
    let mut acked = produce(&bootstrap, "before", 100);
    let before = wait_for(&bootstrap, "a full ISR", |d| d.isr.len() == 3);
    let zombie = before.leader;
    cluster.broker(zombie).signal(libc::SIGSTOP);
    let survivor = (1..=3).find(|id| *id != zombie).expect("a survivor");
    let after = wait_for(&cluster.bootstrap(survivor), "a new leader", |d| {
        d.leader != zombie && d.leader != u32::MAX
    });
    acked.extend(produce(&cluster.bootstrap(survivor), "during", 100));
    cluster.broker(zombie).signal(libc::SIGCONT);

    // Straight to the zombie: it must refuse acks=all (its lease ended before it was fenced),
    // however many times it is asked while it catches up with the controller.
    let zombie_address = cluster.bootstrap(zombie);
    for attempt in 0..20 {
        let code = produce_raw(&zombie_address, &format!("zombie-{attempt}"));
        assert_ne!(
            code,
            ErrorCode::None,
            "the deposed leader acknowledged a write (attempt {attempt})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rejoined = wait_for(&bootstrap, "the zombie back in the ISR", |d| {
        d.isr.len() == 3 && d.leader_epoch >= after.leader_epoch
    });
    assert_ne!(rejoined.leader, u32::MAX);
    acked.extend(produce(&bootstrap, "after", 100));
    let log = read_all(&cluster.bootstrap(zombie));
    assert_all_kept(&log, &acked);
    assert!(
        !log.values().any(|v| v.starts_with("zombie-")),
        "a write the zombie was sent is in the log"
    );
}

/// One acks=all produce of a single record sent straight to `address` (whatever it leads);
/// the partition's answer code (`BrokerUnavailable` when nothing answered).
fn produce_raw(address: &str, value: &str) -> ErrorCode {
    let Ok(mut stream) = std::net::TcpStream::connect(address) else {
        return ErrorCode::BrokerUnavailable;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let payload = wire::batch(&[value.as_bytes()]);
    let frame = wire::produce_frame_with(1, TOPIC, 0, Acks::All, &payload);
    if std::io::Write::write_all(&mut stream, &frame).is_err() {
        return ErrorCode::BrokerUnavailable;
    }
    let Some(response) = wire::read_response(&mut stream) else {
        return ErrorCode::BrokerUnavailable;
    };
    if response.header.error() != ErrorCode::None {
        return response.header.error();
    }
    let answer: ProduceResponse = response.decode_body().expect("produce response");
    ErrorCode::from_u16(answer.partitions[0].error)
}

#[test]
fn controlled_shutdown_moves_leadership_before_the_broker_stops() {
    let mut cluster = start();
    let bootstrap = cluster.bootstraps();
    let mut acked = produce(&bootstrap, "before", 100);
    let before = wait_for(&bootstrap, "a full ISR", |d| d.isr.len() == 3);
    let leaving = before.leader;
    let code = cluster.broker(leaving).stop();
    assert_eq!(code, 0, "a clean stop");
    let log = cluster.broker(leaving).all_logs();
    assert!(
        log.contains("this broker leads nothing; stopping"),
        "the broker moved its leadership before stopping:\n{log}"
    );
    let survivor = (1..=3).find(|id| *id != leaving).expect("a survivor");
    let after = describe(&cluster.bootstrap(survivor)).expect("describe");
    assert_ne!(after.leader, leaving, "leadership moved: {after:?}");
    assert!(after.leader_epoch > before.leader_epoch);
    acked.extend(produce(&cluster.bootstrap(survivor), "during", 100));
    cluster.broker(leaving).restart_same_ports();
    wait_for(&bootstrap, "a full ISR again", |d| d.isr.len() == 3);
    let log = read_all(&bootstrap);
    assert_all_kept(&log, &acked);
}

#[test]
fn topics_are_created_and_deleted_through_the_controller_on_every_broker() {
    let cluster = start();
    // `start` waited until every broker knew the topic (a create is answered once the broker
    // that took it applied it; the others apply it at their next heartbeat).
    for id in 1..=3 {
        let d = describe(&cluster.bootstrap(id)).expect("every broker knows the topic");
        assert_eq!(d.replicas.len(), 3);
        assert_eq!(d.isr.len(), 3, "{d:?}");
    }
    let status = status(&cluster.bootstrap(2)).expect("status");
    assert_eq!(status.voters, vec![1, 2, 3]);
    assert!(status.controller_leader.is_some(), "{status:?}");
    assert_eq!(status.brokers.len(), 3);
    assert!(
        status.brokers.iter().all(|b| b.state == "alive"),
        "{status:?}"
    );

    let bootstrap = cluster.bootstrap(3);
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        let exists = client.create_topic(TOPIC, 1, 3, Vec::new()).await;
        assert!(
            matches!(
                exists,
                Err(ClientError::Server {
                    code: ErrorCode::TopicAlreadyExists,
                    ..
                })
            ),
            "{exists:?}"
        );
        let too_many = client.create_topic("wide", 1, 4, Vec::new()).await;
        assert!(
            matches!(
                too_many,
                Err(ClientError::Server {
                    code: ErrorCode::InvalidReplicationFactor,
                    ..
                })
            ),
            "{too_many:?}"
        );
        client.delete_topic(TOPIC).await.expect("delete");
    });
    for id in 1..=3 {
        let gone = (0..STATE_POLLS_MAX).any(|_| {
            let missing = describe(&cluster.bootstrap(id)).is_none();
            if !missing {
                std::thread::sleep(Duration::from_millis(100));
            }
            missing
        });
        assert!(gone, "broker {id} still serves the deleted topic");
    }
}

/// The controller's APIs are inter-broker APIs: refused on client listeners, refused without
/// the peer handshake, and garbage from an authenticated peer (undecodable Raft messages, a
/// command that is not JSON, a heartbeat in another broker's name) is answered with an error
/// and changes nothing: the cluster keeps its controller and its three brokers.
#[test]
fn controller_apis_are_internal_and_reject_garbage() {
    let cluster = start();
    let raft = ControllerRaftRequest {
        from: 2,
        messages: vec![vec![0xff; 64], Vec::new()],
    };
    let command = ControllerCommandRequest {
        command_json: b"{ not json".to_vec(),
    };
    let heartbeat = BrokerHeartbeatRequest {
        broker_id: 99,
        incarnation: 1,
        client_address: "127.0.0.1:1".to_string(),
        internal_address: "127.0.0.1:2".to_string(),
        applied_index: 0,
        shutting_down: false,
    };
    let frames = [
        wire::request(ApiKey::ControllerRaft, 1, &raft, &[]),
        wire::request(ApiKey::ControllerCommand, 2, &command, &[]),
        wire::request(ApiKey::BrokerHeartbeat, 3, &heartbeat, &[]),
    ];
    // Client listener: refused, whatever the body.
    let mut client = wire::connect_to(&cluster.bootstrap(1));
    for frame in &frames {
        let answer = wire::call(&mut client, frame).expect("answered");
        assert_eq!(answer.header.error(), ErrorCode::InternalApiRefused);
    }
    // Internal listener without the handshake: refused, connection closed.
    let mut unauthenticated = wire::connect_to(&cluster.internal(1));
    let answer = wire::call(&mut unauthenticated, &frames[0]).expect("answered");
    assert_eq!(answer.header.error(), ErrorCode::AuthenticationFailed);
    // An authenticated peer sending garbage: errors, no effect.
    let secret = ClusterSecret::load(&cluster.secret_path).expect("secret");
    for voter in 1..=3 {
        let mut peer =
            wire::peer_connect(&cluster.internal(voter), 2, &secret).expect("peer accepted");
        let answer = wire::call(&mut peer, &frames[0]).expect("raft answered");
        let body: ControllerRaftResponse = answer.decode_body().expect("raft body");
        assert_ne!(body.error, 0, "undecodable Raft messages are refused");
        let answer = wire::call(&mut peer, &frames[1]).expect("command answered");
        let body: ControllerCommandResponse = answer.decode_body().expect("command body");
        assert_ne!(body.error, 0, "a command that is not JSON is refused");
        // A heartbeat for another broker (99, unknown) from a peer authenticated as 2.
        let answer = wire::call(&mut peer, &frames[2]).expect("heartbeat answered");
        assert_eq!(
            answer.header.error(),
            ErrorCode::AuthenticationFailed,
            "{}",
            wire::error_message(&answer)
        );
    }
    let bootstrap = cluster.bootstraps();
    let acked = produce(&bootstrap, "after-garbage", 50);
    let status = status(&cluster.bootstrap(1)).expect("status");
    assert!(status.controller_leader.is_some(), "{status:?}");
    assert_eq!(
        status.brokers.len(),
        3,
        "no broker 99 registered: {status:?}"
    );
    let log = read_all(&bootstrap);
    assert_all_kept(&log, &acked);
}

#[test]
fn a_not_leader_refusal_names_the_leader_and_the_client_learns_only_newer_epochs() {
    let cluster = start();
    let bootstrap = cluster.bootstraps();
    let described = wait_for(&bootstrap, "a full ISR", |d| d.isr.len() == 3);
    let follower = (1..=3)
        .find(|id| *id != described.leader)
        .expect("a follower");
    // A produce sent to a follower: refused, and the refusal says where to go.
    let mut stream = wire::connect_to(&cluster.bootstrap(follower));
    let answer = wire::produce_with(
        &mut stream,
        1,
        TOPIC,
        0,
        Acks::All,
        &wire::batch(&[b"to a follower"]),
    );
    assert_eq!(ErrorCode::from_u16(answer.error), ErrorCode::NotLeader);
    assert_eq!(
        (answer.current_leader, answer.leader_epoch),
        (Some(described.leader), described.leader_epoch),
        "the refusal names the leader and its epoch: {answer:?}"
    );
    // The client takes a hint only when it is newer than its metadata and names a known
    // broker: an old or odd one cannot send it backwards.
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        client.metadata().await.expect("metadata");
        let epoch = described.leader_epoch;
        assert_eq!(
            client.cached_leader(TOPIC, 0),
            Some((described.leader, epoch))
        );
        assert!(
            !client.learn_leader(TOPIC, 0, follower, epoch),
            "same epoch"
        );
        assert!(
            !client.learn_leader(TOPIC, 0, 99, epoch + 1),
            "unknown broker"
        );
        assert!(
            !client.learn_leader("nope", 0, follower, epoch + 1),
            "unknown topic"
        );
        assert_eq!(
            client.cached_leader(TOPIC, 0),
            Some((described.leader, epoch))
        );
        assert!(client.learn_leader(TOPIC, 0, follower, epoch + 1), "newer");
        assert_eq!(client.cached_leader(TOPIC, 0), Some((follower, epoch + 1)));
        assert!(
            !client.learn_leader(TOPIC, 0, described.leader, epoch),
            "older"
        );
    });
}

#[test]
fn an_idempotent_retry_at_the_new_leader_is_not_written_twice() {
    let mut cluster = start();
    let bootstrap = cluster.bootstraps();
    let before = wait_for(&bootstrap, "a full ISR", |d| d.isr.len() == 3);
    let leader = before.leader;
    let producer = wire::init_producer_id(&cluster.bootstrap(leader));
    let batch = wire::idempotent_batch(producer, 0, 0, &[b"once", b"only"]);
    let mut stream = wire::connect_to(&cluster.bootstrap(leader));
    let first = wire::produce_with(&mut stream, 1, TOPIC, 0, Acks::All, &batch);
    assert_eq!(
        ErrorCode::from_u16(first.error),
        ErrorCode::None,
        "{first:?}"
    );
    // The leader dies before the producer saw that answer; it retries at the new leader,
    // which learned the producer's batches as a follower.
    cluster.broker(leader).kill9();
    let survivor = (1..=3).find(|id| *id != leader).expect("a survivor");
    let after = wait_for(&cluster.bootstrap(survivor), "a new leader", |d| {
        d.leader != leader && d.leader_epoch > before.leader_epoch
    });
    let mut stream = wire::connect_to(&cluster.bootstrap(after.leader));
    let retry = wire::produce_with(&mut stream, 2, TOPIC, 0, Acks::All, &batch);
    assert_eq!(
        ErrorCode::from_u16(retry.error),
        ErrorCode::None,
        "{retry:?}"
    );
    assert_eq!(
        (retry.base_offset, retry.last_offset),
        (first.base_offset, first.last_offset),
        "answered with the original offsets"
    );
    let log = read_all(&cluster.bootstrap(survivor));
    let copies = log.values().filter(|v| v.as_str() == "once").count();
    assert_eq!(copies, 1, "the batch is in the log once: {log:?}");
}

/// Applying the controller's records runs inside the broker's heartbeat loop: removing a
/// deleted topic's files there (seconds for gigabytes on a busy disk) stalled the heartbeats
/// past the session and the controller fenced every broker (CI 2026-12-05). With the removal
/// made as slow as that by a failpoint, deleting a topic fences nobody.
#[test]
fn a_slow_topic_file_removal_does_not_stall_heartbeats() {
    slow_metadata_work_does_not_stall_heartbeats("WHARF_FAILPOINT_TOPIC_REMOVE_DELAY_MS", "3000");
}

/// Opening a new topic's partitions and writing the metadata file ran inside the heartbeat
/// loop: on a saturated disk it outlasted the 600 ms session and every broker was fenced (CI
/// 2026-12-05). Every apply here takes 1.5 s; the heartbeats must go on meanwhile, and the
/// lease must follow once each apply is done (acks=all writes succeed).
#[test]
fn a_slow_metadata_apply_does_not_stall_heartbeats() {
    slow_metadata_work_does_not_stall_heartbeats("WHARF_FAILPOINT_METADATA_APPLY_DELAY_MS", "1500");
}

/// Creates, writes to and deletes a topic, then creates another, with `failpoint` slowing the
/// broker's side of it; no broker may be fenced (each step outlasts the session).
fn slow_metadata_work_does_not_stall_heartbeats(failpoint: &str, delay_ms: &str) {
    let cluster = Cluster::start_controlled_env(REPLICA_LAG_MAX_MS, &[(failpoint, delay_ms)]);
    let bootstrap = cluster.bootstraps();
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        client
            .create_topic("doomed", 3, 3, Vec::new())
            .await
            .expect("create");
    });
    // The create answers once the broker that took it applied it; the others follow within
    // their (slowed) apply.
    for id in 1..=3 {
        wait_for_partition(&cluster.bootstrap(id), "doomed", "the topic known", |_| {
            true
        });
    }
    // The leases were renewed after the apply: acks=all writes go through on every partition.
    let acked = produce_to(&bootstrap, "doomed", "slow", 30);
    assert_eq!(acked.len(), 30);
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        client.delete_topic("doomed").await.expect("delete");
        // Another topic with three replicas: every broker is still live.
        client
            .create_topic("after", 3, 3, Vec::new())
            .await
            .expect("create after the delete: no broker was fenced");
    });
    for broker in &cluster.brokers {
        let (_, metrics) = broker.http_get("/metrics").expect("metrics");
        let reregistrations = metrics
            .lines()
            .find(|l| l.starts_with("wharf_broker_reregistrations_total"))
            .unwrap_or_default();
        assert!(
            reregistrations.ends_with(" 0"),
            "a broker was fenced and registered again ({failpoint}): {reregistrations:?}"
        );
    }
    let status = status(&bootstrap).expect("status");
    assert!(
        status.brokers.iter().all(|b| b.state == "alive"),
        "{:?}",
        status.brokers
    );
}

/// An idempotent producer whose partition lost acknowledged batches (acks=leader, then the
/// leader died before its followers had them) must not stall: the new leader refuses the next
/// batch as out of sequence for ever (the batches it expects are gone), and the producer has to
/// start a new epoch (KIP-360). Before, it retried the refusal until the delivery timeout and
/// every record behind it waited (the CI cluster figures at 0 msgs/s, 2026-12-05).
#[test]
fn an_idempotent_producer_goes_on_after_a_failover_lost_its_acks_leader_batches() {
    let mut cluster = start();
    let bootstrap = cluster.bootstraps();
    produce(&bootstrap, "warm", 10);
    let before = wait_for(&bootstrap, "a full ISR", |d| d.isr.len() == 3);
    let leader = before.leader;
    let followers: Vec<u32> = (1..=3).filter(|id| *id != leader).collect();
    let (acked_before, acked_after) = run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        let producer = Producer::new(
            Rc::clone(&client),
            ProducerConfig {
                acks: Acks::Leader,
                linger_ms: 1,
                batch_bytes: 4 * 1024,
                delivery_timeout_ms: 30_000,
                request_timeout_ms: 5_000,
                ..ProducerConfig::default()
            },
        );
        let send_all = |prefix: &'static str| {
            let producer = &producer;
            async move {
                let mut deliveries = Vec::new();
                for i in 0..50 {
                    let value = format!("{prefix}-{i}");
                    let delivery = producer
                        .send(TOPIC, None, value.as_bytes())
                        .await
                        .expect("queued");
                    deliveries.push((value, delivery));
                }
                producer.flush().await;
                let mut acked = Vec::new();
                for (value, delivery) in deliveries {
                    let metadata = delivery
                        .await
                        .unwrap_or_else(|e| panic!("{value} was not acknowledged: {e}"));
                    acked.push((value, metadata.offset.expect("offset")));
                }
                acked
            }
        };
        let acked_before = send_all("before").await;
        // The followers stop; their parked fetches are answered (empty) within
        // `replica_fetch_wait_ms` (500 ms), so nothing written next can reach them.
        for id in &followers {
            cluster.broker(*id).signal(libc::SIGSTOP);
        }
        glommio::timer::sleep(Duration::from_millis(1_000)).await;
        send_all("lost").await;
        cluster.broker(leader).kill9();
        for id in &followers {
            cluster.broker(*id).signal(libc::SIGCONT);
        }
        // A follower leads now without the `lost` batches: this producer's next sequence is
        // beyond what it holds.
        let acked_after = send_all("after").await;
        producer.close().await;
        (acked_before, acked_after)
    });
    let log = read_all(&cluster.bootstrap(followers[0]));
    assert!(
        !log.values().any(|v| v.starts_with("lost-")),
        "the scenario needs the acks=leader batches lost with their leader; the new leader has \
         them, so nothing here tested the gap"
    );
    for (value, offset) in acked_before.iter().chain(&acked_after) {
        assert_eq!(log.get(offset), Some(value), "{value} at {offset}");
    }
    let after: Vec<&String> = log.values().filter(|v| v.starts_with("after-")).collect();
    let expected: Vec<String> = (0..50).map(|i| format!("after-{i}")).collect();
    assert_eq!(
        after,
        expected.iter().collect::<Vec<_>>(),
        "each record once, in order"
    );
}
