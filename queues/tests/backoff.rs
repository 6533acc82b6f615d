//! Property tests of the redelivery backoff: the un-jittered delay never shrinks as attempts
//! grow and never passes the cap; jitter stays within its floor and the un-jittered delay; an
//! explicit list is followed exactly, its last delay repeating. Failing cases are kept in
//! `backoff.proptest-regressions` and replayed first.

use proptest::prelude::*;
use wharf_queues::{Backoff, BackoffError, BACKOFF_DELAYS_MAX, MULTIPLIER_PERMILLE_MAX};

fn exponential() -> impl Strategy<Value = Backoff> {
    (
        0u64..100_000,
        0u64..10_000_000,
        prop_oneof![
            Just(1_000u32),
            Just(1_001),
            Just(2_000),
            1_000u32..=MULTIPLIER_PERMILLE_MAX
        ],
        prop_oneof![Just(0u32), Just(1_000), 0u32..=1_000],
    )
        .prop_map(
            |(initial_ms, extra_ms, multiplier_permille, jitter_permille)| {
                Backoff::exponential(
                    initial_ms,
                    initial_ms + extra_ms,
                    multiplier_permille,
                    jitter_permille,
                )
                .expect("valid")
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn exponential_delays_grow_up_to_the_cap(backoff in exponential(), attempt in 1u32..200) {
        let Backoff::Exponential { initial_ms, max_ms, .. } = backoff else { unreachable!() };
        let delay_ms = backoff.delay_unjittered_ms(attempt);
        let next_ms = backoff.delay_unjittered_ms(attempt + 1);
        prop_assert!(delay_ms <= next_ms, "attempt {attempt}: {delay_ms} then {next_ms}");
        prop_assert!(initial_ms <= delay_ms && delay_ms <= max_ms);
        prop_assert_eq!(backoff.delay_unjittered_ms(1), initial_ms);
    }

    #[test]
    fn jittered_delays_stay_between_the_floor_and_the_unjittered_delay(
        backoff in exponential(),
        attempt in 1u32..200,
        sample in any::<u64>(),
    ) {
        let Backoff::Exponential { jitter_permille, .. } = backoff else { unreachable!() };
        let ceiling_ms = backoff.delay_unjittered_ms(attempt);
        let floor_ms = backoff.delay_floor_ms(attempt);
        let delay_ms = backoff.delay_ms(attempt, sample);
        prop_assert!(floor_ms <= delay_ms && delay_ms <= ceiling_ms);
        // The floor is the un-jittered delay shortened by the jitter fraction (rounded down).
        let expected_floor = ceiling_ms - (u128::from(ceiling_ms) * u128::from(jitter_permille) / 1_000) as u64;
        prop_assert_eq!(floor_ms, expected_floor);
        if jitter_permille == 0 {
            prop_assert_eq!(delay_ms, ceiling_ms);
        }
    }

    #[test]
    fn a_list_is_followed_exactly_and_its_last_delay_repeats(
        delays_ms in proptest::collection::vec(0u64..1_000_000, 1..=BACKOFF_DELAYS_MAX),
        attempt in 1u32..200,
        sample in any::<u64>(),
    ) {
        let backoff = Backoff::list(delays_ms.clone()).expect("valid");
        let expected = delays_ms[(attempt as usize - 1).min(delays_ms.len() - 1)];
        prop_assert_eq!(backoff.delay_ms(attempt, sample), expected);
        prop_assert_eq!(backoff.delay_unjittered_ms(attempt), expected);
    }
}

#[test]
fn the_exponential_schedule_doubles_then_caps() {
    let backoff = Backoff::exponential(1_000, 10_000, 2_000, 0).expect("valid");
    let schedule: Vec<u64> = (1..=6).map(|a| backoff.delay_ms(a, 12_345)).collect();
    assert_eq!(schedule, [1_000, 2_000, 4_000, 8_000, 10_000, 10_000]);
    // A huge attempt number costs no more than reaching the cap.
    assert_eq!(backoff.delay_ms(u32::MAX, 0), 10_000);
}

#[test]
fn full_jitter_may_draw_anything_down_to_zero() {
    let backoff = Backoff::exponential(1_000, 1_000, 1_000, 1_000).expect("valid");
    assert_eq!(backoff.delay_floor_ms(1), 0);
    assert_eq!(backoff.delay_ms(1, 0), 0);
    assert_eq!(backoff.delay_ms(1, 1_000), 1_000);
    assert_eq!(backoff.delay_ms(1, 1_001), 0);
}

#[test]
fn bad_policies_are_refused_with_their_reason() {
    assert_eq!(
        Backoff::exponential(5_000, 1_000, 2_000, 0),
        Err(BackoffError::InitialAboveMax {
            initial_ms: 5_000,
            max_ms: 1_000
        })
    );
    assert_eq!(
        Backoff::exponential(1, 2, 999, 0),
        Err(BackoffError::MultiplierBelowOne {
            multiplier_permille: 999
        })
    );
    assert_eq!(
        Backoff::exponential(1, 2, MULTIPLIER_PERMILLE_MAX + 1, 0),
        Err(BackoffError::MultiplierTooLarge {
            multiplier_permille: MULTIPLIER_PERMILLE_MAX + 1,
            limit: MULTIPLIER_PERMILLE_MAX
        })
    );
    assert_eq!(
        Backoff::exponential(1, 2, 2_000, 1_001),
        Err(BackoffError::JitterAboveOne {
            jitter_permille: 1_001
        })
    );
    assert_eq!(Backoff::list(Vec::new()), Err(BackoffError::EmptyList));
    assert_eq!(
        Backoff::list(vec![1; BACKOFF_DELAYS_MAX + 1]),
        Err(BackoffError::TooManyDelays {
            count: BACKOFF_DELAYS_MAX + 1,
            limit: BACKOFF_DELAYS_MAX
        })
    );
    assert!(Backoff::list(vec![1; BACKOFF_DELAYS_MAX]).is_ok());
}
