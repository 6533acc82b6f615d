//! Latency summaries, the `.hgrm` percentile-distribution files and the JSON report.

use std::io::Write;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in microseconds, 1 µs .. 1 hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid")
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub p9999: u64,
    pub max: u64,
}

pub fn percentiles(histogram: &Histogram<u64>) -> Percentiles {
    if histogram.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        p50: histogram.value_at_quantile(0.50),
        p90: histogram.value_at_quantile(0.90),
        p99: histogram.value_at_quantile(0.99),
        p999: histogram.value_at_quantile(0.999),
        p9999: histogram.value_at_quantile(0.9999),
        max: histogram.max(),
    }
}

/// Writes the histogram in HdrHistogram's percentile-distribution text format (as
/// `outputPercentileDistribution` prints it), values in microseconds.
pub fn write_hgrm(out: &mut impl Write, histogram: &Histogram<u64>) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    )?;
    if !histogram.is_empty() {
        for step in histogram.iter_quantiles(5) {
            let quantile = step.quantile_iterated_to();
            let inverse = if quantile < 1.0 {
                format!("{:>14.2}", 1.0 / (1.0 - quantile))
            } else {
                String::new()
            };
            writeln!(
                out,
                "{:>12.3} {:>2.12} {:>10} {}",
                step.value_iterated_to() as f64,
                quantile,
                step.count_since_last_iteration(),
                inverse
            )?;
        }
    }
    writeln!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        histogram.mean(),
        histogram.stdev()
    )?;
    writeln!(
        out,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        histogram.max() as f64,
        histogram.len()
    )?;
    writeln!(
        out,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        histogram.buckets(),
        histogram.distinct_values()
    )
}

/// Formats µs for humans: `850 µs`, `12.3 ms`.
pub fn human_us(us: u64) -> String {
    if us < 1000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.2} ms", us as f64 / 1000.0)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut histogram = new_histogram();
        for v in 1..=10_000u64 {
            histogram.record(v).expect("in range");
        }
        let p = percentiles(&histogram);
        let close = |value: u64, expected: u64| value.abs_diff(expected) * 1000 <= expected * 2;
        assert!(close(p.p50, 5_000), "{p:?}");
        assert!(close(p.p90, 9_000), "{p:?}");
        assert!(close(p.p99, 9_900), "{p:?}");
        assert!(close(p.p999, 9_990), "{p:?}");
        assert!(close(p.max, 10_000), "{p:?}");
        assert!(p.p50 <= p.p90 && p.p90 <= p.p99 && p.p99 <= p.p999 && p.p999 <= p.p9999);
    }

    #[test]
    fn an_empty_histogram_reports_zeros_and_a_valid_file() {
        let histogram = new_histogram();
        assert_eq!(percentiles(&histogram), Percentiles::default());
        let mut out = Vec::new();
        write_hgrm(&mut out, &histogram).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.contains("Total count    =            0"), "{text}");
    }

    #[test]
    fn hgrm_lines_end_at_the_maximum() {
        let mut histogram = new_histogram();
        for v in [10u64, 20, 30, 1000] {
            histogram.record(v).expect("in range");
        }
        let mut out = Vec::new();
        write_hgrm(&mut out, &histogram).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        let last_value_line = text
            .lines()
            .rfind(|l| !l.starts_with('#') && !l.trim().is_empty() && !l.contains("Value"))
            .expect("value lines");
        let value: f64 = last_value_line
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .expect("a value");
        assert!((value - 1000.0).abs() <= 1.0, "{last_value_line}");
        assert_eq!(human_us(850), "850 µs");
        assert_eq!(human_us(12_300), "12.30 ms");
    }
}
