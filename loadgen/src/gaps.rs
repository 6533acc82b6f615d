//! The failover-gap report: per partition, the wall-clock times (ms) at which acknowledgements
//! arrived, and the largest gaps between consecutive ones. A leader's failure shows as a gap on
//! the partitions it led: from the last acknowledgement before the fault to the first after
//! the partition moved (or, without failover, the leader came back).
//!
//! Memory: at most one entry per partition per millisecond per client thread (acknowledgements
//! within one millisecond collapse), so 8 bytes × 1,000 × partitions × seconds at most.

use serde::Serialize;

/// Gaps listed per partition in the report.
const GAPS_LISTED_MAX: usize = 5;

#[derive(Default)]
pub struct AckTimes {
    /// Per partition, ms since the Unix epoch, in arrival order per thread.
    partitions: Vec<Vec<u64>>,
}

impl AckTimes {
    pub fn acknowledged(&mut self, partition: u32, unix_ms: u64) {
        let partition = partition as usize;
        if self.partitions.len() <= partition {
            self.partitions.resize(partition + 1, Vec::new());
        }
        let times = &mut self.partitions[partition];
        if times.last() != Some(&unix_ms) {
            times.push(unix_ms);
        }
    }

    pub fn merge(&mut self, other: AckTimes) {
        if self.partitions.len() < other.partitions.len() {
            self.partitions.resize(other.partitions.len(), Vec::new());
        }
        for (mine, theirs) in self.partitions.iter_mut().zip(other.partitions) {
            mine.extend(theirs);
        }
    }

    /// The report of `partitions` partitions (a partition that never acknowledged is listed
    /// with no times).
    pub fn report(mut self, partitions: u32, acks: &str) -> GapReport {
        self.partitions
            .resize(self.partitions.len().max(partitions as usize), Vec::new());
        let partitions = self
            .partitions
            .into_iter()
            .enumerate()
            .map(|(partition, mut times)| {
                times.sort_unstable();
                times.dedup();
                let mut gaps: Vec<Gap> = times
                    .windows(2)
                    .map(|w| Gap {
                        gap_ms: w[1] - w[0],
                        from_unix_ms: w[0],
                        to_unix_ms: w[1],
                    })
                    .collect();
                gaps.sort_unstable_by_key(|g| std::cmp::Reverse(g.gap_ms));
                gaps.truncate(GAPS_LISTED_MAX);
                PartitionGaps {
                    partition: partition as u32,
                    acks: times.len() as u64,
                    first_unix_ms: times.first().copied(),
                    last_unix_ms: times.last().copied(),
                    max_gap_ms: gaps.first().map_or(0, |g| g.gap_ms),
                    largest_gaps: gaps,
                    ack_unix_ms: times,
                }
            })
            .collect();
        GapReport {
            acks: acks.to_string(),
            partitions,
        }
    }
}

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gap {
    pub gap_ms: u64,
    pub from_unix_ms: u64,
    pub to_unix_ms: u64,
}

#[derive(Serialize, Debug)]
pub struct PartitionGaps {
    pub partition: u32,
    /// Distinct milliseconds with at least one acknowledgement.
    pub acks: u64,
    pub first_unix_ms: Option<u64>,
    pub last_unix_ms: Option<u64>,
    pub max_gap_ms: u64,
    pub largest_gaps: Vec<Gap>,
    pub ack_unix_ms: Vec<u64>,
}

#[derive(Serialize, Debug)]
pub struct GapReport {
    pub acks: String,
    pub partitions: Vec<PartitionGaps>,
}

impl GapReport {
    /// One line: the largest gap of each partition.
    pub fn human(&self) -> String {
        let parts: Vec<String> = self
            .partitions
            .iter()
            .map(|p| format!("p{} {} ms", p.partition, p.max_gap_ms))
            .collect();
        format!(
            "ack gaps (largest between consecutive acks={} acknowledgements): {}",
            self.acks,
            parts.join(", ")
        )
    }

    /// The summary without the per-millisecond times (for the run's JSON report).
    pub fn summary_json(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.partitions
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "partition": p.partition,
                        "acks": p.acks,
                        "max_gap_ms": p.max_gap_ms,
                        "largest_gaps": p.largest_gaps,
                    })
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_gap_is_found_across_threads() {
        let mut a = AckTimes::default();
        for t in [100, 100, 101, 105, 2000] {
            a.acknowledged(0, t);
        }
        let mut b = AckTimes::default();
        b.acknowledged(0, 1500);
        b.acknowledged(1, 7);
        a.merge(b);
        let report = a.report(3, "all");
        let p0 = &report.partitions[0];
        assert_eq!(p0.ack_unix_ms, vec![100, 101, 105, 1500, 2000]);
        assert_eq!(p0.max_gap_ms, 1395);
        assert_eq!(
            p0.largest_gaps[0],
            Gap {
                gap_ms: 1395,
                from_unix_ms: 105,
                to_unix_ms: 1500
            }
        );
        assert_eq!(report.partitions[2].acks, 0);
        assert!(report.human().contains("p0 1395 ms"));
    }
}
