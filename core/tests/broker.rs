//! End-to-end: a real `wharf serve` process, the Rust client and the CLI.

mod common;

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::{run, Broker};
use wharf::client::consumer::{Consumer, ConsumerConfig, SeekTo};
use wharf::client::producer::{Partitioner, Producer, ProducerConfig};
use wharf::client::{Client, ClientConfig};
use wharf::protocol::Acks;

const PARTITIONS: u32 = 4;

type Log = BTreeMap<u32, Vec<(u64, Vec<u8>)>>;

fn client_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new(bootstrap);
    config.request_timeout_ms = 10_000;
    config
}

/// Produces `count` keyed records starting at `first`; returns where each landed.
async fn produce(client: &Rc<Client>, topic: &str, first: u64, count: u64) -> Log {
    let producer = Producer::new(
        Rc::clone(client),
        ProducerConfig {
            acks: Acks::All,
            linger_ms: 2,
            batch_bytes: 16 * 1024,
            partitioner: Partitioner::KeyHash,
            delivery_timeout_ms: 20_000,
            ..ProducerConfig::default()
        },
    );
    let mut deliveries = Vec::new();
    for i in first..first + count {
        let key = format!("key-{}", i % 97);
        let value = format!("record-{i}").into_bytes();
        let delivery = producer
            .send(topic, Some(key.as_bytes()), &value)
            .await
            .expect("queued");
        deliveries.push((value, delivery));
    }
    producer.flush().await;
    let mut log = Log::new();
    for (value, delivery) in deliveries {
        let metadata = delivery.await.expect("acknowledged");
        let offset = metadata.offset.expect("acks=all reports the offset");
        log.entry(metadata.partition)
            .or_default()
            .push((offset, value));
    }
    for records in log.values_mut() {
        records.sort();
    }
    producer.close().await;
    log
}

/// Reads every partition from the earliest offset until caught up.
async fn consume_all(client: &Rc<Client>, topic: &str) -> Log {
    let mut consumer = Consumer::new(
        Rc::clone(client),
        topic,
        ConsumerConfig {
            max_wait_ms: 100,
            ..ConsumerConfig::default()
        },
    );
    consumer
        .assign(None, SeekTo::Earliest)
        .await
        .expect("assign");
    let mut log = Log::new();
    for _ in 0..10_000 {
        let records = consumer.poll().await.expect("poll");
        records
            .for_each(|r| {
                log.entry(r.partition)
                    .or_default()
                    .push((r.offset, r.value.to_vec()))
            })
            .expect("valid records");
        if consumer.caught_up() {
            return log;
        }
    }
    panic!("consumer never caught up");
}

fn assert_dense_and_equal(produced: &Log, consumed: &Log) {
    for (partition, records) in consumed {
        for (i, (offset, _)) in records.iter().enumerate() {
            assert_eq!(
                *offset, i as u64,
                "partition {partition}: offsets are dense from 0"
            );
        }
    }
    assert_eq!(produced, consumed, "consumed exactly what was acknowledged");
}

#[test]
fn produce_consume_across_shards_survives_graceful_and_kill9_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(dir.path(), 2, "");
    let bootstrap = broker.bootstrap();
    let produced = run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        client
            .create_topic("orders", PARTITIONS, 1, Vec::new())
            .await
            .expect("create");
        let metadata = client.refresh_metadata().await.expect("metadata");
        let shards: std::collections::BTreeSet<u32> = metadata.topics[0]
            .partitions
            .iter()
            .map(|p| p.shard)
            .collect();
        assert_eq!(shards.len(), 2, "partitions spread over both shards");
        let produced = produce(&client, "orders", 0, 3000).await;
        assert_eq!(produced.len(), PARTITIONS as usize);
        assert_dense_and_equal(&produced, &consume_all(&client, "orders").await);
        produced
    });

    assert_eq!(broker.stop(), 0, "graceful stop exits 0:\n{}", broker.log());
    broker.restart();
    let bootstrap = broker.bootstrap();
    let produced = run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        assert_dense_and_equal(&produced, &consume_all(&client, "orders").await);
        // Offsets continue after a restart; nothing is reused.
        let mut more = produce(&client, "orders", 3000, 500).await;
        let mut all = produced.clone();
        for (partition, records) in more.iter_mut() {
            all.entry(*partition).or_default().append(records);
        }
        assert_dense_and_equal(&all, &consume_all(&client, "orders").await);
        all
    });

    broker.kill9();
    broker.restart();
    let bootstrap = broker.bootstrap();
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        assert_dense_and_equal(&produced, &consume_all(&client, "orders").await);
        let description = client.describe_topic("orders").await.expect("describe");
        let total: u64 = description
            .partitions
            .iter()
            .map(|p| p.high_watermark)
            .sum();
        assert_eq!(total, 3500);
    });
    // SIGINT is a graceful stop too.
    assert_eq!(broker.stop_with(libc::SIGINT), 0, "{}", broker.log());
    assert!(
        broker.log().contains("wharf stopped cleanly"),
        "{}",
        broker.log()
    );
}

#[test]
fn requests_for_another_shards_partitions_are_forwarded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), 2, "");
    let bootstrap = broker.bootstrap();
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        client
            .create_topic("hop", 4, 1, Vec::new())
            .await
            .expect("create");
        let metadata = client.refresh_metadata().await.expect("metadata");
        // Talk only to shard 0's direct port, never to the owner of shard-1 partitions.
        let shard0 = metadata.brokers[0]
            .shards
            .iter()
            .find(|s| s.shard == 0)
            .expect("shard 0 address");
        let mut config = client_config(&format!("{}:{}", shard0.host, shard0.port));
        config.shard_aware = false;
        let forwarded = Client::connect(config).await.expect("connect shard 0");
        let remote: Vec<u32> = metadata.topics[0]
            .partitions
            .iter()
            .filter(|p| p.shard == 1)
            .map(|p| p.partition)
            .collect();
        assert!(!remote.is_empty());
        let producer = Producer::new(Rc::clone(&forwarded), ProducerConfig::default());
        let mut deliveries = Vec::new();
        for i in 0..100u32 {
            let partition = remote[i as usize % remote.len()];
            deliveries.push(
                producer
                    .send_to("hop", Some(partition), None, format!("v{i}").as_bytes())
                    .await
                    .expect("queued"),
            );
        }
        producer.flush().await;
        for delivery in deliveries {
            delivery
                .await
                .expect("acknowledged through the forwarding shard");
        }
        let consumed = consume_all(&forwarded, "hop").await;
        let count: usize = consumed.values().map(Vec::len).sum();
        assert_eq!(count, 100);
        for partition in consumed.keys() {
            assert!(remote.contains(partition));
        }
    });
}

#[test]
fn long_poll_fetch_wakes_when_data_arrives() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), 2, "");
    let bootstrap = broker.bootstrap();
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        client
            .create_topic("poll", 1, 1, Vec::new())
            .await
            .expect("create");
        // Far longer than the wake-up may take: a poll that waits it out failed.
        let mut consumer = latest_consumer(&client, "poll", 30_000).await;
        let producing = Rc::clone(&client);
        let admin_port = broker.admin_port;
        let producer_task = glommio::spawn_local(async move {
            // Produce only once the broker holds the consumer's fetch: the record must wake it.
            wait_for_metric(admin_port, PARKED, 1.0).await;
            let producer = Producer::new(producing, ProducerConfig::default());
            let delivery = producer
                .send("poll", None, b"wake up")
                .await
                .expect("queued");
            producer.flush().await;
            delivery.await.expect("acknowledged")
        });
        let started = Instant::now();
        let records = consumer.poll().await.expect("poll");
        let waited = started.elapsed();
        let mut values = Vec::new();
        records
            .for_each(|r| values.push(r.value.to_vec()))
            .expect("records");
        assert_eq!(values, vec![b"wake up".to_vec()]);
        assert!(
            waited < Duration::from_secs(15),
            "the long poll returned only after {waited:?}"
        );
        producer_task.await;
        // Long polls that time out on an idle partition are not left counted (nor held).
        let mut idle = latest_consumer(&client, "poll", 20).await;
        for _ in 0..10 {
            let records = idle.poll().await.expect("poll");
            let mut count = 0;
            records.for_each(|_| count += 1).expect("records");
            assert_eq!(count, 0, "nothing new was produced");
        }
        wait_for_metric(broker.admin_port, PARKED, 0.0).await;
    });
}

/// A consumer of every partition of `topic` from its end, long-polling up to `max_wait_ms`.
async fn latest_consumer(client: &Rc<Client>, topic: &str, max_wait_ms: u32) -> Consumer {
    let mut consumer = Consumer::new(
        Rc::clone(client),
        topic,
        ConsumerConfig {
            max_wait_ms,
            ..ConsumerConfig::default()
        },
    );
    consumer.assign(None, SeekTo::Latest).await.expect("assign");
    consumer
}

const PARKED: &str = "wharf_partition_fetches_waiting{topic=\"poll\",partition=\"0\"}";

/// Waits (bounded: 10 s) until the broker's metric `series` reads `value`.
async fn wait_for_metric(admin_port: u16, series: &str, value: f64) {
    let read = || {
        let (_, text) = common::http_get(admin_port, "/metrics")?;
        text.lines()
            .find_map(|line| line.strip_prefix(series))
            .and_then(|rest| rest.trim().parse::<f64>().ok())
    };
    for _ in 0..1000 {
        if read() == Some(value) {
            return;
        }
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    panic!("{series} is {:?} after 10 s, expected {value}", read());
}

#[test]
fn admin_endpoint_serves_metrics_and_health() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), 2, "");
    let bootstrap = broker.bootstrap();
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        client
            .create_topic("m", 2, 1, Vec::new())
            .await
            .expect("create");
        produce(&client, "m", 0, 10).await;
    });
    assert_eq!(broker.http_get("/livez").map(|r| r.0), Some(200));
    assert_eq!(broker.http_get("/readyz").map(|r| r.0), Some(200));
    assert_eq!(broker.http_get("/nope").map(|r| r.0), Some(404));
    let (status, metrics) = broker.http_get("/metrics").expect("metrics");
    assert_eq!(status, 200);
    for needle in [
        "wharf_partition_end_offset{topic=\"m\",partition=\"0\"}",
        "wharf_requests_total{shard=",
        "wharf_request_latency_seconds_bucket",
        "wharf_task_queue_runtime_seconds_total",
        "wharf_flush_latency_seconds_count",
    ] {
        assert!(
            metrics.contains(needle),
            "metrics lack {needle}:\n{metrics}"
        );
    }
    let end_offsets: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("wharf_partition_end_offset{topic=\"m\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(end_offsets, 10);
}

#[test]
fn cli_creates_produces_and_consumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), 2, "");
    let bootstrap = broker.bootstrap();
    let cli = |args: &[&str], stdin: &str| common::cli(&bootstrap, args, stdin);
    let (code, _, err) = cli(&["topic", "create", "lines", "--partitions", "3"], "");
    assert_eq!(code, Some(0), "{err}");
    let (code, out, _) = cli(&["topic", "list"], "");
    assert_eq!(code, Some(0));
    assert!(out.contains("lines"), "{out}");
    let input: String = (0..50).map(|i| format!("k{}:line {i}\n", i % 5)).collect();
    let (code, _, err) = cli(&["produce", "lines", "--key-separator", ":"], &input);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("50 records acknowledged"), "{err}");
    let (code, out, err) = cli(&["consume", "lines", "--format", "json"], "");
    assert_eq!(code, Some(0), "{err}");
    let mut per_key: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for line in out.lines() {
        let record: serde_json::Value = serde_json::from_str(line).expect("json line");
        let key = record["key"].as_str().expect("key").to_string();
        let value = record["value"].as_str().expect("value");
        let n: u64 = value.trim_start_matches("line ").parse().expect("number");
        per_key
            .entry(key)
            .or_default()
            .push((record["offset"].as_u64().expect("offset"), n));
    }
    assert_eq!(per_key.values().map(Vec::len).sum::<usize>(), 50);
    for (key, records) in &per_key {
        // Same key, same partition, in order.
        let values: Vec<u64> = records.iter().map(|r| r.1).collect();
        let mut sorted = values.clone();
        sorted.sort();
        assert_eq!(values, sorted, "key {key} out of order");
    }
    let (code, out, _) = cli(&["consume", "lines", "--count", "7"], "");
    assert_eq!(code, Some(0));
    assert_eq!(out.lines().count(), 7);
    let (code, out, _) = cli(&["topic", "describe", "lines", "--format", "json"], "");
    assert_eq!(code, Some(0));
    let description: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(description["partitions"].as_array().map(Vec::len), Some(3));
    // A record that cannot be acknowledged makes produce exit non-zero.
    let (code, _, err) = cli(&["produce", "lines", "--acks", "3"], "x\n");
    assert_ne!(code, Some(0), "{err}");
    let (code, _, err) = cli(&["produce", "missing"], "x\n");
    assert_ne!(code, Some(0));
    assert!(err.contains("unknown_topic"), "{err}");
    let (code, _, _) = cli(&["topic", "delete", "lines"], "");
    assert_eq!(code, Some(0));
    let (code, _, err) = cli(&["consume", "lines"], "");
    assert_ne!(code, Some(0));
    assert!(err.contains("unknown_topic"), "{err}");
}

#[test]
fn offsets_by_timestamp_earliest_and_latest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), 2, "");
    let bootstrap = broker.bootstrap();
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        client
            .create_topic("times", 1, 1, Vec::new())
            .await
            .expect("create");
        let producer = Producer::new(Rc::clone(&client), ProducerConfig::default());
        let send_all = |first: u32| {
            let producer = &producer;
            async move {
                let mut deliveries = Vec::new();
                for i in first..first + 20 {
                    deliveries.push(
                        producer
                            .send("times", None, format!("r{i}").as_bytes())
                            .await
                            .expect("queued"),
                    );
                }
                producer.flush().await;
                for delivery in deliveries {
                    delivery.await.expect("acknowledged");
                }
            }
        };
        send_all(0).await;
        glommio::timer::sleep(Duration::from_millis(20)).await;
        let boundary_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as i64;
        glommio::timer::sleep(Duration::from_millis(20)).await;
        send_all(20).await;
        let at = |spec| {
            let client = Rc::clone(&client);
            async move {
                client
                    .list_offsets("times", &[0], spec)
                    .await
                    .expect("list")[0]
                    .1
            }
        };
        use wharf::protocol::OffsetSpec;
        assert_eq!(at(OffsetSpec::Earliest).await, 0);
        assert_eq!(at(OffsetSpec::Latest).await, 40);
        assert_eq!(at(OffsetSpec::Timestamp(boundary_ms)).await, 20);
        assert_eq!(at(OffsetSpec::Timestamp(0)).await, 0);
        assert_eq!(at(OffsetSpec::Timestamp(boundary_ms + 3_600_000)).await, 40);
        // A consumer seeking by time starts at the first record at or after it.
        let mut consumer = Consumer::new(Rc::clone(&client), "times", ConsumerConfig::default());
        consumer
            .assign(None, SeekTo::Timestamp(boundary_ms))
            .await
            .expect("assign");
        let records = consumer.poll().await.expect("poll");
        let mut first = None;
        records
            .for_each(|r| {
                first.get_or_insert(r.value.to_vec());
            })
            .expect("records");
        assert_eq!(first, Some(b"r20".to_vec()));
    });
}

#[test]
fn interval_flush_topics_acknowledge_and_serve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), 2, "");
    let bootstrap = broker.bootstrap();
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        let configs = vec![
            wharf::protocol::ConfigEntry {
                key: "flush".to_string(),
                value: "interval".to_string(),
            },
            wharf::protocol::ConfigEntry {
                key: "flush_interval_ms".to_string(),
                value: "50".to_string(),
            },
        ];
        client
            .create_topic("lazy", 2, 1, configs)
            .await
            .expect("create");
        let produced = produce(&client, "lazy", 0, 500).await;
        assert_dense_and_equal(&produced, &consume_all(&client, "lazy").await);
        let description = client.describe_topic("lazy").await.expect("describe");
        assert!(description
            .configs
            .iter()
            .any(|c| c.key == "flush" && c.value == "interval"));
    });
}

#[test]
fn retention_deletes_old_segments_while_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), 1, "retention_check_interval_ms = 100\n");
    let bootstrap = broker.bootstrap();
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        let entry = |key: &str, value: &str| wharf::protocol::ConfigEntry {
            key: key.to_string(),
            value: value.to_string(),
        };
        client
            .create_topic(
                "short",
                1,
                1,
                vec![
                    entry("segment_bytes", "65536"),
                    entry("retention_bytes", "131072"),
                ],
            )
            .await
            .expect("create");
        let producer = Producer::new(
            Rc::clone(&client),
            ProducerConfig {
                batch_bytes: 8 * 1024,
                ..ProducerConfig::default()
            },
        );
        let value = vec![b'x'; 1000];
        let mut deliveries = Vec::new();
        for _ in 0..1000 {
            deliveries.push(producer.send("short", None, &value).await.expect("queued"));
        }
        producer.flush().await;
        for delivery in deliveries {
            delivery.await.expect("acknowledged");
        }
        // Bounded wait for the retention pass (every 100 ms).
        let mut log_start = 0;
        for _ in 0..100 {
            log_start = client
                .describe_topic("short")
                .await
                .expect("describe")
                .partitions[0]
                .log_start_offset;
            // Roughly retention_bytes (128 KiB, ~128 records) plus the active segment remain.
            if 1000 - log_start < 400 {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            1000 - log_start < 400,
            "retention kept offsets {log_start}..1000"
        );
        let consumed = consume_all(&client, "short").await;
        let records = &consumed[&0];
        assert_eq!(records.first().map(|r| r.0), Some(log_start));
        assert_eq!(records.last().map(|r| r.0), Some(999));
    });
}

#[test]
fn pipelined_producer_keeps_partition_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), 2, "");
    let bootstrap = broker.bootstrap();
    run(async {
        let client = Client::connect(client_config(&bootstrap))
            .await
            .expect("connect");
        client
            .create_topic("ordered", 1, 1, Vec::new())
            .await
            .expect("create");
        let producer = Producer::new(
            Rc::clone(&client),
            ProducerConfig {
                max_in_flight_per_partition: 16,
                batch_bytes: 2048,
                linger_ms: 0,
                ..ProducerConfig::default()
            },
        );
        let mut deliveries = Vec::new();
        for i in 0..3000u32 {
            deliveries.push(
                producer
                    .send("ordered", None, format!("{i:06}").as_bytes())
                    .await
                    .expect("queued"),
            );
        }
        producer.flush().await;
        let mut last = None;
        for delivery in deliveries {
            let offset = delivery
                .await
                .expect("acknowledged")
                .offset
                .expect("offset");
            assert!(
                last.is_none_or(|l| offset == l + 1),
                "offset {offset} after {last:?}"
            );
            last = Some(offset);
        }
        let consumed = consume_all(&client, "ordered").await;
        let values: Vec<Vec<u8>> = consumed[&0].iter().map(|r| r.1.clone()).collect();
        let expected: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| format!("{i:06}").into_bytes())
            .collect();
        assert_eq!(values, expected);
    });
}
