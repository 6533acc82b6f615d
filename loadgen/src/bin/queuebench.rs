//! Queue figures against a running broker or cluster:
//!
//! - `throughput`: `--records` records of `--record-bytes` are produced, then consumed through a
//!   new queue group by each member count of `--members-list` (members are tasks on one
//!   thread, sharing one connection), every record acked individually (the acks of one
//!   acquire go in one settle request); records/s of each.
//! - `redelivery`: a member acquires `--records` records and nacks each without a delay, so
//!   each comes back after the queue's backoff (`--delay-ms`); the error of each redelivery
//!   is the time it reached the member minus the nack's answer time plus the delay
//!   (HdrHistogram, p50/p99/max).
//!
//! Prints a line per measurement and a JSON summary (`--json FILE`).

use std::rc::Rc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use wharf::client::producer::{Producer, ProducerConfig};
use wharf::client::queues::QueueMember;
use wharf::client::{Client, ClientConfig};
use wharf::protocol::{QueueSettings, QueueSettlement, SettleAction};

#[derive(Parser)]
#[command(about = "Queue figures: throughput with per-record acks, redelivery timing")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    #[arg(long)]
    json: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Throughput {
        #[arg(long, default_value_t = 8)]
        partitions: u32,
        #[arg(long, default_value_t = 100_000)]
        records: u64,
        #[arg(long, default_value_t = 1024)]
        record_bytes: usize,
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        members_list: Vec<usize>,
        /// Records per acquire.
        #[arg(long, default_value_t = 100)]
        batch: u32,
        /// Give up on one run after this long.
        #[arg(long, default_value_t = 300_000)]
        timeout_ms: u64,
    },
    Redelivery {
        #[arg(long, default_value_t = 500)]
        records: u32,
        #[arg(long, default_value_t = 500)]
        delay_ms: u64,
    },
}

fn main() {
    let args = Args::parse();
    let bootstrap = args.bootstrap.clone();
    let summary = match args.command {
        Command::Throughput {
            partitions,
            records,
            record_bytes,
            members_list,
            batch,
            timeout_ms,
        } => wharf::runtime::run_local("queuebench", async move {
            throughput(
                &bootstrap,
                partitions,
                records,
                record_bytes,
                &members_list,
                batch,
                timeout_ms,
            )
            .await
        }),
        Command::Redelivery { records, delay_ms } => {
            wharf::runtime::run_local("queuebench", async move {
                redelivery(&bootstrap, records, delay_ms).await
            })
        }
    };
    let summary = summary.map_err(|e| e.to_string()).and_then(|r| r);
    match summary {
        Ok(summary) => {
            println!("{summary}");
            if let Some(path) = &args.json {
                if let Err(e) = std::fs::write(path, summary.to_string()) {
                    eprintln!("queuebench: writing {path}: {e}");
                    std::process::exit(2);
                }
            }
        }
        Err(error) => {
            eprintln!("queuebench: {error}");
            std::process::exit(1);
        }
    }
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{nanos}")
}

async fn connect(bootstrap: &str) -> Result<Rc<Client>, String> {
    Client::connect(ClientConfig::new(bootstrap))
        .await
        .map_err(|e| e.to_string())
}

async fn produce(
    client: &Rc<Client>,
    topic: &str,
    partitions: u32,
    records: u64,
    record_bytes: usize,
) -> Result<(), String> {
    client
        .create_topic(topic, partitions, 1, Vec::new())
        .await
        .map_err(|e| e.to_string())?;
    let producer = Producer::new(Rc::clone(client), ProducerConfig::default());
    let value = vec![b'x'; record_bytes];
    for i in 0..records {
        producer
            .send_to(
                topic,
                Some((i % u64::from(partitions)) as u32),
                None,
                &value,
            )
            .await
            .map_err(|e| e.to_string())?;
    }
    producer.flush().await;
    producer.close().await;
    Ok(())
}

async fn throughput(
    bootstrap: &str,
    partitions: u32,
    records: u64,
    record_bytes: usize,
    members_list: &[usize],
    batch: u32,
    timeout_ms: u64,
) -> Result<serde_json::Value, String> {
    let client = connect(bootstrap).await?;
    let topic = unique("qthroughput");
    produce(&client, &topic, partitions, records, record_bytes).await?;
    let mut runs = Vec::new();
    for &members in members_list {
        let group = unique("qbench");
        client
            .create_queue(&group, &topic, QueueSettings::default())
            .await
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        let started = Instant::now();
        let acked = Rc::new(std::cell::Cell::new(0u64));
        let tasks: Vec<_> = (0..members)
            .map(|m| {
                let member = QueueMember::new(Rc::clone(&client), &group, &format!("m{m}"));
                let acked = Rc::clone(&acked);
                glommio::spawn_local(async move {
                    while acked.get() < records && Instant::now() < deadline {
                        let got = member
                            .acquire(batch, 100)
                            .await
                            .map_err(|e| e.to_string())?;
                        if got.is_empty() {
                            continue;
                        }
                        let settlements = got
                            .iter()
                            .map(|d| QueueSettlement {
                                partition: d.partition,
                                offset: d.offset,
                                delivery_attempt: d.delivery_attempt,
                                action: SettleAction::Ack,
                            })
                            .collect();
                        let results = member
                            .settle(settlements)
                            .await
                            .map_err(|e| e.to_string())?;
                        let ok = results.iter().filter(|r| r.error == 0).count() as u64;
                        acked.set(acked.get() + ok);
                    }
                    Ok::<(), String>(())
                })
            })
            .collect();
        for task in tasks {
            task.await?;
        }
        let took = started.elapsed();
        if acked.get() < records {
            return Err(format!(
                "{members} members acked {} of {records} records within {timeout_ms} ms",
                acked.get()
            ));
        }
        let per_s = records as f64 / took.as_secs_f64();
        println!(
            "{members} member(s): {records} records acked one by one in {:.2} s = {per_s:.0} records/s",
            took.as_secs_f64()
        );
        runs.push(
            serde_json::json!({"members": members, "seconds": took.as_secs_f64(),
            "records_per_s": per_s, "mb_per_s": per_s * record_bytes as f64 / 1e6}),
        );
    }
    Ok(serde_json::json!({
        "figure": "queue_throughput",
        "partitions": partitions,
        "records": records,
        "record_bytes": record_bytes,
        "batch": batch,
        "runs": runs,
    }))
}

async fn redelivery(
    bootstrap: &str,
    records: u32,
    delay_ms: u64,
) -> Result<serde_json::Value, String> {
    let client = connect(bootstrap).await?;
    let topic = unique("qredelivery");
    produce(&client, &topic, 4, u64::from(records), 64).await?;
    let group = unique("qtiming");
    client
        .create_queue(
            &group,
            &topic,
            QueueSettings {
                ack_wait_ms: 600_000,
                backoff_list_ms: vec![delay_ms],
                ..QueueSettings::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    let member = QueueMember::new(Rc::clone(&client), &group, "timing");
    let mut due: std::collections::BTreeMap<(u32, u64), Instant> = Default::default();
    let mut early = 0u64;
    let mut errors =
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_millis(60_000 + delay_ms * 4);
    let mut redelivered = 0u32;
    while redelivered < records && Instant::now() < deadline {
        let got = member.acquire(100, 200).await.map_err(|e| e.to_string())?;
        let now = Instant::now();
        for d in got {
            let key = (d.partition, d.offset);
            if d.delivery_attempt == 1 {
                member.nack(&d, None).await.map_err(|e| e.to_string())?;
                due.insert(key, Instant::now() + Duration::from_millis(delay_ms));
            } else {
                let Some(at) = due.get(&key) else {
                    return Err(format!("{key:?} redelivered without a nack"));
                };
                match now.checked_duration_since(*at) {
                    Some(late) => errors
                        .record((late.as_micros() as u64).max(1))
                        .map_err(|e| e.to_string())?,
                    None => early += 1,
                }
                member.ack(&d).await.map_err(|e| e.to_string())?;
                redelivered += 1;
            }
        }
    }
    if redelivered < records {
        return Err(format!(
            "{redelivered} of {records} records redelivered in time"
        ));
    }
    let ms = |us: u64| us as f64 / 1_000.0;
    println!(
        "redelivery after a {delay_ms} ms backoff: error p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {early} redelivered before the time measured at the client's nack answer",
        ms(errors.value_at_quantile(0.5)),
        ms(errors.value_at_quantile(0.99)),
        ms(errors.max())
    );
    Ok(serde_json::json!({
        "figure": "redelivery_timing",
        "records": records,
        "delay_ms": delay_ms,
        "error_ms_p50": ms(errors.value_at_quantile(0.5)),
        "error_ms_p99": ms(errors.value_at_quantile(0.99)),
        "error_ms_max": ms(errors.max()),
        "early": early,
    }))
}
