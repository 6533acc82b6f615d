//! A **stand-in** for the Raft controller (DESIGN §6), for the simulator's controller mode
//! only. It is not the product's controller (that crate is being written separately and will
//! replace this in the simulator); it keeps just enough of the controller's contract to drive
//! `Replica` in controller mode through failovers:
//!
//! 1. Brokers heartbeat (`heartbeat`) with their incarnation and the time they sent it; the
//!    answer is the partition's state plus a lease up to `sent_ms + LEASE_MS`.
//! 2. A broker silent for `SESSION_TIMEOUT_MS` is fenced (`tick`): it leaves the ISR (unless it
//!    is the last member, KIP-966) and, if it led, a new leader is elected from the rest of the
//!    ISR with epoch + 1. A lease always ends before its broker can be fenced
//!    (`LEASE_MS < SESSION_TIMEOUT_MS`, measured from the heartbeat's send time), and the
//!    election checks so.
//! 3. ISR proposals (`propose`) are checked like AlterPartition — leader epoch, then partition
//!    epoch, then eligibility — and committed with partition epoch + 1.
//! 4. A broker that comes back with a new incarnation (it restarted) loses leadership: a new
//!    epoch is elected (its unsynced writes of the old epoch are gone).
//!
//! One partition; no Raft, no persistence: the simulator never crashes the controller.

use std::collections::{BTreeMap, BTreeSet};

use wharf_replication::{BrokerId, IsrRejection};
use wharf_storage::Epoch;

/// How often a live broker heartbeats (simulated ms).
pub const HEARTBEAT_INTERVAL_MS: u64 = 10;
/// A lease lasts this long from when its heartbeat was sent.
pub const LEASE_MS: u64 = 50;
/// A broker not heard from for this long is fenced.
pub const SESSION_TIMEOUT_MS: u64 = 80;
const _: () = assert!(LEASE_MS + HEARTBEAT_INTERVAL_MS < SESSION_TIMEOUT_MS);
const _: () = assert!(HEARTBEAT_INTERVAL_MS < LEASE_MS);

/// What the controller tells brokers about the partition (what the metadata log holds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionState {
    pub leader: Option<BrokerId>,
    pub leader_epoch: Epoch,
    pub partition_epoch: u64,
    pub isr: Vec<BrokerId>,
}

#[derive(Debug)]
pub struct StandInController {
    pub state: PartitionState,
    /// Per broker: its incarnation and when its last heartbeat arrived.
    sessions: BTreeMap<BrokerId, (u64, u64)>,
    fenced: BTreeSet<BrokerId>,
    /// Per broker: the end of the longest lease granted to its current incarnation.
    leases_granted: BTreeMap<BrokerId, u64>,
    /// Elections caused by fencing (failovers).
    pub failovers: usize,
}

impl StandInController {
    /// Broker `leader` leads epoch 1 with every replica in sync; every broker counts as just
    /// heard from, in incarnation 1.
    pub fn new(replicas: &[BrokerId], leader: BrokerId, now_ms: u64) -> StandInController {
        assert!(replicas.contains(&leader));
        StandInController {
            state: PartitionState {
                leader: Some(leader),
                leader_epoch: Epoch(1),
                partition_epoch: 1,
                isr: replicas.to_vec(),
            },
            sessions: replicas.iter().map(|&r| (r, (1, now_ms))).collect(),
            fenced: BTreeSet::new(),
            leases_granted: BTreeMap::new(),
            failovers: 0,
        }
    }

    pub fn is_fenced(&self, broker: BrokerId) -> bool {
        self.fenced.contains(&broker)
    }

    /// The end of the longest lease granted to `broker`'s current incarnation (0: none).
    pub fn lease_granted(&self, broker: BrokerId) -> u64 {
        self.leases_granted.get(&broker).copied().unwrap_or(0)
    }

    /// A heartbeat from `broker`'s `incarnation`, sent at `sent_ms`: the state and the lease
    /// to answer with (`None` for a heartbeat from an older incarnation: no answer).
    pub fn heartbeat(
        &mut self,
        broker: BrokerId,
        incarnation: u64,
        sent_ms: u64,
        now_ms: u64,
    ) -> Result<Option<(PartitionState, u64)>, String> {
        let (known, _) = self.sessions.get(&broker).copied().unwrap_or((0, 0));
        if incarnation < known {
            return Ok(None);
        }
        self.sessions.insert(broker, (incarnation, now_ms));
        self.fenced.remove(&broker);
        if incarnation > known {
            // Restarted: the old incarnation holds no lease any more (it is gone), and its
            // leadership ends (what it had not synced of its epoch is lost).
            self.leases_granted.remove(&broker);
            if self.state.leader == Some(broker) {
                self.elect(None, now_ms)?;
            }
        }
        if self.state.leader.is_none() && self.state.isr.contains(&broker) {
            self.elect(None, now_ms)?;
        }
        let lease = sent_ms + LEASE_MS;
        let granted = self.leases_granted.entry(broker).or_insert(0);
        *granted = (*granted).max(lease);
        Ok(Some((self.state.clone(), lease)))
    }

    /// Fences brokers whose session timed out; elects a new leader if the leader was one.
    pub fn tick(&mut self, now_ms: u64) -> Result<Vec<BrokerId>, String> {
        let expired: Vec<BrokerId> = self
            .sessions
            .iter()
            .filter(|(b, &(_, last))| {
                !self.fenced.contains(b) && now_ms >= last + SESSION_TIMEOUT_MS
            })
            .map(|(&b, _)| b)
            .collect();
        for &broker in &expired {
            self.fenced.insert(broker);
            if self.state.isr.contains(&broker) && self.state.isr.len() > 1 {
                self.state.isr.retain(|&r| r != broker);
                self.state.partition_epoch += 1;
            }
            if self.state.leader == Some(broker) {
                self.failovers += 1;
                self.elect(None, now_ms)?;
            }
        }
        Ok(expired)
    }

    /// An ISR proposal from `broker` (AlterPartition): refused, or committed.
    pub fn propose(
        &mut self,
        broker: BrokerId,
        isr: &[BrokerId],
        leader_epoch: Epoch,
        partition_epoch: u64,
    ) -> Result<PartitionState, IsrRejection> {
        if self.state.leader != Some(broker) || leader_epoch != self.state.leader_epoch {
            return Err(IsrRejection::FencedLeaderEpoch);
        }
        if partition_epoch != self.state.partition_epoch {
            return Err(IsrRejection::StalePartitionEpoch);
        }
        if isr
            .iter()
            .any(|r| self.fenced.contains(r) && !self.state.isr.contains(r))
        {
            return Err(IsrRejection::IneligibleReplica);
        }
        assert!(
            isr.contains(&broker),
            "a leader proposed an ISR without itself"
        );
        self.state.isr = isr.to_vec();
        self.state.partition_epoch += 1;
        Ok(self.state.clone())
    }

    /// Moves leadership to another unfenced ISR member (`prefer` if it is one), as a
    /// preferred-leader election does. The old leader learns of it late; it stays safe because
    /// its ISR holds the new leader, which stops copying from it once it leads.
    pub fn move_leader(&mut self, prefer: BrokerId, now_ms: u64) -> Result<bool, String> {
        if self.state.leader.is_none() || self.fenced.contains(&prefer) {
            return Ok(false);
        }
        self.elect(Some(prefer), now_ms)
    }

    /// Elects a leader from the unfenced ISR members (`prefer` first), with a new epoch.
    /// A leader replaced by fencing must hold no lease that is still running.
    fn elect(&mut self, prefer: Option<BrokerId>, now_ms: u64) -> Result<bool, String> {
        if let Some(old) = self.state.leader.filter(|old| self.fenced.contains(old)) {
            let lease = self.leases_granted.get(&old).copied().unwrap_or(0);
            if lease > now_ms {
                return Err(format!(
                    "stand-in controller: electing a successor of fenced leader {old} whose lease \
                     runs until {lease} (now {now_ms})"
                ));
            }
        }
        let candidates: Vec<BrokerId> = self
            .state
            .isr
            .iter()
            .copied()
            .filter(|r| !self.fenced.contains(r))
            .collect();
        let choice = prefer
            .filter(|p| candidates.contains(p))
            .or_else(|| candidates.first().copied());
        if choice.is_some() || self.state.leader.is_some() {
            self.state.partition_epoch += 1;
        }
        match choice {
            Some(leader) => {
                self.state.leader = Some(leader);
                self.state.leader_epoch = Epoch(self.state.leader_epoch.0 + 1);
                Ok(true)
            }
            None => {
                // Offline until an ISR member comes back (no unclean election).
                self.state.leader = None;
                Ok(false)
            }
        }
    }
}
