//! Hostile clients and operator mishaps against real `wharf serve` processes on 127.0.0.0/8.
//!
//! Each attack runs while a well-behaved client (`common::good_client`, connecting from
//! 127.0.0.2) keeps producing and reading back: its requests must keep being answered in time,
//! no shard may panic (the logs are scanned), and the data must stay as acknowledged.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::good_client::{create_topic, read_all, GoodClient};
use common::wire::{
    batch, call, connect_to, error_message, peer_connect, produce_frame, read_response, request,
};
use common::{Broker, Cluster};

/// Polls (every 100 ms) while waiting for a broker to reach a state.
const STATE_POLLS_MAX: usize = 300;
use wharf::peer_auth::ClusterSecret;
use wharf::protocol::*;

fn assert_no_panic(broker: &Broker) {
    let logs = broker.all_logs();
    assert!(!logs.contains("panicked"), "a shard panicked:\n{logs}");
}

fn send(stream: &mut TcpStream, frame: &[u8]) {
    stream.write_all(frame).expect("send");
}

fn describe(address: &str, topic: &str) -> TopicDescription {
    let mut stream = connect_to(address);
    let frame = call(
        &mut stream,
        &request(
            ApiKey::DescribeTopic,
            1,
            &DescribeTopicRequest {
                name: topic.to_string(),
            },
            &[],
        ),
    )
    .expect("describe answered");
    let response: DescribeTopicResponse = frame.decode_body().expect("describe body");
    response.topic.expect("topic described")
}

fn create(address: &str, topic: &str, partitions: u32, replication_factor: u16) -> TopicResult {
    create_with(address, topic, partitions, replication_factor, &[])
}

fn create_with(
    address: &str,
    topic: &str,
    partitions: u32,
    replication_factor: u16,
    configs: &[(&str, &str)],
) -> TopicResult {
    let mut stream = connect_to(address);
    let frame = call(
        &mut stream,
        &request(
            ApiKey::CreateTopic,
            1,
            &CreateTopicRequest {
                name: topic.to_string(),
                partitions,
                replication_factor,
                configs: configs
                    .iter()
                    .map(|(key, value)| ConfigEntry {
                        key: key.to_string(),
                        value: value.to_string(),
                    })
                    .collect(),
            },
            &[],
        ),
    )
    .expect("create answered");
    frame.decode_body().expect("create body")
}

fn produce_acks(
    stream: &mut TcpStream,
    topic: &str,
    acks: Acks,
    value: &[u8],
) -> ProducePartitionResponse {
    common::wire::produce_with(stream, 7, topic, 0, acks, &batch(&[value]))
}

/// A forged follower fetch claiming everything up to `offset` is durable on `replica`.
fn forged_fetch(topic: &TopicDescription, replica: u32, offset: u64) -> Vec<u8> {
    let partition = &topic.partitions[0];
    request(
        ApiKey::ReplicaFetch,
        31,
        &ReplicaFetchRequest {
            replica_id: replica,
            topic: topic.name.clone(),
            topic_id: topic.topic_id,
            partition: 0,
            leader_epoch: partition.leader_epoch,
            fetch_id: 1,
            fetch_offset: offset,
            last_fetched_epoch: Some(partition.leader_epoch),
            durable_offset: offset,
            high_watermark: 0,
            max_wait_ms: 0,
            max_bytes: 1024,
        },
        &[],
    )
}

fn apply_topic_with_17_replicas() -> Vec<u8> {
    request(
        ApiKey::ApplyTopic,
        41,
        &ApplyTopicRequest {
            name: "poison".to_string(),
            topic_id: 0xdead_beef,
            delete: false,
            replication_factor: 17,
            configs: Vec::new(),
            replicas: vec![(1..=17).collect()],
        },
        &[],
    )
}

/// Before: any client could send `ReplicaFetch` on the client port and move the high
/// watermark, complete acks=all with only the leader holding the data, keep a dead follower
/// in the ISR; and `ApplyTopic` with 17 replicas put a broker in a crash loop at every start.
#[test]
fn inter_broker_apis_are_refused_to_clients_and_to_peers_without_the_secret() {
    let mut cluster = Cluster::start(1_500);
    let result = create(&cluster.bootstrap(1), "t", 1, 3);
    assert_eq!(result.error, 0, "{}", result.message);
    let topic = describe(&cluster.bootstrap(1), "t");
    let leader = topic.partitions[0].leader;
    let followers: Vec<u32> = (1..=3).filter(|&b| b != leader).collect();
    let mut producer = connect_to(&cluster.bootstrap(leader));
    let first = produce_acks(&mut producer, "t", Acks::All, b"replicated");
    assert_eq!(first.error, 0, "{}", first.message);
    let topic = describe(&cluster.bootstrap(leader), "t");
    assert_eq!(topic.partitions[0].isr.len(), 3);

    for follower in &followers {
        cluster.broker(*follower).kill9();
    }
    // The leader appends (acks=leader) what no follower will ever copy.
    let alone = produce_acks(&mut producer, "t", Acks::Leader, b"only on the leader");
    assert_eq!(alone.error, 0, "{}", alone.message);
    let end = alone.last_offset + 1;

    // 1. On the client listener every inter-broker API is refused with a clear code.
    let mut client = connect_to(&cluster.bootstrap(leader));
    for frame in [
        forged_fetch(&topic, followers[0], end),
        apply_topic_with_17_replicas(),
    ] {
        let answer = call(&mut client, &frame).expect("answered");
        assert_eq!(
            answer.header.error(),
            ErrorCode::InternalApiRefused,
            "{}",
            error_message(&answer)
        );
        assert!(
            error_message(&answer).contains("internal listener"),
            "{}",
            error_message(&answer)
        );
    }
    // 2. On the internal listener without the handshake: refused, and the connection closed.
    let internal = cluster.internal(leader);
    let mut unauthenticated = connect_to(&internal);
    let answer = call(
        &mut unauthenticated,
        &forged_fetch(&topic, followers[0], end),
    )
    .expect("answered");
    assert_eq!(answer.header.error(), ErrorCode::AuthenticationFailed);
    assert!(
        read_response(&mut unauthenticated).is_none(),
        "connection closed"
    );
    // 3. With a wrong secret: refused.
    let wrong = ClusterSecret::new(b"not the cluster's secret at all").expect("secret");
    assert!(peer_connect(&internal, followers[0], &wrong).is_none());
    // 4. A real peer may fetch only as itself.
    let secret = ClusterSecret::load(&cluster.secret_path).expect("secret");
    let mut peer =
        peer_connect(&internal, followers[1], &secret).expect("a peer with the secret is accepted");
    let answer = call(&mut peer, &forged_fetch(&topic, followers[0], end)).expect("answered");
    assert_eq!(
        answer.header.error(),
        ErrorCode::AuthenticationFailed,
        "{}",
        error_message(&answer)
    );

    // Keep forging (client port) past the ISR lag limit: the dead followers still leave the
    // ISR, the high watermark never covers what only the leader holds, acks=all is refused.
    // Forge every 100 ms until the ISR shrinks (bounded: the lag limit is 1.5 s).
    for _ in 0..STATE_POLLS_MAX {
        let answer = call(&mut client, &forged_fetch(&topic, followers[0], end)).expect("answered");
        assert_eq!(answer.header.error(), ErrorCode::InternalApiRefused);
        if describe(&cluster.bootstrap(leader), "t").partitions[0]
            .isr
            .len()
            == 1
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = describe(&cluster.bootstrap(leader), "t");
    assert_eq!(
        after.partitions[0].isr,
        vec![leader],
        "dead followers left the ISR"
    );
    assert!(
        after.partitions[0].high_watermark < end,
        "HW did not cover the leader-only record"
    );
    // Metadata reports the live epoch and ISR (it used to report epoch 0 and every replica).
    let answer = call(
        &mut client,
        &request(
            ApiKey::Metadata,
            8,
            &MetadataRequest {
                topics: Some(vec!["t".to_string()]),
            },
            &[],
        ),
    )
    .expect("metadata answered");
    let metadata: MetadataResponse = answer.decode_body().expect("metadata body");
    let live = &metadata.topics[0].partitions[0];
    assert_eq!(live.isr, vec![leader], "metadata ISR");
    assert_eq!(live.leader_epoch, after.partitions[0].leader_epoch);
    assert!(live.leader_epoch >= 1, "a leader's epoch starts at 1");
    let refused = produce_acks(&mut producer, "t", Acks::All, b"needs two replicas");
    assert_eq!(
        ErrorCode::from_u16(refused.error),
        ErrorCode::NotEnoughReplicas,
        "{}",
        refused.message
    );

    // 5. A peer (even one with the secret) cannot install an assignment nobody can open; the
    // broker restarts cleanly afterwards (before: a crash loop at every start).
    let answer = call(&mut peer, &apply_topic_with_17_replicas()).expect("answered");
    let result: TopicResult = answer.decode_body().expect("apply body");
    assert_eq!(
        ErrorCode::from_u16(result.error),
        ErrorCode::InvalidReplicationFactor,
        "{}",
        result.message
    );
    let leader_broker = cluster.broker(leader);
    assert_eq!(leader_broker.stop(), 0);
    leader_broker.restart_same_ports();
    assert_no_panic(cluster.broker(leader));
    assert!(cluster
        .broker(leader)
        .all_logs()
        .contains("refused a request from an unauthenticated peer"));
}

/// A frame header announcing 64 MiB on each of 2,000 connections: before, each one
/// allocated (and zero-filled) its whole frame before a byte of the body arrived.
#[test]
fn many_connections_announcing_huge_frames_cannot_exhaust_memory() {
    const ATTACKERS: usize = 2_000;
    const BUDGET_BYTES: u64 = 128 * 1024 * 1024;
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(
        dir.path(),
        1,
        &format!("request_bytes_max_per_shard = {BUDGET_BYTES}\nconnections_per_address_max = 4096\nrequest_read_timeout_ms = 60000"),
    );
    create_topic(&broker.bootstrap(), "good");
    let baseline = broker.rss_bytes().expect("rss");
    let good = GoodClient::start(&broker.bootstrap(), "good");
    // One real 64 MiB produce frame; each attacker sends only its header and a few bytes.
    let big = vec![0u8; 64 * 1024 * 1024 - 4096];
    let frame = produce_frame(1, "good", 0, &big);
    let mut attackers = Vec::with_capacity(ATTACKERS);
    for _ in 0..ATTACKERS {
        let mut stream = connect_to(&broker.bootstrap());
        stream
            .write_all(&frame[..FRAME_HEADER_BYTES + 64])
            .expect("send header");
        attackers.push(stream);
    }
    // Measure once the broker holds every attacker's connection (and so has read its header).
    let holding = format!("wharf_connections{{shard=\"0\"}} {}", ATTACKERS + 1);
    let held = (0..STATE_POLLS_MAX).any(|_| {
        let found = broker
            .http_get("/metrics")
            .is_some_and(|(_, metrics)| metrics.contains(&holding));
        if !found {
            std::thread::sleep(Duration::from_millis(100));
        }
        found
    });
    assert!(
        held,
        "the broker never held all {ATTACKERS} attackers' connections"
    );
    good.serve_more(300);
    let rss = broker.rss_bytes().expect("rss");
    // Whole-frame reservations take at most half the budget; the rest is held byte for byte
    // as it arrives; buffers may be up to twice what they hold.
    let bound = baseline + 2 * BUDGET_BYTES + 64 * 1024 * 1024;
    println!("rss: baseline {baseline} B, with {ATTACKERS} attackers {rss} B, bound {bound} B");
    assert!(rss < bound, "broker RSS {rss} B over {bound} B");
    let (_, metrics) = broker.http_get("/metrics").expect("metrics");
    let used: f64 = metrics
        .lines()
        .find(|l| l.starts_with("wharf_request_budget_used_bytes{"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("budget gauge");
    println!("request budget in use: {used} B of {BUDGET_BYTES} B");
    assert!(used <= BUDGET_BYTES as f64);
    let report = good.finish();
    report.assert_served("huge frame announcements");
    drop(attackers);
    assert_eq!(
        read_all(&broker.bootstrap(), "good"),
        report.acknowledged,
        "data unchanged"
    );
    assert_no_panic(&broker);
}

/// Connection limits: per source address, and slots kept for the internal listener.
#[test]
fn connection_limits_close_extra_connections_at_once_and_keep_slots_for_peers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_path = common::write_secret(dir.path(), "a single broker's cluster secret");
    let mut broker = Broker::prepare(dir.path(), 1, "");
    let internal = format!("127.0.0.1:{}", broker.internal_port);
    broker.set_extra_config(format!(
        "connections_per_shard_max = 40\nconnections_reserved_internal = 10\nconnections_per_address_max = 20\n[cluster]\ninternal_listen = {internal:?}\nsecret_file = {:?}\n[[cluster.brokers]]\nid = 1\naddress = \"127.0.0.1:{}\"\ninternal_address = {internal:?}\n",
        secret_path.display().to_string(),
        broker.port,
    ));
    broker.launch();
    create_topic(&broker.bootstrap(), "good");
    let good = GoodClient::start(&broker.bootstrap(), "good"); // from 127.0.0.2: one slot
    let versions = request(
        ApiKey::Versions,
        5,
        &VersionsRequest {
            client_name: "probe".to_string(),
        },
        &[],
    );
    let open_from = |source: u8, count: usize| -> Vec<Option<TcpStream>> {
        (0..count)
            .map(|_| {
                let mut stream = common::wire::connect_from(
                    &broker.bootstrap(),
                    std::net::Ipv4Addr::new(127, 0, 0, source),
                )
                .ok()?;
                call(&mut stream, &versions).map(|_| stream)
            })
            .collect()
    };
    // 20 from 127.0.0.1 are served; the 21st is closed at once.
    let first = open_from(1, 21);
    assert!(
        first[..20].iter().all(Option::is_some),
        "20 connections per address are served"
    );
    assert!(first[20].is_none(), "the 21st from one address is closed");
    // Other addresses fill the shard up to 40 - 10 reserved: 20 + 1 (good) + 9 = 30.
    let more = open_from(3, 9);
    assert!(more.iter().all(Option::is_some));
    assert!(open_from(4, 1)[0].is_none(), "client slots are full");
    // A peer still gets in (reserved slot) and authenticates.
    let secret = ClusterSecret::load(&secret_path).expect("secret");
    assert!(
        peer_connect(&internal, 1, &secret).is_some(),
        "internal slots are kept for peers"
    );
    let report = good.finish();
    report.assert_served("connection limits");
    let (_, metrics) = broker.http_get("/metrics").expect("metrics");
    assert!(
        metrics.contains("wharf_connections_refused_total{shard=\"0\"} 2"),
        "{metrics}"
    );
    assert!(broker
        .log()
        .contains("connection limit per address reached"));
    assert_no_panic(&broker);
}

/// Before: a fetch whose `min_bytes` exceeded the data available spun (`wait_partition`
/// returned at once while the high watermark was past the fetch offset, and memory reads
/// never yield), so the shard served nothing else until `max_wait`.
#[test]
fn a_fetch_waiting_for_more_bytes_than_exist_does_not_spin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), 1, "");
    create_topic(&broker.bootstrap(), "good");
    create_topic(&broker.bootstrap(), "some");
    let mut stream = connect_to(&broker.bootstrap());
    let mut stream_produce = connect_to(&broker.bootstrap());
    produce_acks(&mut stream_produce, "some", Acks::Leader, b"a little data");
    let good = GoodClient::start(&broker.bootstrap(), "good");
    let cpu_before = process_cpu_ms(broker.pid().expect("pid"));
    let started = Instant::now();
    let fetch = request(
        ApiKey::Fetch,
        9,
        &FetchRequest {
            max_wait_ms: 3_000,
            min_bytes: 1024 * 1024,
            max_bytes: 4 * 1024 * 1024,
            partitions: vec![FetchPartition {
                topic: "some".to_string(),
                partition: 0,
                fetch_offset: 0,
                max_bytes: 4 * 1024 * 1024,
                leader_epoch: None,
                read_replica: None,
                avoid_replicas: Vec::new(),
            }],
            reader_id: String::new(),
            rack: String::new(),
        },
        &[],
    );
    let answer = call(&mut stream, &fetch).expect("fetch answered");
    let waited = started.elapsed();
    let cpu_ms = process_cpu_ms(broker.pid().expect("pid")) - cpu_before;
    assert_eq!(answer.header.error(), ErrorCode::None);
    let response: FetchResponse = answer.decode_body().expect("fetch body");
    assert!(
        response.partitions[0].batch_bytes > 0,
        "the data there is returned at max_wait"
    );
    assert!(
        waited >= Duration::from_millis(2_900),
        "answered after max_wait, not at once ({waited:?})"
    );
    // A spinning shard burns a whole core for the 3 s; a waiting one almost nothing (the good
    // client's requests included).
    println!("broker CPU during the 3 s wait: {cpu_ms} ms");
    assert!(
        cpu_ms < 1_500,
        "the broker burned {cpu_ms} ms of CPU while the fetch waited"
    );
    let report = good.finish();
    report.assert_served("min_bytes fetch");
    assert_no_panic(&broker);
}

/// User plus system CPU time of a process, in milliseconds.
fn process_cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_name = stat.rsplit_once(')').expect("stat format").1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat(5) (utime, stime), counted after the name's closing paren.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    ticks * 1000 / per_second.max(1)
}

/// Before: a panicking shard left the process up with a dead shard.
#[test]
fn a_shard_panic_stops_the_broker_with_a_failure_exit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::prepare(dir.path(), 2, "");
    broker.env.push((
        "WHARF_FAILPOINT_SHARD_PANIC_MS".to_string(),
        "1500".to_string(),
    ));
    broker.launch();
    let code = broker
        .wait_exit(Duration::from_secs(20))
        .expect("the broker exits after the panic");
    assert_eq!(code, wharf::server::EXIT_SHARD_PANIC, "{}", broker.log());
    assert!(
        broker.log().contains("shard panicked; stopping the broker"),
        "{}",
        broker.log()
    );
}

/// Before: restarting at once after `kill -9` failed with "another process already listens
/// there" (the dead broker's listener lingers during its io_uring teardown). 50 cycles under
/// load, each serving again, nothing acknowledged lost.
#[test]
fn kill9_then_immediate_restart_50_times_under_load_loses_nothing() {
    const CYCLES: usize = 50;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(dir.path(), 1, "");
    let created = create(&broker.bootstrap(), "t", 1, 1);
    assert_eq!(created.error, 0, "{}", created.message);
    let mut acknowledged: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut next = 0u64;
    for cycle in 0..CYCLES {
        // Load: produce (acks=leader, fsync before the ack) until killed mid-stream.
        let mut stream = connect_to(&broker.bootstrap());
        let mut pipelined = Vec::new();
        for i in 0..20 {
            let value = format!("c{cycle}-r{next}").into_bytes();
            next += 1;
            send(&mut stream, &produce_frame(i, "t", 0, &batch(&[&value])));
            pipelined.push(value);
        }
        // Half are answered (acknowledged) before the kill; the rest race it.
        for value in pipelined.drain(..10) {
            let frame = read_response(&mut stream).expect("answered");
            let response: ProduceResponse = frame.decode_body().expect("body");
            let p = &response.partitions[0];
            assert_eq!(p.error, 0, "{}", p.message);
            acknowledged.push((p.base_offset, value));
        }
        broker.kill9();
        broker.restart_same_ports(); // waits until /readyz answers 200
        assert_eq!(
            broker.http_get("/readyz").map(|(code, _)| code),
            Some(200),
            "cycle {cycle}"
        );
    }
    let all = read_all(&broker.bootstrap(), "t");
    for (offset, value) in &acknowledged {
        assert_eq!(
            all.iter().find(|(o, _)| o == offset).map(|(_, v)| v),
            Some(value),
            "acknowledged record at offset {offset} lost"
        );
    }
    let offsets: Vec<u64> = all.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        offsets,
        (0..all.len() as u64).collect::<Vec<_>>(),
        "dense offsets"
    );
    let waits = broker
        .all_logs()
        .matches("a listener still answers on this port")
        .count();
    println!(
        "{CYCLES} kill -9 / restart cycles: {} acknowledged, {} kept; {waits} restarts waited \
         for the dead broker's port",
        acknowledged.len(),
        all.len()
    );
    assert_no_panic(&broker);
}

/// The disk-space guard on a small loop-mounted ext4 filesystem the test makes and removes.
/// Needs root (mount); without it the test fails saying so.
#[test]
fn a_nearly_full_disk_refuses_produce_with_disk_full_and_keeps_serving_reads() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root to loop-mount a small filesystem (run the suite as root)");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mount = LoopMount::new(dir.path(), 96);
    let broker_dir = mount.path.join("broker");
    std::fs::create_dir_all(&broker_dir).expect("broker dir");
    let broker = Broker::start(&broker_dir, 1, "disk_free_bytes_min = 8388608\n");
    // Segments preallocated at 48 MiB: the second preallocation asks for more than
    // is left (before: fallocate failed with ENOSPC and poisoned the log).
    let created = create_with(
        &broker.bootstrap(),
        "t",
        1,
        1,
        &[("segment_bytes", "50331648"), ("preallocate", "true")],
    );
    assert_eq!(created.error, 0, "{}", created.message);
    let mut stream = connect_to(&broker.bootstrap());
    let value = vec![b'x'; 512 * 1024];
    let mut acknowledged = 0usize;
    let mut refused = None;
    for i in 0..400u32 {
        let answer =
            call(&mut stream, &produce_frame(i, "t", 0, &batch(&[&value]))).expect("answered");
        if answer.header.error() != ErrorCode::None {
            refused = Some((answer.header.error(), error_message(&answer)));
            break;
        }
        let response: ProduceResponse = answer.decode_body().expect("body");
        assert_eq!(
            response.partitions[0].error, 0,
            "{}",
            response.partitions[0].message
        );
        acknowledged += 1;
        // The guard is checked every 250 ms: give it the time a real producer would take.
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, message) = refused.expect("produce was refused before the disk filled up");
    assert_eq!(code, ErrorCode::DiskFull, "{message}");
    assert!(message.contains("disk_free_bytes_min"), "{message}");
    assert!(
        acknowledged > 10,
        "the guard let {acknowledged} batches in first"
    );
    // Reads go on, and every acknowledged record is there; nothing poisoned the log.
    let all = read_all(&broker.bootstrap(), "t");
    assert_eq!(all.len(), acknowledged);
    let (_, metrics) = broker.http_get("/metrics").expect("metrics");
    assert!(
        metrics.contains("wharf_disk_full{shard=\"0\"} 1"),
        "{metrics}"
    );
    let log = broker.log();
    assert!(
        !log.contains("poison") && !log.contains("storage_error"),
        "{log}"
    );
    assert!(log.contains("not preallocating a segment"), "{log}");
    assert_no_panic(&broker);
    drop(broker);
}

/// A loop-mounted ext4 filesystem of `mib` MiB, unmounted and removed on drop.
struct LoopMount {
    path: std::path::PathBuf,
}

impl LoopMount {
    fn new(dir: &std::path::Path, mib: u64) -> LoopMount {
        let image = dir.join("fs.img");
        let path = dir.join("mnt");
        std::fs::create_dir_all(&path).expect("mount point");
        let file = std::fs::File::create(&image).expect("image");
        file.set_len(mib * 1024 * 1024).expect("size image");
        let run = |program: &str, args: &[&str]| {
            let status = std::process::Command::new(program).args(args).status();
            assert!(
                status.as_ref().is_ok_and(|s| s.success()),
                "{program} {args:?} failed ({status:?}): the disk-full test needs mkfs.ext4 and loop mounts"
            );
        };
        let image_text = image.display().to_string();
        let path_text = path.display().to_string();
        run("mkfs.ext4", &["-q", "-F", &image_text]);
        run("mount", &["-o", "loop", &image_text, &path_text]);
        LoopMount { path }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}

/// A topic stored before assignments were checked (or written by hand) whose replica set no
/// replica can use: before, opening it failed the start-up (first a panic, then an error), so
/// the broker was down at every start. Now that partition answers `storage_error` and the
/// others are served.
#[test]
fn a_stored_partition_that_cannot_open_does_not_keep_the_broker_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(dir.path(), 1, "");
    for topic in ["good", "poisoned"] {
        let created = create(&broker.bootstrap(), topic, 1, 1);
        assert_eq!(created.error, 0, "{}", created.message);
    }
    assert_eq!(broker.stop(), 0);
    let path = dir.path().join("data").join("metadata.json");
    let mut stored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("metadata")).expect("json");
    stored["topics"]["poisoned"]["partitions"][0]["replicas"] = (1..=17).collect();
    std::fs::write(&path, serde_json::to_string_pretty(&stored).expect("json")).expect("write");
    broker.restart();
    let mut stream = connect_to(&broker.bootstrap());
    let served = produce_acks(&mut stream, "good", Acks::Leader, b"still served");
    assert_eq!(served.error, 0, "{}", served.message);
    let refused = produce_acks(&mut stream, "poisoned", Acks::Leader, b"cannot open");
    assert_eq!(
        ErrorCode::from_u16(refused.error),
        ErrorCode::StorageError,
        "{}",
        refused.message
    );
    assert!(
        refused.message.contains("could not be opened"),
        "{}",
        refused.message
    );
    assert!(broker.log().contains("cannot open this partition"));
    assert_no_panic(&broker);
}

/// Topic and partition caps: creation beyond them is refused with `limit_reached` and
/// creates nothing; what exists keeps working.
#[test]
fn topic_and_partition_caps_refuse_creation_beyond_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), 1, "topics_max = 3\npartitions_max = 6\n");
    for (topic, partitions) in [("a", 2), ("b", 2)] {
        let created = create(&broker.bootstrap(), topic, partitions, 1);
        assert_eq!(created.error, 0, "{}", created.message);
    }
    let too_many_partitions = create(&broker.bootstrap(), "c", 3, 1);
    assert_eq!(
        ErrorCode::from_u16(too_many_partitions.error),
        ErrorCode::LimitReached,
        "{}",
        too_many_partitions.message
    );
    assert!(too_many_partitions.message.contains("partitions_max"));
    let created = create(&broker.bootstrap(), "c", 2, 1);
    assert_eq!(created.error, 0, "{}", created.message);
    let too_many_topics = create(&broker.bootstrap(), "d", 1, 1);
    assert_eq!(
        ErrorCode::from_u16(too_many_topics.error),
        ErrorCode::LimitReached,
        "{}",
        too_many_topics.message
    );
    assert!(too_many_topics.message.contains("topics_max"));
    let mut stream = connect_to(&broker.bootstrap());
    let frame = call(
        &mut stream,
        &request(ApiKey::Metadata, 3, &MetadataRequest { topics: None }, &[]),
    )
    .expect("metadata");
    let metadata: MetadataResponse = frame.decode_body().expect("metadata body");
    let mut names: Vec<&str> = metadata.topics.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["a", "b", "c"], "the refused creations left nothing");
    let served = produce_acks(&mut stream, "c", Acks::Leader, b"still served");
    assert_eq!(served.error, 0, "{}", served.message);
    assert_no_panic(&broker);
}
