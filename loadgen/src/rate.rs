//! Open-loop pacing with coordinated-omission correction: operation `i` is *intended* to start
//! at `start + i / rate`, whatever happened to earlier ones, and its latency is measured from
//! that intended time. A stalled system therefore shows its stall in every operation that should
//! have started during it, instead of hiding it by sending less (closed loop).

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rate {
    /// Closed loop: the next operation starts when the system accepts it.
    Max,
    /// Open loop: this many operations per second.
    PerSecond(f64),
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(text: &str) -> Result<Rate, String> {
        if text == "max" {
            return Ok(Rate::Max);
        }
        match text.parse::<f64>() {
            Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(Rate::PerSecond(rate)),
            _ => Err(format!(
                "--rate takes max or a positive number of messages/s, not {text:?}"
            )),
        }
    }
}

/// The intended start times of one sender's operations.
#[derive(Clone, Debug)]
pub struct Schedule {
    start: Instant,
    interval: Option<Duration>,
    sent: u64,
}

impl Schedule {
    pub fn new(start: Instant, rate: Rate) -> Schedule {
        let interval = match rate {
            Rate::Max => None,
            Rate::PerSecond(per_second) => Some(Duration::from_secs_f64(1.0 / per_second)),
        };
        Schedule {
            start,
            interval,
            sent: 0,
        }
    }

    /// The intended start of the next operation (for a closed loop: `now`), and advances.
    pub fn next(&mut self, now: Instant) -> Instant {
        let intended = match self.interval {
            None => now,
            Some(interval) => self.start + interval.mul_f64(self.sent as f64),
        };
        self.sent += 1;
        intended
    }
}

/// The latency to record for an operation intended at `intended` that completed at `done`.
pub fn corrected_latency(intended: Instant, done: Instant) -> Duration {
    done.saturating_duration_since(intended)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_loop_keeps_its_schedule_whatever_the_delays() {
        let start = Instant::now();
        let mut schedule = Schedule::new(start, Rate::PerSecond(1000.0));
        // The caller falls 50 ms behind after the 3rd operation: intended times do not move.
        let mut now = start;
        let mut intended = Vec::new();
        for i in 0..10u64 {
            if i == 3 {
                now += Duration::from_millis(50);
            }
            intended.push(schedule.next(now));
        }
        for (i, at) in intended.iter().enumerate() {
            assert_eq!(*at, start + Duration::from_millis(i as u64));
        }
    }

    #[test]
    fn coordinated_omission_correction_counts_the_wait_before_sending() {
        let start = Instant::now();
        let mut schedule = Schedule::new(start, Rate::PerSecond(100.0));
        let _ = schedule.next(start);
        let intended = schedule.next(start);
        assert_eq!(intended, start + Duration::from_millis(10));
        // Sent late (at 40 ms, because the system stalled), answered 1 ms later: 31 ms.
        let done = start + Duration::from_millis(41);
        assert_eq!(corrected_latency(intended, done), Duration::from_millis(31));
    }

    #[test]
    fn closed_loop_starts_now_and_rates_parse() {
        let start = Instant::now();
        let mut schedule = Schedule::new(start, Rate::Max);
        let later = start + Duration::from_secs(3);
        assert_eq!(schedule.next(later), later);
        assert_eq!("max".parse::<Rate>(), Ok(Rate::Max));
        assert_eq!("2500".parse::<Rate>(), Ok(Rate::PerSecond(2500.0)));
        assert!("0".parse::<Rate>().is_err());
        assert!("fast".parse::<Rate>().is_err());
    }
}
