//! Pure deciders for segment roll, retention and flush scheduling. The log carries out what they
//! return; they take time as an argument and never do I/O, so they are tested exhaustively.

/// What a topic asks of fsync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushPolicy {
    /// Every acknowledged write was fsynced first (the default).
    Always,
    /// fsync at most every `interval_ms`; acknowledged writes can be lost on power failure.
    Interval { interval_ms: u64 },
}

/// The state of a segment that deciders look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentFacts {
    pub data_bytes: u64,
    /// Time of the first append to this segment (or of recovery, for a recovered segment).
    pub created_ms: u64,
    /// Largest record timestamp in the segment (`i64::MIN` when unknown or empty).
    pub max_timestamp_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RollLimits {
    pub segment_bytes_max: u64,
    pub segment_age_ms_max: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RollDecision {
    Keep,
    /// Seal the active segment and start a new one before appending.
    Roll(RollReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RollReason {
    Size,
    Age,
}

/// Decides whether appending `batch_bytes` to the active segment needs a new segment first.
/// An empty segment is never rolled, so a batch larger than the limit still finds a home.
pub fn decide_roll(
    active: &SegmentFacts,
    batch_bytes: u64,
    now_ms: u64,
    limits: &RollLimits,
) -> RollDecision {
    if active.data_bytes == 0 {
        return RollDecision::Keep;
    }
    if active.data_bytes + batch_bytes > limits.segment_bytes_max {
        return RollDecision::Roll(RollReason::Size);
    }
    if now_ms.saturating_sub(active.created_ms) >= limits.segment_age_ms_max {
        return RollDecision::Roll(RollReason::Age);
    }
    RollDecision::Keep
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RetentionLimits {
    /// Keep at most this many bytes in the partition (sealed + active), deleting oldest first.
    pub retention_bytes_max: Option<u64>,
    /// Delete sealed segments whose newest record is older than this.
    pub retention_ms_max: Option<u64>,
}

/// How many of the oldest sealed segments to delete. `sealed` is oldest first; the active
/// segment is never deleted. Deleting stops at the first segment that must be kept, so the log
/// start stays a prefix boundary.
pub fn decide_retention(
    sealed: &[SegmentFacts],
    active_bytes: u64,
    now_ms: u64,
    limits: &RetentionLimits,
) -> usize {
    let mut total_bytes: u64 = sealed.iter().map(|s| s.data_bytes).sum::<u64>() + active_bytes;
    let mut delete = 0;
    for segment in sealed {
        let over_size = limits
            .retention_bytes_max
            .is_some_and(|max| total_bytes > max);
        let too_old = limits.retention_ms_max.is_some_and(|max| {
            segment.max_timestamp_ms != i64::MIN
                && now_ms as i64 - segment.max_timestamp_ms > max as i64
        });
        if !(over_size || too_old) {
            break;
        }
        total_bytes -= segment.data_bytes;
        delete += 1;
    }
    delete
}

/// Whether the driver should start a flush now.
pub fn flush_due(
    policy: FlushPolicy,
    staged_bytes: usize,
    last_flush_ms: u64,
    now_ms: u64,
) -> bool {
    if staged_bytes == 0 {
        return false;
    }
    match policy {
        FlushPolicy::Always => true,
        FlushPolicy::Interval { interval_ms } => {
            now_ms.saturating_sub(last_flush_ms) >= interval_ms
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RollLimits = RollLimits {
        segment_bytes_max: 1000,
        segment_age_ms_max: 60_000,
    };

    fn facts(data_bytes: u64, created_ms: u64, max_timestamp_ms: i64) -> SegmentFacts {
        SegmentFacts {
            data_bytes,
            created_ms,
            max_timestamp_ms,
        }
    }

    #[test]
    fn roll_by_size_age_and_never_when_empty() {
        for data_bytes in 0..1100u64 {
            for batch_bytes in [16u64, 100, 2000] {
                let decision = decide_roll(&facts(data_bytes, 0, 0), batch_bytes, 10, &LIMITS);
                let expected = if data_bytes == 0 {
                    RollDecision::Keep
                } else if data_bytes + batch_bytes > 1000 {
                    RollDecision::Roll(RollReason::Size)
                } else {
                    RollDecision::Keep
                };
                assert_eq!(decision, expected, "data {data_bytes} batch {batch_bytes}");
            }
        }
        assert_eq!(
            decide_roll(&facts(10, 0, 0), 16, 60_000, &LIMITS),
            RollDecision::Roll(RollReason::Age)
        );
        assert_eq!(
            decide_roll(&facts(0, 0, 0), 16, 60_000, &LIMITS),
            RollDecision::Keep
        );
    }

    #[test]
    fn retention_deletes_oldest_prefix_only() {
        let sealed = [
            facts(100, 0, 1_000),
            facts(100, 0, 50_000),
            facts(100, 0, 2_000),
        ];
        let by_size = RetentionLimits {
            retention_bytes_max: Some(250),
            retention_ms_max: None,
        };
        assert_eq!(decide_retention(&sealed, 100, 0, &by_size), 2);
        let by_time = RetentionLimits {
            retention_bytes_max: None,
            retention_ms_max: Some(10_000),
        };
        // The second segment is recent, so the third (older) one must wait: prefix only.
        assert_eq!(decide_retention(&sealed, 0, 20_000, &by_time), 1);
        assert_eq!(
            decide_retention(&sealed, 0, 20_000, &RetentionLimits::default()),
            0
        );
        assert_eq!(
            decide_retention(&[], 1_000_000, 0, &by_size),
            0,
            "active is never deleted"
        );
    }

    #[test]
    fn flush_due_follows_policy() {
        assert!(!flush_due(FlushPolicy::Always, 0, 0, 100));
        assert!(flush_due(FlushPolicy::Always, 1, 100, 100));
        let interval = FlushPolicy::Interval { interval_ms: 50 };
        assert!(!flush_due(interval, 10, 100, 149));
        assert!(flush_due(interval, 10, 100, 150));
    }
}
