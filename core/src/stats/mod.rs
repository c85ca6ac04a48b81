//! Statistics over seeds: what a sweep's scores say about seed variance and black swans.
//!
//! Everything here is a pure function of the finished runs; the store fetches them and the
//! service and the command line present the answers. Each statistic is checked against numpy and
//! scipy on fixed data (`reference.json`, written by `scripts/stats_reference.py`).
//!
//! - [`summarize`]: n, mean, sample std, min and max with their seeds, quartiles, the gap.
//! - [`describe`]: black swans (robust and classic z), exact best-of-k, intervals (t for the mean, Bonett's for the std), how
//!   many seeds a target interval width needs, the per-epoch spread.
//! - [`noise`]: test-set noise: binomial, and from per-example correctness (Jordan 2023).
//! - [`components`]: variance by seed factor in a crossed design.
//! - [`compare`]: two sweeps against each other.

pub mod compare;
pub mod components;
pub mod describe;
pub mod document;
pub mod noise;
pub mod outcomes;

use crate::domain::{Metric, Scored};
use crate::metric::Direction;
use serde::{Deserialize, Serialize};

/// Reads back a number that serde_json wrote as `null` because it was NaN: the documents carry
/// NaN where a statistic is undefined (a Welch test of single seeds, a correlation without
/// spread), and the client reads them with the same types the server wrote.
pub(crate) fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Everything `coordinator sweep stats --json` prints (README, "Statistics", documents the keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepStats {
    pub metric: Metric,
    #[serde(flatten)]
    pub summary: Summary,
    /// Median absolute deviation (unscaled).
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub mad: f64,
    pub black_swans: Vec<describe::BlackSwan>,
    pub best_of_k: Vec<describe::BestOfK>,
    pub intervals: Option<describe::Intervals>,
    pub seeds_for_ci_width: Vec<describe::SeedsFor>,
    /// The binomial std of the mean accuracy over `test_examples` examples (accuracies only,
    /// when the test-set size is given or known from the correctness bitmaps).
    pub binomial_std: Option<f64>,
    /// From the runs' per-example correctness (metric test_accuracy, at least two runs with
    /// bitmaps of one test-set size): independent-errors prediction, distribution-wise
    /// variance, split-half correlation.
    pub test_set: Option<noise::TestSetNoise>,
    pub epochs: Vec<describe::EpochSpread>,
    pub variance_components: Option<components::Components>,
    /// Why there are no variance components, when there are none.
    pub variance_components_note: Option<String>,
}

/// The statistics of one sweep's metric, which improves in `direction`; `None` before its
/// first result. `epochs`: the spread at each epoch, as the store computed it. `ci_width`: also
/// say how many seeds a 95% interval of the mean this wide needs.
pub fn analyse(
    metric: Metric,
    direction: Direction,
    runs: &[Scored],
    epochs: Vec<describe::EpochSpread>,
    ci_width: Option<f64>,
    test_examples: Option<u64>,
    test_sets: &[noise::TestSetTally],
) -> Option<SweepStats> {
    let pairs: Vec<(i64, f64)> = runs.iter().map(|r| (r.seed, r.value)).collect();
    let values = sorted(pairs.iter().map(|p| p.1));
    let summary = summarize_sorted(&pairs, &values, direction)?;
    let (_, mad) = describe::median_mad(&values);
    let intervals = describe::intervals(&values, &summary);
    let mut widths: Vec<f64> = intervals
        .iter()
        .flat_map(|i| {
            let w = i.mean.high - i.mean.low;
            [w / 2.0, w / 4.0]
        })
        .collect();
    widths.extend(ci_width);
    let cells: Vec<components::Cell> = runs
        .iter()
        .map(|r| components::Cell {
            factors: r.factors,
            score: r.value,
        })
        .collect();
    let (variance_components, variance_components_note) = match components::components(&cells) {
        Ok(c) => (Some(c), None),
        Err(e) => (None, Some(e.reason)),
    };
    let accuracy = matches!(
        metric,
        Metric::TestAccuracy | Metric::TestTop5 | Metric::ValAccuracy | Metric::TrainAccuracy
    );
    // The tally of the commonest test-set size (one size unless workers saw different data).
    let test_set = (metric == Metric::TestAccuracy)
        .then(|| {
            test_sets
                .iter()
                .max_by_key(|t| (t.sums.runs, t.examples))?
                .noise()
        })
        .flatten();
    let test_examples = test_examples.or(test_set.as_ref().map(|t| t.test_examples));
    Some(SweepStats {
        metric,
        black_swans: describe::black_swans(&pairs, &summary, mad, direction),
        best_of_k: describe::k_grid(values.len())
            .into_iter()
            .map(|k| describe::best_of_k(&values, k, direction))
            .collect(),
        intervals,
        seeds_for_ci_width: widths
            .into_iter()
            .filter(|w| *w > 0.0)
            .map(|w| describe::seeds_for_width(summary.std, w))
            .collect(),
        binomial_std: test_examples
            .filter(|_| accuracy)
            .map(|n| noise::binomial_std(summary.mean, n)),
        test_set,
        epochs,
        variance_components,
        variance_components_note,
        mad,
        summary,
    })
}

/// The usual description of scores over seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Which way the metric improves ("max" or "min"): what best and worst follow.
    pub direction: Direction,
    pub n: u64,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub mean: f64,
    /// Sample standard deviation (divides by n - 1); 0 for a single seed.
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub std: f64,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub min: f64,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub max: f64,
    /// The seeds of the worst and the best score, by the metric's direction (the max's seed is
    /// the best when higher is better, the min's when lower is).
    pub worst_seed: i64,
    pub best_seed: i64,
    /// Quartiles by linear interpolation (numpy's default).
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub q1: f64,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub median: f64,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub q3: f64,
    /// max - min: what picking the best seed over the worst buys.
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub gap: f64,
}

impl Summary {
    /// The seeds of the min and the max.
    pub fn min_max_seeds(&self) -> (i64, i64) {
        // Ordering by the direction twice is no ordering: (best, worst) read as (min, max).
        self.direction.best_worst(self.best_seed, self.worst_seed)
    }
}

/// Summarises `(seed, score)` pairs of a metric that improves in `direction`; `None` when there
/// are none. Ties for best or worst go to the smallest seed, so the answer does not depend on
/// the order results arrived in.
pub fn summarize(scores: &[(i64, f64)], direction: Direction) -> Option<Summary> {
    summarize_sorted(scores, &sorted(scores.iter().map(|s| s.1)), direction)
}

/// [`summarize`] with the scores already sorted (`sorted`: the same values, ascending).
pub fn summarize_sorted(
    scores: &[(i64, f64)],
    sorted: &[f64],
    direction: Direction,
) -> Option<Summary> {
    let (&(first_seed, first), rest) = scores.split_first()?;
    let mut moments = Moments::default();
    moments.push(first);
    let (mut min, mut max, mut min_seed, mut max_seed) = (first, first, first_seed, first_seed);
    for &(seed, x) in rest {
        moments.push(x);
        if x < min || (x == min && seed < min_seed) {
            (min, min_seed) = (x, seed);
        }
        if x > max || (x == max && seed < max_seed) {
            (max, max_seed) = (x, seed);
        }
    }
    let (best_seed, worst_seed) = direction.best_worst(min_seed, max_seed);
    Some(Summary {
        direction,
        n: moments.n,
        mean: moments.mean,
        std: moments.std(),
        min,
        max,
        worst_seed,
        best_seed,
        q1: quantile(sorted, 0.25),
        median: quantile(sorted, 0.5),
        q3: quantile(sorted, 0.75),
        gap: max - min,
    })
}

/// Running count, mean and sum of squared deviations (Welford): stable for 10^6 scores that
/// agree to many digits, and updated in O(1) per score.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moments {
    pub n: u64,
    pub mean: f64,
    pub m2: f64,
}

impl Moments {
    pub fn push(&mut self, x: f64) {
        self.n += 1;
        let delta = x - self.mean;
        self.mean += delta / self.n as f64;
        self.m2 += delta * (x - self.mean);
    }

    /// Sample standard deviation; 0 below two scores.
    pub fn std(&self) -> f64 {
        if self.n > 1 {
            (self.m2 / (self.n - 1) as f64).sqrt()
        } else {
            0.0
        }
    }
}

/// The scores sorted ascending (NaN never reaches here: the store refuses non-finite scores).
pub fn sorted(scores: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = scores.collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The `p` quantile of sorted scores by linear interpolation between order statistics
/// (numpy's default, Hyndman and Fan's type 7).
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    let Some(&last) = sorted.last() else {
        return f64::NAN;
    };
    let h = (sorted.len() - 1) as f64 * p.clamp(0.0, 1.0);
    let lo = h.floor() as usize;
    if lo + 1 >= sorted.len() {
        return last;
    }
    sorted[lo] + (h - lo as f64) * (sorted[lo + 1] - sorted[lo])
}

#[cfg(test)]
pub(crate) mod reference {
    //! The numpy/scipy reference values, read once.
    use std::sync::LazyLock;

    pub static REFERENCE: LazyLock<serde_json::Value> = LazyLock::new(|| {
        serde_json::from_str(include_str!("reference.json")).expect("reference.json parses")
    });

    pub fn f(v: &serde_json::Value) -> f64 {
        v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
    }

    pub fn floats(v: &serde_json::Value) -> Vec<f64> {
        v.as_array().unwrap().iter().map(f).collect()
    }

    /// `got` equals `want` to `rel` relative (or 1e-12 absolute) error.
    pub fn close(got: f64, want: f64, rel: f64, what: &str) {
        let ok = (got - want).abs() <= rel * want.abs().max(1e-300) || (got - want).abs() < 1e-12;
        assert!(ok, "{what}: got {got}, numpy/scipy say {want}");
    }

    /// The reference sweep as (seed, score) pairs.
    pub fn sweep() -> Vec<(i64, f64)> {
        let s = &REFERENCE["sweep"];
        let seeds = s["seeds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap());
        seeds.zip(floats(&s["scores"])).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::reference::{REFERENCE, close, f, sweep};
    use super::*;

    #[test]
    fn the_summary_matches_numpy() {
        let s = summarize(&sweep(), Direction::Max).unwrap();
        let r = &REFERENCE["summary"];
        assert_eq!(s.n, r["n"].as_u64().unwrap());
        for (got, key) in [
            (s.mean, "mean"),
            (s.std, "std"),
            (s.min, "min"),
            (s.max, "max"),
            (s.median, "median"),
            (s.q1, "q1"),
            (s.q3, "q3"),
            (s.gap, "gap"),
        ] {
            close(got, f(&r[key]), 1e-12, key);
        }
        assert_eq!(s.best_seed, r["best_seed"].as_i64().unwrap());
        assert_eq!(s.worst_seed, r["worst_seed"].as_i64().unwrap());
    }

    #[test]
    fn ties_go_to_the_smallest_seed_and_one_score_has_no_spread() {
        let pairs = [(3, 0.9), (1, 0.8), (2, 0.85), (7, 0.9), (0, 0.8)];
        let s = summarize(&pairs, Direction::Max).unwrap();
        assert_eq!((s.min, s.worst_seed), (0.8, 0));
        assert_eq!((s.max, s.best_seed), (0.9, 3));
        let s = summarize(&pairs, Direction::Min).unwrap();
        assert_eq!((s.min, s.best_seed), (0.8, 0));
        assert_eq!((s.max, s.worst_seed), (0.9, 3));
        assert_eq!(summarize(&[], Direction::Max), None);
        let s = summarize(&[(5, 0.5)], Direction::Max).unwrap();
        assert_eq!(
            (s.n, s.std, s.best_seed, s.median, s.gap),
            (1, 0.0, 5, 0.5, 0.0)
        );
    }

    #[test]
    fn quantiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 4.0, 8.0];
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 8.0);
        assert_eq!(quantile(&v, 0.5), 3.0);
        assert_eq!(quantile(&v, 0.25), 1.75);
    }
}
