//! The `wharf` command line: the server (`serve`), admin (`topic ...`), `produce`, `consume`.

use std::path::PathBuf;
use std::rc::Rc;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::client::consumer::{Consumer, ConsumerConfig, SeekTo};
use crate::client::producer::{Producer, ProducerConfig};
use crate::client::{Client, ClientConfig, ClientError};
use crate::config::{ServerConfig, CLIENT_PORT_DEFAULT};
use crate::protocol::{Acks, ConfigEntry, ErrorCode, TopicDescription};

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
        /// recent_bytes_max.
        #[arg(long = "config", value_name = "KEY=VALUE")]
        configs: Vec<String>,
    },
    List,
    Describe {
        topic: String,
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
        TopicCommand::Describe { topic } => {
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
