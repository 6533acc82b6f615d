//! `wharf-loadgen`: drives a Wharf cluster (or a broker it starts itself) with producers and
//! consumers running thread-per-core on glommio, and reports throughput and HdrHistogram
//! latencies (produce-ack and end-to-end), optionally auditing that every acknowledged record
//! was kept. See the README section "Load generator" for the options and the JSON keys.

mod audit;
mod gaps;
mod plot;
mod rate;
mod report;
mod resilient;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use wharf::client::consumer::{Consumer, ConsumerConfig, SeekTo};
use wharf::client::producer::{Delivery, Partitioner, Producer, ProducerConfig, RecordMetadata};
use wharf::client::{Client, ClientError};
use wharf::protocol::{Acks, ConfigEntry, ErrorCode};

use audit::{AckLog, OffsetMap, Stamp, VerifyReport, RECORD_HEADER_BYTES};
use gaps::AckTimes;
use rate::{Rate, Schedule};
use report::{human_us, new_histogram, percentiles, Percentiles};
use resilient::ClientSlot;

#[derive(Parser, Debug, Clone)]
#[command(name = "wharf-loadgen", version, about = "Load generator for Wharf")]
struct Args {
    /// Brokers of the cluster to drive, comma-separated (`a:9092,b:9092`): the first that
    /// answers bootstraps the client, the next ones take over when it stops answering.
    /// Without it, a broker is started in this process.
    #[arg(long)]
    bootstrap: Option<String>,
    /// Start a broker in this process with a temporary data directory (default without
    /// --bootstrap).
    #[arg(long)]
    embedded: bool,
    /// Data directory of the embedded broker (default: a temporary directory, removed after).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Shards of the embedded broker (0 = one per core).
    #[arg(long, default_value_t = 0)]
    broker_shards: usize,
    /// fsync mode of a topic this tool creates: always (before every ack) or interval.
    #[arg(long, default_value = "always")]
    fsync: String,
    #[arg(long, default_value = "loadgen")]
    topic: String,
    /// Partitions of a topic this tool creates.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Replicas per partition of a topic this tool creates (a cluster needs this many brokers).
    #[arg(long, default_value_t = 1)]
    replication_factor: u16,
    #[arg(long, default_value_t = 2)]
    producers: usize,
    #[arg(long, default_value_t = 0)]
    consumers: usize,
    /// Every consumer reads every partition (independent subscribers, like one consumer
    /// group each), instead of the consumers splitting the partitions.
    #[arg(long)]
    fan_out: bool,
    /// The consumers' rack (follower reads: `replica_selector = rack` topics send them to a
    /// replica in it).
    #[arg(long)]
    client_rack: Option<String>,
    /// Topic setting KEY=VALUE for a topic this tool creates (repeatable), e.g.
    /// `replica_selector=leader`.
    #[arg(long = "topic-config", value_name = "KEY=VALUE")]
    topic_configs: Vec<String>,
    /// produce, consume (drain from earliest) or e2e (producers and consumers at once).
    /// Default: e2e with consumers, else produce.
    #[arg(long)]
    workload: Option<String>,
    #[arg(long, default_value_t = 1024)]
    message_bytes: usize,
    #[arg(long, default_value_t = 1024 * 1024)]
    batch_bytes: usize,
    #[arg(long, default_value_t = 1)]
    linger_ms: u64,
    /// none, leader, quorum, all or a replica count.
    #[arg(long, default_value = "leader")]
    acks: String,
    /// Messages per second over all producers (open loop, coordinated-omission corrected),
    /// or max (closed loop).
    #[arg(long, default_value = "max")]
    rate: String,
    /// Records per producer awaiting their ack (0: bounded only by the producer buffer).
    #[arg(long, default_value_t = 0)]
    max_in_flight: usize,
    /// Produce requests per partition in flight at once (more data per fsync on the broker;
    /// idempotent producers keep order with up to 5; without idempotence, above 1 a retried
    /// batch may land after later ones, which --verify reports).
    #[arg(long, default_value_t = 4)]
    requests_in_flight: usize,
    /// Turn the producers' idempotence off (on by default: a retried batch is written once).
    #[arg(long)]
    no_idempotence: bool,
    /// Producer buffer (backpressure beyond it).
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    buffer_bytes: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Keyless records: sticky (one partition until its batch is sent or a batch's worth went
    /// there, then the least backlogged one: full batches at any rate, slow partitions get less)
    /// or round-robin (every record to the next partition: every partition busy at max rate).
    #[arg(long, default_value = "sticky")]
    partitioner: String,
    /// Distinct keys (0: no keys; see --partitioner).
    #[arg(long, default_value_t = 0)]
    keys: u64,
    #[arg(long)]
    seed: Option<u64>,
    /// Client threads busy-poll this long before sleeping (lower latency for CPU time); also
    /// applied to the embedded broker's shards.
    #[arg(long, default_value_t = 0)]
    spin_us: u64,
    /// Client threads, one glommio executor each (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write `PREFIX-produce.hgrm` and `PREFIX-e2e.hgrm` percentile distributions.
    #[arg(long)]
    hgrm: Option<String>,
    /// Draw the latency percentile curves into this SVG file.
    #[arg(long)]
    plot: Option<String>,
    /// Read everything back after the run and check no acknowledged record was lost or
    /// moved, no offset held two records and the log is dense below the high watermark; failed
    /// deliveries are sent again (same id) until the run ends.
    #[arg(long)]
    verify: bool,
    /// With --verify: consumers tailing every partition from the start during the run, booking
    /// the record they see at each offset (checked against each other and the read-back).
    #[arg(long, default_value_t = 0)]
    tail_consumers: usize,
    /// With --verify: at most this many records are sent (8 bytes each per audit table); the
    /// producers stop early when it is reached.
    #[arg(long, default_value_t = 20_000_000)]
    audit_records_max: u64,
    /// With --verify: seconds the read-back may take (retrying) before unread partitions fail.
    #[arg(long, default_value_t = 60.0)]
    verify_timeout: f64,
    /// Write the acknowledgement times per partition and their largest gaps (JSON) here; also
    /// sends failed deliveries again until the run ends.
    #[arg(long)]
    gap_report: Option<PathBuf>,
    /// How long the broker may take to answer one request.
    #[arg(long, default_value_t = 30_000)]
    request_timeout_ms: u64,
    /// How long the producer retries a record before it counts as failed.
    #[arg(long, default_value_t = 120_000)]
    delivery_timeout_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    Produce,
    Consume,
    EndToEnd,
}

/// An open-loop sender sleeps only when it is more than this ahead of its schedule; records
/// due within it go out at once (timed from their actual send). A timer wake-up costs more
/// CPU than many sends: waking once per millisecond, not once per record, keeps the load
/// generator's own CPU (which the brokers on the same cores need) low at moderate rates.
const PACING_AHEAD_MAX: Duration = Duration::from_millis(1);
/// A sleeping sender wakes this much before the record it slept for is due (timer lateness).
const PACING_WAKE_EARLY: Duration = Duration::from_micros(50);
/// How often each client thread refreshes its metadata (and so notices a dead bootstrap
/// broker) when the run must survive failures.
const METADATA_REFRESH_INTERVAL: Duration = Duration::from_millis(250);
/// A failed delivery is sent again no sooner than this after it failed.
const RESEND_BACKOFF: Duration = Duration::from_millis(100);

/// Live counters shared with the progress printer.
#[derive(Default)]
struct Progress {
    acked: AtomicU64,
    acked_bytes: AtomicU64,
    received: AtomicU64,
    /// µs; each thread publishes its last interval's p99, the printer shows the largest.
    p99_us: Vec<AtomicU64>,
}

/// What one client thread measured.
#[derive(Default)]
struct ThreadResult {
    produce: Option<Histogram<u64>>,
    e2e: Option<Histogram<u64>>,
    sent: u64,
    acked: u64,
    acked_measured: u64,
    acked_measured_bytes: u64,
    received_measured: u64,
    received_measured_bytes: u64,
    errors: BTreeMap<String, u64>,
    acks: AckLog,
    ack_times: AckTimes,
    /// What this thread's tailing consumers saw.
    tail_seen: Option<OffsetMap>,
    /// Records sent again after a failed delivery.
    resent: u64,
    reconnections: u64,
    cpu_busy: f64,
}

struct Plan {
    args: Args,
    workload: Workload,
    acks: Acks,
    rate: Rate,
    bootstrap: String,
    addresses: Vec<String>,
    run_id: u32,
    seed: u64,
    start: Instant,
    measure_from: Instant,
    end: Instant,
    measure_from_wall_us: u64,
    progress: Arc<Progress>,
    /// Records sent so far (bounded by --audit-records-max with --verify).
    audit_sent: AtomicU64,
    audit_truncated: std::sync::atomic::AtomicBool,
}

impl Plan {
    /// Failed deliveries are sent again (same id) until the run ends.
    fn resends(&self) -> bool {
        self.args.verify || self.args.gap_report.is_some()
    }
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    // Batches (and the embedded broker's frames and staging buffers) are allocated per request:
    // keep freed memory in the process, as `wharf serve` does.
    let _ = wharf::runtime::keep_freed_memory();
    match run(args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("wharf-loadgen: {error}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> Result<ExitCode, String> {
    let acks: Acks = args.acks.parse()?;
    let rate: Rate = args.rate.parse()?;
    if args.message_bytes < RECORD_HEADER_BYTES + 4 {
        return Err(format!(
            "--message-bytes must be at least {} (records carry a header)",
            RECORD_HEADER_BYTES + 4
        ));
    }
    if !(args.duration > 0.0 && args.warmup >= 0.0) {
        return Err("--duration must be positive and --warmup not negative".to_string());
    }
    if !["sticky", "round-robin"].contains(&args.partitioner.as_str()) {
        return Err(format!(
            "--partitioner takes sticky or round-robin, not {:?}",
            args.partitioner
        ));
    }
    if !["always", "interval"].contains(&args.fsync.as_str()) {
        return Err(format!(
            "--fsync takes always or interval, not {:?}",
            args.fsync
        ));
    }
    let workload = match args.workload.as_deref() {
        None if args.consumers > 0 => Workload::EndToEnd,
        None | Some("produce") => Workload::Produce,
        Some("consume") => Workload::Consume,
        Some("e2e") => Workload::EndToEnd,
        Some(other) => {
            return Err(format!(
                "--workload takes produce, consume or e2e, not {other:?}"
            ))
        }
    };
    if workload != Workload::Produce && args.consumers == 0 {
        return Err("this workload needs --consumers 1 or more".to_string());
    }
    if workload != Workload::Consume && args.producers == 0 {
        return Err("this workload needs --producers 1 or more".to_string());
    }
    let seed = args.seed.unwrap_or_else(|| {
        // No OS RNG feature: time and pid are enough to vary runs; the seed is printed.
        u64::from(std::process::id())
            ^ SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
    });
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if args.threads == 0 {
        cores
    } else {
        args.threads
    };

    // The broker: embedded unless a bootstrap address was given.
    let mut temporary = None;
    let mut embedded = None;
    let bootstrap = match (&args.bootstrap, args.embedded) {
        (Some(bootstrap), false) => bootstrap.clone(),
        (Some(_), true) => return Err("--embedded and --bootstrap exclude each other".to_string()),
        (None, _) => {
            let data_dir = match &args.data_dir {
                Some(dir) => dir.clone(),
                None => {
                    let dir = tempfile::Builder::new()
                        .prefix("wharf-loadgen-")
                        .tempdir_in(std::env::current_dir().map_err(|e| e.to_string())?)
                        .map_err(|e| format!("cannot create a temporary data directory: {e}"))?;
                    let path = dir.path().to_path_buf();
                    temporary = Some(dir);
                    path
                }
            };
            let config = wharf::config::ServerConfig {
                data_dir,
                listen: "127.0.0.1:0".to_string(),
                admin_listen: "127.0.0.1:0".to_string(),
                shards: args.broker_shards,
                spin_before_park_us: args.spin_us,
                ..wharf::config::ServerConfig::default()
            };
            let server = wharf::server::start(config)?;
            let address = server.listen_address().to_string();
            embedded = Some(server);
            address
        }
    };

    let addresses: Vec<String> = bootstrap
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect();
    if addresses.is_empty() {
        return Err("--bootstrap names no address".to_string());
    }
    if args.tail_consumers > 0 && !args.verify {
        return Err("--tail-consumers needs --verify".to_string());
    }
    let fsync = prepare_topic(&args, &addresses)?;
    let progress = Arc::new(Progress {
        p99_us: (0..threads).map(|_| AtomicU64::new(0)).collect(),
        ..Progress::default()
    });
    let start = Instant::now() + Duration::from_millis(300);
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let plan = Arc::new(Plan {
        workload,
        acks,
        rate,
        bootstrap: bootstrap.clone(),
        run_id: (seed as u32) ^ (wall_us() as u32),
        seed,
        start,
        measure_from,
        end,
        measure_from_wall_us: wall_us() + (measure_from - Instant::now()).as_micros() as u64,
        progress: Arc::clone(&progress),
        args: args.clone(),
        addresses: addresses.clone(),
        audit_sent: AtomicU64::new(0),
        audit_truncated: std::sync::atomic::AtomicBool::new(false),
    });
    eprintln!(
        "wharf-loadgen: seed {seed}, {} on {bootstrap} ({}), topic {} acks={} fsync={fsync}",
        match workload {
            Workload::Produce => "produce",
            Workload::Consume => "consume",
            Workload::EndToEnd => "end-to-end",
        },
        if embedded.is_some() {
            "embedded broker"
        } else {
            "external cluster"
        },
        args.topic,
        acks,
    );

    let mut handles = Vec::new();
    for thread in 0..threads {
        let plan = Arc::clone(&plan);
        let handle = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spin_before_park(Duration::from_micros(args.spin_us))
            .name(&format!("loadgen-{thread}"))
            .io_memory(1024 * 1024)
            .spawn(move || async move { client_thread(thread, threads, plan).await })
            .map_err(|e| format!("cannot start a client thread (io_uring): {e}"))?;
        handles.push(handle);
    }
    print_progress(&plan, threads);
    let mut results = Vec::new();
    for handle in handles {
        results.push(
            handle
                .join()
                .map_err(|e| format!("client thread failed: {e}"))??,
        );
    }

    let mut acks = AckLog::default();
    let mut ack_times = AckTimes::default();
    let mut tails = Vec::new();
    for result in &mut results {
        acks.merge(std::mem::take(&mut result.acks));
        ack_times.merge(std::mem::take(&mut result.ack_times));
        tails.extend(result.tail_seen.take());
    }
    let verify = if args.verify {
        let mut report = read_back(&plan, &acks, &tails)?;
        report.truncated = plan.audit_truncated.load(Ordering::Relaxed);
        Some(report)
    } else {
        None
    };
    drop(tails);
    let gap_report = args
        .gap_report
        .as_ref()
        .map(|_| ack_times.report(args.partitions, &plan.acks.to_string()));
    let summary = summarize(
        &plan,
        &fsync,
        threads,
        embedded.is_some(),
        results,
        verify,
        gap_report.as_ref(),
    );
    print_report(&summary);
    if let (Some(path), Some(gaps)) = (&args.gap_report, &gap_report) {
        std::fs::write(path, serde_json::to_string(gaps).unwrap_or_default())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&summary.json).unwrap_or_default(),
        )
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(prefix) = &args.hgrm {
        for (name, histogram) in [("produce", &summary.produce), ("e2e", &summary.e2e)] {
            let path = format!("{prefix}-{name}.hgrm");
            let mut file =
                std::fs::File::create(&path).map_err(|e| format!("cannot write {path}: {e}"))?;
            report::write_hgrm(&mut file, histogram)
                .map_err(|e| format!("cannot write {path}: {e}"))?;
        }
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "wharf-loadgen: acks={} fsync={fsync} {} B messages, rate {}",
            plan.acks, args.message_bytes, args.rate
        );
        plot::draw(
            path,
            &title,
            &[
                ("produce-ack", &summary.produce),
                ("end-to-end", &summary.e2e),
            ],
        )?;
    }
    if let Some(mut server) = embedded {
        server.shutdown();
        server.join()?;
    }
    drop(temporary);
    if let Some(v) = summary.verify.as_ref().filter(|v| v.failed()) {
        eprintln!("wharf-loadgen: AUDIT FAILED: {}", v.human());
        for example in &v.examples {
            eprintln!("wharf-loadgen:   {example}");
        }
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Creates the topic if needed; returns its fsync mode.
fn prepare_topic(args: &Args, addresses: &[String]) -> Result<String, String> {
    let topic = args.topic.clone();
    let partitions = args.partitions;
    let replication_factor = args.replication_factor;
    let fsync = args.fsync.clone();
    let mut configs = vec![ConfigEntry {
        key: "flush".to_string(),
        value: fsync.clone(),
    }];
    for entry in &args.topic_configs {
        let Some((key, value)) = entry.split_once('=') else {
            return Err(format!("--topic-config takes KEY=VALUE, not {entry:?}"));
        };
        configs.push(ConfigEntry {
            key: key.to_string(),
            value: value.to_string(),
        });
    }
    let addresses = addresses.to_vec();
    let request_timeout_ms = args.request_timeout_ms;
    wharf::runtime::run_local("loadgen-setup", async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = ClientSlot::connect(&addresses, request_timeout_ms, deadline)
            .await?
            .client();
        match client.describe_topic(&topic).await {
            Ok(description) => {
                if description.partitions.len() as u32 != partitions {
                    eprintln!(
                        "wharf-loadgen: topic {topic} exists with {} partitions; using them",
                        description.partitions.len()
                    );
                }
                Ok(description
                    .configs
                    .iter()
                    .find(|c| c.key == "flush")
                    .map_or_else(|| "unknown".to_string(), |c| c.value.clone()))
            }
            Err(ClientError::Server {
                code: ErrorCode::UnknownTopic,
                ..
            }) => {
                client
                    .create_topic(&topic, partitions, replication_factor, configs)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(fsync)
            }
            Err(error) => Err(error.to_string()),
        }
    })
    .map_err(|e| e.to_string())?
}

fn print_progress(plan: &Plan, threads: usize) {
    use std::io::IsTerminal;
    let progress = &plan.progress;
    // A progress bar on a terminal, plain periodic lines otherwise (logs, CI).
    let bar = std::io::stderr().is_terminal().then(|| {
        let total = (plan.end - plan.start).as_secs().max(1);
        let bar = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template("{elapsed:>4} [{bar:24}] {msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    });
    let mut last = (0u64, 0u64, 0u64);
    let mut tick = plan.start;
    // Bounded by the run's end (plus a drain allowance); the client threads end by then too.
    while Instant::now() < plan.end + Duration::from_secs(1) {
        tick += Duration::from_secs(1);
        std::thread::sleep(tick.saturating_duration_since(Instant::now()));
        let now = (
            progress.acked.load(Ordering::Relaxed),
            progress.acked_bytes.load(Ordering::Relaxed),
            progress.received.load(Ordering::Relaxed),
        );
        let p99 = (0..threads)
            .map(|t| progress.p99_us[t].load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        let elapsed = Instant::now()
            .saturating_duration_since(plan.start)
            .as_secs_f64();
        let line = format!(
            "{elapsed:6.1} s  {:>10} msgs/s  {:>8.1} MB/s  received {:>10}/s  p99 {}",
            now.0 - last.0,
            (now.1 - last.1) as f64 / 1e6,
            now.2 - last.2,
            human_us(p99)
        );
        match &bar {
            Some(bar) => {
                bar.set_position(elapsed as u64);
                bar.set_message(line);
            }
            None => eprintln!("{line}"),
        }
        last = now;
    }
    if let Some(bar) = bar {
        bar.finish();
    }
}

async fn client_thread(
    thread: usize,
    threads: usize,
    plan: Arc<Plan>,
) -> Result<ThreadResult, String> {
    let cpu_started = thread_cpu_seconds();
    let wall_started = Instant::now();
    let args = &plan.args;
    let slot = ClientSlot::connect(
        &plan.addresses,
        args.request_timeout_ms,
        Instant::now() + Duration::from_secs(30),
    )
    .await?;
    let client = slot.client();
    let result = Rc::new(RefCell::new(ThreadResult {
        produce: Some(new_histogram()),
        e2e: Some(new_histogram()),
        ..ThreadResult::default()
    }));
    let interval = Rc::new(RefCell::new(new_histogram()));
    let mut tasks = Vec::new();
    // Drains (tailing consumers catching up, retried deliveries) end by then.
    let drain_until = plan.end + Duration::from_secs(10);
    // Keeps the metadata fresh and moves to another bootstrap broker when this one stops
    // answering (the producers' own refreshes go to the bootstrap broker only).
    let watcher = (plan.addresses.len() > 1 || plan.resends()).then(|| {
        let slot = Rc::clone(&slot);
        glommio::spawn_local(async move {
            while Instant::now() < drain_until {
                glommio::timer::sleep(METADATA_REFRESH_INTERVAL).await;
                slot.refresh().await;
            }
        })
    });
    let tail_seen = Rc::new(RefCell::new(OffsetMap::default()));
    let mut tails = Vec::new();
    for _ in (0..args.tail_consumers).filter(|c| c % threads == thread) {
        let partitions = client
            .partition_count(&args.topic)
            .await
            .map_err(|e| e.to_string())?;
        for partition in 0..partitions {
            tails.push(glommio::spawn_local(resilient::tail(
                Rc::clone(&slot),
                args.topic.clone(),
                partition,
                plan.run_id,
                Rc::clone(&tail_seen),
                plan.end,
                drain_until,
            )));
        }
    }
    for consumer in (0..args.consumers).filter(|c| c % threads == thread) {
        tasks.push(glommio::spawn_local(consume(
            Rc::clone(&client),
            Arc::clone(&plan),
            consumer,
            Rc::clone(&result),
        )));
    }
    if plan.workload != Workload::Consume {
        for producer in (0..args.producers).filter(|p| p % threads == thread) {
            tasks.push(glommio::spawn_local(produce(
                Rc::clone(&slot),
                Arc::clone(&plan),
                producer as u32,
                Rc::clone(&result),
                Rc::clone(&interval),
            )));
        }
    }
    // Publish the last second's p99 for the progress line.
    let publisher = {
        let plan = Arc::clone(&plan);
        let interval = Rc::clone(&interval);
        glommio::spawn_local(async move {
            while Instant::now() < plan.end {
                glommio::timer::sleep(Duration::from_secs(1)).await;
                let mut histogram = interval.borrow_mut();
                if !histogram.is_empty() {
                    plan.progress.p99_us[thread]
                        .store(histogram.value_at_quantile(0.99), Ordering::Relaxed);
                    histogram.reset();
                }
            }
        })
    };
    for task in tasks {
        task.await;
    }
    let mut tail_errors = 0;
    for task in tails {
        let (errors, _) = task.await;
        tail_errors += errors;
    }
    publisher.await;
    if let Some(watcher) = watcher {
        watcher.cancel().await;
    }
    let mut result = Rc::try_unwrap(result)
        .map_err(|_| "result still shared".to_string())?
        .into_inner();
    if args.tail_consumers > 0 {
        result.tail_seen = Rc::try_unwrap(tail_seen).ok().map(RefCell::into_inner);
        if tail_errors > 0 {
            *result
                .errors
                .entry("tail_consumer".to_string())
                .or_default() += tail_errors;
        }
    }
    result.reconnections = slot.reconnections.get();
    let wall = wall_started.elapsed().as_secs_f64();
    result.cpu_busy = if wall > 0.0 {
        (thread_cpu_seconds() - cpu_started) / wall
    } else {
        0.0
    };
    Ok(result)
}

async fn produce(
    slot: Rc<ClientSlot>,
    plan: Arc<Plan>,
    producer_id: u32,
    result: Rc<RefCell<ThreadResult>>,
    interval: Rc<RefCell<Histogram<u64>>>,
) {
    let args = &plan.args;
    let config = ProducerConfig {
        acks: plan.acks,
        linger_ms: args.linger_ms,
        batch_bytes: args.batch_bytes,
        buffer_bytes_max: args.buffer_bytes,
        max_in_flight_per_partition: args.requests_in_flight,
        idempotent: !args.no_idempotence,
        request_timeout_ms: args.request_timeout_ms,
        delivery_timeout_ms: args.delivery_timeout_ms,
        partitioner: if args.partitioner == "round-robin" {
            Partitioner::RoundRobin
        } else {
            Partitioner::KeyHash
        },
        ..ProducerConfig::default()
    };
    // A new producer each time the slot's client changes (another bootstrap broker); the
    // retired ones finish (or fail) what they hold and are flushed at the end.
    let mut generation = slot.generation();
    let mut producer = Rc::new(Producer::new(slot.client(), config.clone()));
    let mut retired: Vec<Rc<Producer>> = Vec::new();
    let per_producer = match plan.rate {
        Rate::Max => Rate::Max,
        Rate::PerSecond(total) => Rate::PerSecond(total / args.producers as f64),
    };
    let mut schedule = Schedule::new(plan.start, per_producer);
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        plan.seed ^ u64::from(producer_id).wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    let mut value = vec![0u8; args.message_bytes];
    rng.fill(&mut value[RECORD_HEADER_BYTES..]);
    let in_flight: Rc<RefCell<VecDeque<(Instant, u64, Delivery)>>> =
        Rc::new(RefCell::new(VecDeque::new()));
    // Sequences whose delivery failed, with when they may be sent again (same id).
    let resend: Rc<RefCell<VecDeque<(Instant, u64)>>> = Rc::new(RefCell::new(VecDeque::new()));
    let window = if args.max_in_flight == 0 {
        usize::MAX
    } else {
        args.max_in_flight
    };
    let (wake_collector, collector_woken) = glommio::channels::local_channel::new_bounded::<()>(1);
    let producing_done = Rc::new(Cell::new(false));
    // The collector signals each completed delivery (for the in-flight window).
    let (completed, wait_completed) = glommio::channels::local_channel::new_bounded::<()>(1);
    let outstanding = Rc::new(Cell::new(0usize));
    let collector = {
        let in_flight = Rc::clone(&in_flight);
        let plan = Arc::clone(&plan);
        let result = Rc::clone(&result);
        let done = Rc::clone(&producing_done);
        let outstanding = Rc::clone(&outstanding);
        let interval = Rc::clone(&interval);
        let resend = Rc::clone(&resend);
        glommio::spawn_local(async move {
            let mut last_finished = Instant::now();
            loop {
                let next = in_flight.borrow_mut().pop_front();
                let Some((intended, sequence, delivery)) = next else {
                    if done.get() {
                        return;
                    }
                    collector_woken.recv().await;
                    continue;
                };
                // Deliveries of one batch complete together: read the clock once per wait.
                let mut delivery = delivery;
                let outcome = match futures_lite::future::poll_once(&mut delivery).await {
                    Some(outcome) => outcome,
                    None => {
                        let outcome = delivery.await;
                        last_finished = Instant::now();
                        outcome
                    }
                };
                let finished = last_finished;
                outstanding.set(outstanding.get() - 1);
                let _ = completed.try_send(());
                record_outcome(
                    &plan,
                    &result,
                    &interval,
                    &resend,
                    (producer_id, sequence),
                    intended,
                    finished,
                    outcome,
                );
            }
        })
    };
    let mut next_sequence = 0u64;
    loop {
        // Closed loop: wait for room in the window first, then the operation starts now. Open
        // loop: the schedule says when it should have started, waits included.
        if plan.rate == Rate::Max {
            while outstanding.get() >= window {
                wait_completed.recv().await;
            }
        }
        let now = Instant::now();
        let scheduled = schedule.next(now);
        if scheduled >= plan.end || now >= plan.end {
            break;
        }
        // Timers cost far more than the gap between messages at high rates: sleep only when
        // well ahead of the schedule. A message sent early is timed from its actual send.
        let slept = scheduled > now + PACING_AHEAD_MAX;
        if slept {
            glommio::timer::sleep(scheduled - now - PACING_WAKE_EARLY).await;
        }
        // Late: timed from the schedule (coordinated omission). Early: from the actual send
        // (the clock is read again only after a sleep: this runs once per record).
        let intended = scheduled.min(if slept { Instant::now() } else { now });
        // Keep at most `window` records awaiting acks (1: one record per request).
        while outstanding.get() >= window {
            wait_completed.recv().await;
        }
        if slot.generation() != generation {
            generation = slot.generation();
            let fresh = Rc::new(Producer::new(slot.client(), config.clone()));
            retired.push(std::mem::replace(&mut producer, fresh));
        }
        // A failed record due again takes this slot of the schedule; else a new record.
        let due = {
            let mut resend = resend.borrow_mut();
            match resend.front() {
                Some((at, _)) if *at <= intended => resend.pop_front().map(|(_, s)| s),
                _ => None,
            }
        };
        let sequence = match due {
            Some(sequence) => {
                result.borrow_mut().resent += 1;
                sequence
            }
            None if args.verify
                && plan.audit_sent.fetch_add(1, Ordering::Relaxed) >= args.audit_records_max =>
            {
                plan.audit_truncated.store(true, Ordering::Relaxed);
                break;
            }
            None => {
                next_sequence += 1;
                next_sequence - 1
            }
        };
        let ids = Stamp {
            sent_us: wall_us(),
            run_id: plan.run_id,
            producer: producer_id,
            sequence,
        };
        if args.verify {
            audit::stamp(&mut value, ids);
        } else {
            audit::stamp_ids(&mut value, ids);
        }
        let key = (args.keys > 0).then(|| format!("key-{}", rng.random_range(0..args.keys)));
        match producer
            .send(&args.topic, key.as_deref().map(str::as_bytes), &value)
            .await
        {
            Ok(delivery) if window == 1 => {
                // One record in flight: await it here (no hand-off to the collector, whose
                // extra task wake-ups would be measured as latency).
                result.borrow_mut().sent += 1;
                let outcome = delivery.await;
                record_outcome(
                    &plan,
                    &result,
                    &interval,
                    &resend,
                    (producer_id, sequence),
                    intended,
                    Instant::now(),
                    outcome,
                );
            }
            Ok(delivery) => {
                in_flight
                    .borrow_mut()
                    .push_back((intended, sequence, delivery));
                outstanding.set(outstanding.get() + 1);
                let _ = wake_collector.try_send(());
                result.borrow_mut().sent += 1;
            }
            Err(error) => {
                *result
                    .borrow_mut()
                    .errors
                    .entry(error.kind().to_string())
                    .or_default() += 1;
                if plan.resends() {
                    resend
                        .borrow_mut()
                        .push_back((Instant::now() + RESEND_BACKOFF, sequence));
                    glommio::timer::sleep(RESEND_BACKOFF).await;
                }
            }
        }
    }
    for producer in retired.iter().chain(std::iter::once(&producer)) {
        producer.flush().await;
    }
    producing_done.set(true);
    let _ = wake_collector.try_send(());
    collector.await;
    for producer in retired.iter().chain(std::iter::once(&producer)) {
        producer.close().await;
    }
}

/// Books one delivery's outcome: counters, the audit's acknowledgements and the ack times,
/// (inside the measured window) its latency from the intended start, and (when the run
/// resends) a failed record for sending again.
#[allow(clippy::too_many_arguments)]
fn record_outcome(
    plan: &Plan,
    result: &RefCell<ThreadResult>,
    interval: &RefCell<Histogram<u64>>,
    resend: &RefCell<VecDeque<(Instant, u64)>>,
    (producer_id, sequence): (u32, u64),
    intended: Instant,
    finished: Instant,
    outcome: Result<RecordMetadata, ClientError>,
) {
    let message_bytes = plan.args.message_bytes as u64;
    let mut r = result.borrow_mut();
    match outcome {
        Ok(metadata) => {
            r.acked += 1;
            plan.progress.acked.fetch_add(1, Ordering::Relaxed);
            plan.progress
                .acked_bytes
                .fetch_add(message_bytes, Ordering::Relaxed);
            if let (true, Some(offset)) = (plan.args.verify, metadata.offset) {
                r.acks
                    .acknowledged(producer_id, sequence, metadata.partition, offset);
            }
            if plan.args.gap_report.is_some() {
                r.ack_times
                    .acknowledged(metadata.partition, wall_us() / 1000);
            }
            if intended >= plan.measure_from && intended < plan.end {
                let latency = rate::corrected_latency(intended, finished).as_micros() as u64;
                if let Some(h) = r.produce.as_mut() {
                    h.saturating_record(latency.max(1));
                }
                interval.borrow_mut().saturating_record(latency.max(1));
                r.acked_measured += 1;
                r.acked_measured_bytes += message_bytes;
            }
        }
        Err(error) => {
            *r.errors.entry(error.kind().to_string()).or_default() += 1;
            if plan.resends() && Instant::now() < plan.end {
                resend
                    .borrow_mut()
                    .push_back((Instant::now() + RESEND_BACKOFF, sequence));
            }
        }
    }
}

async fn consume(
    client: Rc<Client>,
    plan: Arc<Plan>,
    consumer_id: usize,
    result: Rc<RefCell<ThreadResult>>,
) {
    let args = &plan.args;
    let Ok(partitions) = client.partition_count(&args.topic).await else {
        *result
            .borrow_mut()
            .errors
            .entry("consume_setup".to_string())
            .or_default() += 1;
        return;
    };
    let mine: Vec<u32> = (0..partitions)
        .filter(|p| args.fan_out || *p as usize % args.consumers == consumer_id)
        .collect();
    if mine.is_empty() {
        return;
    }
    let mut consumer = Consumer::new(
        Rc::clone(&client),
        &args.topic,
        ConsumerConfig {
            max_wait_ms: 100,
            reader_id: Some(format!("loadgen-{}-{consumer_id}", std::process::id())),
            rack: args.client_rack.clone(),
            ..ConsumerConfig::default()
        },
    );
    let seek = if plan.workload == Workload::Consume {
        SeekTo::Earliest
    } else {
        SeekTo::Latest
    };
    if let Err(error) = consumer.assign(Some(mine), seek).await {
        *result
            .borrow_mut()
            .errors
            .entry(error.kind().to_string())
            .or_default() += 1;
        return;
    }
    let message_bytes = args.message_bytes as u64;
    // Bounded: stops at the end of the run (end-to-end: once caught up, at most 10 s after).
    let drain_until = plan.end + Duration::from_secs(10);
    loop {
        let now = Instant::now();
        if now >= drain_until
            || (now >= plan.end && (plan.workload == Workload::Consume || consumer.caught_up()))
        {
            return;
        }
        let records = match consumer.poll().await {
            Ok(records) => records,
            Err(error) => {
                *result
                    .borrow_mut()
                    .errors
                    .entry(error.kind().to_string())
                    .or_default() += 1;
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let received_at = wall_us();
        let measuring = Instant::now() >= plan.measure_from && Instant::now() < plan.end;
        let mut r = result.borrow_mut();
        let mut count = 0u64;
        let _ = records.for_each(|record| {
            count += 1;
            if let Some((run_id, sent_us)) = audit::sent_us(record.value) {
                if plan.workload == Workload::EndToEnd
                    && run_id == plan.run_id
                    && sent_us >= plan.measure_from_wall_us
                {
                    if let Some(h) = r.e2e.as_mut() {
                        h.saturating_record(received_at.saturating_sub(sent_us).max(1));
                    }
                }
            }
        });
        plan.progress.received.fetch_add(count, Ordering::Relaxed);
        if measuring || plan.workload == Workload::Consume {
            r.received_measured += count;
            r.received_measured_bytes += count * message_bytes;
        }
        if plan.workload == Workload::Consume && consumer.caught_up() {
            return;
        }
    }
}

/// Reads every partition back (retrying until --verify-timeout) and checks it against the
/// acknowledgements and what the tailing consumers saw.
fn read_back(plan: &Plan, acks: &AckLog, tails: &[OffsetMap]) -> Result<VerifyReport, String> {
    let addresses = plan.addresses.clone();
    let topic = plan.args.topic.clone();
    let run_id = plan.run_id;
    let request_timeout_ms = plan.args.request_timeout_ms;
    let deadline = Instant::now() + Duration::from_secs_f64(plan.args.verify_timeout);
    let (read, reads, notes) = wharf::runtime::run_local("loadgen-verify", async move {
        resilient::read_back(&addresses, request_timeout_ms, &topic, run_id, deadline).await
    })
    .map_err(|e| e.to_string())??;
    let mut report = audit::check(acks, read, &reads, tails);
    report.examples.extend(notes);
    Ok(report)
}

struct Summary {
    json: serde_json::Value,
    text: String,
    produce: Histogram<u64>,
    e2e: Histogram<u64>,
    verify: Option<VerifyReport>,
}

fn summarize(
    plan: &Plan,
    fsync: &str,
    threads: usize,
    embedded: bool,
    results: Vec<ThreadResult>,
    verify: Option<VerifyReport>,
    gaps: Option<&gaps::GapReport>,
) -> Summary {
    let args = &plan.args;
    let mut produce = new_histogram();
    let mut e2e = new_histogram();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let (
        mut sent,
        mut acked,
        mut acked_measured,
        mut acked_bytes,
        mut received,
        mut received_bytes,
    ) = (0, 0, 0, 0, 0, 0);
    let mut busiest = 0.0f64;
    let (mut resent, mut reconnections) = (0u64, 0u64);
    for r in results {
        resent += r.resent;
        reconnections += r.reconnections;
        if let Some(h) = &r.produce {
            let _ = produce.add(h);
        }
        if let Some(h) = &r.e2e {
            let _ = e2e.add(h);
        }
        sent += r.sent;
        acked += r.acked;
        acked_measured += r.acked_measured;
        acked_bytes += r.acked_measured_bytes;
        received += r.received_measured;
        received_bytes += r.received_measured_bytes;
        for (kind, n) in r.errors {
            *errors.entry(kind).or_default() += n;
        }
        busiest = busiest.max(r.cpu_busy);
    }
    let seconds = args.duration;
    let error_count: u64 = errors.values().sum();
    let produce_p = percentiles(&produce);
    let e2e_p = percentiles(&e2e);
    let msgs_per_s = acked_measured as f64 / seconds;
    let mb_per_s = acked_bytes as f64 / seconds / 1e6;
    let consume_msgs = received as f64 / seconds;
    let consume_mb = received_bytes as f64 / seconds / 1e6;
    let config = serde_json::json!({
        "workload": match plan.workload { Workload::Produce => "produce", Workload::Consume => "consume", Workload::EndToEnd => "e2e" },
        "bootstrap": plan.bootstrap,
        "embedded": embedded,
        "topic": args.topic,
        "partitions": args.partitions,
        "producers": args.producers,
        "consumers": args.consumers,
        "fan_out": args.fan_out,
        "message_bytes": args.message_bytes,
        "batch_bytes": args.batch_bytes,
        "linger_ms": args.linger_ms,
        "acks": plan.acks.to_string(),
        "fsync": fsync,
        "rate": args.rate,
        "max_in_flight": args.max_in_flight,
        "requests_in_flight": args.requests_in_flight,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "keys": args.keys,
        "partitioner": args.partitioner,
        "seed": plan.seed,
        "threads": threads,
    });
    let latency = |p: &Percentiles| serde_json::to_value(p).unwrap_or_default();
    let json = serde_json::json!({
        "config": config,
        "produce": {
            "sent": sent,
            "acked": acked,
            "errors": error_count,
            "errors_by_kind": errors,
            "resent": resent,
            "client_reconnections": reconnections,
            "msgs_per_s": msgs_per_s,
            "mb_per_s": mb_per_s,
            "latency_us": latency(&produce_p),
        },
        "e2e": { "latency_us": latency(&e2e_p) },
        "consume": { "received": received, "msgs_per_s": consume_msgs, "mb_per_s": consume_mb },
        "verify": verify.as_ref().map(|v| {
            let mut value = serde_json::to_value(v).unwrap_or_default();
            if let Some(object) = value.as_object_mut() {
                object.insert("failed".to_string(), serde_json::Value::Bool(v.failed()));
            }
            value
        }),
        "gaps": gaps.map(gaps::GapReport::summary_json),
        "client_cpu_busy_max": busiest,
    });
    let mut text = String::new();
    use std::fmt::Write;
    let _ = writeln!(
        text,
        "settings: acks={} fsync={fsync} producers={} consumers={} partitions={} message={} B batch={} B linger={} ms rate={} in-flight={} requests/partition={} idempotent={} duration={} s warm-up={} s threads={threads} seed={}",
        plan.acks, args.producers, args.consumers, args.partitions, args.message_bytes, args.batch_bytes,
        args.linger_ms, args.rate, if args.max_in_flight == 0 { "buffer".to_string() } else { args.max_in_flight.to_string() }, args.requests_in_flight,
        if args.no_idempotence { "off" } else { "on" },
        args.duration, args.warmup, plan.seed
    );
    let _ = writeln!(
        text,
        "{:<12} {:>12} {:>12} {:>8} {:>12} {:>9}",
        "", "sent", "acked", "errors", "msgs/s", "MB/s"
    );
    let _ = writeln!(
        text,
        "{:<12} {sent:>12} {acked:>12} {error_count:>8} {msgs_per_s:>12.0} {mb_per_s:>9.1}",
        "produce"
    );
    if plan.workload != Workload::Produce {
        let _ = writeln!(
            text,
            "{:<12} {:>12} {:>12} {:>8} {consume_msgs:>12.0} {consume_mb:>9.1}",
            "consume", "", received, ""
        );
    }
    let _ = writeln!(
        text,
        "latency µs   {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "p50", "p90", "p99", "p99.9", "p99.99", "max"
    );
    for (name, p, h) in [
        ("produce-ack", &produce_p, &produce),
        ("end-to-end", &e2e_p, &e2e),
    ] {
        if !h.is_empty() {
            let _ = writeln!(
                text,
                "{name:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                p.p50, p.p90, p.p99, p.p999, p.p9999, p.max
            );
        }
    }
    if !errors.is_empty() {
        let _ = writeln!(text, "errors by kind: {errors:?}");
    }
    if resent > 0 || reconnections > 0 {
        let _ = writeln!(
            text,
            "resilience: {resent} records sent again after a failed delivery, {reconnections} moves to another bootstrap broker"
        );
    }
    if let Some(v) = &verify {
        let _ = writeln!(text, "{}", v.human());
        for example in &v.examples {
            let _ = writeln!(text, "  {example}");
        }
    }
    if let Some(gaps) = gaps {
        let _ = writeln!(text, "{}", gaps.human());
    }
    if busiest > 0.9 {
        let _ = writeln!(
            text,
            "note: a client thread was busy {:.0}% of the time; the load generator may be the bottleneck (add --threads or run it on other cores)",
            busiest * 100.0
        );
    }
    Summary {
        json,
        text,
        produce,
        e2e,
        verify,
    }
}

fn print_report(summary: &Summary) {
    print!("{}", summary.text);
}
