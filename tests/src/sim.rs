//! The deterministic cluster simulator (DESIGN §9): several replicas of one partition, each the
//! real [`Replica`] state machine over a real [`PartitionLog`] on [`MemDisk`], connected by a
//! seeded network that delays, drops, duplicates, reorders and partitions messages. Nodes crash
//! (losing or tearing unsynced writes) and restart. A simulated controller moves leadership
//! inside the ISR, bumping the epoch. After every step the invariants are checked; a failure
//! names its seed, and `cargo run -p wharf-tests --bin sim -- --seed N --steps M` replays it.
//!
//! Invariants:
//! - no write acknowledged with `acks=all` is lost while at most RF − min_insync replicas are
//!   down (the simulator never crashes more);
//! - an acknowledgement's replica count is true: that many replicas durably hold the batch;
//! - an offset below any high watermark ever exposed maps to exactly one batch, forever;
//! - the leader's HW never exceeds the durable offset of an ISR member, and never goes back on
//!   one replica;
//! - consumers (reading from the leader below its HW) see a prefix of the committed log;
//! - at the end, with faults healed, every replica holds the same log.
//!
//! Controller mode (`SimConfig::isr_via_controller`): the replicas run with
//! `isr_via_controller`, and the shipped controller (`wharf_controller`, three Raft voters
//! hosted by the three brokers, see `sim/controller_mode.rs`) replaces the instant controller:
//! brokers heartbeat the controller leader over the simulated network, learn leadership, ISR
//! and leases from the metadata it answers with, send ISR proposals; the controller fences
//! silent brokers and fails over. Added faults: the controller leader's broker crashes, a
//! broker loses its heartbeats, raft messages are dropped. Added invariants: one raft leader
//! per term; committed controller entries never change; one leader per leader epoch (in the
//! committed records and among the replicas); a fence commits only after the fenced
//! incarnation's lease ended, and its lease is not renewed past the fence; a leader
//! acknowledges `quorum`/`N`/`all` only before its lease ends and before its incarnation is
//! fenced, and never advances its HW past its lease; a write acknowledged with `quorum` or
//! `N` ≥ 2 is not lost while at most one broker failed (crashed, or left the controller's
//! ISR) since it was acknowledged, counting brokers already down then (the successor rule,
//! `AckLevel::Quorum`).

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use futures_lite::future::block_on;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rkyv::util::AlignedVec;
use wharf_replication::driver::{self, Answer, Durability, Fetched, PartitionHost, ProduceFailure};
use wharf_replication::producers::ProducerStates;
use wharf_replication::{
    AckLevel, BatchInfo, BrokerId, EpochHistory, FetchError, FetchReply, FetchRequest, Input,
    IsrRejection, LogState, ProduceError, Replica, ReplicaConfig, Role, WaiterId,
};
use wharf_storage::batch;
use wharf_storage::conformance::make_batch;
use wharf_storage::log::{AppendError, LogConfig, PartitionLog};
use wharf_storage::mem_disk::{CrashMode, MemDisk, SECTOR_BYTES};
use wharf_storage::{Epoch, Offset};

use wharf_controller::decisions::AlterPartitionRequest;
use wharf_controller::node::{BrokerHeartbeat, HeartbeatReply, NotController};

use controller_mode::Quorum;

mod controller_mode;

/// Bytes a leader returns per fetch.
const FETCH_BYTES_MAX: usize = 16 * 1024;
/// Long-poll wait of a fetch with no new data.
const FETCH_WAIT_MS: u64 = 20;
/// Steps the final convergence phase may take.
const SETTLE_STEPS_MAX: usize = 20_000;
/// Produces in flight from the simulated client.
const PRODUCES_IN_FLIGHT_MAX: usize = 32;
/// What retention keeps of a leader's log when a run applies it (`retention_per_mille`): a few
/// segments, so followers that were down a while fall below the leader's log start.
const RETENTION_BYTES_MAX: u64 = 192 * 1024;

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub steps: usize,
    pub replicas: usize,
    pub min_insync: usize,
    /// Percent of messages dropped / duplicated.
    pub drop_percent: u32,
    pub duplicate_percent: u32,
    pub delay_ms_max: u64,
    /// Per-step chances, in per mille.
    pub crash_per_mille: u32,
    pub partition_per_mille: u32,
    pub leader_move_per_mille: u32,
    pub produce_per_mille: u32,
    /// Per-step chance that the leader applies retention (only while everything it holds is
    /// committed, so it deletes nothing above the HW). 0 draws nothing from the RNG, so runs
    /// without retention replay as before.
    pub retention_per_mille: u32,
    /// Per-produce chance that the client, an idempotent producer, sends one of its last
    /// batches again (its answer was lost). 0: the client is not idempotent and draws nothing,
    /// so runs without it replay as before. With it, a committed batch of the producer must
    /// never appear twice, and a retry's answer must name the original's offsets.
    pub idempotent_retry_per_mille: u32,
    /// Controller mode: replicas with `isr_via_controller`, driven by the shipped Raft
    /// controller over the network (see the module docs). False: the instant controller.
    pub isr_via_controller: bool,
    /// Controller mode: count leases that outlive their incarnation's fence (the known
    /// controller bugs of the ignored regression seeds 4 and 78) instead of failing on them,
    /// so a run goes on to the checks of what such a lease can do (acks after the fence, lost
    /// acks=all writes).
    pub tolerate_lease_outliving_fence: bool,
    /// Print every step's events.
    pub trace: bool,
}

impl SimConfig {
    pub fn new(seed: u64, steps: usize) -> SimConfig {
        SimConfig {
            seed,
            steps,
            replicas: 3,
            min_insync: 2,
            drop_percent: 3,
            duplicate_percent: 2,
            delay_ms_max: 4,
            crash_per_mille: 6,
            partition_per_mille: 6,
            leader_move_per_mille: 4,
            produce_per_mille: 400,
            retention_per_mille: 0,
            idempotent_retry_per_mille: 0,
            isr_via_controller: false,
            tolerate_lease_outliving_fence: false,
            trace: false,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub acknowledged: usize,
    pub acknowledged_all: usize,
    /// Controller mode: acknowledged with `quorum` or `N` ≥ 2 (kept through one failure).
    pub acknowledged_quorum: usize,
    pub refused: usize,
    pub timed_out: usize,
    pub crashes: usize,
    pub leader_changes: usize,
    pub truncations: usize,
    /// Segments the leaders' retention deleted.
    pub retention_deletes: usize,
    /// Follower logs emptied to restart at the leader's log start (`ResetLog`).
    pub resets: usize,
    /// Controller mode: leaders replaced because the controller fenced them.
    pub failovers: usize,
    /// Controller mode: ISR proposals committed / refused.
    pub isr_commits: usize,
    pub isr_rejections: usize,
    /// Controller mode: produces refused or failed because the leader's lease had ended.
    pub lease_refusals: usize,
    /// Controller mode: broker fences committed, crashes of the controller leader's broker,
    /// heartbeat outages, raft terms that had a leader.
    pub fences: usize,
    pub controller_leader_crashes: usize,
    pub heartbeat_outages: usize,
    pub controller_terms: usize,
    /// Controller mode with `tolerate_lease_outliving_fence`: leases that outlived a fence.
    pub leases_outliving_fence: usize,
    pub final_end_offset: u64,
    /// Idempotent runs: retries sent, retries answered as duplicates, sequence refusals.
    pub retries: usize,
    pub duplicates: usize,
    pub sequence_refusals: usize,
}

#[derive(Debug)]
pub struct SimFailure {
    pub seed: u64,
    pub step: usize,
    pub message: String,
    /// The run's `SimConfig::retention_per_mille` (part of the replay command).
    pub retention_per_mille: u32,
    /// The run's `SimConfig::isr_via_controller` (part of the replay command).
    pub isr_via_controller: bool,
    /// The run's `SimConfig::idempotent_retry_per_mille` (part of the replay command).
    pub idempotent_retry_per_mille: u32,
}

impl std::fmt::Display for SimFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} failed at step {}: {} (replay: cargo run -p wharf-tests --bin sim -- --seed {} --steps {}{}{}",
            self.seed,
            self.step,
            self.message,
            self.seed,
            self.step + 1,
            match self.retention_per_mille {
                0 => String::new(),
                r => format!(" --retention-per-mille {r}"),
            },
            if self.isr_via_controller {
                " --controller"
            } else {
                ""
            }
        )?;
        if self.idempotent_retry_per_mille > 0 {
            write!(
                f,
                " --idempotent-retry-per-mille {}",
                self.idempotent_retry_per_mille
            )?;
        }
        f.write_str(")")
    }
}

#[derive(Clone, Debug)]
enum Message {
    Fetch(FetchRequest),
    Reply {
        fetch_id: u64,
        leader_epoch: Epoch,
        reply: FetchReply,
        batches: Vec<AlignedVec<16>>,
    },
    /// Controller mode, voter → voter: a raft message (protobuf bytes).
    Raft(Vec<u8>),
    /// Controller mode, broker → voter. `node_incarnation` names the broker process (answers
    /// to an earlier one are not delivered).
    Heartbeat {
        node_incarnation: u64,
        sent_ms: u64,
        request: BrokerHeartbeat,
    },
    /// Controller mode, voter → broker: the answer to a heartbeat of `incarnation`.
    HeartbeatAnswer {
        node_incarnation: u64,
        incarnation: u64,
        sent_ms: u64,
        answer: Box<Result<HeartbeatReply, NotController>>,
    },
    /// Controller mode, broker → voter: an ISR proposal (AlterPartition).
    ProposeIsr {
        node_incarnation: u64,
        token: u64,
        request: AlterPartitionRequest,
    },
    /// Controller mode, voter → broker: the outcome of proposal `token` (a committed change
    /// itself arrives with the metadata).
    ProposalAnswer {
        node_incarnation: u64,
        token: u64,
        result: Result<(), IsrRejection>,
    },
}

struct InFlight {
    deliver_at_ms: u64,
    from: BrokerId,
    to: BrokerId,
    message: Message,
}

struct Live {
    log: PartitionLog<MemDisk>,
    replica: Replica,
    /// Batches of produces told to `Append`, by waiter.
    produce_bytes: BTreeMap<u64, AlignedVec<16>>,
    /// The batches of the fetch reply being stepped, checked on arrival.
    fetched: Option<Fetched<AlignedVec<16>>>,
    /// Idempotent producers' last batches (rebuilt from the log at start, as the broker does).
    producers: ProducerStates,
    /// Follower fetches parked at this leader: (replica, fetch id, offset, deadline).
    parked: Vec<(BrokerId, u64, Offset, u64)>,
    /// This follower's outstanding fetch and when it was sent.
    outstanding: Option<(u64, u64)>,
    last_high_watermark: Offset,
    /// The epoch it led at the last check, if it led.
    led_epoch: Option<Epoch>,
}

struct Node {
    id: BrokerId,
    disk: MemDisk,
    /// The epoch-history file (written durably by the driver whenever it changes).
    epochs_file: Vec<(Epoch, Offset)>,
    live: Option<Live>,
    /// Counts starts; messages to an earlier incarnation are not delivered (a new process has
    /// new connections).
    incarnation: u64,
}

struct Controller {
    leader: Option<BrokerId>,
    epoch: Epoch,
    isr: Vec<BrokerId>,
}

struct PendingProduce {
    acks: AckLevel,
    leader: BrokerId,
}

/// Controller mode: a batch acknowledged with `quorum` or `N` ≥ 2 (stamped bytes), and the
/// brokers that failed since: down when it was acknowledged (a crash the leader had not
/// noticed), already removed from the controller's ISR without the leader knowing yet (the
/// metadata on its way), crashed later, or removed from the controller's ISR later. The successor rule
/// promises it survives one such failure; with two it is no longer tracked.
struct QuorumKept {
    bytes: Vec<u8>,
    failed: BTreeSet<BrokerId>,
}

/// The producer id of the simulated client when it is idempotent.
const SIM_PRODUCER_ID: u64 = 77;

/// The simulated client as an idempotent producer (`SimConfig::idempotent_retry_per_mille`).
#[derive(Default)]
struct SimProducer {
    epoch: u16,
    next_sequence: u32,
    /// Its last batches as it would send them again: (epoch, first sequence, bytes).
    recent: std::collections::VecDeque<(u16, u32, AlignedVec<16>)>,
    /// Its committed batches: (epoch, first sequence) → offset. One batch, one offset.
    committed: BTreeMap<(u16, u32), Offset>,
}

impl SimProducer {
    /// Starts a new epoch (as a client does after a gap: sequences restart at 0).
    fn bump_epoch(&mut self) {
        self.epoch += 1;
        self.next_sequence = 0;
        self.recent.clear();
    }
}

pub struct Sim {
    config: SimConfig,
    rng: StdRng,
    now_ms: u64,
    step: usize,
    nodes: Vec<Node>,
    network: Vec<InFlight>,
    cut: BTreeSet<(BrokerId, BrokerId)>,
    /// In controller mode, the newest committed partition state (leader, epoch, ISR) for the
    /// checks.
    controller: Controller,
    /// Controller mode only: the controller voters and the brokers' clients.
    quorum: Option<Quorum>,
    /// Every leader each epoch had (one leader per epoch).
    leaders_by_epoch: BTreeMap<Epoch, BrokerId>,
    /// An invariant broken where no `Check` can be returned; reported by the next check.
    violation: Option<String>,
    next_waiter: u64,
    produces: BTreeMap<u64, PendingProduce>,
    /// Batches acknowledged with acks=all, by base offset (stamped bytes).
    must_keep: BTreeMap<Offset, Vec<u8>>,
    /// Controller mode: batches acknowledged with `quorum`/`N` ≥ 2 and not yet committed, by
    /// base offset, while at most one broker failed since.
    quorum_kept: BTreeMap<Offset, QuorumKept>,
    /// Controller mode: the leader epoch `quorum_kept` was last checked against (a new leader
    /// is checked at once: it is the election that could lose them).
    quorum_checked_epoch: Option<Epoch>,
    /// Batches below a high watermark some leader exposed, by base offset.
    committed: BTreeMap<Offset, Vec<u8>>,
    committed_end: Offset,
    /// The consumer's position: it has read every committed batch below this.
    consumer_at: Offset,
    report: SimReport,
    log_config: LogConfig,
    producer: SimProducer,
}

type Check = Result<(), String>;

thread_local! {
    /// The step in progress, for failures that surface as panics (asserts in the code under test).
    static CURRENT_STEP: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn log_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 64 * 1024,
        index_interval_bytes: 1024,
        write_chunk_bytes: 8 * 1024,
        scan_chunk_bytes: 16 * 1024,
        staged_bytes_max: 16 * 1024 * 1024,
        // Small, so reads come from both memory (recent batches) and disk.
        recent_bytes_max: 24 * 1024,
        // Applied only when a run asks for it (`SimConfig::retention_per_mille`).
        retention: wharf_storage::policy::RetentionLimits {
            retention_bytes_max: Some(RETENTION_BYTES_MAX),
            retention_ms_max: None,
        },
        ..LogConfig::default()
    }
}

/// Every batch in `[from, to)` of `log` (whole batches starting below `to`).
fn read_batches(
    log: &PartitionLog<MemDisk>,
    from: Offset,
    to: Offset,
) -> Result<Vec<(Offset, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut next = from.max(log.log_start_offset());
    for _ in 0..100_000 {
        if next >= to || next >= log.end_offset() {
            return Ok(out);
        }
        let read =
            block_on(log.read(next, 64 * 1024)).map_err(|e| format!("read at {next}: {e}"))?;
        let mut advanced = false;
        for checked in batch::batches(read.bytes()) {
            let checked = checked.map_err(|e| format!("batch at {next}: {e}"))?;
            if checked.header.base_offset >= to {
                return Ok(out);
            }
            out.push((checked.header.base_offset, checked.bytes.to_vec()));
            next = checked.header.next_offset();
            advanced = true;
        }
        if !advanced {
            return Err(format!("read at {next} returned no batch"));
        }
    }
    Err("read loop limit".into())
}

impl Sim {
    pub fn new(config: SimConfig) -> Sim {
        assert!(config.replicas >= 1 && config.min_insync <= config.replicas);
        let rng = StdRng::seed_from_u64(config.seed);
        let nodes = (1..=config.replicas as BrokerId)
            .map(|id| Node {
                id,
                disk: MemDisk::new(),
                epochs_file: Vec::new(),
                live: None,
                incarnation: 0,
            })
            .collect();
        let mut sim = Sim {
            rng,
            now_ms: 0,
            step: 0,
            nodes,
            network: Vec::new(),
            cut: BTreeSet::new(),
            controller: Controller {
                leader: None,
                epoch: Epoch(0),
                isr: (1..=config.replicas as BrokerId).collect(),
            },
            quorum: None,
            leaders_by_epoch: BTreeMap::new(),
            violation: None,
            next_waiter: 1,
            produces: BTreeMap::new(),
            must_keep: BTreeMap::new(),
            quorum_kept: BTreeMap::new(),
            quorum_checked_epoch: None,
            committed: BTreeMap::new(),
            committed_end: Offset::ZERO,
            consumer_at: Offset::ZERO,
            report: SimReport::default(),
            producer: SimProducer::default(),
            log_config: log_config(),
            config,
        };
        for id in 1..=sim.config.replicas as BrokerId {
            sim.start(id).expect("a fresh node starts");
        }
        if sim.config.isr_via_controller {
            // The brokers register; the topic is created once they have; they learn its
            // leader from their heartbeats.
            sim.quorum = Some(Quorum::new(sim.config.replicas));
        } else {
            sim.elect(Some(1));
        }
        sim
    }

    /// Records that `id` leads `epoch`: no epoch ever has two leaders.
    fn note_leader(&mut self, id: BrokerId, epoch: Epoch) {
        match self.leaders_by_epoch.insert(epoch, id) {
            Some(other) if other != id => {
                self.violation
                    .get_or_insert(format!("epoch {epoch} has two leaders: {other} and {id}"));
            }
            _ => {}
        }
    }

    fn trace(&self, what: impl FnOnce() -> String) {
        if self.config.trace {
            println!("[{:>6} {:>7}ms] {}", self.step, self.now_ms, what());
        }
    }

    fn fail(&self, message: String) -> SimFailure {
        SimFailure {
            seed: self.config.seed,
            step: self.step,
            message,
            retention_per_mille: self.config.retention_per_mille,
            isr_via_controller: self.config.isr_via_controller,
            idempotent_retry_per_mille: self.config.idempotent_retry_per_mille,
        }
    }

    fn node(&mut self, id: BrokerId) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    fn alive(&self, id: BrokerId) -> bool {
        self.nodes[(id - 1) as usize].live.is_some()
    }

    fn down_count(&self) -> usize {
        self.nodes.iter().filter(|n| n.live.is_none()).count()
    }

    /// Node `id`'s replica configuration. The replica set in the controller's order once the
    /// controller created the topic (as `core` opens partitions from the controller's
    /// metadata: the successor rule depends on that order), else in broker id order.
    fn replica_config(&self, id: BrokerId) -> ReplicaConfig {
        ReplicaConfig {
            broker_id: id,
            replicas: self
                .quorum
                .as_ref()
                .and_then(|q| q.replica_order())
                .unwrap_or_else(|| (1..=self.config.replicas as BrokerId).collect()),
            min_insync_replicas: self.config.min_insync,
            replica_lag_max_ms: 100,
            fetch_backoff_ms: 10,
            isr_via_controller: self.config.isr_via_controller,
        }
    }

    /// Opens (recovering) node `id`'s log and creates its replica.
    fn start(&mut self, id: BrokerId) -> Check {
        let config = self.replica_config(id);
        let log_config = self.log_config.clone();
        let now = self.now_ms;
        let node = self.node(id);
        node.incarnation += 1;
        let (log, report) = block_on(PartitionLog::open(
            Rc::new(node.disk.clone()),
            log_config,
            now,
        ))
        .map_err(|e| format!("node {id}: recovery failed: {e}"))?;
        if !report.corrupt.is_empty() {
            return Err(format!("node {id}: recovery found corruption: {report:?}"));
        }
        let producers = block_on(driver::scan_producers(&log))
            .map_err(|e| format!("node {id}: cannot rebuild the producer state: {e}"))?;
        let epochs = EpochHistory::new(node.epochs_file.clone(), log.end_offset())
            .map_err(|e| format!("node {id}: {e}"))?;
        let state = LogState {
            log_start: log.log_start_offset(),
            end: log.end_offset(),
            durable: log.durable_offset(),
            high_watermark: Offset::ZERO,
        };
        let replica = Replica::new(config, state, epochs, now)
            .map_err(|e| format!("node {id}: cannot create the replica: {e}"))?;
        node.live = Some(Live {
            log,
            replica,
            produce_bytes: BTreeMap::new(),
            fetched: None,
            producers,
            parked: Vec::new(),
            outstanding: None,
            last_high_watermark: Offset::ZERO,
            led_epoch: None,
        });
        Ok(())
    }

    /// The controller picks a leader from the live ISR (the most up-to-date log, or `prefer`),
    /// bumps the epoch and tells every live node.
    fn elect(&mut self, prefer: Option<BrokerId>) -> bool {
        let candidates: Vec<BrokerId> = self
            .controller
            .isr
            .iter()
            .copied()
            .filter(|&r| self.alive(r))
            .collect();
        let choice = match prefer.filter(|p| candidates.contains(p)) {
            Some(p) => Some(p),
            None => candidates.iter().copied().max_by_key(|&r| {
                let live = self.nodes[(r - 1) as usize].live.as_ref().expect("alive");
                let end = live.log.end_offset();
                (live.replica.epochs().last_epoch_below(end), end)
            }),
        };
        let Some(leader) = choice else {
            self.controller.leader = None;
            self.trace(|| "partition offline: no live ISR member".into());
            return false;
        };
        self.controller.epoch = Epoch(self.controller.epoch.0 + 1);
        self.controller.leader = Some(leader);
        let mut isr = candidates;
        isr.sort_unstable();
        self.controller.isr = isr.clone();
        self.report.leader_changes += 1;
        let epoch = self.controller.epoch;
        self.trace(|| format!("controller: broker {leader} leads epoch {epoch}, ISR {isr:?}"));
        for id in 1..=self.config.replicas as BrokerId {
            if !self.alive(id) {
                continue;
            }
            let input = if id == leader {
                self.note_leader(id, epoch);
                Input::BecomeLeader {
                    epoch,
                    isr: isr.clone(),
                    partition_epoch: 0,
                }
            } else {
                Input::BecomeFollower { epoch, leader }
            };
            self.input(id, input);
        }
        true
    }

    /// Feeds one input to node `id` through the shipped driver core
    /// (`wharf_replication::driver::step`, the code the broker runs), which carries out its
    /// outputs through [`SimHost`]; then acts on what it hands back.
    fn input(&mut self, id: BrokerId, input: Input) {
        if !self.alive(id) {
            return;
        }
        let answers = driver::step(&mut SimHost { sim: self, id }, input)
            .unwrap_or_else(|e| panic!("node {id}: driver step failed: {e}"));
        self.answered(id, answers);
    }

    /// Acts on what the driver handed back: fetches to serve or refuse, refusals of produces.
    fn answered(&mut self, id: BrokerId, answers: Vec<Answer>) {
        let now = self.now_ms;
        for answer in answers {
            match answer {
                Answer::ServeFetch {
                    replica,
                    fetch_id,
                    fetch_offset,
                    may_wait,
                } => {
                    let Some(live) = self.node(id).live.as_mut() else {
                        return;
                    };
                    let wait_ms = if may_wait { FETCH_WAIT_MS } else { 0 };
                    live.parked
                        .push((replica, fetch_id, fetch_offset, now + wait_ms));
                    self.serve_parked(id, !may_wait);
                }
                Answer::RejectFetch {
                    replica,
                    fetch_id,
                    error,
                } => self.send_reply(id, replica, fetch_id, FetchReply::Error(error), Vec::new()),
                Answer::Complete { result } => {
                    panic!("node {id}: a completion outside a produce: {result:?}")
                }
                Answer::Append { .. } => panic!("node {id}: an append outside a produce"),
            }
        }
    }

    fn on_ack(
        &mut self,
        leader: BrokerId,
        waiter: WaiterId,
        produce: PendingProduce,
        result: Result<wharf_replication::Ack, ProduceError>,
        bytes: Option<AlignedVec<16>>,
    ) {
        match result {
            Ok(ack) => {
                self.report.acknowledged += 1;
                let Some(bytes) = bytes else {
                    panic!("acknowledged produce {waiter:?} without its bytes");
                };
                if let Some(quorum) = &self.quorum {
                    // A leader acknowledges what waits for followers only within its lease and
                    // before the controller committed the fence of its incarnation.
                    let held = self.nodes[(leader - 1) as usize]
                        .live
                        .as_ref()
                        .map_or(0, |l| l.replica.lease_until_ms());
                    let fenced = quorum.fenced_since(leader, self.now_ms);
                    if !matches!(produce.acks, AckLevel::None | AckLevel::Leader)
                        && (self.now_ms >= held || fenced.is_some())
                    {
                        self.violation.get_or_insert(format!(
                            "leader {leader} (incarnation {}) acknowledged {waiter:?} (acks={:?}) \
                             at {} ms with its lease until {held} ms, fenced since {fenced:?}",
                            quorum.incarnation(leader),
                            produce.acks,
                            self.now_ms
                        ));
                    }
                }
                self.trace(|| {
                    format!(
                        "ack {:?} acks={:?} [{}, {}) epoch {} held by {}",
                        waiter,
                        produce.acks,
                        ack.base_offset,
                        ack.next_offset,
                        ack.leader_epoch,
                        ack.durable_replicas
                    )
                });
                // The replica count is true (when the leader is still current: a deposed
                // leader may count a follower that has since truncated).
                if self.controller.leader == Some(leader)
                    && self.controller.epoch == ack.leader_epoch
                {
                    let holders = self
                        .nodes
                        .iter()
                        .filter(|n| {
                            n.live.as_ref().is_some_and(|l| {
                                l.log.durable_offset() >= ack.next_offset
                                    && read_batches(&l.log, ack.base_offset, ack.next_offset)
                                        .ok()
                                        .and_then(|b| b.first().map(|(_, x)| x.clone()))
                                        .as_deref()
                                        == Some(&bytes[..])
                            })
                        })
                        .count();
                    // A crashed replica keeps what it synced, but cannot be read until it restarts.
                    let down = self.down_count();
                    if produce.acks != AckLevel::None {
                        assert!(
                            holders + down >= usize::from(ack.durable_replicas),
                            "ack claims {} durable replicas, {holders} hold the batch ({down} down)",
                            ack.durable_replicas
                        );
                    }
                }
                if produce.acks == AckLevel::All {
                    self.report.acknowledged_all += 1;
                    self.must_keep.insert(ack.base_offset, bytes.to_vec());
                }
                let needs_successor = match produce.acks {
                    AckLevel::Quorum => self.config.replicas >= 2,
                    AckLevel::Replicas(n) => n >= 2,
                    _ => false,
                };
                if self.quorum.is_some() && needs_successor {
                    self.report.acknowledged_quorum += 1;
                    let mut failed: BTreeSet<BrokerId> = self
                        .nodes
                        .iter()
                        .filter(|n| n.live.is_none())
                        .map(|n| n.id)
                        .collect();
                    // A broker the controller already removed from the ISR (fenced: crashed
                    // and restarted, or cut off from the controller) while the leader has not
                    // heard of it yet failed before the ack as far as the leader could know:
                    // it may have counted that broker as its successor.
                    let controller_isr = self.quorum.as_ref().and_then(|q| q.committed_isr());
                    let leader_isr = self.nodes[(produce.leader - 1) as usize]
                        .live
                        .as_ref()
                        .map(|live| live.replica.maximal_isr());
                    if let (Some(controller_isr), Some(leader_isr)) = (controller_isr, leader_isr) {
                        failed.extend(
                            leader_isr
                                .into_iter()
                                .filter(|member| !controller_isr.contains(member)),
                        );
                    }
                    let bytes = bytes.to_vec();
                    self.quorum_kept
                        .insert(ack.base_offset, QuorumKept { bytes, failed });
                }
            }
            Err(ProduceError::NotEnoughReplicas { .. } | ProduceError::NotLeader { .. }) => {
                self.report.refused += 1;
            }
            Err(ProduceError::LeaderLeaseExpired { .. }) => self.report.lease_refusals += 1,
            Err(_) => self.report.timed_out += 1,
        }
    }

    fn send(&mut self, from: BrokerId, to: BrokerId, message: Message) {
        self.send_after(from, to, message, 0);
    }

    fn send_after(&mut self, from: BrokerId, to: BrokerId, message: Message, extra_ms: u64) {
        if self.cut.contains(&(from.min(to), from.max(to)))
            || self.rng.random_range(0..100) < self.config.drop_percent
        {
            return;
        }
        let copies = if self.rng.random_range(0..100) < self.config.duplicate_percent {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.rng.random_range(0..=self.config.delay_ms_max);
            self.network.push(InFlight {
                deliver_at_ms: self.now_ms + extra_ms + delay,
                from,
                to,
                message: message.clone(),
            });
        }
    }

    /// Sends a fetch answer from `leader`, stamped with its current epoch.
    fn send_reply(
        &mut self,
        leader: BrokerId,
        follower: BrokerId,
        fetch_id: u64,
        reply: FetchReply,
        batches: Vec<AlignedVec<16>>,
    ) {
        let Some(epoch) = self.nodes[(leader - 1) as usize]
            .live
            .as_ref()
            .map(|l| l.replica.leader_epoch())
        else {
            return;
        };
        let message = Message::Reply {
            fetch_id,
            leader_epoch: epoch,
            reply,
            batches,
        };
        self.send(leader, follower, message);
    }

    /// Answers parked fetches at leader `id` that have data (or whose wait ran out).
    fn serve_parked(&mut self, id: BrokerId, timeouts: bool) {
        let now = self.now_ms;
        let Some(live) = self.node(id).live.as_mut() else {
            return;
        };
        let end = live.log.end_offset();
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut live.parked)
            .into_iter()
            .partition(|&(_, _, offset, deadline)| offset < end || (timeouts && deadline <= now));
        live.parked = waiting;
        for (replica, fetch_id, offset, _) in ready {
            let Some(live) = self.node(id).live.as_mut() else {
                return;
            };
            let log_start = live.log.log_start_offset();
            if offset < log_start {
                // Retention moved the log start while the fetch was parked (the driver's read
                // answers the same).
                let reply = FetchReply::Error(FetchError::OffsetOutOfRange {
                    requested: offset,
                    log_start,
                });
                self.send_reply(id, replica, fetch_id, reply, Vec::new());
                continue;
            }
            let mut batches = Vec::new();
            let mut infos = Vec::new();
            if offset < end {
                let read = block_on(live.log.read(offset, FETCH_BYTES_MAX))
                    .unwrap_or_else(|e| panic!("leader {id}: read at {offset}: {e}"));
                for checked in batch::batches(read.bytes()) {
                    let checked = checked.expect("the leader's own log is valid");
                    let mut copy = AlignedVec::<16>::new();
                    copy.extend_from_slice(checked.bytes);
                    infos.push(BatchInfo {
                        base_offset: checked.header.base_offset,
                        next_offset: checked.header.next_offset(),
                        leader_epoch: checked.header.leader_epoch,
                    });
                    batches.push(copy);
                }
            }
            let reply = FetchReply::Data {
                high_watermark: live.replica.high_watermark(),
                log_start: live.log.log_start_offset(),
                batches: infos,
            };
            self.send_reply(id, replica, fetch_id, reply, batches);
        }
    }

    fn deliver(&mut self) {
        let now = self.now_ms;
        let mut due = Vec::new();
        let mut index = 0;
        while index < self.network.len() {
            if self.network[index].deliver_at_ms <= now {
                due.push(self.network.swap_remove(index));
            } else {
                index += 1;
            }
        }
        // swap_remove and random delays already reorder; shuffle what is due as well.
        for i in (1..due.len()).rev() {
            let j = self.rng.random_range(0..=i);
            due.swap(i, j);
        }
        for message in due {
            if self
                .cut
                .contains(&(message.from.min(message.to), message.from.max(message.to)))
            {
                continue;
            }
            let to = message.to;
            let from = message.from;
            match message.message {
                Message::Fetch(request) => self.input(to, Input::FetchRequest(request)),
                Message::Raft(_) | Message::Heartbeat { .. } | Message::ProposeIsr { .. } => {
                    if let Err(violation) = self.at_voter(from, to, message.message) {
                        self.violation.get_or_insert(violation);
                    }
                }
                Message::HeartbeatAnswer {
                    node_incarnation,
                    incarnation,
                    sent_ms,
                    answer,
                } => {
                    if self.node(to).incarnation != node_incarnation || !self.alive(to) {
                        continue;
                    }
                    let answered = self.heartbeat_answered(from, to, incarnation, sent_ms, *answer);
                    if let Err(violation) = answered {
                        self.violation.get_or_insert(violation);
                    }
                }
                Message::ProposalAnswer {
                    node_incarnation,
                    token,
                    result,
                } => {
                    if self.node(to).incarnation != node_incarnation || !self.alive(to) {
                        continue;
                    }
                    self.proposal_answered(to, token, result);
                }
                Message::Reply {
                    fetch_id,
                    leader_epoch,
                    reply,
                    batches,
                } => {
                    let Some(live) = self.node(to).live.as_mut() else {
                        continue;
                    };
                    if live.outstanding.map(|(id, _)| id) != Some(fetch_id) {
                        continue;
                    }
                    live.outstanding = None;
                    // The follower checks what arrived as the broker's does
                    // (`Fetched::check`): the batches it appends are the ones it checked.
                    let reply = match reply {
                        FetchReply::Data {
                            high_watermark,
                            log_start,
                            ..
                        } => {
                            let mut frame = AlignedVec::<16>::new();
                            for batch in &batches {
                                frame.extend_from_slice(batch);
                            }
                            let bytes = frame.len();
                            let (fetched, batches) = Fetched::check(frame, 0..bytes);
                            live.fetched = Some(fetched);
                            FetchReply::Data {
                                high_watermark,
                                log_start,
                                batches,
                            }
                        }
                        error => error,
                    };
                    if self.config.trace {
                        let summary = match &reply {
                            FetchReply::Data {
                                high_watermark,
                                batches,
                                ..
                            } => format!(
                                "HW {high_watermark}, batches {:?}",
                                batches
                                    .iter()
                                    .map(|b| (b.base_offset.0, b.next_offset.0, b.leader_epoch.0))
                                    .collect::<Vec<_>>()
                            ),
                            FetchReply::Error(e) => e.to_string(),
                        };
                        self.trace(|| format!("broker {to} gets fetch reply {fetch_id} (epoch {leader_epoch}): {summary}"));
                    }
                    self.input(
                        to,
                        Input::FetchReply {
                            fetch_id,
                            leader_epoch,
                            reply,
                        },
                    );
                }
            }
        }
    }

    fn produce(&mut self) {
        if self.produces.len() >= PRODUCES_IN_FLIGHT_MAX {
            return;
        }
        // Mostly to the leader, sometimes to another broker (which must refuse).
        let target = match self.controller.leader {
            Some(leader) if self.rng.random_range(0..10) > 0 => leader,
            _ => self.rng.random_range(1..=self.config.replicas as BrokerId),
        };
        if !self.alive(target) {
            return;
        }
        let acks = match self.rng.random_range(0..6) {
            0 => AckLevel::None,
            1 => AckLevel::Leader,
            2 => AckLevel::Quorum,
            3 => AckLevel::Replicas(self.rng.random_range(1..=self.config.replicas as u8)),
            _ => AckLevel::All,
        };
        let waiter = WaiterId(self.next_waiter);
        self.next_waiter += 1;
        let records = self.rng.random_range(1..5);
        let value_bytes = self.rng.random_range(0..600);
        // (epoch, first sequence, whether it is a retry) of an idempotent producer's batch.
        let mut idempotent = None;
        let mut bytes = if self.config.idempotent_retry_per_mille == 0 {
            make_batch(records, value_bytes, waiter.0, self.now_ms as i64)
        } else if !self.producer.recent.is_empty()
            && self.rng.random_range(0..1000) < self.config.idempotent_retry_per_mille
        {
            let index = self.rng.random_range(0..self.producer.recent.len());
            let (epoch, sequence, bytes) = &self.producer.recent[index];
            idempotent = Some((*epoch, *sequence, true));
            self.report.retries += 1;
            bytes.clone()
        } else {
            let (epoch, sequence) = (self.producer.epoch, self.producer.next_sequence);
            let mut builder = batch::BatchBuilder::new(batch::ProducerStamp {
                producer_id: wharf_storage::ProducerId(SIM_PRODUCER_ID),
                producer_epoch: epoch,
                base_sequence: sequence,
            });
            for i in 0..records {
                let value = vec![waiter.0 as u8; value_bytes];
                builder
                    .push(self.now_ms as i64 + i as i64, None, &value, &[])
                    .expect("push");
            }
            let bytes = builder.finish().expect("finish");
            self.producer.next_sequence += records as u32;
            if self.producer.recent.len() == wharf_replication::producers::PRODUCER_BATCHES_KEPT {
                self.producer.recent.pop_front();
            }
            self.producer
                .recent
                .push_back((epoch, sequence, bytes.clone()));
            idempotent = Some((epoch, sequence, false));
            bytes
        };
        self.produces.insert(
            waiter.0,
            PendingProduce {
                acks,
                leader: target,
            },
        );
        let deadline_ms = self.now_ms + 300;
        let bounds = driver::check_produce(&bytes).expect("the simulator's batches are valid");
        let now = self.now_ms;
        let mut host = SimHost {
            sim: self,
            id: target,
        };
        match driver::produce(
            &mut host,
            &mut bytes,
            bounds,
            waiter,
            acks,
            deadline_ms,
            now,
        ) {
            Ok(appended) => {
                if appended.duplicate {
                    // Answered with the original's offsets: the batch there must be it.
                    self.report.duplicates += 1;
                    let Some(live) = self.node(target).live.as_ref() else {
                        return;
                    };
                    let original = read_batches(
                        &live.log,
                        appended.base_offset,
                        appended.last_offset.plus(1),
                    )
                    .ok()
                    .and_then(|batches| batches.into_iter().next())
                    .filter(|(offset, _)| *offset == appended.base_offset);
                    let same = original
                        .as_ref()
                        .and_then(|(_, b)| batch::decode_header(b).ok())
                        .is_some_and(|h| {
                            Some((h.producer_epoch, h.base_sequence, true)) == idempotent
                                && h.producer_id.0 == SIM_PRODUCER_ID
                        });
                    if !same {
                        self.violation.get_or_insert(format!(
                            "a retry {idempotent:?} answered with [{}, {}], which holds {:?}",
                            appended.base_offset,
                            appended.last_offset,
                            original.map(|(_, b)| batch::decode_header(&b))
                        ));
                        return;
                    }
                    if let Some((_, original)) = original {
                        bytes = AlignedVec::new();
                        bytes.extend_from_slice(&original);
                    }
                }
                // Registered for the checks of its acknowledgement (`SimHost::complete`).
                if let Some(live) = self.node(target).live.as_mut() {
                    live.produce_bytes.insert(waiter.0, bytes);
                }
                driver::produce_appended(
                    &mut SimHost {
                        sim: self,
                        id: target,
                    },
                    appended,
                )
                .unwrap_or_else(|e| panic!("node {target}: after a produce: {e}"));
            }
            Err(ProduceFailure::Refused(error)) => {
                if matches!(idempotent, Some((_, _, false))) {
                    // A gap in its sequence now: later batches would be refused.
                    self.producer.bump_epoch();
                }
                if let Some(produce) = self.produces.remove(&waiter.0) {
                    self.on_ack(target, waiter, produce, Err(error), None);
                }
            }
            Err(ProduceFailure::Backpressure { .. })
            | Err(ProduceFailure::Append(AppendError::Backpressure { .. })) => {
                if matches!(idempotent, Some((_, _, false))) {
                    self.producer.bump_epoch();
                }
                self.produces.remove(&waiter.0);
            }
            Err(ProduceFailure::Sequence(error)) if idempotent.is_some() => {
                self.trace(|| format!("broker {target} refused {idempotent:?}: {error}"));
                self.report.sequence_refusals += 1;
                self.produces.remove(&waiter.0);
                if matches!(
                    error,
                    wharf_replication::producers::SequenceError::OutOfOrder { .. }
                ) {
                    self.producer.bump_epoch();
                }
            }
            Err(failure) => panic!("node {target}: produce failed: {failure}"),
        }
    }

    /// The leader applies retention, when everything it holds is committed (the driver's
    /// retention is not capped at the HW; deleting uncommitted data is not what this tests).
    fn apply_retention(&mut self) {
        let Some(leader) = self.controller.leader else {
            return;
        };
        let now = self.now_ms;
        let Some(live) = self.node(leader).live.as_mut() else {
            return;
        };
        let end = live.log.end_offset();
        if !live.replica.is_leader()
            || live.replica.high_watermark() != end
            || live.log.durable_offset() != end
        {
            return;
        }
        let deleted = block_on(live.log.apply_retention(now))
            .unwrap_or_else(|e| panic!("leader {leader}: retention failed: {e}"));
        let log_start = live.log.log_start_offset();
        if deleted > 0 {
            self.report.retention_deletes += deleted;
            self.trace(|| {
                format!("leader {leader} deleted {deleted} segment(s): log starts at {log_start}")
            });
            self.input(leader, Input::LogStartMoved { log_start });
        }
    }

    fn crash(&mut self, id: BrokerId) {
        let seed = self.rng.random();
        let mode = if self.rng.random_bool(0.5) {
            CrashMode::LoseUnsynced
        } else {
            CrashMode::Random {
                seed,
                tear_bytes: SECTOR_BYTES,
            }
        };
        self.trace(|| format!("crash broker {id} ({mode:?})"));
        let node = self.node(id);
        node.live = None;
        node.disk.crash(mode);
        self.report.crashes += 1;
        if self.quorum.is_some() {
            self.crash_voter(id, mode);
            self.broker_failed(id);
        }
        // Waiters on the crashed leader are gone: the client sees its requests fail.
        let lost: Vec<u64> = self
            .produces
            .iter()
            .filter(|(_, p)| p.leader == id)
            .map(|(&w, _)| w)
            .collect();
        for waiter in lost {
            self.produces.remove(&waiter);
            self.report.timed_out += 1;
        }
        // The controller notices on its own (the session times out).
        if self.quorum.is_none() && self.controller.leader == Some(id) {
            self.elect(None);
        }
    }

    /// Controller mode: `id` crashed or left the controller's ISR. A `quorum`/`N` batch
    /// survives one failure; past two the simulator stops tracking it.
    fn broker_failed(&mut self, id: BrokerId) {
        self.quorum_kept.retain(|_, kept| {
            kept.failed.insert(id);
            kept.failed.len() <= 1
        });
    }

    /// Controller mode: every tracked `quorum`/`N` batch is on the leader, or committed (then
    /// the committed-log checks cover it, and it is no longer tracked).
    fn check_quorum_kept(&mut self, leader: BrokerId, epoch: Epoch) -> Check {
        let live = self.nodes[(leader - 1) as usize]
            .live
            .as_ref()
            .expect("checked by the caller");
        let log_start = live.log.log_start_offset();
        for (&offset, kept) in self.quorum_kept.range(log_start..) {
            let read = read_batches(&live.log, offset, offset.plus(1))?;
            if read.first().map(|(o, b)| (*o, b)) != Some((offset, &kept.bytes)) {
                return Err(format!(
                    "quorum batch at {offset} lost with only {:?} failed since its ack: leader \
                     {leader} (epoch {epoch}) has {:?}",
                    kept.failed,
                    read.first().map(|(o, _)| o)
                ));
            }
        }
        let pending = self.quorum_kept.split_off(&self.committed_end);
        for (offset, kept) in std::mem::replace(&mut self.quorum_kept, pending) {
            let committed = self.committed.get(&offset);
            if offset >= log_start && committed != Some(&kept.bytes) {
                return Err(format!(
                    "quorum batch at {offset} lost: another batch was committed there"
                ));
            }
        }
        self.quorum_checked_epoch = Some(epoch);
        Ok(())
    }

    fn restart(&mut self, id: BrokerId) -> Check {
        self.trace(|| format!("restart broker {id}"));
        self.start(id)?;
        if self.quorum.is_some() {
            // Its voter recovers; it learns its role from its first heartbeat's answer.
            return self.restart_voter(id);
        }
        let epoch = self.controller.epoch;
        match self.controller.leader {
            Some(leader) if leader != id => self.input(id, Input::BecomeFollower { epoch, leader }),
            Some(_) => unreachable!("a crashed broker is never the controller's leader"),
            None => {
                self.elect(None);
            }
        }
        Ok(())
    }

    /// One step of the simulation: time passes, faults happen, messages arrive, disks flush.
    fn step_once(&mut self, faults: bool) -> Check {
        self.now_ms += self.rng.random_range(1..=3);
        if self.quorum.is_some() {
            self.controller_step()?;
        }
        let fault_budget = self.config.replicas - self.config.min_insync;
        if faults {
            let roll = self.rng.random_range(0..1000);
            let mut threshold = self.config.crash_per_mille;
            if roll < threshold {
                let id = self.rng.random_range(1..=self.config.replicas as BrokerId);
                if self.alive(id) {
                    if self.down_count() < fault_budget {
                        self.crash(id);
                    }
                } else {
                    self.restart(id)?;
                }
            } else if roll < {
                threshold += self.config.partition_per_mille;
                threshold
            } {
                // Controller mode: a cut link between two brokers cuts their voters' raft
                // messages and heartbeats as well (they share the host).
                let a = self.rng.random_range(1..=self.config.replicas as BrokerId);
                let b = self.rng.random_range(1..=self.config.replicas as BrokerId);
                if a != b {
                    let link = (a.min(b), a.max(b));
                    if self.cut.remove(&link) {
                        self.trace(|| format!("restore link {link:?}"));
                    } else {
                        self.trace(|| format!("cut link {link:?}"));
                        self.cut.insert(link);
                    }
                }
            } else if roll < {
                threshold += self.config.leader_move_per_mille;
                threshold
            } {
                if self.quorum.is_some() {
                    self.controller_fault(fault_budget)?;
                } else {
                    let prefer = self.rng.random_range(1..=self.config.replicas as BrokerId);
                    self.elect(Some(prefer));
                }
            } else if roll < threshold + self.config.produce_per_mille {
                self.produce();
            }
        }
        if faults
            && self.config.retention_per_mille > 0
            && self.rng.random_range(0..1000) < self.config.retention_per_mille
        {
            self.apply_retention();
        }
        self.deliver();
        let now = self.now_ms;
        for id in 1..=self.config.replicas as BrokerId {
            if !self.alive(id) {
                continue;
            }
            self.input(id, Input::Tick { now_ms: now });
            self.serve_parked(id, true);
            // A follower whose fetch got no answer gives up on it.
            let fetch_timeout_ms = FETCH_WAIT_MS + 4 * self.config.delay_ms_max + 10;
            let timed_out = self.nodes[(id - 1) as usize].live.as_ref().and_then(|l| {
                l.outstanding
                    .filter(|&(_, sent)| now.saturating_sub(sent) > fetch_timeout_ms)
            });
            if let Some((fetch_id, _)) = timed_out {
                if let Some(live) = self.node(id).live.as_mut() {
                    live.outstanding = None;
                }
                self.input(id, Input::FetchFailed { fetch_id });
            }
            // The disk flushes now and then (group commit in the real driver).
            if self.rng.random_bool(0.5) {
                let live = self.node(id).live.as_mut().expect("alive");
                if live.log.staged_bytes() > 0 {
                    let durable = block_on(live.log.flush())
                        .unwrap_or_else(|e| panic!("node {id}: flush failed: {e}"));
                    let answers = driver::flushed(&mut SimHost { sim: self, id }, durable)
                        .map(|()| Vec::new())
                        .unwrap_or_else(|e| panic!("node {id}: after a flush: {e}"));
                    self.answered(id, answers);
                }
            }
        }
        self.check()
    }

    /// The invariants that must hold after every step.
    fn check(&mut self) -> Check {
        if let Some(violation) = self.violation.take() {
            return Err(violation);
        }
        let controller_mode = self.quorum.is_some();
        let now = self.now_ms;
        // One leader per epoch, among live replicas too.
        let mut leading = BTreeMap::new();
        for node in &self.nodes {
            if let Some(live) = node.live.as_ref().filter(|l| l.replica.is_leader()) {
                let epoch = live.replica.leader_epoch();
                if let Some(other) = leading.insert(epoch, node.id) {
                    return Err(format!(
                        "brokers {other} and {} both lead epoch {epoch}",
                        node.id
                    ));
                }
            }
        }
        // HW never goes back on a replica.
        for node in &mut self.nodes {
            if let Some(live) = node.live.as_mut() {
                let hw = live.replica.high_watermark();
                if hw < live.last_high_watermark {
                    return Err(format!(
                        "broker {}: HW went back from {} to {hw}",
                        node.id, live.last_high_watermark
                    ));
                }
                // A leader whose lease ended (time is fixed within a step, leases only grow:
                // it ended for the whole step) did not move its HW during the step.
                let epoch = live.replica.leader_epoch();
                let led = live.replica.is_leader().then_some(epoch);
                if controller_mode
                    && led.is_some()
                    && live.led_epoch == led
                    && hw > live.last_high_watermark
                    && now >= live.replica.lease_until_ms()
                {
                    return Err(format!(
                        "broker {}: leader of epoch {epoch} moved its HW from {} to {hw} at \
                         {now} ms, its lease ended at {} ms",
                        node.id,
                        live.last_high_watermark,
                        live.replica.lease_until_ms()
                    ));
                }
                live.led_epoch = led;
                live.last_high_watermark = hw;
                if hw > live.log.end_offset() {
                    return Err(format!(
                        "broker {}: HW {hw} above its log end {}",
                        node.id,
                        live.log.end_offset()
                    ));
                }
            }
        }
        let Some(leader) = self.controller.leader else {
            return Ok(());
        };
        let epoch = self.controller.epoch;
        let Some(live) = self.nodes[(leader - 1) as usize].live.as_ref() else {
            return Ok(());
        };
        if controller_mode && !(live.replica.is_leader() && live.replica.leader_epoch() == epoch) {
            // It has not heard of its election yet (or restarted since: the controller
            // replaces it when its first heartbeat arrives).
            return Ok(());
        }
        if live.replica.role() != Role::Leader || live.replica.leader_epoch() != epoch {
            return Err(format!(
                "controller leader {leader} is not leading epoch {epoch}"
            ));
        }
        let hw = live.replica.high_watermark();
        // HW never exceeds what an ISR member holds durably: a member of the leader's ISR or,
        // in controller mode, of the controller's (any of them may be elected next; a change
        // the leader has not heard of yet is in its maximal ISR).
        let mut members = live.replica.isr().to_vec();
        if controller_mode {
            members.extend(&self.controller.isr);
        }
        for &member in &members {
            if let Some(m) = self.nodes[(member - 1) as usize].live.as_ref() {
                if m.log.durable_offset() < hw {
                    return Err(format!(
                        "HW {hw} of leader {leader} above ISR member {member}'s durable offset {}",
                        m.log.durable_offset()
                    ));
                }
            }
        }
        // The leader's log below its HW extends the committed log (an offset never maps to
        // two batches once exposed); the consumer reads the new part.
        if hw > self.committed_end {
            let from = self
                .committed
                .keys()
                .next_back()
                .copied()
                .unwrap_or(Offset::ZERO);
            let batches = read_batches(&live.log, from, hw)?;
            for (offset, bytes) in batches {
                match self.committed.get(&offset) {
                    Some(previous) if previous != &bytes => {
                        return Err(format!(
                            "offset {offset} maps to two different committed batches"
                        ));
                    }
                    Some(_) => {}
                    None => {
                        if offset < self.committed_end {
                            return Err(format!("committed offset {offset} starts a new batch"));
                        }
                        let header = batch::decode_header(&bytes)
                            .map_err(|e| format!("committed batch at {offset}: {e}"))?;
                        if header.producer_id.0 == SIM_PRODUCER_ID {
                            let key = (header.producer_epoch, header.base_sequence);
                            if let Some(first) = self.producer.committed.insert(key, offset) {
                                return Err(format!(
                                    "the idempotent producer's batch {key:?} is committed twice, at {first} and {offset}"
                                ));
                            }
                        }
                        self.committed.insert(offset, bytes);
                    }
                }
            }
            self.committed_end = hw;
        }
        // Every committed batch below the consumer's read point is still on the leader.
        if self.step.is_multiple_of(50) {
            self.consumer_at = self.consumer_at.max(hw.min(self.committed_end));
            let live = self.nodes[(leader - 1) as usize]
                .live
                .as_ref()
                .expect("checked");
            let end = live.log.end_offset();
            // Retention deleted what lies below the leader's log start.
            let log_start = live.log.log_start_offset();
            let below = self.consumer_at.min(end).max(log_start);
            for (&offset, bytes) in self.committed.range(log_start..below) {
                let read = read_batches(&live.log, offset, offset.plus(1))?;
                if read.first().map(|(o, b)| (*o, b)) != Some((offset, bytes)) {
                    return Err(format!(
                        "committed batch at {offset} is not on leader {leader}"
                    ));
                }
            }
            // No acknowledged acks=all write is lost on the leader.
            for (&offset, bytes) in self.must_keep.range(log_start..) {
                let read = read_batches(&live.log, offset, offset.plus(1))?;
                if read.first().map(|(o, b)| (*o, b)) != Some((offset, bytes)) {
                    return Err(format!(
                        "acks=all batch at {offset} lost: leader {leader} (epoch {epoch}) has {:?}",
                        read.first().map(|(o, _)| o)
                    ));
                }
            }
        }
        if controller_mode
            && (self.step.is_multiple_of(50) || self.quorum_checked_epoch != Some(epoch))
        {
            self.check_quorum_kept(leader, epoch)?;
        }
        Ok(())
    }

    /// Heals every fault and runs until all replicas hold the same log and the HW reaches its
    /// end; then compares the logs.
    fn settle(&mut self) -> Check {
        self.cut.clear();
        for id in 1..=self.config.replicas as BrokerId {
            if !self.alive(id) {
                self.restart(id)?;
            }
        }
        if self.quorum.is_none() && self.controller.leader.is_none() {
            self.elect(None);
        }
        if self.quorum.is_some() {
            self.heal_controller();
        }
        for _ in 0..SETTLE_STEPS_MAX {
            self.step_once(false)?;
            self.step += 1;
            CURRENT_STEP.with(|c| c.set(self.step));
            if self.converged() {
                return self.compare_logs();
            }
        }
        if self.config.trace {
            for n in &self.nodes {
                if let Some(l) = &n.live {
                    println!(
                        "broker {}: outstanding {:?} {:?}",
                        n.id, l.outstanding, l.replica
                    );
                }
            }
        }
        Err(format!(
            "replicas did not converge within {SETTLE_STEPS_MAX} steps: {}",
            self.describe()
        ))
    }

    fn converged(&self) -> bool {
        let Some(leader) = self.controller.leader else {
            return false;
        };
        let Some(l) = self.nodes[(leader - 1) as usize].live.as_ref() else {
            return false;
        };
        let end = l.log.end_offset();
        self.quorum.as_ref().is_none_or(|q| q.all_voters_running())
            && self.produces.is_empty()
            && l.replica.is_leader()
            && l.replica.leader_epoch() == self.controller.epoch
            && l.replica.high_watermark() == end
            && l.replica.isr().len() == self.config.replicas
            && self.nodes.iter().all(|n| {
                n.live
                    .as_ref()
                    .is_some_and(|x| x.log.end_offset() == end && x.log.durable_offset() == end)
            })
    }

    fn describe(&self) -> String {
        let mut out = format!(
            "controller {:?} epoch {} isr {:?};",
            self.controller.leader, self.controller.epoch, self.controller.isr
        );
        for n in &self.nodes {
            match &n.live {
                Some(l) => {
                    out += &format!(
                        " b{}: {:?} epoch {} end {} durable {} hw {} isr {:?};",
                        n.id,
                        l.replica.role(),
                        l.replica.leader_epoch(),
                        l.log.end_offset(),
                        l.log.durable_offset(),
                        l.replica.high_watermark(),
                        l.replica.isr()
                    )
                }
                None => out += &format!(" b{}: down;", n.id),
            }
        }
        out
    }

    fn compare_logs(&mut self) -> Check {
        // Above every log start (retention, resets): a segment base, so a batch boundary.
        let start = self
            .nodes
            .iter()
            .filter_map(|n| n.live.as_ref().map(|l| l.log.log_start_offset()))
            .max()
            .unwrap_or(Offset::ZERO);
        let mut reference: Option<Vec<(Offset, Vec<u8>)>> = None;
        for n in &self.nodes {
            let l = n.live.as_ref().expect("settled nodes are alive");
            let batches = read_batches(&l.log, start, l.log.end_offset())?;
            match &reference {
                None => reference = Some(batches),
                Some(r) if r != &batches => {
                    return Err(format!(
                        "broker {} holds a different log than broker 1",
                        n.id
                    ));
                }
                Some(_) => {}
            }
        }
        let log = reference.unwrap_or_default();
        let index: BTreeMap<Offset, &Vec<u8>> = log.iter().map(|(o, b)| (*o, b)).collect();
        for (offset, bytes) in self.must_keep.range(start..) {
            if index.get(offset) != Some(&bytes) {
                return Err(format!("acks=all batch at {offset} missing after settling"));
            }
        }
        for (offset, kept) in self.quorum_kept.range(start..) {
            if index.get(offset) != Some(&&kept.bytes) {
                return Err(format!(
                    "quorum batch at {offset} missing after settling ({:?} failed since its ack)",
                    kept.failed
                ));
            }
        }
        for (offset, bytes) in self.committed.range(start..) {
            if index.get(offset) != Some(&bytes) {
                return Err(format!(
                    "committed batch at {offset} missing after settling"
                ));
            }
        }
        self.report.final_end_offset = log.last().map_or(0, |(o, _)| o.0);
        Ok(())
    }
}

/// The simulator as the host of the shipped driver core: its network is the transport, its
/// `MemDisk` logs the disk, and work that takes time in the broker (truncation, reset, the
/// epoch-history file) is done at once.
struct SimHost<'a> {
    sim: &'a mut Sim,
    id: BrokerId,
}

impl SimHost<'_> {
    fn live(&mut self) -> &mut Live {
        let id = self.id;
        self.sim
            .node(id)
            .live
            .as_mut()
            .unwrap_or_else(|| panic!("node {id} is driven while down"))
    }
}

impl PartitionHost for SimHost<'_> {
    type Disk = MemDisk;
    type Frame = AlignedVec<16>;

    fn durability(&self) -> Durability {
        Durability::Synced
    }

    fn wall_clock_ms(&self) -> u64 {
        self.sim.now_ms
    }

    fn with_replica<R>(&mut self, f: impl FnOnce(&mut Replica) -> R) -> R {
        f(&mut self.live().replica)
    }

    fn with_log<R>(&mut self, f: impl FnOnce(&mut PartitionLog<MemDisk>) -> R) -> Option<R> {
        Some(f(&mut self.live().log))
    }

    fn take_fetched(&mut self) -> Option<Fetched<AlignedVec<16>>> {
        self.live().fetched.take()
    }

    fn with_producers<R>(&mut self, f: impl FnOnce(&mut ProducerStates) -> R) -> R {
        f(&mut self.live().producers)
    }

    fn complete(
        &mut self,
        waiter: WaiterId,
        result: Result<wharf_replication::Ack, ProduceError>,
    ) -> bool {
        let Some(bytes) = self.live().produce_bytes.remove(&waiter.0) else {
            return false;
        };
        // Gone from `produces` when the client gave up on it (its leader crashed meanwhile).
        if let Some(produce) = self.sim.produces.remove(&waiter.0) {
            self.sim
                .on_ack(self.id, waiter, produce, result, Some(bytes));
        }
        true
    }

    fn send_fetch(&mut self, leader: BrokerId, request: FetchRequest) {
        let now = self.sim.now_ms;
        self.live().outstanding = Some((request.fetch_id, now));
        self.sim.send(self.id, leader, Message::Fetch(request));
    }

    fn propose_isr(&mut self, isr: Vec<BrokerId>, leader_epoch: Epoch, partition_epoch: u64) {
        let id = self.id;
        assert!(self.sim.quorum.is_some(), "static mode proposes nothing");
        self.sim
            .trace(|| format!("broker {id} proposes the ISR {isr:?}"));
        self.sim.propose_isr(id, isr, leader_epoch, partition_epoch);
    }

    fn start_truncate(&mut self, to: Offset) -> Result<Option<Input>, String> {
        let id = self.id;
        let live = self.live();
        block_on(live.log.truncate_suffix(to))
            .unwrap_or_else(|e| panic!("node {id}: truncate to {to} failed: {e}"));
        let end = live.log.end_offset();
        let durable = live.log.durable_offset();
        self.sim.report.truncations += 1;
        self.sim.trace(|| format!("broker {id} truncated to {to}"));
        Ok(Some(Input::Truncated { end, durable }))
    }

    fn start_reset(&mut self, start: Offset) -> Result<Option<Input>, String> {
        let id = self.id;
        let now = self.sim.now_ms;
        let live = self.live();
        block_on(live.log.reset(start, now))
            .unwrap_or_else(|e| panic!("node {id}: reset to {start} failed: {e}"));
        self.sim.report.resets += 1;
        self.sim
            .trace(|| format!("broker {id} reset its log to start at {start}"));
        Ok(Some(Input::LogReset { start }))
    }

    fn persist_epochs(&mut self) -> Result<(), String> {
        // Durable at once (the broker holds flushes back until its file is written).
        let entries = self.live().replica.epochs().entries().to_vec();
        let id = self.id;
        self.sim.node(id).epochs_file = entries;
        Ok(())
    }

    fn high_watermark_advanced(&mut self, _to: Offset) {
        self.sim.serve_parked(self.id, false);
    }

    fn isr_changed(&mut self, isr: &[BrokerId]) {
        let id = self.id;
        let epoch = self.live().replica.leader_epoch();
        let sim = &mut *self.sim;
        if sim.quorum.is_some() {
            sim.trace(|| format!("broker {id} adopted the ISR {isr:?} (epoch {epoch})"));
            return;
        }
        // The static controller takes ISR changes only from the current leader and epoch.
        if sim.controller.leader == Some(id) && sim.controller.epoch == epoch {
            sim.trace(|| format!("ISR of epoch {epoch} is now {isr:?}"));
            sim.controller.isr = isr.to_vec();
        }
    }

    fn fetched_appended(&mut self, _end: Offset) {}
}

/// Runs one seed: `steps` steps with faults, then a settling phase without.
pub fn run(config: SimConfig) -> Result<SimReport, SimFailure> {
    let steps = config.steps;
    let seed = config.seed;
    let idempotent_retry_per_mille = config.idempotent_retry_per_mille;
    let retention_per_mille = config.retention_per_mille;
    let isr_via_controller = config.isr_via_controller;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let mut sim = Sim::new(config);
        for step in 0..steps {
            sim.step = step;
            CURRENT_STEP.with(|c| c.set(step));
            sim.step_once(true).map_err(|m| sim.fail(m))?;
        }
        sim.step = steps;
        sim.settle().map_err(|m| sim.fail(m))?;
        if let Some(quorum) = &sim.quorum {
            sim.report.controller_terms = quorum.terms();
        }
        Ok(sim.report)
    }));
    match outcome {
        Ok(result) => result,
        Err(panic) => Err(SimFailure {
            seed,
            retention_per_mille,
            isr_via_controller,
            idempotent_retry_per_mille,
            step: CURRENT_STEP.with(|c| c.get()),
            message: format!(
                "panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            ),
        }),
    }
}
