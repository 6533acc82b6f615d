//! The idempotent producer end to end on a real `wharf serve`: a batch sent again (its answer
//! was lost) is written once and answered with its original offsets, also after a kill -9 and
//! restart (the state is rebuilt from the log); a gap is refused as `out_of_order_sequence`
//! and an older epoch as `invalid_producer_epoch`, both appending nothing; producer ids never
//! repeat across restarts; the client's producer is idempotent by default. The same over a
//! failover is in `failover.rs`.

mod common;

use std::rc::Rc;

use common::good_client::read_all;
use common::{run, wire, Broker};
use wharf::client::producer::{Producer, ProducerConfig};
use wharf::client::{Client, ClientConfig};
use wharf::protocol::{Acks, ErrorCode, ProducePartitionResponse};

const TOPIC: &str = "idempotent";

fn produce(address: &str, id: u32, batch: &[u8]) -> ProducePartitionResponse {
    let mut stream = wire::connect_to(address);
    wire::produce_with(&mut stream, id, TOPIC, 0, Acks::All, batch)
}

fn offsets(answer: &ProducePartitionResponse) -> (u64, u64) {
    assert_eq!(
        ErrorCode::from_u16(answer.error),
        ErrorCode::None,
        "{}",
        answer.message
    );
    (answer.base_offset, answer.last_offset)
}

fn values(address: &str) -> Vec<Vec<u8>> {
    read_all(address, TOPIC)
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

#[test]
fn a_retried_batch_is_written_once_even_after_a_restart_and_gaps_and_old_epochs_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(dir.path(), 2, "");
    run(async {
        let client = Client::connect(ClientConfig::new(broker.bootstrap()))
            .await
            .expect("connect");
        client
            .create_topic(TOPIC, 1, 1, Vec::new())
            .await
            .expect("create");
    });
    let address = broker.bootstrap();
    let producer = wire::init_producer_id(&address);
    assert_ne!(
        wire::init_producer_id(&address),
        producer,
        "a new id each time"
    );
    let a = wire::idempotent_batch(producer, 0, 0, &[b"a0", b"a1"]);
    let b = wire::idempotent_batch(producer, 0, 2, &[b"b0"]);
    assert_eq!(offsets(&produce(&address, 1, &a)), (0, 1));
    // Its answer was lost: the same batch again is answered with the same offsets.
    assert_eq!(offsets(&produce(&address, 2, &a)), (0, 1));
    assert_eq!(offsets(&produce(&address, 3, &b)), (2, 2));
    let (_, metrics) = broker.http_get("/metrics").expect("metrics");
    let duplicates = metrics
        .lines()
        .find(|l| {
            l.starts_with("wharf_partition_produce_duplicates_total{")
                && l.contains("topic=\"idempotent\"")
        })
        .unwrap_or_default();
    assert!(
        duplicates.ends_with(" 1"),
        "one duplicate counted: {duplicates:?}"
    );
    assert_eq!(
        values(&address),
        [b"a0".to_vec(), b"a1".to_vec(), b"b0".to_vec()]
    );

    // After kill -9 and a restart the broker rebuilds the producer state from its log.
    broker.kill9();
    broker.restart();
    let address = broker.bootstrap();
    assert_eq!(
        offsets(&produce(&address, 4, &b)),
        (2, 2),
        "a retry after a restart"
    );
    let after_restart = wire::init_producer_id(&address);
    assert!(
        after_restart != producer && after_restart >> 20 != producer >> 20,
        "a restarted broker hands out ids from a new block: {after_restart:#x} vs {producer:#x}"
    );

    // A gap (sequence 3 was never sent) appends nothing.
    let gap = produce(
        &address,
        5,
        &wire::idempotent_batch(producer, 0, 4, &[b"gap"]),
    );
    assert_eq!(
        ErrorCode::from_u16(gap.error),
        ErrorCode::OutOfOrderSequence,
        "{gap:?}"
    );
    // A new epoch starts at sequence 0 and fences the old one.
    let fresh = wire::idempotent_batch(producer, 1, 0, &[b"e1"]);
    assert_eq!(offsets(&produce(&address, 6, &fresh)), (3, 3));
    let stale = produce(
        &address,
        7,
        &wire::idempotent_batch(producer, 0, 3, &[b"old"]),
    );
    assert_eq!(
        ErrorCode::from_u16(stale.error),
        ErrorCode::InvalidProducerEpoch,
        "{stale:?}"
    );
    assert_eq!(
        values(&address),
        [
            b"a0".to_vec(),
            b"a1".to_vec(),
            b"b0".to_vec(),
            b"e1".to_vec()
        ],
        "each batch once, nothing from the refused ones"
    );

    // The client's producer is idempotent by default, and its batches land in order.
    run(async {
        let client = Client::connect(ClientConfig::new(&address))
            .await
            .expect("connect");
        let producer = Producer::new(
            Rc::clone(&client),
            ProducerConfig {
                max_in_flight_per_partition: 5,
                batch_bytes: 1024,
                linger_ms: 0,
                ..ProducerConfig::default()
            },
        );
        assert!(producer.config().idempotent);
        let mut deliveries = Vec::new();
        for i in 0..500u32 {
            let value = format!("c{i:04}");
            deliveries.push(
                producer
                    .send(TOPIC, None, value.as_bytes())
                    .await
                    .expect("queued"),
            );
        }
        producer.flush().await;
        for delivery in deliveries {
            delivery.await.expect("acknowledged");
        }
    });
    let all = read_all(&address, TOPIC);
    let client_values: Vec<Vec<u8>> = all.iter().skip(4).map(|(_, v)| v.clone()).collect();
    let expected: Vec<Vec<u8>> = (0..500u32)
        .map(|i| format!("c{i:04}").into_bytes())
        .collect();
    assert_eq!(client_values, expected);
}
