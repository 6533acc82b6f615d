//! Round-trip latency of a small request (Versions), one at a time: the network and runtime
//! floor under produce latency. `cargo run --release --example ping -- 127.0.0.1:9092 [N]`.

use std::time::Instant;

use wharf::client::{Client, ClientConfig};
use wharf::protocol::{ApiKey, VersionsRequest};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bootstrap = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:9092".to_string());
    let count: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let result = wharf::runtime::run_local("ping", async move {
        let client = Client::connect(ClientConfig::new(bootstrap))
            .await
            .map_err(|e| e.to_string())?;
        let connection = client.bootstrap().await.map_err(|e| e.to_string())?;
        let mut samples = Vec::with_capacity(count);
        for _ in 0..count {
            let started = Instant::now();
            connection
                .call(
                    ApiKey::Versions,
                    &VersionsRequest {
                        client_name: "ping".to_string(),
                    },
                    Vec::new(),
                    5_000,
                )
                .await
                .map_err(|e| e.to_string())?;
            samples.push(started.elapsed().as_micros() as u64);
        }
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
        println!(
            "versions round trip µs: p50 {} p90 {} p99 {} max {}",
            at(0.5),
            at(0.9),
            at(0.99),
            at(1.0)
        );
        Ok::<(), String>(())
    });
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("ping: {e}"),
        Err(e) => eprintln!("ping: {e}"),
    }
}
