//! `--plot FILE.svg`: latency percentile curves (produce-ack and end-to-end), drawn the way
//! HdrHistogram plots are read: x is the percentile on a log scale of 1/(1-p) (50%, 90%, 99%,
//! 99.9%, ...), y is the latency in µs on a log scale.

use hdrhistogram::Histogram;
use plotters::prelude::*;

/// Points of a percentile curve: (1/(1-p), latency µs), up to but excluding p = 1.
pub fn curve(histogram: &Histogram<u64>) -> Vec<(f64, f64)> {
    if histogram.is_empty() {
        return Vec::new();
    }
    histogram
        .iter_quantiles(5)
        .map(|step| (step.quantile_iterated_to(), step.value_iterated_to()))
        .filter(|(q, _)| *q < 1.0)
        .map(|(q, v)| (1.0 / (1.0 - q), (v as f64).max(1.0)))
        .collect()
}

fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 1.0 / x);
    if p < 99.0 {
        format!("{p:.0}%")
    } else {
        let digits = (-(1.0 - p / 100.0).log10()).round() as usize;
        format!("{p:.*}%", digits.saturating_sub(2))
    }
}

pub fn draw(path: &str, title: &str, series: &[(&str, &Histogram<u64>)]) -> Result<(), String> {
    let curves: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(name, h)| (*name, curve(h)))
        .filter(|(_, c)| !c.is_empty())
        .collect();
    let x_max = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.0))
        .fold(10.0f64, f64::max)
        * 2.0;
    let y_max = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.1))
        .fold(10.0f64, f64::max)
        * 2.0;
    let error = |e: &dyn std::fmt::Display| format!("cannot draw {path}: {e}");
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| error(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0f64..x_max).log_scale(), (1.0f64..y_max).log_scale())
        .map_err(|e| error(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .x_label_formatter(&|x| percentile_label(*x))
        .draw()
        .map_err(|e| error(&e))?;
    let colors = [RED, BLUE, GREEN, MAGENTA];
    for (i, (name, points)) in curves.into_iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| error(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| error(&e))?;
    root.present().map_err(|e| error(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_rise_with_the_percentile_and_files_are_svg() {
        let mut histogram = crate::report::new_histogram();
        for v in 1..=10_000u64 {
            histogram.record(v).expect("in range");
        }
        let points = curve(&histogram);
        assert!(points.len() > 10);
        assert!(points
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        assert_eq!(percentile_label(2.0), "50%");
        assert_eq!(percentile_label(1000.0), "99.9%");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.svg");
        let path = path.to_str().expect("utf8 path");
        draw(
            path,
            "test",
            &[
                ("produce", &histogram),
                ("e2e", &crate::report::new_histogram()),
            ],
        )
        .expect("draws");
        let svg = std::fs::read_to_string(path).expect("written");
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        assert!(svg.contains("produce"));
    }
}
