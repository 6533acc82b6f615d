//! Raw wire helpers on blocking sockets: frames built and read with the codec, no client
//! library, so tests can send exactly the bytes a hostile or broken client would.

use std::net::TcpStream;
use std::time::Duration;

use super::Broker;
use wharf::protocol::*;
use wharf_storage::batch::BatchBuilder;

pub fn connect_to(address: &str) -> TcpStream {
    let stream = TcpStream::connect(address).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
}

/// Connects from a chosen local address (127.0.0.x), so a test can play several hosts.
pub fn connect_from(address: &str, source: std::net::Ipv4Addr) -> std::io::Result<TcpStream> {
    let target: std::net::SocketAddr = address.parse().expect("address");
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&std::net::SocketAddr::from((source, 0)).into())?;
    socket.connect_timeout(&target.into(), Duration::from_secs(5))?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(stream)
}

pub fn connect(broker: &Broker) -> TcpStream {
    connect_to(&broker.bootstrap())
}

pub fn request<T: Message>(api: ApiKey, id: u32, body: &T, payload: &[u8]) -> Vec<u8> {
    let mut frame = encode_frame(FrameKind::request(api, id), body, &[payload])
        .expect("encode")
        .to_vec();
    frame.extend_from_slice(payload);
    frame
}

/// Reads one frame, `None` on a clean close.
pub fn read_response(stream: &mut TcpStream) -> Option<Frame> {
    let mut reader = futures_lite::io::AssertAsync::new(stream);
    futures_lite::future::block_on(read_frame(&mut reader, FRAME_BYTES_MAX_DEFAULT))
        .ok()
        .flatten()
}

pub fn error_message(frame: &Frame) -> String {
    frame
        .decode_body::<ErrorBody>()
        .map(|b| b.message)
        .unwrap_or_default()
}

pub fn batch(values: &[&[u8]]) -> Vec<u8> {
    let mut builder = BatchBuilder::new(Default::default());
    for value in values {
        builder
            .push(1_700_000_000_000, None, value, &[])
            .expect("push");
    }
    builder.finish().expect("finish").to_vec()
}

/// A batch of an idempotent producer: `values` from sequence `sequence` of `producer` in
/// `epoch`.
pub fn idempotent_batch(producer: u64, epoch: u16, sequence: u32, values: &[&[u8]]) -> Vec<u8> {
    let mut builder = BatchBuilder::new(wharf_storage::batch::ProducerStamp {
        producer_id: wharf_storage::ProducerId(producer),
        producer_epoch: epoch,
        base_sequence: sequence,
    });
    for value in values {
        builder
            .push(1_700_000_000_000, None, value, &[])
            .expect("push");
    }
    builder.finish().expect("finish").to_vec()
}

/// A new producer id from the broker at `address`.
pub fn init_producer_id(address: &str) -> u64 {
    let mut stream = connect_to(address);
    std::io::Write::write_all(
        &mut stream,
        &request(
            ApiKey::InitProducerId,
            1,
            &InitProducerIdRequest {
                producer_id: None,
                producer_epoch: 0,
            },
            &[],
        ),
    )
    .expect("send");
    let response: InitProducerIdResponse =
        answered(&mut stream, "init producer id").expect("answered");
    assert_eq!(response.error, 0, "{}", response.message);
    assert_eq!(response.producer_epoch, 0);
    response.producer_id
}

pub fn produce_frame(id: u32, topic: &str, partition: u32, payload: &[u8]) -> Vec<u8> {
    produce_frame_with(id, topic, partition, Acks::Leader, payload)
}

pub fn produce_frame_with(
    id: u32,
    topic: &str,
    partition: u32,
    acks: Acks,
    payload: &[u8],
) -> Vec<u8> {
    request(
        ApiKey::Produce,
        id,
        &ProduceRequest {
            acks,
            timeout_ms: 5000,
            topic: topic.to_string(),
            partitions: vec![ProducePartition {
                partition,
                batch_bytes: payload.len() as u32,
            }],
        },
        payload,
    )
}

/// Produces `payload` (whole batches) with `acks` and returns the partition's answer; the
/// frame itself must succeed.
pub fn produce_with(
    stream: &mut TcpStream,
    id: u32,
    topic: &str,
    partition: u32,
    acks: Acks,
    payload: &[u8],
) -> ProducePartitionResponse {
    std::io::Write::write_all(
        stream,
        &produce_frame_with(id, topic, partition, acks, payload),
    )
    .expect("send");
    let frame = read_response(stream).expect("a response");
    assert_eq!(frame.header.correlation_id, id);
    assert_eq!(
        frame.header.error(),
        ErrorCode::None,
        "{}",
        error_message(&frame)
    );
    let mut response: ProduceResponse = frame.decode_body().expect("produce response");
    response.partitions.remove(0)
}

/// Reads one answer and decodes its body; an error if there is none or the frame failed.
pub fn answered<T: Message>(stream: &mut TcpStream, what: &str) -> Result<T, String> {
    let frame = read_response(stream).ok_or_else(|| format!("{what} not answered"))?;
    if frame.header.error() != ErrorCode::None {
        return Err(format!("{what}: {}", error_message(&frame)));
    }
    frame.decode_body().map_err(|e| format!("{what}: {e}"))
}

/// Sends a frame and returns its answer (`None`: the connection was closed).
pub fn call(stream: &mut TcpStream, frame: &[u8]) -> Option<Frame> {
    std::io::Write::write_all(stream, frame).expect("send");
    read_response(stream)
}

/// Runs the peer handshake on a fresh internal connection as `broker_id` with `secret`;
/// returns the connection when the broker accepted it.
pub fn peer_connect(
    address: &str,
    broker_id: u32,
    secret: &wharf::peer_auth::ClusterSecret,
) -> Option<TcpStream> {
    let mut stream = connect_to(address);
    let client_nonce = wharf::peer_auth::nonce().expect("nonce");
    let begin = call(
        &mut stream,
        &request(
            ApiKey::PeerAuthBegin,
            1,
            &PeerAuthBeginRequest {
                broker_id,
                client_nonce: client_nonce.to_vec(),
            },
            &[],
        ),
    )?;
    let begin: PeerAuthBeginResponse = begin.decode_body().expect("begin body");
    if begin.error != 0 {
        return None;
    }
    let proof = secret.client_proof(&begin.server_nonce, &client_nonce, broker_id);
    let proved = call(
        &mut stream,
        &request(
            ApiKey::PeerAuthProve,
            2,
            &PeerAuthProveRequest { proof },
            &[],
        ),
    )?;
    let result: TopicResult = proved.decode_body().expect("prove body");
    (result.error == 0).then_some(stream)
}
