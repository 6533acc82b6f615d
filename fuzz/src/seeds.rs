//! Seed inputs for every target: a handful of valid frames, bodies, batches and segments, in each
//! target's input format. `examples/gen_corpus.rs` writes them to `corpus/<target>/`.

use wharf_storage::batch::{stamp, BatchBuilder, ProducerStamp};
use wharf_storage::{Epoch, Offset};

use crate::protocol::*;
use crate::recovery_scan;
use crate::request_bodies::BODY_TYPES;

/// A valid batch of `records` records, stamped at `base_offset`.
pub fn batch(records: usize, value_bytes: usize, base_offset: u64, with_headers: bool) -> Vec<u8> {
    let mut builder = BatchBuilder::new(ProducerStamp::default());
    for i in 0..records {
        let value = vec![b'a' + (i % 26) as u8; value_bytes];
        let key = format!("key-{i}");
        let headers: &[(&str, &[u8])] = if with_headers {
            &[("trace", b"0af7651916cd43dd"), ("", b"")]
        } else {
            &[]
        };
        let key = (i % 2 == 0).then_some(key.as_bytes());
        builder
            .push(1_700_000_000_000 - 5 + i as i64 * 3, key, &value, headers)
            .expect("push");
    }
    let mut bytes = builder.finish().expect("finish");
    stamp(&mut bytes, Offset(base_offset), Epoch(3));
    bytes.to_vec()
}

/// Batches with dense offsets from `base_offset`, laid end to end.
pub fn batches(counts: &[usize], base_offset: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut next = base_offset;
    for (i, &records) in counts.iter().enumerate() {
        out.extend_from_slice(&batch(records, 10 + 17 * i, next, i % 2 == 1));
        next += records as u64;
    }
    out
}

fn archive<T: Message>(value: &T) -> Vec<u8> {
    let frame = encode_frame(FrameKind::request(ApiKey::Versions, 0), value, &[]).expect("encode");
    let header = FrameHeader::parse(frame[..FRAME_HEADER_BYTES].try_into().expect("a header"));
    frame[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + header.body_bytes as usize].to_vec()
}

fn configs() -> Vec<ConfigEntry> {
    vec![ConfigEntry {
        key: "retention_ms".to_string(),
        value: "86400000".to_string(),
    }]
}

/// One sample value of every body type, archived, in [`BODY_TYPES`] order.
pub fn bodies() -> Vec<Vec<u8>> {
    let description = TopicDescription {
        name: "orders".to_string(),
        topic_id: 0x1234_5678_9abc,
        replication_factor: 3,
        configs: configs(),
        partitions: vec![PartitionDescription {
            partition: 0,
            leader: 1,
            leader_epoch: 4,
            shard: 1,
            replicas: vec![1, 2, 3],
            isr: vec![1, 3],
            log_start_offset: 10,
            high_watermark: 90,
            end_offset: 100,
            error: 0,
        }],
    };
    let bodies = vec![
        archive(&VersionsRequest {
            client_name: "wharf-cli".to_string(),
        }),
        archive(&MetadataRequest {
            topics: Some(vec!["orders".to_string(), "payments".to_string()]),
        }),
        archive(&CreateTopicRequest {
            name: "orders".to_string(),
            partitions: 8,
            replication_factor: 3,
            configs: configs(),
        }),
        archive(&DeleteTopicRequest {
            name: "orders".to_string(),
        }),
        archive(&DescribeTopicRequest {
            name: "orders".to_string(),
        }),
        archive(&produce_request(&[batch(2, 20, 0, false).len() as u32, 0])),
        archive(&FetchRequest {
            max_wait_ms: 500,
            min_bytes: 1,
            max_bytes: 1 << 20,
            partitions: vec![FetchPartition {
                topic: "orders".to_string(),
                partition: 2,
                fetch_offset: 42,
                max_bytes: 65536,
                leader_epoch: Some(3),
                read_replica: Some(2),
                avoid_replicas: vec![3, 2],
            }],
            reader_id: "billing-7".to_string(),
            rack: "eu-1a".to_string(),
        }),
        archive(&ListOffsetsRequest {
            topic: "orders".to_string(),
            partitions: vec![
                ListOffsetsPartition {
                    partition: 0,
                    spec: OffsetSpec::Earliest,
                },
                ListOffsetsPartition {
                    partition: 1,
                    spec: OffsetSpec::Timestamp(1_700_000_000_000),
                },
            ],
        }),
        archive(&ReplicaFetchRequest {
            replica_id: 2,
            topic: "orders".to_string(),
            topic_id: 7,
            partition: 0,
            leader_epoch: 4,
            fetch_id: 99,
            fetch_offset: 1000,
            last_fetched_epoch: Some(3),
            durable_offset: 990,
            high_watermark: 980,
            max_wait_ms: 100,
            max_bytes: 1 << 20,
        }),
        archive(&ApplyTopicRequest {
            name: "orders".to_string(),
            topic_id: 7,
            delete: false,
            replication_factor: 2,
            configs: configs(),
            replicas: vec![vec![1, 2], vec![2, 3]],
        }),
        archive(&VersionsResponse {
            broker_id: 1,
            server_version: "0.1.0".to_string(),
            apis: vec![ApiVersionRange {
                api_key: 5,
                min_version: 0,
                max_version: 0,
            }],
        }),
        archive(&MetadataResponse {
            brokers: vec![BrokerInfo {
                broker_id: 1,
                host: "127.0.0.1".to_string(),
                port: 9092,
                shards: vec![ShardAddress {
                    shard: 0,
                    host: "127.0.0.1".to_string(),
                    port: 9093,
                }],
            }],
            topics: vec![TopicMetadata {
                name: "orders".to_string(),
                error: 0,
                partitions: vec![PartitionMetadata {
                    partition: 0,
                    leader: 1,
                    leader_epoch: 4,
                    shard: 0,
                    replicas: vec![1, 2],
                    isr: vec![1],
                }],
            }],
        }),
        archive(&TopicResult {
            error: 9,
            message: "topic orders already exists".to_string(),
        }),
        archive(&DescribeTopicResponse {
            error: 0,
            message: String::new(),
            topic: Some(description),
        }),
        archive(&ProduceResponse {
            partitions: vec![ProducePartitionResponse {
                partition: 3,
                error: 0,
                message: String::new(),
                base_offset: 100,
                last_offset: 104,
                leader_epoch: 4,
                replicas_durable: 2,
                current_leader: None,
            }],
        }),
        archive(&fetch_response(batch(3, 5, 40, true).len() as u32)),
        archive(&ListOffsetsResponse {
            partitions: vec![ListOffsetsPartitionResponse {
                partition: 1,
                error: 14,
                message: "offset out of range".to_string(),
                offset: 0,
            }],
        }),
        archive(&ReplicaFetchResponse {
            error: 25,
            message: "diverging".to_string(),
            fetch_id: 99,
            leader_epoch: 5,
            high_watermark: 900,
            log_start_offset: 0,
            diverging_epoch: 3,
            diverging_end_offset: 870,
            batch_bytes: 0,
        }),
        archive(&ErrorBody {
            message: "frame header CRC mismatch".to_string(),
        }),
        archive(&PeerAuthBeginRequest {
            broker_id: 2,
            client_nonce: vec![7; 32],
        }),
        archive(&PeerAuthProveRequest { proof: vec![9; 32] }),
        archive(&PeerAuthBeginResponse {
            error: 0,
            message: String::new(),
            broker_id: 1,
            server_nonce: vec![5; 32],
            server_proof: vec![3; 32],
        }),
        archive(&ControllerRaftRequest {
            from: 2,
            messages: vec![vec![8, 1, 16, 2], vec![]],
        }),
        archive(&ControllerRaftResponse {
            error: 0,
            message: String::new(),
        }),
        archive(&BrokerHeartbeatRequest {
            broker_id: 2,
            incarnation: 7,
            client_address: "127.0.0.1:29093".to_string(),
            internal_address: "127.0.0.1:29193".to_string(),
            applied_index: 41,
            shutting_down: false,
        }),
        archive(&BrokerHeartbeatResponse {
            error: 0,
            message: String::new(),
            leader_hint: Some(1),
            delta_json: b"{}".to_vec(),
            shutdown_ready: false,
        }),
        archive(&ControllerCommandRequest {
            command_json: b"{\"ControlledShutdown\":{\"broker\":2}}".to_vec(),
        }),
        archive(&ControllerCommandResponse {
            error: 32,
            message: "not the controller".to_string(),
            leader_hint: Some(3),
            committed_index: 0,
            still_leading: false,
        }),
        archive(&ClusterStatusRequest {}),
        archive(&ClusterStatusResponse {
            error: 0,
            message: String::new(),
            voters: vec![1, 2, 3],
            controller_leader: Some(1),
            applied_index: 12,
            raft_term: 3,
            raft_commit_index: 12,
            brokers: vec![BrokerStatus {
                broker_id: 1,
                incarnation: 4,
                client_address: "127.0.0.1:29092".to_string(),
                state: "alive".to_string(),
                leaders: 2,
            }],
        }),
        archive(&InitProducerIdRequest {
            producer_id: Some(0x0001_0000_0010_0003),
            producer_epoch: 2,
        }),
        archive(&InitProducerIdResponse {
            error: 0,
            message: String::new(),
            producer_id: 0x0001_0000_0010_0003,
            producer_epoch: 3,
        }),
        archive(&GroupHeartbeatRequest {
            group: "billing".to_string(),
            member_id: "5f0c2a9e7d1b4c3a".to_string(),
            member_epoch: 4,
            instance_id: Some("host-a".to_string()),
            subscribed_topics: Some(vec!["orders".to_string()]),
            owned: Some(vec![group_partition_of(0), group_partition_of(2)]),
            lag: vec![PartitionLag {
                topic: "orders".to_string(),
                partition: 0,
                position: 40,
                high_watermark: 43,
                lag_ms: 120,
            }],
        }),
        archive(&GroupHeartbeatResponse {
            error: 0,
            message: String::new(),
            member_epoch: 5,
            heartbeat_interval_ms: 500,
            assignment: vec![group_partition_of(0)],
        }),
        archive(&OffsetCommitRequest {
            group: "billing".to_string(),
            member_id: Some("5f0c2a9e7d1b4c3a".to_string()),
            member_epoch: 5,
            offsets: vec![OffsetCommitEntry {
                topic: "orders".to_string(),
                partition: 0,
                offset: 43,
                leader_epoch: Some(3),
                metadata: String::new(),
            }],
        }),
        archive(&GroupResult {
            error: 42,
            message: "member epoch 4 is stale (current 5); nothing was committed".to_string(),
        }),
        archive(&OffsetFetchRequest {
            group: "billing".to_string(),
        }),
        archive(&OffsetFetchResponse {
            error: 0,
            message: String::new(),
            offsets: vec![committed_offset()],
        }),
        archive(&DescribeGroupRequest {
            group: "billing".to_string(),
        }),
        archive(&DescribeGroupResponse {
            error: 0,
            message: String::new(),
            group_epoch: 5,
            assignor: "sticky".to_string(),
            coordinator: 2,
            members: vec![GroupMemberDescription {
                member_id: "5f0c2a9e7d1b4c3a".to_string(),
                instance_id: None,
                member_epoch: 5,
                subscribed_topics: vec!["orders".to_string()],
                assigned: vec![group_partition_of(0)],
                revoking: vec![group_partition_of(2)],
            }],
            offsets: vec![committed_offset()],
            lag: Vec::new(),
        }),
        archive(&ListGroupsRequest {}),
        archive(&ListGroupsResponse {
            error: 0,
            message: String::new(),
            groups: vec![GroupListing {
                group: "billing".to_string(),
                members: 2,
                group_epoch: 5,
                lag_records: 1_200,
                lag_ms_max: 340,
            }],
        }),
        archive(&DeleteGroupRequest {
            group: "billing".to_string(),
        }),
        archive(&StoredGroupRecord {
            group: "billing".to_string(),
            change: StoredGroupChange::Member(StoredMember {
                member_id: "5f0c2a9e7d1b4c3a".to_string(),
                instance_id: Some("host-a".to_string()),
                member_epoch: 5,
                previous_epoch: 4,
                subscribed_topics: vec!["orders".to_string()],
                assigned: vec![group_partition_of(0)],
                revoking: Vec::new(),
                target: vec![group_partition_of(0)],
            }),
        }),
        archive(&CreateQueueRequest {
            group: "workers".to_string(),
            topic: "orders".to_string(),
            settings: queue_settings(),
        }),
        archive(&QueueAcquireRequest {
            group: "workers".to_string(),
            member: "host-a-1".to_string(),
            records_max: 16,
            wait_ms: 500,
        }),
        archive(&QueueAcquireResponse {
            error: 0,
            message: String::new(),
            topic: "orders".to_string(),
            records: vec![QueueDelivery {
                partition: 1,
                offset: 43,
                delivery_attempt: 2,
                lease_until_ms: 1_700_000_030_000,
                timestamp_ms: 1_700_000_000_000,
                key: Some(b"customer-7".to_vec()),
                value: b"charge 12.50".to_vec(),
            }],
        }),
        archive(&QueueSettleRequest {
            group: "workers".to_string(),
            member: "host-a-1".to_string(),
            settlements: vec![
                QueueSettlement {
                    partition: 1,
                    offset: 43,
                    delivery_attempt: 2,
                    action: SettleAction::Ack,
                },
                QueueSettlement {
                    partition: 1,
                    offset: 44,
                    delivery_attempt: 1,
                    action: SettleAction::Nack {
                        delay_ms: Some(5_000),
                    },
                },
                QueueSettlement {
                    partition: 0,
                    offset: 9,
                    delivery_attempt: 1,
                    action: SettleAction::Reject {
                        reason: "cannot parse".to_string(),
                    },
                },
                QueueSettlement {
                    partition: 0,
                    offset: 10,
                    delivery_attempt: 3,
                    action: SettleAction::Extend,
                },
            ],
        }),
        archive(&QueueSettleResponse {
            error: 0,
            message: String::new(),
            results: vec![QueueSettleResult {
                error: 46,
                message: "record 43 is at delivery attempt 3, not 2".to_string(),
                lease_until_ms: 0,
            }],
        }),
        archive(&DescribeQueueRequest {
            group: "workers".to_string(),
        }),
        archive(&DescribeQueueResponse {
            error: 0,
            message: String::new(),
            group: "workers".to_string(),
            topic: "orders".to_string(),
            coordinator: 2,
            settings: queue_settings(),
            partitions: vec![QueuePartitionDescription {
                partition: 0,
                start_offset: 40,
                end_offset: 60,
                in_flight: 12,
                waiting: 3,
                dead_lettering: 1,
                oldest_pending_age_ms: 2_300,
            }],
            acked: 400,
            redelivered: 7,
            dead_lettered: 2,
        }),
        archive(&ListQueuesRequest {}),
        archive(&ListQueuesResponse {
            error: 0,
            message: String::new(),
            queues: vec![QueueListing {
                group: "workers".to_string(),
                topic: "orders".to_string(),
                in_flight: 12,
                dead_letter_topic: "orders.dlq".to_string(),
            }],
        }),
        archive(&DescribeReadersRequest {
            topic: "orders".to_string(),
        }),
        archive(&DescribeReadersResponse {
            partitions: vec![PartitionReaders {
                partition: 2,
                leader: 1,
                busy_permille: 870,
                queue_depth: 12,
                egress_bytes_per_s: 52_428_800,
                pressure_permille: 1_087,
                readers: vec![ReaderInfo {
                    reader_id: "billing-7".to_string(),
                    rack: "eu-1a".to_string(),
                    replica: 3,
                    fetch_offset: 42,
                    last_seen_ms_ago: 1_200,
                    reason: "loaded".to_string(),
                }],
            }],
        }),
    ];
    assert_eq!(bodies.len(), BODY_TYPES.len());
    bodies
}

fn queue_settings() -> QueueSettings {
    QueueSettings {
        ack_wait_ms: 30_000,
        max_deliveries: 5,
        in_flight_max: 1_000,
        backoff_initial_ms: 1_000,
        backoff_max_ms: 300_000,
        backoff_multiplier_permille: 2_000,
        backoff_jitter_permille: 200,
        backoff_list_ms: Vec::new(),
        per_key_ordering: true,
        dead_letter_topic: "orders.dlq".to_string(),
    }
}

fn group_partition_of(partition: u32) -> GroupPartition {
    GroupPartition {
        topic: "orders".to_string(),
        partition,
    }
}

fn committed_offset() -> CommittedOffsetEntry {
    CommittedOffsetEntry {
        topic: "orders".to_string(),
        partition: 0,
        offset: 43,
        leader_epoch: Some(3),
        metadata: "app-v2".to_string(),
        commit_ms: 1_700_000_000_000,
    }
}

fn produce_request(batch_bytes: &[u32]) -> ProduceRequest {
    ProduceRequest {
        acks: Acks::Replicas(2),
        timeout_ms: 1500,
        topic: "orders".to_string(),
        partitions: batch_bytes
            .iter()
            .enumerate()
            .map(|(i, &b)| ProducePartition {
                partition: i as u32,
                batch_bytes: b,
            })
            .collect(),
    }
}

fn fetch_response(batch_bytes: u32) -> FetchResponse {
    FetchResponse {
        partitions: vec![FetchPartitionResponse {
            topic: "orders".to_string(),
            partition: 0,
            error: 0,
            message: String::new(),
            high_watermark: 43,
            log_start_offset: 0,
            batch_bytes,
            leader_epoch: 0,
            preferred_read_replica: None,
            read_lease_ms: 0,
        }],
    }
}

/// Seeds of `request_bodies`: `[selector][payload_bytes][body]` for every type.
pub fn request_bodies() -> Vec<(String, Vec<u8>)> {
    let produce_payload = batch(2, 20, 0, false).len() as u32;
    let fetch_payload = batch(3, 5, 40, true).len() as u32;
    bodies()
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let payload_bytes = match i {
                5 => produce_payload,
                15 => fetch_payload,
                _ => 0,
            };
            let mut input = vec![i as u8];
            input.extend_from_slice(&payload_bytes.to_le_bytes());
            input.extend_from_slice(&body);
            (format!("{:02}-{}", i, BODY_TYPES[i]), input)
        })
        .collect()
}

fn frame<T: Message>(kind: FrameKind, body: &T, payload: &[u8]) -> Vec<u8> {
    let mut bytes = encode_frame(kind, body, &[payload])
        .expect("encode")
        .to_vec();
    bytes.extend_from_slice(payload);
    bytes
}

/// Seeds of `frame_decoder`: `[read_bytes_max][frames]`.
pub fn frame_decoder() -> Vec<(String, Vec<u8>)> {
    let (share_0, share_1) = (batch(2, 20, 0, false), batch(1, 3, 0, true));
    let produce = frame(
        FrameKind::request(ApiKey::Produce, 7),
        &produce_request(&[share_0.len() as u32, share_1.len() as u32]),
        &[share_0, share_1].concat(),
    );
    let fetch_payload = batch(3, 5, 40, true);
    let fetch_request_header = FrameHeader {
        frame_bytes: 0,
        api_key: ApiKey::Fetch as u16,
        api_version: 0,
        correlation_id: 8,
        flags: 0,
        error_code: 0,
        body_bytes: 0,
        payload_bytes: 0,
        body_crc: 0,
    };
    let fetch = frame(
        FrameKind::response(&fetch_request_header, ErrorCode::None),
        &fetch_response(fetch_payload.len() as u32),
        &fetch_payload,
    );
    let error = frame(
        FrameKind::response(&fetch_request_header, ErrorCode::CorruptFrame),
        &ErrorBody {
            message: "frame header CRC mismatch".to_string(),
        },
        &[],
    );
    let versions = frame(
        FrameKind::request(ApiKey::Versions, 1),
        &VersionsRequest {
            client_name: "wharf-cli".to_string(),
        },
        &[],
    );
    let mut bad_body_crc = versions.clone();
    let last = bad_body_crc.len() - 1;
    bad_body_crc[last - 3] ^= 0x20;
    let mut seeds = vec![
        ("produce".to_string(), [vec![0], produce.clone()].concat()),
        (
            "produce-read-by-7".to_string(),
            [vec![7], produce.clone()].concat(),
        ),
        ("fetch-response".to_string(), [vec![0], fetch].concat()),
        ("error-response".to_string(), [vec![0], error].concat()),
        (
            "body-crc-then-frame".to_string(),
            [vec![0], bad_body_crc, versions.clone()].concat(),
        ),
        (
            "two-frames-cut".to_string(),
            [vec![13], versions, produce[..produce.len() - 9].to_vec()].concat(),
        ),
    ];
    // A request frame of every other API, body from the sample bodies.
    let bodies = bodies();
    let apis = [
        (ApiKey::Metadata, 1),
        (ApiKey::CreateTopic, 2),
        (ApiKey::DeleteTopic, 3),
        (ApiKey::DescribeTopic, 4),
        (ApiKey::Fetch, 6),
        (ApiKey::ListOffsets, 7),
        (ApiKey::ReplicaFetch, 8),
        (ApiKey::ApplyTopic, 9),
    ];
    for (api, index) in apis {
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&raw_frame(api, &bodies[index]));
        seeds.push((format!("request-{}", api.name()), bytes));
    }
    seeds
}

/// A request frame around an already archived body.
fn raw_frame(api: ApiKey, body: &[u8]) -> Vec<u8> {
    let padded = padded_body_bytes(body.len());
    let mut rest = body.to_vec();
    rest.resize(padded, 0);
    let header = FrameHeader {
        frame_bytes: (FRAME_HEADER_BYTES + padded) as u32,
        api_key: api as u16,
        api_version: 0,
        correlation_id: 11,
        flags: 0,
        error_code: 0,
        body_bytes: body.len() as u32,
        payload_bytes: 0,
        body_crc: crc32c::crc32c(&rest),
    };
    [header.encode().to_vec(), rest].concat()
}

/// Seeds of `batch_validation`: `[mode][batches]`.
pub fn batch_validation() -> Vec<(String, Vec<u8>)> {
    vec![
        (
            "one-record".to_string(),
            [vec![0], batch(1, 8, 0, false)].concat(),
        ),
        (
            "with-headers".to_string(),
            [vec![0], batch(3, 30, 1000, true)].concat(),
        ),
        (
            "three-batches".to_string(),
            [vec![0], batches(&[1, 4, 2], 50)].concat(),
        ),
        (
            "repair-mode".to_string(),
            [vec![1], batch(2, 5, 0, true)].concat(),
        ),
        (
            "misaligned".to_string(),
            [vec![2], batches(&[2, 1], 0)].concat(),
        ),
    ]
}

/// Seeds of `recovery_scan`: scenarios in its input format.
pub fn recovery_scan() -> Vec<(String, Vec<u8>)> {
    use recovery_scan::*;

    let segment_0 = batches(&[2, 1, 3], 0);
    let segment_1 = batches(&[1, 2], 6);
    let first_two = batch(2, 10, 0, false).len() + batch(1, 27, 2, true).len();
    let mut torn = segment_0.clone();
    torn.extend_from_slice(&batch(2, 40, 6, false)[..100]);
    let mut corrupt = segment_0.clone();
    corrupt[first_two / 2] ^= 0x10;
    let scenario = |flags, position: usize, delta, segments: Vec<Vec<u8>>| {
        Scenario {
            flags,
            checkpoint_position: position as u32,
            checkpoint_offset_delta: delta,
            segment_1_base: Offset(6),
            segments,
        }
        .encode()
    };
    vec![
        (
            "one-segment".to_string(),
            scenario(0, 0, 0, vec![segment_0.clone()]),
        ),
        (
            "two-segments".to_string(),
            scenario(
                FLAG_TWO_SEGMENTS,
                0,
                0,
                vec![segment_0.clone(), segment_1.clone()],
            ),
        ),
        (
            "torn-tail".to_string(),
            scenario(FLAG_EXACT_SIZES, 0, 0, vec![torn.clone()]),
        ),
        (
            "checkpoint-mid-segment".to_string(),
            scenario(FLAG_CHECKPOINT, first_two, 3, vec![torn]),
        ),
        (
            "corrupt-below-checkpoint".to_string(),
            scenario(FLAG_CHECKPOINT, segment_0.len(), 6, vec![corrupt]),
        ),
        (
            "checkpoint-in-segment-1".to_string(),
            scenario(
                FLAG_CHECKPOINT | FLAG_CHECKPOINT_IN_SEGMENT_1 | FLAG_TWO_SEGMENTS,
                segment_1.len(),
                3,
                vec![segment_0.clone(), segment_1.clone()],
            ),
        ),
        (
            "truncating".to_string(),
            scenario(
                FLAG_CHECKPOINT | FLAG_TRUNCATING | FLAG_TWO_SEGMENTS,
                first_two,
                3,
                vec![segment_0.clone(), segment_1],
            ),
        ),
        (
            "repair-mode".to_string(),
            scenario(FLAG_REPAIR_CRCS, 0, 0, vec![segment_0]),
        ),
    ]
}

/// Every target's seeds.
pub fn all() -> Vec<(&'static str, Vec<(String, Vec<u8>)>)> {
    vec![
        ("frame_decoder", frame_decoder()),
        ("request_bodies", request_bodies()),
        ("batch_validation", batch_validation()),
        ("recovery_scan", recovery_scan()),
    ]
}
