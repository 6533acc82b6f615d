use futures_lite::future::block_on;
use proptest::prelude::*;

use super::*;

fn produce_request() -> ProduceRequest {
    ProduceRequest {
        acks: Acks::Replicas(2),
        timeout_ms: 1500,
        topic: "orders".to_string(),
        partitions: vec![ProducePartition {
            partition: 3,
            batch_bytes: 32,
        }],
    }
}

fn encode_with_payload(payload: &[u8]) -> FrameBuf {
    let mut frame = encode_frame(
        FrameKind::request(ApiKey::Produce, 7),
        &produce_request(),
        &[payload],
    )
    .expect("encodes");
    frame.extend_from_slice(payload);
    frame
}

fn read(bytes: &[u8], limit: usize) -> Result<Option<Frame>, (Option<FrameHeader>, FrameError)> {
    let mut reader = futures_lite::io::Cursor::new(bytes.to_vec());
    block_on(read_frame(&mut reader, limit))
}

#[test]
fn frames_round_trip_with_an_aligned_payload() {
    let payload = [0xabu8; 32];
    let bytes = encode_with_payload(&payload);
    let frame = read(&bytes, FRAME_BYTES_MAX_DEFAULT)
        .expect("valid")
        .expect("one frame");
    assert_eq!(frame.header.api(), Some(ApiKey::Produce));
    assert_eq!(frame.header.correlation_id, 7);
    assert!(!frame.header.is_response());
    assert_eq!(frame.payload(), &payload);
    assert_eq!(
        frame.payload().as_ptr().align_offset(FRAME_ALIGNMENT_BYTES),
        0
    );
    assert_eq!(
        frame.decode_body::<ProduceRequest>().expect("decodes"),
        produce_request()
    );
}

#[test]
fn clean_end_of_stream_is_none_and_a_cut_frame_is_truncated() {
    assert!(read(&[], FRAME_BYTES_MAX_DEFAULT).expect("clean").is_none());
    let bytes = encode_with_payload(&[1u8; 32]);
    for cut in [
        1,
        FRAME_HEADER_BYTES - 1,
        FRAME_HEADER_BYTES + 3,
        bytes.len() - 1,
    ] {
        let Err((_, error)) = read(&bytes[..cut], FRAME_BYTES_MAX_DEFAULT) else {
            panic!("a frame cut at {cut} must not decode");
        };
        assert!(
            matches!(error, FrameError::Truncated { .. }),
            "cut {cut}: {error}"
        );
    }
}

#[test]
fn oversized_frames_are_refused_from_the_header_alone() {
    let bytes = encode_with_payload(&[1u8; 4096]);
    // Only the header is given: the limit must be checked before the body is read.
    let Err((_, error)) = read(&bytes[..FRAME_HEADER_BYTES], 1024) else {
        panic!("oversized frame accepted");
    };
    assert!(matches!(error, FrameError::TooLarge { .. }), "{error}");
    assert_eq!(error.code(), ErrorCode::FrameTooLarge);
}

#[test]
fn a_corrupt_header_or_body_is_detected() {
    let bytes = encode_with_payload(&[5u8; 32]);
    let mut header_flip = bytes.to_vec();
    header_flip[9] ^= 1;
    let Err((_, error)) = read(&header_flip, FRAME_BYTES_MAX_DEFAULT) else {
        panic!("header flip accepted");
    };
    assert!(matches!(error, FrameError::HeaderCrc { .. }));
    assert!(!error.keeps_framing());

    let mut body_flip = bytes.to_vec();
    body_flip[FRAME_HEADER_BYTES + 3] ^= 0x10;
    let Err((Some(header), error)) = read(&body_flip, FRAME_BYTES_MAX_DEFAULT) else {
        panic!("payload flip accepted");
    };
    assert!(matches!(error, FrameError::BodyCrc { .. }));
    assert!(error.keeps_framing());
    assert_eq!(header.correlation_id, 7);
}

#[test]
fn a_body_of_another_type_is_a_body_error_not_a_panic() {
    let frame = encode_frame(
        FrameKind::request(ApiKey::Metadata, 1),
        &MetadataRequest { topics: None },
        &[],
    )
    .expect("encodes");
    let frame = read(&frame, FRAME_BYTES_MAX_DEFAULT)
        .expect("valid")
        .expect("frame");
    assert!(frame.decode_body::<FetchRequest>().is_err());
}

#[test]
fn payload_split_checks_declared_lengths() {
    let parts = payload_ranges(48, [16usize, 32].into_iter()).expect("exact");
    assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [16, 32]);
    assert!(payload_ranges(48, [16usize, 16].into_iter()).is_err());
    assert!(payload_ranges(48, [40usize, 16].into_iter()).is_err());
    assert!(payload_ranges(48, [usize::MAX, 1].into_iter()).is_err());
}

#[test]
fn codes_and_keys_round_trip() {
    for code in ErrorCode::ALL {
        assert_eq!(ErrorCode::from_u16(code as u16), code);
    }
    assert_eq!(ErrorCode::from_u16(60000), ErrorCode::Unknown);
    for key in ApiKey::ALL {
        assert_eq!(ApiKey::from_u16(key as u16), Some(key));
    }
    assert_eq!(ApiKey::from_u16(999), None);
    for text in ["none", "leader", "quorum", "all", "3"] {
        let acks: Acks = text.parse().expect("valid");
        assert_eq!(acks.to_string(), text);
    }
    assert!("0x".parse::<Acks>().is_err());
    assert!("most".parse::<Acks>().is_err());
}

proptest! {
    /// Arbitrary bytes never panic the decoder and never allocate beyond the limit.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = read(&bytes, 4096);
        if bytes.len() >= FRAME_HEADER_BYTES {
            let mut header = [0u8; FRAME_HEADER_BYTES];
            header.copy_from_slice(&bytes[..FRAME_HEADER_BYTES]);
            let _ = FrameHeader::decode(&header, 4096);
        }
        let _ = decode_body::<ProduceRequest>(&bytes);
        let _ = decode_body::<FetchResponse>(&bytes);
        let _ = decode_body::<MetadataResponse>(&bytes);
    }

    /// Every single-bit flip in a frame's header or body is detected (payload batches carry
    /// their own CRCs).
    #[test]
    fn every_bit_flip_is_detected(bit in 0usize..(64 + 32) * 8) {
        let bytes = encode_with_payload(&[9u8; 32]);
        let payload_start = bytes.len() - 32;
        prop_assume!(bit / 8 < payload_start);
        let mut flipped = bytes.to_vec();
        flipped[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(read(&flipped, FRAME_BYTES_MAX_DEFAULT).is_err());
    }

    #[test]
    fn fetch_responses_round_trip(
        topic in "[a-z]{1,20}",
        partition in any::<u32>(),
        hw in any::<u64>(),
        bytes in 0u32..1000,
    ) {
        let body = FetchResponse {
            partitions: vec![FetchPartitionResponse {
                topic,
                partition,
                error: 0,
                message: String::new(),
                high_watermark: hw,
                log_start_offset: 0,
                batch_bytes: bytes,
                leader_epoch: 0,
                preferred_read_replica: None,
                read_lease_ms: 0,
            }],
        };
        let frame = encode_frame(FrameKind::request(ApiKey::Fetch, 1), &body, &[]).expect("encodes");
        let frame = read(&frame, FRAME_BYTES_MAX_DEFAULT).expect("valid").expect("frame");
        prop_assert_eq!(frame.decode_body::<FetchResponse>().expect("decodes"), body);
    }
}
