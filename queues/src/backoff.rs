//! The redelivery delay policy: how long a record waits before its next delivery after a
//! delivery attempt failed (nacked without an explicit delay, or its lease expired).
//!
//! A pure function of the failed attempt's number and a caller-supplied random sample, so the
//! state machine stays deterministic: the same inputs always give the same delay.

/// Delays an explicit list may hold (a schedule longer than this is better expressed as an
/// exponential policy).
pub const BACKOFF_DELAYS_MAX: usize = 64;
/// The largest growth factor per attempt, in per-mille (x100). Beyond it the second delay is
/// already the maximum for any sane `max_ms`.
pub const MULTIPLIER_PERMILLE_MAX: u32 = 100_000;
/// 1.0 in per-mille.
const PERMILLE_ONE: u32 = 1_000;

/// How long to wait before delivering a record again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backoff {
    /// `initial_ms * multiplier^(attempt - 1)`, capped at `max_ms`, then shortened by up to
    /// `jitter_permille` of itself so that records that failed together (a consumer crash)
    /// do not all come back at the same instant.
    Exponential {
        initial_ms: u64,
        max_ms: u64,
        /// Growth per attempt in per-mille: 2000 doubles the delay each attempt.
        multiplier_permille: u32,
        /// 0..=1000: the delay is drawn from `[d * (1 - j/1000), d]`.
        jitter_permille: u32,
    },
    /// The n-th failed attempt waits `delays_ms[n - 1]`; the last delay repeats. No jitter:
    /// whoever writes an explicit schedule wants exactly that schedule.
    List { delays_ms: Vec<u64> },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BackoffError {
    #[error("backoff initial delay {initial_ms} ms is above its maximum {max_ms} ms")]
    InitialAboveMax { initial_ms: u64, max_ms: u64 },
    #[error("backoff multiplier {multiplier_permille}‰ is below 1000‰ (delays would shrink)")]
    MultiplierBelowOne { multiplier_permille: u32 },
    #[error("backoff multiplier {multiplier_permille}‰ is above {limit}‰")]
    MultiplierTooLarge {
        multiplier_permille: u32,
        limit: u32,
    },
    #[error("backoff jitter {jitter_permille}‰ is above 1000‰")]
    JitterAboveOne { jitter_permille: u32 },
    #[error("a backoff delay list needs at least one delay")]
    EmptyList,
    #[error("a backoff delay list of {count} delays (limit {limit})")]
    TooManyDelays { count: usize, limit: usize },
}

impl Default for Backoff {
    /// 1 s, doubling, up to 5 min, with 20% jitter.
    fn default() -> Backoff {
        Backoff::Exponential {
            initial_ms: 1_000,
            max_ms: 300_000,
            multiplier_permille: 2_000,
            jitter_permille: 200,
        }
    }
}

impl Backoff {
    /// A validated exponential policy.
    pub fn exponential(
        initial_ms: u64,
        max_ms: u64,
        multiplier_permille: u32,
        jitter_permille: u32,
    ) -> Result<Backoff, BackoffError> {
        let backoff = Backoff::Exponential {
            initial_ms,
            max_ms,
            multiplier_permille,
            jitter_permille,
        };
        backoff.validate()?;
        Ok(backoff)
    }

    /// A validated explicit schedule.
    pub fn list(delays_ms: Vec<u64>) -> Result<Backoff, BackoffError> {
        let backoff = Backoff::List { delays_ms };
        backoff.validate()?;
        Ok(backoff)
    }

    pub fn validate(&self) -> Result<(), BackoffError> {
        match self {
            &Backoff::Exponential {
                initial_ms,
                max_ms,
                multiplier_permille,
                jitter_permille,
            } => {
                if initial_ms > max_ms {
                    return Err(BackoffError::InitialAboveMax { initial_ms, max_ms });
                }
                if multiplier_permille < PERMILLE_ONE {
                    return Err(BackoffError::MultiplierBelowOne {
                        multiplier_permille,
                    });
                }
                if multiplier_permille > MULTIPLIER_PERMILLE_MAX {
                    return Err(BackoffError::MultiplierTooLarge {
                        multiplier_permille,
                        limit: MULTIPLIER_PERMILLE_MAX,
                    });
                }
                if jitter_permille > PERMILLE_ONE {
                    return Err(BackoffError::JitterAboveOne { jitter_permille });
                }
                Ok(())
            }
            Backoff::List { delays_ms } => {
                if delays_ms.is_empty() {
                    return Err(BackoffError::EmptyList);
                }
                if delays_ms.len() > BACKOFF_DELAYS_MAX {
                    return Err(BackoffError::TooManyDelays {
                        count: delays_ms.len(),
                        limit: BACKOFF_DELAYS_MAX,
                    });
                }
                Ok(())
            }
        }
    }

    /// The delay before the next delivery after `delivery_attempt` (1 = the first delivery)
    /// failed, without jitter. Non-decreasing in the attempt for the exponential policy.
    pub fn delay_unjittered_ms(&self, delivery_attempt: u32) -> u64 {
        assert!(delivery_attempt >= 1, "delivery attempts count from 1");
        assert_eq!(self.validate(), Ok(()), "an unvalidated backoff policy");
        match self {
            &Backoff::Exponential {
                initial_ms,
                max_ms,
                multiplier_permille,
                ..
            } => {
                let mut delay_ms = initial_ms;
                // Bounded by the attempt number, and stops at the cap or at a fixed point (a
                // multiplier so close to 1 that integer rounding no longer grows the delay),
                // so a huge attempt number costs no more than reaching the cap.
                for _ in 1..delivery_attempt {
                    if delay_ms >= max_ms {
                        break;
                    }
                    let grown = u128::from(delay_ms) * u128::from(multiplier_permille)
                        / u128::from(PERMILLE_ONE);
                    let grown = u64::try_from(grown).unwrap_or(u64::MAX).min(max_ms);
                    if grown == delay_ms {
                        break;
                    }
                    delay_ms = grown;
                }
                assert!(delay_ms >= initial_ms && delay_ms <= max_ms);
                delay_ms
            }
            Backoff::List { delays_ms } => {
                let index = usize::try_from(delivery_attempt - 1)
                    .unwrap_or(usize::MAX)
                    .min(delays_ms.len() - 1);
                delays_ms[index]
            }
        }
    }

    /// The shortest delay jitter may produce for `delivery_attempt`.
    pub fn delay_floor_ms(&self, delivery_attempt: u32) -> u64 {
        let delay_ms = self.delay_unjittered_ms(delivery_attempt);
        match self {
            &Backoff::Exponential {
                jitter_permille, ..
            } => {
                let cut =
                    u128::from(delay_ms) * u128::from(jitter_permille) / u128::from(PERMILLE_ONE);
                // `cut <= delay_ms` because jitter_permille <= 1000.
                delay_ms - u64::try_from(cut).unwrap_or(delay_ms)
            }
            Backoff::List { .. } => delay_ms,
        }
    }

    /// The delay before the next delivery after `delivery_attempt` failed, with jitter drawn
    /// from `jitter_sample` (any random `u64`; the caller owns the randomness).
    pub fn delay_ms(&self, delivery_attempt: u32, jitter_sample: u64) -> u64 {
        let ceiling_ms = self.delay_unjittered_ms(delivery_attempt);
        let floor_ms = self.delay_floor_ms(delivery_attempt);
        assert!(floor_ms <= ceiling_ms);
        let span = ceiling_ms - floor_ms;
        let delay_ms = match span.checked_add(1) {
            Some(choices) => floor_ms + jitter_sample % choices,
            // The span covers all of u64: any sample is a valid delay.
            None => jitter_sample,
        };
        assert!(floor_ms <= delay_ms && delay_ms <= ceiling_ms);
        delay_ms
    }
}
