//! `wharf serve`: one glommio executor per shard, each pinned to a core, owning its partitions.
//!
//! Start-up (on the main thread, before any shard runs): lock the data directory, load or create
//! the metadata, fit its placement to the shard count, remove directories of deleted topics.
//! Then every shard recovers the partitions it owns, binds the shared listener (SO_REUSEPORT)
//! and its own direct port, and serves. Shard 0 also serves the admin HTTP endpoint and
//! serializes metadata changes. A signal thread turns SIGTERM/SIGINT into a graceful shutdown;
//! a second signal exits at once.

mod admin;
mod connection;
mod control;
mod dispatch;
mod groups;
mod handlers;
pub mod metrics;
pub mod partition;
pub mod producer_ids;
pub mod queues;
mod read_replicas;
mod shard;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use futures_channel::oneshot;
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};

use crate::config::ServerConfig;
use crate::metadata::{self, BrokerMetadata};
use crate::peer_auth::ClusterSecret;
use metrics::Metrics;
pub use shard::{ShardReply, ShardRequest};

/// State every shard can see. Only start-up, the admin endpoint and metrics touch it; the data
/// path stays shard-local.
pub struct Shared {
    pub config: ServerConfig,
    pub metrics: Metrics,
    /// Each shard's direct listener, set once it is bound.
    pub shard_addresses: Vec<OnceLock<SocketAddr>>,
    /// Each shard's direct internal listener (with `cluster.internal_listen`).
    pub internal_shard_addresses: Vec<OnceLock<SocketAddr>>,
    /// The cluster secret peers of the internal listener prove (`cluster.secret_file`).
    pub secret: Option<ClusterSecret>,
    /// Set while the data directory's free space is below `disk_free_bytes_min`.
    pub disk_full: AtomicBool,
    /// Shards that recovered their partitions and are accepting connections.
    pub ready_shards: AtomicUsize,
    pub shutting_down: AtomicBool,
    /// Controller mode: shard 0 finished moving leadership away at shutdown.
    pub controlled_shutdown_done: AtomicBool,
    /// Controller mode: the controller registered this broker and it applied the metadata
    /// (readiness waits for it, so a started cluster can create topics at once).
    pub controller_registered: AtomicBool,
    /// Controller mode: the end of this broker's session lease (`partition::monotonic_ms`).
    /// Past it the broker is cut off from the controller and its metadata may be stale.
    pub controller_lease_until_ms: AtomicU64,
    /// Per shard: milliseconds since `started` of its last heartbeat (liveness).
    pub heartbeats_ms: Vec<AtomicU64>,
    pub started: Instant,
    /// Producer ids this run hands out (`InitProducerId`).
    pub producer_ids: producer_ids::ProducerIds,
    /// Each shard's id in the channel mesh (set once it joined) and the barrier after which all
    /// are known.
    pub peer_ids: Vec<OnceLock<usize>>,
    pub mesh_barrier: std::sync::Barrier,
}

impl Shared {
    pub fn shards(&self) -> usize {
        self.config.shards
    }

    pub fn is_ready(&self) -> bool {
        self.ready_shards.load(Ordering::Acquire) == self.shards()
            && !self.shutting_down.load(Ordering::Acquire)
            && (self.config.cluster.controller_voters.is_empty()
                || self.controller_registered.load(Ordering::Acquire))
    }
}

/// The exit status after a shard panic (the Rust panic convention).
pub const EXIT_SHARD_PANIC: i32 = 101;

/// Makes a shard panic stop the whole process. A panicking task unwinds its executor and the
/// shard's thread ends, while the other shards would go on serving: the broker would look
/// alive with a dead shard (its partitions unavailable, connections to its port reset). A
/// crashed broker is the safe state: what was acknowledged is durable, and systemd
/// (`Restart=on-failure`) starts it again, recovering every partition. Installed once per
/// process, around the default hook (which prints the panic and its backtrace first).
fn exit_on_shard_panic() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default_hook(info);
            let thread = std::thread::current();
            let name = thread.name().unwrap_or_default();
            if name.starts_with(SHARD_THREAD_PREFIX) {
                // Printed directly: the log writer thread may not run again before the exit.
                eprintln!(
                    "wharf: {name}: shard panicked; stopping the broker (exit {EXIT_SHARD_PANIC})"
                );
                tracing::error!(thread = name, "shard panicked; stopping the broker");
                std::process::exit(EXIT_SHARD_PANIC);
            }
        }));
    });
}

/// Shard threads are named `wharf-shard-<id>` (glommio may append a suffix).
const SHARD_THREAD_PREFIX: &str = "wharf-shard-";

/// Runs the broker until SIGTERM or SIGINT stops it (a second signal exits at once).
pub fn serve(config: ServerConfig) -> Result<(), String> {
    let mut server = start(config)?;
    let stops = server.stops.take().unwrap_or_default();
    spawn_signal_thread(Arc::clone(&server.shared), stops)?;
    server.join()
}

/// A broker started in this process (`wharf serve`, or embedded by the load generator).
pub struct RunningServer {
    pub shared: Arc<Shared>,
    stops: Option<Vec<oneshot::Sender<()>>>,
    handles: Vec<glommio::ExecutorJoinHandle<Result<(), String>>>,
    _lock: metadata::DataDirLock,
}

impl RunningServer {
    /// The shared client listener.
    pub fn listen_address(&self) -> &str {
        &self.shared.config.listen
    }

    /// Begins a graceful shutdown (as SIGTERM does).
    pub fn shutdown(&mut self) {
        self.shared.shutting_down.store(true, Ordering::Release);
        for stop in self.stops.take().unwrap_or_default() {
            let _ = stop.send(());
        }
    }

    /// Waits for every shard to stop.
    pub fn join(self) -> Result<(), String> {
        let mut failure = None;
        for (id, handle) in self.handles.into_iter().enumerate() {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::error!(shard = id, %error, "shard failed");
                    failure.get_or_insert(format!("shard {id}: {error}"));
                }
                Err(error) => {
                    failure.get_or_insert(format!("shard {id} panicked: {error}"));
                }
            }
        }
        match failure {
            None => {
                tracing::info!("wharf stopped cleanly");
                Ok(())
            }
            Some(error) => Err(error),
        }
    }
}

/// Starts the broker and returns once every shard serves (or the first start error).
pub fn start(config: ServerConfig) -> Result<RunningServer, String> {
    let mut config = config.validate()?;
    exit_on_shard_panic();
    let secret = match &config.cluster.secret_file {
        Some(path) => Some(ClusterSecret::load(path)?),
        None => None,
    };
    // The lock first: holding it proves no live broker owns this data, so a listener still
    // answering on our ports is a dead predecessor's, being torn down (kill -9, then an
    // immediate restart): wait for it instead of failing.
    let lock = metadata::lock_data_dir(&config.data_dir)?;
    let port_wait = std::time::Duration::from_millis(config.port_wait_ms);
    config.listen = claim_address("listen", &config.listen, port_wait)?;
    config.admin_listen = claim_address("admin_listen", &config.admin_listen, port_wait)?;
    if let Some(internal) = config.cluster.internal_listen.clone() {
        config.cluster.internal_listen = Some(claim_address(
            "cluster.internal_listen",
            &internal,
            port_wait,
        )?);
    }
    let mut broker_metadata = match metadata::load(&config.data_dir)? {
        Some(existing) => {
            if existing.broker_id != config.broker_id {
                return Err(format!(
                    "data directory {} belongs to broker {}, not {}",
                    config.data_dir.display(),
                    existing.broker_id,
                    config.broker_id
                ));
            }
            existing
        }
        None => {
            let fresh = BrokerMetadata::new(config.broker_id);
            metadata::store(&config.data_dir, &fresh)?;
            fresh
        }
    };
    if broker_metadata.fit_to_shards(config.shards as u32) {
        tracing::info!(
            shards = config.shards,
            "shard count changed: partitions re-placed"
        );
        metadata::store(&config.data_dir, &broker_metadata)?;
    }
    for removed in metadata::remove_orphans(&config.data_dir, &broker_metadata)? {
        tracing::warn!(dir = %removed.display(), "removed the directory of a deleted topic");
    }
    let producer_id_block = metadata::reserve_producer_id_block(&config.data_dir)?;
    let producer_ids = producer_ids::ProducerIds::new(config.broker_id, producer_id_block)?;
    let shards = config.shards;
    let shared = Arc::new(Shared {
        producer_ids,
        shard_addresses: (0..shards).map(|_| OnceLock::new()).collect(),
        internal_shard_addresses: (0..shards).map(|_| OnceLock::new()).collect(),
        secret,
        disk_full: AtomicBool::new(false),
        ready_shards: AtomicUsize::new(0),
        shutting_down: AtomicBool::new(false),
        controlled_shutdown_done: AtomicBool::new(false),
        controller_registered: AtomicBool::new(false),
        controller_lease_until_ms: AtomicU64::new(0),
        heartbeats_ms: (0..shards).map(|_| AtomicU64::new(0)).collect(),
        started: Instant::now(),
        peer_ids: (0..shards).map(|_| OnceLock::new()).collect(),
        mesh_barrier: std::sync::Barrier::new(shards),
        metrics: Metrics::new(),
        config,
    });
    let broker_metadata = Arc::new(broker_metadata);
    let mesh = MeshBuilder::full(shards, shared.config.shard_channel_capacity);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut stops = Vec::new();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let mut handles = Vec::new();
    tracing::info!(
        broker_id = shared.config.broker_id,
        shards,
        cpu_set = %shared.config.cpu_set,
        listen = %shared.config.listen,
        admin = %shared.config.admin_listen,
        data_dir = %shared.config.data_dir.display(),
        "starting wharf"
    );
    for id in 0..shards {
        let (stop, stopped) = oneshot::channel::<()>();
        stops.push(stop);
        let shared = Arc::clone(&shared);
        let mesh = mesh.clone();
        let broker_metadata = Arc::clone(&broker_metadata);
        // `cpu_set` decides: by default each shard on its own core when there are enough.
        let placement = match shared.config.cpu_set.cpu_of(id, shards, cores) {
            Some(cpu) => Placement::Fixed(cpu),
            None => Placement::Unbound,
        };
        let started = started_tx.clone();
        let handle = LocalExecutorBuilder::new(placement)
            .spin_before_park(std::time::Duration::from_micros(
                shared.config.spin_before_park_us,
            ))
            .name(&format!("{SHARD_THREAD_PREFIX}{id}"))
            .io_memory(shared.config.io_memory_bytes)
            .ring_depth(crate::runtime::RING_DEPTH_DEFAULT)
            .spawn(move || shard::run(id as u32, shared, mesh, broker_metadata, stopped, started))
            .map_err(|e| format!("cannot start shard {id} (io_uring): {e}"))?;
        handles.push(handle);
    }
    drop(started_tx);
    let mut server = RunningServer {
        shared,
        stops: Some(stops),
        handles,
        _lock: lock,
    };
    for _ in 0..shards {
        match started_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                server.shutdown();
                return Err(error);
            }
            Err(_) => {
                server.shutdown();
                return Err("a shard stopped during start-up".to_string());
            }
        }
    }
    tracing::info!(listen = %server.shared.config.listen, "wharf is ready");
    Ok(server)
}

/// Checks that nobody listens on `address` (the shards bind it with SO_REUSEPORT, which
/// would silently share the port with another broker) and resolves port 0 to a free port. A
/// listener still answering is waited for up to `wait` (the caller holds the data-directory
/// lock, so it can only be a dead broker's socket being torn down), with a log line.
fn claim_address(what: &str, address: &str, wait: std::time::Duration) -> Result<String, String> {
    use std::net::ToSocketAddrs;
    /// How often a busy port is tried again.
    const PORT_RETRY_MS: u64 = 20;
    let resolved = address
        .to_socket_addrs()
        .map_err(|e| format!("{what} {address}: {e}"))?
        .next()
        .ok_or_else(|| format!("{what} {address}: no address"))?;
    let waiting_since = Instant::now();
    let mut logged = false;
    while resolved.port() != 0
        && std::net::TcpStream::connect_timeout(&resolved, std::time::Duration::from_millis(200))
            .is_ok()
    {
        if waiting_since.elapsed() >= wait {
            return Err(format!(
                "cannot listen on {address} ({what}): another process already listens there \
                 (waited {} ms for it to go away)",
                wait.as_millis()
            ));
        }
        if !logged {
            tracing::warn!(
                what,
                address,
                wait_ms = wait.as_millis() as u64,
                "a listener still answers on this port although this broker holds the data \
                 directory lock (a killed broker's socket being torn down?): waiting for it"
            );
            logged = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(PORT_RETRY_MS));
    }
    if logged {
        tracing::info!(
            what,
            address,
            waited_ms = waiting_since.elapsed().as_millis() as u64,
            "the port is free"
        );
    }
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(resolved),
        socket2::Type::STREAM,
        None,
    )
    .map_err(|e| format!("{what}: {e}"))?;
    // Same options as the shards' listeners, so sockets left in TIME_WAIT by a previous run
    // do not block the restart.
    socket
        .set_reuse_port(true)
        .map_err(|e| format!("{what}: {e}"))?;
    socket
        .bind(&resolved.into())
        .map_err(|e| format!("cannot listen on {address} ({what}): {e}"))?;
    let bound = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| format!("{what}: no local address"))?;
    Ok(bound.to_string())
}

fn spawn_signal_thread(shared: Arc<Shared>, stops: Vec<oneshot::Sender<()>>) -> Result<(), String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("wharf-signals".to_string())
        .spawn(move || {
            let mut stops = Some(stops);
            for signal in signals.forever() {
                match stops.take() {
                    Some(stops) => {
                        tracing::info!(signal, "shutting down: finishing in-flight requests (send the signal again to exit at once)");
                        shared.shutting_down.store(true, Ordering::Release);
                        for stop in stops {
                            let _ = stop.send(());
                        }
                    }
                    None => {
                        eprintln!("wharf: second signal, exiting at once");
                        std::process::exit(130);
                    }
                }
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(())
}
