//! Like `ping`, with a blocking std socket as the client (isolates the server's share).
use std::io::{Read, Write};
use std::time::Instant;

use wharf::protocol::*;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let address = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:9092".to_string());
    let count: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut samples = Vec::new();
    let mut buffer = vec![0u8; 4096];
    for id in 0..count {
        let frame = encode_frame(
            FrameKind::request(ApiKey::Versions, id as u32 + 1),
            &VersionsRequest {
                client_name: "p".to_string(),
            },
            &[],
        )
        .expect("encode");
        let started = Instant::now();
        stream.write_all(&frame).expect("write");
        stream
            .read_exact(&mut buffer[..FRAME_HEADER_BYTES])
            .expect("read");
        let mut header = [0u8; FRAME_HEADER_BYTES];
        header.copy_from_slice(&buffer[..FRAME_HEADER_BYTES]);
        let header = FrameHeader::decode(&header, 1 << 20).expect("header");
        let rest = header.frame_bytes as usize - FRAME_HEADER_BYTES;
        stream.read_exact(&mut buffer[..rest]).expect("read");
        samples.push(started.elapsed().as_micros() as u64);
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "std client round trip µs: p50 {} p90 {} p99 {} max {}",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );
}
