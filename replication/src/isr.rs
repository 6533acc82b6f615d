//! ISR changes through the controller (DESIGN §6; Kafka KIP-497 AlterPartition, KIP-966 strict
//! min ISR), for a replica whose `ReplicaConfig::isr_via_controller` is set.
//!
//! 1. The leader decides which ISR it wants (`wanted_isr`: members that kept up stay, followers
//!    that caught up join) and, when that differs from the committed ISR and nothing is in
//!    flight, emits `Output::ProposeIsr` based on the committed partition epoch. It does not
//!    adopt the proposal.
//! 2. While the proposal is unanswered the leader computes its high watermark over the
//!    **maximal** ISR (committed ∪ proposed: a pending shrink still waits for the member it
//!    removes, a pending expansion already waits for the member it adds) and counts copies for
//!    `quorum`/`N` over the **minimal** ISR (committed ∩ proposed: only members that stay
//!    electable whichever way the controller decides).
//! 3. The controller answers with `Input::IsrCommitted` (adopted; it supersedes any proposal,
//!    since the controller refuses a proposal based on an older partition epoch) or
//!    `Input::IsrRejected`. Without an answer the same proposal is sent again after
//!    `ISR_PROPOSAL_RETRY_MS`.
//!
//! The functions here are pure: the replica carries out what they decide.

use wharf_storage::Epoch;

use crate::replica::BrokerId;

/// Controller mode: how long a leader waits for the answer to an ISR proposal before sending
/// the same proposal again (the request or its answer may have been lost). Far above a
/// controller's commit latency (a Raft round trip), far below `replica_lag_max_ms` defaults.
pub const ISR_PROPOSAL_RETRY_MS: u64 = 1_000;

/// Why the controller refused an ISR proposal (Kafka's AlterPartition errors).
///
/// Contract for the controller: it checks the leader epoch first (`FencedLeaderEpoch`), then
/// the partition epoch (`StalePartitionEpoch`), and only then anything else; so a retry of a
/// proposal that was already committed is always answered `StalePartitionEpoch`, never with a
/// reason that would make the leader believe it was not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IsrRejection {
    /// The controller knows a newer leader epoch: this leader is deposed. It stops
    /// acknowledging until `BecomeLeader`/`BecomeFollower` arrives.
    FencedLeaderEpoch,
    /// The proposal's partition epoch is not the controller's: the partition changed
    /// (perhaps by this very proposal, whose answer was lost). The proposal may have been
    /// applied, so it stays in the maximal ISR, without retries, until the newer state arrives
    /// as `IsrCommitted` or a role change.
    StalePartitionEpoch,
    /// A member the proposal adds may not join (fenced or shutting down). Not applied.
    IneligibleReplica,
    /// The controller did not try (not active, overloaded). Not applied.
    NotApplied,
}

impl IsrRejection {
    /// Whether the controller certainly did not apply the proposal (so it leaves the maximal
    /// ISR at once).
    pub fn certainly_not_applied(self) -> bool {
        matches!(
            self,
            IsrRejection::IneligibleReplica | IsrRejection::NotApplied
        )
    }
}

/// Where the leader's one ISR proposal stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IsrProposal {
    /// Sorted, the leader included.
    pub isr: Vec<BrokerId>,
    pub leader_epoch: Epoch,
    /// The committed partition epoch the proposal is based on.
    pub partition_epoch: u64,
    /// When it was last sent.
    pub sent_ms: u64,
    /// Answered `StalePartitionEpoch`: not sent again; waits for the controller's state.
    pub awaiting_metadata: bool,
}

/// The ISR over which the high watermark is computed: committed ∪ proposed, sorted.
pub fn maximal_isr(committed: &[BrokerId], proposed: Option<&[BrokerId]>) -> Vec<BrokerId> {
    let mut isr = committed.to_vec();
    isr.extend(proposed.unwrap_or_default());
    isr.sort_unstable();
    isr.dedup();
    isr
}

/// The ISR whose members count towards `quorum`/`N`: committed ∩ proposed, sorted.
pub fn minimal_isr(committed: &[BrokerId], proposed: Option<&[BrokerId]>) -> Vec<BrokerId> {
    let mut isr: Vec<BrokerId> = committed
        .iter()
        .copied()
        .filter(|r| proposed.is_none_or(|p| p.contains(r)))
        .collect();
    isr.sort_unstable();
    isr
}

/// The broker the controller elects if `leader` fails while `isr` is the partition's ISR: the
/// first member other than the leader in replica-set order. The controller keeps every ISR in
/// replica order and elects its first live member (`wharf_controller::decisions::elect`, and
/// `controlled_shutdown` the same way); the leader keeps its ISR lists sorted by broker id, so
/// the order must come from `replicas`. `None` when the leader is the only member.
pub fn successor(replicas: &[BrokerId], isr: &[BrokerId], leader: BrokerId) -> Option<BrokerId> {
    debug_assert!(isr.iter().all(|r| replicas.contains(r)));
    replicas
        .iter()
        .copied()
        .find(|&r| r != leader && isr.contains(&r))
}

/// What the leader knows of one follower when it decides the ISR it wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FollowerView {
    pub broker: BrokerId,
    /// Caught up within `replica_lag_max_ms` (the static ISR's stay rule).
    pub keeps_up: bool,
    /// Its last fetch in this epoch was at the leader's end and its durable offset is at or
    /// above the leader's current high watermark (the static ISR's join rule, judged now, not
    /// at the fetch: the HW may have moved past the follower since) and, in controller mode,
    /// above the end of what was acknowledged to `quorum`/`N` producers (a joiner may become
    /// the leader's successor; see `AckLevel::Quorum`).
    pub may_join: bool,
}

/// The ISR the leader wants: itself, the committed members that keep up, and the followers
/// that may join. Sorted.
pub fn wanted_isr(
    leader: BrokerId,
    committed: &[BrokerId],
    followers: &[FollowerView],
) -> Vec<BrokerId> {
    let mut isr: Vec<BrokerId> = std::iter::once(leader)
        .chain(
            followers
                .iter()
                .filter(|f| f.keeps_up && (committed.contains(&f.broker) || f.may_join))
                .map(|f| f.broker),
        )
        .collect();
    isr.sort_unstable();
    isr.dedup();
    isr
}
