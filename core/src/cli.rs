//! The `wharf` command line: the server (`serve`), admin (`topic ...`), `produce`, `consume`.

use std::path::PathBuf;
use std::rc::Rc;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::client::consumer::{Consumer, ConsumerConfig, SeekTo};
use crate::client::producer::{Producer, ProducerConfig};
use crate::client::{Client, ClientConfig, ClientError};
use crate::config::{ServerConfig, CLIENT_PORT_DEFAULT};
use crate::protocol::{Acks, ConfigEntry, ErrorCode, PartitionReaders, TopicDescription};

#[derive(Parser, Debug)]
#[command(name = "wharf", version, about = "Wharf: a replicated message broker")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Create, list, describe and delete topics.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The cluster: brokers (alive, fenced, shutting down) and the controller.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Consumer groups: list, describe (members, assignments, committed offsets, lag),
    /// reset offsets, delete.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Queue groups: create (leases, redelivery backoff, dead-letter topic), list, describe.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Send each line of stdin as one record.
    Produce(ProduceArgs),
    /// Print records, one value per line, in offset order per partition.
    Consume(ConsumeArgs),
    /// Check that DIR supports O_DIRECT through io_uring (default ./wharf-data).
    Selftest { dir: Option<PathBuf> },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TOML config file; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Client listener HOST:PORT (every shard accepts here).
    #[arg(long)]
    pub listen: Option<String>,
    /// Admin HTTP HOST:PORT (/metrics, /livez, /readyz).
    #[arg(long)]
    pub admin_listen: Option<String>,
    /// Shards (one per core); 0 = all available cores.
    #[arg(long)]
    pub shards: Option<usize>,
    /// CPUs for the shards: auto, unbound (no pinning) or a list like 0-3,6.
    #[arg(long, value_parser = crate::config::CpuSet::parse)]
    pub cpu_set: Option<crate::config::CpuSet>,
    #[arg(long)]
    pub broker_id: Option<u32>,
    /// Print the effective configuration (file + flags + defaults) as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Any broker listener, HOST:PORT.
    #[arg(long, global = true, default_value_t = format!("127.0.0.1:{CLIENT_PORT_DEFAULT}"))]
    pub bootstrap: String,
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Per-request timeout.
    #[arg(long, global = true, default_value_t = 30_000)]
    pub timeout_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum TopicCommand {
    Create {
        topic: String,
        #[arg(long)]
        partitions: u32,
        #[arg(long, default_value_t = 1)]
        replication_factor: u16,
        /// Topic setting KEY=VALUE (repeatable): flush, flush_interval_ms, segment_bytes,
        /// segment_ms, retention_bytes, retention_ms, min_insync_replicas, preallocate,
        /// recent_bytes_max, unclean_leader_election, replica_selector (leader|rack|load).
        #[arg(long = "config", value_name = "KEY=VALUE")]
        configs: Vec<String>,
    },
    List,
    Describe {
        topic: String,
        /// Where each consumer reads (follower reads): per partition, its leader's load and
        /// the replica it sent each reader to, and why.
        #[arg(long)]
        readers: bool,
    },
    Delete {
        topic: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Every group the coordinators hold, with its member count and epoch.
    List,
    /// Members with their assignment, committed offsets and lag per partition.
    Describe { group: String },
    /// Set the group's committed offsets for a topic (the group must have no members).
    ResetOffsets {
        group: String,
        #[arg(long)]
        topic: String,
        /// earliest, latest or an offset.
        #[arg(long)]
        to: String,
        /// Only these partitions (repeatable; default all).
        #[arg(long)]
        partition: Vec<u32>,
    },
    /// Forget an empty group's committed offsets.
    Delete { group: String },
}

#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// Define queue group GROUP on TOPIC (and create its dead-letter topic).
    Create {
        group: String,
        #[arg(long)]
        topic: String,
        /// The lease: a record not settled within it is delivered again.
        #[arg(long, default_value_t = 30_000)]
        ack_wait_ms: u64,
        /// Deliveries before a record goes to the dead-letter topic.
        #[arg(long, default_value_t = 5)]
        max_deliveries: u32,
        /// Records acquired at once per partition.
        #[arg(long, default_value_t = 1_000)]
        in_flight_max: u32,
        #[arg(long, default_value_t = 1_000)]
        backoff_initial_ms: u64,
        #[arg(long, default_value_t = 300_000)]
        backoff_max_ms: u64,
        /// Growth of the delay per delivery attempt.
        #[arg(long, default_value_t = 2.0)]
        backoff_multiplier: f64,
        /// Share of each delay that is random (0 to 1).
        #[arg(long, default_value_t = 0.2)]
        backoff_jitter: f64,
        /// An explicit schedule instead, e.g. 1000,5000,30000 (the last repeats).
        #[arg(long, value_delimiter = ',')]
        backoff_list_ms: Vec<u64>,
        /// Records with one key are never in flight twice at once.
        #[arg(long)]
        per_key_ordering: bool,
        /// Default `<topic>.dlq`.
        #[arg(long)]
        dead_letter_topic: Option<String>,
    },
    /// Every queue group the coordinators hold.
    List,
    /// Send the queue's dead-letter records back to its topic (to their original partition),
    /// as new records. Progress is kept as consumer group `GROUP.replay` on the dead-letter
    /// topic, so a second replay sends only what was dead-lettered since.
    Replay {
        group: String,
        /// Stop after this many records.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Settings, and per partition: done below, in flight, waiting, dead-lettering, the
    /// oldest pending record's age.
    Describe { group: String },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Brokers with their state and leader count, the controller voters, leader and log
    /// position, as the bootstrap broker has applied them.
    Status,
}

#[derive(Args, Debug)]
pub struct ProduceArgs {
    pub topic: String,
    /// none, leader, quorum, all or a replica count.
    #[arg(long, default_value = "all")]
    pub acks: String,
    /// Split each line at the first C into key and value.
    #[arg(long, value_name = "C")]
    pub key_separator: Option<char>,
    /// Send every record to this partition (default: by key hash, else round robin).
    #[arg(long)]
    pub partition: Option<u32>,
    #[arg(long, default_value_t = 5)]
    pub linger_ms: u64,
    #[arg(long, default_value_t = 256 * 1024)]
    pub batch_bytes: usize,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug)]
pub struct ConsumeArgs {
    pub topic: String,
    /// earliest, latest, an offset, or @MILLIS (first record at or after that time).
    #[arg(long, default_value = "earliest")]
    pub from: String,
    /// Stop after this many records.
    #[arg(long)]
    pub count: Option<u64>,
    /// Keep waiting for new records instead of stopping at the end.
    #[arg(long)]
    pub follow: bool,
    /// Only these partitions (repeatable; default all).
    #[arg(long)]
    pub partition: Vec<u32>,
    /// Consume as a member of this consumer group: the group's coordinator assigns the
    /// partitions, and the positions are committed (at-least-once). `--from` then applies only
    /// to partitions without a committed offset (earliest, latest or none).
    #[arg(long)]
    pub group: Option<String>,
    /// Static group membership: a restart with the same id gets the same partitions back
    /// without a rebalance.
    #[arg(long, requires = "group")]
    pub instance_id: Option<String>,
    /// Consume as a member of this queue group (`wharf queue create`): records are leased
    /// one by one instead of read in order.
    #[arg(long, conflicts_with = "group")]
    pub queue: Option<String>,
    /// With --queue: acknowledge each record once printed (without it, records are printed
    /// and left to their lease: they come back after `ack_wait_ms`).
    #[arg(long, requires = "queue")]
    pub ack: bool,
    /// With --queue: this member's id (default: host and process id).
    #[arg(long, requires = "queue")]
    pub member: Option<String>,
    /// This consumer's rack (follower reads: with `replica_selector = rack`, leaders send it
    /// to a replica in the same rack).
    #[arg(long)]
    pub rack: Option<String>,
    /// This consumer's name in `wharf topic describe --readers` (default: PID-N).
    #[arg(long)]
    pub reader_id: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// An error for the user, with the process exit code.
pub struct Failure {
    pub message: String,
    pub exit_code: u8,
}

impl From<ClientError> for Failure {
    fn from(error: ClientError) -> Self {
        Failure {
            message: error.to_string(),
            exit_code: 1,
        }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure {
            message,
            exit_code: 1,
        }
    }
}

pub fn serve_config(args: &ServeArgs) -> Result<ServerConfig, String> {
    let mut config = ServerConfig::load(args.config.as_deref())?;
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(listen) = &args.listen {
        config.listen = listen.clone();
    }
    if let Some(admin) = &args.admin_listen {
        config.admin_listen = admin.clone();
    }
    if let Some(shards) = args.shards {
        config.shards = shards;
    }
    if let Some(cpu_set) = &args.cpu_set {
        config.cpu_set = cpu_set.clone();
    }
    if let Some(id) = args.broker_id {
        config.broker_id = id;
    }
    config.validate()
}

async fn connect(args: &ClientArgs) -> Result<Rc<Client>, Failure> {
    let mut config = ClientConfig::new(args.bootstrap.clone());
    config.request_timeout_ms = args.timeout_ms;
    Ok(Client::connect(config).await?)
}

pub async fn topic(command: TopicCommand, args: ClientArgs) -> Result<(), Failure> {
    let client = connect(&args).await?;
    match command {
        TopicCommand::Create {
            topic,
            partitions,
            replication_factor,
            configs,
        } => {
            let mut entries = Vec::new();
            for text in configs {
                let Some((key, value)) = text.split_once('=') else {
                    return Err(format!("--config takes KEY=VALUE, not {text:?}").into());
                };
                entries.push(ConfigEntry {
                    key: key.to_string(),
                    value: value.to_string(),
                });
            }
            client
                .create_topic(&topic, partitions, replication_factor, entries)
                .await?;
            match args.format {
                Format::Text => println!("created topic {topic} with {partitions} partitions"),
                Format::Json => println!(
                    "{}",
                    serde_json::json!({"topic": topic, "partitions": partitions, "replication_factor": replication_factor})
                ),
            }
        }
        TopicCommand::List => {
            let topics = client.list_topics().await?;
            match args.format {
                Format::Text => {
                    let mut table = comfy_table::Table::new();
                    table.load_preset(comfy_table::presets::NOTHING);
                    table.set_header(["TOPIC", "PARTITIONS", "REPLICAS"]);
                    for t in &topics {
                        table.add_row([
                            t.name.clone(),
                            t.partitions.len().to_string(),
                            t.partitions
                                .first()
                                .map_or(0, |p| p.replicas.len())
                                .to_string(),
                        ]);
                    }
                    println!("{table}");
                }
                Format::Json => {
                    let list: Vec<_> = topics
                        .iter()
                        .map(|t| {
                            serde_json::json!({
                                "topic": t.name,
                                "partitions": t.partitions.len(),
                                "replication_factor": t.partitions.first().map_or(0, |p| p.replicas.len()),
                            })
                        })
                        .collect();
                    println!("{}", serde_json::Value::Array(list));
                }
            }
        }
        TopicCommand::Describe {
            topic,
            readers: true,
        } => {
            let partitions = client.describe_readers(&topic).await?;
            match args.format {
                Format::Text => print_readers(&partitions),
                Format::Json => println!("{}", readers_json(&partitions)),
            }
        }
        TopicCommand::Describe {
            topic,
            readers: false,
        } => {
            let description = client.describe_topic(&topic).await?;
            match args.format {
                Format::Text => print_description(&description),
                Format::Json => println!("{}", description_json(&description)),
            }
        }
        TopicCommand::Delete { topic } => {
            client.delete_topic(&topic).await?;
            match args.format {
                Format::Text => println!("deleted topic {topic}"),
                Format::Json => println!("{}", serde_json::json!({"deleted": topic})),
            }
        }
    }
    Ok(())
}

pub async fn cluster(command: ClusterCommand, args: ClientArgs) -> Result<(), Failure> {
    let client = connect(&args).await?;
    match command {
        ClusterCommand::Status => {
            let status = client.cluster_status().await?;
            match args.format {
                Format::Text => {
                    println!(
                        "controller voters {}, leader {}, term {}, commit index {}; this broker applied {}",
                        list(&status.voters),
                        status
                            .controller_leader
                            .map_or_else(|| "unknown".to_string(), |l| l.to_string()),
                        status.raft_term,
                        status.raft_commit_index,
                        status.applied_index
                    );
                    let mut table = comfy_table::Table::new();
                    table.load_preset(comfy_table::presets::NOTHING);
                    table.set_header(["BROKER", "STATE", "LEADERS", "INCARNATION", "ADDRESS"]);
                    for b in &status.brokers {
                        table.add_row([
                            b.broker_id.to_string(),
                            b.state.clone(),
                            b.leaders.to_string(),
                            b.incarnation.to_string(),
                            b.client_address.clone(),
                        ]);
                    }
                    println!("{table}");
                }
                Format::Json => {
                    let brokers: Vec<_> = status
                        .brokers
                        .iter()
                        .map(|b| {
                            serde_json::json!({
                                "broker_id": b.broker_id,
                                "state": b.state,
                                "leaders": b.leaders,
                                "incarnation": b.incarnation,
                                "address": b.client_address,
                            })
                        })
                        .collect();
                    println!(
                        "{}",
                        serde_json::json!({
                            "voters": status.voters,
                            "controller_leader": status.controller_leader,
                            "raft_term": status.raft_term,
                            "raft_commit_index": status.raft_commit_index,
                            "applied_index": status.applied_index,
                            "brokers": brokers,
                        })
                    );
                }
            }
        }
    }
    Ok(())
}

fn list(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn print_readers(partitions: &[PartitionReaders]) {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header([
        "PARTITION",
        "LEADER",
        "BUSY‰",
        "QUEUE",
        "EGRESS_B/S",
        "PRESSURE‰",
        "READER",
        "RACK",
        "READS_FROM",
        "OFFSET",
        "SEEN_MS_AGO",
        "REASON",
    ]);
    for p in partitions {
        let head = [
            p.partition.to_string(),
            p.leader.to_string(),
            p.busy_permille.to_string(),
            p.queue_depth.to_string(),
            p.egress_bytes_per_s.to_string(),
            p.pressure_permille.to_string(),
        ];
        if p.readers.is_empty() {
            let mut row = head.to_vec();
            row.extend([
                "-".to_string(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]);
            table.add_row(row);
        }
        for r in &p.readers {
            let mut row = head.to_vec();
            row.extend([
                r.reader_id.clone(),
                if r.rack.is_empty() {
                    "-".to_string()
                } else {
                    r.rack.clone()
                },
                r.replica.to_string(),
                r.fetch_offset.to_string(),
                r.last_seen_ms_ago.to_string(),
                r.reason.clone(),
            ]);
            table.add_row(row);
        }
    }
    println!("{table}");
}

fn readers_json(partitions: &[PartitionReaders]) -> serde_json::Value {
    serde_json::Value::Array(
        partitions
            .iter()
            .map(|p| {
                serde_json::json!({
                    "partition": p.partition,
                    "leader": p.leader,
                    "busy_permille": p.busy_permille,
                    "queue_depth": p.queue_depth,
                    "egress_bytes_per_s": p.egress_bytes_per_s,
                    "pressure_permille": p.pressure_permille,
                    "readers": p.readers.iter().map(|r| serde_json::json!({
                        "reader_id": r.reader_id,
                        "rack": r.rack,
                        "replica": r.replica,
                        "fetch_offset": r.fetch_offset,
                        "last_seen_ms_ago": r.last_seen_ms_ago,
                        "reason": r.reason,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

fn print_description(d: &TopicDescription) {
    println!(
        "topic {} (id {}), replication factor {}",
        d.name, d.topic_id, d.replication_factor
    );
    let configs: Vec<String> = d
        .configs
        .iter()
        .map(|c| format!("{}={}", c.key, c.value))
        .collect();
    println!("config {}", configs.join(" "));
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header([
        "PARTITION",
        "LEADER",
        "EPOCH",
        "SHARD",
        "REPLICAS",
        "ISR",
        "LOG_START",
        "HW",
        "END",
        "STATUS",
    ]);
    for p in &d.partitions {
        table.add_row([
            p.partition.to_string(),
            if p.leader == u32::MAX {
                "none".to_string()
            } else {
                p.leader.to_string()
            },
            p.leader_epoch.to_string(),
            p.shard.to_string(),
            list(&p.replicas),
            list(&p.isr),
            p.log_start_offset.to_string(),
            p.high_watermark.to_string(),
            p.end_offset.to_string(),
            ErrorCode::from_u16(p.error).name().replace("none", "ok"),
        ]);
    }
    println!("{table}");
}

pub fn description_json(d: &TopicDescription) -> serde_json::Value {
    serde_json::json!({
        "topic": d.name,
        "topic_id": d.topic_id,
        "replication_factor": d.replication_factor,
        "configs": d.configs.iter().map(|c| (c.key.clone(), serde_json::Value::String(c.value.clone()))).collect::<serde_json::Map<_, _>>(),
        "partitions": d.partitions.iter().map(|p| serde_json::json!({
            "partition": p.partition,
            "leader": p.leader,
            "leader_epoch": p.leader_epoch,
            "shard": p.shard,
            "replicas": p.replicas,
            "isr": p.isr,
            "log_start_offset": p.log_start_offset,
            "high_watermark": p.high_watermark,
            "end_offset": p.end_offset,
            "error": ErrorCode::from_u16(p.error).name(),
        })).collect::<Vec<_>>(),
    })
}

/// Lines read on a separate thread so linger timers keep running while stdin is quiet.
const STDIN_LINES_QUEUED_MAX: usize = 4096;

pub async fn produce(args: ProduceArgs) -> Result<(), Failure> {
    let acks: Acks = args.acks.parse().map_err(|e: String| Failure {
        message: e,
        exit_code: 2,
    })?;
    let client = connect(&args.client).await?;
    // Fail early (before reading stdin) if the topic does not exist.
    client.partition_count(&args.topic).await?;
    let producer = Rc::new(Producer::new(
        Rc::clone(&client),
        ProducerConfig {
            acks,
            linger_ms: args.linger_ms,
            batch_bytes: args.batch_bytes,
            request_timeout_ms: args.client.timeout_ms,
            ..ProducerConfig::default()
        },
    ));
    let (mut lines_tx, mut lines) =
        futures_channel::mpsc::channel::<std::io::Result<String>>(STDIN_LINES_QUEUED_MAX);
    std::thread::Builder::new()
        .name("wharf-stdin".to_string())
        .spawn(move || {
            use std::io::BufRead;
            for line in std::io::stdin().lock().lines() {
                let failed = line.is_err();
                if futures_lite::future::block_on(futures_util::SinkExt::send(&mut lines_tx, line))
                    .is_err()
                    || failed
                {
                    return;
                }
            }
        })
        .map_err(|e| format!("cannot start the stdin reader: {e}"))?;
    let mut deliveries = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let acked = Rc::new(std::cell::Cell::new(0u64));
    let failed = Rc::new(std::cell::Cell::new(0u64));
    let first_errors = Rc::new(std::cell::RefCell::new(Vec::<String>::new()));
    while let Some(line) = futures_util::StreamExt::next(&mut lines).await {
        let line = line.map_err(|e| format!("reading stdin: {e}"))?;
        let (key, value) = match args.key_separator {
            Some(separator) => match line.split_once(separator) {
                Some((key, value)) => (Some(key.as_bytes().to_vec()), value.as_bytes().to_vec()),
                None => (None, line.into_bytes()),
            },
            None => (None, line.into_bytes()),
        };
        match producer
            .send_to(&args.topic, args.partition, key.as_deref(), &value)
            .await
        {
            Ok(delivery) => {
                let acked = Rc::clone(&acked);
                let failed = Rc::clone(&failed);
                let first_errors = Rc::clone(&first_errors);
                deliveries.push(glommio::spawn_local(async move {
                    match delivery.await {
                        Ok(_) => acked.set(acked.get() + 1),
                        Err(error) => {
                            failed.set(failed.get() + 1);
                            let mut errors = first_errors.borrow_mut();
                            if errors.len() < 5 {
                                errors.push(error.to_string());
                            }
                        }
                    }
                }));
                // Keep memory bounded on long inputs: reap finished deliveries now and then.
                if deliveries.len() >= 65_536 {
                    for task in deliveries.drain(..) {
                        task.await;
                    }
                }
            }
            Err(error) => {
                failed.set(failed.get() + 1);
                if failures.len() < 5 {
                    failures.push(error.to_string());
                }
            }
        }
    }
    producer.close().await;
    for task in deliveries {
        task.await;
    }
    failures.extend(first_errors.borrow().iter().cloned());
    let (acked, failed) = (acked.get(), failed.get());
    let what = if acks == Acks::None {
        "sent (acks=none)"
    } else {
        "acknowledged"
    };
    eprintln!("{acked} records {what}, {failed} failed");
    for error in &failures {
        eprintln!("  error: {error}");
    }
    if failed > 0 {
        return Err(Failure {
            message: format!("{failed} records were not acknowledged"),
            exit_code: 1,
        });
    }
    Ok(())
}

/// One record as `wharf consume` prints it: its value on a line, or a JSON object.
fn write_record(
    out: &mut impl std::io::Write,
    record: &crate::client::consumer::RecordView<'_>,
    json: bool,
) -> std::io::Result<()> {
    if json {
        let value = serde_json::json!({
            "partition": record.partition,
            "offset": record.offset,
            "timestamp_ms": record.timestamp_ms,
            "key": record.key.map(|k| String::from_utf8_lossy(k).into_owned()),
            "value": String::from_utf8_lossy(record.value),
        });
        writeln!(out, "{value}")
    } else {
        out.write_all(record.value)?;
        out.write_all(b"\n")
    }
}

pub async fn consume(args: ConsumeArgs) -> Result<(), Failure> {
    if args.group.is_some() {
        return consume_group(args).await;
    }
    if args.queue.is_some() {
        return consume_queue(args).await;
    }
    let seek = match args.from.as_str() {
        "earliest" => SeekTo::Earliest,
        "latest" => SeekTo::Latest,
        text => match text.strip_prefix('@') {
            Some(ms) => SeekTo::Timestamp(ms.parse().map_err(|_| Failure {
                message: format!("--from @MILLIS needs a number, not {text:?}"),
                exit_code: 2,
            })?),
            None => SeekTo::Offset(text.parse().map_err(|_| Failure {
                message: format!(
                    "--from takes earliest, latest, an offset or @MILLIS, not {text:?}"
                ),
                exit_code: 2,
            })?),
        },
    };
    let client = connect(&args.client).await?;
    let mut consumer = Consumer::new(
        Rc::clone(&client),
        &args.topic,
        ConsumerConfig {
            max_wait_ms: if args.follow { 1000 } else { 200 },
            rack: args.rack.clone(),
            reader_id: args.reader_id.clone(),
            ..ConsumerConfig::default()
        },
    );
    let partitions = (!args.partition.is_empty()).then(|| args.partition.clone());
    consumer.assign(partitions, seek).await?;
    let mut printed = 0u64;
    let limit = args.count.unwrap_or(u64::MAX);
    let json = args.client.format == Format::Json;
    use std::io::Write;
    let stdout = std::io::stdout();
    loop {
        let records = consumer.poll().await?;
        let mut out = stdout.lock();
        let mut write_error = None;
        records.for_each(|record| {
            if printed >= limit || write_error.is_some() {
                return;
            }
            let result = write_record(&mut out, &record, json);
            if let Err(error) = result {
                write_error = Some(error);
            }
            printed += 1;
        })?;
        if let Some(error) = write_error {
            if error.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(format!("writing stdout: {error}").into());
        }
        let _ = out.flush();
        if printed >= limit || (!args.follow && consumer.caught_up()) {
            return Ok(());
        }
    }
}

/// `wharf consume TOPIC --group G`: a group member printing what it is assigned.
async fn consume_group(args: ConsumeArgs) -> Result<(), Failure> {
    use crate::client::groups::{GroupConsumer, GroupConsumerConfig, OffsetReset};
    use std::io::Write;
    let group = args.group.clone().unwrap_or_default();
    let offset_reset = match args.from.as_str() {
        "earliest" => OffsetReset::Earliest,
        "latest" => OffsetReset::Latest,
        "none" => OffsetReset::None,
        other => {
            return Err(Failure {
                message: format!("with --group, --from is earliest, latest or none, not {other:?}"),
                exit_code: 2,
            })
        }
    };
    if !args.partition.is_empty() {
        return Err(Failure {
            message: "--partition and --group exclude each other: the group assigns partitions"
                .into(),
            exit_code: 2,
        });
    }
    let client = connect(&args.client).await?;
    let mut config = GroupConsumerConfig::new(group);
    config.instance_id = args.instance_id.clone();
    config.offset_reset = offset_reset;
    config.consumer.max_wait_ms = if args.follow { 1000 } else { 200 };
    config.consumer.rack = args.rack.clone();
    config.consumer.reader_id = args.reader_id.clone();
    let mut member = GroupConsumer::join(Rc::clone(&client), &args.topic, config).await?;
    let limit = args.count.unwrap_or(u64::MAX);
    let json = args.client.format == Format::Json;
    let mut printed = 0u64;
    // Polls in a row with nothing new: without --follow, stop once caught up.
    let mut idle_polls = 0u32;
    let stdout = std::io::stdout();
    loop {
        let records = member.poll().await?;
        let mut out = stdout.lock();
        let mut write_error = None;
        // Where each partition stands after what was printed: records past --count are
        // not printed, so the member goes back to them before it commits.
        let mut first_unprinted: std::collections::BTreeMap<u32, u64> = Default::default();
        records.for_each(|record| {
            if printed >= limit || write_error.is_some() {
                first_unprinted
                    .entry(record.partition)
                    .or_insert(record.offset);
                return;
            }
            let result = write_record(&mut out, &record, json);
            match result {
                Ok(()) => printed += 1,
                Err(error) => {
                    first_unprinted
                        .entry(record.partition)
                        .or_insert(record.offset);
                    write_error = Some(error);
                }
            }
        })?;
        let _ = out.flush();
        drop(out);
        for (partition, offset) in &first_unprinted {
            member.seek(*partition, *offset).await?;
        }
        if let Some(error) = write_error {
            member.leave().await?;
            if error.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(format!("writing stdout: {error}").into());
        }
        idle_polls = if records.is_empty() {
            idle_polls + 1
        } else {
            0
        };
        if printed >= limit || (!args.follow && idle_polls >= 2 && member.caught_up()) {
            member.leave().await?;
            return Ok(());
        }
    }
}

/// Records per acquire of `wharf consume --queue`.
const QUEUE_CONSUME_BATCH: u32 = 100;

/// `wharf consume TOPIC --queue G [--ack]`: a queue member printing what it acquires.
async fn consume_queue(args: ConsumeArgs) -> Result<(), Failure> {
    use crate::client::queues::QueueMember;
    use std::io::Write;
    let group = args.queue.clone().unwrap_or_default();
    if !args.partition.is_empty() {
        return Err(Failure {
            message: "--partition and --queue exclude each other: any member gets any record"
                .into(),
            exit_code: 2,
        });
    }
    let client = connect(&args.client).await?;
    let described = client.describe_queue(&group).await?;
    if described.topic != args.topic {
        return Err(Failure {
            message: format!(
                "queue group {group:?} consumes {:?}, not {:?}",
                described.topic, args.topic
            ),
            exit_code: 2,
        });
    }
    let member_id = args.member.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".to_string());
        format!("{host}-{}", std::process::id())
    });
    let member = QueueMember::new(Rc::clone(&client), &group, &member_id);
    let limit = args.count.unwrap_or(u64::MAX);
    let json = args.client.format == Format::Json;
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    loop {
        let want = QUEUE_CONSUME_BATCH.min(u32::try_from(limit - printed).unwrap_or(u32::MAX));
        let wait_ms = if args.follow { 1_000 } else { 300 };
        let records = member.acquire(want, wait_ms).await?;
        if records.is_empty() && !args.follow {
            return Ok(());
        }
        for d in &records {
            let written = {
                let mut out = stdout.lock();
                let result = if json {
                    let value = serde_json::json!({
                        "partition": d.partition,
                        "offset": d.offset,
                        "delivery_attempt": d.delivery_attempt,
                        "timestamp_ms": d.timestamp_ms,
                        "key": d.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
                        "value": String::from_utf8_lossy(&d.value),
                    });
                    writeln!(out, "{value}")
                } else {
                    out.write_all(&d.value).and_then(|_| out.write_all(b"\n"))
                };
                result.and_then(|_| out.flush())
            };
            if let Err(error) = written {
                // Not acked: the record comes back after its lease.
                if error.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(());
                }
                return Err(format!("writing stdout: {error}").into());
            }
            if args.ack {
                member.ack(d).await?;
            }
            printed += 1;
        }
        if printed >= limit {
            return Ok(());
        }
    }
}

/// A dead-letter record on its way back: where it is, where it goes.
struct DeadLetterCopy {
    dlq_partition: u32,
    offset: u64,
    /// The original partition (from its header), if the topic still has it.
    partition: Option<u32>,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
}

/// `wharf queue replay`: dead letters back to the queue's topic. Returns (records, from, to).
async fn replay_dead_letters(
    client: &Rc<Client>,
    group: &str,
    count: Option<u64>,
) -> Result<(u64, String, String), Failure> {
    use crate::client::groups::{GroupConsumer, GroupConsumerConfig, OffsetReset};
    use crate::client::producer::{Producer, ProducerConfig};
    use crate::server::queues::DLQ_HEADER_PARTITION;
    let described = client.describe_queue(group).await?;
    let dlq = described.settings.dead_letter_topic.clone();
    let topic = described.topic.clone();
    let partitions = client.partition_count(&topic).await?;
    let mut config = GroupConsumerConfig::new(format!("{group}.replay"));
    config.auto_commit = false;
    config.offset_reset = OffsetReset::Earliest;
    config.consumer.max_wait_ms = 200;
    let mut member = GroupConsumer::join(Rc::clone(client), &dlq, config).await?;
    let producer = Producer::new(Rc::clone(client), ProducerConfig::default());
    let limit = count.unwrap_or(u64::MAX);
    let mut replayed = 0u64;
    let mut idle_polls = 0u32;
    loop {
        let records = member.poll().await?;
        let mut sends = Vec::new();
        let mut first_unsent: std::collections::BTreeMap<u32, u64> = Default::default();
        let mut failed = None;
        let mut batch: Vec<DeadLetterCopy> = Vec::new();
        records.for_each(|r| {
            let partition = r
                .header(DLQ_HEADER_PARTITION)
                .and_then(|p| std::str::from_utf8(p).ok()?.parse::<u32>().ok())
                .filter(|p| *p < partitions);
            batch.push(DeadLetterCopy {
                dlq_partition: r.partition,
                offset: r.offset,
                partition,
                key: r.key.map(<[u8]>::to_vec),
                value: r.value.to_vec(),
            });
        })?;
        for DeadLetterCopy {
            dlq_partition,
            offset,
            partition,
            key,
            value,
        } in batch
        {
            if replayed + sends.len() as u64 >= limit {
                first_unsent.entry(dlq_partition).or_insert(offset);
                continue;
            }
            match producer
                .send_to(&topic, partition, key.as_deref(), &value)
                .await
            {
                Ok(delivery) => sends.push(delivery),
                Err(error) => {
                    first_unsent.entry(dlq_partition).or_insert(offset);
                    failed = Some(error);
                    break;
                }
            }
        }
        producer.flush().await;
        let sent = sends.len() as u64;
        for delivery in sends {
            delivery.await?;
        }
        replayed += sent;
        // Records past --count (or after a failure) are replayed next time: the group goes
        // back to them before it commits.
        for (partition, offset) in &first_unsent {
            member.seek(*partition, *offset).await?;
        }
        member.commit().await?;
        if let Some(error) = failed {
            member.leave().await?;
            return Err(error.into());
        }
        idle_polls = if records.is_empty() {
            idle_polls + 1
        } else {
            0
        };
        if replayed >= limit || (idle_polls >= 2 && member.caught_up()) {
            member.leave().await?;
            producer.close().await;
            return Ok((replayed, dlq, topic));
        }
    }
}

/// Per-mille of a ratio given on the command line (`2.0` -> 2000).
fn permille(what: &str, value: f64) -> Result<u32, Failure> {
    if !value.is_finite() || !(0.0..=1_000.0).contains(&value) {
        return Err(Failure {
            message: format!("--{what} {value} is out of range"),
            exit_code: 2,
        });
    }
    Ok((value * 1_000.0).round() as u32)
}

pub async fn queue(command: QueueCommand, args: ClientArgs) -> Result<(), Failure> {
    let client = connect(&args).await?;
    match command {
        QueueCommand::Create {
            group,
            topic,
            ack_wait_ms,
            max_deliveries,
            in_flight_max,
            backoff_initial_ms,
            backoff_max_ms,
            backoff_multiplier,
            backoff_jitter,
            backoff_list_ms,
            per_key_ordering,
            dead_letter_topic,
        } => {
            let settings = crate::protocol::QueueSettings {
                ack_wait_ms,
                max_deliveries,
                in_flight_max,
                backoff_initial_ms,
                backoff_max_ms,
                backoff_multiplier_permille: permille("backoff-multiplier", backoff_multiplier)?,
                backoff_jitter_permille: permille("backoff-jitter", backoff_jitter)?,
                backoff_list_ms,
                per_key_ordering,
                dead_letter_topic: dead_letter_topic.unwrap_or_default(),
            };
            client.create_queue(&group, &topic, settings).await?;
            let described = client.describe_queue(&group).await?;
            println!(
                "created queue group {group} on {topic} (dead letters to {})",
                described.settings.dead_letter_topic
            );
        }
        QueueCommand::Replay { group, count } => {
            let replayed = replay_dead_letters(&client, &group, count).await?;
            println!(
                "replayed {} records from {} to {}",
                replayed.0, replayed.1, replayed.2
            );
        }
        QueueCommand::List => {
            let queues = client.list_queues().await?;
            match args.format {
                Format::Text => {
                    let mut table = comfy_table::Table::new();
                    table.load_preset(comfy_table::presets::NOTHING);
                    table.set_header(["QUEUE", "TOPIC", "IN FLIGHT", "DEAD LETTERS TO"]);
                    for q in &queues {
                        table.add_row([
                            q.group.clone(),
                            q.topic.clone(),
                            q.in_flight.to_string(),
                            q.dead_letter_topic.clone(),
                        ]);
                    }
                    println!("{table}");
                }
                Format::Json => {
                    let list: Vec<serde_json::Value> = queues
                        .iter()
                        .map(|q| {
                            serde_json::json!({
                                "group": q.group,
                                "topic": q.topic,
                                "in_flight": q.in_flight,
                                "dead_letter_topic": q.dead_letter_topic,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::Value::Array(list));
                }
            }
        }
        QueueCommand::Describe { group } => {
            let d = client.describe_queue(&group).await?;
            let s = &d.settings;
            let partitions: Vec<serde_json::Value> = d
                .partitions
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "partition": p.partition,
                        "done_below": p.start_offset,
                        "delivered_up_to": p.end_offset,
                        "in_flight": p.in_flight,
                        "waiting": p.waiting,
                        "dead_lettering": p.dead_lettering,
                        "oldest_pending_age_ms": p.oldest_pending_age_ms,
                    })
                })
                .collect();
            match args.format {
                Format::Json => {
                    let value = serde_json::json!({
                        "group": d.group,
                        "topic": d.topic,
                        "coordinator": d.coordinator,
                        "ack_wait_ms": s.ack_wait_ms,
                        "max_deliveries": s.max_deliveries,
                        "in_flight_max": s.in_flight_max,
                        "backoff_initial_ms": s.backoff_initial_ms,
                        "backoff_max_ms": s.backoff_max_ms,
                        "backoff_multiplier_permille": s.backoff_multiplier_permille,
                        "backoff_jitter_permille": s.backoff_jitter_permille,
                        "backoff_list_ms": s.backoff_list_ms,
                        "per_key_ordering": s.per_key_ordering,
                        "dead_letter_topic": s.dead_letter_topic,
                        "acked": d.acked,
                        "redelivered": d.redelivered,
                        "dead_lettered": d.dead_lettered,
                        "partitions": partitions,
                    });
                    println!("{value}");
                }
                Format::Text => {
                    println!(
                        "queue {} on {} (coordinator broker {})",
                        d.group, d.topic, d.coordinator
                    );
                    let backoff = if s.backoff_list_ms.is_empty() {
                        format!(
                            "{} ms x{:.2} up to {} ms, jitter {:.0}%",
                            s.backoff_initial_ms,
                            f64::from(s.backoff_multiplier_permille) / 1_000.0,
                            s.backoff_max_ms,
                            f64::from(s.backoff_jitter_permille) / 10.0
                        )
                    } else {
                        format!("{:?} ms", s.backoff_list_ms)
                    };
                    println!(
                        "ack wait {} ms, {} deliveries, backoff {backoff}, per-key ordering {}, dead letters to {}",
                        s.ack_wait_ms, s.max_deliveries, s.per_key_ordering, s.dead_letter_topic
                    );
                    println!(
                        "since loaded: {} acked, {} redelivered, {} dead-lettered",
                        d.acked, d.redelivered, d.dead_lettered
                    );
                    let mut table = comfy_table::Table::new();
                    table.load_preset(comfy_table::presets::NOTHING);
                    table.set_header([
                        "PARTITION",
                        "DONE BELOW",
                        "DELIVERED TO",
                        "IN FLIGHT",
                        "WAITING",
                        "DLQ PENDING",
                        "OLDEST MS",
                    ]);
                    for p in &d.partitions {
                        table.add_row([
                            p.partition.to_string(),
                            p.start_offset.to_string(),
                            p.end_offset.to_string(),
                            p.in_flight.to_string(),
                            p.waiting.to_string(),
                            p.dead_lettering.to_string(),
                            p.oldest_pending_age_ms.to_string(),
                        ]);
                    }
                    println!("{table}");
                }
            }
        }
    }
    Ok(())
}

pub async fn group(command: GroupCommand, args: ClientArgs) -> Result<(), Failure> {
    let client = connect(&args).await?;
    match command {
        GroupCommand::List => {
            let groups = client.list_groups().await?;
            match args.format {
                Format::Text => {
                    let mut table = comfy_table::Table::new();
                    table.load_preset(comfy_table::presets::NOTHING);
                    table.set_header(["GROUP", "MEMBERS", "EPOCH", "LAG", "LAG MS"]);
                    for g in &groups {
                        table.add_row([
                            g.group.clone(),
                            g.members.to_string(),
                            g.group_epoch.to_string(),
                            g.lag_records.to_string(),
                            g.lag_ms_max.to_string(),
                        ]);
                    }
                    println!("{table}");
                }
                Format::Json => {
                    let groups: Vec<_> = groups
                        .iter()
                        .map(|g| serde_json::json!({"group": g.group, "members": g.members, "group_epoch": g.group_epoch, "lag_records": g.lag_records, "lag_ms_max": g.lag_ms_max}))
                        .collect();
                    println!("{}", serde_json::Value::Array(groups));
                }
            }
        }
        GroupCommand::Describe { group } => {
            let d = client.describe_group(&group).await?;
            // Lag per committed partition: the partition's high watermark minus the
            // committed offset, and how long ago the commit was.
            let now_ms = crate::server::partition::now_ms();
            let mut lags = Vec::new();
            for o in &d.offsets {
                let end = client
                    .list_offsets(
                        &o.topic,
                        &[o.partition],
                        crate::protocol::OffsetSpec::Latest,
                    )
                    .await
                    .ok()
                    .and_then(|v| v.first().map(|(_, e)| *e));
                lags.push((o, end));
            }
            match args.format {
                Format::Text => {
                    println!(
                        "group {group}: epoch {}, assignor {}, coordinator broker {}, {} member(s)",
                        d.group_epoch,
                        d.assignor,
                        d.coordinator,
                        d.members.len()
                    );
                    let parts = |v: &[crate::protocol::GroupPartition]| {
                        v.iter()
                            .map(|p| format!("{}/{}", p.topic, p.partition))
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    let mut members = comfy_table::Table::new();
                    members.load_preset(comfy_table::presets::NOTHING);
                    members.set_header(["MEMBER", "INSTANCE", "EPOCH", "ASSIGNED", "REVOKING"]);
                    for m in &d.members {
                        members.add_row([
                            m.member_id.clone(),
                            m.instance_id.clone().unwrap_or_else(|| "-".into()),
                            m.member_epoch.to_string(),
                            parts(&m.assigned),
                            parts(&m.revoking),
                        ]);
                    }
                    println!("{members}");
                    let mut offsets = comfy_table::Table::new();
                    offsets.load_preset(comfy_table::presets::NOTHING);
                    offsets.set_header([
                        "TOPIC",
                        "PARTITION",
                        "COMMITTED",
                        "END",
                        "LAG",
                        "MEMBER LAG",
                        "COMMITTED AGO",
                    ]);
                    for (o, end) in &lags {
                        // What the owning member last reported: its position's lag in
                        // records and in time (the committed offset trails it).
                        let reported = d
                            .lag
                            .iter()
                            .find(|l| l.topic == o.topic && l.partition == o.partition)
                            .map_or_else(
                                || "-".to_string(),
                                |l| {
                                    format!(
                                        "{} records, {} ms",
                                        l.high_watermark.saturating_sub(l.position),
                                        l.lag_ms
                                    )
                                },
                            );
                        offsets.add_row([
                            o.topic.clone(),
                            o.partition.to_string(),
                            o.offset.to_string(),
                            end.map_or_else(|| "?".into(), |e| e.to_string()),
                            end.map_or_else(
                                || "?".into(),
                                |e| e.saturating_sub(o.offset).to_string(),
                            ),
                            reported,
                            format!("{} ms", now_ms.saturating_sub(o.commit_ms)),
                        ]);
                    }
                    println!("{offsets}");
                }
                Format::Json => {
                    let members: Vec<_> = d
                        .members
                        .iter()
                        .map(|m| {
                            serde_json::json!({
                                "member_id": m.member_id,
                                "instance_id": m.instance_id,
                                "member_epoch": m.member_epoch,
                                "assigned": m.assigned.iter().map(|p| serde_json::json!({"topic": p.topic, "partition": p.partition})).collect::<Vec<_>>(),
                                "revoking": m.revoking.iter().map(|p| serde_json::json!({"topic": p.topic, "partition": p.partition})).collect::<Vec<_>>(),
                            })
                        })
                        .collect();
                    let offsets: Vec<_> = lags
                        .iter()
                        .map(|(o, end)| {
                            serde_json::json!({
                                "topic": o.topic,
                                "partition": o.partition,
                                "committed": o.offset,
                                "end": end,
                                "lag": end.map(|e| e.saturating_sub(o.offset)),
                                "commit_ms": o.commit_ms,
                                "member_lag": d.lag.iter().find(|l| l.topic == o.topic && l.partition == o.partition).map(|l| serde_json::json!({
                                    "position": l.position,
                                    "high_watermark": l.high_watermark,
                                    "lag_records": l.high_watermark.saturating_sub(l.position),
                                    "lag_ms": l.lag_ms,
                                })),
                            })
                        })
                        .collect();
                    println!(
                        "{}",
                        serde_json::json!({
                            "group": group,
                            "group_epoch": d.group_epoch,
                            "assignor": d.assignor,
                            "coordinator": d.coordinator,
                            "members": members,
                            "offsets": offsets,
                        })
                    );
                }
            }
        }
        GroupCommand::ResetOffsets {
            group,
            topic,
            to,
            partition,
        } => {
            let count = client.partition_count(&topic).await?;
            let partitions: Vec<u32> = if partition.is_empty() {
                (0..count).collect()
            } else {
                partition
            };
            let targets: Vec<(u32, u64)> = match to.as_str() {
                "earliest" | "latest" => {
                    let spec = if to == "earliest" {
                        crate::protocol::OffsetSpec::Earliest
                    } else {
                        crate::protocol::OffsetSpec::Latest
                    };
                    client.list_offsets(&topic, &partitions, spec).await?
                }
                text => {
                    let offset: u64 = text.parse().map_err(|_| Failure {
                        message: format!("--to takes earliest, latest or an offset, not {text:?}"),
                        exit_code: 2,
                    })?;
                    partitions.iter().map(|&p| (p, offset)).collect()
                }
            };
            let offsets = targets
                .iter()
                .map(|&(partition, offset)| crate::protocol::OffsetCommitEntry {
                    topic: topic.clone(),
                    partition,
                    offset,
                    leader_epoch: None,
                    metadata: "reset-offsets".into(),
                })
                .collect();
            client.commit_offsets_admin(&group, offsets).await?;
            for (partition, offset) in targets {
                println!("{group}: {topic}/{partition} -> {offset}");
            }
        }
        GroupCommand::Delete { group } => {
            client.delete_group(&group).await?;
            println!("deleted group {group}");
        }
    }
    Ok(())
}
