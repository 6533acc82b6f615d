//! Consumer-group figures against a running broker or cluster:
//!
//! - `settle`: a group of `--members` members settles on a topic; then one more member joins,
//!   and the time until every member holds a balanced, disjoint share again is measured, with
//!   how many partitions changed owner; the extra member leaves and it starts over
//!   (`--rounds` times).
//! - `throughput`: `--records` records of `--record-bytes` are produced, then consumed to the
//!   end by one plain consumer (all partitions assigned) and by groups of each size in
//!   `--members-list`, each member on its own thread; records/s and MB/s of each.
//!
//! Prints a line per measurement and a JSON summary (`--json FILE`).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use wharf::client::consumer::{Consumer, ConsumerConfig, SeekTo};
use wharf::client::groups::{GroupConsumer, GroupConsumerConfig};
use wharf::client::producer::{Producer, ProducerConfig};
use wharf::client::{Client, ClientConfig};

#[derive(Parser)]
#[command(about = "Consumer-group figures: settle time after a join, group throughput")]
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
    Settle {
        #[arg(long, default_value_t = 6)]
        members: usize,
        #[arg(long, default_value_t = 24)]
        partitions: u32,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Give up on one settling after this long.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
    Throughput {
        #[arg(long, default_value_t = 8)]
        partitions: u32,
        #[arg(long, default_value_t = 400_000)]
        records: u64,
        #[arg(long, default_value_t = 1024)]
        record_bytes: usize,
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        members_list: Vec<usize>,
        /// Give up on one run after this long.
        #[arg(long, default_value_t = 120_000)]
        timeout_ms: u64,
    },
}

fn main() {
    let args = Args::parse();
    let summary = match &args.command {
        Command::Settle {
            members,
            partitions,
            rounds,
            timeout_ms,
        } => settle(&args.bootstrap, *members, *partitions, *rounds, *timeout_ms),
        Command::Throughput {
            partitions,
            records,
            record_bytes,
            members_list,
            timeout_ms,
        } => throughput(
            &args.bootstrap,
            *partitions,
            *records,
            *record_bytes,
            members_list,
            *timeout_ms,
        ),
    };
    match summary {
        Ok(summary) => {
            println!("{summary}");
            if let Some(path) = &args.json {
                if let Err(e) = std::fs::write(path, summary.to_string()) {
                    eprintln!("groupbench: writing {path}: {e}");
                    std::process::exit(2);
                }
            }
        }
        Err(error) => {
            eprintln!("groupbench: {error}");
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

fn member_config(group: &str) -> GroupConsumerConfig {
    let mut config = GroupConsumerConfig::new(group);
    config.consumer = ConsumerConfig {
        max_wait_ms: 20,
        ..ConsumerConfig::default()
    };
    config
}

type Shares = Rc<RefCell<BTreeMap<usize, BTreeSet<u32>>>>;

/// Runs a member until `stop`: polls, and publishes its assignment in `shares`.
fn spawn_member(
    bootstrap: String,
    topic: String,
    group: String,
    slot: usize,
    shares: Shares,
    stop: Rc<std::cell::Cell<bool>>,
) {
    glommio::spawn_local(async move {
        let Ok(client) = connect(&bootstrap).await else {
            return;
        };
        let Ok(mut member) = GroupConsumer::join(client, &topic, member_config(&group)).await
        else {
            return;
        };
        while !stop.get() {
            if member.poll().await.is_err() {
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
            shares
                .borrow_mut()
                .insert(slot, member.assignment().into_iter().collect());
        }
        let _ = member.leave().await;
        shares.borrow_mut().remove(&slot);
    })
    .detach();
}

/// Whether `members` members hold every partition once, balanced.
fn settled(shares: &BTreeMap<usize, BTreeSet<u32>>, members: usize, partitions: u32) -> bool {
    if shares.len() != members {
        return false;
    }
    let total: usize = shares.values().map(BTreeSet::len).sum();
    let union: BTreeSet<u32> = shares.values().flatten().copied().collect();
    let (min, max) = shares
        .values()
        .map(BTreeSet::len)
        .fold((usize::MAX, 0), |(lo, hi), n| (lo.min(n), hi.max(n)));
    total == partitions as usize && union.len() == partitions as usize && max - min <= 1
}

fn owners(shares: &BTreeMap<usize, BTreeSet<u32>>) -> BTreeMap<u32, usize> {
    shares
        .iter()
        .flat_map(|(slot, set)| set.iter().map(move |p| (*p, *slot)))
        .collect()
}

async fn wait_settled(
    shares: &Shares,
    members: usize,
    partitions: u32,
    timeout_ms: u64,
) -> Result<Duration, String> {
    let started = Instant::now();
    for _ in 0..timeout_ms {
        if settled(&shares.borrow(), members, partitions) {
            return Ok(started.elapsed());
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    Err(format!(
        "{members} members did not settle within {timeout_ms} ms: {:?}",
        shares.borrow()
    ))
}

fn settle(
    bootstrap: &str,
    members: usize,
    partitions: u32,
    rounds: usize,
    timeout_ms: u64,
) -> Result<serde_json::Value, String> {
    let bootstrap = bootstrap.to_string();
    wharf::runtime::run_local("groupbench", async move {
        let topic = unique("settle");
        let group = unique("g");
        let client = connect(&bootstrap).await?;
        client
            .create_topic(&topic, partitions, 1, Vec::new())
            .await
            .map_err(|e| e.to_string())?;
        let shares: Shares = Rc::default();
        let stop_all = Rc::new(std::cell::Cell::new(false));
        for slot in 0..members {
            spawn_member(
                bootstrap.clone(),
                topic.clone(),
                group.clone(),
                slot,
                Rc::clone(&shares),
                Rc::clone(&stop_all),
            );
        }
        wait_settled(&shares, members, partitions, timeout_ms).await?;
        let mut times_ms = Vec::new();
        let mut moved = Vec::new();
        for round in 0..rounds {
            let before = owners(&shares.borrow());
            let stop = Rc::new(std::cell::Cell::new(false));
            spawn_member(
                bootstrap.clone(),
                topic.clone(),
                group.clone(),
                members,
                Rc::clone(&shares),
                Rc::clone(&stop),
            );
            let took = wait_settled(&shares, members + 1, partitions, timeout_ms).await?;
            let after = owners(&shares.borrow());
            let changed = before
                .iter()
                .filter(|(p, owner)| after.get(p) != Some(owner))
                .count();
            println!(
                "round {round}: member {} joined a group of {members} on {partitions} partitions; settled in {} ms, {changed} partitions moved",
                members + 1,
                took.as_millis()
            );
            times_ms.push(took.as_secs_f64() * 1000.0);
            moved.push(changed);
            stop.set(true);
            wait_settled(&shares, members, partitions, timeout_ms).await?;
        }
        stop_all.set(true);
        glommio::timer::sleep(Duration::from_millis(200)).await;
        let _ = client.delete_topic(&topic).await;
        let mut sorted = times_ms.clone();
        sorted.sort_by(f64::total_cmp);
        Ok(serde_json::json!({
            "figure": "settle",
            "members": members,
            "partitions": partitions,
            "rounds": rounds,
            "settle_ms": times_ms,
            "settle_ms_median": sorted.get(sorted.len() / 2),
            "partitions_moved": moved,
            "partitions_moved_minimum": partitions as usize / (members + 1),
        }))
    })
    .map_err(|e| e.to_string())?
}

fn throughput(
    bootstrap: &str,
    partitions: u32,
    records: u64,
    record_bytes: usize,
    members_list: &[usize],
    timeout_ms: u64,
) -> Result<serde_json::Value, String> {
    let topic = unique("gthroughput");
    {
        let bootstrap = bootstrap.to_string();
        let topic = topic.clone();
        wharf::runtime::run_local("groupbench-produce", async move {
            let client = connect(&bootstrap).await?;
            client
                .create_topic(&topic, partitions, 1, Vec::new())
                .await
                .map_err(|e| e.to_string())?;
            let producer = Producer::new(Rc::clone(&client), ProducerConfig::default());
            let value = vec![b'x'; record_bytes];
            for i in 0..records {
                producer
                    .send_to(
                        &topic,
                        Some((i % u64::from(partitions)) as u32),
                        None,
                        &value,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
            }
            producer.flush().await;
            producer.close().await;
            Ok::<(), String>(())
        })
        .map_err(|e| e.to_string())??;
    }
    let mut results = Vec::new();
    let plain = consume_plain(bootstrap, &topic, records, timeout_ms)?;
    println!(
        "one plain consumer: {records} records in {:.2} s = {:.0} records/s",
        plain.as_secs_f64(),
        records as f64 / plain.as_secs_f64()
    );
    results.push(
        serde_json::json!({"consumer": "plain", "members": 1, "seconds": plain.as_secs_f64(),
        "records_per_s": records as f64 / plain.as_secs_f64(),
        "mb_per_s": (records as f64 * record_bytes as f64) / plain.as_secs_f64() / 1e6}),
    );
    for &members in members_list {
        let took = consume_group(bootstrap, &topic, members, records, timeout_ms)?;
        println!(
            "group of {members}: {records} records in {:.2} s = {:.0} records/s",
            took.as_secs_f64(),
            records as f64 / took.as_secs_f64()
        );
        results.push(serde_json::json!({"consumer": "group", "members": members, "seconds": took.as_secs_f64(),
            "records_per_s": records as f64 / took.as_secs_f64(),
            "mb_per_s": (records as f64 * record_bytes as f64) / took.as_secs_f64() / 1e6}));
    }
    Ok(serde_json::json!({
        "figure": "throughput",
        "partitions": partitions,
        "records": records,
        "record_bytes": record_bytes,
        "runs": results,
    }))
}

fn consume_plain(
    bootstrap: &str,
    topic: &str,
    records: u64,
    timeout_ms: u64,
) -> Result<Duration, String> {
    let bootstrap = bootstrap.to_string();
    let topic = topic.to_string();
    wharf::runtime::run_local("groupbench-plain", async move {
        let client = connect(&bootstrap).await?;
        let mut consumer = Consumer::new(client, &topic, ConsumerConfig::default());
        consumer
            .assign(None, SeekTo::Earliest)
            .await
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let mut seen = 0u64;
        while seen < records {
            if started.elapsed() > Duration::from_millis(timeout_ms) {
                return Err(format!(
                    "plain consumer: {seen} of {records} in {timeout_ms} ms"
                ));
            }
            let polled = consumer.poll().await.map_err(|e| e.to_string())?;
            seen += polled.for_each(|_| {}).map_err(|e| e.to_string())? as u64;
        }
        Ok(started.elapsed())
    })
    .map_err(|e| e.to_string())?
}

/// `members` group members, each on its own thread, consume the topic to its end.
fn consume_group(
    bootstrap: &str,
    topic: &str,
    members: usize,
    records: u64,
    timeout_ms: u64,
) -> Result<Duration, String> {
    let group = unique("throughput");
    let consumed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    // When the group's count reached `records` (ns after `started`).
    let done_ns = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..members)
        .map(|i| {
            let (bootstrap, topic, group) =
                (bootstrap.to_string(), topic.to_string(), group.clone());
            let (consumed, failed) = (Arc::clone(&consumed), Arc::clone(&failed));
            let done_ns = Arc::clone(&done_ns);
            std::thread::spawn(move || {
                let failing = Arc::clone(&failed);
                let result = wharf::runtime::run_local(&format!("member-{i}"), async move {
                    let client = connect(&bootstrap).await?;
                    let mut member = GroupConsumer::join(client, &topic, member_config(&group))
                        .await
                        .map_err(|e| e.to_string())?;
                    while consumed.load(Ordering::Relaxed) < records
                        && !failed.load(Ordering::Relaxed)
                    {
                        if started.elapsed() > Duration::from_millis(timeout_ms) {
                            return Err(format!("group of {members}: timed out"));
                        }
                        let polled = member.poll().await.map_err(|e| e.to_string())?;
                        let n = polled.for_each(|_| {}).map_err(|e| e.to_string())? as u64;
                        let before = consumed.fetch_add(n, Ordering::Relaxed);
                        if before < records && before + n >= records {
                            done_ns.store(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        }
                    }
                    let _ = member.leave().await;
                    Ok::<(), String>(())
                });
                match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => {
                        failing.store(true, Ordering::Relaxed);
                        Err(e)
                    }
                    Err(e) => {
                        failing.store(true, Ordering::Relaxed);
                        Err(e.to_string())
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread
            .join()
            .map_err(|_| "a member thread panicked".to_string())??;
    }
    let total = consumed.load(Ordering::Relaxed);
    if total < records {
        return Err(format!("group of {members}: consumed {total} of {records}"));
    }
    if total > records {
        eprintln!(
            "group of {members}: {} records consumed twice (a rebalance without a commit)",
            total - records
        );
    }
    Ok(Duration::from_nanos(done_ns.load(Ordering::Relaxed)))
}
