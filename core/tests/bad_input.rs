//! Bad input against a real broker: every case gets a clear error code or a clean close, the
//! logs stay unchanged, and the broker keeps serving other connections.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::wire::{
    batch, connect, error_message, produce_frame, produce_with, read_response, request,
};
use common::Broker;
use wharf::protocol::*;

fn produce(
    stream: &mut TcpStream,
    id: u32,
    topic: &str,
    partition: u32,
    payload: &[u8],
) -> ProducePartitionResponse {
    produce_with(stream, id, topic, partition, Acks::Leader, payload)
}

/// The end offsets of `topic`'s partitions, as describe reports them.
fn end_offsets(broker: &Broker, topic: &str) -> Vec<u64> {
    let mut stream = connect(broker);
    stream
        .write_all(&request(
            ApiKey::DescribeTopic,
            900,
            &DescribeTopicRequest {
                name: topic.to_string(),
            },
            &[],
        ))
        .expect("send");
    let frame = read_response(&mut stream).expect("describe");
    let response: DescribeTopicResponse = frame.decode_body().expect("body");
    response
        .topic
        .expect("topic")
        .partitions
        .iter()
        .map(|p| p.end_offset)
        .collect()
}

/// A versions round trip on a fresh connection: the broker still serves.
fn assert_serving(broker: &Broker) {
    let mut stream = connect(broker);
    stream
        .write_all(&request(
            ApiKey::Versions,
            77,
            &VersionsRequest {
                client_name: "probe".to_string(),
            },
            &[],
        ))
        .expect("send");
    let frame = read_response(&mut stream).expect("versions response");
    assert_eq!(frame.header.correlation_id, 77);
    let versions: VersionsResponse = frame.decode_body().expect("versions");
    assert_eq!(versions.apis.len(), ApiKey::ALL.len());
}

fn setup(broker: &Broker) {
    let mut stream = connect(broker);
    stream
        .write_all(&request(
            ApiKey::CreateTopic,
            1,
            &CreateTopicRequest {
                name: "t".to_string(),
                partitions: 2,
                replication_factor: 1,
                configs: Vec::new(),
            },
            &[],
        ))
        .expect("send");
    let frame = read_response(&mut stream).expect("create");
    let result: TopicResult = frame.decode_body().expect("result");
    assert_eq!(result.error, 0, "{}", result.message);
    let ok = produce(&mut stream, 2, "t", 0, &batch(&[b"one", b"two"]));
    assert_eq!(ok.error, 0, "{}", ok.message);
    assert_eq!((ok.base_offset, ok.last_offset), (0, 1));
}

#[test]
fn malformed_frames_get_error_codes_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(
        dir.path(),
        2,
        "frame_bytes_max = 2097152\nfetch_bytes_max = 1048576\n",
    );
    setup(&broker);
    let before = end_offsets(&broker, "t");

    // Oversized: refused from the header alone, with the request's correlation id, then closed.
    let mut stream = connect(&broker);
    let mut huge = produce_frame(10, "t", 0, &batch(&[&vec![7u8; 3 * 1024 * 1024]]));
    huge.truncate(FRAME_HEADER_BYTES); // the header is enough; the body never needs to be sent
    stream.write_all(&huge).expect("send");
    let frame = read_response(&mut stream).expect("an error response");
    assert_eq!(frame.header.error(), ErrorCode::FrameTooLarge);
    assert_eq!(frame.header.correlation_id, 10);
    assert!(
        read_response(&mut stream).is_none(),
        "closed after an oversized frame"
    );

    // Bad header CRC: nothing in it can be trusted; error with id 0, then closed.
    let mut stream = connect(&broker);
    let mut bad = produce_frame(11, "t", 0, &batch(&[b"x"]));
    bad[8] ^= 0xff;
    stream.write_all(&bad).expect("send");
    let frame = read_response(&mut stream).expect("an error response");
    assert_eq!(frame.header.error(), ErrorCode::CorruptFrame);
    assert_eq!(frame.header.correlation_id, 0);
    assert!(read_response(&mut stream).is_none());

    // Bad body CRC: the framing holds, so the connection keeps working.
    let mut stream = connect(&broker);
    let mut bad = produce_frame(12, "t", 0, &batch(&[b"x"]));
    bad[FRAME_HEADER_BYTES + 2] ^= 0x01;
    stream.write_all(&bad).expect("send");
    let frame = read_response(&mut stream).expect("an error response");
    assert_eq!(frame.header.error(), ErrorCode::CorruptFrame);
    assert_eq!(frame.header.correlation_id, 12);
    assert!(
        error_message(&frame).contains("CRC"),
        "{}",
        error_message(&frame)
    );
    stream
        .write_all(&request(
            ApiKey::Metadata,
            13,
            &MetadataRequest { topics: None },
            &[],
        ))
        .expect("send");
    assert_eq!(
        read_response(&mut stream)
            .expect("still served")
            .header
            .correlation_id,
        13
    );

    // Unknown api key and unsupported version.
    let mut frame = request(ApiKey::Metadata, 14, &MetadataRequest { topics: None }, &[]);
    frame[4..6].copy_from_slice(&999u16.to_le_bytes());
    let crc = crc32c::crc32c(&frame[..28]);
    frame[28..32].copy_from_slice(&crc.to_le_bytes());
    stream.write_all(&frame).expect("send");
    let response = read_response(&mut stream).expect("response");
    assert_eq!(response.header.error(), ErrorCode::UnknownApi);
    frame[4..6].copy_from_slice(&(ApiKey::Metadata as u16).to_le_bytes());
    frame[6..8].copy_from_slice(&42u16.to_le_bytes());
    let crc = crc32c::crc32c(&frame[..28]);
    frame[28..32].copy_from_slice(&crc.to_le_bytes());
    stream.write_all(&frame).expect("send");
    let response = read_response(&mut stream).expect("response");
    assert_eq!(response.header.error(), ErrorCode::UnsupportedVersion);

    // A body that is not the promised type.
    stream
        .write_all(&request(
            ApiKey::Produce,
            15,
            &MetadataRequest { topics: None },
            &[],
        ))
        .expect("send");
    let response = read_response(&mut stream).expect("response");
    assert_eq!(response.header.error(), ErrorCode::InvalidRequest);

    // Unknown topic and partition.
    let unknown_topic = produce(&mut stream, 16, "nope", 0, &batch(&[b"x"]));
    assert_eq!(
        ErrorCode::from_u16(unknown_topic.error),
        ErrorCode::UnknownTopic
    );
    let unknown_partition = produce(&mut stream, 17, "t", 9, &batch(&[b"x"]));
    assert_eq!(
        ErrorCode::from_u16(unknown_partition.error),
        ErrorCode::UnknownPartition
    );

    // Malformed batches: a flipped body byte (batch CRC), garbage with a valid CRC, a
    // truncated batch, and a good batch followed by a bad one (all or nothing).
    let mut flipped = batch(&[b"hello"]);
    flipped[100] ^= 0x40;
    let mut forged = batch(&[b"hello world, forged"]);
    let body_bytes = u32::from_le_bytes(forged[52..56].try_into().expect("4 bytes")) as usize;
    for byte in &mut forged[80..80 + body_bytes] {
        *byte = 0xee;
    }
    let body_crc = crc32c::crc32c(&forged[80..80 + body_bytes]);
    forged[8..12].copy_from_slice(&body_crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&forged[12..80]);
    forged[4..8].copy_from_slice(&header_crc.to_le_bytes());
    let good = batch(&[b"fine"]);
    let truncated = good[..good.len() - 16].to_vec();
    let mut good_then_bad = good.clone();
    good_then_bad.extend_from_slice(&flipped);
    for (id, payload) in [
        (20, flipped),
        (21, forged),
        (22, truncated),
        (23, good_then_bad),
        (24, Vec::new()),
    ] {
        let response = produce(&mut stream, id, "t", 0, &payload);
        assert_eq!(
            ErrorCode::from_u16(response.error),
            ErrorCode::InvalidBatch,
            "case {id}: {}",
            response.message
        );
    }

    // Declared partition bytes that do not match the payload.
    let fixed = {
        let body = ProduceRequest {
            acks: Acks::Leader,
            timeout_ms: 5000,
            topic: "t".to_string(),
            partitions: vec![ProducePartition {
                partition: 0,
                batch_bytes: 10_000,
            }],
        };
        request(ApiKey::Produce, 25, &body, &batch(&[b"x"]))
    };
    stream.write_all(&fixed).expect("send");
    let response = read_response(&mut stream).expect("response");
    assert_eq!(response.header.error(), ErrorCode::InvalidRequest);

    assert_eq!(end_offsets(&broker, "t"), before, "bad input changed a log");
    assert_serving(&broker);
}

#[test]
fn disconnects_and_slow_clients_do_not_disturb_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), 2, "request_read_timeout_ms = 500\n");
    setup(&broker);
    let before = end_offsets(&broker, "t");

    // Disconnect mid-request: half a produce frame, then close.
    let frame = produce_frame(30, "t", 0, &batch(&[b"half"]));
    for cut in [10, FRAME_HEADER_BYTES + 8, frame.len() - 1] {
        let mut stream = connect(&broker);
        stream.write_all(&frame[..cut]).expect("send");
        drop(stream);
    }

    // A slow client: a header, then silence. The broker closes it after the read timeout and
    // serves others meanwhile.
    let mut slow = connect(&broker);
    slow.write_all(&frame[..FRAME_HEADER_BYTES]).expect("send");
    assert_serving(&broker);
    let mut buffer = [0u8; 64];
    let closed = matches!(slow.read(&mut buffer), Ok(0) | Err(_));
    assert!(
        closed,
        "the broker should close a connection whose frame stalls"
    );

    // A client that pipelines requests and never reads the responses does not block others.
    let mut deaf = connect(&broker);
    for id in 0..50 {
        deaf.write_all(&request(
            ApiKey::Metadata,
            100 + id,
            &MetadataRequest { topics: None },
            &[],
        ))
        .expect("send");
    }
    assert_serving(&broker);

    assert_eq!(end_offsets(&broker, "t"), before);
    let mut stream = connect(&broker);
    let ok = produce(&mut stream, 31, "t", 0, &batch(&[b"after"]));
    assert_eq!(ok.error, 0, "{}", ok.message);
    assert_eq!(ok.base_offset, before[0]);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), 2, "");
    setup(&broker);
    let mut stream = connect(&broker);
    // 40 produce requests and metadata requests interleaved, all written before any is read.
    let mut sent = Vec::new();
    for i in 0..40u32 {
        let id = 1000 + i;
        if i % 4 == 3 {
            stream
                .write_all(&request(
                    ApiKey::Metadata,
                    id,
                    &MetadataRequest { topics: None },
                    &[],
                ))
                .expect("send");
        } else {
            let value = format!("pipelined {i}");
            stream
                .write_all(&produce_frame(id, "t", i % 2, &batch(&[value.as_bytes()])))
                .expect("send");
        }
        sent.push(id);
    }
    let mut last_offset = [None::<u64>; 2];
    for (i, id) in sent.iter().enumerate() {
        let frame = read_response(&mut stream).expect("a response per request");
        assert_eq!(
            frame.header.correlation_id, *id,
            "responses come back in request order"
        );
        if i % 4 != 3 {
            let response: ProduceResponse = frame.decode_body().expect("produce response");
            let p = &response.partitions[0];
            assert_eq!(p.error, 0, "{}", p.message);
            let slot = &mut last_offset[p.partition as usize];
            if let Some(previous) = *slot {
                assert_eq!(p.base_offset, previous + 1, "appended in arrival order");
            }
            *slot = Some(p.base_offset);
        }
    }
}
