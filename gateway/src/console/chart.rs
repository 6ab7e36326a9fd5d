//! A readings chart as server-rendered SVG: each bucket's average as a line, its min and
//! max as a band. Pure.

use std::fmt::Write;

use iotgw_registry::ReadingBucket;
use maud::{html, Markup};

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 160.0;
const PAD: f64 = 8.0;

/// The chart of one measure's buckets (in time order), spanning `from_ms..to_ms`.
pub(crate) fn svg(measure: &str, buckets: &[&ReadingBucket], from_ms: i64, to_ms: i64) -> Markup {
    let lo = buckets.iter().map(|b| b.min).fold(f64::INFINITY, f64::min);
    let hi = buckets
        .iter()
        .map(|b| b.max)
        .fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() && hi.is_finite() && hi > lo {
        (lo, hi)
    } else if lo.is_finite() {
        (lo - 1.0, lo + 1.0)
    } else {
        (0.0, 1.0)
    };
    let span = (to_ms - from_ms).max(1) as f64;
    let x = |ms: i64| PAD + (ms - from_ms) as f64 / span * (WIDTH - 2.0 * PAD);
    let y = |v: f64| HEIGHT - PAD - (v - lo) / (hi - lo) * (HEIGHT - 2.0 * PAD);
    let mut line = String::new();
    let mut band_top = String::new();
    let mut band_bottom = Vec::new();
    for b in buckets {
        let bx = x(b.start.timestamp_millis());
        let _ = write!(line, "{bx:.1},{:.1} ", y(b.avg()));
        let _ = write!(band_top, "{bx:.1},{:.1} ", y(b.max));
        band_bottom.push(format!("{bx:.1},{:.1}", y(b.min)));
    }
    band_bottom.reverse();
    let band = format!("{band_top}{}", band_bottom.join(" "));
    let label = format!("{measure}: {} buckets, from {lo} to {hi}", buckets.len());
    html! {
        figure {
            figcaption { code { (measure) } " " span class="muted" { "min " (fmt(lo)) ", max " (fmt(hi)) ", " (buckets.len()) " buckets" } }
            svg xmlns="http://www.w3.org/2000/svg" width=(WIDTH) height=(HEIGHT)
                viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img" aria-label=(label)
                data-points=(buckets.len()) {
                title { (label) }
                polygon points=(band) fill="#c9dcf0" stroke="none" {}
                polyline points=(line.trim_end()) fill="none" stroke="#12355b" stroke-width="2" {}
                // A dot per bucket, so a single one shows too.
                @for b in buckets {
                    circle cx=(format!("{:.1}", x(b.start.timestamp_millis()))) cy=(format!("{:.1}", y(b.avg()))) r="3" fill="#12355b" {}
                }
            }
        }
    }
}

fn fmt(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn bucket(min: i64, v: f64) -> ReadingBucket {
        ReadingBucket {
            measure: "/t".into(),
            start: Utc.timestamp_millis_opt(min * 60_000).single().expect("t"),
            min: v - 1.0,
            max: v + 1.0,
            sum: v * 2.0,
            count: 2,
        }
    }

    #[test]
    fn a_chart_draws_one_point_per_bucket_inside_its_box() {
        let b = [bucket(0, 10.0), bucket(1, 20.0), bucket(2, 15.0)];
        let refs: Vec<&ReadingBucket> = b.iter().collect();
        let out = svg("/t", &refs, 0, 3 * 60_000).into_string();
        let points = out
            .split("<polyline points=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .expect("a polyline");
        let coords: Vec<(f64, f64)> = points
            .split(' ')
            .map(|p| {
                let (x, y) = p.split_once(',').expect("x,y");
                (x.parse().expect("x"), y.parse().expect("y"))
            })
            .collect();
        assert_eq!(coords.len(), 3);
        for (x, y) in &coords {
            assert!(
                (0.0..=WIDTH).contains(x) && (0.0..=HEIGHT).contains(y),
                "{x},{y}"
            );
        }
        // The highest average is drawn highest (the smallest y).
        assert!(coords[1].1 < coords[0].1 && coords[1].1 < coords[2].1);
        assert!(out.contains("data-points=\"3\""));
        assert!(out.contains("role=\"img\""));
    }

    #[test]
    fn an_empty_or_flat_series_still_draws_a_valid_chart() {
        assert!(!svg("/t", &[], 0, 1).into_string().contains("NaN"));
        let flat = [bucket(0, 5.0)];
        let refs: Vec<&ReadingBucket> = flat.iter().collect();
        assert!(!svg("/t", &refs, 0, 60_000).into_string().contains("NaN"));
    }
}
